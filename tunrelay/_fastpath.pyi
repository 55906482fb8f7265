"""Type stubs of the compiled fast path, ``tunrelay/_fastpath.pyx``.

tests/test_stubs.py holds them to the extension: every public name of the
module and of its classes is here, every method has the compiled one's
parameters, and the constructors match the ``__cinit__`` of the .pyx.
"""

from collections.abc import Iterable
from contextlib import AbstractContextManager
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Literal, NamedTuple, Self

from tunrelay._runner import Outcome
from tunrelay.aead import Cipher, Role
from tunrelay.framing import Framing, IoEngine, Mode, MssClamp, PeerFraming
from tunrelay.pumps import Address, FileDescriptorLike, PumpStats

_Bytes = bytes | bytearray | memoryview

class Keyring:
    """The aead keys, peer sessions and peer endpoint of one relay, shared
    by all its pumps (one per queue)."""

    def __init__(self, key: bytes, cipher: Cipher = "chacha20-poly1305",
                 role: Role = "a") -> None: ...
    @property
    def cipher(self) -> Cipher: ...
    @property
    def role(self) -> Role: ...
    @property
    def endpoint(self) -> Address | None:
        """The peer's endpoint, or None before it is known."""
    def new_session(self) -> bytes:
        """A fresh session id of ours."""
    def hello(self) -> bytes:
        """A sealed hello: over TCP the first record each end sends."""
    def verify_hello(self, datagram: _Bytes) -> bool:
        """True if ``datagram`` is an authentic hello of the peer, not seen before."""
    def set_endpoint(self, sock_family: int, peer: Address) -> None:
        """Where to send before the peer's first datagram."""
    def counts(self) -> dict[str, int]:
        """{"sessions", "evicted", "roams", "live"}."""

class Pump:
    """Moves packets between ``tun_fd`` and ``sock_fd`` until stopped, one
    GIL-free C loop per direction.  A ``tunrelay.pumps.PumpLike``."""

    def __init__(self, tun_fd: FileDescriptorLike, sock_fd: FileDescriptorLike, *,
                 framing: Framing | PeerFraming | None = None, mode: Mode = "tun", mtu: int = 1400,
                 batch: int = 64, peer: Address | None = None, offload: bool = False,
                 key: bytes | bytearray | Keyring | None = None,
                 cipher: Cipher = "chacha20-poly1305", role: Role = "a",
                 gso: bool = True, peers: PeerTable | None = None, duplex: bool = False,
                 busy_poll_us: int = 0, io: IoEngine = "auto",
                 mss_clamp: MssClamp = None) -> None: ...
    @property
    def framing(self) -> Framing | PeerFraming: ...
    @property
    def mode(self) -> Mode: ...
    @property
    def mtu(self) -> int: ...
    @property
    def batch(self) -> int: ...
    @property
    def offload(self) -> bool: ...
    @property
    def duplex(self) -> bool:
        """One thread drives both directions (else one thread each)."""
        ...
    @property
    def busy_poll_us(self) -> int:
        """How long a loop polls without sleeping after work (0: never)."""
        ...
    @property
    def mss_clamp(self) -> tuple[int, int]:
        """The MSS that TCP SYNs are clamped to (IPv4, IPv6); 0: not clamped."""
        ...
    @property
    def cipher(self) -> Cipher | None:
        """The aead cipher; None without aead."""
    @property
    def keyring(self) -> Keyring | None:
        """The aead Keyring (given, or made from the key); None without aead."""
    @property
    def peers(self) -> PeerTable | None:
        """The PeerTable this pump routes by; None for a point-to-point pump."""
    @property
    def running(self) -> bool: ...
    @property
    def peer(self) -> Address | None:
        """The UDP peer, given or learned (aead: where it is now); None otherwise."""
    @property
    def learns_peer(self) -> bool: ...
    @property
    def aead_session(self) -> str | None:
        """This sender's aead session id (hex), or None."""
    @property
    def aead_peer_sessions(self) -> int: ...
    @property
    def offloads(self) -> dict[str, bool]:
        """{"vnet_hdr", "gso", "gro"}: what the offload path uses now."""
    @property
    def io(self) -> Literal["uring", "syscalls"]:
        """The TUN I/O engine running (what io="auto" chose)."""
    @property
    def io_fallback(self) -> str | None:
        """io "auto" running syscalls: why io_uring could not be set up."""
    def attach(self, sock_fd: FileDescriptorLike, *, peer: Address | None = None) -> None:
        """Swap in a new socket (a TCP reconnect) while stopped."""
    def send_control(self, address: Address, data: _Bytes) -> None:
        """One datagram through the pump's own socket (same port as data)."""
    def send_keepalive(self, peer_id: int) -> None:
        """A sealed empty packet to a peer (framing "session")."""
    def send_packet(self, peer_id: int, packet: _Bytes) -> None:
        """One IP packet sealed to a peer from Python (framing "session")."""
    def start(self) -> None: ...
    def request_stop(self) -> None: ...
    def stop(self, timeout: float | None = None) -> Outcome | None: ...
    def wait(self, timeout: float | None = None) -> Outcome | None: ...
    def run(self) -> Outcome: ...
    def stats(self) -> PumpStats: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...

