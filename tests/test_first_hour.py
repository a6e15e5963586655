"""A new user's first hour (issue 25): each mistake is one line on stderr with the right exit code, through the real
entry points. Subprocesses are kept few: each costs an interpreter with JAX imported."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import typing
import urllib.request
from pathlib import Path

import pytest

from medclip.cli import build_parser, main as cli_main
from medclip.training import arguments, recipes

ROOT = Path(__file__).resolve().parents[1]
NO_HUB = "http://127.0.0.1:9"  # nothing listens there: a connection is refused at once, as with no network
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _run(args: list[str], tmp_path: Path, env: dict | None = None, timeout: float = 300,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    full_env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=NO_HUB, **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd or tmp_path, env=full_env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _one_line_error(done: subprocess.CompletedProcess, code: int) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


# -- 1. a mistyped path or an offline machine --------------------------------------------------------------------
def test_unreachable_hub_id_is_one_line_naming_the_id_cache_and_variables(tmp_path):
    done = _run(["-m", "medclip.cli", "evaluate", "outputs/nodemo", str(tmp_path / "data")], tmp_path)
    line = _one_line_error(done, 2)
    assert "'outputs/nodemo'" in line and str(tmp_path / "hf" / "hub") in line
    assert "HF_HUB_OFFLINE" in line and "HF_HOME" in line and "Retry" not in done.stderr


def test_the_hub_is_asked_once_then_only_the_cache(tmp_path, monkeypatch):
    """huggingface_hub retries a refused connection five times with back-off: one request, then the cache."""
    import httpx2
    import huggingface_hub

    from medclip.checkpoints import hub

    calls = {"info": 0, "snapshot": []}

    def refused(self, *args, **kwargs):
        calls["info"] += 1
        raise httpx2.ConnectError("[Errno 111] Connection refused")

    def snapshot(*args, **kwargs):
        calls["snapshot"].append(kwargs)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", refused)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(hub.ModelNotFoundError, match="could not be reached .ConnectError"):
        hub.resolve_model_dir("someone/model")
    assert calls["info"] == 1 and [c.get("local_files_only") for c in calls["snapshot"]] == [True]


def test_a_path_whose_first_part_exists_is_a_local_error(tmp_path, monkeypatch):
    from medclip.checkpoints import hub

    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "_repo_files", lambda *a, **k: pytest.fail("the Hub must not be asked"))
    for name in ("outputs/nodemo", "runs\\model", "a/b/c", "./model"):
        with pytest.raises(hub.ModelNotFoundError, match="does not exist"):
            hub.resolve_model_dir(name)


def _hub_cache_file(hf_home: Path, repo_folder: str, filename: str, content: bytes) -> Path:
    """huggingface_hub's layout: blobs/<etag>, snapshots/<commit>/<file> -> ../../blobs/<etag>, refs/main."""
    repo = hf_home / "hub" / repo_folder
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    etag = "a" * 40
    (repo / "blobs" / etag).write_bytes(content)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "snapshots" / COMMIT / filename).symlink_to(Path("..", "..", "blobs", etag))
    return repo / "snapshots" / COMMIT / filename


def test_pmc_clip_beta_resolves_through_the_hub_cache_in_every_tool(tmp_path):
    """PMC-CLIP's `--resume "PMC_CLIP:beta"`: checkpoint.pt of the axiong/pmc_oa_beta dataset repo, from the cache
    (HF_HOME), without network. The file here is not a checkpoint: the loader's error shows the name resolved."""
    snapshot_file = _hub_cache_file(tmp_path / "hf", "datasets--axiong--pmc_oa_beta", "checkpoint.pt", b"garbage")
    code = ("from medclip.checkpoints.hub import resolve_model_name; from medclip.training.arguments import "
            "FlagParser; print(resolve_model_name('PMC_CLIP:beta')); "
            "print(FlagParser().parse_flags(['--output_dir', 'o', '--model_name_or_path', 'PMC_CLIP:beta'])[0]"
            ".model_name_or_path)")
    done = _run(["-c", code], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(snapshot_file), "PMC_CLIP:beta"]
    done = _run(["-m", "medclip.cli", "zeroshot", "PMC_CLIP:beta", "x.png", "--labels", "a", "b"], tmp_path,
                env={"HF_HUB_OFFLINE": "1"})
    assert _one_line_error(done, 2).startswith(f"medclip zeroshot: error: {snapshot_file}: neither a torch")


