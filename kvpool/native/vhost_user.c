/*
 * vhost-user-blk frontend: protocol over a Unix socket + split virtqueue driver.
 * See vhost_user.h for the model.  References: the vhost-user spec (docs/interop/vhost-user.rst in
 * QEMU), virtio 1.1 section 2.6 (split virtqueues) and 5.2 (block device).
 */
#define _GNU_SOURCE
#include "vhost_user.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <linux/memfd.h>
#include <linux/vhost_types.h>

/* --- protocol constants (vhost-user spec; not in any uapi header) ----------------------------- */
enum {
    VHOST_USER_GET_FEATURES = 1,
    VHOST_USER_SET_FEATURES = 2,
    VHOST_USER_SET_OWNER = 3,
    VHOST_USER_SET_MEM_TABLE = 5,
    VHOST_USER_SET_VRING_NUM = 8,
    VHOST_USER_SET_VRING_ADDR = 9,
    VHOST_USER_SET_VRING_BASE = 10,
    VHOST_USER_GET_VRING_BASE = 11,
    VHOST_USER_SET_VRING_KICK = 12,
    VHOST_USER_SET_VRING_CALL = 13,
    VHOST_USER_GET_PROTOCOL_FEATURES = 15,
    VHOST_USER_SET_PROTOCOL_FEATURES = 16,
    VHOST_USER_GET_QUEUE_NUM = 17,
    VHOST_USER_SET_VRING_ENABLE = 18,
    VHOST_USER_GET_CONFIG = 24,
};

#define VHOST_USER_VERSION 0x1u
#define VHOST_USER_REPLY_MASK (1u << 2)
#define VHOST_USER_NEED_REPLY (1u << 3)
#define VHOST_USER_VRING_NOFD (1u << 8)
#define VHOST_USER_MAX_FDS 8
#define VHOST_USER_F_PROTOCOL_FEATURES 30

#define VHOST_USER_PROTOCOL_F_MQ 0
#define VHOST_USER_PROTOCOL_F_REPLY_ACK 3
#define VHOST_USER_PROTOCOL_F_CONFIG 9

#ifndef VIRTIO_F_VERSION_1
#define VIRTIO_F_VERSION_1 32
#endif

#define HUGE_2M (2u << 20)

struct vu_mem_region {
    uint64_t guest_phys_addr, memory_size, userspace_addr, mmap_offset;
};

struct vu_config_hdr {
    uint32_t offset, size, flags;
};

struct vu_msg {
    uint32_t request, flags, size;
    union {
        uint64_t u64;
        struct vhost_vring_state state;
        struct vhost_vring_addr addr;
        struct {
            uint32_t nregions, padding;
            struct vu_mem_region regions[VHOST_USER_MAX_FDS];
        } mem;
        struct {
            struct vu_config_hdr hdr;
            uint8_t data[256];
        } config;
    } p;
} __attribute__((packed));

#define VU_HDR_SIZE 12u

static void seterr(vu_dev *d, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->err, sizeof d->err, fmt, ap);
    va_end(ap);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* --- regions ----------------------------------------------------------------------------------- */

