# The two loops of a pump.  Everything here runs without the GIL, touches
# no Python object and allocates nothing: the slabs, iovecs and mmsghdrs
# were set up once by Pump.__cinit__.  A loop returns a LoopStatus and
# leaves the errno that ended it in the PumpState.  (EAGAIN == EWOULDBLOCK
# on Linux, so only EAGAIN is tested.)

from libc.errno cimport errno, EAGAIN, EBADF, EBADFD, EINTR, EINVAL, EIO
from libc.stdint cimport uint8_t
from libc.string cimport memcmp, memcpy, memmove, memset
from posix.unistd cimport read, write

from tunrelay.includes.system cimport (
    AF_INET, AF_INET6, IOV_MAX, MSG_DONTWAIT, MSG_NOSIGNAL, MSG_TRUNC,
    POLLIN, POLLNVAL, POLLOUT, iovec, mmsghdr, msghdr, poll, pollfd,
    recv, recvmmsg, sendmmsg, sendmsg, sockaddr_in, sockaddr_in6,
    sockaddr_storage, tr_load_acquire, tr_set_errno, tr_store_release,
    CMSG_DATA, CMSG_FIRSTHDR, CMSG_LEN, CMSG_NXTHDR, SOL_UDP, UDP_GRO,
    UDP_SEGMENT, cmsghdr, send, socklen_t, tr_monotonic, writev)

cdef enum:  # loop results
    ST_GO_ON = -1     # (between the parts of a loop) nothing ended: carry on
    ST_STOPPED = 0    # the stop eventfd fired
    ST_CLOSED = 1     # TCP peer closed or reset the connection
    ST_PROTOCOL = 2   # TCP: len16 length of zero or over the maximum
    ST_FATAL = 3      # the device or a descriptor is gone

cdef enum:
    # Room in front of each slot, so a framing header is written in place
    # instead of copying the packet.
    HEADROOM = 32  # >= the largest front framing (len16 + aead header, 26 bytes)
    # After UDP GSO was refused (EIO, EINVAL: a route whose MTU or device
    # cannot take it): no GSO for this long, then try again.
    GSO_RETRY_S = 1


cdef int wait_ready(PumpState *st, Counters *c, int fd, short events) noexcept nogil:
    """Block until fd has `events` or stop fires: 1 ready, 0 stop, -1 error."""
    cdef pollfd fds[2]
    cdef int rc
    fds[0].fd = fd
    fds[0].events = events
    fds[1].fd = st.stop_fd
    fds[1].events = POLLIN
    while True:
        fds[0].revents = 0
        fds[1].revents = 0
        rc = poll(fds, 2, -1)
        c.syscalls += 1
        if rc < 0:
            if errno == EINTR:
                continue
            return -1
        c.wakeups += 1
        if fds[1].revents:
            return 0
        if fds[0].revents & POLLNVAL:
            tr_set_errno(EBADF)
            return -1
        # POLLERR/POLLHUP included: the I/O call that follows says what it is.
        return 1


cdef inline bint device_gone(int err) noexcept nogil:
    # EBADFD: the TUN device was deleted under us; EBADF: our fd was closed.
    return err == EBADFD or err == EBADF


cdef inline bint same_address(const sockaddr_storage *a,
                              const sockaddr_storage *b) noexcept nogil:
    cdef const sockaddr_in *a4
    cdef const sockaddr_in *b4
    cdef const sockaddr_in6 *a6
    cdef const sockaddr_in6 *b6
    if a.ss_family != b.ss_family:
        return False
    if a.ss_family == AF_INET:
        a4 = <const sockaddr_in *>a
        b4 = <const sockaddr_in *>b
        return a4.sin_port == b4.sin_port and a4.sin_addr.s_addr == b4.sin_addr.s_addr
    if a.ss_family == AF_INET6:
        a6 = <const sockaddr_in6 *>a
        b6 = <const sockaddr_in6 *>b
        return (a6.sin6_port == b6.sin6_port
                and a6.sin6_scope_id == b6.sin6_scope_id
                and memcmp(&a6.sin6_addr, &b6.sin6_addr, 16) == 0)
    return False


