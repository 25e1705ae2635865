/* The benchmarks' load generator and server: one static binary (musl-gcc -static), copied into
 * the containers, so that the same client measures the tunnelled path and its baseline and is
 * not the bottleneck. Every client mode prints one JSON object on stdout; times are its own.
 *
 *   loadgen serve                                  sink :5001, source :5002, echo :5003
 *   loadgen upload   HOST PORT STREAMS SECONDS     bulk send to the sink; bytes as it counted
 *   loadgen download HOST PORT STREAMS SECONDS     bulk receive from the source
 *   loadgen latency  HOST PORT COUNT WARMUP SIZE   connect + SIZE-byte request/response
 *   loadgen hold     HOST PORT CONNS SECONDS SIZE  CONNS open at once, echo traffic on all
 *   loadgen dns      SERVER NAME CONCURRENCY SECONDS   A queries; %d in NAME makes each unique
 *   loadgen dnsrate  SERVER RATE SECONDS NAME...   RATE queries/s, not waiting for answers, the
 *                                                  NAMEs in turn; answers counted by RCODE
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define BULK (256 * 1024)
#define STACK (128 * 1024)
#define IO_TIMEOUT_S 30
#define DNS_TIMEOUT_S 2.0

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void spawn(void *(*body)(void *), void *arg) {
    pthread_attr_t attr;
    pthread_t thread;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, STACK);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&thread, &attr, body, arg) != 0) die("pthread_create");
    pthread_attr_destroy(&attr);
}

static void set_timeouts(int fd) {
    struct timeval tv = {.tv_sec = IO_TIMEOUT_S};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static void no_delay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static struct sockaddr_in address(const char *host, const char *port) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(port))};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "not an IPv4 address: %s\n", host);
        exit(2);
    }
    return sa;
}

/* A connected TCP socket, or -1. */
static int dial(const struct sockaddr_in *sa) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    set_timeouts(fd);
    if (connect(fd, (const struct sockaddr *)sa, sizeof *sa) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int send_all(int fd, const char *data, size_t size) {
    while (size) {
        ssize_t n = send(fd, data, size, MSG_NOSIGNAL);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) continue;
            return -1;
        }
        data += n;
        size -= (size_t)n;
    }
    return 0;
}

static int recv_all(int fd, char *data, size_t size) {
    while (size) {
        ssize_t n = recv(fd, data, size, 0);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) continue;
            return -1;
        }
        data += n;
        size -= (size_t)n;
    }
    return 0;
}

/* ---- server --------------------------------------------------------------------------- */

enum mode { SINK, SOURCE, ECHO };

struct listener {
    int port;
    enum mode mode;
};

static void *serve_sink(void *arg) {
    int fd = (int)(intptr_t)arg;
    char *buffer = malloc(BULK);
    uint64_t total = 0;
    ssize_t n;
    while ((n = recv(fd, buffer, BULK, 0)) > 0 || (n < 0 && errno == EINTR))
        if (n > 0) total += (uint64_t)n;
    if (n == 0) {
        unsigned char count[8];
        for (int i = 0; i < 8; i++) count[i] = (unsigned char)(total >> (56 - 8 * i));
        send_all(fd, (const char *)count, sizeof count);
    }
    free(buffer);
    close(fd);
    return NULL;
}

static void *serve_source(void *arg) {
    int fd = (int)(intptr_t)arg;
    char *buffer = malloc(BULK);
    memset(buffer, 'x', BULK);
    while (send_all(fd, buffer, BULK) == 0) {
    }
    free(buffer);
    close(fd);
    return NULL;
}

static void *serve_echo(void *arg) {
    int fd = (int)(intptr_t)arg;
    char buffer[16384];
    ssize_t n;
    no_delay(fd);
    while ((n = recv(fd, buffer, sizeof buffer, 0)) > 0 || (n < 0 && errno == EINTR))
        if (n > 0 && send_all(fd, buffer, (size_t)n) != 0) break;
    close(fd);
    return NULL;
}

