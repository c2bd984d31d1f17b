"""The semaphore recipe on etcd, with the semaphore backend API.

State of semaphore NAME (keys.py): ``v`` = protection flag, base value and
the id of the last write; ``d/LEASE`` = the delta (increments minus
decrements) of each protected holder, bound to its lease; ``w/...`` = the
waiters, bound to their leases, served in order of create revision.

    value = max(0, base + sum of the live deltas)

A dead holder's delta disappears with its lease (revoke on reap, or TTL
expiry), atomically.  When that leaves the sum negative (a dead holder had
given units that live ones took), the value reads 0, and the next write
folds the deficit into the base (comparing every delta it read), so that
units given back later count again — the reference's clamp at 0.

Invariants:
- Every write is one transaction that compares the ``v`` key's mod
  revision with the read it was decided on, and rewrites ``v`` with a fresh
  write id: a concurrent write makes it fail and retry, and a write whose
  answer was lost is recognised by its id on the re-read (never applied
  twice).
- A unit is taken only when the value is positive and no older waiter
  queues (newcomers do not overtake waiters); a waiter takes only as the
  head of the queue, deleting its waiter key in the same transaction.
- A waiter watches only its predecessor's key; the head watches the
  semaphore.  Giving up (timeout, cancel) deletes the waiter key, in the
  background until done; a take that crossed a cancel is given back.
"""

from __future__ import annotations

import asyncio
import os

from ..errors import (EtcdUnavailableError, LeaseLostError, VALUE_MAX, WouldBlockError, check_bool, check_int, check_name,
                      check_timeout)
from . import ops
from .transport import DELETE, LeaseGone, deadline_in
from .waits import remaining, watch_until


def _parse(kv):
    flag, base, wid = kv.value.decode().split("|")
    return flag == "p", int(base), wid


def _enc(protected, base, wid):
    return f"{'p' if protected else 'u'}|{base}|{wid}".encode()


class _Snap:
    __slots__ = ("v", "protected", "base", "wid", "deltas", "first", "rev", "mine", "pred")

    @property
    def raw(self):
        return self.base + sum(int(kv.value) for kv in self.deltas)

    @property
    def value(self):
        return max(0, self.raw)


