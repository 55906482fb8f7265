# Ingress validation and len16 parsing: pure functions on bytes, no I/O.
# They mirror framing.py (the reference) and share its drop reasons.

from libc.stdint cimport uint8_t
from libc.string cimport memmove

# Indexes into Counters.drops, in the order of counters.DROP_REASONS.
cdef enum:  # drop reasons
    DROP_NONE = -1
    DROP_NOT_PEER = 0
    DROP_NO_PEER = 1
    DROP_EMPTY = 2
    DROP_OVERSIZE = 3
    DROP_BAD_VERSION = 4
    DROP_TRUNCATED = 5
    DROP_BAD_LENGTH = 6
    DROP_BAD_FRAME = 7
    DROP_TUN_WRITE = 8
    DROP_SEND_ERROR = 9
    DROP_DISCONNECTED = 10
    DROP_BAD_OFFLOAD = 11
    DROP_TOO_SHORT = 12
    DROP_BAD_TAG = 13
    DROP_REPLAY = 14
    DROP_STALE_SESSION = 15
    DROP_REFLECTED = 16
    DROP_AEAD_VERSION = 17
    DROP_STOPPED = 18
    DROP_NO_ROUTE = 19
    DROP_NOT_ALLOWED = 20
    DROP_NO_SESSION = 21
    DROP_SESSION_EXPIRED = 22
    DROP_CONTROL_FULL = 23

# Indexes into Counters.errors, in the order of counters.ERROR_KINDS.
cdef enum:  # error kinds
    ERR_READ = 0
    ERR_WRITE = 1
    ERR_DISCONNECT = 2
    ERR_GSO = 3

cdef enum:
    ETHERNET_HEADER = 14
    LEN16_HEADER = 2
    LEN16_LIMIT = 0xFFFF  # the largest length a len16 header carries


cdef inline unsigned int be16(const uint8_t *p) noexcept nogil:
    return (<unsigned int>p[0] << 8) | p[1]


cdef int validate_packet(const uint8_t *p, size_t length, bint tap,
                         size_t limit) noexcept nogil:
    """DROP_NONE when the packet may be written to the device, else why not."""
    cdef unsigned int version, header, total
    if length == 0:
        return DROP_EMPTY
    if length > limit:
        return DROP_OVERSIZE
    if tap:
        return DROP_TRUNCATED if length < ETHERNET_HEADER else DROP_NONE
    version = p[0] >> 4
    if version == 4:
        if length < 20:
            return DROP_TRUNCATED
        header = (p[0] & 0x0F) * 4
        total = be16(p + 2)
        if header < 20 or total != length or header > total:
            return DROP_BAD_LENGTH
        return DROP_NONE
    if version == 6:
        if length < 40:
            return DROP_TRUNCATED
        if 40 + be16(p + 4) != length:
            return DROP_BAD_LENGTH
        return DROP_NONE
    return DROP_BAD_VERSION


# Called for each complete len16 frame; returns 0 to go on, -1 to stop
# parsing (the sink saved why).  Called once more with frame NULL after the
# last complete frame of a call, before the buffer is compacted: the frames
# seen so far are still in place then.
ctypedef int (*frame_sink)(void *ctx, const uint8_t *frame,
                           size_t length) noexcept nogil

cdef enum:  # len16_consume results
    PARSE_OK = 0          # all complete frames consumed; a partial one kept
    PARSE_BAD_LENGTH = 1  # a length of zero or over the limit: close the stream
    PARSE_SINK_STOP = 2   # the sink asked to stop


cdef int len16_consume(uint8_t *buf, size_t *have, size_t limit,
                       frame_sink sink, void *ctx) noexcept nogil:
    """Hand every complete frame in buf[0:*have] to sink, then move the
    unfinished tail (at most one partial frame) to the front of buf."""
    cdef size_t offset = 0, length
    cdef int status = PARSE_OK
    while have[0] - offset >= LEN16_HEADER:
        length = be16(buf + offset)
        if length == 0 or length > limit:
            status = PARSE_BAD_LENGTH
            break
        if have[0] - offset - LEN16_HEADER < length:
            break
        if sink(ctx, buf + offset + LEN16_HEADER, length) != 0:
            offset += LEN16_HEADER + length
            status = PARSE_SINK_STOP
            break
        offset += LEN16_HEADER + length
    if status != PARSE_SINK_STOP and sink(ctx, NULL, 0) != 0:
        status = PARSE_SINK_STOP
    if offset:
        memmove(buf, buf + offset, have[0] - offset)
        have[0] -= offset
    return status
