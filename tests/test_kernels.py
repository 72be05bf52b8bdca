"""models/attention/ (flash.py and one file per kernel): every flash-attention implementation that runs on CPU against
a plain reference, the cuDNN segment mapping, and the resolver.

The reference (``_reference``) materializes fp32 scores with the contract's mask written out independently of the
kernels: query t attends key s iff s <= t, same non-zero segment, t - s < window; soft-cap before masking;
query head n uses kv head n // G; padding queries give 0. Gradients of the reference come from autodiff.

Tolerances (fp32 inputs, values of order 1): outputs and gradients w.r.t. q, k, v within 2e-5 absolute — the
kernels reorder an fp32 softmax into blocks (online rescaling), nothing else. Pallas kernels run with
``interpret=True``. Isolation across samples is exact: perturbing another segment's keys/values changes a
segment's outputs and gradients by exactly 0 (the masked probabilities are exact zeros).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from itersft_jax.models.attention.cudnn import cudnn_segment_layout
from itersft_jax.models.attention.flash import flash_attention
from itersft_jax.models.attention.select import (
    ATTENTION_IMPLEMENTATIONS,
    IMPLEMENTATIONS,
    KERNELS,
    choose_implementation,
)

ATOL = 2e-5
SCALE = 0.35


def _reference(q_BTNH, k_BTKH, v_BTKH, seg_BT, *, scale, window=None, softcap=None):
    b, t, n, h = q_BTNH.shape
    g = n // k_BTKH.shape[2]
    k_BTNH, v_BTNH = jnp.repeat(k_BTKH, g, axis=2), jnp.repeat(v_BTKH, g, axis=2)
    s_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BTNH, precision="highest") * scale
    if softcap is not None:
        s_BNTS = softcap * jnp.tanh(s_BNTS / softcap)
    q_pos, k_pos = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed_TS = (k_pos <= q_pos) & ((q_pos - k_pos < window) if window else True)
    same_BTS = (seg_BT[:, :, None] == seg_BT[:, None, :]) & (seg_BT[:, None, :] != 0)
    allowed_BTS = allowed_TS[None] & same_BTS
    s_BNTS = jnp.where(allowed_BTS[:, None], s_BNTS, -jnp.inf)
    p_BNTS = jax.nn.softmax(jnp.where(allowed_BTS.any(-1)[:, None, :, None], s_BNTS, 0.0), axis=-1)
    out = jnp.einsum("bnts,bsnh->btnh", p_BNTS, v_BTNH, precision="highest")
    return jnp.where((seg_BT != 0)[:, :, None, None], out, 0.0)


def _inputs(b, t, n, kv, h, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32)
    k = jax.random.normal(keys[1], (b, t, kv, h), jnp.float32)
    v = jax.random.normal(keys[2], (b, t, kv, h), jnp.float32)
    cot = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)
    return q, k, v, cot


def _packed_ids(t: int, reuse: bool) -> np.ndarray:
    """Two rows: several samples packed per row, padding at the end; the second starts with a 1-token sample.
    With ``reuse`` the second row's id 5 comes back after id 6: those tokens attend each other (the contract
    compares ids), and the kernels' per-sample block skipping must fall back to none for that row."""
    a, b = t // 3, t // 4
    row0 = [1] * a + [2] * (t - a - b - 3) + [3] * b + [0] * 3
    c = t // 2 - 6
    row1 = [4] + [5] * (t // 4) + [6] * (t - t // 4 - 6 - c) + [5 if reuse else 7] * c + [0] * 5
    return np.array([row0, row1], np.int32)


def _value_and_grads(fn):
    """``(q, k, v, seg, cot) -> (out, (dq, dk, dv))`` compiled once (compilation dominates these tests)."""
    def both(q, k, v, seg, cot):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
        return out, vjp(cot)
    return jax.jit(both)


CASES = [(None, None), (9, None), (20, 2.0)]  # (window, softcap)


def _check_against_reference(impl, t, h, cases, **kw):
    """Forward and q/k/v gradients == the reference for each case; then, on the last case, isolation: changing
    every key/value outside segment 2 leaves segment 2's outputs and gradients exactly unchanged."""
    q, k, v, cot = _inputs(2, t, 4, 2, h)  # GQA: N=4 query heads on K=2 kv heads
    for window, softcap in cases:
        ours = _value_and_grads(lambda q, k, v, seg, w=window, c=softcap: flash_attention(
            q, k, v, seg, scale=SCALE, window=w, softcap=c, implementation=impl, **kw))
        ref = _value_and_grads(lambda q, k, v, seg, w=window, c=softcap: _reference(
            q, k, v, seg, scale=SCALE, window=w, softcap=c))
        for reuse in (False, True):
            seg = jnp.asarray(_packed_ids(t, reuse))
            out, grads = ours(q, k, v, seg, cot)
            out_ref, grads_ref = ref(q, k, v, seg, cot)
            case = f"{impl} window={window} softcap={softcap} reused id={reuse}"
            np.testing.assert_allclose(out, out_ref, atol=ATOL, err_msg=case)
            for name, g, g_ref in zip("qkv", grads, grads_ref):
                np.testing.assert_allclose(g, g_ref, atol=ATOL, err_msg=f"{case}: d{name}")
            assert not np.any(np.asarray(out)[np.asarray(seg) == 0]), f"{case}: padding queries must give zeros"

    inside = np.asarray(seg == 2)[:, :, None, None]
    cot2 = jnp.where(inside, cot, 0.0)  # a loss that reads segment 2 only
    noise_k, noise_v = (jax.random.normal(jax.random.key(9 + i), k.shape) * 5 for i in range(2))
    out_a, grads_a = ours(q, k, v, seg, cot2)
    out_b, grads_b = ours(q, jnp.where(inside, k, k + noise_k), jnp.where(inside, v, v + noise_v), seg, cot2)
    for a, b in zip((out_a, *grads_a), (out_b, *grads_b)):
        np.testing.assert_array_equal(np.asarray(a) * inside, np.asarray(b) * inside, err_msg=f"{impl}: isolation")
    assert np.any(np.asarray(out_a) != np.asarray(out_b)), "the perturbation must reach the other samples"


def test_xla_chunked_equals_reference():
    # t=50 is no multiple of the 16-token blocks: the padded tail must change nothing
    _check_against_reference("xla_chunked", 50, 8, CASES)


def test_pallas_gpu_equals_reference_in_interpreter():
    # head_dim 12 is padded to 16 lanes inside; several query/key blocks, window skipping, G=2 heads per kv head
    _check_against_reference("pallas_gpu", 50, 12, CASES, interpret=True)


def test_splash_equals_reference_in_interpreter():
    # splash tiles are 128 tokens: one tile, packed rows, GQA, a window and a soft-cap in one case
    _check_against_reference("splash", 128, 8, [(None, None), (20, 2.0)], interpret=True)


def test_output_dtype_follows_q_and_bad_arguments_raise():
    q, k, v, _ = _inputs(1, 16, 2, 1, 8)
    seg = jnp.ones((1, 16), jnp.int32)
    out = jax.eval_shape(lambda q: flash_attention(q, k, v, seg, scale=SCALE, implementation="xla_chunked"),
                         q.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="not a flash kernel"):
        flash_attention(q, k, v, seg, scale=SCALE, implementation="xla")
    with pytest.raises(ValueError, match="segment_ids_BT"):
        flash_attention(q, k, v, seg[:, :8], scale=SCALE, implementation="xla_chunked")
    with pytest.raises(ValueError, match="window"):
        flash_attention(q, k, v, seg, scale=SCALE, window=0, implementation="xla_chunked")
    with pytest.raises(ValueError, match="max_segments"):
        flash_attention(q, k, v, seg, scale=SCALE, implementation="cudnn")
    with pytest.raises(ValueError, match="multiple"):
        flash_attention(q[:, :, :1], k.repeat(2, axis=2), v.repeat(2, axis=2), seg, scale=SCALE,
                        implementation="xla_chunked")


# ----------------------------------------------------------------------------- cuDNN's segment layout


def test_cudnn_segment_layout_maps_runs_to_offsets_and_lengths():
    seg = jnp.asarray([
        [1, 1, 1, 2, 2, 0, 0, 0],   # two samples, right padding
        [0, 0, 5, 5, 5, 5, 5, 5],   # left padding (generation prefill)
        [0, 0, 0, 0, 0, 0, 0, 0],   # an empty row
        [1, 2, 3, 3, 4, 4, 4, 0],   # four samples: one more than max_segments=3
        [1, 1, 0, 1, 1, 2, 2, 0],   # padding inside sample 1: one id in two runs
        [1, 1, 2, 2, 1, 1, 0, 0],   # id 1 reused after sample 2
    ])
    seqlens, offsets, ok = jax.jit(cudnn_segment_layout, static_argnums=1)(seg, 3)
    np.testing.assert_array_equal(seqlens[:3], [[3, 2, -1], [6, -1, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(offsets[:3], [[0, 3, -1, -1], [2, -1, -1, -1], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(ok, [True, True, True, False, False, False])


def test_cudnn_segment_layout_round_trips_random_packed_rows():
    """Every token of an expressible row lies in exactly the run of its id, and nothing else does."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(20):
        lengths = rng.integers(1, 9, size=rng.integers(0, 5))
        row = np.concatenate([np.zeros(rng.integers(0, 3), np.int32)] +
                             [np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])[:32]
        rows.append(np.pad(row, (0, 32 - len(row))))
    seg = np.stack(rows)
    seqlens, offsets, ok = (np.asarray(x) for x in jax.jit(cudnn_segment_layout, static_argnums=1)(seg, 4))
    for b in range(len(seg)):
        runs = len(np.unique(seg[b][seg[b] != 0]))
        assert ok[b] == (runs <= 4)
        if not ok[b]:
            continue
        rebuilt = np.zeros(32, np.int32)
        for r in range(4):
            if seqlens[b, r] >= 0:
                rebuilt[offsets[b, r]:offsets[b, r] + seqlens[b, r]] = seg[b, offsets[b, r]]
        np.testing.assert_array_equal(rebuilt, seg[b])


# ----------------------------------------------------------------------------- the resolver


def test_resolver_picks_the_best_kernel_for_the_case():
    bf16, f32 = jnp.bfloat16, jnp.float32
    r = lambda req, **kw: choose_implementation(req, **{"dtype": bf16, "head_dim": 64, **kw})
    assert r("auto", platform="cpu") == "xla"
    assert r(None, platform="cpu") == "xla"
    assert r("auto", platform="cpu", seq_len=2048) == "xla"
    assert r("auto", platform="cpu", seq_len=8192) == "xla_chunked"  # long rows: O(T) memory
    assert r("sdpa", platform="cpu") == "xla"
    assert r("eager", platform="gpu") == "xla"
    assert r("flash_attention_2", platform="cpu") == "xla_chunked"  # a flash kernel, never the materializing one
    assert r("flash_attention_3", platform="gpu", max_segments=8) == "cudnn"
    assert r("auto", platform="gpu", max_segments=8) == "cudnn"
    assert r("auto", platform="gpu", max_segments=8, window=128) == "cudnn"
    # packed rows without a stated bound, a soft-cap, fp32 or a large head: never cuDNN
    assert r("auto", platform="gpu") == "pallas_gpu"
    assert r("auto", platform="gpu", max_segments=8, softcap=50.0) == "pallas_gpu"
    assert r("auto", platform="gpu", max_segments=8, dtype=f32) == "pallas_gpu"
    assert r("auto", platform="gpu", max_segments=8, head_dim=72 + 4) == "pallas_gpu"
    assert r("auto", platform="gpu", head_dim=512) == "xla_chunked"
    assert r("auto", platform="tpu", softcap=30.0) == "splash"
    assert r("xla_chunked", platform="tpu") == "xla_chunked"
    assert set(IMPLEMENTATIONS) == {"xla", *KERNELS}
    assert {"auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3"} <= set(ATTENTION_IMPLEMENTATIONS)


def test_resolver_skips_cudnn_before_hopper(monkeypatch):
    """jax refuses cuDNN's packed layout below sm90: an A100 gets the Pallas kernel, an explicit cudnn an error."""
    from itersft_jax.models.attention import select

    monkeypatch.setattr(select, "gpu_compute_capability", lambda: (8, 0))
    case = dict(platform="gpu", dtype=jnp.bfloat16, head_dim=64, max_segments=8)
    assert choose_implementation("auto", **case) == "pallas_gpu"
    with pytest.raises(ValueError, match="Hopper"):
        choose_implementation("cudnn", **case)


@pytest.mark.parametrize("requested, case, why", [
    ("cudnn", dict(platform="cpu"), "NVIDIA GPUs only"),
    ("cudnn", dict(platform="gpu", max_segments=4, softcap=30.0), "soft-cap"),
    ("cudnn", dict(platform="gpu", max_segments=4, dtype=jnp.float32), "bfloat16"),
    ("cudnn", dict(platform="gpu"), "max_segments"),
    ("pallas_gpu", dict(platform="tpu"), "NVIDIA GPUs only"),
    ("splash", dict(platform="gpu"), "TPUs only"),
    ("flash_attention_9", dict(platform="cpu"), "not one of"),
])
def test_resolver_refuses_what_cannot_run(requested, case, why):
    with pytest.raises(ValueError, match="attn_implementation") as err:
        choose_implementation(requested, **{"dtype": jnp.bfloat16, "head_dim": 64, **case})
    assert why in str(err.value)
    if "not one of" not in why:
        assert "xla_chunked" in str(err.value), "the error lists the alternatives"


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_shared_prefix_attention_equals_attention_over_the_concatenated_keys(softcap):
    """A prompt held once for its rows (``shared_prefix.py``): rows of 3 groups attend their group's prefix (left
    padding masked) and their own suffix (2 queries: a causal suffix mask), merged by log-sum-exp; equal to
    ``grouped_attention`` over each row's prefix + suffix keys (fp32, 1e-6), a row with an all-masked suffix
    included."""
    from itersft_jax.models.attention.shared_prefix import shared_prefix_attention
    from itersft_jax.models.attention.xla import grouped_attention

    rng = np.random.default_rng(0)
    b, t, n, k, h, g, p, s = 6, 2, 4, 2, 8, 3, 5, 7
    q = rng.normal(size=(b, t, n, h)).astype(np.float32)
    pk, pv = (rng.normal(size=(g, k, p, h)).astype(np.float32) for _ in range(2))
    sk, sv = (rng.normal(size=(b, k, s, h)).astype(np.float32) for _ in range(2))
    prefix_mask = np.ones((g, p), np.int32)
    prefix_mask[1, :2] = prefix_mask[2, :4] = 0  # left padding
    group = np.array([0, 0, 1, 2, 2, 1], np.int32)
    mask = np.tril(np.ones((t, s), bool), k=s - t)[None].repeat(b, 0)  # query j sees suffix slots <= s - t + j
    mask[1, :, :3] = False
    mask[4, 0] = False  # a query with no suffix key: the prefix alone
    got = shared_prefix_attention(q, pk, pv, prefix_mask, group, sk, sv, mask, scale=0.3, softcap=softcap)
    full_k = np.concatenate([pk[group], sk], axis=2)
    full_v = np.concatenate([pv[group], sv], axis=2)
    full_mask = np.concatenate([np.broadcast_to(prefix_mask[group][:, None] > 0, (b, t, p)), mask], axis=2)
    want = grouped_attention(jnp.asarray(q), jnp.asarray(full_k), jnp.asarray(full_v), jnp.asarray(full_mask),
                             scale=0.3, softcap=softcap)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-6
