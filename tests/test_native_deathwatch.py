"""A mutex waiter learns of the holder's death from the kernel (csrc/deathwatch.c).

Nobody supervises these processes (no controller, no recover() call): before
the death watch a waiter found a dead holder only after a whole wait slice
(100 ms, A3 of acquire.c), so a lock with a 90 ms timeout timed out.  Now the
kernel's robust-futex death word wakes it and it recovers the slot itself
(A6), exactly: tokens grow, the dead process is gone from the table, a live
holder is never taken for dead."""

import os
import signal
import time

import pytest

from native_helpers import (arm, child, hold_until_killed, kill_and_reap, kill_soon, killed, mtx,
                            pids, reap)


SHORT = 0.09        # under one wait slice (NP_SLICE_NS = 100 ms)


def _holder(dom, name):
    r, w = os.pipe()
    pid = child(lambda: (dom.mutex_lock(name), hold_until_killed(w)))
    os.read(r, 1)
    os.close(r)
    os.close(w)
    return pid


@pytest.mark.timeout(60)
def test_waiter_takes_a_killed_holders_mutex_within_one_slice_without_a_supervisor(dom):
    dom.mutex_lock("m")
    dom.mutex_unlock("m")
    for trial in range(3):
        t_before = mtx(dom, "m")["token"]
        holder = _holder(dom, "m")
        k = kill_soon(holder)
        try:
            got = dom.mutex_lock("m", SHORT)
        finally:
            os.waitpid(k, 0)
            assert killed(reap(holder))
        assert got is True, f"trial {trial}: the waiter did not learn of the death within {SHORT}s"
        info = mtx(dom, "m")
        assert info["owner_pid"] == os.getpid()
        assert info["token"] >= t_before + 2    # the holder's grant, then ours (T1)
        dom.mutex_unlock("m")
        assert holder not in pids(dom)
    dom.check()


@pytest.mark.timeout(60)
def test_a_holder_that_exits_without_unlocking_is_seen_at_once(dom, pipes):
    r, w = pipes()

    def body():
        dom.mutex_lock("m")
        os.write(w, b"x")
        time.sleep(0.02)
        os._exit(0)                 # a normal exit, still holding
    pid = child(body)
    os.read(r, 1)
    try:
        assert dom.mutex_lock("m", SHORT) is True
    finally:
        reap(pid)
    dom.mutex_unlock("m")
    assert pid not in pids(dom)
    dom.check()


@pytest.mark.timeout(60)
def test_a_live_holder_is_never_taken_for_dead(dom):
    """Its death word is armed, it is alive: the waiter times out, nothing moves."""
    holder = _holder(dom, "m")
    try:
        before = mtx(dom, "m")
        assert dom.mutex_lock("m", 0.3) is False
        after = mtx(dom, "m")
        assert after["owner_pid"] == holder and after["token"] == before["token"]
        assert holder in pids(dom)
    finally:
        kill_and_reap(holder)
    assert dom.recover(holder, timeout=5) >= 0
    dom.check()


@pytest.mark.timeout(60)
def test_a_child_forked_from_a_registered_process_is_watched_too(dom):
    """The death watch is per process: a forked child registers and starts its own."""
    dom.mutex_lock("x")                 # the parent is registered (and watched)
    dom.mutex_unlock("x")
    holder = _holder(dom, "m")          # forked from it
    k = kill_soon(holder)
    try:
        assert dom.mutex_lock("m", SHORT) is True
    finally:
        os.waitpid(k, 0)
        reap(holder)
    dom.mutex_unlock("m")
    dom.check()


@pytest.mark.timeout(60)
def test_a_closed_domain_leaves_no_false_death_signal(dom, pipes):
    """A process that closed its Domain (its watch stopped, its slot left) and
    lives on: a later holder in the same slot is not taken for dead."""
    from netplex_native.native import domain as _native
    r, w = pipes()

    def closer():
        d2 = _native.Domain.attach(dom.name)
        d2.mutex_lock("c")
        d2.close()                      # gives c back, stops the watch
        hold_until_killed(w)
    c = child(closer)
    os.read(r, 1)
    try:
        assert dom.mutex_lock("c", 1) is True
        dom.mutex_unlock("c")
        holder = _holder(dom, "m")
        try:
            assert dom.mutex_lock("m", 0.3) is False
            assert mtx(dom, "m")["owner_pid"] == holder
        finally:
            kill_and_reap(holder)
    finally:
        kill_and_reap(c)
    dom.recover(holder, timeout=5)
    dom.check()


#: Most crash points the enumeration below may need (a bound against a loop,
#: far above any path seen: 40-70).
MAX_DEATH_PATH_POINTS = 1000


