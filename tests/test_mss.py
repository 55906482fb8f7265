"""MSS clamping (``mss_clamp``), without root.

The MSS option of TCP SYNs and SYN-ACKs is lowered to what fits the
tunnel, in both directions, the TCP checksum updated incrementally
(RFC 1624).  Checked here:

- the C clamp (``_fastpath.clamp_mss``, the code the loops run) and its
  Python reference (``framing.clamp_mss``, what the Python pump runs) on
  crafted packets: IPv4 and IPv6, SYN and SYN-ACK, the MSS above, at and
  below the clamp, among the options Linux sends, at an odd offset,
  malformed option lists, non-SYNs, fragments, extension headers,
  non-TCP, TAP frames, truncation.  Every checksum is verified from
  scratch by this file's own RFC 1071 sum, never by the code under test;
- the partial checksum of an offload TUN read (NEEDS_CSUM): left alone,
  and completing it afterwards gives the right checksum (an incremental
  update there would not);
- hypothesis: random option bytes and random packets never crash, C and
  Python agree, and nothing but the MSS values and the checksum changes;
- both pumps (and the compiled one in one thread) over socketpairs: each
  direction, UDP and TCP framing, offloads (compiled), aead and a
  PeerTable (compiled), the counters, the arguments;
- the configuration key ``[relay] mss_clamp``.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pumprig import WAIT, Rig, assert_quiet, drops, recv_exactly, wait_for

from conftest import load_fastpath, load_pump_class, ones_sum
from tunrelay import framing
from tunrelay.daemon.config import RelayConfig, loads, to_toml
from tunrelay.errors import ConfigError, PumpArgumentError
from tunrelay.framing import len16_encode

MTU = 1400
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
DF, MF = 0x4000, 0x2000
V4 = (bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2)))
V6 = (bytes.fromhex("fd000000000000000000000000000001"),
      bytes.fromhex("fd000000000000000000000000000002"))
VERSIONS = [pytest.param(4, id="ipv4"), pytest.param(6, id="ipv6")]
#: What "auto" gives for MTU: the packet of the largest segment fits it.
AUTO = {4: MTU - 40, 6: MTU - 60}

NOP, EOL = b"\x01", b"\x00"
SACK_PERM = b"\x04\x02"
TIMESTAMPS = b"\x08\x0a" + struct.pack("!II", 0x11223344, 0x55667788)
WSCALE = b"\x03\x03\x07"


def mss_option(value: int) -> bytes:
    return b"\x02\x04" + struct.pack("!H", value)


def linux_syn_options(mss: int) -> bytes:
    """What Linux puts in a SYN: MSS, SACK permitted, timestamps, NOP,
    window scale (20 bytes)."""
    return mss_option(mss) + SACK_PERM + TIMESTAMPS + NOP + WSCALE


# ---------------------------------------------------------------- checksums, computed here (conftest.ones_sum)

def pseudo_sum(version: int, segment_length: int) -> int:
    src, dst = V4 if version == 4 else V6
    if version == 4:
        return ones_sum(src + dst + struct.pack("!BBH", 0, 6, segment_length))
    return ones_sum(src + dst + struct.pack("!I3xB", segment_length, 6))


def tcp_offset(packet: bytes, ip: int = 0) -> int:
    return ip + ((packet[ip] & 0x0F) * 4 if packet[ip] >> 4 == 4 else 40)


def checksum_ok(packet: bytes, ip: int = 0) -> bool:
    """The TCP checksum verifies: pseudo-header + segment sum to 0xFFFF."""
    version = packet[ip] >> 4
    segment = packet[tcp_offset(packet, ip):]
    return ones_sum(segment, pseudo_sum(version, len(segment))) == 0xFFFF


# ---------------------------------------------------------------- packets

def tcp_packet(version: int, *, flags: int = SYN, options: bytes = b"", payload: bytes = b"",
               frag: int = DF, proto: int = 6, data_offset: int | None = None,
               next_header: int | None = None, extension: bytes = b"") -> bytes:
    """An IPv4 or IPv6 TCP packet with a correct checksum (computed here).
    ``options`` are taken as given (pad them yourself for a valid header)."""
    thl = 20 + len(options)
    offset = thl // 4 if data_offset is None else data_offset
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 80, 0x01020304, 7, (offset & 0xF) << 4,
                                flags, 64240, 0, 0) + options + payload)
    csum = ~ones_sum(bytes(tcp), pseudo_sum(version, len(tcp))) & 0xFFFF
    tcp[16:18] = struct.pack("!H", csum)
    src, dst = V4 if version == 4 else V6
    if version == 4:
        header = bytearray(struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp), 0x1234, frag, 64,
                                       proto, 0) + src + dst)
        header[10:12] = struct.pack("!H", ~ones_sum(bytes(header)) & 0xFFFF)
        return bytes(header) + bytes(tcp)
    nh = 6 if next_header is None else next_header
    return struct.pack("!IHBB", 6 << 28, len(extension) + len(tcp), nh, 64) + src + dst \
        + extension + bytes(tcp)


def syn(version: int, mss: int, *, flags: int = SYN) -> bytes:
    return tcp_packet(version, flags=flags, options=linux_syn_options(mss))


def ethernet(packet: bytes, *, vlan: bool = False) -> bytes:
    ethertype = b"\x08\x00" if packet[0] >> 4 == 4 else b"\x86\xdd"
    tag = b"\x81\x00\x00\x05" if vlan else b""
    return bytes.fromhex("020000000002" "020000000001") + tag + ethertype + packet


def mss_values(packet: bytes, ip: int = 0) -> list[int]:
    """The MSS options of a packet, read the simple way (a test helper for
    well-formed option lists only)."""
    tcp = tcp_offset(packet, ip)
    end = tcp + (packet[tcp + 12] >> 4) * 4
    at, found = tcp + 20, []
    while at < end and packet[at] != 0:
        if packet[at] == 1:
            at += 1
            continue
        if packet[at] == 2 and packet[at + 1] == 4:
            found.append(struct.unpack("!H", packet[at + 2:at + 4])[0])
        at += packet[at + 1]
    return found


def changed_offsets(before: bytes, after: bytes) -> list[int]:
    assert len(before) == len(after)
    return [i for i, (a, b) in enumerate(zip(before, after)) if a != b]


# ---------------------------------------------------------------- the clamp itself

def _c_clamp(packet, v4, v6, mode="tun", partial=False):
    return load_fastpath().clamp_mss(packet, v4, v6, mode, partial)


IMPLEMENTATIONS = [pytest.param(_c_clamp, id="c"),
                   pytest.param(framing.clamp_mss, id="python")]


@pytest.fixture(params=IMPLEMENTATIONS)
def clamp(request):
    return request.param


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("flags", [SYN, SYN | ACK], ids=["syn", "syn-ack"])
def test_a_larger_mss_is_lowered_and_the_checksum_still_verifies(clamp, version, flags):
    packet = syn(version, 1460, flags=flags)
    out = clamp(packet, 1360, 1340)
    assert out is not None
    assert mss_values(out) == [1360 if version == 4 else 1340]
    assert checksum_ok(out)
    tcp = tcp_offset(packet)
    # Only the MSS value and the checksum changed.
    assert set(changed_offsets(packet, out)) <= {tcp + 16, tcp + 17, tcp + 22, tcp + 23}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mss", [536, 1339, 1340])
def test_an_mss_at_or_below_the_clamp_is_left_alone(clamp, version, mss):
    assert clamp(syn(version, mss), 1340, 1340) is None


@pytest.mark.parametrize("version", VERSIONS)
def test_a_family_without_a_clamp_is_left_alone(clamp, version):
    packet = syn(version, 9000)
    assert clamp(packet, 0 if version == 4 else 1300, 0 if version == 6 else 1300) is None
    assert clamp(packet, 0, 0) is None


OPTION_LISTS = {
    # The MSS option at an odd offset: its bytes straddle two checksum words.
    "nop-first": NOP + mss_option(8960) + NOP + NOP + NOP,
    "three-nops": NOP * 3 + mss_option(8960) + NOP * 3 + SACK_PERM + EOL * 4,
    "after-timestamps": NOP + NOP + TIMESTAMPS + mss_option(8960),
    "window-scale-first": WSCALE + mss_option(8960) + SACK_PERM + NOP * 3,
    "alone": mss_option(8960),
    "linux": linux_syn_options(8960),
    "in-a-full-header": NOP * 35 + NOP + mss_option(8960),   # 40 bytes of options
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("options", OPTION_LISTS.values(), ids=OPTION_LISTS.keys())
def test_the_mss_is_found_among_other_options(clamp, version, options):
    assert len(options) % 4 == 0
    packet = tcp_packet(version, options=options, payload=b"abc")   # an odd length too
    out = clamp(packet, 1200, 1200)
    assert out is not None and checksum_ok(out)
    assert mss_values(out) == [1200]
    at = tcp_offset(packet) + 20 + options.index(mss_option(8960)) + 2
    tcp = tcp_offset(packet)
    assert set(changed_offsets(packet, out)) <= {tcp + 16, tcp + 17, at, at + 1}


def test_every_mss_option_is_lowered(clamp):
    """Linux takes the last MSS option of a SYN: all of them are clamped."""
    packet = tcp_packet(4, options=mss_option(9000) + NOP * 4 + mss_option(1500))
    out = clamp(packet, 1360, 1340)
    assert mss_values(out) == [1360, 1360] and checksum_ok(out)


MALFORMED = {
    # An option list a receiver stops reading before the MSS: left alone.
    "length-0": b"\x08\x00" + b"\x00\x00" + mss_option(9000),
    "length-1": b"\x08\x01" + b"\x00\x00" + mss_option(9000),
    "overruns-the-header": NOP * 3 + b"\x08\x0a" + b"\x00" * 3,
    "mss-overruns-the-header": NOP * 2 + b"\x02\x04",
    "kind-at-the-last-byte": NOP * 3 + b"\x02",
    "after-end-of-list": EOL + NOP * 3 + mss_option(9000),
    "mss-of-length-3": b"\x02\x03\x23" + NOP,
    "mss-of-length-5": b"\x02\x05\x23\x28\x00" + NOP * 3,
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("options", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_options_leave_the_packet_alone(clamp, version, options):
    padded = options + NOP * (-len(options) % 4)
    assert clamp(tcp_packet(version, options=padded), 536, 536) is None


def test_an_mss_before_a_malformed_option_is_lowered(clamp):
    """A receiver (Linux tcp_parse_options) stops at a bad length but keeps
    what it read before: that MSS would be used, so it is clamped."""
    packet = tcp_packet(4, options=mss_option(9000) + b"\x08\x00\x00\x00")
    out = clamp(packet, 1360, 1340)
    assert out is not None and checksum_ok(out)
    assert out[20 + 22:20 + 24] == struct.pack("!H", 1360)


def test_an_mss_option_of_another_length_is_skipped_not_read(clamp):
    packet = tcp_packet(6, options=b"\x02\x06\xff\xff\xff\xff" + mss_option(9000) + NOP * 2)
    out = clamp(packet, 1360, 1340)
    assert out is not None and checksum_ok(out)
    assert out[40 + 20:40 + 26] == b"\x02\x06\xff\xff\xff\xff"
    assert out[40 + 28:40 + 30] == struct.pack("!H", 1340)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("flags", [ACK, ACK | PSH, FIN | ACK, RST, 0], ids=["ack", "psh", "fin", "rst", "none"])
def test_a_segment_without_syn_is_left_alone(clamp, version, flags):
    """Only a SYN's MSS option means anything; the same bytes elsewhere are data."""
    assert clamp(tcp_packet(version, flags=flags, options=mss_option(9000)), 536, 536) is None


