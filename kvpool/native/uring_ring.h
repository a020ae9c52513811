/*
 * uring_ring.h -- the io_uring ring itself, with no Python in it.
 *
 * Setup (raw syscalls, no liburing), the mmap of the SQ/CQ rings, submission
 * with backpressure, completion draining into a stash, file/buffer
 * registration and a feature probe.  Only the kernel uapi headers are used.
 *
 * A kv_ring is NOT thread-safe: the caller serialises every call (the Python
 * module does so with a per-Ring lock).  Blocking syscalls are bracketed by
 * the optional block_begin/block_end hooks so that a host (CPython) can drop
 * its global lock around them; the C self-test leaves them NULL.
 *
 * Every SQE carries a *slot* index as its user_data.  The slot remembers the
 * caller's 64-bit user_data and owns heap memory the kernel may still read
 * (the iovec array of READV/WRITEV); both are released when the matching CQE
 * is consumed, so the caller's user_data comes back verbatim.  A slot that is
 * the target of an ASYNC_CANCEL still in the kernel is kept (not reused)
 * until that cancel completes, so a cancel can never hit a later op that
 * happens to reuse the slot index.
 */
#ifndef KVPOOL_URING_RING_H
#define KVPOOL_URING_RING_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include <linux/io_uring.h>

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

#define KV_MAX_ENTRIES 32768u           /* IORING_MAX_ENTRIES */
#define KV_MAX_REG_BUF_LEN (1ull << 30) /* kernel limit per registered buffer */
#define KV_PROBE_OPS 256
#define KV_ENTER_RETRIES 64
#define KV_NO_SLOT UINT32_MAX

struct kv_prep; /* an encoded op, see uring_ops.h */

typedef struct {
    uint64_t user_data;     /* caller's user_data */
    struct iovec *iov;      /* owned; freed when the CQE is consumed */
    uint32_t next_free;     /* free-list link */
    uint32_t cancel_target; /* slot this op cancels (ASYNC_CANCEL), else KV_NO_SLOT */
    uint32_t pins;          /* cancels in the kernel that name this slot */
    uint8_t used;
    uint8_t is_cancel;      /* an ASYNC_CANCEL (never itself a cancel target) */
    uint8_t done;           /* completed, kept only because pins > 0 */
} kv_slot;

typedef struct {
    uint64_t user_data;
    int32_t res;
} kv_done;

typedef void *(*kv_block_begin_fn)(void);
typedef void (*kv_block_end_fn)(void *);

typedef struct kv_ring {
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

    /* registrations (the ring keeps a copy of the buffer table to validate ops) */
    int files_registered;
    uint32_t nr_files;
    struct iovec *bufs;
    uint32_t nr_bufs;
    int bufs_registered;

    /* per-op state */
    kv_slot *slots;
    uint32_t nslots;
    uint32_t nfree;
    uint32_t free_head;
    kv_done *stash;
    size_t stash_len;
    size_t stash_cap;
    uint64_t in_kernel; /* submitted and not yet consumed from the CQ */

    /* host hooks around blocking syscalls (may be NULL) */
    kv_block_begin_fn block_begin;
    kv_block_end_fn block_end;
} kv_ring;

/* Raw syscalls: -1 and errno on failure. */
int kv_sys_setup(unsigned entries, struct io_uring_params *p);
int kv_sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags);
int kv_sys_register(int fd, unsigned opcode, const void *arg, unsigned nr_args);

/* Put a ring into its "closed, nothing owned" state (call before setup). */
void kv_ring_init(kv_ring *r);
/* Create the ring, map it and register an eventfd.  Returns 0, or -errno with
 * *what naming the failing step; the ring is torn down on failure. */
int kv_ring_setup(kv_ring *r, unsigned entries, int sqpoll, unsigned idle_ms, const char **what);
/* Unmap, close and free everything (no waiting).  Idempotent. */
void kv_ring_teardown(kv_ring *r);

/* io_uring_enter bracketed by the block hooks: the result or -errno. */
int kv_ring_enter(kv_ring *r, unsigned to_submit, unsigned min_complete, unsigned flags);

/* Make room for n more ops: 0, -ENOMEM, or -EOVERFLOW (too many in flight). */
int kv_ring_slots_reserve(kv_ring *r, uint32_t n);
/* Queue and submit n encoded ops (ops[i].iov moves into the slot of each op
 * the kernel took).  Returns how many the kernel took, or -1 with *err set
 * when it took none. */
ptrdiff_t kv_ring_submit(kv_ring *r, struct kv_prep *ops, size_t n, int *err);

/* Move every available CQE into the stash (discard: drop them).  Returns the
 * number consumed or -ENOMEM (nothing consumed). */
ptrdiff_t kv_ring_drain_cq(kv_ring *r, int discard);
/* drain_eventfd + drain the CQ, flushing the kernel's overflow list.  Returns
 * 0 or -errno (the completions stay in r->stash for the caller to take). */
int kv_ring_reap(kv_ring *r);
int kv_ring_cq_overflow_pending(const kv_ring *r);
void kv_ring_drain_eventfd(kv_ring *r);
/* Wait until every submitted op completed, discarding results; gives up on
 * hard errors (closing the fd then makes the kernel cancel the rest). */
void kv_ring_wait_all_discard(kv_ring *r);

/* The slot of an in-flight (not yet completed) op with this caller user_data,
 * or KV_NO_SLOT. */
uint32_t kv_ring_find_slot(const kv_ring *r, uint64_t user_data);

/* Registration: 0 or -errno.  register_buffers copies the table. */
int kv_ring_register_files(kv_ring *r, const int32_t *fds, uint32_t n);
int kv_ring_unregister_files(kv_ring *r);
int kv_ring_register_buffers(kv_ring *r, const struct iovec *bufs, uint32_t n);
int kv_ring_unregister_buffers(kv_ring *r);
/* A table of n empty buffer slots (IORING_REGISTER_BUFFERS2 with IORING_RSRC_REGISTER_SPARSE, 5.19+),
 * filled later slot by slot with kv_sys_update_buffers + kv_ring_note_buffers while ops are in flight.
 * 0 or -errno (-EINVAL on kernels without it). */
int kv_ring_register_buffers_sparse(kv_ring *r, uint32_t n);
/* IORING_REGISTER_BUFFERS_UPDATE of slots [off, off + n) of ring_fd: the raw syscall, with no kv_ring state
 * touched, so a host may run it without the ring's lock while another thread submits (pinning a GiB takes
 * tens of milliseconds).  The kernel takes the ring's own mutex meanwhile: submissions wait in the kernel,
 * in-flight ops run on.  Returns n or -errno. */
int kv_sys_update_buffers(int ring_fd, uint32_t off, const struct iovec *bufs, uint32_t n);
/* Record slots [off, off + n) as filled with bufs after kv_sys_update_buffers succeeded (ops are validated
 * against this copy of the table).  0, or -EINVAL when the range lies outside the table. */
int kv_ring_note_buffers(kv_ring *r, uint32_t off, const struct iovec *bufs, uint32_t n);

/* Probe the kernel: supported[op] = 1 for each supported IORING_OP_* (array
 * of KV_PROBE_OPS), *features and *sqpoll_ok.  0 or -errno (*what set). */
int kv_probe(unsigned char *supported, unsigned *features, int *sqpoll_ok, const char **what);

#endif
