"""The semantics of semaphores and mutexes (reference/netplex-semantics.md),
checked on both backends with real forked controllers and containers.

Every test runs a controller with a few single-container services
("actors").  An actor serves one TCP connection per command: the test sends
a snippet of Python, the container runs it (in its handler, on its loop) and
answers with the result as JSON.  Blocking commands are started and read
later (``Actor.start``), so the test sequences the containers itself:
queued waiters are observed through the admin ``inspect`` command, crashes
are real SIGKILLs, and restarts are observed through the ``ready`` event the
next container emits (the controller restarts a container only after it
recovered what the dead one held).

The infrastructure here (``cluster``, ``Actor``...) is shared with
test_reference_defects.py and test_sharedvar.py.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import tempfile
import textwrap
import time
import traceback
import uuid

import pytest

import netplex_native as netplex
from netplex_native import semaphore, mutex, sharedvar, cenv
from harness import run_controller, plugins_for, free_port, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=["rpc", "native", "etcd"])
def backend(request):
    """Every semantic test on every backend (etcd: a real server, see conftest)."""
    from harness import need_backend
    if request.param == "etcd":
        request.getfixturevalue("etcd_backend")
    else:
        need_backend(request.param)
    return request.param


# --------------------------------------------------------------------------
# container side
# --------------------------------------------------------------------------

class Finish(Exception):
    """Raised (from a timer) to end a container regularly."""


_NS: dict = {}    # the command namespace of this container process


def _make_ns(events, cont) -> dict:
    from netplex_native import wire
    from netplex_native._context import ctx

    def bad(fn):
        """Run fn; describe the exception it raised (None if it did not)."""
        try:
            fn()
        except Exception as e:
            return {"type": type(e).__name__, "TypeError": isinstance(e, TypeError),
                    "ValueError": isinstance(e, ValueError), "msg": str(e)}
        return None

    def finish():
        """End this container regularly (pre_finish_hook, exit 0), soon."""
        def boom(timer):
            raise Finish()
        cenv.create_timer(boom, 0.01)
        return os.getpid()

    return {"semaphore": semaphore, "mutex": mutex, "sharedvar": sharedvar, "cenv": cenv,
            "netplex": netplex, "os": os, "signal": signal, "time": time, "asyncio": asyncio, "math": __import__("math"),
            "events": events, "emit": events.emit, "store": {}, "bad": bad, "finish": finish,
            "wire": wire, "ctx": ctx, "cont": cont}


async def _run_command(src: str, kw: dict):
    try:
        try:
            compile(src, "<actor>", "eval", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            body = f"return ({src})"
        except SyntaxError:
            body = src + "\nreturn locals().get('result')"
        params = ", ".join(kw)
        fsrc = f"async def __actor_cmd({params}):\n" + textwrap.indent(body, "    ") + "\n"
        scratch: dict = {}
        exec(compile(fsrc, "<actor>", "exec"), _NS, scratch)
        value = await scratch["__actor_cmd"](**kw)
        return {"ok": True, "value": value}
    except Exception as e:
        return {"ok": False, "type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                "msg": str(e), "tb": traceback.format_exc()[-1500:]}


async def actor_handler(reader, writer):
    """One command per connection.  If the client goes away before the
    command is done, the command is cancelled (as a real handler would be)."""
    line = await reader.readline()
    if not line:
        return
    req = json.loads(line)
    task = asyncio.ensure_future(_run_command(req["src"], req["kw"]))
    eof = asyncio.ensure_future(reader.read(1))
    await asyncio.wait({task, eof}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        try:
            await task
        except BaseException:
            pass
        _NS["events"].emit("abandoned", service=_NS["cont"].service_name, src=req["src"][:200])
        return
    eof.cancel()
    writer.write(json.dumps(task.result(), default=repr).encode() + b"\n")
    await writer.drain()


class ActorHooks(netplex.ProcessorHooks):
    """Adds the backend's plugins (and sharedvar); emits ``ready`` when a
    container is up; a flag file, when present, stops restarts."""

    def __init__(self, events, backend, no_restart_flag=None):
        self.events = events
        self.backend = backend
        self.no_restart_flag = no_restart_flag

    def post_add_hook(self, service, ctrl):
        sem_plugin, mutex_plugin = plugins_for(self.backend)
        ctrl.add_plugin(sem_plugin)
        ctrl.add_plugin(mutex_plugin)
        if self.backend == "etcd":          # every primitive on etcd
            import harness
            ctrl.add_plugin(harness.ETCD.sharedvar_plugin)
        else:
            ctrl.add_plugin(sharedvar.plugin)

    def pre_start_hook(self, service, ctrl, container_id):
        if self.no_restart_flag and os.path.exists(self.no_restart_flag):
            raise RuntimeError("restarts disabled by the test")

    def post_start_hook(self, cont):
        global _NS
        _NS = _make_ns(self.events, cont)
        self.on_start(cont)
        self.events.emit("ready", service=cont.service_name, cid=cont.id)

    def on_start(self, cont):
        pass

    def receive_message(self, cont, name, args):
        self.events.emit("message", service=cont.service_name, name=name, args=args)

    def global_exception_handler(self, exc):
        if isinstance(exc, Finish):
            return False
        self.events.emit("exception", type=type(exc).__name__, msg=str(exc)[:300])
        return True


# --------------------------------------------------------------------------
# test side
# --------------------------------------------------------------------------

class Remote(Exception):
    """The command raised in the container."""

    def __init__(self, answer):
        super().__init__(f"{answer['type']}: {answer['msg']}\n{answer.get('tb', '')}")
        self.type = answer["type"]
        self.mro = answer["mro"]
        self.msg = answer["msg"]


class Pending:
    """A command sent to an actor whose answer is read later."""

    def __init__(self, sock: socket.socket, src: str):
        self.sock = sock
        self.src = src
        self._buf = b""
        self._answer = None

    def done(self, timeout: float = 0.0) -> bool:
        if self._answer is not None:
            return True
        r, _, _ = select.select([self.sock], [], [], timeout)
        return bool(r)

    def result(self, timeout: float = 10.0):
        if self._answer is None:
            deadline = time.monotonic() + timeout
            while not self._buf.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no answer after {timeout}s to {self.src!r}")
                r, _, _ = select.select([self.sock], [], [], remaining)
                if r:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        raise ConnectionError(f"connection closed without an answer to {self.src!r}")
                    self._buf += chunk
            self._answer = json.loads(self._buf)
            self.close()
        if not self._answer["ok"]:
            raise Remote(self._answer)
        return self._answer["value"]

    def close(self) -> None:
        self.sock.close()


class Actor:
    """The test's handle on a single-container service."""

    def __init__(self, cluster, name: str, port: int):
        self.cluster = cluster
        self.name = name
        self.port = port

    def start(self, src: str, **kw) -> Pending:
        src = textwrap.dedent(src).strip()
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.sendall(json.dumps({"src": src, "kw": kw}).encode() + b"\n")
        return Pending(s, src)

    def call(self, src: str, timeout: float = 10.0, **kw):
        return self.start(src, **kw).result(timeout)

    def error(self, src: str, timeout: float = 10.0, **kw) -> Remote:
        """Run a command that must raise; its exception."""
        try:
            value = self.call(src, timeout, **kw)
        except Remote as e:
            return e
        raise AssertionError(f"{src!r} returned {value!r} instead of raising")

    def pid(self) -> int:
        return self.call("os.getpid()")

    def readies(self) -> int:
        return len(self.cluster.events.all("ready", service=self.name))

    def wait_ready(self, count: int, timeout: float = 15.0) -> int:
        """Wait for the *count*-th container of this service; its pid."""
        return self.cluster.events.wait("ready", count=count, timeout=timeout, service=self.name)[count - 1]["pid"]

    def kill(self, wait_restart: bool = True) -> int:
        """SIGKILL the current container; by default wait until the controller
        has reaped it, recovered its holdings and started the next one."""
        n = self.readies()
        pid = self.wait_ready(n)   # not a call: the container may be blocked in a wait
        os.kill(pid, signal.SIGKILL)
        if wait_restart:
            self.wait_ready(n + 1)
        return pid

    def finish(self, wait_restart: bool = True) -> int:
        """End the current container regularly."""
        n = self.readies()
        pid = self.call("finish()")
        if wait_restart:
            self.wait_ready(n + 1)
        return pid


