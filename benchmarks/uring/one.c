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
#include <time.h>
#include <arpa/inet.h>
#include <sys/socket.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(){
  struct ifreq ifr; memset(&ifr,0,sizeof ifr);
  int fd=open("/dev/net/tun",O_RDWR); ifr.ifr_flags=IFF_TUN|IFF_NO_PI; strcpy(ifr.ifr_name,"urt0");
  ioctl(fd,TUNSETIFF,&ifr); system("ip link set urt0 up; ip addr add 10.99.0.1/24 dev urt0; sysctl -qw net.ipv6.conf.urt0.disable_ipv6=1");
  fcntl(fd,F_SETFL,fcntl(fd,F_GETFL)|O_NONBLOCK);
  int o=socket(AF_INET,SOCK_DGRAM,0); struct sockaddr_in d={.sin_family=AF_INET,.sin_port=htons(6000)}; inet_pton(AF_INET,"10.99.0.2",&d.sin_addr);
  struct io_uring ring; io_uring_queue_init(64,&ring,0);
  char buf[4][2048], pkt[36]={0}; int R=50000; double t, ta=0,tb=0,tc=0,te=0;
  for(int i=0;i<R;i++){
    sendto(o,pkt,36,0,(void*)&d,sizeof d);
    t=now(); while(read(fd,buf[0],2048)>0); ta+=now()-t;
    sendto(o,pkt,36,0,(void*)&d,sizeof d);
    t=now(); { struct io_uring_sqe*q=io_uring_get_sqe(&ring); io_uring_prep_read(q,fd,buf[0],2048,0); q->rw_flags=RWF_NOWAIT; io_uring_submit_and_wait(&ring,1); struct io_uring_cqe*c; unsigned h,n=0; io_uring_for_each_cqe(&ring,h,c)n++; io_uring_cq_advance(&ring,n);} tb+=now()-t;
    sendto(o,pkt,36,0,(void*)&d,sizeof d);
    t=now(); for(int j=0;j<2;j++){ struct io_uring_sqe*q=io_uring_get_sqe(&ring); io_uring_prep_read(q,fd,buf[j],2048,0); q->rw_flags=RWF_NOWAIT;} io_uring_submit_and_wait(&ring,2); { struct io_uring_cqe*c; unsigned h,n=0; io_uring_for_each_cqe(&ring,h,c)n++; io_uring_cq_advance(&ring,n);} tc+=now()-t;
    t=now(); { struct io_uring_sqe*q=io_uring_get_sqe(&ring); io_uring_prep_read(q,fd,buf[0],2048,0); q->rw_flags=RWF_NOWAIT; io_uring_submit_and_wait(&ring,1); struct io_uring_cqe*c; unsigned h,n=0; io_uring_for_each_cqe(&ring,h,c)n++; io_uring_cq_advance(&ring,n);} te+=now()-t;
  }
  double tr=0; for(int i=0;i<R;i++){ t=now(); read(fd,buf[0],2048); tr+=now()-t; }
  printf("1 queued: read+read(EAGAIN) %.0f ns | enter(1 read) %.0f ns | enter(2 reads, 1 EAGAIN) %.0f ns | enter(1 read, EAGAIN only) %.0f ns | read() EAGAIN alone %.0f ns\n",ta/R*1e9,tb/R*1e9,tc/R*1e9,te/R*1e9,tr/R*1e9);
}
