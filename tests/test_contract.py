"""The trainer contract, written once and run for both engines (tiny Llama, offline, CPU, fp32).

Input forms, bad input leaving every piece of state bit-identical, the statistics, the log / evaluate / save
cadence, the callback events, the non-finite guard and the max_steps warning: what ``itersft_jax.shared.flow`` promises
for both ``IterativeSFTTrainer`` engines. Engine-specific behaviour is tested in test_jax_trainer.py and
test_torch_backend.py.
"""

from __future__ import annotations

import glob
import logging
import math
import os

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from itersft_jax import IterativeSFTConfig
from itersft_jax.shared.flow import StepStats
from itersft_torch import IterativeSFTTrainer as TorchTrainer
from tests.support.engines import make_trainer

BACKENDS = ["jax", "torch"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Question: what is two plus two? Answer: four.",
         "def add(a, b):\n    return a + b\n", "Rejection sampling keeps only the verified completions.",
         "12 + 30 = 42."]
LOG_KEYS = {"loss", "grad_norm", "learning_rate", "num_tokens", "tokens_per_second", "epoch", "step"}


def snapshot(trainer) -> list[np.ndarray]:
    """Parameters, optimizer state and the schedule/step counter, as host arrays."""
    if isinstance(trainer, TorchTrainer):
        arrays = [p.detach().numpy().copy() for p in trainer.model.parameters()]
        for state in trainer.optimizer.state.values():
            arrays += [v.detach().numpy().copy() if torch.is_tensor(v) else np.asarray(v) for v in state.values()]
        return arrays + [np.asarray(trainer.lr_scheduler.last_epoch)]
    state = trainer.train_state
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get((state.params, state.opt_state, state.step)))]


def identical(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_input_form_and_the_statistics(backend, llama_dir, tokenizer, tmp_path):
    trainer = make_trainer(backend, llama_dir, tokenizer, tmp_path / backend, fast=True)
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    padded = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in ids], batch_first=True)
    mask = (torch.arange(padded.shape[1])[None] < torch.tensor([len(x) for x in ids])[:, None]).long()
    before = snapshot(trainer)
    results = [trainer.step(input_ids=ids), trainer.step(input_ids=padded, attention_mask=mask),
               trainer.step(input_ids=[np.array(x) for x in ids], labels=ids), trainer.step(texts=TEXTS),
               trainer.step(prompts=["Q: two plus two?"] * 3, completions=[" four", " 4", " four."])]
    label_tokens = sum(len(x) - 1 for x in ids)
    for i, stats in enumerate(results):
        assert isinstance(stats, StepStats) and set(stats) == set(StepStats.KEYS)
        assert all(isinstance(v, (int, float)) for v in stats.values())
        assert 0 < stats["loss"] < 10 and stats["grad_norm"] > 0 and stats["seconds"] > 0
        assert stats["learning_rate"] == pytest.approx(1e-3) and stats["tokens_per_second"] > 0
        assert stats["skipped_updates"] == 0 and stats["padded_tokens"] >= stats["num_tokens"]
        if i < 4:  # the same five texts in four forms: same label tokens, 3 updates of batch 2
            assert (stats["num_tokens"], stats["samples"], stats["updates"]) == (label_tokens, 5, 3)
    assert results[-1]["updates"] == 2 and results[-1]["global_step"] == trainer.state.global_step == 14
    assert not identical(before, snapshot(trainer))


