"""The pure core of training: ``TrainState``, ``train_step`` and its one ``jax.jit``, ``eval_step``.

A batch is one optimizer update: ``input_ids``, ``attention_mask`` and ``labels``, int32, each
``[A, M, T]`` — ``A`` micro-batches of ``M`` rows of ``T`` tokens, either one padded sample per row
(``data.collate``: a 0/1 mask) or several samples packed per row (``packing.pack_update``: segment ids
1, 2, ... in the mask, positions restart per segment). The gradient of the *summed* token loss is
accumulated over the ``A`` axis in a loop that stops after the last micro-batch holding a token (so
all-padding micro-batches at the end cost nothing and the step's shape need not follow the data) and
divided once by the number of label tokens, so the update is the same however the samples are split
into micro-batches and rows. The loss is ``itersft_jax.core.loss.causal_lm_loss`` on the model's hidden states
(the LM head applied in chunks, never ``[N, V]`` logits).

An update whose loss or gradient norm is not finite is skipped inside the step: the returned state keeps
the old parameters, optimizer state and step counter (bit for bit) and the metrics say ``skipped=1``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from itersft_jax.core.loss import causal_lm_loss, check_loss_options
from itersft_jax.core.rl_losses import datum_loss
from itersft_jax.models.attention.masks import positions_from_segments
from itersft_jax.models.lora import dropout_rng
from itersft_jax.models.moe import Stats, collect_router_stats, load_balancing_loss
from itersft_jax.shared.data import IGNORE_INDEX
from itersft_jax.shared.datum import LOGPROBS_ONLY


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (donated to the jitted step)."""

    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # the trained parameters (nnx.State or its pure dict): fp32 master weights (with LoRA: adapters)
    opt_state: Any
    rng: jax.Array  # for stochastic layers; per-step keys are fold_in(rng, step)
    frozen: Any = None  # parameters that are not trained (LoRA: the base model), merged with params; or None

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, seed: int = 0, frozen=None) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   rng=jax.random.key(seed), frozen=frozen)

    def model_state(self):
        """Every parameter of the model (trained and frozen), for ``nnx.merge(graphdef, ...)``."""
        return self.params if self.frozen is None else nnx.merge_state(self.frozen, self.params)


def state_shardings(state: TrainState, mesh) -> tuple[TrainState, Any]:
    """``(shardings of state, shardings of state.params)`` on ``mesh``: the parameters by the rule table of
    ``parallel.sharding``, the optimizer state's copies of them alike, counters and the key replicated.
    ``state`` may be abstract (``jax.eval_shape``)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from itersft_jax.parallel.sharding import param_shardings, tree_shardings

    replicated = NamedSharding(mesh, PartitionSpec())
    params = param_shardings(state.params, mesh)
    opt_state = tree_shardings(state.opt_state, state.params, params, mesh)
    frozen = None if state.frozen is None else param_shardings(state.frozen, mesh)
    return TrainState(step=replicated, params=params, opt_state=opt_state, rng=replicated, frozen=frozen), params


def _model_head(params, graphdef, input_ids_BT, attention_mask_BT, *, neftune=None, frozen=None, dropout_key=None,
                router_stats: bool = False):
    """Hidden states ``[B, T, D]``, the LM head and (``router_stats``, a MoE model) the micro-batch's router
    statistics (``models.moe.Stats``; else None) of one micro-batch.
    ``neftune``: ``None`` or ``(alpha, key)``, NEFTune noise on the input embeddings (training only);
    ``frozen``: the parameters not trained (merged with ``params``); ``dropout_key``: LoRA dropout (training)."""
    if frozen is not None:
        # Fresh Variables made here, inside the differentiated function: ones made at the loop's trace level
        # cannot be updated by the nnx.remat'd layers (gradient_checkpointing) run under value_and_grad.
        frozen = jax.tree.map(lambda x: x, frozen)
    model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
    positions_BT = positions_from_segments(attention_mask_BT)

    def forward(m):
        return m.hidden_states(input_ids_BT, positions_BT, attention_mask_BT, neftune=neftune)[0]

    with dropout_rng(dropout_key):
        h_BTD, stats = collect_router_stats(model, forward) if router_stats else (forward(model), None)
    return h_BTD, model.head(), stats


class Balance(NamedTuple):
    """The MoE load-balancing loss of one update (or low-level pass), added to its summed loss.

    ``coef``: ``router_aux_loss_coef``; ``scale``: the summed loss's divisor (the update's label tokens for
    ``step()``, 1 for the low-level API's sums), so the update's loss is ``mean CE + coef * aux`` as in
    transformers; ``counts_E``, ``tokens``: the whole update's top-k assignments and real tokens x sparse layers
    (``router_totals``) — each micro-batch adds its probabilities' share, so the sum over micro-batches is the
    update's loss whatever the split; ``own``: one micro-batch holds every token (its own counts are the
    update's: no first pass)."""

    coef: float
    scale: jax.Array
    counts_E: jax.Array
    tokens: jax.Array
    own: jax.Array

    def share(self, stats: Stats) -> jax.Array:
        """This micro-batch's share of the update's (unscaled) load-balancing loss."""
        counts_E = jnp.where(self.own, stats.counts_E, self.counts_E)
        return load_balancing_loss(stats, counts_E, jnp.where(self.own, stats.tokens, self.tokens))


