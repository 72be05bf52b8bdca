"""What both engines' ``generate`` share: the result type and the argument checks (no jax, no torch at import)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from itersft_jax.shared.checks import check_bool, check_int, check_real, check_seed
from itersft_jax.shared.data import check_texts


@dataclasses.dataclass
class GenerationOutput:
    """What ``trainer.generate`` returns, on either backend. Rows are prompt-major: prompt ``i``'s
    ``num_return_sequences`` samples are rows ``i * n ... i * n + n - 1``.

    ``sequences``: the completion token ids of each row (prompt not included), cut after the first EOS;
    the EOS itself **is included** when the row finished (``finished[row]``), so ``prompt_ids[row] +
    sequences[row]`` is a complete training sequence. ``texts``: the completions decoded with
    ``skip_special_tokens=True`` (``None`` with ``return_text=False`` or without a tokenizer).
    ``prompt_ids``: the prompt tokens of each row, without padding. ``logprobs`` (``return_logprobs=True``):
    per row, each generated token's log-probability under the model at temperature 1 (fp32, aligned with
    ``sequences[row]``), whatever the sampling settings. ``stats``: what the engine measured (JAX: decode
    steps, slot occupancy, KV bytes held, ...; torch: ``None``). ``finish_reasons``: why each row ended,
    ``"eos"``, ``"stop_string"`` (``stop_strings``: the row is cut after the token that completed one, which it
    keeps, as transformers does; ``finished`` is True for it too) or ``"length"`` (``max_new_tokens``).

    ``prompt_logprobs`` (``return_prompt_logprobs=True``): per row, fp32 ``log p(prompt[j] | prompt[:j])`` for
    ``j = 1 .. len(prompt) - 1``, a list of ``len(prompt_ids[row]) - 1`` floats aligned with
    ``prompt_ids[row][1:]`` (the first prompt token has no context: no entry; a one-token prompt gets ``[]``); a
    prompt's ``num_return_sequences`` rows hold the same list. ``top_logprobs`` / ``top_logprob_ids``
    (``return_top_logprobs=k``): per row, one entry per generated token (aligned with ``sequences[row]``), each
    the ``k`` most likely next tokens under the model at temperature 1 (fp32 logprobs, most likely first) and
    their ids: ``[len(sequences[row])][k]``, no padding (ties in any order).
    """

    sequences: list[list[int]]
    texts: list[str] | None
    prompt_ids: list[list[int]]
    finished: list[bool]
    num_return_sequences: int = 1
    logprobs: list[list[float]] | None = None
    stats: dict | None = None
    finish_reasons: list[str] | None = None
    prompt_logprobs: list[list[float]] | None = None
    top_logprobs: list[list[list[float]]] | None = None
    top_logprob_ids: list[list[list[int]]] | None = None

    def __getitem__(self, key: str) -> Any:  # dict-style access, like HF's ModelOutput
        return getattr(self, key)

    def prompt_index(self, row: int) -> int:
        """Index of the prompt that row ``row`` answers."""
        return row // self.num_return_sequences


MAX_EOS_IDS = 8  # both engines stop on at most this many EOS ids (JAX pads them to this many: no recompiles)
MIN_TEMPERATURE = 1e-5  # below it sampling is greedy decoding in all but name, and logits / T overflow fp32 sooner
MAX_NEW_TOKENS = 1 << 24  # positions stay far inside int32
MAX_RETURN_SEQUENCES = 1 << 16


def check_generation_args(*, max_new_tokens: int, do_sample: bool, temperature: float, top_k: int, top_p: float,
                          num_return_sequences: int = 1, seed: Any = None, return_text: Any = True,
                          return_logprobs: Any = False, greedy_repeats: bool = False, min_p: float = 0.0,
                          min_new_tokens: int = 0, repetition_penalty: float = 1.0) -> None:
    """``TypeError`` / ``ValueError`` naming the argument for any setting ``generate`` cannot honour: integers in
    range, finite numbers, booleans, ``temperature >= MIN_TEMPERATURE`` when sampling, ``top_p`` in (0, 1], ``min_p`` in
    [0, 1], and
    ``min_new_tokens`` in [0, max_new_tokens], ``repetition_penalty > 0``,
    ``num_return_sequences == 1`` for greedy decoding (its rows would all be the same, as transformers refuses).
    ``greedy_repeats=True`` (the sampler's engines, below the public ``generate``) lets greedy decoding repeat a
    prompt's rows: the engines' own tests compare the continuous engine with the static one row by row."""
    check_int(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS)
    check_int(num_return_sequences, "num_return_sequences", 1, MAX_RETURN_SEQUENCES)
    check_int(top_k, "top_k", 0, (1 << 31) - 1)
    check_bool(do_sample, "do_sample")
    check_bool(return_text, "return_text")
    check_bool(return_logprobs, "return_logprobs")
    check_seed(seed)
    temperature, top_p = check_real(temperature, "temperature"), check_real(top_p, "top_p")
    if do_sample and temperature < MIN_TEMPERATURE:
        raise ValueError(f"`temperature` must be >= {MIN_TEMPERATURE:g} when sampling, got {temperature!r}; for "
                         f"greedy decoding set do_sample=False")
    if not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p}")
    min_p = check_real(min_p, "min_p")
    if not 0 <= min_p <= 1:
        raise ValueError(f"`min_p` must be in [0, 1] (0: off), got {min_p}")
    check_int(min_new_tokens, "min_new_tokens", 0, max_new_tokens)
    if not check_real(repetition_penalty, "repetition_penalty") > 0:
        raise ValueError(f"`repetition_penalty` must be > 0 (1: off), got {repetition_penalty}")
    if not do_sample and num_return_sequences > 1 and not greedy_repeats:
        raise ValueError(f"`num_return_sequences`={num_return_sequences} with greedy decoding (do_sample=False) "
                         f"would return {num_return_sequences} identical rows per prompt; set do_sample=True")


def check_logprob_args(return_prompt_logprobs: Any, return_top_logprobs: Any, vocab_size: int | None) -> None:
    """``return_prompt_logprobs`` a boolean; ``return_top_logprobs`` ``None`` (off) or an integer in ``[1, vocab]``
    (``TypeError`` / ``ValueError`` naming the argument)."""
    check_bool(return_prompt_logprobs, "return_prompt_logprobs")
    if return_top_logprobs is not None:
        check_int(return_top_logprobs, "return_top_logprobs", 1, vocab_size)


def eos_id_list(eos_token_id: Any, vocab_size: int | None = None) -> list[int]:
    """``None`` / an id / ids -> sorted unique ids, each an integer in ``[0, vocab_size)``; anything else (a string,
    a float, a nested list, ``None`` inside a list) and more than ``MAX_EOS_IDS`` ids are refused naming
    ``eos_token_id`` on both engines."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, (int, np.integer)) and not isinstance(eos_token_id, bool):
        ids = [eos_token_id]
    elif isinstance(eos_token_id, (list, tuple)) or (isinstance(eos_token_id, np.ndarray) and eos_token_id.ndim == 1):
        ids = list(eos_token_id)
    else:
        raise TypeError(f"`eos_token_id` must be a token id (int), a list of them or None, got "
                        f"{type(eos_token_id).__name__}: {eos_token_id!r}")
    for value in ids:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"`eos_token_id` must hold token ids (int), got {type(value).__name__}: {value!r}")
        if value < 0 or (vocab_size is not None and value >= vocab_size):
            allowed = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"`eos_token_id` {value} is outside the vocabulary: ids must be in {allowed}")
    ids = sorted({int(i) for i in ids})
    if len(ids) > MAX_EOS_IDS:
        raise ValueError(f"`eos_token_id`: at most {MAX_EOS_IDS} EOS ids are supported, got {len(ids)}")
    return ids