cdef inline uint8_t *egress_packet(PumpState *st, unsigned int i) noexcept nogil:
    return st.egress_slab + <size_t>i * st.slot_size + HEADROOM


# ---------------------------------------------------------------- egress

cdef int read_batch(PumpState *st, unsigned int *count) noexcept nogil:
    """Drain up to `batch` packets from the TUN fd (non-blocking) into the
    egress slots, recording each length in its iovec.  Returns ST_GO_ON
    to go on, ST_FATAL when the device is gone."""
    cdef Counters *c = &st.egress
    cdef unsigned int n = 0
    cdef ssize_t r
    cdef int err
    cdef size_t header = st.front
    cdef uint8_t *packet
    while n < st.batch:
        packet = egress_packet(st, n)
        r = read(st.tun_fd, packet, st.max_frame + 1)
        c.syscalls += 1
        if r < 0:
            err = errno
            if err == EINTR:
                continue
            if err == EAGAIN:
                break
            c.errors[ERR_READ] += 1
            c.last_errno = err
            if device_gone(err):
                st.exit_errno = err
                count[0] = n
                return ST_FATAL
            break
        if r == 0:
            # A TUN never returns 0; a stand-in socket does at end of file.
            st.exit_errno = 0
            count[0] = n
            return ST_FATAL
        c.tun_io += 1
        if <size_t>r > st.max_frame:
            c.drops[DROP_OVERSIZE] += 1
            continue
        if st.aead.on and aead_seal(st.aead.shared, &st.aead.send, AEAD_TYPE_DATA,
                                    packet - AEAD_HEADER_LEN, packet, <size_t>r,
                                    NULL, 0, packet + r) != 0:
            c.errors[ERR_WRITE] += 1
            c.drops[DROP_SEND_ERROR] += 1
            continue
        if st.len16:
            put16(packet - header, <uint32_t>(<size_t>r + st.overhead - LEN16_HEADER))
        st.egress_iov[n].iov_base = packet - header
        st.egress_iov[n].iov_len = <size_t>r + st.overhead
        n += 1
    count[0] = n
    return ST_GO_ON


