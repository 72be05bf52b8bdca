"""LoRA (issue 11): the JAX engine against peft on the torch backend, PEFT adapter files both ways, merged saves.

Tolerances (fp32): per-update losses 1e-4; adapter weights 1e-4 relative (per tensor, to its largest magnitude);
logits of a saved adapter / merged model loaded by peft / transformers against the JAX model 1e-4; frozen base
weights bit for bit.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer
from tests.support.offline import save_tiny_model

TEXTS = ["The quick brown fox jumps over the lazy dog.", "hello world", "def add(a, b):\n    return a + b",
         "12 + 30 = 42.", "Rejection sampling keeps only the verified completions."]
PROMPTS = ["Question: what is two plus two?", "12 + 30 =", "def add(a, b):"]
COMPLETIONS = [" Answer: four.", " 42.", "\n    return a + b"]


def _args(tmp_path, backend, **overrides):
    kwargs = dict(output_dir=str(tmp_path / backend), backend=backend, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, learning_rate=2e-3, max_grad_norm=0.05, weight_decay=0.1,
                  gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no", bf16=False)
    kwargs.update(overrides)
    return IterativeSFTConfig(**kwargs)


def _mixed_steps(trainer, tokenizer) -> list[float]:
    trainer.step(texts=TEXTS)
    trainer.step(prompts=PROMPTS, completions=COMPLETIONS)
    ids = tokenizer(TEXTS[:4]).input_ids
    trainer.step(input_ids=ids, labels=[[-100] * 2 + row[2:] for row in ids])
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


@pytest.fixture(scope="module")
def existing_adapter(tmp_path_factory, tokenizer):
    """A tiny Llama and a PEFT adapter on it (q, v, down projections) whose B matrices are non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    base_dir = save_tiny_model(root / "base", "llama", tokenizer)
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    peft_model.save_pretrained(root / "adapter")
    return base_dir, str(root / "adapter")


def _logits_jax(trainer, ids):
    import jax

    from itersft_jax.models.attention.masks import positions_from_mask

    mask = np.ones_like(ids)
    logits = trainer.model(ids, positions_from_mask(mask), mask)[0]
    return np.asarray(jax.device_get(logits))


def test_both_backends_train_an_existing_adapter_alike(existing_adapter, tmp_path, tokenizer):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir = existing_adapter
    jax_trainer = IterativeSFTTrainer(adapter_dir, args=_args(tmp_path, "jax"))
    torch_trainer = IterativeSFTTrainer(adapter_dir, args=_args(tmp_path, "torch"))
    losses = {name: _mixed_steps(t, tokenizer) for name, t in (("jax", jax_trainer), ("torch", torch_trainer))}
    assert len(losses["jax"]) == 4
    np.testing.assert_allclose(losses["jax"], losses["torch"], atol=1e-4)

    saved = jax_trainer.save_model(str(tmp_path / "jax-adapter"))
    assert sorted(f for f in os.listdir(saved) if f.startswith("adapter")) == ["adapter_config.json",
                                                                               "adapter_model.safetensors"]
    ours = load_file(os.path.join(saved, "adapter_model.safetensors"))
    theirs = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(torch_trainer.model).items()}
    started = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs) == sorted(started)
    for key, value in theirs.items():
        assert np.abs(ours[key] - value).max() <= 1e-4 * np.abs(value).max(), key
        assert np.abs(ours[key] - started[key]).max() > 1e-4  # the adapters did train

    # The frozen base: bit for bit on both engines.
    import jax
    from flax import nnx

    from itersft_jax.io.weights import read_safetensors

    original = read_safetensors(base_dir)
    family_params = jax.device_get(nnx.to_pure_dict(jax_trainer.train_state.frozen))
    from itersft_jax.models import get_family

    frozen = get_family("llama").params_to_hf(family_params, jax_trainer.config)
    for name, array in original.items():
        assert np.array_equal(frozen[name], array), name
        torch_name = "base_model.model." + name.replace("q_proj.", "q_proj.base_layer.").replace(
            "v_proj.", "v_proj.base_layer.").replace("down_proj.", "down_proj.base_layer.")
        assert np.array_equal(torch_trainer.model.state_dict()[torch_name].numpy(), array), name

    # The JAX adapter in peft, and the merged model in transformers: the JAX model's logits (1e-4).
    ids = np.asarray([tokenizer("The quick brown fox jumps").input_ids])
    expected = _logits_jax(jax_trainer, ids)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), saved).eval()
    with torch.no_grad():
        got = peft_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    merged = jax_trainer.merge_and_save(str(tmp_path / "merged"))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_peft_config_on_gpt2_all_linear_saves_what_peft_loads(tmp_path, tokenizer):
    # GPT-2's Conv1D layers ([in, out] weights) and peft_config= on a plain model; lora_dropout and rsLoRA on.
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny_model(tmp_path / "gpt2", "gpt2", tokenizer)
    config = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", lora_dropout=0.1, use_rslora=True)
    trainer = IterativeSFTTrainer(base_dir, args=_args(tmp_path, "jax"), peft_config=config)
    adapted = sorted({name.split(".")[-1] for name in trainer.adapters.targets})
    assert adapted == ["c_attn", "c_fc", "c_proj"] and trainer.adapters.settings.scale == 16 / 2
    trainer.step(texts=TEXTS)
    saved = trainer.save_model(str(tmp_path / "adapter"))
    with open(os.path.join(saved, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == base_dir
    ids = np.asarray([tokenizer("hello world, the quick brown fox").input_ids])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), saved).eval()
    with torch.no_grad():
        got = peft_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, _logits_jax(trainer, ids), atol=1e-4)