def default_eos_ids(eos_token_id: Any, tokenizer, hf_config, vocab_size: int | None = None) -> list[int]:
    """The EOS ids a ``generate`` call stops on, on both engines: the given ids (checked), or by default the model
    config's (HF's generation default) plus the tokenizer's."""
    if eos_token_id is not None:
        return eos_id_list(eos_token_id, vocab_size)
    ids = eos_id_list(getattr(hf_config, "eos_token_id", None))
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids = eos_id_list([*ids, tokenizer.eos_token_id])
    return ids


def generation_pad_id(tokenizer, hf_config, eos_ids: list[int]) -> int:
    """The id that pads a ``generate`` call's rows, on both engines: the tokenizer's pad id, else the model
    config's, else the first EOS id, else 0."""
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad = pad if pad is not None else getattr(hf_config, "pad_token_id", None)
    return int(pad if pad is not None else (eos_ids[0] if eos_ids else 0))


def check_generation_positions(rows: list[list[int]], max_new_tokens: int, max_positions: int | None,
                               prompt_name: str) -> None:
    """``ValueError`` when a prompt plus ``max_new_tokens`` runs past the model's learned position table (GPT-2,
    OPT: a position past it has no embedding); None: no table, any length."""
    if not max_positions:
        return
    for i, row in enumerate(rows):
        if len(row) >= max_positions:
            raise ValueError(f"`{prompt_name}[{i}]` is {len(row)} tokens long: the model has {max_positions} "
                             f"positions (a learned position table), which leaves no room for a new token")
        if len(row) + max_new_tokens > max_positions:
            raise ValueError(f"`max_new_tokens`={max_new_tokens}: `{prompt_name}[{i}]` has {len(row)} tokens, and "
                             f"the model has {max_positions} positions (a learned position table); set "
                             f"max_new_tokens <= {max_positions - len(row)} or shorten the prompt")


