"""optim.py against PyTorch + transformers: the same updates, the same LR sequences, the same decay mask.

Tolerances: parameters after 1 and 3 updates within rtol 1e-5 (atol 1e-7) of torch; learning rates within
1e-7 absolute of ``transformers.get_scheduler`` (the factor within 1e-6).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from transformers import TrainingArguments, get_scheduler

from itersft_jax.core.optim import build_optimizer, build_schedule, decay_mask, resolve_optimizer

IN, HIDDEN, OUT, BATCH = 5, 8, 3, 4


def make_args(**kw):
    kw.setdefault("output_dir", "/tmp/itersft-test-optim")
    kw.setdefault("report_to", [])
    return TrainingArguments(**kw)


class JaxMLP(nnx.Module):
    """Linear -> LayerNorm -> tanh -> Linear; biases and the norm must not be decayed."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(IN, HIDDEN, rngs=rngs)
        self.norm = nnx.LayerNorm(HIDDEN, epsilon=1e-5, rngs=rngs)
        self.fc2 = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.norm(self.fc1(x))))


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(IN, HIDDEN)
        self.norm = torch.nn.LayerNorm(HIDDEN, eps=1e-5)
        self.fc2 = torch.nn.Linear(HIDDEN, OUT)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def random_models(seed=0):
    """The same random weights in both frameworks (LayerNorm scale/bias randomized too)."""
    rng = np.random.default_rng(seed)
    tm = TorchMLP()
    with torch.no_grad():
        for p in tm.parameters():
            p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape)).astype(np.float32)))
    jm = JaxMLP(nnx.Rngs(0))
    for name in ("fc1", "fc2"):
        layer = getattr(tm, name)
        getattr(jm, name).kernel[...] = jnp.asarray(layer.weight.detach().numpy().T)
        getattr(jm, name).bias[...] = jnp.asarray(layer.bias.detach().numpy())
    jm.norm.scale[...] = jnp.asarray(tm.norm.weight.detach().numpy())
    jm.norm.bias[...] = jnp.asarray(tm.norm.bias.detach().numpy())
    return jm, tm


def batches(n, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(BATCH, IN)).astype(np.float32), rng.normal(size=(BATCH, OUT)).astype(np.float32))
            for _ in range(n)]


