"""itersft: TRL's IterativeSFTTrainer, JAX-first, with a PyTorch backend behind the same ``step()`` API.

The package namespace is lazy: ``import itersft_jax`` (or ``itersft_jax.shared.config`` / ``itersft_jax.shared.data``)
imports neither jax nor torch; the engines are imported when first used. The layers are sub-packages
(``docs/architecture.md``).
"""

from __future__ import annotations

from itersft_jax._version import __version__

__all__ = ["Datum", "IterativeSFTConfig", "IterativeSFTTrainer", "JaxIterativeSFTTrainer", "__version__"]


def __getattr__(name: str):
    if name == "Datum":
        from itersft_jax.shared.datum import Datum

        return Datum
    if name == "IterativeSFTConfig":
        from itersft_jax.shared.config import IterativeSFTConfig

        return IterativeSFTConfig
    if name == "IterativeSFTTrainer":
        from itersft_jax.facade import IterativeSFTTrainer

        return IterativeSFTTrainer
    if name == "JaxIterativeSFTTrainer":
        from itersft_jax.trainer import IterativeSFTTrainer

        return IterativeSFTTrainer
    raise AttributeError(f"module 'itersft_jax' has no attribute {name!r}")
