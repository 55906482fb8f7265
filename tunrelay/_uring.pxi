# The io_uring engine of the TUN I/O ([relay] io = "uring"; Pump(io=...)).
#
# A TUN has no writev-of-many: the syscall engine makes one writev() per
# packet (or coalesced super-packet).  Here the writes of a receive batch
# are queued by tun_output() and submitted by flush_packets() in one
# io_uring_enter, each with RWF_NOWAIT: a request that cannot complete now
# fails with -EAGAIN instead of waiting (O_NONBLOCK on the fd is not
# enough: for a read on an empty O_NONBLOCK TUN, io_uring armed a poll and
# completed it when a packet came).  Every write completes inline, in the
# loop's thread: no io-wq worker runs.
#
# Measured (notes/i10 uring.md): an io_uring_enter costs about 600 ns more
# than a plain syscall, and each request about a syscall's kernel work, so
#   - fewer than URING_MIN_WRITES queued writes go as plain writev()s;
#   - TUN reads stay read() calls: a read that finds nothing (the EAGAIN
#     that ends a drain) costs ~300 ns inside io_uring against ~280 ns as
#     a syscall, and batched reads only broke even from 8-16 packets per
#     wake-up, so the egress drain is left as it is.
# A write refused with -EAGAIN (a TUN sndbuf limit) is retried by the
# syscall path, which waits for POLLOUT: it may then land after the later
# writes of its batch.  Everything is allocated once per pump
# (Pump._setup_io); nothing per packet.

from libc.errno cimport ENOMEM, EOPNOTSUPP
from libc.stdlib cimport calloc, free

from tunrelay.includes.uring cimport (
    TR_RWF_NOWAIT, io_uring_cq_advance, io_uring_get_sqe, io_uring_peek_batch_cqe,
    io_uring_prep_writev, io_uring_queue_exit, io_uring_queue_init, io_uring_sqe,
    io_uring_submit_and_wait)

cdef enum:
    URING_WRITES = 256          # TUN writes one ingress submission holds at most
    URING_WRITE_IOVS = 4096     # their iovecs (a super-packet: COALESCE_MAX + 1)
    URING_MIN_WRITES = 3        # fewer go as writev()s (io_uring broke even at 3)

# Test hook (_fastpath._simulate_uring_failure): ring set-up fails with
# this errno, as it does where io_uring is disabled or filtered.
cdef int uring_fail_errno = 0


cdef void tunring_close(TunRing *t) noexcept nogil:
    if t.ring != NULL:
        io_uring_queue_exit(t.ring)
        free(t.ring)
        t.ring = NULL
    free(t.cqes)
    free(t.res)
    free(t.iov)
    free(t.hdrs)
    free(t.packets)
    free(t.bytes)
    free(t.first)
    free(t.niov)
    memset(t, 0, sizeof(TunRing))


cdef int tunring_open(TunRing *t, unsigned int entries, bint writes) noexcept nogil:
    """Set up a ring for `entries` requests at a time (writes: with the
    queue tun_output fills; else a bare ring, as uring_unavailable's
    probe).  0, or -errno (the ring is left closed): ENOSYS (no
    io_uring), EPERM (kernel.io_uring_disabled, seccomp), ENOMEM..."""
    cdef int rc
    cdef io_uring *ring
    memset(t, 0, sizeof(TunRing))
    if uring_fail_errno:
        return -uring_fail_errno
    t.cqes = <io_uring_cqe **>calloc(entries, sizeof(io_uring_cqe *))
    t.res = <int *>calloc(entries, sizeof(int))
    if writes:
        t.iov = <iovec *>calloc(URING_WRITE_IOVS, sizeof(iovec))
        t.hdrs = <virtio_net_hdr *>calloc(entries, sizeof(virtio_net_hdr))
        t.packets = <uint32_t *>calloc(entries, sizeof(uint32_t))
        t.bytes = <uint32_t *>calloc(entries, sizeof(uint32_t))
        t.first = <uint32_t *>calloc(entries, sizeof(uint32_t))
        t.niov = <uint32_t *>calloc(entries, sizeof(uint32_t))
    ring = <io_uring *>calloc(1, sizeof(io_uring))
    if (ring == NULL or t.cqes == NULL or t.res == NULL
            or (writes and (t.iov == NULL or t.hdrs == NULL or t.packets == NULL
                            or t.bytes == NULL or t.first == NULL or t.niov == NULL))):
        free(ring)
        tunring_close(t)
        return -ENOMEM
    rc = io_uring_queue_init(entries, ring, 0)
    if rc < 0:
        free(ring)
        tunring_close(t)
        return rc
    t.ring = ring
    t.entries = entries
    t.iov_cap = URING_WRITE_IOVS if writes else 0
    return 0


