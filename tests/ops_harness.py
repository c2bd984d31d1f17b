"""Shared by the operations tests: ``netplex-native run`` as a subprocess
(``Running``, the ``running`` fixture), the application it serves (``APP``)
and config snippets (``service``, ``CONTROLLER``)."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from harness import request, wait_until
from netplex_native import admin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "netplex_native"]

APP = '''
import asyncio, os
import netplex_native as netplex
from netplex_native import cenv

VERSION = "{version}"

async def handle(reader, writer):
    line = await reader.readline()
    c = cenv.self_cont()
    if line.strip() == b"MODULE":         # the VERSION of the module sys.modules has under our name
        import sys
        writer.write(f"{{getattr(sys.modules.get(__name__), 'VERSION', None)}}\\n".encode())
        return
    writer.write(f"{{c.id}} {{os.getpid()}} {{VERSION}}\\n".encode())
    await writer.drain()
    if line.strip() == b"HOLD":           # stay until the client closes
        await reader.read()

class FailBoot(netplex.ProcessorHooks):
    def post_start_hook(self, cont):
        raise RuntimeError("boom at boot")

from netplex_native import semaphore, mutex

class Holder(netplex.ProcessorHooks):
    def post_start_hook(self, cont):
        semaphore.create("ops.s", 2, protected=True)
        semaphore.decrement("ops.s")
        mutex.access("ops.m").lock()

import time

class FinishMark(netplex.ProcessorHooks):
    """pre_finish_hook leaves a file named finished.PID beside this module."""
    def pre_finish_hook(self, cont):
        open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"finished.{{cont.pid}}"), "w").close()

class FewFiles(netplex.ProcessorHooks):
    """Leaves the container room for two more open files."""
    def post_start_hook(self, cont):
        import resource
        n = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

class GatedBoot(netplex.ProcessorHooks):
    """Not ready while a file named 'gate' exists beside this module (30 s at most)."""
    def post_start_hook(self, cont):
        gate = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gate")
        deadline = time.monotonic() + 30
        while os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)
'''


def service(name, port, workers=1, hooks=None):
    extra = f'hooks = "ops_app:{hooks}"\n' if hooks else ""
    return (f'[[service]]\nname = "{name}"\nhandler = "ops_app:handle"\n{extra}'
            f'address = "tcp://127.0.0.1:{port}"\nworkers = {workers}\nplugins = "none"\n')


CONTROLLER = "[controller]\nshutdown_timeout = 2.0\nmax_start_failures = 2\n"


class Running:
    """A ``netplex-native run`` process; its stderr in a file."""

    def __init__(self, tmp_path, config_text, version="v1", name="ops"):
        self.tmp = tmp_path
        self.cfg = tmp_path / f"{name}.toml"
        self.sock = str(tmp_path / "sock")
        self.write(config_text, version)
        self.err_path = tmp_path / "stderr.log"
        self.err = open(self.err_path, "w")
        self.p = subprocess.Popen(CLI + ["run", str(self.cfg), "--socket-dir", self.sock],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.err)
        # the socket file appears at bind(), a moment before listen(): wait for an answer
        assert wait_until(self._answers, 15), self.log()

    def _answers(self) -> bool:
        try:
            return bool(admin.request(self.sock, {"cmd": "list"}, timeout=5).get("ok"))
        except admin.AdminError:
            return False

    def write(self, config_text, version=None):
        if version is not None:             # atomically: a reload may read it at any moment
            tmp = self.tmp / "ops_app.py.new"
            tmp.write_text(APP.format(version=version))
            os.replace(tmp, self.tmp / "ops_app.py")
        tmp = self.cfg.with_suffix(".new")
        tmp.write_text(config_text)
        os.replace(tmp, self.cfg)

    def log(self) -> str:
        return self.err_path.read_text()

    def admin(self, *args, timeout=20):
        return subprocess.run(CLI + ["admin", "--socket-dir", self.sock] + list(args), cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def status(self) -> dict:
        """The controller's ``list`` answer, read in this process: what
        ``admin --json list`` prints (cli.py prints the answer as it comes;
        test_cli.py runs that command itself), without starting an
        interpreter for each of the many polls of a test."""
        ans = admin.request(self.sock, {"cmd": "list"}, timeout=20)
        assert ans.get("ok"), ans
        return ans

    def services(self) -> dict:
        return {s["name"]: s for s in self.status()["services"]}

    def pids(self, name, include_retiring=False) -> set:
        s = self.services().get(name)
        if s is None:
            return set()
        return {c["pid"] for c in s["containers"] if include_retiring or not c["retiring"]}

    def ready(self, name, n) -> bool:
        s = self.services().get(name)
        return (s is not None and len(s["containers"]) == n
                and all(c["ready"] and not c["retiring"] for c in s["containers"]))

    def signal(self, sig):
        self.p.send_signal(sig)

    def stop(self):
        try:
            if self.p.poll() is None:
                self.p.send_signal(signal.SIGTERM)
                try:
                    self.p.wait(20)
                except subprocess.TimeoutExpired:
                    self.p.kill()
                    self.p.wait()
        finally:
            self.err.close()


@pytest.fixture
def running(tmp_path):
    made = []

    def start(config_text, **kw):
        r = Running(tmp_path, config_text, **kw)
        made.append(r)
        return r
    yield start
    for r in made:
        r.stop()


def answer(port):
    try:
        return request(port, "hi", timeout=3)
    except OSError:
        return None


def refused(port) -> bool:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))
    except ConnectionRefusedError:
        return True
    finally:
        s.close()
    return False
