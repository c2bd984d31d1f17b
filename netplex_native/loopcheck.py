"""A synchronous wait on an event loop's thread: warn once per call site.

A handler runs on its container's event loop; a synchronous wait there
(``semaphore.decrement(wait=True)``, ``Mutex.lock()``,
``sharedvar.wait_for_value``) blocks every connection of that container
until it returns.  The backends call :func:`warn_if_on_loop` just before
such a wait may block (not on the uncontended fast path): if the calling
thread runs an event loop, one warning is logged per call site (the first
frame outside this package), naming the awaitable form to use instead.
Runs in any process; costs one C call when no loop runs.
"""

from __future__ import annotations

import logging
import os
import sys
from asyncio import _get_running_loop

log = logging.getLogger("netplex_native")

_PKG = os.path.dirname(os.path.abspath(__file__)) + os.sep
_warned: set = set()

#: (what, instead) by the kind code the native accelerator passes (csrc/fast.c)
NATIVE_KINDS = {
    1: ("semaphore.decrement(wait=True)", "await semaphore.decrement_async(name, wait=True)"),
    2: ("Mutex.lock()", "await mutex.access(name).lock_async() or async with"),
}


def _call_site():
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename.startswith(_PKG)
                             or f.f_code.co_filename.startswith("<frozen")):
        f = f.f_back
    if f is None:
        return ("?", 0)
    return (f.f_code.co_filename, f.f_lineno)


def warn_if_on_loop(what: str, instead: str) -> tuple[str, int] | None:
    """Log a warning, once per call site, if the calling thread runs an event loop.
    Returns the call site (file, line) when a loop runs, else None."""
    if _get_running_loop() is None:
        return None
    site = _call_site()
    if site in _warned:
        return site
    _warned.add(site)
    log.warning("%s:%d: %s on the event loop's thread blocks every connection of this "
                "container while it waits; use %s", site[0], site[1], what, instead)
    return site


def native_block_hook(kind: int) -> bool:
    """Called by the native backend (and the accelerator) before a wait that may block.
    True when the call site it reported is its caller's own line: the accelerator
    then skips later calls from that line (they would report nothing new)."""
    if _get_running_loop() is None:
        return False
    site = warn_if_on_loop(*NATIVE_KINDS.get(kind, ("a synchronous wait", "its *_async form")))
    caller = sys._getframe(1)
    return site == (caller.f_code.co_filename, caller.f_lineno)
