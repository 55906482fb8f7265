/* Constants of the offload path that older system headers lack. */
#ifndef TUNRELAY_TR_OFFLOAD_H
#define TUNRELAY_TR_OFFLOAD_H

#include <stdint.h>
#include <sys/uio.h>
#include <linux/virtio_net.h>
#include <netinet/tcp.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#ifndef VIRTIO_NET_HDR_GSO_UDP_L4
#define VIRTIO_NET_HDR_GSO_UDP_L4 5
#endif
#ifndef TCP_QUICKACK
#define TCP_QUICKACK 12
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

#define VNET_HDR_LEN ((int)sizeof(struct virtio_net_hdr))

#endif
