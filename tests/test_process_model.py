"""The process model: serving, supervision (reap, restart, back-off, disable),
the containers' fate when the controller dies, orderly shutdown, the admin
socket, and a misbehaving container channel.

Every test runs a real controller in a forked process (``run_controller``);
the controller and its containers report through ``Events``; crashes are real
SIGKILLs.
"""

import logging
import os
import shutil
import signal
import socket
import struct
import tempfile
import time

import pytest

import netplex_native as netplex
from netplex_native import admin, cenv, semaphore
from harness import exchange, request, plugins_for, run_controller, free_port, pid_alive, wait_until, shm_entries


# ---------------------------------------------------------------- helpers

class _EventLog(logging.Handler):
    """Forwards the library's log records as "log" events (from any process)."""

    def __init__(self, events):
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record):
        try:
            self.events.emit("log", level=record.levelname, msg=record.getMessage()[:300])
        except Exception:
            pass


def _log_to_events(events) -> None:
    lg = logging.getLogger("netplex_native")
    lg.setLevel(logging.INFO)
    lg.addHandler(_EventLog(events))


class Recorder(netplex.ProcessorHooks):
    """Emits one event per hook, with the process and container it ran in."""

    def __init__(self, events, plugins=()):
        self.events = events
        self.plugins = plugins

    def post_add_hook(self, service, ctrl):
        for p in self.plugins:
            ctrl.add_plugin(p)
        self.events.emit("post_add", service=service.name)

    def pre_start_hook(self, service, ctrl, container_id):
        self.events.emit("pre_start", service=service.name, cid=container_id, socket_dir=ctrl.socket_dir)

    def post_start_hook(self, cont):
        self.events.emit("started", service=cont.service_name, cid=cont.id, cpid=cont.pid)

    def pre_finish_hook(self, cont):
        self.events.emit("pre_finish", service=cont.service_name, cid=cont.id)

    def post_finish_hook(self, service, ctrl, container_id):
        self.events.emit("post_finish", service=service.name, cid=container_id)

    def post_rm_hook(self, service, ctrl):
        self.events.emit("post_rm", service=service.name)

    def system_shutdown(self):
        self.events.emit("system_shutdown", cid=cenv.self_cont().id)

    def shutdown(self):
        self.events.emit("shutdown", cid=cenv.self_cont().id)

    def receive_admin_message(self, cont, name, args):
        self.events.emit("admin_message", cid=cont.id, name=name, args=args)

    def receive_message(self, cont, name, args):
        self.events.emit("message", cid=cont.id, name=name, args=args)


def _idx(events, kind, **match):
    """Positions in the (pipe-ordered) event stream of the events of *kind*."""
    return [i for i, e in enumerate(events.seen) if e["kind"] == kind
            and all(e.get(k) == v for k, v in match.items())]


def _gone(pid: int) -> bool:
    """Reaped (no /proc entry at all), not merely a zombie."""
    return not os.path.exists(f"/proc/{pid}")


