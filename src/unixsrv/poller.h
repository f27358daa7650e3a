/* poller.h - one readiness API over epoll (Linux) and kqueue (macOS/BSD).
 *
 * The platform is chosen here by the preprocessor, so the Cython code never
 * needs an IF.  Every registration carries a 64-bit token chosen by the
 * caller; the core stores (sequence << 32 | fd) in it, so an event for an fd
 * that was closed and reused is recognised as stale instead of being
 * dispatched to the wrong connection.
 *
 * Interest is level-triggered on both platforms: a connection we could not
 * fully drain in one wakeup is simply reported again on the next one.
 */
#ifndef UNIXSRV_POLLER_H
#define UNIXSRV_POLLER_H

#include <errno.h>
#include <stdint.h>
#include <unistd.h>

#define US_READ 1
#define US_WRITE 2
/* Edge-triggered (epoll EPOLLET, kqueue EV_CLEAR): only the load generator
 * uses it, on sockets it reads until a short read. */
#define US_EDGE 4
/* For a listening socket shared by several processes (Server(workers=N)):
 * wake one of the pollers watching it per incoming connection, not all of
 * them.  Linux: EPOLLEXCLUSIVE (epoll_ctl(2), since 4.5), which is accepted
 * only by EPOLL_CTL_ADD; us_poller_modify() only ever adds or deletes a
 * registration carrying it (the listener's interest goes between nothing and
 * US_LISTEN).  kqueue has no equivalent: every worker's kevent() returns for
 * a new connection, one accept(2) wins and the others get EAGAIN (the
 * "thundering herd", harmless but a wasted wakeup per worker). */
#define US_EXCLUSIVE 8
#define US_LISTEN (US_READ | US_EXCLUSIVE)

/* An fd with no interest is not registered at all, rather than kept with
 * an empty mask: epoll_ctl(2) "will always wait for" EPOLLHUP and EPOLLERR,
 * so a hung-up socket registered for nothing would wake every epoll_wait
 * forever (a paused or half-closed connection whose peer went away).  So
 * us_poller_modify() adds and deletes as interest appears and goes. */
#define US__ANY(interest) ((interest) & (US_READ | US_WRITE))

#if defined(__linux__)
#include <fcntl.h>
#include <sys/epoll.h>

typedef struct epoll_event us_poll_event;

/* Non-blocking as well as close-on-exec, like every fd of the core: no call
 * of ours blocks on it but epoll_wait (which ignores O_NONBLOCK), and an
 * inherited or leaked copy can never block a read(2) either. */
