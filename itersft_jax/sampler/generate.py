"""``generate()``: completions from a JAX trainer's live parameters (or a bare NNX model), through the
continuous-batching engine (``sampler/engine.py``: design, ladders, randomness, logprobs).

Randomness: a fixed ``seed`` reproduces samples exactly. Without one, every call draws fresh samples — a
per-trainer (per-model) call counter is folded into ``args.seed`` — so a loop that never passes a seed
does not see the same samples twice (Tunix's sampler did), while a whole run stays reproducible.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

import jax
from flax import nnx

from itersft_jax.models import position_limit
from itersft_jax.sampler.engine import sample_ids
from itersft_jax.shared.outputs import GenerationOutput, check_generation_args, check_generation_positions
from itersft_jax.shared.outputs import eos_id_list as _eos_list
from itersft_jax.shared.outputs import prompt_rows as read_prompts
from itersft_jax.shared.stops import check_stop_strings

_UNSEEDED_STREAM = 0x5EED  # folded into the base key for calls without a seed; explicit seeds never collide


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
             top_p: float = 1.0, min_p: float = 0.0, num_return_sequences: int = 1,
             eos_token_id: int | Sequence[int] | None = None, seed: int | None = None,
             return_text: bool = True, return_logprobs: bool = False, min_new_tokens: int = 0,
             repetition_penalty: float = 1.0, stop_strings: str | Sequence[str] | None = None, tokenizer=None,
             hf_config=None, messages=None) -> GenerationOutput:
    """Generate completions with a JAX ``IterativeSFTTrainer``'s current parameters (or an NNX model).

    Give ``prompts`` (texts, tokenized with the tokenizer's own special tokens), ``input_ids`` (a list of
    token-id sequences, no padding) or ``messages`` (a list of chats, each a list of ``{"role", "content"}``
    dicts: the tokenizer's chat template with the generation prompt). ``eos_token_id``: int or list; default
    the model config's EOS plus the tokenizer's; ``[]`` never stops early. ``seed``: fixed -> reproducible;
    ``None`` -> a fresh stream per call (see the module docstring). For a bare ``nnx.Module`` pass
    ``tokenizer=`` (for texts, chats and ``stop_strings``) and ``hf_config=`` (for the default EOS) yourself.

    transformers' names and semantics: ``min_p`` (after temperature, top-k, top-p), ``min_new_tokens`` (EOS
    blocked before), ``repetition_penalty`` (on the logits of every token the row holds, prompt included; greedy
    too), ``stop_strings`` (a row ends at the token completing one; ``finish_reasons`` says why each row ended).

    Each distinct prompt is prefilled once and its ``num_return_sequences`` rows decode in slots refilled as
    rows end (``sampler/engine.py``). ``return_logprobs``: ``GenerationOutput.logprobs`` holds each generated
    token's fp32 log-probability under the model at temperature 1 (not the temperature/top-k/top-p-warped
    sampling distribution), equal to ``core.loss.token_logprobs`` of the finished sequence. Under a trainer's
    mesh the decode slots and their KV cache are split over data x fsdp. Compilations are bounded by the
    engine's ladders, whatever the sampling settings, EOS ids or ``max_new_tokens``.
    """
    if not isinstance(trainer_or_model, nnx.Module) and hasattr(trainer_or_model, "train_state"):  # a trainer
        trainer = trainer_or_model
        graphdef, params = trainer.graphdef, trainer.train_state.model_state()  # the live params (LoRA: + base)
        tokenizer = tokenizer if tokenizer is not None else trainer.processing_class
        hf_config = hf_config if hf_config is not None else trainer.config
        unseeded_call = trainer.next_generation_call if seed is None else None
        base_seed = int(trainer.args.seed)
        mesh = getattr(trainer, "mesh", None)
    elif isinstance(trainer_or_model, nnx.Module):
        graphdef, params = nnx.split(trainer_or_model, nnx.Param)
        unseeded_call = functools.partial(_next_module_call, trainer_or_model) if seed is None else None
        base_seed = 0
        mesh = None
    else:
        raise TypeError("generate() takes a JAX IterativeSFTTrainer or a Flax NNX causal LM, got "
                        f"{type(trainer_or_model).__name__}")
    check_generation_args(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                          top_k=top_k, top_p=top_p, num_return_sequences=num_return_sequences, seed=seed,
                          return_text=return_text, return_logprobs=return_logprobs, min_p=min_p,
                          min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
    stop_strings = check_stop_strings(stop_strings, tokenizer)
    vocab_size = getattr(hf_config, "vocab_size", None)
    eos_token_id = _eos_list(eos_token_id, vocab_size) if eos_token_id is not None else None
    prompt_name = "prompts" if prompts is not None else "messages" if messages is not None else "input_ids"
    prompt_rows = read_prompts(prompts, input_ids, tokenizer, messages=messages,
                               no_tokenizer_hint="pass `tokenizer=` or `input_ids=`", vocab_size=vocab_size)
    if hf_config is not None:
        check_generation_positions(prompt_rows, max_new_tokens, position_limit(hf_config),
                                   prompt_name)
    rows = [row for row in prompt_rows for _ in range(num_return_sequences)]

    if eos_token_id is None:
        eos_token_id = _default_eos(tokenizer, hf_config)
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad_id is None:
        pad_id = getattr(hf_config, "pad_token_id", None)
    if pad_id is None:
        pad_id = _eos_list(eos_token_id)[0] if _eos_list(eos_token_id) else 0
    key = jax.random.key(seed) if seed is not None else _unseeded_key(base_seed, unseeded_call())

    result = sample_ids(
        graphdef, params, prompt_rows, num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens,
        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        eos_token_id=eos_token_id, pad_token_id=int(pad_id), key=key, mesh=mesh, min_new_tokens=min_new_tokens,
        repetition_penalty=repetition_penalty, stop_strings=stop_strings, tokenizer=tokenizer)
    sequences = result.sequences
    texts = None
    if return_text and tokenizer is not None:
        texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    return GenerationOutput(sequences=sequences, texts=texts, prompt_ids=rows, finished=result.finished,
                            num_return_sequences=num_return_sequences,
                            logprobs=result.logprobs if return_logprobs else None, stats=result.stats,
                            finish_reasons=result.finish_reasons)
