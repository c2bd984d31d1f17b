/*
 * netplex_core.h — the single list of declarations of the native core.
 *
 * build_ffi.py feeds this file to cffi's cdef (dropping the preprocessor lines
 * other than integer #defines) and #includes it in set_source, so the C
 * compiler checks that the declarations and the definitions agree.  Keep it in
 * the subset of C that cffi's cdef parses: no macros with arguments, no
 * inline functions, integer constants as enums.
 *
 * Conventions
 *  - Every function returns a non-negative result or a negative NP_E* code.
 *    The Python layer turns codes into exceptions in one place.
 *  - A "handle" names one incarnation of a semaphore or mutex:
 *    (generation << 32) | index.  A handle of a destroyed object is stale
 *    (NP_ESTALE); look the name up again.
 *  - Deadlines are absolute CLOCK_MONOTONIC nanoseconds.  NP_NOWAIT means "do
 *    not wait", NP_FOREVER "no deadline".  A wait sleeps at most one slice
 *    (100 ms) and returns NP_EINTR with the caller still queued, so that
 *    Python can run its signal handlers and call again; np_wait_cancel()
 *    leaves the queue.  One exception: the first waiter of a semaphore with
 *    deadline NP_FOREVER sleeps until it is woken -- by a unit, a signal
 *    (NP_EINTR), np_interrupt_waits or np_domain_close -- as sem_wait does
 *    (A3u of acquire.c); NP_SLICED keeps the slices.
 *  - The calling process and thread are registered implicitly on first use
 *    (and again after fork()); the creator of a domain is registered by
 *    np_domain_create, so that the supervisor never needs a free table entry
 *    to recover.  recover(pid) is the supervisor's half of the contract: call
 *    it after reaping pid.
 *  - Waiting for an internal guard honours the same deadline and slice: a
 *    guard held by a stopped process delays a call by at most one slice
 *    (NP_EINTR: call again) and never past its deadline.
 */
#ifndef NETPLEX_CORE_H
#define NETPLEX_CORE_H

#include <stdint.h>
#include <stddef.h>

enum {
    NP_OK         =  0,
    NP_ENOENT     = -1,   /* no such name */
    NP_EEXIST     = -2,   /* name exists (NP_EXCL) */
    NP_EAGAIN     = -3,   /* value is 0 / mutex locked, and no wait asked */
    NP_ETIMEDOUT  = -4,   /* deadline passed; nothing taken, no longer queued */
    NP_EINTR      = -5,   /* wait slice elapsed; still queued: call again or cancel */
    NP_EDESTROYED = -6,   /* the object was destroyed while waiting */
    NP_ESTALE     = -7,   /* the handle's generation is gone */
    NP_ENOSPC_SEM = -8,   /* semaphore table full */
    NP_ENOSPC_MTX = -9,   /* mutex table full */
    NP_ENOSPC_PROC= -10,  /* process table full */
    NP_ENOSPC_ACT = -11,  /* thread (actor) table full */
    NP_EOVERFLOW  = -12,  /* value would exceed NP_VALUE_MAX */
    NP_EINVAL     = -13,  /* bad argument (name length, initial value, kind) */
    NP_ECORRUPT   = -14,  /* the segment failed a consistency check */
    NP_EBADSEG    = -15,  /* not a netplex segment / version mismatch */
    NP_ESYS       = -16,  /* a system call failed; errno is preserved */
    NP_EBUSY      = -17,  /* a sleep cannot start now (already waiting) */
    NP_EKIND      = -18,  /* name exists as the other kind (semaphore vs mutex) */
    NP_ECLOSED    = -19,  /* np_domain_close() was called in this process */
    NP_ENOTHOLDER = -20,  /* mutex unlock by a process that does not hold it */
    NP_ENOSPC_WAIT= -21   /* async waiter table full, or this process's quota used */
};

enum {
    NP_KIND_SEM   = 1,
    NP_KIND_MUTEX = 2
};

/* flags of np_lookup */
enum {
    NP_CREATE    = 1,    /* create when missing */
    NP_EXCL      = 2,    /* with NP_CREATE: fail with NP_EEXIST when it exists */
    NP_PROTECTED = 4     /* a created semaphore is protected */
};

