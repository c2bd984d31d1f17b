"""netplex_native.etcd: the semaphore, mutex and shared-variable API on an
etcd cluster, so that containers of several controllers (machines) share
them with the same crash guarantees.

    from netplex_native import etcd
    backend = etcd.Backend(["10.0.0.5:2379"], prefix="myapp/", lease_ttl=5.0)
    # in post_add_hook:
    ctrl.add_plugin(backend.semaphore_plugin)
    ctrl.add_plugin(backend.mutex_plugin)
    ctrl.add_plugin(backend.sharedvar_plugin)

Protection is leases: each container has one, granted and kept alive by its
controller and revoked when the controller reaps it; a machine that dies
stops keeping its leases alive and they expire after ``lease_ttl``.  Mutex
tokens are etcd revisions (``Mutex.token``), usable as fencing tokens; see
``guarded_put``.  Recipes: mutex.py, semaphore.py, sharedvar.py; the
controller's lease work: leases.py; transports: transport.py (gRPC in
containers, the JSON gateway in the controller, which forks).
"""

from __future__ import annotations

import math
import os

from ..errors import LeaseLostError, EtcdUnavailableError, check_name  # noqa: F401  (re-exported)


#: etcd's largest lease TTL (its MaxLeaseTTL), in seconds: the bound of
#: ``lease_ttl``, ``op_timeout`` and a shared variable's finite timeout.
MAX_TTL = 9_000_000_000
#: Longest key prefix accepted (UTF-8 bytes): every key starts with it.
MAX_PREFIX = 1024


def _endpoint(e) -> str:
    if not isinstance(e, str) or not e:
        raise TypeError(f"an etcd endpoint must be a non-empty str 'host:port', not {e!r}")
    for scheme in ("http://", "https://"):
        if e.startswith(scheme):
            if scheme == "https://":
                raise ValueError(f"etcd endpoint {e!r}: TLS is not supported by this backend")
            e = e[len(scheme):]
    e = e.rstrip("/")
    host, sep, port = e.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"etcd endpoint {e!r} is not 'host:port'")
    return e


