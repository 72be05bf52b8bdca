"""The torch backend's compile and kernel options, measured through ``step()``: ``torch_compile`` and (on a CUDA
GPU) ``use_liger_kernel``, each against the plain eager run on the same model and data, in one process.

1. ``torch_compile``: a Llama of ``--hidden``/``--layers`` (vocab 8192), ``--calls`` ``step()`` calls of
   ``--batch`` samples of exactly ``--seq`` tokens (one update each): the first call's seconds (compile
   included) and the steady-state tokens/s of the rest; then a variable-length workload (``--calls`` calls,
   lengths uniform in [32, ``--seq``]) end to end, with the number of graphs dynamo compiled.
2. ``use_liger_kernel`` (CUDA only): same fixed-shape calls; tokens/s, peak memory, and the largest difference
   of the per-call losses against eager (Liger's kernels are numerically close, not identical).

Run: ``python benchmarks/torch_features.py [--quick] [--bf16]``. On a GPU with liger-kernel installed both tables
print; on a CPU the second says why it is skipped.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import numpy as np
from common import offline

HERE = os.path.dirname(os.path.abspath(__file__))


def build_model(hidden: int, layers: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), intermediate_size=int(hidden * 2.75),
                         vocab_size=8192, max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float()


def make_trainer(model, workdir: str, args, **config):
    make_tokenizer = offline().make_tokenizer

    from itersft_torch import IterativeSFTConfig, IterativeSFTTrainer

    cfg = IterativeSFTConfig(output_dir=os.path.join(workdir, "out"), per_device_train_batch_size=args.batch,
                             gradient_checkpointing=False, learning_rate=1e-4, report_to="none",
                             logging_steps=10**6, bf16=args.bf16, disable_tqdm=True, **config)
    return IterativeSFTTrainer(copy.deepcopy(model), args=cfg, processing_class=make_tokenizer())


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fixed_shape_run(trainer, batches) -> dict:
    """First call (compile included) and steady-state tokens/s over the remaining calls."""
    sync()
    t0 = time.perf_counter()
    losses = [trainer.step(input_ids=batches[0])["loss"]]
    sync()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for batch in batches[1:]:
        losses.append(trainer.step(input_ids=batch)["loss"])
    sync()
    steady = time.perf_counter() - t0
    tokens = sum(b.size for b in batches[1:])
    return {"first": first, "tok_s": tokens / steady, "losses": losses}


def variable_run(trainer, calls) -> float:
    sync()
    t0 = time.perf_counter()
    for samples in calls:
        trainer.step(input_ids=samples)
    sync()
    return time.perf_counter() - t0


def compile_table(args, model, workdir):
    from torch._dynamo.utils import counters

    rng = np.random.default_rng(0)
    batches = [rng.integers(3, 8192, size=(args.batch, args.seq)) for _ in range(args.calls)]
    calls = [[rng.integers(3, 8192, size=int(n)) for n in rng.integers(32, args.seq + 1, size=args.batch * 2)]
             for _ in range(args.calls)]
    rows = []
    for label, config in (("eager", {}), ("torch_compile=True", {"torch_compile": True})):
        graphs = counters["stats"]["unique_graphs"]
        fixed = fixed_shape_run(make_trainer(model, workdir, args, **config), batches)
        variable = variable_run(make_trainer(model, workdir, args, **config), calls)
        rows.append((label, fixed, variable, counters["stats"]["unique_graphs"] - graphs))
    base = rows[0]
    print(f"\n## torch_compile: Llama hidden {args.hidden} x {args.layers} layers, {args.calls} calls of "
          f"{args.batch} x {args.seq} tokens ({'bf16' if args.bf16 else 'fp32'})\n")
    print("| run | first call s | steady tokens/s | vs eager | variable-length workload s | vs eager | "
          "graphs compiled | max loss diff vs eager |")
    print("|---|---|---|---|---|---|---|---|")
    for label, fixed, variable, graphs in rows:
        diff = max(abs(a - b) for a, b in zip(fixed["losses"], base[1]["losses"]))
        print(f"| {label} | {fixed['first']:.2f} | {fixed['tok_s']:,.0f} | {fixed['tok_s'] / base[1]['tok_s']:.2f}x "
              f"| {variable:.2f} | {base[2] / variable:.2f}x | {graphs} | {diff:.2e} |")


def liger_table(args, model, workdir):
    import importlib.util

    import torch

    print("\n## use_liger_kernel\n")
    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        print("skipped: needs a CUDA GPU and liger-kernel (pip install 'itersft[liger]')")
        return
    rng = np.random.default_rng(1)
    batches = [rng.integers(3, 8192, size=(args.batch, args.seq)) for _ in range(args.calls)]
    rows = []
    for label, config in (("eager", {}), ("use_liger_kernel=True", {"use_liger_kernel": True})):
        torch.cuda.reset_peak_memory_stats()
        fixed = fixed_shape_run(make_trainer(model, workdir, args, **config), batches)
        rows.append((label, fixed, torch.cuda.max_memory_allocated() / 2**30))
    print("| run | steady tokens/s | vs eager | peak GiB | max loss diff vs eager |")
    print("|---|---|---|---|---|")
    for label, fixed, peak in rows:
        diff = max(abs(a - b) for a, b in zip(fixed["losses"], rows[0][1]["losses"]))
        print(f"| {label} | {fixed['tok_s']:,.0f} | {fixed['tok_s'] / rows[0][1]['tok_s']:.2f}x | {peak:.2f} | "
              f"{diff:.2e} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 3 calls")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.batch, args.seq, args.calls = 64, 1, 2, 32, 3
    import torch
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    model = build_model(args.hidden, args.layers)
    with tempfile.TemporaryDirectory() as workdir:
        compile_table(args, model, workdir)
        liger_table(args, model, workdir)


if __name__ == "__main__":
    main()
