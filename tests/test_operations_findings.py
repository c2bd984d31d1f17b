"""Regression tests for what attacks on the operations work (issue 11) found,
and for its weak points: each runs ``netplex-native run`` as a subprocess
with real signals, real admin requests and real connections."""

import collections
import os
import re
import signal
import socket
import threading
import time

import pytest

from harness import free_port, pid_alive, request, wait_until
from ops_harness import APP, CONTROLLER, answer, refused, running, service  # noqa: F401


def hold(port, n=1):
    """Open *n* connections that each hold a handler (until closed)."""
    held = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"HOLD\n")
        assert s.makefile().readline(), "no answer to HOLD"
        held.append(s)
    return held


def close_all(socks):
    for s in socks:
        s.close()


def concurrent_requests(port, n, timeout=40.0):
    """*n* clients at once, each sending one line; their answers ('' or an
    error text when a connection was closed or failed without one)."""
    answers = [None] * n
    go = threading.Event()

    def client(i):
        go.wait(10)
        try:
            answers[i] = request(port, "hi", timeout=timeout)
        except OSError as e:
            answers[i] = f"error {e!r}"
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(timeout + 10)
    return answers


# ---- 1. disable -> new address in the file -> HUP -> enable ----

@pytest.mark.timeout(90)
def test_enable_after_a_reload_moved_a_disabled_service_listens_on_the_new_address(running):
    pa, pb = free_port(), free_port()
    r = running(CONTROLLER + service("a", pa, 1))
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    assert r.admin("disable", "a").returncode == 0
    assert wait_until(lambda: refused(pa), 10)
    r.write(CONTROLLER + service("a", pb, 1))
    r.signal(signal.SIGHUP)
    assert wait_until(lambda: "reload done" in r.log(), 20), r.log()
    assert refused(pa) and refused(pb)            # still disabled, on either address
    assert r.services()["a"]["address"] == f"tcp://127.0.0.1:{pb}"
    res = r.admin("enable", "a")
    assert res.returncode == 0, res.stderr
    assert wait_until(lambda: answer(pb) is not None, 15), r.log()
    assert refused(pa)
    assert r.services()["a"]["address"] == f"tcp://127.0.0.1:{pb}"
    assert r.p.poll() is None


# ---- 2. max_connections under concurrent connections; none dropped ----

