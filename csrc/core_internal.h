/*
 * core_internal.h — memory layout of a netplex segment and the helpers the
 * core's .c files share.  Not part of the binding (build_ffi.py reads only
 * netplex_core.h).  The invariants are stated once, in netplex_core.c.
 */
#ifndef NETPLEX_CORE_INTERNAL_H
#define NETPLEX_CORE_INTERNAL_H

#include "netplex_core.h"
#include <stdint.h>
#include <sys/types.h>

#define NP_MAGIC          0x314745534c504e4eULL   /* "NNPLSEG1" */
#define NP_LAYOUT_VERSION 3u

/* Guard word: 0 free, else (owner actor index + 1) | NP_GUARD_WAITERS. */
#define NP_GUARD_WAITERS  0x80000000u
#define NP_GUARD_OWNER    0x7fffffffu

/* Name table entry: 0 empty, NP_NAME_TOMB deleted, else object index + 1. */
#define NP_NAME_TOMB      0xffffffffu

/* Process slot word: pid (bits 0-31) | state (bits 32-39) | recoverer
 * actor index + 1 (bits 40-63, only in NP_PS_RECOVERING).  One word so that
 * every transition of a slot is a single compare-and-swap. */
#define NP_PS_FREE        0u
#define NP_PS_REGISTERING 1u
#define NP_PS_ALIVE       2u
#define NP_PS_RECOVERING  3u
#define PW_PID(w)   ((int32_t)(uint32_t)((w) & 0xffffffffu))
#define PW_STATE(w) ((uint32_t)(((w) >> 32) & 0xffu))
#define PW_REC(w)   ((uint32_t)((w) >> 40))
#define PW_MAKE(pid, st, rec) \
    ((uint64_t)(uint32_t)(pid) | ((uint64_t)(st) << 32) | ((uint64_t)(rec) << 40))

#define NP_INTENT_MAX     12
#define NP_GEN_MASK       0x7fffffffu     /* handles stay >= 0 as int64 */
#define NP_SLICE_NS       100000000LL     /* a wait returns NP_EINTR after this */
/* Newcomers may take a free unit ahead of queued waiters (no convoy under
 * contention) until the queue's head has waited this long; from then on they
 * queue behind it.  Bounds the overtaking: waits are starvation-free. */
#define NP_STARVE_NS      1000000LL
/* Before queueing, a caller whose last releaser ran on another CPU watches
 * the value for this many pauses (a few microseconds): cheaper than a futex
 * sleep and wake-up when the holder is running.  No spin when the releaser
 * shares our CPU: it cannot run while we spin. */
#define NP_SPIN_ITERS     100
#define NP_GUARD_SLEEP_NS 10000000LL      /* guard waiters re-check the owner */
#define NP_WAKE_BATCH     64

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
} np_hdr;

/* Semaphores are objects [0, S), mutexes [S, S + M): one array, two tables. */
typedef struct {
    uint32_t guard;             /* futex guard word, see NP_GUARD_* */
    uint32_t used;              /* 1 while the name maps to this object */
    uint32_t gen;               /* bumped by destroy; part of the handle */
    uint32_t protected_;        /* semaphores: protected accounting */
    int64_t  value;             /* semaphore value; mutex 1 free, 0 locked */
    uint32_t owner;             /* mutex: process slot + 1 of the holder */
    uint32_t qhead, qtail;      /* FIFO of actor index + 1 */
    uint32_t qlen;
    int32_t  rel_cpu;           /* hint: CPU of the last release (not logged) */
    char     name[NP_NAME_MAX + 1];
} np_obj;

typedef struct {
    uint64_t w;                 /* PW_* word */
    uint64_t start_time;        /* valid once state is ALIVE */
} np_proc;

typedef struct {
    uint64_t off;               /* offset in the segment */
    uint64_t val;
    uint32_t width;             /* 4 or 8 */
    uint32_t pad;
} np_redo;

typedef struct {
    uint32_t proc;              /* process slot + 1 that owns it; 0 free */
    int32_t  tid;
    uint32_t wake;              /* futex word this actor sleeps on */
    uint32_t sleeping;          /* 1 while it may be in futex_wait on `wake' */
    uint32_t qnext;             /* next in the wait queue (actor + 1) */
    uint32_t waiting_on;        /* object index + 1 of the queue it is in */
    uint32_t wait_gen;          /* generation of that object when queued */
    uint32_t intent_valid;      /* 1: the redo log below must be applied */
    uint32_t intent_n;
    uint32_t intent_guard;      /* guard id + 1 the log belongs to */
    uint32_t intent_guard2;     /* second guard id + 1 (create/destroy), or 0 */
    int64_t  wait_since;        /* CLOCK_MONOTONIC ns when it was queued */
    np_redo  intent[NP_INTENT_MAX];
} np_actor;

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
    uint64_t   serial;          /* distinguishes domains in thread caches */
    uint32_t   my_proc;         /* process slot + 1, valid when my_epoch matches */
    uint64_t   my_epoch;
    np_domain *next;            /* list of open domains (thread exit) */
};

#endif
