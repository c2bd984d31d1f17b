/*
 * queue.c — FIFO wait queues and wake-ups.  Every function here runs under
 * the object's guard and changes shared state only through the caller's
 * redo log (tx_put), so it is part of the caller's transaction.
 *
 * Invariants kept here
 *  Q1 A queue is a singly linked list of actor index + 1 (qhead, qnext,
 *     qtail, qlen); an actor is in at most one queue, named by waiting_on
 *     and the object's generation wait_gen.
 *  Q2 Counts are never handed to a waiter: they stay in `value', and the
 *     waiter at position p (0-based) may take one when value > p.  A poster
 *     wakes the first min(value, qlen) waiters, who re-compete, so a dead or
 *     departed waiter never swallows a count.
 *  Q3 A waiter that had to give up without its object's guard (a stopped
 *     process held it past the caller's deadline) marks itself
 *     cancel_pending and sets the object's purge hint; the next guard holder
 *     that sees the hint removes it, so it blocks nobody.
 *  Q5 A thread that cannot leave such a queue (its object's guard still held)
 *     abandons its actor (orphan) and takes a fresh one, so it can go on with
 *     other objects; the purge that removes the orphan also frees it (once:
 *     the CAS of np_free_actor, against the thread freeing it itself; the
 *     mark names the incarnation, so a stale one frees nothing: identity.c).
 *  Q6 Async records (asyncwait.c) are queue entries like actors: every
 *     function here takes either; only np_wake_actors tells them apart (it
 *     also rings the record's process's doorbell, W2).
 *  Q4 No lost wake-up: each actor sleeps on its own wake word, read under the
 *     guard before releasing it; a waker increments it, then checks whether
 *     the sleeper may be asleep (Dekker, seq_cst on both sides).
 *  Q6 ... nor a lost one from a dead waker.  A waker wakes after its commit,
 *     guard released; if it dies in between, the units are there but the
 *     sleeper is not told.  A sliced sleeper finds them at the end of its
 *     slice; an untimed one (A3u of acquire.c) is woken by the recovery of
 *     the dead waker: every recovery bumps rec_epoch, then wakes each actor
 *     asleep without a timeout (np_wake_untimed).  Dekker again: the sleeper
 *     reads rec_epoch under the guard, marks itself NP_SLEEP_UNTIMED, then
 *     re-reads it (seq_cst) and does not sleep untimed if it moved; so
 *     either it sees the bump or the recovery's scan sees its mark.  With no
 *     supervisor, the waiters behind such a sleeper stand in: at the end of
 *     its slice a waiter wakes the entitled waiters ahead of it (acquire.c),
 *     and one that finds its object destroyed wakes that incarnation's
 *     untimed sleepers (np_wake_untimed_of).
 */
#define _GNU_SOURCE
#include "core_internal.h"

uint32_t np_q_pos(np_domain *d, np_obj *o, uint32_t a)
{
    uint32_t pos = 0, cur = o->qhead;
    while (cur && pos <= d->nall) {
        if (cur == a + 1)
            return pos;
        cur = d->actors[cur - 1].qnext;
        pos++;
    }
    return UINT32_MAX;
}

void np_tx_q_remove(np_domain *d, np_actor *me, np_obj *o, uint32_t victim)
{
    uint32_t prev = 0, cur = o->qhead, n = 0;
    while (cur && cur != victim + 1 && n++ <= d->nall) {
        prev = cur;
        cur = d->actors[cur - 1].qnext;
    }
    np_actor *v = &d->actors[victim];
    if (cur == victim + 1) {
        uint32_t next = v->qnext;
        if (prev)
            TX32(d, me, d->actors[prev - 1].qnext, next);
        else
            TX32(d, me, o->qhead, next);
        if (o->qtail == victim + 1)
            TX32(d, me, o->qtail, prev);
        TX32(d, me, o->qlen, o->qlen - 1);
    }
    TX32(d, me, v->waiting_on, 0);
}

void np_tx_q_append(np_domain *d, np_actor *me, uint32_t ai, np_obj *o, uint32_t idx,
                    int64_t now)
{
    np_tx_q_append_rec(d, me, ai, o, idx, now);
}

