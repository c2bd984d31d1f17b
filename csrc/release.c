/*
 * release.c — semaphore increment and mutex unlock (one implementation),
 * leaving a wait queue, and the lock-free reads (get, deltas).
 *
 * Invariants kept here (with A1 of acquire.c and Q1-Q4 of queue.c)
 *  R1 A release puts one unit back into `value' (a mutex: value 1, owner 0;
 *     np_sem_add: n units, in the same one transaction) and wakes the
 *     waiters then entitled, all of them, after releasing the guard; it
 *     never exceeds NP_VALUE_MAX (NP_EOVERFLOW, nothing changed).
 *  R2 A protected delta is revised with saturating arithmetic.
 *  R3 Leaving a queue wakes those who became entitled by it; when the guard
 *     cannot be had within NP_GUARD_SLEEP_NS the caller is marked given up
 *     (Q3) and the call still succeeds: the caller is no longer waiting.
 *  R4 get reads value between two reads of the same generation, so it
 *     belongs to the handle's incarnation.
 *  R5 Ownership: a mutex is unlocked only by a process that holds it (owner
 *     = its slot + 1), or by force; otherwise NP_ENOTHOLDER and nothing
 *     changed (checked under the guard, before anything is logged).
 *  R7 A mutex unlock is first tried on the fast path (mutex_fast.h): one CAS
 *     from {me, open, t} to {0, open, t}; otherwise as above, under the
 *     guard with the path closed.
 *  R6 A token read (np_mutex_token) is lock-free: the token is read before
 *     and after the owner; tokens only grow (T1), so two equal reads around
 *     "owner is me" belong to our hold.
 */
#define _GNU_SOURCE
#include "core_internal.h"

#include <sched.h>
#include <stdlib.h>

/* guard_deadline: NP_NOWAIT (slices: NP_EINTR, call again) or NP_GUARD_TRY
 * (NP_EAGAIN after a few ms: the accelerator, which holds the GIL, then
 * retries through the counted entry point with the GIL released). */
static int64_t release(np_domain *d, uint64_t handle, int kind, int64_t guard_deadline,
                       int force, int64_t units)
{
    uint32_t idx, ai, tag, who[NP_WAKE_BATCH], *wake = who;
    int rc, n = 0;
    if ((rc = handle_obj(d, handle, kind, &idx)) < 0)
        return rc;
    if ((rc = my_actor(d, &ai, &tag)) < 0)
        return rc;
    np_obj *o = &d->objs[idx];
    np_actor *a = &d->actors[ai];
    if (kind == NP_KIND_MUTEX && !force && likely(mx_fast_unlock(d, o, handle_gen(handle)))) {
        /* R7: the fast path (F2): the path was open, so nobody waits. */
        __atomic_store_n(&o->rel_cpu, sched_getcpu(), __ATOMIC_RELAXED);
        return 0;
    }
    if (unlikely((rc = obj_lock(d, o, tag, guard_deadline)) < 0))
        return rc;
    CRASHPOINT();
    if (unlikely(__atomic_load_n(&o->purge, __ATOMIC_RELAXED)))
        np_q_purge(d, a, o);
    if (unlikely(!o->used || o->gen != handle_gen(handle))) {
        obj_unlock(d, o);
        return NP_ESTALE;
    }
    int64_t v = o->value;
    if (kind == NP_KIND_MUTEX && (v != 0 || (!force && o->owner != d->my_proc))) {
        obj_unlock(d, o);                /* R5; free + force: no-op */
        return force ? 0 : NP_ENOTHOLDER;
    }
    if (unlikely(v > (int64_t)NP_VALUE_MAX - units)) {
        obj_unlock(d, o);
        return NP_EOVERFLOW;
    }
    tx_begin(a, idx, 0);
    TX64(d, a, o->value, v + units);
    if (kind == NP_KIND_MUTEX) {
        TX32(d, a, o->owner, 0);
    } else if (o->protected_) {
        np_delta *e = delta_of(d, d->my_proc - 1, idx);
        int64_t cur = e->gen == o->gen ? e->delta : 0;
        TX32(d, a, e->gen, o->gen);
        TX64(d, a, e->delta, sat_add(cur, units));
    }
    tx_commit(d, a);
    if (unlikely(o->qlen)) {
        /* R1: every waiter entitled now (a release of many units may
         * entitle more than a batch; without memory, a batch, and the rest
         * at the end of their slice) */
        int64_t entitled = o->value < (int64_t)o->qlen ? o->value : (int64_t)o->qlen;
        if (entitled > NP_WAKE_BATCH && (wake = malloc((size_t)entitled * sizeof *wake)) != NULL) {
            n = np_q_collect_n(d, o, wake, (int)entitled);
        } else {
            wake = who;
            n = np_q_collect(d, o, who);
        }
    }
    /* relaxed: a hint for spinning waiters, ordered by nothing. */
    __atomic_store_n(&o->rel_cpu, sched_getcpu(), __ATOMIC_RELAXED);
    obj_unlock(d, o);
    CRASHPOINT();
    np_wake_actors(d, wake, n);
    if (wake != who)
        free(wake);
    return kind == NP_KIND_MUTEX ? 0 : v + units;
}

