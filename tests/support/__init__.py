"""What the tests share: offline builders, references, the compilation counter, the engines' helpers and the
workers that tests start in other processes (``python -m tests.support.<worker>``, with the repository root on
``PYTHONPATH``: see :func:`module_command` and :func:`root_on_path`)."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def module_command(name: str, *args: str) -> list[str]:
    """``python -m tests.support.<name> args...``: a worker of this package in a new interpreter."""
    return [sys.executable, "-m", f"tests.support.{name}", *args]


def root_on_path(env: dict | None = None) -> dict:
    """``env`` (default: this process's environment) with the repository root first on ``PYTHONPATH``, so a new
    interpreter imports ``tests.support`` and this checkout's packages from any working directory."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    return env
