# The aead framing: authenticated encryption inside the batched loops.
#
# On the wire (UDP only), each datagram is
#     header (20 bytes) | ciphertext | tag (16 bytes)
#     header = type 0x01 | 3 zero bytes | session id (8) | counter (8, big-endian)
# The header is the associated data; the nonce is 4 zero bytes and the
# counter.  Each sender makes a session id when it starts (its start time
# in seconds, then 4 random bytes) and derives its key from the pre-shared
# key and that id (HKDF-SHA256), so a restarted relay never reuses a
# (key, nonce) pair, and a session older than the newest is refused.  The receiver derives
# the key of a session it has not seen when a datagram of it arrives (a
# few a second at most), keeps a small cache of sessions, and rejects
# replays with a sliding window of AEAD_WINDOW counters (RFC 6479).
#
# Everything here runs in the loops without the GIL: the EVP contexts are
# made once (one per session slot), and per packet only the nonce changes.

from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from tunrelay.includes.crypto cimport (
    CRYPTO_memcmp, EVP_CIPHER_CTX, EVP_CTRL_AEAD_GET_TAG, EVP_CTRL_AEAD_SET_TAG,
    EVP_CIPHER_CTX_ctrl, EVP_DecryptFinal_ex, EVP_DecryptInit_ex,
    EVP_DecryptUpdate, EVP_EncryptFinal_ex, EVP_EncryptInit_ex, EVP_EncryptUpdate,
    EVP_sha256, HMAC, OPENSSL_cleanse)
from tunrelay.includes.system cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef enum:
    AEAD_TYPE_DATA = 0x01
    AEAD_OPEN_OK = -1     # else a drop reason
    AEAD_KEY_LEN = 32


cdef inline uint64_t get64(const uint8_t *p) noexcept nogil:
    return (<uint64_t>get32(p) << 32) | get32(p + 4)


cdef inline void put64(uint8_t *p, uint64_t v) noexcept nogil:
    put32(p, <uint32_t>(v >> 32))
    put32(p + 4, <uint32_t>v)


cdef int aead_derive(Aead *a, const uint8_t *session, uint8_t *key) noexcept nogil:
    """HKDF-SHA256 (RFC 5869) with one output block: PRK = HMAC(salt, psk);
    key = HMAC(PRK, info | 0x01), info = label | session.  The labels come
    from aead.py, whose derive_key() is the Python twin (the sender's side)."""
    cdef uint8_t prk[32]
    cdef uint8_t info[AEAD_INFO_MAX]
    cdef unsigned int out_len = 0
    cdef size_t n = a.label_len
    memcpy(info, a.label, n)
    memcpy(info + n, session, AEAD_SESSION_LEN)
    n += AEAD_SESSION_LEN
    info[n] = 1
    n += 1
    if HMAC(EVP_sha256(), a.salt, <int>a.salt_len, a.psk, AEAD_KEY_LEN, prk, &out_len) == NULL:
        return -1
    if HMAC(EVP_sha256(), prk, 32, info, n, key, &out_len) == NULL:
        OPENSSL_cleanse(prk, 32)
        return -1
    OPENSSL_cleanse(prk, 32)
    return 0


cdef inline void aead_nonce(uint64_t counter, uint8_t *nonce) noexcept nogil:
    memset(nonce, 0, 4)
    put64(nonce + 4, counter)


cdef int aead_seal(Aead *a, uint8_t *header, uint8_t *first, size_t first_len,
                   uint8_t *second, size_t second_len, uint8_t *tag) noexcept nogil:
    """Encrypt, in place, the packet made of first and second (second may
    be empty), under a fresh counter; write the header and the tag."""
    cdef uint8_t nonce[12]
    cdef int out_len
    if a.send_counter == <uint64_t>-1:
        return -1  # never wrap a nonce (2^64 packets: not in this universe)
    header[0] = AEAD_TYPE_DATA
    header[1] = 0
    header[2] = 0
    header[3] = 0
    memcpy(header + 4, a.send_session, AEAD_SESSION_LEN)
    put64(header + 12, a.send_counter)
    aead_nonce(a.send_counter, nonce)
    a.send_counter += 1
    if EVP_EncryptInit_ex(a.send_ctx, NULL, NULL, NULL, nonce) != 1:
        return -1
    if EVP_EncryptUpdate(a.send_ctx, NULL, &out_len, header, AEAD_HEADER_LEN) != 1:
        return -1
    if first_len and EVP_EncryptUpdate(a.send_ctx, first, &out_len, first, <int>first_len) != 1:
        return -1
    if second_len and EVP_EncryptUpdate(a.send_ctx, second, &out_len, second, <int>second_len) != 1:
        return -1
    if EVP_EncryptFinal_ex(a.send_ctx, tag, &out_len) != 1:
        return -1
    if EVP_CIPHER_CTX_ctrl(a.send_ctx, EVP_CTRL_AEAD_GET_TAG, AEAD_TAG_LEN, tag) != 1:
        return -1
    return 0