BAD_CALLS = [
    ({}, "one input form"),
    ({"input_ids": [[5, 6, 7]], "texts": ["hello"]}, "exactly one"),
    ({"input_ids": [[5, 6, 10_000]]}, "input_ids"),
    ({"input_ids": [[5, 6, 7], [8, 9]], "attention_mask": [[1, 1, 1]]}, "attention_mask"),
    ({"input_ids": [[5, 6, 7]], "labels": [[5, 6]]}, "labels"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": "5 6 7"}, "input_ids"),
    ({"texts": ["hello"], "texts_labels": ["bye"]}, "texts_labels"),
    ({"prompts": ["hello"]}, "completions"),
    ({"texts": [""]}, "no sample has a label token: "),  # not a max_length problem (issue 14)
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_changes_nothing(backend, llama_dir, tokenizer, tmp_path):
    trainer = make_trainer(backend, llama_dir, tokenizer, tmp_path / backend, fast=True)
    twin = make_trainer(backend, llama_dir, tokenizer, tmp_path / backend, fast=True)
    before = snapshot(trainer)
    for bad, fragment in BAD_CALLS:
        with pytest.raises((ValueError, TypeError), match=fragment) as err:
            trainer.step(**bad)
        assert "max_length" not in str(err.value) or "max_length" in fragment
    assert identical(before, snapshot(trainer))
    assert trainer.state.global_step == 0 and not trainer.state.log_history
    # The failed calls consumed no shuffle seed either: the next call equals a fresh trainer's, bit for bit.
    assert trainer.step(texts=TEXTS)["loss"] == twin.step(texts=TEXTS)["loss"]
    assert identical(snapshot(trainer), snapshot(twin))


@pytest.mark.parametrize("backend", BACKENDS)
def test_logging_cadence(backend, llama_dir, tokenizer, tmp_path):
    """Every logging_steps updates (plus update 1 with logging_first_step): the token-weighted mean loss of the
    window, unrounded (TRL rounded to 4 decimals), with the same keys on both engines."""
    trainer = make_trainer(backend, llama_dir, tokenizer, tmp_path / backend, fast=True, per_device_train_batch_size=1,
                           logging_steps=2, logging_first_step=True)
    stats = trainer.step(texts=TEXTS[:4])
    logs = trainer.state.log_history
    assert [e["step"] for e in logs] == [1, 2, 4] and all(set(e) == LOG_KEYS for e in logs)
    assert all(round(e["loss"], 4) != e["loss"] and e["tokens_per_second"] > 0 for e in logs)
    assert [e["epoch"] for e in logs] == [0.25, 0.5, 1.0]  # an "epoch" is one step() call
    total = sum(e["loss"] * e["num_tokens"] for e in logs)
    assert total / stats["num_tokens"] == pytest.approx(stats["loss"], rel=1e-6)
    per_call = make_trainer(backend, llama_dir, tokenizer, tmp_path / backend, fast=True, logging_strategy="epoch")
    per_call.step(texts=TEXTS)
    per_call.step(texts=TEXTS[:2])
    assert [e["step"] for e in per_call.state.log_history] == [3, 4]


def _records(name: str):
    def on_event(self, args, state, control, **kwargs):
        self.events.append((name, state.global_step))
    return on_event


class Recorder(TrainerCallback):
    """Records every event; asks for a checkpoint after update 1 (a callback's control flags are honoured)."""

    on_init_end, on_train_begin, on_train_end = _records("init_end"), _records("train_begin"), _records("train_end")
    on_epoch_begin, on_epoch_end = _records("epoch_begin"), _records("epoch_end")
    on_step_begin, on_save = _records("step_begin"), _records("save")

    def __init__(self):
        self.events = []

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("step_end", state.global_step))
        if state.global_step == 1:
            control.should_save = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(("log", state.global_step, tuple(sorted(logs))))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.events.append(("evaluate", state.global_step, tuple(sorted(metrics))))


def test_callbacks_see_the_same_events_on_both_backends(llama_dir, tokenizer, tmp_path):
    events = {}
    for backend in BACKENDS:
        recorder = Recorder()
        trainer = make_trainer(backend, llama_dir, tokenizer, tmp_path / backend, fast=True, logging_steps=2,
                               eval_strategy="steps", eval_steps=3, eval_dataset={"text": TEXTS[:2]},
                               callbacks=[recorder])
        trainer.step(texts=TEXTS[:4])
        trainer.step(texts=TEXTS[:4])
        trainer.end_training()
        events[backend] = recorder.events
        assert os.listdir(tmp_path / backend) == ["checkpoint-1"]  # asked for by the callback, save_strategy="no"
    assert events["jax"] == events["torch"]
    names = [e[0] for e in events["jax"]]
    assert names[:3] == ["init_end", "train_begin", "epoch_begin"] and names[-1] == "train_end"
    assert names.count("step_begin") == names.count("step_end") == 4 and names.count("epoch_end") == 2
    train_logs = [e for e in events["jax"] if e[0] == "log" and "loss" in e[2]]
    assert [e[1] for e in train_logs] == [2, 4] and set(train_logs[0][2]) == LOG_KEYS - {"step"}
    assert ("save", 1) in events["jax"]
    assert [e[1] for e in events["jax"] if e[0] == "evaluate"] == [3]


def _reference_eval(model_dir, tokenizer, texts) -> tuple[float, float]:
    """transformers on the same weights: token-weighted loss and next-token accuracy over label tokens."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total = correct = count = 0.0
    for text in texts:
        ids = torch.tensor([tokenizer(text).input_ids])
        with torch.no_grad():
            logits = hf(input_ids=ids).logits[0, :-1]
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        correct += float((logits.argmax(-1) == ids[0, 1:]).sum())
        count += ids.shape[1] - 1
    return total / count, correct / count


def token_accuracy(prediction) -> dict:
    """HF causal convention: predictions[:, t] is the argmax at position t, which predicts label t + 1."""
    preds, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
    mask = labels != -100
    return {"accuracy": float((preds[mask] == labels[mask]).mean())}


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_cadence_and_compute_metrics(backend, llama_dir, tokenizer, tmp_path):
    """evaluate() equals transformers on the same weights (loss 1e-5, fp32; accuracy exactly), with
    compute_metrics on preprocess_logits_for_metrics' argmax; eval_strategy="steps" evaluates every eval_steps
    updates from eval_delay on, without changing the parameters."""
    ref_loss, ref_accuracy = _reference_eval(llama_dir, tokenizer, TEXTS)
    trainer = make_trainer(backend, llama_dir, tokenizer, tmp_path / backend, fast=True, per_device_train_batch_size=1,
                           per_device_eval_batch_size=2, eval_strategy="steps", eval_steps=2, eval_delay=3,
                           eval_dataset={"text": TEXTS}, compute_metrics=token_accuracy,
                           preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1))
    before = snapshot(trainer)
    metrics = trainer.evaluate()
    assert identical(before, snapshot(trainer)) and trainer.state.global_step == 0
    assert metrics["eval_loss"] == pytest.approx(ref_loss, abs=1e-5)
    assert metrics["eval_accuracy"] == ref_accuracy and metrics["eval_samples"] == len(TEXTS)
    assert trainer.evaluate(texts=TEXTS[:2])["eval_samples"] == 2  # any step() input form
    trainer.step(texts=TEXTS[:4])
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [0, 0, 4] and "eval_accuracy" in evals[-1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_cadence(backend, llama_dir, tokenizer, tmp_path):
    """save_steps counts updates, and max_steps gets a final checkpoint; "epoch" saves after each call."""
    trainer = make_trainer(backend, llama_dir, tokenizer, tmp_path / backend, fast=True, per_device_train_batch_size=1,
                           save_strategy="steps", save_steps=2, max_steps=5, lr_scheduler_type="constant")
    trainer.step(texts=TEXTS)
    assert sorted(os.listdir(tmp_path / backend)) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    files = set(os.listdir(tmp_path / backend / "checkpoint-5"))
    assert {"config.json", "model.safetensors"} <= files  # a Hugging Face model directory, plus the state
    per_call = make_trainer(backend, llama_dir, tokenizer, tmp_path / "epoch" / backend, fast=True,
                            save_strategy="epoch")
    per_call.step(texts=TEXTS)
    per_call.step(texts=TEXTS[:2])
    assert sorted(os.listdir(tmp_path / "epoch" / backend)) == ["checkpoint-3", "checkpoint-4"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_steps_warns_once_and_holds_the_final_lr(backend, llama_dir, tokenizer, tmp_path, caplog):
    """max_steps=2, cosine: updates 1-2 follow the schedule; later calls still run, a warning says once that
    the schedule is exhausted, and the LR stays at its final value (cosine would otherwise climb again)."""
    trainer = make_trainer(backend, llama_dir, tokenizer, tmp_path / backend, fast=True, per_device_train_batch_size=4,
                           max_steps=2, lr_scheduler_type="cosine")
    caplog.set_level(logging.WARNING, logger="itersft_jax.shared.flow")
    lrs = [trainer.step(texts=TEXTS[:4])["learning_rate"] for _ in range(4)]
    assert lrs == pytest.approx([1e-3, 5e-4, 0.0, 0.0], abs=1e-9)
    assert sum("max_steps=2 updates reached" in r.message for r in caplog.records) == 1
    assert trainer.state.global_step == 4


@pytest.fixture(scope="module")
def inf_weight_dir(llama_dir, tmp_path_factory):
    """The tiny Llama with one infinite embedding weight: every loss through it is NaN."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = math.inf
    path = tmp_path_factory.mktemp("inf-llama")
    model.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_updates_are_skipped(backend, inf_weight_dir, tokenizer, tmp_path, caplog):
    """An inf weight makes every update non-finite: each is skipped (parameters, optimizer state and step counter
    bit-identical), counted in `skipped_updates` and warned about; `max_skipped_updates` raises after N in a row."""
    trainer = make_trainer(backend, inf_weight_dir, tokenizer, tmp_path / backend, fast=True)
    before = snapshot(trainer)
    caplog.set_level(logging.WARNING, logger="itersft_jax.shared.flow")
    stats = trainer.step(texts=TEXTS[:4])
    assert (stats["skipped_updates"], stats["updates"], stats["global_step"]) == (2, 0, 0)
    assert math.isnan(stats["loss"]) and trainer.state.global_step == 0
    assert identical(before, snapshot(trainer))
    assert "2 of 2 updates had a non-finite loss" in caplog.text
    strict = make_trainer(backend, inf_weight_dir, tokenizer, tmp_path / backend, fast=True, max_skipped_updates=2)
    with pytest.raises(RuntimeError, match="max_skipped_updates"):
        strict.step(texts=TEXTS[:4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_report_to_tensorboard_writes_every_logged_update(backend, llama_dir, tokenizer, tmp_path):
    """transformers' own TensorBoardCallback: one scalar per logged update for loss, learning rate, grad norm
    and tokens/s, equal to the log history (float32 in the event file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(backend, llama_dir, tokenizer, tmp_path / backend, fast=True, per_device_train_batch_size=1,
                           report_to="tensorboard")
    trainer.step(texts=TEXTS[:3])
    trainer.end_training()
    (run,) = glob.glob(str(tmp_path / backend / "runs" / "*"))
    events = EventAccumulator(run)
    events.Reload()
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [1, 2, 3]
        expected = [e[key] for e in trainer.state.log_history]
        assert [s.value for s in scalars] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_points_to_step_and_generate_checks(backend, llama_dir, tokenizer, tmp_path):
    trainer = make_trainer(backend, llama_dir, tokenizer, tmp_path / backend, fast=True)
    with pytest.raises(NotImplementedError, match="step"):
        trainer.train()
    for kwargs, fragment in ((dict(prompts=[]), "prompts"), (dict(input_ids=[]), "input_ids"),
                             (dict(prompts=["a"], max_new_tokens=2.5), "max_new_tokens"),
                             (dict(prompts=["a"], do_sample=True, temperature=math.nan), "temperature"),
                             (dict(input_ids=[[1, 10**6]]), "outside the vocabulary"),
                             (dict(prompts=["a"], eos_token_id=list(range(9))), "eos_token_id")):
        with pytest.raises((ValueError, TypeError), match=fragment):  # TypeError: a float where an int goes
            trainer.generate(**kwargs)
    with pytest.raises(ValueError, match="prompts"):
        trainer.generate([])
    assert len(trainer.generate(["a"], max_new_tokens=2, eos_token_id=list(range(8))).sequences) == 1



@pytest.mark.parametrize("field,value", [("learning_rate", math.nan), ("learning_rate", math.inf),
                                         ("learning_rate", -1e-3), ("weight_decay", -0.1), ("adam_beta2", 1.0),
                                         ("max_grad_norm", math.nan), ("per_device_train_batch_size", 0),
                                         ("gradient_accumulation_steps", 0), ("max_skipped_updates", 0)])
def test_impossible_hyperparameters_are_refused_when_the_config_is_built(field, value, tmp_path):
    # TrainingArguments accepts every one of these; a NaN learning rate gave a NaN model after two calls.
    with pytest.raises(ValueError, match=f"`{field}`"):
        IterativeSFTConfig(output_dir=str(tmp_path), **{field: value})
