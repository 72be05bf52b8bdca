"""The README and every page of docs/ run as written, and say what they show.

Each file's Python blocks run in order in one namespace (in a temporary working directory), with the hub id
``facebook/opt-350m`` swapped for a local tiny random OPT with its structural flags (the Hub is unreachable). A
line ``print(...)  # -> TEXT`` claims an output: some line the file's blocks print must start with ``TEXT``.
The README stays a front page: at most 300 lines, the quick start on its first screen.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLAIM = re.compile(r"#\s*->\s*(.+?)(?:\s{2,}\(.*)?$")


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def claims(blocks: list[str]) -> list[str]:
    return [m.group(1).strip() for block in blocks for line in block.splitlines() if (m := CLAIM.search(line))]


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
    blocks = python_blocks(page)
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block.replace('"facebook/opt-350m"', repr(opt_dir)), str(page), "exec"), namespace)  # noqa: S102
    printed = [line.strip() for line in out.getvalue().splitlines()]
    for claim in claims(blocks):
        assert any(line.startswith(claim) for line in printed), f"{page.name} claims `{claim}`; printed: {printed}"
    if page.name == "README.md":  # the quick start's saved model loads in transformers with the trained weights
        assert (tmp_path / "output" / "final" / "model.safetensors").exists()
        assert namespace["model"].config.model_type == "opt"
