// loadgen: the load generator of benchmarks/run.
//
// One process:
//   - subscriber readers: by default one thread, a single epoll loop over N WebSocket
//     client connections (to the relay at /ws?token=..&topic=T, or to nchan at /sub/T);
//     it completes the handshakes, reads frames, answers pings, counts deliveries and
//     records the latency of each event from the "t" field the publisher wrote
//     (--threads N splits the connections over N such loops);
//   - a publisher thread writes events to the server's Unix socket from K connections,
//     as fast as the server takes them or at a fixed rate (round robin over the
//     connections): relay = NDJSON lines, nchan = HTTP/1.1 POST /pub?id=T, keep-alive,
//     pipelined (at most --window requests outstanding per connection).
//
// Every event carries "t": 10^18 + CLOCK_MONOTONIC nanoseconds at the moment it is
// put into the write buffer (fixed width, so the template is patched in place);
// t = 10^18 exactly marks a warm-up event. Before measuring, every topic gets a
// warm-up event until every subscriber has received one (nchan registers a
// subscriber on the channel's owner worker asynchronously; for the relay the
// subscribed frame is waited for too), so no measured event can be published
// before its subscribers exist.
//
// --ports P1,P2,... connects the subscribers to several relays of a cluster (subscriber i to
// port (i + i / topics) mod count: each topic's subscribers dealt round robin over the ports);
// the result then gives deliveries per port and, with --server-pids, CPU per process.
//
// Latency is taken in user space: CLOCK_MONOTONIC when read() returns, minus "t".
//
// Throughput runs may pass --coalesce-us: the readers pause that long between
// epoll rounds, so that each read takes several frames and the reader costs less
// CPU on this shared 2-core machine (it adds up to that much latency, so latency
// runs do not use it).
//
// The result is one JSON object on standard output (with the CPU the process,
// the server's processes (--server-pids) and the rest of the machine used while
// measuring). Progress goes to stderr.
// Build: cc -O2 -pthread -o loadgen loadgen.c

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define T_OFFSET 1000000000000000000ULL /* 10^18: 19 digits for any uptime */
#define T_DIGITS 19

enum { RELAY, NCHAN };

static struct {
    int server;
    const char *host;
    int port;
    const char *pubsock;
    const char *token;
    const char *prefix;
    int subs;
    int topics;
    long events;
    double rate;     /* events/s; 0 = as fast as the server takes them */
    double pub_secs; /* stop publishing after this long (0 = no limit) */
    int pubconns;
    int window;
    int pad;
    double timeout;
    double quiet;
    int idle;        /* hold the connections open until stdin closes or says something */
    int warmup;
    int max_pending;
    int allow_loss;
    int threads;     /* subscriber reader threads */  /* nchan: events a subscriber never got are reported, not an error */
    int coalesce_us; /* throughput runs: pause between epoll rounds so each read takes several frames */
    const char *server_pids;
    int ports[16];   /* --ports: subscriber i connects to ports[i % nports] (several relays of a cluster) */
    int nports;
    int sse;         /* --sse: subscribers read GET /sse (server-sent events) instead of /ws */
} o = {
    .server = RELAY, .host = "127.0.0.1", .port = 8765, .prefix = "b", .subs = 1, .topics = 1,
    .events = 1000, .pubconns = 1, .window = 16, .pad = 24, .timeout = 60, .quiet = 3,
    .warmup = 1, .max_pending = 256, .server_pids = "", .threads = 1,
};

static uint64_t mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void put_digits(char *at, uint64_t v) {
    for (int i = T_DIGITS - 1; i >= 0; i--) {
        at[i] = (char)('0' + v % 10);
        v /= 10;
    }
}

// ---------------------------------------------------------------- event templates

/* One event per topic, prebuilt; the t digits are patched at send time. */
struct tmpl {
    char *bytes;
    int len;
    int tpos; /* offset of the 19 t digits */
};
static struct tmpl *tmpls;

static void build_templates(void) {
    tmpls = calloc((size_t)o.topics, sizeof *tmpls);
    char pad[4096];
    int padlen = o.pad < (int)sizeof pad - 1 ? o.pad : (int)sizeof pad - 1;
    memset(pad, 'x', (size_t)padlen);
    pad[padlen] = 0;
    char zeros[T_DIGITS + 1];
    memset(zeros, '0', T_DIGITS);
    zeros[T_DIGITS] = 0;
    for (int i = 0; i < o.topics; i++) {
        char body[8192];
        int blen = snprintf(body, sizeof body,
                            "{\"topic\":\"%s%d\",\"type\":\"progress\",\"t\":%s,\"progress\":50,"
                            "\"message\":\"step 1 of 2\",\"pad\":\"%s\"}",
                            o.prefix, i, zeros, pad);
        int tpos_body = (int)(strstr(body, "\"t\":") - body) + 4;
        char *out = malloc((size_t)blen + 512);
        int len, tpos;
        if (o.server == RELAY) {
            memcpy(out, body, (size_t)blen);
            out[blen] = '\n';
            len = blen + 1;
            tpos = tpos_body;
        } else {
            int hlen = snprintf(out, 512,
                                "POST /pub?id=%s%d HTTP/1.1\r\nHost: localhost\r\n"
                                "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n",
                                o.prefix, i, blen);
            memcpy(out + hlen, body, (size_t)blen);
            len = hlen + blen;
            tpos = hlen + tpos_body;
        }
        tmpls[i] = (struct tmpl){out, len, tpos};
    }
}

// ---------------------------------------------------------------- publisher connections

struct pconn {
    int fd;
    char *out;
    size_t olen, ooff, ocap;
    int outstanding; /* nchan: requests written and not yet answered */
    char in[65536];
    size_t ilen;
    long responses, bad;
};

