/*
 * identity.c — who is acting: process slots, actors, the thread cache.
 *
 * A process takes a slot (pid + start time) on first use of a domain, and
 * each of its threads an actor (the unit that holds guards, writes redo logs
 * and waits in queues).  A thread finds its actor through a small thread-
 * local cache, most recently used first; fork() invalidates the whole cache
 * (np_fork_epoch) so a child registers itself.
 *
 * Invariants kept here
 *  S1 A slot goes FREE -> REGISTERING -> ALIVE by its own process, with one
 *     CAS and two stores; start_time is stored before ALIVE is published.  A
 *     process dead in REGISTERING owns no actor yet.
 *  S2 (I3) An actor is claimed by one CAS of its 64-bit word (slot + 1,
 *     incarnation) from (0, i) to (slot + 1, i) and freed by one CAS from
 *     (slot + 1, i) to (0, i + 1): its tags and recoverer ids name that
 *     incarnation only, and whoever frees it (its thread, recovery, a purge)
 *     does so exactly once.  A freed actor holds no guard, has no valid
 *     intent and is in no queue; the claimant initialises its fields.
 *  S3 Recovery never needs a free entry: the creator is registered at
 *     create; a process that finds the process or actor table full enters the
 *     reserve (slot `processes', actor `actors'), recovers every dead slot
 *     from there, leaves the reserve and tries again.  One process at a time
 *     is in the reserve; a dead one's reserve is adopted by the next, after
 *     its guards and intent are settled (T2 in tx.c).
 *  S4 The thread cache evicts its least recently used entry, and frees the
 *     evicted actor if it waits nowhere (its domain still open).
 */
#define _GNU_SOURCE
#include "core_internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

uint64_t np_fork_epoch = 1;
static uint64_t self_epoch;            /* epoch np_my_pid/np_my_start belong to */
int32_t  np_my_pid;
uint64_t np_my_start;
uint64_t np_my_pidns;
__thread np_tcache np_tc[NP_TCACHE];

static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t  init_once = PTHREAD_ONCE_INIT;
pthread_mutex_t np_dom_mu = PTHREAD_MUTEX_INITIALIZER;
np_domain *np_dom_list;
static pthread_key_t exit_key;

/* Under np_dom_mu: d is mapped and not being closed (np_domain_close sets
 * `closing' under the same mutex, so a thread freeing its cached actor of d
 * never races with close freeing it too). */
static int domain_open(np_domain *d, uint64_t serial)
{
    for (np_domain *x = np_dom_list; x; x = x->next)
        if (x == d && x->serial == serial)
            return !__atomic_load_n(&x->closing, __ATOMIC_RELAXED);
    return 0;
}

static void thread_exit(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&np_dom_mu);
    for (int i = 0; i < NP_TCACHE; i++) {
        np_tcache *c = &np_tc[i];
        if (c->d && c->epoch == np_fork_epoch && domain_open(c->d, c->serial)
                && np_thread_detach(c->d) == 0)
            i = -1;                     /* the entries moved up: start again */
    }
    pthread_mutex_unlock(&np_dom_mu);
}

static void atfork_child(void)
{
    np_fork_epoch++;
    pthread_mutex_init(&reg_mu, NULL);
    pthread_mutex_init(&np_dom_mu, NULL);
    np_test_disarm();
}

static void do_init(void)
{
    pthread_atfork(NULL, NULL, atfork_child);
    pthread_key_create(&exit_key, thread_exit);
}

void np_identity_init(void)
{
    pthread_once(&init_once, do_init);
    np_test_read_env();
}

/* /proc read failing (EMFILE): start 0 = "unknown", compared by pid only
 * (conservative: a recycled pid then looks alive, never the reverse). */
static uint64_t read_my_start(void)
{
    char path[64], buf[1024];
    uint64_t s = 0;
    snprintf(path, sizeof path, "/proc/self/stat");
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ')
        return 0;
    p += 2;
    for (int fld = 3; fld < 22 && p; fld++) {
        p = strchr(p, ' ');
        if (p)
            p++;
    }
    if (p)
        s = strtoull(p, NULL, 10);
    return s;
}

/* The pid namespace: pids (and start times) compare only within one. */
static uint64_t read_my_pidns(void)
{
    struct stat st;
    return stat("/proc/self/ns/pid", &st) == 0 ? (uint64_t)st.st_ino : 0;
}