class Cluster:
    def __init__(self, events, proc, socket_dir, actors):
        self.events = events
        self.proc = proc
        self.socket_dir = socket_dir
        self.actors = actors

    def __getitem__(self, name) -> Actor:
        return self.actors[name]

    def inspect(self) -> dict:
        from netplex_native.admin import request
        ans = request(self.socket_dir, {"cmd": "inspect"})
        assert ans.get("ok"), ans
        return ans

    def waiters(self, name: str):
        """Queued waiters of the primitive *name* per admin inspect (None if
        inspect does not report them)."""
        found = []

        def walk(o):
            if isinstance(o, dict):
                if o.get("name") == name and "waiters" in o:
                    found.append(o["waiters"])
                for v in o.values():
                    walk(v)
            elif isinstance(o, list):
                for v in o:
                    walk(v)
        walk(self.inspect())
        return max(found) if found else None

    def wait_waiters(self, name: str, count: int, timeout: float = 5.0) -> None:
        """Wait until *count* waiters are queued on *name*."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = self.waiters(name)
            if n is not None and n >= count:
                return
            time.sleep(0.01)
        raise AssertionError(f"{name!r}: {self.waiters(name)} waiters after {timeout}s, expected {count}")


@contextlib.contextmanager
def cluster(events, backend, names, *, hooks=ActorHooks, workers=None, no_restart_flag=None,
            native_config=None):
    """A running controller with one service per name (single container
    unless *workers* says otherwise); yields a Cluster once all are ready."""
    ports = {n: free_port() for n in names}
    workers = workers or {}
    sdir = tempfile.mkdtemp(prefix="npt-")

    def build():
        ctrl = netplex.Controller(socket_dir=sdir, native_config=native_config)
        for n in names:
            ctrl.add_service(netplex.Service(
                n, actor_handler, hooks=hooks(events, backend, no_restart_flag),
                address=f"tcp://127.0.0.1:{ports[n]}", workers=workers.get(n, 1)))
        return ctrl

    try:
        with run_controller(build) as proc:
            c = Cluster(events, proc, sdir, {})
            c.actors = {n: Actor(c, n, ports[n]) for n in names}
            for n in names:
                events.wait("ready", timeout=20, service=n, count=workers.get(n, 1))
            yield c
            exceptions = events.all("exception")
            assert not exceptions, f"unexpected exceptions in containers: {exceptions}"
    finally:
        shutil.rmtree(sdir, ignore_errors=True)


def uniq(prefix: str) -> str:
    return f"t.{prefix}.{uuid.uuid4().hex[:10]}"


def settle(cond, timeout: float = 5.0, what: str = "") -> None:
    assert wait_until(cond, timeout), f"not reached within {timeout}s: {what}"


# --------------------------------------------------------------------------
# semaphores
# --------------------------------------------------------------------------

def test_create_returns_true_then_false_and_ignores_initial_and_protected_the_second_time(events, backend):
    S = uniq("sem")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert a.call("semaphore.create(S, 2)", S=S) is True
        assert b.call("semaphore.create(S, 7, protected=True)", S=S) is False
        assert b.call("semaphore.get(S)", S=S) == 2
        # the second create's protected=True was ignored: b's increments stay after b dies
        assert b.call("semaphore.increment(S)", S=S) == 3
        b.kill()
        assert a.call("semaphore.get(S)", S=S) == 3


def test_increment_returns_the_new_value(events, backend):
    S = uniq("sem")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert a.call("semaphore.create(S, 5)", S=S) is True
        assert a.call("semaphore.increment(S)", S=S) == 6
        assert b.call("semaphore.increment(S)", S=S) == 7
        assert a.call("[semaphore.increment(S) for _ in range(3)]", S=S) == [8, 9, 10]
        assert b.call("semaphore.decrement(S)", S=S) == 9


@pytest.mark.parametrize("first_use", ["increment", "get", "decrement"])
def test_missing_semaphore_is_created_implicitly_at_zero_and_protected(events, backend, first_use):
    """A missing name springs into existence at 0, protected: a container that
    increments it and dies leaves it at 0 again."""
    S = uniq("sem")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        expected_first = {"increment": 1, "get": 0, "decrement": -1}[first_use]
        assert a.call(f"semaphore.{first_use}(S)", S=S) == expected_first
        assert b.call("semaphore.create(S, 9)", S=S) is False   # it exists now
        if first_use != "increment":
            assert a.call("semaphore.increment(S)", S=S) == 1
        assert b.call("semaphore.get(S)", S=S) == 1
        a.kill()
        assert b.call("semaphore.get(S)", S=S) == 0


def test_decrement_at_zero_without_wait_returns_minus_one_and_changes_nothing(events, backend):
    S = uniq("sem")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert a.call("semaphore.create(S, 1, protected=True)", S=S) is True
        assert a.call("semaphore.decrement(S)", S=S) == 0
        assert a.call("[semaphore.decrement(S), semaphore.decrement(S, wait=False)]", S=S) == [-1, -1]
        assert b.call("semaphore.get(S)", S=S) == 0
        # the failed decrements were not counted as takes: one increment is one count
        assert b.call("semaphore.increment(S)", S=S) == 1
        assert a.call("semaphore.decrement(S)", S=S) == 0
        # ... and a's protected accounting holds exactly its two successful takes
        assert b.call("[semaphore.increment(S), semaphore.increment(S)]", S=S) == [1, 2]
        a.kill()   # a took 2, gave 0: the 2 come back
        assert b.call("semaphore.get(S)", S=S) == 4


def test_decrement_with_wait_blocks_until_another_container_increments(events, backend):
    S = uniq("sem")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert b.call("semaphore.create(S, 0)", S=S) is True
        w = a.start("""
            t0 = time.monotonic()
            r = semaphore.decrement(S, wait=True, timeout=20)
            result = [r, time.monotonic() - t0]
        """, S=S)
        c.wait_waiters(S, 1)
        assert not w.done(0.2), "decrement(wait=True) returned while the value was 0"
        assert b.call("semaphore.increment(S)", S=S) in (0, 1)
        r, waited = w.result(5)
        assert r == 0 and waited >= 0.2
        assert b.call("semaphore.get(S)", S=S) == 0


def test_waiters_are_served_first_in_first_out(events, backend):
    """Three containers queue in a known order; three increments, one at a
    time, serve them in that order.  Waits last > 100 ms (past a wait slice)."""
    S = uniq("sem")
    names = ["w1", "w2", "w3", "inc"]
    with cluster(events, backend, names) as c:
        assert c["inc"].call("semaphore.create(S, 0)", S=S) is True
        pending = {}
        for i, n in enumerate(names[:3]):
            pending[n] = c[n].start("""
                r = semaphore.decrement(S, wait=True, timeout=30)
                emit("served", who=who, r=r)
                result = r
            """, S=S, who=n)
            c.wait_waiters(S, i + 1)
            time.sleep(0.12)   # each waiter waits > 100 ms before the next joins
        order = []
        for k in range(3):
            c["inc"].call("semaphore.increment(S)", S=S)
            order.append(events.wait("served", count=k + 1, timeout=10)[k]["who"])
        assert order == names[:3]
        assert [pending[n].result(5) for n in names[:3]] == [0, 0, 0]


def test_decrement_timeout_returns_minus_one_and_leaves_the_queue(events, backend):
    S = uniq("sem")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert b.call("semaphore.create(S, 0)", S=S) is True
        r, waited = a.call("""
            t0 = time.monotonic()
            r = semaphore.decrement(S, wait=True, timeout=0.3)
            result = [r, time.monotonic() - t0]
        """, S=S)
        assert r == -1
        assert 0.25 <= waited < 1.5, f"timeout of 0.3 s took {waited:.3f} s"
        # the timed-out waiter holds no place: the next increment stays in the value
        assert b.call("semaphore.increment(S)", S=S) == 1
        time.sleep(0.2)
        assert b.call("semaphore.get(S)", S=S) == 1
        assert a.call("semaphore.decrement(S, wait=True, timeout=0)", S=S) == 0
        assert a.call("semaphore.decrement(S, wait=True, timeout=0)", S=S) == -1


def test_destroy_wakes_every_waiter_with_minus_one_and_really_removes(events, backend):
    S = uniq("sem")
    T = uniq("sem")
    with cluster(events, backend, ["w1", "w2", "d"]) as c:
        d = c["d"]
        assert d.call("semaphore.create(S, 0)", S=S) is True
        ws = []
        for i, n in enumerate(["w1", "w2"]):
            ws.append(c[n].start("semaphore.decrement(S, wait=True, timeout=30)", S=S))
            c.wait_waiters(S, i + 1)
        assert d.call("semaphore.destroy(S)", S=S) is None
        assert [w.result(5) for w in ws] == [-1, -1]
        assert d.call("semaphore.create(S, 5)", S=S) is True, "destroy did not remove the semaphore"
        assert c["w1"].call("semaphore.get(S)", S=S) == 5
        # a destroyed value is gone: get afterwards is 0
        assert d.call("[semaphore.create(T, 3), semaphore.destroy(T), semaphore.get(T)]", T=T) == [True, None, 0]
        # destroying a missing semaphore is a no-op
        assert d.call("semaphore.destroy(T + 'x')", T=T) is None


@pytest.mark.parametrize("end", ["sigkill", "regular"])
def test_protected_accounting_is_reverted_when_a_container_ends(events, backend, end):
    """A container that incremented 3 and decremented 1 and then ends (by
    SIGKILL or regularly) takes its net 2 with it."""
    S = uniq("sem")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert b.call("semaphore.create(S, 10, protected=True)", S=S) is True
        assert a.call("[semaphore.increment(S) for _ in range(3)] + [semaphore.decrement(S)]",
                      S=S) == [11, 12, 13, 12]
        a.kill() if end == "sigkill" else a.finish()
        if backend == "etcd":
            # the controller fires the lease's revoke on reap and does not wait
            # for it (README, etcd): the restarted container may come first
            settle(lambda: b.call("semaphore.get(S)", S=S) == 10, 10, "the revoke of a's lease")
        assert b.call("semaphore.get(S)", S=S) == 10


@pytest.mark.parametrize("end", ["sigkill", "regular"])
def test_protected_revert_is_clamped_at_zero(events, backend, end):
    S = uniq("sem")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert b.call("semaphore.create(S, 0, protected=True)", S=S) is True
        assert a.call("[semaphore.increment(S) for _ in range(3)] + [semaphore.decrement(S)]",
                      S=S) == [1, 2, 3, 2]
        assert b.call("[semaphore.decrement(S), semaphore.decrement(S)]", S=S) == [1, 0]
        a.kill() if end == "sigkill" else a.finish()
        assert b.call("semaphore.get(S)", S=S) == 0
        assert b.call("semaphore.increment(S)", S=S) == 1


@pytest.mark.parametrize("end", ["sigkill", "regular"])
def test_protected_revert_wakes_waiters(events, backend, end):
    """What a dead container took comes back and goes to the queued waiter."""
    S = uniq("sem")
    with cluster(events, backend, ["a", "w", "b"]) as c:
        a, w, b = c["a"], c["w"], c["b"]
        assert b.call("semaphore.create(S, 2, protected=True)", S=S) is True
        assert a.call("[semaphore.decrement(S), semaphore.decrement(S)]", S=S) == [1, 0]
        waiting = w.start("semaphore.decrement(S, wait=True, timeout=30)", S=S)
        c.wait_waiters(S, 1)
        a.kill() if end == "sigkill" else a.finish()
        assert waiting.result(5) in (0, 1)
        settle(lambda: b.call("semaphore.get(S)", S=S) == 1, what="the second count given back")


def test_unprotected_semaphore_is_not_reverted(events, backend):
    S = uniq("sem")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert b.call("semaphore.create(S, 5, protected=False)", S=S) is True
        assert a.call("[semaphore.increment(S), semaphore.increment(S), semaphore.increment(S)]",
                      S=S) == [6, 7, 8]
        assert a.call("semaphore.decrement(S)", S=S) == 7
        a.kill()
        assert b.call("semaphore.get(S)", S=S) == 7
        assert b.call("[semaphore.decrement(S) for _ in range(4)]", S=S) == [6, 5, 4, 3]
        b.finish()
        assert a.call("semaphore.get(S)", S=S) == 3


# --------------------------------------------------------------------------
# mutexes
# --------------------------------------------------------------------------

def test_mutex_excludes_across_containers(events, backend, tmp_path):
    """Three containers loop over a critical section that creates a marker
    file exclusively (two holders would fail) and bumps a counter file."""
    M = uniq("mtx")
    marker = str(tmp_path / "inside")
    counter = str(tmp_path / "counter")
    with open(counter, "w") as f:
        f.write("0")
    names = ["a", "b", "c"]
    iters = 40
    with cluster(events, backend, names) as c:
        runs = [c[n].start("""
            for i in range(iters):
                with mutex.access(M):
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    os.close(fd)
                    with open(counter) as f:
                        v = int(f.read())
                    time.sleep(0.0005)
                    with open(counter, "w") as f:
                        f.write(str(v + 1))
                    os.unlink(marker)
            result = iters
        """, M=M, marker=marker, counter=counter, iters=iters) for n in names]
        assert [r.result(60) for r in runs] == [iters] * 3
        with open(counter) as f:
            assert int(f.read()) == 3 * iters


def test_mutex_lock_with_timeout_returns_false_when_held(events, backend):
    M = uniq("mtx")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert a.call("mutex.access(M).lock()", M=M) is True
        locked, waited = b.call("""
            t0 = time.monotonic()
            r = mutex.access(M).lock(timeout=0.3)
            result = [r, time.monotonic() - t0]
        """, M=M)
        assert locked is False
        assert 0.25 <= waited < 1.5, f"timeout of 0.3 s took {waited:.3f} s"
        assert b.call("mutex.access(M).lock(timeout=0)", M=M) is False
        a.call("mutex.access(M).unlock()", M=M)
        assert b.call("mutex.access(M).lock(timeout=0)", M=M) is True


def test_unlock_by_a_container_that_does_not_hold_it_raises_and_changes_nothing(events, backend):
    M = uniq("mtx")
    with cluster(events, backend, ["a", "b", "c"]) as c:
        assert c["a"].call("mutex.access(M).lock()", M=M) is True
        e = c["b"].error("mutex.access(M).unlock()", M=M)
        assert "NotHolderError" in str(e)
        assert c["c"].call("mutex.access(M).lock(timeout=0.2)", M=M) is False
        assert c["b"].call("mutex.access(M).locked()", M=M) is True
        assert c["a"].call("mutex.access(M).unlock()", M=M) is None
        assert c["c"].call("mutex.access(M).lock(timeout=1)", M=M) is True


def test_force_unlock_frees_a_mutex_held_by_another_container(events, backend):
    M = uniq("mtx")
    with cluster(events, backend, ["a", "b", "c"]) as c:
        assert c["a"].call("mutex.access(M).lock()", M=M) is True
        assert c["b"].call("mutex.access(M).unlock(force=True)", M=M) is None
        assert c["c"].call("mutex.access(M).lock(timeout=1)", M=M) is True
        assert c["a"].call("mutex.access(M).lock(timeout=0)", M=M) is False


def test_unlock_of_an_unlocked_mutex_raises_and_lets_no_two_holders_in(events, backend):
    """Unlocking a free mutex (twice, and one never used) raises NotHolderError
    and must not let two holders in; force on a free mutex is a no-op."""
    M = uniq("mtx")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert "NotHolderError" in str(a.error("mutex.access(M).unlock()", M=M))
        assert "NotHolderError" in str(a.error("mutex.access(M).release()", M=M))
        assert a.call("mutex.access(M).unlock(force=True)", M=M) is None
        assert a.call("mutex.access(M).lock(timeout=0)", M=M) is True
        assert b.call("mutex.access(M).lock(timeout=0)", M=M) is False
        assert a.call("mutex.access(M).lock(timeout=0)", M=M) is False   # not recursive
        a.call("mutex.access(M).unlock()", M=M)
        assert "NotHolderError" in str(a.error("mutex.access(M).unlock()", M=M))
        assert b.call("mutex.access(M).lock(timeout=0)", M=M) is True
        assert a.call("mutex.access(M).lock(timeout=0)", M=M) is False


def test_fencing_token_grows_for_every_later_holder_across_destroy_and_death(events, backend):
    """Mutex.token: None unless this container holds it; every later holder's
    token is larger, also after destroy/re-create and after a holder's SIGKILL."""
    M = uniq("mtx")
    with cluster(events, backend, ["a", "b", "c"]) as c:
        a, b, cc = c["a"], c["b"], c["c"]
        assert a.call("mutex.access(M).token", M=M) is None
        t1 = a.call("[mutex.access(M).lock(), mutex.access(M).token, mutex.access(M).token]", M=M)
        assert t1[0] is True and t1[1] == t1[2] and isinstance(t1[1], int) and t1[1] > 0
        assert b.call("mutex.access(M).token", M=M) is None        # held, but not by b
        a.call("mutex.access(M).unlock()", M=M)
        assert a.call("mutex.access(M).token", M=M) is None
        assert b.call("mutex.access(M).lock(timeout=2)", M=M) is True
        t2 = b.call("mutex.access(M).token", M=M)
        assert t2 > t1[1]
        b.call("mutex.access(M).unlock()", M=M)
        a.call("mutex.destroy(M)", M=M)                            # re-created on next use
        assert cc.call("mutex.access(M).lock(timeout=2)", M=M) is True
        t3 = cc.call("mutex.access(M).token", M=M)
        assert t3 > t2
        cc.kill()                                                  # dies holding it
        assert a.call("mutex.access(M).lock(timeout=5)", M=M) is True
        t4 = a.call("mutex.access(M).token", M=M)
        assert t4 > t3 and t4 < 2**63
        a.call("mutex.access(M).unlock()", M=M)


