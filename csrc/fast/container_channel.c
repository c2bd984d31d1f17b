/*
 * container_channel.c -- in the container process: the reads and writes
 * of its channel to the controller (netplex_native/channel.py), made
 * atomic with respect to Python's signal handlers, and (C4) the usual
 * call's round trip in one step.  netplex_native/channel_frames.py has
 * C0-C2 in Python (used without the accelerator, which also goes without
 * C4) and the decoder of the frames this file does not decode itself.
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
 *      signal that interrupts the recv itself runs its handler: nothing was
 *      read, and if the handler returned, the caller is told "nothing yet"
 *      (-1) so that it looks at its reply again before it sleeps again.
 *  C2. dispatch: for every complete frame at the buffer's head, in order,
 *      its effect is applied and its bytes are removed from the buffer in
 *      one step with the GIL held:
 *        - a deferred reply: its acknowledgement frame is appended to the
 *          channel's write buffer;
 *        - a reply to an abandoned call: its give-back (the call's undo
 *          frame, if it was granted something) is appended to the write
 *          buffer;
 *        - a reply to a synchronous caller: results[rid] = (ok, result, blob);
 *        - a reply to an awaited call: [future, undo, reply] is queued on
 *          `deliveries' for the loop (asyncio's own code, which completing
 *          a future runs, is not run here);
 *        - anything else (a message): (obj, blob, size) onto the inbox, or
 *          dropped and counted if the inbox is full (never a ["ctl", ...]).
 *      A frame whose decoding needs Python (JSON, anything but a plain
 *      binary reply) is decoded by channel_frames.decode before any effect
 *      is applied: if that raises -- garbage (ProtocolError), or a signal
 *      handler's exception -- the frames already applied are removed, the
 *      failing one stays whole, and the exception propagates.
 *  C4. exchange: a synchronous call's whole round trip (C0 as the writer,
 *      the writer role given back, then C2 and C1 as the reader until its
 *      reply is in), for the usual call made while nobody else reads or
 *      writes; anything else hands the call back to the general way
 *      (chan_exchange says when).
 *  C5. poll: before C4 sleeps in recv it polls for the reply for an
 *      adaptive window (at most 50 us), yielding the CPU between looks;
 *      when the window is over, the handlers of signals that came during
 *      it run, and the channel is looked at again, before the recv that
 *      sleeps.  A signal is never held back by the poll for longer than
 *      the window.  A yield during which something else ran on the CPU
 *      ends the poll, and the calls after it sleep at once for a while.
 *  So a frame is dispatched exactly once, or is still whole in the buffer.
 *  What the channel does afterwards in Python (waking sleepers, draining
 *  the queues) can be interrupted; each of those steps is picked up again
 *  by the next reader (channel.py says how).
 */
#include "fast.h"
#include "yield_backoff.h"

#include <errno.h>
#include <sched.h>
#include <sys/socket.h>
#include <time.h>

#define RECV_CHUNK 65536
#define MAX_FRAME (16 * 1024 * 1024)    /* wire.MAX_FRAME */
#define REPLY_TOTAL (WIRE_REPLY_SIZE - 4)   /* wire._REPLY_LEN: length field of a binary reply */

/* The socket's file descriptor, or -1 once it is closed (no exception).
 * socket.fileno() is C: no bytecode runs. */
static int fd_of(PyObject *sock)
{
    int fd = PyObject_AsFileDescriptor(sock);
    if (fd < 0 && PyErr_Occurred())
        PyErr_Clear();
    return fd;
}

/* chan_recv(sock, buf, wait) -> n: one recv appended to bytearray buf (C1).
 * n > 0 bytes appended; 0 end of stream (or any error but EAGAIN: the
 * channel is gone); -1 nothing there (wait false). */
