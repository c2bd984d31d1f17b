"""Hooks (each at its point, in the right process), global_exception_handler,
timers, broadcast messages and their patterns, synchronous calls racing with
messages, and the errors for calls made in the wrong place.

Real controllers in forked processes; events over a pipe; real SIGKILL.
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

import netplex_native as netplex
from netplex_native import admin, cenv, semaphore, mutex, sharedvar
from harness import exchange, run_controller, free_port, pid_alive, wait_until


# ---------------------------------------------------------------- helpers

class Recorder(netplex.ProcessorHooks):
    """Emits one event per hook, with the process (``pid``) it ran in."""

    def __init__(self, events, plugins=()):
        self.events = events
        self.plugins = plugins

    def post_add_hook(self, service, ctrl):
        for p in self.plugins:
            ctrl.add_plugin(p)
        self.events.emit("post_add", service=service.name)

    def pre_start_hook(self, service, ctrl, container_id):
        self.events.emit("pre_start", service=service.name, cid=container_id)

    def post_start_hook(self, cont):
        self.events.emit("started", service=cont.service_name, cid=cont.id, cpid=cont.pid)

    def pre_finish_hook(self, cont):
        self.events.emit("pre_finish", service=cont.service_name, cid=cont.id)

    def post_finish_hook(self, service, ctrl, container_id):
        self.events.emit("post_finish", service=service.name, cid=container_id)

    def post_rm_hook(self, service, ctrl):
        self.events.emit("post_rm", service=service.name)

    def receive_message(self, cont, name, args):
        self.events.emit("message", cid=cont.id, name=name, args=args)

    def receive_admin_message(self, cont, name, args):
        self.events.emit("admin_message", cid=cont.id, name=name, args=args)

    def system_shutdown(self):
        self.events.emit("system_shutdown", cid=cenv.self_cont().id)

    def shutdown(self):
        self.events.emit("shutdown", cid=cenv.self_cont().id)


def _idx(events, kind, **match):
    return [i for i, e in enumerate(events.seen) if e["kind"] == kind
            and all(e.get(k) == v for k, v in match.items())]


def _admin(socket_dir, **req):
    assert wait_until(lambda: os.path.exists(os.path.join(socket_dir, "admin.sock")), 10)
    r = admin.request(socket_dir, req, timeout=5)
    assert r.get("ok") is True, r
    return r


# ---------------------------------------------------------------- hooks

@pytest.mark.timeout(40)
def test_every_hook_runs_at_its_point_and_in_the_right_process(events, socket_dir):
    def build():
        ctrl = netplex.Controller(socket_dir)
        ctrl.add_service(netplex.Service("svc", hooks=Recorder(events), workers=2))
        return ctrl

    with run_controller(build) as proc:
        cpid = proc.pid
        started = events.wait("started", count=2, timeout=10)
        [add] = events.all("post_add")
        assert add["pid"] == cpid and add["service"] == "svc"
        # pre_start_hook: controller, before the fork, with the id the container gets
        for s in started:
            assert s["pid"] == s["cpid"] != cpid, "post_start_hook must run in the container"
            [ps] = _idx(events, "pre_start", cid=s["cid"])
            assert events.seen[ps]["pid"] == cpid
            assert ps < _idx(events, "started", cid=s["cid"])[0]
        assert {s["cid"] for s in started} == {"svc.1", "svc.2"}
        pids = {s["cid"]: s["cpid"] for s in started}

        _admin(socket_dir, cmd="message", pattern="svc", name="adm", args=["1"])
        got = events.wait("admin_message", count=2, timeout=5)
        assert {(e["cid"], e["pid"]) for e in got} == set(pids.items())
        assert events.all("message") == []

        # SIGKILL: post_finish_hook in the controller, no pre_finish_hook anywhere
        os.kill(pids["svc.1"], signal.SIGKILL)
        [pf] = events.wait("post_finish", timeout=5)
        assert pf["cid"] == "svc.1" and pf["pid"] == cpid
        events.wait("started", count=3, timeout=5)
        assert events.all("pre_start", cid="svc.3")[0]["pid"] == cpid
        assert events.all("pre_finish") == [], "pre_finish_hook ran after a SIGKILL"

        # a regular end (admin restart): pre_finish in the container, then post_finish
        _admin(socket_dir, cmd="restart", service="svc")
        events.wait("post_finish", count=3, timeout=10)
        for cid in ("svc.2", "svc.3"):
            [pre] = _idx(events, "pre_finish", cid=cid)
            [post] = _idx(events, "post_finish", cid=cid)
            assert pre < post
            assert events.seen[pre]["pid"] == events.all("started", cid=cid)[0]["cpid"]
            assert events.seen[post]["pid"] == cpid
        live = {e["cid"]: e["cpid"] for e in events.wait("started", count=5, timeout=10)[3:]}

        assert proc.stop() == 0
    events.poll(0.1)
    for cid, pid in live.items():
        assert [e["pid"] for e in events.all("system_shutdown", cid=cid)] == [pid]
        assert [e["pid"] for e in events.all("shutdown", cid=cid)] == [pid]
        assert [e["pid"] for e in events.all("pre_finish", cid=cid)] == [pid]
        assert [e["pid"] for e in events.all("post_finish", cid=cid)] == [cpid]
    assert [(e["service"], e["pid"]) for e in events.all("post_rm")] == [("svc", cpid)]
    final_shutdowns = [i for cid in live for i in _idx(events, "shutdown", cid=cid)]
    assert max(_idx(events, "system_shutdown")) < min(final_shutdowns)
    assert _idx(events, "post_rm")[0] > max(_idx(events, "post_finish"))


class ExcHooks(Recorder):
    """Exceptions whose message ends in "-end" end the container; others keep it."""

    def post_start_hook(self, cont):
        super().post_start_hook(cont)
        which = {"exc.1": "timer-keep", "exc.3": "timer-end"}.get(cont.id)
        if which:
            def boom(timer):
                self.events.emit("timer_fire", cid=cont.id)
                raise RuntimeError(which)
            cenv.create_timer(boom, 0.05)

    def receive_admin_message(self, cont, name, args):
        raise RuntimeError(name)

    def global_exception_handler(self, exc):
        self.events.emit("geh", cid=cenv.self_cont().id, msg=str(exc), type=type(exc).__name__)
        return not str(exc).endswith("-end")


@pytest.mark.timeout(40)
def test_global_exception_handler_sees_hook_timer_and_handler_errors_and_decides(events, socket_dir):
    port = free_port()

    async def handler(reader, writer):
        line = (await reader.readline()).decode().strip()
        raise ValueError(line)

    def build():
        ctrl = netplex.Controller(socket_dir)
        ctrl.add_service(netplex.Service("exc", handler, hooks=ExcHooks(events),
                                         address=f"tcp://127.0.0.1:{port}"))
        return ctrl

    with run_controller(build) as proc:
        first = events.wait("started", timeout=10)[0]
        # a timer: True keeps the container, the timer itself stops
        g = events.wait("geh", timeout=5)[0]
        assert (g["msg"], g["type"], g["pid"]) == ("timer-keep", "RuntimeError", first["cpid"])
        events.poll(0.4)
        assert len(events.all("timer_fire", cid="exc.1")) == 1, "a timer that raised fired again"
        # a hook
        _admin(socket_dir, cmd="message", pattern="exc", name="hook-keep", args=[])
        assert events.wait("geh", count=2, timeout=5)[1]["msg"] == "hook-keep"
        # a handler
        exchange(port, b"handler-keep\n", until_eof=True)
        assert events.wait("geh", count=3, timeout=5)[2]["msg"] == "handler-keep"
        events.poll(0.3)
        assert pid_alive(first["cpid"]) and len(events.all("started")) == 1
        assert events.all("pre_finish") == []

        # False ends the container (regularly: pre_finish_hook runs) and it is restarted
        exchange(port, b"handler-end\n", until_eof=True)
        events.wait("pre_finish", cid="exc.1", timeout=5)
        events.wait("post_finish", cid="exc.1", timeout=5)
        events.wait("started", cid="exc.2", timeout=5)
        _admin(socket_dir, cmd="message", pattern="exc", name="hook-end", args=[])
        events.wait("post_finish", cid="exc.2", timeout=5)
        events.wait("started", cid="exc.3", timeout=5)   # exc.3 runs a "timer-end" timer
        events.wait("post_finish", cid="exc.3", timeout=5)
        four = events.wait("started", cid="exc.4", timeout=5)[0]
        assert [e["cid"] for e in events.all("pre_finish")] == ["exc.1", "exc.2", "exc.3"]
        assert [e["msg"] for e in events.all("geh")] == [
            "timer-keep", "hook-keep", "handler-keep", "handler-end", "hook-end", "timer-end"]
        assert wait_until(lambda: not pid_alive(first["cpid"]), 5)
        events.poll(0.3)
        assert pid_alive(four["cpid"]) and len(events.all("started")) == 4
        assert proc.stop() == 0


# ---------------------------------------------------------------- timers

class TimerHooks(Recorder):
    def post_start_hook(self, cont):
        super().post_start_hook(cont)
        ev = self.events
        if cont.id == "t.1":
            self._main_timers(ev)
        else:
            self._bad_intervals(ev)
            self.ts = [cenv.create_timer(self._tick(ev, f"all{i}"), 0.02) for i in range(3)]
            ev.emit("ids", ids=[t.id for t in self.ts], n=len(cenv.timers()))

    @staticmethod
    def _tick(ev, name):
        def cb(timer):
            ev.emit("fire", name=name)
            return True
        return cb

    def _main_timers(self, ev):
        counts = {}

        def counted(name, stop_after, raise_at=None):
            def cb(timer):
                counts[name] = counts.get(name, 0) + 1
                ev.emit("fire", name=name, n=counts[name])
                if raise_at is not None and counts[name] == raise_at:
                    raise RuntimeError(f"{name} raises")
                return counts[name] < stop_after
            return cb

        cenv.create_timer(counted("three", 3), 0.02)
        cenv.create_timer(counted("raise", 100, raise_at=2), 0.02)
        cenv.create_timer(lambda t: ev.emit("fire", name="none") or None, 0.02)  # None: not True

        async def acb(timer):
            await asyncio.sleep(0.01)
            counts["async"] = counts.get("async", 0) + 1
            ev.emit("fire", name="async", n=counts["async"])
            return counts["async"] < 3
        cenv.create_timer(acb, 0.02)

        victim = cenv.create_timer(self._tick(ev, "victim"), 0.02)

        def canceller(timer):
            cenv.cancel_timer(victim)
            ev.emit("cancelled", active=victim.active)
            return False
        cenv.create_timer(canceller, 0.25)
        cenv.create_timer(self._tick(ev, "forever"), 0.02)

    def _bad_intervals(self, ev):
        out = {}
        for label, iv in (("0", 0), ("-1", -1), ("x", "x"), ("True", True), ("nan", float("nan")),
                          ("inf", float("inf")), ("None", None)):
            try:
                cenv.create_timer(lambda t: False, iv)
                out[label] = "created"
            except Exception as e:
                out[label] = type(e).__name__
        try:
            cenv.create_timer("not callable", 1.0)
            out["callback"] = "created"
        except Exception as e:
            out["callback"] = type(e).__name__
        ev.emit("bad_intervals", out=out, left=len(cenv.timers()))

    def receive_admin_message(self, cont, name, args):
        if name == "cancel_all" and cont.id == "t.2":
            cenv.cancel_all_timers()
            self.events.emit("all_cancelled", cid=cont.id, left=len(cenv.timers()))

    def global_exception_handler(self, exc):
        self.events.emit("geh", msg=str(exc))
        return True


@pytest.mark.timeout(40)
def test_timers_repeat_stop_cancel_and_end_with_the_container(events, socket_dir):
    port = free_port()

    async def hold(reader, writer):  # keeps the container's regular end waiting
        events.emit("holding")
        await reader.read()

    def build():
        ctrl = netplex.Controller(socket_dir)
        ctrl.add_service(netplex.Service("t", hold, hooks=TimerHooks(events),
                                         address=f"tcp://127.0.0.1:{port}", workers=2))
        return ctrl

    with run_controller(build) as proc:
        events.wait("started", count=2, timeout=10)
        events.wait("cancelled", timeout=5)
        events.poll(0.4)

        def names(name):
            return [e for e in events.all("fire", name=name)]
        assert [e["n"] for e in names("three")] == [1, 2, 3], "True re-arms, False stops"
        assert [e["n"] for e in names("raise")] == [1, 2], "an exception stops the timer"
        assert [e["msg"] for e in events.all("geh")] == ["raise raises"]
        assert len(names("none")) == 1, "only True re-arms"
        assert [e["n"] for e in names("async")] == [1, 2, 3], "async callbacks are awaited"
        [c] = _idx(events, "cancelled")
        assert events.seen[c]["active"] is False
        assert names("victim"), "the victim never fired before its cancel"
        assert all(i < c for i in _idx(events, "fire", name="victim")), "fired after cancel_timer"

        [bad] = events.all("bad_intervals")
        assert bad["out"] == {"0": "ValueError", "-1": "ValueError", "x": "TypeError", "True": "TypeError",
                              "nan": "ValueError", "inf": "ValueError", "None": "TypeError",
                              "callback": "TypeError"}
        assert bad["left"] == 0, "a rejected timer was registered"
        [ids] = events.all("ids")
        assert len(set(ids["ids"])) == 3 and ids["n"] == 3

        # cancel_all_timers in t.2
        _admin(socket_dir, cmd="message", pattern="t", name="cancel_all", args=[])
        [ac] = events.wait("all_cancelled", timeout=5)
        assert ac["cid"] == "t.2" and ac["left"] == 0
        events.poll(0.3)
        assert all(i < _idx(events, "all_cancelled")[0]
                   for n in ("all0", "all1", "all2") for i in _idx(events, "fire", name=n))

        # timers stop as soon as the container's regular end begins, even while
        # a handler keeps it alive
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            events.wait("holding", timeout=5)
            _admin(socket_dir, cmd="restart", service="t")
            events.wait("shutdown", count=2, timeout=5)
            [sd] = _idx(events, "shutdown", cid="t.1")
            events.poll(0.5)
            late = [i for i in _idx(events, "fire", name="forever") if i > sd + 0]
            assert len(late) <= 1, "timers kept firing after the container was asked to stop"
        finally:
            s.close()
        events.wait("pre_finish", cid="t.1", timeout=5)
        events.wait("started", count=4, timeout=10)
        assert proc.stop() == 0


# ---------------------------------------------------------------- messages

class MsgHooks(Recorder):
    def receive_admin_message(self, cont, name, args):
        ev = self.events
        if name == "go":
            cenv.send_message("app.*", "star", ["1"])
            cont.send_message("app", "prefix-only", [])
            cenv.self_cont().send_message("*", "all", ["a", "b"])
            cenv.send_message("*.y", "suffix", ())
            cenv.send_message("app.?", "question", [])
            cenv.send_message("other", "self", [])
            ev.emit("sent")
        elif name == "bad":
            out = []
            for call in (lambda: cenv.send_message("*", "n", [1]),
                         lambda: cenv.send_message("*", "n", "abc"),
                         lambda: cenv.send_message("*", 5, []),
                         lambda: cenv.send_message(None, "n", []),
                         lambda: cont.send_message("*", "n", [b"x"]),
                         lambda: cont.send_message("*", "n", {"a": "b"})):
                try:
                    call()
                    out.append("sent")
                except Exception as e:
                    out.append(type(e).__name__)
            ev.emit("bad", out=out)
        else:
            super().receive_admin_message(cont, name, args)


class CtrlSender(Recorder):
    """Its container's death makes the controller broadcast (post_finish_hook
    runs in the controller)."""

    def post_finish_hook(self, service, ctrl, container_id):
        super().post_finish_hook(service, ctrl, container_id)
        n = ctrl.send_message("app.*", "from-ctrl", [container_id])
        try:
            ctrl.send_message("*", "n", [3])
            err = None
        except TypeError:
            err = "TypeError"
        self.events.emit("ctrl_sent", n=n, err=err)


@pytest.mark.timeout(40)
def test_message_patterns_match_whole_service_names(events, socket_dir):
    def build():
        ctrl = netplex.Controller(socket_dir)
        ctrl.add_service(netplex.Service("app.x", hooks=Recorder(events), workers=2))
        ctrl.add_service(netplex.Service("app.y", hooks=Recorder(events)))
        ctrl.add_service(netplex.Service("other", hooks=MsgHooks(events)))
        ctrl.add_service(netplex.Service("trig", hooks=CtrlSender(events)))
        return ctrl

    with run_controller(build) as proc:
        started = events.wait("started", count=5, timeout=10)
        cids = {e["cid"]: e["service"] for e in started}
        app = {c for c, s in cids.items() if s.startswith("app.")}
        assert len(app) == 3
        _admin(socket_dir, cmd="message", pattern="other", name="go", args=[])
        events.wait("sent", timeout=5)
        events.wait("message", count=len(app) + 5 + 1 + 1, timeout=5)
        events.poll(0.3)

        def got(name):
            return sorted(e["cid"] for e in events.all("message", name=name))
        assert got("star") == sorted(app)
        assert got("prefix-only") == [], '"app" must not match "app.x"'
        assert got("all") == sorted(cids), '"*" reaches every container, the sender included'
        assert all(e["args"] == ["a", "b"] for e in events.all("message", name="all"))
        assert got("suffix") == ["app.y.1"]
        assert got("question") == [], "only * is a wildcard"
        assert got("self") == ["other.1"]
        assert all(e["pid"] == next(s["cpid"] for s in started if s["cid"] == e["cid"])
                   for e in events.all("message")), "receive_message must run in the receiving container"

        _admin(socket_dir, cmd="message", pattern="other", name="bad", args=[])
        [bad] = events.wait("bad", timeout=5)
        assert bad["out"] == ["TypeError"] * 6

        # Controller.send_message, from a hook that runs in the controller
        trig = next(s["cpid"] for s in started if s["cid"] == "trig.1")
        os.kill(trig, signal.SIGKILL)
        [cs] = events.wait("ctrl_sent", timeout=5)
        assert cs == {**cs, "n": 3, "err": "TypeError", "pid": proc.pid}
        fc = events.wait("message", name="from-ctrl", count=3, timeout=5)
        assert sorted(e["cid"] for e in fc) == sorted(app) and all(e["args"] == ["trig.1"] for e in fc)

        # admin messages go to receive_admin_message only
        before = len(events.all("message"))
        r = _admin(socket_dir, cmd="message", pattern="app.*", name="adm", args=["z"])
        assert r["delivered"] == 3
        got_adm = events.wait("admin_message", count=3, timeout=5)
        assert sorted(e["cid"] for e in got_adm) == sorted(app)
        events.poll(0.2)
        assert len(events.all("message")) == before
        assert proc.stop() == 0


N_MSGS = 1500
N_CALLS = 4000


class FloodHooks(Recorder):
    def post_start_hook(self, cont):
        super().post_start_hook(cont)
        state = {"i": 0}

        def flood(timer):
            for _ in range(10):
                if state["i"] >= N_MSGS:
                    self.events.emit("flood_done", cid=cont.id)
                    return False
                cenv.send_message("sync", "seq", [cont.id, str(state["i"])])
                state["i"] += 1
            return True
        cenv.create_timer(flood, 0.001)


class SyncHooks(Recorder):
    def post_add_hook(self, service, ctrl):
        ctrl.add_plugin(semaphore.plugin)
        super().post_add_hook(service, ctrl)

    def post_start_hook(self, cont):
        super().post_start_hook(cont)
        self.in_call = False
        self.reentered = 0
        self.last = {}
        self.out_of_order = 0
        self.received = 0
        self.calls = 0
        self.bad_values = 0
        semaphore.create("sync.s", 0)

        def work(timer):
            for _ in range(200):
                self.in_call = True
                v = semaphore.increment("sync.s")
                w = semaphore.decrement("sync.s")
                g = semaphore.get("sync.s")
                self.in_call = False
                if (v, w, g) != (1, 0, 0):
                    self.bad_values += 1
                self.calls += 3
                if self.calls >= N_CALLS:
                    return False
            return True
        cenv.create_timer(work, 0.001)

        def report(timer):
            if self.calls >= N_CALLS and self.received >= 2 * N_MSGS:
                self.events.emit("summary", calls=self.calls, received=self.received,
                                 reentered=self.reentered, out_of_order=self.out_of_order,
                                 bad_values=self.bad_values, last=self.last)
                return False
            return True
        cenv.create_timer(report, 0.05)

    def receive_message(self, cont, name, args):
        if self.in_call:
            self.reentered += 1
        sender, i = args[0], int(args[1])
        if i != self.last.get(sender, -1) + 1:
            self.out_of_order += 1
        self.last[sender] = i
        self.received += 1


@pytest.mark.timeout(60)
def test_sync_calls_from_a_timer_never_deadlock_while_messages_flood_in(events):
    def build():
        ctrl = netplex.Controller()
        ctrl.add_service(netplex.Service("sync", hooks=SyncHooks(events)))
        ctrl.add_service(netplex.Service("flood", hooks=FloodHooks(events), workers=2))
        return ctrl

    with run_controller(build) as proc:
        events.wait("started", count=3, timeout=10)
        [s] = events.wait("summary", timeout=40)
        assert s["calls"] >= N_CALLS and s["bad_values"] == 0
        assert s["received"] == 2 * N_MSGS
        assert s["out_of_order"] == 0 and s["last"] == {"flood.1": N_MSGS - 1, "flood.2": N_MSGS - 1}
        assert s["reentered"] == 0, "receive_message ran inside a synchronous call"
        assert proc.stop() == 0


# ---------------------------------------------------------------- wrong place

@pytest.mark.timeout(30)
def test_calls_outside_any_controller_or_container_raise_not_in_container_error():
    code = textwrap.dedent("""
        import netplex_native as netplex
        from netplex_native import semaphore, mutex, sharedvar, cenv
        calls = {
            "semaphore.get": lambda: semaphore.get("x"),
            "semaphore.increment": lambda: semaphore.increment("x"),
            "mutex.lock": lambda: mutex.access("x").lock(),
            "sharedvar.get_value": lambda: sharedvar.get_value("x"),
            "cenv.self_cont": lambda: cenv.self_cont(),
            "cenv.create_timer": lambda: cenv.create_timer(lambda t: False, 1.0),
            "cenv.cancel_all_timers": lambda: cenv.cancel_all_timers(),
            "cenv.send_message": lambda: cenv.send_message("*", "n", []),
            "cenv.lookup": lambda: cenv.lookup("x"),
            "cenv.system_shutdown": lambda: cenv.system_shutdown(),
            "Container.send_message": lambda: netplex.Container("a.1", 1, "a").send_message("*", "n", []),
        }
        for name, call in calls.items():
            try:
                call()
                print(name, "no error")
            except netplex.NotInContainerError as e:
                assert isinstance(e, netplex.NetplexError)
                print(name, "NotInContainerError")
            except Exception as e:
                print(name, type(e).__name__, e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 11, out.stdout
    bad = [l for l in lines if not l.endswith(" NotInContainerError")]
    assert bad == [], bad


class NoPluginHooks(Recorder):
    def _try_all(self):
        out = {}
        for name, call in (("semaphore", lambda: semaphore.get("np.x")),
                           ("mutex", lambda: mutex.access("np.m").lock()),
                           ("sharedvar", lambda: sharedvar.get_value("np.v"))):
            try:
                call()
                out[name] = ["no error", ""]
            except Exception as e:
                out[name] = [type(e).__name__, str(e)]
        return out

    def post_add_hook(self, service, ctrl):
        super().post_add_hook(service, ctrl)
        self.events.emit("tried", where="controller", out=self._try_all())

    def post_start_hook(self, cont):
        super().post_start_hook(cont)
        self.events.emit("tried", where="container", out=self._try_all())


@pytest.mark.timeout(30)
def test_primitive_without_its_plugin_raises_plugin_not_added_error_naming_it(events):
    def build():
        ctrl = netplex.Controller()
        ctrl.add_service(netplex.Service("np", hooks=NoPluginHooks(events)))
        return ctrl

    with run_controller(build) as proc:
        events.wait("tried", count=2, timeout=10)
        for e in events.all("tried"):
            for kind, (typ, msg) in e["out"].items():
                assert typ == "PluginNotAddedError", (e["where"], kind, typ, msg)
                assert f"{kind}.plugin" in msg and "add_plugin" in msg, msg
        assert issubclass(netplex.PluginNotAddedError, netplex.NetplexError)
        assert proc.stop() == 0
