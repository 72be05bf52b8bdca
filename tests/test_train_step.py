"""train_step.py: the loss against transformers, split invariance, padding, causality, compiles, overfitting.

Tolerances (fp32 everywhere unless stated): loss vs transformers <= 1e-5 abs; grad norm vs torch <= 1e-4
relative; different micro-batch splits of one update: loss and params <= 1e-5 abs, grad norm <= 1e-5 rel;
padding rows / padding micro-batches: <= 1e-6 abs (same shapes, extra zero-weight work only); causality:
gradients from the future exactly 0.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from itersft_jax.core.loss import causal_lm_loss
from itersft_jax.core.train_step import TrainState, make_train_step, train_step
from itersft_jax.models.attention import attention, attention_context
from itersft_jax.models.attention.masks import positions_from_mask
from itersft_jax.models.layers import LMHead, head_logits, neftune_noise
from tests.support.compilations import count_compilations
from tests.support.offline import tiny_config, tiny_model

VOCAB = 41


class TinyCausalLM(nnx.Module):
    """Embedding + learned positions, one causal attention block, LayerNorm, untied head."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, heads: int = 2, max_len: int = 64,
                 dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.heads, self.dtype = heads, dtype
        self.embed = nnx.Embed(vocab, dim, dtype=dtype, rngs=rngs)
        self.pos_embed = nnx.Embed(max_len, dim, dtype=dtype, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.ln_f = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.head_proj = nnx.Linear(dim, vocab, use_bias=False, dtype=dtype, rngs=rngs)

    def hidden_states(self, input_ids_BT, positions_BT, attention_mask_BS, cache=None, neftune=None):
        b, t = input_ids_BT.shape
        embeds_BTD = neftune_noise(neftune, self.embed(input_ids_BT), attention_mask_BS)
        h_BTD = embeds_BTD + self.pos_embed(positions_BT)
        q, k, v = jnp.split(self.qkv(h_BTD).reshape(b, t, 3 * self.heads, -1), 3, axis=2)
        ctx = attention_context(attention_mask_BS, t, None)
        attn, _ = attention(q, k, v, None, ctx, scale=q.shape[-1] ** -0.5)
        h_BTD = h_BTD + self.out(attn.reshape(b, t, -1))
        return self.ln_f(h_BTD), cache

    def head(self) -> LMHead:
        return LMHead(self.head_proj.kernel[...], False, None, self.dtype)

    def __call__(self, input_ids_BT, positions_BT, attention_mask_BS, cache=None):
        h_BTD, cache = self.hidden_states(input_ids_BT, positions_BT, attention_mask_BS, cache)
        return head_logits(self.head(), h_BTD), cache


def llama_pair(**overrides):
    """A tiny random HF Llama and the JAX Llama holding the same weights (via params_from_hf)."""
    from itersft_jax.models import llama

    torch_model = tiny_model("llama", 320, **overrides)
    config = tiny_config("llama", 320, **overrides)
    tensors = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    model = llama.CausalLM(config)
    nnx.update(model, llama.params_from_hf(tensors, config))
    return model, torch_model


def samples(num, vocab, seed=0, min_len=5, max_len=16):
    """Ragged samples with a prompt part masked out of the loss, so label counts differ per sample."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        n = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(3, vocab, n)
        labels = ids.copy()
        labels[: int(rng.integers(1, n - 1))] = -100
        out.append((ids, labels))
    return out


def make_batch(rows, accum, micro, length):
    """``[accum, micro, length]`` int32 arrays, right-padded; missing rows are all padding."""
    ids = np.zeros((accum * micro, length), np.int32)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, -100)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], mask[i, :len(x)], labels[i, :len(y)] = x, 1, y
    shape = (accum, micro, length)
    return {"input_ids": ids.reshape(shape), "attention_mask": mask.reshape(shape),
            "labels": labels.reshape(shape)}


def run(model, tx, batches, schedule=None, params_as_dict=True, **step_options):
    graphdef, params = nnx.split(model, nnx.Param)
    if params_as_dict:
        params = nnx.to_pure_dict(params)
    step = make_train_step(graphdef, tx, schedule, **step_options)
    state = TrainState.create(jax.tree.map(jnp.copy, params), tx, seed=0)
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append({k: float(v) for k, v in m.items()})
    return state, metrics


@nnx.jit
def per_row_loss(model, ids, mask, labels):
    """Summed loss and label count of each row, from a plain forward pass."""
    h = model.hidden_states(ids, positions_from_mask(mask), mask)[0]
    return jax.vmap(lambda h_TD, lb: causal_lm_loss(h_TD[None], model.head(), lb[None]))(h, labels)


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_loss_and_grad_norm_match_transformers():
    model, torch_model = llama_pair()
    rows = samples(3, 320, seed=1)
    batch = make_batch(rows, 1, 4, 16)  # one padding row
    _, (m,) = run(model, optax.sgd(0.0), [batch])

    ids, mask, labels = (torch.tensor(batch[k][0], dtype=torch.long)
                         for k in ("input_ids", "attention_mask", "labels"))
    positions = torch.tensor(np.asarray(positions_from_mask(jnp.asarray(batch["attention_mask"][0]))))
    out = torch_model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels)
    out.loss.backward()
    torch_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in torch_model.parameters()))
    assert abs(m["loss"] - out.loss.item()) <= 1e-5
    assert m["grad_norm"] == pytest.approx(torch_norm.item(), rel=1e-4)
    assert m["num_tokens"] == sum(int((y[1:] != -100).sum()) for _, y in rows)


def test_label_smoothing_matches_the_torch_backend():
    """label_smoothing=0.1: the step's loss == the torch backend's summed_token_ce / label tokens on the same
    micro-batch (1e-4), and differs from the unsmoothed loss (so ignoring the option fails)."""
    from itersft_torch.engine import summed_token_ce

    model, torch_model = llama_pair()
    batch = make_batch(samples(3, 320, seed=8), 1, 4, 16)
    _, (m,) = run(model, optax.sgd(0.0), [batch], label_smoothing=0.1)
    ids, mask, labels = (torch.tensor(batch[k][0], dtype=torch.long)
                         for k in ("input_ids", "attention_mask", "labels"))
    positions = torch.tensor(np.asarray(positions_from_mask(jnp.asarray(batch["attention_mask"][0]))))
    with torch.no_grad():
        logits = torch_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        smoothed = summed_token_ce(logits, labels, shift=True, label_smoothing=0.1).item() / m["num_tokens"]
        plain = summed_token_ce(logits, labels, shift=True).item() / m["num_tokens"]
    assert abs(m["loss"] - smoothed) <= 1e-4
    assert abs(smoothed - plain) > 1e-3  # a random model predicts near-uniform: smoothing moves the loss little


@pytest.mark.parametrize("family", ["tiny", "llama"])
def test_micro_batch_split_is_invisible(family):
    """1x4, 2x2 and 4x1 (micro-batch x accumulation) give one and the same update."""
    model = TinyCausalLM() if family == "tiny" else llama_pair()[0]
    vocab = VOCAB if family == "tiny" else 320
    rows = samples(4, vocab, seed=2)
    counts = [int((y[1:] != -100).sum()) for _, y in rows]
    assert len(set(counts)) > 1, "label counts must differ, or token weighting is untested"
    results = {}
    for accum, micro in ((1, 4), (2, 2), (4, 1)):
        # SGD: the update is proportional to the gradient (Adam's first step is nearly sign(g)).
        state, (m,) = run(model, optax.sgd(0.5), [make_batch(rows, accum, micro, 16)])
        results[(accum, micro)] = (state.params, m)
    ref_params, ref = results[(1, 4)]
    for key, (params, m) in results.items():
        assert abs(m["loss"] - ref["loss"]) <= 1e-5, key
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), key
        assert m["num_tokens"] == sum(counts)
        assert max_diff(params, ref_params) <= 1e-5, key
    if family == "tiny":  # the naive mean of per-micro-batch means differs: the test can tell them apart
        batch = make_batch(rows, 1, 4, 16)
        sums, _ = per_row_loss(model, *(batch[k][0] for k in ("input_ids", "attention_mask", "labels")))
        per_sample = np.asarray(sums) / np.asarray(counts)
        naive = np.mean([np.average(per_sample[:2], weights=counts[:2]),
                         np.average(per_sample[2:], weights=counts[2:])])
        assert abs(naive - ref["loss"]) > 1e-3


def test_padding_rows_and_micro_batches_are_inert():
    model = TinyCausalLM()
    rows = samples(3, VOCAB, seed=3)
    tx = optax.sgd(0.5)  # an update proportional to the gradient (Adam's first step amplifies noise)
    ref_state, (ref,) = run(model, tx, [make_batch(rows, 1, 3, 16)])
    state, (m,) = run(model, tx, [make_batch(rows, 2, 3, 16)])  # a micro-batch of padding rows only
    assert abs(m["loss"] - ref["loss"]) <= 1e-6 and m["num_tokens"] == ref["num_tokens"]
    assert max_diff(state.params, ref_state.params) <= 1e-6
    state, (m,) = run(model, tx, [make_batch(rows, 1, 4, 24)])  # a padding row, more padding columns
    assert abs(m["loss"] - ref["loss"]) <= 1e-5 and m["num_tokens"] == ref["num_tokens"]
    assert max_diff(state.params, ref_state.params) <= 1e-5


def test_update_without_label_tokens_is_finite_and_zero():
    """No label token in the whole update: loss 0 and zero gradients, not NaN. (The un-jitted step.)"""
    model = TinyCausalLM()
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.sgd(1.0)
    batch = make_batch([(np.arange(3, 11), np.full(8, -100))], 1, 2, 8)
    state, m = train_step(TrainState.create(params, tx), batch, graphdef=graphdef, tx=tx)
    assert {k: float(v) for k, v in m.items()} == {
        "loss": 0.0, "grad_norm": 0.0, "learning_rate": pytest.approx(float("nan"), nan_ok=True),
        "num_tokens": 0.0, "skipped": 0.0}
    assert int(state.step) == 1
    assert max_diff(state.params, params) == 0.0


@pytest.mark.parametrize("family", ["tiny", "llama"])
def test_causality_no_gradient_from_the_future(family):
    """The loss at position t has exactly zero gradient w.r.t. the embeddings of positions > t."""
    model = TinyCausalLM() if family == "tiny" else llama_pair()[0]
    graphdef, params = nnx.split(model, nnx.Param)
    t_len = 12
    ids = jnp.arange(3, 3 + t_len, dtype=jnp.int32)[None]  # distinct ids: embedding rows = positions
    mask = jnp.ones_like(ids)
    embed_path = ("embed",) if family == "tiny" else ("model", "embed_tokens")

    @jax.jit
    def embedding_grad_norms(labels):
        def loss(p):
            model = nnx.merge(graphdef, p)
            h = model.hidden_states(ids, positions_from_mask(mask), mask)[0]
            return causal_lm_loss(h, model.head(), labels)[0]

        table = functools.reduce(lambda node, k: node[k], embed_path, jax.grad(loss)(params))["embedding"]
        return jnp.abs(table[...][ids[0]]).sum(axis=-1)

    for t in (0, 5, t_len - 2):
        labels = jnp.full_like(ids, -100).at[0, t + 1].set(7)  # only logits[t] enter the loss
        per_position = np.asarray(embedding_grad_norms(labels))
        assert np.all(per_position[t + 1:] == 0.0), (t, per_position)
        assert np.all(per_position[:t + 1] > 0.0), (t, per_position)


def test_non_finite_update_is_skipped_and_state_bit_identical():
    """An inf weight: loss NaN, the jitted step returns params, opt_state and step bit-identical, skipped=1;
    then with finite weights the same step function applies updates again (skipped=0)."""
    model = TinyCausalLM()
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    params["head_proj"]["kernel"] = params["head_proj"]["kernel"].at[0, 5].set(jnp.inf)
    tx = optax.adamw(1e-2)
    step = make_train_step(graphdef, tx, optax.constant_schedule(1e-2))
    state = TrainState.create(params, tx)
    before = jax.device_get((state.step, state.params, state.opt_state))  # host copies: the step donates the state
    batch = make_batch(samples(3, VOCAB, seed=7), 1, 4, 16)
    state, m = step(state, batch)
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    after = jax.device_get((state.step, state.params, state.opt_state))
    assert int(state.step) == 0
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert old.dtype == new.dtype and old.tobytes() == new.tobytes()

    state.params["head_proj"]["kernel"] = state.params["head_proj"]["kernel"].at[0, 5].set(0.0)
    state, m = step(state, batch)
    assert int(m["skipped"]) == 0 and np.isfinite(float(m["loss"])) and int(state.step) == 1
    assert max_diff(state.params["qkv"], before[1]["qkv"]) > 0


def test_compiles_once_per_shape():
    model = TinyCausalLM()
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-3)
    step = make_train_step(graphdef, tx, optax.constant_schedule(1e-3))
    state = TrainState.create(params, tx)
    rows = samples(4, VOCAB, seed=4)
    with count_compilations() as compiles:
        state, _ = step(state, make_batch(rows, 2, 2, 16))
        state, _ = step(state, make_batch(rows[::-1], 2, 2, 16))
    assert compiles.count == 1
    with count_compilations() as compiles:
        state, m = step(state, make_batch(rows, 2, 2, 24))
    assert compiles.count == 1
    assert int(state.step) == 3 and float(m["learning_rate"]) == pytest.approx(1e-3)


def test_bf16_compute_keeps_fp32_master_params():
    batch = make_batch(samples(4, VOCAB, seed=5), 2, 2, 16)
    fp32 = TinyCausalLM()
    sums, counts = per_row_loss(fp32, *(batch[k].reshape(4, 16) for k in ("input_ids", "attention_mask",
                                                                          "labels")))
    state, (m,) = run(TinyCausalLM(dtype=jnp.bfloat16), optax.sgd(0.1), [batch])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    assert abs(m["loss"] - float(sums.sum() / counts.sum())) <= 2e-2  # bf16 activations: ~3 significant digits


def test_overfits_a_repeated_batch():
    from types import SimpleNamespace

    from itersft_jax.core.optim import build_optimizer

    args = SimpleNamespace(optim="adamw_torch", learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999,
                           adam_epsilon=1e-8, weight_decay=0.01, max_grad_norm=1.0, max_steps=-1,
                           warmup_steps=3, lr_scheduler_type="linear", lr_scheduler_kwargs={})
    _, params = nnx.split(TinyCausalLM(), nnx.Param)
    tx, schedule = build_optimizer(args, params)
    batch = make_batch(samples(4, VOCAB, seed=6), 2, 2, 16)
    # params as nnx.State here (a pure dict elsewhere): both are valid TrainState.params
    _, metrics = run(TinyCausalLM(), tx, [batch] * 30, schedule, params_as_dict=False)
    losses = [m["loss"] for m in metrics]
    assert [m["learning_rate"] for m in metrics[:4]] == pytest.approx([0.0, 1e-2 / 3, 2e-2 / 3, 1e-2])
    assert losses[-1] < 0.2 * losses[0], losses
    assert sum(b < a for a, b in itertools.pairwise(losses[1:])) >= 25, losses  # after the LR-0 update