int vu_region_create(vu_region *r, size_t size, int huge_mode, const char *name, char *err, size_t errlen)
{
    memset(r, 0, sizeof *r);
    r->fd = -1;
    if (size == 0) {
        snprintf(err, errlen, "region size must be > 0");
        return -EINVAL;
    }
    /* 2 MiB multiples always: hugetlb needs it, and SPDK registers memory with its IOMMU/vtophys map
     * in 2 MiB units, so a plain region sized and aligned the same way also works with SPDK when it
     * runs with --no-huge/iova=va.  Alignment of the mapping is handled below. */
    size = (size + HUGE_2M - 1) & ~(size_t)(HUGE_2M - 1);
    int fd = -1, huge = 0;
    if (huge_mode != VU_HUGE_NEVER) {
        fd = memfd_create(name, MFD_CLOEXEC | MFD_HUGETLB | MFD_HUGE_2MB);
        if (fd >= 0 && ftruncate(fd, (off_t)size) != 0) {
            close(fd);
            fd = -1;
        }
        if (fd >= 0) {
            /* MAP_POPULATE on hugetlb fails with ENOMEM/SIGBUS-free semantics only if pages are
             * reserved; the mmap itself reserves them, so failure here means "not enough". */
            void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
            if (p == MAP_FAILED) {
                close(fd);
                fd = -1;
            } else {
                r->base = p;
                r->resv = p;
                r->resv_len = size;
                huge = 1;
            }
        }
        if (fd < 0 && huge_mode == VU_HUGE_REQUIRE) {
            snprintf(err, errlen, "cannot map %zu bytes of 2 MiB huge pages (reserve them with "
                     "vm.nr_hugepages): %s", size, strerror(errno));
            return -ENOMEM;
        }
    }
    if (fd < 0) {
        fd = memfd_create(name, MFD_CLOEXEC);
        if (fd < 0) {
            int e = errno;
            snprintf(err, errlen, "memfd_create: %s", strerror(e));
            return -e;
        }
        if (ftruncate(fd, (off_t)size) != 0) {
            int e = errno;
            close(fd);
            snprintf(err, errlen, "ftruncate(memfd, %zu): %s", size, strerror(e));
            return -e;
        }
        /* Reserve size + 2 MiB of address space, then map the memfd at the 2 MiB aligned point
         * inside it, so the region starts on a 2 MiB boundary like a hugetlb mapping would. */
        size_t rl = size + HUGE_2M;
        void *resv = mmap(NULL, rl, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (resv == MAP_FAILED) {
            int e = errno;
            close(fd);
            snprintf(err, errlen, "mmap reserve %zu: %s", rl, strerror(e));
            return -e;
        }
        uintptr_t a = ((uintptr_t)resv + HUGE_2M - 1) & ~(uintptr_t)(HUGE_2M - 1);
        void *p = mmap((void *)a, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED | MAP_POPULATE, fd, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            munmap(resv, rl);
            close(fd);
            snprintf(err, errlen, "mmap memfd %zu: %s", size, strerror(e));
            return -e;
        }
        r->base = p;
        r->resv = resv;
        r->resv_len = rl;
    }
    r->fd = fd;
    r->size = size;
    r->hugetlb = huge;
    return 0;
}

void vu_region_destroy(vu_region *r)
{
    if (r->resv)
        munmap(r->resv, r->resv_len);
    if (r->fd >= 0)
        close(r->fd);
    memset(r, 0, sizeof *r);
    r->fd = -1;
}

/* --- messages ---------------------------------------------------------------------------------- */

static int wait_fd(vu_dev *d, int fd, short events, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            seterr(d, "vhost-user target did not answer within %d ms", d->timeout_ms);
            return -ETIMEDOUT;
        }
        struct pollfd p = {.fd = fd, .events = events};
        int rc = poll(&p, 1, (int)left);
        if (rc > 0)
            return 0;
        if (rc < 0 && errno != EINTR) {
            int e = errno;
            seterr(d, "poll: %s", strerror(e));
            return -e;
        }
    }
}

static int send_msg(vu_dev *d, struct vu_msg *m, const int *fds, int nfds)
{
    m->flags |= VHOST_USER_VERSION;
    struct iovec iov = {.iov_base = m, .iov_len = VU_HDR_SIZE + m->size};
    union {
        char buf[CMSG_SPACE(sizeof(int) * VHOST_USER_MAX_FDS)];
        struct cmsghdr align;
    } u;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds > 0) {
        memset(&u, 0, sizeof u);
        mh.msg_control = u.buf;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    int64_t deadline = now_ms() + d->timeout_ms;
    for (;;) {
        ssize_t n = sendmsg(d->sock, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n == (ssize_t)iov.iov_len)
            return 0;
        if (n >= 0) { /* a stream socket may take part of a message; the fds went with the first byte */
            iov.iov_base = (char *)iov.iov_base + n;
            iov.iov_len -= (size_t)n;
            mh.msg_control = NULL;
            mh.msg_controllen = 0;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN) {
            int rc = wait_fd(d, d->sock, POLLOUT, deadline);
            if (rc)
                return rc;
            continue;
        }
        int e = errno;
        seterr(d, "vhost-user send (request %u): %s", m->request, strerror(e));
        return -e;
    }
}

static int recv_all(vu_dev *d, void *buf, size_t len, int64_t deadline)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = recv(d->sock, (char *)buf + got, len - got, MSG_DONTWAIT);
        if (n > 0) {
            got += (size_t)n;
            continue;
        }
        if (n == 0) {
            seterr(d, "vhost-user target closed the connection");
            return -ECONNRESET;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN) {
            int rc = wait_fd(d, d->sock, POLLIN, deadline);
            if (rc)
                return rc;
            continue;
        }
        int e = errno;
        seterr(d, "vhost-user recv: %s", strerror(e));
        return -e;
    }
    return 0;
}

static int recv_reply(vu_dev *d, uint32_t request, struct vu_msg *m, uint32_t want_size)
{
    int64_t deadline = now_ms() + d->timeout_ms;
    int rc = recv_all(d, m, VU_HDR_SIZE, deadline);
    if (rc)
        return rc;
    if (m->request != request || !(m->flags & VHOST_USER_REPLY_MASK)) {
        seterr(d, "vhost-user protocol error: expected reply to %u, got request %u flags 0x%x", request,
               m->request, m->flags);
        return -EPROTO;
    }
    if (m->size > sizeof m->p || (want_size && m->size != want_size)) {
        seterr(d, "vhost-user protocol error: reply to %u has size %u (want %u)", request, m->size, want_size);
        return -EPROTO;
    }
    return recv_all(d, &m->p, m->size, deadline);
}

/* Send a request that has no reply of its own; with REPLY_ACK negotiated ask for an ack so a
 * refused setting is reported here rather than as a dead queue later. */
