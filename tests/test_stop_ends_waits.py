"""A container's regular end ends its blocking waits before its
``pre_finish_hook``, however the end comes.

A worker thread of a container blocked in ``semaphore.decrement(wait=True)``
(no timeout) must see its wait end (-1, as a timeout) once the container
has served its connections -- whether a SIGHUP reload, ``admin restart`` or
a system shutdown asked it to stop, or it ends on its own
(``global_exception_handler`` returns False) -- so that a ``pre_finish_hook``
that joins the thread returns at once instead of waiting out the whole
grace (``shutdown_timeout``, 30 s here); a thread that loops on waits a
feeder keeps serving ends too, at its first wait that finds nothing free
(native: a wait begun after the stop does not sleep; before, each slept a
slice or two and was served).  Before the first fix only a system
shutdown reached such a wait: a retired container's thread kept waiting, in
slices, and its ``pre_finish_hook`` hung until the controller SIGTERMed it.
The connections a retiring container still serves are served as usual
meanwhile: a handler's await is granted during the grace, not cut short.

End to end: ``netplex-native run`` subprocesses (``ops_harness``), both
backends; the application reports through marker files beside its module.
"""

import json
import signal
import socket
import subprocess
import time

import pytest

from harness import free_port, wait_until
from ops_harness import CLI, ROOT, running  # noqa: F401

#: The grace a stopping container gets; every bound below is well under it.
GRACE = 30.0
#: What "promptly" means here (generous: a loaded 2-CPU machine).
PROMPT = 10.0

APP = '''
import asyncio, json, os, threading, time
import netplex_native as netplex
from netplex_native import semaphore

HERE = os.path.dirname(os.path.abspath(__file__))
SEM = "stopwaits.never"             # nobody ever increments it
FSEM = "stopwaits.fed"              # a unit every 10 ms, from this container's feeder
HSEM = "stopwaits.handler"          # the handlers' own


def mark(name, text=""):
    tmp = os.path.join(HERE, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(HERE, name))


async def handle(reader, writer):
    line = await reader.readline()
    if line.strip() == b"inc":
        semaphore.increment(HSEM)
        writer.write(f"inc {os.getpid()}\\n".encode())
    else:
        mark(f"handler.{os.getpid()}")
        r = await semaphore.decrement_async(HSEM, wait=True)
        writer.write(f"{r}\\n".encode())
    await writer.drain()


class Blocked(netplex.ProcessorHooks):
    """Two worker threads wait on SEM without a timeout: the first is the
    queue's head (it sleeps untimed), the second sleeps in slices.  A third
    takes FSEM's units in a loop of waits while a feeder gives one every
    10 ms: its loop ends only when a wait ends as a timeout."""

    def post_start_hook(self, cont):
        self.threads = [threading.Thread(target=self.loop, daemon=True)]
        self.threads[0].start()
        threading.Thread(target=self.feed, daemon=True).start()
        for i in range(2):
            t = threading.Thread(target=self.wait, args=(cont.pid, i), daemon=True)
            t.start()
            self.threads.append(t)
            deadline = time.monotonic() + 10
            while not os.path.exists(os.path.join(HERE, f"waiting.{cont.pid}.{i}")) \\
                    and time.monotonic() < deadline:
                time.sleep(0.01)

    def loop(self):
        while semaphore.decrement(FSEM, wait=True) >= 0:
            pass

    def feed(self):
        while True:
            semaphore.increment(FSEM)
            time.sleep(0.01)

    def wait(self, pid, i):
        mark(f"waiting.{pid}.{i}")
        r = semaphore.decrement(SEM, wait=True)
        mark(f"ended.{pid}.{i}", str(r))

    def shutdown(self):
        mark(f"shutdown.{os.getpid()}")

    def receive_admin_message(self, cont, name, args):
        raise RuntimeError(name)

    def global_exception_handler(self, exc):
        return False                        # this container ends (a regular end of its own)

    def pre_finish_hook(self, cont):
        t0 = time.monotonic()
        for t in self.threads:
            t.join(25)
        took = time.monotonic() - t0
        late = semaphore.decrement(SEM, wait=True)      # begun after the stop: ends too
        mark(f"joined.{cont.pid}", json.dumps({"took": took, "late": late,
                                                "alive": [t.is_alive() for t in self.threads]}))
'''


