"""Bad input against the public API, on both engines: every case ends in one clear error that names the argument, and
leaves the trainer bit-identical (parameters, optimizer and schedule state, the low-level accumulator, counters, RNG)
and every file outside the run's output directory as it was.

One tiny GPT-2 (a learned position table of ``POSITIONS`` rows, so the over-long cases are real) and one trainer per
engine serve every case; a case is ``(name, call, exception type, text the message must hold)``. The classes of input
and the count are listed in docs/reliability.md.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer
from itersft_jax.shared.atomic_dir import MANIFEST_FILE, CheckpointError, finish
from itersft_jax.shared.datum import Datum
from tests.support.engines import BACKENDS, fingerprint, make_trainer
from tests.support.offline import save_tiny_model

POSITIONS = 32  # the suite's GPT-2 has 32 positions
LONG = list(range(5, 5 + POSITIONS + 8))  # 40 tokens: past the position table
OK_IDS = [[5, 6, 7, 8, 9, 10]]


def ce_datum(ids=(5, 6, 7, 8), **inputs) -> Datum:
    ids = list(ids)
    fields = {"target_tokens": ids[1:] + [11], "weights": [1.0] * len(ids)}
    fields.update(inputs)
    return Datum(ids, fields)


def rl_datum(**inputs) -> Datum:
    fields = {"target_tokens": [6, 7, 8, 9], "logprobs": [-1.0] * 4, "advantages": [0.5] * 4}
    fields.update(inputs)
    return Datum([5, 6, 7, 8], fields)


_THE_TOKENIZER = object()


def build(ctx, backend, tokenizer=_THE_TOKENIZER, **kwargs):
    """A new trainer of the suite's model with ``kwargs`` (trainer keywords, or config fields)."""
    tokenizer = ctx["tokenizer"] if tokenizer is _THE_TOKENIZER else tokenizer
    return make_trainer(backend, ctx["model_dir"], tokenizer, ctx["out"], fast=True, **kwargs)


def config(backend, **fields):
    return IterativeSFTConfig(output_dir="out", backend=backend, report_to="none", **fields)


def generator_of(*items):
    yield from items


# ----------------------------------------------------------------------------------------------------------
# The cases: (name, call(trainer, ctx, backend), exception, fragment of the message[, engines])