static int send_set(vu_dev *d, struct vu_msg *m, const int *fds, int nfds)
{
    uint32_t req = m->request;
    int ack = (d->proto_features >> VHOST_USER_PROTOCOL_F_REPLY_ACK) & 1;
    if (ack)
        m->flags |= VHOST_USER_NEED_REPLY;
    int rc = send_msg(d, m, fds, nfds);
    if (rc || !ack)
        return rc;
    struct vu_msg r;
    rc = recv_reply(d, req, &r, 8);
    if (rc)
        return rc;
    if (r.p.u64 != 0) {
        seterr(d, "vhost-user target refused request %u (ack %llu)", req, (unsigned long long)r.p.u64);
        return -EIO;
    }
    return 0;
}

static int get_u64(vu_dev *d, uint32_t req, uint64_t *out)
{
    struct vu_msg m = {.request = req, .size = 0};
    int rc = send_msg(d, &m, NULL, 0);
    if (rc)
        return rc;
    rc = recv_reply(d, req, &m, 8);
    if (rc)
        return rc;
    *out = m.p.u64;
    return 0;
}

static int set_u64(vu_dev *d, uint32_t req, uint64_t v)
{
    struct vu_msg m = {.request = req, .size = 8};
    m.p.u64 = v;
    return send_set(d, &m, NULL, 0);
}

static int set_state(vu_dev *d, uint32_t req, unsigned index, unsigned num)
{
    struct vu_msg m = {.request = req, .size = sizeof(struct vhost_vring_state)};
    m.p.state.index = index;
    m.p.state.num = num;
    return send_set(d, &m, NULL, 0);
}

static int set_vring_fd(vu_dev *d, uint32_t req, unsigned index, int fd)
{
    struct vu_msg m = {.request = req, .size = 8};
    m.p.u64 = index & 0xff;
    if (fd < 0)
        m.p.u64 |= VHOST_USER_VRING_NOFD;
    return send_set(d, &m, fd >= 0 ? &fd : NULL, fd >= 0 ? 1 : 0);
}

/* --- virtqueue layout -------------------------------------------------------------------------- */

/* Event-index words (virtio 1.1 2.6.7/2.6.8): used_event trails the avail ring, avail_event trails
 * the used ring. */
static inline uint16_t *used_event_p(vu_vq *vq) { return (uint16_t *)&vq->avail->ring[vq->num]; }
static inline uint16_t *avail_event_p(vu_vq *vq) { return (uint16_t *)&vq->used->ring[vq->num]; }

static size_t vq_bytes(unsigned num)
{
    /* vring_size() includes the event-idx words; used ring 4 KiB aligned as the legacy layout. */
    size_t ring = vring_size(num, 4096);
    size_t extra = (size_t)num * (sizeof(struct virtio_blk_outhdr) + 1);
    return (ring + 16 + extra + 4095) & ~(size_t)4095; /* +16: header slots are 16-byte aligned */
}

static void vq_init(vu_vq *vq, unsigned index, unsigned num, uint8_t *mem)
{
    struct vring vr;
    vring_init(&vr, num, mem, 4096);
    memset(mem, 0, vq_bytes(num));
    vq->index = index;
    vq->num = num;
    vq->desc = vr.desc;
    vq->avail = vr.avail;
    vq->used = vr.used;
    uint8_t *p = mem + vring_size(num, 4096);
    p = (uint8_t *)(((uintptr_t)p + 15) & ~(uintptr_t)15);
    vq->hdrs = (struct virtio_blk_outhdr *)p;
    vq->status = p + (size_t)num * sizeof(struct virtio_blk_outhdr);
    for (unsigned i = 0; i < num; i++)
        vq->desc[i].next = (uint16_t)((i + 1) % num);
    vq->free_head = 0;
    vq->num_free = (uint16_t)(num > 0xffff ? 0xffff : num);
    vq->avail_idx = vq->avail_published = vq->last_used = 0;
    vq->outstanding = 0;
    vq->kicks = vq->calls_suppressed = vq->reaped = 0;
}

/* --- connect ------------------------------------------------------------------------------------ */

static void close_fds(vu_dev *d)
{
    for (unsigned i = 0; i < VU_MAX_QUEUES; i++) {
        vu_vq *vq = &d->vqs[i];
        if (vq->kick_fd >= 0)
            close(vq->kick_fd);
        if (vq->call_fd >= 0)
            close(vq->call_fd);
        vq->kick_fd = vq->call_fd = -1;
        free(vq->inflight);
        vq->inflight = NULL;
    }
    if (d->sock >= 0)
        close(d->sock);
    d->sock = -1;
    vu_region_destroy(&d->ring);
}

/* SET_MEM_TABLE: ring region, data region, then the caller's extra regions.  Guest-physical
 * addresses equal our virtual addresses, so descriptors carry plain pointers. */
