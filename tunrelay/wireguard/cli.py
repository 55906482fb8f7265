"""``tunrelay-wg [-f|--foreground] IFNAME``: a drop-in for ``wireguard-go``.

It does what the cross-platform interface (wireguard.com/xplatform) asks of
a userspace WireGuard daemon, so ``wg``, ``wg-quick`` (with
``WG_QUICK_USERSPACE_IMPLEMENTATION=tunrelay-wg``) and scripts written for
wireguard-go drive it unchanged:

1. create the TUN device IFNAME (MTU 1420, left down with no address:
   ``wg-quick`` or the operator sets those);
2. open the UAPI socket /var/run/wireguard/IFNAME.sock (refused if a live
   daemon answers on it);
3. unless ``-f`` or ``WG_PROCESS_FOREGROUND=1``, go to the background: the
   parent exits 0 only once the child has the WireGuard device running and
   the socket served (a pipe carries the child's word), and non-zero with
   the child's error otherwise, because ``wg-quick`` runs ``wg`` at once;
4. serve until the TUN device is deleted (``ip link del``, which is what
   ``wg-quick down`` does), the socket file is removed, or SIGTERM/SIGINT;
   then remove the socket and stop.

``LOG_LEVEL=verbose|debug|error|silent`` as wireguard-go (default error):
verbose lines go to stdout, errors to stderr.  In the background those
stay attached only when LOG_LEVEL is set (and not silent), as in
wireguard-go; otherwise they go to /dev/null.

``TUNRELAY_WG_QUEUES`` (default 1) opens the TUN device with that many
queues, one pump each; ``TUNRELAY_WG_OFFLOAD=off`` opens it without TUN
offloads (by default they are used where the kernel has them, as
``tunrelay run`` does with ``offload = "auto"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import platform
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .uapi import SOCKET_DIR, UapiServer, open_uapi_socket

if TYPE_CHECKING:
    from .device import WireGuardDevice

__all__ = ["main", "run"]

PROG = "tunrelay-wg"
DEFAULT_MTU = 1420                 # 1500 - 80, what wireguard-go creates the TUN with
SIOCGIFMTU = 0x8921                # linux/sockios.h
SIOCSIFMTU = 0x8922
_IFREQ_MTU = struct.Struct("16si20x")
WATCH_INTERVAL = 1.0               # seconds between checks that the TUN and socket exist

log = logging.getLogger("tunrelay.wireguard")


class SetupError(Exception):
    """The daemon cannot start; the message says why."""


# ---------------------------------------------------------------- command line

def _usage() -> str:
    return f"Usage: {PROG} [-f/--foreground] INTERFACE-NAME"


def _version() -> str:
    from .. import __version__
    return (f"{PROG} v{__version__}\n\n"
            f"Userspace WireGuard daemon (tunrelay) for {sys.platform}-"
            f"{platform.machine().lower()}.\n"
            "Speaks the cross-platform userspace API of wireguard-go; see "
            "https://www.wireguard.com/xplatform/.\n")


def _log_level() -> int | None:
    """LOG_LEVEL as wireguard-go reads it; None: silent."""
    value = os.environ.get("LOG_LEVEL", "")
    if value in ("verbose", "debug"):
        return logging.DEBUG
    if value == "silent":
        return None
    return logging.ERROR


class _WgFormatter(logging.Formatter):
    """wireguard-go's line: ``DEBUG: (wg0) 2023/02/23 12:00:00 text``."""

    def __init__(self, ifname: str) -> None:
        super().__init__(datefmt="%Y/%m/%d %H:%M:%S")
        self.ifname = ifname

    def format(self, record: logging.LogRecord) -> str:
        label = "ERROR" if record.levelno >= logging.WARNING else "DEBUG"
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return f"{label}: ({self.ifname}) {self.formatTime(record, self.datefmt)} {text}"


