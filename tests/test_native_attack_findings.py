"""Regression tests for what an independent attack on the native core found after
the rewrite of recovery (each failed before its fix): a slot freed and taken again
by the same pid was claimed on the strength of an old judgement; a process in
another pid namespace was judged by a pid that means something else there; a
thread that gave up a wait behind a stopped process leaked its entry and could
not use other objects; non-blocking calls and timed lookups waited on a stopped
process; close() gave nothing back when the table of threads was full."""

import ctypes
import os
import signal
import threading
import time

import pytest

from netplex_native.native import domain as _native

from native_helpers import (arm, child, exited_ok, hold_until_killed, kill_and_reap, mtx, pids,
                            reap, sem, until, wait_stopped)


def _fork_with_pid(want: int, fn) -> int:
    """Fork fn in a child whose pid is `want` (root: /proc/sys/kernel/ns_last_pid)."""
    for _ in range(300):                    # other processes may take it first: retry
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(want - 1))
        pid = child(fn)
        if pid == want:
            return pid
        kill_and_reap(pid)
    raise AssertionError(f"could not get pid {want} back")


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="recycling a chosen pid needs root (ns_last_pid)")
def test_a_slot_taken_again_by_the_same_pid_is_not_claimed_on_an_old_judgement(dom):
    """R judges P dead and is stopped before its claim; P's slot is recovered and taken
    by a new process that has P's pid and holds a mutex; R resumes: it must not claim."""
    r, w = os.pipe()
    p = child(lambda: (dom.register(), hold_until_killed(w)))
    os.read(r, 1)
    kill_and_reap(p)

    def recoverer():
        dom.register()
        arm(1, signal.SIGSTOP)              # the first crash point: judged dead, not claimed
        dom.recover(p)
    rpid = child(recoverer)
    wait_stopped(rpid)
    assert dom.recover(p) == 1
    again = _fork_with_pid(p, lambda: (dom.mutex_lock("m"), hold_until_killed(w)))
    os.read(r, 1)
    try:
        os.kill(rpid, signal.SIGCONT)
        assert exited_ok(reap(rpid))
        assert p in pids(dom), "the live process's slot was recovered under it"
        assert mtx(dom, "m")["owner_pid"] == again
        assert dom.mutex_trylock("m") is False
    finally:
        kill_and_reap(again)
    dom.recover(rpid)
    assert dom.recover(again) == 1
    dom.check()


def _pid_namespace(init):
    """Fork a child that unshares a new pid namespace and runs init() in its
    pid 1.  Returns (that child's pid, a function that kills the namespace:
    pid 1 first, then the child)."""
    r, w = os.pipe()

    def outer():
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.unshare(0x20000000) == 0, ctypes.get_errno()     # CLONE_NEWPID
        pid = os.fork()                                              # pid 1 there
        if pid == 0:
            try:
                init()
            finally:
                os._exit(0)
        os.write(w, b"%d\n" % pid)        # its pid here
        os.waitpid(pid, 0)
    pid = child(outer)
    os.close(w)

    def end():
        # killing pid 1 kills everything in its namespace (a process left
        # stopped there would outlive the test, holding our pipes); it cannot
        # have been reaped yet: its parent, the child, waits for it
        first = os.read(r, 32)
        os.close(r)
        if first:
            os.kill(int(first), signal.SIGKILL)
        kill_and_reap(pid)
    return pid, end


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="a new pid namespace needs root")
def test_a_holder_in_another_pid_namespace_is_never_taken_for_dead(dom):
    """Its pid (1 there) means another process here: we cannot tell, so it keeps
    its mutex for as long as we wait."""
    r, w = os.pipe()

    def init():                             # pid 1 of the new namespace
        dom.mutex_lock("m")
        os.write(w, b"r")
        time.sleep(30)
    outer, end = _pid_namespace(init)
    try:
        os.read(r, 1)
        assert mtx(dom, "m")["owner_pid"] == 1
        assert dom.mutex_lock("m", timeout=0.5) is False      # several liveness checks
        assert mtx(dom, "m")["locked"]
    finally:
        end()


def _stop_inside_guard_of(dom, name):
    """A child stopped (SIGSTOP) inside increment(name), holding name's guard."""
    def body():
        dom.register()
        dom.sem_get(name)
        arm(1, signal.SIGSTOP)
        dom.sem_increment(name)
    pid = child(body)
    wait_stopped(pid)
    return pid


