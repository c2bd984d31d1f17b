"""The five defects of the reference implementation
(reference/netplex-semantics.md, "Defects in the reference that we must not
repeat"): one test each, on both backends, with real processes and SIGKILL.
Infrastructure: test_semantics.py."""

from __future__ import annotations

import time

import pytest

from test_semantics import cluster, uniq, settle

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("increment_when", ["before_reap", "after_restart"])
def test_defect1_dead_waiter_does_not_swallow_an_increment(events, backend, increment_when):
    """Defect 1: "A container that dies while blocked in `decrement ~wait:true`
    stays queued; a later increment hands the count to the dead waiter and the
    count is lost." """
    S, T = uniq("sem"), uniq("sem")
    with cluster(events, backend, ["dead", "w", "inc"]) as c:
        dead, w, inc = c["dead"], c["w"], c["inc"]
        assert inc.call("[semaphore.create(S, 0), semaphore.create(T, 0)]", S=S, T=T) == [True, True]
        # S: the dead waiter is ahead of a live one, which must get the count
        dead.start("semaphore.decrement(S, wait=True, timeout=60)", S=S)
        c.wait_waiters(S, 1)
        live = w.start("semaphore.decrement(S, wait=True, timeout=60)", S=S)
        c.wait_waiters(S, 2)
        n = dead.readies()
        dead.kill(wait_restart=increment_when == "after_restart")
        inc.call("semaphore.increment(S)", S=S)
        assert live.result(10) == 0, "the live waiter did not get the count"
        dead.wait_ready(n + 1)
        assert inc.call("semaphore.get(S)", S=S) == 0
        # T: the dead waiter was alone; the count stays in the value
        dead.start("semaphore.decrement(T, wait=True, timeout=60)", T=T)
        c.wait_waiters(T, 1)
        dead.kill(wait_restart=increment_when == "after_restart")
        inc.call("semaphore.increment(T)", T=T)
        dead.wait_ready(n + 2)
        settle(lambda: inc.call("semaphore.get(T)", T=T) == 1, what="the count kept in the value")
        time.sleep(0.2)
        assert inc.call("semaphore.get(T)", T=T) == 1
        assert w.call("semaphore.decrement(T)", T=T) == 0


@pytest.mark.parametrize("ends", [("sigkill", "sigkill"), ("sigkill", "regular"), ("regular", "sigkill")])
def test_defect2_unlock_by_another_container_does_not_skew_accounting(events, backend, ends):
    """Defect 2: "A mutex unlocked by a different container skews the
    per-container accounting; when both exit, the mutex can admit two
    holders." """
    M = uniq("mtx")
    with cluster(events, backend, ["a", "b", "c", "d"]) as c:
        a, b, cc, d = c["a"], c["b"], c["c"], c["d"]
        assert a.call("mutex.access(M).lock()", M=M) is True
        # the reference's any-container unlock is unlock(force=True) here
        assert b.call("mutex.access(M).unlock(force=True)", M=M) is None
        assert cc.call("mutex.access(M).lock(timeout=2)", M=M) is True
        for actor, end in zip((a, b), ends):
            actor.kill() if end == "sigkill" else actor.finish()
        # c still holds it, alone
        assert d.call("mutex.access(M).lock(timeout=0.3)", M=M) is False
        assert a.call("mutex.access(M).lock(timeout=0)", M=M) is False
        assert b.call("mutex.access(M).lock(timeout=0)", M=M) is False
        # a waiter queued now gets it only when c unlocks
        waiting = d.start("mutex.access(M).lock(timeout=20)", M=M)
        c.wait_waiters(M, 1)
        assert not waiting.done(0.2)
        cc.call("mutex.access(M).unlock()", M=M)
        assert waiting.result(5) is True
        assert a.call("mutex.access(M).lock(timeout=0)", M=M) is False
        assert cc.call("mutex.access(M).lock(timeout=0)", M=M) is False


@pytest.mark.parametrize("unlock_when", ["before_reap", "after_restart"])
def test_defect3_waiter_dying_in_the_queue_does_not_swallow_an_unlock(events, backend, unlock_when):
    """Defect 3: "A waiter that dies while queued can swallow an unlock,
    leaving the mutex locked forever." """
    M = uniq("mtx")
    with cluster(events, backend, ["h", "w1", "w2", "x"]) as c:
        h, w1, w2 = c["h"], c["w1"], c["w2"]
        assert h.call("mutex.access(M).lock()", M=M) is True
        w1.start("mutex.access(M).lock(timeout=60)", M=M)
        c.wait_waiters(M, 1)
        second = w2.start("mutex.access(M).lock(timeout=60)", M=M)
        c.wait_waiters(M, 2)
        n = w1.readies()
        w1.kill(wait_restart=unlock_when == "after_restart")
        h.call("mutex.access(M).unlock()", M=M)
        assert second.result(10) is True, "the live waiter did not get the mutex"
        w1.wait_ready(n + 1)
        assert c["x"].call("mutex.access(M).lock(timeout=0.2)", M=M) is False
        w2.call("mutex.access(M).unlock()", M=M)
        assert c["x"].call("mutex.access(M).lock(timeout=2)", M=M) is True


