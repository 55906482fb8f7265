"""TUN/TAP devices: create or attach with TUNSETIFF, configure through netlink.

The kernel side of a device is a file descriptor on /dev/net/tun: reading it
returns one packet (TUN) or one Ethernet frame (TAP) the stack routed to the
device, writing it injects one.  ``open_tun`` does only that attach;
``Device`` adds what an operator expects from a tunnel end: MTU, addresses,
routes, link up, owner and persistence, all in the current network namespace.

Errors are turned into ``DeviceError`` messages that say which device, what
was expected and what to do, because the raw errno of TUNSETIFF is the same
(EINVAL) for half a dozen different mistakes.

Setting the fd non-blocking is left to the pump, which owns the I/O.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import sys
from typing import TYPE_CHECKING

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import DeviceError

if TYPE_CHECKING:
    from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network

    from .config import DeviceConfig

__all__ = ["open_tun", "enable_offloads", "Device", "delete_device", "IFNAMSIZ"]

# --- linux/if_tun.h and linux/if.h --------------------------------------
# ioctl numbers are _IOW('T', nr, int): write (1) << 30 | sizeof(int) << 16
# | 'T' << 8 | nr.  TUNSETPERSIST/OWNER/GROUP take their int by value.
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETPERSIST = 0x400454CB  # _IOW('T', 203, int)
TUNSETOWNER = 0x400454CC  # _IOW('T', 204, int)
TUNSETGROUP = 0x400454CE  # _IOW('T', 206, int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)

# TUNSETOFFLOAD: what we can take from the kernel in a read.  With these the
# stack hands the device TCP (and UDP) super-packets of up to 64 KiB with
# the checksum left to us; tunrelay segments them (see _offload.pxi).
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20  # Linux 6.2
TUN_F_USO6 = 0x40
OFFLOAD_FLAGS = (
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_USO4 | TUN_F_USO6,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,  # kernels before USO
)

IFF_UP = 0x0001  # linux/if.h, in a link's flags
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000  # no 4-byte packet-info header: the fd carries bare packets
IFF_VNET_HDR = 0x4000

IFNAMSIZ = 16  # including the terminating NUL, so names have at most 15 bytes
# struct ifreq: char ifr_name[IFNAMSIZ]; union { short ifr_flags; ... } padded
# to 40 bytes on 64-bit (the union's largest member is struct ifmap, 24 bytes).
_IFREQ = struct.Struct("16sH22x")

IFA_F_NODAD = 0x02  # linux/if_addr.h: skip duplicate address detection
IPV6_MIN_MTU = 1280  # below it the kernel disables IPv6 on the link

_TUN_DEV = "/dev/net/tun"
_MODE_FLAGS = {"tun": IFF_TUN, "tap": IFF_TAP}
_TUN_TYPE_NAMES = {IFF_TUN: "tun", IFF_TAP: "tap"}  # IFLA_TUN_TYPE values


def open_tun(
    name: str = "",
    mode: str = "tun",
    *,
    multi_queue: bool = False,
    vnet_hdr: bool = False,
) -> tuple[int, str]:
    """Create the device ``name`` (or attach to it if it exists) and return
    ``(fd, name)``; ``name`` is the one the kernel gave when "" was passed
    (``tun0``, ``tap3``...).  IFF_NO_PI is always set.  The fd is blocking
    and close-on-exec; the caller owns it.
    """
    if mode not in _MODE_FLAGS:
        raise DeviceError(f"device {name!r}: mode must be 'tun' or 'tap', got {mode!r}")
    raw_name = name.encode()
    if len(raw_name) >= IFNAMSIZ:
        raise DeviceError(
            f"device name {name!r} is {len(raw_name)} bytes long, "
            f"expected at most {IFNAMSIZ - 1} (the kernel's IFNAMSIZ limit)"
        )
    flags = _MODE_FLAGS[mode] | IFF_NO_PI
    if multi_queue:
        flags |= IFF_MULTI_QUEUE
    if vnet_hdr:
        flags |= IFF_VNET_HDR

    try:
        fd = os.open(_TUN_DEV, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise _open_error(exc, name, mode) from exc
    try:
        ifreq = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw_name, flags))
    except OSError as exc:
        os.close(fd)
        raise _setiff_error(exc, name, mode, multi_queue) from exc
    given = _IFREQ.unpack(ifreq)[0].split(b"\0", 1)[0].decode()
    return fd, given


def delete_device(name: str) -> None:
    """Remove a persistent TUN/TAP device: attach, clear TUNSETPERSIST, close.

    The mode and queue flag must match the device's to attach, so they are
    read from netlink first.  Fails with EBUSY (as DeviceError) while another
    process holds a single-queue device.
    """
    info = _link_info(name)
    if info is None:
        raise DeviceError(f"cannot delete device {name!r}: no such device")
    kind, tun_type, multi_queue = info
    if kind != "tun":
        raise DeviceError(
            f"cannot delete device {name!r}: it is a {kind} device, expected tun or tap"
        )
    fd, _ = open_tun(name, tun_type, multi_queue=multi_queue)
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
    except OSError as exc:
        raise DeviceError(f"cannot clear persist flag of device {name!r}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def enable_offloads(fd: int) -> int:
    """TUNSETOFFLOAD on an fd opened with IFF_VNET_HDR: the richest set the
    kernel accepts (probed once, newest first).  Returns the flags set;
    raises DeviceError when the kernel takes none."""
    last = None
    for flags in OFFLOAD_FLAGS:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            return flags
        except OSError as exc:
            last = exc
    raise DeviceError(f"the kernel refuses TUN offloads (TUNSETOFFLOAD: {last.strerror})")


class Device:
    """One configured TUN/TAP device, owned through its fd(s).

    ``open()`` creates or attaches the device, then sets MTU, addresses, link
    state and routes in the current network namespace.  With ``queues > 1``
    the device is multi-queue and ``fds`` holds one fd per queue (one pump
    each); ``fd`` is the first.  ``close()`` closes them all: a device that is
    not persistent disappears with its last fd.
    """

    def __init__(self, cfg: DeviceConfig, log: logging.Logger | None = None,
                 *, offload: str | bool = False) -> None:
        self.cfg = cfg
        self.log = log or logging.getLogger("tunrelay.daemon.device")
        self.name: str = cfg.name
        self.fds: tuple[int, ...] = ()
        self.ifindex: int | None = None
        # offload: True or "auto" opens with IFF_VNET_HDR and asks for TSO/USO;
        # "auto" carries on without them where the kernel refuses.
        self.offload = offload
        self.vnet_hdr = False
        self.offload_flags = 0

    @property
    def fd(self) -> int:
        """The first queue's fd (-1 when closed)."""
        return self.fds[0] if self.fds else -1

    def open(self) -> int:
        """Create or attach, configure, and return the (first) fd.  On any
        failure the fds are closed before the error propagates, so a device
        this call created does not outlive it."""
        if self.fds:
            raise DeviceError(f"device {self.name!r} is already open")
        cfg = self.cfg
        queues = max(1, cfg.queues)
        vnet_hdr = bool(self.offload)
        fd, self.name = open_tun(cfg.name, cfg.mode, multi_queue=queues > 1, vnet_hdr=vnet_hdr)
        self.fds = (fd,)
        try:
            # Later queues attach by the name the kernel gave the first one.
            for _ in range(queues - 1):
                self.fds += (open_tun(self.name, cfg.mode, multi_queue=True, vnet_hdr=vnet_hdr)[0],)
            self.vnet_hdr = vnet_hdr
            if vnet_hdr:
                self._enable_offloads()
            self._set_ownership()
            self._configure()
            if cfg.persist:
                # Last, so that a failure above leaves no persistent device.
                self._ioctl(TUNSETPERSIST, 1, "set persist flag")
        except BaseException:
            self.close()
            raise
        self.log.info(
            "device %s (%s, mtu %d, %d queue%s) up%s%s",
            self.name, cfg.mode, cfg.mtu, queues, "s" if queues > 1 else "",
            ": " if cfg.addresses else "",
            " ".join(str(a) for a in cfg.addresses),
        )
        return self.fd

    def close(self) -> None:
        """Close every queue fd; safe to call twice."""
        fds, self.fds = self.fds, ()
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> Device:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"fd={self.fd}" if self.fds else "closed"
        return f"<Device {self.name or '?'} {self.cfg.mode} {state}>"

    # -- helpers ---------------------------------------------------------

    def _ioctl(self, request: int, value: int, what: str) -> None:
        try:
            fcntl.ioctl(self.fd, request, value)
        except OSError as exc:
            raise DeviceError(f"device {self.name!r}: cannot {what}: {exc.strerror}") from exc

    def _enable_offloads(self) -> None:
        try:
            for fd in self.fds:
                self.offload_flags = enable_offloads(fd)
        except DeviceError as exc:
            if self.offload is True:
                raise DeviceError(f"device {self.name!r}: offload = true, but {exc}") from exc
            # "auto": the fds still carry virtio_net_hdrs (the pump handles
            # them), the kernel just never sends super-packets.
            self.log.warning("device %s: %s; carrying on without", self.name, exc)

    def _set_ownership(self) -> None:
        """Let an unprivileged user or group attach later (persistent devices)."""
        if self.cfg.owner is not None:
            self._ioctl(TUNSETOWNER, self.cfg.owner, f"set owner to uid {self.cfg.owner}")
        if self.cfg.group is not None:
            self._ioctl(TUNSETGROUP, self.cfg.group, f"set group to gid {self.cfg.group}")

    def _configure(self) -> None:
        """MTU, addresses, link up, then routes (the kernel refuses a route
        through a device that is down).  Only what differs is changed, so a
        persistent device set up beforehand by root needs no privilege:
        an unprivileged relay attaches to it as it is."""
        cfg = self.cfg
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.name)
            if not found:
                raise DeviceError(f"device {self.name!r} vanished right after it was created")
            self.ifindex = index = found[0]
            link = ipr.get_links(index)[0]
            if link.get_attr("IFLA_MTU") != cfg.mtu:
                try:
                    ipr.link("set", index=index, mtu=cfg.mtu)
                except NetlinkError as exc:
                    raise DeviceError(
                        f"device {self.name!r}: cannot set mtu {cfg.mtu}: {_strerror(exc)}"
                        f"{_setup_hint(exc, self.name)}") from exc
            present = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index)}
            for address in cfg.addresses:
                if (str(address.ip), address.network.prefixlen) not in present:
                    self._add_address(ipr, index, address)
            if not link["flags"] & IFF_UP:
                try:
                    ipr.link("set", index=index, state="up")
                except NetlinkError as exc:
                    raise DeviceError(f"device {self.name!r}: cannot bring it up: {_strerror(exc)}"
                                      f"{_setup_hint(exc, self.name)}") from exc
            for network in cfg.routes:
                if not self._has_route(ipr, index, network):
                    self._add_route(ipr, index, network)

    def _add_address(self, ipr: IPRoute, index: int, address: IPv4Interface | IPv6Interface) -> None:
        kwargs = {}
        if address.version == 6:
            # A point-to-point tunnel has no one to collide with; without
            # NODAD the address stays "tentative" (unusable) for ~2 s.
            kwargs["flags"] = IFA_F_NODAD
        try:
            ipr.addr(
                "add", index=index, address=str(address.ip),
                prefixlen=address.network.prefixlen, **kwargs,
            )
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:  # already there, e.g. a persistent device
                return
            hint = ""
            if address.version == 6 and self.cfg.mtu < IPV6_MIN_MTU:
                hint = f" (IPv6 needs an mtu of at least {IPV6_MIN_MTU}, the device has {self.cfg.mtu})"
            raise DeviceError(
                f"device {self.name!r}: cannot add address {address}: {_strerror(exc)}{hint}"
                f"{_setup_hint(exc, self.name)}"
            ) from exc

    def _add_route(self, ipr: IPRoute, index: int, network: IPv4Network | IPv6Network) -> None:
        try:
            ipr.route("add", dst=str(network), oif=index)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST and self._has_route(ipr, index, network):
                return
            reason = (
                "a route to it through another device exists"
                if exc.code == errno.EEXIST else _strerror(exc)
            )
            raise DeviceError(
                f"device {self.name!r}: cannot add route {network}: {reason}"
                f"{_setup_hint(exc, self.name)}"
            ) from exc

    @staticmethod
    def _has_route(ipr: IPRoute, index: int, network: IPv4Network | IPv6Network) -> bool:
        family = socket.AF_INET if network.version == 4 else socket.AF_INET6
        for route in ipr.get_routes(family=family, table=254):
            if (
                route["dst_len"] == network.prefixlen
                and route.get_attr("RTA_DST") == str(network.network_address)
                and route.get_attr("RTA_OIF") == index
            ):
                return True
        return False


