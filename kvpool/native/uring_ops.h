/*
 * uring_ops.h -- op encoding: a plain C op struct, its validation against a
 * ring's registrations, and the SQE it becomes.  No Python in here.
 */
#ifndef KVPOOL_URING_OPS_H
#define KVPOOL_URING_OPS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "uring_ring.h"

/* Op kinds (the values are kvpool._uring.OP_*, part of the module API). */
#define KV_OP_READ 0
#define KV_OP_WRITE 1
#define KV_OP_FSYNC 2
#define KV_OP_CANCEL 3 /* IORING_OP_ASYNC_CANCEL of the in-flight op with a given user_data */

enum kv_buf_kind { KV_BUF_NONE = 0, KV_BUF_FIXED, KV_BUF_IOV };

/* What a caller asks for. */
typedef struct {
    uint64_t kind; /* KV_OP_*; anything else is rejected */
    uint64_t user_data;
    uint64_t file_index;
    uint64_t file_offset;
    enum kv_buf_kind buf;
    /* KV_BUF_FIXED */
    uint64_t buf_index;
    uint64_t buf_offset;
    uint64_t length;
    /* KV_BUF_IOV: owned by the op until kv_op_encode moves it into the prep */
    struct iovec *iov;
    size_t iov_len;
    /* KV_OP_CANCEL */
    uint64_t target_user_data;
} kv_op;

/* An encoded op, ready for an SQE. */
typedef struct kv_prep {
    uint8_t opcode; /* IORING_OP_* */
    uint16_t buf_index;
    uint32_t file_index;
    uint32_t len;
    uint32_t cancel_slot; /* ASYNC_CANCEL: the slot it targets, or KV_NO_SLOT */
    uint64_t user_data;
    uint64_t off;
    uint64_t addr;
    struct iovec *iov; /* owned until moved into a slot */
} kv_prep;

enum kv_err_kind { KV_ERR_VALUE = 1, KV_ERR_TYPE, KV_ERR_NOMEM };

typedef struct {
    enum kv_err_kind kind;
    char msg[320];
} kv_err;

/* Check kind and file index (what can be checked before the buffer is
 * parsed); 0, or -1 with *e filled.  idx names the op in messages. */
int kv_op_check_target(const kv_ring *r, const kv_op *op, ptrdiff_t idx, kv_err *e);
/* Validate the whole op and encode it into *p (op->iov moves into p->iov).
 * 0, or -1 with *e filled (op->iov stays owned by the caller). */
int kv_op_encode(const kv_ring *r, kv_op *op, ptrdiff_t idx, kv_prep *p, kv_err *e);
/* Fill an SQE from an encoded op carrying `slot` as its user_data. */
void kv_prep_to_sqe(struct io_uring_sqe *sqe, const kv_prep *p, uint32_t slot);
/* Free the iovecs still owned by n preps (not the array). */
void kv_preps_release(kv_prep *ops, size_t n);

#endif