CONSTRUCTION = [
    ("processing_class-str", lambda t, c, b: build(c, b, tokenizer="gpt2"), TypeError, "processing_class"),
    ("processing_class-int", lambda t, c, b: build(c, b, tokenizer=3), TypeError, "processing_class"),
    ("callbacks-int-item", lambda t, c, b: build(c, b, callbacks=[42]), TypeError, "callbacks"),
    ("callbacks-not-list", lambda t, c, b: build(c, b, callbacks=42), TypeError, "callbacks"),
    ("callbacks-str-item", lambda t, c, b: build(c, b, callbacks=["wandb"]), TypeError, "callbacks"),
    ("optimizers-str", lambda t, c, b: build(c, b, optimizers=("adam", None)), TypeError, "optimizers"),
    ("optimizers-not-pair", lambda t, c, b: build(c, b, optimizers="adam"), TypeError, "optimizers"),
    ("optimizers-three", lambda t, c, b: build(c, b, optimizers=(None, None, None)), TypeError, "optimizers"),
    ("optimizers-schedule-str", lambda t, c, b: build(c, b, optimizers=(None, "cosine")), TypeError, "optimizers"),
    ("peft_config-str", lambda t, c, b: build(c, b, peft_config="lora"), TypeError, "peft_config"),
    ("peft_config-dict", lambda t, c, b: build(c, b, peft_config={"r": 8}), TypeError, "peft_config"),
    ("eval_dataset-strings", lambda t, c, b: build(c, b, eval_dataset=["a", "b"], eval_strategy="steps",
                                                    eval_steps=1), TypeError, "eval_dataset"),
    ("eval_dataset-no-columns", lambda t, c, b: build(c, b, eval_dataset={"foo": ["a"]}, eval_strategy="steps",
                                                       eval_steps=1), ValueError, "eval_dataset"),
    ("eval_dataset-bad-ids", lambda t, c, b: build(c, b, eval_dataset={"input_ids": [[5, 10 ** 6]]},
                                                    eval_strategy="steps", eval_steps=1), ValueError, "input_ids"),
    ("eval_dataset-too-long", lambda t, c, b: build(c, b, eval_dataset={"input_ids": [LONG]}, eval_strategy="steps",
                                                     eval_steps=1), ValueError, "positions"),
    ("eval_strategy-without-dataset", lambda t, c, b: build(c, b, eval_strategy="steps", eval_steps=1), ValueError,
     "eval_dataset"),
    ("model-int", lambda t, c, b: IterativeSFTTrainer(12345, args=config(b)), TypeError, "model"),
    ("model-none", lambda t, c, b: IterativeSFTTrainer(None, args=config(b)), TypeError, "model"),
    ("model-missing-dir", lambda t, c, b: IterativeSFTTrainer("./no/such/model", args=config(b)), FileNotFoundError,
     "no/such/model"),
    ("model-file", lambda t, c, b: IterativeSFTTrainer("user_file.txt", args=config(b)), NotADirectoryError,
     "user_file.txt"),
    ("args-str", lambda t, c, b: IterativeSFTTrainer(c["model_dir"], args="out", backend=b), TypeError, "args"),
    ("backend-unknown", lambda t, c, b: IterativeSFTTrainer(c["model_dir"], backend="tpu"), ValueError, "backend"),
    ("seed-negative", lambda t, c, b: config(b, seed=-1), ValueError, "seed"),
    ("seed-2**64", lambda t, c, b: config(b, seed=2 ** 64), ValueError, "seed"),
    ("seed-str", lambda t, c, b: config(b, seed="abc"), TypeError, "seed"),
    ("data_seed-2**40", lambda t, c, b: config(b, data_seed=2 ** 40), ValueError, "data_seed"),
    ("learning_rate-nan", lambda t, c, b: config(b, learning_rate=math.nan), ValueError, "learning_rate"),
    ("learning_rate-negative", lambda t, c, b: config(b, learning_rate=-1e-3), ValueError, "learning_rate"),
    ("learning_rate-str", lambda t, c, b: config(b, learning_rate="fast"), TypeError, "learning_rate"),
    ("max_length-zero", lambda t, c, b: config(b, max_length=0), ValueError, "max_length"),
    ("max_length-str", lambda t, c, b: config(b, max_length="512"), TypeError, "max_length"),
    ("truncation_mode", lambda t, c, b: config(b, truncation_mode="middle"), ValueError, "truncation_mode"),
    ("per_device_train_batch_size-0", lambda t, c, b: config(b, per_device_train_batch_size=0), ValueError,
     "per_device_train_batch_size"),
    ("gradient_accumulation_steps-0", lambda t, c, b: config(b, gradient_accumulation_steps=0), ValueError,
     "gradient_accumulation_steps"),
    ("max_grad_norm-nan", lambda t, c, b: config(b, max_grad_norm=math.nan), ValueError, "max_grad_norm"),
    ("weight_decay-inf", lambda t, c, b: config(b, weight_decay=math.inf), ValueError, "weight_decay"),
    ("adam_beta1-1.5", lambda t, c, b: config(b, adam_beta1=1.5), ValueError, "adam_beta1"),
    ("adam_epsilon-negative", lambda t, c, b: config(b, adam_epsilon=-1.0), ValueError, "adam_epsilon"),
    ("warmup_steps-ratio-without-max_steps", lambda t, c, b: config(b, warmup_steps=0.5), ValueError,
     "warmup_steps"),
    ("warmup_steps-negative", lambda t, c, b: config(b, warmup_steps=-2), ValueError, "warmup_steps"),
    ("lr_scheduler_kwargs-unknown", lambda t, c, b: config(b, lr_scheduler_type="cosine", max_steps=10,
                                                           lr_scheduler_kwargs={"bogus": 1}), ValueError,
     "lr_scheduler_kwargs"),
    ("lr_scheduler_kwargs-unknown-constant", lambda t, c, b: config(b, lr_scheduler_kwargs={"num_cycles": 2}),
     ValueError, "lr_scheduler_kwargs"),
    ("model_init_kwargs-unknown", lambda t, c, b: build(c, b, model_init_kwargs={"bogus_option": 1}), ValueError,
     "model_init_kwargs"),
    ("model_init_kwargs-str", lambda t, c, b: config(b, model_init_kwargs="fp32"), TypeError, "model_init_kwargs"),
    ("optim_args-unknown", lambda t, c, b: build(c, b, optim_args="bogus=1"), ValueError, "optim_args"),
    ("optim_args-malformed", lambda t, c, b: config(b, optim_args="beta1"), ValueError, "optim_args"),
    ("max_skipped_updates-0", lambda t, c, b: config(b, max_skipped_updates=0), ValueError, "max_skipped_updates"),
    ("label_smoothing_factor-1.5", lambda t, c, b: config(b, label_smoothing_factor=1.5), ValueError,
     "label_smoothing_factor"),
    ("neftune_noise_alpha-negative", lambda t, c, b: config(b, neftune_noise_alpha=-1.0), ValueError,
     "neftune_noise_alpha"),
]

