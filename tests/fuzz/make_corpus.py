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



# ---------------------------------------------------------------- fuzz_peers plans
#
# A fuzz_peers seed is its set-up and its steps, each a {label: value}
# dict; peer_plan() records the pulls each one makes (the labels it leaves
# out take their lowest value) and merges them, in order, into one plan.

class _Recorder(fc.SeedSource):
    """A SeedSource that also keeps each answer as the plan gives it."""

    def __init__(self, plan):
        super().__init__(plan)
        self.answers = []

    def _answer(self, label, default):
        value = super()._answer(label, default)
        self.answers.append((label, value))
        return value


def peer_plan(setup: dict, steps: list[dict]) -> dict:
    recorder = _Recorder(setup)
    case = fc.decode_peer_setup(recorder)
    answers = recorder.answers + [("p_steps", len(steps))]
    for step in steps:
        recorder = _Recorder(step)
        fc.decode_peer_step(recorder, case.framing, case.limit)
        answers += recorder.answers
    plan: dict = {}
    for label, value in answers:
        plan.setdefault(label, []).append(value)
    return plan


def peer(endpoint, nets, roaming=1, sessions=()):
    """A peer: ENDPOINT_POOL index (None: none), NET_POOL networks,
    sessions as (local index, initiator)."""
    return dict(p_endpoint=len(fc.ENDPOINT_POOL) if endpoint is None else endpoint,
                p_nets=len(nets), p_net=[fc.NET_POOL.index(n) for n in nets], p_roaming=roaming,
                p_sessions=len(sessions), p_index=[fc.LOCAL_INDEXES.index(i) for i, _ in sessions],
                p_initiator=[int(init) for _, init in sessions])


def setup(framing, peers, **options):
    plan = dict(p_framing=framing, **options)
    for label in ("p_endpoint", "p_nets", "p_net", "p_roaming", "p_sessions", "p_index", "p_initiator"):
        values = []
        for one in peers:
            value = one[label]
            values += value if isinstance(value, list) else [value]
        if framing == "raw" and label in ("p_sessions", "p_index", "p_initiator"):
            continue
        plan[label] = values
    plan["p_peers"] = len(peers)
    return plan


def inner(version=4, src=0, net=0, host=1, size=60, lie=0, lie_arg=0, src_bytes=b""):
    plan = dict(p_ip_version=version, p_src=src, p_src_net=net, p_src_host=host, p_ip_lie=lie,
                p_ip_lie_arg=lie_arg, p_src_bytes=src_bytes)
    if size > 200:
        plan.update(p_ip_big=7, p_ip_size=size)
    else:
        plan.update(p_ip_big=0, p_ip_small=size)
    return plan


def sealed(peer=0, sender=0, slot=0, counter=0, counter_arg=0, pad=0, pad_len=1, mutation=0,
           at=0, arg=1, serial=0, **packet):
    """A datagram sealed under a session (slot 0 current, 1 previous, 2
    next, 3 any by serial, 4 a dead one); counter modes as
    fuzz_common.session_counter()."""
    return dict(p_op=0, p_sender=sender, p_kind=0, p_peer=peer, p_slot=slot, p_serial=serial,
                p_counter=counter, p_counter_arg=counter_arg, p_pad=pad, p_pad_len=pad_len,
                p_mutation=mutation, p_mutation_at=at, p_mutation_arg=arg, **inner(**packet))


def keepalive(peer=0, sender=0, slot=0, counter=0, counter_arg=0, mutation=0, at=0, arg=1):
    return dict(p_op=0, p_sender=sender, p_kind=15, p_peer=peer, p_slot=slot, p_counter=counter,
                p_counter_arg=counter_arg, p_mutation=mutation, p_mutation_at=at, p_mutation_arg=arg)


def packet(peer=0, sender=0, **fields):
    """Raw framing: an IP packet."""
    return dict(p_op=0, p_sender=sender, p_kind=0, p_peer=peer, **inner(**fields))


