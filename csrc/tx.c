/*
 * tx.c — the transaction primitive: guards and the redo log.
 *
 * A mutation takes the guard(s) of what it changes, computes every new field
 * value, writes them as (offset, width, absolute value) into its actor's
 * intent record, sets intent_valid (release), applies the writes, clears
 * intent_valid and releases the guard(s).  The inline parts (guard_lock's
 * CAS, tx_begin/tx_put/tx_commit) are in core_internal.h; this file holds
 * what runs only under contention or after a death.
 *
 * Invariants kept here
 *  I2 A valid intent for guard set G exists only while every guard of G is
 *     held by its writer or by a taker-over.  Hence whoever takes over a dead
 *     owner's guard g may apply every valid intent that covers g, once it
 *     holds all of that intent's guards: the writes are absolute, nobody else
 *     saw a half-applied state.  A writer that died before intent_valid = 1
 *     changed nothing (roll back); after it, the log is redone (roll forward).
 *  T1 Takeover is wait-free with respect to the dead: one CAS from the dead
 *     owner's exact tag to ours, the redo, one release.  It never waits for
 *     another recovery, so recoveries cannot form a cycle.  The only wait is
 *     for the name guard held by a live process, before an object guard whose
 *     intent also covers the name guard (lock order I1), and it is bounded by
 *     the caller's slice.
 *  T2 A taker-over that dies mid-way leaves the guard owned by its own (now
 *     dead) tag and the intent still valid: the next one redoes it.
 *  T3 Every wait for a guard is bounded: it returns NP_EINTR after one slice
 *     (signals run, the caller calls again), NP_ETIMEDOUT at the caller's
 *     deadline, NP_EAGAIN after NP_GUARD_SLEEP_NS for a non-blocking acquire
 *     (NP_GUARD_TRY), NP_ECLOSED when the domain is being closed.  A dead owner is
 *     taken over within one NP_GUARD_SLEEP_NS of being found dead.
 */
#define _GNU_SOURCE
#include "core_internal.h"

#include <errno.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int64_t np_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Shared (not PRIVATE) futexes: the words live in a MAP_SHARED mapping. */
static int futex_wait(uint32_t *w, uint32_t val, const struct timespec *tp)
{
    if (syscall(SYS_futex, w, FUTEX_WAIT, val, tp, NULL, 0) == 0)
        return 0;
    return errno;
}

/* At most ns (a remaining time that has run out, ns <= 0, does not sleep). */
int np_futex_wait(uint32_t *w, uint32_t val, int64_t ns)
{
    if (ns < 0)
        ns = 0;
    struct timespec ts = {ns / 1000000000LL, ns % 1000000000LL};
    return futex_wait(w, val, &ts);
}

/* No timeout (A3u of acquire.c): a timed sleep arms a kernel timer, about a
 * tenth of a hand-off on one CPU. */
int np_futex_wait_untimed(uint32_t *w, uint32_t val)
{
    return futex_wait(w, val, NULL);
}

void np_futex_wake(uint32_t *w, int n)
{
    syscall(SYS_futex, w, FUTEX_WAKE, n, NULL, NULL, 0);
}

static uint32_t guard_index(np_domain *d, uint32_t *g)
{
    if (g == &d->h->name_guard)
        return d->nobj;
    return (uint32_t)(((char *)g - (char *)d->objs) / sizeof(np_obj));
}

static inline int covers(const np_actor *x, uint32_t g)
{
    return x->intent_guard == g + 1 || x->intent_guard2 == g + 1;
}

/* Take guard g over from the owner tag `seen' (certainly dead), redo the
 * valid intents that cover it, release it.  Returns 0 when done or when
 * someone else changed the guard first; NP_EINTR/ETIMEDOUT/ECLOSED when the
 * name guard (needed first, I1) could not be had in time. */
