"""Why the demo's first policy-gradient loop collapsed with both signs of advantage, and what fixed it: the
mechanism measured round by round on the built-in task (string reversal, the demo's 2-layer Llama and warm start).

Loops (``--loop``):

* ``old``: the loop ``itersft demo --loss importance_sampling`` ran before — all of a round's 2048 samples drawn at
  once, then 3 passes of 32-sample updates over the groups with signal, each sample's advantage divided by its own
  length (a per-sample mean), at the warm start's learning rate 3e-3 with the warm start's optimizer state;
* ``old-constant``: the same with Dr. GRPO's constant normalisation and 1 pass (is the length bias the cause?);
* ``new``: the demo's loop now (``demo.policy_gradient_round``: a fresh optimizer at ``rl_learning_rate``, one update
  per sampling call, constant normalisation); ``--learning-rate`` overrides its rate.

Per round, besides the held-out greedy pass rate: the reward and the fraction of groups with signal while sampling,
the mean |log-ratio| between trainer and sampler over the round's updates (how far the policy moved from the
policy that drew the samples), and on 64 held-out prompts: the probability of EOS right after the gold answer
(teacher-forced), the mean logprob of the gold answer's characters, the share of greedy answers shorter than the
gold one and the mean greedy completion length. Run::

    python benchmarks/grpo_collapse.py --loop old --rounds 3
    python benchmarks/grpo_collapse.py --loop new --rounds 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time

import common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np


def gold_stats(trainer, tokenizer, words: list[str]) -> tuple[float, float]:
    """(mean p(EOS | prompt + gold answer), mean logprob of the gold answer's characters), teacher-forced."""
    from itersft_jax.apps.demo import make_prompt

    prompts = [tokenizer(make_prompt(w)).input_ids for w in words]
    answers = [tokenizer(w[::-1], add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for w in words]
    logprobs = trainer.compute_logprobs([p + a for p, a in zip(prompts, answers)])
    eos = np.mean([np.exp(lp[-1]) for lp in logprobs])
    chars = np.mean([np.mean(lp[len(p) - 1:-1]) for lp, p in zip(logprobs, prompts)])
    return float(eos), float(chars)


def greedy_stats(trainer, cfg, words: list[str]) -> tuple[float, float]:
    """(share of greedy answers shorter than the gold one, mean greedy completion length in tokens)."""
    from itersft_jax.apps.demo import make_prompt

    out = trainer.generate([make_prompt(w) for w in words], max_new_tokens=cfg.max_len + 2, do_sample=False)
    short = np.mean([len(t.strip()) < len(w) for t, w in zip(out.texts, words)])
    return float(short), float(np.mean([len(s) for s in out.sequences]))


def old_round(trainer, cfg, words: list[str], r: int, rng: random.Random, *, normalization: str, passes: int):
    """The replaced loop: one sampling call for the round, ``passes`` passes of ``cfg.batch_size``-sample updates."""
    from itersft_jax.apps.demo import check, make_prompt
    from itersft_jax.apps.grpo import Diagnostics, group_advantages, scale_advantages
    from itersft_jax.shared.datum import samples_to_data

    out = trainer.sample([make_prompt(w) for w in words], num_samples=cfg.samples_per_prompt,
                         max_new_tokens=cfg.max_len + 2, do_sample=True, temperature=cfg.temperature,
                         seed=cfg.seed * 1000 + r)
    rewards = [float(check(words[out.prompt_index(i)], t)) for i, t in enumerate(out.texts)]
    advantages = group_advantages(rewards, cfg.samples_per_prompt)
    data = [d for d, a in zip(samples_to_data(out, advantages), advantages) if a != 0.0]
    diagnostics = Diagnostics()
    diagnostics.rewards = rewards
    diagnostics.groups = len(rewards) // cfg.samples_per_prompt
    diagnostics.groups_with_signal = len(data) // cfg.samples_per_prompt
    for _ in range(passes if data else 0):
        rng.shuffle(data)
        for i in range(0, len(data), cfg.batch_size):
            batch = scale_advantages(data[i:i + cfg.batch_size], normalization, len(data[i:i + cfg.batch_size]),
                                     cfg.max_len + 2)
            diagnostics.add_update(trainer.forward_backward(batch, cfg.loss).metrics)
            trainer.optim_step()
    return diagnostics.record(cfg.loss)


def main(argv=None) -> None:
    from itersft_jax.apps import demo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop", choices=("old", "old-constant", "new"), default="old")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=None, help="the new loop's rl_learning_rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("jax", "torch"), default="jax")
    args = parser.parse_args(argv)
    cfg = demo.DemoConfig(loss="importance_sampling", rounds=args.rounds, seed=args.seed, backend=args.backend,
                          plot=False, output_dir=f"grpo_collapse_{args.loop}")
    if args.learning_rate is not None:
        cfg = dataclasses.replace(cfg, rl_learning_rate=args.learning_rate)
    rng = random.Random(cfg.seed)
    tokenizer = demo.build_tokenizer()
    trainer = demo.build_trainer(cfg, tokenizer, demo.build_model(tokenizer, cfg))
    held_out = demo.sample_words(rng, cfg.eval_prompts, cfg.min_len, cfg.max_len)
    gold = demo.sample_words(rng, cfg.warm_start_examples, cfg.min_len, cfg.max_len, set(held_out))
    for _ in range(cfg.warm_start_steps):
        trainer.step(prompts=[demo.make_prompt(w) for w in gold], completions=[w[::-1] for w in gold])
    if args.loop == "new":
        trainer = demo.rl_trainer(trainer, cfg, tokenizer)
    start = time.perf_counter()
    for r in range(cfg.rounds + 1):
        record: dict = {"round": r}
        if r:
            words = demo.sample_words(rng, cfg.prompts_per_round, cfg.min_len, cfg.max_len, set(held_out))
            if args.loop == "new":
                m = demo.policy_gradient_round(trainer, cfg, words, r)
            else:
                m = old_round(trainer, cfg, words, r, rng, normalization="sequence" if args.loop == "old"
                              else "constant", passes=3 if args.loop == "old" else 1)
            record.update({k: m[k] for k in ("reward", "signal", "log_ratio")})
        record["pass_rate"] = demo.pass_rate(trainer, cfg, held_out, r)
        record["p_eos_after_gold"], record["gold_char_logprob"] = gold_stats(trainer, tokenizer, held_out[:64])
        record["greedy_too_short"], record["greedy_tokens"] = greedy_stats(trainer, cfg, held_out[:64])
        record["seconds"] = time.perf_counter() - start
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), flush=True)


if __name__ == "__main__":
    main()
