"""GRPO on the low-level API: the policy-gradient update both demos run with ``--loss importance_sampling`` (or
``ppo``, ``cispo``), and the diagnostics they log.

One sampling call: ``trainer.sample()`` draws ``group`` completions per prompt with their behaviour logprobs, a
verifier rewards each, the advantages are normalised within each prompt's group (``(r - mean) / std``: both signs;
a group whose rewards all agree has no signal and is dropped), and the call's data train in ``minibatches``
optimizer updates (``forward_backward(data, loss)`` + ``optim_step()``; the first on-policy, the later ones
corrected by the loss's importance ratio and, for ``ppo`` / ``cispo``, its clip).

The losses are sums over tokens (``docs/low_level_api.md``), so the normalisation lives in the advantages:

* ``"constant"`` (Dr. GRPO, TRL's ``loss_type="dr_grpo"``): every token's advantage divided by the same constant
  (the update's samples x ``max_tokens``). Within a group whose advantages sum to 0, a prefix the samples share gets
  no net push: only where they differ does the gradient act.
* ``"sequence"`` (the original GRPO): each sample's advantage divided by its own length. A short wrong answer pushes
  its tokens down harder than a long right one pushes the same tokens up: a length bias.
* ``"token"`` (DAPO, TRL's default ``"dapo"``): divided by the update's total completion tokens.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

NORMALIZATIONS = ("constant", "sequence", "token")


def group_advantages(rewards: Sequence[float], group: int) -> list[float]:
    """GRPO-style advantages: each reward minus its prompt group's mean, over the group's standard deviation
    (0 where the group's rewards all agree: no signal)."""
    out = []
    for i in range(0, len(rewards), group):
        chunk = rewards[i:i + group]
        mean = sum(chunk) / len(chunk)
        std = math.sqrt(sum((x - mean) ** 2 for x in chunk) / len(chunk))
        out.extend((x - mean) / std if std > 0 else 0.0 for x in chunk)
    return out


def scale_advantages(data: list, normalization: str, num_samples: int, max_tokens: int) -> list:
    """The data with each advantage divided as ``normalization`` says (see the module docstring); ``num_samples``
    counts the update's samples, dropped ones included (they are part of the batch the mean runs over)."""
    from itersft_jax.shared.datum import Datum

    if normalization not in NORMALIZATIONS:
        raise ValueError(f"`normalization` must be one of {NORMALIZATIONS}, got {normalization!r}")
    lengths = [float(np.count_nonzero(d.loss_fn_inputs["advantages"])) or 1.0 for d in data]
    if normalization == "constant":
        divisors = [num_samples * max_tokens] * len(data)
    elif normalization == "sequence":
        divisors = [n * num_samples for n in lengths]
    else:
        divisors = [sum(lengths)] * len(data)
    return [Datum(d.model_input, {**d.loss_fn_inputs, "advantages": d.loss_fn_inputs["advantages"] / s})
            for d, s in zip(data, divisors)]


class Diagnostics:
    """Token-weighted means of ``forward_backward``'s RL metrics over a round's updates, plus the round's samples."""

    KEYS = ("log_ratio_abs:mean", "kl_sampler:mean", "clip_fraction:mean")

    def __init__(self):
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.tokens = 0.0
        self.rewards: list[float] = []
        self.lengths: list[int] = []
        self.groups = self.groups_with_signal = self.updates = self.kept = 0
        self.loss = float("nan")

    def add_update(self, metrics: dict) -> None:
        n = metrics.get("trained_tokens:sum", 0.0)
        for key in self.KEYS:
            self.sums[key] += metrics.get(key, 0.0) * n
        self.tokens += n
        self.loss = metrics["loss:sum"]
        self.updates += 1

    def record(self, loss_fn: str) -> dict:
        """The round's line: ``reward`` (mean), ``signal`` (fraction of groups whose rewards differ),
        ``completion_tokens`` (mean length), ``log_ratio`` (mean |trainer - sampler| logprob), ``kl_sampler``,
        ``clip_fraction`` (``ppo`` / ``cispo``), each a token-weighted mean over the round's updates."""
        means = {k.split(":")[0]: (v / self.tokens if self.tokens else 0.0) for k, v in self.sums.items()}
        out = {"reward": float(np.mean(self.rewards)) if self.rewards else 0.0,
               "signal": self.groups_with_signal / max(self.groups, 1),
               "completion_tokens": float(np.mean(self.lengths)) if self.lengths else 0.0,
               "log_ratio": means["log_ratio_abs"], "kl_sampler": means["kl_sampler"], "updates": self.updates}
        if loss_fn in ("ppo", "cispo"):
            out["clip_fraction"] = means["clip_fraction"]
        return out


def grpo_update(trainer, out, rewards: Sequence[float], *, loss: str, group: int, normalization: str,
                max_tokens: int, minibatches: int = 1, loss_fn_config: dict | None = None,
                rng: random.Random | None = None, diagnostics: Diagnostics | None = None,
                positive_only: bool = False) -> list:
    """Train on one sampling call (``out`` from ``trainer.sample``, prompt-major, ``group`` rows per prompt; one
    reward per row): group advantages (``positive_only``: clipped at 0, the below-mean samples left out),
    ``normalization``, ``minibatches`` updates over the shuffled data. Returns the data trained (unscaled
    advantages: for a later ``forward`` that measures the policy's drift)."""
    from itersft_jax.shared.datum import samples_to_data

    diagnostics = diagnostics if diagnostics is not None else Diagnostics()
    advantages = group_advantages(list(rewards), group)
    if positive_only:
        advantages = [max(a, 0.0) for a in advantages]
    groups = len(rewards) // group
    diagnostics.rewards.extend(rewards)
    diagnostics.lengths.extend(len(s) for s in out.sequences)
    diagnostics.groups += groups
    diagnostics.groups_with_signal += sum(any(advantages[g * group:(g + 1) * group]) for g in range(groups))
    data = [d for d, a in zip(samples_to_data(out, advantages), advantages) if a != 0.0]
    diagnostics.kept += len(data)
    (rng or random.Random(0)).shuffle(data)
    size = -(-len(rewards) // minibatches)  # samples per update, the dropped ones counted
    per_update = -(-len(data) // minibatches) if data else 0
    for start in range(0, len(data), max(per_update, 1)):
        batch = scale_advantages(data[start:start + per_update], normalization, size, max_tokens)
        diagnostics.add_update(trainer.forward_backward(batch, loss, loss_fn_config).metrics)
        trainer.optim_step()
    return data


def policy_drift(trainer, data: list, loss: str) -> float:
    """``kl_sampler`` of ``data`` (a sampling call's, unscaled) under the current parameters: how far the updates
    since that call moved the policy (the KL from the sampling policy to the current one, per token)."""
    return trainer.forward(data, loss).metrics["kl_sampler:mean"] if data else 0.0
