"""Section "names": the cost of create, lookup and destroy as the name table grows.

Runs in the bench process on a private segment (no container: the figure is the
name table's, and a container would add only a constant).  For N = 1k, 16k and
128k names, and again after 1M create/destroy of distinct names at 16k live
names, each operation is timed on 1,000 random names per round, in alternating
rounds (create, hit, miss, destroy, create, ...), median of the rounds:

- ``create``: a name not present, into a table of N - 1 names (np_lookup with
  NP_CREATE | NP_EXCL), right after ``destroy`` took the same names out;
- ``lookup_hit`` / ``lookup_miss``: np_lookup without NP_CREATE;
- ``destroy``: np_sem_destroy of a handle.

Each figure is the raw cffi call (the C core plus about 0.2 us of cffi), and
``noop`` (np_noop through cffi) is measured in the same rounds: the name
table's own cost is the difference.  A flat row across N (and after the churn)
is the claim of csrc/names.c (N4, N6); the old table scanned for a free object
(create grew with N) and kept every tombstone (a miss grew with the churn).
"""

from __future__ import annotations

import random
import statistics
import time

SIZES = (1024, 16384, 131072)
CHURN_LIVE = 16384
BATCH = 1000


def _rounds(quick):
    return 5 if quick else 15


def _measure(lib, ffi, d, names, missing, rounds, rng):
    """Median ns per call of each operation over alternating rounds."""
    create_f = lib.NP_CREATE | lib.NP_EXCL
    out = {k: [] for k in ("noop", "create", "lookup_hit", "lookup_miss", "destroy")}
    sem = lib.NP_KIND_SEM
    nowait = lib.NP_NOWAIT
    enc = [n.encode() for n in names]
    miss = [n.encode() for n in missing]
    for _ in range(rounds):
        sample = rng.sample(range(len(enc)), BATCH)
        batch = [enc[i] for i in sample]
        t = time.perf_counter_ns()
        for _b in batch:
            lib.np_noop()
        out["noop"].append((time.perf_counter_ns() - t) / BATCH)
        t = time.perf_counter_ns()
        hs = [lib.np_lookup(d, sem, b, 0, 0, nowait) for b in batch]
        out["lookup_hit"].append((time.perf_counter_ns() - t) / BATCH)
        assert min(hs) >= 0, min(hs)
        mb = rng.sample(miss, BATCH)
        t = time.perf_counter_ns()
        for b in mb:
            lib.np_lookup(d, sem, b, 0, 0, nowait)
        out["lookup_miss"].append((time.perf_counter_ns() - t) / BATCH)
        t = time.perf_counter_ns()
        for h in hs:
            lib.np_sem_destroy(d, h)
        out["destroy"].append((time.perf_counter_ns() - t) / BATCH)
        t = time.perf_counter_ns()
        for b in batch:
            lib.np_lookup(d, sem, b, create_f, 1, nowait)
        out["create"].append((time.perf_counter_ns() - t) / BATCH)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v),
                "samples": v} for k, v in out.items()}


def _table(lib, ffi, dom, n, rounds, rng, churn=0):
    d = dom._dom()
    sem, nowait = lib.NP_KIND_SEM, lib.NP_NOWAIT
    create_f = lib.NP_CREATE | lib.NP_EXCL
    names = [f"user.{i}.limiter" for i in range(n)]
    t = time.perf_counter_ns()
    for b in names:
        assert lib.np_lookup(d, sem, b.encode(), create_f, 1, nowait) >= 0
    fill = (time.perf_counter_ns() - t) / n
    churn_s = None
    if churn:
        # distinct names come and go: each new name replaces a random live one
        t0 = time.monotonic()
        live = [lib.np_lookup(d, sem, b.encode(), 0, 0, nowait) for b in names]
        for i in range(churn):
            k = rng.randrange(n)
            lib.np_sem_destroy(d, live[k])
            nm = f"churn.{i}"
            live[k] = lib.np_lookup(d, sem, nm.encode(), create_f, 1, nowait)
            names[k] = nm
        churn_s = time.monotonic() - t0
    missing = [f"absent.{i}" for i in range(4 * BATCH)]
    res = _measure(lib, ffi, d, names, missing, rounds, rng)
    res["fill_create"] = {"median": fill, "n": 1}
    # (a build older than the free list has no name_stats: compare with it too)
    res["stats"] = dom.name_stats() if hasattr(dom, "name_stats") else {}
    if churn_s is not None:
        res["churn_s"] = churn_s
    dom.check()
    return res


def bench_names(quick, results, log):
    from netplex_native.native import domain as _native
    lib, ffi = _native._lib, _native._ffi
    rng = random.Random(15)
    rounds = _rounds(quick)
    out = results.setdefault("names", {})
    runs = [(f"{n // 1024}k", n, 0) for n in SIZES]
    runs.append((f"{CHURN_LIVE // 1024}k after 1M churn", CHURN_LIVE, 1_000_000))
    for label, n, churn in runs:
        dom = _native.Domain.create(semaphores=n, mutexes=16, processes=4, actors=16, waiters=16)
        try:
            r = _table(lib, ffi, dom, n, rounds, rng, churn)
        finally:
            dom.close()
            dom.unlink()
        out[label] = r
        log(f"names {label}: " + ", ".join(
            f"{k} {r[k]['median']:.0f} ns" for k in ("create", "lookup_hit", "lookup_miss", "destroy", "noop"))
            + (f"; churn {r['churn_s']:.1f} s" if churn else "") + f"; {r['stats']}")


def print_names(results):
    rows = results.get("names")
    if not rows:
        return
    print("\nName table (ns per raw cffi call, median of alternating rounds; cffi noop for scale):")
    cols = ("create", "lookup_hit", "lookup_miss", "destroy", "noop", "fill_create")
    print(f"  {'names':<22}" + "".join(f"{c:>13}" for c in cols) + f"{'longest probe':>15}")
    for label, r in rows.items():
        print(f"  {label:<22}" + "".join(f"{r[c]['median']:>13.0f}" for c in cols)
              + f"{r['stats'].get('longest_probe', '-'):>15}")
