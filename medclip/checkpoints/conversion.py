"""Conversion tables between Hugging Face (PyTorch-layout) weight names and our NNX parameter paths.

Each architecture is a table of rules `HF key template -> our key template, transform`, where `{i}` is a
layer index. The same table converts both ways, so loading and `save_pretrained` cannot drift apart.
Loading fills an abstract model (`nnx.eval_shape`) and reports every unused, missing or misshapen key
in one error instead of silently keeping random weights.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

import numpy as np

from medclip.checkpoints.resize import resize_position_embeddings


class WeightMismatchError(ValueError):
    """The checkpoint does not fit the model: lists every offending key."""


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # e.g. "encoder.layer.{i}.attention.self.query.weight"
    ours: str  # e.g. "encoder.layers.{i}.self_attn.q_proj.kernel"
    transform: str = "identity"  # identity | linear | conv | position

    def _regex(self, template: str) -> re.Pattern:
        return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")

    def match_hf(self, key: str) -> str | None:
        m = self._regex(self.hf).match(key)
        return None if m is None else self.ours.format(**m.groupdict())

    def match_ours(self, key: str) -> str | None:
        m = self._regex(self.ours).match(key)
        return None if m is None else self.hf.format(**m.groupdict())


def linear(hf: str, ours: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{hf}.weight", f"{ours}.kernel", "linear")]
    return rules + ([Rule(f"{hf}.bias", f"{ours}.bias")] if bias else [])


def norm(hf: str, ours: str) -> list[Rule]:
    return [Rule(f"{hf}.weight", f"{ours}.scale"), Rule(f"{hf}.bias", f"{ours}.bias")]


def embedding(hf: str, ours: str, transform: str = "identity") -> list[Rule]:
    return [Rule(f"{hf}.weight", f"{ours}.embedding", transform)]


def prefixed(prefix: str, rules: Iterable[Rule], ours_prefix: str) -> list[Rule]:
    return [Rule(prefix + r.hf, ours_prefix + r.ours, r.transform) for r in rules]


def _clip_layer(hf: str) -> list[Rule]:
    layer, ours = f"{hf}.{{i}}", "encoder.layers.{i}"
    return [
        *norm(f"{layer}.layer_norm1", f"{ours}.layer_norm1"),
        *[r for p in "qkv" for r in linear(f"{layer}.self_attn.{p}_proj", f"{ours}.self_attn.{p}_proj")],
        *linear(f"{layer}.self_attn.out_proj", f"{ours}.self_attn.out_proj"),
        *norm(f"{layer}.layer_norm2", f"{ours}.layer_norm2"),
        *linear(f"{layer}.mlp.fc1", f"{ours}.mlp.fc1"),
        *linear(f"{layer}.mlp.fc2", f"{ours}.mlp.fc2"),
    ]


CLIP_VISION_RULES = [
    Rule("embeddings.patch_embedding.weight", "embeddings.patch_embedding", "conv"),
    Rule("embeddings.class_embedding", "embeddings.class_embedding"),
    *embedding("embeddings.position_embedding", "embeddings.position_embedding", "position"),
    *norm("pre_layrnorm", "pre_layernorm"),  # sic: transformers' spelling
    *_clip_layer("encoder.layers"),
    *norm("post_layernorm", "post_layernorm"),
]

CLIP_TEXT_RULES = [
    *embedding("embeddings.token_embedding", "token_embedding"),
    *embedding("embeddings.position_embedding", "position_embedding"),
    *_clip_layer("encoder.layers"),
    *norm("final_layer_norm", "final_layer_norm"),
]

_BERT_EMBEDDINGS = [
    *embedding("embeddings.word_embeddings", "embeddings.word_embeddings"),
    *embedding("embeddings.position_embeddings", "embeddings.position_embeddings"),
    *norm("embeddings.LayerNorm", "embeddings.layer_norm"),
]

BERT_RULES = [
    *_BERT_EMBEDDINGS,
    *embedding("embeddings.token_type_embeddings", "embeddings.token_type_embeddings"),
    *linear("encoder.layer.{i}.attention.self.query", "encoder.layers.{i}.self_attn.q_proj"),
    *linear("encoder.layer.{i}.attention.self.key", "encoder.layers.{i}.self_attn.k_proj"),
    *linear("encoder.layer.{i}.attention.self.value", "encoder.layers.{i}.self_attn.v_proj"),
    *linear("encoder.layer.{i}.attention.output.dense", "encoder.layers.{i}.self_attn.out_proj"),
    *norm("encoder.layer.{i}.attention.output.LayerNorm", "encoder.layers.{i}.attention_norm"),
    *linear("encoder.layer.{i}.intermediate.dense", "encoder.layers.{i}.mlp.fc1"),
    *linear("encoder.layer.{i}.output.dense", "encoder.layers.{i}.mlp.fc2"),
    *norm("encoder.layer.{i}.output.LayerNorm", "encoder.layers.{i}.output_norm"),
    *linear("pooler.dense", "pooler"),
]

DISTILBERT_RULES = [
    *_BERT_EMBEDDINGS,
    *[r for p in "qkv" for r in linear(f"transformer.layer.{{i}}.attention.{p}_lin",
                                        f"encoder.layers.{{i}}.self_attn.{p}_proj")],
    *linear("transformer.layer.{i}.attention.out_lin", "encoder.layers.{i}.self_attn.out_proj"),
    *norm("transformer.layer.{i}.sa_layer_norm", "encoder.layers.{i}.attention_norm"),
    *linear("transformer.layer.{i}.ffn.lin1", "encoder.layers.{i}.mlp.fc1"),
    *linear("transformer.layer.{i}.ffn.lin2", "encoder.layers.{i}.mlp.fc2"),
    *norm("transformer.layer.{i}.output_layer_norm", "encoder.layers.{i}.output_norm"),
]

# Buffers and pre-training heads that checkpoints carry but an encoder does not use.
IGNORED_KEYS = re.compile(
    r"(^|\.)(position_ids|token_type_ids)$"
    r"|^(cls|lm_head|vocab_transform|vocab_layer_norm|vocab_projector|qa_outputs|classifier|pre_classifier)\.")

_TO_OURS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "linear": lambda x: x.T,  # torch (out, in) -> (in, out)
    "conv": lambda x: x.transpose(2, 3, 1, 0),  # OIHW -> HWIO
    "position": lambda x: x,
}
_TO_HF: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "linear": lambda x: x.T,
    "conv": lambda x: x.transpose(3, 2, 0, 1),
    "position": lambda x: x,
}


def normalize_hf_key(key: str) -> str:
    """Old TF-converted BERT checkpoints name LayerNorm parameters gamma/beta."""
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


def _find_rule(rules: list[Rule], hf_key: str) -> tuple[Rule | None, str | None]:
    for rule in rules:
        ours = rule.match_hf(hf_key)
        if ours is not None:
            return rule, ours
    return None, None


def to_ours(hf_tensors: dict[str, np.ndarray], rules: list[Rule], target_shapes: dict[str, tuple[int, ...]],
            *, source: str, optional: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Converts a flat HF state dict onto our keys, checking it covers `target_shapes` exactly.

    `optional` target keys may be absent from the checkpoint (the caller initialises them).
    Raises one WeightMismatchError listing every unused, missing and misshapen key.
    """
    converted: dict[str, np.ndarray] = {}
    unused, mismatched = [], []
    for raw_key, value in hf_tensors.items():
        key = normalize_hf_key(raw_key)
        rule, ours = _find_rule(rules, key)
        if ours is None or ours not in target_shapes:
            if not IGNORED_KEYS.search(key):
                unused.append(raw_key)
            continue
        array = _TO_OURS[rule.transform](np.asarray(value))
        expected = tuple(target_shapes[ours])
        if rule.transform == "position" and array.shape != expected and array.shape[1:] == expected[1:]:
            array = resize_position_embeddings(array, expected[0])
        if array.shape != expected:
            mismatched.append(f"{raw_key}: checkpoint {tuple(array.shape)} vs model {expected} (as {ours})")
            continue
        converted[ours] = array
    missing = sorted(set(target_shapes) - set(converted) - set(optional))
    if unused or missing or mismatched:
        lines = [f"{source} does not match the model config:"]
        for title, keys in (("unused checkpoint keys", unused), ("missing from checkpoint", missing),
                            ("shape mismatches", mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}):")
                lines.extend(f"    {k}" for k in sorted(keys))
        lines.append("Check that the checkpoint and the config describe the same architecture "
                     "(model_type, sizes, layer count).")
        raise WeightMismatchError("\n".join(lines))
    return converted


def to_hf(our_tensors: dict[str, np.ndarray], rules: list[Rule]) -> dict[str, np.ndarray]:
    """Inverse of `to_ours`, for `save_pretrained` in transformers' layout."""
    out = {}
    for key, value in our_tensors.items():
        rule = next((r for r in rules if r.match_ours(key) is not None), None)
        if rule is None:
            raise WeightMismatchError(f"no Hugging Face name for parameter {key}")
        out[rule.match_ours(key)] = np.array(_TO_HF[rule.transform](np.asarray(value)), order="C")  # keeps 0-d as 0-d
    return out


def flax_to_hf_keys(flax_tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames a legacy transformers Flax checkpoint (kernel/scale/embedding) into PyTorch layout."""
    out = {}
    for key, value in flax_tensors.items():
        head, _, leaf = key.rpartition(".")
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            leaf = "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[f"{head}.{leaf}" if head else leaf] = value
    return out
