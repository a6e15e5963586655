"""Our optimizer options against torch.optim on the same parameters and gradients: Adam with L2 weight decay
(PubMedCLIP's), AdamW (decoupled, our default), and ReduceLROnPlateau on the same metric sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

from medclip.training.optim import OptimizerConfig, make_optimizer, set_lr_scale  # noqa: E402
from medclip.training.plateau import Plateau, PlateauConfig  # noqa: E402

STEPS = 5


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {"dense": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                        "bias": rng.normal(size=(3,)).astype(np.float32)},
              "logit_scale": np.asarray(2.0, np.float32)}
    grads = [{"dense": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                        "bias": rng.normal(size=(3,)).astype(np.float32)},
              "logit_scale": np.asarray(rng.normal(), np.float32)} for _ in range(STEPS)]
    return params, grads


def _ours(weight_decay_type, lr, wd, params, grads, mask="default"):
    config = OptimizerConfig(learning_rate=lr, schedule="constant", weight_decay=wd, max_grad_norm=None,
                             weight_decay_type=weight_decay_type, weight_decay_mask=mask, total_steps=STEPS)
    tx, _ = make_optimizer(params, config)
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
    return jax.tree.map(np.asarray, params)


def _torch(optimizer_cls, lr, wd, params, grads):
    kernel = torch.nn.Parameter(torch.tensor(params["dense"]["kernel"]))
    bias = torch.nn.Parameter(torch.tensor(params["dense"]["bias"]))
    scale = torch.nn.Parameter(torch.tensor(params["logit_scale"]))
    # Our decay mask: biases and the temperature get none.
    opt = optimizer_cls([{"params": [kernel], "weight_decay": wd}, {"params": [bias, scale], "weight_decay": 0.0}],
                        lr=lr, betas=(0.9, 0.999), eps=1e-8)
    for g in grads:
        kernel.grad = torch.tensor(g["dense"]["kernel"])
        bias.grad = torch.tensor(g["dense"]["bias"])
        scale.grad = torch.tensor(g["logit_scale"])
        opt.step()
    return {"dense": {"kernel": kernel.detach().numpy(), "bias": bias.detach().numpy()},
            "logit_scale": scale.detach().numpy()}


def _assert_close(ours, theirs, atol=1e-6):
    for path, a in jax.tree_util.tree_flatten_with_path(ours)[0]:
        b = theirs
        for key in path:
            b = b[key.key]
        np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=str(path))


@pytest.mark.parametrize("lr,wd", [(1e-5, 5e-4), (1e-2, 0.1)])  # PubMedCLIP's, and one where decay shows
def test_l2_weight_decay_matches_torch_adam(lr, wd):
    params, grads = _problem()
    ours = _ours("l2", lr, wd, params, grads)
    _assert_close(ours, _torch(torch.optim.Adam, lr, wd, params, grads))
    if wd >= 0.1:  # the two kinds of decay really differ here, so the comparison above could fail
        decoupled = _ours("decoupled", lr, wd, params, grads)
        assert np.abs(decoupled["dense"]["kernel"] - ours["dense"]["kernel"]).max() > 1e-4


# Every kind of leaf a decay mask tells apart: a matrix, a bias, a norm gain, an embedding table, the temperature.
MASK_SHAPES = {"dense": {"kernel": (4, 3), "bias": (3,)}, "layer_norm": {"scale": (3,)},
               "token": {"embedding": (5, 3)}, "logit_scale": ()}
LEAVES = (("dense", "kernel"), ("dense", "bias"), ("layer_norm", "scale"), ("token", "embedding"), ("logit_scale",))


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _mask_problem():
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), MASK_SHAPES,
                          is_leaf=lambda x: isinstance(x, tuple))
    return params, [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(STEPS)]


def _torch_groups(params, grads, optimizer_cls, lr, wd, decayed):
    """torch with the leaves `decayed(name, tensor)` accepts in a group with weight decay, the rest without."""
    tensors = {path: torch.nn.Parameter(torch.tensor(_leaf(params, path))) for path in LEAVES}
    yes = [t for path, t in tensors.items() if decayed(".".join(path), t)]
    no = [t for path, t in tensors.items() if not decayed(".".join(path), t)]
    groups = [{"params": yes, "weight_decay": wd}] + ([{"params": no, "weight_decay": 0.0}] if no else [])
    opt = optimizer_cls(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    for g in grads:
        for path, tensor in tensors.items():
            tensor.grad = torch.tensor(_leaf(g, path))
        opt.step()
    return {path: t.detach().numpy() for path, t in tensors.items()}


def test_weight_decay_mask_all_matches_one_torch_param_group():
    """PubMedCLIP: torch.optim.Adam(model.parameters(), weight_decay=5e-4) decays every parameter, biases, norm
    gains, embedding tables and the temperature included: one param group, no mask."""
    params, grads = _mask_problem()
    lr, wd = 1e-2, 0.1  # large enough that decaying a leaf or not shows
    theirs = _torch_groups(params, grads, torch.optim.Adam, lr, wd, decayed=lambda name, p: True)
    ours = _ours("l2", lr, wd, params, grads, mask="all")
    masked = _ours("l2", lr, wd, params, grads)
    for path in LEAVES:
        np.testing.assert_allclose(_leaf(ours, path), theirs[path], atol=1e-6, rtol=0, err_msg=str(path))
    # The comparison can fail: the default mask leaves these undecayed, and the results differ.
    for path in LEAVES[1:]:
        assert np.abs(_leaf(masked, path) - theirs[path]).max() > 1e-5, path


def test_weight_decay_mask_ndim_matches_pmc_clips_param_groups():
    """PMC-CLIP (src/training/main.py): AdamW with two groups, `exclude = p.ndim < 2 or "bn" in n or "ln" in n or
    "bias" in n or "logit_scale" in n` without decay; embedding tables (2-D) decay, unlike our default mask."""
    params, grads = _mask_problem()
    lr, wd = 1e-2, 0.1

    def exclude(n, p):  # transcribed; our leaf names stand in for torch's
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    theirs = _torch_groups(params, grads, torch.optim.AdamW, lr, wd, decayed=lambda n, p: not exclude(n, p))
    ours = _ours("decoupled", lr, wd, params, grads, mask="ndim")
    for path in LEAVES:
        np.testing.assert_allclose(_leaf(ours, path), theirs[path], atol=1e-6, rtol=0, err_msg=str(path))
    default = _ours("decoupled", lr, wd, params, grads)
    embedding = ("token", "embedding")
    assert np.abs(_leaf(default, embedding) - theirs[embedding]).max() > 1e-5


@pytest.mark.parametrize("lr,wd", [(5e-5, 0.1), (1e-2, 0.1)])
def test_decoupled_weight_decay_matches_torch_adamw(lr, wd):
    params, grads = _problem(1)
    _assert_close(_ours("decoupled", lr, wd, params, grads), _torch(torch.optim.AdamW, lr, wd, params, grads))


def test_lr_multiplier_scales_the_learning_rate_like_torch():
    """Halving `lr_scale` mid-run equals torch.optim.Adam with its group's lr halved at the same step."""
    params, grads = _problem(2)
    config = OptimizerConfig(learning_rate=1e-2, schedule="constant", weight_decay=0.1, max_grad_norm=None,
                             weight_decay_type="l2", total_steps=STEPS, lr_multiplier=True)
    tx, _ = make_optimizer(params, config)
    ours, state = jax.tree.map(jnp.asarray, params), tx.init(jax.tree.map(jnp.asarray, params))
    kernel = torch.nn.Parameter(torch.tensor(params["dense"]["kernel"]))
    opt = torch.optim.Adam([kernel], lr=1e-2, weight_decay=0.1)
    for i, g in enumerate(grads):
        if i == 2:
            state = set_lr_scale(state, jnp.asarray(0.5, jnp.float32))
            opt.param_groups[0]["lr"] = 0.5e-2
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, ours)
        ours = optax.apply_updates(ours, updates)
        kernel.grad = torch.tensor(g["dense"]["kernel"])
        opt.step()
    np.testing.assert_allclose(np.asarray(ours["dense"]["kernel"]), kernel.detach().numpy(), atol=1e-6, rtol=0)