static int send_mem_table(vu_dev *d)
{
    struct vu_msg m = {.request = VHOST_USER_SET_MEM_TABLE};
    const vu_region *rs[2 + VU_MAX_EXTRA];
    unsigned n = 0;
    rs[n++] = &d->ring;
    rs[n++] = d->data;
    for (unsigned i = 0; i < d->nextra; i++)
        rs[n++] = &d->extra[i];
    int fds[2 + VU_MAX_EXTRA];
    m.p.mem.nregions = n;
    m.p.mem.padding = 0;
    for (unsigned i = 0; i < n; i++) {
        m.p.mem.regions[i].guest_phys_addr = (uint64_t)(uintptr_t)rs[i]->base;
        m.p.mem.regions[i].memory_size = rs[i]->size;
        m.p.mem.regions[i].userspace_addr = (uint64_t)(uintptr_t)rs[i]->base;
        m.p.mem.regions[i].mmap_offset = 0;
        fds[i] = rs[i]->fd;
    }
    m.size = 8 + n * (uint32_t)sizeof(struct vu_mem_region);
    return send_set(d, &m, fds, (int)n);
}

static int check_extra(vu_dev *d, const vu_region *extra, unsigned nextra)
{
    if (nextra > VU_MAX_EXTRA) {
        seterr(d, "at most %d extra memory regions fit in a vhost-user memory table, got %u", VU_MAX_EXTRA, nextra);
        return -E2BIG;
    }
    for (unsigned i = 0; i < nextra; i++) {
        const vu_region *r = &extra[i];
        uintptr_t b = (uintptr_t)r->base;
        if (r->fd < 0 || !r->base || r->size == 0 || (b & 4095) || (r->size & 4095)) {
            seterr(d, "extra region %u: needs an fd and a 4 KiB aligned, 4 KiB sized mapping", i);
            return -EINVAL;
        }
        /* Guest-physical ranges of one table must not overlap. */
        const vu_region *others[2] = {&d->ring, d->data};
        for (unsigned k = 0; k < 2 + i; k++) {
            const vu_region *o = k < 2 ? others[k] : &extra[k - 2];
            if (!o || !o->base)
                continue;
            uintptr_t ob = (uintptr_t)o->base;
            if (b < ob + o->size && ob < b + r->size) {
                seterr(d, "extra region %u overlaps another region of the memory table", i);
                return -EINVAL;
            }
        }
    }
    return 0;
}

int vu_dev_set_memory(vu_dev *d, const vu_region *extra, unsigned nextra)
{
    int rc = check_extra(d, extra, nextra);
    if (rc)
        return rc;
    for (unsigned i = 0; i < nextra; i++) {
        d->extra[i] = extra[i];
        d->extra[i].resv = NULL; /* never ours to unmap */
        d->extra[i].resv_len = 0;
    }
    d->nextra = nextra;
    if (d->sock < 0 || d->nqueues == 0)
        return 0; /* not connected: the next connect sends it */
    return send_mem_table(d);
}

