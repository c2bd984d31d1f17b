"""The controller's options, checked once: ``Controller(...)`` and the
``[controller]`` table of a TOML file (config.py) use these same checks.

Invariant: a value that passes is one the controller can run with -- a
finite number of seconds > 0 (never nan or inf: a wait on one never ends),
an int >= 1 where a count is meant, a back-off (base, cap) with
0 < base <= cap, native capacities that ``Domain.create`` takes.  Each check
raises TypeError (wrong type) or ValueError (wrong value) whose message
starts with the option's name; ``EXPECTED`` says in words what is expected
(the TOML error message)."""

from __future__ import annotations

import math
import os

#: What each option must be, in words.
EXPECTED = {
    "socket_dir": "a directory path (a string)",
    "max_start_failures": "an integer >= 1",
    "shutdown_timeout": "a finite number of seconds > 0",
    "startup_timeout": "a finite number of seconds > 0",
    "reload_timeout": "a finite number of seconds > 0",
    "admin_idle_timeout": "a finite number of seconds > 0",
    "backoff": "a pair (base, cap) of finite seconds with 0 < base <= cap",
    "native_config": "a dict of native capacities",
}

#: native_config keys and their bounds (those of ``native.domain.Domain.create``).
NATIVE_KEYS = {"semaphores": (0, 2**28), "mutexes": (0, 2**28), "processes": (1, 2**20),
               "actors": (1, 2**19), "waiters": (0, 2**19), "waiter_quota": (1, 2**19)}


def _is_number(v) -> bool:
    return type(v) in (int, float)      # not a bool, not a str


def seconds(name: str, value, optional: bool = False):
    """A finite number of seconds > 0 (None too when *optional*)."""
    if value is None and optional:
        return None
    tail = " or None" if optional else ""
    if not _is_number(value):
        raise TypeError(f"{name} must be {EXPECTED[name]}{tail}, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be {EXPECTED[name]}{tail}, got {value!r}")
    return value


def count(name: str, value) -> int:
    """An int >= 1 (not a bool)."""
    if type(value) is not int:
        raise TypeError(f"{name} must be {EXPECTED[name]}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be {EXPECTED[name]}, got {value!r}")
    return value


def backoff(name: str, value) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_number(v) for v in value):
        raise TypeError(f"{name} must be {EXPECTED[name]}, got {value!r}")
    base, cap = value
    if not (math.isfinite(base) and math.isfinite(cap) and 0 < base <= cap):
        raise ValueError(f"{name} must be {EXPECTED[name]}, got {value!r}")
    return (base, cap)


def socket_dir(name: str, value):
    """None, or a path (str or os.PathLike of str) without NUL."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be {EXPECTED[name]} or None, got {value!r}")
    if not value or "\x00" in value:
        raise ValueError(f"{name} must be {EXPECTED[name]} (non-empty, no NUL), got {value!r}")
    return value


def native_config(name: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be {EXPECTED[name]} or None, got {value!r}")
    out = {}
    for k, v in value.items():
        if k not in NATIVE_KEYS:
            raise ValueError(f"{name}: unknown key {k!r}; expected some of {', '.join(NATIVE_KEYS)}")
        lo, hi = NATIVE_KEYS[k]
        if type(v) is not int:
            raise TypeError(f"{name}[{k!r}] must be an integer between {lo} and {hi}, got {v!r}")
        if not lo <= v <= hi:
            raise ValueError(f"{name}[{k!r}] must be an integer between {lo} and {hi}, got {v!r}")
        out[k] = v
    waiters = out.get("waiters", 8192)
    if out.get("waiter_quota", 1) > max(1, waiters):
        raise ValueError(f"{name}['waiter_quota'] must be at most {name}['waiters'] ({waiters}), "
                         f"got {out['waiter_quota']}")
    return out


#: The checks of the ``[controller]`` keys of a TOML file.
TOML_CHECKS = {
    "socket_dir": socket_dir,
    "max_start_failures": count,
    "shutdown_timeout": seconds,
    "startup_timeout": seconds,
    "reload_timeout": seconds,
}
