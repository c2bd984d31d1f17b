/*
 * controller_calls.c -- in the controller process, on its loop's thread:
 * the read of one container's channel when it holds the usual call (one
 * binary call that a plugin answers at once), served whole here
 * (netplex_native/controller.py, _Conn._on_readable, which has the same
 * path in Python for builds without the accelerator).
 *
 * ctrl_hot_read(sock, hot, rec) reads once (non-blocking).  Invariants:
 *  H1 It answers a call itself only if the bytes read are exactly one
 *     binary call (wire._CALL: length, no JSON, an op in `hot', a nonzero
 *     id, flags within the op's (`hot' maps op -> (fn, allowed flags))),
 *     whose name is valid UTF-8 of 1..NAME_MAX bytes without NUL (what
 *     check_name accepts) -- the checks of the Python path, no fewer.
 *     Anything else is returned as bytes, read and untouched, for the
 *     general path (b"" at the end of the stream).
 *  H2 A served call's answer is fn(rec, name, flags): an int in int64, a
 *     bool or None is encoded here exactly as wire.encode_reply does and
 *     sent at once if the socket takes it whole; every other outcome is
 *     returned for Python to finish, never dropped: (rid, result) (encode
 *     and send), (rid, exc) with exc an Exception instance (answer the
 *     error), (rid, frame, sent) (the socket took `sent' bytes of `frame':
 *     queue the rest).  True: answered and sent.  None: nothing to read.
 *  H3 A BaseException that is not an Exception (SystemExit,
 *     KeyboardInterrupt) raised by fn propagates, as from Python; the
 *     call is then unanswered, as it would be there.  OSError from recv
 *     propagates (the caller closes the channel).
 */
#include "fast.h"

#include <errno.h>
#include <sys/socket.h>

#define READ_MAX (1 << 18)          /* as _Conn._on_readable */
#define CALL_SIZE 26                /* wire._CALL.size: !IIBQBd */
#define NAME_MAX 255                /* errors.NAME_MAX_BYTES */
#define OP_REPLY 0x80
#define REPLY_SIZE 26               /* wire._REPLY.size: !IIBQBq */

static char *rbuf;                  /* the loop thread's read buffer */

static uint32_t rd32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t rd64(const unsigned char *p)
{
    return (uint64_t)rd32(p) << 32 | rd32(p + 4);
}

static void wr32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (24 - 8 * i));
}

static void wr64(unsigned char *p, uint64_t v)
{
    wr32(p, (uint32_t)(v >> 32));
    wr32(p + 4, (uint32_t)v);
}

/* wire.encode_reply(rid, result) for a binary-encodable result: 1 and the
 * frame, or 0 (Python encodes it). */
static int encode_reply(unsigned char *f, uint64_t rid, PyObject *result)
{
    unsigned flags = 1;
    int64_t value = 0;
    if (result == Py_None) {
    } else if (result == Py_True) {
        flags |= 12;
    } else if (result == Py_False) {
        flags |= 8;
    } else if (PyLong_CheckExact(result)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(result, &overflow);
        if (overflow || (v == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
        flags |= 4;
        value = v;
    } else {
        return 0;
    }
    wr32(f, REPLY_SIZE - 4);
    wr32(f + 4, 0);
    f[8] = OP_REPLY;
    wr64(f + 9, rid);
    f[17] = (unsigned char)flags;
    wr64(f + 18, (uint64_t)value);
    return 1;
}

/* The op's (fn, allowed flags) if data is one hot call (H1), else NULL. */
static PyObject *hot_entry(PyObject *hot, const unsigned char *p, Py_ssize_t n)
{
    if (n <= CALL_SIZE || n > CALL_SIZE + NAME_MAX)
        return NULL;
    if (rd32(p) + 4 != (uint64_t)n || rd32(p + 4) != 0 || rd64(p + 9) == 0)
        return NULL;
    if (memchr(p + CALL_SIZE, 0, (size_t)(n - CALL_SIZE)) != NULL)
        return NULL;
    PyObject *op = PyLong_FromLong(p[8]);
    if (op == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *e = PyDict_GetItemWithError(hot, op);    /* borrowed */
    Py_DECREF(op);
    if (e == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 2 || !PyLong_Check(PyTuple_GET_ITEM(e, 1)))
        return NULL;
    long allowed = PyLong_AsLong(PyTuple_GET_ITEM(e, 1));
    if (allowed == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return NULL;
    }
    if (p[17] & ~allowed)
        return NULL;
    return e;
}

PyObject *ctrl_hot_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3 || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "ctrl_hot_read(sock, hot, rec)");
        return NULL;
    }
    int fd = PyObject_AsFileDescriptor(args[0]);
    if (fd < 0)
        return NULL;
    if (rbuf == NULL && (rbuf = PyMem_RawMalloc(READ_MAX)) == NULL)
        return PyErr_NoMemory();
    ssize_t n = recv(fd, rbuf, READ_MAX, MSG_DONTWAIT);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            Py_RETURN_NONE;             /* (EINTR: handlers run when we return) */
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    const unsigned char *p = (const unsigned char *)rbuf;
    PyObject *e = hot_entry(args[1], p, n);
    PyObject *name = e ? PyUnicode_DecodeUTF8(rbuf + CALL_SIZE, n - CALL_SIZE, NULL) : NULL;
    if (name == NULL) {
        PyErr_Clear();
        return PyBytes_FromStringAndSize(rbuf, n);      /* the general path's */
    }
    uint64_t rid = rd64(p + 9);
    PyObject *flags = PyLong_FromLong(p[17]);
    if (flags == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    PyObject *fargs[3] = {args[2], name, flags};
    PyObject *result = PyObject_Vectorcall(PyTuple_GET_ITEM(e, 0), fargs, 3, NULL);
    Py_DECREF(name);
    Py_DECREF(flags);
    PyObject *prid = PyLong_FromUnsignedLongLong(rid);
    if (prid == NULL) {
        Py_XDECREF(result);
        return NULL;
    }
    if (result == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {     /* H3 */
            Py_DECREF(prid);
            return NULL;
        }
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyErr_NormalizeException(&et, &ev, &tb);
        if (tb != NULL && ev != NULL)
            PyException_SetTraceback(ev, tb);
        Py_XDECREF(et);
        Py_XDECREF(tb);
        if (ev == NULL) {
            Py_DECREF(prid);
            return NULL;
        }
        PyObject *t = PyTuple_Pack(2, prid, ev);
        Py_DECREF(prid);
        Py_DECREF(ev);
        return t;
    }
    unsigned char f[REPLY_SIZE];
    if (!encode_reply(f, rid, result)) {
        PyObject *t = PyTuple_Pack(2, prid, result);
        Py_DECREF(prid);
        Py_DECREF(result);
        return t;
    }
    Py_DECREF(result);
    ssize_t s = send(fd, f, REPLY_SIZE, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (s == REPLY_SIZE) {
        Py_DECREF(prid);
        Py_RETURN_TRUE;
    }
    /* not taken whole (no room, a signal, broken): Python queues or closes */
    PyObject *frame = PyBytes_FromStringAndSize((const char *)f, REPLY_SIZE);
    PyObject *sent = PyLong_FromSsize_t(s < 0 ? 0 : s);
    PyObject *t = frame && sent ? PyTuple_Pack(3, prid, frame, sent) : NULL;
    Py_DECREF(prid);
    Py_XDECREF(frame);
    Py_XDECREF(sent);
    return t;
}
