"""Full JAX checkpoints: a resumed trainer continues exactly where the saved one was."""

import os

import jax
import numpy as np
import pytest
from flax import nnx
from transformers import AutoModelForCausalLM

from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer
from itersft_jax.checkpoint import latest_checkpoint, load_checkpoint, rotate_checkpoints

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
    assert b.state.global_step == 2 and b._calls == 1 and len(b.state.log_history) == 2
    assert b._row_length == 96  # CALL_1's packed row length, longer than CALL_2 alone would pick
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
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-10")
    rotate_checkpoints(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-4"]
    assert latest_checkpoint(str(tmp_path / "missing")) is None
    trainer = _trainer(tiny_model_dir("llama"), tmp_path / "t")
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        load_checkpoint(trainer, str(tmp_path / "checkpoint-10"))
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        trainer.resume_from_checkpoint()


def test_save_steps_write_full_checkpoints_and_honour_save_total_limit(tiny_model_dir, tmp_path):
    args = IterativeSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=1, save_strategy="steps",
                              save_steps=1, save_total_limit=2, gradient_checkpointing=False, report_to="none")
    trainer = IterativeSFTTrainer(tiny_model_dir("llama"), args=args)
    trainer.step(texts=CALL_2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]
    assert os.path.isdir(tmp_path / "checkpoint-3" / "train_state")
