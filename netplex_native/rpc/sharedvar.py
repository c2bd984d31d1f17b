"""Shared variables: values live in the controller process.

Plain variables hold ``str``; ``enc=True`` ones hold any picklable object,
stored as the pickle the setting container made.  ``own``: the creating
service owns the variable, which goes when that service's last container
ends; ``ro``: only the owner sets it (``ro`` implies ``own``); ``timeout``:
deleted after that many seconds without a get or set.

Invariants:
- The controller never unpickles what a container stored: it keeps and
  passes on the bytes; only containers decode them.  It unpickles only a
  pickle it made itself (a value set in the controller process).
- A value is checked (type, size <= wire.MAX_VALUE, encodable) before
  anything changes: a refused ``set`` leaves the value and its waiters as
  they were.  A plain value is encoded once, when set; every answer that
  carries it shares those bytes.
- Every ``get``/``wait`` is answered (or gets an error); expiry timers of
  variables created before the controller's loop runs are armed when it starts.
"""

from __future__ import annotations

import pickle
import time

from ..errors import (SharedVarPermissionError, SharedVarTypeError, WouldBlockError, check_bool,
                     check_name, check_timeout)
from .. import wire
from ..plugin import Plugin

CONTROLLER = ""   # the owner name of variables created in the controller process
#: Characters of a plain value shown by ``admin inspect``.
INSPECT_PREVIEW = 200


_EMPTY_JSON = wire.json_value("")


class _Var:
    __slots__ = ("name", "enc", "owner", "ro", "timeout", "value", "ever_set",
                 "waiters", "last_access", "expiry", "raw", "mine")

    def __init__(self, name, enc, owner, ro, timeout):
        self.name = name
        self.enc = enc
        self.owner = owner          # service name or None
        self.ro = ro
        self.timeout = timeout
        self.value = None if enc else ""    # str, or pickled bytes for enc
        self.raw = None if enc else _EMPTY_JSON   # a plain value as JSON (wire.RawJSON)
        self.mine = False           # enc: the pickle was made by the controller itself
        self.ever_set = False
        self.waiters = []           # (reply, timer) pairs
        self.last_access = time.monotonic()
        self.expiry = None