static void *accept_loop(void *arg) {
    struct listener *l = arg;
    int server = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (server < 0) die("socket");
    setsockopt(server, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)l->port)};
    if (bind(server, (struct sockaddr *)&sa, sizeof sa) != 0) die("bind");
    if (listen(server, 4096) != 0) die("listen");
    void *(*body)(void *) = l->mode == SINK ? serve_sink : l->mode == SOURCE ? serve_source
                                                                             : serve_echo;
    for (;;) {
        int fd = accept(server, NULL, NULL);
        if (fd < 0) continue;
        set_timeouts(fd);
        spawn(body, (void *)(intptr_t)fd);
    }
    return NULL;
}

static int serve(void) {
    static struct listener listeners[] = {{5001, SINK}, {5002, SOURCE}, {5003, ECHO}};
    for (int i = 0; i < 3; i++) spawn(accept_loop, &listeners[i]);
    for (;;) pause();
    return 0;
}

/* ---- bulk ----------------------------------------------------------------------------- */

struct bulk {
    struct sockaddr_in sa;
    double seconds, started, finished;
    uint64_t bytes;
    int error;
    pthread_t thread;
};

static void *upload_one(void *arg) {
    struct bulk *b = arg;
    char *buffer = malloc(BULK);
    memset(buffer, 'u', BULK);
    b->started = now();
    int fd = dial(&b->sa);
    if (fd < 0) {
        b->error = 1;
        b->finished = now();
        free(buffer);
        return NULL;
    }
    double deadline = b->started + b->seconds;
    while (now() < deadline)
        if (send_all(fd, buffer, BULK) != 0) {
            b->error = 1;
            break;
        }
    unsigned char count[8];
    if (!b->error && shutdown(fd, SHUT_WR) == 0 && recv_all(fd, (char *)count, 8) == 0) {
        for (int i = 0; i < 8; i++) b->bytes = (b->bytes << 8) | count[i];
    } else {
        b->error = 1;
    }
    b->finished = now();
    close(fd);
    free(buffer);
    return NULL;
}

static void *download_one(void *arg) {
    struct bulk *b = arg;
    char *buffer = malloc(BULK);
    b->started = now();
    int fd = dial(&b->sa);
    if (fd < 0) {
        b->error = 1;
        b->finished = now();
        free(buffer);
        return NULL;
    }
    double deadline = b->started + b->seconds;
    while (now() < deadline) {
        ssize_t n = recv(fd, buffer, BULK, 0);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) continue;
            b->error = 1;
            break;
        }
        b->bytes += (uint64_t)n;
    }
    b->finished = now();
    close(fd);
    free(buffer);
    return NULL;
}

static int bulk(int argc, char **argv, void *(*body)(void *)) {
    if (argc != 6) return 2;
    int streams = atoi(argv[4]);
    struct bulk *all = calloc((size_t)streams, sizeof *all);
    for (int i = 0; i < streams; i++) {
        all[i].sa = address(argv[2], argv[3]);
        all[i].seconds = atof(argv[5]);
        if (pthread_create(&all[i].thread, NULL, body, &all[i]) != 0) die("pthread_create");
    }
    uint64_t bytes = 0;
    int errors = 0;
    double first = 0, last = 0;
    for (int i = 0; i < streams; i++) {
        pthread_join(all[i].thread, NULL);
        bytes += all[i].bytes;
        errors += all[i].error;
        if (i == 0 || all[i].started < first) first = all[i].started;
        if (all[i].finished > last) last = all[i].finished;
    }
    printf("{\"streams\": %d, \"bytes\": %llu, \"seconds\": %.6f, \"errors\": %d}\n", streams,
           (unsigned long long)bytes, last - first, errors);
    return 0;
}

/* ---- latency -------------------------------------------------------------------------- */

