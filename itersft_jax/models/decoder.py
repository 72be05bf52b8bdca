"""The RoPE decoder that Llama, Mistral, Qwen2/3, Phi-3, Gemma 1/2/3, OLMo 2, SmolLM3 and the MoE families share, in
Flax NNX.

One implementation; each family's quirks are switches in ``Spec``, read from its HF config by the family file
(``llama.py``, ``phi3.py``, ``gemma.py``, ``olmo2.py``, ``smollm3.py``): biases, q/k RMSNorm (per head, or over the
whole projection), per-layer sliding windows and RoPE variants (or none: NoPE layers), Gemma's ``(1 + w)`` fp32
RMSNorm, sqrt(D)-scaled embeddings, sandwich norms, OLMo 2's post-norms, ``query_pre_attn_scalar`` and soft-caps,
and Phi-3's fused ``qkv_proj``/``gate_up_proj`` (split by the weight mapping: the modules are Llama's); the MoE
families (``mixtral.py``, ``qwen_moe.py``, ``olmoe.py``) add a sparse MLP (``moe.MoESpec``: ``moe.py``) and OLMoE's
``clip_qkv``. Parameter paths mirror HF names (``model.layers[i].self_attn.q_proj.kernel`` is
``model.layers.{i}.self_attn.q_proj.weight`` transposed), so the checkpoint layout is a table (``layout``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from itersft_jax.models import mapping, moe
from itersft_jax.models.attention import attention
from itersft_jax.models.base import CausalLMBase
from itersft_jax.models.cache import KVCache
from itersft_jax.models.layers import activation, dense, embedding_head, neftune_noise, untied_head
from itersft_jax.models.rope import Rope, apply_rope, cos_sin


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the decoder needs from an HF config, read once and validated (hashable: static model data)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    act: str
    tie_word_embeddings: bool
    initializer_range: float
    windows: tuple                # per layer: sliding window (int) or None
    ropes: tuple[Rope, ...]       # the distinct RoPE variants (cos/sin computed once per forward each)
    layer_ropes: tuple[int | None, ...]  # per layer: index into ``ropes``; None: no rotary (SmolLM3's NoPE layers)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False             # RMSNorm on each query/key head (Qwen3, Gemma 3)
    gemma_norm: bool = False          # RMSNorm as ``x * (1 + w)`` in fp32, weights initialised to 0 (Gemma)
    sandwich_norms: bool = False      # norms after attention and around the MLP (Gemma 2/3)
    embed_scale: float | None = None  # embeddings times sqrt(hidden_size), cast to the compute dtype (Gemma)
    query_scale: float | None = None  # q.k scale; None: head_dim ** -0.5 (Gemma 2/3: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    fused: bool = False               # HF stores qkv_proj and gate_up_proj fused (Phi-3)
    qk_norm_full: bool = False        # RMSNorm on the whole q/k projection, before the split into heads (OLMo 2, OLMoE)
    post_norms: bool = False          # no input norms: attention and MLP outputs normed before the residual (OLMo 2)
    norm_scale_fp32: bool = False     # RMSNorm scales the fp32 normed value, then casts (OLMo 2; Llama casts first)
    clip_qkv: float | None = None     # q, k, v clamped to [-c, c] after the projections (and q/k norms) (OLMoE)
    moe: moe.MoESpec | None = None    # sparse MoE MLPs on the layers ``moe.sparse`` marks (moe.py)

    @classmethod
    def read(cls, config, *, act: str, windows: tuple, ropes: tuple[Rope, ...],
             layer_ropes: tuple[int | None, ...], **switches) -> Spec:
        """The fields every family reads the same way; the family gives the rest."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        activation(act)  # fail at construction on an unknown name
        if switches.get("qk_norm") and switches.get("qk_norm_full"):
            raise ValueError("qk_norm (per head) and qk_norm_full (whole projection) exclude each other")
        return cls(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers, num_heads=heads, num_kv_heads=kv_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            norm_eps=float(config.rms_norm_eps), act=act,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            initializer_range=float(getattr(config, "initializer_range", 0.02)),
            windows=tuple(windows), ropes=tuple(ropes), layer_ropes=tuple(layer_ropes), **switches)


