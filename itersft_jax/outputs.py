"""Result types shared by both engines (no jax, no torch at import time)."""

from __future__ import annotations

import dataclasses
from typing import Any


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
