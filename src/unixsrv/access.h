/* access.h - who may connect: allow-list lookups, the peer's supplementary
 * groups, and the per-uid count of open connections.
 *
 * Everything here runs on the accept path without the GIL (see
 * Loop._accept_batch in _loop.pxi), so a denied peer costs an accept, one or
 * two getsockopt calls and a close, and never reaches Python code.
 */
#ifndef UNIXSRV_ACCESS_H
#define UNIXSRV_ACCESS_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/socket.h>
#if defined(__APPLE__)
#include <sys/un.h>
#include <sys/ucred.h>
#endif

/* Is x in the ascending array a[0..n)?  (The lists are sorted and
 * de-duplicated in Python when the config is built.) */
static inline int us_id_listed(const uint32_t *a, size_t n, uint32_t x) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (a[mid] < x) lo = mid + 1;
        else hi = mid;
    }
    return lo < n && a[lo] == x;
}

/* Is one of the supplementary groups the peer on fd had when it connected in
 * gids[0..n)?  1 yes, 0 no, -1 when they cannot be read (the caller denies).
 *
 * Linux: SO_PEERGROUPS (socket(7), since 4.13) returns the groups as gid_t;
 * when the buffer is too small it fails with ERANGE and sets the length it
 * needs, so a peer with many groups costs one more call and an allocation.
 * macOS: LOCAL_PEERCRED gives a struct xucred (unix(4)) whose cr_groups hold
 * the effective gid and at most NGROUPS - 1 (15) supplementary groups. */
static inline int us_peer_group_listed(int fd, const uint32_t *gids, size_t n) {
#if defined(SO_PEERGROUPS)
    gid_t small[64];
    gid_t *buf = small;
    socklen_t len = sizeof(small);
    size_t i, count;
    int found = 0;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, buf, &len) < 0) {
        if (errno != ERANGE || len == 0) return -1;
        buf = (gid_t *)malloc(len);
        if (buf == NULL) return -1;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, buf, &len) < 0) {
            free(buf);
            return -1;
        }
    }
    count = len / sizeof(gid_t);
    for (i = 0; i < count && !found; i++)
        found = us_id_listed(gids, n, (uint32_t)buf[i]);
    if (buf != small) free(buf);
    return found;
#elif defined(__APPLE__) && defined(LOCAL_PEERCRED)
    struct xucred xu;
    socklen_t len = sizeof(xu);
    int i;
    if (getsockopt(fd, SOL_LOCAL, LOCAL_PEERCRED, &xu, &len) < 0) return -1;
    if (xu.cr_version != XUCRED_VERSION) {
        errno = EINVAL;
        return -1;
    }
    for (i = 0; i < xu.cr_ngroups && i < NGROUPS; i++)
        if (us_id_listed(gids, n, (uint32_t)xu.cr_groups[i])) return 1;
    return 0;
#else
    (void)fd; (void)gids; (void)n;
    errno = ENOSYS;
    return -1;
#endif
}

/* Open connections per uid: an open-addressing table (linear probing, a
 * power-of-two capacity) of uid -> count.  A slot whose count drops to zero
 * stays until the next rehash drops it, so a lookup never meets a hole it
 * must not stop at.  The caller serialises access (Loop.uid_mu). */
#define US_UID_EMPTY 0xFFFFFFFFu   /* (uid_t)-1 is never a real uid (setreuid(2)) */

typedef struct {
    uint32_t uid;
    uint32_t n;
} us_uid_slot;

typedef struct {
    us_uid_slot *slots;
    size_t cap;
    size_t used;   /* slots holding a uid, counts of zero included */
} us_uid_counts;

static inline size_t us_uid_hash(uint32_t uid, size_t cap) {
    return (size_t)((uid * 2654435761u) & (cap - 1));   /* Knuth's multiplicative hash */
}

static inline us_uid_slot *us_uid_find(us_uid_counts *t, uint32_t uid) {
    size_t i;
    if (t->cap == 0) return NULL;
    for (i = us_uid_hash(uid, t->cap); t->slots[i].uid != US_UID_EMPTY; i = (i + 1) & (t->cap - 1))
        if (t->slots[i].uid == uid) return &t->slots[i];
    return NULL;
}

/* Rebuild with room for twice the live uids (at least 16 slots); -1 on ENOMEM
 * (the old table stays). */
static inline int us_uid_rehash(us_uid_counts *t) {
    size_t live = 0, cap = 16, i, j;
    us_uid_slot *slots;
    for (i = 0; i < t->cap; i++)
        if (t->slots[i].uid != US_UID_EMPTY && t->slots[i].n > 0) live++;
    while (cap < 4 * (live + 1)) cap *= 2;
    slots = (us_uid_slot *)malloc(cap * sizeof(us_uid_slot));
    if (slots == NULL) return -1;
    memset(slots, 0xFF, cap * sizeof(us_uid_slot));
    for (i = 0; i < t->cap; i++) {
        if (t->slots[i].uid == US_UID_EMPTY || t->slots[i].n == 0) continue;
        for (j = us_uid_hash(t->slots[i].uid, cap); slots[j].uid != US_UID_EMPTY; j = (j + 1) & (cap - 1))
            ;
        slots[j] = t->slots[i];
    }
    free(t->slots);
    t->slots = slots;
    t->cap = cap;
    t->used = live;
    return 0;
}

/* Count one more open connection of uid unless it already has `limit`:
 * 1 taken, 0 over the limit, -1 on ENOMEM (the caller refuses the peer). */
static inline int us_uid_take(us_uid_counts *t, uint32_t uid, uint32_t limit) {
    us_uid_slot *s = us_uid_find(t, uid);
    size_t i;
    if (s == NULL) {
        if (2 * (t->used + 1) > t->cap && us_uid_rehash(t) < 0) return -1;
        for (i = us_uid_hash(uid, t->cap); t->slots[i].uid != US_UID_EMPTY; i = (i + 1) & (t->cap - 1))
            ;
        s = &t->slots[i];
        s->uid = uid;
        s->n = 0;
        t->used++;
    }
    if (s->n >= limit) return 0;
    s->n++;
    return 1;
}

/* One connection of uid closed (it was counted by us_uid_take). */
static inline void us_uid_put(us_uid_counts *t, uint32_t uid) {
    us_uid_slot *s = us_uid_find(t, uid);
    if (s != NULL && s->n > 0) s->n--;
}

static inline void us_uid_counts_free(us_uid_counts *t) {
    free(t->slots);
    t->slots = NULL;
    t->cap = t->used = 0;
}

#endif /* UNIXSRV_ACCESS_H */
