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
 * All of it only within one pid namespace: a process registered from another
 * (its slot records the namespace's inode, in its word while REGISTERING) is
 * NP_UNKNOWN to us, whatever its pid looks like here.
 * Anything else that prevents reading (EMFILE, ENFILE, ENOMEM, EACCES, a
 * short or unparsable read) is NP_UNKNOWN, which every caller treats as
 * alive: the work is retried later, never done on a live process's behalf.
 *
 * An actor is dead when its incarnation ended (I3: the tag's incarnation is
 * not the actor's any more), when it is free, or when its process slot is.
 * A slot is dead when free, when being recovered (only dead processes'
 * slots are claimed), or when its process is.  A recoverer is dead when its
 * actor is; the recoverer 0 ("unclaimed") is dead.
 */
#define _GNU_SOURCE
#include "core_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Fields 3 (state), 20 (num_threads), 22 (starttime) of /proc/<pid>/stat.
 * NP_ALIVE when read, NP_DEAD when the process is certainly absent,
 * NP_UNKNOWN otherwise. */
static int read_stat(pid_t pid, char *state, long *threads, uint64_t *start)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT || errno == ESRCH ? NP_DEAD : NP_UNKNOWN;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    int e = errno;
    close(fd);
    if (n < 0)
        return e == ESRCH || e == ENOENT ? NP_DEAD : NP_UNKNOWN;
    if (n == 0)
        return NP_UNKNOWN;
    buf[n] = 0;
    char *p = strrchr(buf, ')');        /* comm may contain spaces and ')' */
    if (!p || p[1] != ' ' || !p[2])
        return NP_UNKNOWN;
    p += 2;
    *state = *p;
    for (int f = 3; f < 22; f++) {      /* p is at field 3 */
        p = strchr(p, ' ');
        if (!p)
            return NP_UNKNOWN;
        p++;
        if (f + 1 == 20)
            *threads = strtol(p, NULL, 10);
    }
    *start = strtoull(p, NULL, 10);
    return NP_ALIVE;
}

int np_proc_state(int32_t pid, uint64_t start, uint64_t pidns)
{
    char st;
    long threads = 0;
    uint64_t s;
    np_ensure_self();
    if (pidns != np_my_pidns)
        return NP_UNKNOWN;              /* another pid namespace: cannot tell */
    if (pid <= 0)
        return NP_DEAD;
    if (kill(pid, 0) < 0 && errno == ESRCH)
        return NP_DEAD;                 /* no fd needed for the common case */
    int r = read_stat(pid, &st, &threads, &s);
    if (r != NP_ALIVE)
        return r;
    if (start && s != start)
        return NP_DEAD;
    if ((st == 'Z' || st == 'X' || st == 'x') && threads <= 1)
        return NP_DEAD;
    return NP_ALIVE;
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
