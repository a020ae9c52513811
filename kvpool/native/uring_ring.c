/*
 * uring_ring.c -- the io_uring ring: raw syscalls, mmap of SQ/CQ, submission
 * with backpressure, completion draining, registration and probe.  See
 * uring_ring.h for the contract; no Python here.
 */
#include "uring_ring.h"
#include "uring_ops.h"

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

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

int
kv_sys_setup(unsigned entries, struct io_uring_params *p)
{
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

int
kv_sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags)
{
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, (size_t)(_NSIG / 8));
}

int
kv_sys_register(int fd, unsigned opcode, const void *arg, unsigned nr_args)
{
    return (int)syscall(__NR_io_uring_register, fd, opcode, arg, nr_args);
}

/* --- blocking hooks ---------------------------------------------------- */

static void *
block_begin(kv_ring *r)
{
    return r->block_begin != NULL ? r->block_begin() : NULL;
}

static void
block_end(kv_ring *r, void *tok)
{
    if (r->block_end != NULL)
        r->block_end(tok);
}

int
kv_ring_enter(kv_ring *r, unsigned to_submit, unsigned min_complete, unsigned flags)
{
    void *tok = block_begin(r);
    int ret = kv_sys_enter(r->ring_fd, to_submit, min_complete, flags);
    int e = errno;
    block_end(r, tok);
    return ret < 0 ? -e : ret;
}

/* --- slots ------------------------------------------------------------- */

int
kv_ring_slots_reserve(kv_ring *r, uint32_t n)
{
    if (r->nfree >= n)
        return 0;
    uint64_t want = (uint64_t)r->nslots + (n - r->nfree);
    uint64_t newcap = r->nslots ? (uint64_t)r->nslots * 2 : 64;
    if (newcap < want)
        newcap = want;
    if (newcap >= KV_NO_SLOT)
        return -EOVERFLOW;
    kv_slot *ns = realloc(r->slots, (size_t)newcap * sizeof(kv_slot));
    if (ns == NULL)
        return -ENOMEM;
    /* link the new slots into the free list */
    for (uint32_t i = (uint32_t)newcap; i-- > r->nslots;) {
        memset(&ns[i], 0, sizeof(ns[i]));
        ns[i].cancel_target = KV_NO_SLOT;
        ns[i].next_free = r->free_head;
        r->free_head = i;
    }
    r->nfree += (uint32_t)newcap - r->nslots;
    r->nslots = (uint32_t)newcap;
    r->slots = ns;
    return 0;
}

static uint32_t
slot_take(kv_ring *r, kv_prep *p)
{
    uint32_t idx = r->free_head;
    kv_slot *s = &r->slots[idx];
    r->free_head = s->next_free;
    r->nfree--;
    s->used = 1;
    s->done = 0;
    s->pins = 0;
    s->user_data = p->user_data;
    s->iov = p->iov; /* ownership moves to the slot */
    p->iov = NULL;
    s->cancel_target = p->cancel_slot;
    s->is_cancel = p->opcode == IORING_OP_ASYNC_CANCEL;
    if (p->cancel_slot != KV_NO_SLOT)
        r->slots[p->cancel_slot].pins++;
    return idx;
}

static void
slot_free(kv_ring *r, uint32_t idx)
{
    kv_slot *s = &r->slots[idx];
    free(s->iov);
    s->iov = NULL;
    s->used = 0;
    s->done = 0;
    s->next_free = r->free_head;
    r->free_head = idx;
    r->nfree++;
}

/* The op in slot idx is finished with (completed, or withdrawn before the
 * kernel saw it): drop its pin on a cancel target, and free it unless a
 * cancel still in the kernel names it. */
static void
slot_release(kv_ring *r, uint32_t idx)
{
    kv_slot *s = &r->slots[idx];
    uint32_t t = s->cancel_target;
    s->cancel_target = KV_NO_SLOT;
    if (t != KV_NO_SLOT) {
        kv_slot *ts = &r->slots[t];
        if (--ts->pins == 0 && ts->done)
            slot_free(r, t);
    }
    if (s->pins > 0) {
        free(s->iov); /* the kernel is done with it; only the index stays reserved */
        s->iov = NULL;
        s->done = 1;
        return;
    }
    slot_free(r, idx);
}

