"""Semantics of the native core (netplex_native.native.domain), with real processes."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from netplex_native.native import domain as _native
from netplex_native import errors





from harness import fork_call as fork


def join(pid, timeout=10.0):
    """waitpid with a bound; returns the exit status (SIGKILL on overrun)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        p, status = os.waitpid(pid, os.WNOHANG)
        if p:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish within {timeout} s")


def until(cond, timeout=5.0, what="condition"):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def waiters(dom, name, kind="sem"):
    objs = dom.semaphores() if kind == "sem" else dom.mutexes()
    return next((o["waiters"] for o in objs if o["name"] == name), 0)


# ---- semaphores -----------------------------------------------------------

def test_create_returns_true_then_false_and_keeps_the_first_initial(dom):
    assert dom.sem_create("s", 3) is True
    assert dom.sem_create("s", 7) is False
    assert dom.sem_get("s") == 3


def test_implicit_creation_is_protected_at_zero(dom):
    assert dom.sem_get("implicit") == 0
    (info,) = dom.semaphores()
    assert info["protected"] is True and info["value"] == 0


def test_decrement_on_zero_without_wait_returns_minus_one(dom):
    dom.sem_create("s", 1)
    assert dom.sem_decrement("s") == 0
    assert dom.sem_decrement("s") == -1
    assert dom.sem_get("s") == 0


def test_protected_increment_and_decrement_are_accounted_per_process(dom):
    dom.sem_create("p", 2, protected=True)
    dom.sem_decrement("p")
    dom.sem_decrement("p")
    dom.sem_increment("p")
    assert dom.sem_delta("p", os.getpid()) == -1
    assert dom.semaphores()[0]["holders"] == {os.getpid(): -1}


@pytest.mark.timeout(30)
def test_waiters_are_served_in_fifo_order(dom, pipes):
    """Three processes queue one after the other; increments serve them in that order."""
    dom.sem_create("fifo", 0)
    r, w = pipes()

    def waiter(i):
        assert dom.sem_decrement("fifo", wait=True, timeout=20) == 0
        os.write(w, bytes([i]))

    pids = []
    for i in range(3):
        pids.append(fork(waiter, i))
        until(lambda: waiters(dom, "fifo") == i + 1, what=f"waiter {i} queued")
    time.sleep(0.25)                     # several 100 ms slices pass
    order = []
    for _ in range(3):
        dom.sem_increment("fifo")
        order.append(os.read(r, 1)[0])
    assert order == [0, 1, 2]
    assert [join(p) for p in pids] == [0, 0, 0]
    assert waiters(dom, "fifo") == 0
    dom.check()


@pytest.mark.timeout(20)
def test_timeout_returns_minus_one_and_leaves_the_queue(dom):
    dom.sem_create("t", 0)
    t0 = time.monotonic()
    assert dom.sem_decrement("t", wait=True, timeout=0.25) == -1
    assert 0.24 <= time.monotonic() - t0 < 2
    assert waiters(dom, "t") == 0
    dom.sem_increment("t")
    assert dom.sem_get("t") == 1         # nobody swallowed it
    dom.check()


@pytest.mark.timeout(20)
def test_destroy_wakes_waiters_with_minus_one_and_recreate_starts_fresh(dom, pipes):
    dom.sem_create("d", 0)
    r, w = pipes()

    def waiter():
        os.write(w, str(dom.sem_decrement("d", wait=True, timeout=10)).encode() + b"\n")

    pids = [fork(waiter), fork(waiter)]
    until(lambda: waiters(dom, "d") == 2, what="two waiters")
    time.sleep(0.15)
    dom.sem_destroy("d")
    got = sorted(os.read(r, 64).split() + ([] if False else []))
    while len(got) < 2:
        got += os.read(r, 64).split()
    assert sorted(got) == [b"-1", b"-1"]
    assert [join(p) for p in pids] == [0, 0]
    assert dom.sem_create("d", 4) is True
    assert dom.sem_get("d") == 4
    dom.sem_destroy("missing")           # no-op
    dom.check()


def test_handles_cached_before_destroy_see_the_new_incarnation(dom):
    dom.sem_create("x", 1)
    assert dom.sem_get("x") == 1
    other = _native.Domain.attach(dom.name)
    try:
        other.sem_destroy("x")
        other.sem_create("x", 5)
    finally:
        other.close()
    assert dom.sem_get("x") == 5


