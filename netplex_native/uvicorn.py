"""Serve an ASGI app with uvicorn workers and one crash-safe ``Domain``.

``uvicorn --workers N`` spawns its workers (fresh interpreters, not forks)
and never tells anyone which one died, so nothing would give back what a
killed worker held.  This module is a small supervisor in its place::

    python -m netplex_native.uvicorn myapp:app --workers 4 --host 0.0.0.0 --port 8000

and in the app (asyncio: awaitable waits, the event loop never blocks)::

    from netplex_native.uvicorn import domain

    async def app(scope, receive, send):
        async with domain().mutex("cache-refresh"):
            ...

Which process runs what:
- supervisor (``run``/``main``, this process): creates the domain (removing
  segments whose creator is dead) and exports its name in
  ``NETPLEX_DOMAIN``, binds the listening socket once, spawns the workers;
  for every worker that ends it reaps it, calls ``recover(pid)`` (retried
  until it finishes) and spawns a replacement; SIGTERM/SIGINT: workers get
  SIGTERM (uvicorn's graceful shutdown), then SIGKILL after
  ``graceful_timeout``, every one is recovered, the segment is unlinked and
  the supervisor exits 0; SIGHUP: workers are replaced one at a time, the
  domain is kept.  A crash loop is backed off, and after 10 workers in a row
  that ended within 1 s of their start (an app that does not import, say)
  the supervisor stops everything and exits with status 3.
- workers: uvicorn's ``Server`` on the inherited socket; ``domain()``
  attaches once per process; a worker whose supervisor is gone exits.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Sequence

from .domain import ENV, Domain

__all__ = ["domain", "run", "main"]

log = logging.getLogger("netplex_native.uvicorn")

_worker_domain: Domain | None = None
_worker_domain_pid = 0


def domain() -> Domain:
    """The supervisor's domain, in a worker (attached once per process)."""
    global _worker_domain, _worker_domain_pid
    if _worker_domain is None or _worker_domain_pid != os.getpid():
        _worker_domain = Domain.attach()
        _worker_domain_pid = os.getpid()
    return _worker_domain


# ---- worker process ----

def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)         # uvicorn's graceful shutdown
    time.sleep(10)
    os._exit(1)


def _worker_main(app: str, options: dict[str, Any], sock: socket.socket, parent: int) -> None:
    import uvicorn
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    config = uvicorn.Config(app, **options)
    config.configure_logging()
    uvicorn.Server(config).run(sockets=[sock])


# ---- supervisor ----

