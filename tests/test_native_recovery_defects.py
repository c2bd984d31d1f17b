"""One regression test per defect of the native core's recovery and exhaustion
handling (the core issue's list): each failed on the core before the rewrite of
recovery (a hang caught by a bounded recover, a wrong value, a crash, a leak)."""

import math
import os
import resource
import signal
import threading
import time

import pytest

from netplex_native.native import domain as _native
from netplex_native.errors import SegmentError

from native_helpers import (arm, child, exited_ok, hold_until_killed, kill_and_reap, killed,
                            mtx, pids, reap, sem, until, wait_stopped)


def _die_holding_guard(dom, name, crash_at=2):
    """A child dies inside sem_increment(name) at crash point crash_at (after
    taking the guard; 2 = its intent is written but not valid yet)."""
    def body():
        dom.register()
        dom.sem_get(name)
        arm(crash_at)
        dom.sem_increment(name)
    pid = child(body)
    assert killed(reap(pid))
    return pid


@pytest.mark.timeout(30)
def test_1_recoverer_dying_after_its_claim_with_a_stake_in_the_guarded_object_does_not_wedge(dom):
    """D dies holding m's guard; R (with a protected count of m) claims D's slot and
    dies at once; recovering both finishes, within a bounded recover."""
    dom.sem_create("m", 5, protected=True)
    r, w = os.pipe()

    def recoverer_body():
        dom.sem_decrement("m")              # R's stake in m: delta -1
        os.write(w, b"r")
        os.read(r2, 1)
        arm(2)                              # 1: judged dead; 2: right after the claim
        dom.recover(d_pid)

    r2, w2 = os.pipe()
    d_pid = _die_holding_guard(dom, "m")
    rpid = child(recoverer_body)
    os.read(r, 1)
    os.write(w2, b"g")
    assert killed(reap(rpid))
    assert [p["state"] for p in dom.processes() if p["pid"] == d_pid] == ["recovering"]
    assert dom.recover(d_pid, timeout=5) >= 0
    assert dom.recover(rpid, timeout=5) >= 0
    assert dom.sem_get("m") == 5
    assert dom.sem_increment("m") == 6 and dom.sem_decrement("m") == 5
    assert pids(dom) == [os.getpid()]
    dom.check()


@pytest.mark.timeout(30)
def test_2_a_new_process_on_a_dead_recoverers_actor_does_not_keep_the_recovery_claimed(dom):
    """R dies mid-recovery of D; R is recovered, a new live process takes R's actor:
    D's recovery is still stealable (the claim names R's incarnation)."""
    r, w = os.pipe()
    d_pid = child(lambda: (dom.mutex_lock("m"), hold_until_killed(w)))
    os.read(r, 1)
    kill_and_reap(d_pid)

    def recoverer_body():
        dom.mutex_lock("r")
        arm(2)                              # right after its claim of D's slot
        dom.recover(d_pid)
    rpid = child(recoverer_body)
    assert killed(reap(rpid))
    # a waiter behind R recovers R's slot only (R's actor is freed)...
    assert dom.mutex_lock("r", timeout=5) is True
    dom.mutex_unlock("r")
    assert rpid not in pids(dom)
    # ...so D is still claimed by R's ended incarnation
    assert [p["state"] for p in dom.processes() if p["pid"] == d_pid] == ["recovering"]
    newcomer = child(lambda: (dom.register(), hold_until_killed(w)))
    os.read(r, 1)
    try:
        assert dom.recover(d_pid, timeout=5) == 1
        assert mtx(dom, "m")["locked"] is False
        assert dom.mutex_lock("m", timeout=1) is True
        dom.mutex_unlock("m")
    finally:
        kill_and_reap(newcomer)
    dom.recover(newcomer)
    dom.check()


@pytest.mark.timeout(30)
def _at_fd_limit(dom) -> list[int]:
    """In a waiter child: registered, the name "other" cached, then every free
    descriptor taken (EMFILE from here on); returns them."""
    dom.register()
    dom.mutex_trylock("other")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
    fds = []
    try:
        while True:
            fds.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        return fds


