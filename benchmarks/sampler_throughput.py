"""Sampler throughput on a long-tailed rejection-sampling workload: the continuous engine (``generate()``), the
previous static engine (``sampler/static.py``) and ``transformers`` ``generate``, one process, same model, same
prompts.

Workload: a random Llama (hidden 256, 4 layers, 4 heads, MLP 704, vocab 4096, fp32) whose EOS logit is biased
so completion lengths are roughly geometric (mean ~``--mean-length``, cut at ``--new-tokens``); ``--prompts``
prompts of 16-64 tokens x ``n`` = 8 samples at temperature 1. The bias: every token's embedding carries a
constant in hidden dimension 0, which survives to the final norm, and the EOS row of the LM head reads it
(same weights on both frameworks). The static engine and transformers decode batches of 8 prompts x 8 rows
(64 rows, the continuous engine's slot count). Each JAX engine runs once cold (its compilations counted) and is
timed on a second, warm run; transformers is warmed up on one short batch, then timed.

Columns: completions/s, real tokens/s (generated tokens, EOS included), occupancy (real tokens / rows x decode
steps actually run: a static batch decodes every row until its longest ends), compilations (cold run).

    python benchmarks/sampler_throughput.py [--prompts 64] [--new-tokens 256] [--smoke]

Writes ``benchmarks/results/sampler_throughput.md`` (``--out``).

``--top-p-workload [MODEL_DIR]`` (issue 28): 16 chat prompts (the tokenizer's chat template) x 4 samples, up to
96 new tokens, temperature 0.8, stopping at the model's EOS, with ``top_p=1.0`` and ``top_p=0.95``: our
``generate`` and transformers ``generate`` (one batch of 64 rows), one process, same weights. MODEL_DIR: a Hugging
Face directory with a chat template (``itersft demo --model smollm2`` converts SmolLM2-135M-Instruct into
``~/.cache/itersft``); without it, a random Llama from a config (hidden 256, 4 layers, vocab 8192) with a
one-line template. Writes ``benchmarks/results/sampler_top_p.md``. ``--old-sampling SAMPLING_PY`` (e.g.
``git show 2cda397:itersft_jax/sampler/sampling.py > /tmp/old.py``): ours again with that file's top-p filter.

``--long-prompt-workload [MODEL_DIR]`` (issue 28): ``--long-prompts`` (4) prompts of 512-1024 tokens
(``--long-lengths``) x n = 16, ``min(--new-tokens, 128)`` new tokens, the continuous engine with each row holding its
prompt's KV and with a prompt held once per group (``share_prompts``): KV held (``kv_bytes_peak``,
``prompt_kv_bytes_peak``) and tokens/s. Writes ``benchmarks/results/sampler_long_prompt.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EOS = 2
N = 8
ROWS_PER_BATCH = 64


def build(vocab: int, mean_length: float, smoke: bool):
    import math

    import torch
    from flax import nnx
    from transformers import LlamaConfig, LlamaForCausalLM

    from itersft_jax.io.weights import load_model

    size = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2) if smoke else \
        dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4)
    config = LlamaConfig(vocab_size=vocab, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=EOS,
                         pad_token_id=0, **size)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        # Dimension 0 of the residual stream holds a constant that dominates the final RMS norm (~sqrt(D)
        # there); the EOS row reads it: P(EOS) ~ e^b / (e^b + V) per token, lengths ~ geometric.
        hf.model.embed_tokens.weight[:, 0] = 10.0
        bias = math.log(vocab / (mean_length - 1))
        hf.lm_head.weight[EOS].zero_()
        hf.lm_head.weight[EOS, 0] = bias / math.sqrt(config.hidden_size)
    hf.generation_config.pad_token_id = 0
    module, _ = load_model(hf)
    graphdef, params = nnx.split(module, nnx.Param)
    return hf, module, graphdef, params


def run_continuous(module, prompts, new_tokens, seed):
    from itersft_jax.sampler.generate import generate

    out = generate(module, input_ids=prompts, num_return_sequences=N, max_new_tokens=new_tokens, do_sample=True,
                   temperature=1.0, eos_token_id=EOS, seed=seed)
    return out.sequences, out.stats["occupancy"], out.stats


def run_static(graphdef, params, prompts, new_tokens, seed):
    import jax

    from itersft_jax.sampler.static import generate_ids

    per = ROWS_PER_BATCH // N
    sequences, slot_steps = [], 0
    for start in range(0, len(prompts), per):
        rows = [p for p in prompts[start:start + per] for _ in range(N)]
        seqs, _ = generate_ids(graphdef, params, rows, max_new_tokens=new_tokens, do_sample=True, temperature=1.0,
                               eos_token_id=EOS, key=jax.random.key(seed + start))
        sequences += seqs
        slot_steps += len(rows) * max(map(len, seqs))
    return sequences, sum(map(len, sequences)) / slot_steps, {}


def run_transformers(hf, prompts, new_tokens, seed):
    import torch

    per = ROWS_PER_BATCH // N
    sequences, slot_steps = [], 0
    torch.manual_seed(seed)
    for start in range(0, len(prompts), per):
        batch = prompts[start:start + per]
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in batch])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=None,
                              top_p=None, max_new_tokens=new_tokens, num_return_sequences=N, eos_token_id=EOS,
                              pad_token_id=0)
        new = out[:, width:].tolist()
        seqs = [row[:row.index(EOS) + 1] if EOS in row else row for row in new]
        sequences += seqs
        slot_steps += len(seqs) * max(map(len, seqs))
    return sequences, sum(map(len, sequences)) / slot_steps, {}


def measure(name, fn, warmup=None):
    """Cold run (compilations counted; ``warmup`` instead when given: a short call), then the timed warm run."""
    from common import count_compilations

    with count_compilations(None) as compiles:
        t0 = time.perf_counter()
        (warmup or fn)(0)
        cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    sequences, occupancy, stats = fn(1)
    warm = time.perf_counter() - t0
    tokens = sum(map(len, sequences))
    row = {"engine": name, "completions_s": len(sequences) / warm, "tokens_s": tokens / warm, "tokens": tokens,
           "mean_len": tokens / len(sequences), "occupancy": occupancy, "compilations": compiles.count,
           "warm_s": warm, "cold_s": cold, "stats": stats}
    print(f"{name}: {row['tokens_s']:.0f} tok/s, {row['completions_s']:.1f} completions/s, occupancy "
          f"{occupancy:.2f}, {compiles.count} compilations, warm {warm:.1f}s, mean length {row['mean_len']:.1f}",
          flush=True)
    return row


CHAT_QUESTIONS = [
    "What is 17 times 23?", "Name three rivers in Europe.", "Write a haiku about rain.",
    "Explain what a prime number is.", "How do I boil an egg?", "Give me a synonym for happy.",
    "What is the capital of Canada?", "Summarize the plot of Romeo and Juliet.", "Why is the sky blue?",
    "List four fruits that are red.", "What does a compiler do?", "Translate 'good morning' into French.",
    "How many legs does a spider have?", "Suggest a name for a cat.", "What is 1234 + 4321?",
    "Describe the taste of lemon."]


def workload_model(model_dir: str | None, max_positions: int):
    """``(hf model, name)``: the Hugging Face directory's model (fp32), or a random Llama (hidden 256, 4 layers,
    vocab 8192, EOS 2) with ``max_positions`` positions."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if model_dir:
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        return hf, os.path.basename(os.path.normpath(model_dir))
    config = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions,
                         tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval(), "random Llama (hidden 256, 4 layers, vocab 8192)"


