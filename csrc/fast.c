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
#include "netplex_core.h"

typedef int64_t (*np_op_h)(np_domain *, uint64_t);
typedef int64_t (*np_op_hd)(np_domain *, uint64_t, int64_t);

typedef int64_t (*np_op)(np_domain *);

typedef struct {
    PyObject_HEAD
    np_domain *d;                           /* NULL once the Domain is closed */
    np_op_hd sem_dec, mtx_lock;             /* uncounted (GIL held) */
    np_op_hd sem_dec_w, mtx_lock_w;         /* counted: the GIL is released */
    np_op_h sem_inc, mtx_unlock;
    np_op wait_cancel;
    PyObject *sems, *mtxs;                  /* dict: name -> handle (int) */
    PyObject *slow_dec, *slow_inc, *slow_lock, *slow_unlock;
} Binder;

/* 1 and *out = the cached handle of name; 0 when not cached (or not a
 * usable key: the slow path will say what is wrong with it). */
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

static inline PyObject *slow(PyObject *fn, PyObject *const *args, size_t nargsf, PyObject *kw)
{
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
static PyObject *resume(Binder *self, PyObject *fn, PyObject *const *args, size_t nargsf, PyObject *kw)
{
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
            && cached(self->sems, args[0], &h) && self->d) {
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
                return slow(self->slow_dec, args, nargsf, kw);
            rc = first_slice(self, self->sem_dec_w, h);
            if (rc >= 0)
                return PyLong_FromLongLong(rc);
            if (rc == NP_EDESTROYED)
                return PyLong_FromLong(-1);
            if (rc == NP_EINTR)
                return resume(self, self->slow_dec, args, nargsf, kw);
        }
    }
    return slow(self->slow_dec, args, nargsf, kw);
}

/* sem_increment(name) */
static PyObject *b_sem_increment(Binder *self, PyObject *const *args, size_t nargsf, PyObject *kw)
{
    if (kw == NULL && PyVectorcall_NARGS(nargsf) == 1) {
        uint64_t h;
        if (cached(self->sems, args[0], &h) && self->d) {
            int64_t rc = self->sem_inc(self->d, h);
            if (rc >= 0)
                return PyLong_FromLongLong(rc);
        }
    }
    return slow(self->slow_inc, args, nargsf, kw);
}

/* mutex_lock(name, timeout=None, *, cancel=None) */
static PyObject *b_mutex_lock(Binder *self, PyObject *const *args, size_t nargsf, PyObject *kw)
{
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    uint64_t h;
    if (kw == NULL && (n == 1 || (n == 2 && args[1] == Py_None))
            && cached(self->mtxs, args[0], &h) && self->d) {
        int64_t rc = self->mtx_lock(self->d, h, NP_NOWAIT);
        if (rc == NP_EAGAIN) {
            if (about_to_block(NP_KIND_MUTEX) < 0)
                return NULL;
            if (!self->d)
                return slow(self->slow_lock, args, nargsf, kw);
            rc = first_slice(self, self->mtx_lock_w, h);
        }
        if (rc == 0)
            Py_RETURN_TRUE;
        if (rc == NP_EDESTROYED)
            Py_RETURN_FALSE;
        if (rc == NP_EINTR)
            return resume(self, self->slow_lock, args, nargsf, kw);
    }
    return slow(self->slow_lock, args, nargsf, kw);
}

/* mutex_unlock(name) */
static PyObject *b_mutex_unlock(Binder *self, PyObject *const *args, size_t nargsf, PyObject *kw)
{
    if (kw == NULL && PyVectorcall_NARGS(nargsf) == 1) {
        uint64_t h;
        if (cached(self->mtxs, args[0], &h) && self->d && self->mtx_unlock(self->d, h) == 0)
            Py_RETURN_NONE;
    }
    return slow(self->slow_unlock, args, nargsf, kw);
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
/* The public functions without a Python frame.
 *
 * Forward(ctx, attr, method, names, defaults, npos): calling it with the
 * public signature calls getattr(ctx, attr).method(*all_params) with every
 * parameter in positional form (keywords mapped by name, defaults filled),
 * which is what semaphore.decrement & co. do in Python.  MutexBase gives
 * Mutex its lock()/unlock() the same way.  The context object is the one
 * of netplex_native._context, so the backend in use is looked up at each
 * call, as in Python. */

#define FWD_MAX 8

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *dict;
    PyObject *ctx, *attr, *method, *names, *defaults;
    Py_ssize_t npos;
} Forward;

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
    PyObject *backend = PyObject_GetAttr(f->ctx, f->attr);
    if (backend == NULL)
        return NULL;
    a[-1] = backend;            /* buf[0]: the method's self */
    PyObject *r = PyObject_VectorcallMethod(f->method, a - 1, (size_t)(np + 1), NULL);
    Py_DECREF(backend);
    return r;
}

static int fwd_init(Forward *f, PyObject *args, PyObject *kwds)
{
    PyObject *ctx, *attr, *method, *names, *defaults;
    Py_ssize_t npos;
    if (!PyArg_ParseTuple(args, "OUUO!O!n:Forward", &ctx, &attr, &method, &PyTuple_Type, &names,
                          &PyTuple_Type, &defaults, &npos))
        return -1;
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
    f->vectorcall = (vectorcallfunc)fwd_vectorcall;
    return 0;
}