@pytest.fixture
def short_dir():
    """A short directory for unix sockets (sun_path is at most 107 bytes)."""
    d = tempfile.mkdtemp(prefix="npt-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def who_handler(reader, writer):
    """Answers one line with "<container id> <pid>"."""
    await reader.readline()
    writer.write(f"{cenv.self_cont().id} {os.getpid()}\n".encode())
    await writer.drain()


def _admin_list(socket_dir):
    r = admin.request(socket_dir, {"cmd": "list"}, timeout=5)
    assert r["ok"], r
    return r


def _service(status, name):
    return next(s for s in status["services"] if s["name"] == name)


def _wait_admin(socket_dir, timeout=10.0):
    assert wait_until(lambda: os.path.exists(os.path.join(socket_dir, "admin.sock")), timeout), \
        "the admin socket never appeared"


# ---------------------------------------------------------------- serving

@pytest.mark.timeout(40)
def test_tcp_service_on_port_0_serves_from_several_containers(events, socket_dir):
    """Port 0 is resolved and shown by admin list; while one container is busy
    (its loop blocked) the next connection is served by another container."""

    async def slow_handler(reader, writer):
        await reader.readline()
        events.emit("serving", cid=cenv.self_cont().id)
        time.sleep(0.8)  # block this container's loop: it cannot accept meanwhile
        writer.write(f"{cenv.self_cont().id} {os.getpid()}\n".encode())
        await writer.drain()

    def build():
        ctrl = netplex.Controller(socket_dir)
        ctrl.add_service(netplex.Service("web", slow_handler, hooks=Recorder(events),
                                         address="tcp://127.0.0.1:0", workers=3))
        return ctrl

    with run_controller(build) as proc:
        events.wait("started", count=3, timeout=10)
        addr = _service(_admin_list(socket_dir), "web")["address"]
        assert addr.startswith("tcp://127.0.0.1:")
        port = int(addr.rpartition(":")[2])
        assert port != 0
        conns = []
        try:
            for i in range(3):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                conns.append(s)
                s.sendall(b"hi\n")
                events.wait("serving", count=i + 1, timeout=5)
            answers = []
            for s in conns:
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(4096)
                    assert chunk, "connection closed without an answer"
                    buf += chunk
                answers.append(buf.decode().split())
        finally:
            for s in conns:
                s.close()
        served_by = {cid for cid, _ in answers}
        assert len(served_by) == 3, f"expected 3 distinct containers, got {answers}"
        started = {e["cid"]: e["cpid"] for e in events.all("started")}
        assert all(started[cid] == int(pid) for cid, pid in answers), "answer pid does not match container"
        # and a plain request still works afterwards
        assert request(("127.0.0.1", port), "hi").split()[0] in served_by
        assert proc.stop() == 0


@pytest.mark.timeout(40)
def test_tcp_service_answers_many_sequential_requests(events):
    port = free_port()

    def build():
        ctrl = netplex.Controller()
        ctrl.add_service(netplex.Service("who", who_handler, hooks=Recorder(events),
                                         address=f"tcp://127.0.0.1:{port}", workers=2))
        return ctrl

    with run_controller(build) as proc:
        events.wait("started", count=2, timeout=10)
        cids = {e["cid"] for e in events.all("started")}
        for _ in range(50):
            cid, _pid = request(("127.0.0.1", port), "hi").split()
            assert cid in cids
        assert proc.stop() == 0


@pytest.mark.timeout(40)
def test_unix_service_serves_and_its_socket_file_is_removed_at_shutdown(events, short_dir):
    path = os.path.join(short_dir, "u.sock")

    class LookupHooks(Recorder):
        def post_start_hook(self, cont):
            super().post_start_hook(cont)
            self.events.emit("lookup", cid=cont.id, unix=cenv.lookup("usvc"),
                             unix_proto=cenv.lookup("usvc", "unix"),
                             tcp=cenv.lookup("tsvc"), missing=cenv.lookup("nosuch"))

    def build():
        ctrl = netplex.Controller()
        ctrl.add_service(netplex.Service("usvc", who_handler, hooks=Recorder(events),
                                         address=f"unix://{path}", workers=2))
        ctrl.add_service(netplex.Service("tsvc", who_handler, hooks=Recorder(events),
                                         address="tcp://127.0.0.1:0"))
        ctrl.add_service(netplex.Service("client", hooks=LookupHooks(events)))
        return ctrl

    with run_controller(build) as proc:
        events.wait("started", count=4, timeout=10)
        lk = events.wait("lookup", timeout=5)[0]
        assert lk["unix"] == path, "cenv.lookup must give another service's unix path"
        assert lk["unix_proto"] == path
        assert lk["tcp"] is None and lk["missing"] is None
        ucids = {e["cid"] for e in events.all("started", service="usvc")}
        for _ in range(10):
            assert request(path, "hi").split()[0] in ucids
        assert os.path.exists(path)
        assert proc.stop() == 0
        assert not os.path.exists(path), "the unix socket file was left behind"


# ---------------------------------------------------------------- supervision

@pytest.mark.timeout(40)
def test_killed_container_is_reaped_and_restarted(events, socket_dir):
    def build():
        ctrl = netplex.Controller(socket_dir)
        ctrl.add_service(netplex.Service("work", hooks=Recorder(events), workers=3))
        return ctrl

    with run_controller(build) as proc:
        started = events.wait("started", count=3, timeout=10)
        victims = [started[0]["cpid"], started[1]["cpid"]]
        for n, victim in enumerate(victims):
            os.kill(victim, signal.SIGKILL)
            events.wait("post_finish", count=n + 1, timeout=5)
            events.wait("started", count=4 + n, timeout=5)
            assert wait_until(lambda: _gone(victim), 5), f"container {victim} was not reaped"
        st = _service(_admin_list(socket_dir), "work")
        pids = {c["pid"] for c in st["containers"]}
        assert len(pids) == 3, st
        assert not pids & set(victims)
        assert all(pid_alive(p) for p in pids)
        assert st["restarts"] == 2
        assert not st["disabled"]
        # a killed container ends irregularly: no pre_finish_hook ran for it
        assert events.all("pre_finish") == []
        assert proc.stop() == 0


class DiesAtStart(Recorder):
    def post_start_hook(self, cont):
        self.events.emit("attempt", cid=cont.id)
        os._exit(3)


@pytest.mark.timeout(40)
def test_service_failing_at_start_is_disabled_after_10_failures(events, socket_dir):
    def build():
        _log_to_events(events)
        ctrl = netplex.Controller(socket_dir, max_start_failures=10, backoff=(0.01, 0.05))
        ctrl.add_service(netplex.Service("bad", hooks=DiesAtStart(events)))
        ctrl.add_service(netplex.Service("good", hooks=Recorder(events)))
        return ctrl

    with run_controller(build) as proc:
        events.wait("attempt", count=10, timeout=15)
        assert wait_until(lambda: any("disabled" in e["msg"] and "bad" in e["msg"]
                                      for e in events.poll(0.05) if e["kind"] == "log"), 5), \
            "the log does not say the service was disabled"
        events.poll(1.0)  # no further attempts after it was disabled
        assert len(events.all("attempt")) == 10
        st = _admin_list(socket_dir)
        bad, good = _service(st, "bad"), _service(st, "good")
        assert bad["disabled"] is True and bad["containers"] == []
        assert good["disabled"] is False and len(good["containers"]) == 1
        assert proc.stop() == 0


@pytest.mark.timeout(40)
def test_restart_back_off_doubles_between_consecutive_start_failures(events, socket_dir):
    """Default-like back-off (0.1 s doubling): gaps of about 0.1, 0.2, 0.4, 0.8 s.
    Each gap is at least 0.9 x its step (the controller waits that long) and
    at most 0.5 s more; gaps are not compared with each other (a loaded
    machine delayed the first start by 0.17 s, past the second gap)."""

    def build():
        ctrl = netplex.Controller(socket_dir, max_start_failures=5, backoff=(0.1, 5.0))
        ctrl.add_service(netplex.Service("bad", hooks=DiesAtStart(events)))
        return ctrl

    with run_controller(build) as proc:
        att = events.wait("attempt", count=5, timeout=15)
        events.poll(0.5)
        assert len(events.all("attempt")) == 5
        ts = [e["t"] for e in att]
        gaps = [b - a for a, b in zip(ts, ts[1:])]
        for gap, expected in zip(gaps, (0.1, 0.2, 0.4, 0.8)):
            assert expected * 0.9 <= gap <= expected + 0.5, f"gaps {gaps}"
        assert _service(_admin_list(socket_dir), "bad")["disabled"] is True
        assert proc.stop() == 0


@pytest.mark.timeout(30)
def test_containers_exit_within_2s_when_the_controller_is_sigkilled(events):
    async def hang(reader, writer):  # a connection that never ends
        await asyncio_sleep_forever()

    def build():
        ctrl = netplex.Controller()
        ctrl.add_service(netplex.Service("a", hooks=Recorder(events), workers=3))
        ctrl.add_service(netplex.Service("b", hang, hooks=Recorder(events),
                                         address="tcp://127.0.0.1:0", workers=2))
        return ctrl

    with run_controller(build) as proc:
        pids = [e["cpid"] for e in events.wait("started", count=5, timeout=10)]
        assert all(pid_alive(p) for p in pids)
        proc.signal(signal.SIGKILL)
        t0 = time.monotonic()
        assert proc.wait(5) == -signal.SIGKILL
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), 2.5)
        elapsed = time.monotonic() - t0
        assert elapsed < 2.0, f"containers outlived the controller by {elapsed:.2f}s"
        assert [p for p in pids if pid_alive(p)] == []


