"""Qwen2-MoE and Qwen3-MoE (HF ``model_type`` ``qwen2_moe``, ``qwen3_moe``): ``decoder.py`` with sparse MoE MLPs
(``moe.py``) of ``num_experts`` SwiGLU experts of ``moe_intermediate_size``, ``num_experts_per_tok`` per token,
renormalised with ``norm_topk_prob``; a layer is sparse unless it is in ``mlp_only_layers``, when
``(i + 1) % decoder_sparse_step == 0`` (the others keep a dense MLP of ``intermediate_size``).

* qwen2_moe: a shared expert on every sparse layer (a dense MLP of ``shared_expert_intermediate_size``) scaled by
  ``sigmoid(shared_expert_gate(x))``; bias on q/k/v (``qkv_bias``), none on o; sliding windows where
  ``layer_types`` says (``use_sliding_window``, ``max_window_layers``);
* qwen3_moe: ``attention_bias`` on q/k/v/o, RMSNorm on each query/key head, ``sliding_window`` on every layer when
  ``use_sliding_window``.

``output_router_logits=True`` turns on the load-balancing loss (``router_aux_loss_coef``). Checkpoints: the
per-expert ``mlp.experts.{e}.gate_proj/up_proj/down_proj`` tensors ``save_pretrained`` writes (read and written), or
transformers 5's fused ``mlp.experts.gate_up_proj``/``down_proj`` (a model in memory; read).
"""

from __future__ import annotations

from itersft_jax.models import FAMILIES, decoder, moe
from itersft_jax.models.rope import rope_from_config


def _spec(config) -> decoder.Spec:
    model_type = config.model_type
    if model_type not in FAMILIES["qwen_moe"]:
        raise ValueError(f"qwen_moe.py serves {FAMILIES['qwen_moe']}, not {model_type!r}")
    n = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    qwen2 = model_type == "qwen2_moe"
    sparse = moe.MoESpec(num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                         intermediate_size=config.moe_intermediate_size, norm_topk_prob=bool(config.norm_topk_prob),
                         sparse=moe.sparse_layers(config, config.num_experts),
                         shared_expert_size=int(config.shared_expert_intermediate_size) if qwen2 else 0,
                         aux_loss_coef=moe.aux_loss_coef(config))
    if qwen2:
        return decoder.Spec.read(config, act=config.hidden_act, windows=decoder.layer_windows(config),
                                 ropes=(rope_from_config(config, head_dim),), layer_ropes=(0,) * n,
                                 qkv_bias=bool(getattr(config, "qkv_bias", True)), moe=sparse)
    bias = bool(getattr(config, "attention_bias", False))
    return decoder.Spec.read(config, act=config.hidden_act, windows=(getattr(config, "sliding_window", None),) * n,
                             ropes=(rope_from_config(config, head_dim),), layer_ropes=(0,) * n, qkv_bias=bias,
                             o_bias=bias, qk_norm=True, moe=sparse)


# CausalLM(config, *, dtype, param_dtype, remat, attn_implementation, rngs); see models/__init__.py.
CausalLM, params_from_hf, params_to_hf, hf_layout = decoder.family(_spec)
