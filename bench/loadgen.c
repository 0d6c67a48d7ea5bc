/* The one-thread C load generator behind `pimcore bench` (pimcore/loadgen.py).
 *
 * Why C: a Python generator spends more CPU per message than the peers it is
 * compared with (Redis XADD costs ~3 us of server CPU), so it would measure
 * itself.  One thread, epoll, nonblocking sockets, no allocation per message.
 *
 *   loadgen PROTO HOST PORT PLAN WINDOW SIZE WARMUP_S DURATION_S DRAIN_S DEL_PER_ACK ACK_OUT DEL_OUT
 *
 * PROTO  "pim" (docs/PROTOCOL.md, version 4, no compression), "resp"
 *        (Redis: XADD KEY MAXLEN ~ 100000 * d PAYLOAD, one reply per command)
 *        or "mqtt" (MQTT 3.1.1, e.g. Mosquitto: see "MQTT" below).
 * PLAN   one connection per line: "SENDS RECEIVES QUOTA TARGET TOKEN"
 *        SENDS/RECEIVES 0|1; QUOTA messages to send (0: until the clock
 *        stops); TARGET the conversation (pim), stream key (resp) or topic
 *        (mqtt: senders publish to it, receivers subscribe to it), "-" for
 *        none; TOKEN the Login token (pim) or "-".
 * DURATION_S 0 = count mode (every connection sends its QUOTA; everything is
 *        measured).  DEL_PER_ACK: deliveries each measured ack should produce
 *        at this process's receivers (0 = do not wait for deliveries).
 * ACK_OUT / DEL_OUT: files that receive the send->ack and send->delivery
 *        latency samples (native int64 ns).
 *
 * Stdout, one line each: "ready" once every connection is logged in (the
 * clock starts), "done" when every send is answered and the deliveries are in
 * (connections still open, so the caller can sample the server), then one
 * JSON object with the counts.  Exit 2 with a message on stderr when it
 * cannot run (connect refused, login refused, a malformed frame).
 *
 * Each connection keeps WINDOW requests in flight and answers each read with
 * one write (new requests plus one cumulative PushAck).  The first 8 bytes of
 * every payload are the send time (CLOCK_MONOTONIC ns, big-endian), so a
 * receiver measures send->delivery.
 *
 * MQTT: every connection sends CONNECT (3.1.1, clean session, keep-alive 0,
 * client id "pimbench-PID-N") and waits for CONNACK; a receiver then
 * SUBSCRIBEs to its topic at QoS 1 and counts as logged in at its SUBACK, so
 * "ready" means every subscription is in place.  A sender PUBLISHes at QoS 1
 * with a packet id (WINDOW in flight); the PUBACK is its ack.  A receiver
 * answers every QoS 1 PUBLISH with a PUBACK (in the same write as the rest of
 * the read's answers).  A refused CONNECT or SUBSCRIBE, a malformed packet or a
 * PUBACK for a packet id not in flight exits 2.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXCODE 64

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *fmt, const char *what) {
    fprintf(stderr, "loadgen: ");
    fprintf(stderr, fmt, what);
    fprintf(stderr, "\n");
    exit(2);
}

/* ------------------------------------------------------------ buffers */

typedef struct {
    unsigned char *p;
    size_t len, off, cap;
} buf_t;

static void buf_reserve(buf_t *b, size_t more) {
    if (b->off && b->off == b->len) b->off = b->len = 0;
    if (b->len + more <= b->cap) return;
    if (b->off) { /* compact first */
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->len + more <= b->cap) return;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more) cap *= 2;
    b->p = realloc(b->p, cap);
    if (!b->p) die("%s", "out of memory");
    b->cap = cap;
}

static void put_u(buf_t *b, uint64_t v) {
    buf_reserve(b, 10);
    do {
        unsigned char c = v & 0x7f;
        v >>= 7;
        b->p[b->len++] = c | (v ? 0x80 : 0);
    } while (v);
}

