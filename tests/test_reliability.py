"""Nothing lost, nothing silent: kill -9 during saves, damaged checkpoints, secrets, clear errors, bounded
generate() compilations (issue 13). The README's "Reliability" table lists what each test shows."""

from __future__ import annotations

import logging
import os
import re
import shutil

import kill_resume
import numpy as np
import pytest

from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer
from itersft_jax.io.checkpoint import MANIFEST_FILE

# ----------------------------------------------------------------------------------------------------------
# kill -9 during saves (the whole 10-kill run: `python tests/kill_resume.py`)


def test_kill_9_during_saves_then_resume_is_bit_identical(tiny_model_dir, tmp_path):
    """A worker trains with save_steps=1 and is SIGKILLed inside a save; the output directory never holds a
    partial checkpoint-N, and resuming gives later losses and parameters bit-identical to a run that was
    never interrupted. On a non-atomic save the kill leaves a partial newest checkpoint-N."""
    model_dir, calls = tiny_model_dir("llama"), 5
    reference = []
    trainer = kill_resume.make_trainer(model_dir, str(tmp_path / "reference"))
    kill_resume.run_calls(trainer, 0, calls, reference.append)
    with open(tmp_path / "workers.log", "w") as log:
        for kill, (kill_call, fraction) in enumerate([(2, 0.3), (3, 0.7)]):  # a call here is mostly its save
            out = str(tmp_path / f"kill-{kill}")
            left = kill_resume.kill_during_call(model_dir, out, calls, kill_call, fraction, log)
            partial = [name for name in os.listdir(out)
                       if name.startswith("checkpoint-") and not os.path.isfile(os.path.join(out, name, MANIFEST_FILE))]
            assert not partial, f"kill {kill}: partial checkpoints visible after the kill: {left}"
            trainer.args.output_dir = out  # the reference trainer resumes (its train step is compiled already)
            path = trainer.resume_from_checkpoint(True)
            start = trainer.counters()["calls"]
            lines = [f"RESUMED {os.path.basename(path)} {start}"]
            kill_resume.run_calls(trainer, start, calls, lines.append)
            ok, resumed, detail = kill_resume.check_resume(lines, reference)
            assert ok, f"kill {kill} in call {kill_call} (left: {left}), resumed from {resumed}: {detail}"
            assert not [n for n in os.listdir(out) if n.startswith(".")], "stale temporaries were not removed"


# ----------------------------------------------------------------------------------------------------------
# Secrets never on disk or in logs

TOKEN = "hf_reliabilityHubToken0123456789"


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_hub_tokens_never_reach_disk_or_logs(backend, tiny_model_dir, tmp_path, caplog, capfd):
    """The torch backend pickles its TrainingArguments into every checkpoint and save_model directory
    (training_args.bin); before, the hub_token and model_init_kwargs' token were in it in plain text."""
    args = IterativeSFTConfig(output_dir=str(tmp_path), hub_token=TOKEN, model_init_kwargs={"token": TOKEN + "-2"},
                              backend=backend, save_strategy="steps", save_steps=1, logging_steps=1,
                              per_device_train_batch_size=2, gradient_checkpointing=False, report_to="none")
    with caplog.at_level(logging.DEBUG):
        trainer = IterativeSFTTrainer(tiny_model_dir("llama"), args=args)
        trainer.step(texts=["hello world", "a b c"])
        logging.getLogger("itersft").info("config: %s", trainer.args)  # what a user's log line would show
        trainer.save_model(str(tmp_path / "final"))
    files = [os.path.join(d, f) for d, _, names in os.walk(tmp_path) for f in names]
    assert any(f.endswith(os.path.join("checkpoint-1", "training_args.bin")) for f in files) == (backend == "torch")
    for path in files:
        with open(path, "rb") as f:
            assert TOKEN.encode() not in f.read(), f"the hub token is in {path}"
    out, err = capfd.readouterr()
    assert TOKEN not in caplog.text + out + err
    assert trainer.args.hub_token == TOKEN and trainer.args.model_init_kwargs["token"] == TOKEN + "-2"  # usable
    if backend == "torch":
        import torch

        saved = torch.load(os.path.join(tmp_path, "final", "training_args.bin"), weights_only=False)
        assert saved.hub_token is None and saved.model_init_kwargs == {} and saved.learning_rate == args.learning_rate


