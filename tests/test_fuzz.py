"""Hostile input, fuzzed: the ingress checks and the len16 parser of the
compiled pump against the Python references (issue 4, section 2), and
the ingress of a pump with a PeerTable against a model (issue 8).

* A short run of each atheris harness in tests/fuzz/ (a subprocess, a
  fixed number of inputs, starting from a copy of the seed corpus): exit
  code 0 means no crash and no invariant violated.  Skipped where atheris
  is not installed; under CI=true, where the test extra installs it
  (x86-64 Linux, CPython <= 3.14), its absence is a failure.
* hypothesis properties driving Pump._feed / Pump._feed_stream directly,
  differential against framing.validate / framing.Len16Parser: two plain
  ones, and the harnesses' own decoders and checks with hypothesis as the
  source of choices (tests/fuzz/fuzz_common.py).
* The seed corpus is what tests/fuzz/make_corpus.py writes, and decodes
  as planned.
* The harness' aead model (wire version 2) on a scripted peer, each
  verdict the design gives written out, over UDP and TCP: the model is
  pinned to the design, not only to the pump.
* The same for the PeerTable ingress (fuzz_peers.py): its model on
  scripted datagrams, each verdict written out; and the minimal
  reproductions of the bugs it found (fuzz_common.PEER_BUGS), which fail
  while a bug is there.

A long campaign: tests/fuzz/README.md.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ethernet_frame, ipv4_packet, ipv6_packet, load_fastpath
from tunrelay import counters
from tunrelay.framing import Len16Parser, len16_encode, max_frame, validate

FUZZ = Path(__file__).resolve().parent / "fuzz"
ROOT = FUZZ.parents[1]
sys.path.insert(0, str(FUZZ))

import fuzz_common as fc  # noqa: E402
import make_corpus  # noqa: E402

#: Inputs per short run: about 10-20 s each on a 2-core machine.
RUNS = {"fuzz_ingress": 6000, "fuzz_len16": 4000, "fuzz_peers": 3000, "fuzz_wg_handshake": 3000}
MAX_LEN = 4096
#: A fixed libFuzzer seed keeps CI repeatable; TUNRELAY_FUZZ_SEED varies it.
SEED = os.environ.get("TUNRELAY_FUZZ_SEED", "20240604")
#: Where the test extra installs atheris (pyproject.toml's marker).
ATHERIS_WHEELS = (sys.platform == "linux" and platform.machine() == "x86_64"
                  and sys.version_info < (3, 15))


def require_atheris() -> None:
    if importlib.util.find_spec("atheris") is not None:
        return
    if os.environ.get("CI") == "true" and ATHERIS_WHEELS:
        pytest.fail("atheris is not installed, but CI runs the fuzz harnesses: "
                    "pip install -e '.[test]'", pytrace=False)
    pytest.skip("atheris is not installed (wheels: x86-64 Linux, CPython 3.11-3.14): "
                "pip install atheris")


# ---------------------------------------------------------------- short fuzz runs

@pytest.mark.parametrize("harness", sorted(RUNS))
def test_fuzz_harness_short_run(harness, tmp_path):
    require_atheris()
    load_fastpath()
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / harness, corpus)   # libFuzzer adds to it
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    command = [sys.executable, str(FUZZ / f"{harness}.py"), f"-runs={RUNS[harness]}",
               f"-max_len={MAX_LEN}", f"-seed={SEED}", "-timeout=60", "-rss_limit_mb=2048",
               f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        found = [f"{p.name}: {p.read_bytes().hex()}" for p in sorted(artifacts.iterdir())]
        pytest.fail(f"{harness} exited {proc.returncode}\n{' '.join(command)}\n"
                    f"{proc.stderr[-6000:]}\ninputs that failed (hex): {found}\n"
                    f"replay one: {sys.executable} {FUZZ / harness}.py <file>", pytrace=False)
    assert f"Done {RUNS[harness]} runs" in proc.stderr, proc.stderr[-2000:]


# ---------------------------------------------------------------- seed corpus

@pytest.mark.parametrize("harness, name", [(h, n) for h, seeds in make_corpus.SEEDS.items()
                                           for n in seeds])
def test_seed_corpus_is_current(harness, name):
    """The files are what make_corpus.py writes; and where atheris is
    there, its FuzzedDataProvider decodes them into the planned choices."""
    data, planned = make_corpus.build(harness, make_corpus.SEEDS[harness][name])
    path = FUZZ / "corpus" / harness / name
    assert path.read_bytes() == data, f"stale seed: run {FUZZ / 'make_corpus.py'}"
    if importlib.util.find_spec("atheris") is None:
        return
    import atheris
    src = fc.RecordingSource(fc.FDPSource(atheris.FuzzedDataProvider(data)))
    if harness == "fuzz_peers":
        fc.decode_peers(src)
    elif harness == "fuzz_ingress":
        cfg = fc.decode_ingress_config(src)
        fc.decode_ingress(src, cfg, fc.AeadState(cfg.cipher) if cfg.framing == "aead" else None)
    else:
        cfg = fc.decode_stream_config(src)
        fc.decode_stream(src, cfg, fc.AeadState(cfg.cipher) if cfg.framing == "aead" else None)
    assert src.log == planned


# ---------------------------------------------------------------- hypothesis

@pytest.fixture(scope="module")
def rig():
    load_fastpath()
    rig = fc.Rig()
    yield rig
    rig.close()


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def datagrams(draw):
    """Bytes near the validation boundaries, and packets that pass (at most
    104 bytes: what Pump._feed takes at MTU 68)."""
    size = draw(st.integers(0, 104))
    builder = draw(st.sampled_from(["ip4", "ip6", "frame", "bytes"]))
    if builder == "ip4" and size >= 20:
        packet = bytearray(ipv4_packet(size))
    elif builder == "ip6" and size >= 40:
        packet = bytearray(ipv6_packet(size))
    elif builder == "frame" and size >= 14:
        packet = bytearray(ethernet_frame(size))
    else:
        packet = bytearray(draw(st.binary(min_size=size, max_size=size)))
    for _ in range(draw(st.integers(0, 2))):
        if packet:
            packet[draw(st.integers(0, len(packet) - 1))] = draw(st.integers(0, 255))
    return bytes(packet)


@FAST
@given(mode=st.sampled_from(["tun", "tap"]), mtu=st.sampled_from([68, 100, 1400]),
       data=st.data())
def test_feed_delivers_exactly_what_validate_accepts(rig, mode, mtu, data):
    """Raw UDP framing: each datagram reaches the TUN fd unchanged iff
    framing.validate accepts it; else it is counted under its reason."""
    entry = rig.entry(fc.Config("datagram", mode, mtu, "raw", False))
    limit = max_frame(mode, mtu)
    for packet in data.draw(st.lists(datagrams(), min_size=1, max_size=8)):
        before = entry.pump.stats()["ingress"]
        assert entry.pump._feed(packet) == 0
        writes = rig.standin.collect()
        after = entry.pump.stats()["ingress"]
        reason = validate(packet, mode, limit)
        assert writes == ([] if reason else [packet])
        moved = {k: after["drops"][k] - before["drops"][k] for k in after["drops"]}
        assert {k: v for k, v in moved.items() if v} == ({reason: 1} if reason else {})
        assert after["packets"] - before["packets"] == (0 if reason else 1)


@FAST
@given(mode=st.sampled_from(["tun", "tap"]), data=st.data(),
       frames=st.lists(st.one_of(st.binary(min_size=1, max_size=90),
                                 st.integers(20, 90).map(ipv4_packet),
                                 st.integers(40, 90).map(ipv6_packet)), max_size=12),
       bad=st.sampled_from([None, 0, 69, 0xFFFF]))
def test_feed_stream_agrees_with_len16parser(rig, mode, data, frames, bad):
    """A len16 stream cut anywhere: _feed_stream delivers the frames that
    Len16Parser cuts and validate accepts, in order, and says "bad_length"
    on the very chunk where the parser meets a bad length."""
    mtu = 68
    entry = rig.entry(fc.Config("stream", mode, mtu, "len16", False))
    limit = max_frame(mode, mtu)
    stream = b"".join(len16_encode(f) for f in frames)
    if bad is not None:
        at = data.draw(st.integers(0, len(frames)))
        stream = b"".join(len16_encode(f) for f in frames[:at]) + bad.to_bytes(2, "big") + stream
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    entry.pump.attach(rig.tcp)
    parser = Len16Parser(limit)
    for chunk in chunks:
        got, went_bad = parser.feed(chunk)
        status = entry.pump._feed_stream(chunk)
        assert rig.standin.collect() == [f for f in got if validate(f, mode, limit) is None]
        assert status == ("bad_length" if went_bad else "ok")
        if went_bad:
            break


@FAST
@given(data=st.data())
def test_ingress_harness_properties(rig, data):
    """fuzz_ingress.py's decoders and checks, hypothesis choosing: every
    configuration (framings, aead, offloads, GRO), every invariant."""
    fc.run_ingress(rig, fc.HypSource(data.draw))


@FAST
@given(data=st.data())
def test_len16_harness_properties(rig, data):
    """fuzz_len16.py's decoders and checks, hypothesis choosing."""
    fc.run_stream(rig, fc.HypSource(data.draw))


