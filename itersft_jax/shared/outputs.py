"""What both engines' ``generate`` share: the result type and the argument checks (no jax, no torch at import)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


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
    steps, slot occupancy, KV bytes held, ...; torch: ``None``).
    """

    sequences: list[list[int]]
    texts: list[str] | None
    prompt_ids: list[list[int]]
    finished: list[bool]
    num_return_sequences: int = 1
    logprobs: list[list[float]] | None = None
    stats: dict | None = None

    def __getitem__(self, key: str) -> Any:  # dict-style access, like HF's ModelOutput
        return getattr(self, key)

    def prompt_index(self, row: int) -> int:
        """Index of the prompt that row ``row`` answers."""
        return row // self.num_return_sequences


MAX_EOS_IDS = 8  # both engines stop on at most this many EOS ids (JAX pads them to this many: no recompiles)


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def check_generation_args(*, max_new_tokens: int, do_sample: bool, temperature: float, top_k: int, top_p: float,
                          num_return_sequences: int = 1) -> None:
    """ValueError naming the argument for any sampling setting ``generate`` cannot honour."""
    _check_int(max_new_tokens, "max_new_tokens", 1)
    _check_int(num_return_sequences, "num_return_sequences", 1)
    _check_int(top_k, "top_k", 0)
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    if do_sample and temperature <= 0:
        raise ValueError(f"`temperature` must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p}")


def eos_id_list(eos_token_id: Any) -> list[int]:
    """``None`` / an id / ids -> sorted unique ids; more than ``MAX_EOS_IDS`` is a ValueError on both engines."""
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id)
    ids = sorted({int(i) for i in ids})
    if len(ids) > MAX_EOS_IDS:
        raise ValueError(f"`eos_token_id`: at most {MAX_EOS_IDS} EOS ids are supported, got {len(ids)}")
    return ids


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


def prompt_rows(prompts, input_ids, tokenizer, *, no_tokenizer_hint: str,
                vocab_size: int | None = None) -> list[list[int]]:
    """The prompts of a ``generate`` call as token-id rows: exactly one of ``prompts`` (texts, tokenized with
    the tokenizer's own special tokens) and ``input_ids`` (unpadded token-id sequences, checked against
    ``vocab_size`` when given)."""
    if (prompts is None) == (input_ids is None):
        raise ValueError("pass exactly one of `prompts` (texts) and `input_ids` (token ids)")
    for name, value in (("prompts", prompts), ("input_ids", input_ids)):
        if value is not None and not isinstance(value, str) and _is_empty(value):
            raise ValueError(f"`{name}` is empty: generate() needs at least one prompt")
    if prompts is not None:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("`prompts` must be a list of str")
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
