"""Python face of the native core (``netplex_native._core``, built from csrc/*.c; csrc/core_internal.h maps the files).

A :class:`Domain` is one shared-memory segment holding semaphores, mutexes and the
process/thread tables that make them crash-safe.  Names are looked up once per process
and the handle is cached; a handle whose object was destroyed (``NP_ESTALE``) is looked
up again.  Every negative return code becomes an exception in :func:`_check`.

Blocking waits call the C function repeatedly: it sleeps at most one 100 ms slice and
returns ``NP_EINTR`` still queued, so Python signal handlers (Ctrl-C) run between
slices.  The first waiter of a semaphore without a timeout, in a thread other than
the main one, sleeps until it is woken, as ``sem_wait`` does (``NP_FOREVER``); the main
thread, where Python runs signal handlers, and a wait with a ``cancel`` keep the slices
(``NP_SLICED``).  A supervisor that stops the process calls ``interrupt_waits(pid)`` so
that ``interrupt_check`` is asked.  Whatever ends a wait early (an exception, ``cancel``) leaves the queue with
``np_wait_cancel``, so an interrupted wait leaves nothing behind.  Any call may also
return ``NP_EINTR`` when an internal guard is held by a stopped process for a whole
slice; every call site here calls again, so Ctrl-C works there too.

Awaitable waits (``asyncwait.py``) queue an *async waiter record* of the segment
instead of a thread: ``create(waiters=..., waiter_quota=...)`` sizes that table and
bounds what one process may hold.

``close()`` is a process leaving the domain: waits in other threads end (they raise
SegmentError), what the process held through this Domain is given back as if it had
died, its table entries are freed, and only then is the memory unmapped.

Thread-safe: the C side gives each thread its own actor; the handle caches are plain
dicts whose single operations are atomic under the GIL.  Nothing here depends on the
pid: after ``fork()`` the child keeps using the same Domain and registers itself.
"""

from __future__ import annotations

import os
import secrets
import threading
import time

from .. import errors

try:
    from .._core import ffi as _ffi, lib as _lib
except ImportError as _e:  # pragma: no cover - exercised only without a build
    _ffi = _lib = None
    _import_error = _e
else:
    _import_error = None

from ..loopcheck import native_block_hook as _block_hook

try:  # the accelerator of the uncontended operations (csrc/fast/); optional
    from .. import _fast
except ImportError:  # pragma: no cover - a build without it uses closures
    _fast = None
else:
    from asyncio import _get_running_loop
    _fast.set_block_hook(_block_hook, _get_running_loop)

__all__ = ["available", "Domain"]


def _main_thread() -> bool:
    """Python runs signal handlers in this thread only: its waits keep their
    slices (NP_SLICED), so that a signal always reaches its handler."""
    return threading.current_thread() is threading.main_thread()

if _lib is not None:
    _NOWAIT = _lib.NP_NOWAIT
    _TRY = _lib.NP_TRY
    _FOREVER = _lib.NP_FOREVER
    # No deadline, but back every slice (netplex_core.h): the main thread, whose
    # signal handlers must run, and a wait with a ``cancel`` to poll; only
    # NP_FOREVER lets a semaphore's first waiter sleep untimed (A3u).
    _SLICED = _lib.NP_SLICED
    _EAGAIN = _lib.NP_EAGAIN
    _ETIMEDOUT = _lib.NP_ETIMEDOUT
    _EINTR = _lib.NP_EINTR
    _EDESTROYED = _lib.NP_EDESTROYED
    _ESTALE = _lib.NP_ESTALE
    _ECLOSED = _lib.NP_ECLOSED
    _ENOTHOLDER = _lib.NP_ENOTHOLDER
    _ENOENT = _lib.NP_ENOENT
    _EEXIST = _lib.NP_EEXIST
    _SEM = _lib.NP_KIND_SEM
    _MTX = _lib.NP_KIND_MUTEX
    _CREATE = _lib.NP_CREATE
    _EXCL = _lib.NP_EXCL
    _PROTECTED = _lib.NP_PROTECTED
    _TABLES = {
        _lib.NP_ENOSPC_SEM: ("semaphore", "semaphores"),
        _lib.NP_ENOSPC_MTX: ("mutex", "mutexes"),
        _lib.NP_ENOSPC_PROC: ("process", "processes"),
        _lib.NP_ENOSPC_ACT: ("thread (actor)", "actors"),
        _lib.NP_ENOSPC_WAIT: ("async waiter", "waiters"),
    }
    _SEGMENT_CODES = {
        _lib.NP_EBADSEG: "not a netplex segment, or one of another layout version",
        _lib.NP_ECORRUPT: "the segment failed a consistency check",
    }

