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
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <sys/socket.h>
#include <sys/uio.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static unsigned short csum(void*p,int n){unsigned long s=0;unsigned short*w=p;while(n>1){s+=*w++;n-=2;}while(s>>16)s=(s&0xffff)+(s>>16);return ~s;}
static void reap(struct io_uring*r){struct io_uring_cqe*c; unsigned h,n=0; io_uring_for_each_cqe(r,h,c)n++; io_uring_cq_advance(r,n);}
int main(){
  struct ifreq ifr; memset(&ifr,0,sizeof ifr);
  int fd=open("/dev/net/tun",O_RDWR); ifr.ifr_flags=IFF_TUN|IFF_NO_PI; strcpy(ifr.ifr_name,"urt0");
  ioctl(fd,TUNSETIFF,&ifr); system("ip link set urt0 up; ip addr add 10.99.0.1/24 dev urt0; sysctl -qw net.ipv6.conf.urt0.disable_ipv6=1");
  fcntl(fd,F_SETFL,fcntl(fd,F_GETFL)|O_NONBLOCK);
  int s=socket(AF_INET,SOCK_DGRAM,0); struct sockaddr_in a={.sin_family=AF_INET,.sin_port=htons(5000)}; inet_pton(AF_INET,"10.99.0.1",&a.sin_addr); bind(s,(void*)&a,sizeof a);
  int o=socket(AF_INET,SOCK_DGRAM,0); struct sockaddr_in d={.sin_family=AF_INET,.sin_port=htons(6000)}; inet_pton(AF_INET,"10.99.0.2",&d.sin_addr);
  unsigned char pkt[64]; memset(pkt,0,64); struct iphdr*ip=(void*)pkt; ip->version=4; ip->ihl=5; ip->tot_len=htons(64); ip->ttl=64; ip->protocol=17;
  inet_pton(AF_INET,"10.99.0.2",&ip->saddr); inet_pton(AF_INET,"10.99.0.1",&ip->daddr); ip->check=csum(ip,20);
  struct udphdr*u=(void*)(pkt+20); u->source=htons(1234); u->dest=htons(5000); u->len=htons(44);
  struct io_uring ring; io_uring_queue_init(64,&ring,0); struct iovec iov={pkt,64}; char drain[2048], buf[64][2048];
  int ns[]={1,2,3,4,6,8,16,32};
  for(int k=0;k<8;k++){ int n=ns[k], R=200000/n; double tw=0,tu=0,rr=0,ru=0,t;
    for(int i=0;i<R;i++){
      t=now(); for(int j=0;j<n;j++) writev(fd,&iov,1); tw+=now()-t; while(recv(s,drain,2048,MSG_DONTWAIT)>0);
      t=now(); for(int j=0;j<n;j++){struct io_uring_sqe*q=io_uring_get_sqe(&ring); io_uring_prep_writev(q,fd,&iov,1,0); q->rw_flags=RWF_NOWAIT;} io_uring_submit_and_wait(&ring,n); reap(&ring); tu+=now()-t; while(recv(s,drain,2048,MSG_DONTWAIT)>0);
      for(int j=0;j<n;j++) sendto(o,pkt,36,0,(void*)&d,sizeof d);
      t=now(); while(read(fd,buf[0],2048)>0); rr+=now()-t;
      for(int j=0;j<n;j++) sendto(o,pkt,36,0,(void*)&d,sizeof d);
      t=now(); for(int j=0;j<n+1;j++){struct io_uring_sqe*q=io_uring_get_sqe(&ring); io_uring_prep_read(q,fd,buf[j],2048,0); q->rw_flags=RWF_NOWAIT;} io_uring_submit_and_wait(&ring,n+1); reap(&ring); ru+=now()-t;
    }
    printf("n=%2d  write: writev x n %5.0f ns/pkt, enter(n writev) %5.0f ns/pkt | read: read-until-EAGAIN %5.0f ns/pkt, enter(n+1 reads) %5.0f ns/pkt\n", n, tw/R/n*1e9, tu/R/n*1e9, rr/R/n*1e9, ru/R/n*1e9);
  }
}
