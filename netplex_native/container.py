"""A container: one worker process of a service.  Everything here after
``run_container`` runs in the container process, on its own asyncio loop:
the service's handler for each accepted connection, timers, messages from the
controller, and the container's hooks.

A ``post_start_hook`` that raises is a failed start (gunicorn's "failed to
boot"): the container exits with BOOT_FAILED without ever being ready, and
the controller counts it toward disabling the service.

Serving: the container accepts on the inherited listening socket itself
(``_on_acceptable``) and counts a connection when it accepts it: the moment
it reaches its ``max_connections`` it stops accepting, so it never takes
more; every connection it accepted gets a handler task at once (in
``handlers``), so none is dropped unserved by a regular end.

Its end:
- regular (the controller asked, or a hook returned False from
  ``global_exception_handler``): stop accepting, let handlers finish (the
  grace the controller sends: its shutdown_timeout, 0 for a quick stop,
  which closes every connection at once), ``pre_finish_hook``, exit 0;
- the controller died (channel EOF, or SIGTERM from the parent-death signal):
  exit at once, within 2 s at the latest (a hard alarm backs it up);
- SIGTERM while the loop's thread is in a synchronous call (the loop cannot
  run): killed by that SIGTERM at once.
A regular end's connections are served as usual (their waits too); once
they are done, before ``pre_finish_hook``, every blocking wait of the
container still running or begun later, in any thread, ends as a timeout
would (``end_waits``), so that the hook can join a thread blocked in one.
A system shutdown ends them at its start (``system_shutdown``).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import selectors
import signal
import sys
import threading
from collections.abc import Sequence

from ._context import ctx
from .channel import Channel, configure_reply_poll
from .errors import check_message, ControllerGoneError
from .logs import get_logger, reopen_log_files, set_title

log = get_logger("netplex_native.container")

#: Seconds a regular end waits for running handlers before cancelling them
#: (a retiring container, replaced or not needed any more, is told its own:
#: the controller's shutdown_timeout).
HANDLER_GRACE = 3.0
#: Hard limit for an exit forced by the controller's death or SIGTERM.
HARD_EXIT_AFTER = 1.5
#: Most connections accepted per readiness of the listening socket (the
#: others are left to the service's other containers).
ACCEPT_BATCH = 16
#: Seconds before accepting again after accept() failed for lack of
#: resources (EMFILE, ENFILE, ENOBUFS, ENOMEM).
ACCEPT_RETRY_DELAY = 1.0

_PR_SET_PDEATHSIG = 1
#: Exit code of a container whose post_start_hook raised (gunicorn's WORKER_BOOT_ERROR).
BOOT_FAILED = 3


class Container:
    """A container as hooks see it: ``id``, ``pid``, ``service_name``."""

    def __init__(self, cid: str, pid: int, service_name: str) -> None:
        self.id = cid
        self.pid = pid
        self.service_name = service_name

    def send_message(self, pattern: str, name: str, args: Sequence[str] = ()) -> None:
        """Broadcast to ``receive_message`` of the containers of the services
        matching *pattern* (this one included when it matches)."""
        pattern, name, args = check_message(pattern, name, args)
        if ctx.role == "container" and ctx.container is self:
            ctx.channel.notify("ctl.send_message", [pattern, name, args])
        elif ctx.role == "controller" and ctx.controller is not None:
            ctx.controller.send_message(pattern, name, args)
        else:
            from .errors import NotInContainerError
            raise NotInContainerError("send_message needs a running controller or container")

    def __repr__(self) -> str:
        return f"<Container {self.id} pid={self.pid} service={self.service_name}>"


class Timer:
    """A timer of ``cenv.create_timer``; ``id`` is unique in its container."""

    _next_id = 0

    def __init__(self, rt, callback, interval: float):
        Timer._next_id += 1
        self.id = Timer._next_id
        self.callback = callback
        self.interval = interval
        self.active = True
        self._rt = rt
        self._handle = None
        self._task = None

    def _arm(self) -> None:
        self._handle = self._rt.loop.call_later(self.interval, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if not self.active:
            return
        try:
            r = self.callback(self)
        except Exception as e:
            self._stop()
            self._rt.exception(e)
            return
        if asyncio.iscoroutine(r):
            self._task = self._rt.loop.create_task(r)
            self._task.add_done_callback(self._done)
        else:
            self._rearm_if(r)

    def _done(self, task) -> None:
        self._task = None
        if task.cancelled():
            self._stop()
            return
        exc = task.exception()
        if exc is not None:
            self._stop()
            self._rt.exception(exc)
            return
        self._rearm_if(task.result())

    def _rearm_if(self, again) -> None:
        if again is True and self.active:
            self._arm()
        else:
            self._stop()

    def _stop(self) -> None:
        self.active = False
        self._rt.timers.pop(self.id, None)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._task is not None:
            self._task.cancel()
        self._stop()

    def __repr__(self) -> str:
        return f"<Timer {self.id} every {self.interval}s{'' if self.active else ' (stopped)'}>"


class _Runtime:
    """The container process's state."""

    def __init__(self, ctrl, service, cont: Container, channel: Channel, listen_sock):
        self.ctrl = ctrl
        self.service = service
        self.hooks = service.hooks
        self.cont = cont
        self.channel = channel
        self.listen_sock = listen_sock
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timers: dict[int, Timer] = {}
        self.handlers: set[asyncio.Task] = set()   # one per accepted connection, from its accept
        self.listening = False      # the listening socket is in the loop's selector
        self._unstarted: set = set()    # accepted sockets whose task has not run yet
        self.stop_reason: asyncio.Future | None = None
        self.stopping = False       # system_shutdown handled, or end_waits: waits end
        self.domain = None          # the native Domain, if any (end_waits stops its waits)
        self.shutdown_seen = False
        self.grace = HANDLER_GRACE
        self.accepting = True       # False once the controller disabled the service
        self.connections = 0        # accepted so far
        self.report_load = service.max_workers is not None   # dynamic workload: tell the controller
        self.max_connections = None
        if service.max_connections is not None:
            import secrets          # not random: its state is the same in every forked container
            self.max_connections = service.max_connections + secrets.randbelow(
                service.max_connections_jitter + 1)
        self.loop_thread = threading.get_ident()

    # -- exceptions and stop --
    def exception(self, exc: BaseException) -> None:
        try:
            keep = self.hooks.global_exception_handler(exc)
        except Exception:
            log.exception("global_exception_handler failed")
            keep = True
        if keep is False:
            log.info("container %s (pid %d): global_exception_handler returned False; finishing",
                     self.cont.id, self.cont.pid)
            self.stop("regular")

    def stop(self, reason: str) -> None:
        """Request the end: "regular" or "abort"."""
        if self.stop_reason is not None and not self.stop_reason.done():
            self.stop_reason.set_result(reason)

    def end_waits(self) -> None:
        """A regular end has served its connections: from now on every
        blocking wait of this container, in any thread, ends as a timeout
        would (``shutdown_pending``).  The controller is told, so that it
        answers the RPC waits it holds for us and wakes a native one asleep
        without a timeout (the first waiter of a semaphore)."""
        self._stop_waits()
        try:
            self.channel.notify("ctl.stopping", [])
        except ControllerGoneError:
            pass

    def _stop_waits(self) -> None:
        """Blocking waits end from now on: those in progress at their next
        look at ``shutdown_pending``, native ones begun later at once."""
        self.stopping = True
        if self.domain is not None:
            self.domain.stop_waits()

    def hook(self, name: str, *args) -> None:
        try:
            getattr(self.hooks, name)(*args)
        except Exception as e:
            self.exception(e)

    # -- messages from the controller --
    def on_message(self, obj, blob) -> None:
        kind = obj[0]
        if kind == "m":
            self.hook("receive_message", self.cont, obj[1], obj[2])
        elif kind == "a":
            self.hook("receive_admin_message", self.cont, obj[1], obj[2])
        elif kind == "ctl":
            if obj[1] == "system_shutdown":
                self._stop_waits()
                self.hook("system_shutdown")
                try:
                    self.channel.notify("ctl.system_shutdown_done", [])
                except ControllerGoneError:
                    pass
            elif obj[1] == "shutdown":  # [grace]: seconds its connections may take; 0: close them now
                if len(obj) > 2 and type(obj[2]) in (int, float) and 0 <= obj[2] <= 86400:
                    self.grace = obj[2]
                if not self.shutdown_seen:     # a retiring container may hear it twice
                    self.shutdown_seen = True
                    self.hook("shutdown")
                self.stop("regular")
                self.stop_accepting()
                if self.grace == 0:     # a quick stop, also of one already finishing
                    for t in list(self.handlers):
                        t.cancel()
            elif obj[1] == "log_level" and len(obj) > 2 and type(obj[2]) is int:
                logging.getLogger().setLevel(obj[2])
                logging.getLogger("netplex_native").setLevel(obj[2])
            elif obj[1] == "reopen_logs":
                reopen_log_files()
            elif obj[1] == "disable":   # stop accepting; running connections go on
                self.accepting = False
                self.stop_accepting()

    def shutdown_pending(self) -> bool:
        """For blocking waits (any thread): has the system begun to stop,
        or has this container's regular end served its connections
        (``end_waits``)?  On the loop thread this also looks at the channel
        itself, since a synchronous wait keeps the loop from handling
        messages: one there ends when a stop arrives."""
        if self.stopping or self.channel.closed:
            return True
        if threading.get_ident() == self.loop_thread:
            return self.channel.control_pending()
        return False

    def on_controller_gone(self) -> None:
        log.warning("container %s (pid %d): controller gone; exiting", self.cont.id, self.cont.pid)
        self.abort()

    def abort(self) -> None:
        """End now (controller gone, SIGTERM): connections are closed, even
        when a regular end already waits for them."""
        self.stopping = True
        signal.setitimer(signal.ITIMER_REAL, HARD_EXIT_AFTER)  # SIGALRM (default) ends us
        self.stop("abort")
        self.stop_accepting()
        for t in list(self.handlers):
            t.cancel()

    # -- serving --
    def start_accepting(self) -> None:
        if self.listen_sock is None or self.listening or not self.accepting or self.stop_reason.done():
            return
        if self.max_connections is not None and self.connections >= self.max_connections:
            return
        self.loop.add_reader(self.listen_sock.fileno(), self._on_acceptable)
        self.listening = True

    def _pause_accepting(self) -> None:
        if self.listening:
            self.loop.remove_reader(self.listen_sock.fileno())
            self.listening = False

    def stop_accepting(self) -> None:
        """For good: its copy of the listening socket is closed too (once
        the controller's and every container's are, connections are refused)."""
        self._pause_accepting()
        if self.listen_sock is not None:
            self.listen_sock.close()
            self.listen_sock = None

    def _on_acceptable(self) -> None:
        """Accept up to ACCEPT_BATCH connections, never more than the
        max_connections budget left; each is counted and gets its handler
        task here, so it is served whatever happens next."""
        for _ in range(ACCEPT_BATCH):
            if not self.listening:
                return
            try:
                conn, _addr = self.listen_sock.accept()
            except (BlockingIOError, InterruptedError):
                return                  # another container took it
            except ConnectionAbortedError:
                continue
            except OSError as e:        # EMFILE...: the connections wait in the backlog
                log.warning("container %s (pid %d): accept failed: %s; retrying in %.1f s",
                            self.cont.id, self.cont.pid, e, ACCEPT_RETRY_DELAY)
                self._pause_accepting()
                self.loop.call_later(ACCEPT_RETRY_DELAY, self.start_accepting)
                return
            self.connections += 1
            self._unstarted.add(conn)
            task = self.loop.create_task(self._serve(conn))
            self.handlers.add(task)
            task.add_done_callback(functools.partial(self._served, conn))
            if self.report_load:
                self._load()
            if self.max_connections is not None and self.connections >= self.max_connections:
                self._recycle()
                return

    async def _serve(self, conn) -> None:
        self._unstarted.discard(conn)
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError:                 # reset before we got to it
            conn.close()
            return
        try:
            await self.service.handler(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception as e:
            self.exception(e)
        finally:
            writer.close()

    def _served(self, conn, task) -> None:
        """A connection's task is done; one cancelled before it ran (an
        abort) never saw its socket, which is closed here."""
        self.handlers.discard(task)
        if conn in self._unstarted:
            self._unstarted.discard(conn)
            conn.close()
        if self.report_load and not self.stop_reason.done():
            self._load()

    def _load(self) -> None:
        try:
            self.channel.notify("ctl.load", [len(self.handlers)])
        except ControllerGoneError:
            pass

    def _recycle(self) -> None:
        """max_connections reached: accept no more, finish the connections
        being served, then end regularly (the controller starts a new one)."""
        log.info("container %s (pid %d): %d connections served (max_connections); recycling",
                 self.cont.id, self.cont.pid, self.connections)
        self.stop_accepting()
        try:                        # a new container takes its place at once
            self.channel.notify("ctl.recycle", [])
        except ControllerGoneError:
            pass

        async def when_idle():
            while self.handlers:
                await asyncio.wait(list(self.handlers))
            self.stop("regular")
        self._recycling = self.loop.create_task(when_idle())

    async def main(self) -> int:
        loop = self.loop = asyncio.get_running_loop()
        self.stop_reason = loop.create_future()
        def on_sigterm(signum, frame):
            if not _loop_is_idle(frame):
                # the loop's thread is in a synchronous call (sleep, a CPU loop,
                # a blocking wait): the loop cannot run abort, so end at once,
                # by the SIGTERM itself (the controller reaps and recovers us)
                _die_by(signal.SIGTERM)
            # arm the hard exit here too: a callback may still block the loop
            signal.setitimer(signal.ITIMER_REAL, HARD_EXIT_AFTER)
            loop.call_soon_threadsafe(self.abort)
        signal.signal(signal.SIGTERM, on_sigterm)
        self.channel.attach(loop, self.on_message, self.on_controller_gone)
        try:
            self.hooks.post_start_hook(self.cont)
        except Exception as e:
            log.error("container %s (pid %d) failed to boot: post_start_hook raised %r",
                      self.cont.id, self.cont.pid, e, exc_info=e)
            return BOOT_FAILED
        if not self.stop_reason.done():
            try:
                self.channel.notify("ctl.ready", [])
            except ControllerGoneError:
                self.abort()
        self.start_accepting()
        reason = await self.stop_reason
        self.stop_accepting()
        for t in list(self.timers.values()):
            t.cancel()
        if reason == "regular":
            if self.handlers:
                await asyncio.wait(list(self.handlers), timeout=self.grace)
            for t in list(self.handlers):
                t.cancel()
            self.end_waits()
            self.hook("pre_finish_hook", self.cont)
        else:
            for t in list(self.handlers):
                t.cancel()
        if self.handlers:
            await asyncio.wait(list(self.handlers), timeout=0.5)
        return 0


#: Files of the asyncio machinery: a signal handler called from a frame of
#: these runs while the loop waits or dispatches, never inside user code.
_LOOP_FILES = frozenset(m.__file__ for m in (selectors, asyncio.base_events, asyncio.events,
                                              asyncio.selector_events))


def _loop_is_idle(frame) -> bool:
    """Was the main thread, when the signal came, in the event loop itself
    (its select, between callbacks) rather than in a synchronous call?"""
    return frame is not None and frame.f_code.co_filename in _LOOP_FILES


def _die_by(sig: int) -> None:
    """End this process now by *sig*'s default action (logs flushed first)."""
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:
            pass
    signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)         # not reached


