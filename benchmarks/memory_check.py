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
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
    reset = _reset_peak()
    before_kib = _status_kib("VmRSS")
    losses = [trainer.step(input_ids=ids)["loss"] for ids in calls]
    peak_kib = _status_kib("VmHWM")
    return {"backend": backend, "rss_before_mib": before_kib / 1024, "peak_mib": peak_kib / 1024,
            "added_mib": (peak_kib - before_kib) / 1024, "peak_reset": reset, "losses": losses}


def save_model(path: str, hidden: int, vocab: int, seq: int) -> int:
    return save_random_llama(path, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=int(hidden * 2.75), vocab_size=vocab,
                             max_position_embeddings=seq, tie_word_embeddings=False)


def save_random_llama(path: str, **config_kwargs) -> int:
    """Save a random fp32 Llama of ``config_kwargs`` (and a tiny tokenizer) to ``path``; its parameter count."""
    import torch
    from helpers import make_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **config_kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)  # ids are fed directly; the tokenizer only has to exist
    return sum(p.numel() for p in model.parameters())


def run_worker(script: str, name: str, model_dir: str, *extra: str) -> dict:
    """Run ``script --worker name --model-dir model_dir *extra`` in a fresh interpreter; its last JSON line."""
    proc = subprocess.run([sys.executable, script, "--worker", name, "--model-dir", model_dir, *extra],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
