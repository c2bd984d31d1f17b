"""RPC semaphores and mutexes: the state lives in the controller process.

Controller side (``SyncState`` and the two plugins) and the backends the
public modules call (``_SemClient``/``_MutexClient`` in containers, over the
channel; ``_SemLocal``/``_MutexLocal`` in the controller itself).

Semantics (reference, defects fixed):
- waits are deferred replies in FIFO order; a waiter whose container is gone
  is dropped before anything is handed to it (defect 1), and a deferred grant
  that the container never acknowledged is given back when it dies;
- protected semaphores keep, per container, increments minus successful
  decrements; when the container ends that amount is subtracted (clamped at
  0) and waiters are served;
- a mutex records its holder only, with no per-container counter to skew
  (defect 2); unlock by a container that does not hold it raises
  NotHolderError and changes nothing, ``force`` unlocks whoever holds it; a
  dead holder's mutex goes to the next live waiter; a dead waiter is
  dropped, never handed the lock (defect 3);
- fencing: every grant of any mutex takes the next value of one
  controller-wide counter (``token_hw``), so a later holder of a mutex always
  has a larger token, across destroy/re-create and a holder's death too;
- ``destroy`` removes the semaphore (a later ``create`` returns True) and
  answers every waiter with -1, each answer on its own (defect 4); a
  mutex's ``destroy`` answers its waiters False (as a timeout would) and a
  later use creates it again, unlocked;
- a wait whose answer nobody would read (call id 0) is dropped at once by
  the controller, and a grant is never handed to such a waiter: giving
  back an undeliverable grant never recurses through a queue;
- one object's failure while a dead container is recovered never stops the
  recovery of the others.
Semaphores and mutexes share one namespace.
"""

from __future__ import annotations

import logging
from collections import deque

from ..errors import (NotHolderError, WouldBlockError, check_bool, check_int, check_name,
                     check_timeout, NAME_MAX_BYTES, VALUE_MAX)
from ..channel import undo_frame
from ..plugin import Plugin
from ..loopcheck import warn_if_on_loop
from ..logs import get_logger

log = get_logger("netplex_native.rpc")


class _Waiter:
    __slots__ = ("rec", "reply", "timer")

    def __init__(self, rec, reply):
        self.rec = rec
        self.reply = reply
        self.timer = None


class _Sem:
    __slots__ = ("name", "value", "protected", "deltas", "waiters")

    def __init__(self, name, value, protected):
        self.name = name
        self.value = value
        self.protected = protected
        self.deltas: dict[str, int] = {}   # container id -> increments - decrements
        self.waiters: deque[_Waiter] = deque()


class _Mutex:
    __slots__ = ("name", "owner", "token", "waiters")

    def __init__(self, name):
        self.name = name
        self.owner = None                  # container id, or "" for the controller
        self.token = 0                     # fencing token of the current hold
        self.waiters: deque[_Waiter] = deque()


def _kind_error(name, is_kind, other):
    return ValueError(f"{name!r} is a {other}, not a {is_kind} (semaphores and mutexes share one namespace)")


