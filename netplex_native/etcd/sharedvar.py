"""Shared variables on etcd: one key per variable (keys.py ``v/NAME``),
holding its flags and value as JSON.

- ``own``/``ro``: the key is bound to a lease of the creating service,
  granted by the creating container's controller and revoked when that
  controller's last container of the service ends (so the variable goes
  with it, as in the reference; with several machines, with the creating
  machine's last container of the service).  With a ``timeout`` too, the
  key is bound to the timeout's lease and records the service's (``sl``):
  the controller deletes it when it revokes that lease.
- ``timeout``: the key is bound to a lease of its own whose TTL is the
  timeout rounded up to whole seconds (at least 1; ``math.inf`` is no
  timeout; above etcd's MaxLeaseTTL a ValueError), refreshed by every get
  and set.
- ``wait_for_value``: read; if never set, watch the key from the revision
  read and read again on any change (create the watch from the read's
  revision: nothing in between is missed).

Invariants: every write compares the key's mod revision with the read it was
decided on, and keeps the key's lease; checks (permissions, types, sizes)
come before anything is written; the controller never unpickles what a
container stored.
"""

from __future__ import annotations

import base64
import json
import math
import os
import pickle

from ..errors import (SharedVarPermissionError, SharedVarTypeError, WouldBlockError, check_name,
                      check_timeout)
from ..rpc.sharedvar import _check_create as _rpc_check_create
from . import MAX_TTL, ops
from .transport import LeaseGone, deadline_in
from .waits import remaining, watch_until

#: Largest encoded value: etcd refuses requests over 1.5 MiB by default.
#: Largest encoded value (the JSON text of a str value in UTF-8, or the base64
#: of a pickle); with the record's few hundred bytes of metadata a put stays
#: below etcd's default request limit of 1.5 MiB.
MAX_VALUE = 1024 * 1024


def _check_create(name, own, ro, enc, timeout):
    """The RPC backend's checks (check_timeout turns math.inf into None: no
    timeout), and a timeout etcd can hold as a lease TTL."""
    name, own, ro, enc, timeout = _rpc_check_create(name, own, ro, enc, timeout)
    if timeout is not None and timeout > MAX_TTL:
        raise ValueError(f"timeout {timeout!r} exceeds etcd's largest lease TTL ({MAX_TTL} s); "
                         f"use None or math.inf for no timeout")
    return name, own, ro, enc, timeout


