"""Fuzzed frames: the wire decoder on its own (hypothesis), a container's RPC
channel (raw bytes written to ``ctx.channel.sock`` from inside a container)
and the admin socket.  The controller stays up and keeps serving the other
containers; a peer that sends a malformed frame gets an error or is dropped.

All random cases are seeded (NETPLEX_FUZZ_SEED, default fixed) so a failure
reproduces.
"""

import json
import os
import random
import socket
import struct

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

import netplex_native as netplex
from netplex_native import admin, wire, semaphore, mutex, sharedvar, cenv
from netplex_native.errors import ProtocolError
from harness import run_controller, plugins_for, wait_until
from stress import pid_alive

SEED = int(os.environ.get("NETPLEX_FUZZ_SEED", "20261124"))
HDR = struct.Struct("!II")


# ---------------------------------------------------------------- case generators

def rand_json(rng: random.Random, depth: int = 0):
    k = rng.randrange(10 if depth < 3 else 7)
    if k == 0:
        return None
    if k == 1:
        return rng.choice([True, False])
    if k == 2:
        return rng.choice([0, 1, -1, 2, 2**31, 2**63 - 1, 2**63, -2**63, 2**64 + 5, 10**30,
                           rng.randrange(-1000, 1000)])
    if k == 3:
        return rng.choice([0.0, -0.5, 1e308, 0.001, 3.5, -1e-300])
    if k in (4, 5, 6):
        return rng.choice(["", "a", "x" * 256, "é" * 128, "\x00", "a\x00b", "fz." + str(rng.randrange(20)),
                           "\ud7ff", "*", "storm", "sem", "💥" * 70, "fz.m", "fz.s"])
    if k in (7, 8):
        return [rand_json(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rng.choice(["a", "cmd", "", "name", "pid"]): rand_json(rng, depth + 1) for _ in range(rng.randrange(4))}


PROCS = ["sem.create", "sem.increment", "sem.decrement", "sem.get", "sem.destroy",
         "mutex.lock", "mutex.unlock", "var.create", "var.set", "var.get", "var.wait", "var.delete",
         "ctl.ack", "ctl.cancel", "ctl.ready", "ctl.send_message", "ctl.nope", "ctl.",
         "sem.", "sem", "", ".", "nope.x", "sem.create.x", "var.", "mutex.lock\x00"]
# never fuzzed: ctl.system_shutdown (a legitimate request to stop everything)


def rand_call(rng: random.Random):
    """A JSON value meant as a call: mostly well-shaped with bad contents."""
    shape = rng.random()
    rid = rng.choice([10**9 + rng.randrange(10**6), 0, -5, 2**70, 1.5, "1", None, True])
    proc = rng.choice(PROCS)
    if shape < 0.75:
        args = [rand_json(rng) for _ in range(rng.randrange(5))]
        if proc.startswith("sem.") and rng.random() < 0.5:   # right arity, bad values
            args = [rng.choice(["fz.s", "fz.s2", rand_json(rng)]), rand_json(rng), rand_json(rng)]
        if proc.startswith("mutex.") and rng.random() < 0.5:
            args = [rng.choice(["fz.m", rand_json(rng)]), rng.choice([0, 0.01, -1, None, "x", True])]
        return [rid, proc, args]
    if shape < 0.85:
        return [rid, proc]
    if shape < 0.9:
        return [rid, proc, rand_json(rng), rand_json(rng)]
    return rand_json(rng)


def frame(obj, blob: bytes | None = None, nan: bool = False) -> bytes:
    body = json.dumps(obj, allow_nan=True).encode()
    if nan:
        body = body.replace(b"0.001", b"NaN")
    blob = blob or b""
    return HDR.pack(4 + len(body) + len(blob), len(body)) + body + blob


def malformed_cases(rng: random.Random) -> list[tuple[str, bytes]]:
    """Frames after which the stream is unusable: the peer must be dropped."""
    ok = wire.encode([10**9, "sem.get", ["fz.s"]])
    cases = [
        ("oversized header", HDR.pack(wire.MAX_FRAME + 1, 10) + b"x" * 100),
        ("huge header", b"\xff" * 8),
        ("total < 4", HDR.pack(3, 0) + b"abc"),
        ("json longer than frame", HDR.pack(10, 100) + b"x" * 10),
        ("invalid utf-8", HDR.pack(4 + 4, 4) + b"\xff\xfe\xfd\xfc"),
        ("not json", HDR.pack(4 + 5, 5) + b"hello"),
        ("truncated json", HDR.pack(4 + 6, 6) + b'[1,"se'),
        ("deep nesting", HDR.pack(4 + 200000, 200000) + b"[" * 200000),
        ("huge int", frame([10**9, "sem.get", [int("9" * 5000)]]) if False else
         HDR.pack(4 + 5010, 5010) + b"[" + b"9" * 5008 + b"]"),
        ("pickle", HDR.pack(4 + 20, 20) + b"\x80\x04\x95" + b"\x00" * 17),
        ("good then bad", ok + b"\x00\x00\x00\x02\x00\x00\x00\x00"),
        ("zero header", b"\x00" * 8),
    ]
    for i in range(24):
        n = rng.randrange(8, 300)
        cases.append((f"random bytes #{i}", bytes(rng.randrange(256) for _ in range(n))))
    for i in range(8):          # a valid header, then garbage body
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        cases.append((f"garbage body #{i}", HDR.pack(4 + len(body), len(body)) + body))
    return cases + binary_malformed_cases()


# ---------------------------------------------------------------- the decoder alone

def _check_frames(frames):
    assert isinstance(frames, list)
    for obj, blob in frames:
        assert blob is None or (isinstance(blob, bytes) and blob)
        json.dumps(obj, allow_nan=True)          # a plain JSON value, nothing else


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=300), st.lists(st.integers(1, 64), max_size=8))
def test_decoder_random_bytes_only_protocolerror(data, cuts):
    dec = wire.Decoder()
    pos = 0
    try:
        for c in cuts + [len(data)]:
            _check_frames(dec.feed(data[pos:pos + c]))
            pos += c
    except ProtocolError:
        pass


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                     | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
                     max_leaves=20)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(_json, st.one_of(st.none(), st.binary(min_size=1, max_size=50))), min_size=1, max_size=6),
       st.integers(1, 50), st.data())
