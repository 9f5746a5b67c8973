/* natpmp_load: the bench's compiled NAT-PMP load generator, and a trivial echo server.
 *
 * Built at bench time by bench/procs.py (gcc -O2, into build/bench/); not committed as a
 * binary. Three modes:
 *
 *   natpmp_load address --target IP:PORT [--window N] [--duration S] [--warmup S]
 *                       [--count N] [--timeout S] [--bind IP]
 *       Opcode 0 (external address request), closed loop: N sockets, each connected to
 *       the target with one request in flight (every opcode-0 reply looks alike, so the
 *       socket a reply arrives on says which request it answers). N = 1 is a blocking
 *       send/recv loop; N > 1 waits in epoll. Latency runs from send() to the return of
 *       the recv() that read the reply. Replies are checked: 12 bytes, version 0, opcode
 *       128, result 0; anything else counts as bad. A request unanswered after --timeout
 *       is counted lost and sent again.
 *       With --duration: sends for --warmup + --duration seconds and measures the replies
 *       to requests sent after the warm-up. With --count: sends exactly N requests (plus
 *       resends of lost ones), no warm-up; for counting the server's syscalls per request.
 *       Prints one JSON object.
 *
 *   natpmp_load map --target IP:PORT --sources A-B|A,B,.. --first PORT --count N
 *                   [--window N] [--lifetime S] [--proto udp|tcp] [--echo]
 *       Mapping requests (opcode 1 or 2) for a fixed list: job k asks for internal port
 *       p = first + k from source p % S (S source addresses, one socket each), so every
 *       job is a distinct mapping and any slice of a range asks for the same mappings
 *       again (running it again renews them). Up to --window jobs are in flight; a reply
 *       is matched by its socket and internal port. Unanswered after 2 s: sent again
 *       (a retransmission; latency still runs from the first send); after 30 s: lost.
 *       Replies are counted by result code. --echo: the target echoes the request back.
 *
 *   natpmp_load echo --listen IP:PORT
 *       The ceiling reference: answers a 2-byte opcode-0 request with a fixed 12-byte
 *       reply (anything else is echoed back as it came), in batches of up to 64
 *       datagrams (recvmmsg/sendmmsg). Prints its bound address on one line.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RCVBUF (4 << 20)
#define BATCH 64
#define MAX_WINDOW 4096

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: natpmp_load address --target IP:PORT [--window N] [--duration S]\n"
            "                   [--warmup S] [--count N] [--timeout S] [--bind IP]\n"
            "       natpmp_load map --target IP:PORT --sources A-B|A,B --first PORT\n"
            "                   --count N [--window N] [--lifetime S] [--proto udp|tcp]\n"
            "                   [--echo]\n"
            "       natpmp_load echo --listen IP:PORT\n");
    exit(2);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void parse_endpoint(const char *text, struct sockaddr_in *out)
{
    char host[64];
    const char *colon = strrchr(text, ':');
    size_t len = colon ? (size_t)(colon - text) : 0;
    if (!colon || len >= sizeof host) {
        fprintf(stderr, "natpmp_load: bad endpoint %s (IP:PORT)\n", text);
        exit(2);
    }
    memcpy(host, text, len);
    host[len] = '\0';
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((uint16_t)atoi(colon + 1));
    if (len == 0)
        strcpy(host, "127.0.0.1");
    if (inet_pton(AF_INET, host, &out->sin_addr) != 1) {
        fprintf(stderr, "natpmp_load: bad address %s\n", host);
        exit(2);
    }
}

/* ------------------------------------------------------------------ the generator */

struct samples {
    uint32_t *ns; /* latency of each measured request, in nanoseconds */
    size_t n, cap;
};

