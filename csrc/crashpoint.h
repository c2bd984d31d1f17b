/*
 * crashpoint.h — test support only: a place where a test may SIGKILL the
 * process, to prove that a death at that instruction loses nothing.
 *
 * CRASHPOINT() costs one load of a process-local flag and a predicted-not-
 * taken branch.  The flag can be set only by np_test_crash_after(), which
 * refuses unless NETPLEX_CORE_TEST=1 was in the environment of the process
 * (read once per fork); production processes never arm it.  Every step of
 * every mutating operation, of registration and of recovery has a crash point
 * between its shared-memory stores, so that tests/test_native_crash_steps.py
 * and tests/test_recovery_crash.py can enumerate them.
 */
#ifndef NETPLEX_CRASHPOINT_H
#define NETPLEX_CRASHPOINT_H

#include <stdint.h>

extern int np_crash_armed;
void np_crashpoint_hit(void);
void np_test_read_env(void);
void np_test_disarm(void);

#define CRASHPOINT() do { if (__builtin_expect(np_crash_armed, 0)) np_crashpoint_hit(); } while (0)

#endif
