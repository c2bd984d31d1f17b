/*
 * module.c -- netplex_native._fast (csrc/fast/fast.h): the module's
 * functions and its initialisation, nothing else.  The types and functions
 * are the layers' (binder.c, public_functions.c, handles.c) and the
 * container channel's reads (container_channel.c) and the controller's
 * read of a hot call (controller_calls.c); the types are
 * readied and the registry's names made before the module exists, so a
 * failed initialisation leaves no module.
 */
#include "fast.h"

static PyMethodDef module_methods[] = {
    {"set_backend", (PyCFunction)(void (*)(void))set_backend, METH_FASTCALL,
     "set_backend(attr, backend): ctx.<attr> ('sem' or 'mutex') is now backend (Context calls it)."},
    {"accelerate", accelerate, METH_O,
     "accelerate(cls): the hot methods of handle class cls are served here, falling back to cls's."},
    {"set_block_hook", (PyCFunction)(void (*)(void))set_block_hook, METH_FASTCALL,
     "set_block_hook(fn, running_loop=None): fn(kind) is called before a wait that may block "
     "(None: none) when running_loop() is not None; fn returns True when its report concerns "
     "its caller's own line, which is then not reported again."},
    {"chan_send", (PyCFunction)(void (*)(void))chan_send, METH_FASTCALL,
     "chan_send(sock, wbuf, count) -> n: one send of bytearray wbuf's head, removed and counted (container_channel.c, C0)."},
    {"chan_recv", (PyCFunction)(void (*)(void))chan_recv, METH_FASTCALL,
     "chan_recv(sock, buf, wait) -> n: one recv appended to bytearray buf (container_channel.c, C1)."},
    {"chan_dispatch", (PyCFunction)(void (*)(void))chan_dispatch, METH_FASTCALL,
     "chan_dispatch(buf, state) -> woke: the complete frames at buf's head dispatched (container_channel.c, C2)."},
    {"chan_exchange", (PyCFunction)(void (*)(void))chan_exchange, METH_FASTCALL,
     "chan_exchange(channel, sock, buf, count, rid, state) -> r: a synchronous call's round trip, both roles held (container_channel.c, C4)."},
    {"reply_poll_state", (PyCFunction)reply_poll_state, METH_NOARGS,
     "reply_poll_state() -> (window_ns, calls that sleep at once): C5's state, for tests (container_channel.c)."},
    {"reply_poll", (PyCFunction)(void (*)(void))reply_poll, METH_FASTCALL,
     "reply_poll(max_ns=-1, window_ns=-1) -> the previous cap of the window C4 polls for a reply in; max_ns >= 0 sets it (0: never poll), window_ns >= 0 the current window (container_channel.c, C5)."},
    {"ctrl_hot_read", (PyCFunction)(void (*)(void))ctrl_hot_read, METH_FASTCALL,
     "ctrl_hot_read(conn, sock, hot, rec): one read of a container's channel, a hot call served whole (controller_calls.c)."},
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
    if (registry_init() < 0)
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