STEP = [
    ("no-form", lambda t, c, b: t.step(), ValueError, "input form"),
    ("two-forms", lambda t, c, b: t.step(input_ids=OK_IDS, texts=["a b"]), ValueError, "exactly one"),
    ("input_ids-empty", lambda t, c, b: t.step(input_ids=[]), ValueError, "input_ids"),
    ("input_ids-empty-row", lambda t, c, b: t.step(input_ids=[[]]), ValueError, "input_ids[0]"),
    ("input_ids-str", lambda t, c, b: t.step(input_ids="5 6 7"), TypeError, "input_ids"),
    ("input_ids-dict", lambda t, c, b: t.step(input_ids={"a": [5, 6]}), TypeError, "input_ids"),
    ("input_ids-int", lambda t, c, b: t.step(input_ids=5), TypeError, "input_ids"),
    ("input_ids-flat", lambda t, c, b: t.step(input_ids=[5, 6, 7]), TypeError, "input_ids"),
    ("input_ids-1d-array", lambda t, c, b: t.step(input_ids=np.arange(5, 10)), ValueError, "input_ids"),
    ("input_ids-3d", lambda t, c, b: t.step(input_ids=np.ones((1, 2, 3), int)), ValueError, "input_ids"),
    ("input_ids-float", lambda t, c, b: t.step(input_ids=[[5.0, 6.0, 7.0]]), TypeError, "input_ids[0]"),
    ("input_ids-bool", lambda t, c, b: t.step(input_ids=[[True, False]]), TypeError, "input_ids[0]"),
    ("input_ids-negative", lambda t, c, b: t.step(input_ids=[[5, -3, 7]]), ValueError, "input_ids[0]"),
    ("input_ids-past-vocab", lambda t, c, b: t.step(input_ids=[[5, 10 ** 6]]), ValueError, "input_ids[0]"),
    ("input_ids-2**70", lambda t, c, b: t.step(input_ids=[[5, 2 ** 70]]), TypeError, "input_ids"),
    ("input_ids-ragged-str", lambda t, c, b: t.step(input_ids=[[5, 6], "ab"]), TypeError, "input_ids[1]"),
    ("input_ids-too-long", lambda t, c, b: t.step(input_ids=[LONG]), ValueError, "positions"),
    ("input_ids-one-too-long", lambda t, c, b: t.step(input_ids=[[5, 6, 7], LONG]), ValueError, "input_ids[1]"),
    ("attention_mask-count", lambda t, c, b: t.step(input_ids=OK_IDS, attention_mask=[[1] * 6, [1] * 6]),
     ValueError, "attention_mask"),
    ("attention_mask-length", lambda t, c, b: t.step(input_ids=OK_IDS, attention_mask=[[1, 1]]), ValueError,
     "attention_mask[0]"),
    ("attention_mask-2", lambda t, c, b: t.step(input_ids=OK_IDS, attention_mask=[[1, 2, 1, 1, 1, 1]]), ValueError,
     "attention_mask[0]"),
    ("attention_mask-zeros", lambda t, c, b: t.step(input_ids=OK_IDS, attention_mask=[[0] * 6]), ValueError,
     "attention_mask[0]"),
    ("attention_mask-alone", lambda t, c, b: t.step(texts=["a b"], attention_mask=[[1]]), ValueError,
     "attention_mask"),
    ("labels-length", lambda t, c, b: t.step(input_ids=OK_IDS, labels=[[5, 6]]), ValueError, "labels[0]"),
    ("labels-minus-5", lambda t, c, b: t.step(input_ids=OK_IDS, labels=[[5, 6, -5, 8, 9, 10]]), ValueError,
     "labels[0]"),
    ("labels-all-ignored", lambda t, c, b: t.step(input_ids=OK_IDS, labels=[[-100] * 6]), ValueError, "label token"),
    ("labels-past-vocab", lambda t, c, b: t.step(input_ids=OK_IDS, labels=[[5, 6, 7, 8, 9, 10 ** 6]]), ValueError,
     "labels[0]"),
    ("texts-str", lambda t, c, b: t.step(texts="a b c"), TypeError, "texts"),
    ("texts-empty", lambda t, c, b: t.step(texts=[]), ValueError, "texts"),
    ("texts-int", lambda t, c, b: t.step(texts=[1, 2]), TypeError, "texts[0]"),
    ("texts-none-item", lambda t, c, b: t.step(texts=["a", None]), TypeError, "texts[1]"),
    ("texts-surrogate", lambda t, c, b: t.step(texts=["fine", "bad \ud800 text"]), ValueError, "texts[1]"),
    ("texts-generator", lambda t, c, b: t.step(texts=generator_of("a b")), TypeError, "texts"),
    ("texts-dict", lambda t, c, b: t.step(texts={"a": "b"}), TypeError, "texts"),
    ("texts_labels-causal", lambda t, c, b: t.step(texts=["a b"], texts_labels=["c d"]), ValueError, "texts_labels"),
    ("texts_labels-alone", lambda t, c, b: t.step(input_ids=OK_IDS, texts_labels=["a"]), ValueError, "texts_labels"),
    ("texts-too-long", lambda t, c, b: t.step(texts=[" ".join(["hello world"] * 30)]), ValueError, "texts[0]"),
    ("prompts-alone", lambda t, c, b: t.step(prompts=["a"]), ValueError, "completions"),
    ("completions-alone", lambda t, c, b: t.step(completions=["a"]), ValueError, "prompts"),
    ("prompts-count", lambda t, c, b: t.step(prompts=["a", "b"], completions=["c"]), ValueError, "completions"),
    ("prompts-str", lambda t, c, b: t.step(prompts="a", completions="b"), TypeError, "prompts"),
    ("prompts-generator", lambda t, c, b: t.step(prompts=generator_of("a"), completions=["b"]), TypeError,
     "prompts"),
    ("prompts-dict", lambda t, c, b: t.step(prompts={"a": "b"}, completions=["b"]), TypeError, "prompts"),
    ("completions-int", lambda t, c, b: t.step(prompts=["a"], completions=[3]), TypeError, "completions[0]"),
    ("completions-surrogate", lambda t, c, b: t.step(prompts=["a"], completions=["\udfff"]), ValueError,
     "completions[0]"),
    ("prompts-too-long", lambda t, c, b: t.step(prompts=[" ".join(["hello"] * 40)], completions=[" yes"]),
     ValueError, "prompts[0] + completions[0]"),
    ("while-pending", lambda t, c, b: pending_then(t, lambda: t.step(input_ids=OK_IDS)), RuntimeError,
     "optim_step"),
]

