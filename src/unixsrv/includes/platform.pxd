# The platform shims: small static-inline C headers next to the sources
# (src/unixsrv/*.h), one place per kernel difference (epoll/kqueue, Linux/BSD
# socket calls, C11 atomics).  All `nogil`.  Both extensions include the
# headers they use; being static inline, an unused function costs nothing.

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

from .system cimport dev_t, ino_t, mode_t, socklen_t, sockaddr_un


cdef extern from "atomics.h" nogil:
    void us_add_u64(uint64_t *p, uint64_t v)
    uint64_t us_load_u64(const uint64_t *p)
    void us_add_u64_release(uint64_t *p, uint64_t v)
    uint64_t us_load_u64_acquire(const uint64_t *p)
    int64_t us_load_i64(const int64_t *p)
    void us_store_i64(int64_t *p, int64_t v)
    uint32_t us_or_u32(uint32_t *p, uint32_t bits)
    uint32_t us_load_u32(const uint32_t *p)
    int32_t us_load_i32(const int32_t *p)
    int us_use_acquire(int32_t *uses)
    int us_use_release(int32_t *uses)


cdef extern from "poller.h" nogil:
    enum:
        US_READ
        US_WRITE
        US_EDGE
        US_LISTEN
    ctypedef struct us_poll_event:
        pass
    int us_poller_create()
    int us_poller_add(int pfd, int fd, uint64_t token, int interest)
    int us_poller_modify(int pfd, int fd, uint64_t token, int old_interest, int new_interest)
    int us_poller_remove(int pfd, int fd, int old_interest)
    int us_poller_wait(int pfd, us_poll_event *evs, int max, int timeout_ms)
    uint64_t us_event_token(const us_poll_event *e)
    int us_event_readable(const us_poll_event *e)
    int us_event_writable(const us_poll_event *e)


cdef extern from "compat.h" nogil:
    enum:
        MSG_NOSIGNAL
        US_REFUSED_MAY_BE_FULL
        US_HAVE_ABSTRACT
        US_SUN_PATH_MAX
    int64_t us_now_ns()
    int us_socket(int nonblock)
    int us_accept(int lfd, int nonblock, int *named)
    int us_pipe(int fds[2])
    int us_bind(int fd, const char *path, size_t len)
    int us_probe(const char *path, size_t len)
    int us_rename_noreplace(int dirfd, const char *src, const char *dst)
    int us_set_mode_group(int dirfd, const char *name, dev_t dev, ino_t ino, mode_t mode, long gid)
    size_t us_sun_path_len(socklen_t sl)
    socklen_t us_make_addr(sockaddr_un *sa, const char *path, size_t len)
    int us_open_dir(const char *path)
    int us_lock_dir(const char *path, int timeout_ms)
    int us_peercred(int fd, long *pid, long *uid, long *gid)
    int us_is_socket_mode(mode_t m)
    int us_would_block(int e)
    void *us_shared_alloc(size_t size)
    int us_shared_free(void *p, size_t size)
    int us_exit_with_parent(int sig)


cdef extern from "access.h" nogil:
    ctypedef struct us_uid_counts:
        pass
    int us_id_listed(const uint32_t *a, size_t n, uint32_t x)
    int us_peer_group_listed(int fd, const uint32_t *gids, size_t n)
    int us_uid_take(us_uid_counts *t, uint32_t uid, uint32_t limit)
    void us_uid_put(us_uid_counts *t, uint32_t uid)
    void us_uid_counts_free(us_uid_counts *t)
