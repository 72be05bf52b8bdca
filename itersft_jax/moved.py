"""The module paths of itersft 0.1's flat layout, still importable: ``import itersft_jax.weights`` gives
``itersft_jax.io.weights`` itself (the same module object, so attributes and patches are shared) with a
``DeprecationWarning`` naming the new path. The package root installs the finder; nothing imports this module
otherwise.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old module (under itersft_jax.) -> its home now
MOVED = {
    "config": "shared.config", "fields": "shared.fields", "data": "shared.data", "shell": "shared.shell",
    "outputs": "shared.outputs", "model_source": "shared.model_source", "mesh": "parallel.mesh",
    "distributed": "parallel.distributed", "models.sharding": "parallel.sharding", "train_step": "core.train_step",
    "loss": "core.loss", "optim": "core.optim", "packing": "core.packing", "trainable": "core.trainable",
    "generate": "sampler.generate", "lora": "models.lora", "models.adapters": "models.lora",
    "models.common": "models.layers", "weights": "io.weights",
    "peft_io": "io.peft_io", "checkpoint": "io.checkpoint", "hub": "io.hub", "flax_weights": "io.flax_weights",
    "cli": "apps.cli", "demo": "apps.demo", "demo_chat": "apps.demo_chat",
}
PREFIX = "itersft_jax."


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to the module at its new one (no copy)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(PREFIX) and fullname[len(PREFIX):] in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = PREFIX + MOVED[spec.name[len(PREFIX):]]
        warnings.warn(f"`{spec.name}` moved to `{new}`; import it from there (the old path will be removed)",
                      DeprecationWarning, stacklevel=3)
        module = importlib.import_module(new)
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._real_spec  # the import machinery set the alias's spec on the shared module


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
