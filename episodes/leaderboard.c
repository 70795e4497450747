/*
 * leaderboard.c — the leaderboard of leaderboard.h: one read-only query over
 * episodes ⋈ policies ⟕ submissions, aggregated here (SQLite has no
 * standard deviation), and the table printer behind `fmx leaderboard`.
 */
#define _GNU_SOURCE
#include "leaderboard.h"

#include <math.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>

#include "env/status.h"

struct fmx_leaderboard {
    fmx_leaderboard_row *rows;
    int n, cap;
    char **strings; /* owned policy and task names the rows point into */
    int nstrings, capstrings;
};

/* Running sums of one row. */
typedef struct {
    double reward, reward2, loc, steps, compile;
} fmx__sums;

/* One episode of the query. The last submission of the episode is the graded one. */
static const char fmx__query[] =
    "SELECT p.name, e.task_id, e.status, e.reward, e.steps, s.correctness, s.loc, "
    "       s.compile_score "
    "FROM episodes e JOIN policies p ON p.id = e.policy_id "
    "LEFT JOIN submissions s ON s.id = (SELECT max(id) FROM submissions WHERE episode = e.id) "
    "WHERE ?1 IS NULL OR p.name = ?1 "
    "ORDER BY p.name, e.task_id";

static char *fmx__keep(fmx_leaderboard *lb, const char *s) {
    if (lb->nstrings == lb->capstrings) {
        int cap = lb->capstrings ? 2 * lb->capstrings : 64;
        char **g = realloc(lb->strings, (size_t)cap * sizeof *g);
        if (!g) return NULL;
        lb->strings = g;
        lb->capstrings = cap;
    }
    char *d = strdup(s ? s : "");
    if (d) lb->strings[lb->nstrings++] = d;
    return d;
}

static fmx_leaderboard_row *fmx__row(fmx_leaderboard *lb, fmx__sums **sums, const char *policy,
                                     const char *task) {
    if (lb->n == lb->cap) {
        int cap = lb->cap ? 2 * lb->cap : 64;
        fmx_leaderboard_row *g = realloc(lb->rows, (size_t)cap * sizeof *g);
        fmx__sums *s = realloc(*sums, (size_t)cap * sizeof *s);
        if (g) lb->rows = g;
        if (s) *sums = s;
        if (!g || !s) return NULL;
        lb->cap = cap;
    }
    fmx_leaderboard_row *r = &lb->rows[lb->n];
    memset(r, 0, sizeof *r);
    memset(&(*sums)[lb->n], 0, sizeof **sums);
    r->policy = policy;
    r->task = task;
    lb->n++;
    return r;
}

static void fmx__add(fmx_leaderboard_row *r, fmx__sums *s, sqlite3_stmt *st) {
    const char *status = (const char *)sqlite3_column_text(st, 2);
    if (!status || (strcmp(status, "submitted") != 0 && strcmp(status, "truncated") != 0)) {
        r->unfinished++;
        return;
    }
    double reward = sqlite3_column_double(st, 3); /* NULL reads as 0 */
    r->episodes++;
    s->reward += reward;
    s->reward2 += reward * reward;
    s->steps += (double)sqlite3_column_int64(st, 4);
    if (sqlite3_column_type(st, 5) != SQLITE_NULL) {
        r->graded++;
        r->passed += sqlite3_column_double(st, 5) >= 1.0;
        s->loc += (double)sqlite3_column_int64(st, 6);
        s->compile += sqlite3_column_double(st, 7);
    }
}

static void fmx__finish(fmx_leaderboard_row *r, const fmx__sums *s) {
    double n = (double)r->episodes;
    if (n > 0) {
        r->pass_rate = (double)r->passed / n;
        r->reward_mean = s->reward / n;
        r->steps_mean = s->steps / n;
        double var = n > 1 ? (s->reward2 - n * r->reward_mean * r->reward_mean) / (n - 1) : 0;
        r->reward_sd = var > 0 ? sqrt(var) : 0;
    }
    r->loc_mean = r->graded ? s->loc / (double)r->graded : NAN;
    r->compile_mean = r->graded ? s->compile / (double)r->graded : NAN;
}