static void put_raw(buf_t *b, const void *p, size_t n) {
    buf_reserve(b, n);
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

static void put_bytes(buf_t *b, const void *p, size_t n) {
    put_u(b, n);
    put_raw(b, p, n);
}

static int varint_len(uint64_t v) {
    int n = 1;
    while (v >>= 7) n++;
    return n;
}

/* A frame: length, head (version 4, no flags), type, then the body that
 * fill() appends; the length is patched in afterwards (5-byte slot would not
 * be minimal, so the body is built first in a scratch buffer). */
static buf_t scratch;

static void frame_begin(void) { scratch.len = scratch.off = 0; }

static void frame_end(buf_t *out, unsigned type) {
    uint64_t n = scratch.len + 2;
    buf_reserve(out, varint_len(n) + n);
    put_u(out, n);
    out->p[out->len++] = 0x40;
    out->p[out->len++] = (unsigned char)type;
    put_raw(out, scratch.p, scratch.len);
}

/* Bounds-checked readers: 0 on malformed input. */
static int get_u(const unsigned char **p, const unsigned char *end, uint64_t *v) {
    uint64_t r = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (*p >= end) return 0;
        unsigned char c = *(*p)++;
        r |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80)) {
            *v = r;
            return 1;
        }
    }
    return 0;
}

static int get_b(const unsigned char **p, const unsigned char *end, const unsigned char **s, uint64_t *n) {
    if (!get_u(p, end, n) || *n > (uint64_t)(end - *p)) return 0;
    *s = *p;
    *p += *n;
    return 1;
}

/* ------------------------------------------------------------ samples */

typedef struct {
    int64_t *v;
    size_t n, cap;
} samples_t;

static void sample(samples_t *s, int64_t x) {
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 1 << 16;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        if (!s->v) die("%s", "out of memory");
    }
    s->v[s->n++] = x;
}

static void write_samples(const char *path, samples_t *s) {
    FILE *f = fopen(path, "wb");
    if (!f) die("cannot write %s", path);
    if (s->n && fwrite(s->v, sizeof *s->v, s->n, f) != s->n) die("cannot write %s", path);
    fclose(f);
}

/* ------------------------------------------------------------ connections */

enum { ST_LOGIN, ST_OPEN, ST_CLOSED };

typedef struct {
    int fd, state, sends, receives;
    long quota, sent_here;
    char *target, *token;
    size_t target_len;
    buf_t in, out;
    uint64_t next_lid;
    /* In flight: pim acks carry the local id (slot = lid & mask, any order);
     * resp replies come in order: fifo_head is the local id of the oldest
     * command in flight, and slot_lid/slot_t hold it like a pim send. */
    uint64_t *slot_lid;
    int64_t *slot_t;
    uint64_t mask, fifo_head;
    int inflight, done_sending, want_out;
    int connected; /* mqtt: CONNACK seen (a receiver then waits for its SUBACK) */
    uint64_t pushed_upto, acked_upto;
} conn_t;

static int resp_mode, mqtt_mode;
static uint64_t lid_base = 1; /* first local id of every connection (set from the time in main) */
static int window, size;
static unsigned char *filler;
static int64_t measure_from, measure_to, stop_sending;
static long acked, sent_total, deliveries, logged_in, senders_left;
static int64_t first_send, last_ack;
static samples_t ack_lat, del_lat;
static long ack_codes[MAXCODE], close_codes[MAXCODE], error_codes[MAXCODE];
static long unexpected_acks, closed_by_peer, conn_errors;
static int ep;

static void count_code(long *arr, uint64_t code) { arr[code < MAXCODE ? code : MAXCODE - 1]++; }

static void finish_sender(conn_t *c) {
    if (c->sends) {
        c->sends = 0;
        senders_left--;
    }
}

static void drop(conn_t *c) {
    if (c->state == ST_CLOSED) return;
    c->state = ST_CLOSED;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    finish_sender(c);
}

