"""Run a command where io_uring is refused, as a seccomp filter refuses it
(container runtimes' default profiles do): io_uring_setup(2) fails with the
errno given, every other system call is allowed.  Nothing outside the
command is touched (no sysctl).

    python tests/no_uring.py EPERM -- python -m tunrelay run --config relay.toml
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
BPF_LD_W_ABS = 0x20      # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15         # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06         # BPF_RET | BPF_K
#: struct seccomp_data: nr at offset 0, arch at 4.  io_uring_setup is 425
#: on every architecture (the numbers were unified from 5.1 on).
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
NR_IO_URING_SETUP = 425


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def refuse_io_uring(err: int) -> None:
    arch = AUDIT_ARCH.get(platform.machine())
    if arch is None:
        raise SystemExit(f"no_uring: no seccomp filter for {platform.machine()}")
    program = [
        (BPF_LD_W_ABS, 0, 0, 4),                       # arch
        (BPF_JEQ_K, 0, 3, arch),                       # another ABI: allow
        (BPF_LD_W_ABS, 0, 0, 0),                       # syscall number
        (BPF_JEQ_K, 0, 1, NR_IO_URING_SETUP),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | err),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    prog = SockFprog(len(program), ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise SystemExit(f"no_uring: seccomp: {os.strerror(ctypes.get_errno())}")


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit(__doc__)
    refuse_io_uring(getattr(errno, argv[0]))
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