def _setup_logging(ifname: str, level: int | None) -> None:
    root = logging.getLogger("tunrelay")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.propagate = False
    if level is None:
        root.addHandler(logging.NullHandler())
        root.setLevel(logging.CRITICAL + 1)
        return
    formatter = _WgFormatter(ifname)
    verbose = logging.StreamHandler(sys.stdout)
    verbose.addFilter(lambda record: record.levelno < logging.WARNING)
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.WARNING)
    for handler in (verbose, errors):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--version"]:
        sys.stdout.write(_version())
        return 0
    if len(args) == 2 and args[0] in ("-f", "--foreground"):
        foreground, ifname = True, args[1]
    elif len(args) == 1 and not args[0].startswith("-"):
        foreground, ifname = False, args[0]
    else:
        print(_usage(), file=sys.stderr)
        return 2
    foreground = foreground or os.environ.get("WG_PROCESS_FOREGROUND") == "1"
    level = _log_level()
    _setup_logging(ifname, level)
    log.debug("Starting %s", _version().split("\n", 1)[0])
    try:
        queues = int(os.environ.get("TUNRELAY_WG_QUEUES", "1"))
        if queues < 1:
            raise ValueError
    except ValueError:
        log.error("TUNRELAY_WG_QUEUES must be a positive integer, got %r",
                  os.environ.get("TUNRELAY_WG_QUEUES"))
        return 1
    try:
        offload = os.environ.get("TUNRELAY_WG_OFFLOAD", "auto") not in ("off", "0", "false")
        tun_fds, ifname = create_tun(ifname, queues, offload)
    except Exception as exc:
        _report(ifname, f"Failed to create TUN device: {exc}")
        return 1
    try:
        uapi_sock = open_uapi_socket(ifname, SOCKET_DIR)
    except OSError as exc:
        _report(ifname, f"UAPI listen error: {_os_error(exc)}")
        _close_all(tun_fds)
        return 1
    if foreground:
        return run(ifname, tun_fds, uapi_sock)
    return _daemonize(ifname, tun_fds, uapi_sock, level)