@pytest.mark.parametrize("frag", [MF, DF | MF, 0x0001, 0x1FFF], ids=["first", "first-df", "offset", "last"])
def test_an_ipv4_fragment_is_left_alone(clamp, frag):
    assert clamp(tcp_packet(4, options=mss_option(9000), frag=frag), 536, 536) is None


def test_not_tcp_is_left_alone(clamp):
    assert clamp(tcp_packet(4, options=mss_option(9000), proto=17), 536, 536) is None
    assert clamp(tcp_packet(6, options=mss_option(9000), next_header=17), 536, 536) is None


def test_ipv6_extension_headers_are_left_alone(clamp):
    hop_by_hop = bytes((6, 0)) + b"\x01\x04\x00\x00\x00\x00"   # next: TCP; PadN
    packet = tcp_packet(6, options=mss_option(9000), next_header=0, extension=hop_by_hop)
    assert clamp(packet, 536, 536) is None


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("data_offset", [0, 4, 9, 15])
def test_a_data_offset_that_lies_leaves_the_packet_alone(clamp, version, data_offset):
    packet = tcp_packet(version, options=mss_option(9000) + NOP * 4, data_offset=data_offset)
    assert clamp(packet, 536, 536) is None


@pytest.mark.parametrize("version", VERSIONS)
def test_every_truncation_is_left_alone(clamp, version):
    packet = syn(version, 9000)
    for length in range(len(packet)):
        assert clamp(packet[:length], 536, 536) is None, length
    # Longer than its IP length says (the loops drop that; here: harmless).
    out = clamp(packet + b"\0\0\0\0", 536, 536)
    assert out is not None and out[len(packet):] == b"\0\0\0\0"


