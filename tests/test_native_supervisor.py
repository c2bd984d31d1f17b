"""The supervisor contract without any controller: a plain parent forks, SIGKILLs,
reaps and calls Domain.recover(pid)."""

import os
import signal
import time

import pytest

from netplex_native.native import domain as _native





from harness import fork_call as fork


def kill_and_reap(pid):
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def until(cond, timeout=5.0, what="condition"):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def waiters(dom, name, kind="sem"):
    objs = dom.semaphores() if kind == "sem" else dom.mutexes()
    return next((o["waiters"] for o in objs if o["name"] == name), 0)


def hold_forever(dom, ready_w, action):
    action()
    os.write(ready_w, b"r")
    while True:
        time.sleep(1)


@pytest.mark.timeout(20)
def test_protected_semaphore_returns_to_initial_after_kill_and_recover(dom):
    dom.sem_create("pool", 3, protected=True)
    r, w = os.pipe()
    pid = fork(hold_forever, dom, w, lambda: (dom.sem_decrement("pool"), dom.sem_decrement("pool"),
                                              dom.sem_increment("pool"), dom.sem_decrement("pool")))
    os.read(r, 1)
    assert dom.sem_get("pool") == 1 and dom.sem_delta("pool", pid) == -2
    kill_and_reap(pid)
    assert dom.recover(pid) == 1
    assert dom.sem_get("pool") == 3 and dom.sem_delta("pool", pid) == 0
    assert pid not in [p["pid"] for p in dom.processes()]
    dom.check()


@pytest.mark.timeout(20)
def test_revert_of_a_positive_delta_is_clamped_at_zero(dom):
    dom.sem_create("c", 0, protected=True)
    r, w = os.pipe()
    pid = fork(hold_forever, dom, w, lambda: (dom.sem_increment("c"), dom.sem_increment("c")))
    os.read(r, 1)
    dom.sem_decrement("c")
    dom.sem_decrement("c")                  # the parent took both counts
    kill_and_reap(pid)
    dom.recover(pid)
    assert dom.sem_get("c") == 0
    dom.check()


