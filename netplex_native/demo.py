"""``netplex-native demo``: crash-safe coordination, live.

Two services under one controller:

- ``demo`` (N containers, TCP on localhost): a line protocol
  (``PING``, ``WHO``, ``JOBS``, ``OWNER``, ``HELP``, ``QUIT``) answered with
  the serving container's id.  Exactly one container owns the periodic job
  through the protected semaphore ``demo.job`` (value 1 = free).  The others
  wait on it (``decrement_async(wait=True)``): when the owner dies, even by
  SIGKILL, its count is given back at once and one waiter takes over.
- ``monitor`` (1 container, no socket): sends requests to ``demo``, shows
  who owns the job and how many connections each container served, and with
  ``--chaos`` SIGKILLs the owner every few seconds and times each takeover
  (kill -> new owner running, CLOCK_MONOTONIC across processes).

Ctrl-C or the end of ``--duration`` stops everything with a summary.

Runs for days: nothing grows with restarts.  The monitor keeps running
totals and the last few events only.  The per-container names keep these
invariants (every step below runs under the mutex ``demo.members``):

- ``demo.members`` (a plain JSON variable, so the controller could read it
  safely) lists [id, pid] of containers that joined; a container creates its
  ``served`` counter *before* it lists itself;
- a ``served`` counter is read only for an id on the list (``get`` creates a
  missing semaphore: reading a gone container's counter would bring it back);
- whoever takes an id off the list (the dead, pruned by ``_forget_dead`` in
  every joining container and at every render of the monitor) destroys its
  counter first; the controller destroys it too when the container ends
  (``post_finish_hook``).
So a counter exists only for a live container or an id still on the list: a
read that lands after the controller's destroy (the container died between
the check and the read) brings it back only until the next prune.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections import deque

from . import cenv, mutex, semaphore, sharedvar
from .controller import Controller
from .hooks import ProcessorHooks
from .service import Service

JOB_SEM = "demo.job"
JOBS_DONE = "demo.jobs_done"
OWNER_VAR = "demo.owner"
MEMBERS_VAR = "demo.members"
MEMBERS_LOCK = "demo.members"
JOB_INTERVAL = 0.25
HELP = "commands: PING, WHO, JOBS, OWNER, HELP, QUIT"


def _served(cid: str) -> str:
    return f"demo.served.{cid}"


def _members() -> list:
    try:
        return json.loads(sharedvar.get_value(MEMBERS_VAR) or "[]")
    except ValueError:
        return []


def _forget_dead(members: list) -> list:
    """Under MEMBERS_LOCK: destroy the counters of dead members and return
    the live ones (the caller writes the list back if it changed)."""
    live = []
    for m in members:
        if _alive(m[1]):
            live.append(m)
        else:
            semaphore.destroy(_served(m[0]))
    return live


def _add_plugins(ctrl, backend: str) -> None:
    if backend == "native":
        ctrl.add_plugin(semaphore.native_plugin)
        ctrl.add_plugin(mutex.native_plugin)
    else:
        ctrl.add_plugin(semaphore.plugin)
        ctrl.add_plugin(mutex.plugin)
    ctrl.add_plugin(sharedvar.plugin)


class DemoHooks(ProcessorHooks):
    """The ``demo`` service's containers."""

    def __init__(self, backend: str):
        self.backend = backend
        self.own = False
        self.waiter = None

    def post_add_hook(self, service, ctrl):
        _add_plugins(ctrl, self.backend)

    def post_start_hook(self, cont):
        semaphore.create(JOB_SEM, 1, protected=True)
        semaphore.create(JOBS_DONE, 0)
        sharedvar.create_var(OWNER_VAR)
        sharedvar.create_var(MEMBERS_VAR)
        semaphore.create(_served(cont.id), 0)       # before it is listed (see the top)
        self.waiter = asyncio.get_running_loop().create_task(self.compete(cont))

    async def join(self, cont):
        """List this container, pruning the dead (and their counters)."""
        async with mutex.access(MEMBERS_LOCK):
            members = _forget_dead(_members())
            members.append([cont.id, cont.pid])
            sharedvar.set_value(MEMBERS_VAR, json.dumps(members))

    def post_finish_hook(self, service, ctrl, container_id):
        """In the controller: the container is gone; so is its counter."""
        semaphore.destroy(_served(container_id))

    async def compete(self, cont):
        """Join, then wait for the job; a dead owner's count comes back by itself."""
        await self.join(cont)
        got = await semaphore.decrement_async(JOB_SEM, wait=True)
        if got < 0:
            return
        self.own = True
        sharedvar.set_value(OWNER_VAR, json.dumps({"id": cont.id, "pid": cont.pid, "since": time.monotonic()}))
        cenv.create_timer(self.run_job, JOB_INTERVAL)

    def run_job(self, timer):
        semaphore.increment(JOBS_DONE)
        return True

    def pre_finish_hook(self, cont):
        if self.waiter is not None:
            self.waiter.cancel()
        if self.own:
            self.own = False
            semaphore.increment(JOB_SEM)  # hand the job over on a regular end


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The demo's line protocol; each answer names the serving container."""
    cont = cenv.self_cont()
    semaphore.increment(_served(cont.id))
    while True:
        line = await reader.readline()
        if not line:
            return
        cmd = line.decode("utf-8", "replace").strip().upper()
        if cmd == "PING":
            answer = "PONG"
        elif cmd == "WHO":
            answer = f"pid {cont.pid}"
        elif cmd == "JOBS":
            answer = f"jobs done {semaphore.get(JOBS_DONE)}"
        elif cmd == "OWNER":
            answer = f"job owner {sharedvar.get_value(OWNER_VAR) or 'none'}"
        elif cmd == "HELP":
            answer = HELP
        elif cmd == "QUIT":
            writer.write(f"{cont.id} bye\n".encode())
            await writer.drain()
            return
        else:
            answer = f"unknown command; {HELP}"
        writer.write(f"{cont.id} {answer}\n".encode())
        await writer.drain()


