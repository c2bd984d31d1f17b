/*
 * binder.c -- the first layer of netplex_native._fast (csrc/fast/fast.h):
 * a Domain's entry points by name.
 *
 * A Binder belongs to one Domain of this process: domain.py gives it the
 * core's function pointers, the Domain's per-process dicts from name to core
 * handle, and the Domain's Python methods (slow_*), and binds its four
 * methods (sem_decrement, sem_increment, mutex_lock, mutex_unlock) as the
 * Domain's entry points.  Invariants:
 *  B1 A method makes the core call itself only in the plain case:
 *     positional arguments within the Python method's parameters, a wait
 *     only without a timeout, a name already in the dict (lookup, fast.h),
 *     an open Domain (`d' not NULL).  It answers itself only what the
 *     Python method answers to the same core result: the value, -1 for
 *     NP_EAGAIN without wait, and B3's cases.  Every other case and result
 *     goes to the Domain's method with the arguments unchanged, after
 *     forgetting the last name found (slow): the method refreshes the dict
 *     and the next call reads it.
 *  B2 The non-blocking calls keep the GIL and use the uncounted np_fast_*
 *     entry points (fast.h says why that excludes a concurrent close).
 *  B3 A blocking call without a timeout (decrement(wait=True), lock()) makes
 *     its first wait slice here with the GIL released, through the counted
 *     entry points; if that slice ends with the caller still queued
 *     (NP_EINTR), the Python method continues the same wait (keeping its
 *     place, running signal handlers between slices), and if that raises
 *     before its own clean-up, the wait is cancelled here (resume).  A mutex
 *     destroyed during that slice answers False, as the Python method does
 *     (never re-created and locked behind the caller's back).
 *  B4 Just before such a wait may block (its non-blocking attempt failed),
 *     the block hook (set_block_hook: netplex_native/loopcheck.py) is called
 *     with the kind, so a synchronous wait on an event loop's thread is
 *     reported -- only when a loop runs on this thread, and once per call
 *     site (a small cache of the sites already reported, see
 *     about_to_block).
 *  B5 close() (Domain.close, before the core's close) clears `d': from then
 *     on every call goes to the Python methods, which say the Domain is
 *     closed.
 *  B6 stop_waiting() (Domain.stop_waits: the container's waits end): a
 *     blocking call whose non-blocking attempt failed goes to the Python
 *     method, which then does not wait at all.
 */
#include "fast.h"

/* The Domain's method (kind k): the whole job, after forgetting k's last name. */
static inline PyObject *slow(Binder *self, int k, PyObject *fn, PyObject *const *args,
                             size_t nargsf, PyObject *kw)
{
    forget(self, k);
    return PyObject_Vectorcall(fn, args, nargsf, kw);
}

static PyObject *block_hook;         /* set_block_hook(): called with the kind before a blocking wait */
static PyObject *loop_getter;        /* asyncio._get_running_loop (set_block_hook's second argument) */

/* Call sites (code object, instruction offset) the hook has already
 * reported: it warns once per call site (its line), so calling it again
 * from one of them does nothing
 * (about a microsecond of Python on every blocking wait on a loop's thread,
 * which is most of a hand-off on one CPU).  The hook says when its call site
 * is our caller's own frame (True): only then is the site cached.  Strong
 * references: a cached code object is never freed and replaced at its
 * address. */
#define SITES 64
static struct { PyObject *code; int lasti; } sites[SITES];

/* The offset, not the line: the frame has it at hand, where its line is a
 * walk of the code's line table on every call. */
static inline unsigned site_slot(PyObject *code, int lasti)
{
    uintptr_t h = ((uintptr_t)code >> 4) ^ ((uintptr_t)lasti * 2654435761u);
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
    int lasti = f ? PyFrame_GetLasti(f) : -1;
    unsigned i = code ? site_slot(code, lasti) : 0;
    if (code && sites[i].code == code && sites[i].lasti == lasti) {
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
        sites[i].lasti = lasti;
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
    /* Python's main thread keeps its slices: its signal handlers run only
     * there (NP_SLICED, netplex_core.h); another thread may sleep untimed. */
    int64_t dl = _PyOS_IsMainThread() ? NP_SLICED : NP_FOREVER;
    Py_BEGIN_ALLOW_THREADS
    rc = op(d, h, dl);
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
PyObject *b_sem_decrement(Binder *self, PyObject *const *args, size_t nargsf, PyObject *kw)
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
            if (self->stopping)                 /* B6 */
                return slow(self, K_SEM, self->slow_dec, args, nargsf, kw);
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
PyObject *b_sem_increment(Binder *self, PyObject *const *args, size_t nargsf, PyObject *kw)
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
PyObject *b_mutex_lock(Binder *self, PyObject *const *args, size_t nargsf, PyObject *kw)
{
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    uint64_t h;
    if (kw == NULL && (n == 1 || (n == 2 && args[1] == Py_None))
            && self->d && lookup(self, K_MUTEX, args[0], &h)) {
        int64_t rc = self->mtx_lock(self->d, h, NP_NOWAIT);
        if (rc == NP_EAGAIN && self->stopping)  /* B6 */
            return slow(self, K_MUTEX, self->slow_lock, args, nargsf, kw);
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

/* stop_waiting(): B6. */
static PyObject *b_stop_waiting(Binder *self, PyObject *Py_UNUSED(ignored))
{
    self->stopping = 1;
    Py_RETURN_NONE;
}

static PyMethodDef b_methods[] = {
    {"close", (PyCFunction)b_close, METH_NOARGS, NULL},
    {"stop_waiting", (PyCFunction)b_stop_waiting, METH_NOARGS, NULL},
    {"sem_decrement", (PyCFunction)(void (*)(void))b_sem_decrement, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"sem_increment", (PyCFunction)(void (*)(void))b_sem_increment, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"mutex_lock", (PyCFunction)(void (*)(void))b_mutex_lock, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"mutex_unlock", (PyCFunction)(void (*)(void))b_mutex_unlock, METH_FASTCALL | METH_KEYWORDS, NULL},
    {NULL, NULL, 0, NULL}
};

PyTypeObject BinderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "netplex_native._fast.Binder",
    .tp_basicsize = sizeof(Binder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Uncontended semaphore/mutex operations of one Domain (see csrc/fast/binder.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)b_init,
    .tp_dealloc = (destructor)b_dealloc,
    .tp_traverse = (traverseproc)b_traverse,
    .tp_clear = (inquiry)b_clear,
    .tp_methods = b_methods,
};

PyObject *set_block_hook(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t n)
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
