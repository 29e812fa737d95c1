/*
 * udpload.c -- the load tools of the end-to-end benchmark, in C so they are never the bottleneck being measured.
 *
 *   udpload echo  <bind_ip> <port>
 *       UDP echo with recvmmsg/sendmmsg (64 datagrams per syscall); prints "READY" then serves until SIGTERM.
 *   udpload blast <dst_ip> <port> <payload_bytes> <seconds> <window> <max_packets>
 *       Closed-loop load: keeps at most <window> datagrams in flight (sendmmsg bursts), counts replies
 *       (recvmmsg), declares the window lost after 200 ms without a reply (so loss never stalls the run), and
 *       stops after <seconds> or <max_packets> sent, whichever first, then drains late replies for 500 ms.
 *       Prints one JSON line: {"sent":..,"received":..,"seconds":..,"pps":..,"loss":..}; pps counts only the
 *       replies received within <seconds>, loss also counts the drained ones as delivered.
 *
 * IPv4 only (the lab's paths are measured over IPv4). Sends only to the address it is given.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define VLEN 64
#define MAXP 2048

static volatile sig_atomic_t stop_flag = 0;
static void on_term(int sig) { (void)sig; stop_flag = 1; }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die(const char *what) { perror(what); exit(1); }

static int echo(const char *ip, int port) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) { fprintf(stderr, "bad address %s\n", ip); return 2; }
    int big = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    static char bufs[VLEN][MAXP];
    static struct sockaddr_in peers[VLEN];
    struct iovec iov[VLEN];
    struct mmsghdr msgs[VLEN];
    printf("READY\n"); fflush(stdout);
    unsigned long long total = 0;
    while (!stop_flag) {
        memset(msgs, 0, sizeof msgs);
        for (int i = 0; i < VLEN; i++) {
            iov[i].iov_base = bufs[i]; iov[i].iov_len = MAXP;
            msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &peers[i]; msgs[i].msg_hdr.msg_namelen = sizeof peers[i];
        }
        int n = recvmmsg(fd, msgs, VLEN, MSG_WAITFORONE, NULL);
        if (n < 0) { if (errno == EINTR) continue; die("recvmmsg"); }
        for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;
        int off = 0;
        while (off < n) {
            int s = sendmmsg(fd, msgs + off, (unsigned)(n - off), 0);
            if (s < 0) { if (errno == EINTR) continue; break; }
            off += s;
        }
        total += (unsigned long long)n;
    }
    fprintf(stderr, "echo datagrams=%llu\n", total);
    return 0;
}

static int blast(const char *ip, int port, int payload, double seconds, int window, long long max_packets) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) { fprintf(stderr, "bad address %s\n", ip); return 2; }
    if (payload < 1 || payload > MAXP || window < 1) { fprintf(stderr, "bad payload/window\n"); return 2; }
    int big = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect");
    static char out[MAXP], in[VLEN][MAXP];
    for (int i = 0; i < payload; i++) out[i] = (char)(i * 7 + 1);
    struct iovec siov = {.iov_base = out, .iov_len = (size_t)payload}, riov[VLEN];
    struct mmsghdr smsg[VLEN], rmsg[VLEN];
    memset(smsg, 0, sizeof smsg);
    for (int i = 0; i < VLEN; i++) { smsg[i].msg_hdr.msg_iov = &siov; smsg[i].msg_hdr.msg_iovlen = 1; }
    long long sent = 0, received = 0, outstanding = 0;
    double t0 = now(), end = t0 + seconds, last_reply = t0;
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    while (!stop_flag && now() < end && sent < max_packets) {
        long long room = window - outstanding;
        if (room > VLEN) room = VLEN;
        if (room > max_packets - sent) room = max_packets - sent;
        if (room > 0) {
            int s = sendmmsg(fd, smsg, (unsigned)room, MSG_DONTWAIT);
            if (s > 0) { sent += s; outstanding += s; }
        }
        int ready = poll(&pfd, 1, outstanding >= window ? 1 : 0);
        if (ready > 0) {
            for (int i = 0; i < VLEN; i++) {
                riov[i].iov_base = in[i]; riov[i].iov_len = MAXP;
                memset(&rmsg[i].msg_hdr, 0, sizeof rmsg[i].msg_hdr);
                rmsg[i].msg_hdr.msg_iov = &riov[i]; rmsg[i].msg_hdr.msg_iovlen = 1;
            }
            int r = recvmmsg(fd, rmsg, VLEN, MSG_DONTWAIT, NULL);
            if (r > 0) {
                received += r; outstanding -= r;
                if (outstanding < 0) outstanding = 0;
                last_reply = now();
            }
        } else if (outstanding >= window && now() - last_reply > 0.2) {
            outstanding = 0; /* the window was lost: counted as sent - received at the end */
            last_reply = now();
        }
    }
    double elapsed = now() - t0;
    long long in_time = received;
    double drain_end = now() + 0.5;
    while (now() < drain_end && received < sent) {
        if (poll(&pfd, 1, 10) <= 0) continue;
        for (int i = 0; i < VLEN; i++) {
            riov[i].iov_base = in[i]; riov[i].iov_len = MAXP;
            memset(&rmsg[i].msg_hdr, 0, sizeof rmsg[i].msg_hdr);
            rmsg[i].msg_hdr.msg_iov = &riov[i]; rmsg[i].msg_hdr.msg_iovlen = 1;
        }
        int r = recvmmsg(fd, rmsg, VLEN, MSG_DONTWAIT, NULL);
        if (r > 0) received += r;
    }
    printf("{\"sent\": %lld, \"received\": %lld, \"seconds\": %.6f, \"pps\": %.1f, \"loss\": %.6f}\n", sent, received,
           elapsed, (double)in_time / elapsed, sent ? 1.0 - (double)received / (double)sent : 0.0);
    return 0;
}

int main(int argc, char **argv) {
    struct sigaction sa = {.sa_handler = on_term};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    if (argc == 4 && !strcmp(argv[1], "echo")) return echo(argv[2], atoi(argv[3]));
    if (argc == 8 && !strcmp(argv[1], "blast"))
        return blast(argv[2], atoi(argv[3]), atoi(argv[4]), atof(argv[5]), atoi(argv[6]), atoll(argv[7]));
    fprintf(stderr, "usage: udpload echo <ip> <port> | udpload blast <ip> <port> <payload> <s> <window> <max>\n");
    return 2;
}