def test_the_wrong_ip_version_is_left_alone(clamp):
    packet = bytearray(syn(4, 9000))
    packet[0] = 0x55
    assert clamp(bytes(packet), 536, 536) is None
    assert clamp(b"", 536, 536) is None


@pytest.mark.parametrize("vlan", [False, True], ids=["untagged", "vlan"])
@pytest.mark.parametrize("version", VERSIONS)
def test_tap_frames_are_clamped_behind_their_ethernet_header(clamp, version, vlan):
    frame = ethernet(syn(version, 1460), vlan=vlan)
    ip = 18 if vlan else 14
    out = clamp(frame, 1360, 1340, "tap")
    assert out is not None and out[:ip] == frame[:ip]
    assert mss_values(out, ip) == [1360 if version == 4 else 1340] and checksum_ok(out, ip)
    assert clamp(frame, 1360, 1340, "tun") is None      # an Ethernet header is no IP packet
    arp = frame[:12] + b"\x08\x06" + frame[14:]
    assert clamp(arp, 536, 536, "tap") is None
    assert all(clamp(frame[:n], 536, 536, "tap") is None for n in range(ip + 40))


def test_a_checksum_that_was_wrong_stays_wrong_by_as_much(clamp):
    """Incremental: a segment the receiver would drop stays one it drops."""
    packet = bytearray(syn(4, 9000))
    packet[36] ^= 0x10
    out = clamp(bytes(packet), 1360, 1340)
    assert out is not None and not checksum_ok(out)
    fixed = bytearray(out)
    fixed[36] ^= 0x10
    assert checksum_ok(bytes(fixed))