async def asyncio_sleep_forever():
    import asyncio
    await asyncio.sleep(3600)


# ---------------------------------------------------------------- shutdown

def _assert_reference_shutdown_order(events, services: dict) -> None:
    """services: name -> number of containers."""
    n = sum(services.values())
    cids = {e["cid"] for e in events.all("started")}
    assert len(cids) == n
    ss, sd = _idx(events, "system_shutdown"), _idx(events, "shutdown")
    assert len(ss) == n and len(sd) == n, (len(ss), len(sd))
    assert {events.seen[i]["cid"] for i in ss} == cids
    assert max(ss) < min(sd), "a shutdown hook ran before every system_shutdown hook had run"
    ctrl_pid = events.all("post_add")[0]["pid"]
    for cid in cids:
        [s] = _idx(events, "shutdown", cid=cid)
        [pf] = _idx(events, "pre_finish", cid=cid)
        [pof] = _idx(events, "post_finish", cid=cid)
        assert s < pf < pof, f"{cid}: shutdown/pre_finish/post_finish out of order"
        cpid = events.all("started", cid=cid)[0]["cpid"]
        assert events.seen[pf]["pid"] == cpid, "pre_finish_hook must run in the container"
        assert events.seen[pof]["pid"] == ctrl_pid, "post_finish_hook must run in the controller"
    rm = _idx(events, "post_rm")
    assert sorted(events.seen[i]["service"] for i in rm) == sorted(services)
    assert all(events.seen[i]["pid"] == ctrl_pid for i in rm)
    assert min(rm) > max(_idx(events, "post_finish")), "post_rm_hook ran before every post_finish_hook"


