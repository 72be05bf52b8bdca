"""Flax checkpoints (``flax_model.msgpack``, single and sharded) on the JAX engine, and ``flax_format`` saves.

The fixtures in ``tests/fixtures/flax`` were written by transformers 4.57's own Flax classes from tiny random
PyTorch models (``make_flax_fixtures.py``); each ``<name>.npz`` holds that PyTorch model's fp32 logits, the
reference. Tolerances: JAX vs PyTorch logits, fp32, max |diff| <= 1e-5 (two fp32 implementations; seen <= 1e-7);
paths that move the same bytes (save -> load, Flax tree -> tree) are compared exactly.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer
from itersft_jax.io import flax_weights, weights
from tests.support.offline import make_tokenizer, tiny_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "flax")
FAMILIES = ("llama", "mistral", "gemma", "gpt2", "opt", "gpt_neo", "gptj")
TOLERANCE = 1e-5


def reference(name: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(os.path.join(FIXTURES, f"{name}.npz"))
    return data["input_ids"], data["logits"]


def jax_logits(model, ids: np.ndarray) -> np.ndarray:
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    logits, _ = model(jnp.asarray(ids), jnp.asarray(positions), jnp.ones(ids.shape, jnp.int32))
    return np.asarray(logits)


def params_of(model) -> dict:
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def flax_only_copy(source: str, dest) -> str:
    """``source``'s config and Flax weights, without its safetensors."""
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(source):
        if name == "config.json" or name.startswith("flax_model"):
            shutil.copy(os.path.join(source, name), dest)
    return str(dest)


@pytest.mark.parametrize("name", [*FAMILIES, *(f"{f}-sharded" for f in FAMILIES), "llama-bf16"])
def test_flax_only_dir_gives_the_torch_models_logits(name):
    path = os.path.join(FIXTURES, name)
    assert flax_weights.is_flax_only(path)
    assert any(f.endswith("index.json") for f in os.listdir(path)) == name.endswith("-sharded")
    model, config = weights.load_model(path)
    ids, expected = reference(name)
    diff = np.abs(jax_logits(model, ids) - expected).max()
    assert diff <= TOLERANCE, f"{name}: JAX logits differ from the PyTorch reference by {diff}"


def test_bf16_file_keeps_its_dtype_and_values():
    path = os.path.join(FIXTURES, "llama-bf16")
    _, tree = flax_weights.read_flax_tree(path)
    assert {a.dtype.name for a in tree.values()} == {"bfloat16"}
    auto, _ = weights.load_model(path, model_init_kwargs={"dtype": "auto"})
    kernel = auto.model.layers[0].mlp.up_proj.kernel
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(kernel), tree["model/layers/0/mlp/up_proj/kernel"])


@pytest.mark.parametrize("name", [*FAMILIES, "llama-bf16"])
def test_flax_save_reproduces_transformers_tree(tmp_path, name):
    """Loading a fixture and saving it with flax_format gives transformers' own tree back: same paths, shapes,
    dtypes and values (the inverse mapping is exact); our loader reads it back to the same parameters."""
    model, config = weights.load_model(os.path.join(FIXTURES, name), model_init_kwargs={"dtype": "auto"})
    out = weights.save_pretrained(model, config, tmp_path / "saved", flax_format=True)
    _, theirs = flax_weights.read_flax_tree(os.path.join(FIXTURES, name))
    _, ours = flax_weights.read_flax_tree(out)
    assert sorted(ours) == sorted(theirs)
    for path, array in theirs.items():
        assert ours[path].dtype == array.dtype and ours[path].shape == array.shape, path
        np.testing.assert_array_equal(ours[path], array, err_msg=path)
    again, _ = weights.load_model(flax_only_copy(out, tmp_path / "flax-only"), model_init_kwargs={"dtype": "auto"})
    assert_trees_equal(params_of(again), params_of(model))


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("family", FAMILIES)
def test_step_then_save_loads_in_transformers_with_same_logits(tmp_path, tokenizer, family):
    from transformers import AutoModelForCausalLM

    ids, _ = reference(family)
    args = IterativeSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-2,
                              gradient_checkpointing=False, report_to="none")
    trainer = IterativeSFTTrainer(os.path.join(FIXTURES, family), args=args, processing_class=tokenizer)
    before = jax_logits(trainer.model, ids)
    trainer.step(input_ids=ids)
    ours = jax_logits(trainer.model, ids)
    assert np.abs(ours - before).max() > 1e-3  # the step changed the model
    out = trainer.save_model(str(tmp_path / "saved"), flax_format=True)

    torch_model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.tensor(ids)).logits.numpy()
    diff = np.abs(theirs - ours).max()
    assert diff <= TOLERANCE, f"{family}: transformers' logits of the saved model differ by {diff}"

    # The Flax file alone round-trips to the trained parameters.
    reloaded, _ = weights.load_model(flax_only_copy(out, tmp_path / "flax-only"))
    assert_trees_equal(params_of(reloaded), jax.device_get(nnx.to_pure_dict(trainer.params)))


