/*
 * core_internal.h — the segment's memory layout, the bits of every shared
 * word, and the small inline pieces of the fast path the core's .c files
 * share.  Not part of the binding (build_ffi.py reads only netplex_core.h).
 *
 * Where things live (one responsibility per file):
 *   tx.c          guards and the redo log: the transaction primitive, and the
 *                 wait-free takeover of a guard whose owner is dead
 *   liveness.c    "is this process / actor / recoverer dead?" (never wrong
 *                 about a live one)
 *   identity.c    process slots, actors (one per thread), the thread cache,
 *                 fork, and reclaiming a full table through the reserve
 *   queue.c       FIFO wait queues and wake-ups
 *   acquire.c     semaphore decrement and mutex lock (one implementation)
 *   yield_backoff.h  when a waiter stops yielding its CPU (A8 of acquire.c;
 *                 also the container's reply poll, csrc/fast/)
 *   release.c     semaphore increment (and add n) and mutex unlock, get,
 *                 deltas, cancel
 *   mutex_fast.h  a mutex's one-CAS lock and unlock while nobody waits, and
 *                 obj_lock/obj_unlock: every object guard holder closes it
 *   names.c       lookup / create / destroy
 *   recovery.c    recover(pid): the state machine of a dead process's slot
 *   segment.c     create / attach / close / unlink, the in-flight count
 *   asyncwait.c   waits that cost no thread: records queued like actors,
 *                 the per-process doorbell (W1-W4)
 *   introspect.c  obj_info, proc_info, check
 *   deathwatch.c  a mutex waiter learns of the holder's death from the
 *                 kernel (robust-futex death word, futex_waitv, pidfd)
 *   testpoints.c  crash points (test builds only: crashpoint.h)
 *
 * Invariants every file keeps (each file states its own on top):
 *  I1 Every object field, and the queue links of the actors queued on it
 *     (qnext, waiting_on, wait_gen), change only under the object's guard;
 *     names and `used' also under the name guard.  Lock order: name guard,
 *     then one object guard; never two object guards.
 *  I2 A valid redo log (intent_valid) for guard set G exists only while every
 *     guard of G is held by the log's writer or by a taker-over that took it
 *     from a dead owner.  Logged writes are absolute: applying one twice is
 *     harmless.
 *  I3 A guard word names its owner by actor index AND incarnation, a process
 *     slot names its recoverer the same way: an actor that is freed bumps its
 *     incarnation first, so a name never designates a later owner.
 *  T1 Fencing: a mutex's `token' is bumped by every grant, in the grant's
 *     own transaction (acquire.c) or its CAS (mutex_fast.h, F2), and never
 *     decreases while the object lives: each holder's token is larger than every earlier holder's.
 *  T2 destroy raises the header's token_hw to the destroyed mutex's token
 *     and create starts a mutex at token_hw, both in the transaction that
 *     changes the name (names.c): tokens also grow across destroy/create.
 *  L1 Cache lines: see np_obj / np_actor below.
 *  I4 Dead means dead: only certain evidence (ESRCH/ENOENT, another start
 *     time, a zombie with no live thread) lets anyone act on a process's
 *     behalf.  "Cannot tell" is treated as alive.
 */
#ifndef NETPLEX_CORE_INTERNAL_H
#define NETPLEX_CORE_INTERNAL_H

#include "netplex_core.h"
#include "crashpoint.h"
#include <stdint.h>
#include <sys/types.h>

#define likely(x)   __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#define NOINLINE    __attribute__((noinline))

#define NP_MAGIC          0x314745534c504e4eULL   /* "NNPLSEG1" */
#define NP_LAYOUT_VERSION 9u

/* ---- guard word (32 bits): 0 free, else an owner tag | NP_GUARD_WAITERS.
 * Owner tag = (actor index + 1) | (actor incarnation & 0x7ff) << 20. */
#define NP_GUARD_WAITERS  0x80000000u
#define NP_GUARD_TAG      0x7fffffffu
#define NP_TAG_ACTOR      0x000fffffu     /* actor index + 1 */
#define NP_TAG_INC_SHIFT  20
#define NP_TAG_INC_MASK   0x7ffu
#define NP_ACTORS_MAX     0x000ffffeu     /* so that index + 1 fits NP_TAG_ACTOR */

/* Name table entry: 0 empty, NP_NAME_TOMB deleted (at most one, being
 * compacted: names.c N4), else object index + 1. */
