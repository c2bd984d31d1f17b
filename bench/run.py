#!/usr/bin/env python3
"""netplex_native benchmarks.

    python3 bench/run.py [--quick] [--out bench/results] [--only SECTION,...]
    netplex-native bench [--quick]

Every measurement of the library goes through the public API inside real
containers: a controller (forked from this process) with one service, the
measuring code in a container timer, results sent back over a pipe (one JSON
line per atomic write).  The peers (posix_ipc, sysv_ipc, multiprocessing,
flock, a bare socketpair) run inside the same containers, interleaved with the
library: every figure is a median over ALTERNATING rounds (A, B, C, A, B, C,
...) so that the noise of a shared machine hits every candidate alike, and
every verdict is a ratio against a peer measured in the same run.

Sections: uncontended, contention, handoff, recovery, syscalls, memory,
asyncwaits (bench/asyncwaits.py: awaiting coroutines, issue 10), names
(bench/names.py: the name table at 1k / 16k / 128k names and after 1M churn).
The machine (CPU, kernel, cost of one futex system call: bench/machine.py)
heads the output.
Writes OUT/results.json (raw figures, targets) and OUT/contention.png.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)          # bench/asyncwaits.py
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SECTIONS = ["uncontended", "contention", "handoff", "recovery", "syscalls", "memory", "asyncwaits",
            "names"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- pipes ----

class Events:
    """Any process emits one JSON line per os.write (atomic below PIPE_BUF)."""

    def __init__(self):
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.seen: list[dict] = []
        self._buf = b""

    def emit(self, kind: str, **fields) -> None:
        fields["kind"] = kind
        fields.setdefault("pid", os.getpid())
        data = (json.dumps(fields) + "\n").encode()
        assert len(data) < select.PIPE_BUF, "event too large"
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
                ev = json.loads(line)
                self.seen.append(ev)
                if ev["kind"] == "error":
                    raise RuntimeError(f"benchmark job failed in pid {ev['pid']}:\n{ev['tb']}")

    def all(self, kind: str, **match) -> list[dict]:
        return [e for e in self.seen if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())]

    def wait(self, kind: str, timeout: float = 60.0, count: int = 1, alive=None, **match) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.all(kind, **match)
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {count} x {kind} {match}; last: {self.seen[-5:]}")
            if alive is not None and not alive():
                raise RuntimeError(f"the controller died while waiting for {kind} {match}")
            self._pump(min(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


class JobCtx:
    """What a job running in a container gets."""

    def __init__(self, backend, params, events, go_r, role_r):
        self.backend = backend
        self.params = params
        self.events = events
        self.go_r = go_r
        self.role_r = role_r

    def emit(self, kind, **fields):
        self.events.emit(kind, **fields)

    def go(self) -> bytes:
        """Block until the bench process says go (one byte per waiter)."""
        return os.read(self.go_r, 1)

    def take_role(self) -> bool:
        """True for the one container that takes the role byte."""
        try:
            return os.read(self.role_r, 1) == b"R"
        except BlockingIOError:
            return False


class Session:
    """A controller (forked) with one service of `workers` containers, each
    running job(JobCtx) from a timer once started."""

    def __init__(self, backend: str, workers: int, job, params=None, roles: int = 0):
        self.backend = backend
        self.events = Events()
        self.go_r, self.go_w = os.pipe()
        self.role_r, role_w = os.pipe()
        os.write(role_w, b"R" * roles)
        os.close(role_w)
        os.set_blocking(self.role_r, False)
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                self._controller(backend, workers, job, params or {})
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        self.status = None

    def _controller(self, backend, workers, job, params):
        logging.getLogger("netplex_native").setLevel(logging.ERROR)
        import netplex_native as netplex
        from netplex_native import cenv, mutex, semaphore
        events, go_r, role_r = self.events, self.go_r, self.role_r

        class Hooks(netplex.ProcessorHooks):
            def post_add_hook(self, service, ctrl):
                if backend == "native":
                    ctrl.add_plugin(semaphore.native_plugin)
                    ctrl.add_plugin(mutex.native_plugin)
                else:
                    ctrl.add_plugin(semaphore.plugin)
                    ctrl.add_plugin(mutex.plugin)

            def post_start_hook(self, cont):
                def fire(timer):
                    try:
                        job(JobCtx(backend, params, events, go_r, role_r))
                    except BaseException:
                        tb = traceback.format_exc()
                        events.emit("error", tb=tb[-3000:])
                    return False
                cenv.create_timer(fire, 0.001)

        try:   # the recovery trials kill a container right after its start: no crash-loop back-off
            ctrl = netplex.Controller(max_start_failures=10**9, backoff=(0.002, 0.002))
        except TypeError:
            ctrl = netplex.Controller()
        ctrl.add_service(netplex.Service("bench", None, hooks=Hooks(), workers=workers))
        ctrl.run()

    def alive(self) -> bool:
        if self.status is not None:
            return False
        wpid, st = os.waitpid(self.pid, os.WNOHANG)
        if wpid == self.pid:
            self.status = st
            return False
        return True

    def wait(self, kind, timeout=120.0, count=1, **match):
        return self.events.wait(kind, timeout=timeout, count=count, alive=self.alive, **match)

    def go(self, data: bytes) -> None:
        os.write(self.go_w, data)

    def stop(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            end = time.monotonic() + 10
            while self.alive() and time.monotonic() < end:
                time.sleep(0.01)
            if self.alive():
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        self.events.close()
        for fd in (self.go_r, self.go_w, self.role_r):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------- stats ----

def med(xs):
    return statistics.median(xs) if xs else float("nan")


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(xs):
    return {"median": med(xs), "min": min(xs) if xs else None, "max": max(xs) if xs else None,
            "n": len(xs), "samples": xs}


# ---------------------------------------------------------- placement ----
# On a small shared machine a wake-up that crosses CPUs (an IPI to an idle
# vCPU) costs several times one that stays on the CPU: latency-bound figures
# (RPC round trips, hand-off) are bimodal.  They are measured unpinned ("any",
# the verdict) and with both ends pinned to one CPU ("same") or two ("cross").

ALL_CPUS = sorted(os.sched_getaffinity(0))
PLACEMENTS = ["any", "same", "cross"] if len(ALL_CPUS) >= 2 else ["any"]


def place(placement: str, me_second: bool, others=()) -> None:
    """Pin this process (the second end when me_second) and the pids in others
    (first ends) for a placement; "any" restores every CPU."""
    a, b = ALL_CPUS[0], ALL_CPUS[-1]
    if placement == "any":
        mine = theirs = set(ALL_CPUS)
    elif placement == "same":
        mine = theirs = {a}
    else:
        theirs, mine = {a}, {b}
    if not me_second:
        mine = theirs
    for pid in others:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]   # every thread
        except OSError:
            tids = [pid]
        for tid in tids:
            try:
                os.sched_setaffinity(tid, theirs)
            except OSError:
                pass
    os.sched_setaffinity(0, mine)


# ------------------------------------------------------ 1. uncontended ----
# Each candidate: name -> setup() returning (loop(n): n pairs, cleanup()).

def _native_dom():
    from netplex_native._context import ctx
    from netplex_native.native.plugins import domain_plugin
    return ctx.controller.plugin_data(domain_plugin)


def _cands_common():
    import multiprocessing

    def c_posix():
        import posix_ipc
        s = posix_ipc.Semaphore(None, posix_ipc.O_CREX, initial_value=1)
        acq, rel = s.acquire, s.release

        def loop(n):
            for _ in range(n):
                acq()
                rel()
        return loop, lambda: (s.unlink(), s.close())

    def c_flock():
        fd, path = tempfile.mkstemp(prefix="nbench-flock-")
        fl, EX, UN = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_UN

        def loop(n):
            for _ in range(n):
                fl(fd, EX)
                fl(fd, UN)
        return loop, lambda: (os.close(fd), os.unlink(path))

    return {"posix_ipc_sem": c_posix, "flock": c_flock}, multiprocessing


def job_uncontended(jc: JobCtx):
    from netplex_native import mutex, semaphore
    p = jc.params
    cands, multiprocessing = _cands_common()
    order = []
    peers = [os.getppid()]          # the controller, then the RPC peers
    placed = {}                     # candidate -> base candidate, placement
    peer_of = {}                    # candidate -> the process that answers it (its CPU time is counted)

    def public_sem(name, protected=False):
        """decrement+increment through the public API (either backend)."""
        def make():
            semaphore.create(name, 1, protected=protected)
            dec, inc = semaphore.decrement, semaphore.increment

            def loop(n):
                for _ in range(n):
                    dec(name)
                    inc(name)
            return loop, None
        return make

    def public_mutex():
        m = mutex.access("u.mtx")

        def loop(n):
            lock, unlock = m.lock, m.unlock
            for _ in range(n):
                lock()
                unlock()
        return loop, None

    if jc.backend == "native":
        from netplex_native.native.domain import _lib

        def c_floor():
            f = _lib.np_noop

            def loop(n):
                for _ in range(n):
                    f()
                    f()
            return loop, None

        def c_raw():
            dom = _native_dom()
            dom.sem_create("u.raw", 1)
            dom.sem_decrement("u.raw")
            dom.sem_increment("u.raw")
            d, h, nw = dom._d, dom._sems["u.raw"], _lib.NP_NOWAIT
            dec, inc = _lib.np_sem_decrement, _lib.np_sem_increment

            def loop(n):
                for _ in range(n):
                    dec(d, h, nw)
                    inc(d, h)
            return loop, None

        def c_dom():
            dom = _native_dom()
            dom.sem_create("u.dom", 1)
            dec, inc = dom.sem_decrement, dom.sem_increment

            def loop(n):
                for _ in range(n):
                    dec("u.dom")
                    inc("u.dom")
            return loop, None

        def c_dom_mutex():
            dom = _native_dom()
            lock, unlock = dom.mutex_lock, dom.mutex_unlock

            def loop(n):
                for _ in range(n):
                    lock("u.dmtx")
                    unlock("u.dmtx")
            return loop, None

        def handle(make, acq, rel):
            """acquire+release through a handle made once (the threading idiom)."""
            def setup():
                h = make()
                a, r = getattr(h, acq), getattr(h, rel)

                def loop(n):
                    for _ in range(n):
                        a()
                        r()
                return loop, None
            return setup

        def pub_dom():
            from netplex_native.domain import Domain
            return Domain(_native_dom())

        def c_mp_sem():
            s = multiprocessing.Semaphore(1)
            acq, rel = s.acquire, s.release

            def loop(n):
                for _ in range(n):
                    acq()
                    rel()
            return loop, None

        def c_mp_lock():
            s = multiprocessing.Lock()
            acq, rel = s.acquire, s.release

            def loop(n):
                for _ in range(n):
                    acq()
                    rel()
            return loop, None

        def c_sysv():
            import sysv_ipc
            s = sysv_ipc.Semaphore(sysv_ipc.IPC_PRIVATE, sysv_ipc.IPC_CREX, initial_value=1)
            s.undo = True
            acq, rel = s.acquire, s.release

            def loop(n):
                for _ in range(n):
                    acq()
                    rel()
            return loop, s.remove

        cands.update({"floor_2_cffi_noop": c_floor, "native_raw_cffi_sem": c_raw, "native_domain_sem": c_dom, "native_sem": public_sem("u.sem"),
                      "native_sem_protected": public_sem("u.psem", protected=True), "native_mutex": public_mutex,
                      "native_domain_mutex": c_dom_mutex, "mp_sem": c_mp_sem, "mp_lock": c_mp_lock,
                      "sysv_sem_undo": c_sysv,
                      "native_sem_handle": handle(lambda: semaphore.access("u.sem"), "acquire", "release"),
                      "native_domain_sem_handle": handle(lambda: pub_dom().semaphore("u.dsem", 1),
                                                         "acquire", "release"),
                      "native_domain_mutex_handle": handle(lambda: pub_dom().mutex("u.dhmtx"),
                                                           "acquire", "release")})
        order = ["floor_2_cffi_noop", "native_raw_cffi_sem", "native_domain_sem", "native_sem", "native_sem_protected",
                 "native_sem_handle", "native_domain_sem_handle",
                 "posix_ipc_sem", "sysv_sem_undo", "mp_sem", "native_domain_mutex", "native_mutex",
                 "native_domain_mutex_handle", "flock", "mp_lock"]
    else:
        from netplex_native import wire

        def c_sock():
            # Two request/response round trips with the frames of a sem pair,
            # against a trivial blocking echo peer.
            req1 = wire.encode([123, "sem.decrement", ["u.sem", False, None]])
            req2 = wire.encode([124, "sem.increment", ["u.sem"]])
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            pid = os.fork()
            if pid == 0:
                try:
                    a.close()
                    while True:
                        d = b.recv(65536)
                        if not d:
                            break
                        b.sendall(d)
                finally:
                    os._exit(0)
            b.close()
            peers.append(pid)
            peer_of["socketpair_floor"] = pid
            send, recv = a.sendall, a.recv
            l1, l2 = len(req1), len(req2)

            def rt(req, ln):
                send(req)
                got = len(recv(65536))
                while got < ln:
                    got += len(recv(65536))

            def loop(n):
                for _ in range(n):
                    rt(req1, l1)
                    rt(req2, l2)

            def cleanup():
                a.close()
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            return loop, cleanup

        def c_sock_asyncio():
            # The same round trips against an echo peer that serves them from
            # an asyncio loop (add_reader, as the controller does): the part
            # of the RPC pair's cost that is the event loop's alone.
            req1 = wire.encode([123, "sem.decrement", ["u.sem", False, None]])
            req2 = wire.encode([124, "sem.increment", ["u.sem"]])
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            pid = os.fork()
            if pid == 0:
                try:
                    import asyncio
                    a.close()
                    b.setblocking(False)
                    loop = asyncio.new_event_loop()

                    def echo():
                        try:
                            d = b.recv(65536)
                        except BlockingIOError:
                            return
                        if not d:
                            loop.stop()
                            return
                        b.send(d)
                    loop.add_reader(b.fileno(), echo)
                    loop.call_later(3600, lambda: None)     # a timer, as the controller has
                    loop.run_forever()
                finally:
                    os._exit(0)
            b.close()
            peers.append(pid)
            peer_of["socketpair_asyncio_echo"] = pid
            send, recv = a.sendall, a.recv
            l1, l2 = len(req1), len(req2)

            def loop(n):
                for _ in range(n):
                    send(req1)
                    got = len(recv(65536))
                    while got < l1:
                        got += len(recv(65536))
                    send(req2)
                    got = len(recv(65536))
                    while got < l2:
                        got += len(recv(65536))

            def cleanup():
                a.close()
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            return loop, cleanup

        def c_manager():
            mgr = multiprocessing.Manager()
            peers.append(mgr._process.pid)
            peer_of["mp_manager_sem"] = mgr._process.pid
            s = mgr.Semaphore(1)
            acq, rel = s.acquire, s.release

            def loop(n):
                for _ in range(n):
                    acq()
                    rel()
            return loop, mgr.shutdown

        def rpc_sem_nopoll():
            # The same pair with the container's reply poll off (C5 of
            # csrc/fast/container_channel.c): it sleeps in recv at once.
            from netplex_native._fast import reply_poll
            inner, _ = public_sem("u.sem")()

            def loop(n):
                old = reply_poll(0)
                try:
                    inner(n)
                finally:
                    reply_poll(old)
            return loop, None

        cands.update({"rpc_sem": public_sem("u.sem"), "rpc_sem_nopoll": rpc_sem_nopoll, "rpc_mutex": public_mutex,
                      "socketpair_floor": c_sock, "socketpair_asyncio_echo": c_sock_asyncio,
                      "mp_manager_sem": c_manager})
        peer_of.update({"rpc_sem": os.getppid(), "rpc_sem_nopoll": os.getppid()})
        order = ["rpc_sem", "rpc_sem_nopoll", "socketpair_floor", "socketpair_asyncio_echo", "mp_manager_sem",
                 "rpc_mutex", "posix_ipc_sem"]
        for base in ("rpc_sem", "rpc_sem_nopoll", "socketpair_floor", "socketpair_asyncio_echo", "mp_manager_sem"):
            for pl in PLACEMENTS[1:]:
                placed[f"{base}@{pl}"] = (base, pl)
        order += list(placed)

    loops, cleanups, n_of = {}, [], {}
    for name in order:
        if name in placed:
            base, pl = placed[name]

            def loop(n, _l=loops[base], _pl=pl):
                place(_pl, True, peers)
                try:
                    _l(n)
                finally:
                    place("any", True, peers)
            loops[name] = loop
        else:
            loop, cleanup = cands[name]()
            loops[name] = loop
            if cleanup:
                cleanups.append(cleanup)
        # calibrate: batch of about target seconds
        n = 16
        while True:
            t0 = time.perf_counter()
            loop(n)
            dt = time.perf_counter() - t0
            if dt > p["batch"] / 8 or n > 10_000_000:
                break
            n *= 4
        n_of[name] = max(16, int(n * p["batch"] / max(dt, 1e-9)))
        jc.emit("calibrated", cand=name, n=n_of[name])
    pc = time.perf_counter_ns

    def cpu_of(pid):
        # ns on a CPU of the peer's main thread (the one that answers)
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
    for r in range(p["rounds"]):
        for name in order:
            n = n_of[name]
            peer = peer_of.get(placed[name][0] if name in placed else name)
            c0, p0 = time.process_time_ns(), peer and cpu_of(peer)
            t0 = pc()
            loops[name](n)
            ns = (pc() - t0) / n
            c1, p1 = time.process_time_ns(), peer and cpu_of(peer)
            cpu = {"cpu_ns": (c1 - c0) / n}
            if p0 is not None and p1 is not None:
                cpu["peer_cpu_ns"] = (p1 - p0) / n
            jc.emit("u", cand=name, round=r, ns=ns, **cpu)
        jc.emit("round", round=r)
    for c in reversed(cleanups):
        try:
            c()
        except Exception:
            pass
    jc.emit("done")


def bench_uncontended(q, results):
    p = {"batch": 0.03 if q else 0.08, "rounds": 9 if q else 21}
    out = {}
    for backend in ("native", "rpc"):
        log(f"uncontended: {backend} container, {p['rounds']} alternating rounds of ~{p['batch'] * 1000:.0f} ms batches")
        with Session(backend, 1, job_uncontended, p) as s:
            last = -1
            deadline = time.monotonic() + 600
            while not s.events.all("done"):
                s.events._pump(0.2)
                rounds = s.events.all("round")
                if rounds and rounds[-1]["round"] != last:
                    last = rounds[-1]["round"]
                    log(f"  {backend}: round {last + 1}/{p['rounds']}")
                if not s.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"uncontended {backend}: the controller died or hung")
            for ev in s.events.all("u"):
                key = ev["cand"] if not (backend == "rpc" and ev["cand"] == "posix_ipc_sem") else "posix_ipc_sem@rpc"
                o = out.setdefault(key, {"backend": backend, "samples": [], "cpu": [], "peer_cpu": []})
                o["samples"].append(ev["ns"])
                o["cpu"].append(ev.get("cpu_ns"))
                if ev.get("peer_cpu_ns") is not None:
                    o["peer_cpu"].append(ev["peer_cpu_ns"])
            for ev in s.events.all("calibrated"):
                key = ev["cand"] if not (backend == "rpc" and ev["cand"] == "posix_ipc_sem") else "posix_ipc_sem@rpc"
                out[key]["batch_pairs"] = ev["n"]
    results["uncontended"] = {}
    for name, d in out.items():
        results["uncontended"][name] = {**summary(d["samples"]), "unit": "ns/pair", "backend": d["backend"],
                                        "batch_pairs": d.get("batch_pairs")}
        if d["backend"] == "rpc" and all(c is not None for c in d["cpu"]):
            # CPU time per pair: the container's (process_time) and, where
            # there is one, its peer's (controller, echo peer, manager)
            results["uncontended"][name]["cpu_ns"] = med(d["cpu"])
            if d["peer_cpu"]:
                results["uncontended"][name]["peer_cpu_ns"] = med(d["peer_cpu"])
    return results


# ------------------------------------------------------- 2. contention ----

def job_contention(jc: JobCtx):
    from netplex_native import mutex
    import posix_ipc
    p = jc.params
    m = mutex.access("c.mtx")
    psem = posix_ipc.Semaphore(p["posix_name"])
    fd = os.open(p["flock_path"], os.O_RDWR)
    fl, EX, UN = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_UN
    pc = time.perf_counter
    counter = [0]

    def run_mutex(end):
        lock, unlock = m.lock, m.unlock
        n = 0
        while pc() < end:
            for _ in range(16):
                lock()
                counter[0] += 1
                unlock()
            n += 16
        return n

    def run_posix(end):
        acq, rel = psem.acquire, psem.release
        n = 0
        while pc() < end:
            for _ in range(16):
                acq()
                counter[0] += 1
                rel()
            n += 16
        return n

    def run_flock(end):
        n = 0
        while pc() < end:
            for _ in range(16):
                fl(fd, EX)
                counter[0] += 1
                fl(fd, UN)
            n += 16
        return n

    runs = {"mutex": run_mutex, "posix_ipc_sem": run_posix, "flock": run_flock}
    if p.get("placement", "any") != "any":
        # K = 2 pinned: both on one CPU ("same") or one on each ("cross")
        place(p["placement"], jc.take_role())
    for r in range(p["rounds"]):
        for cand in p["cands"]:
            jc.emit("ready", round=r, cand=cand)
            jc.go()
            t0 = pc()
            n = runs[cand](t0 + p["duration"])
            jc.emit("count", round=r, cand=cand, n=n, elapsed=pc() - t0)
    jc.emit("done")


def bench_contention(q, results):
    Ks = [2, 4, 8, 16, 32]
    dur = 0.3 if q else 0.8
    rounds = 3 if q else 7
    import posix_ipc
    res = {}
    for backend in ("native", "rpc"):
        cands = ["mutex", "posix_ipc_sem", "flock"] if backend == "native" else ["mutex", "posix_ipc_sem"]
        runs = [(K, "any") for K in Ks]
        if backend == "native":
            runs += [(2, pl) for pl in PLACEMENTS if pl != "any"]
        for K, pl in runs:
            kk = str(K) if pl == "any" else f"{K}@{pl}"
            pname = f"/nbench-c-{os.getpid()}-{backend}-{kk.replace('@', '-')}"
            psem = posix_ipc.Semaphore(pname, posix_ipc.O_CREX, initial_value=1)
            fd, fpath = tempfile.mkstemp(prefix="nbench-c-")
            os.close(fd)
            log(f"contention: {backend} controller, K={kk} containers, {rounds} rounds x {cands} x {dur}s")
            try:
                with Session(backend, K, job_contention,
                             {"posix_name": pname, "flock_path": fpath, "rounds": rounds,
                              "cands": cands, "duration": dur, "placement": pl},
                             roles=1 if pl != "any" else 0) as s:
                    for r in range(rounds):
                        for cand in cands:
                            s.wait("ready", count=K, round=r, cand=cand)
                            s.go(b"g" * K)
                            evs = s.wait("count", count=K, round=r, cand=cand)
                            total = sum(e["n"] for e in evs) / dur
                            name = f"{backend}_mutex" if cand == "mutex" else cand
                            key = name if cand == "mutex" else f"{name}@{backend}"
                            res.setdefault(key, {}).setdefault(kk, []).append(total)
                        log(f"  K={kk} round {r + 1}/{rounds}: " + ", ".join(
                            f"{k}={v[kk][-1]:,.0f}/s" for k, v in res.items() if kk in v and len(v[kk]) == r + 1))
            finally:
                psem.unlink()
                psem.close()
                os.unlink(fpath)
    results["contention"] = {k: {K: {**summary(v), "unit": "ops/s"} for K, v in d.items()} for k, d in res.items()}
    results["contention_config"] = {"K": Ks, "pinned_K2": [pl for pl in PLACEMENTS if pl != "any"],
                                    "duration_s": dur, "rounds": rounds,
                                    "critical_section": "counter += 1"}
    return results


# ---------------------------------------------------------- 3. hand-off ----

def job_handoff(jc: JobCtx):
    from netplex_native import semaphore
    import posix_ipc
    p = jc.params
    pinger = jc.take_role()
    semaphore.create("h.a", 0)
    semaphore.create("h.b", 0)
    pa, pb = posix_ipc.Semaphore(p["pa"]), posix_ipc.Semaphore(p["pb"])
    pc = time.perf_counter_ns

    def lib_ping(n):
        inc, dec = semaphore.increment, semaphore.decrement
        for _ in range(n):
            inc("h.a")
            dec("h.b", wait=True)

    def lib_pong(n):
        inc, dec = semaphore.increment, semaphore.decrement
        for _ in range(n):
            dec("h.a", wait=True)
            inc("h.b")

    def px_ping(n):
        for _ in range(n):
            pa.release()
            pb.acquire()

    def px_pong(n):
        for _ in range(n):
            pa.acquire()
            pb.release()

    def in_thread(fn):
        # the same loop in a worker thread: a first waiter there sleeps
        # without a timer (A3u of csrc/acquire.c); the main thread, where the
        # other rows run (a timer callback on the loop), keeps its slices
        def run(n):
            t = threading.Thread(target=fn, args=(n,))
            t.start()
            t.join()
        return run

    fns = {"lib": (lib_ping, lib_pong), "posix_ipc_sem": (px_ping, px_pong),
           "lib_thread": (in_thread(lib_ping), in_thread(lib_pong)),
           "posix_ipc_sem_thread": (in_thread(px_ping), in_thread(px_pong))}
    for r in range(p["rounds"]):
        for cand in p["cands"]:
            base, _, pl = cand.partition("@")
            n = p["n"][base] // {"cross": 8, "same": 1}.get(pl, 4)   # cross-CPU wake-ups are ~10-20x slower
            place(pl or "any", not pinger)
            jc.emit("ready", round=r, cand=cand)
            jc.go()
            if pinger:
                t0 = pc()
                fns[base][0](n)
                jc.emit("rt", round=r, cand=cand, ns=(pc() - t0) / n / 2)
            else:
                fns[base][1](n)
    place("any", not pinger)
    jc.emit("done")


def bench_handoff(q, results):
    import posix_ipc
    rounds = 7 if q else 15
    res = {}
    for backend in ("native", "rpc"):
        n = {"lib": (10000 if q else 30000) if backend == "native" else (500 if q else 1500),
             "posix_ipc_sem": 10000 if q else 30000}
        n["lib_thread"], n["posix_ipc_sem_thread"] = n["lib"], n["posix_ipc_sem"]
        cands = [f"{c}@{pl}" if pl != "any" else c for pl in PLACEMENTS for c in ("lib", "posix_ipc_sem")]
        if backend == "native" and "same" in PLACEMENTS:
            cands += ["lib_thread@same", "posix_ipc_sem_thread@same"]
        names = {}
        for k in ("pa", "pb"):
            names[k] = f"/nbench-h-{os.getpid()}-{backend}-{k}"
            posix_ipc.Semaphore(names[k], posix_ipc.O_CREX, initial_value=0).close()
        log(f"handoff: {backend} controller, 2 containers ping-pong, {rounds} rounds x {cands}")
        try:
            with Session(backend, 2, job_handoff, {**names, "rounds": rounds, "cands": cands, "n": n},
                         roles=1) as s:
                for r in range(rounds):
                    for cand in cands:
                        s.wait("ready", count=2, round=r, cand=cand)
                        s.go(b"gg")
                        ev = s.wait("rt", round=r, cand=cand)[0]
                        base, _, pl = cand.partition("@")
                        key = {"lib": f"{backend}_sem", "lib_thread": f"{backend}_sem_thread",
                               "posix_ipc_sem_thread": f"posix_ipc_sem_thread@{backend}"}.get(
                            base, f"posix_ipc_sem@{backend}")
                        res.setdefault(key + (f"@{pl}" if pl else ""), []).append(ev["ns"])
                log(f"  {backend}: " + ", ".join(f"{k}={med(v) / 1000:.1f}us" for k, v in res.items()))
        finally:
            for k in ("pa", "pb"):
                posix_ipc.unlink_semaphore(names[k])
    results["handoff"] = {k: {**summary(v), "unit": "ns/hand-off"} for k, v in res.items()}
    return results


# ---------------------------------------------------------- 4. recovery ----

def job_recovery(jc: JobCtx):
    from netplex_native import mutex
    p = jc.params
    m = mutex.access("r.mtx")
    fd = os.open(p["flock_path"], os.O_RDWR)   # our own open file description
    if jc.take_role():                         # the waiter
        while True:
            cand = jc.go()
            if cand == b"q":
                break
            jc.emit("waiting", cand=cand.decode())
            if cand == b"n":
                m.lock()
                t = time.monotonic()
                jc.emit("got", cand="n", t=t)
                m.unlock()
            else:
                fcntl.flock(fd, fcntl.LOCK_EX)
                t = time.monotonic()
                jc.emit("got", cand="f", t=t)
                fcntl.flock(fd, fcntl.LOCK_UN)
        jc.emit("done")
    else:                                      # a holder (every restart too)
        m.lock()
        fcntl.flock(fd, fcntl.LOCK_EX)
        jc.emit("holding")


def bench_recovery(q, results):
    trials = 15 if q else 50
    res = {}
    for backend in ("native", "rpc"):
        fd, fpath = tempfile.mkstemp(prefix="nbench-r-")
        os.close(fd)
        log(f"recovery: {backend} controller, {trials} kills per candidate (alternating with flock)")
        try:
            with Session(backend, 2, job_recovery, {"flock_path": fpath}, roles=1) as s:
                for i in range(2 * trials):
                    cand = "n" if i % 2 == 0 else "f"
                    holder = s.wait("holding", count=i + 1)[i]
                    s.go(cand.encode())
                    s.wait("waiting", count=i + 1)
                    time.sleep(0.02)   # let the waiter block
                    t0 = time.monotonic()
                    os.kill(holder["pid"], signal.SIGKILL)
                    got = s.wait("got", count=i + 1, timeout=30)[i]
                    assert got["cand"] == cand
                    key = f"{backend}_mutex" if cand == "n" else f"flock@{backend}"
                    res.setdefault(key, []).append((got["t"] - t0) * 1e3)
                    if (i + 1) % 20 == 0:
                        log(f"  {backend}: {i + 1}/{2 * trials} kills")
                s.go(b"q")
                s.wait("done")
        finally:
            os.unlink(fpath)
    results["recovery"] = {k: {**summary(v), "p99": pct(v, 99), "unit": "ms"} for k, v in res.items()}
    return results


# ---------------------------------------------------------- 5. syscalls ----

MARK = "/nonexistent-nbench-marker-"


def _mark(i):
    """A system call that names itself in the trace."""
    try:
        os.stat(f"{MARK}{i}")
    except OSError:
        pass


def job_strace(jc: JobCtx):
    from netplex_native import mutex, semaphore
    n = jc.params["n"]
    semaphore.create("s.sem", 1)
    m = mutex.access("s.mtx")
    dom = _native_dom()
    dec, inc = semaphore.decrement, semaphore.increment
    for _ in range(1000):   # warm-up: registration, handle lookups
        dec("s.sem"); inc("s.sem"); m.lock(); m.unlock()
        dom.sem_decrement("s.sem"); dom.sem_increment("s.sem")
    _mark(1)
    for _ in range(n):
        dec("s.sem")
        inc("s.sem")
    _mark(2)
    lock, unlock = m.lock, m.unlock
    for _ in range(n):
        lock()
        unlock()
    _mark(3)
    jc.emit("done")


def strace_child(n: int) -> int:
    """Run under strace: a native controller whose container does the pairs."""
    with Session("native", 1, job_strace, {"n": n}) as s:
        s.wait("done", timeout=300)
    return 0


def bench_syscalls(q, results, out_dir):
    n = 20_000 if q else 100_000
    strace = shutil.which("strace")
    if strace is None:
        log("syscalls: strace is missing; cannot count system calls (apt-get install strace)")
        results["syscalls"] = {"error": "strace missing"}
        return results
    trace = os.path.join(out_dir, "strace.txt")
    log(f"syscalls: strace -f over {n} semaphore pairs and {n} mutex pairs in a native container")
    cmd = [strace, "-f", "-qq", "-o", trace, sys.executable, os.path.abspath(__file__), "--_strace-child", str(n)]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    if r.returncode != 0:
        results["syscalls"] = {"error": f"strace run failed ({r.returncode}): {r.stderr[-500:]}"}
        log(f"syscalls: {results['syscalls']['error']}")
        return results
    lines_by_pid: dict[str, list[str]] = {}
    with open(trace) as f:
        for line in f:
            pid, _, rest = line.partition(" ")
            lines_by_pid.setdefault(pid, []).append(rest.strip())
    found = None
    for pid, lines in lines_by_pid.items():
        marks = [next((i for i, l in enumerate(lines) if f'"{MARK}{k}"' in l), None) for k in (1, 2, 3)]
        if None not in marks:
            found = (pid, lines, marks)
    if found is None:
        results["syscalls"] = {"error": "markers not found in the trace"}
        return results
    pid, lines, marks = found

    def count(a, b):
        calls = [l for l in lines[a + 1:b] if not l.startswith(("<...", "---", "+++"))]
        names = {}
        for l in calls:
            nm = l.split("(", 1)[0]
            names[nm] = names.get(nm, 0) + 1
        return len(calls), names

    sc, sn = count(marks[0], marks[1])
    mc, mn = count(marks[1], marks[2])
    results["syscalls"] = {"pairs": n, "semaphore_pairs_syscalls": sc, "semaphore_by_name": sn,
                           "mutex_pairs_syscalls": mc, "mutex_by_name": mn, "container_pid": int(pid),
                           "method": "strace -f; syscalls of the container between stat() marker calls"}
    os.unlink(trace)
    log(f"syscalls: {sc} during {n} semaphore pairs, {mc} during {n} mutex pairs")
    return results


# ------------------------------------------------------------ 6. memory ----

def job_memory(jc: JobCtx):
    from netplex_native import mutex, semaphore
    semaphore.create("m.sem", 1)
    semaphore.decrement("m.sem")
    semaphore.increment("m.sem")
    with mutex.access("m.mtx"):
        pass
    jc.emit("up")


def vmrss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def pss_kb(pid):
    """Proportional set size: shared (fork, segment) pages split among their users."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def bench_memory(q, results):
    from netplex_native.native import domain as _native
    d = _native.Domain.create()
    size, cfg = d.size, d.config
    d.unlink()
    d.close()
    mem = {"segment_bytes_default": size, "segment_config_default": cfg}
    for backend in ("native", "rpc"):
        log(f"memory: {backend} controller with 8 containers")
        with Session(backend, 8, job_memory) as s:
            ups = s.wait("up", count=8)
            time.sleep(0.5)
            ctrl_kb = vmrss_kb(s.pid)
            conts = [vmrss_kb(e["pid"]) for e in ups]
            pss = [pss_kb(s.pid)] + [pss_kb(e["pid"]) for e in ups]
            mem[backend] = {"controller_rss_kb": ctrl_kb, "container_rss_kb_median": med(conts),
                            "container_rss_kb": conts, "total_rss_kb": ctrl_kb + sum(conts),
                            "controller_pss_kb": pss[0], "container_pss_kb_median": med([x for x in pss[1:] if x]),
                            "total_pss_kb": sum(x for x in pss if x) if all(pss) else None}
    results["memory"] = mem
    return results


