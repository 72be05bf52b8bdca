"""``itersft demo``: expert iteration (rejection-sampling fine-tuning) on a verifiable task, offline.

The task: reverse a short string of the letters a-j, ``"abcd="`` -> ``"dcba"``, checked exactly. Everything
is built in-process, deterministically from ``--seed``: a character-level tokenizer (trained with
``tokenizers``; its vocabulary is a-j, digits and a few symbols, so other letters map to ``<unk>``) and a
tiny random Llama (``transformers.LlamaConfig``). Nothing is downloaded. ``itersft demo --model M`` runs
the same loop on a pretrained chat model instead (``demo_chat.py``).

The loop, the one ``IterativeSFTTrainer`` exists for:

* **round 0 — SFT warm start.** A random model never reverses anything, so rejection sampling would
  keep nothing. The model is first fine-tuned on a handful of gold examples (``step(prompts=...,
  completions=...)``), few enough that its held-out pass rate starts low but not at zero. This is plain
  supervised data, and the only gold answers the loop ever sees.
* **rounds 1..R.** Sample ``k`` completions per training prompt (temperature 1), keep those the checker
  accepts (one per prompt and answer), ``step()`` on them, and measure the greedy pass rate on held-out
  prompts the model is never trained on.

``--loss importance_sampling`` (or ``ppo``, ``cispo``) replaces the filter-and-``step()`` of rounds 1..R with GRPO
through the low-level API (``apps/grpo.py``): the warm-started weights get a fresh optimizer at
``rl_learning_rate``; each round makes ``updates_per_round`` updates, each on its own fresh prompts —
``trainer.sample()`` draws ``k`` completions per prompt with their behaviour logprobs, the exact checker gives each
a reward of 1 or 0, the advantages are normalised within each prompt's group (``(r - mean) / std``, both signs; a
group whose samples all agree is dropped), divided by a constant (Dr. GRPO), and ``forward_backward(data, loss)`` +
``optim_step()`` train on them. The round's line adds the diagnostics: mean reward, the fraction of groups with
signal, mean completion length, mean |log-ratio| and KL between trainer and sampler (and ppo's / cispo's clipped
fraction), and ``kl_round``, how far the round moved the policy from its first sampling policy. The loop this
replaced (3 passes of 32-sample updates over each round's samples at the warm start's 3e-3) collapsed to a 0% pass
rate with both signs of advantage: ``docs/cli.md`` has the curves and the mechanism.

Outputs in ``--output-dir``: the final model as a Hugging Face directory (``AutoModelForCausalLM``
loads it), ``metrics.json`` (one entry per round) and ``curve.png`` (pass rate and loss per round).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import string
import time
from typing import Any

LETTERS = string.ascii_lowercase[:10]  # a..j
RL_LOSSES = ("importance_sampling", "ppo", "cispo")  # --loss choices besides expert_iteration
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclasses.dataclass
class DemoConfig:
    """Knobs of the demo; the defaults are the tuned full run (under a minute on 2 CPU cores)."""

    rounds: int = 8
    samples_per_prompt: int = 4
    prompts_per_round: int = 512  # fresh training prompts each round, never the held-out ones
    eval_prompts: int = 200  # held-out prompts, greedy pass rate
    min_len: int = 3
    max_len: int = 5
    warm_start_examples: int = 128  # gold examples of round 0
    warm_start_steps: int = 10  # step() calls on them (passes)
    learning_rate: float = 3e-3
    batch_size: int = 32
    passes_per_round: int = 3  # step() calls per round on the training set
    replay: bool = True  # train on every verified sample so far (and the gold), not only this round's
    temperature: float = 0.7
    hidden_size: int = 96
    num_layers: int = 2
    seed: int = 0
    loss: str = "expert_iteration"  # or a policy-gradient loss of the low-level API: see RL_LOSSES
    # --loss (GRPO, apps/grpo.py): a fresh optimizer from the warm-started weights, at its own learning rate
    rl_learning_rate: float = 3e-4
    updates_per_round: int = 8  # optimizer updates per round, each on the samples of its own prompts
    updates_per_sample: int = 1  # updates per sampling call (> 1: the later ones off-policy, ppo/cispo clip them)
    normalization: str = "constant"  # of the summed loss: "constant" (Dr. GRPO), "sequence", "token" (grpo.py)
    negative_advantages: bool = True  # False: only the above-mean samples train (the advantages clipped at 0)
    backend: str = "jax"
    output_dir: str = "demo_output"
    plot: bool = True

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """A smoke-test sized run (seconds of compute once compiled), for tests."""
        kw = {"rounds": 2, "samples_per_prompt": 2, "prompts_per_round": 32, "eval_prompts": 32,
              "warm_start_examples": 32, "warm_start_steps": 2, "passes_per_round": 1}
        kw.update(overrides)
        return cls(**kw)


# ---------------------------------------------------------------------------------------------------------
# Task


def make_prompt(word: str) -> str:
    return f"{word}="


def check(word: str, completion: str) -> bool:
    """The verifier: the completion must be the reversed word, nothing more."""
    return completion.strip() == word[::-1]


def sample_words(rng: random.Random, n: int, min_len: int, max_len: int, exclude: set[str] = frozenset()):
    words = []
    while len(words) < n:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
        if word not in exclude:
            words.append(word)
    return words


# ---------------------------------------------------------------------------------------------------------
# Built-in tokenizer and model


def build_tokenizer():
    """A character-level tokenizer: one token per letter/digit/symbol, BOS prepended, EOS/pad special."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(LETTERS + string.digits + "=+-*:? "))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_model(tokenizer, cfg: DemoConfig):
    """A tiny random Llama (transformers), seeded: the same ``--seed`` gives the same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 8 // 3,
        num_hidden_layers=cfg.num_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config).float().eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_trainer(cfg: DemoConfig, tokenizer, model):
    from itersft_jax.facade import IterativeSFTTrainer
    from itersft_jax.shared.config import IterativeSFTConfig

    args = IterativeSFTConfig(
        output_dir=cfg.output_dir, learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=cfg.seed,
        activation_checkpointing=False, logging_steps=1000, save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True)
    return IterativeSFTTrainer(model, args=args, processing_class=tokenizer, backend=cfg.backend)


# ---------------------------------------------------------------------------------------------------------
# Generation


def complete(trainer, cfg: DemoConfig, prompts: list[str], *, samples: int, do_sample: bool, seed: int,
             max_new_tokens: int) -> list[str]:
    """Completions (texts, prompt-major, ``samples`` per prompt) from the trainer's current model: its
    ``generate``, the same call on both backends."""
    out = trainer.generate(prompts, max_new_tokens=max_new_tokens, do_sample=do_sample,
                           temperature=cfg.temperature, num_return_sequences=samples, seed=seed)
    return out.texts


# ---------------------------------------------------------------------------------------------------------
# The loop


def pass_rate(trainer, cfg: DemoConfig, words: list[str], seed: int) -> float:
    texts = complete(trainer, cfg, [make_prompt(w) for w in words], samples=1, do_sample=False, seed=seed,
                     max_new_tokens=cfg.max_len + 2)
    return sum(check(w, t) for w, t in zip(words, texts)) / len(words)


def start_processes(backend: str) -> None:
    """On the JAX engine, ``jax.distributed`` first when the environment asks for several processes
    (``itersft_jax.parallel.distributed``; docs/scaling.md): the demo touches JAX before it builds the trainer."""
    if backend == "jax":
        from itersft_jax.parallel import distributed

        distributed.initialize()


def run(cfg: DemoConfig, log=None) -> list[dict[str, Any]]:
    """Run the demo; returns the per-round metrics (also written to ``metrics.json``). ``log`` receives one
    line per round (default: printed above the progress bar)."""
    from tqdm.auto import tqdm

    log = log or tqdm.write
    start_processes(cfg.backend)
    start = time.perf_counter()
    os.makedirs(cfg.output_dir, exist_ok=True)
    rng = random.Random(cfg.seed)
    tokenizer = build_tokenizer()
    trainer = build_trainer(cfg, tokenizer, build_model(tokenizer, cfg))
    held_out = sample_words(rng, cfg.eval_prompts, cfg.min_len, cfg.max_len)
    excluded = set(held_out)

    # Round 0: the SFT warm start on a few gold examples.
    gold = sample_words(rng, cfg.warm_start_examples, cfg.min_len, cfg.max_len, excluded)
    t0 = time.perf_counter()
    gold_prompts, gold_answers = [make_prompt(w) for w in gold], [w[::-1] for w in gold]
    losses = [trainer.step(prompts=gold_prompts, completions=gold_answers)["loss"]
              for _ in range(cfg.warm_start_steps)]
    metrics = [{"round": 0, "phase": "sft_warm_start", "pass_rate": pass_rate(trainer, cfg, held_out, 0),
                "correct": 0, "kept": len(gold), "sampled": 0, "trained_on": len(gold), "loss": losses[-1],
                "seconds": time.perf_counter() - t0}]
    log(round_line(metrics[-1]))
    buffer = dict.fromkeys((w, w[::-1]) for w in gold)  # every verified (prompt, answer) so far

    if cfg.loss not in ("expert_iteration", *RL_LOSSES):
        raise ValueError(f"`loss` must be 'expert_iteration' or one of {RL_LOSSES}, got {cfg.loss!r}")
    if cfg.loss != "expert_iteration":
        trainer = rl_trainer(trainer, cfg, tokenizer)
    bar = tqdm(range(1, cfg.rounds + 1), desc=cfg.loss.replace("_", " "), unit="round", leave=False)
    for r in bar:
        t0 = time.perf_counter()
        words = sample_words(rng, cfg.prompts_per_round, cfg.min_len, cfg.max_len, excluded)
        if cfg.loss != "expert_iteration":
            metrics.append(policy_gradient_round(trainer, cfg, words, r))
            metrics[-1].update(pass_rate=pass_rate(trainer, cfg, held_out, r), seconds=time.perf_counter() - t0)
            bar.set_postfix(pass_rate=f"{metrics[-1]['pass_rate']:.2f}")
            log(round_line(metrics[-1]))
            continue
        prompts = [make_prompt(w) for w in words]
        texts = complete(trainer, cfg, prompts, samples=cfg.samples_per_prompt, do_sample=True,
                         seed=cfg.seed * 1000 + r, max_new_tokens=cfg.max_len + 2)
        kept, correct = {}, 0
        for i, text in enumerate(texts):
            word = words[i // cfg.samples_per_prompt]
            if check(word, text):
                correct += 1
                kept[(word, text.strip())] = None  # one copy per (prompt, answer)
        buffer.update(kept)
        loss = float("nan")
        train = list(buffer) if cfg.replay else list(kept)
        if train:
            for _ in range(cfg.passes_per_round):
                loss = trainer.step(prompts=[make_prompt(w) for w, _ in train],
                                    completions=[c for _, c in train])["loss"]
        metrics.append({"round": r, "phase": "expert_iteration",
                        "pass_rate": pass_rate(trainer, cfg, held_out, r), "correct": correct,
                        "kept": len(kept), "sampled": len(texts), "trained_on": len(train), "loss": loss,
                        "seconds": time.perf_counter() - t0})
        bar.set_postfix(pass_rate=f"{metrics[-1]['pass_rate']:.2f}")
        log(round_line(metrics[-1]))
    bar.close()

    finish(trainer, cfg, metrics, task="reverse a string of letters a-j: 'abcd=' -> 'dcba'", start=start, log=log,
           title=f"itersft demo: {cfg.loss.replace('_', ' ')} on string reversal")
    return metrics


def policy_gradient_round(trainer, cfg: DemoConfig, words: list[str], r: int) -> dict:
    """One round of ``--loss``: ``updates_per_round`` updates, each on fresh prompts (``updates_per_sample`` > 1
    reuses a sampling call's data for that many updates): ``trainer.sample()`` with behaviour logprobs, the checker's
    rewards, GRPO's group advantages (``apps/grpo.py``), ``forward_backward`` + ``optim_step``. Logs the
    diagnostics of ``grpo.Diagnostics`` and ``kl_round``: the KL from the round's first sampling policy to the
    policy after the round (``forward`` on the first call's data)."""
    from itersft_jax.apps.grpo import Diagnostics, grpo_update, policy_drift

    diagnostics, first = Diagnostics(), None
    shuffle = random.Random(cfg.seed * 1000 + r)  # not `rng`: the rounds draw the prompts expert iteration draws
    calls = max(cfg.updates_per_round // cfg.updates_per_sample, 1)
    per_call = -(-len(words) // calls)
    for c in range(calls):
        chunk = words[c * per_call:(c + 1) * per_call]
        if not chunk:
            break
        out = trainer.sample([make_prompt(w) for w in chunk], num_samples=cfg.samples_per_prompt,
                             max_new_tokens=cfg.max_len + 2, do_sample=True, temperature=cfg.temperature,
                             seed=(cfg.seed * 1_000_003 + r * 1009 + c) % 2**31)
        rewards = [float(check(chunk[out.prompt_index(i)], text)) for i, text in enumerate(out.texts)]
        data = grpo_update(trainer, out, rewards, loss=cfg.loss, group=cfg.samples_per_prompt,
                           normalization=cfg.normalization, max_tokens=cfg.max_len + 2,
                           minibatches=cfg.updates_per_sample, rng=shuffle, diagnostics=diagnostics,
                           positive_only=not cfg.negative_advantages)
        first = first or data
    record = diagnostics.record(cfg.loss)
    record["kl_round"] = policy_drift(trainer, first, cfg.loss)
    sampled = len(diagnostics.rewards)
    return {"round": r, "phase": cfg.loss, "correct": int(sum(diagnostics.rewards)), "kept": diagnostics.kept,
            "sampled": sampled, "trained_on": diagnostics.kept, "loss": diagnostics.loss, **record}


def rl_trainer(trainer, cfg: DemoConfig, tokenizer):
    """The RL rounds' trainer: the warm-started weights (saved to ``output_dir/warm_start``) with a fresh optimizer
    at ``rl_learning_rate`` — what an RL run started from an SFT checkpoint does."""
    path = os.path.join(cfg.output_dir, "warm_start")
    trainer.save_model(path)
    return build_trainer(dataclasses.replace(cfg, learning_rate=cfg.rl_learning_rate), tokenizer, path)


def finish(trainer, cfg, metrics: list[dict], *, task: str, start: float, log, title: str) -> None:
    """Save the model, ``metrics.json`` and (unless ``cfg.plot`` is off) ``curve.png``; log what was written."""
    model_dir = os.path.join(cfg.output_dir, "model")
    trainer.save_model(model_dir)
    total = time.perf_counter() - start
    summary = {"config": dataclasses.asdict(cfg), "task": task, "rounds": metrics, "total_seconds": total,
               "model_dir": model_dir}
    with open(os.path.join(cfg.output_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    written = "model and metrics.json"
    if cfg.plot:
        plot(metrics, os.path.join(cfg.output_dir, "curve.png"), title=title)
        written = "model, metrics.json and curve.png"
    log(f"pass rate {metrics[0]['pass_rate']:.1%} -> {metrics[-1]['pass_rate']:.1%} in {total:.0f}s; "
        f"{written} in {cfg.output_dir}")


def round_line(m: dict) -> str:
    return (f"round {m['round']:2d}  held-out pass rate {m['pass_rate']:6.1%} | correct {m['correct']:4d}/"
            f"{m['sampled']:<4d} kept {m['kept']:3d} trained on {m['trained_on']:4d} | "
            f"loss {loss_text(m['loss'])} | "
            f"{m['seconds']:4.1f}s" + (rl_text(m) if "reward" in m else ""))


def rl_text(m: dict) -> str:
    """The RL diagnostics of a round (``grpo.Diagnostics.record``), for the round's line."""
    clip = f" clip {m['clip_fraction']:.3f}" if "clip_fraction" in m else ""
    return (f" | reward {m['reward']:.3f} signal {m['signal']:4.0%} len {m['completion_tokens']:4.1f} "
            f"|log-ratio| {m['log_ratio']:.3f} kl {m['kl_sampler']:.4f}{clip} kl_round {m.get('kl_round', 0):.4f}")


def loss_text(loss: float) -> str:
    """The loss as six characters; a dash when nothing was trained (the NaN of round 0 of ``--model``)."""
    return f"{'-':>6}" if math.isnan(loss) else f"{loss:.4f}"


def plot(metrics: list[dict], path: str, title: str) -> None:
    fig = curve_figure(metrics, title)
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)


def curve_figure(metrics: list[dict], title: str):
    """The pass rate (left axis) and the training loss (right axis) per round; ticks at whole rounds only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [m["round"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(rounds, [100 * m["pass_rate"] for m in metrics], "o-", color="tab:blue")
    ax.set_xlabel("round (0 = before the rounds of sampling and training)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("held-out pass rate (%)", color="tab:blue")
    ax.set_ylim(0, 100)
    ax2 = ax.twinx()
    ax2.plot(rounds, [m["loss"] for m in metrics], "s--", color="tab:red")
    ax2.set_ylabel("training loss", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    return fig