# ---------------------------------------------------------------- a partial checksum (offloads)

def with_partial_checksum(packet: bytes) -> bytes:
    """As the kernel hands a CHECKSUM_PARTIAL segment to a TUN with a
    virtio_net_hdr (NEEDS_CSUM): the field holds the pseudo-header sum."""
    tcp = tcp_offset(packet)
    data = bytearray(packet)
    data[tcp + 16:tcp + 18] = struct.pack("!H", pseudo_sum(packet[0] >> 4, len(packet) - tcp))
    return bytes(data)


def complete(packet: bytes) -> bytes:
    """What complete_checksum (or the kernel) does with NEEDS_CSUM: sum
    from the TCP header on, the field's content included, and store it."""
    tcp = tcp_offset(packet)
    data = bytearray(packet)
    data[tcp + 16:tcp + 18] = struct.pack("!H", ~ones_sum(packet[tcp:]) & 0xFFFF)
    return bytes(data)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("options", [linux_syn_options(9000), NOP + mss_option(9000) + NOP * 3],
                         ids=["even", "odd"])
def test_a_partial_checksum_is_left_for_whoever_completes_it(clamp, version, options):
    packet = with_partial_checksum(tcp_packet(version, options=options))
    assert checksum_ok(complete(packet))            # the construction is right
    out = clamp(packet, 1200, 1200, "tun", True)
    tcp = tcp_offset(packet)
    assert out is not None and out[tcp + 16:tcp + 18] == packet[tcp + 16:tcp + 18]
    assert mss_values(out) == [1200] and checksum_ok(complete(out))
    # The reasoning, shown: an incremental update of the pseudo-header sum
    # would count the change twice, and the completed checksum is wrong.
    wrong = clamp(packet, 1200, 1200)
    assert not checksum_ok(complete(wrong))


# ---------------------------------------------------------------- hypothesis: random options

def _options_with_mss(draw) -> bytes:
    """Random option bytes, with an MSS option somewhere more often than chance."""
    words = draw(st.integers(0, 10))
    raw = bytearray(draw(st.binary(min_size=4 * words, max_size=4 * words)))
    if words and draw(st.booleans()):
        at = draw(st.integers(0, 4 * words - 4))
        raw[at:at + 4] = mss_option(draw(st.integers(0, 0xFFFF)))
    return bytes(raw)


@st.composite
def random_segments(draw):
    version = draw(st.sampled_from([4, 6]))
    flags = draw(st.sampled_from([SYN, SYN | ACK, ACK, 0xFF, draw(st.integers(0, 255))]))
    options = _options_with_mss(draw)
    payload = draw(st.binary(max_size=9))
    return tcp_packet(version, flags=flags, options=options, payload=payload)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_segments(), st.integers(framing.MIN_MSS, 0xFFFF), st.booleans())