uint32_t
kv_ring_find_slot(const kv_ring *r, uint64_t user_data)
{
    for (uint32_t i = 0; i < r->nslots; i++) {
        const kv_slot *s = &r->slots[i];
        /* cancels are never targets themselves (an IORING_OP_ASYNC_CANCEL
         * completes inline and cannot be cancelled meaningfully) */
        if (s->used && !s->done && s->user_data == user_data && !s->is_cancel)
            return i;
    }
    return KV_NO_SLOT;
}

/* --- completion queue -------------------------------------------------- */

static int
stash_reserve(kv_ring *r, size_t extra)
{
    if (r->stash_cap - r->stash_len >= extra)
        return 0;
    size_t newcap = r->stash_cap ? r->stash_cap * 2 : 64;
    while (newcap < r->stash_len + extra)
        newcap *= 2;
    kv_done *ns = realloc(r->stash, newcap * sizeof(kv_done));
    if (ns == NULL)
        return -ENOMEM;
    r->stash = ns;
    r->stash_cap = newcap;
    return 0;
}

ptrdiff_t
kv_ring_drain_cq(kv_ring *r, int discard)
{
    unsigned head = *r->cq_khead; /* only we write the head */
    unsigned tail = __atomic_load_n(r->cq_ktail, __ATOMIC_ACQUIRE);
    unsigned n = tail - head;
    if (n == 0)
        return 0;
    if (!discard && stash_reserve(r, n) < 0)
        return -ENOMEM;
    for (; head != tail; head++) {
        const struct io_uring_cqe *cqe = &r->cqes[head & r->cq_mask];
        uint64_t slot = cqe->user_data;
        if (slot >= r->nslots || !r->slots[slot].used || r->slots[slot].done)
            continue; /* not ours (cannot happen); never touch foreign state */
        if (!discard) {
            r->stash[r->stash_len].user_data = r->slots[slot].user_data;
            r->stash[r->stash_len].res = cqe->res;
            r->stash_len++;
        }
        slot_release(r, (uint32_t)slot);
        r->in_kernel--;
    }
    __atomic_store_n(r->cq_khead, tail, __ATOMIC_RELEASE);
    return (ptrdiff_t)n;
}

int
kv_ring_cq_overflow_pending(const kv_ring *r)
{
    return (__atomic_load_n(r->sq_kflags, __ATOMIC_ACQUIRE) & IORING_SQ_CQ_OVERFLOW) != 0;
}

void
kv_ring_drain_eventfd(kv_ring *r)
{
    uint64_t v;
    for (;;) {
        ssize_t n = read(r->event_fd, &v, sizeof(v));
        if (n >= 0 || errno != EINTR)
            return; /* EAGAIN: counter already zero */
    }
}

int
kv_ring_reap(kv_ring *r)
{
    /* Drain the eventfd first: a CQE posted after this point re-arms it. */
    kv_ring_drain_eventfd(r);
    for (int round = 0; round < 8; round++) {
        if (kv_ring_drain_cq(r, 0) < 0)
            return -ENOMEM;
        if (!kv_ring_cq_overflow_pending(r))
            break;
        /* Kernel holds overflowed CQEs (NODROP): flush them into the ring. */
        int ret = kv_ring_enter(r, 0, 0, IORING_ENTER_GETEVENTS);
        if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
            return ret;
    }
    return 0;
}

void
kv_ring_wait_all_discard(kv_ring *r)
{
    int spins = 0;
    while (r->in_kernel > 0) {
        kv_ring_drain_cq(r, 1);
        if (r->in_kernel == 0)
            break;
        uint64_t want = r->in_kernel < r->cq_entries ? r->in_kernel : r->cq_entries;
        int ret = kv_ring_enter(r, 0, (unsigned)want, IORING_ENTER_GETEVENTS);
        if (ret < 0 && ret != -EINTR) {
            if ((ret == -EAGAIN || ret == -EBUSY) && ++spins < KV_ENTER_RETRIES) {
                sched_yield();
                continue;
            }
            break;
        }
    }
}

/* --- setup / teardown -------------------------------------------------- */

void
kv_ring_init(kv_ring *r)
{
    memset(r, 0, sizeof(*r));
    r->ring_fd = -1;
    r->event_fd = -1;
    r->free_head = KV_NO_SLOT;
    r->closed = 1; /* until fully set up: teardown is safe at any point */
}