# -- error diagnosis -------------------------------------------------------

def _setup_hint(exc: NetlinkError, name: str) -> str:
    """Without CAP_NET_ADMIN a relay can only use a device set up for it."""
    if exc.code != errno.EPERM:
        return ""
    return (f" (not permitted: run as root, or set the device up beforehand as root, e.g. "
            f"`ip tuntap add dev {name} mode tun user USER` plus its address and `ip link set "
            f"{name} up`, so that it already matches the config)")


def _strerror(exc: NetlinkError) -> str:
    return os.strerror(exc.code) if exc.code else str(exc)


def _link_info(name: str) -> tuple[str, str, bool] | None:
    """(kind, tun type, multi-queue) of an existing link, None if absent.

    ``kind`` is the rtnetlink link kind ("tun" for both TUN and TAP, "veth",
    "bridge"...; "non-TUN" for loopback or hardware, which have no kind).
    """
    try:
        with IPRoute() as ipr:
            links = ipr.link("get", ifname=name)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise DeviceError(f"cannot look up device {name!r}: {_strerror(exc)}") from exc
    linkinfo = links[0].get_attr("IFLA_LINKINFO")
    kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo else None
    if kind != "tun":
        return (kind or "non-TUN", "", False)
    data = linkinfo.get_attr("IFLA_INFO_DATA")
    tun_type = _TUN_TYPE_NAMES.get(data.get_attr("IFLA_TUN_TYPE"), "tun") if data else "tun"
    multi_queue = bool(data.get_attr("IFLA_TUN_MULTI_QUEUE")) if data else False
    return ("tun", tun_type, multi_queue)


