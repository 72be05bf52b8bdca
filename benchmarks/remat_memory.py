"""Remat policies: peak device memory and time of one forward + backward, per ``gradient_checkpointing`` policy.

A random Llama (``--preset``), bf16 compute on fp32 parameters, the causal-LM loss on ``[batch, seq]`` tokens;
each policy runs in its own process (peak memory is a per-process high-water mark): no remat, ``full`` (keep only
layer inputs), ``dots`` (keep matmul outputs), ``offload`` (those, in pinned host memory). Prints one table with
ratios against no remat. Peak memory is read from the device's allocator statistics, so the script wants an
accelerator (on a CPU it reports time only).

    python benchmarks/remat_memory.py [--preset small|1b] [--batch 4] [--seq 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PRESETS = {  # Llama-shaped; "1b" is Llama-3.2-1B's shape (tied head, GQA 32/8)
    "small": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}


def measure(preset: str, policy: str, batch: int, seq: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from transformers import LlamaConfig

    from itersft_jax.models import llama

    config = LlamaConfig(max_position_embeddings=seq, **PRESETS[preset])
    model = llama.CausalLM(config, dtype=jnp.bfloat16, remat=False if policy == "none" else policy,
                           attn_implementation="xla", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, config.vocab_size)
    mask = jnp.ones_like(ids)
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))

    @jax.jit
    def step(params):
        def loss(params):
            logits, _ = nnx.merge(graphdef, params)(ids, positions, mask)
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
            return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))
        return jax.value_and_grad(loss)(params)

    t0 = time.perf_counter()
    jax.block_until_ready(step(params))
    first = time.perf_counter() - t0
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params))
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    return {"policy": policy, "seconds": sorted(times)[2], "first": first,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "device": jax.devices()[0].device_kind}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--policy", help=argparse.SUPPRESS)  # one measurement, in a child process
    args = parser.parse_args()
    if args.policy:
        print(json.dumps(measure(args.preset, args.policy, args.batch, args.seq)))
        return
    rows = []
    for policy in ("none", "full", "dots", "offload"):
        cmd = [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq),
               "--policy", policy]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if out.returncode:
            rows.append({"policy": policy, "error": (out.stderr.strip().splitlines() or ["?"])[-1][:100]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["policy"] == "none" and "error" not in r), None)
    device = next((r["device"] for r in rows if "device" in r), "?")
    print(f"{device}; Llama preset {args.preset}, batch {args.batch} x {args.seq} tokens, bf16 compute, fp32 params; "
          "one forward + backward of the LM loss (median of 5)")
    print("| remat policy | peak GiB | vs none | ms | vs none | first call s |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['policy']} | error: {r['error']} | | | | |")
            continue
        mem = f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base and base["peak_gib"] else ""
        speed = f"{r['seconds'] / base['seconds']:.2f}x" if base else ""
        ms = r["seconds"] * 1e3
        print(f"| {r['policy']} | {r['peak_gib']:.2f} | {mem} | {ms:.1f} | {speed} | {r['first']:.1f} |")


if __name__ == "__main__":
    main()
