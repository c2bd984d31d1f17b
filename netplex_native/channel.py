"""The container's end of its socketpair to the controller.

One socket carries calls, their replies, and the controller's messages.  Two
ways to call, both on the container's loop thread:

- ``call``: synchronous (from hooks, timers, handlers).  It reads the socket
  itself until its reply arrives; replies to other calls complete their
  futures, and messages that arrive meanwhile are queued for the loop, so a
  message arriving during a synchronous call never deadlocks it nor runs a
  hook inside it.
- ``acall``: awaitable; the loop's reader delivers the reply.

From another thread, ``call`` hands the call to the loop and waits.

A wait that the caller abandons (Ctrl-C, a cancelled task) is cancelled at
the controller; a grant that crossed the cancel on the wire is given back
with the caller's ``undo``.  Deferred grants are acknowledged as soon as they
arrive, so the controller can give back a grant that a dying container never
received.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections import deque

from . import wire
from .errors import REMOTE_ERRORS, ControllerGoneError, RemoteError, ProtocolError


# A plain binary reply (wire.encode_reply): header (length 22, no JSON), 0x80.
_REPLY_HEAD = wire._REPLY.pack(wire._REPLY_LEN, 0, wire.OP_REPLY, 0, 0, 0)[:9]
_REPLY_SIZE = wire._REPLY.size
_REPLY_TAIL = struct.Struct("!BQBq").unpack_from   # from offset 8: op, id, flags, value
_PLAIN = {1: None, 9: False, 13: True}             # flags of ok, not deferred, value 0


#: Non-blocking reads (each followed by sched_yield) a synchronous call tries
#: before it sleeps in recv: a reply that comes within some tens of us is
#: taken without a wake-up of this CPU (on one CPU the yield lets the
#: controller run at once).  Bounds the CPU a call spends waiting to ~60-80 us.
SPIN_READS = 60
_yield = os.sched_yield


class Channel:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        # Blocking: a synchronous call sleeps in recv() itself (one system
        # call per wait); every other read passes MSG_DONTWAIT.
        sock.setblocking(True)
        self.fd = sock.fileno()
        self._decoder = wire.Decoder(binary=True)
        self._next_id = 0
        self._results: dict[int, tuple] = {}        # replies to synchronous calls
        self._sync_ids: set[int] = set()
        self._futures: dict[int, asyncio.Future] = {}
        self._abandoned: dict[int, object] = {}     # call id -> undo(result) or None
        self._inbox: deque = deque()                # messages read during a sync call
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
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.fd)
        self.sock.close()
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(ControllerGoneError("the controller closed the channel"))
        self._futures.clear()

    # ---- calls ----
    def notify(self, proc: str, args: list, blob: bytes | None = None) -> None:
        """A call that wants no reply."""
        self._send(wire.encode_call(0, proc, args, blob))

    def call(self, proc: str, args: list, blob: bytes | None = None, undo=None):
        """Synchronous call; returns ``(result, blob)`` or raises the remote error."""
        if self._loop_thread is not None and threading.get_ident() != self._loop_thread:
            fut = asyncio.run_coroutine_threadsafe(self.acall(proc, args, blob, undo), self._loop)
            return fut.result()
        self._next_id = rid = self._next_id + 1
        sync_ids = self._sync_ids
        results = self._results
        sync_ids.add(rid)
        try:
            self._send(wire.encode_call(rid, proc, args, blob))
            # Read until the reply is there, and no further: what follows it
            # stays in the socket (or the decoder) for the loop's reader.
            # Blocking reads; a signal's handler runs, then the wait goes on.
            if not self._decoder.pending:
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
        except BaseException:
            sync_ids.discard(rid)
            if rid not in results:
                self._abandon(rid, undo)
            raise
        sync_ids.discard(rid)
        return _unwrap(results.pop(rid))

    async def acall(self, proc: str, args: list, blob: bytes | None = None, undo=None):
        rid = self._new_id()
        fut = self._loop.create_future()
        self._futures[rid] = fut
        self._send(wire.encode_call(rid, proc, args, blob))
        try:
            reply = await fut
        except asyncio.CancelledError:
            if self._futures.pop(rid, None) is not None:
                self._abandon(rid, undo)          # still pending at the controller
            elif fut.done() and not fut.cancelled():
                ok, result, _ = fut.result()      # granted, but no one will use it
                if ok and undo is not None:
                    undo(result)
            raise
        return _unwrap(reply)

    # ---- internals ----
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _abandon(self, rid: int, undo) -> None:
        self._abandoned[rid] = undo
        if not self.closed:
            try:
                self.notify("ctl.cancel", [rid])
            except ControllerGoneError:
                pass

    def _send(self, data: bytes) -> None:
        if self.closed:
            raise ControllerGoneError("the controller closed the channel")
        try:
            self.sock.sendall(data)     # blocking: waits while the controller is behind
        except OSError as e:
            self._eof()
            raise ControllerGoneError(f"the controller closed the channel: {e}") from None

    def _read_once(self) -> bool:
        """One recv without waiting: dispatch the frames it completes.  False
        if nothing was there; raises ControllerGoneError (EOF) or ProtocolError
        (garbage)."""
        try:
            data = self.sock.recv(1 << 18, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        self._process(data)
        return True

    def _recv_blocking(self) -> bytes:
        recv = self.sock.recv
        try:
            for _ in range(SPIN_READS):
                try:
                    return recv(1 << 18, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    _yield()
            return recv(1 << 18)
        except OSError:
            return b""

    def _process(self, data: bytes) -> None:
        """Dispatch the frames *data* completes (b"": EOF)."""
        if not data:
            self._eof()
            raise ControllerGoneError("the controller closed the channel")
        try:
            frames = self._decoder.feed(data)
        except ProtocolError:
            self._eof()
            raise
        for obj, blob in frames:
            self._dispatch(obj, blob)

    def _read_available(self) -> None:
        while self._read_once():
            pass

    def control_pending(self) -> bool:
        """Read what has arrived (without running any hook) and tell whether
        a lifecycle message (``["ctl", ...]``) is waiting to be handled.
        Loop thread only."""
        try:
            self._read_available()
        except (ControllerGoneError, ProtocolError):
            return True
        return any(obj[0] == "ctl" for obj, _ in self._inbox)

    def _on_readable(self) -> None:
        try:
            self._read_once()       # level-triggered: called again while more is there
        except (ControllerGoneError, ProtocolError):
            pass
        self._drain_inbox()

    def _dispatch(self, obj, blob) -> None:
        if obj[0] == "r":
            _, rid, ok, result, deferred = obj
            if deferred:
                self.notify("ctl.ack", [rid])
            reply = (ok, result, blob)
            if rid in self._abandoned:
                undo = self._abandoned.pop(rid)
                if ok and undo is not None:
                    undo(result)
            elif rid in self._sync_ids:
                self._results[rid] = reply
            else:
                fut = self._futures.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
        else:
            self._inbox.append((obj, blob))
            if self._loop is not None:
                self._loop.call_soon(self._drain_inbox)

    def _drain_inbox(self) -> None:
        while self._inbox and self._on_message is not None:
            obj, blob = self._inbox.popleft()
            self._on_message(obj, blob)

    def _eof(self) -> None:
        if self.closed:
            return
        self.close()
        if self._on_eof is not None and self._loop is not None:
            self._loop.call_soon(self._on_eof)


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