def layer_windows(config, supported=("full_attention", "sliding_attention")) -> tuple:
    """Per-layer windows from HF's ``layer_types``: ``config.sliding_window`` on ``sliding_attention`` layers."""
    n = config.num_hidden_layers
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)[:n]
    unknown = set(layer_types) - set(supported)
    if unknown:
        raise ValueError(f"layer_types {sorted(unknown)} are not supported by the JAX backend; use backend='torch'.")
    window = getattr(config, "sliding_window", None)
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


# ----------------------------------------------------------------------------- modules


class RMSNorm(nnx.Module):
    """HF's RMSNorm: normalize in fp32; Llama casts back and scales by ``w``, Gemma scales by ``1 + w`` in fp32
    and casts back, OLMo 2 (``scale_fp32``) scales by ``w`` in fp32 and casts back."""

    def __init__(self, dim: int, eps: float, *, gemma: bool, dtype, param_dtype, scale_fp32: bool = False):
        self.weight = nnx.Param((jnp.zeros if gemma else jnp.ones)((dim,), param_dtype))
        self.eps, self.gemma, self.dtype, self.scale_fp32 = eps, gemma, dtype, scale_fp32

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.gemma:
            return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        if self.scale_fp32:
            return (normed * self.weight[...].astype(jnp.float32)).astype(x.dtype)
        return self.weight[...].astype(self.dtype) * normed.astype(self.dtype)


def _norm(spec: Spec, dim: int, kw: dict) -> RMSNorm:
    return RMSNorm(dim, spec.norm_eps, gemma=spec.gemma_norm, dtype=kw["dtype"], param_dtype=kw["param_dtype"],
                   scale_fp32=spec.norm_scale_fp32)


def _init(spec: Spec):
    return nnx.initializers.normal(spec.initializer_range)


def _linear(spec: Spec, d_in: int, d_out: int, bias: bool, kw: dict) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, kernel_init=_init(spec), **kw)


class Attention(nnx.Module):
    def __init__(self, spec: Spec, layer_idx: int, kw: dict):
        d, n, k, h = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = _linear(spec, d, n * h, spec.qkv_bias, kw)
        self.k_proj = _linear(spec, d, k * h, spec.qkv_bias, kw)
        self.v_proj = _linear(spec, d, k * h, spec.qkv_bias, kw)
        self.o_proj = _linear(spec, n * h, d, spec.o_bias, kw)
        if spec.qk_norm:
            self.q_norm, self.k_norm = _norm(spec, h, kw), _norm(spec, h, kw)
        elif spec.qk_norm_full:
            self.q_norm, self.k_norm = _norm(spec, n * h, kw), _norm(spec, k * h, kw)
        self.qk_norm, self.qk_norm_full, self.clip = spec.qk_norm, spec.qk_norm_full, spec.clip_qkv
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.scale = spec.query_scale if spec.query_scale is not None else h ** -0.5
        self.window, self.softcap, self.rope = spec.windows[layer_idx], spec.attn_softcap, spec.layer_ropes[layer_idx]

    def __call__(self, x_BTD, kv, ctx, cos_sins):
        b, t, _ = x_BTD.shape
        q_BTF, k_BTF, v_BTF = dense(self.q_proj, x_BTD), dense(self.k_proj, x_BTD), dense(self.v_proj, x_BTD)
        if self.qk_norm_full:
            q_BTF, k_BTF = self.q_norm(q_BTF), self.k_norm(k_BTF)
        if self.clip is not None:
            q_BTF, k_BTF, v_BTF = (jnp.clip(a, -self.clip, self.clip) for a in (q_BTF, k_BTF, v_BTF))
        q_BTNH = q_BTF.reshape(b, t, self.num_heads, self.head_dim)
        k_BTKH = k_BTF.reshape(b, t, self.num_kv_heads, self.head_dim)
        v_BTKH = v_BTF.reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        if self.rope is not None:  # None: a NoPE layer (SmolLM3)
            cos_BTR, sin_BTR = cos_sins[self.rope]
            q_BTNH, k_BTKH = apply_rope(q_BTNH, cos_BTR, sin_BTR), apply_rope(k_BTKH, cos_BTR, sin_BTR)
        out_BTNH, kv = attention(q_BTNH, k_BTKH, v_BTKH, kv, ctx, scale=self.scale, window=self.window,
                                 softcap=self.softcap)
        return dense(self.o_proj, out_BTNH.reshape(b, t, -1)), kv


