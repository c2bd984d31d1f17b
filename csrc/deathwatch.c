/*
 * deathwatch.c — a mutex waiter learns of the holder's death when the
 * kernel does, not after a slice.
 *
 * How: every registered process runs one small thread per domain (the
 * death-watch thread) whose kernel robust-futex list holds one entry: its
 * slot's `death' word, which holds that thread's tid.  When the process ends
 * (however: SIGKILL included), the kernel walks the list of each exiting
 * thread and, for a word holding the thread's tid, sets FUTEX_OWNER_DIED and
 * wakes one waiter sleeping on it (futex(2), "robust futexes").  A thread
 * waiting for a mutex held by process p sleeps on its own wake word AND on
 * p's death word (futex_waitv); woken by the death, it looks at p until
 * every thread of p is past user code for good (L1 of liveness.c) or p has
 * exited, then recovers its slot (recovery.c) -- which unlocks the mutex and
 * wakes the queue.
 *
 * Where the time goes (SIGKILL of a Python holder, 2 vCPUs): the word is
 * marked ~0.1 ms after the kill (the watcher thread's exit_mm); the other
 * threads are past PF_EXITING soon after; then the process frees its
 * memory (~1 ms), releases its files (a flock is free here) and only then
 * becomes a zombie (its pidfd readable).  Acting on L1 instead of the pidfd
 * saves that teardown; the recovery itself is ~0.15 ms (recovery.c).
 *
 * Invariants kept here
 *  D1 The death word is only a hint.  Nothing is done on a process's behalf
 *     because of it: a thread of p may still run user code for a moment
 *     after its watcher's word fired, and p may even live on (its watcher
 *     killed by another thread's exec).  The recovery it triggers judges
 *     liveness exactly (I4), and a waiter that finds the process alive goes
 *     back to its ordinary wait at the end of the slice (a few looks per
 *     slice).  So a stale, missing or false signal costs at most the
 *     ordinary slice (A3 of acquire.c).
 *  D2 The word names its watcher by tid and the kernel only touches a word
 *     holding the exiting thread's own tid: a word left by an earlier
 *     process of the slot is never changed by anyone else's death.
 *     Registration zeroes it (S1, identity.c) before the slot is ALIVE; the
 *     thread stores its tid when it first runs.  Registration does not wait
 *     for that (under load it would cost every process a scheduling delay);
 *     a process's first mutex lock does (np_dw_ready, bounded), so a mutex
 *     is never held by a process whose death would go unsignalled.
 *  D3 close, before the slot is left and the segment unmapped, clears the
 *     word from the watcher's exact value (a later registrant's word is
 *     never clobbered) and empties the watcher's robust list (it lives in
 *     our memory, the kernel reads it only when the thread exits): the
 *     kernel never walks into an unmapped or reused address.  The thread
 *     (detached) then leaves when it is scheduled and frees its record.  After
 *     fork() the child has no such thread: it registers anew and starts its
 *     own (the epoch check below).
 *  D4 Without futex_waitv (ENOSYS) or when the thread could not be started,
 *     everything behaves as before: plain futex waits, the slice's check.
 */
#define _GNU_SOURCE
#include "core_internal.h"

#include <errno.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef FUTEX_32
#define FUTEX_32 2
struct futex_waitv {
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t __reserved;
};
#endif

struct np_dw {
    struct robust_list_head head;       /* registered with set_robust_list */
    struct robust_list entry;           /* entry + futex_offset == word */
    uint32_t *word;                     /* &procs[slot].death (shared) */
    pthread_mutex_t mu;                 /* orders the thread's arming with close */
    uint32_t stop;                      /* private futex: 1 = leave (under mu) */
    uint32_t armed;                     /* the word holds tid (under mu) */
    uint32_t started;                   /* private futex: 1 once it ran (np_dw_ready) */
    uint32_t tid;
};

/* np_dw_dead: first and longest sleep between two looks at a dying process */
#define NP_DW_LOOK_NS      50000LL
#define NP_DW_LOOK_MAX_NS  10000000LL
#define NP_DW_LOOK_FAST_NS 2000000LL

static int waitv_missing;               /* ENOSYS seen: plain waits (D4) */

/* What an exiting watcher leaves registered: nothing to walk. */
static struct robust_list_head empty_head = {{&empty_head.list}, 0, NULL};

