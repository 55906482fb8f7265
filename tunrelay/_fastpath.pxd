# cython: language_level=3
# The contract of the compiled pump: its C state and the Python-visible class.

from libc.stdint cimport uint8_t, uint32_t, uint64_t

from tunrelay.includes.crypto cimport EVP_CIPHER_CTX
from tunrelay.includes.system cimport (iovec, mmsghdr, sockaddr_storage, socklen_t,
                                       virtio_net_hdr)


# One wire packet cut from a TUN super-packet (offload egress).
cdef struct Segment:
    uint8_t *head         # framing + IP + L4 header (copied), or a whole packet
    uint32_t head_len
    uint8_t *data         # payload, in place in the TUN buffer (NULL for whole packets)
    uint32_t data_len
    uint8_t *tail         # aead: where the tag goes (else NULL)
    uint32_t group        # segments of one super-packet share it (one GSO send)


# A validated packet waiting for the coalescer (offload ingress).
cdef struct Packet:
    uint8_t *data
    uint32_t length


# Sizes of the counter arrays; they must match counters.DROP_REASONS and
# counters.ERROR_KINDS (checked when the module is imported).
cdef enum:
    N_DROPS = 16
    N_ERRORS = 4

# The aead framing (see _aead.pxi): sizes on the wire and of its state.
cdef enum:
    AEAD_HEADER_LEN = 20      # type, 3 zero bytes, session id, counter
    AEAD_TAG_LEN = 16
    AEAD_OVERHEAD = 36
    AEAD_SESSION_LEN = 8
    AEAD_SESSIONS = 4         # peer sessions remembered (a restart makes a new one)
    AEAD_WINDOW_WORDS = 33    # 32 x 64 = 2048 counters behind the newest, + 1 word of slack
    AEAD_TRIALS_PER_S = 20    # key derivations for unknown sessions per second, at most
    AEAD_INFO_MAX = 64
    AEAD_SESSION_SLACK = 30   # seconds a new session may have started before the newest


cdef struct AeadSession:
    uint8_t id[8]
    bint used
    bint seen                 # top and window are valid
    EVP_CIPHER_CTX *ctx       # the session's key set; only the nonce changes per packet
    uint64_t top              # highest counter accepted
    uint64_t window[33]       # replay bitmap, RFC 6479
    uint64_t last_used


cdef struct Aead:
    bint on
    uint8_t psk[32]
    uint8_t salt[32]
    size_t salt_len
    uint8_t label[48]         # HKDF info prefix (names the cipher)
    size_t label_len
    # sending (egress loop only)
    EVP_CIPHER_CTX *send_ctx
    uint8_t send_session[8]
    uint64_t send_counter
    # receiving (ingress loop only)
    AeadSession sessions[4]
    EVP_CIPHER_CTX *trial_ctx
    double trial_tokens
    double trial_time
    uint64_t newest_start     # start time (s) in the newest accepted session id
    uint64_t clock
    uint64_t new_sessions


cdef struct Counters:
    uint64_t packets      # packets moved through
    uint64_t bytes        # their bytes (packet only, framing excluded)
    uint64_t batches      # send/recv calls that moved packets
    uint64_t syscalls     # every system call the loop made
    uint64_t wakeups      # poll() returns
    uint64_t tun_io       # TUN reads/writes that moved packets
    uint64_t drops[16]    # indexed like counters.DROP_REASONS
    uint64_t errors[4]    # indexed like counters.ERROR_KINDS
    int last_errno


cdef struct PumpState:
    int tun_fd
    int sock_fd
    int stop_fd           # eventfd: readable = stop
    bint stream           # TCP byte stream (len16) instead of datagrams
    bint len16            # framing len16
    size_t overhead       # framing bytes around a packet on the wire (len16 2, aead 36)
    size_t front          # of which in front of it (len16 2, aead 20)
    Aead aead
    bint tap              # TAP (Ethernet frames) instead of TUN (IP packets)
    bint check_peer       # compare each datagram's sender with the peer
    bint learn_peer       # take the peer from the first valid datagram
    int peer_known        # published with release/acquire (tr_atomic.h)
    sockaddr_storage peer
    socklen_t peer_len
    size_t max_frame      # longest packet accepted for the device
    size_t slot_size      # egress slot: HEADROOM + longest TUN read + 1, rounded up
    size_t ingress_slot   # ingress slot: longest datagram (64 KiB with GRO) + 1
    unsigned int batch
    bint offload          # the TUN fd carries a virtio_net_hdr (IFF_VNET_HDR)
    bint gso              # UDP_SEGMENT sends (cleared when the kernel refuses)
    bint gro              # UDP_GRO receives: a slot may hold many datagrams
    size_t cmsg_space     # CMSG_SPACE of one int-sized option
    int exit_errno        # errno of the call that ended a loop, per direction
    int ingress_exit_errno
    # egress: TUN -> socket
    uint8_t *egress_slab
    iovec *egress_iov
    mmsghdr *egress_msgs
    unsigned int *egress_counts   # datagrams per message (GSO runs)
    uint8_t *egress_cmsg          # a UDP_SEGMENT cmsg per message
    # ingress: socket -> TUN
    uint8_t *ingress_slab
    iovec *ingress_iov
    mmsghdr *ingress_msgs
    sockaddr_storage *ingress_names
    uint8_t *stream_buf
    size_t stream_cap
    size_t stream_have
    # offload egress: segments of a batch, their headers, iovecs, messages
    Segment *segs
    size_t nseg
    uint8_t *seg_heads
    iovec *seg_iov
    mmsghdr *seg_msgs
    unsigned int *msg_segs
    uint8_t *seg_cmsg
    # offload ingress: UDP_GRO cmsgs, packets for the coalescer, its iovecs
    uint8_t *gro_cmsg
    Packet *pkts
    size_t npkts
    iovec *out_iov
    virtio_net_hdr out_hdr
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
    cdef readonly bint offload
    cdef bint _gso
    cdef readonly str cipher

    cdef int _inspect_socket(self, object peer) except -1