class Backend:
    """The etcd backend: ``Backend(endpoints, *, prefix="netplex/",
    lease_ttl=5.0, op_timeout=10.0)``; add its ``semaphore_plugin``,
    ``mutex_plugin``, ``sharedvar_plugin`` instead of the RPC or native
    ones.  Controllers with the same endpoints and prefix share everything.

    *lease_ttl*: seconds (whole, 1 to ``MAX_TTL``, else ValueError) after which a dead machine's
    holdings are given back.  *op_timeout*: how long an operation that does
    not wait retries while no etcd endpoint answers before it raises
    ``EtcdUnavailableError`` (waits with a timeout retry until it; waits
    without one retry until etcd is back)."""

    def __init__(self, endpoints, *, prefix: str = "netplex/", lease_ttl: float = 5.0,
                 op_timeout: float = 10.0):
        if isinstance(endpoints, str):
            endpoints = [p for p in endpoints.split(",") if p]
        if not isinstance(endpoints, (list, tuple)) or not endpoints:
            raise TypeError("endpoints must be a non-empty list of 'host:port' strings")
        self.endpoints = tuple(_endpoint(e) for e in endpoints)
        if not isinstance(prefix, str) or not prefix:
            raise TypeError("prefix must be a non-empty str")
        try:
            plen = len(prefix.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError(f"prefix {prefix!r} is not valid Unicode text (a lone surrogate)") from None
        if plen > MAX_PREFIX:
            raise ValueError(f"prefix is {plen} bytes (UTF-8); at most {MAX_PREFIX}")
        self.prefix = prefix
        for what, v in (("lease_ttl", lease_ttl), ("op_timeout", op_timeout)):
            if type(v) is bool or not isinstance(v, (int, float)):
                raise TypeError(f"{what} must be a number of seconds, not {type(v).__name__}")
            if not (v > 0) or math.isinf(v) or v > MAX_TTL:
                raise ValueError(f"{what} must be a finite number of seconds > 0 and at most {MAX_TTL}, got {v!r}")
        if lease_ttl < 1 or lease_ttl != int(lease_ttl):
            raise ValueError(f"lease_ttl must be a whole number of seconds >= 1 (etcd leases are whole "
                             f"seconds), got {lease_ttl!r}")
        self.lease_ttl = float(lease_ttl)
        self.op_timeout = float(op_timeout)
        from .plugins import EtcdLeasePlugin, _Provides
        self.lease_plugin = EtcdLeasePlugin(self)
        self.semaphore_plugin = _Provides(self, "semaphore")
        self.mutex_plugin = _Provides(self, "mutex")
        self.sharedvar_plugin = _Provides(self, "sharedvar")
        self._sessions = {}     # pid -> (session, backends)

    def __repr__(self):
        return f"<etcd.Backend {','.join(self.endpoints)} prefix={self.prefix!r}>"

    # ---- per process ----
    def _backend(self, ctrl, role, kind):
        from .plugins import container_session, make_backends
        from .session import Session
        pid = os.getpid()
        got = self._sessions.get(pid)
        if got is None:
            self._sessions = {}          # a forked child forgets its parent's
            if role == "container":
                from .._context import ctx
                session = container_session(self, ctrl)
                svc = ctx.container.service_name if ctx.container is not None else ""
            else:
                keeper = ctrl.plugin_data(self.lease_plugin)
                session = Session(self, "controller", keeper.own_lease, runner=keeper.runner)
                svc = ""
            got = self._sessions[pid] = (session, make_backends(self, session, role, svc))
        return got[1][kind]

    def _close_controller_session(self):
        got = self._sessions.pop(os.getpid(), None)
        if got is not None:
            try:
                got[0].runner.run(got[0].t.close())
            except Exception:
                pass

    def _inspect(self, keeper) -> dict:
        """Mutexes and semaphores under the prefix, with their waiters."""
        from . import ops
        from .keys import Keys

        async def go():
            k = Keys(self.prefix)
            m = await keeper.t.range(ops.rq_prefix(k.all() + b"m/", keys_only=True))
            s = await keeper.t.range(ops.rq_prefix(k.all() + b"s/", keys_only=True))
            return list(m.kvs), list(s.kvs)
        try:
            m, s = keeper.runner.submit(go()).result(min(self.op_timeout, 2.0))  # the loop waits
        except Exception as e:
            return {"etcd": {"error": str(e)}}
        p = len(self.prefix) + 2
        unesc = lambda n: n.replace("%2F", "/").replace("%25", "%")   # noqa: E731
        mutexes, sems = {}, {}
        for kv in m:
            name = unesc(kv.key.decode()[p:].rsplit("/", 1)[0])
            mutexes[name] = mutexes.get(name, 0) + 1
        for kv in s:
            name, _, rest = kv.key.decode()[p:].partition("/")
            e = sems.setdefault(unesc(name), {"waiters": 0, "holders": 0})
            if rest.startswith("w/"):
                e["waiters"] += 1
            elif rest.startswith("d/"):
                e["holders"] += 1
        return {"etcd": {"endpoints": list(self.endpoints), "prefix": self.prefix,
                         "leases": len(keeper.containers),
                         "mutexes": [{"name": n, "locked": True, "waiters": c - 1} for n, c in mutexes.items()],
                         "semaphores": [dict(name=n, **e) for n, e in sems.items()]}}


def _mutex():
    from .._context import ctx
    impl = getattr(ctx.mutex, "impl", None)
    if impl is None:
        raise TypeError("guarded_put needs the etcd mutex plugin (Backend.mutex_plugin)")
    return impl


def guarded_put(mutex: str, token: int, key: str, value: bytes) -> bool:
    """Write *value* to the resource *key* (kept in etcd under the prefix)
    only if *token* still owns *mutex* — one etcd transaction, so a holder
    whose lease expired (paused, cut off) cannot overwrite what a later
    holder wrote.  True if written.  Call from the process that holds it."""
    m = _mutex()
    check_name(mutex, "mutex")
    if type(token) is not int:
        raise TypeError(f"token must be an int, not {type(token).__name__}")
    if isinstance(value, str):
        value = value.encode()
    return m.s.runner.run(m.guarded_put(mutex, token, check_name(key, "key"), bytes(value)))


async def guarded_put_async(mutex: str, token: int, key: str, value: bytes) -> bool:
    m = _mutex()
    if isinstance(value, str):
        value = value.encode()
    return await m.s.runner.arun(m.guarded_put(check_name(mutex, "mutex"), token, check_name(key, "key"), bytes(value)))


def read(key: str) -> bytes | None:
    """The resource *key* written by ``guarded_put`` (None if never written)."""
    m = _mutex()
    return m.s.runner.run(m.read(check_name(key, "key")))