int64_t np_i_release(np_domain *d, uint64_t handle, int kind, int64_t guard_deadline)
{
    return release(d, handle, kind, guard_deadline, 0, 1);
}

int64_t np_i_release_mutex(np_domain *d, uint64_t handle, int64_t guard_deadline, int force)
{
    return release(d, handle, NP_KIND_MUTEX, guard_deadline, force, 1);
}

int64_t np_sem_increment(np_domain *d, uint64_t handle)
{
    NP_ENTER(d);
    int64_t rc = np_i_release(d, handle, NP_KIND_SEM, NP_NOWAIT);
    NP_LEAVE(d);
    return rc;
}

int64_t np_sem_add(np_domain *d, uint64_t handle, int64_t n)
{
    if (n < 1)
        return NP_EINVAL;
    NP_ENTER(d);
    int64_t rc = release(d, handle, NP_KIND_SEM, NP_NOWAIT, 0, n);
    NP_LEAVE(d);
    return rc;
}

int64_t np_mutex_unlock(np_domain *d, uint64_t handle)
{
    NP_ENTER(d);
    int64_t rc = np_i_release(d, handle, NP_KIND_MUTEX, NP_NOWAIT);
    NP_LEAVE(d);
    return rc;
}

int64_t np_mutex_force_unlock(np_domain *d, uint64_t handle)
{
    NP_ENTER(d);
    int64_t rc = release(d, handle, NP_KIND_MUTEX, NP_NOWAIT, 1, 1);
    NP_LEAVE(d);
    return rc;
}

static int64_t mutex_token(np_domain *d, uint64_t handle, int64_t *out)
{
    uint32_t idx, ai, tag;
    int rc;
    if ((rc = handle_obj(d, handle, NP_KIND_MUTEX, &idx)) < 0)
        return rc;
    if ((rc = my_actor(d, &ai, &tag)) < 0)     /* makes d->my_proc valid */
        return rc;
    np_obj *o = &d->objs[idx];
    for (;;) {
        /* acquire on each: R6 (and R4 for the generation). */
        uint32_t g1 = __atomic_load_n(&o->gen, __ATOMIC_ACQUIRE);
        uint64_t t1 = __atomic_load_n(&o->token, __ATOMIC_ACQUIRE);
        uint32_t own = __atomic_load_n(&o->owner, __ATOMIC_ACQUIRE);     /* F4 */
        uint32_t u = __atomic_load_n(&o->used, __ATOMIC_ACQUIRE);
        uint64_t t2 = __atomic_load_n(&o->token, __ATOMIC_ACQUIRE);
        uint32_t g2 = __atomic_load_n(&o->gen, __ATOMIC_ACQUIRE);
        if (!u || g1 != g2 || g1 != handle_gen(handle))
            return NP_ESTALE;
        if (t1 != t2)
            continue;                   /* granted meanwhile: not to us */
        *out = own == d->my_proc ? (int64_t)(t1 & INT64_MAX) : 0;
        return 0;
    }
}

int64_t np_mutex_token(np_domain *d, uint64_t handle, int64_t *out)
{
    NP_ENTER(d);
    int64_t rc = mutex_token(d, handle, out);
    NP_LEAVE(d);
    return rc;
}

