// meshlet bench load generator: a tight C client and an epoll server (issue 6).
//
// Compiled at bench time (gcc -O2) into bench/out/loadgen; bench/loadgen.py drives it. The client
// is C because a ~20 us connect() cannot be timed from a Python loop without the loop's own cost
// drowning the difference between datapaths.
//
//   loadgen server --netns PATH [--port 8080]
//       TCP on 0.0.0.0:PORT: reads the first bytes of a connection; 'S' starts a stream (bytes are
//       counted until EOF, then the count is sent back as 8 bytes), anything else is answered with
//       the server's local address ("10.244.0.7\n", i.e. the endpoint the connection reached) and
//       the connection is closed. UDP on 0.0.0.0:PORT: every datagram is answered with the local
//       address it was sent to, from that address (IP_PKTINFO), so replies leave from the endpoint.
//   loadgen crr|udp --netns PATH [--cgroup DIR] --targets FILE --out FILE
//       One new connection (crr: connect, send, recv, close) or one new UDP socket (udp: sendto,
//       recvfrom, close) per line "IP PORT" of FILE, in order. Writes one line per attempt to
//       --out: "ERRNO LATENCY_NS ENDPOINT REPLY_SOURCE SEND_NS" where LATENCY_NS is connect()
//       alone (crr) or sendto..recvfrom (udp), and SEND_NS is sendto() alone (udp; 0 for crr).
//       Prints {"count":..,"errors":..,"elapsed_ns":..} on stdout.
//   loadgen stream --netns PATH [--cgroup DIR] --target IP --port PORT --seconds S
//       One TCP connection, writes for S seconds; prints {"bytes":..,"elapsed_ns":..}.
//
// --cgroup DIR: the process writes its pid to DIR/cgroup.procs before anything else, so its
// sockets belong to that cgroup (where meshlet's programs are attached); then it enters --netns.
// Order matters: the cgroup must be joined before the netns (ip netns exec remounts /sys).

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define REPLY_MAX 64
#define STREAM_CHUNK (64 * 1024)
#define MAX_CONNS 65536

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void join_cgroup(const char *dir) {
    char path[4096];
    snprintf(path, sizeof(path), "%s/cgroup.procs", dir);
    FILE *f = fopen(path, "w");
    if (!f) die("open cgroup.procs");
    fprintf(f, "%d\n", getpid());
    if (fclose(f) != 0) die("join cgroup");
}

static void enter_netns(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("open netns");
    if (setns(fd, CLONE_NEWNET) != 0) die("setns");
    close(fd);
}

static void set_timeouts(int fd, int ms) {
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));  // bounds a blocking connect()
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

// ---- server -------------------------------------------------------------------------------------

enum conn_kind { CONN_FRESH = 0, CONN_STREAM = 1 };

struct conn {
    int kind;
    uint64_t bytes;
};

static struct conn conns[MAX_CONNS];

static void answer_address(int fd) {
    struct sockaddr_in local;
    socklen_t len = sizeof(local);
    char reply[REPLY_MAX];
    if (getsockname(fd, (struct sockaddr *)&local, &len) != 0) return;
    inet_ntop(AF_INET, &local.sin_addr, reply, sizeof(reply));
    size_t n = strlen(reply);
    reply[n++] = '\n';
    (void)!write(fd, reply, n);
}

static void serve_udp(int fd) {
    char buf[2048], ctrl[CMSG_SPACE(sizeof(struct in_pktinfo))];
    for (;;) {
        struct sockaddr_in peer;
        struct iovec iov = {.iov_base = buf, .iov_len = sizeof(buf)};
        struct msghdr msg = {.msg_name = &peer, .msg_namelen = sizeof(peer), .msg_iov = &iov,
                             .msg_iovlen = 1, .msg_control = ctrl, .msg_controllen = sizeof(ctrl)};
        if (recvmsg(fd, &msg, MSG_DONTWAIT) < 0) return;
        struct in_pktinfo *info = NULL;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO)
                info = (struct in_pktinfo *)CMSG_DATA(c);
        if (!info) continue;
        char reply[REPLY_MAX];
        inet_ntop(AF_INET, &info->ipi_addr, reply, sizeof(reply));
        size_t n = strlen(reply);
        reply[n++] = '\n';
        // Reply from the address the datagram was sent to (an AnyIP endpoint address).
        char out_ctrl[CMSG_SPACE(sizeof(struct in_pktinfo))];
        memset(out_ctrl, 0, sizeof(out_ctrl));
        struct iovec out_iov = {.iov_base = reply, .iov_len = n};
        struct msghdr out = {.msg_name = &peer, .msg_namelen = sizeof(peer), .msg_iov = &out_iov,
                             .msg_iovlen = 1, .msg_control = out_ctrl,
                             .msg_controllen = sizeof(out_ctrl)};
        struct cmsghdr *c = CMSG_FIRSTHDR(&out);
        c->cmsg_level = IPPROTO_IP;
        c->cmsg_type = IP_PKTINFO;
        c->cmsg_len = CMSG_LEN(sizeof(struct in_pktinfo));
        struct in_pktinfo *src = (struct in_pktinfo *)CMSG_DATA(c);
        src->ipi_spec_dst = info->ipi_addr;
        sendmsg(fd, &out, MSG_DONTWAIT);
    }
}

