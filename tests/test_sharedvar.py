"""Shared variables on both of their backends (the RPC plugin, values in the
controller; the etcd plugin, values in etcd), with real forked controllers
and containers.  Infrastructure: test_semantics.py."""

from __future__ import annotations

import os
import time

import pytest

from test_semantics import cluster, uniq, settle

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["rpc", "etcd"])
def backend(request):
    if request.param == "etcd":
        request.getfixturevalue("etcd_backend")
    return request.param


class Point:
    """A custom picklable object (containers are forks: the class is there)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


def wait_waiters(c, backend, name, count):
    """Waiters queued on *name* per admin inspect; on etcd a wait is a watch
    of the container's own, which no controller sees: give it time instead."""
    if backend == "etcd":
        time.sleep(0.5)
    else:
        c.wait_waiters(name, count)


def test_create_var_returns_true_then_false(events, backend):
    V = uniq("var")
    with cluster(events, backend, ["a", "b"]) as c:
        assert c["a"].call("sharedvar.create_var(V)", V=V) is True
        assert c["b"].call("sharedvar.create_var(V, enc=True)", V=V) is False
        assert c["b"].call("sharedvar.get_value(V)", V=V) == ""   # still the plain one


def test_set_get_delete_and_missing_variables(events, backend):
    V = uniq("var")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert a.call("sharedvar.get_value(V)", V=V) is None
        assert a.call("sharedvar.set_value(V, 'x')", V=V) is False
        assert a.call("sharedvar.delete_var(V)", V=V) is False
        assert a.call("sharedvar.create_var(V)", V=V) is True
        assert b.call("sharedvar.get_value(V)", V=V) == ""
        assert b.call("sharedvar.set_value(V, 'héllo')", V=V) is True
        assert a.call("sharedvar.get_value(V)", V=V) == "héllo"
        assert a.call("sharedvar.delete_var(V)", V=V) is True
        assert b.call("sharedvar.get_value(V)", V=V) is None
        assert b.call("sharedvar.delete_var(V)", V=V) is False
        assert b.call("sharedvar.create_var(V)", V=V) is True


def test_plain_variable_rejects_non_str_with_sharedvar_type_error(events, backend):
    V = uniq("var")
    with cluster(events, backend, ["a"]) as c:
        a = c["a"]
        assert a.call("[sharedvar.create_var(V), sharedvar.set_value(V, 'keep')]", V=V) == [True, True]
        for value in ("5", "b'x'", "{'a': 1}", "None"):
            err = a.error(f"sharedvar.set_value(V, {value})", V=V)
            assert err.type == "SharedVarTypeError", err
            assert "TypeError" in err.mro and "NetplexError" in err.mro
        assert a.call("sharedvar.get_value(V)", V=V) == "keep"


def test_enc_variable_holds_dicts_lists_and_custom_objects(events, backend):
    V = uniq("var")
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert a.call("sharedvar.create_var(V, enc=True)", V=V) is True
        assert b.call("sharedvar.get_value(V) is None", V=V) is True
        P = "__import__('test_sharedvar').Point"
        for value in ("{'k': [1, 2.5, None], 'n': {'x': 'y'}}", "[1, 'two', (3, 4)]", "'a str too'",
                      f"{P}(3, -4)", f"{{'p': [{P}(1, 2)]}}"):
            assert a.call(f"sharedvar.set_value(V, {value})", V=V) is True
            assert b.call(f"sharedvar.get_value(V) == {value}", V=V) is True, value
            assert b.call(f"sharedvar.wait_for_value(V, timeout=1) == {value}", V=V) is True


@pytest.mark.parametrize("T", [None, 60])
def test_own_variable_goes_with_the_last_container_of_its_service_and_not_before(events, backend, tmp_path, T):
    """(also with a timeout: the variable goes with its service all the same)"""
    V = uniq("var")
    flag = str(tmp_path / "no-restart")
    with cluster(events, backend, ["owner", "other"], workers={"owner": 2}, no_restart_flag=flag) as c:
        owner, other = c["owner"], c["other"]
        pids = [e["pid"] for e in events.all("ready", service="owner")]
        assert len(pids) == 2
        assert owner.call("sharedvar.create_var(V, own=True, timeout=T)", V=V, T=T) is True
        assert other.call("sharedvar.set_value(V, 'v')", V=V) is True
        # another service's container ending does not touch it
        other.kill()
        assert other.call("sharedvar.get_value(V)", V=V) == "v"
        open(flag, "w").close()            # owner containers are not restarted from now on
        os.kill(pids[0], 9)
        settle(lambda: not os.path.exists(f"/proc/{pids[0]}"), what="first owner container reaped")
        assert other.call("sharedvar.get_value(V)", V=V) == "v", "deleted before the last container ended"
        os.kill(pids[1], 9)
        settle(lambda: other.call("sharedvar.get_value(V)", V=V) is None, what="own variable deleted")


def test_ro_variable_can_only_be_set_by_its_owner(events, backend):
    V = uniq("var")
    with cluster(events, backend, ["owner", "other"]) as c:
        owner, other = c["owner"], c["other"]
        assert owner.call("sharedvar.create_var(V, ro=True)", V=V) is True
        assert owner.call("sharedvar.set_value(V, 'mine')", V=V) is True
        err = other.error("sharedvar.set_value(V, 'theirs')", V=V)
        assert err.type == "SharedVarPermissionError"
        assert "PermissionError" in err.mro and "NetplexError" in err.mro
        assert other.call("sharedvar.get_value(V)", V=V) == "mine"
        assert owner.call("sharedvar.set_value(V, 'again')", V=V) is True


