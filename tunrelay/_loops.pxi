# The two loops of a pump.  Everything here runs without the GIL, touches
# no Python object and allocates nothing: the slabs, iovecs and mmsghdrs
# were set up once by Pump.__cinit__.  A loop returns a LoopStatus and
# leaves the errno that ended it in the PumpState.  (EAGAIN == EWOULDBLOCK
# on Linux, so only EAGAIN is tested.)

from libc.errno cimport (errno, EAGAIN, EINTR, EBADF, EBADFD,
                         ENOBUFS, EMSGSIZE)
from libc.stdint cimport uint8_t
from libc.string cimport memcmp, memcpy
from posix.unistd cimport read, write

from tunrelay.includes.system cimport (
    AF_INET, AF_INET6, IOV_MAX, MSG_DONTWAIT, MSG_NOSIGNAL, MSG_TRUNC,
    POLLIN, POLLNVAL, POLLOUT, iovec, mmsghdr, msghdr, poll, pollfd,
    recv, recvmmsg, sendmmsg, sendmsg, sockaddr_in, sockaddr_in6,
    sockaddr_storage, tr_load_acquire, tr_set_errno, tr_store_release)

cdef enum:  # loop results
    ST_STOPPED = 0    # the stop eventfd fired
    ST_CLOSED = 1     # TCP peer closed or reset the connection
    ST_PROTOCOL = 2   # TCP: len16 length of zero or over the maximum
    ST_FATAL = 3      # the device or a descriptor is gone

