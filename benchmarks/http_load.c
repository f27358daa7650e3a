/* http_load.c - a bounded keep-alive HTTP/1.1 load generator over a Unix
 * stream socket, for the uvicorn rows of the benchmark (benchmarks/run.py
 * compiles it with `cc -O2` into benchmarks/.build/, like echo_epoll.c).
 *
 *   http_load PATH CONNECTIONS DURATION WARMUP SERVER_PID [MAX_REQUESTS]
 *
 * Opens CONNECTIONS connections to PATH (a refused or failed connect is
 * retried for up to 10 s: the server's file may appear just before it
 * listens), then keeps one "GET / HTTP/1.1" request in flight on each: the
 * next request goes out as soon as the previous response is complete.  One
 * thread, level-triggered epoll, no allocation after set-up: the server's
 * CPU per request is what the benchmark ranks, the generator only has to stay
 * out of its way (it reports its own CPU share, and the harness pins it to a
 * CPU other than the server's).
 *
 * Every response is checked: status line "HTTP/1.1 200 ", a Content-Length
 * header, exactly that many body bytes and nothing more (one request is in
 * flight, so any extra byte is an error), and the same total length as the
 * first response (a hello-world answer never changes length: the Date header
 * has a fixed width).
 *
 * WARMUP seconds of load are not measured; then DURATION seconds are (stop
 * earlier after MAX_REQUESTS measured requests, if given).  SERVER_PID > 0:
 * that process's utime+stime (all threads, /proc/PID/stat) over the measured
 * window gives the server CPU per request.  Output: one JSON line with the
 * keys of `unixsrv bench --json` that benchmarks/run.py reads (a request is a
 * "round trip").  Exit status 0, or 1 when an error was counted, 2 when the
 * run could not start.  A run without a completed response for 10 s stops.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define BUF_SIZE 8192
#define MAX_EVENTS 256
#define HIST_US 100000          /* latency histogram: 1 us buckets up to 100 ms, then one overflow bucket */
#define CONNECT_TIMEOUT 10.0
#define STALL_TIMEOUT 10.0

static const char REQUEST[] = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";

enum { E_CONNECT, E_EOF, E_IO, E_STATUS, E_NO_LENGTH, E_EXTRA, E_LENGTH_CHANGED, E_SHORT_SEND, E_STALL, E_KINDS };
static const char *ERROR_NAMES[E_KINDS] = {"connect", "eof", "io", "status", "no_length",
                                           "extra_bytes", "length_changed", "short_send", "stall"};

struct conn {
    int fd;
    size_t have;
    double sent_at;
    char buf[BUF_SIZE];
};

static unsigned long errors[E_KINDS];
static unsigned long hist[HIST_US + 1];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double own_cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec
           + (double)ru.ru_stime.tv_usec / 1e6;
}

/* utime + stime of `pid` in seconds (fields 14 and 15 of proc(5)'s
 * /proc/PID/stat, after the parenthesised command name); -1 if unreadable. */
static double proc_cpu(int pid) {
    char path[64], data[1024];
    unsigned long utime, stime;
    if (pid <= 0)
        return -1;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(data, 1, sizeof data - 1, f);
    fclose(f);
    data[n] = 0;
    char *p = strrchr(data, ')');
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime) != 2)
        return -1;
    return (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
}

static int connect_to(const char *path) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        fprintf(stderr, "http_load: path too long: %s\n", path);
        exit(2);
    }
    strcpy(addr.sun_path, path);
    double give_up = now() + CONNECT_TIMEOUT;
    for (;;) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return -1;
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0) {
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
            return fd;
        }
        int err = errno;
        close(fd);
        if ((err != ECONNREFUSED && err != ENOENT && err != EAGAIN) || now() > give_up)
            return -1;
        usleep(10000);
    }
}

static int send_request(struct conn *c) {
    ssize_t n = send(c->fd, REQUEST, sizeof REQUEST - 1, MSG_NOSIGNAL);
    if (n == (ssize_t)(sizeof REQUEST - 1)) {
        c->sent_at = now();
        return 0;
    }
    errors[n < 0 ? E_IO : E_SHORT_SEND]++;
    return -1;
}

/* The length of the complete response at the start of c->buf, 0 if more
 * bytes are needed, -1 (error counted) if it is not a valid 200 response. */
static long complete_response(struct conn *c) {
    char *end = memmem(c->buf, c->have, "\r\n\r\n", 4);
    if (!end)
        return c->have == BUF_SIZE ? (errors[E_NO_LENGTH]++, -1) : 0;
    if (c->have < 13 || memcmp(c->buf, "HTTP/1.1 200 ", 13) != 0) {
        errors[E_STATUS]++;
        return -1;
    }
    long body = -1;
    for (char *line = memchr(c->buf, '\n', (size_t)(end - c->buf)); line && line < end;
         line = memchr(line + 1, '\n', (size_t)(end - line))) {
        if (strncasecmp(line + 1, "content-length:", 15) == 0) {
            body = strtol(line + 16, NULL, 10);
            break;
        }
    }
    if (body < 0) {
        errors[E_NO_LENGTH]++;
        return -1;
    }
    long total = (long)(end - c->buf) + 4 + body;
    if ((long)c->have < total)
        return total > BUF_SIZE ? (errors[E_NO_LENGTH]++, -1) : 0;
    if ((long)c->have > total) {
        errors[E_EXTRA]++;
        return -1;
    }
    return total;
}

