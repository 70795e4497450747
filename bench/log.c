/*
 * bench/log.c — how fast the episode log takes steps. Logs N steps (default
 * 100,000) spread over 16 open episodes, in batches of B (default 64) steps
 * per transaction, as the server does for the requests of one loop turn, with
 * an observation of about 1 KiB of JSON per step. Prints steps/s, commits/s
 * and the median and worst commit time. The target is >= 20,000 steps/s with
 * synchronous=FULL on the disk the log lives on.
 * Usage: bench_log [--steps N] [--batch B] [--obs BYTES] [PATH]
 * PATH (default /tmp/fmx_bench_log.db) is deleted first and left behind.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "episodes/log.h"
#include "status.h"

enum { EPISODES = 16 };

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void remove_db(const char *path) {
    char p[1100];
    const char *suffix[] = {"", "-wal", "-shm"};
    for (int i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "%s%s", path, suffix[i]);
        unlink(p);
    }
}

int main(int argc, char **argv) {
    long n_steps = 100000, batch = 64, obs_bytes = 1024;
    const char *path = "/tmp/fmx_bench_log.db";
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc)
            n_steps = atol(argv[++i]);
        else if (strcmp(argv[i], "--batch") == 0 && i + 1 < argc)
            batch = atol(argv[++i]);
        else if (strcmp(argv[i], "--obs") == 0 && i + 1 < argc)
            obs_bytes = atol(argv[++i]);
        else if (argv[i][0] != '-')
            path = argv[i];
        else {
            fprintf(stderr, "usage: bench_log [--steps N] [--batch B] [--obs BYTES] [PATH]\n");
            return 2;
        }
    }
    if (n_steps <= 0 || batch <= 0 || obs_bytes < 64 || strlen(path) > 1000) {
        fprintf(stderr, "bench_log: bad arguments\n");
        return 2;
    }
    remove_db(path);

    fmx_log *log = NULL;
    char err[512];
    int st = fmx_log_open(path, &log, err, sizeof err);
    if (st) {
        fprintf(stderr, "bench_log: %s\n", err);
        return 1;
    }
    int64_t pol = 0, ep[EPISODES], idx[EPISODES] = {0};
    if (fmx_log_task(log, "bench/Task", "component", "bench", "model.layers.0", "Task", 20) ||
        fmx_log_policy(log, "bench", &pol)) {
        fprintf(stderr, "bench_log: %s\n", fmx_log_errmsg(log));
        return 1;
    }
    for (int e = 0; e < EPISODES; e++)
        if (fmx_log_episode_begin(log, "bench/Task", pol, e, &ep[e])) {
            fprintf(stderr, "bench_log: %s\n", fmx_log_errmsg(log));
            return 1;
        }

    /* An observation of obs_bytes: {"tool":..,"text":"xxxx…","data":{}} */
    char *obs = malloc((size_t)obs_bytes + 1);
    if (!obs) return 1;
    int head = snprintf(obs, (size_t)obs_bytes + 1, "{\"tool\":\"trace_ops\",\"text\":\"");
    memset(obs + head, 'x', (size_t)obs_bytes - (size_t)head);
    strcpy(obs + obs_bytes - 12, "\",\"data\":{}}");

    long n_commits = (n_steps + batch - 1) / batch;
    double *commit_s = malloc((size_t)n_commits * sizeof *commit_s);
    if (!commit_s) return 1;
    fmx_step_record s;
    memset(&s, 0, sizeof s);
    s.tool = "trace_ops";
    s.args = "{\"path\":\"model.layers.0.self_attn\"}";
    s.observation = obs;
    s.ms = 0.25;

    double t0 = now_s();
    long done = 0, c = 0;
    while (done < n_steps) {
        if ((st = fmx_log_begin(log))) break;
        for (long k = 0; k < batch && done < n_steps; k++, done++) {
            int e = (int)(done % EPISODES);
            s.episode = ep[e];
            s.idx = idx[e]++;
            s.started_at = 1.7e9 + done;
            if ((st = fmx_log_step(log, &s))) break;
        }
        if (st) break;
        double tc = now_s();
        if ((st = fmx_log_commit(log))) break;
        commit_s[c++] = now_s() - tc;
    }
    double dt = now_s() - t0;
    if (st) {
        fprintf(stderr, "bench_log: %s: %s\n", fmx_strerror(st), fmx_log_errmsg(log));
        return 1;
    }
    qsort(commit_s, (size_t)c, sizeof *commit_s, cmp_double);
    printf("log %s: %ld steps (%ld-byte observations) in batches of %ld\n", path, done, obs_bytes,
           batch);
    printf("  %.0f steps/s, %.0f commits/s, %.3f s total\n", done / dt, c / dt, dt);
    printf("  commit ms: median %.3f, max %.3f\n", 1e3 * commit_s[c / 2], 1e3 * commit_s[c - 1]);
    fmx_log_close(log);
    free(commit_s);
    free(obs);
    return 0;
}
