/*
 * fast.c — netplex_native._fast: the uncontended operations without cffi's
 * per-call overhead.
 *
 * Why: a cffi call converts its arguments through a generic path and
 * releases and retakes the GIL: about 85 ns before the core does its ~10 ns
 * of work.  The four operations that never block — decrement without wait,
 * increment, mutex trylock, unlock — are served here, by methods of a Binder
 * that look the name up in the Domain's own handle caches and call the core.
 *
 * Three layers, each falling back to the one above it unchanged:
 *  - Binder: a Domain's entry points (by name, its per-process dict from
 *    name to core handle); anything else goes to the Domain's Python methods.
 *  - the registry and Forward: the public functions (semaphore.decrement &
 *    co.) find this process's backend in a C mirror of ctx.sem / ctx.mutex
 *    (R1) and, for a native backend, call its Binder directly (R2), without
 *    a Python frame or attribute lookup.
 *  - handles (SemaphoreBase, MutexBase): Semaphore and Mutex keep their
 *    name's core handle in the object and make the uncontended call with it;
 *    every other case calls the class's Python method (H1-H4).
 *
 * One core: the Binder does not link the core's files.  It calls the functions
 * of the cffi module through pointers handed over by netplex_native/native/domain.py
 * (ffi.addressof), so there is one copy of the core and of its per-process
 * state (registration, thread cache, crash points).
 *
 * Anything that is not the plain fast case — a name not cached yet, a stale
 * handle, a wait, a timeout, keyword arguments, any error code — is passed
 * unchanged to the Python method, which does the full job.  A failed fast
 * attempt changed nothing (the core returns an error only before it writes),
 * so redoing it in Python is safe.
 *
 * The GIL is kept for the non-blocking calls (NP_NOWAIT; a guard is held by
 * its owner for a few instructions, and a dead owner is taken over inside),
 * and they use the core's np_fast_* entry points, which skip the in-flight
 * count that np_domain_close waits for: holding the GIL, and the Binder's
 * `d' being cleared by Domain.close() (under the GIL) before the core's
 * close runs, is what excludes a concurrent close here.  A blocking call
 * without a timeout (decrement(wait=True), lock()) makes its first wait slice
 * here with the GIL released, through the counted entry points; if that
 * slice ends with the caller still queued (NP_EINTR), the Python method
 * continues the same wait (keeping its place, running signal handlers
 * between slices), and if that raises before its own clean-up, the wait is
 * cancelled here.  A mutex destroyed during that slice answers False, as the
 * Python method does (never re-created and locked behind the caller's back).
 * Just before such a wait may block (its non-blocking attempt failed), the
 * block hook (set_block_hook: netplex_native/loopcheck.py) is called with
 * the kind, so a synchronous wait on an event loop's thread is reported --
 * only when a loop runs on this thread, and once per call site (a small
 * cache of the sites already reported, see about_to_block).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include "netplex_core.h"

typedef int64_t (*np_op_h)(np_domain *, uint64_t);
typedef int64_t (*np_op_hd)(np_domain *, uint64_t, int64_t);

typedef int64_t (*np_op)(np_domain *);

enum { K_SEM, K_MUTEX, K_N };

typedef struct {
    PyObject_HEAD
    np_domain *d;                           /* NULL once the Domain is closed */
    np_op_hd sem_dec, mtx_lock;             /* uncounted (GIL held) */
    np_op_hd sem_dec_w, mtx_lock_w;         /* counted: the GIL is released */
    np_op_h sem_inc, mtx_unlock;
    np_op wait_cancel;
    PyObject *sems, *mtxs;                  /* dict: name -> handle (int) */
    PyObject *slow_dec, *slow_inc, *slow_lock, *slow_unlock;
    PyObject *last_name[K_N];               /* the name last found, per kind (see lookup) */
    uint64_t last_h[K_N];
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

/* The Domain's dict, with the name last found in it in front (per kind): a
 * loop that calls with one name (a literal: the same str object each time)
 * skips the dict.  The entry is that str object itself, held (never another
 * object at its address), exact str only (its equality is identity's), and
 * its handle as the dict had it.  Like every cached handle it is never
 * wrong, only stale (the core refuses a handle whose object was destroyed,
 * NP_ESTALE); every call that goes on to the Domain's method (slow, resume)
 * forgets it first, so the next call reads the dict the method refreshed. */
static inline int lookup(Binder *self, int k, PyObject *name, uint64_t *out)
{
    if (name == self->last_name[k]) {
        *out = self->last_h[k];
        return 1;
    }
    if (!cached(k == K_SEM ? self->sems : self->mtxs, name, out))
        return 0;
    if (PyUnicode_CheckExact(name)) {
        PyObject *old = self->last_name[k];
        self->last_name[k] = Py_NewRef(name);
        self->last_h[k] = *out;
        Py_XDECREF(old);                /* a str: its deallocation runs no Python */
    }
    return 1;
}

static inline void forget(Binder *self, int k)
{
    Py_CLEAR(self->last_name[k]);
}

/* The Domain's method (kind k): the whole job, after forgetting k's last name. */
static inline PyObject *slow(Binder *self, int k, PyObject *fn, PyObject *const *args,
                             size_t nargsf, PyObject *kw)
{
    forget(self, k);
    return PyObject_Vectorcall(fn, args, nargsf, kw);
}

static PyObject *block_hook;         /* set_block_hook(): called with the kind before a blocking wait */
static PyObject *loop_getter;        /* asyncio._get_running_loop (set_block_hook's second argument) */

/* Call sites (code object, line) the hook has already reported: it warns
 * once per call site, so calling it again from one of them does nothing
 * (about a microsecond of Python on every blocking wait on a loop's thread,
 * which is most of a hand-off on one CPU).  The hook says when its call site
 * is our caller's own frame (True): only then is the site cached.  Strong
 * references: a cached code object is never freed and replaced at its
 * address. */
#define SITES 64
static struct { PyObject *code; int line; } sites[SITES];

static inline unsigned site_slot(PyObject *code, int line)
{
    uintptr_t h = ((uintptr_t)code >> 4) ^ ((uintptr_t)line * 2654435761u);
    return (unsigned)(h % SITES);
}

