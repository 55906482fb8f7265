# cython: language_level=3
# The contract of the compiled pump: its C state and the Python-visible class.

from libc.stdint cimport uint8_t, uint64_t

from tunrelay.includes.system cimport iovec, mmsghdr, sockaddr_storage, socklen_t


# Sizes of the counter arrays; they must match counters.DROP_REASONS and
# counters.ERROR_KINDS (checked when the module is imported).
cdef enum:
    N_DROPS = 11
    N_ERRORS = 3


cdef struct Counters:
    uint64_t packets      # packets moved through
    uint64_t bytes        # their bytes (packet only, framing excluded)
    uint64_t batches      # send/recv calls that moved packets
    uint64_t syscalls     # every system call the loop made
    uint64_t wakeups      # poll() returns
    uint64_t drops[11]    # indexed like counters.DROP_REASONS
    uint64_t errors[3]    # indexed like counters.ERROR_KINDS
    int last_errno


cdef struct PumpState:
    int tun_fd
    int sock_fd
    int stop_fd           # eventfd: readable = stop
    bint stream           # TCP byte stream (len16) instead of datagrams
    bint len16            # framing
    bint tap              # TAP (Ethernet frames) instead of TUN (IP packets)
    bint check_peer       # compare each datagram's sender with the peer
    bint learn_peer       # take the peer from the first valid datagram
    int peer_known        # published with release/acquire (tr_atomic.h)
    sockaddr_storage peer
    socklen_t peer_len
    size_t max_frame      # longest packet accepted for the device
    size_t slot_size      # HEADROOM + max_frame + 1, rounded up
    unsigned int batch
    int exit_errno        # errno of the call that ended a loop, per direction
    int ingress_exit_errno
    # egress: TUN -> socket
    uint8_t *egress_slab
    iovec *egress_iov
    mmsghdr *egress_msgs
    # ingress: socket -> TUN
    uint8_t *ingress_slab
    iovec *ingress_iov
    mmsghdr *ingress_msgs
    sockaddr_storage *ingress_names
    uint8_t *stream_buf
    size_t stream_cap
    size_t stream_have
    Counters egress
    Counters ingress


cdef class Pump:
    cdef PumpState *st
    cdef object _runner
    cdef object _tun_ref
    cdef object _sock_ref
    cdef readonly str framing
    cdef readonly str mode
    cdef readonly int mtu
    cdef readonly int batch

    cdef int _inspect_socket(self, object peer) except -1
