"""The continuous-batching engine behind ``generate()``: one prefill per distinct prompt, a fixed set of decode
slots refilled as rows end, the host touching the device once per chunk of decode steps.

Design (JetStream's ``prefill`` / ``insert`` / ``generate``, with the params an argument of every call, so it
samples from the trainer's live parameters):

* **Rows.** ``prompts x num_return_sequences`` rows wait in prompt-major order. Each distinct prompt is
  prefilled once (``sampler_prefill``, a batch of prompts left-padded to a prompt bucket); its KV and its
  last-position logits stay on the device until its n rows are inserted.
* **Slots.** A decode state of ``B`` slots holds, per layer, keys/values ``[B, K, L, H]`` in the compute dtype
  and each slot's next-token logits ``[B, V]`` (fp32), with a ``[B, V]`` mask of the tokens its row holds (prompt
  and generated: ``repetition_penalty``). Every slot's tokens are *right-aligned* at one shared
  write index ``g``: a slot whose row holds ``n`` tokens (prompt + generated) owns cache slots
  ``[g - n, g)``; a per-slot ``start`` masks everything before, so the model's attention (one shared cache
  index) serves rows of any length and age. ``sampler_insert`` copies a prefilled prompt's KV into a free
  slot at ``[g - P, g)`` and its logits into the slot's logits.
* **A prompt held once for its rows** (``share_prompts``; by default when ``num_return_sequences > 1`` and the
  longest prompt has >= ``SHARE_MIN_PROMPT`` = 128 tokens, without a mesh, for models without sliding-window
  layers: short prompts save little and would add pool shapes to compile). The state also holds a pool of
  ``G`` prompt groups,
  ``pk`` / ``pv`` ``[G, K, P, H]`` per layer and ``pmask [G, P]`` (``G = batch_bucket(min(distinct prompts,
  B))``, ``P`` the bucket of the call's longest prompt); ``sampler_insert_prompts`` copies a prefilled prompt's
  KV into a free group when its first row goes in, and the group is freed when its last row (identical
  prompts' rows included) ends. A slot then holds only its row's generated tokens (``start = g - gen``), and
  the decode attention reads each row's group prefix and its own tokens, merged by log-sum-exp
  (``models/attention/shared_prefix.py``, through ``KVCache.prefix_k``). Tokens identical to the per-slot
  layout for a fixed seed, logprobs within 1e-6 (tested).
* **Chunks.** ``sampler_chunk`` runs up to ``CHUNK_STEPS`` decode steps in one ``lax.while_loop``: sample
  every slot's token from its logits, record it, feed it, repeat; it returns early once ``refill_at`` rows have
  ended (so a freed slot does not idle long while rows wait) or every row has ended. The host then collects
  the chunk's tokens (one transfer), frees ended slots, prefills/inserts waiting rows, and calls again.
* **Cache length follows the live rows.** Before a chunk, if the write index would run past the cache (or the
  cache could shrink a bucket), ``sampler_relayout`` moves every slot left by the same shift so that
  ``g`` = the longest live row (rows stay right-aligned), in a cache of ``L = bucket(g + CHUNK_STEPS)``
  slots. Decode attention therefore reads ``L`` keys per slot — a bucket above the longest *live* row plus
  one chunk — never the ``prompt + max_new_tokens`` bucket of the whole call. When no row waits any more
  and at most half the slots are live, the live slots are gathered into a power-of-two slot count, so the
  draining tail does not decode empty slots and compiles only a few shapes.

Ladders (every sampling setting, EOS list, ``max_new_tokens`` and seed is a run-time value):

* slots ``B``: ``batch_bucket`` of the call's rows (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), at most
  ``num_slots`` (64 by default); the draining tail: powers of two; under a mesh rounded up to a multiple of
  data x fsdp;
* prompts per prefill ``Bp``: one per call, ``batch_bucket(min(PREFILL_PROMPTS, distinct prompts))``, the
  batch filled with the next waiting prompts; prompt ``P``: ``bucket_length`` (16, 24, 32, 48, ...);
* cache ``L``: ``bucket_length`` of ``g + CHUNK_STEPS``.

The model compiles once per (Bp, P) for ``sampler_prefill`` and once per (B, L, G, P) for ``sampler_chunk`` (G,
P = 0 without sharing; ``stats["chunk_shapes"]``); the
copies (``sampler_insert`` per (B, L, Bp, P), ``sampler_relayout`` per (B0, B, L0, L), ``sampler_empty``
per (B, L)) compile in milliseconds. ``tests/test_sampler.py`` runs 30 varied calls and checks the counts
against the shapes used and those shapes against the ladders.

Randomness: a row's draw at its ``t``-th new token uses ``fold_in(seed, prompt key, sample index, t)``,
where the prompt key is a hash of the prompt's tokens and how many identical prompts precede it in the call.
So a row's tokens do not depend on which rows ran beside it, in which slot, or in what order (tested).

Logprobs: each generated token's ``log softmax(logits)[token]`` at temperature 1, in fp32, from the decode
step's logits (``head_logits(..., keep_fp32=True)``: the same product and soft-cap as
``core.loss.token_logprobs``). They are the model's probabilities, not those of the distribution the token
was drawn from: with temperature ``T``, top-k or top-p, the sampling distribution is
``softmax(logits / T)`` restricted to the kept set and renormalised; the returned value is
``log softmax(logits)``, what the training forward computes (the behaviour policy's logprob an RL loss
needs when it treats the model at temperature 1 as the policy).

Memory: ``stats["kv_bytes_peak"]`` is the largest decode state held (keys + values, all layers, ``B x L``
slots and the prompt pool's ``G x P``, compute dtype); prefilled prompts waiting for a slot add ``Bp x P`` slots
each. ``stats["prompt_kv_bytes_peak"]``: the most bytes real prompt tokens held at once (per live slot without
sharing, per held group with it).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from itersft_jax.core.loss import token_logprobs
from itersft_jax.models.attention.masks import positions_from_mask
from itersft_jax.models.cache import KVCache
from itersft_jax.models.layers import head_logits
from itersft_jax.parallel import distributed
from itersft_jax.parallel.mesh import BATCH_AXES, data_parallel_size
from itersft_jax.sampler.sampling import batch_bucket, make_knobs, process_logits, sample_rows
from itersft_jax.shared.checks import check_bool
from itersft_jax.shared.data import bucket_length
from itersft_jax.shared.outputs import check_generation_args, check_logprob_args, id_rows
from itersft_jax.shared.stops import StopStrings, check_stop_strings

CHUNK_STEPS = 16  # decode steps per device call at most
NUM_SLOTS = 64  # decode slots at most (a multiple of data x fsdp under a mesh)
PREFILL_PROMPTS = 8  # distinct prompts per prefill call at most (the batch filled with the next waiting ones)
REFILL_FRACTION = 8  # a chunk returns once B / REFILL_FRACTION rows ended (and rows wait for their slots)
SHARE_MIN_PROMPT = 128  # share_prompts=None shares prompts from this length on (shorter: few bytes, more shapes)


def _constrain(x, mesh):
    """Slots (axis 0) split over data x fsdp under a mesh; a no-op without one."""
    if mesh is None:
        return x
    spec = PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _constrain_state(state: dict, mesh) -> dict:
    return jax.tree.map(lambda x: _constrain(x, mesh), state)


def _log_z(logits_BV):
    max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
    return max_B1 + jnp.log(jnp.sum(jnp.exp(logits_BV - max_B1), axis=-1, keepdims=True))


def token_log_prob(logits_BV, token_B):
    """``log softmax(logits)[token]`` in fp32, as ``token_logprobs`` computes it (max + log sum exp)."""
    return jnp.take_along_axis(logits_BV, token_B[:, None], axis=-1)[:, 0] - _log_z(logits_BV)[:, 0]


def top_log_probs(logits_BV, k: int):
    """The ``k`` largest ``log softmax(logits)`` entries of each row (fp32, descending) and their token ids."""
    values_BK, ids_BK = jax.lax.top_k(logits_BV, k)
    return values_BK - _log_z(logits_BV), ids_BK.astype(jnp.int32)


def top_logprobs_bucket(k: int) -> int:
    """``return_top_logprobs=k`` compiles the decode chunk for the next power of two (sliced on the host)."""
    return 1 << (k - 1).bit_length()


# ----------------------------------------------------------------------------------------------------------
# The jitted programs


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_logprobs"))
def sampler_prefill(params, input_ids_BP, mask_BP, *, graphdef, prompt_logprobs: bool = False):
    """Prompts (left-padded) -> their KV ``[Bp, K, P, H]`` per layer and last-position logits ``[Bp, V]`` fp32;
    with ``prompt_logprobs``, also ``prompt_logprobs [Bp, P - 1]``: position ``j``'s fp32 ``log p(token j + 1)``
    from the same hidden states (``core.loss.token_logprobs``: the head in chunks, no extra forward)."""
    model = nnx.merge(graphdef, params)
    batch, prompt_len = input_ids_BP.shape
    cache = model.init_cache(batch, prompt_len)
    h_BPD, cache = model.hidden_states(input_ids_BP, positions_from_mask(mask_BP), mask_BP, cache=cache)
    logits_BV = head_logits(model.head(), h_BPD[:, -1], keep_fp32=True)
    vocab = logits_BV.shape[-1]
    seen_BV = jnp.zeros((batch, vocab), bool).at[jnp.arange(batch)[:, None], jnp.where(mask_BP > 0, input_ids_BP, vocab)
                                                 ].set(True, mode="drop")  # the prompt's tokens (repetition penalty)
    out = {"k": cache.k, "v": cache.v, "logits": logits_BV, "seen": seen_BV, "mask": mask_BP}
    if prompt_logprobs:
        out["prompt_logprobs"] = token_logprobs(h_BPD[:, :-1], model.head(), input_ids_BP[:, 1:])
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "batch", "length", "mesh", "groups", "prompt_len"))
def sampler_empty(params, *, graphdef, batch: int, length: int, mesh, groups: int = 0, prompt_len: int = 0):
    """An empty decode state: ``batch`` slots of ``length`` cache slots, zero logits; with ``groups``, a pool of
    ``groups`` prompts of ``prompt_len`` slots each (``pk``, ``pv``, ``pmask``: the shared-prompt layout)."""
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(batch, length)
    head = model.head()
    vocab = head.weight.shape[0 if head.transposed else 1]
    state = _constrain_state({"k": cache.k, "v": cache.v, "logits": jnp.zeros((batch, vocab), jnp.float32),
                              "seen": jnp.zeros((batch, vocab), bool)}, mesh)
    if groups:
        pool = model.init_cache(groups, prompt_len)
        state.update(pk=pool.k, pv=pool.v, pmask=jnp.zeros((groups, prompt_len), jnp.int32))
    return state


@functools.partial(jax.jit, static_argnames=("length", "mesh"))
def sampler_relayout(state, rows_B, shift, *, length: int, mesh):
    """Slot ``b`` of the result is slot ``rows_B[b]`` of ``state`` moved ``shift`` cache slots left (right if
    negative) in a cache of ``length`` slots: ``new[b, :, s] = old[rows[b], :, s + shift]``, zeros outside."""
    def move(x_BKSH):
        x_BKSH = x_BKSH[rows_B]
        pad = jnp.zeros(x_BKSH.shape[:2] + (length,) + x_BKSH.shape[3:], x_BKSH.dtype)
        x_BKSH = jnp.concatenate([pad, x_BKSH, pad], axis=2)
        return jax.lax.dynamic_slice_in_dim(x_BKSH, length + shift, length, axis=2)

    moved = _constrain_state({"k": [move(x) for x in state["k"]], "v": [move(x) for x in state["v"]],
                              "logits": state["logits"][rows_B], "seen": state["seen"][rows_B]}, mesh)
    return {**state, **moved}  # a prompt pool (shared layout) stays as it is


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnums=(0,))
def sampler_insert(state, prefilled, src_B, dst_B, count, offset, *, mesh):
    """Copy prefilled prompt ``src_B[i]`` (KV and logits) into slot ``dst_B[i]`` at cache slots
    ``[offset, offset + P)`` for ``i < count`` (a run-time count: one program per shape, each copy in place)."""
    shared = "pk" in state  # the shared-prompt layout: the prompt's KV lives in the pool, not in the slot

    def one(i, state):
        src, dst = src_B[i], dst_B[i]

        def put(big_BKSH, small_BKPH):
            row = jax.lax.dynamic_index_in_dim(small_BKPH, src, keepdims=True).astype(big_BKSH.dtype)
            return jax.lax.dynamic_update_slice(big_BKSH, row, (dst, 0, offset, 0))

        def row(name):
            one = jax.lax.dynamic_index_in_dim(prefilled[name], src, keepdims=True)
            return jax.lax.dynamic_update_slice(state[name], one, (dst, 0))

        if shared:
            return dict(state, logits=row("logits"), seen=row("seen"))
        return {"k": [put(b, s) for b, s in zip(state["k"], prefilled["k"])],
                "v": [put(b, s) for b, s in zip(state["v"], prefilled["v"])],
                "logits": row("logits"), "seen": row("seen")}

    return _constrain_state(jax.lax.fori_loop(0, count, one, state), mesh)


@functools.partial(jax.jit, donate_argnums=(0,))
def sampler_insert_prompts(state, prefilled, src_G, dst_G, count):
    """The shared-prompt layout: copy prefilled prompt ``src_G[i]``'s KV and mask into pool group ``dst_G[i]``
    (right-aligned in the pool's ``P`` slots, the slots before it masked) for ``i < count``."""
    pool_len, plen = state["pmask"].shape[1], prefilled["mask"].shape[1]

    def one(i, state):
        src, dst = src_G[i], dst_G[i]

        def put(big_GKPH, small_BKPH):
            row = jax.lax.dynamic_index_in_dim(small_BKPH, src, keepdims=True).astype(big_GKPH.dtype)
            row = jnp.pad(row, ((0, 0), (0, 0), (pool_len - plen, 0), (0, 0)))
            return jax.lax.dynamic_update_slice(big_GKPH, row, (dst, 0, 0, 0))

        mask = jax.lax.dynamic_index_in_dim(prefilled["mask"], src, keepdims=True)
        mask = jnp.pad(mask, ((0, 0), (pool_len - plen, 0)))
        return dict(state, pk=[put(b, s) for b, s in zip(state["pk"], prefilled["k"])],
                    pv=[put(b, s) for b, s in zip(state["pv"], prefilled["v"])],
                    pmask=jax.lax.dynamic_update_slice(state["pmask"], mask.astype(jnp.int32), (dst, 0)))

    return jax.lax.fori_loop(0, count, one, state)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "top_logprobs"), donate_argnums=(1,))
