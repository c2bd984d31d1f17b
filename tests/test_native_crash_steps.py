"""Crash at every step: a child is SIGKILLed at the n-th crash point of one mutating
operation, for n = 1, 2, ... until the operation completes; after recover(pid) the
segment is consistent and shows exactly the state before or after the operation."""

import os
import signal
import time
import traceback

import pytest

from netplex_native.native import domain as _native


MAX_STEPS = 200
STEPS = {}          # op -> number of crash points (reported at the end)




PATHS = ("fast", "guarded")


def on_path(path, prepare):
    """prepare, in a child whose mutex calls take `path': "fast" (the one-CAS
    path of csrc/mutex_fast.h, open when nobody waits) or "guarded" (the
    redo-logged path under the object's guard, which it takes when the fast
    path is closed)."""
    def run():
        if path == "guarded":
            assert _native._lib.np_test_fast_mutex(0) == 0
        prepare()
    return run


def sem(dom, name):
    return next((o for o in dom.semaphores() if o["name"] == name), None)


def mtx(dom, name):
    return next((o for o in dom.mutexes() if o["name"] == name), None)


def run_child(dom, n, prepare, op, register_first=True):
    """Fork a test-mode child that prepares, arms the n-th crash point and runs op.
    Returns (pid, crashed)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ["NETPLEX_CORE_TEST"] = "1"
            if register_first:
                dom.register()
            prepare()
            assert _native._lib.np_test_crash_after(n) == 0
            op()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def reap(pid, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        p, status = os.waitpid(pid, os.WNOHANG)
        if p:
            if os.WIFSIGNALED(status):
                assert os.WTERMSIG(status) == signal.SIGKILL
                return True
            assert os.waitstatus_to_exitcode(status) == 0, "child failed"
            return False
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("child hung")


def enumerate_crashes(dom, op_name, setup, prepare, op, verify, during=None, register_first=True):
    """The loop shared by every operation; returns the number of crash points."""
    for n in range(1, MAX_STEPS):
        before = setup()
        pid = run_child(dom, n, prepare, op, register_first)
        if during:
            during(pid)
        crashed = reap(pid)
        dom.recover(pid)
        dom.check()
        assert pid not in [p["pid"] for p in dom.processes()]
        verify(before, crashed, n)
        if not crashed:
            STEPS[op_name] = n - 1
            assert n - 1 >= 1, f"{op_name} has no crash point"
            return n - 1
    raise AssertionError(f"{op_name} still crashing after {MAX_STEPS} steps")


@pytest.mark.timeout(120)
def test_sem_create_is_atomic_at_every_crash_point(dom):
    def setup():
        dom.sem_destroy("s")
    def verify(_, crashed, n):
        info = sem(dom, "s")
        assert info is None or (info["value"] == 5 and info["waiters"] == 0), (n, info)
        assert dom.sem_create("s", 5) is (info is None)
        assert dom.sem_get("s") == 5
    enumerate_crashes(dom, "sem create", setup, lambda: None,
                      lambda: dom.sem_create("s", 5), verify)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protected", [True, False], ids=["protected", "unprotected"])
@pytest.mark.parametrize("units", [1, 1000], ids=["increment", "add"])
def test_sem_increment_is_atomic_at_every_crash_point(dom, protected, units):
    """An increment, and release(n)'s np_sem_add: its n units in one
    transaction, never a part of them."""
    dom.sem_create("s", 3, protected=protected)
    def setup():
        return dom.sem_get("s")
    def verify(before, crashed, n):
        v = dom.sem_get("s")
        # protected: the dead child's delta is reverted whatever step it died at
        assert v == (before if protected else v) and v in (before, before + units), (n, before, v)
        assert dom.sem_delta("s", os.getpid()) == 0
    op = (lambda: dom.sem_increment("s")) if units == 1 else (lambda: dom.sem_add("s", units))
    enumerate_crashes(dom, f"sem {'increment' if units == 1 else 'add'} "
                           f"({'protected' if protected else 'unprotected'})",
                      setup, lambda: dom.sem_get("s"), op, verify)


@pytest.mark.timeout(120)
def test_protected_sem_decrement_is_atomic_at_every_crash_point(dom):
    dom.sem_create("s", 3, protected=True)
    def verify(before, crashed, n):
        info = sem(dom, "s")
        assert info["value"] == 3 and info["holders"] == {} and info["waiters"] == 0, (n, info)
    enumerate_crashes(dom, "sem decrement (protected)", lambda: None, lambda: dom.sem_get("s"),
                      lambda: dom.sem_decrement("s"), verify)


@pytest.mark.timeout(120)
def test_sem_decrement_with_a_completed_wait_is_atomic_at_every_crash_point(dom):
    """The child queues, the parent posts once, the child takes the count."""
    dom.sem_create("s", 0, protected=True)
    def setup():
        # start every round from value 0 with nobody queued
        while dom.sem_decrement("s") >= 0:
            pass
    def during(pid):
        end = time.monotonic() + 10
        while time.monotonic() < end:
            info = sem(dom, "s")
            if info["waiters"] == 1:
                dom.sem_increment("s")
                return
            if _dead(pid):
                return
            time.sleep(0.001)
        raise AssertionError("child neither queued nor died")
    def verify(before, crashed, n):
        info = sem(dom, "s")
        assert info["waiters"] == 0, (n, info)
        posted = dom.sem_delta("s", os.getpid())
        # what the parent posted is still there: the dead child's take was reverted
        assert info["value"] == posted and posted in (0, 1), (n, info, posted)
        assert set(info["holders"]) <= {os.getpid()}
    enumerate_crashes(dom, "sem decrement with wait", setup, lambda: dom.sem_get("s"),
                      lambda: dom.sem_decrement("s", wait=True, timeout=10), verify, during)


def _dead(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


@pytest.mark.timeout(120)
def test_sem_destroy_is_atomic_at_every_crash_point(dom):
    def setup():
        dom.sem_create("s", 2)
    def verify(_, crashed, n):
        info = sem(dom, "s")
        assert info is None or info["value"] == 2, (n, info)
        assert dom.sem_create("s", 9) is (info is None)
        dom.sem_destroy("s")
    enumerate_crashes(dom, "sem destroy", setup, lambda: dom.sem_get("s"),
                      lambda: dom.sem_destroy("s"), verify)


def name_home(dom, name):
    """The name table's home entry of name (its keyed hash: csrc/names.c N7)."""
    h = _native._lib.np_name_home_of(dom._dom(), name.encode())
    assert h >= 0
    return h