@pytest.mark.timeout(60)
def test_threads_that_gave_up_behind_a_stopped_process_leave_no_entry_behind():
    """Ten threads queue on s; then a process stops inside s's guard; their waits time
    out (they cannot leave the queue) and the threads end: no entry is left behind."""
    dom = _native.Domain.create(semaphores=8, mutexes=8, processes=8, actors=16)
    try:
        dom.sem_create("s", 0)
        out = []
        ts = [threading.Thread(target=lambda: out.append(dom.sem_decrement("s", True, 1.0)))
              for _ in range(10)]
        for t in ts:
            t.start()
        until(lambda: sem(dom, "s")["waiters"] == 10, what="10 queued")
        stopped = _stop_inside_guard_of(dom, "s")
        for t in ts:
            t.join(10)
        assert out == [-1] * 10
        os.kill(stopped, signal.SIGCONT)
        assert exited_ok(reap(stopped))
        dom.recover(stopped)

        def mine():
            return [p["threads"] for p in dom.processes() if p["pid"] == os.getpid()]
        # a thread's entry is freed by its pthread destructor, which may run just
        # after join() returned: bounded wait, then exact
        until(lambda: mine() == [1], timeout=5, what=f"entries freed (now {mine()})")
        got = []
        ts = [threading.Thread(target=lambda: got.append(dom.sem_increment("t"))) for _ in range(15)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        assert sorted(got) == list(range(1, 16))   # 15 threads found an entry each
        assert sem(dom, "s")["waiters"] == 0
        dom.check()
    finally:
        dom.unlink()
        dom.close()


@pytest.mark.timeout(60)
def test_a_thread_that_gave_up_a_wait_uses_other_objects_at_once(dom):
    """Queued on x, then a process stops inside x's guard: the wait times out and
    the same thread uses other objects at once."""
    dom.sem_create("x", 0)
    dom.sem_create("y", 1)
    result = []
    stopped = []

    def stop_later():
        until(lambda: sem(dom, "x")["waiters"] == 1, what="queued")
        stopped.append(_stop_inside_guard_of(dom, "x"))
    t = threading.Thread(target=stop_later)
    t.start()
    try:
        assert dom.sem_decrement("x", wait=True, timeout=1.0) == -1
        t.join(10)
        t0 = time.monotonic()
        assert dom.sem_decrement("y") == 0
        assert dom.mutex_trylock("m") is True
        dom.mutex_unlock("m")
        assert dom.mutex_lock("m", timeout=0.5) is True
        dom.mutex_unlock("m")
        assert time.monotonic() - t0 < 1
    finally:
        t.join(10)
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
            assert exited_ok(reap(pid))
            dom.recover(pid)
    dom.sem_increment("y")
    assert sem(dom, "x")["waiters"] == 0
    assert [p["threads"] for p in dom.processes() if p["pid"] == os.getpid()] == [1]
    dom.check()


@pytest.mark.timeout(60)
def test_non_blocking_calls_and_timed_lookups_do_not_wait_for_a_stopped_process(dom):
    """Stopped inside the guard of s: decrement(s) and trylock answer 'not now' at
    once; stopped inside the name table's guard: lookups of new names honour the
    call's timeout, and non-blocking ones answer at once."""
    dom.sem_create("s", 1)
    assert dom.mutex_trylock("m")                   # looks "m" up before the stop
    dom.mutex_unlock("m")
    stopped = _stop_inside_guard_of(dom, "s")
    try:
        t0 = time.monotonic()
        assert dom.sem_decrement("s") == -1
        assert time.monotonic() - t0 < 0.5
    finally:
        os.kill(stopped, signal.SIGCONT)
        assert exited_ok(reap(stopped))
    dom.recover(stopped)

    def stop_in_name_guard():
        dom.register()
        arm(1, signal.SIGSTOP)
        dom.sem_create("new-name", 1)       # first crash point: name guard held
    stopped = child(stop_in_name_guard)
    wait_stopped(stopped)
    try:
        for call, expect in [(lambda: dom.sem_decrement("fresh1", wait=True, timeout=0.3), -1),
                             (lambda: dom.mutex_lock("fresh2", timeout=0.3), False),
                             (lambda: dom.mutex_trylock("fresh3"), False),
                             (lambda: dom.sem_decrement("fresh4"), -1)]:
            t0 = time.monotonic()
            assert call() == expect
            assert time.monotonic() - t0 < 1.3
        assert dom.sem_decrement("s") >= 0          # cached names are not affected
        dom.sem_increment("s")
    finally:
        os.kill(stopped, signal.SIGCONT)
        assert exited_ok(reap(stopped))
    dom.recover(stopped)
    dom.check()


@pytest.mark.timeout(60)
def test_close_gives_back_what_the_process_held_even_when_its_thread_has_no_entry():
    """actors=2, both taken by live threads of the child; its main thread (no entry)
    closes: the mutex and the protected count come back, the slot is freed."""
    dom = _native.Domain.create(semaphores=4, mutexes=4, processes=4, actors=2)
    try:
        dom.sem_create("s", 1, protected=True)
        r, w = os.pipe()
        go_r, go_w = os.pipe()
        end_r, end_w = os.pipe()

        def body():
            e = _native.Domain.attach(dom.name)
            done = threading.Event()

            def holder():                   # keeps its entry until the parent has looked
                e.mutex_lock("m")
                e.sem_decrement("s")
                done.set()
                os.read(end_r, 1)
            t = threading.Thread(target=holder)
            t.start()
            done.wait(5)
            os.write(w, b"r")
            os.read(go_r, 1)
            e.close()                       # the main thread has no entry: table full
            os.write(w, b"c")
            t.join(5)
        pid = child(body)
        os.read(r, 1)
        assert sum(p["threads"] for p in dom.processes()) == 2
        os.write(go_w, b"g")
        assert os.read(r, 1) == b"c"
        assert mtx(dom, "m")["locked"] is False and dom.sem_get("s") == 1
        assert pid not in pids(dom)
        os.write(end_w, b"e")
        assert exited_ok(reap(pid))
        assert pids(dom) == [os.getpid()]
        dom.check()
    finally:
        dom.unlink()
        dom.close()


# ---- a second attack, on the fixes above ----

def _start_orphan(dom, name):
    """A thread of a child process gives up its wait on `name` behind a process stopped
    inside name's guard, and cannot leave the queue: its entry becomes an orphan.
    Returns at once, the thread still waiting out its 1 s: (child pid, the stopped
    process's pid, fd to let the child end, fd that says 'o' once it gave up)."""
    r, w = os.pipe()
    end_r, end_w = os.pipe()

    def body():
        dom.register()

        def waiter():
            dom.sem_decrement(name, wait=True, timeout=1.0)
            dom.thread_detach()             # its entry cannot be freed: orphan
        t = threading.Thread(target=waiter)
        t.start()
        until(lambda: sem(dom, name)["waiters"] == 1, what="queued")
        os.write(w, b"q")
        t.join(10)
        os.write(w, b"o")
        os.read(end_r, 1)
    pid = child(body)
    os.close(w)
    os.close(end_r)
    assert os.read(r, 1) == b"q"
    stopped = _stop_inside_guard_of(dom, name)
    return pid, stopped, end_w, r


def _orphan_on(dom, name):
    """_start_orphan, and wait until the thread gave up: (child pid, the stopped
    process's pid, fd to let the child end)."""
    pid, stopped, end_w, r = _start_orphan(dom, name)
    assert os.read(r, 1) == b"o"
    os.close(r)
    return pid, stopped, end_w


def _threads_of(dom, pid):
    return [p["threads"] for p in dom.processes() if p["pid"] == pid]


@pytest.mark.timeout(120)
def test_an_orphan_is_freed_even_when_its_purger_dies_at_any_point():
    """The process that removes an orphan from its queue is killed at each of its
    crash points in turn; the orphan's entry is freed all the same (by recover).
    Each crash point has a domain and an orphan of its own; the orphans of eight
    points are made side by side, so that their threads wait out their 1 s
    together, and the points are then taken in order."""
    for first in range(1, 40, 8):
        scenes = []                         # (n, dom, child, stopped, end_w, r)
        live = set()                        # children not reaped yet
        try:
            for n in range(first, min(first + 8, 40)):
                dom = _native.Domain.create(semaphores=4, mutexes=4, processes=8, actors=16)
                scenes.append((n, dom, None, None, None, None))
                dom.sem_create("x", 0)
                p, stopped, end_w, r = _start_orphan(dom, "x")
                live |= {p, stopped}
                scenes[-1] = (n, dom, p, stopped, end_w, r)
            for n, dom, p, stopped, end_w, r in scenes:
                assert os.read(r, 1) == b"o", n
                kill_and_reap(stopped)      # its guard is taken over by the purger
                live.discard(stopped)
                purger = child(lambda: (dom.register(), arm(n), dom.sem_decrement("x")))
                st = reap(purger)
                dom.recover(purger)
                dom.recover(stopped)
                assert dom.recover(p, timeout=5) == 0          # p is alive: only purged
                until(lambda: _threads_of(dom, p) == [1], timeout=5,
                      what=f"the orphan freed (purger killed at {n}): {_threads_of(dom, p)}")
                assert sem(dom, "x")["waiters"] == 0
                os.write(end_w, b"e")
                assert exited_ok(reap(p))
                live.discard(p)
                dom.recover(p)
                dom.check()
                if exited_ok(st):
                    return
        finally:
            for pid in live:
                kill_and_reap(pid)
            for n, dom, p, stopped, end_w, r in scenes:
                for fd in (end_w, r):
                    if fd is not None:
                        os.close(fd)
                dom.unlink()
                dom.close()
    raise AssertionError("the purger still crashing after 40 points")


@pytest.mark.timeout(60)
def test_an_orphan_on_a_destroyed_object_is_freed():
    dom = _native.Domain.create(semaphores=4, mutexes=4, processes=8, actors=16)
    try:
        dom.sem_create("x", 0)
        p, stopped, end_w = _orphan_on(dom, "x")
        kill_and_reap(stopped)
        dom.sem_destroy("x")                # the queue goes, the orphan stays pointed at it
        dom.recover(stopped)
        dom.sem_create("x", 3)
        assert dom.recover(p, timeout=5) == 0
        until(lambda: _threads_of(dom, p) == [1], timeout=5, what="the orphan freed")
        os.write(end_w, b"e")
        assert exited_ok(reap(p))
        dom.recover(p)
        dom.check()
    finally:
        dom.unlink()
        dom.close()


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="a new pid namespace needs root")
def test_a_registrant_from_another_pid_namespace_is_never_taken_for_dead(dom):
    """Stopped right after its slot became REGISTERING, in a namespace where its pid
    means nothing here: recover(that pid) must not free the slot under it."""
    r, w = os.pipe()

    def init():                             # pid 1 there: signals to itself are ignored
        for _ in range(20):                 # use up small pids
            if os.fork() == 0:
                os._exit(0)
            os.wait()
        if os.fork() != 0:
            os.wait()
            os._exit(0)
        os.write(w, str(os.getpid()).encode())
        os.environ["NETPLEX_CORE_TEST"] = "1"
        arm(1, signal.SIGSTOP)              # the first crash point: slot REGISTERING
        dom.register()
        dom.mutex_lock("m")
        time.sleep(30)
    outer, end = _pid_namespace(init)
    try:
        ns_pid = int(os.read(r, 16).decode())
        until(lambda: [p["state"] for p in dom.processes() if p["pid"] == ns_pid]
              == ["registering"], what="registering")
        assert dom.recover(ns_pid, timeout=0.5) <= 0
        assert [p["state"] for p in dom.processes() if p["pid"] == ns_pid] == ["registering"]
    finally:
        end()                               # the registrant, stopped, dies with pid 1