static void keep(struct samples *s, uint64_t ns)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 1 << 20;
        s->ns = realloc(s->ns, s->cap * sizeof *s->ns);
        if (!s->ns)
            die("realloc");
    }
    s->ns[s->n++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static int by_value(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static int reply_ok(const unsigned char *buf, ssize_t len)
{
    return len == 12 && buf[0] == 0 && buf[1] == 128 && buf[2] == 0 && buf[3] == 0;
}

struct options {
    struct sockaddr_in target, bind;
    int has_bind;
    int window;
    double duration, warmup, timeout;
    long count; /* > 0: a fixed number of requests instead of a duration */
};

struct tally {
    long sent, lost, bad, stray;
    uint64_t first, last; /* first measured send, last measured reply */
};

static int open_socket(const struct options *o, int nonblocking)
{
    int fd = socket(AF_INET, SOCK_DGRAM | (nonblocking ? SOCK_NONBLOCK : 0), 0);
    int size = RCVBUF;
    if (fd < 0)
        die("socket");
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    if (o->has_bind && bind(fd, (const struct sockaddr *)&o->bind, sizeof o->bind) < 0)
        die("bind");
    if (connect(fd, (const struct sockaddr *)&o->target, sizeof o->target) < 0)
        die("connect");
    return fd;
}

static const unsigned char REQUEST[2] = {0, 0};

static void send_request(int fd, struct tally *t)
{
    /* ECONNREFUSED (nobody listens yet) or a full buffer: the timeout resends it */
    (void)send(fd, REQUEST, sizeof REQUEST, 0);
    t->sent++;
}

/* One request in flight: blocking send and recv, the lowest latency the generator sees. */
static void run_sequential(const struct options *o, struct samples *s, struct tally *t)
{
    int fd = open_socket(o, 0);
    struct timeval tv = {(time_t)o->timeout, (suseconds_t)((o->timeout - (time_t)o->timeout) * 1e6)};
    unsigned char buf[64];
    uint64_t start = now_ns();
    uint64_t measure_from = o->count > 0 ? start : start + (uint64_t)(o->warmup * 1e9);
    uint64_t end = measure_from + (uint64_t)(o->duration * 1e9);
    long answered = 0;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    for (;;) {
        uint64_t t0 = now_ns(), t1;
        ssize_t len;
        send_request(fd, t);
        len = recv(fd, buf, sizeof buf, 0);
        t1 = now_ns();
        if (len < 0) {
            t->lost++;
        } else if (!reply_ok(buf, len)) {
            t->bad++;
        } else {
            answered++;
            if (t0 >= measure_from && (o->count > 0 || t1 <= end)) {
                if (!s->n)
                    t->first = t0;
                keep(s, t1 - t0);
                t->last = t1;
            }
        }
        if (o->count > 0 ? t->sent >= o->count : t1 >= end)
            break;
    }
    close(fd);
}

/* N requests in flight, one per socket, epoll. */
static void run_windowed(const struct options *o, struct samples *s, struct tally *t)
{
    int n = o->window, ep = epoll_create1(0), i;
    int *fds = calloc((size_t)n, sizeof *fds);
    uint64_t *sent_at = calloc((size_t)n, sizeof *sent_at);
    char *busy = calloc((size_t)n, 1);
    struct epoll_event *events = calloc((size_t)n, sizeof *events);
    uint64_t timeout_ns = (uint64_t)(o->timeout * 1e9), start, measure_from, end, last_check;
    int in_flight = 0, sending = 1;
    unsigned char buf[64];
    if (ep < 0 || !fds || !sent_at || !busy || !events)
        die("setup");
    for (i = 0; i < n; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        fds[i] = open_socket(o, 1);
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) < 0)
            die("epoll_ctl");
    }
    start = last_check = now_ns();
    measure_from = o->count > 0 ? start : start + (uint64_t)(o->warmup * 1e9);
    end = o->count > 0 ? UINT64_MAX : measure_from + (uint64_t)(o->duration * 1e9);
    for (i = 0; i < n && (o->count <= 0 || t->sent < o->count); i++) {
        sent_at[i] = now_ns();
        busy[i] = 1;
        in_flight++;
        send_request(fds[i], t);
    }
    while (in_flight > 0) {
        int ready = epoll_wait(ep, events, n, 100), e;
        uint64_t now = now_ns();
        if (ready < 0 && errno != EINTR)
            die("epoll_wait");
        for (e = 0; e < ready; e++) {
            int k = (int)events[e].data.u32;
            ssize_t len = recv(fds[k], buf, sizeof buf, 0);
            now = now_ns();
            if (len < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                continue;
            if (!busy[k]) { /* a late reply to a request already counted lost */
                t->stray++;
                continue;
            }
            if (len < 0 || !reply_ok(buf, len)) {
                t->bad++;
            } else if (sent_at[k] >= measure_from && now <= end) {
                if (!s->n)
                    t->first = sent_at[k];
                keep(s, now - sent_at[k]);
                t->last = now;
            }
            if (sending && (o->count > 0 ? t->sent >= o->count : now >= end))
                sending = 0;
            if (sending) {
                sent_at[k] = now_ns();
                send_request(fds[k], t);
            } else {
                busy[k] = 0;
                in_flight--;
            }
        }
        if (o->count <= 0 && now >= end)
            break; /* a timed run does not wait for the last replies */
        now = now_ns(); /* later than every sent_at[] */
        if (now - last_check > 100000000u) {
            last_check = now;
            for (i = 0; i < n; i++) {
                if (busy[i] && now - sent_at[i] > timeout_ns) {
                    t->lost++;
                    if (sending) {
                        sent_at[i] = now_ns();
                        send_request(fds[i], t);
                    } else {
                        busy[i] = 0;
                        in_flight--;
                    }
                }
            }
        }
    }
    for (i = 0; i < n; i++)
        close(fds[i]);
    close(ep);
    free(fds);
    free(sent_at);
    free(busy);
    free(events);
}

static double pick_us(const struct samples *s, double q)
{
    size_t k = (size_t)(q * (double)s->n);
    if (k >= s->n)
        k = s->n - 1;
    return s->ns[k] / 1e3;
}

/* Sorts the samples and prints the latency fields of the JSON result (continuing it). */
static void print_latencies(struct samples *s)
{
    double mean = 0;
    size_t k;
    if (!s->n) {
        printf(", \"p50_us\": 0, \"p90_us\": 0, \"p99_us\": 0, \"max_us\": 0, \"mean_us\": 0");
        return;
    }
    for (k = 0; k < s->n; k++)
        mean += s->ns[k];
    mean /= (double)s->n;
    qsort(s->ns, s->n, sizeof *s->ns, by_value);
    printf(", \"p50_us\": %.2f, \"p90_us\": %.2f, \"p99_us\": %.2f, \"max_us\": %.2f, "
           "\"mean_us\": %.2f",
           pick_us(s, 0.50), pick_us(s, 0.90), pick_us(s, 0.99),
           s->ns[s->n - 1] / 1e3, mean / 1e3);
}

static int main_address(int argc, char **argv)
{
    struct options o = {.window = 1, .duration = 3.0, .warmup = 0.5, .timeout = 1.0};
    struct samples s = {0};
    struct tally t = {0};
    int has_target = 0, i;
    double seconds;
    for (i = 0; i < argc; i++) {
        const char *arg = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!value)
            usage();
        if (!strcmp(arg, "--target"))
            parse_endpoint(value, &o.target), has_target = 1;
        else if (!strcmp(arg, "--window"))
            o.window = atoi(value);
        else if (!strcmp(arg, "--duration"))
            o.duration = atof(value);
        else if (!strcmp(arg, "--warmup"))
            o.warmup = atof(value);
        else if (!strcmp(arg, "--count"))
            o.count = atol(value);
        else if (!strcmp(arg, "--timeout"))
            o.timeout = atof(value);
        else if (!strcmp(arg, "--bind")) {
            char spec[80];
            snprintf(spec, sizeof spec, "%s:0", value);
            parse_endpoint(spec, &o.bind);
            o.has_bind = 1;
        } else
            usage();
        i++;
    }
    if (!has_target || o.window < 1 || o.window > MAX_WINDOW)
        usage();
    if (o.window == 1)
        run_sequential(&o, &s, &t);
    else
        run_windowed(&o, &s, &t);
    seconds = s.n > 1 ? (double)(t.last - t.first) / 1e9 : 0.0;
    printf("{\"generator\": \"c\", \"mode\": \"address\", \"window\": %d, \"sent\": %ld, "
           "\"answered\": %zu, \"lost\": %ld, \"bad\": %ld, \"stray\": %ld, "
           "\"seconds\": %.6f, \"rate\": %.1f",
           o.window, t.sent, s.n, t.lost, t.bad, t.stray, seconds,
           seconds > 0 ? (double)s.n / seconds : 0.0);
    print_latencies(&s);
    printf("}\n");
    free(s.ns);
    return 0;
}