def _leftover_shm(before: set, creator: int | None = None) -> set:
    """New netplex-* shm entries (others' tests may hold some briefly: wait a little);
    with creator, only the segments that process created (other processes on the
    machine may create segments meanwhile)."""
    from netplex_native.native import domain as _native
    left = set()

    def created_by(entry):
        try:
            d = _native.Domain.attach(entry)
        except Exception:
            return False                     # gone meanwhile, or not ours
        try:
            return _native._lib.np_domain_creator_pid(d._d) == creator
        finally:
            d.close()

    def check():
        nonlocal left
        left = {e for e in shm_entries() - before if creator is None or created_by(e)}
        return not left
    wait_until(check, 2.0, 0.05)
    return left


@pytest.mark.timeout(40)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_shuts_down_in_reference_order_and_exits_0(events, sig, socket_dir):
    """system_shutdown everywhere, then shutdown, pre_finish (container),
    post_finish (controller), post_rm; exit 0; nothing left behind."""
    shm_before = shm_entries()
    plugins = (semaphore.native_plugin,)   # its segment must be gone afterwards too
    private = sig == signal.SIGTERM   # one run with a private temp dir, one with a given dir

    def build():
        ctrl = netplex.Controller(None if private else socket_dir)
        ctrl.add_service(netplex.Service("alpha", hooks=Recorder(events, plugins), workers=2))
        ctrl.add_service(netplex.Service("beta", who_handler, hooks=Recorder(events, plugins),
                                         address="tcp://127.0.0.1:0", workers=2))
        return ctrl

    with run_controller(build) as proc:
        events.wait("started", count=4, timeout=10)
        sdir = events.all("pre_start")[0]["socket_dir"]
        assert os.path.exists(os.path.join(sdir, "admin.sock"))
        proc.signal(sig)
        assert proc.wait(15) == 0
    events.poll(0.1)
    _assert_reference_shutdown_order(events, {"alpha": 2, "beta": 2})
    assert not os.path.exists(os.path.join(sdir, "admin.sock"))
    if private:
        assert not os.path.exists(sdir), "the private socket dir was left behind"
    else:
        assert sdir == os.path.abspath(socket_dir) and os.path.isdir(sdir)
    assert _leftover_shm(shm_before, proc.pid) == set()
    assert all(not pid_alive(e["cpid"]) for e in events.all("started"))


@pytest.mark.timeout(40)
def test_system_shutdown_from_a_container_shuts_everything_down_in_order(events):
    class Trigger(Recorder):
        def post_start_hook(self, cont):
            super().post_start_hook(cont)
            if cont.id == "alpha.2":
                def fire(timer):
                    self.events.emit("trigger", cid=cont.id)
                    cenv.system_shutdown()
                    return False
                cenv.create_timer(fire, 0.3)

    def build():
        ctrl = netplex.Controller()
        ctrl.add_service(netplex.Service("alpha", hooks=Trigger(events), workers=2))
        ctrl.add_service(netplex.Service("beta", hooks=Recorder(events), workers=1))
        return ctrl

    with run_controller(build) as proc:
        events.wait("trigger", timeout=10)
        assert proc.wait(15) == 0
        sdir = events.all("pre_start")[0]["socket_dir"]
    events.poll(0.1)
    _assert_reference_shutdown_order(events, {"alpha": 2, "beta": 1})
    assert not os.path.exists(sdir)


# ---------------------------------------------------------------- admin socket

