/* compat.h - the platform-dependent system calls of the core, as static inline C.
 *
 * Linux gets accept4/pipe2/SOCK_CLOEXEC so no fd is ever visible without
 * FD_CLOEXEC, MSG_NOSIGNAL on every send, SO_PEERCRED and renameat2.  macOS
 * gets the closest equivalents: fcntl right after creation, SO_NOSIGPIPE on
 * every socket (send(2) there has no MSG_NOSIGNAL), getpeereid and
 * renameatx_np(RENAME_EXCL).
 */
#ifndef UNIXSRV_COMPAT_H
#define UNIXSRV_COMPAT_H

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#if defined(__APPLE__)
#include <sys/ucred.h>
#endif
#if defined(__linux__)
#include <sys/prctl.h>
#endif

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

#if defined(__linux__)
#define US_HAVE_ABSTRACT 1
#else
#define US_HAVE_ABSTRACT 0
#endif

/* Bytes usable in sockaddr_un.sun_path for a NUL-terminated path. */
#define US_SUN_PATH_MAX ((int)sizeof(((struct sockaddr_un *)0)->sun_path) - 1)

static inline int64_t us_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline int us__fd_flags(int fd, int nonblock) {
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0) return -1;
    if (nonblock) {
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return -1;
    }
#if defined(SO_NOSIGPIPE)
    {
        int one = 1;
        /* Fails harmlessly on non-sockets (the wakeup pipe). */
        (void)setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof(one));
    }
#endif
    return 0;
}

static inline void us__close_keep_errno(int fd) {
    int e = errno;
    close(fd);
    errno = e;
}

/* A new AF_UNIX stream socket, always close-on-exec. */
static inline int us_socket(int nonblock) {
#if defined(SOCK_CLOEXEC) && defined(SOCK_NONBLOCK)
    return socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
#else
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd >= 0 && us__fd_flags(fd, nonblock) < 0) {
        us__close_keep_errno(fd);
        return -1;
    }
    return fd;
#endif
}

/* accept one pending connection, close-on-exec, optionally non-blocking.
 * *named is set to 1 if the client bound a name (most clients do not, and
 * then the server never needs getpeername(2) to know its address is ""). */
static inline int us_accept(int lfd, int nonblock, int *named) {
    struct sockaddr_un sa;
    socklen_t sl = sizeof(sa);
#if defined(__linux__)
    int fd = accept4(lfd, (struct sockaddr *)&sa, &sl,
                     SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0));
    *named = fd >= 0 && sl > offsetof(struct sockaddr_un, sun_path);
    return fd;
#else
    int fd = accept(lfd, (struct sockaddr *)&sa, &sl);
    *named = fd >= 0 && sl > offsetof(struct sockaddr_un, sun_path) && sa.sun_path[0] != 0;
    if (fd >= 0) {
        if (us__fd_flags(fd, nonblock) < 0) {
            us__close_keep_errno(fd);
            return -1;
        }
        /* BSD accept(2) inherits O_NONBLOCK from the listener; clear it. */
        if (!nonblock) {
            int fl = fcntl(fd, F_GETFL);
            if (fl >= 0) (void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
        }
    }
    return fd;
#endif
}

/* A non-blocking, close-on-exec pipe: [0] read end, [1] write end. */
static inline int us_pipe(int fds[2]) {
#if defined(__linux__)
    return pipe2(fds, O_NONBLOCK | O_CLOEXEC);
#else
    if (pipe(fds) < 0) return -1;
    if (us__fd_flags(fds[0], 1) < 0 || us__fd_flags(fds[1], 1) < 0) {
        us__close_keep_errno(fds[0]);
        us__close_keep_errno(fds[1]);
        return -1;
    }
    return 0;
#endif
}

/* Fill a sockaddr_un from exactly len bytes (an abstract name starts with
 * NUL and is length-exact, so no strlen anywhere).  Returns the address
 * length, or -1 with errno=ENAMETOOLONG. */
static inline socklen_t us_make_addr(struct sockaddr_un *sa, const char *path,
                                     size_t len) {
    if (len > sizeof(sa->sun_path) - (path[0] != '\0' ? 1 : 0)) {
        errno = ENAMETOOLONG;
        return (socklen_t)-1;
    }
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    memcpy(sa->sun_path, path, len);
    if (path[0] == '\0') /* abstract: no terminator counted */
        return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + 1);
}

static inline int us_bind(int fd, const char *path, size_t len) {
    struct sockaddr_un sa;
    socklen_t sl = us_make_addr(&sa, path, len);
    if (sl == (socklen_t)-1) return -1;
    return bind(fd, (struct sockaddr *)&sa, sl);
}