def test_tied_llama_writes_its_head_as_flax_llama_has_no_tying(tmp_path):
    config = tiny_config("llama", 96, hidden_size=16, intermediate_size=32, tie_word_embeddings=True)
    from itersft_jax.models import llama

    model = llama.CausalLM(config, rngs=nnx.Rngs(3))
    out = weights.save_pretrained(model, config, tmp_path / "tied", flax_format=True)
    _, tree = flax_weights.read_flax_tree(out)
    np.testing.assert_array_equal(tree["lm_head/kernel"], tree["model/embed_tokens/embedding"].T)
    again, _ = weights.load_model(flax_only_copy(out, tmp_path / "flax-only"))
    assert_trees_equal(params_of(again), params_of(model))
    # A Flax Llama whose head is not the embedding cannot load under a tying config: it would be dropped.
    tree["lm_head/kernel"] = tree["lm_head/kernel"] + 1
    from flax.serialization import msgpack_serialize
    from flax.traverse_util import unflatten_dict

    with open(tmp_path / "flax-only" / "flax_model.msgpack", "wb") as f:
        f.write(msgpack_serialize(unflatten_dict(tree, sep="/")))
    with pytest.raises(ValueError, match="lm_head/kernel.*tie_word_embeddings"):
        weights.load_model(str(tmp_path / "flax-only"))


MESH_SCRIPT = """
import json, sys
import jax, numpy as np
from flax import nnx
from itersft_jax.parallel.mesh import make_mesh
from itersft_jax.io.weights import load_model
mesh = make_mesh("fsdp:4,tensor:2")
plain = jax.tree.leaves(nnx.to_pure_dict(nnx.state(load_model(sys.argv[1])[0], nnx.Param)))
placed = jax.tree.leaves(nnx.to_pure_dict(nnx.state(load_model(sys.argv[1], mesh=mesh)[0], nnx.Param)))
print(json.dumps({"devices": jax.device_count(),
                  "equal": all(bool((np.asarray(a) == np.asarray(b)).all()) for a, b in zip(plain, placed)),
                  "split": sum(len({str(s.index) for s in x.addressable_shards}) > 1 for x in placed),
                  "total": len(placed)}))
"""


