"""Bounded overtaking on the native backend (csrc/acquire.c A2, asyncwait.c):
real processes, real SIGSTOP, the public ``Domain``.

A caller not yet queued may take a free unit ahead of the queue, so that a
contended mutex does not turn into a convoy of sleeps and wake-ups, until the
head of the queue, having waited 1 ms, *runs and is refused* a unit: from
then on the next unit is the head's (``reserved``), so no waiter starves.  A
head that the scheduler has not reached yet (or a stopped one) reserves
nothing, so overtaking never keeps a unit idle; waiters queued behind the
head are never served before it.  The head waits in a thread or in a
coroutine (``lock_async``): the same rule."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from netplex_native import Domain

from native_helpers import kill_if_alive, until

pytestmark = pytest.mark.timeout(60)


def _clean_up(d, pids, r, w):
    """Kill and reap what is left, close the pipe, remove the segment."""
    for pid in pids:
        kill_if_alive(pid)
    os.close(r)
    os.close(w)
    d.unlink()
    d.close()


def _info(d):
    return d._core.mutexes()[0]


def _waiter(d, w, label, how):
    """A child: lock m (thread or coroutine), report "label token", unlock."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            signal.alarm(40)
            m = d.mutex("m")
            if how == "coroutine":
                async def take():
                    return await m.lock_async(timeout=30)
                ok = asyncio.run(take())
            else:
                ok = m.lock(timeout=30)
            if ok:
                os.write(w, f"{label} {m.token}\n".encode())
                m.unlock()
                code = 0
        finally:
            os._exit(code)
    return pid


@pytest.mark.parametrize("how", ["thread", "coroutine"])
def test_a_starving_head_reserves_the_next_unit_only_once_it_has_run_and_been_refused(how):
    d = Domain.create(semaphores=4, mutexes=4, processes=8, export=False)
    m = d.mutex("m")
    r, w = os.pipe()
    pids = []
    try:
        assert m.lock(timeout=0)
        pids.append(_waiter(d, w, "head", how))
        until(lambda: _info(d)["waiters"] == 1, what="the head never queued")
        time.sleep(0.02)                        # queued for longer than the 1 ms bound
        os.kill(pids[0], signal.SIGSTOP)
        pids.append(_waiter(d, w, "behind", "thread"))
        until(lambda: _info(d)["waiters"] == 2, what="the second waiter never queued")

        m.unlock()                              # wakes the head, which is stopped
        time.sleep(0.3)
        info = _info(d)
        # the waiter queued behind the stopped head is not served before it
        assert (info["locked"], info["waiters"], info["reserved"]) == (False, 2, False), info
        # the head has not run since it started starving: it reserved nothing,
        # and a caller not queued uses the free mutex (old rule: refused)
        assert m.lock(timeout=5) is True

        os.kill(pids[0], signal.SIGCONT)        # the head runs, finds m held: refused
        until(lambda: _info(d)["reserved"], what="the refused head reserved nothing")
        m.unlock()
        # the next unit is the head's: a caller not queued does not get it
        # while the head has not had it (the head may also have taken it and
        # unlocked it already: then ours comes after it, by token)
        ours = None
        if m.lock(timeout=0):
            ours = m.token
            m.unlock()
        got = b""
        end = time.monotonic() + 20
        while got.count(b"\n") < 2:
            assert time.monotonic() < end, got
            got += os.read(r, 100)
        order = [line.split() for line in got.decode().splitlines()]
        assert [label for label, _ in order] == ["head", "behind"], order
        assert int(order[0][1]) < int(order[1][1])      # fencing tokens in that order
        assert ours is None or ours > int(order[0][1]), (ours, order)
        for pid in pids:
            _, st = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(st) == 0
        pids = []
        assert m.lock(timeout=5) is True
        info = _info(d)
        assert (info["waiters"], info["reserved"]) == (0, False), info
        m.unlock()
        d._core.check()
    finally:
        _clean_up(d, pids, r, w)


def test_no_waiter_starves_while_others_hammer_the_mutex():
    """Three processes lock and unlock m as fast as they can for 1.5 s while
    a fourth, started last, waits in lock(timeout=...): it gets the mutex
    (it is refused at most once after it starves), and so does every
    hammering process, repeatedly."""
    d = Domain.create(semaphores=4, mutexes=4, processes=8, export=False)
    d.mutex("m")
    r, w = os.pipe()
    pids = []
    try:
        for i in range(3):
            pid = os.fork()
            if pid == 0:
                code = 3
                try:
                    signal.alarm(30)
                    mm = d.mutex("m")
                    n, end = 0, time.monotonic() + 1.5
                    while time.monotonic() < end:
                        assert mm.lock(timeout=10)
                        mm.unlock()
                        n += 1
                    os.write(w, f"hammer {n}\n".encode())
                    code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
        time.sleep(0.3)
        pids.append(_waiter(d, w, "late", "thread"))
        got = b""
        end = time.monotonic() + 30
        while got.count(b"\n") < 4:
            assert time.monotonic() < end, got
            got += os.read(r, 100)
        lines = [line.split() for line in got.decode().splitlines()]
        assert [x for x in lines if x[0] == "late"], lines
        assert all(int(n) > 100 for label, n in lines if label == "hammer"), lines
        for pid in pids:
            _, st = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(st) == 0
        pids = []
        d._core.check()
    finally:
        _clean_up(d, pids, r, w)


def test_a_head_that_only_looked_at_the_end_of_its_slices_then_stopped_reserves_nothing(dom):
    """Found by the last attack: a head that waited in slices (the main
    thread, or any wait after interrupt_waits) counted each look at the end
    of a slice as a refusal, though no unit existed: stopped afterwards, it
    kept the next unit from every newcomer while it stayed stopped.  Refused
    now means woken for a unit and finding none."""
    from native_helpers import child, reap, sem, wait_stopped
    dom.sem_create("s", 0)
    head = child(lambda: dom.sem_decrement("s", wait=True))     # the main thread: sliced
    try:
        until(lambda: sem(dom, "s")["waiters"] == 1, what="the head queued")
        time.sleep(0.35)                 # > 1 ms, and three looks at the end of a slice
        os.kill(head, signal.SIGSTOP)
        wait_stopped(head)
        assert sem(dom, "s")["reserved"] is False
        dom.sem_increment("s")
        assert dom.sem_decrement("s") == 0           # a newcomer takes the free unit
        os.kill(head, signal.SIGCONT)
        dom.sem_increment("s")
        assert os.WIFEXITED(st := reap(head)) and os.WEXITSTATUS(st) == 0
    finally:
        kill_if_alive(head)
