/*
 * acquire.c — semaphore decrement and mutex lock: one implementation.
 *
 * A mutex is a semaphore of value 1 with an owner (the holder's process
 * slot); a protected semaphore also counts, per process slot and object
 * generation, what each process took (its delta), so that recovery gives it
 * back.  Both are changed in one transaction (tx.c) under the object's guard.
 *
 * Invariants kept here (with Q1-Q4 of queue.c)
 *  A1 value >= 0 always; a mutex's value is 1 (free, owner 0) or 0 (locked,
 *     owner = the holder's slot + 1).
 *  A2 Bounded overtaking: a caller not queued may take a free unit ahead of
 *     the queue unless the head, after waiting NP_STARVE_NS, was refused one
 *     (np_head_refused: woken for a unit, it found none -- a look at the end
 *     of a slice refuses nothing); from then on it queues behind, and the next unit is
 *     the head's: waits are starvation-free, and a head that is not running
 *     never keeps a unit idle.
 *  A3 A wait sleeps at most one slice (NP_SLICE_NS) per call and returns
 *     NP_EINTR still queued, after checking whether a process it waits behind
 *     is dead (recovering it if so: progress never depends on the supervisor
 *     alone).  NP_ETIMEDOUT leaves the queue, or marks the caller given up
 *     when the guard could not be had in time (Q3): nothing was taken.
 *     Except (A3u) the head of a semaphore's queue with deadline NP_FOREVER
 *     (Python passes NP_SLICED instead on its main thread, where signal
 *     handlers run, and for a wait with a cancel event to poll): no
 *     process is ahead of it (the slice's check has nothing to look at: the
 *     next unit is its own, and the increment that makes it wakes it), so it
 *     sleeps without a timeout, as sem_wait does (a timed sleep arms a
 *     kernel timer: ~15 % of a hand-off on one CPU).  What else ends a
 *     slice wakes it instead: a signal (NP_EINTR at once, still queued),
 *     np_domain_close (every sleeper of the
 *     process), np_interrupt_waits (a supervisor stopping the process: from
 *     then on its waits are sliced again, so its Python code keeps seeing
 *     interrupt_check).  A mutex keeps its slices (its holder may die:
 *     A6's death word is a hint, the slice its fallback).
 *  A5 A mutex grant bumps its fencing token in the grant's transaction
 *     (T1): a death at any point either grants with a new token or not at
 *     all, so no token is handed out twice.
 *  A4 destroy bumps the generation; a queued waiter that finds another
 *     generation returns NP_EDESTROYED and is no longer queued.
 *  A7 A mutex is first tried on its fast path (mutex_fast.h, F1-F6): one
 *     CAS when the path is open (nobody queued); everything below runs with
 *     the path closed (obj_lock), so A1-A6 read and write as before.
 *  A6 A waiter for a mutex held by another process also sleeps on that
 *     process's death word (deathwatch.c): when the kernel reports the
 *     holder's death, the waiter recovers its slot itself (exact liveness,
 *     once per call), without waiting for the slice or the supervisor.
 *  A8 Adaptive waiting, before queueing (nothing logged, nothing held): a
 *     caller whose last releaser ran on another CPU watches the value for a
 *     few microseconds (NP_SPIN_ITERS); one whose last releaser ran on its
 *     own CPU yields it instead, at most NP_YIELDS times per call: a
 *     releaser sharing the CPU then runs and gives the unit back with no
 *     futex sleep, wake-up or queue entry (a hand-off on one CPU costs one
 *     context switch).  A caller not queued is a newcomer (A2), so yielding
 *     changes no fairness bound.  A yield that kept the thread off the CPU
 *     for YB_SLOW_NS ends the call's yields; two such yields close together
 *     say other work runs on this CPU (a loaded CPU), and the thread's
 *     next waits sleep at once (yield_backoff.h, Y1-Y2) -- a CPU hog costs
 *     a waiter a time slice per thousands of waits, not one per wait.
 *  A9 One wait per thread (its actor's queue fields): while a wait of the
 *     thread is in progress -- a signal handler that runs between the
 *     wait's slices -- a call takes a unit that is free to take (it never
 *     queues, and no transaction of the actor is open between slices), and
 *     one that would have to wait is refused (NP_EBUSY, nothing taken).
 *     Not kept on the object of the interrupted wait: a call there is taken
 *     for that wait going on (the core cannot tell a slice's continuation
 *     from a new call) -- a known defect, README "Errors".
 */
#define _GNU_SOURCE
#include "core_internal.h"
#include "yield_backoff.h"

#include <errno.h>
#include <sched.h>
#include <string.h>

