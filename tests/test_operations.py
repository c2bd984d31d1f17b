"""Operating a controller as gunicorn's and Netplex's operators do: signals
and admin verbs, end to end through ``netplex-native run`` subprocesses."""

import json
import re
import os
import signal
import socket
import subprocess
import sys

import pytest

from harness import free_port, pid_alive, wait_until

from ops_harness import APP, CLI, CONTROLLER, ROOT, answer, refused, running, service  # noqa: F401


@pytest.mark.timeout(90)
def test_sighup_reload_adds_removes_and_resizes_services_and_reimports_the_app(running):
    pa, pb, pc = free_port(), free_port(), free_port()
    r = running(CONTROLLER + service("a", pa, 2) + service("b", pb, 1))
    assert wait_until(lambda: r.ready("a", 2) and r.ready("b", 1), 15), r.log()
    old_a, old_b = r.pids("a"), r.pids("b")
    assert answer(pa).endswith(" v1")

    r.write(CONTROLLER + service("a", pa, 3) + service("c", pc, 1), version="v2")
    r.signal(signal.SIGHUP)
    assert wait_until(lambda: set(r.services()) == {"a", "c"} and r.ready("a", 3) and r.ready("c", 1)
                      and not r.pids("a") & old_a, 30), r.log()
    assert wait_until(lambda: not any(pid_alive(p) for p in old_a | old_b), 10)
    assert answer(pa).endswith(" v2") and answer(pc).endswith(" v2")
    assert refused(pb)
    assert r.services()["a"]["workers"] == 3
    assert r.p.poll() is None
    assert wait_until(lambda: "reload done" in r.log(), 10), r.log()
    # process titles name the controller, the service and the container
    with open(f"/proc/{r.p.pid}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[0] == b"netplex-native: controller ops"
    cont = r.services()["c"]["containers"][0]
    with open(f"/proc/{cont['pid']}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[0] == f"netplex-native: container {cont['id']} of c (controller ops)".encode()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broken, expect", [
    ("[[service]\n", "not valid TOML"),
    (CONTROLLER + service("a", 1, 1).replace("ops_app:handle", "ops_app:nope"), "has no attribute 'nope'"),
    (CONTROLLER + service("a", 1, 0), "expected an integer between 1 and 4096"),
    (CONTROLLER + service("a", 1, 1).replace('plugins = "none"', 'plugins = "rpc"'),
     "plugins changed from none to rpc"),
])
def test_sighup_with_a_broken_config_logs_it_and_keeps_the_old_one_running(running, broken, expect):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 2))
    assert wait_until(lambda: r.ready("a", 2), 15), r.log()
    before = r.pids("a")
    r.write(broken)
    r.signal(signal.SIGHUP)
    assert wait_until(lambda: "reload failed" in r.log(), 10), r.log()
    assert expect in r.log()
    assert r.p.poll() is None
    assert r.pids("a") == before and all(pid_alive(p) for p in before)
    assert answer(pa).endswith(" v1")
    # the admin verb says so too, and changes nothing
    res = r.admin("reload")
    assert res.returncode == 1 and "reload failed" in res.stderr
    assert r.pids("a") == before


@pytest.mark.timeout(90)
def test_sigttin_adds_and_sigttou_removes_a_worker_never_below_one(running):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 1))
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    first = r.pids("a")
    r.signal(signal.SIGTTIN)
    assert wait_until(lambda: r.ready("a", 2), 15), r.log()
    r.signal(signal.SIGTTIN)
    assert wait_until(lambda: r.ready("a", 3), 15), r.log()
    r.signal(signal.SIGTTOU)
    assert wait_until(lambda: r.ready("a", 2), 15), r.log()
    assert not first & r.pids("a")                # the oldest goes first (as gunicorn)
    r.signal(signal.SIGTTOU)
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    r.signal(signal.SIGTTOU)
    assert wait_until(lambda: "stays at 1 workers" in r.log(), 10), r.log()
    assert r.ready("a", 1) and r.services()["a"]["workers"] == 1
    assert r.p.poll() is None


