"""HF checkpoints <-> JAX models: directories, hub ids through the HF cache, in-memory torch models, saving.

Tolerances: save -> transformers -> logits vs JAX logits, fp32, max |diff| <= 1e-4 (two fp32
implementations of the same function); loading paths that move the same bytes are compared exactly.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from itersft_jax.io import weights
from itersft_jax.models import llama
from itersft_jax.models.attention.masks import positions_from_mask
from tests.support.offline import tiny_config, tiny_model

VOCAB = 320


def params_of(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assert_params_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 params_of(a), params_of(b))


def batch(lengths=(12, 7), total=12):
    rng = np.random.default_rng(0)
    mask = (np.arange(total)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask, rng.integers(3, VOCAB, (len(lengths), total)), 0)
    positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
    return ids, mask, positions


def jax_logits(model, ids, mask, positions):
    logits, _ = model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))
    return np.asarray(logits)


def torch_logits_from_dir(path, ids, mask, positions):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.numpy()


@pytest.mark.parametrize("model_type,overrides", [("llama", {}),
                                                  ("qwen3", {"tie_word_embeddings": True})])
def test_save_pretrained_loads_in_transformers_with_same_logits(tmp_path, tokenizer, model_type, overrides):
    """A JAX model that never came from a checkpoint (random Flax init) is saved and read back by HF."""
    config = tiny_config(model_type, VOCAB, **overrides)
    model = llama.CausalLM(config, rngs=nnx.Rngs(3))
    out = weights.save_pretrained(model, config, tmp_path / "out", tokenizer=tokenizer)
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names

    ids, mask, positions = batch()
    expected = jax_logits(model, ids, mask, positions)
    got = torch_logits_from_dir(out, ids, mask, positions)
    assert np.abs(got - expected)[mask.astype(bool)].max() <= 1e-4

    reloaded, hf_config = weights.load_model(out)
    assert hf_config.model_type == model_type
    assert_params_equal(model, reloaded)


def test_sharded_save_round_trip(tmp_path):
    config = tiny_config("mistral", VOCAB)
    model = llama.CausalLM(config, rngs=nnx.Rngs(1))
    out = tmp_path / "sharded"
    weights.save_pretrained(model, config, out, max_shard_size="60KB")  # ~30 tensors, ~0.5 MB in all
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)

    assert_params_equal(model, weights.load_model(out)[0])
    ids, mask, positions = batch()
    got = torch_logits_from_dir(out, ids, mask, positions)
    assert np.abs(got - jax_logits(model, ids, mask, positions))[mask.astype(bool)].max() <= 1e-4

    # Saving again unsharded into the same directory removes the stale shards.
    weights.save_pretrained(model, config, out)
    assert sorted(n for n in os.listdir(out) if n.startswith("model")) == ["model.safetensors"]


def test_torch_model_object_equals_its_saved_directory(tmp_path):
    torch_model = tiny_model("qwen2", VOCAB, seed=5)
    torch_model.save_pretrained(tmp_path)
    from_object, config_a = weights.load_model(torch_model)
    from_dir, config_b = weights.load_model(str(tmp_path))
    ignore = ("_name_or_path", "transformers_version")
    assert ({k: v for k, v in config_a.to_dict().items() if k not in ignore}
            == {k: v for k, v in config_b.to_dict().items() if k not in ignore})
    assert_params_equal(from_object, from_dir)


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch, tiny_model_dir):
    """A fake HF cache (models--org--name/snapshots/<commit>, refs/main) with HF_HUB_OFFLINE=1: loading
    "org/tiny-llama" must resolve through huggingface_hub, not as a local path."""
    import huggingface_hub.constants

    source = tiny_model_dir("llama")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-llama"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "org/tiny-llama" is not a local directory here

    resolved = weights.resolve_model_dir("org/tiny-llama")
    assert os.path.samefile(resolved, repo / "snapshots" / commit)
    from_hub, config = weights.load_model("org/tiny-llama")
    assert config.model_type == "llama"
    assert_params_equal(from_hub, weights.load_model(source)[0])
    assert weights.load_hf_config("org/tiny-llama").to_dict() == config.to_dict()

    # cache_dir in model_init_kwargs reaches snapshot_download; an unknown revision is not in the cache.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    weights.load_model("org/tiny-llama", model_init_kwargs={"cache_dir": str(tmp_path / "hub")})
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(LocalEntryNotFoundError):
        weights.load_model("org/tiny-llama", model_init_kwargs={"cache_dir": str(tmp_path / "hub"),
                                                                "revision": "v9"})


def test_trust_remote_code_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="remote.*backend='torch'"):
        weights.load_model(tiny_model_dir("llama"), model_init_kwargs={"trust_remote_code": True})


def test_unknown_model_type_lists_supported_and_suggests_torch(tmp_path):
    from transformers import BloomConfig

    BloomConfig(hidden_size=32, n_layer=1, n_head=2).save_pretrained(tmp_path)  # no JAX family, no weights needed
    with pytest.raises(ValueError) as err:
        weights.load_model(str(tmp_path))
    message = str(err.value)
    assert "bloom" in message and "llama, mistral" in message and "backend='torch'" in message


def test_bf16_checkpoint_loads(tmp_path):
    torch_model = tiny_model("llama", VOCAB).to(torch.bfloat16)
    torch_model.save_pretrained(tmp_path)
    raw = weights.read_safetensors(tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    assert raw[name].dtype.name == "bfloat16"
    expected = torch_model.state_dict()[name].float().numpy()
    np.testing.assert_array_equal(raw[name].astype(np.float32), expected)

    auto, _ = weights.load_model(str(tmp_path), model_init_kwargs={"torch_dtype": "auto"})
    as_f32, _ = weights.load_model(str(tmp_path))  # default: fp32 master params
    by_kwarg, _ = weights.load_model(str(tmp_path), model_init_kwargs={"dtype": torch.bfloat16})
    kernel = auto.model.layers[0].mlp.up_proj.kernel
    assert kernel.dtype == jnp.bfloat16 and by_kwarg.model.layers[0].mlp.up_proj.kernel.dtype == jnp.bfloat16
    assert as_f32.model.layers[0].mlp.up_proj.kernel.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(as_f32.model.layers[0].mlp.up_proj.kernel), expected.T)

    # And bf16 params save as bf16 safetensors that transformers loads bit-exactly.
    out = weights.save_pretrained(auto, torch_model.config, tmp_path / "resaved")
    assert weights.read_safetensors(out)[name].dtype.name == "bfloat16"
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(out)
    assert again.dtype == torch.bfloat16
    assert torch.equal(again.state_dict()[name], torch_model.state_dict()[name])


def test_missing_safetensors_error_is_actionable(tmp_path):
    tiny_config("llama", VOCAB).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        weights.load_model(str(tmp_path))