def test_random_options_change_nothing_but_mss_values_and_the_checksum(packet, limit, partial):
    if partial:
        packet = with_partial_checksum(packet)
    out = _c_clamp(packet, limit, limit, "tun", partial)
    assert out == framing.clamp_mss(packet, limit, limit, "tun", partial)
    if out is None:
        return
    tcp = tcp_offset(packet)
    assert packet[tcp + 13] & SYN
    changed = set(changed_offsets(packet, out)) - {tcp + 16, tcp + 17}
    assert changed
    # Every changed byte is in the value of an MSS option (kind 2, length
    # 4) inside the TCP header, which is now the clamp and was above it.
    end = tcp + (packet[tcp + 12] >> 4) * 4
    for at in changed:
        assert any(packet[s:s + 2] == b"\x02\x04"
                   and struct.unpack("!H", out[s + 2:s + 4])[0] == limit
                   and struct.unpack("!H", packet[s + 2:s + 4])[0] > limit
                   for s in (at - 2, at - 3) if tcp + 20 <= s and s + 4 <= end), at
    if partial:
        assert out[tcp + 16:tcp + 18] == packet[tcp + 16:tcp + 18]
        assert checksum_ok(complete(out))
    else:
        assert checksum_ok(out)


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=140), st.sampled_from(["tun", "tap"]), st.booleans(),
       st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_random_bytes_never_crash_and_both_clamps_agree(data, mode, partial, v4, v6):
    partial = partial and mode == "tun"
    assert _c_clamp(data, v4, v6, mode, partial) == framing.clamp_mss(data, v4, v6, mode, partial)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([4, 6]), st.binary(min_size=20, max_size=80), st.integers(536, 0xFFFF))
def test_random_bytes_behind_a_valid_ip_header_never_crash(version, tcp, limit):
    """Headers that parse, then anything: the walk stays inside the packet."""
    src, dst = V4 if version == 4 else V6
    tcp = bytearray(tcp)
    tcp[13] |= SYN
    if version == 4:
        packet = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp), 0, DF, 64, 6, 0) + src + dst
    else:
        packet = struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + src + dst
    packet += bytes(tcp)
    assert _c_clamp(packet, limit, limit) == framing.clamp_mss(packet, limit, limit)


# ---------------------------------------------------------------- the values

def test_auto_and_explicit_values():
    assert framing.mss_clamps("auto", 1400) == (1360, 1340)
    assert framing.mss_clamps("auto", 1280) == (1240, 1220)
    assert framing.mss_clamps("auto", 1279) == (1239, 0)     # no IPv6 on such a device
    assert framing.mss_clamps("auto", framing.MIN_MTU) == (framing.MIN_MTU - 40, 0)
    assert framing.mss_clamps(None, 1400) == framing.mss_clamps(False, 1400) == (0, 0)
    assert framing.mss_clamps(0, 1400) == (0, 0)
    assert framing.mss_clamps(1300, 1400) == (1300, 1300)
    assert framing.mss_clamps((1300, 0), 1400) == (1300, 0)
    for value in (535, 65496, True, "1300", 1300.0, (1300,), (1300, 1300, 1300), (1, 1300),
                  "automatic", [1300, 1300]):
        with pytest.raises(PumpArgumentError, match="mss_clamp must be"):
            framing.mss_clamps(value, 1400)


# ---------------------------------------------------------------- through the pumps

@pytest.fixture
def rig(pump_class):
    rig = Rig(pump_class, mtu=MTU)
    yield rig
    rig.close()


def udp_pump(rig, family=socket.AF_INET, **options):
    """(tun test end, peer socket, pump socket, started pump)."""
    tun, tun_end = rig.tun()
    peer = rig.udp(family)
    sock = rig.udp(family, timeout=None)
    pump = rig.pump(tun_end, sock, peer=peer.getsockname()[:2], **options)
    pump.start()
    return tun, peer, sock, pump


def clamped(pump, direction: str, n: int) -> None:
    wait_for(lambda: pump.stats()[direction]["mss_clamped"] == n, f"{n} {direction} clamped",
             lambda: pump.stats()[direction])


@pytest.mark.parametrize("version", VERSIONS)
def test_egress_clamps_what_the_device_sends(rig, version):
    tun, peer, _, pump = udp_pump(rig, mss_clamp="auto")
    assert pump.mss_clamp == (AUTO[4], AUTO[6])
    tun.send(syn(version, 1460))
    tun.send(syn(version, 1460, flags=SYN | ACK))
    tun.send(syn(version, 536))
    tun.send(tcp_packet(version, flags=ACK, options=mss_option(9000)))
    got = [peer.recv(65535) for _ in range(4)]
    assert [mss_values(p) for p in got] == [[AUTO[version]], [AUTO[version]], [536], [9000]]
    assert all(checksum_ok(p) for p in got)
    clamped(pump, "egress", 2)
    assert pump.stats()["ingress"]["mss_clamped"] == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_ingress_clamps_what_the_device_gets(rig, version):
    tun, peer, sock, pump = udp_pump(rig, mss_clamp=1200)
    for packet in (syn(version, 1460, flags=SYN | ACK), syn(version, 1200),
                   tcp_packet(version, flags=ACK, options=mss_option(9000))):
        peer.sendto(packet, sock.getsockname())
    got = [tun.recv(65535) for _ in range(3)]
    assert [mss_values(p) for p in got] == [[1200], [1200], [9000]]
    assert all(checksum_ok(p) for p in got)
    clamped(pump, "ingress", 1)
    assert pump.stats()["egress"]["mss_clamped"] == 0


