"""Bad input: a table of wrong calls, run inside a real container on both
backends.  Each raises its documented exception with a message naming the
problem, and nothing changed afterwards (values from inside the container,
and the whole ``inspect`` output of the admin socket, before and after).

Also: wrong plugins, full native tables, calls outside any container (in a
fresh interpreter) and a primitive whose plugin was never added.
"""

import importlib.util
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest

import netplex_native as netplex
from netplex_native import admin, cenv, mutex, semaphore, sharedvar
from netplex_native.errors import (PluginNotAddedError, SharedVarPermissionError,
                                   SharedVarTypeError, TableFullError, VALUE_MAX)
from harness import run_controller, plugins_for

LONG_ASCII = "a" * 256                    # 256 bytes
LONG_MULTI = "é" * 128                    # 128 characters, 256 bytes
OK_MULTI = "é" * 127 + "a"                # 255 bytes: the longest valid name
NAN = float("nan")


def _cases():
    """(label, call, exception class, regex on the message)."""
    m = mutex.access("base.m")
    T, V = TypeError, ValueError
    return [
        ("sem name int", lambda: semaphore.create(123), T, r"name must be a str, not int"),
        ("sem name bytes", lambda: semaphore.get(b"base.s"), T, r"name must be a str, not bytes"),
        ("sem name None", lambda: semaphore.increment(None), T, r"name must be a str, not NoneType"),
        ("sem name empty", lambda: semaphore.create(""), V, r"name must not be empty"),
        ("sem name 256 ascii", lambda: semaphore.create(LONG_ASCII, 1), V, r"256 bytes in UTF-8; at most 255"),
        ("sem name 256 multibyte", lambda: semaphore.create(LONG_MULTI, 1), V, r"256 bytes in UTF-8; at most 255"),
        ("sem name NUL", lambda: semaphore.create("fresh\x00s", 1), V, r"must not contain NUL"),
        ("sem name surrogate", lambda: semaphore.create("fresh\udc00", 1), V, r"not encodable as UTF-8"),
        ("initial negative", lambda: semaphore.create("fresh.s1", -1), V, r"initial must be between 0 and"),
        ("initial 2**63", lambda: semaphore.create("fresh.s2", 2**63), V, r"initial must be between 0 and 9223372036854775807"),
        ("initial bool", lambda: semaphore.create("fresh.s3", True), T, r"initial must be an int, not bool"),
        ("initial float", lambda: semaphore.create("fresh.s4", 1.0), T, r"initial must be an int, not float"),
        ("initial str", lambda: semaphore.create("fresh.s5", "1"), T, r"initial must be an int, not str"),
        ("protected int", lambda: semaphore.create("fresh.s6", 1, protected=1), T, r"protected must be a bool, not int"),
        ("wait int", lambda: semaphore.decrement("base.s", wait=1), T, r"wait must be a bool, not int"),
        ("wait str on fresh", lambda: semaphore.decrement("fresh.s7", wait="yes"), T, r"wait must be a bool"),
        ("timeout negative", lambda: semaphore.decrement("base.s", wait=True, timeout=-1), V, r"timeout must be >= 0"),
        ("timeout nan", lambda: semaphore.decrement("base.s", wait=True, timeout=NAN), V, r"timeout must be >= 0"),
        ("timeout str", lambda: semaphore.decrement("base.s", wait=True, timeout="1"), T, r"timeout must be None or a number"),
        ("timeout bool", lambda: semaphore.decrement("base.s", wait=True, timeout=True), T, r"timeout must be None or a number"),
        ("increment at max", lambda: semaphore.increment("base.max"), OverflowError, r"9223372036854775807"),
        ("sem on a mutex name", lambda: semaphore.create("base.m", 1), V, r"base\.m.*mutex"),
        ("destroy empty", lambda: semaphore.destroy(""), V, r"name must not be empty"),
        ("mutex name int", lambda: mutex.access(5), T, r"name must be a str, not int"),
        ("mutex name 256 multibyte", lambda: mutex.access(LONG_MULTI), V, r"256 bytes in UTF-8"),
        ("mutex name NUL", lambda: mutex.access("m\x00"), V, r"must not contain NUL"),
        ("lock timeout negative (cached, free)", lambda: m.lock(timeout=-0.5), V, r"timeout must be >= 0"),
        ("lock timeout str (cached, free)", lambda: m.lock(timeout="soon"), T, r"timeout must be None or a number"),
        ("lock timeout nan (fresh)", lambda: mutex.access("fresh.m").lock(timeout=NAN), V, r"timeout must be >= 0"),
        ("mutex on a semaphore name", lambda: mutex.access("base.s").lock(timeout=0), V, r"base\.s.*semaphore"),
        ("var name int", lambda: sharedvar.create_var(7), T, r"name must be a str, not int"),
        ("var own str", lambda: sharedvar.create_var("fresh.v", own="yes"), T, r"own must be a bool, not str"),
        ("var timeout negative", lambda: sharedvar.create_var("fresh.v", timeout=-3), V, r"timeout must be >= 0"),
        ("var timeout zero", lambda: sharedvar.create_var("fresh.v", timeout=0), V, r"timeout must be > 0"),
        ("var plain set int", lambda: sharedvar.set_value("base.v", 5), SharedVarTypeError, r"\bstr\b"),
        ("var plain set bytes", lambda: sharedvar.set_value("base.v", b"x"), SharedVarTypeError, r"\bstr\b"),
        ("var enc set unpicklable", lambda: sharedvar.set_value("base.e", lambda: 0), SharedVarTypeError, r"cannot be pickled"),
        ("var ro set by another service", lambda: sharedvar.set_value("owner.ro", "x"), SharedVarPermissionError, r"owner\.ro"),
        ("var wait timeout str", lambda: sharedvar.wait_for_value("base.v", timeout="x"), T, r"timeout must be None or a number"),
        ("timer not callable", lambda: cenv.create_timer(5, 1), T, r"callback must be callable, not int"),
        ("timer interval 0", lambda: cenv.create_timer(lambda t: False, 0), V, r"interval must be a finite number of seconds > 0"),
        ("timer interval inf", lambda: cenv.create_timer(lambda t: False, math.inf), V, r"interval must be a finite"),
        ("timer interval bool", lambda: cenv.create_timer(lambda t: False, True), T, r"interval must be a number"),
        ("message pattern int", lambda: cenv.send_message(5, "n", []), T, r"pattern must be a non-empty str"),
        ("message args str", lambda: cenv.send_message("*", "n", "abc"), T, r"args must be a list or tuple of str"),
        ("message args[0] int", lambda: cenv.send_message("*", "n", [1]), T, r"args\[0\] must be a str, not int"),
        ("cancel_timer not a timer", lambda: cenv.cancel_timer("t"), T, r"cancel_timer takes a Timer"),
    ]


