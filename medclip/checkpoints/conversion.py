"""Applying the towers' conversion tables (medclip.models.weights.Rule) to checkpoint tensors, both ways.

The tables live beside each tower; this module does the array work: transposes, q/k/v splits of fused
projections, position-table resizing, and the one error that lists every unused, missing or misshapen key
instead of silently keeping random weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import numpy as np

from medclip.checkpoints.resize import resize_position_embeddings
from medclip.models.weights import Rule, embedding, fused_linear, linear, norm, prefixed  # noqa: F401 (re-exported)


class WeightMismatchError(ValueError):
    """The checkpoint does not fit the model: lists every offending key."""


# Buffers and pre-training heads that checkpoints carry but an encoder does not use.
IGNORED_KEYS = re.compile(
    r"(^|\.)(position_ids|token_type_ids|num_batches_tracked)$"
    r"|^(cls|lm_head|vocab_transform|vocab_layer_norm|vocab_projector|qa_outputs|classifier|pre_classifier)\.")

_TO_OURS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "linear": lambda x: x.T,  # torch (out, in) -> (in, out)
    "conv": lambda x: x.transpose(2, 3, 1, 0),  # OIHW -> HWIO
    "position": lambda x: x,
    "cls_token": lambda x: x.reshape(-1),  # timm (1, 1, d)
    "batched_position": lambda x: x.reshape(x.shape[-2:]),  # timm (1, n, d)
    "one": lambda x: x.reshape(()),  # (1,)
}
_TO_HF: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "linear": lambda x: x.T,
    "conv": lambda x: x.transpose(3, 2, 0, 1),
    "position": lambda x: x,
    "cls_token": lambda x: x.reshape(1, 1, -1),
    "batched_position": lambda x: x[None],
    "one": lambda x: x.reshape(1),
}
_RESIZABLE = ("position", "batched_position")


def normalize_hf_key(key: str) -> str:
    """Old TF-converted BERT checkpoints name LayerNorm parameters gamma/beta."""
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


def _matching_rules(rules: list[Rule], hf_key: str) -> list[tuple[Rule, str]]:
    """Every rule reading `hf_key` (several for a fused q/k/v tensor), the first match per part."""
    found: dict[tuple[int, int] | None, tuple[Rule, str]] = {}
    for rule in rules:
        ours = rule.match_hf(hf_key)
        if ours is not None and rule.part not in found:
            found[rule.part] = (rule, ours)
    if None in found:
        return [found[None]]
    return [found[part] for part in sorted(found)]


def _chunk(array: np.ndarray, part: tuple[int, int] | None) -> np.ndarray:
    if part is None:
        return array
    index, count = part
    if array.shape[0] % count:
        raise ValueError(f"axis 0 of length {array.shape[0]} does not split into {count} parts")
    size = array.shape[0] // count
    return array[index * size:(index + 1) * size]


def to_ours(hf_tensors: dict[str, np.ndarray], rules: list[Rule], target_shapes: dict[str, tuple[int, ...]],
            *, source: str, optional: Iterable[str] = (), ignored: re.Pattern | None = None) -> dict[str, np.ndarray]:
    """Converts a flat checkpoint state dict onto our keys, checking it covers `target_shapes` exactly.

    `optional` target keys may be absent from the checkpoint (the caller initialises them); `ignored` matches
    further checkpoint keys that are known and deliberately not used. Raises one WeightMismatchError listing
    every unused, missing and misshapen key.
    """
    converted: dict[str, np.ndarray] = {}
    unused, mismatched = [], []
    for raw_key, value in hf_tensors.items():
        key = normalize_hf_key(raw_key)
        matches = [(rule, ours) for rule, ours in _matching_rules(rules, key) if ours in target_shapes]
        if not matches:
            if not (IGNORED_KEYS.search(key) or (ignored is not None and ignored.search(key))):
                unused.append(raw_key)
            continue
        for rule, ours in matches:
            try:
                array = _TO_OURS[rule.transform](_chunk(np.asarray(value), rule.part))
            except ValueError as e:
                mismatched.append(f"{raw_key}: checkpoint {tuple(np.shape(value))} cannot become {ours} ({e})")
                continue
            expected = tuple(target_shapes[ours])
            if rule.transform in _RESIZABLE and array.shape != expected and array.shape[1:] == expected[1:]:
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
    """Inverse of `to_ours`, for saving in a checkpoint format's layout (fused q/k/v parts concatenated)."""
    parts: dict[str, dict[int, np.ndarray]] = {}
    out = {}
    for key, value in our_tensors.items():
        rule = next((r for r in rules if r.match_ours(key) is not None), None)
        if rule is None:
            raise WeightMismatchError(f"no checkpoint name for parameter {key}")
        hf_key = rule.match_ours(key)
        array = _TO_HF[rule.transform](np.asarray(value))
        if rule.part is None:
            out[hf_key] = np.array(array, order="C")  # keeps 0-d as 0-d
        else:
            parts.setdefault(hf_key, {})[rule.part[0]] = array
            if len(parts[hf_key]) == rule.part[1]:
                out[hf_key] = np.ascontiguousarray(np.concatenate([parts[hf_key][i] for i in range(rule.part[1])]))
    incomplete = sorted(k for k, p in parts.items() if k not in out)
    if incomplete:
        raise WeightMismatchError(f"fused checkpoint tensors with parts missing: {incomplete}")
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