cdef enum:
    # Room in front of each slot, so a framing header is written in place
    # instead of copying the packet.
    HEADROOM = 16


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
    egress slots, recording each length in its iovec.  Returns ST_STOPPED
    to go on, ST_FATAL when the device is gone."""
    cdef Counters *c = &st.egress
    cdef unsigned int n = 0
    cdef ssize_t r
    cdef int err
    cdef size_t header = LEN16_HEADER if st.len16 else 0
    while n < st.batch:
        r = read(st.tun_fd, egress_packet(st, n), st.max_frame + 1)
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
        if <size_t>r > st.max_frame:
            c.drops[DROP_OVERSIZE] += 1
            continue
        st.egress_iov[n].iov_base = egress_packet(st, n) - header
        st.egress_iov[n].iov_len = <size_t>r + header
        if header:
            (<uint8_t *>st.egress_iov[n].iov_base)[0] = <uint8_t>(r >> 8)
            (<uint8_t *>st.egress_iov[n].iov_base)[1] = <uint8_t>(r & 0xFF)
        n += 1
    count[0] = n
    return ST_STOPPED


cdef int send_datagrams(PumpState *st, unsigned int n) noexcept nogil:
    """Send n slots with as few sendmmsg calls as the kernel allows."""
    cdef Counters *c = &st.egress
    cdef unsigned int sent = 0, i
    cdef int r, err, ready
    cdef size_t header = LEN16_HEADER if st.len16 else 0
    cdef void *name = NULL
    cdef unsigned int namelen = 0
    if st.check_peer or st.learn_peer:
        if not tr_load_acquire(&st.peer_known):
            c.drops[DROP_NO_PEER] += n
            return ST_STOPPED
        name = &st.peer
        namelen = st.peer_len
    for i in range(n):
        st.egress_msgs[i].msg_hdr.msg_name = name
        st.egress_msgs[i].msg_hdr.msg_namelen = namelen
    while sent < n:
        r = sendmmsg(st.sock_fd, st.egress_msgs + sent, n - sent, MSG_DONTWAIT)
        c.syscalls += 1
        if r > 0:
            c.batches += 1
            for i in range(sent, sent + <unsigned int>r):
                c.packets += 1
                c.bytes += st.egress_iov[i].iov_len - header
            sent += <unsigned int>r
            continue
        err = errno
        if err == EINTR:
            continue
        if err == EAGAIN:
            ready = wait_ready(st, c, st.sock_fd, POLLOUT)
            if ready == 0:
                return ST_STOPPED
            if ready > 0:
                continue
            err = errno
        # The first unsent datagram was refused (ECONNREFUSED from an ICMP
        # error, ENETUNREACH, EMSGSIZE, ENOBUFS...): count it, skip it, go on.
        c.errors[ERR_WRITE] += 1
        c.last_errno = err
        if device_gone(err):
            st.exit_errno = err
            c.drops[DROP_SEND_ERROR] += n - sent
            return ST_FATAL
        c.drops[DROP_SEND_ERROR] += 1
        sent += 1
    return ST_STOPPED


cdef int send_stream(PumpState *st, unsigned int n) noexcept nogil:
    """Write n len16 frames with one sendmsg, resuming partial writes and
    waiting for POLLOUT: a full socket never drops a packet."""
    cdef Counters *c = &st.egress
    cdef msghdr msg
    cdef unsigned int first = 0
    cdef ssize_t r
    cdef size_t chunk
    cdef int err, ready
    cdef size_t *written = NULL
    msg.msg_name = NULL
    msg.msg_namelen = 0
    msg.msg_control = NULL
    msg.msg_controllen = 0
    msg.msg_flags = 0
    while first < n:
        msg.msg_iov = st.egress_iov + first
        msg.msg_iovlen = n - first if n - first < IOV_MAX else IOV_MAX
        r = sendmsg(st.sock_fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL)
        c.syscalls += 1
        if r < 0:
            err = errno
            if err == EINTR:
                continue
            if err == EAGAIN:
                ready = wait_ready(st, c, st.sock_fd, POLLOUT)
                if ready == 0:
                    return ST_STOPPED
                if ready > 0:
                    continue
                err = errno
            c.errors[ERR_DISCONNECT] += 1
            c.last_errno = err
            c.drops[DROP_DISCONNECTED] += n - first
            st.exit_errno = err
            return ST_CLOSED
        c.batches += 1
        # Advance over what was written; a frame counts once fully sent.
        while r > 0:
            chunk = st.egress_iov[first].iov_len
            if <size_t>r >= chunk:
                r -= chunk
                c.packets += 1
                c.bytes += <uint8_t *>st.egress_iov[first].iov_base + chunk \
                    - egress_packet(st, first)
                first += 1
            else:
                st.egress_iov[first].iov_base = <uint8_t *>st.egress_iov[first].iov_base + r
                st.egress_iov[first].iov_len -= r
                r = 0
    return ST_STOPPED


cdef int egress_loop(PumpState *st) noexcept nogil:
    cdef unsigned int n
    cdef int status, ready
    while True:
        ready = wait_ready(st, &st.egress, st.tun_fd, POLLIN)
        if ready == 0:
            return ST_STOPPED
        if ready < 0:
            st.exit_errno = errno
            return ST_FATAL
        status = read_batch(st, &n)
        if n:
            if st.stream:
                if send_stream(st, n) != ST_STOPPED:
                    return ST_CLOSED
            else:
                if send_datagrams(st, n) != ST_STOPPED:
                    return ST_FATAL
        if status != ST_STOPPED:
            return status


# ---------------------------------------------------------------- ingress

cdef int write_tun(PumpState *st, const uint8_t *packet, size_t length) noexcept nogil:
    """Validate one packet and write it to the device.  Returns 0, or -1
    when the loop must end (stop fired: ST_STOPPED in exit_errno = 0; or
    the device is gone)."""
    cdef Counters *c = &st.ingress
    cdef int reason = validate_packet(packet, length, st.tap, st.max_frame)
    cdef ssize_t r
    cdef int err, ready
    if reason != DROP_NONE:
        c.drops[reason] += 1
        return 0
    while True:
        r = write(st.tun_fd, packet, length)
        c.syscalls += 1
        if r >= 0:
            c.packets += 1
            c.bytes += length
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
        # EINVAL, EIO (link down), ENOMEM...: this packet is lost, counted.
        c.drops[DROP_TUN_WRITE] += 1
        return 0


cdef int stream_sink(void *ctx, const uint8_t *frame, size_t length) noexcept nogil:
    return write_tun(<PumpState *>ctx, frame, length)


cdef int ingress_stream(PumpState *st) noexcept nogil:
    cdef Counters *c = &st.ingress
    cdef ssize_t r
    cdef int err, ready, status
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
        status = len16_consume(st.stream_buf, &st.stream_have, st.max_frame,
                               stream_sink, st)
        if status == PARSE_BAD_LENGTH:
            # The stream is out of sync or hostile: nothing after this
            # point can be trusted, so the connection is closed.
            c.drops[DROP_BAD_FRAME] += 1
            c.errors[ERR_DISCONNECT] += 1
            st.ingress_exit_errno = 0
            return ST_PROTOCOL
        if status == PARSE_SINK_STOP:
            return ST_FATAL if st.ingress_exit_errno else ST_STOPPED


cdef int ingress_datagrams(PumpState *st) noexcept nogil:
    cdef Counters *c = &st.ingress
    cdef int r, i, err, ready
    cdef size_t length
    cdef uint8_t *packet
    cdef mmsghdr *m
    cdef size_t header = LEN16_HEADER if st.len16 else 0
    cdef bint known
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
            if st.check_peer or (st.learn_peer and known):
                if not same_address(&st.ingress_names[i], &st.peer):
                    c.drops[DROP_NOT_PEER] += 1
                    continue
            if m.msg_hdr.msg_flags & MSG_TRUNC:
                c.drops[DROP_OVERSIZE] += 1
                continue
            packet = st.ingress_slab + <size_t>i * st.slot_size
            length = m.msg_len
            if header:
                if length < LEN16_HEADER or be16(packet) != length - LEN16_HEADER \
                        or length == LEN16_HEADER:
                    c.drops[DROP_BAD_FRAME] += 1
                    continue
                packet += LEN16_HEADER
                length -= LEN16_HEADER
            if st.learn_peer and not known:
                if validate_packet(packet, length, st.tap, st.max_frame) != DROP_NONE:
                    # Only a valid packet may choose the peer.
                    c.drops[validate_packet(packet, length, st.tap, st.max_frame)] += 1
                    continue
                memcpy(&st.peer, &st.ingress_names[i], sizeof(sockaddr_storage))
                st.peer_len = m.msg_hdr.msg_namelen
                tr_store_release(&st.peer_known, 1)
                known = True
            if write_tun(st, packet, length) != 0:
                return ST_FATAL if st.ingress_exit_errno else ST_STOPPED


cdef int ingress_loop(PumpState *st) noexcept nogil:
    if st.stream:
        return ingress_stream(st)
    return ingress_datagrams(st)