def test_mutex_handle_has_the_threading_lock_idiom_in_threads_too(events, backend):
    """acquire(blocking, timeout) / release / locked / with, as threading.Lock:
    a second thread of the holding container waits, and may release it."""
    M = uniq("mtx")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert a.call("""
            import threading
            m = mutex.access(M)
            out = [m.locked(), m.acquire(), m.locked(), m.acquire(blocking=False)]
            got = []
            t = threading.Thread(target=lambda: got.append(mutex.access(M).acquire(timeout=0.2)))
            t.start(); t.join(10)
            out.append(got)
            t = threading.Thread(target=m.release)     # any thread of the holder may release
            t.start(); t.join(10)
            out.append(m.locked())
            with m:
                out.append(m.locked())
            out.append(m.locked())
            try:
                m.acquire(blocking=False, timeout=1)
            except ValueError:
                out.append("ValueError")
            out.append(m.acquire(timeout=-1))
            m.release()
            result = out
        """, M=M) == [False, True, True, False, [False], False, True, False, "ValueError", True]
        assert b.call("mutex.access(M).acquire(timeout=0.05)", M=M) is True
        e = a.error("mutex.access(M).release()", M=M)
        assert e.type == "NotHolderError" and "RuntimeError" in e.mro and "NetplexError" in e.mro
        assert a.call("""
            m = mutex.access(M)
            t = asyncio.ensure_future(m.acquire_async(timeout=10))
            await asyncio.sleep(0.2)
            first = t.done()
            result = [first]
        """, M=M) == [False]
        b.call("mutex.access(M).release()", M=M)
        settle(lambda: a.call("mutex.access(M).token", M=M) is not None,
               what="the waiting acquire_async got the mutex")
        assert a.call("""
            m = mutex.access(M)
            m.release()
            async with m:
                inside = m.locked()
            result = [inside, m.locked()]
        """, M=M) == [True, False]