static int handshake(vu_dev *d, unsigned queues, unsigned qsize)
{
    int rc;
    {
        /* SET_OWNER has no payload; REPLY_ACK is not negotiated yet so there is no reply either. */
        struct vu_msg m = {.request = VHOST_USER_SET_OWNER, .size = 0};
        if ((rc = send_msg(d, &m, NULL, 0)))
            return rc;
    }
    if ((rc = get_u64(d, VHOST_USER_GET_FEATURES, &d->offered_features)))
        return rc;
    if (d->offered_features & (1ull << VHOST_USER_F_PROTOCOL_FEATURES)) {
        if ((rc = get_u64(d, VHOST_USER_GET_PROTOCOL_FEATURES, &d->offered_proto)))
            return rc;
        uint64_t want = d->offered_proto & ((1ull << VHOST_USER_PROTOCOL_F_MQ) |
                                            (1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK) |
                                            (1ull << VHOST_USER_PROTOCOL_F_CONFIG));
        /* proto_features still 0 here: SET_PROTOCOL_FEATURES itself is sent without NEED_REPLY. */
        if ((rc = set_u64(d, VHOST_USER_SET_PROTOCOL_FEATURES, want)))
            return rc;
        d->proto_features = want;
    }
    d->max_queues = 1;
    if (d->proto_features & (1ull << VHOST_USER_PROTOCOL_F_MQ)) {
        uint64_t n;
        if ((rc = get_u64(d, VHOST_USER_GET_QUEUE_NUM, &n)))
            return rc;
        d->max_queues = n ? (unsigned)n : 1;
    }
    if (d->proto_features & (1ull << VHOST_USER_PROTOCOL_F_CONFIG)) {
        /* Targets refuse (reply with size 0) a read longer than *their* virtio_blk_config, which
         * grows with the virtio spec (secure erase, zoned).  Ask for our header's size, then for the
         * 1.1-era 60 bytes, then for the 36 bytes up to num_queues that we actually need. */
        static const uint32_t sizes[] = {sizeof(struct virtio_blk_config), 60, 36};
        for (unsigned k = 0; k < sizeof sizes / sizeof sizes[0] && !d->have_config; k++) {
            uint32_t want = sizes[k] < sizeof(struct virtio_blk_config) ? sizes[k] : sizeof(struct virtio_blk_config);
            if (k && want == sizes[k - 1])
                continue;
            struct vu_msg m = {.request = VHOST_USER_GET_CONFIG};
            m.size = (uint32_t)sizeof(struct vu_config_hdr) + want;
            m.p.config.hdr.offset = 0;
            m.p.config.hdr.size = want;
            m.p.config.hdr.flags = 0;
            memset(m.p.config.data, 0, sizeof m.p.config.data);
            if ((rc = send_msg(d, &m, NULL, 0)))
                return rc;
            if ((rc = recv_reply(d, VHOST_USER_GET_CONFIG, &m, 0)))
                return rc;
            if (m.size < sizeof(struct vu_config_hdr) + 8)
                continue;
            size_t n = m.size - sizeof(struct vu_config_hdr);
            memset(&d->cfg, 0, sizeof d->cfg);
            memcpy(&d->cfg, m.p.config.data, n < sizeof d->cfg ? n : sizeof d->cfg);
            d->have_config = 1;
        }
        if (!d->have_config) {
            seterr(d, "the target offers CONFIG but answered no GET_CONFIG request");
            return -EPROTO;
        }
    }

    uint64_t want = (1ull << VIRTIO_F_VERSION_1) | (1ull << VHOST_USER_F_PROTOCOL_FEATURES) |
                    (1ull << VIRTIO_BLK_F_SIZE_MAX) | (1ull << VIRTIO_BLK_F_SEG_MAX) |
                    (1ull << VIRTIO_BLK_F_BLK_SIZE) | (1ull << VIRTIO_BLK_F_FLUSH) |
                    (1ull << VIRTIO_BLK_F_RO) | (1ull << VIRTIO_BLK_F_MQ) | (1ull << VIRTIO_BLK_F_TOPOLOGY);
    if (d->event_idx)
        want |= 1ull << VIRTIO_RING_F_EVENT_IDX;
    /* Never INDIRECT_DESC / RING_PACKED: we build plain split-ring chains. */
    d->features = d->offered_features & want;
    d->event_idx = (d->features >> VIRTIO_RING_F_EVENT_IDX) & 1;

    unsigned devq = d->max_queues;
    if ((d->features & (1ull << VIRTIO_BLK_F_MQ)) && d->have_config && d->cfg.num_queues)
        devq = devq < d->cfg.num_queues ? devq : d->cfg.num_queues;
    if (queues == 0)
        queues = devq;
    if (queues > devq) {
        seterr(d, "target offers %u queue(s), %u requested", devq, queues);
        return -EINVAL;
    }
    if (queues > VU_MAX_QUEUES)
        queues = VU_MAX_QUEUES;
    d->nqueues = queues;

    /* Effective request geometry.  seg_max counts data segments only (header and status are extra);
     * without SEG_MAX the only bound is the ring; without SIZE_MAX a segment may be any size, but
     * we cap at 4 MiB and keep every piece a 4 KiB multiple so split points stay sector aligned. */
    uint32_t seg_max = qsize - 2;
    if ((d->features & (1ull << VIRTIO_BLK_F_SEG_MAX)) && d->cfg.seg_max)
        seg_max = d->cfg.seg_max < seg_max ? d->cfg.seg_max : seg_max;
    uint32_t size_max = 4u << 20;
    if ((d->features & (1ull << VIRTIO_BLK_F_SIZE_MAX)) && d->cfg.size_max)
        size_max = d->cfg.size_max < size_max ? d->cfg.size_max : size_max;
    size_max &= ~4095u;
    if (size_max == 0) {
        seterr(d, "target's size_max %u is below 4096", d->cfg.size_max);
        return -EINVAL;
    }
    d->seg_max = seg_max;
    d->size_max = size_max;

    if ((rc = set_u64(d, VHOST_USER_SET_FEATURES, d->features)))
        return rc;

    /* Ring region, then the memory table: ring region + the caller's data region. */
    size_t per = vq_bytes(qsize), total = per * queues;
    char err[VU_ERRLEN];
    rc = vu_region_create(&d->ring, total, d->data->hugetlb ? VU_HUGE_AUTO : VU_HUGE_NEVER, "kvpool-vhost-rings",
                          err, sizeof err);
    if (rc) {
        seterr(d, "%s", err);
        return rc;
    }
    for (unsigned i = 0; i < queues; i++) {
        vu_vq *vq = &d->vqs[i];
        vq_init(vq, i, qsize, d->ring.base + per * i);
        vq->inflight = calloc(qsize, sizeof *vq->inflight);
        if (!vq->inflight) {
            seterr(d, "out of memory");
            return -ENOMEM;
        }
        /* Poll mode asks the device not to interrupt at all (flag when event idx is off; otherwise
         * used_event is parked far ahead, see arm_interrupts()). */
        if (d->poll && !d->event_idx)
            vq->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
        if (d->event_idx)
            *used_event_p(vq) = d->poll ? (uint16_t)0x8000 : 0;
    }
    if ((rc = send_mem_table(d)))
        return rc;
    for (unsigned i = 0; i < queues; i++) {
        vu_vq *vq = &d->vqs[i];
        vq->kick_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        vq->call_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (vq->kick_fd < 0 || vq->call_fd < 0) {
            int e = errno;
            seterr(d, "eventfd: %s", strerror(e));
            return -e;
        }
        if ((rc = set_state(d, VHOST_USER_SET_VRING_NUM, i, qsize)))
            return rc;
        if ((rc = set_state(d, VHOST_USER_SET_VRING_BASE, i, 0)))
            return rc;
        struct vu_msg m = {.request = VHOST_USER_SET_VRING_ADDR, .size = sizeof(struct vhost_vring_addr)};
        m.p.addr.index = i;
        m.p.addr.flags = 0;
        m.p.addr.desc_user_addr = (uint64_t)(uintptr_t)vq->desc;
        m.p.addr.used_user_addr = (uint64_t)(uintptr_t)vq->used;
        m.p.addr.avail_user_addr = (uint64_t)(uintptr_t)vq->avail;
        m.p.addr.log_guest_addr = 0;
        if ((rc = send_set(d, &m, NULL, 0)))
            return rc;
        /* A call fd is always given, also in poll mode: some targets (libvhost-user) treat a missing
         * call fd as fatal when they do signal; in poll mode we simply never read it. */
        if ((rc = set_vring_fd(d, VHOST_USER_SET_VRING_CALL, i, vq->call_fd)))
            return rc;
        if ((rc = set_vring_fd(d, VHOST_USER_SET_VRING_KICK, i, vq->kick_fd)))
            return rc;
    }
    /* With F_PROTOCOL_FEATURES rings start disabled (spec: "Ring states"). */
    if (d->features & (1ull << VHOST_USER_F_PROTOCOL_FEATURES))
        for (unsigned i = 0; i < queues; i++)
            if ((rc = set_state(d, VHOST_USER_SET_VRING_ENABLE, i, 1)))
                return rc;
    return 0;
}