/* Total rows: best mean reward first, then by name. */
static int fmx__cmp_total(const void *pa, const void *pb) {
    const fmx_leaderboard_row *a = pa, *b = pb;
    if (a->reward_mean != b->reward_mean) return a->reward_mean > b->reward_mean ? -1 : 1;
    return strcmp(a->policy, b->policy);
}

/* Orders the rows: policies ranked (fmx__cmp_total), each policy's total
 * row followed by its task rows, which the query left contiguous and in
 * task order. */
static int fmx__rank(fmx_leaderboard *lb) {
    size_t n = (size_t)lb->n;
    fmx_leaderboard_row *totals = malloc((n ? n : 1) * sizeof *totals);
    fmx_leaderboard_row *out = malloc((n ? n : 1) * sizeof *out);
    if (!totals || !out) {
        free(totals);
        free(out);
        return FMX_ENOMEM;
    }
    size_t nt = 0, k = 0;
    for (size_t i = 0; i < n; i++)
        if (!lb->rows[i].task) totals[nt++] = lb->rows[i];
    qsort(totals, nt, sizeof *totals, fmx__cmp_total);
    for (size_t t = 0; t < nt; t++) {
        size_t i = 0;
        while (lb->rows[i].task || lb->rows[i].policy != totals[t].policy)
            i++;
        out[k++] = lb->rows[i];
        for (i++; i < n && lb->rows[i].task; i++)
            out[k++] = lb->rows[i];
    }
    free(totals);
    free(lb->rows);
    lb->rows = out;
    lb->cap = lb->n;
    return FMX_OK;
}

