"""Either engine's trainer, built one way in every test, and its trained weights read by Hugging Face name."""

from __future__ import annotations

import os

BACKENDS = ("jax", "torch")
# Settings most tests use: small micro-batches, a visible learning rate, no remat, a log per update, no reporters.
FAST = {"per_device_train_batch_size": 2, "learning_rate": 1e-3, "gradient_checkpointing": False,
        "logging_steps": 1, "report_to": "none"}


# Keyword arguments of the trainer itself; every other keyword goes to IterativeSFTConfig.
TRAINER_KWARGS = ("eval_dataset", "compute_metrics", "preprocess_logits_for_metrics", "callbacks", "optimizers",
                  "peft_config", "data_collator")


def make_trainer(backend: str, model, tokenizer=None, output_dir: str | os.PathLike = "out", *, fast: bool = False,
                 **config):
    """``IterativeSFTTrainer(model, args=IterativeSFTConfig(output_dir, **config), backend=backend, ...)``; ``fast``
    starts ``config`` from ``FAST`` (without it, the config's own defaults — TRL's — apply)."""
    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer

    extra = {k: config.pop(k) for k in TRAINER_KWARGS if k in config}
    args = IterativeSFTConfig(output_dir=str(output_dir), **({**FAST, **config} if fast else config))
    return IterativeSFTTrainer(model, args=args, processing_class=tokenizer, backend=backend, **extra)


def trained_state_dict(trainer) -> dict:
    """The trainer's current weights as ``{HF name: torch.Tensor}`` (fp32): the torch engine's model in place,
    the JAX engine's parameters through its family's HF table (tied weights once, as HF saves them)."""
    import torch

    if trainer.args.backend == "torch":
        return {k: v.detach().clone().float() for k, v in trainer.model.state_dict().items()}
    import jax
    import numpy as np
    from flax import nnx

    from itersft_jax.models import get_family

    params = jax.device_get(nnx.to_pure_dict(trainer.params))
    tensors = get_family(trainer.config.model_type).params_to_hf(params, trainer.config)
    return {k: torch.from_numpy(np.asarray(v, dtype=np.float32).copy()) for k, v in tensors.items()}
