"""An awaitable native wait at a process's resource limits (real limits, real
processes, the public ``Domain``):

- no thread can be started (RLIMIT_NPROC): the wait raises
  AsyncWaitHelperError (a NetplexError and a RuntimeError) naming the cause,
  and leaves nothing queued;
- every file descriptor is taken: the first await works (the wait path
  imports nothing; the helper thread needs no descriptor)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NO_THREAD = r"""
import asyncio, threading
from netplex_native import Domain, AsyncWaitHelperError, NetplexError
d = Domain.create(semaphores=8, mutexes=8, processes=8, export=False)
try:
    s = d.semaphore("x", 0, protected=False)
    m = d.mutex("m")
    try:
        threading.Thread(target=lambda: None).start()
        print("SKIP threads can still be started")
        raise SystemExit(0)
    except RuntimeError:
        pass
    assert m.lock(timeout=0)
    async def main():
        out = []
        for make in (lambda: s.decrement_async(wait=True, timeout=1),
                     lambda: m.lock_async(timeout=1),
                     lambda: s.acquire_async(timeout=1)):
            try:
                out.append(("returned", await make()))
            except AsyncWaitHelperError as e:
                out.append(("raised", isinstance(e, NetplexError), isinstance(e, RuntimeError),
                            "thread" in str(e) and "nothing was queued" in str(e)))
        return out
    out = asyncio.run(main())
    core = d._core
    waiting = [x["waiters"] for x in core.semaphores() + core.mutexes()]
    mine = [p["async_waiters"] for p in core.processes()]
    print("RESULT", repr((out, waiting, mine)))
finally:
    d.unlink()
    d.close()
"""

FD_LIMIT = r"""
import asyncio, os
from netplex_native import Domain
d = Domain.create(semaphores=8, mutexes=8, processes=8, export=False)
fds = []
try:
    s = d.semaphore("x", 0, protected=False)
    async def main():
        loop = asyncio.get_running_loop()
        try:
            while True:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        loop.call_later(0.2, s.increment)
        first = await s.decrement_async(wait=True, timeout=5)
        many = await asyncio.gather(*[s.decrement_async(wait=True, timeout=0.3)
                                      for _ in range(100)])
        return first, sorted(set(many))
    print("RESULT", asyncio.run(main()))
finally:
    for f in fds:
        os.close(f)
    d.unlink()
    d.close()
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="running as another user under RLIMIT_NPROC needs root and setpriv")
def test_no_helper_thread_raises_a_specific_error_and_queues_nothing():
    caps = "+dac_override,+dac_read_search"
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
           f"--inh-caps={caps}", f"--ambient-caps={caps}",
           "bash", "-c", 'ulimit -u 1; exec "$0" -c "$1"', sys.executable, NO_THREAD]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=50, cwd=ROOT, env=_env())
    assert p.returncode == 0, p.stderr
    assert "SKIP" not in p.stdout, p.stdout        # the limit must bite for this test to mean anything
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")][0]
    out, waiting, mine = ast.literal_eval(line[len("RESULT "):])
    assert out == [("raised", True, True, True)] * 3, p.stdout
    assert waiting == [0, 0] and mine == [0], p.stdout  # nothing queued, no record kept


def test_the_first_await_at_the_fd_limit_works():
    p = subprocess.run([sys.executable, "-c", FD_LIMIT], capture_output=True, text=True,
                       timeout=50, cwd=ROOT, env=_env())
    assert p.returncode == 0, p.stderr
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")][0]
    assert line == "RESULT (0, [-1])", p.stdout
