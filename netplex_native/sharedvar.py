"""Shared variables, kept in the controller (RPC plugin ``plugin``).

Plain variables hold ``str``; ``enc=True`` ones any picklable object.

In a container every call is a round trip to the controller and blocks the
calling thread until it answers; in a handler (on the event loop) use the
awaitable forms, ``await create_var_async(...)``, ``set_value_async``,
``get_value_async``, ``delete_var_async``, ``wait_for_value_async``, which
let the loop serve its other connections meanwhile.
"""

from __future__ import annotations

from typing import Any

from ._context import ctx
from .loopcheck import warn_if_on_loop
from .rpc.sharedvar import SharedVarPlugin

plugin = SharedVarPlugin()


def create_var(name: str, *, own: bool = False, ro: bool = False, enc: bool = False,
               timeout: float | None = None) -> bool:
    """Create *name* (value ``""``, or None for enc); False if it exists.
    *own*: deleted with the last container of the creating service; *ro*:
    only that service may set it; *timeout*: deleted after that many seconds
    without a get or set."""
    return bool(ctx.var.create_var(name, own, ro, enc, timeout))


def set_value(name: str, value: Any) -> bool:
    """Set; False if the variable does not exist.  Raises
    SharedVarPermissionError / SharedVarTypeError."""
    return bool(ctx.var.set_value(name, value))


def get_value(name: str) -> Any:
    """The value, or None if the variable does not exist."""
    return ctx.var.get_value(name)


def delete_var(name: str) -> bool:
    """Delete; False if it did not exist."""
    return bool(ctx.var.delete_var(name))


def wait_for_value(name: str, timeout: float | None = None) -> Any:
    """The value at once if it was ever set, else the next value set; None
    if the variable is missing, deleted meanwhile, or on timeout."""
    if timeout != 0:
        warn_if_on_loop("sharedvar.wait_for_value", "await sharedvar.wait_for_value_async(...)")
    return ctx.var.wait_for_value(name, timeout)


async def wait_for_value_async(name: str, timeout: float | None = None) -> Any:
    """wait_for_value, awaitable: the loop keeps serving meanwhile."""
    return await ctx.var.wait_for_value_async(name, timeout)


async def create_var_async(name: str, *, own: bool = False, ro: bool = False, enc: bool = False,
                           timeout: float | None = None) -> bool:
    """create_var, awaitable."""
    return bool(await ctx.var.create_var_async(name, own, ro, enc, timeout))


async def set_value_async(name: str, value: Any) -> bool:
    """set_value, awaitable."""
    return bool(await ctx.var.set_value_async(name, value))


async def get_value_async(name: str) -> Any:
    """get_value, awaitable."""
    return await ctx.var.get_value_async(name)


async def delete_var_async(name: str) -> bool:
    """delete_var, awaitable."""
    return bool(await ctx.var.delete_var_async(name))
