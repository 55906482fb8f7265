# The two loops of a pump.  Everything here runs without the GIL, touches
# no Python object and allocates nothing: the slabs, iovecs and mmsghdrs
# were set up once by Pump.__cinit__.  A loop returns a LoopStatus and
# leaves the errno that ended it in the PumpState.  (EAGAIN == EWOULDBLOCK
# on Linux, so only EAGAIN is tested.)

from libc.errno cimport errno, EAGAIN, EBADF, EBADFD, EINTR, EINVAL, EIO
from libc.stdint cimport uint8_t
from libc.string cimport memcmp, memcpy, memmove, memset
from posix.unistd cimport read, write
from tunrelay.includes.system cimport sched_yield

from tunrelay.includes.system cimport (
    AF_INET, AF_INET6, IOV_MAX, MSG_DONTWAIT, MSG_NOSIGNAL, MSG_TRUNC,
    POLLIN, POLLNVAL, POLLOUT, iovec, mmsghdr, msghdr, poll, pollfd,
    recv, recvmmsg, sendmmsg, sendmsg, sockaddr_in, sockaddr_in6,
    sockaddr_storage, tr_load_acquire, tr_set_errno, tr_store_release,
    CMSG_DATA, CMSG_FIRSTHDR, CMSG_LEN, CMSG_NXTHDR, SOL_UDP, UDP_GRO,
    UDP_SEGMENT, cmsghdr, send, socklen_t, tr_monotonic, tr_monotonic_fine, writev,
    IPPROTO_TCP, TCP_QUICKACK, setsockopt)

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


cdef int poll_fds(PumpState *st, Counters *c, pollfd *fds, int nfds) noexcept nogil:
    """poll() until one of fds is ready: > 0, or -1 on an error (errno).

    Busy polling (st.spin_s): first poll without sleeping, yielding the
    CPU between polls, for the loop's budget; a packet that comes in that
    time is picked up without the scheduler's wake-up, and an idle loop
    still sleeps once the budget is spent.  The budget adapts: halved each
    time it ran out with nothing (down to spin_s / 16: traffic that never
    answers soon, such as a lone keepalive, costs little), doubled each
    time it caught a packet (up to spin_s: request and response).
    c.wakeups counts the sleeping polls, so wakeups per packet show what
    spinning saved."""
    cdef int rc, i
    cdef double *budget = &st.spin_ing if c == &st.ing.c else &st.spin_eg
    cdef double deadline = 0
    if st.spin_s > 0:
        if budget[0] <= 0:
            budget[0] = st.spin_s
        deadline = tr_monotonic_fine() + budget[0]
    while True:
        for i in range(nfds):
            fds[i].revents = 0
        rc = poll(fds, nfds, 0 if deadline else -1)
        c.syscalls += 1
        if rc > 0:
            if deadline:
                budget[0] = budget[0] * 2 if budget[0] * 2 < st.spin_s else st.spin_s
            else:
                c.wakeups += 1
            return rc
        if rc < 0:
            if errno == EINTR:
                continue
            return -1
        if tr_monotonic_fine() >= deadline:
            deadline = 0   # the budget is spent: sleep
            budget[0] = budget[0] / 2 if budget[0] / 2 > st.spin_s / 16 else st.spin_s / 16
        else:
            # Spinning must not hold the CPU from a task that was woken onto
            # it: the other relay, the application the packet is for.  On
            # two cores a spinner that kept its time slice made each hop
            # wait for its budget to run out (1 ms spin, 0.9 ms ping).
            sched_yield()
            c.syscalls += 1


cdef int wait_ready(PumpState *st, Counters *c, int fd, short events) noexcept nogil:
    """Block until fd has `events` or stop fires: 1 ready, 0 stop, -1 error."""
    cdef pollfd fds[2]
    if st.duplex and fd == st.sock_fd and events == POLLOUT:
        return wait_writable_duplex(st, c)
    fds[0].fd = fd
    fds[0].events = events
    fds[1].fd = st.stop_fd
    fds[1].events = POLLIN
    if poll_fds(st, c, fds, 2) < 0:
        return -1
    if fds[1].revents:
        return 0
    if fds[0].revents & POLLNVAL:
        tr_set_errno(EBADF)
        return -1
    # POLLERR/POLLHUP included: the I/O call that follows says what it is.
    return 1


