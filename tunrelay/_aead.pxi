# The aead framing (wire version 2): authenticated encryption inside the
# batched loops.
#
# On the wire each datagram (UDP) or len16 record (TCP) is
#     header (24 bytes) | ciphertext | tag (16 bytes)
#     header = type | sender's role | 2 zero bytes | session id (12) | counter (8, big-endian)
#     session id = the sender's start time (4, big-endian seconds) | 64 random bits
# The header is the associated data; the nonce is 4 zero bytes and the
# counter.  Type 0x02 is a data packet; 0x03 a hello (empty, the first
# record of a TCP connection, checked in Python before the loops start).
#
# Keys (aead.py is the Python twin): each role ("a", "b") has a direction
# key, HKDF of the PSK naming the role; a session's key is HKDF-Expand of
# the sender's direction key and the session id.  A relay seals with its
# own role's keys and opens with the other role's, so its own datagrams,
# reflected back to it, never authenticate.
#
# Receiving: the peer's sessions live in one table per relay (AeadShared,
# owned by a Keyring) that every queue's ingress loop uses under one mutex,
# so a session has one replay window whatever queue a datagram lands on.
# Only the decryption itself runs outside the lock.  A session not in the
# table costs one HMAC and one tag check (about what receiving the datagram
# costs), so every unknown session is tried: a flood cannot starve the real
# peer's new session.  A session that started before the newest one seen is
# refused (a recording), and when a newer one authenticates the older ones
# are evicted.  The peer's endpoint follows the newest authenticated
# datagram of its newest session (roaming).
#
# Everything here runs without the GIL; the EVP contexts are made once and
# per packet only the nonce changes (a context is rekeyed only when its
# slot takes a new session).

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from tunrelay.includes.crypto cimport (
    EVP_CIPHER, EVP_CIPHER_CTX, EVP_CIPHER_CTX_free, EVP_CIPHER_CTX_new, EVP_CTRL_AEAD_GET_TAG,
    EVP_CTRL_AEAD_SET_TAG, EVP_CIPHER_CTX_ctrl, EVP_DecryptFinal_ex, EVP_DecryptInit_ex,
    EVP_DecryptUpdate, EVP_EncryptFinal_ex, EVP_EncryptInit_ex, EVP_EncryptUpdate,
    EVP_aes_256_gcm, EVP_chacha20_poly1305, EVP_sha256, HMAC, OPENSSL_cleanse)
from tunrelay.includes.system cimport (
    pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock, pthread_mutex_unlock,
    sockaddr_storage, socklen_t, tr_seq_read_begin, tr_seq_read_retry, tr_seq_write_begin,
    tr_seq_write_end)

cdef enum:
    AEAD_TYPE_V1_DATA = 0x01  # wire version 1: an older tunrelay at the other end
    AEAD_TYPE_DATA = 0x02
    AEAD_TYPE_HELLO = 0x03
    AEAD_OPEN_OK = -1         # else a drop reason


cdef inline uint64_t get64(const uint8_t *p) noexcept nogil:
    return (<uint64_t>get32(p) << 32) | get32(p + 4)


cdef inline void put64(uint8_t *p, uint64_t v) noexcept nogil:
    put32(p, <uint32_t>(v >> 32))
    put32(p + 4, <uint32_t>v)


cdef int session_key(const uint8_t *direction_key, const uint8_t *session,
                     uint8_t *key) noexcept nogil:
    """HKDF-Expand (RFC 5869), one block: HMAC-SHA256(direction key,
    session id | 0x01).  aead.derive_key() is the Python twin."""
    cdef uint8_t info[AEAD_SESSION_LEN + 1]
    cdef unsigned int out_len = 0
    memcpy(info, session, AEAD_SESSION_LEN)
    info[AEAD_SESSION_LEN] = 1
    if HMAC(EVP_sha256(), direction_key, AEAD_KEY_LEN, info, AEAD_SESSION_LEN + 1,
            key, &out_len) == NULL:
        return -1
    return 0


cdef inline void aead_nonce(uint64_t counter, uint8_t *nonce) noexcept nogil:
    memset(nonce, 0, 4)
    put64(nonce + 4, counter)


