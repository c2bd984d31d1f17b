"""A container's channel to the controller keeps every frame it reads when
a Python signal handler raises on the main thread (channel.py,
channel_frames.py, csrc/fast/container_channel.c: C1, C2).

- In a real container (RPC backend), worker threads make calls while the
  main thread makes calls of its own and is interrupted by a SIGALRM
  handler that raises every 0.5 ms: every worker finishes, the semaphore
  keeps its exact count and the mutex is free.  Before C1/C2 the main
  thread, as the channel's reader, lost replies it had received for the
  workers, and they waited forever.
- The dispatch on its own, both implementations (C and Python): the same
  effects for the same frames in any chunking; a decoder that raises in
  the middle (as a handler's exception does) leaves the frames before it
  dispatched exactly once and the frame it raised on whole.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque

import pytest

from netplex_native import channel_frames, wire
from netplex_native.errors import ProtocolError
from test_semantics import cluster, uniq

try:
    from netplex_native import _fast
except ImportError:     # pragma: no cover
    _fast = None

IMPLS = [pytest.param(channel_frames.dispatch, id="python")]
if _fast is not None:
    IMPLS.append(pytest.param(_fast.chan_dispatch, id="c"))


# --------------------------------------------------------------------------
# the whole path, in a container
# --------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_a_raising_signal_handler_on_the_main_thread_loses_no_other_threads_reply(events):
    S, M = uniq("sem"), uniq("mtx")
    with cluster(events, "rpc", ["a"]) as c:
        out = c["a"].call("""
            import signal, threading, time
            class Tick(Exception):
                pass
            semaphore.create(S, 2)
            ITER = 250
            done = []
            def worker():
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # the main thread's alone
                for i in range(ITER):
                    assert semaphore.decrement(S, wait=True, timeout=60) >= 0
                    semaphore.increment(S)
                    m = mutex.access(M)
                    assert m.acquire(timeout=60) is True
                    m.release()
                done.append(1)
            armed = [False]
            ticks = [0]
            def on_alarm(sig, frame):
                if armed[0]:        # raise only inside the call below
                    ticks[0] += 1
                    raise Tick()
            old = signal.signal(signal.SIGALRM, on_alarm)
            threads = [threading.Thread(target=worker) for _ in range(4)]
            for t in threads:
                t.start()
            calls = interrupted = 0
            deadline = time.monotonic() + 40
            signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
            try:
                while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                    armed[0] = True
                    try:
                        semaphore.get(S)
                        calls += 1
                    except Tick:
                        interrupted += 1
                    finally:
                        armed[0] = False
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
            for t in threads:
                t.join(5)
            m = mutex.access(M)
            free = m.acquire(blocking=False)
            if free:
                m.release()
            result = [len(done), semaphore.get(S), free, interrupted, calls]
        """, timeout=90, S=S, M=M)
    finished, count, free, interrupted, calls = out
    print(f"{interrupted} calls interrupted, {calls} completed, workers finished {finished}/4")
    assert interrupted >= 20, f"the handler interrupted only {interrupted} calls: the test proves nothing"
    assert finished == 4, f"{4 - finished} worker threads never got a reply (interrupted {interrupted} calls)"
    assert count == 2, f"the semaphore holds {count} units instead of 2"
    assert free is True, "the mutex stayed held"


# --------------------------------------------------------------------------
# the dispatch on its own
# --------------------------------------------------------------------------

def _frames(rng: random.Random, n: int):
    """n random frames to a container, and the ids of the calls they answer."""
    out = []
    replied = set()
    for i in range(n):
        rid = 1000 + i
        kind = rng.randrange(7)
        deferred = rng.random() < 0.3
        if kind == 0:
            out.append(wire.encode_reply(rid, rng.choice([None, True, False, rng.randrange(-5, 1 << 40)]), deferred))
        elif kind == 1:
            out.append(wire.encode(["r", rid, True, {"x": [1, "é"]}, deferred]))
        elif kind == 2:
            out.append(wire.encode(["r", rid, True, "v", deferred], b"\x80blob"))
        elif kind == 3:
            out.append(wire.error_frame(rid, ValueError("no")))
        elif kind == 4:
            out.append(wire.encode(["m", "hello", [i]]))
        elif kind == 5:
            out.append(wire.encode(["ctl", "shutdown"]))
        else:
            out.append(wire.encode_reply(rid, i, deferred))
        if kind not in (4, 5):
            replied.add(rid)
    return out, replied


def STATE(sync, results, abandoned, futures, decode=channel_frames.decode, loop_thread=None):
    """A Channel._dispatch_state() of its own."""
    return (decode, sync, results, abandoned, futures, bytearray(), deque(), deque(), [0, 0],
            (10_000, 16 << 20), loop_thread)


def _state(rng: random.Random, n: int):
    sync, abandoned, futures = set(), {}, {}
    for i in range(n):
        rid = 1000 + i
        r = rng.randrange(4)
        if r == 0:
            sync.add(rid)
        elif r == 1:
            abandoned[rid] = rng.choice([None, wire.encode_call(0, "sem.increment", [f"s{rid}"])])
        elif r == 2:
            futures[rid] = (f"fut{rid}", f"undo{rid}".encode())
    return STATE(sync, {}, abandoned, futures)


def _snapshot(st):
    out = []
    for x in st[1:9]:
        if isinstance(x, set):
            x = sorted(x)
        elif isinstance(x, dict):
            x = dict(x)
        elif isinstance(x, (deque, list)):
            x = list(x)
        elif isinstance(x, bytearray):
            x = bytes(x)
        out.append(x)
    return out


@pytest.mark.parametrize("seed", range(30))
def test_c_and_python_dispatch_do_the_same_in_any_chunking(seed):
    rng = random.Random(seed)
    n = rng.randrange(1, 40)
    frames, replied = _frames(rng, n)
    data = b"".join(frames)
    results = []
    for impl in [p.values[0] for p in IMPLS]:
        st = _state(random.Random(seed), n)
        buf = bytearray()
        woke_any = False
        pos = 0
        crng = random.Random(seed + 1)
        while pos < len(data):
            step = crng.randrange(1, 64)
            buf += data[pos:pos + step]
            pos += step
            woke_any |= impl(buf, st)
        assert buf == b""
        results.append((woke_any, _snapshot(st)))
    if len(results) == 2:
        assert results[0] == results[1]
    woke, (sync, res, abandoned, futures, wbuf, deliveries, inbox, icount) = results[-1]
    # every frame had exactly one effect, by what it answers
    st0 = _state(random.Random(seed), n)
    assert set(res) == st0[1] & replied and woke == bool(st0[1] & replied)
    assert set(abandoned) == set(st0[3]) - replied and set(futures) == set(st0[4]) - replied
    assert sorted(d[0] for d in deliveries) == sorted(f"fut{r}" for r in set(st0[4]) & replied)
    assert len(inbox) == sum(1 for f in frames if b'["m"' in f or b'["ctl"' in f)
    assert icount == [sum(x[2] for x in inbox), 0]
    # the write buffer: one acknowledgement per deferred reply, one give-back
    # per granted reply to an abandoned call with an undo, in frame order
    expect = b""
    for f in frames:
        one = STATE(set(), {}, {r: u for r, u in st0[3].items()}, {})
        channel_frames.dispatch(bytearray(f), one)
        expect += bytes(one[5])
    assert wbuf == expect


class Interrupt(BaseException):
    """What a signal handler raises, in the middle of a decode."""


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("at", range(6))
def test_an_exception_in_the_middle_leaves_earlier_frames_dispatched_once_and_the_rest_whole(impl, at):
    frames = [wire.encode(["r", 1 + i, True, i, False]) for i in range(6)]   # JSON: decoded in Python
    buf = bytearray(b"".join(frames))
    calls = [0]

    def decode(b, pos):
        calls[0] += 1
        if calls[0] == at + 1:
            raise Interrupt()
        return channel_frames.decode(b, pos)
    st = STATE(set(range(1, 7)), {}, {}, {}, decode=decode)
    with pytest.raises(Interrupt):
        impl(buf, st)
    assert sorted(st[2]) == list(range(1, at + 1))
    assert bytes(buf) == b"".join(frames[at:])
    st[2].clear()           # the callers took their replies
    for rid in range(1, at + 1):
        st[1].discard(rid)
    calls[0] = 100          # no more interrupts: the next reader dispatches the rest
    assert impl(buf, st) is True
    assert buf == b"" and sorted(st[2]) == list(range(at + 1, 7))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("garbage", [
    wire.HEADER.pack(4 + 3, 3) + b"[1,",                        # not JSON
    wire.HEADER.pack(wire.MAX_FRAME + 1, 0),                     # too large
    wire.HEADER.pack(2, 0) + b"xxxx",                            # too short
    wire.encode(["r", 1, "yes", 1, False]),                     # a reply with a bad ok
    wire.encode(["r", 1, True, 1]),                             # a reply of 4 elements
    wire.encode({"r": 1}),                                      # not an array
    wire._REPLY.pack(wire._REPLY_LEN, 0, wire.OP_REPLY, 7, 0, 0),  # a binary reply without ok
    wire._REPLY.pack(wire._REPLY_LEN, 0, wire.OP_REPLY, 7, 1, 5),  # None with a value
], ids=["json", "large", "short", "ok", "len", "object", "not-ok", "value"])
def test_garbage_is_a_protocol_error_after_the_frames_before_it(impl, garbage):
    good = wire.encode_reply(1, 5)
    buf = bytearray(good + garbage)
    st = STATE({1}, {}, {}, {})
    with pytest.raises(ProtocolError):
        impl(buf, st)
    assert st[2] == {1: (True, 5, None)}
    assert bytes(buf) == garbage


def test_the_acknowledgement_the_c_code_builds_is_the_one_python_encodes():
    if _fast is None:
        pytest.skip("no accelerator in this build")
    for rid in (0, 1, 12345, (1 << 64) - 1):
        st = STATE(set(), {}, {}, {})
        _fast.chan_dispatch(bytearray(wire.encode_reply(rid, None, True)), st)
        assert bytes(st[5]) == wire.encode_call(0, "ctl.ack", [rid])


@pytest.mark.parametrize("impl", IMPLS)
def test_a_reply_to_an_abandoned_call_is_given_back_only_if_it_granted_something(impl):
    undo = wire.encode_call(0, "sem.increment", ["s"])
    cases = [(True, True), (0, True), (7, True), (1 << 70, True), (-1, False), (False, False),
             (None, False), ("x", False)]
    frames = [wire.encode_reply(10 + i, r) if not isinstance(r, int) or r < 1 << 63 else
              wire.encode(["r", 10 + i, True, r, False]) for i, (r, _) in enumerate(cases)]
    frames.append(wire.error_frame(99, ValueError("no")))
    st = STATE(set(), {}, {10 + i: undo for i in range(len(cases))} | {99: undo}, {})
    impl(bytearray(b"".join(frames)), st)
    assert bytes(st[5]) == undo * sum(1 for _, g in cases if g)
    assert st[3] == {}


@pytest.mark.parametrize("impl", IMPLS)
def test_a_reply_to_no_id_of_ours_is_dropped(impl):
    buf = bytearray(wire.encode(["r", 1 << 64, True, 1, True]) + wire.encode(["r", -1, True, 1, False])
                    + wire.encode_reply(3, 4))
    st = STATE({3}, {}, {}, {})
    assert impl(buf, st) is True
    assert buf == b"" and st[2] == {3: (True, 4, None)} and st[5] == b""


@pytest.mark.parametrize("impl", IMPLS)
def test_on_the_loops_thread_an_awaited_reply_completes_its_future_or_is_given_back(impl):
    import threading
    loop = asyncio.new_event_loop()
    try:
        waiting, gone = loop.create_future(), loop.create_future()
        gone.cancel()
        undo = wire.encode_call(0, "mutex.unlock", ["m", False])
        st = STATE(set(), {}, {}, {1: (waiting, undo), 2: (gone, undo)}, loop_thread=threading.get_ident())
        impl(bytearray(wire.encode_reply(1, True) + wire.encode_reply(2, True, True)), st)
        assert waiting.result() == (True, True, None)
        assert bytes(st[5]) == undo + wire.encode_call(0, "ctl.ack", [2]) or \
            bytes(st[5]) == wire.encode_call(0, "ctl.ack", [2]) + undo
        assert st[4] == {} and not st[6]
    finally:
        loop.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_full_inbox_drops_and_counts_messages_but_never_a_lifecycle_one(impl):
    st = list(STATE(set(), {}, {}, {}))
    st[9] = (3, 1 << 20)
    st = tuple(st)
    msgs = [wire.encode(["m", "x", [i]]) for i in range(5)] + [wire.encode(["ctl", "shutdown"])]
    impl(bytearray(b"".join(msgs)), st)
    assert [item[0] for item in st[7]] == [["m", "x", [0]], ["m", "x", [1]], ["m", "x", [2]], ["ctl", "shutdown"]]
    assert st[8] == [sum(len(m) for m in msgs[:3]) + len(msgs[5]), 2]


SENDS = [pytest.param(channel_frames.send, False, id="python")]
if _fast is not None:
    SENDS.append(pytest.param(_fast.chan_send, True, id="c"))


@pytest.mark.parametrize("send, by_fd", SENDS)
def test_a_send_takes_out_and_counts_exactly_what_the_socket_took(send, by_fd):
    import socket
    a, b = socket.socketpair()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        io = a.fileno() if by_fd else a
        data = bytes(range(256)) * 2000
        wbuf, count = bytearray(data), [0]
        got = bytearray()
        while wbuf:
            n = send(io, wbuf, count)
            assert n >= 0
            assert count[0] == len(data) - len(wbuf)
            if n == 0:                      # full: the peer reads
                got += b.recv(1 << 16)
        b.setblocking(False)
        try:
            while True:
                chunk = b.recv(1 << 16)
                if not chunk:
                    break
                got += chunk
        except BlockingIOError:
            pass
        assert bytes(got) == data and count[0] == len(data)
        assert send(io, bytearray(), count) == 0
        b.close()
        assert send(io, bytearray(b"x"), count) == -1     # broken: the peer is gone
    finally:
        a.close()
