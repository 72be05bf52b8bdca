"""packing.py and segment-aware attention: a packed row computes exactly what its samples compute alone.

Tolerances (fp32): packed logits vs each sample's own forward <= 1e-5 abs; an update's loss and gradients
packed vs one padded row per sample <= 1e-5 abs (only the summation order differs). Compile counts: a
run whose lengths wander compiles once per new row-length maximum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer
from itersft_jax.core.packing import first_fit_decreasing, pack_update
from itersft_jax.core.train_step import TrainState, make_train_step
from itersft_jax.models import llama
from itersft_jax.models.attention.masks import make_attention_mask, positions_from_mask, positions_from_segments
from itersft_jax.shared.data import IGNORE_INDEX, Example, collate
from tests.support.compilations import count_compilations
from tests.support.offline import tiny_config, tiny_model

VOCAB = 320


def _llama(**overrides):
    torch_model = tiny_model("llama", VOCAB, **overrides)
    config = tiny_config("llama", VOCAB, **overrides)
    model = llama.CausalLM(config)
    nnx.update(model, llama.params_from_hf({k: v.detach().numpy() for k, v in torch_model.state_dict().items()},
                                           config))
    return model


def _examples(lengths, seed=0, prompt=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(3, VOCAB, size=n).astype(np.int32)
        labels = ids.copy()
        labels[:min(prompt, n - 2)] = IGNORE_INDEX
        out.append(Example(ids, labels))
    return out


def test_first_fit_decreasing_fills_rows():
    bins = first_fit_decreasing([300, 200, 100, 500, 12], 512)
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4]
    assert all(sum([300, 200, 100, 500, 12][i] for i in b) <= 512 for b in bins)
    assert len(bins) == 3
    with pytest.raises(ValueError):
        first_fit_decreasing([513], 512)


def test_segment_ids_mask_and_positions():
    seg = jnp.array([[1, 1, 2, 2, 2, 0]])
    mask = np.asarray(make_attention_mask(seg, 6))[0]
    assert mask[3].tolist() == [False, False, True, True, False, False]  # own segment, causal
    assert not mask[5].any()  # padding attends nothing
    assert positions_from_segments(seg).tolist() == [[0, 1, 0, 1, 2, 0]]
    plain = jnp.array([[1, 1, 1, 0, 0]])
    assert positions_from_segments(plain)[0, :3].tolist() == positions_from_mask(plain)[0, :3].tolist()


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 2}])
def test_packed_forward_equals_each_sample_alone(overrides):
    model = _llama(**overrides)
    examples = _examples([5, 9, 3, 12, 7])
    batch, used = pack_update([examples], row_length=16, rows=1, num_micro_batches=5)
    ids, seg = jnp.asarray(batch["input_ids"][:used, 0]), jnp.asarray(batch["attention_mask"][:used, 0])
    logits = model(ids, positions_from_segments(seg), seg)[0]
    for r in range(used):
        for s in range(1, int(seg[r].max()) + 1):
            cols = np.flatnonzero(np.asarray(seg[r]) == s)
            alone_ids = ids[r, cols][None]
            alone = model(alone_ids, jnp.arange(len(cols))[None], jnp.ones_like(alone_ids))[0]
            np.testing.assert_allclose(np.asarray(logits[r, cols]), np.asarray(alone[0]), atol=1e-5)


def test_packed_update_equals_padded_update():
    model = _llama(num_key_value_heads=2)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.sgd(1.0)  # new params = params - gradient: comparing params compares the gradients
    step = make_train_step(graphdef, tx)
    examples = _examples([5, 9, 3, 12, 7, 16, 2, 10], seed=1, prompt=3)
    update = [examples[:4], examples[4:]]
    padded = collate(update, rows=4, length=16)
    packed, used = pack_update(update, row_length=16, rows=1, num_micro_batches=8)
    assert used < 8  # trailing all-padding micro-batches are skipped by the step
    results = []
    for batch in (padded, packed):
        state = TrainState.create(jax.tree.map(jnp.copy, params), tx)
        state, metrics = step(state, batch)
        results.append((jax.device_get(metrics), jax.device_get(state.params)))
    (m_pad, p_pad), (m_pack, p_pack) = results
    assert int(m_pad["num_tokens"]) == int(m_pack["num_tokens"]) == sum(ex.num_label_tokens for ex in examples)
    assert abs(float(m_pad["loss"]) - float(m_pack["loss"])) <= 1e-5
    assert abs(float(m_pad["grad_norm"]) - float(m_pack["grad_norm"])) <= 1e-5 * float(m_pad["grad_norm"])
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p_pad, p_pack))
    assert max(diffs) <= 1e-5


def test_iterative_run_compiles_once_per_row_length(tiny_model_dir, tmp_path):
    trainer = IterativeSFTTrainer(tiny_model_dir("llama"), args=IterativeSFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_checkpointing=False,
        report_to="none", logging_steps=100))
    rng = np.random.default_rng(0)
    with count_compilations() as compiles:
        trainer.step(input_ids=[list(range(3, 63))] * 2)  # the longest sample first: row length 64
        for _ in range(6):  # 1..12 samples of 3..64 tokens: every update fits the same [A, R, 64] shape
            n = int(rng.integers(1, 13))
            trainer.step(input_ids=[rng.integers(3, 300, size=int(k)).tolist()
                                    for k in rng.integers(3, 65, size=n)])
    assert compiles.count == 1
