"""How one process talks to etcd: the same small async interface over gRPC
(containers) and over etcd's JSON gateway (the controller).

Invariants:
- gRPC is used only in a process that will not fork afterwards: containers
  create their channel (``GrpcTransport``) in their own client thread, after
  the fork.  The controller forks containers, so it speaks HTTP/1.1 to the
  JSON gateway (``/v3/kv/...``, ``/v3/lease/...``) with the same protobuf
  messages (``json_format``); it never creates a gRPC channel.
- Every call has a deadline; while no endpoint answers, a call is retried
  (endpoints in turn, back-off up to 0.2 s) until its deadline, then raises
  ``EtcdUnavailableError``.  A retried call may have been applied once
  already: every recipe's transaction carries a compare that its own success
  makes false, and the recipes re-read to tell (see each recipe).
- A put bound to a lease that no longer exists raises ``LeaseGone``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time

from google.protobuf import json_format

from ..errors import EtcdUnavailableError

try:
    from aetcd.rpc import rpc_pb2 as pb
    from aetcd.rpc.kv_pb2 import Event as _Event
except ImportError as e:     # pragma: no cover - the etcd extra is not installed
    raise ImportError(f"the etcd backend needs aetcd and protobuf>=5.27.2: "
                      f"pip install 'netplex_native[etcd]' ({e})") from e


#: The type of a delete event of a watch.
DELETE = _Event.DELETE


def _check_txn(req):
    if not any(op.WhichOneof("request") in ("request_put", "request_delete_range")
               for op in list(req.success) + list(req.failure)):
        raise ValueError("a read-only etcd transaction (reads are Range requests: see ops.py)")


class LeaseGone(Exception):
    """A request named a lease that etcd no longer has."""


async def wait_for(aw, timeout):
    """``asyncio.wait_for`` that never swallows a cancellation (on Python
    3.11 it may, when the awaited completes as the cancel arrives: a wait
    cancelled by its caller would go on waiting)."""
    fut = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({fut}, timeout=timeout)
    except asyncio.CancelledError:
        fut.cancel()
        raise
    if not done:
        fut.cancel()
        raise asyncio.TimeoutError
    return fut.result()


def deadline_in(seconds: float | None) -> float | None:
    return None if seconds is None else time.monotonic() + seconds


def _remaining(deadline: float | None, cap: float) -> float:
    if deadline is None:
        return cap
    return max(0.0, min(cap, deadline - time.monotonic()))


class _Base:
    """Retry loop shared by both transports."""

    def __init__(self, endpoints: list[str], op_timeout: float):
        self.endpoints = endpoints
        self.op_timeout = op_timeout
        self._cur = 0
        self.closed = False

    async def _retry(self, what, attempt, deadline, info=None):
        """attempt(endpoint_index, seconds) -> result; raises _Retry to go on.
        *info*: a dict; ``info["retried"]`` is set when a request was sent
        again (so an earlier attempt may have been applied)."""
        if deadline is None:
            deadline = time.monotonic() + self.op_timeout
        delay = 0.005
        last = None
        while True:
            if self.closed:
                raise EtcdUnavailableError(f"etcd {what}: the client is closed")
            left = deadline - time.monotonic()
            if left <= 0:
                raise EtcdUnavailableError(
                    f"etcd {what}: no answer from {', '.join(self.endpoints)} in time ({last})")
            try:
                return await attempt(self._cur, min(left, max(1.0, self.op_timeout)))
            except _Retry as e:
                last = e.args[0] if e.args else "unavailable"
                if info is not None:
                    info["retried"] = True
                if len(self.endpoints) > 1:
                    self._cur = (self._cur + 1) % len(self.endpoints)
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.2)


class _Retry(Exception):
    pass


# ---------------------------------------------------------------- gRPC


class GrpcTransport(_Base):
    """Containers: grpc.aio on the client thread's loop (created after the fork)."""

    def __init__(self, endpoints, op_timeout):
        super().__init__(endpoints, op_timeout)
        import grpc
        from aetcd.rpc import rpc_pb2_grpc as g
        self._grpc = grpc
        self._g = g
        self._channels = {}
        self.inflight: set = set()      # requests sent and not answered yet

    def _stubs(self, i):
        st = self._channels.get(i)
        if st is None:
            ch = self._grpc.aio.insecure_channel(self.endpoints[i], options=[
                ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                ("grpc.max_reconnect_backoff_ms", 500)])
            st = self._channels[i] = (ch, self._g.KVStub(ch), self._g.LeaseStub(ch), self._g.WatchStub(ch))
        return st

    def _error(self, e):
        code = e.code()
        details = e.details() or ""
        if "lease not found" in details:
            raise LeaseGone(details)
        if code in (self._grpc.StatusCode.UNAVAILABLE, self._grpc.StatusCode.DEADLINE_EXCEEDED,
                    self._grpc.StatusCode.UNKNOWN, self._grpc.StatusCode.INTERNAL,
                    self._grpc.StatusCode.CANCELLED, self._grpc.StatusCode.ABORTED):
            raise _Retry(f"{code.name}: {details}")
        raise EtcdUnavailableError(f"etcd refused: {code.name}: {details}")

    async def _unary(self, what, stub_i, method, req, deadline, info=None):
        """A request is never cancelled once sent (neither by a cancelled
        caller nor by a gRPC deadline): it runs as a task of its own, which a
        caller that gives up leaves running.  So a write is never overtaken
        by a later cleanup of it (``Session.cleanup`` waits for ``inflight``
        first), and a read never meets etcd-io/etcd#14110."""
        async def attempt(i, secs):
            stub = self._stubs(i)[stub_i]
            task = asyncio.ensure_future(getattr(stub, method)(req, wait_for_ready=False))
            self.inflight.add(task)
            task.add_done_callback(self._finished)
            done, _ = await asyncio.wait({task}, timeout=max(secs, 0.001))
            if not done:
                raise _Retry("no answer in time")
            try:
                return task.result()
            except self._grpc.aio.AioRpcError as e:
                self._error(e)
        return await self._retry(what, attempt, deadline, info)

    def _finished(self, task):
        self.inflight.discard(task)
        if not task.cancelled():
            task.exception()        # retrieved: an abandoned request's error is not an error

    async def range(self, req, deadline=None):
        return await self._unary("range", 1, "Range", req, deadline)

    async def txn(self, req, deadline=None, info=None):
        _check_txn(req)
        return await self._unary("txn", 1, "Txn", req, deadline, info)

    async def lease_grant(self, ttl, deadline=None):
        return (await self._unary("lease grant", 2, "LeaseGrant", pb.LeaseGrantRequest(TTL=ttl), deadline)).ID

    async def lease_revoke(self, lease, deadline=None):
        try:
            await self._unary("lease revoke", 2, "LeaseRevoke", pb.LeaseRevokeRequest(ID=lease), deadline)
            return True
        except LeaseGone:
            return False

    async def lease_ttl(self, lease, deadline=None):
        return (await self._unary("lease ttl", 2, "LeaseTimeToLive",
                                  pb.LeaseTimeToLiveRequest(ID=lease), deadline)).TTL

    async def lease_keepalive(self, lease, deadline=None):
        async def attempt(i, secs):
            call = self._stubs(i)[2].LeaseKeepAlive(timeout=max(secs, 0.001), wait_for_ready=True)
            try:
                await call.write(pb.LeaseKeepAliveRequest(ID=lease))
                resp = await call.read()
                return resp.TTL if resp is not None else 0
            except self._grpc.aio.AioRpcError as e:
                self._error(e)
            finally:
                call.cancel()
        return await self._retry("lease keepalive", attempt, deadline)

    async def watch(self, key, range_end, start_revision, deadline):
        """An open watch (``Watch``) from *start_revision*; raises
        EtcdUnavailableError if it cannot be created by *deadline*."""
        async def attempt(i, secs):
            call = self._stubs(i)[3].Watch(wait_for_ready=True)
            req = pb.WatchCreateRequest(key=key, start_revision=start_revision)
            if range_end:
                req.range_end = range_end
            try:
                await call.write(pb.WatchRequest(create_request=req))
                resp = await wait_for(call.read(), max(secs, 0.001))
            except asyncio.TimeoutError:
                call.cancel()
                raise _Retry("watch not created in time")
            except self._grpc.aio.AioRpcError as e:
                call.cancel()
                self._error(e)
            except BaseException:          # cancelled: the stream goes too
                call.cancel()
                raise
            if resp is None or resp is self._grpc.aio.EOF or not resp.created or resp.canceled:
                call.cancel()
                if resp is not None and resp is not self._grpc.aio.EOF and resp.compact_revision:
                    return _Compacted()
                raise _Retry("watch refused")
            return Watch(call, self._grpc)
        return await self._retry("watch", attempt, deadline)

    async def close(self):
        self.closed = True
        for ch, *_ in self._channels.values():
            try:
                await ch.close(grace=None)
            except Exception:
                pass
        self._channels.clear()


