"""The native plugins: semaphores and mutexes in the controller's shared-memory
segment (``_native.Domain``), a drop-in for the RPC plugins.

Controller side: the domain plugin creates the segment when added (before any
fork), removes segments left by dead controllers, calls ``recover(pid)`` for
every reaped container (before ``post_finish_hook``), and unlinks the segment
at shutdown.  Recovery never blocks the controller's loop: it runs with a zero
timeout, and what cannot finish now (an internal guard held by a stopped
process, liveness that cannot be told at the fd limit) is retried from a timer
with back-off until it does; nothing is lost meanwhile.  Process side: the backends call the core directly; awaitable waits
(``*_async``) queue an async waiter record and cost no thread (asyncwait.py).
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import NativeUnavailableError, WouldBlockError, check_timeout
from ..plugin import Plugin
from . import asyncwait as _aw, domain as _nd   # now: an await at the fd limit imports nothing

log = logging.getLogger("netplex_native")


class NativeDomainPlugin(Plugin):
    """Owns the segment of one controller."""

    name = "native"

    def ctrl_added(self, ctrl) -> None:
        if ctrl.plugin_data(self) is not None:
            return
        try:
            from . import domain as _native
        except ImportError as e:
            raise NativeUnavailableError(
                f"the native core is not built ({e}); reinstall with a C compiler, "
                f"or use the RPC plugins (semaphore.plugin, mutex.plugin)") from e
        if not _native.available():
            raise NativeUnavailableError("the native core (netplex_native._core) is not built; "
                                         "reinstall with a C compiler or use the RPC plugins")
        self._sweep()
        dom = _native.Domain.create(**ctrl.native_config)
        ctrl.set_plugin_data(self, dom)
        log.info("native segment %s created (%d bytes)", dom.name, dom.size)

    @staticmethod
    def _sweep() -> None:
        """Remove segments nobody may still use (segment.c, G4)."""
        from . import domain as _native
        for stale in _native.Domain.remove_stale():
            log.warning("removed shared-memory segment %s left by a dead controller", stale)

    def ctrl_started(self, ctrl) -> None:
        # A segment is stale only once its creator and every process
        # registered in it are certainly dead; the containers of a controller
        # that was SIGKILLed may still be exiting when we start (a zombie
        # whose other threads still run counts as alive, I4): look again.
        loop = ctrl._loop
        if loop is not None and ctrl.plugin_data(self) is not None:
            for delay in (2.0, 20.0):
                loop.call_later(delay, self._sweep)

    def ctrl_container_reaped(self, ctrl, rec) -> None:
        self._recover(ctrl, rec.pid, 0.01)

    def ctrl_container_stopping(self, ctrl, rec) -> None:
        """A semaphore's first waiter sleeps without a timeout (A3u of
        csrc/acquire.c): wake the container's waits so that its
        interrupt_check sees the stop.  A container not registered yet in
        the segment is marked when it is (tried again while it lives)."""
        dom = ctrl.plugin_data(self)
        loop = ctrl._loop
        if dom is None or not rec.alive:
            return
        try:
            marked = dom.interrupt_waits(rec.pid)
        except Exception:
            log.exception("interrupt_waits(%d) failed", rec.pid)
            return
        if not marked and loop is not None and not loop.is_closed():
            loop.call_later(0.05, self.ctrl_container_stopping, ctrl, rec)

    def _recover(self, ctrl, pid: int, delay: float) -> None:
        dom = ctrl.plugin_data(self)
        if dom is None:
            return
        try:
            done = dom.recover(pid, timeout=0) >= 0
        except Exception:
            log.exception("recover(%d) failed; retrying", pid)
            done = False
        loop = ctrl._loop
        if done or loop is None or loop.is_closed():
            return
        if delay >= 0.5:
            log.warning("recovery of pid %d cannot finish yet (a process stopped inside the "
                        "core?); retrying every %.1f s", pid, min(delay * 2, 2.0))
        loop.call_later(delay, self._recover, ctrl, pid, min(delay * 2, 2.0))

    def ctrl_unplugged(self, ctrl) -> None:
        dom = ctrl.plugin_data(self)
        if dom is not None:
            dom.unlink()
            dom.close()
            ctrl.set_plugin_data(self, None)

    def inspect(self, ctrl) -> dict:
        dom = ctrl.plugin_data(self)
        return {"segment": dom.name, "size": dom.size, "config": dom.config,
                "semaphores": dom.semaphores(), "mutexes": dom.mutexes(),
                "processes": dom.processes()}


domain_plugin = NativeDomainPlugin()


class NativeSemaphorePlugin(Plugin):
    name = "semaphore.native"
    provides = "semaphore"
    required = (domain_plugin,)

    def backend(self, ctrl, role):
        return _NativeSem(ctrl.plugin_data(domain_plugin), role)


class NativeMutexPlugin(Plugin):
    name = "mutex.native"
    provides = "mutex"
    required = (domain_plugin,)

    def backend(self, ctrl, role):
        return _NativeMutex(ctrl.plugin_data(domain_plugin), role)


class _NativeSem:
    """The semaphore backend over a Domain.  In containers the operations are
    the Domain's own methods (no extra Python layer on the hot path); in the
    controller a wait that would block raises WouldBlockError instead."""

    def __init__(self, dom: Any, role: str) -> None:
        self._dom = dom
        self.increment = dom.sem_increment
        self.add = dom.sem_add
        self.get = dom.sem_get
        self.destroy = dom.sem_destroy
        #: The accelerator's Binder whose methods increment and decrement are
        #: (csrc/fast/public_functions.c, R2): public calls then go to it directly.
        self._fast_binder = None
        if role == "container":
            self.decrement = dom.sem_decrement
            self._fast_binder = dom._binder

    def create(self, name: str, initial: int, protected: bool) -> bool:
        return bool(self._dom.sem_create(name, initial, protected=protected))

    def decrement(self, name, wait=False, timeout=None):
        if wait is not True and wait is not False:  # checked before anything is taken
            raise TypeError(f"wait must be a bool, not {type(wait).__name__}")
        timeout = check_timeout(timeout)
        r = self._dom.sem_decrement(name)
        if r < 0 and wait is True and timeout != 0:
            raise WouldBlockError("decrement(wait=True) would block the controller's loop; "
                                  "wait in a container instead")
        return r

    async def decrement_async(self, name, wait=False, timeout=None):
        if wait is not True:
            return self.decrement(name, wait, timeout)
        timeout = check_timeout(timeout)   # before the fast path takes a count
        r = self._dom.sem_decrement(name)  # free now: no thread needed
        if r >= 0 or timeout == 0:
            return r
        return await _aw.waits_of(self._dom).acquire(_nd._SEM, name, timeout)


class _NativeMutex:
    def __init__(self, dom: Any, role: str) -> None:
        self._dom = dom
        self.unlock = dom.mutex_unlock          # (name, force=False)
        self.token = dom.mutex_token
        self.locked = dom.mutex_locked
        self.destroy = dom.mutex_destroy
        self._fast_binder = None                # as _NativeSem's: lock and unlock
        if role == "container":
            self.lock = dom.mutex_lock
            self._fast_binder = dom._binder

    def lock(self, name, timeout=None):
        timeout = check_timeout(timeout)  # before the fast path takes the lock
        if self._dom.mutex_trylock(name):
            return True
        if timeout == 0:
            return False
        raise WouldBlockError("lock() on a held mutex would block the controller's loop")

    async def lock_async(self, name, timeout=None):
        timeout = check_timeout(timeout)  # before the fast path takes the lock
        if self._dom.mutex_trylock(name):
            return True
        if timeout == 0:
            return False
        return await _aw.waits_of(self._dom).acquire(_nd._MTX, name, timeout) == 0