def other(kind, sender=0, **fields):
    """first_byte (byte, length), junk (data), empty, replay (back),
    forged_header (index, counter, body)."""
    kinds = {"first_byte": 10, "junk": 11, "empty": 12, "replay": 13, "forged_header": 14}
    names = {"byte": "p_byte", "length": "p_length", "data": "p_junk", "back": "p_replay",
             "counter": "p_forged_counter", "body": "p_forged"}
    plan = dict(p_op=0, p_sender=sender, p_kind=kinds[kind])
    for key, value in fields.items():
        if key == "index":
            plan["p_index"] = fc.LOCAL_INDEXES.index(value)
        else:
            plan[names[key]] = value
    if "data" in fields:
        plan["p_junk_len"] = len(fields["data"])
    if "body" in fields:
        plan["p_forged_len"] = len(fields["body"])
    return plan


def gro(framing, datagrams, segment=0, limit=1400):
    """A UDP_GRO message: the datagrams (step dicts of one datagram) back
    to back; segment 0: the first one's length."""
    answers = [("p_op", 11), ("p_gro", len(datagrams))]
    for one in datagrams:
        recorder = _Recorder(one)
        fc.decode_peer_datagram(recorder, framing, limit)
        answers += recorder.answers
    answers.append(("p_segment_exact", 1 if segment == 0 else 0))
    if segment:
        answers.append(("p_segment", segment))
    plan: dict = {}
    for label, value in answers:
        plan.setdefault(label, []).append(value)
    return plan


TAKE = dict(p_op=13)


def install(peer, index, initiator, reuse_key=False):
    return dict(p_op=12, p_install_peer=peer, p_index=fc.LOCAL_INDEXES.index(index),
                p_initiator=int(initiator), p_reuse_key=7 if reuse_key else 0)

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


S_PEERS = [peer(0, ["10.9.0.0/16", "fd09::/32"], sessions=[(1, True)]),
           peer(1, ["10.9.1.0/24", "fd09:0:1::/48"], roaming=0, sessions=[(2, True), (3, False)])]
P1_IN_P0 = 0x0105          # host 1.5 of p0's 10.9.0.0/16: 10.9.1.5, in p1's longer 10.9.1.0/24