static void check_ahead(np_domain *d, uint32_t me, uint32_t tag, const uint32_t *procs, int n,
                        int64_t deadline)
{
    for (int i = 0; i < n; i++) {
        uint32_t p = procs[i];
        uint64_t w = __atomic_load_n(&d->procs[p].w, __ATOMIC_ACQUIRE);
        if (PW_STATE(w) != NP_PS_FREE)
            np_recover_slot(d, me, tag, p, deadline);
    }
}


/* A8: per thread, when it stops yielding (yield_backoff.h), and what it did */
static __thread yb_state yielding;
static __thread int64_t yield_stats[3];     /* yields, slow ones, waits that did not (np_yield_stats) */

int64_t np_yield_stats(int64_t *out)
{
    memcpy(out, yield_stats, sizeof yield_stats);
    return 0;
}

/* Watch o's value for a few microseconds (NP_SPIN_ITERS pauses), guard
 * released: cheaper than a sleep and a wake-up when the holder is running.
 * A semaphore's value is always current; a mutex spins here only as a
 * queued head, when its fast path is closed and its value derived (F4). */
static void spin_for_a_unit(const np_obj *o)
{
    for (int i = 0; i < NP_SPIN_ITERS && __atomic_load_n(&o->value, __ATOMIC_RELAXED) <= 0; i++)
        cpu_relax();
}

