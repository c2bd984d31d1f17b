"""A coroutine queued on a loop that will never run again does not block the
others (native backend, real processes, public ``Domain``).

Process A queues ``m.lock_async()`` and ``s.decrement_async(wait=True)`` and
then closes its loop (or closes the waiting coroutines, or closes the loop and
collects it) while it lives on.  The mutex is then unlocked and a unit posted:
another process must get both, promptly, and A must not be needed (nor
recovered) for it.  A loop that is merely not running keeps its place, as a
paused thread does (README, "What is not guaranteed"): waiters queued behind
it are not served until A's loop runs again and takes it; so does a
SIGSTOPped waiter at the head of the queue.  A record given back for a
closed loop serves its next wait even when the old coroutine is collected
later (it must not take the new wait's wake-up away)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time

import pytest

import netplex_native as netplex
from netplex_native import Domain

from native_helpers import kill_if_alive

pytestmark = pytest.mark.timeout(60)


def _queue_then(mode, d, w, r_go):
    """Process A: queue on m and s, then leave its loop in `mode`."""
    signal.alarm(40)
    m, s = d.mutex("m"), d.semaphore("s", 0, protected=False)
    loop = asyncio.new_event_loop()
    tasks = []

    async def queue():
        tasks.append(loop.create_task(m.lock_async(timeout=None)))
        tasks.append(loop.create_task(s.decrement_async(wait=True)))
        await asyncio.sleep(0.2)
    loop.run_until_complete(queue())
    assert not any(t.done() for t in tasks)
    if mode == "close":
        loop.close()
    elif mode == "close_gc":
        loop.close()
        del loop, tasks[:]
        gc.collect()
    elif mode == "coro_close":                 # the coroutines end off their (idle) loop
        for t in tasks:
            t.get_coro().close()
    os.write(w, b"R")
    os.read(r_go, 1)                           # live on until the parent is done
    if mode == "idle":                         # the loop runs again: its waiters take
        got = loop.run_until_complete(asyncio.wait_for(asyncio.gather(*tasks), 10))
        m.unlock()
        os._exit(0 if got == [True, 0] else 3)
    os._exit(0)


def _run(mode):
    """A domain whose m and s have process A's waiters, left in `mode`, at
    the head of their queues; m just unlocked and one unit posted."""
    d = Domain.create(semaphores=8, mutexes=8, processes=8, export=False)
    m, s = d.mutex("m"), d.semaphore("s", 0, protected=False)
    assert m.lock(timeout=0)
    r, w = os.pipe()
    r_go, w_go = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _queue_then(mode, d, w, r_go)
        finally:
            os._exit(2)
    try:
        assert os.read(r, 1) == b"R"
        m.unlock()
        s.increment()
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return d, pid, m, s, w_go


def _other_process_gets_both(m, s):
    """In a third process: lock m and take the unit (each within 5 s)."""
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)
        ok = m.lock(timeout=5)
        v = s.decrement(wait=True, timeout=5)
        if ok:
            m.unlock()
        os._exit(0 if (ok, v) == (True, 0) else 1)
    _, st = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(st)


@pytest.mark.parametrize("mode", ["close", "close_gc", "coro_close"])
def test_a_waiter_whose_loop_is_closed_or_whose_coroutine_ended_leaves_the_queue(mode):
    d, pid, m, s, w_go = _run(mode)
    try:
        t0 = time.monotonic()
        assert _other_process_gets_both(m, s) == 0, "the free mutex / posted unit went to nobody"
        assert time.monotonic() - t0 < 5
        assert m.lock(timeout=5)               # free again, here too
        m.unlock()
        assert s.get() == 0                    # the unit was taken once, nothing swallowed
    finally:
        os.write(w_go, b"G")
        _, st = os.waitpid(pid, 0)
        d.unlink()
        d.close()
    assert os.waitstatus_to_exitcode(st) == 0


def test_a_loop_that_is_not_running_keeps_its_place_and_takes_when_it_runs_again():
    d, pid, m, s, w_go = _run("idle")
    try:
        # documented: the head of the queue is A's idle loop.  It has not run
        # since it started starving, so it reserves nothing (bounded
        # overtaking, A2): a caller not queued may use the free mutex and the
        # posted unit meanwhile, and A's place is kept
        assert m.lock(timeout=5) is True
        assert s.decrement(wait=True, timeout=5) == 0
        assert [x["waiters"] for x in d._core.mutexes()] == [1]
        assert [x["waiters"] for x in d._core.semaphores()] == [1]
        m.unlock()
        s.increment()
        os.write(w_go, b"G")
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 0     # A's tasks got the lock and the unit
        assert s.get() == 0 and not m.locked()
    finally:
        kill_if_alive(pid)
        d.unlink()
        d.close()


def test_a_record_given_back_for_a_closed_loop_serves_its_next_wait_even_when_the_old_coroutine_is_collected():
    """One record only: the waiter of a closed loop leaves it; the next wait
    (another loop) reuses it; collecting the old coroutine meanwhile must not
    take the new wait's wake-up away (it is served at once, not at its timeout)."""
    d = Domain.create(semaphores=8, mutexes=8, processes=8, waiters=1, waiter_quota=1,
                      export=False)
    try:
        m = d.mutex("m")
        assert m.lock(timeout=0)
        old = asyncio.new_event_loop()
        old_task = [old.create_task(m.lock_async(timeout=None))]
        old.run_until_complete(asyncio.sleep(0.1))
        old.close()

        async def main():
            loop = asyncio.get_running_loop()
            while True:                            # the helper gives the record back within a slice
                try:
                    t = asyncio.ensure_future(m.lock_async(timeout=30))
                    await asyncio.sleep(0.1)
                    if t.done():
                        t.result()
                    break
                except netplex.TableFullError:
                    await asyncio.sleep(0.05)
            del old_task[:]                        # the old coroutine is finalized here, off its loop
            gc.collect()
            loop.call_later(0.1, m.unlock)
            return await asyncio.wait_for(t, 5)
        assert asyncio.run(main()) is True
        m.unlock()
    finally:
        d.unlink()
        d.close()


def test_a_stopped_process_at_the_head_of_the_queue_keeps_its_place():
    """README, "What is not guaranteed": a SIGSTOPped coroutine at the head
    keeps its place and takes the mutex once continued; meanwhile a caller
    not queued may use the free mutex (a head that has not run since it
    started starving reserves nothing: bounded overtaking, A2), so nothing
    is kept idle for it.  Those queued behind it: tests/test_native_fairness.py."""
    d = Domain.create(semaphores=8, mutexes=8, processes=8, export=False)
    m = d.mutex("m")
    assert m.lock(timeout=0)
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)
        code = 3
        try:
            async def take():
                return await m.lock_async(timeout=20)
            if asyncio.run(take()) is True:
                m.unlock()
                code = 0
        finally:
            os._exit(code)
    try:
        deadline = time.monotonic() + 10
        while [x["waiters"] for x in d._core.mutexes()] != [1]:
            assert time.monotonic() < deadline, "the child never queued"
            time.sleep(0.01)
        time.sleep(0.05)                       # queued for longer than the overtaking bound
        os.kill(pid, signal.SIGSTOP)
        m.unlock()
        assert m.lock(timeout=5) is True       # the stopped head reserved nothing
        assert [x["waiters"] for x in d._core.mutexes()] == [1]    # and keeps its place
        m.unlock()
        os.kill(pid, signal.SIGCONT)
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 0
        assert m.lock(timeout=5)
        m.unlock()
    finally:
        kill_if_alive(pid)
        d.unlink()
        d.close()
