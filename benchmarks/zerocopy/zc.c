/* zc.c: does MSG_ZEROCOPY make large UDP GSO sends cheaper across a veth?
 *
 *   zc recv <bind_ip> <port> <max_seconds>
 *       UDP socket with UDP_GRO; reads and discards; stops after 0.5 s idle
 *       (once data was seen) or max_seconds. Prints one line of key=value.
 *   zc send <dst_ip> <port> copy|zerocopy <msg_bytes> <seconds> [nbufs] [touch]
 *       Sends msg_bytes messages with a UDP_SEGMENT=1400 cmsg, rotating over
 *       nbufs buffers (default 8). zerocopy: SO_ZEROCOPY + MSG_ZEROCOPY,
 *       completions reaped from the error queue; a buffer is reused only
 *       after its completion arrived. touch=1 rewrites the whole buffer
 *       before each send (as a relay's read() from the TUN would).
 *
 * Written for tunrelay issue 10 measurements; standalone.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
#endif
#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
#endif
#ifndef SO_EE_ORIGIN_ZEROCOPY
#define SO_EE_ORIGIN_ZEROCOPY 5
#endif
#ifndef SO_EE_CODE_ZEROCOPY_COPIED
#define SO_EE_CODE_ZEROCOPY_COPIED 1
#endif
/* UDP_SEGMENT and UDP_GRO, where older headers lack them: the relay's own. */
#include "../../tunrelay/includes/tr_offload.h"

#define SEG 1400
#define MAXBUF 65536
#define RING 4096 /* completion flags indexed by seq % RING; outstanding <= nbufs */

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu_seconds(double *user, double *sys)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	*user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6;
	*sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
	return *user + *sys;
}

/* softirq time (s) of one cpu from /proc/stat; USER_HZ assumed 100 */
static double softirq_s(int cpu)
{
	FILE *f = fopen("/proc/stat", "r");
	char line[512], want[16];
	double v = -1;
	snprintf(want, sizeof want, "cpu%d ", cpu);
	while (f && fgets(line, sizeof line, f))
		if (!strncmp(line, want, strlen(want))) {
			unsigned long long x[8];
			if (sscanf(line + strlen(want), "%llu %llu %llu %llu %llu %llu %llu",
				   &x[0], &x[1], &x[2], &x[3], &x[4], &x[5], &x[6]) == 7)
				v = x[6] / 100.0;
			break;
		}
	if (f)
		fclose(f);
	return v;
}

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static int do_recv(const char *ip, int port, double max_s)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		die("socket");
	int one = 1, rcvbuf = 8 << 20;
	if (setsockopt(fd, IPPROTO_UDP, UDP_GRO, &one, sizeof one))
		die("UDP_GRO");
	setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	inet_pton(AF_INET, ip, &a.sin_addr);
	if (bind(fd, (void *)&a, sizeof a))
		die("bind");
	setsockopt(fd, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof one);
	struct timeval tv = { 0, 100000 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	printf("ready\n");
	fflush(stdout);

	static char buf[MAXBUF];
	uint64_t bytes = 0, calls = 0;
	uint32_t drops = 0;
	double t0 = now(), first = 0, last = 0;
	for (;;) {
		char rc[256];
		struct iovec iov = { buf, sizeof buf };
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1,
				    .msg_control = rc, .msg_controllen = sizeof rc };
		ssize_t n = recvmsg(fd, &m, 0);
		if (n > 0)
			for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm))
				if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SO_RXQ_OVFL)
					memcpy(&drops, CMSG_DATA(cm), sizeof drops);
		double t = now();
		if (n > 0) {
			if (!first)
				first = t;
			last = t;
			bytes += n;
			calls++;
			continue;
		}
		if (n < 0 && errno != EAGAIN && errno != EINTR)
			die("recv");
		if ((first && t - last > 0.5) || t - t0 > max_s)
			break;
	}
	double u, s, c = cpu_seconds(&u, &s);
	double span = last - first;
	printf("role=recv sock_drops=%u bytes=%llu calls=%llu secs=%.3f gbps=%.3f cpu_user=%.3f cpu_sys=%.3f cpu_s_per_gb=%.3f\n",
	       drops, (unsigned long long)bytes, (unsigned long long)calls, span,
	       span > 0 ? bytes / span / 1e9 : 0, u, s,
	       bytes ? c / (bytes / 1e9) : 0);
	return 0;
}

