"""The ``tunrelay`` command: run, check, stats, genkey, pubkey, demo.

``run`` and ``check`` take a TOML file (``--config``) or a WireGuard
``wg-quick`` file (``--wg-config``); a TOML file with ``framing =
"wireguard"`` and a ``--wg-config`` file both run a WireGuard device
(tunrelay/wireguard/run.py).

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
import threading

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


def _load_either(args, *, resolve: bool = True):
    """(TOML config, None), or (None, WireGuard run settings) for a
    --wg-config file or a TOML file with framing = "wireguard"."""
    if args.wg_config is not None:
        from ..wireguard.run import from_wg_quick
        return None, from_wg_quick(args.wg_config, name=args.name,
                                   socket_path=getattr(args, "socket", None),
                                   user=getattr(args, "user", None),
                                   group=_user_group(getattr(args, "user", None)),
                                   metrics=_metrics_option(getattr(args, "metrics", None)))
    cfg = _load(args.config)
    if cfg.transport.framing != "wireguard":
        return cfg, None
    from ..wireguard.run import from_relay_config_settings
    return None, from_relay_config_settings(cfg, resolve=resolve)


def _user_group(uid: int | None) -> int | None:
    """--user's own group, as [security] user without group."""
    if uid is None:
        return None
    import pwd
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        raise ConfigError("--user", None, f"uid {uid} has no passwd entry to take its group "
                                          "from") from None


def _metrics_option(text: str | None):
    """--metrics ADDRESS (with --wg-config), checked as [metrics] listen."""
    if text is None:
        return None
    from .config import metrics_option
    return metrics_option(text)


def _user(text: str) -> int:
    """--user: a user name or a numeric id."""
    import pwd
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected a user name or a numeric id, got {text!r}, "
                                         "which is not a user on this system") from None


def cmd_run(args) -> int:
    from .notify import Notifier
    from .privileges import drop_privileges
    from .relay import Relay
    cfg, settings = _load_either(args)
    # Under systemd (Type=notify): connected now, before privileges drop.
    notifier = Notifier.from_environ()
    if args.verbose == 0:
        from .reload import set_log_level
        set_log_level(cfg.stats.log_level if cfg is not None else settings.log_level)
    if settings is not None:
        from ..wireguard.run import run as run_wireguard
        run_wireguard(settings, notifier=notifier)
        return EXIT_OK
    relay = Relay(cfg)
    relay.notifier = notifier

    def on_signal(signum, _frame):
        log.info("%s: stopping", signal.Signals(signum).name)
        relay.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    def on_hup(_signum, _frame):
        # Not in the handler itself: it would run between two bytecodes
        # of the supervisor, which uses the same PeerTable.
        log.info("SIGHUP: reloading %s", cfg.path)
        threading.Thread(target=relay.reload, name="reload", daemon=True).start()

    signal.signal(signal.SIGHUP, on_hup)
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
    cfg, settings = _load_either(args, resolve=False)
    if settings is not None:
        from ..wireguard.run import check_own_key, describe
        try:
            check_own_key(settings)
        except ImportError:  # no cryptography here: the rest is checked
            pass
        print(f"{settings.source}: ok: {describe(settings)}{_metrics_note(settings.metrics)}")
        return EXIT_OK
    t = cfg.transport
    role = ("udp" if t.protocol == "udp" else
            "tcp server" if t.is_server else "tcp client")
    if cfg.peers:
        peers = ", ".join(f"{p.name} {p.endpoint or '(learned)'}{' roaming' if p.roaming else ''}"
                          for p in cfg.peers)
        print(f"{cfg.path}: ok: {cfg.device.mode} device {cfg.device.name or '(kernel-chosen)'} "
              f"mtu {cfg.device.mtu}, {role}, framing {t.framing}, listen {t.listen}, "
              f"{len(cfg.peers)} peers: {peers}, {_describe_io(cfg)}{_metrics_note(cfg.metrics)}")
        return EXIT_OK
    print(f"{cfg.path}: ok: {cfg.device.mode} device {cfg.device.name or '(kernel-chosen)'} "
          f"mtu {cfg.device.mtu}, {role}, framing {t.framing}"
          f"{f' (role {cfg.security.role})' if t.framing == 'aead' else ''}, "
          f"listen {t.listen or '-'}, peer {t.peer or '(learned)' if t.protocol == 'udp' else t.peer or '-'}"
          f", {_describe_io(cfg)}{_metrics_note(cfg.metrics)}")
    return EXIT_OK


