"""netplex_native.Domain, the public face of the native core for any supervisor:
create (removing segments whose creator is dead), attach in a spawned process
through NETPLEX_DOMAIN, recover, unlink, close, and the handle classes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import netplex_native as netplex
from netplex_native import Domain
from netplex_native.mutex import Mutex
from netplex_native.semaphore import Semaphore
from netplex_native.native import domain as _native

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def dom():
    d = Domain.create(semaphores=16, mutexes=16, processes=16, export=False)
    yield d
    d.unlink()
    d.close()


def test_domain_is_public_and_its_handles_are_the_module_handle_classes(dom):
    assert netplex.Domain is Domain
    m, s = dom.mutex("m"), dom.semaphore("s", 3)
    assert isinstance(m, Mutex) and isinstance(s, Semaphore)
    assert s.get() == 3 and dom.semaphore("s", 9).get() == 3       # existing: initial ignored
    assert m.acquire() and m.locked() and m.token >= 1
    m.release()
    with pytest.raises(netplex.NotHolderError):
        m.release()
    assert dom.name.startswith("/netplex-") and dom.config["mutexes"] == 16


def test_create_exports_the_name_and_unlink_clears_it():
    d = Domain.create(semaphores=4, mutexes=4, processes=4)
    try:
        assert os.environ["NETPLEX_DOMAIN"] == d.name
    finally:
        d.unlink()
        d.close()
    assert "NETPLEX_DOMAIN" not in os.environ
    assert not os.path.exists("/dev/shm" + d.name)


def test_a_forked_worker_killed_holding_gives_everything_back_after_recover(dom):
    m, s = dom.mutex("m"), dom.semaphore("s", 2)
    t0 = m.acquire() and m.token
    m.release()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        s.acquire(); s.acquire(); m.acquire()
        os.write(w, str(m.token).encode())
        signal.pause()
    t1 = int(os.read(r, 32))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert s.get() == 0 and m.locked()
    assert dom.recover(pid) == 1
    assert s.get() == 2 and not m.locked()
    assert m.acquire(timeout=1) and m.token > t1 > t0
    m.release()


def test_a_spawned_process_attaches_through_netplex_domain(dom):
    """A fresh interpreter (spawned, not forked) finds the domain by the name in
    NETPLEX_DOMAIN and uses the same objects, awaitable forms included."""
    m = dom.mutex("shared")
    assert m.acquire()
    src = textwrap.dedent("""
        import asyncio, sys
        from netplex_native import Domain
        d = Domain.attach()
        m = d.mutex("shared")
        async def main():
            first = await m.acquire_async(timeout=0.2)      # held by the parent
            got = await m.acquire_async(timeout=20)          # the parent releases it
            tok = m.token
            async with d.semaphore("gate", 1):
                inside = d.semaphore("gate").get()
            m.release()
            return first, got, tok, inside
        print(*asyncio.run(main()))
    """)
    env = dict(os.environ, NETPLEX_DOMAIN=dom.name)
    p = subprocess.Popen([sys.executable, "-c", src], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    import time
    time.sleep(1.0)
    t_parent = m.token
    m.release()
    out, err = p.communicate(timeout=40)
    assert p.returncode == 0, err
    first, got, tok, inside = out.split()
    assert (first, got, inside) == ("False", "True", "0")
    assert int(tok) > t_parent
    assert not m.locked()


def test_attach_without_a_name_says_what_to_do(monkeypatch):
    monkeypatch.delenv("NETPLEX_DOMAIN", raising=False)
    with pytest.raises(netplex.SegmentError, match="NETPLEX_DOMAIN"):
        Domain.attach()


def test_create_removes_segments_whose_creator_is_dead_whoever_created_them(tmp_path):
    """A segment made by another kind of supervisor (a process that created it
    and was SIGKILLed) is removed by the next create; one whose creator lives
    stays."""
    src = textwrap.dedent("""
        import os, signal, sys
        from netplex_native.native import domain
        d = domain.Domain.create(semaphores=2, mutexes=2, processes=2)
        print(d.name, flush=True)
        signal.pause()
    """)
    dead = subprocess.Popen([sys.executable, "-c", src], stdout=subprocess.PIPE, text=True)
    live = subprocess.Popen([sys.executable, "-c", src], stdout=subprocess.PIPE, text=True)
    try:
        dead_name = dead.stdout.readline().strip()
        live_name = live.stdout.readline().strip()
        dead.kill()
        dead.wait()
        assert os.path.exists("/dev/shm" + dead_name)
        d = Domain.create(semaphores=2, mutexes=2, processes=2, export=False)
        d.unlink()
        d.close()
        assert not os.path.exists("/dev/shm" + dead_name)
        assert os.path.exists("/dev/shm" + live_name)
    finally:
        live.kill()
        live.wait()
        _native.Domain.remove_stale()
    assert not os.path.exists("/dev/shm" + live_name)


def test_destroy_and_recreate_keeps_tokens_growing(dom):
    m = dom.mutex("x")
    assert m.acquire()
    t = m.token
    m.release()
    dom.destroy_mutex("x")
    assert m.acquire(timeout=1) and m.token > t
    m.release()


def test_with_never_runs_its_body_unprotected_when_the_object_is_destroyed_while_waiting(dom):
    """A wait without timeout that ends without the lock (destroy) raises in
    ``with`` instead of running the body unprotected."""
    import threading
    m, s = dom.mutex("d"), dom.semaphore("ds", 0)
    assert m.acquire()
    out = []

    def waiter(h):
        try:
            with h:
                out.append("body ran")
        except netplex.NetplexError as e:
            out.append(type(e).__name__)
    ts = [threading.Thread(target=waiter, args=(h,)) for h in (dom.mutex("d"), s)]
    for t in ts:
        t.start()
    import time
    deadline = time.monotonic() + 10
    while sum(o["waiters"] for o in dom._core.mutexes() + dom._core.semaphores()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    dom.destroy_mutex("d")
    dom.destroy_semaphore("ds")
    for t in ts:
        t.join(10)
    assert out == ["NetplexError", "NetplexError"]


def test_a_segment_stays_while_a_process_attached_to_it_lives_after_its_creator_died():
    """The stale rule is 'nobody may still use it': a process that attached
    (gunicorn's upgraded master, a spawned worker) keeps the segment in use
    after its creator died; once it dies too, the next create removes it."""
    creator_src = textwrap.dedent("""
        import signal
        from netplex_native import Domain
        d = Domain.create(semaphores=2, mutexes=2, processes=4, export=False)
        print(d.name, flush=True)
        signal.pause()
    """)
    user_src = textwrap.dedent("""
        import signal, sys
        from netplex_native import Domain
        d = Domain.attach(sys.argv[1])
        print("attached", flush=True)
        signal.pause()
    """)
    creator = subprocess.Popen([sys.executable, "-c", creator_src], stdout=subprocess.PIPE, text=True)
    user = None
    try:
        name = creator.stdout.readline().strip()
        user = subprocess.Popen([sys.executable, "-c", user_src, name], stdout=subprocess.PIPE,
                                text=True)
        assert user.stdout.readline().strip() == "attached"
        creator.kill()
        creator.wait()
        d = Domain.create(semaphores=2, mutexes=2, processes=2, export=False)
        d.unlink()
        d.close()
        assert os.path.exists("/dev/shm" + name), "removed while an attached process lives"
        user.kill()
        user.wait()
        d = Domain.create(semaphores=2, mutexes=2, processes=2, export=False)
        d.unlink()
        d.close()
        assert not os.path.exists("/dev/shm" + name)
    finally:
        for p in (creator, user):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        _native.Domain.remove_stale()


def test_protected_reverts_a_processs_net_effect_unprotected_keeps_it(dom):
    """As the README says: protected reverts decrements AND increments of a
    recovered process, whatever its exit; protected=False keeps them."""
    pool = dom.semaphore("pool", 0)
    items = dom.semaphore("items", 0, protected=False)

    def produce():
        pool.release(3)
        items.release(3)
    pid = os.fork()
    if pid == 0:
        try:
            produce()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert (pool.get(), items.get()) == (3, 3)
    assert dom.recover(pid, timeout=5) >= 0
    assert (pool.get(), items.get()) == (0, 3)


def test_threading_idiom_accepts_int_blocking_and_a_closed_domain_makes_no_handles():
    d = Domain.create(semaphores=2, mutexes=2, processes=2, export=False)
    try:
        m, s = d.mutex("m"), d.semaphore("s", 1)
        assert m.acquire(0) is True and m.acquire(0) is False
        m.release()
        assert m.acquire(1, 0.1) is True
        m.release()
        assert s.acquire(0) is True and s.acquire(0) is False
        with pytest.raises(TypeError, match="blocking"):
            m.acquire("yes")
        with pytest.raises(ValueError, match="non-blocking"):
            s.acquire(0, 1.0)
    finally:
        d.unlink()
        d.close()
    with pytest.raises(netplex.SegmentError):
        d.mutex("m")
    with pytest.raises(netplex.SegmentError):
        d.semaphore("s")


def test_a_lock_taken_by_a_coroutine_gets_the_next_token(dom):
    """The coroutine path grants with the same logged writes as the thread
    path: owner and a larger fencing token."""
    m = dom.mutex("co")
    assert m.acquire()
    t = m.token
    m.release()

    async def take() -> int | None:
        assert await m.acquire_async(timeout=5)
        try:
            return m.token
        finally:
            m.release()
    t2 = asyncio.run(take())
    assert t2 is not None and t2 > t


def test_create_sizes_the_async_waiter_table_and_the_quota_bounds_each_process_not_their_sum():
    """waiters/waiter_quota: validated; one process at its quota leaves the
    rest to the others, two at their quota fill the table (as documented)."""
    for bad, exc in (({"waiter_quota": 9}, ValueError), ({"waiters": -1}, ValueError),
                     ({"waiter_quota": 0}, ValueError), ({"waiter_quota": "4"}, TypeError),
                     ({"waiters": 1.5}, TypeError)):
        with pytest.raises(exc, match="waiter"):
            Domain.create(semaphores=4, mutexes=4, processes=4, export=False,
                          **{"waiters": 8, **bad})
    d = Domain.create(semaphores=4, mutexes=4, processes=8, waiters=8, waiter_quota=4,
                      export=False)
    pids = []
    try:
        assert d.config["waiters"] == 8 and d.config["waiter_quota"] == 4
        m = d.mutex("m")
        assert m.lock(timeout=0)
        r, w = os.pipe()
        go_r, go_w = os.pipe()

        def fill(n):
            """Await m n times; report how many queued and whether one more
            was refused (TableFullError); stay until told."""
            async def main():
                ts = [asyncio.ensure_future(m.lock_async(timeout=30)) for _ in range(n)]
                await asyncio.sleep(0.2)
                try:
                    await m.lock_async(timeout=30)
                    extra = "granted"
                except netplex.TableFullError:
                    extra = "full"
                os.write(w, f"{sum(not t.done() for t in ts)} {extra}\n".encode()[:16].ljust(16))
                await asyncio.get_running_loop().run_in_executor(None, os.read, go_r, 1)
                for t in ts:
                    t.cancel()
                await asyncio.gather(*ts, return_exceptions=True)
            asyncio.run(main())

        for _ in range(2):
            pid = os.fork()
            if pid == 0:
                signal.alarm(30)
                try:
                    fill(4)
                finally:
                    os._exit(0)
            pids.append(pid)
        reports = sorted(os.read(r, 16).decode().split() for _ in pids)
        assert reports == [["4", "full"], ["4", "full"]], reports

        async def one_more():
            return await m.lock_async(timeout=0.5)
        with pytest.raises(netplex.TableFullError):     # this process holds none: the table is full
            asyncio.run(one_more())
        for _ in pids:
            os.write(go_w, b"G")
        for pid in pids:
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        pids.clear()
        assert asyncio.run(one_more()) is False           # records free again: it queues, times out
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        d.unlink()
        d.close()