int64_t np_i_acquire(np_domain *d, uint64_t handle, int64_t deadline, int kind)
{
    uint32_t idx, ai, tag;
    int rc;
    if ((rc = handle_obj(d, handle, kind, &idx)) < 0)
        return rc;
    if ((rc = my_actor(d, &ai, &tag)) < 0)
        return rc;
    if (unlikely(kind == NP_KIND_MUTEX && !d->dw_ready))
        np_dw_ready(d);                 /* A6: our own death will be signalled */
    uint32_t gen = handle_gen(handle);
    np_obj *o = &d->objs[idx];
    np_actor *a = &d->actors[ai];
    int64_t slice_end = 0;
    int spun = 0, rspun = 0, death_checked = 0, woken = 0, yields = 0;

    if (kind == NP_KIND_MUTEX && likely(!a->waiting_on)) {
        /* A7: the fast path (mutex_fast.h), then a bounded spin on it while
         * the holder runs elsewhere; the slow path below does not spin. */
        if (likely(mx_fast_lock(d, o, gen)))
            return 0;
        spun = 1;
        if (deadline != NP_NOWAIT && o->rel_cpu != sched_getcpu()) {
            for (int i = 0; i < NP_SPIN_ITERS; i++) {
                cpu_relax();
                uint64_t w = __atomic_load_n((uint64_t *)&o->owner, __ATOMIC_RELAXED);
                if ((uint32_t)(w >> 32) != (gen | NP_FAST_OPEN))
                    break;              /* closed (or stale): the slow path decides */
                if ((uint32_t)w != 0)
                    continue;           /* held: keep watching */
                if (mx_fast_lock(d, o, gen))
                    return 0;
            }
        }
    }

    for (;;) {
        rc = obj_lock(d, o, tag, deadline == NP_NOWAIT ? NP_GUARD_TRY : deadline);
        if (unlikely(rc < 0)) {
            if (rc != NP_EINTR && rc != NP_EAGAIN
                    && __atomic_load_n(&a->waiting_on, __ATOMIC_RELAXED) == idx + 1)
                np_give_up(o, a);       /* leave nothing that blocks others (Q3) */
            return rc;
        }
        CRASHPOINT();
        if (unlikely(__atomic_load_n(&o->purge, __ATOMIC_RELAXED)))
            np_q_purge(d, a, o);
        if (unlikely((rc = obj_gone(d, a, a, o, idx, gen)) != 0))
            return rc;
        int queued = a->waiting_on == idx + 1 && a->wait_gen == gen;
        if (unlikely(queued && a->cancel_pending)) {
            /* a wait of ours given up earlier (Q3): start afresh */
            tx_begin(a, idx, 0);
            np_tx_q_remove(d, a, o, ai);
            tx_commit(d, a);
            queued = 0;
        }
        if (unlikely(a->waiting_on && !queued && a->cancel_pending)) {
            obj_unlock(d, o);
            np_i_wait_cancel(d);        /* a given-up wait: try to leave it */
            if (__atomic_load_n(&a->waiting_on, __ATOMIC_RELAXED)) {
                /* still stuck behind a stopped process: Q5, go on with a
                 * fresh actor */
                np_abandon_actor(d, ai);
                if ((rc = my_actor(d, &ai, &tag)) < 0)
                    return rc;
                a = &d->actors[ai];
            }
            continue;
        }
        /* A9: a wait of this thread is in progress (a signal handler that
         * runs between its slices): take what is free, never queue */
        int nested = a->waiting_on && !queued;
        int64_t v = o->value;
        int entitled;
        uint32_t pos = 0;
        if (likely(!queued)) {
            entitled = v > 0 && np_newcomer_may_take(d, o);
        } else {
            pos = np_q_pos(d, o, ai);
            entitled = v > (int64_t)pos;
        }
        if (likely(entitled)) {
            tx_begin(a, idx, 0);
            tx_grant(d, a, o, idx, kind, v);
            if (queued)
                np_tx_q_remove(d, a, o, ai);
            tx_commit(d, a);
            obj_unlock(d, o);
            CRASHPOINT();
            return kind == NP_KIND_MUTEX ? 0 : v - 1;
        }
        if (deadline == NP_NOWAIT || unlikely(nested)) {
            obj_unlock(d, o);
            return nested && deadline != NP_NOWAIT ? NP_EBUSY : NP_EAGAIN;
        }
        if (!queued && !spun && o->rel_cpu != sched_getcpu()) {
            spun = 1;                   /* reads only: nothing to log */
            obj_unlock(d, o);
            spin_for_a_unit(o);
            continue;
        }
        int64_t now = np_now();
        /* refused: woken for a unit (its word moved) and found none; a look
         * at the end of a slice, or after a signal, refuses nothing */
        if (queued && woken && !rspun && np_head_refused(d, o, ai, now)) {
            rspun = 1;                  /* A2: reserved; the holder may be running */
            obj_unlock(d, o);
            spin_for_a_unit(o);
            continue;
        }
        if (now >= deadline || closing(d)) {
            /* Not entitled: nobody behind us becomes entitled by our leaving. */
            if (queued) {
                tx_begin(a, idx, 0);
                np_tx_q_remove(d, a, o, ai);
                tx_commit(d, a);
            }
            obj_unlock(d, o);
            CRASHPOINT();
            return closing(d) ? NP_ECLOSED : NP_ETIMEDOUT;
        }
        if (!queued && yields < NP_YIELDS && o->rel_cpu == sched_getcpu()) {
            if (yields || yb_may_yield(&yielding)) {
                yields++;               /* A8: reads only, nothing to log */
                yield_stats[0]++;
                obj_unlock(d, o);
                sched_yield();
                if (yb_after(&yielding, np_now() - now, NP_YIELD_WORTH_NS)) {
                    /* A8: other work may run here: we were behind it, where
                     * a sleeper woken by the release would preempt it */
                    yield_stats[1]++;
                    yields = NP_YIELDS + 1;     /* no more yields this call */
                }
                continue;
            }
            yield_stats[2]++;
            yields = NP_YIELDS + 1;
        }
        if (!slice_end)
            slice_end = now + NP_SLICE_NS;
        if (now >= slice_end) {
            /* Someone ahead may be dead (no supervisor, or a slow one), or
             * asleep without a timer and never told of its unit (A3u: its
             * waker died before waking it, and nobody recovered that one
             * yet): wake those entitled, and look at the processes ahead. */
            uint32_t procs[NP_WAKE_BATCH], who[NP_WAKE_BATCH];
            int n = 0, nw = 0;
            if (kind == NP_KIND_MUTEX && v == 0 && o->owner && o->owner <= d->nproc)
                procs[n++] = o->owner - 1;
            if (v > 0 && queued) {
                uint32_t cur = o->qhead, steps = 0;
                while (cur && cur != ai + 1 && n < NP_WAKE_BATCH && steps++ <= d->nall) {
                    uint32_t p = d->actors[cur - 1].proc;
                    if (p && p != d->my_proc && p <= d->nproc)
                        procs[n++] = p - 1;
                    cur = d->actors[cur - 1].qnext;
                }
                nw = np_q_collect(d, o, who);
            }
            obj_unlock(d, o);
            np_wake_actors(d, who, nw);
            int64_t rdl = deadline < now + NP_SLICE_NS ? deadline : now + NP_SLICE_NS;
            check_ahead(d, ai, tag, procs, n, rdl);
            return NP_EINTR;
        }
        if (!queued) {
            pos = o->qlen;              /* appended at the tail */
            tx_begin(a, idx, 0);
            np_tx_q_append(d, a, ai, o, idx, now);
            tx_commit(d, a);
        }
        /* A3u: the first waiter of a semaphore, no deadline, not interrupted */
        np_proc *mine = &d->procs[d->my_proc - 1];
        int untimed = kind == NP_KIND_SEM && deadline == NP_FOREVER && pos == 0
                      && !__atomic_load_n(&mine->interrupted, __ATOMIC_SEQ_CST);
        /* A6: a mutex held by another process: sleep on its death word too. */
        uint32_t holder = 0;
        uint64_t hw = 0;
        if (kind == NP_KIND_MUTEX && !death_checked && o->owner && o->owner <= d->nproc
                && o->owner != d->my_proc) {
            holder = o->owner;
            hw = __atomic_load_n(&d->procs[holder - 1].w, __ATOMIC_ACQUIRE);
        }
        /* acquire: read under the guard, so any later post changes it. */
        uint32_t w = __atomic_load_n(&a->wake, __ATOMIC_ACQUIRE);
        uint32_t epoch = __atomic_load_n(&d->h->rec_epoch, __ATOMIC_SEQ_CST);     /* Q6 */
        obj_unlock(d, o);
        CRASHPOINT();
        int64_t until = deadline < slice_end ? deadline : slice_end;
        int died = 0;
        /* seq_cst: pairs with np_wake_actors (Q4), np_interrupt_waits and
         * np_wake_untimed (Q6): either they see our mark, or we see their
         * change (of wake, interrupted, rec_epoch) and do not sleep so. */
        __atomic_store_n(&a->sleeping, untimed ? NP_SLEEP_UNTIMED : 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&a->wake, __ATOMIC_SEQ_CST) == w && !closing(d)) {
            if (holder) {
                died = np_dw_sleep(d, &a->wake, w, until, holder - 1);
            } else if (!untimed) {
                np_futex_wait(&a->wake, w, until - now);
            } else if (!__atomic_load_n(&mine->interrupted, __ATOMIC_SEQ_CST)
                       && __atomic_load_n(&d->h->rec_epoch, __ATOMIC_SEQ_CST) == epoch) {
                if (np_futex_wait_untimed(&a->wake, w) == EINTR) {
                    __atomic_store_n(&a->sleeping, 0, __ATOMIC_RELAXED);
                    return NP_EINTR;    /* a signal: still queued */
                }
            }
        }
        __atomic_store_n(&a->sleeping, 0, __ATOMIC_RELAXED);
        woken = __atomic_load_n(&a->wake, __ATOMIC_ACQUIRE) != w;
        if (untimed && __atomic_load_n(&mine->interrupted, __ATOMIC_SEQ_CST))
            return NP_EINTR;            /* still queued: Python looks (interrupt_check) */
        if (died) {
            death_checked = 1;          /* once per call: D1 of deathwatch.c */
            np_dw_dead(d, ai, tag, holder - 1, hw, until);
        }
    }
}

