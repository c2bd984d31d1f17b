"""The container environment: timers, messages, lookup, shutdown.

Call these from a container (hooks, timers, handlers).  ``send_message`` and
``system_shutdown`` also work in the controller process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ._context import ctx
from .container import Container, Timer
from .errors import NotInContainerError, check_interval, check_message


def _runtime(what: str) -> Any:
    rt = ctx.runtime
    if ctx.role != "container" or rt is None:
        raise NotInContainerError(f"cenv.{what}() must be called in a container (a hook, timer or handler)")
    return rt


def create_timer(callback: Callable[[Timer], bool | None | Awaitable[bool | None]],
                 interval: float) -> Timer:
    """Run ``callback(timer)`` on the container's loop every *interval*
    seconds while it returns True (an ``async def`` callback is awaited);
    False or an exception stops it.  Timers stop when the container ends."""
    if not callable(callback):
        raise TypeError(f"callback must be callable, not {type(callback).__name__}")
    interval = check_interval(interval)
    rt = _runtime("create_timer")
    t = Timer(rt, callback, interval)
    rt.timers[t.id] = t
    t._arm()
    return t


def cancel_timer(timer: Timer) -> None:
    if not isinstance(timer, Timer):
        raise TypeError(f"cancel_timer takes a Timer, not {type(timer).__name__}")
    timer.cancel()


def cancel_all_timers() -> None:
    rt = _runtime("cancel_all_timers")
    for t in list(rt.timers.values()):
        t.cancel()


def timers() -> list[Timer]:
    return list(_runtime("timers").timers.values())


def self_cont() -> Container:
    cont: Container = _runtime("self_cont").cont
    return cont


def send_message(pattern: str, name: str, args: Sequence[str] = ()) -> None:
    """Broadcast to ``receive_message`` in every container whose service
    name matches *pattern* (``*`` is a wildcard; the whole name must match)."""
    pattern, name, args = check_message(pattern, name, args)
    if ctx.role == "container":
        ctx.channel.notify("ctl.send_message", [pattern, name, args])
    elif ctx.role == "controller":
        ctx.controller.send_message(pattern, name, args)
    else:
        raise NotInContainerError("cenv.send_message() needs a running controller or container")


def lookup(service: str, protocol: str | None = None) -> str | None:
    """The Unix socket path of another service, or None if it has none.
    *protocol*, when given, must be "unix" (a service has one address)."""
    if not isinstance(service, str):
        raise TypeError(f"service must be a str, not {type(service).__name__}")
    if protocol is not None and protocol != "unix":
        return None
    if ctx.role is None or ctx.controller is None:
        raise NotInContainerError("cenv.lookup() needs a running controller or container")
    for s in ctx.controller.services:
        if s.name == service and s.address is not None and s.address.scheme == "unix":
            return str(s.address.path)
    return None


def system_shutdown() -> None:
    """Shut the whole system down (every container, then the controller)."""
    if ctx.role == "container":
        ctx.channel.notify("ctl.system_shutdown", [])
    elif ctx.role == "controller":
        ctx.controller.shutdown()
    else:
        raise NotInContainerError("cenv.system_shutdown() needs a running controller or container")