#define NP_NAME_TOMB      0xffffffffu

/* ---- process slot word (64 bits), every transition one CAS:
 * pid (bits 0-21: Linux pids are < 2^22) | state (22-23) | bits 24-63:
 *  - ALIVE: the slot's generation, new at every registration, so a word read
 *    before a slot was freed and taken again never matches (no ABA when the
 *    same pid comes back into the same slot);
 *  - REGISTERING: the registrant's pid namespace (inode, low 40 bits), so
 *    that it is judged only by a process of its namespace (I4);
 *  - RECOVERING: the recoverer = (actor index + 1) | (actor incarnation &
 *    0xfffff) << 20; 0 means "unclaimed: anyone may finish it". */
#define NP_PS_FREE        0u
#define NP_PS_REGISTERING 1u
#define NP_PS_ALIVE       2u
#define NP_PS_RECOVERING  3u
#define NP_PID_MASK       0x3fffffu
#define NP_SLOT_GEN_MASK  0xffffffffffULL
#define NP_REC_INC_MASK   0xfffffu
#define PW_PID(w)   ((int32_t)(uint32_t)((w) & NP_PID_MASK))
#define PW_STATE(w) ((uint32_t)(((w) >> 22) & 0x3u))
#define PW_REC(w)   ((uint64_t)((w) >> 24))
#define PW_MAKE(pid, st, rec) \
    ((uint64_t)((uint32_t)(pid) & NP_PID_MASK) | ((uint64_t)(st) << 22) | ((uint64_t)(rec) << 24))

#define NP_INTENT_MAX     12
#define NP_GEN_MASK       0x7fffffffu     /* handles stay >= 0 as int64 */
#define NP_SLICE_NS       100000000LL     /* a wait returns NP_EINTR after this */
/* Newcomers may take a free unit ahead of queued waiters (no convoy under
 * contention) until the queue's head, having waited this long, ran and was
 * refused a unit (a newcomer took it first); from then on they queue behind
 * it.  Bounds the overtaking: waits are starvation-free (A2). */
#define NP_STARVE_NS      1000000LL
/* Before queueing, a caller whose last releaser ran on another CPU watches
 * the value for this many pauses (a few microseconds): cheaper than a futex
 * sleep and wake-up when the holder is running. */
#define NP_SPIN_ITERS     100
/* Before queueing, a caller whose last releaser ran on this CPU (where a
 * spin would only keep the releaser off the CPU) yields the CPU up to this
 * many times: a releaser sharing the CPU runs and gives a unit back without
 * a futex sleep and wake-up (A8 of acquire.c). */
#define NP_YIELDS         4
/* What a yield that works saves on one CPU: a futex sleep and wake-up
 * (yield_backoff.h sizes the back-off after a slow yield with it). */
#define NP_YIELD_WORTH_NS 1000LL
#define NP_GUARD_SLEEP_NS 10000000LL      /* guard waiters re-check the owner */
#define NP_WAKE_BATCH     64
#define NP_SLEEP_UNTIMED  2u              /* np_actor.sleeping: no timeout (Q6) */
#define NP_RECLAIM_NS     1000000000LL    /* a full table's reclaim: at most 1 s */
/* Internal deadline of a non-blocking acquire's guard wait: give up (EAGAIN)
 * after NP_GUARD_SLEEP_NS instead of waiting a slice: a guard is held for a
 * few instructions, unless its holder is stopped. */
#define NP_GUARD_TRY      (-2LL)

/* liveness verdicts (liveness.c) */
enum { NP_DEAD = 0, NP_ALIVE = 1, NP_UNKNOWN = 2 };

typedef struct {
    uint64_t magic;             /* written last at creation (release) */
    uint32_t version;
    uint32_t hdr_size;
    np_config cfg;
    uint32_t name_cap;          /* power of two >= 2 * (semaphores + mutexes) */
    uint32_t name_guard;        /* guard of the name table */
    uint64_t size;
    uint64_t off_obj, off_names, off_proc, off_actor, off_delta;
    int32_t  creator_pid;
    uint32_t pad0;
    uint64_t creator_start;
    uint64_t creator_pidns;
    /* T2: at least the last fencing token of every destroyed mutex; a
     * created mutex starts from it.  Written under the name guard, logged. */
    uint64_t token_hw;
    /* N6 (names.c): per kind (0 semaphores, 1 mutexes), the first free object
     * (index + 1, 0: none; linked by np_obj.next_free) and the next object
     * never used; N4: slot + 1 of the one tombstone being compacted, or 0.
     * Written under the name guard, logged. */
    uint32_t free_head[2];
    uint32_t fresh[2];
    uint32_t name_hole;
    uint32_t rec_epoch;         /* bumped by each recovery before it wakes the
                                 * untimed sleepers (A3u of acquire.c, Q6) */
    uint64_t name_key[2];       /* N7: the name hash's key, random, set at creation */
} np_hdr;

