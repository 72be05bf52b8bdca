"""What the benchmark scripts share: the offline model builders, fresh-interpreter workers and their peak memory.

Every script in this folder runs offline: its tokenizer and models are built in-process by the builders of
``tests/support/offline.py`` (the same ones the tests use; ``offline()`` hands that module over), saved to a
temporary directory, and each engine measured in its own interpreter (``run_worker``) so that one engine's
allocations never count against the other's. Peak memory is the kernel's ``VmHWM``, reset before the part that
is measured (``reset_peak``). Importing this module puts the repository root on ``sys.path``, so the scripts run
on a machine where the project is not installed.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # the project importable without installing it (as on a lent GPU machine)
    sys.path.insert(0, ROOT)


def support(name: str):
    """A module of ``tests/support`` (the tests' own helpers, shared with the benchmarks): ``tests.support.<name>``,
    imported from the repository root this module put on ``sys.path``."""
    return importlib.import_module(f"tests.support.{name}")


def offline():
    """``tests/support/offline.py``: the offline tokenizer and tiny-model builders (no network)."""
    return support("offline")


def count_compilations(fun_name: str | None = "train_step"):
    """``tests/support/compilations.py``'s counter of XLA compilations (a context manager)."""
    return support("compilations").count_compilations(fun_name)


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``: resident now; ``VmHWM``: the peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def save_random_model(config, path: str):
    """A random fp32 model of ``config`` (seed 0) and the tiny offline tokenizer, saved to ``path``; the model."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(path)
    offline().make_tokenizer().save_pretrained(path)  # ids are fed directly; the tokenizer only has to exist
    return model


def save_random_llama(path: str, **config_kwargs) -> int:
    """Save a random fp32 Llama of ``config_kwargs`` (and the tiny tokenizer) to ``path``; its parameter count."""
    from transformers import LlamaConfig

    model = save_random_model(LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **config_kwargs), path)
    return sum(p.numel() for p in model.parameters())


def run_worker(script: str, name: str, model_dir: str, *extra: str) -> dict:
    """Run ``script --worker name --model-dir model_dir *extra`` in a fresh interpreter; its last JSON line."""
    proc = subprocess.run([sys.executable, script, "--worker", name, "--model-dir", model_dir, *extra],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
