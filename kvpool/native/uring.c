/*
 * kvpool._uring -- a minimal, dependency-free io_uring binding for kvpool.
 *
 * Only the kernel uapi header <linux/io_uring.h> and raw syscalls are used
 * (no liburing).  The module targets Linux 5.15+ and probes newer features
 * (IORING_SETUP_SUBMIT_ALL, IORING_ENTER_SQ_WAIT, ...) before relying on them.
 *
 * Design notes
 * ------------
 *  * Every SQE carries an internal *slot* index as its user_data.  The slot
 *    remembers the caller's 64-bit user_data and owns any heap memory the
 *    kernel may still read (the iovec array of READV/WRITEV).  The slot and
 *    its memory are released when the matching CQE is consumed, so the
 *    caller's user_data is returned verbatim by reap().
 *  * Completions pulled out of the CQ ring but not yet handed to Python (for
 *    instance while relieving CQ backpressure inside submit()) are kept in a
 *    small "stash" that reap() returns first, so no completion is ever lost.
 *  * All ring state is protected by a per-Ring lock so that concurrent use
 *    from several Python threads is safe (the GIL is released around
 *    io_uring_enter).  wait() does not hold the lock while blocked in the
 *    kernel, so another thread may submit or reap meanwhile.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>

#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <linux/io_uring.h>

/* ---------------------------------------------------------------------- */
/* Compatibility with older uapi headers (values are ABI and never change). */

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426
#endif
#ifndef __NR_io_uring_register
#define __NR_io_uring_register 427
#endif
#ifndef IORING_SETUP_SUBMIT_ALL
#define IORING_SETUP_SUBMIT_ALL (1U << 7) /* 5.18 */
#endif
#ifndef IORING_ENTER_SQ_WAIT
#define IORING_ENTER_SQ_WAIT (1U << 2) /* 5.10 */
#endif
#ifndef IORING_SQ_CQ_OVERFLOW
#define IORING_SQ_CQ_OVERFLOW (1U << 1)
#endif
#ifndef IO_URING_OP_SUPPORTED
#define IO_URING_OP_SUPPORTED (1U << 0)
#endif
#ifndef UIO_MAXIOV
#define UIO_MAXIOV 1024
#endif

#define KV_OP_READ 0
#define KV_OP_WRITE 1
#define KV_OP_FSYNC 2

#define KV_MAX_ENTRIES 32768u           /* IORING_MAX_ENTRIES */
#define KV_MAX_REG_BUF_LEN (1ull << 30) /* kernel limit per registered buffer */
#define KV_PROBE_OPS 256
#define KV_ENTER_RETRIES 64
#define KV_NO_SLOT UINT32_MAX

/* ---------------------------------------------------------------------- */
/* Raw syscalls.  They return -1 and set errno on failure.                  */

static int
sys_io_uring_setup(unsigned entries, struct io_uring_params *p)
{
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int
sys_io_uring_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags)
{
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL,
                        (size_t)(_NSIG / 8));
}

static int
sys_io_uring_register(int fd, unsigned opcode, const void *arg, unsigned nr_args)
{
    return (int)syscall(__NR_io_uring_register, fd, opcode, arg, nr_args);
}

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

/* ---------------------------------------------------------------------- */
/* Ring object                                                              */

typedef struct {
    uint64_t user_data;  /* caller's user_data */
    struct iovec *iov;   /* owned; freed when the CQE is consumed */
    uint32_t next_free;  /* free-list link */
    uint32_t used;
} slot_t;

typedef struct {
    uint64_t user_data;
    int32_t res;
} done_t;

typedef struct {
    uint8_t opcode;      /* IORING_OP_* */
    uint16_t buf_index;
    uint32_t file_index;
    uint32_t len;
    uint64_t user_data;
    uint64_t off;
    uint64_t addr;
    struct iovec *iov;   /* owned until moved into a slot */
} prep_t;

typedef struct {
    PyObject_HEAD
    int ring_fd;
    int event_fd;
    int closed;
    int sqpoll;
    unsigned setup_flags;
    unsigned features;
    unsigned sq_entries;
    unsigned cq_entries;

    /* mappings */
    void *sq_ring;
    size_t sq_ring_sz;
    void *cq_ring; /* == sq_ring with IORING_FEAT_SINGLE_MMAP */
    size_t cq_ring_sz;
    struct io_uring_sqe *sqes;
    size_t sqes_sz;

    /* submission queue */
    unsigned *sq_khead;
    unsigned *sq_ktail;
    unsigned *sq_kflags;
    unsigned *sq_array;
    unsigned sq_mask;
    unsigned sq_tail; /* our copy of the published tail */

    /* completion queue */
    unsigned *cq_khead;
    unsigned *cq_ktail;
    struct io_uring_cqe *cqes;
    unsigned cq_mask;

    /* registrations */
    int files_registered;
    uint32_t nr_files;
    Py_buffer *bufs;
    Py_ssize_t nr_bufs;
    int bufs_registered;

    /* per-op state */
    slot_t *slots;
    uint32_t nslots;
    uint32_t nfree;
    uint32_t free_head;
    done_t *stash;
    size_t stash_len;
    size_t stash_cap;
    uint64_t in_kernel; /* submitted and not yet consumed from the CQ */

    /* concurrency */
    PyThread_type_lock lock;
    unsigned long lock_owner;
    unsigned waiters; /* threads blocked in wait() without the lock */
} RingObject;

