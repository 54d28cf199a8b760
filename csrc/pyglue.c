/*
 * pyglue.c — the Python side of the seam, module qlog._log._glue.
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
#include <structmember.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* BUILD_ID: the build id setup.py passes (qlog/_log/_buildid.py); a build
 * without it gets "", which qlog refuses at import like any other id. */
#ifndef QLOG_BUILD_ID
#define QLOG_BUILD_ID ""
#endif

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

/* Whether buffers filled by qlog_read hold n records: n sequence numbers,
 * n + 1 offsets, each record inside data.  Sets ValueError when not. */
static int read_ok(const char *fn, const Py_buffer *data, const Py_buffer *seqs,
                   const Py_buffer *offs, Py_ssize_t n)
{
    if (n < 0 || seqs->len < n * 8 || offs->len < (n + 1) * 8) {
        PyErr_Format(PyExc_ValueError, "%s: buffers shorter than n records", fn);
        return 0;
    }
    const uint64_t *of = offs->buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (of[i] > of[i + 1] || of[i + 1] > (uint64_t)data->len) {
            PyErr_Format(PyExc_ValueError, "%s: offsets out of range", fn);
            return 0;
        }
    }
    return 1;
}

static PyObject *unpack(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data, seqs, offs;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*y*y*n", &data, &seqs, &offs, &n))
        return NULL;
    PyObject *list = NULL;
    if (!read_ok("unpack", &data, &seqs, &offs, n))
        goto out;
    const char *d = data.buf;
    const uint64_t *sq = seqs.buf, *of = offs.buf;
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

/*
 * MessageBase: the fields of a delivered message, as a C type so that a
 * pull of 100 messages does not run 100 Python __init__ calls.  qlog's
 * Message subclasses it (adding id, timestamp, ack, retry, ... in Python).
 *
 *   q         the Queue that delivered it
 *   seq       its number in the queue's message log
 *   attempts  deliveries so far, this one included
 *   payload   the stored record: 16-byte header (qlog/_message.py) + body
 *   outcome   0 open, 1 acked, 2 retried, 3 peeked (cannot be settled)
 *   body      the decoded body, once read
 *   split     the parsed header, once needed
 */
typedef struct {
    PyObject_HEAD
    PyObject *q;
    long long seq;
    int attempts;
    int outcome;
    PyObject *payload;
    PyObject *body;
    PyObject *split;
} MessageBase;

#define CT_BYTES 2

static int mb_traverse(MessageBase *m, visitproc visit, void *arg)
{
    Py_VISIT(m->q);
    Py_VISIT(m->payload);
    Py_VISIT(m->body);
    Py_VISIT(m->split);
    return 0;
}

static int mb_clear(MessageBase *m)
{
    Py_CLEAR(m->q);
    Py_CLEAR(m->payload);
    Py_CLEAR(m->body);
    Py_CLEAR(m->split);
    return 0;
}

/* For instances of a Python subclass, subtype_dealloc calls this and then
 * drops its own reference to the subclass: none is dropped here. */
static void mb_dealloc(MessageBase *m)
{
    PyObject_GC_UnTrack(m);
    mb_clear(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static PyObject *mb_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *names[] = {"q", "seq", "attempts", "payload", "peeked", NULL};
    PyObject *q, *payload;
    long long seq;
    int attempts, peeked = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OLiS|p", names, &q, &seq, &attempts, &payload,
                                     &peeked))
        return NULL;
    MessageBase *m = (MessageBase *)type->tp_alloc(type, 0);
    if (!m)
        return NULL;
    Py_INCREF(q);
    m->q = q;
    m->seq = seq;
    m->attempts = attempts;
    m->outcome = peeked ? 3 : 0;
    Py_INCREF(payload);
    m->payload = payload;
    return (PyObject *)m;
}

/* The body, decoded once: bytes bodies here, the rest by the subclass's
 * _decode_body(). */
static PyObject *mb_get_body(MessageBase *m, void *closure)
{
    (void)closure;
    if (!m->body) {
        const char *p = PyBytes_AS_STRING(m->payload);
        Py_ssize_t n = PyBytes_GET_SIZE(m->payload);
        if (n >= 16 && p[0] == 1 && p[1] == CT_BYTES && p[2] == 0 && p[3] == 0)
            m->body = PyBytes_FromStringAndSize(p + 16, n - 16);
        else
            m->body = PyObject_CallMethod((PyObject *)m, "_decode_body", NULL);
        if (!m->body)
            return NULL;
    }
    Py_INCREF(m->body);
    return m->body;
}

