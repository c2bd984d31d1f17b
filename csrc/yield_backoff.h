/*
 * yield_backoff.h -- when a waiter stops yielding its CPU: one policy for a
 * semaphore or mutex waiter (A8 of acquire.c) and for a container's poll
 * for its reply (C5 of fast/container_channel.c).  Process-local state (a
 * thread's, or the one channel's), never shared memory: a hint.
 *
 * Yielding saves a sleep and a wake-up (about a microsecond) when the
 * process we wait for runs on our CPU; when another process's work runs
 * there instead, a yield puts us behind it for its time slice (milliseconds),
 * where a sleeper woken by the release or the reply would have preempted
 * it.  One slow yield costs what thousands of good ones save, so:
 *  Y1 A slow yield (YB_SLOW_NS off the CPU) makes the next `pen' waits
 *     sleep without yielding; pen starts at 64 and is multiplied by 8 at
 *     each slow yield, up to 4096.
 *  Y2 A wait that yielded, with no slow yield, and got what it waited for
 *     halves pen (a CPU that is busy only now and then costs a slow yield
 *     per thousands of waits; one that became idle has its waits yield
 *     again after a few thousand).
 */
#ifndef NP_YIELD_BACKOFF_H
#define NP_YIELD_BACKOFF_H

#include <stdint.h>

#define YB_SLOW_NS  50000LL
#define YB_FIRST    64u
#define YB_MAX      4096u

typedef struct {
    uint32_t skip;      /* waits left that sleep without yielding */
    uint32_t pen;       /* Y1: the next run's length */
} yb_state;

/* 1 if this wait may yield (uses up one of the skipped waits if not). */
static inline int yb_may_yield(yb_state *s)
{
    if (__builtin_expect(!s->skip, 1))
        return 1;
    s->skip--;
    return 0;
}

static inline void yb_slow(yb_state *s)             /* Y1 */
{
    s->pen = s->pen ? (s->pen < YB_MAX / 8 ? 8 * s->pen : YB_MAX) : YB_FIRST;
    s->skip = s->pen;
}

static inline void yb_worked(yb_state *s)           /* Y2 */
{
    s->pen >>= 1;
}

#endif