void
kv_ring_teardown(kv_ring *r)
{
    if (r->sqes != NULL && r->sqes != MAP_FAILED)
        munmap(r->sqes, r->sqes_sz);
    if (r->cq_ring != NULL && r->cq_ring != MAP_FAILED && r->cq_ring != r->sq_ring)
        munmap(r->cq_ring, r->cq_ring_sz);
    if (r->sq_ring != NULL && r->sq_ring != MAP_FAILED)
        munmap(r->sq_ring, r->sq_ring_sz);
    r->sqes = NULL;
    r->cq_ring = NULL;
    r->sq_ring = NULL;
    if (r->ring_fd >= 0)
        close(r->ring_fd);
    r->ring_fd = -1;
    if (r->event_fd >= 0)
        close(r->event_fd);
    r->event_fd = -1;
    free(r->bufs);
    r->bufs = NULL;
    r->nr_bufs = 0;
    r->bufs_registered = 0;
    r->files_registered = 0;
    r->nr_files = 0;
    if (r->slots != NULL) {
        for (uint32_t i = 0; i < r->nslots; i++)
            free(r->slots[i].iov);
        free(r->slots);
    }
    r->slots = NULL;
    r->nslots = r->nfree = 0;
    r->free_head = KV_NO_SLOT;
    free(r->stash);
    r->stash = NULL;
    r->stash_len = r->stash_cap = 0;
    r->in_kernel = 0;
    r->closed = 1;
}

static int
ring_map(kv_ring *r, const struct io_uring_params *p)
{
    size_t sq_sz = p->sq_off.array + p->sq_entries * sizeof(unsigned);
    size_t cq_sz = p->cq_off.cqes + p->cq_entries * sizeof(struct io_uring_cqe);
    int single = (p->features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single) {
        if (cq_sz > sq_sz)
            sq_sz = cq_sz;
        cq_sz = sq_sz;
    }
    r->sq_ring = mmap(NULL, sq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->ring_fd,
                      IORING_OFF_SQ_RING);
    if (r->sq_ring == MAP_FAILED) {
        r->sq_ring = NULL;
        return -1;
    }
    r->sq_ring_sz = sq_sz;
    if (single) {
        r->cq_ring = r->sq_ring;
    } else {
        r->cq_ring = mmap(NULL, cq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->ring_fd,
                          IORING_OFF_CQ_RING);
        if (r->cq_ring == MAP_FAILED) {
            r->cq_ring = NULL;
            return -1;
        }
    }
    r->cq_ring_sz = cq_sz;
    r->sqes_sz = p->sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->ring_fd,
                   IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) {
        r->sqes = NULL;
        return -1;
    }

    char *sq = r->sq_ring;
    char *cq = r->cq_ring;
    r->sq_khead = (unsigned *)(sq + p->sq_off.head);
    r->sq_ktail = (unsigned *)(sq + p->sq_off.tail);
    r->sq_kflags = (unsigned *)(sq + p->sq_off.flags);
    r->sq_array = (unsigned *)(sq + p->sq_off.array);
    r->sq_mask = *(unsigned *)(sq + p->sq_off.ring_mask);
    r->cq_khead = (unsigned *)(cq + p->cq_off.head);
    r->cq_ktail = (unsigned *)(cq + p->cq_off.tail);
    r->cqes = (struct io_uring_cqe *)(cq + p->cq_off.cqes);
    r->cq_mask = *(unsigned *)(cq + p->cq_off.ring_mask);

    /* identity SQ index array: SQE i lives at index i */
    for (unsigned i = 0; i < p->sq_entries; i++)
        r->sq_array[i] = i;
    r->sq_tail = __atomic_load_n(r->sq_ktail, __ATOMIC_ACQUIRE);
    return 0;
}