static struct pconn *pconns;
static int npconns;
static uint64_t *published_per_topic;
static atomic_long published;        /* events handed to the socket (measured phase) */
static atomic_int pub_done;
static atomic_ullong pub_start_ns, pub_end_ns;
static long pub_bad_total, pub_responses_total;
static char first_bad[256];

static int connect_unix(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket(AF_UNIX)");
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect(publisher socket)");
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void pc_append(struct pconn *c, const char *b, size_t n) {
    if (c->olen + n > c->ocap) {
        if (c->ooff > 0) {
            memmove(c->out, c->out + c->ooff, c->olen - c->ooff);
            c->olen -= c->ooff;
            c->ooff = 0;
        }
        if (c->olen + n > c->ocap) {
            c->ocap = (c->olen + n) * 2;
            c->out = realloc(c->out, c->ocap);
        }
    }
    memcpy(c->out + c->olen, b, n);
    c->olen += n;
}

/* Appends one event of `topic`, stamped now (a warm-up event when `warm`: t = 0). */
static void pc_event(struct pconn *c, int topic, int warm) {
    struct tmpl *t = &tmpls[topic];
    pc_append(c, t->bytes, (size_t)t->len);
    /* pc_append may have moved the data; the event is the last len bytes */
    size_t at = c->olen - (size_t)t->len;
    put_digits(c->out + at + t->tpos, warm ? T_OFFSET : T_OFFSET + mono());
    if (o.server == NCHAN) c->outstanding++;
}

/* Writes what is pending; returns -1 on a broken connection. */
static int pc_flush(struct pconn *c) {
    while (c->ooff < c->olen) {
        ssize_t n = write(c->fd, c->out + c->ooff, c->olen - c->ooff);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return 0;
            return -1;
        }
        c->ooff += (size_t)n;
    }
    c->ooff = c->olen = 0;
    return 0;
}

