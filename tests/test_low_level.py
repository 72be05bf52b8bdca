"""The low-level API (``forward_backward`` / ``forward`` / ``forward_backward_custom`` / ``optim_step`` /
``compute_logprobs`` / ``save_state``) on both engines, against float64 references.

Tolerances: each built-in loss and its gradients equal a float64 torch reference (the formulas hand-written here, the
model in double) within 1e-5 (rtol and atol) on both engines — so the engines agree within 2e-5, tighter than the
1e-4 the issue asks; a custom function reproducing a built-in, and ``step()`` vs ``forward_backward`` + ``optim_step``,
agree to 1e-6; one batch split into 1, 2 or 4 calls accumulates the same gradients to 1e-6; a resumed run's losses are
bit-identical.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from itersft_jax import Datum, IterativeSFTConfig, IterativeSFTTrainer
from itersft_jax.shared.datum import make_data
from tests.support import module_command, root_on_path
from tests.support.engines import make_trainer

ENGINES = ("jax", "torch")
PROMPTS = [[1, 40, 41, 42], [1, 50], [1, 60, 61]]
COMPLETIONS = [[70, 71, 72, 2], [80, 81, 82, 83, 84, 2], [90, 2]]


# Plain SGD at a constant rate, no clipping or decay: an update is exactly -lr * the accumulated gradient.
PLAIN_SGD = dict(per_device_train_batch_size=2, learning_rate=1e-2, gradient_checkpointing=False, report_to="none",
                 disable_tqdm=True, optim="sgd", max_grad_norm=0.0, weight_decay=0.0, lr_scheduler_type="constant")


def sgd_trainer(model_dir, tokenizer, tmp_path, backend, **overrides):
    return make_trainer(backend, model_dir, tokenizer, tmp_path / backend, **{**PLAIN_SGD, **overrides})


def rl_data(seed: int = 0) -> list[Datum]:
    """Completions with sampler logprobs near the model's (ratios around 1, some beyond ppo's clip) and
    advantages of both signs."""
    rng = np.random.default_rng(seed)
    logprobs = [-5.8 + rng.uniform(-0.4, 0.4, len(c)) for c in COMPLETIONS]
    return make_data(PROMPTS, COMPLETIONS, logprobs=logprobs, advantages=[1.0, -0.7, 0.4])


def reference(model_dir, data: list[Datum], loss_fn: str, lo: float = 0.8, hi: float = 1.2):
    """(loss, {name: gradient}) in float64: the HF model in double, the formulas written out here."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    total = 0.0
    for datum in data:
        ids = torch.tensor(datum.model_input)[None]
        logp_all = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        inputs = {k: torch.tensor(v, dtype=torch.float64) for k, v in datum.loss_fn_inputs.items()}
        logp = logp_all.gather(-1, torch.tensor(datum.loss_fn_inputs["target_tokens"])[:, None])[:, 0]
        if loss_fn == "cross_entropy":
            loss = -(inputs["weights"] * logp).sum()
        else:
            ratio, adv = torch.exp(logp - inputs["logprobs"]), inputs["advantages"]
            if loss_fn == "importance_sampling":
                loss = -(ratio * adv).sum()
            elif loss_fn == "ppo":
                loss = -torch.minimum(ratio * adv, torch.clamp(ratio, lo, hi) * adv).sum()
            else:  # cispo
                loss = -(torch.clamp(ratio, lo, hi).detach() * adv * logp).sum()
        total = total + loss
    total.backward()
    return float(total.detach()), {n: p.grad.numpy() for n, p in model.named_parameters()}


