"""Sampling for the generate -> filter -> step loop: jitted prefill and decode loop over a KV cache.

Shapes are bucketed so an iterative run compiles a handful of times, not once per call. Three ladders:

* batch ``B``: the rows (prompts x ``num_return_sequences``) padded to 1, 2, 3, 4, 6, 8, 12, 16, ...;
* prompt ``P``: prompts left-padded to ``data.bucket_length`` (16, 24, 32, 48, 64, 96, 128, ...);
* cache ``S``: ``bucket_length(P + max_new_tokens)`` slots (the loop stops at the requested count).

Each jitted program sees only the shapes it needs, and every sampling setting (``do_sample``,
``temperature``, ``top_k``, ``top_p``, EOS ids up to ``MAX_EOS_IDS``, ``max_new_tokens``, the seed) is a
run-time value. So the compilations are bounded by the ladders: ``generate_prefill`` once per (B, P),
``generate_decode`` once per (B, S), and ``generate_extend_cache`` — a copy, milliseconds to compile — once
per (B, P, S). A run with a fixed batch compiles the model at most twice per prompt bucket and cache
bucket it meets. Before, prefill and decode both compiled once per (B, P, new-token bucket): 30 varied calls
(1-4 prompts of 4-99 tokens, 1-63 new tokens, 1-3 returns) compiled the model 52 times; now 32 times, plus
21 cache copies (0.1 s each).

Positions come from the attention mask, so left padding does not shift them. The decode loop is a
``lax.while_loop`` that exits early once every row has emitted an end-of-sequence token.

Sampling follows Hugging Face ``generate``: logits in fp32, then temperature, then top-k (ties with the
k-th logit kept), then top-p (the smallest set whose probability reaches ``top_p``, at least one token;
tokens tied at the boundary are all kept).
Each row stops independently at its first EOS; after it the row emits padding, which is not counted.

Randomness: a fixed ``seed`` reproduces samples exactly. Without one, every call draws fresh samples — a
per-trainer (per-model) call counter is folded into ``args.seed`` — so a loop that never passes a seed
does not see the same samples twice (Tunix's sampler did), while a whole run stays reproducible.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from itersft_jax.models.attention.masks import positions_from_mask
from itersft_jax.shared.data import bucket_length
from itersft_jax.shared.outputs import MAX_EOS_IDS, GenerationOutput, as_id_list, check_generation_args
from itersft_jax.shared.outputs import eos_id_list as _eos_list
from itersft_jax.shared.outputs import prompt_rows as read_prompts

_UNSEEDED_STREAM = 0x5EED  # folded into the base key for calls without a seed; explicit seeds never collide


# ----------------------------------------------------------------------------------------------------------
# Logits -> next token


def filter_logits(logits_BV: jax.Array, knobs: dict) -> jax.Array:
    """HF's warpers in HF's order: temperature, top-k, top-p. fp32 in, fp32 out (-inf = removed).

    ``top_k`` 0 and ``top_p`` 1 switch a filter off; the values are traced, so no setting recompiles.
    """
    logits_BV = logits_BV / knobs["temperature"]
    neg_inf = jnp.float32(-jnp.inf)
    vocab = logits_BV.shape[-1]
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # descending
    k = jnp.where(knobs["top_k"] > 0, jnp.minimum(knobs["top_k"], vocab), vocab)
    kth_B1 = jax.lax.dynamic_slice_in_dim(sorted_BV, k - 1, 1, axis=-1)
    logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)  # ties with the k-th are kept, as in HF
    # Values >= the k-th form a prefix of the descending sort, so the sort stays valid after top-k.
    sorted_BV = jnp.where(sorted_BV < kth_B1, neg_inf, sorted_BV)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the strictly more likely tokens
    keep_BV = (before_BV < knobs["top_p"]) | (knobs["top_p"] >= 1.0)
    keep_BV = keep_BV.at[:, 0].set(True)
    last_B1 = jnp.sum(keep_BV, axis=-1, keepdims=True) - 1
    threshold_B1 = jnp.take_along_axis(sorted_BV, last_B1, -1)
    return jnp.where(logits_BV < threshold_B1, neg_inf, logits_BV)


def _next_token(logits_BV: jax.Array, key: jax.Array, knobs: dict) -> jax.Array:
    """Greedy or sampled, chosen at run time (``lax.cond``): one compiled program serves every setting."""
    def greedy(logits_BV):
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def sample(logits_BV):
        logits_BV = jax.lax.cond(knobs["filter"], filter_logits, lambda x, kn: x / kn["temperature"],
                                 logits_BV, knobs)
        return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)

    return jax.lax.cond(knobs["do_sample"], sample, greedy, logits_BV.astype(jnp.float32))


def _record(state: dict, token_B: jax.Array, step, knobs: dict) -> dict:
    """Write this step's tokens; rows already finished emit padding and stop counting."""
    done_B = state["done"]
    token_B = jnp.where(done_B, knobs["pad_id"], token_B)
    tokens_BN = jax.lax.dynamic_update_slice(state["tokens"], token_B[:, None], (0, step))
    is_eos_B = jnp.any(token_B[:, None] == knobs["eos_ids"][None, :], axis=-1)
    return dict(state, tokens=tokens_BN, last=token_B, lengths=state["lengths"] + (~done_B).astype(jnp.int32),
                done=done_B | is_eos_B)


