"""The flax-community medclip's module path: notebooks and apps written for the original load with
`from medclip.modeling_hybrid_clip import FlaxHybridCLIP`, and get today's class from here."""

from medclip.hybrid_clip import FlaxHybridCLIP
from medclip.models.hybrid import HybridCLIP as FlaxHybridCLIPModule

__all__ = ["FlaxHybridCLIP", "FlaxHybridCLIPModule"]
