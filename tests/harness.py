"""Test harness: real controllers in forked processes, events over a pipe.

``Events``: any process (controller, containers) calls ``events.emit(kind,
**fields)``; one JSON line per ``os.write`` (atomic below PIPE_BUF), so lines
from different processes never interleave.  The test process reads them with
bounded waits.

``run_controller(build)``: forks a process that calls ``build()`` (which
returns a Controller) and ``run()``; the context manager stops it on exit
(SIGTERM, then SIGKILL) and reaps it, even when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import time
import traceback


BACKENDS = ["rpc", "native"]


#: The etcd backend of the running test (set by the ``etcd_backend`` fixture;
#: forked controllers inherit it).
ETCD = None


def plugins_for(backend: str):
    """(semaphore plugin, mutex plugin) for a backend name."""
    from netplex_native import semaphore, mutex
    if backend == "etcd":
        assert ETCD is not None, "the etcd backend needs the etcd_backend fixture"
        return ETCD.semaphore_plugin, ETCD.mutex_plugin
    if backend == "rpc":
        return semaphore.plugin, mutex.plugin
    if backend == "native":
        return semaphore.native_plugin, mutex.native_plugin
    raise ValueError(backend)


class Events:
    def __init__(self):
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.seen: list[dict] = []
        self._buf = b""

    def emit(self, kind: str, **fields) -> None:
        fields["kind"] = kind
        fields.setdefault("pid", os.getpid())
        fields["t"] = time.monotonic()
        data = (json.dumps(fields) + "\n").encode()
        assert len(data) < select.PIPE_BUF, "event too large for an atomic pipe write"
        os.write(self.w, data)

    def _pump(self, timeout: float) -> None:
        r, _, _ = select.select([self.r], [], [], max(0.0, timeout))
        if not r:
            return
        while True:
            try:
                chunk = os.read(self.r, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            if line:
                self.seen.append(json.loads(line))

    def poll(self, duration: float = 0.0) -> list[dict]:
        """Read for *duration* seconds; all events so far."""
        deadline = time.monotonic() + duration
        while True:
            self._pump(deadline - time.monotonic())
            if time.monotonic() >= deadline:
                return self.seen

    def all(self, kind: str, **match) -> list[dict]:
        return [e for e in self.seen if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())]

    def wait(self, kind: str, timeout: float = 10.0, count: int = 1, **match) -> list[dict]:
        """Wait until *count* events of *kind* (with the given fields) were seen."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.all(kind, **match)
            if len(got) >= count:
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {count} x {kind} {match}; "
                                     f"saw {len(got)}; last events: {self.seen[-8:]}")
            self._pump(min(remaining, 0.1))

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


class ControllerProcess:
    def __init__(self, pid: int):
        self.pid = pid
        self.status = None

    def alive(self) -> bool:
        if self.status is not None:
            return False
        wpid, status = os.waitpid(self.pid, os.WNOHANG)
        if wpid == self.pid:
            self.status = status
            return False
        return True

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int | None:
        """Exit code (negative: killed by that signal), or None on timeout."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)
        st = self.status
        return -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)

    def stop(self, timeout: float = 15.0) -> int | None:
        self.signal(signal.SIGTERM)
        code = self.wait(timeout)
        if code is None:
            self.signal(signal.SIGKILL)
            self.wait(5)
        return code


@contextlib.contextmanager
def run_controller(build):
    """Fork a controller built by ``build()``; yield its ControllerProcess."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ctrl = build()
            ctrl.run()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    proc = ControllerProcess(pid)
    try:
        yield proc
    finally:
        proc.stop()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def exchange(where, data: bytes, *, until_eof: bool = False, timeout: float = 5.0) -> bytes:
    """Send *data* to a TCP port (int, or (host, port)) or a Unix socket path
    and return what comes back: one line, or everything until the peer
    closes (*until_eof*)."""
    if isinstance(where, int):
        where = ("127.0.0.1", where)
    if isinstance(where, tuple):
        s = socket.create_connection(where, timeout=timeout)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(where)
    try:
        s.sendall(data)
        buf = b""
        while until_eof or not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        return buf
    finally:
        s.close()


def request(where, line: str, timeout: float = 5.0) -> str:
    """Send one line to a service and return its one-line answer."""
    return exchange(where, line.encode() + b"\n", timeout=timeout).decode().strip()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(cond, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def shm_entries(prefix: str = "netplex-") -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}
    except FileNotFoundError:
        return set()


def need_backend(backend: str) -> None:
    """Native tests require the compiled core; failing (not skipping) keeps CI honest."""
    if backend == "native":
        from netplex_native.native import domain as _native  # (ImportError = a broken build)
        assert _native.available(), "the native core is not built"


def fork_call(fn, *args) -> int:
    """Run ``fn(*args)`` in a forked child; it exits 0 if fn returned, 1 if it raised."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


@contextlib.contextmanager
def hog_on(cpu: int):
    """A process that keeps `cpu` busy (it never sleeps) while the block runs."""
    pid = os.fork()
    if pid == 0:
        try:
            os.sched_setaffinity(0, {cpu})
            while True:
                pass
        finally:
            os._exit(0)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