PyObject *chan_recv(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3 || !PyByteArray_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "chan_recv(sock, bytearray, wait)");
        return NULL;
    }
    int fd = fd_of(args[0]);
    if (fd < 0)
        return PyLong_FromLong(0);              /* closed: as the end of the stream */
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
        r = recv(fd, tmp, RECV_CHUNK, wait ? 0 : MSG_DONTWAIT);
        err = errno;
        Py_END_ALLOW_THREADS
        if (r >= 0 || err != EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {     /* the handler raised: nothing was read */
            PyMem_RawFree(tmp);
            return NULL;
        }
        /* A handler ran: it may have made calls of its own (reading our
         * reply for us, C3 of channel.py): the caller looks again before
         * it sleeps here again. */
        PyMem_RawFree(tmp);
        return PyLong_FromLong(-1);
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

/* The bytes a send took leave wbuf, then are added to count[0] (C0): a
 * deletion at the head moves a start offset, it does not allocate. */
static int sent_out(PyObject *wbuf, PyObject *count, ssize_t r)
{
    if (PySequence_DelSlice(wbuf, 0, r) < 0)
        return -1;
    PyObject *n = PyLong_FromSsize_t(r);
    PyObject *sum = n ? PyNumber_Add(PyList_GET_ITEM(count, 0), n) : NULL;
    Py_XDECREF(n);
    if (sum == NULL || PyList_SetItem(count, 0, sum) < 0)       /* steals sum */
        return -1;
    return 0;
}

/* chan_send(sock, wbuf, count) -> n: one send of wbuf's head (C0); the bytes
 * sent are removed from wbuf and added to count[0].  n > 0 bytes sent; 0
 * no room (or wbuf empty); -1 the socket is broken. */
PyObject *chan_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3 || !PyByteArray_Check(args[1]) || !PyList_Check(args[2]) || PyList_GET_SIZE(args[2]) != 1) {
        PyErr_SetString(PyExc_TypeError, "chan_send(sock, bytearray, [count])");
        return NULL;
    }
    int fd = fd_of(args[0]);
    if (fd < 0)
        return PyLong_FromLong(-1);             /* closed */
    PyObject *wbuf = args[1];
    ssize_t r;
    for (;;) {
        /* non-blocking: no GIL release needed, and wbuf cannot change under
         * us (but a handler that ran at EINTR may have written some: the
         * length is read again) */
        Py_ssize_t len = PyByteArray_GET_SIZE(wbuf);
        if (len == 0)
            return PyLong_FromLong(0);
        r = send(fd, PyByteArray_AS_STRING(wbuf), (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r >= 0 || errno != EINTR)
            break;
        if (PyErr_CheckSignals() < 0)      /* the handler raised: nothing was sent */
            return NULL;
    }
    if (r < 0)
        return PyLong_FromLong(errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1);
    if (sent_out(wbuf, args[2], r) < 0)
        return NULL;
    return PyLong_FromSsize_t(r);
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

static PyObject *str_append;    /* "append", interned */

/* deque.append(item), stealing item; no argument tuple is made (so no
 * collection can run here: see apply_reply). */
static int append(PyObject *deque, PyObject *item)
{
    if (item == NULL)
        return -1;
    if (str_append == NULL && (str_append = PyUnicode_InternFromString("append")) == NULL) {
        Py_DECREF(item);
        return -1;
    }
    PyObject *r = PyObject_CallMethodOneArg(deque, str_append, item);
    Py_DECREF(item);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The state tuple's items (channel.Channel._dispatch_state). */
enum { S_DECODE, S_SYNC, S_RESULTS, S_ABANDONED, S_FUTURES, S_WBUF, S_DELIVERIES, S_INBOX,
       S_ICOUNT, S_LIMITS, S_N };

/* The effect of one reply (C2).  Returns 1 if a synchronous caller's reply
 * was delivered, 0 if not, -1 on error.
 *
 * Everything that can fail, and every allocation of an object the cyclic
 * collector tracks (a collection can run finalizers, i.e. Python code,
 * which lets other threads run and change the dicts), happens before the
 * first effect; the effects themselves are dict and set operations and
 * appends to the write buffer (memory only). */
static int apply_reply(PyObject *const *st, PyObject *rid, PyObject *ok, PyObject *result,
                       int deferred, PyObject *blob)
{
    PyObject *reply = PyTuple_Pack(3, ok, result, blob);
    PyObject *item = PyList_New(3);                 /* [future, undo, reply], if awaited */
    if (reply == NULL || item == NULL)
        goto fail;
    /* from here: no allocation of tracked objects, no Python code */
    PyObject *undo = PyDict_GetItemWithError(st[S_ABANDONED], rid);    /* borrowed */
    if (undo == NULL && PyErr_Occurred())
        goto fail;
    if (undo != NULL && undo != Py_None && !PyBytes_Check(undo)) {
        PyErr_SetString(PyExc_TypeError, "chan_dispatch: an undo is a frame (bytes)");
        goto fail;
    }
    int sync = undo == NULL ? PySet_Contains(st[S_SYNC], rid) : 0;
    if (sync < 0)
        goto fail;
    PyObject *entry = NULL;
    if (undo == NULL && !sync) {
        entry = PyDict_GetItemWithError(st[S_FUTURES], rid);   /* (future, undo) */
        if (entry == NULL && PyErr_Occurred())
            goto fail;
        if (entry != NULL && (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2
                              || (PyTuple_GET_ITEM(entry, 1) != Py_None && !PyBytes_Check(PyTuple_GET_ITEM(entry, 1))))) {
            PyErr_SetString(PyExc_TypeError, "chan_dispatch: futures holds (future, undo frame) pairs");
            goto fail;
        }
    }
    /* the effects */
    int rc = 0;
    if (deferred && append_ack(st[S_WBUF], rid) < 0)
        goto fail;
    if (undo != NULL) {
        Py_INCREF(undo);
        if (PyDict_DelItem(st[S_ABANDONED], rid) == 0)
            rc = give_back(st[S_WBUF], undo, ok, result);
        else
            rc = -1;
        Py_DECREF(undo);
    } else if (sync) {
        rc = PyDict_SetItem(st[S_RESULTS], rid, reply) < 0 ? -1 : 1;
    } else if (entry != NULL) {
        PyList_SET_ITEM(item, 0, Py_NewRef(PyTuple_GET_ITEM(entry, 0)));
        PyList_SET_ITEM(item, 1, Py_NewRef(PyTuple_GET_ITEM(entry, 1)));
        PyList_SET_ITEM(item, 2, Py_NewRef(reply));
        Py_INCREF(item);
        rc = PyDict_DelItem(st[S_FUTURES], rid);   /* entry is borrowed: not used after this */
        if (rc == 0)
            rc = append(st[S_DELIVERIES], item);    /* steals the extra reference */
        else
            Py_DECREF(item);
    }
    Py_DECREF(reply);
    Py_DECREF(item);
    return rc;
fail:
    Py_XDECREF(reply);
    Py_XDECREF(item);
    return -1;
}

/* A message: into the inbox, or dropped and counted when the inbox is
 * full (lifecycle messages, ["ctl", ...], never are). */
static int enqueue(PyObject *const *st, PyObject *obj, PyObject *blob, Py_ssize_t size)
{
    PyObject *inbox = st[S_INBOX], *icount = st[S_ICOUNT], *limits = st[S_LIMITS];
    PyObject *sz = PyLong_FromSsize_t(size);
    PyObject *msg = sz ? PyTuple_Pack(3, obj, blob, sz) : NULL;   /* before the counts are read */
    Py_XDECREF(sz);
    if (msg == NULL)
        return -1;
    int ctl = 0;
    if (PyList_Check(obj) && PyList_GET_SIZE(obj) > 0 && PyUnicode_Check(PyList_GET_ITEM(obj, 0)))
        ctl = PyUnicode_CompareWithASCIIString(PyList_GET_ITEM(obj, 0), "ctl") == 0;
    Py_ssize_t held = PyLong_AsSsize_t(PyList_GET_ITEM(icount, 0));
    Py_ssize_t max_n = PyLong_AsSsize_t(PyTuple_GET_ITEM(limits, 0));
    Py_ssize_t max_b = PyLong_AsSsize_t(PyTuple_GET_ITEM(limits, 1));
    Py_ssize_t n = PyObject_Length(inbox);
    if (PyErr_Occurred() || n < 0) {
        Py_DECREF(msg);
        return -1;
    }
    int slot = 0;
    Py_ssize_t now = held + size;
    if (!ctl && (n >= max_n || held + size > max_b)) {
        Py_DECREF(msg);
        slot = 1;                   /* dropped: counted */
        now = PyLong_AsSsize_t(PyList_GET_ITEM(icount, 1)) + 1;
    } else if (append(inbox, msg) < 0) {
        return -1;
    }
    PyObject *v = PyLong_FromSsize_t(now);
    if (v == NULL)
        return -1;
    return PyList_SetItem(icount, slot, v);      /* steals v */
}

/* A plain binary reply at p (the frame's length field is REPLY_TOTAL):
 * 1 and its fields if it is well formed, 0 if not (Python's decoder then
 * says what is wrong with it). */
static int plain_reply(const unsigned char *p, PyObject **rid, PyObject **result, int *deferred)
{
    if (be32(p + 4) != 0 || p[8] != WIRE_OP_REPLY)
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

/* Dispatches that removed frames, in this process: see chan_dispatch. */
static uint64_t dispatch_gen;

/* The first n bytes of buf (a frame just applied) removed: a deletion at
 * the head moves a start offset, it does not allocate. */
static int consume(PyObject *buf, Py_ssize_t n)
{
    dispatch_gen++;
    return PySequence_DelSlice(buf, 0, n);
}

/* The dispatch state tuple is well formed (see chan_dispatch). */
static int state_ok(PyObject *state)
{
    return PyTuple_Check(state) && PyTuple_GET_SIZE(state) == S_N
        && PyByteArray_Check(PyTuple_GET_ITEM(state, S_WBUF))
        && PyList_Check(PyTuple_GET_ITEM(state, S_ICOUNT)) && PyList_GET_SIZE(PyTuple_GET_ITEM(state, S_ICOUNT)) == 2
        && PyTuple_Check(PyTuple_GET_ITEM(state, S_LIMITS)) && PyTuple_GET_SIZE(PyTuple_GET_ITEM(state, S_LIMITS)) == 2;
}

/* chan_dispatch(buf, state) -> woke: C2 over the complete frames at buf's
 * head.  state: Channel._dispatch_state(): (decode, sync_ids, results,
 * abandoned, futures, wbuf, deliveries, inbox, [inbox bytes, dropped],
 * (max messages, max bytes)).  decode(buf, pos) -> (end, rid,
 * ok, result, deferred, blob) for a reply, (end, obj, blob) for anything
 * else, (end,) for a reply to no id of ours; it raises ProtocolError on
 * garbage.  woke: a synchronous caller's
 * reply was delivered. */
static int dispatch_all(PyObject *buf, PyObject *const *st);

PyObject *chan_dispatch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2 || !PyByteArray_Check(args[0]) || !state_ok(args[1])) {
        PyErr_SetString(PyExc_TypeError, "chan_dispatch(bytearray, Channel._dispatch_state())");
        return NULL;
    }
    int woke = dispatch_all(args[0], &PyTuple_GET_ITEM(args[1], 0));
    return woke < 0 ? NULL : PyBool_FromLong(woke);
}

/* C2 over buf: 1 if a synchronous caller's reply was delivered, 0 if not,
 * -1 with an exception set. */
static int dispatch_all(PyObject *buf, PyObject *const *st)
{
    int woke = 0;
    /* Each frame leaves the buffer together with its effect, so the buffer's
     * head is always the next frame to apply.  decode runs Python, and a
     * signal handler that runs there may make calls of its own and dispatch
     * this very buffer (C3 of channel.py): after decode, if any dispatch
     * removed frames meanwhile (dispatch_gen moved), what decode returned
     * is dropped and the head is looked at again. */
    for (;;) {
        Py_ssize_t n = PyByteArray_GET_SIZE(buf);
        const unsigned char *p = (const unsigned char *)PyByteArray_AS_STRING(buf);
        if (n < 8)
            break;
        uint32_t total = be32(p);
        if (total <= MAX_FRAME && total >= 4 && (Py_ssize_t)total + 4 > n)
            break;                                    /* incomplete: wait for the rest */
        PyObject *rid = NULL, *result = NULL;
        int deferred = 0, rc = 0;
        if (total == REPLY_TOTAL)
            rc = plain_reply(p, &rid, &result, &deferred);
        if (rc < 0)
            return -1;
        if (rc == 1) {
            rc = apply_reply(st, rid, Py_True, result, deferred, Py_None);
            Py_DECREF(rid);
            Py_DECREF(result);
            if (rc < 0 || consume(buf, 4 + (Py_ssize_t)total) < 0)
                return -1;
            woke |= rc;
            continue;
        }
        /* anything else, or a header that is wrong (decode raises ProtocolError) */
        /* decoded from a copy of the frame: the buffer may change while
         * decode runs (the header alone when it is wrong: decode says why) */
        uint64_t gen = dispatch_gen;
        Py_ssize_t flen = (total <= MAX_FRAME && total >= 4) ? 4 + (Py_ssize_t)total : 8;
        PyObject *frame = PyBytes_FromStringAndSize((const char *)p, flen);
        PyObject *zero = frame ? PyLong_FromLong(0) : NULL;
        PyObject *d = zero ? PyObject_CallFunctionObjArgs(st[S_DECODE], frame, zero, NULL) : NULL;
        Py_XDECREF(zero);
        Py_XDECREF(frame);
        if (d == NULL)
            return -1;                              /* the frame stays whole */
        if (gen != dispatch_gen) {
            Py_DECREF(d);                             /* a nested dispatch took it */
            continue;
        }
        Py_ssize_t size = PyTuple_Check(d) ? PyTuple_GET_SIZE(d) : 0;
        Py_ssize_t end = size ? PyLong_AsSsize_t(PyTuple_GET_ITEM(d, 0)) : -1;
        if ((size != 6 && size != 3 && size != 1) || end != flen || end > PyByteArray_GET_SIZE(buf)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "chan_dispatch: decode returned a bad frame");
            Py_DECREF(d);
            return -1;
        }
        PyObject *const *f = &PyTuple_GET_ITEM(d, 0);
        if (size == 6) {
            int df = PyObject_IsTrue(f[4]);           /* a bool (decode made it one): no Python */
            rc = df < 0 ? -1 : apply_reply(st, f[1], f[2], f[3], df, f[5]);
        } else if (size == 3) {
            rc = enqueue(st, f[1], f[2], end);
        }                       /* size 1: a reply to no id of ours, dropped */
        Py_DECREF(d);
        if (rc < 0 || consume(buf, end) < 0)
            return -1;
        woke |= rc;
    }
    return woke;
}

