"""systemd: the notification protocol (tunrelay/daemon/notify.py) and the
units in contrib/.

No systemd runs as PID 1 here, so systemd's side is played by what it
would be: an AF_UNIX datagram socket named in $NOTIFY_SOCKET (a path, or
an abstract name), read by a thread.  The root tests start `tunrelay run`
in network namespaces with that socket and $WATCHDOG_USEC, one of them
under the capability bounding set and no_new_privs of
contrib/tunrelay@.service (setpriv), and the units are checked with
`systemd-analyze verify`.

Every wait is bounded; the one cadence check has a wide margin (at least
2 pings in 3 s where one comes every 0.5 s).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from _root import REPO, bed, make_pair  # noqa: F401 (bed, make_pair: fixtures)

from tunrelay.daemon.config import loads
from tunrelay.daemon.notify import Notifier, Watchdog
from tunrelay.daemon.relay import SUPERVISOR_STALE_S, Relay
from tunrelay.testrig.pair import DEVICE, PORT
from tunrelay.wireguard.noise import generate_private_key, key_to_base64, private_to_public

CONTRIB = Path(REPO) / "contrib"
UNITS = ("tunrelay@.service", "tunrelay-wg-quick@.service")
WAIT_S = 20.0


# ---------------------------------------------------------------- systemd's side

@dataclass
class Message:
    at: float                # time.monotonic() when it arrived
    text: str
    fields: dict[str, str]


class Listener:
    """systemd's end of $NOTIFY_SOCKET: a datagram socket at ``address``
    ("/path" or "@abstract"); a thread collects the messages."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return  # shut down
            text = data.decode()
            fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
            with self._cond:
                self.messages.append(Message(time.monotonic(), text, fields))
                self._cond.notify_all()

    def wait_for(self, predicate, what: str, timeout: float = WAIT_S, start: int = 0) -> int:
        """The index of the first message from ``start`` on that satisfies
        ``predicate(message)``; fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(start, len(self.messages)):
                    if predicate(self.messages[i]):
                        return i
                left = deadline - time.monotonic()
                assert left > 0, f"no {what} within {timeout} s; got {self.texts()}"
                self._cond.wait(left)

    def has(self, key: str, start: int = 0) -> int:
        return self.wait_for(lambda m: key in m.fields, f"{key}=", start=start)

    def texts(self) -> list[str]:
        with self._cond:
            return [m.text for m in self.messages]

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)
        if not self.address.startswith("@"):
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pings(listener: Listener, start: int = 0, end: int | None = None) -> list[Message]:
    return [m for m in listener.messages[start:end] if m.fields.get("WATCHDOG") == "1"]


@pytest.fixture
def listener(tmp_path):
    with Listener(str(tmp_path / "notify")) as it:
        yield it


# ---------------------------------------------------------------- the protocol

def test_without_notify_socket_nothing_happens():
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.status("x") is False
    assert notifier.stopping() is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_period() is None
    watchdog = Watchdog(notifier, lambda: None)
    watchdog.start()
    assert not watchdog.enabled and watchdog._thread is None
    watchdog.stop()
    assert notifier.failures == 0


def test_messages_to_a_socket_path(listener):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": listener.address})
    assert notifier.ready("tun0 (tun, udp raw): running")
    assert notifier.status("a\nb")          # one line, whatever it is given
    assert notifier.watchdog()
    assert notifier.stopping("tun0: stopping")
    listener.wait_for(lambda m: "STOPPING" in m.fields, "STOPPING=1")
    assert listener.texts() == ["READY=1\nSTATUS=tun0 (tun, udp raw): running", "STATUS=a b",
                                "WATCHDOG=1", "STOPPING=1\nSTATUS=tun0: stopping"]
    assert notifier.sent == 4 and notifier.failures == 0


def test_messages_to_an_abstract_socket():
    with Listener(f"@tunrelay-test-{os.getpid()}-{secrets.token_hex(4)}") as listener:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": listener.address})
        assert notifier.enabled
        assert notifier.ready()
        listener.has("READY")
        assert listener.texts() == ["READY=1"]


def test_status_is_sent_only_when_it_changes(listener):
    notifier = Notifier(listener.address)
    for text in ("listening", "listening", "connected", "connected", "listening"):
        notifier.status(text)
    notifier.send("X=1")  # a marker: everything before it has arrived
    listener.has("X")
    assert listener.texts() == ["STATUS=listening", "STATUS=connected", "STATUS=listening",
                                "X=1"]


def test_reloading_carries_the_monotonic_clock(listener):
    notifier = Notifier(listener.address)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    message = listener.messages[listener.has("RELOADING")]
    assert before <= int(message.fields["MONOTONIC_USEC"]) <= before + 60_000_000


def test_a_missing_socket_is_logged_once_and_never_raised(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="tunrelay.daemon.notify")
    missing = str(tmp_path / "nobody-listens")
    notifier = Notifier(missing)           # connect fails: logged
    for _ in range(3):
        assert notifier.ready("x") is False
        assert notifier.watchdog() is False
    warnings = [r for r in caplog.records if r.name == "tunrelay.daemon.notify"]
    assert len(warnings) == 1 and missing in warnings[0].getMessage()
    assert notifier.failures == 7


def test_the_socket_coming_back_is_reconnected(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="tunrelay.daemon.notify")
    path = str(tmp_path / "notify")
    first = Listener(path)
    notifier = Notifier(path)
    assert notifier.send("A=1")
    first.has("A")
    first.close()                          # systemd's socket goes away...
    assert notifier.send("B=1") is False
    with Listener(path) as second:         # ...and comes back (daemon-reexec)
        assert notifier.send("C=1")
        second.has("C")
        assert second.texts() == ["C=1"]
    assert len(caplog.records) == 1


@pytest.mark.parametrize("address", ["relative/notify", "vsock:2:1234"])
def test_an_address_of_another_kind_turns_notification_off(address, caplog):
    caplog.set_level(logging.WARNING, logger="tunrelay.daemon.notify")
    notifier = Notifier(address, watchdog_usec="1000000")
    assert not notifier.enabled and notifier.watchdog_period() is None
    assert notifier.ready() is False
    assert "NOTIFY_SOCKET" in caplog.text


@pytest.mark.parametrize("usec, pid, period", [
    (None, None, None),
    ("1000000", None, 0.5),
    ("30000000", "self", 15.0),
    ("1000000", "1", None),        # meant for another process
    ("0", None, None),
    ("soon", None, None),
])
def test_watchdog_period(listener, usec, pid, period):
    pid = str(os.getpid()) if pid == "self" else pid
    env = {"NOTIFY_SOCKET": listener.address}
    env.update({k: v for k, v in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)) if v})
    assert Notifier.from_environ(env).watchdog_period() == period


# ---------------------------------------------------------------- the watchdog

class FakeNotifier:
    enabled = True

    def __init__(self, period: float | None = 1.0) -> None:
        self.period = period
        self.pings = 0

    def watchdog_period(self):
        return self.period

    def watchdog(self) -> bool:
        self.pings += 1
        return True


def test_watchdog_pings_every_period_while_healthy_and_never_when_not(caplog):
    caplog.set_level(logging.INFO, logger="tunrelay.daemon.notify")
    notifier, trouble = FakeNotifier(period=1.0), [None]
    watchdog = Watchdog(notifier, lambda: trouble[0], retry=0.2)
    assert watchdog.step(100.0) == 1.0 and notifier.pings == 1      # at once
    assert watchdog.step(100.4) == pytest.approx(0.6) and notifier.pings == 1
    assert watchdog.step(101.0) == 1.0 and notifier.pings == 2
    trouble[0] = "the pump of queue 0 ended"
    for now in (102.0, 102.2, 102.4, 102.9):
        assert watchdog.step(now) == 0.2                            # looks again soon
    assert notifier.pings == 2 and "not pinging" not in caplog.text
    assert watchdog.step(103.0) == 0.2                              # a period late: say why
    assert watchdog.step(103.2) == 0.2
    assert notifier.pings == 2
    assert caplog.text.count("watchdog: not pinging systemd: the pump of queue 0 ended") == 1
    trouble[0] = None
    assert watchdog.step(103.4) == 1.0 and notifier.pings == 3      # at once when healthy
    assert "healthy again" in caplog.text


def test_a_failing_health_check_counts_as_trouble():
    notifier = FakeNotifier()

    def broken():
        raise RuntimeError("bug")

    watchdog = Watchdog(notifier, broken)
    watchdog.step(0.0)
    assert notifier.pings == 0


def test_watchdog_thread_pings_the_socket_and_stops(listener):
    notifier = Notifier(listener.address, watchdog_usec="200000")   # a ping every 0.1 s
    watchdog = Watchdog(notifier, lambda: None)
    watchdog.start()
    try:
        listener.wait_for(lambda m: len(pings(listener)) >= 3, "3 pings")
    finally:
        watchdog.stop()
    assert watchdog._thread is None
    notifier.send("END=1")
    listener.has("END")
    assert len(pings(listener)) == watchdog.pings


def test_watchdog_on_an_event_loop(listener):
    notifier = Notifier(listener.address, watchdog_usec="200000")

    async def main():
        task = asyncio.ensure_future(Watchdog(notifier, lambda: None).run_async())
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: listener.wait_for(lambda m: len(pings(listener)) >= 2, "2 pings"))
        task.cancel()

    asyncio.run(main())


class FakePump:
    def __init__(self, running: bool = True) -> None:
        self.running = running


def test_relay_health_as_the_watchdog_sees_it():
    relay = Relay(loads('[device]\nname = "t0"\n[relay]\nengine = "python"\n'))
    assert relay.trouble() is None                 # waiting for a peer is healthy
    relay.pumps = [FakePump(), FakePump()]
    relay._pumping, relay._beat = True, time.monotonic()
    assert relay.trouble() is None
    relay.pumps[1].running = False
    assert relay.trouble() == "the pump of queue 1 ended"
    relay.pumps[1].running = True
    relay._beat = time.monotonic() - SUPERVISOR_STALE_S - 1
    assert "supervisor has not looked" in relay.trouble()
    relay._device_lost = True
    assert "is gone" in relay.trouble()
    relay.pumps = []
    relay.stop()
    assert relay.trouble() == "stopping"


# ---------------------------------------------------------------- tunrelay run

def notify_env(listener: Listener, watchdog_usec: int = 1_000_000) -> dict[str, str]:
    return {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": str(watchdog_usec)}


def device_exists(bed, ns: str, name: str) -> bool:
    return bed.run(ns, ["ip", "link", "show", name], capture_output=True).returncode == 0


def assert_watchdog_cadence(listener: Listener, ready: int) -> None:
    """WATCHDOG_USEC=1 s: a ping every 0.5 s.  At least 2 in the 3 s after
    READY=1 (a wide margin), and not a flood."""
    deadline = listener.messages[ready].at + 3.0
    time.sleep(max(0.0, deadline - time.monotonic()))
    window = [m for m in pings(listener, ready) if m.at <= deadline]
    assert 2 <= len(window) <= 20, f"{len(window)} pings in 3 s: {listener.texts()}"


def assert_clean_stop(listener: Listener, stop) -> None:
    """Stop (a callable returning the exit status once the relay exited):
    exit 0, STOPPING=1 came, and no ping after it."""
    assert stop() == 0
    # Everything the relay sent is queued before this marker.
    Notifier(listener.address).send("MARKER=1")
    end = listener.has("MARKER")
    stopping = listener.has("STOPPING")
    assert listener.messages[stopping].fields["STATUS"].endswith(": stopping")
    assert not pings(listener, stopping, end), listener.texts()


@pytest.mark.root
def test_udp_relay_ready_status_watchdog_stopping(bed, make_pair):
    pair = make_pair()
    with Listener(os.path.join(pair.workdir, "notify")) as listener:
        pair.start_side("a", wait=False, env=notify_env(listener))   # b is not needed
        ready = listener.has("READY")
        assert ready == 0, listener.texts()                 # nothing before READY=1
        # READY=1 came after the device and the control socket were made.
        assert device_exists(bed, bed.ns_a, DEVICE)
        assert pair.stats("a")["device"] == DEVICE
        status = listener.messages[ready].fields["STATUS"]
        assert status == (f"{DEVICE} (tun, udp raw): listening on {bed.addr_a}:{PORT}, "
                          f"peer {bed.addr_b}:{PORT}"), status
        assert_watchdog_cadence(listener, ready)
        assert_clean_stop(listener, lambda: pair.stop("a"))


@pytest.mark.root
def test_tcp_server_status_follows_the_connection(bed, make_pair):
    pair = make_pair(protocol="tcp")
    with Listener(os.path.join(pair.workdir, "notify")) as listener:
        pair.start_side("a", wait=False, env=notify_env(listener))     # the server
        ready = listener.has("READY")
        waiting = f"{DEVICE} (tun, tcp len16): listening on {bed.addr_a}:{PORT}, waiting for a peer"
        assert listener.messages[ready].fields["STATUS"] == waiting
        # No peer yet: the relay does its job (it waits), so it is pinged for.
        listener.wait_for(lambda m: len(pings(listener, ready)) >= 2, "2 pings while waiting")
        pair.start_side("b")
        connected = listener.wait_for(
            lambda m: m.fields.get("STATUS", "").startswith(
                f"{DEVICE} (tun, tcp len16): connected to {bed.addr_b}:"), "STATUS=connected")
        assert listener.messages[connected].fields["STATUS"].endswith("(connection 1)")
        listener.wait_for(lambda m: len(pings(listener, connected)) >= 2, "2 pings while connected")
        assert pair.stop("b") == 0
        listener.wait_for(lambda m: m.fields.get("STATUS") == waiting, "STATUS=waiting again",
                          start=connected + 1)
        assert_clean_stop(listener, lambda: pair.stop("a"))


def unit_settings(unit: str) -> dict[str, str]:
    """The [Service] settings of a unit in contrib/ (the last of each key)."""
    settings, section = {}, None
    for line in (CONTRIB / unit).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings[key] = value
    return settings


def as_in_the_unit(unit: str, drop: tuple[str, ...] = ()) -> tuple[str, ...]:
    """setpriv arguments giving a command what the unit gives the relay:
    its capability bounding set (less ``drop``), no inheritable or ambient
    capabilities, and no_new_privs when NoNewPrivileges=yes."""
    settings = unit_settings(unit)
    caps = [c.lower().removeprefix("cap_") for c in settings["CapabilityBoundingSet"].split()]
    assert "AmbientCapabilities" not in settings
    prefix = ["setpriv", "--bounding-set=-all" + "".join(f",+{c}" for c in caps if c not in drop),
              "--inh-caps=-all", "--ambient-caps=-all"]
    if settings.get("NoNewPrivileges") == "yes":
        prefix.append("--no-new-privs")
    return (*prefix, "--")


def status_field(pid: int, field: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].split()[0]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


NOBODY = {"security": ['user = "nobody"', 'group = "nogroup"']}


@pytest.mark.root
def test_under_the_units_capabilities_the_relay_drops_to_its_user_and_notifies(bed, make_pair):
    # The notification socket sits in a directory only root can enter
    # (mkdtemp: 0700): connected before the switch, it keeps working after.
    pair = make_pair(overrides_a=NOBODY)
    with Listener(os.path.join(pair.workdir, "notify")) as listener:
        pair.start_side("a", wait=False, env=notify_env(listener),
                        prefix=as_in_the_unit("tunrelay@.service"))
        ready = listener.has("READY")
        pid = pair.sides["a"].proc.pid
        assert status_field(pid, "Uid") == "65534" and status_field(pid, "CapEff") == "0" * 16
        assert status_field(pid, "NoNewPrivs") == "1"
        assert "running as uid 65534 gid 65534" in pair.log("a")
        listener.wait_for(lambda m: len(pings(listener, ready)) >= 2, "2 pings as nobody")
        assert_clean_stop(listener, lambda: pair.stop("a"))


@pytest.mark.root
def test_without_setuid_and_setgid_the_switch_to_the_user_fails(bed, make_pair):
    # Why the unit keeps CAP_SETUID and CAP_SETGID in its bounding set.
    pair = make_pair(overrides_a=NOBODY)
    prefix = as_in_the_unit("tunrelay@.service", drop=("setuid", "setgid"))
    done = bed.run(bed.ns_a, [*prefix, sys.executable, "-m", "tunrelay", "run", "--config",
                              pair.sides["a"].config_path],
                   capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "cannot switch to uid 65534" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.root
def test_wireguard_run_ready_status_watchdog_stopping(bed, tmp_path):
    workdir = Path(tmp_path)
    key = workdir / "a.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, (key_to_base64(generate_private_key()) + "\n").encode())
    os.close(fd)
    device = f"{bed.base}w"
    control = f"/tmp/{bed.base}.sock"                     # short: sun_path
    config = workdir / "wg.toml"
    config.write_text(f"""\