static void close_conn(int ep, int fd) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
}

static void serve_tcp(int ep, int fd) {
    static char buf[STREAM_CHUNK];
    struct conn *c = &conns[fd];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof(buf));
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            close_conn(ep, fd);
            return;
        }
        if (n == 0) {  // EOF
            if (c->kind == CONN_STREAM) {
                uint64_t total = c->bytes;
                (void)!write(fd, &total, sizeof(total));
            }
            close_conn(ep, fd);
            return;
        }
        if (c->kind == CONN_FRESH && buf[0] == 'S') {
            c->kind = CONN_STREAM;
            c->bytes = (uint64_t)n - 1;
            continue;
        }
        if (c->kind == CONN_STREAM) {
            c->bytes += (uint64_t)n;
            continue;
        }
        answer_address(fd);
        close_conn(ep, fd);
        return;
    }
}

__attribute__((noreturn)) static void run_server(int port) {
    signal(SIGPIPE, SIG_IGN);
    int one = 1;
    struct sockaddr_in any = {.sin_family = AF_INET, .sin_port = htons(port),
                              .sin_addr.s_addr = htonl(INADDR_ANY)};
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(lfd, (struct sockaddr *)&any, sizeof(any)) != 0) die("bind tcp");
    if (listen(lfd, 4096) != 0) die("listen");
    int ufd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    setsockopt(ufd, IPPROTO_IP, IP_PKTINFO, &one, sizeof(one));
    if (bind(ufd, (struct sockaddr *)&any, sizeof(any)) != 0) die("bind udp");
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    ev.data.fd = ufd;
    epoll_ctl(ep, EPOLL_CTL_ADD, ufd, &ev);
    printf("ready\n");
    fflush(stdout);
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == ufd) {
                serve_udp(ufd);
            } else if (fd == lfd) {
                int cfd;
                while ((cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (cfd >= MAX_CONNS) {
                        close(cfd);
                        continue;
                    }
                    conns[cfd] = (struct conn){0};
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev);
                }
            } else {
                serve_tcp(ep, fd);
            }
        }
    }
}

// ---- clients ------------------------------------------------------------------------------------

struct target {
    struct sockaddr_in addr;
};

static struct target *read_targets(const char *path, size_t *count) {
    FILE *f = fopen(path, "r");
    if (!f) die("open targets");
    size_t cap = 1024, n = 0;
    struct target *t = malloc(cap * sizeof(*t));
    char ip[64];
    int port;
    while (fscanf(f, "%63s %d", ip, &port) == 2) {
        if (n == cap) t = realloc(t, (cap *= 2) * sizeof(*t));
        memset(&t[n], 0, sizeof(t[n]));
        t[n].addr.sin_family = AF_INET;
        t[n].addr.sin_port = htons(port);
        if (inet_pton(AF_INET, ip, &t[n].addr.sin_addr) != 1) {
            fprintf(stderr, "loadgen: bad target %s\n", ip);
            exit(2);
        }
        n++;
    }
    fclose(f);
    *count = n;
    return t;
}

static void strip_newline(char *s) {
    char *nl = strchr(s, '\n');
    if (nl) *nl = 0;
}

// One TCP_CRR-style exchange; returns 0 or an errno, *latency = connect() alone.
static int one_crr(const struct target *t, uint64_t *latency, char *endpoint) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return errno;
    set_timeouts(fd, 2000);
    int err = 0;
    uint64_t t0 = now_ns();
    if (connect(fd, (const struct sockaddr *)&t->addr, sizeof(t->addr)) != 0) err = errno;
    *latency = now_ns() - t0;
    if (!err && write(fd, "Q", 1) != 1) err = errno ? errno : EIO;
    if (!err) {
        ssize_t n = read(fd, endpoint, REPLY_MAX - 1);
        if (n <= 0) err = n < 0 ? errno : ECONNRESET;
        else endpoint[n] = 0;
    }
    strip_newline(endpoint);
    close(fd);
    return err;
}

