/*
 * introspect.c — reading the segment from outside the operations: object
 * and process listings (lock-free, approximate while it changes) and the
 * consistency check of a quiescent segment (used by every crash test).
 *
 * Invariants checked by np_check (all of I1-I4 and A1, Q1, N1 made concrete):
 * no guard held, no valid intent, every queue well formed and matching its
 * actors, names and objects in one-to-one correspondence, mutex value and
 * owner agreeing, no mutex owned by a free or dead slot, no slot left in
 * recovery or registration by a dead process, the reserve free, no actor of
 * a free slot, at most one tombstone (the pending hole, N4) and every free
 * object on its kind's free list exactly once (N6).
 */
#define _GNU_SOURCE
#include "core_internal.h"

#include <stdio.h>
#include <string.h>

static int64_t obj_info(np_domain *d, int32_t kind, uint32_t index, np_obj_info_t *out)
{
    uint32_t i;
    if (kind == NP_KIND_SEM) {
        if (index >= d->nsem)
            return NP_EINVAL;
        i = index;
    } else if (kind == NP_KIND_MUTEX) {
        if (index >= d->nmtx)
            return NP_EINVAL;
        i = d->nsem + index;
    } else {
        return NP_EINVAL;
    }
    np_obj *o = &d->objs[i];
    if (!__atomic_load_n(&o->used, __ATOMIC_ACQUIRE))
        return 0;
    memset(out, 0, sizeof *out);
    out->index = index;
    out->kind = kind;
    out->handle = (uint64_t)make_handle(d, i);
    out->value = __atomic_load_n(&o->value, __ATOMIC_RELAXED);
    if (kind == NP_KIND_MUTEX)          /* F4: owner is the truth */
        out->value = __atomic_load_n(&o->owner, __ATOMIC_RELAXED) ? 0 : 1;
    out->protected_ = (int32_t)o->protected_;
    uint32_t ow = __atomic_load_n(&o->owner, __ATOMIC_RELAXED);
    out->owner_pid = ow && ow <= d->nproc ? PW_PID(__atomic_load_n(&d->procs[ow - 1].w, __ATOMIC_RELAXED)) : 0;
    out->waiters = __atomic_load_n(&o->qlen, __ATOMIC_RELAXED);
    uint32_t h = __atomic_load_n(&o->qhead, __ATOMIC_RELAXED);
    if (out->waiters && h && h <= d->nall) {
        const np_actor *x = &d->actors[h - 1];
        out->reserved = __atomic_load_n(&x->refused_since, __ATOMIC_RELAXED)
                        == __atomic_load_n(&x->wait_since, __ATOMIC_RELAXED);
    }
    out->token = (int64_t)(__atomic_load_n(&o->token, __ATOMIC_RELAXED) & INT64_MAX);
    memcpy(out->name, o->name, NP_NAME_MAX);
    out->name[NP_NAME_MAX] = 0;
    return 1;
}

static int64_t proc_info(np_domain *d, uint32_t index, np_proc_info_t *out)
{
    if (index > d->nproc)              /* the reserve is listed too */
        return NP_EINVAL;
    np_proc *s = &d->procs[index];
    uint64_t w = __atomic_load_n(&s->w, __ATOMIC_ACQUIRE);
    if (!w)
        return 0;
    memset(out, 0, sizeof *out);
    out->index = index;
    out->pid = PW_PID(w);
    out->start_time = __atomic_load_n(&s->start_time, __ATOMIC_RELAXED);
    out->state = PW_STATE(w) == NP_PS_RECOVERING ? 2 : PW_STATE(w) == NP_PS_REGISTERING ? 3 : 1;
    out->reserved = index == d->rslot;
    for (uint32_t x = 0; x < d->nall; x++)
        if (__atomic_load_n(&d->actors[x].proc, __ATOMIC_RELAXED) == index + 1) {
            if (x < d->wbase)
                out->threads++;
            else
                out->async_waiters++;
        }
    return 1;
}

#define FAIL(...) do { snprintf(buf, len, __VA_ARGS__); return NP_ECORRUPT; } while (0)

