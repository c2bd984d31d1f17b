"""The machine a run was made on, so that a reader can tell a machine effect
from a code effect: CPU model and count, kernel, Python, the load when the run
began and ended, and the cost of one futex system call (FUTEX_WAKE of a word
nobody waits on: the cheapest futex call, the floor of every wake-up), measured
as the difference between a ctypes call of syscall(SYS_futex, ...) and a ctypes
call of a libc function that makes no system call."""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import time

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}
_FUTEX_WAKE = 1


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def futex_syscall_ns(rounds=7, n=20000):
    """Median ns of one FUTEX_WAKE with no waiter (None if unknown here)."""
    nr = _SYS_FUTEX.get(platform.machine())
    if nr is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    syscall, labs = libc.syscall, libc.labs
    syscall.restype = ctypes.c_long
    labs.restype = ctypes.c_long
    word = ctypes.c_uint32(0)
    addr = ctypes.addressof(word)
    args = (ctypes.c_long(nr), ctypes.c_void_p(addr), ctypes.c_long(_FUTEX_WAKE), ctypes.c_long(1),
            ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_long(0))
    one = ctypes.c_long(-1)
    diffs = []
    for _ in range(rounds):
        t = time.perf_counter_ns()
        for _i in range(n):
            syscall(*args)
        a = time.perf_counter_ns() - t
        t = time.perf_counter_ns()
        for _i in range(n):
            labs(one, *args[1:])      # same argument conversions, no system call
        b = time.perf_counter_ns() - t
        diffs.append((a - b) / n)
    return statistics.median(diffs)


def machine():
    return {"nproc": os.cpu_count(), "cpu": _cpu_model(), "kernel": platform.release(),
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_start": list(os.getloadavg()), "futex_syscall_ns": futex_syscall_ns(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
