"""tunrelay: a Linux TUN/TAP <-> UDP/TCP packet relay with a compiled,
GIL-free fast path.

The embedding API: hand ``Pump`` a TUN fd and a socket fd you own, then
``start()``, ``stats()``, ``stop()``.  ``Relay`` is the whole configured
relay (device + transport + pump) that ``tunrelay run`` drives.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from ._runner import Outcome, Reason
from .config import Config, load as load_config, loads as loads_config
from .errors import (ConfigError, DeviceError, PumpArgumentError, PumpError,
                     PumpStateError, TransportError, TunrelayError)
from .pumps import PumpLike
from .pypump import PyPump


if TYPE_CHECKING:
    # What a type checker sees (Pump from _fastpath.pyi); at run time they
    # load on first use, below.
    from ._fastpath import Pump
    from .device import open_tun
    from .relay import Relay
else:
    def __getattr__(name):
        # The compiled pieces load on first use, so `tunrelay check` and error
        # reporting still work where the extension failed to build; and the
        # daemon's pieces (device set-up through pyroute2, the relay) too, so
        # an embedder of the pump never imports pyroute2.
        if name == "Pump":
            from ._fastpath import Pump
            return Pump
        if name == "Relay":
            from .relay import Relay
            return Relay
        if name == "open_tun":
            from .device import open_tun
            return open_tun
        raise AttributeError(f"module 'tunrelay' has no attribute {name!r}")


__all__ = ["Pump", "PyPump", "PumpLike", "Relay", "Outcome", "Reason", "open_tun", "Config",
           "load_config", "loads_config", "TunrelayError", "ConfigError",
           "DeviceError", "TransportError", "PumpError", "PumpArgumentError",
           "PumpStateError"]
