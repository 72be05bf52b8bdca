"""The ``model`` argument given as a string, checked the same way by both engines (no jax, no torch).

A hub id is ``name`` or ``org/name``. Anything else that is clearly a filesystem path — absolute, starting
with ``./``, ``../`` or ``~``, holding a backslash or more than one ``/`` — must exist locally: otherwise
the loaders would send it to the hub, and the user would read "Repo id must be in the form
'repo_name' or 'namespace/repo_name'" about a typo in a local path.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"  # what makes a directory a PEFT adapter directory


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` can only mean a local path (no hub id has this form)."""
    return (os.path.isabs(name) or name in (".", "..") or name.startswith(("./", "../", "~", ".\\", "..\\"))
            or "\\" in name or name.count("/") > 1 or name.endswith("/"))


def check_model_path(name_or_path: str | os.PathLike, argument: str = "model") -> str:
    """``name_or_path`` as a string (``~`` expanded). Raises ``FileNotFoundError`` naming the path when it is
    meant as a local path that does not exist, and ``NotADirectoryError`` when it is a file (a model is a
    directory holding ``config.json``)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"`{argument}` must be a hub id or a local directory, got {type(name_or_path).__name__}")
    path = os.fspath(name_or_path)
    local = os.path.expanduser(path)
    if os.path.isfile(local):
        raise NotADirectoryError(f"`{argument}`: {path!r} is a file; pass the directory that holds config.json")
    if not os.path.isdir(local) and (looks_like_local_path(path) or isinstance(name_or_path, os.PathLike)):
        raise FileNotFoundError(f"`{argument}`: local path {path!r} does not exist (resolved to "
                                f"{os.path.abspath(local)!r}); a hub id has the form 'name' or 'org/name'")
    return local if os.path.isdir(local) else path


def is_adapter_dir(source: Any) -> bool:
    """Whether ``source`` is a PEFT adapter directory (it holds ``adapter_config.json``)."""
    return isinstance(source, (str, os.PathLike)) and os.path.isfile(os.path.join(source, ADAPTER_CONFIG))


def is_peft_model(source: Any) -> bool:
    """Whether ``source`` is a ``peft.PeftModel``, read from its class's bases (peft is an optional extra: nothing is
    imported to answer)."""
    return any(cls.__name__ == "PeftModel" and cls.__module__.split(".")[0] == "peft"
               for cls in type(source).__mro__)


def load_tokenizer(model: Any, *, resolve: Callable[[str], str] | None = None, **from_pretrained_kwargs):
    """The tokenizer stored with ``model`` when no ``processing_class`` is given — one behaviour on both engines: a
    path or hub id, or a model object's ``name_or_path`` (``config._name_or_path``); an adapter directory without a
    tokenizer of its own gives its base model's. ``resolve`` turns a hub id into a local directory first (the JAX
    engine's download). Without any name: a warning and ``None`` (step() then takes ``input_ids`` only)."""
    from transformers import AutoTokenizer

    if is_adapter_dir(model) and not any(os.path.isfile(os.path.join(model, f))
                                         for f in ("tokenizer.json", "tokenizer_config.json")):
        with open(os.path.join(model, ADAPTER_CONFIG)) as f:  # no tokenizer beside the adapter: the base's
            model = json.load(f).get("base_model_name_or_path") or model
    if isinstance(model, (str, os.PathLike)):
        source = model
    else:
        source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not source:
        logger.warning("no `processing_class` and the model has no name_or_path: step() takes `input_ids` only "
                       "(texts and prompts/completions need a tokenizer)")
        return None
    if resolve is not None and not os.path.isdir(source):
        source = resolve(source)
    return AutoTokenizer.from_pretrained(source, **from_pretrained_kwargs)