/* Linux answers a non-blocking connect() to a full backlog with EAGAIN
 * (unix(7)); the BSDs and macOS refuse it (ECONNREFUSED), like a dead
 * socket, so there a refusal may only mean "busy". */
#if defined(__linux__)
#define US_REFUSED_MAY_BE_FULL 0
#else
#define US_REFUSED_MAY_BE_FULL 1
#endif

static inline int us__probe_once(const struct sockaddr_un *sa, socklen_t sl) {
    int fd = us_socket(1);
    if (fd < 0) return -1;
    int r;
    do { r = connect(fd, (const struct sockaddr *)sa, sl); } while (r < 0 && errno == EINTR);
    if (r < 0 && errno == EAGAIN) r = 0;
    us__close_keep_errno(fd);
    return r;
}

/* Liveness probe of an existing socket file: a non-blocking connect answers
 * at once on AF_UNIX.  Returns 0 if something accepts connections there,
 * otherwise -1 with errno (ECONNREFUSED means nobody listens: stale).
 * Linux reports a full backlog as EAGAIN (unix(7)): alive.  The BSDs and
 * macOS refuse it with ECONNREFUSED, like a dead socket; a busy server drains
 * its backlog within milliseconds while a dead one never answers, so there
 * a refusal is only believed after it repeated for about 100 ms.
 * Call without the GIL. */
static inline int us_probe(const char *path, size_t len) {
    struct sockaddr_un sa;
    socklen_t sl = us_make_addr(&sa, path, len);
    if (sl == (socklen_t)-1) return -1;
    int r = us__probe_once(&sa, sl);
#if US_REFUSED_MAY_BE_FULL
    for (int i = 0; i < 5 && r < 0 && errno == ECONNREFUSED; i++) {
        struct timespec ts = {0, 20000000};
        nanosleep(&ts, NULL);
        r = us__probe_once(&sa, sl);
    }
#endif
    return r;
}

/* Move from -> to inside one directory unless `to` exists (EEXIST).  The
 * socket is already listening with its final mode when it appears, so no
 * client ever sees a half-set-up socket and two racing starters can never
 * both win. */
static inline int us_rename_noreplace(int dirfd, const char *from, const char *to) {
#if defined(__linux__) && defined(RENAME_NOREPLACE)
    if (renameat2(dirfd, from, dirfd, to, RENAME_NOREPLACE) == 0) return 0;
    if (errno != EINVAL && errno != ENOSYS) return -1;
    /* The filesystem has no RENAME_NOREPLACE: fall through to link+unlink. */
#elif defined(__APPLE__) && defined(RENAME_EXCL)
    if (renameatx_np(dirfd, from, dirfd, to, RENAME_EXCL) == 0) return 0;
    if (errno != ENOTSUP && errno != EINVAL) return -1;
#endif
    if (linkat(dirfd, from, dirfd, to, 0) < 0) return -1;
    (void)unlinkat(dirfd, from, 0);
    return 0;
}

/* chmod and chgrp the socket file `name` (in dirfd) that we have just bound,
 * and nothing else: the directory may be writable by others, who could swap
 * the name for a symlink or another file between our checks and the call.
 *
 * Linux: open the name itself with O_PATH|O_NOFOLLOW (a symlink is opened as
 * the link, not followed: open(2)), check that it is a socket with the
 * inode we bound (dev, ino), then change exactly that inode: chown through
 * the O_PATH fd with AT_EMPTY_PATH (fchownat(2)), chmod through
 * /proc/self/fd/N, which resolves to the opened inode (proc(5)) - Linux has
 * no fchmod on O_PATH fds before fchmodat2 (6.6).
 * Elsewhere: fchmodat/fchownat with AT_SYMLINK_NOFOLLOW, which the BSDs and
 * macOS implement natively (lchmod/lchown semantics); the name was checked
 * to be our socket just before.
 * Returns 0, or -1 with errno (ELOOP: the name is no longer our socket). */
