/*
 * pyglue.c — the Python side of the seam, module qlog._glue.
 *
 * Not part of the engine (which holds no Python objects): two helpers that
 * turn a batch into the engine's shape and back in one pass each, where
 * doing it with Python built-ins costs more than the engine's own work.
 *
 *   pack(payloads, prefix=b"")
 *                   -> (joined: bytes, lengths: bytes of uint32) or None
 *                      when an item is not `bytes` (the caller then falls
 *                      back to the buffer protocol path); `prefix` is
 *                      written before every payload (a queue's message
 *                      header shared by a whole batch)
 *   unpack(data, seqs, offs, n) -> [(seq, payload bytes), ...]
 *                      data/seqs/offs are buffers as qlog_read fills them
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *pack(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *arg;
    const char *pre = "";
    Py_ssize_t plen = 0;
    if (!PyArg_ParseTuple(args, "O|y#", &arg, &pre, &plen))
        return NULL;
    PyObject *seq = PySequence_Fast(arg, "payloads must be a sequence of bytes-like objects");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyBytes_CheckExact(items[i])) {
            Py_DECREF(seq);
            Py_RETURN_NONE;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(items[i]) + plen;
        if ((uint64_t)len > UINT32_MAX) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_OverflowError, "record of %zd bytes does not fit a 32-bit length", len);
            return NULL;
        }
        total += len;
    }
    PyObject *joined = PyBytes_FromStringAndSize(NULL, total);
    PyObject *lens = PyBytes_FromStringAndSize(NULL, n * 4);
    if (!joined || !lens) {
        Py_XDECREF(joined);
        Py_XDECREF(lens);
        Py_DECREF(seq);
        return NULL;
    }
    char *dst = PyBytes_AS_STRING(joined);
    char *lp = PyBytes_AS_STRING(lens);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t len = PyBytes_GET_SIZE(items[i]);
        uint32_t l32 = (uint32_t)(len + plen);
        memcpy(dst, pre, (size_t)plen);
        memcpy(dst + plen, PyBytes_AS_STRING(items[i]), (size_t)len);
        memcpy(lp + 4 * i, &l32, 4);
        dst += len + plen;
    }
    Py_DECREF(seq);
    PyObject *t = PyTuple_Pack(2, joined, lens);
    Py_DECREF(joined);
    Py_DECREF(lens);
    return t;
}

static PyObject *unpack(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data, seqs, offs;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*y*y*n", &data, &seqs, &offs, &n))
        return NULL;
    PyObject *list = NULL;
    if (n < 0 || seqs.len < n * 8 || offs.len < (n + 1) * 8) {
        PyErr_SetString(PyExc_ValueError, "unpack: buffers shorter than n records");
        goto out;
    }
    const char *d = data.buf;
    const uint64_t *sq = seqs.buf, *of = offs.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (of[i] > of[i + 1] || of[i + 1] > (uint64_t)data.len) {
            PyErr_SetString(PyExc_ValueError, "unpack: offsets out of range");
            goto out;
        }
    }
    list = PyList_New(n);
    if (!list)
        goto out;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *s = PyLong_FromUnsignedLongLong(sq[i]);
        PyObject *b = PyBytes_FromStringAndSize(d + of[i], (Py_ssize_t)(of[i + 1] - of[i]));
        PyObject *t = PyTuple_New(2);
        if (!s || !b || !t) {
            Py_XDECREF(s);
            Py_XDECREF(b);
            Py_XDECREF(t);
            Py_CLEAR(list);
            goto out;
        }
        PyTuple_SET_ITEM(t, 0, s);
        PyTuple_SET_ITEM(t, 1, b);
        PyList_SET_ITEM(list, i, t);
    }
out:
    PyBuffer_Release(&data);
    PyBuffer_Release(&seqs);
    PyBuffer_Release(&offs);
    return list;
}

/* Append v to list as a Python int; returns -1 on error. */
static int push_ll(PyObject *list, long long v)
{
    PyObject *o = PyLong_FromLongLong(v);
    if (!o)
        return -1;
    int r = PyList_Append(list, o);
    Py_DECREF(o);
    return r;
}

