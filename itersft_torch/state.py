"""``save_state`` / ``load_state`` on the PyTorch engine: the whole training state, atomic and verified.

A state directory holds ``torch_state.pt`` (the model's ``state_dict``, the optimizer's and the schedule's, torch's
RNG states — CPU and CUDA —, the fp16 grad scaler's), ``itersft_state.json`` (the shell's counters: global step,
step() calls that seed the shuffle, log history, tokens seen) and the manifest, written last, with the size and
SHA-256 of both (``itersft_jax.shared.atomic_dir``, the protocol of the JAX engine's checkpoints): written into a
temporary beside ``path``, fsynced, renamed. A process killed during a save leaves the previous state or the new one,
never a mix; loading verifies every byte first and changes nothing unless everything was read and fits.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import torch

from itersft_jax.shared.atomic_dir import CheckpointError, finish, temporary_for, verify, write_synced

STATE_FILE = "torch_state.pt"
SHELL_FILE = "itersft_state.json"


def save_state(trainer, path: str) -> str:
    """Write ``trainer``'s state to ``path`` atomically (an existing state there is replaced); returns the path."""
    path = os.path.abspath(os.fspath(path))
    tmp = temporary_for(path)
    os.makedirs(tmp)
    try:
        model = trainer.accelerator.unwrap_model(trainer.model)
        blob = {"model": model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.lr_scheduler.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "scaler": trainer.accelerator.scaler.state_dict() if trainer.accelerator.scaler is not None else None}
        buffer = io.BytesIO()
        torch.save(blob, buffer)
        written = {STATE_FILE: write_synced(os.path.join(tmp, STATE_FILE), buffer.getvalue()),
                   SHELL_FILE: write_synced(os.path.join(tmp, SHELL_FILE),
                                            json.dumps(trainer.counters(), indent=2).encode())}
        finish(tmp, path, written, trainer.state.global_step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_state(trainer, path: str) -> str:
    """Restore what :func:`save_state` wrote, after verifying it; nothing changes unless it all fits."""
    path = os.path.abspath(os.fspath(path))
    verify(path, SHELL_FILE, "the PyTorch trainer's save_state")
    with open(os.path.join(path, SHELL_FILE), "rb") as f:
        counters = json.loads(f.read())
    blob = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    current = model.state_dict()
    saved = blob["model"]
    mismatched = sorted(set(current) ^ set(saved)) or [k for k in current if current[k].shape != saved[k].shape]
    if mismatched:
        raise CheckpointError(f"state {path} was saved from another model (parameters differing: "
                              f"{mismatched[:5]})")
    model.load_state_dict(saved)
    trainer.optimizer.load_state_dict(blob["optimizer"])
    trainer.lr_scheduler.load_state_dict(blob["scheduler"])
    if trainer.accelerator.scaler is not None and blob["scaler"] is not None:
        trainer.accelerator.scaler.load_state_dict(blob["scaler"])
    torch.set_rng_state(blob["rng"])
    if blob["cuda_rng"]:
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    trainer.restore_counters(counters)
    return path
