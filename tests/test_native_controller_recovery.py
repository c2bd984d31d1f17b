"""The controller as the native core's supervisor: a container stopped inside an
internal guard never blocks the controller's loop; the recovery of another dead
container that needs that guard is retried until it finishes, exactly."""

import os
import signal
import time

import pytest

import netplex_native as netplex
from netplex_native.native import domain as _native
from netplex_native import admin, cenv, semaphore

from harness import plugins_for, run_controller, wait_until


class Roles(netplex.ProcessorHooks):
    """The first container takes one protected unit of m and stays; the second
    stops (SIGSTOP) inside m's guard in the middle of an increment; the others
    only announce themselves."""

    def __init__(self, events):
        self.events = events

    def post_add_hook(self, service, ctrl):
        for p in plugins_for("native"):
            ctrl.add_plugin(p)

    def post_start_hook(self, cont):
        semaphore.create("m", 3, protected=True)
        semaphore.create("role", 2)
        role = semaphore.decrement("role")
        self.events.emit("started", cid=cont.id, cpid=os.getpid(), role=role)
        if role == 1:
            assert semaphore.decrement("m") == 2
            self.events.emit("took", cpid=os.getpid())
        elif role == 0:
            # stop only once the first has taken its unit (else, on a loaded
            # machine, its non-blocking decrement meets the stopped guard)
            end = time.monotonic() + 10
            while semaphore.get("m") != 2 and time.monotonic() < end:
                time.sleep(0.001)
            assert _native._lib.np_test_crash_signal(signal.SIGSTOP) == 0
            assert _native._lib.np_test_crash_after(1) == 0
            semaphore.increment("m")                # stops holding m's guard
            semaphore.decrement("m")
            self.events.emit("resumed", cpid=os.getpid())


def _state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.timeout(60)
def test_a_container_stopped_inside_a_guard_does_not_block_the_controller(events, socket_dir,
                                                                         monkeypatch):
    monkeypatch.setenv("NETPLEX_CORE_TEST", "1")       # inherited by the containers

    def build():
        ctrl = netplex.Controller(socket_dir=socket_dir)
        ctrl.add_service(netplex.Service("w", hooks=Roles(events), workers=2))
        return ctrl

    with run_controller(build):
        staker = events.wait("took", timeout=20)[0]["cpid"]
        stopper = next(e["cpid"] for e in events.wait("started", count=2, timeout=20)
                       if e["role"] == 0)
        assert wait_until(lambda: _state(stopper) == "T", 10), "the stopper did not stop"
        os.kill(staker, signal.SIGKILL)
        # the loop keeps serving: a replacement is started and admin answers at once
        replacement = events.wait("started", role=-1, timeout=10)[0]
        assert replacement["cpid"] not in (staker, stopper)
        t0 = time.monotonic()
        listing = admin.request(socket_dir, {"cmd": "list"}, timeout=5)
        assert listing["ok"] and time.monotonic() - t0 < 2

        def m():
            sems = admin.request(socket_dir, {"cmd": "inspect"})["plugins"]["native"]["semaphores"]
            return next(s for s in sems if s["name"] == "m")
        time.sleep(0.3)
        assert m()["value"] == 2 and staker in [int(p) for p in m()["holders"]]  # not yet
        os.kill(stopper, signal.SIGCONT)
        events.wait("resumed", timeout=10)
        assert wait_until(lambda: m()["value"] == 3 and not m()["holders"], 10), m()
