"""Mutexes shared by the containers of one controller.

``access(name)`` returns a handle; ``lock``/``unlock`` or ``with``/``async
with``.  Not recursive; any container may unlock; waiters are served in
order; a mutex whose holder ends (even by SIGKILL) is unlocked.
"""

from __future__ import annotations

from ._context import ctx
from .rpc.sync import MutexPlugin
from .native.plugins import NativeMutexPlugin
from .errors import check_name

plugin = MutexPlugin()
native_plugin = NativeMutexPlugin()


try:
    from ._fast import MutexBase as _MutexBase, set_context as _set_context
except ImportError:
    class _MutexBase:
        """lock()/unlock() in Python (the accelerator is not built)."""

        __slots__ = ("name",)

        def __init__(self, name):
            self.name = name

        def lock(self, timeout=None):
            return ctx.mutex.lock(self.name, timeout)

        def unlock(self):
            ctx.mutex.unlock(self.name)
else:
    _set_context(ctx)


class Mutex(_MutexBase):
    """The mutex *name*.  ``lock(timeout=None) -> bool`` waits until locked
    (True) or *timeout* seconds (False); ``unlock()`` unlocks (a no-op when
    not locked)."""

    __slots__ = ()

    def __init__(self, name: str):
        super().__init__(check_name(name))

    async def lock_async(self, timeout: float | None = None) -> bool:
        """``lock`` for handlers: waits without blocking the container's loop."""
        return await ctx.mutex.lock_async(self.name, timeout)

    def unlock(self) -> None:
        """Unlock (a no-op when not locked)."""
        ctx.mutex.unlock(self.name)

    def __enter__(self) -> "Mutex":
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    async def __aenter__(self) -> "Mutex":
        await self.lock_async()
        return self

    async def __aexit__(self, *exc) -> None:
        self.unlock()

    def __repr__(self) -> str:
        return f"<Mutex {self.name!r}>"


def access(name: str) -> Mutex:
    """The mutex *name* (created unlocked on first use)."""
    return Mutex(name)


def destroy(name: str) -> None:
    """Remove the mutex *name* (its table entry on the native backend):
    waiting ``lock`` calls return False; a later use creates it again,
    unlocked.  A no-op when it does not exist."""
    ctx.mutex.destroy(check_name(name))
