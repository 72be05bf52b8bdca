"""One-shot GPU check: correctness on the accelerator, then bf16 training/generation throughput, MFU, memory.

Meant for a single short run on a lent GPU machine (H100/H200); every section is timed and guarded, so a
failure in one still prints the others. Sections:

1. parity on the GPU: JAX (fp32, highest matmul precision) logits vs the ``transformers`` model on CUDA;
   one bf16 train step's loss vs the fp32 loss.
2. fixed-shape training, bf16: a Llama of ``--hidden``/``--layers`` (default ~160M params with a 32k
   vocab), seq ``--seq``, batch ``--batch``: JAX ``train_step`` tokens/s, MFU (6 N + attention FLOPs per
   token against ``--peak-tflops``), peak device memory; against a PyTorch loop (bf16 autocast, fused
   AdamW, SDPA attention) on the same GPU.
3. an iterative workload through both trainers (variable lengths, compile included).
4. generation: JAX ``generate`` vs ``transformers`` ``generate``, bf16, greedy, batch 16, 128 new tokens.

    python benchmarks/gpu_check.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))


def _has_cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


DEV = "cuda" if _has_cuda() else "cpu"  # cpu only for a local smoke run (--quick)


def _sync():
    import torch

    if DEV != "cpu":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def section(title):
    def wrap(fn):
        def run(*a, **k):
            print(f"\n## {title}\n", flush=True)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            except Exception:  # keep going: one broken section must not hide the others
                traceback.print_exc()
            finally:
                print(f"({title}: {time.perf_counter() - t0:.1f}s)", flush=True)
        return run
    return wrap


def llama_config(hidden, layers, vocab, heads, seq):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, intermediate_size=int(hidden * 8 / 3 / 64 + 1) * 64,
                       vocab_size=vocab, max_position_embeddings=max(seq, 2048), tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def save(config, path, dtype="float32"):
    import torch
    from helpers import make_tokenizer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return model


def flops_per_token(config, seq):
    n = sum(p for p in _param_counts(config))
    attn = 12 * config.num_hidden_layers * config.hidden_size * seq  # QK^T and AV, fwd+bwd, causal not halved
    return 6 * n + attn, n


def _param_counts(config):
    d, f, v, layer_count = (config.hidden_size, config.intermediate_size, config.vocab_size,
                            config.num_hidden_layers)
    yield 2 * v * d  # embeddings + head
    yield layer_count * (4 * d * d + 3 * d * f + 2 * d)
    yield d


@section("1. parity on the GPU")
def parity(workdir):
    import jax
    import torch
    from helpers import make_tokenizer, tiny_model

    from itersft_jax.models.common import positions_from_mask
    from itersft_jax.weights import load_model

    tok = make_tokenizer()
    hf = tiny_model("llama", len(tok)).to(DEV)
    batch = tok(["The quick brown fox jumps over the lazy dog.", "hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**{k: v.to(DEV) for k, v in batch.items()}).logits.float().cpu().numpy()
    module, _ = load_model(hf.cpu())
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    for precision in ("default", "highest"):
        with jax.default_matmul_precision(precision):
            logits = np.asarray(jax.jit(lambda m, i, p, a: m(i, p, a)[0])(module, ids, positions_from_mask(mask), mask))
        real = mask.astype(bool)
        print(f"JAX fp32 (matmul precision {precision}) vs torch CUDA fp32: max |diff| at real tokens = "
              f"{np.abs(logits - ref)[real].max():.2e}")


@section("2. fixed-shape training, bf16")
def fixed(args, workdir):
    import jax
    import torch

    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer

    config = llama_config(args.hidden, args.layers, args.vocab, args.heads, args.seq)
    path = os.path.join(workdir, "fixed")
    torch_model = save(config, path)
    fpt, n = flops_per_token(config, args.seq)
    print(f"model: {n / 1e6:.0f}M params, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
          f"batch {args.batch} x seq {args.seq}; {fpt / 1e9:.2f} GFLOP/token")
    rng = np.random.default_rng(0)
    batches = [rng.integers(3, args.vocab, size=(args.batch, args.seq)) for _ in range(args.steps + 2)]
    rows = []
    for remat in (False, True):
        cfg = IterativeSFTConfig(output_dir=os.path.join(workdir, "o"), per_device_train_batch_size=args.batch,
                                 bf16=True, gradient_checkpointing=remat, learning_rate=1e-4, report_to="none",
                                 logging_steps=10**6, disable_tqdm=True)
        trainer = IterativeSFTTrainer(path, args=cfg, backend="jax")
        t0 = time.perf_counter()
        trainer.step(input_ids=batches[0])
        jax.block_until_ready(trainer.train_state)
        first = time.perf_counter() - t0
        trainer.step(input_ids=batches[1])
        jax.block_until_ready(trainer.train_state)
        t0 = time.perf_counter()
        for b in batches[2:]:
            out = trainer.step(input_ids=b)
        jax.block_until_ready(trainer.train_state)
        dt = time.perf_counter() - t0
        tps = args.steps * args.batch * args.seq / dt
        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use", 0) / 2**30
        rows.append((f"itersft JAX, remat={remat}", first, tps, tps * fpt / (args.peak_tflops * 1e12), peak,
                     out["loss"]))
        del trainer

    torch_model = torch_model.to(DEV).train()
    torch_model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, fused=DEV != "cpu")

    def torch_step(b):
        ids = torch.as_tensor(b, device=DEV)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = torch_model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    _sync() if DEV == "cpu" else torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    torch_step(batches[0])
    _sync()
    first = time.perf_counter() - t0
    torch_step(batches[1])
    _sync()
    t0 = time.perf_counter()
    for b in batches[2:]:
        loss = torch_step(b)
    _sync()
    dt = time.perf_counter() - t0
    tps = args.steps * args.batch * args.seq / dt
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEV != "cpu" else 0.0
    rows.append(("PyTorch loop (autocast bf16, fused AdamW, SDPA)", first, tps,
                 tps * fpt / (args.peak_tflops * 1e12), peak, float(loss.detach())))
    base = rows[-1][2]
    print("| engine | first call s | tokens/s | MFU | peak GiB | last loss | vs PyTorch |")
    print("|---|---|---|---|---|---|---|")
    for name, first, tps, mfu, peak, loss in rows:
        print(f"| {name} | {first:.1f} | {tps:,.0f} | {mfu:.1%} | {peak:.1f} | {loss:.3f} | {tps / base:.2f}x |")
    _sync()


@section("3. iterative workload through both trainers, bf16")
def iterative(args, workdir):

    sys.path.insert(0, HERE)
    from step_throughput import make_workload, run_backend

    from itersft_jax import IterativeSFTConfig  # noqa: F401  (import check)

    config = llama_config(args.hidden, args.layers, args.vocab, args.heads, 1024)
    path = os.path.join(workdir, "iter")
    save(config, path)
    workload = make_workload(args.calls, args.samples, args.vocab, lo=32, hi=1024)
    res = {b: run_backend(b, path, workload, workdir, args.batch, bf16=True) for b in ("jax", "torch")}
    print(f"{args.calls} calls x {args.samples} samples, lengths U[32, 1024], batch {args.batch}, compile incl.")
    print("| engine | seconds | real tokens/s | padded tokens | ratio vs torch |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | {r['padded_tokens']:,} | "
              f"{r['tokens_per_s'] / res['torch']['tokens_per_s']:.2f}x |")
    _sync()


@section("4. generation, bf16 greedy")
def generation(args, workdir):
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from itersft_jax.generate import generate_ids
    from itersft_jax.weights import load_model

    config = llama_config(args.hidden, args.layers, args.vocab, args.heads, 512)
    config.eos_token_id = None
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(config).float().eval()
    module, _ = load_model(hf, dtype=jnp.bfloat16)
    graphdef, params = nnx.split(module, nnx.Param)
    hf = hf.to(DEV, torch.bfloat16)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, args.vocab, size=int(n)).tolist() for n in rng.integers(16, 65, size=16)]

    def run_jax():
        seqs, _ = generate_ids(graphdef, params, prompts, max_new_tokens=128, eos_token_id=None)
        return seqs

    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=DEV)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=DEV)

    def run_hf():
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=128, min_new_tokens=128,
                              do_sample=False)
        _sync()
        return out

    t0 = time.perf_counter()
    run_jax()
    jax_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(3):
        run_jax()
    jax_tps = 3 * 16 * 128 / (time.perf_counter() - t0)
    run_hf()
    t0 = time.perf_counter()
    for _ in range(3):
        run_hf()
    hf_tps = 3 * 16 * 128 / (time.perf_counter() - t0)
    print("| engine | first call s | generated tokens/s | ratio |")
    print("|---|---|---|---|")
    print(f"| itersft JAX generate | {jax_first:.1f} | {jax_tps:,.0f} | {jax_tps / hf_tps:.2f}x |")
    print(f"| transformers generate (CUDA bf16) | - | {hf_tps:,.0f} | 1.00x |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--calls", type=int, default=6)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    p.add_argument("--only", default="1234")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.heads, args.vocab, args.seq, args.batch, args.steps = 128, 2, 4, 512, 128, 4, 2
        args.calls, args.samples = 2, 8
    import jax
    import torch

    print(f"jax {jax.__version__} devices {jax.devices()}; torch {torch.__version__} cuda {torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as workdir:
        if "1" in args.only:
            parity(workdir)
        if "2" in args.only:
            fixed(args, workdir)
        if "3" in args.only:
            iterative(args, workdir)
        if "4" in args.only:
            generation(args, workdir)


if __name__ == "__main__":
    main()
