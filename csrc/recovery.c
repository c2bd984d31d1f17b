/*
 * recovery.c — recover(pid): give back what a dead process held.
 *
 * A process slot is a small state machine, every transition one CAS of its
 * word (core_internal.h):
 *
 *   FREE -> REGISTERING -> ALIVE                      (identity.c, S1)
 *   ALIVE/REGISTERING --(process certainly dead)--> RECOVERING(me)
 *   RECOVERING(r) --(r certainly dead, or r = 0)--> RECOVERING(me)   steal
 *   RECOVERING(me) --(could not finish by the deadline)--> RECOVERING(0)
 *   RECOVERING(me) --(body done)--> FREE
 *
 * The body, run only by the slot's current claimant:
 *   1. wait-free: take over every guard an actor of the slot holds, redoing
 *      the intents that cover it (tx.c, T1), and settle any intent of its
 *      actors still valid under a guard some dead recoverer took over;
 *   2. revert its protected deltas of the current generation, clamped to
 *      [0, NP_VALUE_MAX] (saturating: a value near the maximum is not reset);
 *   3. unlock the mutexes it owns;
 *   4. take its actors and its async records out of the queues they wait in;
 *   5. free its actors and records (incarnation bumped first, I3), then the slot.
 * Steps 1, 4 and 5 look only at the dead process's actors, listed by one
 * pass over the actor table (list_actors: the table, async records
 * included, is most of the work of a recovery).
 * Steps 2-4 are ordinary guarded transactions of the claimant, with its own
 * redo log, so a claimant that dies is like any dead process: its guards are
 * taken over by whoever needs them (T1) and the slot it claimed is stolen,
 * because its recoverer id (actor + incarnation, I3) is dead.  Every step is
 * idempotent, so a stolen body simply runs again.
 *
 * Invariants kept here
 *  V1 No cycle: nothing here waits for another recovery to finish.  Guards of
 *     the dead are taken over in place; the only waits are for guards held by
 *     live processes, and they honour the caller's deadline.
 *  V2 A claimant that cannot finish by its deadline (a guard held by a
 *     stopped process) unclaims the slot (recoverer 0) and reports
 *     NP_EAGAIN: anyone may finish it later; nothing is lost meanwhile.
 *  V3 Only a certainly dead process's slot is claimed (I4); "cannot tell"
 *     reports NP_EAGAIN.
 *  V4 Exclusive: one claimant at a time, so step 5 never frees an actor or
 *     slot that a new process has taken since.  The claim is a CAS from the
 *     exact word whose process was judged dead; that word carries the slot's
 *     generation, so a slot freed and taken again meanwhile (even by the same
 *     pid) is never claimed on the strength of the old judgement.
 */
#define _GNU_SOURCE
#include "core_internal.h"

/* value - delta, clamped to [0, NP_VALUE_MAX], without signed overflow */
static int64_t revert(int64_t value, int64_t delta)
{
    int64_t r;
    if (__builtin_sub_overflow(value, delta, &r))
        return delta < 0 ? (int64_t)NP_VALUE_MAX : 0;
    return r < 0 ? 0 : r;
}

/* The actors of slot p that steps 1, 4 and 5 look at.  Once p's process
 * is dead nothing makes an actor p's (actors are claimed only by their own
 * process, for its own slot: S2 of identity.c), so one pass over the table
 * lists every actor those steps could act on, and each step still checks
 * the actor is p's when it acts, as before.  Listed only for a dead
 * process's slot and up to NP_REC_LIST actors; otherwise (our own slot, at
 * close: our other threads may still claim) each step scans the table. */
#define NP_REC_LIST 256
#define NP_REC_UNTIMED 64
struct p_actors {
    int listed;
    uint32_t n;
    uint32_t x[NP_REC_LIST];
    int nu;                             /* -1: too many, wake by a scan */
    uint32_t u[NP_REC_UNTIMED];         /* actors asleep without a timeout (Q6) */
};

/* The same pass notes who sleeps without a timeout (Q6 of queue.c: the
 * dead process may have owed it a wake-up); rec_epoch is bumped first. */
