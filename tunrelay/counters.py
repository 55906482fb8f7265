"""Counter names shared by the compiled pump, the Python pump and stats.

The compiled pump keeps its counters in a C struct whose drop and error
arrays are indexed in exactly the order of ``DROP_REASONS`` and
``ERROR_KINDS`` below (``_fastpath.pyx`` checks the lengths at import), so
both pumps report the same dictionary shape.
"""

from __future__ import annotations

from typing import Any

DIRECTIONS = ("egress", "ingress")

#: Why a packet was dropped.  Every drop is counted under exactly one reason.
DROP_REASONS = (
    "not_peer",      # ingress: datagram from an address other than the peer
    "no_peer",       # egress: no peer known yet (UDP, peer still to be learned)
    "empty",         # zero-length packet
    "oversize",      # longer than the MTU (TUN) or MTU + Ethernet + VLAN (TAP)
    "bad_version",   # TUN: first nibble neither 4 nor 6
    "truncated",     # shorter than the minimal IPv4/IPv6/Ethernet header
    "bad_length",    # IP length field (or IPv4 header length) disagrees with the frame
    "bad_frame",     # len16 length of zero or over the maximum, or a len16 datagram whose length lies
    "tun_write",     # the device refused the write (EINVAL, EIO, ...)
    "send_error",    # the socket refused the datagram (ECONNREFUSED, ENETUNREACH, ...)
    "disconnected",  # TCP: packets of a batch still unsent when the connection died
    "bad_offload",   # egress, offloads on: a virtio_net_hdr the segmenter cannot follow
    "too_short",     # aead: shorter than its header and tag
    "bad_tag",       # aead: does not authenticate (forged, corrupted, wrong key)
    "replay",        # aead: a counter seen before, or older than the replay window
    "stale_session",  # aead: authentic, but of a session older than the peer's newest (a recording)
    "reflected",     # aead: carries this relay's own role: its own datagram sent back (or both ends one role)
    "aead_version",  # aead: another wire version (an older tunrelay at the other end)
    "stopped",       # egress: read from the device, then the pump was stopped before it was sent
    "no_route",      # peers: no peer's allowed IPs hold the inner destination
    "not_allowed",   # peers: the inner source lies outside the sending peer's allowed IPs
    "no_session",    # session framing: no session to send with, or an unknown receiver index
    "session_expired",  # session framing: the session is past its hard limits (age or messages)
    "control_full",  # peers: a control datagram found the control queue full
)

#: Which reasons can happen in which direction (the rest stay zero).
DIRECTION_DROPS = {
    "egress": ("no_peer", "oversize", "send_error", "disconnected", "bad_offload", "stopped",
               "no_route", "no_session", "session_expired"),
    "ingress": ("not_peer", "empty", "oversize", "bad_version", "truncated",
                "bad_length", "bad_frame", "tun_write", "too_short", "bad_tag", "replay",
                "stale_session", "reflected", "aead_version", "not_allowed", "no_session",
                "session_expired", "control_full"),
}

#: Errors that are not tied to one packet.
ERROR_KINDS = (
    "read",        # a read/recv failed with something other than EAGAIN/EINTR
    "write",       # a write/send failed with something other than EAGAIN/EINTR
    "disconnect",  # the TCP connection ended (EOF, reset, len16 protocol error)
    "gso_fallback",  # a UDP GSO send was refused (EIO): segments go one by one from then on
)

#: Plain totals, in the order the C struct holds them.  ``packets`` and
#: ``bytes`` count packets as they are on the wire (after segmentation,
#: before coalescing); ``tun_io`` counts TUN reads/writes that moved them
#: (with offloads, one super-packet is one TUN I/O and many packets);
#: ``mss_clamped`` the TCP SYNs (and SYN-ACKs) whose MSS option was lowered
#: (``mss_clamp``), egress as read from the device, ingress before it is
#: written to it.
TOTALS = ("packets", "bytes", "batches", "syscalls", "wakeups", "tun_io", "mss_clamped")


def empty_direction(direction: str) -> dict:
    """A zeroed counter dictionary for one direction."""
    counters: dict[str, Any] = {name: 0 for name in TOTALS}
    counters["drops"] = {reason: 0 for reason in DIRECTION_DROPS[direction]}
    counters["errors"] = {kind: 0 for kind in ERROR_KINDS}
    return counters


def total_drops(direction_counters: dict) -> int:
    return sum(direction_counters["drops"].values())