def test_pmc_clip_beta_not_cached_says_how_to_download_it(tmp_path, monkeypatch):
    import huggingface_hub

    from medclip.checkpoints import hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.ModelNotFoundError, match=f"cache {tmp_path}.*hf download axiong/pmc_oa_beta "
                                                     "checkpoint.pt --repo-type dataset"):
        hub.resolve_model_name("PMC_CLIP:beta")


# -- 2. --help of every entry point ------------------------------------------------------------------------------
def test_help_of_every_entry_point_exits_0(tmp_path, capsys):
    done = _run([str(ROOT / "run_hybrid_clip.py"), "--help"], tmp_path)
    assert done.returncode == 0 and "--mlm_probability" in done.stdout, done.stderr[-2000:]
    done = _run(["-m", "medclip.cli", "--help"], tmp_path)
    assert done.returncode == 0 and "zeroshot" in done.stdout, done.stderr[-2000:]
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in commands:
        with pytest.raises(SystemExit) as exit_:
            cli_main([command, "--help"])
        assert exit_.value.code in (0, None), command
        assert "usage: medclip" in capsys.readouterr().out


# -- 3. misspelled flags -----------------------------------------------------------------------------------------
def test_misspelled_training_flag_is_one_line_with_the_closest_flag(tmp_path):
    done = _run([str(ROOT / "run_hybrid_clip.py"), "--output_dir", "o", "--learnig_rate", "1e-3"], tmp_path)
    assert _one_line_error(done, 2) == ("run_hybrid_clip.py: error: unknown flag --learnig_rate; did you mean "
                                        "--learning_rate?")


def test_flags_are_never_abbreviated_and_both_spellings_work(capsys):
    parser = arguments.FlagParser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_flags(["--output_dir", "o", "--learning_rat", "1e-3"])
    assert exit_.value.code == 2 and "did you mean --learning_rate?" in capsys.readouterr().err
    _, _, train = parser.parse_flags(["--output-dir", "o", "--learning-rate", "0.001"])
    assert train.learning_rate == 0.001 and train.output_dir == "o"
    for argv in (["evaluate", "m", "d", "--max_sam", "3"], ["evaluate", "m", "d", "--max-samples", "0"]):
        with pytest.raises(SystemExit) as exit_:
            cli_main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1, err
    assert "did you mean --max_samples?" in err[0] or "must be >= 1" in err[0]
    assert build_parser().parse_args(["evaluate", "m", "d", "--max-samples", "3"]).max_samples == 3


def test_json_config_with_an_unknown_key_names_the_closest(tmp_path):
    parser = arguments.FlagParser()
    with pytest.raises(arguments.FlagError, match="'learnig_rate' .did you mean 'learning_rate'"):
        parser.parse_json_flags({"output_dir": "o", "learnig_rate": 1e-3})


# -- 5. ranges ---------------------------------------------------------------------------------------------------
def test_a_bad_value_is_refused_up_front_naming_the_flag(tmp_path):
    done = _run([str(ROOT / "run_hybrid_clip.py"), "--output_dir", "o", "--do_train", "--model_preset", "demo",
                 "--synthetic_train_samples", "8", "--per_device_train_batch_size", "-1"], tmp_path)
    assert _one_line_error(done, 2) == ("run_hybrid_clip.py: configuration error: --per_device_train_batch_size -1: "
                                        "must be >= 1")


def test_every_numeric_flag_has_a_range_and_the_defaults_are_inside():
    numeric = {name for cls in arguments.FLAG_CLASSES for name, hint in typing.get_type_hints(cls).items()
               if {int, float} & {hint, *typing.get_args(hint)}}
    assert numeric == set(arguments.FLAG_RANGES)
    arguments.check_ranges(arguments.ModelArguments(), arguments.DataArguments(),
                           arguments.TrainingArguments(output_dir="o"))
    for flag, value, message in (("adam_beta2", 1.0, r"must be in \[0, 1\)"), ("learning_rate", float("nan"),
                                 "finite"), ("num_train_epochs", 0.0, "must be > 0")):
        with pytest.raises(arguments.FlagError, match=f"--{flag} .*{message}"):
            arguments.check_ranges(arguments.TrainingArguments(output_dir="o", **{flag: value}))


