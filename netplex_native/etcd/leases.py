"""The controller's lease work: one lease per container, granted when the
container asks (``etcd.lease``, before its first protected operation), kept
alive every TTL/3, and revoked when the controller reaps the container; one
lease per service for its ``own`` shared variables; the controller's own.

Runs on the controller's etcd client thread over the JSON gateway (never
gRPC: the controller forks).  Invariants:
- The controller's loop never waits on etcd: a reaped container's lease is
  revoked by a task on the client thread, fired at the reap and never
  awaited there; it retries until etcd answers (so the lease goes as soon
  as etcd answers) or until ``revoke_give_up`` seconds have passed, after
  which the lease has expired by its TTL anyway (it is no longer kept
  alive from the reap on).  A lease granted for a container that was
  reaped meanwhile is revoked the same way.
- A lease whose keep-alive says it expired is forgotten; the container gets
  a new one when it asks again (its operations as a holder under the old one
  raise ``LeaseLostError``).
- At shutdown every lease this controller granted is revoked.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import json

from . import ops
from .keys import Keys
from .runner import Runner
from .transport import GatewayTransport, LeaseGone

log = logging.getLogger("netplex_native.etcd")



class LeaseKeeper:
    def __init__(self, cfg):
        self.cfg = cfg
        self.ttl = max(1, math.ceil(cfg.lease_ttl))
        self.runner = Runner("netplex-etcd-controller")
        self.t = GatewayTransport(list(cfg.endpoints), cfg.op_timeout)
        self.containers: dict[str, int] = {}
        self.services: dict[str, int] = {}
        self.own = 0
        self._task = None
        self._own_lock = None

    # ---- on the client thread ----
    async def own_lease(self, old=0) -> int:
        if self._own_lock is None:
            self._own_lock = asyncio.Lock()
        async with self._own_lock:
            if old and old == self.own:
                self.own = 0
            if not self.own:
                self.own = await self.t.lease_grant(self.ttl)
            return self.own

    async def _keepalive_loop(self):
        while True:
            await asyncio.sleep(self.ttl / 3)
            for kind, table in (("container", self.containers), ("service", self.services)):
                for k, lease in list(table.items()):
                    await self._keep(lease, lambda k=k, table=table, lease=lease: table.get(k) == lease and table.pop(k))
            if self.own:
                own = self.own
                await self._keep(own, lambda: setattr(self, "own", 0) if self.own == own else None)

    async def _keep(self, lease, forget):
        try:
            ttl = await self.t.lease_keepalive(lease)
        except LeaseGone:
            ttl = 0
        except Exception as e:
            log.warning("etcd keep-alive of lease %x failed: %s", lease, e)
            return
        if ttl <= 0:
            log.warning("etcd lease %x expired; its holder gets a new one", lease)
            forget()

    @property
    def revoke_give_up(self) -> float:
        """Seconds after which a revoke that etcd never answered is given
        up: by then the lease (no longer kept alive) has expired."""
        return 2 * self.ttl + self.cfg.op_timeout + 5.0

    async def _revoke(self, lease, give_up=None):
        deadline = time.monotonic() + (give_up if give_up is not None else self.revoke_give_up)
        delay = 0.01
        while True:
            try:
                await self.t.lease_revoke(lease, deadline=min(deadline, time.monotonic() + self.cfg.op_timeout))
                return
            except Exception as e:
                if time.monotonic() >= deadline:
                    log.warning("etcd: revoke of lease %x not confirmed; it expires by its TTL (%s)", lease, e)
                    return
                log.debug("revoke of lease %x failed (%s); retrying", lease, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    # ---- on the controller's loop ----
    def start(self):
        async def go():
            self._task = asyncio.ensure_future(self._keepalive_loop())
        self.runner.submit(go())

    def grant_for(self, ctrl, rec, old, reply, service=None):
        """Grant a lease for container *rec* (or its service) and answer."""
        table, k = (self.services, service) if service else (self.containers, rec.id)

        async def go():
            cur = table.get(k)
            if cur and cur != old:
                return cur
            if old and cur == old:
                table.pop(k, None)
                await self._revoke(old)
            return await self.t.lease_grant(self.ttl)

        def done(cf):
            try:
                lease = cf.result()
            except Exception as e:
                ctrl._loop.call_soon_threadsafe(reply.error, e)
                return
            ctrl._loop.call_soon_threadsafe(finish, lease)

        def finish(lease):
            if not rec.alive and not service:
                self.runner.submit(self._revoke(lease))   # reaped meanwhile
                reply.error(RuntimeError("container gone"))
                return
            if table.get(k) not in (None, lease):
                if table[k] != lease:
                    self.runner.submit(self._revoke(lease))
                    lease = table[k]
            table[k] = lease
            reply.ok(lease)
        self.runner.submit(go()).add_done_callback(done)

    def reaped(self, rec):
        """Fire the revoke of *rec*'s lease; never waits (the loop's thread)."""
        lease = self.containers.pop(rec.id, None)
        if lease:
            self.runner.submit(self._revoke(lease))

    def service_gone(self, service):
        """The controller's last container of *service* ended: its ``own``
        variables go (the service lease; those with a timeout lease of their
        own name it in ``sl`` and are deleted here)."""
        lease = self.services.pop(service, None)
        if lease:
            self.runner.submit(self._service_gone(lease))

    async def _service_gone(self, lease):
        await self._revoke(lease)
        try:
            r = await self.t.range(ops.rq_prefix(Keys(self.cfg.prefix).vars()))
            for kv in r.kvs:
                if kv.lease and json.loads(kv.value).get("sl") == lease:
                    await self.t.txn(ops.txn([ops.cmp_mod(kv.key, kv.mod_revision)], [ops.delete(kv.key)]))
        except Exception as e:
            log.warning("etcd: deleting the own variables with a timeout of a finished service failed: %s", e)

    def close(self, timeout=5.0):
        leases = list(self.containers.values()) + list(self.services.values()) + ([self.own] if self.own else [])
        self.containers.clear()
        self.services.clear()
        self.own = 0

        async def go():
            if self._task is not None:
                self._task.cancel()
            await asyncio.gather(*(self.t.lease_revoke(lease) for lease in leases), return_exceptions=True)
            await self.t.close()
        try:
            self.runner.submit(go()).result(timeout)
        except Exception as e:
            log.warning("etcd: revoking this controller's leases at shutdown failed: %s", e)
        self.runner.stop()
