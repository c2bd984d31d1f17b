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


def _write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(" ".join(str(x) for x in ln) for ln in lines) + "\n")


def test_the_record_checker_finds_two_live_holders_and_long_waits(tmp_path):
    """The checker can fail: two live holders of a mutex, one over the count of a
    semaphore, a wait past its timeout + 1 s; a dead holder's successor is fine."""
    from native_storm import check_record
    p = str(tmp_path / "r")
    ok = [("A", 1, 1, "m0", 0, 0.1, 0.5, 7), ("A", 2, 2, "m0", 0, 0.2, 0.5, 8),   # 1 is dead by then
          ("R", 2, 2, "m0", 0.3, 0, 0), ("D", 1, 0, "-", 0, 0, 0)]
    _write(p, ok)
    assert check_record(p)["operations"] == 2
    _write(p, [("A", 1, 1, "m0", 0, 0.1, 0.5, 7), ("A", 2, 2, "m0", 0, 0.2, 0.5, 8),
               ("R", 1, 1, "m0", 0.3, 0, 0), ("R", 2, 2, "m0", 0.4, 0, 0)])
    with pytest.raises(AssertionError, match="live holders of m0"):
        check_record(p)
    _write(p, [("A", 1, 1, "s1", 0, 0.1, 0.5), ("A", 2, 2, "s1", 0, 0.1, 0.5),
               ("R", 1, 1, "s1", 0.3, 0, 0), ("R", 2, 2, "s1", 0.4, 0, 0)])
    with pytest.raises(AssertionError, match="live holders of s1"):
        check_record(p)
    _write(p, [("T", 1, 1, "m1", 0, 1.6, 0.5)])
    with pytest.raises(AssertionError, match="waited"):
        check_record(p)
    # a later holder whose token is not above the earlier holder's
    _write(p, [("A", 1, 1, "m0", 0, 0.1, 0.5, 8), ("A", 2, 2, "m0", 0, 0.2, 0.5, 8),
               ("R", 2, 2, "m0", 0.3, 0, 0), ("D", 1, 0, "-", 0, 0, 0)])
    with pytest.raises(AssertionError, match="token 8 of m0 not above"):
        check_record(p)