GENERATE = [
    ("max_new_tokens-0", lambda t, c, b: t.generate(["a"], max_new_tokens=0), ValueError, "max_new_tokens"),
    ("max_new_tokens-negative", lambda t, c, b: t.generate(["a"], max_new_tokens=-1), ValueError, "max_new_tokens"),
    ("max_new_tokens-float", lambda t, c, b: t.generate(["a"], max_new_tokens=2.5), TypeError, "max_new_tokens"),
    ("max_new_tokens-str", lambda t, c, b: t.generate(["a"], max_new_tokens="8"), TypeError, "max_new_tokens"),
    ("max_new_tokens-bool", lambda t, c, b: t.generate(["a"], max_new_tokens=True), TypeError, "max_new_tokens"),
    ("max_new_tokens-2**40", lambda t, c, b: t.generate(["a"], max_new_tokens=2 ** 40), ValueError,
     "max_new_tokens"),
    ("max_new_tokens-past-positions", lambda t, c, b: t.generate(input_ids=[[5, 6, 7]], max_new_tokens=30),
     ValueError, "max_new_tokens"),
    ("prompt-past-positions", lambda t, c, b: t.generate(input_ids=[LONG], max_new_tokens=2), ValueError,
     "input_ids[0]"),
    ("temperature-0-sampling", lambda t, c, b: t.generate(["a"], do_sample=True, temperature=0.0), ValueError,
     "temperature"),
    ("temperature-1e-39", lambda t, c, b: t.generate(["a"], do_sample=True, temperature=1e-39), ValueError,
     "temperature"),
    ("temperature-negative", lambda t, c, b: t.generate(["a"], do_sample=True, temperature=-1.0), ValueError,
     "temperature"),
    ("temperature-nan", lambda t, c, b: t.generate(["a"], do_sample=True, temperature=math.nan), ValueError,
     "temperature"),
    ("temperature-inf", lambda t, c, b: t.generate(["a"], temperature=math.inf), ValueError, "temperature"),
    ("temperature-str", lambda t, c, b: t.generate(["a"], do_sample=True, temperature="1"), TypeError,
     "temperature"),
    ("top_k-negative", lambda t, c, b: t.generate(["a"], do_sample=True, top_k=-1), ValueError, "top_k"),
    ("top_k-2**40", lambda t, c, b: t.generate(["a"], do_sample=True, top_k=2 ** 40), ValueError, "top_k"),
    ("top_k-float", lambda t, c, b: t.generate(["a"], do_sample=True, top_k=1.5), TypeError, "top_k"),
    ("top_p-0", lambda t, c, b: t.generate(["a"], do_sample=True, top_p=0.0), ValueError, "top_p"),
    ("top_p-1.5", lambda t, c, b: t.generate(["a"], do_sample=True, top_p=1.5), ValueError, "top_p"),
    ("top_p-nan", lambda t, c, b: t.generate(["a"], do_sample=True, top_p=math.nan), ValueError, "top_p"),
    ("num_return_sequences-0", lambda t, c, b: t.generate(["a"], num_return_sequences=0), ValueError,
     "num_return_sequences"),
    ("num_return_sequences-greedy", lambda t, c, b: t.generate(["a"], num_return_sequences=2), ValueError,
     "num_return_sequences"),
    ("num_return_sequences-str", lambda t, c, b: t.generate(["a"], num_return_sequences="2"), TypeError,
     "num_return_sequences"),
    ("do_sample-str", lambda t, c, b: t.generate(["a"], do_sample="yes"), TypeError, "do_sample"),
    ("return_text-str", lambda t, c, b: t.generate(["a"], return_text="no"), TypeError, "return_text"),
    ("return_logprobs-int", lambda t, c, b: t.generate(["a"], return_logprobs=1), TypeError, "return_logprobs"),
    ("eos-str", lambda t, c, b: t.generate(["a"], eos_token_id="</s>"), TypeError, "eos_token_id"),
    ("eos-float", lambda t, c, b: t.generate(["a"], eos_token_id=2.7), TypeError, "eos_token_id"),
    ("eos-none-item", lambda t, c, b: t.generate(["a"], eos_token_id=[None]), TypeError, "eos_token_id"),
    ("eos-nested", lambda t, c, b: t.generate(["a"], eos_token_id=[[2]]), TypeError, "eos_token_id"),
    ("eos-2**70", lambda t, c, b: t.generate(["a"], eos_token_id=2 ** 70), ValueError, "eos_token_id"),
    ("eos-negative", lambda t, c, b: t.generate(["a"], eos_token_id=-1), ValueError, "eos_token_id"),
    ("eos-past-vocab", lambda t, c, b: t.generate(["a"], eos_token_id=[2, 10 ** 6]), ValueError, "eos_token_id"),
    ("eos-too-many", lambda t, c, b: t.generate(["a"], eos_token_id=list(range(2, 12))), ValueError,
     "eos_token_id"),
    ("eos-bool", lambda t, c, b: t.generate(["a"], eos_token_id=True), TypeError, "eos_token_id"),
    ("seed-negative", lambda t, c, b: t.generate(["a"], seed=-1), ValueError, "seed"),
    ("seed-2**64", lambda t, c, b: t.generate(["a"], seed=2 ** 64), ValueError, "seed"),
    ("seed-str", lambda t, c, b: t.generate(["a"], seed="abc"), TypeError, "seed"),
    ("seed-float", lambda t, c, b: t.generate(["a"], seed=1.5), TypeError, "seed"),
    ("prompts-str", lambda t, c, b: t.generate("a"), TypeError, "prompts"),
    ("prompts-dict", lambda t, c, b: t.generate({"a": "b"}), TypeError, "prompts"),
    ("prompts-generator", lambda t, c, b: t.generate(generator_of("a", "b")), TypeError, "prompts"),
    ("prompts-empty", lambda t, c, b: t.generate([]), ValueError, "prompts"),
    ("prompts-int", lambda t, c, b: t.generate([1]), TypeError, "prompts[0]"),
    ("prompts-surrogate", lambda t, c, b: t.generate(["\ud83d"]), ValueError, "prompts[0]"),
    ("input_ids-empty-row", lambda t, c, b: t.generate(input_ids=[[]]), ValueError, "input_ids[0]"),
    ("input_ids-negative", lambda t, c, b: t.generate(input_ids=[[-1, 5]]), ValueError, "input_ids[0]"),
    ("input_ids-past-vocab", lambda t, c, b: t.generate(input_ids=[[5, 10 ** 6]]), ValueError, "input_ids[0]"),
    ("input_ids-float", lambda t, c, b: t.generate(input_ids=[[5.0, 6.0]]), TypeError, "input_ids[0]"),
    ("prompts-and-input_ids", lambda t, c, b: t.generate(["a"], input_ids=[[5]]), ValueError, "exactly one"),
    ("no-prompts", lambda t, c, b: t.generate(), ValueError, "exactly one"),
    ("sample-num_samples-0", lambda t, c, b: t.sample(["a"], num_samples=0), ValueError, "num_samples"),
    ("sample-num_samples-str", lambda t, c, b: t.sample(["a"], num_samples="2"), TypeError, "num_samples"),
    ("sample-greedy", lambda t, c, b: t.sample(["a"], num_samples=2), ValueError, "num_samples"),
    ("sample-num_return_sequences", lambda t, c, b: t.sample(["a"], num_return_sequences=2), TypeError,
     "num_samples"),
    ("sample-no-logprobs", lambda t, c, b: t.sample(["a"], return_logprobs=False), ValueError, "return_logprobs"),
]

