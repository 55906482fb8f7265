# cython: language_level=3
# C and kernel declarations used by the fast path: only the fields we use.
# (Cython's own libc.* / posix.* cover string.h, stdlib.h, errno.h,
# unistd.h and fcntl.h; everything else is declared here.)

from libc.stdint cimport uint8_t, uint16_t, uint32_t


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len


cdef extern from "<limits.h>" nogil:
    enum: IOV_MAX


cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    struct sockaddr:
        sa_family_t sa_family

    struct sockaddr_storage:
        sa_family_t ss_family

    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    int sendmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags)
    int recvmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags, timespec *timeout)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)
    int getpeername(int fd, sockaddr *addr, socklen_t *addrlen)

    enum:
        SOL_SOCKET
        SO_TYPE
        SO_DOMAIN
        SOCK_STREAM
        SOCK_DGRAM
        SOCK_SEQPACKET
        MSG_DONTWAIT
        MSG_NOSIGNAL
        MSG_TRUNC
        AF_UNIX
        AF_INET
        AF_INET6


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr

    struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr

    struct in6_addr:
        uint8_t s6_addr[16]

    struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id


cdef extern from "<arpa/inet.h>" nogil:
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents

    ctypedef unsigned long nfds_t
    int poll(pollfd *fds, nfds_t nfds, int timeout)

    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP
        POLLNVAL


cdef extern from "<sys/eventfd.h>" nogil:
    ctypedef unsigned long eventfd_t
    int eventfd(unsigned int initval, int flags)
    int eventfd_read(int fd, eventfd_t *value)
    int eventfd_write(int fd, eventfd_t value)

    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC


cdef extern from "tr_inline.h" nogil:
    int tr_load_acquire(const int *p)
    void tr_store_release(int *p, int v)
    void tr_set_errno(int e)
