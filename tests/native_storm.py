"""The native core's storm: processes with several threads do random protected
semaphore and mutex operations with timeouts, and call recover() on each other's
dead; in each process, coroutines on an event loop do the same through async
waiter records (asyncwait.py), with their timeouts or cancelled by
``asyncio.wait_for``; crash points are armed at random inside operations and inside recovery; the
supervisor SIGKILLs a random worker at random moments and recovers it only later
(or never, leaving it to the workers).  Every acquire, release, timeout, kill and
death is appended to a record file (one O_APPEND write per record, so records never
interleave and their order is the order of the writes; a write cut short by the
writer's SIGKILL leaves a torn record, framed so that it is recognised); the
checker then replays it.

Checked exactly, from the record file and the segment:
  - a mutex never has two live holders, a semaphore never more than its count (a
    holder is dead at a later acquire only if it writes nothing after it and was
    doomed before it: the supervisor's K, written before its SIGKILL, or its own
    C, written before it arms a crash point; workers are named pid.serial, so a
    recycled pid is another worker);
  - every holder of a mutex has a fencing token larger than every earlier
    holder's (the record's order is the order of the holds: a live holder
    writes its acquire before it unlocks, a dead one writes nothing more);
  - no wait lasts longer than its timeout + 1 s (processes are also SIGSTOPped
    for up to 0.4 s at random moments, inside guards included);
  - once quiet and everyone recovered: every semaphore back at its initial value,
    every mutex free, no queue, no process left, check() clean;
  - no wake-up is lost: a sixth of the semaphore waits have no timeout (the
    first waiter then sleeps without a timer, A3u of csrc/acquire.c, woken only
    by the unit's increment or by the recovery of a waker that died owing it,
    Q6 of csrc/queue.c).  At the end the chaos stops, the dead are recovered
    and every worker is asked to finish (the `drain' semaphore): each thread
    ends its current operation and every worker exits on its own, within
    DRAIN_S; one that does not is a waiter never woken.

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
DRAIN = "drain"             # > 0: workers finish and exit (unprotected, not in SEMS)
DRAIN_S = 30.0              # every worker exits on its own within this, once asked


def _now() -> float:
    return time.monotonic()


class _Recorder:
    """One record per os.write, framed "<fields>\n".  A write cut short (the
    kernel ends a write to a file early when a SIGKILL arrives while it copies)
    leaves a torn record with no closing ">" that the next record follows on the
    same line; the framing lets the checker tell it apart.  A short write that
    did not kill us kills us here, so a torn record is always its writer's last."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, *fields) -> None:
        data = ("<" + " ".join(str(f) for f in fields) + ">\n").encode()
        if os.write(self.fd, data) != len(data):
            os.kill(os.getpid(), signal.SIGKILL)


def _worker(dom: _native.Domain, rec_path: str, dead_path: str, seed: int, threads: int,
            crash_rate: float, coroutines: int = 0, serial: int = 0) -> None:
    os.environ["NETPLEX_CORE_TEST"] = "1"
    if random.Random(seed * 7 + serial).random() < 0.33:
        # this process's mutex calls take the guarded path, among others
        # taking the one-CAS path on the same mutexes (csrc/mutex_fast.h)
        assert _native._lib.np_test_fast_mutex(0) == 0
    rec = _Recorder(rec_path)
    pid = f"{os.getpid()}.{serial}"     # who: pids are recycled, (pid, serial) is not
    rec.write("X", pid, 0, "-", _now(), _now(), 0)
    parent = os.getppid()

    def going_on() -> bool:
        if dom.sem_get(DRAIN) > 0:
            _native._lib.np_test_crash_after(0)     # the drain: no more deaths
            return False
        return os.getppid() == parent

    def loop(k: int) -> None:
        rnd = random.Random(seed * 1000 + k)
        tid = threading.get_native_id()
        while going_on():
            if rnd.random() < crash_rate:
                # die somewhere inside the next operation (or recovery): from
                # here on this process may die at any moment (the checker's C)
                rec.write("C", pid, tid, "-", _now(), _now(), 0)
                _native._lib.np_test_crash_after(rnd.randint(1, 40))
            r = rnd.random()
            timeout = rnd.choice([0.0, 0.01, 0.05, 0.2, 0.5, float("inf")])
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
                timeout = min(timeout, 0.5)
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
                # inf: no timeout at all (A3u)
                got = dom.sem_decrement(name, wait=timeout > 0,
                                        timeout=timeout if 0 < timeout < float("inf") else None)
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
            while going_on():
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
    for t in ts:            # a thread never woken keeps us alive: the drain sees it
        t.join()


