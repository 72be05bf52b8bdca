"""Runs the sharding checks of test_sharding.py in one process of 8 fake CPU devices (or imported: 1 device).

    python -m tests.support.sharding_worker MODEL_DIR OUT_DIR   # 8 devices: every mesh, checkpoint re-mesh, generate

Writes ``OUT_DIR/results.json``: per mesh the per-update losses of three mixed step() calls, the per-device
fraction of the state's bytes, the params (``<mesh>.npz``), the losses and state layout of a resume under another
mesh, and greedy generations.
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import numpy as np  # noqa: E402

GLOBAL_ROWS = 8  # per_device_train_batch_size x data-parallel devices, the same on every mesh
MESHES = ("data:8", "fsdp:8", "fsdp:4,tensor:2", "data:2,fsdp:2,tensor:2")
TEXTS = ["The quick brown fox jumps over the lazy dog.", "hello world", "def add(a, b):\n    return a + b",
         "12 + 30 = 42.", "Rejection sampling keeps only the verified completions.", "JAX and PyTorch",
         "Question: what is two plus two? Answer: four.", "abc", "Generate, filter, then step."]
PROMPTS = ["Question: what is two plus two?", "12 + 30 =", "def add(a, b):", "The quick"]
COMPLETIONS = [" Answer: four.", " 42.", "\n    return a + b", " brown fox"]


def make(model_dir: str, out_dir: str, mesh: str | None, peft_config=None, **overrides):
    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer
    from itersft_jax.parallel.mesh import data_parallel_size, make_mesh

    per_device = GLOBAL_ROWS // data_parallel_size(make_mesh(mesh))
    kwargs = dict(output_dir=out_dir, per_device_train_batch_size=per_device, gradient_accumulation_steps=2,
                  learning_rate=3e-3, max_grad_norm=0.5, weight_decay=0.1, adam_epsilon=1e-6,
                  gradient_checkpointing=False,
                  report_to="none", logging_steps=1, save_strategy="no", mesh=mesh, seed=0)
    kwargs.update(overrides)
    return IterativeSFTTrainer(model_dir, args=IterativeSFTConfig(**kwargs), peft_config=peft_config)


def mixed_steps(trainer, stats: list | None = None) -> list[float]:
    """Three step() calls in the three input forms; the per-update losses (from the log history). ``stats``: a list
    that receives each call's StepStats."""
    tok = trainer.processing_class
    ids = tok(TEXTS[:6]).input_ids
    calls = [dict(texts=TEXTS * 2),  # 18 samples: updates of 16 and 2
             dict(prompts=PROMPTS, completions=COMPLETIONS),
             dict(input_ids=ids, labels=[[-100] * 3 + row[3:] for row in ids])]
    for call in calls:
        out = trainer.step(**call)
        if stats is not None:
            stats.append(out)
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def flat_params(trainer) -> dict[str, np.ndarray]:
    import jax
    from flax import nnx

    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(trainer.params))[0]
    return {jax.tree_util.keystr(path): np.asarray(jax.device_get(x)) for path, x in flat}


def device_fraction(trainer) -> float:
    """Largest bytes of params + optimizer state held by one device, over the bytes of one whole copy."""
    import jax

    whole, per_device = 0, {}
    for x in jax.tree.leaves((trainer.train_state.params, trainer.train_state.opt_state)):
        whole += x.nbytes
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values()) / whole