@pytest.mark.parametrize("kind", ["datagram", "stream"])
def test_aead_model_follows_the_design(kind):
    """The aead model (and the pump, checked against it at every step) on
    a scripted peer, with the verdict the wire version 2 design gives each
    datagram (UDP) or record (TCP) written out: the order of the header
    checks, reflection, the window before the tag, every unknown session
    tried, stale starts, LRU retirement and the 16 remembered, a restart
    evicting the older sessions."""
    load_fastpath()
    rig = fc.Rig()
    try:
        cfg = fc.Config(kind, "tun", 1400, "aead", False, "chacha20-poly1305")
        entry = rig.entry(cfg)          # the harness' session 0, counter 0: accepted
        aead = entry.aead
        packet = fc.ip_packet(4, 60)
        parser = fc.Len16Parser(cfg.record_limit)
        if kind == "stream":
            entry.pump.attach(rig.tcp)

        def verdict(datagram):
            if kind == "datagram":
                ex = fc.feed_datagram(rig, entry, datagram, 0)
            else:
                ex = fc.feed_stream_chunk(rig, entry, parser, len16_encode(datagram))[0]
            assert ex.fed == 1
            return "ok" if ex.accepted == [packet] else "".join(ex.drops)

        def changed(datagram, at, value):
            out = bytearray(datagram)
            out[at] = value
            return bytes(out)

        start = aead.start
        s = [aead.session(start, i) for i in range(32)]
        first = aead.seal(s[0], 1, packet)
        assert verdict(first) == "ok"
        assert verdict(first) == "replay"
        assert verdict(changed(first, 40, first[40] ^ 1)) == "replay"   # the window before the tag
        second = aead.seal(s[0], 2, packet)
        assert verdict(changed(second, 40, second[40] ^ 1)) == "bad_tag"
        assert verdict(aead.seal(s[0], 3, packet, role="b")) == "reflected"
        assert verdict(changed(second, 1, 1)) == "reflected"
        assert verdict(changed(second, 1, 2)) == "bad_frame"
        assert verdict(changed(second, 0, 3)) == "bad_frame"              # a hello's type
        assert verdict(changed(second, 0, 1)) == "aead_version"
        assert verdict(changed(changed(second, 0, 1), 1, 7)) == "aead_version"   # before the rest
        assert verdict(changed(second, 3, 1)) == "bad_frame"
        assert verdict(second[:39]) == "too_short"
        assert verdict(changed(second[:39], 0, 1)) == "too_short"          # length first
        assert verdict(aead.seal(s[0], 4, packet, key_role="b")) == "bad_tag"   # forged
        assert verdict(second) == "ok"
        assert verdict(fc.aead_header(s[31], 0) + bytes(80)) == "bad_tag"    # unknown: tried
        assert verdict(aead.seal(aead.session(start - 1, 0), 0, packet)) == "stale_session"
        assert verdict(aead.seal(aead.session(start + 1, 0), 0, packet, key_role="b")) == "bad_tag"
        # The window: 8192 counters behind the newest.
        assert verdict(aead.seal(s[0], 10_000, packet)) == "ok"
        assert verdict(aead.seal(s[0], 10_000 - 8192, packet)) == "replay"
        assert verdict(aead.seal(s[0], 10_000 - 8191, packet)) == "ok"
        # Eight slots: a ninth session pushes out the least recently used
        # (s[1]), which is refused from then on, authentic or not.
        for i in range(1, 8):
            assert verdict(aead.seal(s[i], 0, packet)) == "ok"
        assert verdict(aead.seal(s[0], 10_001, packet)) == "ok"
        assert verdict(aead.seal(s[8], 0, packet)) == "ok"
        assert verdict(aead.seal(s[1], 1, packet)) == "stale_session"
        assert verdict(aead.seal(s[1], 2, packet, key_role="b")) == "bad_tag"
        assert entry.pump.keyring.counts()["live"] == 8
        # A restart (a newer start) evicts every older session...
        newer = [aead.session(start + 1, i) for i in range(32)]
        assert verdict(aead.seal(newer[0], 0, packet)) == "ok"
        assert entry.pump.keyring.counts()["live"] == 1
        assert verdict(aead.seal(s[0], 10_002, packet)) == "stale_session"
        assert verdict(first) == "stale_session"
        # ... and the last 16 sessions pushed out are remembered, not more
        # (a tunrelay peer has at most 5 per start: 4 queues and its
        # hellos): newer[0] was pushed out first, then 16 others, so it is
        # admitted again, with a new window.
        for i in range(1, 8 + 17):
            assert verdict(aead.seal(newer[i], 0, packet)) == "ok"
        assert verdict(aead.seal(newer[1], 1, packet)) == "stale_session"
        assert verdict(aead.seal(newer[16], 1, packet)) == "stale_session"
        assert verdict(aead.seal(newer[0], 0, packet)) == "ok"
        # (Pump._feed gives an aead pump no sender: nothing roams.)
        assert entry.pump.keyring.counts() == {"sessions": 9 + 1 + 24 + 1,
                                               "evicted": 1 + 8 + 17 + 1, "live": 8, "roams": 0}
    finally:
        rig.close()