def test_decoder_roundtrip_any_chunking_and_truncation(msgs, chunk, data):
    stream = b"".join(wire.encode(o, b) for o, b in msgs)
    dec = wire.Decoder()
    got = []
    for i in range(0, len(stream), chunk):
        got += dec.feed(stream[i:i + chunk])
    assert [(json.dumps(o), b) for o, b in got] == [(json.dumps(o), b) for o, b in msgs]
    assert dec.pending == 0
    # a truncated stream yields only the complete frames, never a partial one
    cut = data.draw(st.integers(0, len(stream) - 1))
    dec2 = wire.Decoder()
    part = dec2.feed(stream[:cut])
    assert len(part) < len(msgs)
    assert [(json.dumps(o), b) for o, b in part] == [(json.dumps(o), b) for o, b in msgs[:len(part)]]
    assert dec2.pending == cut - sum(len(wire.encode(o, b)) for o, b in msgs[:len(part)])


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=64))
def test_decoder_any_header(total, jlen, rest):
    dec = wire.Decoder()
    try:
        _check_frames(dec.feed(HDR.pack(total, jlen) + rest))
    except ProtocolError as e:
        assert str(e)
    else:
        assert total <= wire.MAX_FRAME and total >= 4 and jlen <= total - 4


def test_decoder_seeded_malformed_cases():
    rng = random.Random(SEED)
    for name, data in malformed_cases(rng):
        dec = wire.Decoder()
        try:
            _check_frames(dec.feed(data))
        except ProtocolError:
            pass
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        wire.Decoder().feed(HDR.pack(wire.MAX_FRAME + 1, 0))
    with pytest.raises(ProtocolError, match="not valid JSON"):
        wire.Decoder().feed(HDR.pack(4 + 200000, 200000) + b"[" * 200000)


# ---------------------------------------------------------------- binary frames (container channels)

def _bin_call(op, rid, flags=0, timeout=float("nan"), name=b"fz.s"):
    body = struct.pack("!BQBd", op, rid, flags, timeout) + name
    return HDR.pack(4 + len(body), 0) + body


def _bin_reply(rid, flags, value=0):
    body = struct.pack("!BQBq", 0x80, rid, flags, value)
    return HDR.pack(4 + len(body), 0) + body


