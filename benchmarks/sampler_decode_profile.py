"""Where a CPU decode step's time goes: SmolLM2-135M's shape (random weights), 64 slots, a 128-slot cache.

    python benchmarks/sampler_decode_profile.py [--slots 64]

Times each piece jitted on its own (the sampling draw with temperature only and with top-p, greedy, the
logprob, the 30 layers with attention, the LM head) and a whole 16-step ``sampler_chunk``. Findings:
docs/sampler.md.
"""

from __future__ import annotations

import argparse
import time


def bench(fn, *args, repeats: int = 5) -> float:
    """Milliseconds per call after one warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from transformers import LlamaConfig

    from itersft_jax.models import get_family
    from itersft_jax.models.cache import KVCache
    from itersft_jax.models.layers import head_logits
    from itersft_jax.sampler import engine
    from itersft_jax.sampler.sampling import make_knobs, sample_rows

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slots", type=int, default=64)
    batch, length, vocab = parser.parse_args().slots, 128, 49152
    config = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=2048)
    model = get_family("llama").CausalLM(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jnp.zeros((batch, 1), jnp.int32)
    positions = jnp.full((batch, 1), 60, jnp.int32)
    mask = jnp.ones((batch, length), jnp.int32)
    empty = model.init_cache(batch, length)
    cache = KVCache(empty.k, empty.v, jnp.int32(64))

    @jax.jit
    def layers_only(params, cache):
        h, cache = nnx.merge(graphdef, params).hidden_states(tokens, positions, mask, cache=cache)
        return h, cache.k[0]

    @jax.jit
    def head_only(params, h):
        return head_logits(nnx.merge(graphdef, params).head(), h, keep_fp32=True)

    logits = jnp.ones((batch, vocab), jnp.float32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(batch))
    draw = jax.jit(sample_rows)
    for name, sampled, top_p in (("sample, temperature 0.8", True, 1.0), ("sample, top_p 0.9", True, 0.9),
                                 ("greedy", False, 1.0)):
        knobs = make_knobs(do_sample=sampled, temperature=0.8, top_k=0, top_p=top_p, pad_token_id=0, eos_token_id=2)
        print(f"{name}: {bench(draw, logits, keys, knobs):.1f} ms")
    log_prob = jax.jit(lambda x: engine.token_log_prob(x, jnp.zeros((batch,), jnp.int32)))
    print(f"logprob: {bench(log_prob, logits):.1f} ms")
    print(f"30 layers (attention over {length}): {bench(layers_only, params, cache):.1f} ms")
    print(f"LM head [{batch}, 576] x [576, {vocab}]: {bench(head_only, params, jnp.ones((batch, 576))):.1f} ms")

    knobs = make_knobs(do_sample=True, temperature=0.8, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=[])
    slots = {"start": np.zeros(batch, np.int32), "prompt_len": np.full(batch, 32, np.int32),
             "gen": np.zeros(batch, np.int32), "live": np.ones(batch, bool),
             "prompt_key": np.arange(batch, dtype=np.int32), "sample": np.zeros(batch, np.int32),
             "max_new": np.full(batch, 1000, np.int32)}
    state = engine.sampler_empty(params, graphdef=graphdef, batch=batch, length=length, mesh=None)
    times = []
    for _ in range(2):  # the first call compiles
        t0 = time.perf_counter()
        state, *_, steps = engine.sampler_chunk(params, state, slots, np.int32(32), jax.random.key(0), knobs,
                                                np.int32(batch + 1), graphdef=graphdef, mesh=None)
        steps = int(steps)
        times.append((time.perf_counter() - t0) / steps)
    flops = 2 * 134e6 * batch
    print(f"whole chunk: {times[-1] * 1e3:.1f} ms/step ({steps} steps), {flops / times[-1] / 1e9:.1f} GFLOP/s "
          "on the weights")


if __name__ == "__main__":
    main()
