"""CPU memory: peak resident memory that two ``step()`` calls add, JAX backend vs torch backend.

A 2-layer Llama with Llama 3's vocabulary (128,256 tokens; hidden ``--hidden``, default 256) trains on two
``step()`` calls of ``[2, 2048]`` token ids, fp32, no gradient checkpointing. The vocabulary makes the
LM head and its loss the largest tensors of the step: ``[2, 2048, 128256]`` fp32 logits are 2.1 GB.

Each backend runs in its own process (a fresh interpreter: no allocator or cache shared between them).
The worker builds the trainer, then resets the kernel's peak-RSS counter (``/proc/self/clear_refs``),
reads ``VmRSS``, makes the two calls and reads ``VmHWM``: "added" is the peak during the calls minus the
resident memory just before them. XLA's compilation of the train step happens inside the first call and
is counted. The optimizer state is not comparable as such: the JAX engine allocates Adam's moments when
the trainer is built (before the calls), torch in its first ``optimizer.step()`` (inside them); the table
shows both the resident memory before the calls and the added peak, and the Adam moments' size.

    python benchmarks/memory_check.py [--hidden 256] [--seq 2048] [--vocab 128256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from common import reset_peak, run_worker, save_random_llama, status_kib


def worker(backend: str, model_dir: str, batch: int, seq: int, vocab: int) -> dict:
    import gc

    import numpy as np

    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer

    cfg = IterativeSFTConfig(output_dir=os.path.join(model_dir, f"out-{backend}"), per_device_train_batch_size=batch,
                             gradient_checkpointing=False, learning_rate=1e-4, report_to="none",
                             logging_steps=10**6, bf16=False, disable_tqdm=True, save_strategy="no")
    trainer = IterativeSFTTrainer(model_dir, args=cfg, backend=backend)
    rng = np.random.default_rng(0)
    calls = [rng.integers(3, vocab, size=(batch, seq)) for _ in range(2)]
    gc.collect()
    reset = reset_peak()
    before_kib = status_kib("VmRSS")
    losses = [trainer.step(input_ids=ids)["loss"] for ids in calls]
    peak_kib = status_kib("VmHWM")
    return {"backend": backend, "rss_before_mib": before_kib / 1024, "peak_mib": peak_kib / 1024,
            "added_mib": (peak_kib - before_kib) / 1024, "peak_reset": reset, "losses": losses}


def save_model(path: str, hidden: int, vocab: int, seq: int) -> int:
    return save_random_llama(path, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=int(hidden * 2.75), vocab_size=vocab,
                             max_position_embeddings=seq, tie_word_embeddings=False)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model_dir, args.batch, args.seq, args.vocab)))
        return

    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        n_params = save_model(workdir, args.hidden, args.vocab, args.seq)
        for backend in ("torch", "jax"):
            results[backend] = run_worker(__file__, backend, workdir, "--batch", str(args.batch), "--seq",
                                          str(args.seq), "--vocab", str(args.vocab))
    if not all(r["peak_reset"] for r in results.values()):
        print("warning: /proc/self/clear_refs refused; 'added' counts from the process's earlier peak")
    adam_mib = 2 * n_params * 4 / 2**20
    print(f"\n## Peak RSS added by two step() calls of [{args.batch}, {args.seq}]: 2-layer Llama, hidden "
          f"{args.hidden}, vocab {args.vocab:,} ({n_params / 1e6:.1f}M params, fp32; Adam moments "
          f"{adam_mib:,.0f} MiB), each backend in its own process\n")
    print("| backend | RSS before the calls (MiB) | peak during the calls (MiB) | added (MiB) | ratio vs torch | "
          "losses |")
    print("|---|---|---|---|---|---|")
    base = results["torch"]["added_mib"]
    for name in ("jax", "torch"):
        r = results[name]
        losses = " / ".join(f"{x:.4f}" for x in r["losses"])
        print(f"| {name} | {r['rss_before_mib']:,.0f} | {r['peak_mib']:,.0f} | {r['added_mib']:,.0f} | "
              f"{r['added_mib'] / base:.2f}x | {losses} |")


if __name__ == "__main__":
    main()
