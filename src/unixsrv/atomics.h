/* atomics.h - the few atomic operations the core needs, as static inline C.
 *
 * Counters are written by the loop thread and by worker threads and read by
 * any thread (Server.stats()), so every access goes through the GCC/Clang
 * __atomic builtins.  Counters only need to be exact, not ordered with other
 * memory, so they use relaxed ordering; the connection "uses" count guards an
 * fd's lifetime and therefore uses acquire/release.
 */
#ifndef UNIXSRV_ATOMICS_H
#define UNIXSRV_ATOMICS_H

#include <stdint.h>

static inline void us_add_u64(uint64_t *p, uint64_t v) {
    __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

static inline uint64_t us_load_u64(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline int64_t us_load_i64(const int64_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void us_store_i64(int64_t *p, int64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

/* The closed counter publishes "this connection was accepted and is done":
 * a reader that loads it with acquire ordering and then loads the accepted
 * counter sees at least as many accepts as closes (every close follows its
 * accept through the hand-over of the connection), so accepted - closed is
 * never negative. */
static inline void us_add_u64_release(uint64_t *p, uint64_t v) {
    __atomic_fetch_add(p, v, __ATOMIC_RELEASE);
}

static inline uint64_t us_load_u64_acquire(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

/* Connection state bits are set by one thread and tested by others. */
static inline uint32_t us_or_u32(uint32_t *p, uint32_t bits) {
    return __atomic_fetch_or(p, bits, __ATOMIC_ACQ_REL);
}

static inline uint32_t us_load_u32(const uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline int32_t us_load_i32(const int32_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

/* Take one more use of a connection's fd unless it already dropped to zero
 * (then the fd is closed, or about to be, and must not be touched). */
static inline int us_use_acquire(int32_t *uses) {
    int32_t cur = __atomic_load_n(uses, __ATOMIC_ACQUIRE);
    while (cur > 0) {
        if (__atomic_compare_exchange_n(uses, &cur, cur + 1, 1,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return 1;
    }
    return 0;
}

/* Drop one use; returns 1 when this was the last one (the caller closes). */
static inline int us_use_release(int32_t *uses) {
    return __atomic_sub_fetch(uses, 1, __ATOMIC_ACQ_REL) == 0;
}

#endif /* UNIXSRV_ATOMICS_H */
