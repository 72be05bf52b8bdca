"""Atomic, verified directories: the write / manifest / rename / verify protocol of every itersft checkpoint.

A directory is written under a temporary name, every file fsynced, a manifest (size and SHA-256 of every other
file) written last, then renamed into place: a process killed at any moment leaves the complete directory or a
temporary, never a partial one. Reading checks every file against the manifest first. The JAX engine's
checkpoints (``itersft_jax.io.checkpoint``) and both engines' ``save_state`` use it. No jax, no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MANIFEST_FILE = "itersft_manifest.json"
MANIFEST_FORMAT = "itersft-checkpoint/1"
HASH_THREADS = min(8, os.cpu_count() or 1)


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, damaged, or not one itersft wrote."""


# ----------------------------------------------------------------------------------------------------------
# Where a save may write: never over what it did not write


# Top-level files a model directory may already hold: what save_model / save_pretrained / save_adapter write, a
# model card and the training files transformers writes beside them. A directory holding anything else is a user's.
MODEL_DIR_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
    "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model", "chat_template*",
    "flax_model*.msgpack", "flax_model.msgpack.index.json", "adapter_config.json", "adapter_model.*",
    "preprocessor_config.json", "processor_config.json", "README.md", "training_args.bin", "trainer_state.json",
    "*_results.json", MANIFEST_FILE, "itersft_state.json", ".DS_Store",
)


def check_path_argument(path: Any, argument: str, *, output_dir: str | os.PathLike | None = None) -> str:
    """``path`` as an absolute path a save may write to, or ``TypeError``/``ValueError`` naming ``argument``.

    Refused: anything but a ``str`` / ``os.PathLike`` (``None`` included), ``""``, the working directory or any
    directory above it (``"."``, ``".."``, ``"/"``: replacing them would replace the user's project), a
    directory above ``output_dir``, an existing regular file, and a symbolic link."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`{argument}` must be a directory path (str or os.PathLike), got "
                        f"{type(path).__name__}: {path!r}"[:300])
    raw = os.fspath(path)
    if isinstance(raw, bytes) or not raw.strip():
        raise ValueError(f"`{argument}` is empty: give the directory to write")
    if "\x00" in raw:
        raise ValueError(f"`{argument}` holds a NUL character: {raw!r}")
    final = os.path.abspath(raw)
    cwd = os.path.abspath(os.getcwd())
    if _contains(final, cwd):
        what = "the current working directory" if final == cwd else "a directory above the working directory"
        raise ValueError(f"`{argument}`={raw!r} is {what} ({final}): a save there would write over its contents. "
                         f"Give a new directory")
    if output_dir is not None and isinstance(output_dir, (str, os.PathLike)) and os.fspath(output_dir):
        out = os.path.abspath(os.fspath(output_dir))
        if final != out and _contains(final, out):
            raise ValueError(f"`{argument}`={raw!r} is a directory above `output_dir` ({out}): a save there would "
                             f"replace the run's outputs. Give a directory inside or beside it")
    if os.path.islink(final):
        raise ValueError(f"`{argument}`={raw!r} is a symbolic link: give the directory itself")
    if os.path.exists(final) and not os.path.isdir(final):
        raise ValueError(f"`{argument}`={raw!r} is an existing file, not a directory: a save would replace it")
    return final


def check_state_source(path: Any, argument: str = "path") -> str:
    """``path`` of a state to load, as an absolute path: ``TypeError`` for a non-path, ``FileNotFoundError`` naming
    ``argument`` when nothing is there (the manifest check then says what is wrong with what is there)."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"`{argument}` must be the path of a state directory (str or os.PathLike), got "
                        f"{type(path).__name__}: {path!r}"[:300])
    final = os.path.abspath(os.fspath(path))
    if not os.path.exists(final):
        raise FileNotFoundError(f"`{argument}`={os.fspath(path)!r}: no such state directory ({final})")
    return final


