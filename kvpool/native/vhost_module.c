/*
 * kvpool._vhost: thin CPython glue over vhost_user.c.
 *
 *   Region(size, hugetlb=None)      memfd-backed shared memory; buffer protocol (writable)
 *   Device(path, region, queues=0, queue_size=256, poll=False, event_idx=True, timeout_ms=5000, extra=())
 *                                   extra: [(fd, address, size)] of caller-owned memory in the table too
 *
 * All methods must be called from one thread at a time (the asyncio loop); the GIL is released
 * only around the blocking handshake/shutdown and the busy-poll.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "vhost_user.h"

/* ------------------------------------------------------------------------------------------------ */
typedef struct {
    PyObject_HEAD
    vu_region r;
    Py_ssize_t exports;
    int closed;
} RegionObject;

static PyTypeObject RegionType;

static int Region_init(RegionObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"size", "hugetlb", NULL};
    unsigned long long size;
    PyObject *huge = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K|O", kwlist, &size, &huge))
        return -1;
    if (self->r.base) {
        PyErr_SetString(PyExc_RuntimeError, "Region already initialised");
        return -1;
    }
    int mode = huge == Py_None ? VU_HUGE_AUTO : (PyObject_IsTrue(huge) ? VU_HUGE_REQUIRE : VU_HUGE_NEVER);
    char err[VU_ERRLEN];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = vu_region_create(&self->r, (size_t)size, mode, "kvpool-vhost-data", err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc) {
        errno = -rc;
        PyErr_Format(PyExc_OSError, "vhost region: %s", err);
        return -1;
    }
    return 0;
}