class MLP(nnx.Module):
    def __init__(self, spec: Spec, kw: dict, size: int | None = None):
        d, f = spec.hidden_size, spec.intermediate_size if size is None else size
        self.gate_proj = _linear(spec, d, f, spec.mlp_bias, kw)
        self.up_proj = _linear(spec, d, f, spec.mlp_bias, kw)
        self.down_proj = _linear(spec, f, d, spec.mlp_bias, kw)
        self.act = spec.act

    def __call__(self, x_BTD):
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        gated_NF = activation(self.act)(dense(self.gate_proj, x_ND)) * dense(self.up_proj, x_ND)
        return dense(self.down_proj, gated_NF).reshape(x_BTD.shape)


class DecoderLayer(nnx.Module):
    """Pre-norm block; with ``sandwich_norms`` (Gemma 2/3) the attention and MLP outputs are normed too, and HF's
    ``post_attention_layernorm`` is that output norm rather than the MLP's input norm. With ``post_norms``
    (OLMo 2) only the outputs are normed: ``post_attention_layernorm`` and ``post_feedforward_layernorm``."""

    def __init__(self, spec: Spec, layer_idx: int, kw: dict):
        d = spec.hidden_size
        self.self_attn = Attention(spec, layer_idx, kw)
        self.sparse = spec.moe is not None and spec.moe.sparse[layer_idx]
        if self.sparse:
            shared = MLP(spec, kw, spec.moe.shared_expert_size) if spec.moe.shared_expert_size else None
            self.mlp = moe.SparseMoeBlock(spec.moe, d, spec.act, _init(spec), kw, shared)
        else:
            self.mlp = MLP(spec, kw)
        self.post_norms = spec.post_norms
        if not self.post_norms:
            self.input_layernorm = _norm(spec, d, kw)
        self.post_attention_layernorm = _norm(spec, d, kw)
        self.sandwich = spec.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = _norm(spec, d, kw)
        if self.sandwich or self.post_norms:
            self.post_feedforward_layernorm = _norm(spec, d, kw)

    def __call__(self, h_BTD, kv, ctx, cos_sins):
        mlp = functools.partial(self.mlp, segment_ids_BT=ctx.segment_ids_BT) if self.sparse else self.mlp
        if self.post_norms:
            attn_BTD, kv = self.self_attn(h_BTD, kv, ctx, cos_sins)
            h_BTD = h_BTD + self.post_attention_layernorm(attn_BTD)
            return h_BTD + self.post_feedforward_layernorm(mlp(h_BTD)), kv
        attn_BTD, kv = self.self_attn(self.input_layernorm(h_BTD), kv, ctx, cos_sins)
        if self.sandwich:
            h_BTD = h_BTD + self.post_attention_layernorm(attn_BTD)
            return h_BTD + self.post_feedforward_layernorm(mlp(self.pre_feedforward_layernorm(h_BTD))), kv
        h_BTD = h_BTD + attn_BTD
        return h_BTD + mlp(self.post_attention_layernorm(h_BTD)), kv