cdef int send_packets(PumpState *st, iovec *iov, size_t n, unsigned int per,
                      mmsghdr *msgs, unsigned int *counts, uint8_t *cmsg) noexcept nogil:
    """Send n datagrams, each `per` consecutive iovecs of `iov`, with as few
    sendmmsg calls as the kernel allows.  With UDP GSO, runs of equal-sized
    datagrams (the last may be shorter) go as one UDP_SEGMENT message: the
    stack is walked once per run instead of once per datagram, and the
    kernel cuts the run back into the same datagrams.  `msgs`, `counts`
    and `cmsg` are scratch for up to n messages.  ST_GO_ON, ST_STOPPED
    (stop fired while the socket was full: the rest counted "stopped") or
    ST_FATAL."""
    cdef Counters *c = &st.egress
    cdef size_t done = 0, k, nmsg, count, size, next_size, j, q, i
    cdef int r, err, ready
    cdef mmsghdr *m
    cdef cmsghdr *cm
    cdef uint16_t gso_size
    cdef void *name = NULL
    cdef unsigned int namelen = 0
    cdef bint gso = st.gso
    if st.aead.on:
        # Wherever the peer's newest authenticated datagram came from.
        if not aead_endpoint(st):
            c.drops[DROP_NO_PEER] += n
            return ST_GO_ON
        name = &st.peer
        namelen = st.peer_len
    elif st.check_peer or st.learn_peer:
        if not tr_load_acquire(&st.peer_known):
            c.drops[DROP_NO_PEER] += n
            return ST_GO_ON
        name = &st.peer
        namelen = st.peer_len
    if gso and st.gso_retry_at != 0:
        if tr_monotonic() < st.gso_retry_at:
            gso = False
        else:
            st.gso_retry_at = 0  # try GSO again
    while done < n:
        nmsg = 0
        k = done
        while k < n:
            size = 0
            for i in range(per):
                size += iov[k * per + i].iov_len
            count = 1
            if gso:
                while k + count < n and count < MAX_GSO_SEGMENTS \
                        and (count + 1) * size <= MAX_GSO_BYTES:
                    next_size = 0
                    for i in range(per):
                        next_size += iov[(k + count) * per + i].iov_len
                    if next_size > size:
                        break
                    count += 1
                    if next_size < size:
                        break
            m = &msgs[nmsg]
            m.msg_hdr.msg_name = name
            m.msg_hdr.msg_namelen = namelen
            m.msg_hdr.msg_iov = &iov[k * per]
            m.msg_hdr.msg_iovlen = per * count
            m.msg_hdr.msg_flags = 0
            if count > 1:
                cm = <cmsghdr *>(cmsg + nmsg * st.cmsg_space)
                cm.cmsg_len = CMSG_LEN(sizeof(uint16_t))
                cm.cmsg_level = SOL_UDP
                cm.cmsg_type = UDP_SEGMENT
                gso_size = <uint16_t>size
                memcpy(CMSG_DATA(cm), &gso_size, sizeof(uint16_t))
                m.msg_hdr.msg_control = cm
                m.msg_hdr.msg_controllen = st.cmsg_space
            else:
                m.msg_hdr.msg_control = NULL
                m.msg_hdr.msg_controllen = 0
            counts[nmsg] = <unsigned int>count
            nmsg += 1
            k += count
        r = sendmmsg(st.sock_fd, msgs, <unsigned int>nmsg, MSG_DONTWAIT)
        c.syscalls += 1
        if r > 0:
            c.batches += 1
            for j in range(<size_t>r):
                for q in range(done, done + counts[j]):
                    c.packets += 1
                    for i in range(per):
                        c.bytes += iov[q * per + i].iov_len
                    c.bytes -= st.overhead
                done += counts[j]
            continue
        err = errno
        if err == EINTR:
            continue
        if err == EAGAIN:
            ready = wait_ready(st, c, st.sock_fd, POLLOUT)
            if ready == 0:
                c.drops[DROP_STOPPED] += n - done
                return ST_STOPPED
            if ready > 0:
                continue
            err = errno
        if counts[0] > 1 and (err == EIO or err == EINVAL):
            # The route cannot take this GSO send now (EINVAL: a datagram
            # larger than the path MTU, which plain sends fragment; EIO: a
            # device without checksum offload).  Send the rest of these one
            # by one, and no GSO for GSO_RETRY_S: the route may change back.
            gso = False
            st.gso_retry_at = tr_monotonic() + GSO_RETRY_S
            c.errors[ERR_GSO] += 1
            c.last_errno = err
            continue
        # The first unsent message was refused (ECONNREFUSED from an ICMP
        # error, ENETUNREACH, EMSGSIZE, ENOBUFS...): count it, skip it, go on.
        c.errors[ERR_WRITE] += 1
        c.last_errno = err
        if device_gone(err):
            st.exit_errno = err
            c.drops[DROP_SEND_ERROR] += n - done
            return ST_FATAL
        c.drops[DROP_SEND_ERROR] += counts[0]
        done += counts[0]
    return ST_GO_ON


cdef int send_datagrams(PumpState *st, unsigned int n) noexcept nogil:
    """Send the n packets read into the egress slots."""
    return send_packets(st, st.egress_iov, n, 1, st.egress_msgs, st.egress_counts,
                        st.egress_cmsg)


