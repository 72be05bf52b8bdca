"""The low-level API's data: ``Datum`` (Tinker's layout), its checks, and the built-in losses written once.

A ``Datum`` is one sequence: ``model_input`` (token ids) and ``loss_fn_inputs``, per-position arrays as long as
``model_input``. Alignment is Tinker's: position ``i`` of ``model_input`` predicts token ``i + 1`` of the full
sequence, which is ``target_tokens[i]`` — the targets are already shifted, nothing is shifted again.

``loss_fn_inputs``: ``target_tokens`` (ids), ``weights`` (cross_entropy), ``logprobs`` (the sampler's log-probability
of each target, for the importance-sampled losses), ``advantages``; other float arrays may ride along for custom
losses. Losses are **sums** over tokens (no normalisation): scale through ``weights`` / ``advantages``.

The built-in losses are written here once against an array namespace (``LossOps``: ``jax.numpy`` on the JAX engine,
``torch`` on the PyTorch one), so both engines compute the same formula; no jax or torch is imported here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from itersft_jax.shared.data import check_positions

TARGETS = "target_tokens"
FLOAT_INPUTS = ("weights", "logprobs", "advantages")
LOSS_INPUTS = {  # what each built-in loss reads from loss_fn_inputs
    "cross_entropy": (TARGETS, "weights"),
    "importance_sampling": (TARGETS, "logprobs", "advantages"),
    "ppo": (TARGETS, "logprobs", "advantages"),
    "cispo": (TARGETS, "logprobs", "advantages"),
}
LOGPROBS_ONLY = "logprobs"  # the engines' internal pass for compute_logprobs: logprobs through token_logprobs, no loss
CLIP_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}  # ppo / cispo ratio clipping
LOSS_CONFIG_KEYS = {"cross_entropy": {}, "importance_sampling": {}, "ppo": CLIP_DEFAULTS, "cispo": CLIP_DEFAULTS}
# What check_data accepts in the float inputs, so no loss turns them into inf: every value finite in fp32 (the engines
# compute in fp32), |weights| and |advantages| at most MAX_MAGNITUDE, and logprobs log-probabilities: at most
# LOGPROB_SLACK above 0 and not below LOGPROB_FLOOR (no fp32 log-softmax gives less; exp of a larger log-ratio
# overflows fp32 in importance_sampling / ppo).
MAX_MAGNITUDE = 1e6
LOGPROB_FLOOR = -1000.0
LOGPROB_SLACK = 1e-3
_FP32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class Datum:
    """One sequence for ``forward_backward``: ``model_input`` token ids and ``loss_fn_inputs`` (each as long as
    ``model_input``; position ``i`` predicts ``target_tokens[i]``, the full sequence's token ``i + 1``).

    ``model_input`` may be any 1-D integer container (list, numpy, torch, jax) or an object with ``to_ints()``
    (Tinker's ``ModelInput``); it and every input are stored as numpy arrays (ids int64, the rest float64)."""

    model_input: Any
    loss_fn_inputs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        model_input = self.model_input.to_ints() if hasattr(self.model_input, "to_ints") else self.model_input
        object.__setattr__(self, "model_input", _as_array(model_input, "model_input", integer=True))
        if not isinstance(self.loss_fn_inputs, dict):
            raise TypeError(f"`loss_fn_inputs` must be a dict of arrays, got {type(self.loss_fn_inputs).__name__}")
        inputs = {k: _as_array(v, f"loss_fn_inputs[{k!r}]", integer=k == TARGETS)
                  for k, v in self.loss_fn_inputs.items()}
        object.__setattr__(self, "loss_fn_inputs", inputs)

    def __len__(self) -> int:
        return len(self.model_input)

    @classmethod
    def from_prompt_completion(cls, prompt_ids, completion_ids, *, logprobs=None, advantages=None) -> Datum:
        """The datum of ``prompt + completion``: inputs = the sequence without its last token, targets = without its
        first; ``weights`` 1 on the completion's tokens, 0 on the prompt's. ``logprobs`` (the sampler's, one per
        completion token) and ``advantages`` (a number, or one per completion token) are placed on the
        completion's targets, 0 on the prompt's."""
        prompt = _as_array(prompt_ids, "prompt_ids", integer=True)
        completion = _as_array(completion_ids, "completion_ids", integer=True)
        if len(prompt) == 0 or len(completion) == 0:
            raise ValueError("`prompt_ids` and `completion_ids` must each hold at least one token")
        full = np.concatenate([prompt, completion])
        first = len(prompt) - 1  # the target position of the completion's first token
        inputs = {TARGETS: full[1:], "weights": _on_completion(1.0, first, len(completion), "weights")}
        if logprobs is not None:
            inputs["logprobs"] = _on_completion(logprobs, first, len(completion), "logprobs")
        if advantages is not None:
            inputs["advantages"] = _on_completion(advantages, first, len(completion), "advantages")
        return cls(full[:-1], inputs)


def make_data(prompt_ids: Sequence, completion_ids: Sequence, *, logprobs: Sequence | None = None,
              advantages: Sequence | None = None) -> list[Datum]:
    """``Datum.from_prompt_completion`` over parallel lists (e.g. a sampler's prompts, completions and logprobs,
    and one advantage — a number or per-token array — per completion)."""
    n = len(completion_ids)
    for name, value in (("prompt_ids", prompt_ids), ("logprobs", logprobs), ("advantages", advantages)):
        if value is not None and len(value) != n:
            raise ValueError(f"`{name}` has {len(value)} entries, `completion_ids` has {n}")
    return [Datum.from_prompt_completion(prompt_ids[i], completion_ids[i],
                                         logprobs=None if logprobs is None else logprobs[i],
                                         advantages=None if advantages is None else advantages[i])
            for i in range(n)]


def _as_array(value, name: str, integer: bool) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        value = value.detach().cpu().float().numpy() if not integer else value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` could not be read as an array: {err}") from None
    if arr.ndim != 1 or arr.dtype == object:
        raise ValueError(f"`{name}` must be a 1-D array of numbers, got shape {arr.shape}")
    if integer:
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"`{name}` must hold integer token ids, got {arr.dtype}")
        return arr.astype(np.int64)
    if arr.size and not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"`{name}` must hold numbers, got {arr.dtype}")
    return arr.astype(np.float64)


def _on_completion(value, first: int, length: int, name: str) -> np.ndarray:
    per_token = np.broadcast_to(np.asarray(value, np.float64), (length,)) if np.ndim(value) == 0 else \
        _as_array(value, name, integer=False)
    if len(per_token) != length:
        raise ValueError(f"`{name}` has {len(per_token)} values, the completion {length} tokens")
    out = np.zeros(first + length, np.float64)
    out[first:] = per_token
    return out


# ----------------------------------------------------------------------------------------------------------
# Checks, before any state changes


def check_loss_fn(loss_fn: str, loss_fn_config: dict | None) -> dict[str, float]:
    """The loss's config with defaults filled in; ``ValueError`` for an unknown loss or config key."""
    if not isinstance(loss_fn, str) or loss_fn not in LOSS_INPUTS:
        raise ValueError(f"`loss_fn` must be one of {sorted(LOSS_INPUTS)} (or use forward_backward_custom), "
                         f"got {loss_fn!r}")
    if loss_fn_config is not None and not isinstance(loss_fn_config, dict):
        raise TypeError(f"`loss_fn_config` must be a dict or None, got {type(loss_fn_config).__name__}")
    config = dict(LOSS_CONFIG_KEYS[loss_fn])
    unknown = set(loss_fn_config or {}) - set(config)
    if unknown:
        raise ValueError(f"`loss_fn_config` for {loss_fn!r} takes {sorted(config) or 'no keys'}, got unknown "
                         f"{sorted(unknown, key=str)}")
    for key, value in (loss_fn_config or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"`loss_fn_config[{key!r}]` must be a number, got {type(value).__name__}: {value!r}")
        config[key] = float(value)
    if any(not math.isfinite(v) for v in config.values()):
        raise ValueError(f"`loss_fn_config` values must be finite, got {config}")
    if "clip_low_threshold" in config and not 0 <= config["clip_low_threshold"] <= config["clip_high_threshold"]:
        raise ValueError(f"`loss_fn_config` needs 0 <= clip_low_threshold <= clip_high_threshold, got {config}")
    return config


def check_data(data, required: Sequence[str], vocab_size: int | None,
               max_positions: int | None = None) -> list[Datum]:
    """``data`` as a list of ``Datum``, every field checked; ``ValueError``/``TypeError`` naming the datum and
    the field: not a Datum, empty, an input of another length, a required input missing, ids outside the
    vocabulary, a value out of range (see ``MAX_MAGNITUDE``: non-finite in fp32, absurdly large weights or
    advantages, logprobs that are no log-probabilities), a ``model_input`` longer than the model's learned position
    table (``max_positions``)."""
    if isinstance(data, Datum):
        data = [data]
    if not isinstance(data, (list, tuple)) or not data:
        raise ValueError("`data` must be a non-empty list of Datum")
    for i, datum in enumerate(data):
        if not isinstance(datum, Datum):
            raise TypeError(f"`data[{i}]` must be a Datum, got {type(datum).__name__}")
        n = len(datum.model_input)
        if n == 0:
            raise ValueError(f"`data[{i}].model_input` is empty")
        for key in required:
            if key not in datum.loss_fn_inputs:
                raise ValueError(f"`data[{i}].loss_fn_inputs` has no {key!r}, which the loss needs "
                                 f"(it has {sorted(datum.loss_fn_inputs)})")
        for key, arr in datum.loss_fn_inputs.items():
            if len(arr) != n:
                raise ValueError(f"`data[{i}].loss_fn_inputs[{key!r}]` has {len(arr)} values, `model_input` {n}")
            if key != TARGETS:
                _check_range(arr, f"data[{i}].loss_fn_inputs[{key!r}]", key)
        for name, ids in (("model_input", datum.model_input), (f"loss_fn_inputs[{TARGETS!r}]",
                                                               datum.loss_fn_inputs.get(TARGETS))):
            if ids is None:
                continue
            bad = (ids < 0) | (ids >= vocab_size if vocab_size is not None else False)
            if bad.any():
                raise ValueError(f"`data[{i}].{name}` holds id {int(ids[np.argmax(bad)])} outside the vocabulary "
                                 f"[0, {vocab_size})")
    check_positions([len(d) for d in data], max_positions, "data[{i}].model_input",
                    hint="; truncate the sequence (or use a model without a position table)")
    return list(data)


def _check_range(arr: np.ndarray, name: str, key: str) -> None:
    """``ValueError`` naming ``name`` for a value no loss can use: see ``MAX_MAGNITUDE``."""
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(arr) <= _FP32_MAX)
        reason = "a value that is not finite in fp32 (the engines compute in fp32)"
        if not bad.any() and key in ("weights", "advantages"):
            bad = np.abs(arr) > MAX_MAGNITUDE
            reason = f"a value beyond +-{MAX_MAGNITUDE:g} (scale the loss with smaller weights or advantages)"
        if not bad.any() and key == "logprobs":
            bad = (arr > LOGPROB_SLACK) | (arr < LOGPROB_FLOOR)
            reason = (f"a value outside [{LOGPROB_FLOOR:g}, 0]: a log-probability is <= 0, and below {LOGPROB_FLOOR:g} "
                      f"exp() of the log-ratio overflows")
    if bad.any():
        index = int(np.argmax(bad))
        raise ValueError(f"`{name}` holds {reason}: {arr[index]!r} at position {index}")


def check_custom_output(out: Any) -> None:
    """``TypeError`` naming ``fn`` unless a custom loss function's output (``forward_backward_custom``; arrays or
    their abstract shapes) is a pair ``(loss, metrics)``: a scalar loss, and a dict of scalars or None."""
    def shape(x) -> tuple:
        return tuple(getattr(x, "shape", np.shape(x)))

    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(f"`fn` must return a pair (loss, metrics), got {type(out).__name__}")
    loss, metrics = out
    if isinstance(loss, (str, bytes)) or shape(loss) != ():
        raise TypeError(f"`fn` must return a scalar loss (summed over the data), got shape {shape(loss)}")
    if metrics is None:
        return
    if not isinstance(metrics, dict):
        raise TypeError(f"`fn`'s metrics must be a dict of scalars (or None), got {type(metrics).__name__}")
    for key, value in metrics.items():
        if not isinstance(key, str) or isinstance(value, (str, bytes)) or shape(value) != ():
            raise TypeError(f"`fn`'s metrics must map names to scalars; {key!r} holds {value!r}"[:300])


def padded_inputs(data: list[Datum], length: int | None = None) -> dict[str, np.ndarray]:
    """The data as ``[N, L]`` arrays (``L`` = the longest datum, or ``length``), right-padded with zeros, plus
    ``mask`` (1 where a datum has a position): what a custom loss function receives beside the logprobs."""
    length = length or max(len(d) for d in data)
    keys = sorted({k for d in data for k in d.loss_fn_inputs})
    out = {k: np.zeros((len(data), length), np.int64 if k == TARGETS else np.float32) for k in keys}
    out["mask"] = np.zeros((len(data), length), np.float32)
    for i, datum in enumerate(data):
        out["mask"][i, :len(datum)] = 1.0
        for k, v in datum.loss_fn_inputs.items():
            out[k][i, :len(v)] = v
    return out


# ----------------------------------------------------------------------------------------------------------
# The built-in losses, once for both engines


class LossOps(NamedTuple):
    """The array operations the losses need: ``jax.numpy``-like ``exp``, ``minimum``, ``clip``, ``sum`` and a
    ``stop_gradient``."""

    exp: Callable
    minimum: Callable
    clip: Callable
    sum: Callable
    stop_gradient: Callable


def builtin_loss(ops: LossOps, loss_fn: str, logp, inputs: dict[str, Any], config: dict[str, float]):
    """The summed loss of ``loss_fn`` from per-token ``logp`` (the trained model's log-probability of each target)
    and the datum arrays ``inputs`` (same shape; positions outside any datum hold zero weights and advantages).

    ``cross_entropy`` ``-sum(w * logp)``; ``importance_sampling`` ``-sum(exp(logp - logp_sampler) * A)``; ``ppo``
    ``-sum(min(r * A, clip(r, lo, hi) * A))``; ``cispo`` ``-sum(stopgrad(clip(r, lo, hi)) * A * logp)``."""
    if loss_fn == "cross_entropy":
        return -ops.sum(inputs["weights"] * logp)
    advantages = inputs["advantages"]
    ratio = ops.exp(logp - inputs["logprobs"])
    if loss_fn == "importance_sampling":
        return -ops.sum(ratio * advantages)
    clipped = ops.clip(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    if loss_fn == "ppo":
        return -ops.sum(ops.minimum(ratio * advantages, clipped * advantages))
    if loss_fn == "cispo":
        return -ops.sum(ops.stop_gradient(clipped) * advantages * logp)
    raise ValueError(f"unknown loss {loss_fn!r}")


RL_LOSSES = ("importance_sampling", "ppo", "cispo")  # the losses with a sampler's logprobs and advantages


def loss_metrics(loss_fn: str, data: Sequence[Datum], logprobs: Sequence, config: dict[str, float]) -> dict[str, float]:
    """Diagnostics of an importance-sampled loss, in float64 on the host, over the **trained tokens** — the positions
    whose advantage is non-zero — of ``data``, with ``logprobs`` the trainer's per-datum logprobs (what
    ``forward_backward`` returns). ``{}`` for ``cross_entropy``. With ``d = logp - logp_sampler`` and ``r = exp(d)``:

    * ``"log_ratio_abs:mean"``: the mean ``|d|`` (0 on fresh samples: the sampler's logprobs are the trainer's);
    * ``"kl_sampler:mean"``: ``KL(sampler || trainer)`` per token, the non-negative, unbiased estimator
      ``mean(r - 1 - d)`` ("k3"; exact in expectation only when the tokens were drawn at temperature 1 without
      top-k/top-p, since the logprobs are the temperature-1 policy's);
    * ``"clip_fraction:mean"`` (``ppo``, ``cispo``): the fraction of tokens the clip acts on — ``ppo``: the clipped
      term wins the ``min`` and the token's gradient is zero (``r > hi`` with ``A > 0``, ``r < lo`` with ``A < 0``);
      ``cispo``: the weight ``clip(r, lo, hi)`` differs from ``r``;
    * ``"trained_tokens:sum"``: how many tokens these means are over (to weight them across calls).
    """
    if loss_fn not in RL_LOSSES:
        return {}
    d, adv = [], []
    for datum, lp in zip(data, logprobs):
        a = datum.loss_fn_inputs["advantages"]
        on = a != 0
        d.append(np.asarray(lp, np.float64)[on] - datum.loss_fn_inputs["logprobs"][on])
        adv.append(a[on])
    d, adv = np.concatenate(d), np.concatenate(adv)
    n = len(d)
    if n == 0:
        return {"trained_tokens:sum": 0.0}
    ratio = np.exp(d)
    out = {"log_ratio_abs:mean": float(np.mean(np.abs(d))), "kl_sampler:mean": float(np.mean(ratio - 1.0 - d)),
           "trained_tokens:sum": float(n)}
    lo, hi = config.get("clip_low_threshold"), config.get("clip_high_threshold")
    if loss_fn == "ppo":
        out["clip_fraction:mean"] = float(np.mean(((ratio > hi) & (adv > 0)) | ((ratio < lo) & (adv < 0))))
    elif loss_fn == "cispo":
        out["clip_fraction:mean"] = float(np.mean((ratio > hi) | (ratio < lo)))
    return out


def samples_to_data(output, advantages: Sequence | None = None) -> list[Datum]:
    """The data of a ``GenerationOutput`` from ``trainer.sample(...)`` (or ``generate(..., return_logprobs=True)``):
    one ``Datum`` per row — its prompt and completion, the sampler's logprobs, and ``advantages[row]`` (a number or
    one per completion token; ``None`` for losses that take none)."""
    if getattr(output, "logprobs", None) is None:
        raise ValueError("`output` holds no logprobs: sample with trainer.sample(...) or generate(..., "
                         "return_logprobs=True)")
    return make_data(output.prompt_ids, output.sequences, logprobs=output.logprobs, advantages=advantages)
