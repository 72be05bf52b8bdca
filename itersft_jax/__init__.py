"""itersft: TRL's IterativeSFTTrainer, JAX-first, with a PyTorch backend behind the same ``step()`` API.

The package namespace is lazy: ``import itersft_jax`` (or ``itersft_jax.config`` / ``itersft_jax.data``)
imports neither jax nor torch; the engines are imported when first used.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["IterativeSFTConfig", "IterativeSFTTrainer", "JaxIterativeSFTTrainer", "__version__"]


def __getattr__(name: str):
    if name == "IterativeSFTConfig":
        from .config import IterativeSFTConfig

        return IterativeSFTConfig
    if name == "IterativeSFTTrainer":
        from .facade import IterativeSFTTrainer

        return IterativeSFTTrainer
    if name == "JaxIterativeSFTTrainer":
        from .trainer import IterativeSFTTrainer

        return IterativeSFTTrainer
    raise AttributeError(f"module 'itersft_jax' has no attribute {name!r}")
