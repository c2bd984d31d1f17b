import sys

import pytest

from harness import Events, BACKENDS

sys.setrecursionlimit(3000)


@pytest.fixture
def events():
    ev = Events()
    yield ev
    ev.close()


@pytest.fixture(params=BACKENDS)
def backend(request):
    from harness import need_backend
    need_backend(request.param)
    return request.param


@pytest.fixture
def socket_dir(tmp_path):
    d = tmp_path / "sock"
    return str(d)


@pytest.fixture
def dom(request):
    """A private native segment, unlinked even when the test fails.  A core
    that is not built fails the test: a broken build must never look green."""
    from netplex_native import _native
    assert _native.available(), "the native core (netplex_native._core) is not built"
    size = getattr(request, "param", 16)
    d = _native.Domain.create(semaphores=size, mutexes=size, processes=16)
    request.addfinalizer(d.close)
    request.addfinalizer(d.unlink)
    return d
