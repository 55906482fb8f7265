"""The surface an embedder programs against: outcome reasons, and (below)
what both pumps promise alike.

Both pumps run every test here that constructs one (the ``pump_class``
fixture), over socketpairs: no root, no network.
"""

from __future__ import annotations

import json

import pytest
from pumprig import WAIT, Rig

import tunrelay
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