def as_id_list(ids: Any, name: str) -> list[int]:
    """One unpadded prompt (list, numpy, torch or jax 1-D integer array) as a list of ints."""
    if hasattr(ids, "detach"):  # torch
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"`{name}` must be 1-D integer token ids, got {arr.dtype} of shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"`{name}` is an empty prompt")
    return [int(x) for x in arr]


def _is_empty(value: Any) -> bool:
    try:
        return len(value) == 0
    except TypeError:  # a scalar: rejected below as the wrong type
        return False


def chat_prompts(messages, tokenizer, no_tokenizer_hint: str) -> list[str]:
    """``messages`` (one conversation per prompt: a list of ``{"role", "content"}`` dicts) -> prompt texts through
    the tokenizer's chat template, with the generation prompt."""
    if isinstance(messages, (str, dict)) or not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError("`messages` must be a non-empty list of conversations, each a list of "
                        "{'role': ..., 'content': ...} dicts")
    for i, conversation in enumerate(messages):
        if not isinstance(conversation, (list, tuple)) or not conversation or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in conversation):
            raise TypeError(f"`messages[{i}]` must be a non-empty list of {{'role': ..., 'content': ...}} dicts")
    if tokenizer is None:
        raise ValueError(f"`messages` need a tokenizer with a chat template; {no_tokenizer_hint}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("`messages`: the tokenizer has no chat template (tokenizer.chat_template is None); set one "
                         "or pass `prompts` with the template applied")
    return [tokenizer.apply_chat_template(list(c), add_generation_prompt=True, tokenize=False) for c in messages]


def prompt_rows(prompts, input_ids, tokenizer, *, no_tokenizer_hint: str,
                vocab_size: int | None = None, messages=None) -> list[list[int]]:
    """The prompts of a ``generate`` call as token-id rows: exactly one of ``prompts`` (texts, tokenized with
    the tokenizer's own special tokens), ``input_ids`` (unpadded token-id sequences, checked against
    ``vocab_size`` when given) and ``messages`` (conversations: the chat template with the generation prompt, the
    template's text tokenized without adding special tokens again)."""
    if messages is not None:
        if prompts is not None or input_ids is not None:
            raise ValueError("pass exactly one of `prompts` (texts), `input_ids` (token ids) and `messages` (chats)")
        texts = chat_prompts(messages, tokenizer, no_tokenizer_hint)
        rows = [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        if any(len(r) == 0 for r in rows):
            raise ValueError("`messages`: the chat template gave an empty prompt")
        return id_rows(rows, vocab_size)
    if (prompts is None) == (input_ids is None):
        raise ValueError("pass exactly one of `prompts` (texts) and `input_ids` (token ids)")
    for name, value in (("prompts", prompts), ("input_ids", input_ids)):
        if value is not None and not isinstance(value, str) and _is_empty(value):
            raise ValueError(f"`{name}` is empty: generate() needs at least one prompt")
    if prompts is not None:
        check_texts(prompts, "prompts")
        if tokenizer is None:
            raise ValueError(f"`prompts` need a tokenizer; {no_tokenizer_hint}")
        rows = [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    elif getattr(input_ids, "ndim", None) == 2 or (isinstance(input_ids, Sequence) and input_ids
                                                   and not isinstance(input_ids[0], (int, np.integer))):
        rows = [as_id_list(row, f"input_ids[{i}]") for i, row in enumerate(input_ids)]
    else:
        raise TypeError("`input_ids` must be a list of token-id sequences (or an unpadded 2-D array)")
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate() needs non-empty prompts")
    return id_rows(rows, vocab_size)


def id_rows(prompts, vocab_size: int | None = None) -> list[list[int]]:
    """Unpadded prompts (each a list or 1-D array of ids) as lists of ints, checked: at least one, none empty,
    every id in ``[0, vocab_size)`` when ``vocab_size`` is given (the engines' entry check)."""
    rows = [as_id_list(p, f"input_ids[{i}]") for i, p in enumerate(prompts)]
    if not rows:
        raise ValueError("no prompts given")
    if vocab_size is not None:
        for i, row in enumerate(rows):
            if min(row) < 0 or max(row) >= vocab_size:
                raise ValueError(f"`input_ids[{i}]` holds ids outside the vocabulary [0, {vocab_size})")
    return rows