int
kv_ring_setup(kv_ring *r, unsigned entries, int sqpoll, unsigned idle_ms, const char **what)
{
    int err;
    /* Optional setup flags, newest first; EINVAL means "not supported here". */
    unsigned base = sqpoll ? IORING_SETUP_SQPOLL : 0;
    const unsigned candidates[] = {
        base | IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL,
        base | IORING_SETUP_CQSIZE,
        base,
    };
    struct io_uring_params p;
    int fd = -1;
    err = 0;
    for (size_t i = 0; i < sizeof(candidates) / sizeof(candidates[0]); i++) {
        memset(&p, 0, sizeof(p));
        p.flags = candidates[i];
        if (p.flags & IORING_SETUP_CQSIZE)
            p.cq_entries = 2u * entries;
        if (sqpoll)
            p.sq_thread_idle = idle_ms;
        fd = kv_sys_setup(entries, &p);
        if (fd >= 0)
            break;
        err = errno;
        if (err != EINVAL)
            break;
    }
    if (fd < 0) {
        *what = sqpoll ? "io_uring_setup(IORING_SETUP_SQPOLL)" : "io_uring_setup";
        goto fail;
    }
    r->ring_fd = fd;
    r->setup_flags = p.flags;
    r->features = p.features;
    r->sq_entries = p.sq_entries;
    r->cq_entries = p.cq_entries;
    r->sqpoll = sqpoll ? 1 : 0;

    if (!(p.features & IORING_FEAT_NODROP)) {
        /* Without NODROP (kernel < 5.5) overflowing CQEs are silently lost. */
        *what = "io_uring lacks IORING_FEAT_NODROP (kernel too old)";
        err = ENOTSUP;
        goto fail;
    }
    if (ring_map(r, &p) < 0) {
        err = errno;
        *what = "mmap(io_uring)";
        goto fail;
    }
    r->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->event_fd < 0) {
        err = errno;
        *what = "eventfd";
        goto fail;
    }
    if (kv_sys_register(r->ring_fd, IORING_REGISTER_EVENTFD, &r->event_fd, 1) < 0) {
        err = errno;
        *what = "io_uring_register(IORING_REGISTER_EVENTFD)";
        goto fail;
    }
    r->closed = 0;
    if (kv_ring_slots_reserve(r, r->cq_entries) < 0) {
        err = ENOMEM;
        *what = NULL; /* plain out-of-memory */
        goto fail;
    }
    return 0;
fail:
    kv_ring_teardown(r);
    return -err;
}

/* --- submission -------------------------------------------------------- */

static void
fill_sqe(kv_ring *r, kv_prep *p)
{
    uint32_t slot = slot_take(r, p);
    kv_prep_to_sqe(&r->sqes[r->sq_tail & r->sq_mask], p, slot);
    r->sq_tail++;
}

static void
publish_sq_tail(kv_ring *r)
{
    /* SQE stores must be visible before the kernel sees the new tail */
    __atomic_store_n(r->sq_ktail, r->sq_tail, __ATOMIC_RELEASE);
}

/* Non-SQPOLL: the kernel consumes SQEs only inside io_uring_enter, so SQEs
 * that it did not take can be withdrawn again. */
