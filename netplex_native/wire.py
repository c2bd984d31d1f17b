"""Frames on the controller's sockets (container channels and the admin socket).

A frame is ``u32 length | u32 json_length | JSON | blob``: the JSON part is an
array that says what the frame is; the optional blob carries opaque bytes (the
pickled value of an ``enc`` shared variable) without an encoding round trip.
Nothing here unpickles anything: pickles travel as opaque blobs between
containers of one program.

Frame kinds (first JSON element):

container -> controller
    ``[id, proc, args]``   a call; ``id == 0``: no reply wanted
controller -> container
    ``["r", id, ok, result]``  reply; when not ok, result is ``[error_class, message]``
    ``["m", name, args]``      a broadcast message (``receive_message``)
    ``["a", name, args]``      an admin message (``receive_admin_message``)
    ``["ctl", what]``           lifecycle: ``system_shutdown``, ``shutdown``
admin client <-> controller
    ``{"cmd": ..., ...}`` -> ``{"ok": bool, ...}``  (JSON objects, no blob)

Binary frames (``json_length == 0``; an empty JSON part is otherwise invalid)
carry the hot calls and their plain answers in a fixed layout; they decode to
the same JSON shapes as above, so everything past the decoder is unchanged:

    call   ``u8 op | u64 id | u8 flags | f64 timeout | name (UTF-8)``
           op: 1 ``sem.increment [name]``, 2 ``sem.decrement [name, wait, timeout]``
           (flags bit 0: wait), 3 ``sem.get [name]``, 4 ``mutex.lock [name, timeout]``,
           5 ``mutex.unlock [name, force]`` (flags bit 0: force); timeout NaN:
           None (ops 2 and 4 only)
    reply  ``u8 0x80 | u64 id | u8 flags | i64 value``: ``["r", id, true, result, deferred]``
           flags: bit 0 ok (always set), bit 1 deferred, bits 2-3 the result
           (0 None, 1 the int value, 2 false, 3 true; value 0 unless an int)
The admin socket never uses them.
"""

from __future__ import annotations

import json
import struct

from .errors import ProtocolError

HEADER = struct.Struct("!II")
#: Largest frame accepted, in either direction.  Checked by the sender before
#: anything is sent or stored, and by the decoder before anything is buffered.
MAX_FRAME = 16 * 1024 * 1024
#: Largest shared-variable value (its JSON text, or its pickle): whatever is
#: stored must fit in the reply that carries it, with room for the envelope.
MAX_VALUE = MAX_FRAME - 4096
#: Longest error message sent in a reply (longer ones are cut).
MAX_ERROR_TEXT = 2000

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_loads = json.loads
_unpack_header = HEADER.unpack_from


class FrameTooLargeError(ValueError):
    """A frame (or a value that must travel in one) exceeds MAX_FRAME."""


def encode(obj, blob: bytes | None = None) -> bytes:
    """One frame for *obj* (JSON-serialisable) and an optional blob.  Raises
    FrameTooLargeError (a ValueError) or UnicodeEncodeError (a lone surrogate)
    before anything is sent."""
    body = _dumps(obj).encode("utf-8")
    blen = len(blob) if blob else 0
    total = 4 + len(body) + blen
    if total > MAX_FRAME:
        raise FrameTooLargeError(f"frame of {total} bytes exceeds the limit of {MAX_FRAME} bytes")
    if blob:
        return b"".join((HEADER.pack(total, len(body)), body, blob))
    return HEADER.pack(total, len(body)) + body


class RawJSON(bytes):
    """A JSON value already encoded (UTF-8), spliced into a reply as it is:
    a shared variable's value is encoded once when set, and every reply that
    carries it shares the same bytes (no copy per waiter)."""

    __slots__ = ()


def json_value(value) -> RawJSON:
    """*value* as RawJSON; UnicodeEncodeError for a lone surrogate."""
    return RawJSON(_dumps(value).encode("utf-8"))


