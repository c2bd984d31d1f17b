"""netplex_native: multi-process network services with crash-safe primitives.

A controller forks and supervises containers; containers serve connections
and coordinate through semaphores, mutexes, shared variables, messages and
timers, which survive crashes: what a dead container held is given back.
See README.md.
"""

from .errors import (NetplexError, PluginNotAddedError, NotInContainerError, WouldBlockError, NestedWaitError,
                     NotHolderError,
                     TableFullError, SharedVarPermissionError, SharedVarTypeError,
                     ControllerGoneError, ProtocolError, SegmentError, NativeUnavailableError,
                     ServiceConfigError, RemoteError, LeaseLostError,
                     EtcdUnavailableError, AsyncWaitHelperError)
from .hooks import ProcessorHooks
from .service import Service
from .container import Container, Timer
from .controller import Controller
from .plugin import Plugin
from . import semaphore, mutex, sharedvar, cenv
from .domain import Domain

__version__ = "0.1.0"

__all__ = [
    "Controller", "Service", "ProcessorHooks", "Container", "Timer", "Plugin",
    "semaphore", "mutex", "sharedvar", "cenv", "Domain",
    "NetplexError", "PluginNotAddedError", "NotInContainerError", "WouldBlockError", "NestedWaitError", "NotHolderError",
    "TableFullError", "SharedVarPermissionError", "SharedVarTypeError", "ControllerGoneError",
    "ProtocolError", "SegmentError", "NativeUnavailableError", "ServiceConfigError", "RemoteError",
    "LeaseLostError", "EtcdUnavailableError", "AsyncWaitHelperError",
]