cdef int write_stream(PumpState *st, iovec *iov, size_t niov,
                      unsigned int per_packet, size_t framing) noexcept nogil:
    """Write niov iovecs (per_packet of them per framed packet) to the TCP
    socket with as few sendmsg calls as possible, resuming partial writes
    and waiting for POLLOUT: a full socket never drops a packet.  ST_GO_ON,
    ST_STOPPED (stop fired while it was full: see keep_tail) or ST_CLOSED."""
    cdef Counters *c = &st.egress
    cdef msghdr msg
    cdef size_t first = 0
    cdef ssize_t r
    cdef int err, ready
    cdef bint cut = False   # iov[first] is partly written
    memset(&msg, 0, sizeof(msg))
    while first < niov:
        msg.msg_iov = iov + first
        msg.msg_iovlen = niov - first if niov - first < IOV_MAX else IOV_MAX
        r = sendmsg(st.sock_fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL)
        c.syscalls += 1
        if r < 0:
            err = errno
            if err == EINTR:
                continue
            if err == EAGAIN:
                ready = wait_ready(st, c, st.sock_fd, POLLOUT)
                if ready == 0:
                    keep_tail(st, iov, first, niov, per_packet, cut)
                    return ST_STOPPED
                if ready > 0:
                    continue
                err = errno
            c.errors[ERR_DISCONNECT] += 1
            c.last_errno = err
            c.drops[DROP_DISCONNECTED] += (niov - first + per_packet - 1) // per_packet
            st.exit_errno = err
            return ST_CLOSED
        c.batches += 1
        c.bytes += <size_t>r
        # Advance over what was written (zero-length iovecs included); a
        # packet counts once all of its iovecs are out.
        while first < niov and <size_t>r >= iov[first].iov_len:
            r -= iov[first].iov_len
            first += 1
            cut = False
            if first % per_packet == 0:
                c.packets += 1
                c.bytes -= framing
        if r > 0:
            iov[first].iov_base = <uint8_t *>iov[first].iov_base + r
            iov[first].iov_len -= r
            cut = True
    return ST_GO_ON


