"""Full JAX checkpoints: a resumed trainer continues exactly where the saved one was; incomplete or damaged
checkpoints are never loaded silently (kill -9 during saves: tests/test_reliability.py)."""

import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from transformers import AutoModelForCausalLM

from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer
from itersft_jax.io.checkpoint import (
    MANIFEST_FILE,
    SHELL_FILE,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    remove_leftovers,
    rotate_checkpoints,
)

CALL_1 = ["The quick brown fox jumps over the lazy dog. " * 3, "hello world", "a b c", "JAX and PyTorch"]
CALL_2 = ["Rejection sampling", "0123", "def add(a, b):"]  # shorter: the packed row length must be restored


def _trainer(model_dir, tmp_path):
    args = IterativeSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-3,
                              warmup_steps=2, weight_decay=0.1, gradient_checkpointing=False, logging_steps=1,
                              report_to="none")
    return IterativeSFTTrainer(model_dir, args=args)


def _params(trainer):
    return jax.tree.leaves(jax.device_get(nnx.to_pure_dict(trainer.params)))


def test_resume_is_exact(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    a = _trainer(model_dir, tmp_path / "a")
    a.step(texts=CALL_1)
    path = a.save_checkpoint()
    assert path.endswith("checkpoint-2")
    a.step(texts=CALL_2)

    b = _trainer(model_dir, tmp_path / "a")
    assert b.resume_from_checkpoint() == path  # True: the latest checkpoint-N under output_dir
    counters = b.counters()
    assert counters["global_step"] == 2 and counters["calls"] == 1 and len(counters["log_history"]) == 2
    assert counters["row_length"] == 96  # CALL_1's packed row length, longer than CALL_2 alone would pick
    b.step(texts=CALL_2)  # same shuffle (call counter), same Adam moments and schedule position
    for x, y in zip(_params(a), _params(b)):
        np.testing.assert_array_equal(x, y)
    untimed = [[{k: v for k, v in e.items() if k != "tokens_per_second"} for e in t.state.log_history] for t in (a, b)]
    assert untimed[0] == untimed[1]  # tokens/s is a measured time

    hf = AutoModelForCausalLM.from_pretrained(path)  # the checkpoint is also a Hugging Face directory
    assert hf.config.model_type == "llama"


def test_checkpoint_helpers(tmp_path, tiny_model_dir):
    for n in (2, 10, 4):
        os.makedirs(tmp_path / f"checkpoint-{n}")
        (tmp_path / f"checkpoint-{n}" / MANIFEST_FILE).write_text("{}")
    for name in ("checkpoint-3", "checkpoint-12"):  # no manifest: interrupted saves
        os.makedirs(tmp_path / name)
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-10")  # never an incomplete one
    # save_total_limit counts complete checkpoints only: the newest complete one always stays; incomplete
    # ones older than it go, a newer one is left for resume to report.
    rotate_checkpoints(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-12"]
    assert latest_checkpoint(str(tmp_path / "missing")) is None

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(gone.stdout), os.getppid()
    for name in (f".tmp-checkpoint-13-{dead}", f".trash-checkpoint-9-{dead}", f".tmp-checkpoint-14-{alive}"):
        os.makedirs(tmp_path / name)
    remove_leftovers(str(tmp_path))  # what every save does first: temporaries of processes that are gone
    assert sorted(os.listdir(tmp_path)) == [f".tmp-checkpoint-14-{alive}", "checkpoint-10", "checkpoint-12"]

    trainer = _trainer(tiny_model_dir("llama"), tmp_path / "t")
    with pytest.raises(CheckpointError, match=f"checkpoint-12 is incomplete: it has no {MANIFEST_FILE}"):
        load_checkpoint(str(tmp_path / "checkpoint-12"), trainer.train_state)
    with pytest.raises(CheckpointError, match=f"checkpoint-10: {MANIFEST_FILE} is not an itersft manifest"):
        load_checkpoint(str(tmp_path / "checkpoint-10"), trainer.train_state)
    with pytest.raises(ValueError, match="resume_from_checkpoint.*no checkpoint-N"):
        trainer.resume_from_checkpoint()


@pytest.fixture(scope="module")
def two_checkpoints(tiny_model_dir, tmp_path_factory):
    """A trainer with checkpoint-2 and checkpoint-4 in its output_dir, a pristine copy of checkpoint-4, and
    the parameters and counters of checkpoint-2."""
    out = tmp_path_factory.mktemp("damage")
    trainer = _trainer(tiny_model_dir("llama"), out)
    trainer.step(texts=CALL_1)
    first = trainer.save_checkpoint()
    params_first, counters_first = _params(trainer), trainer.counters()
    trainer.step(texts=CALL_2)
    second = trainer.save_checkpoint()
    shutil.copytree(second, out / "pristine")
    return trainer, first, second, out / "pristine", params_first, counters_first


def _data_file(checkpoint: str) -> str:
    """The largest array file of the orbax train state (relative path)."""
    files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(checkpoint, "train_state")) for f in names]
    return os.path.relpath(max(files, key=os.path.getsize), checkpoint)