static int compare(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Sorted samples (seconds) as JSON fields in microseconds. */
static void print_percentiles(double *samples, long count) {
    qsort(samples, (size_t)count, sizeof *samples, compare);
    double sum = 0;
    for (long i = 0; i < count; i++) sum += samples[i];
    const double q[] = {0.50, 0.90, 0.99};
    const char *names[] = {"p50_us", "p90_us", "p99_us"};
    for (int k = 0; k < 3; k++) {
        double v = 0;
        if (count) {
            /* Linear interpolation between closest ranks, as Python's statistics does. */
            double rank = q[k] * (double)(count - 1);
            long lo = (long)rank;
            long hi = lo + 1 < count ? lo + 1 : lo;
            v = samples[lo] + (samples[hi] - samples[lo]) * (rank - (double)lo);
        }
        printf("\"%s\": %.3f, ", names[k], v * 1e6);
    }
    printf("\"mean_us\": %.3f, \"min_us\": %.3f, \"max_us\": %.3f", count ? sum / count * 1e6 : 0,
           count ? samples[0] * 1e6 : 0, count ? samples[count - 1] * 1e6 : 0);
}

static int latency(int argc, char **argv) {
    if (argc != 7) return 2;
    struct sockaddr_in sa = address(argv[2], argv[3]);
    long count = atol(argv[4]), warmup = atol(argv[5]);
    size_t size = (size_t)atol(argv[6]);
    char *request = malloc(size), *response = malloc(size);
    memset(request, 'q', size);
    double *samples = calloc((size_t)count, sizeof *samples);
    long done = 0, errors = 0;
    for (long i = 0; i < warmup + count; i++) {
        double start = now();
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        int ok = fd >= 0;
        if (ok) {
            set_timeouts(fd);
            no_delay(fd);
            ok = connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0 &&
                 send_all(fd, request, size) == 0 && recv_all(fd, response, size) == 0;
        }
        double elapsed = now() - start;
        if (fd >= 0) close(fd);
        if (i < warmup) continue;
        if (ok)
            samples[done++] = elapsed;
        else
            errors++;
    }
    /* The samples themselves, so that rounds run apart can be pooled before taking quantiles. */
    printf("{\"count\": %ld, \"errors\": %ld, \"samples_us\": [", done, errors);
    for (long i = 0; i < done; i++) printf(i ? ", %.1f" : "%.1f", samples[i] * 1e6);
    printf("]}\n");
    return 0;
}

/* ---- hold: many connections at once -------------------------------------------------- */

struct hold {
    struct sockaddr_in sa;
    double seconds;
    size_t size;
    pthread_barrier_t *connected, *finished, *released;
    uint64_t rounds;
    int connect_error, io_error;
    pthread_t thread;
};

static void *hold_one(void *arg) {
    struct hold *h = arg;
    char request[65536], response[65536];
    memset(request, 'h', h->size);
    int fd = dial(&h->sa);
    if (fd < 0) h->connect_error = 1;
    else no_delay(fd);
    pthread_barrier_wait(h->connected);
    if (fd >= 0) {
        double deadline = now() + h->seconds;
        while (now() < deadline) {
            if (send_all(fd, request, h->size) != 0 || recv_all(fd, response, h->size) != 0) {
                h->io_error = 1;
                break;
            }
            h->rounds++;
        }
    }
    /* Every connection stays open until all are done, and a moment longer (memory is sampled). */
    pthread_barrier_wait(h->finished);
    pthread_barrier_wait(h->released);
    if (fd >= 0) close(fd);
    return NULL;
}

static int hold(int argc, char **argv) {
    if (argc != 7) return 2;
    int conns = atoi(argv[4]);
    double seconds = atof(argv[5]);
    size_t size = (size_t)atol(argv[6]);
    if (size == 0 || size > 65536) return 2;
    pthread_barrier_t connected, finished, released;
    pthread_barrier_init(&connected, NULL, (unsigned)conns + 1);
    pthread_barrier_init(&finished, NULL, (unsigned)conns + 1);
    pthread_barrier_init(&released, NULL, (unsigned)conns + 1);
    struct hold *all = calloc((size_t)conns, sizeof *all);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, STACK + 2 * 65536);
    double start = now();
    for (int i = 0; i < conns; i++) {
        all[i] = (struct hold){.sa = address(argv[2], argv[3]), .seconds = seconds, .size = size,
                               .connected = &connected, .finished = &finished,
                               .released = &released};
        if (pthread_create(&all[i].thread, &attr, hold_one, &all[i]) != 0)
            die("pthread_create");
    }
    pthread_barrier_wait(&connected);
    double opened = now();
    fprintf(stderr, "all %d connections attempted in %.3f s\n", conns, opened - start);
    pthread_barrier_wait(&finished);
    double traffic = now() - opened;
    sleep(1);
    pthread_barrier_wait(&released);
    uint64_t rounds = 0;
    int connect_errors = 0, io_errors = 0;
    for (int i = 0; i < conns; i++) {
        pthread_join(all[i].thread, NULL);
        rounds += all[i].rounds;
        connect_errors += all[i].connect_error;
        io_errors += all[i].io_error;
    }
    printf("{\"connections\": %d, \"connect_errors\": %d, \"io_errors\": %d, "
           "\"connect_seconds\": %.6f, \"rounds\": %llu, \"bytes\": %llu, \"seconds\": %.6f}\n",
           conns, connect_errors, io_errors, opened - start, (unsigned long long)rounds,
           (unsigned long long)(rounds * size), traffic);
    return 0;
}

