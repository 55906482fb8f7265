"""The daemon: ``tunrelay run`` and the rest of the command line.

Everything that turns the embeddable core (the pumps, framings and counters
in ``tunrelay``) into a configured relay on a host: the configuration file
(``config``), the TUN/TAP device and its netlink set-up through pyroute2
(``device``), the sockets (``transport``, ``lograte``), the supervised
lifecycle (``relay``), the counters' control socket (``stats``), dropping
root (``privileges``) and the command itself (``cli``).

The core never imports from here; an embedder that brings its own TUN fd
and socket needs none of it (nor pyroute2).
"""