def test_a_stale_mutex_handle_neither_locks_nor_unlocks_the_next_incarnation(dom):
    """The fast path's CAS compares the handle's generation (F5 of
    csrc/mutex_fast.h): a handle kept from before destroy, used on the mutex
    re-created at the same index, gets NP_ESTALE and changes nothing."""
    lib = _native._lib
    assert dom.mutex_trylock("m") is True
    dom.mutex_unlock("m")
    old = dom._mtxs["m"]
    dom.mutex_destroy("m")
    assert dom.mutex_trylock("m") is True          # re-created (same free slot), held
    new = dom._mtxs["m"]
    assert new != old and (new & 0xffffffff) == (old & 0xffffffff)
    assert lib.np_mutex_unlock(dom._d, old) == lib.NP_ESTALE
    assert mtx_info(dom, "m")["locked"] is True
    dom.mutex_unlock("m")
    assert lib.np_mutex_lock(dom._d, old, lib.NP_NOWAIT) == lib.NP_ESTALE
    assert mtx_info(dom, "m")["locked"] is False
    dom.check()


def test_values_above_the_maximum_overflow(dom):
    dom.sem_create("big", errors.VALUE_MAX)
    with pytest.raises(OverflowError):
        dom.sem_increment("big")
    assert dom.sem_get("big") == errors.VALUE_MAX


def mtx_info(dom, name):
    return next(o for o in dom.mutexes() if o["name"] == name)


# ---- mutexes -----------------------------------------------------------------

@pytest.mark.timeout(60)
def test_mutex_excludes_across_processes(dom):
    """Two processes each enter a critical section 300 times; never both inside."""
    dom.sem_create("inside", 0)

    def worker():
        for _ in range(300):
            assert dom.mutex_lock("m", timeout=20)
            assert dom.sem_increment("inside") == 1
            assert dom.sem_decrement("inside") == 0
            dom.mutex_unlock("m")

    pids = [fork(worker), fork(worker)]
    assert [join(p, 50) for p in pids] == [0, 0]
    assert dom.mutexes()[0]["locked"] is False
    dom.check()


def test_unlock_by_another_process_raises_not_holder_and_changes_nothing(dom):
    assert dom.mutex_lock("m") is True
    t = dom.mutex_token("m")

    def child():
        with pytest.raises(errors.NotHolderError):
            dom.mutex_unlock("m")
        assert dom.mutex_locked("m") is True
        assert dom.mutex_token("m") is None         # not ours
    assert join(fork(child)) == 0
    assert dom.mutex_trylock("m") is False           # still held, by us
    assert dom.mutex_token("m") == t
    dom.mutex_unlock("m")
    assert dom.mutex_locked("m") is False


def test_force_unlock_by_another_process_frees_the_mutex(dom):
    assert dom.mutex_lock("m") is True
    assert join(fork(dom.mutex_unlock, "m", True)) == 0
    assert dom.mutex_locked("m") is False
    assert dom.mutex_token("m") is None
    assert dom.mutex_trylock("m") is True


def test_unlock_of_unlocked_mutex_raises_not_holder(dom):
    with pytest.raises(errors.NotHolderError):
        dom.mutex_unlock("never-locked")
    dom.mutex_unlock("never-locked", force=True)     # force: a no-op when free
    assert dom.mutex_trylock("never-locked") is True
    assert dom.mutex_trylock("never-locked") is False   # not recursive
    assert dom.mutex_lock("never-locked", timeout=0.05) is False
    dom.mutex_unlock("never-locked")
    with pytest.raises(errors.NotHolderError):
        dom.mutex_unlock("never-locked")             # twice: the second is not a holder
    dom.mutex_unlock("never-locked", force=True)


def test_a_thread_of_the_holding_process_may_unlock(dom):
    """The holder is a process, as for threading.Lock any thread may release."""
    import threading
    assert dom.mutex_lock("m") is True
    err = []
    t = threading.Thread(target=lambda: err.append(dom.mutex_unlock("m")))
    t.start()
    t.join(10)
    assert err == [None]
    assert dom.mutex_locked("m") is False