#define NP_NAME_MAX 255
#define NP_NOWAIT -1
#define NP_TRY -2
#define NP_FOREVER 9223372036854775807
/* No deadline either, but the wait returns NP_EINTR at least every slice,
 * even as a semaphore's first waiter (A3u): for a thread that must look at
 * something between slices -- Python's main thread (its signal handlers run
 * only there, and a signal caught just before an untimed sleep, or sent to
 * another thread, or with SA_RESTART, would not end that sleep), a wait with
 * a cancel event. */
#define NP_SLICED 9223372036854775806
#define NP_VALUE_MAX 9223372036854775807

typedef struct np_domain np_domain;

typedef struct {
    uint32_t semaphores;     /* capacity of the semaphore table */
    uint32_t mutexes;        /* capacity of the mutex table */
    uint32_t processes;      /* capacity of the process (owner) table */
    uint32_t actors;         /* capacity of the thread table (waits, intents) */
    uint32_t waiters;        /* capacity of the async waiter table (asyncwait.c) */
    uint32_t waiter_quota;   /* async waiter records one process may hold at once */
} np_config;

typedef struct {
    uint32_t index;
    int32_t  kind;           /* NP_KIND_SEM or NP_KIND_MUTEX */
    uint64_t handle;
    int64_t  value;          /* semaphore value; mutex: 1 free, 0 locked */
    int32_t  protected_;     /* semaphores: protected accounting on */
    int32_t  owner_pid;      /* mutex: pid of the holder, 0 when free */
    uint32_t waiters;        /* threads queued */
    uint32_t reserved;       /* 1: the head of the queue, starving, was refused a
                              * unit: the next one is its (bounded overtaking) */
    int64_t  token;          /* mutex: fencing token of the last grant */
    char     name[256];
} np_obj_info_t;   /* _t: np_obj_info is the function */

typedef struct {
    uint32_t index;
    int32_t  pid;
    uint64_t start_time;     /* /proc/<pid>/stat field 22 at registration */
    int32_t  state;          /* 0 free, 1 alive, 2 being recovered, 3 registering */
    int32_t  reserved;       /* 1: the slot kept for reclaiming a full table */
    uint32_t threads;        /* actors attached */
    uint32_t async_waiters;  /* async waiter records held */
} np_proc_info_t;  /* _t: np_proc_info is the function */

/* ---- domain (segment) lifecycle ---- */
/* Create segment `name` ("/netplex-..."): O_CREAT|O_EXCL, mode 0600, sized for
 * cfg, initialised, mapped.  *out receives the mapping. */
int np_domain_create(const char *name, const np_config *cfg, np_domain **out);
/* Map an existing segment (validates magic, version and size). */
int np_domain_attach(const char *name, np_domain **out);
/* Leave and unmap; the segment stays.  Waits in progress in other threads of
 * this process end with NP_ECLOSED, and calls in progress are waited for;
 * then what this process held through d is given back (as recover would)
 * and its slot and actors are freed.  Safe on NULL. */
void np_domain_close(np_domain *d);
int np_domain_unlink(const char *name);
size_t np_domain_size(const np_domain *d);
int np_domain_config(const np_domain *d, np_config *out);
/* pid and start time of the creating process (stale-segment detection). */
int32_t np_domain_creator_pid(const np_domain *d);
uint64_t np_domain_creator_start(const np_domain *d);
/* 0 only when the creator is certainly gone (as np_process_alive, and within
 * the creator's pid namespace only). */
int np_domain_creator_alive(const np_domain *d);
/* 0 only when nobody may still use the segment: its creator and every
 * process registered in it are certainly gone (the stale-segment rule: a
 * supervisor that attached after its creator died -- gunicorn's binary
 * upgrade -- keeps it alive by being registered). */
int np_domain_in_use(np_domain *d);
/* 0 only when the process pid with that start time is certainly gone (no
 * such pid, another start time, or a zombie with no live thread); 1 when it
 * is alive or when that cannot be told (EMFILE, ENOMEM, unreadable /proc). */
int np_process_alive(int32_t pid, uint64_t start_time);

/* ---- names ---- */
/* Find (or create, per flags) the object `name` of `kind`.  Returns a handle
 * (>= 0) or NP_ENOENT / NP_EEXIST / NP_EKIND / NP_ENOSPC_* / NP_EINVAL.
 * deadline bounds the wait for the name table's internal guard (held by a
 * stopped process, say): NP_NOWAIT or NP_FOREVER: NP_EINTR after a slice
 * (call again); an absolute deadline: NP_ETIMEDOUT; NP_TRY: NP_EAGAIN after
 * a few milliseconds (for the lookup of a non-blocking call). */