/* C5. Before sleeping in recv for its reply, C4 polls the socket for a
 * while, yielding the CPU between looks (the GIL released): a reply that
 * comes within the window is read without the sleep and wake-up, whose
 * cost on a virtual machine (an idle vCPU halted, woken by an
 * inter-processor interrupt) is most of a round trip across CPUs; on one
 * CPU each yield runs the controller, as the sleep would have.  The window
 * adapts as a guest's halt-polling does (Linux haltpoll): a reply that came
 * after the window, but within POLL_GROW_NS of the send, doubles it (up to
 * POLL_MAX_NS); one later than that halves it; so calls that wait (a
 * decrement that blocks) soon stop polling, and a poll costs at most the
 * window per call.  The poll pays only on a CPU nobody else wants: a
 * yield that kept the caller away for POLL_SHARED_NS ran something else
 * there -- the controller itself (then the poll saves nothing: on one CPU
 * the sleep costs the same), or another process's work, which a yield puts
 * the caller behind for its time slice where a sleeper woken by the reply
 * would have preempted it.  The poll then ends (after one more look), and
 * the next 8 took/POLL_WORTH_NS calls sleep at once (yield_backoff.h,
 * yb_penalize): a few calls after the controller ran, a thousand after a
 * hog's 3 ms.  A lone yield took that long 1 time in 3,000 here. */
