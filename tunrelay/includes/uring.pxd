# cython: language_level=3
# liburing (Debian liburing-dev, 2.3 or later): only what the io_uring TUN
# engine uses (tunrelay/_uring.pxi).

from libc.stdint cimport uint64_t

from tunrelay.includes.system cimport iovec


cdef extern from "tr_uring.h" nogil:
    struct io_uring_sqe:
        uint64_t user_data
        int rw_flags          # (in a union of the kernel's struct)

    struct io_uring_cqe:
        uint64_t user_data
        int res
        unsigned int flags

    struct io_uring:
        unsigned int features

    int io_uring_queue_init(unsigned int entries, io_uring *ring, unsigned int flags)
    void io_uring_queue_exit(io_uring *ring)
    io_uring_sqe *io_uring_get_sqe(io_uring *ring)
    void io_uring_prep_writev(io_uring_sqe *sqe, int fd, const iovec *iovecs,
                              unsigned int nr_vecs, uint64_t offset)
    int io_uring_submit_and_wait(io_uring *ring, unsigned int wait_nr)
    unsigned int io_uring_peek_batch_cqe(io_uring *ring, io_uring_cqe **cqes,
                                         unsigned int count)
    void io_uring_cq_advance(io_uring *ring, unsigned int nr)

    enum:
        TR_RWF_NOWAIT
