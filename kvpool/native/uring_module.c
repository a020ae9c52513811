/*
 * kvpool._uring -- the CPython glue over the io_uring ring (uring_ring.c) and
 * op encoding (uring_ops.c).
 *
 * This file turns Python op tuples into kv_op structs, maps kv_err and errno
 * values to the exceptions the module has always raised, owns the exported
 * buffer views of registered buffers, and makes a Ring safe to use from
 * several Python threads: every ring call runs under a per-Ring lock, and the
 * GIL is released around blocking syscalls through the ring's block hooks.
 * wait() does not hold the lock while blocked in the kernel, so another
 * thread may submit or reap meanwhile.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "uring_ops.h"
#include "uring_ring.h"

/* Raise OSError(e, "<what>: <strerror>") -- the OSError constructor picks the
 * matching subclass (FileNotFoundError, PermissionError, ...). */
static PyObject *
set_oserror(int e, const char *what)
{
    char buf[256];
    char tmp[128];
    const char *msg = strerror_r(e, tmp, sizeof(tmp)); /* GNU variant */
    snprintf(buf, sizeof(buf), "%s: %s", what, msg);
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", e, buf);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static void
set_kv_err(const kv_err *e)
{
    if (e->kind == KV_ERR_NOMEM)
        PyErr_NoMemory();
    else
        PyErr_SetString(e->kind == KV_ERR_TYPE ? PyExc_TypeError : PyExc_ValueError, e->msg);
}

/* GIL hooks for the ring's blocking syscalls */
static void *
gil_release(void)
{
    return PyEval_SaveThread();
}

static void
gil_acquire(void *tok)
{
    PyEval_RestoreThread((PyThreadState *)tok);
}

/* ---------------------------------------------------------------------- */
/* Ring object                                                              */

typedef struct {
    PyObject_HEAD
    kv_ring r;
    Py_buffer *views; /* exports of the registered buffers, released on unregister/close */
    Py_ssize_t nr_views;

    /* concurrency */
    PyThread_type_lock lock;
    unsigned long lock_owner;
    unsigned waiters; /* threads blocked in wait() without the lock */
} RingObject;

static PyTypeObject Ring_Type;

static int
ring_lock(RingObject *self)
{
    unsigned long me = PyThread_get_thread_ident();
    if (__atomic_load_n(&self->lock_owner, __ATOMIC_RELAXED) == me) {
        PyErr_SetString(PyExc_RuntimeError, "re-entrant use of an io_uring Ring from the same thread");
        return -1;
    }
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(self->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
    __atomic_store_n(&self->lock_owner, me, __ATOMIC_RELAXED);
    return 0;
}

static void
ring_unlock(RingObject *self)
{
    __atomic_store_n(&self->lock_owner, 0UL, __ATOMIC_RELAXED);
    PyThread_release_lock(self->lock);
}

static int
check_open(RingObject *self)
{
    if (self->r.closed) {
        PyErr_SetString(PyExc_ValueError, "I/O operation on closed io_uring Ring");
        return -1;
    }
    return 0;
}

static void
release_views(RingObject *self)
{
    if (self->views != NULL) {
        for (Py_ssize_t i = 0; i < self->nr_views; i++)
            PyBuffer_Release(&self->views[i]);
        PyMem_Free(self->views);
    }
    self->views = NULL;
    self->nr_views = 0;
}

static void
teardown(RingObject *self)
{
    kv_ring_teardown(&self->r);
    release_views(self);
}

/* --- construction ------------------------------------------------------ */

static PyObject *
Ring_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"entries", "sqpoll", "sq_thread_idle_ms", NULL};
    int entries = 256, sqpoll = 0, idle_ms = 50;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|ipi:Ring", kwlist, &entries, &sqpoll, &idle_ms))
        return NULL;
    if (entries < 1 || (unsigned)entries > KV_MAX_ENTRIES) {
        PyErr_Format(PyExc_ValueError, "entries must be in [1, %u], got %d", KV_MAX_ENTRIES, entries);
        return NULL;
    }
    if (idle_ms < 0) {
        PyErr_SetString(PyExc_ValueError, "sq_thread_idle_ms must be >= 0");
        return NULL;
    }

    RingObject *self = (RingObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    kv_ring_init(&self->r); /* closed until set up: teardown is safe at any point */
    self->r.block_begin = gil_release;
    self->r.block_end = gil_acquire;
    self->lock = PyThread_allocate_lock();
    if (self->lock == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    const char *what = NULL;
    int rc = kv_ring_setup(&self->r, (unsigned)entries, sqpoll, (unsigned)idle_ms, &what);
    if (rc < 0) {
        if (what == NULL)
            PyErr_NoMemory();
        else
            set_oserror(-rc, what);
        goto fail;
    }
    return (PyObject *)self;

fail:
    teardown(self);
    Py_DECREF(self); /* Ring_dealloc sees closed == 1 */
    return NULL;
}

static void
Ring_dealloc(RingObject *self)
{
    if (!self->r.closed) {
        /* Never free memory the kernel may still use: let in-flight ops finish. */
        if (self->r.in_kernel > 0)
            kv_ring_wait_all_discard(&self->r);
        teardown(self);
    }
    if (self->lock != NULL)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* --- op parsing -------------------------------------------------------- */

/* Convert an exact Python int to uint64 in [0, max]; TypeError for non-ints,
 * ValueError when out of range (including negative). */
static int
get_u64(PyObject *o, Py_ssize_t idx, const char *what, uint64_t max, uint64_t *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "op %zd: %s must be an int, not %.100s", idx, what, Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "op %zd: %s out of range: %R", idx, what, o);
        return -1;
    }
    if ((uint64_t)v > max) {
        PyErr_Format(PyExc_ValueError, "op %zd: %s out of range: %R (max %llu)", idx, what, o,
                     (unsigned long long)max);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* ('iov', [(address, length), ...]) -> op->iov (malloc'ed: the ring frees it) */
static int
parse_iov(PyObject *list, Py_ssize_t idx, kv_op *op)
{
    if (!PyList_Check(list) && !PyTuple_Check(list)) {
        PyErr_Format(PyExc_TypeError, "op %zd: iov buffer must be a list of (address, length) tuples", idx);
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(list);
    if (n < 1 || n > UIO_MAXIOV) {
        PyErr_Format(PyExc_ValueError, "op %zd: iov list must have 1..%d entries, got %zd", idx, UIO_MAXIOV, n);
        return -1;
    }
    struct iovec *iov = malloc((size_t)n * sizeof(struct iovec));
    if (iov == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PySequence_Fast_GET_ITEM(list, i);
        uint64_t addr, len;
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 2) {
            PyErr_Format(PyTuple_Check(e) ? PyExc_ValueError : PyExc_TypeError,
                         "op %zd: iov entry %zd must be an (address, length) tuple", idx, i);
            goto fail;
        }
        if (get_u64(PyTuple_GET_ITEM(e, 0), idx, "iov address", UINTPTR_MAX, &addr) < 0 ||
            get_u64(PyTuple_GET_ITEM(e, 1), idx, "iov length", SSIZE_MAX, &len) < 0)
            goto fail;
        total += len;
        if (total > SSIZE_MAX) {
            PyErr_Format(PyExc_ValueError, "op %zd: total iov length overflows ssize_t", idx);
            goto fail;
        }
        iov[i].iov_base = (void *)(uintptr_t)addr;
        iov[i].iov_len = (size_t)len;
    }
    op->buf = KV_BUF_IOV;
    op->iov = iov;
    op->iov_len = (size_t)n;
    return 0;
fail:
    free(iov);
    return -1;
}

/* Parse the buffer spec (item 4) of an op whose kind and file were checked. */
static int
parse_spec(PyObject *spec, Py_ssize_t idx, kv_op *op)
{
    if (op->kind == KV_OP_CANCEL)
        return get_u64(spec, idx, "cancel target user_data", UINT64_MAX, &op->target_user_data);
    if (op->kind == KV_OP_FSYNC) {
        if (spec != Py_None) {
            PyErr_Format(PyExc_ValueError, "op %zd: fsync takes None as buffer", idx);
            return -1;
        }
        return 0;
    }
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) < 1) {
        PyErr_Format(PyExc_TypeError,
                     "op %zd: buffer must be ('fixed', buf_index, buf_offset, length) or "
                     "('iov', [(address, length), ...])", idx);
        return -1;
    }
    PyObject *tag = PyTuple_GET_ITEM(spec, 0);
    if (PyUnicode_Check(tag) && PyUnicode_CompareWithASCIIString(tag, "fixed") == 0) {
        if (PyTuple_GET_SIZE(spec) != 4) {
            PyErr_Format(PyExc_ValueError, "op %zd: expected ('fixed', buf_index, buf_offset, length)", idx);
            return -1;
        }
        if (get_u64(PyTuple_GET_ITEM(spec, 1), idx, "buf_index", UINT16_MAX, &op->buf_index) < 0 ||
            get_u64(PyTuple_GET_ITEM(spec, 2), idx, "buf_offset", INT64_MAX, &op->buf_offset) < 0 ||
            get_u64(PyTuple_GET_ITEM(spec, 3), idx, "length", UINT32_MAX, &op->length) < 0)
            return -1;
        op->buf = KV_BUF_FIXED;
        return 0;
    }
    if (PyUnicode_Check(tag) && PyUnicode_CompareWithASCIIString(tag, "iov") == 0) {
        if (PyTuple_GET_SIZE(spec) != 2) {
            PyErr_Format(PyExc_ValueError, "op %zd: expected ('iov', [(address, length), ...])", idx);
            return -1;
        }
        return parse_iov(PyTuple_GET_ITEM(spec, 1), idx, op);
    }
    PyErr_Format(PyExc_ValueError, "op %zd: buffer kind must be 'fixed' or 'iov', got %R", idx, tag);
    return -1;
}

/* Python tuple -> encoded op.  Must not run any Python code (it is called
 * with the ring lock held): only exact ints, tuples, lists and str tags are
 * inspected. */
static int
parse_op(RingObject *self, PyObject *obj, Py_ssize_t idx, kv_prep *p)
{
    kv_op op;
    kv_err e;
    memset(&op, 0, sizeof(op));
    memset(p, 0, sizeof(*p));
    if (!PyTuple_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "op %zd: must be a tuple, not %.100s", idx, Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (PyTuple_GET_SIZE(obj) != 5) {
        PyErr_Format(PyExc_ValueError,
                     "op %zd: expected (kind, user_data, file_index, file_offset, buffer), "
                     "got a tuple of %zd items", idx, PyTuple_GET_SIZE(obj));
        return -1;
    }
    if (get_u64(PyTuple_GET_ITEM(obj, 0), idx, "kind", UINT64_MAX, &op.kind) < 0 ||
        get_u64(PyTuple_GET_ITEM(obj, 1), idx, "user_data", UINT64_MAX, &op.user_data) < 0 ||
        get_u64(PyTuple_GET_ITEM(obj, 2), idx, "file_index", UINT32_MAX, &op.file_index) < 0 ||
        get_u64(PyTuple_GET_ITEM(obj, 3), idx, "file_offset", INT64_MAX, &op.file_offset) < 0)
        return -1;
    /* kind and file first, so a bad op reports the same error it always did */
    if (kv_op_check_target(&self->r, &op, idx, &e) < 0) {
        set_kv_err(&e);
        return -1;
    }
    if (parse_spec(PyTuple_GET_ITEM(obj, 4), idx, &op) < 0)
        return -1;
    if (kv_op_encode(&self->r, &op, idx, p, &e) < 0) {
        free(op.iov);
        set_kv_err(&e);
        return -1;
    }
    return 0;
}

static void
free_preps(kv_prep *ops, Py_ssize_t n)
{
    if (ops == NULL)
        return;
    kv_preps_release(ops, (size_t)n);
    PyMem_Free(ops);
}

/* Validate and convert a whole batch.  On success *out owns n kv_prep. */
static int
parse_batch(RingObject *self, PyObject *ops, kv_prep **out, Py_ssize_t *nout)
{
    *out = NULL;
    *nout = 0;
    if (!PyList_Check(ops) && !PyTuple_Check(ops)) {
        PyErr_Format(PyExc_TypeError, "ops must be a list of op tuples, not %.100s", Py_TYPE(ops)->tp_name);
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(ops);
    if (n == 0)
        return 0;
    kv_prep *arr = PyMem_Calloc((size_t)n, sizeof(kv_prep));
    if (arr == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (parse_op(self, PySequence_Fast_GET_ITEM(ops, i), i, &arr[i]) < 0) {
            free_preps(arr, i);
            return -1;
        }
    }
    *out = arr;
    *nout = n;
    return 0;
}

/* --- methods ----------------------------------------------------------- */

static PyObject *
Ring_submit(RingObject *self, PyObject *ops)
{
    kv_prep *preps = NULL;
    Py_ssize_t n = 0, done;
    int err = 0;
    if (ring_lock(self) < 0)
        return NULL;
    if (check_open(self) < 0)
        goto fail;
    if ((PyList_Check(ops) || PyTuple_Check(ops)) &&
        PySequence_Fast_GET_SIZE(ops) > (Py_ssize_t)self->r.sq_entries) {
        PyErr_Format(PyExc_ValueError, "batch of %zd ops exceeds ring entries (%u)", PySequence_Fast_GET_SIZE(ops),
                     self->r.sq_entries);
        goto fail;
    }
    if (parse_batch(self, ops, &preps, &n) < 0)
        goto fail;
    if (n == 0) {
        ring_unlock(self);
        return PyLong_FromLong(0);
    }
    int rc = kv_ring_slots_reserve(&self->r, (uint32_t)n);
    if (rc < 0) {
        if (rc == -EOVERFLOW)
            PyErr_SetString(PyExc_OverflowError, "too many operations in flight");
        else
            PyErr_NoMemory();
        goto fail;
    }
    done = kv_ring_submit(&self->r, preps, (size_t)n, &err);
    free_preps(preps, n); /* frees iovecs not moved into slots */
    preps = NULL;
    if (done < 0) {
        set_oserror(err, "io_uring_enter");
        goto fail;
    }
    ring_unlock(self);
    return PyLong_FromSsize_t(done);
fail:
    free_preps(preps, n);
    ring_unlock(self);
    return NULL;
}

static PyObject *
Ring_check(RingObject *self, PyObject *ops)
{
    kv_prep *preps = NULL;
    Py_ssize_t n = 0;
    if (ring_lock(self) < 0)
        return NULL;
    int rc = check_open(self) < 0 ? -1 : parse_batch(self, ops, &preps, &n);
    free_preps(preps, n);
    ring_unlock(self);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Ring_reap(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (ring_lock(self) < 0)
        return NULL;
    if (check_open(self) < 0)
        goto fail;
    int rc = kv_ring_reap(&self->r);
    if (rc == -ENOMEM) {
        PyErr_NoMemory();
        goto fail;
    }
    if (rc < 0) {
        set_oserror(-rc, "io_uring_enter(IORING_ENTER_GETEVENTS)");
        goto fail;
    }
    PyObject *list = PyList_New((Py_ssize_t)self->r.stash_len);
    if (list == NULL)
        goto fail;
    for (size_t i = 0; i < self->r.stash_len; i++) {
        PyObject *t = Py_BuildValue("(Ki)", (unsigned long long)self->r.stash[i].user_data,
                                    (int)self->r.stash[i].res);
        if (t == NULL) {
            Py_DECREF(list); /* completions stay stashed for the next reap */
            goto fail;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    self->r.stash_len = 0;
    ring_unlock(self);
    return list;
fail:
    ring_unlock(self);
    return NULL;
}

static PyObject *
Ring_wait(RingObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"min_complete", NULL};
    Py_ssize_t min_complete = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n:wait", kwlist, &min_complete))
        return NULL;
    if (min_complete < 0) {
        PyErr_SetString(PyExc_ValueError, "min_complete must be >= 0");
        return NULL;
    }
    if (ring_lock(self) < 0)
        return NULL;
    if (check_open(self) < 0) {
        ring_unlock(self);
        return NULL;
    }
    /* Stashed completions are already available; never wait for more than
     * what is actually in flight (that would block forever) nor for more
     * than the CQ ring can hold. */
    uint64_t target = (uint64_t)min_complete;
    uint64_t inflight = self->r.in_kernel + self->r.stash_len;
    if (target > inflight)
        target = inflight;
    if (target <= self->r.stash_len) {
        ring_unlock(self);
        Py_RETURN_NONE;
    }
    uint64_t need = target - self->r.stash_len;
    if (need > self->r.cq_entries)
        need = self->r.cq_entries;
    int fd = self->r.ring_fd; /* close() refuses while waiters > 0, so fd stays valid */
    self->waiters++;
    ring_unlock(self);

    PyObject *result = Py_None;
    for (;;) {
        int ret, e;
        Py_BEGIN_ALLOW_THREADS
        ret = kv_sys_enter(fd, 0, (unsigned)need, IORING_ENTER_GETEVENTS);
        e = errno;
        Py_END_ALLOW_THREADS
        if (ret >= 0 || e == EBUSY) /* EBUSY: CQ overflowing, i.e. full -> reap */
            break;
        if (e == EINTR || e == EAGAIN) {
            if (PyErr_CheckSignals() < 0) {
                result = NULL;
                break;
            }
            continue;
        }
        set_oserror(e, "io_uring_enter(IORING_ENTER_GETEVENTS)");
        result = NULL;
        break;
    }

    /* ring_lock() only fails on re-entrancy, impossible here: we released the
     * lock above in this very thread and have not re-taken it. */
    (void)ring_lock(self);
    self->waiters--;
    ring_unlock(self);
    if (result == NULL)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Ring_close(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (ring_lock(self) < 0)
        return NULL;
    while (!self->r.closed) {
        if (self->waiters > 0) {
            ring_unlock(self);
            PyErr_SetString(PyExc_RuntimeError, "cannot close a Ring while another thread waits on it or updates it");
            return NULL;
        }
        kv_ring_drain_cq(&self->r, 1);
        if (self->r.in_kernel == 0) {
            teardown(self);
            break;
        }
        uint64_t want = self->r.in_kernel < self->r.cq_entries ? self->r.in_kernel : self->r.cq_entries;
        int ret = kv_ring_enter(&self->r, 0, (unsigned)want, IORING_ENTER_GETEVENTS);
        if (ret >= 0 || ret == -EBUSY)
            continue;
        if (ret == -EINTR || ret == -EAGAIN) {
            /* run signal handlers without holding the ring lock */
            ring_unlock(self);
            if (PyErr_CheckSignals() < 0)
                return NULL;
            if (ring_lock(self) < 0)
                return NULL;
            continue;
        }
        /* Hard error (e.g. dead SQPOLL thread): tear down anyway; closing the
         * ring fd makes the kernel cancel what is left. */
        teardown(self);
    }
    ring_unlock(self);
    Py_RETURN_NONE;
}

/* --- registration ----------------------------------------------------- */

static PyObject *
Ring_register_files(RingObject *self, PyObject *fds)
{
    if (!PyList_Check(fds) && !PyTuple_Check(fds)) {
        PyErr_SetString(PyExc_TypeError, "fds must be a list of ints");
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fds);
    if (n < 1 || n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "fds must contain at least one descriptor");
        return NULL;
    }
    int32_t *arr = PyMem_Malloc((size_t)n * sizeof(int32_t));
    if (arr == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(fds, i);
        if (!PyLong_Check(o)) {
            PyErr_Format(PyExc_TypeError, "fds[%zd] must be an int", i);
            goto fail_nolock;
        }
        long v = PyLong_AsLong(o);
        if (v == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            v = LONG_MIN;
        }
        if (v < -1 || v > INT32_MAX) { /* -1 = sparse (empty) slot */
            PyErr_Format(PyExc_ValueError, "fds[%zd] is not a valid descriptor: %R", i, o);
            goto fail_nolock;
        }
        arr[i] = (int32_t)v;
    }
    if (ring_lock(self) < 0)
        goto fail_nolock;
    if (check_open(self) < 0)
        goto fail;
    if (self->r.files_registered) {
        PyErr_SetString(PyExc_RuntimeError, "files already registered; call unregister_files() first");
        goto fail;
    }
    int rc = kv_ring_register_files(&self->r, arr, (uint32_t)n);
    if (rc < 0) {
        set_oserror(-rc, "io_uring_register(IORING_REGISTER_FILES)");
        goto fail;
    }
    ring_unlock(self);
    PyMem_Free(arr);
    Py_RETURN_NONE;
fail:
    ring_unlock(self);
fail_nolock:
    PyMem_Free(arr);
    return NULL;
}

static PyObject *
unregister_common(RingObject *self, int files)
{
    if (ring_lock(self) < 0)
        return NULL;
    if (check_open(self) < 0)
        goto fail;
    if (!(files ? self->r.files_registered : self->r.bufs_registered)) {
        PyErr_SetString(PyExc_ValueError, files ? "no files registered" : "no buffers registered");
        goto fail;
    }
    if (self->r.in_kernel + self->r.stash_len > 0 || self->waiters > 0) {
        PyErr_SetString(PyExc_RuntimeError, "cannot unregister while operations or updates are in flight");
        goto fail;
    }
    int rc = files ? kv_ring_unregister_files(&self->r) : kv_ring_unregister_buffers(&self->r);
    if (rc < 0) {
        set_oserror(-rc, files ? "io_uring_register(IORING_UNREGISTER_FILES)"
                               : "io_uring_register(IORING_UNREGISTER_BUFFERS)");
        goto fail;
    }
    if (!files)
        release_views(self);
    ring_unlock(self);
    Py_RETURN_NONE;
fail:
    ring_unlock(self);
    return NULL;
}

static PyObject *
Ring_unregister_files(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    return unregister_common(self, 1);
}

static PyObject *
Ring_unregister_buffers(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    return unregister_common(self, 0);
}

static PyObject *
Ring_register_buffers(RingObject *self, PyObject *bufs)
{
    if (!PyList_Check(bufs) && !PyTuple_Check(bufs)) {
        PyErr_SetString(PyExc_TypeError, "bufs must be a list of writable buffers");
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(bufs);
    if (n < 1 || n > UINT16_MAX + 1) {
        PyErr_SetString(PyExc_ValueError, "bufs must contain 1..65536 buffers");
        return NULL;
    }
    /* Hold a strong reference to the sequence: acquiring buffers may run
     * arbitrary code that mutates a list. */
    PyObject *seq = PySequence_Tuple(bufs);
    if (seq == NULL)
        return NULL;
    Py_buffer *views = PyMem_Calloc((size_t)n, sizeof(Py_buffer));
    struct iovec *iov = PyMem_Calloc((size_t)n, sizeof(struct iovec));
    Py_ssize_t got = 0;
    if (views == NULL || iov == NULL) {
        PyErr_NoMemory();
        goto fail_nolock;
    }
    for (; got < n; got++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(seq, got), &views[got], PyBUF_WRITABLE) < 0) {
            if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_BufferError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_TypeError, "bufs[%zd] must be a writable, contiguous buffer", got);
            }
            goto fail_nolock;
        }
        if (views[got].len <= 0 || (uint64_t)views[got].len > KV_MAX_REG_BUF_LEN) {
            PyErr_Format(PyExc_ValueError, "bufs[%zd] has %zd bytes; registered buffers must be 1 B..1 GiB", got,
                         views[got].len);
            got++;
            goto fail_nolock;
        }
        iov[got].iov_base = views[got].buf;
        iov[got].iov_len = (size_t)views[got].len;
    }
    if (ring_lock(self) < 0)
        goto fail_nolock;
    if (check_open(self) < 0)
        goto fail;
    if (self->r.bufs_registered) {
        PyErr_SetString(PyExc_RuntimeError, "buffers already registered; call unregister_buffers() first");
        goto fail;
    }
    int rc = kv_ring_register_buffers(&self->r, iov, (uint32_t)n);
    if (rc == -ENOMEM) {
        PyErr_NoMemory();
        goto fail;
    }
    if (rc < 0) {
        set_oserror(-rc, "io_uring_register(IORING_REGISTER_BUFFERS)");
        goto fail;
    }
    self->views = views; /* exported until unregistered or closed */
    self->nr_views = n;
    ring_unlock(self);
    PyMem_Free(iov);
    Py_DECREF(seq);
    Py_RETURN_NONE;
fail:
    ring_unlock(self);
fail_nolock:
    if (views != NULL) {
        for (Py_ssize_t i = 0; i < got; i++)
            PyBuffer_Release(&views[i]);
        PyMem_Free(views);
    }
    PyMem_Free(iov);
    Py_DECREF(seq);
    return NULL;
}

/* A table of n empty slots, filled later with update_buffers() while ops run. */
static PyObject *
Ring_register_buffers_sparse(RingObject *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 1 || n > UINT16_MAX + 1) {
        PyErr_SetString(PyExc_ValueError, "a sparse buffer table has 1..65536 slots");
        return NULL;
    }
    Py_buffer *views = PyMem_Calloc((size_t)n, sizeof(Py_buffer)); /* obj NULL: an empty slot */
    if (views == NULL)
        return PyErr_NoMemory();
    if (ring_lock(self) < 0) {
        PyMem_Free(views);
        return NULL;
    }
    if (check_open(self) < 0)
        goto fail;
    if (self->r.bufs_registered) {
        PyErr_SetString(PyExc_RuntimeError, "buffers already registered; call unregister_buffers() first");
        goto fail;
    }
    int rc = kv_ring_register_buffers_sparse(&self->r, (uint32_t)n);
    if (rc == -ENOMEM) {
        PyErr_NoMemory();
        goto fail;
    }
    if (rc < 0) {
        set_oserror(-rc, "io_uring_register(IORING_REGISTER_BUFFERS2, IORING_RSRC_REGISTER_SPARSE)");
        goto fail;
    }
    self->views = views;
    self->nr_views = n;
    ring_unlock(self);
    Py_RETURN_NONE;
fail:
    ring_unlock(self);
    PyMem_Free(views);
    return NULL;
}

/* Fill one empty slot of a sparse table.  The pinning syscall runs with neither the GIL nor the ring lock
 * held, so the thread that submits and reaps carries on meanwhile (its io_uring_enter waits in the kernel
 * for the ring's mutex while the pages are pinned; ops already in flight complete).  The slot can be named
 * by fixed ops once this returns. */
static PyObject *
Ring_update_buffers(RingObject *self, PyObject *args)
{
    Py_ssize_t slot;
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "nO:update_buffers", &slot, &obj))
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_WRITABLE) < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_BufferError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "update_buffers needs a writable, contiguous buffer");
        }
        return NULL;
    }
    if (view.len <= 0 || (uint64_t)view.len > KV_MAX_REG_BUF_LEN) {
        PyErr_Format(PyExc_ValueError, "a buffer of %zd bytes; registered buffers must be 1 B..1 GiB", view.len);
        PyBuffer_Release(&view);
        return NULL;
    }
    if (ring_lock(self) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (check_open(self) < 0)
        goto fail;
    if (!self->r.bufs_registered || self->views == NULL || self->nr_views != (Py_ssize_t)self->r.nr_bufs) {
        PyErr_SetString(PyExc_ValueError, "no sparse buffer table registered");
        goto fail;
    }
    if (slot < 0 || slot >= self->nr_views) {
        PyErr_Format(PyExc_ValueError, "slot %zd out of range (%zd slots)", slot, self->nr_views);
        goto fail;
    }
    if (self->views[slot].obj != NULL) {
        PyErr_Format(PyExc_ValueError, "slot %zd is filled or being filled", slot);
        goto fail;
    }
    struct iovec iov = {view.buf, (size_t)view.len};
    self->views[slot] = view; /* exported from now on: the kernel pins this memory */
    int fd = self->r.ring_fd;  /* close() refuses while waiters > 0, so fd stays valid */
    self->waiters++;
    ring_unlock(self);

    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kv_sys_update_buffers(fd, (uint32_t)slot, &iov, 1);
    Py_END_ALLOW_THREADS

    (void)ring_lock(self); /* cannot fail: this thread released it above */
    self->waiters--;
    if (rc >= 0)
        rc = kv_ring_note_buffers(&self->r, (uint32_t)slot, &iov, 1);
    if (rc < 0) {
        memset(&self->views[slot], 0, sizeof(Py_buffer));
        ring_unlock(self);
        PyBuffer_Release(&view);
        return set_oserror(-rc, "io_uring_register(IORING_REGISTER_BUFFERS_UPDATE)");
    }
    ring_unlock(self);
    Py_RETURN_NONE;
fail:
    ring_unlock(self);
    PyBuffer_Release(&view);
    return NULL;
}

