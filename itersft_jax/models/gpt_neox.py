"""GPT-NeoX and Pythia (HF ``model_type`` ``gpt_neox``) as a Flax NNX causal LM.

Matches ``transformers.GPTNeoXForCausalLM``: LayerNorms (with bias) before attention and MLP, and either the
parallel residual ``x + attn(ln_in(x)) + mlp(ln_post(x))`` (``use_parallel_residual=True``: Pythia, NeoX-20B) or the
sequential one ``y = x + attn(ln_in(x)); y + mlp(ln_post(y))``; rotary embeddings on the first ``rotary_pct``
(``partial_rotary_factor``) of each head's dims, with every RoPE type of ``rope.py`` (``rope_scaling``); one fused
``query_key_value`` projection whose output is laid out per head — ``[q_h | k_h | v_h]`` for head ``h``, NeoX's
layout, kept as one layer so that LoRA adapters and tensor parallelism see HF's module —; biases on the attention
projections (``attention_bias``) and the MLP; a plain (not gated) MLP; the head ``embed_out`` (transformers 5 calls
the module ``lm_head`` and saves ``embed_out``) unless ``tie_word_embeddings``.

Why a family file and not ``decoder.py`` switches: parameter paths mirror HF names, and NeoX's differ everywhere
(``attention.query_key_value``, ``attention.dense``, ``mlp.dense_h_to_4h``), its QKV stays fused, its norms are
LayerNorms with a bias and its MLP is not gated — five switches and a renaming for one family.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from itersft_jax.models import mapping
from itersft_jax.models.attention import attention
from itersft_jax.models.base import CausalLMBase
from itersft_jax.models.cache import KVCache
from itersft_jax.models.layers import activation, dense, embedding_head, neftune_noise, untied_head
from itersft_jax.models.rope import apply_rope, cos_sin, rope_from_config


def _head_dim(config) -> int:
    return config.hidden_size // config.num_attention_heads


def _layer_norm(config, kw: dict) -> nnx.LayerNorm:
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False, **kw)


def _linear(config, d_in: int, d_out: int, bias: bool, kw: dict) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, kernel_init=nnx.initializers.normal(config.initializer_range),
                      **kw)


class Attention(nnx.Module):
    def __init__(self, config, kw: dict):
        d, bias = config.hidden_size, bool(config.attention_bias)
        self.num_heads, self.head_dim = config.num_attention_heads, _head_dim(config)
        self.query_key_value = _linear(config, d, 3 * d, bias, kw)
        self.dense = _linear(config, d, d, bias, kw)

    def __call__(self, x_BTD, kv, ctx, cos_sin_BTR):
        b, t, _ = x_BTD.shape
        qkv_BTN3H = dense(self.query_key_value, x_BTD).reshape(b, t, self.num_heads, 3 * self.head_dim)
        q_BTNH, k_BTNH, v_BTNH = jnp.split(qkv_BTN3H, 3, axis=-1)
        cos_BTR, sin_BTR = cos_sin_BTR
        q_BTNH, k_BTNH = apply_rope(q_BTNH, cos_BTR, sin_BTR), apply_rope(k_BTNH, cos_BTR, sin_BTR)
        out_BTNH, kv = attention(q_BTNH, k_BTNH, v_BTNH, kv, ctx, scale=self.head_dim ** -0.5)
        return dense(self.dense, out_BTNH.reshape(b, t, -1)), kv


class MLP(nnx.Module):
    def __init__(self, config, kw: dict):
        d, f = config.hidden_size, config.intermediate_size
        self.dense_h_to_4h = _linear(config, d, f, True, kw)
        self.dense_4h_to_h = _linear(config, f, d, True, kw)
        self.act = config.hidden_act
        activation(self.act)  # fail at construction on an unknown name

    def __call__(self, x_BTD):
        return dense(self.dense_4h_to_h, activation(self.act)(dense(self.dense_h_to_4h, x_BTD)))


class Layer(nnx.Module):
    def __init__(self, config, kw: dict):
        self.input_layernorm = _layer_norm(config, kw)
        self.post_attention_layernorm = _layer_norm(config, kw)
        self.attention = Attention(config, kw)
        self.mlp = MLP(config, kw)
        self.parallel = bool(config.use_parallel_residual)

    def __call__(self, x_BTD, kv, ctx, cos_sin_BTR):
        attn_BTD, kv = self.attention(self.input_layernorm(x_BTD), kv, ctx, cos_sin_BTR)
        if self.parallel:
            return x_BTD + attn_BTD + self.mlp(self.post_attention_layernorm(x_BTD)), kv
        x_BTD = x_BTD + attn_BTD
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD)), kv


class Model(nnx.Module):
    """HF's ``gpt_neox`` submodule: embeddings, layers, final LayerNorm."""

    def __init__(self, config, kw: dict):
        self.embed_in = nnx.Embed(config.vocab_size, config.hidden_size,
                                  embedding_init=nnx.initializers.normal(config.initializer_range), **kw)
        self.layers = nnx.List([Layer(config, kw) for _ in range(config.num_hidden_layers)])
        self.final_layer_norm = _layer_norm(config, kw)


