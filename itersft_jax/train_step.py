"""The pure core of training: ``TrainState``, the causal-LM loss, ``train_step`` and its one ``jax.jit``.

A batch is one optimizer update: ``input_ids``, ``attention_mask`` and ``labels``, int32, each
``[A, M, T]`` — ``A`` micro-batches of ``M`` rows of ``T`` tokens, either one padded sample per row
(``data.collate``: a 0/1 mask) or several samples packed per row (``packing.pack_update``: segment ids
1, 2, ... in the mask, positions restart per segment). The gradient of the *summed* token loss is
accumulated over the ``A`` axis in a loop that stops after the last micro-batch holding a token (so
all-padding micro-batches at the end cost nothing and the step's shape need not follow the data) and
divided once by the number of label tokens, so the update is the same however the samples are split
into micro-batches and rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from itersft_jax.models.common import positions_from_segments

IGNORE_INDEX = -100


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (donated to the jitted step)."""

    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # nnx.State of nnx.Param, or its pure dict; fp32 master weights
    opt_state: Any
    rng: jax.Array  # for stochastic layers; per-step keys are fold_in(rng, step)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   rng=jax.random.key(seed))


def causal_lm_loss(logits_BTV: jax.Array, labels_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and the number of label tokens (HF labels: aligned, -100 ignored).

    The shift happens here: ``logits[:, t]`` predicts ``labels[:, t + 1]``. It is applied to the labels
    (the last position gets -100), never to the ``[B, T, V]`` logits, so no slice or pad of the largest
    tensor of the step is materialized. Log-softmax in float32.
    """
    ignore_B1 = jnp.full((labels_BT.shape[0], 1), IGNORE_INDEX, labels_BT.dtype)
    targets_BT = jnp.concatenate([labels_BT[:, 1:], ignore_B1], axis=1)
    weights_BT = (targets_BT != IGNORE_INDEX).astype(jnp.float32)
    safe_targets_BT = jnp.where(targets_BT == IGNORE_INDEX, 0, targets_BT)
    return _weighted_xent_sum(logits_BTV, safe_targets_BT, weights_BT), jnp.sum(weights_BT)


@jax.custom_vjp
def _weighted_xent_sum(logits_BTV, targets_BT, weights_BT):
    """``sum(weights * (logsumexp(logits) - logits[target]))`` in fp32, with a hand-written gradient.

    The gradient is ``(softmax - one_hot(target)) * weight`` in one elementwise pass over the logits;
    autodiff of ``take_along_axis`` would scatter into a zero ``[B, T, V]`` buffer and add it.
    """
    return _weighted_xent_fwd(logits_BTV, targets_BT, weights_BT)[0]


def _weighted_xent_fwd(logits_BTV, targets_BT, weights_BT):
    logits32_BTV = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits32_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits32_BTV, targets_BT[..., None], axis=-1)[..., 0]
    loss_sum = jnp.sum((log_z_BT - target_logit_BT) * weights_BT)
    return loss_sum, (logits_BTV, log_z_BT, targets_BT, weights_BT)


def _weighted_xent_bwd(residuals, g):
    logits_BTV, log_z_BT, targets_BT, weights_BT = residuals
    probs_BTV = jnp.exp(logits_BTV.astype(jnp.float32) - log_z_BT[..., None])
    vocab_V = jax.lax.broadcasted_iota(targets_BT.dtype, (1, 1, logits_BTV.shape[-1]), 2)
    one_hot_BTV = (vocab_V == targets_BT[..., None]).astype(jnp.float32)
    grad_BTV = (probs_BTV - one_hot_BTV) * (weights_BT * g)[..., None]
    return grad_BTV.astype(logits_BTV.dtype), None, None


_weighted_xent_sum.defvjp(_weighted_xent_fwd, _weighted_xent_bwd)


def _summed_loss(params, graphdef, input_ids_BT, attention_mask_BT, labels_BT):
    model = nnx.merge(graphdef, params)
    positions_BT = positions_from_segments(attention_mask_BT)
    logits_BTV = model(input_ids_BT, positions_BT, attention_mask_BT)[0]
    return causal_lm_loss(logits_BTV, labels_BT)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef, tx: optax.GradientTransformation,
               schedule=None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from ``batch`` (``[A, M, T]`` arrays); pure, jitted by ``make_train_step``.

    Metrics: ``loss`` (mean token cross-entropy of the update), ``grad_norm`` (global norm before
    clipping), ``learning_rate`` (``schedule(state.step)``, NaN without a schedule), ``num_tokens``.
    """
    grad_fn = jax.value_and_grad(_summed_loss, has_aux=True)  # d(loss_sum); the token count rides along

    micro_batches = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    def accumulate(i, carry):
        grads_acc, loss_acc, count_acc = carry
        micro = {k: jax.lax.dynamic_index_in_dim(v, i, keepdims=False) for k, v in micro_batches.items()}
        (loss_sum, count), grads = grad_fn(state.params, graphdef, micro["input_ids"],
                                           micro["attention_mask"], micro["labels"])
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        return grads_acc, loss_acc + loss_sum, count_acc + count

    # Micro-batches after the last one holding a token are padding: the loop stops before them.
    holds_token_A = jnp.any(micro_batches["attention_mask"] != 0, axis=(1, 2))
    num_micro = jnp.max(jnp.where(holds_token_A, jnp.arange(1, holds_token_A.shape[0] + 1), 0))
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    grads, loss_sum, count = jax.lax.fori_loop(0, num_micro, accumulate, init)

    # One division for the whole update: token-weighted, whatever the micro-batch split. An update with
    # no label tokens has loss 0 and zero gradients instead of NaN.
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    lr = schedule(state.step) if schedule is not None else jnp.float32(jnp.nan)
    metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm,
               "learning_rate": jnp.asarray(lr, jnp.float32), "num_tokens": count.astype(jnp.int32)}
    new_state = dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(params, batch: dict[str, jax.Array], *, graphdef) -> dict[str, jax.Array]:
    """Summed token cross-entropy and label-token count of ``batch`` (``[A, M, T]``), no update."""
    def accumulate(i, carry):
        # The params ride in the carry: a model merged from values closed over from outside the loop
        # cannot run nnx.remat'd layers (gradient_checkpointing) inside it.
        params_, loss_acc, count_acc = carry
        micro = {k: jax.lax.dynamic_index_in_dim(batch[k], i, keepdims=False)
                 for k in ("input_ids", "attention_mask", "labels")}
        loss_sum, count = _summed_loss(params_, graphdef, micro["input_ids"], micro["attention_mask"],
                                       micro["labels"])
        return params_, loss_acc + loss_sum, count_acc + count

    holds_token_A = jnp.any(batch["attention_mask"] != 0, axis=(1, 2))
    num_micro = jnp.max(jnp.where(holds_token_A, jnp.arange(1, holds_token_A.shape[0] + 1), 0))
    init = (params, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    _, loss_sum, count = jax.lax.fori_loop(0, num_micro, accumulate, init)
    return {"loss_sum": loss_sum, "num_tokens": count}


def make_eval_step(graphdef, *, batch_sharding=None):
    """``eval_step`` jitted (parameters are not donated: evaluation leaves them as they are)."""
    kwargs: dict[str, Any] = {}
    if batch_sharding is not None:
        kwargs = {"in_shardings": (None, batch_sharding)}
    return jax.jit(functools.partial(eval_step, graphdef=graphdef), **kwargs)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule=None, *, state_sharding=None,
                    batch_sharding=None):
    """``train_step`` with its static pieces bound and jitted: the one ``jax.jit`` of training.

    The state is donated: its buffers are reused for the new state, so the caller must not touch the
    state it passed in (``TrainState.create`` does not copy ``params``). Shardings, when given, pin the
    state and batch layout; the metrics are left to the compiler.
    """
    step_fn = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule)
    kwargs: dict[str, Any] = {}
    if state_sharding is not None or batch_sharding is not None:
        kwargs = {"in_shardings": (state_sharding, batch_sharding), "out_shardings": (state_sharding, None)}
    return jax.jit(step_fn, donate_argnums=0, **kwargs)


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class CompileCount:
    count: int = 0


@contextlib.contextmanager
def count_compilations(fun_name: str | None = "train_step"):
    """Count XLA compilations inside the block, of functions whose name contains ``fun_name``.

    ``fun_name=None`` counts every compilation (eager ops included). Usage::

        with count_compilations() as compiles:
            ...
        assert compiles.count == 1
    """
    counter = CompileCount()

    def listener(event: str, duration: float, **kwargs):
        del duration
        if event == _COMPILE_EVENT and (fun_name is None or fun_name in str(kwargs.get("fun_name", ""))):
            counter.count += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