def test_checks_catch_a_wrong_write():
    """The checker is not vacuous: a changed, missing or extra packet, a
    coalesced run with a bad checksum or a lying counter is a violation."""
    run = [fc.tcp_packet(4, bytes([i]) * 100, seq=1000 + 100 * i) for i in range(3)]
    head = bytearray(run[0][:52])
    head[2:4] = (52 + 300).to_bytes(2, "big")
    head[10:12] = b"\0\0"
    head[10:12] = (~fc.ones_sum(head[:20]) & 0xFFFF).to_bytes(2, "big")
    src, dst = fc.addrs_of(head)
    head[36:38] = fc.pseudo_sum(src, dst, fc.TCP, 332).to_bytes(2, "big")
    vnet = fc.VNET.pack(fc.NEEDS_CSUM, fc.GSO_TCPV4, 52, 100, 20, 16)
    super_packet = vnet + bytes(head) + b"".join(p[52:] for p in run)
    fc.check_offload_writes([super_packet], run)                 # the right answer passes
    forged = run[:1] + [fc.tcp_packet(4, bytes([1]) * 100, seq=1100, csum_ok=False)] + run[2:]
    wrong = [([super_packet], forged), ([super_packet], run[:2]), ([super_packet[:-1]], run),
             ([fc.VNET.pack(0, 0, 0, 0, 0, 0) + run[0]], run[:2])]
    for writes, accepted in wrong:
        with pytest.raises(fc.Violation):
            fc.check_offload_writes(writes, accepted)
    with pytest.raises(fc.Violation):
        fc.check_plain_writes([run[0], run[1]], [run[0]])
    before = fc.flat_counters({d: counters.empty_direction(d) for d in counters.DIRECTIONS})
    truncated = fc.Expect(fed=1, drops=Counter(truncated=1))
    fc.check_counters(before, {**before, ("ingress", "drops", "truncated"): 1}, truncated, [])
    with pytest.raises(fc.Violation):
        fc.check_counters(before, {**before, ("ingress", "drops", "bad_version"): 1}, truncated, [])


