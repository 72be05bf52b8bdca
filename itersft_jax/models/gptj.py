"""GPT-J (HF ``model_type`` ``gptj``) as a Flax NNX causal LM.

Matches ``transformers.GPTJForCausalLM``: one LayerNorm (``ln_1``) feeding attention and MLP in parallel,
``x + attn(ln_1(x)) + mlp(ln_1(x))``; q/k/v/out projections without biases; rotary embeddings on the first
``rotary_dim`` dims of each head in GPT-J's interleaved layout (``rotate_every_two``: dims ``2i`` and ``2i + 1`` turn
together, ``rope.Rope(interleaved=True)``), base 10000, no scaling; an MLP ``fc_in``/``fc_out`` with biases; an
output head with a bias (``lm_head.bias``, kept when ``tie_word_embeddings`` ties its weight to ``wte``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from itersft_jax.models import mapping
from itersft_jax.models.attention import attention
from itersft_jax.models.base import CausalLMBase
from itersft_jax.models.cache import KVCache
from itersft_jax.models.layers import activation, dense, neftune_noise
from itersft_jax.models.rope import Rope, apply_rope, cos_sin

_ROPE_THETA = 10000.0  # GPT-J's create_sinusoidal_positions


def _inner(config) -> int:
    return config.n_inner if config.n_inner is not None else 4 * config.hidden_size


def _tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def rope_of(config) -> Rope:
    """GPT-J's rotary embedding: the first ``rotary_dim`` dims of each head, interleaved."""
    head_dim = config.hidden_size // config.num_attention_heads
    rotary_dim = int(config.rotary_dim)
    if rotary_dim > head_dim or rotary_dim % 2:
        raise ValueError(f"rotary_dim={config.rotary_dim} must be even and at most the head size {head_dim} "
                         f"(hidden_size / num_attention_heads), as transformers' GPT-J needs too")
    return Rope("default", _ROPE_THETA, rotary_dim, (), int(config.max_position_embeddings), interleaved=True)


def _linear(config, d_in: int, d_out: int, bias: bool, kw: dict) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, kernel_init=nnx.initializers.normal(config.initializer_range),
                      **kw)


class Attention(nnx.Module):
    def __init__(self, config, kw: dict):
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = (_linear(config, d, d, False, kw) for _ in range(3))
        self.out_proj = _linear(config, d, d, False, kw)

    def __call__(self, x_BTD, kv, ctx, cos_sin_BTR):
        b, t, _ = x_BTD.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q_BTNH, k_BTNH, v_BTNH = (dense(proj, x_BTD).reshape(shape) for proj in (self.q_proj, self.k_proj,
                                                                                  self.v_proj))
        cos_BTR, sin_BTR = cos_sin_BTR
        q_BTNH = apply_rope(q_BTNH, cos_BTR, sin_BTR, interleaved=True)
        k_BTNH = apply_rope(k_BTNH, cos_BTR, sin_BTR, interleaved=True)
        out_BTNH, kv = attention(q_BTNH, k_BTNH, v_BTNH, kv, ctx, scale=self.head_dim ** -0.5)
        return dense(self.out_proj, out_BTNH.reshape(b, t, -1)), kv


class MLP(nnx.Module):
    def __init__(self, config, kw: dict):
        self.fc_in = _linear(config, config.hidden_size, _inner(config), True, kw)
        self.fc_out = _linear(config, _inner(config), config.hidden_size, True, kw)
        self.act = config.activation_function
        activation(self.act, "activation_function")  # fail at construction on an unknown name

    def __call__(self, x_BTD):
        return dense(self.fc_out, activation(self.act)(dense(self.fc_in, x_BTD)))


class Block(nnx.Module):
    def __init__(self, config, kw: dict):
        self.ln_1 = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_epsilon, use_fast_variance=False,
                                  **kw)
        self.attn = Attention(config, kw)
        self.mlp = MLP(config, kw)

    def __call__(self, x_BTD, kv, ctx, cos_sin_BTR):
        h_BTD = self.ln_1(x_BTD)
        attn_BTD, kv = self.attn(h_BTD, kv, ctx, cos_sin_BTR)
        return attn_BTD + self.mlp(h_BTD) + x_BTD, kv


