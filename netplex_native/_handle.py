"""What a semaphore or mutex handle holds, and which of its methods run in C.

A handle (``semaphore.Semaphore``, ``mutex.Mutex``) holds its name and, for
a Domain's handle, the backend it is bound to (``_be``; None: the current
process's backend, ``ctx.sem`` / ``ctx.mutex``, looked up at each call).

With the accelerator (csrc/fast/handles.c) that state lives in the C
bases ``SemaphoreBase`` / ``MutexBase``, and :func:`accelerate` hands the
class's hot methods (increment, decrement, lock, unlock, acquire, release,
``with``) to C.  Invariants (csrc/fast/handles.c, H1-H4):
- The Python methods stay as written in the classes' source: they are the
  specification, and C calls them, unchanged arguments and all, for every
  case but the plain uncontended one.
- The plain case (no arguments, a native backend) calls the core with the
  name's core handle cached in the handle object; a handle of a destroyed
  (or destroyed and re-created) name is refused by the core (its
  generation), and the Python method then looks the name up again exactly as
  a by-name call does.  So behaviour is the Python methods', in every
  process, across fork, close and re-creation.
- The C methods find the backend as ``Semaphore._backend`` and
  ``BoundSemaphore._backend`` do (``_be``, else the process's).
- A subclass (other than ours) that overrides a hot method, ``name`` or
  ``_backend`` gets the Python methods back for every hot method it does not
  override itself (:func:`keep_python_semantics`): its overrides then run
  exactly as they would without the accelerator (``with`` calls its
  ``lock``, its ``name`` property names the object, ...).
Without the accelerator, :class:`PyHandleBase` holds the same state and
:func:`accelerate` does nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self, cast

__all__ = ["PyHandleBase", "SemaphoreBase", "MutexBase", "HandleRules", "accelerate",
           "hot_methods", "keep_python_semantics"]


class PyHandleBase:
    """A handle's state in Python (the accelerator is not built)."""

    __slots__ = ("name", "_be")

    def __init__(self, name: str, backend: Any = None) -> None:
        self.name = name
        self._be = backend


def _no_accelerator(cls: type) -> None:
    """Without the accelerator the class's methods are used as they are."""


HOT = {"Semaphore": ("increment", "decrement", "acquire", "release", "__enter__", "__exit__"),
       "Mutex": ("lock", "unlock", "acquire", "release", "__enter__", "__exit__")}


def hot_methods(cls: type) -> dict[str, Any]:
    """The Python hot methods of cls (Semaphore or Mutex), before accelerate()."""
    return {n: cls.__dict__[n] for n in HOT[cls.__name__]}


def keep_python_semantics(cls: type, methods: dict[str, Any]) -> None:
    """cls, a user's subclass: if it overrides a hot method, ``name`` or
    ``_backend``, its inherited hot methods become the Python ones."""
    if any(n in cls.__dict__ for n in (*methods, "name", "_backend")):
        for n, fn in methods.items():
            if n not in cls.__dict__:
                setattr(cls, n, fn)


class HandleRules:
    """Copying, pickling and subclassing, the same for Semaphore and Mutex
    (mixed in beside their base; ``_py_hot``: the class's Python hot
    methods, set by the class before accelerate())."""

    __slots__ = ()
    _py_hot: dict[str, Any] = {}
    if TYPE_CHECKING:
        name: str
        _be: Any

    def __reduce__(self) -> tuple[Any, ...]:
        """pickle: a handle of the process's backend is its name; a Domain's
        handle is bound to this process's Domain and cannot travel."""
        if self._be is not None:
            raise TypeError(f"{self!r} belongs to a Domain of this process and cannot be "
                            f"pickled; pickle its name, or a semaphore.access / mutex.access "
                            f"handle")
        return (type(self), (self.name,))

    def __copy__(self) -> Self:
        """A handle of the same name (and, for a Domain's handle, of the same
        Domain; a Domain is not copied)."""
        cls: Any = type(self)
        return cast(Self, cls(self.name) if self._be is None else cls(self.name, self._be))

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return self.__copy__()

    def __init_subclass__(cls, _ours: bool = False, **kw: Any) -> None:
        """A user's subclass overriding a hot method, name or _backend keeps
        the Python methods' semantics (keep_python_semantics)."""
        super().__init_subclass__(**kw)
        if not _ours:
            keep_python_semantics(cls, cls._py_hot)


if TYPE_CHECKING:
    SemaphoreBase = PyHandleBase
    MutexBase = PyHandleBase
    accelerate = _no_accelerator
else:
    try:
        from ._fast import SemaphoreBase, MutexBase, accelerate
    except ImportError:
        SemaphoreBase = MutexBase = PyHandleBase
        accelerate = _no_accelerator