static void queue_sends(conn_t *c) {
    if (!c->sends) return;
    while (!c->done_sending && c->inflight < window) {
        int64_t now = now_ns();
        if ((c->quota && c->sent_here >= c->quota) || (!c->quota && stop_sending && now >= stop_sending)) {
            c->done_sending = 1;
            break;
        }
        if (mqtt_mode && (c->next_lid & 0xffff) == 0) c->next_lid++; /* packet id 0 is not allowed */
        uint64_t lid = c->next_lid;
        uint64_t slot = lid & c->mask;
        if (c->slot_lid[slot]) break; /* an old one still out: wait for it */
        c->next_lid++;
        c->slot_lid[slot] = lid;
        c->slot_t[slot] = now;
        c->inflight++;
        c->sent_here++;
        sent_total++;
        if (!first_send) first_send = now;
        unsigned char ts[8];
        for (int i = 0; i < 8; i++) ts[i] = (unsigned char)((uint64_t)now >> (56 - 8 * i));
        if (mqtt_mode) {
            /* PUBLISH, QoS 1: topic, packet id (lid's low 16 bits: slots
             * divide 65536, so the id finds its slot), payload. */
            unsigned char h[4];
            buf_reserve(&c->out, 1);
            c->out.p[c->out.len++] = 0x32;
            put_u(&c->out, 2 + c->target_len + 2 + size); /* MQTT's remaining length is this varint */
            h[0] = (unsigned char)(c->target_len >> 8);
            h[1] = (unsigned char)c->target_len;
            put_raw(&c->out, h, 2);
            put_raw(&c->out, c->target, c->target_len);
            h[0] = (unsigned char)(lid >> 8);
            h[1] = (unsigned char)lid;
            put_raw(&c->out, h, 2);
            put_raw(&c->out, ts, 8);
            put_raw(&c->out, filler, size - 8);
        } else if (resp_mode) {
            char head[128];
            int n = snprintf(head, sizeof head, "*8\r\n$4\r\nXADD\r\n$%zu\r\n", c->target_len);
            put_raw(&c->out, head, n);
            put_raw(&c->out, c->target, c->target_len);
            n = snprintf(head, sizeof head, "\r\n$6\r\nMAXLEN\r\n$1\r\n~\r\n$6\r\n100000\r\n$1\r\n*\r\n$1\r\nd\r\n$%d\r\n", size);
            put_raw(&c->out, head, n);
            put_raw(&c->out, ts, 8);
            put_raw(&c->out, filler, size - 8);
            put_raw(&c->out, "\r\n", 2);
        } else {
            /* SendReq: local_id u, conv t, client_time s, payload b, after_seq u,
             * mentions [Mention] (none), mention_all ? (false) */
            frame_begin();
            put_u(&scratch, lid);
            put_bytes(&scratch, c->target, c->target_len);
            int64_t ct = (int64_t)(time(NULL)) * 1000000; /* coarse is fine: opaque to the broker */
            put_u(&scratch, ((uint64_t)ct << 1) ^ (uint64_t)(ct >> 63));
            put_u(&scratch, size);
            put_raw(&scratch, ts, 8);
            put_raw(&scratch, filler, size - 8);
            put_u(&scratch, 0);
            put_u(&scratch, 0);
            put_u(&scratch, 0);
            frame_end(&c->out, 0x05);
        }
    }
    if (c->done_sending && c->inflight == 0) finish_sender(c);
}

static void flush_out(conn_t *c) {
    while (c->out.off < c->out.len) {
        ssize_t n = send(c->fd, c->out.p + c->out.off, c->out.len - c->out.off, MSG_NOSIGNAL);
        if (n > 0) {
            c->out.off += n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n < 0 && errno == EINTR) continue;
        conn_errors++;
        drop(c);
        return;
    }
    if (c->out.off == c->out.len) c->out.off = c->out.len = 0;
    int want = c->out.len > 0;
    if (want != c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = want;
    }
}

static void acked_one(conn_t *c, uint64_t slot, int ok) {
    int64_t sent_at = c->slot_t[slot];
    c->slot_lid[slot] = 0;
    c->inflight--;
    if (!ok) return;
    int64_t now = now_ns();
    last_ack = now;
    if (measure_from <= sent_at && sent_at < measure_to) {
        acked++;
        sample(&ack_lat, now - sent_at);
    }
}