int64_t np_fast_sem_increment(np_domain *d, uint64_t handle)
{
    return np_i_release(d, handle, NP_KIND_SEM, NP_GUARD_TRY);
}

int64_t np_fast_mutex_unlock(np_domain *d, uint64_t handle)
{
    return np_i_release(d, handle, NP_KIND_MUTEX, NP_GUARD_TRY);
}

int64_t np_i_wait_cancel(np_domain *d)
{
    uint32_t ai, tag, who[NP_WAKE_BATCH];
    int rc, n = 0;
    if ((rc = my_actor(d, &ai, &tag)) < 0)
        return rc;
    np_actor *a = &d->actors[ai];
    uint32_t w = __atomic_load_n(&a->waiting_on, __ATOMIC_RELAXED);
    if (!w || w > d->nobj)
        return 0;
    np_obj *o = &d->objs[w - 1];
    if (obj_lock(d, o, tag, NP_GUARD_TRY) < 0) {
        np_give_up(o, a);               /* R3 */
        return 0;
    }
    CRASHPOINT();
    if (a->waiting_on == w)
        n = np_q_leave(d, a, ai, o, w, who);
    obj_unlock(d, o);
    CRASHPOINT();
    np_wake_actors(d, who, n);
    return 0;
}

int64_t np_wait_cancel(np_domain *d)
{
    NP_ENTER(d);
    int64_t rc = np_i_wait_cancel(d);
    NP_LEAVE(d);
    return rc;
}

int64_t np_fast_wait_cancel(np_domain *d)
{
    return np_i_wait_cancel(d);
}

static int64_t sem_get(np_domain *d, uint64_t handle)
{
    uint32_t idx;
    int rc;
    if ((rc = handle_obj(d, handle, NP_KIND_SEM, &idx)) < 0)
        return rc;
    np_obj *o = &d->objs[idx];
    /* acquire/acquire: R4. */
    uint32_t g1 = __atomic_load_n(&o->gen, __ATOMIC_ACQUIRE);
    int64_t v = __atomic_load_n(&o->value, __ATOMIC_ACQUIRE);
    uint32_t u = __atomic_load_n(&o->used, __ATOMIC_ACQUIRE);
    uint32_t g2 = __atomic_load_n(&o->gen, __ATOMIC_RELAXED);
    if (!u || g1 != g2 || g1 != handle_gen(handle))
        return NP_ESTALE;
    return v;
}

int64_t np_sem_delta(np_domain *d, uint64_t handle, int32_t pid)
{
    int64_t v;
    int64_t rc = np_sem_delta_of(d, handle, pid, &v);
    return rc < 0 ? rc : v;
}

static int64_t sem_delta_of(np_domain *d, uint64_t handle, int32_t pid, int64_t *out)
{
    uint32_t idx;
    int rc;
    if ((rc = handle_obj(d, handle, NP_KIND_SEM, &idx)) < 0)
        return rc;
    np_obj *o = &d->objs[idx];
    uint32_t gen = handle_gen(handle);
    if (!__atomic_load_n(&o->used, __ATOMIC_ACQUIRE) || o->gen != gen)
        return NP_ESTALE;
    int64_t sum = 0;
    for (uint32_t p = 0; p < d->nproc; p++) {
        uint64_t w = __atomic_load_n(&d->procs[p].w, __ATOMIC_ACQUIRE);
        if (w == 0 || PW_PID(w) != pid)
            continue;
        np_delta *e = delta_of(d, p, idx);
        if (__atomic_load_n(&e->gen, __ATOMIC_RELAXED) == gen)
            sum = sat_add(sum, __atomic_load_n(&e->delta, __ATOMIC_RELAXED));
    }
    *out = sum;
    return 0;
}

int64_t np_sem_get(np_domain *d, uint64_t handle)
{
    NP_ENTER(d);
    int64_t rc = sem_get(d, handle);
    NP_LEAVE(d);
    return rc;
}

int64_t np_sem_delta_of(np_domain *d, uint64_t handle, int32_t pid, int64_t *out)
{
    NP_ENTER(d);
    int64_t rc = sem_delta_of(d, handle, pid, out);
    NP_LEAVE(d);
    return rc;
}
