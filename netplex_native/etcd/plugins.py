"""The etcd plugins: ``lease`` (the controller's lease work, required by the
others), ``semaphore``, ``mutex``, ``sharedvar``.  Controller side: the
lease keeper (leases.py).  Process side: one ``Session`` per process
(the controller's over the JSON gateway, each container's over gRPC, made
after its fork) and the backend objects the public modules call.
"""

from __future__ import annotations

import asyncio
import os

from ..plugin import Plugin
from .leases import LeaseKeeper
from .mutex import EtcdMutex, MutexBackend
from .semaphore import EtcdSemaphore, SemaphoreBackend
from .session import Session
from .sharedvar import EtcdVars, VarBackend


class EtcdLeasePlugin(Plugin):
    prefix = "etcd"

    def __init__(self, backend):
        self.b = backend
        self.name = f"etcd.lease[{backend.prefix}]"

    def ctrl_added(self, ctrl) -> None:
        for other in ctrl.plugins():
            if isinstance(other, EtcdLeasePlugin) and other is not self:
                raise ValueError(f"one etcd backend per controller: {other.b!r} was added already, "
                                 f"not also {self.b!r}")
        if ctrl.plugin_data(self) is None:
            ctrl.set_plugin_data(self, LeaseKeeper(self.b))

    def ctrl_started(self, ctrl) -> None:
        ctrl.plugin_data(self).start()

    def ctrl_receive_call(self, ctrl, rec, proc, args, blob, reply) -> None:
        keeper: LeaseKeeper = ctrl.plugin_data(self)
        if proc == "lease":
            old = args[0] if args and type(args[0]) is int else 0
            keeper.grant_for(ctrl, rec, old, reply)
        elif proc == "service_lease":
            old = args[0] if args and type(args[0]) is int else 0
            keeper.grant_for(ctrl, rec, old, reply, service=rec.service.name)
        else:
            raise ValueError(f"etcd: no procedure {proc!r}")

    def ctrl_container_reaped(self, ctrl, rec) -> None:
        ctrl.plugin_data(self).reaped(rec)

    def ctrl_container_finished(self, ctrl, container_id, is_last) -> None:
        if is_last:
            ctrl.plugin_data(self).service_gone(container_id.rpartition(".")[0])

    def ctrl_unplugged(self, ctrl) -> None:
        keeper = ctrl.plugin_data(self)
        if keeper is not None and keeper.runner.pid == os.getpid():   # never in a forked child
            self.b._close_controller_session()
            keeper.close()
            ctrl.set_plugin_data(self, None)

    def inspect(self, ctrl) -> dict:
        return self.b._inspect(ctrl.plugin_data(self))


class _Provides(Plugin):
    def __init__(self, backend, kind):
        self.b = backend
        self.provides = kind
        self.name = f"{kind}.etcd[{backend.prefix}]"
        self.required = (backend.lease_plugin,)

    def backend(self, ctrl, role):
        return self.b._backend(ctrl, role, self.provides)


def container_session(backend, ctrl):
    """A container's session: gRPC, made in the container (after the fork)."""
    from .._context import ctx

    async def lease_source(old):
        loop = asyncio.get_running_loop()
        return (await loop.run_in_executor(None, lambda: ctx.channel.call("etcd.lease", [old])))[0]
    return Session(backend, "container", lease_source)


def service_lease_source(session):
    from .._context import ctx
    state = {"lease": 0}

    async def get():
        if state["lease"] and state["lease"] not in session.lost:
            return state["lease"]
        loop = asyncio.get_running_loop()
        old = state["lease"]
        state["lease"] = (await loop.run_in_executor(
            None, lambda: ctx.channel.call("etcd.service_lease", [old])))[0]
        return state["lease"]
    return get


def make_backends(backend, session, role, service_name):
    return {
        "semaphore": SemaphoreBackend(EtcdSemaphore(session)),
        "mutex": MutexBackend(EtcdMutex(session)),
        "sharedvar": VarBackend(EtcdVars(session, service_lease_source(session) if role == "container" else None,
                                         service_name)),
    }