def _open_error(exc: OSError, name: str, mode: str) -> DeviceError:
    what = f"cannot create {mode} device {repr(name) if name else '(any name)'}"
    if exc.errno == errno.ENOENT:
        return DeviceError(f"{what}: {_TUN_DEV} does not exist; load the tun module: modprobe tun")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return DeviceError(f"{what}: cannot open {_TUN_DEV}: {exc.strerror}; {_privilege_hint(name, mode)}")
    return DeviceError(f"{what}: cannot open {_TUN_DEV}: {exc.strerror}")


def _setiff_error(exc: OSError, name: str, mode: str, multi_queue: bool) -> DeviceError:
    label = repr(name) if name else "(any name)"
    if exc.errno == errno.EPERM:
        return DeviceError(
            f"cannot create or attach {mode} device {label}: operation not permitted; "
            + _privilege_hint(name, mode)
        )
    if exc.errno == errno.EBUSY:
        return DeviceError(
            f"device {label} is busy: another process is already attached to it "
            f"(a single-queue {mode} device takes one fd)"
        )
    if exc.errno == errno.EINVAL and name:
        message = _diagnose_einval(name, mode, multi_queue)
        if message:
            return DeviceError(message)
    return DeviceError(f"cannot create or attach {mode} device {label}: {exc.strerror}")


