"""The admin socket: ``<socket_dir>/admin.sock``, for ``netplex-native admin``.

Server side runs in the controller.  Frames as in ``wire`` with JSON
objects only: nothing is ever unpickled here.  A peer of another uid is
refused (SO_PEERCRED); a malformed frame gets an error answer and the
connection is closed; the controller never dies of it.

Commands: ``list``, ``inspect``, ``message`` (pattern, name, args: to
``receive_admin_message``), ``restart`` (service), ``shutdown``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct

from . import wire
from .errors import NetplexError, ProtocolError, check_message

log = logging.getLogger("netplex_native")

MAX_ADMIN_FRAME = 1 << 20


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class AdminServer:
    def __init__(self, ctrl, path: str):
        self._ctrl = ctrl
        self.path = path
        self._server = None
        self._sock = None

    async def start(self) -> None:
        from .service import _remove_stale_unix_socket
        _remove_stale_unix_socket(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        s.listen(64)
        s.setblocking(False)
        self._sock = s
        self._server = await asyncio.start_unix_server(self._serve, sock=s)

    def close_in_child(self) -> None:
        if self._sock is not None:
            self._sock.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = peer_uid(sock)
            if uid != os.getuid():
                log.warning("admin: refused a peer of uid %d", uid)
                writer.write(wire.encode({"ok": False, "error": "permission denied: wrong uid"}))
                await writer.drain()
                # read (and ignore) what it sent, so closing does not reset
                # the connection before the answer is read
                try:
                    await asyncio.wait_for(reader.read(MAX_ADMIN_FRAME), 0.2)
                except asyncio.TimeoutError:
                    pass
                return
            dec = wire.Decoder()
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                if dec.pending + len(data) > MAX_ADMIN_FRAME:
                    raise ProtocolError(f"admin frame larger than {MAX_ADMIN_FRAME} bytes")
                for obj, _blob in dec.feed(data):
                    writer.write(wire.encode(self._handle(obj)))
                await writer.drain()
        except ProtocolError as e:
            try:
                writer.write(wire.encode({"ok": False, "error": f"protocol error: {e}"}))
            except Exception:
                pass
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.exception("admin connection failed")
        finally:
            try:
                writer.close()
            except Exception:
                pass

    def _handle(self, req) -> dict:
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": 'expected a JSON object {"cmd": ...}'}
        ctrl = self._ctrl
        cmd = req["cmd"]
        try:
            if cmd == "list":
                return {"ok": True, **ctrl.status()}
            if cmd == "inspect":
                return {"ok": True, "plugins": {p.name: p.inspect(ctrl) for p in ctrl.plugins()}}
            if cmd == "message":
                pattern, name, args = check_message(req.get("pattern"), req.get("name"), req.get("args", []))
                return {"ok": True, "delivered": ctrl.send_admin_message(pattern, name, args)}
            if cmd == "restart":
                service = req.get("service")
                return {"ok": True, "restarted": ctrl.restart_service(service)}
            if cmd == "shutdown":
                ctrl.shutdown()
                return {"ok": True}
            return {"ok": False, "error": f"unknown command {cmd!r}; known: list, inspect, message, restart, shutdown"}
        except (TypeError, ValueError, NetplexError) as e:
            return {"ok": False, "error": str(e)}


class AdminError(NetplexError):
    pass


def request(socket_dir: str, req: dict, timeout: float = 10.0) -> dict:
    """Send one admin request to the controller of *socket_dir*; its answer."""
    path = os.path.join(socket_dir, "admin.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise AdminError(f"no controller is running with socket directory {socket_dir} "
                             f"({e.strerror})") from None
        s.sendall(wire.encode(req))
        dec = wire.Decoder()
        while True:
            data = s.recv(65536)
            if not data:
                raise AdminError("the controller closed the admin connection without answering")
            frames = dec.feed(data)
            if frames:
                return frames[0][0]
    finally:
        s.close()