/* Semaphores are objects [0, S), mutexes [S, S + M): one array, two tables. */
typedef struct {
    uint32_t guard;             /* futex guard word, see NP_GUARD_* */
    uint32_t used;              /* 1 while the name maps to this object */
    uint32_t gen;               /* bumped by destroy; part of the handle */
    uint32_t protected_;        /* semaphores: protected accounting */
    int64_t  value;             /* semaphore value; mutex 1 free, 0 locked (F4) */
    uint32_t qhead, qtail;      /* FIFO of actor index + 1 */
    uint32_t qlen;
    int32_t  rel_cpu;           /* hint: CPU of the last release (not logged) */
    uint32_t purge;             /* hint: a queued actor gave up (not logged) */
    uint32_t next_free;         /* while free: next free object + 1 (names.c, N6) */
    /* A mutex's lock word, changed by one 16-byte CAS (mutex_fast.h, F2). */
    union {
        struct {
            uint32_t owner;     /* mutex: process slot + 1 of the holder */
            uint32_t fast;      /* gen | NP_FAST_OPEN while the fast path is open (F1, F3) */
            uint64_t token;     /* mutex: fencing token of the last grant (T1) */
        };
        unsigned __int128 lk;
    };
    /* L1: everything above is one cache line */
    char     name[NP_NAME_MAX + 1];
} np_obj;

/* Slots [0, processes) are for processes; slot `processes' is the reserve
 * (identity.c: reclaiming a full table).  Same for actors. */
typedef struct {
    uint64_t w;                 /* PW_* word */
    uint64_t start_time;        /* valid once state is ALIVE */
    uint64_t pidns;             /* inode of its pid namespace (0 unknown) */
    uint64_t gen;               /* generation of the last registration */
    uint32_t bell;              /* doorbell: bumped when one of its async records is woken (W2) */
    uint32_t bell_sleeping;     /* 1 while its helper thread may sleep on `bell' */
    uint32_t death;             /* death-watch word: watcher tid | FUTEX_WAITERS |
                                 * FUTEX_OWNER_DIED set by the kernel (deathwatch.c) */
    uint32_t interrupted;       /* 1 once np_interrupt_waits named this registration:
                                 * its waits sleep in slices (A3 of acquire.c) */
} np_proc;

typedef struct {
    uint64_t off;               /* offset in the segment */
    uint64_t val;
    uint32_t width;             /* 4 or 8 */
    uint32_t pad;
} np_redo;

typedef struct {
    union {
        struct {
            uint32_t proc;      /* process slot + 1 that owns it; 0 free */
            uint32_t inc;       /* incarnation: bumped when it is freed */
        };
        uint64_t own;           /* both: claimed and freed by one CAS (S2) */
    };
    int32_t  tid;
    uint32_t wake;              /* futex word this actor sleeps on */
    uint32_t sleeping;          /* while it may be in futex_wait on `wake': 1, or
                                 * NP_SLEEP_UNTIMED without a timeout (A3u, Q6) */
    uint32_t cancel_pending;    /* 1: gave up a wait it could not leave (owner-written) */
    uint32_t orphan;            /* orphan_mark(inc): its thread left it in a queue (Q5); else 0 */
    uint32_t qnext;             /* next in the wait queue (actor + 1) */
    uint32_t waiting_on;        /* object index + 1 of the queue it is in */
    uint32_t wait_gen;          /* generation of that object when queued */
    uint32_t intent_valid;      /* 1: the redo log below must be applied */
    uint32_t intent_n;
    uint32_t intent_guard;      /* guard id + 1 the log belongs to */
    uint32_t intent_guard2;     /* second guard id + 1 (create/destroy), or 0 */
    int64_t  wait_since;        /* CLOCK_MONOTONIC ns when it was queued */
    uint32_t armed;             /* async records: 1 while a wake-up is to be reported (W2) */
    uint32_t seen;              /* async records: `wake' when it was armed */
    np_redo  intent[NP_INTENT_MAX];
    int64_t  refused_since;     /* hint: wait_since of the wait in which, at the head
                                 * and starving, it was refused a unit (A2) */
    uint32_t pad_line[4];       /* L1: no line shared with the next actor */
} np_actor;

