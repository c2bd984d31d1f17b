"""The accelerator's cache of reported call sites (csrc/fast/binder.c, about_to_block):
a synchronous wait on an event loop's thread is still reported once per call
site -- including different call sites that reach the same line of the
package (a handle's acquire) -- while a site already reported costs no
Python call any more."""

import asyncio
import logging

import pytest

from netplex_native.native import domain as _native


class _Seen(logging.Handler):
    def __init__(self):
        super().__init__()
        self.msgs = []

    def emit(self, record):
        self.msgs.append(record.getMessage())


@pytest.fixture
def seen():
    h = _Seen()
    lg = logging.getLogger("netplex_native")
    lg.addHandler(h)
    yield h.msgs
    lg.removeHandler(h)


def test_each_call_site_is_reported_once_through_the_accelerator(seen):
    assert _native._fast is not None, "the accelerator is not built"
    d = _native.Domain.create(semaphores=4, mutexes=4, processes=4)
    try:
        d.sem_create("z", 0)
        from netplex_native.semaphore import BoundSemaphore
        from netplex_native.native.plugins import _NativeSem
        h = BoundSemaphore("z", _NativeSem(d, "container"))     # what Domain.semaphore makes

        async def body():
            for _ in range(50):
                d.sem_decrement("z", True, 0.001)          # site A
            for _ in range(3):
                d.sem_decrement("z", True, 0.001)          # site B
            for _ in range(3):
                h.acquire(timeout=0.001)                   # site C (through semaphore.py)
            h.acquire(timeout=0.001)                       # site D (the same package line)
        asyncio.run(body())
    finally:
        d.close()
        d.unlink()
    lines = sorted(int(m.split(":")[1]) for m in seen if "event loop" in m)
    assert len(lines) == 4 and len(set(lines)) == 4, seen


def test_no_loop_no_report(seen):
    d = _native.Domain.create(semaphores=4, mutexes=4, processes=4)
    try:
        d.sem_create("z", 0)
        for _ in range(3):
            assert d.sem_decrement("z", True, 0.001) == -1
    finally:
        d.close()
        d.unlink()
    assert not [m for m in seen if "event loop" in m]