# Plateaus, improvements smaller than the 1e-4 relative threshold (not counted as better), a real improvement,
# then long stagnation so the learning rate falls several times and hits min_lr.
LOSS_SEQUENCE = [1.0, 0.9, 0.89995, 0.8999, 0.9, 0.91, 0.85, 0.85, 0.849999, 0.86, 0.87, 0.88, 0.84, 0.84,
                 0.84, 0.84, 0.84, 0.84, 0.84, 0.84, 0.84, 0.84, 0.84, 0.84, 0.84, 0.84]
RECALL_SEQUENCE = [0.1, 0.2, 0.20001, 0.2, 0.19, 0.3, 0.3, 0.3, 0.30002, 0.31, 0.31, 0.31, 0.31, 0.31, 0.31, 0.31]


@pytest.mark.parametrize("mode,sequence,kwargs", [
    ("min", LOSS_SEQUENCE, dict(factor=0.5, patience=2, cooldown=0, min_lr=0.0)),
    ("min", LOSS_SEQUENCE, dict(factor=0.5, patience=1, cooldown=2, min_lr=2e-4)),
    ("min", LOSS_SEQUENCE, dict(factor=0.1, patience=0, cooldown=1, min_lr=1e-6, threshold=1e-3)),
    ("min", LOSS_SEQUENCE, dict(factor=0.3, patience=1, cooldown=0, min_lr=0.0, threshold=0.01,
                                threshold_mode="abs")),
    ("max", RECALL_SEQUENCE, dict(factor=0.5, patience=1, cooldown=1, min_lr=0.0)),
])
def test_plateau_matches_torch_reduce_lr_on_plateau(mode, sequence, kwargs):
    lr = 1e-3
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=lr)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, **kwargs)
    ours = Plateau(PlateauConfig(mode=mode, **kwargs), lr)
    reductions = 0
    for epoch, value in enumerate(sequence):
        reference.step(value)
        ours_lr = ours.step(value)
        assert ours_lr == opt.param_groups[0]["lr"], (epoch, value)  # exactly, as Python floats
        reductions += ours_lr < lr
        # Resuming from the saved state continues identically.
        ours = Plateau(ours.config, lr, state=ours.to_dict())
    assert reductions > 0  # the sequence exercises at least one reduction
