"""The ``tunrelay`` command: run, check, stats, demo.

Exit codes: 0 success (including a clean stop on SIGTERM/SIGINT); 1 a
runtime failure, with a one-line message; 2 a configuration or usage
error, naming the file, the key and what was expected.  No tracebacks for
expected failures (``--debug`` shows them).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from .. import __version__
from ..errors import ConfigError, TunrelayError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("tunrelay")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 0 else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S")
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


def _load(path: str):
    from .config import load
    return load(path)


def cmd_run(args) -> int:
    from .privileges import drop_privileges
    from .relay import Relay
    cfg = _load(args.config)
    relay = Relay(cfg)

    def on_signal(signum, _frame):
        log.info("%s: stopping", signal.Signals(signum).name)
        relay.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    # SIGHUP: nothing to reload yet; documented as a no-op rather than the
    # default action (which would kill the relay without a clean teardown).
    signal.signal(signal.SIGHUP, lambda *_: log.info("SIGHUP: ignored (nothing to reload)"))
    relay.open()
    try:
        drop_privileges(cfg.security.user, cfg.security.group)
    except TunrelayError:
        relay.close()
        raise
    log.info("running (control socket %s); SIGTERM or Ctrl-C stops", cfg.control_socket)
    relay.run()
    log.info("stopped")
    return EXIT_OK


def cmd_check(args) -> int:
    cfg = _load(args.config)
    t = cfg.transport
    role = ("udp" if t.protocol == "udp" else
            "tcp server" if t.is_server else "tcp client")
    if cfg.peers:
        peers = ", ".join(f"{p.name} {p.endpoint or '(learned)'}{' roaming' if p.roaming else ''}"
                          for p in cfg.peers)
        print(f"{cfg.path}: ok: {cfg.device.mode} device {cfg.device.name or '(kernel-chosen)'} "
              f"mtu {cfg.device.mtu}, {role}, framing {t.framing}, listen {t.listen}, "
              f"{len(cfg.peers)} peers: {peers}")
        return EXIT_OK
    print(f"{cfg.path}: ok: {cfg.device.mode} device {cfg.device.name or '(kernel-chosen)'} "
          f"mtu {cfg.device.mtu}, {role}, framing {t.framing}"
          f"{f' (role {cfg.security.role})' if t.framing == 'aead' else ''}, "
          f"listen {t.listen or '-'}, peer {t.peer or '(learned)' if t.protocol == 'udp' else t.peer or '-'}")
    return EXIT_OK


def cmd_stats(args) -> int:
    from .stats import format_table, query
    path = args.socket or _load(args.config).control_socket
    snapshot = query(path)
    if args.json:
        print(json.dumps(snapshot, indent=2, sort_keys=True))
    else:
        print(format_table(snapshot))
    return EXIT_OK


def cmd_genkey(args) -> int:
    from ..aead import genkey
    print(genkey())
    return EXIT_OK


def cmd_demo(args) -> int:
    from ..testrig.demo import run_demo
    return run_demo(seconds=args.seconds, protocol=args.protocol)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunrelay",
        description="Relay packets between a TUN/TAP device and a UDP or TCP socket.")
    parser.add_argument("--version", action="version", version=f"tunrelay {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run a relay in the foreground")
    p.add_argument("--config", "-c", required=True, metavar="FILE")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate a configuration file without touching the system")
    p.add_argument("--config", "-c", required=True, metavar="FILE")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("stats", help="show a running relay's counters")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--config", "-c", metavar="FILE", help="the running relay's configuration")
    target.add_argument("--socket", metavar="PATH", help="its control socket")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("genkey", help="print a new pre-shared key (base64) for framing = \"aead\"")
    p.set_defaults(func=cmd_genkey)

    p = sub.add_parser("demo", help="two network namespaces joined by a tunnel: ping and measure")
    p.add_argument("--seconds", type=float, default=3.0, help="length of the throughput test")
    p.add_argument("--protocol", choices=("udp", "tcp"), default="udp")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"tunrelay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TunrelayError as exc:
        if args.debug:
            raise
        print(f"tunrelay: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except OSError as exc:
        if args.debug:
            raise
        print(f"tunrelay: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
