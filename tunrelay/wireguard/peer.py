"""One WireGuard peer's control-plane state.

The data path keeps the peer's endpoint, allowed IPs, counters and sessions
in the PeerTable (``table_id``); what lives here is what only the handshake
needs: the peer's static key and preshared key, the precomputed static DH,
the mac1/cookie signer for messages to it, the initiation in flight, the
newest TAI64N it sent us, the sessions we installed (to know which ones we
initiated), and the packets held while its handshake runs.
"""

from __future__ import annotations

import collections
import ipaddress
from dataclasses import dataclass, field

from .cookie import MacSigner
from .noise import ZERO32, HandshakeError, Identity, InitiatorState, dh

__all__ = ["Network", "SessionInfo", "WgPeer"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class SessionInfo:
    """A session we installed: when, and whether we initiated it (only the
    initiator rekeys on REKEY_AFTER_TIME)."""
    peer: WgPeer
    created: float
    initiator: bool


@dataclass
class Pending:
    """Our initiation in flight: the state to finish it with its response."""
    state: InitiatorState
    sent_at: float


@dataclass(eq=False)
class WgPeer:
    public_key: bytes
    table_id: int
    name: str | None = None
    preshared_key: bytes | None = None
    persistent_keepalive: int = 0
    allowed: list[Network] = field(default_factory=list)
    signer: MacSigner = field(init=False)
    #: DH(our static, its static): None without a private key, or for a
    #: public key that gives no shared secret (a low-order point).
    static_secret: bytes | None = None
    # --- initiator side
    pending: Pending | None = None
    current_index: int | None = None          # the table's current session (we track it)
    has_endpoint: bool = False
    attempt_started: float | None = None
    retransmit_at: float | None = None
    last_handshake_sent: float | None = None
    last_timestamp_sent: bytes | None = None
    #: The new-handshake timer (timers.unanswered_since): the first data
    #: packet sent since anything was received, and when it last fired.
    unanswered_since: float | None = None
    new_handshake_fired: float | None = None
    #: The session whose renewal the data path asked for (it asks once per
    #: session): retried on the tick until a newer session is current.
    rekey_wanted: int | None = None
    # --- responder side
    latest_timestamp: bytes | None = None
    last_initiation_consumed: float | None = None
    # --- both
    sessions: dict[int, SessionInfo] = field(default_factory=dict)
    last_handshake_completed: float | None = None     # monotonic
    last_handshake_wall: float | None = None          # time.time(), for PeerStatus
    last_keepalive_sent: float | None = None
    staged: collections.deque[bytes] = field(default_factory=collections.deque)
    handshake_bytes_sent: int = 0
    handshake_bytes_received: int = 0

    def __post_init__(self) -> None:
        self.signer = MacSigner(self.public_key)

    @property
    def psk(self) -> bytes:
        return self.preshared_key if self.preshared_key is not None else ZERO32

    def derive(self, identity: Identity | None) -> None:
        """Recompute what depends on our private key (a new key, or the first)."""
        self.static_secret = None
        if identity is None:
            return
        try:
            self.static_secret = dh(identity.private, self.public_key)
        except HandshakeError:
            self.static_secret = None

    def forget_handshake(self) -> None:
        """Drop the initiation in flight and its retry schedule."""
        self.pending = None
        self.attempt_started = None
        self.retransmit_at = None