/* L1: an object's fields that an operation reads and writes (guard, value,
 * owner, token, queue ends, hints) are one cache line, and no two objects or
 * actors share a line (the arrays start 64-aligned, segment.c): an
 * uncontended operation's shared footprint is that one line; its redo log
 * is in its own actor's lines. */
_Static_assert(__builtin_offsetof(np_obj, name) == 64, "np_obj: hot fields in one line");
_Static_assert(__builtin_offsetof(np_obj, lk) == 48, "np_obj: the lock word is 16-byte aligned");
_Static_assert(sizeof(np_obj) % 64 == 0, "np_obj: a multiple of a cache line");
_Static_assert(sizeof(np_actor) % 64 == 0, "np_actor: a multiple of a cache line");

typedef struct {
    uint32_t gen;               /* object generation the delta belongs to */
    uint32_t pad;
    int64_t  delta;
} np_delta;

struct np_domain {
    char      *base;
    size_t     size;
    np_hdr    *h;
    np_obj    *objs;
    uint32_t  *names;
    np_proc   *procs;
    np_actor  *actors;
    np_delta  *deltas;
    uint32_t   nsem, nmtx, nobj, nproc, nact, name_cap;
    uint32_t   rslot, ractor;   /* the reserve slot and actor (== nproc, nact) */
    /* async waiter records: actors [wbase, nall) past the reserve (asyncwait.c) */
    uint32_t   nwt, wbase, nall, wquota;
    uint32_t   aw_count;        /* records this process holds (W3) */
    uint32_t   aw_cursor;       /* where the next claim starts looking */
    uint64_t   aw_epoch;        /* fork epoch aw_count belongs to */
    uint64_t  *aw_mine;         /* bitmap of the records this process holds
                                 * (nwt bits): the doorbell's scan reads
                                 * only those, not the whole table */
    uint64_t   serial;          /* distinguishes domains in thread caches */
    uint32_t   my_proc;         /* process slot + 1, valid when my_epoch matches */
    uint64_t   my_epoch;
    int        inside;          /* calls in progress in this process (segment.c) */
    int        closing;         /* np_domain_close has begun */
    np_domain *next;            /* list of open domains (thread exit) */
    struct np_dw *dw;           /* this process's death-watch thread (deathwatch.c) */
    uint64_t   dw_epoch;        /* fork epoch it belongs to */
    int        dw_ready;        /* its watcher has run (np_dw_ready) */
};

/* ---- process-local state (identity.c) ---- */
extern uint64_t np_fork_epoch;          /* bumped in the child after fork() */

typedef struct {
    np_domain *d;
    uint64_t   serial, epoch;
    uint32_t   actor;
    uint32_t   tag;                     /* guard owner tag of that actor */
} np_tcache;
#define NP_TCACHE 8
extern __thread np_tcache np_tc[NP_TCACHE];

/* ---- shared helpers ---- */
int64_t np_now(void);
int  np_futex_wait(uint32_t *w, uint32_t val, int64_t ns);
int  np_futex_wait_untimed(uint32_t *w, uint32_t val);
void np_futex_wake(uint32_t *w, int n);
void np_wake_slot_actors(np_domain *d, uint32_t slot1);
void np_wake_untimed(np_domain *d, const uint32_t *listed, int n);
void np_wake_untimed_of(np_domain *d, uint32_t idx1, uint32_t gen);

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline uint64_t seg_off(np_domain *d, const void *p)
{
    return (uint64_t)((const char *)p - d->base);
}

static inline uint32_t *guard_word(np_domain *d, uint32_t g)
{
    return g < d->nobj ? &d->objs[g].guard : &d->h->name_guard;
}

static inline np_delta *delta_of(np_domain *d, uint32_t proc, uint32_t sem)
{
    return &d->deltas[(size_t)proc * d->nsem + sem];
}

static inline uint32_t actor_tag(uint32_t a, uint32_t inc)
{
    return (a + 1) | ((inc & NP_TAG_INC_MASK) << NP_TAG_INC_SHIFT);
}

