"""The controller: the master process that forks, supervises and serves containers.

Everything here runs in the controller process, on its asyncio loop.  Its
life, top to bottom:

``run``               bind sockets, start the admin socket, ``_manage`` every service
``_manage``           keep ``workers`` containers alive (``_spawn``, with back-off)
``_spawn``            ``pre_start_hook``, socketpair, fork -> ``container.run_container``
``_on_sigchld``       reap our children -> ``_container_died``
``_container_died``   THE place a container's end is handled, in order:
                      undo unacknowledged grants, plugins give back its
                      holdings (native ``recover(pid)``, RPC revert),
                      ``post_finish_hook``, plugins' ``container_finished``,
                      then restart or finish the shutdown
``_shutdown``         system_shutdown -> shutdown -> wait/escalate ->
                      ``post_rm_hook`` -> plugins unplugged -> files removed

Containers' calls: ``_Conn`` (one per container) reads them, serves the
usual one (a binary semaphore/mutex call a plugin answers at once) in C
(``ctrl_hot_read``, csrc/fast/controller_calls.c) and everything else
through ``_on_call`` to the plugins.  The loop's selector
(ctrl_selector.py) runs those reads from inside its poll while the loop has
nothing else to do, so a call costs no loop iteration.

Operations (gunicorn's signals, Netplex's admin verbs), all on the loop:

``_on_signal``        SIGTERM graceful stop, SIGINT/SIGQUIT quick stop (grace 0:
                      containers close their connections at once), SIGHUP
                      ``reload``, SIGTTIN/SIGTTOU one worker more/less per
                      service (within its range), SIGUSR1 reopen log files;
                      every other signal whose default would end the
                      controller is logged, ignored
``_run_ops``          THE place containers are replaced: reloads and rolling
                      restarts (``restart_service``, ``enable``) run one at a
                      time, in order; a request while one of its kind waits
                      to start joins it (HUPs coalesce)
``_do_reload``        ``_load`` (``config_source()`` in a thread, at most
                      ``reload_timeout``; the loop keeps serving), then new
                      services added, removed ones retired (``_remove``), the
                      others replaced one service at a time (``_replace``)
``_replace``          new containers first; the old ones retired once those
                      are ready, else the old ones keep serving (rolled back)
``_adjust``           dynamic workload: a service's target follows the load its
                      containers report (``ctl.load``), within min..max
``scale``, ``disable``, ``enable``: change a service's target or accepting state;
                      ``_manage`` then starts or ``_retire``s containers

A retiring container is asked to finish (``ctl shutdown`` with its grace,
``shutdown_timeout``) and is SIGTERMed 1 s after that; it never counts
toward a service's workers, its end is never a failure and it is not
restarted.  A service's listening socket is bound for its configured
address (``bound_for``): a reload that moves a disabled service changes
only the configuration, and ``enable`` binds the new address.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque

from . import options, wire
from ._context import ctx
from .container import Container, run_container
from .logs import get_logger, reopen_log_files, set_title
from .ctrl_selector import HotSelector
from .errors import (NAME_MAX_BYTES, NetplexError, PluginNotAddedError, ProtocolError, ServiceConfigError,
                     check_message)
from .plugin import Plugin
from .service import Service, bind, bound_address

log = get_logger("netplex_native.controller")

ADMIN_SOCKET = "admin.sock"
#: An unclean end this soon after a container became ready counts toward
#: the crash-loop back-off (failures before ready count toward disabling).
CRASH_LOOP_WINDOW = 1.0
#: Unsent bytes queued for one container above which the controller stops
#: reading its calls (backpressure: they wait in its socket, so it is slowed,
#: never dropped) and drops broadcast messages to it (counted, logged).
#: Replies to calls already read, and deferred answers, are always queued.
OUTPUT_LIMIT = 32 * 1024 * 1024
#: The same over all containers: above it, every container with unsent
#: bytes is treated as if over its own limit.
TOTAL_OUTPUT_LIMIT = 128 * 1024 * 1024
#: A paused container is read again once its queue is below this.
RESUME_BELOW = 4 * 1024 * 1024
#: Most bytes read from a dead container's socket to serve its last notifications.
DRAIN_LIMIT = 8 * 1024 * 1024
#: Seconds between two warnings about dropped messages.
WARN_EVERY = 5.0
#: Signals the controller handles itself (blocked during start-up; back to
#: their defaults in every container).
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
                   signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM,
                   signal.SIGPROF, signal.SIGIO, signal.SIGPWR)

_encode_reply = wire.encode_reply
try:    # the usual read served whole in C (controller_calls.c)
    from ._fast import ctrl_hot_read as _hot_read
except ImportError:  # pragma: no cover - exercised by test_without_accelerator
    _hot_read = None
# _Conn._serve_hot: one binary call (wire._CALL) and its name
_CALL_UNPACK = wire._CALL.unpack_from
_CALL_SIZE = wire._CALL.size
_HOT_MIN = _CALL_SIZE + 1
_HOT_MAX = _CALL_SIZE + NAME_MAX_BYTES
#: flags a hot op accepts: decrement's wait (bit 0) goes the general way
_HOT_FLAGS = {1: 0, 2: 0, 3: 0, 4: 0, 5: 1}
_reply_parts = wire.reply_parts
_RawJSON = wire.RawJSON


class _Reply:
    """The answer to one call; plugins call ``ok`` or ``error`` now or later.
    It is marked done only once its frame is encoded and handed to the
    connection: a result that cannot be sent becomes an error answer."""

    __slots__ = ("_rec", "id", "done", "deferred", "on_cancel", "cancel_value")

    def __init__(self, rec, rid):
        self._rec = rec
        self.id = rid
        self.done = False
        self.deferred = False
        self.on_cancel = None       # set by a plugin that defers: leave its queue
        self.cancel_value = None    # the answer when the system ends the wait

    def end_wait(self) -> None:
        """The system ends this deferred wait (shutdown, or nobody will read
        the answer): leave the queue and answer as a timeout would."""
        if self.done:
            return
        if self.on_cancel is not None:
            self.on_cancel()
        self.ok(self.cancel_value)

    @property
    def alive(self) -> bool:
        """The caller is still there to receive the answer."""
        return self._rec.alive and self.id > 0

    def ok(self, result=None, blob=None, undo=None) -> None:
        """Answer; *undo* reverses the grant if the caller dies before it
        acknowledged a deferred answer (or if the answer cannot be sent)."""
        if self.done:
            return
        rec = self._rec
        rid = self.id
        deferred = self.deferred
        if rid <= 0 or not rec.alive:
            self.done = True
            if deferred:
                rec.pending.pop(rid, None)
                if undo is not None:
                    undo()
            return
        try:
            if blob is None and type(result) is not _RawJSON:
                parts = None
                data = _encode_reply(rid, result, deferred)
            else:
                parts = _reply_parts(rid, result, deferred, blob)
        except (ValueError, TypeError, OverflowError) as e:   # too large, not encodable
            log.warning("container %s (pid %d): answer to call %d cannot be sent: %s",
                        rec.id, rec.pid, rid, wire.safe_text(str(e), 200))
            self.done = True
            if deferred:
                rec.pending.pop(rid, None)
                if undo is not None:
                    undo()
            rec.conn.send(wire.error_frame(rid, e))
            return
        self.done = True
        if deferred:                # only a deferred reply is in pending
            rec.pending.pop(rid, None)
            if undo is not None:
                rec.unacked[rid] = undo
        if parts is None:
            rec.conn.send(data)
        else:
            rec.conn.send_parts(parts)

    def error(self, exc: BaseException) -> None:
        if self.done:
            return
        self.done = True
        rec = self._rec
        if self.deferred:
            rec.pending.pop(self.id, None)
        if self.id > 0 and rec.alive:
            rec.conn.send(wire.error_frame(self.id, exc))


class _Conn:
    """The controller's end of one container's socketpair: non-blocking,
    frames in, frames out, dropped on a malformed frame.

    Output is a queue of buffers (a value sent to many waiters is one shared
    object).  Bounds: see OUTPUT_LIMIT / TOTAL_OUTPUT_LIMIT: over them the
    container's calls stay unread (in its socket, then in ``_backlog``, at
    most one read's worth) and broadcast messages to it are dropped."""

    def __init__(self, ctrl, rec, sock: socket.socket):
        self._ctrl = ctrl
        self._rec = rec
        self.sock = sock
        self.fd = sock.fileno()
        self._decoder = wire.Decoder(binary=True)
        self._out: deque = deque()  # buffers not yet (entirely) sent
        self._off = 0               # bytes of _out[0] already sent
        self.queued = 0             # unsent bytes
        self._backlog: deque = deque()   # calls read but not served (paused)
        self.paused = False
        self.dropped = 0            # broadcast messages dropped
        self._dropped_warned = 0
        self._warned_at = 0.0
        self.closed = False
        self.draining = False
        sock.setblocking(False)
        self._recv = sock.recv          # bound once: the reader's hot path
        self._send = sock.send
        self._feed = self._decoder.feed
        self._on_call = ctrl._on_call
        self._hot = ctrl._hot
        self._hot_ops = ctrl._hot_ops
        self._read_from_select()

    # ---- input ----
    def _read_from_select(self) -> None:
        """Read when readable: served from inside the selector's poll while
        the loop is idle (ctrl_selector.py), else as a reader callback."""
        self._ctrl._loop.add_reader(self.fd, self._on_readable)
        self._ctrl._selector.set_hot(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        hot = not self.queued and not self._decoder.pending and self._rec.alive
        if hot and _hot_read is not None:
            # the usual read, in C (controller_calls.c, H1-H3)
            try:
                data = _hot_read(self, self.sock, self._hot_ops, self._rec)
            except OSError:
                self.close()
                return
            if data is True or data is None:
                return
            if data.__class__ is tuple:
                self._finish_hot(data)
                return
            hot = False                     # (C found no hot call in it)
        else:
            try:
                data = self._recv(1 << 18)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
        if not data:
            self.close()
            return
        if hot and _HOT_MIN <= len(data) <= _HOT_MAX and self._serve_hot(data):
            return
        try:
            frames = self._feed(data)
        except ProtocolError as e:
            log.warning("container %s (pid %d): %s; dropping its channel", self._rec.id, self._rec.pid,
                        wire.safe_text(str(e), 300))
            self.close()
            return
        self._serve(frames, 0)

    def _serve_hot(self, data) -> bool:
        """Without the accelerator, what ctrl_hot_read does (H1, H2 of
        controller_calls.c): if *data* is exactly one binary call of an
        operation a plugin answers at once (wire.CALL_OPS; sem.decrement
        without wait) with a name check_name accepts, answer it with the
        checks of the general path (_decode_binary, _on_call, check_name,
        _Reply.ok) and nothing else; else False (nothing done)."""
        total, jlen, op, rid, flags, _timeout = _CALL_UNPACK(data)
        fn = self._hot.get(op)
        if (fn is None or jlen or total + 4 != len(data) or flags & ~_HOT_FLAGS[op] or not rid
                or b"\0" in data[_CALL_SIZE:]):
            return False
        try:
            name = data[_CALL_SIZE:].decode("utf-8")
        except UnicodeDecodeError:
            return False
        try:
            result = fn(self._rec, name, flags)
        except Exception as e:
            self._hot_failed(rid, e)
        else:
            self._answer_hot(rid, result)
        return True

    def _answer_hot(self, rid: int, result) -> None:
        _Reply(self._rec, rid).ok(result)       # (not encodable: an error answer)

    def _hot_failed(self, rid: int, e: Exception) -> None:
        if not isinstance(e, (TypeError, ValueError, OverflowError, NetplexError)):
            # a plugin bug must not take the controller down
            log.error("error serving a binary call for container %s", self._rec.id, exc_info=e)
        _Reply(self._rec, rid).error(e)

    def _finish_hot(self, t: tuple) -> None:
        """What ctrl_hot_read left to Python (H2 of controller_calls.c)."""
        kind, rid = t[0], t[1]
        if kind == 0:                       # a result it does not send itself
            self._answer_hot(rid, t[2])
        elif kind == 1:                     # the plugin raised
            self._hot_failed(rid, t[2])
        else:                               # the socket took t[3] bytes of frame t[2]
            frame, sent = t[2], t[3]
            if sent:
                self._queue((memoryview(frame)[sent:],))
            else:
                self.send(frame)

    def _serve(self, frames, i: int) -> None:
        """Serve frames[i:]; stop (and keep the rest) when over the limits."""
        on_call = self._on_call
        rec = self._rec
        n = len(frames)
        while i < n:
            if self.closed:
                return
            if self.queued and self._congested():
                self._backlog.extend(frames[i:] if i else frames)
                self._pause()
                return
            obj, blob = frames[i]
            i += 1
            try:
                on_call(rec, obj, blob)
            except Exception:   # one bad call never costs the rest of the batch
                log.exception("container %s (pid %d): serving a call failed", rec.id, rec.pid)

    def _congested(self) -> bool:
        return self.queued > OUTPUT_LIMIT or self._ctrl._out_total > TOTAL_OUTPUT_LIMIT

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self._ctrl._loop.remove_reader(self.fd)
            log.info("container %s (pid %d) does not read its answers (%d bytes queued); "
                     "its calls wait", self._rec.id, self._rec.pid, self.queued)

    def _maybe_resume(self) -> None:
        if not self.paused or self.closed:
            return
        if self.queued and (self.queued > RESUME_BELOW or self._ctrl._out_total > TOTAL_OUTPUT_LIMIT):
            return
        backlog = self._backlog
        while backlog:
            if self.closed:
                return
            if self.queued and self._congested():
                return
            obj, blob = backlog.popleft()
            try:
                self._on_call(self._rec, obj, blob)
            except Exception:
                log.exception("container %s (pid %d): serving a call failed", self._rec.id, self._rec.pid)
        if self.closed or (self.queued and self._congested()):
            return
        self.paused = False
        self._read_from_select()

    def drain_dead(self) -> None:
        """Its process is gone: serve the notifications (calls that want no
        answer: acknowledgements, messages, give-backs) it sent before it
        ended and that are still unread; calls that wanted an answer are not
        served (nobody is there to learn their outcome)."""
        if self.closed:
            return
        self.draining = True        # nothing more is sent to it
        frames = list(self._backlog)
        self._backlog.clear()
        got = 0
        while got < DRAIN_LIMIT:
            try:
                data = self._recv(1 << 18)
            except (BlockingIOError, InterruptedError, OSError):
                break
            if not data:
                break
            got += len(data)
            try:
                frames += self._feed(data)
            except ProtocolError:
                break
        rec = self._rec
        for obj, blob in frames:
            if type(obj) is list and obj and obj[0] == 0:
                try:
                    self._on_call(rec, obj, blob)
                except Exception:
                    log.exception("container %s (pid %d): serving a last notification failed", rec.id, rec.pid)

    # ---- output ----
    def send(self, data: bytes) -> None:
        if self.closed or self.draining:
            return
        if not self.queued:
            try:
                n = self._send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self.close()
                return
            if n == len(data):
                return
            data = memoryview(data)[n:] if n else data
        self._queue((data,))

    def send_parts(self, parts) -> None:
        if self.closed or self.draining:
            return
        if not self.queued:
            try:
                n = self.sock.sendmsg(parts)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self.close()
                return
            if n:
                rest = []
                for p in parts:
                    if n >= len(p):
                        n -= len(p)
                    else:
                        rest.append(memoryview(p)[n:] if n else p)
                        n = 0
                parts = rest
            if not parts:
                return
        self._queue(parts)

    def offer_message(self, frame: bytes) -> bool:
        """Queue a broadcast message, unless this container is over the
        limits: then it is dropped and counted.  False if dropped."""
        if self.queued and self._congested():
            self.dropped += 1
            self._ctrl.dropped_messages += 1
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY:
                log.warning("container %s (pid %d) does not keep up with its channel (%d bytes queued): "
                            "%d broadcast messages to it dropped so far", self._rec.id, self._rec.pid,
                            self.queued, self.dropped)
                self._warned_at = now
            return False
        self.send(frame)
        return True

    def _queue(self, parts) -> None:
        n = 0
        for p in parts:
            n += len(p)
        if not self.queued:
            self._ctrl._loop.add_writer(self.fd, self._on_writable)
        self._out.extend(parts)
        self.queued += n
        self._ctrl._out_total += n

    def _on_writable(self) -> None:
        out = self._out
        while out:
            bufs = [out[i] for i in range(min(len(out), 64))]
            if self._off:
                bufs[0] = memoryview(bufs[0])[self._off:]
            try:
                n = self.sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            self.queued -= n
            self._ctrl._out_total -= n
            while n:
                left = len(out[0]) - self._off
                if n >= left:
                    out.popleft()
                    n -= left
                    self._off = 0
                else:
                    self._off += n
                    n = 0
        if not out:
            self._ctrl._loop.remove_writer(self.fd)
        self._maybe_resume()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._rec.alive = False
        loop = self._ctrl._loop
        if not self.paused:
            loop.remove_reader(self.fd)
        if self._out:
            loop.remove_writer(self.fd)
            self._out.clear()
        self._ctrl._out_total -= self.queued
        self.queued = 0
        self._off = 0
        self._backlog.clear()
        self.sock.close()


class _ContainerRecord:
    """What the controller knows of one container process."""

    def __init__(self, cid: str, service: Service):
        self.id = cid
        self.service = service
        self.pid = 0
        self.conn: _Conn | None = None
        self.alive = True           # channel open and not reaped
        self.ready = False          # post_start_hook done
        self.ready_mono = 0.0
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.pending: dict[int, _Reply] = {}      # deferred replies by call id
        self.unacked: dict[int, object] = {}      # call id -> undo of a deferred grant
        self.system_shutdown_done = False
        self.retiring = False       # asked to finish; replaced or not needed any more
        self.waits_ended = False    # it said ctl.stopping: its waits end (_end_waits)
        self.start_handle: asyncio.TimerHandle | None = None   # startup_timeout
        self.load = 0               # connections it serves (dynamic workload only)
        self.kill_handle: asyncio.TimerHandle | None = None
        self.container = Container(cid, 0, service.name)

    def info(self) -> dict:
        conn = self.conn
        return {"id": self.id, "pid": self.pid, "service": self.service.name,
                "started": self.started, "uptime": round(time.monotonic() - self.started_mono, 3),
                "ready": self.ready, "retiring": self.retiring, "connections": self.load, "queued_bytes": conn.queued if conn else 0,
                "dropped_messages": conn.dropped if conn else 0}


class _Op:
    """An operation that replaces containers; ``Controller._run_ops`` runs
    them one at a time, in order: a reload (``services``: given, or None to
    load them) or the rolling restart of one service (``st``).  ``waiters``:
    admin requests told whether the reload's configuration was loaded."""

    __slots__ = ("kind", "st", "services", "waiters")

    def __init__(self, kind: str, st=None, services=None):
        self.kind = kind
        self.st = st
        self.services = services
        self.waiters: list = []

    def answer(self, error) -> None:
        for fut in self.waiters:
            if not fut.done():
                fut.set_result(error)
        self.waiters.clear()


class _ServiceState:
    def __init__(self, service: Service):
        self.service = service
        self.sock: socket.socket | None = None
        self.bound = None
        self.bound_for = None        # the configured address ``bound`` was bound for
        self.moved_from = None       # (sock, bound, bound_for) of the address a reload moves from,
                                     # until its new containers are ready (closed in every child)
        self.records: dict[str, _ContainerRecord] = {}
        self.seq = 0
        self.start_failures = 0      # consecutive, before ready: disables the service
        self.crash_streak = 0        # consecutive quick unclean ends after ready: back-off
        self.spawn_errors = 0        # consecutive failed socketpair()/fork(): back-off, retried
        self.restarts = 0
        self.disabled = False        # after max_start_failures (``enable`` clears it)
        self.replacing = False       # _replace waits for new containers while old ones serve
        self.accepting = True        # False after admin ``disable``
        self.removing = False        # dropped by a reload: its containers are retiring
        self.workers = service.workers   # the target (``scale``, SIGTTIN/SIGTTOU change it)
        self.restart_handle: asyncio.TimerHandle | None = None
        self.shrink_handle: asyncio.TimerHandle | None = None   # dynamic workload

    def active(self) -> list:
        """Its containers that count toward ``workers`` (not retiring)."""
        return [r for r in self.records.values() if not r.retiring]

    def address(self):
        """Where it listens, or will listen once enabled: the bound address
        (a tcp port 0 resolved) while it is the configured one."""
        if self.bound is not None and self.bound_for == self.service.address:
            return self.bound
        return self.service.address

    def worker_range(self) -> tuple[int, int]:
        """The workers a target may be: min..max of a dynamic workload, else 1..4096."""
        svc = self.service
        return (svc.workers, svc.max_workers) if svc.max_workers is not None else (1, 4096)


class Controller:
    """The master process: forks and supervises the containers of its services.

    ``socket_dir``: where the admin socket lives (created 0700); None:
    ``default_socket_dir(name)`` (see ``runtime_dir``), removed at shutdown.
    ``name``: default the script's name and the pid (``myapp.1234``).
    ``startup_timeout``: seconds a container may take to be ready (its
    ``post_start_hook`` done); a slower one is killed and counts as a start
    failure.  None: no limit.
    ``config_source``: a callable returning the list of services to run;
    ``reload()`` (SIGHUP) calls it in a thread of its own, for at most
    ``reload_timeout`` seconds (``netplex-native run`` re-reads its file).
    Optional methods: ``discard()`` undoes a load that is not used (timed
    out, invalid), ``applied(ctrl)`` is told that one is.  Without a
    config_source a reload replaces every container, services unchanged.
    """

    def __init__(self, socket_dir: str | None = None, *, max_start_failures: int = 10,
                 backoff: tuple[float, float] = (0.1, 5.0), shutdown_timeout: float = 5.0,
                 native_config: dict | None = None, admin_idle_timeout: float = 60.0,
                 config_source=None, name: str | None = None, startup_timeout: float | None = None,
                 reload_timeout: float = 30.0):
        if name is None:
            script = sys.argv[0] if sys.argv and sys.argv[0] else ""
            stem = os.path.splitext(os.path.basename(script))[0]
            if stem == "__main__":      # python -m PACKAGE
                stem = os.path.basename(os.path.dirname(os.path.abspath(script)))
            name = f"{stem or 'python'}.{os.getpid()}"
            if name.startswith("."):
                name = "python" + name
        self.name = check_controller_name(name)
        # every option checked here, as the TOML file's (options.py): a bad
        # one never reaches run() (nan or inf seconds: a wait never ends)
        self.startup_timeout = options.seconds("startup_timeout", startup_timeout, optional=True)
        self.reload_timeout = options.seconds("reload_timeout", reload_timeout)
        socket_dir = options.socket_dir("socket_dir", socket_dir)
        max_start_failures = options.count("max_start_failures", max_start_failures)
        backoff = options.backoff("backoff", backoff)
        shutdown_timeout = options.seconds("shutdown_timeout", shutdown_timeout)
        native_config = options.native_config("native_config", native_config)
        admin_idle_timeout = options.seconds("admin_idle_timeout", admin_idle_timeout)
        if config_source is not None and not callable(config_source):
            raise TypeError("config_source must be a callable returning a list of Service")
        self.config_source = config_source
        self._socket_dir_arg = socket_dir
        self._socket_dir: str | None = None
        self._own_socket_dir = False
        self.max_start_failures = max_start_failures
        self.backoff = backoff
        self.shutdown_timeout = shutdown_timeout
        self.native_config = dict(native_config or {})
        #: Seconds an admin connection may stay without a complete request.
        self.admin_idle_timeout = admin_idle_timeout
        self._services: dict[str, _ServiceState] = {}
        self._plugins: list[Plugin] = []
        self._plugin_data: dict[Plugin, object] = {}
        self._routes: dict[str, Plugin] = {}
        #: binary op -> fn(rec, name, flags): the calls a plugin answers at once
        #: (see _Conn._serve_hot); filled by add_plugin from ``_hot_calls``.
        self._hot: dict = {}
        #: the same, as ctrl_hot_read takes them: op -> (fn, flags allowed)
        self._hot_ops: dict = {}
        self._by_pid: dict[int, _ContainerRecord] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._selector = None
        self._admin = None
        self._state = "new"          # new -> running -> stopping -> stopped
        self._shutdown_task = None
        self._quick = False          # SIGINT/SIGQUIT: a quick shutdown
        self._ops: deque = deque()  # reloads and restarts waiting their turn (_run_ops)
        self._op_task = None
        self._load_thread = None     # a configuration load that timed out (still running?)
        self._load_timeout = 0.0
        self._load_timed_out = 0.0
        self._done: asyncio.Future | None = None
        self._reaped_event: asyncio.Event | None = None
        self._out_total = 0          # unsent bytes over all container channels
        self.dropped_messages = 0    # broadcast messages dropped (receivers over the limits)
        self.pid = os.getpid()
        atexit.register(self._at_exit)
        if ctx.role != "container":
            ctx.reset()
            ctx.role = "controller"
            ctx.controller = self
            ctx.set_backends({})

    # ---- configuration ----
    @property
    def socket_dir(self) -> str | None:
        return self._socket_dir

    @property
    def services(self) -> list[Service]:
        return [s.service for s in self._services.values()]

    def add_service(self, service: Service) -> None:
        if not isinstance(service, Service):
            raise TypeError(f"add_service takes a Service, not {type(service).__name__}")
        if service.name in self._services:
            raise ValueError(f"a service named {service.name!r} was already added")
        if self._state in ("stopping", "stopped"):
            raise NetplexError("the controller is shutting down")
        st = _ServiceState(service)
        if self._state == "running":
            self._bind(st)          # a running controller binds first: a failure adds nothing
        self._services[service.name] = st
        try:
            service.hooks.post_add_hook(service, self)
        except BaseException:
            if self._state == "running":
                del self._services[service.name]
                self._close_socket(st)
            raise
        if self._state == "running":
            self._manage(st)

    def add_plugin(self, plugin: Plugin) -> None:
        """Add a plugin (its required plugins first); adding twice is a no-op."""
        if not isinstance(plugin, Plugin):
            raise TypeError(f"add_plugin takes a plugin (e.g. semaphore.plugin), not {type(plugin).__name__}")
        if plugin in self._plugins:
            return
        if plugin.provides:  # before its required plugins: a refused plugin adds nothing
            for other in self._plugins:
                if other.provides == plugin.provides:
                    raise ValueError(
                        f"{plugin.name} and {other.name} both provide {plugin.provides}; add only one of them")
        for req in plugin.required:
            self.add_plugin(req)
        plugin.ctrl_added(self)
        self._plugins.append(plugin)
        if plugin.prefix:
            self._routes[plugin.prefix] = plugin
            hot = getattr(plugin, "_hot_calls", None)
            if hot is not None:
                calls = hot(self)
                ops = {op: (fn, _HOT_FLAGS[op]) for op, fn in calls.items()}    # (a KeyError: nothing added)
                self._hot.update(calls)
                self._hot_ops.update(ops)
        if ctx.role == "controller" and ctx.controller is self:
            self._install_backends("controller")

    def plugins(self) -> list[Plugin]:
        return list(self._plugins)

    def plugin_data(self, plugin: Plugin):
        return self._plugin_data.get(plugin)

    def set_plugin_data(self, plugin: Plugin, data) -> None:
        self._plugin_data[plugin] = data

    def _install_backends(self, role: str) -> None:
        backends = {}
        for p in self._plugins:
            if p.provides:
                backends[p.provides] = p.backend(self, role)
        ctx.set_backends(backends)

    # ---- queries ----
    def containers(self) -> list[Container]:
        out = []
        for st in self._services.values():
            for rec in st.records.values():
                if rec.pid:
                    out.append(rec.container)
        return out

    def address_of(self, service_name: str) -> str | None:
        """The bound address of a service (a tcp port 0 resolved), while running."""
        st = self._services.get(service_name)
        return str(st.address()) if st and st.address() else None

    def status(self) -> dict:
        """A JSON-serialisable snapshot (admin ``list``)."""
        return {
            "pid": os.getpid(),
            "name": self.name,
            "state": self._state,
            "socket_dir": self._socket_dir,
            "plugins": [p.name for p in self._plugins],
            "queued_bytes": self._out_total,
            "dropped_messages": self.dropped_messages,
            "services": [
                {"name": st.service.name,
                 "address": str(st.address()) if st.address() else None,
                 "workers": st.workers,
                 "disabled": st.disabled,
                 "accepting": st.accepting,
                 "removing": st.removing,
                 "restarts": st.restarts,
                 "containers": [r.info() for r in st.records.values() if r.pid]}
                for st in self._services.values()
            ],
        }

    def _service_state(self, name) -> _ServiceState:
        st = self._services.get(name) if isinstance(name, str) else None
        if st is None or st.removing:
            raise ValueError(f"no service named {name!r}; services: "
                             f"{', '.join(n for n, s in self._services.items() if not s.removing) or 'none'}")
        return st

    def restart_service(self, name: str) -> int:
        """Replace every container of a service, rolling as gunicorn's HUP:
        new ones are started and the old ones retired once the new ones are
        ready (when none gets ready, the old ones keep serving).  A service
        disabled by start failures is started again.  Queued behind the
        operation in progress (``_run_ops``).  Returns how many are replaced."""
        st = self._service_state(name)
        self._queue_op(_Op("restart", st=st))
        return len(st.active())

    # ---- operations: scale, disable/enable, reload ----
    def scale(self, name: str, workers: int) -> int:
        """Set the number of containers of a service (1..4096; a dynamic
        workload: within its min..max, which its manager then keeps
        adjusting): more are started, the extra ones retired (oldest first).
        Returns the old target."""
        st = self._service_state(name)
        if type(workers) is not int or not 1 <= workers <= 4096:
            raise ValueError(f"workers must be an integer between 1 and 4096, got {workers!r}")
        low, high = st.worker_range()
        if not low <= workers <= high:
            raise ValueError(f"service {name} has a dynamic workload of {low} to {high} workers; got {workers}")
        old, st.workers = st.workers, workers
        log.info("service %s: workers %d -> %d", name, old, workers)
        self._manage(st)
        return old

    def disable(self, name: str) -> bool:
        """Stop accepting connections for a service (they are refused); its
        containers keep running (existing connections, timers, messages).
        False if it was already disabled."""
        st = self._service_state(name)
        if not st.accepting:
            return False
        st.accepting = False
        frame = wire.encode(["ctl", "disable"])
        for rec in st.records.values():
            if rec.alive and rec.conn is not None:
                rec.conn.send(frame)
        self._close_socket(st)
        log.info("service %s disabled: not accepting connections", name)
        return True

    def enable(self, name: str) -> bool:
        """Accept connections again, on the configured address (a reload
        meanwhile may have changed it), and replace the containers
        gracefully; or restart a service disabled by start failures.  False
        if it was neither."""
        st = self._service_state(name)
        changed = st.disabled
        st.disabled = False
        st.start_failures = 0
        if not st.accepting:
            if st.service.address is not None:
                self._bind(st, st.address())    # raises: nothing changed
            st.accepting = True
            changed = True
            log.info("service %s enabled: accepting connections on %s", name, st.address())
            self._queue_op(_Op("restart", st=st))   # its containers stopped accepting
        else:
            self._manage(st)
        return changed

    def reload(self, services=None) -> bool:
        """Run *services*, or (None) what ``config_source()`` returns -- called
        in a thread of its own for at most ``reload_timeout`` seconds, so that
        the loop keeps serving; without a config_source, the same services:
        services added, removed ones retired, the others' containers replaced
        gracefully, one service at a time.  False if *services* are invalid
        (logged; nothing changes) or the controller is not running; else
        True: requested (a load that fails is logged and the running
        configuration kept)."""
        if self._state != "running":
            return False
        if services is not None:
            try:
                services = _check_services(services)
            except (Exception, SystemExit, KeyboardInterrupt) as e:   # user code may sys.exit()
                log.error("reload failed: %s; the running configuration is kept", e)
                return False
        self._queue_op(_Op("reload", services=services))
        return True

    def _request_reload(self) -> asyncio.Future:
        """``reload()`` for the admin socket: a future of None once the new
        configuration is loaded and valid (it is then applied), or of the
        reason why not."""
        fut = self._loop.create_future()
        if self._state != "running":
            fut.set_result("the controller is not running")
        else:
            self._queue_op(_Op("reload")).waiters.append(fut)
        return fut

    def _queue_op(self, op: _Op) -> _Op:
        """Queue an operation; one of the same kind (and service) that has
        not started yet takes this one's place instead (HUPs coalesce)."""
        for queued in self._ops:
            if queued.kind == op.kind and queued.st is op.st:
                queued.services = op.services
                return queued
        self._ops.append(op)
        if self._op_task is None:
            self._op_task = self._loop.create_task(self._run_ops())
        return op

    async def _run_ops(self) -> None:
        """Reloads and restarts, one at a time, in order: never two
        replacements of containers interleaved."""
        op = None
        try:
            while self._ops and self._state == "running":
                op = self._ops.popleft()
                try:
                    if op.kind == "reload":
                        await self._do_reload(op)
                    elif self._services.get(op.st.service.name) is op.st and not op.st.removing:
                        op.st.restarts += await self._replace(op.st, op.st.service)
                except Exception as e:
                    log.exception("%s failed", "reload" if op.kind == "reload" else f"restart of {op.st.service.name}")
                    op.answer(f"{op.kind} failed: {e!r}")
                op = None
        finally:
            self._op_task = None
            for o in ([op] if op is not None else []) + list(self._ops):
                o.answer("the controller is shutting down")
            if self._state != "running":
                self._ops.clear()

    async def _do_reload(self, op: _Op) -> None:
        services = op.services
        if services is None and self.config_source is not None:
            log.info("reload: loading the configuration")
            services, error = await self._load()
            if error is not None:
                log.error("reload failed: %s; the running configuration is kept", error)
                op.answer(f"reload failed: {error}; the running configuration is kept")
                return
        else:
            log.info("reload: loading %s", "the given services" if services else "the same services")
            if services is None:
                services = [st.service for st in self._services.values() if not st.removing]
        op.answer(None)
        log.info("reloading: %s", ", ".join(s.name for s in services))
        new = {s.name for s in services}
        for st in [st for name, st in self._services.items() if name not in new and not st.removing]:
            await self._remove(st)
        for svc in services:
            if self._state != "running":
                return
            st = self._services.get(svc.name)
            if st is not None and st.removing:   # removed by a reload, added back by this one
                await self._wait_until(lambda: svc.name not in self._services,
                                       self.shutdown_timeout + 5.0)
                st = self._services.get(svc.name)
            if st is None:
                try:
                    self.add_service(svc)
                    log.info("reload: service %s added", svc.name)
                except Exception as e:
                    log.error("reload: service %s not added: %s", svc.name, e)
            else:
                await self._replace(st, svc)
        log.info("reload done")

    async def _load(self):
        """``config_source()`` in a thread (a module that works at import
        must not stop the loop), for at most ``reload_timeout`` seconds;
        (services, None) or (None, the reason).  A load that timed out goes
        on in its thread (a thread cannot be stopped): until it ends no
        other load starts.  The source's optional ``discard()`` undoes a
        load that is not used, ``applied(ctrl)`` is told of one that is."""
        t = self._load_thread
        if t is not None and t.is_alive():
            return None, (f"the load that did not finish within {self._load_timeout:g} s "
                          f"{time.monotonic() - self._load_timed_out:.0f} s ago is still running "
                          "(stuck in a module import?); no other load starts until it ends, and "
                          "a thread cannot be stopped: only a restart of the controller clears it")
        loop = self._loop
        fut = loop.create_future()
        source = self.config_source

        def deliver(result, error):
            if not fut.done():
                fut.set_result((result, error))

        def load_in_thread():
            try:
                result, error = list(source()), None     # a generator runs here too, not on the loop
            except BaseException as e:     # a module's sys.exit() too
                result, error = None, e
            try:
                loop.call_soon_threadsafe(deliver, result, error)
            except RuntimeError:           # the loop is closed: the controller ended
                pass
        t = threading.Thread(target=load_in_thread, name="netplex-native reload", daemon=True)
        t.start()
        try:
            result, error = await asyncio.wait_for(asyncio.shield(fut), self.reload_timeout)
        except asyncio.TimeoutError:
            self._load_thread, self._load_timeout, self._load_timed_out = t, self.reload_timeout, time.monotonic()
            self._discard_load()
            fut.add_done_callback(
                lambda f: log.warning("reload: the timed-out load finished; its result is discarded"))
            return None, f"loading the configuration did not finish within {self.reload_timeout:g} s"
        if error is None:
            try:
                services = _check_services(result)
                applied = getattr(source, "applied", None)
                if applied is not None:
                    applied(self)
                return services, None
            except (Exception, SystemExit, KeyboardInterrupt) as e:
                error = e
        self._discard_load()
        if isinstance(error, (NetplexError, ValueError, TypeError)):
            return None, str(error)
        return None, f"{type(error).__name__}: {error}"

    def _discard_load(self) -> None:
        discard = getattr(self.config_source, "discard", None)
        if discard is not None:
            _safely(discard, "discarding a configuration load")

    async def _replace(self, st: _ServiceState, svc: Service) -> int:
        """Start the containers of *svc* in place of the service's current
        ones; the old ones are retired once the new ones are ready.  When no
        new one gets ready in time, the new ones are retired and the old ones
        keep serving the old configuration, on the old address.  A new
        address is bound first (a failure changes nothing); the old one is
        closed once the old containers are retired.  Returns how many were
        replaced."""
        old_service = st.service
        old_workers = st.workers     # the running target (``scale``, TTIN/TTOU): a rollback keeps it
        if svc is not st.service:
            # the hook first: if it fails, nothing (not even the address) has changed
            try:
                svc.hooks.post_add_hook(svc, self)
            except (Exception, SystemExit, KeyboardInterrupt) as e:
                log.error("reload: service %s: post_add_hook failed: %r; its old containers keep running",
                          svc.name, e)
                return 0
            if svc.address != st.service.address and st.accepting:
                new_st = _ServiceState(svc)
                try:
                    if svc.address is not None:
                        self._bind(new_st)
                except ServiceConfigError as e:
                    log.error("reload: service %s keeps running on %s: %s", svc.name, st.address(), e)
                    return 0
                st.moved_from = (st.sock, st.bound, st.bound_for)
                st.sock, st.bound, st.bound_for = new_st.sock, new_st.bound, new_st.bound_for
            st.service = svc        # disabled: the new address is bound by ``enable``
            st.workers = svc.workers
        old = st.active()
        for rec in old:
            rec.retiring = True
        if st.restart_handle is not None:
            st.restart_handle.cancel()
            st.restart_handle = None
        st.disabled = False
        st.start_failures = st.crash_streak = st.spawn_errors = 0
        st.replacing = bool(old)
        try:
            self._manage(st)
            # ready: at least one new container, and every new one (an empty set of
            # new containers -- all died, a restart pending -- is not ready)
            limit = self.startup_timeout + 1.0 if self.startup_timeout else max(self.shutdown_timeout, 10.0)
            await self._wait_until(lambda: st.disabled or self._state != "running"
                                   or (st.active() and all(r.ready for r in st.active())), limit)
        finally:
            st.replacing = False
        if self._state == "running" and old and (
                st.disabled or not any(r.ready for r in st.active())):
            # The new containers did not start: the old ones keep serving (no
            # outage), with the old configuration; the failed ones are retired.
            log.error("reload: the new containers of service %s did not start; its old "
                      "containers keep serving the previous configuration", svc.name)
            if st.restart_handle is not None:
                st.restart_handle.cancel()
                st.restart_handle = None
            for rec in st.active():
                self._retire(rec)
            for rec in old:
                rec.retiring = False
            if st.moved_from is not None:
                self._close_listening(st.sock, st.bound)
                st.sock, st.bound, st.bound_for = st.moved_from
                st.moved_from = None
            st.service = old_service
            st.workers = old_workers
            st.disabled = False
            st.start_failures = st.crash_streak = st.spawn_errors = 0
            return 0
        for rec in old:
            if rec.pid in self._by_pid:
                self._retire(rec)
        if st.moved_from is not None:   # the old containers keep their copy until they end
            self._close_listening(*st.moved_from[:2])
            st.moved_from = None
        await self._wait_until(lambda: not any(r.pid in self._by_pid for r in old),
                               self.shutdown_timeout + 3.0)
        log.info("service %s: %d container(s) replaced", svc.name, len(old))
        return len(old)

    async def _remove(self, st: _ServiceState) -> None:
        """Retire every container of a service; once they are gone the
        service is removed (``_finish_removal``)."""
        name = st.service.name
        log.info("reload: removing service %s", name)
        st.removing = True
        if st.restart_handle is not None:
            st.restart_handle.cancel()
            st.restart_handle = None
        self._close_socket(st)        # new connections refused at once
        for rec in list(st.records.values()):
            self._retire(rec)
        if not st.records:
            self._finish_removal(st)
        await self._wait_until(lambda: self._services.get(name) is not st, self.shutdown_timeout + 5.0)

    def _finish_removal(self, st: _ServiceState) -> None:
        name = st.service.name
        if self._services.get(name) is st:
            del self._services[name]
        _safely(lambda: st.service.hooks.post_rm_hook(st.service, self), "post_rm_hook")
        log.info("service %s removed", name)

    def _retire(self, rec: _ContainerRecord) -> None:
        """Ask a container to finish the connections it serves (for up to
        ``shutdown_timeout``) and end; SIGTERM 1 s after that, SIGKILL 2 s
        later.  It is not restarted."""
        rec.retiring = True
        if rec.kill_handle is not None:
            return
        if rec.alive and rec.conn is not None:
            rec.conn.send(wire.encode(["ctl", "shutdown", self.shutdown_timeout]))
            self._stopping(rec)

        def escalate(sig=signal.SIGTERM):
            rec.kill_handle = None
            if self._by_pid.get(rec.pid) is not rec:
                return
            log.warning("container %s (pid %d) did not finish; sending %s", rec.id, rec.pid, sig.name)
            try:
                os.kill(rec.pid, sig)
            except ProcessLookupError:
                return
            if sig == signal.SIGTERM:
                rec.kill_handle = self._loop.call_later(2.0, escalate, signal.SIGKILL)
        rec.kill_handle = self._loop.call_later(self.shutdown_timeout + 1.0, escalate)

    def set_log_level(self, level: str) -> None:
        """Change the logging level (``debug`` ... ``critical``) of the
        controller and of every running container (new ones inherit it)."""
        value = logging.getLevelName(str(level).upper())
        if type(value) is not int:
            raise ValueError(f"unknown log level {level!r}")
        logging.getLogger().setLevel(value)
        logging.getLogger("netplex_native").setLevel(value)
        frame = wire.encode(["ctl", "log_level", value])
        for rec in self._records():
            if rec.alive and rec.conn is not None:
                rec.conn.send(frame)
        log.warning("log level set to %s", logging.getLevelName(value))

    def reopen_logs(self) -> int:
        """Reopen every log file of the logging module, here and in every
        container (after a rotation: SIGUSR1).  Returns how many here."""
        n = reopen_log_files()
        frame = wire.encode(["ctl", "reopen_logs"])
        for rec in self._records():
            if rec.alive and rec.conn is not None:
                rec.conn.send(frame)
        log.info("log files reopened (%d)", n)
        return n

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if sig == signal.SIGTERM:
            log.info("%s: graceful shutdown", name)
            self.shutdown()
        elif sig in (signal.SIGINT, signal.SIGQUIT):
            log.info("%s: quick shutdown", name)
            self._quick = True
            self.shutdown()
        elif sig == signal.SIGHUP:
            log.info("SIGHUP: reload")
            self.reload()
        elif sig in (signal.SIGTTIN, signal.SIGTTOU):
            # gunicorn's TTIN/TTOU, for one application; here every service
            # (``admin scale`` is the verb for one service)
            if self._state != "running":
                return
            step = 1 if sig == signal.SIGTTIN else -1
            for st in list(self._services.values()):
                if st.removing:
                    continue
                low, high = st.worker_range()
                if low <= st.workers + step <= high:
                    self.scale(st.service.name, st.workers + step)
                else:
                    dyn = (f" (dynamic workload: {low} to {high})" if st.service.max_workers is not None
                           else "")
                    log.warning("%s: service %s stays at %d workers%s", name, st.service.name, st.workers, dyn)
        elif sig == signal.SIGUSR1:
            self.reopen_logs()
        else:
            log.warning("%s ignored", name)

    # ---- messages ----
    def send_message(self, pattern: str, name: str, args=()) -> int:
        """Broadcast to ``receive_message`` of every container whose service
        name matches *pattern* (``*`` wildcard, whole name).  Returns the count."""
        pattern, name, args = check_message(pattern, name, args)
        return self._broadcast("m", pattern, name, args)

    def send_admin_message(self, pattern: str, name: str, args=()) -> int:
        """As ``send_message``, to ``receive_admin_message``; ValueError when
        the pattern matches no service."""
        pattern, name, args = check_message(pattern, name, args)
        if not any(_match(pattern, n) for n, st in self._services.items() if not st.removing):
            raise ValueError(f"no service matches {pattern!r}; services: "
                             f"{', '.join(self._services) or 'none'}")
        return self._broadcast("a", pattern, name, args)

    def _broadcast(self, kind: str, pattern: str, name: str, args: list) -> int:
        """Send one frame (encoded once, shared by every queue) to the
        matching containers; the count of those it was queued for (a
        receiver over the output limits misses it: counted, logged)."""
        frame = wire.encode([kind, name, args])   # too large / not encodable: raises, nothing sent
        n = 0
        for st in self._services.values():
            if not _match(pattern, st.service.name):
                continue
            for rec in st.records.values():
                if rec.alive and rec.conn is not None and rec.conn.offer_message(frame):
                    n += 1
        return n

    # ---- running ----
    def run(self) -> None:
        """Run until shutdown (SIGTERM, SIGINT, ``shutdown()``, or
        ``cenv.system_shutdown()`` in a container).  A failed start-up
        removes what it made (socket directory, admin socket, segment) and
        raises; SIGINT/SIGTERM during start-up wait until it is done, then
        shut down in order."""
        if self._state != "new":
            raise NetplexError(f"controller already {self._state}")
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(HANDLED_SIGNALS))
        try:
            self._selector = HotSelector()
            loop = asyncio.SelectorEventLoop(self._selector)
            self._selector.bind(loop)
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            self._abort_startup()
            raise
        self._loop = loop
        ctx.reset()
        ctx.role = "controller"
        ctx.controller = self
        self._install_backends("controller")
        try:
            loop.run_until_complete(self._main(old_mask))
        except BaseException:
            if self._state != "stopped":
                self._emergency_stop()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                self._loop = None

    def shutdown(self) -> None:
        """Begin an orderly shutdown (idempotent; safe from hooks, signal
        handlers and any other thread: from another thread it is handed to
        the controller's loop)."""
        loop = self._loop
        if loop is not None and self._state == "running":
            try:
                on_loop = asyncio.get_running_loop() is loop
            except RuntimeError:
                on_loop = False
            if not on_loop:
                try:
                    loop.call_soon_threadsafe(self.shutdown)
                except RuntimeError:
                    pass                    # the loop closed meanwhile: stopped already
                return
        if self._state == "new":
            self._state = "stopped"
            return
        if self._state != "running" or self._loop is None:
            return
        self._state = "stopping"
        self._shutdown_task = self._loop.create_task(self._shutdown())

    async def _main(self, old_mask) -> None:
        loop = self._loop
        self._done = loop.create_future()
        self._reaped_event = asyncio.Event()
        from .admin import AdminServer
        try:
            self._prepare_socket_dir()
            for st in self._services.values():
                self._bind(st)
            admin = AdminServer(self, os.path.join(self._socket_dir, ADMIN_SOCKET),
                                idle_timeout=self.admin_idle_timeout)
            await admin.start()
            self._admin = admin
            loop.add_signal_handler(signal.SIGCHLD, self._on_sigchld)
            for sig in HANDLED_SIGNALS:
                loop.add_signal_handler(sig, self._on_signal, sig)
            self._state = "running"
        except BaseException:
            self._abort_startup()
            raise
        finally:
            # a signal that came meanwhile is delivered now, to _on_signal
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        for plugin in self._plugins:
            _safely(lambda: plugin.ctrl_started(self), f"{plugin.name}: started")
        set_title(f"controller {self.name}")
        where = f"controller {self.name} started (pid {os.getpid()}, socket dir {self._socket_dir})"
        if log.isEnabledFor(logging.INFO):
            log.info("%s", where)
        else:                       # the operator must learn where to find it
            print(f"netplex-native: {where}", file=sys.stderr, flush=True)
        for st in self._services.values():
            self._manage(st)
        await self._done
        for sig in (signal.SIGCHLD,) + HANDLED_SIGNALS:
            loop.remove_signal_handler(sig)

    def _at_exit(self) -> None:
        """The program ends without having run this controller (Ctrl-C
        before run(), an exception): remove what its plugins made (the
        native segment)."""
        if os.getpid() == self.pid and self._state == "new":
            self._state = "stopped"
            self._unplug_all()

    def _abort_startup(self) -> None:
        """Start-up failed before any container was forked: remove what was made."""
        self._state = "stopped"
        self._close_sockets()
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self._own_socket_dir:  # a given dir may hold another controller's admin.sock
            self._remove_socket_dir()
        self._unplug_all()

    def _emergency_stop(self) -> None:
        """The loop failed while running (a bug): kill and reap the
        containers, then remove everything, so nothing is left behind."""
        log.error("controller loop failed; killing %d containers", len(self._by_pid))
        for pid in list(self._by_pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid, rec in list(self._by_pid.items()):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            for plugin in self._plugins:
                _safely(lambda: plugin.ctrl_container_reaped(self, rec), f"{plugin.name}: container_reaped")
        self._by_pid.clear()
        self._abort_startup()

    def _prepare_socket_dir(self) -> None:
        if self._socket_dir_arg is None:
            base = runtime_dir()
            d = os.path.join(base, self.name)
            for attempt in range(10):   # another controller may remove an empty base meanwhile
                _private_dir(base, parents=False)
                if _admin_socket_live(d):
                    raise ServiceConfigError(f"a controller named {self.name!r} is already running "
                                             f"(socket directory {d}); give this one another name")
                try:
                    _private_dir(d, parents=False)
                    break
                except FileNotFoundError:
                    if attempt == 9:
                        raise
            self._own_socket_dir = True
        else:
            d = os.path.abspath(self._socket_dir_arg)
            try:
                _private_dir(d)
            except OSError as e:        # /proc/x, a file in the way, no permission: one line
                raise ServiceConfigError(f"socket_dir: cannot create {d}: {e.strerror or e}") from None
        self._socket_dir = d

    def _bind(self, st: _ServiceState, addr=None) -> None:
        addr = addr or st.service.address
        if addr is None or st.sock is not None:
            return
        try:
            st.sock = bind(addr)
        except OSError as e:
            raise ServiceConfigError(f"service {st.service.name!r}: cannot listen on {addr}: {e.strerror or e}") from e
        st.bound = bound_address(addr, st.sock)
        st.bound_for = st.service.address
        log.info("service %s listening on %s", st.service.name, st.bound)

    # ---- workload ----
    def _manage(self, st: _ServiceState) -> None:
        """Keep ``st.workers`` containers that are not retiring: start the
        missing ones, retire the extra ones (oldest first, as gunicorn)."""
        if self._state != "running" or st.removing:
            return
        active = st.active()
        extra = len(active) - st.workers
        if extra > 0:
            for rec in sorted(active, key=lambda r: r.started_mono)[:extra]:
                self._retire(rec)
            return
        if st.disabled or st.restart_handle is not None:
            return
        while len(st.active()) < st.workers:
            if not self._spawn(st):
                break

    #: Seconds the free capacity of a dynamic service must stay above its
    #: max_free_connections before an idle container is retired.
    SHRINK_AFTER = 1.0

    def _adjust(self, st: _ServiceState) -> None:
        """Dynamic workload: one container more when fewer than
        min_free_connections are free; one idle container less when more than
        max_free_connections have been free for SHRINK_AFTER seconds."""
        svc = st.service
        if (svc.max_workers is None or self._state != "running" or st.removing or st.disabled
                or not st.accepting):
            return
        active = st.active()
        free = svc.connections_per_container * len(active) - sum(r.load for r in active)
        if free < svc.min_free_connections and st.workers < svc.max_workers and len(active) >= st.workers:
            st.workers += 1
            log.info("service %s: %d connections free; workers -> %d", svc.name, free, st.workers)
            self._manage(st)
        elif free > svc.max_free_connections and st.workers > svc.workers:
            if st.shrink_handle is None:
                st.shrink_handle = self._loop.call_later(self.SHRINK_AFTER, self._shrink, st)
        elif st.shrink_handle is not None:
            st.shrink_handle.cancel()
            st.shrink_handle = None

    def _shrink(self, st: _ServiceState) -> None:
        st.shrink_handle = None
        svc = st.service
        if self._services.get(svc.name) is not st or self._state != "running" or svc.max_workers is None:
            return
        active = st.active()
        free = svc.connections_per_container * len(active) - sum(r.load for r in active)
        idle = [r for r in active if r.load == 0 and r.ready]
        if free > svc.max_free_connections and st.workers > svc.workers and idle:
            st.workers -= 1
            log.info("service %s: %d connections free; workers -> %d", svc.name, free, st.workers)
            self._retire(max(idle, key=lambda r: r.started_mono))
        self._adjust(st)

    def _spawn(self, st: _ServiceState) -> bool:
        service = st.service
        st.seq += 1
        cid = f"{service.name}.{st.seq}"
        try:
            service.hooks.pre_start_hook(service, self, cid)
        except Exception as e:
            log.error("service %s: pre_start_hook failed: %r", service.name, e)
            self._start_failed(st)
            self._schedule_restart(st)  # retry with back-off (or stay disabled)
            return False
        rec = _ContainerRecord(cid, service)
        for h in logging.getLogger().handlers + log.handlers:
            try:
                h.flush()
            except Exception:
                pass
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        parent_sock = child_sock = None
        try:
            parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            pid = os.fork()
        except OSError as e:
            # EMFILE, ENFILE, EAGAIN, ENOMEM: the system's trouble, not the
            # service's; retried with back-off, never counted toward disabling
            for s_ in (parent_sock, child_sock):
                if s_ is not None:
                    s_.close()
            st.spawn_errors += 1
            log.error("service %s: cannot start container %s: %s; retrying", service.name, cid, e)
            self._schedule_restart(st)
            return False
        if pid == 0:  # the container; never returns
            code = 70
            try:
                parent_sock.close()
                self._close_in_child(st)
                code = run_container(self, service, cid, child_sock, st.sock)
            except BaseException:
                try:
                    log.exception("container %s failed to start", cid)
                except BaseException:
                    pass
            finally:
                os._exit(code)
        child_sock.close()
        st.spawn_errors = 0
        rec.pid = pid
        rec.container = Container(cid, pid, service.name)
        rec.conn = _Conn(self, rec, parent_sock)
        st.records[cid] = rec
        self._by_pid[pid] = rec
        log.info("container %s (pid %d) started", cid, pid)
        if self.startup_timeout is not None:
            rec.start_handle = self._loop.call_later(self.startup_timeout, self._too_slow, rec)
        return True

    def _too_slow(self, rec: _ContainerRecord) -> None:
        """startup_timeout: a container not ready in time is killed (a start failure)."""
        rec.start_handle = None
        if rec.ready or self._by_pid.get(rec.pid) is not rec:
            return
        log.error("container %s (pid %d) not ready within %g s (startup_timeout); killing it",
                  rec.id, rec.pid, self.startup_timeout)
        try:
            os.kill(rec.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _close_in_child(self, st: _ServiceState) -> None:
        """In a fresh container: drop what belongs to the controller (through
        the owning objects, so no fd number is ever closed twice)."""
        for other in self._services.values():
            for rec in other.records.values():
                if rec.conn is not None:
                    rec.conn.sock.close()
            if other is not st and other.sock is not None:
                other.sock.close()
            if other.moved_from is not None and other.moved_from[0] is not None:
                other.moved_from[0].close()     # an address being left: never a child's
        if self._admin is not None:
            self._admin.close_in_child()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD,) + HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for sig in (signal.SIGINT, signal.SIGQUIT):   # Ctrl-C, Ctrl-\ are the controller's to handle
            signal.signal(sig, signal.SIG_IGN)
        for attr in ("_ssock", "_csock"):  # the parent loop's self-pipe
            s = getattr(self._loop, attr, None)
            if s is not None:
                s.close()
        if self._selector is not None:
            self._selector.close()
        asyncio.events._set_running_loop(None)

    def _start_failed(self, st: _ServiceState) -> None:
        st.start_failures += 1
        if st.start_failures >= self.max_start_failures:
            st.disabled = True      # no more starts; a replacement then rolls back (_replace)
            if st.replacing:
                log.error("service %s: its new containers failed %d consecutive starts; no more are "
                          "started and the old containers keep serving", st.service.name, st.start_failures)
            else:
                log.error("service %s disabled after %d consecutive start failures",
                          st.service.name, st.start_failures)

    def _schedule_restart(self, st: _ServiceState) -> None:
        if st.disabled or self._state != "running":
            return
        failures = max(st.start_failures, st.crash_streak, st.spawn_errors)
        if failures == 0:
            self._manage(st)
            return
        if st.restart_handle is not None:
            return
        base, cap = self.backoff
        delay = min(cap, base * 2.0 ** min(failures - 1, 30))
        what = ("failed forks" if st.spawn_errors == failures else
                "start failures" if st.start_failures == failures else "quick crashes")
        log.warning("service %s: %d consecutive %s; next start in %.2f s", st.service.name, failures, what, delay)

        def fire():
            st.restart_handle = None
            self._manage(st)
        st.restart_handle = self._loop.call_later(delay, fire)

    # ---- calls from containers ----
    def _on_call(self, rec: _ContainerRecord, obj, blob) -> None:
        if not (type(obj) is list and len(obj) == 3 and type(obj[0]) is int
                and type(obj[1]) is str and type(obj[2]) is list):   # the decoder makes exact types
            log.warning("container %s (pid %d) sent a malformed call: %.200r", rec.id, rec.pid, obj)
            if isinstance(obj, list) and obj and type(obj[0]) is int and obj[0] > 0:
                _Reply(rec, obj[0]).error(ProtocolError("malformed call: expected [id, proc, args]"))
            return
        rid, proc, args = obj
        reply = _Reply(rec, rid)
        prefix, _, sub = proc.partition(".")
        try:
            if prefix == "ctl":
                self._ctl_call(rec, sub, args, reply)
            else:
                plugin = self._routes.get(prefix)
                if plugin is None:
                    raise PluginNotAddedError(f"no plugin serves {proc!r}; was it added in post_add_hook?")
                plugin.ctrl_receive_call(self, rec, sub, args, blob, reply)
        except (TypeError, ValueError, OverflowError, NetplexError) as e:
            reply.error(e)
        except Exception as e:  # a plugin bug must not take the controller down
            log.exception("error serving %s for container %s", proc, rec.id)
            reply.error(e)
        if not reply.done:
            reply.deferred = True
            if (rid <= 0 or self._state == "stopping" or not rec.alive
                    or (rec.waits_ended and reply.on_cancel is not None)):
                reply.end_wait()   # nobody would read the answer; no new waits once shutdown began
            else:
                rec.pending[rid] = reply

    def _ctl_call(self, rec, proc: str, args: list, reply: _Reply) -> None:
        if proc == "ack":
            for rid in args:
                rec.unacked.pop(rid, None)
        elif proc == "cancel":
            for rid in args:
                pending = rec.pending.get(rid)
                if pending is not None:
                    if pending.on_cancel is not None:
                        pending.on_cancel()
                    pending.error(NetplexError("cancelled"))
        elif proc == "ready":
            if rec.start_handle is not None:
                rec.start_handle.cancel()
                rec.start_handle = None
            rec.ready = True
            rec.ready_mono = time.monotonic()
            self._services[rec.service.name].start_failures = 0
        elif proc == "load":
            if args and type(args[0]) is int and args[0] >= 0:
                rec.load = args[0]
                self._adjust(self._services[rec.service.name])
        elif proc == "recycle":    # max_connections: it ends once idle; a new one starts now
            if not rec.retiring:
                rec.retiring = True
                self._manage(self._services[rec.service.name])
        elif proc == "send_message":
            pattern, name, margs = check_message(*args)
            reply.ok(self.send_message(pattern, name, margs))
        elif proc == "system_shutdown":
            log.info("container %s (pid %d) asked for system shutdown", rec.id, rec.pid)
            self.shutdown()
        elif proc == "stopping":   # its regular end served its connections: end its waits
            self._end_waits(rec)
            self._stopping(rec)
        elif proc == "system_shutdown_done":
            rec.system_shutdown_done = True
            self._reaped_event.set()
        else:
            raise ValueError(f"unknown control call {proc!r}")
        reply.ok(None)

    # ---- a container's end ----
    def _on_sigchld(self) -> None:
        for pid in list(self._by_pid):
            try:
                wpid, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                wpid, status = pid, 0
            if wpid == pid:
                try:
                    self._container_died(self._by_pid[pid], status)
                except Exception:  # never let one child's end stop the reaping
                    log.exception("handling the end of pid %d failed", pid)

    def _container_died(self, rec: _ContainerRecord, status: int) -> None:
        st = self._services[rec.service.name]
        del self._by_pid[rec.pid]
        del st.records[rec.id]
        for h in (rec.kill_handle, rec.start_handle):
            if h is not None:
                h.cancel()
        rec.kill_handle = rec.start_handle = None
        if rec.conn is not None:
            _safely(rec.conn.drain_dead, "serving a dead container's last notifications")
            rec.alive = False
            rec.conn.close()
        rec.alive = False
        if os.WIFSIGNALED(status):
            how = f"killed by signal {os.WTERMSIG(status)}"
            clean = False
        else:
            code = os.WEXITSTATUS(status)
            how = f"exited with code {code}"
            clean = code == 0
        (log.info if clean else log.warning)("container %s (pid %d) %s", rec.id, rec.pid, how)
        # 1. grants it never acknowledged go back
        for undo in rec.unacked.values():
            _safely(undo, "undo of an unacknowledged grant")
        rec.unacked.clear()
        for reply in list(rec.pending.values()):
            if reply.on_cancel is not None:
                _safely(reply.on_cancel, "cancel of a dead container's wait")
            reply.done = True
        rec.pending.clear()
        # 2. plugins give back what it held (native recover(pid), RPC revert)
        for plugin in self._plugins:
            _safely(lambda: plugin.ctrl_container_reaped(self, rec), f"{plugin.name}: container_reaped")
        # 3. the hook
        _safely(lambda: rec.service.hooks.post_finish_hook(rec.service, self, rec.id), "post_finish_hook")
        # 4. plugins learn it finished
        is_last = not st.records
        for plugin in self._plugins:
            _safely(lambda: plugin.ctrl_container_finished(self, rec.id, is_last),
                    f"{plugin.name}: container_finished")
        # 5. restart, or finish a removal or the shutdown
        if st.removing:
            if not st.records:
                self._finish_removal(st)
        elif self._state == "running":
            if rec.retiring:        # replaced, scaled down: neither a failure nor restarted
                self._manage(st)
            else:
                if not rec.ready:
                    self._start_failed(st)
                elif not clean and time.monotonic() - rec.ready_mono < CRASH_LOOP_WINDOW:
                    st.crash_streak += 1
                else:
                    st.crash_streak = 0
                st.restarts += 1
                self._schedule_restart(st)
        self._reaped_event.set()

    # ---- shutdown ----
    async def _shutdown(self) -> None:
        log.info("shutting down%s", " (quick)" if self._quick else "")
        if self._op_task is not None:
            self._op_task.cancel()
        for st in self._services.values():
            if st.restart_handle is not None:
                st.restart_handle.cancel()
                st.restart_handle = None
        for rec in self._records():
            if rec.kill_handle is not None:
                rec.kill_handle.cancel()
                rec.kill_handle = None
        # 0. waits end: answered as timeouts, so no container stays blocked
        for rec in list(self._records()):
            for reply in list(rec.pending.values()):
                reply.end_wait()
        # 1. every container learns the system goes down, while all are still up
        self._broadcast_ctl("system_shutdown")
        for rec in list(self._records()):
            if rec.alive and rec.conn is not None:
                self._stopping(rec)
        await self._wait_until(lambda: all(r.system_shutdown_done or not r.alive for r in self._records()),
                               min(0.5 if self._quick else 2.0, self.shutdown_timeout))
        # 2. then each is asked to finish (shutdown hook, pre_finish_hook, exit)
        self._broadcast_ctl("shutdown", 0 if self._quick else self.shutdown_timeout)
        await self._wait_until(lambda: not self._by_pid,
                               min(1.0, self.shutdown_timeout) if self._quick else self.shutdown_timeout + 1.0)
        for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            if not self._by_pid:
                break
            for pid, rec in list(self._by_pid.items()):
                log.warning("container %s (pid %d) did not finish; sending %s", rec.id, pid, sig.name)
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            await self._wait_until(lambda: not self._by_pid, grace)
        # 3. services go, then plugins, then files
        for st in self._services.values():
            _safely(lambda: st.service.hooks.post_rm_hook(st.service, self), "post_rm_hook")
        self._close_sockets()
        if self._admin is not None:
            self._admin.close()
        self._unplug_all()
        self._remove_socket_dir()
        self._state = "stopped"
        log.info("controller stopped")
        if not self._done.done():
            self._done.set_result(None)

    def _records(self):
        for st in self._services.values():
            yield from st.records.values()

    def _broadcast_ctl(self, what: str, *args) -> None:
        frame = wire.encode(["ctl", what, *args])
        for rec in self._records():
            if rec.alive and rec.conn is not None:
                rec.conn.send(frame)

    def _end_waits(self, rec: _ContainerRecord) -> None:
        """rec's regular end has served its connections (``ctl.stopping``,
        sent before its pre_finish_hook): the RPC waits it has queued here
        are answered as timeouts now, and new ones at once -- what a system
        shutdown does for every container."""
        rec.waits_ended = True
        for reply in list(rec.pending.values()):
            if reply.on_cancel is not None:     # a wait (not a call still being served)
                reply.end_wait()

    def _stopping(self, rec: _ContainerRecord) -> None:
        """rec was asked to stop, or its waits end: plugins wake its
        blocking waits (each looks at its interrupt_check again)."""
        for plugin in self._plugins:
            _safely(lambda: plugin.ctrl_container_stopping(self, rec), f"{plugin.name}: container_stopping")

    async def _wait_until(self, cond, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._reaped_event.clear()
            try:
                await asyncio.wait_for(self._reaped_event.wait(), min(remaining, 0.1))
            except asyncio.TimeoutError:
                pass
            self._on_sigchld()  # a SIGCHLD may have been coalesced
        return True

    def _close_sockets(self) -> None:
        for st in self._services.values():
            self._close_socket(st)

    def _close_socket(self, st: _ServiceState) -> None:
        """The controller's copy of a service's listening socket (a unix
        socket file removed); containers keep theirs until they end."""
        if st.sock is not None:
            self._close_listening(st.sock, st.bound)
            st.sock = None
        if st.moved_from is not None:
            self._close_listening(*st.moved_from[:2])
            st.moved_from = None

    @staticmethod
    def _close_listening(sock, addr) -> None:
        if sock is None:
            return
        sock.close()
        if addr is not None and addr.scheme == "unix":
            try:
                os.unlink(addr.path)
            except FileNotFoundError:
                pass

    def _unplug_all(self) -> None:
        for plugin in reversed(self._plugins):
            _safely(lambda: plugin.ctrl_unplugged(self), f"{plugin.name}: unplugged")

    def _remove_socket_dir(self) -> None:
        d = self._socket_dir        # its admin.sock was removed by AdminServer.close
        if not d:
            return
        if self._own_socket_dir:
            try:
                os.rmdir(d)
            except OSError as e:
                log.warning("could not remove socket directory %s: %s", d, e)
            if self._socket_dir_arg is None:
                try:
                    os.rmdir(os.path.dirname(d))    # the shared base, when no one else uses it
                except OSError:
                    pass


def runtime_dir() -> str:
    """The one rule, shared by ``Controller()`` and the CLI, for where
    socket directories live: ``$XDG_RUNTIME_DIR/netplex-native``, else
    ``/run/user/UID/netplex-native``, else ``netplex-native-UID`` in the
    temporary directory.  A controller's own directory is NAME below it."""
    uid = os.getuid()
    for base in (os.environ.get("XDG_RUNTIME_DIR"), f"/run/user/{uid}"):
        if base and os.path.isabs(base):
            try:
                st = os.stat(base)
            except OSError:
                continue
            if st.st_uid == uid and os.path.isdir(base):
                return os.path.join(base, "netplex-native")
    return os.path.join(tempfile.gettempdir(), f"netplex-native-{uid}")


def default_socket_dir(name: str) -> str:
    """The socket directory of the controller named *name*."""
    return os.path.join(runtime_dir(), name)


def check_controller_name(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"controller name must be a str, not {type(name).__name__}")
    if (not name or name.startswith(".") or "/" in name or len(name) > 64
            or any(not c.isprintable() for c in name)):
        raise ValueError(f"controller name must be 1..64 characters, no '/' or control character, "
                         f"not starting with '.': {name!r}")
    return name


def _private_dir(d: str, parents: bool = True) -> None:
    """Create *d* (0700) or check that an existing one is ours; made private.
    Without *parents*, FileNotFoundError if its parent is missing."""
    if parents:
        os.makedirs(d, mode=0o700, exist_ok=True)
    else:
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
    st = os.stat(d)
    if st.st_uid != os.getuid():
        raise ServiceConfigError(f"socket directory {d} belongs to uid {st.st_uid}, not to us")
    if st.st_mode & 0o077:
        os.chmod(d, 0o700)


def _admin_socket_live(d: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(os.path.join(d, ADMIN_SOCKET))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _match(pattern: str, name: str) -> bool:
    """``*`` matches any run of characters; the whole name must match."""
    if pattern == "*":
        return True
    parts = pattern.split("*")
    if len(parts) == 1:
        return pattern == name
    if not name.startswith(parts[0]) or not name.endswith(parts[-1]):
        return False
    pos = len(parts[0])
    end = len(name) - len(parts[-1])
    if end < pos:
        return False
    for part in parts[1:-1]:
        i = name.find(part, pos, end)
        if i < 0:
            return False
        pos = i + len(part)
    return True


def _check_services(services) -> list:
    """A reload's services: a non-empty list of Service with unique names."""
    services = list(services)
    names = set()
    for s in services:
        if not isinstance(s, Service):
            raise TypeError(f"expected Service objects, got {type(s).__name__}")
        if s.name in names:
            raise ValueError(f"duplicate service name {s.name!r}")
        names.add(s.name)
    if not services:
        raise ValueError("no services")
    return services


def _safely(fn, what: str) -> None:
    """Run a hook or plugin callback; an exception is logged, never fatal."""
    try:
        fn()
    except Exception:
        log.exception("%s failed", what)