# ---------------------------------------------------------------- sending

cdef int sender_start(AeadSender *s, AeadShared *sh, const uint8_t *session) noexcept nogil:
    """Key a sender for a new session of ours (counter from 0)."""
    cdef uint8_t key[AEAD_KEY_LEN]
    cdef int status = 0
    memcpy(s.session, session, AEAD_SESSION_LEN)
    s.counter = 0
    if session_key(sh.send_key, session, key) != 0 \
            or EVP_EncryptInit_ex(s.ctx, sh.evp, NULL, key, NULL) != 1:
        status = -1
    OPENSSL_cleanse(key, AEAD_KEY_LEN)
    return status


cdef int aead_seal(AeadShared *sh, AeadSender *s, uint8_t kind, uint8_t *header,
                   uint8_t *first, size_t first_len, uint8_t *second, size_t second_len,
                   uint8_t *tag) noexcept nogil:
    """Encrypt, in place, the packet made of first and second (second may
    be empty), under a fresh counter; write the header and the tag."""
    cdef uint8_t nonce[12]
    cdef int out_len
    if s.counter == <uint64_t>-1:
        return -1  # never wrap a nonce (2^64 packets: not in this universe)
    header[0] = kind
    header[1] = sh.role
    header[2] = 0
    header[3] = 0
    memcpy(header + 4, s.session, AEAD_SESSION_LEN)
    put64(header + 16, s.counter)
    aead_nonce(s.counter, nonce)
    s.counter += 1
    if EVP_EncryptInit_ex(s.ctx, NULL, NULL, NULL, nonce) != 1:
        return -1
    if EVP_EncryptUpdate(s.ctx, NULL, &out_len, header, AEAD_HEADER_LEN) != 1:
        return -1
    if first_len and EVP_EncryptUpdate(s.ctx, first, &out_len, first, <int>first_len) != 1:
        return -1
    if second_len and EVP_EncryptUpdate(s.ctx, second, &out_len, second, <int>second_len) != 1:
        return -1
    if EVP_EncryptFinal_ex(s.ctx, tag, &out_len) != 1:
        return -1
    if EVP_CIPHER_CTX_ctrl(s.ctx, EVP_CTRL_AEAD_GET_TAG, AEAD_TAG_LEN, tag) != 1:
        return -1
    return 0


# ---------------------------------------------------------------- receiving

cdef inline bint window_fresh(ReplayWindow *s, uint64_t counter) noexcept nogil:
    """False for a counter seen before or older than the window."""
    if not s.seen or counter > s.top:
        return True
    if s.top - counter >= (AEAD_WINDOW_WORDS - 1) * 64:
        return False
    return not (s.window[(counter >> 6) % AEAD_WINDOW_WORDS] >> (counter & 63)) & 1


cdef inline void window_mark(ReplayWindow *s, uint64_t counter) noexcept nogil:
    """Record an authenticated counter (only after the tag verified, so a
    forgery cannot move the window)."""
    cdef uint64_t block, current, steps, i
    if not s.seen or counter > s.top:
        block = counter >> 6
        current = s.top >> 6 if s.seen else block
        steps = block - current
        if not s.seen or steps >= AEAD_WINDOW_WORDS:
            memset(s.window, 0, sizeof(s.window))
        else:
            for i in range(1, steps + 1):
                s.window[(current + i) % AEAD_WINDOW_WORDS] = 0
        s.top = counter
        s.seen = True
    s.window[(counter >> 6) % AEAD_WINDOW_WORDS] |= (<uint64_t>1) << (counter & 63)


cdef bint aead_verify(EVP_CIPHER_CTX *ctx, uint8_t *datagram, size_t length) noexcept nogil:
    """Decrypt in place and check the tag."""
    cdef uint8_t nonce[12]
    cdef int out_len
    cdef size_t body = length - AEAD_OVERHEAD
    aead_nonce(get64(datagram + 16), nonce)
    if EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1:
        return False
    if EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, AEAD_TAG_LEN,
                           datagram + length - AEAD_TAG_LEN) != 1:
        return False
    if EVP_DecryptUpdate(ctx, NULL, &out_len, datagram, AEAD_HEADER_LEN) != 1:
        return False
    if body and EVP_DecryptUpdate(ctx, datagram + AEAD_HEADER_LEN, &out_len,
                                  datagram + AEAD_HEADER_LEN, <int>body) != 1:
        return False
    return EVP_DecryptFinal_ex(ctx, datagram + AEAD_HEADER_LEN + body, &out_len) == 1


