import os
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
def pipes():
    """os.pipe() whose ends the test leaves open are closed after it, even
    when it fails (tests that fork keep both ends; left open, hundreds of
    runs exhaust the pytest process's descriptors, and a controller forked
    later with a low RLIMIT_NOFILE fails at start)."""
    made = []

    def pipe():
        r, w = os.pipe()
        made.extend((r, w))
        return r, w
    yield pipe
    for fd in made:
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.fixture
def socket_dir(tmp_path):
    d = tmp_path / "sock"
    return str(d)


@pytest.fixture(params=["accelerated", "closures"])
def dom(request, monkeypatch):
    """A private native segment, unlinked even when the test fails; once with
    the C accelerator of the uncontended operations (_fast) and once with the
    pure-Python entry points it replaces.  A core that is not built fails the
    test: a broken build must never look green."""
    from netplex_native.native import domain as _native
    assert _native.available(), "the native core (netplex_native._core) is not built"
    if request.param == "closures":
        monkeypatch.setattr(_native, "_fast", None)
    d = _native.Domain.create(semaphores=16, mutexes=16, processes=16)
    request.addfinalizer(d.close)
    request.addfinalizer(d.unlink)
    return d


@pytest.fixture(scope="session")
def etcd_server():
    """A real etcd for the whole session (tests/etcd_server.py), killed after."""
    from etcd_server import EtcdServer
    srv = EtcdServer()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def etcd_backend(etcd_server):
    """An etcd Backend under a prefix of its own (1-s leases); afterwards no
    lease-bound key of it is left."""
    import uuid
    import harness
    from netplex_native import etcd
    b = etcd.Backend([etcd_server.endpoint], prefix=f"t-{uuid.uuid4().hex[:8]}/", lease_ttl=1)
    harness.ETCD = b
    yield b
    harness.ETCD = None