def torch_param_groups(model, weight_decay):
    """HF Trainer.create_optimizer's two groups, from HF's own decay-name rule."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]


def run_torch(tm, args, data, total):
    """HF Trainer's update loop: backward, clip_grad_norm_, optimizer.step, scheduler.step."""
    groups = torch_param_groups(tm, args.weight_decay)
    if args.optim == "sgd":
        extra = dict(kv.split("=") for kv in args.optim_args.split(",")) if args.optim_args else {}
        opt = torch.optim.SGD(groups, lr=args.learning_rate, momentum=float(extra.get("momentum", 0.0)))
    else:
        opt = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                eps=args.adam_epsilon)
    sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(total),
                          num_training_steps=total, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    norms = []
    for x, y in data:
        loss = ((tm(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).sum()
        loss.backward()
        if args.max_grad_norm > 0:  # as HF Trainer: clipping only when max_grad_norm > 0
            norms.append(float(torch.nn.utils.clip_grad_norm_(tm.parameters(), args.max_grad_norm)))
        opt.step()
        sched.step()
        opt.zero_grad()
    return norms


def run_jax(jm, args, data):
    graphdef, params = nnx.split(jm, nnx.Param)
    tx, _ = build_optimizer(args, params)
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        return jnp.sum((nnx.merge(graphdef, p)(x) - y) ** 2)

    for x, y in data:
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return nnx.merge(graphdef, params)


def assert_same_params(jm, tm):
    pairs = {"fc1.weight": jm.fc1.kernel[...].T, "fc1.bias": jm.fc1.bias[...],
             "fc2.weight": jm.fc2.kernel[...].T, "fc2.bias": jm.fc2.bias[...],
             "norm.weight": jm.norm.scale[...], "norm.bias": jm.norm.bias[...]}
    for name, p in tm.named_parameters():
        np.testing.assert_allclose(np.asarray(pairs[name]), p.detach().numpy(), rtol=1e-5, atol=1e-7,
                                   err_msg=name)


@pytest.mark.parametrize("num_updates,schedule,warmup", [(1, "linear", 0), (3, "linear", 0),
                                                           (3, "cosine", 2)])
def test_adamw_matches_torch(num_updates, schedule, warmup):
    total = 5
    args = make_args(learning_rate=3e-2, max_steps=total, warmup_steps=warmup, lr_scheduler_type=schedule,
                     weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
                     max_grad_norm=1.0, optim="adamw_torch")
    jm, tm = random_models()
    before = {n: p.detach().clone() for n, p in tm.named_parameters()}
    data = batches(num_updates)
    norms = run_torch(tm, args, data, total)
    assert max(norms) > args.max_grad_norm, "the test must exercise clipping"
    assert all(not torch.equal(before[n], p) for n, p in tm.named_parameters())
    assert_same_params(run_jax(jm, args, data), tm)


@pytest.mark.parametrize("optim_args", [None, "momentum=0.9"])
def test_sgd_matches_torch(optim_args):
    args = make_args(learning_rate=1e-2, max_steps=4, lr_scheduler_type="linear", weight_decay=0.1,
                     max_grad_norm=0.0, optim="sgd", optim_args=optim_args)
    jm, tm = random_models()
    before = {n: p.detach().clone() for n, p in tm.named_parameters()}
    data = batches(3)
    run_torch(tm, args, data, 4)
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in tm.named_parameters()}
    assert min(moved.values()) > 1e-4, f"every parameter must move, or equal parameters prove nothing: {moved}"
    assert_same_params(run_jax(jm, args, data), tm)


SCHEDULES = [
    ("linear", {}), ("cosine", {}), ("cosine", {"num_cycles": 1.5}), ("cosine_with_restarts", {}),
    ("cosine_with_restarts", {"num_cycles": 3}), ("polynomial", {}), ("polynomial", {"power": 2.0, "lr_end": 1e-4}),
    ("constant", {}), ("constant_with_warmup", {}), ("inverse_sqrt", {}), ("inverse_sqrt", {"timescale": 7}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
]


@pytest.mark.parametrize("warmup", [0, 3, 0.2])
@pytest.mark.parametrize("kind,kwargs", SCHEDULES)
def test_schedule_matches_hf(kind, kwargs, warmup):
    lr, total = 1e-3, 15
    args = make_args(learning_rate=lr, max_steps=total, warmup_steps=warmup, lr_scheduler_type=kind,
                     lr_scheduler_kwargs=kwargs)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(kind, opt, num_warmup_steps=args.get_warmup_steps(total), num_training_steps=total,
                          scheduler_specific_kwargs=kwargs)
    hf = []
    for s in range(20):  # beyond max_steps too, where the LR holds at the schedule's final value: the
        hf.append(opt.param_groups[0]["lr"])  # torch backend stops stepping its scheduler at max_steps
        opt.step()
        if s + 1 <= total:
            sched.step()
    schedule = build_schedule(args, total)
    ours = np.array([float(schedule(s)) for s in range(20)])
    np.testing.assert_allclose(ours, hf, rtol=0, atol=1e-7)
    np.testing.assert_allclose(ours / lr, np.array(hf) / lr, rtol=0, atol=1e-6)
    jitted = jax.jit(schedule)  # traced, as inside the train step (float32 rounding differs from eager)
    np.testing.assert_allclose([float(jitted(jnp.int32(s))) for s in range(20)], hf, rtol=0, atol=1e-7)


def test_unknown_max_steps_warms_up_then_stays_constant():
    """TRL bug (e): max_steps=-1 + linear gave LR 0 from the very first update."""
    lr = 5e-5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=-1)
    assert opt.param_groups[0]["lr"] == 0.0  # what TRL did: the default config never trained

    default = make_args(learning_rate=lr)
    assert default.max_steps == -1 and str(getattr(default.lr_scheduler_type, "value", "")) == "linear"
    schedule = build_schedule(default, None)
    np.testing.assert_allclose([float(schedule(s)) for s in range(50)], lr, rtol=1e-7)

    for kind in ("linear", "cosine", "cosine_with_restarts", "polynomial"):
        schedule = build_schedule(make_args(learning_rate=lr, warmup_steps=4, lr_scheduler_type=kind), None)
        np.testing.assert_allclose([float(schedule(s)) for s in range(40)],
                                   [lr * min(s / 4, 1.0) for s in range(40)], rtol=1e-6, atol=0, err_msg=kind)


def test_warmup_ratio_without_max_steps_warns_and_is_ignored():
    args = make_args(learning_rate=1e-3, warmup_steps=0.1)
    with pytest.warns(UserWarning, match="ratio"):
        schedule = build_schedule(args, None)
    assert float(schedule(0)) == pytest.approx(1e-3, rel=1e-7)


def test_decay_mask_excludes_bias_norm_and_1d():
    params = {
        "embed_tokens": {"embedding": jnp.zeros((10, 4))},
        "layers": {0: {"input_layernorm": {"weight": jnp.zeros(4)}, "q_proj": {"kernel": jnp.zeros((4, 4)),
                                                                                 "bias": jnp.zeros(4)}}},
        "ln_f": {"scale": jnp.zeros(4)},
        "ln_2": {"weight2d": jnp.zeros((4, 4))},
        "final_layer_norm": {"weight": jnp.zeros((4, 4))},
        "gate": {"vector": jnp.zeros(4)},
        "lm_head": {"kernel": jnp.zeros((4, 10))},
    }
    mask = decay_mask(params)
    assert mask["embed_tokens"]["embedding"] and mask["lm_head"]["kernel"]
    assert mask["layers"][0]["q_proj"]["kernel"]
    assert not mask["layers"][0]["q_proj"]["bias"]
    assert not mask["layers"][0]["input_layernorm"]["weight"]
    assert not mask["ln_f"]["scale"] and not mask["ln_2"]["weight2d"]
    assert not mask["final_layer_norm"]["weight"] and not mask["gate"]["vector"]

    # nnx.State (leaf paths end in the Variable's `.value`) gives the same answer as its pure dict.
    _, state = nnx.split(JaxMLP(nnx.Rngs(0)), nnx.Param)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(decay_mask(state))}
    assert sorted(k for k, m in flat.items() if m) == ["['fc1']['kernel'].value", "['fc2']['kernel'].value"]
    assert jax.tree.leaves(decay_mask(nnx.to_pure_dict(state))) == jax.tree.leaves(decay_mask(state))