class EtcdVars:
    def __init__(self, session, service_lease, service_name):
        self.s = session
        self.controller = session.role != "container"
        self._service_lease = service_lease        # async () -> lease id (containers)
        self.service = service_name                # "" in the controller
        self.me = f"ctrl:{os.uname().nodename}:{os.getpid()}" if self.controller else "c"

    async def _read(self, name):
        r = await self.s.t.range(ops.rq_get(self.s.keys.var(name)))
        kv = r.kvs[0] if r.kvs else None
        return kv, (json.loads(kv.value) if kv is not None else None), r.header.revision

    def _value(self, name, d):
        if not d["enc"]:
            return d["v"]
        if d["v"] is None:
            return None
        if self.controller and d.get("by") != self.me:
            raise SharedVarPermissionError(
                f"shared variable {name!r} holds a pickle made by a container; the controller never "
                f"unpickles container data (read it in a container, or use a plain str variable)")
        return pickle.loads(base64.b64decode(d["v"]))

    async def _touch(self, kv, d):
        if d.get("timeout") and kv.lease:
            try:
                await self.s.t.lease_keepalive(kv.lease)
            except LeaseGone:
                pass

    async def create_var(self, name, own, ro, enc, timeout):
        lease = service = 0
        if (own or ro) and not self.controller:
            lease = service = await self._service_lease()
        if timeout is not None:      # bound to its own lease; "sl" names the service's for its end
            lease = await self.s.t.lease_grant(max(1, math.ceil(timeout)))
        d = {"enc": enc, "owner": (self.service if (own or ro) else None), "ro": ro, "timeout": timeout,
             "set": False, "v": None if enc else "", "id": os.urandom(8).hex(), "sl": service}
        key = self.s.keys.var(name)
        r = await self.s.t.txn(ops.txn([ops.cmp_create(key, 0)], [ops.put(key, json.dumps(d).encode(), lease)],
                                       [ops.get(key)]))
        if r.succeeded:
            return True
        kv = ops.one(r, 0)
        if kv is not None and json.loads(kv.value).get("id") == d["id"]:
            return True
        if timeout is not None:
            await self.s.t.lease_revoke(lease)
        return False

    async def set_value(self, name, value):
        if isinstance(value, str):
            v, enc_value = str(value), False
        else:
            try:
                v = base64.b64encode(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).decode()
            except Exception as e:
                raise SharedVarTypeError(f"value of type {type(value).__name__} cannot be pickled: {e}") from None
            enc_value = True
        while True:
            kv, d, _ = await self._read(name)
            if kv is None:
                return False
            if d["ro"] and self.service != d["owner"] and not self.controller:
                raise SharedVarPermissionError(
                    f"shared variable {name!r} is read-only: only service {d['owner']!r} may set it")
            if enc_value and not d["enc"]:
                raise SharedVarTypeError(
                    f"shared variable {name!r} holds str values; create it with enc=True for other types")
            if d["enc"] and not enc_value:
                v = base64.b64encode(pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL)).decode()
            try:
                size = len(json.dumps(v, ensure_ascii=False).encode())
            except UnicodeEncodeError as e:     # e.start counts in the JSON text: find it in the value
                pos = next((i for i, ch in enumerate(v) if 0xD800 <= ord(ch) <= 0xDFFF), e.start)
                raise ValueError(f"shared variable {name!r}: the value is not valid Unicode text "
                                 f"(a lone surrogate at position {pos})") from None
            if size > MAX_VALUE:
                raise ValueError(f"shared variable {name!r}: the value's encoded size ({size} bytes: its "
                                 f"JSON text in UTF-8, or the base64 of its pickle) exceeds the etcd "
                                 f"backend's limit of {MAX_VALUE} bytes")
            d.update(v=v, set=True, by=self.me)
            data = json.dumps(d, ensure_ascii=False).encode()
            try:
                r = await self.s.t.txn(ops.txn([ops.cmp_mod(kv.key, kv.mod_revision)],
                                                [ops.put(kv.key, data, kv.lease)]))
            except LeaseGone:
                return False      # expired meanwhile: the variable is gone
            if r.succeeded:
                await self._touch(kv, d)
                return True

    async def get_value(self, name):
        kv, d, _ = await self._read(name)
        if kv is None:
            return None
        await self._touch(kv, d)
        return self._value(name, d)

    async def delete_var(self, name):
        while True:
            kv, d, _ = await self._read(name)
            if kv is None:
                return False
            if d["owner"] is not None and self.service != d["owner"] and not self.controller:
                raise SharedVarPermissionError(
                    f"shared variable {name!r} is owned by service {d['owner']!r}; only it may delete it")
            r = await self.s.t.txn(ops.txn([ops.cmp_mod(kv.key, kv.mod_revision)], [ops.delete(kv.key)]))
            if r.succeeded:
                if d.get("timeout") and kv.lease:
                    await self.s.t.lease_revoke(kv.lease)
                return True

    async def wait_for_value(self, name, timeout):
        deadline = deadline_in(timeout)
        while True:
            kv, d, rev = await self._read(name)
            if kv is None:
                return None
            if d["set"]:
                await self._touch(kv, d)
                return self._value(name, d)
            if remaining(deadline) == 0:
                return None
            await watch_until(self.s, kv.key, None, rev + 1, deadline, lambda ev: True)


class VarBackend:
    """What ``ctx.var`` is on the etcd backend."""

    def __init__(self, impl: EtcdVars):
        self.impl = impl
        self._run = impl.s.runner.run
        self._arun = impl.s.runner.arun

    def create_var(self, name, own, ro, enc, timeout):
        return self._run(self.impl.create_var(*_check_create(name, own, ro, enc, timeout)))

    async def create_var_async(self, name, own, ro, enc, timeout):
        return await self._arun(self.impl.create_var(*_check_create(name, own, ro, enc, timeout)))

    def set_value(self, name, value):
        return self._run(self.impl.set_value(check_name(name), value))

    async def set_value_async(self, name, value):
        return await self._arun(self.impl.set_value(check_name(name), value))

    def get_value(self, name):
        return self._run(self.impl.get_value(check_name(name)))

    async def get_value_async(self, name):
        return await self._arun(self.impl.get_value(check_name(name)))

    def delete_var(self, name):
        return self._run(self.impl.delete_var(check_name(name)))

    async def delete_var_async(self, name):
        return await self._arun(self.impl.delete_var(check_name(name)))

    def wait_for_value(self, name, timeout=None):
        name, timeout = check_name(name), check_timeout(timeout)
        if self.impl.controller:        # never blocks: a value now, or None, or WouldBlockError
            kv, d, _ = self._run(self.impl._read(name))
            if kv is None:
                return None
            if d["set"] or timeout == 0:
                return self._run(self.impl.wait_for_value(name, 0))
            raise WouldBlockError("wait_for_value on a variable never set would block the controller's loop")
        return self._run(self.impl.wait_for_value(name, timeout))

    async def wait_for_value_async(self, name, timeout=None):
        name, timeout = check_name(name), check_timeout(timeout)
        if self.impl.controller:
            return self.wait_for_value(name, timeout)
        return await self._arun(self.impl.wait_for_value(name, timeout))
