"""Torch-side implementations of ``TrainingArguments`` fields that ``transformers.Trainer`` only applies inside
``Trainer.train()``, which ``step()`` never calls: NEFTune and Liger kernels. (``torch_compile`` needs nothing
here: accelerate compiles the model that ``step()`` runs when the trainer is built.)

``StepFeatures(model, args)`` is built once by the trainer's constructor; ``step()`` wraps each training
forward in ``features.noise(attention_mask_BT)``.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch


def _input_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """The embedding module of the model's input ids: the encoder's for an encoder-decoder model (BART's
    ``get_input_embeddings()`` is the decoder's, a different module with tied weights)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if get is not None else None
    if not isinstance(embeddings, torch.nn.Module):
        raise ValueError(f"`neftune_noise_alpha`: {type(model).__name__} has no get_input_embeddings() module to "
                         "add noise to")
    return embeddings


class NEFTune:
    """Noisy embeddings (Jain et al. 2023, https://arxiv.org/abs/2310.05914) on the input embeddings of
    ``step()``'s forwards only.

    Each sample's embeddings get uniform noise in ``[-m, m]`` with ``m = alpha / sqrt(L * d)``, ``L`` the
    sample's own length (its attended tokens) and ``d`` the embedding width — the paper's scale; for
    encoder-decoder models, the encoder's input embeddings. transformers'
    hook uses the padded batch length instead, which makes the noise depend on how samples are batched (and
    would differ between the torch backend's padded micro-batches and the JAX engine's packed rows). Padding
    positions get no noise.

    The hook is registered once, and adds noise only inside ``active(mask)``: ``generate()`` and
    ``evaluate()`` run the same module without noise whatever its train/eval mode.
    """

    def __init__(self, model: torch.nn.Module, alpha: float):
        if not alpha > 0:
            raise ValueError(f"`neftune_noise_alpha` must be > 0 (or None), got {alpha}")
        self.alpha = float(alpha)
        self._mask_BT: torch.Tensor | None = None
        self._fired = False
        self._handle = _input_embeddings(model).register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs, embeds_BTD: torch.Tensor) -> torch.Tensor | None:
        mask_BT = self._mask_BT
        if mask_BT is None:  # outside step()
            return None
        self._mask_BT = None  # once per forward: a module shared with a decoder sees the input ids first
        self._fired = True
        if embeds_BTD.shape[:2] != mask_BT.shape:
            raise ValueError(f"`neftune_noise_alpha`: input embeddings of shape {tuple(embeds_BTD.shape)} do not "
                             f"match the attention mask {tuple(mask_BT.shape)}")
        mask_BT = mask_BT.to(embeds_BTD.dtype)
        lengths_B = mask_BT.sum(dim=1).clamp(min=1)
        magnitude_B = self.alpha / torch.sqrt(lengths_B * embeds_BTD.shape[-1])
        noise_BTD = torch.empty_like(embeds_BTD).uniform_(-1.0, 1.0)
        return embeds_BTD + noise_BTD * (magnitude_B[:, None, None] * mask_BT[..., None])

    @contextlib.contextmanager
    def active(self, attention_mask_BT: torch.Tensor) -> Iterator[None]:
        self._mask_BT, self._fired = attention_mask_BT, False
        try:
            yield
        finally:
            self._mask_BT = None
        if not self._fired:
            raise RuntimeError("`neftune_noise_alpha`: the forward never called the model's input embeddings, "
                               "so no noise was added")

    def remove(self) -> None:
        self._handle.remove()


def apply_liger_kernel(model: torch.nn.Module, args) -> None:
    """Patch Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, ...) into ``model``, or raise naming the field.

    Liger's kernels run on CUDA GPUs only (on a CPU the first kernel launch fails inside Triton), and Liger
    skips model types it does not know with an info log; both are refused here instead. ``step()`` computes
    its token-weighted loss from the logits, so Liger's fused linear cross-entropy (used only when the model
    is called with labels) does not run.
    """
    if importlib.util.find_spec("liger_kernel") is None:
        raise ImportError("`use_liger_kernel=True` needs the liger-kernel package: pip install 'itersft[liger]' "
                          "(or pip install liger-kernel)")
    if args.device.type != "cuda":
        raise ValueError(f"`use_liger_kernel=True` needs a CUDA GPU (Liger's kernels are Triton kernels); this "
                         f"trainer runs on {args.device.type}. Unset it on this machine.")
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    from transformers import PreTrainedModel
    from transformers.integrations.liger import apply_liger_kernel as hf_apply
    from transformers.trainer_utils import unwrap_peft_model

    base = unwrap_peft_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if not isinstance(base, PreTrainedModel) or model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"`use_liger_kernel=True`: Liger has no kernels for {type(base).__name__} "
                         f"(model_type {model_type!r}); unset it for this model")
    hf_apply(model, args.liger_kernel_config)


class StepFeatures:
    """The torch-side features of one trainer, set up on its model before accelerate wraps it."""

    def __init__(self, model: torch.nn.Module, args):
        if getattr(args, "use_liger_kernel", False):
            apply_liger_kernel(model, args)
        alpha = getattr(args, "neftune_noise_alpha", None)
        self.neftune = NEFTune(model, alpha) if alpha is not None else None

    def noise(self, attention_mask_BT: torch.Tensor) -> contextlib.AbstractContextManager:
        """Around one training forward of ``step()``: NEFTune's noise on its input embeddings, if asked for."""
        return self.neftune.active(attention_mask_BT) if self.neftune is not None else contextlib.nullcontext()
