/*
 * liveness.c — is a process, a guard's owner, a slot's recoverer dead?
 *
 * Invariant (I4): the answer NP_DEAD is never given for a live process.
 * Treating a live holder as dead breaks mutual exclusion, so only certain
 * evidence counts:
 *   - kill(pid, 0) fails with ESRCH: no process has that pid;
 *   - /proc/<pid>/stat is absent (ENOENT/ESRCH);
 *   - the start time (field 22) differs from the one recorded: the pid was
 *     recycled, the recorded process is gone;
 *   - state Z/X with at most one thread: an exited, unreaped process.  A
 *     thread-group leader that called pthread_exit() shows Z too, but its
 *     other threads run (num_threads, field 20, > 1): alive.
 *   - every thread of the process is exiting (L1 below): it is still tearing
 *     itself down in the kernel, but none of its threads will ever run a
 *     user instruction again.
 * All of it only within one pid namespace: a process registered from another
 * (its slot records the namespace's inode, in its word while REGISTERING) is
 * NP_UNKNOWN to us, whatever its pid looks like here.
 * Anything else that prevents reading (EMFILE, ENFILE, ENOMEM, EACCES, a
 * short or unparsable read) is NP_UNKNOWN, which every caller treats as
 * alive: the work is retried later, never done on a live process's behalf.
 *
 * L2 At its descriptor limit (EMFILE, ENFILE) a caller cannot open /proc
 *    files; a process whose single remaining thread has no memory left is
 *    then judged dead from path-based calls alone (dead_without_fd): a
 *    zombie holder does not keep such a waiter waiting until it is reaped.
 *
 * L1 "Exiting" (what lets a mutex waiter act about 1 ms before the kernel
 *    reports the exit, deathwatch.c): a SIGKILLed process tears down its
 *    memory (exit_mm, ~1 ms for a Python process) before it releases its
 *    files (flock) and long before it becomes a zombie (pidfd readable).
 *    Its threads are past user code much earlier: each sets PF_EXITING
 *    (flags, field 9) when it enters do_exit, which never returns, and a
 *    thread is created only by a running thread of the process.  We judge
 *    "dead" when, in this order:
 *      (a) /proc/<pid>/stat: ours (start time), the leader PF_EXITING;
 *      (b) every thread listed in /proc/<pid>/task is PF_EXITING or gone
 *          (a thread is named by an open descriptor of its /proc directory,
 *          bound to that task: a tid reused by a new thread, even within
 *          the same clock tick, is not it);
 *      (c) /proc/<pid>/stat again (the file opened in (a)): still there,
 *          still PF_EXITING (a non-leader's exec hands the leader's pid to
 *          the exec'ing thread, which is not exiting: then alive),
 *          num_threads = N, read at tN;
 *      (d) at least N of the threads seen in (b) are still there (read
 *          through their descriptors): they were attached at tN (a
 *          released thread never comes back).
 *    (c) showing N = 1 is enough by itself: the one thread attached at tN
 *    is the one the leader's pid names, seen exiting in (c) itself.
 *    Then the N threads attached at tN are all among those seen PF_EXITING
 *    before tN; none of them can return to user space or create a thread,
 *    so after tN the process never runs a user instruction again.  A listing
 *    cut short by a concurrent exit only makes (d) fail (we answer alive and
 *    look again).  Exec by another thread: that thread, not exiting, takes
 *    the leader's pid, so (c) answers alive; a process that execs keeps
 *    what it holds until it exits (X2 of tests/test_native_exiting.py).  A core dump keeps its threads short of PF_EXITING until it is
 *    written: alive until then.  Every step is a read; a failure to read is
 *    "not dead" (NP_ALIVE from this rule; the other rules still apply).
 *
 * An actor is dead when its incarnation ended (I3: the tag's incarnation is
 * not the actor's any more), when it is free, or when its process slot is.
 * A slot is dead when free, when being recovered (only dead processes'
 * slots are claimed), or when its process is.  A recoverer is dead when its
 * actor is; the recoverer 0 ("unclaimed") is dead.
 */