def _contains(parent: str, child: str) -> bool:
    """Whether ``child`` is ``parent`` or lies below it (absolute paths)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def is_ours(path: str) -> bool:
    """Whether ``path`` is a directory an itersft save wrote (its manifest names our format)."""
    try:
        with open(os.path.join(path, MANIFEST_FILE), "rb") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT


def check_state_target(path: Any, argument: str, *, output_dir: str | os.PathLike | None = None) -> str:
    """Where ``save_state`` / ``save_checkpoint`` may write, as an absolute path: a new path, an empty directory,
    or a state directory an itersft save wrote (it is replaced atomically). A directory holding anything else is
    refused naming ``argument`` — its files would be deleted. See :func:`check_path_argument` for the rest."""
    final = check_path_argument(path, argument, output_dir=output_dir)
    if os.path.isdir(final) and os.listdir(final) and not is_ours(final):
        listed = sorted(os.listdir(final))
        shown = ", ".join(listed[:5]) + (f", ... ({len(listed)} entries)" if len(listed) > 5 else "")
        raise ValueError(f"`{argument}`={os.fspath(path)!r} exists and is not a state directory written by itersft "
                         f"(no {MANIFEST_FILE}; it holds {shown}): saving would delete its files. Give a new or "
                         f"empty directory, or a state directory an earlier save wrote")
    return final


def check_model_target(path: Any, argument: str, *, output_dir: str | os.PathLike | None = None) -> str:
    """Where ``save_model`` may write, as an absolute path: a new path, or a directory whose top-level files are
    all ones a model save writes (``MODEL_DIR_FILES``: an earlier save, a downloaded model, a run's output
    directory); subdirectories (``checkpoint-N``, ``runs``) are left alone. A directory holding another file — a
    user's — is refused naming ``argument``. See :func:`check_path_argument` for the rest."""
    import fnmatch

    final = check_path_argument(path, argument, output_dir=output_dir)
    if os.path.isdir(final):
        foreign = sorted(name for name in os.listdir(final)
                         if not os.path.isdir(os.path.join(final, name))
                         and not any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_DIR_FILES))
        if foreign:
            raise ValueError(f"`{argument}`={os.fspath(path)!r} holds files a model save does not write "
                             f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}): refusing to write "
                             f"the model among them. Give a new or empty directory")
    return final


