"""The name table at scale (csrc/names.c N4, N6): create, destroy and lookup stay
O(1) whatever the number of names and however long the churn, because a free
object is popped from a free list (not searched for) and a destroyed name leaves
no tombstone behind (its hole is closed by backward shifts).  Cost is measured in
bench/ (names section); these tests check the structure that makes it flat:
at most one tombstone at any time, none at rest, every free object on its list
(np_check), and fencing tokens that keep growing across destroy and re-create."""

import random

import pytest

import netplex_native as netplex

from netplex_native import errors
from netplex_native.native import domain as _native


@pytest.fixture
def big():
    d = _native.Domain.create(semaphores=131072, mutexes=64, processes=4, actors=16, waiters=16)
    yield d
    d.close()
    d.unlink()


@pytest.mark.timeout(240)
def test_131072_names_are_created_found_and_destroyed_and_the_table_is_then_empty(big):
    n = 131072
    for i in range(n):
        assert big.sem_create(f"user.{i}", i % 7)
    with pytest.raises(errors.TableFullError):
        big.sem_create("one.too.many", 1)
    stats = big.name_stats()
    assert stats["entries"] == n and stats["free_semaphores"] == 0 and stats["tombstones"] == 0
    big.check()
    big._sems.clear()                           # every lookup goes to the table
    for i in range(0, n, 97):
        assert big.sem_get(f"user.{i}") == i % 7
    for i in range(n):
        big.sem_destroy(f"user.{i}")
        if i % 8191 == 0:
            assert big.name_stats()["tombstones"] == 0
    stats = big.name_stats()
    assert stats == {"capacity": stats["capacity"], "entries": 0, "tombstones": 0,
                     "longest_probe": 0, "free_semaphores": n, "free_mutexes": 64}
    big.check()
    assert big.sem_create("after", 3) and big.sem_get("after") == 3


@pytest.mark.timeout(240)
def test_churn_of_distinct_names_leaves_no_tombstone_and_a_full_free_list(big):
    """Per-user rate limiters: 1,000 live names, 100,000 created and destroyed
    (each a new name), in random order.  The old table kept every destroyed
    name's tombstone: 100,000 here."""
    rng = random.Random(15)
    live = []
    for i in range(100_000):
        name = f"rate.{i}"
        assert big.sem_create(name, 1)
        live.append(name)
        if len(live) > 1000:
            big.sem_destroy(live.pop(rng.randrange(len(live))))
        if i % 10_000 == 0:
            assert big.name_stats()["tombstones"] == 0
    stats = big.name_stats()
    assert stats["entries"] == len(live) and stats["tombstones"] == 0
    assert stats["free_semaphores"] == 131072 - len(live)
    big.check()
    big._sems.clear()
    for name in live:
        assert big.sem_get(name) == 1
    for name in live:
        big.sem_destroy(name)
    assert big.name_stats()["entries"] == 0
    big.check()


@pytest.mark.timeout(120)
def test_a_full_table_reuses_the_object_a_destroy_freed(big):
    """The free list: with every mutex in use, a destroy frees exactly one, and a
    create takes it (generation bumped: the old handle is stale)."""
    names = [f"m.{i}" for i in range(64)]
    for name in names:
        big.mutex_unlock(name, force=True)      # implicit creation
    with pytest.raises(errors.TableFullError):
        big.mutex_unlock("m.extra", force=True)
    for round_ in range(200):
        victim = names[round_ % 64]
        big.mutex_destroy(victim)
        assert big.name_stats()["free_mutexes"] == 1
        big.mutex_unlock(victim, force=True)
        assert big.name_stats()["free_mutexes"] == 0
    big.check()


@pytest.mark.timeout(120)
def test_fencing_tokens_keep_growing_across_destroy_and_create_churn(big):
    """T2 with the free list: the same object comes back at once (LIFO), and its
    first token is still above every token handed out before."""
    last = 0
    for i in range(2000):
        name = f"lock.{i % 3}"
        assert big.mutex_trylock(name) is True
        t = big.mutex_token(name)
        assert t > last, (i, t, last)
        last = t
        big.mutex_unlock(name)
        big.mutex_destroy(name)
    big.check()


@pytest.mark.timeout(120)
def test_the_handle_cache_of_a_process_stays_bounded_when_others_destroy_its_names(big, monkeypatch):
    """Another process (here: another Domain on the segment) destroys every name
    this one used: the stale handles it caches are bounded, and still work."""
    monkeypatch.setattr(_native, "HANDLE_CACHE_MAX", 1000, raising=False)
    other = _native.Domain.attach(big.name)
    try:
        for i in range(5000):
            name = f"seen.{i}"
            assert big.sem_create(name, 1)
            assert other.sem_get(name) == 1             # cached in other
            big.sem_destroy(name)
        assert len(other._sems) <= 1000
        big.sem_create("seen.4999", 7)                  # other's cached handle is stale
        assert other.sem_get("seen.4999") == 7
    finally:
        other.close()