static int takeover(np_domain *d, uint32_t g, uint32_t seen, uint32_t tag, int64_t deadline)
{
    uint32_t ng = d->nobj, *gw = guard_word(d, g);
    uint32_t *ngw = &d->h->name_guard;
    int took_ng = 0;
    if (g != ng) {
        for (uint32_t x = 0; x <= d->nact; x++) {
            np_actor *ax = &d->actors[x];
            /* acquire: the log entries precede the flag (tx_commit). */
            if (__atomic_load_n(&ax->intent_valid, __ATOMIC_ACQUIRE) && covers(ax, g)
                && covers(ax, ng)) {
                took_ng = 1;
                break;
            }
        }
        if (took_ng && (__atomic_load_n(ngw, __ATOMIC_RELAXED) & NP_GUARD_TAG) != tag) {
            /* Taking the name guard over (if its owner is dead) redoes that
             * intent and releases g with it. */
            int rc = guard_lock(d, ngw, tag, deadline);
            if (rc < 0)
                return rc;
        } else {
            took_ng = 0;                /* none needed, or we hold it already */
        }
        if (__atomic_load_n(gw, __ATOMIC_ACQUIRE) != seen) {
            if (took_ng)
                guard_unlock(ngw);
            return 0;
        }
    }
    /* acquire: the dead owner's stores (its log) are visible to us. */
    if (!__atomic_compare_exchange_n(gw, &seen, tag | (seen & NP_GUARD_WAITERS), 0,
                                     __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        if (took_ng)
            guard_unlock(ngw);
        return 0;
    }
    CRASHPOINT();
    for (uint32_t x = 0; x <= d->nact; x++) {
        np_actor *ax = &d->actors[x];
        if (!__atomic_load_n(&ax->intent_valid, __ATOMIC_ACQUIRE) || !covers(ax, g))
            continue;
        /* The intent's other guard (name guard + object): by I2 it is held
         * by the same dead writer, or by us (took_ng). */
        uint32_t other = ax->intent_guard == g + 1 ? ax->intent_guard2 : ax->intent_guard;
        uint32_t *ow = NULL;
        if (other && other - 1 != g && other - 1 <= ng) {
            uint32_t *w = guard_word(d, other - 1);
            uint32_t vo = __atomic_load_n(w, __ATOMIC_ACQUIRE);
            if (vo && (vo & NP_GUARD_TAG) != tag
                && __atomic_compare_exchange_n(w, &vo, tag | (vo & NP_GUARD_WAITERS), 0,
                                               __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
                ow = w;
            CRASHPOINT();
        }
        redo_apply(d, ax);
        /* release: the redone writes precede the end of the intent. */
        __atomic_store_n(&ax->intent_valid, 0, __ATOMIC_RELEASE);
        CRASHPOINT();
        if (ow) {
            guard_unlock(ow);
            CRASHPOINT();
        }
    }
    guard_unlock(gw);
    CRASHPOINT();
    if (took_ng)
        guard_unlock(ngw);
    return 0;
}

void np_guard_takeover(np_domain *d, uint32_t g, uint32_t seen, uint32_t tag)
{
    (void)takeover(d, g, seen, tag, NP_NOWAIT);
}

NOINLINE int np_guard_lock_slow(np_domain *d, uint32_t *g, uint32_t tag, int64_t deadline)
{
    uint32_t v;
    for (int i = 0; i < 200; i++) {
        v = __atomic_load_n(g, __ATOMIC_RELAXED);
        /* acquire on success: pairs with the release in guard_unlock. */
        if (v == 0 && __atomic_compare_exchange_n(g, &v, tag, 0,
                                                  __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            return 0;
        cpu_relax();
    }
    int64_t now = np_now(), end = now + NP_SLICE_NS;
    int try_only = deadline == NP_GUARD_TRY;
    int real_deadline = deadline != NP_NOWAIT && deadline != NP_FOREVER && !try_only;
    if (real_deadline && deadline < end)
        end = deadline;
    if (try_only)
        end = now + NP_GUARD_SLEEP_NS;
    for (;;) {
        v = __atomic_load_n(g, __ATOMIC_RELAXED);
        if (v == 0) {
            /* Others may still sleep: keep the WAITERS bit when taking it. */
            if (__atomic_compare_exchange_n(g, &v, tag | NP_GUARD_WAITERS, 0,
                                            __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
                return 0;
            continue;
        }
        if (!(v & NP_GUARD_WAITERS)) {
            /* relaxed: only announces a sleeper; the futex syscall orders. */
            if (!__atomic_compare_exchange_n(g, &v, v | NP_GUARD_WAITERS, 0,
                                             __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                continue;
            v |= NP_GUARD_WAITERS;
        }
        now = np_now();
        if (now >= end)
            return try_only ? NP_EAGAIN
                 : real_deadline && now >= deadline ? NP_ETIMEDOUT : NP_EINTR;
        int64_t ns = end - now < NP_GUARD_SLEEP_NS ? end - now : NP_GUARD_SLEEP_NS;
        if (np_futex_wait(g, v, ns) == ETIMEDOUT) {
            if (closing(d))
                return NP_ECLOSED;
            /* The owner has held it a whole sleep: is it dead? */
            uint32_t v2 = __atomic_load_n(g, __ATOMIC_ACQUIRE);
            if (v2 && np_tag_state(d, v2) == NP_DEAD) {
                int rc = takeover(d, guard_index(d, g), v2, tag, deadline);
                if (rc < 0)
                    return rc;
            }
        }
    }
}

/* Actor x's valid intent (if any) is redone: take its guards (taking them
 * over from a dead holder redoes it), then release them.  0, or the code of
 * a guard wait that could not finish (the intent stays valid, I2 holds). */
int np_settle_intent(np_domain *d, uint32_t x, uint32_t tag, int64_t deadline)
{
    np_actor *ax = &d->actors[x];
    if (!__atomic_load_n(&ax->intent_valid, __ATOMIC_ACQUIRE))
        return 0;
    uint32_t g1 = ax->intent_guard, g2 = ax->intent_guard2;
    if (!g1 || g1 - 1 > d->nobj || (g2 && g2 - 1 > d->nobj))
        return 0;       /* not a log of this segment's guards: nothing to redo */
    uint32_t *w1 = guard_word(d, g1 - 1), *w2 = g2 ? guard_word(d, g2 - 1) : NULL;
    int rc = guard_lock(d, w1, tag, deadline);
    if (rc < 0)
        return rc;
    CRASHPOINT();
    if (w2 && (rc = guard_lock(d, w2, tag, deadline)) < 0) {
        guard_unlock(w1);
        return rc;
    }
    CRASHPOINT();
    if (__atomic_load_n(&ax->intent_valid, __ATOMIC_ACQUIRE)) {
        redo_apply(d, ax);
        __atomic_store_n(&ax->intent_valid, 0, __ATOMIC_RELEASE);
        CRASHPOINT();
    }
    if (w2)
        guard_unlock(w2);
    guard_unlock(w1);
    CRASHPOINT();
    return 0;
}