# ---------------------------------------------------------------- PeerTable ingress (fuzz_peers.py)

@pytest.fixture(scope="module")
def peer_rig():
    load_fastpath()
    rig = fc.PeerRig()
    yield rig
    rig.close()


@FAST
@given(data=st.data())
def test_peers_harness_properties(peer_rig, data):
    """fuzz_peers.py's decoder, model and checks, hypothesis choosing:
    a table, sessions, datagrams from chosen senders, every invariant."""
    fc.run_peers(peer_rig, fc.HypSource(data.draw, max_bytes=128))


@pytest.mark.parametrize("bug", sorted(fc.PEER_BUGS))
def test_peer_ingress_bug_is_fixed(peer_rig, bug):
    """A minimal reproduction of a bug fuzz_peers.py found (the probe's
    docstring says what and where).  While one fails, the harness steers
    around it (PeerRig.bugs) and goes on looking for others."""
    expected, got = fc.PEER_BUGS[bug](peer_rig)
    assert got == expected, f"{bug}: {fc.PEER_BUGS[bug].__doc__}"


def _peer_case(framing, peers, installs=(), **options):
    """A PeerCase written out: peers as (ENDPOINT_POOL index or None,
    networks, roaming), installs as (peer, local index, initiator)."""
    return fc.PeerCase(framing=framing, family=options.get("family", 4), mtu=1400, offload=False,
                       control_types=None, control_slots=4,
                       reject_messages=options.get("reject"), reject_time=None,
                       peers=[fc.PeerPlan(e, tuple(n), r) for e, n, r in peers],
                       installs=[fc.InstallPlan(*i) for i in installs], steps=[])