/* 0, or -1 with an exception set by the hook. */
static int about_to_block(int kind)
{
    if (!block_hook)
        return 0;
    if (loop_getter) {
        PyObject *l = PyObject_CallNoArgs(loop_getter);
        if (!l)
            return -1;
        int none = l == Py_None;
        Py_DECREF(l);
        if (none)
            return 0;                   /* no loop runs here: nothing to report */
    }
    PyFrameObject *f = PyEval_GetFrame();          /* borrowed: our caller's */
    PyObject *code = f ? (PyObject *)PyFrame_GetCode(f) : NULL;
    int line = f ? PyFrame_GetLineNumber(f) : -1;
    unsigned i = code ? site_slot(code, line) : 0;
    if (code && sites[i].code == code && sites[i].line == line) {
        Py_DECREF(code);
        return 0;                       /* reported already */
    }
    PyObject *k = PyLong_FromLong(kind);
    if (!k) {
        Py_XDECREF(code);
        return -1;
    }
    PyObject *r = PyObject_CallOneArg(block_hook, k);
    Py_DECREF(k);
    if (!r) {
        Py_XDECREF(code);
        return -1;
    }
    if (code && r == Py_True) {
        Py_XSETREF(sites[i].code, code);            /* takes our reference */
        sites[i].line = line;
    } else {
        Py_XDECREF(code);
    }
    Py_DECREF(r);
    return 0;
}

/* One wait slice with the GIL released. */
static inline int64_t first_slice(Binder *self, np_op_hd op, uint64_t h)
{
    int64_t rc;
    np_domain *d = self->d;
    Py_BEGIN_ALLOW_THREADS
    rc = op(d, h, NP_FOREVER);
    Py_END_ALLOW_THREADS
    return rc;
}

/* Still queued after a slice: the Python method continues the wait. */
static PyObject *resume(Binder *self, int k, PyObject *fn, PyObject *const *args, size_t nargsf,
                        PyObject *kw)
{
    forget(self, k);
    PyObject *r = PyObject_Vectorcall(fn, args, nargsf, kw);
    if (r == NULL && self->d)
        self->wait_cancel(self->d);     /* idempotent: nothing queued is fine */
    return r;
}

/* sem_decrement(name, wait=False, timeout=None, *, cancel=None) */
static PyObject *b_sem_decrement(Binder *self, PyObject *const *args, size_t nargsf, PyObject *kw)
{
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    uint64_t h;
    if (kw == NULL && n >= 1 && n <= 3 && (n < 3 || args[2] == Py_None)
            && self->d && lookup(self, K_SEM, args[0], &h)) {
        if (n < 2 || args[1] == Py_False) {
            int64_t rc = self->sem_dec(self->d, h, NP_NOWAIT);
            if (rc >= 0)
                return PyLong_FromLongLong(rc);
            if (rc == NP_EAGAIN)
                return PyLong_FromLong(-1);
        } else if (args[1] == Py_True) {
            int64_t rc = self->sem_dec(self->d, h, NP_NOWAIT);
            if (rc >= 0)
                return PyLong_FromLongLong(rc);
            if (about_to_block(NP_KIND_SEM) < 0)
                return NULL;
            if (!self->d)
                return slow(self, K_SEM, self->slow_dec, args, nargsf, kw);
            rc = first_slice(self, self->sem_dec_w, h);
            if (rc >= 0)
                return PyLong_FromLongLong(rc);
            if (rc == NP_EDESTROYED)
                return PyLong_FromLong(-1);
            if (rc == NP_EINTR)
                return resume(self, K_SEM, self->slow_dec, args, nargsf, kw);
        }
    }
    return slow(self, K_SEM, self->slow_dec, args, nargsf, kw);
}

/* sem_increment(name) */
static PyObject *b_sem_increment(Binder *self, PyObject *const *args, size_t nargsf, PyObject *kw)
{
    if (kw == NULL && PyVectorcall_NARGS(nargsf) == 1) {
        uint64_t h;
        if (self->d && lookup(self, K_SEM, args[0], &h)) {
            int64_t rc = self->sem_inc(self->d, h);
            if (rc >= 0)
                return PyLong_FromLongLong(rc);
        }
    }
    return slow(self, K_SEM, self->slow_inc, args, nargsf, kw);
}

/* mutex_lock(name, timeout=None, *, cancel=None) */
static PyObject *b_mutex_lock(Binder *self, PyObject *const *args, size_t nargsf, PyObject *kw)
{
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    uint64_t h;
    if (kw == NULL && (n == 1 || (n == 2 && args[1] == Py_None))
            && self->d && lookup(self, K_MUTEX, args[0], &h)) {
        int64_t rc = self->mtx_lock(self->d, h, NP_NOWAIT);
        if (rc == NP_EAGAIN) {
            if (about_to_block(NP_KIND_MUTEX) < 0)
                return NULL;
            if (!self->d)
                return slow(self, K_MUTEX, self->slow_lock, args, nargsf, kw);
            rc = first_slice(self, self->mtx_lock_w, h);
        }
        if (rc == 0)
            Py_RETURN_TRUE;
        if (rc == NP_EDESTROYED)
            Py_RETURN_FALSE;
        if (rc == NP_EINTR)
            return resume(self, K_MUTEX, self->slow_lock, args, nargsf, kw);
    }
    return slow(self, K_MUTEX, self->slow_lock, args, nargsf, kw);
}

/* mutex_unlock(name) */
static PyObject *b_mutex_unlock(Binder *self, PyObject *const *args, size_t nargsf, PyObject *kw)
{
    if (kw == NULL && PyVectorcall_NARGS(nargsf) == 1) {
        uint64_t h;
        if (self->d && lookup(self, K_MUTEX, args[0], &h) && self->mtx_unlock(self->d, h) == 0)
            Py_RETURN_NONE;
    }
    return slow(self, K_MUTEX, self->slow_unlock, args, nargsf, kw);
}

static int b_traverse(Binder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->sems);
    Py_VISIT(self->mtxs);
    Py_VISIT(self->slow_dec);
    Py_VISIT(self->slow_inc);
    Py_VISIT(self->slow_lock);
    Py_VISIT(self->slow_unlock);
    return 0;
}

static int b_clear(Binder *self)
{
    Py_CLEAR(self->sems);
    Py_CLEAR(self->mtxs);
    Py_CLEAR(self->slow_dec);
    Py_CLEAR(self->slow_inc);
    Py_CLEAR(self->slow_lock);
    Py_CLEAR(self->slow_unlock);
    forget(self, K_SEM);
    forget(self, K_MUTEX);
    return 0;
}