def _flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", ["flipped bytes in the train state", "flipped bytes in the safetensors",
                                    "truncated train state", "deleted counters", "deleted orbax metadata",
                                    "deleted manifest", "truncated manifest"])
def test_damaged_checkpoint_raises_naming_the_file_and_latest_falls_back(two_checkpoints, damage, caplog):
    trainer, first, second, pristine, params_first, counters_first = two_checkpoints
    shutil.rmtree(second)
    shutil.copytree(pristine, second)
    data = _data_file(second)
    target, expected = {
        "flipped bytes in the train state": (data, f"file {data} changed since it was saved"),
        "flipped bytes in the safetensors": ("model.safetensors", "file model.safetensors changed since it was saved"),
        "truncated train state": (data, rf"file {data} has \d+ bytes, \d+ were saved"),
        "deleted counters": (SHELL_FILE, f"file {SHELL_FILE} is missing"),
        "deleted orbax metadata": ("train_state/_METADATA", "file train_state/_METADATA is missing"),
        "deleted manifest": (MANIFEST_FILE, f"is incomplete: it has no {MANIFEST_FILE}"),
        "truncated manifest": (MANIFEST_FILE, rf"{MANIFEST_FILE} is damaged \(not valid JSON"),
    }[damage]
    path = os.path.join(second, target)
    if damage.startswith("flipped"):
        _flip_byte(path)
    elif damage.startswith("truncated"):
        _truncate(path)
    else:
        os.remove(path)

    before = _params(trainer)
    with pytest.raises(CheckpointError, match=f"checkpoint {second}.*{expected}"):
        trainer.resume_from_checkpoint(second)
    for x, y in zip(before, _params(trainer)):  # a refused checkpoint changes nothing
        np.testing.assert_array_equal(x, y)

    with caplog.at_level(logging.WARNING, logger="itersft_jax.io.checkpoint"):
        assert trainer.resume_from_checkpoint(True) == first
    assert re.search(f"skipping checkpoint-4: checkpoint {second}.*{expected}", caplog.text)  # which, and why
    assert trainer.counters() == counters_first
    for x, y in zip(params_first, _params(trainer)):
        np.testing.assert_array_equal(x, y)


def test_save_steps_write_full_checkpoints_and_honour_save_total_limit(tiny_model_dir, tmp_path):
    args = IterativeSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=1, save_strategy="steps",
                              save_steps=1, save_total_limit=2, gradient_checkpointing=False, report_to="none")
    trainer = IterativeSFTTrainer(tiny_model_dir("llama"), args=args)
    trainer.step(texts=CALL_2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]
    assert os.path.isdir(tmp_path / "checkpoint-3" / "train_state")


def test_checkpoint_of_another_model_is_refused_not_skipped(two_checkpoints, tiny_model_dir, tmp_path):
    _, first, second, pristine, *_ = two_checkpoints
    shutil.rmtree(second)
    shutil.copytree(pristine, second)
    other = _trainer(tiny_model_dir("llama", num_hidden_layers=1), tmp_path)
    with pytest.raises(ValueError, match="checkpoint-2: train_state/ does not match this trainer's model"):
        other.resume_from_checkpoint(first)
    other.args.output_dir = os.path.dirname(second)  # intact checkpoints of another model: an error, no fallback
    with pytest.raises(ValueError, match="checkpoint-4: train_state/ does not match this trainer's model"):
        other.resume_from_checkpoint(True)
