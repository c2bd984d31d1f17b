"""Helpers of the native-core tests: forked children that act on a Domain, die, stop
or wait, with every wait bounded."""

from __future__ import annotations

import os
import signal
import time

from netplex_native.native import domain as _native

from harness import fork_call, wait_until


def child(fn, *args) -> int:
    """harness.fork_call in test mode: the core's crash points may be armed in it."""
    def run():
        os.environ["NETPLEX_CORE_TEST"] = "1"
        fn(*args)
    return fork_call(run)


def arm(n: int, sig: int = signal.SIGKILL) -> None:
    """In a test-mode child: send sig at the n-th crash point from now."""
    assert _native._lib.np_test_crash_signal(sig) == 0
    assert _native._lib.np_test_crash_after(n) == 0


def reap(pid: int, timeout: float = 20.0) -> int:
    """Wait for pid (bounded); returns its wait status.  Kills it on timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        p, status = os.waitpid(pid, os.WNOHANG)
        if p:
            return status
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} hung")


def killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def exited_ok(status: int) -> bool:
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def kill_and_reap(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    reap(pid)


def kill_if_alive(pid: int) -> None:
    """Clean-up: SIGKILL and reap pid unless it is already gone and reaped."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Until pid is in state T (stopped)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "T":
                    return
        except OSError:
            raise AssertionError(f"{pid} died instead of stopping")
        time.sleep(0.002)
    raise AssertionError(f"{pid} did not stop")


def until(cond, timeout: float = 10.0, what: str = "condition") -> None:
    """harness.wait_until that fails the test on timeout."""
    if not wait_until(cond, timeout, 0.002):
        raise AssertionError(f"timed out waiting for {what}")


def sem(dom, name):
    return next((o for o in dom.semaphores() if o["name"] == name), None)


def mtx(dom, name):
    return next((o for o in dom.mutexes() if o["name"] == name), None)


def pids(dom) -> list[int]:
    return sorted(p["pid"] for p in dom.processes())


def kill_soon(pid: int, delay: float = 0.02) -> int:
    """A process that SIGKILLs pid after delay (a waiter is asleep by then)."""
    k = os.fork()
    if k == 0:
        try:
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
        finally:
            os._exit(0)
    return k


def hold_until_killed(ready_w: int) -> None:
    """Tell the parent we are ready, then sleep until killed."""
    os.write(ready_w, b"r")
    while True:
        time.sleep(1)


def await_in_thread(dom, kind: str, name: str, count: int, timeout=None) -> None:
    """Start a thread running an event loop in which *count* coroutines await
    *name* (a semaphore decrement or a mutex lock) through async waiter
    records (native/asyncwait.py); returns at once."""
    import asyncio
    import threading
    from netplex_native.native.asyncwait import waits_of
    k = _native._SEM if kind == "sem" else _native._MTX

    def run():
        async def main():
            await asyncio.gather(*[waits_of(dom).acquire(k, name, timeout) for _ in range(count)])
        asyncio.run(main())
    threading.Thread(target=run, daemon=True).start()
