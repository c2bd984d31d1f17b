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
 * One core: the Binder does not link netplex_core.c.  It calls the functions
 * of the cffi module through pointers handed over by _native.py
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
 * its owner for a few instructions, and a dead owner is recovered inside).
 * A blocking call without a timeout (decrement(wait=True), lock()) makes its
 * first wait slice here with the GIL released; if that slice ends with the
 * caller still queued (NP_EINTR), the Python method continues the same wait
 * (keeping its place, running signal handlers between slices), and if that
 * raises before its own clean-up, the wait is cancelled here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "netplex_core.h"

typedef int64_t (*np_op_h)(np_domain *, uint64_t);
typedef int64_t (*np_op_hd)(np_domain *, uint64_t, int64_t);

typedef int64_t (*np_op)(np_domain *);

typedef struct {
    PyObject_HEAD
    np_domain *d;
    np_op_hd sem_dec, mtx_lock;
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

/* One wait slice with the GIL released. */
static inline int64_t first_slice(Binder *self, np_op_hd op, uint64_t h)
{
    int64_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = op(self->d, h, NP_FOREVER);
    Py_END_ALLOW_THREADS
    return rc;
}

/* Still queued after a slice: the Python method continues the wait. */
static PyObject *resume(Binder *self, PyObject *fn, PyObject *const *args, size_t nargsf, PyObject *kw)
{
    PyObject *r = PyObject_Vectorcall(fn, args, nargsf, kw);
    if (r == NULL)
        self->wait_cancel(self->d);     /* idempotent: nothing queued is fine */
    return r;
}

/* sem_decrement(name, wait=False, timeout=None, *, cancel=None) */
static PyObject *b_sem_decrement(Binder *self, PyObject *const *args, size_t nargsf, PyObject *kw)
{
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    uint64_t h;
    if (kw == NULL && n >= 1 && n <= 3 && (n < 3 || args[2] == Py_None)
            && cached(self->sems, args[0], &h)) {
        if (n < 2 || args[1] == Py_False) {
            int64_t rc = self->sem_dec(self->d, h, NP_NOWAIT);
            if (rc >= 0)
                return PyLong_FromLongLong(rc);
            if (rc == NP_EAGAIN)
                return PyLong_FromLong(-1);
        } else if (args[1] == Py_True) {
            int64_t rc = first_slice(self, self->sem_dec, h);
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
        if (cached(self->sems, args[0], &h)) {
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
            && cached(self->mtxs, args[0], &h)) {
        int64_t rc = self->mtx_lock(self->d, h, NP_NOWAIT);
        if (rc == NP_EAGAIN)
            rc = first_slice(self, self->mtx_lock, h);
        if (rc == 0)
            Py_RETURN_TRUE;
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
        if (cached(self->mtxs, args[0], &h) && self->mtx_unlock(self->d, h) == 0)
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

/* Binder(domain, sem_dec, sem_inc, mtx_lock, mtx_unlock, wait_cancel, sems, mtxs,
 *        slow_dec, slow_inc, slow_lock, slow_unlock)
 * domain and the five functions are addresses (ints) from the cffi module. */
static int b_init(Binder *self, PyObject *args, PyObject *kwds)
{
    unsigned long long d, f1, f2, f3, f4, f5;
    PyObject *sems, *mtxs, *s1, *s2, *s3, *s4;
    if (kwds && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Binder takes no keyword arguments");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "KKKKKKO!O!OOOO:Binder", &d, &f1, &f2, &f3, &f4, &f5,
                          &PyDict_Type, &sems, &PyDict_Type, &mtxs, &s1, &s2, &s3, &s4))
        return -1;
    if (!d || !f1 || !f2 || !f3 || !f4 || !f5) {
        PyErr_SetString(PyExc_ValueError, "Binder: null domain or function address");
        return -1;
    }
    self->d = (np_domain *)(uintptr_t)d;
    self->sem_dec = (np_op_hd)(uintptr_t)f1;
    self->sem_inc = (np_op_h)(uintptr_t)f2;
    self->mtx_lock = (np_op_hd)(uintptr_t)f3;
    self->mtx_unlock = (np_op_h)(uintptr_t)f4;
    self->wait_cancel = (np_op)(uintptr_t)f5;
    Py_INCREF(sems); Py_XSETREF(self->sems, sems);
    Py_INCREF(mtxs); Py_XSETREF(self->mtxs, mtxs);
    Py_INCREF(s1); Py_XSETREF(self->slow_dec, s1);
    Py_INCREF(s2); Py_XSETREF(self->slow_inc, s2);
    Py_INCREF(s3); Py_XSETREF(self->slow_lock, s3);
    Py_INCREF(s4); Py_XSETREF(self->slow_unlock, s4);
    return 0;
}

static PyMethodDef b_methods[] = {
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

static struct PyModuleDef fast_module = {
    PyModuleDef_HEAD_INIT, "netplex_native._fast",
    "Fast paths of the native core's uncontended operations.", -1, NULL,
};

PyMODINIT_FUNC PyInit__fast(void)
{
    if (PyType_Ready(&BinderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fast_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&BinderType);
    if (PyModule_AddObject(m, "Binder", (PyObject *)&BinderType) < 0) {
        Py_DECREF(&BinderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