#define POLL_MAX_NS   50000LL
#define POLL_GROW_NS  200000LL
#define POLL_START_NS 10000LL
#define POLL_WORTH_NS 20000LL   /* what a reply read without sleeping saves, across CPUs */
#define POLL_SHARED_NS 10000LL  /* a yield this long ran something else here */
/* touched only by the thread in C4's reader part (it holds the reader role,
 * so one thread at a time; the GIL orders one such thread after another) */
static int64_t poll_window = POLL_START_NS;
static int64_t poll_max = POLL_MAX_NS;          /* reply_poll(): 0 = never poll */
static yb_state polling;                        /* when the poll stops (yield_backoff.h) */

static inline int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* C1 for C4, the GIL released: one recv into tmp; with `until', polled
 * (C5) and -1 with EAGAIN once `until' is past, without sleeping: a signal
 * that came meanwhile interrupted no system call, so the caller runs its
 * handler before it sleeps. */
static ssize_t recv_polled(int fd, char *tmp, int64_t until, int *err, int *slow)
{
    ssize_t r;
    if (!until) {
        r = recv(fd, tmp, RECV_CHUNK, 0);
        *err = errno;
        return r;
    }
    int64_t t;
    for (;;) {
        r = recv(fd, tmp, RECV_CHUNK, MSG_DONTWAIT);
        if (r >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
            *err = errno;
            return r;
        }
        if (*slow || (t = mono_ns()) >= until) {
            *err = EAGAIN;
            return -1;
        }
        sched_yield();
        int64_t took = mono_ns() - t;
        if (took >= POLL_SHARED_NS) {
            /* something else ran on this CPU: one more look, then sleep */
            yb_penalize(&polling, took, POLL_WORTH_NS);
            *slow = 1;
        }
    }
}