class EtcdSemaphore:
    def __init__(self, session):
        self.s = session
        self.controller = session.role != "container"
        self.taken: dict[str, tuple[int, int]] = {}    # name -> (lease, delta) while protected units are held

    async def _snap(self, name, waiter=None, mine=0, dl=None):
        """The semaphore's value key, deltas and waiters: one Range over its prefix."""
        k = self.s.keys
        vkey, dpfx, wpfx = k.sem_value(name), k.sem_deltas(name), k.sem_waiters(name)
        r = await self.s.t.range(ops.rq_prefix(k.sem(name)), dl)
        sn = _Snap()
        sn.v = sn.first = sn.mine = sn.pred = None
        sn.deltas = []
        waiters = []
        for kv in r.kvs:
            if kv.key == vkey:
                sn.v = kv
            elif kv.key.startswith(dpfx):
                sn.deltas.append(kv)
            elif kv.key.startswith(wpfx):
                waiters.append(kv)
        waiters.sort(key=lambda kv: kv.create_revision)
        sn.first = waiters[0] if waiters else None
        sn.rev = r.header.revision
        if sn.v is not None:
            sn.protected, sn.base, sn.wid = _parse(sn.v)
        if waiter is not None:
            sn.mine = next((kv for kv in waiters if kv.key == waiter), None)
            before = [kv for kv in waiters if kv.create_revision < mine]
            sn.pred = before[-1] if before else None
        return sn

    async def _create(self, name, initial, protected):
        wid = os.urandom(8).hex()
        key = self.s.keys.sem_value(name)
        mark = self.s.keys.mutex_mark(name)
        r = await self.s.t.txn(ops.txn([ops.cmp_create(key, 0), ops.cmp_create(mark, 0)],
                                       [ops.put(key, _enc(protected, initial, wid))],
                                       [ops.get(key), ops.get(mark)]))
        if r.succeeded:
            return True
        kv = ops.one(r, 0)
        if kv is None and ops.one(r, 1) is not None:
            raise ValueError(f"{name!r} is a mutex, not a semaphore (semaphores and mutexes share one namespace)")
        return kv is not None and _parse(kv)[2] == wid

    async def _write(self, name, sn, change, lease, extra=()):
        """Apply *change* (+n or -1) to the value read in *sn*: to this
        process's delta if protected (and it has a lease), else to the base.
        Returns the new value, or None if *sn* was stale (re-read)."""
        k = self.s.keys
        vkey = k.sem_value(name)
        base, raw = sn.base, sn.raw
        compares = [ops.cmp_mod(vkey, sn.v.mod_revision)]
        if raw < 0:                       # fold the deficit of dead holders into the base
            base -= raw
            compares += [ops.cmp_mod(kv.key, kv.mod_revision) for kv in sn.deltas]
            raw = 0
        succ = list(extra)
        if sn.protected and lease:
            dkey = k.sem_delta(name, lease)
            d = next((int(kv.value) for kv in sn.deltas if kv.key == dkey), 0) + change
            succ.append(ops.put(dkey, str(d).encode(), lease) if d else ops.delete(dkey))
        else:
            base += change
            d = None
        wid = os.urandom(8).hex()
        succ.append(ops.put(vkey, _enc(sn.protected, base, wid)))
        fut = asyncio.ensure_future(self.s.t.txn(ops.txn(compares, succ, [ops.get(vkey)])))
        try:
            r = await asyncio.shield(fut)
        except asyncio.CancelledError:
            if change < 0:      # a take that crossed a cancel: give it back once it is known
                def undo(f):
                    if not f.cancelled() and f.exception() is None and f.result().succeeded:
                        self.s.cleanup(lambda: self.increment(name))
                fut.add_done_callback(undo)
            raise
        if not r.succeeded:
            kv = ops.one(r, 0)
            if kv is None or _parse(kv)[2] != wid:
                return None              # stale: re-read
        if d is not None:
            if d:
                self.taken[name] = (lease, d)
            else:
                self.taken.pop(name, None)
        return max(0, raw + change)

    async def _read(self, name, dl=None):
        while True:
            sn = await self._snap(name, dl=dl)
            if sn.v is not None:
                return sn
            await self._create(name, 0, True)     # implicit creation

    async def _lease(self):
        return 0 if self.controller else await self.s.lease_id()

    async def create(self, name, initial, protected):
        return await self._create(name, initial, protected)

    async def increment(self, name, n=1):
        s = self.s
        t = self.taken.get(name)
        if t is not None and t[0] != s.lease and t[1] < 0 and await s.is_lost(t[0]):
            del self.taken[name]
            raise LeaseLostError(f"semaphore {name!r}: this process's etcd lease expired; the "
                                 f"{-t[1]} unit(s) it had taken were given back already")
        while True:
            sn = await self._read(name)
            if sn.value > VALUE_MAX - n:
                raise OverflowError(f"semaphore {name!r} would exceed {VALUE_MAX}")
            lease = await self._lease() if sn.protected else 0
            try:
                v = await self._write(name, sn, +n, lease)
            except LeaseGone:
                s.lease_gone(lease)
                continue
            if v is not None:
                return v

    async def _try_take(self, name, sn, waiter=None):
        lease = await self._lease() if sn.protected else 0
        extra = [ops.delete(waiter)] if waiter is not None else ()
        try:
            return await self._write(name, sn, -1, lease, extra)
        except LeaseGone:
            self.s.lease_gone(lease)
            return None

    async def decrement(self, name, wait, timeout):
        deadline = deadline_in(timeout)
        dl = deadline if (wait and timeout) else None   # each request's: the wait's, or op_timeout
        try:
            return await self._decrement(name, wait, timeout, deadline, dl)
        except EtcdUnavailableError:
            if dl is not None and remaining(dl) == 0:
                return -1              # timed out while etcd did not answer
            raise

    async def _decrement(self, name, wait, timeout, deadline, dl):
        s = self.s
        while True:     # without queueing: only if nobody queues
            sn = await self._read(name, dl=dl)
            if sn.value <= 0 or sn.first is not None:
                break
            v = await self._try_take(name, sn)
            if v is not None:
                return v
        if not wait or timeout == 0:
            return -1
        lease = await s.lease_id() if not self.controller else 0
        waiter = s.keys.sem_waiter(name, lease)
        got = None
        try:
            try:
                r = await s.t.txn(ops.txn([ops.cmp_create(waiter, 0)], [ops.put(waiter, b"", lease)],
                                          [ops.get(waiter)]), dl)
            except LeaseGone:
                s.lease_gone(lease)
                got = await self.decrement(name, wait, remaining(deadline))
                return got
            mine = r.responses[0].response_put.header.revision if r.succeeded else ops.one(r, 0).create_revision
            while True:
                try:
                    sn = await self._snap(name, waiter=waiter, mine=mine, dl=dl)
                except Exception:
                    if dl is not None and remaining(dl) == 0:
                        return -1
                    if timeout is None or remaining(deadline) > 0:
                        await asyncio.sleep(0.05)
                        continue
                    raise
                if sn.mine is None or sn.v is None:      # destroyed (or our lease expired)
                    got = -1
                    return -1
                if sn.pred is None and sn.value > 0:
                    got = await self._try_take(name, sn, waiter)
                    if got is not None:
                        return got
                    continue
                if remaining(deadline) == 0:
                    return -1
                if sn.pred is not None:
                    await watch_until(s, sn.pred.key, None, sn.rev + 1, deadline,
                                      lambda ev: ev.type == DELETE)
                else:
                    p = s.keys.sem(name)
                    await watch_until(s, p, ops.prefix_end(p), sn.rev + 1, deadline, lambda ev: True)
        finally:
            if got is None:     # our key name is unique: delete it, whatever its revision
                s.cleanup(lambda: s.t.txn(ops.txn((), [ops.delete(waiter)])))

    async def get(self, name):
        return (await self._read(name)).value

    async def destroy(self, name):
        r = await self.s.t.range(ops.rq_get(self.s.keys.mutex_mark(name)))
        if r.kvs:
            raise ValueError(f"{name!r} is a mutex, not a semaphore (semaphores and mutexes share one namespace)")
        await self.s.t.txn(ops.txn((), [ops.delete_prefix(self.s.keys.sem(name))]))
        self.taken.pop(name, None)


