"""GPT-Neo (HF ``model_type`` ``gpt_neo``) as a Flax NNX causal LM.

Matches ``transformers.GPTNeoForCausalLM``: GPT-2's shape (learned absolute positions ``wpe``, pre-LayerNorm
blocks, a GELU MLP, the head tied to ``wte`` unless ``tie_word_embeddings=False``) with its own attention:

* q/k/v are separate ``nn.Linear`` layers without bias (``out_proj`` has one), under ``attn.attention``;
* **no** ``1/sqrt(head_dim)`` scaling of ``q.k`` (scale 1);
* each layer is ``global`` or ``local`` as ``attention_layers`` (expanded from ``attention_types``) says; a local
  layer attends the last ``window_size`` positions, its own included.

The position table has ``max_position_embeddings`` rows: ``config.max_position_embeddings`` is the limit, as for
GPT-2 and OPT. All layers are ``nn.Linear`` (``[out, in]``), transposed to ``nnx.Linear`` kernels.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from itersft_jax.models import gpt2, mapping
from itersft_jax.models.attention import attention
from itersft_jax.models.layers import activation, dense, untied_head


def layer_windows(config) -> tuple:
    """Per layer: ``window_size`` for ``local`` layers, ``None`` for ``global`` ones (HF's ``attention_layers``)."""
    kinds = list(config.attention_layers)
    if len(kinds) != config.num_layers:
        raise ValueError(f"attention_layers has {len(kinds)} entries (from attention_types), the model has "
                         f"num_layers={config.num_layers}")
    unknown = sorted(set(kinds) - {"global", "local"})
    if unknown:
        raise ValueError(f"attention_layers {unknown} are not GPT-Neo attention types ('global', 'local')")
    return tuple(int(config.window_size) if kind == "local" else None for kind in kinds)


def _inner(config) -> int:
    return config.intermediate_size if config.intermediate_size is not None else 4 * config.hidden_size


class SelfAttention(nnx.Module):
    def __init__(self, config, window: int | None, kw: dict, init):
        d = config.hidden_size
        self.num_heads = config.num_heads
        if d % self.num_heads:
            raise ValueError(f"hidden_size={d} is not a multiple of num_heads={self.num_heads}")
        self.head_dim = d // self.num_heads
        self.window = window
        self.q_proj = nnx.Linear(d, d, use_bias=False, kernel_init=init, **kw)
        self.k_proj = nnx.Linear(d, d, use_bias=False, kernel_init=init, **kw)
        self.v_proj = nnx.Linear(d, d, use_bias=False, kernel_init=init, **kw)
        self.out_proj = nnx.Linear(d, d, kernel_init=init, **kw)

    def __call__(self, x_BTD, kv, ctx):
        b, t, _ = x_BTD.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q_BTNH, k_BTNH, v_BTNH = (dense(proj, x_BTD).reshape(shape) for proj in (self.q_proj, self.k_proj,
                                                                                 self.v_proj))
        out_BTNH, kv = attention(q_BTNH, k_BTNH, v_BTNH, kv, ctx, scale=1.0, window=self.window)  # GPT-Neo: no scale
        return dense(self.out_proj, out_BTNH.reshape(b, t, -1)), kv


class Attention(nnx.Module):
    """HF's ``GPTNeoAttention`` wrapper (parameter paths ``attn.attention.*``)."""

    def __init__(self, config, window: int | None, kw: dict, init):
        self.attention = SelfAttention(config, window, kw, init)

    def __call__(self, x_BTD, kv, ctx):
        return self.attention(x_BTD, kv, ctx)


class MLP(nnx.Module):
    def __init__(self, config, kw: dict, init):
        d, inner = config.hidden_size, _inner(config)
        self.c_fc = nnx.Linear(d, inner, kernel_init=init, **kw)
        self.c_proj = nnx.Linear(inner, d, kernel_init=init, **kw)
        self.act = config.activation_function
        activation(self.act, "activation_function")  # fail at construction on an unknown name

    def __call__(self, x_BTD):
        return dense(self.c_proj, activation(self.act)(dense(self.c_fc, x_BTD)))


class Block(nnx.Module):
    def __init__(self, config, window: int | None, kw: dict, init):
        d, eps = config.hidden_size, config.layer_norm_epsilon
        self.ln_1 = nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, **kw)
        self.attn = Attention(config, window, kw, init)
        self.ln_2 = nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, **kw)
        self.mlp = MLP(config, kw, init)

    def __call__(self, x_BTD, kv, ctx):
        attn_BTD, kv = self.attn(self.ln_1(x_BTD), kv, ctx)
        x_BTD = x_BTD + attn_BTD
        return x_BTD + self.mlp(self.ln_2(x_BTD)), kv