def write_synced(path: str, data: bytes) -> dict[str, Any]:
    """Write and fsync ``data``; its manifest entry."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_entry(path: str, fsync: bool = False) -> dict[str, Any]:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
        if fsync:
            os.fsync(f.fileno())
        return {"size": os.fstat(f.fileno()).st_size, "sha256": digest.hexdigest()}


def hash_tree(root: str, skip: set[str], fsync: bool) -> dict[str, dict[str, Any]]:
    """``{relative path: {size, sha256}}`` of every file under ``root``, hashed in parallel threads."""
    paths = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)
    paths = [p for p in paths if p not in skip]
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        entries = pool.map(lambda rel: file_entry(os.path.join(root, rel), fsync), paths)
        return dict(zip(paths, entries))


def finish(tmp: str, final: str, written: dict[str, dict[str, Any]], global_step: int) -> None:
    """Hash and fsync everything in ``tmp`` (``written``: files already hashed while written), write the manifest
    last, then rename ``tmp`` to ``final`` (an existing ``final`` is replaced)."""
    files = hash_tree(tmp, skip=set(written), fsync=True)
    files.update(written)
    manifest = {"format": MANIFEST_FORMAT, "global_step": global_step, "files": dict(sorted(files.items()))}
    write_synced(os.path.join(tmp, MANIFEST_FILE), json.dumps(manifest, indent=1).encode())
    for root, _, _ in os.walk(tmp):  # directory entries too: a rename must not outlive its files
        fsync_dir(root)
    if os.path.exists(final):
        replace_dir(tmp, final)
    else:
        os.rename(tmp, final)
    fsync_dir(os.path.dirname(final))


def replace_dir(new: str, final: str) -> None:
    """Put directory ``new`` in the place of the existing directory ``final`` and delete the old one.

    ``rename(2)`` cannot replace a non-empty directory, and deleting ``final`` first left a moment with no ``final``
    at all (a ``kill -9`` there lost the state that was being replaced: caught by test_low_level's kill test). On
    Linux the two are swapped atomically (``renameat2(RENAME_EXCHANGE)``), then the old one — now under ``new``'s
    temporary name, cleaned up by the next save if a kill interrupts its deletion — is deleted. Elsewhere the old
    one is renamed aside first (a short window without ``final`` remains there)."""
    if not _exchange(new, final):
        aside = os.path.join(os.path.dirname(final), f".trash-{os.path.basename(final)}-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
        os.rename(new, final)
        new = aside
    shutil.rmtree(new, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), a, None, b)


def read_json(checkpoint_dir: str, name: str) -> Any:
    path = os.path.join(checkpoint_dir, name)
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {checkpoint_dir}: {name} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {checkpoint_dir}: {name} is damaged (not valid JSON: {err})") from None


def verify(checkpoint_dir: str, required: str, writer: str) -> dict[str, Any]:
    """Check every file of ``checkpoint_dir`` against its manifest (which must list ``required``); returns the
    manifest. Raises :class:`CheckpointError` naming the checkpoint and the file that is missing, truncated or
    changed. ``writer`` names what writes such directories, for the message."""
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"checkpoint {checkpoint_dir} does not exist (or is not a directory)")
    if not os.path.isfile(os.path.join(checkpoint_dir, MANIFEST_FILE)):
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} is incomplete: it has no {MANIFEST_FILE} (its save was interrupted, "
            f"the file was deleted, or it was not written by {writer})")
    manifest = read_json(checkpoint_dir, MANIFEST_FILE)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT or required not in files
            or not all(isinstance(e, dict) and {"size", "sha256"} <= set(e) for e in files.values())):
        raise CheckpointError(f"checkpoint {checkpoint_dir}: {MANIFEST_FILE} is not an itersft manifest")
    for rel, entry in files.items():  # cheap checks first: a missing or truncated file needs no hashing
        path = os.path.join(checkpoint_dir, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {checkpoint_dir}: file {rel} is missing")
        if os.path.getsize(path) != entry["size"]:
            raise CheckpointError(f"checkpoint {checkpoint_dir}: file {rel} has {os.path.getsize(path)} bytes, "
                                  f"{entry['size']} were saved (truncated or overwritten)")
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        hashes = pool.map(lambda rel: file_entry(os.path.join(checkpoint_dir, rel))["sha256"], list(files))
        for (rel, entry), sha256 in zip(files.items(), hashes):
            if sha256 != entry["sha256"]:
                raise CheckpointError(f"checkpoint {checkpoint_dir}: file {rel} changed since it was saved "
                                      f"(SHA-256 mismatch: damaged on disk or edited)")
    return manifest


# The flow's counters (``TrainerFlow.counters``) as a state or checkpoint stores them: field -> the types it may
# hold. Checked before anything is restored, so an edited or foreign counters file cannot leave a half-loaded trainer.
COUNTER_TYPES = {"global_step": (int,), "calls": (int,), "log_history": (list,),
                 "num_input_tokens_seen": (int, float, type(None)), "row_length": (int,), "datum_row_length": (int,)}
REQUIRED_COUNTERS = ("global_step", "calls")


def check_counters(counters: Any, where: str) -> dict[str, Any]:
    """``counters`` (read from ``where``) as the shell wrote them, or :class:`CheckpointError` naming the field."""
    if not isinstance(counters, dict):
        raise CheckpointError(f"{where}: the counters are not a JSON object")
    for name in REQUIRED_COUNTERS:
        if name not in counters:
            raise CheckpointError(f"{where}: the counters have no {name!r}")
    for name, value in counters.items():
        types = COUNTER_TYPES.get(name)
        if types is None:
            raise CheckpointError(f"{where}: unknown counter {name!r} (written by another version of itersft?)")
        if isinstance(value, bool) or not isinstance(value, types) or (isinstance(value, (int, float))
                                                                      and not 0 <= value < 2 ** 62):
            raise CheckpointError(f"{where}: counter {name!r} holds {value!r}, not a non-negative "
                                  f"{' or '.join(t.__name__ for t in types)}")
    return counters


def remove_dir(path: str) -> None:
    """Delete a directory so that no interruption leaves it half-deleted under its own name."""
    parent, name = os.path.split(path)
    trash = os.path.join(parent, f".trash-{name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process saves one checkpoint at a time: its own leftovers are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temporary_for(final: str, pid: int | None = None) -> str:
    """The temporary directory ``final`` is written into (beside it; stale ones of dead processes removed)."""
    parent, name = os.path.split(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    prefix = f".tmp-{name}-"
    for other in os.listdir(parent):
        rest = other[len(prefix):]
        if other.startswith(prefix) and rest.isdigit() and not process_alive(int(rest)):
            shutil.rmtree(os.path.join(parent, other), ignore_errors=True)
    tmp = os.path.join(parent, f"{prefix}{os.getpid() if pid is None else pid}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp
