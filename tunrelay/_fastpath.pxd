# cython: language_level=3
# The contract of the compiled pump: its C state and the Python-visible class.

from libc.stdint cimport uint8_t, uint32_t, uint64_t

from tunrelay.includes.crypto cimport EVP_CIPHER_CTX
from tunrelay.includes.crypto cimport EVP_CIPHER
from tunrelay.includes.crypto cimport EVP_MAC, EVP_MAC_CTX
from tunrelay.includes.uring cimport io_uring, io_uring_cqe
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


# The ingress loop's io_uring (the io "uring" engine, _uring.pxi); ring
# NULL: the syscall engine.  The TUN writes of a receive batch are queued,
# then submitted in one io_uring_enter.  (TUN reads stay read() calls: see
# _uring.pxi.)
cdef struct TunRing:
    io_uring *ring
    unsigned int entries      # writes one submission holds at most
    io_uring_cqe **cqes       # entries: what one reap collects
    int *res                  # per queued write: its result
    unsigned int queued       # writes waiting for the submission
    iovec *iov                # the queued writes' iovecs, back to back
    size_t iov_used
    size_t iov_cap
    virtio_net_hdr *hdrs      # offload: each queued write's own header
    uint32_t *packets         # per queued write: packets, bytes (for the counters),
    uint32_t *bytes           # ... its first iovec and how many
    uint32_t *first
    uint32_t *niov


# Sizes of the counter arrays; they must match counters.DROP_REASONS and
# counters.ERROR_KINDS (checked when the module is imported).
cdef enum:
    N_DROPS = 24
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


# Which counters of a session were accepted (RFC 6479): the newest, and a
# bitmap of the 8192 behind it.  The aead framing's sessions and the
# session framing's keypairs keep one each (window_fresh, window_mark).
cdef struct ReplayWindow:
    bint seen                 # top and window are valid
    uint64_t top              # highest counter accepted
    uint64_t window[129]      # AEAD_WINDOW_WORDS words


# One peer session in a Keyring's table, shared by every queue's ingress
# loop (and by the TCP hello check) under AeadShared.lock, so a session has
# one replay window whatever queue a datagram lands on.
cdef struct AeadSlot:
    uint8_t id[12]
    uint32_t start            # the sender's start time, from the id
    bint used
    uint32_t gen              # bumped whenever the slot takes a new session (openers rekey)
    uint8_t key[32]
    ReplayWindow replay
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
    # (the sender is EgressState.aead, the opener IngressState.aead)

# ---------------------------------------------------------------- allowed IPs (_allowedips.pxi)

cdef struct TrieNode:
    uint32_t child[16]        # node index; 0 = none (the root is node 0 and never a child)
    uint32_t peer[16]         # peer index + 1, or NO_PEER
    uint8_t length[16]        # prefix length of peer[] (the longest wins)


cdef struct Trie:
    TrieNode *nodes
    uint32_t count
    uint32_t capacity
    uint32_t default_peer     # the /0 prefix's peer + 1, or NO_PEER
    uint32_t bits             # 32 or 128


cdef struct AllowedIps:
    Trie v4
    Trie v6


# ---------------------------------------------------------------- peers (_peers.pxi)

cdef struct PeerSlot


cdef enum:
    SESSION_HEADER_LEN = 16   # type 4, 3 zero bytes, receiver index (u32 LE), counter (u64 LE)
    SESSION_OVERHEAD = 32     # header + tag
    SESSION_PAD_MAX = 15      # zeros after a packet: its plaintext is a multiple of 16
    MAX_READERS = 64          # loops that may read one PeerTable (2 per pump)
    CONTROL_SLOT = 2048       # longest control datagram queued
    EVENT_ENDPOINT = 1        # PeerSlot.events bits
    EVENT_RENEW = 2
    EVENT_PROMOTED = 4
    PEER_DROPPED = 4          # keys a promotion pushed out, waiting for Python
    ROAMED = 16               # raw peers moved between two publications


