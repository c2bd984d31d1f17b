"""Adaptive waiting before a waiter queues (A8 of csrc/acquire.c): when the last
releaser of what it waits for ran on its own CPU, the waiter yields that CPU
instead of sleeping, so a hand-off between two processes sharing a CPU costs one
context switch and no futex sleep or wake-up.

Read from the kernel, not from timings: a futex sleep is a voluntary context
switch (/proc/.../status: voluntary_ctxt_switches), a yield that lets the other
process run is not.  Without A8 every wait of a one-CPU ping-pong sleeps (one
voluntary switch per hand-off); with it, almost none does.  The values are then
checked exactly: the yields take and give back nothing of their own.  With a
CPU hog on the same CPU a yield would put the waiter behind the hog's time slice
(a sleeper woken by the release preempts it): the waits must then sleep again."""

from __future__ import annotations

import os
import threading

import pytest

from harness import hog_on
from native_helpers import child, exited_ok, kill_if_alive, reap, sem

pytestmark = pytest.mark.timeout(120)

HANDOFFS = 2000


def voluntary_switches(tid: int | None = None) -> int:
    path = f"/proc/self/task/{tid}/status" if tid else "/proc/self/status"
    with open(path) as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in " + path)


def one_cpu() -> int:
    return min(os.sched_getaffinity(0))


def ping_pong(dom, me: str, other: str, n: int, first: bool, in_thread: bool, out: int) -> None:
    """n hand-offs: take `me`, give `other` (the first side gives first).
    Writes the voluntary switches of the thread that waited to `out`."""
    def run(res):
        tid = threading.get_native_id() if in_thread else None
        v0 = voluntary_switches(tid)
        for i in range(n):
            if first:
                dom.sem_increment(other)
                assert dom.sem_decrement(me, wait=True) == 0
            else:
                assert dom.sem_decrement(me, wait=True) == 0
                dom.sem_increment(other)
        res.append(voluntary_switches(tid) - v0)
    res: list[int] = []
    if in_thread:
        t = threading.Thread(target=run, args=(res,))
        t.start()
        t.join()
    else:
        run(res)
    os.write(out, b"%d\n" % res[0])


def run_ping_pong(dom, in_thread: bool, pipes) -> list[int]:
    """Two children pinned to one CPU pass a unit back and forth HANDOFFS
    times through two semaphores; the voluntary switches of each side's
    waiting thread.  Checks the values and queues exactly."""
    dom.sem_create("ping", 0)
    dom.sem_create("pong", 0)
    cpu = one_cpu()
    r, w = pipes()

    def side(me, other, first):
        os.sched_setaffinity(0, {cpu})
        dom.register()
        ping_pong(dom, me, other, HANDOFFS, first, in_thread, w)

    a = child(side, "ping", "pong", True)
    b = child(side, "pong", "ping", False)
    try:
        assert exited_ok(reap(a, 60)) and exited_ok(reap(b, 60))
    finally:
        kill_if_alive(a)
        kill_if_alive(b)
    os.close(w)
    with os.fdopen(r) as f:
        sleeps = [int(x) for x in f.read().split()]
    print(f"voluntary switches per side over {HANDOFFS} waits: {sleeps}")
    assert len(sleeps) == 2
    for name in ("ping", "pong"):
        info = sem(dom, name)
        assert info["value"] == 0 and info["waiters"] == 0, info
    return sleeps


@pytest.mark.parametrize("in_thread", [False, True], ids=["main-thread", "worker-thread"])
def test_a_hand_off_on_one_cpu_yields_the_cpu_instead_of_sleeping(dom, in_thread, pipes):
    """On Python's main thread (whose waits would sleep with a timer) and on a
    worker thread (whose would not): fewer than a quarter of the waits sleep."""
    sleeps = run_ping_pong(dom, in_thread, pipes)
    assert all(s < HANDOFFS // 4 for s in sleeps), (
        f"{sleeps} of {HANDOFFS} waits slept: a hand-off on one CPU went through a futex sleep")


def test_with_a_cpu_hog_on_that_cpu_the_waits_sleep_again(dom, pipes):
    """The same ping-pong with a busy process on its CPU: a yield runs the
    hog's time slice, so the waiters stop yielding and most waits sleep (a
    waiter that kept yielding would sleep in none, and wait a slice per
    hand-off)."""
    with hog_on(one_cpu()):
        sleeps = run_ping_pong(dom, False, pipes)
    assert sum(sleeps) >= HANDOFFS // 2, (
        f"only {sleeps} of 2 x {HANDOFFS} waits slept: the waiters kept yielding to the hog")
