"""The JAX ``IterativeSFTTrainer``: the JAX engine (``shared.engine.Engine``) around the pure ``train_step``.

The engine-independent half — ``step()``'s call template, the per-update callback flow, statistics, the log / evaluate
/ save cadence, the low-level API, ``evaluate()`` — is written once in ``itersft_jax.shared`` (``flow``, ``low_level``,
``evaluation``, ``api``) and composed here. This module adds what is particular to JAX: the host-side packing of each
update, the jitted functions of ``core.train_step`` per update, and metrics that stay on the device until the flow
needs them (a log, an evaluation, a checkpoint, or the end of the call), so the host never waits on the device
between them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from transformers import TrainerControl, TrainerState
from transformers.utils import logging as transformers_logging

from itersft_jax.core.optim import check_optimizers, resolve_optimizer
from itersft_jax.core.packing import first_fit_decreasing, pack_data, pack_update, rows_per_micro_batch
from itersft_jax.core.train_step import (
    LowLevelSteps,
    create_sharded_state,
    jit_value_and_grad,
    make_eval_step,
    make_logits_fn,
    make_train_step,
)
from itersft_jax.core.trainable import split_trainable
from itersft_jax.io.peft_io import attach_from_source, resolve_model_source
from itersft_jax.io.weights import load_model, resolve_model_dir, save_pretrained
from itersft_jax.models import position_limit
from itersft_jax.parallel import distributed
from itersft_jax.parallel.mesh import BATCH_AXES, data_parallel_size, make_mesh
from itersft_jax.shared.api import TrainerAPI
from itersft_jax.shared.atomic_dir import check_model_target
from itersft_jax.shared.config import resolve_config
from itersft_jax.shared.data import bucket_length, collate, prepare_examples, training_pad_id
from itersft_jax.shared.datum import check_custom_output
from itersft_jax.shared.engine import Engine, PassResult, UpdateRecord, eval_batches
from itersft_jax.shared.fields import check_fields
from itersft_jax.shared.flow import check_trainer_arguments, make_callback_handler, validate_flow_args
from itersft_jax.shared.interrupts import deferred_interrupt
from itersft_jax.shared.model_source import load_tokenizer

logger = logging.getLogger(__name__)


class IterativeSFTTrainer(TrainerAPI, Engine):
    """Iterative SFT on the JAX engine, with TRL's constructor signature (plus ``callbacks``).

    ``model``: a hub id, a local HF directory, or a ``transformers.PreTrainedModel`` (its weights are
    copied); a ``peft.PeftModel`` or a PEFT adapter directory continues training its LoRA adapters.
    ``peft_config``: a ``peft.LoraConfig`` to train LoRA adapters instead of the whole model
    (``itersft_jax.models.lora``).
    ``processing_class`` defaults to the tokenizer stored with the model. ``optimizers`` takes
    ``(optax_transformation, schedule_or_None)``; by default the optimizer and schedule follow ``args``
    like ``transformers.Trainer``. ``data_collator`` is accepted for signature compatibility and unused:
    the shared data layer pads. ``eval_dataset`` feeds ``evaluate()`` and ``eval_strategy``;
    ``compute_metrics`` / ``preprocess_logits_for_metrics`` work as in ``transformers.Trainer`` (see
    ``evaluate``). ``callbacks``: ``transformers.TrainerCallback`` instances or classes, run after the
    ``report_to`` integrations (see ``itersft_jax.shared.flow`` for the events). Callbacks receive as ``model`` a
    :class:`CallbackModel` (the HF config and the live parameters), as ``optimizer`` the optax transformation
    and as ``lr_scheduler`` the optax schedule.
    """

    metrics_on_host = False  # update metrics stay on the device until the flow syncs

    def __init__(self, model, args=None, data_collator=None, eval_dataset=None, processing_class=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None, compute_metrics=None, callbacks=None,
                 peft_config=None):
        self.args = resolve_config(args)
        check_fields(self.args, "jax", platform=jax.default_backend())
        if self.args.log_level != "passive":  # as transformers.Trainer does, plus this package's own logger
            level = self.args.get_process_log_level()
            logging.getLogger("itersft_jax").setLevel(level)
            transformers_logging.set_verbosity(level)
        validate_flow_args(self.args, eval_dataset)
        check_trainer_arguments(processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
                                peft_config=peft_config, eval_dataset=eval_dataset)
        check_optimizers(optimizers)
        self.data_collator = data_collator
        self.eval_dataset = eval_dataset
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.compute_metrics = compute_metrics

        self.compute_dtype = jnp.bfloat16 if self.args.bf16 else jnp.float32
        # fp32 compute means fp32 matmuls: XLA on GPUs would otherwise use TF32 (measured on an H100: 3e-4
        # max logit difference against torch fp32, 2e-7 with "highest"). `tf32=True` opts back in.
        self.matmul_precision = None if (self.args.bf16 or self.args.tf32) else "highest"
        # The mesh (itersft_jax.parallel.mesh): rows split over data x fsdp, parameters and optimizer state by the rule
        # table of parallel.sharding. On one device every sharding is that device: the same program as before.
        distributed.initialize()  # several processes when the environment asks (itersft_jax.parallel.distributed)
        self.mesh = make_mesh(self.args.mesh)
        source = resolve_model_source(model, peft_config)  # LoRA: the base and the adapters to put on it
        init_kwargs = self.args.model_init_kwargs
        dtype_asked = isinstance(init_kwargs, dict) and any(init_kwargs.get(k) is not None
                                                           for k in ("dtype", "torch_dtype"))
        # LoRA's frozen base is built in the compute dtype directly: loading it in fp32 and casting it afterwards
        # held both copies at once (an 8B base: 32 GB fp32 beside its 16 GB bf16 copy).
        base_dtype = self.compute_dtype if source.settings is not None and not dtype_asked else None
        module, self.config = load_model(
            source.base, dtype=self.compute_dtype, param_dtype=base_dtype,
            remat=bool(self.args.gradient_checkpointing),
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            model_init_kwargs=init_kwargs, mesh=self.mesh)
        self._base_name = os.fspath(source.base) if isinstance(source.base, (str, os.PathLike)) else None
        self.processing_class = (processing_class if processing_class is not None
                                 else load_tokenizer(model, resolve=resolve_model_dir))
        # With LoRA only the adapters train (fp32); the frozen base is stored in the compute dtype (bf16 with
        # bf16=True: no fp32 master copy and no optimizer state for it).
        self.adapters = attach_from_source(module, self.config, source, seed=self.args.seed)
        self.graphdef, params, frozen = split_trainable(module, self.adapters, frozen_dtype=self.compute_dtype)

        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXES))
        self._data_parallel = data_parallel_size(self.mesh)
        self.micro_batch_size = self.args.per_device_train_batch_size * self._data_parallel

        num_training_steps = self.args.max_steps if self.args.max_steps > 0 else None
        self.tx, self.schedule = resolve_optimizer(self.args, params, optimizers, num_training_steps)
        self.train_state, self._state_sharding, self._param_sharding = create_sharded_state(
            params, frozen, self.tx, self.args.seed, self.mesh)
        # Public: the compiled pure step, `(train_state, batch) -> (train_state, metrics)`, that step() calls for
        # each update (batches placed with `batch_sharding`, called inside `precision()`) — for benchmarks and tools.
        self.train_step = make_train_step(self.graphdef, self.tx, self.schedule,
                                           state_sharding=self._state_sharding, batch_sharding=self.batch_sharding,
                                           grad_sharding=self._param_sharding,
                                           label_smoothing=self.args.label_smoothing_factor,
                                           neftune_alpha=self.args.neftune_noise_alpha,
                                           lora_dropout=bool(self.adapters and self.adapters.settings.dropout))

        # The low-level API's jitted pieces (forward_backward / forward / optim_step), built like train_step.
        self._low_level = LowLevelSteps(self.graphdef, self.tx, self.schedule, state_sharding=self._state_sharding,
                                        batch_sharding=self.batch_sharding, grad_sharding=self._param_sharding,
                                        neftune_alpha=self.args.neftune_noise_alpha,
                                        lora_dropout=bool(self.adapters and self.adapters.settings.dropout))
        self._grads = None  # the low-level API's fp32 gradient accumulator, sharded like the parameters
        self._datum_row_length = 0  # packed row length of Datum passes: only grows, like _row_length
        self._custom_fns: dict = {}  # forward_backward_custom: fn -> its jitted value_and_grad
        # Packed row length: the bucket of the longest sample seen so far. It only grows, so a run whose
        # lengths wander compiles once per new maximum, not once per call.
        self._row_length = 0
        self._eval_step = None  # jitted on the first evaluate()
        self._logits_fn = None  # jitted on the first evaluate() with compute_metrics
        # Rows per device and micro-batch: on CPUs, small groups of rows (cheap to skip when empty, and a
        # 512-token GEMM is already efficient there); on accelerators, per_device_train_batch_size rows —
        # the user's memory budget, and big enough GEMMs to keep the chip busy.
        on_cpu = jax.devices()[0].platform == "cpu"
        self._rows_per_device = None if on_cpu else self.args.per_device_train_batch_size
        self._hub = None  # itersft_jax.io.hub.HubPusher, made at the first push

        first = jax.process_index() == 0
        self.state = TrainerState(is_local_process_zero=first, is_world_process_zero=first,
                                  max_steps=max(self.args.max_steps, 0),
                                  train_batch_size=self.args.per_device_train_batch_size)
        self.state.compute_steps(self.args, max(self.args.max_steps, 0))
        self.control = TrainerControl()
        self.compose()  # the flow, the low-level API (itersft_jax.shared.api)
        self.callback_handler = make_callback_handler(
            self.args, callbacks, model=CallbackModel(self), processing_class=self.processing_class,
            optimizer=self.tx, lr_scheduler=self.schedule)
        self.flow.evaluator.check_dataset()
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)

    # ------------------------------------------------------------------------------------------------------
    # Parameters

    @property
    def params(self) -> nnx.State:
        """The current trained parameters (on device; no copy): every parameter, or with LoRA the adapters."""
        return self.train_state.params

    @property
    def model(self) -> nnx.Module:
        """An NNX module holding the current parameters (shares their buffers; with LoRA, base + adapters)."""
        return nnx.merge(self.graphdef, self.train_state.model_state())

    # ------------------------------------------------------------------------------------------------------
    # Training

    def step_micro_batch_size(self) -> int:
        return self.micro_batch_size

    def config_positions(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)

    @contextlib.contextmanager
    def training_call(self, updates):
        """Every update of the call has one shape, [A, R, T]: its samples packed into rows of T tokens (see
        packing.py); A * R rows hold any update of micro_batch_size * accumulation samples."""
        longest = max(len(ex.input_ids) for update in updates for mb in update for ex in mb)
        row_length = max(self._row_length, self._bucket(longest, self.args.max_length))
        rows = rows_per_micro_batch(row_length, self._data_parallel, self._rows_per_device)
        num_micro = math.ceil(self.micro_batch_size * self.args.gradient_accumulation_steps / rows)

        def run_update(update) -> UpdateRecord:
            batch, used = pack_update(update, row_length=row_length, rows=rows,
                                      num_micro_batches=num_micro, pad_id=self._pad_id())
            input_tokens = int(np.count_nonzero(batch["attention_mask"]))
            batch = distributed.global_batch(batch, self.batch_sharding)
            with self.precision(), deferred_interrupt():  # the state is donated: replaced in the same breath
                self.train_state, metrics = self.train_step(self.train_state, batch)
                # the high-water mark (saved state) grows with the update it served, never before
                self._row_length = row_length
            # Computed tokens: micro-batches after the last one holding a token are skipped by the step.
            return UpdateRecord(metrics, input_tokens, used * rows * row_length)

        yield run_update

    def prepare_examples(self, **forms):
        distributed.check_same("step/evaluate", forms)  # several processes: the same samples on each
        return prepare_examples(**forms, tokenizer=self.processing_class, max_length=self.args.max_length,
                                truncation_mode=self.args.truncation_mode, vocab_size=self.config.vocab_size,
                                max_positions=self.position_limit)

    @property
    def position_limit(self) -> int | None:
        """Positions of the model's learned position table (GPT-2, OPT), or None for RoPE families: step(), the
        low-level API, evaluate() and generate() refuse longer sequences (``models.position_limit``)."""
        return position_limit(self.config)

    def _bucket(self, longest: int, max_length: int | None = None) -> int:
        """The packed row length for samples of up to ``longest`` tokens: the length ladder, capped at
        ``max_length`` and at the position table (a padding position past it would give NaN embeddings)."""
        caps = [c for c in (max_length, self.position_limit) if c]
        return bucket_length(longest, min(caps) if caps else None)

    def fetch(self, metrics: list[dict]) -> list[dict]:
        return jax.device_get(metrics)  # the host sync

    def _pad_id(self) -> int:
        return training_pad_id(self.processing_class)

    # ------------------------------------------------------------------------------------------------------
    # The low-level API's part of the engine (itersft_jax.shared.low_level)

    def datum_vocab_size(self) -> int:
        return self.config.vocab_size

    def data_pass(self, data, loss_fn, config, backward, key_offset) -> PassResult:
        """Pack the data into rows of the bucketed length (``pack_data``), one jitted pass, logprobs unpacked."""
        # The high-water mark (saved with the state) only grows with a committed backward pass: a forward-only
        # pass, or one whose result is refused, leaves the trainer as it was.
        distributed.check_same("the low-level API", {"data": data, "loss_fn": loss_fn, "loss_fn_config": config})
        length = max(self._datum_row_length, self._bucket(max(len(d) for d in data)))
        rows = rows_per_micro_batch(length, self._data_parallel, self._rows_per_device)
        needed = math.ceil(len(first_fit_decreasing([len(d) for d in data], length)) / rows)
        num_micro = 1 << (needed - 1).bit_length()  # a power of two: a few shapes however the data is split
        batch, used, places = pack_data(data, row_length=length, rows=rows, num_micro_batches=num_micro,
                                        pad_id=self._pad_id())
        batch = distributed.global_batch(batch, self.batch_sharding)
        key = tuple(sorted(config.items()))
        result = PassResult(0.0, 0, [], used * rows * length)
        with self.precision():
            if backward:
                # The accumulator is donated to the pass; a pending one goes in as a copy, so a pass that fails
                # (or is interrupted) leaves it as it was. The copy is the only extra memory, and only when several
                # forward_backward calls accumulate into one update.
                if self._grads is None:
                    grads = self._low_level.zeros(self.train_state.params)
                else:
                    grads = self._low_level.copy(self._grads)
                new_grads, out = self._low_level.forward_backward(loss_fn, key)(self.train_state, grads, batch,
                                                                                jnp.int32(key_offset))

                def commit():
                    self._grads = new_grads
                    self._datum_row_length = length

                result.commit, result.micro_batches = commit, num_micro
            else:
                out = self._low_level.forward(loss_fn, key)(self.train_state, batch)
        out = jax.device_get(out)
        result.logprobs = [np.array(out["logprobs"][a, m, start:start + n]) for a, m, start, n in places]
        result.loss_sum, result.num_tokens = float(out["loss_sum"]), int(out["num_tokens"])
        return result

    def pending_gradients(self) -> dict[str, np.ndarray]:
        """The accumulated gradients (summed, fp32) on the host by Hugging Face parameter name (with LoRA: by the
        adapters' paths)."""
        if self._grads is None:
            return {}
        grads = distributed.host_copy(nnx.to_pure_dict(self._grads))
        if self.adapters is not None:
            return {jax.tree_util.keystr(path): np.asarray(leaf)
                    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]}
        from itersft_jax.models import get_family

        return get_family(self.config.model_type).params_to_hf(grads, self.config)

    def apply_accumulated(self, loss_sum, num_tokens):
        with self.precision(), deferred_interrupt():  # the state is donated: replaced in the same breath
            self.train_state, metrics = self._low_level.optim_step(self.train_state, self._grads, loss_sum,
                                                                   num_tokens)
        self._grads = None
        metrics = jax.device_get(metrics)
        return {k: float(metrics[k]) for k in ("grad_norm", "learning_rate", "skipped")}

    def value_and_grad(self, fn, logprobs_NL, inputs):
        width = logprobs_NL.shape[1]
        length = bucket_length(width)  # padded to the ladder: a few shapes, a few compilations
        pad = ((0, 0), (0, length - width))
        logprobs_NL, inputs = np.pad(logprobs_NL, pad), {k: np.pad(v, pad) for k, v in inputs.items()}
        if fn not in self._custom_fns:
            try:  # its output's structure, traced abstractly: a wrong one is named before jax's own errors
                out = jax.eval_shape(fn, logprobs_NL, inputs)
            except Exception as err:
                raise TypeError(f"`fn` failed on logprobs of shape {logprobs_NL.shape} and inputs "
                                f"{sorted(inputs)}: {type(err).__name__}: {err}"[:1000]) from err
            check_custom_output(out)
            self._custom_fns[fn] = jit_value_and_grad(fn)
        (loss, metrics), grad = self._custom_fns[fn](logprobs_NL, inputs)
        loss, metrics, grad = jax.device_get((loss, metrics, grad))
        return float(loss), {k: float(v) for k, v in (metrics or {}).items()}, np.asarray(grad)[:, :width]

    # ------------------------------------------------------------------------------------------------------
    # Evaluation (shared.evaluation calls these)

    def eval_loss(self, examples) -> tuple[float, int]:
        """Summed token cross-entropy and label tokens over ``examples``, packed like training updates."""
        if self._eval_step is None:
            self._eval_step = make_eval_step(self.graphdef, batch_sharding=self.batch_sharding,
                                             label_smoothing=self.args.label_smoothing_factor)
        longest = max(len(ex.input_ids) for ex in examples)
        row_length = max(self._row_length, self._bucket(longest, self.args.max_length))
        rows = rows_per_micro_batch(row_length, self._data_parallel, self._rows_per_device)
        per_batch = self.args.per_device_eval_batch_size * self._data_parallel
        num_micro = math.ceil(per_batch / rows)
        pending = []
        for i in range(0, len(examples), per_batch):
            batch, _ = pack_update([examples[i:i + per_batch]], row_length=row_length, rows=rows,
                                   num_micro_batches=num_micro, pad_id=self._pad_id())
            batch = distributed.global_batch(batch, self.batch_sharding)
            with self.precision():
                pending.append(self._eval_step(self.train_state.model_state(), batch))
        host = jax.device_get(pending)
        return sum(float(m["loss_sum"]) for m in host), sum(int(m["num_tokens"]) for m in host)

    def eval_predictions(self, examples):
        """Per batch of ``per_device_eval_batch_size`` x devices samples (one per row, unpacked): the logits
        ``[B, T, V]`` (or ``preprocess_logits_for_metrics(logits, labels)``) and labels ``[B, T]``, on the
        host as numpy. Rows are padded to the length ladder, so a few shapes compile."""
        if self._logits_fn is None:
            self._logits_fn = make_logits_fn(self.graphdef)
        rows = self.args.per_device_eval_batch_size * self._data_parallel
        for batch in eval_batches(examples, rows):
            length = self._bucket(max(len(ex.input_ids) for ex in batch), self.args.max_length)
            arrays = {k: v[0] for k, v in collate([batch], pad_id=self._pad_id(), rows=rows, length=length).items()}
            with self.precision():
                logits_BTV = self._logits_fn(self.train_state.model_state(), arrays["input_ids"],
                                             arrays["attention_mask"])
            logits_BTV = np.asarray(jax.device_get(logits_BTV))[:len(batch)]
            labels_BT = arrays["labels"][:len(batch)]
            if self.preprocess_logits_for_metrics is not None:
                logits_BTV = np.asarray(self.preprocess_logits_for_metrics(logits_BTV, labels_BT))
            yield logits_BTV, labels_BT

    # ------------------------------------------------------------------------------------------------------
    # Saving, the Hub and generation

    def save_model(self, output_dir: str | None = None, max_shard_size: str | int = "5GB",
                   flax_format: bool = False) -> str:
        """Write an HF directory (config, safetensors, tokenizer, generation config) that
        ``AutoModelForCausalLM.from_pretrained`` loads; with LoRA, a PEFT adapter directory
        (``adapter_config.json``, ``adapter_model.safetensors``, tokenizer) that ``PeftModel.from_pretrained(base,
        dir)`` loads (see ``merge_and_save`` for a merged model). ``flax_format=True`` also writes
        ``flax_model.msgpack`` for transformers 4.x's Flax classes (``io.flax_weights.FLAX_MODEL_TYPES``)."""
        output_dir = check_model_target(self.args.output_dir if output_dir is None else output_dir, "output_dir",
                                        output_dir=self.args.output_dir)
        if flax_format and self.adapters is not None:
            raise ValueError("flax_format=True writes a full model: with LoRA, merge the adapters first "
                             "(merge_and_save) and load that directory")
        if self.adapters is not None:
            from itersft_jax.io.peft_io import save_adapter

            return save_adapter(self.model, self.adapters.targets, self.adapters.settings.peft_config, self.config,
                                output_dir, tokenizer=self.processing_class, base_name=self._base_name)
        params = distributed.host_copy(nnx.to_pure_dict(self.train_state.params))  # every process takes part
        if not distributed.is_main_process():
            return output_dir
        return save_pretrained(params, self.config, output_dir, tokenizer=self.processing_class,
                               max_shard_size=max_shard_size, flax_format=flax_format)

    def merge_and_save(self, output_dir: str, max_shard_size: str | int = "5GB") -> str:
        """Write a full HF model directory with the LoRA adapters folded into the base weights (``W + scale * A
        @ B``, in the base's dtype), loadable by ``AutoModelForCausalLM.from_pretrained``. Without LoRA it is
        ``save_model``."""
        output_dir = check_model_target(output_dir, "output_dir", output_dir=self.args.output_dir)
        if self.adapters is None:
            return self.save_model(output_dir, max_shard_size=max_shard_size)
        from itersft_jax.io.peft_io import merged_params

        params = merged_params(self.model, self.adapters.targets)  # every process takes part
        if not distributed.is_main_process():
            return output_dir
        return save_pretrained(params, self.config, output_dir, tokenizer=self.processing_class,
                               max_shard_size=max_shard_size)

    def save_checkpoint(self, checkpoint_dir: str | None = None) -> str:
        """A full checkpoint (HF model directory + orbax train state + counters), by default
        ``output_dir/checkpoint-<global_step>``; older ones beyond ``save_total_limit`` are removed.
        ``save_strategy`` calls this."""
        from itersft_jax.io.checkpoint import rotate_checkpoints, save_checkpoint


        if checkpoint_dir is None:
            checkpoint_dir = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        path = save_checkpoint(checkpoint_dir, self.train_state, self.counters(), write_model=self.save_model,
                               output_dir=self.args.output_dir)
        if distributed.is_main_process():
            rotate_checkpoints(self.args.output_dir, self.args.save_total_limit)
        return path

    def save_for_flow(self) -> None:
        """The checkpoint the cadence asked for; with ``push_to_hub`` its model files go to the Hub too."""
        hub = self._hub_pusher() if self.args.push_to_hub else None
        if hub is not None:
            hub.wait()  # the previous upload reads its checkpoint folder: finish it before rotation may delete it
        path = self.save_checkpoint()
        if hub is not None and hub.pushes_checkpoints():
            self.callback_handler.on_push_begin(self.args, self.state, self.control)
            hub.push_checkpoint(path, self.state.global_step)

    def resume_from_checkpoint(self, checkpoint_dir: str | bool = True) -> str:
        """Restore parameters, optimizer state, step and call counters from a checkpoint directory (``True``:
        the newest complete and intact ``checkpoint-N`` under ``output_dir``), so the run continues exactly
        where it was. Checkpoints are verified first (``itersft_jax.io.checkpoint``)."""
        from itersft_jax.io.checkpoint import resume_from_checkpoint

        path, self.train_state, counters = resume_from_checkpoint(self.args.output_dir, self.train_state,
                                                                  checkpoint_dir)
        self.restore_counters(counters)
        return path

    def save_state(self, path: str) -> str:
        """The low-level API's checkpoint: ``save_checkpoint(path)`` (weights, optimizer state, step, RNG key and
        counters; atomic and verified, ``itersft_jax.io.checkpoint``). Refused while gradients are pending."""
        self.flow.refuse_while_pending("save_state()")
        from itersft_jax.io.checkpoint import save_checkpoint
        from itersft_jax.shared.atomic_dir import check_state_target

        path = check_state_target(path, "path", output_dir=self.args.output_dir)
        return save_checkpoint(path, self.train_state, self.counters(), write_model=self.save_model,
                               output_dir=self.args.output_dir)

    def load_state(self, path: str) -> str:
        """Restore what :meth:`save_state` wrote (verified first); the run continues bit for bit."""
        self.flow.refuse_while_pending("load_state()")
        from itersft_jax.io.checkpoint import load_checkpoint
        from itersft_jax.shared.atomic_dir import check_state_source

        self.train_state, counters = load_checkpoint(check_state_source(path), self.train_state)
        self.restore_counters(counters)
        return path

    def _hub_pusher(self):
        from itersft_jax.io.hub import HubPusher

        if self._hub is None:
            self._hub = HubPusher(self.args)
        return self._hub

    def create_model_card(self, language: str | None = None, license: str | None = None,
                          tags: str | list[str] | None = None, model_name: str | None = None,
                          finetuned_from: str | None = None, **unused) -> str:
        """Write ``output_dir/README.md``: metadata (``library_name``, tags, base model) and the training summary."""
        from itersft_jax.io.hub import write_model_card

        return write_model_card(self.args, self.config, self.state.log_history, language=language,
                                license=license, tags=tags, model_name=model_name, finetuned_from=finetuned_from)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """Save the model and a model card to ``output_dir`` and upload it to ``hub_model_id`` (default: the
        output directory's name), like ``transformers.Trainer.push_to_hub``. Returns the ``CommitInfo``
        (a ``Future`` with ``blocking=False``)."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.save_model(self.args.output_dir)
        self.create_model_card(**kwargs)
        return self._hub_pusher().push_folder(self.args.output_dir, commit_message=commit_message, token=token,
                                              revision=revision, private=private, blocking=blocking)

    def generate(self, *args, **kwargs):
        """Sample completions with the current parameters (no copy); see
        ``itersft_jax.sampler.generate.generate_from_params`` for the arguments."""
        from itersft_jax.sampler.generate import generate_from_params

        if kwargs.get("tokenizer") is None:
            kwargs["tokenizer"] = self.processing_class
        if kwargs.get("hf_config") is None:
            kwargs["hf_config"] = self.config
        with self.precision():  # the live params (LoRA: + base); unseeded calls counted by the trainer
            return generate_from_params(self.graphdef, self.train_state.model_state(), *args,
                                        base_seed=int(self.args.seed), next_call=self.next_generation_call,
                                        mesh=self.mesh, **kwargs)

    def precision(self):
        """The matmul-precision context every device call of this trainer runs in (``"highest"`` for fp32 compute
        unless ``tf32``; a no-op for bf16): wrap direct calls of ``train_step`` in it."""
        if self.matmul_precision is None:
            return contextlib.nullcontext()
        return jax.default_matmul_precision(self.matmul_precision)

    # ------------------------------------------------------------------------------------------------------
    # Counters (what a checkpoint keeps beside the train state) and the flow's other questions

    def extra_counters(self) -> dict[str, Any]:
        """The packed row lengths (they fix the summation order)."""
        return {"row_length": self._row_length, "datum_row_length": self._datum_row_length}

    def restore_extra_counters(self, counters: dict[str, Any]) -> None:
        self._row_length = int(counters.get("row_length", 0))
        self._datum_row_length = int(counters.get("datum_row_length", 0))

    def is_best_metric(self, metrics: dict[str, float]) -> bool:
        raise NotImplementedError("save_strategy='best' is refused on the JAX engine (shared.fields)")


class CallbackModel:
    """What callbacks receive as ``model`` on the JAX engine: the HF ``config`` and the live ``params``.

    Never a stale module: the train state is donated at every update, so a module built once would hold
    freed buffers.
    """

    def __init__(self, trainer: IterativeSFTTrainer):
        self.trainer = trainer

    @property
    def config(self):
        return self.trainer.config

    @property
    def params(self) -> nnx.State:
        return self.trainer.params

    def num_parameters(self, only_trainable: bool = False) -> int:
        """Parameters of the model (``only_trainable``: those the optimizer updates — with LoRA, the adapters)."""
        state = self.trainer.params if only_trainable else self.trainer.train_state.model_state()
        return sum(int(x.size) for x in jax.tree.leaves(state))