class SyncState:
    """Per-controller state of RPC semaphores and mutexes."""

    def __init__(self, loop_getter):
        self._loop = loop_getter
        self.sems: dict[str, _Sem] = {}
        self.mutexes: dict[str, _Mutex] = {}
        self.token_hw = 0                  # last fencing token handed out

    # ---- semaphores ----
    def _sem(self, name, implicit=True) -> _Sem | None:
        s = self.sems.get(name)
        if s is None:
            if name in self.mutexes:
                raise _kind_error(name, "semaphore", "mutex")
            if implicit:
                s = self.sems[name] = _Sem(name, 0, True)
        return s

    def sem_create(self, name, initial, protected) -> bool:
        if name in self.sems:
            return False
        if name in self.mutexes:
            raise _kind_error(name, "semaphore", "mutex")
        self.sems[name] = _Sem(name, initial, protected)
        return True

    def sem_increment(self, cid, name, n: int = 1) -> int:
        s = self.sems.get(name) or self._sem(name)
        if s.value > VALUE_MAX - n:
            raise OverflowError(f"semaphore {name!r} would exceed {VALUE_MAX}")
        s.value += n
        if s.protected and cid:
            s.deltas[cid] = s.deltas.get(cid, 0) + n
        new = s.value
        if s.waiters:
            self._serve(s)
        return new

    def sem_try_decrement(self, cid, name) -> int:
        s = self.sems.get(name) or self._sem(name)
        if s.value <= 0:
            return -1
        if s.protected and cid:
            self._take(s, cid)
        else:
            s.value -= 1
        return s.value

    def _take(self, s: _Sem, cid) -> None:
        s.value -= 1
        if s.protected and cid:
            d = s.deltas.get(cid, 0) - 1
            if d:
                s.deltas[cid] = d
            else:
                s.deltas.pop(cid, None)

    def _untake(self, s: _Sem, cid) -> None:
        """Exact inverse of _take (a grant given back)."""
        if self.sems.get(s.name) is not s:
            return  # destroyed meanwhile: nothing to give back to
        s.value += 1
        if s.protected and cid:
            d = s.deltas.get(cid, 0) + 1
            if d:
                s.deltas[cid] = d
            else:
                s.deltas.pop(cid, None)
        self._serve(s)

    def sem_wait(self, rec, name, timeout, reply) -> None:
        """decrement(wait=True): answer now or queue (FIFO)."""
        s = self._sem(name)
        if s.value > 0:
            self._take(s, rec.id)
            reply.ok(s.value)
            return
        if timeout == 0:
            reply.ok(-1)
            return
        self._enqueue(s.waiters, rec, reply, timeout, -1)

    def _enqueue(self, queue, rec, reply, timeout, nothing) -> None:
        """Queue a deferred reply (FIFO); a cancel or the timeout takes it out
        again, the timeout answering *nothing* (-1 or False)."""
        w = _Waiter(rec, reply)
        queue.append(w)
        reply.cancel_value = nothing

        def drop():
            try:
                queue.remove(w)
            except ValueError:
                pass
            if w.timer is not None:
                w.timer.cancel()
        reply.on_cancel = drop
        if timeout is not None:
            def expire():
                w.timer = None
                drop()
                reply.ok(nothing)
            w.timer = self._loop().call_later(timeout, expire)

    def _serve(self, s: _Sem) -> None:
        """Hand counts to live waiters, first come first served."""
        while s.value > 0 and s.waiters:
            w = s.waiters.popleft()
            if w.timer is not None:
                w.timer.cancel()
            if not w.reply.alive or w.reply.done:
                continue  # its container is gone: never hand it anything
            self._take(s, w.rec.id)
            cid = w.rec.id
            w.reply.ok(s.value, undo=lambda s=s, cid=cid: self._untake(s, cid))

    def sem_get(self, name) -> int:
        return self._sem(name).value

    def sem_destroy(self, name) -> None:
        s = self.sems.get(name)
        if s is None:
            if name in self.mutexes:
                raise _kind_error(name, "semaphore", "mutex")
            return
        del self.sems[name]
        waiters, s.waiters = s.waiters, deque()
        for w in waiters:
            if w.timer is not None:
                w.timer.cancel()
            try:
                w.reply.ok(-1)
            except Exception:  # one broken waiter must not leave the others unanswered
                pass

    # ---- mutexes ----
    def _mutex(self, name) -> _Mutex:
        m = self.mutexes.get(name)
        if m is None:
            if name in self.sems:
                raise _kind_error(name, "mutex", "semaphore")
            m = self.mutexes[name] = _Mutex(name)
        return m

    def grant(self, m: _Mutex, owner) -> None:
        self.token_hw += 1
        m.owner = owner
        m.token = self.token_hw

    def mutex_lock(self, rec, owner, name, timeout, reply) -> None:
        m = self._mutex(name)
        if m.owner is None:
            self.grant(m, owner)
            reply.ok(True)
            return
        if timeout == 0:
            reply.ok(False)
            return
        self._enqueue(m.waiters, rec, reply, timeout, False)

    def mutex_destroy(self, name) -> None:
        m = self.mutexes.get(name)
        if m is None:
            if name in self.sems:
                raise _kind_error(name, "mutex", "semaphore")
            return
        del self.mutexes[name]
        waiters, m.waiters = m.waiters, deque()
        for w in waiters:
            if w.timer is not None:
                w.timer.cancel()
            try:
                w.reply.ok(False)
            except Exception:  # one broken waiter must not leave the others unanswered
                pass

    def mutex_unlock(self, name, owner, force=False) -> None:
        """Unlock if *owner* holds it (or *force*: whoever holds it)."""
        m = self.mutexes.get(name)
        if m is None and name in self.sems:
            raise _kind_error(name, "mutex", "semaphore")
        if m is None or m.owner is None or (m.owner != owner and not force):
            if force:
                return
            who = "the controller" if owner == "" else f"container {owner}"
            raise NotHolderError(f"mutex {name!r} is not held by {who}: nothing was unlocked; "
                                 f"unlock(force=True) frees it whoever holds it")
        self._release(m)

    def mutex_token(self, name, owner) -> int | None:
        m = self.mutexes.get(name)
        if m is None and name in self.sems:
            raise _kind_error(name, "mutex", "semaphore")
        return m.token if m is not None and m.owner is not None and m.owner == owner else None

    def mutex_locked(self, name) -> bool:
        m = self.mutexes.get(name)
        if m is None and name in self.sems:
            raise _kind_error(name, "mutex", "semaphore")
        return m is not None and m.owner is not None

    def _release(self, m: _Mutex) -> None:
        m.owner = None
        while m.waiters:
            w = m.waiters.popleft()
            if w.timer is not None:
                w.timer.cancel()
            if not w.reply.alive or w.reply.done:
                continue
            self.grant(m, w.rec.id)

            def undo(m=m, cid=w.rec.id):
                if m.owner == cid and self.mutexes.get(m.name) is m:
                    self._release(m)
            w.reply.ok(True, undo=undo)
            return

    # ---- a container's end ----
    def container_reaped(self, cid: str) -> None:
        for s in list(self.sems.values()):
            try:
                if s.waiters:
                    s.waiters = deque(w for w in s.waiters if w.rec.id != cid)
                d = s.deltas.pop(cid, 0)
                if d:
                    s.value = max(0, s.value - d)
                    self._serve(s)
            except Exception:
                log.exception("recovering semaphore %r for container %s failed", s.name, cid)
        for m in list(self.mutexes.values()):
            try:
                if m.waiters:
                    m.waiters = deque(w for w in m.waiters if w.rec.id != cid)
                if m.owner == cid:
                    self._release(m)
            except Exception:
                log.exception("recovering mutex %r for container %s failed", m.name, cid)

    def inspect(self) -> dict:
        return {
            "semaphores": [
                {"name": s.name, "value": s.value, "protected": s.protected,
                 "waiters": len(s.waiters), "holders": dict(s.deltas)}
                for s in self.sems.values()],
            "mutexes": [
                {"name": m.name, "locked": m.owner is not None, "owner": m.owner,
                 "token": m.token if m.owner is not None else None, "waiters": len(m.waiters)}
                for m in self.mutexes.values()],
        }