@pytest.mark.timeout(90)
def test_disable_refuses_connections_while_containers_live_then_enable_serves_again(running):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 2))
    assert wait_until(lambda: r.ready("a", 2), 15), r.log()
    before = r.pids("a")
    held = socket.create_connection(("127.0.0.1", pa), timeout=5)
    try:
        held.sendall(b"HOLD\n")
        held_by = int(held.makefile().readline().split()[1])
        res = r.admin("disable", "a")
        assert res.returncode == 0 and "service a disabled" in res.stdout, res.stderr
        assert wait_until(lambda: refused(pa), 10)
        assert r.pids("a") == before and all(pid_alive(p) for p in before)
        assert r.services()["a"]["accepting"] is False
        assert "NOT ACCEPTING" in r.admin("list").stdout
        assert r.admin("disable", "a").stdout.strip() == "service a disabled (already disabled)"
        assert pid_alive(held_by)            # the connection it serves goes on
    finally:
        held.close()
    res = r.admin("enable", "a")
    assert res.returncode == 0 and "service a enabled" in res.stdout, res.stderr
    assert wait_until(lambda: answer(pa) is not None, 10), r.log()
    assert wait_until(lambda: r.ready("a", 2) and not r.pids("a") & before, 20), r.log()
    assert r.services()["a"]["accepting"] is True


@pytest.mark.timeout(90)
def test_scale_restart_all_and_bad_input_to_every_verb(running):
    pa, pb = free_port(), free_port()
    r = running(CONTROLLER + service("a", pa, 1) + service("b", pb, 1))
    assert wait_until(lambda: r.ready("a", 1) and r.ready("b", 1), 15), r.log()
    res = r.admin("scale", "a", "3")
    assert res.returncode == 0 and "workers 1 -> 3" in res.stdout, res.stderr
    assert wait_until(lambda: r.ready("a", 3), 15), r.log()
    before = r.status()
    for args, code, err in [
        (("scale", "a", "0"), 1, "workers must be an integer between 1 and 4096, got 0"),
        (("scale", "a", "5000"), 1, "workers must be an integer between 1 and 4096, got 5000"),
        (("scale", "a", "x"), 2, "WORKERS must be an integer between 1 and 4096, got 'x'"),
        (("scale", "nope", "2"), 1, "no service named 'nope'; services: a, b"),
        (("scale", "a"), 2, "usage: netplex-native admin scale SERVICE WORKERS"),
        (("enable", "nope"), 1, "no service named 'nope'"),
        (("disable", "nope"), 1, "no service named 'nope'"),
        (("disable",), 2, "usage: netplex-native admin disable SERVICE"),
        (("restart", "nope"), 1, "no service named 'nope'"),
        (("restart-all", "x"), 2, "admin restart-all takes no arguments"),
        (("message", "zz*", "hello"), 1, "no service matches 'zz*'; services: a, b"),
        (("log-level", "loud"), 1, "level must be one of debug, info, warning, error, critical, got 'loud'"),
        (("reload", "now"), 2, "admin reload takes no arguments"),
    ]:
        res = r.admin(*args)
        assert res.returncode == code, (args, res.stdout, res.stderr)
        assert err in res.stderr, (args, res.stderr)
    after = r.status()
    assert [(s["name"], s["workers"], s["accepting"], sorted(c["pid"] for c in s["containers"]))
            for s in after["services"]] == \
        [(s["name"], s["workers"], s["accepting"], sorted(c["pid"] for c in s["containers"]))
         for s in before["services"]]
    assert r.p.poll() is None

    old = r.pids("a") | r.pids("b")
    res = r.admin("restart-all")
    assert res.returncode == 0 and "restarting 4 container(s)" in res.stdout, res.stderr
    assert wait_until(lambda: r.ready("a", 3) and r.ready("b", 1)
                      and not (r.pids("a") | r.pids("b")) & old, 20), r.log()
    res = r.admin("log-level", "debug")
    assert res.returncode == 0 and "log level set to debug" in res.stdout
    assert wait_until(lambda: "log level set to DEBUG" in r.log(), 5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT, signal.SIGTERM])
