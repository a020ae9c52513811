/*
 * C-only exercise of kvpool/native/vhost_user.c against a live vhost-user-blk target, so the
 * protocol and virtqueue core can run under ASan/UBSan and valgrind without CPython in the way.
 *
 *   vhost_selftest SOCKET [poll]
 *
 * Writes a pattern with many requests per kick over every queue, reads it back with a
 * multi-segment request, checks a read past the end fails, flushes, adds caller-owned memory to
 * the live connection's memory table and reads into it, shuts down.  Exit 0 = pass.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <unistd.h>

#include "../../kvpool/native/vhost_user.h"

#define CHECK(c, ...)                                                                                  \
    do {                                                                                               \
        if (!(c)) {                                                                                    \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                      \
            fprintf(stderr, __VA_ARGS__);                                                              \
            fprintf(stderr, "\n");                                                                     \
            exit(1);                                                                                   \
        }                                                                                              \
    } while (0)

static vu_dev dev;

/* Wait for `want` completions over all queues; returns the number with status OK. */
static int wait_all(int want, int use_poll, uint64_t *bad_token)
{
    int got = 0, ok = 0;
    vu_completion c[64];
    while (got < want) {
        if (use_poll) {
            vu_poll(&dev, 1000000);
        } else {
            struct pollfd p[VU_MAX_QUEUES];
            for (unsigned q = 0; q < dev.nqueues; q++)
                p[q] = (struct pollfd){.fd = dev.vqs[q].call_fd, .events = POLLIN};
            CHECK(poll(p, dev.nqueues, 5000) > 0, "no completion within 5 s");
            for (unsigned q = 0; q < dev.nqueues; q++) {
                uint64_t v;
                if (p[q].revents & POLLIN)
                    CHECK(read(p[q].fd, &v, 8) == 8, "eventfd read");
            }
        }
        for (unsigned q = 0; q < dev.nqueues; q++) {
            int n = vu_reap(&dev, q, c, 64);
            CHECK(n >= 0, "reap: %s", dev.err);
            for (int i = 0; i < n; i++) {
                if (c[i].status == VIRTIO_BLK_S_OK)
                    ok++;
                else if (bad_token)
                    *bad_token = c[i].token;
            }
            got += n;
        }
    }
    return ok;
}