def test_timeout_deletes_after_that_many_seconds_without_access(events, backend):
    """(etcd: the timeout is a lease's TTL, whole seconds and at least 1, and
    etcd expires leases up to about 0.5 s late.)"""
    V = uniq("var")
    T, idle = (0.3, 0.6) if backend == "rpc" else (1, 2.0)
    with cluster(events, backend, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert a.call("sharedvar.create_var(V, timeout=T)", V=V, T=T) is True
        # accessed every T/3 s for 3 T: it stays
        for i in range(9):
            time.sleep(T / 3)
            if i % 2:
                assert b.call("sharedvar.get_value(V)", V=V) is not None, f"expired while accessed ({i})"
            else:
                assert a.call("sharedvar.set_value(V, str(i))", V=V, i=i) is True, f"expired while accessed ({i})"
        time.sleep(idle)                   # T s without access, and some
        assert b.call("sharedvar.get_value(V)", V=V) is None
        assert b.call("sharedvar.create_var(V)", V=V) is True


def test_wait_for_value_returns_at_once_when_ever_set(events, backend):
    V = uniq("var")
    with cluster(events, backend, ["a", "b"]) as c:
        assert c["a"].call("[sharedvar.create_var(V), sharedvar.set_value(V, 'x')]", V=V) == [True, True]
        value, waited = c["b"].call("""
            t0 = time.monotonic()
            v = sharedvar.wait_for_value(V, timeout=5)
            result = [v, time.monotonic() - t0]
        """, V=V)
        assert value == "x" and waited < 1.0
        # "ever set": setting it to the empty string still counts
        assert c["a"].call("sharedvar.set_value(V, '')", V=V) is True
        assert c["b"].call("sharedvar.wait_for_value(V, timeout=0)", V=V) == ""


def test_wait_for_value_blocks_until_the_next_set(events, backend):
    V = uniq("var")
    with cluster(events, backend, ["w1", "w2", "s"]) as c:
        assert c["s"].call("sharedvar.create_var(V)", V=V) is True
        waits = [c["w1"].start("sharedvar.wait_for_value(V, timeout=20)", V=V),
                 c["w2"].start("await sharedvar.wait_for_value_async(V, timeout=20)", V=V)]
        wait_waiters(c, backend, V, 2)
        assert not waits[0].done(0.2) and not waits[1].done()
        assert c["s"].call("sharedvar.set_value(V, 'now')", V=V) is True
        assert [w.result(5) for w in waits] == ["now", "now"]


def test_wait_for_value_returns_none_when_deleted_while_waiting_or_on_timeout(events, backend):
    V = uniq("var")
    with cluster(events, backend, ["w", "d"]) as c:
        w, d = c["w"], c["d"]
        assert w.call("sharedvar.wait_for_value(V, timeout=1)", V=V) is None   # missing
        assert d.call("sharedvar.create_var(V)", V=V) is True
        value, waited = w.call("""
            t0 = time.monotonic()
            v = sharedvar.wait_for_value(V, timeout=0.3)
            result = [v, time.monotonic() - t0]
        """, V=V)
        assert value is None and 0.25 <= waited < 1.5
        waiting = w.start("sharedvar.wait_for_value(V, timeout=20)", V=V)
        wait_waiters(c, backend, V, 1)
        assert d.call("sharedvar.delete_var(V)", V=V) is True
        assert waiting.result(5) is None


@pytest.mark.parametrize("kind", ["rpc", "native", "etcd"])
def test_a_nul_in_a_value_round_trips_and_the_channel_lives_on(events, kind, request):
    """Attack finding: on the RPC plugin beside the native semaphores and
    mutexes, ``set_value("v", "a\\x00b")`` returned True and then every call
    of that container raised ControllerGoneError."""
    if kind == "etcd":
        request.getfixturevalue("etcd_backend")
    V = uniq("var")
    with cluster(events, kind, ["a", "b"]) as c:
        a, b = c["a"], c["b"]
        assert a.call("sharedvar.create_var(V)", V=V) is True
        assert a.call("sharedvar.set_value(V, 'a\\x00b')", V=V) is True
        assert a.call("sharedvar.get_value(V)", V=V) == "a\x00b"
        assert b.call("sharedvar.get_value(V)", V=V) == "a\x00b"
        assert a.call("sharedvar.set_value(V, '\\x00')", V=V) is True
        assert b.call("sharedvar.wait_for_value(V, timeout=5)", V=V) == "\x00"
        assert a.call("sharedvar.delete_var(V)", V=V) is True


@pytest.mark.parametrize("kind", ["rpc", "native"])
def test_synchronous_calls_from_a_thread_while_the_loop_is_idle_never_lose_their_reply(events, kind):
    """The real cause of the NUL finding above: a synchronous call from a
    thread of the container sent its frame, the container's idle loop read
    the reply first (delivered it), and the thread then took the reader role
    and blocked in recv for a reply that had come already — for ever (until
    the controller shut down and closed the channel).  Every call here must
    come back (bounded)."""
    V = uniq("var")
    with cluster(events, kind, ["a"]) as c:
        a = c["a"]
        assert a.call("sharedvar.create_var(V)", V=V) is True
        n = a.call("""
            def work():
                done = 0
                for i in range(1500):
                    assert sharedvar.set_value(V, str(i)) is True
                    assert sharedvar.get_value(V) == str(i)
                    done += 1
                return done
            loop = asyncio.get_running_loop()
            result = await asyncio.wait_for(loop.run_in_executor(None, work), 40)""", V=V, timeout=60)
        assert n == 1500
