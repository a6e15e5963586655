"""The flax-community medclip's config module path (`from medclip.configuration_hybrid_clip import
HybridCLIPConfig`), kept for code written for the original; it gives today's config class."""

from medclip.models.hybrid import HybridCLIPConfig

__all__ = ["HybridCLIPConfig"]