def assert_grads_close(got: dict, want: dict, rtol: float, atol: float):
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("loss_fn", ["cross_entropy", "importance_sampling", "ppo", "cispo"])
def test_builtin_loss_and_gradients_equal_float64_reference(tiny_model_dir, tokenizer, tmp_path, backend, loss_fn):
    model_dir = tiny_model_dir("llama")
    data = rl_data()
    want_loss, want_grads = reference(model_dir, data, loss_fn)
    trainer = sgd_trainer(model_dir, tokenizer, tmp_path, backend)
    out = trainer.forward_backward(data, loss_fn)
    assert out.metrics["loss:sum"] == pytest.approx(want_loss, rel=1e-5, abs=1e-5)
    assert out.metrics["num_tokens"] == sum(len(d) for d in data)
    assert [len(o["logprobs"]) for o in out.loss_fn_outputs] == [len(d) for d in data]
    assert_grads_close(trainer.accumulated_gradients(), want_grads, rtol=1e-5, atol=1e-5)
    forward = trainer.forward(data, loss_fn)  # no gradients: same loss and logprobs
    assert forward.metrics["loss:sum"] == pytest.approx(out.metrics["loss:sum"], rel=1e-6, abs=1e-6)


def reference_metrics(model_dir, data: list[Datum], lo: float = 0.8, hi: float = 1.2) -> dict[str, dict]:
    """The RL diagnostics as documented (``docs/low_level_api.md``) for each RL loss, in float64: the HF model in
    double, over the tokens with a non-zero advantage, written out here."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    d, adv = [], []
    with torch.no_grad():
        for datum in data:
            logp_all = torch.log_softmax(model(input_ids=torch.tensor(datum.model_input)[None]).logits[0], dim=-1)
            logp = logp_all.gather(-1, torch.tensor(datum.loss_fn_inputs["target_tokens"])[:, None])[:, 0].numpy()
            on = datum.loss_fn_inputs["advantages"] != 0
            d.extend(logp[on] - datum.loss_fn_inputs["logprobs"][on])
            adv.extend(datum.loss_fn_inputs["advantages"][on])
    d, adv = np.array(d), np.array(adv)
    r = np.exp(d)
    assert np.min(np.abs(np.concatenate([r - lo, r - hi]))) > 1e-4  # no ratio within rounding of a threshold
    common = {"log_ratio_abs:mean": np.abs(d).mean(), "kl_sampler:mean": (r - 1 - d).mean(),
              "trained_tokens:sum": float(len(d))}
    return {"importance_sampling": common,
            # ppo: the tokens whose gradient the clip removes; cispo: the tokens whose weight the clip changes
            "ppo": {**common, "clip_fraction:mean": np.mean([(x > hi and a > 0) or (x < lo and a < 0)
                                                             for x, a in zip(r, adv)])},
            "cispo": {**common, "clip_fraction:mean": np.mean([x > hi or x < lo for x in r])}}


@pytest.mark.parametrize("backend", ENGINES)
def test_rl_loss_metrics_equal_float64_reference(tiny_model_dir, tokenizer, tmp_path, backend):
    """forward_backward's diagnostics (mean |log-ratio|, KL to the sampler, clipped fraction) are computed over the
    trained tokens as documented: float64 reference within 1e-5; the clipped fraction exactly (no ratio near a
    threshold). The prompt positions (advantage 0, sampler logprob 0) are left out — with them, |log-ratio| would be
    ~6. ``cross_entropy`` reports none of them."""
    model_dir = tiny_model_dir("llama")
    data = rl_data()
    reference_all = reference_metrics(model_dir, data)
    assert 0 < reference_all["ppo"]["clip_fraction:mean"] <= reference_all["cispo"]["clip_fraction:mean"] < 1
    trainer = sgd_trainer(model_dir, tokenizer, tmp_path, backend)
    for loss_fn, want in reference_all.items():
        got = trainer.forward(data, loss_fn).metrics
        assert got["trained_tokens:sum"] == want["trained_tokens:sum"] == sum(len(c) for c in COMPLETIONS)
        for key in ("log_ratio_abs:mean", "kl_sampler:mean"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), (loss_fn, key)
        assert got.get("clip_fraction:mean") == want.get("clip_fraction:mean"), loss_fn
    assert trainer.forward_backward(data, "ppo").metrics == pytest.approx(trainer.forward(data, "ppo").metrics,
                                                                         rel=1e-6, abs=1e-6)
    assert set(trainer.forward(make_data(PROMPTS, COMPLETIONS)).metrics) == {"loss:sum", "num_tokens"}


def test_ppo_clip_thresholds_come_from_loss_fn_config(tiny_model_dir, tokenizer, tmp_path):
    model_dir = tiny_model_dir("llama")
    data = rl_data()
    want_loss, _ = reference(model_dir, data, "ppo", lo=0.95, hi=1.05)
    trainer = sgd_trainer(model_dir, tokenizer, tmp_path, "jax")
    out = trainer.forward(data, "ppo", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05})
    assert out.metrics["loss:sum"] == pytest.approx(want_loss, rel=1e-5, abs=1e-5)
    assert out.metrics["loss:sum"] != pytest.approx(trainer.forward(data, "ppo").metrics["loss:sum"], abs=1e-4)


@pytest.mark.parametrize("backend", ENGINES)
def test_custom_fn_reproducing_importance_sampling_gives_the_same_gradients(tiny_model_dir, tokenizer, tmp_path,
                                                                            backend):
    xp = torch if backend == "torch" else __import__("jax.numpy", fromlist=["exp"])

    def importance_sampling(logprobs, inputs):
        loss = -xp.sum(xp.exp(logprobs - inputs["logprobs"]) * inputs["advantages"] * inputs["mask"])
        return loss, {"mean_logprob": xp.sum(logprobs * inputs["mask"]) / xp.sum(inputs["mask"])}

    # The custom path (logprobs, then the user's loss, then the model's VJP) and the built-in loss's one program
    # differ in fp32 operation order, so they are compared where either is judged: against the float64 reference,
    # at the built-in's own bar (1e-5). Comparing the two fp32 paths with each other at 1e-6 depended on the CPU
    # (seen: one entry of 20480 off by 1.4e-6, 4.6e-6 relative, on one machine; within 1e-6 on another).
    model_dir = tiny_model_dir("llama")
    data = rl_data()
    want_loss, want_grads = reference(model_dir, data, "importance_sampling")
    builtin = sgd_trainer(model_dir, tokenizer, tmp_path / "a", backend)
    want = builtin.forward_backward(data, "importance_sampling")
    custom = sgd_trainer(model_dir, tokenizer, tmp_path / "b", backend)
    got = custom.forward_backward_custom(data, importance_sampling)
    assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-6, abs=1e-6)
    assert got.metrics["loss:sum"] == pytest.approx(want_loss, rel=1e-5, abs=1e-5)
    assert math.isfinite(got.metrics["mean_logprob"])
    assert_grads_close(custom.accumulated_gradients(), want_grads, rtol=1e-5, atol=1e-5)


def _params(trainer) -> dict[str, np.ndarray]:
    if hasattr(trainer, "train_state"):
        import jax
        from flax import nnx

        from itersft_jax.models import get_family

        params = jax.device_get(nnx.to_pure_dict(trainer.params))
        return get_family(trainer.config.model_type).params_to_hf(params, trainer.config)
    return {n: p.detach().numpy().copy() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("backend", ENGINES)
def test_step_equals_forward_backward_then_optim_step(tiny_model_dir, tokenizer, tmp_path, backend):
    """step() is cross_entropy with token-weighted weights (1 / label tokens) + optim_step: same loss, gradient norm
    and parameters (1e-6), with clipping and the non-finite guard on. sgd, not Adam: Adam's first update is
    ~lr * sign(g), so a gradient entry within rounding of 0 would flip an lr-sized step on a last-bit difference."""
    model_dir = tiny_model_dir("llama")
    seqs = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    stepped = sgd_trainer(model_dir, tokenizer, tmp_path / "step", backend, per_device_train_batch_size=4,
                           max_grad_norm=1.0, learning_rate=0.5)
    stats = stepped.step(input_ids=seqs)
    low = sgd_trainer(model_dir, tokenizer, tmp_path / "low", backend, per_device_train_batch_size=4,
                       max_grad_norm=1.0, learning_rate=0.5)
    tokens = sum(len(s) - 1 for s in seqs)
    data = [Datum(s[:-1], {"target_tokens": s[1:], "weights": np.full(len(s) - 1, 1.0 / tokens)}) for s in seqs]
    out = low.forward_backward(data)
    result = low.optim_step()
    assert out.metrics["loss:sum"] == pytest.approx(stats["loss"], rel=1e-6)
    assert result["grad_norm"] == pytest.approx(stats["grad_norm"], rel=1e-5)
    assert low.state.global_step == stepped.state.global_step == 1
    want, got = _params(stepped), _params(low)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("backend", ENGINES)
def test_accumulation_does_not_depend_on_the_split(tiny_model_dir, tokenizer, tmp_path, backend):
    model_dir = tiny_model_dir("llama")
    data = rl_data() + rl_data(seed=1)[:1]  # 4 data
    grads, params = [], []
    for calls in (1, 2, 4):
        trainer = sgd_trainer(model_dir, tokenizer, tmp_path / str(calls), backend)
        size = len(data) // calls
        for start in range(0, len(data), size):
            trainer.forward_backward(data[start:start + size], "ppo")
        grads.append(trainer.accumulated_gradients())
        trainer.optim_step()
        params.append(_params(trainer))
    for other in (1, 2):
        assert_grads_close(grads[other], grads[0], rtol=1e-6, atol=1e-6)
        assert_grads_close(params[other], params[0], rtol=1e-6, atol=1e-6)


def test_jax_calls_inside_a_bucket_compile_once(tiny_model_dir, tokenizer, tmp_path):
    from tests.support.compilations import count_compilations

    trainer = sgd_trainer(tiny_model_dir("llama"), tokenizer, tmp_path, "jax")
    data = rl_data()
    trainer.forward_backward(data, "cispo")  # compiles the bucket of these lengths
    with count_compilations("forward_backward_step") as compiles:
        for split in ([data[0]], data[1:], [data[2], data[0]]):  # other counts and lengths, same bucket
            trainer.forward_backward(split, "cispo")
    assert compiles.count == 0


def test_lora_bf16_remat_train_through_the_low_level_api(tiny_model_dir, tokenizer, tmp_path):
    from peft import LoraConfig

    trainer = IterativeSFTTrainer(
        tiny_model_dir("llama"), processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        args=IterativeSFTConfig(output_dir=str(tmp_path), learning_rate=3e-2, bf16=True, gradient_checkpointing=True,
                                report_to="none", disable_tqdm=True))
    data = make_data(PROMPTS, COMPLETIONS)
    before = trainer.forward(data).metrics["loss:sum"]
    for _ in range(3):
        trainer.forward_backward(data)
        assert trainer.accumulated_gradients() and all("lora" in k for k in trainer.accumulated_gradients())
        trainer.optim_step()
    assert trainer.forward(data).metrics["loss:sum"] < before
    assert trainer.state.global_step == 3


@pytest.mark.parametrize("backend", ENGINES)
def test_compute_logprobs_equals_the_forward_and_the_reference(tiny_model_dir, tokenizer, tmp_path, backend):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("llama")
    seqs = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    trainer = sgd_trainer(model_dir, tokenizer, tmp_path, backend)
    got = trainer.compute_logprobs(seqs)
    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    for seq, lp in zip(seqs, got):
        ids = torch.tensor(seq)
        with torch.no_grad():
            want = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1], -1).gather(-1, ids[1:, None])[:, 0]
        np.testing.assert_allclose(lp, want.numpy(), rtol=1e-5, atol=1e-5)
    # One definition: the RL losses' logprobs are compute_logprobs' bit for bit (token_logprobs on JAX); the fused
    # cross_entropy pass computes the same quantity from the same chunk math (1e-6).
    data = [Datum(s[:-1], {"target_tokens": s[1:], "weights": np.ones(len(s) - 1), "logprobs": np.zeros(len(s) - 1),
                           "advantages": np.zeros(len(s) - 1)}) for s in seqs]
    for loss_fn, check in (("importance_sampling", np.testing.assert_array_equal),
                           ("cross_entropy", lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6))):
        for out, lp in zip(trainer.forward(data, loss_fn).loss_fn_outputs, got):
            check(out["logprobs"], lp)


@pytest.mark.parametrize("backend", ENGINES)
def test_optim_step_counts_an_update_and_fires_the_callbacks(tiny_model_dir, tokenizer, tmp_path, backend):
    from transformers import TrainerCallback

    events = []

    class Recorder(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            events.append(("begin", state.global_step))

        def on_step_end(self, args, state, control, **kwargs):
            events.append(("end", state.global_step))

        def on_log(self, args, state, control, logs=None, **kwargs):
            events.append(("log", state.global_step, round(logs["loss"], 4)))

    trainer = sgd_trainer(tiny_model_dir("llama"), tokenizer, tmp_path, backend, logging_steps=1)
    trainer.add_callback(Recorder())
    data = make_data(PROMPTS, COMPLETIONS)
    loss = trainer.forward_backward(data).metrics["loss:sum"]
    result = trainer.optim_step()
    assert result["global_step"] == 1 and result["skipped"] == 0 and result["loss"] == pytest.approx(loss)
    tokens = sum(len(d) for d in data)
    assert events == [("begin", 0), ("end", 1), ("log", 1, round(loss / tokens, 4))]


# ----------------------------------------------------------------------------------------------------------
# Refusals, before any state changes


@pytest.fixture(scope="module")
def refusing_trainer(tiny_model_dir, tokenizer, tmp_path_factory):
    """One trainer for every refusal: each test checks that nothing changed on it."""
    return sgd_trainer(tiny_model_dir("llama"), tokenizer, tmp_path_factory.mktemp("refusals"), "jax")


@pytest.mark.parametrize("call, match", [
    (lambda t, d: t.forward_backward(d, "reinforce"), "`loss_fn` must be one of"),
    (lambda t, d: t.forward_backward(d, "ppo", {"clip": 0.9}), "unknown \\['clip'\\]"),
    (lambda t, d: t.forward_backward(d, "ppo", {"clip_low_threshold": 1.5}), "clip_low_threshold <="),
    (lambda t, d: t.forward_backward(make_data(PROMPTS, COMPLETIONS), "importance_sampling"), "has no 'logprobs'"),
    (lambda t, d: t.forward_backward([Datum([1, 2, 3], {"target_tokens": [2, 3], "weights": [1, 1]})]),
     "\\['target_tokens'\\]` has 2 values, `model_input` 3"),
    (lambda t, d: t.forward_backward([Datum([1, 999], {"target_tokens": [2, 3], "weights": [1, 1]})]),
     "model_input` holds id 999 outside the vocabulary"),
    (lambda t, d: t.forward_backward([Datum([1, 2], {"target_tokens": [2, -1], "weights": [1, 1]})]),
     "'target_tokens'\\]` holds id -1"),
    (lambda t, d: t.forward_backward([Datum([1, 2], {"target_tokens": [2, 3], "weights": [1, float("nan")]})]),
     "'weights'\\]` holds a value that is not finite in fp32"),
    (lambda t, d: t.forward_backward([]), "non-empty list of Datum"),
    (lambda t, d: t.forward_backward([[1, 2, 3]]), "must be a Datum"),
    (lambda t, d: t.forward_backward_custom(d, "not a function"), "`fn` must be callable"),
    (lambda t, d: t.compute_logprobs([[5]]), "at least 2"),
    (lambda t, d: t.optim_step(), "no gradients accumulated"),
])
def test_bad_calls_are_refused_naming_the_field(refusing_trainer, call, match):
    trainer = refusing_trainer
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(trainer, rl_data())
    assert trainer.state.global_step == 0 and trainer.accumulated_gradients() == {}


def test_datum_fields_are_checked_when_built():
    with pytest.raises(TypeError, match="`model_input` must hold integer token ids"):
        Datum([1.5, 2.0])
    with pytest.raises(ValueError, match="`logprobs` has 2 values, the completion 3 tokens"):
        Datum.from_prompt_completion([1, 2], [3, 4, 5], logprobs=[-1.0, -2.0])
    with pytest.raises(ValueError, match="`advantages` has 1 entries, `completion_ids` has 2"):
        make_data([[1], [1]], [[2], [3]], advantages=[1.0])
    datum = Datum.from_prompt_completion([1, 2, 3], [4, 5], logprobs=[-0.5, -0.25], advantages=2.0)
    np.testing.assert_array_equal(datum.model_input, [1, 2, 3, 4])
    np.testing.assert_array_equal(datum.loss_fn_inputs["target_tokens"], [2, 3, 4, 5])
    np.testing.assert_array_equal(datum.loss_fn_inputs["weights"], [0, 0, 1, 1])
    np.testing.assert_array_equal(datum.loss_fn_inputs["logprobs"], [0, 0, -0.5, -0.25])
    np.testing.assert_array_equal(datum.loss_fn_inputs["advantages"], [0, 0, 2, 2])


@pytest.mark.parametrize("backend", ENGINES)
def test_step_is_refused_while_gradients_are_pending(tiny_model_dir, tokenizer, tmp_path, backend):
    trainer = sgd_trainer(tiny_model_dir("llama"), tokenizer, tmp_path, backend)
    trainer.forward_backward(make_data(PROMPTS, COMPLETIONS))
    with pytest.raises(RuntimeError, match="call optim_step\\(\\) first"):
        trainer.step(input_ids=[[1, 2, 3]])
    assert trainer.state.global_step == 0
    trainer.optim_step()
    assert trainer.step(input_ids=[[1, 2, 3]])["global_step"] == 2


# ----------------------------------------------------------------------------------------------------------
# save_state / load_state


def make_state_trainer(model_dir, output_dir, backend):
    """Adam (its moments must survive), a tokenizer from the model directory (the kill test's worker has no
    fixture)."""
    args = IterativeSFTConfig(output_dir=str(output_dir), backend=backend, per_device_train_batch_size=2,
                              learning_rate=1e-2, gradient_checkpointing=False, report_to="none", disable_tqdm=True,
                              seed=3)
    return IterativeSFTTrainer(model_dir, args=args)


def low_level_update(trainer, update: int) -> float:
    """One importance-sampled update on data that depend on the update number; the loss before it."""
    loss = trainer.forward_backward(rl_data(seed=update), "importance_sampling").metrics["loss:sum"]
    trainer.optim_step()
    return loss


def continue_run(trainer, first: int, updates: int = 2) -> list[float]:
    losses = [low_level_update(trainer, u) for u in range(first, first + updates)]
    return losses + [trainer.step(input_ids=[p + c for p, c in zip(PROMPTS, COMPLETIONS)])["loss"]]


@pytest.mark.parametrize("backend", ENGINES)
def test_load_state_continues_bit_for_bit(tiny_model_dir, tmp_path, backend):
    model_dir = tiny_model_dir("llama")
    first = make_state_trainer(model_dir, tmp_path / "a", backend)
    for update in range(2):
        low_level_update(first, update)
    first.step(input_ids=[p + c for p, c in zip(PROMPTS, COMPLETIONS)])  # the step() counters count too
    first.save_state(tmp_path / "state")
    want = continue_run(first, 2)
    resumed = make_state_trainer(model_dir, tmp_path / "b", backend)
    resumed.load_state(tmp_path / "state")
    assert resumed.state.global_step == 4  # 2 updates + a step() of 3 samples in updates of 2
    assert continue_run(resumed, 2) == want  # bit-identical
    resumed.forward_backward(rl_data(), "importance_sampling")
    for refused in (lambda: resumed.save_state(tmp_path / "x"), lambda: resumed.load_state(tmp_path / "state")):
        with pytest.raises(RuntimeError, match="call optim_step\\(\\) first"):
            refused()


@pytest.mark.parametrize("backend", ENGINES)
def test_damaged_state_is_refused_naming_the_file(tiny_model_dir, tmp_path, backend):
    from itersft_jax.shared.atomic_dir import CheckpointError

    trainer = make_state_trainer(tiny_model_dir("llama"), tmp_path / "a", backend)
    low_level_update(trainer, 0)
    path = trainer.save_state(tmp_path / "state")
    name = "itersft_state.json"
    with open(os.path.join(path, name), "ab") as f:
        f.write(b" ")
    fresh = make_state_trainer(tiny_model_dir("llama"), tmp_path / "b", backend)
    with pytest.raises(CheckpointError, match=f"file {name} has"):
        fresh.load_state(path)
    assert fresh.state.global_step == 0


def test_kill_during_save_state_then_load_state_continues_bit_for_bit(tiny_model_dir, tmp_path, backend="torch"):
    """A worker saves its state after every update; it is SIGKILLed at a (seeded) random moment within 50 ms of
    starting its third save (a save takes ~40 ms on this model, an update ~170 ms on loaded cores; the worker stops
    after that save, so a fast machine cannot reach a fourth). The state directory then holds the complete state of
    update 2 or 3 (never a partial one), and resuming from it gives the same later losses, bit for bit, as a run that
    never stopped.
    PyTorch only: the JAX engine's save_state is its save_checkpoint, killed and resumed in test_reliability.py."""
    model_dir = tiny_model_dir("llama")
    state_dir = tmp_path / "state"
    worker = subprocess.Popen(module_command("save_state_worker", backend, model_dir, str(tmp_path / "worker"),
                                             str(state_dir), "3"),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=root_on_path())
    try:
        for line in worker.stdout:
            if line.strip() == "saving 3":
                break
        time.sleep(random.Random(0).uniform(0.0, 0.05))  # seeded: every run kills at the same moment (42 ms)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    resumed = make_state_trainer(model_dir, tmp_path / "resumed", backend)
    resumed.load_state(state_dir)
    saved = resumed.state.global_step
    assert saved in (2, 3)
    reference = make_state_trainer(model_dir, tmp_path / "reference", backend)
    for update in range(saved):
        low_level_update(reference, update)
    assert continue_run(resumed, saved) == continue_run(reference, saved)


