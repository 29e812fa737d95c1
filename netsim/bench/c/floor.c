/*
 * floor.c -- the per-packet cost floor of netsim's provider <-> helper loop design on this machine.
 *
 * The same loop as netsim's, with nothing but the syscalls left:
 *
 *   provider: TUN (IFF_TUN | IFF_NO_PI) -> read until EAGAIN (up to BATCH packets) -> one netsim PACKETS frame
 *             (docs/ipc.md: 12-byte header, count, reserved, families[], lengths[], payloads) -> one writev on the
 *             UDS; frames coming back are split and each packet is written to the TUN (one write per packet: a
 *             TUN fd without IFF_VNET_HDR has no batch write).
 *   helper:   accepts one provider on a Unix stream socket, reads frames, "forwards" each packet by reflecting it
 *             (swap source/destination address and ports: checksum-neutral, RFC 1071 sums commute) and writes the
 *             frame back in one write.
 *
 * No handshake (both ends are this program), no policy, no crypto: the floor, not a competitor.
 *
 *   floor helper   <uds_path>
 *   floor provider <tun_name> <uds_path> [batch]
 *
 * Each prints "READY ..." on stdout once set up and runs until SIGTERM; counters go to stderr at exit.
 * Built by netsim/bench/bench_e2e.py with `cc -O2` into ~/.cache/netsim/bench-build/.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_BATCH 256
#define MTU_BUF 2048
#define HDR 12
#define RX_CAP (1 << 20)

static volatile sig_atomic_t stop_flag = 0;
static void on_term(int sig) { (void)sig; stop_flag = 1; }

static unsigned long long n_tun_read, n_frames_out, n_frames_in, n_tun_written, n_tun_dropped;

static void die(const char *what) { perror(what); exit(1); }

static void put16(uint8_t *p, unsigned v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, unsigned v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = (uint8_t)v; }
static unsigned get16(const uint8_t *p) { return (unsigned)p[0] << 8 | p[1]; }
static unsigned get32(const uint8_t *p) { return (unsigned)p[0] << 24 | (unsigned)p[1] << 16 | (unsigned)p[2] << 8 | p[3]; }

/* Swap addresses (and ports for TCP/UDP) of an IPv4/IPv6 packet in place (RFC 791 §3.1, RFC 8200 §3). */
static void reflect(uint8_t *p, unsigned n) {
    uint8_t t[16];
    unsigned l4 = 0, proto = 0;
    if (n >= 20 && p[0] >> 4 == 4) {
        memcpy(t, p + 12, 4); memcpy(p + 12, p + 16, 4); memcpy(p + 16, t, 4);
        l4 = (p[0] & 15u) * 4; proto = p[9];
    } else if (n >= 40 && p[0] >> 4 == 6) {
        memcpy(t, p + 8, 16); memcpy(p + 8, p + 24, 16); memcpy(p + 24, t, 16);
        l4 = 40; proto = p[6];
    }
    if ((proto == 6 || proto == 17) && n >= l4 + 4) {
        memcpy(t, p + l4, 2); memcpy(p + l4, p + l4 + 2, 2); memcpy(p + l4 + 2, t, 2);
    }
}

static ssize_t read_full(int fd, uint8_t *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r == 0) return 0;
        if (r < 0) { if (errno == EINTR && !stop_flag) continue; return -1; }
        got += (size_t)r;
    }
    return (ssize_t)got;
}

static int write_full(int fd, const uint8_t *buf, size_t n) {
    while (n) {
        ssize_t w = write(fd, buf, n);
        if (w < 0) { if (errno == EINTR && !stop_flag) continue; return -1; }
        buf += w; n -= (size_t)w;
    }
    return 0;
}

static int helper(const char *path) {
    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (ls < 0) die("socket");
    if (strlen(path) >= sizeof sa.sun_path) { fprintf(stderr, "path too long\n"); return 2; }
    strcpy(sa.sun_path, path);
    unlink(path);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(ls, 1) < 0) die("listen");
    printf("READY helper %s\n", path); fflush(stdout);
    int fd = accept(ls, NULL, NULL);
    if (fd < 0) { if (stop_flag) return 0; die("accept"); }
    uint8_t *frame = malloc(RX_CAP);
    while (!stop_flag) {
        if (read_full(fd, frame, HDR) <= 0) break;
        unsigned len = get32(frame + 8);
        if (get16(frame) != 0x4E53 || len > RX_CAP - HDR) { fprintf(stderr, "bad frame\n"); return 1; }
        if (read_full(fd, frame + HDR, len) <= 0) break;
        n_frames_in++;
        if (frame[3] == 3 && len >= 4) { /* PACKETS */
            unsigned count = get16(frame + HDR), off = HDR + 4 + 4 * count;
            for (unsigned i = 0; i < count && off <= HDR + len; i++) {
                unsigned plen = get16(frame + HDR + 4 + 2 * count + 2 * i);
                if (off + plen > HDR + len) break;
                reflect(frame + off, plen);
                off += plen;
            }
        }
        if (write_full(fd, frame, HDR + len) < 0) break;
        n_frames_out++;
    }
    unlink(path);
    fprintf(stderr, "helper frames_in=%llu frames_out=%llu\n", n_frames_in, n_frames_out);
    return 0;
}