def layout(trainer) -> dict[str, list]:
    """Per leaf of params + optimizer state: the axis sizes of its sharding's mesh and its PartitionSpec."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path((trainer.train_state.params, trainer.train_state.opt_state))[0]
    return {jax.tree_util.keystr(path): [dict(getattr(x.sharding, "mesh", {"one device": 1}).shape),
                                         str(getattr(x.sharding, "spec", None))] for path, x in flat}


def generations(trainer) -> list[list[int]]:
    out = trainer.generate(PROMPTS, max_new_tokens=6, do_sample=False)
    return [list(map(int, seq)) for seq in out.sequences]


def lora_losses(model_dir: str, out_dir: str, mesh: str | None) -> list[float]:
    """Two step() calls with LoRA adapters (B random) on every linear layer: the per-update losses."""
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    trainer = make(model_dir, out_dir, mesh, peft_config=config, gradient_accumulation_steps=1)
    trainer.step(texts=TEXTS)
    trainer.step(prompts=PROMPTS, completions=COMPLETIONS)
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def low_level_losses(model_dir: str, out_dir: str, mesh: str | None) -> list[float]:
    """Three low-level updates (cross_entropy, ppo split over two forward_backward calls, cispo): the loss sum
    before each and after the last (forward)."""
    from itersft_jax.shared.datum import make_data

    trainer = make(model_dir, out_dir, mesh)
    tok = trainer.processing_class
    prompts, completions = tok(PROMPTS).input_ids, tok(COMPLETIONS, add_special_tokens=False).input_ids
    sampler = [[-5.0 - 0.1 * j for j in range(len(c))] for c in completions]
    data = make_data(prompts, completions, logprobs=sampler, advantages=[1.0, -0.5, 0.25, 0.75])
    losses = [trainer.forward_backward(data).metrics["loss:sum"]]
    trainer.optim_step()
    losses += [trainer.forward_backward(data[:1], "ppo").metrics["loss:sum"]
               + trainer.forward_backward(data[1:], "ppo").metrics["loss:sum"]]
    trainer.optim_step()
    losses.append(trainer.forward_backward(data, "cispo").metrics["loss:sum"])
    trainer.optim_step()
    return losses + [trainer.forward(data, "importance_sampling").metrics["loss:sum"]]


def make_mesh_for(spec: str):
    from itersft_jax.parallel.mesh import make_mesh

    return make_mesh(spec)


def loaded_sharded_equals_plain(model_dir: str, mesh) -> dict:
    """Loading straight onto ``mesh`` gives the plain load's values exactly; how many tensors came out split."""
    import jax
    from flax import nnx

    from itersft_jax.io.weights import load_model

    plain = jax.tree.leaves(nnx.to_pure_dict(nnx.state(load_model(model_dir)[0], nnx.Param)))
    sharded = jax.tree.leaves(nnx.to_pure_dict(nnx.state(load_model(model_dir, mesh=mesh)[0], nnx.Param)))
    return {"equal": all(bool((np.asarray(a) == np.asarray(b)).all()) for a, b in zip(plain, sharded)),
            "split": sum(len({str(s.index) for s in x.addressable_shards}) > 1 for x in sharded), "total": len(sharded)}


def main(model_dir: str, out_dir: str) -> None:
    import jax

    assert jax.device_count() == 8, jax.devices()
    results: dict = {"meshes": {}}
    for mesh in MESHES:
        trainer = make(model_dir, os.path.join(out_dir, mesh.replace(":", "").replace(",", "_")), mesh)
        losses = mixed_steps(trainer)
        np.savez(os.path.join(out_dir, mesh + ".npz"), **flat_params(trainer))
        results["meshes"][mesh] = {"losses": losses, "fraction": device_fraction(trainer)}
        if mesh == "fsdp:8":
            checkpoint = trainer.save_checkpoint(os.path.join(out_dir, "ckpt-fsdp8"))
            results["continued"] = [trainer.step(texts=TEXTS[:5])["loss"]]
        if mesh == "fsdp:4,tensor:2":
            results["generate"] = generations(trainer)
            results["layout"] = layout(trainer)
    results["loaded_sharded"] = loaded_sharded_equals_plain(model_dir, make_mesh_for("fsdp:4,tensor:2"))
    results["lora"] = lora_losses(model_dir, os.path.join(out_dir, "lora"), "fsdp:4,tensor:2")
    results["low_level"] = low_level_losses(model_dir, os.path.join(out_dir, "low-level"), "data:2,fsdp:2,tensor:2")
    resumed = make(model_dir, os.path.join(out_dir, "resumed"), "fsdp:4,tensor:2")
    resumed.resume_from_checkpoint(checkpoint)
    results["resumed_layout"] = layout(resumed)
    results["resumed"] = [resumed.step(texts=TEXTS[:5])["loss"]]
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
