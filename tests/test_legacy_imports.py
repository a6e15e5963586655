"""Code written for the flax-community medclip imports its classes from the original module paths."""

from __future__ import annotations


def test_original_module_paths_give_todays_classes():
    from medclip.configuration_hybrid_clip import HybridCLIPConfig as LegacyConfig
    from medclip.modeling_hybrid_clip import FlaxHybridCLIP as LegacyModel
    from medclip.modeling_hybrid_clip import FlaxHybridCLIPModule

    import medclip
    from medclip.models.hybrid import HybridCLIP

    assert LegacyModel is medclip.FlaxHybridCLIP and LegacyConfig is medclip.HybridCLIPConfig
    assert issubclass(LegacyModel, FlaxHybridCLIPModule) and FlaxHybridCLIPModule is HybridCLIP
    assert callable(LegacyModel.from_pretrained)  # the notebooks' entry point
