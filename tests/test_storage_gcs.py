"""Data, checkpoints and outputs in a bucket, against a real GCS JSON API (a local emulator, tests/gcs_emulator.py):
training from a bucket, killed and resumed from the bucket, ends with the parameters of an uninterrupted local run;
a model saved to and loaded from a bucket is the local model; `medclip evaluate / embed / search` on a ROCO folder
in a bucket give the local figures; bad buckets, objects and credentials fail in one line before training."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests import gcs_emulator, killable_run
from tests.gcs_emulator import listing

ROOT = Path(__file__).resolve().parents[1]
# 96 pairs / 32 = 3 steps an epoch, 2 epochs; a checkpoint every step, so a kill can land in a save.
TRAIN_ARGS = ["--max_seq_length", "24", "--do_train", "--do_eval", "--num_train_epochs", "2",
              "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "32", "--learning_rate", "1e-3",
              "--lr_schedule", "constant", "--save_steps", "1", "--logging_steps", "1", "--report_to", "tensorboard",
              "--seed", "3"]


@pytest.fixture(scope="module")
def bucket():
    with gcs_emulator.running_emulator() as url:
        yield url


def _upload(local: Path, url: str) -> str:
    from medclip import storage

    storage.upload_folder(local, url)
    return url


def _params(model) -> dict[str, np.ndarray]:
    from flax import nnx

    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model))}


def _run_script(args: list[str], capsys) -> tuple[int, str]:
    spec = importlib.util.spec_from_file_location("run_hybrid_clip", ROOT / "run_hybrid_clip.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main(args)
    return code, capsys.readouterr().err


@pytest.mark.heavy
def test_train_in_bucket_sigkill_resume_equals_local_run_and_loads_from_bucket(tmp_path, bucket):
    from medclip import FlaxHybridCLIP
    from medclip.data.synthetic import write_synthetic_dataset

    model = killable_run.tiny_model(tmp_path)
    data = tmp_path / "data"
    write_synthetic_dataset(data, 96, seed=0, image_size=32, name="train")
    write_synthetic_dataset(data, 32, seed=1, image_size=32, name="validation")
    remote_data = _upload(data, f"{bucket}/data")
    remote_model = _upload(model, f"{bucket}/models/rn")

    reference_dir, reference_log = tmp_path / "reference", tmp_path / "reference.log"
    reference_proc = killable_run.start(reference_dir, reference_log, [
        "--model_name_or_path", str(model), "--train_file", str(data / "train.jsonl"),
        "--validation_file", str(data / "validation.jsonl"), *TRAIN_ARGS])

    run, log = f"{bucket}/runs/interrupted", tmp_path / "interrupted.log"
    args = ["--model_name_or_path", remote_model, "--train_file", f"{remote_data}/train.jsonl",
            "--validation_file", f"{remote_data}/validation.jsonl", *TRAIN_ARGS]

    def saved_steps() -> list[int]:
        names = [p[len(f"{run}/checkpoints/"):].split("/") for p in listing(f"{run}/checkpoints")]
        return sorted({int(n[0]) for n in names if n[0].isdigit() and n[-1] == "commit_success.txt"})

    proc = killable_run.start(run, log, args)
    deadline = time.time() + 600
    while max(saved_steps(), default=0) < 3 and proc.poll() is None:
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(random.Random(0).uniform(0.0, 0.5))  # into step 4's save, or between saves
    assert proc.poll() is None, "the run ended before it could be killed:\n" + log.read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ROOT / "gs:").exists()  # nothing was written to a local folder named after the URL

    proc = killable_run.start(run, log, args)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert log.read_text().count("resumed from step") == 1
    assert reference_proc.wait(timeout=900) == 0, reference_log.read_text()[-3000:]

    objects = listing(run)
    for name in ("model.safetensors", "config.json", "README.md", "metrics.jsonl", "training_curves.png",
                 "data_report.json", "best/model.safetensors", "best/README.md"):
        assert f"{run}/{name}" in objects, name
    assert any("/tensorboard/" in p for p in objects)

    reference = load_file(str(reference_dir / "model.safetensors"))
    loaded = FlaxHybridCLIP.from_pretrained(run)  # (b): the exported model, read from the bucket
    local = FlaxHybridCLIP.from_pretrained(reference_dir)
    resumed, expected = _params(loaded), _params(local)
    assert resumed.keys() == expected.keys() and len(reference) > 0
    for key in expected:
        np.testing.assert_array_equal(resumed[key], expected[key], err_msg=key)

    # The metrics log was truncated at the restored step and continued: one row per step, as in the local run.
    from medclip import storage

    steps = [json.loads(line)["step"] for line in storage.read_bytes(f"{run}/metrics.jsonl").decode().splitlines()
             if "train_loss" in line]
    local_steps = [json.loads(line)["step"] for line in (reference_dir / "metrics.jsonl").read_text().splitlines()
                   if "train_loss" in line]
    assert steps == local_steps == list(range(1, 7))


def test_save_and_load_on_a_bucket_equal_the_local_model(tmp_path, bucket):
    from flax import nnx

    from medclip import FlaxHybridCLIP
    from medclip.checkpoints.openclip import config_from_open_clip

    hybrid = FlaxHybridCLIP.from_pretrained(killable_run.tiny_model(tmp_path))
    open_clip = FlaxHybridCLIP(config_from_open_clip({  # OpenCLIP's layout needs OpenCLIP's towers
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 99, "width": 32, "heads": 4, "layers": 1}}),
        rngs=nnx.Rngs(1))
    hybrid.save_pretrained(f"{bucket}/saved/hybrid")
    open_clip.save_open_clip(f"{bucket}/saved/open_clip")
    assert {p.rsplit("/", 1)[1] for p in listing(f"{bucket}/saved/open_clip")} == {
        "open_clip_config.json", "open_clip_model.safetensors"}
    for url, local in ((f"{bucket}/saved/hybrid", hybrid), (f"{bucket}/saved/open_clip", open_clip)):
        remote, expected = _params(FlaxHybridCLIP.from_pretrained(url)), _params(local)
        assert remote.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(remote[key], expected[key], err_msg=f"{url}: {key}")


def _write_roco(root: Path, n: int = 24) -> Path:
    """ROCO's raw layout (data/test/radiology/{captions,keywords}.txt, images/ROCO_ID.jpg) from synthetic pairs."""
    from medclip.data.synthetic import write_synthetic_dataset

    source = write_synthetic_dataset(root / "source", n, seed=4, image_size=32, image_format="jpeg", name="test")
    folder = root / "roco" / "data" / "test" / "radiology"
    (folder / "images").mkdir(parents=True)
    captions, keywords = [], []
    for i, line in enumerate(source.read_text().splitlines()):
        record = json.loads(line)
        roco_id = f"ROCO_{i:05d}"
        (folder / "images" / f"{roco_id}.jpg").write_bytes((source.parent / record["image_path"]).read_bytes())
        captions.append(f"{roco_id}\t {record['captions'][0]}")
        keywords.append(f"{roco_id}\t\t" + "\t".join(record["keywords"]))
    (folder / "captions.txt").write_text("\n".join(captions) + "\n")
    (folder / "keywords.txt").write_text("\n".join(keywords) + "\n")
    return root / "roco"