HOT_CALLS = [
    ("sem.increment", ["fz.s"]), ("sem.get", ["é💥"]), ("mutex.unlock", ["fz.m", False]), ("mutex.unlock", ["fz.m", True]),
    ("sem.decrement", ["fz.s", False, None]), ("sem.decrement", ["fz.s", True, 2.5]),
    ("sem.decrement", ["fz.s", True, 0]), ("sem.decrement", ["", True, -1.0]),
    ("mutex.lock", ["fz.m", None]), ("mutex.lock", ["fz.m", 0.0]), ("mutex.lock", ["x" * 300, float("inf")]),
]
# the same procedures in shapes that have no binary form: sent as JSON, same meaning
JSON_ONLY_CALLS = [
    ("sem.increment", [5]), ("sem.increment", []), ("sem.increment", ["a", "b"]), ("sem.get", [None]),
    ("sem.decrement", ["fz.s", 1, None]), ("sem.decrement", ["fz.s", True, True]),
    ("sem.decrement", ["fz.s", True, 10**30]), ("sem.decrement", ["fz.s", True, "1"]),
    ("sem.decrement", ["fz.s", False]), ("mutex.lock", ["fz.m"]), ("mutex.lock", ["fz.m", None, 1]),
    ("mutex.lock", ["\ud800", None]), ("sem.create", ["fz.s", 1, True]), ("var.get", ["v"]),
    ("mutex.unlock", ["y" * 5000]),
]


def _is_binary(frame_bytes):
    return HDR.unpack_from(frame_bytes)[1] == 0


def test_binary_call_roundtrip():
    for rid in (0, 1, 2**32 + 7, 2**64 - 1):
        for proc, args in HOT_CALLS:
            data = wire.encode_call(rid, proc, args)
            assert _is_binary(data), (proc, args)
            (obj, blob), = wire.Decoder(binary=True).feed(data)
            assert blob is None
            want = [rid, proc, [float(a) if type(a) is int and i == len(args) - 1 and len(args) > 1 else a
                                for i, a in enumerate(args)]]
            if want[2][-1] == float("inf"):
                want[2][-1] = float("inf")
            assert obj == want, (obj, want)
            _check_frames([(obj, blob)])
    for rid, proc, args, blob in [(2**64, "sem.get", ["a"], None), (-1, "sem.get", ["a"], None),
                                  (3, "sem.get", ["a"], b"blob")] + [(9, p, a, None) for p, a in JSON_ONLY_CALLS]:
        if proc == "mutex.lock" and args[0] == "\ud800":
            continue  # not encodable at all (JSON raises too, below)
        data = wire.encode_call(rid, proc, args, blob)
        assert not _is_binary(data), (proc, args)
        assert wire.Decoder(binary=True).feed(data) == [([rid, proc, args], blob)]
    with pytest.raises(UnicodeEncodeError):
        wire.encode_call(9, "mutex.lock", ["\ud800", None])


def test_binary_reply_roundtrip():
    for rid in (1, 2**64 - 1):
        for result in (None, 0, -1, 7, 2**63 - 1, -2**63, True, False):
            for deferred in (False, True):
                data = wire.encode_reply(rid, result, deferred)
                assert _is_binary(data)
                got = wire.Decoder(binary=True).feed(data)
                assert got == [(["r", rid, True, result, deferred], None)]
                assert type(got[0][0][3]) is type(result)
    for rid, result, blob in [(1, 2**63, None), (1, -2**63 - 1, None), (1, "s", None), (1, [1], None),
                              (1, 1.5, None), (1, None, b"pickle"), (2**64, 1, None)]:
        data = wire.encode_reply(rid, result, False, blob)
        assert not _is_binary(data)
        assert wire.Decoder(binary=True).feed(data) == [(["r", rid, True, result, False], blob)]


def test_binary_frames_only_on_channels():
    data = wire.encode_call(5, "sem.get", ["a"])
    with pytest.raises(ProtocolError, match="not valid JSON"):
        wire.Decoder().feed(data)                    # the admin socket's decoder
    with pytest.raises(ProtocolError, match="not valid JSON"):
        wire.Decoder().feed(wire.encode_reply(5, 1))


