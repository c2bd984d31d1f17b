/*
 * asyncwait.c — waits that cost no thread: async waiter records.
 *
 * A record is an entry of the actor array past the reserve, [wbase, nall),
 * claimed by a process (own = slot + 1 and incarnation, as S2) but bound to
 * no thread.  It is queued, dequeued, purged and recovered by exactly the
 * code that handles a thread's wait (queue.c Q1-Q6; recovery.c steps 4-5;
 * np_purge_orphans), so queue order, bounded overtaking (A2) and "a count is
 * never handed to a waiter" (Q2) are those of a synchronous wait.  Whoever
 * calls here (the event loop's thread) runs the transaction under the
 * object's guard with its *own* actor's redo log, so a process killed at any
 * instruction is completed or rolled back by recover(pid) as for any
 * operation, and a dead process's records are dequeued and freed like its
 * threads' actors: nothing is swallowed.
 *
 * Invariants kept here
 *  W1 A record never holds a guard and never has a redo log: only the thread
 *     actors that work on it do.  Only its own process queues, arms or frees
 *     it (or, once it is dead or the record is orphaned, recovery / a purge).
 *  W2 Wake-up: a waker bumps a record's wake word as for a thread (Q4), then
 *     its process's doorbell (np_proc.bell) and, when the process's helper
 *     may sleep on it (bell_sleeping), FUTEX_WAKEs it (queue.c).  A record is
 *     armed (seen = wake, then armed = 1) under the object's guard whenever
 *     it is left queued and not entitled; np_aw_wait reports an armed record
 *     whose wake word moved and disarms it by CAS: a wake-up after an arming
 *     is reported exactly once, and none is lost, because the arming reads
 *     `wake' under the guard that any later release takes before waking.
 *  W3 Quota: a process holds at most `waiter_quota' records at once (counted
 *     in the process, reset in a forked child), so one busy container leaves
 *     waiters - waiter_quota records to the others (the quota bounds each
 *     process, not their sum).  The process also keeps a bitmap of
 *     its records (a hint: the record's own word decides), so the helper's
 *     scan reads only those.
 *  W4 Leaving (cancellation, a timeout, the end of a wait): np_aw_release
 *     dequeues (waking those then entitled, as np_wait_cancel) and frees the
 *     record.  When the guard cannot be had within NP_GUARD_SLEEP_NS (a
 *     stopped holder), the record is given up and orphaned (Q3, Q5): the next
 *     guard holder, or the supervisor's recover, removes and frees it.
 *  W5 Progress does not depend on the supervisor alone: np_aw_tick (the
 *     helper, every slice) recovers dead processes its records wait behind,
 *     as a thread's wait does at the end of each slice (A3).
 *  W6 A release wakes at most NP_WAKE_BATCH waiters; a thread further back
 *     looks again after its slice, a record cannot.  So a record that takes
 *     wakes those then entitled, and np_aw_tick wakes, every slice, those
 *     entitled on each object its records wait on.
 *  W7 destroy wakes at most NP_WAKE_BATCH waiters; np_aw_tick marks the
 *     others woken (they then find the object gone: NP_EDESTROYED).
 */
#define _GNU_SOURCE
#include "core_internal.h"

#include <stdlib.h>
#include <string.h>

static inline int mine(np_domain *d, uint32_t r)
{
    return r >= d->wbase && r < d->nall && d->my_epoch == np_fork_epoch && d->my_proc
        && __atomic_load_n(&d->actors[r].proc, __ATOMIC_ACQUIRE) == d->my_proc
        && !__atomic_load_n(&d->actors[r].orphan, __ATOMIC_ACQUIRE);
}

static void count_reset(np_domain *d)
{
    if (d->aw_epoch != np_fork_epoch) {     /* a forked child holds none (W3) */
        d->aw_count = 0;
        memset(d->aw_mine, 0, ((d->nwt + 63) / 64) * sizeof(uint64_t));
        d->aw_epoch = np_fork_epoch;
    }
}

/* The process-local bitmap of our records (a hint for the scan only: the
 * record's own word decides whose it is). */
static inline void mine_set(np_domain *d, uint32_t r, int on)
{
    uint32_t i = r - d->wbase;
    uint64_t bit = 1ULL << (i % 64);
    if (on)
        __atomic_or_fetch(&d->aw_mine[i / 64], bit, __ATOMIC_RELEASE);
    else
        __atomic_and_fetch(&d->aw_mine[i / 64], ~bit, __ATOMIC_RELEASE);
}

