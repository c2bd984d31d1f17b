"""Which process this is (controller or container) and its primitive backends.

One ``Context`` per process, in :data:`ctx`.  The public modules
(``semaphore``, ``mutex``, ``sharedvar``, ``cenv``) call through
``ctx.sem`` / ``ctx.mutex`` / ``ctx.var``: a backend object chosen from the
plugins the controller has, or a placeholder that raises the right error.

Invariant: whenever ``ctx.sem`` or ``ctx.mutex`` is set, the accelerator
(csrc/fast/public_functions.c, its registry) is told at once, so the public functions and
handles that read the backend there read what ``ctx`` holds.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])

from .errors import NotInContainerError, PluginNotAddedError

try:
    from ._fast import Forward as _Forward, set_backend as _fast_set_backend  # type: ignore[import-not-found]
except ImportError:
    _Forward = _fast_set_backend = None

KINDS = {"semaphore": "sem", "mutex": "mutex", "sharedvar": "var"}


class _Unavailable:
    """Stands in for a backend that is not there; every call raises."""

    def __init__(self, kind: str, outside: bool) -> None:
        self._kind = kind
        self._outside = outside

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise self.error()

    def error(self) -> Exception:
        k = self._kind
        if self._outside:
            return NotInContainerError(
                f"netplex_native.{k} used outside any controller or container: "
                f"call it from a hook, timer or handler of a running service")
        plugins = {"semaphore": "semaphore.plugin or semaphore.native_plugin",
                   "mutex": "mutex.plugin or mutex.native_plugin",
                   "sharedvar": "sharedvar.plugin"}[k]
        return PluginNotAddedError(
            f"netplex_native.{k} used but no {k} plugin was added: call "
            f"ctrl.add_plugin({plugins}) in post_add_hook")


class Context:
    role: str | None
    controller: Any
    container: Any
    channel: Any
    runtime: Any
    sem: Any                      # the semaphore backend (see the module doc)
    mutex: Any                    # the mutex backend
    var: Any                      # the shared-variable backend

    def __init__(self) -> None:
        self.reset()

    def __setattr__(self, attr: str, value: Any) -> None:
        object.__setattr__(self, attr, value)
        if _fast_set_backend is not None and (attr == "sem" or attr == "mutex"):
            _fast_set_backend(attr, value)

    def reset(self) -> None:
        self.role = None          # None, "controller" or "container"
        self.controller = None    # the Controller (in containers: the forked copy)
        self.container = None     # the Container (container processes only)
        self.channel = None       # container side of the RPC channel
        self.runtime = None       # container.py's _Runtime (container processes only)
        self.set_backends({})

    def set_backends(self, backends: dict[str, Any]) -> None:
        outside = self.role is None
        for kind, attr in KINDS.items():
            b = backends.get(kind)
            setattr(self, attr, b if b is not None else _Unavailable(kind, outside))


ctx = Context()


def forward(attr: str, names: tuple[str, ...], defaults: tuple[Any, ...] = (),
            npos: int = 1) -> Callable[[_F], _F]:
    """Decorator for a public function that only calls ``ctx.<attr>.<its
    name>(*params)``: with the accelerator (csrc/fast/public_functions.c) the same call is made
    by a builtin function, without a Python frame (and, on a native backend,
    straight into its accelerated entry point), with the decorated function's
    name, signature and documentation; without the accelerator the decorated
    function is used as it is."""
    def wrap(pyfunc: _F) -> _F:
        if _Forward is None:
            return pyfunc
        f = _Forward(ctx, attr, pyfunc.__name__, names, defaults, npos)
        sig = inspect.signature(pyfunc)
        sig = sig.replace(parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
                          return_annotation=sig.empty)
        doc = f"{pyfunc.__name__}{sig}\n--\n\n{inspect.cleandoc(pyfunc.__doc__ or '')}"
        return f.as_function(doc, pyfunc.__module__)  # type: ignore[no-any-return]
    return wrap
