# MSS clamping: the MSS option of TCP SYNs and SYN-ACKs lowered to what
# fits the tunnel, both directions, so TCP through it never sends segments
# that a path MTU black hole (ICMP "fragmentation needed" / "packet too
# big" filtered somewhere) would swallow.  framing.clamp_mss is the Python
# reference of clamp_syn_mss below; tests/test_mss.py holds them together.
#
# Called once per packet read from the TUN (before routing and sealing)
# and once per validated packet for the TUN; nothing is allocated, a packet
# that is not a SYN costs a few compares.

from libc.stdint cimport uint8_t, uint32_t

from tunrelay.includes.system cimport (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
                                       VIRTIO_NET_HDR_GSO_NONE, virtio_net_hdr)

cdef enum:
    TCP_SYN = 0x02
    TCPOPT_EOL = 0
    TCPOPT_NOP = 1
    TCPOPT_MSS = 2
    TCPOLEN_MSS = 4
    ETHERTYPE_IPV4 = 0x0800
    ETHERTYPE_IPV6 = 0x86DD
    ETHERTYPE_VLAN = 0x8100
    ETHERTYPE_QINQ = 0x88A8


cdef inline uint32_t csum_replace16(uint32_t check, uint32_t was, uint32_t now) noexcept nogil:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), on 16-bit values as they
    read big-endian."""
    cdef uint32_t total = (~check & 0xFFFF) + (~was & 0xFFFF) + now
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


cdef inline uint32_t swap16(uint32_t v) noexcept nogil:
    return ((v & 0xFF) << 8) | (v >> 8)


cdef int clamp_syn_mss(uint8_t *p, size_t length, unsigned int v4, unsigned int v6, bint tap,
                       const virtio_net_hdr *h) noexcept nogil:
    """Lower the MSS option of a TCP SYN (or SYN-ACK) in place to v4 (IPv4)
    or v6 (IPv6) where it is larger (0: that family is left alone), and
    update the TCP checksum.  1 if the packet changed, else 0.

    `h`: the virtio_net_hdr of an offload TUN read, or NULL.  With
    VIRTIO_NET_HDR_F_NEEDS_CSUM the checksum field holds only the
    pseudo-header sum, and complete_checksum (or the kernel) sums the TCP
    header and payload into it later, the new MSS included: the field is
    left as it is.  An incremental update there would add the difference
    a second time, with the opposite sign, and the finished checksum would
    be the old packet's.  A GSO super-packet (never a SYN) is left alone.

    Every read is bounded by `length` and by the headers' own lengths; what
    does not parse is left alone (see framing.clamp_mss for the rules)."""
    cdef size_t ip = 0, header, total, tcp, end, opt_end, at
    cdef unsigned int clamp, kind, optlen, mss, ethertype, was, now
    cdef bint partial = False
    cdef int changed = 0
    if h != NULL:
        if (h.gso_type & ~VIRTIO_NET_HDR_GSO_ECN) != VIRTIO_NET_HDR_GSO_NONE:
            return 0
        partial = (h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) != 0
    if tap:
        if length < ETHERNET_HEADER:
            return 0
        ethertype = get16(p + 12)
        ip = ETHERNET_HEADER
        if ethertype == ETHERTYPE_VLAN or ethertype == ETHERTYPE_QINQ:
            if length < ETHERNET_HEADER + 4:
                return 0
            ethertype = get16(p + 16)
            ip = ETHERNET_HEADER + 4
        if ethertype != ETHERTYPE_IPV4 and ethertype != ETHERTYPE_IPV6:
            return 0
    if length - ip < 20:
        return 0
    if p[ip] >> 4 == 4:
        clamp = v4
        header = <size_t>(p[ip] & 0x0F) * 4
        total = get16(p + ip + 2)
        # Not TCP, a fragment (more fragments, or an offset), or lengths
        # that do not fit: left alone.
        if clamp == 0 or p[ip + 9] != IPPROTO_TCP or (get16(p + ip + 6) & 0x3FFF) != 0 \
                or header < 20 or header > total or total > length - ip:
            return 0
    elif p[ip] >> 4 == 6:
        clamp = v6
        header = 40
        if clamp == 0 or length - ip < 40 or p[ip + 6] != IPPROTO_TCP:
            return 0   # (extension headers: next header is not TCP)
        total = 40 + <size_t>get16(p + ip + 4)
        if total > length - ip:
            return 0
    else:
        return 0
    tcp = ip + header
    end = ip + total
    if end - tcp < 20 or not (p[tcp + 13] & TCP_SYN):
        return 0
    opt_end = tcp + <size_t>(p[tcp + 12] >> 4) * 4
    if opt_end < tcp + 20 or opt_end > end:
        return 0
    if partial and (h.csum_start != tcp or h.csum_offset != 16):
        return 0   # a partial checksum somewhere else: not ours to reason about
    at = tcp + 20
    while at < opt_end:
        kind = p[at]
        if kind == TCPOPT_EOL:
            break
        if kind == TCPOPT_NOP:
            at += 1
            continue
        if opt_end - at < 2:
            break
        optlen = p[at + 1]
        if optlen < 2 or optlen > opt_end - at:
            break   # where a receiver stops reading options too
        if kind == TCPOPT_MSS and optlen == TCPOLEN_MSS:
            mss = get16(p + at + 2)
            if mss > clamp:
                put16(p + at + 2, clamp)
                if not partial:
                    was, now = mss, clamp
                    if (at + 2 - tcp) & 1:
                        # Its bytes straddle two 16-bit words of the sum.
                        was, now = swap16(was), swap16(now)
                    put16(p + tcp + 16, csum_replace16(get16(p + tcp + 16), was, now))
                changed = 1
        at += optlen
    return changed


cdef inline void mss_egress(PumpState *st, uint8_t *packet, size_t length,
                            const virtio_net_hdr *h) noexcept nogil:
    """A packet read from the TUN, before it is routed and sealed."""
    if (st.mss_v4 | st.mss_v6) and clamp_syn_mss(packet, length, st.mss_v4, st.mss_v6, st.tap, h):
        st.eg.c.mss_clamped += 1


cdef inline void mss_ingress(PumpState *st, uint8_t *packet, size_t length) noexcept nogil:
    """A validated packet from the network, before it is written to the TUN."""
    if (st.mss_v4 | st.mss_v6) and clamp_syn_mss(packet, length, st.mss_v4, st.mss_v6, st.tap, NULL):
        st.ing.c.mss_clamped += 1
