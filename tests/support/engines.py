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


def fingerprint(trainer) -> str:
    """SHA-256 of everything a trainer call may change: parameters, optimizer (and schedule) state, the low-level
    accumulator and its bookkeeping, the counters, the RNG and the unseeded-generation counter. Equal fingerprints:
    the trainer is bit-identical."""
    import hashlib
    import json

    import numpy as np

    digest = hashlib.sha256()

    def add(array) -> None:
        array = np.ascontiguousarray(np.asarray(array))
        digest.update(str((array.dtype, array.shape)).encode())
        digest.update(array.tobytes())

    pending = trainer.flow.pending
    counters = dict(trainer.counters())  # without the wall times of the logs: they differ between equal runs
    counters["log_history"] = [{k: v for k, v in entry.items() if "second" not in k}
                               for entry in counters.get("log_history", [])]
    digest.update(json.dumps([counters, trainer.flow.generate_calls, trainer.state.global_step,
                              None if pending is None else vars(pending)], sort_keys=True, default=str).encode())
    if trainer.args.backend == "torch":
        import torch

        for name, tensor in trainer.model.state_dict().items():
            digest.update(name.encode())
            add(tensor.detach().float().cpu().numpy())
        for p in trainer.model.parameters():
            add(np.zeros(0) if p.grad is None else p.grad.detach().float().cpu().numpy())
        for tree in (trainer.optimizer.state_dict(), trainer.lr_scheduler.state_dict()):
            _hash_tree(tree, digest)
        add(torch.get_rng_state().numpy())
        return digest.hexdigest()
    import jax

    state = trainer.train_state
    for leaf in jax.tree.leaves(jax.device_get((state.params, state.opt_state, state.step,
                                               jax.random.key_data(state.rng)))):
        add(leaf)
    for leaf in jax.tree.leaves(jax.device_get(trainer.engine._grads)) if trainer.engine._grads is not None else ():
        add(leaf)
    return digest.hexdigest()


def _hash_tree(tree, digest) -> None:
    """Feed a state dict (tensors, numbers, nested dicts and lists) into ``digest``."""
    import torch

    if isinstance(tree, dict):
        for key, value in sorted(tree.items(), key=lambda kv: str(kv[0])):
            digest.update(repr(key).encode())
            _hash_tree(value, digest)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            _hash_tree(value, digest)
    elif isinstance(tree, torch.Tensor):
        digest.update(tree.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        digest.update(repr(tree).encode())