def test_a_name_is_either_a_semaphore_or_a_mutex(dom):
    dom.sem_create("both", 1)
    with pytest.raises(ValueError, match="is a semaphore, not a mutex"):
        dom.mutex_lock("both")


# ---- limits ------------------------------------------------------------------

def test_full_tables_raise_table_full_and_leave_existing_objects_intact():
    d = _native.Domain.create(semaphores=2, mutexes=1, processes=2, actors=3)
    try:
        d.sem_create("a", 1)
        d.sem_create("b", 2)
        with pytest.raises(errors.TableFullError, match="semaphore table"):
            d.sem_create("c", 3)
        with pytest.raises(errors.TableFullError):
            d.sem_increment("c")
        assert d.mutex_lock("m")
        with pytest.raises(errors.TableFullError, match="mutex table"):
            d.mutex_lock("m2")
        assert (d.sem_get("a"), d.sem_get("b")) == (1, 2)
        d.sem_destroy("a")
        assert d.sem_create("c", 3) is True          # the freed slot is reusable

        # threads: this one holds an actor; two more fit, a third does not
        # (an exited thread's actor is freed: the child below needs one)
        results = []

        def use():
            try:
                results.append(d.sem_increment("b"))
            except errors.TableFullError as e:
                results.append(e)
            time.sleep(0.3)                         # keep the actor while the others try
        ts = [threading.Thread(target=use) for _ in range(3)]
        [t.start() for t in ts]
        [t.join(10) for t in ts]
        assert sorted(map(type, results), key=str) == sorted([int, int, errors.TableFullError], key=str)

        # processes: this one and one child fit; a grandchild does not
        def child():
            d.register()
            gpid = fork(lambda: pytest.raises(errors.TableFullError, d.register))
            assert join(gpid) == 0
        assert join(fork(child)) == 0
        assert d.sem_get("b") == 4                   # the two threads' increments
        d.check()
    finally:
        d.unlink()
        d.close()


@pytest.mark.parametrize("bad", ["", "x" * 256, "é" * 128, "a\x00b"])
def test_invalid_names_raise_value_error(dom, bad):
    with pytest.raises(ValueError):
        dom.sem_create(bad)
    with pytest.raises(ValueError):
        dom.mutex_lock(bad)
    assert dom.semaphores() == [] and dom.mutexes() == []


def test_a_255_byte_name_is_accepted(dom):
    assert dom.sem_create("n" * 255, 1) is True
    assert dom.sem_get("n" * 255) == 1


# ---- waits and signals ----------------------------------------------------

@pytest.mark.timeout(20)
def test_ctrl_c_interrupts_a_native_wait_and_leaves_no_waiter(dom, pipes):
    dom.sem_create("sig", 0)
    r, w = pipes()
    go_r, go_w = pipes()

    def child():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            dom.sem_decrement("sig", wait=True)
        except KeyboardInterrupt:
            os.write(w, repr(time.monotonic()).encode())
            os.read(go_r, 1)             # stay alive: the queue must be clean without recovery
            return
        raise AssertionError("no KeyboardInterrupt")

    pid = fork(child)
    until(lambda: waiters(dom, "sig") == 1, what="child queued")
    time.sleep(0.15)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGINT)
    t1 = float(os.read(r, 64))
    assert t1 - t0 < 0.2
    assert waiters(dom, "sig") == 0
    os.write(go_w, b"x")
    assert join(pid) == 0
    dom.sem_increment("sig")
    assert dom.sem_get("sig") == 1
    dom.check()


@pytest.mark.timeout(20)
def test_cancel_event_stops_a_wait_from_another_thread(dom):
    dom.sem_create("c", 0)
    ev = threading.Event()
    out = []
    t = threading.Thread(target=lambda: out.append(dom.sem_decrement("c", wait=True, cancel=ev)))
    t.start()
    until(lambda: waiters(dom, "c") == 1, what="thread queued")
    ev.set()
    t.join(5)
    assert out == [-1] and waiters(dom, "c") == 0


@pytest.mark.timeout(30)
def test_threads_of_one_process_wait_and_are_woken_independently(dom):
    dom.sem_create("th", 0)
    got = []
    ts = [threading.Thread(target=lambda: got.append(dom.sem_decrement("th", wait=True, timeout=10)))
          for _ in range(4)]
    [t.start() for t in ts]
    until(lambda: waiters(dom, "th") == 4, what="4 threads queued")
    for _ in range(4):
        dom.sem_increment("th")
    [t.join(10) for t in ts]
    assert len(got) == 4 and min(got) >= 0 and dom.sem_get("th") == 0
    dom.check()


