"""Real gunicorn and uvicorn serving real HTTP, with real SIGKILL/HUP/TERM:
the primitives of one netplex Domain stay crash-safe under both.

gunicorn is configured through exactly the documented import line
(``from netplex_native.gunicorn import on_starting, child_exit, on_exit``);
uvicorn workers run under ``python -m netplex_native.uvicorn``.  The app is
tests/webapps.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from harness import free_port
from netplex_native import Domain
from netplex_native.native import domain as _native

pytestmark = pytest.mark.timeout(150)

TESTS = os.path.dirname(os.path.abspath(__file__))
CONF = "from netplex_native.gunicorn import on_starting, child_exit, on_exit\n"


def _env() -> dict:
    env = dict(os.environ)
    env.pop("NETPLEX_DOMAIN", None)
    env["PYTHONPATH"] = os.pathsep.join([TESTS] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def http(port: int, path: str, timeout: float = 20.0) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def settle(cond, timeout: float = 20.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def children(pid: int) -> set[int]:
    out = set()
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    st = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(st[1]) == pid and st[0] not in "ZX":
                try:
                    with open(f"/proc/{e}/cmdline", "rb") as f:
                        if b"resource_tracker" in f.read():
                            continue            # multiprocessing's helper, not a worker
                except OSError:
                    continue
                out.add(int(e))
    return out


def segments_created_by(pid: int) -> list[str]:
    """Our segments in /dev/shm whose recorded creator is *pid*."""
    found = []
    out = _native._ffi.new("np_domain **")
    for e in os.listdir("/dev/shm"):
        if not e.startswith("netplex-"):
            continue
        if _native._lib.np_domain_attach(("/" + e).encode(), out) < 0:
            continue
        try:
            if _native._lib.np_domain_creator_pid(out[0]) == pid:
                found.append("/" + e)
        finally:
            _native._lib.np_domain_close(out[0])
    return found


def shm_exists(name: str) -> bool:
    return os.path.exists("/dev/shm" + name)


class Server:
    def __init__(self, tmp, kind: str, workers: int = 2):
        self.port = free_port()
        self.log = tmp / f"{kind}-{self.port}.log"
        if kind == "gunicorn":
            conf = tmp / "gunicorn.conf.py"
            conf.write_text(CONF)
            cmd = [sys.executable, "-m", "gunicorn", "-c", str(conf), "--chdir", TESTS,
                   "-w", str(workers), "-b", f"127.0.0.1:{self.port}", "--graceful-timeout", "5",
                   "--timeout", "60", "webapps:wsgi_app"]
        else:
            cmd = [sys.executable, "-m", "netplex_native.uvicorn", "webapps:asgi_app",
                   "--app-dir", TESTS, "--workers", str(workers), "--port", str(self.port),
                   "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     env=_env(), cwd=str(tmp))
        self.wait_serving()

    def text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_serving(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.text()}")
            try:
                http(self.port, "/info", timeout=2)
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"server not serving after {timeout}s:\n{self.text()}")

    def workers(self) -> set[int]:
        return children(self.proc.pid) - {self.proc.pid}

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not stop on {sig}:\n{self.text()}")

    def kill_all(self) -> None:
        ws = self.workers()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for w in ws:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def server(tmp_path):
    made = []

    def start(kind: str, workers: int = 2) -> Server:
        s = Server(tmp_path, kind, workers)
        made.append(s)
        return s
    yield start
    for s in made:
        s.kill_all()


def _killed_holders_give_back_and_term_cleans_up(srv: Server) -> None:
    seg = http(srv.port, "/info")["segment"]
    assert shm_exists(seg)
    assert segments_created_by(srv.proc.pid) == [seg]
    # a worker SIGKILLed while it holds the mutex: the next request gets it, with a larger token
    held = http(srv.port, "/hold?name=m&timeout=5")
    assert held["ok"] is True and held["token"] >= 1
    os.kill(held["pid"], signal.SIGKILL)
    nxt = http(srv.port, "/try?name=m&timeout=20")
    assert nxt["ok"] is True and nxt["pid"] != held["pid"], nxt
    assert nxt["token"] > held["token"]
    # the protected semaphore: units taken by killed workers come back
    takers = set()
    for _ in range(2):
        r = http(srv.port, "/take?name=s&timeout=5")
        assert r["ok"] is True
        takers.add(r["pid"])
    assert http(srv.port, "/get?name=s")["value"] == 0
    for pid in takers:
        os.kill(pid, signal.SIGKILL)
    settle(lambda: http(srv.port, "/get?name=s")["value"] == 2, what="the killed workers' units back")
    # TERM: exits 0 and leaves nothing in /dev/shm
    assert srv.stop() == 0, srv.text()
    assert not shm_exists(seg)
    assert segments_created_by(srv.proc.pid) == []


def test_gunicorn_killed_workers_give_back_mutex_and_semaphore_and_term_unlinks(server):
    _killed_holders_give_back_and_term_cleans_up(server("gunicorn"))


def test_uvicorn_killed_workers_give_back_mutex_and_semaphore_and_term_unlinks(server):
    _killed_holders_give_back_and_term_cleans_up(server("uvicorn"))


def test_uvicorn_awaitable_waits_keep_the_worker_serving(server):
    """A request waiting for a held mutex does not block its worker's loop:
    with one worker, other requests are answered meanwhile, and the waiter is
    granted the mutex when its holder releases it."""
    srv = server("uvicorn", workers=1)
    import threading
    assert http(srv.port, "/hold?name=w&timeout=5")["ok"] is True     # the only worker holds w
    # not recursive: the holder's own second lock times out, nothing taken
    assert http(srv.port, "/try?name=w&timeout=0.3")["ok"] is False
    res = {}
    t = threading.Thread(target=lambda: res.update(http(srv.port, "/try?name=w&timeout=60")))
    t.start()
    time.sleep(0.3)
    assert http(srv.port, "/info", timeout=30)["segment"]
    # the waiter ends only by the release below (or its 60 s timeout)
    assert t.is_alive(), "/info was answered only after the waiting request ended: the loop blocked"
    assert http(srv.port, "/release?name=w")["ok"] is True
    t.join(30)
    assert res["ok"] is True, res               # the awaiting request got it once released


@pytest.mark.parametrize("kind", ["gunicorn", "uvicorn"])
def test_hup_keeps_the_one_segment_and_never_two_holders(server, kind):
    srv = server(kind)
    seg = http(srv.port, "/info")["segment"]
    held = http(srv.port, "/hold?name=h&timeout=5")
    assert held["ok"] is True
    old = srv.workers()
    srv.proc.send_signal(signal.SIGHUP)
    # the old workers are replaced; while the holder lives nobody else gets h
    settle(lambda: not (srv.workers() & old), timeout=60, what="old workers replaced")
    nxt = http(srv.port, "/try?name=h&timeout=20")
    assert nxt["ok"] is True and nxt["token"] > held["token"], nxt
    for _ in range(4):
        assert http(srv.port, "/info")["segment"] == seg
    assert segments_created_by(srv.proc.pid) == [seg]
    assert srv.stop() == 0, srv.text()
    assert not shm_exists(seg)


@pytest.mark.parametrize("kind", ["gunicorn", "uvicorn"])
def test_a_sigkilled_masters_segment_is_removed_at_the_next_start(server, kind):
    first = server(kind)
    seg = http(first.port, "/info")["segment"]
    first.kill_all()                            # master and workers SIGKILLed
    assert shm_exists(seg)                      # nobody unlinked it
    second = server(kind)
    assert http(second.port, "/info")["segment"] != seg
    assert not shm_exists(seg)
    assert second.stop() == 0, second.text()


def test_uvicorn_supervisor_stops_with_status_3_when_workers_cannot_start(tmp_path):
    """An app that does not import: the crash loop is backed off and ends."""
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "netplex_native.uvicorn", "no_such_module:app",
                          "--workers", "1", "--port", str(port), "--log-level", "critical"],
                         env=_env(), cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        assert p.wait(120) == 3
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert segments_created_by(p.pid) == []


def _is_master(pid: int) -> bool:
    """A gunicorn master: the re-executed one is a child of the old master,
    told from its workers by its process title (or, without setproctitle, by
    having children of its own)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"gunicorn: master" in cmd or (b"gunicorn: worker" not in cmd and bool(children(pid)))


