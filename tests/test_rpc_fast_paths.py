"""The RPC backend's fast paths, each against the general path it shortens.

Controller (netplex_native/ctrl_selector.py, csrc/fast/controller_calls.c):
- the selector serves a hot fd's reads from inside select, so the loop
  iterates a few times for thousands of calls (and once per call when the
  inline serving is off: the count tells them apart);
- it returns to the loop at once when a served read scheduled a callback
  or a timer earlier than every other, when another fd is ready, or when
  the fd's reader was replaced; a hot callback's exception goes to the
  loop's exception handler;
- ctrl_hot_read answers exactly the calls the Python path answers, with the
  same bytes, and hands everything else back untouched or for Python to
  finish (errors, results it does not encode, a reply the socket did not
  take whole).
Container (csrc/fast/container_channel.c, C4; netplex_native/channel.py):
- a synchronous call through the whole-round-trip path sends what a
  deferred reply asks (its acknowledgement), queues the messages that
  arrive before its reply, and leaves the writer role free while it sleeps
  in recv (another thread's call is written and answered meanwhile).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import threading
import time

import pytest

from netplex_native import wire
from netplex_native.channel import Channel
from netplex_native.ctrl_selector import HOT_BURST, HotSelector

from harness import fork_call, hog_on

try:
    from netplex_native import _fast
except ImportError:     # pragma: no cover
    _fast = None

needs_fast = pytest.mark.skipif(_fast is None, reason="the accelerator is not built")


# --------------------------------------------------------------------------
# the controller's selector
# --------------------------------------------------------------------------

class _Echo:
    """A loop whose reader on one end of a socketpair answers each request
    (4 bytes) with the same 4 bytes; `calls` counts them."""

    def __init__(self, inline: bool = True):
        self.sel = HotSelector()
        self.loop = asyncio.SelectorEventLoop(self.sel)
        if inline:
            assert self.sel.bind(self.loop)
        self.client, self.server = socket.socketpair()
        self.server.setblocking(False)
        self.calls = 0
        self.iterations = 0
        self.extra = None           # called with the loop after each request
        self.loop.add_reader(self.server.fileno(), self.on_readable)
        self.sel.set_hot(self.server.fileno(), self.on_readable)
        run_once = self.loop._run_once

        def counting():
            self.iterations += 1
            run_once()
        self.loop._run_once = counting

    def on_readable(self):
        try:
            data = self.server.recv(4096)
        except BlockingIOError:
            return
        for i in range(0, len(data), 4):
            self.calls += 1
            self.server.send(data[i:i + 4])
            if self.extra is not None:
                self.extra(self.loop)

    def round_trips(self, n: int, stop=None):
        """A thread that makes n round trips (fewer if *stop* is set);
        returns it, started."""
        def run():
            for i in range(n):
                if stop is not None and stop.is_set():
                    return
                self.client.sendall(struct.pack("!I", i))
                got = b""
                while len(got) < 4:
                    got += self.client.recv(4 - len(got))
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def run_until(self, cond, timeout: float) -> bool:
        async def wait():
            deadline = time.monotonic() + timeout
            while not cond() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        self.loop.run_until_complete(wait())
        return cond()

    def close(self):
        self.loop.close()
        self.client.close()
        self.server.close()


@pytest.fixture
def echo():
    made = []

    def make(inline=True):
        e = _Echo(inline)
        made.append(e)
        return e
    yield make
    for e in made:
        e.close()


@pytest.mark.timeout(60)
def test_the_selector_serves_a_hot_fd_inside_select_and_the_loop_barely_iterates(echo):
    n = 3000
    fast, plain = echo(True), echo(False)
    for e in (fast, plain):
        t = e.round_trips(n)
        assert e.run_until(lambda: e.calls >= n, 30), e.calls
        t.join(10)
    # the loop's own sleep (0.01 s) also iterates it: a few per hundredth
    assert fast.iterations < n // 10, (fast.iterations, plain.iterations)
    assert plain.iterations >= n, plain.iterations


@pytest.mark.timeout(60)
def test_the_loop_iterates_at_least_once_every_burst_of_hot_calls(echo):
    e = echo()
    n = 3000
    done = e.loop.create_future()

    def client():
        e.round_trips(n).join(30)
        e.loop.call_soon_threadsafe(done.set_result, None)
    threading.Thread(target=client, daemon=True).start()
    e.loop.run_until_complete(done)         # no timer: only the burst bound returns
    assert e.calls == n
    assert e.iterations >= n // HOT_BURST, e.iterations


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["timer", "callback"])
def test_work_a_hot_read_schedules_runs_on_time(echo, what):
    """A callback, or a timer earlier than every other one, scheduled from
    inside select (a wait's timeout, say) ends the inner polling: without
    that the loop would poll on until its only other timer, 10 s away."""
    e = echo()
    done = e.loop.create_future()

    def mark():
        if not done.done():
            done.set_result(time.monotonic())
    if what == "timer":
        e.extra = lambda loop: loop.call_later(0.05, mark)
    else:
        e.extra = lambda loop: loop.call_soon(mark)
    e.loop.call_later(10, lambda: None)
    t0 = time.monotonic()
    e.round_trips(1)
    assert e.loop.run_until_complete(done) - t0 < 5


@pytest.mark.timeout(60)
def test_another_fd_is_served_while_a_hot_fd_never_stops(echo):
    e = echo()
    c, d = socket.socketpair()
    d.setblocking(False)
    got = e.loop.create_future()
    started = e.loop.create_future()
    e.loop.add_reader(d.fileno(), lambda: got.done() or got.set_result(d.recv(10)))
    e.extra = lambda loop: started.done() or e.calls < 100 or started.set_result(None)
    stop = threading.Event()
    t = e.round_trips(10**7, stop)
    try:
        e.loop.run_until_complete(started)          # the hot fd is busy
        e.loop.call_later(10, lambda: None)         # (no short timer to hide a starved fd)
        t0 = time.monotonic()
        c.send(b"x")
        assert e.loop.run_until_complete(got) == b"x"
        assert time.monotonic() - t0 < 5
        assert t.is_alive(), "the other fd was served only once the hot one went quiet"
    finally:
        stop.set()
        e.run_until(lambda: not t.is_alive(), 30)
        e.loop.remove_reader(d.fileno())
        c.close()
        d.close()


@pytest.mark.timeout(60)
def test_a_replaced_reader_is_never_served_by_the_old_callback(echo):
    e = echo()
    t = e.round_trips(100)
    assert e.run_until(lambda: e.calls >= 100, 20)
    t.join(10)
    done = e.loop.create_future()

    def new_reader():
        done.set_result(e.server.recv(4096))
        e.loop.remove_reader(e.server.fileno())
    e.loop.add_reader(e.server.fileno(), new_reader)      # replaces the hot one
    e.loop.call_later(10, lambda: None)         # (no short timer to hide a stuck select)
    before = e.calls
    t0 = time.monotonic()
    e.client.sendall(b"abcd")
    assert e.loop.run_until_complete(done) == b"abcd"
    assert time.monotonic() - t0 < 5 and e.calls == before


def test_an_fd_whose_reader_is_not_recognised_is_not_marked(echo):
    e = echo()
    other = lambda: None                                    # noqa: E731
    assert e.sel.set_hot(e.server.fileno(), other) is False     # not the registered callback
    assert e.server.fileno() not in e.sel._hot
    c, d = socket.socketpair()
    try:
        e.sel.register(d.fileno(), 1, (object(), None))     # not an asyncio handle
        assert e.sel.set_hot(d.fileno(), other) is False
        e.sel.unregister(d.fileno())
    finally:
        c.close()
        d.close()


@pytest.mark.timeout(60)
def test_a_hot_callback_exception_goes_to_the_exception_handler_and_serving_goes_on(echo):
    e = echo()
    seen = []
    e.loop.set_exception_handler(lambda loop, ctx: seen.append(ctx["exception"]))

    def extra(loop):
        if e.calls == 5:
            raise ValueError("plugin bug")
    e.extra = extra
    t = e.round_trips(50)
    assert e.run_until(lambda: e.calls >= 50, 20), e.calls
    t.join(10)
    assert len(seen) == 1 and isinstance(seen[0], ValueError)


# --------------------------------------------------------------------------
# ctrl_hot_read
# --------------------------------------------------------------------------

def _call(op: int, rid: int, name: bytes, flags: int = 0, jlen: int = 0) -> bytes:
    return wire._CALL.pack(wire._CALL_FIXED + len(name), jlen, op, rid, flags, float("nan")) + name


class _Rec:
    id = "c1"


class _Conn:
    """What ctrl_hot_read reads of a controller._Conn after the plugin ran."""

    def __init__(self, sock):
        self.sock = sock
        self.queued = 0
        self.closed = False
        self.draining = False


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _reply(a) -> bytes:
    a.settimeout(5)
    return a.recv(4096)


@needs_fast
@pytest.mark.parametrize("result", [0, 7, -1, 2**63 - 1, -2**63, None, True, False])
def test_ctrl_hot_read_answers_with_the_bytes_python_encodes(pair, result):
    a, b = pair
    seen = []

    def fn(rec, name, flags):
        seen.append((rec, name, flags))
        return result
    a.sendall(_call(2, 41, "s.é".encode()))
    assert _fast.ctrl_hot_read(_Conn(b), b, {2: (fn, 0)}, _Rec) is True
    assert seen == [(_Rec, "s.é", 0)]
    assert _reply(a) == wire.encode_reply(41, result)


@needs_fast
@pytest.mark.parametrize("result", [2**63, -2**63 - 1, "x", 1.5, [1]])
def test_ctrl_hot_read_leaves_other_results_to_python(pair, result):
    a, b = pair
    a.sendall(_call(1, 9, b"s"))
    assert _fast.ctrl_hot_read(_Conn(b), b, {1: (lambda r, n, f: result, 0)}, _Rec) == (0, 9, result)


@needs_fast
def test_ctrl_hot_read_hands_an_exception_back_and_lets_a_base_exception_through(pair):
    a, b = pair
    a.sendall(_call(1, 9, b"s"))
    err = ValueError("no")

    def bad(rec, name, flags):
        raise err
    kind, rid, exc = _fast.ctrl_hot_read(_Conn(b), b, {1: (bad, 0)}, _Rec)
    assert (kind, rid) == (1, 9) and exc is err and exc.__traceback__ is not None

    def interrupt(rec, name, flags):
        raise KeyboardInterrupt
    a.sendall(_call(1, 10, b"s"))
    with pytest.raises(KeyboardInterrupt):
        _fast.ctrl_hot_read(_Conn(b), b, {1: (interrupt, 0)}, _Rec)


@needs_fast
@pytest.mark.parametrize("data", [
    _call(1, 9, b"s", jlen=1),                  # JSON part
    _call(1, 9, b"s", flags=1),                 # a flag the op does not take
    _call(3, 9, b"s"),                          # an op nobody serves
    _call(1, 0, b"s"),                          # id 0
    _call(1, 9, b"a\x00b"),                     # NUL in the name
    _call(1, 9, b"x" * 256),                    # name too long
    _call(1, 9, b"\xff\xfe"),                   # not UTF-8
    _call(1, 9, b"s") + _call(1, 10, b"s"),     # two calls in one read
    _call(1, 9, b"s")[:-1],                     # a partial call
    b"\x00\x00\x00\x05garbage",
], ids=["json", "flag", "op", "id0", "nul", "long", "utf8", "two", "partial", "garbage"])
def test_ctrl_hot_read_returns_anything_but_one_hot_call_untouched(pair, data):
    a, b = pair
    called = []
    a.sendall(data)
    time.sleep(0.01)
    got = _fast.ctrl_hot_read(_Conn(b), b, {1: (lambda *x: called.append(x) or 0, 0)}, _Rec)
    assert got == data and not called


@needs_fast
def test_ctrl_hot_read_nothing_end_and_a_name_of_255_bytes(pair):
    a, b = pair
    assert _fast.ctrl_hot_read(_Conn(b), b, {}, _Rec) is None
    a.sendall(_call(1, 9, b"n" * 255))
    assert _fast.ctrl_hot_read(_Conn(b), b, {1: (lambda r, n, f: len(n), 0)}, _Rec) is True
    assert _reply(a) == wire.encode_reply(9, 255)
    a.shutdown(socket.SHUT_WR)
    assert _fast.ctrl_hot_read(_Conn(b), b, {}, _Rec) == b""


@needs_fast
def test_ctrl_hot_read_hands_back_a_reply_the_socket_did_not_take(pair):
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    filled = 0
    while True:                                  # a peer that does not read
        try:
            filled += b.send(b"z" * 4096)
        except BlockingIOError:
            break
    a.sendall(_call(1, 9, b"s"))
    kind, rid, frame, sent = _fast.ctrl_hot_read(_Conn(b), b, {1: (lambda r, n, f: 3, 0)}, _Rec)
    assert (kind, rid, sent) == (2, 9, 0) and frame == wire.encode_reply(9, 3)


@needs_fast
@pytest.mark.parametrize("what", ["queued", "closed", "draining", "socket closed"])
def test_ctrl_hot_read_leaves_the_answer_to_the_queue_when_the_plugin_wrote_or_closed(pair, what):
    """The plugin may answer other calls of the same container (a unit
    granted to one of its waiters) and leave bytes queued, or close the
    channel: then the answer must go through the connection's queue (after
    those bytes, or nowhere), never straight to the socket."""
    a, b = pair
    conn = _Conn(b)

    def fn(rec, name, flags):
        if what == "socket closed":
            os.close(b.detach())
        else:
            setattr(conn, what, 1 if what == "queued" else True)
        return 4
    a.sendall(_call(1, 9, b"s"))
    assert _fast.ctrl_hot_read(conn, b, {1: (fn, 0)}, _Rec) == (0, 9, 4)
    a.setblocking(False)
    if what == "socket closed":
        assert a.recv(100) == b""   # nothing was sent: the end of the stream
    else:
        with pytest.raises(BlockingIOError):
            a.recv(100)             # nothing was sent


# --------------------------------------------------------------------------
# the container's round trip in C (C4)
# --------------------------------------------------------------------------

class _Peer:
    """The controller's end, scripted: answers each call by `answer(obj)`,
    a list of frames to send."""

    def __init__(self, sock, answer):
        self.sock, self.answer = sock, answer
        self.got = []
        self.dec = wire.Decoder(binary=True)
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            for obj, _blob in self.dec.feed(data):
                self.got.append(obj)
                for frame in self.answer(obj):
                    self.sock.sendall(frame)


@pytest.fixture
def chan():
    a, b = socket.socketpair()
    ch = Channel(a)
    yield ch, b
    ch.close()
    b.close()


@needs_fast
@pytest.mark.timeout(30)
def test_a_deferred_reply_is_acknowledged_and_a_message_before_it_queued(chan):
    ch, b = chan

    def answer(obj):
        if obj[0] == 0:
            return []
        return [wire.encode(["msg", "hello", []]), wire.encode_reply(obj[0], 5, deferred=True)]
    peer = _Peer(b, answer)
    assert ch.call_op(2, b"s", 0, b"")[0] == 5
    deadline = time.monotonic() + 10
    while not any(o[0] == 0 for o in peer.got) and time.monotonic() < deadline:
        time.sleep(0.01)
    acks = [o for o in peer.got if o[0] == 0]
    assert acks and acks[0][1] == "ctl.ack" and acks[0][2] == [peer.got[0][0]]
    assert [m[0] for m in ch._inbox] == [["msg", "hello", []]]


@needs_fast
@pytest.mark.timeout(30)
def test_a_deferred_reply_alone_is_acknowledged_at_once(chan):
    """A wait that was granted (a deferred reply, nothing else in the read):
    its acknowledgement goes out before the call returns, not with the
    container's next write (else the controller keeps the grant as not
    received, and gives it back if the container dies holding it)."""
    ch, b = chan

    def answer(obj):
        return [] if obj[0] == 0 else [wire.encode_reply(obj[0], 0, deferred=True)]
    peer = _Peer(b, answer)
    assert ch.call_op(2, b"s", 0, b"")[0] == 0
    deadline = time.monotonic() + 10
    while len(peer.got) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [o[1] for o in peer.got[1:]] == ["ctl.ack"], peer.got


@needs_fast
@pytest.mark.timeout(30)
def test_another_threads_call_is_written_and_answered_while_one_sleeps_in_recv(chan):
    ch, b = chan
    first = threading.Event()
    held = []

    def answer(obj):
        if obj[0] == 0:
            return []
        if not held:                    # the first call waits for the second
            held.append(obj[0])
            first.set()
            return []
        return [wire.encode_reply(obj[0], 2), wire.encode_reply(held[0], 1)]
    _Peer(b, answer)
    out = []
    t = threading.Thread(target=lambda: out.append(ch.call_op(1, b"s")[0]))
    t.start()
    assert first.wait(10)
    # the first caller sleeps in recv, both roles taken by the C round trip
    # at first: the writer role must be free again
    assert ch.call_op(1, b"s")[0] == 2
    t.join(10)
    assert out == [1]


def _reply_peer(sock, cpu: int) -> int:
    """A process on `cpu` that answers every call on `sock` with 1."""
    def run():
        os.sched_setaffinity(0, {cpu})
        dec = wire.Decoder(binary=True)
        while True:
            data = sock.recv(65536)
            if not data:
                return
            for obj, _blob in dec.feed(data):
                if obj[0]:
                    sock.sendall(wire.encode_reply(obj[0], 1))
    return fork_call(run)


@needs_fast
@pytest.mark.timeout(60)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the hog on the caller's CPU, the peer on another")
def test_the_reply_poll_stops_on_a_cpu_another_process_keeps_busy(chan):
    """C5: a caller that polls for its reply yields its CPU between looks;
    with a busy process on that CPU the yield runs the hog's time slice (a
    sleeper woken by the reply would have preempted it), so the poll stops
    and the next calls, about 8 x (the hog's slice) / 20 us, sleep at once.
    A version that counted a late reply as the poll's success would keep
    polling."""
    ch, b = chan
    cpus = sorted(os.sched_getaffinity(0))
    peer = _reply_peer(b, cpus[1])
    mine = os.sched_getaffinity(0)
    cap = _fast.reply_poll(50_000, 50_000)
    try:
        os.sched_setaffinity(0, {cpus[0]})
        with hog_on(cpus[0]):
            for _ in range(30):
                assert ch.call_op(1, b"s")[0] == 1
            state = _fast.reply_poll_state()
    finally:
        os.sched_setaffinity(0, mine)
        _fast.reply_poll(cap, 0)
        os.kill(peer, signal.SIGKILL)
        os.waitpid(peer, 0)
    window, skip = state
    print(f"after 30 calls beside a hog: window {window} ns, {skip} calls to sleep at once")
    assert skip > 0, state


# --------------------------------------------------------------------------
# the whole path: a container that never pauses keeps no one else waiting
# --------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_a_container_calling_without_pause_keeps_no_other_container_waiting(events):
    """The controller serves a container's calls from inside its poll while
    nothing else is ready: another container's calls, and the admin, are
    answered while the first one hammers, not after."""
    from test_semantics import cluster, uniq
    S = uniq("sem")
    with cluster(events, "rpc", ["a", "b"]) as c:
        assert c["a"].call("semaphore.create(S, 1)", S=S) is True
        hammer = c["a"].start("""
            t_end = time.monotonic() + 4
            n = 0
            while time.monotonic() < t_end:
                semaphore.decrement(S)
                semaphore.increment(S)
                n += 1
            result = [n, time.monotonic()]
        """, S=S)
        time.sleep(0.5)
        done_b = c["b"].call("""
            for i in range(50):
                assert semaphore.get(S) in (0, 1)
            result = time.monotonic()
        """, S=S, timeout=30)
        n, done_a = hammer.result(60)
        assert n > 500, n                       # it did hammer
        assert done_b < done_a, (done_b, done_a)