def _describe_io(cfg) -> str:
    """[relay] io, and what it comes to on this machine: io_uring is tried
    (a ring set up and closed), nothing else is touched."""
    io = cfg.relay.io
    if cfg.relay.engine != "fast" or io == "syscalls":
        return "io syscalls"
    try:
        from .._fastpath import AUTO_IO, uring_unavailable
    except ImportError:
        return f"io {io} (the compiled pump is not built)"
    why = uring_unavailable()
    if why is None:
        return f"io {io}" + (f" ({AUTO_IO} here)" if io == "auto" else "")
    if io == "uring":
        return f"io uring (NOT available here: {why}; the relay would not start)"
    return f"io auto (syscalls here: io_uring {why})"


def _metrics_note(metrics) -> str:
    """`tunrelay check`: where [metrics] will serve, if anywhere."""
    if metrics.listen is None:
        return ""
    return f", metrics on http://{metrics.listen}/metrics"


def cmd_stats(args) -> int:
    from .stats import format_table, query
    path = _control_path(args)
    if args.watch:
        from .watch import run_watch
        return run_watch(path, args.interval, count=args.count, json_lines=args.json)
    snapshot = query(path)
    if args.json:
        print(json.dumps(snapshot, indent=2, sort_keys=True))
    else:
        print(format_table(snapshot))
    return EXIT_OK


#: How long `tunrelay reload` waits for the relay's answer (a reload
#: resolves the new peers' endpoints, which may ask DNS).
RELOAD_TIMEOUT_S = 30.0


def cmd_reload(args) -> int:
    """Ask the running relay to re-read its configuration; 0 if it applied
    it, 1 if it refused it (the relay says why, and keeps running)."""
    from .stats import query
    path = _control_path(args)
    answer = query(path, timeout=RELOAD_TIMEOUT_S, request="reload")
    if "reload" not in answer:
        raise TunrelayError(f"the relay on {path} cannot reload: {answer.get('error', answer)}")
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print(f"{answer['config']}: {answer['reload']}: {answer['message']}")
    return EXIT_OK if answer["reload"] == "applied" else EXIT_RUNTIME


def _control_path(args) -> str:
    """The control socket of the running relay that --config, --wg-config
    (with --name) or --socket names."""
    if args.socket:
        return args.socket
    if args.wg_config is not None:
        from ..wireguard.run import interface_name
        return f"/run/tunrelay/{args.name or interface_name(args.wg_config)}.sock"
    return _load(args.config).control_socket


def cmd_genkey(args) -> int:
    if args.wireguard:
        from ..wireguard.noise import generate_private_key, key_to_base64
        print(key_to_base64(generate_private_key()))
        return EXIT_OK
    from ..aead import genkey
    print(genkey())
    return EXIT_OK