def test_gunicorn_binary_upgrade_usr2_shares_the_segment_and_never_two_holders(server):
    """USR2 starts a new master beside the old one (both serve): the new
    master's workers use the same segment, so a mutex held by an old worker
    is not granted to a new one; the old master's exit leaves the segment to
    the new master, whose TERM removes it."""
    srv = server("gunicorn")
    old_master = srv.proc.pid
    seg = http(srv.port, "/info")["segment"]
    held = http(srv.port, "/hold?name=u&timeout=5")
    assert held["ok"] is True
    srv.proc.send_signal(signal.SIGUSR2)
    new_master = []

    def upgraded():
        new_master[:] = [c for c in children(old_master) if _is_master(c)]
        return bool(new_master) and len(children(new_master[0])) >= 2
    settle(upgraded, timeout=60, what="the upgraded master and its workers")
    new_workers = children(new_master[0])
    seen = set()
    for _ in range(40):                           # old and new workers answer in turn
        r = http(srv.port, "/try?name=u&timeout=0.05")
        assert r["ok"] is False, r                # held by the old worker: nobody else
        seen.add(r["pid"])
        assert http(srv.port, "/info")["segment"] == seg
        if seen & new_workers:
            break
    assert seen & new_workers, "no request reached the new workers"
    srv.proc.send_signal(signal.SIGTERM)          # the old master goes, workers and all
    assert srv.proc.wait(30) == 0
    assert shm_exists(seg)                        # left to the new master
    # Its creator (the old master) is dead, but the new master attached to it:
    # another supervisor's create must not take it for stale.
    other = Domain.create(semaphores=2, mutexes=2, processes=2, export=False)
    other.unlink()
    other.close()
    assert shm_exists(seg), "a live master's segment was removed as stale"
    nxt = http(srv.port, "/try?name=u&timeout=20")
    assert nxt["ok"] is True and nxt["pid"] in new_workers and nxt["token"] > held["token"]
    os.kill(new_master[0], signal.SIGTERM)
    settle(lambda: not os.path.exists(f"/proc/{new_master[0]}"), timeout=30, what="new master gone")
    assert not shm_exists(seg)
