"""WireGuard's protocol constants, in one injectable place, and the
per-peer timer decisions made on the device's tick.

Every constant lives in ``Timers`` (a frozen dataclass) so a test can run
the real state machine with shortened times::

    fast = dataclasses.replace(Timers(), rekey_after_time=2.0, reject_after_time=4.0, ...)

The data path (tunrelay's compiled "session" framing) enforces the message
and age limits per packet (PeerTable's rekey/reject limits, the "renew"
event); everything else that is a timer in WireGuard is decided here, once
per ``tick``, from the times the table records (``PeerTable.activity()``)
and the handshake state the device keeps: no asyncio timer per packet or
per peer.  ``due()`` is a pure function of those times, so it is tested
without sockets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

__all__ = ["Timers", "Action", "PeerClock", "due", "last_received", "new_handshake_due",
           "unanswered_since"]


@dataclass(frozen=True)
class Timers:
    """The protocol's constants (seconds unless named otherwise), as the
    WireGuard paper and wireguard-go set them."""

    #: The initiator of a session starts a new handshake after this many
    #: messages (either side, on send).
    rekey_after_messages: int = 2 ** 60
    #: A session neither sends nor accepts past this many messages.
    reject_after_messages: int = 2 ** 64 - 2 ** 13 - 1
    #: The session's initiator re-handshakes when sending under an older one.
    rekey_after_time: float = 120.0
    #: A session older than this is refused both ways.
    reject_after_time: float = 180.0
    #: Retries of an unanswered initiation stop after this long.
    rekey_attempt_time: float = 90.0
    #: An unanswered initiation is sent again after this (plus jitter).
    rekey_timeout: float = 5.0
    #: Up to this much random delay is added to each retransmission.
    rekey_timeout_jitter: float = 1 / 3
    #: Data received and nothing sent for this long: send a keepalive.
    keepalive_timeout: float = 10.0
    #: A responder's cookie secret lives this long; a held cookie expires.
    cookie_refresh_time: float = 120.0
    #: At most one initiation per peer is consumed in this interval (50/s).
    initiation_interval: float = 0.02
    #: Under load (handshake backlog >= 1/8 of the queue) stays latched this long.
    under_load_hold: float = 1.0
    #: Per-source-IP token bucket used under load: rate and burst.
    handshakes_per_second: float = 20.0
    handshake_burst: int = 5
    #: Packets held per peer while its handshake runs (the oldest go first).
    max_staged: int = 128
    #: How often the device looks at every peer's timers.
    tick: float = 0.25

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "rekey_timeout_jitter":
                if value < 0:
                    raise ValueError(f"Timers.{f.name} must be >= 0, got {value!r}")
            elif not value > 0:
                raise ValueError(f"Timers.{f.name} must be positive, got {value!r}")
        if self.rekey_after_time >= self.reject_after_time:
            raise ValueError("Timers: rekey_after_time must be below reject_after_time "
                             f"({self.rekey_after_time} >= {self.reject_after_time})")
        if self.rekey_after_messages >= self.reject_after_messages:
            raise ValueError("Timers: rekey_after_messages must be below reject_after_messages")

    @property
    def new_handshake_after(self) -> float:
        """Data sent and nothing received for this long: the peer may have
        lost our session, so handshake again (KEEPALIVE + REKEY_TIMEOUT)."""
        return self.keepalive_timeout + self.rekey_timeout

    @property
    def rekey_on_receive_after(self) -> float:
        """The initiator of a session this old re-handshakes when it
        receives under it, before the session expires under the peer's
        traffic (REJECT - KEEPALIVE - REKEY_TIMEOUT)."""
        return max(self.reject_after_time - self.keepalive_timeout - self.rekey_timeout,
                   self.rekey_after_time)

    @property
    def zero_keys_after(self) -> float:
        """No handshake for this long: every key of the peer is forgotten."""
        return 3 * self.reject_after_time


class Action(Enum):
    """What the tick decided for one peer."""
    RETRANSMIT = "retransmit"          # the pending initiation goes again
    GIVE_UP = "give_up"                # REKEY_ATTEMPT_TIME passed: stop, drop staged
    INITIATE = "initiate"              # a new handshake (sent without reply; rekey on receive)
    KEEPALIVE = "keepalive"            # passive or persistent
    EXPIRE = "expire"                  # every session too old: clear them
    ZERO = "zero"                      # 3 x REJECT without a handshake: forget everything


@dataclass
class PeerClock:
    """The times one peer's timers are decided from (time.monotonic()
    values; None: never).  The device fills it from its own state and
    ``PeerTable.activity()`` each tick."""
    now: float
    #: The table's: any authenticated datagram / data packet received / data packet sent.
    last_seen: float | None = None
    last_data_received: float | None = None
    last_data_sent: float | None = None
    #: Ours: keepalives and handshake messages sent, handshakes completed.
    last_keepalive_sent: float | None = None
    last_handshake_sent: float | None = None
    last_handshake_completed: float | None = None
    #: The pending initiation: when its attempts began, when it goes again.
    attempt_started: float | None = None
    retransmit_at: float | None = None
    #: The current session: created when, and did we initiate it.
    current_created: float | None = None
    current_initiator: bool = False
    #: The newest of the peer's sessions (any slot), None without one.
    newest_session: float | None = None
    has_sessions: bool = False
    has_endpoint: bool = False
    persistent_keepalive: int = 0
    #: Ours: the newest handshake initiation consumed from the peer (its
    #: response shows as last_handshake_completed).
    last_initiation_received: float | None = None
    #: The new-handshake timer (data sent, nothing received) as the device
    #: tracked it up to the previous tick: when the first data packet sent
    #: since anything was last received went out (None: not running), and
    #: when the timer last fired or was stopped by giving up (data sent up
    #: to then does not start it again).  ``unanswered_since()`` moves it on.
    unanswered_since: float | None = None
    new_handshake_fired: float | None = None


def _latest(*times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    return max(known) if known else None


def last_received(clock: PeerClock) -> float | None:
    """The newest authenticated message from the peer: any datagram of its
    sessions (keepalives too), or a handshake message."""
    return _latest(clock.last_seen, clock.last_handshake_completed,
                   clock.last_initiation_received)


def unanswered_since(clock: PeerClock) -> float | None:
    """The new-handshake timer's start, moved on to ``clock``: as in
    wireguard-go, it starts at the first data packet (not a keepalive) sent
    after the last message received, further sends do not move it, and
    anything received stops it.  The table records only the newest send,
    so a start first seen on this tick is that send (at most one tick
    later than the true first one: the timer fires at most a tick late).
    The device keeps the result for the next tick."""
    start = clock.unanswered_since
    received = last_received(clock)
    if start is not None and received is not None and received >= start:
        start = None                                # answered: stopped
    sent = clock.last_data_sent
    if (start is None and sent is not None
            and (received is None or sent > received)
            and (clock.new_handshake_fired is None or sent > clock.new_handshake_fired)):
        start = sent
    return start


def new_handshake_due(clock: PeerClock, timers: Timers) -> bool:
    """Data sent and nothing received for KEEPALIVE + REKEY_TIMEOUT since
    the first unanswered send: the peer may have lost our session."""
    start = unanswered_since(clock)
    return start is not None and clock.now - start >= timers.new_handshake_after


def due(clock: PeerClock, timers: Timers) -> list[Action]:
    """The actions one peer's timers call for now, in the order to take them."""
    now = clock.now
    actions: list[Action] = []
    # Forget everything after 3 x REJECT without a handshake.
    if (clock.has_sessions and clock.last_handshake_completed is not None
            and now - clock.last_handshake_completed >= timers.zero_keys_after):
        return [Action.ZERO]
    # Every session is past REJECT_AFTER_TIME: useless, clear them so the
    # data path stages packets and asks for a handshake.
    if clock.has_sessions and clock.newest_session is not None and \
            now - clock.newest_session >= timers.reject_after_time:
        actions.append(Action.EXPIRE)
    pending = clock.attempt_started is not None
    if pending:
        assert clock.attempt_started is not None
        if now - clock.attempt_started >= timers.rekey_attempt_time:
            actions.append(Action.GIVE_UP)
            pending = False
        elif clock.retransmit_at is not None and now >= clock.retransmit_at:
            actions.append(Action.RETRANSMIT)
    sent_any = _latest(clock.last_data_sent, clock.last_keepalive_sent)
    live = clock.current_created is not None and Action.EXPIRE not in actions
    if clock.attempt_started is None and clock.has_endpoint:
        # Data sent and nothing heard since the first unanswered send, for
        # KEEPALIVE + REKEY_TIMEOUT (not while an initiation is in flight,
        # nor right after giving up on one: its retries did this job).
        if new_handshake_due(clock, timers):
            actions.append(Action.INITIATE)
        # The initiator of an old session that still receives under it.
        elif (live and clock.current_initiator and clock.current_created is not None
              and now - clock.current_created >= timers.rekey_on_receive_after
              and clock.last_data_received is not None
              and clock.last_data_received > clock.current_created):
            actions.append(Action.INITIATE)
    if live and clock.has_endpoint:
        # Passive keepalive: data came in and we have sent nothing since.
        got = clock.last_data_received
        if (got is not None and (sent_any is None or sent_any < got)
                and now - got >= timers.keepalive_timeout):
            actions.append(Action.KEEPALIVE)
        elif clock.persistent_keepalive > 0:
            traversal = _latest(clock.last_seen, sent_any, clock.last_handshake_sent,
                                clock.last_handshake_completed, clock.current_created)
            if traversal is None or now - traversal >= clock.persistent_keepalive:
                actions.append(Action.KEEPALIVE)
    elif (clock.persistent_keepalive > 0 and clock.has_endpoint and not pending
          and Action.INITIATE not in actions):
        # A persistent keepalive with no session to send it in starts a
        # handshake (as wireguard-go's keepalive does): the NAT mapping
        # stays open and the peer can reach us.
        since = _latest(clock.last_handshake_sent, clock.last_seen)
        if since is None or now - since >= clock.persistent_keepalive:
            actions.append(Action.INITIATE)
    return actions
