"""gunicorn server hooks: one crash-safe ``Domain`` per gunicorn master.

In ``gunicorn.conf.py``::

    from netplex_native.gunicorn import on_starting, child_exit, on_exit

and in the application (workers)::

    from netplex_native.gunicorn import domain
    with domain().mutex("cache-refresh"):
        ...

Which process runs what (gunicorn's arbiter is the supervisor):
- master, ``on_starting``: the domain is created once, before any worker is
  forked (segments whose creator died, e.g. a SIGKILLed earlier master, are
  removed first).  A HUP reload re-executes the config file but not
  ``on_starting``, and this module's state survives the re-execution, so the
  one segment is kept: old and new workers share it, a mutex never has two
  holders.  USR2 (gunicorn's binary upgrade): the name travels to the new
  master in ``NETPLEX_DOMAIN`` (put into the environment gunicorn re-executes
  with), and a master that gunicorn started as an upgrade (``GUNICORN_PID``
  set) attaches to it, so old and new workers share the segment too; attached
  (and so registered), the new master keeps the segment in use after the old
  one, its creator, has exited: no other ``Domain.create`` removes it.
- master, ``child_exit``: the reaped worker's holdings are given back
  (``recover(pid)``); a recovery that cannot finish now (a guard held by a
  stopped process) is retried from a background thread until it does.
- master, ``on_exit`` (TERM, INT, QUIT): the segment is unlinked and closed
  -- unless this master has a live upgraded master (USR2), which takes it
  over (and unlinks it when it exits).
- workers: ``domain()`` returns the domain inherited from the master.

Set capacities with ``configure(semaphores=..., mutexes=..., processes=...)``
in ``gunicorn.conf.py`` (before ``on_starting`` runs).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from .domain import ENV, Domain

__all__ = ["on_starting", "child_exit", "on_exit", "domain", "configure"]

log = logging.getLogger("netplex_native.gunicorn")

_domain: Domain | None = None
_owner_pid = 0                      # the process that created or attached _domain
_config: dict[str, int] = {"semaphores": 1024, "mutexes": 1024, "processes": 256}
_pending: set[int] = set()          # pids whose recovery must be retried
_pending_lock = threading.Lock()
_retry_thread: threading.Thread | None = None


def configure(*, semaphores: int = 1024, mutexes: int = 1024, processes: int = 256) -> None:
    """Capacities of the segment ``on_starting`` creates (processes: at least
    the number of workers, plus room for those being replaced)."""
    _config.update(semaphores=semaphores, mutexes=mutexes, processes=processes)


def _master_domain() -> Domain:
    """The master's domain, created (or, after USR2, attached) once."""
    global _domain, _owner_pid
    if _domain is not None and _owner_pid == os.getpid():
        return _domain                  # HUP, or a second call: keep the one segment
    inherited = os.environ.get(ENV)
    if inherited and os.environ.get("GUNICORN_PID") and _domain is None:
        try:                            # a binary upgrade: share the old master's segment
            _domain, _owner_pid = Domain.attach(inherited), os.getpid()
            log.info("netplex: attached to the running segment %s (binary upgrade)", inherited)
            return _domain
        except Exception:
            log.warning("netplex: segment %s of the upgraded master is gone; creating one", inherited)
    _domain = Domain.create(semaphores=_config["semaphores"], mutexes=_config["mutexes"],
                            processes=_config["processes"])
    _owner_pid = os.getpid()
    log.info("netplex: created segment %s", _domain.name)
    return _domain


def on_starting(server: Any) -> None:
    """gunicorn hook (master, before the first fork): create the domain."""
    d = _master_domain()
    env = getattr(getattr(server, "cfg", None), "env_orig", None)
    if isinstance(env, dict):
        env[ENV] = d.name               # what a USR2 re-execution runs with


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook (master, after reaping a worker): give back what it held."""
    if _domain is None:
        return
    pid = int(worker.pid)
    try:
        done = _domain.recover(pid, timeout=0.5) >= 0
    except Exception:
        log.exception("netplex: recover(%d) failed; retrying", pid)
        done = False
    if not done:
        with _pending_lock:
            _pending.add(pid)
        _start_retry()


def _start_retry() -> None:
    global _retry_thread
    if _retry_thread is not None and _retry_thread.is_alive():
        return
    _retry_thread = threading.Thread(target=_retry_loop, name="netplex-recover", daemon=True)
    _retry_thread.start()


def _retry_loop() -> None:
    delay = 0.05
    while True:
        with _pending_lock:
            pids = list(_pending)
        if not pids or _domain is None:
            return
        for pid in pids:
            try:
                if _domain.recover(pid, timeout=0) >= 0:
                    with _pending_lock:
                        _pending.discard(pid)
            except Exception:
                log.exception("netplex: recover(%d) failed", pid)
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def on_exit(server: Any) -> None:
    """gunicorn hook (master, at shutdown): unlink and close the segment."""
    global _domain
    d, _domain = _domain, None
    if d is None or _owner_pid != os.getpid():
        return
    heir = int(getattr(server, "reexec_pid", 0) or 0)
    try:
        if heir and _alive(heir):
            log.info("netplex: segment %s left to the upgraded master %d", d.name, heir)
        else:
            d.unlink()
    finally:
        d.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def domain() -> Domain:
    """The domain of this gunicorn master, in a worker (or the master)."""
    if _domain is not None:
        return _domain
    return _master_domain()             # preload_app: the app asks before on_starting