def test_semaphore_handle_has_the_threading_semaphore_idiom(events, backend):
    S = uniq("sem")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert a.call("semaphore.create(S, 2)", S=S) is True
        assert a.call("""
            s = semaphore.access(S)
            out = [s.get(), s.acquire(), s.acquire(blocking=False), s.acquire(blocking=False),
                   s.acquire(timeout=0.05), s.get()]
            s.release(2)
            out.append(s.get())
            with s:
                out.append(s.get())
            out.append(s.get())
            out += [s.decrement(), s.increment(), await s.decrement_async(wait=True, timeout=1)]
            async with s:
                out.append(s.get())
            out.append(await s.acquire_async(timeout=0.05))
            s.release()
            for bad in (0, -1):
                try:
                    s.release(bad)
                except ValueError:
                    out.append("ValueError")
            result = out
        """, S=S) == [2, True, True, False, False, 0, 2, 1, 2, 1, 2, 1, 0, True, "ValueError", "ValueError"]
        assert b.call("semaphore.access(S).get()", S=S) == 1
        waiting = b.start("semaphore.access(S).acquire(timeout=20) and semaphore.access(S).acquire(timeout=20)", S=S)
        c.wait_waiters(S, 1)
        a.call("semaphore.access(S).release()", S=S)
        assert waiting.result(10) is True


