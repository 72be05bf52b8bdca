"""The layout's rules, read from the code's own imports (``docs/architecture.md`` draws them):

* the layers of ``itersft_jax`` import only downward — ``shared`` (no jax) at the bottom, then ``parallel`` and
  ``models``, then ``core`` and ``sampler``, then ``io``, then the JAX ``trainer``, the ``facade``, the ``apps``;
* ``itersft_torch`` imports nothing of ``itersft_jax`` outside the shared layer, and never jax (checked in a fresh
  interpreter, as is the shared layer itself);
* no module, benchmark or test imports another module's underscore name, nor an underscore module; the
  third-party privates that cannot be avoided are listed below with the reason.

Each rule fails on the import that breaks it, naming the file and line.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("itersft_jax", "itersft_torch")

# The layers of itersft_jax, bottom (0) to top: a module may import its own layer and the layers below it.
RANK = {"_version": 0, "shared": 0, "parallel": 1, "models": 1, "core": 2, "sampler": 2, "io": 3, "engine": 4,
        "trainer": 5, "facade": 6, "apps": 7, "__init__": 7}

# Third-party private names we cannot avoid, each with its reason (the key: "module:name" as imported).
THIRD_PARTY_PRIVATES = {
    "jax._src.cudnn": "cuDNN flash attention's packed (ragged) layout and its version check have no public API",
    "jax._src.cudnn.fused_attention_stablehlo": "the same, for the fix-up of packed-GQA kv offsets",
    "jax._src": "distributed.py: jax.distributed's running state (is it initialised?) has no public accessor",
    "torch._dynamo.utils": "torch.compile's counters: the only way to count recompilations of a compiled model",
}


def python_files(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py") if "fixtures" not in p.parts)


def imports(path: Path):
    """``(line, module, name or None)`` for every import in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            for alias in node.names:
                yield node.lineno, module, alias.name


def layer_of(path: Path) -> str:
    parts = path.relative_to(ROOT / "itersft_jax").parts
    return parts[0][:-3] if len(parts) == 1 else parts[0]


def target_layer(module: str, name: str | None) -> str | None:
    parts = module.split(".")
    if parts[0] != "itersft_jax":
        return None
    if len(parts) > 1:
        return parts[1]
    return "__init__" if name in (None, "*") else (name if name in RANK else "__init__")


def test_the_layers_of_itersft_jax_import_only_downward():
    broken = []
    for path in python_files("itersft_jax"):
        own = layer_of(path)
        for line, module, name in imports(path):
            target = target_layer(module, name)
            if target is not None and target in RANK and RANK[target] > RANK[own]:
                broken.append(f"{path.relative_to(ROOT)}:{line}: the {own} layer imports {module} ({target})")
    assert not broken, "imports that run back up:\n" + "\n".join(broken)


def test_shared_layer_and_torch_backend_import_no_jax_and_nothing_above_shared():
    broken = []
    for path in python_files("itersft_jax/shared", "itersft_torch"):
        for line, module, name in imports(path):
            top = module.split(".")[0]
            if top in ("jax", "jaxlib", "flax", "optax", "orbax"):
                broken.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
            if top == "itersft_jax" and target_layer(module, name) not in ("shared", "_version"):
                broken.append(f"{path.relative_to(ROOT)}:{line}: imports {module} (outside itersft_jax.shared)")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("statement", ["import itersft_torch, itersft_torch.trainer",
                                       "import itersft_jax, itersft_jax.shared.config, itersft_jax.shared.data, "
                                       "itersft_jax.shared.flow, itersft_jax.shared.api, itersft_jax.shared.outputs"])
def test_importing_the_torch_backend_or_the_shared_layer_loads_no_jax(statement):
    code = f"import sys; {statement}; print(sorted(m for m in ('jax', 'flax', 'optax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_module_imports_another_modules_underscore_names():
    broken = []
    for path in python_files(*PACKAGES, "tests", "benchmarks"):
        for line, module, name in imports(path):
            if module == "__future__" or module in THIRD_PARTY_PRIVATES:
                continue
            private = [p for p in module.split(".") if p.startswith("_") and not p.startswith("__")]
            if name is not None and name.startswith("_") and not name.startswith("__"):
                private.append(name)
            if private and module.split(".")[-1] != "_version":
                broken.append(f"{path.relative_to(ROOT)}:{line}: {module}{'' if name is None else ' ' + name}")
    assert not broken, "underscore names imported across modules:\n" + "\n".join(broken)


TRAINER_ATTRIBUTES = {"train_state", "processing_class", "callback_handler", "graphdef", "restore_counters",
                      "next_generation_call", "save_model", "counters"}


def test_state_is_passed_explicitly_below_the_trainers():
    """The sampler and io take the state they need as arguments (JetStream's engine, levanter's checkpoints): no
    recognition of a trainer by its attributes (``hasattr(x, "train_state")``) in ``sampler/`` or ``io/``, no
    attribute of a trainer assigned in ``io/`` (it returns a state; the trainer assigns it), and no run-time reach
    past the import rules in the shared layer (``sys.modules``)."""
    broken = []
    for path in python_files("itersft_jax/sampler", "itersft_jax/io"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("hasattr", "getattr")
                    and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value in TRAINER_ATTRIBUTES):
                broken.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in targets:
                for sub in ast.walk(target):
                    if (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name)
                            and sub.value.id == "trainer"):
                        broken.append(f"{path.relative_to(ROOT)}:{node.lineno}: assigns trainer.{sub.attr}")
    for path in python_files("itersft_jax/shared"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "modules" and getattr(node.value, "id", "") == "sys":
                broken.append(f"{path.relative_to(ROOT)}:{node.lineno}: sys.modules in the shared layer")
    assert not broken, "\n".join(broken)