/* ------------------------------------------------------------------ mapping requests */

#define MAX_SOURCES 256

static int parse_sources(const char *text, struct sockaddr_in *out)
{
    char copy[4096], *part, *save = NULL;
    int n = 0;
    snprintf(copy, sizeof copy, "%s", text);
    for (part = strtok_r(copy, ",", &save); part; part = strtok_r(NULL, ",", &save)) {
        char *dash = strchr(part, '-');
        struct in_addr lo, hi;
        uint32_t a, b;
        if (dash)
            *dash = '\0';
        if (inet_pton(AF_INET, part, &lo) != 1 ||
            (dash && inet_pton(AF_INET, dash + 1, &hi) != 1)) {
            fprintf(stderr, "natpmp_load: bad sources %s\n", text);
            exit(2);
        }
        a = ntohl(lo.s_addr);
        b = dash ? ntohl(hi.s_addr) : a;
        for (; a <= b; a++) {
            if (n == MAX_SOURCES) {
                fprintf(stderr, "natpmp_load: more than %d sources\n", MAX_SOURCES);
                exit(2);
            }
            memset(&out[n], 0, sizeof out[n]);
            out[n].sin_family = AF_INET;
            out[n].sin_addr.s_addr = htonl(a);
            n++;
        }
    }
    return n;
}