def colliding_names(dom, homes, prefix="c"):
    """One distinct name per wanted home entry of dom's table, in order."""
    out, i = [], 0
    for want in homes:
        while name_home(dom, f"{prefix}{i}") != want:
            i += 1
        out.append(f"{prefix}{i}")
        i += 1
    return out


def cluster(dom):
    """Five names in one probe cluster from an empty stretch at h: A and B both
    at home h, C at h+1, D at h+2 (each shifted one on), E at home h+4.  Destroying A
    closes its hole by three backward shifts (B, C, D move; E cannot)."""
    h = 40                                  # above what other names of the test occupy
    names = colliding_names(dom, [h, h, h + 1, h + 2, h + 4])
    for i, n in enumerate(names):
        assert dom.sem_create(n, 10 + i)
    assert dom.name_stats()["longest_probe"] >= 2
    return names


def found_value(dom, name):
    """The value of name, found by a lookup in the name table (not the handle
    cache); a name the table lost would be created again with value 0."""
    dom._sems.pop(name, None)
    return dom.sem_get(name)


@pytest.mark.timeout(120)
def test_destroy_closing_its_hole_is_atomic_at_every_crash_point(dom):
    """The child destroys the head of a probe cluster and dies at any step of
    the transaction or of the backward shifts that close the hole: every other
    name is still found with its value, at most one tombstone is left, and the
    next holder of the name table's guard closes it."""
    names = cluster(dom)
    def setup():
        for n in names:
            dom.sem_destroy(n)
        for i, n in enumerate(names):
            assert dom.sem_create(n, 10 + i)
    def verify(_, crashed, n):
        a = sem(dom, names[0])
        assert a is None or a["value"] == 10, n
        for i, name in enumerate(names[1:], 1):
            assert found_value(dom, name) == 10 + i, (n, name)
        assert dom.name_stats()["tombstones"] <= 1
        dom.sem_destroy("missing")          # takes the name guard: closes a pending hole
        assert dom.name_stats()["tombstones"] == 0, n
        dom.check()
    steps = enumerate_crashes(dom, "sem destroy closing a hole", setup, lambda: None,
                              lambda: dom.sem_destroy(names[0]), verify)
    assert steps >= 12                      # the shifts have their own crash points


