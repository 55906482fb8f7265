# TUN offloads: super-packets in, ordinary packets on the wire, and back.
#
# With IFF_VNET_HDR every TUN read and write carries a virtio_net_hdr.
# Egress: the kernel hands us TCP/UDP super-packets of up to 64 KiB (TSO,
# USO) with the checksum left to us; segment_packet() cuts them into
# wire-sized packets, each header copied into a scratch slot and its
# payload left in place (two iovecs per packet), checksums computed.
# Ingress: coalesce_and_write() joins consecutive TCP segments of one flow
# back into one super-packet written with a GSO header, so the kernel's
# stack sees one packet instead of dozens.  The wire only ever carries
# ordinary packets: a peer with offloads off interoperates.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from tunrelay.includes.system cimport (
    IPPROTO_TCP, IPPROTO_UDP, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4, VNET_HDR_LEN, iovec,
    tr_csum_fold, tr_csum_partial, tr_csum_pseudo, tr_put_csum, virtio_net_hdr)

cdef enum:
    # A copied header: len16 (2) + IPv4 with options (60) + TCP with
    # options (60), rounded up.
    SEG_HEAD_MAX = 192  # + aead: its header (24) in front and its tag (16) at the end
    SEG_TAIL_ROOM = 32  # the tag, after up to SESSION_PAD_MAX zeros (framing session)
    # Segments one batch can hold before it must be sent: enough for a
    # 64 KiB super-packet at the smallest MSS Linux sends (48 bytes).
    SEG_POOL = 2048
    # Packets joined into one super-packet at most; and its IP length limit.
    COALESCE_MAX = 64
    IP_LENGTH_MAX = 65535
    # One UDP_SEGMENT send: at most UDP_MAX_SEGMENTS (64 on every kernel
    # that has UDP GSO) datagrams, and under the 65507-byte UDP payload limit.
    MAX_GSO_SEGMENTS = 64
    MAX_GSO_BYTES = 65000

    TCP_FIN = 0x01
    TCP_PSH = 0x08
    TCP_ACK = 0x10
    TCP_CWR = 0x80

    SEGMENT_OK = 0
    SEGMENT_POOL_FULL = -1   # send what is pooled, then call again
    SEGMENT_BAD = -2         # a header the kernel should never have sent
    SEGMENT_OVERSIZE = -3    # segments longer than the MTU


