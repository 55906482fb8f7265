# cython: language_level=3
"""The compiled fast path: a pump moving packets between a TUN/TAP fd and a
UDP or TCP socket fd, one GIL-free C loop per direction.

Layout: ``_validate.pxi`` (checks and len16 parsing), ``_offload.pxi``
(segmenting TUN super-packets, coalescing TCP segments back), ``_loops.pxi``
(the egress and ingress loops), this file (the Python-visible ``Pump``: set-up,
threads, counters).  ``pypump.PyPump`` is the pure-Python twin.
"""

import collections
import contextlib
import hashlib
import ipaddress
import os
import socket
import time

from tunrelay import aead as _aead

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.errno cimport errno
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset
from posix.fcntl cimport F_GETFL, F_SETFL, O_NONBLOCK, fcntl
from posix.unistd cimport close

from tunrelay.includes.crypto cimport (
    EVP_CIPHER, EVP_CIPHER_CTX_free, EVP_CIPHER_CTX_new, EVP_DecryptInit_ex,
    EVP_EncryptInit_ex, EVP_MAC_CTX_free, EVP_MAC_CTX_new, EVP_aes_256_gcm,
    EVP_chacha20_poly1305, OPENSSL_cleanse)
from tunrelay.includes.system cimport posix_memalign, sendto

from tunrelay.includes.system cimport (
    AF_INET, AF_INET6, CMSG_SPACE, EFD_CLOEXEC, EFD_NONBLOCK, SOCK_STREAM,
    SO_DOMAIN, SO_TYPE, SOL_SOCKET, SOL_UDP, UDP_GRO, UDP_SEGMENT, eventfd, eventfd_read,
    eventfd_t, eventfd_write, getpeername, getsockopt, htons, ntohs, tr_load_acquire,
    setsockopt, IPPROTO_TCP, TCP_QUICKACK, sockaddr, sockaddr_in, sockaddr_in6, socklen_t, tr_monotonic)

from tunrelay import counters as _counters
from tunrelay._runner import (CLOSED, FATAL, PROTOCOL_ERROR, STOPPED,
                              LoopRunner, Outcome)
from tunrelay.errors import EngineUnavailable, PumpArgumentError, PumpStateError
from tunrelay.framing import (FRAMINGS, IO_ENGINES, MAX_BUSY_POLL_US, MAX_MTU, MIN_MTU, MODES,
                              PEER_FRAMINGS,
                              max_frame as _max_frame, mss_clamps as _mss_clamps)

include "_validate.pxi"
include "_offload.pxi"
include "_mss.pxi"
include "_aead.pxi"
include "_allowedips.pxi"
include "_peers.pxi"
include "_loops.pxi"
include "_uring.pxi"

if len(_counters.DROP_REASONS) != N_DROPS or len(_counters.ERROR_KINDS) != N_ERRORS:
    raise ImportError("tunrelay._fastpath was built against other counter names")

cdef enum:
    # One large recv per wake-up on TCP: many frames are parsed in place.
    STREAM_BUFFER = 256 * 1024
    MAX_BATCH = 1024

#: What io="auto" (tunrelay.framing.IO_ENGINES) picks where io_uring is available (by measurement:
#: benchmarks/RESULTS.md, issue 10).
AUTO_IO = "uring"

_STATUS_REASONS = {ST_STOPPED: STOPPED, ST_CLOSED: CLOSED,
                   ST_PROTOCOL: PROTOCOL_ERROR, ST_FATAL: FATAL}


def _fileno(obj):
    return obj if isinstance(obj, int) else obj.fileno()


cdef dict _snapshot(Counters *live, str direction):
    cdef Counters c
    memcpy(&c, live, sizeof(Counters))   # one consistent-enough copy, no lock
    result = {"packets": c.packets, "bytes": c.bytes, "batches": c.batches,
              "syscalls": c.syscalls, "wakeups": c.wakeups, "tun_io": c.tun_io,
              "mss_clamped": c.mss_clamped}
    result["drops"] = {reason: c.drops[_counters.DROP_REASONS.index(reason)]
                       for reason in _counters.DIRECTION_DROPS[direction]}
    result["errors"] = {kind: c.errors[i] for i, kind in enumerate(_counters.ERROR_KINDS)}
    result["last_errno"] = c.last_errno
    return result