class CausalLM(CausalLMBase):
    """``GPTNeoXForCausalLM`` in NNX. Parameter paths: ``gpt_neox.{embed_in, layers[i], final_layer_norm}``,
    ``lm_head`` (HF's ``embed_out``)."""

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=False,
                 attn_implementation: str | None = "auto", rngs: nnx.Rngs | None = None):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs if rngs is not None else nnx.Rngs(0)}
        self.rope = rope_from_config(config, _head_dim(config), partial=True)
        self.gpt_neox = Model(config, kw)
        self.lm_head = untied_head(config, config.hidden_size,
                                   {**kw, "kernel_init": nnx.initializers.normal(config.initializer_range)})
        self.configure(dtype=dtype, remat=remat, attn_implementation=attn_implementation,
                       num_layers=config.num_hidden_layers, num_kv_heads=config.num_attention_heads,
                       head_dim=_head_dim(config))

    def hidden_states(self, input_ids_BT, positions_BT, attention_mask_BS, cache: KVCache | None = None,
                      neftune=None):
        """The final-normed hidden states ``[B, T, D]`` (the LM head's input) and the advanced cache."""
        ctx = self.attention_context(attention_mask_BS, input_ids_BT.shape[1], cache)
        x_BTD = neftune_noise(neftune, self.gpt_neox.embed_in(input_ids_BT), ctx.segment_ids_BT)
        x_BTD, cache = self.run_layers(self.gpt_neox.layers, x_BTD, cache, ctx,
                                       cos_sin(self.rope, positions_BT, self.dtype))
        return self.gpt_neox.final_layer_norm(x_BTD), cache

    def head_weight(self):
        return embedding_head(self.gpt_neox.embed_in, self.lm_head)


def _layout(config) -> mapping.Layout:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    bias = bool(config.attention_bias)
    rows = [mapping.tensor("gpt_neox.embed_in.weight", ("gpt_neox", "embed_in", "embedding"), (v, d))]
    for i in range(config.num_hidden_layers):
        hf, path = f"gpt_neox.layers.{i}.", ("gpt_neox", "layers", i)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            rows += mapping.layer_norm(f"{hf}{norm}", (*path, norm), d)
        rows += mapping.linear(f"{hf}attention.query_key_value", (*path, "attention", "query_key_value"), d, 3 * d,
                               bias)
        rows += mapping.linear(f"{hf}attention.dense", (*path, "attention", "dense"), d, d, bias)
        rows += mapping.linear(f"{hf}mlp.dense_h_to_4h", (*path, "mlp", "dense_h_to_4h"), d, f, True)
        rows += mapping.linear(f"{hf}mlp.dense_4h_to_h", (*path, "mlp", "dense_4h_to_h"), f, d, True)
    rows += mapping.layer_norm("gpt_neox.final_layer_norm", ("gpt_neox", "final_layer_norm"), d)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if not tied:
        rows.append(mapping.tensor("embed_out.weight", ("lm_head", "kernel"), (v, d), transpose=True))
    # In-memory state dicts name the head ``lm_head`` (transformers 5); ``GPTNeoXModel`` checkpoints have no
    # ``gpt_neox.`` prefix; old ones carry the causal-mask and rotary buffers.
    ignore = (r".*\.attention\.(masked_)?bias", r".*rotary_emb\.inv_freq") + (
        ("embed_out.weight", "lm_head.weight") if tied else ())
    return mapping.Layout("GPT-NeoX", tuple(rows), aliases=(("lm_head.", "embed_out."), ("", "gpt_neox.")),
                          ignore=ignore)


hf_layout = _layout  # the HF checkpoint table (HF names <-> parameter paths)


def params_from_hf(tensors: dict[str, np.ndarray], config) -> dict:
    """HF GPT-NeoX state dict (``embed_out`` or ``lm_head``; with or without ``gpt_neox.``) -> pure params dict."""
    return mapping.params_from_hf(tensors, _layout(config))


def params_to_hf(params, config) -> dict[str, np.ndarray]:
    """Pure params dict -> the tensors ``GPTNeoXForCausalLM.save_pretrained`` writes (tied head omitted)."""
    return mapping.params_to_hf(params, _layout(config))
