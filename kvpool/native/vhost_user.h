/*
 * vhost-user-blk frontend (the "front-end"/"master" side of the vhost-user protocol) and split
 * virtqueue driver.  Plain C over kernel uapi headers; no Python here (see vhost_module.c for the
 * CPython glue), so the core can be exercised under valgrind/ASan from a C harness as well.
 *
 * Model
 * -----
 * The caller owns a *data region* (vu_region: a memfd mapped MAP_SHARED, 2 MiB aligned) that holds
 * every I/O buffer.  Each connection (vu_dev) creates its own small *ring region* holding the split
 * virtqueues, the per-descriptor virtio_blk_outhdr slots and the status bytes.  Both regions are sent
 * to the target with SET_MEM_TABLE; guest-physical addresses equal our virtual addresses, so a
 * descriptor's addr is simply the pointer.  Keeping the rings in a per-connection region means a
 * target that is declared dead (but might still be running) can only scribble on rings we no longer
 * use, never on the next connection's rings.
 *
 * One thread drives a vu_dev at a time (the asyncio loop); no locks.
 */
#ifndef KVPOOL_VHOST_USER_H
#define KVPOOL_VHOST_USER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_ring.h>

#define VU_MAX_QUEUES 16
#define VU_ERRLEN 256
/* SET_MEM_TABLE carries at most 8 regions (VHOST_USER_MAX_FDS): the ring region, the data region,
 * and up to 6 regions of memory the caller owns (the pool's staging arena). */
#define VU_MAX_EXTRA 6

/* vu_region_create() huge-page modes */
enum { VU_HUGE_NEVER = 0, VU_HUGE_REQUIRE = 1, VU_HUGE_AUTO = 2 };

typedef struct vu_region {
    int fd;            /* memfd, -1 once closed */
    uint8_t *base;     /* 2 MiB aligned mapping of the whole memfd */
    size_t size;       /* bytes, a multiple of 2 MiB */
    int hugetlb;       /* 1 if backed by MFD_HUGETLB pages */
    void *resv;        /* reservation that base lies in (plain memfd: over-allocated to align) */
    size_t resv_len;
} vu_region;

/* vu_dev_connect() flags */
#define VU_F_POLL      0x1   /* suppress completion interrupts: the caller busy-polls the used rings */
#define VU_F_NO_EVIDX  0x2   /* do not negotiate VIRTIO_RING_F_EVENT_IDX even if offered */

/* request types accepted by vu_enqueue() */
enum { VU_OP_READ = VIRTIO_BLK_T_IN, VU_OP_WRITE = VIRTIO_BLK_T_OUT, VU_OP_FLUSH = VIRTIO_BLK_T_FLUSH,
       VU_OP_GET_ID = VIRTIO_BLK_T_GET_ID };

typedef struct vu_completion {
    uint64_t token;    /* caller's token given to vu_enqueue() */
    uint32_t bytes;    /* data bytes this (sub-)request covered */
    uint32_t used_len; /* what the device reported in the used element */
    uint8_t status;    /* VIRTIO_BLK_S_OK / _IOERR / _UNSUPP, or 0xff if the device never wrote it */
} vu_completion;

typedef struct vu_inflight {       /* per descriptor-chain head */
    uint64_t token;
    uint32_t bytes;
    uint16_t ndesc;
    uint16_t busy;
} vu_inflight;

typedef struct vu_vq {
    unsigned index;
    unsigned num;                      /* queue size, a power of two */
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    struct virtio_blk_outhdr *hdrs;    /* one header slot per descriptor head */
    uint8_t *status;                   /* one status byte per descriptor head */
    vu_inflight *inflight;
    uint16_t free_head;
    uint16_t num_free;
    uint16_t avail_idx;                /* shadow of avail->idx (next slot to fill) */
    uint16_t avail_published;          /* avail idx at the last publish (for event-idx kicks) */
    uint16_t last_used;                /* next used slot to consume */
    unsigned outstanding;              /* chains published or staged and not yet reaped */
    int kick_fd, call_fd;
    uint64_t kicks, calls_suppressed, reaped;
} vu_vq;