struct zc_state {
	unsigned char done[RING];
	uint64_t reaps, completions, ranges, copied_ranges, zc_ranges, enobufs;
};

/* Drain the error queue; returns number of notifications read. */
static int reap(int fd, struct zc_state *z)
{
	int got = 0;
	z->reaps++;
	for (;;) {
		char ctrl[128];
		struct msghdr m = { .msg_control = ctrl, .msg_controllen = sizeof ctrl };
		ssize_t r = recvmsg(fd, &m, MSG_ERRQUEUE | MSG_DONTWAIT);
		if (r < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return got;
			if (errno == EINTR)
				continue;
			die("recvmsg errqueue");
		}
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm)) {
			if (cm->cmsg_level != SOL_IP || cm->cmsg_type != IP_RECVERR)
				continue;
			struct sock_extended_err *e = (void *)CMSG_DATA(cm);
			if (e->ee_origin != SO_EE_ORIGIN_ZEROCOPY || e->ee_errno != 0) {
				fprintf(stderr, "unexpected errqueue entry origin=%u errno=%u\n",
					e->ee_origin, e->ee_errno);
				continue;
			}
			z->ranges++;
			if (e->ee_code & SO_EE_CODE_ZEROCOPY_COPIED)
				z->copied_ranges++;
			else
				z->zc_ranges++;
			for (uint32_t s = e->ee_info;; s++) {
				z->done[s % RING] = 1;
				z->completions++;
				if (s == e->ee_data)
					break;
			}
			got++;
		}
	}
}