cdef inline int find_slot(AeadShared *sh, const uint8_t *session) noexcept nogil:
    cdef int i
    for i in range(AEAD_SLOTS):
        if sh.slots[i].used and memcmp(sh.slots[i].id, session, AEAD_SESSION_LEN) == 0:
            return i
    return -1


cdef inline bint retired(AeadShared *sh, const uint8_t *session) noexcept nogil:
    cdef unsigned int i
    for i in range(sh.retired_next if sh.retired_next < AEAD_RETIRED else AEAD_RETIRED):
        if memcmp(sh.retired[i], session, AEAD_SESSION_LEN) == 0:
            return True
    return False


cdef int admit(AeadShared *sh, AeadOpener *o, const uint8_t *session, uint32_t start,
               const uint8_t *key, int *out) noexcept nogil:
    """With the lock held, after a datagram of an unknown session verified
    in o.trial_ctx: make it a slot of the table.  A session older than the
    newest is a recording; a newer one means the peer restarted, and every
    older session is over (evicted, so its recordings cannot come back)."""
    cdef int i
    cdef AeadSlot *s
    cdef EVP_CIPHER_CTX *swap
    i = find_slot(sh, session)
    if i >= 0:
        out[0] = i  # another queue admitted it meanwhile
        return AEAD_OPEN_OK
    if start < sh.newest_start or retired(sh, session):
        return DROP_STALE_SESSION
    if start > sh.newest_start:
        for i in range(AEAD_SLOTS):
            if sh.slots[i].used and sh.slots[i].start < start:
                sh.slots[i].used = False
                sh.evicted += 1
        sh.newest_start = start
    s = &sh.slots[0]
    for i in range(AEAD_SLOTS):
        if not sh.slots[i].used:
            s = &sh.slots[i]
            break
        if sh.slots[i].last_used < s.last_used:
            s = &sh.slots[i]
    i = <int>(s - sh.slots)
    if s.used:
        # Pushed out while still current (more same-start sessions than
        # slots): remember it, so its recordings never get a fresh window.
        memcpy(sh.retired[sh.retired_next % AEAD_RETIRED], s.id, AEAD_SESSION_LEN)
        sh.retired_next += 1
        sh.evicted += 1
    s.used = True
    s.gen += 1
    if s.gen == 0:
        s.gen = 1  # 0 means "no key" in an opener
    memcpy(s.id, session, AEAD_SESSION_LEN)
    s.start = start
    memcpy(s.key, key, AEAD_KEY_LEN)
    s.replay.seen = False
    # The trial context holds this session's key: it becomes the slot's.
    swap = o.ctx[i]
    o.ctx[i] = o.trial_ctx
    o.trial_ctx = swap
    o.ctx_gen[i] = s.gen
    sh.new_sessions += 1
    out[0] = i
    return AEAD_OPEN_OK


cdef void move_endpoint(AeadShared *sh, const sockaddr_storage *sender,
                        socklen_t sender_len) noexcept nogil:
    """With the lock held: the peer's endpoint becomes `sender`."""
    if sh.endpoint_known and sh.endpoint_len == sender_len \
            and same_address(&sh.endpoint, sender):
        return
    tr_seq_write_begin(&sh.endpoint_seq)
    if sh.endpoint_known:
        sh.roams += 1
    memcpy(&sh.endpoint, sender, sizeof(sockaddr_storage))
    sh.endpoint_len = sender_len
    sh.endpoint_known = 1
    tr_seq_write_end(&sh.endpoint_seq)


