"""OPT (HF ``model_type`` ``opt``) as a Flax NNX causal LM.

Matches ``transformers.OPTForCausalLM``: learned positions with OPT's offset of 2 (HF embeds
``cumsum(mask) * mask - 1 + 2``; ``positions_BT + 2`` is the same for real tokens), pre-LN
(``do_layer_norm_before=True``) or post-LN blocks (opt-350m), optional ``project_in``/``project_out``
when ``word_embed_proj_dim != hidden_size``, q scaled by ``head_dim**-0.5`` after its projection, and
the LM head tied to ``embed_tokens`` unless ``tie_word_embeddings=False``. LayerNorms use torch's
default eps (1e-5) and have no parameters when ``layer_norm_elementwise_affine=False``.
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

_POSITION_OFFSET = 2
_LN_EPS = 1e-5  # OPT builds nn.LayerNorm with torch's default eps


def _layer_norm(config, d, kw):
    affine = config.layer_norm_elementwise_affine
    return nnx.LayerNorm(d, epsilon=_LN_EPS, use_bias=affine, use_scale=affine, use_fast_variance=False,
                         **kw)


def _has_final_layer_norm(config) -> bool:
    return config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)


class Attention(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.scaling = self.head_dim**-0.5
        kw = {"use_bias": config.enable_bias, "kernel_init": nnx.initializers.normal(config.init_std),
              "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.q_proj = nnx.Linear(d, d, **kw)
        self.k_proj = nnx.Linear(d, d, **kw)
        self.v_proj = nnx.Linear(d, d, **kw)
        self.out_proj = nnx.Linear(d, d, **kw)

    def __call__(self, x_BTD, kv, ctx):
        b, t, _ = x_BTD.shape
        shape = (b, t, self.num_heads, self.head_dim)
        # HF scales q (bias included) before q.k and then attends with scale 1; do the same.
        q_BTNH = (dense(self.q_proj, x_BTD) * self.scaling).reshape(shape)
        k_BTNH, v_BTNH = dense(self.k_proj, x_BTD).reshape(shape), dense(self.v_proj, x_BTD).reshape(shape)
        out_BTNH, kv = attention(q_BTNH, k_BTNH, v_BTNH, kv, ctx, scale=1.0)
        return dense(self.out_proj, out_BTNH.reshape(b, t, -1)), kv


class DecoderLayer(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        linear_kw = dict(use_bias=config.enable_bias, kernel_init=nnx.initializers.normal(config.init_std),
                         **kw)
        self.pre_ln = config.do_layer_norm_before
        self.act = config.activation_function
        activation(self.act, "activation_function")  # fail at construction on an unknown name
        self.self_attn = Attention(config, **kw)
        self.self_attn_layer_norm = _layer_norm(config, d, kw)
        self.fc1 = nnx.Linear(d, config.ffn_dim, **linear_kw)
        self.fc2 = nnx.Linear(config.ffn_dim, d, **linear_kw)
        self.final_layer_norm = _layer_norm(config, d, kw)

    def __call__(self, x_BTD, kv, ctx):
        h_BTD = self.self_attn_layer_norm(x_BTD) if self.pre_ln else x_BTD
        h_BTD, kv = self.self_attn(h_BTD, kv, ctx)
        x_BTD = x_BTD + h_BTD
        if not self.pre_ln:
            x_BTD = self.self_attn_layer_norm(x_BTD)
        h_BTD = self.final_layer_norm(x_BTD) if self.pre_ln else x_BTD
        x_BTD = x_BTD + dense(self.fc2, activation(self.act)(dense(self.fc1, h_BTD)))
        if not self.pre_ln:
            x_BTD = self.final_layer_norm(x_BTD)
        return x_BTD, kv


class CausalLM(CausalLMBase):
    """``OPTForCausalLM`` in NNX. Parameter paths mirror ``model.decoder.*`` without that prefix."""

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=False,
                 attn_implementation: str | None = "auto", rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        d, w = config.hidden_size, config.word_embed_proj_dim
        init = nnx.initializers.normal(config.init_std)
        self.embed_tokens = nnx.Embed(config.vocab_size, w, embedding_init=init, **kw)
        self.embed_positions = nnx.Embed(config.max_position_embeddings + _POSITION_OFFSET, d,
                                         embedding_init=init, **kw)
        proj = w != d
        self.project_in = nnx.Linear(w, d, use_bias=False, kernel_init=init, **kw) if proj else None
        self.project_out = nnx.Linear(d, w, use_bias=False, kernel_init=init, **kw) if proj else None
        self.final_layer_norm = _layer_norm(config, d, kw) if _has_final_layer_norm(config) else None
        self.layers = nnx.List([DecoderLayer(config, **kw) for _ in range(config.num_hidden_layers)])
        self.lm_head = untied_head(config, w, {**kw, "kernel_init": init})
        heads = config.num_attention_heads
        self.configure(dtype=dtype, remat=remat, attn_implementation=attn_implementation,
                       num_layers=len(self.layers), num_kv_heads=heads, head_dim=d // heads)

    def hidden_states(self, input_ids_BT, positions_BT, attention_mask_BS, cache: KVCache | None = None,
                      neftune=None):
        """The hidden states after the final norm and ``project_out`` (the LM head's input), and the cache."""
        ctx = self.attention_context(attention_mask_BS, input_ids_BT.shape[1], cache)
        x_BTW = neftune_noise(neftune, self.embed_tokens(input_ids_BT), ctx.segment_ids_BT)
        x_BTD = dense(self.project_in, x_BTW) if self.project_in is not None else x_BTW
        x_BTD = x_BTD + self.embed_positions(positions_BT + _POSITION_OFFSET)
        x_BTD, cache = self.run_layers(self.layers, x_BTD, cache, ctx)
        if self.final_layer_norm is not None:
            x_BTD = self.final_layer_norm(x_BTD)
        return (dense(self.project_out, x_BTD) if self.project_out is not None else x_BTD), cache

    def head_weight(self):
        return embedding_head(self.embed_tokens, self.lm_head)


def _layout(config) -> mapping.Layout:
    d, w, v, f = config.hidden_size, config.word_embed_proj_dim, config.vocab_size, config.ffn_dim
    affine, bias = config.layer_norm_elementwise_affine, config.enable_bias
    pre = "model.decoder."
    rows = [mapping.tensor(pre + "embed_tokens.weight", ("embed_tokens", "embedding"), (v, w)),
            mapping.tensor(pre + "embed_positions.weight", ("embed_positions", "embedding"),
                           (config.max_position_embeddings + _POSITION_OFFSET, d))]
    if w != d:
        rows += mapping.linear(pre + "project_in", ("project_in",), w, d, False)
        rows += mapping.linear(pre + "project_out", ("project_out",), d, w, False)
    if _has_final_layer_norm(config) and affine:
        rows += mapping.layer_norm(pre + "final_layer_norm", ("final_layer_norm",), d)
    for i in range(config.num_hidden_layers):
        hf, path = f"{pre}layers.{i}.", ("layers", i)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rows += mapping.linear(f"{hf}self_attn.{proj}", (*path, "self_attn", proj), d, d, bias)
        rows += mapping.linear(f"{hf}fc1", (*path, "fc1"), d, f, bias)
        rows += mapping.linear(f"{hf}fc2", (*path, "fc2"), f, d, bias)
        if affine:
            for norm in ("self_attn_layer_norm", "final_layer_norm"):
                rows += mapping.layer_norm(f"{hf}{norm}", (*path, norm), d)
    tied = getattr(config, "tie_word_embeddings", True)
    if not tied:
        rows.append(mapping.tensor("lm_head.weight", ("lm_head", "kernel"), (v, w), transpose=True))
    # OPTModel checkpoints (e.g. facebook/opt-350m) name tensors "decoder.*" without "model.".
    return mapping.Layout("OPT", tuple(rows), aliases=(("decoder.", pre),),
                          ignore=("lm_head.weight",) if tied else ())


hf_layout = _layout  # the HF checkpoint table (HF names <-> parameter paths)


def params_from_hf(tensors: dict[str, np.ndarray], config) -> dict:
    """HF OPT state dict (``model.decoder.*`` or ``decoder.*``) -> pure params dict."""
    return mapping.params_from_hf(tensors, _layout(config))


def params_to_hf(params, config) -> dict[str, np.ndarray]:
    """Pure params dict -> the tensors ``OPTForCausalLM.save_pretrained`` writes (tied head omitted)."""
    return mapping.params_to_hf(params, _layout(config))
