"""Reload: a running relay re-reads its configuration file and applies
what can change live, as a whole or not at all.

What changes live:
- the ``[[peer]]`` tables of a relay that has them: peers added, removed,
  and changed (endpoint, allowed_ips, roaming), in one PeerTable batch
  (one publication of the routing snapshot);
- ``[stats] interval`` and ``[stats] log_level``.

Everything else needs a restart: the device, the socket, the framing, the
pumps (``[relay]``), the aead key (a Keyring's keys are fixed when it is
made, and every pump holds it), the control socket path, the user, the
``[metrics]`` listener.  A new file with any such change is refused,
naming the keys, and nothing of it is applied; so is a file that does not
load (its ConfigError).

``diff(old, new)`` compares two Configs; ``Reloader`` owns the sequence
load, diff, prepare (resolve endpoints: everything that can fail), apply.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, fields

from ..errors import ConfigError, TunrelayError
from .config import Config, PeerConfig, load

log = logging.getLogger("tunrelay.daemon.reload")

#: The keys a reload applies live (besides the [[peer]] tables).
LIVE_KEYS = ("stats.interval", "stats.log_level")
#: Dataclass fields whose key in the file is spelled otherwise.
_KEY_NAMES = {"device.addresses": "device.address"}
#: Fields that are no key of their own (derived, or read from a key file
#: and compared separately).
_NOT_KEYS = {"security.key", "wireguard.private_key"}
# [metrics] among them: its listener is bound with the sockets, before
# privileges are dropped, so a new address needs a restart.
_SECTIONS = ("device", "transport", "relay", "stats", "security", "wireguard", "metrics")


@dataclass
class Diff:
    """What differs between the running config and a new one.

    ``restart``: the keys whose change needs a restart (refused);
    ``live``: the keys applied live; ``added``, ``removed``, ``changed``:
    the [[peer]] tables by name (``changed`` with the keys of each)."""

    restart: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: dict[str, list[str]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.restart or self.live or self.added or self.removed or self.changed)

    def describe(self) -> str:
        """The live changes, for people: 'stats.interval; peer "x" added'."""
        parts = list(self.live)
        parts += [f"peer {name!r} added" for name in self.added]
        parts += [f"peer {name!r} removed" for name in self.removed]
        parts += [f"peer {name!r} changed ({', '.join(keys)})" for name, keys in self.changed.items()]
        return "; ".join(parts) or "nothing changed"


def diff(old: Config, new: Config) -> Diff:
    """Compare two loaded configs key by key."""
    d = Diff()
    for section in _SECTIONS:
        a, b = getattr(old, section), getattr(new, section)
        if a is None or b is None:
            if (a is None) != (b is None):
                d.restart.append(section)
            continue
        for f in fields(a):
            dotted = f"{section}.{f.name}"
            if dotted in _NOT_KEYS or getattr(a, f.name) == getattr(b, f.name):
                continue
            key = _KEY_NAMES.get(dotted, dotted)
            (d.live if key in LIVE_KEYS else d.restart).append(key)
    # The key bytes are compare=False in the dataclasses: compare them here
    # (a key file rewritten in place has the same path and a new key).
    if old.security.key != new.security.key and "security.key_file" not in d.restart:
        d.restart.append("security.key_file")
    if (old.wireguard is not None and new.wireguard is not None
            and old.wireguard.private_key != new.wireguard.private_key
            and "wireguard.private_key_file" not in d.restart):
        d.restart.append("wireguard.private_key_file")
    _diff_peers(old, new, d)
    return d


def _diff_peers(old: Config, new: Config, d: Diff) -> None:
    if bool(old.peers) != bool(new.peers):
        # One peer ([transport] peer or learned) <-> a PeerTable: another
        # kind of relay.
        d.restart.append("peer (from one peer to [[peer]] tables or back)")
        return
    if old.transport.framing == "wireguard" or new.transport.framing == "wireguard":
        # A WireGuard device (tunrelay/wireguard/run.py) does not reload.
        if old.peers != new.peers or _wg_keys(old) != _wg_keys(new):
            d.restart.append("peer (framing = \"wireguard\")")
        return
    before = {p.name: p for p in old.peers}
    after = {p.name: p for p in new.peers}
    d.removed = [name for name in before if name not in after]
    d.added = [name for name in after if name not in before]
    for name, peer in after.items():
        if name in before:
            keys = [k for k in ("endpoint", "allowed_ips", "roaming")
                    if getattr(before[name], k) != getattr(peer, k)]
            if keys:
                d.changed[name] = keys


def _wg_keys(cfg: Config) -> list:
    return [p.preshared_key for p in cfg.peers]


@dataclass
class Outcome:
    """A reload's result, as ``tunrelay reload`` reports it."""

    applied: bool
    message: str
    path: str = ""

    def to_dict(self) -> dict:
        return {"reload": "applied" if self.applied else "refused", "config": self.path,
                "message": self.message}


