/*
 * uring_selftest.c -- the io_uring ring and op encoding without Python.
 *
 * Built together with kvpool/native/uring_ring.c and uring_ops.c by
 * tests/test_uring_engine.py (plain, under ASan/UBSan and under valgrind).
 * Usage: uring_selftest DIR -- makes an O_DIRECT file in DIR and runs:
 *   fixed-buffer write + read back, writev + readv, fdatasync,
 *   a batch of 3x the ring size (SQ full and CQ backpressure),
 *   -EBADF (sparse file slot), -EINVAL (misaligned O_DIRECT offset),
 *   op validation errors, ASYNC_CANCEL of a blocked read and of nothing.
 * Prints "ok <n> checks" and exits 0, or names the failed check and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "uring_ops.h"
#include "uring_ring.h"

#define BS 4096
#define ENTRIES 8

static int checks;

#define CHECK(cond, ...)                                                                                 \
    do {                                                                                                 \
        checks++;                                                                                        \
        if (!(cond)) {                                                                                   \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                              \
            fprintf(stderr, __VA_ARGS__);                                                                \
            fprintf(stderr, "\n");                                                                       \
            exit(1);                                                                                     \
        }                                                                                                \
    } while (0)

/* Submit ops[0..n) and wait for all their completions; res[i] = result of the op with user_data i. */
static void
run(kv_ring *r, kv_op *ops, size_t n, int32_t *res)
{
    kv_prep *preps = calloc(n, sizeof(kv_prep));
    kv_err e;
    for (size_t i = 0; i < n; i++)
        CHECK(kv_op_encode(r, &ops[i], (ptrdiff_t)i, &preps[i], &e) == 0, "encode: %s", e.msg);
    CHECK(kv_ring_slots_reserve(r, (uint32_t)n) == 0, "slots");
    int err = 0;
    ptrdiff_t took = kv_ring_submit(r, preps, n, &err);
    CHECK(took == (ptrdiff_t)n, "submitted %td of %zu (errno %d)", took, n, err);
    kv_preps_release(preps, n);
    free(preps);
    size_t got = 0;
    while (got < n) {
        CHECK(kv_ring_reap(r) == 0, "reap");
        for (size_t i = 0; i < r->stash_len; i++) {
            CHECK(r->stash[i].user_data < n, "user_data %llu", (unsigned long long)r->stash[i].user_data);
            res[r->stash[i].user_data] = r->stash[i].res;
        }
        got += r->stash_len;
        r->stash_len = 0;
        if (got < n) {
            int ret = kv_ring_enter(r, 0, 1, IORING_ENTER_GETEVENTS);
            CHECK(ret >= 0 || ret == -EINTR || ret == -EBUSY, "enter %d", ret);
        }
    }
    CHECK(r->in_kernel == 0, "in_kernel %llu", (unsigned long long)r->in_kernel);
}

static kv_op
fixed(uint64_t kind, uint64_t ud, uint64_t file, uint64_t off, uint64_t boff, uint64_t len)
{
    kv_op op = {.kind = kind, .user_data = ud, .file_index = file, .file_offset = off, .buf = KV_BUF_FIXED,
                .buf_index = 0, .buf_offset = boff, .length = len};
    return op;
}

static kv_op
vec(uint64_t kind, uint64_t ud, uint64_t off, char *a, char *b)
{
    struct iovec *iov = malloc(2 * sizeof(*iov)); /* moves into the ring on encode */
    iov[0].iov_base = a;
    iov[0].iov_len = BS;
    iov[1].iov_base = b;
    iov[1].iov_len = BS;
    kv_op op = {.kind = kind, .user_data = ud, .file_offset = off, .buf = KV_BUF_IOV, .iov = iov, .iov_len = 2};
    return op;
}

