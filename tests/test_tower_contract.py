"""The tower contract: every registered tower's config answers what callers read (no getattr guesses), says
whether it is stochastic, and the feature caches ask that rather than one dropout field."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import ClassVar

import pytest

from medclip.models import BertConfig, CLIPTextConfig, CLIPVisionConfig, HybridCLIPConfig, registry
from medclip.models.config_base import TextTowerConfig, VisionTowerConfig
from medclip.models.tower_contract import TowerSpec
from medclip.training import image_cache, text_cache


@dataclasses.dataclass(frozen=True)
class DropPathConfig(VisionTowerConfig):
    """A ConvNeXt-style tower whose only randomness is drop path: no field named like any dropout."""

    hidden_size: int = 8
    drop_path_rate: float = 0.0

    @property
    def stochastic(self) -> bool:
        return self.drop_path_rate > 0


@dataclasses.dataclass(frozen=True)
class SilentConfig(VisionTowerConfig):
    hidden_size: int = 8

    model_type: ClassVar[str] = "silent"


def _spec(name: str, config_class: type, kind: str = "vision") -> TowerSpec:
    return TowerSpec(name, kind, config_class, object, lambda config, fmt: [], prefixes={"hf": ("",)})


def test_every_builtin_tower_follows_the_contract_of_its_kind():
    kinds = {"vision": VisionTowerConfig, "text": TextTowerConfig}
    specs = registry.towers()
    assert {s.name for s in specs} >= {"clip_vision_model", "timm_vit", "modified_resnet", "timm_resnet",
                                       "timm_efficientnet", "timm_convnext", "clip_text_model", "bert"}
    for spec in specs:
        config = spec.config_class.tiny() if hasattr(spec.config_class, "tiny") else spec.config_class()
        assert isinstance(config, kinds[spec.kind]), spec.name
        assert isinstance(config.stochastic, bool), spec.name
        if spec.kind == "vision":
            assert isinstance(config.timm_pools, tuple) and isinstance(config.timm_architectures, tuple)
        else:
            assert isinstance(config.has_pooler, bool) and isinstance(config.is_roberta, bool)


@pytest.mark.parametrize("config, stochastic", [
    (CLIPVisionConfig.tiny(), False),
    (CLIPVisionConfig.tiny().replace(attention_dropout=0.1), True),
    (CLIPTextConfig.tiny(), False),
    (CLIPTextConfig.tiny().replace(attention_dropout=0.1), True),
    (BertConfig.tiny().replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), False),
    (BertConfig.tiny().replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.1), True),
    (BertConfig.tiny().replace(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0), True),
])
def test_stochastic_says_whether_any_dropout_is_active(config, stochastic):
    assert config.stochastic is stochastic


def test_a_tower_that_does_not_say_whether_it_is_stochastic_is_refused():
    with pytest.raises(TypeError, match="must define `stochastic`"):
        registry.register(_spec("silent", SilentConfig))
    with pytest.raises(TypeError, match="must subclass TextTowerConfig"):
        registry.register(_spec("drop_path_text", DropPathConfig, kind="text"))
    assert "silent" not in {s.name for s in registry.towers()}


def test_image_cache_refuses_a_tower_with_drop_path_not_only_attention_dropout():
    """The gap the contract closes: a drop-path tower has no attention_dropout for a getattr to find."""
    ok = dict(freeze_vision=True, train_crop="center", hflip=False, dropout=True, freeze_bn_stats=True)
    model = SimpleNamespace(config=SimpleNamespace(vision_config=DropPathConfig(drop_path_rate=0.1)))
    assert "drop path" in image_cache.why_not_cacheable(model, **ok)
    assert image_cache.why_not_cacheable(model, **{**ok, "dropout": False}) is None  # the run turns it off
    deterministic = SimpleNamespace(config=SimpleNamespace(vision_config=DropPathConfig()))
    assert image_cache.why_not_cacheable(deterministic, **ok) is None


def test_text_cache_asks_the_text_tower_whether_it_is_stochastic():
    base = HybridCLIPConfig.tiny()
    ok = dict(freeze_text=True, text_dropout=True, mlm=False)
    clip_text = base.replace(text_config=CLIPTextConfig.tiny().replace(attention_dropout=0.1))
    assert "dropout" in text_cache.why_not_cacheable(clip_text, **ok)
    assert text_cache.why_not_cacheable(clip_text, **{**ok, "text_dropout": False}) is None
    quiet = base.replace(text_config=CLIPTextConfig.tiny())
    assert text_cache.why_not_cacheable(quiet, **ok) is None


def test_max_text_positions_reads_the_contract():
    assert registry.max_text_positions(CLIPTextConfig.tiny()) == CLIPTextConfig.tiny().max_position_embeddings
    roberta = BertConfig.tiny().replace(model_type="roberta", pad_token_id=1)
    assert registry.max_text_positions(roberta) == roberta.max_position_embeddings - 2