@pytest.mark.timeout(120)
def test_the_next_lookup_closing_a_dead_destroyers_hole_is_atomic_at_every_crash_point(dom):
    """A destroyer died right after removing the name (the hole left open); a
    second process looks a name up, which first closes the hole, and dies at
    any step of it: the names are intact and the hole is still closed later."""
    names = cluster(dom)
    def setup():
        for n in names:
            dom.sem_destroy(n)
        for i, n in enumerate(names):
            assert dom.sem_create(n, 10 + i)
        for k in range(1, MAX_STEPS):       # the destroyer dies with the hole open
            pid = run_child(dom, k, lambda: None, lambda: dom.sem_destroy(names[0]))
            assert reap(pid)
            dom.recover(pid)
            dom.check()
            if sem(dom, names[0]) is None:
                break
        assert dom.name_stats()["tombstones"] == 1
    def verify(_, crashed, n):
        assert dom.name_stats()["tombstones"] <= (1 if crashed else 0), n
        for i, name in enumerate(names[1:], 1):
            assert found_value(dom, name) == 10 + i, (n, name)
        dom.sem_destroy("missing")
        assert dom.name_stats()["tombstones"] == 0, n
        dom.check()
    enumerate_crashes(dom, "lookup closing a dead destroyer's hole", setup, lambda: None,
                      lambda: dom.sem_destroy("absent"), verify)


def _lock_unlock(dom, name):
    """Take and give back *name* in the parent: its token, and the mutex free."""
    assert dom.mutex_trylock(name) is True
    t = dom.mutex_token(name)
    dom.mutex_unlock(name)
    return t


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", PATHS)
def test_mutex_lock_is_atomic_at_every_crash_point(dom, path):
    """A grant and its fencing token are one transaction: whatever step the
    child dies at, the token was handed out once or not at all, and the next
    holder's token is larger than every earlier one."""
    last = [_lock_unlock(dom, "m")]
    def setup():
        return mtx(dom, "m")["token"]
    def verify(before, crashed, n):
        info = mtx(dom, "m")
        assert info["locked"] is False and info["waiters"] == 0, (n, info)
        assert info["token"] in (before, before + 1), (n, before, info)
        t = _lock_unlock(dom, "m")
        assert t == info["token"] + 1 and t > last[0], (n, t, last)
        last[0] = t
    steps = enumerate_crashes(dom, f"mutex lock ({path})", setup,
                              on_path(path, lambda: dom.mutex_locked("m")),
                              lambda: dom.mutex_lock("m"), verify)
    if path == "fast":
        assert steps == 2, steps        # before and after the one CAS: no log, no guard


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", PATHS)
def test_mutex_unlock_is_atomic_at_every_crash_point(dom, path):
    """The child holds the mutex and dies unlocking it: after recovery it is
    free either way, and the next holder's token is larger."""
    last = [_lock_unlock(dom, "m")]
    def prepare():
        assert dom.mutex_trylock("m") is True
    def verify(_, crashed, n):
        info = mtx(dom, "m")
        assert info["waiters"] == 0 and info["locked"] is False, (n, info)
        t = _lock_unlock(dom, "m")
        assert t >= last[0] + 2, (n, t, last)         # the child's token came between
        last[0] = t
    steps = enumerate_crashes(dom, f"mutex unlock ({path})", lambda: None,
                              on_path(path, prepare), lambda: dom.mutex_unlock("m"), verify)
    if path == "fast":
        assert steps == 2, steps