# ----------------------------------------------------------------------------------------------------------
# Clear errors: the type and the argument or file they are about


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_bad_model_argument_names_it(backend, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in ("./no-such-model", str(tmp_path / "absent"), "runs/2024/final", "../elsewhere/model"):
        with pytest.raises(FileNotFoundError, match=f"`model`: local path '{re.escape(missing)}' does not exist"):
            IterativeSFTTrainer(missing, backend=backend)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="weights.bin' is a file"):
        IterativeSFTTrainer("weights.bin", backend=backend)
    with pytest.raises(TypeError, match="`model` must be"):
        IterativeSFTTrainer(12345, backend=backend)


def test_model_init_kwargs_must_be_a_dict(tmp_path):
    with pytest.raises(TypeError, match="`model_init_kwargs` must be a dict.*got list"):
        IterativeSFTConfig(output_dir=str(tmp_path), model_init_kwargs=[("revision", "main")])


def _damage(path: str, how: str) -> None:
    data = open(path, "rb").read()
    header_len = int.from_bytes(data[:8], "little")
    data = {"cut to 5 bytes": data[:5],
            "cut inside the header": data[:header_len // 2],
            "garbage header": data[:8] + b"\xff" * header_len + data[8 + header_len:],
            "cut inside the data": data[:8 + header_len + (len(data) - 8 - header_len) // 2]}[how]
    open(path, "wb").write(data)


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("how", ["cut to 5 bytes", "cut inside the header", "garbage header", "cut inside the data"])
def test_damaged_safetensors_raise_naming_the_file(how, backend, tiny_model_dir, tmp_path):
    """Before: JSONDecodeError / UnicodeDecodeError / "cannot reshape" (JAX) and SafetensorError (torch),
    none naming the file."""
    model_dir = shutil.copytree(tiny_model_dir("llama"), tmp_path / "model")
    path = str(model_dir / "model.safetensors")
    _damage(path, how)
    with pytest.raises(ValueError, match=re.escape(path) + ": .*(truncated|damaged)"):
        IterativeSFTTrainer(str(model_dir), backend=backend)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_samples_longer_than_the_position_table_warn_once(backend, tiny_model_dir, tmp_path, caplog):
    args = IterativeSFTConfig(output_dir=str(tmp_path), backend=backend, per_device_train_batch_size=2,
                              gradient_checkpointing=False, report_to="none")
    trainer = IterativeSFTTrainer(tiny_model_dir("llama", max_position_embeddings=24), args=args)
    with caplog.at_level(logging.WARNING, logger="itersft_jax.shared.data"):
        trainer.step(input_ids=[list(range(3, 33)), list(range(3, 10))])  # 30 tokens, 24 positions
        trainer.step(input_ids=[list(range(3, 34))])
    assert caplog.text.count("max_position_embeddings") == 1
    assert "a sample of 30 tokens is longer than the model's max_position_embeddings=24" in caplog.text


def test_position_warning_threshold(caplog):
    from itersft_jax.shared.data import Example, warn_beyond_positions

    samples = [Example(np.arange(n), np.arange(n)) for n in (5, 24)]
    with caplog.at_level(logging.WARNING, logger="itersft_jax.shared.data"):
        class Owner:  # stands for a trainer
            pass

        owner = Owner()
        warn_beyond_positions(samples, 24, owner)
        warn_beyond_positions(samples, None, owner)  # no limit known: nothing to say
        assert not caplog.text
        warn_beyond_positions(samples + [Example(np.arange(25), np.arange(25))], 24, owner)
        assert "a sample of 25 tokens" in caplog.text


