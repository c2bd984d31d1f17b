"""Crash at every crash point inside recovery.

A victim V dies holding a guard (with its redo log in each of its states), a
protected count, a mutex, a queued wait and three queued async waiter records
(coroutines: asyncwait.c), which recovery dequeues and frees like its threads.  A recoverer R, which has a stake in
the very object whose guard V holds, is SIGKILLed at the n-th crash point of
recover(V), for n = 1, 2, ... until it completes; in the chain variant a second
recoverer R2 is killed inside its own recovery of what R left.  Then the parent
(the supervisor) recovers everyone with a bounded recover, and every value,
delta, owner, queue and slot is exactly as it must be."""

import os
import threading

import pytest

from netplex_native.native import domain as _native

from native_helpers import (arm, await_in_thread, child, hold_until_killed, kill_and_reap, killed,
                            mtx, pids, reap, sem, until)

MAX_STEPS = 400
STEPS = {}


def scene(dom, victim_crash, victim_op="increment"):
    """V: takes s (protected), locks m, a thread queues on q, then dies at crash
    point victim_crash of increment(t) (holding t's guard).  R: took one unit of
    t (protected) first, and waits for the go.  Returns (V, R, go_fd)."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()

    def recoverer():
        dom.sem_decrement("t")
        os.write(w, b"r")
        n, victim_pid = map(int, os.read(go_r, 64).decode().split())
        arm(n)
        dom.recover(victim_pid)
        os.write(w, b"d")

    def victim():
        dom.sem_decrement("s")
        dom.mutex_lock("m")
        threading.Thread(target=lambda: dom.sem_decrement("q", wait=True), daemon=True).start()
        until(lambda: sem(dom, "q")["waiters"] == 1, what="queued")
        await_in_thread(dom, "sem", "q", 3)
        until(lambda: sem(dom, "q")["waiters"] == 4, what="async records queued")
        arm(victim_crash)
        if victim_op == "increment":
            dom.sem_increment("t")
        elif victim_op == "destroy":
            dom.sem_destroy(CLUSTER[0])     # the name guard, closing the hole
        else:
            dom.sem_create("x", 7)          # holds the name guard and x's guard
        raise AssertionError("not reached")

    rpid = child(recoverer)
    os.read(r, 1)
    v_pid = child(victim)
    os.close(w)                             # the children's ends: not leaked here
    os.close(go_r)
    assert killed(reap(v_pid))
    return v_pid, rpid, go_w, r


def check_exact(dom, victim_op):
    x = sem(dom, "x")                       # created entirely or not at all
    assert x is None or (x["value"] == 7 and x["waiters"] == 0), x
    if x is not None:
        dom.sem_destroy("x")
    if victim_op == "destroy":
        check_cluster(dom)
    assert dom.sem_get("s") == 3
    assert dom.sem_get("t") == 5
    q = sem(dom, "q")
    assert q["value"] == 0 and q["waiters"] == 0, q
    info = mtx(dom, "m")
    assert info["locked"] is False and info["waiters"] == 0
    for name in ("s", "t"):
        assert sem(dom, name)["holders"] == {}, sem(dom, name)
    assert pids(dom) == [os.getpid()]
    dom.check()


# Names of one probe cluster of the name table (see test_native_crash_steps.cluster):
# destroying the first closes its hole by backward shifts under the name guard.
CLUSTER = []


def make_cluster(dom):
    from test_native_crash_steps import colliding_names
    if getattr(dom, "_cluster_of", None) is not dom:   # the hash's key is the segment's
        from test_native_crash_steps import name_home
        cap = dom.name_stats()["capacity"]
        taken = [name_home(dom, n) for n in ("s", "t", "q", "m")]
        # a stretch that the fixture's names leave empty, if there is one
        h = min(range(cap), key=lambda h: sum((t - h) % cap <= 6 or (h - t) % cap <= 1 for t in taken))
        CLUSTER[:] = colliding_names(dom, [h, h, (h + 1) % cap, (h + 2) % cap, (h + 4) % cap])
        dom._cluster_of = dom
    for i, n in enumerate(CLUSTER):
        assert dom.sem_create(n, 10 + i)


def check_cluster(dom):
    """The head is gone or intact, the others are found by name with their values;
    the next lookup closes any hole left; then the cluster is built again."""
    head = sem(dom, CLUSTER[0])
    assert head is None or head["value"] == 10, head
    assert dom.name_stats()["tombstones"] <= 1
    for i, n in enumerate(CLUSTER[1:], 1):
        dom._sems.pop(n, None)
        assert dom.sem_get(n) == 10 + i, n
    assert dom.name_stats()["tombstones"] == 0
    for n in CLUSTER:
        dom.sem_destroy(n)
    make_cluster(dom)


@pytest.fixture
def rdom():
    d = _native.Domain.create(semaphores=8, mutexes=8, processes=16)
    d.sem_create("s", 3, protected=True)
    d.sem_create("t", 5, protected=True)
    d.sem_create("q", 0, protected=True)
    d.mutex_unlock("m", force=True)      # implicit creation
    yield d
    d.unlink()
    d.close()


def enumerate_recoverer_crashes(dom, victim_crash, chain_points=(), victim_op="increment"):
    """For one state of the victim's transaction, the recoverer killed at each of
    its crash points in turn; returns how many there were."""
    for n in range(1, MAX_STEPS):
        v_pid, rpid, go_w, r = scene(dom, victim_crash, victim_op)
        os.write(go_w, f"{n} {v_pid}".encode())
        status = reap(rpid)
        finished = not killed(status)
        if finished:
            assert os.read(r, 1) == b"d"
        others = []
        for c in (chain_points if not finished else ()):
            # R2 steals what R left and is killed at its c-th crash point
            r2 = child(lambda: (arm(c), dom.recover(v_pid)))
            st2 = reap(r2)
            assert killed(st2) or os.WIFEXITED(st2)
            others.append(r2)
        order = [v_pid, rpid, *others] if n % 2 else [*others, rpid, v_pid]
        for pid in order:
            assert dom.recover(pid, timeout=10) >= 0, (n, pid)
        try:
            check_exact(dom, victim_op)
        except AssertionError as e:
            raise AssertionError(f"recoverer killed at crash point {n} (victim {victim_op} at "
                                 f"{victim_crash}, chain {chain_points}): {e}") from None
        os.close(go_w)
        os.close(r)
        if finished:
            return n - 1
    raise AssertionError("recovery still crashing after %d steps" % MAX_STEPS)


# The victim dies inside increment(t): 1 holding t's guard only, 2 with its redo
# log written but not valid, 3 valid and nothing applied, 4 valid and the first
# write applied (the recoverer must redo the rest, and may die doing it).
VICTIM_STATES = (1, 2, 3, 4)


@pytest.mark.timeout(170)
@pytest.mark.parametrize("victim_crash", VICTIM_STATES)
def test_recovery_killed_at_every_crash_point_is_finished_exactly(rdom, victim_crash):
    steps = enumerate_recoverer_crashes(rdom, victim_crash)
    STEPS[f"recover (victim at {victim_crash})"] = steps
    assert steps >= 20


@pytest.mark.timeout(170)
@pytest.mark.parametrize("victim_crash", (2, 5, 7))
def test_recovery_of_a_victim_dead_inside_create_holding_two_guards_is_exact(rdom, victim_crash):
    """The victim dies inside sem_create (the name table's guard and the object's
    guard held: 2 before its log, 5 log valid, 7 two writes applied)."""
    steps = enumerate_recoverer_crashes(rdom, victim_crash, victim_op="create")
    STEPS[f"recover (victim in create at {victim_crash})"] = steps
    assert steps >= 20


@pytest.mark.timeout(170)
@pytest.mark.parametrize("victim_crash", (19, 20, 23))
def test_recovery_of_a_victim_dead_closing_a_hole_in_the_name_table_is_exact(rdom, victim_crash):
    """The victim dies inside destroy, in the backward shifts that close the hole
    its name left, holding the name table's guard: 20 is the first shift half
    applied (the moved name in two entries, no tombstone), 19 and 23 just before
    and after it.  The recoverer is killed at every step of taking the guard
    over; the names are exact afterwards."""
    make_cluster(rdom)
    steps = enumerate_recoverer_crashes(rdom, victim_crash, victim_op="destroy")
    STEPS[f"recover (victim closing a hole at {victim_crash})"] = steps
    assert steps >= 20


@pytest.mark.timeout(170)
@pytest.mark.parametrize("victim_crash", VICTIM_STATES)
def test_a_chain_of_dead_recoverers_is_finished_exactly(rdom, victim_crash):
    steps = enumerate_recoverer_crashes(rdom, victim_crash, chain_points=(1, 3, 5, 9))
    assert steps >= 20


@pytest.mark.timeout(120)
def test_reclaiming_a_full_table_killed_at_every_crash_point_is_finished_exactly():
    """A process that reclaims a full table of dead processes (from the reserve) is
    killed at every crash point; the next one still registers, and all is exact."""
    dom = _native.Domain.create(semaphores=4, mutexes=4, processes=4)
    try:
        dom.sem_create("s", 10, protected=True)
        for n in range(1, MAX_STEPS):
            dead = []
            while len(dom.processes()) < 4:
                r, w = os.pipe()
                pid = child(lambda: (dom.sem_decrement("s"), dom.mutex_lock("m%d" % len(dead)),
                                     hold_until_killed(w)))
                os.read(r, 1)
                kill_and_reap(pid)
                dead.append(pid)
                os.close(r)
                os.close(w)
            x = child(lambda: (arm(n), dom.sem_decrement("s")))
            st = reap(x)
            finished = not killed(st)
            y = child(lambda: dom.sem_get("s") >= 0 and dom.mutex_trylock("m0") and
                      dom.mutex_unlock("m0"))
            st_y = reap(y)
            assert os.WIFEXITED(st_y) and os.WEXITSTATUS(st_y) == 0, n
            for pid in [x, y, *dead]:
                assert dom.recover(pid, timeout=10) >= 0
            assert dom.sem_get("s") == 10, n
            assert [m["locked"] for m in dom.mutexes()] == [False] * len(dom.mutexes())
            assert pids(dom) == [os.getpid()]
            dom.check()
            if finished:
                STEPS["reclaim"] = n - 1
                assert n - 1 >= 10
                return
        raise AssertionError("reclaim still crashing")
    finally:
        dom.unlink()
        dom.close()


def test_zz_report_recovery_crash_steps():
    """Prints the number of crash points enumerated (run with -s)."""
    print("\nrecovery crash points:", STEPS)