struct job {
    uint64_t first_sent, last_sent;
    int port; /* 0: the slot is free */
};

static int main_map(int argc, char **argv)
{
    static struct sockaddr_in sources[MAX_SOURCES];
    static int32_t slot_of[65536];     /* internal port -> its job's slot, -1: none */
    static uint32_t codes[65536];      /* replies by result code */
    struct options o = {.window = 1};
    const char *source_text = "127.0.0.1";
    long first = 20000, count = -1, lifetime = 3600, next = 0, sent = 0, retransmitted = 0,
         lost = 0, bad = 0;
    int opcode = 1, echo = 0, has_target = 0, n_sources, i, ep, pending = 0;
    int fds[MAX_SOURCES];
    struct job *jobs;
    struct epoll_event *events;
    struct samples s = {0};
    uint64_t start, last_check, timeout_ns = 2000000000u, give_up_ns = 30000000000u;
    unsigned char request[12], buf[64];
    double seconds;
    for (i = 0; i < argc; i++) {
        const char *arg = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(arg, "--echo")) {
            echo = 1;
            continue;
        }
        if (!value)
            usage();
        if (!strcmp(arg, "--target"))
            parse_endpoint(value, &o.target), has_target = 1;
        else if (!strcmp(arg, "--window"))
            o.window = atoi(value);
        else if (!strcmp(arg, "--sources"))
            source_text = value;
        else if (!strcmp(arg, "--first"))
            first = atol(value);
        else if (!strcmp(arg, "--count"))
            count = atol(value);
        else if (!strcmp(arg, "--lifetime"))
            lifetime = atol(value);
        else if (!strcmp(arg, "--proto"))
            opcode = !strcmp(value, "tcp") ? 2 : 1;
        else
            usage();
        i++;
    }
    if (!has_target || count < 0 || o.window < 1 || o.window > MAX_WINDOW)
        usage();
    if (first < 1 || first + count - 1 > 65535) {
        fprintf(stderr, "natpmp_load: internal ports out of range\n");
        return 2;
    }
    n_sources = parse_sources(source_text, sources);
    ep = epoll_create1(0);
    jobs = calloc((size_t)o.window, sizeof *jobs);
    events = calloc((size_t)n_sources, sizeof *events);
    if (ep < 0 || !jobs || !events)
        die("setup");
    memset(slot_of, -1, sizeof slot_of);
    for (i = 0; i < n_sources; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        o.bind = sources[i];
        o.has_bind = 1;
        fds[i] = open_socket(&o, 1);
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) < 0)
            die("epoll_ctl");
    }
    request[0] = 0;
    request[1] = (unsigned char)opcode;
    request[2] = request[3] = 0;
    request[8] = (unsigned char)(lifetime >> 24);
    request[9] = (unsigned char)(lifetime >> 16);
    request[10] = (unsigned char)(lifetime >> 8);
    request[11] = (unsigned char)lifetime;
