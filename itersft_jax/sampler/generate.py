"""``generate()``: completions from given parameters (a trainer's live ones, or a bare NNX model's), through the
continuous-batching engine (``sampler/engine.py``: design, ladders, randomness, logprobs).

Randomness: a fixed ``seed`` reproduces samples exactly. Without one, every call draws fresh samples — a
per-trainer (per-model) call counter is folded into the base seed (``args.seed``) — so a loop that never passes a seed
does not see the same samples twice (Tunix's sampler did), while a whole run stays reproducible.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

import jax
from flax import nnx

from itersft_jax.models import position_limit
from itersft_jax.parallel import distributed
from itersft_jax.sampler.engine import sample_ids
from itersft_jax.shared.outputs import (
    GenerationOutput,
    check_generation_args,
    check_generation_positions,
    check_logprob_args,
    default_eos_ids,
    eos_id_list,
    generation_pad_id,
)
from itersft_jax.shared.outputs import prompt_rows as read_prompts
from itersft_jax.shared.stops import check_stop_strings

_UNSEEDED_STREAM = 0x5EED  # folded into the base key for calls without a seed; explicit seeds never collide


# Call counters for unseeded calls on bare modules (weak: they die with it); a trainer passes its own.
_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _next_module_call(module) -> int:
    calls = _CALLS.get(module, 0)
    _CALLS[module] = calls + 1
    return calls


def _unseeded_key(base_seed: int, call: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(base_seed), _UNSEEDED_STREAM), call)


def generate(model: nnx.Module, prompts: Sequence[str] | None = None, input_ids=None, *, tokenizer=None,
             hf_config=None, seed: int | None = None, **kwargs) -> GenerationOutput:
    """Generate completions with a Flax NNX causal LM (a trainer's ``generate`` passes its live parameters to
    :func:`generate_from_params` instead). Pass ``tokenizer=`` (for texts) and ``hf_config=`` (for the default EOS
    and the position limit); the other arguments are :func:`generate_from_params`'. Unseeded calls count per
    module."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"generate() takes a Flax NNX causal LM (a trainer has its own .generate), got "
                        f"{type(model).__name__}")
    graphdef, params = nnx.split(model, nnx.Param)
    return generate_from_params(graphdef, params, prompts, input_ids, tokenizer=tokenizer, hf_config=hf_config,
                                seed=seed, base_seed=0, next_call=functools.partial(_next_module_call, model),
                                **kwargs)


