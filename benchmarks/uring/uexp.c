#define _GNU_SOURCE
#include <liburing.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
#include <time.h>
#include <dirent.h>
#include <arpa/inet.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <linux/fs.h>

static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static int ntasks(void){DIR*d=opendir("/proc/self/task");int n=0;struct dirent*e;while((e=readdir(d)))if(e->d_name[0]!='.')n++;closedir(d);return n;}
static void show_tasks(void){DIR*d=opendir("/proc/self/task");struct dirent*e;char p[256],b[64];while((e=readdir(d))){if(e->d_name[0]=='.')continue;snprintf(p,sizeof p,"/proc/self/task/%s/comm",e->d_name);FILE*f=fopen(p,"r");if(f){if(fgets(b,64,f))printf("  task %s %s",e->d_name,b);fclose(f);}}closedir(d);}
static unsigned short csum(void*p,int n){unsigned long s=0;unsigned short*w=p;while(n>1){s+=*w++;n-=2;}if(n)s+=*(unsigned char*)w;while(s>>16)s=(s&0xffff)+(s>>16);return ~s;}

int main(int argc,char**argv){
  setvbuf(stdout,NULL,_IONBF,0); int nonblock=atoi(argv[1]); int N=200000, B=64;
  struct ifreq ifr; memset(&ifr,0,sizeof ifr);
  int fd=open("/dev/net/tun",O_RDWR); ifr.ifr_flags=IFF_TUN|IFF_NO_PI; strcpy(ifr.ifr_name,"urt0");
  if(ioctl(fd,TUNSETIFF,&ifr)<0){perror("tunsetiff");return 1;}
  system("ip link set urt0 up; ip addr add 10.99.0.1/24 dev urt0; ip link set lo up");
  if(nonblock) fcntl(fd,F_SETFL,fcntl(fd,F_GETFL)|O_NONBLOCK);
  // sink socket
  int s=socket(AF_INET,SOCK_DGRAM,0); struct sockaddr_in a={.sin_family=AF_INET,.sin_port=htons(5000)}; inet_pton(AF_INET,"10.99.0.1",&a.sin_addr); bind(s,(void*)&a,sizeof a);
  int big=1<<20; setsockopt(s,SOL_SOCKET,SO_RCVBUF,&big,sizeof big);
  // packet 10.99.0.2 -> 10.99.0.1:5000, 64 bytes
  unsigned char pkt[64]; memset(pkt,0,64); struct iphdr*ip=(void*)pkt; ip->version=4; ip->ihl=5; ip->tot_len=htons(64); ip->ttl=64; ip->protocol=17;
  inet_pton(AF_INET,"10.99.0.2",&ip->saddr); inet_pton(AF_INET,"10.99.0.1",&ip->daddr); ip->check=csum(ip,20);
  struct udphdr*u=(void*)(pkt+20); u->source=htons(1234); u->dest=htons(5000); u->len=htons(44); u->check=0;
  char drain[2048]; int k;
  printf("nonblock=%d tasks before=%d\n",nonblock,ntasks());
  double t=now();
  for(int i=0;i<N;i++){ if(write(fd,pkt,64)!=64){perror("write");break;} if(i%64==63) while(recv(s,drain,2048,MSG_DONTWAIT)>0);}
  double tw=now()-t; printf("write(): %.0f ns/pkt\n",tw/N*1e9);
  struct io_uring ring; int rc=io_uring_queue_init(256,&ring,0); if(rc<0){printf("queue_init %d\n",rc);return 1;}
  struct iovec iov={pkt,64}; int eagain=0, errs=0, enters=0;
  t=now();
  for(int i=0;i<N;i+=B){
    for(int j=0;j<B;j++){struct io_uring_sqe*q=io_uring_get_sqe(&ring); io_uring_prep_writev(q,fd,&iov,1,0); q->rw_flags=RWF_NOWAIT; q->user_data=j;}
    rc=io_uring_submit_and_wait(&ring,B); enters++; if(i==0)printf("first enter rc=%d\n",rc);
    struct io_uring_cqe*cqe; unsigned head,cnt=0; io_uring_for_each_cqe(&ring,head,cqe){ if(cqe->res==-EAGAIN)eagain++; else if(cqe->res<0)errs++; cnt++;} io_uring_cq_advance(&ring,cnt);
    while(recv(s,drain,2048,MSG_DONTWAIT)>0);
  }
  double tu=now()-t; printf("uring writev x%d: %.0f ns/pkt eagain=%d errs=%d tasks=%d\n",B,tu/N*1e9,eagain,errs,ntasks()); show_tasks();
  // egress: packets from the stack out of the tun
  int o=socket(AF_INET,SOCK_DGRAM,0); struct sockaddr_in d={.sin_family=AF_INET,.sin_port=htons(6000)}; inet_pton(AF_INET,"10.99.0.2",&d.sin_addr);
  setsockopt(o,SOL_SOCKET,SO_SNDBUF,&big,sizeof big);
  char buf[64][2048]; double tr=0,tu2=0; long got=0,got2=0,calls=0,calls2=0;
  for(int round=0;round<N/B;round++){
    for(int j=0;j<B;j++) sendto(o,pkt,36,0,(void*)&d,sizeof d);
    t=now(); for(;;){ if(nonblock){int r=read(fd,buf[0],2048);calls++; if(r<0)break; got++;} else { if(got%B==B-1 && 0)break; int r=read(fd,buf[0],2048);calls++;got++; if(got%B==0)break;} } tr+=now()-t;
    for(int j=0;j<B;j++) sendto(o,pkt,36,0,(void*)&d,sizeof d);
    t=now();
    for(int j=0;j<B;j++){struct io_uring_sqe*q=io_uring_get_sqe(&ring); io_uring_prep_read(q,fd,buf[j],2048,0); q->rw_flags=RWF_NOWAIT; q->user_data=j;}
    if(nonblock) io_uring_submit_and_wait(&ring,B); else io_uring_submit_and_wait(&ring,B);
    calls2++;
    struct io_uring_cqe*cqe; unsigned head,cnt=0; io_uring_for_each_cqe(&ring,head,cqe){ if(cqe->res>0)got2++; else if(cqe->res==-EAGAIN)eagain++; cnt++;} io_uring_cq_advance(&ring,cnt);
    tu2+=now()-t;
  }
  printf("read(): %.0f ns/pkt (%ld pkts %ld calls)  uring read x%d: %.0f ns/pkt (%ld pkts) eagain=%d tasks=%d\n",tr/got*1e9,got,calls,B,tu2/got2*1e9,got2,eagain,ntasks()); show_tasks();
  // partial: only 1 packet available, 64 reads submitted (nonblock only)
  if(nonblock){ double t1=0,t2=0; int R=20000; for(int i=0;i<R;i++){ sendto(o,pkt,36,0,(void*)&d,sizeof d);
      t=now(); while(read(fd,buf[0],2048)>0); t1+=now()-t;
      sendto(o,pkt,36,0,(void*)&d,sizeof d);
      t=now(); for(int j=0;j<B;j++){struct io_uring_sqe*q=io_uring_get_sqe(&ring); io_uring_prep_read(q,fd,buf[j],2048,0); q->rw_flags=RWF_NOWAIT;} io_uring_submit_and_wait(&ring,B);
      struct io_uring_cqe*cqe; unsigned head,cnt=0; io_uring_for_each_cqe(&ring,head,cqe){cnt++;} io_uring_cq_advance(&ring,cnt); t2+=now()-t; }
    printf("1 pkt available: read-until-EAGAIN %.0f ns, uring %d reads %.0f ns\n",t1/R*1e9,B,t2/R*1e9);
    t1=t2=0; for(int i=0;i<R;i++){ sendto(o,pkt,36,0,(void*)&d,sizeof d);
      sendto(o,pkt,36,0,(void*)&d,sizeof d);
      t=now(); for(int j=0;j<4;j++){struct io_uring_sqe*q=io_uring_get_sqe(&ring); io_uring_prep_read(q,fd,buf[j],2048,0); q->rw_flags=RWF_NOWAIT;} io_uring_submit_and_wait(&ring,4);
      struct io_uring_cqe*cqe; unsigned head,cnt=0; io_uring_for_each_cqe(&ring,head,cqe){cnt++;} io_uring_cq_advance(&ring,cnt); t2+=now()-t; }
    printf("2 pkt available: uring 4 reads %.0f ns\n",t2/R*1e9);
  }
  return 0;
}
