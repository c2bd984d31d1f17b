"""The accelerator's per-handle cache of core handles (csrc/fast/handles.c, H1-H4) and
its routing of by-name calls (R1, R2) never change what a call does.

Every test runs each way a program reaches a semaphore or mutex -- by name
(``semaphore.decrement(name)``, ``mutex.access(name).lock()``), through a
handle of ``access`` kept across calls, and through a ``Domain``'s handle --
once with the accelerator and once without it ("closures": the Python
methods, the reference), and checks the same results: a name destroyed and
created again (here or in another process) is the new object, a slot taken
over by another name is never reached through an old handle, a forked child
inherits correct caches, errors are the by-name errors, a closed domain
refuses, and the handles follow the process's backend when it changes.
Real forked processes, real SIGKILL, real shared memory."""

from __future__ import annotations

import os
import signal

import pytest

import netplex_native as netplex
from netplex_native import errors, mutex, semaphore
from netplex_native._context import ctx
from netplex_native.domain import Domain as PublicDomain
from netplex_native.native import domain as _native
from netplex_native.native.plugins import _NativeMutex, _NativeSem

from native_helpers import exited_ok, mtx, reap, sem
from harness import fork_call

pytestmark = pytest.mark.timeout(60)

PATHS = ["by_name", "access", "domain"]


class World:
    """A private segment (core Domain), its public Domain, and this process's
    backends (ctx) on it, as in a container."""

    def __init__(self, accelerated: bool, semaphores: int = 64) -> None:
        fast = _native._fast
        if not accelerated:
            _native._fast = None          # the Domain binds Python entry points
        try:
            self.core = _native.Domain.create(semaphores=semaphores, mutexes=64, processes=16)
        finally:
            _native._fast = fast
        self.pub = PublicDomain(self.core)
        ctx.role = "container"
        ctx.set_backends({"semaphore": _NativeSem(self.core, "container"),
                          "mutex": _NativeMutex(self.core, "container")})

    def close(self) -> None:
        ctx.reset()
        self.core.unlink()
        self.core.close()

    def sem(self, path: str, name: str):
        """(decrement, increment) of semaphore name along path."""
        if path == "by_name":
            return (lambda: semaphore.decrement(name)), (lambda: semaphore.increment(name))
        h = semaphore.access(name) if path == "access" else self.pub.semaphore(name)
        return h.decrement, h.increment

    def mtx(self, path: str, name: str):
        """(lock, unlock) of mutex name along path."""
        if path == "by_name":
            return (lambda: mutex.access(name).lock()), (lambda: mutex.access(name).unlock())
        m = mutex.access(name) if path == "access" else self.pub.mutex(name)
        return m.lock, m.unlock


@pytest.fixture(params=["accelerated", "closures"])
def world(request):
    w = World(request.param == "accelerated")
    yield w
    w.close()


@pytest.fixture(params=PATHS)
def path(request):
    return request.param


def in_child(fn) -> None:
    """Run fn in a forked child; the test fails if it raised."""
    assert exited_ok(reap(fork_call(fn))), "the child failed (its traceback is above)"


def test_the_accelerator_serves_the_handles_and_the_by_name_calls(world):
    """Not a behaviour: that the other tests here test the cached paths."""
    from netplex_native import _fast
    if world.core._binder is None:
        return
    assert isinstance(world.core._binder, _fast.Binder)
    assert "increment" not in semaphore.Semaphore.__dict__     # served by SemaphoreBase
    assert "lock" not in mutex.Mutex.__dict__ and "unlock" not in mutex.Mutex.__dict__
    assert type(semaphore.decrement).__name__ == "builtin_function_or_method"
    import inspect
    assert str(inspect.signature(semaphore.decrement)) == "(name, *, wait=False, timeout=None)"
    assert semaphore.decrement.__doc__.startswith("-1 if the value is positive")
    assert semaphore.decrement.__module__ == "netplex_native.semaphore"


def test_a_name_destroyed_and_created_again_here_is_the_new_object(world, path):
    core = world.core
    core.sem_create("x", 1)
    dec, inc = world.sem(path, "x")
    assert dec() == 0 and inc() == 1                 # the handle is cached now
    core.sem_destroy("x")
    assert core.sem_create("x", 7)
    assert dec() == 6 and inc() == 7 and dec() == 6
    assert core.sem_get("x") == 6

    lock, unlock = world.mtx(path, "m")
    assert lock() is True
    t1 = core.mutex_token("m")
    unlock()
    core.mutex_destroy("m")
    assert lock() is True                            # created again, unlocked, then locked
    assert mtx(core, "m")["owner_pid"] == os.getpid() and core.mutex_token("m") > t1
    unlock()
    assert mtx(core, "m")["locked"] is False


