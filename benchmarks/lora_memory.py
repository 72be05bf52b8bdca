"""CPU memory of LoRA vs full fine-tuning on the JAX engine: a 1B-wide Llama (hidden 2048, Llama 3's 128,256
vocabulary, ``--layers`` decoder layers; the 16 of Llama-3.2-1B do not train in a few minutes on 2 CPU cores),
fp32, no gradient checkpointing.

Each run is its own process. The worker reads ``VmRSS`` after its imports, builds the trainer (loading the
model, and for full fine-tuning the fp32 Adam moments), resets the peak-RSS counter, makes two ``step()``
calls of ``[--batch, --seq]`` token ids and reads ``VmHWM``. Reported: the resident memory the trainer holds
before the calls, the peak the calls add on top (gradients, activations, compilation), and the total over the
imports-only process — the number LoRA exists to cut (full fine-tuning keeps fp32 master weights, two Adam
moments and a full gradient; LoRA (r=16 on every linear layer but the head) keeps the frozen base and small
adapters).

    python benchmarks/lora_memory.py [--layers 2] [--seq 256] [--batch 1] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
from common import reset_peak, run_worker, save_random_llama, status_kib  # noqa: E402


def worker(mode: str, model_dir: str, batch: int, seq: int, vocab: int, rank: int) -> dict:
    import gc

    import numpy as np

    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer

    start_kib = status_kib("VmRSS")
    cfg = IterativeSFTConfig(output_dir=os.path.join(model_dir, f"out-{mode}"), per_device_train_batch_size=batch,
                             gradient_checkpointing=False, learning_rate=1e-4, report_to="none",
                             logging_steps=10**6, bf16=False, disable_tqdm=True, save_strategy="no")
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)
    trainer = IterativeSFTTrainer(model_dir, args=cfg, peft_config=peft_config)
    trained = sum(int(x.size) for x in __import__("jax").tree.leaves(trainer.params))
    rng = np.random.default_rng(0)
    calls = [rng.integers(3, vocab, size=(batch, seq)) for _ in range(2)]
    gc.collect()
    reset = reset_peak()
    before_kib = status_kib("VmRSS")
    losses = [trainer.step(input_ids=ids)["loss"] for ids in calls]
    peak_kib = status_kib("VmHWM")
    return {"mode": mode, "trainer_mib": (before_kib - start_kib) / 1024, "added_mib": (peak_kib - before_kib) / 1024,
            "total_mib": (peak_kib - start_kib) / 1024, "peak_reset": reset, "losses": losses, "trained": trained}


def save_model(path: str, layers: int, vocab: int, seq: int) -> int:
    return save_random_llama(path, hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32,
                             num_key_value_heads=8, intermediate_size=8192, vocab_size=vocab,
                             max_position_embeddings=max(seq, 256), tie_word_embeddings=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--worker", choices=["full", "lora"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model_dir, args.batch, args.seq, args.vocab, args.rank)))
        return

    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        n_params = save_model(workdir, args.layers, args.vocab, args.seq)
        for mode in ("full", "lora"):
            results[mode] = run_worker(__file__, mode, workdir, "--batch", str(args.batch), "--seq", str(args.seq),
                                       "--vocab", str(args.vocab), "--rank", str(args.rank))
    if not all(r["peak_reset"] for r in results.values()):
        print("warning: /proc/self/clear_refs refused; 'added' counts from the process's earlier peak")
    print(f"\n## JAX engine, CPU: LoRA (r={args.rank}, all linear layers) vs full fine-tuning — Llama, hidden 2048, "
          f"{args.layers} layers, vocab {args.vocab:,} ({n_params / 1e6:.0f}M params, fp32), two step() calls of "
          f"[{args.batch}, {args.seq}], each run in its own process\n")
    print("| run | trained params | trainer before the calls (MiB) | added by the calls (MiB) | total (MiB) | "
          "total vs full | losses |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("full", "lora"):
        r = results[mode]
        losses = " / ".join(f"{x:.4f}" for x in r["losses"])
        print(f"| {mode} | {r['trained'] / 1e6:.2f}M | {r['trainer_mib']:,.0f} | {r['added_mib']:,.0f} | "
              f"{r['total_mib']:,.0f} | {r['total_mib'] / results['full']['total_mib']:.2f}x | {losses} |")


if __name__ == "__main__":
    main()
