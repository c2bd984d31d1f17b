"""Counting semaphores shared by the containers of one controller.

Backends: ``plugin`` (RPC: state in the controller) or ``native_plugin``
(shared memory, no system call when uncontended).  Add exactly one in
``post_add_hook``; the functions below are the same for both.

A missing semaphore is created implicitly, at 0, protected.  Protected: what a
container took (decrements minus increments) is given back when it ends,
however it ends, and waiters are woken.
"""

from __future__ import annotations

from ._context import ctx, forward
from .rpc.sync import SemaphorePlugin
from .native.plugins import NativeSemaphorePlugin

plugin = SemaphorePlugin()
native_plugin = NativeSemaphorePlugin()


def create(name: str, initial: int = 0, *, protected: bool = False) -> bool:
    """Create *name* with value *initial*; True if created, False if it
    already existed (then *initial* and *protected* are ignored)."""
    return ctx.sem.create(name, initial, protected)


@forward("sem", ("name",))
def increment(name: str) -> int:
    """+1; returns the new value."""
    return ctx.sem.increment(name)


@forward("sem", ("name", "wait", "timeout"), (False, None))
def decrement(name: str, *, wait: bool = False, timeout: float | None = None) -> int:
    """-1 if the value is positive; returns the new value.  At 0: -1 without
    *wait*; with *wait*, blocks until positive, or until *timeout* seconds
    (-1), or until the semaphore is destroyed (-1).  Waiters are served in
    order of arrival (native: a newcomer may overtake waiters queued for
    less than 1 ms)."""
    return ctx.sem.decrement(name, wait, timeout)


async def decrement_async(name: str, *, wait: bool = False, timeout: float | None = None) -> int:
    """``decrement`` for handlers: waits without blocking the container's loop."""
    return await ctx.sem.decrement_async(name, wait, timeout)


@forward("sem", ("name",))
def get(name: str) -> int:
    """The current value."""
    return ctx.sem.get(name)


def destroy(name: str) -> None:
    """Remove the semaphore; waiting ``decrement`` calls return -1."""
    ctx.sem.destroy(name)
