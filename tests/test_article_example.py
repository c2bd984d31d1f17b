"""The article's example: exactly one container owns a periodic job through
a protected semaphore; when the owner dies, another takes over."""

import os
import signal
import time

import pytest

import netplex_native as netplex
from netplex_native import semaphore, cenv
from harness import run_controller, plugins_for

SEM = "jobs.timer_owner"


class TimerOwnerHooks(netplex.ProcessorHooks):
    def __init__(self, events, backend):
        self.events = events
        self.backend = backend
        self.own = False

    def post_add_hook(self, service, ctrl):
        ctrl.add_plugin(plugins_for(self.backend)[0])

    def acquire(self):
        if not self.own:
            self.own = semaphore.decrement(SEM) == 0
            if self.own:
                self.events.emit("owner")
                cenv.create_timer(self.tick, 0.05)
        return self.own

    def tick(self, timer):
        self.events.emit("tick")
        return True

    def post_start_hook(self, cont):
        semaphore.create(SEM, 1, protected=True)
        if not self.acquire():
            cenv.create_timer(lambda t: not self.acquire(), 0.05)

    def pre_finish_hook(self, cont):
        if self.own:
            semaphore.increment(SEM)
            self.own = False


@pytest.mark.timeout(60)
def test_one_owner_and_takeover_within_2s_after_sigkill(events, backend):
    def build():
        ctrl = netplex.Controller()
        ctrl.add_service(netplex.Service("jobs", hooks=TimerOwnerHooks(events, backend), workers=4))
        return ctrl

    with run_controller(build) as proc:
        takeovers = []
        for round_ in range(3):
            owner = events.wait("owner", count=round_ + 1, timeout=10)[-1]["pid"]
            events.poll(0.4)  # let it tick; nobody else may tick meanwhile
            tickers = {e["pid"] for e in events.all("tick") if e["t"] > owner_t(events, owner)}
            assert tickers == {owner}, f"two containers ran the timer: {tickers}"
            t_kill = time.monotonic()
            os.kill(owner, signal.SIGKILL)
            new = events.wait("owner", count=round_ + 2, timeout=5)[-1]
            assert new["pid"] != owner
            takeovers.append(new["t"] - t_kill)
            assert new["t"] - t_kill < 2.0, f"takeover took {new['t'] - t_kill:.3f}s"
        # never two at once: each owner's ticks end before the next owner's begin
        owners = [e["pid"] for e in events.all("owner")]
        for a, b in zip(owners, owners[1:]):
            last_a = max(e["t"] for e in events.all("tick", pid=a))
            first_b = min((e["t"] for e in events.all("tick", pid=b)), default=float("inf"))
            assert last_a < first_b, "ticks of two owners overlap"
        assert proc.stop() == 0


def owner_t(events, pid):
    return events.all("owner", pid=pid)[-1]["t"]