# ----------------------------------------------------------------------------------------------------------
# The two jitted functions


@functools.partial(jax.jit, static_argnames=("graphdef",))
def generate_prefill(params, input_ids_BP, mask_BP, key, knobs, *, graphdef):
    """Run the prompts through the model into a cache of exactly ``P`` slots and choose the first new token.

    Returns ``(cache, token_B)``. Compiled once per (batch bucket, prompt bucket): neither
    ``max_new_tokens`` nor the cache length it needs reaches this program.
    """
    model = nnx.merge(graphdef, params)
    batch, prompt_len = input_ids_BP.shape
    cache = model.init_cache(batch, prompt_len)
    positions_BP = positions_from_mask(mask_BP)
    # The cache is empty: the prompt attends only its own keys, through the model's attention kernel.
    logits_B1V, cache = model(input_ids_BP, positions_BP, mask_BP, cache=cache, last_only=True)
    return cache, _next_token(logits_B1V[:, -1], jax.random.fold_in(key, 0), knobs)


@functools.partial(jax.jit, static_argnames=("graphdef", "batch", "length"))
def generate_extend_cache(params, cache, *, graphdef, batch: int, length: int):
    """The prefilled ``P``-slot cache at the start of an empty ``length``-slot one (a copy: milliseconds to
    compile, once per (batch, prompt, cache) bucket). Layout-agnostic: every leaf of the prefilled cache
    goes to the origin of the matching leaf of ``init_cache(batch, length)``."""
    target = nnx.merge(graphdef, params).init_cache(batch, length)
    leaves = [jax.lax.dynamic_update_slice(big, small.astype(big.dtype), (0,) * big.ndim)
              for big, small in zip(jax.tree.leaves(target), jax.tree.leaves(cache))]
    return jax.tree.unflatten(jax.tree.structure(cache), leaves)  # the prefilled cache's structure: not empty


@functools.partial(jax.jit, static_argnames=("graphdef",))
def generate_decode(params, cache, first_B, mask_BS, prompt_tokens_B, key, knobs, max_new_tokens, *, graphdef):
    """From the first new token, feed the last token and choose the next until ``max_new_tokens`` or every
    row is done. ``mask_BS`` covers the cache: the prompt's slots (0 = left padding), then 1 for every new
    slot (causality hides the slots not written yet). Compiled once per (batch bucket, cache bucket): the
    prompt bucket and ``max_new_tokens`` are run-time values here.

    Returns ``tokens`` ``[B, S]`` (the first ``max_new_tokens`` columns used), per-row ``lengths`` (tokens
    produced, EOS included) and ``done``.
    """
    batch, length = mask_BS.shape
    state = {"cache": cache, "tokens": jnp.full((batch, length), knobs["pad_id"], jnp.int32),
             "last": jnp.zeros((batch,), jnp.int32), "lengths": jnp.zeros((batch,), jnp.int32),
             "done": jnp.zeros((batch,), bool)}
    state = _record(state, first_B, 0, knobs)

    def cond(carry):
        step, _, state = carry
        return (step < max_new_tokens) & ~jnp.all(state["done"])

    def body(carry):
        step, params, state = carry
        positions_B1 = (prompt_tokens_B + step - 1)[:, None]
        # The params ride in the carry and the model is merged inside the body: NNX variables must belong
        # to the trace that uses them (a remat-wrapped layer refuses outer-trace variables).
        model = nnx.merge(graphdef, params)
        logits_B1V, cache = model(state["last"][:, None], positions_B1, mask_BS, cache=state["cache"])
        token_B = _next_token(logits_B1V[:, 0], jax.random.fold_in(key, step), knobs)
        return step + 1, params, _record(dict(state, cache=cache), token_B, step, knobs)

    _, _, state = jax.lax.while_loop(cond, body, (jnp.int32(1), params, state))
    return state["tokens"], state["lengths"], state["done"]


