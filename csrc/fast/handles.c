/*
 * handles.c -- the third layer of netplex_native._fast (csrc/fast/fast.h):
 * calls through a handle.  SemaphoreBase and MutexBase, the C bases of
 * semaphore.Semaphore and mutex.Mutex (and of Domain's BoundSemaphore and
 * BoundMutex).
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
 *  fast.h).
 */
#include "fast.h"

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

PyTypeObject SemaphoreBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "netplex_native._fast.SemaphoreBase",
    .tp_basicsize = sizeof(Handle),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The state and hot methods of netplex_native.semaphore.Semaphore (see csrc/fast/handles.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)h_init,
    .tp_dealloc = (destructor)h_dealloc,
    .tp_traverse = (traverseproc)h_traverse,
    .tp_clear = (inquiry)h_clear,
    .tp_methods = sh_methods,
    .tp_members = h_members,
    .tp_getset = sh_getset,
};

PyTypeObject MutexBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "netplex_native._fast.MutexBase",
    .tp_basicsize = sizeof(Handle),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The state and hot methods of netplex_native.mutex.Mutex (see csrc/fast/handles.c).",
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
PyObject *accelerate(PyObject *Py_UNUSED(m), PyObject *cls)
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