int main(int argc, char **argv)
{
    CHECK(argc >= 2, "usage: %s SOCKET [poll]", argv[0]);
    int use_poll = argc > 2 && !strcmp(argv[2], "poll");
    vu_region r;
    char err[VU_ERRLEN];
    CHECK(vu_region_create(&r, 8u << 20, VU_HUGE_NEVER, "selftest", err, sizeof err) == 0, "%s", err);
    int rc = vu_dev_connect(&dev, argv[1], &r, 0, 128, use_poll ? VU_F_POLL : 0, 5000);
    CHECK(rc == 0, "connect: %s", dev.err);
    CHECK(dev.have_config && dev.cfg.capacity > 0, "no config");
    uint64_t cap = dev.cfg.capacity * 512;

    /* 48 x 4 KiB writes spread over the queues, one publish per queue. */
    for (int i = 0; i < 4096 * 48; i++)
        r.base[i] = (uint8_t)(i * 7 + 3);
    for (int i = 0; i < 48; i++) {
        struct iovec v = {r.base + i * 4096, 4096};
        uint64_t cur = 0;
        int done;
        CHECK(vu_enqueue(&dev, (unsigned)i % dev.nqueues, VU_OP_WRITE, (uint64_t)i * 4096, &v, 1, (uint64_t)i,
                         &cur, &done) == 1 && done, "enqueue write %d", i);
    }
    for (unsigned q = 0; q < dev.nqueues; q++)
        CHECK(vu_publish(&dev, q) >= 0, "publish");
    CHECK(wait_all(48, use_poll, NULL) == 48, "writes failed");

    /* Read back with 48 scattered segments in one op (more than fit in one request if seg_max < 48). */
    struct iovec iov[48];
    for (int i = 0; i < 48; i++)
        iov[i] = (struct iovec){r.base + (1u << 20) + (size_t)i * 8192, 4096};
    uint64_t cur = 0;
    int done = 0, reqs = 0;
    while (!done) {
        int n = vu_enqueue(&dev, 0, VU_OP_READ, 0, iov, 48, 100, &cur, &done);
        CHECK(n > 0, "enqueue read");
        reqs += n;
    }
    CHECK(vu_publish(&dev, 0) >= 0, "publish");
    CHECK(wait_all(reqs, use_poll, NULL) == reqs, "read failed");
    for (int i = 0; i < 48; i++)
        for (int j = 0; j < 4096; j++)
            CHECK(r.base[(1u << 20) + i * 8192 + j] == (uint8_t)((i * 4096 + j) * 7 + 3), "mismatch at %d/%d", i, j);

    /* Past the end: an error status, and the ring keeps working. */
    struct iovec one = {r.base, 4096};
    cur = 0;
    CHECK(vu_enqueue(&dev, 0, VU_OP_READ, cap, &one, 1, 7, &cur, &done) == 1, "enqueue eof");
    CHECK(vu_enqueue(&dev, 0, VU_OP_FLUSH, 0, NULL, 0, 8, &cur, &done) == 1, "enqueue flush");
    vu_publish(&dev, 0);
    uint64_t bad = 0;
    CHECK(wait_all(2, use_poll, &bad) == 1 && bad == 7, "read past end should fail, flush succeed");

    /* Invalid ops are refused without touching the ring. */
    struct iovec outside = {(void *)&cur, 512};
    cur = 0;
    CHECK(vu_enqueue(&dev, 0, VU_OP_READ, 0, &outside, 1, 9, &cur, &done) == -EFAULT, "outside region accepted");
    CHECK(dev.vqs[0].num_free == dev.vqs[0].num, "descriptors leaked");

    /* Caller-owned memory added to the live table (SET_MEM_TABLE again, nothing in flight): a read
     * into it lands there; the extra region stays the caller's (its fd is not closed by shutdown). */
    vu_region x;
    CHECK(vu_region_create(&x, 2u << 20, VU_HUGE_NEVER, "selftest-extra", err, sizeof err) == 0, "%s", err);
    struct iovec in_x = {x.base + 4096, 4096};
    cur = 0;
    CHECK(vu_enqueue(&dev, 0, VU_OP_READ, 0, &in_x, 1, 10, &cur, &done) == -EFAULT, "unshared memory accepted");
    vu_region overlap = r;
    CHECK(vu_dev_set_memory(&dev, &overlap, 1) == -EINVAL, "overlapping region accepted");
    CHECK(vu_dev_set_memory(&dev, &x, 1) == 0, "set_memory: %s", dev.err);
    cur = 0;
    CHECK(vu_enqueue(&dev, 1 % dev.nqueues, VU_OP_READ, 4096, &in_x, 1, 11, &cur, &done) == 1, "enqueue extra");
    vu_publish(&dev, 1 % dev.nqueues);
    CHECK(wait_all(1, use_poll, NULL) == 1, "read into the extra region failed");
    for (int j = 0; j < 4096; j++)
        CHECK(x.base[4096 + j] == (uint8_t)((4096 + j) * 7 + 3), "extra mismatch at %d", j);

    unsigned nq = dev.nqueues;
    CHECK(vu_dev_shutdown(&dev) == 0, "shutdown: %s", dev.err);
    CHECK(fcntl(x.fd, F_GETFD) >= 0, "the extra region's fd was closed by the device");
    vu_region_destroy(&x);
    vu_region_destroy(&r);
    printf("ok (%u queues, %d read requests, seg_max %u)\n", nq, reqs, dev.seg_max);
    return 0;
}