@pytest.mark.timeout(60)
def test_a_signal_handler_during_a_wait_takes_what_is_free_and_is_refused_only_a_wait(dom):
    """Found by the attack on issue 15's changes: a SIGALRM handler that ran
    between the slices of a main-thread wait could take nothing (a plain
    RuntimeError, even for a free unit).  A thread has one wait at a time
    (A9 of csrc/acquire.c): the handler takes free units and a free mutex,
    blocking or not, gives them back, and a call that would have to wait
    raises NestedWaitError (a NetplexError), nothing taken; counts exact."""
    from netplex_native.errors import NestedWaitError, NetplexError
    dom.sem_create("outer", 0)
    dom.sem_create("free", 2)
    dom.sem_create("empty", 0)
    seen = []

    def handler(sig, frame):
        seen.append(dom.sem_decrement("free"))                     # non-blocking
        seen.append(dom.sem_decrement("free", wait=True, timeout=1))
        seen.append(dom.mutex_lock("m", timeout=1))
        dom.mutex_unlock("m")
        dom.sem_increment("free")
        dom.sem_increment("free")
        try:
            dom.sem_decrement("empty", wait=True, timeout=1)
        except NestedWaitError as e:
            seen.append(isinstance(e, NetplexError))
    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        got = dom.sem_decrement("outer", wait=True, timeout=1.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert got == -1                                # the outer wait timed out, undisturbed
    assert seen == [1, 0, True, True], seen
    assert [sem(dom, n)["value"] for n in ("outer", "free", "empty")] == [0, 2, 0]
    assert all(sem(dom, n)["waiters"] == 0 for n in ("outer", "free", "empty"))
    assert mtx(dom, "m")["locked"] is False, mtx(dom, "m")