def _summed_loss(params, micro, *, graphdef, label_smoothing=0.0, chunk_size=None, balance: Balance | None = None,
                 **model_kwargs):
    """Summed token loss of one micro-batch of ``step()`` (HF labels) and ``(label-token count, None)`` — with
    ``balance``, the load-balancing share added and the count ``{"tokens", "aux_loss"}``."""
    h_BTD, head, stats = _model_head(params, graphdef, micro["input_ids"], micro["attention_mask"],
                                     router_stats=balance is not None, **model_kwargs)
    loss, count = causal_lm_loss(h_BTD, head, micro["labels"], label_smoothing=label_smoothing, chunk_size=chunk_size)
    loss, count = _balanced(loss, count, stats, balance)
    return loss, (count, None)


def _summed_datum_loss(params, micro, *, graphdef, loss_fn, config, chunk_size=None, balance: Balance | None = None,
                       **model_kwargs):
    """Summed loss of one packed micro-batch of ``Datum`` s and ``(target-token count, logprobs [M, T])`` (with
    ``balance`` as ``_summed_loss``)."""
    h_BTD, head, stats = _model_head(params, graphdef, micro["input_ids"], micro["attention_mask"],
                                     router_stats=balance is not None, **model_kwargs)
    loss, count, logp_BT = datum_loss(h_BTD, head, micro, loss_fn=loss_fn, config=config, chunk_size=chunk_size)
    loss, count = _balanced(loss, count, stats, balance)
    return loss, (count, logp_BT)


def _balanced(loss, count, stats, balance: Balance | None):
    """``(loss, count)`` with the load-balancing share added (``balance``): the count becomes ``{"tokens",
    "aux_loss"}``."""
    if balance is None:
        return loss, count
    aux = balance.share(stats)
    return loss + balance.coef * balance.scale * aux, {"tokens": count, "aux_loss": aux}


def load_balance(graphdef, state: TrainState) -> float | None:
    """``router_aux_loss_coef`` of a MoE model whose load-balancing loss is on (``output_router_logits``), else
    None (read from the static model at trace time)."""
    model = nnx.merge(graphdef, state.model_state())
    moe = getattr(getattr(model, "spec", None), "moe", None)
    return None if moe is None else moe.aux_loss_coef


