#define _GNU_SOURCE
#include <liburing.h>
#include <linux/if_tun.h>
#include <linux/fs.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
int main(int argc,char**argv){
  setvbuf(stdout,NULL,_IONBF,0);
  struct ifreq ifr; memset(&ifr,0,sizeof ifr);
  int fd=open("/dev/net/tun",O_RDWR); ifr.ifr_flags=IFF_TUN|IFF_NO_PI|(argc>1?IFF_VNET_HDR:0); strcpy(ifr.ifr_name,"urt0");
  if(ioctl(fd,TUNSETIFF,&ifr)<0){perror("tunsetiff");return 1;}
  system("ip link set urt0 up");
  fcntl(fd,F_SETFL,fcntl(fd,F_GETFL)|O_NONBLOCK);
  struct io_uring ring; io_uring_queue_init(8,&ring,0);
  char buf[2048];
  for(int mode=0;mode<2;mode++){
    struct io_uring_sqe*q=io_uring_get_sqe(&ring); io_uring_prep_read(q,fd,buf,2048,0); if(mode) q->rw_flags=RWF_NOWAIT;
    io_uring_submit(&ring);
    struct __kernel_timespec ts={.tv_sec=0,.tv_nsec=200000000}; struct io_uring_cqe*cqe;
    int rc=io_uring_wait_cqe_timeout(&ring,&cqe,&ts);
    if(rc==0){printf("mode %s: res=%d (%s)\n",mode?"RWF_NOWAIT":"O_NONBLOCK only",cqe->res,strerror(-cqe->res)); io_uring_cqe_seen(&ring,cqe);}
    else {printf("mode %s: no completion in 200ms (poll armed) rc=%d\n",mode?"RWF_NOWAIT":"O_NONBLOCK only",rc);
      q=io_uring_get_sqe(&ring); io_uring_prep_cancel64(q,0,IORING_ASYNC_CANCEL_ANY); io_uring_submit_and_wait(&ring,2);
      unsigned head,cnt=0; io_uring_for_each_cqe(&ring,head,cqe){printf("  after cancel: res=%d\n",cqe->res);cnt++;} io_uring_cq_advance(&ring,cnt);}
  }
  // probe ops
  struct io_uring_probe*p=io_uring_get_probe_ring(&ring); printf("probe: READ %d WRITEV %d READV %d\n",io_uring_opcode_supported(p,IORING_OP_READ),io_uring_opcode_supported(p,IORING_OP_WRITEV),io_uring_opcode_supported(p,IORING_OP_READV));
  printf("features %#x\n",ring.features);
  return 0;
}
