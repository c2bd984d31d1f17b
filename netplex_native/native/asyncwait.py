"""Awaitable native waits that cost no thread (runs in any process of a domain).

A coroutine that must wait claims an *async waiter record* in the segment
(csrc/asyncwait.c) and queues it on the semaphore or mutex exactly where a
thread's wait would be queued; it then awaits a future.  A release that
entitles the record rings this process's doorbell; ONE helper thread per
process and domain (started on first use, again in a forked child) sleeps on
the doorbell and resolves the futures of the woken records through their
loops (``call_soon_threadsafe``).  The coroutine then competes again in its
own thread, as a woken synchronous waiter does: queue order and bounded
overtaking are the core's.

Invariants kept here
 - A future is registered for its record *before* the record is armed, so a
   wake-up reported at once is never lost (a stale one is harmless: the
   coroutine only competes again).
 - Whatever ends a wait (taken, timeout, cancellation, an exception, the
   domain closing) releases the record: it leaves the queue, waking whoever
   became entitled by its leaving, and is freed.  Nothing is handed to a
   waiter, so a cancelled coroutine gives back nothing and swallows nothing.
 - Timeouts are loop timers: at the deadline the coroutine takes if it is
   entitled, else leaves the queue (``NP_AW_FINAL``); no thread is involved.
 - The loop thread never sleeps here: a busy internal guard (a stopped
   holder) makes a call return at once, and the coroutine tries again 10 ms
   later (its timeout still honoured).
 - Every slice (100 ms) the helper recovers dead processes that its records
   wait behind (progress without the supervisor) and, when the domain's
   ``interrupt_check`` says so (container shutdown), ends every wait as a
   timeout would.
 - A record is released exactly once, by whoever first takes it out of
   ``_live`` (``_take``): its coroutine on its loop's thread, or else the
   helper thread.  A waiter whose loop is closed (the helper sees it when it
   delivers a wake-up and every slice) or whose coroutine was finalized off
   its loop (garbage collection) leaves the queue as a cancelled one does:
   the helper releases its record, passing the wake-up on.  A loop that is
   merely not running keeps its waiters queued, as a paused thread would.
 - The helper thread is started before a record is claimed: when it cannot
   be (RLIMIT_NPROC), AsyncWaitHelperError is raised and nothing is queued.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import threading
import weakref

from .. import errors
from . import domain as _d

_SLICE_NS = 100_000_000
_BUSY_RETRY = 0.01
_WAKE, _TIMEOUT, _INTERRUPT, _CLOSED = "wake", "timeout", "interrupt", "closed"


def waits_of(dom) -> "AsyncWaits":
    """The AsyncWaits of dom in this process (a forked child gets its own)."""
    aw = dom._aw
    if aw is None or aw.pid != os.getpid():
        aw = dom._aw = AsyncWaits(dom)
    return aw


def _resolve(futs, reason):
    for f in futs:
        if not f.done():
            f.set_result(reason)


class _Wait:
    """Held by the waiting coroutine's frame: its collection releases the record."""
    __slots__ = ("__weakref__",)