def _os_error(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return f"{text}: {exc.filename}" if exc.filename else text


def _report(ifname: str, message: str) -> None:
    """An error before the daemon runs: logged, and on stderr even when
    LOG_LEVEL silences the log (a failed start must say why)."""
    if logging.getLogger("tunrelay").isEnabledFor(logging.ERROR):
        log.error("%s", message)
    else:
        print(f"ERROR: ({ifname}) {message}", file=sys.stderr)


# ---------------------------------------------------------------- set-up

def create_tun(name: str, queues: int = 1, offload: bool = True) -> tuple[list[int], str]:
    """The TUN device (multi-queue, IFF_NO_PI), MTU 1420, left down.  With
    ``offload`` its fds carry virtio_net_hdrs and TSO/USO are asked for; the
    device sees that on the fds (its offload "auto")."""
    from ..daemon.device import open_tun
    from ..errors import DeviceError
    fd, ifname = open_tun(name, "tun", multi_queue=True, vnet_hdr=offload)
    fds = [fd]
    try:
        for _ in range(queues - 1):
            fds.append(open_tun(ifname, "tun", multi_queue=True, vnet_hdr=offload)[0])
        if offload:
            from ..daemon.device import enable_offloads
            try:
                for queue in fds:
                    enable_offloads(queue)
            except DeviceError as exc:
                # The fds still carry virtio_net_hdrs; the kernel just sends
                # no super-packets.
                log.debug("%s; carrying on without TUN offloads", exc)
        _set_mtu(ifname, DEFAULT_MTU)
    except BaseException:
        _close_all(fds)
        raise
    return fds, ifname


def _set_mtu(ifname: str, mtu: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCSIFMTU, _IFREQ_MTU.pack(ifname.encode(), mtu))


def _get_mtu(ifname: str) -> int | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            reply = fcntl.ioctl(sock.fileno(), SIOCGIFMTU, _IFREQ_MTU.pack(ifname.encode(), 0))
    except OSError:
        return None
    return int(_IFREQ_MTU.unpack(reply)[1])


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _daemonize(ifname: str, tun_fds: list[int], uapi_sock: socket.socket,
               level: int | None) -> int:
    """Fork; the parent waits for the child's word on a pipe."""
    ready_r, ready_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(ready_w)
        _close_all(tun_fds)      # the child holds the device and socket now
        uapi_sock.close()
        with os.fdopen(ready_r, "rb") as ready:
            word = ready.read().decode(errors="replace")
        if word == "ok\n":
            return 0
        message = word.removeprefix("error: ").strip() or (
            "the daemon exited while starting (no word on the readiness pipe)")
        print(f"ERROR: ({ifname}) {message}", file=sys.stderr)
        return 1
    # The child: a session of its own, stdin from /dev/null; the log
    # stays on the terminal only when LOG_LEVEL asks for it.
    os.close(ready_r)
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        if not (os.environ.get("LOG_LEVEL") and level is not None):
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        os.close(devnull)
        code = run(ifname, tun_fds, uapi_sock, ready_fd=ready_w)
    except BaseException as exc:  # never return into the parent's code path
        with contextlib.suppress(OSError):
            os.write(ready_w, f"error: {exc}\n".encode())
        code = 1
    os._exit(code)


# ---------------------------------------------------------------- the daemon

def run(ifname: str, tun_fds: list[int], uapi_sock: socket.socket, *,
        ready_fd: int | None = None) -> int:
    """Serve until the TUN device goes, the socket file goes, or a signal;
    0 then, 1 when the daemon could not start."""
    try:
        return asyncio.run(_serve(ifname, tun_fds, uapi_sock, ready_fd))
    finally:
        _close_all(tun_fds)
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.close(ready_fd)


def _tell(ready_fd: int | None, word: str) -> None:
    if ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(ready_fd, word.encode())
            os.close(ready_fd)


async def _serve(ifname: str, tun_fds: list[int], uapi_sock: socket.socket,
                 ready_fd: int | None) -> int:
    from .device import WireGuardDevice

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    device: WireGuardDevice | None = None
    server: UapiServer | None = None
    try:
        try:
            ifindex = socket.if_nametoindex(ifname)
            device = WireGuardDevice(tun_fds, mtu=DEFAULT_MTU)
            server = UapiServer(device, uapi_sock)   # owns the socket (file) from here
            await device.start()
            log.debug("Device started")
            await server.start()
            log.debug("UAPI listener started")
        except Exception as exc:
            log.error("Failed to start: %s", exc)
            _tell(ready_fd, f"error: failed to start: {exc}\n")
            return 1
        _tell(ready_fd, "ok\n")
        why = await _until_done(device, server, ifindex, stop)
        log.debug("Shutting down (%s)", why)
        return 0
    finally:
        if server is not None:
            await server.close()
        else:  # the device could not even be made: the socket file is the one we just made
            uapi_sock.close()
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SOCKET_DIR, f"{ifname}.sock"))
        if device is not None:
            await device.stop()


async def _until_done(device: WireGuardDevice, server: UapiServer, ifindex: int,
                      stop: asyncio.Event) -> str:
    """Why the daemon ends: a signal, the TUN device gone (the device's
    pumps end by themselves; the interface index is also watched, in case
    no pump notices), or the socket file removed (as wireguard-go, which
    watches it with inotify)."""

    async def signalled() -> str:
        await stop.wait()
        return "signal"

    async def device_ended() -> str:
        outcome = await device.wait()
        return f"device ended: {outcome}"

    async def watched() -> str:
        warned_mtu = DEFAULT_MTU
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                name = socket.if_indextoname(ifindex)
            except OSError:
                return "the TUN device was deleted"
            if not server.owns_socket_file():
                return "the UAPI socket file was removed"
            mtu = _get_mtu(name)
            if mtu is not None and mtu > DEFAULT_MTU and mtu != warned_mtu:
                # The device's MTU is fixed when it is made (wireguard-go
                # follows the interface's); say so instead of dropping quietly.
                log.warning("the interface MTU is %d, but this daemon carries packets "
                            "of at most %d bytes: larger ones are dropped", mtu, DEFAULT_MTU)
                warned_mtu = mtu

    tasks = [asyncio.ensure_future(c) for c in (signalled(), device_ended(), watched())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(iter(done)).result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    sys.exit(main())