@pytest.mark.timeout(120)
@pytest.mark.parametrize("limit, jitter, clients", [(1, 0, 24), (2, 2, 30)])
def test_max_connections_holds_under_concurrent_connections_and_none_is_dropped(running, limit, jitter,
                                                                                 clients):
    """Counted at accept: a container stops accepting the moment it reaches its
    limit, and every connection it accepted is served to completion."""
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 2)
                + f"max_connections = {limit}\nmax_connections_jitter = {jitter}\n")
    assert wait_until(lambda: r.ready("a", 2), 15), r.log()
    answers = []
    for _ in range(2):
        answers += concurrent_requests(pa, clients // 2)
    bad = [a for a in answers if not (a and re.fullmatch(r"a\.\d+ \d+ v1", a))]
    assert not bad, (bad, r.log()[-3000:])
    per = collections.Counter(a.split()[0] for a in answers)
    assert max(per.values()) <= limit + jitter, per
    assert r.p.poll() is None


# ---- 3. scale and SIGTTIN/SIGTTOU keep a dynamic service within min..max ----

@pytest.mark.timeout(120)
def test_scale_and_ttin_ttou_keep_a_dynamic_service_within_min_and_max(running):
    """TTIN/TTOU act on every service, each within its own range."""
    pa, pb = free_port(), free_port()
    r = running(CONTROLLER + service("d", pa, 1).replace("workers = 1", "workers = { min = 2, max = 3 }")
                + service("s", pb, 2))
    assert wait_until(lambda: r.ready("d", 2) and r.ready("s", 2), 15), r.log()
    for args, err in [(("scale", "d", "4"), "service d has a dynamic workload of 2 to 3 workers; got 4"),
                      (("scale", "d", "1"), "service d has a dynamic workload of 2 to 3 workers; got 1")]:
        res = r.admin(*args)
        assert res.returncode == 1 and err in res.stderr, (args, res.stderr)
    assert r.services()["d"]["workers"] == 2
    r.signal(signal.SIGTTOU)                       # d at min: stays; s: one less
    assert wait_until(lambda: "SIGTTOU: service d stays at 2 workers (dynamic workload: 2 to 3)" in r.log(),
                      10), r.log()
    assert wait_until(lambda: r.ready("s", 1), 15), r.log()
    held = hold(pa, 3)                             # the manager grows it to max
    try:
        assert wait_until(lambda: r.ready("d", 3), 15), r.log()
        r.signal(signal.SIGTTIN)                   # d at max: stays; s: one more
        assert wait_until(lambda: "SIGTTIN: service d stays at 3 workers (dynamic workload: 2 to 3)"
                          in r.log(), 10), r.log()
        assert wait_until(lambda: r.ready("s", 2), 15), r.log()
        for _ in range(5):
            s = r.services()["d"]
            assert s["workers"] == 3 and len(s["containers"]) <= 3, s
            time.sleep(0.2)
    finally:
        close_all(held)
    assert wait_until(lambda: r.ready("d", 2), 20), r.log()      # and back to min when idle
    assert r.p.poll() is None


# ---- 4. a slow import during a reload does not block the controller ----

SLOW_MODULE = '''
import os, time
_here = os.path.dirname(os.path.abspath(__file__))
open(os.path.join(_here, "importing"), "a").close()
_deadline = time.monotonic() + 60
while not os.path.exists(os.path.join(_here, "go")) and time.monotonic() < _deadline:
    time.sleep(0.05)
'''


def slow_service(port, workers=1):
    return service("a", port, workers).replace("ops_app:handle", "slow_app:handle")


@pytest.mark.timeout(120)
def test_a_slow_import_during_reload_does_not_block_the_controller_and_hups_meanwhile_coalesce(running):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 2))
    assert wait_until(lambda: r.ready("a", 2), 15), r.log()
    new = r.tmp / "ops_app.py.new"                 # the same module, now slow to import
    new.write_text(SLOW_MODULE + APP.format(version="v2"))
    os.replace(new, r.tmp / "ops_app.py")
    r.signal(signal.SIGHUP)
    assert wait_until(lambda: (r.tmp / "importing").exists(), 15), r.log()
    # while the import is stuck, the loop serves: admin answers, a killed
    # container is reaped and replaced, the old containers serve
    res = r.admin("--json", "list", timeout=5)
    assert res.returncode == 0, res.stderr
    victim = sorted(r.pids("a"))[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: victim not in r.pids("a", include_retiring=True) and r.ready("a", 2), 15), r.log()
    for _ in range(6):                             # the replacement runs the old module, whole
        assert answer(pa).endswith(" v1")
        assert request(pa, "MODULE") == "v1"
    # HUPs meanwhile (a changed file) coalesce into one more reload, after this one
    r.write(CONTROLLER + service("a", pa, 3), version="v3")
    for _ in range(5):
        r.signal(signal.SIGHUP)
        time.sleep(0.05)
    assert r.log().count("reload: loading") == 1, r.log()
    (r.tmp / "go").touch()
    assert wait_until(lambda: r.log().count("reload done") == 2, 40), r.log()
    assert wait_until(lambda: r.ready("a", 3), 15), r.log()
    assert answer(pa).endswith(" v3")
    log = r.log()
    assert log.count("reload: loading") == 2, log
    # never two reloads interleaved: loading, done, loading, done
    marks = re.findall(r"reload: loading|reload done|reload failed", log)
    assert marks == ["reload: loading", "reload done"] * 2, marks
    assert r.p.poll() is None