void np_ensure_self(void)
{
    if (self_epoch != np_fork_epoch) {
        np_my_pid = getpid();
        np_my_start = read_my_start();
        np_my_pidns = read_my_pidns();
        self_epoch = np_fork_epoch;
    }
}

/* Register in slot p (free, or dead and adopted by the caller: `expect').
 * S1; the word carries a new generation (no ABA on the slot). */
static int take_slot(np_domain *d, uint32_t p, uint64_t expect)
{
    np_proc *s = &d->procs[p];
    uint64_t g = (__atomic_load_n(&s->gen, __ATOMIC_RELAXED) + 1) & NP_SLOT_GEN_MASK;
    if (g == 0)
        g = 1;
    uint64_t reg = PW_MAKE(np_my_pid, NP_PS_REGISTERING, np_my_pidns & NP_SLOT_GEN_MASK);
    /* acquire: we now own the slot; whoever freed it is done with it. */
    if (!__atomic_compare_exchange_n(&s->w, &expect, reg, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return 0;
    CRASHPOINT();
    __atomic_store_n(&s->gen, g, __ATOMIC_RELAXED);
    __atomic_store_n(&s->start_time, np_my_start, __ATOMIC_RELAXED);
    __atomic_store_n(&s->pidns, np_my_pidns, __ATOMIC_RELAXED);
    __atomic_store_n(&s->death, 0, __ATOMIC_RELAXED);  /* D2 (deathwatch.c) */
    __atomic_store_n(&s->interrupted, 0, __ATOMIC_RELAXED);    /* A3 (acquire.c) */
    CRASHPOINT();
    /* release: start_time and pidns are visible to whoever sees ALIVE.  A
     * REGISTERING slot is judged only within its namespace, and by its pid,
     * which exists while we live: nobody takes it from us meanwhile. */
    if (!__atomic_compare_exchange_n(&s->w, &reg, PW_MAKE(np_my_pid, NP_PS_ALIVE, g), 0,
                                     __ATOMIC_RELEASE, __ATOMIC_RELAXED))
        return 0;
    CRASHPOINT();
    return 1;
}

/* Claim a free actor for slot p (+1); the caller's thread.  S2. */
static int claim_actor(np_domain *d, uint32_t lo, uint32_t hi, uint32_t mp, uint32_t *out)
{
    for (uint32_t a = lo; a < hi; a++) {
        np_actor *x = &d->actors[a];
        if (!entry_claim(x, mp))
            continue;
        CRASHPOINT();
        x->tid = (int32_t)syscall(SYS_gettid);
        entry_reset(x);
        CRASHPOINT();
        *out = a;
        return 1;
    }
    return 0;
}

int np_free_actor(np_domain *d, uint32_t x, uint64_t own)
{
    np_actor *ax = &d->actors[x];
    if ((uint32_t)own == 0)
        return 0;
    uint64_t freed = (own >> 32) + 1 == 0 ? 0 : ((own >> 32) + 1) << 32;
    /* release: our last writes precede the actor's reuse; the incarnation
     * ends in the same CAS (I3, S2). */
    if (!__atomic_compare_exchange_n(&ax->own, &own, freed, 0, __ATOMIC_RELEASE,
                                     __ATOMIC_RELAXED))
        return 0;
    CRASHPOINT();
    return 1;
}

/* ---- the reserve (S3) ---- */

/* Is the reserve's holder certainly gone?  A reserve being cleaned up by a
 * live recoverer (RECOVERING) is not. */
static int reserve_dead(np_domain *d, uint64_t w)
{
    if (PW_STATE(w) == NP_PS_RECOVERING)
        return np_rec_state(d, PW_REC(w)) == NP_DEAD;
    return np_slot_state(d, d->rslot) == NP_DEAD;
}

/* End the reserve actor's current incarnation and settle what its old tag
 * still holds (T2), acting as `tag' (whose guards these become). */
static int reserve_settle(np_domain *d, uint32_t tag, int64_t deadline, uint64_t *own)
{
    uint32_t A = d->ractor;
    np_actor *x = &d->actors[A];
    uint64_t o = __atomic_load_n(&x->own, __ATOMIC_ACQUIRE), next;
    do {                                /* end the old incarnation: (R+1, i) -> (R+1, i+1) */
        next = (uint32_t)o | ((uint64_t)((uint32_t)(o >> 32) + 1) << 32);
    } while (!__atomic_compare_exchange_n(&x->own, &o, next, 0, __ATOMIC_ACQ_REL,
                                          __ATOMIC_ACQUIRE));
    *own = next;
    uint32_t old = actor_tag(A, (uint32_t)(o >> 32));
    CRASHPOINT();
    for (uint32_t g = 0; g <= d->nobj; g++) {
        uint32_t v = __atomic_load_n(guard_word(d, g), __ATOMIC_ACQUIRE);
        if (v && (v & NP_GUARD_TAG) == old)
            np_guard_takeover(d, g, v, tag);
    }
    int rc;
    while ((rc = np_settle_intent(d, A, tag, deadline)) == NP_EINTR)
        ;
    return rc;
}

/* Enter the reserve: its slot and actor become the caller's.  0, or
 * NP_ENOSPC_PROC when another live process keeps it past the deadline. */
int np_reserve_enter(np_domain *d, uint32_t *actor, uint32_t *tag, int64_t deadline)
{
    uint32_t R = d->rslot, A = d->ractor;
    np_proc *s = &d->procs[R];
    for (;;) {
        uint64_t w = __atomic_load_n(&s->w, __ATOMIC_ACQUIRE);
        if (w == 0) {
            if (take_slot(d, R, 0))
                break;
            continue;
        }
        if (reserve_dead(d, w)) {
            if (take_slot(d, R, w))     /* adopt a dead process's reserve */
                break;
            continue;
        }
        if (np_now() >= deadline)
            return NP_ENOSPC_PROC;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    np_actor *x = &d->actors[A];
    uint64_t o = __atomic_load_n(&x->own, __ATOMIC_ACQUIRE), mine_own;
    if ((uint32_t)o != 0) {
        /* A dead predecessor's actor (it belongs to the reserve slot, which
         * we now hold): its record becomes ours once what its old
         * incarnation holds is settled, under our new incarnation. */
        uint32_t mine = actor_tag(A, (uint32_t)(o >> 32) + 1);
        if (reserve_settle(d, mine, deadline, &mine_own) < 0)
            return NP_ENOSPC_PROC;
    } else {
        if (!__atomic_compare_exchange_n(&x->own, &o, o | (R + 1), 0, __ATOMIC_ACQUIRE,
                                         __ATOMIC_RELAXED))
            return NP_ENOSPC_PROC;      /* cannot happen: the slot is ours */
        CRASHPOINT();
    }
    x->tid = (int32_t)syscall(SYS_gettid);
    x->qnext = 0;
    x->waiting_on = 0;
    x->intent_n = 0;
    *actor = A;
    *tag = actor_tag(A, x->inc);
    return 0;
}

/* recover(pid) of a process that died in the reserve: the caller (me, tag)
 * claims the reserve slot, settles its actor and frees both.  1 done, 0
 * nothing to do, NP_EAGAIN could not finish now. */
int np_reserve_recover(np_domain *d, uint32_t me, uint32_t tag, int32_t pid, int64_t deadline)
{
    np_proc *s = &d->procs[d->rslot];
    uint64_t w = __atomic_load_n(&s->w, __ATOMIC_ACQUIRE);
    if (w == 0 || PW_PID(w) != pid)
        return 0;
    if (!reserve_dead(d, w))
        return PW_STATE(w) == NP_PS_RECOVERING ? NP_EAGAIN : 0;
    uint64_t claimed = PW_MAKE(pid, NP_PS_RECOVERING,
                               actor_rec(me, __atomic_load_n(&d->actors[me].inc, __ATOMIC_RELAXED)));
    if (!__atomic_compare_exchange_n(&s->w, &w, claimed, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return NP_EAGAIN;
    CRASHPOINT();
    if (__atomic_load_n(&d->actors[d->ractor].proc, __ATOMIC_ACQUIRE) != 0) {
        uint64_t own;
        if (reserve_settle(d, tag, deadline, &own) < 0) {
            uint64_t open = PW_MAKE(pid, NP_PS_RECOVERING, 0);
            __atomic_compare_exchange_n(&s->w, &claimed, open, 0, __ATOMIC_RELEASE,
                                        __ATOMIC_RELAXED);
            return NP_EAGAIN;
        }
        np_free_actor(d, d->ractor, own);
    }
    /* release: everything above precedes the reserve's reuse. */
    __atomic_compare_exchange_n(&s->w, &claimed, 0, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
    CRASHPOINT();
    return 1;
}

void np_reserve_leave(np_domain *d)
{
    uint32_t R = d->rslot;
    np_free_actor(d, d->ractor, __atomic_load_n(&d->actors[d->ractor].own, __ATOMIC_ACQUIRE));
    uint64_t w = __atomic_load_n(&d->procs[R].w, __ATOMIC_RELAXED);
    /* release: everything done from the reserve precedes its reuse. */
    __atomic_compare_exchange_n(&d->procs[R].w, &w, 0, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
    CRASHPOINT();
}

/* The table is full: recover every dead slot from the reserve.  The number
 * recovered, or a negative code. */
static int reclaim(np_domain *d)
{
    uint32_t a, tag;
    int64_t deadline = np_now() + NP_RECLAIM_NS;
    int rc = np_reserve_enter(d, &a, &tag, deadline);
    if (rc < 0)
        return rc;
    int n = np_recover_all_dead(d, a, tag, deadline);
    n += np_purge_orphans(d, a, tag, deadline);
    np_reserve_leave(d);
    return n;
}

static int register_process(np_domain *d)
{
    for (int attempt = 0; attempt < 2; attempt++) {
        for (uint32_t p = 0; p < d->nproc; p++)
            if (__atomic_load_n(&d->procs[p].w, __ATOMIC_RELAXED) == 0 && take_slot(d, p, 0)) {
                d->my_proc = p + 1;
                d->my_epoch = np_fork_epoch;
                np_dw_start(d, p);      /* D2: before we can own anything */
                return 0;
            }
        /* S3: look again even if this reclaim found nobody dead: another
         * registrant's, which we waited for in the reserve, may have freed
         * slots (what it freed is not ours to count) */
        if (attempt == 0 && reclaim(d) < 0)
            break;
    }
    return NP_ENOSPC_PROC;
}

static void tcache_put(np_domain *d, uint32_t a, uint32_t tag)
{
    int i;
    /* A free or stale entry, else the least recently used one that waits
     * nowhere (S4). */
    for (i = 0; i < NP_TCACHE; i++)
        if (!np_tc[i].d || np_tc[i].epoch != np_fork_epoch)
            break;
    if (i == NP_TCACHE) {
        pthread_mutex_lock(&np_dom_mu);
        for (int j = NP_TCACHE - 1; j > 0; j--) {
            np_tcache *c = &np_tc[j];
            if (!domain_open(c->d, c->serial)) {
                memset(c, 0, sizeof *c);    /* closed: nothing to free */
                break;
            }
            np_actor *x = &c->d->actors[c->actor];
            if (!__atomic_load_n(&x->waiting_on, __ATOMIC_RELAXED)
                    && np_thread_detach(c->d) == 0)
                break;                      /* freed; its entry is gone */
        }
        pthread_mutex_unlock(&np_dom_mu);
        for (i = 0; i < NP_TCACHE; i++)
            if (!np_tc[i].d || np_tc[i].epoch != np_fork_epoch)
                break;
        if (i == NP_TCACHE)
            i = NP_TCACHE - 1;              /* all wait: forget the oldest */
    }
    /* Most recent first: the inline fast path only looks at entry 0. */
    memmove(&np_tc[1], &np_tc[0], sizeof np_tc[0] * (size_t)i);
    np_tc[0].d = d;
    np_tc[0].serial = d->serial;
    np_tc[0].epoch = np_fork_epoch;
    np_tc[0].actor = a;
    np_tc[0].tag = tag;
}

NOINLINE int np_my_actor_slow(np_domain *d, uint32_t *out, uint32_t *tag)
{
    int i, rc = 0;
    for (i = 1; i < NP_TCACHE; i++) {
        np_tcache *c = &np_tc[i];
        if (c->d == d && c->serial == d->serial && c->epoch == np_fork_epoch) {
            np_tcache hit = *c;
            memmove(&np_tc[1], &np_tc[0], sizeof np_tc[0] * (size_t)i);
            np_tc[0] = hit;
            *out = hit.actor;
            *tag = hit.tag;
            return 0;
        }
    }
    np_identity_init();
    pthread_mutex_lock(&reg_mu);
    np_ensure_self();
    if (!(d->my_epoch == np_fork_epoch && d->my_proc) && (rc = register_process(d)) < 0)
        goto out;
    uint32_t a;
    if (!claim_actor(d, 0, d->nact, d->my_proc, &a)) {
        if (reclaim(d) < 0 || !claim_actor(d, 0, d->nact, d->my_proc, &a)) {     /* S3, as above */
            rc = NP_ENOSPC_ACT;
            goto out;
        }
    }
    *out = a;
    *tag = actor_tag(a, d->actors[a].inc);
    tcache_put(d, a, *tag);
    pthread_setspecific(exit_key, (void *)1);   /* run thread_exit */
out:
    pthread_mutex_unlock(&reg_mu);
    return rc;
}

int64_t np_register(np_domain *d)
{
    uint32_t a, t;
    NP_ENTER(d);
    int rc = my_actor(d, &a, &t);
    NP_LEAVE(d);
    return rc;
}

/* Forget d in this thread's cache (without freeing anything). */
void np_tcache_drop(np_domain *d)
{
    for (int i = 0; i < NP_TCACHE; i++)
        if (np_tc[i].d == d) {
            memmove(&np_tc[i], &np_tc[i + 1], sizeof np_tc[0] * (size_t)(NP_TCACHE - 1 - i));
            memset(&np_tc[NP_TCACHE - 1], 0, sizeof np_tc[0]);
            i--;
        }
}

int64_t np_thread_detach(np_domain *d)
{
    for (int i = 0; i < NP_TCACHE; i++) {
        np_tcache *c = &np_tc[i];
        if (c->d == d && c->serial == d->serial && c->epoch == np_fork_epoch) {
            np_actor *x = &d->actors[c->actor];
            uint32_t a = c->actor;
            if (__atomic_load_n(&x->waiting_on, __ATOMIC_RELAXED))
                np_i_wait_cancel(d);
            if (__atomic_load_n(&x->waiting_on, __ATOMIC_RELAXED)) {
                np_abandon_actor(d, a);     /* Q5: freed by whoever purges it */
                return 0;
            }
            np_tcache_drop(d);
            np_free_actor(d, a, __atomic_load_n(&x->own, __ATOMIC_ACQUIRE));
            return 0;
        }
    }
    return 0;
}

/* Q5 (queue.c): the calling thread leaves actor x, still queued and marked
 * cancel_pending, to whoever purges it; the thread forgets it, so its next
 * call claims a fresh actor. */
void np_abandon_actor(np_domain *d, uint32_t x)
{
    np_actor *ax = &d->actors[x];
    for (int i = 0; i < NP_TCACHE; i++)
        if (np_tc[i].d == d && np_tc[i].actor == x) {
            memmove(&np_tc[i], &np_tc[i + 1], sizeof np_tc[0] * (size_t)(NP_TCACHE - 1 - i));
            memset(&np_tc[NP_TCACHE - 1], 0, sizeof np_tc[0]);
            break;
        }
    /* seq_cst: against the purge (np_release_orphan) */
    __atomic_store_n(&ax->orphan, orphan_mark(ax->inc), __ATOMIC_SEQ_CST);
    np_release_orphan(d, x);            /* purged meanwhile: free it ourselves */
}

/* Free actor x if it is an orphan no longer queued.  Several may try (its
 * thread, a purge, the supervisor); the CAS of np_free_actor lets exactly
 * one succeed, and a recovery that freed it first makes the others fail. */
int np_release_orphan(np_domain *d, uint32_t x)
{
    np_actor *ax = &d->actors[x];
    uint64_t own = __atomic_load_n(&ax->own, __ATOMIC_SEQ_CST);
    /* The mark must be this incarnation's: a stale one (the entry was freed
     * and claimed again, its new owner not yet past clearing it) names the
     * previous incarnation, and the entry is not ours to free. */
    if ((uint32_t)own == 0
        || __atomic_load_n(&ax->orphan, __ATOMIC_SEQ_CST) != orphan_mark((uint32_t)(own >> 32))
        || __atomic_load_n(&ax->waiting_on, __ATOMIC_SEQ_CST) != 0)
        return 0;
    return np_free_actor(d, x, own);
}