static int fwd_traverse(Forward *f, visitproc visit, void *arg)
{
    Py_VISIT(f->dict); Py_VISIT(f->ctx); Py_VISIT(f->attr); Py_VISIT(f->method);
    Py_VISIT(f->names); Py_VISIT(f->defaults);
    return 0;
}

static int fwd_clear(Forward *f)
{
    Py_CLEAR(f->dict); Py_CLEAR(f->ctx); Py_CLEAR(f->attr); Py_CLEAR(f->method);
    Py_CLEAR(f->names); Py_CLEAR(f->defaults);
    return 0;
}

static void fwd_dealloc(Forward *f)
{
    PyObject_GC_UnTrack(f);
    fwd_clear(f);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

static PyGetSetDef fwd_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL}
};

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
    .tp_dictoffset = offsetof(Forward, dict),
    .tp_getset = fwd_getset,
};

/* MutexBase: the name, lock(timeout=None) and unlock() of mutex.Mutex. */
static PyObject *mutex_ctx;          /* set_context(): netplex_native._context.ctx */
static PyObject *s_mutex, *s_lock, *s_unlock;

typedef struct {
    PyObject_HEAD
    PyObject *name;
} MutexBase;

static int mb_init(MutexBase *self, PyObject *args, PyObject *kwds)
{
    PyObject *name;
    static char *kw[] = {"name", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:MutexBase", kw, &name))
        return -1;
    Py_INCREF(name);
    Py_XSETREF(self->name, name);
    return 0;
}

static PyObject *mb_backend_call(MutexBase *self, PyObject *method, PyObject *timeout)
{
    if (mutex_ctx == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "netplex_native._fast.set_context() was not called");
        return NULL;
    }
    PyObject *backend = PyObject_GetAttr(mutex_ctx, s_mutex);
    if (backend == NULL)
        return NULL;
    PyObject *a[3] = {backend, self->name, timeout};
    PyObject *r = PyObject_VectorcallMethod(method, a, timeout ? 3 : 2, NULL);
    Py_DECREF(backend);
    return r;
}

static PyObject *mb_lock(MutexBase *self, PyObject *const *args, Py_ssize_t n, PyObject *kwnames)
{
    PyObject *timeout = Py_None;
    Py_ssize_t nk = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (n + nk > 1) {
        PyErr_SetString(PyExc_TypeError, "lock() takes at most 1 argument (timeout)");
        return NULL;
    }
    if (n == 1)
        timeout = args[0];
    else if (nk == 1) {
        if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout") != 0) {
            PyErr_Format(PyExc_TypeError, "lock() got an unexpected keyword argument '%U'",
                         PyTuple_GET_ITEM(kwnames, 0));
            return NULL;
        }
        timeout = args[0];
    }
    return mb_backend_call(self, s_lock, timeout);
}

static PyObject *mb_unlock(MutexBase *self, PyObject *Py_UNUSED(ignored))
{
    return mb_backend_call(self, s_unlock, NULL);
}

static PyObject *mb_get_name(MutexBase *self, void *Py_UNUSED(c))
{
    if (self->name == NULL)
        Py_RETURN_NONE;
    Py_INCREF(self->name);
    return self->name;
}

static void mb_dealloc(MutexBase *self)
{
    Py_CLEAR(self->name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef mb_methods[] = {
    {"lock", (PyCFunction)(void (*)(void))mb_lock, METH_FASTCALL | METH_KEYWORDS,
     "lock(timeout=None) -> bool: wait until locked (True), or timeout seconds (False)."},
    {"unlock", (PyCFunction)mb_unlock, METH_NOARGS, "unlock(): unlock (NotHolderError when this process does not hold it)."},
    {NULL, NULL, 0, NULL}
};

static PyGetSetDef mb_getset[] = {
    {"name", (getter)mb_get_name, NULL, "the mutex's name", NULL},
    {NULL, NULL, NULL, NULL, NULL}
};

static PyTypeObject MutexBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "netplex_native._fast.MutexBase",
    .tp_basicsize = sizeof(MutexBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "lock() and unlock() of netplex_native.mutex.Mutex.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)mb_init,
    .tp_dealloc = (destructor)mb_dealloc,
    .tp_methods = mb_methods,
    .tp_getset = mb_getset,
};

static PyObject *set_context(PyObject *Py_UNUSED(m), PyObject *ctx)
{
    Py_INCREF(ctx);
    Py_XSETREF(mutex_ctx, ctx);
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
    {"set_context", set_context, METH_O, "set_context(ctx): the context whose .mutex MutexBase uses."},
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
            || PyType_Ready(&MutexBaseType) < 0)
        return NULL;
    s_mutex = PyUnicode_InternFromString("mutex");
    s_lock = PyUnicode_InternFromString("lock");
    s_unlock = PyUnicode_InternFromString("unlock");
    if (!s_mutex || !s_lock || !s_unlock)
        return NULL;
    PyObject *m = PyModule_Create(&fast_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&BinderType);
    Py_INCREF(&ForwardType);
    Py_INCREF(&MutexBaseType);
    if (PyModule_AddObject(m, "Binder", (PyObject *)&BinderType) < 0
            || PyModule_AddObject(m, "Forward", (PyObject *)&ForwardType) < 0
            || PyModule_AddObject(m, "MutexBase", (PyObject *)&MutexBaseType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
