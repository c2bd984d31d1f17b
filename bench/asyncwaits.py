"""bench section ``asyncwaits``: awaiting coroutines (issue 10).

With N = 1, 100 and 10,000 coroutines of one container awaiting an empty
semaphore (``await semaphore.decrement_async(S, wait=True)``), a poster
coroutine on the same loop increments S once per round and measures the
time until the first woken coroutine runs again (which then awaits again,
so N stays constant): the wake-up latency.  Memory per waiter, measured in
a separate phase: the Python heap the N waiting coroutines add in the
container (tracemalloc: the task, the coroutine, the futures, the channel's
or the record's bookkeeping), plus for native the segment's record (384
bytes), plus for RPC the growth of the controller's RSS where it keeps the
deferred replies (measured at the first N = 10,000, before any reuse).  Candidates: native, RPC, and ``asyncio.Semaphore`` in the same
container (the floor: no other process, no shared state).  The native and
asyncio rounds alternate in one container; RPC runs in its own controller.
Every figure is a median over rounds; verdicts are ratios in this run.

Runs in the bench process (``bench_asyncwaits``) and in the containers
(``job_asyncwaits``, from a container timer on the container's loop).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import tracemalloc

COUNTS = (1, 100, 10_000)


def _rss_kb(pid) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def _measure(kind: str, n: int, rounds: int) -> dict:
    """In a container: n coroutines await; `rounds` single posts; latencies."""
    from netplex_native import semaphore
    loop = asyncio.get_running_loop()
    name = f"bench.aw.{kind}.{n}.{os.getpid()}"
    if kind == "asyncio":
        sem = asyncio.Semaphore(0)

        async def take():
            await sem.acquire()

        def post():
            sem.release()
    else:
        semaphore.create(name, 0)

        async def take():
            r = await semaphore.decrement_async(name, wait=True, timeout=120)
            assert r >= 0, "a bench waiter timed out"

        def post():
            semaphore.increment(name)
    woken = asyncio.Queue()
    stop = False

    async def waiter():
        while not stop:
            await take()
            woken.put_nowait(time.perf_counter())

    parent = os.getppid()

    async def queued_all():
        for _ in range(500):                  # until all n are queued
            await asyncio.sleep(0.01)
            if kind == "asyncio" or _queued(name, kind) >= n:
                break
        await asyncio.sleep(0.1)

    # memory phase (tracemalloc slows allocation: not during the latencies)
    prss0 = _rss_kb(parent)
    tracemalloc.start()
    m0 = tracemalloc.get_traced_memory()[0]
    tasks = [asyncio.ensure_future(waiter()) for _ in range(n)]
    await queued_all()
    heap = (tracemalloc.get_traced_memory()[0] - m0) / n
    tracemalloc.stop()
    prss1 = _rss_kb(parent)
    lat = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        post()
        t1 = await asyncio.wait_for(woken.get(), 60)
        lat.append((t1 - t0) * 1e9)
        await asyncio.sleep(0)                # the woken waiter queues again
    stop = True
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if kind != "asyncio":
        semaphore.destroy(name)
    del loop
    return {"latency_ns": lat, "heap_per_waiter_b": heap,
            "segment_per_waiter_b": 384 if kind == "native" else 0,
            "controller_rss_per_waiter_b": (prss1 - prss0) * 1024 / n}


def _queued(name, kind) -> int:
    """Waiters queued on name (native: from the segment; RPC: not observable
    from a container, so assume queued after the sleeps)."""
    if kind != "native":
        return 1 << 30
    from netplex_native._context import ctx
    dom = ctx.sem._dom
    return next((s["waiters"] for s in dom.semaphores() if s["name"] == name), 0)


def job_asyncwaits(jc) -> None:
    """Container side: for each N, alternate the candidates round by round."""
    counts = jc.params["counts"]
    rounds = jc.params["rounds"]
    reps = jc.params["reps"]
    kinds = [jc.backend] + (["asyncio"] if jc.backend == "native" else [])

    async def main():
        out = {}
        for n in counts:
            for rep in range(reps):
                for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
                    r = await _measure(kind, n, rounds)
                    d = out.setdefault(f"{kind}@{n}", {"latency_ns": [], "heap_per_waiter_b": [],
                                                        "controller_rss_per_waiter_b": []})
                    d["latency_ns"] += r["latency_ns"]
                    d["heap_per_waiter_b"].append(r["heap_per_waiter_b"])
                    d["segment_per_waiter_b"] = r["segment_per_waiter_b"]
                    # the controller's RSS grows only the first time (then reuses)
                    d["controller_rss_per_waiter_b"].append(r["controller_rss_per_waiter_b"])
        return out

    def done(f):
        try:
            res = f.result()
        except BaseException as e:          # reported, not raised into the loop
            jc.emit("error", tb=repr(e)[:2000])
            return
        for key, d in res.items():
            lat = sorted(d["latency_ns"])
            jc.emit("aw", key=key, median=statistics.median(lat), p99=lat[int(0.99 * (len(lat) - 1))],
                    min=lat[0], max=lat[-1], n=len(lat),
                    heap_per_waiter_b=statistics.median(d["heap_per_waiter_b"]),
                    segment_per_waiter_b=d["segment_per_waiter_b"],
                    controller_rss_per_waiter_b=d["controller_rss_per_waiter_b"][0])
        jc.emit("aw_done")
    asyncio.ensure_future(main()).add_done_callback(done)


def bench_asyncwaits(quick, results, Session, log):
    params = {"counts": list(COUNTS), "rounds": 30 if quick else 100, "reps": 2 if quick else 4}
    out = {}
    for backend in ("native", "rpc"):
        log(f"asyncwaits: {backend}, N = {COUNTS}")
        with Session(backend, 1, job_asyncwaits, params) as s:
            s.wait("aw_done", timeout=600)
            for e in s.events.seen:
                if e["kind"] == "aw":
                    out[e["key"]] = {k: e[k] for k in ("median", "p99", "min", "max", "n",
                                                       "heap_per_waiter_b", "segment_per_waiter_b",
                                                       "controller_rss_per_waiter_b")}
                    out[e["key"]]["unit"] = "ns"
                elif e["kind"] == "error":
                    raise RuntimeError(e["tb"])
    results["asyncwaits"] = out
    return results


def print_asyncwaits(results) -> None:
    a = results.get("asyncwaits")
    if not a:
        return
    print()
    print("awaiting coroutines: wake-up latency (post -> the woken coroutine runs) and memory per waiter")
    print(f"  {'N':>6}  {'candidate':10} {'median':>10} {'p99':>10} {'vs asyncio':>10}  "
          f"{'heap/waiter':>11} {'segment':>8} {'controller RSS':>15}")
    for n in COUNTS:
        floor = a.get(f"asyncio@{n}")
        for kind in ("native", "rpc", "asyncio"):
            d = a.get(f"{kind}@{n}")
            if not d:
                continue
            ratio = f"{d['median'] / floor['median']:.1f}x" if floor else "-"
            print(f"  {n:>6}  {kind:10} {d['median'] / 1000:>8.1f}us {d['p99'] / 1000:>8.1f}us {ratio:>10}  "
                  f"{d['heap_per_waiter_b']:>9,.0f} B {d['segment_per_waiter_b']:>6,} B "
                  f"{d['controller_rss_per_waiter_b']:>13,.0f} B")