/* Reads answers: nchan HTTP responses (counted), relay error lines (counted as bad). */
static int pc_read(struct pconn *c) {
    for (;;) {
        ssize_t n = read(c->fd, c->in + c->ilen, sizeof c->in - c->ilen);
        if (n == 0) return -1;
        if (n < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
        c->ilen += (size_t)n;
        size_t off = 0;
        for (;;) {
            char *p = c->in + off;
            size_t left = c->ilen - off;
            if (o.server == RELAY) {
                char *nl = memchr(p, '\n', left);
                if (!nl) break;
                c->bad++;
                if (!first_bad[0]) snprintf(first_bad, sizeof first_bad, "%.*s", (int)(nl - p), p);
                off += (size_t)(nl - p) + 1;
            } else {
                char *end = memmem(p, left, "\r\n\r\n", 4);
                if (!end) break;
                size_t hlen = (size_t)(end - p) + 4;
                long clen = 0;
                char *cl = memmem(p, hlen, "Content-Length:", 15);
                if (!cl) cl = memmem(p, hlen, "content-length:", 15);
                if (cl) clen = strtol(cl + 15, NULL, 10);
                if (left < hlen + (size_t)clen) break;
                int status = (left > 12 && memcmp(p, "HTTP/1.", 7) == 0) ? atoi(p + 9) : 0;
                if (status != 201 && status != 202) {
                    c->bad++;
                    if (!first_bad[0]) snprintf(first_bad, sizeof first_bad, "HTTP %d", status);
                }
                c->responses++;
                c->outstanding--;
                off += hlen + (size_t)clen;
            }
        }
        memmove(c->in, c->in + off, c->ilen - off);
        c->ilen -= off;
        if (c->ilen == sizeof c->in) c->ilen = 0; /* garbage; never happens with sane servers */
    }
}

/* Publishes warm-up events to the given topics from connection 0 and waits until written. */
static void publish_warmup(const int *topics, int n) {
    struct pconn *c = &pconns[0];
    for (int i = 0; i < n; i++) {
        pc_event(c, topics[i], 1);
        if (c->olen > 256 * 1024 || (o.server == NCHAN && c->outstanding >= 64)) {
            /* drain */
            while (c->ooff < c->olen || (o.server == NCHAN && c->outstanding >= 64)) {
                struct pollfd p = {c->fd, POLLIN | (c->ooff < c->olen ? POLLOUT : 0), 0};
                poll(&p, 1, 100);
                if (pc_flush(c) < 0 || pc_read(c) < 0) die("warm-up publisher connection");
            }
        }
    }
    uint64_t until = mono() + 5000000000ULL;
    while ((c->ooff < c->olen || (o.server == NCHAN && c->outstanding > 0)) && mono() < until) {
        struct pollfd p = {c->fd, POLLIN | (c->ooff < c->olen ? POLLOUT : 0), 0};
        poll(&p, 1, 100);
        if (pc_flush(c) < 0 || pc_read(c) < 0) die("warm-up publisher connection");
    }
}

static void *publisher(void *arg) {
    (void)arg;
    const size_t relay_chunk = 64 * 1024;
    uint64_t start = mono();
    atomic_store(&pub_start_ns, start);
    uint64_t stop_at = o.pub_secs > 0 ? start + (uint64_t)(o.pub_secs * 1e9) : UINT64_MAX;
    long next = 0;
    int rr = 0;
    for (;;) {
        uint64_t now = mono();
        long due = o.events;
        if (o.rate > 0) {
            due = (long)((double)(now - start) * o.rate / 1e9) + 1;
            if (due > o.events) due = o.events;
        }
        if (now >= stop_at && due > next) due = next; /* time is up: publish nothing more */
        /* hand due events to the connections round robin, skipping those without room
           (relay: 64 KiB not yet written; nchan: --window requests not yet answered) */
        int full = 0;
        while (next < due && full < npconns) {
            struct pconn *c = &pconns[rr];
            rr = (rr + 1) % npconns;
            int room = o.server == RELAY ? (c->olen - c->ooff) < relay_chunk : c->outstanding < o.window;
            if (!room) {
                full++;
                continue;
            }
            full = 0;
            int topic = (int)(next % o.topics);
            pc_event(c, topic, 0);
            published_per_topic[topic]++;
            next++;
        }
        int pending = 0;
        for (int k = 0; k < npconns; k++) {
            if (pc_flush(&pconns[k]) < 0) {
                fprintf(stderr, "loadgen: publisher connection %d broke: %s\n", k, strerror(errno));
                goto out;
            }
            if (pconns[k].ooff < pconns[k].olen || pconns[k].outstanding > 0) pending = 1;
        }
        atomic_store(&published, next);
        if ((next >= o.events || now >= stop_at) && !pending) break;
        /* wait for writability, answers, or the next due event */
        struct pollfd pf[64];
        for (int k = 0; k < npconns; k++) {
            pf[k].fd = pconns[k].fd;
            pf[k].events = POLLIN | (pconns[k].ooff < pconns[k].olen ? POLLOUT : 0);
            pf[k].revents = 0;
        }
        struct timespec ts = {0, 100 * 1000000};
        if (o.rate > 0 && next < o.events) {
            uint64_t at = start + (uint64_t)((double)next * 1e9 / o.rate);
            uint64_t now2 = mono();
            uint64_t wait = at > now2 ? at - now2 : 0;
            if (wait < 100000000ULL) ts = (struct timespec){0, (long)wait};
        } else if (next < due) {
            ts = (struct timespec){0, 1000000}; /* all full: wait for room */
        }
        if (ts.tv_nsec > 0 || ts.tv_sec > 0) ppoll(pf, (nfds_t)npconns, &ts, NULL);
        for (int k = 0; k < npconns; k++) {
            if (pc_read(&pconns[k]) < 0) {
                fprintf(stderr, "loadgen: publisher connection %d closed by the server\n", k);
                goto out;
            }
        }
    }
out:
    atomic_store(&published, next);
    atomic_store(&pub_end_ns, mono());
    for (int k = 0; k < npconns; k++) {
        pub_bad_total += pconns[k].bad;
        pub_responses_total += pconns[k].responses;
    }
    atomic_store(&pub_done, 1);
    return NULL;
}

// ---------------------------------------------------------------- subscribers

enum { S_CONNECTING, S_HANDSHAKE, S_OPEN, S_CLOSED };

struct sub {
    int fd;
    int topic;
    uint16_t worker;
    uint8_t port_idx; /* which of --ports */
    uint8_t state, subscribed, warmed;
    char *buf; /* unparsed bytes (handshake answer or a partial frame) */
    uint32_t blen, bcap;
};

/* One reader: an epoll set over its share of the subscribers, and its own counts.
 * Connecting and warming up run on the main thread; measuring runs one thread per reader. */
struct wk {
    int epfd;
    pthread_t thread;
    char *rbuf;
    int pending, open, subscribed, warmed, closed, failed, refused;
    long frames, control, errors, pings, warmups_seen;
    long reads, waits; /* read() and epoll_wait() calls in the measured phase */
    atomic_long deliveries;
    atomic_ullong last_delivery;
    uint64_t *samples;
    long nsamples, cap;
    char first_error[256];
    long close_codes[8]; /* 1000,1001,1008,1011,1013,4401,4403,other */
    atomic_long port_deliveries[16]; /* measured deliveries per --ports entry */
};

#define RBUF_SIZE (1 << 20)
static struct sub *subs;
static int *subcount_of_topic;
static struct wk *wks;
static int nwk = 1;
static int master_ep; /* epoll over the readers' epoll sets, for the single-threaded phases */
static atomic_int measuring, stopping;

static const char upgrade_fmt_relay[] =
    "GET /ws?token=%s&topic=%s%d HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
static const char upgrade_fmt_nchan[] =
    "GET /sub/%s%d HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/* --sse: the same token and topic, as an event stream; the answer is 200, then SSE events. */
static const char request_fmt_sse[] =
    "GET /sse?token=%s&topic=%s%d HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n";

static void sub_close(struct wk *w, struct sub *s, int failed) {
    if (s->state == S_CLOSED) return;
    if (s->state == S_OPEN) w->open--;
    else w->pending--;
    if (failed) w->failed++;
    else w->closed++;
    s->state = S_CLOSED;
    epoll_ctl(w->epfd, EPOLL_CTL_DEL, s->fd, NULL);
    close(s->fd);
    free(s->buf);
    s->buf = NULL;
    s->blen = s->bcap = 0;
}

static void sub_start(int i) {
    struct sub *s = &subs[i];
    struct wk *w = &wks[s->worker];
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) die("socket");
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)o.ports[s->port_idx])};
    inet_pton(AF_INET, o.host, &a.sin_addr);
    s->state = S_CONNECTING;
    w->pending++;
    if (connect(s->fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) {
        fprintf(stderr, "loadgen: connect: %s\n", strerror(errno));
        s->state = S_CLOSED;
        w->pending--;
        w->failed++;
        close(s->fd);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u32 = (uint32_t)i};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, s->fd, &ev) < 0) die("epoll_ctl");
}

