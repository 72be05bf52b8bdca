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

from .common import KVCache, LMHead, dense, head_logits, make_attention_mask, run_layers
from .gpt2 import HFTensor, activation, attend, convert_from_hf, convert_to_hf

MODEL_TYPES = ("opt",)

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

    def __call__(self, x_BTD, mask_BTS, kv, index):
        b, t, _ = x_BTD.shape
        shape = (b, t, self.num_heads, self.head_dim)
        # HF scales q (bias included) before q.k and then attends with scale 1; do the same.
        q_BTNH = (dense(self.q_proj, x_BTD) * self.scaling).reshape(shape)
        k_BTNH, v_BTNH = dense(self.k_proj, x_BTD).reshape(shape), dense(self.v_proj, x_BTD).reshape(shape)
        out_BTNH, kv = attend(q_BTNH, k_BTNH, v_BTNH, mask_BTS, kv, index, scale=1.0)
        return dense(self.out_proj, out_BTNH.reshape(b, t, -1)), kv


class DecoderLayer(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        linear_kw = dict(use_bias=config.enable_bias, kernel_init=nnx.initializers.normal(config.init_std),
                         **kw)
        self.pre_ln = config.do_layer_norm_before
        self.act = config.activation_function
        activation(self.act)  # fail at construction on an unknown name
        self.self_attn = Attention(config, **kw)
        self.self_attn_layer_norm = _layer_norm(config, d, kw)
        self.fc1 = nnx.Linear(d, config.ffn_dim, **linear_kw)
        self.fc2 = nnx.Linear(config.ffn_dim, d, **linear_kw)
        self.final_layer_norm = _layer_norm(config, d, kw)

    def __call__(self, x_BTD, kv, mask_BTS, index):
        h_BTD = self.self_attn_layer_norm(x_BTD) if self.pre_ln else x_BTD
        h_BTD, kv = self.self_attn(h_BTD, mask_BTS, kv, index)
        x_BTD = x_BTD + h_BTD
        if not self.pre_ln:
            x_BTD = self.self_attn_layer_norm(x_BTD)
        h_BTD = self.final_layer_norm(x_BTD) if self.pre_ln else x_BTD
        x_BTD = x_BTD + dense(self.fc2, activation(self.act)(dense(self.fc1, h_BTD)))
        if not self.pre_ln:
            x_BTD = self.final_layer_norm(x_BTD)
        return x_BTD, kv


class CausalLM(nnx.Module):
    """``OPTForCausalLM`` in NNX. Parameter paths mirror ``model.decoder.*`` without that prefix."""

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        d, w = config.hidden_size, config.word_embed_proj_dim
        init = nnx.initializers.normal(config.init_std)
        self.dtype = dtype
        self.remat = remat
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        self.embed_tokens = nnx.Embed(config.vocab_size, w, embedding_init=init, **kw)
        self.embed_positions = nnx.Embed(config.max_position_embeddings + _POSITION_OFFSET, d,
                                         embedding_init=init, **kw)
        proj = w != d
        self.project_in = nnx.Linear(w, d, use_bias=False, kernel_init=init, **kw) if proj else None
        self.project_out = nnx.Linear(d, w, use_bias=False, kernel_init=init, **kw) if proj else None
        self.final_layer_norm = _layer_norm(config, d, kw) if _has_final_layer_norm(config) else None
        self.layers = nnx.List([DecoderLayer(config, **kw) for _ in range(self.num_layers)])
        self.lm_head = None if self.tied else nnx.Linear(
            w, config.vocab_size, use_bias=False, kernel_init=init, **kw)

    def hidden_states(self, input_ids_BT, positions_BT, attention_mask_BS, cache: KVCache | None = None):
        """The hidden states after the final norm and ``project_out`` (the LM head's input), and the cache."""
        x_BTW = self.embed_tokens(input_ids_BT)
        x_BTD = dense(self.project_in, x_BTW) if self.project_in is not None else x_BTW
        x_BTD = x_BTD + self.embed_positions(positions_BT + _POSITION_OFFSET)
        offset = 0 if cache is None else cache.index
        mask_BTS = make_attention_mask(attention_mask_BS, input_ids_BT.shape[1], offset)
        x_BTD, cache = run_layers(self.layers, x_BTD, cache, mask_BTS, None if cache is None else cache.index,
                                  remat=self.remat)
        if self.final_layer_norm is not None:
            x_BTD = self.final_layer_norm(x_BTD)
        return (dense(self.project_out, x_BTD) if self.project_out is not None else x_BTD), cache

    def head(self) -> LMHead:
        """The output projection as data (see ``common.LMHead``); its input is ``project_out``'s output."""
        if self.tied:
            return LMHead(self.embed_tokens.embedding[...], True, None, self.dtype)
        return LMHead(self.lm_head.kernel[...], False, None, self.dtype)

    def __call__(self, input_ids_BT, positions_BT, attention_mask_BS, cache: KVCache | None = None,
                 last_only: bool = False):
        h_BTW, cache = self.hidden_states(input_ids_BT, positions_BT, attention_mask_BS, cache)
        if last_only:  # generation's prefill needs only the next-token logits
            h_BTW = h_BTW[:, -1:]
        return head_logits(self.head(), h_BTW), cache

    def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
        return KVCache.zeros(self.num_layers, batch, length, self.num_heads, self.head_dim,
                             dtype if dtype is not None else self.dtype)


def _layout(config) -> dict[str, HFTensor]:
    d, w, v, f = config.hidden_size, config.word_embed_proj_dim, config.vocab_size, config.ffn_dim
    affine, bias = config.layer_norm_elementwise_affine, config.enable_bias
    pre = "model.decoder."
    layout = {
        pre + "embed_tokens.weight": HFTensor(("embed_tokens", "embedding"), (v, w), False),
        pre + "embed_positions.weight": HFTensor(
            ("embed_positions", "embedding"), (config.max_position_embeddings + _POSITION_OFFSET, d), False),
    }
    if w != d:  # nn.Linear weights are [out, in]
        layout[pre + "project_in.weight"] = HFTensor(("project_in", "kernel"), (d, w), True)
        layout[pre + "project_out.weight"] = HFTensor(("project_out", "kernel"), (w, d), True)
    if _has_final_layer_norm(config) and affine:
        layout[pre + "final_layer_norm.weight"] = HFTensor(("final_layer_norm", "scale"), (d,), False)
        layout[pre + "final_layer_norm.bias"] = HFTensor(("final_layer_norm", "bias"), (d,), False)
    per_layer = {}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        per_layer[f"self_attn.{proj}.weight"] = (("self_attn", proj, "kernel"), (d, d), True)
        if bias:
            per_layer[f"self_attn.{proj}.bias"] = (("self_attn", proj, "bias"), (d,), False)
    per_layer["fc1.weight"] = (("fc1", "kernel"), (f, d), True)
    per_layer["fc2.weight"] = (("fc2", "kernel"), (d, f), True)
    if bias:
        per_layer["fc1.bias"] = (("fc1", "bias"), (f,), False)
        per_layer["fc2.bias"] = (("fc2", "bias"), (d,), False)
    if affine:
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            per_layer[f"{norm}.weight"] = ((norm, "scale"), (d,), False)
            per_layer[f"{norm}.bias"] = ((norm, "bias"), (d,), False)
    for i in range(config.num_hidden_layers):
        for name, (path, shape, transpose) in per_layer.items():
            layout[f"{pre}layers.{i}.{name}"] = HFTensor(("layers", i, *path), shape, transpose)
    if not getattr(config, "tie_word_embeddings", True):
        layout["lm_head.weight"] = HFTensor(("lm_head", "kernel"), (v, w), True)
    return layout


def _canonical(name: str) -> str:
    # OPTModel checkpoints (e.g. facebook/opt-350m) name tensors "decoder.*" without "model.".
    if name.startswith("decoder."):
        return "model." + name
    return name


def _ignorable(key: str, config) -> bool:
    return key == "lm_head.weight" and getattr(config, "tie_word_embeddings", True)


def params_from_hf(tensors: dict[str, np.ndarray], config) -> dict:
    """HF OPT state dict (``model.decoder.*`` or ``decoder.*``) -> pure params dict."""
    return convert_from_hf(tensors, _layout(config), _canonical, lambda k: _ignorable(k, config), "OPT")


def params_to_hf(params, config) -> dict[str, np.ndarray]:
    """Pure params dict -> the tensors ``OPTForCausalLM.save_pretrained`` writes (tied head omitted)."""
    return convert_to_hf(params, _layout(config))