static inline int us_set_mode_group(int dirfd, const char *name, dev_t dev, ino_t ino,
                                    mode_t mode, long gid) {
#if defined(__linux__) && defined(O_PATH)
    int fd = openat(dirfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return -1;
    struct stat st;
    int r = fstat(fd, &st);
    if (r == 0 && (!S_ISSOCK(st.st_mode) || st.st_dev != dev || st.st_ino != ino)) {
        errno = ELOOP;
        r = -1;
    }
    if (r == 0) {
        char proc[48];
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
        r = chmod(proc, mode);
    }
    if (r == 0 && gid >= 0)
        r = fchownat(fd, "", (uid_t)-1, (gid_t)gid, AT_EMPTY_PATH);
    us__close_keep_errno(fd);
    return r;
#else
    (void)dev;
    (void)ino;
    if (fchmodat(dirfd, name, mode, AT_SYMLINK_NOFOLLOW) < 0) return -1;
    if (gid >= 0 && fchownat(dirfd, name, (uid_t)-1, (gid_t)gid, AT_SYMLINK_NOFOLLOW) < 0)
        return -1;
    return 0;
#endif
}

/* Serialise unixsrv processes that create or remove sockets in one
 * directory: flock(2) on the directory itself (no lock file to leave behind;
 * released if the holder dies).  Waits up to timeout_ms; returns the locked
 * fd, or -1 if the directory cannot be opened for locking (then the caller
 * goes on unlocked) or -2 on timeout.  Call without the GIL.
 *
 * flock(2) has no timed form, so this polls LOCK_NB against a CLOCK_MONOTONIC
 * deadline.  Counting 1 ms sleeps instead made a 10 s wait last 12-16 s: each
 * nanosleep(2) lasts at least as long as asked, plus timer slack and
 * scheduling delay. */
static inline int us_lock_dir(const char *path, int timeout_ms) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    int64_t deadline = us_now_ns() + (int64_t)timeout_ms * 1000000LL;
    for (;;) {
        if (flock(fd, LOCK_EX | LOCK_NB) == 0) return fd;
        if (errno != EWOULDBLOCK && errno != EINTR) {
            us__close_keep_errno(fd);
            return -1;
        }
        int64_t left = deadline - us_now_ns();
        if (left <= 0) {
            close(fd);
            return -2;
        }
        struct timespec ts = {0, (long)(left < 1000000 ? left : 1000000)};
        nanosleep(&ts, NULL);
    }
}

static inline int us_open_dir(const char *path) {
#if defined(O_PATH)
    return open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
#else
    return open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
#endif
}

/* Peer credentials at connect time (unix(7) SO_PEERCRED; getpeereid(3)). */
static inline int us_peercred(int fd, long *pid, long *uid, long *gid) {
#if defined(SO_PEERCRED)
    struct ucred cr;
    socklen_t len = sizeof(cr);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) < 0) return -1;
    *pid = cr.pid;
    *uid = cr.uid;
    *gid = cr.gid;
    return 0;
#elif defined(__APPLE__)
    uid_t u;
    gid_t g;
    if (getpeereid(fd, &u, &g) < 0) return -1;
    *uid = u;
    *gid = g;
    *pid = 0;
#if defined(LOCAL_PEERPID)
    pid_t p;
    socklen_t len = sizeof(p);
    if (getsockopt(fd, SOL_LOCAL, LOCAL_PEERPID, &p, &len) == 0) *pid = p;
#endif
    return 0;
#else
    errno = ENOSYS;
    return -1;
#endif
}

/* Bytes of sun_path that an address of length sl returned by accept(2) or
 * getpeername(2) holds (0 for an unnamed client). */
static inline size_t us_sun_path_len(socklen_t sl) {
    size_t head = offsetof(struct sockaddr_un, sun_path);
    if (sl <= head) return 0;
    if (sl > sizeof(struct sockaddr_un)) sl = sizeof(struct sockaddr_un);
    return (size_t)sl - head;
}

/* EAGAIN and EWOULDBLOCK may or may not be the same number. */
static inline int us_would_block(int e) { return e == EAGAIN || e == EWOULDBLOCK; }

static inline int us_is_socket_mode(mode_t m) { return S_ISSOCK(m); }

/* Memory shared with the processes forked after it is mapped: the counters
 * of Server(workers=N) (one us_stats slot per worker, written by the worker
 * with the same lock-free atomics as in one process, summed by the parent).
 * mmap(2): a MAP_SHARED | MAP_ANONYMOUS mapping is inherited by fork(2) and
 * stays shared, zero-filled.  NULL on failure (errno set). */
static inline void *us_shared_alloc(size_t size) {
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANON, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static inline int us_shared_free(void *p, size_t size) { return munmap(p, size); }

/* A worker process must not outlive its parent.  Linux: the kernel sends
 * `sig` when the thread that forked us exits (prctl(2) PR_SET_PDEATHSIG).
 * Returns 0 when armed, -1/ENOSYS elsewhere (the caller then watches a
 * pipe whose write end only the parent holds).  The caller compares
 * getppid() with the parent's pid afterwards: a parent that died before
 * the prctl call would never trigger it. */
static inline int us_exit_with_parent(int sig) {
#if defined(__linux__)
    return prctl(PR_SET_PDEATHSIG, (unsigned long)sig, 0, 0, 0);
#else
    (void)sig;
    errno = ENOSYS;
    return -1;
#endif
}

#endif /* UNIXSRV_COMPAT_H */
