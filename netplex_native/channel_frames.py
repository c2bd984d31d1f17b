"""In the container process: how its channel's reader turns received bytes
into dispatched frames (netplex_native/channel.py owns the channel).

``send``, ``recv`` and ``dispatch`` are the accelerator's
(csrc/fast/container_channel.c, whose top states C0, C1 and C2): there no
bytecode, hence no Python signal handler, runs between a send and the
removal of the bytes sent from the write buffer (C0), between a recv and
the append of its bytes to the read buffer (C1), nor between a frame's
effect and the removal of its bytes (C2), so a handler that raises on the
main thread never loses or repeats a frame.  The Python versions below do the same steps in
the same order, for a build without the accelerator; there a handler that
raises can fall between two of them (the defect C1/C2 close).

``decode`` decodes one frame for ``dispatch`` (every frame the C code does
not decode itself: JSON frames, malformed ones), from a copy of its bytes
(a signal handler that runs meanwhile may itself dispatch the buffer).  It
has no effect: a frame it raises on stays whole in the buffer.
"""

from __future__ import annotations

import socket

from . import wire
from .errors import ProtocolError

_unpack_header = wire.HEADER.unpack_from
_U64 = 1 << 64


def decode(buf, pos: int) -> tuple:
    """The frame at *buf*[pos:]: ``(end, rid, ok, result, deferred, blob)``
    for a reply, ``(end, obj, blob)`` for anything else (a message),
    ``(end,)`` for a reply to an id no call of ours can have.
    ProtocolError on garbage; the caller has checked that the frame is
    complete, or that its header is wrong."""
    total, jlen = _unpack_header(buf, pos)
    if total > wire.MAX_FRAME:
        raise ProtocolError(f"frame of {total} bytes exceeds the limit of {wire.MAX_FRAME} bytes")
    if total < 4 or jlen > total - 4:
        raise ProtocolError(f"malformed frame header (length {total}, JSON length {jlen})")
    end = pos + 4 + total
    jstart = pos + 8
    blob = None
    if jlen:
        try:
            obj = wire._loads(buf[jstart:jstart + jlen].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ProtocolError(f"frame body is not valid JSON: {e}") from None
        if end > jstart + jlen:
            blob = bytes(buf[jstart + jlen:end])
    else:
        obj = wire._decode_binary(buf, jstart, end)
    if type(obj) is not list or not obj:
        raise ProtocolError(f"a frame to a container must be a non-empty JSON array, not {type(obj).__name__}")
    if obj[0] == "r":
        if len(obj) != 5:
            raise ProtocolError(f"a reply has 5 elements, not {len(obj)}")
        _, rid, ok, result, deferred = obj
        if type(ok) is not bool:
            raise ProtocolError(f"malformed reply (ok {wire.safe_text(repr(ok), 40)})")
        if type(rid) is not int or not 0 <= rid < _U64:
            return (end,)       # answers no call of ours (ids are u64): nothing to do
        return end, rid, ok, result, bool(deferred), blob
    return end, obj, blob


def recv(sock: socket.socket, buf: bytearray, wait: bool) -> int:
    """C1 (csrc/fast/container_channel.c, chan_recv, which takes the socket's
    file descriptor instead): one recv appended to *buf*.  n > 0 bytes; 0
    end of stream (or any error but EAGAIN); -1 nothing there (*wait*
    false)."""
    try:
        data = sock.recv(1 << 16, 0 if wait else socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return -1
    except OSError:
        return 0
    buf += data
    return len(data)


def send(sock: socket.socket, wbuf: bytearray, count: list) -> int:
    """C0 (chan_send, which takes the socket's file descriptor instead): one
    send of *wbuf*'s head; the bytes sent leave *wbuf* and are added to
    count[0].  n > 0 bytes sent; 0 no room (or nothing to send); -1 the
    socket is broken."""
    if not wbuf:
        return 0
    try:     # a copy: wbuf itself must not be exported while other threads append to it
        n = sock.send(bytes(wbuf[:1 << 16]), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError:
        return -1
    del wbuf[:n]
    count[0] += n
    return n


def granted(ok, result) -> bool:
    """Was a call granted something its undo gives back (C: give_back)?"""
    return ok is True and (result is True or (type(result) is int and result >= 0))


def dispatch(buf: bytearray, state: tuple) -> bool:
    """C2 (chan_dispatch): every complete frame at *buf*'s head, in order:
    its effect, then its bytes removed.  *state*: Channel._dispatch_state().
    True if a synchronous caller's reply was delivered."""
    (decode_, sync_ids, results, abandoned, futures, wbuf, deliveries, inbox, icount,
     (max_n, max_b)) = state
    woke = False
    while len(buf) >= 8:                # each frame leaves the buffer with its effect
        total = _unpack_header(buf, 0)[0]
        if 4 <= total <= wire.MAX_FRAME and 4 + total > len(buf):
            break
        f = decode_(bytes(buf[:4 + total] if 4 <= total <= wire.MAX_FRAME else buf[:8]), 0)
        if len(f) == 6:
            end, rid, ok, result, deferred, blob = f
            if deferred:
                wbuf += wire.encode_call(0, "ctl.ack", [rid])
            reply = (ok, result, blob)
            if rid in abandoned:
                undo = abandoned.pop(rid)
                if undo is not None and granted(ok, result):
                    wbuf += undo
            elif rid in sync_ids:
                results[rid] = reply
                woke = True
            elif rid in futures:
                fut, undo = futures.pop(rid)
                deliveries.append([fut, undo, reply])
        elif len(f) == 3:
            end, obj, blob = f
            if obj[0] != "ctl" and (len(inbox) >= max_n or icount[0] + end > max_b):
                icount[1] += 1
            else:
                inbox.append((obj, blob, end))
                icount[0] += end
        else:
            end = f[0]
        del buf[:end]
    return woke