class _Owner(netplex.ProcessorHooks):
    def __init__(self, events, backend):
        self.events = events
        self.backend = backend

    def post_add_hook(self, service, ctrl):
        for p in plugins_for(self.backend):
            ctrl.add_plugin(p)
        ctrl.add_plugin(sharedvar.plugin)

    def post_start_hook(self, cont):
        sharedvar.create_var("owner.ro", ro=True)
        sharedvar.set_value("owner.ro", "orig")
        self.events.emit("owner_ready")


class _Bad(netplex.ProcessorHooks):
    def __init__(self, events):
        self.events = events

    def post_start_hook(self, cont):
        semaphore.create("base.s", 3)
        semaphore.create("base.p", 2, protected=True)
        semaphore.decrement("base.p")                      # held once by us
        semaphore.create("base.max", VALUE_MAX)
        semaphore.create(OK_MULTI, 1)                      # 255 bytes: valid
        m = mutex.access("base.m")
        assert m.lock(timeout=0)                           # cache the handle, leave it free
        m.unlock()
        mutex.access("base.held").lock()                   # held by us all along
        sharedvar.create_var("base.v")
        sharedvar.set_value("base.v", "hello")
        sharedvar.create_var("base.e", enc=True)
        sharedvar.set_value("base.e", {"a": [1, 2]})
        self.events.emit("bad_ready", state=self.state())

    def state(self):
        return {"s": semaphore.get("base.s"), "p": semaphore.get("base.p"), "max": semaphore.get("base.max"),
                "multi": semaphore.get(OK_MULTI),
                "m_free": _try_free("base.m"),
                "v": sharedvar.get_value("base.v"), "e": sharedvar.get_value("base.e"),
                "ro": sharedvar.get_value("owner.ro"), "timers": len(cenv.timers())}

    def receive_admin_message(self, cont, name, args):
        if name != "run":
            return
        # the baseline once both containers are up (the owner's post_start_hook
        # runs concurrently with ours, so the state at bad_ready may predate it)
        self.events.emit("before", state=self.state())
        for label, call, cls, rx in _cases():
            try:
                r = call()
            except Exception as e:
                ok = isinstance(e, cls) and re.search(rx, str(e)) is not None
                self.events.emit("case", label=label, ok=ok, got=type(e).__name__, msg=str(e)[:400])
            else:
                self.events.emit("case", label=label, ok=False, got="no exception", msg=repr(r)[:200])
        self.events.emit("after", state=self.state())


