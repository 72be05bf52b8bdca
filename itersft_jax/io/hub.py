"""``push_to_hub`` for the JAX engine through ``huggingface_hub``: the repository, the model card, the uploads.

It follows ``transformers.Trainer``: ``args.push_to_hub`` pushes the model files of every checkpoint the cadence
writes (non-blocking, like ``hub_strategy="every_save"``; ``"checkpoint"`` / ``"all_checkpoints"`` also upload
the whole checkpoint to ``last-checkpoint`` / ``checkpoint-N``; ``"end"`` only at ``trainer.push_to_hub()``), and
``trainer.push_to_hub()`` saves the model and a model card to ``output_dir`` and uploads that folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from itersft_jax.shared.fields import enum_name
from itersft_jax.shared.weight_files import FLAX_ALLOW_PATTERNS, MODEL_DIR_PATTERNS

# The Hugging Face model directory inside a checkpoint: what a checkpoint push uploads to the repository root.
MODEL_FILES = [*MODEL_DIR_PATTERNS, *FLAX_ALLOW_PATTERNS]


class HubPusher:
    """The repository of ``args.hub_model_id`` (created on first use) and the uploads in flight."""

    def __init__(self, args):
        self.args = args
        self.repo_id: str | None = None
        self._jobs: list = []

    @staticmethod
    def api():
        from huggingface_hub import HfApi

        from itersft_jax._version import __version__
        return HfApi(library_name="itersft", library_version=__version__)

    def ensure_repo(self, token: str | None = None, private: bool | None = None) -> str:
        if self.repo_id is None:
            name = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
            private = self.args.hub_private_repo if private is None else private
            url = self.api().create_repo(name, token=token or self.args.hub_token, private=private, exist_ok=True)
            self.repo_id = url.repo_id
        return self.repo_id

    def pushes_checkpoints(self) -> bool:
        return enum_name(self.args.hub_strategy) != "end"

    def push_checkpoint(self, checkpoint_dir: str, step: int) -> None:
        """Upload the checkpoint's model files to the repository root (and, per ``hub_strategy``, the whole
        checkpoint), without waiting: :meth:`wait` finishes it."""
        args, api, repo = self.args, self.api(), self.ensure_repo()
        message = f"Training in progress, step {step}"
        common = dict(repo_id=repo, folder_path=checkpoint_dir, token=args.hub_token, revision=args.hub_revision,
                      run_as_future=True)
        jobs = [api.upload_folder(commit_message=message, allow_patterns=MODEL_FILES, **common)]
        strategy = enum_name(args.hub_strategy)
        if strategy in ("checkpoint", "all_checkpoints"):
            path = "last-checkpoint" if strategy == "checkpoint" else os.path.basename(checkpoint_dir)
            jobs.append(api.upload_folder(commit_message=message + ", checkpoint", path_in_repo=path, **common))
        self._jobs = jobs

    def wait(self) -> None:
        """Finish the uploads in flight (raising their errors)."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.result()

    def push_folder(self, folder: str, *, commit_message: str | None, token: str | None, revision: str | None,
                    private: bool | None, blocking: bool):
        self.wait()
        repo = self.ensure_repo(token=token, private=private)
        return self.api().upload_folder(
            repo_id=repo, folder_path=folder, commit_message=commit_message, token=token or self.args.hub_token,
            revision=revision or self.args.hub_revision, run_as_future=not blocking,
            ignore_patterns=["_*", "checkpoint-*", "checkpoint-*/**", "runs/**"])


def write_model_card(args, hf_config, log_history: list[dict], *, language=None, license=None, tags=None,
                     model_name=None, finetuned_from=None) -> str:
    """``output_dir/README.md``: YAML metadata and a summary of the training (hyper-parameters, last logs)."""
    from huggingface_hub import ModelCard, ModelCardData

    source = getattr(hf_config, "_name_or_path", "") or ""
    if finetuned_from is None and source and not os.path.isdir(source):
        finetuned_from = source  # a hub id: the base model
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    tags += [t for t in ("itersft", "iterative-sft", "jax", "flax") if t not in tags]
    model_name = model_name or args.hub_model_id or Path(args.output_dir).absolute().name
    data = ModelCardData(language=language, license=license, library_name="transformers", tags=tags,
                         base_model=finetuned_from)
    hyper = {"learning_rate": args.learning_rate, "per_device_train_batch_size": args.per_device_train_batch_size,
             "gradient_accumulation_steps": args.gradient_accumulation_steps, "optim": enum_name(args.optim),
             "lr_scheduler_type": enum_name(args.lr_scheduler_type), "warmup_steps": args.warmup_steps,
             "max_steps": args.max_steps, "max_length": args.max_length, "seed": args.seed, "bf16": args.bf16}
    logs = [e for e in log_history if "loss" in e or "eval_loss" in e][-10:]
    lines = [f"# {model_name}", "",
             f"Fine-tuned{' from ' + finetuned_from if finetuned_from else ''} with itersft's IterativeSFTTrainer "
             "(JAX engine): the user's loop generates, filters and calls `trainer.step(...)` on what survived.", "",
             "## Training hyper-parameters", ""] + [f"- {k}: {v}" for k, v in hyper.items()]
    if logs:
        lines += ["", "## Last logs", "", "| step | loss | eval_loss |", "|---|---|---|"]
        lines += [f"| {e.get('step')} | {e.get('loss', '')} | {e.get('eval_loss', '')} |" for e in logs]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "README.md")
    card.save(path)
    return path