#: Names whose handles one Domain keeps, per kind.  A handle of a name that
#: another process destroyed stays cached until it is used (it is then stale
#: and looked up again); past this many the cache starts over (every entry
#: is only a shortcut), so a churn of distinct names (per-user rate limiters)
#: costs no memory that grows with it.
HANDLE_CACHE_MAX = 65536

_KIND_NAMES = {1: "semaphore", 2: "mutex"}
_PROC_STATES = {0: "free", 1: "alive", 2: "recovering", 3: "registering"}


def available() -> bool:
    """True if the compiled core is importable."""
    return _lib is not None


def _require() -> None:
    if _lib is None:
        raise errors.NativeUnavailableError(
            f"the native core netplex_native._core is not built ({_import_error}); "
            "reinstall with a C compiler and the Python headers (e.g. apt-get install gcc python3-dev)")


class _Busy(Exception):
    """An internal guard stayed held (by a stopped process) past the call's deadline."""


def _check(rc: int, dom: "Domain | None" = None, name: str | None = None, kind: int = 0) -> int:
    """Return rc if it is >= 0, else raise the exception that the code means."""
    if rc >= 0:
        return rc
    raise _error(rc, dom, name, kind)


def _error(rc, dom, name, kind):
    if rc == _lib.NP_ENOSPC_WAIT:
        cfg = dom.config if dom is not None else {}
        return errors.TableFullError(
            f"no async waiter record free: this process may hold {cfg.get('waiter_quota', '?')} "
            f"(waiter_quota) of the {cfg.get('waiters', '?')} (waiters) of the segment; nothing "
            f"was changed.  Create the domain with more: native_config={{'waiters': ..., "
            f"'waiter_quota': ...}}")
    if rc in _TABLES:
        what, key = _TABLES[rc]
        cap = dom.config.get(key) if dom is not None else "?"
        seg = f" of segment {dom.name}" if dom is not None else ""
        return errors.TableFullError(
            f"the {what} table{seg} is full ({cap} {key}); nothing was changed. "
            f"Create the domain with a larger capacity: Domain.create({key}=...)")
    if rc == _lib.NP_EINVAL:
        return ValueError(f"invalid argument (name {name!r})" if name is not None else "invalid argument")
    if rc == _lib.NP_EKIND:
        this = _KIND_NAMES.get(kind, "object")
        other = "mutex" if kind == _SEM else "semaphore"
        return ValueError(f"name {name!r} is a {other}, not a {this}")
    if rc == _lib.NP_ESYS:
        e = _ffi.errno
        seg = dom.name if dom is not None else name
        return errors.SegmentError(e, f"{os.strerror(e)} (native segment {seg})")
    if rc in _SEGMENT_CODES:
        seg = dom.name if dom is not None else name
        return errors.SegmentError(f"{_SEGMENT_CODES[rc]}: {seg}")
    if rc == _lib.NP_EOVERFLOW:
        return OverflowError(f"semaphore {name!r} would exceed {errors.VALUE_MAX}")
    if rc == _lib.NP_EBUSY:
        return errors.NestedWaitError(
            f"this thread is already waiting for another semaphore or mutex (a signal handler "
            f"that runs during a wait may take {name!r} without waiting, not wait for it); "
            f"nothing was taken")
    if rc == _lib.NP_ENOTHOLDER:
        return errors.NotHolderError(
            f"mutex {name!r} is not held by this process (pid {os.getpid()}): nothing was "
            f"unlocked; unlock(force=True) frees it whoever holds it")
    if rc == _lib.NP_ECLOSED:
        seg = dom.name if dom is not None else "?"
        return errors.SegmentError(f"native segment {seg} is closed")
    return errors.NetplexError(f"native core error {rc} (name {name!r})")


