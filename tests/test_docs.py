"""The README and every page of docs/ run as written, and say what they show.

Each file's Python blocks run in order in one namespace (in a temporary working directory), with the hub id
``facebook/opt-350m`` swapped for a local tiny random OPT with its structural flags (the Hub is unreachable). A
line ``print(...)  # -> TEXT`` claims an output: that very print must run and print exactly ``TEXT`` (every time
it runs). The README's quick start reloads the trained model in transformers: its logits are the trainer's.
The README stays a front page: at most 300 lines, the quick start on its first screen.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLAIM = re.compile(r"#\s*->\s*(.+?)(?:\s{2,}\(.*)?$")


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def with_claims_recorded(block: str, claims: list[str]) -> str:
    """``block`` with the ``print`` of each claiming line replaced by ``_claimed_print[i]``, ``i`` the claim's index in
    ``claims`` (appended to); line numbers are kept."""
    lines = block.splitlines(keepends=True)
    for n, line in enumerate(lines):
        if m := CLAIM.search(line):
            assert re.match(r"\s*print\(", line), f"a claim must follow a print(...): {line!r}"
            lines[n] = line.replace("print(", f"_claimed_print[{len(claims)}](", 1)
            claims.append(m.group(1).strip())
    return "".join(lines)


def recording_print(printed: list[str]):
    """``print`` that also appends what it printed (without the final newline) to ``printed``."""
    def record(*args, **kwargs):
        text = io.StringIO()
        print(*args, **{**kwargs, "file": text})
        printed.append(text.getvalue().removesuffix("\n"))
        print(*args, **kwargs)

    return record


def test_claims_are_tied_to_their_own_print():
    claims: list[str] = []
    block = with_claims_recorded('print(10)\nprint(1)  # -> 1\nprint("4.605")  # -> 4.605  (a note)\n', claims)
    outputs: list[list[str]] = [[], []]
    exec(block, {"_claimed_print": [recording_print(o) for o in outputs]})  # noqa: S102
    assert claims == ["1", "4.605"] and outputs == [["1"], ["4.605"]]


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move detail to docs/"
    assert any(line.startswith("## Quick start") for line in lines[:15]), "the quick start starts the first screen"
    for link in re.findall(r"\]\((docs/[^)#]+|benchmarks/[^)#]+)", text):
        assert (ROOT / link).exists(), f"README links to a missing {link}"


def test_docs_link_to_pages_that_exist():
    for page in PAGES[1:]:
        for link in re.findall(r"\]\(([^)#:]+\.md)", page.read_text()):
            assert (page.parent / link).exists(), f"{page.name} links to a missing {link}"


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run_and_print_what_they_claim(page, tiny_model_dir, monkeypatch, tmp_path):
    opt_dir = tiny_model_dir("opt", do_layer_norm_before=False, word_embed_proj_dim=32, hidden_size=64)
    monkeypatch.chdir(tmp_path)
    claims: list[str] = []
    blocks = [with_claims_recorded(block, claims) for block in python_blocks(page)]
    outputs: list[list[str]] = [[] for _ in claims]
    namespace: dict = {"_claimed_print": [recording_print(printed) for printed in outputs]}
    with contextlib.redirect_stdout(io.StringIO()):
        for block in blocks:
            exec(compile(block.replace('"facebook/opt-350m"', repr(opt_dir)), str(page), "exec"), namespace)  # noqa: S102
    for claim, printed in zip(claims, outputs):
        assert printed and all(text == claim for text in printed), f"{page.name} claims `{claim}`; printed: {printed}"
    if page.name == "README.md":  # the quick start's saved model loads in transformers with the trained weights
        assert (tmp_path / "output" / "final" / "model.safetensors").exists()
        trained, reloaded = _logits(namespace["trainer"], namespace["model"])
        _, untrained = _logits(None, AutoModelForCausalLM.from_pretrained(opt_dir))
        # fp32, logits of ~0.06 here (the two forwards differ by ~2e-8): 1e-6 sees a 1% error in one fc1 (3e-5)
        assert np.abs(reloaded - trained).max() <= 1e-6
        assert np.abs(untrained - trained).max() > 1e-3  # the quick start's updates moved the logits


def _logits(trainer, model) -> tuple[np.ndarray | None, np.ndarray]:
    """The JAX trainer's logits (or None) and the transformers model's, fp32, on a few fixed tokens."""
    import torch

    from itersft_jax.models.attention.masks import positions_from_mask

    ids = np.array([[2, 5, 6, 7, 8, 9, 10, 11]])
    mask = np.ones_like(ids)
    with torch.no_grad():
        hf = model.eval()(input_ids=torch.as_tensor(ids)).logits.float().numpy()
    if trainer is None:
        return None, hf
    return np.asarray(trainer.model(ids, positions_from_mask(mask), mask)[0], np.float32), hf
