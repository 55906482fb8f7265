"""tunrelay: a Linux TUN/TAP <-> UDP/TCP packet relay with a compiled,
GIL-free fast path."""

__version__ = "0.1.0"