@pytest.mark.timeout(40)
def test_admin_list_inspect_message_restart_and_shutdown(events, socket_dir):
    def build():
        ctrl = netplex.Controller(socket_dir)
        ctrl.add_service(netplex.Service("app", hooks=Recorder(events, (semaphore.plugin,)), workers=2))
        ctrl.add_service(netplex.Service("other", hooks=Recorder(events), workers=1))
        return ctrl

    with run_controller(build) as proc:
        first = events.wait("started", count=3, timeout=10)
        _wait_admin(socket_dir)
        st = _admin_list(socket_dir)
        assert st["pid"] == proc.pid and st["state"] == "running"
        assert {s["name"] for s in st["services"]} == {"app", "other"}
        app = _service(st, "app")
        assert {c["pid"] for c in app["containers"]} == {e["cpid"] for e in first if e["service"] == "app"}

        ins = admin.request(socket_dir, {"cmd": "inspect"})
        assert ins["ok"] is True and semaphore.plugin.name in ins["plugins"], ins

        r = admin.request(socket_dir, {"cmd": "message", "pattern": "app", "name": "hello", "args": ["x", "y"]})
        assert r == {"ok": True, "delivered": 2}
        got = events.wait("admin_message", count=2, timeout=5)
        assert {e["cid"] for e in got} == {e["cid"] for e in first if e["service"] == "app"}
        assert all(e["name"] == "hello" and e["args"] == ["x", "y"] for e in got)
        assert events.all("message") == [], "an admin message reached receive_message"
        bad = admin.request(socket_dir, {"cmd": "message", "pattern": "app", "name": "n", "args": [1]})
        assert bad["ok"] is False

        r = admin.request(socket_dir, {"cmd": "restart", "service": "app"})
        assert r == {"ok": True, "restarted": 2}
        events.wait("pre_finish", count=2, timeout=10)
        events.wait("started", count=5, timeout=10)
        assert wait_until(lambda: len(_service(_admin_list(socket_dir), "app")["containers"]) == 2, 5)
        new = {c["pid"] for c in _service(_admin_list(socket_dir), "app")["containers"]}
        assert not new & {e["cpid"] for e in first}, "restart did not replace the containers"
        assert len(_service(_admin_list(socket_dir), "other")["containers"]) == 1
        assert admin.request(socket_dir, {"cmd": "restart", "service": "nosuch"})["ok"] is False
        assert admin.request(socket_dir, {"cmd": "frobnicate"})["ok"] is False

        assert admin.request(socket_dir, {"cmd": "shutdown"}) == {"ok": True}
        assert proc.wait(15) == 0
    assert not os.path.exists(os.path.join(socket_dir, "admin.sock"))


def _raw_admin(socket_dir, data: bytes, timeout=5.0) -> bytes:
    return exchange(os.path.join(socket_dir, "admin.sock"), data, until_eof=True, timeout=timeout)


@pytest.mark.timeout(40)
def test_garbage_on_the_admin_socket_gets_an_error_and_the_controller_stays_up(events, socket_dir):
    from netplex_native import wire

    def build():
        ctrl = netplex.Controller(socket_dir)
        ctrl.add_service(netplex.Service("app", hooks=Recorder(events), workers=1))
        return ctrl

    with run_controller(build) as proc:
        events.wait("started", timeout=10)
        _wait_admin(socket_dir)
        garbage = [
            struct.pack("!II", 2, 0),                       # impossible header
            struct.pack("!II", 0xFFFFFFFF, 3) + b"abc",     # absurd length
            struct.pack("!II", 7, 3) + b"{x]",              # not JSON
            struct.pack("!II", 8, 4) + b"\xff\xfe\x00\x01",  # not UTF-8
        ]
        for g in garbage:
            ans = _raw_admin(socket_dir, g)
            frames = wire.Decoder().feed(ans)
            assert frames, f"no answer to {g!r}"
            assert frames[0][0]["ok"] is False and "error" in frames[0][0]
        # well-formed frames that are not commands
        for obj in ([1, 2, 3], "list", {"cmd": 5}, {"nocmd": True}):
            r = wire.Decoder().feed(_raw_admin_one(socket_dir, wire.encode(obj)))
            assert r and r[0][0]["ok"] is False
        # a frame cut short, then the client goes away
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(os.path.join(socket_dir, "admin.sock"))
        s.sendall(struct.pack("!II", 100, 10) + b"[1,")
        s.close()
        assert proc.alive()
        st = _admin_list(socket_dir)
        assert len(_service(st, "app")["containers"]) == 1
        assert proc.stop() == 0


def _raw_admin_one(socket_dir, data: bytes) -> bytes:
    """Send one frame, read one answer frame, close."""
    from netplex_native import wire
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(os.path.join(socket_dir, "admin.sock"))
        s.sendall(data)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return buf
            buf += chunk
            if wire.Decoder().feed(buf):
                return buf
    finally:
        s.close()


def _connect_as(uid: int, path: str) -> str:
    """In a forked child running as *uid*: connect to *path*, send list; what happened."""
    from netplex_native import wire
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        out = "?"
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(path)
            except PermissionError:
                out = "EACCES"
            else:
                try:
                    s.sendall(wire.encode({"cmd": "list"}))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # refused before the request went out: read the refusal
                buf = b""
                while True:
                    try:
                        chunk = s.recv(65536)
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    buf += chunk
                frames = wire.Decoder().feed(buf)
                out = "answer:" + (repr(frames[0][0]) if frames else "none")
        except BaseException as e:
            out = f"error:{e!r}"
        finally:
            os.write(w, out.encode()[:4000])
            os._exit(0)
    os.close(w)
    try:
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
        return data.decode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)