static int do_send(const char *ip, int port, int zc, int len, double secs, int nbufs, int touch)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		die("socket");
	int one = 1, sndbuf = 8 << 20;
	setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf);
	if (zc && setsockopt(fd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one))
		die("SO_ZEROCOPY");
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	inet_pton(AF_INET, ip, &a.sin_addr);
	if (connect(fd, (void *)&a, sizeof a))
		die("connect");

	if (nbufs < 1 || nbufs > 256 || len < 1 || len > 65507) {
		fprintf(stderr, "bad nbufs/len\n");
		return 2;
	}
	/* one slab, page aligned, like a relay's reused buffer pool */
	size_t stride = (len + 4095) & ~4095UL;
	unsigned char *slab;
	if (posix_memalign((void **)&slab, 4096, stride * nbufs))
		die("posix_memalign");
	memset(slab, 0xa5, stride * nbufs);
	uint32_t *buf_seq = calloc(nbufs, sizeof *buf_seq);
	unsigned char *buf_busy = calloc(nbufs, 1);

	struct zc_state z;
	memset(&z, 0, sizeof z);
	uint32_t seq = 0; /* next zerocopy sequence number the kernel will assign */
	uint64_t bytes = 0, msgs = 0, waits = 0, send_err = 0;

	char ctrl[CMSG_SPACE(sizeof(uint16_t))];
	int cpu = sched_getcpu();
	double si0 = softirq_s(cpu);
	double u0, s0, c0 = cpu_seconds(&u0, &s0);
	double t0 = now(), tend = t0 + secs;
	int b = 0;
	while (1) {
		if ((msgs & 63) == 0 && now() >= tend)
			break;
		unsigned char *p = slab + (size_t)b * stride;
		if (zc && buf_busy[b]) {
			/* don't reuse a buffer before its completion; reap only when
			 * its completion has not been seen yet (batches the recvmsg
			 * calls, and lets the kernel merge ranges meanwhile) */
			if (!z.done[buf_seq[b] % RING])
				reap(fd, &z);
			while (!z.done[buf_seq[b] % RING]) {
				struct pollfd pf = { .fd = fd, .events = 0 };
				waits++;
				poll(&pf, 1, 100);
				reap(fd, &z);
			}
			buf_busy[b] = 0;
		}
		if (touch)
			memset(p, (int)(msgs & 0xff), len);
		struct iovec iov = { p, len };
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1,
				    .msg_control = ctrl, .msg_controllen = sizeof ctrl };
		struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
		cm->cmsg_level = SOL_UDP;
		cm->cmsg_type = UDP_SEGMENT;
		cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
		*(uint16_t *)CMSG_DATA(cm) = SEG;
		ssize_t n = sendmsg(fd, &m, zc ? MSG_ZEROCOPY : 0);
		if (n < 0) {
			if (errno == ENOBUFS && zc) { /* optmem limit: reap and retry */
				z.enobufs++;
				struct pollfd pf = { .fd = fd, .events = 0 };
				poll(&pf, 1, 10);
				reap(fd, &z);
				continue;
			}
			if (errno == ECONNREFUSED || errno == EAGAIN || errno == EINTR) {
				send_err++;
				continue;
			}
			die("sendmsg");
		}
		if (zc) {
			buf_seq[b] = seq;
			z.done[seq % RING] = 0;
			buf_busy[b] = 1;
			seq++;
		}
		bytes += n;
		msgs++;
		b = (b + 1) % nbufs;
	}
	double t1 = now();
	/* drain outstanding completions (counted in CPU) */
	if (zc) {
		double dl = now() + 1.0;
		while (z.completions < seq && now() < dl) {
			struct pollfd pf = { .fd = fd, .events = 0 };
			poll(&pf, 1, 10);
			reap(fd, &z);
		}
	}
	double u1, s1, c1 = cpu_seconds(&u1, &s1);
	double si = softirq_s(cpu) - si0;
	if (sched_getcpu() != cpu)
		si = -1; /* not pinned: figure meaningless */
	double gb = bytes / 1e9, el = t1 - t0;
	printf("role=send mode=%s len=%d nbufs=%d touch=%d bytes=%llu msgs=%llu secs=%.3f gbps=%.3f "
	       "cpu_user=%.3f cpu_sys=%.3f cpu_s_per_gb=%.3f send_err=%llu "
	       "zc_seq=%u zc_completions=%llu zc_ranges=%llu zc_copied_ranges=%llu zc_notcopied_ranges=%llu "
	       "zc_waits=%llu zc_enobufs=%llu zc_reap_calls=%llu cpu=%d softirq_s=%.2f task_plus_softirq_s_per_gb=%.3f\n",
	       zc ? "zerocopy" : "copy", len, nbufs, touch, (unsigned long long)bytes,
	       (unsigned long long)msgs, el, gb / el, u1 - u0, s1 - s0,
	       (c1 - c0) / gb, (unsigned long long)send_err, seq,
	       (unsigned long long)z.completions, (unsigned long long)z.ranges,
	       (unsigned long long)z.copied_ranges, (unsigned long long)z.zc_ranges,
	       (unsigned long long)waits, (unsigned long long)z.enobufs,
	       (unsigned long long)z.reaps, cpu, si, (c1 - c0 + si) / gb);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 5 && !strcmp(argv[1], "recv"))
		return do_recv(argv[2], atoi(argv[3]), atof(argv[4]));
	if (argc >= 7 && !strcmp(argv[1], "send")) {
		int zc;
		if (!strcmp(argv[4], "copy"))
			zc = 0;
		else if (!strcmp(argv[4], "zerocopy"))
			zc = 1;
		else {
			fprintf(stderr, "mode must be copy or zerocopy, got %s\n", argv[4]);
			return 2;
		}
		return do_send(argv[2], atoi(argv[3]), zc, atoi(argv[5]), atof(argv[6]),
			       argc > 7 ? atoi(argv[7]) : 8, argc > 8 ? atoi(argv[8]) : 0);
	}
	fprintf(stderr,
		"usage: zc recv <bind_ip> <port> <max_seconds>\n"
		"       zc send <dst_ip> <port> copy|zerocopy <msg_bytes> <seconds> [nbufs] [touch]\n");
	return 2;
}
