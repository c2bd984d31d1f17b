/*
 * fast.h -- netplex_native._fast, the accelerator of the uncontended
 * operations: what its three layers share.  Private to csrc/fast/.
 *
 * Why: a cffi call converts its arguments through a generic path and
 * releases and retakes the GIL: about 85 ns before the core does its ~10 ns
 * of work.  The four operations that never block -- decrement without wait,
 * increment, mutex trylock, unlock -- are served by the accelerator, which
 * looks the name up in the Domain's own handle caches and calls the core.
 *
 * Three layers, one file each, each falling back to the one above it
 * unchanged:
 *  - binder.c: a Domain's entry points by name (Binder: its per-process
 *    dict from name to core handle); anything else goes to the Domain's
 *    Python methods.
 *  - public_functions.c: the registry and Forward: the public functions
 *    (semaphore.decrement & co.) find this process's backend in a C mirror
 *    of ctx.sem / ctx.mutex (R1) and, for a native backend, call its Binder
 *    directly (R2), without a Python frame or attribute lookup.
 *  - handles.c: SemaphoreBase and MutexBase: Semaphore and Mutex keep their
 *    name's core handle in the object and make the uncontended call with it;
 *    every other case calls the class's Python method (H1-H4).
 * module.c assembles them into the module (PyInit__fast).
 *
 * Rules every layer keeps:
 *  - One core: the accelerator does not link the core's files.  It calls the
 *    functions of the cffi module through pointers handed over by
 *    netplex_native/native/domain.py (ffi.addressof), so there is one copy of
 *    the core and of its per-process state (registration, thread cache,
 *    crash points).
 *  - Anything that is not the plain fast case -- a name not cached yet, a
 *    stale handle, a wait, a timeout, keyword arguments, any error code -- is
 *    passed unchanged to the Python method, which does the full job.  A
 *    failed fast attempt changed nothing (the core returns an error only
 *    before it writes), so redoing it in Python is safe.
 *  - The GIL is kept for the non-blocking calls (NP_NOWAIT; a guard is held
 *    by its owner for a few instructions, and a dead owner is taken over
 *    inside), and they use the core's np_fast_* entry points, which skip the
 *    in-flight count that np_domain_close waits for: holding the GIL, and
 *    the Binder's `d' being cleared by Domain.close() (under the GIL) before
 *    the core's close runs, is what excludes a concurrent close.  Only a
 *    blocking call's first wait slice releases the GIL, through the counted
 *    entry points (binder.c says how).
 *  - Everything here is hidden (-fvisibility=hidden, setup.py): the module
 *    exports PyInit__fast only, as when it was one file.
 */
#ifndef NP_FAST_H
#define NP_FAST_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include "netplex_core.h"

typedef int64_t (*np_op_h)(np_domain *, uint64_t);
typedef int64_t (*np_op_hd)(np_domain *, uint64_t, int64_t);

typedef int64_t (*np_op)(np_domain *);

enum { K_SEM, K_MUTEX, K_N };

/* ---- the Binder (binder.c) and its name cache, which the handles read too
 * (handles.c, attempt) ---- */

typedef struct {
    PyObject_HEAD
    np_domain *d;                           /* NULL once the Domain is closed */
    np_op_hd sem_dec, mtx_lock;             /* uncounted (GIL held) */
    np_op_hd sem_dec_w, mtx_lock_w;         /* counted: the GIL is released */
    np_op_h sem_inc, mtx_unlock;
    np_op wait_cancel;
    PyObject *sems, *mtxs;                  /* dict: name -> handle (int) */
    PyObject *slow_dec, *slow_inc, *slow_lock, *slow_unlock;
    PyObject *last_name[K_N][2];            /* the two names last found, per kind (see lookup) */
    uint64_t last_h[K_N][2];
    int last_next[K_N];                     /* which entry the next name replaces */
    int stopping;                           /* stop_waiting(): blocking calls go to Python (B6) */
} Binder;

/* 1 and *out = the cached handle of name in cache; 0 when not cached (or
 * not a usable key: the slow path will say what is wrong with it). */