LOW_LEVEL = [
    ("data-empty", lambda t, c, b: t.forward_backward([]), ValueError, "data"),
    ("data-int", lambda t, c, b: t.forward_backward(5), ValueError, "data"),
    ("data-int-item", lambda t, c, b: t.forward_backward([5]), TypeError, "data[0]"),
    ("datum-empty", lambda t, c, b: t.forward_backward([Datum([], {})]), ValueError, "data[0].model_input"),
    ("datum-length", lambda t, c, b: t.forward_backward([ce_datum(weights=[1.0, 1.0])]), ValueError,
     "data[0].loss_fn_inputs['weights']"),
    ("datum-no-weights", lambda t, c, b: t.forward_backward([Datum([5, 6], {"target_tokens": [6, 7]})]), ValueError,
     "weights"),
    ("datum-no-targets", lambda t, c, b: t.forward_backward([Datum([5, 6], {"weights": [1.0, 1.0]})]), ValueError,
     "target_tokens"),
    ("datum-ppo-no-logprobs", lambda t, c, b: t.forward_backward([ce_datum(advantages=[1.0] * 4)], "ppo"),
     ValueError, "logprobs"),
    ("datum-id-past-vocab", lambda t, c, b: t.forward_backward([ce_datum(ids=(5, 10 ** 6, 7, 8))]), ValueError,
     "data[0].model_input"),
    ("datum-target-past-vocab", lambda t, c, b: t.forward_backward([ce_datum(target_tokens=[6, 7, 8, 10 ** 6])]),
     ValueError, "data[0].loss_fn_inputs['target_tokens']"),
    ("datum-target-negative", lambda t, c, b: t.forward_backward([ce_datum(target_tokens=[6, 7, 8, -100])]),
     ValueError, "target_tokens"),
    ("datum-weights-nan", lambda t, c, b: t.forward_backward([ce_datum(weights=[1.0, math.nan, 1.0, 1.0])]),
     ValueError, "weights"),
    ("datum-weights-1e39", lambda t, c, b: t.forward_backward([ce_datum(weights=[1e39] * 4)]), ValueError,
     "weights"),
    ("datum-weights-1e9", lambda t, c, b: t.forward_backward([ce_datum(weights=[1e9] * 4)]), ValueError, "weights"),
    ("datum-advantages-1e300", lambda t, c, b: t.forward_backward([rl_datum(advantages=[1e300] * 4)],
                                                                   "importance_sampling"), ValueError, "advantages"),
    ("datum-advantages-inf", lambda t, c, b: t.forward_backward([rl_datum(advantages=[math.inf] * 4)], "ppo"),
     ValueError, "advantages"),
    ("datum-logprobs-1e4", lambda t, c, b: t.forward_backward([rl_datum(logprobs=[-1e4] * 4)],
                                                               "importance_sampling"), ValueError, "logprobs"),
    ("datum-logprobs-positive", lambda t, c, b: t.forward_backward([rl_datum(logprobs=[0.5] * 4)], "ppo"),
     ValueError, "logprobs"),
    ("datum-logprobs-nan", lambda t, c, b: t.forward_backward([rl_datum(logprobs=[math.nan] * 4)], "cispo"),
     ValueError, "logprobs"),
    ("datum-too-long", lambda t, c, b: t.forward_backward([ce_datum(ids=LONG, target_tokens=LONG[1:] + [5],
                                                                    weights=[1.0] * len(LONG))]), ValueError,
     "positions"),
    ("datum-model_input-str", lambda t, c, b: Datum("hello", {}), ValueError, "model_input"),
    ("datum-model_input-float", lambda t, c, b: Datum([5.0, 6.0], {}), TypeError, "model_input"),
    ("datum-inputs-not-dict", lambda t, c, b: Datum([5, 6], [1, 2]), TypeError, "loss_fn_inputs"),
    ("datum-inputs-2d", lambda t, c, b: Datum([5, 6], {"weights": [[1.0], [1.0]]}), ValueError, "weights"),
    ("loss_fn-unknown", lambda t, c, b: t.forward_backward([ce_datum()], "nope"), ValueError, "loss_fn"),
    ("loss_fn-int", lambda t, c, b: t.forward_backward([ce_datum()], 5), ValueError, "loss_fn"),
    ("loss_fn_config-str-value", lambda t, c, b: t.forward_backward([rl_datum()], "ppo",
                                                                     {"clip_low_threshold": "abc"}), TypeError,
     "clip_low_threshold"),
    ("loss_fn_config-unknown", lambda t, c, b: t.forward_backward([rl_datum()], "ppo", {"bogus": 1}), ValueError,
     "loss_fn_config"),
    ("loss_fn_config-for-ce", lambda t, c, b: t.forward_backward([ce_datum()], "cross_entropy",
                                                                 {"clip_low_threshold": 0.5}), ValueError,
     "loss_fn_config"),
    ("loss_fn_config-low-above-high", lambda t, c, b: t.forward_backward(
        [rl_datum()], "cispo", {"clip_low_threshold": 1.5, "clip_high_threshold": 1.2}), ValueError,
     "clip_low_threshold"),
    ("loss_fn_config-nan", lambda t, c, b: t.forward_backward([rl_datum()], "ppo", {"clip_high_threshold": math.nan}),
     ValueError, "loss_fn_config"),
    ("loss_fn_config-not-dict", lambda t, c, b: t.forward_backward([rl_datum()], "ppo", "clip"), TypeError,
     "loss_fn_config"),
    ("forward-bad-datum", lambda t, c, b: t.forward([ce_datum(weights=[math.inf] * 4)]), ValueError, "weights"),
    ("forward-unknown-loss", lambda t, c, b: t.forward([ce_datum()], "dpo"), ValueError, "loss_fn"),
    ("custom-not-callable", lambda t, c, b: t.forward_backward_custom([ce_datum()], 5), TypeError, "fn"),
    ("custom-vector-loss", lambda t, c, b: t.forward_backward_custom([ce_datum()], vector_loss(b)), TypeError, "fn"),
    ("custom-no-pair", lambda t, c, b: t.forward_backward_custom([ce_datum()], scalar_only_loss(b)), TypeError,
     "fn"),
    ("custom-metrics-not-dict", lambda t, c, b: t.forward_backward_custom([ce_datum()], bad_metrics_loss(b)),
     TypeError, "fn"),
    ("custom-nan-loss", lambda t, c, b: t.forward_backward_custom([ce_datum()], nan_loss(b)), ValueError, "fn"),
    ("custom-too-long", lambda t, c, b: t.forward_backward_custom([ce_datum(ids=LONG, target_tokens=LONG[1:] + [5],
                                                                            weights=[1.0] * len(LONG))],
                                                                  nan_loss(b)), ValueError, "positions"),
    ("compute_logprobs-int", lambda t, c, b: t.compute_logprobs(5), TypeError, "input_ids"),
    ("compute_logprobs-short", lambda t, c, b: t.compute_logprobs([[5]]), ValueError, "input_ids[0]"),
    ("compute_logprobs-past-vocab", lambda t, c, b: t.compute_logprobs([[5, 10 ** 6]]), ValueError, "input_ids[0]"),
    ("compute_logprobs-str", lambda t, c, b: t.compute_logprobs(["hello"]), TypeError, "input_ids[0]"),
    ("compute_logprobs-too-long", lambda t, c, b: t.compute_logprobs([[5, 6, 7], LONG]), ValueError,
     "input_ids[1]"),
    ("optim_step-nothing", lambda t, c, b: t.optim_step(), RuntimeError, "forward_backward"),
    ("save_state-while-pending", lambda t, c, b: pending_then(t, lambda: t.save_state("pending_state")),
     RuntimeError, "optim_step"),
    ("load_state-while-pending", lambda t, c, b: pending_then(t, lambda: t.load_state(c["state"])), RuntimeError,
     "optim_step"),
]