def test_a_name_destroyed_and_created_again_by_another_process_is_the_new_object(world, path):
    core = world.core
    core.sem_create("x", 1)
    dec, inc = world.sem(path, "x")
    lock, unlock = world.mtx(path, "m")
    assert dec() == 0 and inc() == 1 and lock() is True
    unlock()
    t1 = mtx(core, "m")["token"]

    def other():
        core.sem_destroy("x")
        assert core.sem_create("x", 40)
        core.mutex_destroy("m")
        assert core.mutex_trylock("m")               # a new incarnation, held by the child
        core.mutex_unlock("m")
    in_child(other)
    assert dec() == 39 and inc() == 40
    assert lock() is True and mtx(core, "m")["token"] > t1
    unlock()


def test_a_name_destroyed_elsewhere_and_not_created_again_is_created_as_a_by_name_call_does(world, path):
    """Implicit creation: at 0, protected -- through a cached handle too."""
    core = world.core
    core.sem_create("x", 3, protected=False)
    dec, inc = world.sem(path, "x")
    assert dec() == 2 and inc() == 3
    in_child(lambda: core.sem_destroy("x"))
    assert sem(core, "x") is None
    assert dec() == -1
    s = sem(core, "x")
    assert s is not None and s["value"] == 0 and s["protected"] is True
    assert inc() == 1


def test_a_name_created_again_as_the_other_kind_raises_the_by_name_error(world, path):
    core = world.core
    core.sem_create("x", 1)
    dec, inc = world.sem(path, "x")
    assert dec() == 0 and inc() == 1

    def other():
        core.sem_destroy("x")
        assert core.mutex_trylock("x")
        core.mutex_unlock("x")
    in_child(other)
    for call in (dec, inc):
        with pytest.raises(ValueError, match="name 'x' is a mutex, not a semaphore"):
            call()
    assert mtx(core, "x")["locked"] is False        # nothing changed


def test_two_names_used_in_turn_by_name_each_reach_their_own_object_after_they_swap_slots(world):
    """The by-name calls keep the two names last used per kind in front of the
    dict (a hand-off alternates two semaphores): after another process destroys
    both and creates them again in each other's slot, each name still reaches
    its own object."""
    core = world.core
    assert core.sem_create("a", 10) and core.sem_create("b", 20)
    slot = {n: core._handle(_native._SEM, n) & 0xffffffff for n in "ab"}
    for _ in range(3):                                # both cached now
        assert semaphore.increment("a") and semaphore.increment("b")
        assert semaphore.decrement("a") >= 0 and semaphore.decrement("b") >= 0
    assert (core.sem_get("a"), core.sem_get("b")) == (10, 20)

    def swap():
        core.sem_destroy("b")
        core.sem_destroy("a")                         # a's slot is the first free one
        assert core.sem_create("b", 200)
        assert core.sem_create("a", 100)
    in_child(swap)
    for _ in range(3):
        assert semaphore.increment("a") in (101, 102, 103)
        assert semaphore.increment("b") in (201, 202, 203)
    assert (core.sem_get("a"), core.sem_get("b")) == (103, 203)
    core._sems.clear()
    moved = {n: core._handle(_native._SEM, n) & 0xffffffff for n in "ab"}
    assert moved == {"a": slot["b"], "b": slot["a"]}  # they did swap


def test_slots_taken_over_by_other_names_are_never_reached_through_old_handles(monkeypatch, path):
    """300 names cached, all destroyed by another process and created again
    after one more: most names now live in a slot another name had (checked),
    and every handle reaches its own name's new object.  The Domain's own
    cache is kept small so that it is emptied meanwhile (the handles' caches
    are not)."""
    for accelerated in (True, False):
        w = World(accelerated, semaphores=512)
        try:
            monkeypatch.setattr(_native, "HANDLE_CACHE_MAX", 32)
            core, n = w.core, 300
            names = [f"n{i}" for i in range(n)]
            for i, name in enumerate(names):
                assert core.sem_create(name, i + 1)
            slot_before = {name: core._handle(_native._SEM, name) & 0xffffffff for name in names}
            ops = [w.sem(path, name) for name in names]
            for i, (dec, inc) in enumerate(ops):
                assert dec() == i and inc() == i + 1

            def other():
                for name in names:
                    core.sem_destroy(name)
                assert core.sem_create("decoy", 0)    # takes the first free slot
                for i, name in enumerate(names):
                    assert core.sem_create(name, 1000 + i)
            in_child(other)
            for i, (dec, inc) in enumerate(ops):
                assert dec() == 999 + i, names[i]
                assert inc() == 1000 + i
            core._sems.clear()
            slot_after = {name: core._handle(_native._SEM, name) & 0xffffffff for name in names}
            owners_before = {s: name for name, s in slot_before.items()}
            moved = sum(1 for name in names
                        if owners_before.get(slot_after[name], name) != name)
            assert moved > n // 2, moved
            assert [core.sem_get(name) for name in names] == [1000 + i for i in range(n)]
        finally:
            monkeypatch.undo()
            w.close()