def cmd_pubkey(args) -> int:
    """As `wg pubkey`: a WireGuard private key on stdin, its public key out."""
    from ..wireguard.noise import key_to_base64, private_to_public
    from .config import decode_key, key_expected
    text = sys.stdin.read(256)
    key = decode_key(text[:-1] if text.endswith("\n") else text)
    if key is None:
        raise ConfigError("stdin", None, f"{key_expected('private key')}, and nothing else but "
                                         f"one trailing newline; got {len(text)} characters")
    print(key_to_base64(private_to_public(key)))
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
    _config_or_wg(p)
    p.add_argument("--socket", metavar="PATH", help="with --wg-config: the control socket "
                                                    "(default /run/tunrelay/NAME.sock)")
    p.add_argument("--user", type=_user, metavar="USER", help="with --wg-config: drop to this "
                   "user (and its group) once the device and sockets are open")
    p.add_argument("--metrics", metavar="ADDRESS", help="with --wg-config: serve Prometheus "
                   "metrics on this loopback address and port, e.g. 127.0.0.1:9555 (a TOML "
                   "file has [metrics] for it)")
    p.set_defaults(func=cmd_run, wg_only=("name", "socket", "user", "metrics"))

    p = sub.add_parser("check", help="validate a configuration file without touching the system")
    _config_or_wg(p)
    p.set_defaults(func=cmd_check, wg_only=("name",))

    p = sub.add_parser("stats", help="show a running relay's counters")
    _running_relay(p)
    p.add_argument("--json", action="store_true", help="JSON instead of a table (with --watch: "
                                                       "one JSON object per line, rates included)")
    p.add_argument("--watch", "-w", action="store_true",
                   help="redraw the counters every interval, with rates (packets/s, bits/s, "
                        "drops/s) per direction and per peer; plain lines when stdout is not "
                        "a terminal; Ctrl-C stops")
    p.add_argument("--interval", type=_interval, metavar="S",
                   help="with --watch: seconds between updates (default 1)")
    p.add_argument("--count", type=_count, metavar="N",
                   help="with --watch: stop after N updates (default: until Ctrl-C)")
    p.set_defaults(func=cmd_stats, wg_only=("name",))

    p = sub.add_parser("reload", help="make a running relay re-read its configuration and apply "
                                      "what can change live (as SIGHUP does), and say what it did")
    _running_relay(p)
    p.add_argument("--json", action="store_true", help="the answer as JSON")
    p.set_defaults(func=cmd_reload, wg_only=("name",))

    p = sub.add_parser("genkey", help="print a new pre-shared key (base64) for framing = \"aead\", "
                                      "or with --wireguard a WireGuard private key (`wg genkey`)")
    p.add_argument("--wireguard", action="store_true",
                   help="a WireGuard private key (for [wireguard] private_key_file, PrivateKey)")
    p.set_defaults(func=cmd_genkey)

    p = sub.add_parser("pubkey", help="read a WireGuard private key on stdin and print its "
                                      "public key (`wg pubkey`)")
    p.set_defaults(func=cmd_pubkey)

    p = sub.add_parser("demo", help="two network namespaces joined by a tunnel: ping and measure")
    p.add_argument("--seconds", type=float, default=3.0, help="length of the throughput test")
    p.add_argument("--protocol", choices=("udp", "tcp"), default="udp")
    p.set_defaults(func=cmd_demo)
    return parser


def _interval(text: str) -> float:
    """--interval: seconds, from 0.1 to 3600."""
    from .watch import MAX_INTERVAL_S, MIN_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not MIN_INTERVAL_S <= value <= MAX_INTERVAL_S:  # also false for nan
        raise argparse.ArgumentTypeError(
            f"expected seconds from {MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g}, got {text!r}")
    return value


def _count(text: str) -> int:
    """--count: a positive number of updates."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of updates, 1 or more, "
                                         f"got {text!r}")
    return int(text)


def _config_or_wg(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", "-c", metavar="FILE", help="a tunrelay TOML file")
    source.add_argument("--wg-config", metavar="FILE",
                        help="a WireGuard wg-quick / `wg setconf` file (wg0.conf)")
    p.add_argument("--name", metavar="IFNAME", help="with --wg-config: the interface name "
                                                    "(default: the file's name, wg0 for wg0.conf)")


def _running_relay(p: argparse.ArgumentParser) -> None:
    """Which running relay a command talks to (see _control_path)."""
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--config", "-c", metavar="FILE", help="the running relay's configuration")
    target.add_argument("--wg-config", metavar="FILE",
                        help="the wg-quick file of a running `tunrelay run --wg-config`")
    target.add_argument("--socket", metavar="PATH", help="its control socket")
    p.add_argument("--name", metavar="IFNAME", help="with --wg-config: the interface name it "
                                                    "was run with")


def _check_wg_only(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options that only mean something with --wg-config are usage errors without it."""
    if getattr(args, "wg_config", None) is not None:
        return
    for option in getattr(args, "wg_only", ()):
        if option == "socket" and args.command in ("stats", "reload"):
            continue
        if getattr(args, option, None) is not None:
            parser.error(f"--{option} applies to --wg-config only (a TOML file sets it in the file)")


def _check_watch_only(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--interval and --count mean something with --watch only; its
    default interval is set here, so a missing one is told from 1."""
    if args.command != "stats":
        return
    if not args.watch:
        for option in ("interval", "count"):
            if getattr(args, option) is not None:
                parser.error(f"--{option} applies to --watch only")
    elif args.interval is None:
        args.interval = 1.0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_wg_only(parser, args)
    _check_watch_only(parser, args)
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
