/*
 * leaderboard.c — the leaderboard of leaderboard.h: one read-only query over
 * episodes ⋈ policies ⟕ submissions, aggregated here (SQLite has no
 * standard deviation), the table printer behind `fmx leaderboard`, and its
 * HTML page (`--html FILE`: the same tables and two SVG charts drawn here,
 * no external assets).
 */
#define _GNU_SOURCE
#include "leaderboard.h"

#include <errno.h>
#include <math.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "env/status.h"

/* One episode of the query, for the charts. */
typedef struct {
    const char *policy, *task; /* the rows' strings */
    int finished;              /* submitted or truncated */
    double reward;             /* finished: the episode's reward (NULL read as 0) */
    int graded;                /* has a graded submission */
    double correctness;
    int64_t loc;
} fmx__point;

struct fmx_leaderboard {
    fmx_leaderboard_row *rows;
    int n, cap;
    char **strings; /* owned policy and task names the rows point into */
    int nstrings, capstrings;
    fmx__point *points; /* every episode read, in query order */
    int npoints, cappoints;
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

/* The same under reward version ?2: an episode's last submission scored by
 * its grade under ?2 (fmx regrade; a rerun preferred, then the newest), or
 * by the server when it graded under ?2; an episode graded under neither is
 * not counted ('ungraded'). Episodes without a submission keep their reward. */
static const char fmx__query_version[] =
    "SELECT p.name, e.task_id, "
    "       CASE WHEN s.id IS NULL OR g.id IS NOT NULL OR s.reward_version = ?2 THEN e.status "
    "            ELSE 'ungraded' END, "
    "       CASE WHEN g.id IS NOT NULL THEN g.reward ELSE e.reward END, e.steps, "
    "       coalesce(g.correctness, s.correctness), coalesce(g.loc, s.loc), "
    "       coalesce(g.compile_score, s.compile_score) "
    "FROM episodes e JOIN policies p ON p.id = e.policy_id "
    "LEFT JOIN submissions s ON s.id = (SELECT max(id) FROM submissions WHERE episode = e.id) "
    "LEFT JOIN grades g ON g.id = (SELECT id FROM grades WHERE submission = s.id AND "
    "       reward_version = ?2 ORDER BY rerun DESC, created_at DESC LIMIT 1) "
    "WHERE ?1 IS NULL OR p.name = ?1 "
    "ORDER BY p.name, e.task_id";

/* A log no regrade touched has no grades table: the version query reads none. */
static const char fmx__no_grades[] =
    "CREATE TEMP TABLE IF NOT EXISTS grades (id INTEGER PRIMARY KEY, submission INTEGER, "
    "reward_version TEXT, rerun INTEGER, correctness REAL, loc INTEGER, compile_score REAL, "
    "reward REAL, created_at REAL)";

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

static int fmx__add_point(fmx_leaderboard *lb, const char *policy, const char *task,
                          sqlite3_stmt *st) {
    if (lb->npoints == lb->cappoints) {
        int cap = lb->cappoints ? 2 * lb->cappoints : 256;
        fmx__point *g = realloc(lb->points, (size_t)cap * sizeof *g);
        if (!g) return FMX_ENOMEM;
        lb->points = g;
        lb->cappoints = cap;
    }
    const char *status = (const char *)sqlite3_column_text(st, 2);
    fmx__point *p = &lb->points[lb->npoints++];
    p->policy = policy;
    p->task = task;
    p->finished = status && (strcmp(status, "submitted") == 0 || strcmp(status, "truncated") == 0);
    p->reward = sqlite3_column_double(st, 3);
    p->graded = sqlite3_column_type(st, 5) != SQLITE_NULL;
    p->correctness = sqlite3_column_double(st, 5);
    p->loc = sqlite3_column_int64(st, 6);
    return FMX_OK;
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

/* 1 if the log has a grades table (fmx regrade made one). */
static int fmx__has_grades(sqlite3 *db) {
    sqlite3_stmt *st = NULL;
    int has = sqlite3_prepare_v2(db,
                                 "SELECT 1 FROM main.sqlite_master WHERE type = 'table' AND "
                                 "name = 'grades'",
                                 -1, &st, NULL) == SQLITE_OK &&
              sqlite3_step(st) == SQLITE_ROW;
    sqlite3_finalize(st);
    return has;
}

/* Prints the reward versions the log's grades are under, the server's (in
 * submissions) and fmx regrade's (in grades), and how to rank by each: when
 * the log has regrades or one is shown. */
static void fmx__print_versions(FILE *f, const char *db_path, const char *shown) {
    sqlite3 *db = NULL;
    if (sqlite3_open_v2(db_path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
        sqlite3_close(db);
        return;
    }
    if (!shown && !fmx__has_grades(db)) { /* no regrade: the server's rewards, nothing to pick */
        sqlite3_close(db);
        return;
    }
    const char *sql = fmx__has_grades(db)
                          ? "SELECT reward_version, 'server', count(*) FROM submissions GROUP BY 1 "
                            "UNION ALL SELECT reward_version, CASE max(rerun) WHEN 1 THEN "
                            "'fmx regrade --rerun' ELSE 'fmx regrade' END, count(*) FROM grades "
                            "GROUP BY 1 ORDER BY 2 DESC, 1"
                          : "SELECT reward_version, 'server', count(*) FROM submissions GROUP BY 1 "
                            "ORDER BY 1";
    sqlite3_stmt *st = NULL;
    int n = 0;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK)
        while (sqlite3_step(st) == SQLITE_ROW) {
            const char *v = (const char *)sqlite3_column_text(st, 0);
            if (!n++)
                fprintf(f, "\nrewards %s; graded under:\n",
                        shown ? "under the reward version shown above"
                              : "as the server graded them");
            fprintf(f, "  %-24s %-20s %lld submissions%s\n", v ? v : "?",
                    (const char *)sqlite3_column_text(st, 1),
                    (long long)sqlite3_column_int64(st, 2),
                    shown && v && strcmp(v, shown) == 0 ? "  (shown)" : "");
        }
    if (n > 1 || (n == 1 && shown))
        fprintf(f, "(fmx leaderboard --reward-version V ranks by one of them)\n");
    sqlite3_finalize(st);
    sqlite3_close(db);
}

int fmx_leaderboard_open(const char *db_path, const char *policy, fmx_leaderboard **out, char *err,
                         size_t errsz) {
    return fmx_leaderboard_open_version(db_path, policy, NULL, out, err, errsz);
}

int fmx_leaderboard_open_version(const char *db_path, const char *policy, const char *version,
                                 fmx_leaderboard **out, char *err, size_t errsz) {
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
    if (version && !fmx__has_grades(db)) sqlite3_exec(db, fmx__no_grades, NULL, NULL, NULL);
    rc = sqlite3_prepare_v2(db, version ? fmx__query_version : fmx__query, -1, &st, NULL);
    if (rc != SQLITE_OK) {
        const char *why = sqlite3_errmsg(db);
        int format =
            strstr(why, "no such table") || strstr(why, "no such column") || rc == SQLITE_NOTADB;
        snprintf(err, errsz, "%s: %s%s", db_path, why, format ? " (not an fmx episode log)" : "");
        sqlite3_close(db);
        return format ? FMX_EFORMAT : FMX_EIO;
    }
    if (policy) sqlite3_bind_text(st, 1, policy, -1, SQLITE_STATIC);
    if (version) sqlite3_bind_text(st, 2, version, -1, SQLITE_STATIC);

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
        status = fmx__add_point(lb, lb->rows[total].policy, lb->rows[cur].task, st);
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
    free(lb->points);
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

/* ---- the HTML page ---- */

/* Text with &, <, >, " escaped. */
static void fmx__esc(FILE *f, const char *s) {
    for (; s && *s; s++) {
        switch (*s) {
        case '&':
            fputs("&amp;", f);
            break;
        case '<':
            fputs("&lt;", f);
            break;
        case '>':
            fputs("&gt;", f);
            break;
        case '"':
            fputs("&quot;", f);
            break;
        default:
            fputc(*s, f);
        }
    }
}

static const char *const fmx__palette[] = {"#2563eb", "#dc2626", "#16a34a", "#d97706",
                                           "#7c3aed", "#0891b2", "#db2777", "#4b5563"};
#define FMX__NPALETTE ((int)(sizeof fmx__palette / sizeof fmx__palette[0]))

/* The ranked policies (their total rows) in rank order; returns how many. */
static int fmx__policies(const fmx_leaderboard *lb, const fmx_leaderboard_row **out) {
    int n = 0;
    for (int i = 0; i < lb->n; i++)
        if (!lb->rows[i].task) out[n++] = &lb->rows[i];
    return n;
}

static const char *fmx__color(const fmx_leaderboard_row *const *pol, int npol, const char *name) {
    for (int i = 0; i < npol; i++)
        if (pol[i]->policy == name || strcmp(pol[i]->policy, name) == 0)
            return fmx__palette[i % FMX__NPALETTE];
    return fmx__palette[FMX__NPALETTE - 1];
}

/* A deterministic jitter in [-1, 1) from an index. */
static double fmx__jitter(unsigned k) {
    k = k * 2654435761u;
    k ^= k >> 15;
    return (double)(k % 2000u) / 1000.0 - 1.0;
}

static int fmx__cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Quantile q of sorted v[0..n) (linear interpolation). */
static double fmx__quantile(const double *v, int n, double q) {
    double pos = q * (n - 1);
    int i = (int)floor(pos);
    if (i >= n - 1) return v[n - 1];
    return v[i] + (pos - i) * (v[i + 1] - v[i]);
}

/* A step for about n ticks over span: 1, 2 or 5 × 10^k. */
static double fmx__tick_step(double span, int n) {
    double raw = span / n, p = pow(10, floor(log10(raw))), m = raw / p;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
}

/* Strip plot with boxes: one row per policy, every finished episode's reward. */
static void fmx__chart_rewards(FILE *f, const fmx_leaderboard *lb,
                               const fmx_leaderboard_row *const *pol, int npol) {
    const double W = 500, L = 110, R = 20, T = 20, ROW = 46, B = 44;
    double H = T + ROW * (npol ? npol : 1) + B;
    double lo = 0, hi = 1;
    for (int i = 0; i < lb->npoints; i++)
        if (lb->points[i].finished) {
            lo = fmin(lo, lb->points[i].reward);
            hi = fmax(hi, lb->points[i].reward);
        }
#define FMX__X(v) (L + ((v)-lo) / (hi - lo) * (W - L - R))
    fprintf(f,
            "<svg class=\"chart\" id=\"chart-rewards\" xmlns=\"http://www.w3.org/2000/svg\" "
            "width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" role=\"img\" "
            "aria-label=\"episode rewards per policy\">\n",
            W, H, W, H);
    double step = fmx__tick_step(hi - lo, 5);
    for (double v = ceil(lo / step) * step; v <= hi + 1e-9; v += step) {
        double x = FMX__X(v);
        fprintf(f,
                "<line class=\"grid\" x1=\"%.1f\" x2=\"%.1f\" y1=\"%.0f\" y2=\"%.0f\"/>"
                "<text class=\"tick\" x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%g</text>\n",
                x, x, T - 6, H - B + 4, x, H - B + 20, fabs(v) < 1e-12 ? 0 : v);
    }
    fprintf(f,
            "<text class=\"axis\" x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">reward of "
            "each finished episode</text>\n",
            (L + W - R) / 2, H - 6);
    double *v = malloc(((size_t)lb->npoints + 1) * sizeof *v);
    for (int p = 0; p < npol && v; p++) {
        const char *name = pol[p]->policy, *color = fmx__palette[p % FMX__NPALETTE];
        double y = T + ROW * p + ROW / 2;
        int n = 0;
        for (int i = 0; i < lb->npoints; i++)
            if (lb->points[i].finished && strcmp(lb->points[i].policy, name) == 0)
                v[n++] = lb->points[i].reward;
        fprintf(f, "<text class=\"label\" x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">", L - 10,
                y + 4);
        fmx__esc(f, name);
        fprintf(f, "</text>\n");
        if (n) {
            qsort(v, (size_t)n, sizeof *v, fmx__cmp_double);
            double q1 = fmx__quantile(v, n, 0.25), q2 = fmx__quantile(v, n, 0.5),
                   q3 = fmx__quantile(v, n, 0.75);
            fprintf(f,
                    "<line class=\"whisker\" x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" "
                    "stroke=\"%s\"/>"
                    "<rect class=\"box\" x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" "
                    "fill=\"%s\" stroke=\"%s\"/>"
                    "<line class=\"median\" x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" "
                    "stroke=\"%s\"/>\n",
                    FMX__X(v[0]), FMX__X(v[n - 1]), y, y, color, FMX__X(q1), y - 13,
                    fmax(FMX__X(q3) - FMX__X(q1), 1.5), 26.0, color, color, FMX__X(q2), FMX__X(q2),
                    y - 15, y + 15, color);
        }
        for (int i = 0; i < lb->npoints; i++) {
            const fmx__point *pt = &lb->points[i];
            if (!pt->finished || strcmp(pt->policy, name) != 0) continue;
            fprintf(f, "<circle class=\"pt\" cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"%s\"><title>",
                    FMX__X(pt->reward), y + 11 * fmx__jitter((unsigned)(i + 1)), color);
            fmx__esc(f, name);
            fputs(" · ", f);
            fmx__esc(f, pt->task);
            fprintf(f, ": reward %.4f</title></circle>\n", pt->reward);
        }
    }
    free(v);
#undef FMX__X
    fprintf(f, "</svg>\n");
}

/* Scatter: LOC (x) against correctness (y), one dot per graded episode. */
static void fmx__chart_loc(FILE *f, const fmx_leaderboard *lb,
                           const fmx_leaderboard_row *const *pol, int npol) {
    const double W = 500, H = 360, L = 56, R = 20, T = 40, B = 48;
    double hi = 10;
    for (int i = 0; i < lb->npoints; i++)
        if (lb->points[i].finished && lb->points[i].graded)
            hi = fmax(hi, (double)lb->points[i].loc);
    double step = fmx__tick_step(hi, 6);
    hi = ceil(hi / step) * step;
#define FMX__X(v) (L + (v) / hi * (W - L - R))
#define FMX__Y(v) (T + (1 - (v)) * (H - T - B))
    fprintf(f,
            "<svg class=\"chart\" id=\"chart-loc\" xmlns=\"http://www.w3.org/2000/svg\" "
            "width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" role=\"img\" "
            "aria-label=\"LOC against correctness\">\n",
            W, H, W, H);
    for (double v = 0; v <= hi + 1e-9; v += step)
        fprintf(f,
                "<line class=\"grid\" x1=\"%.1f\" x2=\"%.1f\" y1=\"%.0f\" y2=\"%.0f\"/>"
                "<text class=\"tick\" x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%g</text>\n",
                FMX__X(v), FMX__X(v), T, H - B, FMX__X(v), H - B + 18, v);
    for (int k = 0; k <= 4; k++) {
        double c = k / 4.0;
        fprintf(f,
                "<line class=\"grid\" x1=\"%.0f\" x2=\"%.0f\" y1=\"%.1f\" y2=\"%.1f\"/>"
                "<text class=\"tick\" x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n",
                L, W - R, FMX__Y(c), FMX__Y(c), L - 8, FMX__Y(c) + 4, c);
    }
    fprintf(f,
            "<text class=\"axis\" x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">logical lines "
            "of the graded code</text>\n"
            "<text class=\"axis\" transform=\"translate(14 %.0f) rotate(-90)\" "
            "text-anchor=\"middle\">correctness</text>\n",
            (L + W - R) / 2, H - 8, (T + H - B) / 2);
    for (int i = 0; i < lb->npoints; i++) {
        const fmx__point *pt = &lb->points[i];
        if (!pt->finished || !pt->graded) continue;
        fprintf(f, "<circle class=\"pt\" cx=\"%.1f\" cy=\"%.1f\" r=\"4.5\" fill=\"%s\"><title>",
                FMX__X((double)pt->loc) + 2.5 * fmx__jitter((unsigned)(i + 7)),
                FMX__Y(pt->correctness), fmx__color(pol, npol, pt->policy));
        fmx__esc(f, pt->policy);
        fputs(" · ", f);
        fmx__esc(f, pt->task);
        fprintf(f, ": %lld lines, correctness %.4f</title></circle>\n", (long long)pt->loc,
                pt->correctness);
    }
    /* Legend above the plot, left to right (about 8 characters a name). */
    double x = L;
    for (int p = 0; p < npol; p++) {
        fprintf(f,
                "<circle class=\"legend\" cx=\"%.0f\" cy=\"%.0f\" r=\"5\" fill=\"%s\"/>"
                "<text class=\"label\" x=\"%.0f\" y=\"%.0f\">",
                x + 5, T - 22, fmx__palette[p % FMX__NPALETTE], x + 14, T - 18);
        fmx__esc(f, pol[p]->policy);
        fprintf(f, "</text>\n");
        x += 30 + 7 * (double)strlen(pol[p]->policy);
    }
#undef FMX__X
#undef FMX__Y
    fprintf(f, "</svg>\n");
}

static void fmx__html_row(FILE *f, const fmx_leaderboard_row *r, const char *label,
                          const char *color, double reward_hi) {
    fputs("<tr><td>", f);
    fmx__esc(f, label);
    fprintf(f, "</td><td><span class=\"swatch\" style=\"background:%s\"></span>", color);
    fmx__esc(f, r->policy);
    fprintf(f, "</td><td class=\"n\">%lld</td><td class=\"n\">%.0f%%</td>", (long long)r->episodes,
            100 * r->pass_rate);
    double w = reward_hi > 0 ? fmax(0, r->reward_mean) / reward_hi * 80 : 0;
    fprintf(f,
            "<td class=\"n\"><span class=\"bar\" style=\"width:%.0fpx;background:%s\"></span>"
            "%.3f ± %.3f</td>",
            w, color, r->reward_mean, r->reward_sd);
    if (isnan(r->loc_mean))
        fputs("<td class=\"n\">-</td>", f);
    else
        fprintf(f, "<td class=\"n\">%.1f</td>", r->loc_mean);
    fprintf(f, "<td class=\"n\">%.1f</td>", r->steps_mean);
    if (isnan(r->compile_mean))
        fputs("<td class=\"n\">-</td></tr>\n", f);
    else
        fprintf(f, "<td class=\"n\">%.2f</td></tr>\n", r->compile_mean);
}

static const char fmx__css[] =
    "body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;"
    "background:#f6f7f9;color:#1f2937}"
    "main{max-width:1140px;margin:0 auto;padding:24px}"
    "h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:0 0 10px}"
    ".meta{color:#6b7280;margin:0 0 20px}"
    ".charts{display:flex;flex-wrap:wrap;gap:16px;margin-bottom:16px;align-items:flex-start}"
    ".card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:14px 16px;"
    "margin-bottom:16px}.charts .card{margin:0}"
    "table{border-collapse:collapse;width:100%}"
    "th,td{padding:5px 10px;border-bottom:1px solid #eef0f3;text-align:left;white-space:nowrap}"
    "th{font-weight:600;color:#4b5563;background:#fafafa}td.n,th.n{text-align:right;"
    "font-variant-numeric:tabular-nums}"
    "tbody tr:hover{background:#f3f6ff}"
    ".swatch{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:6px}"
    ".bar{display:inline-block;height:8px;border-radius:2px;margin-right:8px;opacity:.55;"
    "vertical-align:middle}"
    ".note{color:#6b7280;font-size:12px;margin:8px 0 0}"
    "svg .grid{stroke:#e5e7eb;stroke-width:1}svg .tick{fill:#6b7280;font-size:11px}"
    "svg .axis{fill:#374151;font-size:12px}svg .label{fill:#1f2937;font-size:12px}"
    "svg .box{fill-opacity:.15;stroke-width:1.2}svg .median{stroke-width:2.5}"
    "svg .whisker{stroke-width:1;stroke-dasharray:3 3}"
    "svg circle.pt{fill-opacity:.65;stroke:#fff;stroke-width:.8}"
    "#render-check{color:#9ca3af;font-size:11px}";

/* Counts what rendered and writes it into the page (a check for headless
 * browsers; people can ignore it). */
static const char fmx__script[] =
    "(function(){var q=function(s){return document.querySelectorAll(s).length;};"
    "var e=document.getElementById('render-check');"
    "e.textContent='rendered: '+q('table.ranking tbody tr')+' policies, '+"
    "q('table.tasks tbody tr')+' policy-task rows, '+q('svg.chart')+' charts, '+"
    "q('#chart-rewards circle.pt')+' reward points, '+q('#chart-loc circle.pt')+' loc points';"
    "e.setAttribute('data-ok','1');})();";

int fmx_leaderboard_html(FILE *f, const fmx_leaderboard *lb, const char *db_path) {
    if (!f || !lb) return FMX_EINVAL;
    int n = lb->n;
    const fmx_leaderboard_row **pol = malloc(((size_t)n + 1) * sizeof *pol);
    if (!pol) return FMX_ENOMEM;
    int npol = fmx__policies(lb, pol);
    int64_t finished = 0, unfinished = 0, ntasks = 0;
    double reward_hi = 1;
    for (int p = 0; p < npol; p++) {
        finished += pol[p]->episodes;
        unfinished += pol[p]->unfinished;
        reward_hi = fmax(reward_hi, pol[p]->reward_mean);
    }
    /* distinct tasks */
    for (int i = 0; i < n; i++) {
        const char *t = lb->rows[i].task;
        if (!t) continue;
        int seen = 0;
        for (int j = 0; j < i && !seen; j++)
            seen = lb->rows[j].task && strcmp(lb->rows[j].task, t) == 0;
        ntasks += !seen;
    }
    char when[64] = "";
    time_t now = time(NULL);
    struct tm tm;
    if (gmtime_r(&now, &tm)) strftime(when, sizeof when, "%Y-%m-%d %H:%M UTC", &tm);

    fprintf(f,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<title>fmx leaderboard</title>\n<style>%s</style>\n</head>\n<body>\n<main>\n",
            fmx__css);
    fputs("<h1>fmx leaderboard</h1>\n<p class=\"meta\">", f);
    fmx__esc(f, db_path ? db_path : "");
    fprintf(f, " · %lld finished episodes of %d policies on %lld tasks · %s</p>\n",
            (long long)finished, npol, (long long)ntasks, when);
    if (npol == 0) fputs("<p>no episodes in the log yet</p>\n", f);

    static const char head[] =
        "<thead><tr><th>%s</th><th>policy</th><th class=\"n\">episodes</th><th "
        "class=\"n\">pass</th><th class=\"n\">reward (mean ± sd)</th><th class=\"n\">loc</th>"
        "<th class=\"n\">steps</th><th class=\"n\">compile</th></tr></thead>\n<tbody>\n";
    fputs("<section class=\"card\"><h2>Ranking</h2>\n<table class=\"ranking\">\n", f);
    fprintf(f, head, "rank");
    for (int p = 0; p < npol; p++) {
        char label[16];
        snprintf(label, sizeof label, "%d", p + 1);
        fmx__html_row(f, pol[p], label, fmx__palette[p % FMX__NPALETTE], reward_hi);
    }
    fputs("</tbody></table>\n", f);
    fputs("<p class=\"note\">episodes: submitted or truncated; pass: correctness 1 (every probe, "
          "hidden included); loc and compile: means over graded submissions",
          f);
    if (unfinished)
        fprintf(f, "; %lld aborted, closed or open episodes not counted", (long long)unfinished);
    fputs("</p></section>\n", f);

    fputs("<div class=\"charts\">\n<section class=\"card\"><h2>Episode rewards per policy</h2>\n",
          f);
    fmx__chart_rewards(f, lb, pol, npol);
    fputs("<p class=\"note\">dots: episodes (submitted or truncated); box: quartiles; bar: "
          "median; dashed: range</p></section>\n",
          f);
    fputs("<section class=\"card\"><h2>Lines of code against correctness</h2>\n", f);
    fmx__chart_loc(f, lb, pol, npol);
    fputs("<p class=\"note\">one dot per finished episode with graded code: its last "
          "submission</p></section>\n</div>\n",
          f);

    /* Policy × task, grouped by task as in the text table. */
    fputs("<section class=\"card\"><h2>Policy × task</h2>\n<table class=\"tasks\">\n", f);
    fprintf(f, head, "task");
    const char *prev = NULL;
    for (;;) {
        const char *next = NULL;
        for (int i = 0; i < n; i++) {
            const char *t = lb->rows[i].task;
            if (t && (!prev || strcmp(t, prev) > 0) && (!next || strcmp(t, next) < 0)) next = t;
        }
        if (!next) break;
        for (int i = 0; i < n; i++)
            if (lb->rows[i].task && strcmp(lb->rows[i].task, next) == 0)
                fmx__html_row(f, &lb->rows[i], next, fmx__color(pol, npol, lb->rows[i].policy),
                              reward_hi);
        prev = next;
    }
    fputs("</tbody></table></section>\n", f);
    fprintf(f, "<p id=\"render-check\"></p>\n</main>\n<script>%s</script>\n</body>\n</html>\n",
            fmx__script);
    free(pol);
    return ferror(f) ? FMX_EIO : FMX_OK;
}

static const char fmx__usage[] =
    "usage: fmx leaderboard --db FILE [--policy NAME] [--reward-version V] [--html FILE]\n"
    "  --db FILE       the episode log (SQLite) a server wrote (fmx serve --db)\n"
    "  --policy NAME   only this policy's episodes\n"
    "  --reward-version V  rank by the grades under reward version V: fmx regrade's (a\n"
    "                  rerun first) or the server's; episodes graded under neither are\n"
    "                  left out (default: the rewards the server gave)\n"
    "  --html FILE     also write the leaderboard as one static HTML page (inline CSS and\n"
    "                  SVG charts: rewards per policy, LOC against correctness)\n";

int fmx_leaderboard_main(int argc, char **argv) {
    const char *db = NULL, *policy = NULL, *html = NULL, *version = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            fputs(fmx__usage, stdout);
            return 0;
        }
        if (strcmp(a, "--reward-version") == 0 && i + 1 < argc) {
            version = argv[++i];
        } else if ((strcmp(a, "--db") == 0 || strcmp(a, "--policy") == 0 ||
                    strcmp(a, "--html") == 0) &&
                   i + 1 < argc) {
            if (a[2] == 'd')
                db = argv[++i];
            else if (a[2] == 'p')
                policy = argv[++i];
            else
                html = argv[++i];
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
    if (fmx_leaderboard_open_version(db, policy, version, &lb, err, sizeof err) != FMX_OK) {
        fprintf(stderr, "fmx leaderboard: %s\n", err);
        return 2;
    }
    if (version) printf("rewards under reward version %s\n\n", version);
    fmx_leaderboard_print(stdout, lb);
    fmx__print_versions(stdout, db, version);
    int status = 0;
    if (html) {
        FILE *f = fopen(html, "w");
        int rc = f ? fmx_leaderboard_html(f, lb, db) : FMX_EIO;
        if (f && fclose(f) != 0) rc = FMX_EIO;
        if (rc != FMX_OK) {
            fprintf(stderr, "fmx leaderboard: %s: %s\n", html,
                    rc == FMX_ENOMEM ? "out of memory" : strerror(errno));
            status = 2;
        } else {
            printf("\nleaderboard page: %s\n", html);
        }
    }
    fmx_leaderboard_close(lb);
    return status;
}