def router_totals(state: TrainState, batch: dict[str, jax.Array], *, graphdef, skip_single: bool = True,
                  neftune_alpha: float | None = None, lora_dropout: bool = False, key_offset=None):
    """``(counts_E, tokens, own)``: the top-k assignments and real tokens (x sparse layers) of the whole batch, by a
    forward pass over its micro-batches that hold tokens (the same noise and dropout as the gradient loop's, so
    the same routing). ``own``: only one micro-batch holds tokens — with ``skip_single`` the pass is then skipped
    (zeros), that micro-batch counting its own."""
    used = _micro_batches_holding_tokens(batch)
    own = used <= 1

    def micro_stats(params, micro, **model_kwargs):
        _, _, stats = _model_head(params, graphdef, micro["input_ids"], micro["attention_mask"], router_stats=True,
                                  **model_kwargs)
        return jnp.zeros((), jnp.float32), ((jax.lax.stop_gradient(stats.counts_E), stats.tokens), None)

    zero = jnp.zeros((), jnp.float32)
    count_init = (jnp.zeros((_num_experts(graphdef, state),), jnp.float32), zero)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    _, _, (counts_E, tokens), _ = accumulate(
        state, inputs, micro_stats, backward=False, count_init=count_init, neftune_alpha=neftune_alpha,
        lora_dropout=lora_dropout, key_offset=key_offset, stop=jnp.where(own, 0, used) if skip_single else used)
    return counts_E, tokens, own


def _num_experts(graphdef, state: TrainState) -> int:
    return nnx.merge(graphdef, state.model_state()).spec.moe.num_experts


def _micro_keys(state: TrainState, i, key_offset, neftune_alpha, lora_dropout):
    """Micro-batch ``i``'s NEFTune ``(alpha, key)`` and LoRA dropout key (each None when off)."""
    if not (neftune_alpha or lora_dropout):
        return None, None
    micro_key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                                   i if key_offset is None else i + key_offset)
    neftune = (neftune_alpha, micro_key) if neftune_alpha else None
    dropout_key = jax.random.fold_in(micro_key, _LORA_DROPOUT_STREAM) if lora_dropout else None
    return neftune, dropout_key


def accumulate(state: TrainState, batch: dict[str, jax.Array], micro_loss, *, backward: bool = True, grads=None,
               neftune_alpha: float | None = None, lora_dropout: bool = False, grad_sharding=None,
               key_offset=None, per_token: bool = False, count_init=None, stop=None):
    """``(summed gradients or None, summed loss, token count, per-token output [A, M, T] or None)`` of ``batch``:
    the one loop over micro-batches of training, evaluation and the low-level passes.

    ``micro_loss(params, micro, neftune=, frozen=, dropout_key=) -> (loss_sum, (count, per_token_BT))``, the
    micro-batch's loss. The loop runs over the micro-batches up to the last one holding a token (``stop``: another
    bound), so all-padding micro-batches at the end cost nothing. ``backward``: its gradient is summed in fp32,
    starting from ``grads`` (an accumulator like ``state.params``; zeros when None). Micro-batch ``i``'s random keys
    are ``fold_in(fold_in(state.rng, state.step), i [+ key_offset])`` (noise and dropout only with ``backward``
    or when asked): ``key_offset`` numbers the micro-batches of several calls accumulating into one update.
    ``grad_sharding`` pins the accumulator (see ``train_step``). ``count`` may be a pytree of scalars (summed leaf
    by leaf from ``count_init``, default a scalar zero). Without ``backward`` the parameters ride in the loop's
    carry: a model merged from values closed over from outside the loop cannot run nnx.remat'd layers
    (gradient_checkpointing) in it.
    """

    def pin(grads):
        return grads if grad_sharding is None else jax.lax.with_sharding_constraint(grads, grad_sharding)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)  # d(loss_sum); the token count rides along

    def run(i, carry):
        # With backward the parameters are arguments of grad_fn, closed over; without, they ride in the carry.
        head, (loss_acc, count_acc, per_token_acc) = carry
        params, frozen = (state.params, state.frozen) if backward else head
        micro = {k: jax.lax.dynamic_index_in_dim(v, i, keepdims=False) for k, v in batch.items()}
        neftune, dropout_key = _micro_keys(state, i, key_offset, neftune_alpha, lora_dropout)
        kwargs = dict(frozen=frozen, neftune=neftune, dropout_key=dropout_key)
        if backward:
            (loss_sum, (count, out_BT)), grads = grad_fn(params, micro, **kwargs)
            head = pin(jax.tree.map(jnp.add, head, pin(grads)))
        else:
            loss_sum, (count, out_BT) = micro_loss(params, micro, **kwargs)
        if per_token:
            per_token_acc = jax.lax.dynamic_update_index_in_dim(per_token_acc, out_BT, i, 0)
        return head, (loss_acc + loss_sum, jax.tree.map(jnp.add, count_acc, count), per_token_acc)

    if backward and grads is None:
        grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    per_token_init = jnp.zeros(batch["input_ids"].shape, jnp.float32) if per_token else None
    count_init = jnp.zeros((), jnp.float32) if count_init is None else count_init
    head = pin(grads) if backward else (state.params, state.frozen)
    stop = _micro_batches_holding_tokens(batch) if stop is None else stop
    head, sums = jax.lax.fori_loop(0, stop, run, (head, (jnp.zeros((), jnp.float32), count_init, per_token_init)))
    return (head if backward else None, *sums)