/* C5: a reply came `took' ns after the call was sent; `slept': it was not
 * in time for the window. */
static void adapt_window(int64_t took, int slept)
{
    if (!slept)
        return;
    if (took <= POLL_GROW_NS) {
        int64_t w = poll_window ? 2 * poll_window : POLL_START_NS;
        poll_window = w < poll_max ? w : poll_max;
    } else {
        poll_window /= 2;
        if (poll_window < POLL_START_NS / 4)
            poll_window = 0;
    }
}

/* reply_poll(max_ns=-1, window_ns=-1) -> the previous cap of C5's window.
 * max_ns >= 0 sets the cap (0: C4 sleeps in recv at once, as before C5);
 * window_ns >= 0 sets the current window (clamped to the cap), which then
 * adapts as usual: tests use it to poll for a known time. */
PyObject *reply_poll(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    long long v[2] = {-1, -1};
    if (nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "reply_poll(max_ns=-1, window_ns=-1)");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        if ((v[i] = PyLong_AsLongLong(args[i])) == -1 && PyErr_Occurred())
            return NULL;
        if (v[i] < -1 || v[i] > 1000000000LL) {
            PyErr_SetString(PyExc_ValueError, "reply_poll: each value is -1 (unchanged) or 0..1e9 ns");
            return NULL;
        }
    }
    int64_t old = poll_max;
    if (v[0] >= 0)
        poll_max = v[0];
    if (v[1] >= 0)
        poll_window = v[1];
    if (poll_window > poll_max)
        poll_window = poll_max;
    return PyLong_FromLongLong(old);
}

