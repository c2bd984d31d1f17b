"""The native core's storm: processes with several threads do random protected
semaphore and mutex operations with timeouts, and call recover() on each other's
dead; in each process, coroutines on an event loop do the same through async
waiter records (asyncwait.py), with their timeouts or cancelled by
``asyncio.wait_for``; crash points are armed at random inside operations and inside recovery; the
supervisor SIGKILLs a random worker at random moments and recovers it only later
(or never, leaving it to the workers).  Every acquire, release, timeout and death is
appended to a record file (one O_APPEND write per line, so lines never interleave
and their order is the order of the writes); the checker then replays it.

Checked exactly, from the record file and the segment:
  - a mutex never has two live holders, a semaphore never more than its count (a
    holder that writes nothing after a later acquire is dead by then: dead means
    dead, so it cannot be a live holder);
  - every holder of a mutex has a fencing token larger than every earlier
    holder's (the record's order is the order of the holds: a live holder
    writes its acquire before it unlocks, a dead one writes nothing more);
  - no wait lasts longer than its timeout + 1 s (processes are also SIGSTOPped
    for up to 0.4 s at random moments, inside guards included);
  - once quiet and everyone recovered: every semaphore back at its initial value,
    every mutex free, no queue, no process left, check() clean.

Used by tests/test_native_storm.py (a few seeds, seconds each) and by
``python3 tests/stress.py --native-storm --seconds N`` (minutes)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

from netplex_native.native import domain as _native
from netplex_native.native.asyncwait import waits_of

ASYNC_TID = 1_000_000       # record ids of coroutines: ASYNC_TID + k

SEMS = {"s0": 2, "s1": 1}
MUTEXES = ["m0", "m1"]


def _now() -> float:
    return time.monotonic()


class _Recorder:
    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, *fields) -> None:
        os.write(self.fd, (" ".join(str(f) for f in fields) + "\n").encode())


def _worker(dom: _native.Domain, rec_path: str, dead_path: str, seed: int, threads: int,
            crash_rate: float, coroutines: int = 0) -> None:
    os.environ["NETPLEX_CORE_TEST"] = "1"
    rec = _Recorder(rec_path)
    pid = os.getpid()
    rec.write("X", pid, 0, "-", _now(), _now(), 0)
    parent = os.getppid()

    def loop(k: int) -> None:
        rnd = random.Random(seed * 1000 + k)
        tid = threading.get_native_id()
        while os.getppid() == parent:
            if rnd.random() < crash_rate:
                # die somewhere inside the next operation (or recovery)
                _native._lib.np_test_crash_after(rnd.randint(1, 40))
            r = rnd.random()
            timeout = rnd.choice([0.0, 0.01, 0.05, 0.2, 0.5])
            if r < 0.1:
                try:
                    with open(dead_path) as f:
                        dead = [int(x) for x in f.read().split()]
                except OSError:
                    dead = []
                if dead:
                    dom.recover(rnd.choice(dead), timeout=0.05)
                continue
            if r < 0.55:
                name = rnd.choice(MUTEXES)
                t0 = _now()
                got = dom.mutex_lock(name, timeout)
                t1 = _now()
                if got:
                    rec.write("A", pid, tid, name, t0, t1, timeout, dom.mutex_token(name))
                    time.sleep(rnd.choice([0, 0, 0.0002, 0.001]))
                    rec.write("R", pid, tid, name, _now(), 0, 0)
                    dom.mutex_unlock(name)
                else:
                    rec.write("T", pid, tid, name, t0, t1, timeout)
            else:
                name = rnd.choice(list(SEMS))
                t0 = _now()
                got = dom.sem_decrement(name, wait=timeout > 0, timeout=timeout or None)
                t1 = _now()
                if got >= 0:
                    rec.write("A", pid, tid, name, t0, t1, timeout)
                    time.sleep(rnd.choice([0, 0, 0.0002, 0.001]))
                    rec.write("R", pid, tid, name, _now(), 0, 0)
                    dom.sem_increment(name)
                elif timeout > 0:
                    rec.write("T", pid, tid, name, t0, t1, timeout)

    def coroutine_loop() -> None:
        aw = waits_of(dom)

        async def one(k: int) -> None:
            rnd = random.Random(seed * 1000 + 500 + k)
            tid = ASYNC_TID + k
            while os.getppid() == parent:
                timeout = rnd.choice([0.01, 0.05, 0.2, 0.5])
                if rnd.random() < 0.45:
                    kind, name = _native._MTX, rnd.choice(MUTEXES)
                else:
                    kind, name = _native._SEM, rnd.choice(list(SEMS))
                t0 = _now()
                try:
                    if rnd.random() < 0.3:       # ended by cancellation instead
                        got = await asyncio.wait_for(aw.acquire(kind, name, None), timeout)
                    else:
                        got = await aw.acquire(kind, name, timeout)
                except asyncio.TimeoutError:
                    got = -1
                t1 = _now()
                if got >= 0:
                    rec.write("A", pid, tid, name, t0, t1, timeout,
                              dom.mutex_token(name) if kind == _native._MTX else None)
                    await asyncio.sleep(rnd.choice([0, 0, 0.0002, 0.001]))
                    rec.write("R", pid, tid, name, _now(), 0, 0)
                    if kind == _native._MTX:
                        dom.mutex_unlock(name)
                    else:
                        dom.sem_increment(name)
                else:
                    rec.write("T", pid, tid, name, t0, t1, timeout)

        async def main() -> None:
            await asyncio.gather(*[one(k) for k in range(coroutines)])
        asyncio.run(main())

    ts = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(1, threads)]
    if coroutines:
        ts.append(threading.Thread(target=coroutine_loop, daemon=True))
    for t in ts:
        t.start()
    loop(0)


def _spawn(dom, rec_path, dead_path, seed, threads, crash_rate, coroutines=0) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _worker(dom, rec_path, dead_path, seed, threads, crash_rate, coroutines)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def run_storm(workdir: str, seconds: float, seed: int, *, workers: int = 4, threads: int = 2,
              kill_every: float = 0.05, crash_rate: float = 0.002,
              recover_delay: float = 0.2, stop_rate: float = 0.25, coroutines: int = 8) -> dict:
    """Run the storm in this process (the supervisor); returns figures, raises
    AssertionError on any violation."""
    rnd = random.Random(seed)
    dom = _native.Domain.create(semaphores=8, mutexes=8, processes=4 * workers + 8)
    rec_path = os.path.join(workdir, f"storm-{seed}.rec")
    dead_path = os.path.join(workdir, f"storm-{seed}.dead")
    open(dead_path, "w").close()
    rec = _Recorder(rec_path)
    stats = {"kills": 0, "crash_point_deaths": 0, "clean_exits": 0, "recovered_late": 0,
             "recover_incomplete": 0, "stops": 0}
    stopped: dict[int, tuple[float, float]] = {}    # pid -> (stopped at, SIGCONT at)
    killed_by_us: set[int] = set()
    try:
        for name, v in SEMS.items():
            dom.sem_create(name, v, protected=True)
        for name in MUTEXES:
            dom.mutex_unlock(name, force=True)     # implicit creation
        live: set[int] = set()
        pending: list[tuple[float, int]] = []       # (when, pid) to recover
        seq = 0

        def reap_some(block=False):
            while live:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
                if pid == 0:
                    return
                if pid not in live:
                    continue
                live.discard(pid)
                if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                    if pid not in killed_by_us:
                        stats["crash_point_deaths"] += 1
                else:
                    stats["clean_exits"] += 1
                rec.write("D", pid, 0, "-", _now(), _now(), 0)
                with open(dead_path, "a") as f:
                    f.write(f"{pid}\n")
                # recover later, or (one in four) leave it to the workers
                if rnd.random() < 0.75:
                    pending.append((_now() + rnd.uniform(0, recover_delay), pid))
                else:
                    pending.append((_now() + 2.0, pid))
                if block:
                    return

        end = _now() + seconds
        while _now() < end:
            while len(live) < workers:
                seq += 1
                live.add(_spawn(dom, rec_path, dead_path, seed * 7919 + seq, threads,
                                crash_rate, coroutines))
            time.sleep(rnd.uniform(0, 2 * kill_every))
            now = _now()
            for pid, (since, when) in list(stopped.items()):
                if when <= now or pid not in live:
                    if pid in live:
                        os.kill(pid, signal.SIGCONT)
                    # its own waits were stretched by this much: the checker
                    # does not count it against their timeouts
                    rec.write("S", pid, 0, "-", since, _now(), 0)
                    del stopped[pid]
            if live and rnd.random() < stop_rate:
                # a live process stopped anywhere (inside a guard, holding a
                # mutex, queued) for up to 0.4 s: it holds what it holds
                pid = rnd.choice(sorted(live))
                if pid not in stopped:
                    os.kill(pid, signal.SIGSTOP)
                    stopped[pid] = (_now(), now + rnd.uniform(0.05, 0.4))
                    stats["stops"] += 1
            if live:
                victim = rnd.choice(sorted(live))
                os.kill(victim, signal.SIGKILL)
                killed_by_us.add(victim)
                stats["kills"] += 1
            reap_some()
            now = _now()
            due = [p for p in pending if p[0] <= now]
            pending[:] = [p for p in pending if p[0] > now]
            for _, pid in due:
                if dom.recover(pid, timeout=0) < 0:      # never block the supervisor
                    stats["recover_incomplete"] += 1
                    pending.append((now + 0.05, pid))
                else:
                    stats["recovered_late"] += 1
        for pid in list(live):
            os.kill(pid, signal.SIGKILL)
            killed_by_us.add(pid)
        while live:
            reap_some(block=True)
        with open(dead_path) as f:
            every = [int(x) for x in f.read().split()]
        for pid in every:
            assert dom.recover(pid, timeout=10) >= 0, f"recover({pid}) did not finish"
        # the end state, exactly
        for name, v in SEMS.items():
            info = next(o for o in dom.semaphores() if o["name"] == name)
            assert info["value"] == v and info["waiters"] == 0 and info["holders"] == {}, info
        for info in dom.mutexes():
            assert info["locked"] is False and info["waiters"] == 0, info
        left = [p["pid"] for p in dom.processes()]
        assert left == [os.getpid()], f"process slots left: {left}"
        dom.check()
        stats.update(check_record(rec_path))
        return stats
    finally:
        dom.unlink()
        dom.close()


def check_record(path: str) -> dict:
    """Replay the record file: never two live holders of a mutex, never more live
    holders of a semaphore than its count, no wait longer than timeout + 1 s."""
    with open(path) as f:
        lines = [ln.split() for ln in f if ln.strip()]
    last_line_of: dict[int, int] = {}
    for i, (kind, pid, *_rest) in enumerate(lines):
        if kind not in ("D", "S"):         # written by the supervisor
            last_line_of[int(pid)] = i
    capacity = dict(SEMS, **{m: 1 for m in MUTEXES})
    stops: dict[int, list[tuple[float, float]]] = {}
    for kind, pid, _tid, _obj, t0, t1, _timeout, *_token in lines:
        if kind == "S":
            stops.setdefault(int(pid), []).append((float(t0), float(t1)))

    def stopped_during(pid, a, b):
        return sum(max(0.0, min(b, y) - max(a, x)) for x, y in stops.get(pid, ()))
    holders: dict[str, list[tuple[int, int]]] = {name: [] for name in capacity}
    ops = timeouts = tokens = async_ops = async_timeouts = 0
    longest = 0.0
    last_token: dict[str, int] = {}
    for i, (kind, pid, tid, obj, t0, t1, timeout, *token) in enumerate(lines):
        pid, tid = int(pid), int(tid)
        if kind in ("A", "T"):
            # a waiter that was itself stopped meanwhile waited that much longer
            waited = float(t1) - float(t0) - stopped_during(pid, float(t0), float(t1))
            longest = max(longest, waited)
            assert waited <= float(timeout) + 1.0, (
                f"line {i}: {kind} {obj} by {pid}/{tid} waited {waited:.3f} s (not counting its "
                f"own stops) > timeout {timeout} + 1; from {float(t0):.3f}")
        if kind == "A":
            ops += 1
            async_ops += tid >= ASYNC_TID
            hs = holders[obj]
            # holders that write nothing after this line were dead by then
            hs[:] = [h for h in hs if last_line_of.get(h[0], -1) > i]
            hs.append((pid, tid))
            assert len(hs) <= capacity[obj], (
                f"line {i}: {len(hs)} live holders of {obj} (capacity {capacity[obj]}): {hs}")
            if obj in MUTEXES:
                assert token and token[0] != "None", f"line {i}: holder of {obj} without a token"
                t = int(token[0])
                assert t > last_token.get(obj, 0), (
                    f"line {i}: token {t} of {obj} not above the previous holder's "
                    f"{last_token.get(obj)}")
                last_token[obj] = t
                tokens += 1
        elif kind == "R":
            hs = holders[obj]
            assert (pid, tid) in hs, f"line {i}: release of {obj} by a non-holder {pid}/{tid}"
            hs.remove((pid, tid))
        elif kind == "T":
            timeouts += 1
            async_timeouts += tid >= ASYNC_TID
        elif kind == "S":
            continue
    return {"operations": ops, "timeouts": timeouts, "async_operations": async_ops,
            "async_timeouts": async_timeouts, "longest_wait_s": round(longest, 4),
            "records": len(lines), "tokens_checked": tokens}


def main(argv=None) -> int:
    import argparse
    import json
    import tempfile
    ap = argparse.ArgumentParser(description="the native core's storm (see the module doc)")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--coroutines", type=int, default=8)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="netplex-storm-") as d:
        t0 = time.monotonic()
        stats = run_storm(d, args.seconds, args.seed, workers=args.workers, threads=args.threads,
                          coroutines=args.coroutines)
        stats["seconds"] = round(time.monotonic() - t0, 1)
        stats["violations"] = 0
        print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