def _try_free(name):
    m = mutex.access(name)
    if m.lock(timeout=0):
        m.unlock()
        return True
    return False


def _normalised_inspect(sdir):
    r = admin.request(sdir, {"cmd": "inspect"})
    assert r["ok"], r
    out = {}
    for pname, data in r["plugins"].items():
        out[pname] = {
            "semaphores": sorted((s["name"], s["value"], s["protected"], s["waiters"],
                                  tuple(sorted((str(k), v) for k, v in (s.get("holders") or {}).items() if v)))
                                 for s in data.get("semaphores", [])),
            "mutexes": sorted((m["name"], m["locked"], m["waiters"]) for m in data.get("mutexes", [])),
            "sharedvars": sorted(tuple(sorted((k, str(v)) for k, v in d.items())) for d in data.get("sharedvars", [])),
        }
    return out


@pytest.mark.timeout(60)
def test_bad_calls_in_a_container(events, backend, tmp_path):
    sdir = str(tmp_path / "sock")

    def build():
        ctrl = netplex.Controller(socket_dir=sdir)
        ctrl.add_service(netplex.Service("owner", hooks=_Owner(events, backend), workers=1))
        ctrl.add_service(netplex.Service("bad", hooks=_Bad(events), workers=1))
        return ctrl

    with run_controller(build) as proc:
        events.wait("owner_ready", timeout=15)
        before = events.wait("bad_ready", timeout=15)[0]["state"]
        assert before["multi"] == 1 and before["p"] == 1 and before["m_free"] is True
        insp_before = _normalised_inspect(sdir)
        assert admin.request(sdir, {"cmd": "message", "pattern": "bad", "name": "run", "args": []})["delivered"] == 1
        after = events.wait("after", timeout=30)[0]["state"]
        before = events.all("before")[0]["state"]
        cases = events.all("case")
        n = len(_cases())
        assert len(cases) == n >= 20
        bad = [f"{c['label']}: {c['got']}: {c['msg']}" for c in cases if not c["ok"]]
        assert not bad, f"{len(bad)}/{n} wrong:\n" + "\n".join(bad)
        assert after == before, f"state changed: {before} -> {after}"
        insp_after = _normalised_inspect(sdir)
        assert insp_after == insp_before, f"inspect changed:\n{insp_before}\n{insp_after}"
        assert "fresh" not in repr(insp_after), "a failed call created an object"
        assert proc.alive()
        assert proc.stop() == 0


# ---------------------------------------------------------------- controller-side errors

def test_add_plugin_wrong_object():
    ctrl = netplex.Controller()
    with pytest.raises(TypeError, match=r"add_plugin takes a plugin .* not object"):
        ctrl.add_plugin(object())
    with pytest.raises(TypeError, match=r"add_plugin takes a plugin .* not str"):
        ctrl.add_plugin("semaphore.plugin")
    assert ctrl.plugins() == []
    with pytest.raises(TypeError, match=r"add_service takes a Service, not str"):
        ctrl.add_service("echo")
    assert ctrl.services == []


