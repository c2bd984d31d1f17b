"""Service: a name, a connection handler, hooks, an address and a worker count."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .errors import check_name, ServiceConfigError
from .hooks import ProcessorHooks


@dataclass(frozen=True)
class Address:
    """A parsed service address: ``tcp://HOST:PORT`` or ``unix:///path``."""

    scheme: str          # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_address(address: str) -> Address:
    """Parse a service address; ValueError says what was expected."""
    if not isinstance(address, str):
        raise TypeError(f"address must be a str like 'tcp://127.0.0.1:8000' or 'unix:///path', "
                        f"not {type(address).__name__}")
    if address.startswith("unix://"):
        path = address[len("unix://"):]
        if not path.startswith("/"):
            raise ValueError(f"unix address must be absolute, like 'unix:///run/app.sock': {address!r}")
        if "\x00" in path or len(os.fsencode(path)) > 107:
            raise ValueError(f"unix socket path too long (at most 107 bytes) or contains NUL: {address!r}")
        return Address("unix", path=path)
    if address.startswith("tcp://"):
        rest = address[len("tcp://"):]
        if rest.startswith("["):
            host, sep, port = rest[1:].partition("]:")
        else:
            host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise ValueError(f"tcp address must be 'tcp://HOST:PORT': {address!r}")
        try:
            p = int(port, 10)
        except ValueError:
            raise ValueError(f"tcp port must be a number in 0..65535: {address!r}") from None
        if not 0 <= p <= 65535:
            raise ValueError(f"tcp port must be a number in 0..65535: {address!r}")
        return Address("tcp", host=host, port=p)
    raise ValueError(f"address must start with 'tcp://' or 'unix://': {address!r}")


def bind(addr: Address) -> socket.socket:
    """A listening socket for *addr* (inherited by the service's containers)."""
    if addr.scheme == "unix":
        _remove_stale_unix_socket(addr.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(addr.path)
        except OSError:
            s.close()
            raise
    else:
        infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, stype, proto, _, sockaddr = infos[0]
        s = socket.socket(family, stype, proto)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError:
            s.close()
            raise
    s.listen(1024)
    s.setblocking(False)
    return s


def bound_address(addr: Address, sock: socket.socket) -> Address:
    """The address actually bound (port 0 resolved)."""
    if addr.scheme == "unix":
        return addr
    host, port = sock.getsockname()[:2]
    return Address("tcp", host=host, port=port)


def _remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file no one listens on; refuse to touch anything else."""
    import stat
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServiceConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ServiceConfigError(f"{path}: another process is listening on this socket")


class Service:
    """A service: ``workers`` containers that each run ``handler`` for the
    connections accepted on ``address`` (or none, for a worker pool without a
    socket), with ``hooks`` called at every point of their life.

    ``max_connections``: a container stops accepting after this many
    connections (plus a random 0..``max_connections_jitter``, drawn per
    container, so that they do not all recycle at once), finishes the ones it
    serves and ends; a new one takes its place (gunicorn's max_requests,
    Netplex's conn_limit).  None: no limit.

    Dynamic workload (Netplex's dynamic workload manager), when
    ``max_workers`` is given: between ``workers`` and ``max_workers``
    containers, each counted as able to serve ``connections_per_container``
    connections at once; a container is added when fewer than
    ``min_free_connections`` are free over the service, and an idle one
    retired when more than ``max_free_connections`` (default and least:
    ``min_free_connections + connections_per_container - 1``) have been free
    for a second."""

    def __init__(self, name: str,
                 handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] | None = None,
                 *, hooks: ProcessorHooks | None = None, address: str | None = None,
                 workers: int = 1, max_connections: int | None = None,
                 max_connections_jitter: int = 0, max_workers: int | None = None,
                 connections_per_container: int = 1, min_free_connections: int = 1,
                 max_free_connections: int | None = None) -> None:
        self.name = check_name(name, "service name")
        if any(c in self.name for c in "*/"):
            raise ValueError(f"service name must not contain '*' or '/': {name!r}")
        if any(not c.isprintable() for c in self.name):   # '\n' would forge log lines
            raise ValueError(f"service name must not contain control characters: {name!r}")
        if handler is not None:
            if not callable(handler):
                raise TypeError(f"handler must be an async function (reader, writer), not {type(handler).__name__}")
            if not (inspect.iscoroutinefunction(handler)
                    or inspect.iscoroutinefunction(getattr(handler, "__call__", None))):
                raise TypeError("handler must be an async function taking (reader, writer)")
        if hooks is None:
            hooks = ProcessorHooks()
        elif not isinstance(hooks, ProcessorHooks):
            raise TypeError(f"hooks must be a ProcessorHooks instance, not {type(hooks).__name__}")
        if type(workers) is bool or not isinstance(workers, int):
            raise TypeError(f"workers must be an int, not {type(workers).__name__}")
        if not 1 <= workers <= 4096:
            raise ValueError(f"workers must be between 1 and 4096, got {workers}")
        self.handler = handler
        self.hooks = hooks
        self.address = parse_address(address) if address is not None else None
        if self.address is not None and handler is None:
            raise ValueError(f"service {self.name!r} has an address but no handler")
        self.workers = workers
        for what, v, low in (("max_connections", max_connections, 1),
                             ("max_connections_jitter", max_connections_jitter, 0)):
            if v is None and what == "max_connections":
                continue
            if type(v) is not int or not low <= v <= 2 ** 31:
                raise ValueError(f"{what} must be an integer between {low} and {2 ** 31}, got {v!r}")
        if max_connections_jitter and max_connections is None:
            raise ValueError("max_connections_jitter needs max_connections")
        self.max_connections = max_connections
        self.max_connections_jitter = max_connections_jitter
        if max_workers is not None:
            if type(max_workers) is not int or not workers <= max_workers <= 4096:
                raise ValueError(f"max_workers must be an integer between workers ({workers}) and 4096, "
                                 f"got {max_workers!r}")
            if self.address is None:
                raise ValueError(f"service {self.name!r}: a dynamic workload (max_workers) needs an address")
        for what, v, low in (("connections_per_container", connections_per_container, 1),
                             ("min_free_connections", min_free_connections, 0)):
            if type(v) is not int or not low <= v <= 2 ** 31:
                raise ValueError(f"{what} must be an integer between {low} and {2 ** 31}, got {v!r}")
        least = min_free_connections + connections_per_container - 1   # below it, it would flap
        if max_free_connections is None:
            max_free_connections = least
        if type(max_free_connections) is not int or not least <= max_free_connections <= 2 ** 31:
            raise ValueError(f"max_free_connections must be an integer of at least min_free_connections + "
                             f"connections_per_container - 1 ({least}), got {max_free_connections!r}")
        self.max_workers = max_workers
        self.connections_per_container = connections_per_container
        self.min_free_connections = min_free_connections
        self.max_free_connections = max_free_connections

    def __repr__(self) -> str:
        return f"Service({self.name!r}, address={str(self.address) if self.address else None!r}, workers={self.workers})"
