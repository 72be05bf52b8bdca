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
    ``prompt_ids``: the prompt tokens of each row, without padding.
    """

    sequences: list[list[int]]
    texts: list[str] | None
    prompt_ids: list[list[int]]
    finished: list[bool]
    num_return_sequences: int = 1

    def __getitem__(self, key: str) -> Any:  # dict-style access, like HF's ModelOutput
        return getattr(self, key)

    def prompt_index(self, row: int) -> int:
        """Index of the prompt that row ``row`` answers."""
        return row // self.num_return_sequences


def check_generation_args(*, max_new_tokens: int, do_sample: bool, temperature: float, top_k: int, top_p: float,
                          num_return_sequences: int = 1) -> None:
    """ValueError naming the argument for any sampling setting ``generate`` cannot honour."""
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}")
    if num_return_sequences < 1:
        raise ValueError(f"`num_return_sequences` must be >= 1, got {num_return_sequences}")
    if do_sample and temperature <= 0:
        raise ValueError(f"`temperature` must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"`top_k` must be >= 0, got {top_k}")


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


def prompt_rows(prompts, input_ids, tokenizer, *, no_tokenizer_hint: str) -> list[list[int]]:
    """The prompts of a ``generate`` call as token-id rows: exactly one of ``prompts`` (texts, tokenized with
    the tokenizer's own special tokens) and ``input_ids`` (unpadded token-id sequences)."""
    if (prompts is None) == (input_ids is None):
        raise ValueError("pass exactly one of `prompts` (texts) and `input_ids` (token ids)")
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
    return rows