static inline uint64_t actor_rec(uint32_t a, uint32_t inc)
{
    return (uint64_t)(a + 1) | ((uint64_t)(inc & NP_REC_INC_MASK) << 20);
}

/* saturating int64 addition: counts never wrap (I: values in [0, MAX]) */
static inline int64_t sat_add(int64_t a, int64_t b)
{
    int64_t r;
    if (__builtin_add_overflow(a, b, &r))
        return b > 0 ? INT64_MAX : INT64_MIN;
    return r;
}

/* ---- identity.c ---- */
int  np_my_actor_slow(np_domain *d, uint32_t *actor, uint32_t *tag);
static inline int my_actor(np_domain *d, uint32_t *actor, uint32_t *tag)
{
    np_tcache *c = &np_tc[0];
    if (likely(c->d == d && c->serial == d->serial && c->epoch == np_fork_epoch)) {
        *actor = c->actor;
        *tag = c->tag;
        return 0;
    }
    return np_my_actor_slow(d, actor, tag);
}
void np_ensure_self(void);
extern int32_t  np_my_pid;
extern uint64_t np_my_start;
extern uint64_t np_my_pidns;
int  np_reserve_enter(np_domain *d, uint32_t *actor, uint32_t *tag, int64_t deadline);
void np_reserve_leave(np_domain *d);
void np_abandon_actor(np_domain *d, uint32_t x);
int  np_release_orphan(np_domain *d, uint32_t x);
/* An orphan mark names the incarnation it was set in: freeing an entry bumps
 * its incarnation, so a mark left behind by a freed orphan never matches the
 * next owner, who claims the entry (one CAS on `own') a few instructions
 * before it clears the mark (S2, Q5). */
static inline uint32_t orphan_mark(uint32_t inc) { return (inc << 1) | 1u; }

/* Claim free actor-table entry x (a thread's actor or an async record) for
 * process slot mp (+1): one CAS on `own' (S2).  The caller then resets it
 * with entry_reset, after a crash point. */
static inline int entry_claim(np_actor *x, uint32_t mp)
{
    uint64_t o = __atomic_load_n(&x->own, __ATOMIC_RELAXED);
    if ((uint32_t)o != 0)
        return 0;
    /* acquire: the previous owner's (or recovery's) stores are visible. */
    return __atomic_compare_exchange_n(&x->own, &o, o | mp, 0, __ATOMIC_ACQUIRE,
                                       __ATOMIC_RELAXED);
}

/* A claimed entry's queue state and log, as new (its owner's stores only). */
static inline void entry_reset(np_actor *x)
{
    x->qnext = 0;
    x->waiting_on = 0;
    x->cancel_pending = 0;
    x->orphan = 0;
    x->intent_n = 0;
    __atomic_store_n(&x->intent_valid, 0, __ATOMIC_RELAXED);
}
int  np_purge_orphans(np_domain *d, uint32_t me, uint32_t tag, int64_t deadline);
void np_tcache_drop(np_domain *d);
void np_identity_init(void);
#include <pthread.h>
extern pthread_mutex_t np_dom_mu;      /* guards np_dom_list */
extern np_domain *np_dom_list;          /* open domains of this process */
/* Free actor x if it is still the incarnation `own' (a snapshot of its own
 * word): one CAS own -> (0, inc + 1), so it is freed exactly once even when
 * several processes try (recovery, a purge, its thread).  1 if we freed it. */
int  np_free_actor(np_domain *d, uint32_t x, uint64_t own);
int np_reserve_recover(np_domain *d, uint32_t me, uint32_t tag, int32_t pid, int64_t deadline);

/* ---- liveness.c ---- */
int np_proc_state(int32_t pid, uint64_t start, uint64_t pidns);   /* NP_DEAD / ALIVE / UNKNOWN */
int np_slot_state(np_domain *d, uint32_t p);
int np_slot_word_state(np_domain *d, uint32_t p, uint64_t w);
int np_registering_state(uint64_t w);
int np_tag_state(np_domain *d, uint32_t tag);               /* guard owner */
int np_rec_state(np_domain *d, uint64_t rec);               /* slot recoverer */

/* ---- tx.c ---- */
int  np_guard_lock_slow(np_domain *d, uint32_t *g, uint32_t tag, int64_t deadline);
void np_guard_takeover(np_domain *d, uint32_t g, uint32_t seen, uint32_t tag);
int  np_settle_intent(np_domain *d, uint32_t x, uint32_t tag, int64_t deadline);

