"""Cross-backend parity: the JAX engine and the PyTorch backend give the same numbers for the same calls.

Both backends consume the same micro-batches from ``itersft_jax.data``, so with the same initial weights and
config their per-update losses and final parameters must agree up to float32 round-off.
Tolerances: per-update loss |jax - torch| <= 1e-4; per-tensor relative parameter difference
||jax - torch|| / ||torch|| <= 1e-4; greedy next tokens on held-out prompts identical.
"""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer
from itersft_jax.shell import StepStats

CALLS = [
    dict(texts=["The quick brown fox jumps over the lazy dog.", "hello world", "a b c d e f",
                "Generate with the model, filter the samples"]),
    "ids_with_labels",
    dict(prompts=["12 + 30 =", "7 * 6 =", "Question: what is two plus two?"],
         completions=[" 42", " 42", " Answer: four."]),
    dict(texts=["JAX and PyTorch compute the same loss", "Rejection sampling keeps only the verified",
                "def add(a, b):", "abcdefghijklmnopqrstuvwxyz", "0123456789"]),
    dict(prompts=["Generate with the model,"], completions=[" filter the samples, then step on what survived."]),
]
HELD_OUT = ["The quick brown", "12 + 30", "Iterative supervised"]


def _config(tmp_path, backend):
    return IterativeSFTConfig(
        output_dir=str(tmp_path / backend), backend=backend, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_grad_norm=0.5, warmup_steps=2, weight_decay=0.1, learning_rate=3e-3,
        lr_scheduler_type="linear", max_steps=20, logging_steps=1, gradient_checkpointing=False, seed=11,
        report_to="none", disable_tqdm=True)


STAT_KEYS = set(StepStats.KEYS)


def _run(model_dir, tokenizer, tmp_path, backend):
    trainer = IterativeSFTTrainer(model_dir, args=_config(tmp_path, backend), processing_class=tokenizer)
    for call in CALLS:
        if call == "ids_with_labels":
            ids = tokenizer(["Question: what is two plus two? Answer: four.", "def add(a, b): return a + b"]).input_ids
            labels = [[-100] * 6 + x[6:] for x in ids]
            call = dict(input_ids=ids, labels=labels)
        stats = trainer.step(**call)
        assert set(stats) == STAT_KEYS, backend  # one step() contract: the same statistics on both engines
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return trainer, losses


def _jax_params_as_hf(trainer):
    from itersft_jax.models import get_family

    family = get_family(trainer.config.model_type)
    params = jax.device_get(nnx.to_pure_dict(trainer.params))
    return family.params_to_hf(params, trainer.config)


def _greedy_next(trainer_or_model, tokenizer, jax_side):
    out = []
    for text in HELD_OUT:
        ids = np.asarray([tokenizer(text).input_ids])
        mask = np.ones_like(ids)
        if jax_side:
            from itersft_jax.models.common import positions_from_mask

            logits, _ = trainer_or_model.model(ids, positions_from_mask(mask), mask)
            out.append(int(np.asarray(logits)[0, -1].argmax()))
        else:
            with torch.no_grad():
                logits = trainer_or_model.model(input_ids=torch.as_tensor(ids)).logits
            out.append(int(logits[0, -1].argmax()))
    return out


def _split_key_bias(name, value, ref):
    """Separate attention key-bias entries (zero gradient in exact arithmetic) from the rest."""
    if name.endswith("k_proj.bias"):
        return value[:0], ref[:0], (value, ref)
    if name.endswith("c_attn.bias"):  # GPT-2's fused q|k|v bias
        d = value.shape[0] // 3
        keep = np.r_[0:d, 2 * d:3 * d]
        return value[keep], ref[keep], (value[d:2 * d], ref[d:2 * d])
    return value, ref, None


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "opt"])
def test_jax_and_torch_backends_agree(model_type, tiny_model_dir, tokenizer, tmp_path):
    model_dir = tiny_model_dir(model_type)
    jax_trainer, jax_losses = _run(model_dir, tokenizer, tmp_path, "jax")
    torch_trainer, torch_losses = _run(model_dir, tokenizer, tmp_path, "torch")

    assert jax_trainer.state.global_step == torch_trainer.state.global_step == len(jax_losses)
    assert len(jax_losses) == len(torch_losses) >= 5
    np.testing.assert_allclose(jax_losses, torch_losses, atol=1e-4, rtol=0)

    jax_params = _jax_params_as_hf(jax_trainer)
    torch_params = {k: v.detach().float().numpy() for k, v in torch_trainer.model.state_dict().items()}
    assert jax_params, "no parameters mapped"
    for name, value in jax_params.items():
        ref = torch_params[name]
        value, ref, key_bias = _split_key_bias(name, value, ref)
        if value.size:
            rel = np.linalg.norm(value - ref) / max(np.linalg.norm(ref), 1e-12)
            assert rel <= 1e-4, f"{name}: relative difference {rel:.2e}"
        if key_bias is not None:
            # The loss's gradient w.r.t. a key bias is exactly 0 (it adds the same q.b_k to every logit of a
            # softmax row); both engines see float noise (~1e-11) that Adam scales to ~lr * g / eps per
            # update. Those entries are held to an absolute bound instead: <= 1e-4 after all updates.
            diff = np.abs(key_bias[0] - key_bias[1]).max()
            assert diff <= 1e-4, f"{name} (key bias): absolute difference {diff:.2e}"

    torch_trainer.model.eval()
    assert _greedy_next(jax_trainer, tokenizer, True) == _greedy_next(torch_trainer, tokenizer, False)


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