class Domain:
    """One shared-memory segment of semaphores and mutexes (see the module doc)."""

    def __init__(self, d, name: str):
        # Use create() or attach().
        self._d = d
        self.name = name
        self.size = int(_lib.np_domain_size(d))
        c = _ffi.new("np_config *")
        _lib.np_domain_config(d, c)
        self.config = {"semaphores": c.semaphores, "mutexes": c.mutexes,
                       "processes": c.processes, "actors": c.actors,
                       "waiters": c.waiters, "waiter_quota": min(c.waiter_quota or c.waiters, c.waiters)}
        self._sems: dict[str, int] = {}
        self._mtxs: dict[str, int] = {}
        #: Called between wait slices (at most every 100 ms, or when the
        #: supervisor calls interrupt_waits for this process) in any waiting
        #: thread; True ends the wait as a timeout would.  A supervisor uses it
        #: to end waits at shutdown.
        self.interrupt_check = None
        self._binder = None
        self._stopping = False              # stop_waits()
        self._aw = None                  # asyncwait.AsyncWaits of this process
        self._bind_fast_paths()

    def _bind_fast_paths(self) -> None:
        """Per-instance entry points for the uncontended operations.

        With the accelerator (_fast, csrc/fast/binder.c) the four non-blocking
        cases are C methods that look the handle up and call the core with
        no cffi overhead; otherwise Python closures do the same with locals
        instead of attribute and global lookups.  ``decrement(wait=True)``
        without a timeout makes its first wait slice directly.  Anything else
        (a miss, a stale handle, a timeout, an error) goes to the methods
        below.  close() empties the caches, so an entry point kept after
        close() falls through to a method that raises."""
        d, sems, mtxs = self._d, self._sems, self._mtxs
        c_inc, c_dec, c_cancel = _lib.np_sem_increment, _lib.np_sem_decrement, _lib.np_wait_cancel
        c_lock, c_unlock = _lib.np_mutex_lock, _lib.np_mutex_unlock
        slow_inc = Domain.sem_increment.__get__(self)
        slow_dec = Domain.sem_decrement.__get__(self)
        slow_lock = Domain.mutex_lock.__get__(self)
        slow_unlock = Domain.mutex_unlock.__get__(self)
        nowait, forever, sliced, eintr, edestroyed = _NOWAIT, _FOREVER, _SLICED, _EINTR, _EDESTROYED

        def sem_decrement(name, wait=False, timeout=None, *, cancel=None):
            h = sems.get(name)
            if h is not None and timeout is None and cancel is None:
                if wait is False:
                    rc = c_dec(d, h, nowait)
                    if rc >= 0:
                        return rc
                elif wait is True:
                    rc = c_dec(d, h, nowait)
                    if rc >= 0:
                        return rc
                    _block_hook(1)
                    try:
                        # one slice (A3u: or until woken, off the main thread)
                        rc = c_dec(d, h, sliced if _main_thread() else forever)
                        if rc >= 0:
                            return rc
                        if rc == edestroyed:
                            return -1
                        if rc == eintr:                # still queued: keep the place
                            return slow_dec(name, True)
                    except BaseException:
                        c_cancel(d)
                        raise
            return slow_dec(name, wait, timeout, cancel=cancel)

        if _fast is not None:
            b = _fast.Binder(
                int(_ffi.cast("uintptr_t", d)),
                *(int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, f))) for f in (
                    "np_fast_sem_decrement", "np_fast_sem_increment", "np_fast_mutex_lock",
                    "np_fast_mutex_unlock", "np_fast_wait_cancel",
                    "np_sem_decrement", "np_mutex_lock")),
                sems, mtxs, slow_dec, slow_inc, slow_lock, slow_unlock)
            self._binder = b
            self.sem_decrement = b.sem_decrement
            self.sem_increment = b.sem_increment
            self.mutex_lock = b.mutex_lock
            self.mutex_unlock = b.mutex_unlock
            return

        def sem_increment(name):
            h = sems.get(name)
            if h is not None:
                rc = c_inc(d, h)
                if rc >= 0:
                    return rc
            return slow_inc(name)

        def mutex_lock(name, timeout=None, *, cancel=None):
            if timeout is None:
                h = mtxs.get(name)
                if h is not None and c_lock(d, h, nowait) == 0:
                    return True
            return slow_lock(name, timeout, cancel=cancel)

        def mutex_unlock(name, force=False):
            if force is False:
                h = mtxs.get(name)
                if h is not None and c_unlock(d, h) == 0:
                    return None
            return slow_unlock(name, force)

        self.sem_decrement = sem_decrement
        self.sem_increment = sem_increment
        self.mutex_lock = mutex_lock
        self.mutex_unlock = mutex_unlock

    # ---- lifecycle -------------------------------------------------------

    @classmethod
    def create(cls, *, semaphores=1024, mutexes=1024, processes=256, actors=None, waiters=8192,
               waiter_quota=None, name=None) -> "Domain":
        """``waiters``: async waiter records (one per coroutine awaiting a
        wait, asyncwait.py); ``waiter_quota``: how many one process may hold
        at once (default: half of ``waiters``; at most ``waiters``).  The
        quota bounds one process only: k processes at their quota hold
        k * waiter_quota records, so two at the default fill the table."""
        _require()
        semaphores = errors.check_int(semaphores, "semaphores", 0, 2**28)
        mutexes = errors.check_int(mutexes, "mutexes", 0, 2**28)
        processes = errors.check_int(processes, "processes", 1, 2**20)
        actors = errors.check_int(4 * processes if actors is None else actors, "actors", 1, 2**19)
        waiters = errors.check_int(waiters, "waiters", 0, 2**19)
        waiter_quota = errors.check_int(max(1, waiters // 2) if waiter_quota is None else waiter_quota,
                                        "waiter_quota", 1, max(1, waiters))
        name = _segment_name(name)
        cfg = _ffi.new("np_config *", {"semaphores": semaphores, "mutexes": mutexes,
                                       "processes": processes, "actors": actors,
                                       "waiters": waiters, "waiter_quota": waiter_quota})
        out = _ffi.new("np_domain **")
        _check(_lib.np_domain_create(name.encode(), cfg, out), None, name)
        return cls(out[0], name)

    @classmethod
    def attach(cls, name) -> "Domain":
        _require()
        name = _segment_name(name)
        out = _ffi.new("np_domain **")
        _check(_lib.np_domain_attach(name.encode(), out), None, name)
        return cls(out[0], name)

    @staticmethod
    def remove_stale(prefix="netplex-") -> list[str]:
        """Unlink our segments in /dev/shm that nobody may still use: their
        creator (pid + start time) and every process registered in them are
        certainly dead (segment.c, G4)."""
        _require()
        removed = []
        try:
            entries = os.listdir("/dev/shm")
        except OSError:
            return removed
        out = _ffi.new("np_domain **")
        for entry in entries:
            if not entry.startswith(prefix):
                continue
            name = "/" + entry
            if _lib.np_domain_attach(name.encode(), out) < 0:
                continue                      # not ours, or not readable by us
            d = out[0]
            try:
                dead = not _lib.np_domain_in_use(d)
            finally:
                _lib.np_domain_close(d)
            if dead and _lib.np_domain_unlink(name.encode()) == 0:
                removed.append(name)
        return removed

    def creator_alive(self) -> bool:
        """False only when the process that created the segment is certainly gone."""
        return bool(_lib.np_domain_creator_alive(self._dom()))

    def close(self) -> None:
        """Leave the domain and unmap it (the segment stays).  Waits in progress in
        other threads end with SegmentError; what this process held through this
        Domain (protected counts, mutexes) is given back, as if it had died; its
        table entries are freed.  The Domain is unusable afterwards."""
        d, self._d = self._d, None
        if self._aw is not None:
            self._aw.closing()
        if self._binder is not None:
            self._binder.close()
        self._sems.clear()
        self._mtxs.clear()
        if d is not None:
            _lib.np_domain_close(d)

    def unlink(self) -> None:
        """Remove the segment's name (idempotent); mappings stay valid."""
        rc = _lib.np_domain_unlink(self.name.encode())
        if rc < 0 and _ffi.errno != 2:  # ENOENT: already gone
            _check(rc, self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<netplex Domain {self.name} {self.config}>"

    def _dom(self):
        if self._d is None:
            raise errors.SegmentError(f"native segment {self.name} is closed")
        return self._d

    # ---- supervisor contract --------------------------------------------

    def register(self) -> None:
        _check(_lib.np_register(self._dom()), self)

    def recover(self, pid: int, timeout=None) -> int:
        """After reaping pid: give back what it held.  Returns the number of process
        slots recovered (0: nothing to do), or -1 when ``timeout`` passed first — a
        guard held by a stopped process, or liveness that cannot be told now (EMFILE):
        call again later; nothing is lost meanwhile.  ``timeout=None`` keeps trying
        (Ctrl-C interrupts); a supervisor's event loop passes 0 and retries."""
        pid = errors.check_int(pid, "pid", 1, 2**31 - 1)
        end = None if timeout is None else self._deadline(timeout)
        pause = 0.001
        while True:
            now = _lib.np_now()
            dl = now + 100_000_000 if end is None else end
            rc = _lib.np_recover(self._dom(), pid, dl)
            if rc != _EAGAIN:
                return _check(rc, self)
            if end is not None and _lib.np_now() >= end:
                return -1
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def interrupt_waits(self, pid: int) -> int:
        """A supervisor is about to stop *pid*: its waits sleep in slices from now
        on, and one asleep without a timeout (the first waiter of a semaphore)
        returns to Python, so that the process's ``interrupt_check`` is asked
        again.  Returns the number of process slots marked; 0 when pid is not
        registered (yet): call again later."""
        pid = errors.check_int(pid, "pid", 1, 2**31 - 1)
        return _check(_lib.np_interrupt_waits(self._dom(), pid), self)

    def stop_waits(self) -> None:
        """This process's blocking waits end from now on as a timeout 0
        would (a free unit or the free mutex is still taken); the waits in
        progress end at their next look at ``interrupt_check`` (a supervisor
        wakes them with ``interrupt_waits``).  For a container whose end has
        begun (container.py).  Not undone."""
        self._stopping = True
        if self._binder is not None:
            self._binder.stop_waiting()

    def cancel_waits(self) -> None:
        _check(_lib.np_wait_cancel(self._dom()), self)

    def thread_detach(self) -> None:
        """Free the calling thread's actor (optional; at thread exit)."""
        _check(_lib.np_thread_detach(self._dom()), self)

    # ---- handles ---------------------------------------------------------

    def _handle(self, kind, name, create=True, deadline=None):
        """Handle of name (cached), created as the implicit semantics say.
        None when missing and create is False.  The lookup waits for the name
        table's internal guard (held by a stopped process, say) in slices until
        ``deadline`` (None: forever; _TRY: a few ms) and then raises _Busy."""
        cache = self._sems if kind == _SEM else self._mtxs
        h = cache.get(name)
        if h is not None:
            return h
        name = errors.check_name(name)
        flags = (_CREATE | _PROTECTED) if create else 0
        bname = name.encode()
        dl = _NOWAIT if deadline is None or deadline == _FOREVER else deadline
        rc = _lib.np_lookup(self._dom(), kind, bname, flags, 0, dl)
        while rc == _EINTR:                # the name guard's holder is stopped
            rc = _lib.np_lookup(self._dom(), kind, bname, flags, 0, dl)
        if rc in (_ETIMEDOUT, _EAGAIN):
            raise _Busy()
        if rc == _ENOENT and not create:
            return None
        _check(rc, self, name, kind)
        if len(cache) >= HANDLE_CACHE_MAX:
            cache.clear()
        cache[name] = rc
        return rc

    def _call(self, kind, name, fn, *args, create=True, lookup=None):
        """fn(d, handle, *args), looking the name up again after NP_ESTALE.
        Returns None when the name is missing and create is False.  NP_EINTR
        (an internal guard's holder is stopped) means call again."""
        cache = self._sems if kind == _SEM else self._mtxs
        while True:
            h = self._handle(kind, name, create, lookup)
            if h is None:
                return None
            rc = fn(self._dom(), h, *args)
            while rc == _EINTR:            # a guard's holder is stopped: call again
                rc = fn(self._dom(), h, *args)
            if rc != _ESTALE:
                return rc
            cache.pop(name, None)

    def _deadline(self, timeout):
        """Absolute CLOCK_MONOTONIC ns; NP_FOREVER for None, inf, or anything past it."""
        timeout = errors.check_timeout(timeout)
        if timeout is None:
            return _FOREVER
        now = _lib.np_now()
        if timeout >= (_FOREVER - now) / 1e9:
            return _FOREVER
        return now + int(timeout * 1e9)

    def _wait(self, kind, name, fn, deadline, cancel):
        """Blocking acquire: repeat fn while it returns NP_EINTR; leave the queue
        if anything (Ctrl-C, cancel) ends the wait early."""
        cache = self._sems if kind == _SEM else self._mtxs
        d = self._dom()
        if self._stopping:                  # stop_waits: no wait any more
            deadline = _NOWAIT
        elif deadline == _FOREVER and (cancel is not None or _main_thread()):
            deadline = _SLICED
        try:
            while True:
                try:
                    h = self._handle(kind, name, True, deadline)
                except _Busy:
                    return _ETIMEDOUT
                rc = fn(d, h, deadline)
                while rc == _EINTR:
                    if (cancel is not None and cancel.is_set()) or (
                            self.interrupt_check is not None and self.interrupt_check()):
                        _lib.np_wait_cancel(d)
                        return _ETIMEDOUT
                    rc = fn(d, h, deadline)
                if rc != _ESTALE:
                    return rc
                cache.pop(name, None)
        except BaseException:
            _lib.np_wait_cancel(d)
            raise

    # ---- semaphores ------------------------------------------------------

    def sem_create(self, name, initial=0, *, protected=False) -> bool:
        """Create name with initial; True if created, False if it existed."""
        name = errors.check_name(name)
        initial = errors.check_int(initial, "initial")
        protected = errors.check_bool(protected, "protected")
        flags = _CREATE | _EXCL | (_PROTECTED if protected else 0)
        rc = _lib.np_lookup(self._dom(), _SEM, name.encode(), flags, initial, _NOWAIT)
        while rc == _EINTR:
            rc = _lib.np_lookup(self._dom(), _SEM, name.encode(), flags, initial, _NOWAIT)
        if rc == _EEXIST:
            return False
        h = _check(rc, self, name, _SEM)
        if len(self._sems) >= HANDLE_CACHE_MAX:
            self._sems.clear()
        self._sems[name] = h
        return True

    def sem_increment(self, name) -> int:
        h = self._sems.get(name)
        if h is not None and self._d is not None:
            rc = _lib.np_sem_increment(self._d, h)
            if rc >= 0:
                return rc
        return _check(self._call(_SEM, name, _lib.np_sem_increment), self, name, _SEM)

    def sem_add(self, name, n) -> int:
        """n units at once (n >= 1), in one transaction (np_sem_add): the new value."""
        n = errors.check_int(n, "n", 1)
        return _check(self._call(_SEM, name, _lib.np_sem_add, n), self, name, _SEM)

    def sem_decrement(self, name, wait=False, timeout=None, *, cancel=None) -> int:
        """The new value, or -1 when nothing was taken (0 without wait, timeout,
        destroyed while waiting, cancel set)."""
        if timeout is not None:
            errors.check_timeout(timeout)  # before a fast path takes anything
        if wait is False:
            h = self._sems.get(name)
            if h is not None and self._d is not None:
                rc = _lib.np_sem_decrement(self._d, h, _NOWAIT)
                if rc >= 0:
                    return rc
                if rc == _EAGAIN:
                    return -1
            try:
                rc = self._call(_SEM, name, _lib.np_sem_decrement, _NOWAIT, lookup=_TRY)
            except _Busy:
                return -1
        else:
            errors.check_bool(wait, "wait")
            if timeout != 0:
                _block_hook(_SEM)
            rc = self._wait(_SEM, name, _lib.np_sem_decrement, self._deadline(timeout), cancel)
        if rc >= 0:
            return rc
        if rc in (_EAGAIN, _ETIMEDOUT, _EDESTROYED):
            return -1
        return _check(rc, self, name, _SEM)

    def sem_get(self, name) -> int:
        h = self._sems.get(name)
        if h is not None and self._d is not None:
            rc = _lib.np_sem_get(self._d, h)
            if rc >= 0:
                return rc
        return _check(self._call(_SEM, name, _lib.np_sem_get), self, name, _SEM)

    def sem_destroy(self, name) -> None:
        """Remove name (waiters get -1).  A missing name is a no-op."""
        rc = self._call(_SEM, name, _lib.np_sem_destroy, create=False)
        self._sems.pop(name, None)
        if rc is not None:
            _check(rc, self, name, _SEM)

    def sem_delta(self, name, pid) -> int:
        """Protected net amount (increments - decrements) of process pid."""
        pid = errors.check_int(pid, "pid", 1, 2**31 - 1)
        out = _ffi.new("int64_t *")
        rc = self._call(_SEM, name, _lib.np_sem_delta_of, pid, out, create=False)
        if rc is None:
            return 0
        _check(rc, self, name, _SEM)
        return out[0]

    # ---- mutexes ---------------------------------------------------------

    def mutex_lock(self, name, timeout=None, *, cancel=None) -> bool:
        """True when locked by this process; False on timeout (or cancel)."""
        if timeout is not None:
            errors.check_timeout(timeout)  # before the fast path takes the lock
        h = self._mtxs.get(name)
        if h is not None and self._d is not None:
            rc = _lib.np_mutex_lock(self._d, h, _NOWAIT)
            if rc == 0:
                return True
        if timeout != 0:
            _block_hook(_MTX)
        rc = self._wait(_MTX, name, _lib.np_mutex_lock, self._deadline(timeout), cancel)
        if rc == 0:
            return True
        if rc in (_EAGAIN, _ETIMEDOUT, _EDESTROYED):
            return False
        _check(rc, self, name, _MTX)
        return True

    def mutex_trylock(self, name) -> bool:
        h = self._mtxs.get(name)
        if h is not None and self._d is not None:
            rc = _lib.np_mutex_lock(self._d, h, _NOWAIT)
            if rc == 0:
                return True
            if rc == _EAGAIN:
                return False
        try:
            rc = self._call(_MTX, name, _lib.np_mutex_lock, _NOWAIT, lookup=_TRY)
        except _Busy:
            return False
        if rc == _EAGAIN:
            return False
        _check(rc, self, name, _MTX)
        return True

    def mutex_unlock(self, name, force=False) -> None:
        """Unlock a mutex this process holds; NotHolderError (nothing changed)
        when it does not.  ``force=True``: unlock whoever holds it (a no-op
        when free)."""
        if force is False:
            h = self._mtxs.get(name)
            if h is not None and self._d is not None and _lib.np_mutex_unlock(self._d, h) == 0:
                return
            fn = _lib.np_mutex_unlock
        else:
            errors.check_bool(force, "force")
            fn = _lib.np_mutex_force_unlock
        rc = self._call(_MTX, name, fn, create=force)   # force: created on first use
        if rc is None:                       # no such mutex: nobody holds it
            errors.check_name(name)
            rc = _ENOTHOLDER
        _check(rc, self, name, _MTX)

    def mutex_token(self, name) -> int | None:
        """The fencing token of this process's hold of *name*, or None when
        it does not hold it."""
        out = _ffi.new("int64_t *")
        rc = self._call(_MTX, name, _lib.np_mutex_token, out, create=False)
        if rc is None:
            errors.check_name(name)
            return None
        _check(rc, self, name, _MTX)
        return out[0] or None

    def mutex_locked(self, name) -> bool:
        """True while some process holds *name*."""
        h = self._call(_MTX, name, lambda d, h: h, create=False)
        if h is None:
            errors.check_name(name)
            return False
        info = _ffi.new("np_obj_info_t *")
        idx = h & 0xffffffff
        if _check(_lib.np_obj_info(self._dom(), _MTX, idx - self.config["semaphores"], info), self) != 1:
            return False
        return info.value == 0

    def mutex_destroy(self, name) -> None:
        rc = self._call(_MTX, name, _lib.np_mutex_destroy, create=False)
        self._mtxs.pop(name, None)
        if rc is not None:
            _check(rc, self, name, _MTX)

    # ---- introspection ---------------------------------------------------

    def _objects(self, kind, count):
        d = self._dom()
        info = _ffi.new("np_obj_info_t *")
        for i in range(count):
            if _check(_lib.np_obj_info(d, kind, i, info), self) == 1:
                yield info

    def semaphores(self) -> list[dict]:
        pids = [p["pid"] for p in self.processes()]
        out = _ffi.new("int64_t *")
        result = []
        for info in self._objects(_SEM, self.config["semaphores"]):
            holders = {}
            if info.protected_:
                for pid in pids:
                    if _lib.np_sem_delta_of(self._d, info.handle, pid, out) == 0 and out[0]:
                        holders[pid] = out[0]
            result.append({"name": _ffi.string(info.name).decode(), "value": info.value,
                           "protected": bool(info.protected_), "waiters": info.waiters,
                           "reserved": bool(info.reserved), "holders": holders})
        return result

    def mutexes(self) -> list[dict]:
        return [{"name": _ffi.string(info.name).decode(), "locked": info.value == 0,
                 "owner_pid": info.owner_pid or None, "waiters": info.waiters,
                 "reserved": bool(info.reserved), "token": info.token}
                for info in self._objects(_MTX, self.config["mutexes"])]

    def processes(self) -> list[dict]:
        d = self._dom()
        info = _ffi.new("np_proc_info_t *")
        out = []
        for i in range(self.config["processes"]):
            if _check(_lib.np_proc_info(d, i, info), self) == 1:
                out.append({"pid": info.pid, "start_time": info.start_time,
                            "state": _PROC_STATES.get(info.state, str(info.state)),
                            "threads": info.threads, "async_waiters": info.async_waiters})
        return out

    def name_stats(self) -> dict:
        """The name table: capacity, entries, tombstones (at most 1: the hole a
        destroy is closing), longest probe of a present name, free objects."""
        out = _ffi.new("np_name_stats_t *")
        _check(_lib.np_name_stats(self._dom(), out), self)
        return {"capacity": out.capacity, "entries": out.entries,
                "tombstones": out.tombstones, "longest_probe": out.longest_probe,
                "free_semaphores": out.free_semaphores, "free_mutexes": out.free_mutexes}

    def check(self) -> None:
        """Raise errors.SegmentError describing the first inconsistency found
        (meaningful on a quiescent segment)."""
        buf = _ffi.new("char[]", 512)
        rc = _lib.np_check(self._dom(), buf, 512)
        if rc < 0:
            raise errors.SegmentError(f"native segment {self.name} is inconsistent: "
                                      f"{_ffi.string(buf).decode(errors='replace')}")


def _segment_name(name) -> str:
    if name is None:
        return "/netplex-" + secrets.token_hex(12)
    if not isinstance(name, str) or not name.strip("/"):
        raise ValueError(f"segment name must be a non-empty str, not {name!r}")
    name = "/" + name.lstrip("/")
    if "/" in name[1:] or len(name) > 250:
        raise ValueError(f"segment name must be one path component of at most 250 characters: {name!r}")
    return name


# Imported with the backend, not on the first await: a process at its fd limit
# could not open the module then (OSError 24).
from . import asyncwait as _asyncwait  # noqa: E402,F401