cdef int uring_run(TunRing *t, unsigned int n, Counters *c) noexcept nogil:
    """Submit the n requests prepared and wait until their n completions
    are in t.cqes (not yet consumed: io_uring_cq_advance after reading
    them).  Each io_uring_enter counts as a syscall.  0, or -errno."""
    cdef int rc
    while True:
        rc = io_uring_submit_and_wait(t.ring, n)
        c.syscalls += 1
        if rc < 0 and rc != -EINTR:
            return rc
        if io_uring_peek_batch_cqe(t.ring, t.cqes, n) >= n:
            return 0


cdef int uring_queue_write(PumpState *st, iovec *iov, int count, uint32_t packets,
                           size_t length) noexcept nogil:
    """Queue one TUN write (tun_output's arguments): its iovecs (and, with
    offload, its virtio_net_hdr) are copied, the caller may reuse them.
    Submits the queue first when it is full.  0, or -1 when the loop must
    end."""
    cdef TunRing *t = &st.ing.ur
    cdef unsigned int k
    cdef iovec *dst
    if t.queued == t.entries or t.iov_used + <size_t>count > t.iov_cap:
        if uring_flush_writes(st) != 0:
            return -1
    k = t.queued
    dst = t.iov + t.iov_used
    memcpy(dst, iov, <size_t>count * sizeof(iovec))
    if st.offload:
        memcpy(&t.hdrs[k], iov[0].iov_base, VNET_HDR_LEN)
        dst[0].iov_base = &t.hdrs[k]
    t.first[k] = <uint32_t>t.iov_used
    t.niov[k] = <uint32_t>count
    t.packets[k] = packets
    t.bytes[k] = <uint32_t>length
    t.iov_used += <size_t>count
    t.queued = k + 1
    return 0


cdef int uring_flush_writes(PumpState *st) noexcept nogil:
    """Write the queued writes, in order, with one io_uring_enter (fewer
    than URING_MIN_WRITES with writev).  Counted like tun_output's: packets, bytes, tun_io
    per write done; a refused write is an error and its packets dropped
    (tun_write); -EAGAIN retried by the syscall path.  0, or -1 when the
    loop must end (the device is gone, or stop fired while the TUN was
    full: the writes not done are then counted as dropped)."""
    cdef TunRing *t = &st.ing.ur
    cdef Counters *c = &st.ing.c
    cdef unsigned int n = t.queued, i
    cdef io_uring_sqe *sqe
    cdef int rc, res, status = 0
    if n == 0:
        return 0
    t.queued = 0
    t.iov_used = 0
    if n < URING_MIN_WRITES:
        for i in range(n):
            if tun_write_now(st, t.iov + t.first[i], <int>t.niov[i], t.packets[i],
                             t.bytes[i]) != 0:
                return -1
        return 0
    for i in range(n):
        sqe = io_uring_get_sqe(t.ring)
        io_uring_prep_writev(sqe, st.tun_fd, t.iov + t.first[i], t.niov[i], 0)
        sqe.rw_flags = TR_RWF_NOWAIT
        sqe.user_data = i
    rc = uring_run(t, n, c)
    if rc < 0:
        # The ring itself failed (no such thing seen): end the loop, loudly.
        c.errors[ERR_WRITE] += 1
        c.last_errno = -rc
        for i in range(n):
            c.drops[DROP_TUN_WRITE] += t.packets[i]
        st.ing.exit_errno = -rc
        return -1
    for i in range(n):
        t.res[t.cqes[i].user_data] = t.cqes[i].res
    io_uring_cq_advance(t.ring, n)
    for i in range(n):
        res = t.res[i]
        if res >= 0:
            c.packets += t.packets[i]
            c.bytes += t.bytes[i]
            c.tun_io += 1
        elif (res == -EAGAIN or res == -EINTR or res == -EOPNOTSUPP) and status == 0:
            status = tun_write_now(st, t.iov + t.first[i], <int>t.niov[i], t.packets[i],
                                   t.bytes[i])
        elif res == -EAGAIN or res == -EINTR or res == -EOPNOTSUPP:
            c.drops[DROP_TUN_WRITE] += t.packets[i]   # after the loop was told to end
        else:
            c.errors[ERR_WRITE] += 1
            c.last_errno = -res
            if device_gone(-res):
                st.ing.exit_errno = -res
                status = -1
            else:
                c.drops[DROP_TUN_WRITE] += t.packets[i]
    return status
