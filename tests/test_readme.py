"""The README's Python examples run as written (hub ids swapped for local tiny models of the same family)."""

import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def python_blocks() -> list[str]:
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_examples():
    assert len(python_blocks()) >= 4


def test_readme_python_examples_run(tiny_model_dir, monkeypatch, tmp_path):
    opt_dir = tiny_model_dir("opt", do_layer_norm_before=False, word_embed_proj_dim=32, hidden_size=64)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in python_blocks():
        code = block.replace('"facebook/opt-350m"', repr(opt_dir))
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README is ours
    assert os.path.exists(tmp_path / "output" / "final" / "config.json")
    assert os.path.exists(tmp_path / "output" / "converted" / "model.safetensors")
    assert namespace["trainer"].state.global_step >= 3