def test_stop_signals_end_the_controller_cleanly_and_others_are_ignored(running, sig):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 2))
    assert wait_until(lambda: r.ready("a", 2), 15), r.log()
    pids = r.pids("a")
    for ignored in (signal.SIGUSR2, signal.SIGALRM, signal.SIGPWR, signal.SIGVTALRM, signal.SIGPROF):
        r.signal(ignored)
        assert wait_until(lambda: f"{ignored.name} ignored" in r.log(), 5), r.log()
    assert r.p.poll() is None and r.pids("a") == pids
    r.signal(sig)
    assert r.p.wait(20) == 0
    assert not any(pid_alive(p) for p in pids)
    assert not os.path.exists(os.path.join(r.sock, "admin.sock"))
    assert ("quick" in r.log()) == (sig != signal.SIGTERM)


@pytest.mark.timeout(60)
def test_a_raising_post_start_hook_is_a_failed_start(running):
    pa = free_port()
    r = running(CONTROLLER + service("bad", pa, 1, hooks="FailBoot"))
    assert wait_until(lambda: r.services()["bad"]["disabled"], 20), r.log()
    assert "failed to boot: post_start_hook raised RuntimeError('boom at boot')" in r.log()
    assert r.services()["bad"]["containers"] == []
    assert r.p.poll() is None


SCRIPT = '''
import sys
sys.path.insert(0, {here!r})
import netplex_native as netplex
import ops_app
ctrl = netplex.Controller()
ctrl.add_service(netplex.Service("s", ops_app.handle, address="tcp://127.0.0.1:{port}", workers=1))
ctrl.run()
'''


