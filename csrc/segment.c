/*
 * segment.c — a domain's life: create, attach, close, unlink.
 *
 * Invariants kept here
 *  G1 The magic is written last at creation (release): an attacher that sees
 *     it sees an initialised segment.  Layout and version are checked on
 *     attach; a mismatch is NP_EBADSEG, never a guess.
 *  G2 The tables have one more slot and one more actor than configured: the
 *     reserve (identity.c, S3).  The creator is registered at create, so the
 *     supervisor's recover never needs a free entry.
 *  G3 close never unmaps memory a thread of this process still uses: every
 *     exported call counts itself in d->inside (NP_ENTER/NP_LEAVE) and fails
 *     with NP_ECLOSED once d->closing is set; close sets it, wakes this
 *     process's sleepers (they leave their queues and return NP_ECLOSED),
 *     waits until the count is 0, gives back what the process held through d
 *     (its slot is recovered as if it had died) and only then unmaps.  The
 *     descriptor is never freed, so a late call fails with NP_ECLOSED.  The
 *     np_fast_* entry points are not counted: their caller excludes close.
 *  G4 A segment is stale only when its creator AND every process registered
 *     in it are certainly dead (I4): a process that attached and registered
 *     (a supervisor taking over after a binary upgrade, a spawned worker)
 *     keeps it in use after its creator is gone.
 */
#define _GNU_SOURCE
#include "core_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static uint64_t domain_serial;