def _config(port, plugins):
    return (f"[controller]\nshutdown_timeout = {GRACE}\n"
            f'[[service]]\nname = "w"\nhandler = "waits_app:handle"\nhooks = "waits_app:Blocked"\n'
            f'address = "tcp://127.0.0.1:{port}"\nworkers = 1\nplugins = "{plugins}"\n')


def _start(running, tmp_path, plugins):  # noqa: F811
    (tmp_path / "waits_app.py").write_text(APP)
    port = free_port()
    r = running(_config(port, plugins))
    assert wait_until(lambda: r.ready("w", 1), 20), r.log()
    (pid,) = r.pids("w")
    assert wait_until(lambda: all((tmp_path / f"waiting.{pid}.{i}").exists() for i in range(2)), 10), r.log()
    return r, port, pid


def _ask_to_stop(r, how):
    """Stop the container the way *how* names; returns a process to reap, or None."""
    if how == "sighup":
        r.signal(signal.SIGHUP)
    elif how == "sigterm":
        r.signal(signal.SIGTERM)
    elif how == "itself":                   # global_exception_handler returns False
        res = r.admin("message", "w", "end")
        assert res.returncode == 0, res.stderr
    else:                                   # answers once the restart is done: in the background
        return subprocess.Popen(CLI + ["admin", "--socket-dir", r.sock, "restart", "w"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return None


def _reap(p):
    if p is None:
        return
    try:
        p.wait(GRACE + 10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("plugins", ["native", "rpc"])
@pytest.mark.parametrize("how", ["sighup", "restart", "sigterm", "itself"])
def test_a_stop_ends_a_worker_threads_untimed_wait_so_pre_finish_hook_can_join_it(
        running, tmp_path, plugins, how):  # noqa: F811
    r, _port, pid = _start(running, tmp_path, plugins)
    time.sleep(0.3)                         # both threads asleep in their waits
    admin = _ask_to_stop(r, how)
    try:
        t0 = time.monotonic()
        joined = tmp_path / f"joined.{pid}"
        # a reload or restart first starts the new container: allow for that too
        assert wait_until(joined.exists, PROMPT + 10), \
            f"pre_finish_hook did not finish after {time.monotonic() - t0:.1f}s ({how}, {plugins})\n{r.log()}"
        info = json.loads(joined.read_text())
        assert info["alive"] == [False, False, False], info
        assert info["took"] < PROMPT, info
        assert info["late"] == -1, info
        for i in range(2):
            assert (tmp_path / f"ended.{pid}.{i}").read_text() == "-1"
    finally:
        _reap(admin)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("plugins", ["native", "rpc"])
def test_a_restart_serves_a_handlers_await_during_the_grace_then_ends_the_threads_waits(
        running, tmp_path, plugins):  # noqa: F811
    r, port, pid = _start(running, tmp_path, plugins)
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    admin = None
    try:
        conn.sendall(b"wait\n")
        assert wait_until((tmp_path / f"handler.{pid}").exists, 10), r.log()
        time.sleep(0.3)                     # the coroutine is queued
        admin = _ask_to_stop(r, "restart")
        # the old container is asked to stop (it no longer accepts): the new one
        # takes the next connection and gives the old one's handler its unit
        assert wait_until((tmp_path / f"shutdown.{pid}").exists, PROMPT + 10), r.log()
        time.sleep(0.5)                     # its waits would have ended by now if cut short
        other = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            other.sendall(b"inc\n")
            other.settimeout(PROMPT)
            by = other.makefile().readline().split()
        finally:
            other.close()
        assert by[0] == "inc" and int(by[1]) != pid, by
        conn.settimeout(PROMPT)
        assert conn.makefile().readline().strip() == "0", r.log()    # granted, not cut short
        assert wait_until((tmp_path / f"joined.{pid}").exists, PROMPT), r.log()
        info = json.loads((tmp_path / f"joined.{pid}").read_text())
        assert info["alive"] == [False, False, False] and info["took"] < PROMPT and info["late"] == -1, info
    finally:
        conn.close()
        _reap(admin)
