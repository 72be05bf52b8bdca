"""``IterativeSFTTrainer(..., backend="jax" | "torch")``: one constructor, two engines."""

from __future__ import annotations

from itersft_jax.shared.config import BACKENDS, resolve_config


class IterativeSFTTrainer:
    """TRL's constructor signature plus ``callbacks`` and ``backend``; returns the engine's trainer.

    ``backend`` picks the engine; when omitted, ``args.backend`` does (default ``"jax"``), so a command
    line built on ``HfArgumentParser(IterativeSFTConfig)`` can choose it with ``--backend``. The JAX
    engine is never imported for ``backend="torch"``.
    """

    def __new__(cls, model, args=None, data_collator=None, eval_dataset=None, processing_class=None,
                optimizers=(None, None), preprocess_logits_for_metrics=None, compute_metrics=None, callbacks=None,
                *, backend: str | None = None, **kwargs):
        args = resolve_config(args)
        backend = backend if backend is not None else args.backend
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
        if backend != args.backend:
            args.backend = backend
        if backend == "torch":
            from itersft_torch import IterativeSFTTrainer as engine
        else:
            from itersft_jax.trainer import IterativeSFTTrainer as engine
        return engine(model, args=args, data_collator=data_collator, eval_dataset=eval_dataset,
                      processing_class=processing_class, optimizers=optimizers,
                      preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                      compute_metrics=compute_metrics, callbacks=callbacks, **kwargs)
