"""The mutex recipe on etcd (after etcd's Go ``concurrency/mutex.go``), with
the mutex backend API the public ``mutex`` module calls.

Recipe: to lock, a process puts a key of its own under the mutex's prefix,
bound to its lease; the owner is the key of lowest create revision; a waiter
watches only the key created just before its own (FIFO, no thundering herd)
and looks again when that key is deleted.  The token is the owner key's
create revision: etcd revisions only grow, so every later holder (after an
unlock, a death, a destroy) has a larger one.

Invariants:
- Ownership is decided only by etcd's order of create revisions; this
  process records what it holds (``held``) to refuse ``unlock`` by a
  non-holder without a round trip.  ``token`` checks with etcd (one Range)
  that our key is still there: it is None once the mutex was force-unlocked
  elsewhere, destroyed, or lost with our lease.
- A waiter whose lease expired (an outage longer than the TTL) holds
  nothing: it queues again under a new lease, at the back, and goes on
  waiting until its timeout; ``LeaseLostError`` is only for holders.
- A waiter that gives up (timeout, cancel, etcd unreachable) deletes its
  key, in the background until done if etcd does not answer: a waiter key
  left behind would become a ghost owner.
- An unlock deletes the key only if it is still ours (create revision
  compare); a key that is gone because our lease expired raises
  ``LeaseLostError``: someone else may hold the mutex now.
- ``guarded_put`` writes a resource only while a given token still owns
  the mutex (one transaction: our key exists with that create revision and
  no key of the mutex is older).
"""

from __future__ import annotations

import asyncio

from ..errors import EtcdUnavailableError, LeaseLostError, NotHolderError, WouldBlockError, check_name, check_timeout
from . import ops
from .transport import DELETE, LeaseGone, deadline_in, pb
from .waits import remaining, watch_until