def test_a_forked_child_uses_its_inherited_caches_after_the_names_changed(world, path):
    core = world.core
    core.sem_create("x", 1)
    dec, inc = world.sem(path, "x")
    lock, unlock = world.mtx(path, "m")
    assert dec() == 0 and inc() == 1 and lock() is True
    unlock()
    go_r, go_w = os.pipe()

    def child():
        os.close(go_w)
        assert os.read(go_r, 1) == b"g"               # the parent changed both names
        assert dec() == 4 and inc() == 5
        assert lock() is True and mtx(core, "m")["owner_pid"] == os.getpid()
        unlock()
    pid = fork_call(child)
    os.close(go_r)
    core.sem_destroy("x")
    assert core.sem_create("x", 5)
    core.mutex_destroy("m")
    os.write(go_w, b"g")
    os.close(go_w)
    assert exited_ok(reap(pid))
    assert core.sem_get("x") == 5 and mtx(core, "m")["locked"] is False
    assert dec() == 4 and inc() == 5                 # and the parent's caches too


def test_a_forked_child_killed_holding_through_inherited_caches_gives_back_after_recover(world, path):
    """The child's first calls are through caches it inherited: it is still
    registered, and what it took is given back when it is recovered."""
    core = world.core
    core.sem_create("p", 2, protected=True)
    dec, inc = world.sem(path, "p")
    lock, unlock = world.mtx(path, "m")
    assert dec() == 1 and inc() == 2 and lock() is True
    unlock()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            ok = dec() == 1 and lock() is True
            os.write(w, b"y" if ok else b"n")
            signal.pause()
        finally:
            os._exit(1)
    os.close(w)
    try:
        assert os.read(r, 1) == b"y"
        assert core.sem_get("p") == 1 and mtx(core, "m")["owner_pid"] == pid
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        reap(pid)
    assert core.recover(pid, timeout=10) == 1
    assert core.sem_get("p") == 2 and mtx(core, "m")["locked"] is False
    assert lock() is True
    unlock()


def test_bad_names_and_arguments_raise_what_the_by_name_calls_raise(world):
    """Nothing changes either."""
    core = world.core
    core.sem_create("x", 1)
    h = semaphore.access("x")
    d = world.pub.semaphore("x")
    m, dm = mutex.access("m"), world.pub.mutex("m")
    for bad in ("", "a\x00b", "é" * 200, 5):
        with pytest.raises((TypeError, ValueError)) as by_name:
            semaphore.increment(bad)
        with pytest.raises(type(by_name.value)) as via:
            semaphore.access(bad)
        assert str(via.value) == str(by_name.value)
    long = "é" * 200
    for s in (h, d):
        assert s.decrement() == 0 and s.increment() == 1       # cached
    h.name = long                                 # a Semaphore's name may be assigned
    with pytest.raises(ValueError) as via:
        h.increment()
    with pytest.raises(ValueError) as by_name:
        semaphore.increment(long)
    assert str(via.value) == str(by_name.value) and "at most 255" in str(via.value)
    h.name = "x"
    assert h.decrement() == 0 and h.increment() == 1
    for s in (h, d):
        for call, exc in ((lambda: s.decrement(wait="yes"), TypeError),
                          (lambda: s.decrement(timeout=-1), ValueError),
                          (lambda: s.decrement(1), TypeError),
                          (lambda: s.increment(1), TypeError),
                          (lambda: s.release(0), ValueError),
                          (lambda: s.acquire(blocking="x"), TypeError),
                          (lambda: s.acquire(False, 1.0), ValueError),
                          (lambda: s.__exit__(None, None), TypeError)):
            with pytest.raises(exc):
                call()
    assert core.sem_get("x") == 1
    with pytest.raises(ValueError) as by_name:
        semaphore.decrement("x", wait=True, timeout=-1)
    with pytest.raises(ValueError) as via:
        h.decrement(wait=True, timeout=-1)
    assert str(via.value) == str(by_name.value)

    core.sem_create("big", errors.VALUE_MAX)
    big = semaphore.access("big")
    assert big.decrement() == errors.VALUE_MAX - 1 and big.increment() == errors.VALUE_MAX
    with pytest.raises(OverflowError) as via:
        big.increment()
    with pytest.raises(OverflowError) as by_name:
        semaphore.increment("big")
    assert str(via.value) == str(by_name.value)
    assert core.sem_get("big") == errors.VALUE_MAX

    for mm in (m, dm):
        with pytest.raises(netplex.NotHolderError) as via:
            mm.unlock()
        with pytest.raises(netplex.NotHolderError) as also:
            mm.release()
        assert str(via.value) == str(also.value) and "not held by this process" in str(via.value)
        for call, exc in ((lambda: mm.lock(timeout=-1), ValueError),
                          (lambda: mm.lock(1, 2), TypeError),
                          (lambda: mm.unlock(force="yes"), TypeError),
                          (lambda: mm.acquire(False, 1.0), ValueError)):
            with pytest.raises(exc):
                call()
        assert mm.lock() is True and mm.lock(timeout=0) is False
        mm.unlock()
        with pytest.raises(netplex.NotHolderError):
            mm.unlock()
    assert mtx(core, "m")["locked"] is False


