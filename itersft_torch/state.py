"""``save_state`` / ``load_state`` on the PyTorch engine: the whole training state, atomic and verified.

A state directory holds ``torch_state.pt`` (the model's ``state_dict``, the optimizer's and the schedule's, torch's
RNG states — CPU and CUDA —, the fp16 grad scaler's), ``itersft_state.json`` (the flow's counters: global step,
step() calls that seed the shuffle, log history, tokens seen) and the manifest, written last, with the size and
SHA-256 of both (``itersft_jax.shared.atomic_dir``, the protocol of the JAX engine's checkpoints): written into a
temporary beside ``path``, fsynced, renamed. A process killed during a save leaves the previous state or the new one,
never a mix; loading verifies every byte first and changes nothing unless everything was read and fits. Under DDP the
main process writes (the replicas are equal; every process's RNG state is gathered into the file) and every process
returns once the state is complete; every process loads it and takes back its own RNG state.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import torch

from itersft_jax.shared.atomic_dir import (
    CheckpointError,
    check_counters,
    check_state_source,
    check_state_target,
    finish,
    temporary_for,
    verify,
    write_synced,
)

STATE_FILE = "torch_state.pt"
SHELL_FILE = "itersft_state.json"


def _optimizer(trainer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def save_state(trainer, path: str) -> str:
    """Write ``trainer``'s state to ``path`` atomically (an existing state there is replaced; a directory that is
    not one, the working directory, a file: refused, see ``atomic_dir.check_state_target``); returns the path."""
    path = check_state_target(path, "path", output_dir=trainer.args.output_dir)
    accelerator = trainer.accelerator
    if accelerator.num_processes > 1 and trainer.is_fsdp_enabled:
        raise NotImplementedError("save_state on several processes runs under DDP; under FSDP use save_model and "
                                  "the checkpoints of save_strategy")
    rngs = _every_process(accelerator, torch.get_rng_state())  # each process's, restored on the same rank
    error = None
    if accelerator.is_main_process:  # the replicas are equal under DDP: the main process writes
        try:
            _write_state(trainer, path, rngs)
        except BaseException as err:
            error = err
    if accelerator.num_processes > 1:  # every process returns once the state is complete, or raises with the writer
        failed = _every_process(accelerator, None if error is None else f"{type(error).__name__}: {error}")[0]
        if failed is not None and error is None:
            raise RuntimeError(f"save_state: the main process failed to write {path}: {failed}")
    if error is not None:
        raise error
    return path


def _every_process(accelerator, value) -> list:
    """``value`` of every process, in rank order (one process: ``[value]``)."""
    if accelerator.num_processes == 1:
        return [value]
    import torch.distributed as dist

    values: list = [None] * accelerator.num_processes
    dist.all_gather_object(values, value)
    return values


def _write_state(trainer, path: str, rngs: list) -> None:
    tmp = temporary_for(path)
    os.makedirs(tmp)
    try:
        model = trainer.accelerator.unwrap_model(trainer.model)
        blob = {"engine": "torch", "optimizer_class": type(_optimizer(trainer)).__name__,
                "scheduler_class": type(trainer.lr_scheduler).__name__,
                "model": model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.lr_scheduler.state_dict(), "rng": rngs[0], "rng_per_process": rngs,
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


def load_state(trainer, path: str) -> str:
    """Restore what :func:`save_state` wrote. Everything is checked first — every file against the manifest, then
    that the state fits this trainer (the engine, the model's parameter names and shapes, the optimizer's and the
    schedule's type and parameter groups, the counters) — and nothing changes unless it all fits: a mismatch raises
    :class:`CheckpointError` naming what differs, the trainer untouched."""
    path = check_state_source(path)
    if os.path.isdir(os.path.join(path, "train_state")) and not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise CheckpointError(f"state {path} was written by the JAX engine (train_state/): load it with a "
                              f"backend='jax' trainer")
    verify(path, SHELL_FILE, "the PyTorch trainer's save_state")
    with open(os.path.join(path, SHELL_FILE), "rb") as f:
        try:
            counters = check_counters(json.loads(f.read()), f"state {path}: {SHELL_FILE}")
        except ValueError as err:
            raise CheckpointError(f"state {path}: {SHELL_FILE} is damaged ({err})") from None
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise CheckpointError(f"state {path}: {STATE_FILE} is missing")
    try:
        blob = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"state {path}: {STATE_FILE} cannot be read ({type(err).__name__}: {err})") from None
    _check_fits(trainer, blob, path)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.load_state_dict(blob["model"])
    trainer.optimizer.load_state_dict(blob["optimizer"])
    trainer.lr_scheduler.load_state_dict(blob["scheduler"])
    if trainer.accelerator.scaler is not None and blob["scaler"] is not None:
        trainer.accelerator.scaler.load_state_dict(blob["scaler"])
    per_process = blob.get("rng_per_process") or [blob["rng"]]
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    # each process's own generator when the process count is the one saved; else the main process's everywhere
    torch.set_rng_state(per_process[rank] if len(per_process) == world else blob["rng"])
    if blob["cuda_rng"]:
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    trainer.restore_counters(counters)
    return path


def _check_fits(trainer, blob, path: str) -> None:
    """:class:`CheckpointError` naming what of the saved state does not fit ``trainer``."""
    keys = {"model", "optimizer", "scheduler", "rng", "cuda_rng", "scaler"}
    if not isinstance(blob, dict) or not keys <= set(blob):
        raise CheckpointError(f"state {path}: {STATE_FILE} is not a state itersft's PyTorch engine wrote")
    model = trainer.accelerator.unwrap_model(trainer.model)
    current, saved = model.state_dict(), blob["model"]
    differing = sorted(set(current) ^ set(saved)) or [k for k in current if current[k].shape != saved[k].shape]
    if differing:
        raise CheckpointError(f"state {path} was saved from another model (parameters differing: {differing[:5]})")
    optimizer = _optimizer(trainer)
    for what, saved_class, now in (("optimizer", blob.get("optimizer_class"), type(optimizer).__name__),
                                   ("learning-rate schedule", blob.get("scheduler_class"),
                                    type(trainer.lr_scheduler).__name__)):
        if saved_class is not None and saved_class != now:
            raise CheckpointError(f"state {path} was saved with the {what} {saved_class}; this trainer uses {now} "
                                  f"(`optim` / `lr_scheduler_type` differ)")
    settings_now = {frozenset(g) for g in optimizer.state_dict()["param_groups"]}
    settings_saved = {frozenset(g) for g in blob["optimizer"].get("param_groups", [])}
    if settings_now != settings_saved:  # AdamW's groups hold betas and eps, SGD's momentum and nesterov, ...
        extra = sorted(set().union(*settings_saved) ^ set().union(*settings_now))
        raise CheckpointError(f"state {path} was saved with another optimizer (its settings differ in {extra}; "
                              f"`optim` differs)")
    groups_now = [len(g["params"]) for g in optimizer.state_dict()["param_groups"]]
    groups_saved = [len(g["params"]) for g in blob["optimizer"].get("param_groups", [])]
    if groups_now != groups_saved:
        raise CheckpointError(f"state {path}: the optimizer's parameter groups differ (saved {groups_saved} "
                              f"parameters per group, this trainer {groups_now})")
    state_now = optimizer.state_dict()["state"]
    keys_now = {frozenset(v) for v in state_now.values()}
    keys_saved = {frozenset(v) for v in blob["optimizer"].get("state", {}).values()}
    if keys_now and keys_saved and keys_now != keys_saved:
        raise CheckpointError(f"state {path}: the optimizer state holds {sorted(set().union(*keys_saved))}, this "
                              f"trainer's optimizer {sorted(set().union(*keys_now))} (another `optim`)")