# One direction's counters of one peer, alone on its cache line: several
# queues add to them (atomically), and the other direction must not share
# the line.
cdef struct PeerCounters:
    uint64_t packets
    uint64_t bytes
    uint64_t drops
    uint64_t keepalives
    uint64_t last_ms          # monotonic ms of the newest data packet (0: never)
    uint8_t pad[24]


# A session's keys (framing "session"), installed from Python.  The send
# counter is taken atomically (every queue's egress loop may send with it);
# the replay window is one per session, under its lock, whatever queue a
# datagram lands on.
cdef struct Keypair:
    uint8_t send_key[32]
    uint8_t recv_key[32]
    uint32_t local_index      # in the peer's datagrams to us
    uint32_t remote_index     # in ours
    uint64_t gen              # unique per install: what a loop's cipher context holds
    double created            # monotonic seconds
    uint64_t send_counter     # the next nonce (atomic)
    unsigned int renew_asked  # EVENT_RENEW raised once
    PeerSlot *peer
    pthread_mutex_t lock      # guards replay, received
    ReplayWindow replay
    uint64_t received


# One peer: what the loops update.  Lives until removed and no loop can
# still hold it (its address never changes, unlike the snapshots).
cdef struct PeerSlot:
    PeerCounters egress       # aligned to 64 bytes by the allocation
    PeerCounters ingress
    uint32_t id
    int roaming               # the endpoint follows the peer's newest datagram
    pthread_mutex_t lock      # endpoint writes, session rotation
    unsigned int endpoint_seq  # sequence lock (tr_seq_*) for the endpoint
    int endpoint_known
    sockaddr_storage endpoint
    socklen_t endpoint_len
    uint64_t roams
    uint64_t last_seen_ms     # monotonic ms of the newest accepted datagram (0: never)
    Keypair *current          # atomic pointers, changed under lock
    Keypair *previous
    Keypair *next
    Keypair *dropped[4]       # PEER_DROPPED: pushed out by a promotion in a loop; Python retires them
    unsigned int ndropped
    unsigned int events       # EVENT_* bits for Python (atomic)
    uint64_t renew_session    # the local index + 1 of the session that asked for renewal (0: none)
    PeerSlot *all_prev        # every live peer of the table, owned by it (not by Python objects)
    PeerSlot *all_next
    double renew_unkeyed_at   # when "renew" was last raised for want of a session


# What a loop reads per packet: immutable once published.  A change builds
# a new one; the old one is freed once every loop has passed a quiescent
# point (its epoch, below).
cdef struct Snapshot:
    AllowedIps allowed        # prefix -> peer position + 1
    PeerSlot **peers          # by position
    uint32_t npeers
    Keypair **by_index        # receiver index -> keypair (open addressing, power of 2)
    uint32_t index_mask
    uint32_t *by_endpoint     # endpoint hash -> position + 1 (open addressing)
    uint32_t endpoint_mask


# Something retired (a snapshot, a removed peer, a replaced session), freed
# once every loop has passed the generation it was retired at.
cdef struct Retired:
    int kind
    void *ptr
    uint64_t gen
    Retired *next


cdef struct ReaderEpoch:
    uint64_t epoch            # 0: holds nothing; else the generation it entered at
    uint8_t pad[56]


# The handshake gate's share per source address (of unproven messages):
# one entry per hash bucket, taken over by another address once its
# window is over.
cdef struct GateSource:
    uint32_t hash
    uint32_t count
    double window             # when its window began (monotonic)