def cache_mask(mask_BP: np.ndarray, num_new: int) -> np.ndarray:
    """Key-slot mask of the cache: the prompt's padding is off, every new slot on (causality hides the
    slots not written yet)."""
    return np.concatenate([np.asarray(mask_BP, np.int32), np.ones((mask_BP.shape[0], num_new), np.int32)], -1)


# ----------------------------------------------------------------------------------------------------------
# Host side


def batch_bucket(rows: int) -> int:
    return 1 if rows <= 1 else bucket_length(rows, minimum=2)


def generate_ids(graphdef, params, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
                 key: jax.Array | None = None, vocab_size: int | None = None
                 ) -> tuple[list[list[int]], list[bool]]:
    """The engine for a bare model: ``graphdef``/``params`` from ``nnx.split(model, nnx.Param)``.

    ``prompt_ids``: one list of token ids per row (no padding; rows are not repeated here).
    ``eos_token_id``: int, list, or ``None`` (never stop early). Returns ``(sequences, finished)`` as in
    ``GenerationOutput``. The compute dtype is the one the module was built with; logits are fp32.
    """
    check_generation_args(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                          top_k=top_k, top_p=top_p)
    rows = [as_id_list(p, f"input_ids[{i}]") for i, p in enumerate(prompt_ids)]
    if not rows:
        raise ValueError("no prompts given")
    if vocab_size is not None:
        for i, row in enumerate(rows):
            if min(row) < 0 or max(row) >= vocab_size:
                raise ValueError(f"`input_ids[{i}]` holds ids outside the vocabulary [0, {vocab_size})")

    batch = batch_bucket(len(rows))
    prompt_len = bucket_length(max(len(r) for r in rows))
    cache_len = bucket_length(prompt_len + max_new_tokens)
    input_ids_BP = np.full((batch, prompt_len), pad_token_id, np.int32)
    mask_BP = np.zeros((batch, prompt_len), np.int32)
    for i, row in enumerate(rows):
        input_ids_BP[i, prompt_len - len(row):] = row
        mask_BP[i, prompt_len - len(row):] = 1
    mask_BP[len(rows):, -1] = 1  # filler rows: one real (pad) token, so no row attends to nothing

    eos = _eos_list(eos_token_id)
    knobs = {"do_sample": np.bool_(do_sample), "filter": np.bool_(top_k > 0 or top_p < 1.0),
             "temperature": np.float32(temperature), "top_k": np.int32(top_k), "top_p": np.float32(top_p),
             "pad_id": np.int32(pad_token_id),
             "eos_ids": np.asarray(eos + [-1] * (MAX_EOS_IDS - len(eos)), np.int32)}
    key = jax.random.key(0) if key is None else key

    cache, first_B = generate_prefill(params, input_ids_BP, mask_BP, key, knobs, graphdef=graphdef)
    cache = generate_extend_cache(params, cache, graphdef=graphdef, batch=batch, length=cache_len)
    mask_BS = cache_mask(mask_BP, cache_len - prompt_len)
    tokens_BN, lengths_B, done_B = generate_decode(params, cache, first_B, mask_BS, mask_BP.sum(-1, dtype=np.int32),
                                                   key, knobs, np.int32(max_new_tokens), graphdef=graphdef)
    tokens_BN, lengths_B, done_B = jax.device_get((tokens_BN, lengths_B, done_B))
    sequences = [tokens_BN[i, :lengths_B[i]].tolist() for i in range(len(rows))]
    return sequences, [bool(d) for d in done_B[:len(rows)]]