static inline int cached(PyObject *cache, PyObject *name, uint64_t *out)
{
    PyObject *h = PyDict_GetItemWithError(cache, name);   /* borrowed */
    if (h == NULL) {
        PyErr_Clear();
        return 0;
    }
    *out = PyLong_AsUnsignedLongLong(h);
    if (*out == (uint64_t)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* The Domain's dict, with the two names last found in it in front (per
 * kind): a loop that calls with one or two names (literals: the same str
 * objects each time; a hand-off alternates two semaphores) skips the dict.
 * An entry is that str object itself, held (never another
 * object at its address), exact str only (its equality is identity's), and
 * its handle as the dict had it.  Like every cached handle it is never
 * wrong, only stale (the core refuses a handle whose object was destroyed,
 * NP_ESTALE); every call that goes on to the Domain's method (slow, resume)
 * forgets it first, so the next call reads the dict the method refreshed. */
static inline int lookup(Binder *self, int k, PyObject *name, uint64_t *out)
{
    if (name == self->last_name[k][0]) {
        *out = self->last_h[k][0];
        return 1;
    }
    if (name == self->last_name[k][1]) {
        *out = self->last_h[k][1];
        return 1;
    }
    if (!cached(k == K_SEM ? self->sems : self->mtxs, name, out))
        return 0;
    if (PyUnicode_CheckExact(name)) {
        int e = self->last_next[k];
        PyObject *old = self->last_name[k][e];
        self->last_name[k][e] = Py_NewRef(name);
        self->last_h[k][e] = *out;
        self->last_next[k] = !e;
        Py_XDECREF(old);                /* a str: its deallocation runs no Python */
    }
    return 1;
}

static inline void forget(Binder *self, int k)
{
    Py_CLEAR(self->last_name[k][0]);
    Py_CLEAR(self->last_name[k][1]);
}


/* ---- binder.c ---- */
extern PyTypeObject BinderType;
PyObject *b_sem_decrement(Binder *self, PyObject *const *args, size_t nargsf, PyObject *kw);
PyObject *b_sem_increment(Binder *self, PyObject *const *args, size_t nargsf, PyObject *kw);
PyObject *b_mutex_lock(Binder *self, PyObject *const *args, size_t nargsf, PyObject *kw);
PyObject *set_block_hook(PyObject *m, PyObject *const *args, Py_ssize_t n);

/* ---- public_functions.c ---- */
extern PyObject *reg_be[K_N];       /* the backend (strong), NULL before set_backend */
extern Binder *reg_binder[K_N];     /* its Binder (strong), or NULL: call the backend */
extern PyTypeObject ForwardType;
int registry_init(void);
Binder *binder_of_backend(PyObject *be);
PyObject *set_backend(PyObject *m, PyObject *const *args, Py_ssize_t n);

/* Attribute names, interned once: slots[i] = names[i] for i < n, all or
 * none (slots[n - 1], set last, says which).  0, or -1 with an exception. */
static inline int intern_names(PyObject **slots, const char *const *names, int n)
{
    if (slots[n - 1] != NULL)
        return 0;
    PyObject *made[8];
    for (int i = 0; i < n; i++) {
        if ((made[i] = PyUnicode_InternFromString(names[i])) == NULL) {
            while (i-- > 0)
                Py_DECREF(made[i]);
            return -1;
        }
    }
    for (int i = 0; i < n; i++)
        slots[i] = made[i];
    return 0;
}

/* ---- the RPC wire's binary frames (netplex_native/wire.py), for
 * container_channel.c and controller_calls.c ---- */
#define WIRE_OP_REPLY 0x80          /* wire.OP_REPLY */
#define WIRE_CALL_SIZE 26           /* wire._CALL.size (!IIBQBd); the name follows */
#define WIRE_REPLY_SIZE 26          /* wire._REPLY.size (!IIBQBq) */

static inline uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline uint64_t be64(const unsigned char *p)
{
    return (uint64_t)be32(p) << 32 | be32(p + 4);
}

static inline void put_be32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (24 - 8 * i));
}

static inline void put_be64(unsigned char *p, uint64_t v)
{
    put_be32(p, (uint32_t)(v >> 32));
    put_be32(p + 4, (uint32_t)v);
}

/* ---- container_channel.c (not a layer: the RPC channel's reads, in C so
 * that no signal handler runs between their steps) ---- */
PyObject *chan_send(PyObject *m, PyObject *const *args, Py_ssize_t n);
PyObject *chan_recv(PyObject *m, PyObject *const *args, Py_ssize_t n);
PyObject *chan_dispatch(PyObject *m, PyObject *const *args, Py_ssize_t n);
PyObject *chan_exchange(PyObject *m, PyObject *const *args, Py_ssize_t n);
PyObject *reply_poll(PyObject *m, PyObject *const *args, Py_ssize_t n);
PyObject *reply_poll_state(PyObject *m, PyObject *ignored);
PyObject *ctrl_hot_read(PyObject *m, PyObject *const *args, Py_ssize_t n);

/* ---- handles.c ---- */
extern PyTypeObject SemaphoreBaseType, MutexBaseType;
PyObject *accelerate(PyObject *m, PyObject *cls);

#endif