cdef int wait_writable_duplex(PumpState *st, Counters *c) noexcept nogil:
    """The duplex loop's egress waits for room in the socket.  It goes on
    receiving meanwhile: over TCP two relays that both only wrote would
    each wait for the other to read, for ever.  (Ingress never waits on
    the socket, so this nests one level at most.)  1 writable, 0 stop or
    the ingress ended the loop (st.nested_status), -1 error."""
    cdef pollfd fds[2]
    cdef int status
    fds[0].fd = st.sock_fd
    fds[0].events = POLLOUT | POLLIN
    fds[1].fd = st.stop_fd
    fds[1].events = POLLIN
    while True:
        if poll_fds(st, c, fds, 2) < 0:
            return -1
        if fds[1].revents:
            return 0
        if fds[0].revents & POLLNVAL:
            tr_set_errno(EBADF)
            return -1
        if fds[0].revents & ~POLLIN:
            return 1   # writable, or POLLERR/POLLHUP for the send to report
        status = ingress_step(st)
        if st.peers != NULL:
            reader_idle(st.peers, st.ing.reader)
        if status != ST_GO_ON:
            st.nested_status = status
            st.duplex_end = 1
            return 0


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
    return st.eg.slab + <size_t>i * st.slot_size + HEADROOM


# ---------------------------------------------------------------- egress

cdef inline int hold_for_handshake(PumpState *st, unsigned int slot, const uint8_t *packet,
                                   size_t length) noexcept nogil:
    """A packet for egress slot `slot`'s peer, which has no session yet:
    staged for the control plane (DROP_NONE), or DROP_NO_SESSION, counted
    against the peer, when it cannot be held."""
    if stage_packet(st.peers, st.eg.peer[slot], packet, length) == DROP_NONE:
        return DROP_NONE
    tr_add64(&st.eg.peer[slot].egress.drops, 1)
    return DROP_NO_SESSION


cdef int read_batch(PumpState *st, unsigned int *count) noexcept nogil:
    """Drain up to `batch` packets from the TUN fd (non-blocking) into the
    egress slots, recording each length in its iovec.  Returns ST_GO_ON
    to go on, ST_FATAL when the device is gone."""
    cdef Counters *c = &st.eg.c
    cdef unsigned int n = 0
    cdef ssize_t r
    cdef int err, reason
    cdef size_t header = st.front, pad
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
                st.eg.exit_errno = err
                count[0] = n
                return ST_FATAL
            break
        if r == 0:
            # A TUN never returns 0; a stand-in socket does at end of file.
            st.eg.exit_errno = 0
            count[0] = n
            return ST_FATAL
        c.tun_io += 1
        if <size_t>r > st.max_frame:
            c.drops[DROP_OVERSIZE] += 1
            continue
        if st.peers != NULL:
            reason = egress_route(st, packet, <size_t>r, n)
            if reason == DROP_NO_SESSION:
                reason = hold_for_handshake(st, n, packet, <size_t>r)
                if reason == DROP_NONE:
                    continue
            elif reason == DROP_NONE and st.session:
                pad = session_pad(<size_t>r, st.max_frame)
                reason = session_seal(st, st.eg.keys[n], packet - SESSION_HEADER_LEN,
                                      packet, <size_t>r, NULL, 0, packet + r, 0, pad)
                if reason != DROP_NONE:
                    tr_add64(&st.eg.peer[n].egress.drops, 1)
                r += <ssize_t>pad
            if reason != DROP_NONE:
                c.drops[reason] += 1
                continue
            st.eg.dg_name[n] = &st.eg.dest[n]
            st.eg.dg_peer[n] = st.eg.peer[n]
        if st.aead.on and aead_seal(st.aead.shared, &st.eg.aead, AEAD_TYPE_DATA,
                                    packet - AEAD_HEADER_LEN, packet, <size_t>r,
                                    NULL, 0, packet + r) != 0:
            c.errors[ERR_WRITE] += 1
            c.drops[DROP_SEND_ERROR] += 1
            continue
        if st.len16:
            put16(packet - header, <uint32_t>(<size_t>r + st.overhead - LEN16_HEADER))
        st.eg.iov[n].iov_base = packet - header
        st.eg.iov[n].iov_len = <size_t>r + st.overhead
        n += 1
    count[0] = n
    return ST_GO_ON


