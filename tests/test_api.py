"""The surface an embedder programs against: outcome reasons, constants
defined once, errors to catch, and what both pumps promise alike.

Both pumps run every test here that constructs one (the ``pump_class``
fixture), over socketpairs: no root, no network.
"""

from __future__ import annotations

import inspect
import json
import re

import pytest
from pumprig import WAIT, Rig

import tunrelay
from conftest import load_fastpath, load_pump_class
from tunrelay import aead, framing
from tunrelay._runner import Outcome, Reason
from tunrelay.daemon import config
from tunrelay.errors import PumpArgumentError, PumpStateError, TunrelayError
from tunrelay.pumps import PumpLike
from tunrelay.pypump import PyPump


@pytest.fixture
def rig(pump_class):
    rig = Rig(pump_class, mtu=1400)
    yield rig
    rig.close()


# ---------------------------------------------------------------- outcome reasons

def test_reasons_are_an_enum_that_still_reads_as_the_strings():
    assert [r.value for r in Reason] == ["stopped", "closed", "protocol_error", "fatal",
                                         "replaced"]
    assert tunrelay.Reason is Reason
    for reason in Reason:
        # Comparisons, str(), f-strings and JSON are what they were when the
        # reasons were plain strings: logs, `tunrelay stats --json` and
        # embedders' `== "closed"` keep working.
        assert reason == reason.value and isinstance(reason, str)
        assert str(reason) == f"{reason}" == reason.value
        assert json.dumps(reason) == json.dumps(reason.value)


def test_an_outcome_holds_the_enum_member_even_when_given_a_string():
    outcome = Outcome("protocol_error", "ingress")
    assert outcome.reason is Reason.PROTOCOL_ERROR
    assert outcome.restartable and not Outcome(Reason.FATAL).restartable
    assert str(outcome) == "ingress protocol error"
    with pytest.raises(ValueError, match="'tired' is not a valid Reason"):
        Outcome("tired")


def test_a_stopped_pump_reports_the_enum_member(rig):
    _, tun = rig.tun()
    pump = rig.pump(tun, rig.udp(timeout=None))
    pump.start()
    outcome = pump.stop(WAIT)
    assert outcome is not None and outcome.reason is Reason.STOPPED


# ---------------------------------------------------------------- constants, defined once

def test_the_configuration_uses_the_pumps_constants():
    # One definition each (framing or aead); config only imports them.
    assert config.FRAMINGS is framing.FRAMINGS
    assert config.DEVICE_MODES is framing.MODES
    assert config.CIPHERS is aead.CIPHERS
    assert (config.MIN_MTU, config.MAX_MTU, config.MAX_BATCH) == (
        framing.MIN_MTU, framing.MAX_MTU, framing.MAX_BATCH)
    assert config.DeviceConfig().mtu == framing.DEFAULT_MTU
    assert config.AEAD_DEFAULT_MTU == aead.DEFAULT_MTU == framing.DEFAULT_MTU - aead.OVERHEAD


def test_the_compiled_limits_are_the_python_constants(pump_class, rig):
    # The compiled pump checks batch against its C enum MAX_BATCH and the
    # MTU against literals: both pumps must draw the line where
    # tunrelay.framing says.
    _, tun = rig.tun()
    sock = rig.udp(timeout=None)
    for options in ({"batch": framing.MAX_BATCH}, {"mtu": framing.MIN_MTU},
                    {"mtu": framing.MAX_MTU}):
        assert rig.pump(tun, sock, **options)
    for options, limit in (({"batch": framing.MAX_BATCH + 1}, f"1..{framing.MAX_BATCH}"),
                           ({"mtu": framing.MIN_MTU - 1}, f"{framing.MIN_MTU}..{framing.MAX_MTU}"),
                           ({"mtu": framing.MAX_MTU + 1}, f"{framing.MIN_MTU}..{framing.MAX_MTU}")):
        with pytest.raises(ValueError, match=re.escape(limit)):
            pump_class(tun, sock, **options)
    assert pump_class(tun, sock).mtu == framing.DEFAULT_MTU


def test_the_compiled_keyring_takes_exactly_the_python_ciphers():
    Keyring = load_fastpath().Keyring
    key = bytes(aead.KEY_LEN)
    assert [Keyring(key, cipher).cipher for cipher in aead.CIPHERS] == list(aead.CIPHERS)
    assert Keyring(key).cipher == aead.CIPHERS[0]
    with pytest.raises(ValueError, match="cipher must be one of"):
        Keyring(key, "aes-128-gcm")
    # The C side's AEAD_OVERHEAD is the Python one (a hello is all overhead).
    assert len(Keyring(key).hello()) == aead.OVERHEAD


# ---------------------------------------------------------------- errors an embedder can catch

BOTH_PUMPS = ["python", "c"]


def test_pump_errors_are_tunrelay_errors_and_the_builtins_they_were():
    assert issubclass(PumpArgumentError, TunrelayError) and issubclass(PumpArgumentError, ValueError)
    assert issubclass(PumpStateError, TunrelayError) and issubclass(PumpStateError, RuntimeError)
    assert tunrelay.PumpArgumentError is PumpArgumentError
    assert tunrelay.PumpStateError is PumpStateError