def binary_malformed_cases() -> list[tuple[str, bytes]]:
    """Well-framed binary frames with a body that does not parse: the peer is dropped."""
    ok = wire.encode_call(10**9, "sem.get", ["fz.s"])
    return [
        ("binary: empty body", HDR.pack(4, 0)),
        ("binary: unknown op", _bin_call(0x7f, 1)),
        ("binary: op 0", _bin_call(0, 1)),
        ("binary: call too short", HDR.pack(4 + 10, 0) + b"\x03" + b"\x00" * 9),
        ("binary: flags on increment", _bin_call(1, 1, flags=1)),
        ("binary: unknown decrement flag", _bin_call(2, 1, flags=2)),
        ("binary: name not utf-8", _bin_call(3, 1, name=b"\xff\xfe")),
        ("binary: good then bad", ok + _bin_call(9, 1)),
    ]


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 255), st.integers(0, 2**64 - 1), st.integers(0, 255),
       st.floats(allow_nan=True, allow_infinity=True), st.binary(max_size=40), st.integers(-8, 8))
def test_binary_decoder_fuzzed_bodies(op, rid, flags, timeout, name, trim):
    body = struct.pack("!BQBd", op, rid, flags, timeout) + name
    if trim < 0:
        body = body[:trim]
    for data in (HDR.pack(4 + len(body), 0) + body,
                 _bin_reply(rid, flags, (rid & 0xffff) - 7 if op & 1 else 0)):
        try:
            frames = wire.Decoder(binary=True).feed(data)
        except ProtocolError as e:
            assert str(e)
            continue
        _check_frames(frames)
        (obj, blob), = frames
        assert blob is None and isinstance(obj, list)
        if obj[0] == "r":
            assert obj[2] is True and isinstance(obj[4], bool)
        else:
            assert obj[0] == rid and obj[1] in wire.CALL_OPS and isinstance(obj[2], list)
            assert wire.Decoder(binary=True).feed(wire.encode_call(*obj)) == frames


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(st.sampled_from(HOT_CALLS + JSON_ONLY_CALLS[:-4]).map(lambda c: ("c",) + c),
                          st.tuples(st.just("r"), st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64),
                                                            st.text(max_size=5)), st.booleans())),
                min_size=1, max_size=8),
       st.integers(1, 40))
def test_binary_and_json_mixed_any_chunking(msgs, chunk):
    frames, want = [], []
    for i, m in enumerate(msgs, 1):
        if m[0] == "c":
            frames.append(wire.encode_call(i, m[1], m[2]))
            want.append(wire.Decoder(binary=True).feed(frames[-1])[0])
        else:
            frames.append(wire.encode_reply(i, m[1], m[2]))
            want.append((["r", i, True, m[1], m[2]], None))
    stream = b"".join(frames)
    dec = wire.Decoder(binary=True)
    got = []
    for i in range(0, len(stream), chunk):
        got += dec.feed(stream[i:i + chunk])
    assert got == want and dec.pending == 0


# ---------------------------------------------------------------- container channels

class _Worker(netplex.ProcessorHooks):
    """The bystander: does semaphore and mutex operations all along."""

    def __init__(self, events, backend):
        self.events = events
        self.backend = backend

    def post_add_hook(self, service, ctrl):
        for p in plugins_for(self.backend):
            ctrl.add_plugin(p)
        ctrl.add_plugin(sharedvar.plugin)

    def post_start_hook(self, cont):
        semaphore.create("w.sem", 1, protected=True)
        self.n = 0
        cenv.create_timer(self.tick, 0.01)

    def tick(self, timer):
        assert semaphore.decrement("w.sem", wait=True, timeout=2) >= 0
        with mutex.access("w.m"):
            pass
        semaphore.increment("w.sem")
        self.n += 1
        if self.n % 10 == 0:
            self.events.emit("worker_ops", n=self.n)
        return True


