/* echo_epoll.c - a minimal epoll echo server over a Unix stream socket: the
 * physical-limit reference of the benchmark (benchmarks/run.py compiles it
 * with `cc -O2` into benchmarks/.build/).
 *
 *   echo_epoll PATH [BACKLOG]
 *
 * One thread, level-triggered epoll.  A readable listener is drained with
 * accept4(SOCK_NONBLOCK | SOCK_CLOEXEC) until EAGAIN; a readable connection
 * gets one recv() of up to 64 KiB and the bytes go straight back with send().
 * Only when the peer's receive queue is full (a partial send) are the rest
 * kept in a per-connection buffer: the connection then waits for EPOLLOUT
 * instead of EPOLLIN until it is flushed, so memory stays bounded and the
 * echo is exact.  A per-connection cost of 16 bytes (the pending-buffer
 * slot, indexed by fd) is all the state there is.
 *
 * The socket is bound under a temporary name, listens, and is then renamed
 * to PATH: once PATH exists the server accepts (the same readiness rule as
 * `unixsrv serve`).  RLIMIT_NOFILE's soft limit is raised to the hard one.
 * SIGTERM/SIGINT end it (default action); the harness removes the file.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define BUF_SIZE 65536
#define MAX_EVENTS 1024

struct pending {
    char *buf;      /* NULL: nothing pending, the fd waits for EPOLLIN */
    size_t off, len;
};

static struct pending *pend;   /* indexed by fd */
static size_t npend;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void drop(int ep, int fd) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    if ((size_t)fd < npend && pend[fd].buf) {
        free(pend[fd].buf);
        pend[fd].buf = NULL;
    }
    close(fd);
}

static void set_events(int ep, int fd, unsigned events) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev) < 0)
        die("epoll_ctl MOD");
}

/* Send buf[0..len); keep what the socket does not take.  0 ok, -1 dead. */
static int send_or_keep(int ep, int fd, const char *buf, size_t len) {
    size_t off = 0;
    while (off < len) {
        ssize_t w = send(fd, buf + off, len - off, MSG_NOSIGNAL);
        if (w > 0) {
            off += (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            size_t rest = len - off;
            char *copy = malloc(rest);
            if (!copy)
                die("malloc");
            memcpy(copy, buf + off, rest);
            pend[fd] = (struct pending){.buf = copy, .off = 0, .len = rest};
            set_events(ep, fd, EPOLLOUT);
            return 0;
        } else {
            return -1;
        }
    }
    return 0;
}

/* EPOLLOUT on a connection with pending bytes.  0 ok, -1 dead. */
static int flush_pending(int ep, int fd) {
    struct pending *p = &pend[fd];
    while (p->off < p->len) {
        ssize_t w = send(fd, p->buf + p->off, p->len - p->off, MSG_NOSIGNAL);
        if (w > 0)
            p->off += (size_t)w;
        else if (w < 0 && errno == EINTR)
            continue;
        else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        else
            return -1;
    }
    free(p->buf);
    p->buf = NULL;
    set_events(ep, fd, EPOLLIN);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s PATH [BACKLOG]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    int backlog = argc == 3 ? atoi(argv[2]) : 4096;

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    getrlimit(RLIMIT_NOFILE, &rl);
    npend = rl.rlim_cur == RLIM_INFINITY ? 1u << 20 : (size_t)rl.rlim_cur;
    pend = calloc(npend, sizeof *pend);
    if (!pend)
        die("calloc");

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    char tmp[sizeof addr.sun_path];
    if (snprintf(tmp, sizeof tmp, "%s.%d.tmp", path, (int)getpid()) >= (int)sizeof tmp) {
        fprintf(stderr, "socket path too long\n");
        return 2;
    }
    strcpy(addr.sun_path, tmp);
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0)
        die("socket");
    unlink(tmp);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("bind");
    if (listen(lfd, backlog) < 0)
        die("listen");
    if (rename(tmp, path) < 0)
        die("rename");

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0)
        die("epoll_ctl ADD listener");

    static char buf[BUF_SIZE];
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                for (;;) {
                    int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (c < 0) {
                        if (errno == EINTR || errno == ECONNABORTED)
                            continue;
                        break;  /* EAGAIN, or EMFILE & co: try again on the next wakeup */
                    }
                    if ((size_t)c >= npend) {
                        close(c);
                        continue;
                    }
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev) < 0)
                        close(c);
                }
                continue;
            }
            if (pend[fd].buf) {
                if ((events[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && flush_pending(ep, fd) < 0)
                    drop(ep, fd);
                continue;
            }
            if (!(events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
                continue;
            ssize_t r = recv(fd, buf, sizeof buf, 0);
            if (r > 0) {
                if (send_or_keep(ep, fd, buf, (size_t)r) < 0)
                    drop(ep, fd);
            } else if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
                drop(ep, fd);
            }
        }
    }
}