EVALUATE = [
    ("no-dataset", lambda t, c, b: t.evaluate(), ValueError, "eval_dataset"),
    ("dataset-strings", lambda t, c, b: t.evaluate(eval_dataset=["a", "b"]), TypeError, "eval_dataset"),
    ("dataset-int", lambda t, c, b: t.evaluate(eval_dataset=5), TypeError, "eval_dataset"),
    ("dataset-text-and-texts", lambda t, c, b: t.evaluate(eval_dataset={"text": ["a b"], "texts": ["c d"]}),
     ValueError, "eval_dataset"),
    ("dataset-prompt-and-prompts", lambda t, c, b: t.evaluate(eval_dataset={"prompt": ["a"], "prompts": ["b"],
                                                                            "completion": ["c"]}), ValueError,
     "eval_dataset"),
    ("dataset-no-known-column", lambda t, c, b: t.evaluate(eval_dataset={"foo": ["a"]}), ValueError, "eval_dataset"),
    ("dataset-rows-differ", lambda t, c, b: t.evaluate(eval_dataset=[{"text": "a"}, {"texts": "b"}]), ValueError,
     "eval_dataset"),
    ("texts-str", lambda t, c, b: t.evaluate(texts="a b"), TypeError, "texts"),
    ("input_ids-past-vocab", lambda t, c, b: t.evaluate(input_ids=[[5, 10 ** 6]]), ValueError, "input_ids[0]"),
    ("input_ids-too-long", lambda t, c, b: t.evaluate(input_ids=[LONG]), ValueError, "positions"),
    ("metric_key_prefix-int", lambda t, c, b: t.evaluate(input_ids=OK_IDS, metric_key_prefix=5), TypeError,
     "metric_key_prefix"),
]

