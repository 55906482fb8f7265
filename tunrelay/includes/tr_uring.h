/* liburing for the io_uring TUN engine (tunrelay/_uring.pxi), and the one
 * kernel flag it needs that glibc may not define: RWF_NOWAIT (linux/fs.h,
 * since 4.14), so a TUN request that cannot complete now completes at once
 * with -EAGAIN.  (O_NONBLOCK alone does not: io_uring arms a poll, e.g. a
 * read on an empty TUN completes when a packet comes.) */
#ifndef TR_URING_H
#define TR_URING_H
#include <liburing.h>

#ifdef RWF_NOWAIT
#define TR_RWF_NOWAIT RWF_NOWAIT
#else
#define TR_RWF_NOWAIT 0x00000008
#endif

#endif
