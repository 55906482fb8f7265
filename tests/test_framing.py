"""framing.py (the reference) against the compiled checks of _validate.pxi.

``framing.validate`` and ``tunrelay._fastpath.validate`` must give the same
drop reason for the same bytes; ``framing.Len16Parser`` and
``tunrelay._fastpath.len16_split`` (the very ``len16_consume`` the TCP
ingress loop runs) must cut a byte stream into the same frames however it
is chunked.  No root, no sockets.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ethernet_frame, ipv4_packet, ipv6_packet, load_fastpath
from tunrelay.framing import Len16Parser, len16_encode, max_frame, validate

MTU = 1400
TAP_LIMIT = MTU + 18


def c_validate(packet, mode, limit):
    return load_fastpath().validate(packet, mode, limit)


def py_split(chunks, limit):
    """Len16Parser fed like len16_split: (frames, buffered_bytes, error)."""
    parser = Len16Parser(limit)
    frames = []
    for chunk in chunks:
        got, bad = parser.feed(chunk)
        frames += got
        if bad:
            return frames, parser.buffered, "bad_length"
    return frames, parser.buffered, None


def split_both(chunks, limit):
    """Both implementations on the same chunks; they must agree."""
    compiled = load_fastpath().len16_split(chunks, limit)
    reference = py_split(chunks, limit)
    assert tuple(compiled) == reference
    return reference


def stream_of(frames) -> bytes:
    return b"".join(len16_encode(f) for f in frames)


def with_bytes(packet: bytes, offset: int, value: bytes) -> bytes:
    return packet[:offset] + value + packet[offset + len(value):]


# ---------------------------------------------------------------- validate

CRAFTED = [
    # (packet, mode, limit, reason)
    (b"", "tun", MTU, "empty"),
    (b"", "tap", TAP_LIMIT, "empty"),
    (ipv4_packet(20), "tun", MTU, None),
    (ipv4_packet(MTU), "tun", MTU, None),
    (ipv4_packet(MTU + 1), "tun", MTU, "oversize"),
    (ipv6_packet(40), "tun", MTU, None),
    (ipv6_packet(MTU), "tun", MTU, None),
    (ipv6_packet(MTU + 1), "tun", MTU, "oversize"),
    (b"\x45", "tun", MTU, "truncated"),
    (ipv4_packet(20)[:19], "tun", MTU, "truncated"),
    (b"\x60", "tun", MTU, "truncated"),
    (ipv6_packet(40)[:39], "tun", MTU, "truncated"),
    (b"\x00", "tun", MTU, "bad_version"),
    (bytes(60), "tun", MTU, "bad_version"),
    (b"\x50" + bytes(59), "tun", MTU, "bad_version"),
    (b"\xff" * 40, "tun", MTU, "bad_version"),
    (with_bytes(ipv4_packet(100), 2, (99).to_bytes(2, "big")), "tun", MTU, "bad_length"),
    (with_bytes(ipv4_packet(100), 2, (101).to_bytes(2, "big")), "tun", MTU, "bad_length"),
    (with_bytes(ipv4_packet(100), 0, b"\x44"), "tun", MTU, "bad_length"),   # IHL 4: < 20 bytes
    (with_bytes(ipv4_packet(40), 0, b"\x4f"), "tun", MTU, "bad_length"),    # 60-byte header in 40
    (with_bytes(ipv4_packet(60), 0, b"\x4f"), "tun", MTU, None),            # 60 in 60: fine
    (with_bytes(ipv6_packet(100), 4, (59).to_bytes(2, "big")), "tun", MTU, "bad_length"),
    (with_bytes(ipv6_packet(100), 4, (61).to_bytes(2, "big")), "tun", MTU, "bad_length"),
    (ipv4_packet(100), "tun", 99, "oversize"),
    (b"\x45", "tun", 0, "oversize"),
    (ethernet_frame(14), "tap", TAP_LIMIT, None),
    (ethernet_frame(TAP_LIMIT), "tap", TAP_LIMIT, None),
    (ethernet_frame(TAP_LIMIT + 1), "tap", TAP_LIMIT, "oversize"),
    (bytes(13), "tap", TAP_LIMIT, "truncated"),
    (bytes(10), "tap", TAP_LIMIT, "truncated"),
    (bytes(60), "tap", TAP_LIMIT, None),           # TAP does not look inside
]


@pytest.mark.parametrize("packet, mode, limit, reason", CRAFTED)
def test_validate_crafted(packet, mode, limit, reason):
    assert validate(packet, mode, limit) == reason
    assert c_validate(packet, mode, limit) == reason


def test_validate_accepts_any_buffer():
    packet = ipv4_packet(64)
    for buffer in (packet, bytearray(packet), memoryview(packet)):
        assert validate(buffer, "tun", MTU) is None
        assert c_validate(buffer, "tun", MTU) is None


def test_max_frame():
    assert max_frame("tun", MTU) == MTU
    assert max_frame("tap", MTU) == MTU + 14 + 4


@st.composite
def ip_like(draw):
    """Bytes that get past the first checks often: a chosen version nibble
    and IHL, and length fields near the truth."""
    length = draw(st.integers(0, 200))
    data = bytearray(draw(st.binary(min_size=length, max_size=length)))
    if length:
        version = draw(st.sampled_from([4, 6, draw(st.integers(0, 15))]))
        data[0] = version << 4 | draw(st.integers(0, 15))
    if length >= 4 and draw(st.booleans()):
        data[2:4] = (max(0, length + draw(st.integers(-2, 2))) & 0xFFFF).to_bytes(2, "big")
    if length >= 6 and draw(st.booleans()):
        data[4:6] = ((length - 40 + draw(st.integers(-2, 2))) & 0xFFFF).to_bytes(2, "big")
    return bytes(data)


@settings(max_examples=500, deadline=None)
@given(packet=st.binary(max_size=300), mode=st.sampled_from(["tun", "tap"]),
       limit=st.integers(0, 320))
def test_validate_random_bytes_agree(packet, mode, limit):
    assert c_validate(packet, mode, limit) == validate(packet, mode, limit)


@settings(max_examples=1000, deadline=None)
@given(packet=ip_like(), mode=st.sampled_from(["tun", "tap"]),
       limit=st.one_of(st.just(MTU), st.integers(0, 220)))
def test_validate_ip_like_agree(packet, mode, limit):
    assert c_validate(packet, mode, limit) == validate(packet, mode, limit)


# ---------------------------------------------------------------- len16

FRAMES = [b"\x01", b"ab", bytes(range(100)), ipv4_packet(MTU), b"xyz", ipv6_packet(41)]
STREAM = stream_of(FRAMES)


def test_len16_encode():
    assert len16_encode(b"abc") == b"\x00\x03abc"
    assert len16_encode(bytes(0xFFFF))[:2] == b"\xff\xff"
    for bad in (b"", bytes(0x10000)):
        with pytest.raises(ValueError):
            len16_encode(bad)


def test_len16_whole_stream():
    assert split_both([STREAM], MTU) == (FRAMES, 0, None)


def test_len16_every_split_point():
    for cut in range(len(STREAM) + 1):
        assert split_both([STREAM[:cut], STREAM[cut:]], MTU) == (FRAMES, 0, None), cut


def test_len16_every_pair_of_split_points():
    frames = [b"\x01", b"ab", b"cde", b"Z" * 9]
    stream = stream_of(frames)
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            chunks = [stream[:first], stream[first:second], stream[second:]]
            assert split_both(chunks, MTU) == (frames, 0, None), (first, second)


def test_len16_byte_by_byte():
    chunks = [STREAM[i:i + 1] for i in range(len(STREAM))]
    assert split_both(chunks, MTU) == (FRAMES, 0, None)


def test_len16_many_frames_in_one_chunk():
    frames = [bytes([i % 256]) * (1 + i % 200) for i in range(1500)]
    assert split_both([stream_of(frames)], MTU) == (frames, 0, None)


def test_len16_partial_frame_stays_buffered():
    assert split_both([STREAM[:-1]], MTU) == (FRAMES[:-1], 2 + len(FRAMES[-1]) - 1, None)
    assert split_both([STREAM + b"\x00"], MTU) == (FRAMES, 1, None)    # half a header
    assert split_both([b"\x00\x05abc"], MTU) == ([], 5, None)


def test_len16_frame_of_exactly_the_limit():
    frame = bytes(range(100))
    assert split_both([len16_encode(frame)], 100) == ([frame], 0, None)


@pytest.mark.parametrize("header", [0, MTU + 1, 0xFFFF], ids=["zero", "limit+1", "max"])
def test_len16_bad_length_keeps_earlier_frames(header):
    bad = header.to_bytes(2, "big") + b"after"
    tail = stream_of([b"never"])
    # In the same chunk as good frames, in a chunk of its own, split inside itself.
    assert split_both([STREAM + bad + tail], MTU) == (FRAMES, len(bad + tail), "bad_length")
    assert split_both([STREAM, bad, tail], MTU) == (FRAMES, len(bad), "bad_length")
    assert split_both([STREAM + bad[:1], bad[1:], tail], MTU) == (FRAMES, len(bad), "bad_length")
    assert split_both([bad], MTU) == ([], len(bad), "bad_length")


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.binary(min_size=1, max_size=300), max_size=30),
       limit=st.integers(1, 400), data=st.data())
def test_len16_random_frames_and_chunkings_agree(frames, limit, data):
    stream = stream_of(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    bounds = [0] + cuts + [len(stream)]
    chunks = [stream[a:b] for a, b in zip(bounds, bounds[1:])]
    got, buffered, error = split_both(chunks, limit)
    too_long = [i for i, f in enumerate(frames) if len(f) > limit]
    if too_long:
        assert error == "bad_length"
        assert got == frames[:too_long[0]]
    else:
        assert (got, buffered, error) == (frames, 0, None)


@settings(max_examples=300, deadline=None)
@given(stream=st.binary(max_size=600), limit=st.integers(0, 300), data=st.data())
def test_len16_random_bytes_agree(stream, limit, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    bounds = [0] + cuts + [len(stream)]
    split_both([stream[a:b] for a, b in zip(bounds, bounds[1:])], limit)
