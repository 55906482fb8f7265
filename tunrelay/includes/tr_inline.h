/* Small C helpers the fast path needs and Cython cannot spell directly. */
#ifndef TUNRELAY_TR_INLINE_H
#define TUNRELAY_TR_INLINE_H

#include <errno.h>
#include <time.h>

/* The learned UDP peer is written by the ingress loop and read by the
 * egress loop: publish it with release/acquire so the address bytes are
 * visible before the flag that says they are valid. */
static inline int tr_load_acquire(const int *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void tr_store_release(int *p, int v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

/* A sequence lock for the aead peer endpoint: one writer at a time (the
 * Keyring's mutex), readers that never block it.  The count is odd while a
 * write is under way; a reader retries if it changed under it. */
static inline unsigned int tr_seq_read_begin(const unsigned int *seq)
{
    unsigned int s;
    while ((s = __atomic_load_n(seq, __ATOMIC_ACQUIRE)) & 1)
        ;
    return s;
}

static inline int tr_seq_read_retry(const unsigned int *seq, unsigned int start)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return __atomic_load_n(seq, __ATOMIC_RELAXED) != start;
}

static inline void tr_seq_write_begin(unsigned int *seq)
{
    __atomic_store_n(seq, *seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static inline void tr_seq_write_end(unsigned int *seq)
{
    __atomic_store_n(seq, *seq + 1, __ATOMIC_RELEASE);
}

/* Monotonic seconds, for the rare timed decisions of the loops (re-probing
 * UDP GSO after a refusal). */
static inline double tr_monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Monotonic seconds at full resolution (vDSO: tens of nanoseconds), for
 * busy polling's microsecond budgets: the coarse clock above moves in
 * jiffies (4 ms), which would turn a 50 us spin into milliseconds. */
static inline double tr_monotonic_fine(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Cython treats an assignment to errno as a new local variable. */
static inline void tr_set_errno(int e)
{
    errno = e;
}

/* Peer tables (_peers.pxi): published snapshots read without a lock, the
 * readers' epochs, per-peer counters bumped by several queues, event bits. */
#include <stdint.h>

static inline void *tr_load_ptr(void *const *p)
{
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}

static inline void tr_store_ptr(void **p, void *v)
{
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}

static inline uint64_t tr_load64(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}

static inline void tr_store64(uint64_t *p, uint64_t v)
{
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}

static inline uint64_t tr_add64(uint64_t *p, uint64_t v)
{
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

static inline unsigned int tr_or32(unsigned int *p, unsigned int v)
{
    return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);
}

static inline unsigned int tr_xchg32(unsigned int *p, unsigned int v)
{
    return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}

#endif
