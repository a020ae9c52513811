/*
 * uring_ops.c -- validate a kv_op against a ring's registrations and encode
 * it as an SQE.  The checks (and their messages) are the ones the Python
 * module has always raised as ValueError; the module parses Python objects
 * into a kv_op and maps kv_err to an exception.
 */
#include "uring_ops.h"

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

static int
fail(kv_err *e, enum kv_err_kind kind, const char *fmt, ...)
{
    va_list ap;
    e->kind = kind;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
    va_end(ap);
    return -1;
}

int
kv_op_check_target(const kv_ring *r, const kv_op *op, ptrdiff_t idx, kv_err *e)
{
    if (op->kind > KV_OP_CANCEL)
        return fail(e, KV_ERR_VALUE, "op %td: unknown op kind %llu", idx, (unsigned long long)op->kind);
    if (op->kind == KV_OP_CANCEL) {
        /* a cancel names no file: it matches an op by user_data */
        if (op->file_index != 0 || op->file_offset != 0)
            return fail(e, KV_ERR_VALUE, "op %td: cancel takes file_index 0 and file_offset 0", idx);
        return 0;
    }
    if (!r->files_registered)
        return fail(e, KV_ERR_VALUE, "op %td: no files registered", idx);
    if (op->file_index >= r->nr_files)
        return fail(e, KV_ERR_VALUE, "op %td: file_index %llu out of range (%u files registered)", idx,
                    (unsigned long long)op->file_index, r->nr_files);
    if (op->file_offset > INT64_MAX)
        return fail(e, KV_ERR_VALUE, "op %td: file_offset out of range: %llu", idx,
                    (unsigned long long)op->file_offset);
    return 0;
}

static int
encode_fixed(const kv_ring *r, const kv_op *op, ptrdiff_t idx, kv_prep *p, kv_err *e)
{
    if (op->buf_index > UINT16_MAX || op->length > UINT32_MAX)
        return fail(e, KV_ERR_VALUE, "op %td: buf_index or length out of range", idx);
    if (!r->bufs_registered)
        return fail(e, KV_ERR_VALUE, "op %td: no buffers registered", idx);
    if (op->buf_index >= r->nr_bufs)
        return fail(e, KV_ERR_VALUE, "op %td: buf_index %llu out of range (%u buffers registered)", idx,
                    (unsigned long long)op->buf_index, r->nr_bufs);
    uint64_t total = (uint64_t)r->bufs[op->buf_index].iov_len;
    if (op->buf_offset > total || op->length > total - op->buf_offset)
        return fail(e, KV_ERR_VALUE,
                    "op %td: slice [%llu, %llu) out of range for registered buffer %llu of %llu bytes", idx,
                    (unsigned long long)op->buf_offset, (unsigned long long)(op->buf_offset + op->length),
                    (unsigned long long)op->buf_index, (unsigned long long)total);
    p->opcode = op->kind == KV_OP_READ ? IORING_OP_READ_FIXED : IORING_OP_WRITE_FIXED;
    p->buf_index = (uint16_t)op->buf_index;
    p->addr = (uint64_t)(uintptr_t)r->bufs[op->buf_index].iov_base + op->buf_offset;
    p->len = (uint32_t)op->length;
    return 0;
}

static int
encode_iov(const kv_op *op, ptrdiff_t idx, kv_prep *p, kv_err *e)
{
    if (op->iov == NULL || op->iov_len < 1 || op->iov_len > UIO_MAXIOV)
        return fail(e, KV_ERR_VALUE, "op %td: iov list must have 1..%d entries, got %zu", idx, UIO_MAXIOV,
                    op->iov == NULL ? (size_t)0 : op->iov_len);
    uint64_t total = 0;
    for (size_t i = 0; i < op->iov_len; i++) {
        total += op->iov[i].iov_len;
        if (op->iov[i].iov_len > SSIZE_MAX || total > SSIZE_MAX)
            return fail(e, KV_ERR_VALUE, "op %td: total iov length overflows ssize_t", idx);
    }
    p->opcode = op->kind == KV_OP_READ ? IORING_OP_READV : IORING_OP_WRITEV;
    p->addr = (uint64_t)(uintptr_t)op->iov;
    p->len = (uint32_t)op->iov_len;
    return 0;
}

int
kv_op_encode(const kv_ring *r, kv_op *op, ptrdiff_t idx, kv_prep *p, kv_err *e)
{
    memset(p, 0, sizeof(*p));
    p->cancel_slot = KV_NO_SLOT;
    if (kv_op_check_target(r, op, idx, e) < 0)
        return -1;
    p->user_data = op->user_data;
    p->file_index = (uint32_t)op->file_index;
    p->off = op->file_offset;
    switch (op->kind) {
    case KV_OP_CANCEL:
        if (op->buf != KV_BUF_NONE)
            return fail(e, KV_ERR_VALUE, "op %td: cancel takes no buffer", idx);
        p->opcode = IORING_OP_ASYNC_CANCEL;
        p->off = 0;
        /* The kernel matches SQE user_data, which is our slot index.  An op
         * that is no longer in flight gets a slot index no SQE ever carries,
         * so the kernel answers -ENOENT, as it would for an unknown user_data. */
        p->cancel_slot = kv_ring_find_slot(r, op->target_user_data);
        p->addr = p->cancel_slot == KV_NO_SLOT ? UINT64_MAX : (uint64_t)p->cancel_slot;
        return 0;
    case KV_OP_FSYNC:
        if (op->buf != KV_BUF_NONE)
            return fail(e, KV_ERR_VALUE, "op %td: fsync takes None as buffer", idx);
        if (op->file_offset != 0)
            return fail(e, KV_ERR_VALUE, "op %td: fsync file_offset must be 0", idx);
        p->opcode = IORING_OP_FSYNC;
        return 0;
    default:
        break;
    }
    if (op->buf == KV_BUF_FIXED)
        return encode_fixed(r, op, idx, p, e);
    if (op->buf == KV_BUF_IOV) {
        if (encode_iov(op, idx, p, e) < 0)
            return -1;
        p->iov = op->iov; /* ownership moves to the prep */
        op->iov = NULL;
        op->iov_len = 0;
        return 0;
    }
    return fail(e, KV_ERR_TYPE,
                "op %td: buffer must be ('fixed', buf_index, buf_offset, length) or "
                "('iov', [(address, length), ...])", idx);
}

void
kv_prep_to_sqe(struct io_uring_sqe *sqe, const kv_prep *p, uint32_t slot)
{
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = p->opcode;
    sqe->user_data = slot;
    if (p->opcode == IORING_OP_ASYNC_CANCEL) {
        sqe->fd = -1;
        sqe->addr = p->addr; /* the user_data (slot) to cancel */
        return;
    }
    sqe->flags = IOSQE_FIXED_FILE;
    sqe->fd = (int32_t)p->file_index;
    sqe->off = p->off;
    sqe->addr = p->addr;
    sqe->len = p->len;
    if (p->opcode == IORING_OP_FSYNC)
        sqe->fsync_flags = IORING_FSYNC_DATASYNC;
    else if (p->opcode == IORING_OP_READ_FIXED || p->opcode == IORING_OP_WRITE_FIXED)
        sqe->buf_index = p->buf_index;
}

void
kv_preps_release(kv_prep *ops, size_t n)
{
    if (ops == NULL)
        return;
    for (size_t i = 0; i < n; i++) {
        free(ops[i].iov);
        ops[i].iov = NULL;
    }
}
