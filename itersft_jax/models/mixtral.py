"""Mixtral (HF ``model_type`` ``mixtral``): ``decoder.py`` with a sparse MoE MLP on every layer (``moe.py``) —
``num_local_experts`` SwiGLU experts of ``intermediate_size``, ``num_experts_per_tok`` per token, the top-k router
probabilities always renormalised —, no biases, one ``sliding_window`` for every layer (``None``: none), every RoPE
type of ``rope.py``. ``output_router_logits=True`` turns on the load-balancing loss (``router_aux_loss_coef``);
``router_jitter_noise`` (training-time noise on the router's input) is refused.

Checkpoints: the per-expert ``block_sparse_moe.experts.{e}.w1/w3/w2`` tensors ``save_pretrained`` writes (read and
written), or transformers 5's fused ``mlp.experts.gate_up_proj``/``down_proj`` (a model in memory; read).
"""

from __future__ import annotations

from itersft_jax.models import decoder, moe
from itersft_jax.models.rope import rope_from_config


def _spec(config) -> decoder.Spec:
    if float(getattr(config, "router_jitter_noise", 0.0) or 0.0) > 0.0:
        raise ValueError(f"router_jitter_noise={config.router_jitter_noise} is not supported by the JAX backend "
                         "(random noise on the router's input while training); use backend='torch'.")
    n = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sparse = moe.MoESpec(num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
                         intermediate_size=config.intermediate_size, norm_topk_prob=True, sparse=(True,) * n,
                         aux_loss_coef=moe.aux_loss_coef(config), names="mixtral")
    return decoder.Spec.read(config, act=config.hidden_act, windows=(getattr(config, "sliding_window", None),) * n,
                             ropes=(rope_from_config(config, head_dim),), layer_ropes=(0,) * n, moe=sparse)


# CausalLM(config, *, dtype, param_dtype, remat, attn_implementation, rngs); see models/__init__.py.
CausalLM, params_from_hf, params_to_hf, hf_layout = decoder.family(_spec, "Mixtral")