static PyTypeObject Ring_Type;

/* --- locking ----------------------------------------------------------- */

static int
ring_lock(RingObject *self)
{
    unsigned long me = PyThread_get_thread_ident();
    if (__atomic_load_n(&self->lock_owner, __ATOMIC_RELAXED) == me) {
        PyErr_SetString(PyExc_RuntimeError,
                        "re-entrant use of an io_uring Ring from the same thread");
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
    if (self->closed) {
        PyErr_SetString(PyExc_ValueError, "I/O operation on closed io_uring Ring");
        return -1;
    }
    return 0;
}

/* --- slots ------------------------------------------------------------- */

static int
slots_reserve(RingObject *self, uint32_t n)
{
    if (self->nfree >= n)
        return 0;
    uint64_t want = (uint64_t)self->nslots + (n - self->nfree);
    uint64_t newcap = self->nslots ? (uint64_t)self->nslots * 2 : 64;
    if (newcap < want)
        newcap = want;
    if (newcap >= KV_NO_SLOT) {
        PyErr_SetString(PyExc_OverflowError, "too many operations in flight");
        return -1;
    }
    slot_t *ns = PyMem_RawRealloc(self->slots, (size_t)newcap * sizeof(slot_t));
    if (ns == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    /* link the new slots into the free list */
    for (uint32_t i = (uint32_t)newcap; i-- > self->nslots;) {
        ns[i].user_data = 0;
        ns[i].iov = NULL;
        ns[i].used = 0;
        ns[i].next_free = self->free_head;
        self->free_head = i;
    }
    self->nfree += (uint32_t)newcap - self->nslots;
    self->nslots = (uint32_t)newcap;
    self->slots = ns;
    return 0;
}

static uint32_t
slot_take(RingObject *self, prep_t *p)
{
    uint32_t idx = self->free_head;
    slot_t *s = &self->slots[idx];
    self->free_head = s->next_free;
    self->nfree--;
    s->used = 1;
    s->user_data = p->user_data;
    s->iov = p->iov; /* ownership moves to the slot */
    p->iov = NULL;
    return idx;
}

static void
slot_release(RingObject *self, uint32_t idx)
{
    slot_t *s = &self->slots[idx];
    PyMem_RawFree(s->iov);
    s->iov = NULL;
    s->used = 0;
    s->next_free = self->free_head;
    self->free_head = idx;
    self->nfree++;
}

/* --- completion queue -------------------------------------------------- */

static int
stash_reserve(RingObject *self, size_t extra)
{
    if (self->stash_cap - self->stash_len >= extra)
        return 0;
    size_t newcap = self->stash_cap ? self->stash_cap * 2 : 64;
    while (newcap < self->stash_len + extra)
        newcap *= 2;
    done_t *ns = PyMem_RawRealloc(self->stash, newcap * sizeof(done_t));
    if (ns == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->stash = ns;
    self->stash_cap = newcap;
    return 0;
}

/* Move every available CQE out of the CQ ring, releasing its slot.  With
 * discard=0 the completions are appended to the stash; with discard=1 they are
 * dropped (used while tearing down).  Returns the number consumed or -1 (with
 * a Python exception set; nothing consumed). */
static Py_ssize_t
drain_cq(RingObject *self, int discard)
{
    unsigned head = *self->cq_khead; /* only we write the head */
    unsigned tail = __atomic_load_n(self->cq_ktail, __ATOMIC_ACQUIRE);
    unsigned n = tail - head;
    if (n == 0)
        return 0;
    if (!discard && stash_reserve(self, n) < 0)
        return -1;
    for (; head != tail; head++) {
        const struct io_uring_cqe *cqe = &self->cqes[head & self->cq_mask];
        uint64_t slot = cqe->user_data;
        if (slot >= self->nslots || !self->slots[slot].used)
            continue; /* not ours (cannot happen); never touch foreign state */
        if (!discard) {
            self->stash[self->stash_len].user_data = self->slots[slot].user_data;
            self->stash[self->stash_len].res = cqe->res;
            self->stash_len++;
        }
        slot_release(self, (uint32_t)slot);
        self->in_kernel--;
    }
    __atomic_store_n(self->cq_khead, tail, __ATOMIC_RELEASE);
    return (Py_ssize_t)n;
}

static int
cq_overflow_pending(RingObject *self)
{
    return (__atomic_load_n(self->sq_kflags, __ATOMIC_ACQUIRE) & IORING_SQ_CQ_OVERFLOW) != 0;
}

static void
drain_eventfd(RingObject *self)
{
    uint64_t v;
    for (;;) {
        ssize_t r = read(self->event_fd, &v, sizeof(v));
        if (r >= 0 || errno != EINTR)
            return; /* EAGAIN: counter already zero */
    }
}

/* --- teardown ---------------------------------------------------------- */

static void
release_buffers(RingObject *self)
{
    if (self->bufs != NULL) {
        for (Py_ssize_t i = 0; i < self->nr_bufs; i++)
            PyBuffer_Release(&self->bufs[i]);
        PyMem_Free(self->bufs);
    }
    self->bufs = NULL;
    self->nr_bufs = 0;
    self->bufs_registered = 0;
}

/* Wait (GIL released) until every submitted op has completed, discarding the
 * completions.  Gives up on hard errors: closing the ring fd then makes the
 * kernel cancel whatever is left. */
static void
wait_all_discard(RingObject *self)
{
    int spins = 0;
    while (self->in_kernel > 0) {
        drain_cq(self, 1);
        if (self->in_kernel == 0)
            break;
        uint64_t want = self->in_kernel < self->cq_entries ? self->in_kernel : self->cq_entries;
        int ret, err;
        Py_BEGIN_ALLOW_THREADS
        ret = sys_io_uring_enter(self->ring_fd, 0, (unsigned)want, IORING_ENTER_GETEVENTS);
        err = errno;
        Py_END_ALLOW_THREADS
        if (ret < 0 && err != EINTR) {
            if ((err == EAGAIN || err == EBUSY) && ++spins < KV_ENTER_RETRIES) {
                sched_yield();
                continue;
            }
            break;
        }
    }
}

static void
ring_teardown(RingObject *self)
{
    if (self->sqes != NULL && self->sqes != MAP_FAILED)
        munmap(self->sqes, self->sqes_sz);
    if (self->cq_ring != NULL && self->cq_ring != MAP_FAILED && self->cq_ring != self->sq_ring)
        munmap(self->cq_ring, self->cq_ring_sz);
    if (self->sq_ring != NULL && self->sq_ring != MAP_FAILED)
        munmap(self->sq_ring, self->sq_ring_sz);
    self->sqes = NULL;
    self->cq_ring = NULL;
    self->sq_ring = NULL;
    if (self->ring_fd >= 0)
        close(self->ring_fd);
    self->ring_fd = -1;
    if (self->event_fd >= 0)
        close(self->event_fd);
    self->event_fd = -1;
    release_buffers(self);
    self->files_registered = 0;
    self->nr_files = 0;
    if (self->slots != NULL) {
        for (uint32_t i = 0; i < self->nslots; i++)
            PyMem_RawFree(self->slots[i].iov);
        PyMem_RawFree(self->slots);
    }
    self->slots = NULL;
    self->nslots = self->nfree = 0;
    self->free_head = KV_NO_SLOT;
    PyMem_RawFree(self->stash);
    self->stash = NULL;
    self->stash_len = self->stash_cap = 0;
    self->in_kernel = 0;
    self->closed = 1;
}

/* --- construction ------------------------------------------------------ */

static int
ring_map(RingObject *self, const struct io_uring_params *p)
{
    size_t sq_sz = p->sq_off.array + p->sq_entries * sizeof(unsigned);
    size_t cq_sz = p->cq_off.cqes + p->cq_entries * sizeof(struct io_uring_cqe);
    int single = (p->features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single) {
        if (cq_sz > sq_sz)
            sq_sz = cq_sz;
        cq_sz = sq_sz;
    }
    self->sq_ring = mmap(NULL, sq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                         self->ring_fd, IORING_OFF_SQ_RING);
    if (self->sq_ring == MAP_FAILED) {
        self->sq_ring = NULL;
        return -1;
    }
    self->sq_ring_sz = sq_sz;
    if (single) {
        self->cq_ring = self->sq_ring;
    } else {
        self->cq_ring = mmap(NULL, cq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                             self->ring_fd, IORING_OFF_CQ_RING);
        if (self->cq_ring == MAP_FAILED) {
            self->cq_ring = NULL;
            return -1;
        }
    }
    self->cq_ring_sz = cq_sz;
    self->sqes_sz = p->sq_entries * sizeof(struct io_uring_sqe);
    self->sqes = mmap(NULL, self->sqes_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      self->ring_fd, IORING_OFF_SQES);
    if (self->sqes == MAP_FAILED) {
        self->sqes = NULL;
        return -1;
    }

    char *sq = self->sq_ring;
    char *cq = self->cq_ring;
    self->sq_khead = (unsigned *)(sq + p->sq_off.head);
    self->sq_ktail = (unsigned *)(sq + p->sq_off.tail);
    self->sq_kflags = (unsigned *)(sq + p->sq_off.flags);
    self->sq_array = (unsigned *)(sq + p->sq_off.array);
    self->sq_mask = *(unsigned *)(sq + p->sq_off.ring_mask);
    self->cq_khead = (unsigned *)(cq + p->cq_off.head);
    self->cq_ktail = (unsigned *)(cq + p->cq_off.tail);
    self->cqes = (struct io_uring_cqe *)(cq + p->cq_off.cqes);
    self->cq_mask = *(unsigned *)(cq + p->cq_off.ring_mask);

    /* identity SQ index array: SQE i lives at index i */
    for (unsigned i = 0; i < p->sq_entries; i++)
        self->sq_array[i] = i;
    self->sq_tail = __atomic_load_n(self->sq_ktail, __ATOMIC_ACQUIRE);
    return 0;
}

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
    /* tp_alloc zero-fills; set the non-zero sentinels before anything can fail */
    self->ring_fd = -1;
    self->event_fd = -1;
    self->free_head = KV_NO_SLOT;
    self->closed = 1; /* until fully set up: teardown is safe at any point */
    self->lock = PyThread_allocate_lock();
    if (self->lock == NULL) {
        PyErr_NoMemory();
        goto fail;
    }

    /* Optional setup flags, newest first; EINVAL means "not supported here". */
    unsigned base = sqpoll ? IORING_SETUP_SQPOLL : 0;
    const unsigned candidates[] = {
        base | IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL,
        base | IORING_SETUP_CQSIZE,
        base,
    };
    struct io_uring_params p;
    int fd = -1, err = 0;
    for (size_t i = 0; i < sizeof(candidates) / sizeof(candidates[0]); i++) {
        memset(&p, 0, sizeof(p));
        p.flags = candidates[i];
        if (p.flags & IORING_SETUP_CQSIZE)
            p.cq_entries = 2u * (unsigned)entries;
        if (sqpoll)
            p.sq_thread_idle = (unsigned)idle_ms;
        fd = sys_io_uring_setup((unsigned)entries, &p);
        if (fd >= 0)
            break;
        err = errno;
        if (err != EINVAL)
            break;
    }
    if (fd < 0) {
        set_oserror(err, sqpoll ? "io_uring_setup(IORING_SETUP_SQPOLL)" : "io_uring_setup");
        goto fail;
    }
    self->ring_fd = fd;
    self->setup_flags = p.flags;
    self->features = p.features;
    self->sq_entries = p.sq_entries;
    self->cq_entries = p.cq_entries;
    self->sqpoll = sqpoll ? 1 : 0;

    if (!(p.features & IORING_FEAT_NODROP)) {
        /* Without NODROP (kernel < 5.5) overflowing CQEs are silently lost. */
        set_oserror(ENOTSUP, "io_uring lacks IORING_FEAT_NODROP (kernel too old)");
        goto fail;
    }
    if (ring_map(self, &p) < 0) {
        set_oserror(errno, "mmap(io_uring)");
        goto fail;
    }

    self->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (self->event_fd < 0) {
        set_oserror(errno, "eventfd");
        goto fail;
    }
    if (sys_io_uring_register(self->ring_fd, IORING_REGISTER_EVENTFD, &self->event_fd, 1) < 0) {
        set_oserror(errno, "io_uring_register(IORING_REGISTER_EVENTFD)");
        goto fail;
    }
    self->closed = 0;
    if (slots_reserve(self, self->cq_entries) < 0)
        goto fail;
    return (PyObject *)self;

fail:
    ring_teardown(self);
    Py_DECREF(self); /* Ring_dealloc sees closed == 1 */
    return NULL;
}

static void
Ring_dealloc(RingObject *self)
{
    if (!self->closed) {
        /* Never free memory the kernel may still use: let in-flight ops finish. */
        if (self->in_kernel > 0)
            wait_all_discard(self);
        ring_teardown(self);
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
        PyErr_Format(PyExc_TypeError, "op %zd: %s must be an int, not %.100s", idx, what,
                     Py_TYPE(o)->tp_name);
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

static int
parse_iov(PyObject *list, Py_ssize_t idx, prep_t *p)
{
    if (!PyList_Check(list) && !PyTuple_Check(list)) {
        PyErr_Format(PyExc_TypeError, "op %zd: iov buffer must be a list of (address, length) tuples",
                     idx);
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(list);
    if (n < 1 || n > UIO_MAXIOV) {
        PyErr_Format(PyExc_ValueError, "op %zd: iov list must have 1..%d entries, got %zd", idx,
                     UIO_MAXIOV, n);
        return -1;
    }
    struct iovec *iov = PyMem_RawMalloc((size_t)n * sizeof(struct iovec));
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
    p->iov = iov;
    p->addr = (uint64_t)(uintptr_t)iov;
    p->len = (uint32_t)n;
    return 0;
fail:
    PyMem_RawFree(iov);
    return -1;
}

/* Must not run any Python code (it is called with the ring lock held). */
static int
parse_op(RingObject *self, PyObject *op, Py_ssize_t idx, prep_t *p)
{
    uint64_t kind, fidx;
    memset(p, 0, sizeof(*p));
    if (!PyTuple_Check(op)) {
        PyErr_Format(PyExc_TypeError, "op %zd: must be a tuple, not %.100s", idx, Py_TYPE(op)->tp_name);
        return -1;
    }
    if (PyTuple_GET_SIZE(op) != 5) {
        PyErr_Format(PyExc_ValueError,
                     "op %zd: expected (kind, user_data, file_index, file_offset, buffer), "
                     "got a tuple of %zd items", idx, PyTuple_GET_SIZE(op));
        return -1;
    }
    if (get_u64(PyTuple_GET_ITEM(op, 0), idx, "kind", UINT64_MAX, &kind) < 0 ||
        get_u64(PyTuple_GET_ITEM(op, 1), idx, "user_data", UINT64_MAX, &p->user_data) < 0 ||
        get_u64(PyTuple_GET_ITEM(op, 2), idx, "file_index", UINT32_MAX, &fidx) < 0 ||
        get_u64(PyTuple_GET_ITEM(op, 3), idx, "file_offset", INT64_MAX, &p->off) < 0)
        return -1;
    if (kind > KV_OP_FSYNC) {
        PyErr_Format(PyExc_ValueError, "op %zd: unknown op kind %llu", idx, (unsigned long long)kind);
        return -1;
    }
    if (!self->files_registered) {
        PyErr_Format(PyExc_ValueError, "op %zd: no files registered", idx);
        return -1;
    }
    if (fidx >= self->nr_files) {
        PyErr_Format(PyExc_ValueError, "op %zd: file_index %llu out of range (%u files registered)",
                     idx, (unsigned long long)fidx, self->nr_files);
        return -1;
    }
    p->file_index = (uint32_t)fidx;

    PyObject *spec = PyTuple_GET_ITEM(op, 4);
    if (kind == KV_OP_FSYNC) {
        if (spec != Py_None) {
            PyErr_Format(PyExc_ValueError, "op %zd: fsync takes None as buffer", idx);
            return -1;
        }
        if (p->off != 0) {
            PyErr_Format(PyExc_ValueError, "op %zd: fsync file_offset must be 0", idx);
            return -1;
        }
        p->opcode = IORING_OP_FSYNC;
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
        uint64_t bidx, boff, blen;
        if (PyTuple_GET_SIZE(spec) != 4) {
            PyErr_Format(PyExc_ValueError, "op %zd: expected ('fixed', buf_index, buf_offset, length)",
                         idx);
            return -1;
        }
        if (get_u64(PyTuple_GET_ITEM(spec, 1), idx, "buf_index", UINT16_MAX, &bidx) < 0 ||
            get_u64(PyTuple_GET_ITEM(spec, 2), idx, "buf_offset", INT64_MAX, &boff) < 0 ||
            get_u64(PyTuple_GET_ITEM(spec, 3), idx, "length", UINT32_MAX, &blen) < 0)
            return -1;
        if (!self->bufs_registered) {
            PyErr_Format(PyExc_ValueError, "op %zd: no buffers registered", idx);
            return -1;
        }
        if (bidx >= (uint64_t)self->nr_bufs) {
            PyErr_Format(PyExc_ValueError, "op %zd: buf_index %llu out of range (%zd buffers registered)",
                         idx, (unsigned long long)bidx, self->nr_bufs);
            return -1;
        }
        uint64_t blen_total = (uint64_t)self->bufs[bidx].len;
        if (boff > blen_total || blen > blen_total - boff) {
            PyErr_Format(PyExc_ValueError,
                         "op %zd: slice [%llu, %llu) out of range for registered buffer %llu of %llu bytes",
                         idx, (unsigned long long)boff, (unsigned long long)(boff + blen),
                         (unsigned long long)bidx, (unsigned long long)blen_total);
            return -1;
        }
        p->opcode = kind == KV_OP_READ ? IORING_OP_READ_FIXED : IORING_OP_WRITE_FIXED;
        p->buf_index = (uint16_t)bidx;
        p->addr = (uint64_t)(uintptr_t)self->bufs[bidx].buf + boff;
        p->len = (uint32_t)blen;
        return 0;
    }
    if (PyUnicode_Check(tag) && PyUnicode_CompareWithASCIIString(tag, "iov") == 0) {
        if (PyTuple_GET_SIZE(spec) != 2) {
            PyErr_Format(PyExc_ValueError, "op %zd: expected ('iov', [(address, length), ...])", idx);
            return -1;
        }
        p->opcode = kind == KV_OP_READ ? IORING_OP_READV : IORING_OP_WRITEV;
        return parse_iov(PyTuple_GET_ITEM(spec, 1), idx, p);
    }
    PyErr_Format(PyExc_ValueError, "op %zd: buffer kind must be 'fixed' or 'iov', got %R", idx, tag);
    return -1;
}

static void
free_preps(prep_t *ops, Py_ssize_t n)
{
    if (ops == NULL)
        return;
    for (Py_ssize_t i = 0; i < n; i++)
        PyMem_RawFree(ops[i].iov);
    PyMem_Free(ops);
}

/* Validate and convert a whole batch.  On success *out owns n prep_t. */
static int
parse_batch(RingObject *self, PyObject *ops, prep_t **out, Py_ssize_t *nout)
{
    *out = NULL;
    *nout = 0;
    if (!PyList_Check(ops) && !PyTuple_Check(ops)) {
        PyErr_Format(PyExc_TypeError, "ops must be a list of op tuples, not %.100s",
                     Py_TYPE(ops)->tp_name);
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(ops);
    if (n == 0)
        return 0;
    prep_t *arr = PyMem_Calloc((size_t)n, sizeof(prep_t));
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

/* --- submission -------------------------------------------------------- */

static void
fill_sqe(RingObject *self, prep_t *p)
{
    uint32_t slot = slot_take(self, p);
    struct io_uring_sqe *sqe = &self->sqes[self->sq_tail & self->sq_mask];
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = p->opcode;
    sqe->flags = IOSQE_FIXED_FILE;
    sqe->fd = (int32_t)p->file_index;
    sqe->off = p->off;
    sqe->addr = p->addr;
    sqe->len = p->len;
    if (p->opcode == IORING_OP_FSYNC)
        sqe->fsync_flags = IORING_FSYNC_DATASYNC;
    else if (p->opcode == IORING_OP_READ_FIXED || p->opcode == IORING_OP_WRITE_FIXED)
        sqe->buf_index = p->buf_index;
    sqe->user_data = slot;
    self->sq_tail++;
}

static void
publish_sq_tail(RingObject *self)
{
    /* SQE stores must be visible before the kernel sees the new tail */
    __atomic_store_n(self->sq_ktail, self->sq_tail, __ATOMIC_RELEASE);
}

/* Non-SQPOLL: the kernel consumes SQEs only inside io_uring_enter, so SQEs
 * that it did not take can be withdrawn again.  Returns the number consumed;
 * on failure with nothing consumed returns -1 and sets *err. */
static Py_ssize_t
submit_direct(RingObject *self, prep_t *ops, Py_ssize_t n, int *err)
{
    Py_ssize_t filled = 0, consumed = 0;
    int retries = 0;
    *err = 0;
    while (consumed < n) {
        unsigned head = __atomic_load_n(self->sq_khead, __ATOMIC_ACQUIRE);
        unsigned space = self->sq_entries - (self->sq_tail - head);
        while (space > 0 && filled < n) {
            fill_sqe(self, &ops[filled]);
            filled++;
            space--;
        }
        publish_sq_tail(self);
        unsigned pending = self->sq_tail - head;
        int ret, e;
        Py_BEGIN_ALLOW_THREADS
        ret = sys_io_uring_enter(self->ring_fd, pending, 0, 0);
        e = errno;
        Py_END_ALLOW_THREADS
        if (ret > 0) {
            consumed += ret;
            self->in_kernel += (uint64_t)ret;
            retries = 0;
            continue;
        }
        if (ret == 0)
            e = EAGAIN; /* nothing consumed, no error: transient */
        if (e == EINTR)
            continue;
        if ((e == EBUSY || e == EAGAIN) && ++retries <= KV_ENTER_RETRIES) {
            /* CQ backpressure (EBUSY) or transient allocation failure: move
             * completions to the stash so the kernel can flush its overflow
             * list, then retry. */
            if (drain_cq(self, 0) < 0) {
                PyErr_Clear();
                *err = ENOMEM;
                break;
            }
            if (retries > 1)
                sched_yield();
            continue;
        }
        *err = e;
        break;
    }
    if (consumed < filled) {
        /* withdraw SQEs the kernel did not consume */
        unsigned head = __atomic_load_n(self->sq_khead, __ATOMIC_ACQUIRE);
        for (unsigned i = head; i != self->sq_tail; i++)
            slot_release(self, (uint32_t)self->sqes[i & self->sq_mask].user_data);
        self->sq_tail = head;
        publish_sq_tail(self);
    }
    if (consumed == 0 && *err != 0)
        return -1;
    return consumed;
}

/* SQPOLL: published SQEs are owned by the kernel thread and cannot be
 * withdrawn; they count as submitted as soon as the tail is published. */
static Py_ssize_t
submit_sqpoll(RingObject *self, prep_t *ops, Py_ssize_t n, int *err)
{
    Py_ssize_t filled = 0;
    int sq_wait_ok = 1, retries = 0;
    *err = 0;
    while (filled < n) {
        unsigned head = __atomic_load_n(self->sq_khead, __ATOMIC_ACQUIRE);
        unsigned space = self->sq_entries - (self->sq_tail - head);
        if (space == 0) {
            /* SQ full: wait for the kernel thread to consume entries */
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            unsigned flags = (__atomic_load_n(self->sq_kflags, __ATOMIC_RELAXED) & IORING_SQ_NEED_WAKEUP)
                                 ? IORING_ENTER_SQ_WAKEUP
                                 : 0;
            if (sq_wait_ok)
                flags |= IORING_ENTER_SQ_WAIT;
            int ret, e;
            Py_BEGIN_ALLOW_THREADS
            ret = sys_io_uring_enter(self->ring_fd, 0, 0, flags);
            e = errno;
            if (ret < 0 && (e == EINVAL || e == EAGAIN || e == EBUSY))
                sched_yield();
            Py_END_ALLOW_THREADS
            if (ret < 0) {
                if (e == EINVAL && sq_wait_ok) {
                    sq_wait_ok = 0; /* kernel < 5.10: no IORING_ENTER_SQ_WAIT */
                } else if (e == EBUSY || e == EAGAIN) {
                    if (drain_cq(self, 0) < 0) {
                        PyErr_Clear();
                        *err = ENOMEM;
                        break;
                    }
                } else if (e != EINTR && e != EINVAL) {
                    *err = e;
                    break;
                }
                if (++retries > 100000) {
                    *err = EAGAIN;
                    break;
                }
            }
            continue;
        }
        Py_ssize_t start = filled;
        while (space > 0 && filled < n) {
            fill_sqe(self, &ops[filled]);
            filled++;
            space--;
        }
        publish_sq_tail(self);
        self->in_kernel += (uint64_t)(filled - start);
        /* full barrier between the tail store and the flags load */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(self->sq_kflags, __ATOMIC_RELAXED) & IORING_SQ_NEED_WAKEUP) {
            int ret, e;
            do {
                Py_BEGIN_ALLOW_THREADS
                ret = sys_io_uring_enter(self->ring_fd, 0, 0, IORING_ENTER_SQ_WAKEUP);
                e = errno;
                Py_END_ALLOW_THREADS
            } while (ret < 0 && e == EINTR);
            if (ret < 0) {
                *err = e; /* e.g. EOWNERDEAD: the SQ thread died */
                break;
            }
        }
    }
    if (filled == 0 && *err != 0)
        return -1;
    return filled;
}

/* --- methods ----------------------------------------------------------- */

static PyObject *
Ring_submit(RingObject *self, PyObject *ops)
{
    prep_t *preps = NULL;
    Py_ssize_t n = 0, done;
    int err = 0;
    if (ring_lock(self) < 0)
        return NULL;
    if (check_open(self) < 0)
        goto fail;
    if ((PyList_Check(ops) || PyTuple_Check(ops)) &&
        PySequence_Fast_GET_SIZE(ops) > (Py_ssize_t)self->sq_entries) {
        PyErr_Format(PyExc_ValueError, "batch of %zd ops exceeds ring entries (%u)",
                     PySequence_Fast_GET_SIZE(ops), self->sq_entries);
        goto fail;
    }
    if (parse_batch(self, ops, &preps, &n) < 0)
        goto fail;
    if (n == 0) {
        ring_unlock(self);
        return PyLong_FromLong(0);
    }
    if (slots_reserve(self, (uint32_t)n) < 0)
        goto fail;
    done = self->sqpoll ? submit_sqpoll(self, preps, n, &err) : submit_direct(self, preps, n, &err);
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
    prep_t *preps = NULL;
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
    /* Drain the eventfd first: a CQE posted after this point re-arms it. */
    drain_eventfd(self);
    for (int round = 0; round < 8; round++) {
        if (drain_cq(self, 0) < 0)
            goto fail;
        if (!cq_overflow_pending(self))
            break;
        /* Kernel holds overflowed CQEs (NODROP): flush them into the ring. */
        int ret, e;
        Py_BEGIN_ALLOW_THREADS
        ret = sys_io_uring_enter(self->ring_fd, 0, 0, IORING_ENTER_GETEVENTS);
        e = errno;
        Py_END_ALLOW_THREADS
        if (ret < 0 && e != EINTR && e != EAGAIN && e != EBUSY) {
            set_oserror(e, "io_uring_enter(IORING_ENTER_GETEVENTS)");
            goto fail;
        }
    }
    PyObject *list = PyList_New((Py_ssize_t)self->stash_len);
    if (list == NULL)
        goto fail;
    for (size_t i = 0; i < self->stash_len; i++) {
        PyObject *t = Py_BuildValue("(Ki)", (unsigned long long)self->stash[i].user_data,
                                    (int)self->stash[i].res);
        if (t == NULL) {
            Py_DECREF(list); /* completions stay stashed for the next reap */
            goto fail;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    self->stash_len = 0;
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
    uint64_t inflight = self->in_kernel + self->stash_len;
    if (target > inflight)
        target = inflight;
    if (target <= self->stash_len) {
        ring_unlock(self);
        Py_RETURN_NONE;
    }
    uint64_t need = target - self->stash_len;
    if (need > self->cq_entries)
        need = self->cq_entries;
    int fd = self->ring_fd;
    self->waiters++;
    ring_unlock(self);

    PyObject *result = Py_None;
    for (;;) {
        int ret, e;
        Py_BEGIN_ALLOW_THREADS
        ret = sys_io_uring_enter(fd, 0, (unsigned)need, IORING_ENTER_GETEVENTS);
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
    while (!self->closed) {
        if (self->waiters > 0) {
            ring_unlock(self);
            PyErr_SetString(PyExc_RuntimeError, "cannot close a Ring while another thread waits on it");
            return NULL;
        }
        drain_cq(self, 1);
        if (self->in_kernel == 0) {
            ring_teardown(self);
            break;
        }
        uint64_t want = self->in_kernel < self->cq_entries ? self->in_kernel : self->cq_entries;
        int ret, e;
        Py_BEGIN_ALLOW_THREADS
        ret = sys_io_uring_enter(self->ring_fd, 0, (unsigned)want, IORING_ENTER_GETEVENTS);
        e = errno;
        Py_END_ALLOW_THREADS
        if (ret >= 0 || e == EBUSY)
            continue;
        if (e == EINTR || e == EAGAIN) {
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
        ring_teardown(self);
    }
    ring_unlock(self);
    Py_RETURN_NONE;
}

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
    if (self->files_registered) {
        PyErr_SetString(PyExc_RuntimeError, "files already registered; call unregister_files() first");
        goto fail;
    }
    int ret, e;
    do {
        Py_BEGIN_ALLOW_THREADS
        ret = sys_io_uring_register(self->ring_fd, IORING_REGISTER_FILES, arr, (unsigned)n);
        e = errno;
        Py_END_ALLOW_THREADS
    } while (ret < 0 && e == EINTR);
    if (ret < 0) {
        set_oserror(e, "io_uring_register(IORING_REGISTER_FILES)");
        goto fail;
    }
    self->files_registered = 1;
    self->nr_files = (uint32_t)n;
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
    if (!(files ? self->files_registered : self->bufs_registered)) {
        PyErr_SetString(PyExc_ValueError, files ? "no files registered" : "no buffers registered");
        goto fail;
    }
    if (self->in_kernel + self->stash_len > 0) {
        PyErr_SetString(PyExc_RuntimeError, "cannot unregister while operations are in flight");
        goto fail;
    }
    int ret, e;
    unsigned op = files ? IORING_UNREGISTER_FILES : IORING_UNREGISTER_BUFFERS;
    do {
        Py_BEGIN_ALLOW_THREADS
        ret = sys_io_uring_register(self->ring_fd, op, NULL, 0);
        e = errno;
        Py_END_ALLOW_THREADS
    } while (ret < 0 && e == EINTR);
    if (ret < 0) {
        set_oserror(e, files ? "io_uring_register(IORING_UNREGISTER_FILES)"
                             : "io_uring_register(IORING_UNREGISTER_BUFFERS)");
        goto fail;
    }
    if (files) {
        self->files_registered = 0;
        self->nr_files = 0;
    } else {
        release_buffers(self);
    }
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
            PyErr_Format(PyExc_ValueError, "bufs[%zd] has %zd bytes; registered buffers must be 1 B..1 GiB",
                         got, views[got].len);
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
    if (self->bufs_registered) {
        PyErr_SetString(PyExc_RuntimeError, "buffers already registered; call unregister_buffers() first");
        goto fail;
    }
    int ret, e;
    do {
        Py_BEGIN_ALLOW_THREADS
        ret = sys_io_uring_register(self->ring_fd, IORING_REGISTER_BUFFERS, iov, (unsigned)n);
        e = errno;
        Py_END_ALLOW_THREADS
    } while (ret < 0 && e == EINTR);
    if (ret < 0) {
        set_oserror(e, "io_uring_register(IORING_REGISTER_BUFFERS)");
        goto fail;
    }
    self->bufs = views;
    self->nr_bufs = n;
    self->bufs_registered = 1;
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

/* --- attributes -------------------------------------------------------- */

static PyObject *
Ring_get_eventfd(RingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(self->event_fd);
}

static PyObject *
Ring_get_entries(RingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(self->sq_entries);
}

static PyObject *
Ring_get_cq_entries(RingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(self->cq_entries);
}

static PyObject *
Ring_get_features(RingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(self->features);
}

static PyObject *
Ring_get_setup_flags(RingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(self->setup_flags);
}

static PyObject *
Ring_get_sqpoll(RingObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->sqpoll);
}

static PyObject *
Ring_get_closed(RingObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->closed);
}

static PyObject *
Ring_get_in_flight(RingObject *self, void *Py_UNUSED(c))
{
    /* plain read under the GIL; a racing submit in another thread may make
     * this momentarily stale, which is inherent to the value anyway */
    return PyLong_FromUnsignedLongLong((unsigned long long)(self->in_kernel + self->stash_len));
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
    {"submit", (PyCFunction)Ring_submit, METH_O,
     "submit(ops) -> int\n\nValidate the whole batch, queue it and submit. Returns how many ops the kernel took\n"
     "(only fewer than len(ops) if it refused the rest; those were not queued)."},
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
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    int fd = sys_io_uring_setup(2, &p);
    if (fd < 0)
        return set_oserror(errno, "io_uring_setup");

    PyObject *ops = PySet_New(NULL);
    PyObject *result = NULL;
    size_t psz = sizeof(struct io_uring_probe) + KV_PROBE_OPS * sizeof(struct io_uring_probe_op);
    struct io_uring_probe *probe = PyMem_Calloc(1, psz);
    if (ops == NULL || probe == NULL) {
        if (probe == NULL)
            PyErr_NoMemory();
        goto out;
    }
    if (sys_io_uring_register(fd, IORING_REGISTER_PROBE, probe, KV_PROBE_OPS) == 0) {
        unsigned n = probe->ops_len; /* u8, always <= KV_PROBE_OPS */
        for (unsigned i = 0; i < n; i++) {
            if (!(probe->ops[i].flags & IO_URING_OP_SUPPORTED))
                continue;
            PyObject *v = PyLong_FromLong(probe->ops[i].op);
            if (v == NULL || PySet_Add(ops, v) < 0) {
                Py_XDECREF(v);
                goto out;
            }
            Py_DECREF(v);
        }
    } else if (errno != EINVAL) { /* EINVAL: kernel < 5.6 without PROBE: empty set */
        set_oserror(errno, "io_uring_register(IORING_REGISTER_PROBE)");
        goto out;
    }

    /* Is an SQPOLL ring permitted for this process (unprivileged since 5.11)? */
    struct io_uring_params sp;
    memset(&sp, 0, sizeof(sp));
    sp.flags = IORING_SETUP_SQPOLL;
    sp.sq_thread_idle = 1;
    int sfd = sys_io_uring_setup(2, &sp);
    int sqpoll_ok = sfd >= 0;
    if (sfd >= 0)
        close(sfd);

    result = Py_BuildValue("{s:I,s:O,s:O}", "kernel_features", p.features, "ops", ops, "sqpoll",
                           sqpoll_ok ? Py_True : Py_False);
out:
    PyMem_Free(probe);
    Py_XDECREF(ops);
    close(fd);
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
        /* kernel opcodes, for checking probe()['ops'] */
        {"IORING_OP_READV", IORING_OP_READV},
        {"IORING_OP_WRITEV", IORING_OP_WRITEV},
        {"IORING_OP_FSYNC", IORING_OP_FSYNC},
        {"IORING_OP_READ_FIXED", IORING_OP_READ_FIXED},
        {"IORING_OP_WRITE_FIXED", IORING_OP_WRITE_FIXED},
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