# -- 4. the app: no prompt however started, and it ends with its parent -----------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serves(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_app_started_without_a_terminal_serves_and_ends_with_its_parent(tmp_path):
    pytest.importorskip("streamlit")
    port = _free_port()
    (tmp_path / "home").mkdir()  # no ~/.streamlit/credentials.toml: Streamlit's first run, where it prompted
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path / "home")}
    parent = subprocess.Popen([sys.executable, "-m", "medclip.cli", "app", "--model", str(tmp_path / "m"),
                               "--index", str(tmp_path / "i.npz"), "--port", str(port), "--address", "127.0.0.1"],
                              cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not _serves(port) and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert parent.poll() is None and _serves(port), "the app did not serve"
        parent.send_signal(signal.SIGTERM)  # `kill PID` of `medclip app`
        parent.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _serves(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _serves(port)
        with socket.socket() as s:  # nothing listens any more: the port can be bound again
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        output = parent.stdout.read().decode()
        assert "Email" not in output and f"http://127.0.0.1:{port}" in output
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait(timeout=30)


# -- 6. silent failures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from flax import nnx

    from medclip import FlaxHybridCLIP
    from medclip.data.synthetic import write_synthetic_tokenizer
    from medclip.training.model_setup import demo_config

    root = tmp_path_factory.mktemp("first_hour")
    tokenizer = write_synthetic_tokenizer(root / "tok")
    FlaxHybridCLIP(demo_config(len(tokenizer), 32, 24), rngs=nnx.Rngs(0)).save_pretrained(root / "model",
                                                                                         tokenizer=tokenizer)
    return root / "model"


def test_a_folder_of_unreadable_images_is_an_error_not_an_empty_index(tiny_model, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "scan.jpg").write_bytes(b"not an image")
    done = _run(["-m", "medclip.cli", "embed", str(tiny_model), "--images", str(tmp_path / "images"), "--out",
                 str(tmp_path / "index.npz")], tmp_path)
    line = _one_line_error(done, 1)
    assert line.startswith("medclip embed: error: none of the 1 images could be read") and "skipped 1" in line
    assert not (tmp_path / "index.npz").exists()


def test_embed_names_the_lines_it_dropped_and_search_refuses_bad_indexes(tiny_model, tmp_path, capsys):
    from PIL import Image

    from medclip.inference.index import EmbeddingIndex

    Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / "a.png")
    lines = [json.dumps({"id": "a", "image_path": "a.png", "captions": ["Axial CT of the chest showing a mass."]}),
             "{broken"]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    assert cli_main(["embed", str(tiny_model), "--data", str(tmp_path / "data.jsonl"), "--out",
                     str(tmp_path / "index.npz")]) == 0
    out = capsys.readouterr().out
    assert "indexed 1 images" in out and "dropped while loading" in out and ": 1 {" in out
    assert cli_main(["search", "chest", "--index", str(tmp_path / "data.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == (f"medclip search: error: {tmp_path / 'data.jsonl'} is not a medclip "
                                               "embedding index (an .npz file from `medclip embed`)")
    index = EmbeddingIndex.load(tmp_path / "index.npz")
    dataclasses.replace(index, embeddings=index.embeddings[:0], paths=[], captions=[]).save(tmp_path / "empty.npz")
    assert cli_main(["search", "chest", "--index", str(tmp_path / "empty.npz")]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert cli_main(["search", "  ", "--index", str(tmp_path / "index.npz")]) == 2
    assert capsys.readouterr().err.startswith("medclip search: error: empty query")


# -- 7. a model on the command line replaces the recipe's ----------------------------------------------------------
def test_a_preset_or_model_replaces_every_model_flag_of_the_recipe(caplog):
    sys.path.insert(0, str(ROOT))
    try:
        import run_hybrid_clip
    finally:
        sys.path.remove(str(ROOT))
    with caplog.at_level(logging.INFO, logger="medclip.training.recipes"):
        model, _, _ = run_hybrid_clip.parse(["--recipe", "medclip", "--output_dir", "o", "--model_preset", "demo"])
    assert model.model_preset == "demo"
    assert (model.tokenizer_name, model.text_model_name_or_path, model.vision_model_name_or_path) == (None,) * 3
    assert "--tokenizer_name allenai/scibert_scivocab_uncased" in caplog.text
    model, _, _ = run_hybrid_clip.parse(["--recipe", "pmc-clip", "--output_dir", "o", "--model_name_or_path",
                                         "PMC_CLIP:beta"])
    assert (model.vision_head, model.text_pooler) == ("linear", "default")  # the recipe's tower choices are gone
    recipe = recipes.load("medclip")
    assert recipes.replaced_model_flags(recipe, ["--text-model-name-or-path", "bert"]) == [
        "text_model_name_or_path", "tokenizer_name"]  # the vision tower stays the recipe's
    assert recipes.replaced_model_flags(recipe, ["--learning_rate", "1"]) == []


# -- 8. scores that say what they are ----------------------------------------------------------------------------
def test_zeroshot_prints_cosine_beside_the_softmax_and_its_help_says_what_they_are(tiny_model, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / "a.png")
    assert cli_main(["zeroshot", str(tiny_model), str(tmp_path / "a.png"), "--labels", "CT", "MRI"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.strip().splitlines()]
    assert [r[0] for r in rows] == ["1", "2"] and all(r[1].startswith("p=") and r[2].startswith("cos=") for r in rows)
    assert abs(sum(float(r[1][2:]) for r in rows) - 1) < 1e-3 and all(-1 <= float(r[2][4:]) <= 1 for r in rows)
    for command in ("zeroshot", "rank"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        assert "sums to 1 whatever the image" in " ".join(capsys.readouterr().out.split())


# -- 10. noise ---------------------------------------------------------------------------------------------------
def test_the_data_report_is_logged_once_unless_its_counts_change(tmp_path, caplog):
    from medclip.data.records import DropCounter
    from medclip.training.data_feed import DataFeed, write_data_report

    counter = DropCounter()
    feed = DataFeed(train=None, eval=None, eval_captions=[], counters={"train": (3, counter)},
                    global_train_batch_size=1, global_eval_batch_size=1)
    with caplog.at_level(logging.INFO, logger="medclip.training.data_feed"):
        write_data_report(feed, tmp_path)
        write_data_report(feed, tmp_path)
        assert caplog.text.count("data: ") == 1
        counter.drop("not_an_image", "x.jpg")
        write_data_report(feed, tmp_path)
    assert caplog.text.count("data: ") == 2


def test_prepare_takes_both_spellings(tmp_path, capsys):
    for flags in (["--roco_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--min_caption_length", "5"],
                  ["--roco-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--min-caption-length", "5"]):
        assert cli_main(["prepare", *flags]) == 1  # parsed; the folder holds no ROCO split
        assert "no ROCO split" in capsys.readouterr().err


def test_the_suggestion_is_the_documented_spelling_whatever_the_typo():
    from medclip.flag_parsing import closest_flag

    both = ["--learning_rate", "--learning-rate", "--max_steps", "--max-steps"]
    assert closest_flag("--learnig-rate", both) == closest_flag("--learnig_rate", both) == "--learning_rate"
    assert closest_flag("--learnig_rate", ["--learning-rate"]) == "--learning-rate"  # a dashed-only parser
    assert closest_flag("--zzz", both) is None


def test_a_hub_name_is_asked_of_the_hub_once_per_process(tmp_path, monkeypatch):
    """The up-front name check, the model and its tokenizer each resolve the same name: one request, not three."""
    import types

    import huggingface_hub

    from medclip.checkpoints import hub

    calls = {"info": 0, "download": 0}

    def info(self, *args, **kwargs):
        calls["info"] += 1
        return types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=n)
                                               for n in ("config.json", "model.safetensors")])

    def snapshot(*args, **kwargs):
        calls["download"] += 1
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub.check_model_names("someorg/asked-once")
    assert hub.resolve_model_dir("someorg/asked-once") == tmp_path
    assert hub.resolve_model_dir("hf-hub:someorg/asked-once") == tmp_path
    assert calls == {"info": 1, "download": 1}
    hub.resolve_model_dir("someorg/asked-once", revision="v2")
    assert calls == {"info": 2, "download": 2}
