# _listener.pxi - creating the listening socket and its file, removing it again.
#
# The start sequence never lets a client see a socket whose mode or group is
# not final, never deletes anything but a stale socket, and lets exactly one
# of several racing starters win:
#
#   1. open the directory (O_PATH on Linux);
#   2. bind a new socket under a random temporary name in that directory;
#   3. chmod and chgrp the socket just bound there (that inode, never a
#      symlink or a file swapped in under its name);
#   4. listen();
#   5. rename the temporary name onto the final name, refusing to replace
#      anything (renameat2 RENAME_NOREPLACE / renameatx_np RENAME_EXCL);
#   6. if the final name exists: a live socket -> AddressInUseError; anything
#      that is not a socket -> AddressInUseError, left untouched; a stale
#      socket (connect is refused) -> unlinked if its inode did not change,
#      then back to 5.
#
# All of this, and the removal at stop, runs under an flock(2) on the directory,
# so two unixsrv processes never interleave "check the inode, unlink the
# name": without it one could delete the other's fresh socket, all the more
# since ext4 hands a freed inode number straight to the next new file.
#
# Until step 5 nobody can connect (nothing listens at the final name), and
# before step 4 nobody could connect to the temporary name either: connect(2)
# is refused until listen(2) (unix(7)).


cdef int _listen_abstract(bytes address, int backlog) except -1:
    cdef int fd = us_socket(1)
    if fd < 0:
        raise _oserror(errno)
    if us_bind(fd, address, len(address)) < 0 or listen(fd, backlog) < 0:
        err = errno
        close(fd)
        display = "@" + address[1:].decode("utf-8", "backslashreplace")
        if err == EADDRINUSE:
            raise AddressInUseError(display)
        raise _oserror(err, display)
    return fd


cdef bint _same_inode(int dirfd, bytes name, dev_t dev, ino_t ino):
    cdef stat st
    return (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0
            and st.st_dev == dev and st.st_ino == ino)


cdef int _examine_existing(int dirfd, bytes base, bytes probe_addr, object display) except -1:
    """Deal with a file already at the final name.

    Returns 1 when the name is free again (stale socket removed, or the file
    vanished), raises when the name is taken.
    """
    cdef stat st
    if fstatat(dirfd, base, &st, AT_SYMLINK_NOFOLLOW) < 0:
        if errno == ENOENT:
            return 1
        raise _oserror(errno, display)
    if not us_is_socket_mode(st.st_mode):
        raise AddressInUseError(display, "the path exists and is not a socket; it was left untouched")
    cdef const char *addr = probe_addr
    cdef size_t addr_len = len(probe_addr)
    cdef int r, err
    with nogil:
        r = us_probe(addr, addr_len)
        err = errno
    if r == 0:
        raise AddressInUseError(display)
    if err == ENOENT:
        return 1
    if err != ECONNREFUSED:
        # EACCES/EPERM: we may not even connect, so we may not judge it stale.
        raise _oserror(err, display)
    # Nobody listens: a stale socket left by a crash.  Remove it only if it is
    # still the very file we probed.
    if _same_inode(dirfd, base, st.st_dev, st.st_ino):
        if unlinkat(dirfd, base, 0) < 0 and errno != ENOENT:
            raise _oserror(errno, display)
    return 1


# How long the directory lock is waited for.  Start-up: 10 s, then start()
# fails with TimeoutError (a start may wait; its caller sees the error).
# Stop: 250 ms, then the unlink is skipped with a WARNING.  A unixsrv peer
# holds the lock only for a few non-blocking syscalls (stat, a non-blocking
# connect probe, rename, unlink: microseconds), so a holder that keeps it
# for 250 ms is not one of ours but some other process (`flock DIR cmd`, a
# backup tool) that may keep it for ever, and no stop may wait on that.
# Skipping is safe: the file left behind is a socket nobody listens on,
# which the next start removes as stale.  The bound is short because the
# stop runs on the loop thread, which handles nothing else meanwhile.
#
# The start-up wait runs in slices of LOCK_SLICE_MS with Python's signal
# handlers run between them: the GIL is released while waiting, so a Ctrl-C
# (or a handler that stops the server) would otherwise wait the whole 10 s.
cdef enum:
    START_LOCK_WAIT_MS = 10000
    STOP_LOCK_WAIT_MS = 250
    LOCK_SLICE_MS = 50

_listener_log = _logging.getLogger("unixsrv.listener")


cdef int _lock_dir(bytes dir_path, int timeout_ms, bint run_signal_handlers=False) except -3:
    """flock the directory (see above): the locked fd, -1 when it cannot be
    locked at all (then we go on unlocked), -2 after timeout_ms.  With
    run_signal_handlers, a handler that raises ends the wait with its
    exception (nothing is held then)."""
    cdef const char *p = dir_path
    cdef int fd, slice_ms
    cdef int64_t left_ms
    cdef int64_t deadline = us_now_ns() + <int64_t>timeout_ms * 1000000
    while True:
        left_ms = (max(deadline - us_now_ns(), 0) + 999999) // 1000000  # rounded up: never short
        slice_ms = <int>min(left_ms, <int64_t>LOCK_SLICE_MS) if run_signal_handlers else timeout_ms
        with nogil:
            fd = us_lock_dir(p, slice_ms)
        if fd != -2 or slice_ms >= left_ms:
            return fd
        PyErr_CheckSignals()


