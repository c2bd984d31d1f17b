/*
 * testpoints.c — crash points (crashpoint.h) and the floor of the binding.
 * Process-local state only; nothing here touches the segment.
 */
#define _GNU_SOURCE
#include "core_internal.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int np_crash_armed;
static int      test_enabled;          /* NETPLEX_CORE_TEST=1 at first use */
static uint64_t test_epoch;            /* fork epoch test_enabled was read in */
static int64_t  crash_n, crash_count;
static int      crash_sig = SIGKILL;

void np_crashpoint_hit(void)
{
    if (++crash_count >= crash_n) {
        if (crash_sig == SIGSTOP)
            np_crash_armed = 0;         /* stop once, then run on after SIGCONT */
        kill(getpid(), crash_sig);
    }
}

void np_test_read_env(void)
{
    if (test_epoch != np_fork_epoch) {
        const char *e = getenv("NETPLEX_CORE_TEST");
        test_enabled = e && strcmp(e, "1") == 0;
        test_epoch = np_fork_epoch;
    }
}

void np_test_disarm(void)
{
    np_crash_armed = 0;
}

int64_t np_test_crash_after(int64_t n)
{
    np_test_read_env();
    if (!test_enabled || n < 0)
        return NP_EINVAL;
    crash_count = 0;
    crash_n = n;
    np_crash_armed = n > 0;
    return 0;
}

int64_t np_test_crash_signal(int32_t sig)
{
    np_test_read_env();
    if (!test_enabled || (sig != SIGKILL && sig != SIGSTOP))
        return NP_EINVAL;
    crash_sig = sig;
    return 0;
}

int64_t np_test_crash_count(void)
{
    return crash_count;
}

int np_fast_mutex_off;

int64_t np_test_fast_mutex(int32_t on)
{
    np_test_read_env();
    if (!test_enabled || (on != 0 && on != 1))
        return NP_EINVAL;
    np_fast_mutex_off = !on;
    return 0;
}

int64_t np_noop(void) { return 0; }
