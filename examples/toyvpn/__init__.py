"""toyvpn: a small VPN on tunrelay's public API, with a TOY key exchange
that is not secure (see README.md)."""

from .node import Node

__all__ = ["Node"]