@pytest.mark.timeout(120)
def test_release_of_many_units_is_one_step(events, backend):
    """release(n) gives its n units in one operation of the backend (all or
    none; its time does not grow with n): 2**62 units at once; past the
    maximum value OverflowError and nothing given; two waiters served by one
    release(2).  (It was n increments: release(2**62) never ended, and a
    signal handler's exception left part of the units given.)"""
    S, W = uniq("sem"), uniq("sem")
    with cluster(events, backend, ["a", "b", "c"]) as c:
        a = c["a"]
        assert a.call("""
            from netplex_native.errors import VALUE_MAX
            semaphore.create(S, 5)
            s = semaphore.access(S)
            s.release(2**62)
            out = [s.get() == 5 + 2**62]
            try:
                s.release(VALUE_MAX - 2**62)
            except OverflowError:
                out.append("OverflowError")
            out.append(s.get() == 5 + 2**62)
            result = out
        """, S=S, timeout=60) == [True, "OverflowError", True]
        a.call("semaphore.create(W, 0)", W=W)
        waits = [c[n].start("semaphore.access(W).acquire(timeout=20)", W=W) for n in ("b", "c")]
        c.wait_waiters(W, 2)
        a.call("semaphore.access(W).release(2)", W=W)
        assert [w.result(20) for w in waits] == [True, True]
        assert a.call("semaphore.get(W)", W=W) == 0