int vu_dev_connect(vu_dev *d, const char *path, const vu_region *data, unsigned queues, unsigned qsize,
                   unsigned flags, int timeout_ms)
{
    return vu_dev_connect_mem(d, path, data, NULL, 0, queues, qsize, flags, timeout_ms);
}

int vu_dev_connect_mem(vu_dev *d, const char *path, const vu_region *data, const vu_region *extra,
                       unsigned nextra, unsigned queues, unsigned qsize, unsigned flags, int timeout_ms)
{
    memset(d, 0, sizeof *d);
    d->sock = -1;
    d->ring.fd = -1;
    for (unsigned i = 0; i < VU_MAX_QUEUES; i++)
        d->vqs[i].kick_fd = d->vqs[i].call_fd = -1;
    d->data = data;
    d->poll = !!(flags & VU_F_POLL);
    d->event_idx = !(flags & VU_F_NO_EVIDX);
    d->timeout_ms = timeout_ms > 0 ? timeout_ms : 5000;
    d->qsize = qsize;
    if (qsize < 4 || qsize > 32768 || (qsize & (qsize - 1))) {
        seterr(d, "queue size must be a power of two in [4, 32768], got %u", qsize);
        return -EINVAL;
    }
    if (!data || data->fd < 0 || !data->base) {
        seterr(d, "data region is closed");
        return -EINVAL;
    }
    int erc = vu_dev_set_memory(d, extra, nextra); /* not connected yet: only records them */
    if (erc)
        return erc;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path) {
        seterr(d, "socket path too long: %s", path);
        return -ENAMETOOLONG;
    }
    strcpy(sa.sun_path, path);
    d->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (d->sock < 0) {
        int e = errno;
        seterr(d, "socket: %s", strerror(e));
        return -e;
    }
    if (connect(d->sock, (struct sockaddr *)&sa, sizeof sa) != 0) {
        int e = errno;
        seterr(d, "connect %s: %s", path, strerror(e));
        close_fds(d);
        return -e;
    }
    int rc = handshake(d, queues, qsize);
    if (rc) {
        char keep[VU_ERRLEN];
        memcpy(keep, d->err, sizeof keep);
        close_fds(d);
        memcpy(d->err, keep, sizeof keep);
        return rc;
    }
    return 0;
}

int vu_dev_check_alive(vu_dev *d)
{
    if (d->sock < 0)
        return -ENOTCONN;
    char c;
    ssize_t n = recv(d->sock, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) {
        seterr(d, "vhost-user target closed the connection");
        return -ECONNRESET;
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        int e = errno;
        seterr(d, "vhost-user socket: %s", strerror(e));
        return -e;
    }
    /* The target never speaks first on the front-end channel; unsolicited bytes are a protocol
     * violation and we treat the connection as broken. */
    seterr(d, "vhost-user target sent an unsolicited message");
    return -EPROTO;
}

void vu_dev_abort(vu_dev *d)
{
    close_fds(d);
    d->nqueues = 0;
}

