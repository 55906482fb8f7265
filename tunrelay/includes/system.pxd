# cython: language_level=3
# C and kernel declarations used by the fast path: only the fields we use.
# (Cython's own libc.* / posix.* cover string.h, stdlib.h, errno.h,
# unistd.h and fcntl.h; everything else is declared here.)

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


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

    ctypedef int clockid_t
    int clock_gettime(clockid_t clock, timespec *now)

    enum:
        CLOCK_MONOTONIC


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
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t sendto(int fd, const void *buf, size_t n, int flags, const sockaddr *addr,
                   socklen_t addr_len)
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
    unsigned int tr_seq_read_begin(const unsigned int *seq)
    bint tr_seq_read_retry(const unsigned int *seq, unsigned int start)
    void tr_seq_write_begin(unsigned int *seq)
    void tr_seq_write_end(unsigned int *seq)
    double tr_monotonic()
    double tr_monotonic_fine()
    void *tr_load_ptr(void *const *p)
    void tr_store_ptr(void **p, void *v)
    uint64_t tr_load64(const uint64_t *p)
    void tr_store64(uint64_t *p, uint64_t v)
    uint64_t tr_add64(uint64_t *p, uint64_t v)
    unsigned int tr_or32(unsigned int *p, unsigned int v)
    unsigned int tr_xchg32(unsigned int *p, unsigned int v)


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *mutex, const pthread_mutexattr_t *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)


cdef extern from "tr_csum.h" nogil:
    uint64_t tr_csum_partial(const uint8_t *p, size_t length, uint64_t sum)
    uint16_t tr_csum_fold(uint64_t sum)
    uint64_t tr_csum_pseudo(const uint8_t *addrs, size_t addr_len, uint8_t proto,
                            uint32_t l4_len)
    void tr_put_csum(uint8_t *p, uint16_t csum)


cdef extern from "<sys/socket.h>" nogil:
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg)
    ssize_t writev(int fd, const iovec *iov, int iovcnt)
    int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen)

    enum:
        SOL_UDP
        IPPROTO_TCP
        IPPROTO_UDP


cdef extern from "tr_offload.h" nogil:
    # linux/udp.h, linux/virtio_net.h (older system headers lack some).
    enum:
        UDP_SEGMENT
        UDP_GRO
        TCP_QUICKACK
        VIRTIO_NET_HDR_F_NEEDS_CSUM
        VIRTIO_NET_HDR_GSO_NONE
        VIRTIO_NET_HDR_GSO_TCPV4
        VIRTIO_NET_HDR_GSO_TCPV6
        VIRTIO_NET_HDR_GSO_UDP_L4
        VIRTIO_NET_HDR_GSO_ECN
        VNET_HDR_LEN

    # The kernel's struct virtio_net_hdr (little-endian fields, the host's
    # order on the platforms that run this).
    struct virtio_net_hdr:
        uint8_t flags
        uint8_t gso_type
        uint16_t hdr_len
        uint16_t gso_size
        uint16_t csum_start
        uint16_t csum_offset


cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)


cdef extern from "<sched.h>" nogil:
    int sched_yield()