class MonitorHooks(ProcessorHooks):
    """The ``monitor`` container: load, live view, chaos, summary."""

    def __init__(self, backend: str, duration: float | None, chaos: bool, chaos_every: float,
                 rate: float, out=None):
        self.backend = backend
        self.duration = duration
        self.chaos = chaos
        self.chaos_every = chaos_every
        self.rate = rate
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.started = time.monotonic()
        self.requests = 0
        self.errors = 0
        self.by_container: dict[str, int] = {}
        self.n_takeovers = 0
        self.worst_takeover = 0.0
        self.events: deque[str] = deque(maxlen=20)
        self.tasks = []
        self.port = None
        self.summary_printed = False

    def post_add_hook(self, service, ctrl):
        self.ctrl = ctrl

    def post_start_hook(self, cont):
        addr = self.ctrl.address_of("demo")
        self.port = int(addr.rpartition(":")[2])
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self.load()))
        if self.chaos:
            self.tasks.append(loop.create_task(self.chaos_loop()))
        self.tasks.append(loop.create_task(self.show(0.5 if self.tty else 1.0)))
        if self.duration is not None:
            cenv.create_timer(lambda t: cenv.system_shutdown(), self.duration)
        self.say(f"demo service on tcp://127.0.0.1:{self.port} ({self.backend} backend); "
                 f"try: printf 'WHO\\n' | nc 127.0.0.1 {self.port}")

    def say(self, msg: str) -> None:
        self.events.append(msg)
        if not self.tty:
            print(msg, file=self.out, flush=True)

    async def load(self):
        """Short connections to the demo service, at about `rate` per second."""
        while True:
            t0 = time.monotonic()
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port), 2.0)
                writer.write(b"WHO\n")
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), 2.0)
                writer.close()
                cid = line.decode().split(" ", 1)[0]
                if cid:
                    self.requests += 1
                    if cid not in self.by_container and len(self.by_container) > 64:
                        live = {m[0] for m in _members()}
                        self.by_container = {k: v for k, v in self.by_container.items() if k in live}
                    self.by_container[cid] = self.by_container.get(cid, 0) + 1
            except (OSError, asyncio.TimeoutError):
                self.errors += 1
            await asyncio.sleep(max(0.0, 1.0 / self.rate - (time.monotonic() - t0)))

    def owner(self):
        raw = sharedvar.get_value(OWNER_VAR)
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    async def chaos_loop(self):
        while True:
            await asyncio.sleep(self.chaos_every)
            victim = self.owner()
            if victim is None:
                continue
            t_kill = time.monotonic()
            try:
                os.kill(victim["pid"], signal.SIGKILL)
            except ProcessLookupError:
                continue
            while True:  # the new owner records when it started running the job
                await asyncio.sleep(0.002)
                new = self.owner()
                if new and new["pid"] != victim["pid"]:
                    break
                if time.monotonic() - t_kill > 10:
                    self.say(f"chaos: no takeover within 10 s after killing {victim['id']}!")
                    break
            if new and new["pid"] != victim["pid"]:
                dt = max(0.0, new["since"] - t_kill)
                self.n_takeovers += 1
                self.worst_takeover = max(self.worst_takeover, dt)
                self.say(f"chaos: SIGKILLed owner {victim['id']} (pid {victim['pid']}); "
                         f"{new['id']} took over in {dt * 1000:.1f} ms")

    async def show(self, period: float):
        """Every *period*: prune the member list, read the counters of the
        listed containers (under the lock: see the top) and render."""
        while True:
            await asyncio.sleep(period)
            try:
                async with mutex.access(MEMBERS_LOCK):
                    members = _members()
                    live = _forget_dead(members)
                    if len(live) != len(members):
                        sharedvar.set_value(MEMBERS_VAR, json.dumps(live))
                    served = [(cid, pid, semaphore.get(_served(cid))) for cid, pid in live]
                self.render(served)
            except Exception as e:     # one bad render never ends the live view
                print(f"render failed: {e!r}", file=sys.stderr, flush=True)

    def render(self, members):
        """members: (id, pid, served) of the listed containers, alive when read."""
        owner = self.owner()
        elapsed = time.monotonic() - self.started
        rows = []
        for cid, pid, served in members:
            alive = _alive(pid)
            mark = "OWNER" if owner and owner["id"] == cid else ""
            rows.append((cid, pid, "up" if alive else "dead", served, self.by_container.get(cid, 0), mark))
        jobs = semaphore.get(JOBS_DONE)
        worst = self.worst_takeover * 1000
        if self.tty:
            lines = [f"netplex-native demo  {elapsed:6.1f}s  backend={self.backend}  port={self.port}"
                     f"  (Ctrl-C to stop)", "",
                     f"{'container':<12}{'pid':>8}  {'state':<6}{'served':>8}{'monitor':>9}  job", ""]
            for cid, pid, state, served, mine, mark in rows:
                if state == "up" or mark:
                    lines.append(f"{cid:<12}{pid:>8}  {state:<6}{served:>8}{mine:>9}  {mark}")
            lines += ["", f"jobs run: {jobs}   requests: {self.requests} (errors {self.errors})"
                          f"   takeovers: {self.n_takeovers}   worst takeover: {worst:.1f} ms", ""]
            lines += list(self.events)[-6:]
            self.out.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")
            self.out.flush()
        else:
            live = " ".join(f"{cid}={served}" for cid, pid, state, served, _, _ in rows if state == "up")
            print(f"[{elapsed:5.1f}s] owner={owner['id'] if owner else '-'} jobs={jobs} "
                  f"requests={self.requests} served: {live}", file=self.out, flush=True)

    def system_shutdown(self):
        if self.summary_printed:
            return
        self.summary_printed = True
        cenv.cancel_all_timers()
        for t in self.tasks:
            t.cancel()
        worst = f"{self.worst_takeover * 1000:.1f} ms" if self.n_takeovers else "-"
        print(f"\nsummary: {self.requests} requests served ({self.errors} errors), "
              f"jobs run {semaphore.get(JOBS_DONE)}, takeovers {self.n_takeovers}, "
              f"worst takeover {worst}", file=self.out, flush=True)


def _alive(pid: int) -> bool:
    """Not a zombie, not gone.  A process reaped between the open and the
    read makes the read fail with ESRCH (ProcessLookupError): gone too."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def build(*, workers: int = 4, backend: str = "native", duration: float | None = None,
          chaos: bool = False, chaos_every: float = 3.0, port: int = 0, rate: float = 20.0,
          socket_dir: str | None = None) -> Controller:
    ctrl = Controller(socket_dir)
    ctrl.add_service(Service("demo", handle, hooks=DemoHooks(backend),
                             address=f"tcp://127.0.0.1:{port}", workers=workers))
    ctrl.add_service(Service("monitor", hooks=MonitorHooks(backend, duration, chaos, chaos_every, rate),
                             workers=1))
    return ctrl
