"""One test per TRL 0.23.1 IterativeSFTTrainer defect (DESIGN.md (a)-(l)), on both engines.

Each docstring says what TRL did; each test asserts the fixed behaviour in a way TRL's behaviour fails. The
reference is torch's: one padded forward of all samples, sum of token CE / label tokens, clipping, one SGD
step at lr 1 (``tests/support/torch_reference.py``), so the parameters compare the clipped gradient's values.
Tolerances, fp32 on CPU: the torch engine 1e-6 on losses and parameters (only the reduction order differs); the JAX
engine 1e-5 (another implementation of the same math: XLA's reductions and its own optimizer).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from tests.support.engines import BACKENDS, make_trainer, trained_state_dict
from tests.support.offline import tiny_model
from tests.support.torch_reference import max_diff, random_samples, reference_update, snapshot

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is two plus two? Answer: four.",
    "Rejection sampling keeps only the verified completions.",
    "12 + 30 = 42.",
]
TOL = {"torch": 1e-6, "jax": 1e-5}
# Adam's first step is about lr * sign(g): parameters after it show the gradient's signs, not its values. SGD at lr 1
# moves each parameter by the clipped gradient itself, so parameters within TOL compare gradients element by element.
SGD = {"optim": "sgd", "learning_rate": 1.0}


def assert_reference_update(trainer, stats, reference, backend):
    """The call's loss (TOL), grad norm before clipping (1e-5 relative) and parameters (TOL) are the reference's."""
    ref, ref_loss, ref_norm = reference
    assert stats["loss"] == pytest.approx(ref_loss, abs=TOL[backend])
    assert stats["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
    assert max_diff(snapshot(ref), trained_state_dict(trainer)) <= TOL[backend]


def samples_of(n, vocab, seed=0, lo=6, hi=16):
    return random_samples(n, vocab, seed, lo=lo, hi=hi)


# ----------------------------------------------------------------------------------------------------------


def test_a_texts_labels_are_the_seq2seq_targets(tokenizer, tmp_path):
    """TRL tokenized `texts` again for the labels, so `texts_labels` was ignored: the model learnt to copy
    its input. The call's loss must be the CE against `texts_labels` (1e-5), not against `texts`. (Encoder-decoder
    models train on the torch engine only.)"""
    model = tiny_model("bart", len(tokenizer))
    sources, targets = TEXTS, [t[::-1] for t in TEXTS]
    enc = tokenizer(sources, padding=True, return_tensors="pt")

    def hf_loss(texts):
        dec = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            labels = dec["input_ids"].masked_fill(dec["attention_mask"] == 0, -100)
            return copy.deepcopy(model).train()(**enc, labels=labels).loss.item()

    on_targets, on_sources = hf_loss(targets), hf_loss(sources)
    assert abs(on_targets - on_sources) > 1e-3
    stats = make_trainer("torch", model, tokenizer, tmp_path).step(texts=sources, texts_labels=targets)
    assert stats["loss"] == pytest.approx(on_targets, abs=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_b_max_length_truncates_sequences_not_the_batch(backend, mode, tokenizer, tmp_path):
    """TRL sliced `[batch, seq]` tensors with `v[-max_length:]`: 6 samples and max_length=4 trained on the
    last 4 samples, untruncated. Every sample must be kept, each cut to its last (keep_end) or first
    (keep_start) 4 tokens; loss and update equal the reference on those truncated sequences."""
    model = tiny_model("llama", len(tokenizer))
    samples = samples_of(6, len(tokenizer), lo=10, hi=14)
    cut = [x[-4:] if mode == "keep_end" else x[:4] for x in samples]
    reference = reference_update(model, cut, lr=1.0, optim="sgd")
    trainer = make_trainer(backend, model, tokenizer, tmp_path, max_length=4, truncation_mode=mode, **SGD)
    stats = trainer.step(input_ids=samples)
    assert (stats["samples"], stats["num_tokens"]) == (6, 6 * 3)
    assert_reference_update(trainer, stats, reference, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_c_causal_lm_labels_are_honoured(backend, tokenizer, tmp_path):
    """TRL dropped user `labels` for causal LMs and rebuilt them from `input_ids`, so prompt masking was
    impossible. Prompt-masked labels must give the reference update computed with those labels, and a different
    update from all-token labels."""
    base = tiny_model("llama", len(tokenizer))
    samples = samples_of(4, len(tokenizer), seed=1)
    masked = [torch.cat([torch.full((len(x) // 2,), -100), x[len(x) // 2:]]) for x in samples]
    reference = reference_update(base, samples, masked, lr=1.0, optim="sgd")

    trainer = make_trainer(backend, copy.deepcopy(base), tokenizer, tmp_path / "masked", **SGD)
    stats = trainer.step(input_ids=samples, labels=masked)
    assert stats["num_tokens"] == sum(len(x) - len(x) // 2 for x in samples)
    assert_reference_update(trainer, stats, reference, backend)

    unmasked = make_trainer(backend, copy.deepcopy(base), tokenizer, tmp_path / "all", **SGD)
    unmasked.step(input_ids=samples, labels=samples)
    assert max_diff(trained_state_dict(unmasked), trained_state_dict(trainer)) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_d_eos_is_a_label_when_pad_equals_eos(backend, tokenizer_pad_eq_eos, tmp_path):
    """TRL's DataCollatorForLanguageModeling set every label equal to pad_token_id to -100; with pad == eos
    the EOS was never a target and the model never learnt to stop. EOS must stay a label token, for
    `input_ids` and for `prompts`/`completions` (which append it)."""
    tok = tokenizer_pad_eq_eos
    assert tok.pad_token_id == tok.eos_token_id
    model = tiny_model("llama", len(tok))
    ids = [torch.tensor(tok(t)["input_ids"] + [tok.eos_token_id]) for t in TEXTS[:2]]
    reference = reference_update(model, ids, lr=1.0, optim="sgd")
    trainer = make_trainer(backend, model, tok, tmp_path, **SGD)
    stats = trainer.step(input_ids=ids, attention_mask=[torch.ones_like(x) for x in ids])
    assert stats["num_tokens"] == sum(len(x) - 1 for x in ids)  # EOS included
    assert_reference_update(trainer, stats, reference, backend)
    completion = tok(" four.", add_special_tokens=False)["input_ids"]
    stats = trainer.step(prompts=["Question: what is two plus two? Answer:"], completions=[" four."])
    assert stats["num_tokens"] == len(completion) + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_e_default_schedule_trains_from_the_first_update(backend, tokenizer, tmp_path):
    """TRL's default (max_steps=-1, linear) built a schedule of -1 steps: LR 0 from the first update, the
    default configuration never trained. Every update must use the configured LR and move the weights."""
    model = tiny_model("llama", len(tokenizer))
    trainer = make_trainer(backend, model, tokenizer, tmp_path)
    assert trainer.args.max_steps == -1 and trainer.args.lr_scheduler_type == "linear"
    before = trained_state_dict(trainer)
    for _ in range(3):
        stats = trainer.step(texts=TEXTS)
        assert stats["learning_rate"] == pytest.approx(trainer.args.learning_rate)
    assert max_diff(before, trained_state_dict(trainer)) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_f_gradient_accumulation_is_honoured(backend, tokenizer, tmp_path):
    """TRL stepped the optimizer after every micro-batch, ignoring gradient_accumulation_steps. 4 samples,
    batch 1, accumulation 4 must be exactly one optimizer update — counted by the optimizer itself too."""
    trainer = make_trainer(backend, tiny_model("llama", len(tokenizer)), tokenizer, tmp_path,
                           per_device_train_batch_size=1, gradient_accumulation_steps=4)
    stats = trainer.step(texts=TEXTS)
    assert stats["updates"] == 1 and trainer.state.global_step == 1
    if backend == "torch":
        assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {1}
    else:
        assert int(trainer.train_state.step) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_g_input_ids_with_attention_mask_and_no_labels(backend, tokenizer, tmp_path):
    """TRL raised on `step(input_ids=..., attention_mask=...)` without labels, despite documenting that
    labels default to input_ids. It must train, with labels = input_ids where attended."""
    trainer = make_trainer(backend, tiny_model("llama", len(tokenizer)), tokenizer, tmp_path)
    ids = [torch.tensor(tokenizer(t)["input_ids"]) for t in TEXTS]
    before = trained_state_dict(trainer)
    stats = trainer.step(input_ids=ids, attention_mask=[torch.ones_like(x) for x in ids])
    assert stats["num_tokens"] == sum(len(x) - 1 for x in ids)
    assert max_diff(before, trained_state_dict(trainer)) > 0


def _checkpointing_on(model) -> bool:
    prop = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(model, prop))


@pytest.mark.parametrize("enabled", [True, False])
def test_h_gradient_checkpointing_is_enabled_and_bf16_is_off_on_cpu_torch(enabled, tokenizer, tmp_path):
    """TRL never enabled gradient checkpointing (default True: no memory saved) and turned bf16 on by
    default, even on CPU. Checkpointing must really recompute (each decoder layer runs twice per
    micro-batch: forward + recompute), and the CPU default must compute in fp32."""
    model = tiny_model("llama", len(tokenizer))
    trainer = make_trainer("torch", model, tokenizer, tmp_path,
                           **({} if enabled else {"gradient_checkpointing": False}))
    assert _checkpointing_on(model) is enabled
    assert trainer.args.bf16 is False
    layer_calls, head_dtypes = [], []
    # transformers checkpoints the layer's `forward` (its own hooks stay outside) and torch stops the
    # recompute early once the saved tensors are rebuilt: count pre-hooks of the layer's first module.
    model.model.layers[0].input_layernorm.register_forward_pre_hook(lambda *_: layer_calls.append(1))
    model.lm_head.register_forward_hook(lambda m, i, out: head_dtypes.append(out.dtype))
    trainer.step(texts=TEXTS[:1])
    assert len(layer_calls) == (2 if enabled else 1)
    assert head_dtypes == [torch.float32]


def _count_primitive(jaxpr, name: str) -> int:
    """Equations of primitive ``name`` in ``jaxpr`` and in every jaxpr nested in its equations' parameters."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's Jaxpr
                if hasattr(inner, "eqns"):
                    count += _count_primitive(inner, name)
    return count