def _diagnose_einval(name: str, mode: str, multi_queue: bool) -> str | None:
    """EINVAL from TUNSETIFF covers a name taken by another kind of link, a
    TUN/TAP of the other mode or queue setting, and an invalid name: ask
    netlink which one it is."""
    try:
        info = _link_info(name)
    except (DeviceError, OSError):
        return None
    if info is None:
        return f"device name {name!r} is not valid: expected 1-15 bytes without '/', ':' or whitespace"
    kind, tun_type, device_multi_queue = info
    if kind != "tun":
        return f"device {name!r} exists and is a {kind} device, expected {mode}"
    if tun_type != mode:
        return f"device {name!r} exists and is a {tun_type} device, expected {mode}"
    if device_multi_queue != multi_queue:
        queue = {True: "multi-queue", False: "single-queue"}
        return (
            f"device {name!r} exists and is a {queue[device_multi_queue]} {mode} device, "
            f"expected {queue[multi_queue]}"
        )
    return None


def _privilege_hint(name: str, mode: str) -> str:
    python = os.path.realpath(sys.executable)
    device = name or "tun0"
    return (
        "expected CAP_NET_ADMIN: run as root, or grant it to the interpreter "
        f"(setcap cap_net_admin+ep {python}), or use a persistent device owned by this user "
        f"(ip tuntap add dev {device} mode {mode} user {os.getuid()})"
    )
