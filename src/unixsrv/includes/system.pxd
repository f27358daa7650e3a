# System declarations shared by the extensions (_core, _loadgen): libc and
# POSIX, every one `nogil` (none of them touches Python objects).  Only what
# unixsrv calls is declared.

cdef extern from "<sys/types.h>" nogil:
    ctypedef long ssize_t
    ctypedef unsigned int mode_t
    ctypedef unsigned int uid_t
    ctypedef unsigned int gid_t
    ctypedef long dev_t
    ctypedef unsigned long ino_t


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EINTR
        ENOENT
        EEXIST
        ENOMEM
        ECONNABORTED
        ECONNREFUSED
        ECONNRESET
        EPIPE
        EPROTO
        ENOTCONN
        EADDRINUSE
        ENOSYS
        EINPROGRESS
        EALREADY
        EISCONN
        ETIMEDOUT


cdef extern from "<string.h>" nogil:
    char *strerror(int errnum)
    void *memcpy(void *dest, const void *src, size_t n)
    void *memmove(void *dest, const void *src, size_t n)
    void *memset(void *s, int c, size_t n)
    int memcmp(const void *a, const void *b, size_t n)


cdef extern from "<stdlib.h>" nogil:
    void *malloc(size_t size)
    void *calloc(size_t n, size_t size)
    void *realloc(void *ptr, size_t size)
    void free(void *ptr)


cdef extern from "<stdio.h>" nogil:
    int snprintf(char *buf, size_t n, const char *fmt, ...)


cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)
    int unlinkat(int dirfd, const char *path, int flags)
    uid_t geteuid()
    int getpid()
    long sysconf(int name)
    enum:
        _SC_CLK_TCK


cdef extern from "<fcntl.h>" nogil:
    int fcntl(int fd, int cmd, ...)
    # Not named `open`: that would hide Python's open() in every module
    # that cimports this file.
    int c_open "open"(const char *path, int flags, ...)
    enum:
        AT_SYMLINK_NOFOLLOW
        F_DUPFD_CLOEXEC
        O_RDONLY
        O_CLOEXEC


cdef extern from "<sys/stat.h>" nogil:
    cdef struct stat:
        dev_t st_dev
        ino_t st_ino
        mode_t st_mode
        uid_t st_uid
        gid_t st_gid
    int fstatat(int dirfd, const char *path, stat *buf, int flags)
    int lstat(const char *path, stat *buf)
    int unlink(const char *path)


cdef extern from "<sys/socket.h>" nogil:
    enum:
        SHUT_RD
        SHUT_WR
        SHUT_RDWR
        MSG_DONTWAIT
        SOL_SOCKET
        SO_ERROR
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    int listen(int fd, int backlog)
    int connect(int fd, const sockaddr *addr, socklen_t len)
    int getpeername(int fd, sockaddr *addr, socklen_t *len)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)


cdef extern from "<sys/un.h>" nogil:
    struct sockaddr_un:
        char sun_path[108]


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    enum:
        POLLIN
        POLLOUT
    int poll(pollfd *fds, unsigned long nfds, int timeout)


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_trylock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)


cdef extern from "<sys/time.h>" nogil:
    struct timeval:
        long tv_sec
        long tv_usec


cdef extern from "<sys/resource.h>" nogil:
    struct rusage:
        timeval ru_utime
        timeval ru_stime
    enum:
        RUSAGE_SELF
    int getrusage(int who, rusage *usage)


cdef extern from * nogil:
    # GCC and Clang builtin (the only compilers the Unix builds use).
    int __builtin_clzll(unsigned long long x)
