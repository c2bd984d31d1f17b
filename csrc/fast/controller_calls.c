/*
 * controller_calls.c -- in the controller process, on its loop's thread:
 * the read of one container's channel when it holds the usual call (one
 * binary call that a plugin answers at once), served whole here
 * (netplex_native/controller.py, _Conn._on_readable; _Conn._serve_hot is
 * the same path in Python, for builds without the accelerator).
 *
 * ctrl_hot_read(conn, sock, hot, rec) reads once (non-blocking); the
 * caller has checked that conn has nothing queued to send and nothing
 * buffered half-read.  Invariants:
 *  H1 It answers a call itself only if the bytes read are exactly one
 *     binary call (wire._CALL: length, no JSON, an op in `hot', a nonzero
 *     id, flags within the op's (`hot' maps op -> (fn, allowed flags))),
 *     whose name is valid UTF-8 of 1..NAME_MAX bytes without NUL (what
 *     check_name accepts) -- the checks of the Python path, no fewer.
 *     Anything else is returned as bytes, read and untouched, for the
 *     general path (b"" at the end of the stream).
 *  H2 A served call's answer is fn(rec, name, flags).  It is sent here only
 *     if, after fn ran (fn may have answered other calls of this container:
 *     a unit or a lock granted to one of its waiters), conn is still open
 *     with nothing queued and its socket still has the same fd, the result
 *     is an int in int64, a bool or None (encoded exactly as
 *     wire.encode_reply does), and the socket takes it whole: then True.
 *     Otherwise Python finishes it, through conn's queue: (0, rid, result)
 *     (encode and send), (1, rid, exc) with exc an Exception (answer the
 *     error), (2, rid, frame, sent) (the socket took `sent' bytes of
 *     `frame': queue the rest).  None: nothing to read.  An answer is lost
 *     only to a MemoryError after fn ran (as in Python).
 *  H3 A BaseException that is not an Exception (SystemExit,
 *     KeyboardInterrupt) raised by fn propagates, as from Python; the
 *     call is then unanswered, as it would be there.  OSError from recv
 *     propagates (the caller closes the channel).
 */
#include "fast.h"

#include <errno.h>
#include <sys/socket.h>

#define READ_MAX (1 << 18)          /* as _Conn._on_readable */
#define NAME_MAX 255                /* errors.NAME_MAX_BYTES */

static char *rbuf;                  /* the loop thread's read buffer */
static PyObject *strs[3];      /* queued, closed, draining */
#define str_queued strs[0]
#define str_closed strs[1]
#define str_draining strs[2]

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
    put_be32(f, WIRE_REPLY_SIZE - 4);
    put_be32(f + 4, 0);
    f[8] = WIRE_OP_REPLY;
    put_be64(f + 9, rid);
    f[17] = (unsigned char)flags;
    put_be64(f + 18, (uint64_t)value);
    return 1;
}

/* The op's (fn, allowed flags) if data is one hot call (H1), else NULL. */
static PyObject *hot_entry(PyObject *hot, const unsigned char *p, Py_ssize_t n)
{
    if (n <= WIRE_CALL_SIZE || n > WIRE_CALL_SIZE + NAME_MAX)
        return NULL;
    if (be32(p) + 4 != (uint64_t)n || be32(p + 4) != 0 || be64(p + 9) == 0)
        return NULL;
    if (memchr(p + WIRE_CALL_SIZE, 0, (size_t)(n - WIRE_CALL_SIZE)) != NULL)
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

/* After fn ran: 1 if conn may still be written directly (H2), 0 if not,
 * -1 on error. */
static int conn_clear(PyObject *conn, PyObject *sock, int fd)
{
    PyObject *q = PyObject_GetAttr(conn, str_queued);
    if (q == NULL)
        return -1;
    int busy = PyObject_IsTrue(q);
    Py_DECREF(q);
    for (int i = 0; busy == 0 && i < 2; i++) {
        PyObject *v = PyObject_GetAttr(conn, i ? str_draining : str_closed);
        if (v == NULL)
            return -1;
        busy = PyObject_IsTrue(v);
        Py_DECREF(v);
    }
    if (busy != 0)
        return busy < 0 ? -1 : 0;
    int now = PyObject_AsFileDescriptor(sock);
    if (now < 0)
        PyErr_Clear();
    return now == fd;
}

PyObject *ctrl_hot_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 4 || !PyDict_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "ctrl_hot_read(conn, sock, hot, rec)");
        return NULL;
    }
    if (intern_names(strs, (const char *const[]){"queued", "closed", "draining"}, 3) < 0)
        return NULL;
    PyObject *conn = args[0], *sock = args[1];
    int fd = PyObject_AsFileDescriptor(sock);
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
    PyObject *e = hot_entry(args[2], p, n);
    PyObject *name = e ? PyUnicode_DecodeUTF8(rbuf + WIRE_CALL_SIZE, n - WIRE_CALL_SIZE, NULL) : NULL;
    if (name == NULL) {
        PyErr_Clear();
        return PyBytes_FromStringAndSize(rbuf, n);      /* the general path's */
    }
    /* from here rbuf is not read again: fn may run anything */
    uint64_t rid = be64(p + 9);
    PyObject *flags = PyLong_FromLong(p[17]);
    if (flags == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    PyObject *fargs[3] = {args[3], name, flags};
    PyObject *result = PyObject_Vectorcall(PyTuple_GET_ITEM(e, 0), fargs, 3, NULL);
    Py_DECREF(name);
    Py_DECREF(flags);
    if (result == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))   /* H3 */
            return NULL;
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyErr_NormalizeException(&et, &ev, &tb);
        if (tb != NULL && ev != NULL)
            PyException_SetTraceback(ev, tb);
        Py_XDECREF(et);
        Py_XDECREF(tb);
        if (ev == NULL) {
            PyErr_SetString(PyExc_SystemError, "ctrl_hot_read: an exception without a value");
            return NULL;
        }
        PyObject *t = Py_BuildValue("(iKN)", 1, (unsigned long long)rid, ev);   /* steals ev */
        return t;
    }
    unsigned char f[WIRE_REPLY_SIZE];
    int clear = conn_clear(conn, sock, fd);
    if (clear < 0) {
        Py_DECREF(result);
        return NULL;
    }
    if (!clear || !encode_reply(f, rid, result))
        return Py_BuildValue("(iKN)", 0, (unsigned long long)rid, result);     /* steals result */
    Py_DECREF(result);
    ssize_t s = send(fd, f, WIRE_REPLY_SIZE, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (s == WIRE_REPLY_SIZE)
        Py_RETURN_TRUE;
    /* not taken whole (no room, a signal, broken): Python queues or closes */
    return Py_BuildValue("(iKy#n)", 2, (unsigned long long)rid, (const char *)f, (Py_ssize_t)WIRE_REPLY_SIZE,
                         (Py_ssize_t)(s < 0 ? 0 : s));
}