def apply_gradients(state: TrainState, grads, loss_sum, count, denom, *, tx: optax.GradientTransformation,
                    schedule=None) -> tuple[TrainState, dict[str, jax.Array]]:
    """The optimizer update of summed ``grads`` divided by ``denom``, skipped when ``loss_sum`` or the gradient
    norm is not finite. Metrics: ``loss`` (``loss_sum / denom``), ``grad_norm``, ``learning_rate``, ``num_tokens``,
    ``skipped`` (see ``train_step``)."""
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    grad_norm = optax.tree.norm(grads)

    # Non-finite guard, no host sync: a NaN/inf update would poison every parameter and Adam moment for good,
    # so it is skipped (state returned as it came). A cond, not a select per leaf: selecting between the new
    # and old optimizer state made XLA copy the old Adam moments before updating them in place (+2x the
    # vocab-sized moments of temporary memory at vocab 128k); the branch costs nothing on the normal path.
    finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)

    def apply_update(params, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, apply_update, lambda p, o: (p, o), state.params, state.opt_state)
    lr = schedule(state.step) if schedule is not None else jnp.float32(jnp.nan)
    metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm,
               "learning_rate": jnp.asarray(lr, jnp.float32), "num_tokens": count.astype(jnp.int32),
               "skipped": 1 - finite.astype(jnp.int32)}
    new_state = dataclasses.replace(state, step=state.step + finite.astype(state.step.dtype), params=params,
                                    opt_state=opt_state)
    return new_state, metrics


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef, tx: optax.GradientTransformation,
               schedule=None, label_smoothing: float = 0.0, loss_chunk_size: int | None = None,
               neftune_alpha: float | None = None, grad_sharding=None,
               lora_dropout: bool = False) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from ``batch`` (``[A, M, T]`` arrays); pure, jitted by ``make_train_step``.

    ``accumulate`` (with ``backward``) of the summed token cross-entropy, then ``apply_gradients`` divided once by the
    label-token count: the low-level API's cross_entropy with token-weighted weights + optim_step, in one jit.
    Metrics: ``loss`` (mean token cross-entropy of the update, label-smoothed with ``label_smoothing``),
    ``grad_norm`` (global norm before clipping), ``learning_rate`` (``schedule(state.step)``, NaN without a
    schedule), ``num_tokens``, ``skipped`` (int32: 1 when the loss or the gradient norm was not finite and
    the state was returned unchanged). ``neftune_alpha``: NEFTune's noise on the input embeddings, drawn from
    ``fold_in(fold_in(state.rng, state.step), micro_batch)`` (a skipped update redraws with the same key).
    ``grad_sharding``: shardings like ``state.params`` (``parallel.sharding.param_shardings``) that pin the fp32
    gradient accumulator, so each device sums only the gradient slices of the parameters it holds.
    Gradients are taken for ``state.params`` only; ``state.frozen`` (LoRA's base) rides along unchanged.
    ``lora_dropout``: the model's adapters have dropout, keyed like NEFTune's noise (another stream).
    """
    micro_batches = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    noise = dict(neftune_alpha=neftune_alpha, lora_dropout=lora_dropout)
    balance, count_init = None, None
    coef = load_balance(graphdef, state)
    if coef is not None:  # MoE with output_router_logits: the load-balancing loss of the whole update
        # The label-token count is known before the loop (the division below uses the same count).
        scale = jnp.maximum(jnp.sum(micro_batches["labels"][..., 1:] != IGNORE_INDEX).astype(jnp.float32), 1.0)
        balance = Balance(coef, scale, *router_totals(state, micro_batches, graphdef=graphdef, **noise))
        count_init = {"tokens": jnp.zeros((), jnp.float32), "aux_loss": jnp.zeros((), jnp.float32)}
    loss_fn = functools.partial(_summed_loss, graphdef=graphdef, label_smoothing=label_smoothing,
                                chunk_size=loss_chunk_size, balance=balance)
    grads, loss_sum, count, _ = accumulate(state, micro_batches, loss_fn, grad_sharding=grad_sharding,
                                           count_init=count_init, **noise)
    aux = None if balance is None else count["aux_loss"]
    count = count if balance is None else count["tokens"]
    # One division for the whole update: token-weighted, whatever the micro-batch split. An update with
    # no label tokens has loss 0 and zero gradients instead of NaN.
    new_state, metrics = apply_gradients(state, grads, loss_sum, count, jnp.maximum(count, 1.0), tx=tx,
                                         schedule=schedule)
    return new_state, metrics if aux is None else {**metrics, "aux_loss": aux}


_LORA_DROPOUT_STREAM = 0x10A  # folded into a micro-batch's key: LoRA dropout masks apart from NEFTune's noise


# ----------------------------------------------------------------------------------------------------------
# The low-level API's pieces: forward_backward accumulates, optim_step applies (train_step = both, in one jit)


def forward_backward_step(state: TrainState, grads, batch: dict[str, jax.Array], key_offset, *, graphdef,
                          loss_fn: str, config: tuple, loss_chunk_size: int | None = None,
                          neftune_alpha: float | None = None, grad_sharding=None, lora_dropout: bool = False):
    """``(grads + the gradient of the summed loss over batch, outputs)`` for a packed batch of ``Datum`` s
    (``packing.pack_data``): the same gradient loop as ``train_step``, with ``rl_losses.datum_loss``. Outputs:
    ``loss_sum``, ``num_tokens`` (target positions), ``logprobs`` ``[A, M, T]`` (each position's target); a MoE
    model with ``output_router_logits`` adds ``router_aux_loss_coef`` times the batch's load-balancing loss to the
    sum (``aux_loss``, unscaled, among the outputs)."""
    noise = dict(neftune_alpha=neftune_alpha, lora_dropout=lora_dropout)
    balance, count_init = _datum_balance(state, batch, graphdef, loss_fn, key_offset=key_offset, **noise)
    micro_loss = functools.partial(_summed_datum_loss, graphdef=graphdef, loss_fn=loss_fn, config=config,
                                   chunk_size=loss_chunk_size, balance=balance)
    grads, loss_sum, count, logp = accumulate(
        state, batch, micro_loss, grads=grads, grad_sharding=grad_sharding, key_offset=key_offset, per_token=True,
        count_init=count_init, **noise)
    if balance is None:
        return grads, {"loss_sum": loss_sum, "num_tokens": count, "logprobs": logp}
    return grads, {"loss_sum": loss_sum, "num_tokens": count["tokens"], "logprobs": logp,
                   "aux_loss": count["aux_loss"]}


def _datum_balance(state, batch, graphdef, loss_fn: str, **keys):
    """The low-level passes' ``Balance`` (scale 1: their losses are sums) and count init, or ``(None, None)``
    (a dense model, the load-balancing loss off, or a logprobs-only pass)."""
    coef = None if loss_fn == LOGPROBS_ONLY else load_balance(graphdef, state)
    if coef is None:
        return None, None
    balance = Balance(coef, jnp.float32(1.0), *router_totals(state, batch, graphdef=graphdef, **keys))
    return balance, {"tokens": jnp.zeros((), jnp.float32), "aux_loss": jnp.zeros((), jnp.float32)}


def forward_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef, loss_fn: str, config: tuple,
                 loss_chunk_size: int | None = None) -> dict[str, jax.Array]:
    """``forward_backward_step``'s outputs without gradients (no noise, no dropout), parameters unchanged."""
    balance, count_init = _datum_balance(state, batch, graphdef, loss_fn)
    micro_loss = functools.partial(_summed_datum_loss, graphdef=graphdef, loss_fn=loss_fn, config=config,
                                   chunk_size=loss_chunk_size, balance=balance)
    _, loss_sum, count, logp = accumulate(state, batch, micro_loss, backward=False, per_token=True,
                                          count_init=count_init)
    if balance is None:
        return {"loss_sum": loss_sum, "num_tokens": count, "logprobs": logp}
    return {"loss_sum": loss_sum, "num_tokens": count["tokens"], "logprobs": logp, "aux_loss": count["aux_loss"]}


def optim_step(state: TrainState, grads, loss_sum, count, *, tx: optax.GradientTransformation, schedule=None):
    """``apply_gradients`` of accumulated (summed, not normalised) gradients: the low-level API's update."""
    return apply_gradients(state, grads, loss_sum, count, jnp.float32(1.0), tx=tx, schedule=schedule)


class LowLevelSteps:
    """The jitted pieces of the low-level API, built like ``make_train_step`` (same shardings, same loss options):
    ``forward_backward(loss_fn, config)`` and ``forward(loss_fn, config)`` (one jit per loss, cached),
    ``optim_step`` (state donated; LoRA's frozen base passed beside it, never donated) and
    ``zeros`` (a fresh accumulator, sharded like the gradients)."""

    def __init__(self, graphdef, tx, schedule=None, *, state_sharding=None, batch_sharding=None, grad_sharding=None,
                 loss_chunk_size: int | None = None, neftune_alpha: float | None = None, lora_dropout: bool = False):
        self._graphdef, self._tx, self._schedule = graphdef, tx, schedule
        self._state_sharding, self._batch_sharding, self._grad_sharding = state_sharding, batch_sharding, grad_sharding
        self._options = dict(loss_chunk_size=loss_chunk_size)
        self._train_options = dict(neftune_alpha=neftune_alpha, lora_dropout=lora_dropout, grad_sharding=grad_sharding)
        self._jits: dict = {}

    def _replicated(self):
        from jax.sharding import NamedSharding, PartitionSpec

        return None if self._state_sharding is None else NamedSharding(self._state_sharding.step.mesh,
                                                                        PartitionSpec())

    def _jitted(self, key, fn, shardings, donate=()):
        """``fn`` jitted once per ``key``; ``shardings()``: its (in, out) shardings when the state has them."""
        if key not in self._jits:
            kwargs = {} if self._state_sharding is None else dict(zip(("in_shardings", "out_shardings"), shardings()))
            self._jits[key] = jax.jit(fn, donate_argnums=donate, **kwargs)
        return self._jits[key]

    def forward_backward(self, loss_fn: str, config: tuple):
        fn = functools.partial(forward_backward_step, graphdef=self._graphdef, loss_fn=loss_fn, config=config,
                               **self._options, **self._train_options)
        return self._jitted(("forward_backward", loss_fn, config), fn, lambda: (
            (self._state_sharding, self._grad_sharding, self._batch_sharding, self._replicated()),
            (self._grad_sharding, self._replicated())), donate=1)

    def forward(self, loss_fn: str, config: tuple):
        fn = functools.partial(forward_step, graphdef=self._graphdef, loss_fn=loss_fn, config=config, **self._options)
        return self._jitted(("forward", loss_fn, config), fn, lambda: (
            (self._state_sharding, self._batch_sharding), self._replicated()))

    def optim_step(self, state: TrainState, grads, loss_sum, count):
        if "optim_step" not in self._jits:
            fn = functools.partial(optim_step, tx=self._tx, schedule=self._schedule)
            replicated = self._replicated()
            self._jits["optim_step"] = FrozenApart(fn, self._state_sharding,
                                                   (self._grad_sharding, replicated, replicated), replicated)
        return self._jits["optim_step"](state, grads, jnp.float32(loss_sum), jnp.float32(count))

    def copy(self, grads):
        """A copy of an accumulator (in new buffers, sharded alike): what a pass may donate while the original
        stays intact until the pass has succeeded."""
        return self._jitted("copy", lambda tree: jax.tree.map(jnp.copy, tree),
                            lambda: ((self._grad_sharding,), self._grad_sharding))(grads)

    def zeros(self, params):
        def zeros_like(tree):
            return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)

        return self._jitted("zeros", zeros_like, lambda: (None, self._grad_sharding))(params)


def eval_step(params, batch: dict[str, jax.Array], *, graphdef, label_smoothing: float = 0.0,
              loss_chunk_size: int | None = None) -> dict[str, jax.Array]:
    """Summed token cross-entropy and label-token count of ``batch`` (``[A, M, T]``), no update."""
    loss_fn = functools.partial(_summed_loss, graphdef=graphdef, label_smoothing=label_smoothing,
                                chunk_size=loss_chunk_size)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None, rng=None)
    micro_batches = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    _, loss_sum, count, _ = accumulate(state, micro_batches, loss_fn, backward=False)
    return {"loss_sum": loss_sum, "num_tokens": count}


