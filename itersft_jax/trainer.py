"""The JAX ``IterativeSFTTrainer``: a thin stateful shell around the pure ``train_step``.

The shell owns what is not pure: the call counter that seeds shuffling, the host-side data pipeline
(``itersft_jax.data``), logging, checkpoints and the progress bar. Each optimizer update is one call of
the single jitted ``train_step``; metrics stay on the device until the whole ``step()`` call has been
dispatched, so the host never waits on the device inside the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm
from transformers import TrainerState

from .config import resolve_config
from .data import bucket_length, count_label_tokens, plan_updates, prepare_examples
from .optim import resolve_optimizer
from .packing import pack_update, rows_per_micro_batch
from .train_step import TrainState, make_eval_step, make_train_step
from .weights import load_model, save_pretrained

logger = logging.getLogger(__name__)

PROGRESS_BAR_MIN_UPDATES = 8  # a call making at least this many updates shows a tqdm bar


class IterativeSFTTrainer:
    """Iterative SFT on the JAX engine, with TRL's constructor signature.

    ``model``: a hub id, a local HF directory, or a ``transformers.PreTrainedModel`` (its weights are
    copied). ``processing_class`` defaults to the tokenizer stored with the model. ``optimizers`` takes
    ``(optax_transformation, schedule_or_None)``; by default the optimizer and schedule follow ``args``
    like ``transformers.Trainer``. ``data_collator`` is accepted for signature compatibility and unused:
    the shared data layer pads. ``eval_dataset``, ``compute_metrics`` and ``preprocess_logits_for_metrics``
    are kept on the trainer for the user's own evaluation.
    """

    def __init__(self, model, args=None, data_collator=None, eval_dataset=None, processing_class=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None, compute_metrics=None):
        self.args = resolve_config(args)
        self.data_collator = data_collator
        self.eval_dataset = eval_dataset
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.compute_metrics = compute_metrics

        self.compute_dtype = jnp.bfloat16 if self.args.bf16 else jnp.float32
        # fp32 compute means fp32 matmuls: XLA on GPUs would otherwise use TF32 (measured on an H100: 3e-4
        # max logit difference against torch fp32, 2e-7 with "highest"). `tf32=True` opts back in.
        self.matmul_precision = None if (self.args.bf16 or self.args.tf32) else "highest"
        module, self.config = load_model(model, dtype=self.compute_dtype, remat=bool(self.args.gradient_checkpointing),
                                         model_init_kwargs=self.args.model_init_kwargs)
        self.processing_class = processing_class if processing_class is not None else _load_tokenizer(model)
        self.graphdef, params = nnx.split(module, nnx.Param)

        self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec(None, "data"))
        self.micro_batch_size = self.args.per_device_train_batch_size * self.mesh.size

        num_training_steps = self.args.max_steps if self.args.max_steps > 0 else None
        self.tx, self.schedule = resolve_optimizer(self.args, params, optimizers, num_training_steps)
        self.train_state = jax.device_put(TrainState.create(params, self.tx, seed=self.args.seed),
                                          self._replicated)
        self._train_step = make_train_step(self.graphdef, self.tx, self.schedule,
                                           state_sharding=self._replicated, batch_sharding=self._batch_sharding,
                                           label_smoothing=self.args.label_smoothing_factor)

        self.state = TrainerState()  # TRL-compatible: global_step, log_history
        # Packed row length: the bucket of the longest sample seen so far. It only grows, so a run whose
        # lengths wander compiles once per new maximum, not once per call.
        self._row_length = 0
        self._eval_step = None  # jitted on the first evaluate()
        # Rows per device and micro-batch: on CPUs, small groups of rows (cheap to skip when empty, and a
        # 512-token GEMM is already efficient there); on accelerators, per_device_train_batch_size rows —
        # the user's memory budget, and big enough GEMMs to keep the chip busy.
        on_cpu = jax.devices()[0].platform == "cpu"
        self._rows_per_device = None if on_cpu else self.args.per_device_train_batch_size
        self._calls = 0
        self._log_window: list[tuple[float, int]] = []  # (loss, tokens) since the last log
        self._warned_max_steps = False

    # ------------------------------------------------------------------------------------------------------
    # Parameters

    @property
    def params(self) -> nnx.State:
        """The current parameters (on device; no copy)."""
        return self.train_state.params

    @property
    def model(self) -> nnx.Module:
        """An NNX module holding the current parameters (shares their buffers)."""
        return nnx.merge(self.graphdef, self.train_state.params)

    # ------------------------------------------------------------------------------------------------------
    # Training

    def step(self, input_ids=None, attention_mask=None, labels=None, texts=None, texts_labels=None,
             prompts=None, completions=None) -> dict[str, Any]:
        """Train on one batch of samples; see the README's step() contract. Returns the call's statistics."""
        start = time.perf_counter()
        examples = prepare_examples(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, texts=texts,
            texts_labels=texts_labels, prompts=prompts, completions=completions,
            tokenizer=self.processing_class, max_length=self.args.max_length,
            truncation_mode=self.args.truncation_mode, vocab_size=self.config.vocab_size)
        updates = plan_updates(examples, micro_batch_size=self.micro_batch_size,
                               gradient_accumulation_steps=self.args.gradient_accumulation_steps,
                               seed=self.args.seed, call_index=self._calls)
        self._calls += 1
        self._check_max_steps(len(updates))

        pad_id = self.processing_class.pad_token_id if self.processing_class is not None else None
        pad_id = 0 if pad_id is None else pad_id
        pending = []  # device metrics, read once every update of the call is dispatched
        real_tokens = padded_tokens = 0
        bar = tqdm(total=len(updates), desc="step", unit="update", leave=False,
                   disable=len(updates) < PROGRESS_BAR_MIN_UPDATES or self.args.disable_tqdm)
        # Every update of the call has one shape, [A, R, T]: its samples packed into rows of T tokens (see
        # packing.py); A * R rows hold any update of micro_batch_size * accumulation samples.
        longest = max(len(ex.input_ids) for update in updates for mb in update for ex in mb)
        self._row_length = max(self._row_length, bucket_length(longest, self.args.max_length))
        rows = rows_per_micro_batch(self._row_length, self.mesh.size, self._rows_per_device)
        num_micro = math.ceil(self.micro_batch_size * self.args.gradient_accumulation_steps / rows)
        for update in updates:
            batch, used = pack_update(update, row_length=self._row_length, rows=rows,
                                      num_micro_batches=num_micro, pad_id=pad_id)
            real_tokens += int(np.count_nonzero(batch["attention_mask"]))
            padded_tokens += used * rows * self._row_length  # computed tokens; empty micro-batches are skipped
            batch = jax.device_put(batch, self._batch_sharding)
            with self._precision():
                self.train_state, metrics = self._train_step(self.train_state, batch)
            pending.append((metrics, count_label_tokens(update)))
            self.state.global_step += 1
            if self._should_save():
                self.save_checkpoint()
            bar.update(1)
        bar.close()

        host = jax.device_get([m for m, _ in pending])  # the one sync of the call
        first_step = self.state.global_step - len(updates) + 1
        for i, m in enumerate(host):
            self._log_window.append((float(m["loss"]), int(m["num_tokens"])))
            if (first_step + i) % max(1, int(self.args.logging_steps)) == 0:
                self._log(first_step + i, m)
        seconds = time.perf_counter() - start
        tokens = sum(int(m["num_tokens"]) for m in host)
        loss = sum(float(m["loss"]) * int(m["num_tokens"]) for m in host) / max(tokens, 1)
        self.state.num_input_tokens_seen = (self.state.num_input_tokens_seen or 0) + real_tokens
        return {
            "loss": loss,
            "learning_rate": float(host[-1]["learning_rate"]),
            "grad_norm": float(host[-1]["grad_norm"]),
            "num_tokens": tokens,
            "samples": len(examples),
            "updates": len(updates),
            "global_step": self.state.global_step,
            "seconds": seconds,
            "tokens_per_second": real_tokens / seconds if seconds > 0 else math.inf,
            "padded_tokens": padded_tokens,
        }

    def evaluate(self, eval_dataset=None, *, input_ids=None, attention_mask=None, labels=None, texts=None,
                 prompts=None, completions=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Token-weighted mean cross-entropy on held-out samples, without changing anything.

        Pass the samples in any ``step()`` input form, or an ``eval_dataset`` (default: the trainer's)
        — a dict or ``datasets.Dataset`` with columns named like ``step()``'s arguments (``input_ids``
        [+ ``attention_mask``, ``labels``], ``texts``/``text``, or ``prompts``/``prompt`` +
        ``completions``/``completion``). Returns ``{prefix}_loss``, ``{prefix}_num_tokens``,
        ``{prefix}_samples`` and ``{prefix}_seconds``, also appended to ``state.log_history``.
        """
        start = time.perf_counter()
        forms = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, texts=texts,
                     prompts=prompts, completions=completions)
        if all(v is None for v in forms.values()):
            forms = _dataset_forms(eval_dataset if eval_dataset is not None else self.eval_dataset)
        examples = prepare_examples(**forms, tokenizer=self.processing_class, max_length=self.args.max_length,
                                    truncation_mode=self.args.truncation_mode, vocab_size=self.config.vocab_size)
        if self._eval_step is None:
            self._eval_step = make_eval_step(self.graphdef, batch_sharding=self._batch_sharding,
                                             label_smoothing=self.args.label_smoothing_factor)
        pad_id = getattr(self.processing_class, "pad_token_id", None) or 0
        longest = max(len(ex.input_ids) for ex in examples)
        row_length = max(self._row_length, bucket_length(longest, self.args.max_length))
        rows = rows_per_micro_batch(row_length, self.mesh.size, self._rows_per_device)
        per_batch = self.micro_batch_size * self.args.gradient_accumulation_steps
        num_micro = math.ceil(per_batch / rows)
        pending = []
        for i in range(0, len(examples), per_batch):
            batch, _ = pack_update([examples[i:i + per_batch]], row_length=row_length, rows=rows,
                                   num_micro_batches=num_micro, pad_id=pad_id)
            batch = jax.device_put(batch, self._batch_sharding)
            with self._precision():
                pending.append(self._eval_step(self.train_state.params, batch))
        host = jax.device_get(pending)
        loss_sum = sum(float(m["loss_sum"]) for m in host)
        tokens = sum(int(m["num_tokens"]) for m in host)
        metrics = {f"{metric_key_prefix}_loss": loss_sum / max(tokens, 1),
                   f"{metric_key_prefix}_num_tokens": tokens, f"{metric_key_prefix}_samples": len(examples),
                   f"{metric_key_prefix}_seconds": time.perf_counter() - start}
        self.state.log_history.append({**metrics, "step": self.state.global_step})
        return metrics

    def _check_max_steps(self, num_updates: int) -> None:
        max_steps = self.args.max_steps
        if max_steps > 0 and self.state.global_step + num_updates > max_steps and not self._warned_max_steps:
            self._warned_max_steps = True
            logger.warning("step(): max_steps=%d is reached; further updates use the schedule's value past "
                           "its end (0 for linear/cosine decay). Raise max_steps or use max_steps=-1 "
                           "(warmup then constant) for open-ended iterative training.", max_steps)

    def _should_save(self) -> bool:
        args = self.args
        return (str(getattr(args.save_strategy, "value", args.save_strategy)) == "steps" and args.save_steps
                and self.state.global_step % int(args.save_steps) == 0)

    def _log(self, global_step: int, metrics: dict) -> None:
        tokens = sum(n for _, n in self._log_window)
        loss = sum(loss * n for loss, n in self._log_window) / max(tokens, 1)
        self._log_window = []
        entry = {"loss": loss, "learning_rate": float(metrics["learning_rate"]),
                 "grad_norm": float(metrics["grad_norm"]), "num_tokens": tokens, "step": global_step}
        self.state.log_history.append(entry)
        logger.info("step %d: %s", global_step, entry)

    # ------------------------------------------------------------------------------------------------------
    # Saving and generation

    def save_model(self, output_dir: str | None = None, max_shard_size: str | int = "5GB") -> str:
        """Write an HF directory (config, safetensors, tokenizer, generation config) that
        ``AutoModelForCausalLM.from_pretrained`` loads."""
        output_dir = output_dir or self.args.output_dir
        return save_pretrained(self.train_state.params, self.config, output_dir, tokenizer=self.processing_class,
                               max_shard_size=max_shard_size)

    def save_checkpoint(self, checkpoint_dir: str | None = None) -> str:
        """A full checkpoint (HF model directory + orbax train state + counters), by default
        ``output_dir/checkpoint-<global_step>``; older ones beyond ``save_total_limit`` are removed.
        ``save_steps`` calls this."""
        from .checkpoint import rotate_checkpoints, save_checkpoint

        checkpoint_dir = checkpoint_dir or os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        path = save_checkpoint(self, checkpoint_dir)
        rotate_checkpoints(self.args.output_dir, self.args.save_total_limit)
        return path

    def resume_from_checkpoint(self, checkpoint_dir: str | bool = True) -> str:
        """Restore parameters, optimizer state, step and call counters from a checkpoint directory (``True``:
        the latest ``checkpoint-N`` under ``output_dir``), so the run continues exactly where it was."""
        from .checkpoint import latest_checkpoint, load_checkpoint

        if checkpoint_dir is True:
            checkpoint_dir = latest_checkpoint(self.args.output_dir)
            if checkpoint_dir is None:
                raise ValueError(f"`resume_from_checkpoint`: no checkpoint-N directory in {self.args.output_dir}")
        load_checkpoint(self, checkpoint_dir)
        return checkpoint_dir

    def generate(self, *args, **kwargs):
        """Sample completions with the current parameters; see ``itersft_jax.generate``."""
        from .generate import generate

        with self._precision():
            return generate(self, *args, **kwargs)

    def _precision(self):
        if self.matmul_precision is None:
            return contextlib.nullcontext()
        return jax.default_matmul_precision(self.matmul_precision)


