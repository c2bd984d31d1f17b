"""The public API when netplex_native._fast is not importable (a build
without the accelerator): plain Python functions and closures, same results."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import sys
sys.modules["netplex_native._fast"] = None          # make the import fail
import netplex_native as netplex
from netplex_native import semaphore, mutex, cenv
from netplex_native.native import domain as _native
from harness import plugins_for

assert _native._fast is None and type(semaphore.decrement).__name__ == "function"
backend = sys.argv[1]

class Hooks(netplex.ProcessorHooks):
    def post_add_hook(self, service, ctrl):
        for p in plugins_for(backend):
            ctrl.add_plugin(p)

    def post_start_hook(self, cont):
        out = []
        out.append(semaphore.create("s", 1, protected=True))
        out.append(semaphore.decrement("s"))
        out.append(semaphore.decrement("s"))
        out.append(semaphore.decrement("s", wait=True, timeout=0.05))
        out.append(semaphore.increment("s"))
        out.append(semaphore.decrement("s", wait=True))
        m = mutex.access("m")
        out.append(m.lock())
        out.append(m.lock(timeout=0))
        m.unlock()
        with m:
            out.append(m.lock(0))
        out.append(m.lock(0))
        m.unlock()
        try:
            semaphore.decrement("s", wait="yes")
        except TypeError as e:
            out.append("TypeError")
        print("RESULT", out, flush=True)
        cenv.system_shutdown()

ctrl = netplex.Controller()
ctrl.add_service(netplex.Service("w", hooks=Hooks()))
ctrl.run()
'''


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["rpc", "native"])
def test_public_api_without_the_accelerator(backend):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    r = subprocess.run([sys.executable, "-c", SCRIPT, backend], capture_output=True, text=True,
                       timeout=50, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "RESULT [True, 0, -1, -1, 1, 0, True, False, False, True, 'TypeError']" in r.stdout, r.stdout + r.stderr
