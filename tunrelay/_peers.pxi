# Many peers per pump: routing by inner address, per-peer endpoints and
# counters, sessions installed from Python (framing "session"), and the
# control channel.  The C half runs in the loops without the GIL; the
# PeerTable class (the Python half) makes every change.
#
# Publication.  What the loops look up per packet (allowed IPs, the peer
# list, receiver index -> session, endpoint -> peer) is a Snapshot,
# immutable once published.  A change builds a new snapshot, swaps the
# pointer, and retires the old one.  Each loop announces a quiescent point
# once per batch (reader_enter stores the current generation in its epoch;
# reader_idle stores 0 before it blocks in poll), and a retired object is
# freed once every loop's epoch is 0 or newer than its retirement: no loop
# can hold it any more.  The per-packet path takes no lock and reads no
# counter another thread writes except the epoch it owns.
#
# The wire format of framing "session" is WireGuard's transport data message:
#     04 00 00 00 | receiver index (u32 LE) | counter (u64 LE) | ciphertext | tag
# ChaCha20-Poly1305 with the nonce 4 zero bytes + counter (LE), no
# associated data.  An empty plaintext is a keepalive; padding after the
# packet's own IP length is trimmed.

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from tunrelay.includes.crypto cimport (
    CRYPTO_memcmp, EVP_MAC_CTX, EVP_MAC_fetch, EVP_MAC_final, EVP_MAC_free, EVP_MAC_init,
    EVP_MAC_update, OSSL_MAC_PARAM_SIZE, OSSL_PARAM, OSSL_PARAM_construct_end,
    OSSL_PARAM_construct_size_t)
from tunrelay.includes.system cimport (
    AF_INET, AF_INET6, sockaddr_in, sockaddr_in6, sockaddr_storage, socklen_t,
    tr_add64, tr_load64, tr_load_ptr, tr_or32, tr_seq_read_begin, tr_seq_read_retry,
    tr_seq_write_begin, tr_seq_write_end, tr_store64, tr_store_ptr, tr_xchg32)

cdef enum:
    SESSION_TYPE_DATA = 4
    # Retired objects (PeerTable._retire kinds)
    RETIRE_SNAPSHOT = 0
    RETIRE_PEER = 1
    RETIRE_KEYPAIR = 2