@pytest.mark.parametrize("form", ["with", "async with"])
def test_mutex_context_manager_holds_inside_and_releases_after(events, backend, form):
    M = uniq("mtx")
    G = uniq("sem")
    inner = ("semaphore.decrement(G, wait=True, timeout=20)" if form == "with"
             else "await semaphore.decrement_async(G, wait=True, timeout=20)")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert b.call("semaphore.create(G, 0)", G=G) is True
        run = a.start(f"""
            {form} mutex.access(M) as m:
                emit("inside", form=m.name)
                r = {inner}
            result = r
        """, M=M, G=G)
        events.wait("inside", timeout=10)
        assert b.call("mutex.access(M).lock(timeout=0)", M=M) is False
        b.call("semaphore.increment(G)", G=G)
        assert run.result(10) == 0
        assert b.call("mutex.access(M).lock(timeout=0)", M=M) is True


def test_mutex_of_a_sigkilled_holder_goes_to_the_blocked_waiter(events, backend, record_property):
    M = uniq("mtx")
    with cluster(events, backend, ["h", "w"]) as c:
        h, w = c["h"], c["w"]
        assert h.call("mutex.access(M).lock()", M=M) is True
        waiting = w.start("""
            r = mutex.access(M).lock(timeout=30)
            emit("acquired", r=r)
            result = r
        """, M=M)
        c.wait_waiters(M, 1)
        pid = h.pid()
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        got = events.wait("acquired", timeout=10)[0]
        latency = got["t"] - t_kill
        record_property("kill_to_acquire_s", latency)
        print(f"\n[{backend}] SIGKILLed holder -> waiter acquired in {latency * 1000:.1f} ms")
        assert got["r"] is True and waiting.result(5) is True
        assert latency < 2.0, f"took {latency:.3f} s"
        h.wait_ready(2)
        assert h.call("mutex.access(M).lock(timeout=0)", M=M) is False   # w holds it


# --------------------------------------------------------------------------
# awaitable forms and cancellation
# --------------------------------------------------------------------------

def test_decrement_async_waits_while_the_container_serves_other_connections(events, backend):
    S = uniq("sem")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert b.call("semaphore.create(S, 0)", S=S) is True
        waiting = a.start("await semaphore.decrement_async(S, wait=True, timeout=20)", S=S)
        c.wait_waiters(S, 1)
        time.sleep(0.15)
        assert a.call("'pong'", timeout=3) == "pong"
        assert not waiting.done()
        assert a.call("semaphore.get(S)", timeout=3, S=S) == 0
        b.call("semaphore.increment(S)", S=S)
        assert waiting.result(5) == 0
        # and the awaitable form times out like the blocking one
        r, waited = a.call("""
            t0 = time.monotonic()
            r = await semaphore.decrement_async(S, wait=True, timeout=0.3)
            result = [r, time.monotonic() - t0]
        """, S=S)
        assert r == -1 and 0.25 <= waited < 1.5


def test_lock_async_waits_while_the_container_serves_other_connections(events, backend):
    M = uniq("mtx")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert b.call("mutex.access(M).lock()", M=M) is True
        waiting = a.start("await mutex.access(M).lock_async(timeout=20)", M=M)
        c.wait_waiters(M, 1)
        time.sleep(0.15)
        assert a.call("'pong'", timeout=3) == "pong"
        assert not waiting.done()
        b.call("mutex.access(M).unlock()", M=M)
        assert waiting.result(5) is True
        assert b.call("mutex.access(M).lock(timeout=0)", M=M) is False
        assert a.call("await mutex.access(M).lock_async(timeout=0.2)", M=M) is False


def test_cancelled_decrement_async_leaks_nothing(events, backend):
    """A waiting task is cancelled; a later increment stays in the value."""
    S = uniq("sem")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert b.call("semaphore.create(S, 0)", S=S) is True
        a.call("store.__setitem__('t', asyncio.ensure_future("
               "semaphore.decrement_async(S, wait=True, timeout=30)))", S=S)
        c.wait_waiters(S, 1)
        time.sleep(0.15)
        assert a.call("""
            t = store['t']
            t.cancel()
            r = await asyncio.gather(t, return_exceptions=True)
            result = type(r[0]).__name__
        """) == "CancelledError"
        b.call("semaphore.increment(S)", S=S)
        settle(lambda: b.call("semaphore.get(S)", S=S) == 1, what="the increment kept")
        time.sleep(0.3)
        assert b.call("semaphore.get(S)", S=S) == 1


def test_client_disconnect_cancels_the_waiting_handler_and_leaks_nothing(events, backend):
    S = uniq("sem")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert b.call("semaphore.create(S, 0)", S=S) is True
        waiting = a.start("await semaphore.decrement_async(S, wait=True, timeout=30)", S=S)
        c.wait_waiters(S, 1)
        waiting.close()                       # the client goes away
        events.wait("abandoned", timeout=10)  # the handler was cancelled
        b.call("semaphore.increment(S)", S=S)
        settle(lambda: b.call("semaphore.get(S)", S=S) == 1, what="the increment kept")
        time.sleep(0.3)
        assert b.call("semaphore.get(S)", S=S) == 1
        assert a.call("semaphore.decrement(S)", S=S) == 0


def test_grant_that_crosses_a_cancel_is_given_back(events, backend):
    """The count is granted to a waiting task just before the task is
    cancelled (in the same loop turn): the count must come back."""
    S = uniq("sem")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert b.call("semaphore.create(S, 0)", S=S) is True
        a.call("store.__setitem__('t', asyncio.ensure_future("
               "semaphore.decrement_async(S, wait=True, timeout=30)))", S=S)
        c.wait_waiters(S, 1)
        assert a.call("""
            semaphore.increment(S)      # grants the count to the waiting task...
            t = store['t']
            t.cancel()                  # ... which is cancelled before it runs
            r = await asyncio.gather(t, return_exceptions=True)
            result = type(r[0]).__name__
        """, S=S) == "CancelledError"
        settle(lambda: b.call("semaphore.get(S)", S=S) == 1, what="the granted count given back")
        time.sleep(0.3)
        assert b.call("semaphore.get(S)", S=S) == 1


