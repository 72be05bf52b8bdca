"""Full checkpoints of the JAX trainer: what ``save_steps`` writes and ``resume_from_checkpoint`` reads.

A checkpoint directory holds

* the model as a Hugging Face directory (config, safetensors, tokenizer, generation config) — what
  ``save_model`` writes, loadable by ``AutoModelForCausalLM``;
* ``train_state/``: the whole ``TrainState`` (fp32 master params, optimizer state, step, rng) with orbax;
* ``itersft_state.json``: the shell's counters (global step, step() calls that seed the shuffle, log
  history), so a resumed run continues exactly where the saved one was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import jax

STATE_DIR = "train_state"
SHELL_FILE = "itersft_state.json"


def _storable(train_state):
    # orbax stores plain arrays; a typed PRNG key becomes its raw key data.
    return dataclasses.replace(train_state, rng=jax.random.key_data(train_state.rng))


def save_checkpoint(trainer, checkpoint_dir: str) -> str:
    """Write a full checkpoint of ``trainer`` to ``checkpoint_dir`` (created; replaced if it exists)."""
    import orbax.checkpoint as ocp

    checkpoint_dir = os.path.abspath(checkpoint_dir)
    if os.path.exists(checkpoint_dir):
        shutil.rmtree(checkpoint_dir)
    trainer.save_model(checkpoint_dir)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(checkpoint_dir, STATE_DIR), _storable(trainer.train_state))
    checkpointer.wait_until_finished()
    shell = {"global_step": trainer.state.global_step, "calls": trainer._calls, "row_length": trainer._row_length,
             "log_history": trainer.state.log_history,
             "num_input_tokens_seen": trainer.state.num_input_tokens_seen}
    with open(os.path.join(checkpoint_dir, SHELL_FILE), "w") as f:
        json.dump(shell, f, indent=2)
    return checkpoint_dir


def load_checkpoint(trainer, checkpoint_dir: str) -> None:
    """Restore ``trainer`` from a checkpoint written by :func:`save_checkpoint` (same model and optimizer)."""
    import orbax.checkpoint as ocp

    checkpoint_dir = os.path.abspath(checkpoint_dir)
    state_path = os.path.join(checkpoint_dir, STATE_DIR)
    if not os.path.isdir(state_path):
        raise ValueError(f"`resume_from_checkpoint`: {checkpoint_dir} has no {STATE_DIR}/ (not a full checkpoint "
                         f"written by the JAX trainer's save_steps or save_checkpoint)")
    current = _storable(trainer.train_state)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current)
    restored = ocp.StandardCheckpointer().restore(state_path, target)
    trainer.train_state = dataclasses.replace(restored, rng=jax.random.wrap_key_data(restored.rng))
    with open(os.path.join(checkpoint_dir, SHELL_FILE)) as f:
        shell = json.load(f)
    trainer.state.global_step = shell["global_step"]
    trainer.state.log_history = shell["log_history"]
    trainer.state.num_input_tokens_seen = shell.get("num_input_tokens_seen")
    trainer._calls = shell["calls"]
    trainer._row_length = shell.get("row_length", 0)  # same packing layout: the same summation order


def latest_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-N`` directory with the largest N under ``output_dir``, or None."""
    if not os.path.isdir(output_dir):
        return None
    steps = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(output_dir, name))]
    return os.path.join(output_dir, max(steps)[1]) if steps else None


def rotate_checkpoints(output_dir: str, save_total_limit: int | None) -> None:
    """Keep the newest ``save_total_limit`` ``checkpoint-N`` directories (HF's ``save_total_limit``)."""
    if not save_total_limit or save_total_limit <= 0 or not os.path.isdir(output_dir):
        return
    steps = sorted((int(m.group(1)), name) for name in os.listdir(output_dir)
                   if (m := re.fullmatch(r"checkpoint-(\d+)", name)))
    for _, name in steps[:-save_total_limit]:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