# Call counters for unseeded calls on bare modules (weak: they die with it); a trainer counts its own.
_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _next_module_call(module) -> int:
    calls = _CALLS.get(module, 0)
    _CALLS[module] = calls + 1
    return calls


def _unseeded_key(base_seed: int, call: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(base_seed), _UNSEEDED_STREAM), call)


def _default_eos(tokenizer, hf_config) -> list[int]:
    """EOS ids to stop on: the model config's (HF's generation default) and the tokenizer's."""
    ids = set(_eos_list(getattr(hf_config, "eos_token_id", None)))
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def generate(trainer_or_model, prompts: Sequence[str] | None = None, input_ids=None, *,
             max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, num_return_sequences: int = 1,
             eos_token_id: int | Sequence[int] | None = None, seed: int | None = None,
             return_text: bool = True, tokenizer=None, hf_config=None) -> GenerationOutput:
    """Generate completions with a JAX ``IterativeSFTTrainer``'s current parameters (or an NNX model).

    Give ``prompts`` (texts, tokenized with the tokenizer's own special tokens) or ``input_ids`` (a list of
    token-id sequences, no padding). ``eos_token_id``: int or list; default the model config's EOS plus the
    tokenizer's; ``[]`` never stops early. ``seed``: fixed -> reproducible; ``None`` -> a fresh stream per
    call (see the module docstring). For a bare ``nnx.Module`` pass ``tokenizer=`` (for texts) and
    ``hf_config=`` (for the default EOS) yourself.

    Compilations are bounded by the shape ladders (module docstring): the model is compiled at most once per
    (batch bucket, prompt bucket) for the prefill and once per (batch bucket, cache bucket) for the decode
    loop, whatever the sampling settings, EOS ids or ``max_new_tokens``.
    """
    if not isinstance(trainer_or_model, nnx.Module) and hasattr(trainer_or_model, "train_state"):  # a trainer
        trainer = trainer_or_model
        graphdef, params = trainer.graphdef, trainer.train_state.model_state()  # the live params (LoRA: + base)
        tokenizer = tokenizer if tokenizer is not None else trainer.processing_class
        hf_config = hf_config if hf_config is not None else trainer.config
        unseeded_call = trainer.next_generation_call if seed is None else None
        base_seed = int(trainer.args.seed)
    elif isinstance(trainer_or_model, nnx.Module):
        graphdef, params = nnx.split(trainer_or_model, nnx.Param)
        unseeded_call = functools.partial(_next_module_call, trainer_or_model) if seed is None else None
        base_seed = 0
    else:
        raise TypeError("generate() takes a JAX IterativeSFTTrainer or a Flax NNX causal LM, got "
                        f"{type(trainer_or_model).__name__}")
    check_generation_args(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                          top_k=top_k, top_p=top_p, num_return_sequences=num_return_sequences)
    prompt_rows = read_prompts(prompts, input_ids, tokenizer,
                               no_tokenizer_hint="pass `tokenizer=` or `input_ids=`")
    rows = [row for row in prompt_rows for _ in range(num_return_sequences)]

    if eos_token_id is None:
        eos_token_id = _default_eos(tokenizer, hf_config)
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad_id is None:
        pad_id = getattr(hf_config, "pad_token_id", None)
    if pad_id is None:
        pad_id = _eos_list(eos_token_id)[0] if _eos_list(eos_token_id) else 0
    key = jax.random.key(seed) if seed is not None else _unseeded_key(base_seed, unseeded_call())

    sequences, finished = generate_ids(
        graphdef, params, rows, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=int(pad_id), key=key,
        vocab_size=getattr(hf_config, "vocab_size", None))
    texts = None
    if return_text and tokenizer is not None:
        texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    return GenerationOutput(sequences=sequences, texts=texts, prompt_ids=rows, finished=finished,
                            num_return_sequences=num_return_sequences)