def test_3a_a_waiter_at_its_fd_limit_never_takes_a_live_holder_for_dead(dom):
    """The waiter cannot open /proc (EMFILE): the live holder keeps its mutex."""
    r, w = os.pipe()
    holder = child(lambda: (dom.mutex_lock("m"), hold_until_killed(w)))
    os.read(r, 1)

    def waiter():
        fds = _at_fd_limit(dom)
        got = dom.mutex_lock("m", timeout=0.5)     # several slices: liveness checked
        for fd in fds:
            os.close(fd)
        os._exit(3 if got else 0)
    try:
        wpid = child(waiter)
        st = reap(wpid)
        assert exited_ok(st), "the waiter took the live holder's mutex (EMFILE = dead?)"
        dom.recover(wpid)
        info = mtx(dom, "m")
        assert info["locked"] and info["owner_pid"] == holder
    finally:
        kill_and_reap(holder)
    assert dom.recover(holder) == 1
    dom.check()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("threads", [0, 100])
def test_3c_a_waiter_at_its_fd_limit_takes_a_zombie_holders_mutex(dom, threads):
    """Found by an attack: a waiter that cannot open /proc waited as long as a
    SIGKILLed holder stayed unreaped.  L2 of csrc/liveness.c judges it dead
    without a descriptor (one thread left, no memory)."""
    r, w = os.pipe()

    def body():
        for _ in range(threads):
            threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()
        dom.mutex_lock("m")
        hold_until_killed(w)
    holder = child(body)
    os.read(r, 1)
    os.kill(holder, signal.SIGKILL)           # not reaped: a zombie until the end
    until(lambda: _state(holder) == "Z" and _threads(holder) == 1, what="a zombie")

    def waiter():
        fds = _at_fd_limit(dom)
        got = dom.mutex_lock("m", timeout=5)
        if got:
            dom.mutex_unlock("m")
        for fd in fds:
            os.close(fd)
        os._exit(0 if got else 3)
    try:
        wpid = child(waiter)
        assert exited_ok(reap(wpid)), "the waiter at its fd limit never got the zombie's mutex"
        dom.recover(wpid)
    finally:
        reap(holder)
    dom.recover(holder)
    dom.check()


def _state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _threads(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[17])