/* pim: one frame body. 0 = malformed. */
static int on_frame(conn_t *c, unsigned type, const unsigned char *p, const unsigned char *end) {
    uint64_t v, code, n;
    const unsigned char *s;
    switch (type) {
    case 0x02: /* LoginAck */
        if (c->state == ST_LOGIN) {
            c->state = ST_OPEN;
            logged_in++;
        }
        return 1;
    case 0x06: { /* SendAck: local_id, code, ... */
        if (!get_u(&p, end, &v) || !get_u(&p, end, &code)) return 0;
        uint64_t slot = v & c->mask;
        if (!v || c->slot_lid[slot] != v) {
            unexpected_acks++;
            return 1;
        }
        if (code) count_code(ack_codes, code);
        acked_one(c, slot, code == 0);
        return 1;
    }
    case 0x07: { /* Push: position, [Message] */
        uint64_t pos, count;
        if (!get_u(&p, end, &pos) || !get_u(&p, end, &count)) return 0;
        if (pos > c->pushed_upto) c->pushed_upto = pos;
        if (!c->receives) return 1;
        int64_t now = now_ns();
        for (uint64_t i = 0; i < count; i++) {
            /* position u, msg_id b, conv t, seq u, sender t, device t,
             * client_time s, server_time u, payload b, kind u, local_id u, after_seq u,
             * target u, edited u, recalled ?, deleted ?, mentions [Mention(user t)], mention_all ? */
            if (!get_u(&p, end, &v) || !get_b(&p, end, &s, &n) || !get_b(&p, end, &s, &n) || !get_u(&p, end, &v) ||
                !get_b(&p, end, &s, &n) || !get_b(&p, end, &s, &n) || !get_u(&p, end, &v) || !get_u(&p, end, &v) ||
                !get_b(&p, end, &s, &n))
                return 0;
            const unsigned char *payload = s;
            uint64_t plen = n;
            if (!get_u(&p, end, &v) || !get_u(&p, end, &v) || !get_u(&p, end, &v)) return 0;
            if (!get_u(&p, end, &v) || !get_u(&p, end, &v) || !get_u(&p, end, &v) || !get_u(&p, end, &v)) return 0;
            uint64_t nmentions;
            if (!get_u(&p, end, &nmentions)) return 0;
            for (uint64_t k = 0; k < nmentions; k++)
                if (!get_b(&p, end, &s, &n)) return 0;
            if (!get_u(&p, end, &v)) return 0;
            if (plen < 8) continue;
            int64_t sent_at = 0;
            for (int k = 0; k < 8; k++) sent_at = (sent_at << 8) | payload[k];
            if (measure_from <= sent_at && sent_at < measure_to) {
                deliveries++;
                sample(&del_lat, now - sent_at);
            }
        }
        return 1;
    }
    case 0x10: /* Error: code, ref, reason */
        if (!get_u(&p, end, &code)) return 0;
        count_code(error_codes, code);
        return 1;
    case 0x11: /* Close: code, reason */
        if (!get_u(&p, end, &code)) return 0;
        count_code(close_codes, code);
        if (c->state == ST_LOGIN) {
            get_b(&p, end, &s, &n);
            fprintf(stderr, "loadgen: login refused (Close %llu: %.*s)\n", (unsigned long long)code, (int)n, s);
            exit(2);
        }
        drop(c);
        return 1;
    default: /* ReadStates, ReadReceipt, Pong...: not needed here */
        return 1;
    }
}

static void parse_pim(conn_t *c) {
    buf_t *b = &c->in;
    while (c->state != ST_CLOSED) {
        const unsigned char *p = b->p + b->off, *end = b->p + b->len;
        uint64_t n;
        const unsigned char *q = p;
        if (!get_u(&q, end, &n)) {
            if (end - p >= 5) die("%s", "malformed length prefix from the broker");
            return;
        }
        if ((uint64_t)(end - q) < n) {
            buf_reserve(b, n - (end - q));
            return;
        }
        if (n < 2 || q[0] != 0x40) die("%s", "unexpected frame head from the broker (compression is not offered)");
        if (!on_frame(c, q[1], q + 2, q + n)) die("%s", "malformed frame from the broker");
        b->off = (q + n) - b->p;
    }
}