class _Fuzzer(netplex.ProcessorHooks):
    def __init__(self, events, cases: int, malformed: list):
        self.events = events
        self.cases = cases
        self.malformed = malformed

    def post_start_hook(self, cont):
        cenv.create_timer(self.go, 0.01)

    def go(self, timer):
        from netplex_native._context import ctx
        n = int(ctx.container.id.rsplit(".", 1)[1])
        if n == 1:                                 # well-framed nonsense: answered with errors
            rng = random.Random(SEED)
            sock = ctx.channel.sock
            sent = 0
            for i in range(self.cases):
                obj = rand_call(rng)
                blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) if rng.random() < 0.1 else None
                data = frame(obj, blob, nan=rng.random() < 0.05)
                r = rng.random()
                if r < 0.3 and isinstance(obj, list) and len(obj) == 3 and isinstance(obj[1], str) \
                        and blob is None:
                    try:                           # binary where the call has a hot shape
                        data = wire.encode_call(*obj)
                    except (ValueError, TypeError, UnicodeEncodeError):
                        pass
                elif r < 0.33:                     # well-framed binary frames of any content
                    op = rng.randrange(1, 6)
                    data = rng.choice([
                        _bin_call(op, rng.choice([0, 10**9 + i, 2**64 - 1]),
                                  rng.choice([0, 1]) if op == 2 else 0, rng.choice([float("nan"), 0.0, -1.0, 0.01, 1e300]),
                                  rng.choice([b"fz.s", b"fz.m", b"", b"x" * 300, "é".encode(), b"a\x00b"])),
                        _bin_reply(rng.randrange(2**64), rng.choice([1, 3, 5, 7, 9, 13]), 0)])
                if rng.random() < 0.003:           # a big one (well below the limit)
                    data = frame([10**9, "sem.get", ["x" * (1 << 20)]])
                _send_all(sock, data)
                sent += 1
                if i % 200 == 0:
                    _read_nowait(ctx.channel)   # keep the replies flowing
            # the channel is still intact: a normal call works and sees a sane state
            v = semaphore.get("w.sem")
            self.events.emit("fuzzed", sent=sent, sem=v)
            ctx.runtime.stop("regular")            # make room for the malformed cases
            return False
        name, data = self.malformed[(n - 2) % len(self.malformed)]
        self.events.emit("malformed", case=name, n=n)
        _send_all(ctx.channel.sock, data)
        return False


def _send_all(sock, data):
    import select
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            select.select([], [sock], [], 0.1)


def _read_nowait(channel):
    """Drain replies so the controller's write buffer never grows."""
    try:
        channel._read_available()
    except Exception:
        pass



@pytest.mark.timeout(120)
def test_fuzzed_container_channel(events, backend):
    ncases = int(os.environ.get("NETPLEX_FUZZ_CASES", "3000"))
    malformed = malformed_cases(random.Random(SEED))

    def build():
        ctrl = netplex.Controller(max_start_failures=10**6, backoff=(0.01, 0.05))
        ctrl.add_service(netplex.Service("work", hooks=_Worker(events, backend), workers=2))
        ctrl.add_service(netplex.Service("fz", hooks=_Fuzzer(events, ncases, malformed), workers=1))
        return ctrl

    with run_controller(build) as proc:
        f = events.wait("fuzzed", timeout=60)[0]
        assert f["sent"] == ncases and f["sem"] in (0, 1), f
        # every malformed case: the fuzzer is dropped (its channel closed -> it exits)
        got = events.wait("malformed", count=len(malformed), timeout=60)
        first_pids = [e["pid"] for e in got[:len(malformed)]]
        assert wait_until(lambda: not any(pid_alive(p) for p in first_pids), 5), \
            [(e["case"], e["pid"]) for e in got if pid_alive(e["pid"])]
        # the bystanders kept working all along, and still do
        before = max(e["n"] for e in events.all("worker_ops"))
        events.poll(0.5)
        after = max(e["n"] for e in events.all("worker_ops"))
        assert after > before, "the other containers stopped being served"
        assert proc.alive()
        print(f"[{backend}] {ncases} fuzzed calls + {len(malformed)} malformed streams; "
              f"controller up; bystander ops {after}")
        assert proc.stop() == 0


# ---------------------------------------------------------------- the admin socket

def _admin_raw(sdir, data: bytes, timeout=5.0) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(os.path.join(sdir, "admin.sock"))
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        while True:
            try:
                d = s.recv(65536)
            except ConnectionResetError:
                break
            if not d:
                return out
            out += d
        return out
    finally:
        s.close()