static void sub_send_request(struct wk *w, struct sub *s) {
    char req[2048];
    int n = o.sse ? snprintf(req, sizeof req, request_fmt_sse, o.token, o.prefix, s->topic)
          : o.server == RELAY ? snprintf(req, sizeof req, upgrade_fmt_relay, o.token, o.prefix, s->topic)
                              : snprintf(req, sizeof req, upgrade_fmt_nchan, o.prefix, s->topic);
    if (write(s->fd, req, (size_t)n) != n) {
        sub_close(w, s, 1);
        return;
    }
    s->state = S_HANDSHAKE;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)(s - subs)};
    epoll_ctl(w->epfd, EPOLL_CTL_MOD, s->fd, &ev);
}

static void pong(struct sub *s, const uint8_t *payload, size_t len) {
    uint8_t f[2 + 4 + 125];
    if (len > 125) len = 125;
    f[0] = 0x8A;
    f[1] = (uint8_t)(0x80 | len);
    memset(f + 2, 0, 4); /* mask key 0: payload unchanged */
    memcpy(f + 6, payload, len);
    (void)!write(s->fd, f, 6 + len);
}

static void text_frame(struct wk *w, struct sub *s, const char *p, size_t len, uint64_t now) {
    w->frames++;
    if (o.server == RELAY && len > 6 && memcmp(p, "{\"op\":", 6) == 0) {
        w->control++;
        if (memmem(p, len, "\"op\":\"subscribed\"", 17)) {
            if (!s->subscribed) {
                s->subscribed = 1;
                w->subscribed++;
            }
        } else if (memmem(p, len, "\"op\":\"error\"", 12)) {
            w->errors++;
            if (!w->first_error[0]) snprintf(w->first_error, sizeof w->first_error, "%.*s", (int)len, p);
        }
        return;
    }
    const char *t = memmem(p, len, "\"t\":", 4);
    if (!t || (size_t)(t - p) + 4 + T_DIGITS > len) {
        w->errors++;
        if (!w->first_error[0])
            snprintf(w->first_error, sizeof w->first_error, "unexpected frame %.*s", (int)(len < 200 ? len : 200), p);
        return;
    }
    uint64_t v = 0;
    for (int i = 0; i < T_DIGITS; i++) v = v * 10 + (uint64_t)(t[4 + i] - '0');
    if (v <= T_OFFSET) {
        w->warmups_seen++;
        if (!s->warmed) {
            s->warmed = 1;
            w->warmed++;
        }
        return;
    }
    uint64_t sent = v - T_OFFSET;
    atomic_store_explicit(&w->deliveries, atomic_load_explicit(&w->deliveries, memory_order_relaxed) + 1,
                          memory_order_relaxed);
    atomic_store_explicit(&w->last_delivery, now, memory_order_relaxed);
    atomic_store_explicit(&w->port_deliveries[s->port_idx],
                          atomic_load_explicit(&w->port_deliveries[s->port_idx], memory_order_relaxed) + 1,
                          memory_order_relaxed);
    if (atomic_load_explicit(&measuring, memory_order_relaxed) && w->nsamples < w->cap)
        w->samples[w->nsamples++] = now > sent ? now - sent : 0;
}

/* Parses frames in b[0..n); returns the bytes consumed. */
static size_t frames(struct wk *w, struct sub *s, const uint8_t *b, size_t n, uint64_t now) {
    size_t off = 0;
    while (n - off >= 2) {
        const uint8_t *f = b + off;
        uint8_t op = f[0] & 0x0F;
        int masked = f[1] & 0x80;
        uint64_t plen = f[1] & 0x7F;
        size_t h = 2;
        if (plen == 126) {
            if (n - off < 4) break;
            plen = ((uint64_t)f[2] << 8) | f[3];
            h = 4;
        } else if (plen == 127) {
            if (n - off < 10) break;
            plen = 0;
            for (int i = 0; i < 8; i++) plen = (plen << 8) | f[2 + i];
            h = 10;
        }
        if (masked) h += 4;
        if (n - off < h + plen) break;
        const uint8_t *p = f + h;
        switch (op) {
        case 0x1:
        case 0x0:
            text_frame(w, s, (const char *)p, (size_t)plen, now);
            break;
        case 0x8: {
            uint16_t code = plen >= 2 ? (uint16_t)((p[0] << 8) | p[1]) : 1005;
            int slot = code == 1000 ? 0 : code == 1001 ? 1 : code == 1008 ? 2 : code == 1011 ? 3 : code == 1013 ? 4
                     : code == 4401 ? 5 : code == 4403 ? 6 : 7;
            w->close_codes[slot]++;
            sub_close(w, s, 0);
            return n;
        }
        case 0x9:
            w->pings++;
            pong(s, p, (size_t)plen);
            break;
        default:
            break;
        }
        off += h + (size_t)plen;
    }
    return off;
}

/* --sse: parses whole events (up to a blank line) in b[0..n); each one's `data:` line is what a
 * WebSocket frame would carry (comments and the `retry:` block have none). Returns the bytes consumed. */
static size_t sse_events(struct wk *w, struct sub *s, const uint8_t *b, size_t n, uint64_t now) {
    size_t off = 0;
    for (;;) {
        const char *start = (const char *)b + off;
        const char *end = memmem(start, n - off, "\n\n", 2);
        if (!end) break;
        size_t len = (size_t)(end - start);
        const char *data = len >= 6 && memcmp(start, "data: ", 6) == 0 ? start : memmem(start, len, "\ndata: ", 7);
        if (data) {
            if (*data == '\n') data++;
            data += 6;
            const char *eol = memchr(data, '\n', (size_t)(end - data));
            text_frame(w, s, data, (size_t)((eol ? eol : end) - data), now);
        }
        off += len + 2;
    }
    return off;
}