/* ---- dns ------------------------------------------------------------------------------ */

static size_t dns_query(unsigned char *out, uint16_t id, const char *name) {
    unsigned char *p = out;
    *p++ = (unsigned char)(id >> 8);
    *p++ = (unsigned char)id;
    *p++ = 0x01; /* RD */
    *p++ = 0x00;
    *p++ = 0, *p++ = 1; /* QDCOUNT */
    memset(p, 0, 6), p += 6;
    const char *label = name;
    while (*label) {
        const char *dot = strchr(label, '.');
        size_t len = dot ? (size_t)(dot - label) : strlen(label);
        if (len == 0 || len > 63) break;
        *p++ = (unsigned char)len;
        memcpy(p, label, len), p += len;
        label += len + (dot ? 1 : 0);
    }
    *p++ = 0;
    *p++ = 0, *p++ = 1; /* A */
    *p++ = 0, *p++ = 1; /* IN */
    return (size_t)(p - out);
}

struct slot {
    int fd;
    uint16_t id;
    double sent;
    int busy;
};

static int dns(int argc, char **argv) {
    if (argc != 6) return 2;
    struct sockaddr_in sa = address(argv[2], "53");
    const char *pattern = argv[3];
    int concurrency = atoi(argv[4]);
    double seconds = atof(argv[5]);
    int unique = strstr(pattern, "%d") != NULL;
    struct slot *slots = calloc((size_t)concurrency, sizeof *slots);
    struct pollfd *fds = calloc((size_t)concurrency, sizeof *fds);
    long capacity = 1 << 16, answered = 0, timeouts = 0, failures = 0, sent = 0, counter = 0;
    double *samples = malloc((size_t)capacity * sizeof *samples);
    unsigned char packet[512], reply[4096];
    char name[256];
    srand((unsigned)getpid() ^ (unsigned)(now() * 1e6));
    for (int i = 0; i < concurrency; i++) {
        slots[i].fd = socket(AF_INET, SOCK_DGRAM, 0);
        if (slots[i].fd < 0 || connect(slots[i].fd, (struct sockaddr *)&sa, sizeof sa) != 0)
            die("dns socket");
        fds[i] = (struct pollfd){.fd = slots[i].fd, .events = POLLIN};
    }
    double start = now(), end = start + seconds;
#define SEND(s)                                                                                \
    do {                                                                                       \
        if (unique)                                                                            \
            snprintf(name, sizeof name, pattern, (int)counter++);                              \
        else                                                                                   \
            snprintf(name, sizeof name, "%s", pattern);                                        \
        (s)->id = (uint16_t)rand();                                                            \
        size_t len = dns_query(packet, (s)->id, name);                                         \
        (s)->sent = now();                                                                     \
        (s)->busy = send((s)->fd, packet, len, 0) == (ssize_t)len;                             \
        if (!(s)->busy) failures++;                                                            \
        else sent++;                                                                           \
    } while (0)
    for (int i = 0; i < concurrency; i++) SEND(&slots[i]);
    for (;;) {
        double t = now();
        int busy = 0;
        for (int i = 0; i < concurrency; i++) {
            struct slot *s = &slots[i];
            if (s->busy && t - s->sent > DNS_TIMEOUT_S) {
                timeouts++;
                s->busy = 0;
            }
            if (!s->busy && t < end) SEND(s);
            busy += s->busy;
        }
        if (!busy && now() >= end) break;
        if (poll(fds, (nfds_t)concurrency, 100) < 0 && errno != EINTR) die("poll");
        for (int i = 0; i < concurrency; i++) {
            if (!(fds[i].revents & POLLIN)) continue;
            struct slot *s = &slots[i];
            ssize_t n = recv(s->fd, reply, sizeof reply, 0);
            double got = now();
            if (n < 12 || !s->busy) continue;
            uint16_t id = (uint16_t)(reply[0] << 8 | reply[1]);
            if (id != s->id || !(reply[2] & 0x80)) continue; /* a late answer: not ours */
            int rcode = reply[3] & 0x0f;
            s->busy = 0;
            if (rcode != 0 && rcode != 3) { /* NOERROR and NXDOMAIN are answers */
                failures++;
            } else {
                if (answered == capacity) {
                    capacity *= 2;
                    samples = realloc(samples, (size_t)capacity * sizeof *samples);
                }
                samples[answered++] = got - s->sent;
            }
            if (got < end) SEND(s);
        }
    }
    double elapsed = now() - start;
    printf("{\"sent\": %ld, \"answered\": %ld, \"timeouts\": %ld, \"failures\": %ld, "
           "\"seconds\": %.6f, ",
           sent, answered, timeouts, failures, elapsed);
    print_percentiles(samples, answered);
    printf("}\n");
    return 0;
}

