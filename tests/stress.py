"""Kill storm: containers hammer protected semaphores and mutexes while
random containers are SIGKILLed; invariants are checked from a record file
that does not depend on either backend.

Used by tests/test_reliability.py (a few seconds per backend) and runnable on
its own for a longer storm::

    python3 tests/stress.py --backend native --seconds 120

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
from netplex_native import admin, cenv, mutex, semaphore  # noqa: E402
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
                from netplex_native import _native
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["rpc", "native", "both"], default="both")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--kill-interval", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    a = p.parse_args(argv)
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
