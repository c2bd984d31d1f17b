"""In the container process: its end of the socketpair to the controller.

One socket carries calls, their replies, and the controller's messages.

Invariants:
- Frames are written whole and never interleaved: a frame enters the write
  buffer ``_wbuf`` whole, in one step, and leaves it only as the socket
  takes its bytes (``_send_out`` removes exactly what was sent).  One
  thread at a time, the writer (``_writer``), writes ``_wbuf`` out; a
  sender that finds a writer at work leaves its frame to it.  A writer
  that must wait for room reads meanwhile (when no one else reads), so a
  container that sends and a controller that waits for it to read never
  deadlock.  A sender returns once its own frame is written, so the buffer
  holds at most one frame per sending thread, plus the acknowledgements
  and give-backs a reader queues.
- One reader at a time (``_reader``): it reads the socket and dispatches
  every frame it completes (replies to any thread, messages to the inbox).
  A synchronous call, on any thread, reads for itself when no one else
  does, else sleeps in slices until its reply is delivered or the reader
  role is free: no call needs the loop, so a worker thread's call is served
  while the loop thread is blocked in a call of its own.  Before it sleeps
  in recv a reader writes out what is still buffered.
- The inbox is bounded (INBOX_MAX_MESSAGES, INBOX_MAX_BYTES): messages that
  arrive while nobody can run their hooks (the loop thread is in a
  synchronous call) are queued up to the bound, then dropped and counted
  (``dropped_messages``, a warning at most every WARN_EVERY seconds).
  Lifecycle messages (``["ctl", ...]``) are never dropped.
- Every call ends: with its reply, its remote error, or ControllerGoneError
  when the channel closes (every waiting thread is woken).

Signal handlers.  Python runs them on the main thread, between bytecodes,
and one that raises unwinds whatever that thread was doing.  Any number of
such exceptions, at any point of a synchronous call on the main thread,
end that call only: the other threads' calls complete, a grant the call
received is given back exactly once, and the channel stays usable.  What
makes it so:
- Bytes read are in ``_buf`` before any bytecode runs, and a frame leaves
  ``_buf`` only together with its effect (C1, C2 of
  csrc/fast/container_channel.c; channel_frames.py).  A reader dispatches
  what an interrupted one left before it reads.
- Roles are taken by a test-and-set of ``_reader`` / ``_writer`` in
  straight-line bytecode (no call between the test and the set, so no
  handler and no other thread runs there), and given back in ``finally``
  by a single store; a role is never held by a thread that left.
- Give-backs and acknowledgements are frames appended to ``_wbuf`` in one
  step (by the C dispatch, or by ``_give_up``), never callables that an
  exception could cut short: ``undo`` is a frame, sent if the call was
  granted something (``True``, or an int >= 0).
- Sleeps are slices (WAIT_SLICE) on a private lock: a wake-up lost to an
  exception costs one slice, and sleepers re-check everything each time.
- C4. A synchronous call made while nobody reads or writes takes both
  roles (one test-and-set) and makes its whole round trip in one C call
  (``chan_exchange``): the same C0-C2 steps; the writer role is given back
  (one store, in C) before it sleeps in recv, so other threads' calls are
  written meanwhile; anything out of the ordinary (a thread waiting, a
  message or an awaited reply to hand to the loop, no room to write) ends
  it, and the call goes on the general way.  No bytecode runs between the
  steps the general way runs as separate calls.
- C5. Before C4 sleeps in recv it polls for its reply, yielding the CPU,
  for an adaptive window of at most ``NETPLEX_REPLY_POLL_US`` (read from
  the container's environment as it starts; 50 µs by default; 0 turns it
  off): a reply that comes within it is read without a sleep and wake-up (container_channel.c says why and how it adapts,
  and how it stops on a loaded CPU).  Signals that came during the poll
  run their handlers before the sleep.
- C3. A handler that returns may itself make calls, even while the thread
  it interrupted holds a role: it reads and writes as that thread (the
  buffers are consistent at every point a handler can run), and a recv
  that a handler interrupted returns "nothing yet" so that the
  interrupted reader looks at its reply again.
What is not covered: an awaited call's reply, or a message, being handed to
the loop by a main thread that is not the loop's thread may be lost to such
an exception (the loop's own thread hands its replies over in C).

Two ways to call:

- ``call``: synchronous (hooks, timers, handlers, any thread).
- ``acall``: awaitable, on the loop thread; the loop's reader (or whoever
  reads) delivers the reply.

A wait that the caller abandons (Ctrl-C, a cancelled task) is cancelled at
the controller; a grant that crossed the cancel on the wire is given back
with the caller's ``undo``.  Deferred grants are acknowledged as soon as they
arrive, so the controller can give back a grant that a dying container never
received.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import select
import socket
import threading
import time
from collections import deque

from . import channel_frames, wire
from .channel_frames import granted
from .errors import REMOTE_ERRORS, ControllerGoneError, RemoteError, ProtocolError
from .logs import get_logger

log = get_logger("netplex_native.channel")

try:    # C0-C2 where no signal handler can run between their steps; C4 the round trip
    from ._fast import chan_dispatch as _dispatch_frames, chan_recv as _recv_into, \
        chan_send as _send_out, chan_exchange as _exchange
except ImportError:  # pragma: no cover - exercised by test_without_accelerator
    _dispatch_frames, _recv_into, _send_out = channel_frames.dispatch, channel_frames.recv, channel_frames.send
    _exchange = None

REPLY_POLL_ENV = "NETPLEX_REPLY_POLL_US"


def configure_reply_poll() -> None:
    """C5's cap from this process's environment: a container calls it as it
    starts (container.run_container), so the variable can be set for one
    container (a pre_start_hook, the service's environment) after the
    library was imported.  A value that is not a number of microseconds in
    0..1,000,000 is reported and the default kept: a container is not
    stopped by a knob.  Unset: the cap is left as it is."""
    v = os.environ.get(REPLY_POLL_ENV)
    if v is None or _exchange is None:
        return
    from ._fast import reply_poll
    # ASCII digits only (int() would also take "+5", " 20 ", "1_000", "-0"
    # and other scripts' digits)
    if not (v.isascii() and v.isdigit() and len(v) <= 7 and int(v) <= 1_000_000):
        log.warning("%s=%r is not a number of microseconds in 0..1000000: the default is kept",
                    REPLY_POLL_ENV, v)
        return
    reply_poll(int(v) * 1000)

_PACK_CALL = wire._CALL.pack                       # Channel.call_op
_CALL_FIXED = wire._CALL_FIXED
_NAN = float("nan")
_get_ident = threading.get_ident
_allocate_lock = threading.Lock


#: Bounds of the inbox (messages read but not yet handled); beyond either,
#: broadcast and admin messages are dropped and counted.
INBOX_MAX_MESSAGES = 10_000
INBOX_MAX_BYTES = 16 * 1024 * 1024
#: Seconds between two warnings about dropped messages.
WARN_EVERY = 5.0
#: Longest sleep of a thread waiting for a role or a reply before it looks again.
WAIT_SLICE = 0.05
_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT


_STOPS = ("system_shutdown", "shutdown")


def _cancel_frame(rid: int) -> bytes:
    """Asks the controller to stop waiting for call *rid*."""
    return wire.encode_call(0, "ctl.cancel", [rid])


def undo_frame(proc: str, args: list) -> bytes:
    """The give-back of a call: the frame of *proc(args)*, sent without a
    reply wanted if the call is abandoned after a grant (see ``call``)."""
    return wire.encode_call(0, proc, args)


class Channel:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        # Blocking: a synchronous call sleeps in recv() itself (one system
        # call per wait); every other read and every write pass MSG_DONTWAIT.
        sock.setblocking(True)
        self.fd = sock.fileno()
        self._buf = bytearray()                    # read, not yet dispatched (reader's)
        self._wbuf = bytearray()                   # whole frames not yet written (writer's)
        self._wcount = [0]                         # bytes written so far (_send_out counts)
        self._ids = itertools.count(1)
        self._writer = None                        # the thread writing _wbuf out
        self._reader = None                        # the thread reading the socket
        self._waiters: set = set()                 # private locks of sleeping threads
        self._results: dict[int, tuple] = {}       # replies to synchronous calls
        self._sync_ids: set[int] = set()
        self._futures: dict[int, tuple] = {}       # call id -> (future, undo)
        self._abandoned: dict[int, object] = {}    # call id -> undo frame or None
        self._deliveries: deque = deque()          # (future, undo, reply) for the loop
        self._inbox: deque = deque()               # (obj, blob, size): messages not yet handled
        self._icount = [0, 0]                      # the inbox's bytes, messages dropped
        self._dropped_warned = 0
        self._warned_at = 0.0
        self._drain_scheduled = False
        self._reader_paused = False
        self._deliveries_scheduled = False
        self._close_by_reader = False              # close() left the socket's close to the reader
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = None
        self._on_message = None
        self._on_eof = None
        self.closed = False
        self._dstate = self._dispatch_state()

    def _dispatch_state(self) -> tuple:
        """What the dispatch (C2) works on; see chan_dispatch."""
        return (channel_frames.decode, self._sync_ids, self._results, self._abandoned, self._futures,
                self._wbuf, self._deliveries, self._inbox, self._icount,
                (INBOX_MAX_MESSAGES, INBOX_MAX_BYTES))

    @property
    def dropped_messages(self) -> int:
        return self._icount[1]

    # ---- setup ----
    def attach(self, loop, on_message, on_eof) -> None:
        self._loop = loop
        self._loop_thread = _get_ident()
        self._on_message = on_message
        self._on_eof = on_eof
        loop.add_reader(self.fd, self._on_readable)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        on_loop = self._on_loop_thread()
        if on_loop and self._loop is not None and not self._loop.is_closed() and not self._reader_paused:
            self._loop.remove_reader(self.fd)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes a thread blocked in recv
        except OSError:
            pass
        me = _get_ident()
        deadline = time.monotonic() + 1.0
        while self._reader not in (None, me) and time.monotonic() < deadline:
            self._sleep(lambda: self._reader is None)   # the reader has left recv
        self._wbuf.clear()
        if self._reader in (None, me):
            self.sock.close()
        else:                       # still reading: its fd is not closed (nor reused) under it
            self._close_by_reader = True
        self._wake_all()
        futures = list(self._futures.values())
        self._futures.clear()
        for fut, _undo in futures:
            self._call_on_loop(_fail, fut)

    def _on_loop_thread(self) -> bool:
        return self._loop_thread is None or _get_ident() == self._loop_thread

    def _call_on_loop(self, fn, *args) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if self._on_loop_thread():
            fn(*args)
        else:
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:    # the loop closed meanwhile
                pass

    # ---- calls ----
    def notify(self, proc: str, args: list, blob: bytes | None = None) -> None:
        """A call that wants no reply."""
        self._send(wire.encode_call(0, proc, args, blob))

    def call(self, proc: str, args: list, blob: bytes | None = None, undo: bytes | None = None):
        """Synchronous call, from any thread; returns ``(result, blob)`` or
        raises the remote error (ControllerGoneError if the channel closes).
        *undo*: the frame that gives back what the call was granted (a
        result ``True`` or an int >= 0) if the caller leaves without it."""
        rid = next(self._ids)
        # too large: raises, nothing sent
        return self._call(rid, wire.encode_call(rid, proc, args, blob), undo)

    def call_op(self, op: int, name: bytes, flags: int = 0, undo: bytes | None = None):
        """``call`` of a binary operation without timeout (wire.CALL_OPS:
        1 increment, 2 decrement without wait, 3 get, 5 unlock) whose name
        (UTF-8) the caller has checked: the frame is packed here, at a
        fraction of encode_call's cost; the rest is ``call``."""
        rid = next(self._ids)
        return self._call(rid, _PACK_CALL(_CALL_FIXED + len(name), 0, op, rid, flags, _NAN) + name, undo)

    def _call(self, rid: int, frame: bytes, undo):
        results = self._results
        try:
            self._sync_ids.add(rid)
            me = _get_ident()
            if self._writer is None and self._reader is None and _exchange is not None and not self.closed:
                # Nobody writes or reads: the whole round trip in C (C4), both
                # roles held.  (test-and-set of both: no call in between)
                self._writer = me
                self._reader = me
                r = 0
                try:
                    self._wbuf += frame
                    r = _exchange(self, self.sock, self._buf, self._wcount, rid, self._dstate)
                except ProtocolError:
                    self._eof()
                    raise
                finally:
                    self._reader = None     # (first: a call could be cut short)
                    if self._writer == me:  # (C4 gives it back once it has written)
                        self._writer = None
                    if r != 1 or self._waiters or self._reader_paused or self._close_by_reader:
                        self._after_reading()
                if rid not in results:
                    self._send(b"")         # the general way from here: our frame out first
            else:
                self._send(frame)
            while rid not in results:
                if self.closed:
                    raise ControllerGoneError("the controller closed the channel")
                held = self._reader
                if held is None or held == me:
                    # (test-and-set: no call in between; held == me: a call
                    # from a signal handler that interrupted our own read)
                    self._reader = me
                    try:
                        while rid not in results:
                            self._read(True)
                    finally:
                        self._reader = held     # (first: a call could be cut short)
                        if held is None:
                            self._after_reading()
                else:
                    self._sleep(lambda: rid in results or self._reader is None or self.closed)
            self._sync_ids.discard(rid)
            reply = results[rid]            # (from here to the return: no call)
            del results[rid]
        except BaseException:
            # The caller leaves without its reply.  The first steps have no
            # call, so no second exception can cut them short: a reply
            # delivered from now on is given back by the dispatch (it looks
            # at _abandoned first); one delivered already is given back
            # here, by a frame appended in one step.
            if rid not in results:
                self._abandoned[rid] = undo
            else:
                reply = results[rid]
                del results[rid]
                r = reply[1]
                if undo is not None and reply[0] is True and (
                        r is True or (r.__class__ is int and r >= 0)):   # granted(), inline
                    self._wbuf += undo
            self._give_up(rid)
            raise
        if reply[0]:
            return reply[1], reply[2]
        return _unwrap(reply)

    def _give_up(self, rid: int) -> None:
        """After the steps above: the controller is asked to cancel *rid*
        (if it still waits) and the write buffer is written out.  Cut
        short, the cancel is lost (the grant then comes, and is given back)
        and the writes wait for the channel's next writer."""
        self._sync_ids.discard(rid)
        if rid in self._abandoned and not self.closed:
            self._wbuf += _cancel_frame(rid)
        self._flush_quietly()

    async def acall(self, proc: str, args: list, blob: bytes | None = None, undo: bytes | None = None):
        rid = next(self._ids)
        frame = wire.encode_call(rid, proc, args, blob)   # too large: raises, nothing sent
        fut = self._loop.create_future()
        self._futures[rid] = (fut, undo)
        try:
            self._send(frame)
        except BaseException:
            if rid in self._futures:        # the frame may still go out: its grant comes back
                del self._futures[rid]
                self._abandoned[rid] = undo
                if not self.closed:
                    self._wbuf += _cancel_frame(rid)
            raise
        try:
            reply = await fut
        except asyncio.CancelledError:
            if rid in self._futures:              # still pending at the controller
                del self._futures[rid]
                self._abandoned[rid] = undo
                self._give_back(_cancel_frame(rid))
            elif fut.done() and not fut.cancelled():
                ok, result, _ = fut.result()      # granted, but no one will use it
                if undo is not None and granted(ok, result):
                    self._give_back(undo)
            # else: the reply is on its way to _drain_deliveries, which gives it back
            raise
        return _unwrap(reply)

    # ---- writing ----
    def _send(self, frame: bytes) -> None:
        """Write one whole frame: now if no one writes, else the writer at
        work writes it; return once it is written."""
        if self.closed:
            raise ControllerGoneError("the controller closed the channel")
        wcount = self._wcount
        self._wbuf += frame
        end = wcount[0] + len(self._wbuf)          # the count once our frame is out
        if self._writer == _get_ident():
            # a signal handler's call inside our own write (C3): write it
            # now, from here (the interrupted write goes on with what is left)
            self._write_out()
            return
        self._flush()
        # (an empty buffer means ours is out too, whatever the count says)
        while wcount[0] < end and self._wbuf and not self.closed:
            self._sleep(lambda: wcount[0] >= end or self._writer is None or self.closed)
            self._flush()
        if self.closed and wcount[0] < end:
            raise ControllerGoneError("the controller closed the channel")

    def _give_back(self, frame: bytes) -> None:
        """Send a give-back or a cancel: queued whole, then written if the
        channel is still there."""
        if not self.closed:
            self._wbuf += frame
        self._flush_quietly()

    def _flush_quietly(self) -> None:
        """``_flush`` where a closed channel is no news (a give-back, a cancel:
        the controller gives back what a gone container held)."""
        if self._wbuf and not self.closed:
            try:
                self._flush()
            except ControllerGoneError:
                pass

    def _flush(self) -> None:
        """Write ``_wbuf`` out as the writer, unless a writer is at work (it
        writes everything, ours too).  Raises ControllerGoneError."""
        me = _get_ident()
        while self._wbuf and not self.closed:
            if self._writer is not None:
                return
            self._writer = me               # (test-and-set: no call in between)
            try:
                self._write_out()
            finally:
                self._writer = None
                if self._waiters:
                    self._wake_all()

    def _write_out(self) -> None:
        """Writer role held: until ``_wbuf`` is empty.  Waits for room;
        reads meanwhile when nobody else reads."""
        wbuf = self._wbuf
        me = _get_ident()
        while wbuf:
            if self.closed:
                raise ControllerGoneError("the controller closed the channel")
            n = _send_out(self.sock, wbuf, self._wcount)
            if n < 0:
                self._eof()
                raise ControllerGoneError("the controller closed the channel")
            if n:
                continue
            # full: the controller is behind, or waits for us to read its answers
            if self._reader == me:          # (a reader writing its acknowledgements)
                self._poll_and_read()
            elif self._reader is None:
                self._reader = me           # (test-and-set: no call in between)
                try:
                    self._poll_and_read()
                finally:
                    self._reader = None
                    self._after_reading()
            else:
                p = select.poll()
                p.register(self.fd, _POLLOUT)
                p.poll(50)

    def _poll_and_read(self) -> None:
        """Reader role held, writing blocked: wait for room or for
        something to read, and read it."""
        p = select.poll()
        p.register(self.fd, _POLLIN | _POLLOUT)
        if any(ev & _POLLIN for _, ev in p.poll(100)):
            self._read(False)

    # ---- reading ----
    def _read(self, wait: bool) -> bool:
        """Reader role held: dispatch what an interrupted reader left in
        ``_buf``, else one recv (sleeping until something comes if *wait*)
        and dispatch the frames it completes.  False if nothing was there;
        raises ControllerGoneError (end of stream) or ProtocolError
        (garbage, the channel is then closed)."""
        buf = self._buf
        if len(buf) >= 8:
            before = len(buf)
            self._dispatch_buffer()
            if len(buf) != before:
                return True
        if wait and self._wbuf:
            self._flush()                   # (what an interrupted writer left)
        n = _recv_into(self.sock, buf, wait)
        if n < 0:
            return False
        if n == 0:
            self._dispatch_buffer()
            self._eof()
            raise ControllerGoneError("the controller closed the channel")
        self._dispatch_buffer()
        return True

    def _dispatch_buffer(self) -> None:
        try:
            woke = _dispatch_frames(self._buf, self._dstate)
        except ProtocolError:
            self._eof()
            raise
        if woke and self._waiters:
            self._wake_all()
        self._after_dispatch()

    def _after_dispatch(self) -> None:
        """What follows a dispatch, in Python; cut short, it is done again
        after the next read (``_after_reading``)."""
        if self._wbuf and not self.closed:
            self._flush()                   # acknowledgements, give-backs
        if self._deliveries and not self._deliveries_scheduled and self._loop is not None:
            # awaited replies: completed by the loop, never inside a
            # synchronous call (asyncio's code is not ours to make safe)
            self._schedule_drain("_deliveries_scheduled", self._drain_deliveries)
        if self._inbox and not self._drain_scheduled and self._loop is not None:
            self._schedule_drain("_drain_scheduled", self._drain_inbox)
        if self._icount[1] != self._dropped_warned:
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY:
                self._warned_at = now
                self._dropped_warned = self._icount[1]
                log.warning("container pid %d: its inbox filled up while its loop was busy: %d "
                            "messages dropped so far (%d messages, %d bytes queued now)", os.getpid(),
                            self._icount[1], len(self._inbox), self._icount[0])

    def _schedule_drain(self, flag: str, drain) -> None:
        """Set *flag* ("a drain is scheduled"), then schedule *drain* on the
        loop: on another thread the drain may run, and clear the flag,
        before the call returns.  If the scheduling is cut short (a
        handler's exception at the call), the flag is cleared again: the
        store is a subscript, not a call, so no check point precedes it."""
        state = self.__dict__
        try:
            state[flag] = True
            self._call_on_loop_soon(drain)
        except BaseException:
            state[flag] = False
            raise

    def _after_reading(self) -> None:
        """Called right after a reader gave its role back (``_reader =
        None``, the first statement of its ``finally``, so that the role
        itself is never left taken): finish what it may have left --
        frames in ``_buf``, writes, deliveries -- taking the role again if
        it is free; wake the sleepers; give the loop its reader back."""
        me = _get_ident()
        if (len(self._buf) >= 8 or self._wbuf or self._deliveries or self._inbox) \
                and not self.closed and self._reader is None:
            self._reader = me               # (test-and-set: no call in between)
            try:
                if len(self._buf) >= 8:
                    self._dispatch_buffer()
                else:
                    self._after_dispatch()
            except (ControllerGoneError, ProtocolError):
                pass
            finally:
                self._reader = None
        if self._waiters:
            self._wake_all()
        if self._close_by_reader and self._reader is None:
            self._close_by_reader = False
            self.sock.close()
        if self._reader_paused and not self.closed:
            self._call_on_loop_soon(self._resume_reader)

    def _read_available(self) -> None:
        """Dispatch whatever has arrived, if no one else reads."""
        me = _get_ident()
        if self._reader is None:
            self._reader = me               # (test-and-set: no call in between)
            try:
                while self._read(False):
                    pass
            finally:
                self._reader = None
                self._after_reading()

    def control_pending(self) -> bool:
        """Read what has arrived (without running any hook) and tell whether
        a lifecycle message that ends the container (``["ctl",
        "system_shutdown"]``, ``["ctl", "shutdown"]``) is waiting to be handled.
        Loop thread only."""
        if self.closed:
            return True
        try:
            self._read_available()
        except (ControllerGoneError, ProtocolError):
            return True
        return any(item[0][0] == "ctl" and item[0][1] in _STOPS for item in list(self._inbox))

    def _on_readable(self) -> None:
        if self.closed:
            return
        me = _get_ident()
        if self._reader is not None:
            # another thread reads: stop watching until it is done
            self._reader_paused = True
            self._loop.remove_reader(self.fd)
            return
        self._reader = me                   # (test-and-set: no call in between)
        try:
            self._read(False)       # level-triggered: called again while more is there
        except (ControllerGoneError, ProtocolError):
            pass
        finally:
            self._reader = None
            self._after_reading()
        self._drain_deliveries()
        self._drain_inbox()

    def _resume_reader(self) -> None:
        if self._reader_paused and not self.closed:
            self._reader_paused = False
            self._loop.add_reader(self.fd, self._on_readable)

    # ---- sleeping ----
    def _sleep(self, done) -> None:
        """One slice of sleep, unless *done()*; woken early by ``_wake_all``
        (a reply delivered, a role given back, a frame written)."""
        lk = _allocate_lock()
        lk.acquire()
        self._waiters.add(lk)
        try:
            if not done():
                if self._reader_paused and self._reader is None and not self.closed:
                    self._call_on_loop_soon(self._resume_reader)    # (an interrupted release)
                lk.acquire(True, WAIT_SLICE)
        finally:
            self._waiters.discard(lk)

    def _wake_all(self) -> None:
        waiters = self._waiters
        self._waiters = set()
        for lk in waiters:
            try:
                lk.release()
            except RuntimeError:            # its slice ended: not held any more
                pass

    # ---- the inbox ----
    def _call_on_loop_soon(self, fn) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            if self._on_loop_thread():
                loop.call_soon(fn)
            else:
                loop.call_soon_threadsafe(fn)
        except RuntimeError:
            pass

    def _drain_deliveries(self) -> None:
        """On the loop: complete the awaited calls whose replies were read.
        An item leaves the queue after its effect (so an exception in
        between repeats it: completing a future twice is a no-op, and a
        give-back is taken out of the item before it is sent)."""
        self._deliveries_scheduled = False
        deliveries = self._deliveries
        while deliveries:
            item = deliveries[0]            # [future, undo, reply]
            fut = item[0]
            if fut.cancelled():             # the caller is gone: give the grant back, once
                undo = item[1]
                item[1] = None
                reply = item[2]
                r = reply[1]
                if undo is not None and reply[0] is True and (r is True or (r.__class__ is int and r >= 0)):
                    self._wbuf += undo      # granted(), inline
            elif not fut.done():
                fut.set_result(item[2])
            if deliveries and deliveries[0] is item:
                deliveries.popleft()
        self._flush_quietly()

    def _drain_inbox(self) -> None:
        self._drain_scheduled = False
        inbox = self._inbox
        icount = self._icount
        while inbox and self._on_message is not None:
            obj, blob, size = inbox[0]
            icount[0] -= size
            inbox.popleft()                 # (with the line above: no call in between)
            self._on_message(obj, blob)

    def _eof(self) -> None:
        if self.closed:
            return
        self.close()
        if self._on_eof is not None and self._loop is not None:
            self._call_on_loop_soon(self._on_eof)


def _fail(fut) -> None:
    if not fut.done():
        fut.set_exception(ControllerGoneError("the controller closed the channel"))


def _unwrap(reply):
    ok, result, blob = reply
    if ok:
        return result, blob
    try:
        cls_name, message = result
    except (TypeError, ValueError):
        raise RemoteError(repr(result)) from None
    cls = REMOTE_ERRORS.get(cls_name, RemoteError)
    raise cls(message)
