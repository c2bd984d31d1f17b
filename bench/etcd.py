"""etcd backend figures, each against aetcd's own lock in the same run, on one
real etcd (the test fixture's server: tests/etcd_server.py).

    python3 bench/etcd.py [--rounds N]

- lock pair: ``Mutex.lock()`` + ``unlock()`` in a container (our recipe)
  vs ``aetcd`` ``Lock.acquire()`` + ``release()`` (its recipe: a lease per
  attempt), both uncontended, same etcd;
- semaphore pair: ``decrement`` + ``increment`` (protected);
- takeover: the holder is SIGKILLed (ours: a container, its lease revoked
  when its controller reaps it) vs aetcd's lock whose holder process is
  SIGKILLed (its lease must expire: the TTL); time until the waiter holds it.
Medians of alternating rounds.  Raw numbers are printed as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from etcd_server import EtcdServer   # noqa: E402
import netplex_native as netplex     # noqa: E402
from netplex_native import etcd, mutex, semaphore   # noqa: E402


def ours(srv, rounds, n, q):
    """A controller with one container that measures and writes to fd q."""
    B = etcd.Backend([srv.endpoint], prefix="bench/", lease_ttl=1)

    class H(netplex.ProcessorHooks):
        def post_add_hook(self, service, ctrl):
            ctrl.add_plugin(B.semaphore_plugin)
            ctrl.add_plugin(B.mutex_plugin)

        def post_start_hook(self, cont):
            out = {"lock": [], "sem": []}
            m = mutex.access("bench.m")
            semaphore.create("bench.s", 1, protected=True)
            m.lock(); m.unlock(); semaphore.decrement("bench.s"); semaphore.increment("bench.s")
            for _ in range(rounds):
                t = time.perf_counter()
                for _ in range(n):
                    m.lock()
                    m.unlock()
                out["lock"].append((time.perf_counter() - t) / n)
                t = time.perf_counter()
                for _ in range(n):
                    semaphore.decrement("bench.s")
                    semaphore.increment("bench.s")
                out["sem"].append((time.perf_counter() - t) / n)
            os.write(q, json.dumps(out).encode())
            os.close(q)
            os.kill(os.getppid(), signal.SIGTERM)

    pid = os.fork()
    if pid == 0:
        ctrl = netplex.Controller()
        ctrl.add_service(netplex.Service("bench", hooks=H()))
        ctrl.run()
        os._exit(0)
    return pid


def ours_takeover(srv, rounds):
    """Holder container SIGKILLed; a container of another controller waits."""
    B = etcd.Backend([srv.endpoint], prefix="bench2/", lease_ttl=1)
    r, w = os.pipe()

    class H(netplex.ProcessorHooks):
        def post_add_hook(self, service, ctrl):
            ctrl.add_plugin(B.mutex_plugin)

        def post_start_hook(self, cont):
            if cont.service_name == "holder":
                mutex.access("bench.t").lock()
                os.write(w, f"held {os.getpid()}\n".encode())
            else:
                async def wait():
                    await mutex.access("bench.t").lock_async()
                    os.write(w, f"got {time.monotonic()}\n".encode())
                    os._exit(0)
                asyncio.get_event_loop().create_task(wait())

    def controller(name):
        pid = os.fork()
        if pid == 0:
            ctrl = netplex.Controller()
            ctrl.add_service(netplex.Service(name, hooks=H()))
            ctrl.run()
            os._exit(0)
        return pid

    out = []
    f = os.fdopen(r, "rb", buffering=0)
    for _ in range(rounds):
        c1 = controller("holder")
        line = f.readline().split()
        holder = int(line[1])
        c2 = controller("waiter")
        time.sleep(0.5)
        t = time.monotonic()
        os.kill(holder, signal.SIGKILL)
        while True:
            line = f.readline().split()
            if line[0] == b"got":
                out.append(float(line[1]) - t)
                break
        for c in (c1, c2):
            os.kill(c, signal.SIGTERM)
            os.waitpid(c, 0)
        time.sleep(0.3)
    return out


def peer(srv, rounds, n):
    code = f"""
import asyncio, json, time, aetcd
async def main():
    c = aetcd.Client(host="127.0.0.1", port={srv.client_port})
    lk = c.lock(b"bench.peer", ttl=1)
    out = []
    for _ in range({rounds}):
        t = time.perf_counter()
        for _ in range({n}):
            await lk.acquire()
            await lk.release()
        out.append((time.perf_counter() - t) / {n})
    print(json.dumps(out))
asyncio.run(main())
"""
    import subprocess
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout)


def peer_takeover(srv, rounds):
    import subprocess
    holder = f"""
import asyncio, aetcd, sys
async def main():
    c = aetcd.Client(host="127.0.0.1", port={srv.client_port})
    lk = c.lock(b"bench.pt", ttl=1)
    await lk.acquire()
    print("held", flush=True)
    while True:                      # kept alive, as a live holder would: only the kill ends it
        await asyncio.sleep(0.2)
        await lk.refresh()
asyncio.run(main())
"""
    waiter = f"""
import asyncio, aetcd, time
async def main():
    c = aetcd.Client(host="127.0.0.1", port={srv.client_port})
    await c.lock(b"bench.pt", ttl=1).acquire()
    print(time.monotonic(), flush=True)
asyncio.run(main())
"""
    out = []
    for _ in range(rounds):
        h = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
        h.stdout.readline()
        w = subprocess.Popen([sys.executable, "-c", waiter], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        t = time.monotonic()
        h.kill()
        h.wait()
        out.append(float(w.stdout.readline()) - t)
        w.wait()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=200)
    a = ap.parse_args()
    srv = EtcdServer()
    srv.start()
    try:
        res = {"lock": [], "sem": [], "peer_lock": [], "takeover": [], "peer_takeover": []}
        for _ in range(2):      # alternate ours and the peer's
            r, w = os.pipe()
            pid = ours(srv, a.rounds, a.n, w)
            os.close(w)
            data = b""
            while chunk := os.read(r, 65536):
                data += chunk
            os.waitpid(pid, 0)
            got = json.loads(data)
            res["lock"] += got["lock"]
            res["sem"] += got["sem"]
            res["peer_lock"] += peer(srv, a.rounds, a.n)
        res["takeover"] = ours_takeover(srv, 3)
        res["peer_takeover"] = peer_takeover(srv, 3)
    finally:
        srv.stop()
    med = {k: statistics.median(v) for k, v in res.items()}
    print(json.dumps({"raw": res, "median": med}, indent=1))
    print(f"lock pair (uncontended): ours {med['lock'] * 1e3:.2f} ms, aetcd lock {med['peer_lock'] * 1e3:.2f} ms "
          f"({med['peer_lock'] / med['lock']:.1f}x)")
    print(f"semaphore pair (protected): ours {med['sem'] * 1e3:.2f} ms")
    print(f"takeover after SIGKILL of the holder: ours {med['takeover'] * 1e3:.1f} ms (revoke on reap), "
          f"aetcd lock {med['peer_takeover'] * 1e3:.0f} ms (lease TTL 1 s)")


if __name__ == "__main__":
    main()
