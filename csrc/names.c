/*
 * names.c — lookup, create and destroy: the name table.
 *
 * Invariants kept here
 *  N1 (I1) The name table and every `used' flag change only under the name
 *     guard, and the object's fields under its own guard too: create and
 *     destroy hold both, in that order, and log both in one intent
 *     (intent_guard = name guard, intent_guard2 = object), so a death at any
 *     point leaves the name and the object agreeing.
 *  N2 A free object is reachable by nobody (a stale handle fails the `used'
 *     and generation checks under its guard), so its name may be written
 *     outside the log before the object is published.
 *  N3 destroy bumps the generation (A4), empties the queue and wakes those
 *     who were queued; they learn it from their wait_gen.  Handles of the old
 *     generation are stale (NP_ESTALE) from then on.
 *  N5 (T2) create starts a mutex's token at the header's token_hw; destroy
 *     raises token_hw to the destroyed mutex's token; both in the intent
 *     that changes the name, under the name guard.
 *  N4 Open addressing with tombstones; the table has at least twice as many
 *     entries as objects, so a probe always ends.
 */
#define _GNU_SOURCE
#include "core_internal.h"

#include <string.h>

static uint64_t name_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL;       /* FNV-1a */
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return h;
}

/* Under the name guard.  Returns object + 1 or 0; *slot: where it is, or
 * where to insert it. */
uint32_t np_name_find(np_domain *d, const char *name, uint32_t *slot)
{
    uint32_t mask = d->name_cap - 1, pos = (uint32_t)name_hash(name) & mask;
    uint32_t ins = UINT32_MAX;
    for (uint32_t k = 0; k < d->name_cap; k++, pos = (pos + 1) & mask) {
        uint32_t e = d->names[pos];
        if (e == 0) {
            *slot = ins != UINT32_MAX ? ins : pos;
            return 0;
        }
        if (e == NP_NAME_TOMB) {
            if (ins == UINT32_MAX)
                ins = pos;
            continue;
        }
        if (e <= d->nobj && strncmp(d->objs[e - 1].name, name, NP_NAME_MAX + 1) == 0) {
            *slot = pos;
            return e;
        }
    }
    *slot = ins;
    return 0;
}

static int64_t lookup(np_domain *d, int32_t kind, const char *name, int32_t flags, int64_t initial,
                      int64_t deadline)
{
    uint32_t ai, tag, slot;
    int rc;
    size_t len = name ? strnlen(name, NP_NAME_MAX + 1) : 0;
    if (len == 0 || len > NP_NAME_MAX || (kind != NP_KIND_SEM && kind != NP_KIND_MUTEX))
        return NP_EINVAL;
    if ((flags & NP_CREATE) && kind == NP_KIND_SEM && initial < 0)
        return NP_EINVAL;
    if ((rc = my_actor(d, &ai, &tag)) < 0)
        return rc;
    np_actor *a = &d->actors[ai];
    uint32_t ng = d->nobj;
    uint32_t *ngw = &d->h->name_guard;
    if ((rc = guard_lock(d, ngw, tag, deadline)) < 0)
        return rc;
    CRASHPOINT();
    uint32_t e = np_name_find(d, name, &slot);
    int64_t res;
    if (e) {
        int k = e - 1 < d->nsem ? NP_KIND_SEM : NP_KIND_MUTEX;
        if (k != kind)
            res = NP_EKIND;
        else if ((flags & (NP_CREATE | NP_EXCL)) == (NP_CREATE | NP_EXCL))
            res = NP_EEXIST;
        else
            res = make_handle(d, e - 1);
        guard_unlock(ngw);
        return res;
    }
    if (!(flags & NP_CREATE)) {
        guard_unlock(ngw);
        return NP_ENOENT;
    }
    uint32_t lo = kind == NP_KIND_SEM ? 0 : d->nsem;
    uint32_t hi = kind == NP_KIND_SEM ? d->nsem : d->nobj;
    uint32_t i;
    for (i = lo; i < hi; i++)
        if (!d->objs[i].used)
            break;
    if (i == hi || slot == UINT32_MAX) {
        guard_unlock(ngw);
        return kind == NP_KIND_SEM ? NP_ENOSPC_SEM : NP_ENOSPC_MTX;
    }
    np_obj *o = &d->objs[i];
    if ((rc = guard_lock(d, &o->guard, tag, deadline)) < 0) {
        guard_unlock(ngw);
        return rc;
    }
    CRASHPOINT();
    memcpy(o->name, name, len + 1);     /* N2 */
    CRASHPOINT();
    tx_begin(a, ng, i + 1);
    TX32(d, a, o->used, 1);
    TX64(d, a, o->value, kind == NP_KIND_MUTEX ? 1 : initial);
    TX32(d, a, o->protected_, kind == NP_KIND_SEM && (flags & NP_PROTECTED) ? 1 : 0);
    TX32(d, a, o->owner, 0);
    TX64(d, a, o->token, d->h->token_hw);      /* T2 */
    TX32(d, a, d->names[slot], i + 1);
    tx_commit(d, a);
    res = make_handle(d, i);
    guard_unlock(&o->guard);
    CRASHPOINT();
    guard_unlock(ngw);
    CRASHPOINT();
    return res;
}

