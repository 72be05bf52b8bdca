"""Several processes (hosts) on the JAX engine: ``jax.distributed`` from the environment, and the host side of
arrays that span processes.

``initialize()`` — called by the trainer before it touches a device, or by a script at its very start — runs
``jax.distributed.initialize`` when the environment asks for it:

- ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
  (optionally ``JAX_LOCAL_DEVICE_IDS``): an explicit launch, e.g. one process per host or per GPU;
- ``ITERSFT_JAX_DISTRIBUTED=auto``: JAX detects the cluster itself (SLURM, TPU pod slices, Open MPI, ...).

Otherwise it does nothing (one process). Every process builds the same trainer and passes the same samples to
each ``step()`` (like the torch engine's same-samples rule): each process packs the whole update and transfers
only the rows its own devices hold (``global_batch``), so the updates are the same whatever the process count.
Logging, ``save_model`` files and the Hub happen on process 0; parameters are gathered from every process first
(``host_copy``), so every process must call ``save_model`` too. The sampler's host loop reads each decode chunk's
tokens and flags through ``fetch`` (every process holds the whole value, so all take the same decisions), and the
entry points compare their arguments across processes with ``check_same`` (a ValueError naming the argument on
every process, not a hang). docs/scaling.md: what every process must call.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)


def requested() -> bool:
    """Whether the environment asks for several processes."""
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or os.environ.get("ITERSFT_JAX_DISTRIBUTED") == "auto"


def initialize() -> bool:
    """``jax.distributed.initialize`` from the environment (see the module docstring), once; True when this run
    has several processes. ValueError naming the variable for incomplete settings."""
    import jax
    from jax._src import distributed as _state

    if _state.global_state.client is not None:  # already initialized (by us or the user)
        return jax.process_count() > 1
    if not requested():
        return False
    if os.environ.get("ITERSFT_JAX_DISTRIBUTED") == "auto" and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
    else:
        missing = [name for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not os.environ.get(name)]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not: set all three "
                             f"(or ITERSFT_JAX_DISTRIBUTED=auto on SLURM / TPU pods)")
        try:
            num_processes, process_id = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except ValueError:
            raise ValueError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers") from None
        try:
            jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], num_processes, process_id)
        except RuntimeError as err:
            if "before" in str(err).lower():
                raise RuntimeError("jax.distributed must start before JAX uses a device: construct the trainer (or "
                                   "call itersft_jax.parallel.distributed.initialize()) before any other JAX work"
                                   ) from err
            raise
    logger.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def global_batch(arrays: dict[str, Any], sharding) -> dict[str, Any]:
    """Host arrays that are the same on every process -> global ``jax.Array``s with ``sharding``; each process
    transfers only the slices its devices hold."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return jax.device_put(arrays, sharding)
    return {k: jax.make_array_from_callback(np.shape(v), sharding, lambda index, v=v: np.asarray(v)[index])
            for k, v in arrays.items()}


def host_copy(tree: Any) -> Any:
    """Numpy copies of every array of ``tree`` on this host, gathered from all processes when they are sharded
    across processes (every process must call it)."""
    import jax

    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def fetch(tree: Any) -> Any:
    """Numpy copies of small device arrays (a decode chunk's tokens, flags and logprobs) with their whole value on
    every process: one jitted copy of the whole tree to a sharding replicated over its devices, then each process
    reads its own replica (one all-gather, no host-to-host transfer). Every process must call it with the same
    tree. Non-JAX leaves pass through as numpy; with one process it is ``jax.device_get``."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return jax.device_get(tree)
    leaves, treedef = jax.tree.flatten(tree)
    spanning = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable]
    if spanning:
        devices = tuple(sorted(leaves[spanning[0]].sharding.device_set, key=lambda d: d.id))
        copies = _replicator(devices)([leaves[i] for i in spanning])
        for i, x in zip(spanning, copies):
            leaves[i] = x.addressable_data(0)
    return jax.tree.unflatten(treedef, [np.asarray(jax.device_get(x)) for x in leaves])


@functools.cache
def _replicator(devices: tuple):
    """The identity, jitted with every output replicated over ``devices`` (an all-gather of sharded inputs)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    return jax.jit(lambda xs: xs, out_shardings=NamedSharding(Mesh(np.array(devices), ("all",)), PartitionSpec()))


def check_same(call: str, arguments: dict[str, Any]) -> None:
    """ValueError on every process, naming the arguments, unless every process passed the same ``arguments`` to
    ``call``: the processes run one program each, so a process with other prompts, data or settings would make
    them do silently different work or wait on each other forever. A 64-bit digest per argument is gathered from
    every process (one small all-gather); a no-op with one process. Every process must call it with the same
    argument names."""
    import jax

    if jax.process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    mine = np.array([_digest(value) for value in arguments.values()], np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), len(mine))
    differ = [name for name, column in zip(arguments, every.T) if (column != column[0]).any()]
    if differ:
        others = [p for p in range(len(every)) if (every[p] != every[0]).any()]
        names = ", ".join(f"`{name}`" for name in differ)
        raise ValueError(f"{call}: {names} differs between the {jax.process_count()} processes (process "
                         f"{', '.join(map(str, others))} against process 0): every process must make the same "
                         f"calls with the same arguments (each computes its share of the same global work); "
                         f"gather per-process inputs first (e.g. multihost_utils.process_allgather)")


def _digest(value: Any) -> int:
    """A 64-bit fingerprint of nested lists/tuples/dicts/dataclasses of numbers, strings and arrays."""
    import dataclasses
    import hashlib

    import numpy as np

    h = hashlib.blake2b(digest_size=8)

    def feed(x: Any) -> None:
        if isinstance(x, (str, bytes, int, float, bool, type(None))):
            h.update(f"{type(x).__name__}:{x!r};".encode())
        elif isinstance(x, dict):
            h.update(f"dict{len(x)}(".encode())
            for k in sorted(x, key=repr):
                feed(k)
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"seq{len(x)}(".encode())
            for item in x:
                feed(item)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            feed({f.name: getattr(x, f.name) for f in dataclasses.fields(x)})
        elif hasattr(x, "__array__") or isinstance(x, np.generic):
            import jax

            if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                x = jax.random.key_data(x)
            array = np.asarray(x)
            h.update(f"array{array.dtype}{array.shape}".encode())
            h.update(np.ascontiguousarray(array).tobytes())
        else:
            h.update(repr(x).encode())
        h.update(b")")

    feed(value)
    return int.from_bytes(h.digest(), "little", signed=True)


def is_main_process() -> bool:
    import jax

    return jax.process_index() == 0
