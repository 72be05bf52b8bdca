"""``TrainingArguments`` -> optax: the optimizer, its weight-decay mask, the LR schedule and clipping.

Everything here mirrors what ``transformers.Trainer`` builds in PyTorch, so that one update in JAX equals
one update in torch:

* The LR of update ``s`` (0-based: ``s`` updates already done) is ``learning_rate * lr_lambda(s)`` with
  the ``lr_lambda`` of ``transformers.get_scheduler`` (a ``LambdaLR`` stepped after every update).
* AdamW has torch's semantics: decoupled decay ``p -= lr * wd * p`` on the old params, bias-corrected
  moments, ``eps`` added outside the square root.
* No weight decay on biases and normalization weights (HF's mask), nor on any 1-D parameter.
* ``max_grad_norm > 0`` clips the global norm exactly like ``torch.nn.utils.clip_grad_norm_``.

The fix over TRL: with ``max_steps <= 0`` the number of updates is unknown, and schedules that need it
(linear, cosine, ...) become warmup-then-constant instead of an LR of 0 from the first update.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from itersft_jax.shared.fields import enum_name

logger = logging.getLogger(__name__)

ADAMW_NAMES = (
    "adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_torch_xla", "adamw_torch_npu_fused",
    "adamw_apex_fused", "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "adamw_bnb_8bit",
    "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit",
)
SUPPORTED_OPTIMS = (*ADAMW_NAMES, "sgd", "adafactor")

SUPPORTED_SCHEDULES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr",
)
# Schedules whose shape depends on the total number of updates.
_NEEDS_TOTAL = ("linear", "cosine", "cosine_with_restarts", "polynomial", "cosine_with_min_lr")


def _scheduler_kwargs(args) -> dict:
    kwargs = getattr(args, "lr_scheduler_kwargs", None) or {}
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs)
    return dict(kwargs)


def _total_steps(args, num_training_steps: int | None) -> int | None:
    total = getattr(args, "max_steps", -1) if num_training_steps is None else num_training_steps
    return int(total) if total is not None and total > 0 else None


def get_warmup_steps(args, num_training_steps: int | None = None) -> int:
    """HF's ``get_warmup_steps``: ``warmup_steps >= 1`` is a count, a float in (0, 1) a ratio of the total.

    Also reads ``warmup_ratio`` (transformers 4.x; transformers 5 folded it into ``warmup_steps``). A ratio
    needs the total number of updates; without it (``max_steps <= 0``) the warmup is 0, with a warning.
    """
    steps = getattr(args, "warmup_steps", 0) or 0
    ratio = getattr(args, "warmup_ratio", 0.0) or 0.0
    if steps >= 1:
        return int(steps)
    if steps > 0:
        ratio = steps
    if ratio <= 0:
        return 0
    total = _total_steps(args, num_training_steps)
    if total is None:
        warnings.warn(f"warmup given as a ratio ({ratio}) but the number of updates is unknown "
                      "(max_steps <= 0): the ratio is ignored, no warmup. Give warmup_steps >= 1 instead.",
                      stacklevel=3)
        return 0
    return math.ceil(total * ratio)


def build_schedule(args, num_training_steps: int | None = None) -> optax.Schedule:
    """The LR of update ``count`` (0-based), as ``transformers.get_scheduler`` would give it.

    ``num_training_steps``: the total number of updates; ``None`` reads ``args.max_steps``; ``<= 0``
    means unknown, and then the schedules that need it run warmup, then constant.
    """
    kind = enum_name(getattr(args, "lr_scheduler_type", "linear"))
    if kind not in SUPPORTED_SCHEDULES:
        raise ValueError(f"lr_scheduler_type {kind!r} is not supported by the JAX backend; supported: "
                         f"{', '.join(SUPPORTED_SCHEDULES)}.")
    lr = float(args.learning_rate)
    kw = _scheduler_kwargs(args)
    total = _total_steps(args, num_training_steps)
    warmup = get_warmup_steps(args, num_training_steps)
    if kind in _NEEDS_TOTAL and total is None:
        logger.info("lr_scheduler_type=%r needs max_steps > 0; the number of updates is unknown, so the LR "
                    "warms up for %d updates and then stays constant.", kind, warmup)
        kind = "constant_with_warmup"
    if kind == "constant" and warmup:
        logger.info("lr_scheduler_type='constant' ignores warmup (as in transformers); "
                    "use 'constant_with_warmup'.")
    lam = _lr_lambda(kind, warmup, total, lr, kw)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        if total is not None:
            # Past max_steps the LR holds at the schedule's final value (the torch backend stops stepping
            # its scheduler there): cosine must not climb back, nothing runs past the end.
            count = jnp.minimum(count, float(total))
        return lr * lam(count)

    return schedule


def _lr_lambda(kind: str, warmup: int, total: int | None, lr: float, kw: dict) -> Callable:
    """jnp transcription of transformers' ``_get_*_lr_lambda`` functions (float ``step`` in, factor out)."""
    def warm(step):
        return step / max(1.0, warmup)

    def progress(step):
        return (step - warmup) / max(1, total - warmup)

    if kind == "constant":
        return lambda step: jnp.ones_like(step)
    if kind == "constant_with_warmup":
        return lambda step: jnp.where(step < warmup, warm(step), 1.0)
    if kind == "linear":
        return lambda step: jnp.where(step < warmup, warm(step),
                                      jnp.maximum(0.0, (total - step) / max(1, total - warmup)))
    if kind in ("cosine", "cosine_with_min_lr"):
        cycles = float(kw.get("num_cycles", 0.5))
        min_rate = 0.0
        if kind == "cosine_with_min_lr":
            if kw.get("min_lr") is not None and kw.get("min_lr_rate") is not None:
                raise ValueError("lr_scheduler_kwargs: only one of min_lr or min_lr_rate should be set")
            if kw.get("min_lr") is not None:
                min_rate = float(kw["min_lr"]) / lr
            elif kw.get("min_lr_rate") is not None:
                min_rate = float(kw["min_lr_rate"])
            else:
                raise ValueError("lr_scheduler_type='cosine_with_min_lr' needs min_lr or min_lr_rate in "
                                 "lr_scheduler_kwargs")

        def cosine(step):
            factor = 0.5 * (1.0 + jnp.cos(math.pi * cycles * 2.0 * progress(step)))
            return jnp.where(step < warmup, warm(step), jnp.maximum(0.0, factor * (1 - min_rate) + min_rate))
        return cosine
    if kind == "cosine_with_restarts":
        cycles = float(kw.get("num_cycles", 1))

        def restarts(step):
            p = progress(step)
            factor = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * jnp.mod(cycles * p, 1.0))))
            return jnp.where(step < warmup, warm(step), jnp.where(p >= 1.0, 0.0, factor))
        return restarts
    if kind == "polynomial":
        lr_end, power = float(kw.get("lr_end", 1e-7)), float(kw.get("power", 1.0))
        if not lr > lr_end:
            raise ValueError(f"lr_end ({lr_end}) must be smaller than initial lr ({lr})")
        decay_steps = max(1, total - warmup)

        def polynomial(step):
            remaining = jnp.clip(1 - (step - warmup) / decay_steps, 0.0, None)
            decay = ((lr - lr_end) * remaining ** power + lr_end) / lr
            return jnp.where(step < warmup, warm(step), jnp.where(step > total, lr_end / lr, decay))
        return polynomial
    if kind == "inverse_sqrt":
        timescale = kw.get("timescale") or (warmup or 10_000)

        def inverse_sqrt(step):
            decay = 1.0 / jnp.sqrt((step + timescale - warmup) / timescale)
            return jnp.where(step < warmup, warm(step), decay)
        return inverse_sqrt
    raise AssertionError(kind)