class VarState:
    def __init__(self, loop_getter):
        self._loop = loop_getter
        self.vars: dict[str, _Var] = {}
        self._unarmed: list[_Var] = []   # expiries to arm once the loop runs

    def create(self, service, name, own, ro, enc, timeout) -> bool:
        if name in self.vars:
            return False
        owner = service if (own or ro) else None
        v = self.vars[name] = _Var(name, enc, owner, ro, timeout)
        self._arm_expiry(v)
        return True

    def _arm_expiry(self, v: _Var) -> None:
        if v.timeout is None:
            return
        v.last_access = time.monotonic()
        if v.expiry is None:
            loop = self._loop()
            if loop is None:            # created before run(): armed in start()
                self._unarmed.append(v)
            else:
                v.expiry = loop.call_later(v.timeout, self._expire, v)

    def start(self) -> None:
        """The controller's loop runs: arm what was created before."""
        unarmed, self._unarmed = self._unarmed, []
        for v in unarmed:
            if self.vars.get(v.name) is v and v.expiry is None:
                v.expiry = self._loop().call_later(v.timeout, self._expire, v)

    def _expire(self, v: _Var) -> None:
        v.expiry = None
        if self.vars.get(v.name) is not v:
            return
        idle = time.monotonic() - v.last_access
        if idle >= v.timeout - 1e-3:
            self._delete(v)
        else:
            v.expiry = self._loop().call_later(v.timeout - idle, self._expire, v)

    def _touch(self, v: _Var) -> None:
        if v.timeout is not None:
            v.last_access = time.monotonic()

    def set(self, service, name, value, blob) -> bool:
        """value: a str (plain JSON) or None with the pickle in blob.
        Everything is checked before anything changes."""
        v = self.vars.get(name)
        if v is None:
            return False
        if v.ro and service != v.owner and service != CONTROLLER:
            raise SharedVarPermissionError(
                f"shared variable {name!r} is read-only: only service {v.owner!r} may set it")
        raw = None
        if v.enc:
            if blob is None:
                if type(value) is not str:
                    raise SharedVarTypeError(f"shared variable {name!r}: a value without a pickle must be a str")
                blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            stored = blob
            size = len(blob)
        else:
            if blob is not None or type(value) is not str:
                raise SharedVarTypeError(
                    f"shared variable {name!r} holds str values; create it with enc=True for other types")
            try:
                raw = wire.json_value(value)
            except UnicodeEncodeError as e:
                raise ValueError(f"shared variable {name!r}: the value is not valid Unicode text "
                                 f"(a lone surrogate at position {e.start})") from None
            stored = value
            size = len(raw)
        if size > wire.MAX_VALUE:
            raise ValueError(f"shared variable {name!r}: a value of {size} bytes "
                             f"exceeds the limit of {wire.MAX_VALUE} bytes")
        v.value = stored
        v.raw = raw
        v.mine = v.enc and service == CONTROLLER
        v.ever_set = True
        self._touch(v)
        waiters, v.waiters = v.waiters, []
        for reply, timer in waiters:
            if timer is not None:
                timer.cancel()
            self._answer(v, reply)
        return True

    def _answer(self, v: _Var, reply) -> None:
        if v.enc:
            reply.ok(None if v.value is None else True, blob=v.value)
        else:
            reply.ok(v.raw)

    def get(self, name, reply) -> None:
        v = self.vars.get(name)
        if v is None:
            reply.ok(None)
            return
        self._touch(v)
        self._answer(v, reply)

    def wait(self, name, timeout, reply) -> None:
        v = self.vars.get(name)
        if v is None:
            reply.ok(None)
            return
        self._touch(v)
        if v.ever_set:
            self._answer(v, reply)
            return
        if timeout == 0:
            reply.ok(None)
            return
        entry = [reply, None]
        v.waiters.append(entry)

        def drop():
            try:
                v.waiters.remove(entry)
            except ValueError:
                pass
            if entry[1] is not None:
                entry[1].cancel()
        reply.on_cancel = drop
        if timeout is not None:
            def expire():
                entry[1] = None
                drop()
                reply.ok(None)
            entry[1] = self._loop().call_later(timeout, expire)

    def delete(self, service, name) -> bool:
        v = self.vars.get(name)
        if v is None:
            return False
        if v.owner is not None and service != v.owner and service != CONTROLLER:
            raise SharedVarPermissionError(
                f"shared variable {name!r} is owned by service {v.owner!r}; only it may delete it")
        self._delete(v)
        return True

    def _delete(self, v: _Var) -> None:
        self.vars.pop(v.name, None)
        if v.expiry is not None:
            v.expiry.cancel()
            v.expiry = None
        waiters, v.waiters = v.waiters, []
        for reply, timer in waiters:
            if timer is not None:
                timer.cancel()
            try:
                reply.ok(None)
            except Exception:
                pass

    def service_gone(self, service: str) -> None:
        for v in [v for v in self.vars.values() if v.owner == service]:
            self._delete(v)

    def inspect(self) -> dict:
        """Values shown as previews (at most INSPECT_PREVIEW characters, and
        their size), so the answer stays small whatever is stored."""
        out = []
        for v in self.vars.values():
            if v.enc:
                value = f"<{len(v.value)} bytes pickled>" if v.value else None
                size = len(v.value) if v.value else 0
            else:
                value = v.value if len(v.value) <= INSPECT_PREVIEW else v.value[:INSPECT_PREVIEW] + "..."
                size = len(v.raw) - 2
            out.append({"name": v.name, "enc": v.enc, "owner": v.owner, "ro": v.ro, "timeout": v.timeout,
                        "set": v.ever_set, "waiters": len(v.waiters), "value": value, "size": size})
        return {"sharedvars": out}


def _check_create(name, own, ro, enc, timeout):
    name = check_name(name)
    check_bool(own, "own")
    check_bool(ro, "ro")
    check_bool(enc, "enc")
    timeout = check_timeout(timeout)
    if timeout == 0:
        raise ValueError("timeout must be > 0 seconds (or None for no timeout)")
    return name, own, ro, enc, timeout


class SharedVarPlugin(Plugin):
    name = "sharedvar"
    prefix = "var"
    provides = "sharedvar"

    def ctrl_added(self, ctrl) -> None:
        if ctrl.plugin_data(self) is None:
            ctrl.set_plugin_data(self, VarState(lambda: ctrl._loop))

    def ctrl_receive_call(self, ctrl, rec, proc, args, blob, reply) -> None:
        st: VarState = ctrl.plugin_data(self)
        svc = rec.service.name
        if proc == "create":
            name, own, ro, enc, timeout = _check_create(*args)
            reply.ok(st.create(svc, name, own, ro, enc, timeout))
        elif proc == "set":
            name, value = args
            reply.ok(st.set(svc, check_name(name), value, blob))
        elif proc == "get":
            st.get(check_name(args[0]), reply)
        elif proc == "wait":
            name, timeout = args
            st.wait(check_name(name), check_timeout(timeout), reply)
        elif proc == "delete":
            reply.ok(st.delete(svc, check_name(args[0])))
        else:
            raise ValueError(f"sharedvar: no procedure {proc!r}")

    def ctrl_started(self, ctrl) -> None:
        ctrl.plugin_data(self).start()

    def ctrl_container_finished(self, ctrl, container_id, is_last) -> None:
        if is_last:
            ctrl.plugin_data(self).service_gone(container_id.rpartition(".")[0])

    def inspect(self, ctrl) -> dict:
        return ctrl.plugin_data(self).inspect()

    def backend(self, ctrl, role):
        if role == "container":
            from .._context import ctx
            return _VarClient(ctx.channel)
        return _VarLocal(ctrl.plugin_data(self))