int64_t np_interrupt_waits(np_domain *d, int32_t pid)
{
    if (pid <= 0 || pid > (int32_t)NP_PID_MASK)
        return NP_EINVAL;
    NP_ENTER(d);
    int64_t n = 0;
    for (uint32_t p = 0; p < d->nproc; p++) {
        np_proc *s = &d->procs[p];
        uint64_t w = __atomic_load_n(&s->w, __ATOMIC_ACQUIRE);
        /* ALIVE only: registration clears the mark before it is ALIVE, so
         * a mark made meanwhile would be lost; 0 tells the caller to retry */
        if (PW_PID(w) == pid && PW_STATE(w) == NP_PS_ALIVE) {
            __atomic_store_n(&s->interrupted, 1, __ATOMIC_SEQ_CST);    /* A3u */
            np_wake_slot_actors(d, p + 1);
            n++;
        }
    }
    NP_LEAVE(d);
    return n;
}

int64_t np_sem_decrement(np_domain *d, uint64_t handle, int64_t deadline)
{
    NP_ENTER(d);
    int64_t rc = np_i_acquire(d, handle, deadline, NP_KIND_SEM);
    NP_LEAVE(d);
    return rc;
}

int64_t np_mutex_lock(np_domain *d, uint64_t handle, int64_t deadline)
{
    NP_ENTER(d);
    int64_t rc = np_i_acquire(d, handle, deadline, NP_KIND_MUTEX);
    NP_LEAVE(d);
    return rc;
}

int64_t np_fast_sem_decrement(np_domain *d, uint64_t handle, int64_t deadline)
{
    return np_i_acquire(d, handle, deadline, NP_KIND_SEM);
}

int64_t np_fast_mutex_lock(np_domain *d, uint64_t handle, int64_t deadline)
{
    return np_i_acquire(d, handle, deadline, NP_KIND_MUTEX);
}
