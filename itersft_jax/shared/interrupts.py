"""Commits that a Ctrl-C cannot cut in half.

A state change of the trainers is several assignments (the JAX train state is donated to the step that replaces it;
the low-level accumulator and its bookkeeping; an optimizer update and the step counter). A ``KeyboardInterrupt``
between two of them would leave a trainer that fails for good (a deleted buffer) or counts an update twice.
``deferred_interrupt()`` holds a SIGINT that arrives inside the block and raises it as ``KeyboardInterrupt`` when the
block has finished, so the interrupted call ends with its state either wholly before or wholly after the commit.
Blocks are kept short: the work that may take long (a forward and backward pass) runs outside them and is rolled back
when interrupted. No jax, no torch.
"""

from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger(__name__)


class deferred_interrupt:  # noqa: N801  (used like a function: `with deferred_interrupt():`)
    """Hold SIGINT until the block ends, then raise ``KeyboardInterrupt`` (only in the main thread, and only while
    Python's default handler is installed: another handler of the user's, or an enclosing block, is left alone)."""

    def __enter__(self):
        self._received = False
        self._previous = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame):
        if not self._received:
            logger.warning("Ctrl-C: finishing the state change in progress first")
        self._received = True

    def __exit__(self, exc_type, exc, tb):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self._received and exc_type is None:
            raise KeyboardInterrupt
        return False
