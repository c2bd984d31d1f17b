/*
 * names.c — lookup, create and destroy: the name table.
 *
 * Invariants kept here
 *  N1 (I1) The name table, the free lists and every `used' flag change only
 *     under the name guard, and the object's fields under its own guard too:
 *     create and destroy hold both, in that order, and log both in one intent
 *     (intent_guard = name guard, intent_guard2 = object), so a death at any
 *     point leaves the name, the free list and the object agreeing.
 *  N2 A free object is reachable by nobody (a stale handle fails the `used'
 *     and generation checks under its guard), so its name may be written
 *     outside the log before the object is published.
 *  N3 destroy bumps the generation (A4), empties the queue and wakes those
 *     who were queued; they learn it from their wait_gen.  Handles of the old
 *     generation are stale (NP_ESTALE) from then on.
 *  N5 (T2) create starts a mutex's token at the header's token_hw; destroy
 *     raises token_hw to the destroyed mutex's token; both in the intent
 *     that changes the name, under the name guard.
 *  N4 Open addressing, linear probing; the table has at least twice as many
 *     entries as objects, so a probe always ends.  There is at most one
 *     tombstone, the hole destroy leaves, at h->name_hole - 1: it is closed
 *     by backward shifting (an entry of the cluster after it whose probe
 *     passes the hole moves into it, the hole moves to where it was) until
 *     an empty entry follows; each shift is one logged transaction of the
 *     name guard alone, so a death leaves one tombstone that the next holder
 *     of the name guard finishes (name_settle) before anything else.  A
 *     missing name's probe costs the same after any churn.
 *  N6 Free objects of each kind are a LIFO list (h->free_head, next_free)
 *     plus the objects never used (index >= h->fresh): create pops, destroy
 *     pushes, in the intent that flips `used' (N1).  Create, destroy and
 *     lookup are O(1) expected whatever the number of names.
 *  N7 The hash is keyed by a random key drawn at the segment's creation
 *     (h->name_key): its probes are short for any set of names.
 */
#define _GNU_SOURCE
#include "core_internal.h"

#include <string.h>

static inline uint64_t rotl(uint64_t x, int b)
{
    return (x << b) | (x >> (64 - b));
}

#define SIPROUND do { \
        v0 += v1; v1 = rotl(v1, 13); v1 ^= v0; v0 = rotl(v0, 32); \
        v2 += v3; v3 = rotl(v3, 16); v3 ^= v2; \
        v0 += v3; v3 = rotl(v3, 21); v3 ^= v0; \
        v2 += v1; v1 = rotl(v1, 17); v1 ^= v2; v2 = rotl(v2, 32); \
    } while (0)

/* N7: SipHash-1-3 of the name under the segment's random key, so that names
 * chosen by an outsider (a user id in a rate limiter's name) cannot be made
 * to collide: probes stay short whoever picks the names. */
static uint64_t name_hash(const uint64_t key[2], const char *s)
{
    size_t len = strnlen(s, NP_NAME_MAX + 1);
    const unsigned char *p = (const unsigned char *)s;
    uint64_t v0 = key[0] ^ 0x736f6d6570736575ULL, v1 = key[1] ^ 0x646f72616e646f6dULL;
    uint64_t v2 = key[0] ^ 0x6c7967656e657261ULL, v3 = key[1] ^ 0x7465646279746573ULL;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t m = 0;
        for (int k = 0; k < 8; k++)
            m |= (uint64_t)p[i + k] << (8 * k);
        v3 ^= m;
        SIPROUND;
        v0 ^= m;
    }
    uint64_t b = (uint64_t)len << 56;
    for (int k = 0; i + k < len; k++)
        b |= (uint64_t)p[i + k] << (8 * k);
    v3 ^= b;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

uint32_t np_name_home(np_domain *d, const char *name)
{
    return (uint32_t)name_hash(d->h->name_key, name) & (d->name_cap - 1);
}

int64_t np_name_home_of(np_domain *d, const char *name)
{
    NP_ENTER(d);
    int64_t rc = NP_EINVAL;
    if (name)
        rc = np_name_home(d, name);
    NP_LEAVE(d);
    return rc;
}

/* Under the name guard.  Returns object + 1 or 0; *slot: where it is, or
 * where to insert it. */