/* Append actor or async record ai, logged in me (the guard holder's log). */
void np_tx_q_append_rec(np_domain *d, np_actor *me, uint32_t ai, np_obj *o, uint32_t idx,
                        int64_t now)
{
    np_actor *x = &d->actors[ai];
    TX64(d, me, x->wait_since, now);
    TX32(d, me, x->qnext, 0);
    TX32(d, me, x->wait_gen, o->gen);
    TX32(d, me, x->waiting_on, idx + 1);
    TX32(d, me, x->cancel_pending, 0);
    if (o->qtail)
        TX32(d, me, d->actors[o->qtail - 1].qnext, ai + 1);
    else
        TX32(d, me, o->qhead, ai + 1);
    TX32(d, me, o->qtail, ai + 1);
    TX32(d, me, o->qlen, o->qlen + 1);
}

/* The first min(value, qlen, max) queued actors: those entitled. */
int np_q_collect_n(np_domain *d, np_obj *o, uint32_t *out, int max)
{
    int64_t v = o->value;
    int n = 0;
    uint32_t cur = o->qhead, steps = 0;
    while (cur && n < v && n < max && steps++ <= d->nall) {
        out[n++] = cur - 1;
        cur = d->actors[cur - 1].qnext;
    }
    return n;
}

/* The first min(value, qlen) queued actors, capped at NP_WAKE_BATCH. */
int np_q_collect(np_domain *d, np_obj *o, uint32_t *out)
{
    return np_q_collect_n(d, o, out, NP_WAKE_BATCH);
}

/* Q3: remove the waiters that gave up; one transaction each.  `me' is the
 * guard holder's actor (its log).  Clears the hint first: a waiter that
 * gives up after this sets it again. */
void np_q_purge(np_domain *d, np_actor *me, np_obj *o)
{
    uint32_t o_idx = (uint32_t)(o - d->objs);
    __atomic_store_n(&o->purge, 0, __ATOMIC_SEQ_CST);
    uint32_t cur = o->qhead, steps = 0;
    while (cur && steps++ <= d->nall) {
        np_actor *x = &d->actors[cur - 1];
        uint32_t next = x->qnext;
        if (__atomic_load_n(&x->cancel_pending, __ATOMIC_SEQ_CST)) {
            tx_begin(me, o_idx, 0);
            np_tx_q_remove(d, me, o, cur - 1);
            tx_commit(d, me);
            np_release_orphan(d, cur - 1);     /* Q5 */
        }
        cur = next;
    }
}

/* Q4: bump x's word, and make the system call only if it may be asleep.
 * seq_cst, with the sleeper's store of `sleeping' and load of `wake':
 * either it sees our increment and does not sleep, or we see its flag and
 * wake it.  Only the first waker after it went to sleep makes the call. */
static inline void wake_one(np_actor *x)
{
    __atomic_add_fetch(&x->wake, 1, __ATOMIC_SEQ_CST);
    if (__atomic_exchange_n(&x->sleeping, 0, __ATOMIC_SEQ_CST))
        np_futex_wake(&x->wake, 1);
}

void np_wake_actors(np_domain *d, const uint32_t *who, int n)
{
    for (int i = 0; i < n; i++) {
        np_actor *x = &d->actors[who[i]];
        wake_one(x);
        if (who[i] >= d->wbase) {
            /* an async record (W2): its process's helper looks at it */
            uint32_t p = __atomic_load_n(&x->proc, __ATOMIC_ACQUIRE);
            if (p && p <= d->nproc) {
                np_proc *s = &d->procs[p - 1];
                __atomic_add_fetch(&s->bell, 1, __ATOMIC_SEQ_CST);
                if (__atomic_exchange_n(&s->bell_sleeping, 0, __ATOMIC_SEQ_CST))
                    np_futex_wake(&s->bell, 1);
            }
        }
    }
}

/* Purge every object whose hint says a waiter gave up (Q3, Q5), and free
 * every orphan: those still queued (their object's guard taken), those
 * whose purger died before freeing them, those left waiting on a destroyed
 * object.  The supervisor's recover and a full table's reclaim call this, so
 * an orphan on an object nobody touches any more is still freed.  Returns
 * the number of objects purged and orphans freed. */