def test_evaluate_embed_search_on_a_bucket_give_the_local_figures(tmp_path, bucket, capsys):
    from medclip import cli, storage

    model = killable_run.tiny_model(tmp_path)
    roco = _write_roco(tmp_path)
    remote_model, remote_roco = _upload(model, f"{bucket}/eval/rn"), _upload(roco, f"{bucket}/eval/roco")

    assert cli.main(["evaluate", str(model), str(roco), "--out", str(tmp_path / "local.json")]) == 0
    assert cli.main(["evaluate", remote_model, remote_roco, "--out", f"{bucket}/eval/results.json"]) == 0
    local = json.loads((tmp_path / "local.json").read_text())
    remote = json.loads(storage.read_bytes(f"{bucket}/eval/results.json"))
    assert local["n_pairs"] == 24 and local["dropped"]["dropped"] == 0
    assert remote == local

    assert cli.main(["embed", remote_model, "--data", remote_roco, "--split", "test",
                     "--out", f"{bucket}/eval/index.npz"]) == 0
    assert cli.main(["embed", str(model), "--data", str(roco), "--split", "test",
                     "--out", str(tmp_path / "index.npz")]) == 0
    capsys.readouterr()
    query = "Axial CT of the chest showing a mass"
    assert cli.main(["search", query, "--index", f"{bucket}/eval/index.npz", "-k", "3"]) == 0
    remote_hits = capsys.readouterr().out.split("\n")
    assert cli.main(["search", query, "--index", str(tmp_path / "index.npz"), "-k", "3"]) == 0
    local_hits = capsys.readouterr().out.split("\n")
    assert len([h for h in remote_hits if h.strip()]) == 3
    # The same images in the same order with the same scores; the paths differ only by where the folder is.
    assert [h.replace(remote_roco, "ROOT") for h in remote_hits] == [h.replace(str(roco), "ROOT") for h in local_hits]