static void Region_dealloc(RegionObject *self)
{
    /* Exports hold a reference, so no buffer can outlive the mapping. */
    vu_region_destroy(&self->r);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Region_getbuffer(RegionObject *self, Py_buffer *view, int flags)
{
    if (!self->r.base) {
        PyErr_SetString(PyExc_BufferError, "region is not mapped");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->r.base, (Py_ssize_t)self->r.size, 0, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void Region_releasebuffer(RegionObject *self, Py_buffer *view)
{
    (void)view;
    self->exports--;
}

static PyBufferProcs Region_as_buffer = {(getbufferproc)Region_getbuffer, (releasebufferproc)Region_releasebuffer};

static PyObject *Region_close(RegionObject *self, PyObject *unused)
{
    (void)unused;
    /* Closing only drops the memfd; the mapping stays until the object dies (tensors may still view
     * it).  Targets keep their own mapping, so this does not revoke their access. */
    if (self->r.fd >= 0) {
        close(self->r.fd);
        self->r.fd = -1;
    }
    self->closed = 1;
    Py_RETURN_NONE;
}

static PyObject *Region_contains(RegionObject *self, PyObject *args)
{
    unsigned long long a, l;
    if (!PyArg_ParseTuple(args, "KK", &a, &l))
        return NULL;
    return PyBool_FromLong(l > 0 && vu_region_contains(&self->r, a, l));
}

static PyObject *Region_get_address(RegionObject *s, void *c) { (void)c; return PyLong_FromUnsignedLongLong((uintptr_t)s->r.base); }
static PyObject *Region_get_size(RegionObject *s, void *c) { (void)c; return PyLong_FromSize_t(s->r.size); }
static PyObject *Region_get_fd(RegionObject *s, void *c) { (void)c; return PyLong_FromLong(s->r.fd); }
static PyObject *Region_get_hugetlb(RegionObject *s, void *c) { (void)c; return PyBool_FromLong(s->r.hugetlb); }
static PyObject *Region_get_closed(RegionObject *s, void *c) { (void)c; return PyBool_FromLong(s->closed); }

static PyGetSetDef Region_getset[] = {
    {"address", (getter)Region_get_address, NULL, "virtual (= guest-physical) address of byte 0", NULL},
    {"size", (getter)Region_get_size, NULL, "bytes (a multiple of 2 MiB)", NULL},
    {"fd", (getter)Region_get_fd, NULL, "the memfd (-1 once closed)", NULL},
    {"hugetlb", (getter)Region_get_hugetlb, NULL, "backed by 2 MiB huge pages", NULL},
    {"closed", (getter)Region_get_closed, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Region_methods[] = {
    {"close", (PyCFunction)Region_close, METH_NOARGS, "close the memfd (the mapping lives until the object dies)"},
    {"contains", (PyCFunction)Region_contains, METH_VARARGS, "contains(addr, len) -> bool"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RegionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvpool._vhost.Region",
    .tp_basicsize = sizeof(RegionObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Region(size, hugetlb=None): memfd shared memory, 2 MiB aligned and sized",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Region_init,
    .tp_dealloc = (destructor)Region_dealloc,
    .tp_as_buffer = &Region_as_buffer,
    .tp_getset = Region_getset,
    .tp_methods = Region_methods,
};

/* ------------------------------------------------------------------------------------------------ */
typedef struct {
    PyObject_HEAD
    vu_dev d;
    RegionObject *region;
    int connected;
    vu_completion *comp;
    int comp_cap;
    struct iovec *iov;
    int iov_cap;
} DeviceObject;

static PyObject *VhostError; /* OSError subclass raised for protocol/connection failures */

static PyObject *raise_dev(DeviceObject *self, int rc)
{
    PyObject *args = Py_BuildValue("(is)", -rc, self->d.err[0] ? self->d.err : strerror(-rc));
    if (args) {
        PyErr_SetObject(VhostError, args);
        Py_DECREF(args);
    }
    return NULL;
}

/* [(fd, address, size), ...] -> vu_region descriptors of caller-owned memory (fds not ours). */
static int parse_extra(PyObject *obj, vu_region *out, unsigned *n)
{
    *n = 0;
    if (obj == NULL || obj == Py_None)
        return 0;
    PyObject *seq = PySequence_Fast(obj, "extra must be a sequence of (fd, address, size)");
    if (!seq)
        return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    if (len > VU_MAX_EXTRA) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "at most %d extra memory regions fit in a vhost-user memory table", VU_MAX_EXTRA);
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        int fd;
        unsigned long long a, sz;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iKK;extra region must be (fd, address, size)", &fd,
                              &a, &sz)) {
            Py_DECREF(seq);
            return -1;
        }
        memset(&out[i], 0, sizeof out[i]);
        out[i].fd = fd;
        out[i].base = (uint8_t *)(uintptr_t)a;
        out[i].size = (size_t)sz;
    }
    Py_DECREF(seq);
    *n = (unsigned)len;
    return 0;
}

static int Device_init(DeviceObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"path", "region", "queues", "queue_size", "poll", "event_idx", "timeout_ms", "extra", NULL};
    const char *path;
    PyObject *region, *extra_obj = NULL;
    unsigned queues = 0, qsize = 256;
    int poll = 0, evidx = 1, timeout_ms = 5000;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sO!|IIppiO", kwlist, &path, &RegionType, &region, &queues, &qsize,
                                     &poll, &evidx, &timeout_ms, &extra_obj))
        return -1;
    vu_region extra[VU_MAX_EXTRA];
    unsigned nextra;
    if (parse_extra(extra_obj, extra, &nextra))
        return -1;
    if (self->connected) {
        PyErr_SetString(PyExc_RuntimeError, "Device already connected");
        return -1;
    }
    RegionObject *r = (RegionObject *)region;
    if (r->closed || r->r.fd < 0) {
        PyErr_SetString(PyExc_ValueError, "region is closed");
        return -1;
    }
    unsigned flags = (poll ? VU_F_POLL : 0) | (evidx ? 0 : VU_F_NO_EVIDX);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = vu_dev_connect_mem(&self->d, path, &r->r, extra, nextra, queues, qsize, flags, timeout_ms);
    Py_END_ALLOW_THREADS
    if (rc == -EINVAL && nextra && self->d.err[0] && strstr(self->d.err, "extra region")) {
        PyErr_SetString(PyExc_ValueError, self->d.err);
        return -1;
    }
    if (rc) {
        raise_dev(self, rc);
        return -1;
    }
    Py_INCREF(region);
    self->region = r;
    self->connected = 1;
    return 0;
}

