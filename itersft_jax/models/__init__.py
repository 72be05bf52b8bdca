"""Flax NNX causal-LM families, keyed by Hugging Face ``config.model_type``.

Every family module (``llama.py``, ``gpt2.py``, ``opt.py``) defines:

* ``MODEL_TYPES``: the HF ``model_type`` strings it serves.
* ``CausalLM(config, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=False, rngs=nnx.Rngs(0))``:
  an ``nnx.Module`` built from the HF ``PretrainedConfig``; layers are a plain list (one module per
  layer, so parameter paths mirror HF's). ``__call__(input_ids_BT, positions_BT, attention_mask_BS,
  cache=None, last_only=False) -> (logits_BTV, cache)`` — see ``common.py`` for the mask (0/1, or segment
  ids for packed rows) and cache conventions; logits come back in the compute ``dtype``; ``last_only``
  returns the logits of the last position only (``T == 1``: generation's prefill). ``init_cache(batch,
  length, dtype)`` returns an empty ``KVCache`` (``[B, K, S, H]`` per layer). ``__call__`` is
  ``hidden_states`` followed by ``head``: ``hidden_states(input_ids_BT, positions_BT, attention_mask_BS,
  cache=None) -> (h_BTD, cache)`` gives the LM head's input (final norm applied), ``head() -> LMHead`` the
  output projection as data (weight, transposed, final-logit soft-cap, dtype), so a loss can apply the head
  chunk by chunk (``common.head_logits`` applies it whole).
* ``params_from_hf(tensors: dict[str, np.ndarray], config) -> dict``: HF state-dict names to the nested
  pure dict of ``nnx.state(model, nnx.Param)`` (asserting every shape), and ``params_to_hf(params, config)
  -> dict[str, np.ndarray]``, its inverse (tied weights written once, as HF saves them).

Parameter naming: biases are called ``bias``; every normalization module's attribute name contains
``norm`` or starts with ``ln`` — the optimizer's weight-decay mask relies on it.
"""

from __future__ import annotations

import importlib

_FAMILY_OF_TYPE = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gpt2": "gpt2",
    "opt": "opt",
}


def supported_model_types() -> list[str]:
    return sorted(_FAMILY_OF_TYPE)


def get_family(model_type: str):
    """The family module serving ``model_type``; a clear error for anything else."""
    name = _FAMILY_OF_TYPE.get(model_type)
    if name is None:
        raise ValueError(
            f"model_type {model_type!r} is not supported by the JAX backend; supported: "
            f"{', '.join(supported_model_types())}. Use backend='torch' for any transformers model."
        )
    return importlib.import_module(f"{__name__}.{name}")
