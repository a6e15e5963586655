"""medclip: fine-tune CLIP-style image-text models on medical data with JAX and Flax NNX."""

from medclip.hybrid_clip import FlaxHybridCLIP
from medclip.models.hybrid import HybridCLIPConfig

__all__ = ["FlaxHybridCLIP", "HybridCLIPConfig"]
__version__ = "0.1.0"
