"""TUN/TAP devices, created inside a throwaway network namespace.

Each test runs a small Python snippet with ``ip netns exec`` in the test
bed's namespace ``ns_a`` (the devices never exist in the root namespace) and
gets back one JSON object, which the test checks.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from _root import testbed  # noqa: F401  (a fixture)

from tunrelay.daemon.device import open_tun
from tunrelay.errors import DeviceError

REPO = Path(__file__).resolve().parents[1]

# Shared by every snippet: imports, and helpers that ask iproute2.
PRELUDE = """
import ipaddress, json, subprocess
from tunrelay.daemon.config import DeviceConfig
from tunrelay.daemon.device import Device, delete_device, open_tun
from tunrelay.errors import DeviceError

def ip_json(*args):
    done = subprocess.run(["ip", "-j", *args], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else None

def exists(name):
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode == 0

def error_of(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except DeviceError as exc:
        return str(exc)
    return None

def nets(*texts):
    return tuple(ipaddress.ip_network(t) for t in texts)

def ifaces(*texts):
    return tuple(ipaddress.ip_interface(t) for t in texts)
"""


def run_snippet(tb, code: str, prefix: tuple[str, ...] = ()) -> dict:
    """Run PRELUDE + code in ns_a (after a ``prefix`` command such as
    setpriv); the snippet prints one JSON object last."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = tb.run(
        tb.ns_a, [*prefix, sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def addresses(addr_json: list) -> set[str]:
    return {f"{a['local']}/{a['prefixlen']}" for a in addr_json[0]["addr_info"] if a["scope"] == "global"}


# -- without root --------------------------------------------------------------


def test_name_longer_than_15_bytes_is_refused_before_any_syscall():
    with pytest.raises(DeviceError, match=r"'tun-name-too-long' is 17 bytes long, expected at most 15"):
        open_tun("tun-name-too-long")


def test_name_length_counts_bytes_not_characters():
    with pytest.raises(DeviceError, match="16 bytes long"):
        open_tun("tunnel\u00e9\u00e9\u00e9\u00e9\u00e9")  # 11 characters, 16 bytes


def test_missing_tun_module_is_explained(monkeypatch):
    monkeypatch.setattr("tunrelay.daemon.device._TUN_DEV", "/nonexistent/net/tun")
    with pytest.raises(DeviceError, match=r"device 'tun7': .* load the tun module: modprobe tun"):
        open_tun("tun7")


def test_unknown_mode_is_refused():
    with pytest.raises(DeviceError, match="mode must be 'tun' or 'tap', got 'tin'"):
        open_tun("x", "tin")


# -- with root, inside a namespace -----------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("mode", ["tun", "tap"])
def test_device_with_chosen_name_is_configured(testbed, mode):
    out = run_snippet(testbed, f"""
        cfg = DeviceConfig(
            name="trdev0", mode="{mode}", mtu=1300,
            addresses=ifaces("10.99.0.1/24", "fd00:99::1/64"),
            routes=nets("10.98.0.0/16", "fd00:98::/48"),
        )
        with Device(cfg) as dev:
            result = dict(
                name=dev.name, fd=dev.fd, ifindex=dev.ifindex,
                link=ip_json("-d", "link", "show", "dev", dev.name),
                addr=ip_json("addr", "show", "dev", dev.name),
                routes4=ip_json("-4", "route", "show", "dev", dev.name),
                routes6=ip_json("-6", "route", "show", "dev", dev.name),
            )
        result["closed_fd"] = dev.fd
        result["exists_after_close"] = exists("trdev0")
        print(json.dumps(result))
    """)
    assert out["name"] == "trdev0" and out["fd"] >= 0
    link = out["link"][0]
    assert link["ifindex"] == out["ifindex"]
    assert link["mtu"] == 1300
    assert "UP" in link["flags"]
    assert link["linkinfo"]["info_kind"] == "tun"
    assert link["linkinfo"]["info_data"]["type"] == mode
    assert link["linkinfo"]["info_data"]["pi"] is False  # IFF_NO_PI
    assert link["link_type"] == ("none" if mode == "tun" else "ether")
    assert addresses(out["addr"]) == {"10.99.0.1/24", "fd00:99::1/64"}
    v6 = [a for a in out["addr"][0]["addr_info"] if a["local"] == "fd00:99::1"][0]
    assert v6.get("nodad") is True and not v6.get("tentative")
    assert {r["dst"] for r in out["routes4"]} >= {"10.98.0.0/16", "10.99.0.0/24"}
    assert {r["dst"] for r in out["routes6"]} >= {"fd00:98::/48", "fd00:99::/64"}
    assert out["closed_fd"] == -1
    assert out["exists_after_close"] is False  # not persistent: gone with the fd


@pytest.mark.root
@pytest.mark.parametrize("mode", ["tun", "tap"])
def test_kernel_chooses_the_name(testbed, mode):
    out = run_snippet(testbed, f"""
        fd, name = open_tun("", "{mode}")
        link = ip_json("-d", "link", "show", "dev", name)
        second_fd, second = open_tun(mode="{mode}")
        import os
        os.close(fd); os.close(second_fd)
        print(json.dumps(dict(name=name, second=second, link=link, exists=exists(name))))
    """)
    assert out["name"] == f"{mode}0" and out["second"] == f"{mode}1"
    assert out["link"][0]["linkinfo"]["info_data"]["type"] == mode
    assert out["exists"] is False


@pytest.mark.root
def test_address_and_route_already_present_are_fine(testbed):
    out = run_snippet(testbed, """
        cfg = DeviceConfig(name="trdup", addresses=ifaces("10.97.0.1/24", "fd00:97::1/64"),
                           routes=nets("10.96.0.0/16", "fd00:96::/48"), persist=True)
        with Device(cfg):
            pass
        with Device(cfg) as dev:  # attaches again: address and routes are there already
            addr = ip_json("addr", "show", "dev", dev.name)
            routes = ip_json("route", "show", "dev", dev.name)
            routes += ip_json("-6", "route", "show", "dev", dev.name)
        delete_device("trdup")
        print(json.dumps(dict(addr=addr, routes=[r["dst"] for r in routes])))
    """)
    assert addresses(out["addr"]) == {"10.97.0.1/24", "fd00:97::1/64"}
    assert {"10.96.0.0/16", "fd00:96::/48"} <= set(out["routes"])


@pytest.mark.root
def test_persistent_device_stays_until_deleted(testbed):
    out = run_snippet(testbed, """
        with Device(DeviceConfig(name="trper", mode="tap", persist=True)):
            pass
        stays = exists("trper")
        persist = ip_json("-d", "link", "show", "dev", "trper")[0]["linkinfo"]["info_data"]["persist"]
        delete_device("trper")
        print(json.dumps(dict(stays=stays, persist=persist, gone=not exists("trper"),
                              again=error_of(delete_device, "trper"))))
    """)
    assert out["stays"] is True and out["persist"] is True
    assert out["gone"] is True
    assert out["again"] == "cannot delete device 'trper': no such device"


@pytest.mark.root
def test_owner_and_group_are_applied(testbed):
    out = run_snippet(testbed, """
        with Device(DeviceConfig(name="trown", owner=4321, group=8765, persist=True)):
            pass
        data = ip_json("-d", "link", "show", "dev", "trown")[0]["linkinfo"]["info_data"]
        delete_device("trown")
        print(json.dumps(data))
    """)
    assert out["user"] == 4321 and out["group"] == 8765  # numeric: no such accounts


@pytest.mark.root
def test_name_taken_by_the_other_mode(testbed):
    out = run_snippet(testbed, """
        fd, _ = open_tun("trtap", "tap")
        print(json.dumps(dict(
            as_tun=error_of(open_tun, "trtap", "tun"),
            busy=error_of(open_tun, "trtap", "tap"),
            multi=error_of(open_tun, "trtap", "tap", multi_queue=True),
        )))
    """)
    assert out["as_tun"] == "device 'trtap' exists and is a tap device, expected tun"
    assert out["busy"].startswith("device 'trtap' is busy: another process is already attached")
    assert out["multi"] == "device 'trtap' exists and is a single-queue tap device, expected multi-queue"


@pytest.mark.root
def test_name_taken_by_a_veth(testbed):
    out = run_snippet(testbed, f"""
        print(json.dumps(dict(
            error=error_of(open_tun, "{testbed.veth_a}", "tun"),
            device=error_of(Device(DeviceConfig(name="{testbed.veth_a}", mode="tap")).open),
            lo=error_of(open_tun, "lo"),
            invalid=error_of(open_tun, "a/b"),
        )))
    """)
    assert out["error"] == f"device '{testbed.veth_a}' exists and is a veth device, expected tun"
    assert out["device"] == f"device '{testbed.veth_a}' exists and is a veth device, expected tap"
    assert out["lo"] == "device 'lo' exists and is a non-TUN device, expected tun"
    assert out["invalid"].startswith("device name 'a/b' is not valid")


@pytest.mark.root
def test_failed_configuration_leaves_no_device(testbed):
    """A route clashing with the underlay's, an IPv6 address on a link too
    small for IPv6: DeviceError naming it, and the device is gone (even
    with persist, which is set last)."""
    out = run_snippet(testbed, """
        clash = DeviceConfig(name="trbad", routes=nets("198.18.0.0/24"), persist=True)
        route = error_of(Device(clash).open)
        route_left = exists("trbad")
        small = DeviceConfig(name="trbad", mtu=1200, addresses=ifaces("fd00:9::1/64"))
        address = error_of(Device(small).open)
        print(json.dumps(dict(route=route, route_left=route_left,
                              address=address, address_left=exists("trbad"))))
    """)
    assert out["route"] == (
        "device 'trbad': cannot add route 198.18.0.0/24: a route to it through another device exists"
    )
    assert out["address"].startswith("device 'trbad': cannot add address fd00:9::1/64:")
    assert "IPv6 needs an mtu of at least 1280" in out["address"]
    assert out["route_left"] is False and out["address_left"] is False


@pytest.mark.root
def test_close_is_idempotent_and_reopen_is_refused(testbed):
    out = run_snippet(testbed, """
        dev = Device(DeviceConfig(name="trcls"))
        dev.open()
        twice = error_of(dev.open)
        dev.close(); dev.close()
        print(json.dumps(dict(twice=twice, fd=dev.fd, exists=exists("trcls"))))
    """)
    assert out["twice"] == "device 'trcls' is already open"
    assert out["fd"] == -1 and out["exists"] is False


@pytest.mark.root
def test_multi_queue_device_has_one_fd_per_queue(testbed):
    out = run_snippet(testbed, """
        with Device(DeviceConfig(name="trmq", queues=3)) as dev:
            data = ip_json("-d", "link", "show", "dev", "trmq")[0]["linkinfo"]["info_data"]
            fds = list(dev.fds)
        print(json.dumps(dict(fds=fds, multi_queue=data["multi_queue"], exists=exists("trmq"))))
    """)
    assert len(set(out["fds"])) == 3
    assert out["multi_queue"] is True and out["exists"] is False


@pytest.mark.root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_missing_cap_net_admin_is_explained(testbed):
    drop = ("setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin")
    out = run_snippet(testbed, """
        print(json.dumps(dict(named=error_of(open_tun, "trcap"), any=error_of(open_tun, ""))))
    """, prefix=drop)
    for message in out.values():
        assert "operation not permitted; expected CAP_NET_ADMIN: run as root" in message
        assert "setcap cap_net_admin+ep " in message
        assert "ip tuntap add dev " in message
    assert out["named"].startswith("cannot create or attach tun device 'trcap'")