def test_off_by_default(rig):
    tun, peer, sock, pump = udp_pump(rig)
    assert pump.mss_clamp == (0, 0)
    packet = syn(4, 9000)
    tun.send(packet)
    assert peer.recv(65535) == packet
    peer.sendto(packet, sock.getsockname())
    assert tun.recv(65535) == packet
    assert pump.stats()["egress"]["mss_clamped"] == pump.stats()["ingress"]["mss_clamped"] == 0


def test_one_family_only(rig):
    tun, peer, _, pump = udp_pump(rig, mss_clamp=(0, 1300))
    v4, v6 = syn(4, 9000), syn(6, 9000)
    tun.send(v4)
    tun.send(v6)
    assert peer.recv(65535) == v4
    assert mss_values(peer.recv(65535)) == [1300]
    clamped(pump, "egress", 1)


def test_tcp_framing_both_ways(rig):
    tun, tun_end = rig.tun()
    far, sock = rig.tcp()
    pump = rig.pump(tun_end, sock, mss_clamp="auto")
    pump.start()
    tun.send(syn(6, 1440))
    length = struct.unpack("!H", recv_exactly(far, 2))[0]
    record = recv_exactly(far, length)
    assert mss_values(record) == [AUTO[6]] and checksum_ok(record)
    far.sendall(len16_encode(syn(4, 1460, flags=SYN | ACK)))
    out = tun.recv(65535)
    assert mss_values(out) == [AUTO[4]] and checksum_ok(out)
    clamped(pump, "egress", 1)
    clamped(pump, "ingress", 1)


def test_a_tap_pump_clamps_frames(rig):
    tun, peer, sock, _ = udp_pump(rig, mode="tap", mss_clamp="auto")
    tun.send(ethernet(syn(4, 1460)))
    out = peer.recv(65535)
    assert mss_values(out, 14) == [AUTO[4]] and checksum_ok(out, 14)
    peer.sendto(ethernet(syn(6, 1460), vlan=True), sock.getsockname())
    out = tun.recv(65535)
    assert mss_values(out, 18) == [AUTO[6]] and checksum_ok(out, 18)


def test_dropped_packets_are_not_clamped(rig):
    """A packet the ingress checks refuse is counted as dropped, never touched."""
    tun, peer, sock, pump = udp_pump(rig, mss_clamp="auto")
    bad = syn(4, 9000) + b"\0"           # longer than its IP length: bad_length
    peer.sendto(bad, sock.getsockname())
    wait_for(lambda: drops(pump) == {"bad_length": 1}, "bad_length", lambda: drops(pump))
    assert pump.stats()["ingress"]["mss_clamped"] == 0
    assert_quiet(tun)


@pytest.mark.parametrize("value", [535, 65496, True, "x", (1300, 1, 2)])
def test_bad_values_are_refused(rig, value):
    _, tun_end = rig.tun()
    with pytest.raises(PumpArgumentError, match="mss_clamp must be"):
        rig.pump(tun_end, rig.udp(timeout=None), mss_clamp=value)


def test_both_pumps_count_alike():
    results = {}
    for kind in ("c", "python"):
        rig = Rig(load_pump_class(kind), mtu=MTU)
        try:
            tun, peer, sock, pump = udp_pump(rig, mss_clamp="auto")
            # (A TUN pump sends an Ethernet frame as it is: no IP packet to clamp.)
            for packet in (syn(4, 1460), syn(6, 1460), syn(4, 100), ethernet(syn(4, 9000))):
                tun.send(packet)
            got_out = [peer.recv(65535) for _ in range(4)]
            for packet in (syn(6, 9000, flags=SYN | ACK), syn(4, 1000)):
                peer.sendto(packet, sock.getsockname())
            got_in = [tun.recv(65535) for _ in range(2)]
            wait_for(lambda p=pump: p.stats()["ingress"]["packets"] == 2, "ingress")
            pump.stop(WAIT)
            results[kind] = ({d: c["mss_clamped"] for d, c in pump.stats().items()},
                             got_out, got_in)
        finally:
            rig.close()
    assert results["c"] == results["python"]
    assert results["c"][0] == {"egress": 2, "ingress": 1}


