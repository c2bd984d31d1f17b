/*
 * netplex_core.c — crash-safe semaphores and mutexes in POSIX shared memory.
 *
 * Design and invariants (read this before touching anything below)
 *
 * The segment holds a header, one object array (semaphores, then mutexes), a
 * name hash table, a process table, an actor table (one actor per thread that
 * uses the core) and a protected-delta table indexed by (process slot,
 * semaphore).  Layout: core_internal.h.
 *
 * Guards.  Every object field and the queue links of the actors queued on
 * it (qnext, waiting_on, wait_gen) change only while its guard is held; the
 * name table and the `used' flags change only while the name guard is held
 * as well.  A guard is a 32-bit futex word: 0 free, else owner actor + 1,
 * plus NP_GUARD_WAITERS when someone sleeps on it.  Lock order: name guard,
 * then one object guard.  Never two object guards.
 *
 * Redo log.  A mutation computes every new field value first and writes it
 * as (offset, width, absolute value) into the acting actor's intent record,
 * then sets intent_valid (release), applies the writes, clears intent_valid,
 * releases the guard.  INVARIANT: a valid intent for guard g exists only
 * while g is held by its writer, or by a recoverer that took g over from a
 * dead owner.  Hence whoever takes over a dead owner's guard may apply every
 * valid intent for that guard: the writes are absolute, so applying them
 * again is harmless, and nobody else can have seen a half-applied state.
 * A process that dies before intent_valid=1 changed nothing (roll back); one
 * that dies after it is completed by recovery (roll forward).
 *
 * Recovery (recover_slot) of a dead process D claims D's slot with one CAS
 * (ALIVE -> RECOVERING+recoverer), then (1) takes over and releases every
 * guard owned by an actor of D, redoing the valid intents for it, (2) reverts
 * D's protected deltas of the current generation, clamped at 0, (3) unlocks
 * mutexes owned by D, (4) dequeues D's waiting actors, (5) frees D's actors
 * and slot.  Steps 2-4 are ordinary guarded mutations by the recoverer, with
 * its own redo log, so a dead recoverer is itself recovered like anyone: a
 * RECOVERING slot whose recoverer is dead is stolen after the recoverer's
 * own slot has been recovered.  Everything is idempotent.  A pid is matched
 * together with its start time (/proc/<pid>/stat field 22); zombies are dead.
 *
 * Waits.  Counts are never handed to a waiter: they stay in `value', and the
 * waiter at queue position p (0-based) is entitled to take one when
 * value > p.  A caller that is not queued may take a free unit ahead of the
 * queue (no convoy of sleeps and wake-ups under contention) unless the head
 * has waited NP_STARVE_NS already; from then on it queues behind: the
 * overtaking is bounded, so waits are starvation-free, and waits longer
 * than that are served in FIFO order.  A poster wakes the first
 * min(value, qlen) waiters, who
 * re-compete; a dead waiter is dequeued by recovery (or by the waiters behind
 * it, which check liveness when a slice expires), so it never swallows a
 * count.  Each actor sleeps on its own wake word, read under the guard before
 * releasing it, so a post after the release changes the word and the
 * FUTEX_WAIT returns at once (no lost wake-up).  A wait sleeps at most one
 * slice (NP_SLICE_NS) per call and then returns NP_EINTR still queued.
 * destroy bumps the generation and resets the queue without touching the
 * actors; a waiter whose wait_gen differs from its object's gen learns it
 * was destroyed.
 *
 * The uncontended path is: thread-cache hit, guard CAS, plain stores, guard
 * exchange — no system call.  Futex calls happen only on contention or when
 * there are waiters to wake.
 */
#define _GNU_SOURCE
#include "core_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define likely(x)   __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#define NOINLINE    __attribute__((noinline))

/* ------------------------------------------------------------------ */
/* Process-local state                                                  */

/* Bumped in the child after fork(): invalidates every cached registration.
 * Only the forking thread survives a fork, so plain accesses suffice. */
static uint64_t fork_epoch = 1;
static uint64_t self_epoch;            /* epoch my_pid/my_start belong to */
static pid_t    my_pid;
static uint64_t my_start;
static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t  init_once = PTHREAD_ONCE_INIT;
static uint64_t domain_serial;

/* Crash points (tests only). */
static int      test_enabled;          /* NETPLEX_CORE_TEST=1 at first use */
static uint64_t test_epoch;            /* epoch test_enabled was read in */
static int      crash_armed;
static int64_t  crash_n, crash_count;

static NOINLINE void crashpoint_hit(void)
{
    if (++crash_count >= crash_n)
        kill(getpid(), SIGKILL);
}
#define CRASHPOINT() do { if (unlikely(crash_armed)) crashpoint_hit(); } while (0)

typedef struct {
    np_domain *d;
    uint64_t   serial, epoch;
    uint32_t   actor;
} np_tcache;
#define NP_TCACHE 8
static __thread np_tcache tcache[NP_TCACHE];

/* Open domains of this process, so that a thread's exit frees its actors
 * only in domains that are still mapped. */
static pthread_mutex_t dom_mu = PTHREAD_MUTEX_INITIALIZER;
static np_domain *dom_list;
static pthread_key_t exit_key;

static void thread_exit(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&dom_mu);
    for (int i = 0; i < NP_TCACHE; i++) {
        np_tcache *c = &tcache[i];
        if (!c->d || c->epoch != fork_epoch)
            continue;
        for (np_domain *d = dom_list; d; d = d->next)
            if (d == c->d && d->serial == c->serial) {
                np_thread_detach(d);
                break;
            }
    }
    pthread_mutex_unlock(&dom_mu);
}

static void atfork_child(void)
{
    fork_epoch++;
    pthread_mutex_init(&reg_mu, NULL);
    pthread_mutex_init(&dom_mu, NULL);
    crash_armed = 0;
}

static void do_init(void)
{
    pthread_atfork(NULL, NULL, atfork_child);
    pthread_key_create(&exit_key, thread_exit);
}

static void read_test_env(void)
{
    if (test_epoch != fork_epoch) {
        const char *e = getenv("NETPLEX_CORE_TEST");
        test_enabled = e && strcmp(e, "1") == 0;
        test_epoch = fork_epoch;
    }
}

/* ------------------------------------------------------------------ */
/* Small helpers                                                        */

int64_t np_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int64_t np_noop(void) { return 0; }

static int futex_wait(uint32_t *w, uint32_t val, int64_t ns)
{
    struct timespec ts;
    if (ns < 0)
        ns = 0;
    ts.tv_sec = ns / 1000000000LL;
    ts.tv_nsec = ns % 1000000000LL;
    /* Shared (not PRIVATE) futex: the word lives in a MAP_SHARED mapping. */
    if (syscall(SYS_futex, w, FUTEX_WAIT, val, &ts, NULL, 0) == 0)
        return 0;
    return errno;
}

static void futex_wake(uint32_t *w, int n)
{
    syscall(SYS_futex, w, FUTEX_WAKE, n, NULL, NULL, 0);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Read state and start time (field 22) of /proc/<pid>/stat.
 * Returns 0, or -1 when there is no such process. */
static int read_proc_stat(pid_t pid, char *state, uint64_t *start)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    char *p = strrchr(buf, ')');        /* comm may contain spaces and ')' */
    if (!p || p[1] != ' ')
        return -1;
    p += 2;
    *state = *p;
    /* p is at field 3; advance to field 22. */
    for (int f = 3; f < 22; f++) {
        p = strchr(p, ' ');
        if (!p)
            return -1;
        p++;
    }
    *start = strtoull(p, NULL, 10);
    return 0;
}