int
main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    char path[4096];
    snprintf(path, sizeof(path), "%s/uring_selftest.bin", argv[1]);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0600);
    CHECK(fd >= 0, "open O_DIRECT %s: %s", path, strerror(errno));
    CHECK(ftruncate(fd, 64 * BS) == 0, "ftruncate");
    int pfd[2];
    CHECK(pipe(pfd) == 0, "pipe");

    unsigned char supported[KV_PROBE_OPS];
    unsigned features = 0;
    int sqpoll_ok = 0;
    const char *what = NULL;
    CHECK(kv_probe(supported, &features, &sqpoll_ok, &what) == 0, "probe: %s", what);
    CHECK(supported[IORING_OP_READ_FIXED] && supported[IORING_OP_WRITEV], "probe ops");
    CHECK(features & IORING_FEAT_NODROP, "NODROP");

    kv_ring ring, *r = &ring;
    kv_ring_init(r);
    CHECK(kv_ring_setup(r, ENTRIES, 0, 0, &what) == 0, "setup: %s", what);
    CHECK(r->sq_entries == ENTRIES && r->cq_entries == 2 * ENTRIES, "sizes %u %u", r->sq_entries, r->cq_entries);

    /* file 0: the O_DIRECT file; 1: a sparse (empty) slot; 2: the pipe's read end */
    int32_t fds[3] = {fd, -1, pfd[0]};
    CHECK(kv_ring_register_files(r, fds, 3) == 0, "register files");
    size_t buflen = 64 * BS;
    char *buf = aligned_alloc(BS, buflen);
    CHECK(buf != NULL, "alloc");
    struct iovec reg = {buf, buflen};
    CHECK(kv_ring_register_buffers(r, &reg, 1) == 0, "register buffers");
    int32_t res[64];

    /* fixed write then read back into another part of the buffer */
    for (size_t i = 0; i < 4 * BS; i++)
        buf[i] = (char)(i * 7 + 1);
    memset(buf + 8 * BS, 0, 4 * BS);
    kv_op w = fixed(KV_OP_WRITE, 0, 0, 0, 0, 4 * BS);
    run(r, &w, 1, res);
    CHECK(res[0] == 4 * BS, "write_fixed res %d", res[0]);
    kv_op rd = fixed(KV_OP_READ, 0, 0, 0, 8 * BS, 4 * BS);
    run(r, &rd, 1, res);
    CHECK(res[0] == 4 * BS, "read_fixed res %d", res[0]);
    CHECK(memcmp(buf, buf + 8 * BS, 4 * BS) == 0, "read_fixed bytes differ");

    /* writev from two segments, fdatasync, readv into two other segments */
    memset(buf + 16 * BS, 0x5a, BS);
    memset(buf + 17 * BS, 0xa5, BS);
    memset(buf + 20 * BS, 0, 2 * BS);
    kv_op wv = vec(KV_OP_WRITE, 0, 8 * BS, buf + 17 * BS, buf + 16 * BS); /* reversed order on disk */
    run(r, &wv, 1, res);
    CHECK(res[0] == 2 * BS, "writev res %d", res[0]);
    kv_op fs = {.kind = KV_OP_FSYNC, .user_data = 0};
    run(r, &fs, 1, res);
    CHECK(res[0] == 0, "fsync res %d", res[0]);
    kv_op rv = vec(KV_OP_READ, 0, 8 * BS, buf + 20 * BS, buf + 21 * BS);
    run(r, &rv, 1, res);
    CHECK(res[0] == 2 * BS, "readv res %d", res[0]);
    CHECK(memcmp(buf + 20 * BS, buf + 17 * BS, BS) == 0 && memcmp(buf + 21 * BS, buf + 16 * BS, BS) == 0,
          "readv bytes differ");

    /* a batch of 3x the SQ (and 1.5x the CQ): submit loops on a full SQ and drains the CQ into the stash */
    enum { BIG = 3 * ENTRIES };
    kv_op big[BIG];
    for (int i = 0; i < BIG; i++) {
        big[i] = fixed(KV_OP_WRITE, (uint64_t)i, 0, (uint64_t)(32 + i % 32) * BS, (uint64_t)(i % 64) * BS, BS);
    }
    run(r, big, BIG, res);
    for (int i = 0; i < BIG; i++)
        CHECK(res[i] == BS, "big batch op %d res %d", i, res[i]);

    /* kernel errors come back as results: a sparse file slot, a misaligned O_DIRECT offset */
    kv_op bad[2] = {fixed(KV_OP_READ, 0, 1, 0, 0, BS), fixed(KV_OP_READ, 1, 0, 1, 0, BS)};
    run(r, bad, 2, res);
    CHECK(res[0] == -EBADF, "sparse slot res %d", res[0]);
    CHECK(res[1] == -EINVAL, "misaligned O_DIRECT res %d", res[1]);

    /* validation errors never reach the kernel */
    kv_err e;
    kv_prep p;
    kv_op v = fixed(KV_OP_READ, 0, 3, 0, 0, BS);
    CHECK(kv_op_encode(r, &v, 5, &p, &e) < 0 && e.kind == KV_ERR_VALUE && strstr(e.msg, "op 5: file_index 3"),
          "file_index: %s", e.msg);
    v = fixed(KV_OP_READ, 0, 0, 0, buflen - BS, 2 * BS);
    CHECK(kv_op_encode(r, &v, 0, &p, &e) < 0 && strstr(e.msg, "out of range for registered buffer"),
          "slice: %s", e.msg);
    v = fixed(9, 0, 0, 0, 0, BS);
    CHECK(kv_op_encode(r, &v, 0, &p, &e) < 0 && strstr(e.msg, "unknown op kind 9"), "kind: %s", e.msg);
    v = (kv_op){.kind = KV_OP_FSYNC, .file_offset = BS};
    CHECK(kv_op_encode(r, &v, 0, &p, &e) < 0 && strstr(e.msg, "fsync file_offset must be 0"), "fsync: %s", e.msg);
    v = (kv_op){.kind = KV_OP_READ, .buf = KV_BUF_IOV, .iov = NULL, .iov_len = 0};
    CHECK(kv_op_encode(r, &v, 0, &p, &e) < 0 && strstr(e.msg, "iov list must have"), "iov: %s", e.msg);

    /* ASYNC_CANCEL: a read of an empty pipe blocks until cancelled; a cancel of nothing gets -ENOENT */
    if (supported[IORING_OP_ASYNC_CANCEL]) {
        char *pb = buf + 40 * BS;
        struct iovec *iov = malloc(sizeof(*iov));
        iov->iov_base = pb;
        iov->iov_len = 16;
        kv_op blocked = {.kind = KV_OP_READ, .user_data = 77, .file_index = 2, .buf = KV_BUF_IOV, .iov = iov,
                         .iov_len = 1};
        kv_prep bp;
        CHECK(kv_op_encode(r, &blocked, 0, &bp, &e) == 0, "encode pipe read: %s", e.msg);
        CHECK(kv_ring_slots_reserve(r, 1) == 0, "slots");
        int err = 0;
        CHECK(kv_ring_submit(r, &bp, 1, &err) == 1, "submit pipe read (errno %d)", err);
        CHECK(kv_ring_find_slot(r, 77) != KV_NO_SLOT, "blocked read has a slot");
        kv_op c[2] = {{.kind = KV_OP_CANCEL, .user_data = 0, .target_user_data = 77},
                      {.kind = KV_OP_CANCEL, .user_data = 1, .target_user_data = 12345}};
        int32_t cres[2] = {1, 1};
        int32_t tres = 1;
        kv_prep cp[2];
        for (int i = 0; i < 2; i++)
            CHECK(kv_op_encode(r, &c[i], i, &cp[i], &e) == 0, "encode cancel: %s", e.msg);
        CHECK(kv_ring_slots_reserve(r, 2) == 0 && kv_ring_submit(r, cp, 2, &err) == 2, "submit cancels");
        for (int seen = 0; seen < 3;) {
            CHECK(kv_ring_reap(r) == 0, "reap");
            for (size_t i = 0; i < r->stash_len; i++, seen++) {
                if (r->stash[i].user_data == 77)
                    tres = r->stash[i].res;
                else
                    cres[r->stash[i].user_data] = r->stash[i].res;
            }
            r->stash_len = 0;
            if (seen < 3)
                CHECK(kv_ring_enter(r, 0, 1, IORING_ENTER_GETEVENTS) >= 0 || errno == EINTR, "enter");
        }
        CHECK(tres == -ECANCELED || tres == -EINTR, "cancelled read res %d", tres);
        CHECK(cres[0] == 0, "cancel res %d", cres[0]);
        CHECK(cres[1] == -ENOENT, "cancel of nothing res %d", cres[1]);
        CHECK(r->in_kernel == 0 && kv_ring_find_slot(r, 77) == KV_NO_SLOT, "slots released");
        CHECK(r->nfree == r->nslots, "every slot free again (%u of %u)", r->nfree, r->nslots);
    }

    CHECK(kv_ring_unregister_buffers(r) == 0 && kv_ring_unregister_files(r) == 0, "unregister");
    kv_ring_wait_all_discard(r);
    kv_ring_teardown(r);
    kv_ring_teardown(r); /* idempotent */
    free(buf);
    close(fd);
    close(pfd[0]);
    close(pfd[1]);
    unlink(path);
    printf("ok %d checks\n", checks);
    return 0;
}