// One new UDP socket, one datagram out and its answer; *latency = sendto..recvfrom, *send =
// sendto() alone (the first datagram's output path: hooks, NAT, veth, all inside the call).
static int one_udp(const struct target *t, uint64_t *latency, uint64_t *send, char *endpoint,
                   char *source) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) return errno;
    set_timeouts(fd, 2000);
    int err = 0;
    struct sockaddr_in from;
    socklen_t flen = sizeof(from);
    uint64_t t0 = now_ns();
    if (sendto(fd, "Q", 1, 0, (const struct sockaddr *)&t->addr, sizeof(t->addr)) != 1) err = errno;
    *send = now_ns() - t0;
    if (!err) {
        ssize_t n = recvfrom(fd, endpoint, REPLY_MAX - 1, 0, (struct sockaddr *)&from, &flen);
        if (n <= 0) err = n < 0 ? errno : EIO;
        else endpoint[n] = 0;
    }
    *latency = now_ns() - t0;
    if (!err) inet_ntop(AF_INET, &from.sin_addr, source, REPLY_MAX);
    strip_newline(endpoint);
    close(fd);
    return err;
}

static int run_sequence(int udp, const char *targets_path, const char *out_path) {
    size_t n;
    struct target *targets = read_targets(targets_path, &n);
    FILE *out = fopen(out_path, "w");
    if (!out) die("open out");
    size_t errors = 0;
    uint64_t start = now_ns();
    for (size_t i = 0; i < n; i++) {
        char endpoint[REPLY_MAX] = "-", source[REPLY_MAX] = "-";
        uint64_t latency = 0, send = 0;
        int err = udp ? one_udp(&targets[i], &latency, &send, endpoint, source)
                      : one_crr(&targets[i], &latency, endpoint);
        if (err) {
            errors++;
            strcpy(endpoint, "-");
        }
        if (!endpoint[0]) strcpy(endpoint, "-");
        fprintf(out, "%d %llu %s %s %llu\n", err, (unsigned long long)latency, endpoint, source,
                (unsigned long long)send);
    }
    uint64_t elapsed = now_ns() - start;
    fclose(out);
    printf("{\"count\": %zu, \"errors\": %zu, \"elapsed_ns\": %llu}\n", n, errors,
           (unsigned long long)elapsed);
    return 0;
}

static int run_stream(const char *ip, int port, double seconds) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, ip, &addr.sin_addr) != 1) die("bad --target");
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    set_timeouts(fd, 5000);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) die("stream connect");
    static char buf[STREAM_CHUNK];
    memset(buf, 'x', sizeof(buf));
    buf[0] = 'S';
    uint64_t sent = 0, start = now_ns(), stop = start + (uint64_t)(seconds * 1e9);
    size_t first = 1;  // the 'S' marker is not payload
    while (now_ns() < stop) {
        ssize_t n = write(fd, buf, sizeof(buf));
        if (n < 0) die("stream write");
        sent += (uint64_t)n - first;
        first = 0;
        buf[0] = 'x';
    }
    shutdown(fd, SHUT_WR);
    uint64_t received = 0;
    if (read(fd, &received, sizeof(received)) != sizeof(received)) die("stream count");
    uint64_t elapsed = now_ns() - start;
    close(fd);
    printf("{\"bytes\": %llu, \"sent\": %llu, \"elapsed_ns\": %llu}\n", (unsigned long long)received,
           (unsigned long long)sent, (unsigned long long)elapsed);
    return 0;
}

static const char *opt(int argc, char **argv, const char *name, const char *fallback) {
    for (int i = 2; i + 1 < argc; i++)
        if (strcmp(argv[i], name) == 0) return argv[i + 1];
    return fallback;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: loadgen server|crr|udp|stream --netns PATH ...\n");
        return 2;
    }
    const char *mode = argv[1];
    const char *cgroup = opt(argc, argv, "--cgroup", NULL);
    const char *netns = opt(argc, argv, "--netns", NULL);
    if (cgroup) join_cgroup(cgroup);
    if (netns) enter_netns(netns);
    if (strcmp(mode, "server") == 0) run_server(atoi(opt(argc, argv, "--port", "8080")));
    if (strcmp(mode, "crr") == 0 || strcmp(mode, "udp") == 0) {
        const char *targets = opt(argc, argv, "--targets", NULL);
        const char *out = opt(argc, argv, "--out", NULL);
        if (!targets || !out) {
            fprintf(stderr, "loadgen: --targets and --out are required\n");
            return 2;
        }
        return run_sequence(strcmp(mode, "udp") == 0, targets, out);
    }
    if (strcmp(mode, "stream") == 0)
        return run_stream(opt(argc, argv, "--target", "0.0.0.0"),
                          atoi(opt(argc, argv, "--port", "8080")),
                          atof(opt(argc, argv, "--seconds", "2")));
    fprintf(stderr, "loadgen: unknown mode %s\n", mode);
    return 2;
}