def test_lock_granted_to_a_cancelled_task_is_released(events, backend):
    M = uniq("mtx")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert b.call("mutex.access(M).lock()", M=M) is True
        a.call("store.__setitem__('t', asyncio.ensure_future(mutex.access(M).lock_async(timeout=30)))", M=M)
        c.wait_waiters(M, 1)
        assert a.call("""
            mutex.access(M).unlock(force=True)   # hands it to our waiting task...
            t = store['t']
            t.cancel()                  # ... which is cancelled before it runs
            r = await asyncio.gather(t, return_exceptions=True)
            result = type(r[0]).__name__
        """, M=M) == "CancelledError"
        settle(lambda: b.call("mutex.access(M).lock(timeout=0.2)", M=M) is True,
               what="the mutex released after the cancelled grant")


# --------------------------------------------------------------------------
# where calls work: hooks, timers, handlers, the controller
# --------------------------------------------------------------------------

HOOK_SEM = "t.hooks.sem"
HOOK_MTX = "t.hooks.mtx"
CTRL_SEM = "t.hooks.ctrl"


class EverywhereHooks(ActorHooks):
    def pre_start_hook(self, service, ctrl, container_id):
        super().pre_start_hook(service, ctrl, container_id)
        semaphore.increment(CTRL_SEM)              # in the controller process

    def on_start(self, cont):
        v = semaphore.increment(HOOK_SEM)
        with mutex.access(HOOK_MTX):
            inside = mutex.access(HOOK_MTX).lock(timeout=0)
        self.events.emit("hook", v=v, inside=inside, ctrl=semaphore.get(CTRL_SEM))

        def tick(timer):
            v = semaphore.increment(HOOK_SEM)
            ok = mutex.access(HOOK_MTX).lock(timeout=2)
            mutex.access(HOOK_MTX).unlock()
            d = semaphore.decrement(HOOK_SEM, wait=True, timeout=2)
            self.events.emit("timer", v=v, ok=ok, d=d)
            return False

        async def atick(timer):
            d = await semaphore.decrement_async(HOOK_SEM, wait=True, timeout=2)
            async with mutex.access(HOOK_MTX):
                pass
            self.events.emit("async_timer", d=d)
            return False
        cenv.create_timer(tick, 0.02)
        cenv.create_timer(atick, 0.2)

    def receive_message(self, cont, name, args):
        self.events.emit("message", v=semaphore.increment(HOOK_SEM), name=name)


def test_calls_work_from_hooks_timers_handlers_and_the_controller(events, backend):
    with cluster(events, backend, ["a"], hooks=EverywhereHooks) as c:
        hook = events.wait("hook", timeout=10)[0]
        assert hook["v"] == 1 and hook["inside"] is False and hook["ctrl"] == 1
        timer = events.wait("timer", timeout=10)[0]
        assert timer == {**timer, "v": 2, "ok": True, "d": 1}
        assert events.wait("async_timer", timeout=10)[0]["d"] == 0
        a = c["a"]
        assert a.call("cenv.send_message('a', 'hello', [])") is None
        assert events.wait("message", timeout=10)[0]["v"] == 1
        assert a.call("semaphore.get(HOOK_SEM)", HOOK_SEM=HOOK_SEM) == 1
        assert a.call("semaphore.get(CTRL_SEM)", CTRL_SEM=CTRL_SEM) == 1


# --------------------------------------------------------------------------
# bad arguments
# --------------------------------------------------------------------------

LONG_ASCII = "x" * 256
LONG_UTF8 = "é" * 128          # 256 bytes in UTF-8

BAD_CALLS = [
    # (call, exception, word the message must contain)
    ("semaphore.create(123)", TypeError, "name"),
    ("semaphore.create(b'abc')", TypeError, "name"),
    ("semaphore.create('')", ValueError, "name"),
    ("semaphore.create(LONG_ASCII)", ValueError, "name"),
    ("semaphore.create(LONG_UTF8)", ValueError, "name"),
    ("semaphore.create('a\\x00b')", ValueError, "name"),
    ("semaphore.increment(None)", TypeError, "name"),
    ("semaphore.increment('')", ValueError, "name"),
    ("semaphore.get(1.5)", TypeError, "name"),
    ("semaphore.get(LONG_UTF8)", ValueError, "name"),
    ("semaphore.decrement('a\\x00b')", ValueError, "name"),
    ("semaphore.destroy('')", ValueError, "name"),
    ("semaphore.create(FRESH, -1)", ValueError, "initial"),
    ("semaphore.create(FRESH, 2**63)", ValueError, "initial"),
    ("semaphore.create(FRESH, True)", TypeError, "initial"),
    ("semaphore.create(FRESH, 1.0)", TypeError, "initial"),
    ("semaphore.create(FRESH, 1, protected='yes')", TypeError, "protected"),
    ("semaphore.decrement(S, wait=1)", TypeError, "wait"),
    ("semaphore.decrement(S, wait='yes')", TypeError, "wait"),
    ("semaphore.decrement(S, wait=True, timeout=-1)", ValueError, "timeout"),
    ("semaphore.decrement(S, wait=True, timeout='x')", TypeError, "timeout"),
    ("semaphore.decrement(S, timeout=-1)", ValueError, "timeout"),
    ("semaphore.decrement(S, wait=True, timeout=float('nan'))", ValueError, "timeout"),
    ("mutex.access(123)", TypeError, "name"),
    ("mutex.access('')", ValueError, "name"),
    ("mutex.access(LONG_ASCII)", ValueError, "name"),
    ("mutex.access('a\\x00b')", ValueError, "name"),
    ("mutex.access(M).lock(timeout=-1)", ValueError, "timeout"),
    ("mutex.access(M).lock(timeout='x')", TypeError, "timeout"),
    ("mutex.access(M).lock(timeout=float('nan'))", ValueError, "timeout"),
    ("mutex.access(S).lock(timeout=0)", ValueError, "semaphore"),
    ("mutex.access(S).unlock()", ValueError, "semaphore"),
    ("semaphore.increment(M)", ValueError, "mutex"),
    ("semaphore.create(M)", ValueError, "mutex"),
    ("semaphore.get(M)", ValueError, "mutex"),
]