cdef int aead_open(AeadShared *sh, AeadOpener *o, uint8_t kind, uint8_t *datagram,
                   size_t length, const sockaddr_storage *sender,
                   socklen_t sender_len) noexcept nogil:
    """Authenticate and decrypt one datagram of type `kind` in place:
    AEAD_OPEN_OK (the packet is at datagram + AEAD_HEADER_LEN, length -
    AEAD_OVERHEAD bytes) or the drop reason.  `sender` (NULL over TCP) is
    where it came from: the newest datagram moves the peer's endpoint."""
    cdef int slot
    cdef uint64_t counter
    cdef uint32_t start, gen = 0
    cdef uint8_t key[AEAD_KEY_LEN]
    cdef bint fresh = False, rekey = False, newest
    cdef int status
    cdef AeadSlot *s
    if length < AEAD_OVERHEAD:
        return DROP_TOO_SHORT
    if datagram[0] == AEAD_TYPE_V1_DATA:
        return DROP_AEAD_VERSION
    if datagram[0] != kind or datagram[1] > 1 or datagram[2] or datagram[3]:
        return DROP_BAD_FRAME
    if datagram[1] == sh.role:
        # Our own role: our datagram sent back to us (or both ends were
        # given the same role).  It could not authenticate anyway.
        return DROP_REFLECTED
    counter = get64(datagram + 16)
    start = get32(datagram + 4)

    pthread_mutex_lock(&sh.lock)
    slot = find_slot(sh, datagram + 4)
    if slot >= 0:
        s = &sh.slots[slot]
        fresh = window_fresh(&s.replay, counter)
        gen = s.gen
        if fresh and o.ctx_gen[slot] != gen:
            memcpy(key, s.key, AEAD_KEY_LEN)
            rekey = True
    elif start < sh.newest_start:
        pthread_mutex_unlock(&sh.lock)
        return DROP_STALE_SESSION
    pthread_mutex_unlock(&sh.lock)

    # The expensive part, outside the lock.
    if slot >= 0:
        if not fresh:
            return DROP_REPLAY
        if rekey:
            status = EVP_DecryptInit_ex(o.ctx[slot], NULL, NULL, key, NULL)
            OPENSSL_cleanse(key, AEAD_KEY_LEN)
            if status != 1:
                return DROP_BAD_TAG
            o.ctx_gen[slot] = gen
        if not aead_verify(o.ctx[slot], datagram, length):
            return DROP_BAD_TAG
    else:
        if session_key(sh.recv_key, datagram + 4, key) != 0 \
                or EVP_DecryptInit_ex(o.trial_ctx, NULL, NULL, key, NULL) != 1 \
                or not aead_verify(o.trial_ctx, datagram, length):
            OPENSSL_cleanse(key, AEAD_KEY_LEN)
            return DROP_BAD_TAG

    # Authentic: admit a new session, record the counter, follow the peer.
    pthread_mutex_lock(&sh.lock)
    if slot < 0:
        status = admit(sh, o, datagram + 4, start, key, &slot)
        OPENSSL_cleanse(key, AEAD_KEY_LEN)
        if status != AEAD_OPEN_OK:
            pthread_mutex_unlock(&sh.lock)
            return status
    elif sh.slots[slot].gen != gen or not sh.slots[slot].used:
        # Evicted while we decrypted: a newer session of the peer arrived.
        pthread_mutex_unlock(&sh.lock)
        return DROP_STALE_SESSION
    s = &sh.slots[slot]
    if not window_fresh(&s.replay, counter):
        # The same datagram verified on another queue at the same time.
        pthread_mutex_unlock(&sh.lock)
        return DROP_REPLAY
    newest = not s.replay.seen or counter > s.replay.top
    window_mark(&s.replay, counter)
    sh.clock += 1
    s.last_used = sh.clock
    if sender != NULL and newest and start == sh.newest_start:
        move_endpoint(sh, sender, sender_len)
    pthread_mutex_unlock(&sh.lock)
    return AEAD_OPEN_OK