@pytest.mark.timeout(120)
def test_fuzzed_admin_socket(events, tmp_path):
    sdir = str(tmp_path / "sock")

    def build():
        ctrl = netplex.Controller(socket_dir=sdir)
        ctrl.add_service(netplex.Service("work", hooks=_Worker(events, "rpc"), workers=2))
        return ctrl

    rng = random.Random(SEED)
    with run_controller(build) as proc:
        events.wait("worker_ops", timeout=15)
        cases = []
        for i in range(int(os.environ.get("NETPLEX_FUZZ_CASES", "3000")) // 3):
            r = rng.random()
            if r < 0.5:
                obj = rand_json(rng)
                if rng.random() < 0.6:
                    obj = {"cmd": rng.choice(["list", "inspect", "message", "restart", "nope", "", 5, None]),
                           **({"pattern": rand_json(rng), "name": rand_json(rng), "args": rand_json(rng),
                               "service": rand_json(rng)} if rng.random() < 0.7 else {})}
                cases.append(("frame", frame(obj)))
            elif r < 0.6:
                data = frame({"cmd": "list"})
                cases.append(("truncated", data[:rng.randrange(len(data))]))
            else:
                cases.append(("bytes", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))))
        cases += [(n, d) for n, d in malformed_cases(rng)]
        cases.append(("over the admin limit", HDR.pack(2 << 20, 10) + b"x" * (1100 * 1024)))
        answered = errors = closed = 0
        for kind, data in cases:
            out = _admin_raw(sdir, data)
            if not out:
                closed += 1
                continue
            frames = wire.Decoder().feed(out)
            assert frames, (kind, data[:80], out[:200])
            for obj, blob in frames:
                assert isinstance(obj, dict) and isinstance(obj.get("ok"), bool), obj
                answered += 1
                if not obj["ok"]:
                    assert isinstance(obj.get("error"), str) and obj["error"], obj
                    errors += 1
        assert proc.alive()
        st = admin.request(sdir, {"cmd": "list"})
        assert st["ok"] and st["state"] == "running"
        assert sum(len(s["containers"]) for s in st["services"]) == 2
        n0 = max(e["n"] for e in events.all("worker_ops"))
        events.poll(0.3)
        assert max(e["n"] for e in events.all("worker_ops")) > n0, "the containers stopped being served"
        print(f"admin fuzz: {len(cases)} connections, {answered} answers ({errors} errors), "
              f"{closed} closed without an answer; controller up")
        assert proc.stop() == 0


# ---------------------------------------------------------------- well-formed hostile frames

def _raw_exchange(sock, data: bytes, rids, timeout=20.0):
    """Send raw frames on a container's channel socket and read until every
    call id in *rids* is answered; {rid: (ok, result)}.  Loop thread only
    (nothing else reads meanwhile)."""
    import select
    import time
    _send_all(sock, data)
    dec = wire.Decoder(binary=True)
    out = {}
    deadline = time.monotonic() + timeout
    while set(rids) - set(out):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if not select.select([sock], [], [], min(left, 0.2))[0]:
            continue
        try:
            chunk = sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        if not chunk:
            break
        for obj, _blob in dec.feed(chunk):
            if obj[0] == "r":
                out[obj[1]] = (obj[2], obj[3])
    return out


