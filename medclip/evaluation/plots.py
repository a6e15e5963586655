"""PNG plots of training logs and retrieval examples.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing needs a display, no global
backend is switched for the rest of the process, and plotting is safe from worker threads.
"""

from __future__ import annotations

import io
import json
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medclip.storage import AnyPath, as_path, open_file, read_bytes, write_bytes

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError as err:  # matplotlib is only needed for plots, not for metrics
    raise ImportError("medclip.evaluation.plots needs matplotlib: pip install matplotlib") from err

ImageLike = str | Path | np.ndarray

_RECALL_KEY = re.compile(r"^eval_(i2t|t2i)_R@(\d+)$")
_DPI = 100


def read_metrics_jsonl(path: str | Path) -> list[dict]:
    """One dict per non-empty line of a JSON-lines metrics log."""
    path = as_path(path)
    records = []
    with open_file(path, "r", encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number} is not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number} holds a {type(record).__name__}, expected an object")
            records.append(record)
    return records


def plot_training_curves(metrics_jsonl_path: str | Path, out_png: str | Path) -> Path:
    """Loss vs step (train, and eval where it can be placed) and eval recall@K per epoch, as one PNG.

    Lines with ``step`` and ``train_loss`` give the training curve. Lines with ``eval_loss`` are placed at
    their ``step``, or, without one, at the step their ``epoch`` maps to along the training log. Every
    ``eval_{i2t,t2i}_R@K`` key is drawn against ``epoch`` (or ``step`` when a line has no epoch), as logged.
    """
    records = read_metrics_jsonl(metrics_jsonl_path)
    train = sorted((r["step"], r["train_loss"]) for r in records if _has(r, "step", "train_loss"))
    train_epochs = sorted((r["epoch"], r["step"]) for r in records if _has(r, "step", "epoch", "train_loss"))
    eval_loss = []
    for r in records:
        if not _has(r, "eval_loss"):
            continue
        if _has(r, "step"):
            eval_loss.append((r["step"], r["eval_loss"]))
        elif _has(r, "epoch") and len(train_epochs) >= 2:
            epochs, steps = zip(*train_epochs)
            eval_loss.append((float(np.interp(r["epoch"], epochs, steps)), r["eval_loss"]))
    recalls: dict[str, list[tuple[float, float]]] = {}
    recall_x = "epoch"
    for r in records:
        x = r.get("epoch", r.get("step"))
        for key, value in r.items():
            if _RECALL_KEY.match(key) and _is_number(value) and _is_number(x):
                recalls.setdefault(key, []).append((x, value))
                recall_x = recall_x if "epoch" in r else "step"
    if not train and not eval_loss and not recalls:
        raise ValueError(
            f"{metrics_jsonl_path} has no train_loss (with step), eval_loss or eval_*_R@K entries to plot"
        )

    fig = Figure(figsize=(12, 4.5), dpi=_DPI, layout="constrained")
    loss_ax, recall_ax = fig.subplots(1, 2)
    if train:
        steps, losses = np.array(train, dtype=float).T
        loss_ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="train loss")
        window = len(losses) // 50
        if window > 1:  # a running mean makes the trend readable on noisy per-step losses
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            label = f"train loss (mean of {window})"
            loss_ax.plot(steps[window - 1 :], smooth, color="tab:blue", label=label)
    if eval_loss:
        steps, losses = np.array(sorted(eval_loss), dtype=float).T
        loss_ax.plot(steps, losses, "o-", color="tab:orange", label="eval loss")
    loss_ax.set(title="Loss", xlabel="step", ylabel="loss")
    _legend_or_note(loss_ax, "no loss logged")

    ks = sorted({_recall_sort_key(key)[1] for key in recalls})
    for key in sorted(recalls, key=_recall_sort_key):
        direction, k = _recall_sort_key(key)
        xs, ys = np.array(sorted(recalls[key]), dtype=float).T
        recall_ax.plot(
            xs,
            ys,
            marker="o",
            linestyle="-" if direction == "i2t" else "--",
            color=f"C{ks.index(k)}",  # same colour for the same K in both directions
            label=f"{direction} R@{k}",
        )
    recall_ax.set(title="Retrieval recall (eval)", xlabel=recall_x, ylabel="recall@K")
    if recalls:
        recall_ax.set_ylim(bottom=0)
    _legend_or_note(recall_ax, "no eval_*_R@K logged")
    return _save(fig, out_png)