@pytest.mark.parametrize("backend", ENGINES)
def test_non_finite_update_is_skipped_by_optim_step(tiny_model_dir, tokenizer, tmp_path, backend):
    """A sampler logprob of -1000 (the lowest accepted) makes the importance ratio exp(~995) = inf in fp32:
    optim_step skips the update (parameters and global_step unchanged) and says so; the accumulator is reset either
    way."""
    trainer = sgd_trainer(tiny_model_dir("llama"), tokenizer, tmp_path, backend)
    before = _params(trainer)
    data = make_data(PROMPTS[:1], COMPLETIONS[:1], logprobs=[[-1000.0] * len(COMPLETIONS[0])], advantages=[1.0])
    trainer.forward_backward(data, "importance_sampling")
    result = trainer.optim_step()
    assert result["skipped"] == 1 and result["global_step"] == 0 and trainer.state.global_step == 0
    assert trainer.accumulated_gradients() == {}
    after = _params(trainer)
    assert all(np.array_equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("backend", ENGINES)
def test_sample_gives_the_behaviour_logprobs_the_training_forward_computes(tiny_model_dir, tokenizer, tmp_path,
                                                                          backend):
    """sample() = generate(return_logprobs=True): each sampled token's logprob equals compute_logprobs of the
    finished sequence within 1e-5 (fp32), so exp(trainer - sampler) = 1 +- 1e-5 on fresh samples, and the data
    samples_to_data builds give importance ratios of 1 in forward()."""
    from itersft_jax.shared.datum import samples_to_data

    trainer = sgd_trainer(tiny_model_dir("llama"), tokenizer, tmp_path, backend)
    out = trainer.sample(["The quick brown fox", "hello"], num_samples=3, max_new_tokens=8, do_sample=True, seed=0,
                         temperature=0.8)
    assert len(out.sequences) == 6 and all(len(lp) == len(s) for lp, s in zip(out.logprobs, out.sequences))
    again = trainer.compute_logprobs([p + s for p, s in zip(out.prompt_ids, out.sequences)])
    for prompt, sampled, recomputed in zip(out.prompt_ids, out.logprobs, again):
        ratio = np.exp(np.asarray(recomputed[len(prompt) - 1:], np.float64) - np.asarray(sampled, np.float64))
        np.testing.assert_allclose(ratio, 1.0, atol=1e-5)
    data = samples_to_data(out, [1.0] * len(out.sequences))
    fwd = trainer.forward(data, "importance_sampling")
    tokens = sum(len(s) for s in out.sequences)
    assert fwd.metrics["loss:sum"] == pytest.approx(-tokens, abs=1e-4)  # -sum(ratio * 1) with every ratio 1
    with pytest.raises(TypeError, match="num_samples"):
        trainer.sample(["hello"], num_return_sequences=2)
    with pytest.raises(ValueError, match="return_logprobs"):
        trainer.sample(["hello"], return_logprobs=False)
    with pytest.raises(ValueError, match="logprobs"):
        samples_to_data(trainer.generate(["hello"], max_new_tokens=2))


def test_grpo_update_trains_the_signal_groups_and_reports_as_documented(tiny_model_dir, tokenizer, tmp_path):
    """apps/grpo.py (the demos' GRPO loop): group advantages of both signs summing to 0 per group, groups whose rewards
    agree dropped, one update per minibatch, and the round's diagnostics as `Diagnostics.record` documents them."""
    from itersft_jax.apps.grpo import Diagnostics, grpo_update, policy_drift, scale_advantages

    trainer = sgd_trainer(tiny_model_dir("llama"), tokenizer, tmp_path, "jax", learning_rate=0.5)
    out = trainer.sample(input_ids=PROMPTS[:2], num_samples=4, max_new_tokens=5, do_sample=True, seed=0)
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # the second prompt's group has no signal
    diagnostics = Diagnostics()
    data = grpo_update(trainer, out, rewards, loss="ppo", group=4, normalization="constant", max_tokens=5,
                       minibatches=2, diagnostics=diagnostics)
    assert len(data) == diagnostics.kept == 4 and trainer.state.global_step == 2
    per_sample = [d.loss_fn_inputs["advantages"][d.loss_fn_inputs["advantages"] != 0] for d in data]
    assert all(np.all(a == a[0]) for a in per_sample) and abs(sum(a[0] for a in per_sample)) < 1e-12
    assert sorted(a[0] for a in per_sample)[-1] == pytest.approx(3 ** 0.5)
    record = diagnostics.record("ppo")
    assert record["reward"] == 5 / 8 and record["signal"] == 0.5 and record["updates"] == 2
    assert record["completion_tokens"] == np.mean([len(s) for s in out.sequences])
    # The first update is on-policy (ratio 1): the round's mean |log-ratio| is the second update's, weighted by its
    # share of the tokens; the drift after both updates is positive.
    assert 0 < record["log_ratio"] and 0 <= record["clip_fraction"] <= 1 and policy_drift(trainer, data, "ppo") > 0
    lengths = [len(a) for a in per_sample]
    for norm, divisors in (("constant", [2 * 5] * 4), ("sequence", [n * 2 for n in lengths]),
                           ("token", [sum(lengths)] * 4)):
        scaled = scale_advantages(data, norm, num_samples=2, max_tokens=5)
        for d, s, div in zip(data, scaled, divisors):
            np.testing.assert_allclose(s.loss_fn_inputs["advantages"], d.loss_fn_inputs["advantages"] / div)
