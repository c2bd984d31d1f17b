"""The native core's storm in CI: a few seeds, seconds each (tests/native_storm.py
says what is checked; ``python3 tests/stress.py --native-storm --seconds N`` runs it
for minutes)."""

import pytest

from native_storm import run_storm


@pytest.mark.timeout(90)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_storm_of_kills_crash_points_threads_and_concurrent_recoverers_keeps_every_invariant(
        tmp_path, seed):
    stats = run_storm(str(tmp_path), seconds=6, seed=seed)
    print(stats)
    assert stats["kills"] > 20 and stats["operations"] > 500, stats
    assert stats["crash_point_deaths"] > 0, stats
    assert stats["tokens_checked"] > 100, stats     # every mutex holder's token was checked


def _write(path, lines, raw=""):
    with open(path, "w") as f:
        f.write("".join("<" + " ".join(str(x) for x in ln) + ">\n" for ln in lines) + raw)


def test_the_record_checker_finds_two_live_holders_and_long_waits(tmp_path):
    """The checker can fail: two live holders of a mutex, one over the count of a
    semaphore, a wait past its timeout + 1 s, a token not above the previous one; a
    dead holder's successor is fine."""
    from native_storm import check_record
    p = str(tmp_path / "r")
    ok = [("X", "1.1", 0, "-", 0, 0, 0), ("A", "1.1", 1, "m0", 0, 0.1, 0.5, 7),
          ("K", "1.1", 0, "-", 0.15, 0.15, 0),                       # 1 is dead by then
          ("A", "2.2", 2, "m0", 0, 0.2, 0.5, 8),
          ("R", "2.2", 2, "m0", 0.3, 0, 0), ("D", "1.1", 0, "-", 0, 0, 0)]
    _write(p, ok)
    assert check_record(p)["operations"] == 2
    _write(p, [("A", "1.1", 1, "m0", 0, 0.1, 0.5, 7), ("A", "2.2", 2, "m0", 0, 0.2, 0.5, 8),
               ("R", "1.1", 1, "m0", 0.3, 0, 0), ("R", "2.2", 2, "m0", 0.4, 0, 0)])
    with pytest.raises(AssertionError, match="live holders of m0"):
        check_record(p)
    _write(p, [("A", "1.1", 1, "s1", 0, 0.1, 0.5), ("A", "2.2", 2, "s1", 0, 0.1, 0.5),
               ("R", "1.1", 1, "s1", 0.3, 0, 0), ("R", "2.2", 2, "s1", 0.4, 0, 0)])
    with pytest.raises(AssertionError, match="live holders of s1"):
        check_record(p)
    _write(p, [("T", "1.1", 1, "m1", 0, 1.6, 0.5)])
    with pytest.raises(AssertionError, match="waited"):
        check_record(p)
    # a later holder whose token is not above the earlier holder's
    _write(p, [("A", "1.1", 1, "m0", 0, 0.1, 0.5, 8), ("K", "1.1", 0, "-", 0, 0, 0),
               ("A", "2.2", 2, "m0", 0, 0.2, 0.5, 8),
               ("R", "2.2", 2, "m0", 0.3, 0, 0), ("D", "1.1", 0, "-", 0, 0, 0)])
    with pytest.raises(AssertionError, match="token 8 of m0 not above"):
        check_record(p)