cdef inline uint16_t get16(const uint8_t *p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline void put16(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>v


cdef inline uint32_t get32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v


cdef inline void ipv4_header_checksum(uint8_t *ip, uint32_t header_len) noexcept nogil:
    ip[10] = 0
    ip[11] = 0
    tr_put_csum(ip + 10, ~tr_csum_fold(tr_csum_partial(ip, header_len, 0)))


cdef inline const uint8_t *ip_addrs(const uint8_t *ip, size_t *addr_len) noexcept nogil:
    """The source and destination addresses, adjacent in both IP versions."""
    if ip[0] >> 4 == 4:
        addr_len[0] = 4
        return ip + 12
    addr_len[0] = 16
    return ip + 8


cdef int complete_checksum(uint8_t *pkt, size_t length, const virtio_net_hdr *h) noexcept nogil:
    """NEEDS_CSUM without GSO: the L4 checksum field holds the pseudo-header
    sum; fold in the rest and store it.  -1 if the offsets lie."""
    cdef size_t start = h.csum_start, at = <size_t>h.csum_start + h.csum_offset
    cdef uint16_t csum
    if start >= length or at + 2 > length:
        return -1
    csum = ~tr_csum_fold(tr_csum_partial(pkt + start, length - start, 0))
    if csum == 0 and h.csum_offset == 6:
        csum = 0xFFFF  # UDP: 0 means "no checksum"
    tr_put_csum(pkt + at, csum)
    return 0


cdef int segment_packet(PumpState *st, uint8_t *pkt, size_t length,
                        const virtio_net_hdr *h, size_t framing,
                        uint32_t group) noexcept nogil:
    """Append the wire packets of one TUN read to st.eg.segs.  `framing` bytes
    in front of pkt are free for a framing header (the vnet header's room).
    Returns SEGMENT_OK, SEGMENT_POOL_FULL or SEGMENT_BAD."""
    cdef Segment *s
    cdef uint8_t gso_type = h.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    cdef bint v4, tcp
    cdef size_t l4, l4_len, hdrs, payload, mss, count, i, seg_len, addr_len
    cdef uint8_t *head
    cdef uint8_t *ip
    cdef uint8_t *l4h
    cdef const uint8_t *addrs
    cdef uint32_t seq0 = 0
    cdef uint16_t id0 = 0, csum
    cdef uint8_t flags0 = 0, flags, proto
    cdef uint64_t sum

    if gso_type == VIRTIO_NET_HDR_GSO_NONE:
        if st.eg.nseg >= SEG_POOL:
            return SEGMENT_POOL_FULL
        if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and complete_checksum(pkt, length, h) != 0:
            return SEGMENT_BAD
        s = &st.eg.segs[st.eg.nseg]
        s.head = pkt - framing
        s.head_len = <uint32_t>(framing + length)
        s.data = NULL
        s.data_len = 0
        s.tail = pkt + length  # the slot has tail room for padding and a tag
        s.group = group
        if st.len16:
            put16(s.head, <uint32_t>(length + st.overhead - LEN16_HEADER))
        st.eg.nseg += 1
        return SEGMENT_OK

    tcp = gso_type == VIRTIO_NET_HDR_GSO_TCPV4 or gso_type == VIRTIO_NET_HDR_GSO_TCPV6
    if not tcp and gso_type != VIRTIO_NET_HDR_GSO_UDP_L4:
        return SEGMENT_BAD
    proto = IPPROTO_TCP if tcp else IPPROTO_UDP
    # Where the L4 header starts: the kernel says (csum_start); check it
    # against the IP header, no extension headers or IP options beyond it.
    if length < 20:
        return SEGMENT_BAD
    l4 = h.csum_start
    v4 = pkt[0] >> 4 == 4
    if v4:
        if l4 != <size_t>(pkt[0] & 0x0F) * 4 or l4 < 20 or pkt[9] != proto:
            return SEGMENT_BAD
        id0 = get16(pkt + 4)
    else:
        if pkt[0] >> 4 != 6 or l4 != 40 or pkt[6] != proto:
            return SEGMENT_BAD
    if tcp:
        if length < l4 + 20:
            return SEGMENT_BAD
        l4_len = <size_t>(pkt[l4 + 12] >> 4) * 4
        if l4_len < 20:
            return SEGMENT_BAD
        seq0 = get32(pkt + l4 + 4)
        flags0 = pkt[l4 + 13]
    else:
        l4_len = 8
    hdrs = l4 + l4_len
    mss = h.gso_size
    if hdrs > length or mss == 0 or framing + hdrs + SEG_TAIL_ROOM > SEG_HEAD_MAX:
        return SEGMENT_BAD
    if hdrs + mss > st.max_frame:
        return SEGMENT_OVERSIZE
    payload = length - hdrs
    count = (payload + mss - 1) // mss if payload else 1
    if count > SEG_POOL:
        return SEGMENT_BAD
    if st.eg.nseg + count > SEG_POOL:
        return SEGMENT_POOL_FULL

    for i in range(count):
        seg_len = mss if payload - i * mss > mss else payload - i * mss
        s = &st.eg.segs[st.eg.nseg]
        head = st.eg.seg_heads + st.eg.nseg * SEG_HEAD_MAX
        if st.len16:
            put16(head, <uint32_t>(hdrs + seg_len + st.overhead - LEN16_HEADER))
        ip = head + framing
        memcpy(ip, pkt, hdrs)
        if v4:
            put16(ip + 2, <uint32_t>(hdrs + seg_len))
            put16(ip + 4, <uint16_t>(id0 + i))
            ipv4_header_checksum(ip, <uint32_t>l4)
        else:
            put16(ip + 4, <uint32_t>(hdrs - 40 + seg_len))
        l4h = ip + l4
        if tcp:
            put32(l4h + 4, <uint32_t>(seq0 + i * mss))
            flags = flags0
            if i + 1 < count:
                flags &= ~(TCP_FIN | TCP_PSH)
            if i > 0:
                flags &= ~TCP_CWR
            l4h[13] = flags
            l4h[16] = 0
            l4h[17] = 0
        else:
            put16(l4h + 4, <uint32_t>(8 + seg_len))
            l4h[6] = 0
            l4h[7] = 0
        addrs = ip_addrs(ip, &addr_len)
        sum = tr_csum_pseudo(addrs, addr_len, proto, <uint32_t>(l4_len + seg_len))
        sum = tr_csum_partial(l4h, l4_len, sum)
        sum = tr_csum_partial(pkt + hdrs + i * mss, seg_len, sum)
        csum = ~tr_csum_fold(sum)
        if not tcp and csum == 0:
            csum = 0xFFFF
        tr_put_csum(l4h + (16 if tcp else 6), csum)
        s.head = head
        s.head_len = <uint32_t>(framing + hdrs)
        s.data = pkt + hdrs + i * mss
        s.data_len = <uint32_t>seg_len
        s.tail = head + SEG_HEAD_MAX - SEG_TAIL_ROOM
        s.group = group
        st.eg.nseg += 1
    return SEGMENT_OK


# ---------------------------------------------------------------- coalescing

cdef struct Run:
    uint8_t *first          # the first packet: its header becomes the super-packet's
    uint32_t count
    uint32_t total          # bytes of the super-packet (headers once)
    uint32_t bytes          # bytes of the packets as received (for counters)
    uint32_t mss            # payload of the first packet; later ones <= it
    uint32_t next_seq
    uint16_t l4             # IP header length
    uint16_t hdrs           # IP + TCP header length
    bint closed             # a shorter or PSH packet ended it
    bint psh


cdef bint tcp_candidate(const uint8_t *p, uint32_t length, uint16_t *l4,
                        uint16_t *hdrs) noexcept nogil:
    """A plain TCP data segment (ACK, optional PSH) with no IP options,
    extension headers or fragmentation, whose checksum verifies.  The
    packet passed validate_packet(): its IP length fields are consistent."""
    cdef uint32_t thl
    cdef uint8_t flags
    cdef size_t addr_len
    cdef const uint8_t *addrs
    if p[0] == 0x45:
        if p[9] != IPPROTO_TCP or (get16(p + 6) & 0x3FFF) != 0:
            return False
        # A bad header checksum: the kernel drops the packet; in a run its
        # header would be rewritten with a fresh checksum (or discarded).
        if tr_csum_fold(tr_csum_partial(p, 20, 0)) != 0xFFFF:
            return False
        l4[0] = 20
    elif p[0] >> 4 == 6:
        if p[6] != IPPROTO_TCP:
            return False
        l4[0] = 40
    else:
        return False
    if length < l4[0] + 20u:
        return False
    thl = <uint32_t>(p[l4[0] + 12] >> 4) * 4
    if thl < 20 or l4[0] + thl >= length:
        return False   # no payload (a pure ACK) or a lying header length
    flags = p[l4[0] + 13]
    if flags != TCP_ACK and flags != (TCP_ACK | TCP_PSH):
        return False
    hdrs[0] = <uint16_t>(l4[0] + thl)
    # Verify: the super-packet goes up with CHECKSUM_PARTIAL, which the
    # kernel trusts, so a segment it would have rejected must not join.
    addrs = ip_addrs(p, &addr_len)
    return tr_csum_fold(tr_csum_partial(
        p + l4[0], length - l4[0],
        tr_csum_pseudo(addrs, addr_len, IPPROTO_TCP, length - l4[0]))) == 0xFFFF


cdef bint same_flow(const Run *run, const uint8_t *p, uint16_t l4,
                    uint16_t hdrs) noexcept nogil:
    """p continues run: same IP fields that must not change within a
    super-packet, same ports, ack, window and options; next in sequence."""
    cdef const uint8_t *f = run.first
    if l4 != run.l4 or hdrs != run.hdrs:
        return False
    if l4 == 20:
        if p[1] != f[1] or p[8] != f[8] or (p[6] & 0xE0) != (f[6] & 0xE0) \
                or memcmp(p + 12, f + 12, 8) != 0:
            return False
    else:
        if memcmp(p, f, 4) != 0 or p[7] != f[7] or memcmp(p + 8, f + 8, 32) != 0:
            return False
    # Ports (0..3), ack (8..11), data offset and reserved/AE bits (12),
    # window (14..15), options (20..): equal.
    if memcmp(p + l4, f + l4, 4) != 0 or memcmp(p + l4 + 8, f + l4 + 8, 4) != 0 \
            or p[l4 + 12] != f[l4 + 12] or memcmp(p + l4 + 14, f + l4 + 14, 2) != 0 \
            or memcmp(p + l4 + 20, f + l4 + 20, hdrs - l4 - 20) != 0:
        return False
    return get32(p + l4 + 4) == run.next_seq


cdef int flush_run(PumpState *st, Run *run) noexcept nogil:
    """Write a run: one packet as it is, or many as one GSO super-packet.
    Returns tun_output()'s status."""
    cdef uint8_t *f = run.first
    cdef size_t addr_len
    cdef const uint8_t *addrs
    cdef virtio_net_hdr *h = &st.ing.out_hdr
    cdef int status
    memset(h, 0, sizeof(virtio_net_hdr))
    st.ing.out_iov[0].iov_base = h
    st.ing.out_iov[0].iov_len = VNET_HDR_LEN
    if run.count > 1:
        if run.l4 == 20:
            put16(f + 2, run.total)
            ipv4_header_checksum(f, 20)
            h.gso_type = VIRTIO_NET_HDR_GSO_TCPV4
        else:
            put16(f + 4, run.total - 40)
            h.gso_type = VIRTIO_NET_HDR_GSO_TCPV6
        if run.psh:
            f[run.l4 + 13] |= TCP_PSH
        # CHECKSUM_PARTIAL: the field holds the pseudo-header sum (not
        # inverted); every segment's own checksum was verified.
        addrs = ip_addrs(f, &addr_len)
        tr_put_csum(f + run.l4 + 16, tr_csum_fold(
            tr_csum_pseudo(addrs, addr_len, IPPROTO_TCP, run.total - run.l4)))
        h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
        h.hdr_len = run.hdrs
        h.gso_size = <uint16_t>run.mss
        h.csum_start = run.l4
        h.csum_offset = 16
    status = tun_output(st, st.ing.out_iov, run.count + 1, run.count, run.bytes)
    run.count = 0
    return status


cdef int coalesce_and_write(PumpState *st, Packet *pkts, size_t n) noexcept nogil:
    """Write n validated packets to the TUN, in order, joining runs of
    consecutive segments of one TCP flow.  0, or -1 when the loop must end."""
    cdef Run run
    cdef size_t i
    cdef uint16_t l4, hdrs
    cdef uint32_t payload
    cdef uint8_t *p
    cdef uint32_t length
    cdef bint candidate
    run.count = 0
    for i in range(n):
        p = pkts[i].data
        length = pkts[i].length
        candidate = tcp_candidate(p, length, &l4, &hdrs)
        if candidate and run.count and not run.closed and same_flow(&run, p, l4, hdrs):
            payload = length - hdrs
            if payload <= run.mss and run.count < COALESCE_MAX \
                    and run.total + payload <= IP_LENGTH_MAX + (40 if l4 == 40 else 0):
                st.ing.out_iov[run.count + 1].iov_base = p + hdrs
                st.ing.out_iov[run.count + 1].iov_len = payload
                run.count += 1
                run.total += payload
                run.bytes += length
                run.next_seq += payload
                run.psh = p[l4 + 13] & TCP_PSH
                run.closed = payload < run.mss or run.psh
                continue
        if run.count and flush_run(st, &run) != 0:
            return -1
        run.first = p
        run.count = 1
        run.total = length
        run.bytes = length
        st.ing.out_iov[1].iov_base = p
        st.ing.out_iov[1].iov_len = length
        run.closed = True
        if candidate:
            run.l4 = l4
            run.hdrs = hdrs
            run.mss = length - hdrs
            run.next_seq = get32(p + l4 + 4) + run.mss
            run.psh = p[l4 + 13] & TCP_PSH
            run.closed = run.psh
    if run.count and flush_run(st, &run) != 0:
        return -1
    return 0