# ---------------------------------------------------------------- the compiled pump's other paths

VNET = struct.Struct("<BBHHHH")    # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
NEEDS_CSUM = 1


@pytest.fixture
def crig():
    rig = Rig(load_fastpath().Pump, mtu=MTU)
    yield rig
    rig.close()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("partial", [True, False], ids=["needs-csum", "complete"])
def test_offload_egress_with_a_partial_or_a_complete_checksum(crig, version, partial):
    tun, peer, _, pump = udp_pump(crig, offload=True, mss_clamp="auto")
    packet = syn(version, 1460)
    tcp = tcp_offset(packet)
    if partial:
        header = VNET.pack(NEEDS_CSUM, 0, 0, 0, tcp, 16)
        packet = with_partial_checksum(packet)
    else:
        header = bytes(VNET.size)
    tun.send(header + packet)
    out = peer.recv(65535)
    assert mss_values(out) == [AUTO[version]] and checksum_ok(out)
    clamped(pump, "egress", 1)


def test_offload_egress_leaves_a_partial_checksum_elsewhere_alone(crig):
    """NEEDS_CSUM for a field other than the TCP checksum: what completing
    it means for the MSS is not ours to guess, so it is not clamped (the
    segmenter completes the field the kernel named)."""
    tun, peer, _, pump = udp_pump(crig, offload=True, mss_clamp="auto")
    packet = with_partial_checksum(syn(4, 1460))
    tun.send(VNET.pack(NEEDS_CSUM, 0, 0, 0, 20, 6) + packet)
    out = peer.recv(65535)
    assert mss_values(out) == [1460]
    assert pump.stats()["egress"]["mss_clamped"] == 0


def test_offload_ingress(crig):
    tun, peer, sock, pump = udp_pump(crig, offload=True, mss_clamp="auto")
    peer.sendto(syn(6, 1440, flags=SYN | ACK), sock.getsockname())
    out = tun.recv(65535)
    assert out[:VNET.size] == bytes(VNET.size)
    assert mss_values(out[VNET.size:]) == [AUTO[6]] and checksum_ok(out[VNET.size:])
    clamped(pump, "ingress", 1)


def test_aead_the_receiving_end_clamps(crig):
    """Only b clamps: a's SYN crosses sealed, b clamps it after opening;
    b's SYN-ACK is clamped before it is sealed."""
    key = bytes(range(32))
    tun_a, end_a = crig.tun()
    tun_b, end_b = crig.tun()
    sock_a, sock_b = crig.udp(timeout=None), crig.udp(timeout=None)
    a = crig.pump(end_a, sock_a, framing="aead", key=key, role="a", peer=sock_b.getsockname())
    b = crig.pump(end_b, sock_b, framing="aead", key=key, role="b", peer=sock_a.getsockname(),
                  mss_clamp=1000)
    a.start()
    b.start()
    tun_a.send(syn(4, 1460))
    out = tun_b.recv(65535)
    assert mss_values(out) == [1000] and checksum_ok(out)
    tun_b.send(syn(4, 1460, flags=SYN | ACK))
    back = tun_a.recv(65535)
    assert mss_values(back) == [1000] and checksum_ok(back)
    clamped(b, "ingress", 1)
    clamped(b, "egress", 1)
    assert a.stats()["egress"]["mss_clamped"] == a.stats()["ingress"]["mss_clamped"] == 0


def test_a_peer_table_pump_clamps_both_ways(crig):
    PeerTable = load_fastpath().PeerTable
    table = PeerTable()
    tun, tun_end = crig.tun()
    sock, spoke = crig.udp(timeout=None), crig.udp()
    table.add("spoke", endpoint=spoke.getsockname(), allowed_ips=["10.0.0.2/32", "fd00::2/128"],
              roaming=False)
    pump = crig.pump(tun_end, sock, peers=table, mss_clamp=(1100, 1000))
    pump.start()
    tun.send(syn(6, 1440))                                  # to fd00::2: the spoke's
    out = spoke.recv(65535)
    assert mss_values(out) == [1000] and checksum_ok(out)
    answer = bytearray(syn(4, 1460, flags=SYN | ACK))
    answer[12:20] = V4[1] + V4[0]                           # from 10.0.0.2 (the sum is the same)
    spoke.sendto(bytes(answer), sock.getsockname())
    got = tun.recv(65535)
    assert mss_values(got) == [1100] and checksum_ok(got)
    clamped(pump, "egress", 1)
    clamped(pump, "ingress", 1)


