/*
 * yield_backoff.h -- when a waiter stops yielding its CPU (A8 of acquire.c:
 * a semaphore or mutex waiter yields to a releaser on its CPU; C5 of
 * fast/container_channel.c, which yields between looks for a reply, uses
 * yb_may_yield, and yb_penalize on its own rule: no strikes).  Process-local state (a thread's, or the
 * one channel's), never shared memory: a hint.
 *
 * Yielding saves a sleep and a wake-up (`worth': about a microsecond for a
 * hand-off on one CPU, tens of microseconds for a reply across CPUs) when
 * the process we wait for runs on our CPU or soon answers; when another
 * process's work runs there instead, a yield puts us behind it for its
 * time slice (milliseconds), where a sleeper woken by the release or the
 * reply would have preempted it.  A slow yield also comes now and then
 * on a CPU that nothing else wants: about 1 yield in 1,000 between two
 * processes alone on a CPU of this project's VM took more than 50 us (up to
 * 1.5 ms: the vCPU itself held up, where a sleeper would have waited as
 * long).  So:
 *  Y1 A yield is slow when it kept the caller YB_SLOW_NS or more off the
 *     CPU.  One slow yield alone changes nothing; a second within the next
 *     YB_STRIKES (16) waits that yield (waits, not yields: a poll yields many
 *     times in one wait) says the CPU is busy with other work: the next 8
 *     took/worth waits (at most YB_MAX) sleep without yielding, so a CPU
 *     that stays busy costs about two slow yields per such run, at most a
 *     quarter of what yielding saves however long its time slices.
 *  Y2 After such a run the first slow yield counts as the second (the CPU
 *     was busy when the run began): one slow yield per run.
 */
#ifndef NP_YIELD_BACKOFF_H
#define NP_YIELD_BACKOFF_H

#include <stdint.h>

#define YB_SLOW_NS  50000LL
#define YB_STRIKES  16u
#define YB_MAX      (1u << 20)

typedef struct {
    uint32_t skip;      /* waits left that sleep without yielding */
    uint32_t strike;    /* yielding waits left in which a slow yield is the second (Y1) */
} yb_state;

/* Before a wait's first yield: 1 if it may yield (then it counts as one
 * of the YB_STRIKES waits of Y1), else 0 (one of the skipped waits used). */
static inline int yb_may_yield(yb_state *s)
{
    if (__builtin_expect(!s->skip, 1)) {
        if (s->strike)
            s->strike--;
        return 1;
    }
    if (!--s->skip)
        s->strike = YB_STRIKES;         /* Y2 */
    return 0;
}

/* The next 8 took/worth waits (at most YB_MAX) sleep without yielding. */
static inline void yb_penalize(yb_state *s, int64_t took, int64_t worth)
{
    uint64_t n = 8 * (uint64_t)(took / worth);
    s->skip = n < YB_MAX ? (uint32_t)n : YB_MAX;
}

/* After a yield that took `took' ns; `worth': what a yield that works
 * saves.  1 if it was slow (Y1). */
static inline int yb_after(yb_state *s, int64_t took, int64_t worth)
{
    if (__builtin_expect(took < YB_SLOW_NS, 1))
        return 0;
    if (s->strike) {
        yb_penalize(s, took, worth);
        s->strike = 0;
    } else {
        s->strike = YB_STRIKES;
    }
    return 1;
}

#endif