int vu_dev_shutdown(vu_dev *d)
{
    int rc = 0;
    if (d->sock >= 0 && vu_dev_check_alive(d) == 0) {
        /* GET_VRING_BASE stops each ring and returns where the device stopped; after the reply the
         * target no longer touches that ring (spec: "Stopping rings"). */
        for (unsigned i = 0; i < d->nqueues; i++) {
            struct vu_msg m = {.request = VHOST_USER_GET_VRING_BASE, .size = sizeof(struct vhost_vring_state)};
            m.p.state.index = i;
            m.p.state.num = 0;
            if ((rc = send_msg(d, &m, NULL, 0)))
                break;
            if ((rc = recv_reply(d, VHOST_USER_GET_VRING_BASE, &m, sizeof(struct vhost_vring_state))))
                break;
        }
    }
    close_fds(d);
    d->nqueues = 0;
    return rc;
}

/* --- data path ---------------------------------------------------------------------------------- */

static inline uint16_t alloc_desc(vu_vq *vq)
{
    uint16_t i = vq->free_head;
    vq->free_head = vq->desc[i].next;
    vq->num_free--;
    return i;
}

int vu_enqueue(vu_dev *d, unsigned q, int type, uint64_t offset, const struct iovec *iov, int iovcnt,
               uint64_t token, uint64_t *cursor, int *done)
{
    if (q >= d->nqueues || d->sock < 0)
        return -ENOTCONN;
    vu_vq *vq = &d->vqs[q];
    *done = 0;
    if (type == VU_OP_FLUSH) {
        if (vq->num_free < 2)
            return 0;
        uint16_t head = alloc_desc(vq), st = alloc_desc(vq);
        vq->hdrs[head] = (struct virtio_blk_outhdr){.type = VIRTIO_BLK_T_FLUSH, .ioprio = 0, .sector = 0};
        vq->status[head] = 0xff;
        vq->desc[head] = (struct vring_desc){(uint64_t)(uintptr_t)&vq->hdrs[head], sizeof(struct virtio_blk_outhdr),
                                             VRING_DESC_F_NEXT, st};
        vq->desc[st] = (struct vring_desc){(uint64_t)(uintptr_t)&vq->status[head], 1, VRING_DESC_F_WRITE, 0};
        vq->inflight[head] = (vu_inflight){token, 0, 2, 1};
        vq->avail->ring[vq->avail_idx % vq->num] = head;
        vq->avail_idx++;
        vq->outstanding++;
        *done = 1;
        return 1;
    }
    if (type != VU_OP_READ && type != VU_OP_WRITE && type != VU_OP_GET_ID)
        return -EINVAL;
    uint64_t total = 0;
    for (int i = 0; i < iovcnt; i++) {
        uint64_t a = (uint64_t)(uintptr_t)iov[i].iov_base, l = iov[i].iov_len;
        if (l == 0 || (type != VU_OP_GET_ID && (l & 511)))
            return -EINVAL;
        if (!vu_dev_mem_contains(d, a, l))
            return -EFAULT;
        total += l;
    }
    if (total == 0 || (type != VU_OP_GET_ID && (offset & 511)))
        return -EINVAL;
    if (type == VU_OP_GET_ID && (iovcnt != 1 || *cursor))
        return -EINVAL;

    /* Locate the cursor: segment index and offset within it. */
    int si = 0;
    uint64_t so = *cursor;
    while (si < iovcnt && so >= iov[si].iov_len)
        so -= iov[si++].iov_len;
    int staged = 0;
    uint16_t wflag = (type == VU_OP_WRITE) ? 0 : VRING_DESC_F_WRITE;
    while (si < iovcnt) {
        if (vq->num_free < 3)
            break;
        unsigned maxseg = vq->num_free - 2u;
        if (maxseg > d->seg_max)
            maxseg = d->seg_max;
        uint64_t start = *cursor;
        uint16_t head = alloc_desc(vq), prev = head;
        vq->hdrs[head] = (struct virtio_blk_outhdr){.type = (uint32_t)type, .ioprio = 0,
                                                    .sector = type == VU_OP_GET_ID ? 0 : (offset + start) >> 9};
        vq->status[head] = 0xff;
        vq->desc[head] = (struct vring_desc){(uint64_t)(uintptr_t)&vq->hdrs[head],
                                             sizeof(struct virtio_blk_outhdr), VRING_DESC_F_NEXT, 0};
        unsigned nseg = 0;
        uint32_t bytes = 0;
        while (si < iovcnt && nseg < maxseg) {
            uint64_t left = iov[si].iov_len - so;
            uint32_t piece = left > d->size_max ? d->size_max : (uint32_t)left;
            /* Keep a request's byte count in 32 bits and well under any target's transfer limit. */
            if ((uint64_t)bytes + piece > (1u << 30))
                break;
            uint16_t di = alloc_desc(vq);
            vq->desc[di] = (struct vring_desc){(uint64_t)(uintptr_t)iov[si].iov_base + so, piece,
                                               (uint16_t)(wflag | VRING_DESC_F_NEXT), 0};
            vq->desc[prev].next = di;
            prev = di;
            nseg++;
            bytes += piece;
            so += piece;
            if (so == iov[si].iov_len) {
                si++;
                so = 0;
            }
        }
        uint16_t st = alloc_desc(vq);
        vq->desc[st] = (struct vring_desc){(uint64_t)(uintptr_t)&vq->status[head], 1, VRING_DESC_F_WRITE, 0};
        vq->desc[prev].next = st;
        vq->inflight[head] = (vu_inflight){token, bytes, (uint16_t)(nseg + 2), 1};
        vq->avail->ring[vq->avail_idx % vq->num] = head;
        vq->avail_idx++;
        vq->outstanding++;
        *cursor = start + bytes;
        staged++;
    }
    if (si >= iovcnt)
        *done = 1;
    return staged;
}