# ---------------------------------------------------------- reporting ----

def targets(results):
    T = []

    def add(name, value, limit, ok, detail):
        T.append({"target": name, "value": value, "limit": limit, "pass": bool(ok), "detail": detail})

    u = results.get("uncontended")
    if u:
        m = lambda k: u[k]["median"]
        r = m("native_sem") / m("posix_ipc_sem")
        add("native sem pair <= 2.5x posix_ipc pair", r, 2.5, r <= 2.5,
            f"{m('native_sem'):.0f} ns vs {m('posix_ipc_sem'):.0f} ns")
        r = m("native_sem") / m("floor_2_cffi_noop")
        add("native sem pair <= 1.5x two empty cffi calls", r, 1.5, r <= 1.5,
            f"{m('native_sem'):.0f} ns vs {m('floor_2_cffi_noop'):.0f} ns")
        r = m("sysv_sem_undo") / m("native_sem")
        add("native sem pair >= 2x faster than sysv_ipc SEM_UNDO", r, 2.0, r >= 2.0,
            f"{m('sysv_sem_undo'):.0f} ns vs {m('native_sem'):.0f} ns")
        r = m("flock") / m("native_mutex")
        add("native mutex pair >= 2x faster than flock", r, 2.0, r >= 2.0,
            f"{m('flock'):.0f} ns vs {m('native_mutex'):.0f} ns")
        px = m("posix_ipc_sem")
        r = max(m("native_sem"), m("native_mutex")) / px
        add("native pair by name (semaphore.*, mutex handle lock/unlock) <= 1.3x posix_ipc pair", r, 1.3,
            r <= 1.3, f"sem {m('native_sem'):.0f} ns, mutex {m('native_mutex'):.0f} ns vs {px:.0f} ns")
        hs = [k for k in ("native_sem_handle", "native_domain_sem_handle", "native_domain_mutex_handle",
                          "native_domain_sem") if k in u]
        if hs:
            r = max(m(k) for k in hs) / px
            add("native pair through a handle <= 0.8x posix_ipc pair", r, 0.8, r <= 0.8,
                "; ".join(f"{k} {m(k):.0f} ns" for k in hs) + f" vs {px:.0f} ns")
        if "rpc_sem" in u:
            def cpu(k):
                e = u.get(k, {})
                if "cpu_ns" not in e:
                    return "?"
                return f"{e['cpu_ns'] / 1000:.1f} + {e['peer_cpu_ns'] / 1000:.1f}" if "peer_cpu_ns" in e \
                    else f"{e['cpu_ns'] / 1000:.1f} + ?"

            def pls(a, b, f):
                return "".join(f"; {pl}: {f(m(a + '@' + pl), m(b + '@' + pl))}" for pl in ("same", "cross")
                               if f"{a}@{pl}" in u and f"{b}@{pl}" in u)
            # Verdict on the worst PINNED placement: unpinned, each candidate lands
            # same-CPU or cross-CPU by chance and the ratio compares unlike cases.
            pl_ok = [pl for pl in ("@same", "@cross") if f"rpc_sem{pl}" in u] or [""]
            info = [pl for pl in ("",) if pl not in pl_ok]
            rs = {pl or "@any": m("rpc_sem" + pl) / m("socketpair_floor" + pl) for pl in pl_ok + info}
            r = max(rs[pl or "@any"] for pl in pl_ok)
            add("RPC sem pair <= 1.5x bare socketpair floor (worst pinned placement)", r, 1.5, r <= 1.5,
                "; ".join(f"{k[1:]}: {m('rpc_sem' + (k if k != '@any' else '')) / 1000:.1f} vs "
                          f"{m('socketpair_floor' + (k if k != '@any' else '')) / 1000:.1f} us = {v:.2f}x"
                          for k, v in rs.items())
                + "".join(f"; {k[1:]}: asyncio echo peer {m('socketpair_asyncio_echo' + (k if k != '@any' else '')) / m('socketpair_floor' + (k if k != '@any' else '')):.2f}x the floor"
                          for k in rs if "socketpair_asyncio_echo" + (k if k != "@any" else "") in u)
                + "".join(f"; {k[1:]}: reply poll off {m('rpc_sem_nopoll' + (k if k != '@any' else '')) / m('socketpair_floor' + (k if k != '@any' else '')):.2f}x the floor"
                          for k in rs if "rpc_sem_nopoll" + (k if k != "@any" else "") in u)
                + "".join(f"; {k[1:]}: CPU per pair, container + controller "
                          f"{cpu('rpc_sem' + (k if k != '@any' else ''))} us, poll off "
                          f"{cpu('rpc_sem_nopoll' + (k if k != '@any' else ''))} us, floor client + peer "
                          f"{cpu('socketpair_floor' + (k if k != '@any' else ''))} us"
                          for k in rs if "cpu_ns" in u.get("rpc_sem" + (k if k != "@any" else ""), {})))
            rs = {pl or "@any": m("mp_manager_sem" + pl) / m("rpc_sem" + pl) for pl in pl_ok + info}
            r = min(rs[pl or "@any"] for pl in pl_ok)
            add("RPC sem pair faster than multiprocessing.Manager (worst pinned placement)", r, 1.0, r > 1.0,
                "; ".join(f"{k[1:]}: {m('rpc_sem' + (k if k != '@any' else '')) / 1000:.1f} vs "
                          f"{m('mp_manager_sem' + (k if k != '@any' else '')) / 1000:.1f} us = {v:.2f}x faster"
                          for k, v in rs.items()))
    c = results.get("contention")
    if c:
        worst = None
        parts = []
        for K in results["contention_config"]["K"] + [
                f"2@{pl}" for pl in results["contention_config"].get("pinned_K2", [])]:
            if str(K) not in c["native_mutex"]:
                continue
            r = c["native_mutex"][str(K)]["median"] / c["posix_ipc_sem@native"][str(K)]["median"]
            parts.append(f"K={K}: {r:.2f}x")
            worst = r if worst is None else min(worst, r)
        add("native contended throughput >= posix_ipc at every K", worst, 1.0, worst >= 1.0, "; ".join(parts))
    h = results.get("handoff")
    if h:
        rs = {pl[1:] or "any": h["native_sem" + pl]["median"] / h["posix_ipc_sem@native" + pl]["median"]
              for pl in ("", "@same", "@cross") if "native_sem" + pl in h}
        pinned = [k for k in ("same", "cross") if k in rs] or ["any"]
        r = max(rs[k] for k in pinned)
        add("native hand-off latency <= 1.0x posix_ipc (worst pinned placement; issue 15)", r, 1.0, r <= 1.0,
            "; ".join(f"{k}: {h['native_sem' + ('@' + k if k != 'any' else '')]['median'] / 1000:.2f} vs "
                      f"{h['posix_ipc_sem@native' + ('@' + k if k != 'any' else '')]['median'] / 1000:.2f} us = {v:.2f}x"
                      for k, v in rs.items())
            + "".join(f"; same, both in worker threads: {h['native_sem_thread@same']['median'] / 1000:.2f} vs "
                      f"{h['posix_ipc_sem_thread@native@same']['median'] / 1000:.2f} us = "
                      f"{h['native_sem_thread@same']['median'] / h['posix_ipc_sem_thread@native@same']['median']:.2f}x"
                      for _ in [0] if "native_sem_thread@same" in h))
    rc = results.get("recovery")
    if rc:
        v = rc["native_mutex"]["median"]
        add("native recovery latency median <= 2 ms", v, 2.0, v <= 2.0,
            f"median {v:.2f} ms, p99 {rc['native_mutex']['p99']:.2f} ms (flock {rc['flock@native']['median']:.2f} ms)")
    s = results.get("syscalls")
    if s and "error" not in s:
        v = s["semaphore_pairs_syscalls"] + s["mutex_pairs_syscalls"]
        add("zero syscalls on the uncontended native path", v, 0, v == 0,
            f"{s['semaphore_pairs_syscalls']} (sem) + {s['mutex_pairs_syscalls']} (mutex) over {s['pairs']} pairs each")
    elif s:
        add("zero syscalls on the uncontended native path", None, 0, False, s["error"])
    return T