SAVE_LOAD = [
    ("save_state-none", lambda t, c, b: t.save_state(None), TypeError, "path"),
    ("save_state-int", lambda t, c, b: t.save_state(5), TypeError, "path"),
    ("save_state-bytes", lambda t, c, b: t.save_state(b"state"), TypeError, "path"),
    ("save_state-empty", lambda t, c, b: t.save_state(""), ValueError, "path"),
    ("save_state-dot", lambda t, c, b: t.save_state("."), ValueError, "working directory"),
    ("save_state-cwd-absolute", lambda t, c, b: t.save_state(os.getcwd()), ValueError, "working directory"),
    ("save_state-parent", lambda t, c, b: t.save_state(".."), ValueError, "above the working directory"),
    ("save_state-root", lambda t, c, b: t.save_state("/"), ValueError, "above the working directory"),
    ("save_state-user-dir", lambda t, c, b: t.save_state("notes"), ValueError, "not a state directory"),
    ("save_state-file", lambda t, c, b: t.save_state("user_file.txt"), ValueError, "existing file"),
    ("save_state-above-output_dir", lambda t, c, b: t.save_state(c["runs"]), ValueError, "above `output_dir`"),
    ("save_state-symlink", lambda t, c, b: t.save_state("link_to_notes"), ValueError, "symbolic link"),
    ("save_model-user-dir", lambda t, c, b: t.save_model("notes"), ValueError, "output_dir"),
    ("save_model-empty", lambda t, c, b: t.save_model(""), ValueError, "output_dir"),
    ("save_model-dot", lambda t, c, b: t.save_model("."), ValueError, "working directory"),
    ("save_model-parent", lambda t, c, b: t.save_model(".."), ValueError, "output_dir"),
    ("save_model-file", lambda t, c, b: t.save_model("user_file.txt"), ValueError, "existing file"),
    ("save_model-int", lambda t, c, b: t.save_model(5), TypeError, "output_dir"),
    ("save_model-above-output_dir", lambda t, c, b: t.save_model(c["runs"]), ValueError, "above `output_dir`"),
    ("save_checkpoint-user-dir", lambda t, c, b: t.save_checkpoint("notes"), ValueError, "checkpoint_dir",
     ("jax",)),
    ("save_checkpoint-dot", lambda t, c, b: t.save_checkpoint("."), ValueError, "working directory", ("jax",)),
    ("merge_and_save-user-dir", lambda t, c, b: t.merge_and_save("notes"), ValueError, "output_dir", ("jax",)),
    ("load_state-none", lambda t, c, b: t.load_state(None), TypeError, "path"),
    ("load_state-empty", lambda t, c, b: t.load_state(""), TypeError, "path"),
    ("load_state-missing", lambda t, c, b: t.load_state("no_such_state"), FileNotFoundError, "no_such_state"),
    ("load_state-user-dir", lambda t, c, b: t.load_state("notes"), CheckpointError, "manifest"),
    ("load_state-file", lambda t, c, b: t.load_state("user_file.txt"), CheckpointError, "not a directory"),
    ("load_state-other-engine", lambda t, c, b: t.load_state(c["other_engine_state"]), CheckpointError, "engine"),
    ("load_state-other-optimizer", lambda t, c, b: t.load_state(c["sgd_state"]), (CheckpointError, ValueError),
     "optim"),
    ("load_state-edited-counters", lambda t, c, b: t.load_state(c["edited_counters_state"]), CheckpointError,
     "global_step"),
    ("load_state-damaged", lambda t, c, b: t.load_state(c["damaged_state"]), CheckpointError, "changed since"),
]

GROUPS = {"construction": CONSTRUCTION, "step": STEP, "generate": GENERATE, "low_level": LOW_LEVEL,
          "evaluate": EVALUATE, "save_load": SAVE_LOAD}
CASES = [pytest.param(case, id=f"{group}-{case[0]}") for group, cases in GROUPS.items() for case in cases]


# ----------------------------------------------------------------------------------------------------------
# Custom loss functions for forward_backward_custom, per engine


def _ops(backend):
    if backend == "jax":
        import jax.numpy as jnp

        return jnp
    import torch

    return torch


def vector_loss(backend):
    return lambda logprobs, inputs: (-(logprobs * inputs["mask"]).sum(-1), {})


def scalar_only_loss(backend):
    return lambda logprobs, inputs: -(logprobs * inputs["mask"]).sum()


def bad_metrics_loss(backend):
    return lambda logprobs, inputs: (-(logprobs * inputs["mask"]).sum(), "metrics")


def nan_loss(backend):
    ops = _ops(backend)
    return lambda logprobs, inputs: ((logprobs * inputs["mask"]).sum() * ops.asarray(math.nan), {})


def pending_then(trainer, call):
    """``call()`` while a forward_backward is pending; the pending update is applied afterwards either way (so
    later cases start with none) — the fingerprint taken around the whole includes it, so the test compares the
    refused call against a trainer that did the same forward_backward + optim_step without it."""
    trainer.forward_backward([ce_datum()])
    try:
        call()
    finally:
        trainer.optim_step()


# ----------------------------------------------------------------------------------------------------------


