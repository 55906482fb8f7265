"""The exception hierarchy of tunrelay.

Every message says what was expected and what was found.  The CLI maps
``ConfigError`` (and usage errors) to exit code 2 and every other
``TunrelayError`` to exit code 1, printing the message on one line.
"""

from __future__ import annotations


class TunrelayError(Exception):
    """Base class of every error tunrelay raises on purpose."""


class ConfigError(TunrelayError):
    """A configuration file is missing, unreadable or invalid.

    ``path`` is the file, ``key`` the dotted key (``transport.listen``) or
    ``None`` when the problem is the file itself.
    """

    def __init__(self, path: str, key: str | None, message: str) -> None:
        self.path = path
        self.key = key
        self.message = message
        where = f"{path}: [{key.rsplit('.', 1)[0]}] {key.rsplit('.', 1)[-1]}" if key and "." in key else (
            f"{path}: {key}" if key else path
        )
        super().__init__(f"{where}: {message}")


class DeviceError(TunrelayError):
    """A TUN/TAP device could not be created, attached or configured."""


class TransportError(TunrelayError):
    """A socket could not be opened, bound, connected or accepted."""


class PumpError(TunrelayError):
    """A pump loop stopped on an error it cannot recover from."""


class PumpArgumentError(TunrelayError, ValueError):
    """A pump (or a Keyring) was given what it cannot work with: a mode,
    MTU, batch, framing, key or peer out of range, or a socket that does
    not suit the framing.  Raised when the pump is made or ``attach()``ed,
    before any thread runs.  Also a ``ValueError``, as these were before."""


class EngineUnavailable(TunrelayError):
    """The TUN I/O engine asked for cannot run here: ``io="uring"`` where
    io_uring cannot be set up (a kernel without it, ``kernel.io_uring_disabled``,
    a seccomp filter).  ``io="auto"`` falls back to syscalls instead."""


class PumpStateError(TunrelayError, RuntimeError):
    """A pump call made in a state that does not allow it: ``start()`` on a
    running pump, ``attach()`` on one that is not stopped.  Also a
    ``RuntimeError``, as these were before."""