class Model(nnx.Module):
    """HF's ``model`` submodule: embeddings, decoder layers, final norm."""

    def __init__(self, spec: Spec, kw: dict):
        self.embed_tokens = nnx.Embed(spec.vocab_size, spec.hidden_size,
                                      embedding_init=_init(spec), **kw)
        self.layers = nnx.List([DecoderLayer(spec, i, kw) for i in range(spec.num_layers)])
        self.norm = _norm(spec, spec.hidden_size, kw)


class DecoderLM(CausalLMBase):
    """The causal LM of every RoPE-decoder family; a family's ``CausalLM`` passes its ``Spec``."""

    def __init__(self, spec: Spec, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=False,
                 attn_implementation: str | None = "auto", rngs: nnx.Rngs | None = None):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs if rngs is not None else nnx.Rngs(0)}
        self.spec = spec
        self.model = Model(spec, kw)
        self.lm_head = untied_head(spec, spec.hidden_size, {**kw, "kernel_init": _init(spec)}, default_tied=False)
        windows = [w for w in spec.windows if w is not None]
        self.configure(dtype=dtype, remat=remat, attn_implementation=attn_implementation,
                       num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                       window=max(windows) if windows else None, softcap=spec.attn_softcap,
                       final_softcap=spec.final_softcap)

    def hidden_states(self, input_ids_BT, positions_BT, attention_mask_BS, cache: KVCache | None = None,
                      neftune=None):
        """The final-normed hidden states ``[B, T, D]`` (the LM head's input) and the advanced cache."""
        ctx = self.attention_context(attention_mask_BS, input_ids_BT.shape[1], cache)
        h_BTD = self.model.embed_tokens(input_ids_BT)
        if self.spec.embed_scale is not None:  # HF casts the normalizer to the compute dtype
            h_BTD = h_BTD * jnp.asarray(self.spec.embed_scale, h_BTD.dtype)
        h_BTD = neftune_noise(neftune, h_BTD, ctx.segment_ids_BT)
        cos_sins = tuple(cos_sin(rope, positions_BT, self.dtype) for rope in self.spec.ropes)
        h_BTD, cache = self.run_layers(self.model.layers, h_BTD, cache, ctx, cos_sins)
        return self.model.norm(h_BTD), cache

    def head_weight(self):
        return embedding_head(self.model.embed_tokens, self.lm_head)


def family(spec_of: Callable[[Any], Spec], name: str | None = None):
    """A decoder family's contract from its config reader: ``(CausalLM, params_from_hf, params_to_hf, hf_layout)``.

    ``CausalLM(config, **kwargs)`` builds ``DecoderLM(spec_of(config), **kwargs)``; the two converters go through
    ``layout`` (``name`` in error messages; default the config's ``model_type``).
    """

    class CausalLM(DecoderLM):
        def __init__(self, config, **kwargs):
            super().__init__(spec_of(config), **kwargs)

    CausalLM.__module__ = spec_of.__module__

    def params_from_hf(tensors: dict[str, np.ndarray], config) -> dict:
        """HF state-dict names -> the nested pure dict of ``nnx.state(model, nnx.Param)`` (checkpoint dtype)."""
        return mapping.params_from_hf(tensors, layout(spec_of(config), name or config.model_type))

    def params_to_hf(params: dict, config) -> dict[str, np.ndarray]:
        """The inverse of ``params_from_hf``: numpy arrays under HF names (a tied head is not written)."""
        return mapping.params_to_hf(params, layout(spec_of(config), name or config.model_type))

    def hf_layout(config) -> mapping.Layout:
        """The family's HF checkpoint table for ``config`` (HF names <-> parameter paths)."""
        return layout(spec_of(config), name or config.model_type)

    return CausalLM, params_from_hf, params_to_hf, hf_layout


# ----------------------------------------------------------------------------- HF names