/* 16 random bytes (the name hash's key); -1 with errno if none could be had. */
static int random_key(uint64_t key[2])
{
    char *p = (char *)key;
    size_t got = 0;
    while (got < 2 * sizeof(uint64_t)) {
        ssize_t n = getrandom(p + got, 2 * sizeof(uint64_t) - got, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        got += (size_t)n;
    }
    return 0;
}

#define ALIGN64(x) (((x) + 63) & ~(uint64_t)63)

static void layout(const np_config *c, np_hdr *h)
{
    uint64_t nobj = (uint64_t)c->semaphores + c->mutexes;
    uint32_t cap = 16;
    while (cap < 2 * nobj)
        cap <<= 1;
    h->name_cap = cap;
    uint64_t off = ALIGN64(sizeof(np_hdr));
    h->off_obj = off;
    off = ALIGN64(off + nobj * sizeof(np_obj));
    h->off_names = off;
    off = ALIGN64(off + (uint64_t)cap * sizeof(uint32_t));
    h->off_proc = off;
    off = ALIGN64(off + ((uint64_t)c->processes + 1) * sizeof(np_proc));      /* G2 */
    h->off_actor = off;
    /* actors, the reserve actor, then the async waiter records (W1) */
    off = ALIGN64(off + ((uint64_t)c->actors + 1 + c->waiters) * sizeof(np_actor));
    h->off_delta = off;
    off = ALIGN64(off + (uint64_t)c->processes * c->semaphores * sizeof(np_delta));
    h->size = off;
}

static int map_domain(char *base, size_t size, np_domain **out)
{
    np_domain *d = calloc(1, sizeof *d);
    if (!d)
        return NP_ESYS;
    np_hdr *h = (np_hdr *)base;
    d->base = base;
    d->size = size;
    d->h = h;
    d->objs = (np_obj *)(base + h->off_obj);
    d->names = (uint32_t *)(base + h->off_names);
    d->procs = (np_proc *)(base + h->off_proc);
    d->actors = (np_actor *)(base + h->off_actor);
    d->deltas = (np_delta *)(base + h->off_delta);
    d->nsem = h->cfg.semaphores;
    d->nmtx = h->cfg.mutexes;
    d->nobj = d->nsem + d->nmtx;
    d->nproc = h->cfg.processes;
    d->nact = h->cfg.actors;
    d->rslot = d->nproc;
    d->ractor = d->nact;
    d->nwt = h->cfg.waiters;
    d->wbase = d->nact + 1;
    d->nall = d->wbase + d->nwt;
    d->wquota = h->cfg.waiter_quota ? h->cfg.waiter_quota : d->nwt;
    d->aw_mine = calloc((d->nwt + 63) / 64 + 1, sizeof(uint64_t));
    if (!d->aw_mine) {
        free(d);
        return NP_ESYS;
    }
    d->name_cap = h->name_cap;
    d->serial = __atomic_add_fetch(&domain_serial, 1, __ATOMIC_RELAXED);
    pthread_mutex_lock(&np_dom_mu);
    d->next = np_dom_list;
    np_dom_list = d;
    pthread_mutex_unlock(&np_dom_mu);
    *out = d;
    return 0;
}

static void unmap_domain(np_domain *d)
{
    pthread_mutex_lock(&np_dom_mu);
    for (np_domain **pp = &np_dom_list; *pp; pp = &(*pp)->next)
        if (*pp == d) {
            *pp = d->next;
            break;
        }
    pthread_mutex_unlock(&np_dom_mu);
    np_tcache_drop(d);
    np_dw_stop(d);                      /* D3: before the unmap */
    munmap(d->base, d->size);
    /* The descriptor itself is kept (a few hundred bytes): a late call from
     * a thread that still has the pointer finds it closed (NP_ECLOSED)
     * instead of freed memory. */
    d->serial = 0;
    d->base = NULL;
    __atomic_store_n(&d->closing, 3, __ATOMIC_SEQ_CST);
}

int np_domain_create(const char *name, const np_config *cfg, np_domain **out)
{
    np_hdr tmp;
    np_identity_init();
    if (!name || name[0] != '/' || !cfg || cfg->processes == 0 || cfg->actors == 0
        || (uint64_t)cfg->actors + cfg->waiters > NP_ACTORS_MAX - 1 || cfg->processes >= (1u << 22)
        || (uint64_t)cfg->semaphores + cfg->mutexes >= (1u << 30))
        return NP_EINVAL;
    memset(&tmp, 0, sizeof tmp);
    tmp.cfg = *cfg;
    layout(cfg, &tmp);
    tmp.fresh[0] = 0;                   /* names.c N6: nothing used, no free list */
    tmp.fresh[1] = cfg->semaphores;
    if (random_key(tmp.name_key) < 0)   /* names.c N7 */
        return NP_ESYS;
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return NP_ESYS;
    if (ftruncate(fd, (off_t)tmp.size) < 0) {
        int e = errno;
        close(fd);
        shm_unlink(name);
        errno = e;
        return NP_ESYS;
    }
    char *base = mmap(NULL, tmp.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);
    if (base == MAP_FAILED) {
        shm_unlink(name);
        errno = e;
        return NP_ESYS;
    }
    np_hdr *h = (np_hdr *)base;
    *h = tmp;
    h->magic = 0;
    h->version = NP_LAYOUT_VERSION;
    h->hdr_size = sizeof(np_hdr);
    np_ensure_self();
    h->creator_pid = np_my_pid;
    h->creator_start = np_my_start;
    h->creator_pidns = np_my_pidns;
    /* release: G1. */
    __atomic_store_n(&h->magic, NP_MAGIC, __ATOMIC_RELEASE);
    int rc = map_domain(base, tmp.size, out);
    if (rc < 0) {
        munmap(base, tmp.size);
        shm_unlink(name);
        return rc;
    }
    /* G2: the supervisor's slot and actor, before anyone can fill the tables */
    rc = (int)np_register(*out);
    if (rc < 0) {
        unmap_domain(*out);
        free(*out);
        shm_unlink(name);
        *out = NULL;
    }
    return rc;
}

int np_domain_attach(const char *name, np_domain **out)
{
    struct stat stbuf;
    np_identity_init();
    if (!name || name[0] != '/')
        return NP_EINVAL;
    int fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0)
        return NP_ESYS;
    if (fstat(fd, &stbuf) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return NP_ESYS;
    }
    if ((size_t)stbuf.st_size < sizeof(np_hdr)) {
        close(fd);
        return NP_EBADSEG;
    }
    size_t size = (size_t)stbuf.st_size;
    char *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);
    if (base == MAP_FAILED) {
        errno = e;
        return NP_ESYS;
    }
    np_hdr *h = (np_hdr *)base;
    np_hdr chk;
    memset(&chk, 0, sizeof chk);
    chk.cfg = h->cfg;
    layout(&h->cfg, &chk);
    if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != NP_MAGIC
        || h->version != NP_LAYOUT_VERSION || h->hdr_size != sizeof(np_hdr)
        || h->size != size || chk.size != size || chk.off_delta != h->off_delta
        || chk.name_cap != h->name_cap
        || (uint64_t)h->cfg.actors + h->cfg.waiters > NP_ACTORS_MAX - 1) {
        munmap(base, size);
        return NP_EBADSEG;
    }
    int rc = map_domain(base, size, out);
    if (rc < 0)
        munmap(base, size);
    return rc;
}

