"""The `medclip` command's tools on a small model and synthetic images, including their error messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from medclip import FlaxHybridCLIP
from medclip.cli import main
from medclip.data.synthetic import write_synthetic_dataset, write_synthetic_tokenizer
from medclip.training.model_setup import demo_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = write_synthetic_tokenizer(root / "tok")
    for name, seed in (("model", 0), ("other_model", 1)):
        model = FlaxHybridCLIP(demo_config(len(tokenizer), 32, 24), rngs=nnx.Rngs(seed))
        model.save_pretrained(root / name, tokenizer=tokenizer)
    jsonl = write_synthetic_dataset(root / "data", 24, seed=5, image_size=32)
    return root, jsonl


def test_embed_then_search(workspace, capsys):
    root, jsonl = workspace
    assert main(["embed", str(root / "model"), "--images", str(root / "data" / "images"),
                 "--out", str(root / "index.npz")]) == 0
    assert "indexed 24 images" in capsys.readouterr().out
    assert main(["search", "CT of the chest showing a mass", "--index", str(root / "index.npz"), "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    scores = [float(line.split()[1]) for line in lines]
    assert scores == sorted(scores, reverse=True)


def test_embed_a_dataset_keeps_captions_and_counts_skips(workspace, capsys):
    root, jsonl = workspace
    (root / "data" / "images" / "broken.png").write_bytes(b"not a png at all")
    try:
        assert main(["embed", str(root / "model"), "--images", str(root / "data" / "images"),
                     "--out", str(root / "index2.npz")]) == 0
        out = capsys.readouterr().out
        assert "indexed 24 images" in out and '"not_an_image": 1' in out
    finally:
        (root / "data" / "images" / "broken.png").unlink()
    assert main(["embed", str(root / "model"), "--data", str(jsonl), "--out", str(root / "index3.npz")]) == 0
    from medclip.inference.index import EmbeddingIndex

    index = EmbeddingIndex.load(root / "index3.npz")
    assert len(index) == 24 and all(index.captions)
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, rtol=1e-5)


def test_image_search_returns_similar_images(workspace, capsys):
    root, _ = workspace
    from medclip.inference.embedder import Embedder
    from medclip.inference.index import EmbeddingIndex

    main(["embed", str(root / "model"), "--images", str(root / "data" / "images"), "--out", str(root / "im.npz")])
    capsys.readouterr()
    index = EmbeddingIndex.load(root / "im.npz")
    query = index.paths[3]
    assert main(["search", "--image", query, "--index", str(root / "im.npz"), "-k", "4"]) == 0
    found = [line.split()[2] for line in capsys.readouterr().out.strip().splitlines()]
    # Brute force: cosine to every other indexed image, best first; the query's own file is left out.
    scores = index.embeddings @ Embedder(root / "model").embed_images([query])[0]
    scores[3] = -np.inf
    assert found == [index.paths[i] for i in np.argsort(-scores, kind="stable")[:4]]
    assert main(["search", "a mass", "--image", query, "--index", str(root / "im.npz")]) == 2
    assert "not both" in capsys.readouterr().err


def test_search_refuses_an_index_from_another_model(workspace, capsys):
    root, _ = workspace
    main(["embed", str(root / "model"), "--images", str(root / "data" / "images"), "--out", str(root / "i.npz")])
    capsys.readouterr()
    assert main(["search", "a chest x-ray", "--index", str(root / "i.npz"), "--model", str(root / "other_model")]) == 2
    assert "built by another model" in capsys.readouterr().err


def test_search_errors_are_clear(workspace, capsys):
    root, _ = workspace
    assert main(["search", "   ", "--index", str(root / "index.npz")]) == 2
    assert "error: empty query" in capsys.readouterr().err
    assert main(["search", "mass", "--index", str(root / "missing.npz")]) == 2
    assert "no embedding index" in capsys.readouterr().err


def test_rank_and_zeroshot(workspace, capsys):
    root, _ = workspace
    image = sorted((root / "data" / "images").iterdir())[0]
    captions = ["CT of the head.", "Ultrasound of the pelvis showing a cyst.", "Chest X-ray with an effusion."]
    assert main(["rank", str(root / "model"), str(image), *captions]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    parsed = [re.match(r"\s*(\d+)\s+p=(\S+)\s+cos=(\S+)\s+(.*)$", line).groups() for line in lines]
    assert sorted(p[3] for p in parsed) == sorted(captions)
    assert abs(sum(float(p[1]) for p in parsed) - 1.0) < 1e-3
    assert [float(p[1]) for p in parsed] == sorted((float(p[1]) for p in parsed), reverse=True)
    assert main(["zeroshot", str(root / "model"), str(image), "--labels", "CT", "MRI", "ultrasound"]) == 0
    probs = [float(line.split()[1].removeprefix("p=")) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(probs) == 3 and abs(sum(probs) - 1) < 1e-3


def test_unreadable_image_is_a_clear_error(workspace, tmp_path, capsys):
    root, _ = workspace
    bad = tmp_path / "scan.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert main(["rank", str(root / "model"), str(bad), "a caption here", "another caption"]) == 2
    err = capsys.readouterr().err
    assert "scan.jpg" in err and "cannot use this image" in err


def test_evaluate_writes_a_table_and_json(workspace, tmp_path, capsys):
    root, jsonl = workspace
    out = tmp_path / "results.json"
    assert main(["evaluate", str(root / "model"), str(jsonl), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "R@1" in printed and "zero-shot over keywords" in printed
    results = json.loads(out.read_text())
    assert results["n_pairs"] == 24
    assert 0 <= results["retrieval_full"]["t2i_R@10"] <= 1
    assert "2" in results["zeroshot_keywords"]
    assert 0 <= results["retrieval_full"]["i2t_mrr@10"] <= results["retrieval_full"]["i2t_mrr"]


def test_evaluate_protocol_prints_the_reports_table(workspace, tmp_path, capsys):
    root, jsonl = workspace
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    cuis = {"CT": "C0040405", "X-ray": "C1306645", "ultrasound": "C0041618", "MRI": "C0024485"}
    data = jsonl.parent / "with_cuis.jsonl"
    data.write_text("".join(json.dumps({**line, "concepts": [cuis[k] for k in line["keywords"] if k in cuis]})
                            + "\n" for line in lines))
    names = tmp_path / "names.csv"
    names.write_text("CUI,name\nC0040405,computed tomography\nC1306645,plain x-ray\nC0041618,ultrasound\n")
    out = tmp_path / "results.json"
    assert main(["evaluate", str(root / "model"), str(data), "--protocol", "clip-tf-report", "--concept_names",
                 str(names), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CLIP-TF report, Table 2 protocol; prompt 'A photo of a {}.'" in printed
    results = json.loads(out.read_text())
    for named in results["classes"]:  # the largest task's classes, by name where the file has one (MRI not)
        assert named["name"] == {"C0024485": "C0024485", "C0040405": "computed tomography",
                                 "C1306645": "plain x-ray", "C0041618": "ultrasound"}[named["cui"]]
        assert (f"{named['name']} ({named['cui']})" if named["name"] != named["cui"] else named["cui"]) in printed
    assert "our reading" in printed
    distinct = len({c for line in data.read_text().splitlines() for c in json.loads(line)["concepts"]})
    assert sorted(results["zeroshot_concepts"], key=int) == [str(k) for k in (2, 5, 10, 30) if k <= distinct]
    assert all(0 <= r["top1_in_labels"] <= 1 for r in results["zeroshot_concepts"].values())
    assert results["templates"] == ["A photo of a {}."]
    # --split_ratios scores training's test part of the same cut (seed 42, training's default --seed)
    assert main(["evaluate", str(root / "model"), str(data), "--protocol", "clip-tf-report", "--split_ratios",
                 "1,1,1", "--split", "test", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n_images"] == 8
    assert main(["evaluate", str(root / "model"), str(data), "--split_ratios", "68,12,20", "--split", "dev"]) == 2
    assert "--split names a part" in capsys.readouterr().err
    assert main(["evaluate", str(root / "model"), str(data), "--concept_names", str(names)]) == 2
    assert "--concept_names names the classes of --protocol clip-tf-report" in capsys.readouterr().err


def test_prompt_set_options_and_their_errors(workspace, capsys):
    root, _ = workspace
    image = str(sorted((root / "data" / "images").iterdir())[0])
    model = str(root / "model")
    assert main(["zeroshot", model, image, "--labels", "CT", "MRI", "--prompt_set", "clip"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    for bad in (["--prompt_set", "imagenet"], ["--prompt_set", "clip", "--templates", "a {}."]):
        with pytest.raises(SystemExit) as exit_:
            main(["zeroshot", model, image, "--labels", "CT", "MRI", *bad])
        assert exit_.value.code == 2
    assert "--prompt_set" in capsys.readouterr().err


def test_evaluate_all_four_directions(workspace, tmp_path, capsys):
    root, jsonl = workspace
    with_concepts = jsonl.parent / "with_concepts.jsonl"  # the keywords as concept sets: shared by several pairs
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    with_concepts.write_text("".join(json.dumps({**line, "concepts": line["keywords"][:1]}) + "\n" for line in lines))
    out = tmp_path / "results.json"
    assert main(["evaluate", str(root / "model"), str(with_concepts), "--out", str(out), "--no_zeroshot",
                 "--directions", "i2t,t2i,t2t,i2i", "--expand_abbreviations"]) == 0
    printed = capsys.readouterr().out
    assert all(f"full      {d}" in printed for d in ("i2t", "t2i", "t2t", "i2i")), printed
    full = json.loads(out.read_text())["retrieval_full"]
    assert {"t2t_R@1", "i2i_mrr@10", "i2i_n_queries"} <= set(full)
    assert full["i2i_n_queries"] == full["t2t_n_queries"] > 0
    assert main(["evaluate", str(root / "model"), str(jsonl), "--directions", "i2t,x2y"]) == 2
    assert "choose from" in capsys.readouterr().err


def test_index_paths_resolve_wherever_the_index_is_read(workspace, tmp_path, monkeypatch):
    root, _ = workspace
    from medclip.inference.index import EmbeddingIndex

    main(["embed", str(root / "model"), "--images", str(root / "data" / "images"), "--out", str(root / "rel.npz")])
    monkeypatch.chdir(tmp_path)  # another working directory
    index = EmbeddingIndex.load(root / "rel.npz")
    assert all(Path(p).is_absolute() and Path(p).exists() for p in index.paths)
    assert Path(index.model_dir).resolve() == (root / "model").resolve()


def test_text_padding_does_not_change_embeddings(workspace):
    root, _ = workspace
    from medclip.inference.embedder import Embedder

    embedder = Embedder(root / "model")
    texts = ["CT of the head.", "Axial MRI of the pelvis showing a small cyst in the right lower quadrant."]
    together = embedder.embed_texts(texts)
    alone = np.concatenate([embedder.embed_texts([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
