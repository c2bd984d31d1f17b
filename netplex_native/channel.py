"""The container's end of its socketpair to the controller.

One socket carries calls, their replies, and the controller's messages.

Invariants:
- Frames are written whole: every send holds ``_slock`` for the whole
  frame, so threads never interleave bytes.  A send that must wait for room
  reads meanwhile (when no one else reads), so a container that sends and a
  controller that waits for it to read never deadlock.  Frames a reader
  must send while it dispatches (acknowledgements, give-backs) are queued
  in ``_later`` and written by whoever holds ``_slock`` next, after its frame.
- One reader at a time: whoever holds ``_rlock`` reads the socket and
  dispatches every frame it completes (replies to any thread, messages to
  the inbox).  A synchronous call, on any thread, reads for itself when no
  one else does, else waits on ``_cond`` until its reply is delivered or the
  reader role is free: no call needs the loop, so a worker thread's call is
  served while the loop thread is blocked in a call of its own.  A caller
  that takes the reader role reads only while its reply has not been
  delivered yet (another reader may have delivered it since the send).
- The inbox is bounded (INBOX_MAX_MESSAGES, INBOX_MAX_BYTES): messages that
  arrive while nobody can run their hooks (the loop thread is in a
  synchronous call) are queued up to the bound, then dropped and counted
  (``dropped_messages``, a warning at most every WARN_EVERY seconds).
  Lifecycle messages (``["ctl", ...]``) are never dropped.
- Every call ends: with its reply, its remote error, or ControllerGoneError
  when the channel closes (every waiting thread is woken).

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
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque

from . import wire
from .errors import REMOTE_ERRORS, ControllerGoneError, RemoteError, ProtocolError
from .logs import get_logger

log = get_logger("netplex_native.channel")

# A plain binary reply (wire.encode_reply): header (length 22, no JSON), 0x80.
_REPLY_HEAD = wire._REPLY.pack(wire._REPLY_LEN, 0, wire.OP_REPLY, 0, 0, 0)[:9]
_REPLY_SIZE = wire._REPLY.size
_REPLY_TAIL = struct.Struct("!BQBq").unpack_from   # from offset 8: op, id, flags, value
_PLAIN = {1: None, 9: False, 13: True}             # flags of ok, not deferred, value 0
_PACK_CALL = wire._CALL.pack                       # Channel.call_op
_CALL_FIXED = wire._CALL_FIXED
_NAN = float("nan")


#: Bounds of the inbox (messages read but not yet handled); beyond either,
#: broadcast and admin messages are dropped and counted.
INBOX_MAX_MESSAGES = 10_000
INBOX_MAX_BYTES = 16 * 1024 * 1024
#: Seconds between two warnings about dropped messages.
WARN_EVERY = 5.0
_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT


_STOPS = ("system_shutdown", "shutdown")


class Channel:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        # Blocking: a synchronous call sleeps in recv() itself (one system
        # call per wait); every other read passes MSG_DONTWAIT.
        sock.setblocking(True)
        self.fd = sock.fileno()
        self._decoder = wire.Decoder(binary=True)
        self._ids = itertools.count(1)
        self._slock = threading.Lock()             # held while one frame is written
        self._writer = None                        # the thread holding _slock
        self._later: deque = deque()               # frames to write after the current one
        self._rlock = threading.Lock()             # held by the one reader
        self._reader = None                        # the thread holding _rlock
        self._cond = threading.Condition(threading.Lock())  # replies delivered, reader role free
        self._sleepers = 0                         # threads waiting on _cond
        self._results: dict[int, tuple] = {}       # replies to synchronous calls
        self._sync_ids: set[int] = set()
        self._futures: dict[int, tuple] = {}       # call id -> (future, undo)
        self._abandoned: dict[int, object] = {}    # call id -> undo(result) or None
        self._inbox: deque = deque()               # messages not yet handled
        self._inbox_bytes = 0
        self._ilock = threading.Lock()
        self.dropped_messages = 0
        self._dropped_warned = 0
        self._warned_at = 0.0
        self._drain_scheduled = False
        self._reader_paused = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = None
        self._on_message = None
        self._on_eof = None
        self.closed = False

    # ---- setup ----
    def attach(self, loop, on_message, on_eof) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
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
        if self._reader == threading.get_ident():
            self.sock.close()
        elif self._rlock.acquire(timeout=1.0):      # the reader (if any) has left recv
            try:
                self.sock.close()
            finally:
                self._rlock.release()
        else:
            self.sock.close()
        with self._cond:
            self._cond.notify_all()
        futures = list(self._futures.values())
        self._futures.clear()
        for fut, _undo in futures:
            self._call_on_loop(_fail, fut)

    def _on_loop_thread(self) -> bool:
        return self._loop_thread is None or threading.get_ident() == self._loop_thread

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

    def call(self, proc: str, args: list, blob: bytes | None = None, undo=None):
        """Synchronous call, from any thread; returns ``(result, blob)`` or
        raises the remote error (ControllerGoneError if the channel closes)."""
        rid = next(self._ids)
        # too large: raises, nothing sent
        return self._call(rid, wire.encode_call(rid, proc, args, blob), undo)

    def call_op(self, op: int, name: bytes, flags: int = 0, undo=None):
        """``call`` of a binary operation without timeout (wire.CALL_OPS:
        1 increment, 2 decrement without wait, 3 get, 5 unlock) whose name
        (UTF-8) the caller has checked: the frame is packed here, at a
        fraction of encode_call's cost; the rest is ``call``."""
        rid = next(self._ids)
        return self._call(rid, _PACK_CALL(_CALL_FIXED + len(name), 0, op, rid, flags, _NAN) + name, undo)

    def _call(self, rid: int, frame: bytes, undo):
        sync_ids = self._sync_ids
        results = self._results
        sync_ids.add(rid)
        try:
            self._send(frame)
            if self._rlock.acquire(False):
                self._reader = threading.get_ident()
                try:
                    # (the loop may have read and delivered our reply between the send
                    # and here: then a recv would wait for a reply that has come)
                    if rid not in results and not self._decoder.pending:
                        # the usual case: the next read is exactly our plain binary reply
                        data = self._recv_blocking()
                        if len(data) == _REPLY_SIZE and data.startswith(_REPLY_HEAD):
                            _, rrid, flags, value = _REPLY_TAIL(data, 8)
                            if rrid == rid:
                                if flags == 5:              # ok, an int
                                    sync_ids.discard(rid)
                                    return value, None
                                if not value and flags in _PLAIN:   # ok, None/False/True
                                    sync_ids.discard(rid)
                                    return _PLAIN[flags], None
                        self._process(data)
                    while rid not in results:
                        self._process(self._recv_blocking())
                finally:
                    self._release_reader()
            else:
                self._wait_reply(rid)
        except BaseException:
            sync_ids.discard(rid)
            if rid not in results:
                self._abandon(rid, undo)
            else:
                reply = results.pop(rid)
                if reply[0] and undo is not None:
                    self._safe_undo(undo, reply[1])
            raise
        sync_ids.discard(rid)
        return _unwrap(results.pop(rid))

    def _wait_reply(self, rid: int) -> None:
        """Until *rid*'s reply is delivered: read ourselves whenever the
        reader role is free, else sleep until the reader delivers or leaves."""
        results = self._results
        cond = self._cond
        while rid not in results:
            if self.closed:
                raise ControllerGoneError("the controller closed the channel")
            if self._rlock.acquire(False):
                self._reader = threading.get_ident()
                try:
                    while rid not in results:
                        self._process(self._recv_blocking())
                finally:
                    self._release_reader()
                return
            with cond:
                self._sleepers += 1
                try:
                    if rid not in results and self._rlock.locked() and not self.closed:
                        cond.wait(0.05)
                finally:
                    self._sleepers -= 1

    def _release_reader(self) -> None:
        self._reader = None
        self._rlock.release()
        if self._sleepers:
            with self._cond:
                self._cond.notify_all()
        if self._reader_paused and not self.closed:
            self._call_on_loop(self._resume_reader)

    async def acall(self, proc: str, args: list, blob: bytes | None = None, undo=None):
        rid = next(self._ids)
        frame = wire.encode_call(rid, proc, args, blob)   # too large: raises, nothing sent
        fut = self._loop.create_future()
        self._futures[rid] = (fut, undo)
        try:
            self._send(frame)
        except BaseException:
            self._futures.pop(rid, None)
            raise
        try:
            reply = await fut
        except asyncio.CancelledError:
            if self._futures.pop(rid, None) is not None:
                self._abandon(rid, undo)          # still pending at the controller
            elif fut.done() and not fut.cancelled():
                ok, result, _ = fut.result()      # granted, but no one will use it
                if ok and undo is not None:
                    undo(result)
            # else: the reply is on its way to _deliver, which gives it back
            raise
        return _unwrap(reply)

    # ---- internals ----
    def _abandon(self, rid: int, undo) -> None:
        self._abandoned[rid] = undo
        if not self.closed:
            try:
                self.notify("ctl.cancel", [rid])
            except ControllerGoneError:
                pass

    @staticmethod
    def _safe_undo(undo, result) -> None:
        try:
            undo(result)
        except ControllerGoneError:
            pass

    def _send(self, data: bytes) -> None:
        """Write one whole frame (then any queued in ``_later``).  Called by
        the thread that is writing (from a dispatch while it waits for room),
        the frame goes right after the current one."""
        if self.closed:
            raise ControllerGoneError("the controller closed the channel")
        me = threading.get_ident()
        if self._writer == me:
            self._later.append(data)
            return
        later = self._later
        with self._slock:
            self._writer = me
            try:
                self._write(data)
                while later:
                    self._write(later.popleft())
            finally:
                self._writer = None
        if later:
            self._flush_later()

    def _post(self, data: bytes) -> None:
        """Send *data* from inside a dispatch: now if no frame is being
        written, else right after it (never interleaved, never re-entrant)."""
        self._later.append(data)
        self._flush_later()

    def _flush_later(self) -> None:
        # every append is followed by a try here, every release of _slock by
        # a look at _later: nothing stays behind
        later = self._later
        me = threading.get_ident()
        while later:
            if self._writer == me or not self._slock.acquire(False):
                return
            self._writer = me
            try:
                while later:
                    self._write(later.popleft())
            except ControllerGoneError:
                later.clear()
            finally:
                self._writer = None
                self._slock.release()

    def _write(self, data) -> None:
        """Under _slock.  Waits for room; reads meanwhile when nobody else reads."""
        sock = self.sock
        view = None
        while True:
            try:
                n = sock.send(data if view is None else view, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self._eof()
                raise ControllerGoneError(f"the controller closed the channel: {e}") from None
            total = len(data) if view is None else len(view)
            if n == total:
                return
            if n:
                view = (memoryview(data) if view is None else view)[n:]
                continue
            # full: the controller is behind, or waits for us to read its answers
            if self._rlock.acquire(False):
                self._reader = threading.get_ident()
                try:
                    p = select.poll()
                    p.register(self.fd, _POLLIN | _POLLOUT)
                    events = p.poll(100)
                    if any(ev & _POLLIN for _, ev in events):
                        self._read_once()
                finally:
                    self._release_reader()
            else:
                p = select.poll()
                p.register(self.fd, _POLLOUT)
                p.poll(50)
            if self.closed:
                raise ControllerGoneError("the controller closed the channel")

    def _read_once(self) -> bool:
        """One recv without waiting (reader role held): dispatch the frames
        it completes.  False if nothing was there; raises
        ControllerGoneError (EOF) or ProtocolError (garbage)."""
        try:
            data = self.sock.recv(1 << 18, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        self._process(data)
        return True

    def _recv_blocking(self) -> bytes:
        """One read that sleeps until something comes.  No spinning: on a
        loaded machine a yield gives the CPU away for a whole slice."""
        try:
            return self.sock.recv(1 << 18)
        except OSError:
            return b""

    def _process(self, data: bytes) -> None:
        """Dispatch the frames *data* completes (b"": EOF).  Reader role held."""
        if not data:
            self._eof()
            raise ControllerGoneError("the controller closed the channel")
        try:
            frames = self._decoder.feed(data)
        except ProtocolError:
            self._eof()
            raise
        woke = False
        for obj, blob in frames:
            woke |= self._dispatch(obj, blob)
        if woke and self._sleepers:
            with self._cond:
                self._cond.notify_all()

    def _read_available(self) -> None:
        while self._read_once():
            pass

    def control_pending(self) -> bool:
        """Read what has arrived (without running any hook) and tell whether
        a lifecycle message that ends the container (``["ctl",
        "system_shutdown"]``, ``["ctl", "shutdown"]``) is waiting to be handled.
        Loop thread only."""
        if self.closed:
            return True
        if self._rlock.acquire(False):
            self._reader = threading.get_ident()
            try:
                self._read_available()
            except (ControllerGoneError, ProtocolError):
                return True
            finally:
                self._release_reader()
        return any(item[0][0] == "ctl" and item[0][1] in _STOPS for item in list(self._inbox))

    def _on_readable(self) -> None:
        if self.closed:
            return
        if not self._rlock.acquire(False):
            # another thread reads: stop watching until it is done
            self._reader_paused = True
            self._loop.remove_reader(self.fd)
            return
        self._reader = threading.get_ident()
        try:
            self._read_once()       # level-triggered: called again while more is there
        except (ControllerGoneError, ProtocolError):
            pass
        finally:
            self._reader = None
            self._rlock.release()
            if self._sleepers:
                with self._cond:
                    self._cond.notify_all()
        self._drain_inbox()

    def _resume_reader(self) -> None:
        if self._reader_paused and not self.closed:
            self._reader_paused = False
            self._loop.add_reader(self.fd, self._on_readable)

    def _dispatch(self, obj, blob) -> bool:
        """One frame; True if a synchronous caller's reply was delivered."""
        if obj[0] == "r":
            _, rid, ok, result, deferred = obj
            if deferred:
                self._post(wire.encode_call(0, "ctl.ack", [rid]))
            reply = (ok, result, blob)
            if rid in self._abandoned:
                undo = self._abandoned.pop(rid)
                if ok and undo is not None:
                    self._safe_undo(undo, result)
            elif rid in self._sync_ids:
                self._results[rid] = reply
                return True
            else:
                entry = self._futures.pop(rid, None)
                if entry is not None:
                    self._call_on_loop(_deliver, entry[0], entry[1], reply)
            return False
        self._enqueue(obj, blob)
        return False

    def _enqueue(self, obj, blob) -> None:
        size = _message_size(obj)
        with self._ilock:
            if obj[0] != "ctl" and (len(self._inbox) >= INBOX_MAX_MESSAGES
                                    or self._inbox_bytes + size > INBOX_MAX_BYTES):
                self.dropped_messages += 1
                now = time.monotonic()
                if now - self._warned_at >= WARN_EVERY:
                    self._warned_at = now
                    log.warning("container pid %d: inbox full (%d messages, %d bytes) while its loop is "
                                "busy: %d messages dropped so far", os.getpid(), len(self._inbox),
                                self._inbox_bytes, self.dropped_messages)
                return
            self._inbox.append((obj, blob, size))
            self._inbox_bytes += size
            if self._drain_scheduled or self._loop is None:
                return
            self._drain_scheduled = True
        self._call_on_loop_soon(self._drain_inbox)

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

    def _drain_inbox(self) -> None:
        self._drain_scheduled = False
        inbox = self._inbox
        while inbox and self._on_message is not None:
            with self._ilock:
                if not inbox:
                    break
                obj, blob, size = inbox.popleft()
                self._inbox_bytes -= size
            self._on_message(obj, blob)

    def _eof(self) -> None:
        if self.closed:
            return
        self.close()
        if self._on_eof is not None and self._loop is not None:
            self._call_on_loop_soon(self._on_eof)


def _message_size(obj) -> int:
    """Bytes a message holds (roughly its frame size)."""
    n = 32
    for x in obj:
        if type(x) is str:
            n += len(x)
        elif type(x) is list:
            for a in x:
                n += 8 + (len(a) if type(a) is str else 8)
    return n


def _deliver(fut, undo, reply) -> None:
    """On the loop: complete an awaited call, or give its grant back if the
    caller is gone."""
    if fut.done():
        ok, result, _ = reply
        if ok and undo is not None:
            try:
                undo(result)
            except ControllerGoneError:
                pass
    else:
        fut.set_result(reply)


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