def _waiter_run(dom, n):
    """A holder of m is SIGKILLed while a waiter W sleeps in lock(m) on its
    death word; W is armed to be SIGKILLed at its n-th crash point from the
    start of its lock() (n = 0: never; it only counts them).  Returns
    (W was killed, the crash points W passed when it was not).  Whoever comes
    next finishes both recoveries exactly: m is free, the next grant's token
    is larger than every earlier one, the table holds only the living."""
    from netplex_native.native import domain as _native
    dom.mutex_lock("m")
    dom.mutex_unlock("m")
    t0 = mtx(dom, "m")["token"]
    holder = _holder(dom, "m")
    r, w = os.pipe()
    try:
        def waiter():
            dom.register()
            dom.mutex_trylock("other")
            os.write(w, b"w")
            if n:
                arm(n)
            else:
                assert _native._lib.np_test_crash_after(10**6) == 0      # count, never fire
            got = dom.mutex_lock("m", 5)
            os.write(w, str(_native._lib.np_test_crash_count()).encode().ljust(16))
            os._exit(7 if got else 8)
        wp = child(waiter)
        os.read(r, 1)
        time.sleep(0.05)
        kill_and_reap(holder)
        st = reap(wp)
        assert killed(st) or os.WEXITSTATUS(st) == 7, st
        passed = None if killed(st) else int(os.read(r, 16))
    finally:
        os.close(r)
        os.close(w)
    for p in (holder, wp):
        assert dom.recover(p, timeout=5) >= 0
    assert dom.mutex_lock("m", 5) is True
    info = mtx(dom, "m")
    assert info["owner_pid"] == os.getpid() and info["token"] > t0 + 1
    dom.mutex_unlock("m")
    assert sorted(pids(dom)) == [os.getpid()]
    dom.check()
    return killed(st), passed


@pytest.mark.timeout(900)
def test_the_waiter_killed_at_every_crash_point_of_its_death_recovery(dom):
    """W is SIGKILLed at its n-th crash point from the start of its lock() --
    its queueing, its wake-up by the kernel, the recovery of the dead holder
    it runs -- for n = 1, 2, ... until W gets m without reaching its n-th
    point, and at least up to the number of points an unarmed W passed in
    this same run: a loaded waiter loops more, so the path's length is
    measured, not assumed (a fixed range of 60 once missed 10 of 70)."""
    killed_w, measured = _waiter_run(dom, 0)
    assert not killed_w and measured > 10, measured     # it went through the death path
    n = 0
    while True:
        n += 1
        assert n <= MAX_DEATH_PATH_POINTS, f"W still killed at crash point {n}"
        killed_w, passed = _waiter_run(dom, n)
        if not killed_w:
            assert passed < n, (n, passed)      # it passed fewer points than the armed one
            if n > measured:
                break                           # every point of this path and of the measured one


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", range(1, 31))
def test_the_holder_killed_at_any_crash_point_of_unlock_and_relock_while_a_waiter_watches(dom, n, pipes):
    """H holds m, W sleeps on m (and on H's death word); H is SIGKILLed at its
    n-th crash point of unlock-then-lock-again: W (or whoever comes next)
    recovers H exactly -- m is held by at most one process, its token only
    grows, and the table holds only the living."""
    r, w = pipes()
    go_r, go_w = pipes()

    def holder():
        dom.mutex_lock("m")
        os.write(w, b"h")
        os.read(go_r, 1)
        arm(n)
        dom.mutex_unlock("m")
        dom.mutex_lock("m", 5)
        dom.mutex_unlock("m")
        os._exit(0)

    def waiter():
        dom.register()
        dom.mutex_trylock("other")
        os.write(w, b"w")
        got = dom.mutex_lock("m", 5)
        if got:
            dom.mutex_unlock("m")
        os._exit(7 if got else 8)
    hp = child(holder)
    os.read(r, 1)
    t0 = mtx(dom, "m")["token"]
    wp = child(waiter)
    os.read(r, 1)
    time.sleep(0.05)
    os.write(go_w, b"g")
    st_h = reap(hp)
    st_w = reap(wp)
    assert os.WEXITSTATUS(st_w) == 7 if not killed(st_w) else True
    assert killed(st_h) or os.WEXITSTATUS(st_h) == 0
    for p in (hp, wp):
        assert dom.recover(p, timeout=5) >= 0
    assert dom.mutex_lock("m", 5) is True
    info = mtx(dom, "m")
    assert info["owner_pid"] == os.getpid() and info["token"] > t0
    dom.mutex_unlock("m")
    assert pids(dom) == [os.getpid()]
    dom.check()