cdef struct PeerShared:
    Snapshot *current         # atomic pointer
    uint64_t gen              # bumped after every publication or retirement
    ReaderEpoch readers[64]
    uint8_t reader_used[64]
    # control datagrams: a bounded ring, many producers (ingress loops), one
    # consumer (Python); signalled through event_fd
    pthread_mutex_t control_lock
    uint8_t *control_buf      # control_slots x CONTROL_SLOT
    uint32_t *control_len
    sockaddr_storage *control_addr
    uint32_t *control_peer    # a staged packet's peer id (0: a datagram from the network)
    unsigned int control_slots
    unsigned int control_head
    unsigned int control_count
    unsigned int control_staged   # slots holding staged packets (at most half the ring)
    uint64_t control_queued
    uint64_t control_dropped
    uint64_t staged_queued
    uint64_t staged_dropped
    # the WireGuard handshake gate (types 1 and 2 under load), set from
    # Python under control_lock: mac1 is checked, and a valid mac2 (a
    # cookie for the sender's address) keeps a reserved part of the ring
    int gate_on
    uint8_t gate_mac1_key[32]
    uint8_t gate_secret[32]
    double gate_secret_until  # monotonic; no valid mac2 after it
    double gate_load_until    # under load until (latched by the loops)
    uint64_t gate_bad_mac1
    uint64_t gate_mac2_ok
    uint64_t gate_shed
    uint64_t gate_source_capped
    GateSource gate_sources[256]   # GATE_SOURCES, under control_lock
    EVP_MAC *blake2s          # fetched once per table
    uint8_t control_types[256]
    int event_fd
    unsigned int signalled    # event_fd written and not yet drained (atomic)
    unsigned int events_any   # some PeerSlot.events is set (atomic)
    const EVP_CIPHER *evp
    uint64_t rekey_messages
    uint64_t reject_messages
    double rekey_time
    double reject_time
    # raw/len16: peers whose endpoint a loop moved since the snapshot was
    # built (it still files them under the old address): scanned when the
    # endpoint map misses, until a publication takes them in
    PeerSlot *roamed[16]      # ROAMED
    unsigned int roamed_count
    pthread_mutex_t roamed_lock


cdef struct Counters:
    uint64_t packets      # packets moved through
    uint64_t bytes        # their bytes (packet only, framing excluded)
    uint64_t batches      # send/recv calls that moved packets
    uint64_t syscalls     # every system call the loop made
    uint64_t wakeups      # poll() returns
    uint64_t tun_io       # TUN reads/writes that moved packets
    uint64_t mss_clamped  # TCP SYNs whose MSS option was lowered (_mss.pxi)
    uint64_t drops[24]    # indexed like counters.DROP_REASONS
    uint64_t errors[4]    # indexed like counters.ERROR_KINDS
    int last_errno


# What only the egress loop (TUN -> socket) writes.
cdef struct EgressState:
    Counters c
    int exit_errno            # errno of the call that ended the loop
    uint8_t *slab             # batch slots: HEADROOM | packet | tag room
    iovec *iov
    mmsghdr *msgs
    unsigned int *counts      # datagrams per message (GSO runs)
    uint8_t *cmsg             # a UDP_SEGMENT cmsg per message
    double gso_retry_at       # after a refused GSO send: no GSO until then (monotonic s), then re-probe
    AeadSender aead           # aead: our sending session
    unsigned int endpoint_seen   # aead: endpoint_seq last copied into PumpState.peer
    # TCP: the unsent rest of a record a stop interrupted, sent first when
    # the pump starts again on the same connection (never half a record)
    uint8_t *stream_tail
    size_t tail_len
    size_t tail_cap
    # offload: segments of a batch, their headers, iovecs, messages
    Segment *segs
    size_t nseg
    uint8_t *seg_heads
    uint8_t *seg_sealed       # framing session: SEG_POOL slots of seg_sealed_slot bytes
    size_t seg_sealed_slot    # where each TSO segment is sealed whole (gather_segment)
    iovec *seg_iov
    mmsghdr *seg_msgs
    unsigned int *msg_segs
    uint8_t *seg_cmsg
    # peers
    int reader                # this loop's epoch in the PeerTable
    Snapshot *snap            # held between quiescent points
    double now                # monotonic s, once per batch
    sockaddr_storage *dest    # per slot: where its packet goes
    PeerSlot **peer           # per slot: its peer
    Keypair **keys            # per slot: the session it is sealed with
    sockaddr_storage **dg_name   # per datagram of a send: its destination
    PeerSlot **dg_peer
    EVP_CIPHER_CTX *seal_ctx  # session framing: keyed for seal_gen
    uint64_t seal_gen


