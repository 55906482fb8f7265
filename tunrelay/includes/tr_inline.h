/* Small C helpers the fast path needs and Cython cannot spell directly. */
#ifndef TUNRELAY_TR_INLINE_H
#define TUNRELAY_TR_INLINE_H

#include <errno.h>

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

/* Cython treats an assignment to errno as a new local variable. */
static inline void tr_set_errno(int e)
{
    errno = e;
}

#endif