static int claim(np_domain *d)
{
    uint32_t mp = d->my_proc;
    uint32_t start = __atomic_load_n(&d->aw_cursor, __ATOMIC_RELAXED);
    for (uint32_t k = 0; k < d->nwt; k++) {
        uint32_t r = d->wbase + (start + k) % d->nwt;
        np_actor *x = &d->actors[r];
        if (!entry_claim(x, mp))
            continue;
        CRASHPOINT();
        x->tid = 0;
        entry_reset(x);
        x->sleeping = 0;
        __atomic_store_n(&x->armed, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&d->aw_cursor, (start + k + 1) % d->nwt, __ATOMIC_RELAXED);
        mine_set(d, r, 1);
        return (int)r;
    }
    return -1;
}

int64_t np_aw_claim(np_domain *d)
{
    uint32_t ai, tag;
    int64_t rc;
    NP_ENTER(d);
    if ((rc = my_actor(d, &ai, &tag)) < 0)          /* registers the process */
        goto out;
    count_reset(d);
    if (__atomic_add_fetch(&d->aw_count, 1, __ATOMIC_RELAXED) > d->wquota) {
        __atomic_sub_fetch(&d->aw_count, 1, __ATOMIC_RELAXED);
        rc = NP_ENOSPC_WAIT;
        goto out;
    }
    rc = claim(d);
    if (rc < 0) {
        /* full: records of dead processes are freed by recovering them,
         * with a full table's budget (S3): a slice of one guard sleep was
         * too short to free a thousand queued records under contention */
        int64_t until = np_now() + NP_RECLAIM_NS;
        np_recover_all_dead(d, ai, tag, until);
        np_purge_orphans(d, ai, tag, until);
        rc = claim(d);
    }
    if (rc < 0) {
        __atomic_sub_fetch(&d->aw_count, 1, __ATOMIC_RELAXED);
        rc = NP_ENOSPC_WAIT;
    }
out:
    NP_LEAVE(d);
    return rc;
}


static int64_t aw_acquire(np_domain *d, uint32_t r, uint64_t handle, int kind, int flags)
{
    uint32_t idx, ai, tag;
    int rc;
    if ((rc = handle_obj(d, handle, kind, &idx)) < 0)
        return rc;
    if ((rc = my_actor(d, &ai, &tag)) < 0)
        return rc;
    if (!mine(d, r))
        return NP_EINVAL;
    if (unlikely(kind == NP_KIND_MUTEX && !d->dw_ready))
        np_dw_ready(d);                 /* a holder's death is signalled (deathwatch.c) */
    uint32_t gen = handle_gen(handle);
    np_obj *o = &d->objs[idx];
    np_actor *a = &d->actors[ai], *x = &d->actors[r];
    rc = obj_lock(d, o, tag, NP_GUARD_TRY);
    if (unlikely(rc < 0))
        return rc == NP_ECLOSED ? rc : NP_EINTR;     /* busy: the caller tries later */
    CRASHPOINT();
    if (unlikely(__atomic_load_n(&o->purge, __ATOMIC_RELAXED)))
        np_q_purge(d, a, o);
    if (unlikely((rc = obj_gone(d, a, x, o, idx, gen)) != 0))
        return rc;
    if (unlikely(x->waiting_on == idx + 1 && x->wait_gen != o->gen)) {
        /* queued on an earlier incarnation, destroyed since (A4) */
        tx_begin(a, idx, 0);
        TX32(d, a, x->waiting_on, 0);
        tx_commit(d, a);
        obj_unlock(d, o);
        CRASHPOINT();
        return NP_EDESTROYED;
    }
    int queued = x->waiting_on == idx + 1 && x->wait_gen == gen;
    if (unlikely(x->waiting_on && !queued)) {
        obj_unlock(d, o);
        return NP_EBUSY;                /* the record waits elsewhere */
    }
    __atomic_store_n(&x->armed, 0, __ATOMIC_RELAXED);
    int64_t v = o->value;
    int entitled;
    if (!queued)
        entitled = v > 0 && np_newcomer_may_take(d, o);
    else
        entitled = v > (int64_t)np_q_pos(d, o, r);
    if (entitled) {
        tx_begin(a, idx, 0);
        tx_grant(d, a, o, idx, kind, v);    /* the same grant as acquire.c's (T1) */
        if (queued)
            np_tx_q_remove(d, a, o, r);
        tx_commit(d, a);
        /* W6: pass the wake-up on to those entitled now (a release wakes
         * at most NP_WAKE_BATCH; coroutines have no slice to look again). */
        uint32_t who[NP_WAKE_BATCH];
        int n = o->value > 0 && o->qlen ? np_q_collect(d, o, who) : 0;
        obj_unlock(d, o);
        CRASHPOINT();
        np_wake_actors(d, who, n);
        return kind == NP_KIND_MUTEX ? 0 : v - 1;
    }
    if (flags & NP_AW_FINAL) {
        /* Not entitled: nobody behind becomes entitled by our leaving. */
        if (queued) {
            tx_begin(a, idx, 0);
            np_tx_q_remove(d, a, o, r);
            tx_commit(d, a);
        }
        obj_unlock(d, o);
        CRASHPOINT();
        return NP_ETIMEDOUT;
    }
    if (!queued) {
        tx_begin(a, idx, 0);
        np_tx_q_append_rec(d, a, r, o, idx, np_now());
        tx_commit(d, a);
    } else {
        np_head_refused(d, o, r, np_now());     /* A2 */
    }
    /* W2: seen before armed (release), both under the guard. */
    __atomic_store_n(&x->seen, __atomic_load_n(&x->wake, __ATOMIC_ACQUIRE), __ATOMIC_RELAXED);
    __atomic_store_n(&x->armed, 1, __ATOMIC_RELEASE);
    obj_unlock(d, o);
    CRASHPOINT();
    return NP_EAGAIN;
}