static PyMemberDef mb_members[] = {
    {"_q", T_OBJECT, offsetof(MessageBase, q), READONLY, NULL},
    {"_seq", T_LONGLONG, offsetof(MessageBase, seq), READONLY, NULL},
    {"attempts", T_INT, offsetof(MessageBase, attempts), READONLY,
     "Deliveries so far, this one included (1 on the first)."},
    {"_outcome", T_INT, offsetof(MessageBase, outcome), 0, NULL},
    {"_payload", T_OBJECT, offsetof(MessageBase, payload), READONLY, NULL},
    {"_split", T_OBJECT, offsetof(MessageBase, split), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef mb_getset[] = {
    {"body", (getter)mb_get_body, NULL, "The body, decoded back to the type it was sent as.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject MessageBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "qlog._log._glue.MessageBase",
    .tp_basicsize = sizeof(MessageBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C fields of qlog.Message.",
    .tp_new = mb_new,
    .tp_dealloc = (destructor)mb_dealloc,
    .tp_traverse = (traverseproc)mb_traverse,
    .tp_clear = (inquiry)mb_clear,
    .tp_members = mb_members,
    .tp_getset = mb_getset,
};

/* A new message of class cls (a MessageBase subclass): attempts 1. */
static PyObject *mb_make(PyTypeObject *cls, PyObject *q, long long seq, PyObject *payload)
{
    MessageBase *m = (MessageBase *)cls->tp_alloc(cls, 0);
    if (!m)
        return NULL;
    Py_INCREF(q);
    m->q = q;
    m->seq = seq;
    m->attempts = 1;
    m->payload = payload;   /* reference stolen */
    return (PyObject *)m;
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
 *
 * With the optional (cls, q), new_payloads holds instead new messages:
 * instances of cls, a MessageBase subclass, delivered by q, attempts 1.
 */
static PyObject *scan_messages(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data, seqs, offs;
    Py_ssize_t n;
    long long now, ret;
    PyObject *cls = NULL, *q = NULL;
    if (!PyArg_ParseTuple(args, "y*y*y*nLL|OO", &data, &seqs, &offs, &n, &now, &ret, &cls, &q))
        return NULL;
    if (cls && (!PyType_Check(cls) ||
                !PyType_IsSubtype((PyTypeObject *)cls, &MessageBaseType) || !q)) {
        PyErr_SetString(PyExc_TypeError, "scan_messages: cls must be a MessageBase subclass, with q");
        PyBuffer_Release(&data);
        PyBuffer_Release(&seqs);
        PyBuffer_Release(&offs);
        return NULL;
    }
    PyObject *out = NULL, *l[7] = {NULL};
    if (!read_ok("scan_messages", &data, &seqs, &offs, n))
        goto done;
    const char *d = data.buf;
    const uint64_t *sq = seqs.buf, *of = offs.buf;
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
            if (cls) {
                b = mb_make((PyTypeObject *)cls, q, seq, b);
                if (!b)
                    goto done;
            }
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

/* ids(prefix, first, n) -> [prefix + 16 lowercase hex digits of seq, ...]
 * for seq = first .. first + n - 1: a queue's message ids (prefix ASCII). */
static PyObject *ids(PyObject *self, PyObject *args)
{
    (void)self;
    const char *pre;
    Py_ssize_t plen, n;
    unsigned long long first;
    if (!PyArg_ParseTuple(args, "s#Kn", &pre, &plen, &first, &n))
        return NULL;
    for (Py_ssize_t i = 0; i < plen; i++)
        if ((unsigned char)pre[i] > 127) {
            PyErr_SetString(PyExc_ValueError, "ids: prefix must be ASCII");
            return NULL;
        }
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "ids: n must be >= 0");
        return NULL;
    }
    static const char hex[] = "0123456789abcdef";
    PyObject *list = PyList_New(n);
    if (!list)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *s = PyUnicode_New(plen + 16, 127);
        if (!s) {
            Py_DECREF(list);
            return NULL;
        }
        Py_UCS1 *d = PyUnicode_1BYTE_DATA(s);
        memcpy(d, pre, (size_t)plen);
        unsigned long long v = first + (unsigned long long)i;
        for (int k = 15; k >= 0; k--) {
            d[plen + k] = (Py_UCS1)hex[v & 15];
            v >>= 4;
        }
        PyList_SET_ITEM(list, i, s);
    }
    return list;
}

static PyMethodDef methods[] = {
    {"ids", ids, METH_VARARGS, "ids(prefix, first, n) -> [prefix + '%016x' % seq, ...]"},
    {"scan_messages", scan_messages, METH_VARARGS,
     "scan_messages(data, seqs, offs, n, now_us, retention_us) -> (new, new_sent, new_payloads, "
     "deferred, deferred_due, deferred_sent, expired)"},
    {"pack", pack, METH_VARARGS,
     "pack(payloads, prefix=b'') -> (joined, uint32 lengths) or None; prefix goes before each payload"},
    {"unpack", unpack, METH_VARARGS, "unpack(data, seqs, offs, n) -> [(seq, bytes), ...]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "qlog._log._glue", "Batch packing helpers for qlog.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__glue(void)
{
    if (PyType_Ready(&MessageBaseType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&MessageBaseType);
    if (PyModule_AddObject(m, "MessageBase", (PyObject *)&MessageBaseType) < 0) {
        Py_DECREF(&MessageBaseType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddStringConstant(m, "BUILD_ID", QLOG_BUILD_ID) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
