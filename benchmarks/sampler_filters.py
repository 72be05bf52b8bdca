"""The top-k / top-p filters alone: ``[64, 49152]`` fp32 logits (SmolLM2's vocabulary), jitted, median of 20.

    python benchmarks/sampler_filters.py [--old OLD_SAMPLING_PY]

Three kinds of rows: LM-like (Zipf logits ``-2 log rank``, shuffled, plus noise: top-p 0.95 keeps ~12 tokens, the
64 candidates settle every row), ``randn * 3`` (keeps ~4,300 tokens: the candidates never reach top-p, the
fallback search), flat (``randn * 0.5``) and LM-like rows with 4 of the 64 ``randn * 3`` (a few rows
the candidates cannot settle: the real decode's case). With ``--old`` (a ``sampling.py`` from an earlier commit, e.g.
``git show 5e3d2b9:itersft_jax/sampler/sampling.py > /tmp/old.py``) its filters are timed beside and their kept
sets compared. Findings: docs/sampler.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import time


def median_ms(fn, *args, repeats: int = 20) -> float:
    import numpy as np

    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from itersft_jax.sampler import sampling

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", help="an earlier sampling.py to time beside")
    args = parser.parse_args()
    old = None
    if args.old:
        spec = importlib.util.spec_from_file_location("old_sampling", args.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    rng = np.random.default_rng(0)
    B, V = 64, 49152
    zipf = -2.0 * np.log(np.arange(1, V + 1))
    rows = {"LM-like (Zipf s=2)": np.stack([rng.permutation(zipf) for _ in range(B)]) + rng.normal(size=(B, V)) * 0.3,
            "randn * 3": rng.normal(size=(B, V)) * 3, "flat (randn * 0.5)": rng.normal(size=(B, V)) * 0.5}
    # the real run's case: peaked rows but a few (here 4 of 64) the candidates cannot settle
    rows["LM-like, 4 rows randn*3"] = np.concatenate([rows["LM-like (Zipf s=2)"][:B - 4], rows["randn * 3"][:4]])
    for name, logits in rows.items():
        x = jnp.asarray(logits.astype(np.float32))
        for what, arg in (("top_p", 0.95), ("top_p", 0.9), ("top_k", 50)):
            new_fn = jax.jit(getattr(sampling, "_" + what))
            kept = np.isfinite(np.asarray(new_fn(x, arg)))
            line = (f"{name:24s} {what}={arg:<5}: {median_ms(new_fn, x, arg):6.1f} ms, "
                    f"kept/row {kept.sum(-1).mean():.0f}")
            if old is not None:
                old_fn = jax.jit(getattr(old, "_" + what))
                same = bool((np.isfinite(np.asarray(old_fn(x, arg))) == kept).all())
                line += f"; old {median_ms(old_fn, x, arg):6.1f} ms, same kept sets: {same}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
