"""Cross-backend parity of the schedules (the per-family step() parity lives in ``test_families``).

Tolerances: learning rates equal to 1e-6 relative; label-smoothed losses equal the hand-written formula (and
each other) to 1e-4.
"""

import numpy as np
import pytest
import torch

from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer


def test_learning_rate_after_max_steps_holds_on_both_backends(tiny_model_dir, tokenizer, tmp_path):
    # Past max_steps the LR stays at the schedule's final value on both engines (cosine must not climb
    # back up, as HF's raw cosine lambda would).
    lrs = {}
    for backend in ("jax", "torch"):
        args = IterativeSFTConfig(output_dir=str(tmp_path / backend), backend=backend, per_device_train_batch_size=1,
                                  lr_scheduler_type="cosine", max_steps=3, warmup_steps=1, learning_rate=1e-3,
                                  logging_steps=1, gradient_checkpointing=False, report_to="none")
        trainer = IterativeSFTTrainer(tiny_model_dir("llama"), args=args, processing_class=tokenizer)
        trainer.step(texts=["a b c", "hello world", "The quick brown fox", "0123456789", "def add(a, b):"])
        lrs[backend] = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert len(lrs["jax"]) == 5
    np.testing.assert_allclose(lrs["jax"], lrs["torch"], rtol=1e-6, atol=1e-12)
    assert lrs["jax"][3] == lrs["jax"][4] == pytest.approx(0.0, abs=1e-12)


def test_label_smoothing_equals_the_formula_on_both_backends(tiny_model_dir, tokenizer, tmp_path):
    """label_smoothing_factor=0.1: each engine's step() loss (one update over every sample, at the initial
    weights) equals sum over label tokens of (1 - eps) * nll + eps * mean_v(-log p_v), divided by their count,
    computed here in float64 from the transformers model."""
    from transformers import AutoModelForCausalLM

    eps, texts = 0.1, ["The quick brown fox jumps", "hello world", "def add(a, b): return a + b"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).double().eval()
    total = count = 0.0
    for text in texts:
        ids = torch.tensor([tokenizer(text).input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
        nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
        total += float(((1 - eps) * nll - eps * logp.mean(-1)).sum())
        count += nll.numel()
    losses = {}
    for backend in ("jax", "torch"):
        args = IterativeSFTConfig(output_dir=str(tmp_path / backend), backend=backend, per_device_train_batch_size=4,
                                  label_smoothing_factor=eps, gradient_checkpointing=False, report_to="none")
        trainer = IterativeSFTTrainer(tiny_model_dir("llama"), args=args, processing_class=tokenizer)
        losses[backend] = trainer.step(texts=texts)["loss"]
    assert losses["jax"] == pytest.approx(total / count, abs=1e-4)
    assert losses["torch"] == pytest.approx(total / count, abs=1e-4)
