"""Generation throughput: itersft JAX ``generate`` vs ``transformers`` ``generate``, same model and prompts.

A ~30M-parameter random Llama (hidden 512, 8 layers, 8 heads, MLP 1408, vocab 8192), fp32 on the CPU;
batch 16, prompts of mixed lengths (16-64 tokens, left-padded), 128 new tokens, greedy, EOS disabled on
both sides so every row produces all 128 tokens. Reported: generated tokens/s after warm-up (median of
``--repeats`` runs), JAX's compile time apart, the ratio, and whether the greedy tokens agree.

    python benchmarks/generate_throughput.py [--batch 16] [--new-tokens 128] [--repeats 3] [--bf16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_models(vocab: int, seed: int = 0, bf16: bool = False):
    import torch
    from flax import nnx
    from transformers import LlamaConfig, LlamaForCausalLM

    from itersft_jax.io.weights import load_model

    config = LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(config).float().eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    module, _ = load_model(hf)
    graphdef, params = nnx.split(module, nnx.Param)
    bf16_graphdef = None
    if bf16:  # same fp32 params, bf16 compute (what IterativeSFTConfig(bf16=True) gives the trainer)
        import jax.numpy as jnp

        bf16_graphdef, _ = nnx.split(load_model(hf, dtype=jnp.bfloat16)[0], nnx.Param)
    return hf, graphdef, params, bf16_graphdef


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    """(first-call seconds, later-call seconds, last result)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--bf16", action="store_true", help="add a row: JAX with bf16 compute")
    args = parser.parse_args()

    import jax
    import numpy as np
    import torch

    from itersft_jax.sampler.static import generate_ids

    hf, graphdef, params, bf16_graphdef = build_models(args.vocab, bf16=args.bf16)
    n_params = sum(p.numel() for p in hf.parameters())
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.min_prompt, args.max_prompt + 1, args.batch)
    prompts = [rng.integers(3, args.vocab, n).tolist() for n in lengths]
    generated = args.batch * args.new_tokens

    def run_jax(graphdef=graphdef):
        seqs, _ = generate_ids(graphdef, params, prompts, max_new_tokens=args.new_tokens, eos_token_id=None,
                               pad_token_id=0)
        return seqs

    longest = int(lengths.max())
    input_ids = torch.zeros((args.batch, longest), dtype=torch.long)
    mask = torch.zeros((args.batch, longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1

    def run_hf():
        with torch.no_grad():
            out = hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, num_beams=1, pad_token_id=0,
                              eos_token_id=None, temperature=None, top_k=None, top_p=None)
        return out[:, longest:].tolist()

    jax_first, jax_times, jax_out = timed(run_jax, args.repeats)
    jax_s = statistics.median(jax_times)
    jax_rows = [("itersft JAX generate (fp32)", jax_first, jax_s)]
    if bf16_graphdef is not None:
        first, times, _ = timed(lambda: run_jax(bf16_graphdef), args.repeats)
        jax_rows.append(("itersft JAX generate (bf16)", first, statistics.median(times)))
    hf_rows = []  # torch's default thread count, and 1 thread (faster on a loaded 2-core machine)
    for threads in dict.fromkeys([torch.get_num_threads(), 1]):
        torch.set_num_threads(threads)
        first, times, hf_out = timed(run_hf, args.repeats)
        hf_rows.append((f"transformers generate ({threads} thr)", first, statistics.median(times)))
    best_hf = min(s for _, _, s in hf_rows)
    same_rows = sum(a == b for a, b in zip(jax_out, hf_out))
    agree = np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(jax_out, hf_out)])

    print(f"Llama {n_params / 1e6:.1f}M params, fp32, batch {args.batch}, prompts {args.min_prompt}-"
          f"{args.max_prompt} tokens (left-padded), {args.new_tokens} new tokens, greedy, no EOS; "
          f"{jax.devices()[0].platform.upper()}, {os.cpu_count()} cores; median of {args.repeats} runs "
          f"after warm-up; ratio = best transformers time / this time")
    print()
    print(f"| {'engine':<32} | {'tokens/s':>9} | {'s / call':>8} | {'first call (s)':>14} | {'ratio':>6} |")
    print(f"|{'-' * 34}|{'-' * 11}|{'-' * 10}|{'-' * 16}|{'-' * 8}|")
    for name, first, sec in [*hf_rows, *jax_rows]:
        print(f"| {name:<32} | {generated / sec:9.0f} | {sec:8.3f} | {first:14.2f} | {best_hf / sec:5.2f}x |")
    print()
    print(f"JAX first call = compile + run: compile ~ {jax_first - jax_s:.2f}s. Greedy tokens identical in "
          f"{same_rows}/{args.batch} rows ({agree:.1%} of positions agree; fp32 summation order can flip a "
          f"near-tie, after which a row diverges).")

if __name__ == "__main__":
    main()