def test_mesh_gives_each_device_its_slices():
    """On 8 (fake CPU) devices, a sharded Flax checkpoint goes straight to its slices, as safetensors do."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, os.path.join(FIXTURES, "llama-sharded")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["devices"] == 8 and got["equal"] and got["split"] >= got["total"] // 2, got


def test_safetensors_win_over_msgpack(tmp_path):
    llama, config = weights.load_model(os.path.join(FIXTURES, "llama"))
    both = weights.save_pretrained(llama, config, tmp_path / "both")
    shutil.copy(os.path.join(FIXTURES, "mistral", "flax_model.msgpack"), both)  # same shapes, other values
    assert not flax_weights.is_flax_only(both)
    loaded, _ = weights.load_model(both)
    assert_trees_equal(params_of(loaded), params_of(llama))


def test_hub_fetches_msgpack_only_without_safetensors():
    base = ["config.json", "*.safetensors"]
    assert flax_weights.hub_fallback_patterns(["config.json", "model.safetensors"], base) is None
    assert flax_weights.hub_fallback_patterns(["config.json", "model.safetensors.index.json"], base) is None
    fallback = flax_weights.hub_fallback_patterns(["config.json", "generation_config.json"], base)
    assert fallback[:2] == base and "flax_model*.msgpack" in fallback
    assert "flax_model.msgpack.index.json" in fallback
    assert not any("msgpack" in p for p in weights.MODEL_DIR_PATTERNS)  # the first download never fetches them


def test_flax_only_hub_id_loads_through_the_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--flax-gpt2"
    shutil.copytree(os.path.join(FIXTURES, "gpt2-sharded"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    model, config = weights.load_model("org/flax-gpt2")
    ids, expected = reference("gpt2-sharded")
    assert config.model_type == "gpt2" and np.abs(jax_logits(model, ids) - expected).max() <= TOLERANCE


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("model_type", ["qwen2", "gpt_neox"])
def test_msgpack_of_unsupported_family_names_the_supported_ones(tmp_path, model_type):
    if model_type == "gpt_neox":
        from transformers import GPTNeoXConfig

        GPTNeoXConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    else:
        tiny_config(model_type, 96, hidden_size=16, intermediate_size=32).save_pretrained(tmp_path)
    shutil.copy(os.path.join(FIXTURES, "llama", "flax_model.msgpack"), tmp_path)
    with pytest.raises(ValueError, match=f"{model_type}.*{', '.join(flax_weights.FLAX_MODEL_TYPES)}"):
        weights.load_model(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "shard"])
def test_damaged_msgpack_names_the_file(tmp_path, damage):
    name = "opt-sharded" if damage == "shard" else "opt"
    path = shutil.copytree(os.path.join(FIXTURES, name), tmp_path / name)
    target = path / ("flax_model-00002-of-00003.msgpack" if damage == "shard" else "flax_model.msgpack")
    raw = target.read_bytes()
    target.write_bytes(b"\x92\x01\x02" + raw[3:64] if damage == "garbage" else raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=f"{target.name}.*(damaged or truncated|not a Flax parameter tree)"):
        weights.load_model(str(path))


@pytest.mark.parametrize("override,named", [
    ({"intermediate_size": 48}, r"parameter model/layers/0/mlp/\w+_proj/kernel has shape"),
    ({"num_hidden_layers": 3}, r"lacks.*model/layers/2/"),
    ({"num_hidden_layers": 1}, r"does not have.*model/layers/1/"),
])
def test_tree_that_does_not_match_the_config_names_the_parameter(tmp_path, override, named):
    path = flax_only_copy(os.path.join(FIXTURES, "llama"), tmp_path / "llama")
    with pytest.raises(ValueError, match=named):
        weights.load_model(path, model_init_kwargs=override)


def test_flax_format_refused_for_a_family_without_flax_classes(tmp_path):
    config = tiny_config("qwen2", 96, hidden_size=16, intermediate_size=32)
    from itersft_jax.models import get_family

    model = get_family("qwen2").CausalLM(config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=f"flax_format.*{', '.join(flax_weights.FLAX_MODEL_TYPES)}"):
        weights.save_pretrained(model, config, tmp_path / "out", flax_format=True)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")  # refused before any write


def test_flax_format_refused_for_a_tied_gptj(tmp_path):
    """transformers' Flax GPT-J applies a tied head without its bias and fails: no such file is written."""
    config = tiny_config("gptj", 96, n_embd=16, n_head=2, n_inner=32, rotary_dim=4, tie_word_embeddings=True)
    from itersft_jax.models import get_family

    model = get_family("gptj").CausalLM(config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="flax_format: transformers' Flax GPT-J cannot run a tied head"):
        weights.save_pretrained(model, config, tmp_path / "out", flax_format=True)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_torch_backend_refuses_flax_only_dir_pointing_to_jax(tmp_path):
    args = IterativeSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="Flax weights.*backend=\"jax\""):
        IterativeSFTTrainer(os.path.join(FIXTURES, "gpt2"), args=args, backend="torch")