def generate_from_params(graphdef, params, prompts: Sequence[str] | None = None, input_ids=None, *,
                         max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                         top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, num_return_sequences: int = 1,
                         eos_token_id: int | Sequence[int] | None = None, seed: int | None = None,
                         return_text: bool = True, return_logprobs: bool = False, min_new_tokens: int = 0,
                         repetition_penalty: float = 1.0, stop_strings: str | Sequence[str] | None = None,
                         messages=None, return_prompt_logprobs: bool = False, return_top_logprobs: int | None = None,
                         tokenizer=None, hf_config=None, base_seed: int = 0, next_call=None,
                         mesh=None) -> GenerationOutput:
    """Generate completions with the parameters ``params`` of the model ``graphdef`` (JetStream's engine style: the
    state is an argument, so a trainer passes its live parameters — no copy).

    Give ``prompts`` (texts, tokenized with ``tokenizer``'s own special tokens), ``input_ids`` (a list of
    token-id sequences, no padding) or ``messages`` (a list of chats, each a list of ``{"role", "content"}``
    dicts: the tokenizer's chat template with the generation prompt). ``eos_token_id``: int or list; default
    ``hf_config``'s EOS plus the tokenizer's (``shared.outputs.default_eos_ids``); ``[]`` never stops early.
    ``seed``: fixed -> reproducible; ``None`` -> the key of call ``next_call()`` folded into ``base_seed`` (see the
    module docstring). ``mesh``: the decode slots and their KV cache are split over data x fsdp. ``tokenizer`` is
    needed for texts, chats and ``stop_strings``.

    transformers' names and semantics: ``min_p`` (after temperature, top-k, top-p), ``min_new_tokens`` (EOS
    blocked before), ``repetition_penalty`` (on the logits of every token the row holds, prompt included; greedy
    too), ``stop_strings`` (a row ends at the token completing one; ``finish_reasons`` says why each row ended).

    Each distinct prompt is prefilled once and its ``num_return_sequences`` rows decode in slots refilled as
    rows end (``sampler/engine.py``). ``return_logprobs``: ``GenerationOutput.logprobs`` holds each generated
    token's fp32 log-probability under the model at temperature 1 (not the temperature/top-k/top-p-warped
    sampling distribution), equal to ``core.loss.token_logprobs`` of the finished sequence.
    ``return_prompt_logprobs``: each prompt token's logprob given the ones before it, from the prefill's hidden
    states (no extra forward). ``return_top_logprobs=k`` (an integer in ``[1, vocab]``): the ``k`` most likely
    tokens and their logprobs at each generated position. Shapes and alignment: ``GenerationOutput``. Compilations are
    bounded by the engine's ladders, whatever the sampling settings, EOS ids or ``max_new_tokens``.
    """
    check_generation_args(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                          top_k=top_k, top_p=top_p, num_return_sequences=num_return_sequences, seed=seed,
                          return_text=return_text, return_logprobs=return_logprobs, min_p=min_p,
                          min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
    stop_strings = check_stop_strings(stop_strings, tokenizer)
    vocab_size = getattr(hf_config, "vocab_size", None)
    check_logprob_args(return_prompt_logprobs, return_top_logprobs, vocab_size)
    eos_token_id = eos_id_list(eos_token_id, vocab_size) if eos_token_id is not None else None
    prompt_name = "prompts" if prompts is not None else "messages" if messages is not None else "input_ids"
    prompt_rows = read_prompts(prompts, input_ids, tokenizer, messages=messages,
                               no_tokenizer_hint="pass `tokenizer=` or `input_ids=`", vocab_size=vocab_size)
    if hf_config is not None:
        check_generation_positions(prompt_rows, max_new_tokens, position_limit(hf_config),
                                   prompt_name)
    rows = [row for row in prompt_rows for _ in range(num_return_sequences)]

    eos_token_id = default_eos_ids(eos_token_id, tokenizer, hf_config)
    pad_id = generation_pad_id(tokenizer, hf_config, eos_token_id)
    key = jax.random.key(seed) if seed is not None else _unseeded_key(base_seed, next_call() if next_call else 0)

    distributed.check_same("generate", {
        prompt_name: prompt_rows, "max_new_tokens": max_new_tokens, "do_sample": do_sample,
        "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
        "num_return_sequences": num_return_sequences, "eos_token_id": eos_token_id, "min_new_tokens": min_new_tokens,
        "repetition_penalty": repetition_penalty, "stop_strings": stop_strings, "seed": key})
    result = sample_ids(
        graphdef, params, prompt_rows, num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens,
        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        eos_token_id=eos_token_id, pad_token_id=int(pad_id), key=key, mesh=mesh, min_new_tokens=min_new_tokens,
        repetition_penalty=repetition_penalty, stop_strings=stop_strings, tokenizer=tokenizer,
        return_prompt_logprobs=return_prompt_logprobs, return_top_logprobs=return_top_logprobs)
    sequences = result.sequences
    texts = None
    if return_text and tokenizer is not None:
        texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    return GenerationOutput(sequences=sequences, texts=texts, prompt_ids=rows, finished=result.finished,
                            num_return_sequences=num_return_sequences,
                            logprobs=result.logprobs if return_logprobs else None, stats=result.stats,
                            finish_reasons=result.finish_reasons, prompt_logprobs=result.prompt_logprobs,
                            top_logprobs=result.top_logprobs, top_logprob_ids=result.top_logprob_ids)