/*
 * scan_messages(data, seqs, offs, n, now_us, retention_us)
 *
 * Sorts a read of a queue's message log (buffers as qlog_read fills them)
 * by each message's 16-byte header (see qlog/_message.py):
 *
 *   +---------+-------+-------+----------+------------------+
 *   | version | ctype | flags | delay ms | sent µs (int64)  |
 *   +---------+-------+-------+----------+------------------+
 *
 * Returns (new, new_sent, new_payloads, deferred, deferred_due,
 * deferred_sent, expired): `expired` when sent + retention_us <= now
 * (retention_us < 0: never), `deferred` while sent + delay > now, else
 * `new`.  A record too short for a header counts as new and sent now; its
 * consumer gets the format error when it reads the body.
 */
static PyObject *scan_messages(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data, seqs, offs;
    Py_ssize_t n;
    long long now, ret;
    if (!PyArg_ParseTuple(args, "y*y*y*nLL", &data, &seqs, &offs, &n, &now, &ret))
        return NULL;
    PyObject *out = NULL, *l[7] = {NULL};
    if (n < 0 || seqs.len < n * 8 || offs.len < (n + 1) * 8) {
        PyErr_SetString(PyExc_ValueError, "scan_messages: buffers shorter than n records");
        goto done;
    }
    const char *d = data.buf;
    const uint64_t *sq = seqs.buf, *of = offs.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (of[i] > of[i + 1] || of[i + 1] > (uint64_t)data.len) {
            PyErr_SetString(PyExc_ValueError, "scan_messages: offsets out of range");
            goto done;
        }
    }
    for (int k = 0; k < 7; k++)
        if (!(l[k] = PyList_New(0)))
            goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *p = d + of[i];
        uint64_t len = of[i + 1] - of[i];
        long long sent = now, delay_us = 0;
        if (len >= 16) {
            uint32_t delay_ms;
            int64_t s;
            memcpy(&delay_ms, p + 4, 4);
            memcpy(&s, p + 8, 8);
            sent = s;
            delay_us = (long long)delay_ms * 1000;
        }
        long long seq = (long long)sq[i];
        if (ret >= 0 && sent + ret <= now) {
            if (push_ll(l[6], seq))
                goto done;
        } else if (delay_us && sent + delay_us > now) {
            if (push_ll(l[3], seq) || push_ll(l[4], sent + delay_us) || push_ll(l[5], sent))
                goto done;
        } else {
            PyObject *b = PyBytes_FromStringAndSize(p, (Py_ssize_t)len);
            if (!b)
                goto done;
            int r = PyList_Append(l[2], b);
            Py_DECREF(b);
            if (r || push_ll(l[0], seq) || push_ll(l[1], sent))
                goto done;
        }
    }
    out = PyTuple_New(7);
    if (out)
        for (int k = 0; k < 7; k++) {
            PyTuple_SET_ITEM(out, k, l[k]);
            l[k] = NULL;
        }
done:
    for (int k = 0; k < 7; k++)
        Py_XDECREF(l[k]);
    PyBuffer_Release(&data);
    PyBuffer_Release(&seqs);
    PyBuffer_Release(&offs);
    return out;
}

static PyMethodDef methods[] = {
    {"scan_messages", scan_messages, METH_VARARGS,
     "scan_messages(data, seqs, offs, n, now_us, retention_us) -> (new, new_sent, new_payloads, "
     "deferred, deferred_due, deferred_sent, expired)"},
    {"pack", pack, METH_VARARGS,
     "pack(payloads, prefix=b'') -> (joined, uint32 lengths) or None; prefix goes before each payload"},
    {"unpack", unpack, METH_VARARGS, "unpack(data, seqs, offs, n) -> [(seq, bytes), ...]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "qlog._glue", "Batch packing helpers for qlog.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__glue(void) { return PyModule_Create(&module); }
