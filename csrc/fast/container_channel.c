/*
 * container_channel.c -- in the container process: the reads of its
 * channel to the controller (netplex_native/channel.py), made atomic with
 * respect to Python's signal handlers.  netplex_native/channel_frames.py
 * has the same two functions in Python (used without the accelerator) and
 * the decoder of the frames this file does not decode itself.
 *
 * Why: Python runs a signal handler on the main thread between two
 * bytecodes, and an exception it raises unwinds whatever the interrupted
 * code held only in locals.  A channel reader on the main thread that had
 * received frames (other threads' replies among them) and was interrupted
 * before dispatching them left those threads waiting forever.  Here no
 * bytecode runs between the steps that must not be separated:
 *
 *  C0. send: the bytes the socket takes are removed from the channel's
 *      write buffer (whole frames, appended in one step) and counted in the
 *      same step, so a frame is never half-sent then forgotten.
 *  C1. recv: the bytes a recv returns are appended to the channel's buffer
 *      (a bytearray only the reader touches) before the call returns.  A
 *      signal that interrupts the recv itself is handled as Python's own
 *      socket calls do (PEP 475): its handler runs, the recv is retried if
 *      the handler returned, and nothing was read if it raised.
 *  C2. dispatch: for every complete frame at the buffer's head, in order,
 *      its effect is applied and its bytes are removed from the buffer in
 *      one step with the GIL held:
 *        - a deferred reply: its acknowledgement frame is appended to the
 *          channel's write buffer;
 *        - a reply to an abandoned call: its give-back (the call's undo
 *          frame, if it was granted something) is appended to the write
 *          buffer;
 *        - a reply to a synchronous caller: results[rid] = (ok, result, blob);
 *        - a reply to an awaited call: on the loop's thread, the future is
 *          completed (or, its caller gone, the grant given back); on any
 *          other thread (future, undo, reply) is queued on `deliveries'
 *          for the loop;
 *        - anything else (a message): (obj, blob, size) onto the inbox, or
 *          dropped and counted if the inbox is full (never a ["ctl", ...]).
 *      A frame whose decoding needs Python (JSON, anything but a plain
 *      binary reply) is decoded by channel_frames.decode before any effect
 *      is applied: if that raises -- garbage (ProtocolError), or a signal
 *      handler's exception -- the frames already applied are removed, the
 *      failing one stays whole, and the exception propagates.
 *  So a frame is dispatched exactly once, or is still whole in the buffer.
 *  What the channel does afterwards in Python (waking sleepers, draining
 *  the queues) can be interrupted; each of those steps is picked up again
 *  by the next reader (channel.py says how).
 */
#include "fast.h"

#include <errno.h>
#include <sys/socket.h>

#define RECV_CHUNK 65536
#define MAX_FRAME (16 * 1024 * 1024)    /* wire.MAX_FRAME */
#define OP_REPLY 0x80                   /* wire.OP_REPLY */
#define REPLY_TOTAL 22                  /* wire._REPLY_LEN: length field of a binary reply */

/* chan_recv(fd, buf, wait) -> n: one recv appended to bytearray buf (C1).
 * n > 0 bytes appended; 0 end of stream (or any error but EAGAIN: the
 * channel is gone); -1 nothing there (wait false). */
PyObject *chan_recv(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3 || !PyByteArray_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "chan_recv(fd, bytearray, wait)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "chan_recv: not a file descriptor");
        return NULL;
    }
    int wait = PyObject_IsTrue(args[2]);
    if (wait < 0)
        return NULL;
    PyObject *buf = args[1];
    char *tmp = PyMem_RawMalloc(RECV_CHUNK);
    if (tmp == NULL)
        return PyErr_NoMemory();
    ssize_t r;
    int err;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        r = recv((int)fd, tmp, RECV_CHUNK, wait ? 0 : MSG_DONTWAIT);
        err = errno;
        Py_END_ALLOW_THREADS
        if (r >= 0 || err != EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {     /* the handler raised: nothing was read */
            PyMem_RawFree(tmp);
            return NULL;
        }
    }
    if (r > 0) {
        Py_ssize_t len = PyByteArray_GET_SIZE(buf);
        if (PyByteArray_Resize(buf, len + r) < 0) {
            PyMem_RawFree(tmp);
            return NULL;
        }
        memcpy(PyByteArray_AS_STRING(buf) + len, tmp, (size_t)r);
    }
    PyMem_RawFree(tmp);
    if (r < 0)
        r = (err == EAGAIN || err == EWOULDBLOCK) ? -1 : 0;
    return PyLong_FromSsize_t(r);
}