def test_defect4_destroy_removes_and_answers_every_waiter(events, backend):
    """Defect 4: "`destroy` does not remove the semaphore (the value survives;
    a later `create` says false), contrary to its documentation; an exception
    inside `destroy` can leave waiters unanswered." """
    S, V = uniq("sem"), uniq("sem")
    waiters = ["w1", "w2", "w3"]
    with cluster(events, backend, waiters + ["d"]) as c:
        d = c["d"]
        # the value does not survive
        assert d.call("[semaphore.create(V, 5, protected=True), semaphore.destroy(V)]", V=V) == [True, None]
        assert d.call("semaphore.create(V, 2)", V=V) is True, "destroy did not remove the semaphore"
        assert d.call("semaphore.get(V)", V=V) == 2
        # every waiter is answered
        assert d.call("semaphore.create(S, 0)", S=S) is True
        pending = []
        for i, n in enumerate(waiters):
            pending.append(c[n].start("""
                t0 = time.monotonic()
                r = semaphore.decrement(S, wait=True, timeout=60)
                result = [r, time.monotonic() - t0]
            """, S=S))
            c.wait_waiters(S, i + 1)
        d.call("semaphore.destroy(S)", S=S)
        answers = [p.result(5) for p in pending]
        assert [r for r, _ in answers] == [-1, -1, -1]
        assert all(waited < 30 for _, waited in answers)
        assert d.call("semaphore.create(S, 1)", S=S) is True
        assert c["w1"].call("semaphore.decrement(S, wait=True, timeout=2)", S=S) == 0
        # the destroyed semaphore's protected holdings do not come back to the new one
        assert d.call("semaphore.create(V + '.p', 3, protected=True)", V=V) is True
        assert c["w2"].call("semaphore.decrement(V + '.p')", V=V) == 2
        assert d.call("[semaphore.destroy(V + '.p'), semaphore.create(V + '.p', 0)]", V=V) == [None, True]
        c["w2"].kill()
        assert d.call("semaphore.get(V + '.p')", V=V) == 0


def test_defect5_crash_mid_frame_leaves_nothing_stuck(events, backend):
    """Defect 5: "Message boxes (added later as `Netplex_mbox`) can be left
    stuck by a crash mid-operation."  Our analogue: a container dies with half
    a frame written on its channel while holding a mutex and a protected
    count, with another container waiting; the controller keeps serving
    everyone's primitives and messages, and the dead one's holdings come back."""
    S, M, Q = uniq("sem"), uniq("mtx"), uniq("sem")
    with cluster(events, backend, ["crash", "w", "b"]) as c:
        crash, w, b = c["crash"], c["w"], c["b"]
        assert b.call("[semaphore.create(S, 1, protected=True), semaphore.create(Q, 0)]", S=S, Q=Q) == [True, True]
        assert crash.call("[mutex.access(M).lock(), semaphore.decrement(S)]", M=M, S=S) == [True, 0]
        waiting = w.start("mutex.access(M).lock(timeout=30)", M=M)
        c.wait_waiters(M, 1)
        n = crash.readies()
        crash.start("""
            frame = wire.encode([77, "sem.increment", [Q]])
            ctx.channel.sock.send(frame[: len(frame) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        """, Q=Q)
        crash.wait_ready(n + 1)
        assert waiting.result(5) is True, "the waiter did not get the dead holder's mutex"
        assert b.call("semaphore.get(Q)", Q=Q) == 0, "half a frame was executed"
        assert b.call("semaphore.decrement(S, wait=True, timeout=2)", S=S) == 0, "the count was not given back"
        assert b.call("semaphore.increment(Q)", Q=Q) == 1
        w.call("mutex.access(M).unlock()", M=M)
        assert crash.call("mutex.access(M).lock(timeout=2)", M=M) is True
        crash.call("cenv.send_message('*', 'ping', ['after-crash'])")
        got = events.wait("message", count=3, timeout=10, name="ping")
        assert sorted(e["service"] for e in got) == ["b", "crash", "w"]