def layout(spec: Spec, family: str) -> mapping.Layout:
    """The HF checkpoint of a decoder family as one table (see ``mapping``)."""
    d, f, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    nh, kh = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    rows = [mapping.tensor("model.embed_tokens.weight", ("model", "embed_tokens", "embedding"), (v, d))]
    variants = []
    for i in range(spec.num_layers):
        hf, path = f"model.layers.{i}.", ("model", "layers", i)
        attn, mlp = (*path, "self_attn"), (*path, "mlp")
        sparse = spec.moe is not None and spec.moe.sparse[i]
        if spec.fused:
            qkv = [(*attn, name) for name in ("q_proj", "k_proj", "v_proj")]
            rows += mapping.fused_linear(f"{hf}self_attn.qkv_proj", qkv, d, [nh, kh, kh], spec.qkv_bias)
            rows += mapping.fused_linear(f"{hf}mlp.gate_up_proj", [(*mlp, "gate_proj"), (*mlp, "up_proj")], d, [f, f],
                                         spec.mlp_bias)
        else:
            for name, width in (("q_proj", nh), ("k_proj", kh), ("v_proj", kh)):
                rows += mapping.linear(f"{hf}self_attn.{name}", (*attn, name), d, width, spec.qkv_bias)
            if not sparse:
                rows += mapping.linear(f"{hf}mlp.gate_proj", (*mlp, "gate_proj"), d, f, spec.mlp_bias)
                rows += mapping.linear(f"{hf}mlp.up_proj", (*mlp, "up_proj"), d, f, spec.mlp_bias)
        rows += mapping.linear(f"{hf}self_attn.o_proj", (*attn, "o_proj"), nh, d, spec.o_bias)
        if sparse:
            rows += _sparse_rows(spec, hf, mlp, variants)
        else:
            rows += mapping.linear(f"{hf}mlp.down_proj", (*mlp, "down_proj"), f, d, spec.mlp_bias)
        norms = [("self_attn.q_norm", spec.head_dim), ("self_attn.k_norm", spec.head_dim)] if spec.qk_norm else []
        if spec.qk_norm_full:
            norms += [("self_attn.q_norm", nh), ("self_attn.k_norm", kh)]
        norms += [] if spec.post_norms else [("input_layernorm", d)]
        norms += [("post_attention_layernorm", d)]
        if spec.sandwich_norms:
            norms += [("pre_feedforward_layernorm", d), ("post_feedforward_layernorm", d)]
        elif spec.post_norms:
            norms += [("post_feedforward_layernorm", d)]
        rows += [mapping.tensor(f"{hf}{name}.weight", (*path, *name.split("."), "weight"), (dim,))
                 for name, dim in norms]
    rows.append(mapping.tensor("model.norm.weight", ("model", "norm", "weight"), (d,)))
    # Older checkpoints saved the rotary buffer; in-memory state dicts list a tied head (it is the embedding).
    ignore = [r".*rotary_emb\.inv_freq"] + (["lm_head.weight"] if spec.tie_word_embeddings else [])
    if not spec.tie_word_embeddings:
        rows.append(mapping.tensor("lm_head.weight", ("lm_head", "kernel"), (v, d), transpose=True))
    return mapping.Layout(family, tuple(rows), ignore=tuple(ignore), variants=tuple(variants))


def _sparse_rows(spec: Spec, hf: str, path: tuple, variants: list) -> list:
    """A sparse layer's router, experts (see ``moe.expert_rows``) and Qwen2-MoE's shared expert and its gate."""
    d, shared = spec.hidden_size, spec.moe.shared_expert_size
    rows, fused = moe.expert_rows(spec.moe, hf, path, d)
    variants.append((tuple(row.name for row in rows), tuple(fused)))
    if shared:
        for name, d_in, d_out in (("gate_proj", d, shared), ("up_proj", d, shared), ("down_proj", shared, d)):
            rows += mapping.linear(f"{hf}mlp.shared_expert.{name}", (*path, "shared_expert", name), d_in, d_out, False)
        rows += mapping.linear(f"{hf}mlp.shared_expert_gate", (*path, "shared_expert_gate"), d, 1, False)
    return rows