def _args(args, n, proc):
    if len(args) == n:
        return args
    raise ValueError(f"{proc}: expected {n} arguments, got {len(args)}")


class _SyncBase(Plugin):
    """Holds the SyncState shared by the semaphore and mutex RPC plugins."""

    name = "sync"

    def ctrl_added(self, ctrl) -> None:
        if ctrl.plugin_data(self) is None:
            ctrl.set_plugin_data(self, SyncState(lambda: ctrl._loop))

    def ctrl_container_reaped(self, ctrl, rec) -> None:
        ctrl.plugin_data(self).container_reaped(rec.id)

    def inspect(self, ctrl) -> dict:
        return ctrl.plugin_data(self).inspect()


_sync_base = _SyncBase()


def _state(ctrl) -> SyncState:
    return ctrl.plugin_data(_sync_base)


class SemaphorePlugin(Plugin):
    name = "semaphore"
    prefix = "sem"
    provides = "semaphore"
    required = (_sync_base,)

    def ctrl_receive_call(self, ctrl, rec, proc, args, blob, reply) -> None:
        st = ctrl.plugin_data(_sync_base)
        # the hot procedures first
        if proc == "decrement":
            name, wait, timeout = _args(args, 3, proc)
            name = check_name(name)
            if check_bool(wait, "wait"):
                st.sem_wait(rec, name, check_timeout(timeout), reply)
            else:
                reply.ok(st.sem_try_decrement(rec.id, name))
        elif proc == "increment":
            reply.ok(st.sem_increment(rec.id, check_name(_args(args, 1, proc)[0])))
        elif proc == "add":
            name, n = _args(args, 2, proc)
            reply.ok(st.sem_increment(rec.id, check_name(name), check_int(n, "n", 1)))
        elif proc == "create":
            name, initial, protected = _args(args, 3, proc)
            reply.ok(st.sem_create(check_name(name), check_int(initial, "initial"),
                                   check_bool(protected, "protected")))
        elif proc == "get":
            reply.ok(st.sem_get(check_name(_args(args, 1, proc)[0])))
        elif proc == "destroy":
            st.sem_destroy(check_name(_args(args, 1, proc)[0]))
            reply.ok(None)
        else:
            raise ValueError(f"semaphore: no procedure {proc!r}")

    def _hot_calls(self, ctrl):
        """Binary ops answered at once by the controller (_Conn._serve_hot):
        fn(rec, name, flags) -> result, with the checks of ctrl_receive_call
        but check_name (the controller answers only names that pass it)."""
        st = ctrl.plugin_data(_sync_base)
        inc, dec, get = st.sem_increment, st.sem_try_decrement, st.sem_get
        return {1: lambda rec, name, flags: inc(rec.id, name),
                2: lambda rec, name, flags: dec(rec.id, name),   # no wait
                3: lambda rec, name, flags: get(name)}

    def backend(self, ctrl, role):
        if role == "container":
            from .._context import ctx
            return _SemClient(ctx.channel)
        return _SemLocal(_state(ctrl))


