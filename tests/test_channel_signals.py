"""A container's channel to the controller when Python signal handlers run
on its main thread (channel.py, channel_frames.py,
csrc/fast/container_channel.c: C0-C3).

In a real container (RPC backend), with worker threads calling meanwhile:
- a handler that raises every 0.5 ms in the main thread's calls: every
  worker finishes, the semaphore keeps its exact count, the mutex is free
  (before C0-C2 the main thread, as the channel's reader, lost replies it
  had received for the workers, and they waited forever);
- an exception injected at every point of a main-thread call where CPython
  can run a handler (a trace function), with the main thread writing,
  reading for the others and sleeping: the same checks (it hangs on a
  version that gave a role back through a call);
- a handler that returns but calls the controller itself (C3), while the
  main thread moves large shared-variable values: nothing waits forever.
The dispatch and the send on their own, both implementations (C and
Python): the same effects for the same frames in any chunking; a decoder
that raises in the middle (as a handler's exception does) leaves the frames
before it dispatched exactly once and the frame it raised on whole;
garbage, the give-back rule, the inbox bounds, the bytes a send removes.
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
    _all_served(finished, 4, count, 2, free)


def _all_served(finished: int, workers: int, count: int, units: int, free: bool) -> None:
    """Every worker finished, the semaphore is back at its *units*, the mutex free."""
    assert finished == workers, f"{workers - finished} worker threads never got a reply"
    assert count == units, f"the semaphore holds {count} units instead of {units}"
    assert free is True, "the mutex stayed held"


@pytest.mark.timeout(240)
def test_an_exception_at_every_check_point_of_a_call_ends_that_call_only(events):
    """Deterministic: an exception raised (by a trace function) at the k-th
    point of a main-thread call where CPython could run a signal handler
    -- a function's entry, after each call returns, each backward jump --
    in the channel's code, for every k along the call's path, while two
    worker threads make calls; with the round trip in C (C4) and without
    (the general way it falls back to).  The grants the interrupted calls received
    come back exactly (semaphore count, mutex free), and every worker
    finishes."""
    S, M = uniq("sem"), uniq("mtx")
    with cluster(events, "rpc", ["a"]) as c:
        out = c["a"].call("""
            import dis, sys, threading, time
            from netplex_native import channel as chmod, channel_frames
            class Inject(Exception):
                pass
            # the code objects of the channel, but the entry points whose
            # return path is the caller's (call, call_op, acall)
            def codes_of(fn, into):
                co = getattr(fn, "__code__", None)
                if co is None:
                    return
                stack = [co]
                while stack:
                    c0 = stack.pop()
                    into.add(c0)
                    stack.extend(k for k in c0.co_consts if hasattr(k, "co_code"))
            CODES = set()
            for mod in (chmod, channel_frames):
                for v in list(vars(mod).values()):
                    codes_of(v, CODES)
            for name, v in vars(chmod.Channel).items():
                if name not in ("call", "call_op", "acall", "notify"):
                    codes_of(getattr(v, "fget", v), CODES)
            CHECKS = {}
            for co in CODES:
                ins = list(dis.get_instructions(co))
                pts = set()
                for i, x in enumerate(ins):
                    if x.opname in ("CALL", "CALL_FUNCTION_EX") and i + 1 < len(ins):
                        pts.add(ins[i + 1].offset)
                    elif x.opname == "JUMP_BACKWARD":
                        pts.add(x.offset)
                CHECKS[co] = pts
            state = {"n": 0, "target": 0, "hit": None}
            def tracer(frame, event, arg):
                co = frame.f_code
                if co not in CODES:
                    return None
                frame.f_trace_opcodes = True
                if event == "call" or (event == "opcode" and frame.f_lasti in CHECKS[co]):
                    state["n"] += 1
                    if state["n"] == state["target"]:
                        state["hit"] = (co.co_name, frame.f_lasti, event)
                        raise Inject()
                return tracer
            semaphore.create(S, 3)
            phase = {"pause": 0.0, "stop": False, "idle": False}
            done = []
            iters = [0, 0]
            def worker(i):
                while not phase["stop"]:
                    if phase["idle"]:
                        time.sleep(0.01)
                        continue
                    assert semaphore.decrement(S, wait=True, timeout=60) >= 0
                    semaphore.increment(S)
                    w = mutex.access(M)
                    assert w.acquire(timeout=60) is True
                    w.release()
                    iters[i] += 1
                    if phase["pause"]:
                        time.sleep(phase["pause"])
                done.append(1)
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            m = mutex.access(M)
            ops = {
                "decrement": (lambda: semaphore.decrement(S), lambda r: r >= 0 and semaphore.increment(S)),
                "lock": (lambda: m.acquire(timeout=60), lambda r: r and m.release()),
                "get": (lambda: semaphore.get(S), lambda r: None),
            }
            injected = 0
            points = set()
            longest = 0
            # the workers: busy; calling with pauses (the main thread often
            # reads for them); idle (the main thread alone); each with the
            # round trip in C (C4) and without it (the general way, which
            # C4 falls back to, whatever the timing)
            exchange = chmod._exchange
            for pause, idle, c4 in [(p, i, c) for c in (exchange, None)
                                    for p, i in ((0.0, False), (0.0005, False), (0.0, True))]:
                chmod._exchange = c4
                phase.update(pause=pause, idle=idle)
                for name, (op, undo) in ops.items():
                    k = 1
                    while k < 2000:
                        state.update(n=0, target=k, hit=None)
                        sys.settrace(tracer)
                        try:
                            r = op()
                        except Inject:
                            r = None
                        finally:
                            sys.settrace(None)
                        if state["hit"] is None:
                            # the call passed fewer than k points: past its end
                            longest = max(longest, state["n"])
                            undo(r)
                            if state["n"] < k - 40:
                                break
                        else:
                            injected += 1
                            points.add(state["hit"][:2])
                            if r is not None:
                                undo(r)
                        k += 1
            chmod._exchange = exchange
            phase["stop"] = True
            for t in threads:
                t.join(60)
            free = m.acquire(blocking=False)
            if free:
                m.release()
            semaphore.get(S)        # (reads the last give-backs' replies: the next get sees them)
            result = [len(done), semaphore.get(S), free, injected, sorted(points), longest, iters]
        """, timeout=200, S=S, M=M)
    finished, count, free, injected, points, longest, iters = out
    funcs = {p[0] for p in points}
    print(f"{injected} exceptions injected at {len(points)} distinct points in {sorted(funcs)} "
          f"(longest call: {longest} points); worker iterations {iters}")
    # the main thread was interrupted as a writer, a reader and a sleeper
    assert {"_write_out", "_read", "_dispatch_buffer", "_after_reading", "_sleep"} <= funcs, funcs
    assert injected >= 100, f"only {injected} injections: proves little"
    _all_served(finished, 2, count, 3, free)


@pytest.mark.timeout(120)
def test_a_signal_handler_that_makes_calls_of_its_own_does_not_wait_for_the_thread_it_interrupted(events):
    """A handler that returns, but calls the controller itself (a SIGALRM
    handler that increments and decrements a semaphore) every 1 ms, while
    the main thread it interrupts is itself reading, writing (large
    frames: sharedvar values) or waiting, and worker threads call too:
    nothing waits forever, and the counts are exact."""
    S, S2, V = uniq("sem"), uniq("sem"), uniq("var")
    with cluster(events, "rpc", ["a"]) as c:
        out = c["a"].call("""
            import signal, threading, time
            semaphore.create(S, 2)
            semaphore.create(S2, 5)
            sharedvar.create_var(V)
            big = "x" * 300_000
            handled = [0]
            busy = [False]
            def on_alarm(sig, frame):
                if busy[0]:         # (a handler runs inside another one, under load: not twice)
                    return
                busy[0] = True
                try:
                    assert semaphore.decrement(S2) >= 0
                    semaphore.increment(S2)
                    handled[0] += 1
                finally:
                    busy[0] = False
            done = []
            def worker():
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                for i in range(300):
                    assert semaphore.decrement(S, wait=True, timeout=60) >= 0
                    semaphore.increment(S)
                done.append(1)
            old = signal.signal(signal.SIGALRM, on_alarm)
            threads = [threading.Thread(target=worker) for _ in range(2)]
            for t in threads:
                t.start()
            signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
            try:
                deadline = time.monotonic() + 40
                n = 0
                while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                    sharedvar.set_value(V, big if n % 2 else "small")
                    sharedvar.get_value(V)
                    semaphore.get(S)
                    n += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
            for t in threads:
                t.join(5)
            result = [len(done), semaphore.get(S), semaphore.get(S2), handled[0], n]
        """, timeout=90, S=S, S2=S2, V=V)
    finished, count, count2, handled, rounds = out
    print(f"{handled} handler calls during {rounds} rounds of the main thread")
    assert handled >= 50, f"the handler ran only {handled} times: proves little"
    assert finished == 2 and count == 2 and count2 == 5, out


POLL_CALL = """
    import signal, threading, time
    from netplex_native import _fast
    class Tick(Exception):
        pass
    semaphore.create(S, 0)
    handled = []
    def on_alarm(sig, frame):
        handled.append(time.monotonic())
        if RAISE:
            raise Tick()
    ended = [False]
    def rescue():
        # a unit, late: only needed by a call still asleep after the poll
        time.sleep(UNIT_AFTER)
        if not ended[0]:
            semaphore.increment(S)
    old = signal.signal(signal.SIGALRM, on_alarm)
    threading.Thread(target=rescue, daemon=True).start()
    cap = _fast.reply_poll(10**9, 10**9)     # this call polls for 1 s (C5)
    t0 = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        got = semaphore.decrement(S, wait=True)
    except Tick:
        got = "raised"
    finally:
        ended[0] = True
        t1 = time.monotonic()
        _fast.reply_poll(cap, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    semaphore.increment(S)                  # taken by nobody: the abandoned wait was cancelled
    time.sleep(0.1)
    result = [got, len(handled), handled[0] - t0 if handled else None, t1 - t0, semaphore.get(S)]
"""


@pytest.mark.skipif(_fast is None, reason="C5 is the accelerator's")
@pytest.mark.timeout(120)
def test_a_signal_that_comes_while_a_call_polls_for_its_reply_runs_its_handler_when_the_poll_ends(events):
    """C5: a call that polls for its reply interrupts no system call, so a
    signal that comes meanwhile is only caught by the C handler; its Python
    handler runs when the poll ends, before the call sleeps in recv.  Here
    the call waits for a unit that never comes while a SIGALRM handler that
    raises is due 0.2 s into a 1 s poll: the call ends with the handler's
    exception (a version that went from the poll straight to the recv would
    sleep until the unit a rescue thread posts after 20 s, and return it);
    the wait it abandoned is cancelled at the controller."""
    S = uniq("sem")
    with cluster(events, "rpc", ["a"]) as c:
        got, handled, at, took, left = c["a"].call(POLL_CALL, timeout=90, S=S, RAISE=True, UNIT_AFTER=20.0)
    print(f"handler ran {at:.3f} s after the call began; the call ended after {took:.3f} s")
    assert got == "raised", f"the call returned {got!r}: the handler did not run before it slept"
    assert handled == 1
    assert left == 1, f"the semaphore holds {left}: the abandoned wait took the unit posted after it"


@pytest.mark.skipif(_fast is None, reason="C5 is the accelerator's")
@pytest.mark.timeout(120)
def test_a_handler_that_returns_during_the_poll_leaves_the_call_waiting_for_its_reply(events):
    """The same handler, returning: the call goes on (the channel looked at
    again, then the recv that sleeps) and gets the unit posted 1.5 s in,
    after its poll ended."""
    S = uniq("sem")
    with cluster(events, "rpc", ["a"]) as c:
        got, handled, at, took, left = c["a"].call(POLL_CALL, timeout=90, S=S, RAISE=False, UNIT_AFTER=1.5)
    assert got == 0 and handled == 1, (got, handled)
    assert took >= 1.4, f"the call ended after {took:.3f} s, before the unit was posted"
    assert left == 1


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


def STATE(sync, results, abandoned, futures, decode=channel_frames.decode):
    """A Channel._dispatch_state() of its own."""
    return (decode, sync, results, abandoned, futures, bytearray(), deque(), deque(), [0, 0],
            (10_000, 16 << 20))


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
def test_an_awaited_reply_is_queued_for_the_loop_with_its_undo(impl):
    undo = wire.encode_call(0, "mutex.unlock", ["m", False])
    st = STATE(set(), {}, {}, {1: ("fut1", undo), 2: ("fut2", None)})
    impl(bytearray(wire.encode_reply(1, True) + wire.encode_reply(2, 5, True)), st)
    assert list(st[6]) == [["fut1", undo, (True, True, None)], ["fut2", None, (True, 5, None)]]
    assert st[4] == {} and bytes(st[5]) == wire.encode_call(0, "ctl.ack", [2])


@pytest.mark.skipif(_fast is None, reason="the accelerator's check")
def test_a_bad_undo_is_refused_by_the_c_dispatch_before_any_effect():
    frame = wire.encode_reply(1, True, True)
    for st in (STATE(set(), {}, {1: "not a frame"}, {}), STATE(set(), {}, {}, {1: ("fut", "not a frame")})):
        buf = bytearray(frame)
        with pytest.raises(TypeError):
            _fast.chan_dispatch(buf, st)
        assert bytes(buf) == frame and st[5] == b"" and (st[3] or st[4])


@pytest.mark.parametrize("impl", IMPLS)
def test_a_full_inbox_drops_and_counts_messages_but_never_a_lifecycle_one(impl):
    st = list(STATE(set(), {}, {}, {}))
    st[9] = (3, 1 << 20)
    st = tuple(st)
    msgs = [wire.encode(["m", "x", [i]]) for i in range(5)] + [wire.encode(["ctl", "shutdown"])]
    impl(bytearray(b"".join(msgs)), st)
    assert [item[0] for item in st[7]] == [["m", "x", [0]], ["m", "x", [1]], ["m", "x", [2]], ["ctl", "shutdown"]]
    assert st[8] == [sum(len(m) for m in msgs[:3]) + len(msgs[5]), 2]


SENDS = [pytest.param(channel_frames.send, id="python")]
if _fast is not None:
    SENDS.append(pytest.param(_fast.chan_send, id="c"))


@pytest.mark.parametrize("send", SENDS)
def test_a_send_takes_out_and_counts_exactly_what_the_socket_took(send):
    import socket
    a, b = socket.socketpair()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        io = a
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
        a.close()
        assert send(io, bytearray(b"x"), count) == -1     # closed: never an fd number reused
    finally:
        a.close()