cdef class Pump:
    """Moves packets between ``tun_fd`` and ``sock_fd`` until stopped.

    ``tun_fd``: a TUN/TAP fd opened with IFF_NO_PI (or, in tests, one end of
    a SOCK_SEQPACKET socketpair).  It is switched to non-blocking mode.
    ``sock_fd``: a UDP socket (framing "raw" by default) or a connected TCP
    socket (framing "len16").  ``peer``: for an unconnected UDP socket, the
    (host, port) to send to; datagrams from anyone else are dropped and
    counted.  Without a peer on an unconnected socket, the peer is learned
    from the first valid datagram.  Either argument may be an int or an
    object with ``fileno()``; the pump never closes them.  ``mss_clamp``:
    lower the MSS option of TCP SYNs and SYN-ACKs, both directions, to
    what fits ("auto": mtu - 40 for IPv4, mtu - 60 for IPv6), to one MSS,
    or to (IPv4, IPv6); None: off (see framing.mss_clamps).
    """

    def __cinit__(self, tun_fd, sock_fd, *, framing=None, mode="tun",
                  int mtu=1400, int batch=64, peer=None, bint offload=False,
                  key=None, cipher="chacha20-poly1305", role="a", bint gso=True,
                  PeerTable peers=None, bint duplex=False, int busy_poll_us=0, io="auto",
                  mss_clamp=None):
        cdef void *mem = NULL
        # 64-byte aligned: each direction's counters sit on lines of their own.
        if posix_memalign(&mem, 64, sizeof(PumpState)) != 0:
            raise MemoryError()
        self.st = <PumpState *>mem
        memset(self.st, 0, sizeof(PumpState))
        self.st.stop_fd = -1
        self.st.eg.reader = self.st.ing.reader = -1
        if mode not in MODES:
            raise PumpArgumentError(f"mode must be one of {MODES}, got {mode!r}")
        if io not in IO_ENGINES:
            raise PumpArgumentError(f"io must be one of {IO_ENGINES}, got {io!r}")
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise PumpArgumentError(f"mtu must be {MIN_MTU}..{MAX_MTU}, got {mtu}")
        if not 1 <= batch <= MAX_BATCH:
            raise PumpArgumentError(f"batch must be 1..{MAX_BATCH}, got {batch}")
        if not 0 <= busy_poll_us <= MAX_BUSY_POLL_US:
            raise PumpArgumentError(f"busy_poll_us must be 0..{MAX_BUSY_POLL_US}, got {busy_poll_us}")
        self.mode = mode
        self.mtu = mtu
        self.batch = batch
        self.duplex = duplex
        self.busy_poll_us = busy_poll_us
        self.st.duplex = duplex
        self.st.spin_s = busy_poll_us * 1e-6
        self.mss_clamp = _mss_clamps(mss_clamp, mtu)
        self.st.mss_v4, self.st.mss_v6 = self.mss_clamp
        if offload and mode != "tun":
            raise PumpArgumentError("offload needs mode 'tun': TAP frames are not segmented here")
        if peers is not None:
            if mode != "tun":
                raise PumpArgumentError("peers need mode 'tun': routing is by inner IP address")
            if peer is not None or key is not None:
                raise PumpArgumentError("with peers=, endpoints and keys belong to the PeerTable "
                                        "(no peer= or key=)")
            framing = "raw" if framing is None else framing
            if framing not in PEER_FRAMINGS:
                raise PumpArgumentError(f"peers work with framing 'raw', 'len16' or 'session', "
                                        f"got {framing!r}")
        elif framing == "session":
            raise PumpArgumentError("framing 'session' needs peers=<PeerTable> (its sessions)")
        self.offload = offload
        self.st.offload = offload
        self._gso = gso
        self.st.tap = mode == "tap"
        self.st.batch = batch
        self.st.max_frame = _max_frame(mode, mtu)
        self.st.cmsg_space = CMSG_SPACE(sizeof(int))
        self._size_slots()
        self._allocate_batch_buffers()
        self._allocate_stream_buffers()
        if offload:
            self._allocate_offload_scratch()
        self._link_messages()
        if peers is not None:
            self._setup_peers(peers, framing)
        self._setup_io(io)

        self.st.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.st.stop_fd < 0:
            raise OSError(errno, os.strerror(errno), "eventfd")

        self._tun_ref = tun_fd
        self.st.tun_fd = _fileno(tun_fd)
        flags = fcntl(self.st.tun_fd, F_GETFL)
        if flags < 0 or fcntl(self.st.tun_fd, F_SETFL, flags | O_NONBLOCK) < 0:
            raise OSError(errno, os.strerror(errno), "tun fd")
        self._runner = LoopRunner(self._run_direction, self._signal_stop,
                                  self._reset_stop, name="pump",
                                  directions=("duplex",) if duplex else ("egress", "ingress"))
        if framing == "aead":
            self._setup_aead(key, cipher, role)
        elif key is not None:
            raise PumpArgumentError("key is for framing 'aead'")
        self._attach(sock_fd, framing, peer)

    # ------------------------------------------------------------ allocation (once)

    cdef void _size_slots(self):
        """Slot sizes.  An offload TUN read is a virtio_net_hdr and up to
        64 KiB, a GRO receive up to 64 KiB of datagrams; one byte more than
        the longest shows truncation.  Egress slots have HEADROOM in front
        (a framing header is written there, not copied) and room behind
        the packet for a tag (and framing session's padding before it)."""
        cdef size_t longest_read = (VNET_HDR_LEN + IP_LENGTH_MAX if self.offload
                                    else self.st.max_frame)
        self.st.slot_size = (HEADROOM + longest_read + 1 + SESSION_PAD_MAX + AEAD_TAG_LEN
                             + 63) & ~(<size_t>63)
        self.st.ingress_slot = (IP_LENGTH_MAX + 1 if self.offload
                                else AEAD_OVERHEAD + self.st.max_frame + 1)
        if self.st.ingress_slot < CONTROL_SLOT + 1:
            # Control datagrams (handshakes) may be longer than a small MTU's.
            self.st.ingress_slot = CONTROL_SLOT + 1
        self.st.ing.stream_cap = STREAM_BUFFER
        # The longest record a len16 length can describe, with its length.
        self.st.eg.tail_cap = LEN16_HEADER + LEN16_LIMIT

    cdef int _allocate_batch_buffers(self) except -1:
        """Per direction, `batch` slots with their iovecs and mmsghdrs (and
        the egress GSO bookkeeping, and the receive addresses)."""
        cdef size_t batch = self.st.batch
        self.st.eg.slab = <uint8_t *>malloc(self.st.slot_size * batch)
        self.st.ing.slab = <uint8_t *>malloc(self.st.ingress_slot * batch)
        self.st.eg.iov = <iovec *>calloc(batch, sizeof(iovec))
        self.st.ing.iov = <iovec *>calloc(batch, sizeof(iovec))
        self.st.eg.msgs = <mmsghdr *>calloc(batch, sizeof(mmsghdr))
        self.st.eg.counts = <unsigned int *>calloc(batch, sizeof(unsigned int))
        self.st.eg.cmsg = <uint8_t *>calloc(batch, self.st.cmsg_space)
        self.st.ing.msgs = <mmsghdr *>calloc(batch, sizeof(mmsghdr))
        self.st.ing.names = <sockaddr_storage *>calloc(batch, sizeof(sockaddr_storage))
        # The coalescer's iovecs (offload) double as the one-packet write's.
        self.st.ing.out_iov = <iovec *>calloc(COALESCE_MAX + 2, sizeof(iovec))
        if (self.st.eg.slab == NULL or self.st.ing.slab == NULL
                or self.st.eg.iov == NULL or self.st.ing.iov == NULL
                or self.st.eg.msgs == NULL or self.st.ing.msgs == NULL
                or self.st.ing.names == NULL or self.st.eg.counts == NULL
                or self.st.eg.cmsg == NULL or self.st.ing.out_iov == NULL):
            raise MemoryError()
        return 0

    cdef int _allocate_stream_buffers(self) except -1:
        """TCP: the receive buffer parsed in place, and room for the rest of
        a record a stop cut (keep_tail)."""
        self.st.ing.stream_buf = <uint8_t *>malloc(STREAM_BUFFER)
        self.st.eg.stream_tail = <uint8_t *>malloc(self.st.eg.tail_cap)
        if self.st.ing.stream_buf == NULL or self.st.eg.stream_tail == NULL:
            raise MemoryError()
        return 0

    cdef int _allocate_offload_scratch(self) except -1:
        """Offloads: segment headers and their messages, GRO cmsgs and the
        coalescer's packet list (a few hundred KiB)."""
        self.st.eg.segs = <Segment *>calloc(SEG_POOL, sizeof(Segment))
        self.st.eg.seg_heads = <uint8_t *>malloc(SEG_POOL * SEG_HEAD_MAX)
        self.st.eg.seg_iov = <iovec *>calloc(3 * SEG_POOL, sizeof(iovec))
        self.st.eg.seg_msgs = <mmsghdr *>calloc(SEG_POOL, sizeof(mmsghdr))
        self.st.eg.msg_segs = <unsigned int *>calloc(SEG_POOL, sizeof(unsigned int))
        self.st.eg.seg_cmsg = <uint8_t *>calloc(SEG_POOL, self.st.cmsg_space)
        self.st.ing.gro_cmsg = <uint8_t *>calloc(self.st.batch, self.st.cmsg_space)
        self.st.ing.pkts = <Packet *>calloc(SEG_POOL, sizeof(Packet))
        if (self.st.eg.segs == NULL or self.st.eg.seg_heads == NULL or self.st.eg.seg_iov == NULL
                or self.st.eg.seg_msgs == NULL or self.st.eg.msg_segs == NULL
                or self.st.eg.seg_cmsg == NULL or self.st.ing.gro_cmsg == NULL
                or self.st.ing.pkts == NULL):
            raise MemoryError()
        return 0

    cdef void _link_messages(self):
        """Point each mmsghdr at its iovec (and address), and each ingress
        iovec at its slot: one byte more than the longest frame, so a longer
        datagram shows up as MSG_TRUNC or as oversize, never passes cut."""
        cdef unsigned int i
        for i in range(self.st.batch):
            self.st.eg.msgs[i].msg_hdr.msg_iov = &self.st.eg.iov[i]
            self.st.eg.msgs[i].msg_hdr.msg_iovlen = 1
            self.st.ing.iov[i].iov_base = self.st.ing.slab + <size_t>i * self.st.ingress_slot
            self.st.ing.iov[i].iov_len = self.st.ingress_slot
            self.st.ing.msgs[i].msg_hdr.msg_iov = &self.st.ing.iov[i]
            self.st.ing.msgs[i].msg_hdr.msg_iovlen = 1
            self.st.ing.msgs[i].msg_hdr.msg_name = &self.st.ing.names[i]

    cdef int _setup_io(self, str io) except -1:
        """The TUN I/O engine: "uring" gives the ingress loop an io_uring for
        its TUN writes (its own: whatever thread runs it, no other loop
        touches it); "syscalls" none.  io "auto" falls back to syscalls
        where io_uring cannot be set up (no io_uring: ENOSYS;
        kernel.io_uring_disabled or seccomp: EPERM); io "uring" then fails."""
        cdef int rc = 0
        self.io = "syscalls"
        if io == "syscalls" or (io == "auto" and AUTO_IO == "syscalls"):
            return 0
        rc = tunring_open(&self.st.ing.ur, URING_WRITES, True)
        if rc == 0:
            self.io = "uring"
            return 0
        if io == "uring":
            raise EngineUnavailable(
                f'io "uring": io_uring cannot be set up here (io_uring_queue_init: '
                f'{os.strerror(-rc)}; kernel.io_uring_disabled, a seccomp filter or a kernel '
                f'without io_uring); use io "auto" or "syscalls"')
        self.io_fallback = os.strerror(-rc)
        return 0

    def _setup_peers(self, PeerTable peers, str framing):
        """Per-slot destinations and peers, the session cipher contexts, and
        a reader epoch per loop in the table."""
        cdef size_t most = self.st.batch if self.st.batch > SEG_POOL else SEG_POOL
        peers._use_framing(framing)
        self.st.eg.dest = <sockaddr_storage *>calloc(self.st.batch, sizeof(sockaddr_storage))
        self.st.eg.peer = <PeerSlot **>calloc(self.st.batch, sizeof(PeerSlot *))
        self.st.eg.keys = <Keypair **>calloc(self.st.batch, sizeof(Keypair *))
        self.st.eg.dg_name = <sockaddr_storage **>calloc(most, sizeof(sockaddr_storage *))
        self.st.eg.dg_peer = <PeerSlot **>calloc(most, sizeof(PeerSlot *))
        self.st.eg.seal_ctx = EVP_CIPHER_CTX_new()
        self.st.ing.open_ctx = EVP_CIPHER_CTX_new()
        if (self.st.eg.dest == NULL or self.st.eg.peer == NULL
                or self.st.eg.keys == NULL or self.st.eg.dg_name == NULL
                or self.st.eg.dg_peer == NULL or self.st.eg.seal_ctx == NULL or self.st.ing.open_ctx == NULL):
            raise MemoryError()
        self.st.ing.gate_mac = EVP_MAC_CTX_new(peers.sh.blake2s)
        if self.st.ing.gate_mac == NULL:
            raise MemoryError()
        if EVP_EncryptInit_ex(self.st.eg.seal_ctx, peers.sh.evp, NULL, NULL, NULL) != 1 or \
                EVP_DecryptInit_ex(self.st.ing.open_ctx, peers.sh.evp, NULL, NULL, NULL) != 1:
            raise MemoryError()
        self.st.session = framing == "session"
        if self.st.session and self.offload:
            # One datagram per TSO segment, built whole before it is sealed
            # (see gather_segment): header, packet, padding, tag.
            self.st.eg.seg_sealed_slot = (SESSION_OVERHEAD + self.st.max_frame + SESSION_PAD_MAX
                                          + 63) & ~(<size_t>63)
            self.st.eg.seg_sealed = <uint8_t *>malloc(SEG_POOL * self.st.eg.seg_sealed_slot)
            if self.st.eg.seg_sealed == NULL:
                raise MemoryError()
        self.st.eg.reader = peers._register()
        self.st.ing.reader = peers._register()
        self.st.peers = peers.sh
        self.peers = peers

    def _setup_aead(self, key, str cipher, str role):
        """key: a Keyring (shared by the relay's queues), or the 32-byte
        PSK (then this pump gets a Keyring of its own, with `role`)."""
        cdef Keyring keyring
        if isinstance(key, Keyring):
            keyring = key
        elif isinstance(key, (bytes, bytearray)) and len(key) == _aead.KEY_LEN:
            keyring = Keyring(bytes(key), cipher, role)
        else:
            raise PumpArgumentError("framing 'aead' needs key=<32 bytes> or key=<Keyring>")
        self.keyring = keyring
        self.cipher = keyring.cipher
        cdef Aead *a = &self.st.aead
        a.shared = keyring.shared()
        opener_init(&self.st.ing.aead, a.shared.evp)
        sender_init(&self.st.eg.aead, a.shared, keyring.new_session())
        a.on = True

    def __dealloc__(self):
        if self.st == NULL:
            return
        EVP_CIPHER_CTX_free(self.st.eg.aead.ctx)   # NULL is fine
        opener_free(&self.st.ing.aead)
        EVP_CIPHER_CTX_free(self.st.eg.seal_ctx)
        EVP_CIPHER_CTX_free(self.st.ing.open_ctx)
        EVP_MAC_CTX_free(self.st.ing.gate_mac)
        if self.peers is not None:
            for reader in (self.st.eg.reader, self.st.ing.reader):
                if reader >= 0:
                    self.peers._unregister(reader)
        free(self.st.eg.dest)
        free(self.st.eg.peer)
        free(self.st.eg.keys)
        free(self.st.eg.dg_name)
        free(self.st.eg.dg_peer)
        if self.st.stop_fd >= 0:
            close(self.st.stop_fd)
        free(self.st.eg.slab)
        free(self.st.ing.slab)
        free(self.st.eg.iov)
        free(self.st.ing.iov)
        free(self.st.eg.msgs)
        free(self.st.eg.counts)
        free(self.st.eg.cmsg)
        free(self.st.ing.msgs)
        free(self.st.ing.names)
        free(self.st.ing.stream_buf)
        free(self.st.eg.stream_tail)
        free(self.st.ing.out_iov)
        free(self.st.eg.segs)
        free(self.st.eg.seg_heads)
        free(self.st.eg.seg_sealed)
        free(self.st.eg.seg_iov)
        free(self.st.eg.seg_msgs)
        free(self.st.eg.msg_segs)
        free(self.st.eg.seg_cmsg)
        free(self.st.ing.gro_cmsg)
        free(self.st.ing.pkts)
        tunring_close(&self.st.ing.ur)
        free(self.st)
        self.st = NULL

    # ------------------------------------------------------------ set-up

    def attach(self, sock_fd, *, peer=None):
        """Swap in a new socket (a TCP reconnect) while stopped.  Counters
        carry on; a partial len16 frame of the old stream is discarded."""
        self._attach(sock_fd, self.framing, peer)

    def _attach(self, sock_fd, framing, peer):
        if self._runner.running:
            raise PumpStateError("attach() needs a stopped pump")
        fd = _fileno(sock_fd)
        sock_type = _sockopt(fd, SO_TYPE)
        stream = sock_type == SOCK_STREAM
        if framing is None:
            framing = "len16" if stream else "raw"
        if framing not in FRAMINGS and not (framing == "session" and self.st.peers != NULL):
            raise PumpArgumentError(f"framing must be one of {FRAMINGS}, got {framing!r}")
        if stream and self.st.peers != NULL:
            raise PumpArgumentError("peers need a datagram (UDP) socket: one TCP connection "
                                    "reaches one peer")
        if stream and framing not in ("len16", "aead"):
            raise PumpArgumentError(f"a stream socket needs framing 'len16' or 'aead', "
                                    f"got {framing!r}: only length-prefixed records mark "
                                    "packet boundaries in a byte stream")
        aead = framing == "aead"
        if aead != bool(self.st.aead.on):
            raise PumpArgumentError("framing 'aead' is chosen when the pump is made (with its key)")
        self._sock_ref = sock_fd
        self.framing = framing
        self.st.sock_fd = fd
        self.st.stream = stream
        # A len16 length in front: every TCP record; UDP datagrams with len16.
        self.st.len16 = stream or framing == "len16"
        self.st.front = ((LEN16_HEADER if self.st.len16 else 0)
                         + (AEAD_HEADER_LEN if aead else 0)
                         + (SESSION_HEADER_LEN if self.st.session else 0))
        self.st.overhead = ((LEN16_HEADER if self.st.len16 else 0)
                            + (AEAD_OVERHEAD if aead else 0)
                            + (SESSION_OVERHEAD if self.st.session else 0))
        if self.st.len16 and self.st.max_frame + self.st.overhead - LEN16_HEADER > LEN16_LIMIT:
            raise PumpArgumentError(f"mtu {self.mtu}: a len16 record holds at most "
                                    f"{LEN16_LIMIT} bytes, and a packet of this device "
                                    f"with its framing needs "
                                    f"{self.st.max_frame + self.st.overhead - LEN16_HEADER}")
        self.st.ing.stream_have = 0
        self.st.eg.tail_len = 0   # a new connection: the old one's half record is not owed to it
        self._inspect_socket(peer)
        self._set_udp_offloads()

    def _set_udp_offloads(self):
        """On a UDP socket: send runs of equal-sized datagrams with
        UDP_SEGMENT (unless gso=False; given up on the first EIO); with
        offloads also receive with UDP_GRO, where the kernel has them."""
        cdef int one = 1, size = 0
        cdef socklen_t length = sizeof(size)
        cdef unsigned int i
        self.st.gso = False
        self.st.gro = False
        self.st.quickack = False
        if self.st.stream:
            # A TCP socket takes TCP_QUICKACK; a Unix stream (the tests'
            # stand-in) refuses it, and then the loop never asks again.
            self.st.quickack = setsockopt(self.st.sock_fd, IPPROTO_TCP, TCP_QUICKACK,
                                          &one, sizeof(one)) == 0
            return
        if self._gso and _sockopt(self.st.sock_fd, SO_DOMAIN) in (AF_INET, AF_INET6):
            # getsockopt(UDP_SEGMENT) answers where the kernel has UDP GSO.
            self.st.gso = getsockopt(self.st.sock_fd, SOL_UDP, UDP_SEGMENT, &size, &length) == 0
        if not self.st.offload:
            return
        self.st.gro = setsockopt(self.st.sock_fd, SOL_UDP, UDP_GRO, &one, sizeof(one)) == 0
        for i in range(self.st.batch):
            self.st.ing.msgs[i].msg_hdr.msg_control = (
                self.st.ing.gro_cmsg + i * self.st.cmsg_space if self.st.gro else NULL)
            self.st.ing.msgs[i].msg_hdr.msg_controllen = (
                self.st.cmsg_space if self.st.gro else 0)

    cdef int _inspect_socket(self, object peer) except -1:
        """Decide how datagram senders are checked: against a given peer, by
        the kernel (connected socket), or by learning the first one."""
        cdef sockaddr_storage connected
        cdef socklen_t length = sizeof(connected)
        self.st.check_peer = False
        self.st.learn_peer = False
        self.st.peer_known = 0
        if self.st.stream:
            if peer is not None:
                raise PumpArgumentError("peer is for datagram sockets; a TCP socket is already connected")
            return 0
        if self.st.peers != NULL:
            if peer is not None:
                raise PumpArgumentError("with peers=, endpoints belong to the PeerTable")
            self.peers._use_family(_sockopt(self.st.sock_fd, SO_DOMAIN))
            return 0  # each datagram's peer comes from the table
        if self.st.aead.on:
            # Datagrams from anywhere are tried: the peer is whoever
            # authenticates, and its endpoint roams with it (the Keyring's).
            # A configured peer is only where to send first.
            if peer is not None and self.keyring.endpoint is None:
                self.keyring.set_endpoint(_sockopt(self.st.sock_fd, SO_DOMAIN), peer)
            self.st.eg.endpoint_seen = 0
            self.st.peer_known = 0
            return 0
        if peer is not None:
            family = _sockopt(self.st.sock_fd, SO_DOMAIN)
            self.st.peer_len = _fill_sockaddr(&self.st.peer, family, peer)
            self.st.check_peer = True
            self.st.peer_known = 1
            return 0
        if getpeername(self.st.sock_fd, <sockaddr *>&connected, &length) == 0:
            return 0  # connected: the kernel only delivers the peer's datagrams
        self.st.learn_peer = True
        return 0

    # ------------------------------------------------------------ running

    def _signal_stop(self):
        eventfd_write(self.st.stop_fd, 1)

    def _reset_stop(self):
        cdef eventfd_t value
        eventfd_read(self.st.stop_fd, &value)  # EAGAIN when not set: fine

    def _run_direction(self, str direction):
        cdef int status
        cdef PumpState *st = self.st
        if direction == "duplex":
            with nogil:
                status = duplex_loop(st)
                if st.peers != NULL:
                    reader_idle(st.peers, st.eg.reader)
                    reader_idle(st.peers, st.ing.reader)
            if status == ST_STOPPED:
                return Outcome(STOPPED)
            if st.duplex_end:
                return Outcome(_STATUS_REASONS[status], "ingress", st.ing.exit_errno)
            return Outcome(_STATUS_REASONS[status], "egress", st.eg.exit_errno)
        if direction == "egress":
            with nogil:
                status = egress_loop(st)
                if st.peers != NULL:
                    reader_idle(st.peers, st.eg.reader)   # a stopped loop holds nothing
            err = st.eg.exit_errno
        else:
            st.ing.ur.queued = 0      # (a loop never ends with writes queued)
            st.ing.ur.iov_used = 0
            with nogil:
                status = ingress_loop(st)
                if st.peers != NULL:
                    reader_idle(st.peers, st.ing.reader)
            err = st.ing.exit_errno
        return Outcome(_STATUS_REASONS[status], direction, err)

    def start(self):
        """Start both loops: each in its own thread, or (duplex) both in one."""
        self._runner.start()

    def request_stop(self):
        """Signal both loops to end and return at once (signal-handler safe:
        one eventfd write).  stop() or wait() then joins them."""
        eventfd_write(self.st.stop_fd, 1)

    def stop(self, timeout=None):
        """Signal both loops and wait for them; returns the Outcome (or None
        if they did not end within ``timeout``).  Only then may the fds be
        closed."""
        return self._runner.stop(timeout)

    def wait(self, timeout=None):
        """Block until both loops ended (stop(), TCP peer gone, device gone);
        returns the Outcome, or None on timeout."""
        return self._runner.wait(timeout)

    def run(self):
        """start() then wait(): blocks until the pump ends."""
        self.start()
        return self.wait()

    @property
    def running(self):
        return self._runner.running

    # ------------------------------------------------------------ state

    def stats(self):
        """A snapshot of both directions' counters, read while running."""
        return {"egress": _snapshot(&self.st.eg.c, "egress"),
                "ingress": _snapshot(&self.st.ing.c, "ingress")}

    @property
    def peer(self):
        """The UDP peer as (host, port), given or learned (aead: where it is
        now, roaming); None otherwise."""
        if self.st.aead.on and not self.st.stream:
            return self.keyring.endpoint
        if self.st.stream or not tr_load_acquire(&self.st.peer_known):
            return None
        if not (self.st.check_peer or self.st.learn_peer):
            return None
        return _sockaddr_tuple(&self.st.peer)

    def send_control(self, address, data):
        """Send one datagram (a handshake, a cookie...) to ``address``
        (host, port) through the pump's own socket: the same port as the
        data.  Raises OSError when the socket refuses it (a full socket
        buffer is EAGAIN: control traffic is never queued here)."""
        cdef sockaddr_storage to
        cdef socklen_t to_len
        cdef const uint8_t[::1] view
        cdef ssize_t r
        cdef size_t length = len(data)
        if self.st.stream:
            raise PumpArgumentError("send_control() is for datagram sockets")
        to_len = _fill_sockaddr(&to, _sockopt(self.st.sock_fd, SO_DOMAIN), address)
        view = memoryview(data).cast("B") if length else memoryview(b"\0").cast("B")
        with nogil:
            r = sendto(self.st.sock_fd, &view[0], length, MSG_DONTWAIT | MSG_NOSIGNAL,
                       <sockaddr *>&to, to_len)
        if r < 0:
            raise OSError(errno, os.strerror(errno), "send_control")

    def send_keepalive(self, peer_id):
        """Send a peer a keepalive (framing "session": an empty packet sealed
        by the data path's counter, so no nonce is used twice) through this
        pump's socket.  It confirms a fresh session to a responder waiting
        for our first datagram, and keeps NAT mappings open."""
        if self.peers is None or not self.st.session:
            raise PumpArgumentError("send_keepalive() is for framing 'session' with peers=")
        datagram, endpoint = self.peers._keepalive(peer_id)
        self.send_control(endpoint, datagram)

    def send_packet(self, peer_id, packet):
        """Send a peer one IP packet from Python (framing "session"): sealed
        under its current session's next counter, padded like the loops
        pad, through this pump's socket to the peer's endpoint.  For the
        packets a control plane held while a handshake ran (Event
        "staged").  PumpStateError without a current session or endpoint;
        OSError when the socket refuses it."""
        if self.peers is None or not self.st.session:
            raise PumpArgumentError("send_packet() is for framing 'session' with peers=")
        if <size_t>len(packet) > self.st.max_frame:
            raise PumpArgumentError(f"packet of {len(packet)} bytes is longer than the MTU "
                                    f"({self.st.max_frame})")
        datagram, endpoint = self.peers._seal(peer_id, packet, self.st.max_frame)
        self.send_control(endpoint, datagram)

    @property
    def learns_peer(self):
        return bool(self.st.learn_peer)

    # ------------------------------------------------------------ test hooks

    def _feed(self, data, *, size_t segment=0, sender=None):
        """Test and fuzz hook: run `data` through the ingress checks and
        delivery exactly as a received message from the peer (holding
        datagrams of `segment` bytes back to back, as UDP_GRO delivers
        them; 0: one datagram).  Only while stopped; the TUN fd gets what
        passes.  Returns the outcome of the delivery (0 or -1)."""
        cdef const uint8_t[::1] view
        cdef size_t length = len(data)
        cdef int status
        cdef bint known
        cdef sockaddr_storage from_address
        if self._runner.running:
            raise PumpStateError("_feed() needs a stopped pump")
        if self.st.stream:
            raise PumpArgumentError("_feed() is for datagram pumps; use _feed_stream()")
        if length > self.st.ingress_slot:
            raise PumpArgumentError(f"at most {self.st.ingress_slot} bytes per message")
        if length:
            view = memoryview(data).cast("B")
            memcpy(self.st.ing.slab, &view[0], length)
        cdef socklen_t sender_len = self.st.peer_len
        memcpy(&from_address, &self.st.peer, sizeof(sockaddr_storage))
        if sender is not None:
            sender_len = _fill_sockaddr(&from_address, _sockopt(self.st.sock_fd, SO_DOMAIN), sender)
        elif self.st.peers != NULL:
            raise PumpArgumentError("_feed() on a pump with peers needs sender=(host, port)")
        known = tr_load_acquire(&self.st.peer_known)
        self.st.ing.npkts = 0
        # aead: no sender at all, so a fed datagram never moves the peer's
        # endpoint (it came from no address).
        cdef const sockaddr_storage *from_ = NULL if self.st.aead.on else &from_address
        with nogil:
            if self.st.peers != NULL:
                self.st.ing.snap = reader_enter(self.st.peers, self.st.ing.reader)
                self.st.ing.now = tr_monotonic()
            status = ingress_message(self.st, self.st.ing.slab, length, segment, False,
                                     from_, sender_len, &known)
            if status == 0:
                status = flush_packets(self.st)
            if self.st.peers != NULL:
                reader_idle(self.st.peers, self.st.ing.reader)
        return status

    def _feed_stream(self, data):
        """Test and fuzz hook: `data` as one recv() of a len16 stream, parsed
        and delivered by the TCP ingress code.  Returns "ok", "bad_length"
        (the connection would be closed) or "stopped"."""
        cdef const uint8_t[::1] view
        cdef size_t length = len(data)
        cdef int status
        if self._runner.running:
            raise PumpStateError("_feed_stream() needs a stopped pump")
        if not self.st.stream:
            raise PumpArgumentError("_feed_stream() is for stream pumps")
        if self.st.ing.stream_have + length > self.st.ing.stream_cap:
            raise PumpArgumentError("more than the stream buffer holds")
        if length:
            view = memoryview(data).cast("B")
            memcpy(self.st.ing.stream_buf + self.st.ing.stream_have, &view[0], length)
        self.st.ing.stream_have += length
        self.st.ing.npkts = 0
        with nogil:
            status = len16_consume(self.st.ing.stream_buf, &self.st.ing.stream_have,
                                   self.st.max_frame + self.st.overhead - LEN16_HEADER,
                                   stream_sink, self.st)
        if status == PARSE_BAD_LENGTH:
            self.st.ing.stream_have = 0  # the connection would be closed
            return "bad_length"
        return "stopped" if status == PARSE_SINK_STOP else "ok"

    @property
    def aead_session(self):
        """This sender's aead session id (hex), or None."""
        return bytes(self.st.eg.aead.session[:AEAD_SESSION_LEN]).hex() if self.st.aead.on else None

    @property
    def aead_peer_sessions(self):
        """How many peer sessions were accepted (a peer restart adds one);
        counted by the Keyring, so queues sharing one report the same."""
        return self.keyring.counts()["sessions"] if self.st.aead.on else 0

    def _set_send_counter(self, uint64_t counter):
        """Test hook: the next nonce of this pump's sending session (to
        reach the end of the counter space without 2^64 packets)."""
        if not self.st.aead.on:
            raise PumpArgumentError("_set_send_counter() is for aead pumps")
        self.st.eg.aead.counter = counter

    @property
    def offloads(self):
        """What the offload path uses now: {"vnet_hdr", "gso", "gro"} ("gso"
        is False for GSO_RETRY_S after the kernel refused a GSO send)."""
        return {"vnet_hdr": bool(self.st.offload),
                "gso": bool(self.st.gso) and tr_monotonic() >= self.st.eg.gso_retry_at,
                "gro": bool(self.st.gro)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


cdef int _sockopt(int fd, int option) except -1:
    cdef int value = 0
    cdef socklen_t length = sizeof(value)
    if getsockopt(fd, SOL_SOCKET, option, &value, &length) < 0:
        raise OSError(errno, os.strerror(errno), "sock fd")
    return value


cdef socklen_t _fill_sockaddr(sockaddr_storage *out, int family, peer) except 0:
    """(host, port[, flowinfo, scope_id]) -> sockaddr for a socket of
    `family`.  An IPv4 peer on an IPv6 socket becomes ::ffff:a.b.c.d, as the
    kernel reports it.  A link-local IPv6 peer needs its scope (the 4-tuple
    getaddrinfo gives, or "fe80::1%eth0"): without it the kernel cannot
    tell which link to use."""
    host, port = peer[0], int(peer[1])
    scope = int(peer[3]) if len(peer) > 3 else 0
    cdef sockaddr_in *v4 = <sockaddr_in *>out
    cdef sockaddr_in6 *v6 = <sockaddr_in6 *>out
    memset(out, 0, sizeof(sockaddr_storage))
    if not 0 < port < 65536:
        raise PumpArgumentError(f"peer port must be 1..65535, got {port}")
    if family == AF_INET:
        packed = socket.inet_pton(socket.AF_INET, host)
        v4.sin_family = AF_INET
        v4.sin_port = htons(port)
        memcpy(&v4.sin_addr, <const char *>packed, 4)
        return sizeof(sockaddr_in)
    if family == AF_INET6:
        if ":" not in host:
            host = "::ffff:" + host
        if "%" in host:
            host, _, name = host.partition("%")
            scope = int(name) if name.isdigit() else socket.if_nametoindex(name)
        packed = socket.inet_pton(socket.AF_INET6, host)
        v6.sin6_family = AF_INET6
        v6.sin6_port = htons(port)
        v6.sin6_scope_id = scope
        memcpy(&v6.sin6_addr, <const char *>packed, 16)
        return sizeof(sockaddr_in6)
    raise PumpArgumentError(f"a peer address needs an AF_INET or AF_INET6 socket, got family {family}")


cdef object _sockaddr_tuple(sockaddr_storage *address):
    """(host, port); an IPv6 address with a scope (link-local) as
    (host, port, 0, scope_id), the form socket and getaddrinfo use."""
    cdef sockaddr_in *v4 = <sockaddr_in *>address
    cdef sockaddr_in6 *v6 = <sockaddr_in6 *>address
    if address.ss_family == AF_INET:
        raw = PyBytes_FromStringAndSize(<char *>&v4.sin_addr, 4)
        return socket.inet_ntop(socket.AF_INET, raw), ntohs(v4.sin_port)
    raw = PyBytes_FromStringAndSize(<char *>&v6.sin6_addr, 16)
    host = socket.inet_ntop(socket.AF_INET6, raw)
    if v6.sin6_scope_id:
        return host, ntohs(v6.sin6_port), 0, v6.sin6_scope_id
    return host, ntohs(v6.sin6_port)


# ---------------------------------------------------------------- allowed IPs

cdef class PrefixTable:
    """Longest-prefix match of inner addresses to peers: the egress route
    lookup (destination -> peer) and the ingress source check.

    ``PrefixTable([(network, peer), ...])``: networks as strings or
    ipaddress objects ("10.0.0.0/8", "fd00::/64"; host bits set is an
    error, as is the same network twice); peers are indexes 0..2^32-2.
    Immutable once built: a change makes a new table (the loops pick up a
    new one by publication, never by change in place).
    """

    cdef AllowedIps t
    cdef readonly int prefixes
    cdef readonly uint64_t checksum   # of the last _time_lookups (keeps its loop honest)

    def __cinit__(self, entries=()):
        if trie_init(&self.t.v4, 32) != 0 or trie_init(&self.t.v6, 128) != 0:
            raise MemoryError()
        seen = set()
        cdef uint32_t peer
        cdef const uint8_t *packed
        for network, index in entries:
            net = ipaddress.ip_network(network)   # strict: host bits set -> ValueError
            if net in seen:
                raise PumpArgumentError(f"{net} is given twice (a prefix belongs to one peer)")
            seen.add(net)
            if not 0 <= index < 0xFFFFFFFF:
                raise PumpArgumentError(f"peer index must be 0..{0xFFFFFFFF - 1}, got {index}")
            peer = index + 1
            raw = net.network_address.packed
            packed = raw
            if trie_insert(&self.t.v4 if net.version == 4 else &self.t.v6, packed,
                           net.prefixlen, peer) != 0:
                raise MemoryError()
        self.prefixes = len(seen)

    def __dealloc__(self):
        trie_free(&self.t.v4)
        trie_free(&self.t.v6)

    def lookup(self, address):
        """The peer of the longest prefix containing ``address`` (a string
        or an ipaddress address), or None."""
        ip = ipaddress.ip_address(address)
        raw = ip.packed
        cdef const uint8_t *packed = raw
        cdef uint32_t peer = trie_lookup(&self.t.v4 if ip.version == 4 else &self.t.v6, packed)
        return None if peer == NO_PEER else peer - 1

    def lookup_packet(self, packet, bint source=False):
        """What the loops ask: the peer for an IP packet's destination (or
        source), None when no prefix holds it or the packet is too short."""
        cdef const uint8_t[::1] view = memoryview(packet).cast("B") if len(packet) else b"\0"
        cdef uint32_t peer = allowed_lookup(&self.t, &view[0], len(packet), source)
        return None if peer == NO_PEER else peer - 1

    @property
    def nodes(self):
        """Trie nodes (IPv4, IPv6): its memory is nodes x 144 bytes."""
        return self.t.v4.count, self.t.v6.count

    def _time_lookups(self, addresses, int version, unsigned long rounds):
        """Benchmark hook: nanoseconds per lookup of the packed addresses
        (4 or 16 bytes each, back to back), looked up `rounds` times over
        in C, without the GIL."""
        cdef const uint8_t[::1] view = memoryview(addresses).cast("B")
        cdef size_t width = 4 if version == 4 else 16
        cdef size_t count = len(addresses) // width, i
        cdef unsigned long _round
        cdef const Trie *trie = &self.t.v4 if version == 4 else &self.t.v6
        cdef uint64_t sink = 0
        cdef timespec start, end
        if count == 0:
            raise PumpArgumentError("no addresses")
        with nogil:
            clock_gettime(CLOCK_MONOTONIC, &start)
            for _round in range(rounds):
                for i in range(count):
                    sink += trie_lookup(trie, &view[i * width])
            clock_gettime(CLOCK_MONOTONIC, &end)
        elapsed = (end.tv_sec - start.tv_sec) * 1e9 + (end.tv_nsec - start.tv_nsec)
        self.checksum = sink
        return elapsed / (count * rounds)


# ---------------------------------------------------------------- test hooks

def uring_unavailable():
    """None where a pump can set up its io_uring; else why not (the
    strerror of io_uring_queue_init: io "auto" then runs syscalls)."""
    cdef TunRing probe
    cdef int rc = tunring_open(&probe, 1, False)
    if rc == 0:
        tunring_close(&probe)
        return None
    return os.strerror(-rc)


def _simulate_uring_failure(int err):
    """Test hook: from now on, setting up a pump's io_uring fails with errno
    `err` (EPERM: as under kernel.io_uring_disabled or seccomp; ENOSYS: a
    kernel without io_uring); 0 restores the real set-up."""
    global uring_fail_errno
    uring_fail_errno = err


def validate(data, str mode, size_t limit):
    """The C ingress check on one packet: None, or the drop reason."""
    cdef const uint8_t[::1] view = memoryview(data).cast("B") if len(data) else b"\0"
    cdef int reason = validate_packet(&view[0], len(data), mode == "tap", limit)
    return None if reason == DROP_NONE else _counters.DROP_REASONS[reason]


def clamp_mss(data, unsigned int v4, unsigned int v6, str mode="tun", bint partial=False):
    """The C MSS clamp on one packet (framing.clamp_mss is its reference):
    the rewritten packet, or None when it was left alone.  ``partial``: as
    a TUN read with VIRTIO_NET_HDR_F_NEEDS_CSUM whose checksum starts at
    the TCP header (offloads)."""
    cdef bytearray packet = bytearray(data)
    cdef uint8_t[::1] view
    cdef uint8_t *p
    cdef virtio_net_hdr h
    cdef const virtio_net_hdr *hp = NULL
    cdef size_t tcp = 0
    cdef int changed
    if v4 > 0xFFFF or v6 > 0xFFFF:
        raise PumpArgumentError("an MSS is at most 65535")
    if partial and mode != "tun":
        raise PumpArgumentError("partial checksums come with offloads, which are TUN only")
    if partial:
        memset(&h, 0, sizeof(h))
        h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
        h.gso_type = VIRTIO_NET_HDR_GSO_NONE
        if len(packet) >= 1 and packet[0] >> 4 == 4:
            tcp = (packet[0] & 0x0F) * 4
        elif len(packet) >= 1:
            tcp = 40
        h.csum_start = <uint16_t>tcp
        h.csum_offset = 16
        hp = &h
    if not len(packet):
        return None
    view = packet
    p = &view[0]
    cdef size_t length = len(packet)
    cdef bint tap = mode == "tap"
    with nogil:
        changed = clamp_syn_mss(p, length, v4, v6, tap, hp)
    return bytes(packet) if changed else None


cdef struct _Collected:
    size_t count          # frames collected by this len16_consume() call
    size_t capacity
    size_t *lengths
    uint8_t *data         # the frames' bytes, back to back
    size_t used


cdef int _collect(void *ctx, const uint8_t *frame, size_t length) noexcept nogil:
    # Copy now: len16_consume() compacts its buffer after the sinks ran.
    cdef _Collected *out = <_Collected *>ctx
    if frame == NULL:
        return 0  # end of a call's frames
    if out.count == out.capacity:
        return -1
    memcpy(out.data + out.used, frame, length)
    out.used += length
    out.lengths[out.count] = length
    out.count += 1
    return 0


def len16_split(chunks, size_t limit):
    """Feed byte chunks through the same len16_consume() the TCP ingress
    loop uses, as if each chunk were one recv().  Returns (frames,
    buffered_bytes, error) where error is None or "bad_length"."""
    cdef uint8_t *buf = <uint8_t *>malloc(STREAM_BUFFER)
    cdef size_t have = 0, i, offset
    cdef _Collected out
    cdef int status = PARSE_OK
    cdef const uint8_t[::1] view
    out.capacity = STREAM_BUFFER // 3 + 1
    out.lengths = <size_t *>malloc(out.capacity * sizeof(size_t))
    out.data = <uint8_t *>malloc(STREAM_BUFFER)
    frames = []
    try:
        if buf == NULL or out.lengths == NULL or out.data == NULL:
            raise MemoryError()
        for chunk in chunks:
            if not len(chunk):
                continue
            if have + len(chunk) > STREAM_BUFFER:
                raise PumpArgumentError("chunk larger than the stream buffer")
            view = memoryview(chunk).cast("B")
            memcpy(buf + have, &view[0], len(chunk))
            have += len(chunk)
            out.count = 0
            out.used = 0
            status = len16_consume(buf, &have, limit, _collect, &out)
            offset = 0
            for i in range(out.count):
                frames.append(PyBytes_FromStringAndSize(<char *>out.data + offset, out.lengths[i]))
                offset += out.lengths[i]
            if status != PARSE_OK:
                break
        return frames, have, None if status == PARSE_OK else "bad_length"
    finally:
        free(buf)
        free(out.lengths)
        free(out.data)