/* --- attributes -------------------------------------------------------- */

static PyObject *
Ring_get_eventfd(RingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(self->r.event_fd);
}

static PyObject *
Ring_get_entries(RingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(self->r.sq_entries);
}

static PyObject *
Ring_get_cq_entries(RingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(self->r.cq_entries);
}

static PyObject *
Ring_get_features(RingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(self->r.features);
}

static PyObject *
Ring_get_setup_flags(RingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(self->r.setup_flags);
}

static PyObject *
Ring_get_sqpoll(RingObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->r.sqpoll);
}

static PyObject *
Ring_get_closed(RingObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->r.closed);
}

static PyObject *
Ring_get_in_flight(RingObject *self, void *Py_UNUSED(c))
{
    /* plain read under the GIL; a racing submit in another thread may make
     * this momentarily stale, which is inherent to the value anyway */
    return PyLong_FromUnsignedLongLong((unsigned long long)(self->r.in_kernel + self->r.stash_len));
}

static PyGetSetDef Ring_getset[] = {
    {"eventfd", (getter)Ring_get_eventfd, NULL, "non-blocking eventfd signalled on completions (-1 once closed)", NULL},
    {"entries", (getter)Ring_get_entries, NULL, "SQ size (kernel-rounded to a power of two)", NULL},
    {"cq_entries", (getter)Ring_get_cq_entries, NULL, "CQ size", NULL},
    {"features", (getter)Ring_get_features, NULL, "io_uring_params.features", NULL},
    {"setup_flags", (getter)Ring_get_setup_flags, NULL, "IORING_SETUP_* flags the ring was created with", NULL},
    {"sqpoll", (getter)Ring_get_sqpoll, NULL, "whether the ring uses a kernel SQ polling thread", NULL},
    {"closed", (getter)Ring_get_closed, NULL, "whether close() has completed", NULL},
    {"in_flight", (getter)Ring_get_in_flight, NULL, "ops submitted and not yet returned by reap()", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Ring_methods[] = {
    {"register_files", (PyCFunction)Ring_register_files, METH_O,
     "register_files(fds) -> None\n\nIORING_REGISTER_FILES; ops name files by index. -1 is an empty slot."},
    {"unregister_files", (PyCFunction)Ring_unregister_files, METH_NOARGS, "unregister_files() -> None"},
    {"register_buffers", (PyCFunction)Ring_register_buffers, METH_O,
     "register_buffers(bufs) -> None\n\nIORING_REGISTER_BUFFERS; views stay exported until unregistered/closed."},
    {"unregister_buffers", (PyCFunction)Ring_unregister_buffers, METH_NOARGS, "unregister_buffers() -> None"},
    {"register_buffers_sparse", (PyCFunction)Ring_register_buffers_sparse, METH_O,
     "register_buffers_sparse(n) -> None\n\nA table of n empty buffer slots (IORING_REGISTER_BUFFERS2 with\n"
     "IORING_RSRC_REGISTER_SPARSE, Linux 5.19+), filled one by one with update_buffers()."},
    {"update_buffers", (PyCFunction)Ring_update_buffers, METH_VARARGS,
     "update_buffers(slot, buf) -> None\n\nIORING_REGISTER_BUFFERS_UPDATE of one empty slot (<= 1 GiB), with the GIL and\n"
     "the ring lock released while the kernel pins it (ops keep running); buf stays exported until\n"
     "unregistered/closed."},
    {"submit", (PyCFunction)Ring_submit, METH_O,
     "submit(ops) -> int\n\nValidate the whole batch, queue it and submit. Returns how many ops the kernel took\n"
     "(only fewer than len(ops) if it refused the rest; those were not queued).\n"
     "(OP_CANCEL, user_data, 0, 0, target_user_data) asks the kernel to cancel the in-flight op\n"
     "submitted with target_user_data; it completes with 0, -ENOENT (not in flight) or -EALREADY."},
    {"check", (PyCFunction)Ring_check, METH_O,
     "check(ops) -> None\n\nValidate a batch exactly like submit() without queueing anything (no size limit)."},
    {"reap", (PyCFunction)Ring_reap, METH_NOARGS,
     "reap() -> list[tuple[int, int]]\n\nNon-blocking: drain the eventfd and return every completion."},
    {"wait", (PyCFunction)(void (*)(void))Ring_wait, METH_VARARGS | METH_KEYWORDS,
     "wait(min_complete=1) -> None\n\nBlock (GIL released) until min_complete completions are reapable\n"
     "(clamped to the number in flight)."},
    {"close", (PyCFunction)Ring_close, METH_NOARGS,
     "close() -> None\n\nWait for in-flight ops (discarding their results), then tear down. Idempotent."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject Ring_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvpool._uring.Ring",
    .tp_basicsize = sizeof(RingObject),
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Ring(entries=256, sqpoll=False, sq_thread_idle_ms=50)\n\nAn io_uring instance with an eventfd.",
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
    .tp_new = Ring_new,
};

/* --- module functions -------------------------------------------------- */

static PyObject *
uring_probe(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(ignored))
{
    unsigned char supported[KV_PROBE_OPS];
    unsigned features = 0;
    int sqpoll_ok = 0;
    const char *what = NULL;
    int rc = kv_probe(supported, &features, &sqpoll_ok, &what);
    if (rc < 0) {
        if (what == NULL)
            return PyErr_NoMemory();
        return set_oserror(-rc, what);
    }
    PyObject *ops = PySet_New(NULL);
    if (ops == NULL)
        return NULL;
    for (int i = 0; i < KV_PROBE_OPS; i++) {
        if (!supported[i])
            continue;
        PyObject *v = PyLong_FromLong(i);
        if (v == NULL || PySet_Add(ops, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(ops);
            return NULL;
        }
        Py_DECREF(v);
    }
    PyObject *result = Py_BuildValue("{s:I,s:O,s:O}", "kernel_features", features, "ops", ops, "sqpoll",
                                     sqpoll_ok ? Py_True : Py_False);
    Py_DECREF(ops);
    return result;
}

static PyMethodDef module_methods[] = {
    {"probe", (PyCFunction)uring_probe, METH_NOARGS,
     "probe() -> dict\n\n{'kernel_features': int, 'ops': set[int] (supported IORING_OP_*), 'sqpoll': bool}"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef uring_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kvpool._uring",
    .m_doc = "Raw-syscall io_uring binding for kvpool (no liburing).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__uring(void)
{
    if (PyType_Ready(&Ring_Type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&uring_module);
    if (m == NULL)
        return NULL;
    struct {
        const char *name;
        long value;
    } consts[] = {
        {"OP_READ", KV_OP_READ},
        {"OP_WRITE", KV_OP_WRITE},
        {"OP_FSYNC", KV_OP_FSYNC},
        {"OP_CANCEL", KV_OP_CANCEL},
        /* kernel opcodes, for checking probe()['ops'] */
        {"IORING_OP_READV", IORING_OP_READV},
        {"IORING_OP_WRITEV", IORING_OP_WRITEV},
        {"IORING_OP_FSYNC", IORING_OP_FSYNC},
        {"IORING_OP_READ_FIXED", IORING_OP_READ_FIXED},
        {"IORING_OP_WRITE_FIXED", IORING_OP_WRITE_FIXED},
        {"IORING_OP_ASYNC_CANCEL", IORING_OP_ASYNC_CANCEL},
        {"IORING_FEAT_SINGLE_MMAP", IORING_FEAT_SINGLE_MMAP},
        {"IORING_FEAT_NODROP", IORING_FEAT_NODROP},
        {"IORING_FEAT_SUBMIT_STABLE", IORING_FEAT_SUBMIT_STABLE},
        {"IORING_SETUP_SQPOLL", IORING_SETUP_SQPOLL},
        {"IORING_SETUP_CQSIZE", IORING_SETUP_CQSIZE},
        {"IORING_SETUP_SUBMIT_ALL", IORING_SETUP_SUBMIT_ALL},
    };
    for (size_t i = 0; i < sizeof(consts) / sizeof(consts[0]); i++) {
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0)
            goto fail;
    }
    Py_INCREF(&Ring_Type);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&Ring_Type) < 0) {
        Py_DECREF(&Ring_Type);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
