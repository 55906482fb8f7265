"""Hostile input, fuzzed: the ingress checks and the len16 parser of the
compiled pump against the Python references (issue 4, section 2).

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
from conftest import ethernet_frame, ipv4_packet, ipv6_packet, load_fastpath
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunrelay import counters
from tunrelay.framing import Len16Parser, len16_encode, max_frame, validate

FUZZ = Path(__file__).resolve().parent / "fuzz"
ROOT = FUZZ.parents[1]
sys.path.insert(0, str(FUZZ))

import fuzz_common as fc  # noqa: E402
import make_corpus  # noqa: E402

#: Inputs per short run: about 10-20 s each on a 2-core machine.
RUNS = {"fuzz_ingress": 6000, "fuzz_len16": 4000}
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
    if harness == "fuzz_ingress":
        cfg = fc.decode_ingress_config(src)
        fc.decode_ingress(src, cfg, fc.AeadState(cfg.cipher) if cfg.framing == "aead" else None)
    else:
        fc.decode_stream(src, fc.decode_stream_config(src))
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
