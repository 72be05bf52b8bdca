"""Cross-backend parity of the schedules (the per-family step() parity lives in ``test_families``).

Tolerance: learning rates equal to 1e-6 relative.
"""

import numpy as np
import pytest

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