def test_every_hot_method_of_a_closed_domain_raises_closed():
    for accelerated in (True, False):
        w = World(accelerated)
        core = w.core
        core.sem_create("x", 5)
        handles = [semaphore.access("x"), w.pub.semaphore("x")]
        mutexes = [mutex.access("m"), w.pub.mutex("m")]
        for s in handles:
            assert s.decrement() >= 0 and s.increment() >= 1      # cached
        for m in mutexes:
            assert m.lock() is True
            m.unlock()
        core.unlink()
        core.close()
        calls = [lambda: semaphore.decrement("x"), lambda: semaphore.increment("x")]
        for s in handles:
            calls += [s.decrement, s.increment, s.acquire, s.release, s.__enter__,
                      lambda s=s: s.__exit__(None, None, None)]
        for m in mutexes:
            calls += [m.lock, m.unlock, m.acquire, m.release, m.__enter__,
                      lambda m=m: m.__exit__(None, None, None)]
        try:
            for call in calls:
                with pytest.raises(errors.SegmentError, match="closed"):
                    call()
        finally:
            ctx.reset()


def test_handles_and_by_name_calls_follow_the_process_backend_when_it_changes():
    """A handle's cache belongs to one segment's accelerator: after ctx's
    backend changes (a new segment, or none) the handle acts on the new one."""
    a = World(True)
    b = _native.Domain.create(semaphores=8, mutexes=8, processes=8)
    try:
        a.core.sem_create("x", 3)
        for pad in ("pad0", "pad1", "pad2"):          # x is in another slot in b
            b.sem_create(pad, 0)
            b.mutex_trylock(pad + "m")
            b.mutex_unlock(pad + "m")
        b.sem_create("x", 10)
        h, m = semaphore.access("x"), mutex.access("m")
        assert h.decrement() == 2 and semaphore.decrement("x") == 1
        assert m.lock() is True
        m.unlock()
        ctx.set_backends({"semaphore": _NativeSem(b, "container"),
                          "mutex": _NativeMutex(b, "container")})
        assert h.decrement() == 9 and semaphore.decrement("x") == 8 and h.increment() == 9
        assert m.lock() is True
        assert mtx(b, "m")["locked"] is True and mtx(a.core, "m")["locked"] is False
        m.unlock()
        assert a.core.sem_get("x") == 1
        ctx.set_backends({"semaphore": _NativeSem(b, "controller"),
                          "mutex": _NativeMutex(b, "controller")})
        with pytest.raises(netplex.WouldBlockError):          # the controller's rules
            semaphore.access("y").acquire()
        ctx.reset()                                           # outside any container
        for call in (h.decrement, h.increment, m.lock, m.unlock,
                     lambda: semaphore.decrement("x"), lambda: semaphore.increment("x")):
            with pytest.raises(netplex.NotInContainerError):
                call()
    finally:
        b.unlink()
        b.close()
        a.close()


def test_copies_of_handles_name_the_same_object(world):
    import copy
    import pickle
    world.core.sem_create("x", 2)
    h = semaphore.access("x")
    for c in (copy.copy(h), copy.deepcopy(h), pickle.loads(pickle.dumps(h))):
        assert type(c) is semaphore.Semaphore and c.name == "x"
    assert copy.copy(h).decrement() == 1 and h.decrement() == 0
    m = mutex.access("m")
    c = pickle.loads(pickle.dumps(m))
    assert c.lock() is True and m.locked()
    m.unlock()
    d = world.pub.semaphore("x")
    assert copy.copy(d)._be is d._be and copy.copy(d).increment() == 1
    # a Domain's handle: deepcopy shares the Domain (found by an attack: it
    # tried to copy the Domain); pickling it is refused, clearly
    dm = world.pub.mutex("m")
    assert copy.deepcopy(d)._be is d._be and copy.deepcopy(dm)._be is dm._be
    for bound in (d, dm):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(bound)


