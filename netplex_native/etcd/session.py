"""One process's connection to etcd: its client thread, transport, key
layout, and its lease (the protection of everything it holds).

Invariants:
- A container's lease is granted by its controller (``etcd.lease`` call),
  kept alive by it and revoked when it reaps the container; the container
  never grants its own, so no key of a container outlives its reap by more
  than the revoke.  The controller's own lease is its lease keeper's.
- A lease found gone (a put refused, or its TTL says expired) is recorded
  in ``lost``; the next operation asks for a new one; what the process held
  under the old one raises ``LeaseLostError`` when used as a holder.
- Cleanups (a waiter key left by a timeout or a cancel) are retried in the
  background until done or the lease is gone: a waiter key that stayed
  would become a ghost owner.  A cleanup first waits for every request sent
  before it (requests are never cancelled once sent, transport.py), so the
  put it undoes cannot land after it.
"""

from __future__ import annotations

import asyncio
import logging
import os

from .keys import Keys
from .runner import Runner
from .transport import GatewayTransport, GrpcTransport, LeaseGone

log = logging.getLogger("netplex_native.etcd")


class Session:
    def __init__(self, cfg, role: str, lease_source, runner: Runner | None = None):
        self.cfg = cfg
        self.role = role
        self.keys = Keys(cfg.prefix)
        self.runner = runner or Runner(f"netplex-etcd-{role}")
        self._lease_source = lease_source       # async (old_lease) -> new lease id
        self.lease = 0
        self._old = 0           # the last lease found gone (the source replaces it)
        self.lost: set[int] = set()
        self._lease_lock = None
        self._cleanups: set = set()
        self.pid = os.getpid()
        make = GrpcTransport if role == "container" else GatewayTransport
        self.t = make(list(cfg.endpoints), cfg.op_timeout)

    # ---- the lease ----
    async def lease_id(self) -> int:
        if self.lease:
            return self.lease
        if self._lease_lock is None:
            self._lease_lock = asyncio.Lock()
        async with self._lease_lock:
            if not self.lease:
                self.lease = await self._lease_source(self._old)
            return self.lease

    def lease_gone(self, lease: int) -> None:
        self.lost.add(lease)
        if self.lease == lease:
            self.lease = 0
            self._old = lease

    async def is_lost(self, lease: int) -> bool:
        """True if *lease* is known gone, or etcd says it expired."""
        if lease in self.lost:
            return True
        try:
            ttl = await self.t.lease_ttl(lease)
        except LeaseGone:
            ttl = -1
        if ttl < 0:             # -1: expired or unknown (0 is "under a second left")
            self.lease_gone(lease)
            return True
        return False

    # ---- background cleanups ----
    def cleanup(self, coro_fn) -> None:
        """Run ``coro_fn()`` on the client thread until it succeeds."""
        async def go():
            earlier = list(getattr(self.t, "inflight", ()))
            if earlier:          # what we clean up after may still be on its way: let it land first
                await asyncio.wait(earlier)
            delay = 0.01
            while True:
                try:
                    await coro_fn()
                    return
                except LeaseGone:
                    return
                except Exception as e:  # etcd unreachable: keep trying
                    log.debug("etcd cleanup failed (%s); retrying", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

        def start():
            task = asyncio.ensure_future(go())
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
        if self.runner.loop is _running_loop():
            start()
        else:
            self.runner.loop.call_soon_threadsafe(start)

    def close(self) -> None:
        try:
            self.runner.run(self.t.close())
        except Exception:
            pass
        self.runner.stop()


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
