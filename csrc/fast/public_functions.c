/*
 * public_functions.c -- the second layer of netplex_native._fast
 * (csrc/fast/fast.h): the public functions (semaphore.decrement & co.)
 * without a Python frame.  Two parts: the registry (this process's backend)
 * and Forward (a public function).
 *
 * The registry.  netplex_native._context.Context calls set_backend(attr,
 * backend) whenever its `sem' or `mutex' attribute is set, so that:
 *  R1 reg_be[k] always names what ctx.sem / ctx.mutex name.
 *  R2 A backend whose hot methods are a Binder's (a native backend in a
 *     container, or a Domain's: it says so with its `_fast_binder' instance
 *     attribute) has that Binder recorded beside it (reg_binder[k]): its
 *     `decrement' is the Binder's sem_decrement, its `increment' the
 *     Binder's sem_increment, its `lock' and `unlock' the Binder's
 *     mutex_lock and mutex_unlock.  Forward and the handles (handles.c) call
 *     the Binder directly then, which is what calling the backend's method
 *     does, without the attribute lookups.
 *  R3 Strong references: a recorded object is never freed and replaced at
 *     its address while recorded; the old ones are released last, so a
 *     finalizer sees the new state.  fork() copies the registry with the
 *     rest of the process, which is what it must be in the child.
 *
 * Forward(ctx, attr, method, names, defaults, npos): calling it with the
 * public signature calls getattr(ctx, attr).method(*all_params) with every
 * parameter in positional form (keywords mapped by name, defaults filled),
 * which is what semaphore.decrement & co. do in Python.
 *  F1 For `sem' and `mutex' the backend is the registry's (R1); any other
 *     attribute is read from ctx at each call.
 *  F2 semaphore.decrement and semaphore.increment of a backend with a Binder
 *     call the Binder's C method directly (R2): the same call, without
 *     looking `decrement' up -- only for the exact parameter lists and
 *     defaults of the Binder's methods (fwd_init), so the Binder receives
 *     what the backend's method would.
 *  F3 Argument errors are the TypeErrors a Python function of that
 *     signature raises, before anything is called.
 *  F4 The public name is the builtin function as_function() makes of it
 *     (CPython specializes calls of builtin functions, not of other
 *     callables); once per Forward.
 */
#include "fast.h"

PyObject *reg_be[K_N];
Binder *reg_binder[K_N];
static PyObject *s_fast_binder, *s_sem, *s_mutex;

/* The names the registry compares and reads (module init): 0, or -1. */
int registry_init(void)
{
    s_fast_binder = PyUnicode_InternFromString("_fast_binder");
    s_sem = PyUnicode_InternFromString("sem");
    s_mutex = PyUnicode_InternFromString("mutex");
    return s_fast_binder && s_sem && s_mutex ? 0 : -1;
}

/* be's Binder (a new reference), or NULL when it has none.  Its instance
 * attribute only: a backend's __getattr__ (the placeholder's raises) is
 * never called. */
Binder *binder_of_backend(PyObject *be)
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
PyObject *set_backend(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t n)
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

PyTypeObject ForwardType = {
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