class _Supervisor:
    def __init__(self, app: str, workers: int, sock: socket.socket, options: dict[str, Any],
                 dom: Domain, graceful_timeout: float) -> None:
        self.app, self.n, self.sock, self.options = app, workers, sock, options
        self.dom = dom
        self.graceful_timeout = graceful_timeout
        self.procs: list[Any] = []
        self.pending: set[int] = set()           # pids whose recovery must be retried
        self.stopping = False
        self.reload = False
        self.started: dict[int, float] = {}      # pid -> when it was spawned
        self.quick_failures = 0                  # consecutive workers that lived < 1 s
        self.status = 0
        self.ctx = multiprocessing.get_context("spawn")

    def spawn(self) -> None:
        p = self.ctx.Process(target=_worker_main, name="netplex-uvicorn-worker",
                             args=(self.app, self.options, self.sock, os.getpid()))
        p.start()
        assert p.pid is not None
        self.procs.append(p)
        self.started[p.pid] = time.monotonic()
        log.info("netplex: started worker %d", p.pid)

    def reap(self, p: Any) -> None:
        """The one place where a worker's end is handled: reap, recover."""
        p.join()
        self.procs.remove(p)
        self.pending.add(p.pid)
        self.retry_recovery()

    def retry_recovery(self) -> None:
        for pid in list(self.pending):
            try:
                if self.dom.recover(pid, timeout=0.2) >= 0:
                    self.pending.discard(pid)
            except Exception:
                log.exception("netplex: recover(%d) failed; retrying", pid)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        for _ in range(self.n):
            self.spawn()
        while not self.stopping:
            if self.reload:
                self.reload = False
                self._replace_all()
                continue
            ready = multiprocessing.connection.wait([p.sentinel for p in self.procs], timeout=0.5)
            for p in [p for p in self.procs if p.sentinel in ready]:
                log.warning("netplex: worker %d ended (exit code %s)", p.pid, p.exitcode)
                lived = time.monotonic() - self.started.pop(p.pid, 0.0)
                self.reap(p)
                self.quick_failures = self.quick_failures + 1 if lived < 1.0 else 0
                if self.quick_failures >= 10:
                    log.error("netplex: 10 workers in a row ended within 1 s of their start "
                              "(does the app import?); stopping")
                    self.stopping, self.status = True, 3
                elif not self.stopping:
                    if self.quick_failures:      # back off a crash loop
                        time.sleep(min(0.05 * 2 ** self.quick_failures, 2.0))
                    self.spawn()
            if self.pending:
                self.retry_recovery()
        self._stop_all()
        return self.status

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, frame: Any) -> None:
        self.reload = True

    def _replace_all(self) -> None:
        for old in list(self.procs):
            if self.stopping:
                return
            self.spawn()
            old.terminate()
            old.join(self.graceful_timeout)
            if old.is_alive():
                old.kill()
            self.reap(old)

    def _stop_all(self) -> None:
        for p in self.procs:
            p.terminate()
        end = time.monotonic() + self.graceful_timeout
        for p in list(self.procs):
            p.join(max(0.0, end - time.monotonic()))
            if p.is_alive():
                p.kill()
            self.reap(p)
        end = time.monotonic() + 5
        while self.pending and time.monotonic() < end:
            self.retry_recovery()
            time.sleep(0.05)


def _bind(host: str, port: int, uds: str | None) -> socket.socket:
    if uds:
        if os.path.exists(uds):
            os.unlink(uds)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(uds)
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
    s.listen(2048)
    s.set_inheritable(True)
    return s


def run(app: str, *, host: str = "127.0.0.1", port: int = 8000, uds: str | None = None,
        workers: int = 1, semaphores: int = 1024, mutexes: int = 1024,
        processes: int | None = None, graceful_timeout: float = 10.0,
        **uvicorn_options: Any) -> int:
    """Supervise *workers* uvicorn workers serving *app* (``"module:attr"``)
    with one Domain; returns the exit status once stopped (SIGTERM/SIGINT).
    Extra keyword arguments go to ``uvicorn.Config`` (``log_level``, ...)."""
    if not isinstance(app, str) or ":" not in app:
        raise ValueError(f'app must be an import string "module:attribute", not {app!r}')
    if type(workers) is not int or workers < 1:
        raise ValueError(f"workers must be an int >= 1, not {workers!r}")
    multiprocessing.allow_connection_pickling()
    procs = processes if processes is not None else 4 * workers + 8
    dom = Domain.create(semaphores=semaphores, mutexes=mutexes, processes=procs)
    sock = _bind(host, port, uds)
    log.info("netplex: segment %s, serving %s on %s with %d workers", dom.name, app,
             uds or f"{host}:{port}", workers)
    try:
        return _Supervisor(app, workers, sock, uvicorn_options, dom, graceful_timeout).run()
    finally:
        sock.close()
        dom.unlink()
        dom.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m netplex_native.uvicorn",
        description="Serve an ASGI app with uvicorn workers sharing one crash-safe netplex Domain")
    ap.add_argument("app", help='the ASGI app, "module:attribute"')
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--uds", default=None, help="serve on this Unix socket instead")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--semaphores", type=int, default=1024)
    ap.add_argument("--mutexes", type=int, default=1024)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--app-dir", default="", help="put this directory first on sys.path")
    args = ap.parse_args(argv)
    if args.app_dir:
        sys.path.insert(0, os.path.abspath(args.app_dir))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [os.path.abspath(args.app_dir)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    return run(args.app, host=args.host, port=args.port, uds=args.uds, workers=args.workers,
               semaphores=args.semaphores, mutexes=args.mutexes, log_level=args.log_level)


if __name__ == "__main__":
    raise SystemExit(main())