SEEDS["fuzz_peers"] = {
    # Two peers (p1's prefixes inside p0's), sessions current and next:
    # IPv4 and IPv6 (padded to 16, trimmed) delivered; a source in the
    # longer prefix of the other peer; p1's next confirmed (promoted) and
    # its previous still good; a keepalive; the window: 8193 ahead, then
    # exactly 8192 behind (never seen, refused) and 8191 behind (taken),
    # the newest again.
    "session_sessions": peer_plan(setup("session", S_PEERS), [
        sealed(), sealed(version=6, size=100, pad=1), sealed(host=P1_IN_P0),
        sealed(peer=1, sender=1), sealed(peer=1, sender=1, slot=2), sealed(peer=1, sender=1, slot=1),
        keepalive(), sealed(counter=5, counter_arg=9), sealed(counter=7, counter_arg=8),
        sealed(counter=7, counter_arg=7), sealed(counter=6, counter_arg=0), TAKE]),
    # Hostile datagrams (reject_after_messages 20): a flipped bit, cut
    # short, a reserved byte, the type byte made a control type, another
    # key, an unknown index, bytes behind the tag, a made-up header, a
    # replay, sources not the peer's, lying lengths (one trimmed as
    # padding), over the MTU, counters at the hard limit, control
    # datagrams (one past the slot), empty, short.
    "session_hostile": peer_plan(setup("session", S_PEERS, p_reject=20), [
        sealed(mutation=10, at=30, arg=1), keepalive(mutation=11, at=0), sealed(mutation=11, at=10),
        sealed(mutation=12, at=1, arg=1), sealed(mutation=12, at=0, arg=1), sealed(mutation=13),
        sealed(mutation=14, at=4), sealed(mutation=15, arg=3),
        other("forged_header", index=1, counter=0, body=bytes(40)), sealed(), other("replay", back=0),
        sealed(src=3), sealed(src=5), sealed(lie=4, lie_arg=4), sealed(lie=4, lie_arg=0),
        sealed(size=1402), sealed(counter=9, counter_arg=1), sealed(counter=9, counter_arg=2),
        other("first_byte", byte=1, length=148), other("first_byte", byte=1, length=2049),
        other("empty"), other("junk", data=b"\x04\x00\x00"), TAKE]),
    # AF_INET6 socket, offloads: a GRO message of 8 datagrams from a new
    # address (p0 roams on the first); a link-local peer with a scope; an
    # IPv4 sender (::ffff:) to a non-roaming and a roaming peer; a control
    # queue of one slot overflowing; a GRO message cut at another size.
    "session_roaming_gro": peer_plan(setup("session", [
        peer(4, ["10.9.1.0/24", "fd09:0:1::/48"], sessions=[(1, True)]),
        peer(5, ["::/0", "0.0.0.0/0"], roaming=0, sessions=[(0xFFFFFFFF, True)])],
        p_family=6, p_offload=1, p_control_slots=1), [
        gro("session", [sealed(sender=11, size=100)] * 8), sealed(peer=1, sender=10),
        sealed(peer=1, sender=3, version=6), sealed(sender=3), other("first_byte", byte=1, length=100),
        other("first_byte", byte=2, length=100), other("first_byte", byte=3, length=100), TAKE,
        gro("session", [sealed(sender=0, size=100)] * 4, segment=50)]),
    # Rekeying: seven sessions installed as next and each confirmed by a
    # datagram, take() not called in between; the previous one; a dead
    # one; an index in use refused, a send key installed before refused;
    # clear_sessions; a keepalive confirming a next.
    "session_rekey": peer_plan(setup("session", [
        peer(0, ["10.9.1.0/24"], sessions=[(1, True)]), peer(1, ["10.9.2.0/24"])]), [
        *[step for index in (2, 3, 4, 5, 6, 7, 8) for step in (install(0, index, False), sealed(slot=2))],
        sealed(slot=1), sealed(slot=4), TAKE, install(1, 7, True), install(1, 0x80000000, True),
        install(1, 5, True, reuse_key=True),
        sealed(peer=1, sender=1, host=2), dict(p_op=14, p_clear_peer=0), sealed(),
        install(0, 0, False), keepalive(slot=2), TAKE]),
    # Raw framing, control types 1-3: from a peer's endpoint; another
    # peer's longer prefix; a roaming peer found by its source from a new
    # address (it moves), then from there; nobody's sender; an invalid
    # packet from nobody's address (no move); control and other first
    # bytes; empty; IPv6; roaming switched on; an endpoint changed.
    "raw_peers": peer_plan(setup("raw", [
        peer(0, ["10.9.0.0/16", "fd09::/32"], roaming=0), peer(None, ["10.9.1.0/24", "fd09:0:1::/48"]),
        peer(1, ["10.9.1.128/25"])], p_control=1), [
        packet(), packet(host=P1_IN_P0), packet(peer=1, sender=7), packet(peer=1, sender=1),
        packet(peer=2, sender=1, host=0x81), packet(sender=8), packet(peer=1, sender=8, lie=4, lie_arg=4),
        other("first_byte", byte=1, length=30), other("first_byte", byte=9, length=30), other("empty"),
        packet(version=6), TAKE, dict(p_op=15, p_update=0, p_update_peer=0), packet(sender=8),
        dict(p_op=15, p_update=1, p_update_peer=2, p_update_endpoint=3), TAKE]),
    # Raw framing on an AF_INET6 socket with offloads: GRO messages of
    # IPv4 packets from an IPv4 endpoint (::ffff: on this socket), IPv6
    # from a link-local one with its scope, and from a new address (the
    # roaming peer moves on the first).
    "raw_v6_gro": peer_plan(setup("raw", [
        peer(0, ["10.9.1.0/24"], roaming=0), peer(5, ["fd09::/32"])], p_family=6, p_offload=1), [
        gro("raw", [packet(size=100)] * 8), gro("raw", [packet(peer=1, sender=1, version=6, size=120)] * 8),
        gro("raw", [packet(peer=1, sender=11, version=6, size=120)] * 5), TAKE]),
}


def build(harness: str, plan: dict) -> tuple[bytes, list]:
    """The seed's bytes, and the (label, value) pulls that made them."""
    src = fc.SeedSource(plan)
    if harness == "fuzz_peers":
        fc.decode_peers(src)
    elif harness == "fuzz_ingress":
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