#define _GNU_SOURCE
#include "core_internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define NP_PF_EXITING     0x4u          /* include/linux/sched.h: in do_exit */
#define NP_EXIT_THREADS   256           /* L1 is tried for at most this many threads */

struct np_stat {
    char state;                         /* field 3 */
    unsigned long flags;                /* field 9 */
    long threads;                       /* field 20 */
    uint64_t start;                     /* field 22 */
};

/* Parse a stat line (buf, n bytes, n < its size).  NP_ALIVE when parsed,
 * NP_UNKNOWN otherwise. */
static int parse_stat(char *buf, ssize_t n, struct np_stat *st)
{
    if (n <= 0)
        return NP_UNKNOWN;
    buf[n] = 0;
    char *p = strrchr(buf, ')');        /* comm may contain spaces and ')' */
    if (!p || p[1] != ' ' || !p[2])
        return NP_UNKNOWN;
    p += 2;
    st->state = *p;
    for (int f = 3; f < 22; f++) {      /* p is at field f */
        p = strchr(p, ' ');
        if (!p)
            return NP_UNKNOWN;
        p++;
        if (f + 1 == 9)
            st->flags = strtoul(p, NULL, 10);
        else if (f + 1 == 20)
            st->threads = strtol(p, NULL, 10);
    }
    st->start = strtoull(p, NULL, 10);
    return NP_ALIVE;
}

/* Read an open stat file from its start.  NP_ALIVE when read, NP_DEAD when
 * its task is gone (ESRCH/ENOENT), NP_UNKNOWN otherwise. */
static int pread_stat(int fd, struct np_stat *st)
{
    char buf[1024];
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    if (n < 0)
        return errno == ESRCH || errno == ENOENT ? NP_DEAD : NP_UNKNOWN;
    return parse_stat(buf, n, st);
}

/* Open a stat file: the fd, or -1 with *why NP_DEAD when its task is
 * certainly absent, NP_UNKNOWN otherwise. */
static int open_stat(const char *path, int *why)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        *why = errno == ENOENT || errno == ESRCH ? NP_DEAD : NP_UNKNOWN;
    return fd;
}

