"""itersft's PyTorch backend: ``IterativeSFTTrainer`` on ``transformers.Trainer``. Never imports jax."""

from __future__ import annotations

__all__ = ["IterativeSFTConfig", "IterativeSFTTrainer"]


def __getattr__(name: str):
    if name == "IterativeSFTConfig":
        from itersft_jax.shared.config import IterativeSFTConfig

        return IterativeSFTConfig
    if name == "IterativeSFTTrainer":
        from itersft_torch.trainer import IterativeSFTTrainer

        return IterativeSFTTrainer
    raise AttributeError(f"module 'itersft_torch' has no attribute {name!r}")