def _bad_arguments(rig):
    """(what, make) pairs: each make() must raise PumpArgumentError."""
    _, tun = rig.tun()
    udp = rig.udp(timeout=None)
    _, tcp = rig.tcp()
    pump = rig.pump_class
    return [
        ("mode", lambda: pump(tun, udp, mode="tuna")),
        ("mtu", lambda: pump(tun, udp, mtu=framing.MIN_MTU - 1)),
        ("batch", lambda: pump(tun, udp, batch=0)),
        ("framing", lambda: pump(tun, udp, framing="chacha")),
        ("peer port", lambda: pump(tun, udp, peer=("127.0.0.1", 0))),
        ("raw on a stream", lambda: pump(tun, tcp, framing="raw")),
        ("peer on a stream", lambda: pump(tun, tcp, peer=("127.0.0.1", 9))),
    ]


def _raised(make) -> Exception | None:
    try:
        make()
    except Exception as error:
        return error
    return None


@pytest.mark.parametrize("kind", BOTH_PUMPS)
def test_bad_pump_arguments_raise_pump_argument_error(kind):
    rig = Rig(load_pump_class(kind))
    try:
        for what, make in _bad_arguments(rig):
            error = _raised(make)
            assert isinstance(error, PumpArgumentError), f"{what}: {error!r}"
    finally:
        rig.close()


def test_bad_pump_arguments_are_value_errors_today(rig):
    # What holds for both pumps before and after the .pyx change.
    for what, make in _bad_arguments(rig):
        error = _raised(make)
        assert isinstance(error, ValueError), f"{what}: {error!r}"


@pytest.mark.parametrize("kind", BOTH_PUMPS)
def test_attach_to_a_running_pump_raises_pump_state_error(kind):
    rig = Rig(load_pump_class(kind))
    try:
        _, tun = rig.tun()
        pump = rig.pump(tun, rig.udp(timeout=None))
        pump.start()
        with pytest.raises(PumpStateError, match="needs a stopped pump"):
            pump.attach(rig.udp(timeout=None))
    finally:
        rig.close()


def test_starting_a_running_pump_raises_pump_state_error(rig):
    _, tun = rig.tun()
    pump = rig.pump(tun, rig.udp(timeout=None))
    pump.start()
    with pytest.raises(PumpStateError, match="already running"):
        pump.start()
    assert pump.stop(WAIT).reason is Reason.STOPPED


# ---------------------------------------------------------------- one protocol, two pumps

def _shape(signature: inspect.Signature) -> list[tuple]:
    """A signature without its annotations (the compiled pump has none)."""
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def _protocol_members() -> tuple[list[str], list[str]]:
    """(methods, properties) that PumpLike itself declares."""
    methods, properties = [], []
    for name, value in vars(PumpLike).items():
        if isinstance(value, property):
            properties.append(name)
        elif callable(value) and getattr(value, "__qualname__", "").startswith("PumpLike."):
            methods.append(name)
    return methods, properties


def test_the_protocol_names_the_whole_shared_surface():
    methods, properties = _protocol_members()
    assert set(methods) == {"start", "request_stop", "stop", "wait", "run", "stats",
                            "attach", "__enter__", "__exit__"}
    assert set(properties) == {"framing", "mode", "mtu", "batch", "running", "peer",
                               "learns_peer", "io"}
    assert tunrelay.PumpLike is PumpLike


def test_both_pumps_are_pump_like(rig):
    _, tun = rig.tun()
    pump = rig.pump(tun, rig.udp(timeout=None))
    assert isinstance(pump, PumpLike)
    methods, properties = _protocol_members()
    for name in properties:
        assert not callable(getattr(pump, name)), name


@pytest.mark.parametrize("name", _protocol_members()[0])
def test_both_pumps_share_each_method_signature(name):
    compiled = load_fastpath().Pump
    shapes = {owner.__name__: _shape(inspect.signature(getattr(owner, name)))
              for owner in (PumpLike, compiled, PyPump)}
    assert shapes["Pump"] == shapes["PyPump"] == shapes["PumpLike"], shapes


def test_both_pumps_have_one_constructor(rig):
    # The compiled Pump's constructor is __cinit__, which Cython does not
    # expose to inspect (tests/test_stubs.py reads it from the .pyx): here
    # it must accept every keyword of PyPump's, with PyPump's defaults.
    compiled = load_fastpath().Pump
    _, tun = rig.tun()
    sock = rig.udp(timeout=None)
    parameters = inspect.signature(PyPump).parameters
    keywords = {name: p.default for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert [name for name, p in parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == [
        "tun_fd", "sock_fd"]
    pump = compiled(tun, sock, **keywords)
    assert (pump.framing, pump.mode, pump.mtu, pump.batch) == (
        "raw", keywords["mode"], keywords["mtu"], keywords["batch"])
    with pytest.raises(TypeError):
        compiled(tun, sock, **keywords, surplus=1)


def test_a_key_without_aead_is_refused_alike(rig):
    _, tun = rig.tun()
    sock = rig.udp(timeout=None)
    for pump_class in (load_fastpath().Pump, PyPump):
        with pytest.raises(ValueError, match="key is for framing 'aead'"):
            pump_class(tun, sock, key=bytes(aead.KEY_LEN))