int np_process_alive(int32_t pid, uint64_t start_time)
{
    char st;
    uint64_t s;
    if (pid <= 0 || read_proc_stat(pid, &st, &s) < 0)
        return 0;
    if (st == 'Z' || st == 'X' || st == 'x')
        return 0;
    return start_time == 0 || s == start_time;
}

static void ensure_self(void)
{
    if (self_epoch != fork_epoch) {
        char st;
        my_pid = getpid();
        if (read_proc_stat(my_pid, &st, &my_start) < 0)
            my_start = 0;
        self_epoch = fork_epoch;
    }
}

static inline uint32_t *guard_word(np_domain *d, uint32_t g)
{
    return g < d->nobj ? &d->objs[g].guard : &d->h->name_guard;
}

static inline uint64_t seg_off(np_domain *d, const void *p)
{
    return (uint64_t)((const char *)p - d->base);
}

static inline np_delta *delta_of(np_domain *d, uint32_t proc, uint32_t sem)
{
    return &d->deltas[(size_t)proc * d->nsem + sem];
}

/* ------------------------------------------------------------------ */
/* Liveness and recovery entry points (defined further down)            */

static int recover_slot(np_domain *d, uint32_t me, uint32_t p, int depth);
static int actor_alive(np_domain *d, uint32_t a);

/* ------------------------------------------------------------------ */
/* Guards                                                               */