class _Reload:
    """The sequence both kinds of relay follow: read the file (a
    ConfigError refuses it), diff, refuse a restart-needing change,
    prepare (what can fail without having changed anything), apply (undone
    in full on a failure), then take the new config.  One reload at a time
    (SIGHUP and the control socket may race); one log line says how it went."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def reload(self) -> Outcome:
        with self._lock:
            path = self._path()
            outcome = self._reload(path)
            if outcome.applied:
                log.info("reload of %s: applied: %s", path, outcome.message)
            else:
                log.warning("reload of %s: refused, the running configuration stays: %s",
                            path, outcome.message)
            return outcome

    def _reload(self, path: str) -> Outcome:
        try:
            new = self._read(path)
        except ConfigError as exc:
            # The error without its leading path (the log line names the file).
            text = str(exc)
            return Outcome(False, text[len(path) + 2:] if text.startswith(path + ": ") else text,
                           path)
        d = self._diff(new)
        if d.restart:
            return Outcome(False, f"these keys need a restart: {', '.join(d.restart)}", path)
        if d.empty:
            return Outcome(True, "nothing changed", path)
        try:
            plan = self._prepare(new, d)
        except (TunrelayError, OSError, ValueError) as exc:
            return Outcome(False, str(exc), path)
        try:
            self._apply(new, d, plan)
        except Exception as exc:  # noqa: BLE001 (any failure: rolled back, as it was)
            return Outcome(False, f"applying the peers failed and was rolled back: {exc}", path)
        if "stats.log_level" in d.live:
            set_log_level(self._commit(new))
        else:
            self._commit(new)
        return Outcome(True, d.describe(), path)

    # What each kind of relay does at each step.
    def _path(self) -> str:
        raise NotImplementedError

    def _read(self, path: str):
        raise NotImplementedError

    def _diff(self, new) -> Diff:
        raise NotImplementedError

    def _prepare(self, new, d: Diff):
        return None

    def _apply(self, new, d: Diff, plan) -> None:
        raise NotImplementedError

    def _commit(self, new) -> str:
        """Take ``new`` as the running config; returns its log level."""
        raise NotImplementedError


class Reloader(_Reload):
    """Reloads ``relay`` (a daemon.relay.Relay) from ``relay.cfg.path``."""

    def __init__(self, relay) -> None:
        super().__init__()
        self.relay = relay

    def _path(self) -> str:
        return self.relay.cfg.path

    def _read(self, path: str) -> Config:
        return load(path)

    def _diff(self, new: Config) -> Diff:
        return diff(self.relay.cfg, new)

    def _apply(self, new: Config, d: Diff, plan) -> None:
        if plan is not None:
            apply_peers(self.relay.peers, plan)

    def _commit(self, new: Config) -> str:
        self.relay.cfg = new
        self.relay.reloaded()
        return new.stats.log_level

    def _prepare(self, new: Config, d: Diff) -> list | None:
        """The PeerTable changes, every endpoint resolved (the step that can
        fail: DNS), as (op, name, keywords)."""
        if not (d.added or d.removed or d.changed):
            return None
        if self.relay.peers is None:
            raise TunrelayError("this relay has no PeerTable to change")
        resolve = self.relay.resolve_endpoint
        after = {p.name: p for p in new.peers}
        plan: list = [("remove", name, {}) for name in d.removed]
        for name, keys in d.changed.items():
            peer: PeerConfig = after[name]
            kw: dict = {}
            if "endpoint" in keys:
                kw["endpoint"] = resolve(peer)
            if "allowed_ips" in keys:
                kw["allowed_ips"] = [str(n) for n in peer.allowed_ips]
            if "roaming" in keys:
                kw["roaming"] = peer.roaming
            plan.append(("update", name, kw))
        for name in d.added:
            peer = after[name]
            plan.append(("add", name, {"endpoint": resolve(peer), "roaming": peer.roaming,
                                       "allowed_ips": [str(n) for n in peer.allowed_ips]}))
        return plan


def apply_peers(table, plan: list) -> None:
    """Apply ``plan`` to the PeerTable in one batch: removals first, then
    the changed peers' networks released, then the updates, then the new
    peers (so networks can move between peers).  On any failure the table
    is put back as it was (a removed peer comes back under a new id, its
    counters from zero) before the batch publishes."""
    undo: list = []
    with table.batch():
        try:
            for op, name, _ in plan:
                if op == "remove":
                    pid = table.find(name)
                    info = table.info(pid)
                    table.remove(pid)
                    undo.append(("readd", name, info))
            for op, name, kw in plan:
                if op == "update" and "allowed_ips" in kw:
                    pid = table.find(name)
                    undo.append(("restore", name, table.info(pid)))
                    table.update(pid, allowed_ips=[])
            for op, name, kw in plan:
                if op == "update":
                    pid = table.find(name)
                    if "allowed_ips" not in kw:
                        undo.append(("restore", name, table.info(pid)))
                    table.update(pid, **kw)
            for op, name, kw in plan:
                if op == "add":
                    table.add(name, **kw)
                    undo.append(("drop", name, None))
        except BaseException:
            _undo(table, undo)
            raise


def _undo(table, undo: list) -> None:
    """Back to the state before apply_peers (networks released first)."""
    for op, name, _ in reversed(undo):
        if op == "drop":
            table.remove(table.find(name))
    for op, name, _ in reversed(undo):
        if op == "restore":
            table.update(table.find(name), allowed_ips=[])
    for op, name, info in reversed(undo):
        if op == "restore":
            table.update(table.find(name), endpoint=info["endpoint"],
                         allowed_ips=info["allowed_ips"], roaming=info["roaming"])
        elif op == "readd":
            table.add(name, endpoint=info["endpoint"], allowed_ips=info["allowed_ips"],
                      roaming=info["roaming"])


def set_log_level(name: str) -> None:
    """[stats] log_level: the level of every tunrelay logger."""
    logging.getLogger("tunrelay").setLevel(getattr(logging, name.upper()))


# ------------------------------------------------------------ WireGuard
#
# framing = "wireguard" (and `tunrelay run --wg-config`) runs a
# WireGuardDevice (tunrelay/wireguard/run.py), from a Settings.  Its peers
# change live through add_peer/remove_peer/set_peer; the rest of the
# Settings needs a restart.  Keys are named as in the TOML file.

#: Settings fields -> the key they come from (restart-needing ones).
_WG_RESTART = {"bind": "transport.listen", "offload": "relay.offload",
               "duplex": "relay.duplex", "busy_poll_us": "relay.busy_poll_us",
               "user": "security.user", "group": "security.group",
               "control_socket": "stats.socket", "kind": "the kind of file",
               "metrics": "metrics.listen"}
_WG_LIVE = {"stats_interval": "stats.interval", "log_level": "stats.log_level"}
_WG_PEER_KEYS = ("endpoint", "allowed_ips", "preshared_key", "persistent_keepalive")


def _wg_label(peer) -> str:
    import base64
    return peer.name or base64.b64encode(peer.public_key).decode()[:10] + "..."


def diff_wireguard(old, new) -> Diff:
    """Two wireguard.run.Settings compared.  A peer is its public key and
    name: another key (or name) under a name is that peer removed and a new
    one added."""
    d = Diff()
    if old.device != new.device:
        d.restart += [_KEY_NAMES.get(f"device.{f.name}", f"device.{f.name}")
                      for f in fields(old.device)
                      if getattr(old.device, f.name) != getattr(new.device, f.name)]
    if old.kind == "wg-quick" and "device.routes" in d.restart:
        d.restart[d.restart.index("device.routes")] = (
            "the routes of AllowedIPs (wg-quick's Table = auto; with Table = off peers and "
            "AllowedIPs change live)")
    for name, key in _WG_RESTART.items():
        if getattr(old, name) != getattr(new, name):
            d.restart.append(key)
    for name, key in _WG_LIVE.items():
        if getattr(old, name) != getattr(new, name):
            d.live.append(key)
    a, b = old.wg, new.wg
    if a.listen_port != b.listen_port and "transport.listen" not in d.restart:
        d.restart.append("transport.listen")
    if a.private_key != b.private_key:
        d.restart.append("wireguard.private_key_file")
    if a.fwmark != b.fwmark:
        d.restart.append("wireguard.fwmark")
    before = {(p.public_key, p.name): p for p in a.peers}
    after = {(p.public_key, p.name): p for p in b.peers}
    d.removed = [_wg_label(p) for k, p in before.items() if k not in after]
    d.added = [_wg_label(p) for k, p in after.items() if k not in before]
    for k, p in after.items():
        if k in before:
            keys = [key for key in _WG_PEER_KEYS if getattr(before[k], key) != getattr(p, key)]
            if keys:
                d.changed[_wg_label(p)] = keys
    return d


def apply_wg_peers(wg, old, new, d: Diff) -> None:
    """Bring the WireGuardDevice ``wg`` from the peers of WgConfig ``old``
    to those of ``new`` (``d`` their diff) in one batch: removed peers
    first (their keys and networks freed), then the new ones, then each
    changed or new peer's settings (set_peer moves a network between
    peers).  On a failure the device is put back as it was (a removed peer
    comes back without its sessions: it makes a new handshake)."""
    before = {_wg_label(p): p for p in old.peers}
    after = {_wg_label(p): p for p in new.peers}
    undo: list = []
    with wg.batch():
        try:
            for label in d.removed:
                wg.remove_peer(before[label].public_key)
                undo.append(("readd", before[label]))
            for label in d.added:
                wg.add_peer(after[label].public_key, after[label].name)
                undo.append(("drop", after[label]))
            for label, keys in d.changed.items():
                undo.append(("restore", before[label], keys))
                _wg_set(wg, after[label], keys)
            for label in d.added:
                _wg_set(wg, after[label], _WG_PEER_KEYS)
        except BaseException:
            for entry in reversed(undo):
                if entry[0] == "drop":
                    wg.remove_peer(entry[1].public_key)
                elif entry[0] == "restore":
                    _wg_set(wg, entry[1], entry[2])
            for entry in reversed(undo):
                if entry[0] == "readd":
                    wg.add_peer(entry[1].public_key, entry[1].name)
                    _wg_set(wg, entry[1], _WG_PEER_KEYS)
            raise


def _wg_set(wg, peer, keys) -> None:
    wg.set_peer(peer.public_key, **{key: getattr(peer, key) for key in keys})


class WgReloader(_Reload):
    """Reloads a wireguard.run.WgRunner from its file (TOML or wg-quick,
    as it was started), on the runner's event loop (the device's owner)."""

    def __init__(self, runner) -> None:
        super().__init__()
        self.runner = runner

    def _path(self) -> str:
        return self.runner.settings.source

    def _read(self, path: str):
        return self.runner.reread()

    def _diff(self, new) -> Diff:
        return diff_wireguard(self.runner.settings, new)

    def _apply(self, new, d: Diff, plan) -> None:
        apply_wg_peers(self.runner.wg, self.runner.settings.wg, new.wg, d)

    def _commit(self, new) -> str:
        self.runner.settings = new
        return new.log_level
