"""tunrelay: a Linux TUN/TAP <-> UDP/TCP packet relay with a compiled,
GIL-free fast path.

The embedding API: hand ``Pump`` a TUN fd and a socket fd you own, then
``start()``, ``stats()``, ``stop()``.  ``Relay`` is the whole configured
relay (device + transport + pump) that ``tunrelay run`` drives.

Three layers: this package is the embeddable core (the pumps, framings,
counters, errors); ``tunrelay.daemon`` is the configured relay and its
command line; ``tunrelay.testrig`` builds network namespaces for the demo,
the tests and the benchmarks.  The core imports neither of the others.
"""

__version__ = "0.1.0"

from importlib import import_module
from typing import TYPE_CHECKING

from ._runner import Outcome, Reason
from .errors import (
    ConfigError,
    DeviceError,
    PumpArgumentError,
    PumpError,
    PumpStateError,
    TransportError,
    TunrelayError,
)
from .pumps import PumpLike
from .pypump import PyPump

if TYPE_CHECKING:
    # What a type checker sees (Pump from _fastpath.pyi); at run time they
    # load on first use, below.
    from ._fastpath import Event, PeerTable, Pump
    from .daemon.config import Config
    from .daemon.config import load as load_config
    from .daemon.config import loads as loads_config
    from .daemon.device import open_tun
    from .daemon.relay import Relay
else:
    # Public name -> (module, name there).  The compiled pieces load on first
    # use, so `tunrelay check` and error reporting still work where the
    # extension failed to build; and the daemon's pieces (the configuration,
    # device set-up through pyroute2, the relay) too, so an embedder of the
    # pump imports neither tunrelay.daemon nor pyroute2.
    _LAZY = {
        "Pump": ("._fastpath", "Pump"),
        "PeerTable": ("._fastpath", "PeerTable"),
        "Event": ("._fastpath", "Event"),
        "Config": (".daemon.config", "Config"),
        "load_config": (".daemon.config", "load"),
        "loads_config": (".daemon.config", "loads"),
        "open_tun": (".daemon.device", "open_tun"),
        "Relay": (".daemon.relay", "Relay"),
    }

    def __getattr__(name):
        try:
            module, attribute = _LAZY[name]
        except KeyError:
            raise AttributeError(f"module 'tunrelay' has no attribute {name!r}") from None
        return getattr(import_module(module, __name__), attribute)


__all__ = ["Pump", "PeerTable", "Event", "PyPump", "PumpLike", "Relay", "Outcome", "Reason", "open_tun", "Config",
           "load_config", "loads_config", "TunrelayError", "ConfigError",
           "DeviceError", "TransportError", "PumpError", "PumpArgumentError",
           "PumpStateError"]