int64_t np_lookup(np_domain *d, int32_t kind, const char *name, int32_t flags, int64_t initial,
                  int64_t deadline);

/* ---- semaphores ---- */
/* +1; returns the new value. */
int64_t np_sem_increment(np_domain *d, uint64_t handle);
/* n units at once (n >= 1), in one transaction: the new value, or
 * NP_EOVERFLOW (value + n > NP_VALUE_MAX: nothing changed), NP_EINVAL
 * (n < 1).  Wakes the waiters then entitled, as an increment does. */
int64_t np_sem_add(np_domain *d, uint64_t handle, int64_t n);
/* -1 when positive; returns the new value.  deadline NP_NOWAIT: NP_EAGAIN at
 * 0 (or when the object's internal guard stays busy a few milliseconds: its
 * holder is stopped).  Otherwise waits (FIFO, starvation-free) until the
 * deadline. */
int64_t np_sem_decrement(np_domain *d, uint64_t handle, int64_t deadline);
int64_t np_sem_get(np_domain *d, uint64_t handle);
/* Remove the semaphore; waiters get NP_EDESTROYED. */
int64_t np_sem_destroy(np_domain *d, uint64_t handle);
/* Net protected amount (increments - successful decrements) of pid. */
int64_t np_sem_delta(np_domain *d, uint64_t handle, int32_t pid);
/* The same without the ambiguity of a negative delta and an error code:
 * 0 and the delta in *out, or a negative NP_E* code. */
int64_t np_sem_delta_of(np_domain *d, uint64_t handle, int32_t pid, int64_t *out);

/* ---- mutexes ---- */
/* 0 when locked by the calling process; NP_EAGAIN (NP_NOWAIT), NP_ETIMEDOUT, NP_EINTR. */
int64_t np_mutex_lock(np_domain *d, uint64_t handle, int64_t deadline);
/* Unlock a mutex the calling process holds; NP_ENOTHOLDER (nothing changed)
 * when another process holds it or nobody does.  The holder is a process:
 * any thread of it may unlock. */
int64_t np_mutex_unlock(np_domain *d, uint64_t handle);
/* Unlock whoever holds it (the reference's any-container unlock); a no-op
 * when it is free. */
int64_t np_mutex_force_unlock(np_domain *d, uint64_t handle);
/* The fencing token of the calling process's hold: 0 and the token (>= 1)
 * in *out while it holds the mutex, 0 and 0 in *out when it does not.  Every
 * later holder's token is larger, also across destroy/re-create and across a
 * holder's death. */
int64_t np_mutex_token(np_domain *d, uint64_t handle, int64_t *out);
int64_t np_mutex_destroy(np_domain *d, uint64_t handle);

/* Leave the wait queue the calling thread is in (after NP_EINTR). */
int64_t np_wait_cancel(np_domain *d);

/* ---- supervisor contract ---- */
/* Register the calling process (also done implicitly on first use). */
int64_t np_register(np_domain *d);
/* Release the calling thread's actor (thread exit).  Not needed for correctness. */
int64_t np_thread_detach(np_domain *d);
/* After reaping pid: complete or roll back the operation it died in, revert
 * its protected deltas (clamped at 0 and at NP_VALUE_MAX), release its
 * mutexes, drop its waits, wake waiters, free its slots; and finish any
 * recovery whose recoverer died.  Idempotent; a live process that reuses the
 * pid is left alone.  Returns the number of process slots recovered, or
 * NP_EAGAIN when some work could not be finished by the deadline (a guard
 * held by a stopped process, liveness that cannot be told now): call again
 * later; nothing is lost meanwhile. */
int64_t np_recover(np_domain *d, int32_t pid, int64_t deadline);

/* For a supervisor about to stop pid: from now on, the waits of that
 * process (its current registration) sleep in slices again, and a wait
 * asleep without one returns NP_EINTR, so its Python code can see that it
 * should stop (the controller's interrupt_check).  Returns the number of
 * process slots marked (0: pid is not registered, yet or any more). */
int64_t np_interrupt_waits(np_domain *d, int32_t pid);

/* The four uncontended operations and cancel without the in-flight count
 * that np_domain_close waits for: only for a caller that excludes a
 * concurrent np_domain_close by other means (the accelerator, csrc/fast/,
 * under the GIL).  Same results as the counted functions, except that they
 * wait at most a few milliseconds for a busy internal guard (NP_EAGAIN), so
 * that the GIL is never held for long: the caller then uses the counted
 * function, which waits with the GIL released. */
