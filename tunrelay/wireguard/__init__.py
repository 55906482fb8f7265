"""tunrelay speaks WireGuard: the handshake and timers in Python (this
package), the transport data path in the compiled "session" framing.

Importing the package is cheap: the daemon imports it for every run, and
most runs are not WireGuard ones.  The names below load their module on
first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Re-exported for type checkers (the redundant aliases say so).
    from .device import KEEP as KEEP
    from .device import PeerStatus as PeerStatus
    from .device import WireGuardDevice as WireGuardDevice
    from .noise import generate_private_key as generate_private_key
    from .noise import key_from_hex as key_from_hex
    from .noise import key_to_base64 as key_to_base64
    from .noise import key_to_hex as key_to_hex
    from .noise import parse_key as parse_key
    from .noise import private_to_public as private_to_public
    from .timers import Timers as Timers

_LAZY = {
    "WireGuardDevice": "device", "PeerStatus": "device", "KEEP": "device",
    "Timers": "timers",
    "parse_key": "noise", "key_to_base64": "noise", "key_to_hex": "noise",
    "key_from_hex": "noise", "private_to_public": "noise", "generate_private_key": "noise",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
