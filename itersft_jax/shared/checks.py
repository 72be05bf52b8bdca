"""Checks of single arguments, shared by every public entry point: one error naming the argument, raised before any
state changes (``TypeError`` for the wrong kind of value, ``ValueError`` for one out of range). No jax, no torch."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SEED_RANGE = 1 << 32  # numpy's and JAX's seeds are 32-bit: a larger one would wrap around to another seed


def check_int(value: Any, name: str, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__}: {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"`{name}` must be an integer {bound}, got {value!r}")


def check_real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}: {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    return number


def check_bool(value: Any, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {type(value).__name__}: {value!r}")


def check_seed(seed: Any, name: str = "seed") -> None:
    """``None`` or an integer in ``[0, 2**32)`` (``TypeError``/``ValueError`` naming ``name``)."""
    if seed is not None:
        check_int(seed, name, 0, SEED_RANGE - 1)