def plot_validation_loss(metrics_jsonl_path: str | Path, out_png: str | Path) -> Path:
    """Validation loss per evaluation (and the training loss, smoothed, behind it) as one small PNG, the curve
    the original flax-community medclip README shows."""
    records = read_metrics_jsonl(metrics_jsonl_path)
    evals = sorted((r["step"], r["eval_loss"]) for r in records if _has(r, "step", "eval_loss"))
    if not evals:
        raise ValueError(f"{metrics_jsonl_path} has no eval_loss with a step to plot")
    train = sorted((r["step"], r["train_loss"]) for r in records if _has(r, "step", "train_loss"))
    fig = Figure(figsize=(5, 3), dpi=_DPI, layout="constrained")
    ax = fig.subplots()
    if len(train) > 2:
        steps, losses = np.array(train, dtype=float).T
        window = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="tab:blue", alpha=0.5, label="train loss (smoothed)")
    steps, losses = np.array(evals, dtype=float).T
    ax.plot(steps, losses, "o-", color="tab:orange", label="validation loss")
    ax.set(title="Validation loss", xlabel="step", ylabel="loss")
    ax.legend(frameon=False)
    return _save(fig, out_png)


def plot_retrieval_grid(
    query: str | Path | np.ndarray,
    images: Sequence[ImageLike],
    captions: Sequence[str],
    scores: Sequence[float],
    out_png: str | Path,
    *,
    correct: Sequence[bool] | None = None,
    ncols: int = 5,
) -> Path:
    """Grid of retrieved items, best first, each with its rank, score and (wrapped) caption.

    ``query`` is the query text (a ``str``, shown as the title) or a query image (a ``Path`` or an array,
    shown in the first cell). Images are file paths or arrays (H, W) / (H, W, 3|4); float arrays outside
    [0, 1] (e.g. model-normalised pixels) are min-max rescaled for display. ``correct`` frames each result
    green or red.
    """
    n = len(images)
    if n == 0:
        raise ValueError("no retrieved images to plot")
    if len(captions) != n or len(scores) != n or (correct is not None and len(correct) != n):
        raise ValueError(
            f"{n} images but {len(captions)} captions, {len(scores)} scores"
            + ("" if correct is None else f", {len(correct)} correct flags")
        )
    text_query = isinstance(query, str)
    cells = n + (0 if text_query else 1)
    ncols = max(1, min(ncols, cells))
    nrows = -(-cells // ncols)
    fig = Figure(figsize=(2.6 * ncols, 3.3 * nrows + 0.6), dpi=_DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    if text_query:
        fig.suptitle("Query: " + _wrap(query, 40 * ncols, 2), fontsize=12)
    else:
        fig.suptitle("Image query (first cell) and retrieved images", fontsize=12)
        _show(axes[0], _load_image(query), "query", color="tab:blue")
    for i, (image, caption, score) in enumerate(zip(images, captions, scores)):
        ax = axes[i + cells - n]
        color = None if correct is None else ("tab:green" if correct[i] else "tab:red")
        _show(ax, _load_image(image), f"#{i + 1}  score {score:.3f}", color=color)
        ax.set_xlabel(_wrap(caption, 30, 4), fontsize=8)
    for ax in axes[cells:]:
        ax.set_axis_off()
    return _save(fig, out_png)


# --- internals -------------------------------------------------------------------------------------


def _has(record: dict, *keys: str) -> bool:
    return all(_is_number(record.get(key)) for key in keys)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _recall_sort_key(key: str) -> tuple[str, int]:
    direction, k = _RECALL_KEY.match(key).groups()
    return direction, int(k)


def _legend_or_note(ax, note: str) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, color="gray")


def _wrap(text: str, width: int, max_lines: int) -> str:
    lines = textwrap.wrap(" ".join(text.split()), width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 3].rstrip() + "..."
    return "\n".join(lines)


def _load_image(image: ImageLike) -> np.ndarray:
    """(H, W) or (H, W, C) array ready for imshow; large files are downscaled for speed."""
    if isinstance(image, str | Path):
        from PIL import Image

        path = as_path(image)
        if not path.is_file():
            raise FileNotFoundError(f"retrieval grid image not found: {path}")
        with Image.open(path if isinstance(path, Path) else io.BytesIO(read_bytes(path))) as img:
            img.thumbnail((512, 512))
            return np.asarray(img if img.mode in ("L", "RGB") else img.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"image array must be (H, W) or (H, W, 3|4), got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating) and (array.min() < 0 or array.max() > 1):
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low or 1.0)
    return array


def _show(ax, image: np.ndarray, title: str, color: str | None) -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(color is not None)
        if color is not None:
            spine.set_color(color)
            spine.set_linewidth(4)


def _save(fig: Figure, out_png: str | Path) -> AnyPath:
    """Writes the PNG to a local file or, through medclip.storage, to a bucket object."""
    out_png = as_path(out_png)
    FigureCanvasAgg(fig)
    if isinstance(out_png, Path):
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, format="png")
        return out_png
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_bytes(out_png, buffer.getvalue())
    return out_png