@pytest.mark.timeout(120)
def test_mutex_force_unlock_is_atomic_at_every_crash_point(dom):
    def setup():
        assert dom.mutex_trylock("m") is True   # held by the (live) parent
    def verify(_, crashed, n):
        info = mtx(dom, "m")
        assert info["waiters"] == 0
        assert (info["locked"], info["owner_pid"]) in ((True, os.getpid()), (False, None)), (n, info)
        dom.mutex_unlock("m", force=True)
    enumerate_crashes(dom, "mutex force unlock", setup, lambda: dom.sem_get("warm"),
                      lambda: dom.mutex_unlock("m", force=True), verify)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", PATHS)
def test_mutex_destroy_keeps_tokens_growing_at_every_crash_point(dom, path):
    """Destroy raises the domain's token high-water mark in the transaction
    that removes the name: a re-created mutex never hands out a token at or
    below one handed out before, whatever step the destroyer died at."""
    last = [0]
    def setup():
        last[0] = max(last[0], _lock_unlock(dom, "m"))
    def verify(_, crashed, n):
        info = mtx(dom, "m")
        assert info is None or (info["locked"] is False and info["token"] == last[0]), (n, info)
        t = _lock_unlock(dom, "m")
        assert t > last[0], (n, t, last)
        last[0] = t
        dom.mutex_destroy("m")
    enumerate_crashes(dom, f"mutex destroy ({path})", setup,
                      on_path(path, lambda: dom.mutex_locked("m")),
                      lambda: dom.mutex_destroy("m"), verify)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", PATHS)
def test_mutex_create_and_lock_keeps_tokens_growing_at_every_crash_point(dom, path):
    """The child creates a destroyed mutex and locks it (create starts from
    the high-water mark) and dies at any step: the next token is larger."""
    last = [0]
    def setup():
        last[0] = max(last[0], _lock_unlock(dom, "m"))
        dom.mutex_destroy("m")
    def verify(_, crashed, n):
        info = mtx(dom, "m")
        assert info is None or (info["locked"] is False and info["token"] >= last[0]), (n, info)
        t = _lock_unlock(dom, "m")
        assert t > last[0], (n, t, last)
        last[0] = t
    enumerate_crashes(dom, f"mutex create + lock ({path})", setup, on_path(path, lambda: None),
                      lambda: dom.mutex_trylock("m"), verify)


@pytest.mark.timeout(120)
def test_register_is_atomic_at_every_crash_point(dom):
    dom.sem_create("s", 1)
    def verify(_, crashed, n):
        assert [p["pid"] for p in dom.processes()] == [os.getpid()], n
        assert dom.sem_get("s") == 1
    enumerate_crashes(dom, "register", lambda: None, lambda: None, dom.register, verify,
                      register_first=False)


# ---- async waiter records (csrc/asyncwait.c): claim, queue, wake, take, leave

def _async_acquire(dom, kind, name, timeout):
    import asyncio
    from netplex_native.native.asyncwait import waits_of
    return asyncio.run(waits_of(dom).acquire(kind, name, timeout))


def _async_cancelled(dom, name):
    """A coroutine queues on name, is cancelled while queued (the record leaves)."""
    import asyncio
    from netplex_native.native.asyncwait import waits_of

    async def main():
        t = asyncio.ensure_future(waits_of(dom).acquire(_native._SEM, name, 10))
        while sem(dom, name)["waiters"] == 0:
            await asyncio.sleep(0.001)
        t.cancel()
        try:
            await t
        except asyncio.CancelledError:
            pass
    asyncio.run(main())