def _spawn(dom, rec_path, dead_path, seed, threads, crash_rate, coroutines=0, serial=0) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _worker(dom, rec_path, dead_path, seed, threads, crash_rate, coroutines, serial)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        # E: this process ends here (its other threads die with it)
        _Recorder(rec_path).write("E", f"{os.getpid()}.{serial}", 0, "-", _now(), _now(), code)
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
    open(rec_path, "w").close()            # a kept workdir's earlier record is not replayed
    rec = _Recorder(rec_path)
    stats = {"kills": 0, "crash_point_deaths": 0, "clean_exits": 0, "recovered_late": 0,
             "recover_incomplete": 0, "stops": 0}
    stopped: dict[int, tuple[float, float]] = {}    # pid -> (stopped at, SIGCONT at)
    killed_by_us: set[int] = set()
    signalled: set[int] = set()
    try:
        for name, v in SEMS.items():
            dom.sem_create(name, v, protected=True)
        for name in MUTEXES:
            dom.mutex_unlock(name, force=True)     # implicit creation
        dom.sem_create(DRAIN, 0)
        live: set[int] = set()
        pending: list[tuple[float, int]] = []       # (when, pid) to recover
        serial_of: dict[int, int] = {}              # pid -> the worker's serial
        seq = 0

        def reap_some(block=False):
            while live:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
                if pid == 0:
                    return
                if pid not in live:
                    continue
                live.discard(pid)
                if os.WIFSIGNALED(status):
                    signalled.add(pid)
                if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                    if pid not in killed_by_us:
                        stats["crash_point_deaths"] += 1
                else:
                    stats["clean_exits"] += 1
                rec.write("D", f"{pid}.{serial_of[pid]}", 0, "-", _now(), _now(), 0)
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
                child = _spawn(dom, rec_path, dead_path, seed * 7919 + seq, threads,
                               crash_rate, coroutines, seq)
                serial_of[child] = seq
                live.add(child)
            time.sleep(rnd.uniform(0, 2 * kill_every))
            now = _now()
            for pid, (since, when) in list(stopped.items()):
                if when <= now or pid not in live:
                    if pid in live:
                        os.kill(pid, signal.SIGCONT)
                    # its own waits were stretched by this much: the checker
                    # does not count it against their timeouts
                    rec.write("S", f"{pid}.{serial_of[pid]}", 0, "-", since, _now(), 0)
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
                # K before the kill: the victim may be dead from here on
                rec.write("K", f"{victim}.{serial_of[victim]}", 0, "-", _now(), _now(), 0)
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
        # The drain: no more kills or stops; the dead are recovered at once;
        # every worker finishes on its own (see the module doc).
        for pid, (since, _) in list(stopped.items()):
            if pid in live:
                os.kill(pid, signal.SIGCONT)
            rec.write("S", f"{pid}.{serial_of[pid]}", 0, "-", since, _now(), 0)
            del stopped[pid]
        for _, pid in pending[:]:
            if dom.recover(pid, timeout=10) >= 0:
                pending.remove((_, pid))
        dom.sem_increment(DRAIN)
        drain_start = _now()
        drain_end = drain_start + DRAIN_S
        at_drain, deaths_before = len(live), len(signalled)
        while live and _now() < drain_end:
            reap_some()
            # A recovery wakes every untimed sleeper (Q6) and would hide a
            # lost wake-up: only the (rare) deaths of the drain are recovered
            # now, the clean exits at the end.
            for _, pid in pending[:]:
                if pid in signalled and dom.recover(pid, timeout=0) >= 0:
                    pending.remove((_, pid))
            time.sleep(0.005)
        hung = sorted(live)
        stats["drain_s"] = round(_now() - drain_start, 3)
        stats["drain_workers"] = at_drain
        stats["drain_deaths"] = len(signalled) - deaths_before
        for pid in hung:
            rec.write("K", f"{pid}.{serial_of[pid]}", 0, "-", _now(), _now(), 0)
            os.kill(pid, signal.SIGKILL)
            killed_by_us.add(pid)
        while live:
            reap_some(block=True)
        assert not hung, (f"workers {hung} did not finish within {DRAIN_S} s of the drain, "
                          f"with the dead recovered: a waiter never woken (A3u/Q6)? "
                          f"semaphores {dom.semaphores()}")
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


