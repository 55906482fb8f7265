# cython: language_level=3
# The contract of the compiled pump: its C state and the Python-visible class.

from libc.stdint cimport uint8_t, uint32_t, uint64_t

from tunrelay.includes.crypto cimport EVP_CIPHER_CTX
from tunrelay.includes.crypto cimport EVP_CIPHER
from tunrelay.includes.system cimport (iovec, mmsghdr, pthread_mutex_t, sockaddr_storage,
                                       socklen_t, virtio_net_hdr)


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
    N_DROPS = 19
    N_ERRORS = 4

# The aead framing (see _aead.pxi): sizes on the wire and of its state.
cdef enum:
    AEAD_HEADER_LEN = 24      # type, role, 2 zero bytes, session id (12), counter (8)
    AEAD_TAG_LEN = 16
    AEAD_OVERHEAD = 40
    AEAD_SESSION_LEN = 12     # sender's start time (4) + 64 random bits
    AEAD_SLOTS = 8            # peer sessions remembered: 4 queues + a hello session + a restart's overlap
    AEAD_WINDOW_WORDS = 129   # 128 x 64 = 8192 counters behind the newest, + 1 word of slack
    AEAD_KEY_LEN = 32
    AEAD_RETIRED = 16         # sessions pushed out of a full table, refused from then on


# One peer session in a Keyring's table, shared by every queue's ingress
# loop (and by the TCP hello check) under AeadShared.lock, so a session has
# one replay window whatever queue a datagram lands on.
cdef struct AeadSlot:
    uint8_t id[12]
    uint32_t start            # the sender's start time, from the id
    bint used
    uint32_t gen              # bumped whenever the slot takes a new session (openers rekey)
    uint8_t key[32]
    bint seen                 # top and window are valid
    uint64_t top              # highest counter accepted
    uint64_t window[129]      # replay bitmap, RFC 6479
    uint64_t last_used


# What all pumps of one relay share (owned by a Keyring object): the
# direction keys, the peer's sessions, and the peer's endpoint (roaming).
cdef struct AeadShared:
    pthread_mutex_t lock      # guards slots, newest_start, clock, counts, endpoint writes
    const EVP_CIPHER *evp
    uint8_t role              # own role (0 = "a", 1 = "b"): what our datagrams carry
    uint8_t send_key[32]      # HKDF of the PSK for our direction
    uint8_t recv_key[32]      # ... and for the peer's
    uint32_t start            # our start time: every session of ours carries it
    AeadSlot slots[8]
    uint32_t newest_start     # the newest peer session's start time seen
    uint64_t clock
    uint64_t new_sessions
    uint64_t evicted
    uint8_t retired[16][12]   # ids pushed out of the table while current (a ring)
    unsigned int retired_next
    # The peer's endpoint: written under the lock by ingress loops, read by
    # egress loops without it (a sequence lock: odd while being written).
    unsigned int endpoint_seq
    int endpoint_known
    sockaddr_storage endpoint
    socklen_t endpoint_len
    uint64_t roams


# One opener's decryption contexts (a pump's ingress loop, or the hello
# check): a context per slot keyed for the slot's current session.
cdef struct AeadOpener:
    EVP_CIPHER_CTX *ctx[8]
    uint32_t ctx_gen[8]       # the slot gen each ctx holds (0: none)
    EVP_CIPHER_CTX *trial_ctx


# One sending session of ours: a pump's egress loop, or a Keyring's hellos.
cdef struct AeadSender:
    EVP_CIPHER_CTX *ctx       # keyed once; only the nonce changes per packet
    uint8_t session[12]
    uint64_t counter          # the next nonce


cdef struct Aead:
    bint on
    AeadShared *shared        # the Keyring's (shared by the relay's pumps)
    AeadSender send           # egress loop only
    # receiving (ingress loop only)
    AeadOpener opener
    unsigned int endpoint_seen   # endpoint_seq last copied into PumpState.peer


cdef struct Counters:
    uint64_t packets      # packets moved through
    uint64_t bytes        # their bytes (packet only, framing excluded)
    uint64_t batches      # send/recv calls that moved packets
    uint64_t syscalls     # every system call the loop made
    uint64_t wakeups      # poll() returns
    uint64_t tun_io       # TUN reads/writes that moved packets
    uint64_t drops[19]    # indexed like counters.DROP_REASONS
    uint64_t errors[4]    # indexed like counters.ERROR_KINDS
    int last_errno


cdef struct PumpState:
    int tun_fd
    int sock_fd
    int stop_fd           # eventfd: readable = stop
    bint stream           # TCP byte stream (len16 records) instead of datagrams
    bint len16            # a len16 length in front of each packet or record (TCP; UDP framing len16)
    size_t overhead       # framing bytes around a packet on the wire (len16 2, aead 40, both 42)
    size_t front          # of which in front of it (len16 2, aead 24, both 26)
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
    bint gso              # UDP_SEGMENT sends (the kernel has UDP GSO, and gso=True)
    double gso_retry_at   # after a refused GSO send: no GSO until then (monotonic s), then re-probe
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
    # TCP egress: the unsent rest of a record a stop interrupted, sent first
    # when the pump starts again on the same connection (never half a record)
    uint8_t *stream_tail
    size_t tail_len
    size_t tail_cap
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
    cdef readonly object keyring

    cdef int _inspect_socket(self, object peer) except -1
    cdef void _size_slots(self)
    cdef int _allocate_batch_buffers(self) except -1
    cdef int _allocate_stream_buffers(self) except -1
    cdef int _allocate_offload_scratch(self) except -1
    cdef void _link_messages(self)