/* An idle actor of this process (no other thread is inside: G3), to give
 * back what the process holds when the calling thread has none of its own. */
static int borrow_actor(np_domain *d, uint32_t *me, uint32_t *tag)
{
    for (uint32_t x = 0; x < d->nact; x++) {
        np_actor *ax = &d->actors[x];
        if (__atomic_load_n(&ax->proc, __ATOMIC_ACQUIRE) == d->my_proc && !ax->waiting_on
            && !ax->intent_valid && !ax->orphan) {
            *me = x;
            *tag = actor_tag(x, ax->inc);
            return 1;
        }
    }
    return 0;
}

void np_domain_close(np_domain *d)
{
    if (!d || __atomic_load_n(&d->closing, __ATOMIC_SEQ_CST))
        return;
    /* seq_cst: pairs with NP_ENTER (a call either sees closing or is counted);
     * under np_dom_mu: see domain_open (identity.c). */
    pthread_mutex_lock(&np_dom_mu);
    __atomic_store_n(&d->closing, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&np_dom_mu);
    for (int round = 0; __atomic_load_n(&d->inside, __ATOMIC_SEQ_CST) > 0; round++) {
        /* wake this process's sleepers: they see `closing' and leave */
        if (d->my_epoch == np_fork_epoch && d->my_proc) {
            np_wake_slot_actors(d, d->my_proc);
            np_proc *s = &d->procs[d->my_proc - 1];   /* the async helper (np_aw_wait) */
            __atomic_add_fetch(&s->bell, 1, __ATOMIC_SEQ_CST);
            np_futex_wake(&s->bell, 1);
        }
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    /* G3: give back what this process held through d, free its slot. */
    if (d->my_epoch == np_fork_epoch && d->my_proc) {
        uint32_t me, tag;
        int reserve = 0;
        int64_t deadline = np_now() + NP_RECLAIM_NS;
        /* new calls stay refused; guard waits may now run again */
        __atomic_store_n(&d->closing, 2, __ATOMIC_SEQ_CST);
        np_dw_stop(d);                  /* D3: before the slot is left */
        if (my_actor(d, &me, &tag) == 0)
            np_i_wait_cancel(d);
        else if (borrow_actor(d, &me, &tag))
            ;                           /* no actor of our own: the table is full */
        else if (np_reserve_enter(d, &me, &tag, deadline) == 0)
            reserve = 1;
        else
            goto unmap;                 /* the supervisor's recover(pid) will do it */
        np_leave_slot(d, me, tag, d->my_proc - 1, deadline);
        if (reserve)
            np_reserve_leave(d);
    }
unmap:
    unmap_domain(d);
}

int np_domain_unlink(const char *name)
{
    if (!name)
        return NP_EINVAL;
    return shm_unlink(name) == 0 ? 0 : NP_ESYS;
}

size_t np_domain_size(const np_domain *d) { return d->size; }

int np_domain_config(const np_domain *d, np_config *out)
{
    *out = d->h->cfg;
    return 0;
}

int32_t np_domain_creator_pid(const np_domain *d) { return d->h->creator_pid; }
uint64_t np_domain_creator_start(const np_domain *d) { return d->h->creator_start; }

int np_domain_creator_alive(const np_domain *d)
{
    return np_proc_state(d->h->creator_pid, d->h->creator_start, d->h->creator_pidns) != NP_DEAD;
}

int np_domain_in_use(np_domain *d)
{
    if (np_domain_creator_alive(d))
        return 1;
    /* Every slot, the reserve included (G2): a slot that is free or being
     * recovered is no user; an alive or registering one is, unless its
     * process is certainly dead. */
    for (uint32_t p = 0; p <= d->nproc; p++)
        if (np_slot_state(d, p) != NP_DEAD)
            return 1;
    return 0;
}