REFS = {  # row -> reference row for the ratio column
    "uncontended": {
        "floor_2_cffi_noop": "posix_ipc_sem", "native_raw_cffi_sem": "posix_ipc_sem", "native_domain_sem": "posix_ipc_sem",
        "native_sem": "posix_ipc_sem", "native_sem_protected": "posix_ipc_sem", "posix_ipc_sem": "posix_ipc_sem",
        "native_sem_handle": "posix_ipc_sem", "native_domain_sem_handle": "posix_ipc_sem",
        "native_domain_mutex_handle": "flock",
        "sysv_sem_undo": "posix_ipc_sem", "mp_sem": "posix_ipc_sem",
        "native_domain_mutex": "flock", "native_mutex": "flock", "flock": "flock", "mp_lock": "flock",
        "rpc_sem": "socketpair_floor", "socketpair_floor": "socketpair_floor",
        "mp_manager_sem": "socketpair_floor", "rpc_mutex": "socketpair_floor",
        "socketpair_asyncio_echo": "socketpair_floor",
        "posix_ipc_sem@rpc": "posix_ipc_sem@rpc",
    },
}


def fmt(v, unit):
    if v is None or v != v:
        return "-"
    if unit.startswith("ns"):
        return f"{v / 1000:.2f} us" if v >= 10_000 else f"{v:.0f} ns"
    if unit == "ops/s":
        return f"{v:,.0f}/s"
    if unit == "ms":
        return f"{v:.3f} ms"
    return f"{v:g}"