def test_lora_dropout_only_in_training_steps(existing_adapter, tmp_path, tokenizer):
    # Dropout changes the training loss; evaluate() and generate() of the same weights are unaffected by it.
    from peft import LoraConfig

    base_dir, _ = existing_adapter
    out = {}
    for rate in (0.0, 0.5):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=rate,
                            init_lora_weights=False)  # B random too: the adapters change the output
        trainer = IterativeSFTTrainer(base_dir, args=_args(tmp_path, "jax", learning_rate=0.0), peft_config=config)
        out[rate] = (trainer.step(texts=TEXTS)["loss"], trainer.evaluate(eval_dataset={"texts": TEXTS})["eval_loss"],
                     trainer.generate(PROMPTS, max_new_tokens=4, do_sample=False).sequences)
    assert abs(out[0.0][0] - out[0.5][0]) > 1e-3
    assert out[0.0][1] == pytest.approx(out[0.5][1], abs=1e-6) and out[0.0][2] == out[0.5][2]
    assert out[0.0][0] == pytest.approx(out[0.0][1], abs=1e-5)  # no dropout: the step's loss is the eval loss


def test_resume_with_adapters_is_bit_identical(existing_adapter, tmp_path, tokenizer):
    base_dir, adapter_dir = existing_adapter
    first = IterativeSFTTrainer(adapter_dir, args=_args(tmp_path, "jax"))
    first.step(texts=TEXTS)
    checkpoint = first.save_checkpoint()
    expected = first.step(texts=TEXTS[:3])["loss"]
    second = IterativeSFTTrainer(adapter_dir, args=_args(tmp_path, "jax"))
    second.resume_from_checkpoint(checkpoint)
    assert second.step(texts=TEXTS[:3])["loss"] == expected


def test_bad_peft_config_is_refused_naming_the_field(existing_adapter, tmp_path):
    from peft import LoraConfig

    base_dir, adapter_dir = existing_adapter
    for config, match in ((LoraConfig(r=4, target_modules=["q_proj"], bias="all"), "peft_config.bias"),
                          (LoraConfig(r=4, target_modules=["nope"]), "target_modules"),
                          (LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "use_dora")):
        with pytest.raises(ValueError, match=match):
            IterativeSFTTrainer(base_dir, args=_args(tmp_path, "jax"), peft_config=config)
    with pytest.raises(ValueError, match="drop `peft_config`"):
        IterativeSFTTrainer(adapter_dir, args=_args(tmp_path, "jax"), peft_config=LoraConfig(target_modules=["q_proj"]))
    # A PeftModel loaded for inference (PeftModel.from_pretrained's default) has nothing to train on torch.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    frozen = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    with pytest.raises(ValueError, match="is_trainable=True"):
        IterativeSFTTrainer(frozen, args=_args(tmp_path, "torch"))


