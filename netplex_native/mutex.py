"""Mutexes shared by the processes of one controller (or of one ``Domain``).

``access(name)`` returns a handle: ``lock``/``unlock``, the ``threading``
idiom (``acquire``/``release``/``locked``, ``with``, ``async with``) and the
fencing ``token``.  Not recursive; waiters are served in order; a mutex whose
holder ends (even by SIGKILL) is unlocked.

Invariants of the handles (every backend):
- The holder is a process: any of its threads may unlock; ``unlock()`` by a
  process that does not hold it (nobody included) raises NotHolderError and
  changes nothing; ``unlock(force=True)`` unlocks whoever holds it.
- ``token`` is None unless this process holds the mutex; every later holder
  of the same name gets a larger token (across destroy/re-create and a
  holder's death too).
- A handle made by ``access`` calls the backend of the current process
  (``ctx.mutex``) at each call; one made by ``Domain.mutex`` calls its
  domain's backend.  Neither looks anything up beyond the backend's cache.
- With the accelerator the hot methods (lock, unlock, acquire, release,
  ``with``) run in C, through the name's core handle cached in the handle,
  and fall back to the methods written here (``_handle.py``).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from ._context import ctx
from ._handle import MutexBase, HandleRules, accelerate, hot_methods
from .rpc.sync import MutexPlugin
from .native.plugins import NativeMutexPlugin
from .errors import NetplexError, check_name, check_timeout

__all__ = ["plugin", "native_plugin", "Mutex", "access", "destroy"]

plugin = MutexPlugin()
native_plugin = NativeMutexPlugin()


def _acquire_timeout(blocking: bool, timeout: float | None) -> float | None:
    """threading's acquire(blocking, timeout) -> our timeout (None: forever)."""
    if not isinstance(blocking, int):          # bool or int, as threading: acquire(0)
        raise TypeError(f"blocking must be a bool or an int, not {type(blocking).__name__}")
    if not blocking:
        if timeout is not None and timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        return 0
    if timeout is None or (timeout == -1 and type(timeout) is not bool):
        return None
    return check_timeout(timeout)


def _destroyed(name: str) -> NetplexError:
    """``with`` never runs its body unprotected: a wait without timeout
    that ended without the lock (the mutex was destroyed) raises."""
    return NetplexError(f"{name!r} was destroyed while this process waited for it; "
                        f"the body of the with statement did not run")


class Mutex(MutexBase, HandleRules, _ours=True):
    """The mutex *name*.

    ``lock(timeout=None) -> bool`` waits until locked (True) or *timeout*
    seconds pass (False); ``unlock(force=False)`` unlocks (NotHolderError
    when this process does not hold it).  The ``threading.Lock`` idiom:
    ``acquire(blocking=True, timeout=None) -> bool`` (None or -1: forever),
    ``release()``, ``locked()``, ``with``; and for coroutines
    ``await lock_async()``, ``await acquire_async()``, ``async with``.
    """

    __slots__ = ()

    def __init__(self, name: str) -> None:
        super().__init__(check_name(name))

    @property
    def _backend(self) -> Any:
        return ctx.mutex

    def lock(self, timeout: float | None = None) -> bool:
        """Wait until locked (True), or *timeout* seconds (False)."""
        return bool(self._backend.lock(self.name, timeout))

    async def lock_async(self, timeout: float | None = None) -> bool:
        """``lock`` for coroutines: waits without blocking the event loop."""
        return bool(await self._backend.lock_async(self.name, timeout))

    def unlock(self, force: bool = False) -> None:
        """Unlock.  NotHolderError (nothing changed) when this process does not
        hold it; ``force=True`` unlocks whoever holds it (a no-op when free)."""
        if force is False:
            self._backend.unlock(self.name)
        else:
            self._backend.unlock(self.name, force)

    @property
    def token(self) -> int | None:
        """The fencing token of this process's hold (a positive 64-bit int,
        larger for every later holder), or None when it does not hold it."""
        t = self._backend.token(self.name)
        return None if t is None else int(t)

    # ---- the threading idiom ----
    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """As ``threading.Lock.acquire``: True when locked."""
        return bool(self.lock(_acquire_timeout(blocking, timeout)))

    async def acquire_async(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """``acquire`` for coroutines."""
        return await self.lock_async(_acquire_timeout(blocking, timeout))

    def release(self) -> None:
        """As ``threading.Lock.release``: NotHolderError (a RuntimeError) when
        this process does not hold it."""
        self.unlock()

    def locked(self) -> bool:
        """True while some process holds it."""
        return bool(self._backend.locked(self.name))

    def __enter__(self) -> "Mutex":
        if not self.lock():
            raise _destroyed(self.name)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.unlock()

    async def __aenter__(self) -> "Mutex":
        if not await self.lock_async():
            raise _destroyed(self.name)
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.unlock()

    def __repr__(self) -> str:
        return f"<Mutex {self.name!r}>"


class BoundMutex(Mutex, _ours=True):
    """A Mutex whose backend is fixed (``Domain.mutex``), not the process's."""

    __slots__ = ()

    def __init__(self, name: str, backend: Any) -> None:
        MutexBase.__init__(self, check_name(name), backend)

    @property
    def _backend(self) -> Any:
        return self._be


Mutex._py_hot = hot_methods(Mutex)
accelerate(Mutex)


def access(name: str) -> Mutex:
    """The mutex *name* (created unlocked on first use)."""
    return Mutex(name)


def destroy(name: str) -> None:
    """Remove the mutex *name* (its table entry on the native backend):
    waiting ``lock`` calls return False; a later use creates it again,
    unlocked.  A no-op when it does not exist."""
    ctx.mutex.destroy(check_name(name))