int64_t np_aw_acquire(np_domain *d, uint32_t rec, uint64_t handle, int32_t kind, int32_t flags)
{
    NP_ENTER(d);
    int64_t rc = aw_acquire(d, rec, handle, kind, flags);
    NP_LEAVE(d);
    return rc;
}

static int64_t aw_release(np_domain *d, uint32_t r)
{
    uint32_t ai, tag, who[NP_WAKE_BATCH];
    int rc, n = 0;
    if ((rc = my_actor(d, &ai, &tag)) < 0)
        return rc;
    if (!mine(d, r))
        return NP_EINVAL;
    np_actor *a = &d->actors[ai], *x = &d->actors[r];
    __atomic_store_n(&x->armed, 0, __ATOMIC_RELAXED);
    uint32_t w = __atomic_load_n(&x->waiting_on, __ATOMIC_RELAXED);
    if (w && w <= d->nobj) {
        np_obj *o = &d->objs[w - 1];
        if (obj_lock(d, o, tag, NP_GUARD_TRY) < 0) {
            /* W4: a stopped holder; whoever purges the queue frees it */
            np_give_up(o, x);
            mine_set(d, r, 0);
            __atomic_store_n(&x->orphan, orphan_mark(x->inc), __ATOMIC_SEQ_CST);
            __atomic_sub_fetch(&d->aw_count, 1, __ATOMIC_RELAXED);
            np_release_orphan(d, r);    /* purged meanwhile: free it ourselves */
            return 1;
        }
        CRASHPOINT();
        if (x->waiting_on == w)
            n = np_q_leave(d, a, r, o, w, who);
        obj_unlock(d, o);
        CRASHPOINT();
        np_wake_actors(d, who, n);
    }
    mine_set(d, r, 0);
    np_free_actor(d, r, __atomic_load_n(&x->own, __ATOMIC_ACQUIRE));
    __atomic_sub_fetch(&d->aw_count, 1, __ATOMIC_RELAXED);
    return 0;
}

int64_t np_aw_release(np_domain *d, uint32_t rec)
{
    NP_ENTER(d);
    int64_t rc = aw_release(d, rec);
    NP_LEAVE(d);
    return rc;
}