class MutexPlugin(Plugin):
    name = "mutex"
    prefix = "mutex"
    provides = "mutex"
    required = (_sync_base,)

    def ctrl_receive_call(self, ctrl, rec, proc, args, blob, reply) -> None:
        st = ctrl.plugin_data(_sync_base)
        if proc == "lock":
            name, timeout = _args(args, 2, proc)
            st.mutex_lock(rec, rec.id, check_name(name), check_timeout(timeout), reply)
        elif proc == "unlock":
            name, force = _args(args, 2, proc)
            st.mutex_unlock(check_name(name), rec.id, check_bool(force, "force"))
            reply.ok(None)
        elif proc == "token":
            reply.ok(st.mutex_token(check_name(_args(args, 1, proc)[0]), rec.id))
        elif proc == "locked":
            reply.ok(st.mutex_locked(check_name(_args(args, 1, proc)[0])))
        elif proc == "destroy":
            st.mutex_destroy(check_name(_args(args, 1, proc)[0]))
            reply.ok(None)
        else:
            raise ValueError(f"mutex: no procedure {proc!r}")

    def _hot_calls(self, ctrl):
        """As SemaphorePlugin._hot_calls: unlock (a lock may wait: not here)."""
        st = ctrl.plugin_data(_sync_base)
        unlock = st.mutex_unlock

        def unlock_now(rec, name, flags):
            unlock(name, rec.id, flags == 1)
        return {5: unlock_now}

    def backend(self, ctrl, role):
        if role == "container":
            from .._context import ctx
            return _MutexClient(ctx.channel)
        return _MutexLocal(_state(ctrl))


# ---- backends: what the public modules call ----

def _name_bytes(name) -> bytes:
    """*name* in UTF-8 when check_name accepts it as it is; else check_name
    raises (or normalises a str subclass).  The calls that go as binary
    frames (Channel.call_op) need the bytes anyway."""
    if type(name) is str:
        try:
            nb = name.encode("utf-8")
        except UnicodeEncodeError:
            nb = None
        if nb and len(nb) <= NAME_MAX_BYTES and b"\x00" not in nb:
            return nb
    return check_name(name).encode("utf-8")


_CACHE_MAX = 1024


def _cached(cache: dict, key, make):
    """cache[key], made by make(key) if missing; at most _CACHE_MAX
    entries (then cleared: names come and go)."""
    v = cache.get(key)
    if v is None:
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        v = cache[key] = make(key)
    return v


_SEM_OPS: dict = {}     # name -> (its UTF-8, a decrement's give-back: one increment)
_LOCK_UNDOS: dict = {}  # name -> a lock's give-back: the unlock


def _sem_ops(name: str) -> tuple:
    """(the name's bytes, a decrement's give-back) for a str *name*, cached;
    raises as check_name."""
    return _cached(_SEM_OPS, name, lambda n: (_name_bytes(n), undo_frame("sem.increment", [n])))


def _check_wait(wait, timeout):
    if wait is not True and wait is not False:
        raise TypeError(f"wait must be a bool, not {type(wait).__name__}")
    return check_timeout(timeout)