/* 0, or NP_EINTR (a slice passed: call again), NP_ETIMEDOUT (deadline),
 * NP_EAGAIN (NP_GUARD_TRY: busy for NP_GUARD_SLEEP_NS), NP_ECLOSED.
 * NP_NOWAIT and NP_FOREVER both mean "one slice at a time". */
static inline int guard_lock(np_domain *d, uint32_t *g, uint32_t tag, int64_t deadline)
{
    uint32_t z = 0;
    /* acquire: everything the previous holder wrote is visible to us. */
    if (likely(__atomic_compare_exchange_n(g, &z, tag, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)))
        return 0;
    return np_guard_lock_slow(d, g, tag, deadline);
}

static inline void guard_unlock(uint32_t *g)
{
    /* release: our applied writes happen-before the next holder's reads. */
    uint32_t old = __atomic_exchange_n(g, 0, __ATOMIC_RELEASE);
    if (unlikely(old & NP_GUARD_WAITERS))
        np_futex_wake(g, 1);
}

#include "mutex_fast.h"      /* obj_lock, obj_unlock: an object's guard */

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

/* The logged writes of one grant of object idx (value v > 0) to this
 * process, shared by the thread path (acquire.c) and the coroutine path
 * (asyncwait.c): the unit, and the mutex's owner and next fencing token
 * (T1), or the protected delta.  The caller has begun the transaction. */
static inline void tx_grant(np_domain *d, np_actor *a, np_obj *o, uint32_t idx, int kind, int64_t v)
{
    TX64(d, a, o->value, v - 1);
    if (kind == NP_KIND_MUTEX) {
        TX32(d, a, o->owner, d->my_proc);
        TX64(d, a, o->token, o->token + 1);     /* T1 */
    } else if (o->protected_) {
        np_delta *e = delta_of(d, d->my_proc - 1, idx);
        int64_t cur = e->gen == o->gen ? e->delta : 0;
        TX32(d, a, e->gen, o->gen);
        TX64(d, a, e->delta, sat_add(cur, -1));
    }
}

static inline void redo_apply(np_domain *d, np_actor *a)
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

static inline void tx_commit(np_domain *d, np_actor *a)
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

/* With object idx's guard held by actor a: 0 if the handle's generation
 * `gen' is still the object's.  Otherwise the guard is released and the
 * result is NP_EDESTROYED when waiter x (a itself, or a's async record) was
 * queued on that generation -- its mark cleared, logged (A4) -- else
 * NP_ESTALE (the caller looks the name up again). */
static inline int obj_gone(np_domain *d, np_actor *a, np_actor *x, np_obj *o, uint32_t idx,
                           uint32_t gen)
{
    if (likely(o->used && o->gen == gen))
        return 0;
    if (x->waiting_on == idx + 1 && x->wait_gen == gen) {
        tx_begin(a, idx, 0);
        TX32(d, a, x->waiting_on, 0);
        tx_commit(d, a);
        obj_unlock(d, o);
        CRASHPOINT();
        np_wake_untimed_of(d, idx + 1, gen);       /* Q6 of queue.c */
        return NP_EDESTROYED;
    }
    obj_unlock(d, o);
    return NP_ESTALE;
}

/* ---- queue.c (caller holds the object's guard) ---- */
uint32_t np_q_pos(np_domain *d, np_obj *o, uint32_t a);
void np_tx_q_remove(np_domain *d, np_actor *me, np_obj *o, uint32_t victim);
void np_tx_q_append(np_domain *d, np_actor *me, uint32_t ai, np_obj *o, uint32_t idx, int64_t now);
void np_tx_q_append_rec(np_domain *d, np_actor *me, uint32_t ai, np_obj *o, uint32_t idx, int64_t now);
int  np_q_collect(np_domain *d, np_obj *o, uint32_t *out);
int  np_q_collect_n(np_domain *d, np_obj *o, uint32_t *out, int max);
/* Waiter xi leaves the queue of object w - 1 (its guard held by actor a),
 * or only loses its mark when that object was destroyed since it queued;
 * returns how many of those behind it are entitled now (in who[], to wake
 * once the guard is released): it may have been entitled itself. */
int  np_q_leave(np_domain *d, np_actor *a, uint32_t xi, np_obj *o, uint32_t w, uint32_t *who);
void np_q_purge(np_domain *d, np_actor *me, np_obj *o);
void np_wake_actors(np_domain *d, const uint32_t *who, int n);

