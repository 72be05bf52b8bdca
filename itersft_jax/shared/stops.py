"""``stop_strings``: where a row's decoded text first holds a stop string, found incrementally (no jax, no torch).

transformers' ``StopStringCriteria`` ends a row at the token that completes a stop string: an occurrence that
overlaps the newest token, so the string may start in the prompt, and the token may run past the string's end.
The row keeps that token (and what it holds past the string); nothing after it. ``StopStrings`` finds the same
token from the decoded text: each row keeps a short tail of its prompt and decodes only a window of its newest
tokens per step (the prefix/read offsets of streaming detokenizers), so a chunk's check costs a few short
``decode`` calls per new token, never a re-decode of the row. Special tokens are decoded as text
(``"<|im_end|>"`` works as a stop string, as in transformers, which matches token strings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


def check_stop_strings(stop_strings, tokenizer) -> list[str] | None:
    """``None`` / a string / a list of non-empty strings -> a list (``None`` when off); a tokenizer is needed."""
    if stop_strings is None:
        return None
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if not isinstance(stop_strings, (list, tuple)) or not stop_strings:
        raise TypeError(f"`stop_strings` must be a string or a non-empty list of strings, got {stop_strings!r}")
    for s in stop_strings:
        if not isinstance(s, str) or not s:
            raise TypeError(f"`stop_strings` must hold non-empty strings, got {s!r}")
    if tokenizer is None:
        raise ValueError("`stop_strings` need a tokenizer to decode the rows; pass `tokenizer=`")
    return list(stop_strings)


@dataclasses.dataclass
class _Row:
    ids: list[int]
    prefix: int  # ids[prefix:read] decode to the text's last piece (context for the next token's decode)
    read: int
    text: str
    prompt_chars: int  # an occurrence must end past the prompt's tail text


class StopStrings:
    """One matcher per call; ``start(prompt)`` per row, then ``feed(row_state, new_tokens)`` per chunk."""

    def __init__(self, stop_strings: Sequence[str], tokenizer):
        self.stops = list(stop_strings)
        self.tokenizer = tokenizer
        self.longest = max(map(len, self.stops))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def start(self, prompt_ids: Sequence[int]) -> _Row:
        tail = list(prompt_ids[-self.longest:])  # a token holds at least one character in practice
        text = self._decode(tail)
        return _Row(ids=tail, prefix=0, read=len(tail), text=text, prompt_chars=len(text))

    def feed(self, row: _Row, new_tokens: Sequence[int]) -> int | None:
        """Add a row's new tokens; the index (in ``new_tokens``) of the token that completes a stop string first,
        or ``None``."""
        for j, token in enumerate(new_tokens):
            row.ids.append(int(token))
            before = self._decode(row.ids[row.prefix:row.read])
            after = self._decode(row.ids[row.prefix:])
            if after.endswith("\ufffd"):  # a character cut between tokens: wait for the rest of it
                continue
            start = len(row.text)
            row.text += after[len(before):]
            row.prefix, row.read = row.read, len(row.ids)
            for stop in self.stops:
                found = row.text.find(stop, max(0, start - len(stop) + 1))
                if found >= 0 and found + len(stop) > row.prompt_chars:
                    return j
        return None