def sampler_chunk(params, state, slots, index, key, knobs, refill_at, *, graphdef, mesh, top_logprobs: int = 0):
    """Up to ``CHUNK_STEPS`` decode steps for every slot.

    ``slots``: per-slot ``start`` (first cache slot of the row), ``prompt_len``, ``gen`` (tokens generated so
    far), ``live`` (holds a row), ``prompt_key`` / ``sample`` (the row's randomness), ``max_new``, ``group`` (its
    prompt's pool group, the shared layout: ``state["pk"]``); ``index``: the
    shared write index ``g``. A step samples each live row's token from its logits (key: seed, prompt key,
    sample, token index), records it and its fp32 logprob at temperature 1, ends the row at an EOS or its
    budget, then runs the model on the tokens (writing cache slot ``g + step``). Stops after ``CHUNK_STEPS``
    steps, when every row ended, or once ``refill_at`` rows ended in this chunk.

    ``top_logprobs`` (static): also each step's ``top_logprobs`` most likely tokens at temperature 1.

    Returns ``(state, tokens [B, C], logprobs [B, C], gen, done, steps, top [B, C, k] fp32, top_ids [B, C, k])``.
    """
    batch, length = state["k"][0].shape[0], state["k"][0].shape[2]
    mask_BL = (jnp.arange(length, dtype=jnp.int32)[None, :] >= slots["start"][:, None]).astype(jnp.int32)
    row_keys_B = jax.vmap(lambda p, s: jax.random.fold_in(jax.random.fold_in(key, p), s))(
        slots["prompt_key"], slots["sample"])
    done_B = ~slots["live"]
    carry = {"step": jnp.int32(0), "ended": jnp.int32(0), "params": params, "k": state["k"], "v": state["v"],
             "logits": state["logits"], "seen": state["seen"], "gen": slots["gen"], "done": done_B,
             "tokens": jnp.full((batch, CHUNK_STEPS), knobs["pad_id"], jnp.int32),
             "logprobs": jnp.zeros((batch, CHUNK_STEPS), jnp.float32),
             "top": jnp.zeros((batch, CHUNK_STEPS, top_logprobs), jnp.float32),
             "top_ids": jnp.zeros((batch, CHUNK_STEPS, top_logprobs), jnp.int32)}

    def cond(c):
        return (c["step"] < CHUNK_STEPS) & ~jnp.all(c["done"]) & (c["ended"] < refill_at)

    def body(c):
        active_B = ~c["done"]
        keys_B = jax.vmap(jax.random.fold_in)(row_keys_B, c["gen"])
        token_B = sample_rows(process_logits(c["logits"], c["seen"], c["gen"], knobs), keys_B, knobs)
        logprob_B = token_log_prob(c["logits"], token_B)  # the model's, before any processor or warper
        top = {}
        if top_logprobs:
            top_BK, top_ids_BK = top_log_probs(c["logits"], top_logprobs)
            top = {"top": c["top"].at[:, c["step"]].set(top_BK),
                   "top_ids": c["top_ids"].at[:, c["step"]].set(top_ids_BK)}
        token_B = jnp.where(active_B, token_B, knobs["pad_id"])
        seen_BV = c["seen"].at[jnp.arange(batch), token_B].max(active_B)
        gen_B = c["gen"] + active_B.astype(jnp.int32)
        is_eos_B = jnp.any(token_B[:, None] == knobs["eos_ids"][None, :], axis=-1)
        ended_B = active_B & (is_eos_B | (gen_B >= slots["max_new"]))
        # The params ride in the carry and the model is merged inside the body: NNX variables must belong
        # to the trace that uses them (a remat-wrapped layer refuses outer-trace variables).
        model = nnx.merge(graphdef, c["params"])
        positions_B1 = (slots["prompt_len"] + c["gen"])[:, None]
        cache = KVCache(c["k"], c["v"], index + c["step"])
        if "pk" in state:  # the shared-prompt layout: the prompts' KV once per group, read-only
            cache = dataclasses.replace(cache, prefix_k=state["pk"], prefix_v=state["pv"],
                                        prefix_mask=state["pmask"], group=slots["group"])
        h_B1D, cache = model.hidden_states(token_B[:, None], positions_B1, mask_BL, cache=cache)
        logits_BV = _constrain(head_logits(model.head(), h_B1D[:, 0], keep_fp32=True), mesh)
        return dict(c, step=c["step"] + 1, ended=c["ended"] + jnp.sum(ended_B, dtype=jnp.int32),
                    k=[_constrain(x, mesh) for x in cache.k], v=[_constrain(x, mesh) for x in cache.v],
                    logits=logits_BV, seen=seen_BV, gen=gen_B, done=c["done"] | ended_B,
                    tokens=c["tokens"].at[:, c["step"]].set(token_B),
                    logprobs=c["logprobs"].at[:, c["step"]].set(jnp.where(active_B, logprob_B, 0.0)), **top)

    c = jax.lax.while_loop(cond, body, carry)
    new_state = {**state, "k": c["k"], "v": c["v"], "logits": c["logits"], "seen": c["seen"]}
    return new_state, c["tokens"], c["logprobs"], c["gen"], c["done"], c["step"], c["top"], c["top_ids"]