def read_record(path: str) -> tuple[list[list[str]], list[tuple[int, str]]]:
    """The records of the file, in order, and its torn ones as (index among the
    records, fragment).  A torn record (its writer killed while writing it) has
    no closing ">"; the next record follows it on the same line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    recs: list[list[str]] = []
    torn: list[tuple[int, str]] = []
    if not text:
        return recs, torn
    assert text.startswith("<"), f"the record does not start with a record: {text[:40]!r}"
    for chunk in text[1:].split("<"):
        if chunk.endswith(">\n") and ">" not in chunk[:-2]:
            recs.append(chunk[:-2].split())
        else:
            assert "\n" not in chunk and ">" not in chunk, f"not a record: {chunk!r}"
            torn.append((len(recs), chunk))
            recs.append(["torn"] + chunk.split())
    return recs, torn


def check_record(path: str) -> dict:
    """Replay the record file: never two live holders of a mutex, never more live
    holders of a semaphore than its count, no wait longer than timeout + 1 s.

    A worker is named by "pid.serial" (the supervisor's spawn counter): a recycled
    pid names another worker.  A holder is dead, so no longer a holder, at line i
    only when both hold: it writes nothing after line i, and before line i it was
    doomed: the supervisor wrote K (before its SIGKILL), or the worker wrote C
    (before arming a crash point) or E (before it exits): the only ways a worker
    dies.  A holder
    that was not yet doomed was alive at line i, whatever it wrote later.  A torn
    record is ignored, but must be its writer's last record and come after its
    doom: the writer died writing it."""
    lines, torn = read_record(path)
    last_line_of: dict[str, int] = {}
    doomed_at: dict[str, int] = {}
    for i, (kind, *rest) in enumerate(lines):
        if kind == "torn":
            # the fragment names its writer only if the name is complete
            if len(rest) >= 3:
                last_line_of[rest[1]] = i
        elif kind in ("K", "C", "E"):
            doomed_at.setdefault(rest[0], i)
            if kind != "K":                # C and E are the worker's own
                last_line_of[rest[0]] = i
        elif kind not in ("D", "S"):       # D, S, K are the supervisor's
            last_line_of[rest[0]] = i
    for i, frag in torn:
        f = frag.split()
        if len(f) >= 3:                    # its writer's name is complete
            who = f[1]
            assert last_line_of.get(who) == i, (
                f"line {i}: torn record {frag!r} is not the last of {who}: a live writer")
            assert doomed_at.get(who, len(lines)) < i, (
                f"line {i}: torn record {frag!r} of {who}, which was never killed")
    capacity = dict(SEMS, **{m: 1 for m in MUTEXES})
    stops: dict[str, list[tuple[float, float]]] = {}
    for kind, pid, *rest in lines:
        if kind == "S":
            stops.setdefault(pid, []).append((float(rest[2]), float(rest[3])))

    def stopped_during(pid, a, b):
        return sum(max(0.0, min(b, y) - max(a, x)) for x, y in stops.get(pid, ()))

    def dead_at(who, i):
        return last_line_of.get(who, -1) < i and doomed_at.get(who, i) < i
    holders: dict[str, list[tuple[str, int]]] = {name: [] for name in capacity}
    ops = timeouts = tokens = async_ops = async_timeouts = 0
    longest = 0.0
    last_token: dict[str, int] = {}
    for i, ln in enumerate(lines):
        if ln[0] in ("torn", "K", "C", "E", "D", "S", "X"):
            continue
        kind, pid, tid, obj, t0, t1, timeout, *token = ln
        tid = int(tid)
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
            hs[:] = [h for h in hs if not dead_at(h[0], i)]
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
    return {"operations": ops, "timeouts": timeouts, "async_operations": async_ops,
            "async_timeouts": async_timeouts, "longest_wait_s": round(longest, 4),
            "records": len(lines), "tokens_checked": tokens, "torn_records": len(torn)}


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
    ap.add_argument("--keep", metavar="DIR",
                    help="write the record file (storm-SEED.rec) into DIR and keep it")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="netplex-storm-") as tmp:
        d = args.keep or tmp
        if args.keep:
            os.makedirs(d, exist_ok=True)
        t0 = time.monotonic()
        stats = run_storm(d, args.seconds, args.seed, workers=args.workers, threads=args.threads,
                          coroutines=args.coroutines)
        stats["seconds"] = round(time.monotonic() - t0, 1)
        stats["violations"] = 0
        print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