static void Device_dealloc(DeviceObject *self)
{
    if (self->connected)
        vu_dev_shutdown(&self->d);
    Py_XDECREF(self->region);
    PyMem_Free(self->comp);
    PyMem_Free(self->iov);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_q(DeviceObject *self, unsigned q)
{
    if (!self->connected) {
        errno = ENOTCONN;
        PyErr_SetString(VhostError, "device is shut down");
        return -1;
    }
    if (q >= self->d.nqueues) {
        PyErr_Format(PyExc_IndexError, "queue %u out of range (%u queues)", q, self->d.nqueues);
        return -1;
    }
    return 0;
}

/* enqueue(q, type, offset, iovs, token, cursor) -> (staged, cursor, done) */
static PyObject *Device_enqueue(DeviceObject *self, PyObject *args)
{
    unsigned q;
    int type;
    unsigned long long offset, token, cursor;
    PyObject *iovs;
    if (!PyArg_ParseTuple(args, "IiKOKK", &q, &type, &offset, &iovs, &token, &cursor))
        return NULL;
    if (check_q(self, q))
        return NULL;
    PyObject *seq = PySequence_Fast(iovs, "iovs must be a sequence of (address, length)");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > 1 << 20) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many iovecs");
        return NULL;
    }
    if (n > self->iov_cap) {
        struct iovec *ni = PyMem_Realloc(self->iov, sizeof *ni * (size_t)(n ? n : 1));
        if (!ni) {
            Py_DECREF(seq);
            return PyErr_NoMemory();
        }
        self->iov = ni;
        self->iov_cap = (int)n;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long a, l;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KK;iovec must be (address, length)", &a, &l)) {
            Py_DECREF(seq);
            return NULL;
        }
        self->iov[i].iov_base = (void *)(uintptr_t)a;
        self->iov[i].iov_len = (size_t)l;
    }
    Py_DECREF(seq);
    uint64_t cur = cursor;
    int done = 0;
    int rc = vu_enqueue(&self->d, q, type, offset, self->iov, (int)n, token, &cur, &done);
    if (rc == -EINVAL) {
        PyErr_Format(PyExc_ValueError, "invalid request: type %d, offset %llu must be a multiple of 512, and "
                     "every iovec length a non-zero multiple of 512", type, offset);
        return NULL;
    }
    if (rc == -EFAULT) {
        PyErr_SetString(PyExc_ValueError, "an iovec lies outside the shared region (the target cannot reach it)");
        return NULL;
    }
    if (rc < 0)
        return raise_dev(self, rc);
    return Py_BuildValue("(iKO)", rc, (unsigned long long)cur, done ? Py_True : Py_False);
}

static PyObject *Device_publish(DeviceObject *self, PyObject *args)
{
    unsigned q;
    if (!PyArg_ParseTuple(args, "I", &q) || check_q(self, q))
        return NULL;
    int rc = vu_publish(&self->d, q);
    if (rc < 0)
        return raise_dev(self, rc);
    return PyBool_FromLong(rc);
}