cdef bint aead_endpoint(PumpState *st) noexcept nogil:
    """Egress: copy the peer's endpoint from the shared table into st.peer
    when it moved (a sequence-lock read, no mutex).  True if one is known."""
    cdef AeadShared *sh = st.aead.shared
    cdef unsigned int seq = tr_seq_read_begin(&sh.endpoint_seq)
    cdef int known
    if seq == st.eg.endpoint_seen:
        return st.peer_known
    while True:
        known = sh.endpoint_known
        memcpy(&st.peer, &sh.endpoint, sizeof(sockaddr_storage))
        st.peer_len = sh.endpoint_len
        if not tr_seq_read_retry(&sh.endpoint_seq, seq):
            break
        seq = tr_seq_read_begin(&sh.endpoint_seq)
    st.eg.endpoint_seen = seq
    st.peer_known = known
    return known


# ---------------------------------------------------------------- set-up (with the GIL)

cdef int opener_init(AeadOpener *o, const EVP_CIPHER *evp) except -1:
    cdef int i
    for i in range(AEAD_SLOTS):
        o.ctx[i] = EVP_CIPHER_CTX_new()
        if o.ctx[i] == NULL:
            raise MemoryError()
        if EVP_DecryptInit_ex(o.ctx[i], evp, NULL, NULL, NULL) != 1:
            raise OSError(0, "OpenSSL refused the cipher")
        o.ctx_gen[i] = 0
    o.trial_ctx = EVP_CIPHER_CTX_new()
    if o.trial_ctx == NULL:
        raise MemoryError()
    if EVP_DecryptInit_ex(o.trial_ctx, evp, NULL, NULL, NULL) != 1:
        raise OSError(0, "OpenSSL refused the cipher")
    return 0


cdef void opener_free(AeadOpener *o) noexcept:
    cdef int i
    for i in range(AEAD_SLOTS):
        EVP_CIPHER_CTX_free(o.ctx[i])   # NULL is fine
        o.ctx[i] = NULL
    EVP_CIPHER_CTX_free(o.trial_ctx)
    o.trial_ctx = NULL


cdef int sender_init(AeadSender *s, AeadShared *sh, bytes session) except -1:
    s.ctx = EVP_CIPHER_CTX_new()
    if s.ctx == NULL:
        raise MemoryError()
    if EVP_EncryptInit_ex(s.ctx, sh.evp, NULL, NULL, NULL) != 1 \
            or sender_start(s, sh, <const uint8_t *>session) != 0:
        raise OSError(0, "OpenSSL refused the cipher or the key")
    return 0