cdef inline uint32_t get32le(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline void put32le(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>v
    p[1] = <uint8_t>(v >> 8)
    p[2] = <uint8_t>(v >> 16)
    p[3] = <uint8_t>(v >> 24)


cdef inline uint64_t get64le(const uint8_t *p) noexcept nogil:
    return get32le(p) | (<uint64_t>get32le(p + 4) << 32)


cdef inline void put64le(uint8_t *p, uint64_t v) noexcept nogil:
    put32le(p, <uint32_t>v)
    put32le(p + 4, <uint32_t>(v >> 32))


# ---------------------------------------------------------------- quiescence

cdef inline Snapshot *reader_enter(PeerShared *sh, int reader) noexcept nogil:
    """A quiescent point, then the snapshot to use until the next one.  The
    epoch is stored before the pointer is loaded (both sequentially
    consistent): a writer that saw this epoch as older than its retirement
    waits, one that saw it newer knows this load returns the new pointer."""
    tr_store64(&sh.readers[reader].epoch, tr_load64(&sh.gen))
    return <Snapshot *>tr_load_ptr(<void **>&sh.current)


cdef inline void reader_idle(PeerShared *sh, int reader) noexcept nogil:
    """Before blocking: this loop holds nothing until reader_enter."""
    tr_store64(&sh.readers[reader].epoch, 0)


# ---------------------------------------------------------------- events

cdef void raise_signal(PeerShared *sh) noexcept nogil:
    if tr_xchg32(&sh.signalled, 1) == 0:
        eventfd_write(sh.event_fd, 1)


cdef void peer_event(PeerShared *sh, PeerSlot *p, unsigned int bit) noexcept nogil:
    if tr_or32(&p.events, bit) & bit:
        return  # already raised and not yet taken
    tr_xchg32(&sh.events_any, 1)
    raise_signal(sh)


cdef int control_push(PeerShared *sh, const uint8_t *data, size_t length,
                      const sockaddr_storage *sender, socklen_t sender_len,
                      unsigned int limit) noexcept nogil:
    """Queue a control datagram for Python: DROP_NONE, or the drop reason
    (the queue is full, or holds `limit` or more when `limit` is not 0;
    longer than a slot)."""
    cdef unsigned int at
    if length > CONTROL_SLOT:
        return DROP_OVERSIZE
    pthread_mutex_lock(&sh.control_lock)
    if sh.control_count == sh.control_slots or (limit and sh.control_count >= limit):
        sh.control_dropped += 1
        if limit:
            sh.gate_shed += 1
        pthread_mutex_unlock(&sh.control_lock)
        return DROP_CONTROL_FULL
    at = (sh.control_head + sh.control_count) % sh.control_slots
    memcpy(sh.control_buf + <size_t>at * CONTROL_SLOT, data, length)
    sh.control_len[at] = <uint32_t>length
    sh.control_peer[at] = 0
    memset(&sh.control_addr[at], 0, sizeof(sockaddr_storage))
    memcpy(&sh.control_addr[at], sender, sender_len)
    sh.control_count += 1
    sh.control_queued += 1
    pthread_mutex_unlock(&sh.control_lock)
    raise_signal(sh)
    return DROP_NONE


cdef int stage_packet(PeerShared *sh, PeerSlot *p, const uint8_t *packet,
                      size_t length) noexcept nogil:
    """A packet for a peer that has no session yet: hand it to Python (the
    control plane holds it until its handshake completes) through the
    control ring.  Staged packets take at most half the ring, so a burst
    of them never leaves the peers' handshakes without room.  DROP_NONE,
    or DROP_NO_SESSION when it cannot be held (too long, no room)."""
    cdef unsigned int at
    pthread_mutex_lock(&sh.control_lock)
    if length > CONTROL_SLOT or sh.control_count == sh.control_slots \
            or 2 * (sh.control_staged + 1) > sh.control_slots:
        sh.staged_dropped += 1
        pthread_mutex_unlock(&sh.control_lock)
        return DROP_NO_SESSION
    at = (sh.control_head + sh.control_count) % sh.control_slots
    memcpy(sh.control_buf + <size_t>at * CONTROL_SLOT, packet, length)
    sh.control_len[at] = <uint32_t>length
    sh.control_peer[at] = p.id
    memset(&sh.control_addr[at], 0, sizeof(sockaddr_storage))
    sh.control_count += 1
    sh.control_staged += 1
    sh.staged_queued += 1
    pthread_mutex_unlock(&sh.control_lock)
    raise_signal(sh)
    return DROP_NONE


# ---------------------------------------------------------------- the handshake gate

cdef enum:
    GATE_INITIATION = 1       # WireGuard's handshake message types and sizes
    GATE_RESPONSE = 2
    GATE_INITIATION_LEN = 148
    GATE_RESPONSE_LEN = 92
    GATE_MAC = 16
    GATE_SOURCES = 256        # PeerShared.gate_sources
    GATE_SOURCE_BURST = 16    # unproven messages one address may queue per window


cdef bint keyed_blake2s(EVP_MAC_CTX *ctx, const uint8_t *key, size_t key_len,
                        const uint8_t *data, size_t length, uint8_t *out) noexcept nogil:
    """BLAKE2s in its keyed mode with a 16-byte digest (WireGuard's MAC),
    from OpenSSL: mac1, mac2 and the cookie.  False when OpenSSL fails."""
    cdef size_t size = GATE_MAC
    cdef size_t written = 0
    cdef OSSL_PARAM params[2]
    params[0] = OSSL_PARAM_construct_size_t(OSSL_MAC_PARAM_SIZE, &size)
    params[1] = OSSL_PARAM_construct_end()
    return (EVP_MAC_init(ctx, key, key_len, params) == 1
            and EVP_MAC_update(ctx, data, length) == 1
            and EVP_MAC_final(ctx, out, &written, GATE_MAC) == 1 and written == GATE_MAC)


cdef size_t cookie_source(const sockaddr_storage *sender, uint8_t *out) noexcept nogil:
    """The sender as a cookie binds it (tunrelay.wireguard.cookie.address_bytes):
    its packed IP (an IPv4-mapped one as IPv4), then its port, big-endian."""
    cdef const sockaddr_in *a4
    cdef const sockaddr_in6 *a6
    cdef const uint8_t *b
    if sender.ss_family == AF_INET:
        a4 = <const sockaddr_in *>sender
        memcpy(out, &a4.sin_addr, 4)
        memcpy(out + 4, &a4.sin_port, 2)
        return 6
    a6 = <const sockaddr_in6 *>sender
    b = <const uint8_t *>&a6.sin6_addr
    if memcmp(b, b"\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0:
        memcpy(out, b + 12, 4)
        memcpy(out + 4, &a6.sin6_port, 2)
        return 6
    memcpy(out, b, 16)
    memcpy(out + 16, &a6.sin6_port, 2)
    return 18


cdef int gate_handshake(PumpState *st, const uint8_t *datagram, size_t length,
                        const sockaddr_storage *sender, socklen_t sender_len) noexcept nogil:
    """A WireGuard initiation or response, before it takes a control slot.
    Not under load, it is queued for Python (which checks everything).
    Under load (the queue 1/8 full, latched for a second), a flood must not
    starve the real peers: a message with a bad mac1 or size is dropped
    here; one whose mac2 proves its source address (a cookie we gave it)
    may take any free slot; the rest only the first quarter of the queue,
    enough for Python to answer some with cookie replies.  DROP_NONE (it
    was queued) or the drop reason."""
    cdef PeerShared *sh = st.peers
    cdef uint8_t mac1_key[32]
    cdef uint8_t secret[32]
    cdef uint8_t source[18]
    cdef uint8_t cookie[GATE_MAC]
    cdef uint8_t mac[GATE_MAC]
    cdef double now = st.ing.now
    cdef bint loaded, secret_valid, proven
    cdef size_t source_len
    pthread_mutex_lock(&sh.control_lock)
    if sh.control_count * 8 >= sh.control_slots:
        sh.gate_load_until = now + 1.0
    loaded = now < sh.gate_load_until
    if loaded:
        memcpy(mac1_key, sh.gate_mac1_key, 32)
        memcpy(secret, sh.gate_secret, 32)
        secret_valid = now < sh.gate_secret_until
    pthread_mutex_unlock(&sh.control_lock)
    if not loaded:
        return control_push(sh, datagram, length, sender, sender_len, 0)
    if length != <size_t>(GATE_INITIATION_LEN if datagram[0] == GATE_INITIATION
                          else GATE_RESPONSE_LEN):
        return DROP_BAD_FRAME
    if not keyed_blake2s(st.ing.gate_mac, mac1_key, 32, datagram, length - 32, mac) or \
            CRYPTO_memcmp(mac, datagram + length - 32, GATE_MAC) != 0:
        tr_add64(&sh.gate_bad_mac1, 1)
        return DROP_BAD_TAG
    source_len = cookie_source(sender, source)
    proven = (secret_valid
              and keyed_blake2s(st.ing.gate_mac, secret, 32, source, source_len, cookie)
              and keyed_blake2s(st.ing.gate_mac, cookie, GATE_MAC, datagram, length - GATE_MAC, mac)
              and CRYPTO_memcmp(mac, datagram + length - GATE_MAC, GATE_MAC) == 0)
    if proven:
        tr_add64(&sh.gate_mac2_ok, 1)
        return control_push(sh, datagram, length, sender, sender_len, 0)
    if not gate_source_share(sh, source, source_len - 2, now):   # the address, not the port
        return DROP_CONTROL_FULL
    return control_push(sh, datagram, length, sender, sender_len,
                        sh.control_slots // 4 if sh.control_slots >= 4 else 1)


cdef bint gate_source_share(PeerShared *sh, const uint8_t *ip, size_t ip_len,
                            double now) noexcept nogil:
    """Under load, one address may queue at most GATE_SOURCE_BURST unproven
    handshake messages per tenth of a second, so a flood from one host
    cannot take the whole unproven quarter and leave a real peer (which
    needs one message through to be sent a cookie) to a lottery it loses.
    A flood from many spoofed addresses still competes as WireGuard's own
    queue does.  False (counted gate_source_capped) when over the share."""
    cdef uint32_t h = 2166136261u
    cdef size_t i
    cdef GateSource *e
    cdef bint ok
    for i in range(ip_len):
        h = (h ^ ip[i]) * 16777619u
    pthread_mutex_lock(&sh.control_lock)
    e = &sh.gate_sources[h % GATE_SOURCES]
    if e.hash != h or now - e.window >= 0.1:
        e.hash = h
        e.window = now
        e.count = 0
    ok = e.count < GATE_SOURCE_BURST
    if ok:
        e.count += 1
    else:
        sh.gate_source_capped += 1
        sh.control_dropped += 1
    pthread_mutex_unlock(&sh.control_lock)
    return ok


# ---------------------------------------------------------------- endpoints

cdef inline bint peer_endpoint(PeerSlot *p, sockaddr_storage *out) noexcept nogil:
    """Copy the peer's endpoint (sequence lock): False when none is known."""
    cdef unsigned int seq
    cdef bint known
    while True:
        seq = tr_seq_read_begin(&p.endpoint_seq)
        known = p.endpoint_known
        if known:
            memcpy(out, &p.endpoint, sizeof(sockaddr_storage))
        if not tr_seq_read_retry(&p.endpoint_seq, seq):
            return known


cdef void peer_move(PeerSlot *p, const sockaddr_storage *sender,
                    socklen_t sender_len) noexcept nogil:
    pthread_mutex_lock(&p.lock)
    tr_seq_write_begin(&p.endpoint_seq)
    memset(&p.endpoint, 0, sizeof(sockaddr_storage))
    memcpy(&p.endpoint, sender, sender_len)
    p.endpoint_len = sender_len
    p.endpoint_known = 1
    tr_seq_write_end(&p.endpoint_seq)
    p.roams += 1
    pthread_mutex_unlock(&p.lock)


cdef bint peer_roam(PeerShared *sh, PeerSlot *p, const sockaddr_storage *sender,
                    socklen_t sender_len, bint by_address) noexcept nogil:
    """An accepted datagram came from `sender`: a roaming peer's endpoint
    follows it (a read first: no lock when it has not moved).

    `by_address` (raw/len16, where datagrams find their peer by endpoint):
    the snapshot's endpoint map knows the old address until the next
    publication, so the peer is also noted among the moved ones, at most
    ROAMED of them between two publications: past that the move is
    refused (False: the datagram is not taken) until the control plane
    publishes (take() does, on the endpoint event raised here)."""
    cdef sockaddr_storage now
    cdef unsigned int i
    cdef bint listed = False
    if not p.roaming:
        return True
    if peer_endpoint(p, &now) and same_address(&now, sender):
        return True
    if not by_address:
        peer_move(p, sender, sender_len)
        peer_event(sh, p, EVENT_ENDPOINT)
        return True
    pthread_mutex_lock(&sh.roamed_lock)
    for i in range(sh.roamed_count):
        listed = listed or sh.roamed[i] == p
    if not listed and sh.roamed_count == ROAMED:
        pthread_mutex_unlock(&sh.roamed_lock)
        peer_event(sh, p, EVENT_ENDPOINT)   # (already raised: the publication that makes room)
        return False
    # The endpoint first, then the listing, both under the ring's lock: a
    # publication that counted this entry as taken in read the new address.
    peer_move(p, sender, sender_len)
    if not listed:
        tr_store_ptr(<void **>&sh.roamed[sh.roamed_count], p)
        sh.roamed_count += 1
    pthread_mutex_unlock(&sh.roamed_lock)
    peer_event(sh, p, EVENT_ENDPOINT)
    return True


cdef inline uint32_t address_hash(const sockaddr_storage *a) noexcept nogil:
    cdef const sockaddr_in *a4
    cdef const sockaddr_in6 *a6
    cdef uint32_t h = 2166136261u
    cdef const uint8_t *p
    cdef size_t n, i
    if a.ss_family == AF_INET:
        a4 = <const sockaddr_in *>a
        p = <const uint8_t *>&a4.sin_addr
        n = 4
        h = (h ^ a4.sin_port) * 16777619u
    elif a.ss_family == AF_INET6:
        a6 = <const sockaddr_in6 *>a
        p = <const uint8_t *>&a6.sin6_addr
        n = 16
        h = (h ^ a6.sin6_port) * 16777619u
        h = (h ^ a6.sin6_scope_id) * 16777619u
    else:
        return 0
    for i in range(n):
        h = (h ^ p[i]) * 16777619u
    return h


cdef PeerSlot *peer_by_endpoint(PeerShared *sh, const Snapshot *s,
                                const sockaddr_storage *sender) noexcept nogil:
    """The peer whose endpoint `sender` is: the snapshot's map, checked
    against each candidate's endpoint now, then the peers a loop moved
    since the snapshot was built (at most ROAMED)."""
    cdef uint32_t i, at
    cdef unsigned int r
    cdef PeerSlot *p
    cdef sockaddr_storage now
    if s.by_endpoint != NULL:
        i = address_hash(sender) & s.endpoint_mask
        while True:
            at = s.by_endpoint[i]
            if at == 0:
                break
            p = s.peers[at - 1]
            if peer_endpoint(p, &now) and same_address(&now, sender):
                return p
            i = (i + 1) & s.endpoint_mask
    for r in range(ROAMED):
        p = <PeerSlot *>tr_load_ptr(<void **>&sh.roamed[r])
        if p != NULL and peer_endpoint(p, &now) and same_address(&now, sender):
            return p
    return NULL


cdef Keypair *keypair_by_index(const Snapshot *s, uint32_t index) noexcept nogil:
    cdef uint32_t i
    cdef Keypair *k
    if s.by_index == NULL:
        return NULL
    i = (index * 2654435761u) & s.index_mask
    while True:
        k = s.by_index[i]
        if k == NULL or k.local_index == index:
            return k
        i = (i + 1) & s.index_mask


# ---------------------------------------------------------------- sessions

cdef inline bint keypair_expired(PeerShared *sh, Keypair *k, double now) noexcept nogil:
    return sh.reject_time > 0 and now - k.created >= sh.reject_time


cdef void ask_renewal(PeerShared *sh, PeerSlot *p, Keypair *k, double now) noexcept nogil:
    """Raise "renew" for a peer: its session `k` asks (NULL: there is none to
    send with).  Without a session, at most once a second: a packet per
    attempt must not become a handshake per packet."""
    if k == NULL:
        if now - p.renew_unkeyed_at < 1.0:
            return
        p.renew_unkeyed_at = now
        p.renew_session = 0
    else:
        p.renew_session = <uint64_t>k.local_index + 1
    peer_event(sh, p, EVENT_RENEW)


cdef inline size_t session_pad(size_t length, size_t mtu) noexcept nogil:
    """How many zeros follow a packet of `length` bytes: its plaintext is
    padded to a multiple of 16, but never past the MTU (WireGuard hides
    the exact length this way; the receiver trims by the IP header)."""
    cdef size_t padded = (length + 15) & ~(<size_t>15)
    if padded > mtu:
        padded = mtu if mtu > length else length
    return padded - length


cdef int seal_with(EVP_CIPHER_CTX *ctx, uint64_t *ctx_gen, Keypair *k, uint64_t counter,
                   uint8_t *header, uint8_t *first, size_t first_len, uint8_t *second,
                   size_t second_len, uint8_t *tail, size_t tail_len,
                   size_t pad) noexcept nogil:
    """Encrypt in place, under `counter`, the plaintext first + second +
    tail (`tail_len` bytes) + `pad` zeros (written after the tail), with
    the tag after them; write the header.  `ctx` is rekeyed only when it
    holds another session.  Pieces that touch go to OpenSSL as one: each
    call costs, and so does a piece whose length is not a multiple of the
    cipher's 64-byte block (about a quarter more per packet, measured)."""
    cdef uint8_t nonce[12]
    cdef int out_len
    cdef uint8_t *tag = tail + tail_len + pad
    if pad:
        memset(tail + tail_len, 0, pad)
    tail_len += pad
    if tail_len and second_len == 0 and tail == first + first_len:
        first_len += tail_len
        tail_len = 0
    if ctx_gen[0] != k.gen:
        if EVP_EncryptInit_ex(ctx, NULL, NULL, k.send_key, NULL) != 1:
            return DROP_SEND_ERROR
        ctx_gen[0] = k.gen
    header[0] = SESSION_TYPE_DATA
    header[1] = 0
    header[2] = 0
    header[3] = 0
    put32le(header + 4, k.remote_index)
    put64le(header + 8, counter)
    memset(nonce, 0, 4)
    put64le(nonce + 4, counter)
    if EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1:
        return DROP_SEND_ERROR
    if first_len and EVP_EncryptUpdate(ctx, first, &out_len, first, <int>first_len) != 1:
        return DROP_SEND_ERROR
    if second_len and EVP_EncryptUpdate(ctx, second, &out_len, second, <int>second_len) != 1:
        return DROP_SEND_ERROR
    if tail_len and EVP_EncryptUpdate(ctx, tail, &out_len, tail, <int>tail_len) != 1:
        return DROP_SEND_ERROR
    if EVP_EncryptFinal_ex(ctx, tag, &out_len) != 1:
        return DROP_SEND_ERROR
    if EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, AEAD_TAG_LEN, tag) != 1:
        return DROP_SEND_ERROR
    return DROP_NONE


cdef int session_counter(PeerShared *sh, Keypair *k, double now, uint64_t *counter) noexcept nogil:
    """Take the session's next send counter (atomically: every queue sends
    with it, and a nonce is never used twice).  DROP_NONE, or
    DROP_SESSION_EXPIRED past a hard limit (and renewal is asked)."""
    counter[0] = tr_add64(&k.send_counter, 1)
    if counter[0] >= sh.reject_messages or keypair_expired(sh, k, now):
        if not k.renew_asked:
            k.renew_asked = 1
            ask_renewal(sh, k.peer, k, now)
        return DROP_SESSION_EXPIRED
    if not k.renew_asked and (counter[0] >= sh.rekey_messages or
                              (sh.rekey_time > 0 and now - k.created >= sh.rekey_time)):
        k.renew_asked = 1
        ask_renewal(sh, k.peer, k, now)
    return DROP_NONE


cdef int session_seal(PumpState *st, Keypair *k, uint8_t *header, uint8_t *first,
                      size_t first_len, uint8_t *second, size_t second_len,
                      uint8_t *tail, size_t tail_len, size_t pad) noexcept nogil:
    """Egress: seal a packet (first + second + tail_len bytes at `tail`,
    then `pad` zeros and the tag) under the session's next counter.
    DROP_NONE or a drop reason."""
    cdef uint64_t counter
    cdef int reason = session_counter(st.peers, k, st.eg.now, &counter)
    if reason != DROP_NONE:
        return reason
    return seal_with(st.eg.seal_ctx, &st.eg.seal_gen, k, counter, header, first, first_len,
                     second, second_len, tail, tail_len, pad)


cdef void promote(PeerShared *sh, Keypair *k) noexcept nogil:
    """The peer's first datagram under its `next` session authenticated: it
    has the keys, so it becomes current (current -> previous; the old
    previous goes to Python to be retired).  While Python has not taken
    the ones pushed out before (PEER_DROPPED of them wait), the promotion
    waits too: the next datagram tries again, nothing is lost track of."""
    cdef PeerSlot *p = k.peer
    cdef Keypair *old
    cdef bint done = False
    pthread_mutex_lock(&p.lock)
    if p.next == k:
        old = p.previous
        if old == NULL or p.ndropped < PEER_DROPPED:
            if old != NULL:
                p.dropped[p.ndropped] = old
                p.ndropped += 1
            tr_store_ptr(<void **>&p.previous, p.current)
            tr_store_ptr(<void **>&p.current, k)
            tr_store_ptr(<void **>&p.next, NULL)
            done = True
    pthread_mutex_unlock(&p.lock)
    if done:
        peer_event(sh, p, EVENT_PROMOTED)


cdef int session_open(PumpState *st, uint8_t *datagram, size_t length,
                      PeerSlot **peer, size_t *plain) noexcept nogil:
    """Authenticate and decrypt one session datagram in place.  DROP_NONE
    with the peer and the plaintext length, or a drop reason."""
    cdef PeerShared *sh = st.peers
    cdef Keypair *k
    cdef PeerSlot *p
    cdef uint64_t counter
    cdef uint8_t nonce[12]
    cdef int out_len
    cdef size_t body
    cdef bint fresh
    if length < SESSION_OVERHEAD:
        return DROP_TOO_SHORT
    if datagram[1] or datagram[2] or datagram[3]:
        return DROP_BAD_FRAME
    k = keypair_by_index(st.ing.snap, get32le(datagram + 4))
    if k == NULL:
        return DROP_NO_SESSION
    p = k.peer
    # Only the peer's three sessions: one pushed out by a promotion is over
    # even while the snapshot still lists it.
    if k != <Keypair *>tr_load_ptr(<void **>&p.current) and \
            k != <Keypair *>tr_load_ptr(<void **>&p.previous) and \
            k != <Keypair *>tr_load_ptr(<void **>&p.next):
        return DROP_NO_SESSION
    counter = get64le(datagram + 8)
    if counter >= sh.reject_messages or keypair_expired(sh, k, st.ing.now):
        return DROP_SESSION_EXPIRED
    pthread_mutex_lock(&k.lock)
    fresh = window_fresh(&k.replay, counter)
    pthread_mutex_unlock(&k.lock)
    if not fresh:
        return DROP_REPLAY
    if st.ing.open_gen != k.gen:
        if EVP_DecryptInit_ex(st.ing.open_ctx, NULL, NULL, k.recv_key, NULL) != 1:
            return DROP_BAD_TAG
        st.ing.open_gen = k.gen
    body = length - SESSION_OVERHEAD
    memset(nonce, 0, 4)
    put64le(nonce + 4, counter)
    if EVP_DecryptInit_ex(st.ing.open_ctx, NULL, NULL, NULL, nonce) != 1 or \
            EVP_CIPHER_CTX_ctrl(st.ing.open_ctx, EVP_CTRL_AEAD_SET_TAG, AEAD_TAG_LEN,
                                datagram + length - AEAD_TAG_LEN) != 1:
        return DROP_BAD_TAG
    if body and EVP_DecryptUpdate(st.ing.open_ctx, datagram + SESSION_HEADER_LEN, &out_len,
                                  datagram + SESSION_HEADER_LEN, <int>body) != 1:
        return DROP_BAD_TAG
    if EVP_DecryptFinal_ex(st.ing.open_ctx, datagram + SESSION_HEADER_LEN + body, &out_len) != 1:
        return DROP_BAD_TAG
    # Authentic: now (and only now) the window moves; a second copy that
    # raced this one through decryption loses here.
    pthread_mutex_lock(&k.lock)
    fresh = window_fresh(&k.replay, counter)
    if fresh:
        window_mark(&k.replay, counter)
        k.received += 1
    pthread_mutex_unlock(&k.lock)
    if not fresh:
        return DROP_REPLAY
    if k == <Keypair *>tr_load_ptr(<void **>&p.next):
        promote(sh, k)
    peer[0] = p
    plain[0] = body
    return DROP_NONE


cdef inline size_t ip_length(const uint8_t *packet, size_t length) noexcept nogil:
    """The packet's own length from its IP header (padding after it is not
    the packet's), or `length` when the header cannot say."""
    cdef size_t total
    if length >= 20 and packet[0] >> 4 == 4:
        total = be16(packet + 2)
    elif length >= 40 and packet[0] >> 4 == 6:
        total = 40 + be16(packet + 4)
    else:
        return length
    return total if total <= length else length


# ---------------------------------------------------------------- egress

cdef int egress_route(PumpState *st, uint8_t *packet, size_t length,
                      unsigned int slot) noexcept nogil:
    """Pick the peer of a packet read from the device (longest prefix of its
    destination), its endpoint and (framing session) its session, for
    egress slot `slot`.  DROP_NONE, or why the packet cannot go."""
    cdef const Snapshot *s = st.eg.snap
    cdef uint32_t at = allowed_lookup(&s.allowed, packet, length, False)
    cdef PeerSlot *p
    cdef Keypair *k
    if at == NO_PEER:
        return DROP_NO_ROUTE
    p = s.peers[at - 1]
    st.eg.peer[slot] = p
    if not peer_endpoint(p, &st.eg.dest[slot]):
        tr_add64(&p.egress.drops, 1)
        return DROP_NO_PEER
    if st.session:
        k = <Keypair *>tr_load_ptr(<void **>&p.current)
        if k == NULL:
            # The caller stages the packet (stage_packet) or counts it.
            ask_renewal(st.peers, p, NULL, st.eg.now)
            return DROP_NO_SESSION
        st.eg.keys[slot] = k
    return DROP_NONE


# ---------------------------------------------------------------- ingress

cdef int peer_receive(PumpState *st, uint8_t *datagram, size_t length,
                      const sockaddr_storage *sender, socklen_t sender_len) noexcept nogil:
    """One datagram on a pump with peers: control, or data from a peer whose
    inner source it may use.  0, or -1 when the loop must end."""
    cdef PeerShared *sh = st.peers
    cdef const Snapshot *s = st.ing.snap
    cdef Counters *c = &st.ing.c
    cdef PeerSlot *p = NULL
    cdef PeerSlot *owner
    cdef uint8_t *packet = datagram
    cdef size_t plain = length
    cdef uint32_t at
    cdef int reason
    cdef uint8_t kind
    if length == 0:
        c.drops[DROP_TOO_SHORT if st.session else DROP_EMPTY] += 1
        return 0
    # The message type: the first byte, or with len16 the first after the
    # length (a data datagram's length header is no type).
    kind = datagram[LEN16_HEADER] if st.len16 and length > LEN16_HEADER else datagram[0]
    if (kind != SESSION_TYPE_DATA if st.session else
            (kind >> 4 != 4 and kind >> 4 != 6)) and sh.control_types[kind]:
        if st.session and sh.gate_on and (kind == GATE_INITIATION or kind == GATE_RESPONSE):
            reason = gate_handshake(st, datagram, length, sender, sender_len)
        else:
            reason = control_push(sh, datagram, length, sender, sender_len, 0)
        if reason != DROP_NONE:
            c.drops[reason] += 1
        return 0
    if st.session:
        if datagram[0] != SESSION_TYPE_DATA:
            c.drops[DROP_BAD_FRAME] += 1
            return 0
        reason = session_open(st, datagram, length, &p, &plain)
        if reason != DROP_NONE:
            c.drops[reason] += 1
            return 0
        packet = datagram + SESSION_HEADER_LEN
        peer_roam(sh, p, sender, sender_len, False)
        tr_store64(&p.last_seen_ms, <uint64_t>(st.ing.now * 1000) + 1)
        if plain == 0:
            tr_add64(&p.ingress.keepalives, 1)
            return 0
        plain = ip_length(packet, plain)
    else:
        if st.len16:
            if length <= LEN16_HEADER or be16(datagram) != length - LEN16_HEADER:
                c.drops[DROP_BAD_FRAME] += 1
                return 0
            packet += LEN16_HEADER
            plain -= LEN16_HEADER
        p = peer_by_endpoint(sh, s, sender)
    # A raw datagram from an unknown address is taken only for a roaming
    # peer whose prefixes hold its inner source, and only when it is a valid
    # packet.  A packet from a known peer is checked (so junk counts as what
    # it is), then its inner source must be the peer's.
    at = allowed_lookup(&s.allowed, packet, plain, True)
    owner = s.peers[at - 1] if at != NO_PEER else NULL
    if p == NULL and (owner == NULL or not owner.roaming):
        c.drops[DROP_NOT_PEER] += 1
        return 0
    reason = validate_packet(packet, plain, st.tap, st.max_frame)
    if reason != DROP_NONE:
        c.drops[reason] += 1
        if p != NULL:
            tr_add64(&p.ingress.drops, 1)
        return 0
    if p == NULL:
        if not peer_roam(sh, owner, sender, sender_len, True):
            c.drops[DROP_NOT_PEER] += 1
            return 0
        p = owner
    if owner != p:
        c.drops[DROP_NOT_ALLOWED] += 1
        tr_add64(&p.ingress.drops, 1)
        return 0
    if not st.session:
        tr_store64(&p.last_seen_ms, <uint64_t>(st.ing.now * 1000) + 1)
    tr_store64(&p.ingress.last_ms, <uint64_t>(st.ing.now * 1000) + 1)
    tr_add64(&p.ingress.packets, 1)
    tr_add64(&p.ingress.bytes, plain)
    return deliver(st, packet, plain)


# ---------------------------------------------------------------- the Python half

Event = collections.namedtuple("Event", "kind peer address data session", defaults=(None,),
                               module=__name__)
Event.__doc__ = """What a PeerTable reports through take(): kind "control" (a
datagram for the control plane: address, data), "endpoint" (a roaming
peer moved: peer, address), "renew" (the peer's session asks for renewal,
or there is none to send with: peer), "promoted" (a next session was
confirmed by the peer and is current now: peer), "staged" (a packet from
the device for a peer with no session yet, held for the control plane
to send with Pump.send_packet once its handshake completes: peer, data).
``session``: for
"renew" the local index of the session that asks (None: there is no
session to send with), for "promoted" the one that became current."""

_KEEP = ...   # update(): a keyword left out keeps its value
#: install_session() refuses a send key it saw among this many installs.
USED_KEYS_REMEMBERED = 65536
cdef uint64_t _NO_LIMIT = 0xFFFFFFFFFFFFFFFF


class _PeerRecord:
    # allowed: the networks (ipaddress objects); packed: the same as
    # (is IPv6, address bytes, prefix length), what a publication inserts.
    __slots__ = ("id", "name", "endpoint", "allowed", "packed", "roaming", "slot")


cdef void _free_keypair(Keypair *k) noexcept nogil:
    if k == NULL:
        return
    OPENSSL_cleanse(k.send_key, 32)
    OPENSSL_cleanse(k.recv_key, 32)
    pthread_mutex_destroy(&k.lock)
    free(k)


cdef void _free_snapshot(Snapshot *s) noexcept nogil:
    if s == NULL:
        return
    trie_free(&s.allowed.v4)
    trie_free(&s.allowed.v6)
    free(s.peers)
    free(s.by_index)
    free(s.by_endpoint)
    free(s)


cdef uint32_t _table_size(uint32_t count):
    cdef uint32_t size = 8
    while size < 2 * count:
        size *= 2
    return size


@cython.no_gc_clear
cdef class PeerTable:
    """The peers of one relay, shared by all its queue pumps: each peer's
    endpoint, allowed IPs, counters and (framing "session") sessions; the
    control channel and the events for the control plane.

    Changes (add, update, remove, install_session, ...) are made from
    Python while the pumps run: each builds a new lookup snapshot and
    publishes it; the loops never take a lock for it.  ``with
    table.batch():`` makes many changes one publication.  Not thread-safe
    on the Python side: one control plane drives a table (the GIL-held
    methods may be called from any one thread at a time).
    """

    def __cinit__(self, *, control_types=None, int control_slots=256,
                  rekey_after_messages=None, rekey_after_time=None,
                  reject_after_messages=None, reject_after_time=None):
        cdef void *mem = NULL
        cdef int t
        if not 1 <= control_slots <= 65536:
            raise PumpArgumentError(f"control_slots must be 1..65536, got {control_slots}")
        if posix_memalign(&mem, 64, sizeof(PeerShared)) != 0:
            raise MemoryError()
        self.sh = <PeerShared *>mem
        memset(self.sh, 0, sizeof(PeerShared))
        self.sh.event_fd = -1
        self.sh.gen = 1
        pthread_mutex_init(&self.sh.control_lock, NULL)
        pthread_mutex_init(&self.sh.roamed_lock, NULL)
        self.sh.control_slots = control_slots
        self.sh.control_buf = <uint8_t *>malloc(<size_t>control_slots * CONTROL_SLOT)
        self.sh.control_len = <uint32_t *>calloc(control_slots, sizeof(uint32_t))
        self.sh.control_addr = <sockaddr_storage *>calloc(control_slots, sizeof(sockaddr_storage))
        self.sh.control_peer = <uint32_t *>calloc(control_slots, sizeof(uint32_t))
        if self.sh.control_buf == NULL or self.sh.control_len == NULL \
                or self.sh.control_addr == NULL or self.sh.control_peer == NULL:
            raise MemoryError()
        self.sh.event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.sh.event_fd < 0:
            raise OSError(errno, os.strerror(errno), "eventfd")
        self.sh.evp = EVP_chacha20_poly1305()
        self.sh.blake2s = EVP_MAC_fetch(NULL, b"BLAKE2SMAC", NULL)
        if self.sh.blake2s == NULL:
            raise RuntimeError("OpenSSL has no BLAKE2SMAC (OpenSSL 3 is needed)")
        self._ctx = EVP_CIPHER_CTX_new()
        if self._ctx == NULL or EVP_EncryptInit_ex(self._ctx, self.sh.evp, NULL, NULL, NULL) != 1:
            raise MemoryError()
        self._control_default = control_types is None
        if control_types is not None:
            for t in control_types:
                if not 0 <= t <= 255:
                    raise PumpArgumentError(f"control_types are first-byte values 0..255, got {t}")
                self.sh.control_types[t] = 1
        self.sh.rekey_messages = _limit(rekey_after_messages, "rekey_after_messages")
        self.sh.reject_messages = _limit(reject_after_messages, "reject_after_messages")
        self.sh.rekey_time = _seconds(rekey_after_time, "rekey_after_time")
        self.sh.reject_time = _seconds(reject_after_time, "reject_after_time")
        self._peers = {}
        self._used_keys = {}
        self._names = {}
        self._owners = {}
        self._next_id = 1
        self._next_gen = 1
        self._framing = None
        self._family = 0
        self._publish()

    def __dealloc__(self):
        cdef PeerSlot *p
        if self.sh == NULL:
            return
        # No pump can run: each holds a reference to its table.  Only C
        # state is used here: the cyclic GC may have emptied the Python
        # objects (the peers' records) already.
        self._reclaim_all()
        while self._all != NULL:
            p = self._all
            self._all = p.all_next
            _free_peer(p)
        _free_snapshot(self.sh.current)
        pthread_mutex_destroy(&self.sh.roamed_lock)
        EVP_CIPHER_CTX_free(self._ctx)
        EVP_MAC_free(self.sh.blake2s)
        if self.sh.event_fd >= 0:
            close(self.sh.event_fd)
        free(self.sh.control_buf)
        free(self.sh.control_len)
        free(self.sh.control_addr)
        free(self.sh.control_peer)
        pthread_mutex_destroy(&self.sh.control_lock)
        free(self.sh)
        self.sh = NULL

    # ------------------------------------------------------------ publication

    cdef int _publish(self) except -1:
        """Build the lookup snapshot of the peers as they are, swap it in,
        and retire the old one."""
        cdef Snapshot *s
        cdef PeerSlot *p
        cdef Keypair *k
        cdef Keypair *keys[3]
        cdef uint32_t pos = 0, i, at, size, nkeys = 0, nendpoints = 0
        cdef const uint8_t *packed
        cdef Snapshot *old
        cdef uint64_t g
        cdef unsigned int taken_in, i_roamed
        if self._batch_depth:
            self._dirty = True
            return 0
        # The peers moved so far: the snapshot built below reads their new
        # endpoints, so once it is published they need no listing.
        pthread_mutex_lock(&self.sh.roamed_lock)
        taken_in = self.sh.roamed_count
        pthread_mutex_unlock(&self.sh.roamed_lock)
        s = <Snapshot *>calloc(1, sizeof(Snapshot))
        if s == NULL:
            raise MemoryError()
        try:
            if trie_init(&s.allowed.v4, 32) != 0 or trie_init(&s.allowed.v6, 128) != 0:
                raise MemoryError()
            records = list(self._peers.values())
            s.npeers = len(records)
            s.peers = <PeerSlot **>calloc(s.npeers + 1, sizeof(PeerSlot *))
            if s.peers == NULL:
                raise MemoryError()
            for record in records:
                p = <PeerSlot *><size_t>record.slot
                s.peers[pos] = p
                for v6, raw, length in record.packed:
                    packed = raw
                    if trie_insert(&s.allowed.v6 if v6 else &s.allowed.v4,
                                   packed, length, pos + 1) != 0:
                        raise MemoryError()
                if p.endpoint_known:
                    nendpoints += 1
                nkeys += 3
                pos += 1
            if nendpoints:
                size = _table_size(nendpoints)
                s.by_endpoint = <uint32_t *>calloc(size, sizeof(uint32_t))
                if s.by_endpoint == NULL:
                    raise MemoryError()
                s.endpoint_mask = size - 1
                for pos in range(s.npeers):
                    p = s.peers[pos]
                    if not p.endpoint_known:
                        continue
                    # One entry per address (the first peer there wins): peers
                    # sharing an endpoint must not make a long probe chain
                    # that every datagram walks.
                    i = address_hash(&p.endpoint) & s.endpoint_mask
                    while s.by_endpoint[i] != 0 and not same_address(
                            &s.peers[s.by_endpoint[i] - 1].endpoint, &p.endpoint):
                        i = (i + 1) & s.endpoint_mask
                    if s.by_endpoint[i] == 0:
                        s.by_endpoint[i] = pos + 1
            if nkeys:
                size = _table_size(nkeys)
                s.by_index = <Keypair **>calloc(size, sizeof(Keypair *))
                if s.by_index == NULL:
                    raise MemoryError()
                s.index_mask = size - 1
                for pos in range(s.npeers):
                    p = s.peers[pos]
                    keys[0] = <Keypair *>tr_load_ptr(<void **>&p.current)
                    keys[1] = <Keypair *>tr_load_ptr(<void **>&p.previous)
                    keys[2] = <Keypair *>tr_load_ptr(<void **>&p.next)
                    for i in range(3):
                        k = keys[i]
                        if k == NULL:
                            continue
                        at = (k.local_index * 2654435761u) & s.index_mask
                        while s.by_index[at] != NULL:
                            at = (at + 1) & s.index_mask
                        s.by_index[at] = k
        except BaseException:
            _free_snapshot(s)
            raise
        old = self.sh.current
        tr_store_ptr(<void **>&self.sh.current, s)
        g = self.sh.gen + 1
        tr_store64(&self.sh.gen, g)
        if taken_in:
            # Loops scan the listing without its lock: entries move down,
            # the freed tail goes NULL (a peer read twice or missed once
            # while they move is found by the new snapshot's map).
            pthread_mutex_lock(&self.sh.roamed_lock)
            for i_roamed in range(taken_in, self.sh.roamed_count):
                tr_store_ptr(<void **>&self.sh.roamed[i_roamed - taken_in], self.sh.roamed[i_roamed])
            for i_roamed in range(self.sh.roamed_count - taken_in, ROAMED):
                tr_store_ptr(<void **>&self.sh.roamed[i_roamed], NULL)
            self.sh.roamed_count -= taken_in
            pthread_mutex_unlock(&self.sh.roamed_lock)
        self.publications += 1
        self._dirty = False
        if old != NULL:
            self._retire(RETIRE_SNAPSHOT, old)
        self._reclaim()
        return 0

    cdef int _retire(self, int kind, void *ptr) except -1:
        """Free `ptr` once no loop can hold it: after the newest publication."""
        cdef Retired *r
        if ptr == NULL:
            return 0
        r = <Retired *>malloc(sizeof(Retired))
        if r == NULL:
            raise MemoryError()
        r.kind = kind
        r.ptr = ptr
        r.gen = self.sh.gen
        r.next = NULL
        if self._retired_tail == NULL:
            self._retired = r
        else:
            self._retired_tail.next = r
        self._retired_tail = r
        self._retired_count += 1
        return 0

    cdef int _reclaim(self):
        """Free what every loop has passed (the list is in retirement
        order, so it stops at the first that must wait).  Returns how many
        wait still."""
        cdef uint64_t oldest = _NO_LIMIT, epoch
        cdef int i
        cdef Retired *r
        if self._retired == NULL:
            return 0
        for i in range(MAX_READERS):
            if self.sh.reader_used[i]:
                epoch = tr_load64(&self.sh.readers[i].epoch)
                if epoch != 0 and epoch < oldest:
                    oldest = epoch
        while self._retired != NULL and self._retired.gen <= oldest:
            r = self._retired
            self._retired = r.next
            _free_retired(r.kind, r.ptr)
            free(r)
            self._retired_count -= 1
        if self._retired == NULL:
            self._retired_tail = NULL
        return <int>self._retired_count

    def _reclaim_all(self):
        cdef Retired *r
        while self._retired != NULL:
            r = self._retired
            self._retired = r.next
            _free_retired(r.kind, r.ptr)
            free(r)
        self._retired_tail = NULL
        self._retired_count = 0

    cdef void _unlink(self, PeerSlot *p):
        """Take a removed peer out of the table's list, and out of the
        recently-roamed ring (a loop that read it there is still protected
        by its epoch: the peer is retired, not freed)."""
        cdef unsigned int i, kept = 0
        if p.all_prev != NULL:
            p.all_prev.all_next = p.all_next
        else:
            self._all = p.all_next
        if p.all_next != NULL:
            p.all_next.all_prev = p.all_prev
        p.all_prev = p.all_next = NULL
        pthread_mutex_lock(&self.sh.roamed_lock)
        for i in range(self.sh.roamed_count):
            if self.sh.roamed[i] != p:
                tr_store_ptr(<void **>&self.sh.roamed[kept], self.sh.roamed[i])
                kept += 1
        for i in range(kept, ROAMED):
            tr_store_ptr(<void **>&self.sh.roamed[i], NULL)
        self.sh.roamed_count = kept
        pthread_mutex_unlock(&self.sh.roamed_lock)

    cdef int _register(self) except -1:
        cdef int i
        for i in range(MAX_READERS):
            if not self.sh.reader_used[i]:
                self.sh.reader_used[i] = 1
                tr_store64(&self.sh.readers[i].epoch, 0)
                return i
        raise PumpArgumentError(f"a PeerTable serves at most {MAX_READERS // 2} pumps")

    def _unregister(self, int reader):
        tr_store64(&self.sh.readers[reader].epoch, 0)
        self.sh.reader_used[reader] = 0

    def _use_family(self, int family):
        """The first pump's socket family is every pump's: endpoints given
        before are rewritten for it (IPv4 on an IPv6 socket: mapped)."""
        cdef PeerSlot *p
        if self._family != 0 and self._family != family:
            raise PumpArgumentError("the pumps of one PeerTable need sockets of one address "
                                    "family (an IPv6 socket also reaches IPv4 peers)")
        if self._family == family:
            return
        self._family = family
        for record in self._peers.values():
            p = <PeerSlot *><size_t>record.slot
            if record.endpoint is not None and p.endpoint_known:
                _set_endpoint(p, record.endpoint, family)
        self._publish()

    def _use_framing(self, str framing):
        """The first pump fixes the table's framing (and the default
        control classifier)."""
        cdef int t
        if self._framing is not None and self._framing != framing:
            raise PumpArgumentError(f"this PeerTable serves framing {self._framing!r}, "
                                    f"not {framing!r}")
        if self._framing is None and self._control_default and framing == "session":
            for t in range(256):
                self.sh.control_types[t] = t != SESSION_TYPE_DATA
        self._framing = framing

    @contextlib.contextmanager
    def batch(self):
        """Many changes, one publication (when the outermost batch ends)."""
        self._batch_depth += 1
        try:
            yield self
        finally:
            self._batch_depth -= 1
            if self._batch_depth == 0 and self._dirty:
                self._publish()

    # ------------------------------------------------------------ peers

    def add(self, str name, *, endpoint=None, allowed_ips=(), bint roaming=True):
        """A new peer; returns its id (never reused).  ``endpoint``: (host,
        port) or None (learned: framing session from its first
        authenticated datagram, raw/len16 from a datagram whose inner source
        its allowed IPs hold, when ``roaming``).  ``allowed_ips``: networks
        ("10.9.0.2/32", "fd09::/64"); a network belongs to one peer."""
        cdef void *mem = NULL
        cdef PeerSlot *p
        if not name:
            raise PumpArgumentError("a peer needs a name")
        if name in self._names:
            raise PumpArgumentError(f"a peer named {name!r} exists already")
        nets = self._networks(allowed_ips, None)
        if posix_memalign(&mem, 64, sizeof(PeerSlot)) != 0:
            raise MemoryError()
        p = <PeerSlot *>mem
        memset(p, 0, sizeof(PeerSlot))
        pthread_mutex_init(&p.lock, NULL)
        p.id = self._next_id
        p.roaming = roaming
        record = _PeerRecord()
        record.id = self._next_id
        record.name = name
        record.allowed = []
        record.packed = []
        record.roaming = bool(roaming)
        record.slot = <size_t>p
        record.endpoint = endpoint
        try:
            if endpoint is not None:
                _set_endpoint(p, endpoint, self._family)
        except BaseException:
            pthread_mutex_destroy(&p.lock)
            free(p)
            raise
        self._next_id += 1
        self._peers[record.id] = record
        self._names[name] = record.id
        p.all_next = self._all
        if self._all != NULL:
            self._all.all_prev = p
        self._all = p
        self._own(record, nets)
        self._publish()
        return record.id

    def update(self, peer_id, *, endpoint=_KEEP, allowed_ips=_KEEP, roaming=_KEEP):
        """Change a peer; keywords left out keep their value.  ``endpoint=None``
        forgets the endpoint (learned again if roaming)."""
        record = self._record(peer_id)
        cdef PeerSlot *p = <PeerSlot *><size_t>record.slot
        nets = self._networks(allowed_ips, peer_id) if allowed_ips is not _KEEP else None
        if endpoint is not _KEEP:
            if endpoint is None:
                pthread_mutex_lock(&p.lock)
                tr_seq_write_begin(&p.endpoint_seq)
                p.endpoint_known = 0
                tr_seq_write_end(&p.endpoint_seq)
                pthread_mutex_unlock(&p.lock)
            else:
                _set_endpoint(p, endpoint, self._family)
            record.endpoint = endpoint
        if nets is not None:
            self._own(record, nets)
        if roaming is not _KEEP:
            record.roaming = bool(roaming)
            p.roaming = record.roaming
        self._publish()

    def remove(self, peer_id):
        """Take a peer out; its memory is freed once no loop can hold it."""
        record = self._record(peer_id)
        cdef PeerSlot *p = <PeerSlot *><size_t>record.slot
        del self._peers[record.id]
        del self._names[record.name]
        self._own(record, [])
        self._unlink(p)
        self._publish()
        self._retire(RETIRE_PEER, p)
        self._reclaim()

    def ids(self):
        return list(self._peers)

    def __len__(self):
        return len(self._peers)

    def name(self, peer_id):
        return self._record(peer_id).name

    def find(self, str name):
        """The id of the peer called `name`, or None."""
        return self._names.get(name)

    def info(self, peer_id):
        """One peer: its configuration, where it is, its counters and sessions."""
        record = self._record(peer_id)
        cdef PeerSlot *p = <PeerSlot *><size_t>record.slot
        cdef sockaddr_storage where
        cdef uint64_t seen = tr_load64(&p.last_seen_ms)
        cdef Keypair *k
        endpoint = _shown(&where) if peer_endpoint(p, &where) else None
        sessions = {"current": _index_of(p.current), "previous": _index_of(p.previous),
                    "next": _index_of(p.next)}
        return {
            "id": record.id,
            "name": record.name,
            "endpoint": endpoint,
            "allowed_ips": [str(net) for net in record.allowed],
            "roaming": record.roaming,
            "roams": p.roams,
            "last_seen": (None if seen == 0 else
                          time.time() - (time.monotonic() - (seen - 1) / 1000.0)),
            "egress": {"packets": p.egress.packets, "bytes": p.egress.bytes,
                       "drops": p.egress.drops, "keepalives": p.egress.keepalives},
            "ingress": {"packets": p.ingress.packets, "bytes": p.ingress.bytes,
                        "drops": p.ingress.drops, "keepalives": p.ingress.keepalives},
            "sessions": sessions,
        }

    def stats(self):
        """info() of every peer, keyed by name."""
        return {record.name: self.info(record.id) for record in self._peers.values()}

    def route(self, address):
        """The peer whose allowed IPs hold ``address`` longest, or None."""
        ip = ipaddress.ip_address(address)
        raw = ip.packed
        cdef const uint8_t *packed = raw
        cdef Snapshot *s = self.sh.current
        cdef uint32_t at = trie_lookup(&s.allowed.v4 if ip.version == 4 else &s.allowed.v6, packed)
        return None if at == NO_PEER else s.peers[at - 1].id

    def counts(self):
        """The table's own counters."""
        self._reclaim()
        return {"peers": len(self._peers), "publications": self.publications,
                "retired_pending": self._retired_count,
                "control_queued": self.sh.control_queued,
                "control_dropped": self.sh.control_dropped,
                "control_waiting": self.sh.control_count,
                "staged_queued": self.sh.staged_queued,
                "staged_dropped": self.sh.staged_dropped,
                "gate_bad_mac1": self.sh.gate_bad_mac1,
                "gate_mac2_ok": self.sh.gate_mac2_ok,
                "gate_shed": self.sh.gate_shed,
                "gate_source_capped": self.sh.gate_source_capped}

    def set_handshake_gate(self, mac1_key=None, cookie_secret=None, double valid_for=0):
        """Let the loops sort WireGuard handshake messages (types 1 and 2)
        while the control queue is under load (1/8 full, latched for a
        second): a message whose mac1 (under ``mac1_key``, 32 bytes:
        HASH("mac1----" || our public key)) is wrong is dropped there, one
        whose mac2 shows a cookie made with ``cookie_secret`` (32 bytes,
        good for ``valid_for`` more seconds) for its sender's address may
        take any free slot, the rest only the first quarter of the queue.
        So a flood cannot keep a real peer's cookie-carrying message out.
        ``mac1_key=None`` turns the gate off.  Python still checks every
        message it gets; counts() has gate_bad_mac1, gate_mac2_ok and
        gate_shed."""
        for label, value in (("mac1_key", mac1_key), ("cookie_secret", cookie_secret)):
            if value is not None and not (isinstance(value, bytes) and len(value) == 32):
                raise PumpArgumentError(f"{label} must be 32 bytes or None")
        pthread_mutex_lock(&self.sh.control_lock)
        if mac1_key is None:
            self.sh.gate_on = 0
        else:
            memcpy(self.sh.gate_mac1_key, <const uint8_t *>mac1_key, 32)
            self.sh.gate_on = 1
        if cookie_secret is None or valid_for <= 0:
            self.sh.gate_secret_until = 0
        else:
            memcpy(self.sh.gate_secret, <const uint8_t *>cookie_secret, 32)
            self.sh.gate_secret_until = tr_monotonic() + valid_for
        pthread_mutex_unlock(&self.sh.control_lock)

    # ------------------------------------------------------------ sessions

    def install_session(self, peer_id, *, local_index, remote_index, send_key, recv_key,
                        bint initiator):
        """Install a session's keys for a peer (framing "session").
        ``initiator``: it becomes current at once (previous: an unconfirmed
        next if there is one, as in WireGuard, else the old current); else
        it becomes next, and current when the peer's first datagram under
        it authenticates.
        ``local_index``: the receiver index the peer puts in its datagrams
        (unique in the table); ``remote_index``: the one we put in ours."""
        record = self._record(peer_id)
        cdef PeerSlot *p = <PeerSlot *><size_t>record.slot
        cdef Keypair *k
        cdef Keypair *gone[2]
        if not (isinstance(send_key, bytes) and len(send_key) == 32
                and isinstance(recv_key, bytes) and len(recv_key) == 32):
            raise PumpArgumentError("send_key and recv_key must be 32 bytes each")
        for label, value in (("local_index", local_index), ("remote_index", remote_index)):
            if not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
                raise PumpArgumentError(f"{label} must be 0..2^32-1, got {value!r}")
        if local_index in self._live_indexes():
            raise PumpArgumentError(f"local_index {local_index} is in use by another session")
        # Counters start at 0 for every session: the same send key twice
        # would send under nonces already used with it.
        seen = hashlib.blake2b(send_key, digest_size=16).digest()
        if seen in self._used_keys:
            raise PumpArgumentError("send_key was installed before: sending under it again "
                                    "would reuse its nonces (every session needs fresh keys)")
        self._used_keys[seen] = None
        if len(self._used_keys) > USED_KEYS_REMEMBERED:
            del self._used_keys[next(iter(self._used_keys))]
        k = <Keypair *>calloc(1, sizeof(Keypair))
        if k == NULL:
            raise MemoryError()
        memcpy(k.send_key, <const uint8_t *>send_key, 32)
        memcpy(k.recv_key, <const uint8_t *>recv_key, 32)
        k.local_index = local_index
        k.remote_index = remote_index
        k.gen = self._next_gen
        self._next_gen += 1
        k.created = tr_monotonic()
        k.peer = p
        pthread_mutex_init(&k.lock, NULL)
        gone[0] = gone[1] = NULL
        pthread_mutex_lock(&p.lock)
        if initiator:
            # A responder session the peer has not confirmed yet stays
            # usable as previous (the peer may be sending under it now:
            # both ends initiated at once); else the old current does.
            gone[0] = p.previous
            if p.next != NULL:
                gone[1] = p.current
                tr_store_ptr(<void **>&p.previous, p.next)
                tr_store_ptr(<void **>&p.next, NULL)
            else:
                tr_store_ptr(<void **>&p.previous, p.current)
            tr_store_ptr(<void **>&p.current, k)
        else:
            gone[0] = p.next
            tr_store_ptr(<void **>&p.next, k)
        pthread_mutex_unlock(&p.lock)
        self._publish()
        self._retire(RETIRE_KEYPAIR, gone[0])
        self._retire(RETIRE_KEYPAIR, gone[1])
        self._reclaim()

    def clear_sessions(self, peer_id):
        """Forget every session of a peer (nothing is sent to it until a new
        one is installed)."""
        record = self._record(peer_id)
        cdef PeerSlot *p = <PeerSlot *><size_t>record.slot
        cdef Keypair *gone[3]
        pthread_mutex_lock(&p.lock)
        gone[0] = p.current
        gone[1] = p.previous
        gone[2] = p.next
        tr_store_ptr(<void **>&p.current, NULL)
        tr_store_ptr(<void **>&p.previous, NULL)
        tr_store_ptr(<void **>&p.next, NULL)
        pthread_mutex_unlock(&p.lock)
        self._publish()
        for i in range(3):
            self._retire(RETIRE_KEYPAIR, gone[i])
        self._reclaim()

    def _keepalive(self, peer_id):
        """A keepalive for a peer (an empty packet sealed under its current
        session's next counter) and where to send it."""
        return self._seal(peer_id, b"")

    def _seal(self, peer_id, packet, size_t mtu=0):
        """`packet` sealed for a peer under its current session's next counter
        (padded like the loops pad, to at most `mtu`; 0: a multiple of 16
        whatever the length), and where to send it: (datagram,
        (host, port)).  Counted in the peer's egress counters (an empty
        packet as a keepalive)."""
        record = self._record(peer_id)
        cdef PeerSlot *p = <PeerSlot *><size_t>record.slot
        cdef Keypair *k = <Keypair *>tr_load_ptr(<void **>&p.current)
        cdef sockaddr_storage where
        cdef uint64_t counter
        cdef const uint8_t[::1] view
        cdef size_t length = len(packet)
        cdef size_t pad
        cdef double now = tr_monotonic()
        if length > CONTROL_SLOT:
            raise PumpArgumentError(f"a packet sent from Python is at most {CONTROL_SLOT} bytes, "
                                    f"got {length}")
        if k == NULL:
            raise PumpStateError(f"peer {record.name!r} has no current session to send with")
        if not peer_endpoint(p, &where):
            raise PumpStateError(f"peer {record.name!r} has no endpoint yet")
        pad = session_pad(length, mtu if mtu else length + SESSION_PAD_MAX)
        out = PyBytes_FromStringAndSize(NULL, SESSION_OVERHEAD + length + pad)
        cdef uint8_t *d = <uint8_t *>PyBytes_AS_STRING(out)
        if length:
            view = memoryview(packet).cast("B")
            memcpy(d + SESSION_HEADER_LEN, &view[0], length)
        if session_counter(self.sh, k, now, &counter) != DROP_NONE:
            raise PumpStateError(f"peer {record.name!r}: its session is past its limits")
        if seal_with(self._ctx, &self._ctx_gen, k, counter, d, d + SESSION_HEADER_LEN, length,
                     NULL, 0, d + SESSION_HEADER_LEN + length, 0, pad) != DROP_NONE:
            raise MemoryError("OpenSSL refused to seal")
        if length:
            tr_add64(&p.egress.packets, 1)
            tr_add64(&p.egress.bytes, length + pad)
            tr_store64(&p.egress.last_ms, <uint64_t>(now * 1000) + 1)
        else:
            tr_add64(&p.egress.keepalives, 1)
        return out, _sockaddr_tuple(&where)

    def activity(self):
        """When each peer was last heard from and last exchanged data:
        {peer_id: (last_seen, last_data_received, last_data_sent)}, each a
        time.monotonic() value or None.  last_seen counts any authenticated
        datagram (keepalives too); the data times count packets only (a
        keepalive is not data).  One call for a control plane's timer tick."""
        cdef PeerSlot *p
        out = {}
        for record in self._peers.values():
            p = <PeerSlot *><size_t>record.slot
            out[record.id] = (_ms_time(tr_load64(&p.last_seen_ms)),
                              _ms_time(tr_load64(&p.ingress.last_ms)),
                              _ms_time(tr_load64(&p.egress.last_ms)))
        return out

    def _live_indexes(self):
        cdef PeerSlot *p
        cdef Keypair *k
        live = set()
        for record in self._peers.values():
            p = <PeerSlot *><size_t>record.slot
            for index in (_index_of(p.current), _index_of(p.previous), _index_of(p.next)):
                if index is not None:
                    live.add(index)
        return live

    # ------------------------------------------------------------ control plane

    def fileno(self):
        """An fd that is readable while control datagrams or events wait
        (for asyncio's add_reader, select, poll)."""
        return self.sh.event_fd

    def take(self):
        """Drain the control queue and the peers' events: a list of Event,
        control datagrams first, in arrival order."""
        cdef eventfd_t value
        cdef unsigned int bits, i, at
        cdef PeerSlot *p
        cdef Keypair *dropped[4]
        cdef unsigned int ndropped
        cdef sockaddr_storage where
        eventfd_read(self.sh.event_fd, &value)
        tr_xchg32(&self.sh.signalled, 0)
        events = []
        pthread_mutex_lock(&self.sh.control_lock)
        try:
            while self.sh.control_count:
                at = self.sh.control_head
                data = PyBytes_FromStringAndSize(
                    <char *>self.sh.control_buf + <size_t>at * CONTROL_SLOT, self.sh.control_len[at])
                if self.sh.control_peer[at]:
                    events.append(Event("staged", self.sh.control_peer[at], None, data))
                    self.sh.control_staged -= 1
                else:
                    events.append(Event("control", None, _shown(&self.sh.control_addr[at]), data))
                self.sh.control_head = (at + 1) % self.sh.control_slots
                self.sh.control_count -= 1
        finally:
            pthread_mutex_unlock(&self.sh.control_lock)
        retire = []
        if tr_xchg32(&self.sh.events_any, 0):
            for record in list(self._peers.values()):
                p = <PeerSlot *><size_t>record.slot
                bits = tr_xchg32(&p.events, 0)
                if bits & EVENT_ENDPOINT:
                    events.append(Event("endpoint", record.id,
                                        _shown(&where) if peer_endpoint(p, &where) else None,
                                        None))
                if bits & EVENT_RENEW:
                    asked = p.renew_session
                    events.append(Event("renew", record.id, None, None,
                                        None if asked == 0 else <uint32_t>(asked - 1)))
                if bits & EVENT_PROMOTED:
                    pthread_mutex_lock(&p.lock)
                    ndropped = p.ndropped
                    for i in range(ndropped):
                        dropped[i] = p.dropped[i]
                    p.ndropped = 0
                    pthread_mutex_unlock(&p.lock)
                    for i in range(ndropped):
                        retire.append(<size_t>dropped[i])
                    events.append(Event("promoted", record.id, None, None, _index_of(p.current)))
        # A new snapshot, then the keys pushed out go once no loop holds
        # them.  Moved endpoints need one only where datagrams find their
        # peer by endpoint (raw/len16): session peers go by receiver index.
        if retire or (self._framing != "session"
                      and any(e.kind == "endpoint" for e in events)):
            self._publish()
            for address in retire:
                self._retire(RETIRE_KEYPAIR, <void *><size_t>address)
        self._reclaim()
        return events

    # ------------------------------------------------------------ helpers

    def _record(self, peer_id):
        try:
            return self._peers[peer_id]
        except (KeyError, TypeError):
            raise PumpArgumentError(f"no peer with id {peer_id!r}") from None

    def _networks(self, allowed_ips, owner):
        if isinstance(allowed_ips, (str, bytes)):
            raise PumpArgumentError("allowed_ips is a list of networks, not one string")
        nets = []
        for value in allowed_ips:
            try:
                net = ipaddress.ip_network(value)
            except ValueError as exc:
                raise PumpArgumentError(f"allowed_ips: {exc}") from None
            if net in nets:
                raise PumpArgumentError(f"allowed_ips: {net} is given twice")
            holder = self._owners.get(net, owner)
            if holder != owner:
                raise PumpArgumentError(
                    f"allowed_ips: {net} belongs to peer {self._peers[holder].name!r}")
            nets.append(net)
        return nets

    def _own(self, record, nets):
        """Give `record` exactly the networks `nets` (checked by _networks)."""
        for net in record.allowed:
            del self._owners[net]
        for net in nets:
            self._owners[net] = record.id
        record.allowed = nets
        record.packed = [(net.version == 6, net.network_address.packed, net.prefixlen)
                         for net in nets]


cdef void _set_endpoint(PeerSlot *p, endpoint, int family) except *:
    """Write a peer's endpoint as the table's sockets address it: `family`
    is theirs (0 before a pump attached): an IPv4 endpoint on an IPv6
    socket is ::ffff:a.b.c.d, as the kernel reports its datagrams."""
    cdef sockaddr_storage address
    cdef socklen_t length
    if not isinstance(endpoint, tuple) or len(endpoint) < 2:
        raise PumpArgumentError(f"endpoint must be (host, port), got {endpoint!r}")
    host = str(endpoint[0])
    if family == AF_INET and ":" in host:
        raise PumpArgumentError(f"endpoint {endpoint!r}: an IPv6 address, and this table's "
                                "sockets are IPv4")
    if family == 0:
        family = AF_INET6 if ":" in host else AF_INET
    try:
        length = _fill_sockaddr(&address, family, endpoint)
    except OSError as exc:
        raise PumpArgumentError(f"endpoint {endpoint!r}: {exc}") from None
    pthread_mutex_lock(&p.lock)
    tr_seq_write_begin(&p.endpoint_seq)
    memcpy(&p.endpoint, &address, sizeof(sockaddr_storage))
    p.endpoint_len = length
    p.endpoint_known = 1
    tr_seq_write_end(&p.endpoint_seq)
    pthread_mutex_unlock(&p.lock)


cdef object _shown(sockaddr_storage *address):
    """An address as Python shows it, an IPv4-mapped IPv6 one as IPv4 (the
    table's callers give and compare plain IPv4 endpoints)."""
    cdef sockaddr_in6 *v6 = <sockaddr_in6 *>address
    cdef const uint8_t *b = <const uint8_t *>&v6.sin6_addr
    if address.ss_family == AF_INET6 and memcmp(b, b"\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0:
        return socket.inet_ntop(socket.AF_INET, PyBytes_FromStringAndSize(<char *>b + 12, 4)), \
            ntohs(v6.sin6_port)
    return _sockaddr_tuple(address)


cdef object _ms_time(uint64_t ms):
    """A loop's stored time (monotonic ms + 1; 0: never) as monotonic s."""
    return None if ms == 0 else (ms - 1) / 1000.0


cdef object _index_of(Keypair *k):
    return None if k == NULL else k.local_index


cdef void _free_peer(PeerSlot *p) noexcept nogil:
    cdef unsigned int i
    if p == NULL:
        return
    _free_keypair(p.current)
    _free_keypair(p.previous)
    _free_keypair(p.next)
    for i in range(p.ndropped):
        _free_keypair(p.dropped[i])
    pthread_mutex_destroy(&p.lock)
    free(p)


cdef void _free_retired(int kind, void *ptr) noexcept nogil:
    if kind == RETIRE_SNAPSHOT:
        _free_snapshot(<Snapshot *>ptr)
    elif kind == RETIRE_PEER:
        _free_peer(<PeerSlot *>ptr)
    else:
        _free_keypair(<Keypair *>ptr)


cdef uint64_t _limit(value, str name) except? 0:
    if value is None:
        return _NO_LIMIT
    if not isinstance(value, int) or value < 1:
        raise PumpArgumentError(f"{name} must be a positive int, got {value!r}")
    return min(value, _NO_LIMIT)


cdef double _seconds(value, str name) except? -1:
    if value is None:
        return 0
    if not isinstance(value, (int, float)) or value <= 0:
        raise PumpArgumentError(f"{name} must be positive seconds, got {value!r}")
    return float(value)
