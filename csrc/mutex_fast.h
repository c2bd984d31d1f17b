/*
 * mutex_fast.h — a mutex's fast path: lock and unlock by one 16-byte
 * compare-and-swap of its lock word {owner, fast, token}, no guard, nothing
 * logged, one cache line touched (the object's hot line).
 *
 * Runs in every process that uses the segment (containers, the controller,
 * any process attached to a Domain).  The slow path (acquire.c, release.c)
 * and every other writer of a mutex (recovery.c, names.c, asyncwait.c,
 * queue.c) take the object's guard through obj_lock/obj_unlock below.
 *
 * Invariants
 *  F1 fast != 0 only while the object is used and its queue is empty
 *     (qlen == 0): nobody waits, so an unlock has nobody to wake.  When
 *     open, fast = gen | NP_FAST_OPEN: the lock word names the incarnation.
 *  F2 While open, owner and token change only by a CAS that expects the
 *     path open for the caller's generation: lock {0, g, t} -> {me, g, t+1}
 *     (16 bytes: the grant and its fencing token in one instruction, T1),
 *     unlock {me, g} -> {0, g} (8 bytes: the token is not changed, so it
 *     need not be read first).  The CAS is the commit point: a process
 *     killed before it changed nothing, after it holds (or released) the
 *     mutex exactly as if it had returned; recovery (recovery.c step 3)
 *     releases a dead owner's mutex whichever path locked it.  So there is
 *     nothing to redo and nothing to log.
 *  F3 Only the guard holder changes `fast': obj_lock closes the fast path
 *     (a CAS that keeps owner and token) right after taking the guard, and
 *     obj_unlock reopens it after the holder's transaction has committed
 *     (intent no longer valid), when F1 allows.  While closed, the guard
 *     holder alone writes owner, token and value, through its redo log, as
 *     for a semaphore; every redo (a takeover, np_settle_intent) therefore
 *     happens while closed.  A death between closing and reopening leaves
 *     the fast path closed, which is always safe: callers take the slow
 *     path, and the next guard holder reopens it.
 *  F4 While the fast path is open, the mutex's `value' is stale: owner is
 *     the truth (owner == 0: free).  obj_lock re-derives value from owner on
 *     every guard acquisition of a used mutex, so code under the guard reads
 *     value as before (A1); lock-free readers read owner.
 *  F5 A stale handle cannot lock or unlock another incarnation: both CASes
 *     compare the handle's generation, held in `fast' (F1).
 *  F6 The 16- and 8-byte CASes on one word must be atomic with respect to
 *     each other: x86-64 guarantees it (locked instructions on overlapping
 *     memory are totally ordered).  Elsewhere (NP_HAVE_FAST_MUTEX == 0) the
 *     path is never opened and every operation takes the guarded path.
 */
#ifndef NETPLEX_MUTEX_FAST_H
#define NETPLEX_MUTEX_FAST_H

#if defined(__x86_64__) && defined(__GCC_HAVE_SYNC_COMPARE_AND_SWAP_16)
#define NP_HAVE_FAST_MUTEX 1
#else
#define NP_HAVE_FAST_MUTEX 0
#endif
#define NP_FAST_OPEN 0x80000000u        /* gen <= NP_GEN_MASK: bit 31 is free */

typedef unsigned __int128 np_u128;
extern int np_fast_mutex_off;           /* testpoints.c: np_test_fast_mutex */

static inline uint64_t lk_lo(uint32_t owner, uint32_t fast)
{
    return (uint64_t)owner | ((uint64_t)fast << 32);
}

static inline int obj_is_mutex(const np_domain *d, const np_obj *o)
{
    return (uint32_t)(o - d->objs) >= d->nsem;
}

/* F3/F4: with o's guard just taken. */
static inline void mx_close(np_domain *d, np_obj *o)
{
    if (!obj_is_mutex(d, o))
        return;
    uint64_t *lo = (uint64_t *)&o->owner;
    uint64_t cur = __atomic_load_n(lo, __ATOMIC_RELAXED);
    /* Only owner changes meanwhile (fast CASes), never `fast': we hold the
     * guard.  acquire: a fast holder's critical section happened before. */
    while ((cur >> 32) != 0
           && !__atomic_compare_exchange_n(lo, &cur, cur & 0xffffffffu, 0,
                                           __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
        ;
    CRASHPOINT();                       /* closed, value not yet derived */
    if (o->used) {
        int64_t v = o->owner ? 0 : 1;
        if (o->value != v)
            __atomic_store_n(&o->value, v, __ATOMIC_RELAXED);
    }
}

/* F1/F3: with o's guard held, no intent valid. */
static inline void mx_reopen(np_domain *d, np_obj *o)
{
#if NP_HAVE_FAST_MUTEX
    if (obj_is_mutex(d, o) && o->used && o->qlen == 0 && !o->fast)
        /* release: our writes under the guard precede the first fast CAS
         * that sees the path open. */
        __atomic_store_n(&o->fast, (o->gen & NP_GEN_MASK) | NP_FAST_OPEN, __ATOMIC_RELEASE);
#else
    (void)d; (void)o;
#endif
}

static inline int obj_lock(np_domain *d, np_obj *o, uint32_t tag, int64_t deadline)
{
    int rc = guard_lock(d, &o->guard, tag, deadline);
    if (likely(rc == 0))
        mx_close(d, o);
    return rc;
}

static inline void obj_unlock(np_domain *d, np_obj *o)
{
    mx_reopen(d, o);
    guard_unlock(&o->guard);
}

/* F2: 1 if the caller's process now holds the mutex (handle generation
 * gen); 0: take the slow path (held, closed, or stale). */
static inline int mx_fast_lock(np_domain *d, np_obj *o, uint32_t gen)
{
#if NP_HAVE_FAST_MUTEX
    uint64_t open = lk_lo(0, gen | NP_FAST_OPEN);
    if (unlikely(np_fast_mutex_off))
        return 0;
    /* Two reads, possibly torn: the CAS then fails, nothing else. */
    if (__atomic_load_n((uint64_t *)&o->owner, __ATOMIC_RELAXED) != open)
        return 0;
    uint64_t t = __atomic_load_n(&o->token, __ATOMIC_RELAXED);
    np_u128 expect = (np_u128)open | ((np_u128)t << 64);
    np_u128 want = (np_u128)lk_lo(d->my_proc, gen | NP_FAST_OPEN) | ((np_u128)(t + 1) << 64);
    CRASHPOINT();
    /* lock cmpxchg16b: a full barrier (acquire for the critical section) */
    if (!__sync_bool_compare_and_swap(&o->lk, expect, want))
        return 0;
    CRASHPOINT();
    return 1;
#else
    (void)d; (void)o; (void)gen;
    return 0;
#endif
}

/* F2: 1 if released; 0: take the slow path (not ours, closed, or stale). */
static inline int mx_fast_unlock(np_domain *d, np_obj *o, uint32_t gen)
{
#if NP_HAVE_FAST_MUTEX
    uint64_t held = lk_lo(d->my_proc, gen | NP_FAST_OPEN);
    if (unlikely(np_fast_mutex_off))
        return 0;
    CRASHPOINT();
    /* release: the critical section happens before the next holder's. */
    if (!__atomic_compare_exchange_n((uint64_t *)&o->owner, &held, held & ~0xffffffffull, 0,
                                     __ATOMIC_RELEASE, __ATOMIC_RELAXED))
        return 0;
    CRASHPOINT();
    return 1;
#else
    (void)d; (void)o; (void)gen;
    return 0;
#endif
}

#endif