def open_listener(object address, object display, int backlog, int mode, long gid,
                  bytes dir_path, bytes base, bytes tmp_name, bint use_proc):
    """Create the listening socket.  Returns (fd, st_dev, st_ino).

    ``address`` is the exact sun_path (a leading NUL means abstract; then only
    ``backlog`` matters and (fd, 0, 0) is returned).  ``dir_path``/``base``
    split the filesystem path; ``tmp_name`` is the random temporary name and
    ``use_proc`` says to reach the directory through /proc/self/fd because
    the directory path plus the temporary name would not fit sun_path.
    """
    cdef int fd = -1, dirfd = -1, lockfd = -1, tries
    cdef stat st
    cdef bint tmp_bound = False
    cdef bytes tmp_addr
    if address[:1] == b"\0":
        return (_listen_abstract(address, backlog), 0, 0)
    dirfd = us_open_dir(dir_path)
    if dirfd < 0:
        raise _oserror(errno, display)
    try:
        lockfd = _lock_dir(dir_path, START_LOCK_WAIT_MS, run_signal_handlers=True)
        if lockfd == -2:
            raise TimeoutError(
                f"another process kept the directory of {display!r} locked for {START_LOCK_WAIT_MS // 1000} s")
        # A name that is obviously taken fails before anything is created.
        if fstatat(dirfd, base, &st, AT_SYMLINK_NOFOLLOW) == 0:
            _examine_existing(dirfd, base, address, display)
        if use_proc:
            tmp_addr = b"/proc/self/fd/%d/%s" % (dirfd, tmp_name)
        else:
            tmp_addr = dir_path + b"/" + tmp_name
        fd = us_socket(1)
        if fd < 0:
            raise _oserror(errno)
        if us_bind(fd, tmp_addr, len(tmp_addr)) < 0:
            raise _oserror(errno, display)
        tmp_bound = True
        # The file is ours: a socket owned by our euid.  Its mode and group
        # are set on exactly this inode (us_set_mode_group), never through a
        # symlink or onto another file swapped in under the same name.
        if (fstatat(dirfd, tmp_name, &st, AT_SYMLINK_NOFOLLOW) < 0
                or not us_is_socket_mode(st.st_mode) or st.st_uid != geteuid()):
            raise _oserror(EEXIST, display)
        if us_set_mode_group(dirfd, tmp_name, st.st_dev, st.st_ino, <mode_t>mode, gid) < 0:
            raise _oserror(errno, display)
        if listen(fd, backlog) < 0:
            raise _oserror(errno, display)
        for tries in range(16):
            if us_rename_noreplace(dirfd, tmp_name, base) == 0:
                tmp_bound = False
                return (fd, st.st_dev, st.st_ino)
            if errno != EEXIST:
                raise _oserror(errno, display)
            _examine_existing(dirfd, base, address, display)
        raise AddressInUseError(display, "the path kept reappearing while a stale socket was removed")
    except BaseException:
        if fd >= 0:
            close(fd)
        if tmp_bound:
            unlinkat(dirfd, tmp_name, 0)
        raise
    finally:
        if lockfd >= 0:
            close(lockfd)      # releases the flock
        close(dirfd)


def _adopted(int fd, dev_t dev, ino_t ino):
    """The "listener factory" of Loop.adopt(): the socket exists already."""
    return (fd, dev, ino)


def unlink_if_same(bytes path, dev_t dev, ino_t ino):
    """Remove the socket file at ``path`` only if it is still the inode we
    created (a successor server may own the path by now).  Call it before
    closing the listener: once closed, the inode number may be reused by a
    successor's socket.  Returns True if the file was removed; False (after a
    WARNING) if another process kept the directory locked (see
    STOP_LOCK_WAIT_MS)."""
    cdef stat st
    cdef int lockfd = _lock_dir(_os.path.dirname(path) or b".", STOP_LOCK_WAIT_MS)
    if lockfd == -2:
        _listener_log.warning(
            "another process kept the directory of %r locked for %d ms: the socket file was left in place"
            " (nothing listens on it; the next start removes it)", _os.fsdecode(path), STOP_LOCK_WAIT_MS)
        return False
    try:
        if lstat(path, &st) < 0:
            return False
        if not us_is_socket_mode(st.st_mode) or st.st_dev != dev or st.st_ino != ino:
            return False
        return unlink(path) == 0
    finally:
        if lockfd >= 0:
            close(lockfd)      # releases the flock
