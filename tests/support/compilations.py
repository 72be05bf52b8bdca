"""Counting XLA compilations: the tests' (and benchmarks') check that a long run compiles a handful of times."""

from __future__ import annotations

import contextlib
import dataclasses

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class CompileCount:
    count: int = 0


@contextlib.contextmanager
def count_compilations(fun_name: str | None = "train_step"):
    """Count XLA compilations inside the block, of functions whose name contains ``fun_name``.

    ``fun_name=None`` counts every compilation (eager ops included). Usage::

        with count_compilations() as compiles:
            ...
        assert compiles.count == 1
    """
    counter = CompileCount()

    def listener(event: str, duration: float, **kwargs):
        del duration
        if event == _COMPILE_EVENT and (fun_name is None or fun_name in str(kwargs.get("fun_name", ""))):
            counter.count += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
