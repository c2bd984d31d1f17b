"""Awaitable waits cost no thread (issue 10), on both backends, in real
containers: thousands of coroutines waiting at once honour their timeouts,
are all served by increments from another container, a holder of one
primitive may await another while many await it, a container SIGKILLed with
1,000 queued coroutines leaves nothing queued and swallows nothing, and
cancellation storms conserve counts (posted == taken + final value).

``N_WAITERS`` is 1,000 here; ``python3 tests/stress.py --async-waiters
10000`` runs the same checks with 10,000 (``run_async_checks``)."""

from __future__ import annotations

import time

import pytest

from test_semantics import cluster, uniq, settle

pytestmark = pytest.mark.timeout(120)

N_WAITERS = 1000
#: the issue's bound: every coroutine returns within timeout + 100 ms
SLACK = 0.1

# Run in the container (its loop): n coroutines await an empty semaphore with
# timeout; each one's wait is measured from its own call to its return (the
# n calls themselves take a while to start: 10,000 tasks on one loop), and
# the last return since the first call is reported too.
TIMEOUTS = """
loop = asyncio.get_running_loop()
t0 = loop.time()
async def one():
    s = loop.time()
    r = await semaphore.decrement_async(S, wait=True, timeout=T)
    e = loop.time()
    return r, e - s, e - t0
rs = await asyncio.gather(*[one() for _ in range(n)])
result = [sorted(set(r for r, _, _ in rs)), max(w for _, w, _ in rs), min(w for _, w, _ in rs),
          max(e for _, _, e in rs)]
"""

SERVED = """
rs = await asyncio.gather(*[semaphore.decrement_async(S, wait=True, timeout=T) for _ in range(n)])
result = [sum(1 for r in rs if r >= 0), sum(1 for r in rs if r < 0)]
"""

# A holder of mutex M awaits semaphore S while 32 other coroutines await M
# (the old native backend: 32 pool threads taken by the waiters on M, the
# holder's wait never got one: deadlock).
HOLDER = """
m = mutex.access(M)
assert await m.lock_async(timeout=5)
got = []
async def waiter():
    ok = await m.lock_async(timeout=T)
    if ok:
        got.append(1)
        m.unlock()
    return ok
ws = [asyncio.ensure_future(waiter()) for _ in range(32)]
await asyncio.sleep(0.2)
emit("holder_waits", S=S)
r = await semaphore.decrement_async(S, wait=True, timeout=T)
m.unlock()
oks = await asyncio.gather(*ws)
result = [r, sum(oks), len(got)]
"""

CANCEL_STORM = """
import random
rnd = random.Random(seed)
tasks = [asyncio.ensure_future(semaphore.decrement_async(S, wait=True, timeout=T)) for _ in range(n)]
await asyncio.sleep(0.05)
emit("storm_queued", S=S)
for i in range(n):
    tasks[rnd.randrange(n)].cancel()
    if i % 8 == 0:
        await asyncio.sleep(0.002)
    else:
        await asyncio.sleep(0)
rs = await asyncio.gather(*tasks, return_exceptions=True)
result = [sum(1 for r in rs if isinstance(r, int) and r >= 0),
          sum(1 for r in rs if isinstance(r, asyncio.CancelledError)),
          sum(1 for r in rs if isinstance(r, int) and r < 0)]
"""

POSTER = """
for i in range(p):
    semaphore.increment(S)
    await asyncio.sleep(gap)
result = p
"""


def check_timeouts(actor, n: int, timeout: float = 0.5) -> list:
    S = uniq("aw.empty")
    assert actor.call("semaphore.create(S, 0)", S=S) is True
    values, longest, shortest, last_end = actor.call(TIMEOUTS, timeout=60, S=S, T=timeout, n=n)
    assert values == [-1]
    assert longest <= timeout + SLACK, f"one of {n} returned {longest:.3f} s after its call"
    assert shortest >= timeout - 0.01, f"one of {n} returned early, {shortest:.3f} s after its call"
    return [shortest, longest, last_end]


def check_served(c, n: int) -> None:
    S = uniq("aw.served")
    a, b = c["a"], c["b"]
    assert a.call("semaphore.create(S, 0)", S=S) is True
    pend = a.start(SERVED, S=S, T=60.0, n=n)
    c.wait_waiters(S, n, timeout=30)
    assert b.call("[semaphore.increment(S) for _ in range(n)][-1]", timeout=60, S=S, n=n) >= 0
    assert pend.result(timeout=60) == [n, 0]
    assert b.call("semaphore.get(S)", S=S) == 0
    settle(lambda: c.waiters(S) == 0, what="nothing left queued")