@pytest.mark.parametrize("first,second", [("plugin", "native_plugin"), ("native_plugin", "plugin")])
def test_both_semaphore_backends_is_a_value_error(first, second):
    ctrl = netplex.Controller()
    try:
        ctrl.add_plugin(getattr(semaphore, first))
        ctrl.add_plugin(getattr(semaphore, first))             # twice: a no-op
        before = ctrl.plugins()
        with pytest.raises(ValueError, match=r"both provide semaphore; add only one"):
            ctrl.add_plugin(getattr(semaphore, second))
        assert ctrl.plugins() == before
        with pytest.raises(ValueError, match=r"both provide mutex"):
            ctrl.add_plugin(mutex.plugin if "native" in first else mutex.native_plugin)
            ctrl.add_plugin(mutex.native_plugin if "native" in first else mutex.plugin)
    finally:
        ctrl._unplug_all()                                       # removes a created segment


def test_bad_native_config():
    # refused when the Controller is made (not later, when a plugin creates the segment)
    with pytest.raises(ValueError, match=r"native_config\['semaphores'\] must be an integer between 0 and"):
        netplex.Controller(native_config={"semaphores": -1})
    with pytest.raises(TypeError, match=r"native_config\['semaphores'\] must be an integer .*, got True"):
        netplex.Controller(native_config={"semaphores": True})


class _Full(netplex.ProcessorHooks):
    def __init__(self, events):
        self.events = events

    def post_add_hook(self, service, ctrl):
        ctrl.add_plugin(semaphore.native_plugin)
        ctrl.add_plugin(mutex.native_plugin)

    def post_start_hook(self, cont):
        out = {}
        for i in range(4):
            semaphore.create(f"full.{i}", i + 1)
        for i in range(2):
            assert mutex.access(f"fm.{i}").lock(timeout=0)
        for label, call in [("create", lambda: semaphore.create("full.4", 1)),
                            ("implicit", lambda: semaphore.increment("full.5")),
                            ("mutex", lambda: mutex.access("fm.2").lock(timeout=0))]:
            try:
                call()
                out[label] = "no exception"
            except TableFullError as e:
                out[label] = str(e)
            except Exception as e:
                out[label] = f"{type(e).__name__}: {e}"
        out["values"] = [semaphore.get(f"full.{i}") for i in range(4)]
        out["mutexes_held"] = [not _try_free(f"fm.{i}") for i in range(2)]
        out["again"] = semaphore.create("full.0", 9)            # existing: still works, False
        self.events.emit("full", **out)


@pytest.mark.timeout(60)
def test_full_native_tables(events, tmp_path):
    sdir = str(tmp_path / "sock")

    def build():
        ctrl = netplex.Controller(socket_dir=sdir, native_config={"semaphores": 4, "mutexes": 2})
        ctrl.add_service(netplex.Service("full", hooks=_Full(events), workers=1))
        return ctrl

    with run_controller(build) as proc:
        e = events.wait("full", timeout=15)[0]
        assert re.search(r"semaphore table .* is full \(4 semaphores\); nothing was changed", e["create"]), e
        assert re.search(r"semaphore table .* is full", e["implicit"]), e
        assert re.search(r"mutex table .* is full \(2 mutexes\)", e["mutex"]), e
        assert e["values"] == [1, 2, 3, 4] and e["mutexes_held"] == [True, True] and e["again"] is False
        insp = _normalised_inspect(sdir)["native"]
        assert [s[:2] for s in insp["semaphores"]] == [(f"full.{i}", i + 1) for i in range(4)]
        assert [m[:2] for m in insp["mutexes"]] == [("fm.0", True), ("fm.1", True)]
        assert proc.stop() == 0


# ---------------------------------------------------------------- outside any container

