"""benchmarks/gpu_check.py's report: the workers' JSON rows as markdown tables with ratios against the PyTorch
loop, the memory-per-token comparison (part e, derived from parts b and c) and issue 9's targets."""

from __future__ import annotations


def _f(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _ok(rows, **match) -> list[dict]:
    return [r for r in rows if r.get("kind") == "result" and r.get("status") == "ok"
            and all(r.get(k) == v for k, v in match.items())]


def _best(rows: list[dict]) -> dict | None:
    return max(rows, key=lambda r: r["tokens_per_s"], default=None)


def memory_per_token(rows: list[dict]) -> list[dict]:
    """Part e: peak device memory per token, JAX ``train_step`` vs the PyTorch loop, wherever both ran the same
    ``[B, T]`` with the same remat setting class (none / checkpointing)."""
    out = []
    for jax_row in _ok(rows, engine="jax", path="trainer.train_step"):
        for torch_row in _ok(rows, engine="torch", batch=jax_row["batch"], seq=jax_row["seq"]):
            if (jax_row["remat"] == "no") != (torch_row["remat"] == "no"):
                continue
            if jax_row.get("peak_gib") is None or torch_row.get("peak_gib") is None:
                ratio = None
            else:
                ratio = jax_row["peak_gib"] / torch_row["peak_gib"]
            tokens = jax_row["batch"] * jax_row["seq"]
            out.append({"kind": "result", "part": "e", "job": "derived", "status": "ok", "label": jax_row["label"],
                        "batch": jax_row["batch"], "seq": jax_row["seq"], "remat": jax_row["remat"],
                        "jax_peak_gib": jax_row.get("peak_gib"), "torch_peak_gib": torch_row.get("peak_gib"),
                        "jax_mib_per_1k_tokens": _per_1k(jax_row.get("peak_gib"), tokens),
                        "torch_mib_per_1k_tokens": _per_1k(torch_row.get("peak_gib"), tokens), "ratio": ratio})
    return out


def _per_1k(gib, tokens):
    return None if gib is None else gib * 1024 / tokens * 1000


def _table(columns: list[str], cells: list[list[str]]) -> list[str]:
    lines = [columns, ["---"] * len(columns), *cells]
    return ["| " + " | ".join(line) + " |" for line in lines]


def training_table(rows: list[dict]) -> list[str]:
    torch_best = _best(_ok(rows, part="c"))
    cells = []
    for r in rows:
        if r.get("kind") != "result" or r.get("part") not in ("b", "c", "d"):
            continue
        path = r.get("path", "")
        if r.get("recompiles") is not None:
            path += f" ({r['recompiles']} recompilations)"
        if r.get("skipped"):  # the last update was skipped as non-finite: the optimizer did not run
            path += " (**update skipped: non-finite**)"
        head = [r["part"], r.get("engine", ""), path, r["label"], r.get("remat", "")]
        if r["status"] != "ok":
            what = "out of memory" if r["status"] == "oom" else "error"
            cells.append(head + ["", f"**{what}**: {r['error'][:120]}"] + [""] * 5)
            continue
        if r["part"] == "d":  # against the PyTorch loop with checkpointing at the same length
            peer = next(iter(_ok(rows, part="d", engine="torch", seq=r["seq"])), None)
        else:  # against the PyTorch loop's best batch
            peer = torch_best
        cells.append(head + [r.get("attention", ""), f"{r['tokens_per_s']:,.0f}", _f(r.get("mfu"), ".1%"),
                             _f(r.get("peak_gib"), ".1f"), _f(r.get("first_s"), ".1f"), _f(r.get("loss"), ".3f"),
                             f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer else "-"])
    return _table(["part", "engine", "path", "B x T", "remat", "attention", "tokens/s", "MFU", "peak GiB",
                   "first call s", "loss", "vs PyTorch"], cells)


def memory_table(rows: list[dict]) -> list[str]:
    cells = [[r["label"], r["remat"], _f(r["jax_peak_gib"], ".1f"), _f(r["torch_peak_gib"], ".1f"),
              _f(r["jax_mib_per_1k_tokens"], ".0f"), _f(r["torch_mib_per_1k_tokens"], ".0f"), _f(r["ratio"], ".2f")]
             for r in _ok(rows, part="e")]
    return _table(["B x T", "remat", "JAX peak GiB", "PyTorch peak GiB", "JAX MiB / 1k tokens",
                   "PyTorch MiB / 1k tokens", "JAX / PyTorch"], cells)


def generate_table(rows: list[dict]) -> list[str]:
    cells = [[r["label"], r["attention"], f"{r['first_s']:.1f}", f"{r['prefill_s']:.2f}",
              f"{r['prefill_tokens_per_s']:,.0f}", _f(r["decode_tokens_per_s"], ",.0f"), _f(r.get("peak_gib"), ".1f")]
             for r in _ok(rows, part="f")]
    return _table(["prompt", "attention", "first call s (compile incl.)", "prefill s", "prefill tokens/s",
                   "decode tokens/s", "peak GiB"], cells)


def sampler_table(rows: list[dict]) -> list[str]:
    cells = [[r["engine"], r["label"], f"{r['tokens_per_s']:,.0f}", _f(r.get("completions_per_s"), ",.1f"),
              _f(r.get("occupancy"), ".2f"), _f(r.get("roofline"), ".1%"), _f(r.get("kv_gib"), ".1f"),
              _f(r.get("peak_gib"), ".1f")] for r in _ok(rows, part="h")]
    return _table(["engine", "workload", "tokens/s", "completions/s", "occupancy", "HBM roofline", "KV GiB",
                   "peak GiB"], cells)


def parity_table(rows: list[dict]) -> list[str]:
    cells = [[f"fp32, matmul precision highest, {r['label']}", r["attention"], f"{r['max_abs_diff']:.2e}"]
             for r in _ok(rows, part="a", engine="jax")]
    return _table(["JAX model", "attention used", "max abs logit diff vs transformers fp32"], cells)


def iterative_table(rows: list[dict]) -> list[str]:
    base = next(iter(_ok(rows, part="g", engine="torch")), None)
    cells = [[r["engine"], r["label"], f"{r['seconds']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['padded_tokens']:,}",
              _f(r.get("compiles"), "d"), f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"]
             for r in _ok(rows, part="g")]
    return _table(["backend", "workload", "seconds", "real tokens/s", "padded tokens", "train-step compiles",
                   "vs torch"], cells)


def targets_table(rows: list[dict], batches, seq: int, long_lengths) -> list[str]:
    """Issue 9's "Done when" on this run's shapes: measured value and whether it meets the target."""
    jax_fixed = _ok(rows, part="b", path="trainer.train_step")
    jax_best, torch_best = _best(jax_fixed), _best(_ok(rows, part="c"))
    checks = []
    big = next((r for r in jax_fixed if r["batch"] == max(batches)), None)
    checks.append((f"[{max(batches)}, {seq}] without remat fits (JAX)",
                   f"peak {_f(big.get('peak_gib'), '.1f')} GiB" if big else "did not run", big is not None))
    if jax_best and torch_best:
        ratio = jax_best["tokens_per_s"] / torch_best["tokens_per_s"]
        checks.append(("JAX tokens/s >= 1.3x the PyTorch loop's best batch",
                       f"{ratio:.2f}x (JAX {jax_best['label']}, PyTorch {torch_best['label']})", ratio >= 1.3))
    if jax_best and jax_best.get("mfu") is not None:
        checks.append(("JAX MFU >= 45%", f"{jax_best['mfu']:.1%} ({jax_best['label']})", jax_best["mfu"] >= 0.45))
    longest = next(iter(_ok(rows, part="d", engine="jax", seq=max(long_lengths))), None)
    checks.append((f"[1, {max(long_lengths)}] with remat runs (JAX)",
                   f"{longest['tokens_per_s']:,.0f} tokens/s" if longest else "did not run", longest is not None))
    first = long_lengths[0]
    jax_long = next(iter(_ok(rows, part="d", engine="jax", seq=first)), None)
    torch_long = next(iter(_ok(rows, part="d", engine="torch", seq=first)), None)
    if jax_long and torch_long:
        ratio = jax_long["tokens_per_s"] / torch_long["tokens_per_s"]
        checks.append((f"[1, {first}]: JAX >= 1.2x the PyTorch loop with checkpointing", f"{ratio:.2f}x", ratio >= 1.2))
    ratios = [r for r in _ok(rows, part="e") if r["ratio"] is not None]
    if ratios:
        worst = max(ratios, key=lambda r: r["ratio"])
        checks.append(("peak memory per token <= 0.8x the PyTorch loop's at the same batch",
                       f"worst {worst['ratio']:.2f}x ({worst['label']}, remat {worst['remat']})",
                       worst["ratio"] <= 0.8))
    ours = next(iter(_ok(rows, part="h", engine="jax")), None)
    theirs = next(iter(_ok(rows, part="h", engine="torch")), None)
    if ours and ours.get("roofline") is not None:
        checks.append(("sampler >= 50% of the HBM roofline", f"{ours['roofline']:.1%}", ours["roofline"] >= 0.5))
    if ours and theirs:
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        checks.append(("sampler >= 10x transformers generate", f"{ratio:.1f}x", ratio >= 10))
    return _table(["target", "measured", "met"], [[name, value, "yes" if met else "NO"] for name, value, met in checks])


def jobs_table(rows: list[dict]) -> list[str]:
    jobs = [[r["job"], r["part"], r["status"], _f(r.get("seconds"), ".1f")] for r in rows if r.get("kind") == "job"]
    lines = _table(["job", "part", "status", "seconds"], jobs)
    errors = [r for r in rows if r.get("kind") == "result" and r.get("status") == "error"]
    lines += ["", *[f"- error in {r['job']} ({r.get('label', '')}): {r['error']}" for r in errors]]
    return lines


def environment(rows: list[dict]) -> list[str]:
    seen, lines = set(), []
    for r in rows:
        if r.get("kind") in ("env", "model"):
            fields = {k: v for k, v in r.items() if k not in ("kind", "part", "job") and v is not None}
            text = ", ".join(f"{k} {v}" for k, v in fields.items())
            if (r["kind"], text) not in seen:
                seen.add((r["kind"], text))
                lines.append(f"- {r['kind']}: {text}")
    return lines


def report(rows: list[dict], *, title: str, header: list[str], batches, seq: int, long_lengths) -> str:
    sections = [
        ("Training, bf16: parts b (JAX, no remat), c (PyTorch loop, no checkpointing), d (long context, remat / "
         "checkpointing). `vs PyTorch`: b and c against the PyTorch loop's best batch, d against the PyTorch loop at "
         "the same length", training_table(rows)),
        ("Part e: peak device memory per token at the same batch", memory_table(rows)),
        ("Part f: generate() of one long prompt (JAX, greedy)", generate_table(rows)),
        ("Part h: the sampler (continuous engine vs transformers generate, sampled, no EOS stop)",
         sampler_table(rows)),
        ("Part a: parity on the device (the tiny preset, fp32)", parity_table(rows)),
        ("Part g: the iterative workload through both trainers, bf16, compile included", iterative_table(rows)),
        ("Issue 9's targets, on this run's shapes", targets_table(rows, batches, seq, long_lengths)),
        ("Jobs (each its own process)", jobs_table(rows)),
    ]
    out = [f"# {title}", "", *header, "", *environment(rows)]
    for name, lines in sections:
        out += ["", f"## {name}", "", *lines]
    return "\n".join(out) + "\n"