#define SEND_PORT(port)                                                                  \
    do {                                                                                 \
        request[4] = request[6] = (unsigned char)((port) >> 8);                          \
        request[5] = request[7] = (unsigned char)(port);                                 \
        (void)send(fds[(port) % n_sources], request, sizeof request, 0);                 \
        sent++;                                                                          \
    } while (0)
    start = last_check = now_ns();
    for (i = 0; i < o.window && next < count; i++, next++) {
        int port = (int)(first + next);
        jobs[i] = (struct job){now_ns(), 0, port};
        jobs[i].last_sent = jobs[i].first_sent;
        slot_of[port] = i;
        pending++;
        SEND_PORT(port);
    }
    while (pending > 0) {
        int ready = epoll_wait(ep, events, n_sources, 50), e;
        uint64_t now;
        if (ready < 0 && errno != EINTR)
            die("epoll_wait");
        for (e = 0; e < ready; e++) {
            int index = (int)events[e].data.u32;
            for (;;) {
                ssize_t len = recv(fds[index], buf, sizeof buf, 0);
                int port, code, slot;
                if (len < 0) {
                    if (errno == EAGAIN || errno == EWOULDBLOCK)
                        break;
                    bad++; /* ECONNREFUSED and the like */
                    break;
                }
                now = now_ns();
                if (echo) {
                    port = len == 12 ? buf[4] << 8 | buf[5] : -1;
                    code = 0;
                } else if (len == 16 && buf[0] == 0 && buf[1] == 128 + opcode) {
                    port = buf[8] << 8 | buf[9];
                    code = buf[2] << 8 | buf[3];
                } else {
                    port = -1;
                    code = 0;
                }
                slot = port >= 0 ? slot_of[port] : -1;
                if (slot < 0 || port % n_sources != index) {
                    bad++; /* a duplicate, a late reply, or garbage */
                    continue;
                }
                keep(&s, now - jobs[slot].first_sent);
                codes[code]++;
                slot_of[port] = -1;
                if (next < count) {
                    int next_port = (int)(first + next++);
                    jobs[slot] = (struct job){now_ns(), 0, next_port};
                    jobs[slot].last_sent = jobs[slot].first_sent;
                    slot_of[next_port] = slot;
                    SEND_PORT(next_port);
                } else {
                    jobs[slot].port = 0;
                    pending--;
                }
            }
        }
        now = now_ns();
        if (now - last_check > 50000000u) {
            last_check = now;
            for (i = 0; i < o.window; i++) {
                struct job *job = &jobs[i];
                if (!job->port)
                    continue;
                if (now - job->first_sent > give_up_ns) {
                    lost++;
                    slot_of[job->port] = -1;
                    job->port = 0;
                    pending--;
                    if (next < count) { /* the slot takes the next job */
                        int next_port = (int)(first + next++);
                        *job = (struct job){now_ns(), 0, next_port};
                        job->last_sent = job->first_sent;
                        slot_of[next_port] = i;
                        pending++;
                        SEND_PORT(next_port);
                    }
                } else if (now - job->last_sent > timeout_ns) {
                    job->last_sent = now;
                    retransmitted++;
                    SEND_PORT(job->port);
                }
            }
        }
    }
