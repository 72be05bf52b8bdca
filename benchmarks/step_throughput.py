"""Training throughput: the JAX engine against PyTorch, in one process, on the same model and data.

Two tables:

1. fixed shapes — a ~30M-parameter Llama (hidden 512, 8 layers, vocab 8192), seq 256, batch 8, fp32:
   tokens/s of the JAX ``train_step`` after warm-up (compile time apart) vs a plain PyTorch loop
   (``transformers`` model + ``torch.optim.AdamW``) on the same weights and batches.
2. an iterative workload — ``--calls`` ``step()`` calls of ``--samples`` samples with lengths uniform in
   [32, 512], batch 8, fixed seed — through ``IterativeSFTTrainer(backend="jax")`` and
   ``(backend="torch")``: non-pad tokens/s *including* compile time, computed (padded) tokens, train-step
   compiles, ratio. With ``--trl-python PATH`` (a Python with trl==0.23.1 and transformers 4.57), TRL's
   trainer runs the same generated data in that interpreter as a third column.

Run: ``python benchmarks/step_throughput.py`` (add ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

import numpy as np
from common import save_random_model

HERE = os.path.dirname(os.path.abspath(__file__))


def llama_config(hidden, layers, vocab, heads=8, intermediate=None):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, intermediate_size=intermediate or int(hidden * 2.75),
                       vocab_size=vocab, max_position_embeddings=1024, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------------
# 1. Fixed shapes


def fixed_shapes(args, workdir):
    import torch

    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer

    config = llama_config(512, 8, 8192)
    path = os.path.join(workdir, "llama30m")
    torch_model = save_random_model(config, path)
    rng = np.random.default_rng(0)
    batches = [rng.integers(3, config.vocab_size, size=(args.batch, args.seq)) for _ in range(args.steps + 2)]

    cfg = IterativeSFTConfig(output_dir=os.path.join(workdir, "out"), per_device_train_batch_size=args.batch,
                             gradient_checkpointing=False, learning_rate=1e-4, report_to="none",
                             logging_steps=10**6, bf16=False, disable_tqdm=True)
    trainer = IterativeSFTTrainer(path, args=cfg, backend="jax")
    t0 = time.perf_counter()
    trainer.step(input_ids=batches[0])
    jax_compile = time.perf_counter() - t0
    trainer.step(input_ids=batches[1])
    import jax

    jax.block_until_ready(trainer.train_state)
    t0 = time.perf_counter()
    for b in batches[2:]:
        trainer.step(input_ids=b)
    jax.block_until_ready(trainer.train_state)
    jax_time = time.perf_counter() - t0

    torch_model.train()
    opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-4)

    def torch_step(b):
        ids = torch.as_tensor(b)
        loss = torch_model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    torch_step(batches[0])
    torch_first = time.perf_counter() - t0
    torch_step(batches[1])
    t0 = time.perf_counter()
    for b in batches[2:]:
        torch_step(b)
    torch_time = time.perf_counter() - t0

    tokens = args.steps * args.batch * args.seq
    jax_tps, torch_tps = tokens / jax_time, tokens / torch_time
    print(f"\n## Fixed shapes: Llama {n_params(torch_model) / 1e6:.1f}M params, batch {args.batch}, "
          f"seq {args.seq}, fp32, {args.steps} timed updates after 2 warm-up\n")
    print("| engine | first call (s) | tokens/s | ratio vs PyTorch |")
    print("|---|---|---|---|")
    ratio = jax_tps / torch_tps
    print(f"| itersft JAX train_step | {jax_compile:.1f} (compile incl.) | {jax_tps:,.0f} | {ratio:.2f}x |")
    print(f"| PyTorch loop (transformers + AdamW) | {torch_first:.1f} | {torch_tps:,.0f} | 1.00x |")
    return {"jax_tokens_per_s": jax_tps, "torch_tokens_per_s": torch_tps, "jax_compile_s": jax_compile}


# --------------------------------------------------------------------------------------------------------
# 2. Iterative workload


def make_workload(calls, samples, vocab, seed=0, lo=32, hi=512):
    rng = np.random.default_rng(seed)
    return [[rng.integers(3, vocab, size=int(n)).tolist() for n in rng.integers(lo, hi + 1, size=samples)]
            for _ in range(calls)]


def run_backend(backend, path, workload, workdir, batch, bf16=False):
    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer

    cfg = IterativeSFTConfig(output_dir=os.path.join(workdir, f"out-{backend}"), per_device_train_batch_size=batch,
                             gradient_checkpointing=False, learning_rate=1e-4, report_to="none",
                             logging_steps=10**6, bf16=bf16, disable_tqdm=True)
    t0 = time.perf_counter()
    trainer = IterativeSFTTrainer(path, args=cfg, backend=backend)
    load = time.perf_counter() - t0
    real = padded = 0
    losses = []
    compile_s = []  # XLA compile seconds of the JAX train step (empty for torch)

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" and "train_step" in str(kwargs.get("fun_name")):
            compile_s.append(duration)

    import jax

    jax.monitoring.register_event_duration_secs_listener(listener)
    t0 = time.perf_counter()
    try:
        for ids in workload:
            out = trainer.step(input_ids=ids)
            real += sum(len(x) for x in ids)
            padded += out.get("padded_tokens", 0)
            losses.append(out["loss"])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "load_s": load, "tokens_per_s": real / seconds, "real_tokens": real,
            "padded_tokens": padded, "first_loss": losses[0], "last_loss": losses[-1],
            "compiles": len(compile_s) if backend == "jax" else None, "compile_s": sum(compile_s)}


def iterative(args, workdir):
    config = llama_config(args.hidden, args.layers, args.vocab, heads=4)
    path = os.path.join(workdir, "llama-iter")
    model = save_random_model(config, path)
    workload = make_workload(args.calls, args.samples, config.vocab_size)
    results = {b: run_backend(b, path, workload, workdir, args.batch) for b in ("jax", "torch")}
    if args.trl_python:
        data = os.path.join(workdir, "workload.json")
        with open(data, "w") as f:
            json.dump(workload, f)
        proc = subprocess.run([args.trl_python, os.path.join(HERE, "trl_workload.py"), path, data,
                               str(args.batch)], capture_output=True, text=True)
        if proc.returncode == 0:
            results["trl-0.23.1"] = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            print("TRL run failed:\n", proc.stderr[-2000:])
    base = results["torch"]["tokens_per_s"]
    print(f"\n## Iterative workload: Llama {n_params(model) / 1e6:.1f}M params, {args.calls} calls x "
          f"{args.samples} samples, lengths U[32, 512], batch {args.batch}, fp32, compile included\n")
    print("| engine | seconds | real tokens/s | computed tokens | step compiles (s) | first/last loss | "
          "ratio vs torch backend |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        padded = f"{r['padded_tokens']:,}" if r.get("padded_tokens") else "n/a"
        compiles = f"{r['compiles']} ({r['compile_s']:.1f})" if r.get("compiles") is not None else "n/a"
        print(f"| {name} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | {padded} | {compiles} | "
              f"{_losses(r)} | {r['tokens_per_s'] / base:.2f}x |")
    return results


def _losses(r):
    if r.get("first_loss") is None:
        return "n/a (step() returns None)"
    return f"{r['first_loss']:.3f}/{r['last_loss']:.3f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "fixed", "iterative"], default="all")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256, help="iterative workload model (default ~6M params)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.steps, args.calls, args.samples, args.seq = 2, 2, 8, 64
    import jax

    print(f"devices: {jax.devices()}  jax {jax.__version__}")
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        if args.part in ("all", "fixed"):
            results["fixed"] = fixed_shapes(args, workdir)
        if args.part in ("all", "iterative"):
            results["iterative"] = iterative(args, workdir)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