typedef struct vu_dev {
    int sock;
    uint64_t features;        /* negotiated virtio features */
    uint64_t proto_features;  /* negotiated vhost-user protocol features */
    uint64_t offered_features, offered_proto;
    unsigned max_queues;      /* the target's GET_QUEUE_NUM (or 1) */
    unsigned nqueues;
    unsigned qsize;
    int have_config;
    struct virtio_blk_config cfg;
    uint32_t seg_max;         /* effective data segments per request */
    uint32_t size_max;        /* effective bytes per segment (4 KiB multiple) */
    int poll;
    int event_idx;
    int timeout_ms;
    vu_region ring;
    const vu_region *data;
    /* Caller-owned memory shared with the target as well (copies of the descriptors; the fds stay
     * the caller's and are never closed here).  Part of every SET_MEM_TABLE this device sends. */
    vu_region extra[VU_MAX_EXTRA];
    unsigned nextra;
    vu_vq vqs[VU_MAX_QUEUES];
    char err[VU_ERRLEN];
} vu_dev;

/* Regions ------------------------------------------------------------------------------------ */
int vu_region_create(vu_region *r, size_t size, int huge_mode, const char *name, char *err, size_t errlen);
void vu_region_destroy(vu_region *r);
static inline int vu_region_contains(const vu_region *r, uint64_t addr, uint64_t len)
{
    uint64_t b = (uint64_t)(uintptr_t)r->base;
    return r->base && addr >= b && len <= r->size && addr - b <= r->size - len;
}

/* Whether [addr, addr+len) lies in one region of d's memory table (the data region or an extra one). */
static inline int vu_dev_mem_contains(const vu_dev *d, uint64_t addr, uint64_t len)
{
    if (vu_region_contains(d->data, addr, len))
        return 1;
    for (unsigned i = 0; i < d->nextra; i++)
        if (vu_region_contains(&d->extra[i], addr, len))
            return 1;
    return 0;
}

/* Connection ---------------------------------------------------------------------------------- */
/* Connects, negotiates and starts `queues` virtqueues of `qsize` entries.  0 or -errno (d->err says why). */
int vu_dev_connect(vu_dev *d, const char *path, const vu_region *data, unsigned queues, unsigned qsize,
                   unsigned flags, int timeout_ms);
/* The same, with `nextra` caller-owned regions (fd, base, size; base 4 KiB aligned, size a 4 KiB
 * multiple) in the memory table from the first SET_MEM_TABLE on. */
int vu_dev_connect_mem(vu_dev *d, const char *path, const vu_region *data, const vu_region *extra,
                       unsigned nextra, unsigned queues, unsigned qsize, unsigned flags, int timeout_ms);
/* Replace the extra regions and, on a live connection, send the whole memory table again
 * (SET_MEM_TABLE; acknowledged when REPLY_ACK is negotiated).  The caller must have no request
 * outstanding: a target may unmap and remap every region while it handles the message.  0 or
 * -errno; after an error the connection is unusable (the target may hold any table). */
int vu_dev_set_memory(vu_dev *d, const vu_region *extra, unsigned nextra);
/* Stops the rings (GET_VRING_BASE) if the socket is still up, then closes everything.  Idempotent. */
int vu_dev_shutdown(vu_dev *d);
/* Closes everything without talking to the target (one that is hung or already gone). */
void vu_dev_abort(vu_dev *d);
/* 0 while the socket looks healthy, -errno (ECONNRESET for EOF) once the target has gone. */
int vu_dev_check_alive(vu_dev *d);

/* Data path ----------------------------------------------------------------------------------- */
/* Stage as many virtio requests of one op as free descriptors allow, starting at byte *cursor of the
 * op (0 for a new op).  Returns the number of requests staged (0 = ring full) and sets *done when
 * the op is completely staged.  Requests are not visible to the device until vu_publish().
 * -EINVAL / -EFAULT on a malformed op (nothing staged). */
int vu_enqueue(vu_dev *d, unsigned q, int type, uint64_t offset, const struct iovec *iov, int iovcnt,
               uint64_t token, uint64_t *cursor, int *done);
/* Make staged requests visible (store-release of avail->idx) and kick unless the device asked not
 * to be.  Returns 1 if kicked, 0 if the kick was suppressed or nothing was staged, -errno. */
int vu_publish(vu_dev *d, unsigned q);
/* Consume up to `max` used elements.  In interrupt mode this also re-arms notification and
 * re-checks the ring, so an empty return with the eventfd drained cannot lose a completion. */
int vu_reap(vu_dev *d, unsigned q, vu_completion *out, int max);
/* Busy-poll all queues for up to spin_ns nanoseconds; returns a bitmask of queues with used
 * elements pending (0 on timeout). */
unsigned vu_poll(vu_dev *d, long spin_ns);
/* Cheap check: does queue q have used elements we have not consumed? */
int vu_pending(vu_dev *d, unsigned q);

#endif
