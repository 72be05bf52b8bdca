"""The JAX engine (``itersft_jax.shared.engine.Engine``): the model, its sharded train state and every jitted function
of training, and how one update of ``step()``, one pass over ``Datum`` s and an evaluation run on them.

``JaxEngine`` owns the state of the computation — the mesh, the NNX graph definition, the ``TrainState`` (parameters,
optimizer state, step, RNG key), the low-level API's gradient accumulator and the packed row lengths — and the
jitted functions of ``core.train_step`` that update it. It packs each update on the host (``core.packing``) and keeps
update metrics on the device until the flow asks for them (``fetch``: a log, an evaluation, a checkpoint, or the end of
the call), so the host never waits on the device between them. ``itersft_jax.trainer.IterativeSFTTrainer`` builds
one and composes it with the shared flow.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from itersft_jax.core.optim import resolve_optimizer
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
from itersft_jax.io.weights import load_model, resolve_model_dir
from itersft_jax.models import position_limit
from itersft_jax.parallel import distributed
from itersft_jax.parallel.mesh import BATCH_AXES, data_parallel_size, make_mesh
from itersft_jax.shared.data import bucket_length, collate, prepare_examples, training_pad_id
from itersft_jax.shared.datum import check_custom_output
from itersft_jax.shared.engine import Engine, PassResult, UpdateRecord, eval_batches
from itersft_jax.shared.interrupts import deferred_interrupt
from itersft_jax.shared.model_source import load_tokenizer


class JaxEngine(Engine):
    """The JAX engine of ``itersft_jax.trainer.IterativeSFTTrainer`` (see the module docstring), built from the
    trainer's checked arguments: ``model`` (a hub id, a directory, a ``PreTrainedModel``, a ``PeftModel`` or an
    adapter directory), ``processing_class`` (None: the model's tokenizer), ``optimizers`` and ``peft_config``."""

    metrics_on_host = False  # update metrics stay on the device until the flow syncs

    def __init__(self, args, model, *, processing_class=None, optimizers=(None, None), peft_config=None,
                 preprocess_logits_for_metrics=None):
        self.args = args
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
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
        self.base_name = os.fspath(source.base) if isinstance(source.base, (str, os.PathLike)) else None
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