cdef struct SendPlan:
    # What send_packets hands its parts: the datagrams (n of them, `per`
    # consecutive iovecs each) and the scratch for their messages.
    iovec *iov
    size_t n
    unsigned int per
    mmsghdr *msgs
    unsigned int *counts      # datagrams per message
    uint8_t *cmsg
    void *name                # one destination for all (NULL: connected, or per datagram)
    socklen_t namelen
    bint gso                  # group equal-sized runs into UDP_SEGMENT messages


cdef inline size_t datagram_size(const SendPlan *p, size_t k) noexcept nogil:
    cdef size_t size = 0
    cdef unsigned int i
    for i in range(p.per):
        size += p.iov[k * p.per + i].iov_len
    return size


cdef bint send_destination(PumpState *st, SendPlan *p) noexcept nogil:
    """Where the datagrams go: the aead peer's current endpoint, the given or
    learned peer, or (peers) each datagram's own.  False when there is no
    peer to send to yet."""
    p.name = NULL
    p.namelen = 0
    if st.peers != NULL:
        return True  # each datagram has its own destination (st.eg.dg_name)
    if st.aead.on:
        # Wherever the peer's newest authenticated datagram came from.
        if not aead_endpoint(st):
            return False
    elif st.check_peer or st.learn_peer:
        if not tr_load_acquire(&st.peer_known):
            return False
    else:
        return True  # connected: the kernel knows
    p.name = &st.peer
    p.namelen = st.peer_len
    return True


cdef size_t plan_messages(PumpState *st, SendPlan *p, size_t done) noexcept nogil:
    """Fill p.msgs with the datagrams from `done` on: one message each, or
    with GSO one per run of equal-sized datagrams to one destination (the
    last of a run may be shorter).  Returns the number of messages."""
    cdef size_t nmsg = 0, k = done, count, size, next_size
    cdef mmsghdr *m
    cdef cmsghdr *cm
    cdef uint16_t gso_size
    while k < p.n:
        size = datagram_size(p, k)
        count = 1
        if p.gso:
            while k + count < p.n and count < MAX_GSO_SEGMENTS \
                    and (count + 1) * size <= MAX_GSO_BYTES \
                    and (st.peers == NULL or st.eg.dg_peer[k + count] == st.eg.dg_peer[k]):
                next_size = datagram_size(p, k + count)
                if next_size > size:
                    break
                count += 1
                if next_size < size:
                    break
        m = &p.msgs[nmsg]
        if st.peers != NULL:
            m.msg_hdr.msg_name = st.eg.dg_name[k]
            m.msg_hdr.msg_namelen = (sizeof(sockaddr_in) if st.eg.dg_name[k].ss_family == AF_INET
                                     else sizeof(sockaddr_in6))
        else:
            m.msg_hdr.msg_name = p.name
            m.msg_hdr.msg_namelen = p.namelen
        m.msg_hdr.msg_iov = &p.iov[k * p.per]
        m.msg_hdr.msg_iovlen = p.per * count
        m.msg_hdr.msg_flags = 0
        if count > 1:
            cm = <cmsghdr *>(p.cmsg + nmsg * st.cmsg_space)
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
        p.counts[nmsg] = <unsigned int>count
        nmsg += 1
        k += count
    return nmsg


cdef size_t count_sent(PumpState *st, const SendPlan *p, size_t done, int sent) noexcept nogil:
    """Count the datagrams of the first `sent` messages (and their peers');
    returns the new `done`."""
    cdef Counters *c = &st.eg.c
    cdef size_t j, q, size
    cdef uint64_t now_ms = <uint64_t>(st.eg.now * 1000) + 1
    c.batches += 1
    for j in range(<size_t>sent):
        for q in range(done, done + p.counts[j]):
            size = datagram_size(p, q) - st.overhead
            c.packets += 1
            c.bytes += size
            if st.peers != NULL:
                tr_add64(&st.eg.dg_peer[q].egress.packets, 1)
                tr_add64(&st.eg.dg_peer[q].egress.bytes, size)
                tr_store64(&st.eg.dg_peer[q].egress.last_ms, now_ms)
        done += p.counts[j]
    return done


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
    cdef Counters *c = &st.eg.c
    cdef SendPlan plan
    cdef size_t done = 0, nmsg
    cdef int r, err, ready
    plan.iov = iov
    plan.n = n
    plan.per = per
    plan.msgs = msgs
    plan.counts = counts
    plan.cmsg = cmsg
    if not send_destination(st, &plan):
        c.drops[DROP_NO_PEER] += n
        return ST_GO_ON
    plan.gso = st.gso
    if plan.gso and st.eg.gso_retry_at != 0:
        if tr_monotonic() < st.eg.gso_retry_at:
            plan.gso = False
        else:
            st.eg.gso_retry_at = 0  # try GSO again
    while done < n:
        nmsg = plan_messages(st, &plan, done)
        r = sendmmsg(st.sock_fd, msgs, <unsigned int>nmsg, MSG_DONTWAIT)
        c.syscalls += 1
        if r > 0:
            done = count_sent(st, &plan, done, r)
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
            plan.gso = False
            st.eg.gso_retry_at = tr_monotonic() + GSO_RETRY_S
            c.errors[ERR_GSO] += 1
            c.last_errno = err
            continue
        # The first unsent message was refused (ECONNREFUSED from an ICMP
        # error, ENETUNREACH, EMSGSIZE, ENOBUFS...): count it, skip it, go on.
        c.errors[ERR_WRITE] += 1
        c.last_errno = err
        if device_gone(err):
            st.eg.exit_errno = err
            c.drops[DROP_SEND_ERROR] += n - done
            return ST_FATAL
        c.drops[DROP_SEND_ERROR] += counts[0]
        if st.peers != NULL:
            tr_add64(&st.eg.dg_peer[done].egress.drops, counts[0])
        done += counts[0]
    return ST_GO_ON