def _path_names(path) -> list[str]:
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
    # An nnx.State leaf path ends in the Variable's ``.value``; that is not part of the parameter's name.
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        names = names[:-1]
    return names


def is_decayed(names: list[str], ndim: int) -> bool:
    """HF's rule: no decay on biases and normalization weights; here also never on 1-D parameters."""
    if ndim <= 1 or (names and names[-1] == "bias"):
        return False
    return not any("norm" in n.lower() or n.lower().startswith("ln") for n in names)


def decay_mask(params) -> Any:
    """Pytree of bools over ``params`` (an ``nnx.State`` or a pure dict): True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: is_decayed(_path_names(path), len(getattr(leaf, "shape", ()))), params)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: ``g *= min(max_norm / (norm + 1e-6), 1)``, always applied."""
    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(max_norm / (optax.tree.norm(updates) + 1e-6), 1.0)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _optim_args(args) -> dict[str, str]:
    text = getattr(args, "optim_args", None)
    if not text:
        return {}
    return dict(item.split("=") for item in text.replace(" ", "").split(","))


def build_optimizer(args, params, num_training_steps: int | None = None
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation ``transformers.Trainer`` would build for ``args.optim``, and its schedule.

    AdamW variants with quantized or fused state (``adamw_torch_8bit``, ``adamw_bnb_8bit``, ``paged_*``,
    ``adamw_torch_fused``, ...) all become fp32 AdamW: the same update without the quantization.
    ``adafactor`` is ``optax.adafactor`` with HF's Trainer settings (no relative step, no parameter
    scale); it is close to, not bit-identical with, ``transformers.Adafactor``.
    """
    del params  # the mask is a function of the params, evaluated by optax at init
    optim = enum_name(getattr(args, "optim", "adamw_torch"))
    schedule = build_schedule(args, num_training_steps)
    wd = float(getattr(args, "weight_decay", 0.0) or 0.0)
    extra = _optim_args(args)
    if optim in ADAMW_NAMES:
        tx = optax.adamw(schedule, b1=float(extra.get("beta1", args.adam_beta1)),
                         b2=float(extra.get("beta2", args.adam_beta2)), eps=float(args.adam_epsilon),
                         weight_decay=wd, mask=decay_mask)
    elif optim == "sgd":
        # torch.optim.SGD: coupled L2 decay (g + wd * p), then momentum (first step buf = g), then lr.
        momentum = float(extra.get("momentum", 0.0))
        if float(extra.get("dampening", 0.0)) != 0.0:
            raise ValueError("optim_args dampening != 0 is not supported by the JAX backend's sgd")
        nesterov = extra.get("nesterov", "false").lower() in ("true", "1", "yes")
        tx = optax.chain(
            optax.add_decayed_weights(wd, decay_mask) if wd else optax.identity(),
            optax.trace(decay=momentum, nesterov=nesterov) if momentum else optax.identity(),
            optax.scale_by_learning_rate(schedule),
        )
    elif optim == "adafactor":
        tx = optax.adafactor(schedule, multiply_by_parameter_scale=False, clipping_threshold=1.0,
                             weight_decay_rate=wd or None, weight_decay_mask=decay_mask if wd else None)
    else:
        raise ValueError(f"optim {optim!r} is not supported by the JAX backend; supported: "
                         f"{', '.join(SUPPORTED_OPTIMS)}. Pass optimizers=(optax_transformation, schedule) "
                         "for anything else, or use backend='torch'.")
    max_norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
    if max_norm > 0:
        tx = optax.chain(clip_by_global_norm_torch(max_norm), tx)
    return tx, schedule


def resolve_optimizer(args, params, optimizers=None, num_training_steps: int | None = None
                      ) -> tuple[optax.GradientTransformation, optax.Schedule | None]:
    """The user's ``optimizers=(tx, schedule)`` if given, else :func:`build_optimizer`.

    ``optimizers`` may be ``None``, ``(None, None)``, an optax transformation, or a pair ``(tx, schedule)``
    whose schedule is a callable of the update count or ``None``. With a user transformation and no
    schedule the returned schedule is ``None``: the LR is the transformation's business and unknown here.
    Torch optimizers and schedulers are rejected with a ``TypeError``.
    """
    tx, schedule = check_optimizers(optimizers)
    if tx is None:
        return build_optimizer(args, params, num_training_steps)
    return tx, schedule


def check_optimizers(optimizers) -> tuple[optax.GradientTransformation | None, Any]:
    """``optimizers`` as ``(tx or None, schedule or None)``, or a ``TypeError`` naming ``optimizers`` (see
    :func:`resolve_optimizer`); checked when the trainer is built, before the model is loaded."""
    if optimizers is None:
        optimizers = (None, None)
    if isinstance(optimizers, optax.GradientTransformation):
        optimizers = (optimizers, None)
    if not isinstance(optimizers, (tuple, list)) or len(optimizers) != 2:
        shape = f"{len(optimizers)} items" if isinstance(optimizers, (tuple, list)) else type(optimizers).__name__
        raise TypeError(f"`optimizers` must be a pair (optax.GradientTransformation or None, schedule or None), "
                        f"got {shape}")
    tx, schedule = optimizers
    for obj, what in ((tx, "optimizer"), (schedule, "scheduler")):
        if obj is not None and type(obj).__module__.split(".")[0] == "torch":
            raise TypeError(f"`optimizers`: got a torch {what} ({type(obj).__name__}); the JAX backend takes "
                            "(optax.GradientTransformation, schedule callable or None). Use backend='torch' "
                            "for torch optimizers.")
    if tx is None and schedule is not None:
        raise TypeError("`optimizers`: a schedule without an optax transformation; pass (tx, schedule)")
    if tx is not None and not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"`optimizers[0]` must be an optax.GradientTransformation, got {type(tx).__name__}")
    if schedule is not None and not callable(schedule):
        raise TypeError(f"`optimizers[1]` must be a callable schedule or None, got {type(schedule).__name__}")
    return tx, schedule
