"""Full checkpoints of the JAX trainer: what ``save_steps`` writes and ``resume_from_checkpoint`` reads.

A checkpoint directory ``checkpoint-N`` holds

* the model as a Hugging Face directory (config, safetensors, tokenizer, generation config) — what
  ``save_model`` writes, loadable by ``AutoModelForCausalLM`` (with LoRA: a PEFT adapter directory);
* ``train_state/``: the ``TrainState`` (fp32 master params, optimizer state, step, rng) with orbax — with
  LoRA the adapters and their optimizer state, not the frozen base (the resuming trainer loads it);
* ``itersft_state.json``: the trainer's counters (global step, step() calls that seed the shuffle, packed row
  length, log history), so a resumed run continues exactly where the saved one was;
* ``itersft_manifest.json``, written last: the size and SHA-256 of every other file.

**Atomic.** Everything is written into ``.tmp-checkpoint-N-<pid>`` beside the final directory, every file
is fsynced, the manifest written, and the directory renamed to ``checkpoint-N`` at the very end. A process
killed at any moment leaves the complete checkpoint or a temporary — never a partial ``checkpoint-N`` —
and the next save removes temporaries of processes that are gone. ``save_total_limit`` counts complete
checkpoints only, so it never deletes the newest complete one.

**Verified.** Before loading, every file is checked against the manifest: a missing manifest (a save that
never finished, a checkpoint of an older itersft, deleted metadata), a missing file, a size that changed
(truncated) or a checksum that changed (flipped bytes) raises :class:`CheckpointError` naming the
checkpoint and the file. ``resume_from_checkpoint(True)`` takes the newest checkpoint that verifies and
logs a warning for every newer one it skipped, with the reason.

**Cost.** Hashing reads every file once more: after a save from the page cache, in the pass that fsyncs
it; at resume before orbax reads the train state, which then comes from the page cache when it fits in
RAM. Files are hashed in parallel threads (hashlib releases the GIL). ``benchmarks/checkpoint_cost.py``
measures it: a 485 MB checkpoint on 2 CPU cores (idle to busy) spends 18-30% of its save hashing and
fsyncing, and a verified resume takes 1.4-2x an unverified one (``load_checkpoint(..., verify=False)``
skips the check for a checkpoint you trust). Verifying while orbax reads, in a second thread, measured no
faster there, so the simpler order stays.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import jax

from itersft_jax.shared.atomic_dir import (  # noqa: F401  (CheckpointError, hash_tree, HASH_THREADS: public here)
    HASH_THREADS,
    MANIFEST_FILE,
    CheckpointError,
    check_counters,
    check_state_target,
    finish,
    hash_tree,
    process_alive,
    read_json,
    remove_dir,
    verify,
    write_synced,
)

logger = logging.getLogger(__name__)

STATE_DIR = "train_state"
SHELL_FILE = "itersft_state.json"
TORCH_STATE_FILE = "torch_state.pt"  # what the PyTorch engine's save_state writes instead of STATE_DIR
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_LEFTOVER = re.compile(r"\.(?:tmp|trash)-checkpoint-\d+-(\d+)")  # temporaries and deletions in progress


# ----------------------------------------------------------------------------------------------------------
# Saving


def _storable(train_state):
    # orbax stores plain arrays; a typed PRNG key becomes its raw key data. Frozen parameters (LoRA's base)
    # are not stored: they never change, and the trainer that resumes has loaded them from the same base.
    return dataclasses.replace(train_state, rng=jax.random.key_data(train_state.rng), frozen=None)


def save_checkpoint(checkpoint_dir: str, train_state, counters: dict[str, Any], *,
                    write_model: Callable[[str], Any], output_dir: str | None = None) -> str:
    """Write a full checkpoint to ``checkpoint_dir``, atomically (see the module docstring): ``write_model(dir)``
    writes the model files (a trainer passes its ``save_model``), ``train_state`` goes to orbax, ``counters`` (a
    JSON-serializable dict with ``global_step``) beside them. An existing checkpoint there is replaced. A path that
    exists and is not a checkpoint or state directory itersft wrote (nor an empty directory), the working directory
    and the directories above it or above ``output_dir``, and a file are refused before anything is written
    (``atomic_dir.check_state_target``).

    Several processes (``jax.distributed``): every process calls it with the same directory on a filesystem
    they share; each writes its own shards of the train state (orbax), process 0 the model files, counters and
    manifest, and renames the directory once every process has finished (barriers between the phases)."""
    import orbax.checkpoint as ocp

    main = jax.process_index() == 0
    checkpoint_dir = check_state_target(checkpoint_dir, "checkpoint_dir", output_dir=output_dir)
    parent, name = os.path.split(checkpoint_dir)
    tmp = os.path.join(parent, f".tmp-{name}-{_main_pid()}")
    if main:
        os.makedirs(parent, exist_ok=True)
        remove_leftovers(parent)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier("itersft-checkpoint-start")
    try:
        write_model(tmp)  # every process takes part (parameters are gathered); process 0 writes
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, STATE_DIR), _storable(train_state))
            checkpointer.wait_until_finished()
        _barrier("itersft-checkpoint-state")
        if main:
            _finish(counters, tmp, checkpoint_dir)
        _barrier("itersft-checkpoint-done")
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return checkpoint_dir


def _finish(counters: dict[str, Any], tmp: str, checkpoint_dir: str) -> None:
    """Counters and manifest into ``tmp``, everything fsynced, then renamed to ``checkpoint_dir``."""
    data = json.dumps(counters, indent=2).encode()
    written = {SHELL_FILE: write_synced(os.path.join(tmp, SHELL_FILE), data)}  # hashed while writing
    finish(tmp, checkpoint_dir, written, counters["global_step"])


def _main_pid() -> int:
    """Process 0's pid on every process (names the shared temporary directory; leftovers of dead runs are
    recognised by it)."""
    if jax.process_count() == 1:
        return os.getpid()
    import numpy as np
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(os.getpid())))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------------------
# Finding, verifying and loading


def verify_checkpoint(checkpoint_dir: str) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; returns the manifest. Raises
    :class:`CheckpointError` naming the checkpoint and the file that is missing, truncated or changed."""
    return verify(checkpoint_dir, SHELL_FILE, "the JAX trainer's save_checkpoint")