def _encode_value(value):
    """(json_value, blob): a str travels as JSON, anything else pickled."""
    if isinstance(value, str):
        return str(value), None
    try:
        return None, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        raise SharedVarTypeError(f"value of type {type(value).__name__} cannot be pickled: {e}") from None


def _check_size(name, jv, blob) -> None:
    """Refuse a value too large to be stored, before anything is sent."""
    if blob is not None:
        size = len(blob)
    else:
        try:
            size = len(wire.json_value(jv))
        except UnicodeEncodeError as e:
            raise ValueError(f"shared variable {name!r}: the value is not valid Unicode text "
                             f"(a lone surrogate at position {e.start})") from None
    if size > wire.MAX_VALUE:
        raise ValueError(f"shared variable {name!r}: a value of {size} bytes "
                         f"exceeds the limit of {wire.MAX_VALUE} bytes")


def _decode(result, blob):
    """In a container: the value of an answer (peers' pickles are trusted:
    containers of one service run the same program)."""
    if blob is not None:
        return pickle.loads(blob)
    return result if result is not True else None


class _VarClient:
    def __init__(self, channel):
        self._ch = channel

    def create_var(self, name, own, ro, enc, timeout):
        return self._ch.call("var.create", list(_check_create(name, own, ro, enc, timeout)))[0]

    def set_value(self, name, value):
        name = check_name(name)
        jv, blob = _encode_value(value)
        _check_size(name, jv, blob)
        return self._ch.call("var.set", [name, jv], blob)[0]

    def get_value(self, name):
        return _decode(*self._ch.call("var.get", [check_name(name)]))

    def delete_var(self, name):
        return self._ch.call("var.delete", [check_name(name)])[0]

    def wait_for_value(self, name, timeout=None):
        return _decode(*self._ch.call("var.wait", [check_name(name), check_timeout(timeout)]))

    async def wait_for_value_async(self, name, timeout=None):
        return _decode(*await self._ch.acall("var.wait", [check_name(name), check_timeout(timeout)]))

    # the awaitable forms: the loop serves other connections meanwhile
    async def create_var_async(self, name, own, ro, enc, timeout):
        return (await self._ch.acall("var.create", list(_check_create(name, own, ro, enc, timeout))))[0]

    async def set_value_async(self, name, value):
        name = check_name(name)
        jv, blob = _encode_value(value)
        _check_size(name, jv, blob)
        return (await self._ch.acall("var.set", [name, jv], blob))[0]

    async def get_value_async(self, name):
        return _decode(*await self._ch.acall("var.get", [check_name(name)]))

    async def delete_var_async(self, name):
        return (await self._ch.acall("var.delete", [check_name(name)]))[0]


class _VarLocal:
    """In the controller process: direct, never blocking, never unpickling
    what a container stored."""

    def __init__(self, st: VarState):
        self._st = st

    def create_var(self, name, own, ro, enc, timeout):
        name, own, ro, enc, timeout = _check_create(name, own, ro, enc, timeout)
        return self._st.create(CONTROLLER, name, own, ro, enc, timeout)

    def set_value(self, name, value):
        name = check_name(name)
        jv, blob = _encode_value(value)
        return self._st.set(CONTROLLER, name, jv, blob)

    def _value(self, v: _Var):
        if not v.enc:
            return v.value
        if v.value is None:
            return None
        if not v.mine:
            raise SharedVarPermissionError(
                f"shared variable {v.name!r} holds a pickle made by a container; the controller never "
                f"unpickles container data (read it in a container, or use a plain str variable)")
        return pickle.loads(v.value)   # made by this process

    def get_value(self, name):
        v = self._st.vars.get(check_name(name))
        if v is None:
            return None
        self._st._touch(v)
        return self._value(v)

    def delete_var(self, name):
        return self._st.delete(CONTROLLER, check_name(name))

    def wait_for_value(self, name, timeout=None):
        name = check_name(name)
        timeout = check_timeout(timeout)
        v = self._st.vars.get(name)
        if v is None:
            return None
        if not v.ever_set:
            if timeout != 0:
                raise WouldBlockError("wait_for_value on a variable never set would block the controller's loop")
            return None
        self._st._touch(v)
        return self._value(v)

    async def wait_for_value_async(self, name, timeout=None):
        return self.wait_for_value(name, timeout)

    # in the controller nothing blocks: the awaitable forms are the plain ones
    async def create_var_async(self, name, own, ro, enc, timeout):
        return self.create_var(name, own, ro, enc, timeout)

    async def set_value_async(self, name, value):
        return self.set_value(name, value)

    async def get_value_async(self, name):
        return self.get_value(name)

    async def delete_var_async(self, name):
        return self.delete_var(name)
