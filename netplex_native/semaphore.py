"""Counting semaphores shared by the processes of one controller (or ``Domain``).

Backends: ``plugin`` (RPC: state in the controller) or ``native_plugin``
(shared memory, no system call when uncontended).  Add exactly one in
``post_add_hook``; the functions below are the same for both.

A missing semaphore is created implicitly, at 0, protected.  Protected: what a
container took (decrements minus increments) is given back when it ends,
however it ends, and waiters are woken.

``access(name)`` returns a handle (``Semaphore``) with the same operations and
the ``threading.Semaphore`` idiom; a handle made by ``access`` calls the
backend of the current process at each call, one made by
``Domain.semaphore`` its domain's backend.  With the accelerator, the
handle's hot methods run in C and fall back to the methods written here
(``_handle.py``); the module-level functions skip the lookups of the backend
method (``_context.forward``).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from ._context import ctx, forward
from ._handle import SemaphoreBase, HandleRules, accelerate, hot_methods
from .errors import check_int, check_name
from .mutex import _acquire_timeout, _destroyed
from .rpc.sync import SemaphorePlugin
from .native.plugins import NativeSemaphorePlugin

__all__ = ["plugin", "native_plugin", "Semaphore", "access", "create", "increment",
           "decrement", "decrement_async", "get", "destroy"]

plugin = SemaphorePlugin()
native_plugin = NativeSemaphorePlugin()


def create(name: str, initial: int = 0, *, protected: bool = False) -> bool:
    """Create *name* with value *initial*; True if created, False if it
    already existed (then *initial* and *protected* are ignored)."""
    return bool(ctx.sem.create(name, initial, protected))


@forward("sem", ("name",))
def increment(name: str) -> int:
    """+1; returns the new value."""
    return int(ctx.sem.increment(name))


@forward("sem", ("name", "wait", "timeout"), (False, None))
def decrement(name: str, *, wait: bool = False, timeout: float | None = None) -> int:
    """-1 if the value is positive; returns the new value.  At 0: -1 without
    *wait*; with *wait*, blocks until positive, or until *timeout* seconds
    (-1), or until the semaphore is destroyed (-1).  Waiters are served in
    order of arrival (native: a newcomer may overtake waiters queued for
    less than 1 ms)."""
    return int(ctx.sem.decrement(name, wait, timeout))


async def decrement_async(name: str, *, wait: bool = False, timeout: float | None = None) -> int:
    """``decrement`` for handlers: waits without blocking the container's loop."""
    return int(await ctx.sem.decrement_async(name, wait, timeout))


@forward("sem", ("name",))
def get(name: str) -> int:
    """The current value."""
    return int(ctx.sem.get(name))


def destroy(name: str) -> None:
    """Remove the semaphore; waiting ``decrement`` calls return -1."""
    ctx.sem.destroy(name)


class Semaphore(SemaphoreBase, HandleRules, _ours=True):
    """The semaphore *name*: ``increment() -> int``, ``decrement(*, wait=False,
    timeout=None) -> int``, ``get() -> int``, ``await decrement_async(...)``;
    and the ``threading.Semaphore`` idiom: ``acquire(blocking=True,
    timeout=None) -> bool`` (None or -1: forever), ``release(n=1)``,
    ``with``, ``await acquire_async(...)``, ``async with``."""

    __slots__ = ()

    def __init__(self, name: str) -> None:
        super().__init__(check_name(name))

    @property
    def _backend(self) -> Any:
        return ctx.sem

    def increment(self) -> int:
        """+1; returns the new value."""
        return int(self._backend.increment(self.name))

    def decrement(self, *, wait: bool = False, timeout: float | None = None) -> int:
        """-1 if positive: the new value; -1 when nothing was taken."""
        return int(self._backend.decrement(self.name, wait, timeout))

    async def decrement_async(self, *, wait: bool = False, timeout: float | None = None) -> int:
        """``decrement`` for coroutines: waits without blocking the event loop."""
        return int(await self._backend.decrement_async(self.name, wait, timeout))

    def get(self) -> int:
        """The current value."""
        return int(self._backend.get(self.name))

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """As ``threading.Semaphore.acquire``: True when a unit was taken."""
        t = _acquire_timeout(blocking, timeout)
        return bool(self._backend.decrement(self.name, t != 0, t) >= 0)

    async def acquire_async(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """``acquire`` for coroutines."""
        t = _acquire_timeout(blocking, timeout)
        return bool(await self._backend.decrement_async(self.name, t != 0, t) >= 0)

    def release(self, n: int = 1) -> None:
        """As ``threading.Semaphore.release``: give back *n* units (n >= 1), in
        one step on every backend (all or none: OverflowError past the
        maximum value, nothing given)."""
        n = check_int(n, "n", 1)
        if n == 1:
            self._backend.increment(self.name)
        else:
            self._backend.add(self.name, n)

    def __enter__(self) -> "Semaphore":
        if not self.acquire():
            raise _destroyed(self.name)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    async def __aenter__(self) -> "Semaphore":
        if not await self.acquire_async():
            raise _destroyed(self.name)
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<Semaphore {self.name!r}>"


class BoundSemaphore(Semaphore, _ours=True):
    """A Semaphore whose backend is fixed (``Domain.semaphore``)."""

    __slots__ = ()

    def __init__(self, name: str, backend: Any) -> None:
        SemaphoreBase.__init__(self, check_name(name), backend)

    @property
    def _backend(self) -> Any:
        return self._be


Semaphore._py_hot = hot_methods(Semaphore)
accelerate(Semaphore)


def access(name: str) -> Semaphore:
    """The semaphore *name* (created implicitly, at 0, protected, on first use)."""
    return Semaphore(name)