static void sub_readable(struct wk *w, struct sub *s) {
    char *rbuf = w->rbuf;
    size_t have = s->blen;
    if (have) memcpy(rbuf, s->buf, have);
    ssize_t n = read(s->fd, rbuf + have, RBUF_SIZE - have);
    w->reads++;
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        if (s->state == S_HANDSHAKE) w->refused++;
        sub_close(w, s, s->state != S_OPEN);
        return;
    }
    if (n < 0) return;
    uint64_t now = mono();
    size_t total = have + (size_t)n;
    size_t off = 0;
    if (s->state == S_HANDSHAKE) {
        char *end = memmem(rbuf, total, "\r\n\r\n", 4);
        if (!end) goto keep;
        if (total < 12 || memcmp(rbuf + 9, o.sse ? "200" : "101", 3) != 0) {
            w->refused++;
            if (!w->first_error[0]) snprintf(w->first_error, sizeof w->first_error, "handshake: %.60s", rbuf);
            sub_close(w, s, 1);
            return;
        }
        s->state = S_OPEN;
        w->pending--;
        w->open++;
        off = (size_t)(end - rbuf) + 4;
    }
    off += o.sse ? sse_events(w, s, (uint8_t *)rbuf + off, total - off, now)
                 : frames(w, s, (uint8_t *)rbuf + off, total - off, now);
    if (s->state == S_CLOSED) return;
keep:
    s->blen = (uint32_t)(total - off);
    if (s->blen) {
        if (s->blen > s->bcap) {
            s->bcap = s->blen < 256 ? 256 : s->blen;
            s->buf = realloc(s->buf, s->bcap);
        }
        memmove(s->buf, rbuf + off, s->blen);
    }
}

/* One epoll round of one reader. */
static void poll_worker(struct wk *w, int timeout_ms) {
    struct epoll_event evs[512];
    int n = epoll_wait(w->epfd, evs, 512, timeout_ms);
    w->waits++;
    for (int i = 0; i < n; i++) {
        struct sub *s = &subs[evs[i].data.u32];
        if (s->state == S_CLOSED) continue;
        if (s->state == S_CONNECTING) {
            if (evs[i].events & (EPOLLERR | EPOLLHUP)) {
                sub_close(w, s, 1);
                continue;
            }
            if (evs[i].events & EPOLLOUT) sub_send_request(w, s);
            continue;
        }
        sub_readable(w, s);
    }
}

/* Single-threaded phases: waits on every reader's set at once, then serves the ready ones. */
static void poll_all(int timeout_ms) {
    struct epoll_event evs[64];
    int n = epoll_wait(master_ep, evs, 64, timeout_ms);
    for (int i = 0; i < n; i++) poll_worker(&wks[evs[i].data.u32], 0);
}

static struct {
    int pending, open, subscribed, warmed, closed, failed, refused;
    long deliveries;
} tot;

static void totals(void) {
    memset(&tot, 0, sizeof tot);
    for (int k = 0; k < nwk; k++) {
        tot.pending += wks[k].pending;
        tot.open += wks[k].open;
        tot.subscribed += wks[k].subscribed;
        tot.warmed += wks[k].warmed;
        tot.closed += wks[k].closed;
        tot.failed += wks[k].failed;
        tot.refused += wks[k].refused;
        tot.deliveries += atomic_load_explicit(&wks[k].deliveries, memory_order_relaxed);
    }
}

static void *reader(void *arg) {
    struct wk *w = arg;
    while (!atomic_load(&stopping)) {
        poll_worker(w, 10);
        if (o.coalesce_us > 0) {
            struct timespec nap = {0, o.coalesce_us * 1000L};
            nanosleep(&nap, NULL);
        }
    }
    return NULL;
}

// ---------------------------------------------------------------- server CPU

/* CPU seconds of each of --server-pids (at most 16), in their order; returns how many. */
static int server_cpu_each(double *each) {
    int k = 0;
    long tick = sysconf(_SC_CLK_TCK);
    char list[1024];
    snprintf(list, sizeof list, "%s", o.server_pids);
    for (char *tok = strtok(list, ","); tok && k < 16; tok = strtok(NULL, ","), k++) {
        char path[64], buf[4096];
        each[k] = 0;
        snprintf(path, sizeof path, "/proc/%s/stat", tok);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        char *p = strrchr(buf, ')');
        if (!p) continue;
        unsigned long ut = 0, st = 0;
        if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) == 2)
            each[k] = (double)(ut + st) / (double)tick;
    }
    return k;
}

static double server_cpu(void) {
    double total = 0;
    long tick = sysconf(_SC_CLK_TCK);
    char list[1024];
    snprintf(list, sizeof list, "%s", o.server_pids);
    for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
        char path[64], buf[4096];
        snprintf(path, sizeof path, "/proc/%s/stat", tok);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        char *p = strrchr(buf, ')');
        if (!p) continue;
        unsigned long ut = 0, st = 0;
        /* fields after ") ": state(3) ... utime(14) stime(15) */
        if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) == 2)
            total += (double)(ut + st) / (double)tick;
    }
    return total;
}

/* CPU seconds the whole machine was busy (all processes), from /proc/stat. */
static double machine_busy(void) {
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return 0;
    unsigned long long v[8] = {0};
    int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    if (n < 5) return 0;
    unsigned long long busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    return (double)busy / (double)sysconf(_SC_CLK_TCK);
}