@pytest.mark.parametrize("case", ["no bucket", "no object", "no output bucket"])
def test_bad_bucket_or_object_is_one_line_before_training(tmp_path, bucket, capsys, case, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train, output = f"{bucket}/nothing/train.jsonl", f"{bucket}/runs/bad"
    if case == "no bucket":
        train = "gs://medclip-no-such-bucket/train.jsonl"
    elif case == "no output bucket":
        data = tmp_path / "data"
        data.mkdir()
        (data / "train.jsonl").write_text("")
        train, output = str(data / "train.jsonl"), "gs://medclip-no-such-bucket/run"
    code, err = _run_script(["--output_dir", output, "--train_file", train, "--model_preset", "demo",
                             "--do_train"], capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert (train if case != "no output bucket" else output) in lines[0]
    assert ("does not exist" if case != "no object" else "no such object") in lines[0]
    assert not list(tmp_path.glob("gs*")) and not listing(f"{bucket}/runs/bad")  # nothing created anywhere


def test_no_credentials_for_real_gcs_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    data = tmp_path / "train.jsonl"
    data.write_text("")
    code, err = _run_script(["--output_dir", "gs://medclip-private/run", "--train_file", str(data),
                             "--model_preset", "demo", "--do_train"], capsys)
    assert code == 2, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert "gs://medclip-private/run" in err and "no Google Cloud credentials" in err
    assert not list(tmp_path.glob("gs*"))


@pytest.mark.parametrize("args, expected", [
    (("gs://bucket/roco",), "--data_dir gs://bucket/roco"),
    (("gs://bucket/train.jsonl", "s3://bucket/valid.csv"),
     "--train_file gs://bucket/train.jsonl --validation_file s3://bucket/valid.csv"),
    (("gs://bucket/train.jsonl",), None),  # one file and no validation file: the usage error, as for local files
])
def test_run_medclip_sh_lets_bucket_urls_through(args, expected):
    """PYTHON=echo prints the run_hybrid_clip.py command line the script would run (under sh, as users call it)."""
    proc = subprocess.run(["sh", "run_medclip.sh", *args, "--max_steps", "1"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHON": "echo"}, timeout=60)
    if expected is None:
        assert proc.returncode == 2 and proc.stderr.startswith("usage: run_medclip.sh"), proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(f"{expected} --max_steps 1"), proc.stdout


@pytest.mark.parametrize("what", ["data", "model"])
def test_evaluate_with_a_missing_bucket_is_one_line(tmp_path, bucket, capsys, what):
    from medclip import cli

    model, data = str(killable_run.tiny_model(tmp_path)), str(_write_roco(tmp_path, n=4))
    missing = "gs://medclip-no-such-bucket/thing"
    argv = ["evaluate", missing if what == "model" else model, missing if what == "data" else data]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and missing in err and "does not exist" in err, err


def test_an_unsupported_scheme_is_a_storage_error_and_a_counted_missing_image():
    from medclip import storage
    from medclip.data.image_checks import image_problem

    with pytest.raises(storage.StorageError, match=r"^--train_file http://host/train.jsonl: unsupported scheme http://"):
        storage.check_readable("http://host/train.jsonl", "--train_file")
    assert image_problem("ftp://host/a.jpg")[0] == "missing_file"  # an image path: counted, not raised
    assert storage.as_path("relative/dir") == Path("relative/dir")  # local paths stay pathlib


def test_sharded_records_in_a_bucket_are_the_local_shards_and_resume_exactly(tmp_path, bucket):
    """(d): `medclip prepare --format shards` writes to the bucket; read back they are the source's examples,
    each host streams the local shards' order (every example once an epoch), from any position the rest; and the
    trainer's data feed on `--data_dir gs://...` restores a saved position to the uninterrupted batches."""
    from tests import test_shards

    source = test_shards.write_source(tmp_path / "source")
    remote, local = f"{bucket}/shards", tmp_path / "shards"
    test_shards.prepare_shards(source, remote)
    test_shards.prepare_shards(source, local)
    assert {p.rsplit("/", 1)[1] for p in listing(remote)} == {p.name for p in local.iterdir()}
    test_shards.check_same_examples(source, remote)
    streamed = test_shards.check_stream(remote, hosts=2, positions=(0, 9, 16))
    assert streamed == test_shards.check_stream(local, hosts=2, positions=(0,))
    assert len({record_id for host in streamed for record_id in host[:14]}) == 28  # one epoch: disjoint hosts
    test_shards.check_feed_resume(remote, tmp_path / "feed")


def test_a_corrupt_shard_in_a_bucket_fails_in_one_line(tmp_path, bucket, capsys):
    """`medclip prepare` into a bucket records the CRC32C the bucket lists for each object; a shard rewritten with
    its size but other bytes fails at start-up from the listing alone, and `verify-shards` names its record. With
    a manifest from before the CRC32C was recorded it gets past start-up; streaming it from the bucket then stops
    with the record named."""
    from medclip import cli, storage
    from medclip.data.shard_manifest import ShardError, list_files, open_split
    from tests import test_shard_integrity as integrity
    from tests import test_shards

    remote = f"{bucket}/shards-corrupt"
    test_shards.prepare_shards(test_shards.write_source(tmp_path / "source"), remote)
    manifest = json.loads(storage.read_bytes(f"{remote}/manifest.json"))
    entries = manifest["splits"]["train"]["shards"]
    listed = list_files(remote)
    assert [listed[entry["name"]][1] for entry in entries] == [entry["crc32c"] for entry in entries]
    shard = f"{remote}/{entries[2]['name']}"
    local = tmp_path / "shard.tfrecord"
    local.write_bytes(storage.read_bytes(shard))
    row = integrity.flip_byte(local)
    storage.write_bytes(shard, local.read_bytes())
    with pytest.raises(ShardError, match="in the bucket, the manifest says") as caught:
        open_split(remote, "train")
    assert "\n" not in str(caught.value) and str(caught.value).startswith(f"{shard}: CRC32C")
    assert cli.main(["verify-shards", remote, "--no_progress"]) == 1
    assert f"BAD {shard}: record {row}: the data's CRC does not match" in capsys.readouterr().out

    for entry in entries:
        del entry["crc32c"]
    storage.write_text(f"{remote}/manifest.json", json.dumps(manifest))
    _, _, error = integrity.stream_until_error(integrity.make_iterator(remote, tmp_path / "tokenizer"))
    assert str(error).startswith(f"{shard}: record {row} is corrupt") and f"verify-shards {remote}`" in str(error)