class SemaphoreBackend:
    """What ``ctx.sem`` is on the etcd backend (any thread of the process)."""

    def __init__(self, impl: EtcdSemaphore):
        self.impl = impl
        self._run = impl.s.runner.run

    def create(self, name, initial=0, protected=False):
        return self._run(self.impl.create(check_name(name), check_int(initial, "initial"),
                                          check_bool(protected, "protected")))

    def increment(self, name):
        return self._run(self.impl.increment(check_name(name)))

    def add(self, name, n):
        return self._run(self.impl.increment(check_name(name), check_int(n, "n", 1)))

    def _give_back(self, name):
        return lambda got: self.impl.increment(name) if isinstance(got, int) and got >= 0 else None

    def decrement(self, name, wait=False, timeout=None):
        if wait is not True and wait is not False:
            raise TypeError(f"wait must be a bool, not {type(wait).__name__}")
        timeout = check_timeout(timeout)
        name = check_name(name)
        if self.impl.controller:
            r = self._run(self.impl.decrement(name, False, 0), self._give_back(name))
            if r < 0 and wait and timeout != 0:
                raise WouldBlockError("decrement(wait=True) would block the controller's loop; "
                                      "wait in a container instead")
            return r
        return self._run(self.impl.decrement(name, wait, timeout), self._give_back(name))

    async def decrement_async(self, name, wait=False, timeout=None):
        if wait is not True and wait is not False:
            raise TypeError(f"wait must be a bool, not {type(wait).__name__}")
        timeout = check_timeout(timeout)
        name = check_name(name)
        if self.impl.controller:
            return self.decrement(name, wait, timeout)
        return await self.impl.s.runner.arun(self.impl.decrement(name, wait, timeout), self._give_back(name))

    def get(self, name):
        return self._run(self.impl.get(check_name(name)))

    def destroy(self, name):
        self._run(self.impl.destroy(check_name(name)))