class Watch:
    """Events of one watch; ``next()`` returns a list of events (empty on a
    progress notice) or raises ``WatchBroken`` when the stream ended."""

    def __init__(self, call, grpc):
        self._call = call
        self._grpc = grpc

    async def next(self):
        try:
            resp = await self._call.read()
        except self._grpc.aio.AioRpcError as e:
            raise WatchBroken(str(e.code())) from None
        if resp is None or resp is self._grpc.aio.EOF or resp.canceled:
            raise WatchBroken("watch ended")
        return list(resp.events)

    def close(self):
        self._call.cancel()


class _Compacted(Watch):
    """The revision to watch from was compacted: the caller re-reads."""

    def __init__(self):
        pass

    async def next(self):
        raise WatchBroken("compacted")

    def close(self):
        pass


class WatchBroken(Exception):
    pass


# ---------------------------------------------------------------- HTTP gateway


class GatewayTransport(_Base):
    """The controller: blocking HTTP/1.1 to the JSON gateway, on the
    controller's client thread (never its event loop thread)."""

    def __init__(self, endpoints, op_timeout):
        super().__init__(endpoints, op_timeout)
        self._conn: http.client.HTTPConnection | None = None
        self._conn_i = -1

    def _post(self, i, path, body: bytes, secs: float) -> dict:
        if self._conn is None or self._conn_i != i:
            self._drop()
            host, _, port = self.endpoints[i].rpartition(":")
            self._conn = http.client.HTTPConnection(host, int(port), timeout=max(secs, 0.05))
            self._conn_i = i
        self._conn.timeout = max(secs, 0.05)
        if self._conn.sock is not None:
            self._conn.sock.settimeout(max(secs, 0.05))
        try:
            self._conn.request("POST", path, body, {"Content-Type": "application/json"})
            r = self._conn.getresponse()
            data = r.read()
        except (OSError, http.client.HTTPException) as e:
            self._drop()
            raise _Retry(f"{type(e).__name__}: {e}")
        if r.status != 200:
            try:
                msg = json.loads(data).get("message") or json.loads(data).get("error") or data[:200]
            except ValueError:
                msg = data[:200]
            if "lease not found" in str(msg):
                raise LeaseGone(str(msg))
            if r.status in (502, 503, 504) or "leader" in str(msg) or "timed out" in str(msg):
                raise _Retry(f"HTTP {r.status}: {msg}")
            raise EtcdUnavailableError(f"etcd refused {path}: HTTP {r.status}: {msg}")
        return data

    def _drop(self):
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None

    async def _call(self, what, path, req, resp_cls, deadline, info=None):
        body = json_format.MessageToJson(req, preserving_proto_field_name=True, indent=None).encode()

        async def attempt(i, secs):
            data = self._post(i, path, body, secs)
            return json_format.Parse(data, resp_cls(), ignore_unknown_fields=True)
        return await self._retry(what, attempt, deadline, info)

    async def range(self, req, deadline=None):
        return await self._call("range", "/v3/kv/range", req, pb.RangeResponse, deadline)

    async def txn(self, req, deadline=None, info=None):
        _check_txn(req)
        return await self._call("txn", "/v3/kv/txn", req, pb.TxnResponse, deadline, info)

    async def lease_grant(self, ttl, deadline=None):
        r = await self._call("lease grant", "/v3/lease/grant", pb.LeaseGrantRequest(TTL=ttl),
                             pb.LeaseGrantResponse, deadline)
        return r.ID

    async def lease_revoke(self, lease, deadline=None):
        try:
            await self._call("lease revoke", "/v3/lease/revoke", pb.LeaseRevokeRequest(ID=lease),
                             pb.LeaseRevokeResponse, deadline)
            return True
        except LeaseGone:
            return False

    async def lease_keepalive(self, lease, deadline=None):
        # the gateway wraps a streamed answer as {"result": {...}}
        body = json.dumps({"ID": str(lease)}).encode()

        async def attempt(i, secs):
            data = json.loads(self._post(i, "/v3/lease/keepalive", body, secs))
            return int((data.get("result") or {}).get("TTL", 0))
        return await self._retry("lease keepalive", attempt, deadline)

    async def lease_ttl(self, lease, deadline=None):
        r = await self._call("lease ttl", "/v3/lease/timetolive", pb.LeaseTimeToLiveRequest(ID=lease),
                             pb.LeaseTimeToLiveResponse, deadline)
        return r.TTL

    async def watch(self, key, range_end, start_revision, deadline):
        raise RuntimeError("the controller never waits on etcd")

    async def close(self):
        self.closed = True
        self._drop()