def check_killed_with_queued(c, n: int) -> None:
    S = uniq("aw.killed")
    a, b = c["a"], c["b"]
    assert b.call("semaphore.create(S, 0, protected=True)", S=S) is True
    pend = a.start(SERVED, S=S, T=60.0, n=n)
    try:
        c.wait_waiters(S, n, timeout=30)
    except AssertionError:
        pend.result(timeout=1)          # its error, if it raised one
        raise
    a.kill()                                   # SIGKILL; waits for the restart
    settle(lambda: c.waiters(S) == 0, what=f"the {n} queued coroutines of the dead container dequeued")
    # nothing swallowed: what is posted now stays, and is taken by someone else
    assert b.call("[semaphore.increment(S) for _ in range(3)][-1]", S=S) == 3
    assert b.call("semaphore.get(S)", S=S) == 3
    assert b.call("[semaphore.decrement(S) for _ in range(3)]", S=S) == [2, 1, 0]


def check_cancel_storm(c, n: int, seed: int) -> None:
    S = uniq("aw.cancel")
    a, b = c["a"], c["b"]
    assert b.call("semaphore.create(S, 0)", S=S) is True
    posted = n // 2
    storm = a.start(CANCEL_STORM, S=S, T=3.0, n=n, seed=seed)
    c.events.wait("storm_queued", timeout=30, S=S)
    assert b.call(POSTER, timeout=60, S=S, p=posted, gap=0.0005) == posted
    taken, cancelled, timed_out = storm.result(timeout=60)
    final = b.call("semaphore.get(S)", S=S)
    assert taken + cancelled + timed_out == n
    assert cancelled > 0
    assert posted == taken + final, (posted, taken, final, cancelled, timed_out)
    settle(lambda: c.waiters(S) == 0, what="nothing left queued after the storm")


def run_async_checks(n: int, backends=("rpc", "native")) -> dict:
    """The checks above with n coroutines (tests/stress.py --async-waiters N);
    returns the figures, raises AssertionError on a failure."""
    import tempfile
    from harness import Events
    figures = {}
    cfg = {"waiters": 2 * n + 1024, "waiter_quota": n + 512}
    for backend in backends:
        events = Events()
        try:
            with cluster(events, backend, ["a", "b"], native_config=cfg) as c:
                first, last, last_end = check_timeouts(c["a"], n)
                t0 = time.monotonic()
                check_served(c, n)
                served = time.monotonic() - t0
                check_killed_with_queued(c, n)
                check_cancel_storm(c, n, seed=n)
            figures[backend] = {"coroutines": n, "shortest_wait_s": round(first, 4),
                                "longest_wait_s": round(last, 4),
                                "last_return_since_first_call_s": round(last_end, 4),
                                "served_all_s": round(served, 3)}
        finally:
            events.close()
    return figures


def test_a_thousand_coroutines_awaiting_an_empty_semaphore_time_out_together(events, backend):
    with cluster(events, backend, ["a"]) as c:
        check_timeouts(c["a"], N_WAITERS)


def test_n_waiters_are_all_served_by_n_increments_from_another_container(events, backend):
    with cluster(events, backend, ["a", "b"]) as c:
        check_served(c, N_WAITERS)


def test_a_holder_may_await_another_primitive_while_32_coroutines_await_it(events, backend):
    M, S = uniq("aw.m"), uniq("aw.t")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert b.call("semaphore.create(S, 0)", S=S) is True
        pend = a.start(HOLDER, M=M, S=S, T=20.0)
        events.wait("holder_waits", timeout=20, S=S)
        c.wait_waiters(S, 1, timeout=10)
        assert b.call("semaphore.increment(S)", S=S) == 1
        assert pend.result(timeout=30) == [0, 32, 32]


def test_a_container_killed_with_1000_queued_coroutines_leaves_nothing_queued(events, backend):
    with cluster(events, backend, ["a", "b"]) as c:
        check_killed_with_queued(c, N_WAITERS)


@pytest.mark.parametrize("seed", [1, 2])
def test_cancellation_storms_conserve_counts(events, backend, seed):
    with cluster(events, backend, ["a", "b"]) as c:
        check_cancel_storm(c, 400, seed)


