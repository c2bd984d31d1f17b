"""Regression tests for what the second attack on the operations surface
found (issue 11): options a wait never ends on, a reload's trial load in a
throwaway process (os._exit, fork, hang at import), the exit after
"controller stopped", the rollback's worker count, SIGTERM to a container in
a synchronous call, admin errors at the connection cap, names.  Each runs
``netplex-native run`` as a subprocess with real signals, real admin
requests and real connections (the Controller() checks run in-process: they
raise before anything starts)."""

import math
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from harness import free_port, pid_alive, request, wait_until
from ops_harness import APP, CLI, CONTROLLER, ROOT, answer, running, service  # noqa: F401


def write_module(r, extra, version="v2"):
    """ops_app.py: the test application plus *extra* code run at its import."""
    tmp = r.tmp / "ops_app.py.new"
    tmp.write_text(APP.format(version=version) + extra)
    os.replace(tmp, r.tmp / "ops_app.py")


def children(pid) -> set:
    out = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out |= {int(x) for x in f.read().split()}
        except FileNotFoundError:
            pass
    return out


# ---- 4. Controller() checks every option as the TOML file does ----

@pytest.mark.parametrize("kw, exc, name", [
    ({"shutdown_timeout": "5"}, TypeError, "shutdown_timeout"),
    ({"shutdown_timeout": -1}, ValueError, "shutdown_timeout"),
    ({"shutdown_timeout": math.inf}, ValueError, "shutdown_timeout"),
    ({"shutdown_timeout": math.nan}, ValueError, "shutdown_timeout"),
    ({"shutdown_timeout": True}, TypeError, "shutdown_timeout"),
    ({"startup_timeout": math.inf}, ValueError, "startup_timeout"),
    ({"reload_timeout": math.nan}, ValueError, "reload_timeout"),
    ({"max_start_failures": 0}, ValueError, "max_start_failures"),
    ({"max_start_failures": 2.0}, TypeError, "max_start_failures"),
    ({"backoff": (5, 0.1)}, ValueError, "backoff"),
    ({"backoff": (-1, -1)}, ValueError, "backoff"),
    ({"backoff": (0.1, math.inf)}, ValueError, "backoff"),
    ({"backoff": 5}, TypeError, "backoff"),
    ({"admin_idle_timeout": 0}, ValueError, "admin_idle_timeout"),
    ({"admin_idle_timeout": -1}, ValueError, "admin_idle_timeout"),
    ({"native_config": {"semaphores": -1}}, ValueError, "native_config"),
    ({"native_config": {"foo": 1}}, ValueError, "native_config"),
    ({"native_config": {"waiters": "8"}}, TypeError, "native_config"),
    ({"native_config": [("semaphores", 1)]}, TypeError, "native_config"),
    ({"socket_dir": 5}, TypeError, "socket_dir"),
    ({"socket_dir": "a\x00b"}, ValueError, "socket_dir"),
])
def test_controller_refuses_a_bad_option_at_construction_naming_it(kw, exc, name):
    from netplex_native import Controller
    args = {"socket_dir": kw.pop("socket_dir")} if "socket_dir" in kw else {}
    with pytest.raises(exc) as e:
        Controller(*args.values(), name="check-options", **kw)
    assert str(e.value).startswith(name), e.value


def test_controller_takes_the_documented_defaults_and_good_values():
    from netplex_native import Controller
    c = Controller(None, name="check-options-ok", shutdown_timeout=0.5, backoff=[0.1, 0.1],
                   native_config={"semaphores": 0, "processes": 8}, admin_idle_timeout=1,
                   startup_timeout=None)
    assert c.backoff == (0.1, 0.1) and c.native_config == {"semaphores": 0, "processes": 8}
    c.shutdown()


# ---- 9. names without control characters; scale takes ASCII digits only ----

@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\x1b[31m", "a\tb"])
def test_a_service_or_controller_name_with_a_control_character_is_refused(bad):
    from netplex_native import Service
    from netplex_native.controller import check_controller_name
    with pytest.raises(ValueError, match="control character"):
        Service(bad, None)
    with pytest.raises(ValueError, match="control character"):
        check_controller_name(bad)


@pytest.mark.timeout(60)
def test_toml_service_name_with_a_newline_is_a_config_error(tmp_path):
    cfg = tmp_path / "n.toml"
    cfg.write_text('[[service]]\nname = "a\\nINFO forged"\nplugins = "none"\n')
    r = subprocess.run(CLI + ["run", str(cfg), "--socket-dir", str(tmp_path / "s")], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "control characters" in r.stderr and "started" not in r.stderr, r.stderr


@pytest.mark.timeout(60)
def test_admin_scale_takes_only_ascii_decimal_digits(running):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 1))
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    for bad in (" 3", "3 ", "+3", "\u0663", "３", "3_0"):
        res = r.admin("scale", "a", bad)
        assert res.returncode == 2, (bad, res.stdout, res.stderr)
        assert res.stderr.startswith("error: admin scale: WORKERS must be an integer"), res.stderr
    assert r.services()["a"]["workers"] == 1
    assert r.admin("scale", "a", "2").returncode == 0
    assert wait_until(lambda: r.ready("a", 2), 15), r.log()