class CausalLM(gpt2.CausalLM):
    """``GPTNeoForCausalLM`` in NNX. Parameter paths: ``wte``, ``wpe``, ``h[i]``, ``ln_f`` (, ``lm_head``).

    GPT-2's model with GPT-Neo's blocks: ``hidden_states`` (token + position embeddings, the blocks, ``ln_f``) and
    ``head_weight`` (tied to ``wte`` or ``lm_head``) are GPT-2's, read from the same attribute names; ``__init__``
    builds them itself (GPT-2's reads GPT-2's config fields)."""

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=False,
                 attn_implementation: str | None = "auto", rngs: nnx.Rngs | None = None):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs if rngs is not None else nnx.Rngs(0)}
        d = config.hidden_size
        init = nnx.initializers.normal(config.initializer_range)
        windows = layer_windows(config)
        self.wte = nnx.Embed(config.vocab_size, d, embedding_init=init, **kw)
        self.wpe = nnx.Embed(config.max_position_embeddings, d, embedding_init=init, **kw)
        self.h = nnx.List([Block(config, window, kw, init) for window in windows])
        self.ln_f = nnx.LayerNorm(d, epsilon=config.layer_norm_epsilon, use_fast_variance=False, **kw)
        self.lm_head = untied_head(config, d, {**kw, "kernel_init": init})
        local = [w for w in windows if w is not None]
        self.configure(dtype=dtype, remat=remat, attn_implementation=attn_implementation, num_layers=len(self.h),
                       num_kv_heads=config.num_heads, head_dim=d // config.num_heads,
                       window=max(local) if local else None)


def _layout(config) -> mapping.Layout:
    d, v, inner = config.hidden_size, config.vocab_size, _inner(config)
    rows = [mapping.tensor("transformer.wte.weight", ("wte", "embedding"), (v, d)),
            mapping.tensor("transformer.wpe.weight", ("wpe", "embedding"), (config.max_position_embeddings, d))]
    for i in range(config.num_layers):
        hf, path = f"transformer.h.{i}.", ("h", i)
        attn = (*path, "attn", "attention")
        rows += mapping.layer_norm(f"{hf}ln_1", (*path, "ln_1"), d)
        for name in ("q_proj", "k_proj", "v_proj"):
            rows += mapping.linear(f"{hf}attn.attention.{name}", (*attn, name), d, d, False)
        rows += mapping.linear(f"{hf}attn.attention.out_proj", (*attn, "out_proj"), d, d, True)
        rows += mapping.layer_norm(f"{hf}ln_2", (*path, "ln_2"), d)
        rows += mapping.linear(f"{hf}mlp.c_fc", (*path, "mlp", "c_fc"), d, inner, True)
        rows += mapping.linear(f"{hf}mlp.c_proj", (*path, "mlp", "c_proj"), inner, d, True)
    rows += mapping.layer_norm("transformer.ln_f", ("ln_f",), d)
    tied = getattr(config, "tie_word_embeddings", True)
    if not tied:
        rows.append(mapping.tensor("lm_head.weight", ("lm_head", "kernel"), (v, d), transpose=True))
    # GPTNeoModel checkpoints have no "transformer." prefix; old ones carry the causal-mask buffers
    # (attn.attention.bias / masked_bias); a tied checkpoint may still list lm_head.weight.
    ignore = (r".*\.attn\.attention\.(masked_)?bias",) + (("lm_head.weight",) if tied else ())
    return mapping.Layout("GPT-Neo", tuple(rows), aliases=(("", "transformer."),), ignore=ignore)


# params_from_hf (with or without the ``transformer.`` prefix), params_to_hf (a tied head omitted, as HF saves it) and
# hf_layout, the HF checkpoint table (HF names <-> parameter paths).
params_from_hf, params_to_hf, hf_layout = mapping.converters(_layout)