def test_bad_arguments_raise_type_or_value_error_naming_the_argument_and_change_nothing(events, backend):
    S, M, FRESH = uniq("sem"), uniq("mtx"), uniq("fresh")
    kw = dict(S=S, M=M, FRESH=FRESH, LONG_ASCII=LONG_ASCII, LONG_UTF8=LONG_UTF8)
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert a.call("semaphore.create(S, 3)", S=S) is True
        assert a.call("mutex.access(M).lock(timeout=0)", M=M) is True
        a.call("mutex.access(M).unlock()", M=M)
        failures = []
        for src, exc, word in BAD_CALLS:
            got = a.call(f"bad(lambda: {src})", **kw)
            if got is None:
                failures.append(f"{src}: no exception")
            elif not got[exc.__name__]:
                failures.append(f"{src}: {got['type']} ({got['msg']}), expected {exc.__name__}")
            elif word not in got["msg"]:
                failures.append(f"{src}: message {got['msg']!r} does not name {word!r}")
        assert not failures, "\n".join(failures)
        # nothing changed
        assert b.call("semaphore.get(S)", S=S) == 3
        assert b.call("semaphore.create(FRESH, 7)", FRESH=FRESH) is True
        assert a.call("semaphore.get(FRESH)", FRESH=FRESH) == 7
        assert b.call("mutex.access(M).lock(timeout=0)", M=M) is True
        assert a.call("mutex.access(M).lock(timeout=0)", M=M) is False
        # boundaries that are valid
        assert a.call("semaphore.create('x' * 255, 2**63 - 1)") is True
        assert a.call("semaphore.get('é' * 127)") == 0
        assert a.call("semaphore.decrement(S, wait=True, timeout=0)", S=S) == 2


@pytest.mark.parametrize("timeout", ["-1", "'x'", "float('nan')"])
def test_lock_with_a_bad_timeout_on_a_free_mutex_raises_and_does_not_lock(events, backend, timeout):
    """The timeout is checked before anything is taken, also when the mutex is free."""
    M = uniq("mtx")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert a.call("[mutex.access(M).lock(timeout=0), mutex.access(M).unlock()]", M=M) == [True, None]
        err = a.error(f"mutex.access(M).lock(timeout={timeout})", M=M)
        assert "TypeError" in err.mro or "ValueError" in err.mro
        assert "timeout" in err.msg
        assert b.call("mutex.access(M).lock(timeout=0)", M=M) is True, "the failed call locked the mutex"


@pytest.mark.parametrize("timeout", ["-1", "'x'"])
def test_decrement_with_a_bad_timeout_on_a_positive_semaphore_raises_and_takes_nothing(events, backend, timeout):
    S = uniq("sem")
    with cluster(events, backend, ["a"]) as c:
        a = c["a"]
        assert a.call("semaphore.create(S, 2)", S=S) is True
        for wait in (True, False):
            err = a.error(f"semaphore.decrement(S, wait={wait}, timeout={timeout})", S=S)
            assert "TypeError" in err.mro or "ValueError" in err.mro
            assert "timeout" in err.msg
            err = a.error(f"await semaphore.decrement_async(S, wait={wait}, timeout={timeout})", S=S)
            assert "timeout" in err.msg
        assert a.call("semaphore.get(S)", S=S) == 2


CTRL_BAD = [
    ("semaphore.decrement(CS, wait='yes')", "wait"),
    ("semaphore.decrement(CS, wait=True, timeout=-1)", "timeout"),
    ("semaphore.decrement(CS, timeout='x')", "timeout"),
    ("mutex.access(CM).lock(timeout=-1)", "timeout"),
    ("mutex.access(CM).lock(timeout='x')", "timeout"),
    ("semaphore.create('', 1)", "name"),
    ("semaphore.create(CS + '.n', -1)", "initial"),
]
CTRL_S = "t.ctrl.bad.sem"
CTRL_M = "t.ctrl.bad.mtx"


class ControllerBadArgsHooks(ActorHooks):
    """Runs bad calls in the controller process (pre_start_hook) and reports."""

    def pre_start_hook(self, service, ctrl, container_id):
        super().pre_start_hook(service, ctrl, container_id)
        if semaphore.create(CTRL_S, 2) is False:
            return
        out = []
        for src, word in CTRL_BAD:
            try:
                eval(src, {"semaphore": semaphore, "mutex": mutex, "CS": CTRL_S, "CM": CTRL_M})
                out.append([src, None, ""])
            except (TypeError, ValueError) as e:
                out.append([src, type(e).__name__, str(e)[:100]])
            except Exception as e:
                out.append([src, "other:" + type(e).__name__, str(e)[:100]])
        self.events.emit("ctrl_bad", out=out, value=semaphore.get(CTRL_S),
                         free=mutex.access(CTRL_M).lock(timeout=0))
        mutex.access(CTRL_M).unlock()


def test_bad_arguments_in_the_controller_raise_before_anything_is_taken(events, backend):
    with cluster(events, backend, ["a"], hooks=ControllerBadArgsHooks) as c:
        got = events.wait("ctrl_bad", timeout=10)[0]
        failures = [f"{src}: {typ} {msg!r}" for (src, typ, msg), (_, word) in zip(got["out"], CTRL_BAD)
                    if typ not in ("TypeError", "ValueError") or word not in msg]
        assert not failures, "\n".join(failures)
        assert got["value"] == 2, "a failed decrement in the controller took a count"
        assert got["free"] is True, "a failed lock in the controller locked the mutex"
        assert c["a"].call("semaphore.get(CS)", CS=CTRL_S) == 2


@pytest.mark.parametrize("timeout", ["math.inf", "1e300", "2**70", "9.3e9"])
def test_huge_and_infinite_timeouts_wait_like_none(events, backend, timeout):
    """Timeouts: None or any non-negative number, math.inf included: a huge one waits
    (it is never an OverflowError), for every blocking call and its awaitable form."""
    S, M = uniq("sem"), uniq("mtx")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert a.call("semaphore.create(S, 2)", S=S) is True
        assert a.call(f"result = semaphore.decrement(S, wait=True, timeout={timeout})",
                      S=S) == 1
        assert a.call(f"result = await semaphore.decrement_async(S, wait=True, "
                      f"timeout={timeout})", S=S) == 0
        assert a.call(f"result = mutex.access(M).lock(timeout={timeout})", M=M) is True
        pending = b.start(f"result = await mutex.access(M).lock_async(timeout={timeout})",
                          M=M)
        c.wait_waiters(M, 1)
        a.call("mutex.access(M).unlock()", M=M)
        assert pending.result(10) is True
