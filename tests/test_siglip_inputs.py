"""A SigLIP model as its users meet it: `google/medsiglip-448` resolved from huggingface_hub's cache offline (tiny
weights in the real name's place), its SentencePiece tokenizer loaded through transformers, texts and images turned
into inputs exactly as transformers' SiglipTokenizer / SiglipImageProcessor (PIL) do, features equal to
SiglipModel's, and scores shown as the sigmoid probabilities a sigmoid-loss model computes. Also: MedSigLIP's
full-size architecture builds abstractly with transformers' parameter count."""

from __future__ import annotations

import huggingface_hub.constants as hub_constants
import jax
import numpy as np
import pytest
from flax import nnx

from medclip import FlaxHybridCLIP
from medclip.inference.scores import match_probabilities
from medclip.models.hybrid import HybridCLIPConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from tests.test_siglip_parity import make_model

REPO = "google/medsiglip-448"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CORPUS = ["chest x-ray showing a right lower lobe pneumonia", "axial ct of the abdomen with contrast",
          "mri of the brain, t2 weighted, no acute findings", "ultrasound of the liver shows a cyst",
          "lateral radiograph of the knee after surgery"]


def siglip_tokenizer(folder):
    """A tiny SentencePiece model in SigLIP's ids (pad = eos = </s> = 1, unk 2), as a SiglipTokenizer folder."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_prefix=str(folder / "sp"),
                                   vocab_size=60, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
                                   hard_vocab_limit=False)
    tokenizer = transformers.SiglipTokenizer(vocab_file=str(folder / "sp.model"), model_max_length=16)
    return tokenizer


@pytest.fixture()
def cached_medsiglip(tmp_path, monkeypatch):
    """Tiny SigLIP weights and tokenizer laid out as huggingface_hub caches google/medsiglip-448, offline."""
    repo = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    theirs = make_model(1, seed=3)
    theirs.save_pretrained(snapshot)
    tokenizer = siglip_tokenizer(tmp_path)
    tokenizer.save_pretrained(snapshot)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return theirs, tokenizer


def test_hub_cache_name_loads_with_siglip_inputs(cached_medsiglip, tmp_path):
    from PIL import Image

    from medclip.inference.embedder import Embedder

    theirs, tokenizer = cached_medsiglip
    embedder = Embedder(REPO, batch_size=4)
    assert type(embedder.tokenizer).__name__ == "SiglipTokenizer"
    assert embedder.max_seq_length == 16 and embedder.pad_to_max_length
    texts = ["Chest X-ray: pneumonia!", "an mri of the brain", "liver ultrasound, cyst"]
    encoded = tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 57, 3), dtype=np.uint8))
    image.save(tmp_path / "scan.png")
    processor = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():  # SiglipModel called as its docs say: padding="max_length", no attention mask
        out = theirs(input_ids=encoded["input_ids"], pixel_values=pixels)
    np.testing.assert_allclose(embedder.embed_texts(texts), out.text_embeds.numpy(), atol=1e-5)
    ours_image = embedder.embed_images([str(tmp_path / "scan.png")])
    np.testing.assert_allclose(ours_image, out.image_embeds.numpy(), atol=2e-5)
    # the scores shown: sigmoid per pair, as SiglipModel's users compute torch.sigmoid(logits_per_image)
    cosines = embedder.embed_texts(texts) @ ours_image[0]
    np.testing.assert_allclose(embedder.match_probabilities(cosines), torch.sigmoid(out.logits_per_image)[0].numpy(),
                               atol=1e-5)


def test_sigmoid_models_score_each_pair_contrastive_ones_share_a_softmax():
    cosines = np.array([0.30, 0.10, -0.05])
    sigmoid = match_probabilities(cosines, 110.0, -12.0)
    np.testing.assert_allclose(sigmoid, 1 / (1 + np.exp(-(110.0 * cosines - 12.0))))
    assert sigmoid.sum() != pytest.approx(1.0)  # each pair on its own: more than one may fit
    softmax = match_probabilities(cosines, 100.0)
    assert softmax.sum() == pytest.approx(1.0) and softmax.argmax() == 0


def test_app_ranks_siglip_texts_with_sigmoid_probabilities():
    from medclip.app.handlers import rank_texts

    image = np.array([1.0, 0.0])
    texts = np.array([[0.6, 0.8], [0.0, 1.0]])
    ranked = rank_texts(image, ["fits", "unrelated"], texts, 20.0, -5.0)
    assert [s.text for s in ranked] == ["fits", "unrelated"]
    assert ranked[0].probability == pytest.approx(1 / (1 + np.exp(-(20.0 * 0.6 - 5.0))))
    assert ranked[1].probability == pytest.approx(1 / (1 + np.exp(5.0)))


def test_medsiglip_full_size_builds_abstractly_with_transformers_parameter_count():
    """google/medsiglip-448: SoViT-400m/14 towers at 448 px and 64 tokens (its model card: 400M + 400M parameters,
    448x448, up to 64 tokens)."""
    tower = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16}
    config = transformers.SiglipConfig(text_config=dict(vocab_size=32000, max_position_embeddings=64, **tower),
                                       vision_config=dict(image_size=448, patch_size=14, **tower))
    with torch.device("meta"):
        theirs = transformers.SiglipModel(config)
    expected = sum(p.numel() for p in theirs.parameters())
    ours_config = HybridCLIPConfig.from_dict(config.to_dict())
    assert ours_config.context_length == 64 and ours_config.vision_config.num_patches == 1024
    abstract = nnx.eval_shape(lambda: FlaxHybridCLIP(ours_config, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert count == expected
    assert 850e6 < count < 900e6  # about 400M + 400M and the embeddings


def test_medclip_evaluate_and_zeroshot_run_google_medsiglip_448_from_the_cache(cached_medsiglip, tmp_path, capsys):
    import json
    import re

    from medclip.cli import main
    from medclip.data.synthetic import write_synthetic_dataset

    jsonl = write_synthetic_dataset(tmp_path / "data", 8, seed=5, image_size=40)
    out = tmp_path / "results.json"
    assert main(["evaluate", REPO, str(jsonl), "--out", str(out), "--batch_size", "4"]) == 0
    assert "R@1" in capsys.readouterr().out and json.loads(out.read_text())["n_pairs"] == 8
    image = min((tmp_path / "data" / "images").iterdir())
    assert main(["zeroshot", REPO, str(image), "--labels", "CT", "MRI", "ultrasound"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    parsed = [re.match(r"\s*\d+\s+p=(\S+)\s+cos=(\S+)\s+(.*)$", line).groups() for line in lines]
    theirs, _ = cached_medsiglip
    scale, bias = float(theirs.logit_scale.exp()), float(theirs.logit_bias)
    for p, cos, _ in parsed:  # sigmoid(scale * cos + bias) per label, not a softmax over them
        assert float(p) == pytest.approx(1 / (1 + np.exp(-(scale * float(cos) + bias))), abs=2e-4)