def _micro_batches_holding_tokens(batch: dict[str, jax.Array]) -> jax.Array:
    """Micro-batches up to the last one holding a token: the ones after it are padding, never run."""
    holds_token_A = jnp.any(batch["attention_mask"] != 0, axis=(1, 2))
    return jnp.max(jnp.where(holds_token_A, jnp.arange(1, holds_token_A.shape[0] + 1), 0))


def make_eval_step(graphdef, *, batch_sharding=None, label_smoothing: float = 0.0,
                   loss_chunk_size: int | None = None):
    """``eval_step`` jitted (parameters are not donated: evaluation leaves them as they are)."""
    check_loss_options(label_smoothing, loss_chunk_size)
    kwargs: dict[str, Any] = {}
    if batch_sharding is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())  # readable on every host
        kwargs = {"in_shardings": (None, batch_sharding), "out_shardings": replicated}
    step_fn = functools.partial(eval_step, graphdef=graphdef, label_smoothing=label_smoothing,
                                loss_chunk_size=loss_chunk_size)
    return jax.jit(step_fn, **kwargs)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule=None, *, state_sharding=None,
                    batch_sharding=None, label_smoothing: float = 0.0, loss_chunk_size: int | None = None,
                    neftune_alpha: float | None = None, grad_sharding=None, lora_dropout: bool = False):
    """``train_step`` with its static pieces bound and jitted: the one ``jax.jit`` of training.

    The state is donated: its buffers are reused for the new state, so the caller must not touch the
    state it passed in (``TrainState.create`` does not copy ``params``). Shardings, when given, pin the
    state, batch and gradient-accumulator layout, and the metrics come back replicated (readable on every
    host); a state with ``frozen`` parameters (LoRA) passes them beside the donated rest (``FrozenApart``).
    ``label_smoothing`` and ``loss_chunk_size`` go to ``loss.causal_lm_loss`` (checked here, before any step
    runs); ``neftune_alpha`` (``neftune_noise_alpha``) adds NEFTune's noise to the input embeddings of training
    steps only.
    """
    check_loss_options(label_smoothing, loss_chunk_size)
    if neftune_alpha is not None and not (math.isfinite(neftune_alpha) and neftune_alpha >= 0):
        raise ValueError(f"`neftune_noise_alpha` must be a finite number >= 0, got {neftune_alpha}")
    step_fn = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                                label_smoothing=label_smoothing, loss_chunk_size=loss_chunk_size,
                                neftune_alpha=neftune_alpha, grad_sharding=grad_sharding, lora_dropout=lora_dropout)
    kwargs: dict[str, Any] = {}
    if state_sharding is not None or batch_sharding is not None:
        metrics = None if state_sharding is None else state_sharding.step  # replicated: readable on every host
        kwargs = {"in_shardings": (state_sharding, batch_sharding), "out_shardings": (state_sharding, metrics)}
    if state_sharding is None or state_sharding.frozen is None:
        return jax.jit(step_fn, donate_argnums=0, **kwargs)
    return FrozenApart(step_fn, state_sharding, (batch_sharding,), state_sharding.step)