int64_t np_lookup(np_domain *d, int32_t kind, const char *name, int32_t flags, int64_t initial,
                  int64_t deadline)
{
    if (deadline == NP_TRY)
        deadline = NP_GUARD_TRY;
    NP_ENTER(d);
    int64_t rc = lookup(d, kind, name, flags, initial, deadline);
    NP_LEAVE(d);
    return rc;
}

static int64_t destroy(np_domain *d, uint64_t handle, int kind)
{
    uint32_t idx, ai, tag, slot, who[NP_WAKE_BATCH];
    int rc, n = 0;
    if ((rc = handle_obj(d, handle, kind, &idx)) < 0)
        return rc;
    if ((rc = my_actor(d, &ai, &tag)) < 0)
        return rc;
    np_actor *a = &d->actors[ai];
    np_obj *o = &d->objs[idx];
    uint32_t *ngw = &d->h->name_guard;
    if ((rc = guard_lock(d, ngw, tag, NP_NOWAIT)) < 0)
        return rc;
    CRASHPOINT();
    if ((rc = guard_lock(d, &o->guard, tag, NP_NOWAIT)) < 0) {
        guard_unlock(ngw);
        return rc;
    }
    CRASHPOINT();
    if (!o->used || o->gen != handle_gen(handle) || np_name_find(d, o->name, &slot) != idx + 1) {
        guard_unlock(&o->guard);
        guard_unlock(ngw);
        return NP_ESTALE;
    }
    for (uint32_t cur = o->qhead; cur && n < NP_WAKE_BATCH; cur = d->actors[cur - 1].qnext)
        who[n++] = cur - 1;
    tx_begin(a, d->nobj, idx + 1);
    TX32(d, a, d->names[slot], NP_NAME_TOMB);
    TX32(d, a, o->used, 0);
    TX32(d, a, o->gen, (o->gen + 1) & NP_GEN_MASK);
    TX64(d, a, o->value, 0);
    TX32(d, a, o->protected_, 0);
    TX32(d, a, o->owner, 0);
    TX32(d, a, o->qhead, 0);
    TX32(d, a, o->qtail, 0);
    TX32(d, a, o->qlen, 0);
    if (kind == NP_KIND_MUTEX && o->token > d->h->token_hw)
        TX64(d, a, d->h->token_hw, o->token);  /* T2 */
    tx_commit(d, a);
    guard_unlock(&o->guard);
    CRASHPOINT();
    guard_unlock(ngw);
    CRASHPOINT();
    /* Waiters beyond the batch notice at the end of their slice. */
    np_wake_actors(d, who, n);
    return 0;
}

int64_t np_sem_destroy(np_domain *d, uint64_t handle)
{
    NP_ENTER(d);
    int64_t rc = destroy(d, handle, NP_KIND_SEM);
    NP_LEAVE(d);
    return rc;
}

int64_t np_mutex_destroy(np_domain *d, uint64_t handle)
{
    NP_ENTER(d);
    int64_t rc = destroy(d, handle, NP_KIND_MUTEX);
    NP_LEAVE(d);
    return rc;
}