def _dataset_forms(dataset) -> dict:
    """Columns of an eval dataset (dict or ``datasets.Dataset``) as ``step()`` keyword arguments."""
    if dataset is None:
        raise ValueError("evaluate() needs samples: pass them like step()'s arguments, or an `eval_dataset`")
    columns = set(getattr(dataset, "column_names", None) or (dataset.keys() if isinstance(dataset, dict) else ()))
    if not columns:
        raise TypeError(f"`eval_dataset` must be a dict or a datasets.Dataset, got {type(dataset).__name__}")
    aliases = {"input_ids": "input_ids", "attention_mask": "attention_mask", "labels": "labels",
               "texts": "texts", "text": "texts", "prompts": "prompts", "prompt": "prompts",
               "completions": "completions", "completion": "completions"}
    forms = {aliases[c]: list(dataset[c]) for c in columns if c in aliases}
    if not forms:
        raise ValueError(f"`eval_dataset` has none of the columns {sorted(aliases)}; got {sorted(columns)}")
    return forms


def _load_tokenizer(model):
    from transformers import AutoTokenizer

    source = model if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", None)
    if not source:
        raise ValueError("`processing_class` is required when the model object has no name_or_path")
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        return AutoTokenizer.from_pretrained(source)
    from .weights import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir(source))