static inline int us_poller_create(void) {
    int fd = epoll_create1(EPOLL_CLOEXEC);
    if (fd >= 0 && fcntl(fd, F_SETFL, O_NONBLOCK) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static inline uint32_t us__epoll_mask(int interest) {
    uint32_t m = 0;
    if (interest & US_READ) m |= EPOLLIN | EPOLLRDHUP;
    if (interest & US_WRITE) m |= EPOLLOUT;
    if (m && (interest & US_EDGE)) m |= EPOLLET;
#ifdef EPOLLEXCLUSIVE
    /* EPOLLEXCLUSIVE takes EPOLLIN but not EPOLLRDHUP (EINVAL, epoll_ctl(2));
     * a listening socket never reports a read hang-up anyway. */
    if (m && (interest & US_EXCLUSIVE)) m = (m & ~(uint32_t)EPOLLRDHUP) | EPOLLEXCLUSIVE;
#endif
    return m;
}

static inline int us__epoll_ctl(int pfd, int op, int fd, uint64_t token,
                                int interest) {
    struct epoll_event ev;
    ev.events = us__epoll_mask(interest);
    ev.data.u64 = token;
    /* epoll_ctl(2) does not fail with EINTR, but be defensive all the same. */
    int r;
    do { r = epoll_ctl(pfd, op, fd, &ev); } while (r < 0 && errno == EINTR);
    return r;
}

static inline int us_poller_add(int pfd, int fd, uint64_t token, int interest) {
    if (!US__ANY(interest)) return 0;
    return us__epoll_ctl(pfd, EPOLL_CTL_ADD, fd, token, interest);
}

static inline int us_poller_modify(int pfd, int fd, uint64_t token,
                                   int old_interest, int new_interest) {
    int op;
    if (!US__ANY(new_interest)) {
        if (!US__ANY(old_interest)) return 0;
        op = EPOLL_CTL_DEL;
    } else {
        op = US__ANY(old_interest) ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    }
    return us__epoll_ctl(pfd, op, fd, token, new_interest);
}

static inline int us_poller_remove(int pfd, int fd, int old_interest) {
    if (!US__ANY(old_interest)) return 0;
    return us__epoll_ctl(pfd, EPOLL_CTL_DEL, fd, 0, 0);
}

/* epoll_wait(2) is never restarted after a signal handler (signal(7)); the
 * caller treats -1/EINTR as an empty wakeup and checks for signals. */
static inline int us_poller_wait(int pfd, us_poll_event *evs, int max,
                                 int timeout_ms) {
    return epoll_wait(pfd, evs, max, timeout_ms);
}

static inline uint64_t us_event_token(const us_poll_event *e) {
    return e->data.u64;
}

/* Hang-up and error count as readable: recv() then reports EOF or the error. */
static inline int us_event_readable(const us_poll_event *e) {
    return (e->events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0;
}

static inline int us_event_writable(const us_poll_event *e) {
    return (e->events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) != 0;
}

#else /* kqueue: macOS and the BSDs */
#include <fcntl.h>
#include <sys/event.h>
#include <sys/time.h>
#include <sys/types.h>

typedef struct kevent us_poll_event;

static inline int us_poller_create(void) {
    int fd = kqueue();
    /* kqueue(2) has no CLOEXEC flag on macOS; a kqueue is not inherited by
     * fork anyway, but exec must not see it either.  Non-blocking too, like
     * every fd of the core. */
    if (fd >= 0 && (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0 || fcntl(fd, F_SETFL, O_NONBLOCK) < 0)) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static inline int us__kq_apply(int pfd, int fd, uint64_t token, int old_interest,
                               int new_interest) {
    struct kevent ch[2];
    int n = 0;
    void *udata = (void *)(uintptr_t)token;
    unsigned short clear = (new_interest & US_EDGE) ? EV_CLEAR : 0;
    if ((new_interest ^ old_interest) & (US_READ | US_EDGE)) {
        if (new_interest & US_READ)
            EV_SET(&ch[n++], fd, EVFILT_READ, EV_ADD | EV_ENABLE | clear, 0, 0, udata);
        else if (old_interest & US_READ)
            EV_SET(&ch[n++], fd, EVFILT_READ, EV_DELETE, 0, 0, udata);
    }
    if ((new_interest ^ old_interest) & (US_WRITE | US_EDGE)) {
        if (new_interest & US_WRITE)
            EV_SET(&ch[n++], fd, EVFILT_WRITE, EV_ADD | EV_ENABLE | clear, 0, 0, udata);
        else if (old_interest & US_WRITE)
            EV_SET(&ch[n++], fd, EVFILT_WRITE, EV_DELETE, 0, 0, udata);
    }
    if (n == 0) return 0;
    int r;
    do { r = kevent(pfd, ch, n, NULL, 0, NULL); } while (r < 0 && errno == EINTR);
    return r < 0 ? -1 : 0;
}

static inline int us_poller_add(int pfd, int fd, uint64_t token, int interest) {
    return us__kq_apply(pfd, fd, token, 0, interest);
}

static inline int us_poller_modify(int pfd, int fd, uint64_t token,
                                   int old_interest, int new_interest) {
    return us__kq_apply(pfd, fd, token, old_interest, new_interest);
}

static inline int us_poller_remove(int pfd, int fd, int old_interest) {
    return us__kq_apply(pfd, fd, 0, old_interest, 0);
}

static inline int us_poller_wait(int pfd, us_poll_event *evs, int max,
                                 int timeout_ms) {
    struct timespec ts, *tp = NULL;
    if (timeout_ms >= 0) {
        ts.tv_sec = timeout_ms / 1000;
        ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
        tp = &ts;
    }
    return kevent(pfd, NULL, 0, evs, max, tp);
}

static inline uint64_t us_event_token(const us_poll_event *e) {
    return (uint64_t)(uintptr_t)e->udata;
}

static inline int us_event_readable(const us_poll_event *e) {
    return e->filter == EVFILT_READ;
}

static inline int us_event_writable(const us_poll_event *e) {
    return e->filter == EVFILT_WRITE;
}
#endif

#endif /* UNIXSRV_POLLER_H */
