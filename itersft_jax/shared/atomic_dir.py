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
