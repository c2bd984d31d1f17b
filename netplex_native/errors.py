"""Exceptions of netplex_native, and the one place where arguments are validated.

Every exception the library raises on purpose derives from :class:`NetplexError`;
where a builtin fits, the class inherits it too (``except PermissionError`` works
for a shared-variable permission error).  Bad arguments raise plain
``TypeError``/``ValueError`` with a message that names the argument.
"""

from __future__ import annotations

import math

NAME_MAX_BYTES = 255
#: Largest semaphore value (the reference uses int64).
VALUE_MAX = 2**63 - 1


class NetplexError(Exception):
    """Base class of every error raised by netplex_native."""


class PluginNotAddedError(NetplexError, RuntimeError):
    """A primitive was used but its plugin was never added to the controller."""


class NotInContainerError(NetplexError, RuntimeError):
    """A primitive or cenv function was called outside any controller or container."""


class NotHolderError(NetplexError, RuntimeError):
    """A mutex was unlocked by a process that does not hold it (or nobody
    holds it).  Nothing was changed; ``unlock(force=True)`` frees whoever
    holds it."""


class WouldBlockError(NetplexError, RuntimeError):
    """A blocking wait was requested in the controller, whose loop must never block."""


class NestedWaitError(NetplexError, RuntimeError):
    """A call on the native backend that would have to wait, from a thread
    that is already waiting: a signal handler that runs during a wait
    (between its slices) may take what is free, blocking or not, and give
    it back, but not wait itself.  Nothing was taken."""


class TableFullError(NetplexError, MemoryError):
    """A table of the native shared-memory segment (semaphores, mutexes,
    processes or threads) is full.  Nothing was changed."""


class SharedVarPermissionError(NetplexError, PermissionError):
    """A read-only shared variable was written by a service that does not own it."""


class SharedVarTypeError(NetplexError, TypeError):
    """A shared variable was given a value of the wrong kind (``str`` for plain
    variables, any picklable object for ``enc=True`` ones)."""


class ControllerGoneError(NetplexError, ConnectionError):
    """The controller closed the channel (it died or is shutting down)."""


class ProtocolError(NetplexError, ValueError):
    """A malformed frame arrived on a channel or the admin socket."""


class SegmentError(NetplexError, OSError):
    """The native shared-memory segment could not be created, mapped or is corrupt."""


class AsyncWaitHelperError(NetplexError, RuntimeError):
    """An awaitable native wait needs this process's helper thread (one per
    process and domain) and it could not be started (RLIMIT_NPROC, memory);
    nothing was queued.  Raise the limit, or wait synchronously."""


class NativeUnavailableError(NetplexError, ImportError):
    """The compiled native core (netplex_native._core) is not importable."""


class ServiceConfigError(NetplexError, ValueError):
    """A service definition or configuration file is invalid."""


class LeaseLostError(NetplexError, RuntimeError):
    """etcd backend: this process's lease expired (its machine was cut off
    or stopped for longer than the lease TTL), so what it held has been
    given back and others may hold it now.  Raised by operations that act
    as a holder (unlock, a protected increment, a guarded write); the
    process gets a new lease for what it does next."""


class EtcdUnavailableError(NetplexError, ConnectionError):
    """etcd backend: no etcd endpoint answered within the operation's time
    (``Backend(op_timeout=...)``, or the wait's own timeout)."""


class RemoteError(NetplexError):
    """An error raised in the controller while serving a container's request,
    of a kind that has no local class."""


# Error classes that may travel from the controller to a container by name.
REMOTE_ERRORS: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (
        NetplexError, PluginNotAddedError, NotInContainerError, WouldBlockError, NotHolderError,
        TableFullError, SharedVarPermissionError, SharedVarTypeError,
        ControllerGoneError, ProtocolError, RemoteError, TypeError, ValueError, OverflowError,
        NotHolderError, LeaseLostError, EtcdUnavailableError,
    )
}


def check_name(name: object, what: str = "name") -> str:
    """Return *name* if it is a valid primitive name, else raise TypeError/ValueError.

    Valid: a non-empty ``str`` of at most 255 bytes in UTF-8, without NUL.
    """
    if type(name) is not str:
        if isinstance(name, str):  # a str subclass: normalise
            name = str(name)
        else:
            raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError(f"{what} must not be empty")
    if "\x00" in name:
        raise ValueError(f"{what} must not contain NUL characters: {name!r}")
    try:
        n = len(name.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not encodable as UTF-8: {name!r}") from e
    if n > NAME_MAX_BYTES:
        raise ValueError(f"{what} is {n} bytes in UTF-8; at most {NAME_MAX_BYTES} are allowed")
    return name


def check_int(value: object, what: str, lo: int = 0, hi: int = VALUE_MAX) -> int:
    """An int (not a bool) in [lo, hi]."""
    if type(value) is bool or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{what} must be between {lo} and {hi}, got {value}")
    return int(value)


def check_bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise TypeError(f"{what} must be a bool, not {type(value).__name__}")
    return value


def check_timeout(timeout: object, what: str = "timeout") -> float | None:
    """None (wait forever) or a finite number of seconds >= 0."""
    if timeout is None:
        return None
    if type(timeout) is bool or not isinstance(timeout, (int, float)):
        raise TypeError(f"{what} must be None or a number of seconds, not {type(timeout).__name__}")
    t = float(timeout)
    if math.isnan(t) or t < 0:
        raise ValueError(f"{what} must be >= 0 seconds, got {timeout!r}")
    if math.isinf(t):
        return None
    return t


def check_interval(interval: object) -> float:
    """A timer interval: a finite number of seconds > 0."""
    if type(interval) is bool or not isinstance(interval, (int, float)):
        raise TypeError(f"interval must be a number of seconds, not {type(interval).__name__}")
    t = float(interval)
    if not (t > 0) or math.isinf(t):
        raise ValueError(f"interval must be a finite number of seconds > 0, got {interval!r}")
    return t


def check_message(pattern: object, name: object, args: object) -> tuple[str, str, list[str]]:
    """Validate a broadcast message: pattern and name are str, args a sequence of str."""
    if not isinstance(pattern, str) or not pattern:
        raise TypeError(f"pattern must be a non-empty str, not {pattern!r}")
    if not isinstance(name, str):
        raise TypeError(f"message name must be a str, not {type(name).__name__}")
    if args is None:
        args = ()
    if isinstance(args, (str, bytes)) or not isinstance(args, (list, tuple)):
        raise TypeError(f"message args must be a list or tuple of str, not {type(args).__name__}")
    out = []
    for i, a in enumerate(args):
        if not isinstance(a, str):
            raise TypeError(f"message args[{i}] must be a str, not {type(a).__name__}")
        out.append(str(a))
    return str(pattern), str(name), out