def reply_parts(rid: int, result, deferred: bool = False, blob: bytes | None = None) -> tuple:
    """The frame of a successful answer as a tuple of buffers, sharing
    *blob* and a RawJSON *result* instead of copying them.  Raises
    FrameTooLargeError before anything is sent."""
    if type(result) is RawJSON:
        head = b'["r",%d,true,' % rid
        tail = b",true]" if deferred else b",false]"
        jlen = len(head) + len(result) + len(tail)
        total = 4 + jlen + (len(blob) if blob else 0)
        if total > MAX_FRAME:
            raise FrameTooLargeError(f"reply of {total} bytes exceeds the limit of {MAX_FRAME} bytes")
        parts = (HEADER.pack(total, jlen) + head, result, tail)
        return parts + (blob,) if blob else parts
    if blob:
        body = _dumps(["r", rid, True, result, bool(deferred)]).encode("utf-8")
        total = 4 + len(body) + len(blob)
        if total > MAX_FRAME:
            raise FrameTooLargeError(f"reply of {total} bytes exceeds the limit of {MAX_FRAME} bytes")
        return (HEADER.pack(total, len(body)) + body, blob)
    return (encode_reply(rid, result, deferred),)


def safe_text(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """*text* cut to *limit* characters, lone surrogates escaped: always
    encodable, always small."""
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text) - limit} more characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_frame(rid: int, exc: BaseException) -> bytes:
    """The frame of a failed answer, named by the nearest class the
    container knows; never raises, never exceeds a few KB."""
    from .errors import REMOTE_ERRORS
    name = "RemoteError"
    for cls in type(exc).__mro__:
        if REMOTE_ERRORS.get(cls.__name__) is cls:
            name = cls.__name__
            break
    return encode(["r", rid, False, [name, safe_text(str(exc))], False])


# ---- binary frames ----
_CALL = struct.Struct("!IIBQBd")      # header, op, id, flags, timeout; the name follows
_REPLY = struct.Struct("!IIBQBq")     # header, 0x80, id, flags, value
_CALL_BODY = struct.Struct("!BQBd")
_REPLY_BODY = struct.Struct("!BQBq")
_CALL_FIXED = _CALL.size - 4          # frame length of a call without its name
_REPLY_LEN = _REPLY.size - 4
_NAN = float("nan")
OP_REPLY = 0x80
CALL_OPS = {"sem.increment": 1, "sem.decrement": 2, "sem.get": 3, "mutex.lock": 4, "mutex.unlock": 5}
_OP_PROCS = {v: k for k, v in CALL_OPS.items()}
_U64 = 1 << 64
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_F_LIMIT = 1 << 53
_NAME_LIMIT = 4096                    # longer names go as JSON (and are refused there)


def encode_call(rid: int, proc: str, args: list, blob: bytes | None = None) -> bytes:
    """The frame of a call ``[rid, proc, args]``: binary when the call has
    the shape of a hot procedure, else JSON (same meaning either way)."""
    op = CALL_OPS.get(proc)
    if op is not None and blob is None and type(rid) is int and 0 <= rid < _U64 and type(args) is list and args:
        name = args[0]
        if type(name) is str and len(name) <= _NAME_LIMIT:
            n = len(args)
            flags = 0
            timeout = _NAN
            ok = n == 1
            if op == 2:
                if n == 3 and type(args[1]) is bool:
                    flags = 1 if args[1] else 0
                    timeout = _bin_timeout(args[2])
                    ok = timeout is not None
                else:
                    ok = False
            elif op == 4:
                if n == 2:
                    timeout = _bin_timeout(args[1])
                    ok = timeout is not None
                else:
                    ok = False
            elif op == 5:
                ok = n == 2 and type(args[1]) is bool
                flags = 1 if ok and args[1] else 0
            if ok:
                try:
                    nb = name.encode("utf-8")
                except UnicodeEncodeError:
                    pass
                else:
                    return _CALL.pack(_CALL_FIXED + len(nb), 0, op, rid, flags, timeout) + nb
    return encode([rid, proc, args], blob)


def _bin_timeout(t):
    """The f64 of a timeout argument (NaN: None), or None if it has no exact one."""
    if t is None:
        return _NAN
    tt = type(t)
    if tt is float:
        return t if t == t else None
    if tt is int and -_F_LIMIT <= t <= _F_LIMIT:
        return float(t)
    return None