@pytest.mark.timeout(40)
@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another uid")
def test_admin_socket_refuses_a_peer_of_another_uid(events, short_dir):
    """Two layers: the socket dir is 0700 (connect fails with EACCES); and
    when the file system would let the peer in, SO_PEERCRED refuses it."""
    socket_dir = os.path.join(short_dir, "s")

    def build():
        ctrl = netplex.Controller(socket_dir)
        ctrl.add_service(netplex.Service("app", hooks=Recorder(events), workers=1))
        return ctrl

    with run_controller(build) as proc:
        events.wait("started", timeout=10)
        _wait_admin(socket_dir)
        path = os.path.join(socket_dir, "admin.sock")
        assert os.stat(socket_dir).st_mode & 0o777 == 0o700
        assert os.stat(path).st_mode & 0o777 == 0o600
        os.chmod(short_dir, 0o755)
        assert _connect_as(65534, path) == "EACCES"
        # open the file system up: the uid check must still refuse
        os.chmod(socket_dir, 0o755)
        os.chmod(path, 0o666)
        try:
            out = _connect_as(65534, path)
        finally:
            os.chmod(socket_dir, 0o700)
            os.chmod(path, 0o600)
        assert out.startswith("answer:"), out
        assert "'ok': False" in out and "uid" in out, out
        assert "services" not in out
        assert _admin_list(socket_dir)["state"] == "running"
        assert proc.stop() == 0


# ---------------------------------------------------------------- container channel

@pytest.mark.timeout(40)
def test_garbage_on_a_container_channel_drops_that_container_only(events, socket_dir):
    port = free_port()

    class Garbage(Recorder):
        def post_start_hook(self, cont):
            super().post_start_hook(cont)
            if cont.id == "app.1":
                def fire(timer):
                    from netplex_native._context import ctx
                    self.events.emit("garbage", cid=cont.id)
                    ctx.channel.sock.send(b"\xff\xff\xff\xffnot a frame at all")
                    return False
                cenv.create_timer(fire, 0.3)
            else:
                def tick(timer):
                    self.events.emit("tick", cid=cont.id)
                    return True
                cenv.create_timer(tick, 0.05)

    def build():
        _log_to_events(events)
        ctrl = netplex.Controller(socket_dir)
        ctrl.add_service(netplex.Service("app", who_handler, hooks=Garbage(events),
                                         address=f"tcp://127.0.0.1:{port}", workers=3))
        return ctrl

    with run_controller(build) as proc:
        started = events.wait("started", count=3, timeout=10)
        bad = next(e["cpid"] for e in started if e["cid"] == "app.1")
        others = {e["cid"]: e["cpid"] for e in started if e["cid"] != "app.1"}
        events.wait("garbage", timeout=5)
        events.wait("post_finish", cid="app.1", timeout=5)
        events.wait("started", count=4, timeout=5)
        assert wait_until(lambda: _gone(bad), 5)
        assert any(e["kind"] == "log" and "app.1" in e["msg"] and "dropping" in e["msg"]
                   for e in events.seen)
        n = len(events.all("tick"))
        events.poll(0.5)
        assert {e["cid"] for e in events.all("tick")[n:]} >= set(others), "the others stopped running"
        assert all(pid_alive(p) for p in others.values())
        st = _service(_admin_list(socket_dir), "app")
        assert {c["id"] for c in st["containers"]} == set(others) | {"app.4"}
        for _ in range(10):
            assert request(("127.0.0.1", port), "hi").split()[0] in set(others) | {"app.4"}
        assert proc.stop() == 0


class BusyHooks(Recorder):
    """Each container's loop is blocked: in time.sleep, in a CPU loop, or in a
    synchronous semaphore wait, when the controller dies."""

    def post_start_hook(self, cont):
        super().post_start_hook(cont)
        mode = {"busy.1": "sleep", "busy.2": "spin", "busy.3": "wait"}[cont.id]

        def block(timer):
            self.events.emit("blocking", cid=cont.id, mode=mode)
            if mode == "sleep":
                time.sleep(30)
            elif mode == "spin":
                end = time.monotonic() + 30
                while time.monotonic() < end:
                    pass
            else:
                semaphore.decrement("busy.never", wait=True)
            return False
        cenv.create_timer(block, 0.05)

    def global_exception_handler(self, exc):
        return True


@pytest.mark.timeout(40)
def test_containers_blocked_in_their_loop_exit_within_2s_when_the_controller_is_sigkilled(events):
    """The documented hard limit ("within 2 s at the latest") also holds for a
    container whose loop is blocked (sleep, CPU, synchronous wait)."""

    def build():
        ctrl = netplex.Controller()
        ctrl.add_service(netplex.Service("busy", hooks=BusyHooks(events, (semaphore.plugin,)), workers=3))
        return ctrl

    with run_controller(build) as proc:
        blocked = events.wait("blocking", count=3, timeout=10)
        pids = {e["cid"]: e["pid"] for e in blocked}
        events.poll(0.2)
        proc.signal(signal.SIGKILL)
        t0 = time.monotonic()
        assert proc.wait(5) == -signal.SIGKILL
        wait_until(lambda: not any(pid_alive(p) for p in pids.values()), 2.5)
        alive = {cid: p for cid, p in pids.items() if pid_alive(p)}
        for p in alive.values():
            os.kill(p, signal.SIGKILL)
        assert alive == {}, f"still alive {time.monotonic() - t0:.1f}s after the controller died: {alive}"


