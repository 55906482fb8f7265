#!/usr/bin/env python3
"""Write the seed corpus: corpus/<harness>/<name>, one file per seed.

A seed is written as the choices the harness should make, {label: value}
(labels as the decoders in fuzz_common.py pull them; a list gives the
values of successive pulls of one label; anything not given takes its
lowest value).  SeedSource turns them into the bytes atheris'
FuzzedDataProvider decodes back into exactly those choices.
tests/test_fuzz.py checks that the files here are what this script writes
and that they decode as planned: edit the plans, then rerun

    .venv/bin/python tests/fuzz/make_corpus.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import fuzz_common as fc  # noqa: E402

CORPUS = HERE / "corpus"


def len16(packet: bytes) -> bytes:
    return len(packet).to_bytes(2, "big") + packet


def tcp_run(version, mss, count, **plan):
    return dict(kind="tcp", tcp_version=version, tcp_options=fc.TIMESTAMPS, mss=mss,
                last_len=mss, psh_last=1, seq=1_000_000, **plan)


SEEDS = {
    "fuzz_ingress": {
        # The rest of the input is the datagram, as received.
        "ipv4": dict(mode="tun", framing="raw", mtu=1400, style=0,
                     message=fc.ip_packet(4, 84)),
        "ipv6": dict(mode="tun", framing="raw", mtu=1400, style=0,
                     message=fc.ip_packet(6, 104)),
        "ipv4_tcp_offload": dict(mode="tun", framing="raw", mtu=1500, offload=1, style=0,
                                 message=fc.tcp_packet(4, bytes(100))),
        "tap_frame": dict(mode="tap", framing="raw", mtu=1500, style=0,
                          message=fc.ethernet_frame(60)),
        "len16_ipv6": dict(mode="tun", framing="len16", mtu=1400, style=0,
                           message=len16(fc.ip_packet(6, 60))),
        # One UDP_GRO message of five IPv4 datagrams of 100 bytes.
        "gro_ipv4": dict(mode="tun", framing="raw", mtu=1500, offload=1, style=0, segment=100,
                         message=fc.ip_packet(4, 100) * 5),
        # Built: a GRO message holding a run of 16 TCP segments (coalesced).
        "tcp_run_v4": dict(mode="tun", framing="raw", mtu=1500, offload=1, style=1, messages=1,
                           group=16, segment_exact=1, **tcp_run(4, 1448, 16)),
        "tcp_run_v6": dict(mode="tun", framing="raw", mtu=1500, offload=1, style=1, messages=1,
                           group=16, segment_exact=1, **tcp_run(6, 1428, 16)),
        "tcp_run_aead": dict(mode="tun", framing="aead", cipher="chacha20-poly1305", mtu=1400,
                             offload=1, style=1, messages=1, group=8, segment_exact=1,
                             **tcp_run(4, 1348, 8)),
        "aead_ip": dict(mode="tun", framing="aead", cipher="aes-256-gcm", mtu=1400, style=1,
                        messages=3, kind="ip", ip_version=[4, 6, 4], ip_size=[60, 200, 1400],
                        aead_how=[0, 0, 12]),
        "len16_ip": dict(mode="tap", framing="len16", mtu=1500, style=1, messages=2,
                         kind="ip", ip_version=[4, 6], ip_size=[64, 1518]),
        # aead sessions: a GRO message of 64 datagrams (IPv4 headers) under
        # sessions 0-7, 40 one-offs (the table of 8 overflows: the least
        # recently used are retired, more than the 16 remembered), 0-3 again
        # (forgotten, so admitted anew), 11, two older starts, a restart
        # (everything older evicted) and 0-2 of the new start; then one
        # datagram each: replays (of the last, of one before the restart), a
        # flipped byte, cut short, wire version 1, reflected, forged.
        "aead_sessions": dict(mode="tun", framing="aead", cipher="chacha20-poly1305", mtu=1400,
                              offload=1, style=1, messages=8, group=[64] + [1] * 7,
                              segment_exact=1, kind="ip", ip_size=20,
                              aead_session=[*range(8), *[15] * 40, 0, 1, 2, 3, *[11] * 4, 12, 12,
                                            13, 13, 14, 0, 1, 2, *[0] * 7],
                              aead_pool=[0, 5, 10, 20],
                              aead_how=[0] * 64 + [12, 12, 13, 18, 19, 8, 16],
                              aead_replay=[0, 40], aead_flip_at=30, aead_flip=1, aead_cut=1),
    },
    "fuzz_len16": {
        # A stream as received, cut into three recv() chunks.
        "stream": dict(mode="tun", mtu=1400, cuts=2, cut=[5, 40000], style=0,
                       stream=len16(fc.ip_packet(4, 64)) + len16(fc.ip_packet(6, 80))
                       + len16(fc.ip_packet(4, 1400)) + len16(fc.ip_packet(6, 41))),
        "stream_tap": dict(mode="tap", mtu=1500, cuts=1, cut=30000, style=0,
                           stream=len16(fc.ethernet_frame(60)) + len16(fc.ethernet_frame(1518))),
        "stream_bad_length": dict(mode="tun", mtu=1400, cuts=1, cut=20000, style=0,
                                  stream=len16(fc.ip_packet(4, 64)) + b"\x00\x00"
                                  + len16(fc.ip_packet(4, 64))),
        # Built: a run of 24 TCP segments in len16 frames, offloads on.
        "stream_tcp_run": dict(mode="tun", mtu=1400, offload=1, cuts=3, cut=[1000, 30000, 50000],
                               style=1, groups=1, group=24, **tcp_run(4, 1348, 24)),
        # 4096 small TCP segments in one recv(), offloads on: the coalescer's
        # packet list (2048) fills and is flushed midway.
        "stream_many_frames": dict(mode="tun", mtu=1500, offload=1, style=1, groups=8, group=64,
                                   kind="tcp", tcp_options=b"", mss=1, last_len=1, repeat=8),
        # Runs the coalescer must cut: at 64 segments (two back-to-back runs
        # of 64 in sequence), and at the IP length limit (46 full segments).
        "stream_run_of_128": dict(mode="tun", mtu=1500, offload=1, style=1, groups=2, group=64,
                                  **dict(tcp_run(4, 100, 64), seq=[1000, 7400], psh_last=0)),
        "stream_run_over_64k_v4": dict(mode="tun", mtu=1500, offload=1, style=1, groups=1,
                                       group=64, **tcp_run(4, 1448, 64)),
        "stream_run_over_64k_v6": dict(mode="tun", mtu=1500, offload=1, style=1, groups=1,
                                       group=64, **tcp_run(6, 1428, 64)),
        "stream_ip_frames": dict(mode="tun", mtu=9000, cuts=4, cut=[1, 2, 3, 60000], style=1,
                                 groups=2, group=[4, 3], kind=["ip", "bytes"],
                                 ip_version=[4, 6, 4, 6], ip_size=[20, 40, 9000, 1000],
                                 bytes_len=[1, 2, 3], len16_how=[0, 0, 0, 0, 0, 0, 13]),
        # aead over TCP: records sealed under the harness' first session
        # (IPv4 and IPv6 packets), a replayed one, a reflected one, a hello,
        # one of wire version 1, one cut short (its length kept), then a
        # length over the limit (the stream goes bad).
        "stream_aead": dict(mode="tun", framing="aead", cipher="aes-256-gcm", mtu=1400, cuts=3,
                            cut=[1, 30, 40000], style=1, groups=2, group=[5, 4], kind="ip",
                            ip_version=[4, 6, 4, 6, 4, 4, 6, 4, 4],
                            ip_size=[20, 100, 1400, 40, 60, 20, 60, 80, 20],
                            aead_how=[0, 0, 0, 12, 8, 17, 19, 18, 0], aead_cut=1,
                            len16_how=[0] * 8 + [13]),
        # A TCP run of 24 segments, each an aead record, offloads on: opened
        # and coalesced.
        "stream_aead_tcp_run": dict(mode="tun", framing="aead", cipher="chacha20-poly1305",
                                    mtu=1400, offload=1, cuts=2, cut=[3000, 40000], style=1,
                                    groups=1, group=24, **tcp_run(4, 1348, 24)),
    },
}


def build(harness: str, plan: dict) -> tuple[bytes, list]:
    """The seed's bytes, and the (label, value) pulls that made them."""
    src = fc.SeedSource(plan)
    if harness == "fuzz_ingress":
        cfg = fc.decode_ingress_config(src)
        fc.decode_ingress(src, cfg, fc.AeadState(cfg.cipher) if cfg.framing == "aead" else None)
    else:
        cfg = fc.decode_stream_config(src)
        fc.decode_stream(src, cfg, fc.AeadState(cfg.cipher) if cfg.framing == "aead" else None)
    return src.data(), src.log


def main() -> None:
    for harness, seeds in SEEDS.items():
        folder = CORPUS / harness
        folder.mkdir(parents=True, exist_ok=True)
        for name, plan in seeds.items():
            data, _ = build(harness, plan)
            (folder / name).write_bytes(data)
            print(f"{folder / name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