static void list_actors(np_domain *d, uint32_t p, int dead, struct p_actors *l)
{
    l->listed = 0;
    l->n = 0;
    l->nu = -1;
    if (!dead)
        return;
    __atomic_add_fetch(&d->h->rec_epoch, 1, __ATOMIC_SEQ_CST);
    if (p + 1 == d->my_proc)
        return;
    uint32_t n = 0;
    int nu = 0;
    for (uint32_t x = 0; x < d->nall; x++) {
        if (x + 8 < d->nall)
            __builtin_prefetch(&d->actors[x + 8].proc);
        np_actor *ax = &d->actors[x];
        if (__atomic_load_n(&ax->sleeping, __ATOMIC_SEQ_CST) == NP_SLEEP_UNTIMED) {
            if (nu == NP_REC_UNTIMED)
                nu = -1;
            else if (nu >= 0)
                l->u[nu++] = x;
        }
        if (x == d->ractor || __atomic_load_n(&ax->proc, __ATOMIC_ACQUIRE) != p + 1)
            continue;
        if (n == NP_REC_LIST)
            return;
        l->x[n++] = x;
    }
    l->n = n;
    l->nu = nu;
    l->listed = 1;
}

/* The k-th actor to look at, of pa_count(l, hi) (hi: the table's end). */
static inline uint32_t pa_count(const struct p_actors *l, uint32_t hi)
{
    return l->listed ? l->n : hi;
}

static inline uint32_t pa_at(const struct p_actors *l, uint32_t k)
{
    return l->listed ? l->x[k] : k;
}

static int recover_body(np_domain *d, uint32_t me, uint32_t tag, uint32_t p, int dead,
                        int64_t deadline)
{
    np_actor *a = &d->actors[me];
    uint32_t who[NP_WAKE_BATCH];
    int n, rc;
    struct p_actors pa;
    list_actors(d, p, dead, &pa);

    /* (1) guards held by the dead process's actors, and their intents */
    for (uint32_t g = 0; g <= d->nobj; g++) {
        uint32_t v = __atomic_load_n(guard_word(d, g), __ATOMIC_ACQUIRE);
        uint32_t x1 = v & NP_TAG_ACTOR;
        if (!v || x1 == 0 || x1 > d->nact + 1 || (v & NP_GUARD_TAG) == tag)
            continue;
        if (__atomic_load_n(&d->actors[x1 - 1].proc, __ATOMIC_ACQUIRE) != p + 1)
            continue;
        np_guard_takeover(d, g, v, tag);
    }
    for (uint32_t k = 0, x; k < pa_count(&pa, d->nact); k++)
        if ((x = pa_at(&pa, k)) < d->nact && x != me
            && __atomic_load_n(&d->actors[x].proc, __ATOMIC_ACQUIRE) == p + 1
            && (rc = np_settle_intent(d, x, tag, deadline)) < 0)
            return rc;

    /* (2) protected deltas */
    for (uint32_t i = 0; i < d->nsem; i++) {
        np_delta *e = delta_of(d, p, i);
        if (__atomic_load_n(&e->delta, __ATOMIC_RELAXED) == 0)
            continue;
        np_obj *o = &d->objs[i];
        if ((rc = obj_lock(d, o, tag, deadline)) < 0)
            return rc;
        CRASHPOINT();
        if (o->purge)
            np_q_purge(d, a, o);
        n = 0;
        tx_begin(a, i, 0);
        if (o->used && e->gen == o->gen && e->delta) {
            int64_t v = revert(o->value, e->delta);
            TX64(d, a, o->value, v);
            if (v > o->value)
                n = -1;
        }
        TX64(d, a, e->delta, 0);
        tx_commit(d, a);
        if (n < 0)
            n = np_q_collect(d, o, who);
        obj_unlock(d, o);
        CRASHPOINT();
        np_wake_actors(d, who, n);
    }

    /* (3) mutexes owned by the dead process */
    for (uint32_t i = d->nsem; i < d->nobj; i++) {
        np_obj *o = &d->objs[i];
        if (__atomic_load_n(&o->owner, __ATOMIC_RELAXED) != p + 1)
            continue;
        if ((rc = obj_lock(d, o, tag, deadline)) < 0)
            return rc;
        CRASHPOINT();
        n = 0;
        if (o->used && o->owner == p + 1) {
            tx_begin(a, i, 0);
            TX64(d, a, o->value, 1);
            TX32(d, a, o->owner, 0);
            tx_commit(d, a);
            n = np_q_collect(d, o, who);
        }
        obj_unlock(d, o);
        CRASHPOINT();
        np_wake_actors(d, who, n);
    }

    /* (4) waits of the dead process: its threads' and its async records' */
    for (uint32_t k = 0; k < pa_count(&pa, d->nall); k++) {
        uint32_t x = pa_at(&pa, k);
        np_actor *ax = &d->actors[x];
        if (x == me || __atomic_load_n(&ax->proc, __ATOMIC_ACQUIRE) != p + 1)
            continue;
        uint32_t w = __atomic_load_n(&ax->waiting_on, __ATOMIC_RELAXED);
        if (!w || w > d->nobj)
            continue;
        np_obj *o = &d->objs[w - 1];
        if ((rc = obj_lock(d, o, tag, deadline)) < 0)
            return rc;
        CRASHPOINT();
        n = 0;
        if (ax->waiting_on == w) {
            tx_begin(a, w - 1, 0);
            if (o->used && ax->wait_gen == o->gen)
                np_tx_q_remove(d, a, o, x);
            else
                TX32(d, a, ax->waiting_on, 0);
            tx_commit(d, a);
            if (o->used && o->value > 0)
                n = np_q_collect(d, o, who);
        }
        obj_unlock(d, o);
        CRASHPOINT();
        np_wake_actors(d, who, n);
    }

    /* (4b) Q6: wake whoever sleeps without a timeout, in case p owed it */
    if (dead)
        np_wake_untimed(d, pa.nu >= 0 ? pa.u : NULL, pa.nu);

    /* (5) free the actors (ours last when we leave our own slot); a purge
     * freeing an orphan of ours at the same time: one CAS wins (S2) */
    for (uint32_t k = 0; k < pa_count(&pa, d->nall); k++) {
        uint32_t x = pa_at(&pa, k);
        if (x == d->ractor)
            continue;                   /* the reserve is freed by its own path */
        uint64_t own = __atomic_load_n(&d->actors[x].own, __ATOMIC_ACQUIRE);
        if (x != me && (uint32_t)own == p + 1)
            np_free_actor(d, x, own);
    }
    return 0;
}

