# Allowed IPs: longest-prefix match from an inner address to a peer.
#
# A peer owns prefixes (IPv4 and IPv6); egress picks the peer whose prefix
# matches the packet's destination longest, ingress checks that the
# packet's source lies in the sending peer's prefixes.  Both run per packet
# in the loops, so the lookup must be a few cache lines and no lock.
#
# The structure: one multibit trie per family, 4 bits per level (IPv4: 8
# levels at most, IPv6: 32).  A node has 16 slots; each slot holds the
# child for that nibble and the best peer of the prefixes that end inside
# this nibble (controlled prefix expansion: a prefix whose last nibble is
# partial is written into every slot it covers, a longer prefix winning
# over a shorter one).  A lookup walks the address's nibbles and keeps the
# last peer it saw: at most 8 (32) dependent loads, no comparisons.
#
# Tables are immutable once built: a change builds a new table and
# publishes it (see PeerTable in _fastpath.pyx); nodes live in one block,
# addressed by index, so a table is one allocation to free.

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memset

from tunrelay.includes.system cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef enum:
    TRIE_STRIDE = 4
    TRIE_FANOUT = 16
    # Peers are stored as index + 1: zeroed memory means "no peer", and a
    # C enum (an int) could not hold 0xFFFFFFFF anyway.
    NO_PEER = 0


# TrieNode, Trie and AllowedIps are declared in _fastpath.pxd (PeerTable's
# snapshots hold them).


cdef inline unsigned int nibble(const uint8_t *address, unsigned int level) noexcept nogil:
    cdef uint8_t byte = address[level >> 1]
    return (byte >> 4) if (level & 1) == 0 else (byte & 0x0F)


cdef int trie_init(Trie *t, uint32_t bits) noexcept nogil:
    t.bits = bits
    t.count = 1
    t.capacity = 64
    t.default_peer = NO_PEER
    t.nodes = <TrieNode *>calloc(t.capacity, sizeof(TrieNode))
    if t.nodes == NULL:
        return -1
    return 0


cdef void trie_free(Trie *t) noexcept nogil:
    free(t.nodes)
    t.nodes = NULL
    t.count = t.capacity = 0


cdef int trie_new_node(Trie *t, uint32_t *index) noexcept nogil:
    cdef TrieNode *grown
    if t.count == t.capacity:
        grown = <TrieNode *>realloc(t.nodes, 2 * t.capacity * sizeof(TrieNode))
        if grown == NULL:
            return -1
        t.nodes = grown
        t.capacity *= 2
    memset(&t.nodes[t.count], 0, sizeof(TrieNode))
    index[0] = t.count
    t.count += 1
    return 0


cdef int trie_insert(Trie *t, const uint8_t *address, unsigned int length,
                     uint32_t peer) noexcept nogil:
    """Add address/length -> peer (index + 1).  The caller inserts each prefix once
    (duplicates are refused before): among overlapping prefixes the longer
    wins at lookup, whatever the order of insertion.  -1: out of memory."""
    cdef uint32_t node = 0, child
    cdef unsigned int level, last, first, span, slot, partial
    if length == 0:
        t.default_peer = peer
        return 0
    last = (length - 1) // TRIE_STRIDE          # the level where the prefix ends
    for level in range(last):
        slot = nibble(address, level)
        child = t.nodes[node].child[slot]
        if child == 0:
            if trie_new_node(t, &child) != 0:
                return -1
            t.nodes[node].child[slot] = child   # (t.nodes may have moved: index again)
        node = child
    partial = length - last * TRIE_STRIDE        # 1..4 bits of the last nibble are fixed
    span = 1u << (TRIE_STRIDE - partial)
    first = nibble(address, last) & ~(span - 1)
    for slot in range(first, first + span):
        if t.nodes[node].peer[slot] == NO_PEER or t.nodes[node].length[slot] < length:
            t.nodes[node].peer[slot] = peer
            t.nodes[node].length[slot] = <uint8_t>length
    return 0


cdef inline uint32_t trie_lookup(const Trie *t, const uint8_t *address) noexcept nogil:
    """The peer (index + 1) of the longest prefix that contains address,
    or NO_PEER."""
    cdef uint32_t node = 0, found = t.default_peer, peer
    cdef unsigned int level, slot, levels = t.bits // TRIE_STRIDE
    cdef const TrieNode *n
    for level in range(levels):
        n = &t.nodes[node]
        slot = nibble(address, level)
        peer = n.peer[slot]
        if peer != NO_PEER:
            found = peer
        node = n.child[slot]
        if node == 0:
            break
    return found


cdef inline uint32_t allowed_lookup(const AllowedIps *a, const uint8_t *packet,
                                    size_t length, bint source) noexcept nogil:
    """The peer (index + 1) for a packet's destination (source False) or
    source (True): NO_PEER when no prefix contains it, or the packet is too short to say."""
    cdef uint8_t version
    if length < 1:
        return NO_PEER
    version = packet[0] >> 4
    if version == 4 and length >= 20:
        return trie_lookup(&a.v4, packet + (12 if source else 16))
    if version == 6 and length >= 40:
        return trie_lookup(&a.v6, packet + (8 if source else 24))
    return NO_PEER