int vu_publish(vu_dev *d, unsigned q)
{
    if (q >= d->nqueues || d->sock < 0)
        return -ENOTCONN;
    vu_vq *vq = &d->vqs[q];
    uint16_t old = vq->avail_published, cur = vq->avail_idx;
    if (old == cur)
        return 0;
    /* Descriptors and avail->ring entries must be visible before the index that publishes them. */
    __atomic_store_n(&vq->avail->idx, cur, __ATOMIC_RELEASE);
    vq->avail_published = cur;
    /* The device's "don't kick me" state is read after our idx store: a full barrier, otherwise
     * the load could be satisfied before the store is visible and both sides would wait. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int kick;
    if (d->event_idx) {
        uint16_t ev = __atomic_load_n(avail_event_p(vq), __ATOMIC_RELAXED);
        kick = vring_need_event(ev, cur, old);
    } else {
        kick = !(__atomic_load_n(&vq->used->flags, __ATOMIC_RELAXED) & VRING_USED_F_NO_NOTIFY);
    }
    if (!kick) {
        vq->calls_suppressed++;
        return 0;
    }
    uint64_t one = 1;
    for (;;) {
        ssize_t n = write(vq->kick_fd, &one, sizeof one);
        if (n == sizeof one)
            break;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) /* counter saturated: the target has a kick pending anyway */
            break;
        return n < 0 ? -errno : -EIO;
    }
    vq->kicks++;
    return 1;
}

int vu_pending(vu_dev *d, unsigned q)
{
    vu_vq *vq = &d->vqs[q];
    return __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE) != vq->last_used;
}

static void arm_interrupts(vu_dev *d, vu_vq *vq)
{
    if (!d->event_idx)
        return;
    /* Interrupt mode: "signal me on the next completion".  Poll mode: park the threshold half a
     * ring-index space ahead, so the device (practically) never signals. */
    uint16_t ev = d->poll ? (uint16_t)(vq->last_used + 0x8000) : vq->last_used;
    __atomic_store_n(used_event_p(vq), ev, __ATOMIC_RELAXED);
}

int vu_reap(vu_dev *d, unsigned q, vu_completion *out, int max)
{
    if (q >= d->nqueues || !d->vqs[q].inflight)
        return -ENOTCONN;
    vu_vq *vq = &d->vqs[q];
    int n = 0;
    for (int pass = 0; pass < 2 && n < max; pass++) {
        /* acquire: the used elements (and the data/status the device wrote before bumping idx)
         * are visible once we observe the new idx. */
        uint16_t uidx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
        while (vq->last_used != uidx && n < max) {
            struct vring_used_elem *e = &vq->used->ring[vq->last_used % vq->num];
            uint32_t id = e->id;
            vq->last_used++;
            if (id >= vq->num || !vq->inflight[id].busy)
                continue; /* a buggy target; ignoring beats corrupting the free list */
            vu_inflight *in = &vq->inflight[id];
            out[n].token = in->token;
            out[n].bytes = in->bytes;
            out[n].used_len = e->len;
            out[n].status = vq->status[id];
            n++;
            /* Return the whole chain to the free list. */
            uint16_t last = (uint16_t)id;
            for (unsigned k = 1; k < in->ndesc; k++)
                last = vq->desc[last].next;
            vq->desc[last].next = vq->free_head;
            vq->free_head = (uint16_t)id;
            vq->num_free = (uint16_t)(vq->num_free + in->ndesc);
            in->busy = 0;
            vq->outstanding--;
            vq->reaped++;
        }
        if (n >= max)
            break;
        /* Re-arm, then look again: a completion that landed between the load above and the
         * used_event store would otherwise not signal (event idx) and sit until the next one. */
        arm_interrupts(d, vq);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
    return n;
}

unsigned vu_poll(vu_dev *d, long spin_ns)
{
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned iter = 0;; iter++) {
        unsigned mask = 0;
        for (unsigned q = 0; q < d->nqueues; q++)
            if (vu_pending(d, q))
                mask |= 1u << q;
        if (mask)
            return mask;
        if ((iter & 63) == 63) {
            clock_gettime(CLOCK_MONOTONIC, &t);
            long el = (t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec);
            if (el >= spin_ns)
                return 0;
        }
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        __asm__ volatile("yield");
#endif
    }
}