def test_the_record_checker_does_not_take_a_holder_killed_later_for_dead(tmp_path):
    """A holder that writes nothing more is not dead before it was doomed: 1 holds
    s1 (stopped, say), 2 is granted s1 too, and only then is 1 killed.  The old
    checker took 1 for dead at 2's acquire (it wrote nothing after) and missed this
    double grant."""
    from native_storm import check_record
    p = str(tmp_path / "r")
    _write(p, [("A", "1.1", 1000000, "s1", 0, 0.1, 0.5), ("A", "2.2", 1000001, "s1", 0, 0.2, 0.5),
               ("K", "1.1", 0, "-", 0.3, 0.3, 0), ("R", "2.2", 1000001, "s1", 0.4, 0, 0),
               ("D", "1.1", 0, "-", 0.5, 0.5, 0)])
    with pytest.raises(AssertionError, match="2 live holders of s1"):
        check_record(p)
    # ... nor a crash point armed only after the other's grant
    _write(p, [("A", "1.1", 1, "s1", 0, 0.1, 0.5), ("A", "2.2", 2, "s1", 0, 0.2, 0.5),
               ("C", "1.1", 3, "-", 0.3, 0.3, 0), ("R", "2.2", 2, "s1", 0.4, 0, 0)])
    with pytest.raises(AssertionError, match="2 live holders of s1"):
        check_record(p)
    # doomed before: a crash point armed by another thread of 1
    _write(p, [("A", "1.1", 1, "s1", 0, 0.1, 0.5), ("C", "1.1", 3, "-", 0.15, 0.15, 0),
               ("A", "2.2", 2, "s1", 0, 0.2, 0.5), ("R", "2.2", 2, "s1", 0.4, 0, 0)])
    assert check_record(p)["operations"] == 2


def test_the_record_checker_tells_a_recycled_pid_from_its_first_worker(tmp_path):
    """Worker 1.1 holds s1 and is killed; pid 1 is recycled by worker 1.3, which
    writes on.  The old checker (pids only) took the dead holder for alive."""
    from native_storm import check_record
    p = str(tmp_path / "r")
    _write(p, [("A", "1.1", 1, "s1", 0, 0.1, 0.5), ("K", "1.1", 0, "-", 0, 0, 0),
               ("D", "1.1", 0, "-", 0, 0, 0),
               ("A", "2.2", 2, "s1", 0, 0.2, 0.5), ("X", "1.3", 0, "-", 0, 0, 0),
               ("R", "2.2", 2, "s1", 0.3, 0, 0), ("A", "1.3", 1, "s1", 0, 0.4, 0.5),
               ("R", "1.3", 1, "s1", 0.5, 0, 0)])
    assert check_record(p)["operations"] == 3
    # and a recycled pid does not hide a live first worker: same holder name differs
    _write(p, [("A", "1.1", 1, "s1", 0, 0.1, 0.5), ("A", "2.2", 2, "s1", 0, 0.2, 0.5),
               ("R", "1.1", 1, "s1", 0.3, 0, 0)])
    with pytest.raises(AssertionError, match="live holders of s1"):
        check_record(p)


def test_the_record_checker_recognises_a_record_torn_by_its_writers_death(tmp_path):
    """Seed 211's false violation: worker 9159, killed while writing its R of s1, left
    "R 9159 1000002 s1 5232." and 9290's R of m1 followed on the same line; split
    into words, 9290's release was lost and 9290 looked like a second live holder of
    m1.  Framed records: the torn one is recognised and 9290's release counts.  A
    torn record is allowed only as the last of a killed writer."""
    from native_storm import check_record
    p = str(tmp_path / "r")
    head = [("A", "9159.1", 1000002, "s1", 0, 0.1, 0.2, None),
            ("A", "9290.2", 1000003, "m1", 0, 0.1, 0.2, 1004),
            ("K", "9159.1", 0, "-", 0.2, 0.2, 0)]
    torn = "<R 9159.1 1000002 s1 5232."
    tail = ("<R 9290.2 1000003 m1 0.3 0 0>\n"
            "<A 9181.3 1000000 m1 0 0.4 0.2 1005>\n<R 9181.3 1000000 m1 0.5 0 0>\n"
            "<T 9290.2 1000003 m1 0.6 0.61 0.01>\n<D 9159.1 0 - 1 1 0>\n")
    _write(p, head, torn + tail)
    assert check_record(p)["torn_records"] == 1
    # the same fragment from a writer that was never killed, or that wrote on
    _write(p, head[:2], torn + tail)
    with pytest.raises(AssertionError, match="never killed"):
        check_record(p)
    _write(p, head, torn + tail + "<X 9159.1 0 - 2 2 0>\n")
    with pytest.raises(AssertionError, match="not the last of 9159.1"):
        check_record(p)
    # without the release the torn line swallowed, 9290 is a second live holder of m1
    _write(p, head, torn + tail.replace("<R 9290.2 1000003 m1 0.3 0 0>\n", ""))
    with pytest.raises(AssertionError, match="2 live holders of m1"):
        check_record(p)