def print_table(results):
    rows = []
    u = results.get("uncontended", {})
    for name, d in u.items():
        base, _, pl = name.partition("@")
        ref = REFS["uncontended"].get(name)
        if ref is None and pl in ("same", "cross"):
            ref = REFS["uncontended"].get(base, "") + "@" + pl
        ratio = d["median"] / u[ref]["median"] if ref in u else None
        rows.append(("uncontended pair", name, d, d["unit"], ref, ratio))
    c = results.get("contention", {})
    for name, byk in c.items():
        for K, d in byk.items():
            refk = "posix_ipc_sem@native" if "native" in name or name.startswith("flock") else "posix_ipc_sem@rpc"
            ref = c.get(refk, {}).get(K)
            rows.append((f"contended K={K}", name, d, "ops/s", refk, d["median"] / ref["median"] if ref else None))
    h = results.get("handoff", {})
    for name, d in h.items():
        pl = name.rsplit("@", 1)[1] if name.endswith(("@same", "@cross")) else None
        sfx = f"@{pl}" if pl else ""
        if name.startswith("native_sem_thread"):
            refk = "posix_ipc_sem_thread@native" + sfx
        elif name.startswith("native_sem"):
            refk = "posix_ipc_sem@native" + sfx
        elif name.startswith("rpc_sem"):
            refk = "posix_ipc_sem@rpc" + sfx
        else:
            refk = name
        rows.append(("hand-off", name, d, d["unit"], refk, d["median"] / h[refk]["median"] if refk in h else None))
    rc = results.get("recovery", {})
    for name, d in rc.items():
        refk = "flock@native" if "native" in name else "flock@rpc"
        rows.append(("recovery", name, d, "ms", refk, d["median"] / rc[refk]["median"] if refk in rc else None))
    w = [18, 24, 12, 12, 12, 8, 22]
    hdr = ["section", "candidate", "median", "min", "max", "ratio", "reference"]
    print()
    print("  ".join(h.ljust(n) for h, n in zip(hdr, w)))
    print("-" * (sum(w) + 2 * len(w)))
    for sec, name, d, unit, ref, ratio in rows:
        extra = f"  p99 {d['p99']:.3f} ms" if "p99" in d else ""
        print("  ".join(s.ljust(n) for s, n in zip(
            [sec, name, fmt(d["median"], unit), fmt(d["min"], unit), fmt(d["max"], unit),
             f"{ratio:.2f}x" if ratio is not None else "-", ref or ""], w)) + extra)
    s = results.get("syscalls")
    if s:
        print()
        if "error" in s:
            print(f"syscalls: {s['error']}")
        else:
            print(f"syscalls on the uncontended native path (strace -f, between markers): "
                  f"{s['semaphore_pairs_syscalls']} over {s['pairs']} sem pairs {s['semaphore_by_name'] or ''}, "
                  f"{s['mutex_pairs_syscalls']} over {s['pairs']} mutex pairs {s['mutex_by_name'] or ''}")
    m = results.get("memory")
    if m:
        print(f"memory: default segment {m['segment_bytes_default']:,} bytes for {m['segment_config_default']}")
        for b in ("native", "rpc"):
            if b in m:
                print(f"  {b:6}: controller RSS {m[b]['controller_rss_kb']:,} kB, container RSS median "
                      f"{m[b]['container_rss_kb_median']:,.0f} kB, total (1+8) {m[b]['total_rss_kb']:,} kB"
                      + (f"; PSS controller {m[b]['controller_pss_kb']:,} kB, container median "
                         f"{m[b]['container_pss_kb_median']:,.0f} kB, total {m[b]['total_pss_kb']:,} kB"
                         if m[b].get("total_pss_kb") else ""))
    from asyncwaits import print_asyncwaits
    print_asyncwaits(results)
    from names import print_names
    print_names(results)
    mc = results.get("machine", {})
    print(f"\nmachine: {mc.get('nproc')} CPUs, {mc.get('cpu')}, kernel {mc.get('kernel')}, "
          f"Python {mc.get('python')}; one futex syscall (FUTEX_WAKE, no waiter) "
          f"{mc.get('futex_syscall_ns') or float('nan'):.0f} ns; load average "
          f"{(mc.get('loadavg_start') or ['?'])[0]} at start, {(mc.get('loadavg_end') or ['?'])[0]} at end")
    print()
    print("targets:")
    for t in results.get("targets", []):
        v = t["value"]
        vs = f"{v:.3g}" if isinstance(v, float) else str(v)
        print(f"  {'PASS' if t['pass'] else 'MISS'}  {t['target']}: {vs} (limit {t['limit']}) — {t['detail']}")