static int tun_open(const char *name, char *actual) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) die("/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) die("TUNSETIFF");
    strcpy(actual, ifr.ifr_name);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) die("SIOCGIFFLAGS");
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) die("SIOCSIFFLAGS");
    close(s);
    return fd;
}

static int provider(const char *tun_name, const char *path, int batch) {
    char ifname[IFNAMSIZ];
    int tun = tun_open(tun_name, ifname);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, path, sizeof sa.sun_path - 1);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect");
    static uint8_t slots[MAX_BATCH][MTU_BUF];
    static uint8_t head[HDR + 4 + 4 * MAX_BATCH];
    struct iovec iov[MAX_BATCH + 1];
    uint8_t *rx = malloc(RX_CAP);
    size_t rx_start = 0, rx_end = 0;
    printf("READY provider %s\n", ifname); fflush(stdout);
    struct pollfd pfd[2] = {{.fd = tun, .events = POLLIN}, {.fd = fd, .events = POLLIN}};
    while (!stop_flag) {
        if (poll(pfd, 2, 200) < 0) { if (errno == EINTR) continue; die("poll"); }
        if (pfd[0].revents & POLLIN) {
            int n = 0;
            unsigned total = 0;
            while (n < batch) {
                ssize_t r = read(tun, slots[n], MTU_BUF);
                if (r < 0) { if (errno == EAGAIN) break; if (errno == EINTR) continue; die("read tun"); }
                if (r == 0) continue;
                iov[n + 1].iov_base = slots[n]; iov[n + 1].iov_len = (size_t)r;
                put16(head + HDR + 4 + 2 * n, (slots[n][0] >> 4) == 6 ? 30 : 2);
                total += (unsigned)r;
                n++;
            }
            if (n) {
                n_tun_read += (unsigned)n;
                /* families are already at [0, n) of the descriptor array; lengths follow at [n, 2n). */
                put16(head, 0x4E53); head[2] = 1; head[3] = 3; put16(head + 4, 0); put16(head + 6, 0);
                put32(head + 8, 4 + 4 * (unsigned)n + total);
                put16(head + HDR, (unsigned)n); put16(head + HDR + 2, 0);
                for (int i = 0; i < n; i++) put16(head + HDR + 4 + 2 * n + 2 * i, (unsigned)iov[i + 1].iov_len);
                iov[0].iov_base = head; iov[0].iov_len = HDR + 4 + 4 * (size_t)n;
                size_t want = iov[0].iov_len + total;
                ssize_t w = writev(fd, iov, n + 1);
                if (w < 0) die("writev");
                if ((size_t)w < want) { /* rare partial write: finish it the slow way */
                    size_t done = (size_t)w;
                    for (int i = 0; i <= n; i++) {
                        if (done >= iov[i].iov_len) { done -= iov[i].iov_len; continue; }
                        if (write_full(fd, (uint8_t *)iov[i].iov_base + done, iov[i].iov_len - done) < 0) die("write");
                        done = 0;
                    }
                }
                n_frames_out++;
            }
        }
        if (pfd[1].revents & (POLLIN | POLLHUP)) {
            if (rx_end == RX_CAP) { memmove(rx, rx + rx_start, rx_end - rx_start); rx_end -= rx_start; rx_start = 0; }
            ssize_t r = read(fd, rx + rx_end, RX_CAP - rx_end);
            if (r <= 0) { if (r < 0 && errno == EINTR) continue; break; }
            rx_end += (size_t)r;
            while (rx_end - rx_start >= HDR) {
                uint8_t *f = rx + rx_start;
                unsigned len = get32(f + 8);
                if (rx_end - rx_start < HDR + len) break;
                n_frames_in++;
                unsigned count = get16(f + HDR), off = HDR + 4 + 4 * count;
                for (unsigned i = 0; i < count; i++) {
                    unsigned plen = get16(f + HDR + 4 + 2 * count + 2 * i);
                    if (write(tun, f + off, plen) < 0) n_tun_dropped++; else n_tun_written++;
                    off += plen;
                }
                rx_start += HDR + len;
            }
            if (rx_start == rx_end) rx_start = rx_end = 0;
            else if (rx_start > RX_CAP / 2) { memmove(rx, rx + rx_start, rx_end - rx_start); rx_end -= rx_start; rx_start = 0; }
        }
    }
    fprintf(stderr, "provider tun_read=%llu frames_out=%llu frames_in=%llu tun_written=%llu tun_dropped=%llu\n",
            n_tun_read, n_frames_out, n_frames_in, n_tun_written, n_tun_dropped);
    return 0;
}

int main(int argc, char **argv) {
    struct sigaction sa = {.sa_handler = on_term};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (argc >= 3 && !strcmp(argv[1], "helper")) return helper(argv[2]);
    if (argc >= 4 && !strcmp(argv[1], "provider")) {
        int batch = argc >= 5 ? atoi(argv[4]) : 64;
        if (batch < 1 || batch > MAX_BATCH) { fprintf(stderr, "batch must be 1..%d\n", MAX_BATCH); return 2; }
        return provider(argv[2], argv[3], batch);
    }
    fprintf(stderr, "usage: floor helper <uds_path> | floor provider <tun_name> <uds_path> [batch]\n");
    return 2;
}