def test_cancelling_a_mutex_waiter_passes_the_lock_on(events, backend):
    """asyncio.Lock's behaviour: a cancelled waiter never ends up holding the
    lock, and the next waiter gets it when the holder unlocks."""
    M = uniq("aw.mc")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert b.call("mutex.access(M).lock(timeout=1)", M=M) is True
        # b holds M; a's first waiter is cancelled while queued; b unlocks;
        # the second waiter gets the lock.
        pend = a.start("""
m = mutex.access(M)
t1 = asyncio.ensure_future(m.lock_async(timeout=10))
t2 = asyncio.ensure_future(m.lock_async(timeout=10))
await asyncio.sleep(0.2)
t1.cancel()
await asyncio.sleep(0.05)
emit("cancelled", M=M)
ok = await t2
m.unlock()
result = [t1.cancelled(), ok]
""", M=M)
        events.wait("cancelled", timeout=20, M=M)
        b.call("mutex.access(M).unlock()", M=M)
        assert pend.result(timeout=20) == [True, True]
        assert b.call("mutex.access(M).lock(timeout=1)", M=M) is True
        b.call("mutex.access(M).unlock()", M=M)


def test_every_shared_variable_call_has_an_awaitable_form_that_leaves_the_loop_serving(events, backend):
    V = uniq("aw.var")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert a.call("await sharedvar.create_var_async(V)", V=V) is True
        assert a.call("await sharedvar.create_var_async(V)", V=V) is False
        pend = a.start("await sharedvar.wait_for_value_async(V, timeout=20)", V=V)
        time.sleep(0.2)
        assert not pend.done()
        # the loop of a still serves its other connections meanwhile
        assert a.call("await sharedvar.get_value_async(V)", timeout=5, V=V) == ""
        assert b.call("await sharedvar.set_value_async(V, 'hello')", V=V) is True
        assert pend.result(timeout=10) == "hello"
        assert a.call("await sharedvar.get_value_async(V)", V=V) == "hello"
        assert a.call("await sharedvar.delete_var_async(V)", V=V) is True
        assert a.call("await sharedvar.delete_var_async(V)", V=V) is False
        assert a.call("await sharedvar.get_value_async(V)", V=V) is None


SYNC_WAITS = """
import logging, threading
seen = []
class H(logging.Handler):
    def emit(self, record):
        seen.append(record.getMessage())
h = H(logging.WARNING)
logging.getLogger("netplex_native").addHandler(h)
try:
    semaphore.create(S, 0)
    m = mutex.access(M)
    assert await m.lock_async(timeout=1)
    th = threading.Thread(target=lambda: semaphore.decrement(S, wait=True, timeout=0.02))
    th.start(); th.join()                               # not on the loop: no warning
    for _ in range(3):
        semaphore.decrement(S, wait=True, timeout=0.02)  # one call site: one warning
    semaphore.decrement(S, wait=True, timeout=0.02)      # another site: another
    semaphore.decrement(S, wait=True, timeout=0)         # never blocks: none
    semaphore.decrement(S)                               # never blocks: none
    sharedvar.create_var(V)
    sharedvar.wait_for_value(V, timeout=0.02)
    th = threading.Thread(target=lambda: m.lock(timeout=0.02))
    th.start(); th.join()                               # not on the loop: no warning
    m.lock(timeout=0.02)
finally:
    logging.getLogger("netplex_native").removeHandler(h)
m.unlock()
result = [s for s in seen if "event loop" in s]
"""


def test_a_synchronous_wait_on_the_loop_thread_warns_once_per_call_site(events, backend):
    S, M, V = uniq("aw.w"), uniq("aw.wm"), uniq("aw.wv")
    with cluster(events, backend, ["a"]) as c:
        msgs = c["a"].call(SYNC_WAITS, timeout=20, S=S, M=M, V=V)
        sems = [m for m in msgs if "semaphore.decrement(wait=True)" in m]
        assert len(sems) == 2, msgs
        assert all("decrement_async" in m for m in sems)
        assert len([m for m in msgs if "wait_for_value" in m and "wait_for_value_async" in m]) == 1, msgs
        assert len([m for m in msgs if "Mutex.lock()" in m and "lock_async" in m]) == 1, msgs
        assert len(msgs) == 4, msgs