/* reap(q, drain=True) -> [(token, status, bytes, used_len), ...] */
static PyObject *Device_reap(DeviceObject *self, PyObject *args)
{
    unsigned q;
    int drain = 1;
    if (!PyArg_ParseTuple(args, "I|p", &q, &drain) || check_q(self, q))
        return NULL;
    if (drain) {
        /* Drain the call eventfd before looking at the ring: a signal that arrives after this read
         * leaves the fd readable again, so nothing can be missed. */
        uint64_t v;
        while (read(self->d.vqs[q].call_fd, &v, sizeof v) < 0 && errno == EINTR)
            ;
    }
    if (!self->comp) {
        self->comp_cap = 256;
        self->comp = PyMem_Malloc(sizeof *self->comp * (size_t)self->comp_cap);
        if (!self->comp)
            return PyErr_NoMemory();
    }
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (;;) {
        int n = vu_reap(&self->d, q, self->comp, self->comp_cap);
        if (n < 0) {
            Py_DECREF(out);
            return raise_dev(self, n);
        }
        for (int i = 0; i < n; i++) {
            vu_completion *c = &self->comp[i];
            PyObject *t = Py_BuildValue("(KiII)", (unsigned long long)c->token, (int)c->status, c->bytes, c->used_len);
            if (!t || PyList_Append(out, t) < 0) {
                Py_XDECREF(t);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(t);
        }
        if (n < self->comp_cap)
            break;
    }
    return out;
}

static PyObject *Device_poll(DeviceObject *self, PyObject *args)
{
    long spin_ns;
    if (!PyArg_ParseTuple(args, "l", &spin_ns))
        return NULL;
    if (!self->connected)
        return PyLong_FromLong(0);
    unsigned m;
    Py_BEGIN_ALLOW_THREADS
    m = vu_poll(&self->d, spin_ns);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLong(m);
}

static PyObject *Device_check_alive(DeviceObject *self, PyObject *unused)
{
    (void)unused;
    if (!self->connected)
        return PyLong_FromLong(-ENOTCONN);
    return PyLong_FromLong(vu_dev_check_alive(&self->d));
}

static PyObject *Device_shutdown(DeviceObject *self, PyObject *unused)
{
    (void)unused;
    if (!self->connected)
        Py_RETURN_NONE;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = vu_dev_shutdown(&self->d);
    Py_END_ALLOW_THREADS
    self->connected = 0;
    if (rc)
        return raise_dev(self, rc);
    Py_RETURN_NONE;
}

/* set_memory(extra): replace the extra regions and send the memory table again (blocking, GIL released). */
static PyObject *Device_set_memory(DeviceObject *self, PyObject *args)
{
    PyObject *extra_obj;
    if (!PyArg_ParseTuple(args, "O", &extra_obj))
        return NULL;
    if (!self->connected) {
        errno = ENOTCONN;
        PyErr_SetString(VhostError, "device is shut down");
        return NULL;
    }
    vu_region extra[VU_MAX_EXTRA];
    unsigned nextra;
    if (parse_extra(extra_obj, extra, &nextra))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = vu_dev_set_memory(&self->d, extra, nextra);
    Py_END_ALLOW_THREADS
    if (rc == -EINVAL || rc == -E2BIG) {
        PyErr_SetString(PyExc_ValueError, self->d.err);
        return NULL;
    }
    if (rc)
        return raise_dev(self, rc);
    Py_RETURN_NONE;
}

static PyObject *Device_contains(DeviceObject *self, PyObject *args)
{
    unsigned long long a, l;
    if (!PyArg_ParseTuple(args, "KK", &a, &l))
        return NULL;
    return PyBool_FromLong(l > 0 && vu_dev_mem_contains(&self->d, a, l));
}

static PyObject *Device_abort(DeviceObject *self, PyObject *unused)
{
    (void)unused;
    if (self->connected)
        vu_dev_abort(&self->d);
    self->connected = 0;
    Py_RETURN_NONE;
}

static PyObject *Device_queue_info(DeviceObject *self, PyObject *args)
{
    unsigned q;
    if (!PyArg_ParseTuple(args, "I", &q) || check_q(self, q))
        return NULL;
    vu_vq *vq = &self->d.vqs[q];
    return Py_BuildValue("{s:I,s:I,s:I,s:K,s:K,s:K,s:i,s:i}", "num", vq->num, "free", (unsigned)vq->num_free,
                         "outstanding", vq->outstanding, "kicks", (unsigned long long)vq->kicks,
                         "kicks_suppressed", (unsigned long long)vq->calls_suppressed, "reaped",
                         (unsigned long long)vq->reaped, "kick_fd", vq->kick_fd, "call_fd", vq->call_fd);
}

static PyObject *Device_get_config(DeviceObject *self, void *c)
{
    (void)c;
    const struct virtio_blk_config *g = &self->d.cfg;
    return Py_BuildValue("{s:K,s:I,s:I,s:I,s:H,s:B,s:H,s:H,s:O}", "capacity", (unsigned long long)g->capacity,
                         "size_max", g->size_max, "seg_max", g->seg_max, "blk_size", g->blk_size, "num_queues",
                         g->num_queues, "physical_block_exp", g->physical_block_exp, "min_io_size", g->min_io_size,
                         "opt_io_size_lo", (unsigned short)(g->opt_io_size & 0xffff), "valid",
                         self->d.have_config ? Py_True : Py_False);
}

#define DEV_U(name, expr)                                                                                    \
    static PyObject *Device_get_##name(DeviceObject *self, void *c)                                          \
    {                                                                                                        \
        (void)c;                                                                                             \
        return PyLong_FromUnsignedLongLong((unsigned long long)(expr));                                      \
    }
DEV_U(features, self->d.features)
DEV_U(offered_features, self->d.offered_features)
DEV_U(protocol_features, self->d.proto_features)
DEV_U(offered_protocol_features, self->d.offered_proto)
DEV_U(num_queues, self->d.nqueues)
DEV_U(max_queues, self->d.max_queues)
DEV_U(queue_size, self->d.qsize ? self->d.qsize : (self->d.nqueues ? self->d.vqs[0].num : 0))
DEV_U(seg_max, self->d.seg_max)
DEV_U(size_max, self->d.size_max)
static PyObject *Device_get_sock_fd(DeviceObject *s, void *c) { (void)c; return PyLong_FromLong(s->connected ? s->d.sock : -1); }
static PyObject *Device_get_event_idx(DeviceObject *s, void *c) { (void)c; return PyBool_FromLong(s->d.event_idx); }
static PyObject *Device_get_poll(DeviceObject *s, void *c) { (void)c; return PyBool_FromLong(s->d.poll); }
static PyObject *Device_get_connected(DeviceObject *s, void *c) { (void)c; return PyBool_FromLong(s->connected); }
static PyObject *Device_get_error(DeviceObject *s, void *c) { (void)c; return PyUnicode_FromString(s->d.err); }
static PyObject *Device_get_call_fds(DeviceObject *s, void *c)
{
    (void)c;
    PyObject *l = PyList_New(0);
    for (unsigned i = 0; l && i < s->d.nqueues; i++) {
        PyObject *v = PyLong_FromLong(s->d.vqs[i].call_fd);
        if (!v || PyList_Append(l, v) < 0) {
            Py_XDECREF(v);
            Py_CLEAR(l);
            break;
        }
        Py_DECREF(v);
    }
    return l;
}

static PyGetSetDef Device_getset[] = {
    {"config", (getter)Device_get_config, NULL, "virtio_blk_config read with GET_CONFIG", NULL},
    {"features", (getter)Device_get_features, NULL, "negotiated virtio features", NULL},
    {"offered_features", (getter)Device_get_offered_features, NULL, NULL, NULL},
    {"protocol_features", (getter)Device_get_protocol_features, NULL, "negotiated vhost-user protocol features", NULL},
    {"offered_protocol_features", (getter)Device_get_offered_protocol_features, NULL, NULL, NULL},
    {"num_queues", (getter)Device_get_num_queues, NULL, NULL, NULL},
    {"max_queues", (getter)Device_get_max_queues, NULL, NULL, NULL},
    {"queue_size", (getter)Device_get_queue_size, NULL, NULL, NULL},
    {"seg_max", (getter)Device_get_seg_max, NULL, "data segments per virtio request", NULL},
    {"size_max", (getter)Device_get_size_max, NULL, "bytes per segment", NULL},
    {"sock_fd", (getter)Device_get_sock_fd, NULL, NULL, NULL},
    {"call_fds", (getter)Device_get_call_fds, NULL, NULL, NULL},
    {"event_idx", (getter)Device_get_event_idx, NULL, NULL, NULL},
    {"poll", (getter)Device_get_poll, NULL, NULL, NULL},
    {"connected", (getter)Device_get_connected, NULL, NULL, NULL},
    {"error", (getter)Device_get_error, NULL, "last error message", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Device_methods[] = {
    {"enqueue", (PyCFunction)Device_enqueue, METH_VARARGS, "enqueue(q, type, offset, iovs, token, cursor) -> (staged, cursor, done)"},
    {"publish", (PyCFunction)Device_publish, METH_VARARGS, "publish(q) -> kicked"},
    {"reap", (PyCFunction)Device_reap, METH_VARARGS, "reap(q, drain=True) -> [(token, status, bytes, used_len)]"},
    {"poll", (PyCFunction)Device_poll, METH_VARARGS, "poll(spin_ns) -> bitmask of queues with completions"},
    {"check_alive", (PyCFunction)Device_check_alive, METH_NOARGS, "0, or -errno once the target has gone"},
    {"shutdown", (PyCFunction)Device_shutdown, METH_NOARGS, "GET_VRING_BASE on every ring, close all fds"},
    {"abort", (PyCFunction)Device_abort, METH_NOARGS, "close all fds without talking to the target"},
    {"set_memory", (PyCFunction)Device_set_memory, METH_VARARGS,
     "set_memory([(fd, address, size), ...]): extra regions; sends SET_MEM_TABLE again (no request may be outstanding)"},
    {"contains", (PyCFunction)Device_contains, METH_VARARGS, "contains(addr, len) -> in the data or an extra region"},
    {"queue_info", (PyCFunction)Device_queue_info, METH_VARARGS, "queue_info(q) -> dict"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DeviceType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvpool._vhost.Device",
    .tp_basicsize = sizeof(DeviceObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Device(path, region, queues=0, queue_size=256, poll=False, event_idx=True, timeout_ms=5000)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Device_init,
    .tp_dealloc = (destructor)Device_dealloc,
    .tp_getset = Device_getset,
    .tp_methods = Device_methods,
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "kvpool._vhost",
                                    "vhost-user-blk frontend (see kvpool/native/vhost_user.h)", -1,
                                    NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__vhost(void)
{
    if (PyType_Ready(&RegionType) < 0 || PyType_Ready(&DeviceType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m)
        return NULL;
    VhostError = PyErr_NewException("kvpool._vhost.VhostError", PyExc_OSError, NULL);
    Py_INCREF(&RegionType);
    Py_INCREF(&DeviceType);
    if (PyModule_AddObject(m, "Region", (PyObject *)&RegionType) < 0 ||
        PyModule_AddObject(m, "Device", (PyObject *)&DeviceType) < 0 ||
        PyModule_AddObject(m, "VhostError", VhostError) < 0 ||
        PyModule_AddIntConstant(m, "OP_READ", VU_OP_READ) < 0 || PyModule_AddIntConstant(m, "OP_WRITE", VU_OP_WRITE) < 0 ||
        PyModule_AddIntConstant(m, "OP_FLUSH", VU_OP_FLUSH) < 0 ||
        PyModule_AddIntConstant(m, "OP_GET_ID", VU_OP_GET_ID) < 0 ||
        PyModule_AddIntConstant(m, "S_OK", VIRTIO_BLK_S_OK) < 0 ||
        PyModule_AddIntConstant(m, "S_IOERR", VIRTIO_BLK_S_IOERR) < 0 ||
        PyModule_AddIntConstant(m, "S_UNSUPP", VIRTIO_BLK_S_UNSUPP) < 0 ||
        PyModule_AddIntConstant(m, "F_BLK_RO", VIRTIO_BLK_F_RO) < 0 ||
        PyModule_AddIntConstant(m, "F_BLK_FLUSH", VIRTIO_BLK_F_FLUSH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