static void parse_resp(conn_t *c) {
    buf_t *b = &c->in;
    for (;;) {
        unsigned char *p = b->p + b->off, *end = b->p + b->len;
        unsigned char *nl = memchr(p, '\n', end - p);
        if (!nl) return;
        size_t used = nl + 1 - p;
        int ok = 1;
        if (*p == '$') {
            long len = strtol((char *)p + 1, NULL, 10);
            if (len >= 0) {
                if ((size_t)(end - (nl + 1)) < (size_t)len + 2) {
                    buf_reserve(b, len + 2);
                    return;
                }
                used += len + 2;
            }
        } else if (*p == '-') {
            ok = 0;
            count_code(error_codes, 1);
            if (error_codes[1] == 1) fprintf(stderr, "loadgen: redis error: %.*s\n", (int)(nl - p), p);
        } else if (*p != '+' && *p != ':') {
            die("%s", "unexpected RESP reply (only bulk, simple, integer and error replies are expected)");
        }
        b->off += used;
        /* Replies come in command order: this one answers the oldest
         * command in flight, filed under its local id like every send. */
        uint64_t lid = c->fifo_head, slot = lid & c->mask;
        if (c->inflight == 0 || c->slot_lid[slot] != lid) {
            unexpected_acks++;
            continue;
        }
        c->fifo_head++;
        acked_one(c, slot, ok);
    }
}

/* ------------------------------------------------------------ MQTT 3.1.1 */

static void die_u(const char *fmt, unsigned v) {
    fprintf(stderr, "loadgen: ");
    fprintf(stderr, fmt, v);
    fprintf(stderr, "\n");
    exit(2);
}

static void put_u16(buf_t *b, unsigned v) {
    unsigned char h[2] = {(unsigned char)(v >> 8), (unsigned char)v};
    put_raw(b, h, 2);
}

static void mqtt_connect(conn_t *c, size_t index) {
    char id[64];
    int n = snprintf(id, sizeof id, "pimbench-%d-%zu", (int)getpid(), index);
    /* CONNECT: protocol name "MQTT", level 4, flags: clean session,
     * keep-alive 0 (off: the run holds the connection busy), client id. */
    static const unsigned char vh[10] = {0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 0};
    buf_reserve(&c->out, 1);
    c->out.p[c->out.len++] = 0x10;
    put_u(&c->out, sizeof vh + 2 + n);
    put_raw(&c->out, vh, sizeof vh);
    put_u16(&c->out, n);
    put_raw(&c->out, id, n);
}

static void mqtt_open(conn_t *c) {
    c->state = ST_OPEN;
    logged_in++;
}

/* One control packet: HEAD is its first byte (type << 4 | flags), [p, end)
 * the rest after the remaining length.  Anything not in the conversation
 * this generator holds exits 2: a benchmark must not count on a confused
 * broker. */
static void on_mqtt_packet(conn_t *c, unsigned head, const unsigned char *p, const unsigned char *end) {
    size_t n = end - p;
    unsigned type = head >> 4;
    if (type != 3 && (head & 0x0f)) die_u("malformed MQTT packet (type %u with flags set) from the broker", type);
    switch (type) {
    case 2: /* CONNACK: session present, return code */
        if (n != 2) die("%s", "malformed CONNACK from the MQTT broker");
        if (c->state != ST_LOGIN || c->connected) die("%s", "unexpected CONNACK from the MQTT broker");
        if (p[1]) die_u("connect refused (CONNACK return code %u)", p[1]);
        c->connected = 1;
        if (c->receives) {
            /* SUBSCRIBE (flags 0010): packet id 1, the topic, QoS 1 */
            buf_reserve(&c->out, 1);
            c->out.p[c->out.len++] = 0x82;
            put_u(&c->out, 2 + 2 + c->target_len + 1);
            put_u16(&c->out, 1);
            put_u16(&c->out, c->target_len);
            put_raw(&c->out, c->target, c->target_len);
            put_raw(&c->out, "\x01", 1);
            flush_out(c);
        } else {
            mqtt_open(c);
        }
        return;
    case 9: /* SUBACK: packet id, one return code (the granted QoS or 0x80) */
        if (n != 3) die("%s", "malformed SUBACK from the MQTT broker");
        if (c->state != ST_LOGIN || !c->connected || !c->receives || p[0] || p[1] != 1)
            die("%s", "unexpected SUBACK from the MQTT broker");
        if (p[2] != 1) die_u("subscription refused or not at QoS 1 (SUBACK return code 0x%02x)", p[2]);
        mqtt_open(c);
        return;
    case 4: { /* PUBACK: packet id */
        if (n != 2) die("%s", "malformed PUBACK from the MQTT broker");
        unsigned pid = (unsigned)p[0] << 8 | p[1];
        uint64_t slot = pid & c->mask;
        if (c->state != ST_OPEN || !pid || !c->slot_lid[slot] || (c->slot_lid[slot] & 0xffff) != pid)
            die_u("PUBACK for packet id %u, which is not in flight", pid);
        acked_one(c, slot, 1);
        return;
    }
    case 3: { /* PUBLISH: topic, packet id when QoS > 0, payload */
        unsigned qos = (head >> 1) & 3;
        if (qos > 1) die_u("PUBLISH at QoS %u from the MQTT broker (subscribed at QoS 1)", qos);
        if (n < 2) die("%s", "malformed PUBLISH from the MQTT broker");
        size_t tl = (size_t)p[0] << 8 | p[1];
        if (2 + tl + (qos ? 2 : 0) > n) die("%s", "malformed PUBLISH from the MQTT broker");
        const unsigned char *payload = p + 2 + tl;
        if (qos) {
            buf_reserve(&c->out, 4); /* PUBACK with the same packet id: the recipient's ack */
            c->out.p[c->out.len++] = 0x40;
            c->out.p[c->out.len++] = 2;
            c->out.p[c->out.len++] = payload[0];
            c->out.p[c->out.len++] = payload[1];
            payload += 2;
        }
        if (!c->receives || c->state != ST_OPEN || end - payload < 8) return;
        int64_t sent_at = 0;
        for (int k = 0; k < 8; k++) sent_at = (sent_at << 8) | payload[k];
        if (measure_from <= sent_at && sent_at < measure_to) {
            deliveries++;
            sample(&del_lat, now_ns() - sent_at);
        }
        return;
    }
    case 13: /* PINGRESP */
        return;
    default:
        die_u("unexpected MQTT packet type %u from the broker", type);
    }
}

