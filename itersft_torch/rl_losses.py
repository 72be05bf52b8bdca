"""The low-level API's losses on the PyTorch engine: the formulas of ``itersft_jax.shared.datum.builtin_loss`` on
torch tensors (mirror of ``itersft_jax.core.rl_losses``), from per-token logprobs in fp32 (``log_softmax`` of the
model's logits)."""

from __future__ import annotations

import torch

from itersft_jax.shared.datum import FLOAT_INPUTS, LOGPROBS_ONLY, TARGETS, LossOps, builtin_loss, padded_inputs

TORCH_OPS = LossOps(exp=torch.exp, minimum=torch.minimum, clip=torch.clamp, sum=torch.sum,
                    stop_gradient=torch.Tensor.detach)


def token_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` per position, fp32 ``[B, T]``."""
    logp_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    return logp_BTV.gather(-1, targets_BT[..., None]).squeeze(-1)


def datum_loss(logits_BTV: torch.Tensor, data: list, loss_fn: str, config: dict):
    """``(summed loss, per-token logprobs [B, T])`` of right-padded data whose logits are ``logits_BTV``; padding
    positions carry zero weights and advantages."""
    arrays = padded_inputs(data, length=logits_BTV.shape[1])
    device = logits_BTV.device
    logp_BT = token_logprobs(logits_BTV, torch.from_numpy(arrays[TARGETS]).to(device))
    if loss_fn == LOGPROBS_ONLY:
        return logp_BT.new_zeros(()), logp_BT
    inputs = {k: torch.from_numpy(arrays[k]).to(device) for k in FLOAT_INPUTS if k in arrays}
    return builtin_loss(TORCH_OPS, loss_fn, logp_BT, inputs, config), logp_BT