static void b_dealloc(Binder *self)
{
    PyObject_GC_UnTrack(self);
    b_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Binder(domain, sem_dec, sem_inc, mtx_lock, mtx_unlock, wait_cancel, sem_dec_w,
 *        mtx_lock_w, sems, mtxs, slow_dec, slow_inc, slow_lock, slow_unlock)
 * domain and the seven functions are addresses (ints) from the cffi module:
 * the np_fast_* ones, then the counted np_sem_decrement and np_mutex_lock. */
static int b_init(Binder *self, PyObject *args, PyObject *kwds)
{
    unsigned long long d, f1, f2, f3, f4, f5, f6, f7;
    PyObject *sems, *mtxs, *s1, *s2, *s3, *s4;
    if (kwds && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Binder takes no keyword arguments");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "KKKKKKKKO!O!OOOO:Binder", &d, &f1, &f2, &f3, &f4, &f5,
                          &f6, &f7, &PyDict_Type, &sems, &PyDict_Type, &mtxs,
                          &s1, &s2, &s3, &s4))
        return -1;
    if (!d || !f1 || !f2 || !f3 || !f4 || !f5 || !f6 || !f7) {
        PyErr_SetString(PyExc_ValueError, "Binder: null domain or function address");
        return -1;
    }
    self->d = (np_domain *)(uintptr_t)d;
    self->sem_dec = (np_op_hd)(uintptr_t)f1;
    self->sem_inc = (np_op_h)(uintptr_t)f2;
    self->mtx_lock = (np_op_hd)(uintptr_t)f3;
    self->mtx_unlock = (np_op_h)(uintptr_t)f4;
    self->wait_cancel = (np_op)(uintptr_t)f5;
    self->sem_dec_w = (np_op_hd)(uintptr_t)f6;
    self->mtx_lock_w = (np_op_hd)(uintptr_t)f7;
    Py_INCREF(sems); Py_XSETREF(self->sems, sems);
    Py_INCREF(mtxs); Py_XSETREF(self->mtxs, mtxs);
    Py_INCREF(s1); Py_XSETREF(self->slow_dec, s1);
    Py_INCREF(s2); Py_XSETREF(self->slow_inc, s2);
    Py_INCREF(s3); Py_XSETREF(self->slow_lock, s3);
    Py_INCREF(s4); Py_XSETREF(self->slow_unlock, s4);
    return 0;
}

/* close(): from now on every call goes to the Python methods (which say
 * the Domain is closed).  Called by Domain.close() before the core's close. */
static PyObject *b_close(Binder *self, PyObject *Py_UNUSED(ignored))
{
    self->d = NULL;
    forget(self, K_SEM);
    forget(self, K_MUTEX);
    Py_RETURN_NONE;
}

static PyMethodDef b_methods[] = {
    {"close", (PyCFunction)b_close, METH_NOARGS, NULL},
    {"sem_decrement", (PyCFunction)(void (*)(void))b_sem_decrement, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"sem_increment", (PyCFunction)(void (*)(void))b_sem_increment, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"mutex_lock", (PyCFunction)(void (*)(void))b_mutex_lock, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"mutex_unlock", (PyCFunction)(void (*)(void))b_mutex_unlock, METH_FASTCALL | METH_KEYWORDS, NULL},
    {NULL, NULL, 0, NULL}
};

static PyTypeObject BinderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "netplex_native._fast.Binder",
    .tp_basicsize = sizeof(Binder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Uncontended semaphore/mutex operations of one Domain (see fast.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)b_init,
    .tp_dealloc = (destructor)b_dealloc,
    .tp_traverse = (traverseproc)b_traverse,
    .tp_clear = (inquiry)b_clear,
    .tp_methods = b_methods,
};

/* ------------------------------------------------------------------ */
/* The backend of this process (the registry).
 *
 * netplex_native._context.Context calls set_backend(attr, backend) whenever
 * its `sem' or `mutex' attribute is set, so these always name what
 * ctx.sem / ctx.mutex name (R1).  A backend whose hot methods are a Binder's
 * (a native backend in a container, or a Domain's: it says so with its
 * `_fast_binder' attribute) has that Binder recorded beside it (R2): its
 * `decrement' is the Binder's sem_decrement, its `increment' the Binder's
 * sem_increment, its `lock' and `unlock' the Binder's mutex_lock and
 * mutex_unlock.  Forward and the handles call the Binder directly then,
 * which is what calling the backend's method does, without the attribute
 * lookups.  Strong references: a recorded object is never freed and replaced
 * at its address while recorded.  fork() copies the registry with the
 * rest of the process, which is what it must be in the child. */

static PyObject *reg_be[K_N];       /* the backend (strong), NULL before set_backend */
static Binder *reg_binder[K_N];     /* its Binder (strong), or NULL: call the backend */
static PyObject *s_fast_binder, *s_sem, *s_mutex;

/* be's Binder (a new reference), or NULL when it has none.  Its instance
 * attribute only: a backend's __getattr__ (the placeholder's raises) is
 * never called. */