class Event(NamedTuple):
    """What PeerTable.take() reports."""

    kind: Literal["control", "endpoint", "renew", "promoted", "staged"]
    peer: int | None
    address: Address | None
    data: bytes | None
    session: int | None = None

class PeerTable:
    """The peers of one relay, shared by its pumps: endpoints, allowed IPs,
    counters, sessions, the control queue and events.  Changes are
    published while the pumps run."""

    def __init__(self, *, control_types: Iterable[int] | None = None,
                 control_slots: int = 256, rekey_after_messages: int | None = None,
                 rekey_after_time: float | None = None,
                 reject_after_messages: int | None = None,
                 reject_after_time: float | None = None) -> None: ...
    @property
    def publications(self) -> int: ...
    def add(self, name: str, *, endpoint: Address | None = None,
            allowed_ips: Iterable[str | IPv4Network | IPv6Network] = (),
            roaming: bool = True) -> int:
        """A new peer; returns its id (never reused)."""
    def update(self, peer_id: int, *, endpoint: Any = ..., allowed_ips: Any = ...,
               roaming: Any = ...) -> None:
        """Change a peer; keywords left out keep their value."""
    def remove(self, peer_id: int) -> None: ...
    def batch(self) -> AbstractContextManager[Self]:
        """Many changes, one publication."""
    def ids(self) -> list[int]: ...
    def __len__(self) -> int: ...
    def name(self, peer_id: int) -> str: ...
    def find(self, name: str) -> int | None: ...
    def info(self, peer_id: int) -> dict[str, Any]:
        """One peer: configuration, endpoint, counters, sessions."""
    def stats(self) -> dict[str, dict[str, Any]]:
        """info() of every peer, keyed by name."""
    def route(self, address: str | IPv4Address | IPv6Address) -> int | None:
        """The peer whose allowed IPs hold ``address`` longest, or None."""
    def counts(self) -> dict[str, int]: ...
    def install_session(self, peer_id: int, *, local_index: int, remote_index: int,
                        send_key: bytes, recv_key: bytes, initiator: bool) -> None:
        """Install a session's keys (framing "session")."""
    def clear_sessions(self, peer_id: int) -> None: ...
    def set_handshake_gate(self, mac1_key: bytes | None = None,
                           cookie_secret: bytes | None = None, valid_for: float = 0) -> None:
        """WireGuard handshakes under load: mac1 and mac2 checked in the loops."""
    def activity(self) -> dict[int, tuple[float | None, float | None, float | None]]:
        """{peer_id: (last_seen, last_data_received, last_data_sent)}, monotonic."""
    def fileno(self) -> int:
        """Readable while control datagrams or events wait."""
    def take(self) -> list[Event]:
        """Drain the control queue and the events."""

class PrefixTable:
    """Longest-prefix match of inner addresses to peer indexes (0..2^32-2),
    immutable once built."""

    def __init__(self, entries: Iterable[tuple[str | IPv4Network | IPv6Network, int]] = ()
                 ) -> None: ...
    @property
    def prefixes(self) -> int: ...
    @property
    def checksum(self) -> int: ...
    @property
    def nodes(self) -> tuple[int, int]:
        """Trie nodes (IPv4, IPv6)."""
    def lookup(self, address: str | IPv4Address | IPv6Address) -> int | None:
        """The peer of the longest prefix containing ``address``, or None."""
    def lookup_packet(self, packet: _Bytes, source: bool = False) -> int | None:
        """The peer for an IP packet's destination (or source), or None."""

#: What io="auto" runs where io_uring can be set up.
AUTO_IO: Literal["uring", "syscalls"]

def uring_unavailable() -> str | None:
    """None where a pump can set up its io_uring; else why not."""

def validate(data: _Bytes, mode: Mode, limit: int) -> str | None:
    """The C ingress check on one packet: None, or the drop reason."""

def clamp_mss(data: _Bytes, v4: int, v6: int, mode: Mode = "tun",
              partial: bool = False) -> bytes | None:
    """The C MSS clamp on one packet: the rewritten packet, or None if left alone."""

def len16_split(chunks: Iterable[_Bytes],
                limit: int) -> tuple[list[bytes], int, Literal["bad_length"] | None]:
    """Feed chunks through the TCP ingress parser: (frames, buffered bytes, error)."""
