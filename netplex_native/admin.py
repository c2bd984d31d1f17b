"""The admin socket: ``<socket_dir>/admin.sock``, for ``netplex-native admin``.

Server side runs in the controller.  Frames as in ``wire`` with JSON
objects only: nothing is ever unpickled here.  A peer of another uid is
refused (SO_PEERCRED); a malformed frame gets an error answer and the
connection is closed; the controller never dies of it.

Commands: ``list``, ``inspect``, ``message`` (pattern, name, args: to
``receive_admin_message``; an error when no service matches), ``restart``
(service), ``restart-all``, ``enable``/``disable`` (service), ``scale``
(service, workers), ``reload`` (answered once the new configuration is
loaded: an error says why it was not), ``log-level`` (level), ``shutdown``.
Bad input is an error answer naming what was wrong; nothing is changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct

from . import wire
from .errors import NetplexError, ProtocolError, check_message
from .logs import get_logger

log = get_logger("netplex_native.admin")

COMMANDS = ("list", "inspect", "message", "restart", "restart-all", "enable", "disable", "scale",
            "reload", "log-level", "shutdown")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

MAX_ADMIN_FRAME = 1 << 20
#: Most admin connections open at once; more are answered with an error and closed.
MAX_ADMIN_CONNECTIONS = 32
#: Seconds to write an answer to a client that does not read.
WRITE_TIMEOUT = 10.0


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class AdminServer:
    """Accepts on the admin socket itself, so that it owns every connection
    (closed in forked containers, timed out when idle, capped in number)."""

    def __init__(self, ctrl, path: str, idle_timeout: float = 60.0):
        self._ctrl = ctrl
        self.path = path
        self.idle_timeout = idle_timeout
        self._sock = None
        self._loop = None
        self._conns: dict[socket.socket, asyncio.Task] = {}

    async def start(self) -> None:
        from .service import _remove_stale_unix_socket
        _remove_stale_unix_socket(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            s.bind(self.path)
        except BaseException:
            s.close()
            raise
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        s.listen(64)
        s.setblocking(False)
        self._sock = s
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(s.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        for _ in range(16):
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:    # EMFILE: the connection waits in the backlog
                log.warning("admin: accept failed: %s; retrying in 0.5 s", e)
                fd = self._sock.fileno()
                self._loop.remove_reader(fd)     # level-triggered: no busy loop meanwhile

                def again(sock=self._sock):
                    if self._sock is sock:
                        self._loop.add_reader(fd, self._on_accept)
                self._loop.call_later(0.5, again)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._serve(conn))
            self._conns[conn] = task

    def close_in_child(self) -> None:
        """In a forked container: close the listening socket and every
        admin connection (their clients must see EOF when the controller
        closes them)."""
        if self._sock is not None:
            self._sock.close()
        for conn in list(self._conns):
            conn.close()
        self._conns.clear()

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for conn, task in list(self._conns.items()):
            task.cancel()
            conn.close()
        self._conns.clear()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _send(self, conn, data: bytes) -> None:
        await asyncio.wait_for(self._loop.sock_sendall(conn, data), WRITE_TIMEOUT)

    async def _serve(self, conn: socket.socket) -> None:
        loop = self._loop
        try:
            uid = peer_uid(conn)
            if uid != os.getuid():
                log.warning("admin: refused a peer of uid %d", uid)
                await self._send(conn, wire.encode({"ok": False, "error": "permission denied: wrong uid"}))
                # read (and ignore) what it sent, so closing does not reset
                # the connection before the answer is read
                try:
                    await asyncio.wait_for(loop.sock_recv(conn, MAX_ADMIN_FRAME), 0.2)
                except asyncio.TimeoutError:
                    pass
                return
            if len(self._conns) > MAX_ADMIN_CONNECTIONS:
                await self._send(conn, wire.encode(
                    {"ok": False, "error": f"too many admin connections (at most {MAX_ADMIN_CONNECTIONS})"}))
                return
            dec = wire.Decoder()
            while True:
                try:
                    data = await asyncio.wait_for(loop.sock_recv(conn, 65536), self.idle_timeout)
                except asyncio.TimeoutError:
                    log.info("admin: closing a connection idle for %.0f s", self.idle_timeout)
                    return
                if not data:
                    return
                if dec.pending + len(data) > MAX_ADMIN_FRAME:
                    raise ProtocolError(f"admin frame larger than {MAX_ADMIN_FRAME} bytes")
                for obj, _blob in dec.feed(data):
                    await self._send(conn, await self._answer(obj))
        except ProtocolError as e:
            try:
                await self._send(conn, wire.encode({"ok": False, "error": f"protocol error: {e}"}))
            except Exception:
                pass
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("admin connection failed")
        finally:
            self._conns.pop(conn, None)
            conn.close()

    async def _answer(self, req) -> bytes:
        """The encoded answer; one too large for a frame becomes an error."""
        ans = self._handle(req)
        if asyncio.iscoroutine(ans):
            ans = await ans
        try:
            return wire.encode(ans)
        except (ValueError, TypeError) as e:
            return wire.encode({"ok": False, "error": f"answer cannot be sent: {wire.safe_text(str(e), 300)}"})

    def _handle(self, req) -> dict:
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": 'expected a JSON object {"cmd": ...}'}
        ctrl = self._ctrl
        cmd = req["cmd"]
        try:
            if cmd == "list":
                return {"ok": True, **ctrl.status()}
            if cmd == "inspect":
                return {"ok": True, "plugins": {p.name: p.inspect(ctrl) for p in ctrl.plugins()},
                        "containers": {str(c.pid): c.id for c in ctrl.containers()}}
            if cmd == "message":
                pattern, name, args = check_message(req.get("pattern"), req.get("name"), req.get("args", []))
                return {"ok": True, "delivered": ctrl.send_admin_message(pattern, name, args)}
            if cmd == "restart":
                service = req.get("service")
                return {"ok": True, "restarted": ctrl.restart_service(service)}
            if cmd == "restart-all":
                return {"ok": True, "restarted": sum(ctrl.restart_service(s["name"])
                                                     for s in ctrl.status()["services"] if not s["removing"])}
            if cmd in ("enable", "disable"):
                changed = getattr(ctrl, cmd)(req.get("service"))
                return {"ok": True, "changed": changed}
            if cmd == "scale":
                workers = req.get("workers")
                if type(workers) is not int:
                    raise ValueError(f"workers must be an integer between 1 and 4096, got {workers!r}")
                return {"ok": True, "previous": ctrl.scale(req.get("service"), workers)}
            if cmd == "reload":
                return self._reload(ctrl._request_reload())
            if cmd == "log-level":
                level = req.get("level")
                if level not in LOG_LEVELS:
                    raise ValueError(f"level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
                ctrl.set_log_level(level)
                return {"ok": True}
            if cmd == "shutdown":
                ctrl.shutdown()
                return {"ok": True}
            return {"ok": False, "error": f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}"}
        except (TypeError, ValueError, NetplexError) as e:
            return {"ok": False, "error": str(e)}


    @staticmethod
    async def _reload(loaded: asyncio.Future) -> dict:
        """Answered once the new configuration is loaded and valid (then it
        is applied), or with the reason it was not."""
        error = await loaded
        return {"ok": True} if error is None else {"ok": False, "error": error}


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
        dec = wire.Decoder()
        try:
            try:
                s.sendall(wire.encode(req))
            except (BrokenPipeError, ConnectionResetError):
                pass        # it may have answered before closing (its connection cap): read that
            while True:
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    raise AdminError("the controller closed the admin connection without answering "
                                     "(is it shutting down?)")
                frames = dec.feed(data)
                if frames:
                    return frames[0][0]
        except TimeoutError:
            raise AdminError(f"no answer from the controller within {timeout:g} s "
                             "(what was asked may still be done: see its log)") from None
        except OSError as e:
            raise AdminError(f"admin connection to {path} failed: {e.strerror or e}") from None
    finally:
        s.close()