#undef SEND_PORT
    seconds = (double)(now_ns() - start) / 1e9;
    for (i = 0; i < n_sources; i++)
        close(fds[i]);
    close(ep);
    printf("{\"generator\": \"c\", \"mode\": \"map\", \"window\": %d, \"sent\": %ld, "
           "\"answered\": %zu, \"retransmitted\": %ld, \"lost\": %ld, \"bad\": %ld, "
           "\"seconds\": %.6f, \"rate\": %.1f",
           o.window, sent, s.n, retransmitted, lost, bad, seconds,
           seconds > 0 ? (double)s.n / seconds : 0.0);
    print_latencies(&s);
    printf(", \"results\": {");
    {
        const char *comma = "";
        for (i = 0; i < 65536; i++) {
            if (codes[i]) {
                printf("%s\"%d\": %u", comma, i, codes[i]);
                comma = ", ";
            }
        }
    }
    printf("}}\n");
    free(s.ns);
    free(jobs);
    free(events);
    return 0;
}

/* ------------------------------------------------------------------ the echo server */

static int main_echo(int argc, char **argv)
{
    static const unsigned char reply[12] = {0, 128, 0, 0, 0, 0, 0, 1, 11, 22, 33, 44};
    static unsigned char bufs[BATCH][2048];
    static struct sockaddr_in sources[BATCH];
    static struct iovec in_iov[BATCH], out_iov[BATCH];
    static struct mmsghdr in[BATCH], out[BATCH];
    struct sockaddr_in listen_at, bound;
    socklen_t bound_len = sizeof bound;
    int fd, size = RCVBUF, one = 1, i;
    char text[INET_ADDRSTRLEN];
    if (argc != 2 || strcmp(argv[0], "--listen"))
        usage();
    parse_endpoint(argv[1], &listen_at);
    fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0)
        die("socket");
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (const struct sockaddr *)&listen_at, sizeof listen_at) < 0)
        die("bind");
    getsockname(fd, (struct sockaddr *)&bound, &bound_len);
    inet_ntop(AF_INET, &bound.sin_addr, text, sizeof text);
    printf("%s:%d\n", text, ntohs(bound.sin_port));
    fflush(stdout);
    for (i = 0; i < BATCH; i++) {
        in_iov[i] = (struct iovec){bufs[i], sizeof bufs[i]};
        in[i].msg_hdr = (struct msghdr){.msg_name = &sources[i], .msg_iov = &in_iov[i],
                                        .msg_iovlen = 1};
    }
    for (;;) {
        int got, n = 0;
        for (i = 0; i < BATCH; i++)
            in[i].msg_hdr.msg_namelen = sizeof sources[i];
        got = recvmmsg(fd, in, BATCH, MSG_WAITFORONE, NULL);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            die("recvmmsg");
        }
        for (i = 0; i < got; i++) {
            unsigned len = in[i].msg_len;
            if (len == 2 && bufs[i][0] == 0 && bufs[i][1] == 0)
                out_iov[n] = (struct iovec){(void *)reply, sizeof reply};
            else
                out_iov[n] = (struct iovec){bufs[i], len};
            out[n].msg_hdr = (struct msghdr){.msg_name = &sources[i],
                                             .msg_namelen = in[i].msg_hdr.msg_namelen,
                                             .msg_iov = &out_iov[n], .msg_iovlen = 1};
            n++;
        }
        for (i = 0; i < n;) {
            int done = sendmmsg(fd, out + i, (unsigned)(n - i), 0);
            if (done <= 0)
                break; /* a full buffer: drop the rest, as a loaded server would */
            i += done;
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2)
        usage();
    if (!strcmp(argv[1], "address"))
        return main_address(argc - 2, argv + 2);
    if (!strcmp(argv[1], "map"))
        return main_map(argc - 2, argv + 2);
    if (!strcmp(argv[1], "echo"))
        return main_echo(argc - 2, argv + 2);
    usage();
    return 2;
}