@pytest.mark.timeout(60)
def test_admin_finds_a_script_started_controller_with_no_flags(tmp_path):
    """Controller() and the CLI share one rule for the socket directory."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(xdg))
    (tmp_path / "ops_app.py").write_text(APP.format(version="v1"))
    script = tmp_path / "myapp.py"
    script.write_text(SCRIPT.format(here=str(tmp_path), port=free_port()))
    err = open(tmp_path / "err.log", "w")
    p = subprocess.Popen([sys.executable, str(script)], cwd=str(tmp_path), env=env,
                         stdout=subprocess.DEVNULL, stderr=err)
    second = None
    try:
        sdir = xdg / "netplex-native" / f"myapp.{p.pid}"
        assert wait_until(lambda: (sdir / "admin.sock").exists(), 15), (tmp_path / "err.log").read_text()
        # printed at start, even though the script configured no logging
        assert wait_until(lambda: f"controller myapp.{p.pid} started" in (tmp_path / "err.log").read_text()
                          and str(sdir) in (tmp_path / "err.log").read_text(), 5)

        def admin(*args):
            return subprocess.run(CLI + ["admin"] + list(args), cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=20)
        r = admin("--json", "list")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["pid"] == p.pid and json.loads(r.stdout)["name"] == f"myapp.{p.pid}"
        # SIGHUP without a config source: the same services, every container replaced
        first = [c["pid"] for c in json.loads(r.stdout)["services"][0]["containers"]]

        def replaced():
            now = json.loads(admin("--json", "list").stdout)["services"][0]["containers"]
            return len(now) == 1 and now[0]["ready"] and now[0]["pid"] not in first
        p.send_signal(signal.SIGHUP)
        assert wait_until(replaced, 15)
        # a second controller (the CLI, named after its config): admin asks which
        cfg = tmp_path / "other.toml"
        cfg.write_text(service("o", free_port()))
        second = subprocess.Popen(CLI + ["run", str(cfg)], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: (xdg / "netplex-native" / "other" / "admin.sock").exists(), 15)
        r = admin("list")
        assert r.returncode == 1
        assert f"2 controllers are running (myapp.{p.pid}, other); pick one with --name NAME" in r.stderr
        r = admin("--name", "other", "--json", "list")
        assert r.returncode == 0 and json.loads(r.stdout)["pid"] == second.pid
        # the same name twice is refused, naming it; the first keeps running
        r = subprocess.run(CLI + ["run", str(cfg)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=20)
        assert r.returncode == 1
        assert "a controller named 'other' is already running" in r.stderr
        assert admin("--name", "other", "list").returncode == 0
        r = admin("--name", "../x", "list")
        assert r.returncode == 1 and "--name: controller name must be" in r.stderr
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0
        assert not (xdg / "netplex-native" / "other").exists()
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
        assert not sdir.exists()
        r = admin("list")
        assert r.returncode == 1 and "no controller is running under" in r.stderr
    finally:
        for q in (p, second):
            if q is not None and q.poll() is None:
                q.kill()
                q.wait()
        err.close()


def test_runtime_dir_rule():
    from netplex_native.controller import runtime_dir
    uid = os.getuid()
    old = os.environ.get("XDG_RUNTIME_DIR")
    try:
        os.environ["XDG_RUNTIME_DIR"] = "/nonexistent-xdg"
        run_user = f"/run/user/{uid}"
        if os.path.isdir(run_user) and os.stat(run_user).st_uid == uid:
            assert runtime_dir() == f"{run_user}/netplex-native"
        else:
            import tempfile
            assert runtime_dir() == os.path.join(tempfile.gettempdir(), f"netplex-native-{uid}")
    finally:
        if old is None:
            os.environ.pop("XDG_RUNTIME_DIR", None)
        else:
            os.environ["XDG_RUNTIME_DIR"] = old


@pytest.mark.timeout(60)
def test_pid_file_version_and_startup_timeout(tmp_path):
    r = subprocess.run(CLI + ["--version"], cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and re.fullmatch(r"netplex-native \d+\.\d+\.\d+\S*\n", r.stdout), r.stdout
    (tmp_path / "ops_app.py").write_text(APP.format(version="v1") + SLOW_BOOT)
    cfg = tmp_path / "slow.toml"
    cfg.write_text("[controller]\nstartup_timeout = 0.5\nmax_start_failures = 2\n"
                   + service("slow", free_port(), 1, hooks="SlowBoot"))
    pidf = tmp_path / "ctl.pid"
    err = open(tmp_path / "err.log", "w")
    sock = str(tmp_path / "sock")
    p = subprocess.Popen(CLI + ["run", str(cfg), "--socket-dir", sock, "--pid", str(pidf)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=err)
    try:
        assert wait_until(lambda: pidf.exists() and pidf.read_text() == f"{p.pid}\n", 15)
        # a second one with the same pid file is refused
        r = subprocess.run(CLI + ["run", str(cfg), "--socket-dir", str(tmp_path / "s2"), "--pid", str(pidf)],
                           cwd=ROOT, capture_output=True, text=True, timeout=20)
        assert r.returncode == 1 and f"already running as pid {p.pid}" in r.stderr
        log = lambda: (tmp_path / "err.log").read_text()
        assert wait_until(lambda: "disabled after 2 consecutive start failures" in log(), 20), log()
        assert log().count("not ready within 0.5 s (startup_timeout); killing it") == 2
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
        assert not pidf.exists()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        err.close()


SLOW_BOOT = '''
import time
class SlowBoot(netplex.ProcessorHooks):
    def post_start_hook(self, cont):
        time.sleep(30)
'''


@pytest.mark.timeout(60)
def test_a_container_is_recycled_after_max_connections_while_serving(running):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 1) + "max_connections = 3\n")
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    first = r.pids("a").pop()
    ids = [answer(pa).split()[0] for _ in range(2)]
    held = socket.create_connection(("127.0.0.1", pa), timeout=5)      # its 3rd: the last one
    f = held.makefile()
    try:
        held.sendall(b"HOLD\n")
        assert f.readline().split()[:2] == [ids[0], str(first)]
        # it stops accepting and a new container takes the next connections,
        # while the old one still serves the connection it holds
        nxt = answer(pa)
        assert nxt is not None and nxt.split()[1] != str(first), r.log()
        assert pid_alive(first)
        assert "(max_connections); recycling" in r.log()
    finally:
        f.close()
        held.close()
    assert wait_until(lambda: not pid_alive(first), 10), r.log()
    assert ids == [ids[0]] * 2
    assert wait_until(lambda: f"container {ids[0]} (pid {first}) exited with code 0" in r.log(), 10), r.log()
    assert r.p.poll() is None


@pytest.mark.timeout(60)
def test_max_connections_jitter_keeps_each_limit_in_its_range(running):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 1) + "max_connections = 2\nmax_connections_jitter = 3\n")
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    served = []
    for _ in range(16):
        a = answer(pa)
        assert a is not None, r.log()
        served.append(a.split()[0])
    counts = [served.count(c) for c in dict.fromkeys(served)]
    assert len(counts) >= 3
    assert all(2 <= n <= 5 for n in counts[:-1]) and counts[-1] <= 5, counts


@pytest.mark.timeout(60)
def test_log_file_reopened_on_sigusr1_by_controller_and_containers(tmp_path):
    """After a rename (logrotate), SIGUSR1: new records go to a new file; records
    carry logger, service and container id; admin log-level applies to containers."""
    (tmp_path / "ops_app.py").write_text(APP.format(version="v1"))
    pa = free_port()
    cfg = tmp_path / "logs.toml"
    cfg.write_text(CONTROLLER + service("a", pa, 1) + "max_connections = 1\n")
    logf, sock = tmp_path / "ctl.log", str(tmp_path / "sock")
    p = subprocess.Popen(CLI + ["run", str(cfg), "--socket-dir", sock, "--log-file", str(logf)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: logf.exists() and "container a.1" in logf.read_text(), 15)
        assert answer(pa) is not None
        assert wait_until(lambda: re.search(r"INFO netplex_native\.container \[pid \d+\] \[a a\.1\] container a\.1 "
                                            r"\(pid \d+\): 1 connections served", logf.read_text()), 10)
        assert re.search(r"INFO netplex_native\.controller \[pid \d+\] \[- -\] container a\.1 \(pid \d+\) started",
                         logf.read_text())
        assert wait_until(lambda: "container a.2" in logf.read_text(), 10)
        os.rename(logf, tmp_path / "ctl.log.1")
        p.send_signal(signal.SIGUSR1)
        assert wait_until(lambda: logf.exists() and "log files reopened (1)" in logf.read_text(), 10)
        assert wait_until(lambda: answer(pa) is not None, 10)      # a.2 serves, logs, recycles
        assert wait_until(lambda: "[a a.2] container a.2" in logf.read_text(), 10), logf.read_text()
        assert "[a a.2]" not in (tmp_path / "ctl.log.1").read_text()
        r = subprocess.run(CLI + ["admin", "--socket-dir", sock, "log-level", "warning"], cwd=ROOT,
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        assert wait_until(lambda: "log level set to WARNING" in logf.read_text(), 5)
        size = len(logf.read_text())
        assert wait_until(lambda: answer(pa) is not None, 10)
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
        assert "connections served" not in logf.read_text()[size:]
        assert p.stderr.read() == ""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.timeout(60)
def test_containers_forked_while_admin_connections_are_open_print_no_traceback(running):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 2))
    assert wait_until(lambda: r.ready("a", 2), 15), r.log()
    idle = []
    for _ in range(3):                      # open, idle admin connections
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(os.path.join(r.sock, "admin.sock"))
        idle.append(s)
    try:
        old = r.pids("a")
        assert r.admin("restart", "a").returncode == 0
        assert wait_until(lambda: r.ready("a", 2) and not r.pids("a") & old, 15), r.log()
        r.signal(signal.SIGTTIN)
        assert wait_until(lambda: r.ready("a", 3), 15), r.log()
    finally:
        for s in idle:
            s.close()
    r.signal(signal.SIGTERM)
    assert r.p.wait(20) == 0
    log = r.log()
    for bad in ("Traceback", "Selector is closed", "Task was destroyed", "Exception ignored", "ResourceWarning"):
        assert bad not in log, log


@pytest.mark.timeout(90)
def test_dynamic_workload_grows_under_concurrent_connections_and_shrinks_when_idle(running):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 1).replace("workers = 1", "workers = { min = 1, max = 3 }"))
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    held = []
    try:
        for n in (2, 3):            # each held connection leaves one free slot fewer
            s = socket.create_connection(("127.0.0.1", pa), timeout=5)
            held.append(s)
            s.sendall(b"HOLD\n")
            assert s.recv(100)
            assert wait_until(lambda: r.ready("a", n), 15), r.log()
        s = socket.create_connection(("127.0.0.1", pa), timeout=5)
        held.append(s)
        s.sendall(b"HOLD\n")
        assert s.recv(100)
        assert wait_until(lambda: sum(c["connections"] for c in r.services()["a"]["containers"]) == 3, 10)
        assert r.services()["a"]["workers"] == 3 and len(r.services()["a"]["containers"]) == 3   # max
    finally:
        for s in held:
            s.close()
    assert wait_until(lambda: r.ready("a", 1), 20), r.log()
    assert r.services()["a"]["workers"] == 1
    assert "workers -> 2" in r.log() and "workers -> 3" in r.log()
    assert answer(pa) is not None
    assert r.p.poll() is None


@pytest.mark.parametrize("kw, expect", [
    (dict(workers=0), "workers must be between 1 and 4096, got 0"),
    (dict(max_connections=0), "max_connections must be an integer between 1 and"),
    (dict(max_connections_jitter=3), "max_connections_jitter needs max_connections"),
    (dict(workers=2, max_workers=1), r"max_workers must be an integer between workers \(2\) and 4096, got 1"),
    (dict(max_workers=2, connections_per_container=0), "connections_per_container must be an integer between 1"),
])
def test_service_rejects_bad_operations_settings_naming_them(kw, expect):
    import netplex_native as netplex
    with pytest.raises(ValueError, match=expect):
        netplex.Service("s", APP_HANDLER, address="tcp://127.0.0.1:1", **kw)


async def APP_HANDLER(reader, writer):
    pass





@pytest.mark.timeout(60)
@pytest.mark.parametrize("plugins", ["native", "rpc"])
def test_inspect_names_holders_by_container_id(running, plugins):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 1, hooks="Holder").replace('"none"', f'"{plugins}"'))
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    cont = r.services()["a"]["containers"][0]

    def shown():
        out = r.admin("inspect").stdout
        return (f"holders {cont['id']}" in out and f"locked by {cont['id']}" in out), out
    assert wait_until(lambda: shown()[0], 10), shown()[1]


@pytest.mark.timeout(60)
def test_bench_from_an_installed_package_says_what_to_do(tmp_path):
    import shutil
    shutil.copytree(os.path.join(ROOT, "netplex_native"), tmp_path / "netplex_native")
    r = subprocess.run(CLI + ["bench", "--quick"], cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=30, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert r.returncode == 1
    assert "error: the benchmarks (bench/run.py) are not part of the installed package; run this command " \
           "from the top directory of a netplex_native source checkout" in r.stderr


def _holds_listening_socket(pid: int, port: int) -> bool:
    """Has process *pid* a descriptor of the socket listening on 127.0.0.1:*port*?"""
    with open("/proc/net/tcp") as f:
        inodes = {line.split()[9] for line in list(f)[1:]
                  if line.split()[1] == f"0100007F:{port:04X}" and line.split()[3] == "0A"}
    assert inodes, f"nothing listens on port {port}"
    links = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:       # closed meanwhile
            pass
    return any(f"socket:[{i}]" in links for i in inodes)


@pytest.mark.timeout(60)
def test_reload_lets_an_old_container_finish_the_connection_it_serves(running):
    pa = free_port()
    slow = CONTROLLER.replace("shutdown_timeout = 2.0", "shutdown_timeout = 10.0")
    r = running(slow + service("a", pa, 1))
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    old = r.pids("a").pop()
    held = socket.create_connection(("127.0.0.1", pa), timeout=5)
    f = held.makefile("rwb")
    try:
        held.sendall(b"HOLD\n")
        assert f.readline().split()[1] == str(old).encode()
        r.signal(signal.SIGHUP)

        def replaced():
            cs = r.services()["a"]["containers"]
            return any(c["ready"] and not c["retiring"] and c["pid"] != old for c in cs)
        assert wait_until(replaced, 15), r.log()
        assert old in r.pids("a", include_retiring=True) and old not in r.pids("a")
        assert pid_alive(old), r.log()     # retiring, still serving the held connection
        # Admin shows the old one retiring from the start of the reload; the
        # controller asks it to stop accepting once the new one is ready (its
        # next look, within 0.1 s): then it closes its copy of the listening
        # socket, and from then on new connections go to the new container.
        assert wait_until(lambda: not _holds_listening_socket(old, pa), 10), r.log()
        for _ in range(5):
            assert answer(pa).split()[1] != str(old)
        assert pid_alive(old), r.log()
    finally:
        f.close()
        held.close()
    assert wait_until(lambda: not pid_alive(old), 8), r.log()   # before the 10 s escalation
    assert wait_until(lambda: f"(pid {old}) exited with code 0" in r.log(), 10), r.log()
    assert "did not finish" not in r.log()


@pytest.mark.parametrize("kw, exc, expect", [
    (dict(name="a/b"), ValueError, "controller name must be 1..64 characters, no '/'"),
    (dict(name=".hidden"), ValueError, "not starting with '.'"),
    (dict(name=5), TypeError, "controller name must be a str, not int"),
    (dict(startup_timeout=0), ValueError, "startup_timeout must be a finite number of seconds > 0 or None, got 0"),
    (dict(reload_timeout=-1), ValueError, "reload_timeout must be a finite number of seconds > 0, got -1"),
    (dict(reload_timeout=None), TypeError, "reload_timeout must be a finite number of seconds > 0, got None"),
    (dict(config_source="services.toml"), TypeError, "config_source must be a callable"),
])
def test_controller_rejects_bad_operations_arguments_naming_them(kw, exc, expect):
    import netplex_native as netplex
    with pytest.raises(exc, match=re.escape(expect)):
        netplex.Controller(**kw)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("body", ["import sys\nsys.exit(3)\n", "raise KeyboardInterrupt\n"],
                         ids=["sys.exit", "KeyboardInterrupt"])
def test_a_reload_whose_module_exits_at_import_keeps_the_controller_and_old_config(running, body):
    """A module that calls sys.exit() (or raises KeyboardInterrupt) when imported is a
    bad file like any other: logged, the controller and its containers go on."""
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 2))
    assert wait_until(lambda: r.ready("a", 2), 15), r.log()
    before = r.pids("a")
    (r.tmp / "exit_app.py").write_text(body)
    r.write(CONTROLLER + service("a", pa, 2).replace("ops_app:handle", "exit_app:handle"))
    r.signal(signal.SIGHUP)
    assert wait_until(lambda: "reload failed" in r.log(), 10), r.log()
    assert r.p.poll() is None, r.log()
    assert r.pids("a") == before and answer(pa).endswith(" v1")


@pytest.mark.timeout(90)
def test_a_reload_whose_new_containers_fail_to_boot_keeps_the_old_ones_serving(running):
    """The old containers are retired only once new ones are ready: when every new one
    fails at boot, the old ones keep serving the previous configuration."""
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 2))
    assert wait_until(lambda: r.ready("a", 2), 15), r.log()
    before = r.pids("a")
    r.write(CONTROLLER + service("a", pa, 2, hooks="FailBoot"))
    r.signal(signal.SIGHUP)
    assert wait_until(lambda: "did not start" in r.log(), 30), r.log()
    assert r.p.poll() is None
    assert r.pids("a") == before and all(pid_alive(p) for p in before)
    for _ in range(5):
        assert answer(pa).endswith(" v1")
