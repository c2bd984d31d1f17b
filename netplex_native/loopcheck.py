"""A synchronous wait on an event loop's thread: warn once per call site.

A handler runs on its container's event loop; a synchronous wait there
(``semaphore.decrement(wait=True)``, ``Mutex.lock()``,
``sharedvar.wait_for_value``) blocks every connection of that container
until it returns.  The backends call :func:`warn_if_on_loop` just before
such a wait may block (not on the uncontended fast path): if the calling
thread runs an event loop, one warning is logged per call site (the first
frame outside this package), naming the awaitable form to use instead: a
handle's (``s.acquire()`` names ``await s.acquire_async(...)``).
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

#: (what, instead) by the kind code the native accelerator passes (csrc/fast/binder.c)
NATIVE_KINDS = {
    1: ("semaphore.decrement(wait=True)", "await semaphore.decrement_async(name, wait=True)"),
    2: ("Mutex.lock()", "await m.lock_async() or async with m"),
}


#: (what, instead) by the handle method the user called (the last frame of
#: this package before the call site): a handle's wait names the handle's form.
HANDLE_FORMS = {
    ("semaphore.py", "Semaphore.decrement"):
        ("Semaphore.decrement(wait=True)", "await s.decrement_async(wait=True, ...)"),
    ("semaphore.py", "Semaphore.acquire"): ("Semaphore.acquire()", "await s.acquire_async(...)"),
    ("semaphore.py", "Semaphore.__enter__"): ("'with' on a Semaphore", "async with s"),
    ("mutex.py", "Mutex.lock"): ("Mutex.lock()", "await m.lock_async() or async with m"),
    ("mutex.py", "Mutex.acquire"): ("Mutex.acquire()", "await m.acquire_async() or async with m"),
    ("mutex.py", "Mutex.__enter__"): ("'with' on a Mutex", "async with m"),
}


def _call_site():
    """(file, line) of the first frame outside this package, and the
    (file name, qualified name) of the package's frame it called."""
    f = sys._getframe(2)
    api = None
    while f is not None and (f.f_code.co_filename.startswith(_PKG)
                             or f.f_code.co_filename.startswith("<frozen")):
        if f.f_code.co_filename.startswith(_PKG):
            api = (os.path.basename(f.f_code.co_filename), f.f_code.co_qualname)
        f = f.f_back
    if f is None:
        return ("?", 0), api
    return (f.f_code.co_filename, f.f_lineno), api


def warn_if_on_loop(what: str, instead: str) -> tuple[str, int] | None:
    """Log a warning, once per call site, if the calling thread runs an event loop.
    Returns the call site (file, line) when a loop runs, else None."""
    if _get_running_loop() is None:
        return None
    site, api = _call_site()
    if site in _warned:
        return site
    _warned.add(site)
    what, instead = HANDLE_FORMS.get(api, (what, instead))
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