uint32_t np_name_find(np_domain *d, const char *name, uint32_t *slot)
{
    uint32_t mask = d->name_cap - 1, pos = np_name_home(d, name);
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

static inline uint32_t home_of(np_domain *d, uint32_t e)
{
    return np_name_home(d, d->objs[e - 1].name);
}

/* N4: close the pending hole, if any.  Under the name guard. */
static void name_settle(np_domain *d, np_actor *a)
{
    uint32_t ng = d->nobj, mask = d->name_cap - 1;
    uint32_t hole;
    while ((hole = d->h->name_hole) != 0) {
        uint32_t i = hole - 1, j = i, e = 0;
        tx_begin(a, ng, 0);
        if (i >= d->name_cap || d->names[i] != NP_NAME_TOMB) {
            TX32(d, a, d->h->name_hole, 0);         /* not ours to close */
            tx_commit(d, a);
            break;
        }
        for (uint32_t k = 1; k < d->name_cap; k++) {
            j = (i + k) & mask;
            e = d->names[j];
            if (e == 0 || e == NP_NAME_TOMB || e > d->nobj)
                break;
            /* e may fill the hole when its probe from home passes it. */
            if (((j - home_of(d, e)) & mask) >= k)
                break;
        }
        if (e == 0 || e == NP_NAME_TOMB || e > d->nobj) {
            TX32(d, a, d->names[i], 0);
            TX32(d, a, d->h->name_hole, 0);
        } else {
            TX32(d, a, d->names[i], e);
            TX32(d, a, d->names[j], NP_NAME_TOMB);
            TX32(d, a, d->h->name_hole, j + 1);
        }
        tx_commit(d, a);
    }
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
    if (unlikely(d->h->name_hole))
        name_settle(d, a);      /* N4: a holder died closing it */
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
    int k = kind == NP_KIND_MUTEX;
    uint32_t lo = k ? d->nsem : 0, hi = k ? d->nobj : d->nsem;
    uint32_t head = d->h->free_head[k], fresh = d->h->fresh[k], i;
    if ((!head && fresh >= hi) || slot == UINT32_MAX) {
        guard_unlock(ngw);
        return kind == NP_KIND_SEM ? NP_ENOSPC_SEM : NP_ENOSPC_MTX;
    }
    i = head ? head - 1 : fresh;                /* N6 */
    if (i < lo || i >= hi || d->objs[i].used) {
        guard_unlock(ngw);
        return NP_ECORRUPT;     /* a free list no create or destroy wrote */
    }
    np_obj *o = &d->objs[i];
    if ((rc = obj_lock(d, o, tag, deadline)) < 0) {
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
    if (head)
        TX32(d, a, d->h->free_head[k], o->next_free);
    else
        TX32(d, a, d->h->fresh[k], i + 1);
    tx_commit(d, a);
    res = make_handle(d, i);
    obj_unlock(d, o);
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
    if (unlikely(d->h->name_hole))
        name_settle(d, a);      /* N4 */
    if ((rc = obj_lock(d, o, tag, NP_NOWAIT)) < 0) {
        guard_unlock(ngw);
        return rc;
    }
    CRASHPOINT();
    if (!o->used || o->gen != handle_gen(handle) || np_name_find(d, o->name, &slot) != idx + 1) {
        obj_unlock(d, o);
        guard_unlock(ngw);
        return NP_ESTALE;
    }
    for (uint32_t cur = o->qhead; cur && n < NP_WAKE_BATCH; cur = d->actors[cur - 1].qnext)
        who[n++] = cur - 1;
    /* 12 writes: NP_INTENT_MAX (create sets protected_ again). */
    tx_begin(a, d->nobj, idx + 1);
    TX32(d, a, d->names[slot], NP_NAME_TOMB);
    TX32(d, a, d->h->name_hole, slot + 1);     /* N4 */
    TX32(d, a, o->used, 0);
    TX32(d, a, o->gen, (o->gen + 1) & NP_GEN_MASK);
    TX64(d, a, o->value, 0);
    TX32(d, a, o->owner, 0);
    TX32(d, a, o->qhead, 0);
    TX32(d, a, o->qtail, 0);
    TX32(d, a, o->qlen, 0);
    if (kind == NP_KIND_MUTEX && o->token > d->h->token_hw)
        TX64(d, a, d->h->token_hw, o->token);  /* T2 */
    TX32(d, a, o->next_free, d->h->free_head[kind == NP_KIND_MUTEX]);     /* N6 */
    TX32(d, a, d->h->free_head[kind == NP_KIND_MUTEX], idx + 1);
    tx_commit(d, a);
    obj_unlock(d, o);
    CRASHPOINT();
    name_settle(d, a);
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
