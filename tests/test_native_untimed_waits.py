"""A semaphore's first waiter, in a thread other than Python's main one, sleeps without
a timer (A3u of csrc/acquire.c), as sem_wait does; what ends a slice for the others
wakes it instead: a unit, the supervisor's ``interrupt_waits``, ``close()``, the
recovery of a waker that died owing it its wake-up (Q6 of csrc/queue.c).  The main
thread keeps its slices: Python runs signal handlers there only, and a signal caught
just before an untimed sleep, sent to another thread, or whose handler restarts
system calls, would not end one.  Which sleep a thread is in is read from the
kernel (/proc/PID/task/TID/syscall: the futex call's timeout argument), not from
timings."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading

import pytest

from native_helpers import arm, child, exited_ok, kill_and_reap, kill_if_alive, killed, reap, sem, until

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(os.uname().machine != "x86_64",
                                 reason="reads the x86-64 futex syscall number from /proc")]

SYS_FUTEX = 202                          # x86-64
SYS_TGKILL = 234


def futex_timeout(pid: int, tid: int | None = None) -> int | None:
    """The timeout pointer of the futex call thread tid (default: the main
    thread) of pid is blocked in, or None when it is not in one."""
    with open(f"/proc/{pid}/task/{tid or pid}/syscall") as f:
        parts = f.read().split()
    if not parts or parts[0] != str(SYS_FUTEX):
        return None
    return int(parts[4], 16)


def asleep(pid: int, tid: int | None, timed: bool, timeout: float = 10.0) -> None:
    """Until that thread sleeps in a futex wait with (timed) or without a timer."""
    def look():
        t = futex_timeout(pid, tid)
        return t is not None and (t != 0) == timed
    until(look, timeout, f"{pid}/{tid} asleep {'with' if timed else 'without'} a timer")


class ThreadWaiter:
    """A child process whose second thread waits for the semaphore, without a
    timeout (then the child exits 0 if ok(what it got))."""

    def __init__(self, dom, name: str, before=None, ok=lambda got: got >= 0):
        r, w = os.pipe()

        def run():
            os.close(r)
            if before:
                before()

            def wait():
                os.write(w, str(threading.get_native_id()).encode().ljust(12))
                got = dom.sem_decrement(name, wait=True)
                assert ok(got), got
            t = threading.Thread(target=wait)
            t.start()
            t.join()
        self.pid = child(run)
        os.close(w)
        self.tid = int(os.read(r, 12))
        os.close(r)

    def asleep(self, timed: bool) -> None:
        asleep(self.pid, self.tid, timed)

    def done(self, timeout: float = 20.0) -> bool:
        return exited_ok(reap(self.pid, timeout))


@contextlib.contextmanager
def head_and_next(dom, name: str):
    """Two thread waiters queued on name in this order, the first asleep
    without a timer; both killed (if still alive) afterwards."""
    w1 = ThreadWaiter(dom, name)
    w2 = None
    try:
        until(lambda: sem(dom, name)["waiters"] == 1, what="w1 queued")
        w1.asleep(timed=False)
        w2 = ThreadWaiter(dom, name)
        until(lambda: sem(dom, name)["waiters"] == 2, what="w2 queued")
        yield w1, w2
    finally:
        kill_if_alive(w1.pid)
        if w2:
            kill_if_alive(w2.pid)


def armed_increment(dom, name: str, n: int) -> tuple[int, bool]:
    """A process that increments name, SIGKILLed at its n-th crash point:
    (its pid, reaped; True if the increment completed)."""
    def run():
        dom.register()
        arm(n)
        dom.sem_increment(name)
    pid = child(run)
    status = reap(pid)
    assert exited_ok(status) or killed(status)
    return pid, exited_ok(status)


def test_the_head_sleeps_without_a_timer_the_next_waiter_with_one(dom):
    dom.sem_create("s", 0)
    with head_and_next(dom, "s") as (w1, w2):
        w2.asleep(timed=True)            # someone is ahead of it: the slice checks them
        assert futex_timeout(w1.pid, w1.tid) == 0
        dom.sem_increment("s")
        assert w1.done()
        w2.asleep(timed=False)           # now the head
        dom.sem_increment("s")
        assert w2.done()
        assert sem(dom, "s")["value"] == 0 and sem(dom, "s")["waiters"] == 0


def test_interrupt_waits_returns_the_head_to_python_and_its_waits_are_sliced_again(dom):
    """What the controller does before it stops a container: the container's wait
    goes back to Python (where interrupt_check is asked), then sleeps in slices."""
    dom.sem_create("s", 0)
    r, w = os.pipe()

    def count_checks():
        def check():
            os.write(w, b"c")
            return False
        dom.interrupt_check = check

    waiter = ThreadWaiter(dom, "s", before=count_checks)
    try:
        os.close(w)
        waiter.asleep(timed=False)
        assert dom.interrupt_waits(waiter.pid) == 1
        assert os.read(r, 1) == b"c"     # back in Python: interrupt_check was asked
        waiter.asleep(timed=True)        # and from now on in slices
        assert dom.interrupt_waits(waiter.pid) == 1
        gone = child(lambda: None)
        reap(gone)
        assert dom.interrupt_waits(gone) == 0          # not registered: nothing marked
        dom.sem_increment("s")
        assert waiter.done()
    finally:
        os.close(r)
        kill_if_alive(waiter.pid)


def test_interrupt_waits_refuses_a_bad_pid(dom):
    for bad in (0, -1, 2**31, "1", None):
        with pytest.raises((ValueError, TypeError)):
            dom.interrupt_waits(bad)


@pytest.mark.parametrize("how", ["plain", "restarting handler", "signal to another thread"])
def test_on_the_main_thread_the_head_keeps_its_timer_and_a_signal_reaches_its_handler(dom, how):
    """Found by the attack on the untimed sleep: on the main thread, a handler
    installed with SA_RESTART (siginterrupt False: gunicorn's workers do so for
    SIGTERM), or a signal sent to another thread of the process, never ended an
    untimed sleep (nor did a signal caught just before it).  The main thread
    keeps its slices: the handler runs within one."""
    dom.sem_create("s", 0)
    r, w = os.pipe()

    def wait_until_signalled():
        class Stop(Exception):
            pass

        def on_usr1(signo, frame):
            raise Stop()
        signal.signal(signal.SIGUSR1, on_usr1)
        if how == "restarting handler":
            signal.siginterrupt(signal.SIGUSR1, False)
        other = threading.Thread(target=threading.Event().wait, daemon=True)
        other.start()
        os.write(w, str(other.native_id).encode().ljust(12))
        try:
            dom.sem_decrement("s", wait=True)
        except Stop:
            os._exit(7)

    pid = child(wait_until_signalled)
    try:
        os.close(w)
        other = int(os.read(r, 12))
        asleep(pid, None, timed=True)
        if how == "signal to another thread":
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.syscall(SYS_TGKILL, pid, other, signal.SIGUSR1) == 0
        else:
            os.kill(pid, signal.SIGUSR1)
        status = reap(pid, timeout=10)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
        until(lambda: sem(dom, "s")["waiters"] == 0, what="the interrupted wait left the queue")
        dom.sem_increment("s")
        assert sem(dom, "s")["value"] == 1
    finally:
        os.close(r)
        kill_if_alive(pid)


def test_a_waker_killed_at_any_step_of_its_increment_never_leaves_the_head_asleep(dom):
    """Q6: an increment killed between its commit and its wake-up leaves the unit
    there and the head asleep without a timer; recover(pid) of the waker wakes it.
    Every crash point of the increment, with recovery by the supervisor only."""
    dom.sem_create("s", 0)
    n, completed_once = 0, False
    while not completed_once:
        n += 1
        assert n < 100, "the increment never completed"
        w = ThreadWaiter(dom, "s")
        try:
            w.asleep(timed=False)
            r, completed_once = armed_increment(dom, "s", n)
            dom.recover(r, timeout=10)
            # Either the unit was committed (then w must get it now) or not
            # (then it is still at 0 and w still waits: give one).  A unit
            # taken leaves the queue in the same transaction.
            if sem(dom, "s")["value"] == 0 and sem(dom, "s")["waiters"] == 1:
                dom.sem_increment("s")
            assert w.done(timeout=10), f"crash point {n}: the head stayed asleep"
            until(lambda: sem(dom, "s")["value"] == 0 and sem(dom, "s")["waiters"] == 0,
                  what=f"crash point {n}: one unit, taken once")
        finally:
            kill_if_alive(w.pid)


def test_a_dead_head_does_not_keep_the_next_waiter_from_the_unit_without_a_supervisor(dom):
    """The head sleeps untimed; killed there, it is found dead by the next
    waiter's slice (which sleeps with a timer because someone is ahead of it),
    with no recover() call from anyone."""
    dom.sem_create("s", 0)
    with head_and_next(dom, "s") as (w1, w2):
        kill_and_reap(w1.pid)
        dom.sem_increment("s")
        assert w2.done(timeout=10)


def test_a_waker_killed_before_its_wake_up_without_a_supervisor_a_second_waiter_wakes_the_head(dom):
    """Found by the attack: with nobody calling recover(), a waker killed between
    its increment and its wake-up left the untimed head asleep and the unit free,
    and the waiter behind it (sliced, not entitled) slept on too.  At the end of
    its slice a waiter now wakes the entitled waiters ahead of it.  Every crash
    point of the increment; the waker is reaped but never recovered."""
    dom.sem_create("s", 0)
    n, completed_once = 0, False
    while not completed_once:
        n += 1
        assert n < 100, "the increment never completed"
        w1 = ThreadWaiter(dom, "s")
        w2 = None
        try:
            w1.asleep(timed=False)
            w2 = child(lambda: dom.sem_decrement("s", wait=True))   # the main thread: sliced
            until(lambda: sem(dom, "s")["waiters"] == 2, what="w2 queued")
            r, completed_once = armed_increment(dom, "s", n)
            ours = 0
            if sem(dom, "s")["value"] == 0 and sem(dom, "s")["waiters"] == 2:
                # not committed, or a redo log that the next guard holder
                # applies: give a unit now (the end state tells which)
                dom.sem_increment("s")
                ours += 1
            assert w1.done(timeout=10), f"crash point {n}: the head stayed asleep"
            if sem(dom, "s")["waiters"] == 1:
                dom.sem_increment("s")
                ours += 1
            assert exited_ok(reap(w2, timeout=10))
            st = sem(dom, "s")
            committed = st["value"] + 2 - ours
            assert committed in (0, 1) and st["waiters"] == 0, f"crash point {n}: {st}, ours {ours}"
            dom.recover(r, timeout=10)
            if st["value"]:
                assert dom.sem_decrement("s") == 0
        finally:
            kill_if_alive(w1.pid)
            if w2:
                kill_if_alive(w2)


def test_a_destroyer_killed_before_its_wake_up_without_a_supervisor_a_second_waiter_wakes_the_head(dom):
    """Found by the second attack: a destroy killed between its commit and its
    wake-up, nobody recovering it, left the untimed head asleep for good (its
    queue is gone, so the waiter behind it, told of the destroy at the end of
    its slice, did not reach it); re-creating the name did not wake it either.
    A waiter that finds its object destroyed now wakes the untimed sleepers of
    that incarnation.  Every crash point of the destroy."""
    n, completed_once = 0, False
    while not completed_once:
        n += 1
        assert n < 100, "the destroy never completed"
        dom.sem_create("s", 0)
        w1 = ThreadWaiter(dom, "s", ok=lambda got: got == -1)
        w2 = None
        try:
            w1.asleep(timed=False)
            w2 = ThreadWaiter(dom, "s", ok=lambda got: got == -1)
            until(lambda: sem(dom, "s")["waiters"] == 2, what="w2 queued")

            def destroy_armed():
                dom.register()
                arm(n)
                dom.sem_destroy("s")
            r = child(destroy_armed)
            status = reap(r)
            completed_once = exited_ok(status)
            assert completed_once or killed(status)
            if sem(dom, "s") is not None and sem(dom, "s")["waiters"] == 2:
                dom.sem_destroy("s")       # not committed (or a redo log): destroy now
            assert w1.done(timeout=10), f"crash point {n}: the head stayed asleep"
            assert w2.done(timeout=10)
            dom.recover(r, timeout=10)
            assert sem(dom, "s") is None
        finally:
            kill_if_alive(w1.pid)
            if w2:
                kill_if_alive(w2.pid)
