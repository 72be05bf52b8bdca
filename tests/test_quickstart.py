"""TRL's documented quick start (../shared/reference), run with only the import changed, on the JAX engine.

"facebook/opt-350m" is replaced by a local directory holding a tiny random OPT with opt-350m's structural
flags (post-LayerNorm, word_embed_proj_dim != hidden_size): the hub is unreachable here.
"""

import numpy as np
import pytest
import torch


@pytest.fixture()
def opt350m_like(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the snippets write to ./output
    return tiny_model_dir("opt", do_layer_norm_before=False, word_embed_proj_dim=32, hidden_size=64)


def _train_both_forms(trainer, tokenizer):
    out = trainer.step(texts=["The quick brown fox jumps over the lazy dog.", "hello world"])
    assert out["updates"] == 1 and np.isfinite(out["loss"])
    batch = tokenizer(["Generate with the model", "filter the samples"], padding=True, return_tensors="pt")
    inputs = {"input_ids": list(batch["input_ids"]), "attention_mask": list(batch["attention_mask"])}
    out = trainer.step(**inputs)
    assert out["updates"] == 1 and trainer.state.global_step == 2


def test_quick_start_model_identifier(opt350m_like, tokenizer):
    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer

    # Using a model identifier
    trainer = IterativeSFTTrainer(
        opt350m_like,
        args=IterativeSFTConfig(
            max_length=512,
            output_dir="./output",
        ),
    )
    assert type(trainer).__module__ == "itersft_jax.trainer"  # the JAX engine is the default
    _train_both_forms(trainer, trainer.processing_class)


def test_quick_start_pre_instantiated_model(opt350m_like):
    # Or using a pre-instantiated model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer

    model = AutoModelForCausalLM.from_pretrained(opt350m_like)
    tokenizer = AutoTokenizer.from_pretrained(opt350m_like)
    trainer = IterativeSFTTrainer(
        model,
        args=IterativeSFTConfig(
            max_length=512,
            output_dir="./output",
        ),
        processing_class=tokenizer,
        backend="jax",
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_both_forms(trainer, tokenizer)
    # The torch model handed in is only read: the JAX engine trains its own copy.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_quick_start_configuration_block(opt350m_like):
    from itersft_jax import IterativeSFTConfig

    config = IterativeSFTConfig(
        # Model initialization parameters
        model_init_kwargs={"torch_dtype": "bfloat16"},
        # Data preprocessing parameters
        max_length=512,
        truncation_mode="keep_end",
        # Training parameters
        output_dir="./output",
        learning_rate=2e-5,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        max_steps=1000,
        save_steps=100,
        optim="adamw_torch",
        report_to="none",  # the doc says "wandb"; not installed here
    )
    assert config.max_steps == 1000 and config.model_init_kwargs == {"torch_dtype": "bfloat16"}
    config = IterativeSFTConfig(optimize_device_cache=True)
    assert config.optimize_device_cache