def swapped(packet: bytes) -> bytes:
    """The packet from its destination to its source (the sums do not change)."""
    data = bytearray(packet)
    if packet[0] >> 4 == 4:
        data[12:20] = packet[16:20] + packet[12:16]
    else:
        data[8:40] = packet[24:40] + packet[8:24]
    return bytes(data)


def test_a_wireguard_device_clamps_its_sessions_both_ways():
    """Framing "session": b clamps, a does not.  a's SYN (held while the
    handshake runs, then sent) is lowered by b after it is opened; b's
    SYN-ACK before it is padded and sealed."""
    from tunrelay.wireguard import noise
    from tunrelay.wireguard.device import WireGuardDevice

    load_fastpath()
    nets = {"a": ("10.0.0.1/32", "fd00::1/128"), "b": ("10.0.0.2/32", "fd00::2/128")}

    async def main() -> None:
        ends = {}
        for name, clamp in (("a", None), ("b", "auto")):
            test_end, dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            test_end.setblocking(False)
            private = noise.generate_private_key()
            device = WireGuardDevice([dev_end.fileno()], private_key=private, bind="127.0.0.1",
                                     mtu=1420, mss_clamp=clamp)
            ends[name] = (test_end, dev_end, device, noise.private_to_public(private))
        try:
            for _, _, device, _ in ends.values():
                await device.start()
            for me, other in (("a", "b"), ("b", "a")):
                device, public = ends[me][2], ends[other][3]
                device.add_peer(public, other)
                device.set_peer(public, allowed_ips=nets[other],
                                endpoint=("127.0.0.1", ends[other][2].listen_port))
            loop = asyncio.get_running_loop()
            ends["a"][0].send(syn(6, 1440))
            got = await asyncio.wait_for(loop.sock_recv(ends["b"][0], 65536), WAIT)
            assert mss_values(got) == [1420 - 60] and checksum_ok(got)
            ends["b"][0].send(swapped(syn(4, 1460, flags=SYN | ACK)))
            back = await asyncio.wait_for(loop.sock_recv(ends["a"][0], 65536), WAIT)
            assert mss_values(back) == [1420 - 40] and checksum_ok(back)
            counts = ends["b"][2].stats()["pumps"][0]
            assert (counts["egress"]["mss_clamped"], counts["ingress"]["mss_clamped"]) == (1, 1)
            counts = ends["a"][2].stats()["pumps"][0]
            assert (counts["egress"]["mss_clamped"], counts["ingress"]["mss_clamped"]) == (0, 0)
        finally:
            for test_end, dev_end, device, _ in ends.values():
                await device.stop()
                test_end.close()
                dev_end.close()

    asyncio.run(main())


def test_a_wireguard_device_refuses_a_bad_clamp():
    from tunrelay.wireguard.device import WireGuardDevice
    load_fastpath()
    with pytest.raises(PumpArgumentError, match="mss_clamp must be"):
        WireGuardDevice([0], mss_clamp=100)


# ---------------------------------------------------------------- [relay] mss_clamp

def test_the_config_key():
    assert RelayConfig().mss_clamp == "auto"
    assert loads("").relay.mss_clamp == "auto"
    for text, value in (("false", False), ('"auto"', "auto"), ("1300", 1300),
                        (str(framing.MIN_MSS), framing.MIN_MSS),
                        (str(framing.MAX_MSS), framing.MAX_MSS)):
        cfg = loads(f"[relay]\nmss_clamp = {text}\n")
        assert cfg.relay.mss_clamp == value
        assert loads(to_toml(cfg)) == cfg


@pytest.mark.parametrize("text,found", [
    ("true", "got a boolean true"),
    ("535", "got 535"),
    ("65496", "got 65496"),
    ('"1300"', 'got a string "1300"'),
    ("1300.0", "got a float 1300.0"),
    ('"on"', 'got a string "on"'),
    ("[1300, 1300]", "got "),
])
def test_config_errors_name_the_file_the_key_and_what_was_expected(text, found):
    with pytest.raises(ConfigError) as caught:
        loads(f"[relay]\nmss_clamp = {text}\n", "relay.toml")
    message = str(caught.value)
    assert message.startswith("relay.toml: [relay] mss_clamp: expected \"auto\", false or an "
                              f"integer from {framing.MIN_MSS} to {framing.MAX_MSS}")
    assert found in message
