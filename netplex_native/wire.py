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
"""

from __future__ import annotations

import json
import struct

from .errors import ProtocolError

HEADER = struct.Struct("!II")
#: Largest frame accepted (a shared variable's value must fit).
MAX_FRAME = 16 * 1024 * 1024

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_loads = json.loads


def encode(obj, blob: bytes | None = None) -> bytes:
    """One frame for *obj* (JSON-serialisable) and an optional blob."""
    body = _dumps(obj).encode("utf-8")
    blen = len(blob) if blob else 0
    total = 4 + len(body) + blen
    if total > MAX_FRAME:
        raise ValueError(f"frame of {total} bytes exceeds the limit of {MAX_FRAME} bytes")
    if blob:
        return b"".join((HEADER.pack(total, len(body)), body, blob))
    return HEADER.pack(total, len(body)) + body


class Decoder:
    """Incremental frame decoder.  ``feed(data)`` returns the complete frames as
    ``(obj, blob)`` pairs; a malformed frame raises ProtocolError, after which
    the stream is unusable (the peer is dropped)."""

    __slots__ = ("_buf",)

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[object, bytes | None]]:
        buf = self._buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= 8:
            total, jlen = HEADER.unpack_from(buf, pos)
            if total > MAX_FRAME:
                raise ProtocolError(f"frame of {total} bytes exceeds the limit of {MAX_FRAME} bytes")
            if total < 4 or jlen > total - 4:
                raise ProtocolError(f"malformed frame header (length {total}, JSON length {jlen})")
            end = pos + 4 + total
            if end > n:
                break
            jstart = pos + 8
            try:
                obj = _loads(bytes(buf[jstart:jstart + jlen]).decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise ProtocolError(f"frame body is not valid JSON: {e}") from None
            blob = bytes(buf[jstart + jlen:end]) if end > jstart + jlen else None
            out.append((obj, blob))
            pos = end
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)