/* Read the stat file of the task whose /proc directory is open on tfd. */
static int read_pinned_stat(int tfd, struct np_stat *st)
{
    int fd = openat(tfd, "stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT || errno == ESRCH ? NP_DEAD : NP_UNKNOWN;
    int r = pread_stat(fd, st);
    close(fd);
    return r;
}

/* The leader, re-read on `fd' (the stat file opened at (a)): NP_DEAD when
 * gone, NP_ALIVE with *st when it is still ours and exiting, else NP_UNKNOWN.
 * The file names the leader's pid, which a non-leader thread's exec takes
 * over (the new image's thread, not exiting): hence the flag each time. */
static int reread_leader(int fd, uint64_t start, struct np_stat *st)
{
    int r = pread_stat(fd, st);
    if (r == NP_DEAD || (r == NP_ALIVE && st->start != start))
        return NP_DEAD;
    if (r != NP_ALIVE || !(st->flags & NP_PF_EXITING))
        return NP_UNKNOWN;
    return NP_ALIVE;
}

/* L1 (b)-(d), after (a) was seen on `fd' (/proc/<pid>/stat, still open: it
 * names that pid, whatever task holds it): 1 when every thread of the
 * process is certainly past user code for good, 0 when that cannot be shown
 * now.  A thread is named by an open descriptor of its /proc directory,
 * which stays bound to that very task: a later thread given the same tid is
 * another task (reads through the old descriptor fail), so a tid reused
 * within one clock tick (a start time does not tell them apart) is not
 * taken for a thread seen exiting.  One descriptor per thread while it
 * runs: without descriptors (EMFILE) the answer is 0, never 1. */
static int all_exiting(pid_t pid, uint64_t start, int fd)
{
    char path[64], dbuf[2048];
    int seen[NP_EXIT_THREADS];
    int nseen = 0, ok = 0;
    struct np_stat st;
    int r = reread_leader(fd, start, &st);
    if (r == NP_DEAD)
        return 1;                                       /* gone meanwhile */
    if (r != NP_ALIVE)
        return 0;
    if (st.threads == 1)
        return 1;       /* (b)-(d) with the leader alone, exiting now */
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    int dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return 0;
    for (;;) {                                          /* (b) */
        long n = syscall(SYS_getdents64, dfd, dbuf, sizeof dbuf);
        if (n == 0)
            break;
        if (n < 0)
            goto out;
        for (long off = 0; off < n;) {
            struct dirent64 *e = (struct dirent64 *)(dbuf + off);
            off += e->d_reclen;
            if (e->d_name[0] < '1' || e->d_name[0] > '9')
                continue;                               /* "." and ".." */
            if (nseen == NP_EXIT_THREADS)
                goto out;                               /* too many to look at */
            int tfd = openat(dfd, e->d_name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (tfd < 0) {
                if (errno == ENOENT || errno == ESRCH)
                    continue;                           /* released already */
                goto out;                               /* EMFILE...: cannot tell */
            }
            r = read_pinned_stat(tfd, &st);
            if (r == NP_DEAD) {
                close(tfd);
                continue;
            }
            seen[nseen++] = tfd;
            if (r != NP_ALIVE || !(st.flags & NP_PF_EXITING))
                goto out;                               /* may still run */
        }
    }
    r = reread_leader(fd, start, &st);                  /* (c) */
    if (r == NP_DEAD) {
        ok = 1;
        goto out;
    }
    if (r != NP_ALIVE || st.threads < 1 || st.threads > nseen)
        goto out;
    long attached = 0;                                  /* (d) */
    for (int i = 0; i < nseen; i++) {
        struct np_stat t;
        r = read_pinned_stat(seen[i], &t);
        if (r == NP_ALIVE)
            attached++;         /* the very task seen exiting: exiting for good */
        else if (r != NP_DEAD)
            goto out;
    }
    ok = attached >= st.threads;
out:
    for (int i = 0; i < nseen; i++)
        close(seen[i]);
    close(dfd);
    return ok;
}

/* Threads of pid from /proc/<pid>/task's link count (2 + threads), or -1. */
static long task_count(pid_t pid)
{
    char path[64];
    struct stat sb;
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    return stat(path, &sb) == 0 && sb.st_nlink >= 2 ? (long)sb.st_nlink - 2 : -1;
}

/* L2: the process holding pid is dead, shown without a descriptor (for a
 * caller at its descriptor limit, which cannot open /proc files): one thread
 * only, whose memory is gone (/proc/<pid>/exe: ENOENT once the last
 * thread has left its address space, exit_mm), and still one thread after.
 * The one thread is the leader (it never leaves the group while others
 * remain); it cannot run user code without memory, and any thread it made
 * before losing it is either counted by the second look or has exited.
 * A pid reused meanwhile by a new process (which has memory) answers alive;
 * a reused pid that is itself dying means ours died first.  Anything else
 * (EACCES, a read failing) is not "dead". */
static int dead_without_fd(pid_t pid)
{
    char path[64], buf[8];
    if (task_count(pid) != 1)
        return 0;
    snprintf(path, sizeof path, "/proc/%d/exe", (int)pid);
    if (readlink(path, buf, sizeof buf) >= 0 || errno != ENOENT)
        return 0;
    return task_count(pid) == 1;
}

int np_proc_state(int32_t pid, uint64_t start, uint64_t pidns)
{
    char path[64];
    struct np_stat st;
    np_ensure_self();
    if (pidns != np_my_pidns)
        return NP_UNKNOWN;              /* another pid namespace: cannot tell */
    if (pid <= 0)
        return NP_DEAD;
    if (kill(pid, 0) < 0 && errno == ESRCH)
        return NP_DEAD;                 /* no fd needed for the common case */
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int r, fd = open_stat(path, &r);
    if (fd < 0) {
        int e = errno;
        if (r == NP_UNKNOWN && (e == EMFILE || e == ENFILE) && dead_without_fd(pid))
            return NP_DEAD;             /* L2 */
        return r;
    }
    r = pread_stat(fd, &st);
    if (r == NP_ALIVE) {
        if (start && st.start != start)
            r = NP_DEAD;
        else if ((st.state == 'Z' || st.state == 'X' || st.state == 'x') && st.threads <= 1)
            r = NP_DEAD;
        /* L1: only with the recorded start time (a pid alone names no process) */
        else if (start && (st.flags & NP_PF_EXITING) && all_exiting(pid, start, fd))
            r = NP_DEAD;
    }
    close(fd);
    return r;
}

int np_process_alive(int32_t pid, uint64_t start_time)
{
    np_ensure_self();
    return np_proc_state(pid, start_time, np_my_pidns) != NP_DEAD;
}

/* A slot word in REGISTERING: its namespace is in the word (identity.c). */
int np_registering_state(uint64_t w)
{
    np_ensure_self();
    if (PW_REC(w) != (np_my_pidns & NP_SLOT_GEN_MASK))
        return NP_UNKNOWN;
    return np_proc_state(PW_PID(w), 0, np_my_pidns);
}

int np_slot_state(np_domain *d, uint32_t p)
{
    /* acquire: start_time was stored before the slot became ALIVE. */
    return np_slot_word_state(d, p, __atomic_load_n(&d->procs[p].w, __ATOMIC_ACQUIRE));
}

/* The verdict on slot p's process as of word w (read with acquire); the
 * fields read belong to w's generation, or a CAS expecting w fails. */
int np_slot_word_state(np_domain *d, uint32_t p, uint64_t w)
{
    np_proc *s = &d->procs[p];
    switch (PW_STATE(w)) {
    case NP_PS_ALIVE:
        return np_proc_state(PW_PID(w), __atomic_load_n(&s->start_time, __ATOMIC_RELAXED),
                             __atomic_load_n(&s->pidns, __ATOMIC_RELAXED));
    case NP_PS_REGISTERING:
        return np_registering_state(w);
    default:                            /* free, or claimed for recovery: gone */
        return NP_DEAD;
    }
}

/* The actor named by (index + 1, incarnation bits) is still that incarnation
 * and belongs to a slot: the verdict of its slot. */
static int actor_state(np_domain *d, uint32_t a1, uint32_t inc, uint32_t mask)
{
    if (a1 == 0 || a1 > d->nact + 1)
        return NP_DEAD;
    np_actor *x = &d->actors[a1 - 1];
    /* acquire: pairs with the release store of `proc' when it is freed,
     * which follows the incarnation bump. */
    uint32_t p = __atomic_load_n(&x->proc, __ATOMIC_ACQUIRE);
    if ((__atomic_load_n(&x->inc, __ATOMIC_ACQUIRE) & mask) != (inc & mask))
        return NP_DEAD;
    if (p == 0 || p > d->nproc + 1)
        return NP_DEAD;
    return np_slot_state(d, p - 1);
}

int np_tag_state(np_domain *d, uint32_t tag)
{
    tag &= NP_GUARD_TAG;
    return actor_state(d, tag & NP_TAG_ACTOR, tag >> NP_TAG_INC_SHIFT, NP_TAG_INC_MASK);
}

int np_rec_state(np_domain *d, uint64_t rec)
{
    if (rec == 0)
        return NP_DEAD;
    return actor_state(d, (uint32_t)(rec & NP_TAG_ACTOR), (uint32_t)(rec >> 20), NP_REC_INC_MASK);
}
