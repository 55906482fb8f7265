/* Internet checksum (RFC 1071) helpers for the offload path.
 *
 * Sums are kept unfolded in a 64-bit accumulator of native-order 32-bit
 * words.  The ones' complement sum is byte-order independent (RFC 1071,
 * section 2 (B)): summing native words and storing the folded result in
 * native order yields the right bytes on the wire.  Every piece summed
 * separately must start at an even offset of the checksummed data.
 */
#ifndef TUNRELAY_TR_CSUM_H
#define TUNRELAY_TR_CSUM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline uint64_t tr_csum_partial(const uint8_t *p, size_t len, uint64_t sum)
{
    uint32_t w;
    uint16_t h;
    /* Four words per iteration: no carry can be lost, 2^32 words at most. */
    while (len >= 16) {
        uint32_t a, b, c, d;
        memcpy(&a, p, 4);
        memcpy(&b, p + 4, 4);
        memcpy(&c, p + 8, 4);
        memcpy(&d, p + 12, 4);
        sum += (uint64_t)a + b + c + d;
        p += 16;
        len -= 16;
    }
    while (len >= 4) {
        memcpy(&w, p, 4);
        sum += w;
        p += 4;
        len -= 4;
    }
    if (len >= 2) {
        memcpy(&h, p, 2);
        sum += h;
        p += 2;
        len -= 2;
    }
    if (len) {
        /* The odd last byte is the high-order byte of a zero-padded word:
         * in memory order it comes first. */
        uint8_t pad[2] = {p[0], 0};
        memcpy(&h, pad, 2);
        sum += h;
    }
    return sum;
}

static inline uint16_t tr_csum_fold(uint64_t sum)
{
    sum = (sum & 0xffffffffu) + (sum >> 32);
    sum = (sum & 0xffffffffu) + (sum >> 32);
    sum = (sum & 0xffffu) + (sum >> 16);
    sum = (sum & 0xffffu) + (sum >> 16);
    return (uint16_t)sum;
}

/* The TCP/UDP pseudo-header: addresses as they are in the IP header
 * (4 or 16 bytes each, adjacent), protocol and L4 length. */
static inline uint64_t tr_csum_pseudo(const uint8_t *addrs, size_t addr_len,
                                      uint8_t proto, uint32_t l4_len)
{
    uint8_t tail[4] = {0, proto, (uint8_t)(l4_len >> 8), (uint8_t)l4_len};
    uint64_t sum = tr_csum_partial(addrs, 2 * addr_len, 0);
    return tr_csum_partial(tail, 4, sum);
}

/* Store a 16-bit checksum at p (unaligned), in the order it was computed. */
static inline void tr_put_csum(uint8_t *p, uint16_t csum)
{
    memcpy(p, &csum, 2);
}

#endif