/* Armed records of ours whose wake word moved, disarmed (W2). */
static int scan(np_domain *d, uint32_t *out, int max)
{
    int n = 0;
    uint32_t mp = d->my_proc, words = (d->nwt + 63) / 64;
    if (d->aw_epoch != np_fork_epoch)
        return 0;                       /* none claimed since fork */
    for (uint32_t wi = 0; wi < words && n < max; wi++) {
      uint64_t bits = __atomic_load_n(&d->aw_mine[wi], __ATOMIC_ACQUIRE);
      for (; bits && n < max; bits &= bits - 1) {
        uint32_t r = d->wbase + wi * 64 + (uint32_t)__builtin_ctzll(bits);
        np_actor *x = &d->actors[r];
        if (!__atomic_load_n(&x->armed, __ATOMIC_ACQUIRE)
            || __atomic_load_n(&x->proc, __ATOMIC_RELAXED) != mp
            || __atomic_load_n(&x->wake, __ATOMIC_SEQ_CST) == __atomic_load_n(&x->seen, __ATOMIC_RELAXED))
            continue;
        uint32_t one = 1;
        if (__atomic_compare_exchange_n(&x->armed, &one, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            out[n++] = r;
      }
    }
    return n;
}

int64_t np_aw_wait(np_domain *d, uint32_t *out, int32_t max, int64_t ns)
{
    int n = 0;
    NP_ENTER(d);
    if (!(d->my_epoch == np_fork_epoch && d->my_proc) || max <= 0) {
        NP_LEAVE(d);
        return 0;                       /* no record of ours exists */
    }
    np_proc *s = &d->procs[d->my_proc - 1];
    for (int pass = 0; pass < 2 && !closing(d); pass++) {
        uint32_t b = __atomic_load_n(&s->bell, __ATOMIC_SEQ_CST);
        if ((n = scan(d, out, max)) > 0 || pass == 1)
            break;
        /* seq_cst, with the waker's bump of bell and exchange of
         * bell_sleeping (W2): either it sees our flag, or we see its bump. */
        __atomic_store_n(&s->bell_sleeping, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&s->bell, __ATOMIC_SEQ_CST) == b && !closing(d))
            np_futex_wait(&s->bell, b, ns);
        __atomic_store_n(&s->bell_sleeping, 0, __ATOMIC_RELAXED);
    }
    int64_t rc = closing(d) ? NP_ECLOSED : n;
    NP_LEAVE(d);
    return rc;
}

/* W5: for each object one of our armed records waits on, the processes
 * ahead of our first record (or the mutex's owner) that are not us. */
static int64_t aw_tick(np_domain *d, int64_t deadline)
{
    uint32_t ai, tag;
    int rc;
    if (!(d->my_epoch == np_fork_epoch && d->my_proc))
        return 0;
    if ((rc = my_actor(d, &ai, &tag)) < 0)
        return rc;
    unsigned char *seen = calloc(d->nobj ? d->nobj : 1, 1);
    if (!seen)
        return NP_ESYS;
    int64_t recovered = 0;
    for (uint32_t r = d->wbase; r < d->nall; r++) {
        uint32_t i = r - d->wbase;
        if (d->aw_epoch != np_fork_epoch || !(__atomic_load_n(&d->aw_mine[i / 64], __ATOMIC_ACQUIRE)
                                               & (1ULL << (i % 64))))
            continue;
        np_actor *x = &d->actors[r];
        if (__atomic_load_n(&x->proc, __ATOMIC_RELAXED) != d->my_proc
            || !__atomic_load_n(&x->armed, __ATOMIC_ACQUIRE))
            continue;
        uint32_t w = __atomic_load_n(&x->waiting_on, __ATOMIC_RELAXED);
        if (!w || w > d->nobj)
            continue;
        np_obj *o = &d->objs[w - 1];
        if (!__atomic_load_n(&o->used, __ATOMIC_ACQUIRE)
            || __atomic_load_n(&o->gen, __ATOMIC_RELAXED) != x->wait_gen) {
            /* W7: destroyed, and beyond the batch destroy woke: look again */
            __atomic_add_fetch(&x->wake, 1, __ATOMIC_SEQ_CST);
            continue;
        }
        if (seen[w - 1])
            continue;
        seen[w - 1] = 1;
        if (obj_lock(d, o, tag, deadline) < 0)
            continue;
        CRASHPOINT();
        uint32_t procs[NP_WAKE_BATCH];
        int n = 0;
        if (w - 1 >= d->nsem && o->value == 0 && o->owner && o->owner <= d->nproc
            && o->owner != d->my_proc)
            procs[n++] = o->owner - 1;
        if (o->value > 0) {
            uint32_t cur = o->qhead, steps = 0;
            while (cur && n < NP_WAKE_BATCH && steps++ <= d->nall) {
                uint32_t p = d->actors[cur - 1].proc;
                if (p == d->my_proc)
                    break;              /* ours from here on */
                if (p && p <= d->nproc)
                    procs[n++] = p - 1;
                cur = d->actors[cur - 1].qnext;
            }
        }
        /* W6: and whoever is entitled and was not woken (behind a batch) */
        uint32_t who[NP_WAKE_BATCH];
        int k = o->value > 0 && o->qlen ? np_q_collect(d, o, who) : 0;
        obj_unlock(d, o);
        CRASHPOINT();
        np_wake_actors(d, who, k);
        for (int i = 0; i < n; i++) {
            uint64_t pw = __atomic_load_n(&d->procs[procs[i]].w, __ATOMIC_ACQUIRE);
            if (PW_STATE(pw) != NP_PS_FREE && np_recover_slot(d, ai, tag, procs[i], deadline) == 1)
                recovered++;
        }
    }
    free(seen);
    return recovered;
}

int64_t np_aw_tick(np_domain *d, int64_t deadline)
{
    NP_ENTER(d);
    int64_t rc = aw_tick(d, deadline);
    NP_LEAVE(d);
    return rc;
}
