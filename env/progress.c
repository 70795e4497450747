/*
 * progress.c — the progress line of progress.h.
 */
#define _GNU_SOURCE
#include "progress.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct fmx_progress {
    char what[64];
    int total, done, tty, quiet, last_tenth;
    double t0;
    pthread_mutex_t lock;
};

static double fmx__progress_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

fmx_progress *fmx_progress_create(const char *what, int total, int quiet) {
    fmx_progress *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    snprintf(p->what, sizeof p->what, "%s", what ? what : "items");
    p->total = total;
    p->quiet = quiet || total <= 0;
    p->tty = isatty(STDERR_FILENO);
    p->t0 = fmx__progress_now();
    pthread_mutex_init(&p->lock, NULL);
    return p;
}

void fmx_progress_step(fmx_progress *p, const char *item) {
    if (!p) return;
    pthread_mutex_lock(&p->lock);
    p->done++;
    double secs = fmx__progress_now() - p->t0;
    if (p->quiet) {
    } else if (p->tty) {
        fprintf(stderr, "\r\033[K%s %d/%d  %.1f s%s%.60s", p->what, p->done, p->total, secs,
                item ? "  " : "", item ? item : "");
        fflush(stderr);
    } else {
        int tenth = (int)((long long)p->done * 10 / p->total);
        if (tenth > p->last_tenth || p->done == p->total) {
            fprintf(stderr, "%s %d/%d (%d%%), %.1f s\n", p->what, p->done, p->total,
                    (int)((long long)p->done * 100 / p->total), secs);
            p->last_tenth = tenth;
        }
    }
    pthread_mutex_unlock(&p->lock);
}

void fmx_progress_destroy(fmx_progress *p) {
    if (!p) return;
    if (!p->quiet && p->tty && p->done > 0) fputc('\n', stderr);
    pthread_mutex_destroy(&p->lock);
    free(p);
}