static double cpu_of(int who) {
    struct rusage ru;
    getrusage(who, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --server relay|nchan --port P --pubsock PATH [--token JWT] [--subs N] [--topics T]\n"
            "       [--events E] [--rate R] [--pub-seconds S] [--pubconns K] [--window W] [--pad B]\n"
            "       [--timeout S] [--quiet S] [--idle] [--no-warmup] [--prefix P] [--server-pids a,b]\n"
            "       [--coalesce-us U] [--max-pending N] [--allow-loss] [--threads N] [--ports P1,P2,...] [--sse]\n"
            "--sse reads the relay's GET /sse (server-sent events) instead of WebSocket.\n"
            "--ports spreads the subscribers round robin over several ports (relays of a cluster);\n"
            "the result then counts deliveries per port and --server-pids CPU per process.\n");
    exit(2);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
#define ARG (i + 1 < argc ? argv[++i] : (usage(), ""))
        if (!strcmp(a, "--server")) {
            const char *v = ARG;
            o.server = !strcmp(v, "nchan") ? NCHAN : RELAY;
        } else if (!strcmp(a, "--host")) o.host = ARG;
        else if (!strcmp(a, "--port")) o.port = atoi(ARG);
        else if (!strcmp(a, "--pubsock")) o.pubsock = ARG;
        else if (!strcmp(a, "--token")) o.token = ARG;
        else if (!strcmp(a, "--prefix")) o.prefix = ARG;
        else if (!strcmp(a, "--subs")) o.subs = atoi(ARG);
        else if (!strcmp(a, "--topics")) o.topics = atoi(ARG);
        else if (!strcmp(a, "--events")) o.events = atol(ARG);
        else if (!strcmp(a, "--rate")) o.rate = atof(ARG);
        else if (!strcmp(a, "--pub-seconds")) o.pub_secs = atof(ARG);
        else if (!strcmp(a, "--pubconns")) o.pubconns = atoi(ARG);
        else if (!strcmp(a, "--window")) o.window = atoi(ARG);
        else if (!strcmp(a, "--pad")) o.pad = atoi(ARG);
        else if (!strcmp(a, "--timeout")) o.timeout = atof(ARG);
        else if (!strcmp(a, "--quiet")) o.quiet = atof(ARG);
        else if (!strcmp(a, "--idle")) o.idle = 1;
        else if (!strcmp(a, "--no-warmup")) o.warmup = 0;
        else if (!strcmp(a, "--max-pending")) o.max_pending = atoi(ARG);
        else if (!strcmp(a, "--server-pids")) o.server_pids = ARG;
        else if (!strcmp(a, "--coalesce-us")) o.coalesce_us = atoi(ARG);
        else if (!strcmp(a, "--allow-loss")) o.allow_loss = 1;
        else if (!strcmp(a, "--sse")) o.sse = 1;
        else if (!strcmp(a, "--threads")) o.threads = atoi(ARG);
        else if (!strcmp(a, "--ports")) {
            char list[512];
            snprintf(list, sizeof list, "%s", ARG);
            o.nports = 0;
            for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
                if (o.nports == 16) usage();
                o.ports[o.nports++] = atoi(tok);
            }
        } else usage();
    }
    if (o.nports == 0) o.ports[o.nports++] = o.port;
    if (!o.pubsock || (o.server == RELAY && !o.token) || o.topics < 1 || o.pubconns < 1 || o.pubconns > 64 ||
        o.threads < 1 || o.threads > 64)
        usage();
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);

    uint64_t t0 = mono();
    uint64_t deadline = t0 + (uint64_t)(o.timeout * 1e9);
    build_templates();
    published_per_topic = calloc((size_t)o.topics, sizeof *published_per_topic);
    subcount_of_topic = calloc((size_t)o.topics, sizeof *subcount_of_topic);
    subs = calloc((size_t)(o.subs > 0 ? o.subs : 1), sizeof *subs);
    nwk = o.threads;
    wks = calloc((size_t)nwk, sizeof *wks);
    master_ep = epoll_create1(EPOLL_CLOEXEC);
    if (master_ep < 0) die("epoll_create1");
    for (int k = 0; k < nwk; k++) {
        wks[k].epfd = epoll_create1(EPOLL_CLOEXEC);
        if (wks[k].epfd < 0) die("epoll_create1");
        wks[k].rbuf = malloc(RBUF_SIZE);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)k};
        if (epoll_ctl(master_ep, EPOLL_CTL_ADD, wks[k].epfd, &ev) < 0) die("epoll_ctl(master)");
    }
    for (int i = 0; i < o.subs; i++) {
        subs[i].topic = i % o.topics;
        subs[i].worker = (uint16_t)(i % nwk);
        /* each topic's subscribers dealt round robin over the ports, every port getting topics too */
        subs[i].port_idx = (uint8_t)((i + i / o.topics) % o.nports);
        subcount_of_topic[subs[i].topic]++;
    }

    /* ---- connect */
    const char *phase = "connect";
    int next_sub = 0;
    int ok = 1;
    while (mono() < deadline) {
        totals();
        while (next_sub < o.subs && tot.pending < o.max_pending) {
            sub_start(next_sub++);
            tot.pending++;
        }
        totals();
        if (next_sub == o.subs && tot.pending == 0 &&
            (o.server == NCHAN || tot.subscribed + tot.failed + tot.closed >= o.subs))
            break;
        poll_all(50);
    }
    totals();
    double connect_s = (double)(mono() - t0) / 1e9;
    fprintf(stderr, "loadgen: %d open, %d subscribed, %d failed in %.2f s\n", tot.open, tot.subscribed, tot.failed,
            connect_s);
    if (tot.open < o.subs) ok = 0;

    npconns = o.pubconns;
    pconns = calloc((size_t)npconns, sizeof *pconns);
    for (int k = 0; k < npconns; k++) pconns[k].fd = connect_unix(o.pubsock);

    /* ---- warm up: every subscriber has received an event before any measured event */
    double warm_s = 0;
    int warm_rounds = 0;
    if (ok && o.warmup && o.subs > 0) {
        phase = "warmup";
        uint64_t w0 = mono();
        int *todo = malloc(sizeof(int) * (size_t)o.topics);
        char *need = calloc((size_t)o.topics, 1);
        for (;;) {
            totals();
            if (tot.warmed >= tot.open || mono() >= deadline) break;
            memset(need, 0, (size_t)o.topics);
            int n = 0;
            for (int i = 0; i < o.subs; i++)
                if (subs[i].state == S_OPEN && !subs[i].warmed && !need[subs[i].topic]) {
                    need[subs[i].topic] = 1;
                    todo[n++] = subs[i].topic;
                }
            publish_warmup(todo, n);
            warm_rounds++;
            uint64_t until = mono() + 300000000ULL + (uint64_t)n * 20000ULL;
            for (;;) {
                totals();
                if (tot.warmed >= tot.open || mono() >= until || mono() >= deadline) break;
                poll_all(20);
            }
        }
        free(todo);
        free(need);
        totals();
        warm_s = (double)(mono() - w0) / 1e9;
        fprintf(stderr, "loadgen: %d warmed in %d rounds, %.2f s\n", tot.warmed, warm_rounds, warm_s);
        if (tot.warmed < tot.open || tot.open < o.subs) ok = 0;
    }

    /* ---- measure */
    double each0[16] = {0}, each1[16] = {0};
    for (int k = 0; k < nwk; k++)
        for (int q = 0; q < 16; q++) atomic_store(&wks[k].port_deliveries[q], 0);
    server_cpu_each(each0);
    double cpu0 = cpu_of(RUSAGE_SELF), tcpu0 = cpu_of(RUSAGE_THREAD), scpu0 = server_cpu(), busy0 = machine_busy();
    uint64_t m0 = mono();
    long expected = 0;
    int timed_out = 0;
    if (o.idle) {
        phase = "idle";
        totals();
        printf("{\"open\":%d,\"subscribed\":%d,\"failed\":%d,\"connect_s\":%.3f}\n", tot.open, tot.subscribed,
               tot.failed, connect_s);
        fflush(stdout);
        for (;;) {
            struct pollfd p = {0, POLLIN, 0};
            if (poll(&p, 1, 0) > 0) break;
            if (mono() >= deadline) {
                timed_out = 1;
                break;
            }
            poll_all(100);
        }
    } else if (ok) {
        phase = "measure";
        long per_worker = o.subs > 0 ? (long)o.events * (long)(o.subs / o.topics + 1) / nwk + 1024 : 0;
        if (per_worker > 20000000 / nwk) per_worker = 20000000 / nwk;
        for (int k = 0; k < nwk; k++) {
            wks[k].cap = per_worker;
            wks[k].samples = malloc(sizeof(uint64_t) * (size_t)(per_worker > 0 ? per_worker : 1));
            atomic_store(&wks[k].deliveries, 0);
            wks[k].reads = wks[k].waits = 0;
        }
        atomic_store(&measuring, 1);
        for (int k = 1; k < nwk; k++) pthread_create(&wks[k].thread, NULL, reader, &wks[k]);
        pthread_t th;
        pthread_create(&th, NULL, publisher, NULL);
        uint64_t last_progress = mono();
        long last_count = 0;
        for (;;) {
            poll_worker(&wks[0], 10);
            if (o.coalesce_us > 0) {
                struct timespec nap = {0, o.coalesce_us * 1000L};
                nanosleep(&nap, NULL);
            }
            uint64_t now = mono();
            long delivered = 0;
            int open = 0;
            for (int k = 0; k < nwk; k++) {
                delivered += atomic_load_explicit(&wks[k].deliveries, memory_order_relaxed);
                open += wks[k].open; /* racy for k > 0; only used to stop early when everything closed */
            }
            if (delivered != last_count) {
                last_count = delivered;
                last_progress = now;
            }
            if (atomic_load(&pub_done)) {
                if (!expected) {
                    for (int t = 0; t < o.topics; t++) expected += (long)published_per_topic[t] * subcount_of_topic[t];
                    if (!expected) expected = -1;
                }
                if (delivered >= expected) break;
                if (now - last_progress > (uint64_t)(o.quiet * 1e9)) break;
            }
            if (now >= deadline) {
                timed_out = 1;
                break;
            }
            if (open == 0 && o.subs > 0) break;
        }
        atomic_store(&stopping, 1);
        for (int k = 1; k < nwk; k++) pthread_join(wks[k].thread, NULL);
        if (!atomic_load(&pub_done)) {
            fprintf(stderr, "loadgen: timed out with the publisher still running\n");
            printf("{\"ok\":false,\"error\":\"timeout in %s\"}\n", phase);
            fflush(stdout);
            _exit(1);
        }
        pthread_join(th, NULL);
        if (expected < 0) expected = 0;
    }
    double cpu = cpu_of(RUSAGE_SELF) - cpu0, tcpu = cpu_of(RUSAGE_THREAD) - tcpu0, scpu = server_cpu() - scpu0;
    int npids = server_cpu_each(each1);
    double other = machine_busy() - busy0 - cpu - scpu; /* everything else on the machine */
    if (other < 0) other = 0;
    double wall = (double)(mono() - m0) / 1e9;

    /* ---- results: merge the readers */
    totals();
    long nsamples = 0, frames_n = 0, errors = 0, pings = 0, reads = 0, waits = 0, codes[8] = {0};
    uint64_t last_delivery = 0;
    char *first_error = "";
    for (int k = 0; k < nwk; k++) {
        nsamples += wks[k].nsamples;
        frames_n += wks[k].frames;
        errors += wks[k].errors;
        pings += wks[k].pings;
        reads += wks[k].reads;
        waits += wks[k].waits;
        for (int c = 0; c < 8; c++) codes[c] += wks[k].close_codes[c];
        uint64_t l = atomic_load(&wks[k].last_delivery);
        if (l > last_delivery) last_delivery = l;
        if (!first_error[0] && wks[k].first_error[0]) first_error = wks[k].first_error;
    }
    uint64_t *samples = malloc(sizeof(uint64_t) * (size_t)(nsamples > 0 ? nsamples : 1));
    long at = 0;
    for (int k = 0; k < nwk; k++) {
        if (wks[k].nsamples) memcpy(samples + at, wks[k].samples, sizeof(uint64_t) * (size_t)wks[k].nsamples);
        at += wks[k].nsamples;
    }
    uint64_t ps = atomic_load(&pub_start_ns);
    double span = ps && last_delivery > ps ? (double)(last_delivery - ps) / 1e9 : 0;
    double pub_span = ps ? (double)(atomic_load(&pub_end_ns) - ps) / 1e9 : 0;
    qsort(samples, (size_t)nsamples, sizeof(uint64_t), cmp_u64);