def load_checkpoint(checkpoint_dir: str, like, verify: bool = True) -> tuple[Any, dict[str, Any]]:
    """``(train state, counters)`` of a checkpoint written by :func:`save_checkpoint`, after verifying it
    (``verify``); the state is shaped and sharded like the train state ``like`` (same model and optimizer; its
    frozen parameters are ``like``'s). Nothing is assigned: the caller takes both or neither."""
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    if verify:
        verify_checkpoint(checkpoint_dir)
    import orbax.checkpoint as ocp

    if not os.path.isdir(os.path.join(checkpoint_dir, STATE_DIR)):
        if os.path.isfile(os.path.join(checkpoint_dir, TORCH_STATE_FILE)):
            raise CheckpointError(f"state {checkpoint_dir} was written by the PyTorch engine's save_state "
                                  f"({TORCH_STATE_FILE}): load it with a backend='torch' trainer")
        raise CheckpointError(f"checkpoint {checkpoint_dir}: {STATE_DIR}/ is missing")
    counters = check_counters(read_json(checkpoint_dir, SHELL_FILE), f"checkpoint {checkpoint_dir}: {SHELL_FILE}")
    current = _storable(like)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(os.path.join(checkpoint_dir, STATE_DIR), target)
    except Exception as err:  # intact bytes that do not fit: another model or optimizer wrote them
        detail = str(err) if len(str(err)) < 600 else str(err)[:600] + " ..."
        raise ValueError(f"checkpoint {checkpoint_dir}: {STATE_DIR}/ does not match this trainer's model and "
                         f"optimizer (saved by another configuration?): {type(err).__name__}: {detail}") from err
    return dataclasses.replace(restored, rng=jax.random.wrap_key_data(restored.rng), frozen=like.frozen), counters


def checkpoints(output_dir: str) -> list[str]:
    """The ``checkpoint-N`` directories under ``output_dir``, oldest first (complete or not)."""
    if not os.path.isdir(output_dir):
        return []
    steps = sorted((int(m.group(1)), name) for name in os.listdir(output_dir)
                   if (m := _CHECKPOINT.fullmatch(name)) and os.path.isdir(os.path.join(output_dir, name)))
    return [os.path.join(output_dir, name) for _, name in steps]


def is_complete(checkpoint_dir: str) -> bool:
    """Whether the save finished (the manifest, written last, is there); :func:`verify_checkpoint` checks
    the content."""
    return os.path.isfile(os.path.join(checkpoint_dir, MANIFEST_FILE))


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete ``checkpoint-N`` directory with the largest N under ``output_dir``, or None."""
    complete = [path for path in checkpoints(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def resume_from_checkpoint(output_dir: str, like, checkpoint_dir: str | bool = True) -> tuple[str, Any, dict]:
    """``(checkpoint used, train state, counters)`` read from ``checkpoint_dir``, or with ``True`` from the newest
    checkpoint under ``output_dir`` that verifies: newer ones that are incomplete or damaged are skipped with a
    warning saying why (:func:`load_checkpoint`, shaped like ``like``)."""
    if checkpoint_dir is not True:
        if not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"`resume_from_checkpoint` takes a checkpoint directory or True, got {checkpoint_dir!r}")
        return (os.fspath(checkpoint_dir), *load_checkpoint(os.fspath(checkpoint_dir), like))
    candidates = checkpoints(output_dir)
    if not candidates:
        raise ValueError(f"`resume_from_checkpoint`: no checkpoint-N directory in {output_dir}")
    skipped = []
    for path in reversed(candidates):
        try:
            loaded = load_checkpoint(path, like)
        except CheckpointError as err:  # incomplete or damaged; a configuration mismatch is raised as is
            logger.warning("resume_from_checkpoint: skipping %s: %s", os.path.basename(path), err)
            skipped.append(f"{os.path.basename(path)}: {err}")
            continue
        if skipped:
            logger.warning("resume_from_checkpoint: resumed from %s, the newest complete checkpoint (%d newer "
                           "skipped)", path, len(skipped))
        return (path, *loaded)
    raise ValueError(f"`resume_from_checkpoint`: no complete checkpoint in {output_dir}:\n  " + "\n  ".join(skipped))


# ----------------------------------------------------------------------------------------------------------
# Removing


def remove_leftovers(output_dir: str) -> None:
    """Delete temporaries and half-deleted checkpoints of interrupted saves (of processes that are gone)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if (m := _LEFTOVER.fullmatch(name)) and not process_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def rotate_checkpoints(output_dir: str, save_total_limit: int | None) -> None:
    """Keep the newest ``save_total_limit`` complete ``checkpoint-N`` directories (HF's
    ``save_total_limit``); incomplete ones older than the newest complete one are removed too, and never
    counted as kept."""
    if not save_total_limit or save_total_limit <= 0:
        return
    found = checkpoints(output_dir)
    complete = [path for path in found if is_complete(path)]
    if not complete:
        return
    newest = complete[-1]
    stale = complete[:-save_total_limit] + [p for p in found[:found.index(newest)] if not is_complete(p)]
    for path in stale:
        remove_dir(path)
