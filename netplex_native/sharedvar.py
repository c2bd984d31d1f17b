"""Shared variables, kept in the controller (RPC plugin ``plugin``).

Plain variables hold ``str``; ``enc=True`` ones any picklable object.
"""

from __future__ import annotations

from typing import Any

from ._context import ctx
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
    return ctx.var.wait_for_value(name, timeout)


async def wait_for_value_async(name: str, timeout: float | None = None) -> Any:
    """``wait_for_value`` for handlers: waits without blocking the loop."""
    return await ctx.var.wait_for_value_async(name, timeout)
