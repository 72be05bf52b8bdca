"""A mixture of experts' training step against a dense model with the same *active* parameters, and its memory per
device under expert parallelism (issue 29).

1. Step cost, CPU, one process: a Mixtral-shaped model (hidden 256, 4 layers, 8 experts of width 256, top-2) and its
   dense twin (the same model with one MLP of width 2 x 256: the same active parameters and matmul FLOPs per token),
   fp32, batch 8 x 256 tokens, the JAX ``train_step`` through ``step()``. Rows: the dense model; the MoE with the
   CPU's blocked grouped matmul (the default here); the MoE with ``jax.lax.ragged_dot``, which XLA:CPU lowers to a
   product with every expert (what computing all 8 experts costs). Median of the timed updates, the models taking
   turns so that the machine's load drifts alike for all.
2. Memory per device (a worker with 4 fake CPU devices): the bytes one device holds of the parameters + Adam moments
   (experts and the rest) and XLA's temporary buffers of the compiled step, under ``data:4`` (expert:1) and
   ``expert:4``; and the step time of the two ways ``expert:4`` can run a sparse layer — tokens exchanged under
   ``shard_map`` (all-gather in the expert group, reduce-scatter back; the default) or the plain program with the
   expert weights split and XLA's partitioner left to gather them.

    python benchmarks/moe_step.py            # ~5 minutes on 2 idle cores
    python benchmarks/moe_step.py --quick    # a smoke run (tests/test_benchmarks_smoke.py)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from common import save_random_model

HERE = os.path.dirname(os.path.abspath(__file__))


def configs(quick: bool):
    """(MoE config, its dense twin): Mixtral-shaped, no sliding window."""
    from transformers import MistralConfig, MixtralConfig

    d, layers, experts, top_k, width = (64, 2, 8, 2, 64) if quick else (256, 4, 8, 2, 256)
    common = dict(hidden_size=d, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                  vocab_size=2048, max_position_embeddings=1024, tie_word_embeddings=False, sliding_window=None,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    moe = MixtralConfig(intermediate_size=width, num_local_experts=experts, num_experts_per_tok=top_k, **common)
    return moe, MistralConfig(intermediate_size=top_k * width, **common)


def make_trainer(model_dir: str, out_dir: str, batch: int, mesh: str | None = None):
    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer

    args = IterativeSFTConfig(output_dir=out_dir, per_device_train_batch_size=batch, gradient_checkpointing=False,
                              learning_rate=1e-4, report_to="none", logging_steps=10**6, disable_tqdm=True, mesh=mesh)
    return IterativeSFTTrainer(model_dir, args=args)


def timed_step(trainer, batch) -> float:
    import jax

    t0 = time.perf_counter()
    trainer.step(input_ids=batch)
    jax.block_until_ready(trainer.train_state)
    return time.perf_counter() - t0


def step_cost(args, workdir: str) -> dict:
    from itersft_jax.models import moe

    moe_config, dense_config = configs(args.quick)
    paths = {}
    for name, config in (("moe", moe_config), ("dense", dense_config)):
        paths[name] = os.path.join(workdir, name)
        save_random_model(config, paths[name])
    rows = [("dense MLP of width k x F (same active parameters)", "dense", "auto"),
            ("MoE top-2 of 8, blocked grouped matmul (CPU default)", "moe", "blocked"),
            ("MoE top-2 of 8, ragged_dot (XLA:CPU: every expert)", "moe", "ragged")]
    rng = np.random.default_rng(0)
    batches = [rng.integers(3, 2048, size=(args.batch, args.seq)) for _ in range(args.steps + 2)]
    trainers, times = {}, {label: [] for label, *_ in rows}
    for label, name, grouped in rows:
        moe.GROUPED_MATMUL = grouped  # read when the step is traced: the warm-up steps below
        trainers[label] = make_trainer(paths[name], os.path.join(workdir, f"out-{grouped}-{name}"), args.batch)
        for b in batches[:2]:
            timed_step(trainers[label], b)
    moe.GROUPED_MATMUL = "auto"
    for b in batches[2:]:  # round robin: load drifts hit every row alike
        for label, *_ in rows:
            times[label].append(timed_step(trainers[label], b))
    tokens = args.batch * args.seq
    median = {label: statistics.median(t) for label, t in times.items()}
    dense = median[rows[0][0]]
    d, f = moe_config.hidden_size, moe_config.intermediate_size
    print(f"\n## Step cost, CPU: d={d}, {moe_config.num_hidden_layers} layers, 8 experts of width {f} (top-2) vs a "
          f"dense MLP of width {2 * f}; batch {args.batch} x {args.seq}, fp32, median of {args.steps} updates\n")
    print("| model | step (s) | tokens/s | ratio vs dense |")
    print("|---|---|---|---|")
    for label, *_ in rows:
        print(f"| {label} | {median[label]:.3f} | {tokens / median[label]:,.0f} | {median[label] / dense:.2f}x |")
    return {label: {"seconds": median[label], "ratio": median[label] / dense} for label, *_ in rows}


# --------------------------------------------------------------------------------------------------------
# 2. Memory per device (a worker with 4 fake devices)


def state_bytes(trainer) -> dict:
    """Largest bytes one device holds of the params + optimizer state, experts and the rest apart."""
    import jax

    per_device: dict = {"experts": {}, "others": {}}
    for path, x in jax.tree_util.tree_flatten_with_path((trainer.train_state.params,
                                                         trainer.train_state.opt_state))[0]:
        kind = "experts" if "experts" in jax.tree_util.keystr(path) else "others"
        for shard in x.addressable_shards:
            per_device[kind][shard.device] = per_device[kind].get(shard.device, 0) + shard.data.nbytes
    return {kind: max(v.values()) for kind, v in per_device.items()}


def temp_bytes(trainer, batch_ids) -> int:
    """XLA's temporary buffers of one device for the compiled step of ``batch_ids``' shape."""
    from itersft_jax.core.packing import pack_update, rows_per_micro_batch
    from itersft_jax.parallel import distributed
    from itersft_jax.parallel.mesh import data_parallel_size
    from itersft_jax.shared.data import Example, bucket_length

    length = bucket_length(batch_ids.shape[1])
    rows = rows_per_micro_batch(length, data_parallel_size(trainer.mesh))
    examples = [Example(np.asarray(r, np.int32), np.asarray(r, np.int32)) for r in batch_ids]
    num_micro = -(-len(examples) // rows)
    arrays, _ = pack_update([examples], row_length=length, rows=rows, num_micro_batches=num_micro)
    batch = distributed.global_batch(arrays, trainer.batch_sharding)
    return int(trainer.train_step.lower(trainer.train_state, batch).compile().memory_analysis().temp_size_in_bytes)


def memory_worker(model_dir: str, out_dir: str, quick: bool) -> dict:
    import jax

    from itersft_jax.models import moe

    assert jax.device_count() == 4, jax.devices()
    seq, batch, steps = (64, 8, 2) if quick else (256, 8, 4)
    rng = np.random.default_rng(0)
    batches = [rng.integers(3, 2048, size=(batch, seq)) for _ in range(steps + 1)]
    out = {}
    for label, mesh, parallel in (("data:4 (expert:1)", "data:4", True), ("expert:4, tokens exchanged", "expert:4",
                                                                          True),
                                  ("expert:4, weights gathered by XLA", "expert:4", False)):
        moe.EXPERT_PARALLEL = "tokens" if parallel else "xla"  # read when the model is put on the mesh
        trainer = make_trainer(model_dir, os.path.join(out_dir, str(len(out))), batch // 4, mesh)
        timed_step(trainer, batches[0])
        seconds = statistics.median(timed_step(trainer, b) for b in batches[1:])
        out[label] = {"seconds": seconds, **state_bytes(trainer), "temp": temp_bytes(trainer, batches[0])}
    return out


def memory(args, workdir: str) -> dict:
    import subprocess

    moe_config, _ = configs(args.quick)
    model_dir = os.path.join(workdir, "moe-memory")
    save_random_model(moe_config, model_dir)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    command = [sys.executable, os.path.abspath(__file__), "--memory-worker", model_dir, os.path.join(workdir, "mem")]
    proc = subprocess.run(command + (["--quick"] if args.quick else []), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    base = result["data:4 (expert:1)"]
    print("\n## Memory per device and the expert-parallel strategies: 4 fake CPU devices, the same MoE\n")
    print("| mesh | experts' params + Adam (MiB) | other params + Adam (MiB) | XLA temporaries (MiB) | step (s) |"
          " step vs data:4 |")
    print("|---|---|---|---|---|---|")
    for label, r in result.items():
        print(f"| {label} | {r['experts'] / 2**20:.2f} | {r['others'] / 2**20:.2f} | {r['temp'] / 2**20:.2f} | "
              f"{r['seconds']:.3f} | {r['seconds'] / base['seconds']:.2f}x |")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny shapes, 2 timed updates")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--memory-worker", nargs=2, metavar=("MODEL_DIR", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker, args.quick)))
        return
    if args.quick:
        args.batch, args.seq, args.steps = 4, 64, 2
    with tempfile.TemporaryDirectory() as workdir:
        results = {"step_cost": step_cost(args, workdir), "memory": memory(args, workdir)}
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