class _SemClient:
    """In a container: every operation is a call to the controller."""

    def __init__(self, channel):
        self._ch = channel

    def create(self, name, initial, protected):
        return self._ch.call("sem.create", [check_name(name), check_int(initial, "initial"),
                                            check_bool(protected, "protected")])[0]

    def increment(self, name):
        if type(name) is str:
            return self._ch.call_op(1, (_SEM_OPS.get(name) or _sem_ops(name))[0])[0]
        return self._ch.call_op(1, _name_bytes(name))[0]

    def add(self, name, n):
        return self._ch.call("sem.add", [check_name(name), check_int(n, "n", 1)])[0]

    @staticmethod
    def _undo(name):
        """A decrement's give-back (Channel.call): one increment."""
        return _sem_ops(name)[1]

    def decrement(self, name, wait=False, timeout=None):
        if wait is False and timeout is None and type(name) is str:     # the usual call
            ops = _SEM_OPS.get(name) or _sem_ops(name)
            return self._ch.call_op(2, ops[0], 0, ops[1])[0]
        timeout = _check_wait(wait, timeout)
        if not wait:
            nb = _name_bytes(name)
            return self._ch.call_op(2, nb, 0, self._undo(name))[0]
        name = check_name(name)
        if timeout != 0:
            warn_if_on_loop("semaphore.decrement(wait=True)",
                            "await semaphore.decrement_async(name, wait=True)")
        return self._ch.call("sem.decrement", [name, wait, timeout], undo=self._undo(name))[0]

    async def decrement_async(self, name, wait=False, timeout=None):
        timeout = _check_wait(wait, timeout)
        name = check_name(name)
        return (await self._ch.acall("sem.decrement", [name, wait, timeout], undo=self._undo(name)))[0]

    def get(self, name):
        return self._ch.call_op(3, _name_bytes(name))[0]

    def destroy(self, name):
        self._ch.call("sem.destroy", [check_name(name)])


class _SemLocal:
    """In the controller process: direct, and never blocking."""

    def __init__(self, state: SyncState):
        self._st = state

    def create(self, name, initial, protected):
        return self._st.sem_create(check_name(name), check_int(initial, "initial"),
                                   check_bool(protected, "protected"))

    def increment(self, name):
        return self._st.sem_increment(None, check_name(name))

    def add(self, name, n):
        return self._st.sem_increment(None, check_name(name), check_int(n, "n", 1))

    def decrement(self, name, wait=False, timeout=None):
        timeout = _check_wait(wait, timeout)
        r = self._st.sem_try_decrement(None, check_name(name))
        if r < 0 and wait and timeout != 0:
            raise WouldBlockError("decrement(wait=True) would block the controller's loop; "
                                  "wait in a container instead")
        return r

    async def decrement_async(self, name, wait=False, timeout=None):
        return self.decrement(name, wait, timeout)

    def get(self, name):
        return self._st.sem_get(check_name(name))

    def destroy(self, name):
        self._st.sem_destroy(check_name(name))


class _MutexClient:
    def __init__(self, channel):
        self._ch = channel

    @staticmethod
    def _undo(name):
        """A lock's give-back (Channel.call): the unlock."""
        return _cached(_LOCK_UNDOS, name, lambda n: undo_frame("mutex.unlock", [n, False]))

    def lock(self, name, timeout=None):
        timeout = check_timeout(timeout)
        if timeout != 0:
            warn_if_on_loop("Mutex.lock()", "await m.lock_async() or async with m")
        return self._ch.call("mutex.lock", [name, timeout], undo=self._undo(name))[0]

    async def lock_async(self, name, timeout=None):
        timeout = check_timeout(timeout)
        return (await self._ch.acall("mutex.lock", [name, timeout], undo=self._undo(name)))[0]

    def unlock(self, name, force=False):
        self._ch.call_op(5, _name_bytes(name), 1 if check_bool(force, "force") else 0)

    def token(self, name):
        return self._ch.call("mutex.token", [check_name(name)])[0]

    def locked(self, name):
        return self._ch.call("mutex.locked", [check_name(name)])[0]

    def destroy(self, name):
        self._ch.call("mutex.destroy", [check_name(name)])


class _MutexLocal:
    def __init__(self, state: SyncState):
        self._st = state

    def lock(self, name, timeout=None):
        timeout = check_timeout(timeout)
        m = self._st._mutex(name)
        if m.owner is None:
            self._st.grant(m, "")
            return True
        if timeout == 0:
            return False
        raise WouldBlockError("lock() on a held mutex would block the controller's loop")

    async def lock_async(self, name, timeout=None):
        return self.lock(name, timeout)

    def unlock(self, name, force=False):
        self._st.mutex_unlock(check_name(name), "", check_bool(force, "force"))

    def token(self, name):
        return self._st.mutex_token(check_name(name), "")

    def locked(self, name):
        return self._st.mutex_locked(check_name(name))

    def destroy(self, name):
        self._st.mutex_destroy(check_name(name))