class AsyncWaits:
    """The async waits of one process on one Domain, and their helper thread."""

    def __init__(self, dom):
        self.pid = os.getpid()
        self._dom = dom
        self._futs: dict[int, asyncio.Future] = {}   # record -> future of its waiting coroutine
        self._live: dict[int, tuple] = {}            # record -> (seq, loop) while claimed
        self._seq = itertools.count(1)
        self._orphans = collections.deque()          # records taken off their loop: the helper releases
        self._mu = threading.RLock()   # re-entered if a collection finalizes a waiter inside _take
        self._thread = None
        self._closed = False

    def _take(self, rec: int, seq: int) -> bool:
        """True once for (rec, seq): the caller then releases the record."""
        with self._mu:
            e = self._live.get(rec)
            if e is None or e[0] != seq:
                return False
            del self._live[rec]
            self._futs.pop(rec, None)
            return True

    def _orphaned(self, rec: int, seq: int) -> None:
        """The record's waiter is gone without releasing it (collected, or finalized
        off its loop): the helper releases it.  Takes no lock (runs in a collection)."""
        self._orphans.append((rec, seq))

    # ---- the loop thread -------------------------------------------------

    async def acquire(self, kind: int, name: str, timeout) -> int:
        """The semaphore's new value or 0 for a mutex when taken; -1 when the
        timeout passed, the object was destroyed, or the wait was ended by
        shutdown.  ``timeout`` is checked by the caller (None: no limit)."""
        lib, dom = _d._lib, self._dom
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        cache = dom._sems if kind == _d._SEM else dom._mtxs
        self._start_helper()                   # before anything is queued
        rec = _d._check(lib.np_aw_claim(dom._dom()), dom, name, kind)
        seq = next(self._seq)
        self._live[rec] = (seq, loop)
        me = _Wait()
        fin = weakref.finalize(me, self._orphaned, rec, seq)
        fin.atexit = False
        try:
            final = 0
            h = None        # the incarnation the record queues on: kept while queued
            while True:
                d = dom._dom()
                fut = loop.create_future()
                self._futs[rec] = fut          # before the record is armed
                try:
                    if h is None:
                        h = dom._handle(kind, name, True, _d._TRY)
                    rc = lib.np_aw_acquire(d, rec, h, kind, final)
                except _d._Busy:
                    rc = _d._EINTR
                if rc != _d._EAGAIN:
                    self._futs.pop(rec, None)
                if rc >= 0:
                    return rc
                if rc in (_d._ETIMEDOUT, _d._EDESTROYED):
                    return -1
                if rc == _d._ESTALE:               # not queued: look the name up again
                    cache.pop(name, None)
                    h = None
                    continue
                if rc == _d._EINTR:            # an internal guard is busy: try soon
                    if final:
                        return -1
                    delay = _BUSY_RETRY if end is None else min(_BUSY_RETRY, max(0.0, end - loop.time()))
                    await asyncio.sleep(delay)
                    if end is not None and loop.time() >= end:
                        final = lib.NP_AW_FINAL
                    continue
                if rc != _d._EAGAIN:
                    _d._check(rc, dom, name, kind)
                # queued and armed: wait for a wake-up, the deadline, or the end
                timer = loop.call_at(end, _resolve, (fut,), _TIMEOUT) if end is not None else None
                try:
                    reason = await fut
                finally:
                    if self._futs.get(rec) is fut:   # not once the record went to another wait
                        self._futs.pop(rec, None)
                    if timer is not None:
                        timer.cancel()
                if reason == _TIMEOUT:
                    final = lib.NP_AW_FINAL
                elif reason == _INTERRUPT:
                    return -1
                elif reason == _CLOSED:
                    raise errors.SegmentError(f"native segment {dom.name} is closed")
        finally:
            fin.detach()
            del me
            if asyncio._get_running_loop() is not loop:
                self._orphaned(rec, seq)        # finalized off its loop: the helper releases it
            elif self._take(rec, seq) and dom._d is not None:
                lib.np_aw_release(dom._d, rec)

    # ---- the helper thread -----------------------------------------------

    def _start_helper(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._mu:
            if self._thread is None or not self._thread.is_alive():
                t = threading.Thread(target=self._helper, name="netplex-asyncwait", daemon=True)
                try:
                    t.start()
                except RuntimeError as e:       # RLIMIT_NPROC, no memory for a stack
                    raise errors.AsyncWaitHelperError(
                        f"an awaitable wait needs this process's helper thread and it could not "
                        f"be started ({e}); nothing was queued.  Raise the process limit "
                        f"(ulimit -u, RLIMIT_NPROC) or wait synchronously") from e
                self._thread = t

    def _deliver(self, recs, reason) -> None:
        by_loop: dict = {}
        for r in recs:
            f = self._futs.get(r)
            if f is not None:
                by_loop.setdefault(f.get_loop(), []).append((r, f))
        for loop, rfs in by_loop.items():
            try:
                if loop.is_closed():
                    raise RuntimeError("closed")
                loop.call_soon_threadsafe(_resolve, [f for _, f in rfs], reason)
            except RuntimeError:                # that loop is closed: its waiters leave
                self._abandon([r for r, _ in rfs])

    def _abandon(self, recs) -> None:
        """The helper: release the records of waiters whose loop is closed."""
        for r in recs:
            e = self._live.get(r)
            if e is not None:
                self._orphans.append((r, e[0]))
        self._reap_orphans()

    def _reap_orphans(self) -> None:
        d = self._dom._d
        while self._orphans:
            r, seq = self._orphans.popleft()
            if self._take(r, seq) and d is not None:
                _d._lib.np_aw_release(d, r)

    def _reap(self) -> None:
        """The helper, every slice: waiters of closed loops, and gone ones, leave."""
        closed = [r for r, (_, loop) in list(self._live.items()) if loop.is_closed()]
        if closed:
            self._abandon(closed)
        self._reap_orphans()

    def _helper(self) -> None:
        lib, ffi, dom = _d._lib, _d._ffi, self._dom
        buf = ffi.new("uint32_t[]", 512)
        next_tick = lib.np_now() + _SLICE_NS
        while not self._closed and self.pid == os.getpid():
            d = dom._d
            if d is None:
                break
            n = lib.np_aw_wait(d, buf, 512, _SLICE_NS)
            if n == _d._ECLOSED:
                break
            if n > 0:
                self._deliver(list(buf[0:n]), _WAKE)
                if lib.np_now() < next_tick and not self._orphans:
                    continue
            now = lib.np_now()
            if now < next_tick and not self._orphans:
                continue
            next_tick = now + _SLICE_NS
            self._reap()
            if not self._futs:
                continue
            check = dom.interrupt_check
            try:
                if check is not None and check():
                    self._deliver(list(self._futs), _INTERRUPT)
                    continue
            except Exception:
                pass
            d = dom._d
            if d is not None:
                lib.np_aw_tick(d, now + _SLICE_NS)
        self._deliver(list(self._futs), _CLOSED)

    def closing(self) -> None:
        """The Domain is being closed: end every wait (SegmentError)."""
        self._closed = True
        self._deliver(list(self._futs), _CLOSED)

    def pending(self) -> int:
        """Coroutines of this process now waiting (for tests and bench/)."""
        return len(self._futs)