/* A2, with o's guard held and v > 0: may a caller that is not queued take a
 * unit ahead of the queue?  Yes unless its head was refused one while
 * starving (np_head_refused) during its current wait.  A head that has not
 * run since it starved reserves nothing: newcomers keep the unit busy while
 * the scheduler gets to it, so overtaking never idles the object. */
static inline int np_newcomer_may_take(np_domain *d, const np_obj *o)
{
    if (!o->qlen)
        return 1;
    const np_actor *h = &d->actors[o->qhead - 1];
    return __atomic_load_n(&h->refused_since, __ATOMIC_RELAXED) != h->wait_since;
}

/* A2, with o's guard held: queued waiter xi was refused a unit.  At the head
 * and waiting for NP_STARVE_NS, it reserves the next unit: 1 (it then stays
 * awake for a few microseconds, the holder being likely to run), else 0. */
static inline int np_head_refused(np_domain *d, const np_obj *o, uint32_t xi, int64_t now)
{
    np_actor *x = &d->actors[xi];
    if (o->qhead != xi + 1 || now - x->wait_since < NP_STARVE_NS)
        return 0;
    __atomic_store_n(&x->refused_since, x->wait_since, __ATOMIC_RELAXED);
    return 1;
}

/* Q3: a queued actor that could not have its object's guard gives up its
 * wait; seq_cst: the flag is visible before the hint that says look. */
static inline void np_give_up(np_obj *o, np_actor *a)
{
    __atomic_store_n(&a->cancel_pending, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&o->purge, 1, __ATOMIC_SEQ_CST);
}

/* ---- deathwatch.c ---- */
void np_dw_start(np_domain *d, uint32_t p);
void np_dw_stop(np_domain *d);
void np_dw_ready(np_domain *d);
int  np_dw_sleep(np_domain *d, uint32_t *wake, uint32_t w, int64_t until, uint32_t p);
void np_dw_dead(np_domain *d, uint32_t me, uint32_t tag, uint32_t p, uint64_t pw, int64_t until);

/* ---- names.c ---- */
uint32_t np_name_find(np_domain *d, const char *name, uint32_t *slot);
uint32_t np_name_home(np_domain *d, const char *name);     /* hash & (name_cap - 1) */

/* ---- recovery.c ---- */
/* Recover slot p if its process is certainly dead (or its recovery was
 * abandoned).  1 recovered, 0 nothing to do, <0 could not finish now (the
 * slot is left for anyone to finish; *unknown set when liveness was unclear). */
int np_recover_slot(np_domain *d, uint32_t me, uint32_t tag, uint32_t p, int64_t deadline);
int np_recover_judged(np_domain *d, uint32_t me, uint32_t tag, uint32_t p, uint64_t w,
                      int64_t deadline);
int np_recover_all_dead(np_domain *d, uint32_t me, uint32_t tag, int64_t deadline);
int np_leave_slot(np_domain *d, uint32_t me, uint32_t tag, uint32_t p, int64_t deadline);

/* ---- handles ---- */
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

/* ---- segment.c: the in-flight count np_domain_close waits for ---- */
#define NP_ENTER(d) do { \
        __atomic_add_fetch(&(d)->inside, 1, __ATOMIC_SEQ_CST); \
        if (unlikely(__atomic_load_n(&(d)->closing, __ATOMIC_SEQ_CST))) { \
            __atomic_sub_fetch(&(d)->inside, 1, __ATOMIC_RELEASE); \
            return NP_ECLOSED; \
        } \
    } while (0)
#define NP_LEAVE(d) __atomic_sub_fetch(&(d)->inside, 1, __ATOMIC_RELEASE)

/* 1 while close waits for the calls in progress: waits end (NP_ECLOSED).
 * 2 while close gives back what the process held: new calls still refused. */
static inline int closing(np_domain *d)
{
    return __atomic_load_n(&d->closing, __ATOMIC_RELAXED) == 1;
}

/* internal (uncounted) operations; the exported functions wrap them */
int64_t np_i_acquire(np_domain *d, uint64_t handle, int64_t deadline, int kind);
int64_t np_i_release(np_domain *d, uint64_t handle, int kind, int64_t guard_deadline);
int64_t np_i_release_mutex(np_domain *d, uint64_t handle, int64_t guard_deadline, int force);
int64_t np_i_wait_cancel(np_domain *d);

#endif