def test_calls_outside_a_container_fresh_interpreter():
    code = textwrap.dedent(r"""
        import json, re
        from netplex_native import semaphore, mutex, sharedvar, cenv
        from netplex_native.errors import NotInContainerError
        out = {}
        for label, call in [("sem.create", lambda: semaphore.create("x", 1)),
                            ("sem.get", lambda: semaphore.get("x")),
                            ("mutex.lock", lambda: mutex.access("m").lock()),
                            ("var.get", lambda: sharedvar.get_value("v")),
                            ("cenv.create_timer", lambda: cenv.create_timer(lambda t: False, 1)),
                            ("cenv.self_cont", lambda: cenv.self_cont())]:
            try:
                call(); out[label] = "no exception"
            except NotInContainerError as e:
                out[label] = "NotInContainerError: " + str(e)
            except Exception as e:
                out[label] = type(e).__name__ + ": " + str(e)
        print(json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    import json
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for label, msg in out.items():
        assert msg.startswith("NotInContainerError: "), (label, msg)
        assert re.search(r"outside any controller or container|must be called in a container", msg), (label, msg)


@pytest.mark.skipif(importlib.util.find_spec("netplex_native._fast") is None,
                    reason="the reply poll is the accelerator's")
@pytest.mark.parametrize("value, cap, warned", [("abc", 50_000, True), ("-1", 50_000, True),
                                                ("2000000", 50_000, True), ("", 50_000, True),
                                                ("+5", 50_000, True), (" 20 ", 50_000, True),
                                                ("1_000", 50_000, True), ("-0", 50_000, True),
                                                ("\u0663", 50_000, True), ("0" * 30 + "1", 50_000, True),
                                                ("0", 0, False), ("30", 30_000, False),
                                                ("1000000", 1_000_000_000, False)])
def test_a_bad_reply_poll_setting_is_reported_and_the_default_kept(value, cap, warned):
    """NETPLEX_REPLY_POLL_US (C5 of csrc/fast/container_channel.c): microseconds
    in 0..1,000,000; anything else is logged by name and changes nothing."""
    code = ("import netplex_native.channel as c; c.configure_reply_poll(); "
            "from netplex_native._fast import reply_poll; print(reply_poll())")
    env = dict(os.environ, NETPLEX_REPLY_POLL_US=value)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) == cap, (r.stdout, r.stderr)
    assert ("NETPLEX_REPLY_POLL_US" in r.stderr) is warned, r.stderr


@pytest.mark.skipif(importlib.util.find_spec("netplex_native._fast") is None,
                    reason="the reply poll is the accelerator's")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("value, cap", [("abc", 50_000), ("0", 0), ("30", 30_000)])
def test_each_container_reads_the_reply_poll_setting_as_it_starts(events, monkeypatch, value, cap):
    """Set after the library was imported (as a pre_start_hook or an app module
    imported by `run` would): the container, not the import, reads it (the
    warning a bad value gets is checked above)."""
    from test_semantics import cluster
    monkeypatch.setenv("NETPLEX_REPLY_POLL_US", value)
    with cluster(events, "rpc", ["a"]) as c:
        got = c["a"].call("__import__('netplex_native._fast', fromlist=['_']).reply_poll()")
    assert got == cap


class _NoPlugin(netplex.ProcessorHooks):
    def __init__(self, events):
        self.events = events

    def post_start_hook(self, cont):
        out = {}
        for label, call in [("sem", lambda: semaphore.get("x")), ("mutex", lambda: mutex.access("m").lock()),
                            ("var", lambda: sharedvar.get_value("v"))]:
            try:
                call()
                out[label] = "no exception"
            except PluginNotAddedError as e:
                out[label] = str(e)
            except Exception as e:
                out[label] = f"{type(e).__name__}: {e}"
        self.events.emit("noplugin", **out)


@pytest.mark.timeout(60)
def test_primitive_without_its_plugin(events):
    def build():
        ctrl = netplex.Controller()
        ctrl.add_service(netplex.Service("np", hooks=_NoPlugin(events), workers=1))
        return ctrl

    with run_controller(build) as proc:
        e = events.wait("noplugin", timeout=15)[0]
        assert "semaphore.plugin or semaphore.native_plugin" in e["sem"], e
        assert "mutex.plugin or mutex.native_plugin" in e["mutex"], e
        assert "sharedvar.plugin" in e["var"], e
        assert proc.stop() == 0