@pytest.mark.timeout(120)
def test_a_reload_whose_import_does_not_finish_in_reload_timeout_keeps_the_old_configuration(running):
    pa = free_port()
    ctl = CONTROLLER + "reload_timeout = 1.0\n"
    r = running(ctl + service("a", pa, 2))
    assert wait_until(lambda: r.ready("a", 2), 15), r.log()
    before = r.pids("a")
    # slow only in the controller's loading thread (the trial process, which
    # imports in its main thread, passes): the load stuck in the controller
    slow_in_thread = SLOW_MODULE.replace("while not", "import threading\n"
                                         "while threading.current_thread() is not threading.main_thread() and not")
    (r.tmp / "slow_app.py").write_text(slow_in_thread + APP.format(version="v2"))
    r.write(ctl + slow_service(pa, 2))
    res = r.admin("reload", timeout=30)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "did not finish within 1 s" in res.stderr, res.stderr
    assert "did not finish within 1 s" in r.log()
    assert r.pids("a") == before and answer(pa).endswith(" v1")
    # while that import is still stuck, another reload is refused, saying why
    res = r.admin("reload", timeout=30)
    assert res.returncode == 1 and "still running" in res.stderr, res.stderr
    assert re.search(r"did not finish within 1 s \d+ s ago", res.stderr), res.stderr
    assert "only a restart of the controller clears it" in res.stderr, res.stderr
    (r.tmp / "go").touch()
    assert wait_until(lambda: "timed-out load finished" in r.log(), 15), r.log()
    res = r.admin("reload", timeout=30)
    assert res.returncode == 0, res.stderr
    assert wait_until(lambda: r.ready("a", 2) and not r.pids("a") & before, 20), r.log()
    assert answer(pa).endswith(" v2")
    assert r.p.poll() is None


# ---- 5. a quick stop is quick, with connections open ----

@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_quick_stop_with_open_connections_closes_them_and_containers_exit_at_once(running, sig):
    pa = free_port()
    slow = CONTROLLER.replace("shutdown_timeout = 2.0", "shutdown_timeout = 10.0")
    r = running(slow + service("a", pa, 2, hooks="FinishMark"))
    assert wait_until(lambda: r.ready("a", 2), 15), r.log()
    pids = r.pids("a")
    held = hold(pa, 4)
    try:
        t0 = time.monotonic()
        r.signal(sig)
        assert r.p.wait(20) == 0
        took = time.monotonic() - t0
        for s in held:                              # closed by the server
            s.settimeout(5)
            assert s.recv(100) == b""
    finally:
        close_all(held)
    log = r.log()
    assert "did not finish" not in log, log
    for pid in pids:
        assert f"(pid {pid}) exited with code 0" in log, log
        assert (r.tmp / f"finished.{pid}").exists()        # pre_finish_hook ran
    assert not any(pid_alive(p) for p in pids)
    assert took < 5.0, took                         # generous: no escalation, no grace period


# ---- rolling restart, one service at a time ----

@pytest.mark.timeout(120)
def test_restart_all_is_rolling_one_service_at_a_time_keeping_capacity(running):
    pa, pb = free_port(), free_port()
    # startup_timeout: the new containers may take that long (+1 s) before the old ones stay instead
    r = running(CONTROLLER + "startup_timeout = 25.0\n" + service("a", pa, 2, hooks="GatedBoot")
                + service("b", pb, 1, hooks="GatedBoot"))
    assert wait_until(lambda: r.ready("a", 2) and r.ready("b", 1), 15), r.log()
    old_a, old_b = r.pids("a"), r.pids("b")
    (r.tmp / "gate").touch()                       # new containers cannot get ready
    try:
        res = r.admin("restart-all")
        assert res.returncode == 0 and "restarting 3 container(s)" in res.stdout, res.stderr

        def booting_a():
            cs = r.services()["a"]["containers"]
            return len([c for c in cs if c["pid"] not in old_a]) == 2
        assert wait_until(booting_a, 15), r.log()
        time.sleep(0.5)
        # the old ones serve meanwhile, and b waits for its turn
        assert all(pid_alive(p) for p in old_a | old_b)
        for _ in range(4):
            got = answer(pa)
            assert got is not None and int(got.split()[1]) in old_a, got
        assert answer(pb) is not None
        assert {c["pid"] for c in r.services()["b"]["containers"]} == old_b
    finally:
        (r.tmp / "gate").unlink()
    assert wait_until(lambda: r.ready("a", 2) and r.ready("b", 1) and not r.pids("a") & old_a
                      and not r.pids("b") & old_b, 30), r.log()
    assert wait_until(lambda: not any(pid_alive(p) for p in old_a | old_b), 15), r.log()
    log = r.log()
    assert log.index("service a: 2 container(s) replaced") < log.index("container b.2 ")
    res = r.admin("restart", "b")
    assert res.returncode == 0 and "restarting 1 container(s) of b" in res.stdout
    assert wait_until(lambda: r.log().count("service b: 1 container(s) replaced") == 2, 20), r.log()
    assert r.p.poll() is None