# ---------------------------------------------------------------- receiving

cdef inline bint window_fresh(AeadSession *s, uint64_t counter) noexcept nogil:
    """False for a counter seen before or older than the window."""
    if not s.seen or counter > s.top:
        return True
    if s.top - counter >= (AEAD_WINDOW_WORDS - 1) * 64:
        return False
    return not (s.window[(counter >> 6) % AEAD_WINDOW_WORDS] >> (counter & 63)) & 1


cdef inline void window_mark(AeadSession *s, uint64_t counter) noexcept nogil:
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
    cdef size_t body = length - AEAD_HEADER_LEN - AEAD_TAG_LEN
    aead_nonce(get64(datagram + 12), nonce)
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


cdef bint trial_allowed(Aead *a) noexcept nogil:
    """A token bucket for deriving keys of unknown sessions: a flood of
    made-up session ids costs at most AEAD_TRIALS_PER_S derivations."""
    cdef timespec now
    cdef double t
    clock_gettime(CLOCK_MONOTONIC, &now)
    t = now.tv_sec + now.tv_nsec * 1e-9
    a.trial_tokens += (t - a.trial_time) * AEAD_TRIALS_PER_S
    if a.trial_tokens > AEAD_TRIALS_PER_S:
        a.trial_tokens = AEAD_TRIALS_PER_S
    a.trial_time = t
    if a.trial_tokens < 1:
        return False
    a.trial_tokens -= 1
    return True


cdef int aead_open(Aead *a, uint8_t *datagram, size_t length) noexcept nogil:
    """Authenticate and decrypt one datagram in place: AEAD_OPEN_OK (the
    packet is at datagram + AEAD_HEADER_LEN, length - AEAD_OVERHEAD bytes)
    or the drop reason."""
    cdef AeadSession *s = NULL
    cdef AeadSession *oldest
    cdef EVP_CIPHER_CTX *swap
    cdef uint64_t counter
    cdef uint8_t key[32]
    cdef int i
    if length < AEAD_OVERHEAD:
        return DROP_TOO_SHORT
    if datagram[0] != AEAD_TYPE_DATA or datagram[1] or datagram[2] or datagram[3]:
        return DROP_BAD_FRAME
    counter = get64(datagram + 12)
    for i in range(AEAD_SESSIONS):
        if a.sessions[i].used and memcmp(a.sessions[i].id, datagram + 4, AEAD_SESSION_LEN) == 0:
            s = &a.sessions[i]
            break
    if s != NULL:
        if not window_fresh(s, counter):
            return DROP_REPLAY
        if not aead_verify(s.ctx, datagram, length):
            return DROP_BAD_TAG
    else:
        if not trial_allowed(a):
            return DROP_UNKNOWN_SESSION
        if aead_derive(a, datagram + 4, key) != 0:
            return DROP_BAD_TAG
        if EVP_DecryptInit_ex(a.trial_ctx, NULL, NULL, key, NULL) != 1:
            OPENSSL_cleanse(key, 32)
            return DROP_BAD_TAG
        OPENSSL_cleanse(key, 32)
        if not aead_verify(a.trial_ctx, datagram, length):
            return DROP_BAD_TAG
        # The session id starts with its sender's start time (seconds): a
        # session older than the newest one seen is a recording being
        # replayed, not a restart.  Without this, replaying a few old
        # sessions would push the live one out of the cache and let its
        # own datagrams be replayed into a fresh window.
        started = get32(datagram + 4)
        if a.newest_start and <uint64_t>started + AEAD_SESSION_SLACK < a.newest_start:
            return DROP_REPLAY
        if started > a.newest_start:
            a.newest_start = started
        # A new session of the peer (it restarted): it takes the least
        # recently used slot; the trial context becomes that slot's.
        oldest = &a.sessions[0]
        for i in range(1, AEAD_SESSIONS):
            if not a.sessions[i].used or (oldest.used and a.sessions[i].last_used < oldest.last_used):
                oldest = &a.sessions[i]
        swap = oldest.ctx
        oldest.ctx = a.trial_ctx
        a.trial_ctx = swap
        memcpy(oldest.id, datagram + 4, AEAD_SESSION_LEN)
        oldest.used = True
        oldest.seen = False
        a.new_sessions += 1
        s = oldest
    window_mark(s, counter)
    a.clock += 1
    s.last_used = a.clock
    return AEAD_OPEN_OK