def test_remat_with_adapters_equals_no_remat(existing_adapter, tmp_path):
    # gradient_checkpointing (TRL's default) with adapters and dropout: the same loss and adapters (1e-5, fp32);
    # the rematerialized forward replays the same dropout masks.
    from peft import LoraConfig

    base_dir, _ = existing_adapter
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], lora_dropout=0.2)
    runs = []
    for remat in (False, True):
        trainer = IterativeSFTTrainer(base_dir, args=_args(tmp_path, "jax", gradient_checkpointing=remat),
                                      peft_config=config)
        losses = [trainer.step(texts=TEXTS)["loss"] for _ in range(2)]
        runs.append((losses, [np.asarray(x) for x in __import__("jax").tree.leaves(trainer.params)]))
    np.testing.assert_allclose(runs[1][0], runs[0][0], atol=1e-5)
    for a, b in zip(runs[1][1], runs[0][1]):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_torch_backend_wraps_the_model_with_peft_config(tmp_path, tokenizer):
    # TRL's behaviour: peft_config= wraps a plain model with get_peft_model; only the adapters train.
    from peft import LoraConfig, PeftModel

    base_dir = save_tiny_model(tmp_path / "base", "llama", tokenizer)
    trainer = IterativeSFTTrainer(base_dir, args=_args(tmp_path, "torch"),
                                  peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert isinstance(trainer.model, PeftModel)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.step(texts=TEXTS)
    changed = {k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)


def test_all_linear_on_gpt_neox_adapts_the_fused_qkv_and_not_embed_out(tmp_path, tokenizer):
    # GPT-NeoX's query_key_value stays one layer (per-head q|k|v rows, HF's layout), so its adapter is PEFT's; the
    # head, saved as embed_out, is the output layer all-linear leaves out.
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny_model(tmp_path / "neox", "gpt_neox", tokenizer)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    trainer = IterativeSFTTrainer(base_dir, args=_args(tmp_path, "jax"), peft_config=config)
    adapted = sorted({name.split(".")[-1] for name in trainer.adapters.targets})
    assert adapted == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    trainer.step(texts=TEXTS)
    saved = trainer.save_model(str(tmp_path / "adapter"))
    ids = np.asarray([tokenizer("hello world, the quick brown fox").input_ids])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), saved).eval()
    with torch.no_grad():
        got = peft_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, _logits_jax(trainer, ids), atol=1e-4)


def test_peft_defaults_and_a_base_built_in_the_compute_dtype(tmp_path, tokenizer):
    # As get_peft_model on the torch backend: target_modules=None takes PEFT's default for the architecture, and
    # init_lora_weights=False leaves B at nn.Linear(r, out)'s init, U(-1/sqrt(r), 1/sqrt(r)). With bf16 the frozen
    # base is built in bf16 directly (no fp32 copy beside it while loading), with the values of the fp32 checkpoint
    # rounded to bf16, bit for bit.
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    from flax import nnx
    from peft import LoraConfig

    from itersft_jax.io.weights import read_safetensors
    from itersft_jax.models import get_family

    base_dir = save_tiny_model(tmp_path / "base", "llama", tokenizer)
    trainer = IterativeSFTTrainer(base_dir, args=_args(tmp_path, "jax", bf16=True),
                                  peft_config=LoraConfig(r=4, init_lora_weights=False))
    assert sorted({name.split(".")[-1] for name in trainer.adapters.targets}) == ["q_proj", "v_proj"]
    assert trainer.model.model.layers[0].self_attn.q_proj.param_dtype == jnp.bfloat16
    frozen = get_family("llama").params_to_hf(jax.device_get(nnx.to_pure_dict(trainer.train_state.frozen)),
                                              trainer.config)
    for name, array in read_safetensors(base_dir).items():
        assert np.array_equal(frozen[name], array.astype(ml_dtypes.bfloat16)), name
    b = np.concatenate([np.ravel(layer.lora_b[...]) for layer in
                        (trainer.model.model.layers[i].self_attn.v_proj for i in range(2))])
    assert 0.125 < np.abs(b).max() <= 0.5  # 1/sqrt(r) = 0.5; 1/sqrt(hidden) would be 0.125
    saved = trainer.save_model(str(tmp_path / "adapter"))
    with open(os.path.join(saved, "adapter_config.json")) as f:
        assert sorted(json.load(f)["target_modules"]) == ["q_proj", "v_proj"]