HANDLE_SYNC_WAITS = """
import logging
seen = []
class H(logging.Handler):
    def emit(self, record):
        seen.append(record.getMessage())
h = H(logging.WARNING)
logging.getLogger("netplex_native").addHandler(h)
try:
    semaphore.create(S, 0)
    s = semaphore.access(S)
    m = mutex.access(M)
    assert await m.lock_async(timeout=1)
    s.acquire(timeout=0.02)
    s.decrement(wait=True, timeout=0.02)
    m.acquire(timeout=0.02)
    m.lock(timeout=0.02)
finally:
    logging.getLogger("netplex_native").removeHandler(h)
m.unlock()
result = [s for s in seen if "event loop" in s]
"""


def test_a_handles_synchronous_wait_on_the_loop_names_the_handles_awaitable_form(events, backend):
    """s.acquire() on the loop names ``await s.acquire_async(...)``, not the
    module's ``semaphore.decrement``; the same for the other handle waits."""
    S, M = uniq("aw.hw"), uniq("aw.hwm")
    with cluster(events, backend, ["a"]) as c:
        msgs = c["a"].call(HANDLE_SYNC_WAITS, timeout=20, S=S, M=M)
        assert len(msgs) == 4, msgs
        acq, dec, macq, mlock = msgs
        assert "Semaphore.acquire()" in acq and "await s.acquire_async(" in acq, acq
        assert "Semaphore.decrement(wait=True)" in dec and "await s.decrement_async(" in dec, dec
        assert "Mutex.acquire()" in macq and "await m.acquire_async()" in macq, macq
        assert "Mutex.lock()" in mlock and "await m.lock_async()" in mlock, mlock
        assert not any("semaphore.decrement" in m or "mutex.access(name)" in m for m in msgs), msgs


def test_destroying_a_semaphore_ends_every_awaiting_coroutine(events, backend):
    """Far more than one wake-up batch (64) of coroutines wait; destroy from
    another container ends all of them with -1, promptly."""
    S = uniq("aw.destroyed")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert a.call("semaphore.create(S, 0)", S=S) is True
        pend = a.start(SERVED, S=S, T=30.0, n=300)
        c.wait_waiters(S, 300, timeout=30)
        t0 = time.monotonic()
        b.call("semaphore.destroy(S)", S=S)
        assert pend.result(timeout=10) == [0, 300]
        assert time.monotonic() - t0 < 5


def test_one_process_cannot_take_every_async_waiter_record():
    """A process holds at most waiter_quota records: beyond it TableFullError
    (nothing changed), and another process still gets its own."""
    import asyncio
    import os
    from netplex_native import errors
    from netplex_native.native import domain as _native
    from netplex_native.native.asyncwait import waits_of
    from harness import fork_call
    from native_helpers import reap, exited_ok, sem

    dom = _native.Domain.create(semaphores=4, mutexes=4, processes=8, waiters=16, waiter_quota=10)
    try:
        dom.sem_create("q", 0)

        def fill(n):
            async def main():
                tasks = [asyncio.ensure_future(waits_of(dom).acquire(_native._SEM, "q", 5))
                         for _ in range(n)]
                await asyncio.sleep(0.1)
                try:
                    await waits_of(dom).acquire(_native._SEM, "q", 5)
                    raise AssertionError("the 11th record was granted")
                except errors.TableFullError as e:
                    assert "waiter_quota" in str(e)
                finally:
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
            asyncio.run(main())

        fill(10)
        assert sem(dom, "q")["waiters"] == 0
        # another process is not starved by this one's records: hold 10 here,
        # and a child still queues its own (6 left in the table of 16)
        async def hold_and_check():
            tasks = [asyncio.ensure_future(waits_of(dom).acquire(_native._SEM, "q", 5))
                     for _ in range(10)]
            await asyncio.sleep(0.1)

            def child():
                async def six():
                    ts = [asyncio.ensure_future(waits_of(dom).acquire(_native._SEM, "q", 0.2))
                          for _ in range(6)]
                    assert await asyncio.gather(*ts) == [-1] * 6
                asyncio.run(six())
            pid = fork_call(child)
            loop = asyncio.get_running_loop()
            status = await loop.run_in_executor(None, reap, pid)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return status, pid
        status, pid = asyncio.run(hold_and_check())
        assert exited_ok(status)
        assert dom.recover(pid, timeout=10) >= 0
        assert sem(dom, "q")["waiters"] == 0
        dom.check()
    finally:
        dom.unlink()
        dom.close()