/* reply_poll_state() -> (window_ns, calls that sleep at once): C5's state,
 * for tests. */
PyObject *reply_poll_state(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    (void)self;
    return Py_BuildValue("(LI)", (long long)poll_window, (unsigned)polling.skip);
}

/* C4. chan_exchange(ch, sock, buf, count, rid, state) -> r: a synchronous
 * call's round trip, for a caller that took both roles of Channel ch
 * (channel.py's Channel._call, fast path) and appended its frame to the
 * write buffer.  As the writer: C0 until the write buffer is empty; then
 * the writer role is given back (ch._writer = None, one store: a thread
 * that waits to write is never kept waiting by a reader asleep in recv);
 * then as the reader: C2 on what is buffered and C1 (blocking, the GIL
 * released) until the reply to rid is in results.  Every step is the one
 * C0-C2 describe, so the buffers are as consistent at each point a handler
 * can run (a recv or send it interrupts) as they are between those calls.
 * r:
 *   1  the reply is in results and nothing is left for Python to do (fewer
 *      than 8 bytes buffered, nothing to write, no delivery, no message);
 *   2  the reply is in results; the caller does what a reader does after
 *      reading (channel.py's _after_reading);
 *   0  the caller goes on the general way (after _after_reading): no room
 *      to write, a thread waiting (for a role, or woken by a reply this
 *      dispatched), something to write before sleeping in recv (an
 *      acknowledgement, another thread's frame), an awaited reply or a
 *      message to hand to the loop, the channel closed (by a handler that
 *      ran in a decode), or the socket broken or at its end (the general
 *      way finds out again and says so);
 *  -1  a signal handler ran in a recv or send it interrupted (and may have
 *      made calls of its own, C3): the caller looks again.
 * NULL: the handler raised, or the dispatch did (ProtocolError: garbage).
 * It sleeps nowhere but in recv, and runs no Python but a signal handler
 * (at EINTR) and channel_frames.decode (C2, frames other than a plain
 * binary reply). */