/* chan_send(fd, wbuf, count) -> n: one send of wbuf's head (C0); the bytes
 * sent are removed from wbuf and added to count[0].  n > 0 bytes sent; 0
 * no room (or wbuf empty); -1 the socket is broken. */
PyObject *chan_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3 || !PyByteArray_Check(args[1]) || !PyList_Check(args[2]) || PyList_GET_SIZE(args[2]) != 1) {
        PyErr_SetString(PyExc_TypeError, "chan_send(fd, bytearray, [count])");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "chan_send: not a file descriptor");
        return NULL;
    }
    PyObject *wbuf = args[1];
    Py_ssize_t len = PyByteArray_GET_SIZE(wbuf);
    if (len == 0)
        return PyLong_FromLong(0);
    ssize_t r;
    for (;;) {
        /* non-blocking: no GIL release needed, and wbuf cannot change under us */
        r = send((int)fd, PyByteArray_AS_STRING(wbuf), (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r >= 0 || errno != EINTR)
            break;
        if (PyErr_CheckSignals() < 0)      /* the handler raised: nothing was sent */
            return NULL;
    }
    if (r < 0)
        return PyLong_FromLong(errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1);
    /* first out of the buffer (a deletion at the head moves a start offset:
     * it does not allocate), then counted */
    if (PySequence_DelSlice(wbuf, 0, r) < 0)
        return NULL;
    PyObject *n = PyLong_FromSsize_t(r);
    PyObject *sum = n ? PyNumber_Add(PyList_GET_ITEM(args[2], 0), n) : NULL;
    Py_XDECREF(n);
    if (sum == NULL || PyList_SetItem(args[2], 0, sum) < 0)     /* steals sum */
        return NULL;
    return PyLong_FromSsize_t(r);
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t be64(const unsigned char *p)
{
    return (uint64_t)be32(p) << 32 | be32(p + 4);
}

/* The acknowledgement of a deferred reply, wire.encode_call(0, "ctl.ack",
 * [rid]), appended to the write buffer. */
static int append_ack(PyObject *wbuf, PyObject *rid)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(rid);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    char frame[64];
    int jlen = snprintf(frame + 8, sizeof frame - 8, "[0,\"ctl.ack\",[%llu]]", v);
    uint32_t total = 4 + (uint32_t)jlen, j = (uint32_t)jlen;
    for (int i = 0; i < 4; i++) {
        frame[i] = (char)(total >> (24 - 8 * i));
        frame[4 + i] = (char)(j >> (24 - 8 * i));
    }
    Py_ssize_t len = PyByteArray_GET_SIZE(wbuf);
    if (PyByteArray_Resize(wbuf, len + 8 + jlen) < 0)
        return -1;
    memcpy(PyByteArray_AS_STRING(wbuf) + len, frame, (size_t)(8 + jlen));
    return 0;
}

/* A give-back (an undo frame) appended to the write buffer, if the call
 * was granted something: True, or an int >= 0 (channel._granted). */