# ----------------------------------------------------------------------------------------------------------
# Host side


def prompt_keys(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Each prompt's randomness key: a hash of its tokens and of how many identical prompts precede it (so
    duplicates draw apart, and a prompt draws the same wherever it sits in the call)."""
    seen: collections.Counter = collections.Counter()
    keys = []
    for ids in prompts:
        data = np.asarray(ids, np.int64).tobytes()
        keys.append(zlib.crc32(np.int64(seen[data]).tobytes(), zlib.crc32(data)) & 0x7FFFFFFF)
        seen[data] += 1
    return keys


@dataclasses.dataclass
class SamplerResult:
    """Per row (prompt-major): completion tokens (EOS included when finished; cut after the token that
    completed a stop string), finished flags (ended on an EOS or a stop string), why each row ended (``"eos"``,
    ``"stop_string"``, ``"length"``), fp32 logprobs at temperature 1 aligned with the tokens; ``stats`` of the
    run (see ``sample_ids``); ``prompt_logprobs`` / ``top_logprobs`` / ``top_logprob_ids`` as in
    ``GenerationOutput`` when asked for."""

    sequences: list[list[int]]
    finished: list[bool]
    logprobs: list[list[float]]
    stats: dict
    finish_reasons: list[str] | None = None
    prompt_logprobs: list[list[float]] | None = None
    top_logprobs: list[list[list[float]]] | None = None
    top_logprob_ids: list[list[list[int]]] | None = None


@dataclasses.dataclass
class _Prefilled:
    arrays: dict
    prompt_len: int
    rows_left: int


class _Slots:
    """Host mirror of the per-slot metadata (numpy), sent with every chunk."""

    def __init__(self, batch: int, max_new: int):
        self.row = np.full(batch, -1, np.int64)
        self.start = np.full(batch, 1 << 30, np.int32)
        self.prompt_len = np.zeros(batch, np.int32)
        self.gen = np.zeros(batch, np.int32)
        self.done = np.ones(batch, bool)
        self.prompt_key = np.zeros(batch, np.int32)
        self.sample = np.zeros(batch, np.int32)
        self.group = np.zeros(batch, np.int32)  # the row's prompt group in the pool (shared layout)
        self.max_new = np.int32(max_new)

    def take(self, rows_B: np.ndarray) -> None:
        """Keep slots ``rows_B`` (in that order): the gather of a shrink."""
        for name in ("row", "start", "prompt_len", "gen", "done", "prompt_key", "sample", "group"):
            setattr(self, name, getattr(self, name)[rows_B].copy())

    @property
    def live(self) -> np.ndarray:
        return (self.row >= 0) & ~self.done

    def device_view(self) -> dict:
        return {"start": self.start, "prompt_len": self.prompt_len, "gen": self.gen, "live": self.live,
                "prompt_key": self.prompt_key, "sample": self.sample, "group": self.group,
                "max_new": np.full(len(self.row), self.max_new, np.int32)}


def _kv_bytes(state: dict) -> int:
    """Keys + values held, all layers: the slots' and (shared layout) the prompt pool's."""
    return int(sum(x.size * x.dtype.itemsize for x in state["k"] + state["v"] + state.get("pk", []) +
                   state.get("pv", [])))


def _windowed(graphdef, params) -> bool:
    """A model with a sliding-window attention layer (the shared-prompt layout does not serve those)."""
    return any(getattr(node, "window", None) is not None for _, node in nnx.iter_graph(nnx.merge(graphdef, params)))


def sample_ids(graphdef, params, prompts: Sequence[Sequence[int]], *, num_return_sequences: int = 1,
               max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, eos_token_id: int | Sequence[int] | None = None,
               pad_token_id: int = 0, key: jax.Array | None = None, vocab_size: int | None = None,
               num_slots: int = NUM_SLOTS, mesh=None, min_new_tokens: int = 0, repetition_penalty: float = 1.0,
               stop_strings: Sequence[str] | None = None, tokenizer=None, return_prompt_logprobs: bool = False,
               return_top_logprobs: int | None = None, share_prompts: bool | None = None) -> SamplerResult:
    """The engine for a bare model: ``graphdef``/``params`` from ``nnx.split(model, nnx.Param)``.

    ``prompts``: one list of token ids per prompt (no padding); each gives ``num_return_sequences`` rows.
    ``mesh``: slots and their KV split over its data x fsdp axes. ``stats``: ``decode_steps`` (device steps),
    ``slot_steps`` (steps x slots decoded), ``tokens`` (real new tokens), ``occupancy`` (tokens / slot_steps),
    ``kv_slot_steps`` (cache slots the decode attention read, summed over steps; x the KV bytes per slot = the
    KV traffic), ``chunks``, ``prefills``, ``prompts_prefilled``, ``kv_bytes_peak``, ``slots_per_device`` (the
    most KV cache rows one device held: ``B / (data x fsdp)`` under a mesh), and the shapes each program ran at.
    ``stop_strings`` (with ``tokenizer``): checked on the host after each chunk (``shared/stops.py``); a row that
    completed one is cut after that token and its slot freed (the tokens its slot decoded past it are dropped).
    ``return_prompt_logprobs`` (from each prompt's prefill) and ``return_top_logprobs=k`` (from each decode
    step's logits): see ``GenerationOutput``. ``share_prompts``: hold each prompt's KV once for its rows (a pool
    of prompt groups + each slot's own tokens, merged in the decode attention: module docstring); ``None``
    (default): when ``num_return_sequences > 1`` and the longest prompt has ``SHARE_MIN_PROMPT`` tokens or more,
    without a mesh, for models without sliding-window layers.
    ``stats["prompt_kv_bytes_peak"]``: the most KV bytes that prompt tokens held at once (real tokens: per slot
    without sharing, per group with it).
    """
    check_generation_args(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                          top_k=top_k, top_p=top_p, min_p=min_p, num_return_sequences=num_return_sequences,
                          greedy_repeats=True, min_new_tokens=min_new_tokens,
                          repetition_penalty=repetition_penalty)
    stop_strings = check_stop_strings(stop_strings, tokenizer)
    vocab = None
    if return_top_logprobs is not None:  # k is checked against the head's vocabulary (the logits' width)
        head = nnx.merge(graphdef, params).head()
        vocab = head.weight.shape[0 if head.transposed else 1]
    check_logprob_args(return_prompt_logprobs, return_top_logprobs, vocab)
    top_k_lp = top_logprobs_bucket(return_top_logprobs) if return_top_logprobs else 0
    prompts = id_rows(prompts, vocab_size)
    if mesh is not None and mesh.size == 1:
        mesh = None
    if share_prompts is not None:
        check_bool(share_prompts, "share_prompts")
        if share_prompts and mesh is not None:
            raise ValueError("`share_prompts`: the shared-prompt layout does not run under a mesh yet")
    auto = num_return_sequences > 1 and max(map(len, prompts), default=0) >= SHARE_MIN_PROMPT
    share = (auto if share_prompts is None else share_prompts) and mesh is None
    if share and _windowed(graphdef, params):
        if share_prompts:
            raise ValueError("`share_prompts`: the shared-prompt layout does not serve sliding-window layers")
        share = False
    knobs = make_knobs(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
                       pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    key = jax.random.key(0) if key is None else key
    n = num_return_sequences
    num_rows = len(prompts) * n
    shards = 1 if mesh is None else data_parallel_size(mesh)

    def slot_bucket(rows: int) -> int:
        return -(-batch_bucket(min(rows, num_slots)) // shards) * shards

    # Distinct prompts share one prefill; identical prompts keep their own randomness keys.
    content_of = [tuple(p) for p in prompts]
    pkeys = prompt_keys(prompts)
    waiting = collections.deque(range(num_rows))  # row r = prompt r // n, sample r % n
    copies_of = collections.Counter(content_of)
    prefilled: dict[tuple, tuple[_Prefilled, int]] = {}
    out_tokens: list[list[int]] = [[] for _ in range(num_rows)]
    out_logprobs: list[list[float]] = [[] for _ in range(num_rows)]
    out_top: list[list] = [[] for _ in range(num_rows)]
    out_top_ids: list[list] = [[] for _ in range(num_rows)]
    prompt_lps: dict[tuple, list[float]] = {}  # prompt -> its prompt logprobs (return_prompt_logprobs)
    finished = [False] * num_rows
    reasons = ["length"] * num_rows
    stops = StopStrings(stop_strings, tokenizer) if stop_strings else None
    stop_rows: dict = {}  # row -> its stop-string matcher state
    stats = {"decode_steps": 0, "slot_steps": 0, "tokens": 0, "chunks": 0, "prefills": 0, "prompts_prefilled": 0,
             "kv_bytes_peak": 0, "kv_slot_steps": 0, "slots_per_device": 0, "prefill_shapes": set(),
             "chunk_shapes": set(), "prompt_kv_bytes_peak": 0, "shared_prompts": share}

    prefill_batch = batch_bucket(min(PREFILL_PROMPTS, len(copies_of)))  # one Bp per call

    def prefill(contents: list[tuple]) -> None:
        """Prefill these distinct prompts (at most ``prefill_batch``), filling the batch with the next waiting
        ones."""
        plen = bucket_length(max(map(len, contents)))
        batch = prefill_batch
        for r in waiting:
            if len(contents) >= batch:
                break
            c = content_of[r // n]
            if c not in prefilled and c not in contents and len(c) <= plen:
                contents.append(c)
        ids_BP = np.full((batch, plen), pad_token_id, np.int32)
        mask_BP = np.zeros((batch, plen), np.int32)
        mask_BP[:, -1] = 1  # filler rows: one real (pad) token, so no row attends to nothing
        for i, c in enumerate(contents):
            ids_BP[i, plen - len(c):], mask_BP[i, plen - len(c):] = c, 1
        arrays = sampler_prefill(params, ids_BP, mask_BP, graphdef=graphdef, prompt_logprobs=return_prompt_logprobs)
        if return_prompt_logprobs:
            lp_BP = np.asarray(distributed.fetch(arrays.pop("prompt_logprobs")))  # every process: all of it
            for i, c in enumerate(contents):
                prompt_lps[c] = lp_BP[i, plen - len(c): plen - 1].tolist()
        group = _Prefilled(arrays, plen, n * sum(copies_of[c] for c in contents))
        for i, c in enumerate(contents):
            prefilled[c] = (group, i)
        stats["prefills"] += 1
        stats["prompts_prefilled"] += len(contents)
        stats["prefill_shapes"].add((batch, plen))

    eos_ids = set(int(i) for i in knobs["eos_ids"] if i >= 0)
    batch = slot_bucket(num_rows)
    slots = _Slots(batch, max_new_tokens)
    state, length, index = None, 0, 0
    # The shared layout's prompt pool: ``groups`` prompts of ``pool_len`` slots; a prompt holds a group while any
    # of its rows (identical prompts' rows too) has not ended.
    groups = batch_bucket(min(len(copies_of), batch)) if share else 0
    pool_len = bucket_length(max(map(len, prompts))) if share else 0
    group_of: dict[tuple, int] = {}
    rows_left = {c: n * k for c, k in copies_of.items()}
    free_groups = list(range(groups))[::-1]
    while True:
        # Rows ended in the last chunk leave their slots; a row finished if it ended on an EOS.
        for b in np.flatnonzero((slots.row >= 0) & slots.done):
            r = slots.row[b]
            if share:
                c = content_of[r // n]
                rows_left[c] -= 1
                if rows_left[c] == 0:
                    free_groups.append(group_of.pop(c))
            if reasons[r] != "stop_string" and out_tokens[r][-1] in eos_ids:
                reasons[r] = "eos"
            finished[r] = reasons[r] != "length"
            stop_rows.pop(r, None)
            slots.row[b] = -1
        live = slots.live
        if not waiting and not live.any():
            break
        # No row waits: gather the live slots into half as many slots (or fewer), a power of two: the draining
        # tail compiles a few chunk shapes, not one per batch bucket.
        rows_B = None
        smaller = slot_bucket(1 << (int(live.sum()) - 1).bit_length())
        if not waiting and smaller <= batch // 2:
            batch = smaller
            rows_B = np.concatenate([np.flatnonzero(live), np.flatnonzero(~live)])[:batch].astype(np.int32)
            slots.take(rows_B)
            live = slots.live
        free = [b for b in range(batch) if not live[b]]
        new_rows = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
        missing = list(dict.fromkeys(content_of[r // n] for r in new_rows if content_of[r // n] not in prefilled))
        for start in range(0, len(missing), prefill_batch):
            prefill(missing[start:start + prefill_batch])
        held = slots.gen + (0 if share else slots.prompt_len)  # tokens each live row holds in its slot
        need = max([int(held[live].max()) if live.any() else 0] +
                   [0 if share else prefilled[content_of[r // n]][0].prompt_len for r in new_rows])
        # Relayout when the slots shrank, the chunk could run past the cache, an insert needs more room left of
        # the write index, or the cache can shrink a bucket.
        new_length = bucket_length(need + CHUNK_STEPS)
        if state is None:
            state = sampler_empty(params, graphdef=graphdef, batch=batch, length=new_length, mesh=mesh,
                                  groups=groups, prompt_len=pool_len)
            length, index = new_length, need
        elif rows_B is not None or index < need or index + CHUNK_STEPS > length or new_length < length:
            rows_B = np.arange(batch, dtype=np.int32) if rows_B is None else rows_B
            state = sampler_relayout(state, rows_B, np.int32(index - need), length=new_length, mesh=mesh)
            slots.start = np.where(live, need - held, 1 << 30).astype(np.int32)
            length, index = new_length, need
        # Insert the new rows, one copy per prefill group.
        inserts: dict[int, tuple[_Prefilled, list, list, list, list]] = {}
        for r, b in zip(new_rows, free):
            c = content_of[r // n]
            group, i = prefilled[c]
            _, src, dst, pool_src, pool_dst = inserts.setdefault(id(group), (group, [], [], [], []))
            src.append(i)
            dst.append(b)
            if share and c not in group_of:  # the prompt's first row in: its KV goes to a free pool group
                group_of[c] = free_groups.pop()
                pool_src.append(i)
                pool_dst.append(group_of[c])
            plen = len(prompts[r // n])
            slots.row[b], slots.start[b], slots.prompt_len[b], slots.gen[b] = r, index - (0 if share else plen), plen, 0
            slots.group[b] = group_of.get(c, 0)
            slots.done[b], slots.prompt_key[b], slots.sample[b] = False, pkeys[r // n], r % n
            if stops is not None:
                stop_rows[r] = stops.start(prompts[r // n])
        for group, src, dst, pool_src, pool_dst in inserts.values():
            if pool_src:
                pad = [0] * (groups - len(pool_src))
                state = sampler_insert_prompts(state, group.arrays, np.asarray(pool_src + pad, np.int32),
                                               np.asarray(pool_dst + pad, np.int32), np.int32(len(pool_src)))
            group.rows_left -= len(src)
            pad = [0] * (batch - len(src))  # slot-count arrays: one insert program per (B, L, Bp, P)
            state = sampler_insert(state, group.arrays, np.asarray(src + pad, np.int32),
                                   np.asarray(dst + pad, np.int32), np.int32(len(src)),
                                   np.int32(index - group.prompt_len), mesh=mesh)
            if group.rows_left <= 0:  # every row of its prompts inserted: let the prefill go
                for c in [c for c, (g, _) in prefilled.items() if g is group]:
                    del prefilled[c]
        stats["kv_bytes_peak"] = max(stats["kv_bytes_peak"], _kv_bytes(state))
        per_token = _kv_bytes({"k": state["k"], "v": state["v"]}) // (batch * length)
        prompt_tokens = (sum(map(len, group_of)) if share else int(slots.prompt_len[slots.live].sum()))
        stats["prompt_kv_bytes_peak"] = max(stats["prompt_kv_bytes_peak"], prompt_tokens * per_token)
        stats["slots_per_device"] = max(stats["slots_per_device"],
                                        int(state["k"][0].sharding.shard_shape(state["k"][0].shape)[0]))
        refill_at = min(len(waiting), max(1, batch // REFILL_FRACTION)) if waiting else batch + 1
        gen_before = slots.gen.copy()
        live_before = slots.live
        state, *chunk_out = sampler_chunk(
            params, state, slots.device_view(), np.int32(index), key, knobs, np.int32(refill_at),
            graphdef=graphdef, mesh=mesh, top_logprobs=top_k_lp)
        # Every process reads the whole chunk, so all take the same decisions below (one all-gather of small arrays).
        tokens_BC, logprobs_BC, gen_B, done_B, steps, top_BCK, top_ids_BCK = distributed.fetch(tuple(chunk_out))
        steps = int(steps)
        stats["chunk_shapes"].add((batch, length, groups, pool_len))
        done_B = np.array(done_B)
        for b in np.flatnonzero(live_before):
            made = int(gen_B[b] - gen_before[b])
            if stops is not None:  # the first token that completes a stop string ends the row
                cut = stops.feed(stop_rows[slots.row[b]], tokens_BC[b, :made].tolist())
                if cut is not None:
                    made, done_B[b] = cut + 1, True
                    reasons[slots.row[b]] = "stop_string"
            out_tokens[slots.row[b]].extend(tokens_BC[b, :made].tolist())
            out_logprobs[slots.row[b]].extend(logprobs_BC[b, :made].tolist())
            if return_top_logprobs:
                out_top[slots.row[b]].extend(top_BCK[b, :made, :return_top_logprobs].tolist())
                out_top_ids[slots.row[b]].extend(top_ids_BCK[b, :made, :return_top_logprobs].tolist())
            stats["tokens"] += made
        slots.gen, slots.done = gen_B.astype(np.int32), done_B | (slots.row < 0)
        index += steps
        stats["decode_steps"] += steps
        stats["slot_steps"] += steps * batch
        stats["kv_slot_steps"] += steps * batch * length
        stats["chunks"] += 1
    stats["occupancy"] = stats["tokens"] / max(stats["slot_steps"], 1)
    return SamplerResult(out_tokens, finished, out_logprobs, stats, reasons,
                         [prompt_lps[content_of[r // n]] for r in range(num_rows)] if return_prompt_logprobs else None,
                         out_top if return_top_logprobs else None, out_top_ids if return_top_logprobs else None)
