"""What a semaphore or mutex handle holds, and which of its methods run in C.

A handle (``semaphore.Semaphore``, ``mutex.Mutex``) holds its name and, for
a Domain's handle, the backend it is bound to (``_be``; None: the current
process's backend, ``ctx.sem`` / ``ctx.mutex``, looked up at each call).

With the accelerator (csrc/fast.c, "Handles") that state lives in the C
bases ``SemaphoreBase`` / ``MutexBase``, and :func:`accelerate` hands the
class's hot methods (increment, decrement, lock, unlock, acquire, release,
``with``) to C.  Invariants (fast.c H1-H4):
- The Python methods stay as written in the classes' source: they are the
  specification, and C calls them, unchanged arguments and all, for every
  case but the plain uncontended one.
- The plain case (no arguments, a native backend) calls the core with the
  name's core handle cached in the handle object; a handle of a destroyed
  (or destroyed and re-created) name is refused by the core (its
  generation), and the Python method then looks the name up again exactly as
  a by-name call does.  So behaviour is the Python methods', in every
  process, across fork, close and re-creation.
- The C methods find the backend as ``Semaphore._backend`` and
  ``BoundSemaphore._backend`` do (``_be``, else the process's); a subclass
  that changes ``_backend`` must override the hot methods too.
Without the accelerator, :class:`PyHandleBase` holds the same state and
:func:`accelerate` does nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["PyHandleBase", "SemaphoreBase", "MutexBase", "accelerate"]


class PyHandleBase:
    """A handle's state in Python (the accelerator is not built)."""

    __slots__ = ("name", "_be")

    def __init__(self, name: str, backend: Any = None) -> None:
        self.name = name
        self._be = backend


def _no_accelerator(cls: type) -> None:
    """Without the accelerator the class's methods are used as they are."""


if TYPE_CHECKING:
    SemaphoreBase = PyHandleBase
    MutexBase = PyHandleBase
    accelerate = _no_accelerator
else:
    try:
        from ._fast import SemaphoreBase, MutexBase, accelerate
    except ImportError:
        SemaphoreBase = MutexBase = PyHandleBase
        accelerate = _no_accelerator