static NOINLINE void guard_lock_slow(np_domain *d, uint32_t *g, uint32_t me)
{
    uint32_t v;
    for (int i = 0; i < 200; i++) {
        v = __atomic_load_n(g, __ATOMIC_RELAXED);
        /* acquire on success: pairs with the release in guard_unlock. */
        if (v == 0 && __atomic_compare_exchange_n(g, &v, me + 1, 0,
                                                  __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            return;
        cpu_relax();
    }
    for (;;) {
        v = __atomic_load_n(g, __ATOMIC_RELAXED);
        if (v == 0) {
            /* Others may still sleep: keep the WAITERS bit when taking it. */
            if (__atomic_compare_exchange_n(g, &v, (me + 1) | NP_GUARD_WAITERS, 0,
                                            __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
                return;
            continue;
        }
        if (!(v & NP_GUARD_WAITERS)) {
            /* relaxed: only announces a sleeper; the futex syscall orders. */
            if (!__atomic_compare_exchange_n(g, &v, v | NP_GUARD_WAITERS, 0,
                                             __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                continue;
            v |= NP_GUARD_WAITERS;
        }
        if (futex_wait(g, v, NP_GUARD_SLEEP_NS) == ETIMEDOUT) {
            uint32_t owner = (v & NP_GUARD_OWNER) - 1;
            if (owner < d->nact && !actor_alive(d, owner)) {
                uint32_t p = __atomic_load_n(&d->actors[owner].proc, __ATOMIC_ACQUIRE);
                if (p && p <= d->nproc)
                    recover_slot(d, me, p - 1, 0);
            }
        }
    }
}

static inline void guard_lock(np_domain *d, uint32_t *g, uint32_t me)
{
    uint32_t z = 0;
    /* acquire: everything the previous holder wrote is visible to us. */
    if (likely(__atomic_compare_exchange_n(g, &z, me + 1, 0,
                                           __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)))
        return;
    guard_lock_slow(d, g, me);
}

static inline void guard_unlock(uint32_t *g)
{
    /* release: our applied writes happen-before the next holder's reads. */
    uint32_t old = __atomic_exchange_n(g, 0, __ATOMIC_RELEASE);
    if (unlikely(old & NP_GUARD_WAITERS))
        futex_wake(g, 1);
}

/* ------------------------------------------------------------------ */
/* Redo log                                                             */

static inline void tx_begin(np_actor *a, uint32_t g1, uint32_t g2p1)
{
    a->intent_n = 0;
    a->intent_guard = g1 + 1;
    a->intent_guard2 = g2p1;
}

static inline void tx_put(np_domain *d, np_actor *a, void *p, uint64_t v, uint32_t w)
{
    np_redo *r = &a->intent[a->intent_n++];
    r->off = seg_off(d, p);
    r->val = v;
    r->width = w;
}
#define TX32(d, a, field, v) tx_put((d), (a), &(field), (uint64_t)(uint32_t)(v), 4)
#define TX64(d, a, field, v) tx_put((d), (a), &(field), (uint64_t)(v), 8)

static void redo_apply(np_domain *d, np_actor *a)
{
    uint32_t n = a->intent_n;
    if (n > NP_INTENT_MAX)
        n = NP_INTENT_MAX;
    for (uint32_t i = 0; i < n; i++) {
        np_redo *r = &a->intent[i];
        if (r->off + r->width > d->size || (r->off & (r->width - 1)))
            continue;                   /* never write outside the segment */
        /* relaxed: the guard orders these; atomic only so that lock-free
         * readers (np_sem_get, introspection) never see a torn value. */
        if (r->width == 8)
            __atomic_store_n((uint64_t *)(d->base + r->off), r->val, __ATOMIC_RELAXED);
        else if (r->width == 4)
            __atomic_store_n((uint32_t *)(d->base + r->off), (uint32_t)r->val, __ATOMIC_RELAXED);
        CRASHPOINT();
    }
}

static void tx_commit(np_domain *d, np_actor *a)
{
    CRASHPOINT();                       /* intent written, not valid */
    /* release: the log entries are written before the flag that says so. */
    __atomic_store_n(&a->intent_valid, 1, __ATOMIC_RELEASE);
    CRASHPOINT();
    redo_apply(d, a);
    /* release: the applied writes precede the end of the intent. */
    __atomic_store_n(&a->intent_valid, 0, __ATOMIC_RELEASE);
    CRASHPOINT();
}

/* ------------------------------------------------------------------ */
/* Registration                                                         */

static NOINLINE int register_process(np_domain *d)
{
    int rc = 0;
    pthread_mutex_lock(&reg_mu);
    if (d->my_epoch == fork_epoch && d->my_proc)
        goto out;
    ensure_self();
    read_test_env();
    for (uint32_t p = 0; p < d->nproc; p++) {
        uint64_t z = 0;
        np_proc *s = &d->procs[p];
        if (__atomic_load_n(&s->w, __ATOMIC_RELAXED) != 0)
            continue;
        /* acquire: we now own the slot and read nothing of others' through it. */
        if (!__atomic_compare_exchange_n(&s->w, &z, PW_MAKE(my_pid, NP_PS_REGISTERING, 0),
                                         0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            continue;
        CRASHPOINT();
        __atomic_store_n(&s->start_time, my_start, __ATOMIC_RELAXED);
        CRASHPOINT();
        /* release: start_time is visible to whoever sees ALIVE. */
        __atomic_store_n(&s->w, PW_MAKE(my_pid, NP_PS_ALIVE, 0), __ATOMIC_RELEASE);
        CRASHPOINT();
        d->my_proc = p + 1;
        d->my_epoch = fork_epoch;
        goto out;
    }
    rc = NP_ENOSPC_PROC;
out:
    pthread_mutex_unlock(&reg_mu);
    return rc;
}

static NOINLINE int my_actor_slow(np_domain *d, uint32_t *out)
{
    np_tcache *c;
    int i, rc;
    for (i = 0; i < NP_TCACHE; i++) {
        c = &tcache[i];
        if (c->d == d && c->serial == d->serial && c->epoch == fork_epoch) {
            *out = c->actor;
            return 0;
        }
    }
    if ((rc = register_process(d)) < 0)
        return rc;
    uint32_t mp = d->my_proc;
    for (uint32_t a = 0; a < d->nact; a++) {
        uint32_t z = 0;
        np_actor *x = &d->actors[a];
        if (__atomic_load_n(&x->proc, __ATOMIC_RELAXED) != 0)
            continue;
        /* acquire: the previous owner's (recovery's) stores are visible. */
        if (!__atomic_compare_exchange_n(&x->proc, &z, mp, 0,
                                         __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            continue;
        CRASHPOINT();
        x->tid = (int32_t)syscall(SYS_gettid);
        x->qnext = 0;
        x->waiting_on = 0;
        x->intent_n = 0;
        __atomic_store_n(&x->intent_valid, 0, __ATOMIC_RELAXED);
        CRASHPOINT();
        /* Evict a stale entry first, else the oldest (slot 0 moves out). */
        for (i = 0; i < NP_TCACHE; i++) {
            c = &tcache[i];
            if (!c->d || c->epoch != fork_epoch)
                break;
        }
        if (i == NP_TCACHE) {
            memmove(&tcache[0], &tcache[1], sizeof tcache[0] * (NP_TCACHE - 1));
            i = NP_TCACHE - 1;
        }
        /* Most recent first: the inline fast path only looks at slot 0. */
        if (i != 0) {
            tcache[i] = tcache[0];
        }
        tcache[0].d = d;
        tcache[0].serial = d->serial;
        tcache[0].epoch = fork_epoch;
        tcache[0].actor = a;
        pthread_setspecific(exit_key, (void *)1);   /* run thread_exit */
        *out = a;
        return 0;
    }
    return NP_ENOSPC_ACT;
}

static inline int my_actor(np_domain *d, uint32_t *out)
{
    np_tcache *c = &tcache[0];
    if (likely(c->d == d && c->serial == d->serial && c->epoch == fork_epoch)) {
        *out = c->actor;
        return 0;
    }
    return my_actor_slow(d, out);
}

int64_t np_register(np_domain *d)
{
    uint32_t a;
    return my_actor(d, &a);
}

int64_t np_thread_detach(np_domain *d)
{
    for (int i = 0; i < NP_TCACHE; i++) {
        np_tcache *c = &tcache[i];
        if (c->d == d && c->serial == d->serial && c->epoch == fork_epoch) {
            np_actor *x = &d->actors[c->actor];
            if (__atomic_load_n(&x->waiting_on, __ATOMIC_RELAXED))
                np_wait_cancel(d);
            if (__atomic_load_n(&x->waiting_on, __ATOMIC_RELAXED))
                return NP_EBUSY;
            c->d = NULL;
            /* release: our last writes precede the actor's reuse. */
            __atomic_store_n(&x->proc, 0, __ATOMIC_RELEASE);
            return 0;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Queues (caller holds the object's guard and builds a redo log)       */

static uint32_t q_pos(np_domain *d, np_obj *o, uint32_t a)
{
    uint32_t pos = 0, cur = o->qhead;
    while (cur && pos <= d->nact) {
        if (cur == a + 1)
            return pos;
        cur = d->actors[cur - 1].qnext;
        pos++;
    }
    return UINT32_MAX;
}

static void tx_q_remove(np_domain *d, np_actor *me, np_obj *o, uint32_t victim)
{
    uint32_t prev = 0, cur = o->qhead, n = 0;
    while (cur && cur != victim + 1 && n++ <= d->nact) {
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

static void tx_q_append(np_domain *d, np_actor *me, uint32_t ai, np_obj *o, uint32_t idx,
                        int64_t now)
{
    TX64(d, me, me->wait_since, now);
    TX32(d, me, me->qnext, 0);
    TX32(d, me, me->wait_gen, o->gen);
    TX32(d, me, me->waiting_on, idx + 1);
    if (o->qtail)
        TX32(d, me, d->actors[o->qtail - 1].qnext, ai + 1);
    else
        TX32(d, me, o->qhead, ai + 1);
    TX32(d, me, o->qtail, ai + 1);
    TX32(d, me, o->qlen, o->qlen + 1);
}

/* The first min(value, qlen) queued actors (capped): those entitled. */
static int q_collect(np_domain *d, np_obj *o, uint32_t *out)
{
    int64_t v = o->value;
    int n = 0;
    uint32_t cur = o->qhead;
    while (cur && n < v && n < NP_WAKE_BATCH) {
        out[n++] = cur - 1;
        cur = d->actors[cur - 1].qnext;
    }
    return n;
}

static void wake_actors(np_domain *d, const uint32_t *who, int n)
{
    for (int i = 0; i < n; i++) {
        np_actor *x = &d->actors[who[i]];
        /* seq_cst, with the sleeper's store of `sleeping' and load of
         * `wake' (Dekker): either it sees our increment and does not sleep,
         * or we see its flag and wake it.  Only the first waker after it went
         * to sleep makes the system call; a waiter already woken but not yet
         * running costs the others nothing more. */
        __atomic_add_fetch(&x->wake, 1, __ATOMIC_SEQ_CST);
        if (__atomic_exchange_n(&x->sleeping, 0, __ATOMIC_SEQ_CST))
            futex_wake(&x->wake, 1);
    }
}

/* ------------------------------------------------------------------ */
/* Handles                                                              */

static inline int handle_obj(np_domain *d, uint64_t handle, int kind, uint32_t *idx)
{
    uint32_t i = (uint32_t)handle;
    if (kind == NP_KIND_SEM ? i >= d->nsem : (i < d->nsem || i >= d->nobj))
        return NP_EINVAL;
    *idx = i;
    return 0;
}

static inline uint32_t handle_gen(uint64_t handle)
{
    return (uint32_t)(handle >> 32) & NP_GEN_MASK;
}

static inline int64_t make_handle(np_domain *d, uint32_t i)
{
    return (int64_t)(((uint64_t)(d->objs[i].gen & NP_GEN_MASK) << 32) | i);
}

/* ------------------------------------------------------------------ */
/* Acquire: semaphore decrement and mutex lock share one implementation */

static void check_ahead(np_domain *d, uint32_t me, const uint32_t *procs, int n)
{
    for (int i = 0; i < n; i++) {
        uint32_t p = procs[i];
        np_proc *s = &d->procs[p];
        uint64_t w = __atomic_load_n(&s->w, __ATOMIC_ACQUIRE);
        if (PW_STATE(w) == NP_PS_ALIVE
            && !np_process_alive(PW_PID(w), __atomic_load_n(&s->start_time, __ATOMIC_RELAXED)))
            recover_slot(d, me, p, 0);
    }
}

/* Under o's guard, with waiters queued: has the head waited so long that
 * newcomers must queue behind it (NP_STARVE_NS)? */
static inline int head_starving(np_domain *d, const np_obj *o)
{
    const np_actor *head = &d->actors[o->qhead - 1];
    return np_now() - head->wait_since >= NP_STARVE_NS;
}

static int64_t obj_acquire(np_domain *d, uint64_t handle, int64_t deadline, int kind)
{
    uint32_t idx, ai;
    int rc;
    if ((rc = handle_obj(d, handle, kind, &idx)) < 0)
        return rc;
    if ((rc = my_actor(d, &ai)) < 0)
        return rc;
    uint32_t gen = handle_gen(handle);
    np_obj *o = &d->objs[idx];
    np_actor *a = &d->actors[ai];
    int64_t slice_end = 0;
    int spun = 0;

    for (;;) {
        guard_lock(d, &o->guard, ai);
        CRASHPOINT();
        if (unlikely(!o->used || o->gen != gen)) {
            if (a->waiting_on == idx + 1 && a->wait_gen == gen) {
                tx_begin(a, idx, 0);
                TX32(d, a, a->waiting_on, 0);
                tx_commit(d, a);
                guard_unlock(&o->guard);
                CRASHPOINT();
                return NP_EDESTROYED;
            }
            guard_unlock(&o->guard);
            return NP_ESTALE;
        }
        int queued = a->waiting_on == idx + 1 && a->wait_gen == gen;
        if (unlikely(a->waiting_on && !queued)) {
            guard_unlock(&o->guard);
            return NP_EBUSY;
        }
        int64_t v = o->value;
        int entitled;
        if (likely(!queued))
            entitled = v > 0 && (o->qlen == 0 || !head_starving(d, o));
        else
            entitled = v > (int64_t)q_pos(d, o, ai);
        if (likely(entitled)) {
            tx_begin(a, idx, 0);
            TX64(d, a, o->value, v - 1);
            if (kind == NP_KIND_MUTEX) {
                TX32(d, a, o->owner, d->my_proc);
            } else if (o->protected_) {
                np_delta *e = delta_of(d, d->my_proc - 1, idx);
                int64_t cur = e->gen == o->gen ? e->delta : 0;
                TX32(d, a, e->gen, o->gen);
                TX64(d, a, e->delta, cur - 1);
            }
            if (queued)
                tx_q_remove(d, a, o, ai);
            tx_commit(d, a);
            guard_unlock(&o->guard);
            CRASHPOINT();
            return kind == NP_KIND_MUTEX ? 0 : v - 1;
        }
        if (deadline == NP_NOWAIT) {
            guard_unlock(&o->guard);
            return NP_EAGAIN;
        }
        if (!queued && !spun && o->rel_cpu != sched_getcpu()) {
            spun = 1;                   /* reads only: nothing to log */
            guard_unlock(&o->guard);
            for (int i = 0; i < NP_SPIN_ITERS
                     && __atomic_load_n(&o->value, __ATOMIC_RELAXED) <= 0; i++)
                cpu_relax();
            continue;
        }
        int64_t now = np_now();
        if (now >= deadline) {
            /* Not entitled: nobody behind us becomes entitled by our leaving. */
            if (queued) {
                tx_begin(a, idx, 0);
                tx_q_remove(d, a, o, ai);
                tx_commit(d, a);
            }
            guard_unlock(&o->guard);
            CRASHPOINT();
            return NP_ETIMEDOUT;
        }
        if (!slice_end)
            slice_end = now + NP_SLICE_NS;
        if (now >= slice_end) {
            /* Someone ahead may be dead (no supervisor, or a slow one). */
            uint32_t procs[NP_WAKE_BATCH];
            int n = 0;
            if (kind == NP_KIND_MUTEX && v == 0 && o->owner)
                procs[n++] = o->owner - 1;
            if (v > 0 && queued) {
                uint32_t cur = o->qhead;
                while (cur && cur != ai + 1 && n < NP_WAKE_BATCH) {
                    uint32_t p = d->actors[cur - 1].proc;
                    if (p && p != d->my_proc)
                        procs[n++] = p - 1;
                    cur = d->actors[cur - 1].qnext;
                }
            }
            guard_unlock(&o->guard);
            check_ahead(d, ai, procs, n);
            return NP_EINTR;
        }
        if (!queued) {
            tx_begin(a, idx, 0);
            tx_q_append(d, a, ai, o, idx, now);
            tx_commit(d, a);
        }
        /* acquire: read under the guard, so any later post changes it. */
        uint32_t w = __atomic_load_n(&a->wake, __ATOMIC_ACQUIRE);
        guard_unlock(&o->guard);
        CRASHPOINT();
        int64_t until = deadline < slice_end ? deadline : slice_end;
        /* seq_cst: pairs with wake_actors (see there). */
        __atomic_store_n(&a->sleeping, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&a->wake, __ATOMIC_SEQ_CST) == w)
            futex_wait(&a->wake, w, until - now);
        __atomic_store_n(&a->sleeping, 0, __ATOMIC_RELAXED);
    }
}

int64_t np_sem_decrement(np_domain *d, uint64_t handle, int64_t deadline)
{
    return obj_acquire(d, handle, deadline, NP_KIND_SEM);
}

int64_t np_mutex_lock(np_domain *d, uint64_t handle, int64_t deadline)
{
    return obj_acquire(d, handle, deadline, NP_KIND_MUTEX);
}

/* ------------------------------------------------------------------ */
/* Release: semaphore increment and mutex unlock                        */

/* One unit back: semaphore +1 (with its protected delta), or mutex unlock
 * (a no-op when not locked; any process may unlock).  The queued waiters are
 * woken after the guard is released, to re-compete. */
static int64_t obj_release(np_domain *d, uint64_t handle, int kind)
{
    uint32_t idx, ai, who[NP_WAKE_BATCH];
    int rc, n = 0;
    if ((rc = handle_obj(d, handle, kind, &idx)) < 0)
        return rc;
    if ((rc = my_actor(d, &ai)) < 0)
        return rc;
    np_obj *o = &d->objs[idx];
    np_actor *a = &d->actors[ai];
    guard_lock(d, &o->guard, ai);
    CRASHPOINT();
    if (unlikely(!o->used || o->gen != handle_gen(handle))) {
        guard_unlock(&o->guard);
        return NP_ESTALE;
    }
    int64_t v = o->value;
    if (kind == NP_KIND_MUTEX && v != 0) {      /* not locked: no-op */
        guard_unlock(&o->guard);
        return 0;
    }
    if (unlikely(v >= (int64_t)NP_VALUE_MAX)) {
        guard_unlock(&o->guard);
        return NP_EOVERFLOW;
    }
    tx_begin(a, idx, 0);
    TX64(d, a, o->value, v + 1);
    if (kind == NP_KIND_MUTEX) {
        TX32(d, a, o->owner, 0);
    } else if (o->protected_) {
        np_delta *e = delta_of(d, d->my_proc - 1, idx);
        int64_t cur = e->gen == o->gen ? e->delta : 0;
        TX32(d, a, e->gen, o->gen);
        TX64(d, a, e->delta, cur + 1);
    }
    tx_commit(d, a);
    if (unlikely(o->qlen))
        n = q_collect(d, o, who);
    /* relaxed: a hint for spinning waiters, ordered by nothing. */
    __atomic_store_n(&o->rel_cpu, sched_getcpu(), __ATOMIC_RELAXED);
    guard_unlock(&o->guard);
    CRASHPOINT();
    wake_actors(d, who, n);
    return kind == NP_KIND_MUTEX ? 0 : v + 1;
}

int64_t np_sem_increment(np_domain *d, uint64_t handle)
{
    return obj_release(d, handle, NP_KIND_SEM);
}

int64_t np_mutex_unlock(np_domain *d, uint64_t handle)
{
    return obj_release(d, handle, NP_KIND_MUTEX);
}

int64_t np_sem_get(np_domain *d, uint64_t handle)
{
    uint32_t idx;
    int rc;
    if ((rc = handle_obj(d, handle, NP_KIND_SEM, &idx)) < 0)
        return rc;
    np_obj *o = &d->objs[idx];
    /* acquire/acquire: value read between two reads of the same generation
     * belongs to that incarnation (destroy changes gen before reuse). */
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

int64_t np_sem_delta_of(np_domain *d, uint64_t handle, int32_t pid, int64_t *out)
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
            sum += __atomic_load_n(&e->delta, __ATOMIC_RELAXED);
    }
    *out = sum;
    return 0;
}

int64_t np_wait_cancel(np_domain *d)
{
    uint32_t ai, who[NP_WAKE_BATCH];
    int rc, n = 0;
    if ((rc = my_actor(d, &ai)) < 0)
        return rc;
    np_actor *a = &d->actors[ai];
    uint32_t w = __atomic_load_n(&a->waiting_on, __ATOMIC_RELAXED);
    if (!w || w > d->nobj)
        return 0;
    np_obj *o = &d->objs[w - 1];
    guard_lock(d, &o->guard, ai);
    CRASHPOINT();
    if (a->waiting_on == w) {
        tx_begin(a, w - 1, 0);
        if (o->used && a->wait_gen == o->gen)
            tx_q_remove(d, a, o, ai);
        else
            TX32(d, a, a->waiting_on, 0);
        tx_commit(d, a);
        if (o->used && o->value > 0 && o->qlen)
            n = q_collect(d, o, who);   /* we may have been entitled */
    }
    guard_unlock(&o->guard);
    CRASHPOINT();
    wake_actors(d, who, n);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Names: lookup / create / destroy                                     */

static uint64_t name_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL;       /* FNV-1a */
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return h;
}

/* Under the name guard.  Returns object + 1 or 0; *slot: where it is, or
 * where to insert it. */
static uint32_t name_find(np_domain *d, const char *name, uint32_t *slot)
{
    uint32_t mask = d->name_cap - 1, pos = (uint32_t)name_hash(name) & mask;
    uint32_t ins = UINT32_MAX;
    for (uint32_t k = 0; k < d->name_cap; k++, pos = (pos + 1) & mask) {
        uint32_t e = d->names[pos];
        if (e == 0) {
            *slot = ins != UINT32_MAX ? ins : pos;
            return 0;
        }
        if (e == NP_NAME_TOMB) {
            if (ins == UINT32_MAX)
                ins = pos;
            continue;
        }
        if (e <= d->nobj && strncmp(d->objs[e - 1].name, name, NP_NAME_MAX + 1) == 0) {
            *slot = pos;
            return e;
        }
    }
    *slot = ins;
    return 0;
}

int64_t np_lookup(np_domain *d, int32_t kind, const char *name, int32_t flags, int64_t initial)
{
    uint32_t ai, slot;
    int rc;
    size_t len = name ? strnlen(name, NP_NAME_MAX + 1) : 0;
    if (len == 0 || len > NP_NAME_MAX || (kind != NP_KIND_SEM && kind != NP_KIND_MUTEX))
        return NP_EINVAL;
    if ((flags & NP_CREATE) && kind == NP_KIND_SEM && initial < 0)
        return NP_EINVAL;
    if ((rc = my_actor(d, &ai)) < 0)
        return rc;
    np_actor *a = &d->actors[ai];
    uint32_t ng = d->nobj;
    guard_lock(d, &d->h->name_guard, ai);
    CRASHPOINT();
    uint32_t e = name_find(d, name, &slot);
    int64_t res;
    if (e) {
        int k = e - 1 < d->nsem ? NP_KIND_SEM : NP_KIND_MUTEX;
        if (k != kind)
            res = NP_EKIND;
        else if ((flags & (NP_CREATE | NP_EXCL)) == (NP_CREATE | NP_EXCL))
            res = NP_EEXIST;
        else
            res = make_handle(d, e - 1);
        guard_unlock(&d->h->name_guard);
        return res;
    }
    if (!(flags & NP_CREATE)) {
        guard_unlock(&d->h->name_guard);
        return NP_ENOENT;
    }
    uint32_t lo = kind == NP_KIND_SEM ? 0 : d->nsem;
    uint32_t hi = kind == NP_KIND_SEM ? d->nsem : d->nobj;
    uint32_t i;
    for (i = lo; i < hi; i++)
        if (!d->objs[i].used)
            break;
    if (i == hi || slot == UINT32_MAX) {
        guard_unlock(&d->h->name_guard);
        return kind == NP_KIND_SEM ? NP_ENOSPC_SEM : NP_ENOSPC_MTX;
    }
    np_obj *o = &d->objs[i];
    guard_lock(d, &o->guard, ai);
    CRASHPOINT();
    /* A free object is reachable by nobody (stale handles fail the `used'
     * check under its guard), so the name may be written outside the log. */
    memcpy(o->name, name, len + 1);
    CRASHPOINT();
    tx_begin(a, ng, i + 1);
    TX32(d, a, o->used, 1);
    TX64(d, a, o->value, kind == NP_KIND_MUTEX ? 1 : initial);
    TX32(d, a, o->protected_, kind == NP_KIND_SEM && (flags & NP_PROTECTED) ? 1 : 0);
    TX32(d, a, o->owner, 0);
    TX32(d, a, d->names[slot], i + 1);
    tx_commit(d, a);
    res = make_handle(d, i);
    guard_unlock(&o->guard);
    CRASHPOINT();
    guard_unlock(&d->h->name_guard);
    CRASHPOINT();
    return res;
}

static int64_t obj_destroy(np_domain *d, uint64_t handle, int kind)
{
    uint32_t idx, ai, slot, who[NP_WAKE_BATCH];
    int rc, n = 0;
    if ((rc = handle_obj(d, handle, kind, &idx)) < 0)
        return rc;
    if ((rc = my_actor(d, &ai)) < 0)
        return rc;
    np_actor *a = &d->actors[ai];
    np_obj *o = &d->objs[idx];
    guard_lock(d, &d->h->name_guard, ai);
    CRASHPOINT();
    guard_lock(d, &o->guard, ai);
    CRASHPOINT();
    if (!o->used || o->gen != handle_gen(handle) || name_find(d, o->name, &slot) != idx + 1) {
        guard_unlock(&o->guard);
        guard_unlock(&d->h->name_guard);
        return NP_ESTALE;
    }
    for (uint32_t cur = o->qhead; cur && n < NP_WAKE_BATCH; cur = d->actors[cur - 1].qnext)
        who[n++] = cur - 1;
    tx_begin(a, d->nobj, idx + 1);
    TX32(d, a, d->names[slot], NP_NAME_TOMB);
    TX32(d, a, o->used, 0);
    TX32(d, a, o->gen, (o->gen + 1) & NP_GEN_MASK);
    TX64(d, a, o->value, 0);
    TX32(d, a, o->protected_, 0);
    TX32(d, a, o->owner, 0);
    TX32(d, a, o->qhead, 0);
    TX32(d, a, o->qtail, 0);
    TX32(d, a, o->qlen, 0);
    tx_commit(d, a);
    guard_unlock(&o->guard);
    CRASHPOINT();
    guard_unlock(&d->h->name_guard);
    CRASHPOINT();
    /* Waiters beyond the batch notice at the end of their slice. */
    wake_actors(d, who, n);
    return 0;
}

int64_t np_sem_destroy(np_domain *d, uint64_t handle)
{
    return obj_destroy(d, handle, NP_KIND_SEM);
}

int64_t np_mutex_destroy(np_domain *d, uint64_t handle)
{
    return obj_destroy(d, handle, NP_KIND_MUTEX);
}

/* ------------------------------------------------------------------ */
/* Recovery                                                             */

static int slot_process_alive(np_domain *d, uint32_t p)
{
    np_proc *s = &d->procs[p];
    uint64_t w = __atomic_load_n(&s->w, __ATOMIC_ACQUIRE);
    switch (PW_STATE(w)) {
    case NP_PS_ALIVE:
        return np_process_alive(PW_PID(w), __atomic_load_n(&s->start_time, __ATOMIC_RELAXED));
    case NP_PS_REGISTERING:
        return np_process_alive(PW_PID(w), 0);
    default:                            /* free or being recovered: gone */
        return 0;
    }
}

static int actor_alive(np_domain *d, uint32_t a)
{
    uint32_t p = __atomic_load_n(&d->actors[a].proc, __ATOMIC_ACQUIRE);
    if (p == 0 || p > d->nproc)
        return 0;
    return slot_process_alive(d, p - 1);
}

/* Step 1 for one guard: take it over from an actor of slot p, redo every
 * valid intent for it, release it. */
static void recover_guard(np_domain *d, uint32_t me, uint32_t p, uint32_t g)
{
    uint32_t *gw = guard_word(d, g);
    for (;;) {
        uint32_t v = __atomic_load_n(gw, __ATOMIC_ACQUIRE);
        uint32_t owner = v & NP_GUARD_OWNER;
        if (!owner || owner > d->nact)
            return;
        if (__atomic_load_n(&d->actors[owner - 1].proc, __ATOMIC_ACQUIRE) != p + 1)
            return;
        /* acquire: the dead owner's stores (its log) are visible to us. */
        if (__atomic_compare_exchange_n(gw, &v, (me + 1) | (v & NP_GUARD_WAITERS), 0,
                                        __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            break;
    }
    CRASHPOINT();
    for (uint32_t x = 0; x < d->nact; x++) {
        np_actor *ax = &d->actors[x];
        if (!__atomic_load_n(&ax->intent_valid, __ATOMIC_ACQUIRE))
            continue;
        if (ax->intent_guard != g + 1 && ax->intent_guard2 != g + 1)
            continue;
        redo_apply(d, ax);
        __atomic_store_n(&ax->intent_valid, 0, __ATOMIC_RELEASE);
        CRASHPOINT();
    }
    guard_unlock(gw);
    CRASHPOINT();
}

static void recover_body(np_domain *d, uint32_t me, uint32_t p)
{
    np_actor *a = &d->actors[me];
    uint32_t who[NP_WAKE_BATCH];
    int n;

    /* (1) guards held by the dead process */
    for (uint32_t g = 0; g <= d->nobj; g++)
        recover_guard(d, me, p, g);

    /* (2) protected deltas */
    for (uint32_t i = 0; i < d->nsem; i++) {
        np_delta *e = delta_of(d, p, i);
        if (__atomic_load_n(&e->delta, __ATOMIC_RELAXED) == 0)
            continue;
        np_obj *o = &d->objs[i];
        guard_lock(d, &o->guard, me);
        CRASHPOINT();
        n = 0;
        tx_begin(a, i, 0);
        if (o->used && e->gen == o->gen && e->delta) {
            int64_t v = o->value - e->delta;
            if (v < 0)
                v = 0;
            TX64(d, a, o->value, v);
            if (v > o->value)
                n = -1;
        }
        TX64(d, a, e->delta, 0);
        tx_commit(d, a);
        if (n < 0)
            n = q_collect(d, o, who);
        guard_unlock(&o->guard);
        CRASHPOINT();
        wake_actors(d, who, n);
    }

    /* (3) mutexes owned by the dead process */
    for (uint32_t i = d->nsem; i < d->nobj; i++) {
        np_obj *o = &d->objs[i];
        if (__atomic_load_n(&o->owner, __ATOMIC_RELAXED) != p + 1)
            continue;
        guard_lock(d, &o->guard, me);
        CRASHPOINT();
        n = 0;
        if (o->used && o->owner == p + 1) {
            tx_begin(a, i, 0);
            TX64(d, a, o->value, 1);
            TX32(d, a, o->owner, 0);
            tx_commit(d, a);
            n = q_collect(d, o, who);
        }
        guard_unlock(&o->guard);
        CRASHPOINT();
        wake_actors(d, who, n);
    }

    /* (4) waits of the dead process */
    for (uint32_t x = 0; x < d->nact; x++) {
        np_actor *ax = &d->actors[x];
        if (__atomic_load_n(&ax->proc, __ATOMIC_ACQUIRE) != p + 1)
            continue;
        uint32_t w = __atomic_load_n(&ax->waiting_on, __ATOMIC_RELAXED);
        if (!w || w > d->nobj)
            continue;
        np_obj *o = &d->objs[w - 1];
        guard_lock(d, &o->guard, me);
        CRASHPOINT();
        n = 0;
        if (ax->waiting_on == w) {
            tx_begin(a, w - 1, 0);
            if (o->used && ax->wait_gen == o->gen)
                tx_q_remove(d, a, o, x);
            else
                TX32(d, a, ax->waiting_on, 0);
            tx_commit(d, a);
            if (o->used && o->value > 0)
                n = q_collect(d, o, who);
        }
        guard_unlock(&o->guard);
        CRASHPOINT();
        wake_actors(d, who, n);
    }

    /* (5) free the actors, then the slot */
    for (uint32_t x = 0; x < d->nact; x++) {
        np_actor *ax = &d->actors[x];
        if (__atomic_load_n(&ax->proc, __ATOMIC_ACQUIRE) != p + 1)
            continue;
        ax->waiting_on = 0;
        /* release: the resets precede the actor's reuse. */
        __atomic_store_n(&ax->proc, 0, __ATOMIC_RELEASE);
        CRASHPOINT();
    }
    /* release: everything above precedes the slot's reuse. */
    __atomic_store_n(&d->procs[p].w, 0, __ATOMIC_RELEASE);
    CRASHPOINT();
}

/* Recover slot p if its process is dead (or its recoverer is).  Returns 1
 * when this call recovered it. */
static int recover_slot(np_domain *d, uint32_t me, uint32_t p, int depth)
{
    np_proc *s = &d->procs[p];
    if (depth > 8)
        return 0;
    for (;;) {
        uint64_t w = __atomic_load_n(&s->w, __ATOMIC_ACQUIRE);
        int32_t pid = PW_PID(w);
        uint32_t st = PW_STATE(w);
        if (w == 0)
            return 0;
        if (st == NP_PS_ALIVE) {
            if (np_process_alive(pid, __atomic_load_n(&s->start_time, __ATOMIC_RELAXED)))
                return 0;
        } else if (st == NP_PS_REGISTERING) {
            if (np_process_alive(pid, 0))
                return 0;
        } else if (st == NP_PS_RECOVERING) {
            uint32_t r = PW_REC(w);
            if (r == me + 1)
                return 0;               /* ours, further up the stack */
            if (r && r <= d->nact) {
                if (actor_alive(d, r - 1))
                    return 0;
                uint32_t rp = __atomic_load_n(&d->actors[r - 1].proc, __ATOMIC_ACQUIRE);
                if (rp && rp - 1 != p) {
                    /* The dead recoverer may hold guards with our logs:
                     * recover it first. */
                    recover_slot(d, me, rp - 1, depth + 1);
                    if (__atomic_load_n(&d->actors[r - 1].proc, __ATOMIC_ACQUIRE) == rp)
                        return 0;
                }
            }
        } else {
            return 0;
        }
        /* acquire: pairs with the release stores of the slot's owner. */
        if (__atomic_compare_exchange_n(&s->w, &w, PW_MAKE(pid, NP_PS_RECOVERING, me + 1), 0,
                                        __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            break;
    }
    CRASHPOINT();
    recover_body(d, me, p);
    return 1;
}

int64_t np_recover(np_domain *d, int32_t pid)
{
    uint32_t me;
    int rc;
    int64_t count = 0;
    if (pid <= 0)
        return NP_EINVAL;
    if ((rc = my_actor(d, &me)) < 0)
        return rc;
    for (uint32_t p = 0; p < d->nproc; p++) {
        uint64_t w = __atomic_load_n(&d->procs[p].w, __ATOMIC_ACQUIRE);
        if (w && PW_PID(w) == pid)
            count += recover_slot(d, me, p, 0);
    }
    /* Finish recoveries whose recoverer died (it may have been pid). */
    for (uint32_t p = 0; p < d->nproc; p++) {
        uint64_t w = __atomic_load_n(&d->procs[p].w, __ATOMIC_ACQUIRE);
        if (PW_STATE(w) == NP_PS_RECOVERING)
            count += recover_slot(d, me, p, 0);
    }
    return count;
}

/* ------------------------------------------------------------------ */
/* Segment lifecycle                                                    */

#define ALIGN64(x) (((x) + 63) & ~(uint64_t)63)

static void layout(const np_config *c, np_hdr *h)
{
    uint64_t nobj = (uint64_t)c->semaphores + c->mutexes;
    uint32_t cap = 16;
    while (cap < 2 * nobj)
        cap <<= 1;
    h->name_cap = cap;
    uint64_t off = ALIGN64(sizeof(np_hdr));
    h->off_obj = off;
    off = ALIGN64(off + nobj * sizeof(np_obj));
    h->off_names = off;
    off = ALIGN64(off + (uint64_t)cap * sizeof(uint32_t));
    h->off_proc = off;
    off = ALIGN64(off + (uint64_t)c->processes * sizeof(np_proc));
    h->off_actor = off;
    off = ALIGN64(off + (uint64_t)c->actors * sizeof(np_actor));
    h->off_delta = off;
    off = ALIGN64(off + (uint64_t)c->processes * c->semaphores * sizeof(np_delta));
    h->size = off;
}

static int map_domain(char *base, size_t size, np_domain **out)
{
    np_domain *d = calloc(1, sizeof *d);
    if (!d)
        return NP_ESYS;
    np_hdr *h = (np_hdr *)base;
    d->base = base;
    d->size = size;
    d->h = h;
    d->objs = (np_obj *)(base + h->off_obj);
    d->names = (uint32_t *)(base + h->off_names);
    d->procs = (np_proc *)(base + h->off_proc);
    d->actors = (np_actor *)(base + h->off_actor);
    d->deltas = (np_delta *)(base + h->off_delta);
    d->nsem = h->cfg.semaphores;
    d->nmtx = h->cfg.mutexes;
    d->nobj = d->nsem + d->nmtx;
    d->nproc = h->cfg.processes;
    d->nact = h->cfg.actors;
    d->name_cap = h->name_cap;
    d->serial = __atomic_add_fetch(&domain_serial, 1, __ATOMIC_RELAXED);
    pthread_mutex_lock(&dom_mu);
    d->next = dom_list;
    dom_list = d;
    pthread_mutex_unlock(&dom_mu);
    *out = d;
    return 0;
}

int np_domain_create(const char *name, const np_config *cfg, np_domain **out)
{
    np_hdr tmp;
    pthread_once(&init_once, do_init);
    read_test_env();
    if (!name || name[0] != '/' || !cfg || cfg->processes == 0 || cfg->actors == 0
        || cfg->actors > NP_GUARD_OWNER - 1 || cfg->actors >= (1u << 24)
        || (uint64_t)cfg->semaphores + cfg->mutexes >= (1u << 30))
        return NP_EINVAL;
    memset(&tmp, 0, sizeof tmp);
    tmp.cfg = *cfg;
    layout(cfg, &tmp);
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return NP_ESYS;
    if (ftruncate(fd, (off_t)tmp.size) < 0) {
        int e = errno;
        close(fd);
        shm_unlink(name);
        errno = e;
        return NP_ESYS;
    }
    char *base = mmap(NULL, tmp.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);
    if (base == MAP_FAILED) {
        shm_unlink(name);
        errno = e;
        return NP_ESYS;
    }
    np_hdr *h = (np_hdr *)base;
    *h = tmp;
    h->magic = 0;
    h->version = NP_LAYOUT_VERSION;
    h->hdr_size = sizeof(np_hdr);
    ensure_self();
    h->creator_pid = my_pid;
    h->creator_start = my_start;
    /* release: an attacher that sees the magic sees an initialised segment. */
    __atomic_store_n(&h->magic, NP_MAGIC, __ATOMIC_RELEASE);
    int rc = map_domain(base, tmp.size, out);
    if (rc < 0) {
        munmap(base, tmp.size);
        shm_unlink(name);
    }
    return rc;
}

int np_domain_attach(const char *name, np_domain **out)
{
    struct stat stbuf;
    pthread_once(&init_once, do_init);
    read_test_env();
    if (!name || name[0] != '/')
        return NP_EINVAL;
    int fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0)
        return NP_ESYS;
    if (fstat(fd, &stbuf) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return NP_ESYS;
    }
    if ((size_t)stbuf.st_size < sizeof(np_hdr)) {
        close(fd);
        return NP_EBADSEG;
    }
    size_t size = (size_t)stbuf.st_size;
    char *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);
    if (base == MAP_FAILED) {
        errno = e;
        return NP_ESYS;
    }
    np_hdr *h = (np_hdr *)base;
    np_hdr chk;
    memset(&chk, 0, sizeof chk);
    chk.cfg = h->cfg;
    layout(&h->cfg, &chk);
    if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != NP_MAGIC
        || h->version != NP_LAYOUT_VERSION || h->hdr_size != sizeof(np_hdr)
        || h->size != size || chk.size != size || chk.off_delta != h->off_delta
        || chk.name_cap != h->name_cap) {
        munmap(base, size);
        return NP_EBADSEG;
    }
    int rc = map_domain(base, size, out);
    if (rc < 0)
        munmap(base, size);
    return rc;
}

void np_domain_close(np_domain *d)
{
    if (!d)
        return;
    pthread_mutex_lock(&dom_mu);
    for (np_domain **pp = &dom_list; *pp; pp = &(*pp)->next)
        if (*pp == d) {
            *pp = d->next;
            break;
        }
    pthread_mutex_unlock(&dom_mu);
    munmap(d->base, d->size);
    d->serial = 0;
    free(d);
}

int np_domain_unlink(const char *name)
{
    if (!name)
        return NP_EINVAL;
    return shm_unlink(name) == 0 ? 0 : NP_ESYS;
}

size_t np_domain_size(const np_domain *d) { return d->size; }

int np_domain_config(const np_domain *d, np_config *out)
{
    *out = d->h->cfg;
    return 0;
}

int32_t np_domain_creator_pid(const np_domain *d) { return d->h->creator_pid; }
uint64_t np_domain_creator_start(const np_domain *d) { return d->h->creator_start; }

/* ------------------------------------------------------------------ */
/* Introspection                                                        */

int64_t np_obj_info(np_domain *d, int32_t kind, uint32_t index, np_obj_info_t *out)
{
    uint32_t i;
    if (kind == NP_KIND_SEM) {
        if (index >= d->nsem)
            return NP_EINVAL;
        i = index;
    } else if (kind == NP_KIND_MUTEX) {
        if (index >= d->nmtx)
            return NP_EINVAL;
        i = d->nsem + index;
    } else {
        return NP_EINVAL;
    }
    np_obj *o = &d->objs[i];
    if (!__atomic_load_n(&o->used, __ATOMIC_ACQUIRE))
        return 0;
    memset(out, 0, sizeof *out);
    out->index = index;
    out->kind = kind;
    out->handle = (uint64_t)make_handle(d, i);
    out->value = __atomic_load_n(&o->value, __ATOMIC_RELAXED);
    out->protected_ = (int32_t)o->protected_;
    uint32_t ow = __atomic_load_n(&o->owner, __ATOMIC_RELAXED);
    out->owner_pid = ow && ow <= d->nproc ? PW_PID(__atomic_load_n(&d->procs[ow - 1].w, __ATOMIC_RELAXED)) : 0;
    out->waiters = __atomic_load_n(&o->qlen, __ATOMIC_RELAXED);
    memcpy(out->name, o->name, NP_NAME_MAX);
    out->name[NP_NAME_MAX] = 0;
    return 1;
}

int64_t np_proc_info(np_domain *d, uint32_t index, np_proc_info_t *out)
{
    if (index >= d->nproc)
        return NP_EINVAL;
    np_proc *s = &d->procs[index];
    uint64_t w = __atomic_load_n(&s->w, __ATOMIC_ACQUIRE);
    if (!w)
        return 0;
    memset(out, 0, sizeof *out);
    out->index = index;
    out->pid = PW_PID(w);
    out->start_time = __atomic_load_n(&s->start_time, __ATOMIC_RELAXED);
    out->state = PW_STATE(w) == NP_PS_RECOVERING ? 2 : 1;
    for (uint32_t x = 0; x < d->nact; x++)
        if (__atomic_load_n(&d->actors[x].proc, __ATOMIC_RELAXED) == index + 1)
            out->threads++;
    return 1;
}

#define FAIL(...) do { snprintf(buf, len, __VA_ARGS__); return NP_ECORRUPT; } while (0)

int64_t np_check(np_domain *d, char *buf, size_t len)
{
    uint32_t used = 0, entries = 0, slot;
    if (buf && len)
        buf[0] = 0;
    if (!buf)
        len = 0;
    if (d->h->name_guard)
        FAIL("name guard held (0x%x)", d->h->name_guard);
    for (uint32_t x = 0; x < d->nact; x++) {
        np_actor *ax = &d->actors[x];
        if (ax->intent_valid)
            FAIL("actor %u has a valid intent (guard %u)", x, ax->intent_guard);
        if (ax->proc > d->nproc)
            FAIL("actor %u: bad process slot %u", x, ax->proc);
        if (ax->proc && d->procs[ax->proc - 1].w == 0)
            FAIL("actor %u belongs to free process slot %u", x, ax->proc - 1);
        if (ax->waiting_on > d->nobj)
            FAIL("actor %u: bad waiting_on %u", x, ax->waiting_on);
    }
    for (uint32_t i = 0; i < d->nobj; i++) {
        np_obj *o = &d->objs[i];
        int sem = i < d->nsem;
        const char *what = sem ? "semaphore" : "mutex";
        uint32_t k = sem ? i : i - d->nsem;
        if (o->guard)
            FAIL("%s %u (%.64s) guard held (0x%x)", what, k, o->name, o->guard);
        if (!o->used) {
            if (o->qhead || o->qtail || o->qlen)
                FAIL("free %s %u has a queue", what, k);
            continue;
        }
        used++;
        if (name_find(d, o->name, &slot) != i + 1)
            FAIL("%s %u (%.64s) not found by name", what, k, o->name);
        if (sem && o->value < 0)
            FAIL("semaphore %u (%.64s) value %lld < 0", k, o->name, (long long)o->value);
        if (!sem) {
            if (o->value != 0 && o->value != 1)
                FAIL("mutex %u (%.64s) value %lld", k, o->name, (long long)o->value);
            if ((o->value == 0) != (o->owner != 0))
                FAIL("mutex %u (%.64s) value %lld but owner %u", k, o->name,
                     (long long)o->value, o->owner);
            if (o->owner && (o->owner > d->nproc || d->procs[o->owner - 1].w == 0))
                FAIL("mutex %u (%.64s) owned by free process slot %u", k, o->name, o->owner - 1);
            if (o->owner && !slot_process_alive(d, o->owner - 1))
                FAIL("mutex %u (%.64s) owned by dead process slot %u", k, o->name, o->owner - 1);
        }
        uint32_t n = 0, cur = o->qhead, last = 0;
        while (cur) {
            if (cur > d->nact || n > d->nact)
                FAIL("%s %u (%.64s) queue broken", what, k, o->name);
            np_actor *ax = &d->actors[cur - 1];
            if (ax->waiting_on != i + 1 || ax->wait_gen != o->gen || !ax->proc)
                FAIL("%s %u (%.64s) queued actor %u not waiting on it", what, k, o->name, cur - 1);
            last = cur;
            cur = ax->qnext;
            n++;
        }
        if (n != o->qlen || last != o->qtail)
            FAIL("%s %u (%.64s) queue length %u / tail %u, walked %u / %u",
                 what, k, o->name, o->qlen, o->qtail, n, last);
    }
    for (uint32_t x = 0; x < d->nact; x++) {
        np_actor *ax = &d->actors[x];
        uint32_t w = ax->waiting_on;
        if (w && ax->proc && d->objs[w - 1].used && ax->wait_gen == d->objs[w - 1].gen
            && q_pos(d, &d->objs[w - 1], x) == UINT32_MAX)
            FAIL("actor %u waits on object %u but is not in its queue", x, w - 1);
    }
    for (uint32_t pos = 0; pos < d->name_cap; pos++) {
        uint32_t e = d->names[pos];
        if (e == 0 || e == NP_NAME_TOMB)
            continue;
        if (e > d->nobj || !d->objs[e - 1].used)
            FAIL("name entry %u points to free object %u", pos, e - 1);
        entries++;
    }
    if (entries != used)
        FAIL("%u name entries for %u objects", entries, used);
    for (uint32_t p = 0; p < d->nproc; p++) {
        uint64_t w = d->procs[p].w;
        if (w && PW_STATE(w) == NP_PS_RECOVERING)
            FAIL("process slot %u (pid %d) left in recovery", p, PW_PID(w));
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Test support                                                         */

int64_t np_test_crash_after(int64_t n)
{
    read_test_env();
    if (!test_enabled || n < 0)
        return NP_EINVAL;
    crash_count = 0;
    crash_n = n;
    crash_armed = n > 0;
    return 0;
}

int64_t np_test_crash_count(void)
{
    return crash_count;
}