@pytest.mark.timeout(180)
def test_processes_churning_colliding_names_and_dying_inside_operations_leave_the_table_exact():
    """Four processes create and destroy names of one probe cluster (and lock,
    unlock and destroy the mutexes among them), each killed at a random crash
    point of its next few hundred (inside create, destroy, closing a hole, a
    lock...), recovered and replaced, 60 times: the table stays consistent
    (np_check: names, free lists, at most the one hole), no name is lost or
    doubled, and the next lookup closes any hole left."""
    import os
    import time

    from harness import fork_call
    from native_helpers import arm, killed
    from test_native_crash_steps import colliding_names

    dom = _native.Domain.create(semaphores=32, mutexes=32, processes=16)
    try:
        names = colliding_names(dom, [7] * 6 + [8, 9], prefix="k")

        def churn(seed):
            os.environ["NETPLEX_CORE_TEST"] = "1"
            dom.register()
            rng = random.Random(seed)
            arm(rng.randrange(1, 600))
            end = time.monotonic() + 20
            while time.monotonic() < end:
                n = rng.choice(names)
                if rng.random() < 0.5:
                    dom.sem_create("s." + n, 1)
                    dom.sem_destroy("s." + n)
                else:
                    if dom.mutex_trylock("m." + n):
                        try:
                            dom.mutex_unlock("m." + n)
                        except netplex.NotHolderError:
                            pass        # another process destroyed it meanwhile
                    if rng.random() < 0.3:
                        dom.mutex_destroy("m." + n)

        kids = {fork_call(churn, i) for i in range(4)}
        deaths = 0
        for rnd in range(60):
            pid, status = os.wait()
            assert pid in kids and killed(status), (pid, status)
            kids.discard(pid)
            deaths += 1
            assert dom.recover(pid, timeout=10) >= 0
            kids.add(fork_call(churn, 100 + rnd))
        for pid in kids:
            _, status = os.waitpid(pid, 0)
            assert killed(status)
            assert dom.recover(pid, timeout=10) >= 0
        dom.check()
        assert dom.name_stats()["tombstones"] <= 1
        dom._sems.clear()
        dom._mtxs.clear()
        for n in names:                       # present or absent, never lost or doubled
            s = [o for o in dom.semaphores() if o["name"] == "s." + n]
            assert len(s) <= 1 and (not s or s[0]["value"] == 1), s
            m = [o for o in dom.mutexes() if o["name"] == "m." + n]
            assert len(m) <= 1 and (not m or not m[0]["locked"]), m
            if m:
                assert dom.mutex_trylock("m." + n) is True      # the name leads to the listed object
                dom.mutex_unlock("m." + n)
        assert dom.name_stats()["tombstones"] == 0
        dom.check()
    finally:
        dom.close()
        dom.unlink()


def test_names_made_to_collide_in_one_segment_do_not_collide_in_another():
    """N7: the hash is keyed per segment, so a set of names crafted to share one
    probe cluster (a user picking ids) is spread out in any other segment."""
    from test_native_crash_steps import colliding_names, name_home

    a = _native.Domain.create(semaphores=16, mutexes=16, processes=4)
    b = _native.Domain.create(semaphores=16, mutexes=16, processes=4)
    try:
        names = colliding_names(a, [5] * 8, prefix="evil.")
        assert {name_home(a, n) for n in names} == {5}
        assert len({name_home(b, n) for n in names}) > 1
        for n in names:
            assert b.sem_create(n, 1)
        assert b.name_stats()["longest_probe"] < 8
        b.check()
    finally:
        for d in (a, b):
            d.close()
            d.unlink()


def test_a_probe_cluster_that_wraps_around_the_table_closes_its_holes():
    """Backward shifts across the end of the table (entries at home cap-2 and
    cap-1 spill over to 0, 1, ...): destroying each name in turn leaves every
    other one found and no tombstone."""
    from test_native_crash_steps import colliding_names

    dom = _native.Domain.create(semaphores=16, mutexes=16, processes=4)
    try:
        cap = dom.name_stats()["capacity"]
        homes = [cap - 2, cap - 2, cap - 1, cap - 1, 0, 1, 3]
        for order in (range(7), reversed(range(7)), [2, 0, 5, 1, 6, 3, 4]):
            names = colliding_names(dom, homes, prefix=f"w{id(order)}.")
            for i, n in enumerate(names):
                assert dom.sem_create(n, i)
            assert dom.name_stats()["longest_probe"] >= 3
            gone = set()
            for k in order:
                dom.sem_destroy(names[k])
                gone.add(k)
                assert dom.name_stats()["tombstones"] == 0
                dom._sems.clear()
                for i, n in enumerate(names):
                    if i not in gone:
                        assert dom.sem_get(n) == i, (k, n)
                dom.check()
            assert dom.name_stats()["entries"] == 0
    finally:
        dom.close()
        dom.unlink()
