"""open_clip's side of `benchmarks/train_step.py`'s rn50 configs: one training step of open_clip's
`CustomTextCLIP` (ModifiedResNet + a Hugging Face BERT), served to the benchmark over stdin/stdout.

It runs in a separate process with the reference venv's Python (.venv-ref, `make .venv-ref/.ref`): open_clip
needs torchvision, which does not load against the main venv's torch build. Started by the benchmark, not by
hand:

    .venv-ref/bin/python benchmarks/openclip_step_worker.py FOLDER --threads N --device cpu --total-steps T \
        [--autocast bfloat16] [--compile]

FOLDER holds what the benchmark wrote: `spec.json` (`model_cfg`, an open_clip model config whose
`text_cfg.hf_model_name` is a local folder with a BERT config.json; `seed`), `input_ids.npy` and
`pixel_values.npy` (NCHW). The worker builds the model with seeded random weights (fp32, the configs'
dropout 0), writes them as an OpenCLIP hub folder (FOLDER/open_clip: open_clip_config.json +
open_clip_model.safetensors) for the benchmark to load into ours through the real checkpoint loader, and
says so with one JSON line on stdout. Then each request line `{"run": n}` runs n steps back to back and is
answered `{"wall": s, "cpu": s, "loss": last step's loss, "peak_memory": CUDA bytes or null}`, timed in this
process exactly as the benchmark times its in-process steps (`train_step.InProcessStep.run`). EOF ends it.

The step is `train_step.TorchStep`, the transformers peer's: forward, open_clip's `ClipLoss` (symmetric
InfoNCE), backward, `clip_grad_norm_(1.0)`, fused AdamW with weight decay 0.1 except on what our
`medclip.training.optim.NO_DECAY` exempts (norms, biases, embedding tables, logit_scale), a linear schedule.
BatchNorm runs in train mode (batch statistics, running statistics updated), as our trainer's step does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import IO

import numpy as np
import torch

from train_step import TorchStep  # this folder is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parent.parent


def keep_host_memory_mapped() -> bool:
    """The glibc settings the benchmark applies to its own process (medclip.training.host_memory), so both
    sides' allocators behave as in the in-process comparison. Loaded by file path: importing the medclip
    package would import JAX, which this venv does not have."""
    spec = importlib.util.spec_from_file_location("host_memory", ROOT / "medclip" / "training" / "host_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.keep_host_memory_mapped()


def build_model(model_cfg: dict, seed: int) -> torch.nn.Module:
    """open_clip's CustomTextCLIP with seeded random weights. open_clip zero-initialises every bottleneck's
    last BatchNorm gain (the residual branches start as nothing); they get torch's default gain 1 here, so
    the first loss, which the benchmark compares with ours, depends on every convolution."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**model_cfg, output_dict=True)
    with torch.no_grad():
        for name, parameter in model.visual.named_parameters():
            if name.startswith("layer") and name.endswith("bn3.weight"):
                parameter.fill_(1.0)
    return model


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """The parameters our NO_DECAY exempts, found by module type instead of by name (open_clip's names for a
    norm, e.g. a bottleneck's `downsample.1`, do not say so): norm gains and biases, every bias, embedding
    tables, logit_scale / logit_bias. The attention pool's positional_embedding is a raw parameter that ours
    decays (`attnpool.positional_embedding` does not match NO_DECAY) and so does this."""
    exempt = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.Embedding)
    names = {"logit_scale", "logit_bias"}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(module, exempt) or name == "bias":
                names.add(full)
    return names


def make_step(model: torch.nn.Module, folder: Path, device: str, total_steps: int, autocast: str | None = None,
              compile_model: bool = False) -> TorchStep:
    """`autocast`: forward and loss under torch.autocast in that dtype; `compile_model`: the forward through
    torch.compile (the benchmark's GPU comparison)."""
    import open_clip

    pixels = torch.from_numpy(np.load(folder / "pixel_values.npy")).to(device)
    text = torch.from_numpy(np.load(folder / "input_ids.npy")).long().to(device)  # mask: ids != pad (0)
    clip_loss = open_clip.ClipLoss()
    model = model.to(device)
    forward = torch.compile(model) if compile_model else model

    def loss() -> torch.Tensor:
        out = forward(pixels, text)
        return clip_loss(out["image_features"], out["text_features"], out["logit_scale"])

    return TorchStep(model, loss, no_decay_names(model), device, total_steps, autocast)


def save_open_clip_folder(model: torch.nn.Module, model_cfg: dict, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}, indent=2) + "\n")


def serve(step: TorchStep, requests: IO[str], replies: IO[str]) -> None:
    for line in requests:
        n = int(json.loads(line)["run"])
        times = step.run(n)
        replies.write(json.dumps(times._asdict()) + "\n")
        replies.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--threads", type=int, required=True, help="torch threads (the benchmark's cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--total-steps", type=int, default=10_000, help="the linear schedule's length")
    parser.add_argument("--autocast", choices=("bfloat16",), help="forward and loss under torch.autocast")
    parser.add_argument("--compile", action="store_true", help="the forward through torch.compile")
    args = parser.parse_args()
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    host_memory_kept = keep_host_memory_mapped()

    import open_clip

    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("openclip_step_worker: --device cuda, but this torch has no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = False  # true fp32, as the benchmark sets JAX
        torch.backends.cudnn.allow_tf32 = False
    spec = json.loads((args.folder / "spec.json").read_text())
    model = build_model(spec["model_cfg"], spec["seed"])
    save_open_clip_folder(model, spec["model_cfg"], args.folder / "open_clip")
    step = make_step(model, args.folder, args.device, args.total_steps, args.autocast, args.compile)
    replies.write(json.dumps({
        "ready": True, "torch": torch.__version__, "open_clip": open_clip.__version__,
        "threads": torch.get_num_threads(), "device": args.device, "host_memory_kept_mapped": host_memory_kept,
        "parameter_elements": step.parameter_elements, "decayed_elements": step.decayed_elements}) + "\n")
    replies.flush()
    serve(step, sys.stdin, replies)


if __name__ == "__main__":
    main()