[device]
name = "{device}"
address = "10.67.0.1/24"

[transport]
framing = "wireguard"
listen = "{bed.addr_a}:51820"

[wireguard]
private_key_file = "{key}"

[stats]
socket = "{control}"

[[peer]]
name = "far"
public_key = "{key_to_base64(private_to_public(generate_private_key()))}"
allowed_ips = ["10.67.0.2/32"]
""")
    log = open(workdir / "wg.log", "wb")
    with Listener(str(workdir / "notify")) as listener:
        proc = bed.popen(bed.ns_a, [sys.executable, "-m", "tunrelay", "run", "--config",
                                    str(config)],
                         stdout=log, stderr=subprocess.STDOUT,
                         env={**os.environ, **notify_env(listener)})
        try:
            ready = listener.has("READY")
            assert device_exists(bed, bed.ns_a, device)
            assert listener.messages[ready].fields["STATUS"] == (
                f"{device} (tun, udp wireguard): listening on port 51820, 1 peer, "
                "0 with a handshake")
            assert_watchdog_cadence(listener, ready)

            def stop():
                proc.send_signal(signal.SIGTERM)
                return proc.wait(15)

            assert_clean_stop(listener, stop)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
            print((workdir / "wg.log").read_text())


# ---------------------------------------------------------------- the units

def _tool(name: str) -> str:
    """A systemd tool; skipped when missing, except under CI=true, whose
    machine installs systemd (make testdeps)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package systemd)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def verify(unit: str, directory: Path, extra: str = "") -> list[str]:
    """`systemd-analyze verify` on a copy of a contrib/ unit (plus ``extra``
    lines) as instance "test": what it says about tunrelay.  verify checks
    that ExecStart's program exists, so this checkout's tunrelay (the
    virtual environment's) stands in for /usr/local/bin's."""
    analyze = _tool("systemd-analyze")
    text = (CONTRIB / unit).read_text()
    assert text.count("ExecStart=/usr/local/bin/tunrelay run ") == 1
    tunrelay = shutil.which("tunrelay", path=os.path.dirname(sys.executable)) or \
        shutil.which("tunrelay")
    if tunrelay is None:
        pytest.fail("no tunrelay executable beside the interpreter or on PATH", pytrace=False)
    (directory / unit).write_text(text.replace("/usr/local/bin/tunrelay", tunrelay) + extra)
    instance = directory / unit.replace("@.", "@test.")
    done = subprocess.run([analyze, "verify", "--man=no", str(instance)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # Warnings (unknown keys, bad values) go to stderr with exit 0.
    return [line for line in done.stderr.splitlines() if "tunrelay" in line]


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(unit, tmp_path):
    said = verify(unit, tmp_path)
    assert not said, "\n".join(said)


def test_systemd_analyze_verify_would_say_so(tmp_path):
    # The check above is not vacuous: a misspelt setting is reported.
    said = verify(UNITS[0], tmp_path, extra="[Service]\nProtectSytem=strict\n")
    assert any("ProtectSytem" in line for line in said), said


def test_units_agree_on_everything_but_what_they_run():
    first, second = (unit_settings(unit) for unit in UNITS)
    assert first.pop("ExecStart").endswith(" run --config /etc/tunrelay/%i.toml")
    assert second.pop("ExecStart").endswith(
        " run --wg-config /etc/wireguard/%i.conf --user tunrelay")
    assert first == second
    assert first["Type"] == "notify" and "WatchdogSec" in first
    assert first["CapabilityBoundingSet"] == "CAP_NET_ADMIN CAP_SETUID CAP_SETGID"


def test_sysusers_file_makes_the_user(tmp_path):
    sysusers = _tool("systemd-sysusers")
    if os.geteuid() != 0:
        pytest.skip("systemd-sysusers --root needs root here")
    (tmp_path / "etc").mkdir()
    done = subprocess.run([sysusers, f"--root={tmp_path}", str(CONTRIB / "tunrelay.sysusers")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert re.search(r"^tunrelay:x:\d+:\d+:tunrelay packet relay:/:/usr/sbin/nologin$",
                     passwd, re.MULTILINE), passwd
