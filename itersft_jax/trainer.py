"""The JAX ``IterativeSFTTrainer``: TRL's API over the JAX engine (``itersft_jax.engine.JaxEngine``).

The trainer checks its arguments, builds its engine (the model, the sharded train state, every jitted function of
training) and composes it with what is written once in ``itersft_jax.shared`` and shared with the PyTorch engine —
``step()``'s call template, the per-update callback flow, statistics, the log / evaluate / save cadence, the
low-level API, ``evaluate()`` (``flow``, ``low_level``, ``evaluation``, ``api``). It is the flow's ``FlowHost``
(configuration, transformers' ``TrainerState`` / ``TrainerControl``, callbacks, checkpoints on the cadence) and
holds the public methods that write files (models, checkpoints, states, the Hub) and ``generate``.
"""

from __future__ import annotations

import logging
import os

import jax
from flax import nnx
from transformers import TrainerControl, TrainerState
from transformers.utils import logging as transformers_logging

from itersft_jax.core.optim import check_optimizers
from itersft_jax.engine import JaxEngine
from itersft_jax.io.weights import save_pretrained
from itersft_jax.parallel import distributed
from itersft_jax.shared.api import TrainerAPI
from itersft_jax.shared.atomic_dir import check_model_target
from itersft_jax.shared.config import resolve_config
from itersft_jax.shared.engine import FlowHost
from itersft_jax.shared.fields import check_fields
from itersft_jax.shared.flow import check_trainer_arguments, make_callback_handler, validate_flow_args

logger = logging.getLogger(__name__)


def _engine_attribute(name: str, doc: str, settable: bool = False) -> property:
    """A trainer attribute that is the engine's (``trainer.train_state`` is ``trainer.engine.train_state``)."""
    setter = (lambda self, value: setattr(self.engine, name, value)) if settable else None
    return property(lambda self: getattr(self.engine, name), setter, doc=doc)


class IterativeSFTTrainer(TrainerAPI, FlowHost):
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

    # The engine's state and pieces, as attributes of the trainer (the names earlier versions had).
    train_state = _engine_attribute("train_state", "The ``TrainState`` (parameters, optimizer state, step, RNG key; "
                                    "donated at every update: read it afresh).", settable=True)
    params = _engine_attribute("params", "The current trained parameters (on device; no copy): every parameter, or "
                               "with LoRA the adapters.")
    model = _engine_attribute("model", "An NNX module holding the current parameters (shares their buffers; with "
                              "LoRA, base + adapters).")
    train_step = _engine_attribute("train_step", "The compiled pure step, ``(train_state, batch) -> (train_state, "
                                   "metrics)``, that step() calls for each update (batches placed with "
                                   "``batch_sharding``, called inside ``precision()``) — for benchmarks and tools.")
    config = _engine_attribute("config", "The model's Hugging Face config.")
    processing_class = _engine_attribute("processing_class", "The tokenizer.")
    adapters = _engine_attribute("adapters", "The LoRA adapters (``models.lora``), or None.")
    graphdef = _engine_attribute("graphdef", "The NNX graph definition of the model.")
    mesh = _engine_attribute("mesh", "The device mesh (``parallel.mesh``).")
    batch_sharding = _engine_attribute("batch_sharding", "How a batch ``[A, R, T]`` is placed on the mesh.")
    micro_batch_size = _engine_attribute("micro_batch_size", "Samples per micro-batch over all devices.")
    compute_dtype = _engine_attribute("compute_dtype", "bf16 with ``bf16=True``, else fp32.")
    tx = _engine_attribute("tx", "The optax transformation.")
    schedule = _engine_attribute("schedule", "The optax learning-rate schedule.")

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
        engine = JaxEngine(self.args, model, processing_class=processing_class, optimizers=optimizers,
                           peft_config=peft_config, preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        self._base_name = engine.base_name
        self._hub = None  # itersft_jax.io.hub.HubPusher, made at the first push

        first = jax.process_index() == 0
        self.state = TrainerState(is_local_process_zero=first, is_world_process_zero=first,
                                  max_steps=max(self.args.max_steps, 0),
                                  train_batch_size=self.args.per_device_train_batch_size)
        self.state.compute_steps(self.args, max(self.args.max_steps, 0))
        self.control = TrainerControl()
        self.compose(engine)  # the flow, the low-level API (itersft_jax.shared.api)
        self.callback_handler = make_callback_handler(
            self.args, callbacks, model=CallbackModel(self), processing_class=self.processing_class,
            optimizer=self.tx, lr_scheduler=self.schedule)
        self.flow.evaluator.check_dataset()
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)

    def precision(self):
        """The matmul-precision context every device call of this trainer runs in (``"highest"`` for fp32 compute
        unless ``tf32``; a no-op for bf16): wrap direct calls of ``train_step`` in it."""
        return self.engine.precision()

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
