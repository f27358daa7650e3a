/* gilgate.h - blocking-model handler threads take the GIL back one at a time.
 *
 * A handler whose recv() (or send()) returned has to take the GIL back.  With
 * hundreds of connections, hundreds of them do at once, and each waits in
 * CPython's take_gil(): a timed condition wait that wakes every switch
 * interval (5 ms) to ask the holder to drop the GIL, and whose waiters steal
 * it from the one that was signalled.  At 1,000 echo connections perf found
 * 93% of the server's context switches there, about 8 per request where the
 * recv() wait itself needs one.
 *
 * The gate queues those threads in FIFO order before they ask for the GIL:
 * the first goes on to take_gil(), the others sleep without a timeout, and
 * each one that has the GIL lets the next one go.  So at most one handler of
 * a loop waits inside take_gil() at a time.  The turn is held only between
 * the end of the wait and the GIL, never while Python code runs, so no
 * handler can block the others.
 *
 * On Linux each waiter sleeps on a semaphore on its own stack: sem_post()
 * hands the turn over without the woken thread having to take the gate's
 * mutex again, and glibc's sem_post() no longer touches the semaphore once
 * the waiter can return, so it may destroy it at once (sem_destroy(3)).
 * Elsewhere (macOS has no unnamed semaphores) a condition variable per
 * waiter, signalled under the mutex.  A free-threaded CPython has no GIL to
 * queue for: there the gate does nothing.
 */
#ifndef UNIXSRV_GILGATE_H
#define UNIXSRV_GILGATE_H

#include <pthread.h>
#if defined(__linux__)
#include <semaphore.h>
#endif

typedef struct us_gate_waiter {
    struct us_gate_waiter *next;
#if defined(__linux__)
    sem_t sem;
#else
    pthread_cond_t cv;
    int go;
#endif
} us_gate_waiter;

typedef struct {
    pthread_mutex_t mu;
    int busy;                     /* a thread has the turn */
    us_gate_waiter *head, *tail;  /* the others, in arrival order */
} us_gate;

static inline void us_gate_init(us_gate *g) {
    pthread_mutex_init(&g->mu, NULL);
    g->busy = 0;
    g->head = g->tail = NULL;
}

static inline void us_gate_destroy(us_gate *g) {
    pthread_mutex_destroy(&g->mu);
}

/* Without the GIL: wait for our turn to take it. */
static inline void us_gate_enter(us_gate *g) {
#ifndef Py_GIL_DISABLED
    us_gate_waiter w;
    pthread_mutex_lock(&g->mu);
    if (!g->busy) {
        g->busy = 1;
        pthread_mutex_unlock(&g->mu);
        return;
    }
    w.next = NULL;
#if defined(__linux__)
    sem_init(&w.sem, 0, 0);
#else
    pthread_cond_init(&w.cv, NULL);
    w.go = 0;
#endif
    if (g->tail != NULL)
        g->tail->next = &w;
    else
        g->head = &w;
    g->tail = &w;
#if defined(__linux__)
    pthread_mutex_unlock(&g->mu);
    while (sem_wait(&w.sem) != 0) {
        /* EINTR: a signal handler ran in this thread; wait on */
    }
    sem_destroy(&w.sem);
#else
    while (!w.go)
        pthread_cond_wait(&w.cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
    pthread_cond_destroy(&w.cv);
#endif
#else
    (void)g;
#endif
}

/* With the GIL, just taken back: pass the turn to the next waiter (the gate
 * stays busy), or free it. */
static inline void us_gate_leave(us_gate *g) {
#ifndef Py_GIL_DISABLED
    us_gate_waiter *w;
    pthread_mutex_lock(&g->mu);
    w = g->head;
    if (w == NULL) {
        g->busy = 0;
        pthread_mutex_unlock(&g->mu);
        return;
    }
    g->head = w->next;
    if (g->head == NULL)
        g->tail = NULL;
#if defined(__linux__)
    pthread_mutex_unlock(&g->mu);
    sem_post(&w->sem);
#else
    w->go = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&g->mu);
#endif
#else
    (void)g;
#endif
}

#endif
