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
def socket_dir(tmp_path):
    d = tmp_path / "sock"
    return str(d)