def top_p_workload(model_dir: str | None, out: str, old_sampling: str | None = None,
                   transformers: bool = True) -> None:
    """Issue 28's workload: tokens/s and decode step time with top_p 1.0 and 0.95, ours vs transformers; with
    ``old_sampling`` (an earlier ``sampling.py``), ours again with its ``_top_p`` (caches cleared between)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from itersft_jax.io.weights import load_model
    from itersft_jax.sampler.generate import generate

    hf, name = workload_model(model_dir, 1024)
    if model_dir:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=False) for q in CHAT_QUESTIONS]
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        eos = sorted({int(tokenizer.eos_token_id)} | set(np.atleast_1d(hf.config.eos_token_id).tolist()))
    else:
        rng = np.random.default_rng(0)
        prompt_ids = [rng.integers(3, 8192, rng.integers(20, 40)).tolist() for _ in CHAT_QUESTIONS]
        eos = [EOS]
    module, _ = load_model(hf)
    n, new, temperature = 4, 96, 0.8
    width = max(map(len, prompt_ids))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in prompt_ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in prompt_ids])

    def ours(top_p, seed):
        t0 = time.perf_counter()
        res = generate(module, input_ids=prompt_ids, num_return_sequences=n, max_new_tokens=new, do_sample=True,
                       temperature=temperature, top_p=top_p, eos_token_id=eos, seed=seed)
        return time.perf_counter() - t0, sum(map(len, res.sequences)), res.stats["decode_steps"]

    def theirs(top_p, seed, max_new=new):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            res = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=None,
                              top_p=top_p, max_new_tokens=max_new, num_return_sequences=n, eos_token_id=eos,
                              pad_token_id=0, return_dict_in_generate=True)
        rows = res.sequences[:, width:].tolist()
        tokens = sum(len(r[:next((i + 1 for i, t in enumerate(r) if t in eos), len(r))]) for r in rows)
        return time.perf_counter() - t0, tokens, len(rows[0])

    engines = [("itersft JAX generate", ours)]
    if transformers:
        theirs(1.0, 0, 4)  # warm-up
        engines.append(("transformers generate", theirs))
    rows = []
    for top_p in (1.0, 0.95):
        ours(top_p, 0)  # cold: compiles
        for engine, fn in engines:
            seconds, tokens, steps = fn(top_p, 1)
            rows.append((top_p, engine, tokens / seconds, seconds / steps * 1e3, tokens, seconds))
            print(f"top_p={top_p} {engine}: {tokens / seconds:.1f} tok/s, {seconds / steps * 1e3:.0f} ms/step, "
                  f"{tokens} tokens, {seconds:.1f}s", flush=True)
    if old_sampling:  # the same calls through an earlier top-p filter: the engine retraced with it
        import importlib.util

        import jax

        from itersft_jax.sampler import sampling

        spec = importlib.util.spec_from_file_location("old_sampling", old_sampling)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        new_top_p, sampling._top_p = sampling._top_p, old._top_p
        try:
            for top_p in (1.0, 0.95):
                jax.clear_caches()
                ours(top_p, 0)
                seconds, tokens, steps = ours(top_p, 1)
                rows.append((top_p, "itersft JAX generate, earlier top-p", tokens / seconds, seconds / steps * 1e3,
                             tokens, seconds))
                print(f"top_p={top_p} earlier top-p: {tokens / seconds:.1f} tok/s, {seconds / steps * 1e3:.0f} "
                      f"ms/step", flush=True)
        finally:
            sampling._top_p = new_top_p
            jax.clear_caches()
    lines = ["# top-p workload (benchmarks/sampler_throughput.py --top-p-workload)", "",
             f"Model: {name}, fp32. {len(prompt_ids)} chat prompts x {n}, up to {new} new tokens, temperature "
             f"{temperature}, EOS {eos}; {platform.machine()}, {os.cpu_count()} CPUs visible. Each setting: ours cold "
             f"(compiles), then ours and transformers timed (seed 1). Step = wall time / decode steps.", "",
             "| top_p | engine | real tokens/s | ms per decode step | tokens | seconds |", "|---|---|---|---|---|---|"]
    lines += [f"| {p} | {e} | {t:.1f} | {ms:.0f} | {k} | {s:.1f} |" for p, e, t, ms, k, s in rows]
    by = {(p, e): (t, ms) for p, e, t, ms, *_ in rows}
    ours_name, theirs_name = "itersft JAX generate", "transformers generate"
    lines += ["", f"Ours with top_p 0.95: step time {by[(0.95, ours_name)][1] / by[(1.0, ours_name)][1]:.2f}x the "
              f"step without top_p."]
    if transformers:
        lines[-1] += (f" Tokens/s {by[(0.95, ours_name)][0] / by[(0.95, theirs_name)][0]:.2f}x transformers' with "
                      f"top_p 0.95 ({by[(1.0, ours_name)][0] / by[(1.0, theirs_name)][0]:.2f}x at 1.0).")
    earlier = "itersft JAX generate, earlier top-p"
    if (0.95, earlier) in by:
        ratio = by[(0.95, earlier)][1] / by[(1.0, earlier)][1]
        lines += [f"With the earlier top-p filter ({old_sampling}): step {ratio:.2f}x the step without top_p (same "
                  f"seeds and prompts, same process)."]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def long_prompt_workload(model_dir: str | None, out: str, num_prompts: int, new_tokens: int,
                         lengths: tuple[int, int]) -> None:
    """Issue 28's long-prompt workload: ``num_prompts`` prompts of ``lengths`` tokens x n = 16 samples, up to
    ``new_tokens`` new tokens (no EOS: every row runs to the budget), temperature 1; the continuous engine with
    each row holding its prompt's KV (before) and with a prompt held once per group (``share_prompts``), one
    process, the same seed: KV held and tokens/s, and the tokens compared."""
    import jax
    import numpy as np
    from flax import nnx

    from itersft_jax.io.weights import load_model
    from itersft_jax.sampler.engine import sample_ids

    hf, name = workload_model(model_dir, 2048)
    module, _ = load_model(hf)
    graphdef, params = nnx.split(module, nnx.Param)
    n = 16
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, hf.config.vocab_size, rng.integers(*lengths)).tolist() for _ in range(num_prompts)]

    def run(share: bool, seed: int):
        t0 = time.perf_counter()
        res = sample_ids(graphdef, params, prompts, num_return_sequences=n, max_new_tokens=new_tokens, do_sample=True,
                         eos_token_id=[], key=jax.random.key(seed), share_prompts=share)
        return time.perf_counter() - t0, res

    rows, outputs = [], {}
    for share in (False, True):
        run(share, 0)  # cold: compiles
        seconds, res = run(share, 1)
        outputs[share] = res
        tokens = sum(map(len, res.sequences))
        st = res.stats
        rows.append((share, tokens / seconds, st["kv_bytes_peak"], st["prompt_kv_bytes_peak"],
                     seconds / st["decode_steps"]))
        print(f"share_prompts={share}: {tokens / seconds:.1f} tok/s, KV peak {st['kv_bytes_peak'] / 2**20:.1f} MiB, "
              f"prompt KV peak {st['prompt_kv_bytes_peak'] / 2**20:.1f} MiB", flush=True)
    # fp32 rounding differs between one softmax and two merged ones: a draw whose uniform number falls within it
    # of a CDF boundary can flip and the row go its own way after it; compare logprobs up to each row's first flip
    firsts = [next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x))
              for x, y in zip(outputs[False].sequences, outputs[True].sequences)]
    same = f"{sum(f < len(x) for f, x in zip(firsts, outputs[False].sequences))} of {len(firsts)} rows differ"
    drift = max(np.abs(np.subtract(a, b))[:f].max(initial=0.0)
                for a, b, f in zip(outputs[False].logprobs, outputs[True].logprobs, firsts))
    lines = ["# long-prompt workload (benchmarks/sampler_throughput.py --long-prompt-workload)", "",
             f"Model: {name}, fp32. {num_prompts} prompts of {lengths[0]}-{lengths[1] - 1} tokens x n={n}, "
             f"{new_tokens} new tokens each (no EOS), temperature 1, seed 1, the continuous engine's default 64 slots; "
             f"{platform.machine()}, {os.cpu_count()} CPUs visible. Each layout: cold run, then the timed run.", "",
             "| layout | real tokens/s | ms per decode step | KV held, peak | prompt KV held, peak |",
             "|---|---|---|---|---|"]
    for share, tok_s, kv, prompt_kv, step in rows:
        layout = "a prompt held once per group (share_prompts)" if share else "each row holds its prompt (before)"
        lines.append(f"| {layout} | {tok_s:.1f} | {step * 1e3:.0f} | {kv / 2**20:.1f} MiB | "
                     f"{prompt_kv / 2**20:.1f} MiB |")
    lines += ["", f"Prompt KV held shrinks {rows[0][3] / rows[1][3]:.1f}x (total KV {rows[0][2] / rows[1][2]:.1f}x); "
              f"tokens/s {rows[1][1] / rows[0][1]:.2f}x; tokens: {same}; logprobs before a row's first different "
              f"token: max abs diff {drift:.1e}."]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--mean-length", type=float, default=48.0)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 8 prompts, 32 new tokens")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sampler_throughput.md"))
    parser.add_argument("--top-p-workload", nargs="?", const="", default=None, metavar="MODEL_DIR",
                        help="issue 28's chat workload with top_p 1.0 and 0.95 (a random Llama without MODEL_DIR)")
    parser.add_argument("--old-sampling", metavar="SAMPLING_PY",
                        help="with --top-p-workload: also time ours with this earlier sampling.py's top-p filter")
    parser.add_argument("--no-transformers", action="store_true",
                        help="with --top-p-workload: time ours only (transformers' CPU generate is slow on busy cores)")
    parser.add_argument("--long-prompt-workload", nargs="?", const="", default=None, metavar="MODEL_DIR",
                        help="issue 28's long-prompt workload (n=16), each row holding its prompt vs one per group")
    parser.add_argument("--long-prompts", type=int, default=4, help="with --long-prompt-workload: prompts")
    parser.add_argument("--long-lengths", type=int, nargs=2, default=(512, 1025), metavar=("MIN", "END"),
                        help="with --long-prompt-workload: prompt lengths drawn from [MIN, END)")
    args = parser.parse_args()
    if args.long_prompt_workload is not None:
        return long_prompt_workload(args.long_prompt_workload or None,
                                    os.path.join(os.path.dirname(__file__), "results", "sampler_long_prompt.md"),
                                    args.long_prompts, min(args.new_tokens, 128), tuple(args.long_lengths))
    if args.top_p_workload is not None:
        return top_p_workload(args.top_p_workload or None,
                              os.path.join(os.path.dirname(__file__), "results", "sampler_top_p.md"), args.old_sampling,
                              not args.no_transformers)
    if args.smoke:
        args.prompts, args.new_tokens, args.mean_length, args.vocab = 8, 32, 12.0, 512
    import numpy as np

    hf, module, graphdef, params = build(args.vocab, args.mean_length, args.smoke)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, args.vocab, rng.integers(16, 65)).tolist() for _ in range(args.prompts)]
    rows = [measure("itersft continuous (generate)", lambda s: run_continuous(module, prompts, args.new_tokens, s)),
            measure("itersft static (previous)", lambda s: run_static(graphdef, params, prompts, args.new_tokens, s)),
            measure("transformers generate", lambda s: run_transformers(hf, prompts, args.new_tokens, s),
                    warmup=lambda s: run_transformers(hf, prompts[:ROWS_PER_BATCH // N], 4, s))]
    ours = rows[0]
    stats = ours["stats"]
    lines = [
        "# Sampler throughput (benchmarks/sampler_throughput.py)", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible; fp32. Workload: {args.prompts} prompts "
        f"(16-64 tokens) x n={N}, up to {args.new_tokens} new tokens, temperature 1, EOS-biased random Llama "
        f"(vocab {args.vocab}{', smoke size' if args.smoke else ', hidden 256, 4 layers'}); static engine and "
        f"transformers in batches of {ROWS_PER_BATCH} rows. Warm run timed; compilations counted on the cold run.",
        "", "| engine | completions/s | real tokens/s | occupancy | compilations | mean length | warm s |",
        "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['completions_s']:.1f} | {r['tokens_s']:.0f} | {r['occupancy']:.2f} | "
                     f"{r['compilations']} | {r['mean_len']:.1f} | {r['warm_s']:.1f} |")
    lines += ["", f"Continuous vs static: **{ours['tokens_s'] / rows[1]['tokens_s']:.2f}x** real tokens/s; vs "
              f"transformers: **{ours['tokens_s'] / rows[2]['tokens_s']:.2f}x**.",
              f"Continuous engine: {stats['decode_steps']} decode steps in {stats['chunks']} chunks, "
              f"{stats['prompts_prefilled']} prompts prefilled in {stats['prefills']} prefills, "
              f"KV held at most {stats['kv_bytes_peak'] / 2**20:.1f} MiB."]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
