"""GPT-2 (HF ``model_type`` ``gpt2``) as a Flax NNX causal LM.

Matches ``transformers.GPT2LMHeadModel``: learned absolute positions (``wpe``), pre-LayerNorm blocks,
fused ``c_attn`` projection, LM head tied to ``wte`` (unless ``tie_word_embeddings=False``).
HF's ``Conv1D`` stores weights as ``[in, out]`` — already the layout of ``nnx.Linear.kernel``, so GPT-2
weights convert without a transpose (only an untied ``lm_head``, an ``nn.Linear``, is transposed).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from itersft_jax.models import mapping
from itersft_jax.models.attention import attention
from itersft_jax.models.base import CausalLMBase
from itersft_jax.models.cache import KVCache
from itersft_jax.models.layers import activation, dense, embedding_head, neftune_noise, untied_head


class Attention(nnx.Module):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        # HF folds both flags into one scale applied to q.k (reorder_and_upcast_attn only changes where
        # the scale is applied and forces fp32 logits, which our attention always uses).
        scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        std = config.initializer_range
        self.c_attn = nnx.Linear(d, 3 * d, kernel_init=nnx.initializers.normal(std), **kw)
        self.c_proj = nnx.Linear(d, d, kernel_init=nnx.initializers.normal(
            std / math.sqrt(2 * config.num_hidden_layers)), **kw)

    def __call__(self, x_BTD, kv, ctx):
        b, t, _ = x_BTD.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q_BTNH, k_BTNH, v_BTNH = (y.reshape(shape) for y in jnp.split(dense(self.c_attn, x_BTD), 3, axis=-1))
        out_BTNH, kv = attention(q_BTNH, k_BTNH, v_BTNH, kv, ctx, scale=self.scale)
        return dense(self.c_proj, out_BTNH.reshape(b, t, -1)), kv


class MLP(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        inner = config.n_inner if config.n_inner is not None else 4 * d
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        std = config.initializer_range
        self.c_fc = nnx.Linear(d, inner, kernel_init=nnx.initializers.normal(std), **kw)
        self.c_proj = nnx.Linear(inner, d, kernel_init=nnx.initializers.normal(
            std / math.sqrt(2 * config.num_hidden_layers)), **kw)
        self.act = config.activation_function
        activation(self.act, "activation_function")  # fail at construction on an unknown name

    def __call__(self, x_BTD):
        return dense(self.c_proj, activation(self.act)(dense(self.c_fc, x_BTD)))


class Block(nnx.Module):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.layer_norm_epsilon
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.ln_1 = nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, **kw)
        self.attn = Attention(config, layer_idx, **kw)
        self.ln_2 = nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, **kw)
        self.mlp = MLP(config, **kw)

    def __call__(self, x_BTD, kv, ctx):
        attn_BTD, kv = self.attn(self.ln_1(x_BTD), kv, ctx)
        x_BTD = x_BTD + attn_BTD
        return x_BTD + self.mlp(self.ln_2(x_BTD)), kv


class CausalLM(CausalLMBase):
    """``GPT2LMHeadModel`` in NNX. Parameter paths: ``wte``, ``wpe``, ``h[i]``, ``ln_f`` (, ``lm_head``)."""

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=False,
                 attn_implementation: str | None = "auto", rngs: nnx.Rngs | None = None):
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with add_cross_attention is not supported by the JAX backend")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        d = config.hidden_size
        embed_init = nnx.initializers.normal(config.initializer_range)
        self.wte = nnx.Embed(config.vocab_size, d, embedding_init=embed_init, **kw)
        self.wpe = nnx.Embed(config.max_position_embeddings, d, embedding_init=embed_init, **kw)
        self.h = nnx.List([Block(config, i, **kw) for i in range(config.num_hidden_layers)])
        self.ln_f = nnx.LayerNorm(d, epsilon=config.layer_norm_epsilon, use_fast_variance=False, **kw)
        self.lm_head = untied_head(config, d, {**kw, "kernel_init": embed_init})
        self.configure(dtype=dtype, remat=remat, attn_implementation=attn_implementation, num_layers=len(self.h),
                       num_kv_heads=config.num_attention_heads, head_dim=d // config.num_attention_heads)

    def hidden_states(self, input_ids_BT, positions_BT, attention_mask_BS, cache: KVCache | None = None,
                      neftune=None):
        """The final-normed hidden states ``[B, T, D]`` (the LM head's input) and the advanced cache."""
        ctx = self.attention_context(attention_mask_BS, input_ids_BT.shape[1], cache)
        x_BTD = neftune_noise(neftune, self.wte(input_ids_BT), ctx.segment_ids_BT) + self.wpe(positions_BT)
        x_BTD, cache = self.run_layers(self.h, x_BTD, cache, ctx)
        return self.ln_f(x_BTD), cache

    def head_weight(self):
        return embedding_head(self.wte, self.lm_head)


def _layout(config) -> mapping.Layout:
    d, v = config.hidden_size, config.vocab_size
    inner = config.n_inner if config.n_inner is not None else 4 * d
    rows = [mapping.tensor("transformer.wte.weight", ("wte", "embedding"), (v, d)),
            mapping.tensor("transformer.wpe.weight", ("wpe", "embedding"), (config.max_position_embeddings, d))]
    rows += mapping.layer_norm("transformer.ln_f", ("ln_f",), d)
    for i in range(config.num_hidden_layers):
        hf, path = f"transformer.h.{i}.", ("h", i)
        rows += mapping.layer_norm(f"{hf}ln_1", (*path, "ln_1"), d)
        rows += mapping.linear(f"{hf}attn.c_attn", (*path, "attn", "c_attn"), d, 3 * d, True, conv1d=True)
        rows += mapping.linear(f"{hf}attn.c_proj", (*path, "attn", "c_proj"), d, d, True, conv1d=True)
        rows += mapping.layer_norm(f"{hf}ln_2", (*path, "ln_2"), d)
        rows += mapping.linear(f"{hf}mlp.c_fc", (*path, "mlp", "c_fc"), d, inner, True, conv1d=True)
        rows += mapping.linear(f"{hf}mlp.c_proj", (*path, "mlp", "c_proj"), inner, d, True, conv1d=True)
    tied = getattr(config, "tie_word_embeddings", True)
    if not tied:
        rows.append(mapping.tensor("lm_head.weight", ("lm_head", "kernel"), (v, d), transpose=True))
    # GPT2Model checkpoints (e.g. the original "gpt2") have no "transformer." prefix; old ones carry the
    # causal-mask buffers; a tied checkpoint may still list lm_head.weight.
    ignore = (r".*\.attn\.(masked_)?bias",) + (("lm_head.weight",) if tied else ())
    return mapping.Layout("GPT-2", tuple(rows), aliases=(("", "transformer."),), ignore=ignore)


hf_layout = _layout  # the HF checkpoint table (HF names <-> parameter paths)


def params_from_hf(tensors: dict[str, np.ndarray], config) -> dict:
    """HF GPT-2 state dict (with or without the ``transformer.`` prefix) -> pure params dict."""
    return mapping.params_from_hf(tensors, _layout(config))


def params_to_hf(params, config) -> dict[str, np.ndarray]:
    """Pure params dict -> the tensors ``GPT2LMHeadModel.save_pretrained`` writes (tied head omitted)."""
    return mapping.params_to_hf(params, _layout(config))
