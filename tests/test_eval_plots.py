"""Plots are written as PNGs of the expected size and are not blank."""

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from medclip.evaluation.plots import (  # noqa: E402
    plot_retrieval_grid,
    plot_training_curves,
    read_metrics_jsonl,
)

TAB_GREEN, TAB_RED = (44, 160, 44), (214, 39, 40)


def _pixels(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB")).astype(int)


def _count_colour(pixels, rgb, tolerance=12):
    return int(np.all(np.abs(pixels - np.array(rgb)) <= tolerance, axis=-1).sum())


def _write_log(path, with_recall=True):
    lines = []
    for step in range(1, 301):
        lines.append({"step": step, "epoch": (step - 1) / 100, "train_loss": 3.0 / step**0.3})
        if step % 100 == 0:
            eval_line = {"epoch": step // 100, "eval_loss": 2.0 / step**0.2}
            if with_recall:
                for direction in ("i2t", "t2i"):
                    eval_line |= {f"eval_{direction}_R@{k}": 0.01 * k * step / 100 for k in (1, 5, 10)}
            lines.append(eval_line)
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")


def test_training_curves_png(tmp_path):
    log = tmp_path / "metrics.jsonl"
    _write_log(log)
    out = plot_training_curves(log, tmp_path / "plots" / "curves.png")
    assert out.stat().st_size > 10_000
    pixels = _pixels(out)
    assert pixels.shape == (450, 1200, 3)
    assert pixels.std() > 10  # something was drawn
    assert len(read_metrics_jsonl(log)) == 303


def test_training_curves_without_recall(tmp_path):
    log = tmp_path / "metrics.jsonl"
    _write_log(log, with_recall=False)
    assert _pixels(plot_training_curves(log, tmp_path / "curves.png")).shape == (450, 1200, 3)


def test_training_curves_errors(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "note": "no losses"}\n')
    with pytest.raises(ValueError, match="no train_loss"):
        plot_training_curves(log, tmp_path / "curves.png")
    log.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_loss": \n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not valid JSON"):
        plot_training_curves(log, tmp_path / "curves.png")


def test_retrieval_grid_text_query(tmp_path):
    rng = np.random.default_rng(0)
    image_file = tmp_path / "xray.png"
    Image.fromarray(rng.integers(0, 255, (300, 200), dtype=np.uint8)).save(image_file)
    images = [image_file, rng.random((40, 60, 3)), rng.standard_normal((50, 50))]
    captions = ["Chest x-ray showing a left tension pneumothorax " * 4, "Axial CT", "Ultrasound of the liver"]
    out = plot_retrieval_grid(
        "chest x-ray pneumothorax", images, captions, [0.91, 0.52, 0.13], tmp_path / "grid.png",
        correct=[True, False, False], ncols=5,
    )
    pixels = _pixels(out)
    assert pixels.shape == (390, 780, 3)  # 3 columns x 2.6 in, 1 row x 3.3 in + 0.6 in title, at 100 dpi
    green, red = _count_colour(pixels, TAB_GREEN), _count_colour(pixels, TAB_RED)
    assert green > 500 and red > green  # one correct frame, two wrong ones


def test_retrieval_grid_image_query_wraps_rows(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.random((32, 32)) for _ in range(6)]
    scores = np.linspace(1, 0, 6)
    out = plot_retrieval_grid(rng.random((32, 32, 3)), images, ["c"] * 6, scores, tmp_path / "g.png", ncols=4)
    assert _pixels(out).shape == (720, 1040, 3)  # 7 cells in 4 columns: 2 rows


def test_retrieval_grid_errors(tmp_path):
    with pytest.raises(ValueError, match="2 images but 1 captions, 2 scores"):
        plot_retrieval_grid("q", [np.zeros((4, 4))] * 2, ["a"], [0.1, 0.2], tmp_path / "g.png")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        plot_retrieval_grid("q", [tmp_path / "missing.jpg"], ["a"], [0.1], tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"got shape \(4, 4, 2\)"):
        plot_retrieval_grid("q", [np.zeros((4, 4, 2))], ["a"], [0.1], tmp_path / "g.png")


def test_validation_loss_curve(tmp_path):
    import json as _json

    from PIL import Image as _Image

    from medclip.evaluation.plots import plot_validation_loss

    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "train_loss": 4.0 - s / 100} for s in range(0, 200, 10)]
    lines += [{"step": s, "eval_loss": 3.0 - s / 200, "epoch": s // 100} for s in (100, 200)]
    path.write_text("".join(_json.dumps(line) + "\n" for line in lines))
    out = plot_validation_loss(path, tmp_path / "loss.png")
    assert _Image.open(out).size == (500, 300)
    path.write_text(_json.dumps({"step": 1, "train_loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no eval_loss"):
        plot_validation_loss(path, tmp_path / "none.png")