def encode_reply(rid: int, result, deferred: bool = False, blob: bytes | None = None) -> bytes:
    """The frame of a successful answer ``["r", rid, True, result, deferred]``."""
    if blob is None and type(rid) is int and 0 <= rid < _U64:
        d = 3 if deferred else 1
        if result is None:
            return _REPLY.pack(_REPLY_LEN, 0, OP_REPLY, rid, d, 0)
        tr = type(result)
        if tr is int:
            if _I64_MIN <= result <= _I64_MAX:
                return _REPLY.pack(_REPLY_LEN, 0, OP_REPLY, rid, d | 4, result)
        elif tr is bool:
            return _REPLY.pack(_REPLY_LEN, 0, OP_REPLY, rid, d | (12 if result else 8), 0)
    return encode(["r", rid, True, result, bool(deferred)], blob)


def _decode_binary(data, start: int, end: int):
    """A binary frame body ``data[start:end]`` -> its JSON-shaped value."""
    size = end - start
    if size < 1:
        raise ProtocolError("empty frame body")
    op = data[start]
    if op == OP_REPLY:
        if size != _REPLY_LEN - 4:
            raise ProtocolError(f"binary reply of {size} bytes (expected {_REPLY_LEN - 4})")
        _, rid, flags, value = _REPLY_BODY.unpack_from(data, start)
        kind = flags >> 2
        if flags & 1 == 0 or kind > 3 or (kind != 1 and value):
            raise ProtocolError(f"malformed binary reply (flags {flags:#x})")
        result = value if kind == 1 else (None, None, False, True)[kind]
        return ["r", rid, True, result, bool(flags & 2)]
    proc = _OP_PROCS.get(op)
    if proc is None:
        raise ProtocolError(f"unknown binary frame kind {op:#x}")
    if size < _CALL_FIXED - 4:
        raise ProtocolError(f"binary call of {size} bytes (at least {_CALL_FIXED - 4} expected)")
    _, rid, flags, timeout = _CALL_BODY.unpack_from(data, start)
    if flags & ~(1 if op in (2, 5) else 0):
        raise ProtocolError(f"malformed binary call (op {op}, flags {flags:#x})")
    try:
        name = data[start + _CALL_FIXED - 4:end].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"binary call name is not valid UTF-8: {e}") from None
    if op == 2:
        return [rid, proc, [name, flags == 1, None if timeout != timeout else timeout]]
    if op == 4:
        return [rid, proc, [name, None if timeout != timeout else timeout]]
    if op == 5:
        return [rid, proc, [name, flags == 1]]
    return [rid, proc, [name]]


class Decoder:
    """Incremental frame decoder.  ``feed(data)`` returns the complete frames as
    ``(obj, blob)`` pairs; a malformed frame raises ProtocolError, after which
    the stream is unusable (the peer is dropped).  *binary*: accept binary
    frames too (container channels); without it (the admin socket) a frame
    with an empty JSON part is malformed."""

    __slots__ = ("_buf", "_binary")

    def __init__(self, binary: bool = False):
        self._buf = bytearray()
        self._binary = binary

    def feed(self, data: bytes) -> list[tuple[object, bytes | None]]:
        buf = self._buf
        if buf:
            buf += data
            data = buf
        out = []
        pos = 0
        n = len(data)
        while n - pos >= 8:
            total, jlen = _unpack_header(data, pos)
            if total > MAX_FRAME:
                raise ProtocolError(f"frame of {total} bytes exceeds the limit of {MAX_FRAME} bytes")
            if total < 4 or jlen > total - 4:
                raise ProtocolError(f"malformed frame header (length {total}, JSON length {jlen})")
            end = pos + 4 + total
            if end > n:
                break
            jstart = pos + 8
            if jlen:
                try:
                    obj = _loads(data[jstart:jstart + jlen].decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError) as e:
                    raise ProtocolError(f"frame body is not valid JSON: {e}") from None
                blob = bytes(data[jstart + jlen:end]) if end > jstart + jlen else None
                out.append((obj, blob))
            elif self._binary:
                out.append((_decode_binary(data, jstart, end), None))
            else:
                raise ProtocolError("frame body is not valid JSON: empty JSON part")
            pos = end
        if data is buf:
            if pos:
                del buf[:pos]
        elif pos < n:
            buf += data[pos:]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)
