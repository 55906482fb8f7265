"""The surface an embedder programs against: outcome reasons, constants
defined once, and what both pumps promise alike.

Both pumps run every test here that constructs one (the ``pump_class``
fixture), over socketpairs: no root, no network.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest
from conftest import load_fastpath
from pumprig import WAIT, Rig

import tunrelay
from tunrelay import aead, config, framing
from tunrelay._runner import Outcome, Reason


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