cdef void keep_tail(PumpState *st, iovec *iov, size_t first, size_t niov,
                    unsigned int per_packet, bint cut) noexcept nogil:
    """A stop came while the socket was full.  A record already partly on
    the wire is kept (its unsent bytes, in st.stream_tail) and finished
    first when the pump starts again on this connection: the peer never
    sees half a record followed by the start of another.  The records not
    begun are dropped, counted as "stopped"."""
    cdef size_t end = first, length = 0, i
    if cut or first % per_packet:
        end = (first // per_packet + 1) * per_packet
        for i in range(first, end):
            length += iov[i].iov_len
        if length <= st.tail_cap:  # always: a record is at most a len16 length + 65535
            length = 0
            for i in range(first, end):
                memcpy(st.stream_tail + length, iov[i].iov_base, iov[i].iov_len)
                length += iov[i].iov_len
            st.tail_len = length
    st.egress.drops[DROP_STOPPED] += (niov - end) // per_packet


cdef int send_tail(PumpState *st) noexcept nogil:
    """Finish the record a stop interrupted (keep_tail).  ST_GO_ON when it is
    out, ST_STOPPED when stop fired again (the rest kept), or ST_CLOSED."""
    cdef Counters *c = &st.egress
    cdef size_t sent = 0
    cdef ssize_t r
    cdef int err, ready
    while sent < st.tail_len:
        r = send(st.sock_fd, st.stream_tail + sent, st.tail_len - sent,
                 MSG_DONTWAIT | MSG_NOSIGNAL)
        c.syscalls += 1
        if r >= 0:
            sent += <size_t>r
            c.bytes += <size_t>r
            continue
        err = errno
        if err == EINTR:
            continue
        if err == EAGAIN:
            ready = wait_ready(st, c, st.sock_fd, POLLOUT)
            if ready > 0:
                continue
            if ready == 0:
                memmove(st.stream_tail, st.stream_tail + sent, st.tail_len - sent)
                st.tail_len -= sent
                return ST_STOPPED
            err = errno
        c.errors[ERR_DISCONNECT] += 1
        c.last_errno = err
        c.drops[DROP_DISCONNECTED] += 1
        st.exit_errno = err
        st.tail_len = 0
        return ST_CLOSED
    st.tail_len = 0
    c.packets += 1
    c.bytes -= st.overhead
    c.batches += 1
    return ST_GO_ON


cdef int read_offload_batch(PumpState *st) noexcept nogil:
    """Offload egress: drain up to `batch` reads (each a virtio_net_hdr and
    a packet or super-packet), segment them into st.segs, sending whenever
    the segment pool fills.  ST_GO_ON to go on, else why the loop ends."""
    cdef Counters *c = &st.egress
    cdef unsigned int n = 0
    cdef ssize_t r
    cdef int err, status
    cdef uint8_t *slot
    cdef virtio_net_hdr h
    cdef size_t framing = st.front
    st.nseg = 0
    while n < st.batch:
        slot = egress_packet(st, n)
        r = read(st.tun_fd, slot, VNET_HDR_LEN + IP_LENGTH_MAX + 1)
        c.syscalls += 1
        if r < 0:
            err = errno
            if err == EINTR:
                continue
            if err == EAGAIN:
                break
            c.errors[ERR_READ] += 1
            c.last_errno = err
            if device_gone(err):
                st.exit_errno = err
                return ST_FATAL
            break
        if r == 0:
            st.exit_errno = 0
            return ST_FATAL
        n += 1
        c.tun_io += 1
        if r <= VNET_HDR_LEN:
            c.drops[DROP_BAD_OFFLOAD] += 1
            continue
        if <size_t>r > VNET_HDR_LEN + IP_LENGTH_MAX:
            # Longer than any IP packet: never trust the kernel (or a
            # stand-in fd) to have kept to the read size we meant.
            c.drops[DROP_OVERSIZE] += 1
            continue
        # Copied out: the framing header is written over its tail.
        memcpy(&h, slot, VNET_HDR_LEN)
        if <size_t>r - VNET_HDR_LEN > st.max_frame and \
                (h.gso_type & ~VIRTIO_NET_HDR_GSO_ECN) == VIRTIO_NET_HDR_GSO_NONE:
            c.drops[DROP_OVERSIZE] += 1
            continue
        status = segment_packet(st, slot + VNET_HDR_LEN, <size_t>r - VNET_HDR_LEN,
                                &h, framing, n)
        if status == SEGMENT_POOL_FULL:
            status = send_segments(st)
            if status != ST_GO_ON:
                return status
            status = segment_packet(st, slot + VNET_HDR_LEN, <size_t>r - VNET_HDR_LEN,
                                    &h, framing, n)
        if status == SEGMENT_OVERSIZE:
            c.drops[DROP_OVERSIZE] += 1
        elif status != SEGMENT_OK:
            c.drops[DROP_BAD_OFFLOAD] += 1
    return ST_GO_ON


cdef int send_segments(PumpState *st) noexcept nogil:
    """Send st.segs (sealing each with aead): over UDP as datagrams of
    three iovecs each (header copy, payload in place, tag), equal-sized
    runs as UDP GSO messages; over TCP one sendmsg of all their iovecs.
    Empties the pool."""
    cdef Counters *c = &st.egress
    cdef size_t k, j
    cdef int status
    cdef Segment *g
    cdef size_t tag = AEAD_TAG_LEN if st.aead.on else 0
    cdef size_t aead_at = st.front - AEAD_HEADER_LEN if st.aead.on else 0
    cdef size_t nseg = st.nseg
    cdef size_t n = 0
    st.nseg = 0
    for j in range(nseg):
        g = &st.segs[j]
        if st.aead.on and aead_seal(st.aead.shared, &st.aead.send, AEAD_TYPE_DATA,
                                    g.head + aead_at, g.head + st.front,
                                    g.head_len - st.front, g.data, g.data_len, g.tail) != 0:
            # Cannot happen short of 2^64 packets; the segment is left out
            # (never plaintext, never a stale tag), counted.
            c.errors[ERR_WRITE] += 1
            c.drops[DROP_SEND_ERROR] += 1
            continue
        k = n
        n += 1
        st.seg_iov[3 * k].iov_base = g.head
        st.seg_iov[3 * k].iov_len = g.head_len
        st.seg_iov[3 * k + 1].iov_base = g.data
        st.seg_iov[3 * k + 1].iov_len = g.data_len
        st.seg_iov[3 * k + 2].iov_base = g.tail
        st.seg_iov[3 * k + 2].iov_len = tag
    if n == 0:
        return ST_GO_ON
    if st.stream:
        status = write_stream(st, st.seg_iov, 3 * n, 3, st.overhead)
        return status
    return send_packets(st, st.seg_iov, n, 3, st.seg_msgs, st.msg_segs, st.seg_cmsg)


cdef int egress_loop(PumpState *st) noexcept nogil:
    cdef unsigned int n
    cdef int status, ready, sent
    cdef size_t framing = st.overhead
    if st.tail_len:
        status = send_tail(st)
        if status != ST_GO_ON:
            return status
    while True:
        ready = wait_ready(st, &st.egress, st.tun_fd, POLLIN)
        if ready == 0:
            return ST_STOPPED
        if ready < 0:
            st.exit_errno = errno
            return ST_FATAL
        if st.offload:
            status = read_offload_batch(st)
            sent = send_segments(st) if st.nseg else ST_GO_ON
        else:
            status = read_batch(st, &n)
            sent = ST_GO_ON
            if n and st.stream:
                sent = write_stream(st, st.egress_iov, n, 1, framing)
            elif n:
                sent = send_datagrams(st, n)
        # The device gone or the connection lost say more than a stop.
        if sent == ST_CLOSED or sent == ST_FATAL:
            return sent
        if status != ST_GO_ON:
            return status
        if sent != ST_GO_ON:
            return sent


# ---------------------------------------------------------------- ingress

cdef int tun_output(PumpState *st, iovec *iov, int count, uint32_t packets,
                    size_t length) noexcept nogil:
    """One TUN write of `packets` packets (one, or a coalesced super-packet
    behind its virtio_net_hdr).  0, or -1 when the loop must end (stop
    fired: ingress_exit_errno 0; or the device is gone)."""
    cdef Counters *c = &st.ingress
    cdef ssize_t r
    cdef int err, ready
    while True:
        r = writev(st.tun_fd, iov, count)
        c.syscalls += 1
        if r >= 0:
            c.packets += packets
            c.bytes += length
            c.tun_io += 1
            return 0
        err = errno
        if err == EINTR:
            continue
        if err == EAGAIN:
            ready = wait_ready(st, c, st.tun_fd, POLLOUT)
            if ready > 0:
                continue
            if ready == 0:
                st.ingress_exit_errno = 0
                return -1
            err = errno
        c.errors[ERR_WRITE] += 1
        c.last_errno = err
        if device_gone(err):
            st.ingress_exit_errno = err
            return -1
        # EINVAL, EIO (link down), ENOMEM...: these packets are lost, counted.
        c.drops[DROP_TUN_WRITE] += packets
        return 0


cdef int deliver(PumpState *st, uint8_t *packet, size_t length) noexcept nogil:
    """Validate one packet from the network; drop and count it, or write it
    (offload: queue it for the coalescer).  0, or -1 when the loop ends."""
    cdef int reason = validate_packet(packet, length, st.tap, st.max_frame)
    if reason != DROP_NONE:
        st.ingress.drops[reason] += 1
        return 0
    if st.offload:
        if st.npkts == SEG_POOL and flush_packets(st) != 0:
            return -1
        st.pkts[st.npkts].data = packet
        st.pkts[st.npkts].length = <uint32_t>length
        st.npkts += 1
        return 0
    st.out_iov[0].iov_base = packet
    st.out_iov[0].iov_len = length
    return tun_output(st, st.out_iov, 1, 1, length)


cdef int flush_packets(PumpState *st) noexcept nogil:
    cdef size_t n = st.npkts
    st.npkts = 0
    return coalesce_and_write(st, st.pkts, n) if n else 0


cdef int stream_sink(void *ctx, const uint8_t *frame, size_t length) noexcept nogil:
    cdef PumpState *st = <PumpState *>ctx
    cdef int reason
    if frame == NULL:
        # End of this read's frames: before len16_consume() moves the
        # unfinished tail over them, write what the coalescer holds.
        return flush_packets(st)
    if st.aead.on:
        # Each record is sealed like a datagram; a bad one is dropped
        # alone (the length kept the stream in step).
        reason = aead_open(st.aead.shared, &st.aead.opener, AEAD_TYPE_DATA,
                           <uint8_t *>frame, length, NULL, 0)
        if reason != AEAD_OPEN_OK:
            st.ingress.drops[reason] += 1
            return 0
        return deliver(st, <uint8_t *>frame + AEAD_HEADER_LEN, length - AEAD_OVERHEAD)
    return deliver(st, <uint8_t *>frame, length)


cdef int ingress_stream(PumpState *st) noexcept nogil:
    cdef Counters *c = &st.ingress
    cdef ssize_t r
    cdef int err, ready, status
    st.npkts = 0
    while True:
        ready = wait_ready(st, c, st.sock_fd, POLLIN)
        if ready == 0:
            return ST_STOPPED
        if ready < 0:
            st.ingress_exit_errno = errno
            return ST_FATAL
        r = recv(st.sock_fd, st.stream_buf + st.stream_have,
                 st.stream_cap - st.stream_have, MSG_DONTWAIT)
        c.syscalls += 1
        if r == 0:
            c.errors[ERR_DISCONNECT] += 1
            st.ingress_exit_errno = 0
            return ST_CLOSED
        if r < 0:
            err = errno
            if err == EINTR or err == EAGAIN:
                continue
            c.errors[ERR_DISCONNECT] += 1
            c.last_errno = err
            st.ingress_exit_errno = err
            return ST_FATAL if device_gone(err) else ST_CLOSED
        c.batches += 1
        st.stream_have += <size_t>r
        status = len16_consume(st.stream_buf, &st.stream_have,
                               st.max_frame + st.overhead - LEN16_HEADER, stream_sink, st)
        if status == PARSE_BAD_LENGTH:
            # The stream is out of sync or hostile: nothing after this
            # point can be trusted, so the connection is closed.
            c.drops[DROP_BAD_FRAME] += 1
            c.errors[ERR_DISCONNECT] += 1
            st.ingress_exit_errno = 0
            return ST_PROTOCOL
        if status == PARSE_SINK_STOP:
            return ST_FATAL if st.ingress_exit_errno else ST_STOPPED


cdef inline uint32_t gro_segment_size(msghdr *hdr, uint32_t length) noexcept nogil:
    """The UDP_GRO cmsg's segment size: a receive buffer may hold many
    datagrams of that size back to back (the last may be shorter)."""
    cdef cmsghdr *cm = CMSG_FIRSTHDR(hdr)
    cdef int size
    while cm != NULL:
        if cm.cmsg_level == SOL_UDP and cm.cmsg_type == UDP_GRO:
            memcpy(&size, CMSG_DATA(cm), sizeof(int))
            if size > 0:
                return <uint32_t>size
        cm = CMSG_NXTHDR(hdr, cm)
    return length


cdef int ingress_message(PumpState *st, uint8_t *buf, size_t length, size_t segment,
                         bint truncated, const sockaddr_storage *sender,
                         socklen_t sender_len, bint *known) noexcept nogil:
    """Check, open and deliver one received message: `length` bytes from
    `sender`, holding datagrams of `segment` bytes back to back (UDP_GRO;
    else one).  0, or -1 when the loop must end.  Kept apart from the
    receive call so the fuzz harness drives exactly this code."""
    cdef Counters *c = &st.ingress
    cdef size_t offset = 0, chunk
    cdef size_t header = st.overhead
    cdef uint8_t *datagram
    cdef uint8_t *packet
    cdef int reason
    if st.check_peer or (st.learn_peer and known[0]):
        if not same_address(sender, &st.peer):
            c.drops[DROP_NOT_PEER] += 1
            return 0
    if truncated:
        c.drops[DROP_OVERSIZE] += 1
        return 0
    if length == 0:
        c.drops[DROP_TOO_SHORT if st.aead.on else
                DROP_BAD_FRAME if header else DROP_EMPTY] += 1
        return 0
    if segment == 0:
        segment = length
    while offset < length:
        chunk = segment if length - offset > segment else length - offset
        datagram = buf + offset
        offset += chunk
        # Longer than any frame: oversize whatever a len16 header says
        # (one byte over fits the slot; more is cut, MSG_TRUNC).
        if chunk > header + st.max_frame:
            c.drops[DROP_OVERSIZE] += 1
            continue
        packet = datagram
        if st.aead.on:
            reason = aead_open(st.aead.shared, &st.aead.opener, AEAD_TYPE_DATA, datagram, chunk,
                               sender, sender_len)
            if reason != AEAD_OPEN_OK:
                c.drops[reason] += 1
                continue
            packet += AEAD_HEADER_LEN
            chunk -= AEAD_OVERHEAD
        elif st.len16:
            if chunk <= LEN16_HEADER or be16(datagram) != chunk - LEN16_HEADER:
                c.drops[DROP_BAD_FRAME] += 1
                continue
            packet += LEN16_HEADER
            chunk -= LEN16_HEADER
        if st.learn_peer and not known[0]:
            # Only a valid packet may choose the peer.
            reason = validate_packet(packet, chunk, st.tap, st.max_frame)
            if reason != DROP_NONE:
                c.drops[reason] += 1
                continue
            memcpy(&st.peer, sender, sizeof(sockaddr_storage))
            st.peer_len = sender_len
            tr_store_release(&st.peer_known, 1)
            known[0] = True
        if deliver(st, packet, chunk) != 0:
            return -1
    return 0


cdef int ingress_datagrams(PumpState *st) noexcept nogil:
    cdef Counters *c = &st.ingress
    cdef int r, i, err, ready
    cdef size_t length, segment
    cdef mmsghdr *m
    cdef bint known
    st.npkts = 0
    while True:
        ready = wait_ready(st, c, st.sock_fd, POLLIN)
        if ready == 0:
            return ST_STOPPED
        if ready < 0:
            st.ingress_exit_errno = errno
            return ST_FATAL
        for i in range(<int>st.batch):
            st.ingress_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
            st.ingress_msgs[i].msg_hdr.msg_flags = 0
            if st.gro:
                st.ingress_msgs[i].msg_hdr.msg_controllen = st.cmsg_space
        r = recvmmsg(st.sock_fd, st.ingress_msgs, st.batch, MSG_DONTWAIT, NULL)
        c.syscalls += 1
        if r < 0:
            err = errno
            if err == EINTR or err == EAGAIN:
                continue
            # ECONNREFUSED and friends: an ICMP error queued on the socket.
            c.errors[ERR_READ] += 1
            c.last_errno = err
            if device_gone(err):
                st.ingress_exit_errno = err
                return ST_FATAL
            continue
        if r == 0:
            continue
        c.batches += 1
        known = tr_load_acquire(&st.peer_known)
        for i in range(r):
            m = &st.ingress_msgs[i]
            length = m.msg_len
            segment = gro_segment_size(&m.msg_hdr, <uint32_t>length) if st.gro else length
            if ingress_message(st, st.ingress_slab + <size_t>i * st.ingress_slot, length,
                               segment, m.msg_hdr.msg_flags & MSG_TRUNC,
                               &st.ingress_names[i], m.msg_hdr.msg_namelen, &known) != 0:
                return ST_FATAL if st.ingress_exit_errno else ST_STOPPED
        if flush_packets(st) != 0:
            return ST_FATAL if st.ingress_exit_errno else ST_STOPPED


cdef int ingress_loop(PumpState *st) noexcept nogil:
    if st.stream:
        return ingress_stream(st)
    return ingress_datagrams(st)