/* Open loop: queries leave at the rate whatever the answers do, as from many clients. */
static int dnsrate(int argc, char **argv) {
    if (argc < 6) return 2;
    enum { SOCKETS = 64 };
    struct sockaddr_in sa = address(argv[2], "53");
    double rate = atof(argv[3]), seconds = atof(argv[4]);
    int nnames = argc - 5;
    char **names = argv + 5;
    if (rate <= 0 || seconds <= 0) return 2;
    struct pollfd fds[SOCKETS];
    for (int i = 0; i < SOCKETS; i++) {
        int fd = socket(AF_INET, SOCK_DGRAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) die("dnsrate socket");
        fcntl(fd, F_SETFL, O_NONBLOCK);
        fds[i] = (struct pollfd){.fd = fd, .events = POLLIN};
    }
    long sent = 0, send_errors = 0, counter = 0, rcodes[16] = {0};
    unsigned char packet[512], reply[4096];
    char name[256];
    double start = now(), end = start + seconds, drain = end + 2 * DNS_TIMEOUT_S;
    for (;;) {
        double t = now();
        if (t < end) {
            long due = (long)((t - start) * rate);
            while (sent < due) {
                const char *pattern = names[sent % nnames];
                if (strstr(pattern, "%d"))
                    snprintf(name, sizeof name, pattern, (int)counter++);
                else
                    snprintf(name, sizeof name, "%s", pattern);
                size_t len = dns_query(packet, (uint16_t)sent, name);
                if (send(fds[sent % SOCKETS].fd, packet, len, 0) != (ssize_t)len) send_errors++;
                sent++;
            }
        } else if (t > drain) {
            break;
        }
        if (poll(fds, SOCKETS, 1) < 0 && errno != EINTR) die("poll");
        for (int i = 0; i < SOCKETS; i++) {
            if (!(fds[i].revents & POLLIN)) continue;
            ssize_t n;
            while ((n = recv(fds[i].fd, reply, sizeof reply, 0)) >= 12) rcodes[reply[3] & 0x0f]++;
        }
    }
    long answered = 0;
    for (int i = 0; i < 16; i++) answered += rcodes[i];
    printf("{\"sent\": %ld, \"send_errors\": %ld, \"seconds\": %.6f, \"answered\": %ld, "
           "\"noerror\": %ld, \"servfail\": %ld, \"nxdomain\": %ld, \"refused\": %ld}\n",
           sent, send_errors, end - start, answered, rcodes[0], rcodes[2], rcodes[3], rcodes[5]);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    int rc = 2;
    if (argc >= 2) {
        if (!strcmp(argv[1], "serve")) rc = serve();
        else if (!strcmp(argv[1], "upload")) rc = bulk(argc, argv, upload_one);
        else if (!strcmp(argv[1], "download")) rc = bulk(argc, argv, download_one);
        else if (!strcmp(argv[1], "latency")) rc = latency(argc, argv);
        else if (!strcmp(argv[1], "hold")) rc = hold(argc, argv);
        else if (!strcmp(argv[1], "dns")) rc = dns(argc, argv);
        else if (!strcmp(argv[1], "dnsrate")) rc = dnsrate(argc, argv);
    }
    if (rc == 2) fprintf(stderr, "usage: see the comment at the top of loadgen.c\n");
    return rc;
}