int64_t np_fast_sem_increment(np_domain *d, uint64_t handle);
int64_t np_fast_sem_decrement(np_domain *d, uint64_t handle, int64_t deadline);
int64_t np_fast_mutex_lock(np_domain *d, uint64_t handle, int64_t deadline);
int64_t np_fast_mutex_unlock(np_domain *d, uint64_t handle);
int64_t np_fast_wait_cancel(np_domain *d);

/* ---- waits that cost no thread (asyncwait.c) ----
 * A record is claimed by the calling process (bound to no thread) and can
 * be queued on one semaphore or mutex at a time, exactly like a thread's
 * wait.  np_aw_acquire never sleeps: it takes (the value, or 0 for a mutex),
 * or queues the record and returns NP_EAGAIN; a later release rings the
 * process's doorbell, which np_aw_wait (one helper thread per process)
 * sleeps on, and reports the records to look at again.  flags: NP_AW_FINAL
 * (the caller's deadline passed: take if entitled, else leave the queue and
 * return NP_ETIMEDOUT).  NP_EINTR: the object's internal guard is busy (a
 * stopped holder): call again later.  np_aw_release leaves the queue and
 * frees the record (cancellation, a timeout, the end of a wait). */
enum { NP_AW_FINAL = 1 };
int64_t np_aw_claim(np_domain *d);
int64_t np_aw_acquire(np_domain *d, uint32_t rec, uint64_t handle, int32_t kind, int32_t flags);
int64_t np_aw_release(np_domain *d, uint32_t rec);
/* Up to max records of this process woken since they were armed, into out;
 * sleeps on the doorbell up to ns when there are none.  0 after ns. */
int64_t np_aw_wait(np_domain *d, uint32_t *out, int32_t max, int64_t ns);
/* Progress without the supervisor (as a thread's wait slice, A3): recover
 * dead processes that this process's queued records wait behind. */
int64_t np_aw_tick(np_domain *d, int64_t deadline);

/* ---- introspection ---- */
int64_t np_obj_info(np_domain *d, int32_t kind, uint32_t index, np_obj_info_t *out);  /* 1 used, 0 free */
int64_t np_proc_info(np_domain *d, uint32_t index, np_proc_info_t *out);               /* 1 used, 0 free */
/* The name table (names.c): entries, tombstones (at most 1), the longest
 * probe of a present name, free objects of each kind.  0. */
typedef struct {
    uint32_t capacity;
    uint32_t entries;
    uint32_t tombstones;
    uint32_t longest_probe;
    uint32_t free_semaphores;
    uint32_t free_mutexes;
} np_name_stats_t;
int64_t np_name_stats(np_domain *d, np_name_stats_t *out);
/* The home entry of name in the name table (its keyed hash, N7): for tests
 * that build probe clusters. */
int64_t np_name_home_of(np_domain *d, const char *name);
/* Consistency check of a quiescent segment: 0 when consistent, else
 * NP_ECORRUPT with a description written into buf. */
int64_t np_check(np_domain *d, char *buf, size_t len);

/* ---- test support ---- */
/* Only when the environment had NETPLEX_CORE_TEST=1 at the first attach:
 * SIGKILL the calling process at the n-th crash point it reaches from now
 * (n >= 1; 0 disarms).  Returns NP_EINVAL otherwise. */
int64_t np_test_crash_after(int64_t n);
/* The signal a crash point sends: SIGKILL (default) or SIGSTOP (once: the
 * process stops there, inside whatever it holds, and runs on after SIGCONT). */
int64_t np_test_crash_signal(int32_t sig);
/* Crash points passed since the last arm (to enumerate steps). */
int64_t np_test_crash_count(void);
/* Test mode only: 0 makes this process skip the mutex fast path (its locks
 * and unlocks take the guarded path, which still reopens the fast path for
 * others), 1 restores it. */
int64_t np_test_fast_mutex(int32_t on);
/* A8 of acquire.c, for tests: this thread's yields before queueing so far
 * (out[0]), those that kept it off the CPU for long (out[1]: each turned
 * yielding off for a while), and the waits that did not yield because of
 * that (out[2]).  Returns 0. */
int64_t np_yield_stats(int64_t *out);
/* Floor of the binding, for bench/: does nothing. */
int64_t np_noop(void);
/* CLOCK_MONOTONIC in ns (deadlines). */
int64_t np_now(void);

#endif
