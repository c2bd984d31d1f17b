"""Kill storm: containers hammer protected semaphores and mutexes while
random containers are SIGKILLed; invariants are checked from a record file
that does not depend on either backend.

Used by tests/test_reliability.py (a few seconds per backend) and runnable on
its own for a longer storm::

    python3 tests/stress.py --backend native --seconds 120

the async waiters' checks with 10,000 coroutines in one container (issue 10)::

    python3 tests/stress.py --async-waiters 10000 --backend both

and the soak of issue 13 (flood + kills + stopped containers + huge values +
admin clients; the controller's RSS and fds must stay flat)::

    python3 tests/stress.py --soak --backend rpc --seconds 600

How overlap is detected without trusting the primitives under test
-------------------------------------------------------------------
Every process appends fixed-size 32-byte records to one file opened with
``O_APPEND`` (32 divides the page size, so a record never straddles a page
and a SIGKILL cannot tear it).  Appends to one file are serialised by the
kernel, so the file order is a linearisation of the events:

- a container writes ENTER after its lock/decrement succeeded and EXIT before
  its unlock/increment, so a correct primitive always puts the previous
  holder's EXIT before the next holder's ENTER;
- the storm writes KILL(pid) *before* ``kill(pid, SIGKILL)``: a killed
  holder's section ends at its death, which is after that record, and nothing
  can be granted to the next holder before the death (the grant comes from
  recovery after the reap).  So ending a killed holder's section at its KILL
  record never reports a false overlap; records a victim still writes after
  its KILL record are ignored.

Replaying the file: at every ENTER the open sections of a mutex must be 0 and
those of a semaphore below its initial value.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import netplex_native as netplex  # noqa: E402
from netplex_native import admin, cenv, mutex, semaphore, sharedvar  # noqa: E402
from harness import Events, run_controller, plugins_for, wait_until  # noqa: E402
import harness  # noqa: E402


def pid_alive(pid: int) -> bool:
    """harness.pid_alive, tolerating a process that vanishes while /proc is read."""
    try:
        return harness.pid_alive(pid)
    except ProcessLookupError:
        return False

REC = struct.Struct("<iBBHqqq")          # pid, kind, resource, pad, a, b, c: 32 bytes
assert REC.size == 32
ENTER, EXIT, KILL, WAIT, OP, GET = 1, 2, 3, 4, 5, 6

MUTEXES = ["storm.m0", "storm.m1"]
SEMS = ["storm.s0", "storm.s1"]
SEM_INITIAL = 2
#: A waiter gives up after this long; a wait longer than LONG_WAIT is a violation
#: (critical sections last at most a few ms, and a dead holder is recovered at its reap).
WAIT_TIMEOUT = 2.5
LONG_WAIT = 2.0
MAX_HOLD = 0.003


def _res_name(res: int) -> str:
    return MUTEXES[res] if res < 10 else SEMS[res - 10]


class StormHooks(netplex.ProcessorHooks):
    def __init__(self, backend: str, path: str, stopflag: str, events: Events, seed: int):
        self.backend = backend
        self.path = path
        self.stopflag = stopflag
        self.events = events
        self.seed = seed
        self.fd = -1
        self.quiet = False

    # -- controller --
    def post_add_hook(self, service, ctrl):
        for p in plugins_for(self.backend):
            ctrl.add_plugin(p)
        for s in SEMS:   # before any container exists: no implicit creation at 0
            semaphore.create(s, SEM_INITIAL, protected=True)

    # -- container --
    def rec(self, kind, res=0, a=0, b=0, c=0):
        os.write(self.fd, REC.pack(os.getpid(), kind, res, 0, a, b, c))

    def post_start_hook(self, cont):
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.rng = random.Random(self.seed * 1_000_003 + os.getpid())
        self.events.emit("started", cid=cont.id)
        cenv.create_timer(self.tick, 0.001)

    def section(self, res):
        self.rec(ENTER, res)
        hold = self.rng.random() * MAX_HOLD
        if hold > MAX_HOLD / 2:
            time.sleep(hold)
        self.rec(EXIT, res)

    def waited(self, res, t0, ok):
        dt = time.monotonic() - t0
        self.rec(WAIT, res, int(dt * 1e6), int(ok))

    def tick(self, timer):
        if self.quiet:
            return True
        if os.path.exists(self.stopflag):
            self.quiet = True
            self.events.emit("quiet")
            return True
        rng = self.rng
        x = rng.random()
        i = rng.randrange(2)
        if x < 0.30:                                   # mutex, waiting
            m = mutex.access(MUTEXES[i])
            t0 = time.monotonic()
            ok = m.lock(timeout=WAIT_TIMEOUT)
            self.waited(i, t0, ok)
            if ok:
                self.section(i)
                m.unlock()
        elif x < 0.40:                                 # mutex, trylock
            m = mutex.access(MUTEXES[i])
            if m.lock(timeout=0):
                self.section(i)
                m.unlock()
        elif x < 0.70:                                 # semaphore, waiting
            t0 = time.monotonic()
            r = semaphore.decrement(SEMS[i], wait=True, timeout=WAIT_TIMEOUT)
            self.waited(10 + i, t0, r >= 0)
            if r >= 0:
                self.section(10 + i)
                semaphore.increment(SEMS[i])
        elif x < 0.80:                                 # semaphore, no wait
            if semaphore.decrement(SEMS[i]) >= 0:
                self.section(10 + i)
                semaphore.increment(SEMS[i])
        elif x < 0.85:
            self.rec(GET, 10 + i, semaphore.get(SEMS[i]))
        else:                                          # the awaitable forms
            return self.atick(x, i)
        self.rec(OP)
        return True

    async def atick(self, x, i):
        if x < 0.92:
            m = mutex.access(MUTEXES[i])
            t0 = time.monotonic()
            ok = await m.lock_async(timeout=WAIT_TIMEOUT)
            self.waited(i, t0, ok)
            if ok:
                self.section(i)
                m.unlock()
        else:
            t0 = time.monotonic()
            r = await semaphore.decrement_async(SEMS[i], wait=True, timeout=WAIT_TIMEOUT)
            self.waited(10 + i, t0, r >= 0)
            if r >= 0:
                self.section(10 + i)
                semaphore.increment(SEMS[i])
        self.rec(OP)
        return True


def verify(path: str) -> dict:
    """Replay the record file; the figures and the list of violations."""
    with open(path, "rb") as f:
        data = f.read()
    violations = []
    if len(data) % REC.size:
        violations.append(f"record file has a torn record ({len(data)} bytes)")
    killed: set[int] = set()
    open_: dict[int, set[int]] = {r: set() for r in (0, 1, 10, 11)}
    ops = sections = waits = long_waits = failed_waits = kills_in_section = 0
    max_wait = 0.0
    for off in range(0, len(data) - len(data) % REC.size, REC.size):
        pid, kind, res, _, a, b, _c = REC.unpack_from(data, off)
        if kind == KILL:
            killed.add(pid)
            if any(pid in holders for holders in open_.values()):
                kills_in_section += 1
            for holders in open_.values():
                holders.discard(pid)
            continue
        if pid in killed:
            continue
        if kind == ENTER:
            holders = open_[res]
            limit = 1 if res < 10 else SEM_INITIAL
            if len(holders) >= limit:
                violations.append(f"{_res_name(res)}: pid {pid} entered while {sorted(holders)} "
                                  f"held it (limit {limit}) at record {off // REC.size}")
            holders.add(pid)
            sections += 1
        elif kind == EXIT:
            if pid not in open_[res]:
                violations.append(f"{_res_name(res)}: pid {pid} left a section it never entered")
            open_[res].discard(pid)
        elif kind == WAIT:
            waits += 1
            dt = a / 1e6
            max_wait = max(max_wait, dt)
            if not b:
                failed_waits += 1
            if dt > LONG_WAIT:
                long_waits += 1
                violations.append(f"{_res_name(res)}: pid {pid} waited {dt:.3f}s "
                                  f"({'granted' if b else 'timed out'})")
        elif kind == OP:
            ops += 1
        elif kind == GET:
            if not 0 <= a <= SEM_INITIAL:
                violations.append(f"{_res_name(res)}: get() returned {a}, outside [0, {SEM_INITIAL}]")
    return {"ops": ops, "sections": sections, "waits": waits, "failed_waits": failed_waits,
            "long_waits": long_waits, "kills_in_section": kills_in_section, "max_wait": round(max_wait, 4), "violations": violations}


def primitives_state(socket_dir: str) -> tuple[dict, dict, dict]:
    """(semaphores by name, mutexes by name, raw inspect) from the admin socket."""
    r = admin.request(socket_dir, {"cmd": "inspect"}, timeout=10)
    assert r.get("ok"), r
    sems, mtxs = {}, {}
    for data in r["plugins"].values():
        for s in data.get("semaphores", []) if isinstance(data, dict) else []:
            sems[s["name"]] = s
        for m in data.get("mutexes", []) if isinstance(data, dict) else []:
            mtxs[m["name"]] = m
    return sems, mtxs, r


def quiet_violations(sems: dict, mtxs: dict) -> list[str]:
    out = []
    for name in SEMS:
        s = sems.get(name)
        if s is None:
            out.append(f"semaphore {name} is missing from inspect")
            continue
        if s["value"] != SEM_INITIAL:
            out.append(f"semaphore {name} is {s['value']} once quiet, not {SEM_INITIAL}: {s}")
        if s.get("waiters"):
            out.append(f"semaphore {name} has waiters once quiet: {s}")
        if any(v for v in (s.get("holders") or {}).values()):
            out.append(f"semaphore {name} has holders once quiet: {s}")
    for name in MUTEXES:
        m = mtxs.get(name)
        if m is not None and (m["locked"] or m.get("waiters")):
            out.append(f"mutex {name} is not free once quiet: {m}")
    return out


def run_storm(backend: str, seconds: float, workdir: str, *, kill_interval: float = 0.05,
              workers: int = 4, seed: int | None = None, out=print) -> dict:
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    path = os.path.join(workdir, "records.bin")
    stopflag = os.path.join(workdir, "stop")
    sdir = os.path.join(workdir, "sock")
    open(path, "wb").close()
    events = Events()
    result = {"backend": backend, "seed": seed, "kills": 0, "controller_alive": False}

    def build():
        ctrl = netplex.Controller(socket_dir=sdir, max_start_failures=10**9, backoff=(0.01, 0.05))
        ctrl.add_service(netplex.Service("storm", hooks=StormHooks(backend, path, stopflag, events, seed),
                                         workers=workers))
        return ctrl

    extra = []
    try:
        with run_controller(build) as proc:
            events.wait("started", count=workers, timeout=20)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            killed: set[int] = set()
            t_end = time.monotonic() + seconds
            next_kill = time.monotonic() + kill_interval
            while time.monotonic() < t_end:
                events.poll(max(0.0, next_kill - time.monotonic()))
                next_kill += kill_interval
                if not proc.alive():
                    extra.append("the controller died during the storm")
                    break
                live = sorted({e["pid"] for e in events.all("started")} - killed)
                live = [p for p in live if pid_alive(p)]
                if not live:
                    continue
                victim = rng.choice(live)
                os.write(fd, REC.pack(victim, KILL, 0, 0, 0, 0, 0))
                killed.add(victim)
                try:
                    os.kill(victim, signal.SIGKILL)
                    result["kills"] += 1
                except ProcessLookupError:
                    pass
            os.close(fd)
            # quiet: no more kills; containers finish their operation and idle
            open(stopflag, "w").close()
            t_quiet = time.monotonic()

            def all_quiet():
                events.poll(0.05)
                try:
                    st = admin.request(sdir, {"cmd": "list"}, timeout=5)
                except Exception:
                    return False
                pids = {c["pid"] for s in st["services"] for c in s["containers"]}
                quiet = {e["pid"] for e in events.all("quiet")}
                return len(pids) == workers and pids <= quiet

            if not wait_until(all_quiet, 20, 0.05):
                extra.append("containers did not become quiet within 20 s")
            result["quiet_after"] = round(time.monotonic() - t_quiet, 3)
            sems, mtxs, raw = primitives_state(sdir)
            extra += quiet_violations(sems, mtxs)
            if backend == "native":
                from netplex_native.native import domain as _native
                seg = raw["plugins"]["native"]["segment"]
                dom = _native.Domain.attach(seg)
                try:
                    dom.check()
                except Exception as e:
                    extra.append(f"native segment check failed once quiet: {e}")
                finally:
                    dom.close()
            result["controller_alive"] = proc.alive()
            if not result["controller_alive"]:
                extra.append("the controller is not alive after the storm")
            code = proc.stop()
            result["exit_code"] = code
            if code != 0:
                extra.append(f"the controller exited with {code} on SIGTERM")
        result["starts"] = len(events.all("started"))
    finally:
        events.close()
    result.update(verify(path))
    result["violations"] = extra + result["violations"]
    out(f"kill storm [{backend}] seed={seed}: {result['kills']} kills in {seconds}s "
        f"({result['kills_in_section']} inside a critical section), "
        f"{result['starts']} container starts, {result['ops']} operations, {result['sections']} "
        f"critical sections, {result['waits']} waits (max {result['max_wait']}s, "
        f"{result['failed_waits']} timed out), {len(result['violations'])} violations")
    for v in result["violations"][:20]:
        out("  VIOLATION: " + v)
    return result


# ---------------------------------------------------------------- the soak (issue 13)

class _SoakFlood(netplex.ProcessorHooks):
    """Floods broadcasts (from the loop and from a thread) and makes calls."""

    def __init__(self, backend):
        self.backend = backend

    def post_add_hook(self, service, ctrl):
        for p in plugins_for(self.backend):
            ctrl.add_plugin(p)
        ctrl.add_plugin(sharedvar.plugin)

    def post_start_hook(self, cont):
        import threading
        semaphore.create("soak.s", 2, protected=True)
        self.arg = "f" * 1024
        cenv.create_timer(self.tick, 0.01)
        threading.Thread(target=self.thread_flood, daemon=True).start()

    def thread_flood(self):
        while True:
            try:
                for _ in range(50):
                    cenv.send_message("sink", "t", [self.arg])
                semaphore.get("soak.s")
            except netplex.NetplexError:
                return
            time.sleep(0.01)

    def tick(self, timer):
        for _ in range(100):
            cenv.send_message("sink", "m", [self.arg])
        if semaphore.decrement("soak.s", wait=True, timeout=1) >= 0:
            with mutex.access("soak.m"):
                pass
            semaphore.increment("soak.s")
        return True


class _SoakSink(_SoakFlood):
    """Receives the flood; sometimes blocked in a synchronous wait meanwhile."""

    def post_start_hook(self, cont):
        sharedvar.create_var("soak.never")
        self.n = 0
        cenv.create_timer(self.block, 0.2)

    def receive_message(self, cont, name, args):
        self.n += 1

    def block(self, timer):
        sharedvar.wait_for_value("soak.never", timeout=0.3)
        return True


class _SoakHuge(_SoakFlood):
    """Huge values: sets 8 MB values, three coroutines wait for them."""

    def post_start_hook(self, cont):
        import asyncio
        sharedvar.create_var("soak.big")
        sharedvar.create_var("soak.enc", enc=True)
        self.i = 0
        cenv.create_timer(self.tick, 0.5)
        loop = asyncio.get_running_loop()
        for _ in range(3):
            loop.create_task(self.wait())

    async def wait(self):
        while True:
            await sharedvar.wait_for_value_async("soak.big", 2)

    def tick(self, timer):
        self.i += 1
        sharedvar.set_value("soak.big", chr(97 + self.i % 26) * (8 << 20))
        sharedvar.set_value("soak.enc", bytes(4 << 20))
        assert len(sharedvar.get_value("soak.enc")) == 4 << 20
        return True


def _proc_figures(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def run_soak(seconds: float, workdir: str, *, backend: str = "rpc", seed: int | None = None,
             out=print) -> dict:
    """Flood + kills + stopped containers + huge values + admin clients for
    *seconds*; the controller's RSS and fds sampled every 10 s must be flat
    (last third vs the first sample after a warm-up of a sixth of the run)."""
    import socket as _socket
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    sdir = os.path.join(workdir, "sock")

    def build():
        ctrl = netplex.Controller(socket_dir=sdir, max_start_failures=10**9, backoff=(0.05, 0.5),
                                  admin_idle_timeout=5.0)
        ctrl.add_service(netplex.Service("flood", hooks=_SoakFlood(backend), workers=2))
        ctrl.add_service(netplex.Service("sink", hooks=_SoakSink(backend), workers=4))
        ctrl.add_service(netplex.Service("huge", hooks=_SoakHuge(backend), workers=1))
        return ctrl

    r = {"backend": backend, "seed": seed, "seconds": seconds, "kills": 0, "stops": 0,
         "admin_requests": 0, "idle_admin_connections": 0, "samples": [], "problems": []}
    t0 = time.monotonic()
    with run_controller(build) as proc:
        if not wait_until(lambda: os.path.exists(os.path.join(sdir, "admin.sock")), 20):
            r["problems"].append("the controller did not start")
            return r
        time.sleep(1.0)
        idle = []
        stopped: dict[int, float] = {}
        t_end = t0 + seconds
        next_sample = time.monotonic()
        next_kill = next_stop = next_idle = time.monotonic()
        while time.monotonic() < t_end:
            time.sleep(0.05)
            now = time.monotonic()
            if not proc.alive():
                r["problems"].append(f"the controller died after {now - t0:.0f} s")
                break
            try:
                st = admin.request(sdir, {"cmd": "list"}, timeout=10)
                admin.request(sdir, {"cmd": "inspect"}, timeout=10)
                r["admin_requests"] += 2
            except Exception as e:
                r["problems"].append(f"admin request failed at {now - t0:.0f} s: {e}")
                continue
            pids = {c["service"]: [] for c in []}
            conts = [(c["service"], c["pid"]) for s_ in st["services"] for c in s_["containers"]]
            for pid, until in list(stopped.items()):
                if now >= until:
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
                    del stopped[pid]
            if now >= next_kill and conts:
                next_kill = now + 0.5
                _, victim = rng.choice(conts)
                try:
                    os.kill(victim, signal.SIGKILL)
                    r["kills"] += 1
                except ProcessLookupError:
                    pass
                stopped.pop(victim, None)
            if now >= next_stop:
                next_stop = now + 5.0
                sinks = [p for s_, p in conts if s_ in ("sink", "flood") and p not in stopped]
                if sinks:
                    victim = rng.choice(sinks)
                    try:
                        os.kill(victim, signal.SIGSTOP)
                        stopped[victim] = now + 3.0
                        r["stops"] += 1
                    except ProcessLookupError:
                        pass
            if now >= next_idle:
                next_idle = now + 2.0
                for c in idle:
                    c.close()
                idle = []
                for _ in range(5):
                    c = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                    c.connect(os.path.join(sdir, "admin.sock"))
                    idle.append(c)
                    r["idle_admin_connections"] += 1
            if now >= next_sample:
                next_sample = now + 10.0
                rss, fds = _proc_figures(proc.pid)
                r["samples"].append([round(now - t0), round(rss, 1), fds, st["queued_bytes"],
                                     st["dropped_messages"], sum(len(s_["containers"]) for s_ in st["services"])])
        for c in idle:
            c.close()
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        r["controller_alive"] = proc.alive()
        r["exit_code"] = proc.stop(30)
        if r["exit_code"] != 0:
            r["problems"].append(f"the controller exited with {r['exit_code']} on SIGTERM")
    left = [n for n in os.listdir(sdir)] if os.path.isdir(sdir) else []
    if left:
        r["problems"].append(f"left in the socket directory: {left}")
    samples = r["samples"]
    warm = [x for x in samples if x[0] >= seconds / 6] or samples
    last = [x for x in samples if x[0] >= seconds * 2 / 3] or samples[-1:]
    if warm and last:
        r["rss_warm_mb"], r["fds_warm"] = warm[0][1], warm[0][2]
        r["rss_last_mb"] = max(x[1] for x in last)
        r["rss_max_mb"] = max(x[1] for x in samples)
        r["fds_last"] = max(x[2] for x in last)
        r["fds_max"] = max(x[2] for x in samples)
        if r["rss_last_mb"] - r["rss_warm_mb"] > 64:
            r["problems"].append(f"controller RSS grew from {r['rss_warm_mb']} to {r['rss_last_mb']} MB")
        if r["fds_last"] - r["fds_warm"] > 16:
            r["problems"].append(f"controller fds grew from {r['fds_warm']} to {r['fds_last']}")
    out(f"soak [{backend}] seed={seed}: {seconds:.0f} s, {r['kills']} kills, {r['stops']} SIGSTOPs, "
        f"{r['admin_requests']} admin requests, {r['idle_admin_connections']} idle admin connections; "
        f"controller RSS {r.get('rss_warm_mb')} MB after warm-up, {r.get('rss_last_mb')} MB at the end "
        f"(max {r.get('rss_max_mb')}), fds {r.get('fds_warm')} -> {r.get('fds_last')} (max {r.get('fds_max')}); "
        f"{len(r['problems'])} problems")
    for p_ in r["problems"][:20]:
        out("  PROBLEM: " + p_)
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["rpc", "native", "both"], default="both")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--kill-interval", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    p.add_argument("--soak", action="store_true",
                   help="instead of the kill storm: flood + kills + stopped containers + huge values + "
                        "admin clients for --seconds (600 is the reference run); RSS and fds must stay flat")
    p.add_argument("--native-storm", action="store_true",
                   help="instead of the kill storm: the native core's storm (tests/native_storm.py: "
                        "threads, crash points inside operations and recovery, concurrent recoverers) "
                        "for --seconds")
    p.add_argument("--coroutines", type=int, default=8,
                   help="with --native-storm: coroutines per process waiting through async "
                        "waiter records (0: none)")
    p.add_argument("--async-waiters", type=int, metavar="N", default=None,
                   help="instead of the kill storm: tests/test_async_waits.py's checks with N "
                        "coroutines in one container (10000 is the reference), on --backend")
    p.add_argument("--tid-reuse", action="store_true",
                   help="instead of the kill storm: tests/tid_reuse_check.py for --seconds (root, "
                        "Linux >= 6.14: a live holder keeps its mutex while thread ids are "
                        "reused within one clock tick)")
    a = p.parse_args(argv)
    if a.tid_reuse:
        import tid_reuse_check
        return tid_reuse_check.main(a.seconds)
    if a.async_waiters is not None:
        import test_async_waits
        backends = ["rpc", "native"] if a.backend == "both" else [a.backend]
        print(json.dumps(test_async_waits.run_async_checks(a.async_waiters, backends)))
        return 0
    if a.native_storm:
        import native_storm
        with tempfile.TemporaryDirectory(prefix="npnstorm-") as d:
            r = native_storm.run_storm(d, a.seconds, a.seed or 1, workers=a.workers,
                                       coroutines=a.coroutines)
        r["violations"] = 0                  # run_storm raises on any violation
        print(json.dumps(r))
        return 0
    if a.soak:
        bad = 0
        for backend in (["rpc", "native"] if a.backend == "both" else [a.backend]):
            with tempfile.TemporaryDirectory(prefix="npsoak-") as d:
                r = run_soak(a.seconds, d, backend=backend, seed=a.seed)
            if a.json:
                print(json.dumps(r))
            bad += bool(r["problems"])
        return 1 if bad else 0
    bad = 0
    for backend in (["rpc", "native"] if a.backend == "both" else [a.backend]):
        with tempfile.TemporaryDirectory(prefix="npstress-") as d:
            r = run_storm(backend, a.seconds, d, kill_interval=a.kill_interval,
                          workers=a.workers, seed=a.seed)
        if a.json:
            print(json.dumps(r))
        bad += bool(r["violations"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