int fmx_leaderboard_open(const char *db_path, const char *policy, fmx_leaderboard **out, char *err,
                         size_t errsz) {
    *out = NULL;
    if (!db_path) {
        snprintf(err, errsz, "no episode log given");
        return FMX_EINVAL;
    }
    sqlite3 *db = NULL;
    int rc = sqlite3_open_v2(db_path, &db, SQLITE_OPEN_READONLY, NULL);
    if (rc != SQLITE_OK) {
        snprintf(err, errsz, "%s: cannot open: %s", db_path,
                 db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
        sqlite3_close(db);
        return FMX_EIO;
    }
    sqlite3_busy_timeout(db, 5000);
    sqlite3_stmt *st = NULL;
    rc = sqlite3_prepare_v2(db, fmx__query, -1, &st, NULL);
    if (rc != SQLITE_OK) {
        const char *why = sqlite3_errmsg(db);
        int format =
            strstr(why, "no such table") || strstr(why, "no such column") || rc == SQLITE_NOTADB;
        snprintf(err, errsz, "%s: %s%s", db_path, why, format ? " (not an fmx episode log)" : "");
        sqlite3_close(db);
        return format ? FMX_EFORMAT : FMX_EIO;
    }
    if (policy) sqlite3_bind_text(st, 1, policy, -1, SQLITE_STATIC);

    fmx_leaderboard *lb = calloc(1, sizeof *lb);
    fmx__sums *sums = NULL;
    int status = lb ? FMX_OK : FMX_ENOMEM;
    int total = -1, cur = -1; /* rows of the current policy and (policy, task) */
    while (status == FMX_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *p = (const char *)sqlite3_column_text(st, 0);
        const char *t = (const char *)sqlite3_column_text(st, 1);
        p = p ? p : "";
        t = t ? t : "";
        if (total < 0 || strcmp(lb->rows[total].policy, p) != 0) {
            char *name = fmx__keep(lb, p);
            if (!name || !fmx__row(lb, &sums, name, NULL)) {
                status = FMX_ENOMEM;
                break;
            }
            total = lb->n - 1;
            cur = -1;
        }
        if (cur < 0 || strcmp(lb->rows[cur].task, t) != 0) {
            char *task = fmx__keep(lb, t);
            if (!task || !fmx__row(lb, &sums, lb->rows[total].policy, task)) {
                status = FMX_ENOMEM;
                break;
            }
            cur = lb->n - 1;
        }
        fmx__add(&lb->rows[total], &sums[total], st);
        fmx__add(&lb->rows[cur], &sums[cur], st);
    }
    if (status == FMX_OK && rc != SQLITE_DONE) {
        snprintf(err, errsz, "%s: %s", db_path, sqlite3_errmsg(db));
        status = rc == SQLITE_NOTADB ? FMX_EFORMAT : FMX_EIO;
    }
    if (status == FMX_ENOMEM) snprintf(err, errsz, "out of memory");
    sqlite3_finalize(st);
    sqlite3_close(db);
    if (status != FMX_OK) {
        free(sums);
        fmx_leaderboard_close(lb);
        return status;
    }
    for (int i = 0; i < lb->n; i++)
        fmx__finish(&lb->rows[i], &sums[i]);
    free(sums);
    if (fmx__rank(lb) != FMX_OK) {
        fmx_leaderboard_close(lb);
        snprintf(err, errsz, "out of memory");
        return FMX_ENOMEM;
    }
    *out = lb;
    return FMX_OK;
}

void fmx_leaderboard_close(fmx_leaderboard *lb) {
    if (!lb) return;
    for (int i = 0; i < lb->nstrings; i++)
        free(lb->strings[i]);
    free(lb->strings);
    free(lb->rows);
    free(lb);
}

int fmx_leaderboard_count(const fmx_leaderboard *lb) {
    return lb ? lb->n : 0;
}

const fmx_leaderboard_row *fmx_leaderboard_row_at(const fmx_leaderboard *lb, int i) {
    return lb && i >= 0 && i < lb->n ? &lb->rows[i] : NULL;
}

/* ---- the table ---- */

/* Prints s padded to w display columns (UTF-8: continuation bytes take none). */
static void fmx__cell(FILE *f, const char *s, int w, int right) {
    int cols = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        cols += (*p & 0xC0) != 0x80;
    if (right)
        fprintf(f, "%*s%s", w > cols ? w - cols : 0, "", s);
    else
        fprintf(f, "%s%*s", s, w > cols ? w - cols : 0, "");
}

/* Column widths: label, policy, then the numbers. */
enum { FMX__W_EP = 8, FMX__W_PASS = 6, FMX__W_REWARD = 19, FMX__W_LOC = 7, FMX__W_STEPS = 7 };

static void fmx__line(FILE *f, int lw, int pw, const char *label, const char *policy,
                      const char *eps, const char *pass, const char *reward, const char *loc,
                      const char *steps, const char *compile) {
    fmx__cell(f, label, lw, 0);
    fputs("  ", f);
    fmx__cell(f, policy, pw, 0);
    fmx__cell(f, eps, FMX__W_EP + 1, 1);
    fmx__cell(f, pass, FMX__W_PASS + 1, 1);
    fmx__cell(f, reward, FMX__W_REWARD + 2, 1);
    fmx__cell(f, loc, FMX__W_LOC + 1, 1);
    fmx__cell(f, steps, FMX__W_STEPS + 1, 1);
    fmx__cell(f, compile, 9, 1);
    fputc('\n', f);
}

static void fmx__print_row(FILE *f, const fmx_leaderboard_row *r, const char *label, int lw,
                           int pw) {
    char eps[32], pass[16], reward[64], loc[32], steps[32], compile[32];
    snprintf(eps, sizeof eps, "%lld", (long long)r->episodes);
    snprintf(pass, sizeof pass, "%.0f%%", 100 * r->pass_rate);
    snprintf(reward, sizeof reward, "%.3f \u00b1 %.3f", r->reward_mean, r->reward_sd);
    snprintf(loc, sizeof loc, isnan(r->loc_mean) ? "-" : "%.1f", r->loc_mean);
    snprintf(steps, sizeof steps, "%.1f", r->steps_mean);
    snprintf(compile, sizeof compile, isnan(r->compile_mean) ? "-" : "%.2f", r->compile_mean);
    fmx__line(f, lw, pw, label, r->policy, eps, pass, reward, loc, steps, compile);
}

static void fmx__header(FILE *f, int lw, int pw, const char *label) {
    fmx__line(f, lw, pw, label, "policy", "episodes", "pass", "reward (mean \u00b1 sd)", "loc",
              "steps", "compile");
}

void fmx_leaderboard_print(FILE *f, const fmx_leaderboard *lb) {
    if (!lb || lb->n == 0) {
        fprintf(f, "no episodes in the log yet\n");
        return;
    }
    int pw = 6, tw = 4;
    for (int i = 0; i < lb->n; i++) {
        int lp = (int)strlen(lb->rows[i].policy);
        int lt = lb->rows[i].task ? (int)strlen(lb->rows[i].task) : 0;
        pw = lp > pw ? lp : pw;
        tw = lt > tw ? lt : tw;
    }
    fmx__header(f, tw, pw, "rank");
    int rank = 0;
    int64_t unfinished = 0;
    for (int i = 0; i < lb->n; i++) {
        if (lb->rows[i].task) continue;
        char label[16];
        snprintf(label, sizeof label, "%d", ++rank);
        fmx__print_row(f, &lb->rows[i], label, tw, pw);
        unfinished += lb->rows[i].unfinished;
    }
    /* Policy × task, grouped by task; within a task the policies keep their rank. */
    fputc('\n', f);
    fmx__header(f, tw, pw, "task");
    const char *prev = NULL;
    for (;;) {
        const char *next = NULL; /* the smallest task name after prev */
        for (int i = 0; i < lb->n; i++) {
            const char *t = lb->rows[i].task;
            if (t && (!prev || strcmp(t, prev) > 0) && (!next || strcmp(t, next) < 0)) next = t;
        }
        if (!next) break;
        for (int i = 0; i < lb->n; i++)
            if (lb->rows[i].task && strcmp(lb->rows[i].task, next) == 0)
                fmx__print_row(f, &lb->rows[i], next, tw, pw);
        prev = next;
    }
    fprintf(f, "\nepisodes: submitted or truncated; pass: correctness 1 (every probe, hidden "
               "included); loc and compile: means over graded submissions");
    if (unfinished)
        fprintf(f, "; %lld aborted, closed or open episodes not counted", (long long)unfinished);
    fprintf(f, "\n");
}

static const char fmx__usage[] =
    "usage: fmx leaderboard --db FILE [--policy NAME]\n"
    "  --db FILE       the episode log (SQLite) a server wrote (fmx serve --db)\n"
    "  --policy NAME   only this policy's episodes\n";

int fmx_leaderboard_main(int argc, char **argv) {
    const char *db = NULL, *policy = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            fputs(fmx__usage, stdout);
            return 0;
        }
        if ((strcmp(a, "--db") == 0 || strcmp(a, "--policy") == 0) && i + 1 < argc) {
            if (a[2] == 'd')
                db = argv[++i];
            else
                policy = argv[++i];
        } else {
            fprintf(stderr, "fmx leaderboard: bad argument '%s'\n\n%s", a, fmx__usage);
            return 2;
        }
    }
    if (!db) {
        fprintf(stderr, "fmx leaderboard: --db FILE is required\n\n%s", fmx__usage);
        return 2;
    }
    char err[1024];
    fmx_leaderboard *lb = NULL;
    if (fmx_leaderboard_open(db, policy, &lb, err, sizeof err) != FMX_OK) {
        fprintf(stderr, "fmx leaderboard: %s\n", err);
        return 2;
    }
    fmx_leaderboard_print(stdout, lb);
    fmx_leaderboard_close(lb);
    return 0;
}