/* dead: p's process is certainly dead (not np_leave_slot's own slot). */
static int run_claimed(np_domain *d, uint32_t me, uint32_t tag, uint32_t p, uint64_t w,
                       int dead, int64_t deadline)
{
    CRASHPOINT();
    int rc = recover_body(d, me, tag, p, dead, deadline);
    if (rc < 0) {
        /* V2: leave it for anyone to finish. */
        uint64_t open = PW_MAKE(PW_PID(w), NP_PS_RECOVERING, 0);
        __atomic_compare_exchange_n(&d->procs[p].w, &w, open, 0,
                                    __ATOMIC_RELEASE, __ATOMIC_RELAXED);
        CRASHPOINT();
        return NP_EAGAIN;
    }
    uint64_t own = __atomic_load_n(&d->actors[me].own, __ATOMIC_ACQUIRE);
    if ((uint32_t)own == p + 1)
        np_free_actor(d, me, own);      /* leaving our own slot */
    /* release: everything above precedes the slot's reuse. */
    __atomic_compare_exchange_n(&d->procs[p].w, &w, 0, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
    CRASHPOINT();
    return 1;
}

int np_recover_slot(np_domain *d, uint32_t me, uint32_t tag, uint32_t p, int64_t deadline)
{
    np_proc *s = &d->procs[p];
    uint64_t mine = actor_rec(me, __atomic_load_n(&d->actors[me].inc, __ATOMIC_RELAXED)), w;
    for (;;) {
        w = __atomic_load_n(&s->w, __ATOMIC_ACQUIRE);
        int32_t pid = PW_PID(w);
        int st;
        if (w == 0)
            return 0;
        switch (PW_STATE(w)) {
        case NP_PS_ALIVE:
        case NP_PS_REGISTERING:
            st = np_slot_word_state(d, p, w);
            break;
        case NP_PS_RECOVERING:
            if (PW_REC(w) == mine)
                return run_claimed(d, me, tag, p, w, 1, deadline);  /* resume */
            st = np_rec_state(d, PW_REC(w));
            if (st == NP_ALIVE)
                return NP_EAGAIN;       /* another live recoverer is at it */
            break;
        default:
            return 0;
        }
        if (st == NP_ALIVE)
            return 0;
        if (st == NP_UNKNOWN)
            return NP_EAGAIN;           /* V3 */
        uint64_t claimed = PW_MAKE(pid, NP_PS_RECOVERING, mine);
        CRASHPOINT();                   /* judged dead, not claimed yet */
        /* acquire: pairs with the release stores of the slot's last owner. */
        if (__atomic_compare_exchange_n(&s->w, &w, claimed, 0,
                                        __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            return run_claimed(d, me, tag, p, claimed, 1, deadline);
    }
}

/* The caller has judged slot p's process dead (I4) as of word w: claim the
 * slot by a CAS from that exact word (V4) without judging again -- the
 * judgement may have cost several reads (L1 of liveness.c).  A word that
 * changed meanwhile (recovered, being recovered, taken again) goes the
 * ordinary way, which judges afresh. */
int np_recover_judged(np_domain *d, uint32_t me, uint32_t tag, uint32_t p, uint64_t w,
                      int64_t deadline)
{
    if (PW_STATE(w) == NP_PS_ALIVE) {
        uint64_t mine = actor_rec(me, __atomic_load_n(&d->actors[me].inc, __ATOMIC_RELAXED));
        uint64_t claimed = PW_MAKE(PW_PID(w), NP_PS_RECOVERING, mine);
        CRASHPOINT();                   /* judged dead, not claimed yet */
        /* acquire: pairs with the release stores of the slot's last owner. */
        if (__atomic_compare_exchange_n(&d->procs[p].w, &w, claimed, 0,
                                        __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            return run_claimed(d, me, tag, p, claimed, 1, deadline);
    }
    return np_recover_slot(d, me, tag, p, deadline);
}

/* The caller's own slot p: give back what it holds and free it (close). */
int np_leave_slot(np_domain *d, uint32_t me, uint32_t tag, uint32_t p, int64_t deadline)
{
    np_proc *s = &d->procs[p];
    uint64_t w = __atomic_load_n(&s->w, __ATOMIC_ACQUIRE);
    if (PW_STATE(w) != NP_PS_ALIVE || PW_PID(w) != (np_my_pid & (int32_t)NP_PID_MASK))
        return 0;
    uint64_t mine = actor_rec(me, __atomic_load_n(&d->actors[me].inc, __ATOMIC_RELAXED));
    uint64_t claimed = PW_MAKE(PW_PID(w), NP_PS_RECOVERING, mine);
    if (!__atomic_compare_exchange_n(&s->w, &w, claimed, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return 0;
    return run_claimed(d, me, tag, p, claimed, 0, deadline);
}

int np_recover_all_dead(np_domain *d, uint32_t me, uint32_t tag, int64_t deadline)
{
    int n = 0;
    for (uint32_t p = 0; p < d->nproc; p++)
        if (__atomic_load_n(&d->procs[p].w, __ATOMIC_RELAXED) != 0
            && np_recover_slot(d, me, tag, p, deadline) == 1)
            n++;
    return n;
}

int64_t np_recover(np_domain *d, int32_t pid, int64_t deadline)
{
    uint32_t me, tag;
    int rc, incomplete = 0;
    int64_t count = 0;
    if (pid <= 0 || pid > (int32_t)NP_PID_MASK)
        return NP_EINVAL;
    NP_ENTER(d);
    if ((rc = my_actor(d, &me, &tag)) < 0) {
        NP_LEAVE(d);
        return rc;
    }
    for (uint32_t p = 0; p < d->nproc; p++) {
        uint64_t w = __atomic_load_n(&d->procs[p].w, __ATOMIC_ACQUIRE);
        if (w && PW_PID(w) == pid) {
            rc = np_recover_slot(d, me, tag, p, deadline);
            if (rc < 0)
                incomplete = 1;
            else
                count += rc;
        }
    }
    /* Waiters that gave up behind a stopped process, and orphans (queue.c). */
    np_purge_orphans(d, me, tag, deadline);
    /* A process that died while reclaiming a full table (identity.c, S3). */
    rc = np_reserve_recover(d, me, tag, pid, deadline);
    if (rc < 0)
        incomplete = 1;
    else
        count += rc;
    /* Finish recoveries whose recoverer died or gave up (V2). */
    for (uint32_t p = 0; p < d->nproc; p++) {
        uint64_t w = __atomic_load_n(&d->procs[p].w, __ATOMIC_ACQUIRE);
        if (PW_STATE(w) == NP_PS_RECOVERING) {
            rc = np_recover_slot(d, me, tag, p, deadline);
            if (rc < 0 && PW_PID(w) == pid)
                incomplete = 1;
            else if (rc > 0)
                count += rc;
        }
    }
    NP_LEAVE(d);
    return incomplete ? NP_EAGAIN : count;
}