class EtcdMutex:
    def __init__(self, session):
        self.s = session
        self.held: dict[str, tuple[bytes, int, int]] = {}    # name -> (key, token, lease)
        self.tokens: dict[int, tuple[str, bytes]] = {}       # token -> (name, key), while held
        self.controller = session.role != "container"
        self.known: set[str] = set()      # names this process saw marked as mutexes

    async def _mark(self, name, dl=None):
        """Mark *name* a mutex (once per process): ValueError if it is a semaphore."""
        if name in self.known:
            return
        k = self.s.keys
        r = await self.s.t.txn(ops.txn([ops.cmp_create(k.sem_value(name), 0)],
                                       [ops.put(k.mutex_mark(name), b"m")]), dl)
        if not r.succeeded:
            raise ValueError(f"{name!r} is a semaphore, not a mutex (semaphores and mutexes share one namespace)")
        self.known.add(name)

    # ---- the recipe (runs on the client thread) ----
    async def _enqueue(self, name, dl, box):
        """Put our waiter key; its name goes into *box* first, so that a
        cancel or an error at any point can delete it."""
        s = self.s
        pfx = s.keys.mutex(name)
        while True:
            lease = await s.lease_id()
            key = s.keys.mutex_waiter(name, lease)
            box.append(key)
            owner = pb.RequestOp(request_range=ops.rq_prefix(pfx, keys_only=True, limit=1, by_create=True))
            try:
                r = await s.t.txn(ops.txn([ops.cmp_create(key, 0)], [ops.put(key, b"", lease), owner],
                                          [ops.get(key)]), dl)
            except LeaseGone:
                s.lease_gone(lease)
                continue
            if r.succeeded:       # (with the owner read in the same revision: no wait, no read)
                first = ops.one(r, 1)
                return pfx, key, r.responses[0].response_put.header.revision, lease, first
            kv = ops.one(r, 0)     # our put was applied by an attempt whose answer was lost
            return pfx, key, kv.create_revision, lease, None

    async def _state(self, pfx, key, mine, dl):
        """(our key exists, the owner's kv, our predecessor's kv, revision): one Range."""
        r = await self.s.t.range(ops.rq_prefix(pfx, keys_only=True, by_create=True), dl)
        kvs = list(r.kvs)
        before = [kv for kv in kvs if kv.create_revision < mine]
        return (any(kv.key == key for kv in kvs), kvs[0] if kvs else None,
                before[-1] if before else None, r.header.revision)

    async def lock(self, name, timeout):
        s = self.s
        deadline = deadline_in(timeout)
        dl = deadline if timeout else None        # each request's: the wait's, or op_timeout
        box = []                                  # our waiter key(s), once named
        done = False
        try:
            try:
                await self._mark(name, dl)
                pfx, key, mine, lease, first = await self._enqueue(name, dl, box)
            except EtcdUnavailableError:
                if dl is not None and remaining(dl) == 0:
                    return False           # timed out while etcd did not answer
                raise
            while True:
                if first is not None and first.create_revision == mine:
                    exists, owner = True, first         # we own it at once
                else:
                    first = None
                    try:
                        exists, owner, pred, rev = await self._state(pfx, key, mine, dl)
                    except Exception:
                        if dl is not None and remaining(dl) == 0:
                            return False
                        if timeout is None or remaining(deadline) > 0:
                            await asyncio.sleep(0.05)   # etcd unreachable: a wait goes on
                            continue
                        raise
                if not exists:        # destroyed, or our lease expired meanwhile
                    if await s.is_lost(lease):
                        # a waiter holds nothing: it queues again under a new lease (at the back)
                        if timeout == 0 or remaining(deadline) == 0:
                            return False
                        try:
                            pfx, key, mine, lease, first = await self._enqueue(name, dl, box)
                        except EtcdUnavailableError:
                            if dl is not None and remaining(dl) == 0:
                                return False
                            raise
                        continue
                    done = True
                    return False
                if owner is not None and owner.create_revision == mine:
                    self.held[name] = (key, mine, lease)
                    self.tokens[mine] = (name, key)
                    done = True
                    return True
                if timeout == 0 or remaining(deadline) == 0:
                    return False
                if pred is None:
                    continue
                await watch_until(s, pred.key, None, rev + 1, deadline,
                                  lambda ev: ev.type == DELETE)
        finally:
            if not done:        # our key names are unique: delete them, whatever their revision
                for k in box:
                    s.cleanup(lambda k=k: s.t.txn(ops.txn((), [ops.delete(k)])))

    async def unlock(self, name, force):
        s = self.s
        held = self.held.pop(name, None)
        if held is not None:
            key, token, lease = held
            self.tokens.pop(token, None)
            info = {}
            r = await s.t.txn(ops.txn([ops.cmp_create(key, token)], [ops.delete(key)]), None, info)
            if r.succeeded or info.get("retried"):   # (a retried delete may be ours, applied)
                return
            if await s.is_lost(lease):
                raise LeaseLostError(f"mutex {name!r}: this process's etcd lease expired while it held "
                                     f"the mutex (token {token}); another process may hold it now")
            raise NotHolderError(f"mutex {name!r} is not held by this process any more "
                                 f"(destroyed, or unlocked with force=True elsewhere)")
        r = await s.t.range(ops.rq_get(s.keys.sem_value(name)))
        if r.kvs:
            raise ValueError(f"{name!r} is a semaphore, not a mutex (semaphores and mutexes share one namespace)")
        if not force:
            raise NotHolderError(f"mutex {name!r} is not held by this process")
        pfx = s.keys.mutex(name)
        while True:
            r = await s.t.range(ops.rq_prefix(pfx, keys_only=True, limit=1, by_create=True))
            owner = r.kvs[0] if r.kvs else None
            if owner is None:
                return
            r = await s.t.txn(ops.txn([ops.cmp_create(owner.key, owner.create_revision)], [ops.delete(owner.key)]))
            if r.succeeded:
                return

    async def locked(self, name):
        pfx = self.s.keys.mutex(name)
        r = await self.s.t.range(ops.rq_prefix(pfx, count_only=True))
        return r.count > 0

    async def destroy(self, name):
        k = self.s.keys
        r = await self.s.t.range(ops.rq_get(k.sem_value(name)))
        if r.kvs:
            raise ValueError(f"{name!r} is a semaphore, not a mutex (semaphores and mutexes share one namespace)")
        await self.s.t.txn(ops.txn((), [ops.delete_prefix(k.mutex(name)), ops.delete(k.mutex_mark(name))]))
        self.known.discard(name)

    async def guarded_put(self, name, token, rkey, value):
        s = self.s
        entry = self.tokens.get(token)
        if entry is None or entry[0] != name:
            held = self.held.get(name)
            if held is None or held[1] != token:
                return False       # not a token this process holds: refused
            entry = (name, held[0])
        key = entry[1]
        pfx = s.keys.mutex(name)
        older = pb.Compare(key=pfx, range_end=ops.prefix_end(pfx), target=ops.CREATE,
                           result=pb.Compare.GREATER, create_revision=token - 1)
        r = await s.t.txn(ops.txn([ops.cmp_create(key, token), older], [ops.put(s.keys.resource(rkey), value)]))
        return r.succeeded

    async def read(self, rkey):
        r = await self.s.t.range(ops.rq_get(self.s.keys.resource(rkey)))
        return r.kvs[0].value if r.kvs else None

    # ---- the backend API (any thread of the process) ----
    def _give_back(self, name):
        return lambda got: self.unlock(name, False) if got else None

    def lock_sync(self, name, timeout=None):
        timeout = check_timeout(timeout)
        name = check_name(name)
        if self.controller:
            if self.s.runner.run(self.lock(name, 0), self._give_back(name)):
                return True
            if timeout == 0:
                return False
            raise WouldBlockError("lock() on a held mutex would block the controller's loop")
        return self.s.runner.run(self.lock(name, timeout), self._give_back(name))

    async def lock_async(self, name, timeout=None):
        timeout = check_timeout(timeout)
        name = check_name(name)
        if self.controller:
            return self.lock_sync(name, timeout)
        return await self.s.runner.arun(self.lock(name, timeout), self._give_back(name))

    def unlock_sync(self, name, force=False):
        name = check_name(name)
        if force is not True and force is not False:
            raise TypeError(f"force must be a bool, not {type(force).__name__}")
        self.s.runner.run(self.unlock(name, force))

    def locked_sync(self, name):
        return self.s.runner.run(self.locked(check_name(name)))

    async def token(self, name):
        """Our token if our key is still there with it (one Range): a key
        deleted by a force-unlock, a destroy or the expiry of our lease is
        no longer ours, and nobody can get ahead of a key that is."""
        held = self.held.get(name)
        if held is None:
            return None
        key, token, _lease = held
        r = await self.s.t.range(ops.rq_get(key))
        if r.kvs and r.kvs[0].create_revision == token and self.held.get(name) == held:
            return token
        return None

    def token_sync(self, name):
        name = check_name(name)
        if name not in self.held:
            return None
        return self.s.runner.run(self.token(name))

    def destroy_sync(self, name):
        self.s.runner.run(self.destroy(check_name(name)))


class MutexBackend:
    """What ``ctx.mutex`` is on the etcd backend."""

    def __init__(self, impl: EtcdMutex):
        self.impl = impl
        self.lock = impl.lock_sync
        self.lock_async = impl.lock_async
        self.unlock = impl.unlock_sync
        self.locked = impl.locked_sync
        self.token = impl.token_sync
        self.destroy = impl.destroy_sync