static void parse_mqtt(conn_t *c) {
    buf_t *b = &c->in;
    while (c->state != ST_CLOSED) {
        const unsigned char *p = b->p + b->off, *end = b->p + b->len;
        /* Fixed header: the first byte, then the remaining length (1-4
         * bytes of 7 bits, least significant first; 0x80 = more). */
        if (end - p < 2) return;
        const unsigned char *q = p + 1;
        uint64_t n = 0;
        int i;
        for (i = 0; i < 4; i++) {
            if (q >= end) return; /* the length itself is split across reads */
            unsigned char ch = *q++;
            n |= (uint64_t)(ch & 0x7f) << (7 * i);
            if (!(ch & 0x80)) break;
        }
        if (i == 4) die("%s", "malformed remaining length from the MQTT broker (more than 4 bytes)");
        if ((uint64_t)(end - q) < n) {
            buf_reserve(b, n - (end - q));
            return;
        }
        b->off = (q + n) - b->p;
        on_mqtt_packet(c, p[0], q, q + n);
    }
}

static void on_readable(conn_t *c) {
    for (;;) {
        buf_reserve(&c->in, 65536);
        ssize_t n = recv(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len, 0);
        if (n > 0) {
            c->in.len += n;
            if (mqtt_mode) parse_mqtt(c); else if (resp_mode) parse_resp(c); else parse_pim(c);
            if (c->state == ST_CLOSED) return;
            if ((size_t)n < 65536) break;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n < 0 && errno == EINTR) continue;
        if (c->state == ST_LOGIN) die("%s", "connection closed during login");
        if (n == 0) closed_by_peer++; else conn_errors++;
        drop(c);
        return;
    }
    if (c->state != ST_OPEN) return;
    if (measure_to) queue_sends(c); /* the clock runs */
    if (!resp_mode && !mqtt_mode && c->pushed_upto > c->acked_upto) {
        c->acked_upto = c->pushed_upto;
        frame_begin();
        put_u(&scratch, c->pushed_upto);
        frame_end(&c->out, 0x08);
    }
    flush_out(c);
}

static char *next_field(char **line) {
    char *s = strsep(line, " \t\n");
    while (s && !*s) s = strsep(line, " \t\n");
    if (!s) die("%s", "malformed plan line");
    return s;
}