class _Hostile(netplex.ProcessorHooks):
    """Container 1 sends well-formed hostile frames; container 2 is an
    honest waiter on the mutex the hostile one floods."""

    def __init__(self, events):
        self.events = events

    def post_add_hook(self, service, ctrl):
        ctrl.add_plugin(semaphore.plugin)
        ctrl.add_plugin(mutex.plugin)
        ctrl.add_plugin(sharedvar.plugin)

    def post_start_hook(self, cont):
        sharedvar.create_var("hz.go")
        if cont.id.endswith(".1"):
            cenv.create_timer(self.attack, 0.2)
        else:
            import asyncio
            asyncio.get_running_loop().create_task(self.honest())

    async def honest(self):
        await sharedvar.wait_for_value_async("hz.go", 20)
        self.events.emit("honest_waiting")
        got = await mutex.access("hz.m").lock_async(timeout=10)
        self.events.emit("honest", got=got)
        if got:
            mutex.access("hz.m").unlock()

    def attack(self, timer):
        import time
        from netplex_native._context import ctx
        sock = ctx.channel.sock
        res = {}
        sharedvar.create_var("hz.v")
        sharedvar.set_value("hz.v", "honest")
        # a lone surrogate in a value, in a message argument
        r = _raw_exchange(sock, frame([101, "var.set", ["hz.v", "\ud800"]])
                          + frame([102, "ctl.send_message", ["hz", "n", ["\udfff"]]])
                          + frame([103, "var.get", ["hz.v"]]), [101, 102, 103])
        res["surrogate"] = [r.get(101, (None,))[0], r.get(102, (None,))[0], r.get(103)]
        # a value over the limit in a frame under it
        r = _raw_exchange(sock, frame([104, "var.set", ["hz.v", "z" * (wire.MAX_VALUE + 100)]])
                          + frame([105, "var.get", ["hz.v"]]), [104, 105])
        res["oversized"] = [r.get(104, (None,))[0], r.get(105)]
        # a procedure name whose error message would exceed a frame, then an honest call in the same write
        body = json.dumps([106, "\u200b" * 5_000_000, []], ensure_ascii=False).encode()   # 15 MB
        r = _raw_exchange(sock, HDR.pack(4 + len(body), len(body)) + body + frame([107, "var.get", ["hz.v"]]),
                          [106, 107])
        res["huge_proc"] = [r.get(106, (None,))[0], len(json.dumps(r.get(106, (0, ""))[1])), r.get(107)]
        # binary calls of the operations the controller answers at once, one per write
        # (each read is that one frame: the controller's hot path): bad names, the
        # wrong kind, an unlock by a non-holder, then plain answers
        mutex.access("hz.k").lock(timeout=1)
        mutex.access("hz.k").unlock()
        hot = {}
        for rid, op, flags, name in ((108, 1, 0, b"a\x00b"), (109, 1, 0, b"n" * 300), (110, 1, 0, b"hz.k"),
                                     (111, 5, 0, b"hz.k"), (112, 2, 0, b"hz.zero"), (113, 3, 0, b"hz.zero"),
                                     (114, 5, 1, b"hz.k"), (115, 1, 0, b"hz.zero")):
            r = _raw_exchange(sock, _bin_call(op, rid, flags, name=name), [rid], timeout=10)
            ok, result = r.get(rid, (None, None))
            hot[rid] = [ok, result if ok else (result or [None])[0]]
        res["hot"] = hot
        # 3000 waits on a held mutex with call id 0 (nobody reads their answers)
        assert mutex.access("hz.m").lock(timeout=1)
        _send_all(sock, b"".join(frame([0, "mutex.lock", ["hz.m", None]]) for _ in range(3000)))
        sharedvar.set_value("hz.go", "go")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ins = admin.request(ctx.controller.socket_dir, {"cmd": "inspect"})
            m = [m for m in ins["plugins"]["sync"]["mutexes"] if m["name"] == "hz.m"]
            if m and m[0]["waiters"] >= 1:
                break
            time.sleep(0.02)
        res["waiters"] = m[0]["waiters"] if m else None
        mutex.access("hz.m").unlock()
        ins = admin.request(ctx.controller.socket_dir, {"cmd": "inspect"})
        res["inspect"] = ins["ok"]
        self.events.emit("attacked", **res)
        return False


@pytest.mark.timeout(90)
def test_well_formed_hostile_frames_get_errors_and_harm_no_one(events):
    """RPC backend: the frames are plugin calls of the RPC plugins."""
    def build():
        ctrl = netplex.Controller()
        ctrl.add_service(netplex.Service("hz", hooks=_Hostile(events), workers=2))
        return ctrl

    with run_controller(build) as proc:
        a = events.wait("attacked", timeout=60)[0]
        ok, err, val = a["surrogate"]
        assert ok is False and err is False, a            # refused, with an error answer
        assert val == [True, "honest"], a                 # unchanged, and every get answered
        assert a["oversized"] == [False, [True, "honest"]], a
        assert a["huge_proc"][0] is False and a["huge_proc"][1] < 10_000, a
        assert a["huge_proc"][2] == [True, "honest"], a   # the rest of the batch was served
        assert a["waiters"] == 1, a                       # the 3000 unanswerable waits were not queued
        assert a["inspect"] is True
        hot = {int(k): v for k, v in a["hot"].items()}
        assert hot[108] == [False, "ValueError"] and hot[109] == [False, "ValueError"], hot   # NUL, too long
        assert hot[110][0] is False and hot[111] == [False, "NotHolderError"], hot
        assert hot[112] == [True, -1] and hot[113] == [True, 0], hot
        assert hot[114] == [True, None] and hot[115] == [True, 1], hot
        h = events.wait("honest", timeout=20)[0]
        assert h["got"] is True, "the honest waiter never got the mutex"
        assert proc.alive()
        assert proc.stop() == 0