static int64_t check(np_domain *d, char *buf, size_t len)
{
    uint32_t used = 0, entries = 0, slot;
    if (buf && len)
        buf[0] = 0;
    if (!buf)
        len = 0;
    if (d->h->name_guard)
        FAIL("name guard held (0x%x)", d->h->name_guard);
    for (uint32_t x = 0; x < d->nall; x++) {
        np_actor *ax = &d->actors[x];
        if (ax->intent_valid)
            FAIL("actor %u has a valid intent (guard %u)", x, ax->intent_guard);
        if (ax->proc > d->nproc + 1)
            FAIL("actor %u: bad process slot %u", x, ax->proc);
        if (ax->proc && d->procs[ax->proc - 1].w == 0)
            FAIL("actor %u belongs to free process slot %u", x, ax->proc - 1);
        if (ax->waiting_on > d->nobj)
            FAIL("actor %u: bad waiting_on %u", x, ax->waiting_on);
    }
    for (uint32_t i = 0; i < d->nobj; i++) {
        np_obj *o = &d->objs[i];
        int sem = i < d->nsem;
        const char *what = sem ? "semaphore" : "mutex";
        uint32_t k = sem ? i : i - d->nsem;
        if (o->guard)
            FAIL("%s %u (%.64s) guard held (0x%x)", what, k, o->name, o->guard);
        if (!o->used) {
            if (o->qhead || o->qtail || o->qlen)
                FAIL("free %s %u has a queue", what, k);
            if (o->fast)
                FAIL("free %s %u has its fast path open (F1)", what, k);
            continue;
        }
        used++;
        if (np_name_find(d, o->name, &slot) != i + 1)
            FAIL("%s %u (%.64s) not found by name", what, k, o->name);
        if (sem && o->value < 0)
            FAIL("semaphore %u (%.64s) value %lld < 0", k, o->name, (long long)o->value);
        if (!sem && o->fast && o->qlen)
            FAIL("mutex %u (%.64s) fast path open with %u queued (F1)", k, o->name, o->qlen);
        if (!sem) {
            /* F4: owner is the truth; value is re-derived by each guard
             * holder (stale while the fast path is open, or after a death
             * between closing it and deriving). */
            if (o->value != 0 && o->value != 1)
                FAIL("mutex %u (%.64s) value %lld", k, o->name, (long long)o->value);
            if (o->fast && o->fast != ((o->gen & NP_GEN_MASK) | NP_FAST_OPEN))
                FAIL("mutex %u (%.64s) fast path open for generation %u, object's %u",
                     k, o->name, o->fast & NP_GEN_MASK, o->gen);
            if (o->owner && (o->owner > d->nproc || d->procs[o->owner - 1].w == 0))
                FAIL("mutex %u (%.64s) owned by free process slot %u", k, o->name, o->owner - 1);
            if (o->owner && np_slot_state(d, o->owner - 1) == NP_DEAD)
                FAIL("mutex %u (%.64s) owned by dead process slot %u", k, o->name, o->owner - 1);
        }
        uint32_t n = 0, cur = o->qhead, last = 0;
        while (cur) {
            if (cur > d->nall || n > d->nall)
                FAIL("%s %u (%.64s) queue broken", what, k, o->name);
            np_actor *ax = &d->actors[cur - 1];
            if (ax->waiting_on != i + 1 || ax->wait_gen != o->gen || !ax->proc)
                FAIL("%s %u (%.64s) queued actor %u not waiting on it", what, k, o->name, cur - 1);
            last = cur;
            cur = ax->qnext;
            n++;
        }
        if (n != o->qlen || last != o->qtail)
            FAIL("%s %u (%.64s) queue length %u / tail %u, walked %u / %u",
                 what, k, o->name, o->qlen, o->qtail, n, last);
    }
    for (uint32_t x = 0; x < d->nall; x++) {
        np_actor *ax = &d->actors[x];
        uint32_t w = ax->waiting_on;
        if (w && ax->proc && d->objs[w - 1].used && ax->wait_gen == d->objs[w - 1].gen
            && np_q_pos(d, &d->objs[w - 1], x) == UINT32_MAX)
            FAIL("actor %u waits on object %u but is not in its queue", x, w - 1);
    }
    uint32_t tombs = 0, hole = d->h->name_hole;
    for (uint32_t pos = 0; pos < d->name_cap; pos++) {
        uint32_t e = d->names[pos];
        if (e == NP_NAME_TOMB) {
            if (++tombs > 1 || hole != pos + 1)
                FAIL("tombstone at name entry %u (pending hole %u)", pos, hole);
            continue;
        }
        if (e == 0)
            continue;
        if (e > d->nobj || !d->objs[e - 1].used)
            FAIL("name entry %u points to free object %u", pos, e - 1);
        entries++;
    }
    if (entries != used)
        FAIL("%u name entries for %u objects", entries, used);
    if (hole && !tombs)
        FAIL("pending hole %u is not a tombstone", hole);
    for (int k = 0; k < 2; k++) {       /* N6: every free object listed once */
        uint32_t lo = k ? d->nsem : 0, hi = k ? d->nobj : d->nsem;
        uint32_t fresh = d->h->fresh[k], n = 0, nfree = 0;
        const char *what = k ? "mutex" : "semaphore";
        if (fresh < lo || fresh > hi)
            FAIL("%s high-water %u outside [%u, %u]", what, fresh, lo, hi);
        for (uint32_t i = lo; i < hi; i++) {
            if (i >= fresh && d->objs[i].used)
                FAIL("%s %u used above the high-water %u", what, i - lo, fresh - lo);
            if (i < fresh && !d->objs[i].used)
                nfree++;
        }
        for (uint32_t cur = d->h->free_head[k]; cur; cur = d->objs[cur - 1].next_free) {
            if (cur - 1 < lo || cur - 1 >= fresh || d->objs[cur - 1].used || ++n > nfree)
                FAIL("%s free list broken at %u", what, cur - 1);
        }
        if (n != nfree)
            FAIL("%s free list has %u of %u free objects", what, n, nfree);
    }
    for (uint32_t p = 0; p < d->nproc; p++) {
        uint64_t w = d->procs[p].w;
        if (w && PW_STATE(w) == NP_PS_RECOVERING)
            FAIL("process slot %u (pid %d) left in recovery", p, PW_PID(w));
        if (w && PW_STATE(w) == NP_PS_REGISTERING && np_slot_state(d, p) == NP_DEAD)
            FAIL("process slot %u (pid %d) left registering by a dead process", p, PW_PID(w));
    }
    if (d->procs[d->rslot].w && np_slot_state(d, d->rslot) == NP_DEAD)
        FAIL("the reserve slot is held by dead pid %d", PW_PID(d->procs[d->rslot].w));
    for (uint32_t x = 0; x < d->nall; x++) {
        np_actor *ax = &d->actors[x];
        if (ax->waiting_on && ax->proc && ax->cancel_pending == 0 && ax->waiting_on <= d->nobj
            && d->objs[ax->waiting_on - 1].guard == 0 && !d->objs[ax->waiting_on - 1].used
            && ax->wait_gen == d->objs[ax->waiting_on - 1].gen)
            FAIL("actor %u waits on free object %u", x, ax->waiting_on - 1);
    }
    return 0;
}