class FrozenApart:
    """``fn(state, *rest) -> (state, out)`` jitted with the state donated, except its ``frozen`` parameters (LoRA's
    base): those travel as a separate argument that is neither donated nor returned, so XLA never copies or rewrites
    the base — the one home of that split (``train_step`` with LoRA, the low-level ``optim_step``). Without
    ``state_sharding`` no shardings are pinned; ``rest_shardings`` / ``out_sharding``: those of ``rest`` and
    ``out``."""

    def __init__(self, fn, state_sharding: TrainState | None, rest_shardings: tuple = (), out_sharding=None):
        def split_fn(state, frozen, *rest):
            new_state, out = fn(dataclasses.replace(state, frozen=frozen), *rest)
            return dataclasses.replace(new_state, frozen=None), out

        kwargs: dict[str, Any] = {}
        if state_sharding is not None:
            trained = dataclasses.replace(state_sharding, frozen=None)
            kwargs = {"in_shardings": (trained, state_sharding.frozen, *rest_shardings),
                      "out_shardings": (trained, out_sharding)}
        split_fn.__name__ = getattr(getattr(fn, "func", fn), "__name__", "split_fn")  # compilations named like fn
        self._jitted = jax.jit(split_fn, donate_argnums=0, **kwargs)

    def __call__(self, state: TrainState, *rest):
        new_state, out = self._jitted(dataclasses.replace(state, frozen=None), state.frozen, *rest)
        return dataclasses.replace(new_state, frozen=state.frozen), out

    def lower(self, state: TrainState, *rest):
        return self._jitted.lower(dataclasses.replace(state, frozen=None), state.frozen, *rest)