int np_purge_orphans(np_domain *d, uint32_t me, uint32_t tag, int64_t deadline)
{
    int n = 0;
    np_actor *a = &d->actors[me];
    for (uint32_t x = 0; x < d->nall; x++) {       /* async records too (W4) */
        np_actor *ax = &d->actors[x];
        if (!__atomic_load_n(&ax->orphan, __ATOMIC_ACQUIRE) || !ax->proc)
            continue;
        uint32_t w = __atomic_load_n(&ax->waiting_on, __ATOMIC_ACQUIRE);
        if (w && w <= d->nobj) {
            np_obj *o = &d->objs[w - 1];
            if (obj_lock(d, o, tag, deadline) < 0)
                continue;
            CRASHPOINT();
            uint32_t who[NP_WAKE_BATCH];
            int k = 0;
            if (ax->orphan == orphan_mark(ax->inc) && ax->proc && ax->waiting_on == w)
                k = np_q_leave(d, a, x, o, w, who);
            obj_unlock(d, o);
            CRASHPOINT();
            np_wake_actors(d, who, k);
        }
        n += np_release_orphan(d, x);
    }
    for (uint32_t i = 0; i < d->nobj; i++) {
        np_obj *o = &d->objs[i];
        if (!__atomic_load_n(&o->purge, __ATOMIC_RELAXED))
            continue;
        if (obj_lock(d, o, tag, deadline) < 0)
            continue;
        CRASHPOINT();
        np_q_purge(d, &d->actors[me], o);
        obj_unlock(d, o);
        CRASHPOINT();
        n++;
    }
    return n;
}

int np_q_leave(np_domain *d, np_actor *a, uint32_t xi, np_obj *o, uint32_t w, uint32_t *who)
{
    np_actor *x = &d->actors[xi];
    tx_begin(a, w - 1, 0);
    if (o->used && x->wait_gen == o->gen)
        np_tx_q_remove(d, a, o, xi);
    else
        TX32(d, a, x->waiting_on, 0);   /* its object was destroyed */
    tx_commit(d, a);
    return o->used && o->value > 0 && o->qlen ? np_q_collect(d, o, who) : 0;
}

/* Wake every thread of process slot slot1 - 1 that may sleep (close,
 * np_interrupt_waits): each sees its word change, as for a grant (Q4). */
void np_wake_slot_actors(np_domain *d, uint32_t slot1)
{
    for (uint32_t x = 0; x <= d->nact; x++)
        if (__atomic_load_n(&d->actors[x].proc, __ATOMIC_RELAXED) == slot1)
            wake_one(&d->actors[x]);
}

/* Q6: after rec_epoch was bumped, wake the actors asleep without a timeout:
 * those of listed[0..n) (found by the caller's pass over the table), or,
 * with listed NULL, every actor of the table. */
void np_wake_untimed(np_domain *d, const uint32_t *listed, int n)
{
    uint32_t hi = listed ? (uint32_t)n : d->nact + 1;
    for (uint32_t k = 0; k < hi; k++) {
        np_actor *x = &d->actors[listed ? listed[k] : k];
        if (__atomic_load_n(&x->sleeping, __ATOMIC_SEQ_CST) == NP_SLEEP_UNTIMED)
            wake_one(x);
    }
}

/* Q6 again, for a destroy: the untimed sleepers still marked as queued on
 * object idx1 - 1 in generation gen (the destroyed one) -- its destroyer
 * may have died before waking them.  Called by a waiter of that queue that
 * found the object gone (obj_gone), so they hear of it with no supervisor. */
void np_wake_untimed_of(np_domain *d, uint32_t idx1, uint32_t gen)
{
    for (uint32_t k = 0; k <= d->nact; k++) {
        np_actor *x = &d->actors[k];
        if (__atomic_load_n(&x->sleeping, __ATOMIC_SEQ_CST) == NP_SLEEP_UNTIMED
                && __atomic_load_n(&x->waiting_on, __ATOMIC_RELAXED) == idx1
                && __atomic_load_n(&x->wait_gen, __ATOMIC_RELAXED) == gen)
            wake_one(x);
    }
}