@pytest.mark.timeout(30)
def test_3b_a_zombie_thread_group_leader_with_a_live_thread_is_alive(dom):
    """The holder's main thread calls pthread_exit (state Z) while another thread holds
    the mutex: nobody may take it until that thread unlocks."""
    import ctypes
    r, w = os.pipe()
    r2, w2 = os.pipe()

    def holder():
        def worker():
            dom.mutex_lock("m")
            os.write(w, b"r")
            os.read(r2, 1)                   # until the parent has tried
            dom.mutex_unlock("m")
            os._exit(0)
        threading.Thread(target=worker).start()
        os.read(r, 0)
        ctypes.CDLL(None).pthread_exit(None)
    hpid = child(holder)
    os.read(r, 1)
    until(lambda: open(f"/proc/{hpid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z",
          what="zombie leader")
    assert dom.mutex_lock("m", timeout=0.5) is False        # several liveness checks
    assert dom.recover(hpid) == 0                            # alive: nothing to recover
    assert mtx(dom, "m")["owner_pid"] == hpid
    os.write(w2, b"g")
    assert exited_ok(reap(hpid))
    dom.recover(hpid)
    assert dom.mutex_lock("m", timeout=5) is True
    dom.mutex_unlock("m")
    dom.check()


@pytest.mark.timeout(60)
def test_4_a_process_table_full_of_dead_processes_is_reclaimed(dom):
    """Every slot taken by a killed, never recovered process: a new process still
    registers (the table is reclaimed), and the supervisor's recover works."""
    cap = dom.config["processes"]
    dom.sem_create("s", 4, protected=True)
    dead = []

    def fill():                              # the creator holds one slot
        for _ in range(cap - len(dom.processes())):
            r, w = os.pipe()
            pid = child(lambda: (dom.sem_decrement("s"), hold_until_killed(w)))
            os.read(r, 1)
            kill_and_reap(pid)
            dead.append(pid)
            os.close(r)
            os.close(w)
        assert len(dom.processes()) == cap and dom.sem_get("s") == 0
    fill()
    r, w = os.pipe()
    pid = child(lambda: (dom.sem_decrement("s"), hold_until_killed(w)))    # reclaims
    os.read(r, 1)
    assert dom.sem_get("s") == 3              # every dead take given back, one new
    kill_and_reap(pid)
    assert dom.recover(pid) == 1
    assert pids(dom) == [os.getpid()]
    dead.clear()
    fill()
    assert dom.recover(dead[0]) == 1          # the supervisor needs no free entry
    for pid in dead:
        dom.recover(pid)
    assert dom.sem_get("s") == 4 and pids(dom) == [os.getpid()]
    dom.check()


@pytest.mark.timeout(30)
def test_4b_an_actor_table_full_of_dead_threads_is_reclaimed():
    """Threads of killed processes fill the actor table: a new process still gets one."""
    dom = _native.Domain.create(semaphores=4, mutexes=4, processes=8, actors=6)
    try:
        r, w = os.pipe()

        def many_threads():
            ts = [threading.Thread(target=lambda: (dom.sem_increment("x"), time.sleep(30)),
                                   daemon=True)
                  for i in range(5)]
            for t in ts:
                t.start()
            until(lambda: sum(p["threads"] for p in dom.processes()
                              if p["pid"] == os.getpid()) >= 5, what="threads registered")
            hold_until_killed(w)
        dom.sem_create("x", 1)
        pid = child(many_threads)
        os.read(r, 1)
        kill_and_reap(pid)                   # 5 actors of the dead, 1 of ours: full
        assert sum(p["threads"] for p in dom.processes()) == 6
        other = child(lambda: (dom.sem_increment("x"), threading.Thread(
            target=lambda: dom.sem_increment("x")).start()))
        assert exited_ok(reap(other))
        dom.recover(other)
        assert dom.sem_get("x") == 1 + 5 + 2    # unprotected: increments stay
        dom.check()
    finally:
        dom.unlink()
        dom.close()


@pytest.mark.timeout(30)
def test_5_attach_and_close_give_everything_back(dom):
    """attach/close 100 times in one process: no slot or actor left behind; what
    the process held through the closed Domain is given back."""
    def body():
        for i in range(100):
            d2 = _native.Domain.attach(dom.name)
            assert d2.mutex_trylock("m") is True
            d2.sem_decrement("s")
            d2.close()
        assert len(dom.processes()) == 1     # the parent only
    dom.sem_create("s", 1, protected=True)
    pid = child(body)
    assert exited_ok(reap(pid))
    assert pids(dom) == [os.getpid()]
    assert mtx(dom, "m")["locked"] is False and dom.sem_get("s") == 1
    dom.check()


@pytest.mark.timeout(30)
def test_6_a_process_stopped_inside_a_guard_does_not_block_the_supervisors_recover(dom):
    """A (stopped inside m's guard) delays nothing but m; recover(B) of another dead
    process with a stake in m returns within its timeout, and finishes after SIGCONT."""
    dom.sem_create("m", 3, protected=True)
    r, w = os.pipe()
    b = child(lambda: (dom.sem_decrement("m"), hold_until_killed(w)))
    os.read(r, 1)

    def stopper():
        dom.register()
        dom.sem_get("m")
        arm(1, signal.SIGSTOP)
        dom.sem_increment("m")               # stops holding m's guard
        dom.sem_decrement("m")
    a = child(stopper)
    wait_stopped(a)
    kill_and_reap(b)
    t0 = time.monotonic()
    assert dom.recover(b, timeout=0.2) == -1
    assert time.monotonic() - t0 < 2
    assert dom.sem_get("x") == 0             # other objects are not blocked
    os.kill(a, signal.SIGCONT)
    assert exited_ok(reap(a))
    dom.recover(a)
    assert dom.recover(b, timeout=5) >= 0
    assert dom.sem_get("m") == 3
    dom.check()


@pytest.mark.timeout(30)
def test_7_reverting_a_take_near_the_maximum_saturates_instead_of_resetting(dom):
    vmax = 2**63 - 1
    dom.sem_create("s", vmax - 1, protected=True)
    r, w = os.pipe()
    pid = child(lambda: (dom.sem_decrement("s"), hold_until_killed(w)))   # delta -1
    os.read(r, 1)
    assert dom.sem_increment("s") == vmax - 1
    assert dom.sem_increment("s") == vmax
    kill_and_reap(pid)
    assert dom.recover(pid) == 1
    assert dom.sem_get("s") == vmax
    dom.check()


@pytest.mark.timeout(30)
def test_8_a_mutex_destroyed_during_the_first_wait_slice_answers_false(dom):
    """On both entry paths (the fixture runs accelerated and pure)."""
    r, w = os.pipe()
    holder = child(lambda: (dom.mutex_lock("m"), hold_until_killed(w)))
    os.read(r, 1)
    assert dom.mutex_trylock("m") is False  # the handle is cached: lock() takes the fast path
    result = []
    t = threading.Thread(target=lambda: result.append(dom.mutex_lock("m")))
    t.start()
    until(lambda: mtx(dom, "m")["waiters"] == 1, what="queued")
    dom.mutex_destroy("m")
    t.join(5)
    assert result == [False]
    assert mtx(dom, "m") is None             # not re-created behind our back
    kill_and_reap(holder)
    dom.recover(holder)
    dom.check()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("timeout", [math.inf, 1e300, 2**70, 9.3e9])
def test_9_huge_and_infinite_timeouts_wait(dom, timeout):
    dom.sem_create("s", 1)
    assert dom.sem_decrement("s", wait=True, timeout=timeout) == 0
    assert dom.mutex_lock("m", timeout=timeout) is True
    result = []
    t = threading.Thread(target=lambda: result.append(
        dom.sem_decrement("s", wait=True, timeout=timeout)))
    t.start()
    until(lambda: sem(dom, "s")["waiters"] == 1, what="queued")
    dom.sem_increment("s")
    t.join(5)
    assert result == [0]
    dom.mutex_unlock("m")


@pytest.mark.timeout(30)
def test_10_close_while_another_thread_waits_ends_the_wait_cleanly(dom):
    """In a child (a crash must not take pytest down): the waiting thread gets
    SegmentError, the process exits normally, nothing is left in the segment."""
    r, w = os.pipe()
    holder = child(lambda: (dom.mutex_lock("m"), hold_until_killed(w)))
    os.read(r, 1)

    def body():
        d2 = _native.Domain.attach(dom.name)
        out = []

        def wait():
            try:
                d2.mutex_lock("m")
                out.append("locked")
            except SegmentError:
                out.append("closed")
        ts = [threading.Thread(target=wait) for _ in range(3)]
        for t in ts:
            t.start()
        until(lambda: mtx(d2, "m")["waiters"] == 3, what="queued")
        d2.close()
        for t in ts:
            t.join(5)
        assert out == ["closed"] * 3, out
        with pytest.raises(SegmentError):
            d2.sem_get("s")
    pid = child(body)
    st = reap(pid)
    assert exited_ok(st), st
    assert mtx(dom, "m")["waiters"] == 0
    assert pids(dom) == sorted([os.getpid(), holder])
    kill_and_reap(holder)
    dom.recover(holder)
    dom.check()


@pytest.mark.timeout(30)
def test_11_the_thread_cache_evicts_the_least_recently_used_domain_and_frees_its_actor():
    doms = [_native.Domain.create(semaphores=2, mutexes=2, processes=4) for _ in range(9)]
    try:
        for _ in range(2):
            for d in doms:                   # 9 domains > 8 cache entries
                d.sem_increment("s")
        counts = []
        for d in doms:
            mine = [p for p in d.processes() if p["pid"] == os.getpid()]
            assert len(mine) == 1
            counts.append(mine[0]["threads"])
            d.check()
        # one actor per cached domain; the evicted one's was freed, none leaked
        assert sorted(counts) == [0] + [1] * 8, counts
        assert counts[-1] == 1               # the most recently used stays
    finally:
        for d in doms:
            d.unlink()
            d.close()