static int give_back(PyObject *wbuf, PyObject *undo, PyObject *ok, PyObject *result)
{
    if (undo == Py_None || ok != Py_True)
        return 0;
    if (result != Py_True) {
        if (!PyLong_CheckExact(result))
            return 0;
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(result, &overflow);
        if (v == -1 && PyErr_Occurred())
            return -1;
        if (overflow < 0 || (overflow == 0 && v < 0))
            return 0;
    }
    if (!PyBytes_Check(undo)) {
        PyErr_SetString(PyExc_TypeError, "chan_dispatch: an undo is a frame (bytes)");
        return -1;
    }
    Py_ssize_t len = PyByteArray_GET_SIZE(wbuf), n = PyBytes_GET_SIZE(undo);
    if (PyByteArray_Resize(wbuf, len + n) < 0)
        return -1;
    memcpy(PyByteArray_AS_STRING(wbuf) + len, PyBytes_AS_STRING(undo), (size_t)n);
    return 0;
}

static int append(PyObject *deque, PyObject *item)
{
    if (item == NULL)
        return -1;
    PyObject *r = PyObject_CallMethod(deque, "append", "(O)", item);   /* (O): a tuple item is one argument */
    Py_DECREF(item);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The state tuple's items (channel.Channel._dispatch_state). */
enum { S_DECODE, S_SYNC, S_RESULTS, S_ABANDONED, S_FUTURES, S_WBUF, S_DELIVERIES, S_INBOX,
       S_ICOUNT, S_LIMITS, S_LOOP_THREAD, S_N };

/* An awaited call's reply, on the loop's thread: the future completed, or
 * the grant given back if the caller is gone (channel._deliver). */
static int deliver_now(PyObject *const *st, PyObject *fut, PyObject *undo, PyObject *reply)
{
    PyObject *done = PyObject_CallMethod(fut, "done", NULL);
    if (done == NULL)
        return -1;
    int d = PyObject_IsTrue(done);
    Py_DECREF(done);
    if (d < 0)
        return -1;
    if (d)
        return give_back(st[S_WBUF], undo, PyTuple_GET_ITEM(reply, 0), PyTuple_GET_ITEM(reply, 1));
    PyObject *r = PyObject_CallMethod(fut, "set_result", "(O)", reply);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The effect of one reply (C2).  Returns 1 if a synchronous caller's reply
 * was delivered, 0 if not, -1 on error. */
static int apply_reply(PyObject *const *st, PyObject *rid, PyObject *ok, PyObject *result,
                       int deferred, PyObject *blob)
{
    if (deferred && append_ack(st[S_WBUF], rid) < 0)
        return -1;
    PyObject *undo = PyDict_GetItemWithError(st[S_ABANDONED], rid);    /* borrowed */
    if (undo != NULL) {
        Py_INCREF(undo);
        int rc = PyDict_DelItem(st[S_ABANDONED], rid);
        if (rc == 0)
            rc = give_back(st[S_WBUF], undo, ok, result);
        Py_DECREF(undo);
        return rc;
    }
    if (PyErr_Occurred())
        return -1;
    int sync = PySet_Contains(st[S_SYNC], rid);
    if (sync < 0)
        return -1;
    PyObject *reply = PyTuple_Pack(3, ok, result, blob);
    if (reply == NULL)
        return -1;
    if (sync) {
        int rc = PyDict_SetItem(st[S_RESULTS], rid, reply);
        Py_DECREF(reply);
        return rc < 0 ? -1 : 1;
    }
    PyObject *entry = PyDict_GetItemWithError(st[S_FUTURES], rid);   /* (future, undo) */
    if (entry == NULL) {
        Py_DECREF(reply);
        return PyErr_Occurred() ? -1 : 0;
    }
    Py_INCREF(entry);
    int rc = -1;
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2)
        PyErr_SetString(PyExc_TypeError, "chan_dispatch: futures holds (future, undo) pairs");
    else if (PyDict_DelItem(st[S_FUTURES], rid) == 0) {
        PyObject *fut = PyTuple_GET_ITEM(entry, 0), *fundo = PyTuple_GET_ITEM(entry, 1);
        PyObject *lt = st[S_LOOP_THREAD];
        int on_loop = lt != Py_None && PyLong_AsUnsignedLong(lt) == PyThread_get_thread_ident();
        if (PyErr_Occurred())
            rc = -1;
        else if (on_loop)
            rc = deliver_now(st, fut, fundo, reply);
        else
            rc = append(st[S_DELIVERIES], PyTuple_Pack(3, fut, fundo, reply));
    }
    Py_DECREF(entry);
    Py_DECREF(reply);
    return rc;
}

/* A message: into the inbox, or dropped and counted when the inbox is
 * full (lifecycle messages, ["ctl", ...], never are). */
static int enqueue(PyObject *const *st, PyObject *obj, PyObject *blob, Py_ssize_t size)
{
    PyObject *inbox = st[S_INBOX], *icount = st[S_ICOUNT], *limits = st[S_LIMITS];
    int ctl = 0;
    if (PyList_Check(obj) && PyList_GET_SIZE(obj) > 0 && PyUnicode_Check(PyList_GET_ITEM(obj, 0)))
        ctl = PyUnicode_CompareWithASCIIString(PyList_GET_ITEM(obj, 0), "ctl") == 0;
    Py_ssize_t held = PyLong_AsSsize_t(PyList_GET_ITEM(icount, 0));
    Py_ssize_t max_n = PyLong_AsSsize_t(PyTuple_GET_ITEM(limits, 0));
    Py_ssize_t max_b = PyLong_AsSsize_t(PyTuple_GET_ITEM(limits, 1));
    Py_ssize_t n = PyObject_Length(inbox);
    if (PyErr_Occurred() || n < 0)
        return -1;
    int slot = 0;
    Py_ssize_t add = size;
    if (!ctl && (n >= max_n || held + size > max_b)) {
        slot = 1;                   /* dropped */
        held = PyLong_AsSsize_t(PyList_GET_ITEM(icount, 1));
        add = 1;
    } else {
        PyObject *sz = PyLong_FromSsize_t(size);
        if (sz == NULL || append(inbox, PyTuple_Pack(3, obj, blob, sz)) < 0) {
            Py_XDECREF(sz);
            return -1;
        }
        Py_DECREF(sz);
    }
    PyObject *v = PyLong_FromSsize_t(held + add);
    if (v == NULL)
        return -1;
    return PyList_SetItem(icount, slot, v);      /* steals v */
}

/* A plain binary reply at p (the frame's length field is REPLY_TOTAL):
 * 1 and its fields if it is well formed, 0 if not (Python's decoder then
 * says what is wrong with it). */
static int plain_reply(const unsigned char *p, PyObject **rid, PyObject **result, int *deferred)
{
    if (be32(p + 4) != 0 || p[8] != OP_REPLY)
        return 0;
    unsigned flags = p[17], kind = flags >> 2;
    int64_t value = (int64_t)be64(p + 18);
    if (!(flags & 1) || kind > 3 || (kind != 1 && value))
        return 0;
    *rid = PyLong_FromUnsignedLongLong(be64(p + 9));
    if (*rid == NULL)
        return -1;
    switch (kind) {
    case 0: *result = Py_NewRef(Py_None); break;
    case 1: *result = PyLong_FromLongLong(value); break;
    case 2: *result = Py_NewRef(Py_False); break;
    default: *result = Py_NewRef(Py_True); break;
    }
    if (*result == NULL) {
        Py_CLEAR(*rid);
        return -1;
    }
    *deferred = (flags & 2) != 0;
    return 1;
}

/* chan_dispatch(buf, state) -> woke: C2 over the complete frames at buf's
 * head.  state: Channel._dispatch_state(): (decode, sync_ids, results,
 * abandoned, futures, wbuf, deliveries, inbox, [inbox bytes, dropped],
 * (max messages, max bytes), the loop's thread or None).  decode(buf, pos) -> (end, rid,
 * ok, result, deferred, blob) for a reply, (end, obj, blob) for anything
 * else, (end,) for a reply to no id of ours; it raises ProtocolError on
 * garbage.  woke: a synchronous caller's
 * reply was delivered. */
PyObject *chan_dispatch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2 || !PyByteArray_Check(args[0]) || !PyTuple_Check(args[1])
            || PyTuple_GET_SIZE(args[1]) != S_N || !PyByteArray_Check(PyTuple_GET_ITEM(args[1], S_WBUF))
            || !PyList_Check(PyTuple_GET_ITEM(args[1], S_ICOUNT)) || PyList_GET_SIZE(PyTuple_GET_ITEM(args[1], S_ICOUNT)) != 2
            || !PyTuple_Check(PyTuple_GET_ITEM(args[1], S_LIMITS)) || PyTuple_GET_SIZE(PyTuple_GET_ITEM(args[1], S_LIMITS)) != 2) {
        PyErr_SetString(PyExc_TypeError, "chan_dispatch(bytearray, Channel._dispatch_state())");
        return NULL;
    }
    PyObject *buf = args[0];
    PyObject *const *st = &PyTuple_GET_ITEM(args[1], 0);
    Py_ssize_t pos = 0;
    int woke = 0, failed = 0;
    for (;;) {
        Py_ssize_t n = PyByteArray_GET_SIZE(buf);     /* re-read: decode ran Python */
        const unsigned char *p = (const unsigned char *)PyByteArray_AS_STRING(buf) + pos;
        if (n - pos < 8)
            break;
        uint32_t total = be32(p);
        if (total <= MAX_FRAME && total >= 4 && (Py_ssize_t)total + 4 > n - pos)
            break;                                    /* incomplete: wait for the rest */
        PyObject *rid = NULL, *result = NULL;
        int deferred = 0, rc = 0;
        if (total == REPLY_TOTAL)
            rc = plain_reply(p, &rid, &result, &deferred);
        if (rc < 0) {
            failed = 1;
            break;
        }
        if (rc == 1) {
            rc = apply_reply(st, rid, Py_True, result, deferred, Py_None);
            Py_DECREF(rid);
            Py_DECREF(result);
            if (rc < 0) {
                failed = 1;
                break;
            }
            woke |= rc;
            pos += 4 + total;
            continue;
        }
        /* anything else, or a header that is wrong (decode raises ProtocolError) */
        PyObject *pypos = PyLong_FromSsize_t(pos);
        PyObject *d = pypos ? PyObject_CallFunctionObjArgs(st[S_DECODE], buf, pypos, NULL) : NULL;
        Py_XDECREF(pypos);
        if (d == NULL) {
            failed = 1;
            break;
        }
        Py_ssize_t size = PyTuple_Check(d) ? PyTuple_GET_SIZE(d) : 0;
        Py_ssize_t end = size ? PyLong_AsSsize_t(PyTuple_GET_ITEM(d, 0)) : -1;
        if ((size != 6 && size != 3 && size != 1) || end <= pos || end > PyByteArray_GET_SIZE(buf)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "chan_dispatch: decode returned a bad frame");
            Py_DECREF(d);
            failed = 1;
            break;
        }
        PyObject *const *f = &PyTuple_GET_ITEM(d, 0);
        if (size == 6) {
            int df = PyObject_IsTrue(f[4]);
            rc = df < 0 ? -1 : apply_reply(st, f[1], f[2], f[3], df, f[5]);
        } else if (size == 3) {
            rc = enqueue(st, f[1], f[2], end - pos);
        }                       /* size 1: a reply to no id of ours, dropped */
        Py_DECREF(d);
        if (rc < 0) {
            failed = 1;
            break;
        }
        woke |= rc;
        pos = end;
    }
    /* the frames applied leave the buffer now, even when the next one failed */
    if (pos) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        int rc = PySequence_DelSlice(buf, 0, pos);
        if (failed || rc == 0)
            PyErr_Restore(et, ev, tb);      /* the failure that stopped the loop, if any */
        else {
            Py_XDECREF(et); Py_XDECREF(ev); Py_XDECREF(tb);
        }
        if (rc < 0)
            return NULL;    /* (only on memory exhaustion, or a buffer someone exported) */
    }
    if (failed)
        return NULL;
    return PyBool_FromLong(woke);
}