# ---- HUP storm ----

@pytest.mark.timeout(120)
def test_a_hup_storm_with_changing_files_ends_on_the_last_file_and_never_interleaves(running):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 1))
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    for i in range(20):
        r.write(CONTROLLER + service("a", pa, 1 + i % 3), version=f"s{i}")
        r.signal(signal.SIGHUP)
        time.sleep(0.03)
    assert wait_until(lambda: r.ready("a", 2) and (answer(pa) or "").endswith(" s19")
                      and r.log().count("reload: loading") == r.log().count("reload done"), 60), r.log()
    marks = re.findall(r"reload: loading|reload done|reload failed", r.log())
    assert marks == ["reload: loading", "reload done"] * (len(marks) // 2), marks
    assert "Traceback" not in r.log()
    assert r.p.poll() is None


# ---- dynamic workload: several connections per container ----

@pytest.mark.timeout(120)
def test_dynamic_workload_with_several_connections_per_container(running):
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 1).replace("workers = 1", "workers = { min = 1, max = 3 }")
                + "connections_per_container = 3\nmin_free_connections = 2\n")
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()

    def load():
        return sum(c["connections"] for c in r.services()["a"]["containers"])
    held = []
    try:
        held += hold(pa, 1)                        # 3 - 1 = 2 free: enough
        assert wait_until(lambda: load() == 1, 10)
        time.sleep(1.5)
        assert r.services()["a"]["workers"] == 1
        held += hold(pa, 1)                        # 1 free < 2: one more (6 - 2 = 4 free)
        assert wait_until(lambda: r.ready("a", 2), 15), r.log()
        held += hold(pa, 3)                        # 6 - 5 = 1 free: one more (9 - 5 = 4)
        assert wait_until(lambda: r.ready("a", 3), 15), r.log()
        held += hold(pa, 3)                        # 9 - 8 = 1 free, but at max
        assert wait_until(lambda: load() == 8, 10)
        time.sleep(1.5)
        s = r.services()["a"]
        assert s["workers"] == 3 and len(s["containers"]) == 3, s
        for sock in held[:6]:                      # 9 - 2 = 7 free > 4: shrinks to 2 (6 - 2 = 4)
            sock.close()
        assert wait_until(lambda: r.ready("a", 2), 20), r.log()
        time.sleep(1.5)
        assert r.services()["a"]["workers"] == 2
    finally:
        close_all(held)
    assert wait_until(lambda: r.ready("a", 1), 20), r.log()
    assert answer(pa) is not None
    assert r.p.poll() is None


@pytest.mark.timeout(90)
def test_a_failed_reload_puts_the_old_modules_back_and_never_changes_the_running_ones(running):
    """The new module imports fine but the file is invalid further on: the
    reload fails, and a container started afterwards (a replacement) runs the
    old module, as sys.modules has it too."""
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 1))
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    r.write(CONTROLLER + service("a", pa, 1, hooks="NoSuchHooks"), version="v2")
    res = r.admin("reload")
    assert res.returncode == 1 and "has no attribute 'NoSuchHooks'" in res.stderr, res.stderr
    victim = r.pids("a").pop()
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: r.ready("a", 1) and victim not in r.pids("a"), 15), r.log()
    assert answer(pa).endswith(" v1")
    assert request(pa, "MODULE") == "v1"
    r.write(CONTROLLER + service("a", pa, 1))    # now valid: the new module is used
    assert r.admin("reload").returncode == 0
    assert wait_until(lambda: (answer(pa) or "").endswith(" v2") and request(pa, "MODULE") == "v2", 20), r.log()