# What only the ingress loop (socket -> TUN) writes.
cdef struct IngressState:
    Counters c
    int exit_errno
    uint8_t *slab             # batch slots of ingress_slot bytes
    iovec *iov
    mmsghdr *msgs
    sockaddr_storage *names   # the senders
    AeadOpener aead           # aead: a decryption context per session slot
    # TCP: one large receive buffer, parsed in place
    uint8_t *stream_buf
    size_t stream_cap
    size_t stream_have
    # offload: UDP_GRO cmsgs, packets for the coalescer, its iovecs
    uint8_t *gro_cmsg
    Packet *pkts
    size_t npkts
    iovec *out_iov
    virtio_net_hdr out_hdr
    # peers
    int reader
    Snapshot *snap
    double now
    EVP_CIPHER_CTX *open_ctx  # session framing: keyed for open_gen
    EVP_MAC_CTX *gate_mac     # session framing: the handshake gate's BLAKE2s
    uint64_t open_gen
    TunRing ur                # io "uring": the TUN writes


# A pump: what both loops read (set up while stopped), then each loop's own
# state on cache lines of its own, so the two cores never write a line the
# other reads per packet.  (The pads keep 64 bytes between the parts; the
# struct is allocated 64-byte aligned.)
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
    unsigned int mss_v4   # MSS clamping: the most a TCP SYN may announce over IPv4
    unsigned int mss_v6   # ... and over IPv6 (0: that family is not clamped)
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
    bint gro              # UDP_GRO receives: a slot may hold many datagrams
    # TCP: TCP_QUICKACK re-armed after every read (a Nagle peer's held segment
    # waits for our ACK, never for a delayed one)
    bint quickack
    size_t cmsg_space     # CMSG_SPACE of one int-sized option
    bint duplex           # one thread drives both directions (duplex_loop)
    double spin_s         # busy polling: poll without sleeping up to this long after work (0: never)
    double spin_eg        # the egress (or duplex) loop's budget now: adapts within
    double spin_ing       # spin_s/16..spin_s (poll_fds); the ingress loop's
    int duplex_end        # duplex: 0 egress ended the loop, 1 ingress did
    int nested_status     # duplex: how an ingress step run inside an egress wait ended
    PeerShared *peers     # many peers (framing raw/len16/session with a PeerTable); NULL without
    bint session          # framing "session"
    uint8_t pad_egress[64]
    EgressState eg
    uint8_t pad_ingress[64]
    IngressState ing
    uint8_t pad_end[64]


cdef class PeerTable:
    cdef PeerShared *sh
    cdef dict _peers
    cdef dict _names          # name -> id
    cdef dict _used_keys      # digests of the send keys installed (insertion-ordered, bounded)
    cdef dict _owners         # network -> the id of the peer it belongs to
    cdef Retired *_retired        # oldest first
    cdef Retired *_retired_tail
    cdef size_t _retired_count
    cdef PeerSlot *_all           # every live peer (freed with the table)
    cdef int _batch_depth
    cdef bint _dirty
    cdef uint32_t _next_id
    cdef uint64_t _next_gen
    cdef readonly uint64_t publications
    cdef bint _control_default
    cdef object _framing
    cdef int _family              # the pumps' socket family (0: no pump yet)
    cdef EVP_CIPHER_CTX *_ctx     # seals keepalives from Python (GIL held)
    cdef uint64_t _ctx_gen

    cdef int _publish(self) except -1
    cdef int _retire(self, int kind, void *ptr) except -1
    cdef int _reclaim(self)
    cdef void _unlink(self, PeerSlot *p)
    cdef int _register(self) except -1


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
    cdef readonly bint duplex
    cdef readonly int busy_poll_us
    cdef readonly tuple mss_clamp
    cdef bint _gso
    cdef readonly str cipher
    cdef readonly object keyring
    cdef readonly PeerTable peers
    cdef readonly str io          # the TUN I/O engine running: "uring" or "syscalls"
    cdef readonly str io_fallback  # io "auto" on syscalls: why io_uring could not be set up

    cdef int _inspect_socket(self, object peer) except -1
    cdef void _size_slots(self)
    cdef int _allocate_batch_buffers(self) except -1
    cdef int _allocate_stream_buffers(self) except -1
    cdef int _allocate_offload_scratch(self) except -1
    cdef void _link_messages(self)
    cdef int _setup_io(self, str io) except -1
