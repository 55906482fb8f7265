"""aead.load_key: the key file is opened without following a link, then
checked on the open file (type, owner, mode), then read from that same file.

Pure Python (tunrelay.aead is standard library only); the owner test needs
root to give a file away, and is skipped without it.
"""

from __future__ import annotations

import base64
import os
import threading
from pathlib import Path

import pytest

from tunrelay import aead
from tunrelay.errors import ConfigError

CONFIG = "/etc/tunrelay/relay.toml"


def key_file(directory: Path, mode: int = 0o600, name: str = "relay.key") -> Path:
    path = directory / name
    path.write_text(aead.genkey() + "\n")
    os.chmod(path, mode)
    return path


def refused(path: Path) -> str:
    """The message load_key refuses ``path`` with; it names config and key."""
    with pytest.raises(ConfigError) as info:
        aead.load_key(str(path), CONFIG)
    assert info.value.key == "security.key_file"
    message = str(info.value)
    assert message.startswith(f"{CONFIG}: [security] key_file: key file {path} ")
    return message


def test_an_owner_only_regular_file_is_read(tmp_path):
    path = key_file(tmp_path)
    assert aead.load_key(str(path), CONFIG) == base64.b64decode(path.read_text())


def test_a_symlink_is_refused_even_to_a_good_key(tmp_path):
    target = key_file(tmp_path)
    link = tmp_path / "link.key"
    link.symlink_to(target)
    message = refused(link)
    assert "is a symbolic link" in message and "links are not followed" in message
    assert f"set key_file to {target}" in message


def test_a_dangling_symlink_is_refused_as_a_link(tmp_path):
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "nowhere.key")
    assert "is a symbolic link" in refused(link)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o610])
def test_group_or_other_bits_are_refused(tmp_path, mode):
    path = key_file(tmp_path, mode)
    message = refused(path)
    assert f"(mode {mode:o})" in message and f"expected 600: chmod 600 {path}" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another uid needs root")
def test_a_file_owned_by_another_user_is_refused(tmp_path):
    path = key_file(tmp_path)
    os.chown(path, 12345, -1)
    message = refused(path)
    assert f"is owned by uid 12345; expected uid {os.geteuid()}" in message
    assert f"chown {os.geteuid()} {path}" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another uid needs root")
def test_owned_by_the_effective_user_or_root(tmp_path, monkeypatch):
    """The relay's own user (geteuid, faked here) may own the key, and
    root may: nobody else."""
    path = key_file(tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 12345)
    assert len(aead.load_key(str(path))) == 32  # root's file
    os.chown(path, 12345, -1)
    assert len(aead.load_key(str(path))) == 32  # its own
    monkeypatch.setattr(os, "geteuid", lambda: 54321)
    assert "is owned by uid 12345; expected uid 54321" in refused(path)


def test_a_directory_is_refused(tmp_path):
    path = tmp_path / "relay.key"
    path.mkdir(mode=0o700)
    assert "is a directory; expected a regular file" in refused(path)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    path = tmp_path / "relay.key"
    os.mkfifo(path, 0o600)
    outcome: list = []

    def load() -> None:
        try:
            aead.load_key(str(path), CONFIG)
        except ConfigError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        # Blocked in open(): a writer lets it go, so the thread ends.
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(10)
        pytest.fail("load_key blocked opening a FIFO")
    assert len(outcome) == 1 and "is a FIFO; expected a regular file" in str(outcome[0])


def test_the_file_checked_is_the_file_read(tmp_path, monkeypatch):
    """Swapping the path for a world-readable file between the check and
    the read gains nothing: both are made through one descriptor."""
    path = key_file(tmp_path)
    good = aead.load_key(str(path))
    other = key_file(tmp_path, 0o644, "other.key")
    swapped: list = []

    def check_then_swap(real):
        def checked(*args, **kwargs):
            info = real(*args, **kwargs)
            if not swapped:
                swapped.append(True)
                os.replace(other, path)
            return info
        return checked

    monkeypatch.setattr(os, "stat", check_then_swap(os.stat))
    monkeypatch.setattr(os, "fstat", check_then_swap(os.fstat))
    assert aead.load_key(str(path)) == good
    assert swapped and (path.stat().st_mode & 0o777) == 0o644  # the swap happened