def test_peer_model_follows_the_design(peer_rig):
    """The PeerTable model (and the pump, checked against it at each
    datagram) on scripted datagrams, with the verdict the design gives
    each written out: the session checks in order, the replay window's
    edge, the hard limit, the inner source's longest prefix, padding
    trimmed, keepalives, promotion, roaming on authentic datagrams only,
    the control channel; raw: the sender, a roaming peer found by its
    source, junk counted as what it is."""
    a_net, b_net = ("10.9.0.0/16", "fd09::/32"), ("10.9.1.0/24",)
    run = fc.PeerRun(peer_rig, _peer_case("session", [(0, a_net, True), (1, b_net, False)],
                                          [(0, 1, True), (1, 2, True), (1, 3, False)], reject=20_000))
    model = run.model
    a, b = model.peers
    home, elsewhere, forger = ("10.0.0.2", 51820), ("192.0.2.7", 4500), ("192.0.2.8", 4500)
    packet = fc._v4("10.9.0.1", 60)

    def verdict(datagram, sender=home):
        outcome, = run.feed_message(datagram, 0, sender, fc.sender_address(sender, 4))
        return outcome.reason or outcome.kind

    def seal(key_serial, index, counter, plain=packet):
        return fc.session_seal(fc.session_key(key_serial), index, counter, plain)

    first = seal(0, 1, 0)
    assert verdict(first) == "deliver"
    assert verdict(first) == "replay"
    flipped = bytearray(seal(0, 1, 1))
    flipped[-1] ^= 1
    assert verdict(bytes(flipped)) == "bad_tag"
    assert verdict(seal(0, 1, 1)) == "deliver"            # a bad tag did not use the counter up
    assert verdict(seal(0, 1, 10_000)) == "deliver"
    assert verdict(seal(0, 1, 10_000 - 8192)) == "replay"   # window_fresh: top - c >= 8192
    assert verdict(seal(0, 1, 10_000 - 8191)) == "deliver"
    assert verdict(seal(0, 1, 10_000 - 8191)) == "replay"
    assert verdict(seal(0, 1, 10_001, fc._v4("10.9.1.5"))) == "not_allowed"   # b's longer prefix
    assert verdict(seal(0, 1, 10_002, fc._v4("192.0.2.1"))) == "not_allowed"  # nobody's
    padded = fc._v4("10.9.0.1", 61)
    outcome, = run.feed_message(seal(0, 1, 10_003, padded + bytes(3)), 0, home, fc.sender_address(home, 4))
    assert outcome.packet == padded                        # padding trimmed
    lying = bytearray(fc._v4("10.9.0.1", 61))
    lying[3] += 1
    assert verdict(seal(0, 1, 10_004, bytes(lying))) == "bad_length"
    assert verdict(seal(0, 1, 10_005, b"\x45" + bytes(9))) == "truncated"
    assert verdict(seal(0, 1, 10_006, b"")) == "keepalive"
    assert verdict(seal(0, 9, 0)) == "no_session"
    assert verdict(b"\x04\x01" + first[2:]) == "bad_frame"
    assert verdict(first[:31]) == "too_short"
    assert verdict(b"") == "too_short"
    assert verdict(b"\x01hello") == "control"                # every type but 4, by default
    assert verdict(b"\x01" + bytes(2048)) == "oversize"       # longer than a control slot
    # b's next session: its first authentic datagram promotes it; the
    # previous one still works.
    assert verdict(seal(2, 3, 0, fc._v4("10.9.1.1")), ("10.0.0.3", 51820)) == "deliver"
    assert (b.current.local_index, b.previous.local_index, b.next) == (3, 2, None)
    assert verdict(seal(1, 2, 0, fc._v4("10.9.1.1")), ("10.0.0.3", 51820)) == "deliver"
    # Roaming: only an authentic datagram moves a roaming peer.
    assert verdict(seal(1, 1, 10_007), forger) == "bad_tag"     # another key
    assert verdict(seal(0, 1, 10_010), elsewhere) == "deliver"
    assert fc.address_tuple(a.endpoint) == elsewhere and a.roams == 1
    assert verdict(seal(1, 2, 1, fc._v4("10.9.1.1")), forger) == "deliver"   # b does not roam
    assert fc.address_tuple(b.endpoint) == ("10.0.0.3", 51820)
    assert verdict(seal(0, 1, 20_000), elsewhere) == "session_expired"   # reject_after_messages
    assert verdict(seal(0, 1, 19_999), elsewhere) == "deliver"
    events = [tuple(e) for e in run.table.take()]
    assert events == model.take() == [("control", None, home, b"\x01hello", None),
                                      ("endpoint", a.id, elsewhere, None, None),
                                      ("promoted", b.id, None, None, 3)]
    fc.check_table(run.table, model)

    run = fc.PeerRun(peer_rig, _peer_case("raw", [(0, a_net, False), (None, b_net, True)]))
    a, b = run.model.peers
    assert verdict(packet) == "deliver"
    assert verdict(fc._v4("10.9.1.1")) == "not_allowed"              # b's source from a
    assert verdict(b"\x09" + bytes(40)) == "bad_version"            # junk counts as what it is
    assert verdict(b"") == "empty"
    assert verdict(b"\x01hello") == "bad_version"                   # raw: no control types by default
    assert verdict(fc._v4("10.9.1.1"), elsewhere) == "deliver"       # b found by its source: moves
    assert fc.address_tuple(b.endpoint) == elsewhere
    assert verdict(fc._v4("10.9.0.1"), elsewhere) == "not_allowed"   # a's source from b
    assert verdict(packet, forger) == "not_peer"                     # a does not roam
    assert verdict(bytes(lying), forger) == "not_peer"               # ... before anything else
    lying_b = bytearray(fc._v4("10.9.1.1", 61))
    lying_b[3] += 1
    assert verdict(bytes(lying_b), forger) == "bad_length"           # b's: checked, b does not move
    assert fc.address_tuple(b.endpoint) == elsewhere
    assert b.packets == 1 and b.drops == 1 and a.packets == 1 and a.drops == 3
    fc.check_table(run.table, run.model)