cdef int send_datagrams(PumpState *st, unsigned int n) noexcept nogil:
    """Send the n packets read into the egress slots."""
    return send_packets(st, st.eg.iov, n, 1, st.eg.msgs, st.eg.counts,
                        st.eg.cmsg)


cdef int write_stream(PumpState *st, iovec *iov, size_t niov,
                      unsigned int per_packet, size_t framing) noexcept nogil:
    """Write niov iovecs (per_packet of them per framed packet) to the TCP
    socket with as few sendmsg calls as possible, resuming partial writes
    and waiting for POLLOUT: a full socket never drops a packet.  ST_GO_ON,
    ST_STOPPED (stop fired while it was full: see keep_tail) or ST_CLOSED."""
    cdef Counters *c = &st.eg.c
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
            st.eg.exit_errno = err
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
    the wire is kept (its unsent bytes, in st.eg.stream_tail) and finished
    first when the pump starts again on this connection: the peer never
    sees half a record followed by the start of another.  The records not
    begun are dropped, counted as "stopped"."""
    cdef size_t end = first, length = 0, i
    if cut or first % per_packet:
        end = (first // per_packet + 1) * per_packet
        for i in range(first, end):
            length += iov[i].iov_len
        if length <= st.eg.tail_cap:  # always: a record is at most a len16 length + 65535
            length = 0
            for i in range(first, end):
                memcpy(st.eg.stream_tail + length, iov[i].iov_base, iov[i].iov_len)
                length += iov[i].iov_len
            st.eg.tail_len = length
    st.eg.c.drops[DROP_STOPPED] += (niov - end) // per_packet


cdef int send_tail(PumpState *st) noexcept nogil:
    """Finish the record a stop interrupted (keep_tail).  ST_GO_ON when it is
    out, ST_STOPPED when stop fired again (the rest kept), or ST_CLOSED."""
    cdef Counters *c = &st.eg.c
    cdef size_t sent = 0
    cdef ssize_t r
    cdef int err, ready
    while sent < st.eg.tail_len:
        r = send(st.sock_fd, st.eg.stream_tail + sent, st.eg.tail_len - sent,
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
                memmove(st.eg.stream_tail, st.eg.stream_tail + sent, st.eg.tail_len - sent)
                st.eg.tail_len -= sent
                return ST_STOPPED
            err = errno
        c.errors[ERR_DISCONNECT] += 1
        c.last_errno = err
        c.drops[DROP_DISCONNECTED] += 1
        st.eg.exit_errno = err
        st.eg.tail_len = 0
        return ST_CLOSED
    st.eg.tail_len = 0
    c.packets += 1
    c.bytes -= st.overhead
    c.batches += 1
    return ST_GO_ON


cdef int read_offload_batch(PumpState *st) noexcept nogil:
    """Offload egress: drain up to `batch` reads (each a virtio_net_hdr and
    a packet or super-packet), segment them into st.eg.segs, sending whenever
    the segment pool fills.  ST_GO_ON to go on, else why the loop ends."""
    cdef Counters *c = &st.eg.c
    cdef unsigned int n = 0
    cdef ssize_t r
    cdef int err, status, reason
    cdef uint8_t *slot
    cdef virtio_net_hdr h
    cdef size_t framing = st.front
    st.eg.nseg = 0
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
                st.eg.exit_errno = err
                return ST_FATAL
            break
        if r == 0:
            st.eg.exit_errno = 0
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
        if st.peers != NULL:
            reason = egress_route(st, slot + VNET_HDR_LEN, <size_t>r - VNET_HDR_LEN, n - 1)
            if reason == DROP_NO_SESSION:
                # Only a plain packet can wait for the handshake (a TCP SYN,
                # a ping), checksummed first: Python sends it as it is.
                if (h.gso_type & ~VIRTIO_NET_HDR_GSO_ECN) == VIRTIO_NET_HDR_GSO_NONE and \
                        (not (h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) or complete_checksum(
                            slot + VNET_HDR_LEN, <size_t>r - VNET_HDR_LEN, &h) == 0):
                    reason = hold_for_handshake(st, n - 1, slot + VNET_HDR_LEN,
                                                <size_t>r - VNET_HDR_LEN)
                    if reason == DROP_NONE:
                        continue
                else:
                    tr_add64(&st.eg.peer[n - 1].egress.drops, 1)
            if reason != DROP_NONE:
                c.drops[reason] += 1
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


cdef inline void gather_segment(PumpState *st, Segment *g, size_t j) noexcept nogil:
    """Framing session: make TSO segment `j` one piece, its headers and its
    payload copied side by side into its slot of st.eg.seg_sealed, with
    room behind for the padding and the tag.  Sealing three pieces (the
    headers, the payload in place, the padding) costs OpenSSL's
    ChaCha20-Poly1305 about half as much again as one piece, since a
    piece that ends inside a 64-byte block is finished on the slow path;
    copying the payload (L1/L2 speed) costs far less (seal of a 1408-byte
    segment: 1300 ns in three pieces, 855 ns copied and whole; see
    benchmarks/RESULTS.md).  A whole packet is one piece already."""
    cdef uint8_t *whole
    if g.data == NULL:
        return
    whole = st.eg.seg_sealed + j * st.eg.seg_sealed_slot
    memcpy(whole, g.head, g.head_len)
    memcpy(whole + g.head_len, g.data, g.data_len)
    g.head = whole
    g.head_len += g.data_len
    g.data = NULL
    g.data_len = 0
    g.tail = whole + g.head_len


cdef int send_segments(PumpState *st) noexcept nogil:
    """Send st.eg.segs (sealing each with aead): over UDP as datagrams of
    three iovecs each (header copy, payload in place, tag), equal-sized
    runs as UDP GSO messages; over TCP one sendmsg of all their iovecs.
    Empties the pool."""
    cdef Counters *c = &st.eg.c
    cdef size_t k, j
    cdef int status
    cdef Segment *g
    cdef size_t tag = AEAD_TAG_LEN if st.aead.on else 0
    cdef size_t aead_at = st.front - AEAD_HEADER_LEN if st.aead.on else 0
    cdef size_t nseg = st.eg.nseg
    cdef size_t n = 0
    cdef int reason
    cdef unsigned int slot
    cdef size_t pad = 0
    if st.session:
        tag = AEAD_TAG_LEN
    st.eg.nseg = 0
    for j in range(nseg):
        g = &st.eg.segs[j]
        if st.peers != NULL:
            slot = g.group - 1
            if st.session:
                pad = session_pad(g.head_len - st.front + g.data_len, st.max_frame)
                gather_segment(st, g, j)
                reason = session_seal(st, st.eg.keys[slot], g.head + st.front - SESSION_HEADER_LEN,
                                      g.head + st.front, g.head_len - st.front,
                                      NULL, 0, g.tail, 0, pad)
                if reason != DROP_NONE:
                    c.drops[reason] += 1
                    tr_add64(&st.eg.peer[slot].egress.drops, 1)
                    continue
            st.eg.dg_name[n] = &st.eg.dest[slot]
            st.eg.dg_peer[n] = st.eg.peer[slot]
        if st.aead.on and aead_seal(st.aead.shared, &st.eg.aead, AEAD_TYPE_DATA,
                                    g.head + aead_at, g.head + st.front,
                                    g.head_len - st.front, g.data, g.data_len, g.tail) != 0:
            # Cannot happen short of 2^64 packets; the segment is left out
            # (never plaintext, never a stale tag), counted.
            c.errors[ERR_WRITE] += 1
            c.drops[DROP_SEND_ERROR] += 1
            continue
        k = n
        n += 1
        st.eg.seg_iov[3 * k].iov_base = g.head
        st.eg.seg_iov[3 * k].iov_len = g.head_len
        st.eg.seg_iov[3 * k + 1].iov_base = g.data
        st.eg.seg_iov[3 * k + 1].iov_len = g.data_len
        st.eg.seg_iov[3 * k + 2].iov_base = g.tail
        st.eg.seg_iov[3 * k + 2].iov_len = pad + tag
    if n == 0:
        return ST_GO_ON
    if st.stream:
        status = write_stream(st, st.eg.seg_iov, 3 * n, 3, st.overhead)
        return status
    return send_packets(st, st.eg.seg_iov, n, 3, st.eg.seg_msgs, st.eg.msg_segs, st.eg.seg_cmsg)


cdef int egress_step(PumpState *st) noexcept nogil:
    """One wake-up's egress work, the TUN fd being readable: read a batch,
    frame it, send it.  ST_GO_ON, or how the loop ends."""
    cdef unsigned int n
    cdef int status, sent
    if st.peers != NULL:
        st.eg.snap = reader_enter(st.peers, st.eg.reader)
        st.eg.now = tr_monotonic()
    if st.offload:
        status = read_offload_batch(st)
        sent = send_segments(st) if st.eg.nseg else ST_GO_ON
    else:
        status = read_batch(st, &n)
        sent = ST_GO_ON
        if n and st.stream:
            sent = write_stream(st, st.eg.iov, n, 1, st.overhead)
        elif n:
            sent = send_datagrams(st, n)
    # The device gone or the connection lost say more than a stop.
    if sent == ST_CLOSED or sent == ST_FATAL:
        return sent
    if status != ST_GO_ON:
        return status
    return sent


cdef int egress_loop(PumpState *st) noexcept nogil:
    cdef int status, ready
    if st.eg.tail_len:
        status = send_tail(st)
        if status != ST_GO_ON:
            return status
    while True:
        if st.peers != NULL:
            reader_idle(st.peers, st.eg.reader)
        ready = wait_ready(st, &st.eg.c, st.tun_fd, POLLIN)
        if ready == 0:
            return ST_STOPPED
        if ready < 0:
            st.eg.exit_errno = errno
            return ST_FATAL
        status = egress_step(st)
        if status != ST_GO_ON:
            return status


# ---------------------------------------------------------------- ingress

cdef int tun_write_now(PumpState *st, iovec *iov, int count, uint32_t packets,
                       size_t length) noexcept nogil:
    """One TUN write of `packets` packets (one, or a coalesced super-packet
    behind its virtio_net_hdr).  0, or -1 when the loop must end (stop
    fired: ingress_exit_errno 0; or the device is gone)."""
    cdef Counters *c = &st.ing.c
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
                st.ing.exit_errno = 0
                return -1
            err = errno
        c.errors[ERR_WRITE] += 1
        c.last_errno = err
        if device_gone(err):
            st.ing.exit_errno = err
            return -1
        # EINVAL, EIO (link down), ENOMEM...: these packets are lost, counted.
        c.drops[DROP_TUN_WRITE] += packets
        return 0


cdef int tun_output(PumpState *st, iovec *iov, int count, uint32_t packets,
                    size_t length) noexcept nogil:
    """Write `packets` packets to the TUN (see tun_write_now); io "uring":
    queued for flush_packets' one submission.  0, or -1 when the loop
    must end."""
    if st.ing.ur.ring != NULL:
        return uring_queue_write(st, iov, count, packets, length)
    return tun_write_now(st, iov, count, packets, length)


cdef int deliver(PumpState *st, uint8_t *packet, size_t length) noexcept nogil:
    """Validate one packet from the network; drop and count it, or write it
    (offload: queue it for the coalescer).  0, or -1 when the loop ends."""
    cdef int reason = validate_packet(packet, length, st.tap, st.max_frame)
    if reason != DROP_NONE:
        st.ing.c.drops[reason] += 1
        return 0
    if st.offload:
        if st.ing.npkts == SEG_POOL and flush_packets(st) != 0:
            return -1
        st.ing.pkts[st.ing.npkts].data = packet
        st.ing.pkts[st.ing.npkts].length = <uint32_t>length
        st.ing.npkts += 1
        return 0
    st.ing.out_iov[0].iov_base = packet
    st.ing.out_iov[0].iov_len = length
    return tun_output(st, st.ing.out_iov, 1, 1, length)


cdef int flush_packets(PumpState *st) noexcept nogil:
    """End of a receive batch: write what the coalescer holds, and (io
    "uring") submit the queued TUN writes.  0, or -1 when the loop ends."""
    cdef size_t n = st.ing.npkts
    st.ing.npkts = 0
    if n and coalesce_and_write(st, st.ing.pkts, n) != 0:
        return -1
    return uring_flush_writes(st) if st.ing.ur.queued else 0


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
        reason = aead_open(st.aead.shared, &st.ing.aead, AEAD_TYPE_DATA,
                           <uint8_t *>frame, length, NULL, 0)
        if reason != AEAD_OPEN_OK:
            st.ing.c.drops[reason] += 1
            return 0
        return deliver(st, <uint8_t *>frame + AEAD_HEADER_LEN, length - AEAD_OVERHEAD)
    return deliver(st, <uint8_t *>frame, length)


cdef int ingress_stream_step(PumpState *st) noexcept nogil:
    """One read of the TCP stream, its complete records delivered.
    ST_GO_ON, or how the loop ends."""
    cdef Counters *c = &st.ing.c
    cdef ssize_t r
    cdef int err, status
    cdef int one = 1
    r = recv(st.sock_fd, st.ing.stream_buf + st.ing.stream_have,
             st.ing.stream_cap - st.ing.stream_have, MSG_DONTWAIT)
    c.syscalls += 1
    if r == 0:
        c.errors[ERR_DISCONNECT] += 1
        st.ing.exit_errno = 0
        return ST_CLOSED
    if r < 0:
        err = errno
        if err == EINTR or err == EAGAIN:
            return ST_GO_ON
        c.errors[ERR_DISCONNECT] += 1
        c.last_errno = err
        st.ing.exit_errno = err
        return ST_FATAL if device_gone(err) else ST_CLOSED
    c.batches += 1
    st.ing.stream_have += <size_t>r
    if st.quickack:
        # The kernel drops back to delayed ACKs on its own; re-armed
        # after every read, the ACK for what was just read leaves now.
        # A peer that runs Nagle (simpletun writes the length and the
        # packet in two calls; OpenVPN without --tcp-nodelay) holds its
        # next small segment until that ACK: 40 ms, not microseconds.
        setsockopt(st.sock_fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one))
        c.syscalls += 1
    status = len16_consume(st.ing.stream_buf, &st.ing.stream_have,
                           st.max_frame + st.overhead - LEN16_HEADER, stream_sink, st)
    if status == PARSE_BAD_LENGTH:
        # The stream is out of sync or hostile: nothing after this
        # point can be trusted, so the connection is closed.
        c.drops[DROP_BAD_FRAME] += 1
        c.errors[ERR_DISCONNECT] += 1
        st.ing.exit_errno = 0
        return ST_PROTOCOL
    if status == PARSE_SINK_STOP:
        return ST_FATAL if st.ing.exit_errno else ST_STOPPED
    return ST_GO_ON


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
    cdef Counters *c = &st.ing.c
    cdef size_t offset = 0, chunk
    cdef size_t header = st.overhead
    cdef uint8_t *datagram
    cdef uint8_t *packet
    cdef int reason
    if st.peers != NULL:
        if truncated:
            c.drops[DROP_OVERSIZE] += 1
            return 0
        if segment == 0 or length == 0:
            segment = length if length else 1
        while True:
            chunk = segment if length - offset > segment else length - offset
            if peer_receive(st, buf + offset, chunk, sender, sender_len) != 0:
                return -1
            offset += chunk
            if offset >= length:
                return 0
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
            reason = aead_open(st.aead.shared, &st.ing.aead, AEAD_TYPE_DATA, datagram, chunk,
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


cdef int ingress_datagram_step(PumpState *st) noexcept nogil:
    """One recvmmsg batch, each message checked and delivered.  ST_GO_ON,
    or how the loop ends."""
    cdef Counters *c = &st.ing.c
    cdef int r, i, err
    cdef size_t length, segment
    cdef mmsghdr *m
    cdef bint known
    if st.peers != NULL:
        st.ing.snap = reader_enter(st.peers, st.ing.reader)
        st.ing.now = tr_monotonic()
    for i in range(<int>st.batch):
        st.ing.msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
        st.ing.msgs[i].msg_hdr.msg_flags = 0
        if st.gro:
            st.ing.msgs[i].msg_hdr.msg_controllen = st.cmsg_space
    r = recvmmsg(st.sock_fd, st.ing.msgs, st.batch, MSG_DONTWAIT, NULL)
    c.syscalls += 1
    if r < 0:
        err = errno
        if err == EINTR or err == EAGAIN:
            return ST_GO_ON
        # ECONNREFUSED and friends: an ICMP error queued on the socket.
        c.errors[ERR_READ] += 1
        c.last_errno = err
        if device_gone(err):
            st.ing.exit_errno = err
            return ST_FATAL
        return ST_GO_ON
    if r == 0:
        return ST_GO_ON
    c.batches += 1
    known = tr_load_acquire(&st.peer_known)
    for i in range(r):
        m = &st.ing.msgs[i]
        length = m.msg_len
        segment = gro_segment_size(&m.msg_hdr, <uint32_t>length) if st.gro else length
        if ingress_message(st, st.ing.slab + <size_t>i * st.ingress_slot, length,
                           segment, m.msg_hdr.msg_flags & MSG_TRUNC,
                           &st.ing.names[i], m.msg_hdr.msg_namelen, &known) != 0:
            return ST_FATAL if st.ing.exit_errno else ST_STOPPED
    if flush_packets(st) != 0:
        return ST_FATAL if st.ing.exit_errno else ST_STOPPED
    return ST_GO_ON


cdef inline int ingress_step(PumpState *st) noexcept nogil:
    """One wake-up's ingress work, the socket being readable."""
    if st.stream:
        return ingress_stream_step(st)
    return ingress_datagram_step(st)


