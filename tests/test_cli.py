"""The netplex-native command, end to end through subprocesses."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from harness import free_port, request, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "netplex_native"]


def run_cli(*args, timeout=30, **kw):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["native", "rpc"])
def test_demo_with_chaos_reports_takeovers_and_exits_0(backend):
    r = run_cli("demo", "--duration", "4", "--chaos", "--chaos-every", "1", "--workers", "3",
                "--backend", backend, "--log-level", "warning", timeout=45)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"({backend} backend)" in out
    takeovers = re.findall(r"took over in ([0-9.]+) ms", out)
    assert len(takeovers) >= 2, out
    assert all(float(t) < 2000 for t in takeovers)
    m = re.search(r"summary: (\d+) requests served \((\d+) errors\), jobs run (\d+), takeovers (\d+), "
                  r"worst takeover ([0-9.]+) ms", out)
    assert m, out
    requests, errors, jobs, n_takeovers = map(int, m.groups()[:4])
    assert requests > 20 and jobs > 3 and n_takeovers == len(takeovers)
    assert float(m.group(5)) == max(float(t) for t in takeovers)
    assert "killed by signal 9" in r.stderr          # the controller logged each kill


@pytest.mark.timeout(60)
def test_demo_ctrl_c_stops_cleanly_with_a_summary(tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group."""
    p = subprocess.Popen(CLI + ["demo", "--workers", "2", "--socket-dir", str(tmp_path / "s")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        assert wait_until(lambda: (tmp_path / "s" / "admin.sock").exists(), 15)
        time.sleep(1.5)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, err
    assert "summary:" in out
    assert not (tmp_path / "s" / "admin.sock").exists()


@pytest.fixture
def echo_config(tmp_path):
    port = free_port()
    src = open(os.path.join(ROOT, "examples", "echo.toml")).read()
    cfg = tmp_path / "echo.toml"
    cfg.write_text(src.replace("127.0.0.1:8765", f"127.0.0.1:{port}"))
    # the handler module lives beside the original config
    (tmp_path / "echo_app.py").write_text(open(os.path.join(ROOT, "examples", "echo_app.py")).read())
    return cfg, port


@pytest.mark.timeout(90)
def test_run_example_config_and_administer_it(echo_config, tmp_path):
    cfg, port = echo_config
    sock = str(tmp_path / "sock")
    p = subprocess.Popen(CLI + ["run", str(cfg), "--socket-dir", sock, "--log-level", "info"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: os.path.exists(os.path.join(sock, "admin.sock")), 15)
        # the service answers, naming its container
        assert wait_until(lambda: _try(lambda: request(port, "hello").endswith(" hello")), 10)
        assert request(port, "SLOW").endswith("slow work done")

        r = run_cli("admin", "--socket-dir", sock, "list")
        assert r.returncode == 0, r.stderr
        assert "service echo" in r.stdout and "workers 4" in r.stdout
        lst = json.loads(run_cli("admin", "--socket-dir", sock, "--json", "list").stdout)
        pids = [c["pid"] for s in lst["services"] for c in s["containers"]]
        assert len(pids) == 4 and all(c["uptime"] >= 0 for s in lst["services"] for c in s["containers"])

        ins = json.loads(run_cli("admin", "--socket-dir", sock, "--json", "inspect").stdout)
        sems = {s["name"]: s for s in ins["plugins"]["native"]["semaphores"]}
        assert sems["echo.expensive_slots"]["value"] == 2
        human = run_cli("admin", "--socket-dir", sock, "inspect").stdout
        assert "echo.expensive_slots" in human and "echo.last" in human

        r = run_cli("admin", "--socket-dir", sock, "message", "echo", "hello", "from", "test")
        assert r.returncode == 0 and "delivered to 4 container(s)" in r.stdout
        assert wait_until(lambda: "got hello from test" in run_cli(
            "admin", "--socket-dir", sock, "inspect").stdout, 5)

        r = run_cli("admin", "--socket-dir", sock, "restart", "echo")
        assert r.returncode == 0 and "restarting 4" in r.stdout

        def replaced():
            now = json.loads(run_cli("admin", "--socket-dir", sock, "--json", "list").stdout)
            new = [c["pid"] for s in now["services"] for c in s["containers"]]
            return len(new) == 4 and not set(new) & set(pids)
        assert wait_until(replaced, 15)
        assert json.loads(run_cli("admin", "--socket-dir", sock, "--json", "list").stdout
                          )["services"][0]["restarts"] == 4

        r = run_cli("admin", "--socket-dir", sock, "shutdown")
        assert r.returncode == 0
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = p.stderr.read()
    assert re.search(r"netplex_native\.controller \[pid \d+\] \[- -\] container echo\.\d+ \(pid \d+\) started",
                     err), err
    assert not os.path.exists(os.path.join(sock, "admin.sock"))


def _try(fn):
    try:
        return fn()
    except OSError:
        return False


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mutate, expect", [
    (lambda s: s.replace('workers = 4', 'workers = 4\nwrokers = 2'),
     r"service 'echo'\.wrokers: unknown key; expected one of"),
    (lambda s: s.replace('"echo_app:handle"', '"no_such_module:handle"'),
     r"service 'echo'\.handler: cannot import module 'no_such_module'"),
    (lambda s: s.replace('"echo_app:handle"', '"echo_app:nope"'),
     r"service 'echo'\.handler: module 'echo_app' has no attribute 'nope'"),
    (lambda s: s.replace('tcp://127.0.0.1', 'http://127.0.0.1'),
     r"service 'echo'\.address: address must start with 'tcp://' or 'unix://'"),
    (lambda s: s.replace('workers = 4', 'workers = "four"'),
     r"service 'echo'\.workers: expected an integer between 1 and 4096"),
    (lambda s: s.replace('workers = 4', 'workers = 0'),
     r"service 'echo'\.workers: expected an integer between 1 and 4096 or \{ min = N, max = M \}, got 0"),
    (lambda s: s.replace('plugins = "native"', 'plugins = "fast"'),
     r"service 'echo'\.plugins: expected one of native, rpc, none"),
    (lambda s: s + "\n[oops]\n", r"oops: unknown top-level key"),
    (lambda s: s.replace('workers = 4', 'workers = { min = 3, max = 2 }'),
     r"service 'echo'\.workers: expected \{ min = N, max = M \} with integers 1 <= N <= M <= 4096"),
    (lambda s: s.replace('workers = 4', 'workers = 4\nmin_free_connections = 2'),
     r"service 'echo'\.min_free_connections: only for a dynamic workload"),
    (lambda s: s.replace('workers = 4', 'workers = { min = 1, max = 4 }\nconnections_per_container = 4\n'
                                        'max_free_connections = 2'),
     r"max_free_connections must be an integer of at least min_free_connections \+ "
     r"connections_per_container - 1 \(4\), got 2"),
    (lambda s: s.replace('workers = 4', 'workers = 4\nmax_connections = 0'),
     r"service 'echo'\.max_connections: expected an integer between 1 and 2147483648, got 0"),
    (lambda s: s.replace('workers = 4', 'workers = 4\nmax_connections_jitter = 5'),
     r"service 'echo'\.max_connections_jitter: needs max_connections"),
    (lambda s: s.replace("max_start_failures = 10", "startup_timeout = -1"),
     r"controller\.startup_timeout: expected a finite number of seconds > 0"),
    (lambda s: s.replace("max_start_failures = 10", "reload_timeout = 0"),
     r"controller\.reload_timeout: expected a finite number of seconds > 0"),
    (lambda s: s.replace("max_start_failures = 10", 'reload_timeout = "1m"'),
     r"controller\.reload_timeout: expected a finite number of seconds > 0"),
    # nan passed `<= 0` and inf `> 0`: SIGTERM then waited for ever
    (lambda s: s.replace("max_start_failures = 10", "shutdown_timeout = nan"),
     r"controller\.shutdown_timeout: expected a finite number of seconds > 0, got nan"),
    (lambda s: s.replace("max_start_failures = 10", "shutdown_timeout = inf"),
     r"controller\.shutdown_timeout: expected a finite number of seconds > 0, got inf"),
    (lambda s: s.replace("max_start_failures = 10", "startup_timeout = inf"),
     r"controller\.startup_timeout: expected a finite number of seconds > 0, got inf"),
    (lambda s: s.replace("max_start_failures = 10", "reload_timeout = -nan"),
     r"controller\.reload_timeout: expected a finite number of seconds > 0, got nan"),
    (lambda s: s.replace("max_start_failures = 10", "max_start_failures = 0"),
     r"controller\.max_start_failures: expected an integer >= 1, got 0"),
    # a socket directory that cannot be made: one line, not a traceback
    (lambda s: s.replace("max_start_failures = 10", 'socket_dir = "/proc/netplex-none/x"'),
     r"controller\.socket_dir: cannot create /proc/netplex-none/x: "),
    (lambda s: s.replace("[[service]]", "[[service]\n"), r"not valid TOML"),
])
def test_run_reports_config_errors_with_file_and_key_before_forking(echo_config, mutate, expect):
    cfg, _ = echo_config
    cfg.write_text(mutate(cfg.read_text()))
    r = run_cli("run", str(cfg), timeout=20)
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {cfg}: "), r.stderr
    assert re.search(expect, line), line
    assert "started" not in r.stderr        # nothing was forked


@pytest.mark.timeout(30)
def test_admin_without_a_controller_gives_a_one_line_error(tmp_path):
    r = run_cli("admin", "--socket-dir", str(tmp_path / "none"), "list")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("error: no controller is running with socket directory")


@pytest.mark.timeout(30)
def test_every_command_takes_log_level_and_python_m_works():
    for cmd in (["demo"], ["run", "x.toml"], ["admin", "list"], ["bench"]):
        r = run_cli(*cmd, "--help")
        assert r.returncode == 0 and "--log-level" in r.stdout, cmd
    r = run_cli("--log-level", "nonsense", "admin", "list")
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.mark.timeout(120)
def test_bench_command_passes_its_options_to_bench_run(tmp_path):
    """`netplex-native bench --quick --only syscalls` runs the syscall count."""
    r = run_cli("bench", "--quick", "--only", "syscalls", "--out", str(tmp_path), timeout=100)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    if shutil.which("strace") is None:     # the bench says it cannot count
        assert data["syscalls"] == {"error": "strace missing"}
        assert "strace is missing" in r.stdout + r.stderr
    else:
        assert "zero syscalls on the uncontended native path" in r.stdout
