"""Shared variables: values live in the controller process.

Plain variables hold ``str``; ``enc=True`` ones hold any picklable object,
stored as the pickle the setting container made (the controller only ever
pickles a str for an enc variable; it never unpickles).  ``own``: the
creating service owns the variable, which goes when that service's last
container ends; ``ro``: only the owner sets it (``ro`` implies ``own``);
``timeout``: deleted after that many seconds without a get or set.
"""

from __future__ import annotations

import pickle
import time

from .errors import (SharedVarPermissionError, SharedVarTypeError, WouldBlockError, check_bool,
                     check_name, check_timeout)
from .plugin import Plugin

CONTROLLER = ""   # the owner name of variables created in the controller process


class _Var:
    __slots__ = ("name", "enc", "owner", "ro", "timeout", "value", "ever_set",
                 "waiters", "last_access", "expiry")

    def __init__(self, name, enc, owner, ro, timeout):
        self.name = name
        self.enc = enc
        self.owner = owner          # service name or None
        self.ro = ro
        self.timeout = timeout
        self.value = None if enc else ""    # str, or pickled bytes for enc
        self.ever_set = False
        self.waiters = []           # (reply, timer) pairs
        self.last_access = time.monotonic()
        self.expiry = None


class VarState:
    def __init__(self, loop_getter):
        self._loop = loop_getter
        self.vars: dict[str, _Var] = {}

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
        """value: a str (plain JSON) or None with the pickle in blob."""
        v = self.vars.get(name)
        if v is None:
            return False
        if v.ro and service != v.owner and service != CONTROLLER:
            raise SharedVarPermissionError(
                f"shared variable {name!r} is read-only: only service {v.owner!r} may set it")
        if v.enc:
            stored = blob if blob is not None else pickle.dumps(value)
        else:
            if blob is not None or not isinstance(value, str):
                raise SharedVarTypeError(
                    f"shared variable {name!r} holds str values; create it with enc=True for other types")
            stored = value
        v.value = stored
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
            reply.ok(v.value)

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
        return {"sharedvars": [
            {"name": v.name, "enc": v.enc, "owner": v.owner, "ro": v.ro, "timeout": v.timeout,
             "set": v.ever_set, "waiters": len(v.waiters),
             "value": (v.value if not v.enc else (f"<{len(v.value)} bytes pickled>" if v.value else None))}
            for v in self.vars.values()]}


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

    def ctrl_container_finished(self, ctrl, container_id, is_last) -> None:
        if is_last:
            ctrl.plugin_data(self).service_gone(container_id.rpartition(".")[0])

    def inspect(self, ctrl) -> dict:
        return ctrl.plugin_data(self).inspect()

    def backend(self, ctrl, role):
        if role == "container":
            from ._context import ctx
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


def _decode(result, blob):
    if blob is not None:
        return pickle.loads(blob)  # made by a container of this same program
    return result if result is not True else None


class _VarClient:
    def __init__(self, channel):
        self._ch = channel

    def create_var(self, name, own, ro, enc, timeout):
        return self._ch.call("var.create", list(_check_create(name, own, ro, enc, timeout)))[0]

    def set_value(self, name, value):
        name = check_name(name)
        jv, blob = _encode_value(value)
        return self._ch.call("var.set", [name, jv], blob)[0]

    def get_value(self, name):
        return _decode(*self._ch.call("var.get", [check_name(name)]))

    def delete_var(self, name):
        return self._ch.call("var.delete", [check_name(name)])[0]

    def wait_for_value(self, name, timeout=None):
        return _decode(*self._ch.call("var.wait", [check_name(name), check_timeout(timeout)]))

    async def wait_for_value_async(self, name, timeout=None):
        return _decode(*await self._ch.acall("var.wait", [check_name(name), check_timeout(timeout)]))


class _Now:
    """A reply object for direct calls in the controller process."""

    def __init__(self):
        self.result = None
        self.blob = None
        self.done = False
        self.on_cancel = None
        self.alive = True

    def ok(self, result=None, blob=None, undo=None):
        self.result, self.blob, self.done = result, blob, True


class _VarLocal:
    def __init__(self, st: VarState):
        self._st = st

    def create_var(self, name, own, ro, enc, timeout):
        name, own, ro, enc, timeout = _check_create(name, own, ro, enc, timeout)
        return self._st.create(CONTROLLER, name, own, ro, enc, timeout)

    def set_value(self, name, value):
        name = check_name(name)
        jv, blob = _encode_value(value)
        return self._st.set(CONTROLLER, name, jv, blob)

    def get_value(self, name):
        r = _Now()
        self._st.get(check_name(name), r)
        return _decode(r.result, r.blob)

    def delete_var(self, name):
        return self._st.delete(CONTROLLER, check_name(name))

    def wait_for_value(self, name, timeout=None):
        name = check_name(name)
        timeout = check_timeout(timeout)
        v = self._st.vars.get(name)
        if v is not None and not v.ever_set and timeout != 0:
            raise WouldBlockError("wait_for_value on a variable never set would block the controller's loop")
        r = _Now()
        self._st.wait(name, 0, r)
        return _decode(r.result, r.blob)

    async def wait_for_value_async(self, name, timeout=None):
        return self.wait_for_value(name, timeout)