static ptrdiff_t
submit_direct(kv_ring *r, kv_prep *ops, size_t n, int *err)
{
    size_t filled = 0, consumed = 0;
    int retries = 0;
    *err = 0;
    while (consumed < n) {
        unsigned head = __atomic_load_n(r->sq_khead, __ATOMIC_ACQUIRE);
        unsigned space = r->sq_entries - (r->sq_tail - head);
        while (space > 0 && filled < n) {
            fill_sqe(r, &ops[filled]);
            filled++;
            space--;
        }
        publish_sq_tail(r);
        unsigned pending = r->sq_tail - head;
        int ret = kv_ring_enter(r, pending, 0, 0);
        if (ret > 0) {
            consumed += (size_t)ret;
            r->in_kernel += (uint64_t)ret;
            retries = 0;
            continue;
        }
        int e = ret == 0 ? EAGAIN : -ret; /* 0: nothing consumed, no error: transient */
        if (e == EINTR)
            continue;
        if ((e == EBUSY || e == EAGAIN) && ++retries <= KV_ENTER_RETRIES) {
            /* CQ backpressure (EBUSY) or transient allocation failure: move
             * completions to the stash so the kernel can flush its overflow
             * list, then retry. */
            if (kv_ring_drain_cq(r, 0) < 0) {
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
        /* withdraw SQEs the kernel did not consume, newest first so that a
         * cancel withdrawn together with its target unpins it before the
         * target is freed */
        unsigned head = __atomic_load_n(r->sq_khead, __ATOMIC_ACQUIRE);
        for (unsigned i = r->sq_tail; i-- != head;)
            slot_release(r, (uint32_t)r->sqes[i & r->sq_mask].user_data);
        r->sq_tail = head;
        publish_sq_tail(r);
    }
    if (consumed == 0 && *err != 0)
        return -1;
    return (ptrdiff_t)consumed;
}

/* SQPOLL: published SQEs are owned by the kernel thread and cannot be
 * withdrawn; they count as submitted as soon as the tail is published. */
static ptrdiff_t
submit_sqpoll(kv_ring *r, kv_prep *ops, size_t n, int *err)
{
    size_t filled = 0;
    int sq_wait_ok = 1, retries = 0;
    *err = 0;
    while (filled < n) {
        unsigned head = __atomic_load_n(r->sq_khead, __ATOMIC_ACQUIRE);
        unsigned space = r->sq_entries - (r->sq_tail - head);
        if (space == 0) {
            /* SQ full: wait for the kernel thread to consume entries */
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            unsigned flags = (__atomic_load_n(r->sq_kflags, __ATOMIC_RELAXED) & IORING_SQ_NEED_WAKEUP)
                                 ? IORING_ENTER_SQ_WAKEUP
                                 : 0;
            if (sq_wait_ok)
                flags |= IORING_ENTER_SQ_WAIT;
            void *tok = block_begin(r);
            int ret = kv_sys_enter(r->ring_fd, 0, 0, flags);
            int e = errno;
            if (ret < 0 && (e == EINVAL || e == EAGAIN || e == EBUSY))
                sched_yield();
            block_end(r, tok);
            if (ret < 0) {
                if (e == EINVAL && sq_wait_ok) {
                    sq_wait_ok = 0; /* kernel < 5.10: no IORING_ENTER_SQ_WAIT */
                } else if (e == EBUSY || e == EAGAIN) {
                    if (kv_ring_drain_cq(r, 0) < 0) {
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
        size_t start = filled;
        while (space > 0 && filled < n) {
            fill_sqe(r, &ops[filled]);
            filled++;
            space--;
        }
        publish_sq_tail(r);
        r->in_kernel += (uint64_t)(filled - start);
        /* full barrier between the tail store and the flags load */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(r->sq_kflags, __ATOMIC_RELAXED) & IORING_SQ_NEED_WAKEUP) {
            int ret;
            do {
                ret = kv_ring_enter(r, 0, 0, IORING_ENTER_SQ_WAKEUP);
            } while (ret == -EINTR);
            if (ret < 0) {
                *err = -ret; /* e.g. EOWNERDEAD: the SQ thread died */
                break;
            }
        }
    }
    if (filled == 0 && *err != 0)
        return -1;
    return (ptrdiff_t)filled;
}

ptrdiff_t
kv_ring_submit(kv_ring *r, kv_prep *ops, size_t n, int *err)
{
    *err = 0;
    if (n == 0)
        return 0;
    return r->sqpoll ? submit_sqpoll(r, ops, n, err) : submit_direct(r, ops, n, err);
}

/* --- registration ------------------------------------------------------ */

static int
do_register(kv_ring *r, unsigned opcode, const void *arg, unsigned nr)
{
    int ret, e;
    do {
        void *tok = block_begin(r);
        ret = kv_sys_register(r->ring_fd, opcode, arg, nr);
        e = errno;
        block_end(r, tok);
    } while (ret < 0 && e == EINTR);
    return ret < 0 ? -e : 0;
}

int
kv_ring_register_files(kv_ring *r, const int32_t *fds, uint32_t n)
{
    int rc = do_register(r, IORING_REGISTER_FILES, fds, n);
    if (rc == 0) {
        r->files_registered = 1;
        r->nr_files = n;
    }
    return rc;
}

int
kv_ring_unregister_files(kv_ring *r)
{
    int rc = do_register(r, IORING_UNREGISTER_FILES, NULL, 0);
    if (rc == 0) {
        r->files_registered = 0;
        r->nr_files = 0;
    }
    return rc;
}

int
kv_ring_register_buffers(kv_ring *r, const struct iovec *bufs, uint32_t n)
{
    struct iovec *copy = malloc((size_t)n * sizeof(*copy));
    if (copy == NULL)
        return -ENOMEM;
    memcpy(copy, bufs, (size_t)n * sizeof(*copy));
    int rc = do_register(r, IORING_REGISTER_BUFFERS, copy, n);
    if (rc < 0) {
        free(copy);
        return rc;
    }
    r->bufs = copy;
    r->nr_bufs = n;
    r->bufs_registered = 1;
    return 0;
}

int
kv_ring_unregister_buffers(kv_ring *r)
{
    int rc = do_register(r, IORING_UNREGISTER_BUFFERS, NULL, 0);
    if (rc == 0) {
        free(r->bufs);
        r->bufs = NULL;
        r->nr_bufs = 0;
        r->bufs_registered = 0;
    }
    return rc;
}

int
kv_ring_register_buffers_sparse(kv_ring *r, uint32_t n)
{
    if (n == 0)
        return -EINVAL;
    struct iovec *table = calloc((size_t)n, sizeof(*table)); /* iov_len 0: an empty slot */
    if (table == NULL)
        return -ENOMEM;
    struct io_uring_rsrc_register reg;
    memset(&reg, 0, sizeof(reg));
    reg.nr = n;
    reg.flags = IORING_RSRC_REGISTER_SPARSE;
    /* BUFFERS2 takes the size of its argument in nr_args */
    int rc = do_register(r, IORING_REGISTER_BUFFERS2, &reg, (unsigned)sizeof(reg));
    if (rc < 0) {
        free(table);
        return rc;
    }
    r->bufs = table;
    r->nr_bufs = n;
    r->bufs_registered = 1;
    return 0;
}

int
kv_sys_update_buffers(int ring_fd, uint32_t off, const struct iovec *bufs, uint32_t n)
{
    struct io_uring_rsrc_update2 up;
    memset(&up, 0, sizeof(up));
    up.offset = off;
    up.data = (uint64_t)(uintptr_t)bufs;
    up.nr = n;
    int ret;
    do {
        ret = kv_sys_register(ring_fd, IORING_REGISTER_BUFFERS_UPDATE, &up, (unsigned)sizeof(up));
    } while (ret < 0 && errno == EINTR);
    if (ret < 0)
        return -errno;
    /* the kernel returns how many slots it updated; fewer than asked is a failure of the rest */
    return ret == (int)n ? ret : -EIO;
}

int
kv_ring_note_buffers(kv_ring *r, uint32_t off, const struct iovec *bufs, uint32_t n)
{
    if (!r->bufs_registered || off > r->nr_bufs || n > r->nr_bufs - off)
        return -EINVAL;
    memcpy(&r->bufs[off], bufs, (size_t)n * sizeof(*bufs));
    return 0;
}

/* --- probe ------------------------------------------------------------- */

int
kv_probe(unsigned char *supported, unsigned *features, int *sqpoll_ok, const char **what)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    memset(supported, 0, KV_PROBE_OPS);
    int fd = kv_sys_setup(2, &p);
    if (fd < 0) {
        *what = "io_uring_setup";
        return -errno;
    }
    int rc = 0;
    size_t psz = sizeof(struct io_uring_probe) + KV_PROBE_OPS * sizeof(struct io_uring_probe_op);
    struct io_uring_probe *probe = calloc(1, psz);
    if (probe == NULL) {
        *what = NULL;
        rc = -ENOMEM;
        goto out;
    }
    if (kv_sys_register(fd, IORING_REGISTER_PROBE, probe, KV_PROBE_OPS) == 0) {
        unsigned n = probe->ops_len; /* u8, always <= KV_PROBE_OPS */
        for (unsigned i = 0; i < n; i++) {
            if (probe->ops[i].flags & IO_URING_OP_SUPPORTED)
                supported[probe->ops[i].op] = 1;
        }
    } else if (errno != EINVAL) { /* EINVAL: kernel < 5.6 without PROBE: empty set */
        *what = "io_uring_register(IORING_REGISTER_PROBE)";
        rc = -errno;
        goto out;
    }
    /* Is an SQPOLL ring permitted for this process (unprivileged since 5.11)? */
    struct io_uring_params sp;
    memset(&sp, 0, sizeof(sp));
    sp.flags = IORING_SETUP_SQPOLL;
    sp.sq_thread_idle = 1;
    int sfd = kv_sys_setup(2, &sp);
    *sqpoll_ok = sfd >= 0;
    if (sfd >= 0)
        close(sfd);
    *features = p.features;
out:
    free(probe);
    close(fd);
    return rc;
}