cdef class Keyring:
    """The aead keys and peer sessions of one relay, shared by all its
    pumps (one per queue): ``Keyring(key, cipher, role)``.

    ``key``: the 32-byte pre-shared key.  ``role``: "a" or "b", one end
    each (the TCP client is "a", the server "b").  The Keyring holds both
    direction keys, the table of the peer's sessions (one replay window
    per session, whatever queue its datagrams land on) and the peer's
    endpoint, which follows the peer's newest authenticated datagram.
    ``hello()`` and ``verify_hello()`` are the proof a TCP connection
    must give before it carries the tunnel.
    """

    cdef AeadShared *sh
    cdef AeadSender hello_sender
    cdef AeadOpener opener
    cdef readonly str cipher
    cdef readonly str role
    cdef bint locked

    def __cinit__(self, key, str cipher="chacha20-poly1305", str role="a"):
        self.sh = <AeadShared *>calloc(1, sizeof(AeadShared))
        if self.sh == NULL:
            raise MemoryError()
        if pthread_mutex_init(&self.sh.lock, NULL) != 0:
            raise MemoryError()
        self.locked = True
        if cipher not in _aead.CIPHERS:
            raise PumpArgumentError(f"cipher must be one of {_aead.CIPHERS}, got {cipher!r}")
        if role not in _aead.ROLES:
            raise PumpArgumentError(f"role must be one of {_aead.ROLES}, got {role!r}")
        if not isinstance(key, bytes) or len(key) != AEAD_KEY_LEN:
            raise PumpArgumentError("key must be 32 bytes (tunrelay.aead.load_key reads a key file)")
        self.cipher = cipher
        self.role = role
        self.sh.evp = EVP_chacha20_poly1305() if cipher == "chacha20-poly1305" else EVP_aes_256_gcm()
        if self.sh.evp == NULL:
            raise OSError(0, f"this OpenSSL has no {cipher}")
        self.sh.role = _aead.ROLES.index(role)
        send = _aead.direction_key(key, cipher, role)
        recv = _aead.direction_key(key, cipher, _aead.other_role(role))
        memcpy(self.sh.send_key, <const char *>send, AEAD_KEY_LEN)
        memcpy(self.sh.recv_key, <const char *>recv, AEAD_KEY_LEN)
        self.sh.start = _aead.start_time()
        opener_init(&self.opener, self.sh.evp)
        sender_init(&self.hello_sender, self.sh, self.new_session())

    def __dealloc__(self):
        if self.sh == NULL:
            return
        opener_free(&self.opener)
        EVP_CIPHER_CTX_free(self.hello_sender.ctx)
        OPENSSL_cleanse(self.sh, sizeof(AeadShared))   # keys, and the sessions' keys
        if self.locked:
            pthread_mutex_destroy(&self.sh.lock)
        free(self.sh)
        self.sh = NULL

    cdef AeadShared *shared(self):
        return self.sh

    def new_session(self):
        """A fresh session id of ours (a pump's or the hello's)."""
        return _aead.new_session(self.sh.start)

    def hello(self):
        """A sealed hello (aead.OVERHEAD bytes, nothing inside): over TCP
        the first record each end sends."""
        cdef uint8_t buf[AEAD_OVERHEAD]
        if aead_seal(self.sh, &self.hello_sender, AEAD_TYPE_HELLO, buf, NULL, 0, NULL, 0,
                     buf + AEAD_HEADER_LEN) != 0:
            raise OSError(0, "sealing a hello failed")
        return PyBytes_FromStringAndSize(<char *>buf, AEAD_OVERHEAD)

    def verify_hello(self, datagram):
        """True if `datagram` is a hello of the peer that authenticates and
        was not seen before (a replayed hello is refused): its session
        joins the table, as a datagram's would."""
        cdef uint8_t buf[AEAD_OVERHEAD]
        cdef int status
        cdef bytes data = bytes(datagram)
        if len(data) != AEAD_OVERHEAD:
            return False
        memcpy(buf, <const char *>data, AEAD_OVERHEAD)
        # With the GIL held: the Keyring's one opener (and its hello
        # sender) serve one caller at a time.  The loops never need the
        # GIL, so holding it while taking the table's mutex cannot deadlock.
        status = aead_open(self.sh, &self.opener, AEAD_TYPE_HELLO, buf, AEAD_OVERHEAD, NULL, 0)
        return status == AEAD_OPEN_OK

    def set_endpoint(self, sock_family, peer):
        """Where to send before the peer's first datagram (a configured
        peer); it moves with the peer's newest authenticated datagram."""
        cdef sockaddr_storage address
        cdef socklen_t length = _fill_sockaddr(&address, sock_family, peer)
        with nogil:
            pthread_mutex_lock(&self.sh.lock)
            move_endpoint(self.sh, &address, length)
            self.sh.roams = 0
            pthread_mutex_unlock(&self.sh.lock)

    @property
    def endpoint(self):
        """The peer's endpoint as (host, port), or None before it is known."""
        cdef sockaddr_storage address
        cdef unsigned int seq
        cdef int known
        while True:
            seq = tr_seq_read_begin(&self.sh.endpoint_seq)
            known = self.sh.endpoint_known
            memcpy(&address, &self.sh.endpoint, sizeof(sockaddr_storage))
            if not tr_seq_read_retry(&self.sh.endpoint_seq, seq):
                break
        return _sockaddr_tuple(&address) if known else None

    def counts(self):
        """{"sessions": peer sessions accepted, "evicted": sessions ended by a
        newer one (or pushed out), "roams": endpoint moves, "live": sessions
        in the table}."""
        cdef int i, live = 0
        with nogil:
            pthread_mutex_lock(&self.sh.lock)
            for i in range(AEAD_SLOTS):
                live += self.sh.slots[i].used
            pthread_mutex_unlock(&self.sh.lock)
        return {"sessions": self.sh.new_sessions, "evicted": self.sh.evicted,
                "roams": self.sh.roams, "live": live}