@pytest.mark.timeout(120)
def test_async_sem_wait_served_is_atomic_at_every_crash_point(dom):
    """A coroutine queues a record, the parent posts once, the coroutine takes."""
    dom.sem_create("s", 0, protected=True)
    def setup():
        while dom.sem_decrement("s") >= 0:
            pass
    def during(pid):
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if sem(dom, "s")["waiters"] == 1:
                dom.sem_increment("s")
                return
            if _dead(pid):
                return
            time.sleep(0.001)
        raise AssertionError("child neither queued nor died")
    def verify(before, crashed, n):
        info = sem(dom, "s")
        assert info["waiters"] == 0, (n, info)
        posted = dom.sem_delta("s", os.getpid())
        assert info["value"] == posted and posted in (0, 1), (n, info, posted)
        assert set(info["holders"]) <= {os.getpid()}
        assert all(p["async_waiters"] == 0 for p in dom.processes()), dom.processes()
    enumerate_crashes(dom, "async sem wait (served)", setup, lambda: dom.sem_get("s"),
                      lambda: _async_acquire(dom, _native._SEM, "s", 10), verify, during)


@pytest.mark.timeout(120)
def test_async_sem_wait_timing_out_is_atomic_at_every_crash_point(dom):
    dom.sem_create("s", 0, protected=True)
    def verify(before, crashed, n):
        info = sem(dom, "s")
        assert info["waiters"] == 0 and info["value"] == 0 and info["holders"] == {}, (n, info)
        assert all(p["async_waiters"] == 0 for p in dom.processes()), dom.processes()
    enumerate_crashes(dom, "async sem wait (timeout)", lambda: None, lambda: dom.sem_get("s"),
                      lambda: _async_acquire(dom, _native._SEM, "s", 0.02), verify)


@pytest.mark.timeout(120)
def test_async_sem_wait_cancelled_is_atomic_at_every_crash_point(dom):
    dom.sem_create("s", 0, protected=True)
    def verify(before, crashed, n):
        info = sem(dom, "s")
        assert info["waiters"] == 0 and info["value"] == 0 and info["holders"] == {}, (n, info)
        assert all(p["async_waiters"] == 0 for p in dom.processes()), dom.processes()
    enumerate_crashes(dom, "async sem wait (cancelled)", lambda: None, lambda: dom.sem_get("s"),
                      lambda: _async_cancelled(dom, "s"), verify)


@pytest.mark.timeout(120)
def test_async_mutex_lock_is_atomic_at_every_crash_point(dom):
    """The parent holds m; the child's coroutine queues; the parent unlocks."""
    dom.mutex_unlock("m", force=True)   # creates it (free)
    def setup():
        assert dom.mutex_trylock("m") is True
    def during(pid):
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if mtx(dom, "m")["waiters"] == 1:
                dom.mutex_unlock("m")
                return
            if _dead(pid):
                dom.mutex_unlock("m")
                return
            time.sleep(0.001)
        raise AssertionError("child neither queued nor died")
    def verify(before, crashed, n):
        info = mtx(dom, "m")
        assert info["waiters"] == 0, (n, info)
        # the parent unlocked; whatever the child took was given back at its death
        assert info["locked"] is False, (n, info)
        assert dom.mutex_trylock("m") is True
        dom.mutex_unlock("m")
    enumerate_crashes(dom, "async mutex lock", setup, lambda: dom.sem_get("warm"),
                      lambda: _async_acquire(dom, _native._MTX, "m", 10), verify, during)


def test_zz_report_crash_steps():
    """Prints the number of crash points of each operation (run with -s)."""
    print("\ncrash points per operation:", ", ".join(f"{k}: {v}" for k, v in STEPS.items()))