# ---- no system calls on the uncontended path -------------------------------

STRACE_CHILD = r"""
import os, sys
from netplex_native.native import domain as _native
d = _native.Domain.attach(sys.argv[1])
d.sem_create("u", 1); d.sem_increment("u"); d.sem_decrement("u")
d.mutex_lock("um"); d.mutex_unlock("um")
inc, dec, lock, unlock = d.sem_increment, d.sem_decrement, d.mutex_lock, d.mutex_unlock
os.getppid()
for _ in range(10000):
    dec("u"); inc("u"); lock("um"); unlock("um")
os.getppid()
"""


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not on PATH: cannot observe system calls")
def test_uncontended_operations_make_no_system_call(dom, tmp_path):
    """Between two getppid() markers, 10k decrement/increment and lock/unlock pairs
    make no futex call (in fact no system call at all) in the thread that makes
    them.  (The process's death-watch thread, csrc/deathwatch.c, may be seen
    going to sleep meanwhile: it is not on the operations' path.)"""
    out = tmp_path / "trace"
    proc = subprocess.run(["strace", "-f", "-qq", "-o", str(out), sys.executable, "-c", STRACE_CHILD, dom.name],
                          capture_output=True, text=True, timeout=50)
    if proc.returncode != 0 and "ptrace" in proc.stderr.lower():
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    marks = [i for i, l in enumerate(lines) if "getppid(" in l]
    assert len(marks) == 2, lines[-20:]
    tid = lines[marks[0]].split()[0]
    assert lines[marks[1]].split()[0] == tid
    between = [l for l in lines[marks[0] + 1:marks[1]]
               if l.split()[0] == tid and "getppid resumed>" not in l]   # strace splits a marker

    assert not [l for l in between if "futex(" in l], between[:20]
    assert between == [], between[:20]


def test_remove_stale_unlinks_only_segments_of_dead_creators(dom, pipes):
    """A segment whose creator died is removed; one whose creator lives is kept."""
    r, w = pipes()

    def creator():
        d = _native.Domain.create(semaphores=1, mutexes=1, processes=1)
        os.write(w, d.name.encode())
    pid = fork(creator)
    stale = os.read(r, 200).decode()
    assert join(pid) == 0
    try:
        removed = _native.Domain.remove_stale()
        assert stale in removed
        assert dom.name not in removed
        assert os.path.exists("/dev/shm" + dom.name)
        assert not os.path.exists("/dev/shm" + stale)
    finally:
        if os.path.exists("/dev/shm" + stale):
            os.unlink("/dev/shm" + stale)


def test_the_accelerator_is_built_and_serves_the_fast_paths(dom):
    """A normal build has netplex_native._fast; a Domain binds its methods."""
    from netplex_native import _fast  # an ImportError here is a broken build
    if _native._fast is None:          # the "closures" run of the fixture
        assert dom._binder is None
        return
    assert isinstance(dom._binder, _fast.Binder)
    assert dom.sem_decrement.__self__ is dom._binder
    dom.sem_create("acc", 1)
    assert dom.sem_decrement("acc") == 0 and dom.sem_decrement("acc") == -1
    assert dom.sem_increment("acc") == 1
    assert dom.mutex_lock("acc.m") is True and dom.mutex_trylock("acc.m") is False
    dom.mutex_unlock("acc.m")
    assert dom.mutex_trylock("acc.m") is True


def test_entry_points_kept_after_close_raise_instead_of_touching_the_segment():
    d = _native.Domain.create(semaphores=4, mutexes=4, processes=4)
    d.sem_create("x", 1)
    dec, inc, lock, unlock = d.sem_decrement, d.sem_increment, d.mutex_lock, d.mutex_unlock
    d.unlink()
    d.close()
    for call in (lambda: dec("x"), lambda: inc("x"), lambda: lock("m"), lambda: unlock("m"),
                 lambda: dec("x", True)):
        with pytest.raises(errors.SegmentError, match="closed"):
            call()