#define PCT(q) (nsamples ? samples[(size_t)((double)(nsamples - 1) * (q))] : 0)
    double mean = 0;
    for (long i = 0; i < nsamples; i++) mean += (double)samples[i];
    if (nsamples) mean /= (double)nsamples;
    long pub = atomic_load(&published);
    long deliveries = tot.deliveries;
    int complete = deliveries >= expected;
    if (!o.idle && (deliveries == 0 || (!complete && !o.allow_loss) || pub_bad_total)) ok = 0;
    if (o.idle && tot.open < o.subs) ok = 0;
    if (timed_out && !o.idle) ok = 0;
    printf("{\"ok\":%s,\"server\":\"%s\",\"subs\":%d,\"topics\":%d,\"open\":%d,\"subscribed\":%d,\"failed\":%d,"
           "\"refused\":%d,\"closed_by_server\":%d,\"connect_s\":%.3f,\"warmup_s\":%.3f,\"warmup_rounds\":%d,"
           "\"readers\":%d,\"pubconns\":%d,"
           "\"published\":%ld,\"publish_s\":%.4f,\"expected\":%ld,\"deliveries\":%ld,\"span_s\":%.4f,"
           "\"complete\":%s,\"lost\":%ld,\"deliveries_per_s\":%.0f,\"events_per_s\":%.0f,\"accepted_per_s\":%.0f,"
           "\"lat_p50_us\":%.1f,\"lat_p99_us\":%.1f,\"lat_p999_us\":%.1f,\"lat_max_us\":%.1f,\"lat_mean_us\":%.1f,"
           "\"samples\":%ld,\"loadgen_cpu_s\":%.3f,\"loadgen_main_thread_cpu_s\":%.3f,\"server_cpu_s\":%.3f,"
           "\"other_cpu_s\":%.3f,\"wall_s\":%.3f,"
           "\"pub_responses\":%ld,\"pub_bad\":%ld,\"first_bad\":\"%s\",\"errors\":%ld,\"frames\":%ld,\"pings\":%ld,"
           "\"reads\":%ld,\"epoll_waits\":%ld,\"close_1001\":%ld,\"close_1013\":%ld,\"close_other\":%ld,"
           "\"timed_out\":%s,\"phase\":\"%s\",",
           ok ? "true" : "false", o.server == RELAY ? "relay" : "nchan", o.subs, o.topics, tot.open, tot.subscribed,
           tot.failed, tot.refused, tot.closed, connect_s, warm_s, warm_rounds, nwk, npconns, pub, pub_span, expected,
           deliveries, span, complete ? "true" : "false", expected > deliveries ? expected - deliveries : 0,
           span > 0 ? (double)deliveries / span : 0, span > 0 ? (double)pub / span : 0,
           pub_span > 0 ? (double)pub / pub_span : 0, PCT(0.5) / 1e3, PCT(0.99) / 1e3, PCT(0.999) / 1e3,
           nsamples ? samples[nsamples - 1] / 1e3 : 0, mean / 1e3, nsamples, cpu, tcpu, scpu, other, wall,
           pub_responses_total, pub_bad_total, first_bad, errors, frames_n, pings, reads, waits, codes[1], codes[4],
           codes[0] + codes[2] + codes[3] + codes[5] + codes[6] + codes[7], timed_out ? "true" : "false", phase);
    printf("\"server_cpu_each_s\":[");
    for (int k = 0; k < npids; k++) printf("%s%.3f", k ? "," : "", each1[k] - each0[k]);
    printf("],\"deliveries_by_port\":[");
    for (int q = 0; q < o.nports; q++) {
        long d = 0;
        for (int k = 0; k < nwk; k++) d += atomic_load(&wks[k].port_deliveries[q]);
        printf("%s%ld", q ? "," : "", d);
    }
    printf("]}\n");
    if (first_error[0]) fprintf(stderr, "loadgen: first error: %s\n", first_error);
    if (first_bad[0]) fprintf(stderr, "loadgen: first rejected publish: %s\n", first_bad);
    fflush(stdout);
    /* close with RST: no TIME_WAIT left to the next scenario */
    struct linger lg = {1, 0};
    for (int i = 0; i < o.subs; i++)
        if (subs[i].state != S_CLOSED) {
            setsockopt(subs[i].fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            close(subs[i].fd);
        }
    return ok ? 0 : 1;
}