def test_bad_optim_name():
    args = make_args(optim="adagrad")
    with pytest.raises(ValueError, match=r"optim 'adagrad'.*adamw_torch.*sgd.*adafactor"):
        build_optimizer(args, {})


def test_adafactor_builds_and_updates():
    jm, _ = random_models()
    args = make_args(optim="adafactor", learning_rate=1e-2, max_steps=3, weight_decay=0.01)
    jm2 = run_jax(jm, args, batches(2))
    assert not np.allclose(jm2.fc1.kernel[...], random_models()[0].fc1.kernel[...])


def test_resolve_optimizer():
    args = make_args(learning_rate=1e-3, max_steps=10)
    params = {"w": jnp.ones((2, 2))}
    _, schedule = resolve_optimizer(args, params, None)
    assert float(schedule(0)) == pytest.approx(1e-3)
    user_tx = optax.sgd(0.1)
    assert resolve_optimizer(args, params, (user_tx, None)) == (user_tx, None)
    assert resolve_optimizer(args, params, user_tx) == (user_tx, None)
    user_schedule = optax.constant_schedule(0.1)
    assert resolve_optimizer(args, params, (user_tx, user_schedule)) == (user_tx, user_schedule)
    torch_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(TypeError, match="optimizers"):
        resolve_optimizer(args, params, (torch_opt, None))
    with pytest.raises(TypeError, match="optimizers"):
        resolve_optimizer(args, params, "adamw")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_optimizer(args, params, (None, None))