def _set_parent_death_signal(parent_pid: int) -> None:
    """SIGTERM when the controller dies, even by SIGKILL (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(0)


def run_container(ctrl, service, cid: str, chan_sock, listen_sock) -> int:
    """The container process's main; returns its exit code (the caller _exits)."""
    _set_parent_death_signal(ctrl.pid)
    set_title(f"container {cid} of {service.name} (controller {ctrl.name})")
    cont = Container(cid, os.getpid(), service.name)
    channel = Channel(chan_sock)
    configure_reply_poll()
    rt = _Runtime(ctrl, service, cont, channel, listen_sock)
    ctx.reset()
    ctx.role = "container"
    ctx.controller = ctrl
    ctx.container = cont
    ctx.channel = channel
    ctx.runtime = rt
    cont._rt = rt
    ctrl._install_backends("container")
    from .native.plugins import domain_plugin
    dom = ctrl.plugin_data(domain_plugin)
    if dom is not None:
        dom.interrupt_check = rt.shutdown_pending
    rt.domain = dom
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    code = 0
    try:
        code = loop.run_until_complete(rt.main())
    except BaseException as e:
        log.error("container %s (pid %d) failed: %r", cid, os.getpid(), e)
        code = 1
    finally:
        channel.close()
        logging.shutdown()
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
    return code