def plot(results, out_dir):
    c = results.get("contention")
    if not c:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("notice: matplotlib is not installed; skipping the plot (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, byk in c.items():
        Ks = sorted(int(k) for k in byk if "@" not in k)      # the pinned K = 2 rows: in the table
        ys = [byk[str(k)]["median"] for k in Ks]
        lo = [byk[str(k)]["median"] - byk[str(k)]["min"] for k in Ks]
        hi = [byk[str(k)]["max"] - byk[str(k)]["median"] for k in Ks]
        ax.errorbar(Ks, ys, yerr=[lo, hi], marker="o", capsize=3, label=name)
    ax.set_xlabel("K (processes contending)")
    ax.set_ylabel("total lock+unlock per second")
    ax.set_yscale("log")
    ax.set_xticks(results["contention_config"]["K"])
    m = results.get("machine", {})
    ax.set_title(f"Contended throughput (median, min-max), {m.get('nproc')} CPUs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "contention.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine():
    from machine import machine as record      # bench/machine.py
    return record()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (1-2 minutes)")
    ap.add_argument("--out", default=os.path.relpath(os.path.join(HERE, "results")),
                    help="output directory (default: bench/results of the checkout)")
    ap.add_argument("--only", default=None, help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--_strace-child", dest="strace_child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--report", default=None, metavar="RESULTS.json",
                    help="print the table of a saved run again (targets recomputed)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:          # netplex-native bench -- --quick
        argv = argv[1:]
    args = ap.parse_args(argv)
    if args.strace_child is not None:
        return strace_child(args.strace_child)
    if args.report:
        with open(args.report) as f:
            results = json.load(f)
        results["targets"] = targets(results)
        print_table(results)
        return 0
    sections = SECTIONS if not args.only else [s.strip() for s in args.only.split(",")]
    for s in sections:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}")
    try:
        from netplex_native.native import domain as _native
        if not _native.available():
            raise ImportError("netplex_native._core missing")
        import posix_ipc, sysv_ipc  # noqa: F401
    except ImportError as e:
        print(f"error: {e}; install with: pip install -e '.[bench]'", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    t_start = time.monotonic()
    results = {"machine": machine(), "quick": args.quick, "sections": sections}
    log(f"netplex_native bench ({'quick' if args.quick else 'full'}): {', '.join(sections)}; "
        f"{results['machine']['nproc']} CPUs, {results['machine']['cpu']}, Python {results['machine']['python']}")
    for sec in sections:
        t0 = time.monotonic()
        try:
            if sec == "syscalls":
                bench_syscalls(args.quick, results, args.out)
            elif sec == "names":
                from names import bench_names
                bench_names(args.quick, results, log)
            elif sec == "asyncwaits":
                from asyncwaits import bench_asyncwaits
                bench_asyncwaits(args.quick, results, Session, log)
            else:
                globals()[f"bench_{sec}"](args.quick, results)
        except Exception as e:
            traceback.print_exc()
            results.setdefault("errors", {})[sec] = repr(e)
            log(f"{sec}: FAILED: {e!r}")
        log(f"{sec}: {time.monotonic() - t0:.1f} s")
    try:
        results["targets"] = targets(results)
    except Exception as e:
        traceback.print_exc()
        results["targets"] = []
        results.setdefault("errors", {})["targets"] = repr(e)
    results["elapsed_s"] = time.monotonic() - t_start
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    png = plot(results, args.out)
    print_table(results)
    print(f"\nraw figures: {path}" + (f"; plot: {png}" if png else "") + f"; {results['elapsed_s']:.0f} s")
    return 0 if not results.get("errors") else 2


if __name__ == "__main__":
    sys.exit(main())