cdef int ingress_loop(PumpState *st) noexcept nogil:
    cdef int ready, status
    st.ing.npkts = 0
    while True:
        if st.peers != NULL:
            reader_idle(st.peers, st.ing.reader)
        ready = wait_ready(st, &st.ing.c, st.sock_fd, POLLIN)
        if ready == 0:
            return ST_STOPPED
        if ready < 0:
            st.ing.exit_errno = errno
            return ST_FATAL
        status = ingress_step(st)
        if status != ST_GO_ON:
            return status


# ---------------------------------------------------------------- both

cdef int duplex_loop(PumpState *st) noexcept nogil:
    """Both directions in one thread: one poll() on the TUN fd, the socket
    and the stop eventfd, then a batch for each side that is ready.  A
    packet through the relay wakes one thread instead of two, and a reply
    the kernel queues while we write to the TUN is read without sleeping.
    st.duplex_end says which side ended the loop."""
    cdef pollfd fds[3]
    cdef int status
    st.duplex_end = 0
    st.nested_status = ST_GO_ON
    st.ing.npkts = 0
    if st.eg.tail_len:
        status = send_tail(st)
        if status != ST_GO_ON:
            return duplex_status(st, status)
    fds[0].fd = st.sock_fd
    fds[0].events = POLLIN
    fds[1].fd = st.tun_fd
    fds[1].events = POLLIN
    fds[2].fd = st.stop_fd
    fds[2].events = POLLIN
    while True:
        if st.peers != NULL:
            reader_idle(st.peers, st.eg.reader)
            reader_idle(st.peers, st.ing.reader)
        if poll_fds(st, &st.eg.c, fds, 3) < 0:
            st.eg.exit_errno = errno
            return ST_FATAL
        if fds[2].revents:
            return ST_STOPPED
        if (fds[0].revents | fds[1].revents) & POLLNVAL:
            st.duplex_end = 1 if fds[0].revents & POLLNVAL else 0
            if st.duplex_end:
                st.ing.exit_errno = EBADF
            else:
                st.eg.exit_errno = EBADF
            return ST_FATAL
        # Ingress first: what it writes to the TUN may be answered by the
        # kernel at once, and the next poll() finds that reply waiting.
        if fds[0].revents:
            status = ingress_step(st)
            if status != ST_GO_ON:
                st.duplex_end = 1
                return status
        if fds[1].revents:
            status = egress_step(st)
            if status != ST_GO_ON:
                return duplex_status(st, status)


cdef inline int duplex_status(PumpState *st, int status) noexcept nogil:
    """An egress step ended the duplex loop: or did the ingress step that
    ran inside its wait for the socket (wait_writable_duplex)?"""
    if st.duplex_end == 1 and st.nested_status != ST_GO_ON:
        return st.nested_status
    st.duplex_end = 0
    return status