# ---- 2. the controller exits after "controller stopped", whatever threads a module left ----

@pytest.mark.timeout(90)
def test_sigterm_ends_the_process_after_a_reload_imported_a_module_with_a_non_daemon_thread(running):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 1))
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    write_module(r, "\nimport threading, time\n"
                    "threading.Thread(target=lambda: [time.sleep(0.2) for _ in iter(int, 1)], daemon=False).start()\n")
    res = r.admin("reload")
    assert res.returncode == 0, res.stderr
    assert wait_until(lambda: r.ready("a", 1) and answer(pa).endswith(" v2"), 20), r.log()
    r.signal(signal.SIGTERM)
    try:
        code = r.p.wait(20)
    except subprocess.TimeoutExpired:
        code = None
    assert code == 0, r.log()
    assert "controller stopped" in r.log()


# ---- 3. a failed reload restores the running state exactly ----

@pytest.mark.timeout(120)
def test_a_rolled_back_reload_keeps_the_scaled_worker_count_and_every_old_container(running):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 2))
    assert wait_until(lambda: r.ready("a", 2), 15), r.log()
    assert r.admin("scale", "a", "3").returncode == 0
    assert wait_until(lambda: r.ready("a", 3), 15), r.log()
    before = r.pids("a")
    r.write(CONTROLLER + service("a", pa, 4, hooks="FailBoot"), version="v2")
    res = r.admin("reload")
    assert res.returncode == 0, res.stderr           # loaded; its containers then fail to boot
    assert wait_until(lambda: "did not start; its old containers keep serving" in r.log(), 40), r.log()
    time.sleep(1.0)                                  # _manage would retire an extra one by now
    s = r.services()["a"]
    assert s["workers"] == 3 and not s["disabled"], s
    assert r.pids("a") == before, r.log()
    assert r.ready("a", 3), r.services()
    assert answer(pa).endswith(" v1")
    log = r.log()
    assert "disabled after" not in log, log          # it never was
    assert re.search(r"service a: its new containers failed 2 consecutive starts; no more are started "
                     r"and the old containers keep serving", log), log


# ---- 7. a reload's trial load runs in a throwaway process ----

@pytest.mark.timeout(90)
def test_a_module_calling_os_exit_at_import_fails_the_reload_and_the_controller_lives(running):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 2))
    assert wait_until(lambda: r.ready("a", 2), 15), r.log()
    before = r.pids("a")
    write_module(r, "\nimport os\nos._exit(7)\n")
    res = r.admin("reload")
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "the trial load exited with code 7" in res.stderr, res.stderr
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert r.p.poll() is None, r.log()
    assert r.pids("a") == before and answer(pa).endswith(" v1")
    write_module(r, "", version="v3")                # fixed: the next reload works
    assert r.admin("reload").returncode == 0
    assert wait_until(lambda: r.ready("a", 2) and answer(pa).endswith(" v3"), 20), r.log()


@pytest.mark.timeout(90)
def test_a_module_forking_at_import_fails_the_reload_and_leaves_no_copy_of_the_controller(running, tmp_path):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 2))
    assert wait_until(lambda: r.ready("a", 2), 15), r.log()
    before = r.pids("a")
    mark = tmp_path / "forked"
    write_module(r, f"\nimport os, time\nif os.fork() == 0:\n    open({str(mark)!r} + str(os.getpid()), 'w').close()\n"
                    "    time.sleep(30)\n    os._exit(0)\n")
    res = r.admin("reload")
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "a module forked a process while it was imported" in res.stderr, res.stderr
    time.sleep(0.5)
    assert children(r.p.pid) == before, (children(r.p.pid), before)   # only its containers
    assert not list(tmp_path.glob("forked*"))        # the copy made in the trial ended at once
    assert r.pids("a") == before and answer(pa).endswith(" v1")


@pytest.mark.timeout(90)
def test_a_module_that_never_finishes_importing_is_killed_in_its_trial_and_the_next_reload_works(running):
    pa = free_port()
    ctl = CONTROLLER + "reload_timeout = 2.0\n"
    r = running(ctl + service("a", pa, 1))
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    write_module(r, "\nimport time\nwhile True:\n    time.sleep(0.05)\n")
    res = r.admin("reload", timeout=30)
    assert res.returncode == 1 and "did not finish within 2 s" in res.stderr, res.stderr
    assert answer(pa).endswith(" v1")
    write_module(r, "", version="v3")                # no restart needed: nothing stuck in the controller
    res = r.admin("reload", timeout=30)
    assert res.returncode == 0, res.stderr
    assert wait_until(lambda: r.ready("a", 1) and answer(pa).endswith(" v3"), 20), r.log()