def test_a_subclass_overriding_a_hot_method_or_name_behaves_as_without_the_accelerator(world):
    """Found by an attack: the C methods skipped a subclass's overrides (its
    lock() under `with`, its acquire() under `with s`) and read the base's
    name slot instead of the subclass's `name` property."""
    calls = []

    class LoggedMutex(mutex.Mutex):
        def lock(self, timeout=None):
            calls.append("lock")
            return super().lock(timeout)

        def unlock(self, force=False):
            calls.append("unlock")
            super().unlock(force)

    class LoggedSem(semaphore.Semaphore):
        def acquire(self, blocking=True, timeout=None):
            calls.append("acquire")
            return super().acquire(blocking, timeout)

        def release(self, n=1):
            calls.append("release")
            super().release(n)

    world.core.sem_create("s", 1)
    m, s = LoggedMutex("m"), LoggedSem("s")
    for _ in range(3):                          # the second round on is cached
        del calls[:]
        with m:
            pass
        assert m.acquire() is True
        m.release()
        with s:
            pass
        assert calls == ["lock", "unlock", "lock", "unlock", "acquire", "release"], calls

    class Prefixed(semaphore.Semaphore):
        @property                               # type: ignore[override]
        def name(self):
            return "app." + super().name

        @name.setter
        def name(self, v):
            semaphore.Semaphore.name.__set__(self, v)   # type: ignore[attr-defined]

    world.core.sem_create("raw", 10)
    world.core.sem_create("app.raw", 100)
    p = Prefixed("raw")
    assert [p.decrement(), p.decrement(), p.increment()] == [99, 98, 99]
    assert p.get() == 99 and world.core.sem_get("raw") == 10


def test_waits_with_timeouts_through_cached_handles_end_as_by_name_waits_do(world):
    """A wait is never the plain case: the Python method does it, timeout and all."""
    core = world.core
    core.sem_create("e", 1)
    for s in (semaphore.access("e"), world.pub.semaphore("e")):
        assert s.acquire() is True                      # cached; the value is 0 now
        assert s.acquire(timeout=0.05) is False
        assert s.decrement(wait=True, timeout=0.05) == -1
        assert s.acquire(False) is False and s.decrement() == -1
        s.release()
    assert semaphore.decrement("e", wait=True, timeout=0.05) == 0
    assert semaphore.decrement("e", wait=True, timeout=0.05) == -1
    assert core.sem_get("e") == 0
    for m in (mutex.access("l"), world.pub.mutex("l")):
        assert m.lock() is True
        assert m.lock(timeout=0.05) is False and m.acquire(timeout=0.05) is False
        assert m.acquire(False) is False
        m.release()
    assert mtx(core, "l")["locked"] is False


def test_processes_locking_through_cached_handles_exclude_each_other(world):
    """4 processes x 3,000 read-increment-write of a shared counter under the
    same mutex (through access handles, Domain handles, lock/unlock and with)
    and of another under a semaphore of 1: no update is lost."""
    import mmap
    import struct
    core = world.core
    core.sem_create("one", 1)
    counters = mmap.mmap(-1, 16)
    handles = (mutex.access("x"), world.pub.mutex("x"), semaphore.access("one"))
    for h in handles:                                   # cached before the fork
        with h:
            pass
    k, n = 4, 3000

    def work():
        for i in range(n):
            h = handles[i % 3]
            off = 8 if h is handles[2] else 0
            if i % 2:
                with h:
                    v = struct.unpack_from("q", counters, off)[0]
                    if i % 64 == 1:
                        os.sched_yield()
                    struct.pack_into("q", counters, off, v + 1)
            else:
                assert (h.acquire() if off else h.lock()) is True
                v = struct.unpack_from("q", counters, off)[0]
                struct.pack_into("q", counters, off, v + 1)
                h.release() if off else h.unlock()
    kids = [fork_call(work) for _ in range(k)]
    for pid in kids:
        assert exited_ok(reap(pid, timeout=50))
    assert struct.unpack_from("qq", counters, 0) == (k * n * 2 // 3, k * n // 3)
    assert core.sem_get("one") == 1 and mtx(core, "x")["locked"] is False
