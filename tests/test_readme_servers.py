"""The README's section "Use it under gunicorn / uvicorn / your own supervisor",
run as written: each snippet is extracted by the file name on its first line
and executed (gunicorn and uvicorn serving real HTTP, SIGKILL and TERM)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from harness import free_port
from test_web_servers import segments_created_by, settle

pytestmark = pytest.mark.timeout(120)

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SECTION = "## Use it under gunicorn / uvicorn / your own supervisor"


def snippets() -> dict[str, str]:
    text = open(README).read()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    out = {}
    for block in re.findall(r"```python\n(.*?)```", text[start:end], re.S):
        first = block.splitlines()[0]
        m = re.match(r"# (\S+\.py)", first)
        assert m, f"snippet without a file name on its first line: {first!r}"
        out[m.group(1)] = block
    return out


def test_the_section_has_the_four_snippets():
    assert set(snippets()) == {"gunicorn.conf.py", "app.py", "asgi_app.py", "supervisor.py"}


def _env() -> dict:
    env = dict(os.environ)
    env.pop("NETPLEX_DOMAIN", None)
    return env


def test_the_own_supervisor_snippet_runs_and_gets_the_killed_workers_unit_back(tmp_path):
    (tmp_path / "supervisor.py").write_text(snippets()["supervisor.py"])
    p = subprocess.run([sys.executable, "supervisor.py"], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    tokens = [int(line.rsplit(" ", 1)[1]) for line in p.stdout.splitlines()]
    assert len(tokens) == 4 and tokens == sorted(set(tokens)), p.stdout   # each holder larger


def _get(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=20) as r:
        return json.loads(r.read())


def _serve(tmp_path, cmd: list[str], port: int) -> subprocess.Popen:
    log = open(tmp_path / "server.log", "wb")
    p = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        assert p.poll() is None, (tmp_path / "server.log").read_text()
        try:
            _get(port)
            return p
        except OSError:
            time.sleep(0.05)
    p.kill()
    raise AssertionError("not serving: " + (tmp_path / "server.log").read_text())


def _workers(pid: int) -> list[int]:
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                st = open(f"/proc/{e}/stat").read().rsplit(")", 1)[1].split()
                cmd = open(f"/proc/{e}/cmdline", "rb").read()
            except OSError:
                continue
            if int(st[1]) == pid and b"resource_tracker" not in cmd and st[0] not in "ZX":
                out.append(int(e))
    return out


def _exercise(p: subprocess.Popen, port: int) -> None:
    try:
        segs = segments_created_by(p.pid)
        assert len(segs) == 1
        tokens = [_get(port)["token"] for _ in range(5)]
        assert tokens == sorted(set(tokens)), tokens          # every later holder larger
        for w in _workers(p.pid):
            os.kill(w, signal.SIGKILL)
        settle(lambda: _get(port)["token"] > tokens[-1], what="served again after the kills")
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        assert not os.path.exists("/dev/shm" + segs[0])
    finally:
        if p.poll() is None:
            ws = _workers(p.pid)
            p.kill()
            p.wait()
            for w in ws:
                os.kill(w, signal.SIGKILL)


def test_the_gunicorn_snippets_serve_with_the_documented_configuration(tmp_path):
    sn = snippets()
    (tmp_path / "gunicorn.conf.py").write_text(sn["gunicorn.conf.py"])
    (tmp_path / "app.py").write_text(sn["app.py"])
    port = free_port()
    p = _serve(tmp_path, [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-w", "2",
                          "-b", f"127.0.0.1:{port}", "app:app"], port)
    _exercise(p, port)


def test_the_uvicorn_snippet_serves_under_the_documented_command(tmp_path):
    (tmp_path / "asgi_app.py").write_text(snippets()["asgi_app.py"])
    port = free_port()
    p = _serve(tmp_path, [sys.executable, "-m", "netplex_native.uvicorn", "asgi_app:app",
                          "--workers", "2", "--port", str(port), "--app-dir", "."], port)
    _exercise(p, port)