# ----------------------------------------------------------------------------------------------------------
# The trainer's other jits: the sharded state's creation, evaluation logits, a custom loss's value and gradient


def create_sharded_state(params, frozen, tx: optax.GradientTransformation, seed: int, mesh):
    """``(train state, its shardings, the params' shardings)``: the parameters (and the frozen ones) moved to
    their slices of the mesh, then the optimizer state created in place by one jitted init whose outputs are
    sharded alike (no device ever holds a whole copy of the optimizer state)."""
    def create(p, f):
        return TrainState.create(p, tx, seed=seed, frozen=f)

    shardings, param_sharding = state_shardings(jax.eval_shape(create, params, frozen), mesh)
    params, frozen = jax.device_put((params, frozen), (param_sharding, shardings.frozen))
    state = jax.jit(create, out_shardings=shardings, donate_argnums=(0, 1))(params, frozen)
    return state, shardings, param_sharding


def make_logits_fn(graphdef):
    """``logits_fn(params, input_ids_BT, mask_BT) -> logits [B, T, V]`` jitted (evaluate()'s ``compute_metrics``)."""
    def logits_fn(params, input_ids_BT, mask_BT):
        model = nnx.merge(graphdef, params)
        return model(input_ids_BT, positions_from_segments(mask_BT), mask_BT)[0]

    return jax.jit(logits_fn)


def jit_value_and_grad(fn):
    """``fn(logprobs, inputs) -> (loss, metrics)``'s value and gradient, jitted (``forward_backward_custom``)."""
    return jax.jit(jax.value_and_grad(fn, has_aux=True))