static PyObject *strs[3];      /* _writer, _waiters, closed */
#define str_writer strs[0]
#define str_waiters strs[1]
#define str_closed strs[2]

/* 0 while ch is open and its socket still has fd; 1 if not; -1 on error */
static int still_open(PyObject *ch, PyObject *sock, int fd)
{
    PyObject *c = PyObject_GetAttr(ch, str_closed);
    if (c == NULL)
        return -1;
    int closed = PyObject_IsTrue(c);
    Py_DECREF(c);
    if (closed != 0)
        return closed;
    return fd_of(sock) != fd;
}

static int nobody_waits(PyObject *ch)
{
    PyObject *w = PyObject_GetAttr(ch, str_waiters);
    if (w == NULL)
        return -1;
    Py_ssize_t n = PyObject_Length(w);
    Py_DECREF(w);
    return n < 0 ? -1 : n == 0;
}

PyObject *chan_exchange(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 6 || !PyByteArray_Check(args[2]) || !PyList_Check(args[3]) || PyList_GET_SIZE(args[3]) != 1
            || !PyLong_CheckExact(args[4]) || !state_ok(args[5])) {
        PyErr_SetString(PyExc_TypeError, "chan_exchange(channel, sock, bytearray, [count], rid, Channel._dispatch_state())");
        return NULL;
    }
    if (intern_names(strs, (const char *const[]){"_writer", "_waiters", "closed"}, 3) < 0)
        return NULL;
    PyObject *ch = args[0], *buf = args[2], *count = args[3], *rid = args[4];
    int fd = fd_of(args[1]);
    if (fd < 0)
        return PyLong_FromLong(0);
    PyObject *const *st = &PyTuple_GET_ITEM(args[5], 0);
    PyObject *wbuf = st[S_WBUF], *results = st[S_RESULTS];
    /* the writer: C0 until everything queued is out */
    Py_ssize_t wlen;
    while ((wlen = PyByteArray_GET_SIZE(wbuf)) > 0) {
        ssize_t r = send(fd, PyByteArray_AS_STRING(wbuf), (size_t)wlen, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r < 0) {
            if (errno != EINTR)
                return PyLong_FromLong(0);              /* no room, or broken */
            if (PyErr_CheckSignals() < 0)
                return NULL;
            return PyLong_FromLong(-1);
        }
        if (sent_out(wbuf, count, r) < 0)
            return NULL;
    }
    if (PyObject_SetAttr(ch, str_writer, Py_None) < 0)
        return NULL;
    int idle = nobody_waits(ch);
    if (idle <= 0)
        return idle < 0 ? NULL : PyLong_FromLong(0);   /* they are woken by _after_reading */
    /* the reader */
    int64_t sent_at = mono_ns(), poll_end = sent_at + poll_window;
    int64_t until = poll_window ? poll_end : 0;
    if (until && !yb_may_yield(&polling))
        until = 0;                      /* C5: a CPU shared, lately */
    int first = 1, slow = 0;
    for (;;) {
        int got = PyDict_Contains(results, rid);
        if (got < 0)
            return NULL;
        Py_ssize_t pending = PyObject_Length(st[S_DELIVERIES]), msgs = PyObject_Length(st[S_INBOX]);
        if (pending < 0 || msgs < 0)
            return NULL;
        Py_ssize_t towrite = PyByteArray_GET_SIZE(wbuf);   /* acknowledgements, give-backs */
        if (got)
            return PyLong_FromLong(PyByteArray_GET_SIZE(buf) < 8 && !pending && !msgs && !towrite ? 1 : 2);
        if (pending || msgs || towrite)
            return PyLong_FromLong(0);
        /* C2 on what an interrupted reader, or the last recv, left */
        Py_ssize_t before = PyByteArray_GET_SIZE(buf);
        if (before >= 8) {
            int woke = dispatch_all(buf, st);
            if (woke < 0)
                return NULL;
            /* decode may have run Python (a handler that closed the channel) */
            int closed = still_open(ch, args[1], fd);
            if (closed != 0)
                return closed < 0 ? NULL : PyLong_FromLong(0);
            if (PyByteArray_GET_SIZE(buf) != before) {
                if (woke && (got = PyDict_Contains(results, rid)) <= 0)
                    return got < 0 ? NULL : PyLong_FromLong(0);     /* another thread's reply */
                continue;
            }
        }
        /* C1 */
        char *tmp = PyMem_RawMalloc(RECV_CHUNK);
        if (tmp == NULL)
            return PyErr_NoMemory();
        ssize_t r;
        int err;
        Py_BEGIN_ALLOW_THREADS
        r = recv_polled(fd, tmp, until, &err, &slow);
        Py_END_ALLOW_THREADS
        slow = 0;
        if (r < 0 && err == EAGAIN && until) {
            /* C5: the poll is over.  Handlers of signals that came during
             * it run now; after them, as after a decode (C2), the channel
             * is looked at again before the recv that sleeps. */
            PyMem_RawFree(tmp);
            until = 0;
            if (PyErr_CheckSignals() < 0)
                return NULL;
            int closed = still_open(ch, args[1], fd);
            if (closed != 0)
                return closed < 0 ? NULL : PyLong_FromLong(0);
            continue;
        }
        if (first && r > 0) {
            int64_t now = mono_ns();
            adapt_window(now - sent_at, now >= poll_end);
            first = 0;
        }
        if (r > 0) {
            Py_ssize_t len = PyByteArray_GET_SIZE(buf);
            int rc = PyByteArray_Resize(buf, len + r);
            if (rc == 0)
                memcpy(PyByteArray_AS_STRING(buf) + len, tmp, (size_t)r);
            PyMem_RawFree(tmp);
            if (rc < 0)
                return NULL;
            continue;
        }
        PyMem_RawFree(tmp);
        if (r < 0 && err == EINTR) {
            if (PyErr_CheckSignals() < 0)
                return NULL;
            return PyLong_FromLong(-1);
        }
        return PyLong_FromLong(0);                      /* the end, or an error: the general way says which */
    }
}