/* Lock-free and approximate while the table changes: a reading for tests
 * and benchmarks. */
static int64_t name_stats(np_domain *d, np_name_stats_t *out)
{
    uint32_t mask = d->name_cap - 1;
    memset(out, 0, sizeof *out);
    out->capacity = d->name_cap;
    for (uint32_t pos = 0; pos < d->name_cap; pos++) {
        uint32_t e = __atomic_load_n(&d->names[pos], __ATOMIC_RELAXED);
        if (e == NP_NAME_TOMB) {
            out->tombstones++;
        } else if (e && e <= d->nobj) {
            char name[NP_NAME_MAX + 1];
            memcpy(name, d->objs[e - 1].name, NP_NAME_MAX);
            name[NP_NAME_MAX] = 0;
            uint32_t dist = (pos - np_name_home(d, name)) & mask;
            out->entries++;
            if (dist + 1 > out->longest_probe)
                out->longest_probe = dist + 1;
        }
    }
    out->free_semaphores = d->nsem - d->h->fresh[0];
    out->free_mutexes = d->nobj - d->h->fresh[1];
    for (int k = 0; k < 2; k++) {
        uint32_t n = 0;
        for (uint32_t cur = d->h->free_head[k]; cur && cur <= d->nobj && n <= d->nobj;
             cur = d->objs[cur - 1].next_free)
            n++;
        if (k)
            out->free_mutexes += n;
        else
            out->free_semaphores += n;
    }
    return 0;
}

int64_t np_name_stats(np_domain *d, np_name_stats_t *out)
{
    NP_ENTER(d);
    int64_t rc = name_stats(d, out);
    NP_LEAVE(d);
    return rc;
}

int64_t np_obj_info(np_domain *d, int32_t kind, uint32_t index, np_obj_info_t *out)
{
    NP_ENTER(d);
    int64_t rc = obj_info(d, kind, index, out);
    NP_LEAVE(d);
    return rc;
}

int64_t np_proc_info(np_domain *d, uint32_t index, np_proc_info_t *out)
{
    NP_ENTER(d);
    int64_t rc = proc_info(d, index, out);
    NP_LEAVE(d);
    return rc;
}

int64_t np_check(np_domain *d, char *buf, size_t len)
{
    NP_ENTER(d);
    int64_t rc = check(d, buf, len);
    NP_LEAVE(d);
    return rc;
}
