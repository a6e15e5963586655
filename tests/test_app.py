"""The demo app: its handlers directly, its page with Streamlit's headless AppTest, and `medclip app`'s launcher.

The browser end-to-end test is in test_app_browser.py. A tiny random model and a 24-image synthetic index
stand in for the demo's trained ones: these tests check the page's behaviour, not the model's quality.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from medclip import FlaxHybridCLIP
from medclip.app import handlers, launch
from medclip.app.handlers import InputError
from medclip.cli import main as cli_main
from medclip.data.synthetic import write_synthetic_dataset, write_synthetic_tokenizer
from medclip.evaluation.roco_labels import MODALITIES
from medclip.inference.index import EmbeddingIndex
from medclip.training.model_setup import demo_config

N_IMAGES = 24


def build_workspace(root: Path) -> tuple[Path, Path, Path]:
    """A tiny random model, 24 synthetic images and their index: (model, index, images folder)."""
    tokenizer = write_synthetic_tokenizer(root / "tok")
    FlaxHybridCLIP(demo_config(len(tokenizer), 32, 24), rngs=nnx.Rngs(0)).save_pretrained(
        root / "model", tokenizer=tokenizer)
    jsonl = write_synthetic_dataset(root / "data", N_IMAGES, seed=5, image_size=32)
    assert cli_main(["embed", str(root / "model"), "--data", str(jsonl), "--out", str(root / "index.npz")]) == 0
    return root / "model", root / "index.npz", root / "data" / "images"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="module")
def embedder(workspace):
    return handlers.load_embedder(str(workspace[0]))


# -- handlers ------------------------------------------------------------------------------------------------
def test_search_returns_k_images_with_captions_best_first(workspace, embedder):
    model, index_path, _ = workspace
    index = handlers.load_index(str(index_path), embedder)
    hits = handlers.search_images(embedder, index, "  CT of the chest showing a mass ", 7)
    assert [h.rank for h in hits] == list(range(1, 8))
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert all(h.caption and Path(h.path).is_file() for h in hits)
    assert len({h.path for h in hits}) == 7
    assert len(handlers.search_images(embedder, index, "MRI", 500)) == N_IMAGES  # k beyond the index: all of it


@pytest.mark.parametrize("query", ["", "   ", None])
def test_empty_query_is_refused_with_an_example(workspace, embedder, query):
    index = handlers.load_index(str(workspace[1]), embedder)
    with pytest.raises(InputError, match="Empty query: type what to look for, e.g. "):
        handlers.search_images(embedder, index, query, 5)


def test_index_problems_are_explained(workspace, embedder, tmp_path):
    with pytest.raises(InputError, match=r"No embedding index at .*missing.npz.*medclip embed.*make demo"):
        handlers.load_index(str(tmp_path / "missing.npz"), embedder)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(InputError, match="Cannot use the index .*not a medclip embedding index"):
        handlers.load_index(str(tmp_path / "junk.npz"), embedder)
    other = EmbeddingIndex(np.eye(3, embedder.dim, dtype=np.float32), ["a", "b", "c"], ["", "", ""], "0" * 16)
    other.save(tmp_path / "other.npz")
    with pytest.raises(InputError, match="built by another model"):
        handlers.load_index(str(tmp_path / "other.npz"), embedder)


def test_a_model_that_cannot_load_is_explained(tmp_path):
    with pytest.raises(InputError, match=r"Cannot load the model .*does not exist.*--model"):
        handlers.load_embedder(str(tmp_path / "no_model"))


def test_upload_ranks_captions_and_zero_shot_labels(workspace, embedder):
    image = sorted(workspace[2].iterdir())[0]
    captions = list(handlers.EXAMPLE_QUERIES)
    result = handlers.describe_upload(embedder, image.name, image.read_bytes(), captions)
    assert sorted(s.text for s in result.captions) == sorted(captions)
    assert sorted(s.text for s in result.labels) == sorted(MODALITIES)
    for ranked in (result.captions, result.labels):
        assert [s.cosine for s in ranked] == sorted((s.cosine for s in ranked), reverse=True)
        assert sum(s.probability for s in ranked) == pytest.approx(1.0, abs=1e-5)
    # The same ranking as the `medclip rank` arithmetic: cosine of the image and caption embeddings.
    image_embed = embedder.embed_images([str(image)])[0]
    best = max(captions, key=lambda c: float(embedder.embed_texts([c])[0] @ image_embed))
    assert result.captions[0].text == best


@pytest.mark.parametrize("data, reason", [(b"name,age\nbob,3\n", "not a recognised image format"),
                                          (b"", "0 bytes")])
def test_upload_that_is_not_an_image_is_explained(embedder, data, reason):
    with pytest.raises(InputError, match=rf"`notes.csv` is not an image we can use \({reason}\)\. Upload a PNG"):
        handlers.describe_upload(embedder, "notes.csv", data, ["a caption"])


def test_upload_needs_captions_and_two_labels(workspace, embedder):
    data = sorted(workspace[2].iterdir())[0].read_bytes()
    with pytest.raises(InputError, match="No candidate captions"):
        handlers.describe_upload(embedder, "x.png", data, ["  ", ""])
    with pytest.raises(InputError, match="at least two different labels"):
        handlers.describe_upload(embedder, "x.png", data, ["a caption"], ["CT", "CT"])


def test_upload_finds_similar_indexed_images(workspace, embedder):
    _, index_path, images = workspace
    index = handlers.load_index(str(index_path), embedder)
    image = sorted(images.iterdir())[2]
    result = handlers.describe_upload(embedder, image.name, image.read_bytes(), ["a caption"])
    hits = handlers.similar_images(index, result.embedding, 5)
    scores = index.embeddings @ result.embedding  # brute force
    assert [h.path for h in hits] == [index.paths[i] for i in np.argsort(-scores, kind="stable")[:5]]
    assert Path(hits[0].path).name == image.name and hits[0].score == pytest.approx(1.0, abs=1e-4)  # itself
    with pytest.raises(InputError, match="at least 1"):
        handlers.similar_images(index, result.embedding, 0)


def test_lines_keeps_non_empty_stripped_lines():
    assert handlers.lines(" a \n\n b\n  \n") == ["a", "b"]
    assert handlers.lines("") == [] and handlers.lines(None) == []


def test_query_latency_on_a_10k_image_index(embedder):
    """A query (embed the text, score 10,000 images, pick the top k) answers well under a second."""
    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(10_000, embedder.dim)).astype(np.float32)
    embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
    index = EmbeddingIndex(embeds, [f"{i}.png" for i in range(10_000)], [""] * 10_000, embedder.fingerprint)
    handlers.search_images(embedder, index, "warm-up", 10)
    times = []
    for query in handlers.EXAMPLE_QUERIES * 4:
        start = time.perf_counter()
        hits = handlers.search_images(embedder, index, query, 10)
        times.append(time.perf_counter() - start)
    assert len(hits) == 10
    print(f"\nquery latency, 10k images, dim {embedder.dim}: median {1e3 * np.median(times):.1f} ms, "
          f"max {1e3 * max(times):.1f} ms")
    assert np.median(times) < 0.25 and max(times) < 1.0


def test_index_search_of_10k_images_at_clip_size_is_fast():
    """The index part at ViT-B/32's 512-d embeddings (the text encoder's share depends on the model)."""
    rng = np.random.default_rng(1)
    embeds = rng.normal(size=(10_000, 512)).astype(np.float32)
    embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
    index = EmbeddingIndex(embeds, [""] * 10_000, [""] * 10_000, "x")
    query = embeds[:1] + 0.01
    index.search(query, 10)
    start = time.perf_counter()
    for _ in range(20):
        top = index.search(query, 10)[0]
    per_query = (time.perf_counter() - start) / 20
    print(f"\nindex search, 10k x 512: {1e3 * per_query:.2f} ms per query")
    assert top[0][0] == 0 and per_query < 0.1


# -- the page, with Streamlit's AppTest ----------------------------------------------------------------------
@pytest.fixture
def app(workspace, monkeypatch):
    """An AppTest of the page, given --model and --index as `streamlit run app.py -- ...` would."""
    from streamlit.testing.v1 import AppTest

    def start(index: Path | None = None) -> AppTest:
        model, index_path, _ = workspace
        monkeypatch.setattr(sys, "argv", [str(launch.APP_FILE), "--model", str(model),
                                          "--index", str(index or index_path)])
        at = AppTest.from_file(str(launch.APP_FILE), default_timeout=120)
        return at.run()

    return start


def _captions(at) -> list[str]:
    return [caption for image in at.image for caption in image.captions]


def test_page_shows_top_k_images_with_captions_and_scores(app):
    at = app()
    assert not at.exception and not at.error
    assert at.text_input(key="query").value == handlers.EXAMPLE_QUERIES[0]
    assert at.slider(key="k").value == 10
    captions = _captions(at)
    assert len(captions) == 10
    assert captions[0].startswith("#1 · ") and captions[9].startswith("#10 · ")
    scores = [float(c.split(" · ")[1]) for c in captions]
    assert scores == sorted(scores, reverse=True)
    assert all(len(c.split(" · ")) == 3 for c in captions)  # rank, score, caption
    assert f'Top 10 of {N_IMAGES} images for "{handlers.EXAMPLE_QUERIES[0]}"' in at.caption[0].value


def test_page_k_query_and_example_change_the_results(app):
    at = app()
    at.slider(key="k").set_value(3).run()
    assert len(_captions(at)) == 3
    at.text_input(key="query").input("Ultrasound of the pelvis showing a cyst.").run()
    assert len(_captions(at)) == 3 and 'for "Ultrasound of the pelvis showing a cyst."' in at.caption[0].value
    at.selectbox(key="example").select(handlers.EXAMPLE_QUERIES[3]).run()
    assert at.text_input(key="query").value == handlers.EXAMPLE_QUERIES[3]
    assert f'for "{handlers.EXAMPLE_QUERIES[3]}"' in at.caption[0].value


def test_page_empty_query_shows_a_message(app):
    at = app()
    at.text_input(key="query").input("   ").run()
    assert not at.exception and not at.image
    assert "Empty query" in at.warning[0].value


def test_page_missing_index_shows_a_message_and_uploads_still_work(app, workspace, tmp_path):
    at = app(index=tmp_path / "nowhere.npz")
    assert not at.exception and not at.image
    assert "No embedding index at" in at.error[0].value and "medclip embed" in at.error[0].value
    image = sorted(workspace[2].iterdir())[0]
    at.file_uploader(key="upload").set_value((image.name, image.read_bytes(), "image/png")).run()
    assert len(at.error) == 1 and len(at.dataframe) == 2


def test_page_image_files_gone_since_indexing_show_a_message(app, workspace, embedder, tmp_path):
    index = handlers.load_index(str(workspace[1]), embedder)
    index.paths = [str(tmp_path / "moved" / Path(p).name) for p in index.paths]
    at = app(index=index.save(tmp_path / "moved.npz"))
    assert not at.exception and not at.image and len(at.warning) == 10
    assert "Image file not found: `" in at.warning[0].value and "moved" in at.warning[0].value


def test_page_upload_that_is_not_an_image_shows_a_message(app):
    at = app()
    at.file_uploader(key="upload").set_value(("report.pdf", b"%PDF-1.4 not an image", "application/pdf")).run()
    assert not at.exception
    assert "`report.pdf` is not an image we can use" in at.error[0].value
    assert not at.dataframe


def test_page_upload_ranks_captions_and_zero_shot_labels(app, workspace):
    at = app()
    assert "Upload an image" in at.info[0].value
    image = sorted(workspace[2].iterdir())[1]
    at.file_uploader(key="upload").set_value((image.name, image.read_bytes(), "image/png")).run()
    assert not at.exception and not at.error
    captions, labels = (table.value for table in at.dataframe)
    assert sorted(captions["caption"]) == sorted(handlers.EXAMPLE_QUERIES)
    assert sorted(labels["label"]) == sorted(MODALITIES)
    assert list(captions["cosine"]) == sorted(captions["cosine"], reverse=True)
    assert labels["probability"].sum() == pytest.approx(1.0, abs=1e-5)
    similar = [c for c in _captions(at) if c.startswith("#")]  # the search tab's 10 and the upload's 10
    assert len(similar) == 20 and any("closest to" in c.value for c in at.caption)
    at.text_area(key="labels").input("CT\nMRI\n\n").run()
    assert sorted(at.dataframe[1].value["label"]) == ["CT", "MRI"]
    at.text_area(key="labels").input("CT").run()
    assert "at least two different labels" in at.error[0].value


def test_page_model_that_cannot_load_shows_a_message(workspace, monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(sys, "argv", ["app", "--model", str(tmp_path / "no_model"), "--index", str(workspace[1])])
    at = AppTest.from_file(str(launch.APP_FILE), default_timeout=60).run()
    assert not at.exception and "Cannot load the model" in at.error[0].value


# -- `medclip app` -------------------------------------------------------------------------------------------
def test_launch_without_demo_outputs_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["app"]) == 2
    assert "run `make demo` first or pass --model/--index" in capsys.readouterr().err
    (tmp_path / "outputs" / "demo").mkdir(parents=True)
    (tmp_path / "outputs" / "demo" / "config.json").write_text("{}")
    assert launch.main([]) == 2
    assert "outputs/demo/index.npz" in capsys.readouterr().err


def test_launch_command_runs_streamlit_on_the_page_with_absolute_paths(workspace, tmp_path, monkeypatch):
    model, index, _ = workspace
    monkeypatch.chdir(model.parent)
    args = launch.build_parser().parse_args(["--model", "model", "--index", "index.npz", "--port", "8765",
                                             "--headless"])
    command = launch.streamlit_command(args)
    assert command[1:5] == ["-m", "streamlit", "run", str(launch.APP_FILE)]
    assert command[command.index("--server.port") + 1] == "8765"
    assert command[command.index("--server.headless") + 1] == "true"
    assert command[command.index("--") + 1:] == ["--model", str(model), "--index", str(index)]
    hub_args = launch.build_parser().parse_args(["--model", "someone/medclip"])
    assert launch.streamlit_command(hub_args)[-3] == "someone/medclip"  # a Hub id is kept as it is


def test_uploaded_png_made_in_memory_is_accepted(embedder):
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 50), 128, np.uint8)).save(buffer, format="PNG")
    assert handlers.embed_upload(embedder, "grey.png", buffer.getvalue()).shape == (embedder.dim,)
