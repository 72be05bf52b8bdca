"""Nothing lost, nothing silent: kill -9 during saves, damaged checkpoints, secrets, clear errors, bounded
generate() compilations (issue 13). The README's "Reliability" table lists what each test shows."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import signal

import numpy as np
import pytest

from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer
from itersft_jax.io.checkpoint import MANIFEST_FILE
from itersft_jax.shared.datum import Datum
from tests.support import kill_resume
from tests.support.engines import BACKENDS, fingerprint, make_trainer

# ----------------------------------------------------------------------------------------------------------
# kill -9 during saves (the whole 10-kill run: `python tests/kill_resume.py`)


def test_kill_9_during_saves_then_resume_is_bit_identical(tiny_model_dir, tmp_path):
    """A worker trains with save_steps=1, announces each save and is SIGKILLed 0.2 and 0.45 of a typical save's
    duration (~0.3 s; the rename into place comes after ~0.7 of it) after announcing one: the kill finds that save's
    temporary directory, the output directory never holds a partial checkpoint-N, and resuming gives later losses
    and parameters bit-identical to a run that was never interrupted. A save written in place leaves no temporary
    (and a partial checkpoint-N)."""
    model_dir, calls = tiny_model_dir("llama"), 5
    reference = []
    trainer = kill_resume.make_trainer(model_dir, str(tmp_path / "reference"))
    kill_resume.run_calls(trainer, 0, calls, reference.append)
    with open(tmp_path / "workers.log", "w") as log:
        for kill, (kill_call, fraction) in enumerate([(2, 0.2), (3, 0.45)]):
            out = str(tmp_path / f"kill-{kill}")
            left = kill_resume.kill_during_save(model_dir, out, calls, kill_call, fraction, log)
            assert f".tmp-checkpoint-{kill_call + 1}-" in left, f"kill {kill} did not land inside the save: {left}"
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




# ----------------------------------------------------------------------------------------------------------
# Nothing poisoned: an over-long sample, an interrupted pass, an interrupted update (issue 31)

def ce_datum(ids) -> Datum:
    return Datum(ids, {"target_tokens": ids[1:] + [11], "weights": [1.0] * len(ids)})


def _send_sigint():
    """A real Ctrl-C, delivered to this process (Python raises KeyboardInterrupt at the next bytecode)."""
    os.kill(os.getpid(), signal.SIGINT)


@contextlib.contextmanager
def _interrupt_inside_forward_backward(trainer, monkeypatch):
    """Ctrl-C in the middle of a forward_backward: the torch engine's second micro-batch forward (after the first
    one's gradients were accumulated), the JAX engine's wait for the pass's results (after the accumulator was
    donated to the jitted pass)."""
    if trainer.args.backend == "torch":
        calls = []

        def hook(module, inputs, output):
            calls.append(1)
            if len(calls) == 2:
                _send_sigint()

        handle = trainer.model.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
        return
    import jax

    real = jax.device_get

    def device_get(x):
        _send_sigint()
        return real(x)

    with monkeypatch.context() as patch:
        patch.setattr(jax, "device_get", device_get)
        yield


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_an_over_long_sample_and_an_interrupted_pass_leave_the_trainer_as_a_fresh_one(
        model_type, backend, tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """Before: JAX trained an 80-token sample on a 64-row position table (NaN loss), and every later valid call was
    NaN too — the packed row length had grown past the table, so padding positions looked up NaN embeddings — also
    after save_state/load_state; torch raised a raw IndexError. A failing forward_backward left a phantom pending
    update. Now the sample is refused naming the limit, the interrupted pass leaves the accumulator as it was, and
    the trainer's next calls are bit-identical to those of a trainer that never saw either."""
    table = {"gpt2": {"n_positions": 32}, "opt": {"max_position_embeddings": 32}}[model_type]
    model_dir = tiny_model_dir(model_type, **table)
    first = [ce_datum([5, 6, 7, 8, 9]), ce_datum([9, 8, 7])]

    def run(poisoned: bool):
        trainer = make_trainer(backend, model_dir, tokenizer, tmp_path / f"out-{poisoned}", fast=True,
                               per_device_train_batch_size=1)
        trainer.step(input_ids=[list(range(5, 20)), list(range(7, 15))])
        if poisoned:
            with pytest.raises(ValueError, match=r"`input_ids\[0\]` is 40 tokens long, more than the model's 32"):
                trainer.step(input_ids=[list(range(5, 45))])
            with pytest.raises(ValueError, match=r"`input_ids\[1\]` is 40 tokens long"):
                trainer.compute_logprobs([[5, 6, 7], list(range(5, 45))])
            with pytest.raises(ValueError, match="max_new_tokens"):
                trainer.generate(input_ids=[[5, 6, 7]], max_new_tokens=30)
        trainer.forward_backward(first)
        if poisoned:
            before = fingerprint(trainer)
            with pytest.raises(KeyboardInterrupt), _interrupt_inside_forward_backward(trainer, monkeypatch):
                trainer.forward_backward([ce_datum([5, 6, 7, 8]), ce_datum([6, 7, 8]), ce_datum([7, 8, 9, 10])])
            assert fingerprint(trainer) == before, "the interrupted pass changed the accumulator"
        trainer.optim_step()
        stats = trainer.step(input_ids=[list(range(6, 30)), list(range(9, 12))])
        logprobs = trainer.compute_logprobs([list(range(5, 37))])[0]  # the whole table
        return stats["loss"], logprobs, fingerprint(trainer)

    loss, logprobs, state = run(poisoned=True)
    fresh_loss, fresh_logprobs, fresh_state = run(poisoned=False)
    assert math.isfinite(loss) and np.all(np.isfinite(logprobs))
    assert loss == fresh_loss
    np.testing.assert_array_equal(logprobs, fresh_logprobs)
    assert state == fresh_state


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_inside_an_update_lands_after_it(backend, llama_dir, tokenizer, tmp_path, monkeypatch):
    """A Ctrl-C while an update is being applied is held until the update and its bookkeeping are done: the call
    stops there with a consistent trainer (before: the JAX state, donated to the step, could be lost between the
    call and its assignment — every later call failing on deleted buffers; torch could count an update the
    optimizer had not finished)."""
    trainer = make_trainer(backend, llama_dir, tokenizer, tmp_path, fast=True, per_device_train_batch_size=1)
    trainer.step(input_ids=[[5, 6, 7, 8]])
    name = "train_step" if backend == "jax" else "_optimizer_update"  # the engine's: it runs the update
    real = getattr(trainer.engine, name)

    def interrupted(*args, **kwargs):
        _send_sigint()
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer.engine, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.step(input_ids=[[5, 6, 7], [8, 9, 10], [11, 12, 13]])  # three updates; stops after the first
    monkeypatch.setattr(trainer.engine, name, real)
    assert trainer.state.global_step == 2
    if backend == "jax":
        assert int(trainer.train_state.step) == 2
    else:
        assert all(int(s["step"]) == 2 for s in trainer.optimizer.state_dict()["state"].values())
    stats = trainer.step(input_ids=[[5, 6, 7, 8, 9]])
    assert stats["global_step"] == 3 and math.isfinite(stats["loss"])


def test_a_new_config_does_not_break_a_live_torch_trainer(llama_dir, tokenizer, tmp_path):
    """transformers resets accelerate's process-wide state whenever a TrainingArguments sets up its devices: a second
    config (for another trainer, or one a constructor then refused) left the first trainer's accelerator without
    ``num_processes`` (AttributeError at its next step)."""
    trainer = make_trainer("torch", llama_dir, tokenizer, tmp_path, fast=True)
    trainer.step(input_ids=[[5, 6, 7, 8]])
    assert IterativeSFTConfig(output_dir=str(tmp_path / "other"), backend="torch").device.type == "cpu"
    assert math.isfinite(trainer.step(input_ids=[[5, 6, 7, 8]])["loss"])
    trainer.save_state(str(tmp_path / "state"))