static void *dw_main(void *arg)
{
    struct np_dw *w = arg;
    w->entry.next = &w->head.list;
    w->head.list.next = &w->entry;
    w->head.futex_offset = (long)((char *)w->word - (char *)&w->entry);
    w->head.list_op_pending = NULL;
    pthread_mutex_lock(&w->mu);
    if (!w->stop && syscall(SYS_set_robust_list, &w->head, sizeof w->head) == 0) {
        w->tid = (uint32_t)syscall(SYS_gettid) & FUTEX_TID_MASK;
        /* seq_cst: visible to waiters at once (D2). */
        __atomic_store_n(w->word, w->tid, __ATOMIC_SEQ_CST);
        w->armed = 1;
    }
    __atomic_store_n(&w->started, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &w->started, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
    pthread_mutex_unlock(&w->mu);
    while (!__atomic_load_n(&w->stop, __ATOMIC_SEQ_CST))
        syscall(SYS_futex, &w->stop, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
    /* close has cleared the word and emptied our list (np_dw_stop); once it
     * has let go of w, nothing else refers to it. */
    syscall(SYS_set_robust_list, &empty_head, sizeof empty_head);
    pthread_mutex_lock(&w->mu);
    pthread_mutex_unlock(&w->mu);
    pthread_mutex_destroy(&w->mu);
    free(w);
    return NULL;
}

/* Start the death-watch thread of this process for slot p (just registered).
 * It arms the word when it first runs; until then a death is not signalled
 * (D1: the slice and the supervisor still find it).  Nothing waits for it. */
void np_dw_start(np_domain *d, uint32_t p)
{
    struct np_dw *w = calloc(1, sizeof *w);
    if (!w)
        return;
    w->word = &d->procs[p].death;
    pthread_mutex_init(&w->mu, NULL);
    pthread_attr_t attr;
    pthread_t th;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);     /* born with every signal blocked */
    int rc = pthread_create(&th, &attr, dw_main, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        pthread_mutex_destroy(&w->mu);
        free(w);
        return;
    }
    d->dw = w;
    d->dw_epoch = np_fork_epoch;
    d->dw_ready = 0;
}

/* Before this process's first mutex grant (acquire.c): wait, a bounded
 * while, until its watcher has run, so that a mutex it holds is released by
 * its death at kernel speed even if it dies at once (D2).  Once per process
 * and domain; processes that never lock a mutex never wait. */
NOINLINE void np_dw_ready(np_domain *d)
{
    struct np_dw *w = d->dw;
    if (w && d->dw_epoch == np_fork_epoch) {
        int64_t end = np_now() + 100000000LL;
        while (!__atomic_load_n(&w->started, __ATOMIC_SEQ_CST)) {
            int64_t left = end - np_now();
            if (left <= 0)
                break;
            struct timespec ts = {left / 1000000000LL, left % 1000000000LL};
            syscall(SYS_futex, &w->started, FUTEX_WAIT_PRIVATE, 0, &ts, NULL, 0);
        }
    }
    d->dw_ready = 1;
}

/* close, before the slot is left and the segment unmapped (D3): the word is
 * cleared from its exact value (a later registrant's is never clobbered),
 * its sleepers woken (they go back to their ordinary wait), the thread's
 * list emptied -- all by us, now, so the thread may take its time to leave
 * (it frees w).  A child after fork() has no such thread: not ours. */
void np_dw_stop(np_domain *d)
{
    struct np_dw *w = d->dw;
    if (!w)
        return;
    d->dw = NULL;
    if (d->dw_epoch != np_fork_epoch)
        return;
    pthread_mutex_lock(&w->mu);
    w->stop = 1;
    if (w->armed) {
        uint32_t v = __atomic_load_n(w->word, __ATOMIC_SEQ_CST);
        while ((v & FUTEX_TID_MASK) == w->tid
               && !__atomic_compare_exchange_n(w->word, &v, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            ;
        __atomic_store_n(&w->head.list.next, &w->head.list, __ATOMIC_SEQ_CST);
        np_futex_wake(w->word, 0x7fffffff);
    }
    __atomic_store_n(&w->stop, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &w->stop, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    pthread_mutex_unlock(&w->mu);
}

/* Sleep on *wake while it holds w, until `until' (CLOCK_MONOTONIC ns), and
 * on the death word of slot p.  1 when that word says p's watcher died
 * (OWNER_DIED), 0 otherwise (woken, timed out, or no usable word: then the
 * sleep was a plain one on *wake). */
int np_dw_sleep(np_domain *d, uint32_t *wake, uint32_t w, int64_t until, uint32_t p)
{
    uint32_t *dw = &d->procs[p].death;
    uint32_t v = __atomic_load_n(dw, __ATOMIC_SEQ_CST);
    if (v & FUTEX_OWNER_DIED)
        return 1;
    if (!(v & FUTEX_TID_MASK) || __atomic_load_n(&waitv_missing, __ATOMIC_RELAXED)) {
        np_futex_wait(wake, w, until - np_now());
        return 0;
    }
    if (!(v & FUTEX_WAITERS)) {
        /* the kernel wakes a sleeper only if this bit says there is one */
        if (!__atomic_compare_exchange_n(dw, &v, v | FUTEX_WAITERS, 0,
                                         __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return (v & FUTEX_OWNER_DIED) ? 1 : 0;      /* changed: look again */
        v |= FUTEX_WAITERS;
    }
    struct futex_waitv fw[2] = {
        {.val = w, .uaddr = (uint64_t)(uintptr_t)wake, .flags = FUTEX_32},
        {.val = v, .uaddr = (uint64_t)(uintptr_t)dw, .flags = FUTEX_32},
    };
    int64_t ns = until < 0 ? 0 : until;
    struct timespec ts = {ns / 1000000000LL, ns % 1000000000LL};
    if (syscall(SYS_futex_waitv, fw, 2, 0, &ts, CLOCK_MONOTONIC) < 0 && errno == ENOSYS) {
        __atomic_store_n(&waitv_missing, 1, __ATOMIC_RELAXED);
        np_futex_wait(wake, w, until - np_now());
        return 0;
    }
    return (__atomic_load_n(dw, __ATOMIC_SEQ_CST) & FUTEX_OWNER_DIED) ? 1 : 0;
}

/* p's watcher died: judge p's death (liveness.c) until `until' at most,
 * then recover its slot (recovery.c) -- which unlocks the mutex and wakes
 * the queue.  pw: the slot word seen when we chose to wait; a slot recovered
 * and taken again meanwhile is left alone.
 *
 * The death word says one thread of p (its watcher) is in do_exit; the
 * other threads may still be on their way out, some even running user code
 * for a moment, so the word alone decides nothing (D1).  p is judged dead
 * when every thread of it is past user code (L1 of liveness.c: about 0.1 ms
 * after the SIGKILL, while its memory is still being torn down) or has
 * exited.  Between two looks we sleep on p's pidfd (readable when p has
 * exited): 50 us during the first 2 ms (a look that finds a thread not yet
 * exiting costs ~10 us), then twice as long each time, up to 10 ms: a p
 * that lives on after all costs about 50 looks per slice (A3), and no
 * recovery. */
void np_dw_dead(np_domain *d, uint32_t me, uint32_t tag, uint32_t p, uint64_t pw, int64_t until)
{
    np_proc *s = &d->procs[p];
    int64_t woke = np_now();
    if (__atomic_load_n(&s->w, __ATOMIC_ACQUIRE) != pw)
        return;                         /* recovered already */
    int32_t pid = PW_PID(pw);
    /* the fields of pw's generation (acquire above); if the slot changed
     * since, the claim from pw fails (V4 of recovery.c) */
    uint64_t start = __atomic_load_n(&s->start_time, __ATOMIC_RELAXED);
    uint64_t pidns = __atomic_load_n(&s->pidns, __ATOMIC_RELAXED);
    int dead = 0;
    if (PW_STATE(pw) == NP_PS_ALIVE && pidns == np_my_pidns && pid > 0) {
        /* the pid may name a later process: its pidfd only wakes us early */
        int fd = (int)syscall(SYS_pidfd_open, pid, 0);
        int64_t step = NP_DW_LOOK_NS;
        for (;;) {
            int st = np_proc_state(pid, start, pidns);
            if (st == NP_DEAD) {
                dead = 1;
                break;
            }
            int64_t left = until - np_now();
            if (st != NP_ALIVE || left <= 0 || __atomic_load_n(&s->w, __ATOMIC_ACQUIRE) != pw)
                break;
            if (step > left)
                step = left;
            struct timespec ts = {step / 1000000000LL, step % 1000000000LL};
            struct pollfd pf = {fd, POLLIN, 0};
            ppoll(fd >= 0 ? &pf : NULL, fd >= 0 ? 1 : 0, &ts, NULL);
            if (np_now() - woke >= NP_DW_LOOK_FAST_NS)
                step = step * 2 > NP_DW_LOOK_MAX_NS ? NP_DW_LOOK_MAX_NS : step * 2;
        }
        if (fd >= 0)
            close(fd);
    }
    if (dead)
        np_recover_judged(d, me, tag, p, pw, until);
    else
        np_recover_slot(d, me, tag, p, until);
    if (__atomic_load_n(&s->w, __ATOMIC_ACQUIRE) == pw)
        np_futex_wake(&s->death, 0x7fffffff);   /* not done: let the others try */
}