# ---- 8. SIGTERM ends a container at once, even in a synchronous call ----

SLEEPER = '''
import time as _time
_orig = handle
async def handle(reader, writer):
    line = await reader.readline()
    if line.strip() == b"BLOCK":
        writer.write(b"blocking\\n")
        await writer.drain()
        _time.sleep(60)                   # a synchronous call: the loop cannot run
    writer.write(b"x 0 v1\\n")
'''


@pytest.mark.timeout(60)
def test_sigterm_ends_a_container_blocked_in_a_synchronous_call_at_once(running):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 1))
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    write_module(r, SLEEPER, version="v1")
    assert r.admin("reload").returncode == 0
    assert wait_until(lambda: r.ready("a", 1) and "reload done" in r.log(), 20), r.log()
    (pid,) = r.pids("a")
    s = socket.create_connection(("127.0.0.1", pa), timeout=10)
    try:
        s.sendall(b"BLOCK\n")
        assert s.makefile().readline().strip() == "blocking"
        time.sleep(0.2)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: f"(pid {pid}) killed by signal" in r.log(), 10), r.log()
        took = time.monotonic() - t0
    finally:
        s.close()
    # by the SIGTERM itself, not by the 1.5 s hard alarm (SIGALRM, 14)
    assert f"(pid {pid}) killed by signal {int(signal.SIGTERM)}" in r.log(), r.log()
    assert took < 1.4, took
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()     # restarted


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_with_a_handler_in_a_synchronous_call_ends_it_by_sigterm_at_once(running, sig):
    pa = free_port()
    # a short shutdown_timeout: the same steps, each shorter (the blocked container
    # answers none of them, so a stop by SIGTERM waits them all out)
    r = running(CONTROLLER.replace("shutdown_timeout = 2.0", "shutdown_timeout = 0.5") + service("a", pa, 1))
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    write_module(r, SLEEPER, version="v1")
    assert r.admin("reload").returncode == 0
    assert wait_until(lambda: r.ready("a", 1) and "reload done" in r.log(), 20), r.log()
    (pid,) = r.pids("a")
    s = socket.create_connection(("127.0.0.1", pa), timeout=10)
    try:
        s.sendall(b"BLOCK\n")
        assert s.makefile().readline().strip() == "blocking"
        r.signal(sig)
        assert r.p.wait(20) == 0
    finally:
        s.close()
    log = r.log()
    # README: SIGINT: at most 0.5 s + 1 s, SIGTERM: 2 s + shutdown_timeout + 1 s (each
    # step at most shutdown_timeout), then SIGTERM, which ends it at once (not the
    # hard alarm 1.5 s later)
    assert f"container a.2 (pid {pid}) did not finish; sending SIGTERM" in log, log
    assert f"(pid {pid}) killed by signal {int(signal.SIGTERM)}" in log, log
    assert "SIGKILL" not in log, log


# ---- 5. admin when the server closes the connection: a one-line error ----

@pytest.mark.timeout(60)
def test_admin_whose_connection_is_reset_gives_a_one_line_error(tmp_path):
    """A server that closes the connection with the request unread (as a
    controller ending meanwhile): the client's read is reset."""
    import threading
    d = tmp_path / "sockdir"
    d.mkdir()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(d / "admin.sock"))
    srv.listen(4)

    def serve():
        conn, _ = srv.accept()
        conn.settimeout(10)
        import select
        select.select([conn], [], [], 10)     # the request arrived: close it unread
        conn.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        res = subprocess.run(CLI + ["admin", "--socket-dir", str(d), "list"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
    finally:
        t.join(10)
        srv.close()
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
    assert res.stderr.startswith("error: the controller closed the admin connection without answering"), \
        res.stderr


def test_shutdown_from_another_thread_ends_run():
    """Controller.shutdown() called from a thread that is not the loop's is
    handed to the loop: run() returns (it waited for the next wake-up of the
    loop, possibly forever, before)."""
    import subprocess
    import sys
    import textwrap
    src = textwrap.dedent("""
        import threading, time
        import netplex_native as netplex
        ctrl = netplex.Controller()
        ctrl.add_service(netplex.Service("idle", workers=1))
        def stop():
            while not ctrl.containers():
                time.sleep(0.05)
            ctrl.shutdown()
        threading.Thread(target=stop, daemon=True).start()
        ctrl.run()
        print("returned", flush=True)
    """)
    p = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "returned" in p.stdout, (p.returncode, p.stdout, p.stderr[-2000:])


def test_native_config_waiter_quota_above_waiters_is_refused_at_construction():
    import netplex_native as netplex
    with pytest.raises(ValueError, match="waiter_quota"):
        netplex.Controller(native_config={"waiters": 1, "waiter_quota": 2})
    with pytest.raises(ValueError, match="waiter_quota"):
        netplex.Controller(native_config={"waiter_quota": 9000})
    netplex.Controller(native_config={"waiters": 4, "waiter_quota": 4})
