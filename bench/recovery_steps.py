#!/usr/bin/env python3
"""Where the recovery time goes: one SIGKILL, every step timed.

    python3 bench/recovery_steps.py [--kills 40] [--threads 2] [--mb 0]

A holder process (Python, with --threads idle threads besides its main one,
as a container has, and --mb touched MB) holds a native mutex of a Domain
and a flock.  Per kill, all at once: a native waiter blocked in lock(), a
flock waiter blocked in flock(), and an observer blocked on the holder's
pidfd (readable when the kernel reports the whole process gone).  Each
records CLOCK_MONOTONIC when it returns; the kill is time 0.  No controller:
this isolates the kernel's teardown and the core's path from the bench's
controller (bench/run.py's recovery section measures through it).

The three waiters share 2 CPUs with the dying holder, so read the medians,
not single kills.  The steps inside the native waiter (death word, the
liveness looks, the recovery) are described in csrc/deathwatch.c.
"""

from __future__ import annotations

import argparse
import fcntl
import mmap
import os
import select
import signal
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from netplex_native.native import domain as _native   # noqa: E402


def holder(dom_name, fpath, nthreads, mb, ready_w):
    d = _native.Domain.attach(dom_name)
    fd = os.open(fpath, os.O_RDWR)
    if mb:
        m = mmap.mmap(-1, mb << 20)
        for i in range(0, mb << 20, mmap.PAGESIZE):
            m[i] = 1
    for _ in range(nthreads):
        threading.Thread(target=time.sleep, args=(10**6,), daemon=True).start()
    d.mutex_lock("m")
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(ready_w, b"h")
    while True:
        time.sleep(100)


def waiter(kind, dom_name, fpath, go_r, out_w):
    d = _native.Domain.attach(dom_name)
    d.mutex_lock("x")           # registered, name cached: the first lock is not timed
    d.mutex_unlock("x")
    fd = os.open(fpath, os.O_RDWR)
    while os.read(go_r, 1) == b"g":
        os.write(out_w, b"w")
        if kind == "native":
            assert d.mutex_lock("m", 10)
            t = time.monotonic()
            d.mutex_unlock("m")
        else:
            fcntl.flock(fd, fcntl.LOCK_EX)
            t = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.write(out_w, repr(t).encode().ljust(32))
    os._exit(0)


def fork(fn, *args):
    pid = os.fork()
    if pid == 0:
        try:
            fn(*args)
        finally:
            os._exit(1)
    return pid


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="idle threads of the holder")
    ap.add_argument("--mb", type=int, default=0, help="touched MB of the holder")
    a = ap.parse_args()
    dom = _native.Domain.create(processes=64)
    fdesc, fpath = tempfile.mkstemp(prefix="nbench-steps-")
    os.close(fdesc)
    waiters = {}
    try:
        for kind in ("native", "flock"):
            go_r, go_w = os.pipe()
            out_r, out_w = os.pipe()
            waiters[kind] = (fork(waiter, kind, dom.name, fpath, go_r, out_w), go_w, out_r)
        res = {"native": [], "flock": [], "exited": []}
        for _ in range(a.kills):
            r, w = os.pipe()
            h = fork(holder, dom.name, fpath, a.threads, a.mb, w)
            os.read(r, 1)
            os.close(r)
            os.close(w)
            pidfd = os.pidfd_open(h)
            for _pid, go_w, out_r in waiters.values():
                os.write(go_w, b"g")
                os.read(out_r, 1)
            time.sleep(0.02)                     # both waiters asleep
            t0 = time.monotonic()
            os.kill(h, signal.SIGKILL)
            select.select([pidfd], [], [], 30)
            res["exited"].append((time.monotonic() - t0) * 1e3)
            for kind, (_pid, _go, out_r) in waiters.items():
                res[kind].append((float(os.read(out_r, 32)) - t0) * 1e3)
            os.close(pidfd)
            os.waitpid(h, 0)
            dom.recover(h, timeout=1)
        for pid, go_w, _out in waiters.values():
            os.write(go_w, b"q")
            os.waitpid(pid, 0)
    finally:
        os.unlink(fpath)
        dom.unlink()
        dom.close()

    def p99(xs):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]
    print(f"holder: {a.threads + 1} threads (+ its death-watch thread), {a.mb} MB touched; "
          f"{a.kills} kills; load average {os.getloadavg()[0]:.2f}")
    for k, label in (("native", "native waiter holds the mutex"),
                     ("flock", "flock waiter holds the flock"),
                     ("exited", "holder's pidfd readable (exit)")):
        v = res[k]
        print(f"  {label:34s} median {statistics.median(v):7.3f} ms   "
              f"p99 {p99(v):7.3f} ms   min {min(v):6.3f} ms")


if __name__ == "__main__":
    main()