class Model(nnx.Module):
    """HF's ``transformer`` submodule: embeddings, blocks, final LayerNorm."""

    def __init__(self, config, kw: dict):
        self.wte = nnx.Embed(config.vocab_size, config.hidden_size,
                             embedding_init=nnx.initializers.normal(config.initializer_range), **kw)
        self.h = nnx.List([Block(config, kw) for _ in range(config.num_hidden_layers)])
        self.ln_f = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_epsilon, use_fast_variance=False,
                                  **kw)


class HeadBias(nnx.Module):
    """The output head of a tied GPT-J: its weight is ``wte``'s, only the bias is its own."""

    def __init__(self, vocab_size: int, param_dtype):
        self.bias = nnx.Param(jnp.zeros((vocab_size,), param_dtype))


class CausalLM(CausalLMBase):
    """``GPTJForCausalLM`` in NNX. Parameter paths: ``transformer.{wte, h[i], ln_f}``, ``lm_head.{kernel, bias}``
    (``lm_head.bias`` alone when tied)."""

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=False,
                 attn_implementation: str | None = "auto", rngs: nnx.Rngs | None = None):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs if rngs is not None else nnx.Rngs(0)}
        self.rope = rope_of(config)
        self.transformer = Model(config, kw)
        self.lm_head = (HeadBias(config.vocab_size, param_dtype) if _tied(config)
                        else _linear(config, config.hidden_size, config.vocab_size, True, kw))
        self.tied = _tied(config)
        self.configure(dtype=dtype, remat=remat, attn_implementation=attn_implementation,
                       num_layers=config.num_hidden_layers, num_kv_heads=config.num_attention_heads,
                       head_dim=config.hidden_size // config.num_attention_heads)

    def hidden_states(self, input_ids_BT, positions_BT, attention_mask_BS, cache: KVCache | None = None,
                      neftune=None):
        """The final-normed hidden states ``[B, T, D]`` (the LM head's input) and the advanced cache."""
        ctx = self.attention_context(attention_mask_BS, input_ids_BT.shape[1], cache)
        x_BTD = neftune_noise(neftune, self.transformer.wte(input_ids_BT), ctx.segment_ids_BT)
        x_BTD, cache = self.run_layers(self.transformer.h, x_BTD, cache, ctx,
                                       cos_sin(self.rope, positions_BT, self.dtype))
        return self.transformer.ln_f(x_BTD), cache

    def head_weight(self):
        if self.tied:
            return self.transformer.wte.embedding[...], True
        return self.lm_head.kernel[...], False

    def head_bias(self):
        return self.lm_head.bias[...]


def _layout(config) -> mapping.Layout:
    d, f, v = config.hidden_size, _inner(config), config.vocab_size
    rows = [mapping.tensor("transformer.wte.weight", ("transformer", "wte", "embedding"), (v, d))]
    for i in range(config.num_hidden_layers):
        hf, path = f"transformer.h.{i}.", ("transformer", "h", i)
        rows += mapping.layer_norm(f"{hf}ln_1", (*path, "ln_1"), d)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rows += mapping.linear(f"{hf}attn.{proj}", (*path, "attn", proj), d, d, False)
        rows += mapping.linear(f"{hf}mlp.fc_in", (*path, "mlp", "fc_in"), d, f, True)
        rows += mapping.linear(f"{hf}mlp.fc_out", (*path, "mlp", "fc_out"), f, d, True)
    rows += mapping.layer_norm("transformer.ln_f", ("transformer", "ln_f"), d)
    if not _tied(config):
        rows.append(mapping.tensor("lm_head.weight", ("lm_head", "kernel"), (v, d), transpose=True))
    rows.append(mapping.tensor("lm_head.bias", ("lm_head", "bias"), (v,)))
    # Old checkpoints carry the causal-mask buffers; in-memory state dicts of a tied model list the tied weight.
    ignore = (r".*\.attn\.(masked_)?bias",) + (("lm_head.weight",) if _tied(config) else ())
    return mapping.Layout("GPT-J", tuple(rows), ignore=ignore)


hf_layout = _layout  # the HF checkpoint table (HF names <-> parameter paths)


def params_from_hf(tensors: dict[str, np.ndarray], config) -> dict:
    """HF GPT-J state dict -> pure params dict."""
    return mapping.params_from_hf(tensors, _layout(config))


def params_to_hf(params, config) -> dict[str, np.ndarray]:
    """Pure params dict -> the tensors ``GPTJForCausalLM.save_pretrained`` writes (a tied weight omitted)."""
    return mapping.params_to_hf(params, _layout(config))
