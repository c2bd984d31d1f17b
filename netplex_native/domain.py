"""``netplex_native.Domain``: the native core for any supervisor (public).

A Domain is one shared-memory segment of crash-safe semaphores and mutexes,
used without our controller: a supervisor (a gunicorn master, a script that
forks or spawns workers) creates it, its workers use it, and after reaping a
worker the supervisor calls ``recover(pid)`` so that what the worker held is
given back.  Handles are the same classes as ``semaphore.access`` and
``mutex.access`` return (``Semaphore``, ``Mutex``), bound to this domain.

Which process runs what:
- supervisor: ``Domain.create(...)`` before it forks or spawns (it also
  removes segments whose creator is dead, whoever created them, and exports
  the name in ``NETPLEX_DOMAIN`` for spawned children), ``recover(pid)`` after
  each reaped worker, ``unlink()`` and ``close()`` at the end;
- a forked worker: the same object (the mapping is inherited; the worker
  registers itself on first use);
- a spawned worker (a fresh interpreter): ``Domain.attach()`` (the name comes
  from ``NETPLEX_DOMAIN``).

Invariants:
- The holder of a mutex is a process; its handles raise NotHolderError on
  unlock by a process that does not hold it (see ``mutex``).
- A segment records its creator (pid + start time); a later ``create``
  removes a segment only once its creator and every process registered in
  it (``attach`` registers the caller) are certainly dead.
- Every public name here is typed (the package ships ``py.typed``).
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

from . import errors
from .mutex import BoundMutex, Mutex
from .semaphore import BoundSemaphore, Semaphore

__all__ = ["Domain", "ENV"]

#: The environment variable that carries a domain's name to spawned processes.
ENV = "NETPLEX_DOMAIN"


def _core() -> Any:
    from .native import domain as core
    core._require()
    return core


class Domain:
    """One shared-memory segment of semaphores and mutexes (see the module doc).

    Make one with :meth:`create` (the supervisor) or :meth:`attach` (a
    spawned worker).  Usable as a context manager (``close()`` at the end)."""

    __slots__ = ("_core", "_sem_backend", "_mtx_backend", "_creator_pid")

    def __init__(self, core: object) -> None:
        # Use create() or attach().
        from .native.plugins import _NativeMutex, _NativeSem
        self._core = core
        self._sem_backend = _NativeSem(core, "container")
        self._mtx_backend = _NativeMutex(core, "container")
        self._creator_pid = 0

    # ---- lifecycle ----
    @classmethod
    def create(cls, *, semaphores: int = 1024, mutexes: int = 1024, processes: int = 256,
               actors: int | None = None, waiters: int = 8192, waiter_quota: int | None = None,
               name: str | None = None, export: bool = True) -> "Domain":
        """Create a new segment (in the supervisor, before workers fork or are
        spawned).  First removes every netplex segment whose creator is dead.
        Capacities are fixed for its life; running out raises TableFullError.
        *waiters*: async waiter records, one per coroutine awaiting a wait
        (``lock_async``, ``decrement_async``, ``async with``) in any process.
        *waiter_quota*: how many of them one process may hold at once
        (default ``waiters // 2``, at most *waiters*); beyond it that process
        gets TableFullError.  The quota bounds each process, not their sum:
        one busy process leaves ``waiters - waiter_quota`` to the others, but
        two at the default quota fill the table; to guarantee every one of
        *processes* its quota, make ``waiters >= processes * waiter_quota``.
        *name*: the segment's name (default: an unguessable one).  *export*:
        put the name in ``os.environ["NETPLEX_DOMAIN"]`` so that spawned
        children find it with :meth:`attach`."""
        core = _core()
        core.Domain.remove_stale()
        d = cls(core.Domain.create(semaphores=semaphores, mutexes=mutexes, processes=processes,
                                   actors=actors, waiters=waiters, waiter_quota=waiter_quota,
                                   name=name))
        d._creator_pid = os.getpid()
        if export:
            os.environ[ENV] = d.name
        return d

    @classmethod
    def attach(cls, name: str | None = None) -> "Domain":
        """Map an existing segment (in a spawned worker): *name*, or the one
        named by ``NETPLEX_DOMAIN``.  The calling process is registered: while
        it lives, the segment is in use and no ``create`` removes it, even
        after its creator has died."""
        if name is None:
            name = os.environ.get(ENV)
            if not name:
                raise errors.SegmentError(
                    f"Domain.attach(): no name given and {ENV} is not set; the supervisor "
                    f"sets it in Domain.create() (export=True) before it spawns workers")
        core = _core().Domain.attach(name)
        try:
            core.register()
        except BaseException:
            core.close()
            raise
        return cls(core)

    @property
    def name(self) -> str:
        """The segment's name (``/netplex-...``): what ``NETPLEX_DOMAIN`` carries."""
        return str(self._core.name)           # type: ignore[attr-defined]

    @property
    def config(self) -> dict[str, int]:
        """Capacities: semaphores, mutexes, processes, actors, waiters, waiter_quota."""
        return dict(self._core.config)        # type: ignore[attr-defined]

    def recover(self, pid: int, timeout: float | None = None) -> int:
        """After reaping the worker *pid*: give back what it held (protected
        semaphore counts, mutexes, waits).  Returns the number of process
        slots recovered (0: nothing to do) or -1 when *timeout* passed first
        (a guard held by a stopped process): call it again later, nothing is
        lost meanwhile.  ``timeout=None`` keeps trying."""
        return int(self._core.recover(pid, timeout=timeout))   # type: ignore[attr-defined]

    def unlink(self) -> None:
        """Remove the segment's name (idempotent); processes that have it
        mapped keep using it.  Also clears ``NETPLEX_DOMAIN`` if it names it."""
        self._core.unlink()                   # type: ignore[attr-defined]
        if os.environ.get(ENV) == self.name:
            del os.environ[ENV]

    def close(self) -> None:
        """This process leaves the domain: what it held is given back (as if
        it had died), then the segment is unmapped.  The Domain is unusable
        afterwards."""
        self._core.close()                    # type: ignore[attr-defined]

    def __enter__(self) -> "Domain":
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- handles ----
    def semaphore(self, name: str, initial: int = 0, *, protected: bool = True) -> Semaphore:
        """The semaphore *name*, created with *initial* if missing (protected
        by default: a worker's net effect -- decrements minus increments -- is
        reverted when it is recovered, however it ended; pass
        ``protected=False`` for a semaphore that counts items a producer
        releases and a consumer takes).
        If it exists, *initial* and *protected* are ignored."""
        errors.check_name(name)
        self._core._dom()                     # type: ignore[attr-defined]  # closed: SegmentError
        self._sem_backend.create(name, initial, protected)
        return BoundSemaphore(name, self._sem_backend)

    def mutex(self, name: str) -> Mutex:
        """The mutex *name* (created unlocked on first use; a full table
        raises TableFullError then)."""
        self._core._dom()                     # type: ignore[attr-defined]  # closed: SegmentError
        return BoundMutex(name, self._mtx_backend)

    def destroy_semaphore(self, name: str) -> None:
        """Remove the semaphore *name* (waiters get -1)."""
        self._sem_backend.destroy(errors.check_name(name))

    def destroy_mutex(self, name: str) -> None:
        """Remove the mutex *name* (waiters get False; tokens keep growing)."""
        self._mtx_backend.destroy(errors.check_name(name))

    def __repr__(self) -> str:
        return f"<netplex_native.Domain {self.name} {self.config}>"