static Binder *binder_of_backend(PyObject *be)
{
    if (be == NULL || be == Py_None)
        return NULL;
    PyObject *b = PyObject_GenericGetAttr(be, s_fast_binder);
    if (b == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (!PyObject_TypeCheck(b, &BinderType)) {
        Py_DECREF(b);
        return NULL;
    }
    return (Binder *)b;
}

/* set_backend(attr, backend): ctx.<attr> is now backend. */
static PyObject *set_backend(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t n)
{
    if (n != 2 || !PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "set_backend(attr, backend)");
        return NULL;
    }
    int k = PyUnicode_Compare(args[0], s_sem) == 0 ? K_SEM
          : PyUnicode_Compare(args[0], s_mutex) == 0 ? K_MUTEX : -1;
    if (k < 0) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;                 /* another attribute: not ours to follow */
    }
    PyObject *old_be = reg_be[k];
    Binder *old_b = reg_binder[k];
    reg_be[k] = Py_NewRef(args[1]);
    reg_binder[k] = binder_of_backend(args[1]);
    Py_XDECREF(old_be);                 /* last: a finalizer sees the new state */
    Py_XDECREF(old_b);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* The public functions without a Python frame.
 *
 * Forward(ctx, attr, method, names, defaults, npos): calling it with the
 * public signature calls getattr(ctx, attr).method(*all_params) with every
 * parameter in positional form (keywords mapped by name, defaults filled),
 * which is what semaphore.decrement & co. do in Python.  For `sem' and
 * `mutex' the backend is the registry's (R1); semaphore.decrement and
 * semaphore.increment of a backend with a Binder call the Binder's C method
 * directly (R2): the same call, without looking `decrement' up.  The public
 * name is the builtin function as_function() makes of it (CPython
 * specializes calls of builtin functions, not of other callables). */

#define FWD_MAX 8

enum { OP_NONE, OP_SEM_DEC, OP_SEM_INC };

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *ctx, *attr, *method, *names, *defaults;
    Py_ssize_t npos;
    int kind;                       /* K_SEM, K_MUTEX, or -1: getattr(ctx, attr) */
    int op;                         /* OP_*: the Binder method it is, if any */
    PyMethodDef def;                /* as_function(): the builtin function's definition */
    PyObject *doc;                  /* def.ml_doc's storage (bytes) */
} Forward;

/* The Binder's method of op, called with args (R2). */
static inline PyObject *fwd_binder_call(Forward *f, Binder *b, PyObject *const *args, Py_ssize_t n)
{
    PyObject *r;
    Py_INCREF(b);               /* the call may run Python that replaces the registry's */
    if (f->op == OP_SEM_DEC)
        r = b_sem_decrement(b, args, (size_t)n, NULL);
    else
        r = b_sem_increment(b, args, (size_t)n, NULL);
    Py_DECREF(b);
    return r;
}

static PyObject *fwd_vectorcall(Forward *f, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    Py_ssize_t np = PyTuple_GET_SIZE(f->names);
    Py_ssize_t nd = PyTuple_GET_SIZE(f->defaults);
    PyObject *buf[FWD_MAX + 1];
    PyObject **a = buf + 1;
    if (n > f->npos) {
        PyErr_Format(PyExc_TypeError, "%U() takes %zd positional argument%s but %zd were given",
                     f->method, f->npos, f->npos == 1 ? "" : "s", n);
        return NULL;
    }
    /* Positional only, the required ones given: the Binder's method has the
     * same parameters with the same defaults (fwd_init), so it takes them as
     * they are. */
    if (f->op != OP_NONE && kwnames == NULL && n == np - PyTuple_GET_SIZE(f->defaults)
            && reg_be[f->kind] != NULL && reg_binder[f->kind] != NULL)
        return fwd_binder_call(f, reg_binder[f->kind], args, n);
    for (Py_ssize_t i = 0; i < np; i++)
        a[i] = i < n ? args[i] : NULL;
    if (kwnames) {
        Py_ssize_t nk = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nk; k++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, k);
            Py_ssize_t j = 0;
            for (; j < np; j++) {
                PyObject *nm = PyTuple_GET_ITEM(f->names, j);
                if (nm == key || PyUnicode_Compare(nm, key) == 0)
                    break;
            }
            if (j == np) {
                PyErr_Format(PyExc_TypeError, "%U() got an unexpected keyword argument '%U'", f->method, key);
                return NULL;
            }
            if (a[j]) {
                PyErr_Format(PyExc_TypeError, "%U() got multiple values for argument '%U'", f->method, key);
                return NULL;
            }
            a[j] = args[n + k];
        }
    }
    for (Py_ssize_t i = 0; i < np; i++) {
        if (a[i])
            continue;
        if (i >= np - nd) {
            a[i] = PyTuple_GET_ITEM(f->defaults, i - (np - nd));
        } else {
            PyErr_Format(PyExc_TypeError, "%U() missing required argument '%U'",
                         f->method, PyTuple_GET_ITEM(f->names, i));
            return NULL;
        }
    }
    PyObject *r;
    if (f->kind >= 0 && reg_be[f->kind] != NULL) {
        Binder *b = reg_binder[f->kind];
        if (b != NULL && f->op != OP_NONE)
            return fwd_binder_call(f, b, a, np);
        a[-1] = Py_NewRef(reg_be[f->kind]);
    } else {
        a[-1] = PyObject_GetAttr(f->ctx, f->attr);
        if (a[-1] == NULL)
            return NULL;
    }
    /* buf[0]: the method's self */
    r = PyObject_VectorcallMethod(f->method, a - 1, (size_t)(np + 1), NULL);
    Py_DECREF(a[-1]);
    return r;
}

/* The builtin function of as_function(): its self is the Forward. */
static PyObject *fwd_builtin(PyObject *self, PyObject *const *args, Py_ssize_t n, PyObject *kwnames)
{
    return fwd_vectorcall((Forward *)self, args, (size_t)n, kwnames);
}

/* as_function(doc, module): this call as a builtin function named like the
 * method, with doc ("name(signature)\n--\n\n" + text: its signature for
 * inspect) and __module__ module.  A builtin function is what CPython calls
 * fastest (its call is specialized).  Once per Forward. */
static PyObject *fwd_as_function(Forward *f, PyObject *const *args, Py_ssize_t n)
{
    if (n != 2 || !PyUnicode_Check(args[0]) || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "as_function(doc, module)");
        return NULL;
    }
    if (f->doc != NULL) {
        PyErr_SetString(PyExc_ValueError, "as_function(): called already");
        return NULL;
    }
    const char *name = PyUnicode_AsUTF8(f->method);     /* kept by f->method */
    PyObject *doc = PyUnicode_AsUTF8String(args[0]);
    if (name == NULL || doc == NULL) {
        Py_XDECREF(doc);
        return NULL;
    }
    f->doc = doc;
    f->def.ml_name = name;
    f->def.ml_meth = (PyCFunction)(void (*)(void))fwd_builtin;
    f->def.ml_flags = METH_FASTCALL | METH_KEYWORDS;
    f->def.ml_doc = PyBytes_AS_STRING(doc);
    return PyCFunction_NewEx(&f->def, (PyObject *)f, args[1]);
}

static PyMethodDef fwd_methods[] = {
    {"as_function", (PyCFunction)(void (*)(void))fwd_as_function, METH_FASTCALL,
     "as_function(doc, module): this call as a builtin function."},
    {NULL, NULL, 0, NULL}
};

static int fwd_init(Forward *f, PyObject *args, PyObject *kwds)
{
    PyObject *ctx, *attr, *method, *names, *defaults;
    Py_ssize_t npos;
    if (!PyArg_ParseTuple(args, "OUUO!O!n:Forward", &ctx, &attr, &method, &PyTuple_Type, &names,
                          &PyTuple_Type, &defaults, &npos))
        return -1;
    if (f->doc != NULL) {
        PyErr_SetString(PyExc_ValueError, "Forward: its function exists already");
        return -1;
    }
    if (PyTuple_GET_SIZE(names) > FWD_MAX || PyTuple_GET_SIZE(defaults) > PyTuple_GET_SIZE(names)
            || npos < 0 || npos > PyTuple_GET_SIZE(names)) {
        PyErr_SetString(PyExc_ValueError, "Forward: bad parameter description");
        return -1;
    }
    Py_INCREF(ctx); Py_XSETREF(f->ctx, ctx);
    Py_INCREF(attr); Py_XSETREF(f->attr, attr);
    Py_INCREF(method); Py_XSETREF(f->method, method);
    Py_INCREF(names); Py_XSETREF(f->names, names);
    Py_INCREF(defaults); Py_XSETREF(f->defaults, defaults);
    PyUnicode_InternInPlace(&f->attr);
    PyUnicode_InternInPlace(&f->method);
    f->npos = npos;
    f->kind = PyUnicode_CompareWithASCIIString(attr, "sem") == 0 ? K_SEM
            : PyUnicode_CompareWithASCIIString(attr, "mutex") == 0 ? K_MUTEX : -1;
    f->op = OP_NONE;
    /* The Binder's methods take (name, wait=False, timeout=None) and (name):
     * only these exact parameter lists and defaults are sent to them. */
    if (f->kind == K_SEM && PyTuple_GET_SIZE(names) == 3 && PyTuple_GET_SIZE(defaults) == 2
            && PyTuple_GET_ITEM(defaults, 0) == Py_False && PyTuple_GET_ITEM(defaults, 1) == Py_None
            && PyUnicode_CompareWithASCIIString(method, "decrement") == 0)
        f->op = OP_SEM_DEC;
    else if (f->kind == K_SEM && PyTuple_GET_SIZE(names) == 1 && PyTuple_GET_SIZE(defaults) == 0
            && PyUnicode_CompareWithASCIIString(method, "increment") == 0)
        f->op = OP_SEM_INC;
    f->vectorcall = (vectorcallfunc)fwd_vectorcall;
    return 0;
}

static int fwd_traverse(Forward *f, visitproc visit, void *arg)
{
    Py_VISIT(f->ctx); Py_VISIT(f->attr); Py_VISIT(f->method);
    Py_VISIT(f->names); Py_VISIT(f->defaults);
    return 0;
}

static int fwd_clear(Forward *f)
{
    Py_CLEAR(f->ctx); Py_CLEAR(f->attr); Py_CLEAR(f->method);
    Py_CLEAR(f->names); Py_CLEAR(f->defaults); Py_CLEAR(f->doc);
    return 0;
}

static void fwd_dealloc(Forward *f)
{
    PyObject_GC_UnTrack(f);
    fwd_clear(f);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

static PyTypeObject ForwardType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "netplex_native._fast.Forward",
    .tp_basicsize = sizeof(Forward),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A public function of netplex_native calling its backend without a Python frame.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)fwd_init,
    .tp_dealloc = (destructor)fwd_dealloc,
    .tp_traverse = (traverseproc)fwd_traverse,
    .tp_clear = (inquiry)fwd_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Forward, vectorcall),
    .tp_methods = fwd_methods,
};

/* ------------------------------------------------------------------ */
/* Handles: SemaphoreBase and MutexBase, the C bases of semaphore.Semaphore
 * and mutex.Mutex (and of Domain's BoundSemaphore and BoundMutex).
 *
 * A handle holds its name, the backend it is bound to (`_be': a Domain's;
 * NULL: the registry's, R1, at each call) and a cached core handle of the
 * name: (cb, ch), ch valid for Binder cb only.  Invariants:
 *  H1 The Python class keeps its methods as written: they are the
 *     specification.  accelerate(cls) moves the hot ones (HOT below) out of
 *     the class into a table here, so that ours are found; each of ours does
 *     the uncontended call itself in exactly the case where that method
 *     would reach the same core call (no arguments, or the defaults, and a
 *     backend with a Binder, R2), and calls that method, unchanged
 *     arguments and all, in every other case.  (Mutex.lock() goes to the
 *     Binder's mutex_lock instead, as the Python method would: its blocking
 *     wait then runs without a Python frame and its call site is the
 *     caller's, for the block hook.)
 *  H2 ch is the Binder's own cache entry for the name as it was when read
 *     (its Domain's per-process dict).  A core handle names one incarnation
 *     of one object (generation << 32 | index): if the name was destroyed,
 *     or destroyed and created again, since, by any process, the core
 *     answers NP_ESTALE and changes nothing; then the cache is dropped and
 *     the Python method does the by-name call, which looks the name up again
 *     exactly as a by-name call does.  So the cache is never wrong, only
 *     stale, and a stale entry costs one failed attempt.  Any other error
 *     drops it too; NP_EAGAIN (value 0, mutex held) keeps it.
 *  H3 A closed Domain clears its Binder's `d' (Domain.close, before the
 *     core's close): no attempt is made then, and the Python method raises.
 *     A Binder other than the current one (the process's backend changed)
 *     is never used with ch: the cache is per Binder object, held strongly.
 *  H4 fork(): the child inherits handles, caches and the mapping: the same
 *     handles name the same objects in the same segment, and the core
 *     registers the child on its first call, as for the by-name calls.
 *  The GIL is held from the check of `d' to the end of the core call (see
 *  the top of this file). */

enum { H_SEM, H_MUTEX };

typedef struct {
    PyObject_HEAD
    PyObject *name;                 /* the name (checked by the Python class) */
    PyObject *be;                   /* the bound backend, or NULL: the registry's */
    Binder *be_binder;              /* be's Binder, or NULL */
    Binder *cb;                     /* the Binder ch belongs to, or NULL: nothing cached */
    uint64_t ch;                    /* cached core handle of name (H2) */
} Handle;

/* The hot methods accelerate() takes over, by kind; HOT_N each. */
#define HOT_N 6
enum { M_INC_OR_LOCK, M_DEC_OR_UNLOCK, M_ACQUIRE, M_RELEASE, M_ENTER, M_EXIT };
static const char *const HOT[2][HOT_N] = {
    {"increment", "decrement", "acquire", "release", "__enter__", "__exit__"},
    {"lock", "unlock", "acquire", "release", "__enter__", "__exit__"},
};
static PyObject *py_method[2][HOT_N];   /* the Python methods (H1), strong */

/* The Python method m of kind k, called as self.m(*args, **kw). */
static PyObject *py_call(int k, int m, PyObject *self, PyObject *const *args, Py_ssize_t n,
                         PyObject *kwnames)
{
    PyObject *fn = py_method[k][m];
    if (fn == NULL) {
        PyErr_Format(PyExc_RuntimeError, "netplex_native._fast: %s() of %s handles was not "
                     "given its Python method (accelerate)", HOT[k][m], Py_TYPE(self)->tp_name);
        return NULL;
    }
    Py_ssize_t nk = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *small[8], **buf = small;
    if (n + nk + 1 > 8) {
        buf = PyMem_Malloc((size_t)(n + nk + 1) * sizeof(PyObject *));
        if (buf == NULL)
            return PyErr_NoMemory();
    }
    buf[0] = self;
    for (Py_ssize_t i = 0; i < n + nk; i++)
        buf[i + 1] = args[i];
    PyObject *r = PyObject_Vectorcall(fn, buf, (size_t)(n + 1), kwnames);
    if (buf != small)
        PyMem_Free(buf);
    return r;
}

/* The Binder to use now (a new reference), or NULL: the Python method. */
static inline Binder *binder_now(Handle *self, int k)
{
    Binder *b = self->be ? self->be_binder : reg_binder[k];
    Py_XINCREF(b);
    return b;
}

enum { A_SEM_DEC, A_SEM_INC, A_LOCK, A_UNLOCK };

/* One uncontended attempt through the cached handle (H2): 1 and *rc the
 * core's answer, or 0 when none was made (closed, name not cached yet). */
static int attempt(Handle *self, Binder *b, int what, int64_t *rc)
{
    uint64_t h;
    if (b->d == NULL || self->name == NULL)
        return 0;
    if (self->cb == b) {
        h = self->ch;
    } else {
        PyObject *nm = Py_NewRef(self->name);   /* a key's __eq__ may run Python */
        int found = lookup(b, what <= A_SEM_INC ? K_SEM : K_MUTEX, nm, &h);
        Py_DECREF(nm);
        if (!found || b->d == NULL)
            return 0;
        Binder *old = self->cb;
        self->cb = (Binder *)Py_NewRef(b);
        self->ch = h;
        Py_XDECREF(old);            /* may run Python: re-read d below */
        if (b->d == NULL)
            return 0;
    }
    switch (what) {
    case A_SEM_DEC: *rc = b->sem_dec(b->d, h, NP_NOWAIT); break;
    case A_SEM_INC: *rc = b->sem_inc(b->d, h); break;
    case A_LOCK:    *rc = b->mtx_lock(b->d, h, NP_NOWAIT); break;
    default:        *rc = b->mtx_unlock(b->d, h); break;
    }
    if (*rc < 0 && *rc != NP_EAGAIN && self->cb == b) {
        self->cb = NULL;            /* b is still referenced by our caller */
        Py_DECREF(b);
    }
    return 1;
}

/* One attempt with the Binder of now (the caller has checked the arguments
 * are the plain case): 1 and *rc, or 0: call the Python method. */
static inline int try_plain(Handle *self, int k, int what, int64_t *rc)
{
    Binder *b = binder_now(self, k);
    if (b == NULL)
        return 0;
    int done = attempt(self, b, what, rc);
    Py_DECREF(b);
    return done;
}

#define NOARGS (n == 0 && kwnames == NULL)

/* ---- SemaphoreBase: increment, decrement, acquire, release, with ---- */

static PyObject *sh_increment(Handle *self, PyObject *const *args, Py_ssize_t n, PyObject *kwnames)
{
    int64_t rc;
    if (NOARGS && try_plain(self, K_SEM, A_SEM_INC, &rc) && rc >= 0)
        return PyLong_FromLongLong(rc);
    return py_call(H_SEM, M_INC_OR_LOCK, (PyObject *)self, args, n, kwnames);
}

static PyObject *sh_decrement(Handle *self, PyObject *const *args, Py_ssize_t n, PyObject *kwnames)
{
    int64_t rc;
    if (NOARGS && try_plain(self, K_SEM, A_SEM_DEC, &rc)) {
        if (rc >= 0)
            return PyLong_FromLongLong(rc);
        if (rc == NP_EAGAIN)
            return PyLong_FromLong(-1);
    }
    return py_call(H_SEM, M_DEC_OR_UNLOCK, (PyObject *)self, args, n, kwnames);
}

static PyObject *sh_acquire(Handle *self, PyObject *const *args, Py_ssize_t n, PyObject *kwnames)
{
    int64_t rc;
    if (NOARGS && try_plain(self, K_SEM, A_SEM_DEC, &rc) && rc >= 0)
        Py_RETURN_TRUE;
    return py_call(H_SEM, M_ACQUIRE, (PyObject *)self, args, n, kwnames);
}

static PyObject *sh_release(Handle *self, PyObject *const *args, Py_ssize_t n, PyObject *kwnames)
{
    int64_t rc;
    if (NOARGS && try_plain(self, K_SEM, A_SEM_INC, &rc) && rc >= 0)
        Py_RETURN_NONE;
    return py_call(H_SEM, M_RELEASE, (PyObject *)self, args, n, kwnames);
}

static PyObject *sh_enter(Handle *self, PyObject *const *args, Py_ssize_t n, PyObject *kwnames)
{
    int64_t rc;
    if (NOARGS && try_plain(self, K_SEM, A_SEM_DEC, &rc) && rc >= 0)
        return Py_NewRef(self);
    return py_call(H_SEM, M_ENTER, (PyObject *)self, args, n, kwnames);
}

static PyObject *sh_exit(Handle *self, PyObject *const *args, Py_ssize_t n, PyObject *kwnames)
{
    int64_t rc;
    if (n == 3 && kwnames == NULL && try_plain(self, K_SEM, A_SEM_INC, &rc) && rc >= 0)
        Py_RETURN_NONE;
    return py_call(H_SEM, M_EXIT, (PyObject *)self, args, n, kwnames);
}

/* ---- MutexBase: lock, unlock, acquire, release, with ---- */

static PyObject *mh_lock(Handle *self, PyObject *const *args, Py_ssize_t n, PyObject *kwnames)
{
    if (kwnames == NULL && (n == 0 || (n == 1 && args[0] == Py_None)) && self->name != NULL) {
        Binder *b = binder_now(self, K_MUTEX);
        if (b != NULL) {
            int64_t rc;
            PyObject *r, *nm = Py_NewRef(self->name);
            if (attempt(self, b, A_LOCK, &rc) && rc == 0)
                r = Py_NewRef(Py_True);
            else                    /* what self._backend.lock(name) is (R2, H1) */
                r = b_mutex_lock(b, &nm, 1, NULL);
            Py_DECREF(nm);
            Py_DECREF(b);
            return r;
        }
    }
    return py_call(H_MUTEX, M_INC_OR_LOCK, (PyObject *)self, args, n, kwnames);
}

static PyObject *mh_unlock(Handle *self, PyObject *const *args, Py_ssize_t n, PyObject *kwnames)
{
    int64_t rc;
    if (NOARGS && try_plain(self, K_MUTEX, A_UNLOCK, &rc) && rc == 0)
        Py_RETURN_NONE;
    return py_call(H_MUTEX, M_DEC_OR_UNLOCK, (PyObject *)self, args, n, kwnames);
}

static PyObject *mh_acquire(Handle *self, PyObject *const *args, Py_ssize_t n, PyObject *kwnames)
{
    int64_t rc;
    if (NOARGS && try_plain(self, K_MUTEX, A_LOCK, &rc) && rc == 0)
        Py_RETURN_TRUE;
    return py_call(H_MUTEX, M_ACQUIRE, (PyObject *)self, args, n, kwnames);
}

static PyObject *mh_release(Handle *self, PyObject *const *args, Py_ssize_t n, PyObject *kwnames)
{
    int64_t rc;
    if (NOARGS && try_plain(self, K_MUTEX, A_UNLOCK, &rc) && rc == 0)
        Py_RETURN_NONE;
    return py_call(H_MUTEX, M_RELEASE, (PyObject *)self, args, n, kwnames);
}

static PyObject *mh_enter(Handle *self, PyObject *const *args, Py_ssize_t n, PyObject *kwnames)
{
    int64_t rc;
    if (NOARGS && try_plain(self, K_MUTEX, A_LOCK, &rc) && rc == 0)
        return Py_NewRef(self);
    return py_call(H_MUTEX, M_ENTER, (PyObject *)self, args, n, kwnames);
}

static PyObject *mh_exit(Handle *self, PyObject *const *args, Py_ssize_t n, PyObject *kwnames)
{
    int64_t rc;
    if (n == 3 && kwnames == NULL && try_plain(self, K_MUTEX, A_UNLOCK, &rc) && rc == 0)
        Py_RETURN_NONE;
    return py_call(H_MUTEX, M_EXIT, (PyObject *)self, args, n, kwnames);
}

#undef NOARGS

/* ---- the state: __init__(name, backend=None), name, _be ---- */

static int h_init(Handle *self, PyObject *args, PyObject *kwds)
{
    PyObject *name, *be = Py_None;
    static char *kw[] = {"name", "backend", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:Handle", kw, &name, &be))
        return -1;
    Binder *b = binder_of_backend(be);
    PyObject *old_name = self->name, *old_be = self->be;
    Binder *old_b = self->be_binder, *old_cb = self->cb;
    self->name = Py_NewRef(name);
    self->be = be == Py_None ? NULL : Py_NewRef(be);
    self->be_binder = b;
    self->cb = NULL;
    Py_XDECREF(old_name);
    Py_XDECREF(old_be);
    Py_XDECREF(old_b);
    Py_XDECREF(old_cb);
    return 0;
}

static PyObject *h_get_name(Handle *self, void *Py_UNUSED(c))
{
    if (self->name == NULL) {
        PyErr_SetString(PyExc_AttributeError, "name");
        return NULL;
    }
    return Py_NewRef(self->name);
}

/* Semaphore.name may be assigned (it was a plain slot): the cache goes with it. */
static int sh_set_name(Handle *self, PyObject *value, void *Py_UNUSED(c))
{
    PyObject *old = self->name;
    Binder *old_cb = self->cb;
    self->name = Py_XNewRef(value);
    self->cb = NULL;
    Py_XDECREF(old);
    Py_XDECREF(old_cb);
    return 0;
}

static int h_traverse(Handle *self, visitproc visit, void *arg)
{
    Py_VISIT(self->name);
    Py_VISIT(self->be);
    Py_VISIT(self->be_binder);
    Py_VISIT(self->cb);
    return 0;
}

static int h_clear(Handle *self)
{
    Py_CLEAR(self->name);
    Py_CLEAR(self->be);
    Py_CLEAR(self->be_binder);
    Py_CLEAR(self->cb);
    return 0;
}

/* A Python subclass's instance: subtype_dealloc untracks it, calls this and
 * drops its reference to the class itself. */
static void h_dealloc(Handle *self)
{
    PyObject_GC_UnTrack(self);
    h_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef h_members[] = {
    {"_be", T_OBJECT, offsetof(Handle, be), READONLY, "the backend a Domain's handle is bound to (None: the process's)"},
    {NULL, 0, 0, 0, NULL}
};

#define FASTM(name, fn, doc) \
    {name, (PyCFunction)(void (*)(void))fn, METH_FASTCALL | METH_KEYWORDS, doc}

static PyMethodDef sh_methods[] = {
    FASTM("increment", sh_increment, "increment() -> int: +1; returns the new value."),
    FASTM("decrement", sh_decrement, "decrement(*, wait=False, timeout=None) -> int: -1 if positive: the new value; -1 when nothing was taken."),
    FASTM("acquire", sh_acquire, "acquire(blocking=True, timeout=None) -> bool: as threading.Semaphore.acquire."),
    FASTM("release", sh_release, "release(n=1): give back n units."),
    FASTM("__enter__", sh_enter, NULL),
    FASTM("__exit__", sh_exit, NULL),
    {NULL, NULL, 0, NULL}
};

static PyMethodDef mh_methods[] = {
    FASTM("lock", mh_lock, "lock(timeout=None) -> bool: wait until locked (True), or timeout seconds (False)."),
    FASTM("unlock", mh_unlock, "unlock(force=False): unlock (NotHolderError when this process does not hold it)."),
    FASTM("acquire", mh_acquire, "acquire(blocking=True, timeout=None) -> bool: as threading.Lock.acquire."),
    FASTM("release", mh_release, "release(): as threading.Lock.release."),
    FASTM("__enter__", mh_enter, NULL),
    FASTM("__exit__", mh_exit, NULL),
    {NULL, NULL, 0, NULL}
};

static PyGetSetDef sh_getset[] = {
    {"name", (getter)h_get_name, (setter)sh_set_name, "the semaphore's name", NULL},
    {NULL, NULL, NULL, NULL, NULL}
};

static PyGetSetDef mh_getset[] = {
    {"name", (getter)h_get_name, NULL, "the mutex's name", NULL},
    {NULL, NULL, NULL, NULL, NULL}
};

static PyTypeObject SemaphoreBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "netplex_native._fast.SemaphoreBase",
    .tp_basicsize = sizeof(Handle),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The state and hot methods of netplex_native.semaphore.Semaphore (see fast.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)h_init,
    .tp_dealloc = (destructor)h_dealloc,
    .tp_traverse = (traverseproc)h_traverse,
    .tp_clear = (inquiry)h_clear,
    .tp_methods = sh_methods,
    .tp_members = h_members,
    .tp_getset = sh_getset,
};

static PyTypeObject MutexBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "netplex_native._fast.MutexBase",
    .tp_basicsize = sizeof(Handle),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The state and hot methods of netplex_native.mutex.Mutex (see fast.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)h_init,
    .tp_dealloc = (destructor)h_dealloc,
    .tp_traverse = (traverseproc)h_traverse,
    .tp_clear = (inquiry)h_clear,
    .tp_methods = mh_methods,
    .tp_members = h_members,
    .tp_getset = mh_getset,
};

/* accelerate(cls): cls (Semaphore or Mutex, a subclass of ours) gives its
 * hot Python methods to us (H1); from then on ours are found first.  Once
 * per class: a class made again (its module reloaded) gives its own, which
 * every handle of that kind uses from then on. */
static PyObject *accelerate(PyObject *Py_UNUSED(m), PyObject *cls)
{
    int k;
    if (PyType_Check(cls) && PyType_IsSubtype((PyTypeObject *)cls, &SemaphoreBaseType))
        k = H_SEM;
    else if (PyType_Check(cls) && PyType_IsSubtype((PyTypeObject *)cls, &MutexBaseType))
        k = H_MUTEX;
    else {
        PyErr_SetString(PyExc_TypeError, "accelerate(cls): cls must subclass SemaphoreBase or MutexBase");
        return NULL;
    }
    PyObject *fns[HOT_N];
    PyObject *d = ((PyTypeObject *)cls)->tp_dict;
    for (int i = 0; i < HOT_N; i++) {
        fns[i] = PyDict_GetItemString(d, HOT[k][i]);          /* borrowed */
        if (fns[i] == NULL || !PyFunction_Check(fns[i])) {
            PyErr_Format(PyExc_TypeError, "accelerate(): %s.%s must be a Python function",
                         ((PyTypeObject *)cls)->tp_name, HOT[k][i]);
            return NULL;
        }
    }
    for (int i = 0; i < HOT_N; i++)
        Py_XSETREF(py_method[k][i], Py_NewRef(fns[i]));
    for (int i = 0; i < HOT_N; i++)
        if (PyObject_DelAttrString(cls, HOT[k][i]) < 0)
            return NULL;
    Py_RETURN_NONE;
}

static PyObject *set_block_hook(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t n)
{
    if (n < 1 || n > 2) {
        PyErr_SetString(PyExc_TypeError, "set_block_hook(fn, running_loop=None)");
        return NULL;
    }
    PyObject *fn = args[0], *gl = n > 1 ? args[1] : Py_None;
    Py_XSETREF(block_hook, fn == Py_None ? NULL : Py_NewRef(fn));
    Py_XSETREF(loop_getter, gl == Py_None ? NULL : Py_NewRef(gl));
    for (int i = 0; i < SITES; i++)
        Py_CLEAR(sites[i].code);        /* a new hook has reported nothing yet */
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"set_backend", (PyCFunction)(void (*)(void))set_backend, METH_FASTCALL,
     "set_backend(attr, backend): ctx.<attr> ('sem' or 'mutex') is now backend (Context calls it)."},
    {"accelerate", accelerate, METH_O,
     "accelerate(cls): the hot methods of handle class cls are served here, falling back to cls's."},
    {"set_block_hook", (PyCFunction)(void (*)(void))set_block_hook, METH_FASTCALL,
     "set_block_hook(fn, running_loop=None): fn(kind) is called before a wait that may block "
     "(None: none) when running_loop() is not None; fn returns True when its report concerns "
     "its caller's own line, which is then not reported again."},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef fast_module = {
    PyModuleDef_HEAD_INIT, "netplex_native._fast",
    "Fast paths of the native core's uncontended operations.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__fast(void)
{
    if (PyType_Ready(&BinderType) < 0 || PyType_Ready(&ForwardType) < 0
            || PyType_Ready(&SemaphoreBaseType) < 0 || PyType_Ready(&MutexBaseType) < 0)
        return NULL;
    s_fast_binder = PyUnicode_InternFromString("_fast_binder");
    s_sem = PyUnicode_InternFromString("sem");
    s_mutex = PyUnicode_InternFromString("mutex");
    if (!s_fast_binder || !s_sem || !s_mutex)
        return NULL;
    PyObject *m = PyModule_Create(&fast_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Binder", (PyObject *)&BinderType) < 0
            || PyModule_AddObjectRef(m, "Forward", (PyObject *)&ForwardType) < 0
            || PyModule_AddObjectRef(m, "SemaphoreBase", (PyObject *)&SemaphoreBaseType) < 0
            || PyModule_AddObjectRef(m, "MutexBase", (PyObject *)&MutexBaseType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