@pytest.mark.timeout(20)
def test_sigkilled_holder_mutex_is_released_to_waiter(dom):
    """A waiter blocked on the mutex acquires it within 50 ms of the kill."""
    r, w = os.pipe()
    tr, tw = os.pipe()
    holder = fork(hold_forever, dom, w, lambda: dom.mutex_lock("m"))
    os.read(r, 1)

    def waiter():
        assert dom.mutex_lock("m", timeout=15)
        os.write(tw, repr(time.monotonic()).encode())
    wpid = fork(waiter)
    until(lambda: waiters(dom, "m", "mutex") == 1, what="waiter queued")
    time.sleep(0.15)                        # the waiter is in its slices
    t0 = time.monotonic()
    kill_and_reap(holder)
    # 0: the waiter, woken by the kernel's death signal, recovered it first
    # (csrc/deathwatch.c); either way exactly one recovery happened
    assert dom.recover(holder) in (0, 1)
    assert holder not in [p["pid"] for p in dom.processes()]
    t1 = float(os.read(tr, 64))
    assert t1 - t0 < 0.05, f"waiter took {1000 * (t1 - t0):.1f} ms"
    _, status = os.waitpid(wpid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    dom.recover(wpid)                       # it exited holding the mutex
    assert dom.mutexes()[0]["locked"] is False
    dom.check()


@pytest.mark.timeout(20)
def test_recover_twice_is_harmless(dom):
    dom.sem_create("s", 2, protected=True)
    r, w = os.pipe()
    pid = fork(hold_forever, dom, w, lambda: (dom.sem_decrement("s"), dom.mutex_lock("m")))
    os.read(r, 1)
    kill_and_reap(pid)
    assert dom.recover(pid) == 1
    dom.sem_decrement("s")                  # the parent now holds one
    assert dom.recover(pid) == 0
    assert dom.sem_get("s") == 1 and dom.sem_delta("s", os.getpid()) == -1
    assert dom.mutexes()[0]["locked"] is False
    dom.check()


@pytest.mark.timeout(20)
def test_recover_of_a_live_pid_leaves_that_process_alone(dom):
    """A live process registered under the pid (as after pid recycling) is never recovered."""
    dom.sem_create("s", 2, protected=True)
    r, w = os.pipe()
    pid = fork(hold_forever, dom, w, lambda: (dom.sem_decrement("s"), dom.mutex_lock("m")))
    os.read(r, 1)
    try:
        assert dom.recover(pid) == 0
        assert dom.sem_get("s") == 1 and dom.sem_delta("s", pid) == -1
        assert dom.mutexes()[0]["owner_pid"] == pid
        assert [p["state"] for p in dom.processes() if p["pid"] == pid] == ["alive"]
    finally:
        kill_and_reap(pid)
    assert dom.recover(pid) == 1
    assert dom.sem_get("s") == 2
    dom.check()


@pytest.mark.timeout(20)
def test_killed_waiter_does_not_swallow_a_later_increment(dom):
    """Defect 1 of the reference: a count posted after a waiter died must stay available."""
    dom.sem_create("s", 0)
    a = fork(lambda: dom.sem_decrement("s", wait=True, timeout=30))
    until(lambda: waiters(dom, "s") == 1, what="waiter queued")
    kill_and_reap(a)
    dom.sem_increment("s")                  # supervisor has not recovered yet
    assert dom.sem_get("s") == 1
    assert dom.sem_decrement("s", wait=True, timeout=2) == 0   # we get it despite the dead one
    dom.recover(a)
    assert waiters(dom, "s") == 0
    dom.check()


@pytest.mark.timeout(20)
def test_waiter_behind_a_dead_waiter_gets_the_count_without_a_supervisor(dom):
    dom.sem_create("s", 0)
    r, w = os.pipe()
    a = fork(lambda: dom.sem_decrement("s", wait=True, timeout=30))
    until(lambda: waiters(dom, "s") == 1, what="first waiter queued")

    def second():
        os.write(w, str(dom.sem_decrement("s", wait=True, timeout=10)).encode())
    b = fork(second)
    until(lambda: waiters(dom, "s") == 2, what="second waiter queued")
    kill_and_reap(a)                        # nobody calls recover(a)
    dom.sem_increment("s")
    assert os.read(r, 16) == b"0"
    _, status = os.waitpid(b, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert waiters(dom, "s") == 0
    dom.recover(a)
    dom.recover(b)
    dom.check()


@pytest.mark.timeout(20)
def test_a_process_blocked_on_a_dead_guard_owner_recovers_it(dom):
    """A child dies holding a semaphore's guard; the next user takes the guard over
    (wait-free: the dead process's slot is left to recover(pid))."""
    dom.sem_create("g", 1, protected=True)

    def die_in_guard():
        os.environ["NETPLEX_CORE_TEST"] = "1"
        dom.register()
        dom.sem_get("g")
        assert _native._lib.np_test_crash_after(1) == 0
        dom.sem_increment("g")              # killed right after taking the guard
    pid = fork(die_in_guard)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    t0 = time.monotonic()
    assert dom.sem_increment("g") == 2      # no recover(pid) called
    assert time.monotonic() - t0 < 1
    assert dom.recover(pid) == 1
    assert pid not in [p["pid"] for p in dom.processes()]
    dom.check()


@pytest.mark.timeout(20)
def test_recovery_interrupted_by_the_recoverers_death_is_finished_later(dom):
    """A recoverer killed mid-recovery: recover(recoverer) finishes both."""
    dom.sem_create("s", 3, protected=True)
    r, w = os.pipe()
    victim = fork(hold_forever, dom, w, lambda: (dom.sem_decrement("s"), dom.mutex_lock("m")))
    os.read(r, 1)
    kill_and_reap(victim)
    finished = False
    for n in range(1, 60):
        def recoverer():
            os.environ["NETPLEX_CORE_TEST"] = "1"
            dom.register()
            assert _native._lib.np_test_crash_after(n) == 0
            dom.recover(victim)
        rpid = fork(recoverer)
        _, status = os.waitpid(rpid, 0)
        dom.recover(rpid)
        if not os.WIFSIGNALED(status):
            finished = True
        dom.recover(victim)
        assert dom.sem_get("s") == 3, n
        assert dom.mutexes()[0]["locked"] is False, n
        dom.check()
        if finished:
            break
        # the next round needs a fresh victim state
        victim = fork(hold_forever, dom, w, lambda: (dom.sem_decrement("s"), dom.mutex_lock("m")))
        os.read(r, 1)
        kill_and_reap(victim)
    assert finished and n > 1