static double percentile(unsigned long count, double q) {
    if (count == 0)
        return 0;
    unsigned long want = (unsigned long)((double)count * q), seen = 0;
    for (int i = 0; i <= HIST_US; i++) {
        seen += hist[i];
        if (seen > want)
            return i;
    }
    return HIST_US;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: http_load PATH CONNECTIONS DURATION WARMUP SERVER_PID [MAX_REQUESTS]\n");
        return 2;
    }
    const char *path = argv[1];
    int nconn = atoi(argv[2]);
    double duration = atof(argv[3]), warmup = atof(argv[4]);
    int server_pid = atoi(argv[5]);
    unsigned long max_requests = argc > 6 ? strtoul(argv[6], NULL, 10) : 0;
    if (nconn <= 0 || duration <= 0 || warmup < 0) {
        fprintf(stderr, "http_load: bad arguments\n");
        return 2;
    }
    struct conn *conns = calloc((size_t)nconn, sizeof *conns);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (!conns || ep < 0) {
        perror("http_load");
        return 2;
    }
    for (int i = 0; i < nconn; i++) {
        conns[i].fd = connect_to(path);
        if (conns[i].fd < 0) {
            fprintf(stderr, "http_load: connect %s: %s\n", path, strerror(errno));
            errors[E_CONNECT]++;
            nconn = i;
            break;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (unsigned)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
    }
    int live = 0;
    for (int i = 0; i < nconn; i++)
        live += send_request(&conns[i]) == 0;

    double start = now(), window = start + warmup, stop = window + duration, last_done = start;
    double srv0 = -1, cli0 = 0, t0 = window, srv1 = -1, cli1 = 0, t1 = stop;
    int measuring = 0;
    unsigned long done = 0;
    long expected_len = 0;
    struct epoll_event events[MAX_EVENTS];
    while (live > 0) {
        double t = now();
        if (!measuring && t >= window) {
            measuring = 1;
            t0 = t;
            srv0 = proc_cpu(server_pid);
            cli0 = own_cpu();
        }
        if (t >= stop || (max_requests && done >= max_requests))
            break;
        if (t - last_done > STALL_TIMEOUT) {
            errors[E_STALL]++;
            break;
        }
        double next = measuring ? stop : window;
        int wait_ms = (int)((next - t) * 1000) + 1;
        int n = epoll_wait(ep, events, MAX_EVENTS, wait_ms < 100 ? wait_ms : 100);
        for (int k = 0; k < n; k++) {
            struct conn *c = &conns[events[k].data.u32];
            ssize_t got = recv(c->fd, c->buf + c->have, BUF_SIZE - c->have, 0);
            if (got <= 0) {
                if (got < 0 && (errno == EAGAIN || errno == EINTR))
                    continue;
                errors[got == 0 ? E_EOF : E_IO]++;
                goto drop;
            }
            c->have += (size_t)got;
            long len = complete_response(c);
            if (len == 0)
                continue;
            if (len < 0)
                goto drop;
            if (expected_len == 0)
                expected_len = len;
            else if (len != expected_len) {
                errors[E_LENGTH_CHANGED]++;
                goto drop;
            }
            double t_done = now();
            last_done = t_done;
            if (measuring && t_done < stop) {
                double us = (t_done - c->sent_at) * 1e6;
                hist[us < HIST_US ? (int)us : HIST_US]++;
                done++;
            }
            c->have = 0;
            if (send_request(c) == 0)
                continue;
        drop:
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            c->fd = -1;
            live--;
        }
    }
    if (measuring) {
        t1 = now();
        srv1 = proc_cpu(server_pid);
        cli1 = own_cpu();
    }
    double span = measuring ? t1 - t0 : 0;
    unsigned long nerr = 0;
    for (int i = 0; i < E_KINDS; i++)
        nerr += errors[i];
    printf("{\"path\": \"%s\", \"mode\": \"http\", \"connections\": %d, \"size\": %ld, \"duration_s\": %.6f, "
           "\"round_trips\": %lu, \"round_trips_per_s\": %.1f, \"latency_us\": {\"p50\": %.0f, \"p99\": %.0f}, ",
           path, nconn, expected_len, span, done, span > 0 ? (double)done / span : 0.0,
           percentile(done, 0.5), percentile(done, 0.99));
    if (srv0 >= 0 && srv1 >= 0)
        printf("\"server_cpu_s\": %.4f, \"server_cpu_us_per_rt\": %.3f, ", srv1 - srv0,
               done ? (srv1 - srv0) * 1e6 / (double)done : 0.0);
    else
        printf("\"server_cpu_s\": null, \"server_cpu_us_per_rt\": null, ");
    printf("\"client_cpu_s\": %.4f, \"client_cpu_share\": %.4f, \"client_cpu_us_per_rt\": %.3f, "
           "\"errors\": %lu, \"errors_by_kind\": {",
           cli1 - cli0, span > 0 ? (cli1 - cli0) / span : 0.0, done ? (cli1 - cli0) * 1e6 / (double)done : 0.0,
           nerr);
    for (int i = 0, first = 1; i < E_KINDS; i++)
        if (errors[i]) {
            printf("%s\"%s\": %lu", first ? "" : ", ", ERROR_NAMES[i], errors[i]);
            first = 0;
        }
    printf("}}\n");
    for (int i = 0; i < nconn; i++)
        if (conns[i].fd >= 0)
            close(conns[i].fd);
    return nerr ? 1 : 0;
}