@pytest.mark.timeout(90)
def test_a_module_that_needs_the_main_thread_at_import_fails_to_reload_saying_why(running):
    """Reloads import in a thread: a module that installs a signal handler at
    import starts (in the main thread) but cannot be reloaded; the old one runs on."""
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 1))
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    r.write(CONTROLLER + service("a", pa, 1), version="v2")
    with open(r.tmp / "ops_app.py", "a") as f:
        f.write("import signal\nsignal.signal(signal.SIGUSR2, signal.SIG_IGN)\n")
    res = r.admin("reload")
    assert res.returncode == 1, res.stdout
    assert "importing module 'ops_app' failed: ValueError: signal only works in main thread" in res.stderr
    assert answer(pa).endswith(" v1") and r.p.poll() is None


def unix_service(name, path, workers=1, hooks=None):
    return service(name, 0, workers, hooks).replace("tcp://127.0.0.1:0", f"unix://{path}")


def unix_answer(path):
    try:
        return request(path, "hi", timeout=3)
    except OSError:
        return None


@pytest.mark.timeout(120)
def test_a_reload_that_moves_an_address_keeps_the_old_one_until_the_new_containers_are_ready(running):
    """Moved and ready: the new address serves, the old one is gone.  Moved but
    no new container gets ready: the old containers go on serving on the old
    address, which stays the service's.  Moved to an address in use: nothing changes."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="npt-")
    try:
        a, b, c = (os.path.join(d, f"{x}.sock") for x in "abc")
        pa, pb = free_port(), free_port()
        r = running(CONTROLLER + service("s", pa, 2))
        assert wait_until(lambda: r.ready("s", 2), 15), r.log()
        r.write(CONTROLLER + service("s", pb, 2))       # tcp: the old port is closed everywhere
        assert r.admin("reload").returncode == 0
        assert wait_until(lambda: "reload done" in r.log(), 20), r.log()
        assert answer(pb).endswith(" v1") and refused(pa)
        r.write(CONTROLLER + unix_service("s", a, 2))
        assert r.admin("reload").returncode == 0
        assert wait_until(lambda: r.log().count("reload done") == 2, 20), r.log()
        assert unix_answer(a).endswith(" v1") and refused(pb)
        r.write(CONTROLLER + unix_service("s", b, 2))
        assert r.admin("reload").returncode == 0
        assert wait_until(lambda: r.log().count("reload done") == 3, 20), r.log()
        assert unix_answer(b).endswith(" v1") and not os.path.exists(a)
        assert r.services()["s"]["address"] == f"unix://{b}"
        before = r.pids("s")
        r.write(CONTROLLER + unix_service("s", c, 2, hooks="FailBoot"))
        assert r.admin("reload").returncode == 0
        assert wait_until(lambda: "did not start" in r.log(), 30), r.log()
        assert wait_until(lambda: r.log().count("reload done") == 4, 20), r.log()
        assert r.pids("s") == before
        for _ in range(4):
            assert unix_answer(b).endswith(" v1"), r.log()
        assert not os.path.exists(c)
        assert r.services()["s"]["address"] == f"unix://{b}"
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        try:
            r.write(CONTROLLER + service("s", busy.getsockname()[1], 2))
            assert r.admin("reload").returncode == 0
            assert wait_until(lambda: "keeps running on" in r.log(), 20), r.log()
            assert r.pids("s") == before and unix_answer(b).endswith(" v1")
        finally:
            busy.close()
        assert r.p.poll() is None
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(90)
def test_a_container_out_of_file_descriptors_pauses_accepting_and_serves_once_it_can(running):
    """accept() fails with EMFILE: logged, retried a second later; the
    connection waits in the backlog meanwhile and is served, nothing is lost."""
    pa = free_port()
    r = running(CONTROLLER + service("a", pa, 1, hooks="FewFiles"))
    assert wait_until(lambda: r.ready("a", 1), 15), r.log()
    held = hold(pa, 2)
    got = []
    t = threading.Thread(target=lambda: got.append(request(pa, "hi", timeout=20)))
    try:
        t.start()
        assert wait_until(lambda: "accept failed: [Errno 24] Too many open files; retrying in 1.0 s" in r.log(),
                          15), r.log()
    finally:
        close_all(held)
    t.join(25)
    assert got and got[0].endswith(" v1"), (got, r.log()[-2000:])
    assert r.services()["a"]["restarts"] == 0 and r.p.poll() is None