class FlakyPreStart(Recorder):
    def __init__(self, events, fail_times):
        super().__init__(events)
        self.fail_times = fail_times
        self.calls = 0

    def pre_start_hook(self, service, ctrl, container_id):
        super().pre_start_hook(service, ctrl, container_id)
        self.calls += 1
        if self.calls <= self.fail_times:
            raise RuntimeError("pre_start_hook fails")


@pytest.mark.timeout(40)
def test_a_container_whose_pre_start_hook_failed_once_is_started_again(events, socket_dir):
    """A failing pre_start_hook is a start failure: the workload manager
    retries (with back-off) rather than leaving the service short for ever."""

    def build():
        ctrl = netplex.Controller(socket_dir, backoff=(0.01, 0.05))
        ctrl.add_service(netplex.Service("flaky", hooks=FlakyPreStart(events, 1), workers=1))
        return ctrl

    with run_controller(build) as proc:
        events.wait("pre_start", timeout=10)
        events.wait("started", timeout=3)
        st = _service(_admin_list(socket_dir), "flaky")
        assert len(st["containers"]) == 1 and not st["disabled"]
        assert proc.stop() == 0


@pytest.mark.timeout(40)
def test_a_service_whose_pre_start_hook_always_fails_is_disabled(events, socket_dir):
    def build():
        _log_to_events(events)
        ctrl = netplex.Controller(socket_dir, max_start_failures=10, backoff=(0.01, 0.05))
        ctrl.add_service(netplex.Service("never", hooks=FlakyPreStart(events, 10**6), workers=1))
        return ctrl

    with run_controller(build) as proc:
        events.wait("pre_start", count=10, timeout=10)
        events.poll(0.5)
        assert len(events.all("pre_start")) == 10
        assert events.all("started") == []
        assert _service(_admin_list(socket_dir), "never")["disabled"] is True
        assert proc.stop() == 0


@pytest.mark.timeout(40)
def test_admin_restart_enables_a_disabled_service_again(events, socket_dir):
    def build():
        ctrl = netplex.Controller(socket_dir, max_start_failures=3, backoff=(0.01, 0.05))
        ctrl.add_service(netplex.Service("bad", hooks=DiesAtStart(events)))
        return ctrl

    with run_controller(build) as proc:
        events.wait("attempt", count=3, timeout=10)
        assert wait_until(lambda: _service(_admin_list(socket_dir), "bad")["disabled"], 5)
        events.poll(0.3)
        assert len(events.all("attempt")) == 3
        admin.request(socket_dir, {"cmd": "restart", "service": "bad"})
        events.wait("attempt", count=6, timeout=10)
        assert wait_until(lambda: _service(_admin_list(socket_dir), "bad")["disabled"], 5)
        events.poll(0.3)
        assert len(events.all("attempt")) == 6
        assert proc.stop() == 0


@pytest.mark.timeout(40)
def test_unix_socket_left_by_a_killed_controller_is_replaced_by_the_next(events, short_dir):
    path = os.path.join(short_dir, "stale.sock")

    def build():
        ctrl = netplex.Controller()
        ctrl.add_service(netplex.Service("u", who_handler, hooks=Recorder(events), address=f"unix://{path}"))
        return ctrl

    with run_controller(build) as proc:
        first = events.wait("started", timeout=10)[0]
        proc.signal(signal.SIGKILL)
        proc.wait(5)
        assert wait_until(lambda: not pid_alive(first["cpid"]), 3)
    assert os.path.exists(path)  # stale: nobody listens
    with run_controller(build) as proc:
        second = events.wait("started", count=2, timeout=10)[1]
        assert request(path, "hi").split()[0] == second["cid"]
        assert proc.stop() == 0
    assert not os.path.exists(path)


@pytest.mark.timeout(40)
def test_a_second_controller_on_a_busy_socket_dir_fails_and_leaves_the_first_alone(events, short_dir):
    sdir = os.path.join(short_dir, "s")
    upath = os.path.join(short_dir, "second.sock")

    def build_first():
        ctrl = netplex.Controller(sdir)
        ctrl.add_service(netplex.Service("one", hooks=Recorder(events)))
        return ctrl

    def build_second():
        ctrl = netplex.Controller(sdir)
        ctrl.add_service(netplex.Service("two", who_handler, hooks=Recorder(events),
                                         address=f"unix://{upath}"))
        return ctrl

    with run_controller(build_first) as first:
        events.wait("started", timeout=10)
        _wait_admin(sdir)
        with run_controller(build_second) as second:
            assert second.wait(10) == 1, "the second controller must fail (exit code 1 from the harness)"
        assert events.all("started", service="two") == []
        assert first.alive()
        assert _admin_list(sdir)["pid"] == first.pid
        assert not os.path.exists(upath), "the failed controller left its unix socket file behind"
        assert first.stop() == 0