def tree_snapshot(root: str, skip: str) -> dict[str, tuple]:
    """``{path: (size, mtime, inode)}`` of every file and directory under ``root`` except under ``skip`` (the run's
    output directory): a file written, replaced or removed changes its entry."""
    out = {}
    for directory, dirs, files in os.walk(root):
        if os.path.abspath(directory).startswith(os.path.abspath(skip)):
            continue
        for name in files + dirs:
            info = os.lstat(os.path.join(directory, name))
            out[os.path.relpath(os.path.join(directory, name), root)] = (info.st_size, info.st_mtime_ns, info.st_ino)
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer):
    """The working directory of every case: the model, a user's folder and file, states to load."""
    root = tmp_path_factory.mktemp("bad-input")
    model_dir = save_tiny_model(root / "model", "gpt2", tokenizer, n_positions=POSITIONS)
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("the user's notes")
    (root / "user_file.txt").write_text("the user's file")
    os.symlink(root / "notes", root / "link_to_notes")
    return {"root": str(root), "model_dir": model_dir, "tokenizer": tokenizer, "runs": str(root / "runs"),
            "out": str(root / "runs" / "out")}


def _states(ctx, trainer, backend, other):
    """States for the load cases: this engine's (valid), the other engine's, another optimizer's, one whose
    counters file was edited and its manifest re-signed, one with a flipped byte."""
    root = ctx["root"]
    states = {"state": os.path.join(root, f"state-{backend}")}
    trainer.save_state(states["state"])
    states["other_engine_state"] = os.path.join(root, f"state-{other.args.backend}-for-{backend}")
    other.save_state(states["other_engine_state"])
    sgd = build(ctx, backend, optim="sgd")
    sgd.step(input_ids=OK_IDS)
    states["sgd_state"] = os.path.join(root, f"state-sgd-{backend}")
    sgd.save_state(states["sgd_state"])
    edited = states["edited_counters_state"] = os.path.join(root, f"state-edited-{backend}")
    shutil.copytree(states["state"], edited)
    with open(os.path.join(edited, "itersft_state.json")) as f:
        counters = json.load(f)
    counters["global_step"] = "three"
    with open(os.path.join(edited, "itersft_state.json"), "w") as f:
        json.dump(counters, f)
    manifest = json.load(open(os.path.join(edited, MANIFEST_FILE)))
    os.remove(os.path.join(edited, MANIFEST_FILE))
    tmp = edited + ".resign"
    os.rename(edited, tmp)
    finish(tmp, edited, {}, manifest["global_step"])  # a manifest that matches the edited file
    damaged = states["damaged_state"] = os.path.join(root, f"state-damaged-{backend}")
    shutil.copytree(states["state"], damaged)
    target = max((os.path.join(d, f) for d, _, files in os.walk(damaged) for f in files
                  if f != MANIFEST_FILE), key=os.path.getsize)
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    return states


@pytest.fixture(scope="module")
def trainers(workspace):
    """One trained trainer per engine (one step() each), and the states the load cases read."""
    cwd = os.getcwd()
    os.chdir(workspace["root"])
    try:
        built = {b: build(workspace, b) for b in BACKENDS}
        for trainer in built.values():
            trainer.step(input_ids=[[5, 6, 7, 8, 9], [9, 8, 7, 6]])
        contexts = {b: {**workspace, **_states(workspace, built[b], b, built[o])}
                    for b, o in (("jax", "torch"), ("torch", "jax"))}
    finally:
        os.chdir(cwd)
    return built, contexts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_naming_it_and_changes_nothing(case, backend, trainers, monkeypatch):
    name, call, error, fragment, *engines = case
    if engines and backend not in engines[0]:
        pytest.skip(f"{name}: {engines[0]} only")
    built, contexts = trainers
    trainer, ctx = built[backend], contexts[backend]
    monkeypatch.chdir(ctx["root"])
    files = tree_snapshot(ctx["root"], ctx["out"])
    before = fingerprint(trainer)
    if name in ("while-pending", "save_state-while-pending", "load_state-while-pending"):
        before = _after_pending_update(trainer)  # what the same forward_backward + optim_step give
    with pytest.raises(error) as raised:
        call(trainer, ctx, backend)
    message = str(raised.value)
    assert fragment in message, f"{name}: the message does not name {fragment!r}: {message}"
    assert "Traceback" not in message
    assert fingerprint(trainer) == before, f"{name}: the refused call changed the trainer"
    assert tree_snapshot(ctx["root"], ctx["out"]) == files, f"{name}: files outside output_dir changed"


def _after_pending_update(trainer) -> str:
    """The fingerprint a refused call inside ``pending_then`` must leave: that of a trainer which did the same
    forward_backward + optim_step, computed on a copy of the state made by save_state / load_state."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "s")
        trainer.save_state(saved)
        trainer.forward_backward([ce_datum()])
        trainer.optim_step()
        expected = fingerprint(trainer)
        trainer.load_state(saved)
    return expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fresh_trainer_is_unchanged_by_forward_only_and_refused_passes(backend, workspace):
    """The module's shared trainer has run Datum passes before most cases, which hid this: on a trainer that ran
    none, a forward-only pass or a refused ``forward_backward_custom`` must not raise the packed row length's
    high-water mark (a saved counter) — only a committed backward pass or update does."""
    trainer = build(workspace, backend)
    before = fingerprint(trainer)
    trainer.forward([ce_datum(ids=tuple(range(5, 25)))])
    trainer.compute_logprobs([list(range(5, 25))])
    assert fingerprint(trainer) == before, "a forward-only pass changed the trainer"
    for refused in (nan_loss, vector_loss):
        with pytest.raises((TypeError, ValueError), match="fn"):
            trainer.forward_backward_custom([ce_datum(ids=tuple(range(5, 25)))], refused(backend))
        assert fingerprint(trainer) == before, f"a refused forward_backward_custom ({refused.__name__}) changed it"