@pytest.mark.parametrize("enabled", [True, False])
def test_h_gradient_checkpointing_is_enabled_and_bf16_is_off_on_cpu_jax(enabled, tokenizer, tmp_path):
    """(h) on the JAX engine: gradient_checkpointing (the default) rematerializes every decoder layer — the
    program the trainer's jitted step compiled for the update holds one remat per layer, and none without it —
    and the CPU default computes in fp32."""
    import jax
    import jax.numpy as jnp

    model = tiny_model("llama", len(tokenizer))
    trainer = make_trainer("jax", model, tokenizer, tmp_path, **({} if enabled else {"gradient_checkpointing": False}))
    assert trainer.args.bf16 is False and trainer.compute_dtype == jnp.float32
    step, programs = trainer.train_step, []

    def traced_step(state, batch):  # the program jit compiles for these arguments (traced before they are donated)
        programs.append(jax.make_jaxpr(step)(state, batch).jaxpr)
        return step(state, batch)

    trainer.engine.train_step = traced_step  # the engine runs the update
    trainer.step(texts=TEXTS[:1])
    remat = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).eqns[0].primitive.name  # JAX's name for it
    assert len(programs) == 1
    assert _count_primitive(programs[0], remat) == (model.config.num_hidden_layers if enabled else 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_h_explicit_bf16_computes_in_bf16_on_cpu_with_fp32_master_weights(backend, tokenizer, tmp_path):
    """The other half of (h): bf16 happens only when asked for, and then works on a CPU, over fp32 master
    weights."""
    import jax
    import jax.numpy as jnp

    model = tiny_model("llama", len(tokenizer))
    trainer = make_trainer(backend, model, tokenizer, tmp_path, bf16=True)
    head_dtypes = []
    if backend == "torch":
        model.lm_head.register_forward_hook(lambda m, i, out: head_dtypes.append(out.dtype))
    stats = trainer.step(texts=TEXTS)
    assert 0 < stats["loss"] < 10
    if backend == "torch":
        assert head_dtypes == [torch.bfloat16] and next(model.parameters()).dtype == torch.float32
    else:
        assert trainer.compute_dtype == jnp.bfloat16
        assert {leaf.dtype for leaf in jax.tree.leaves(trainer.params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_i_fractional_logging_steps_log(backend, tokenizer, tmp_path):
    """TRL passed logging_steps=0.5 through unconverted and logged nothing. With max_steps=4 it is every
    2 updates."""
    trainer = make_trainer(backend, tiny_model("llama", len(tokenizer)), tokenizer, tmp_path,
                           per_device_train_batch_size=1, logging_steps=0.5, max_steps=4,
                           lr_scheduler_type="constant", report_to="none")
    trainer.step(texts=TEXTS)
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [2, 4]


def _tokenizer_state(tok) -> dict:
    state = {k: repr(v) for k, v in vars(tok).items()}
    state.update(truncation_side=tok.truncation_side, padding_side=tok.padding_side,
                 backend_truncation=repr(tok.backend_tokenizer.truncation),
                 backend_padding=repr(tok.backend_tokenizer.padding))
    return state


@pytest.mark.parametrize("backend", BACKENDS)
def test_j_callers_tokenizer_is_not_mutated(backend, tokenizer, tmp_path):
    """TRL set `tokenizer.truncation_side = "left"` on the caller's tokenizer (keep_end) and tokenized with
    truncation/padding on. Construction and every input form must leave its settings untouched."""
    before = _tokenizer_state(tokenizer)
    assert before["truncation_side"] == "right"
    trainer = make_trainer(backend, tiny_model("llama", len(tokenizer)), tokenizer, tmp_path, max_length=8,
                           truncation_mode="keep_end")
    trainer.step(texts=TEXTS)
    trainer.step(prompts=["Question: what is two plus two? Answer:"], completions=[" four."])
    assert _tokenizer_state(tokenizer) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_logged_loss_is_per_update_and_unrounded(backend, tokenizer, tmp_path):
    """TRL logged one loss per micro-batch, rounded to 4 decimals. With batch 2 x accumulation 2 and
    logging_steps=1 there must be one log entry per update, holding the update's token-weighted loss (a
    4-decimal rounding of this reference is off by more than the tolerance)."""
    model = tiny_model("llama", len(tokenizer))
    samples = samples_of(4, len(tokenizer), seed=7)  # its loss is 4.8e-5 away from its 4-decimal rounding
    _, ref_loss, _ = reference_update(model, samples)
    assert abs(round(ref_loss, 4) - ref_loss) > TOL[backend], "pick a seed whose loss is not 4-decimal round"
    trainer = make_trainer(backend, model, tokenizer, tmp_path, per_device_train_batch_size=2,
                           gradient_accumulation_steps=2, logging_steps=1, report_to="none")
    trainer.step(input_ids=samples)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 1
    assert logs[0]["loss"] == pytest.approx(ref_loss, abs=TOL[backend])
    trainer.step(input_ids=samples + samples)  # 8 samples = 2 updates -> 2 more entries, not 4
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_l_quick_start_config_on_cpu_and_step_returns_stats(backend, tokenizer, tmp_path, caplog):
    """TRL's own quick-start config raised on a CPU-only machine (bf16 defaulted to True), and its step()
    returned nothing useful. The config must construct with bf16 off, and step() return a dict."""
    from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer

    caplog.set_level(logging.WARNING)
    args = IterativeSFTConfig(max_length=512, output_dir=str(tmp_path / "output"))
    assert args.bf16 is False and not args.use_cpu
    stats = IterativeSFTTrainer(tiny_model("llama", len(tokenizer)), args=args, processing_class=tokenizer,
                                backend=backend).step(texts=TEXTS)
    assert isinstance(stats, dict) and stats["updates"] == 1 and stats["loss"] > 0