int main(int argc, char **argv) {
    if (argc != 13) {
        fprintf(stderr, "usage: loadgen pim|resp|mqtt HOST PORT PLAN WINDOW SIZE WARMUP_S DURATION_S DRAIN_S"
                        " DEL_PER_ACK ACK_OUT DEL_OUT\n");
        return 2;
    }
    resp_mode = strcmp(argv[1], "resp") == 0;
    mqtt_mode = strcmp(argv[1], "mqtt") == 0;
    if (!resp_mode && !mqtt_mode && strcmp(argv[1], "pim") != 0) die("unknown protocol %s (pim, resp or mqtt)", argv[1]);
    {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        lid_base = (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
    }
    window = atoi(argv[5]);
    size = atoi(argv[6]);
    double warmup = atof(argv[7]), duration = atof(argv[8]), drain = atof(argv[9]);
    long del_per_ack = atol(argv[10]);
    if (window < 1 || size < 8) die("%s", "window must be >= 1 and size >= 8");
    if (mqtt_mode && window > 16384) die("%s", "mqtt: window must be <= 16384 (16-bit packet ids)");

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    filler = malloc(size);
    srand((unsigned)now_ns());
    for (int i = 0; i < size; i++) filler[i] = (unsigned char)rand();

    /* The plan. */
    FILE *pf = fopen(argv[4], "r");
    if (!pf) die("cannot read the plan %s", argv[4]);
    size_t nconns = 0, capc = 64;
    conn_t *conns = calloc(capc, sizeof *conns);
    char *line = NULL;
    size_t linecap = 0;
    while (getline(&line, &linecap, pf) > 0) {
        if (line[0] == '\n' || line[0] == '#') continue;
        if (nconns == capc) {
            conns = realloc(conns, 2 * capc * sizeof *conns);
            memset(conns + capc, 0, capc * sizeof *conns);
            capc *= 2;
        }
        conn_t *c = &conns[nconns++];
        char *l = line;
        c->sends = atoi(next_field(&l));
        c->receives = atoi(next_field(&l));
        c->quota = atol(next_field(&l));
        c->target = strdup(next_field(&l));
        c->target_len = strlen(c->target);
        c->token = strdup(next_field(&l));
        senders_left += c->sends;
    }
    fclose(pf);
    if (!nconns) die("%s", "the plan has no connections");

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(argv[2], argv[3], &hints, &ai) != 0) die("cannot resolve %s", argv[2]);
    ep = epoll_create1(0);
    uint64_t slots = 1;
    while (slots < (uint64_t)window * 4) slots <<= 1;

    int64_t t_connect = now_ns();
    for (size_t i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        c->fd = socket(ai->ai_family, SOCK_STREAM, 0);
        if (c->fd < 0 || connect(c->fd, ai->ai_addr, ai->ai_addrlen) != 0) {
            fprintf(stderr, "loadgen: cannot connect: %s\n", strerror(errno));
            return 3; /* the caller says "cannot reach ..." */
        }
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
        c->mask = slots - 1;
        c->slot_lid = calloc(slots, sizeof *c->slot_lid);
        c->slot_t = calloc(slots, sizeof *c->slot_t);
        c->next_lid = mqtt_mode ? 1 : lid_base; /* from the time (µs), as the SDK: a second run is no retry of the first */
        c->fifo_head = c->next_lid; /* resp: the local id of the oldest command in flight */
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
        if (resp_mode) {
            c->state = ST_OPEN;
            logged_in++;
        } else if (mqtt_mode) {
            mqtt_connect(c, i);
            flush_out(c);
        } else {
            /* Login: token b, device t, client_time s, position u, caps u, epoch b, sent u */
            frame_begin();
            put_bytes(&scratch, c->token, strlen(c->token));
            put_bytes(&scratch, "bench", 5);
            put_u(&scratch, 0);
            put_u(&scratch, 0);
            put_u(&scratch, 0);
            put_u(&scratch, 0);
            put_u(&scratch, 0);
            frame_end(&c->out, 0x01);
            flush_out(c);
        }
    }
    freeaddrinfo(ai);

    struct epoll_event evs[256];
    int64_t login_deadline = now_ns() + 60LL * 1000000000;
    while (logged_in < (long)nconns) {
        int n = epoll_wait(ep, evs, 256, 100);
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c);
            if (c->state != ST_CLOSED && (evs[i].events & EPOLLOUT)) flush_out(c);
        }
        if (now_ns() > login_deadline) die("%s", "logins did not complete within 60 s");
    }
    double connect_seconds = (now_ns() - t_connect) / 1e9;

    /* The clock starts. */
    printf("ready\n");
    fflush(stdout);
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    int64_t go = now_ns();
    if (duration > 0) {
        measure_from = go + (int64_t)(warmup * 1e9);
        measure_to = measure_from + (int64_t)(duration * 1e9);
        stop_sending = measure_to;
    } else {
        measure_from = 0;
        measure_to = INT64_MAX;
    }
    for (size_t i = 0; i < nconns; i++) {
        queue_sends(&conns[i]);
        flush_out(&conns[i]);
    }
    /* Run until every sender is done and answered, then wait for the
     * deliveries (bounded by DRAIN_S after the last send). */
    int64_t drain_until = 0, next_progress = go + 250000000;
    for (;;) {
        int n = epoll_wait(ep, evs, 256, 5);
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c->state == ST_CLOSED) continue;
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c);
            if (c->state != ST_CLOSED && (evs[i].events & EPOLLOUT)) flush_out(c);
        }
        int64_t now = now_ns();
        if (now >= next_progress) { /* for the caller's progress bar */
            printf("p %ld %ld\n", acked, deliveries);
            fflush(stdout);
            next_progress = now + 250000000;
        }
        if (stop_sending && now >= stop_sending) {
            /* A connection whose acks stopped never comes back to queue_sends. */
            for (size_t i = 0; i < nconns; i++) {
                conn_t *c = &conns[i];
                if (c->state == ST_OPEN && c->sends && !c->done_sending) queue_sends(c);
            }
        }
        if (senders_left == 0 || (stop_sending && now >= stop_sending + (int64_t)(drain * 1e9))) {
            if (!drain_until) drain_until = now + (int64_t)(drain * 1e9);
            if (deliveries >= del_per_ack * acked || now >= drain_until) break;
        }
    }
    getrusage(RUSAGE_SELF, &ru1);
    double wall = (now_ns() - go) / 1e9;
    double cpu = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) + (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                 ((ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) + (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec)) / 1e6;
    printf("done\n");
    fflush(stdout);

    write_samples(argv[11], &ack_lat);
    write_samples(argv[12], &del_lat);
    long inflight = 0;
    for (size_t i = 0; i < nconns; i++) inflight += conns[i].state == ST_CLOSED ? 0 : conns[i].inflight;
    printf("{\"acked\": %ld, \"sent\": %ld, \"deliveries\": %ld, \"first_send\": %lld, \"last_ack\": %lld,"
           " \"cpu\": %.6f, \"wall\": %.6f, \"logged_in\": %ld, \"connect_seconds\": %.6f, \"unanswered\": %ld,"
           " \"unexpected_acks\": %ld, \"closed_by_peer\": %ld, \"connection_errors\": %ld",
           acked, sent_total, deliveries, (long long)first_send, (long long)last_ack, cpu, wall, logged_in,
           connect_seconds, inflight, unexpected_acks, closed_by_peer, conn_errors);
    const char *names[] = {"ack_codes", "close_codes", "error_codes"};
    long *arrs[] = {ack_codes, close_codes, error_codes};
    for (int k = 0; k < 3; k++) {
        printf(", \"%s\": {", names[k]);
        int first = 1;
        for (int i = 0; i < MAXCODE; i++)
            if (arrs[k][i]) {
                printf("%s\"%d\": %ld", first ? "" : ", ", i, arrs[k][i]);
                first = 0;
            }
        printf("}");
    }
    printf("}\n");
    fflush(stdout);
    /* A polite Close on pim connections; the kernel closes the rest. */
    for (size_t i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        if (c->state == ST_CLOSED) continue;
        if (mqtt_mode) {
            put_raw(&c->out, "\xe0\x00", 2); /* DISCONNECT */
            flush_out(c);
        } else if (!resp_mode) {
            frame_begin();
            put_u(&scratch, 0);
            put_bytes(&scratch, "bench done", 10);
            frame_end(&c->out, 0x11);
            flush_out(c);
        }
    }
    return 0;
}
