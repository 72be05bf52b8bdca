"""GRPO on the demo's task: TRL's ``GRPOTrainer`` against the loop ``itersft demo --loss ...`` runs on the low-level
API, same model, warm start, prompts, samples per prompt, learning rate, optimizer, updates and reward.

For each seed: ``itersft demo --loss importance_sampling`` (``apps/demo.py``: the SFT warm start, then GRPO through
``trainer.sample`` / ``forward_backward`` / ``optim_step``) runs first and leaves its warm-started model in
``OUT/seed{s}-ours/warm_start``; TRL's ``GRPOTrainer`` (PyTorch, CPU) then starts from that same model with the
settings mapped one to one — ``per_device_train_batch_size`` = samples per update, ``num_generations`` = samples
per prompt, ``steps_per_generation`` = updates per sampling call, ``learning_rate`` = ``rl_learning_rate``, AdamW
(0.9, 0.999, 1e-8, no weight decay), constant schedule, ``max_grad_norm`` 1, ``beta`` 0, ``scale_rewards="group"``,
``loss_type`` = ``dr_grpo`` / ``grpo`` / ``dapo`` for the demo's ``constant`` / ``sequence`` / ``token``
normalisation, ``temperature`` the demo's — on the same prompts in the same order, rewarded by the demo's exact
checker. Both report the greedy pass rate on the demo's 200 held-out prompts after each round.

One difference is by design and stated: TRL's policy is the *tempered* one (its training forward divides the
logits by ``temperature``), ours is the model at temperature 1 (``sample()``'s logprobs are the temperature-1
policy's). At ``--temperature 1`` the two losses are the same function.

Needs ``trl`` (``pip install trl``; not a dependency of the project, and no test imports it). Run::

    python benchmarks/grpo_peer.py --seeds 0 1 --rounds 4 --out /tmp/grpo_peer

It prints one table: pass rate by round for each seed and each loop, and the seconds per round.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time

import common  # noqa: F401  (puts the repository root on sys.path)

LOSS_TYPES = {"constant": "dr_grpo", "sequence": "grpo", "token": "dapo"}


def round_words(cfg) -> tuple[list[str], list[list[str]]]:
    """The demo's held-out words and each round's training words, drawn exactly as ``demo.run`` draws them."""
    from itersft_jax.apps.demo import sample_words

    rng = random.Random(cfg.seed)
    held_out = sample_words(rng, cfg.eval_prompts, cfg.min_len, cfg.max_len)
    sample_words(rng, cfg.warm_start_examples, cfg.min_len, cfg.max_len, set(held_out))  # the gold, unused here
    rounds = [sample_words(rng, cfg.prompts_per_round, cfg.min_len, cfg.max_len, set(held_out))
              for _ in range(cfg.rounds)]
    return held_out, rounds


def greedy_pass_rate(model, tokenizer, words: list[str], max_new_tokens: int) -> float:
    import copy

    import torch

    from itersft_jax.apps.demo import check, make_prompt

    tok = copy.copy(tokenizer)
    tok.padding_side = "left"
    enc = tok([make_prompt(w) for w in words], return_tensors="pt", padding=True)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, top_k=None, top_p=None,
                             temperature=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.train(was_training)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(check(w, t) for w, t in zip(words, texts)) / len(words)


def run_trl(cfg, warm_dir: str, out_dir: str) -> list[dict]:
    """TRL's GRPOTrainer from ``warm_dir`` with ``cfg``'s settings; the pass rate after each round."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from itersft_jax.apps.demo import check, make_prompt

    held_out, rounds = round_words(cfg)
    words = [w for r in rounds for w in r]
    dataset = Dataset.from_dict({"prompt": [make_prompt(w) for w in words], "word": words})
    tokenizer = AutoTokenizer.from_pretrained(warm_dir)
    calls = cfg.updates_per_round // cfg.updates_per_sample
    samples_per_update = cfg.prompts_per_round // calls * cfg.samples_per_prompt // cfg.updates_per_sample

    def reward(prompts, completions, word, **_):
        return [float(check(w, c)) for w, c in zip(word, completions)]

    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=samples_per_update, num_generations=cfg.samples_per_prompt,
        steps_per_generation=cfg.updates_per_sample, gradient_accumulation_steps=1,
        learning_rate=cfg.rl_learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", max_grad_norm=1.0,
        max_steps=cfg.rounds * cfg.updates_per_round, temperature=cfg.temperature, top_p=1.0,
        max_completion_length=cfg.max_len + 2, loss_type=LOSS_TYPES[cfg.normalization], scale_rewards="group",
        beta=0.0, epsilon=0.2, num_iterations=1, shuffle_dataset=False, use_cpu=True, bf16=False, report_to=[],
        logging_steps=1, save_strategy="no", seed=cfg.seed, disable_tqdm=True)
    records = []

    class EveryRound(TrainerCallback):
        start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **_):
            if state.global_step % cfg.updates_per_round == 0:
                logs = [h for h in state.log_history if "reward" in h][-cfg.updates_per_round:]
                rate = greedy_pass_rate(model, tokenizer, held_out, cfg.max_len + 2)
                records.append({"round": state.global_step // cfg.updates_per_round, "pass_rate": rate,
                                "reward": sum(h["reward"] for h in logs) / max(len(logs), 1),
                                "seconds": time.perf_counter() - self.start})
                self.start = time.perf_counter()

    trainer = GRPOTrainer(model=warm_dir, reward_funcs=[reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[EveryRound()])
    records.insert(0, {"round": 0, "pass_rate": greedy_pass_rate(trainer.model, tokenizer, held_out, cfg.max_len + 2)})
    trainer.train()
    return records


def run_ours(cfg) -> list[dict]:
    from itersft_jax.apps.demo import run

    return run(cfg, log=lambda line: print("  ours:", line, flush=True))


def main(argv=None) -> None:
    from itersft_jax.apps.demo import DemoConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prompts-per-round", type=int, default=512)
    parser.add_argument("--updates-per-round", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=DemoConfig.temperature)
    parser.add_argument("--learning-rate", type=float, default=DemoConfig.rl_learning_rate)
    parser.add_argument("--normalization", choices=sorted(LOSS_TYPES), default=DemoConfig.normalization)
    parser.add_argument("--backend", choices=("jax", "torch"), default="jax", help="our engine")
    parser.add_argument("--out", default="grpo_peer_output")
    args = parser.parse_args(argv)
    results = {}
    for seed in args.seeds:
        cfg = DemoConfig(loss="importance_sampling", seed=seed, rounds=args.rounds, backend=args.backend,
                         prompts_per_round=args.prompts_per_round, updates_per_round=args.updates_per_round,
                         temperature=args.temperature, rl_learning_rate=args.learning_rate,
                         normalization=args.normalization, plot=False,
                         output_dir=os.path.join(args.out, f"seed{seed}-ours"))
        t0 = time.perf_counter()
        ours = run_ours(cfg)
        print(f"seed {seed}: ours {time.perf_counter() - t0:.0f}s", flush=True)
        t0 = time.perf_counter()
        peer = run_trl(cfg, os.path.join(cfg.output_dir, "warm_start"), os.path.join(args.out, f"seed{seed}-trl"))
        print(f"seed {seed}: TRL {time.perf_counter() - t0:.0f}s", flush=True)
        results[seed] = {"config": dataclasses.asdict(cfg), "ours": ours, "trl": peer}
        with open(os.path.join(args.out, "grpo_peer.json"), "w") as f:
            json.dump(results, f, indent=2)
    print_table(results)


def print_table(results: dict) -> None:
    rounds = max(len(r["ours"]) for r in results.values())
    head = " | ".join(f"{r:>5}" for r in range(rounds))
    print(f"| loop | seed | {head} | s/round |")
    print("|---" * (rounds + 3) + "|")
    for seed, r in results.items():
        for name, label in (("trl", "TRL GRPOTrainer"), ("ours", f"itersft ({r['config']['backend']})")):
            rates = " | ".join(f"{100 * m['pass_rate']:4.1f}%" for m in r[name])
            secs = [m["seconds"] for m in r[name][1:] if "seconds" in m]
            print(f"| {label} | {seed} | {rates} | {sum(secs) / max(len(secs), 1):.0f} |")


if __name__ == "__main__":
    main()
