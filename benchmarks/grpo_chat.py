"""GRPO against expert iteration on a real chat model: ``itersft demo --model M`` with settings the CLI does not
expose (GRPO's learning rate, updates per round and per sampling call, normalisation, temperature), one run per
invocation, plus the final model's greedy pass rate on a *larger* held-out set than the demo's 50 problems.

The demo's 50 held-out problems give a pass rate near 60% a standard error of about 7 points: one run's round-3
number cannot tell two settings apart. ``--extra-eval N`` draws N more problems after the demo's own (none of them
held out or trained on in the run: the generator and exclusions are the demo's) and measures the saved model on
them. Run (the JAX compilation cache makes every run after the first skip most of the compiling)::

    JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache python benchmarks/grpo_chat.py --loss ppo --seed 0 \\
        --out /tmp/grpo_chat/ppo-s0 --extra-eval 300 [--rl-learning-rate 2e-5 --updates-per-round 4 ...]

It writes ``OUT/metrics.json`` (the demo's) and ``OUT/extra_eval.json`` and prints the demo's lines.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import common  # noqa: F401  (puts the repository root on sys.path)


def extra_problems(cfg, n: int):
    """``n`` problems drawn after everything the demo drew (held-out and every round's), excluding all of them."""
    from itersft_jax.apps.demo_chat import sample_problems

    rng = random.Random(cfg.seed)
    held_out = sample_problems(rng, cfg.eval_prompts, cfg.digits, cfg.ops)
    seen = set(held_out)
    for _ in range(cfg.rounds):
        seen |= set(sample_problems(rng, cfg.prompts_per_round, cfg.digits, cfg.ops, set(held_out)))
    return sample_problems(random.Random(10_000 + cfg.seed), n, cfg.digits, cfg.ops, seen)


def main() -> None:
    from itersft_jax.apps.demo_chat import ChatDemoConfig, run_chat

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--loss", default="ppo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backend", default="jax")
    p.add_argument("--out", required=True)
    p.add_argument("--extra-eval", type=int, default=0, help="problems for the final model's extra evaluation")
    for name, kind in (("learning_rate", float), ("updates_per_round", int), ("updates_per_sample", int),
                       ("normalization", str), ("temperature", float), ("samples_per_prompt", int),
                       ("prompts_per_round", int)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    a = p.parse_args()
    overrides = {k: v for k, v in vars(a).items() if v is not None and k in ChatDemoConfig.__dataclass_fields__}
    cfg = ChatDemoConfig(**{**overrides, "output_dir": a.out, "plot": False})
    print(json.dumps({k: v for k, v in vars(cfg).items()}), flush=True)
    t0 = time.perf_counter()
    run_chat(cfg)
    if a.extra_eval:
        from transformers import AutoTokenizer

        from itersft_jax.apps.demo_chat import build_trainer, encode_prompts, end_of_turn_id, pass_rate, resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model))
        eos = sorted({end_of_turn_id(tokenizer)} | ({tokenizer.eos_token_id} - {None}))
        problems = extra_problems(cfg, a.extra_eval)
        result = {}
        for name, path in (("pretrained", resolve_model(cfg.model)), ("final", os.path.join(cfg.output_dir, "model"))):
            trainer = build_trainer(cfg, path, tokenizer)
            result[name] = pass_rate(trainer, cfg, problems, encode_prompts(tokenizer, problems), eos)
            del trainer
        result.update(problems=len(problems), seconds=time.perf_counter() - t0)
        with open(os.path.join(cfg.output_dir, "extra_eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(f"extra held-out ({len(problems)} problems): pretrained {result['pretrained']:.1%}, "
              f"final {result['final']:.1%}", flush=True)


if __name__ == "__main__":
    main()