class CrashesAfterReady(Recorder):
    def post_start_hook(self, cont):
        super().post_start_hook(cont)
        cenv.create_timer(lambda t: os._exit(1), 0.01)


@pytest.mark.timeout(40)
def test_containers_crashing_right_after_start_are_restarted_with_back_off(events, socket_dir):
    """DESIGN: "back off on crash loops": a container that crashes 10 ms after
    a successful start, again and again, must not be re-forked at full speed."""

    def build():
        ctrl = netplex.Controller(socket_dir, backoff=(0.1, 5.0))
        ctrl.add_service(netplex.Service("loop", hooks=CrashesAfterReady(events)))
        return ctrl

    with run_controller(build) as proc:
        events.wait("started", timeout=10)
        events.poll(2.0)
        n = len(events.all("started"))
        # with 0.1 s doubling back-off: starts at about 0, 0.1, 0.3, 0.7, 1.5 s
        assert n <= 8, f"{n} restarts in 2 s: no back-off on a crash loop"
        assert proc.stop() == 0


@pytest.mark.timeout(40)
def test_a_second_controller_failing_to_bind_keeps_the_first_ones_admin_socket(events, short_dir):
    """Same socket dir, same tcp port: the second fails at bind and must not
    remove the first controller's admin.sock."""
    sdir = os.path.join(short_dir, "s")
    port = free_port()

    def build():
        ctrl = netplex.Controller(sdir)
        ctrl.add_service(netplex.Service("web", who_handler, hooks=Recorder(events),
                                         address=f"tcp://127.0.0.1:{port}"))
        return ctrl

    with run_controller(build) as first:
        events.wait("started", timeout=10)
        _wait_admin(sdir)
        with run_controller(build) as second:
            assert second.wait(10) == 1
        assert first.alive()
        assert os.path.exists(os.path.join(sdir, "admin.sock")), "the first controller's admin.sock was removed"
        assert _admin_list(sdir)["pid"] == first.pid
        assert first.stop() == 0


class BlockedInWait(Recorder):
    def post_start_hook(self, cont):
        super().post_start_hook(cont)

        def block(timer):
            self.events.emit("blocking", cid=cont.id)
            r = semaphore.decrement("blocked.never", wait=True)
            self.events.emit("wait_ended", cid=cont.id, result=r)
            return False
        cenv.create_timer(block, 0.05)

    def global_exception_handler(self, exc):
        self.events.emit("geh", msg=repr(exc)[:200])
        return True


@pytest.mark.timeout(40)
def test_sigterm_ends_a_synchronous_wait_so_the_container_runs_its_shutdown_hooks(events, backend):
    """A container blocked in ``decrement(wait=True)`` at SIGTERM: the
    shutdown must reach it (system_shutdown, shutdown, pre_finish_hook), not
    time out and kill it after shutdown_timeout + 2 s."""

    def build():
        ctrl = netplex.Controller()
        ctrl.add_service(netplex.Service("blocked", hooks=BlockedInWait(events, plugins_for(backend)[:1])))
        return ctrl

    with run_controller(build) as proc:
        events.wait("blocking", timeout=10)
        t0 = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = proc.wait(15)
        took = time.monotonic() - t0
        events.poll(0.2)
        kinds = [e["kind"] for e in events.seen]
        assert code == 0
        assert "system_shutdown" in kinds and "shutdown" in kinds and "pre_finish" in kinds, \
            f"hooks that ran: {kinds} (shutdown took {took:.1f}s)"
        assert took < 4.0


def test_back_off_stays_bounded_after_thousands_of_quick_crashes():
    """A 60 s kill storm reached 1024 consecutive quick crashes: 2 ** 1023
    overflowed a float inside the SIGCHLD handler and reaping stalled."""
    import asyncio
    from netplex_native.controller import _ServiceState
    ctrl = netplex.Controller(backoff=(0.01, 0.05))
    loop = asyncio.new_event_loop()
    try:
        ctrl._loop, ctrl._state = loop, "running"
        st = _ServiceState(netplex.Service("svc", workers=1))
        for streak in (1, 31, 1024, 10**6):
            st.crash_streak = streak
            st.restart_handle = None
            ctrl._schedule_restart(st)
            assert st.restart_handle is not None
            assert st.restart_handle.when() - loop.time() <= 0.05 + 1e-3
            st.restart_handle.cancel()
    finally:
        ctrl._state = "stopped"
        loop.close()
