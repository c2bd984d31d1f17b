"""The first waiter of a semaphore sleeps without a timer (A3u of csrc/acquire.c), as
sem_wait does; what ends a slice for the others wakes it instead: a unit, a signal,
the supervisor's ``interrupt_waits``, the recovery of a waker that died owing it its
wake-up (Q6 of csrc/queue.c).  Which sleep a waiter is in is read from the kernel
(/proc/PID/syscall: the futex call's timeout argument), not from timings."""

from __future__ import annotations

import os
import signal

import pytest

from netplex_native.native import domain as _native

from native_helpers import arm, child, exited_ok, kill_and_reap, kill_if_alive, killed, reap, sem, until

pytestmark = pytest.mark.timeout(120)

SYS_FUTEX = 202                          # x86-64


def futex_timeout(pid: int) -> int | None:
    """The timeout pointer of the futex call pid's main thread is blocked in, or
    None when it is not in one."""
    with open(f"/proc/{pid}/syscall") as f:
        parts = f.read().split()
    if not parts or parts[0] != str(SYS_FUTEX):
        return None
    return int(parts[4], 16)


def asleep(pid: int, timed: bool, timeout: float = 10.0) -> None:
    """Until pid's main thread sleeps in a futex wait with (timed) or without a timer."""
    def look():
        t = futex_timeout(pid)
        return t is not None and (t != 0) == timed
    until(look, timeout, f"pid {pid} asleep {'with' if timed else 'without'} a timer")


def waiter(dom, name: str) -> None:
    assert dom.sem_decrement(name, wait=True) >= 0


needs_x86 = pytest.mark.skipif(os.uname().machine != "x86_64",
                               reason="reads the x86-64 futex syscall number from /proc")


@needs_x86
def test_the_head_sleeps_without_a_timer_the_next_waiter_with_one(dom):
    dom.sem_create("s", 0)
    w1 = child(waiter, dom, "s")
    w2 = None
    try:
        until(lambda: sem(dom, "s")["waiters"] == 1, what="w1 queued")
        asleep(w1, timed=False)
        w2 = child(waiter, dom, "s")
        until(lambda: sem(dom, "s")["waiters"] == 2, what="w2 queued")
        asleep(w2, timed=True)           # someone is ahead of it: the slice checks them
        assert futex_timeout(w1) == 0
        dom.sem_increment("s")
        assert exited_ok(reap(w1))
        asleep(w2, timed=False)          # now the head
        dom.sem_increment("s")
        assert exited_ok(reap(w2))
        assert sem(dom, "s")["value"] == 0 and sem(dom, "s")["waiters"] == 0
    finally:
        kill_if_alive(w1)
        if w2:
            kill_if_alive(w2)


@needs_x86
def test_interrupt_waits_returns_the_head_to_python_and_its_waits_are_sliced_again(dom):
    """What the controller does before it stops a container: the container's wait
    goes back to Python (where interrupt_check is asked), then sleeps in slices."""
    dom.sem_create("s", 0)
    r, w = os.pipe()

    def wait_and_count_returns():
        checks = []

        def check():
            checks.append(1)
            os.write(w, b"c")
            return False
        dom.interrupt_check = check
        assert dom.sem_decrement("s", wait=True) == 0

    pid = child(wait_and_count_returns)
    try:
        os.close(w)
        asleep(pid, timed=False)
        assert dom.interrupt_waits(pid) == 1
        os.set_blocking(r, True)
        assert os.read(r, 1) == b"c"     # back in Python: interrupt_check was asked
        asleep(pid, timed=True)          # and from now on in slices
        assert dom.interrupt_waits(pid) == 1
        gone = child(lambda: None)
        reap(gone)
        assert dom.interrupt_waits(gone) == 0          # not registered: nothing marked
        dom.sem_increment("s")
        assert exited_ok(reap(pid))
    finally:
        os.close(r)
        kill_if_alive(pid)


def test_interrupt_waits_refuses_a_bad_pid(dom):
    for bad in (0, -1, 2**31, "1", None):
        with pytest.raises((ValueError, TypeError)):
            dom.interrupt_waits(bad)


@needs_x86
def test_a_signal_ends_the_untimed_sleep_and_the_wait_leaves_nothing(dom):
    dom.sem_create("s", 0)

    def wait_until_signalled():
        class Stop(Exception):
            pass

        def on_usr1(signo, frame):
            raise Stop()
        signal.signal(signal.SIGUSR1, on_usr1)
        try:
            dom.sem_decrement("s", wait=True)
        except Stop:
            os._exit(7)

    pid = child(wait_until_signalled)
    try:
        asleep(pid, timed=False)
        os.kill(pid, signal.SIGUSR1)
        status = reap(pid)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
        until(lambda: sem(dom, "s")["waiters"] == 0, what="the interrupted wait left the queue")
        dom.sem_increment("s")
        assert sem(dom, "s")["value"] == 1
    finally:
        kill_if_alive(pid)


@needs_x86
def test_a_waker_killed_at_any_step_of_its_increment_never_leaves_the_head_asleep(dom):
    """Q6: an increment killed between its commit and its wake-up leaves the unit
    there and the head asleep without a timer; recover(pid) of the waker wakes it.
    Every crash point of the increment, with recovery by the supervisor only."""
    dom.sem_create("s", 0)
    n, completed_once = 0, False
    while not completed_once:
        n += 1
        assert n < 100, "the increment never completed"
        w = child(waiter, dom, "s")
        try:
            asleep(w, timed=False)

            def increment_armed():
                dom.register()
                arm(n)
                dom.sem_increment("s")
            r = child(increment_armed)
            status = reap(r)
            completed_once = exited_ok(status)
            assert completed_once or killed(status)
            dom.recover(r, timeout=10)
            # Either the unit was committed (then w must get it now) or not
            # (then it is still at 0 and w still waits: give one).
            # (A unit taken leaves the queue in the same transaction.)
            if sem(dom, "s")["value"] == 0 and sem(dom, "s")["waiters"] == 1:
                dom.sem_increment("s")
            assert exited_ok(reap(w, timeout=10)), f"crash point {n}: the head stayed asleep"
            until(lambda: sem(dom, "s")["value"] == 0 and sem(dom, "s")["waiters"] == 0,
                  what=f"crash point {n}: one unit, taken once")
        finally:
            kill_if_alive(w)


def test_a_dead_head_does_not_keep_the_next_waiter_from_the_unit_without_a_supervisor(dom):
    """The head sleeps untimed; killed there, it is found dead by the next
    waiter's slice (which sleeps with a timer because someone is ahead of it),
    with no recover() call from anyone."""
    dom.sem_create("s", 0)
    w1 = child(waiter, dom, "s")
    w2 = None
    try:
        until(lambda: sem(dom, "s")["waiters"] == 1, what="w1 queued")
        w2 = child(waiter, dom, "s")
        until(lambda: sem(dom, "s")["waiters"] == 2, what="w2 queued")
        kill_and_reap(w1)
        dom.sem_increment("s")
        assert exited_ok(reap(w2, timeout=10))
    finally:
        kill_if_alive(w1)
        if w2:
            kill_if_alive(w2)
