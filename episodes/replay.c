/*
 * replay.c — transcripts read back from the episode log, `fmx replay` (print
 * one episode and re-execute it against its pack) and `fmx regrade` (rescore
 * every stored submission under another reward config). See replay.h.
 *
 * Replay re-executes with the server's own step functions: an fmx_episode is
 * created for the logged task, and every logged action goes through
 * fmx_episode_plan/execute/apply as it did in the server, so budgets,
 * truncation grading and the observation texts are the server's. Nothing is
 * written to the log by replay.
 */
#define _GNU_SOURCE
#include "replay.h"

#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "engine/engine.h"
#include "env/episode.h"
#include "env/evaluator.h"
#include "env/progress.h"
#include "env/status.h"
#include "env/tasks.h"
#include "env/tools.h"
#include "env/worker.h"

/* ---- reading the log ---- */

int fmx_replay_open_db(const char *db_path, int readonly, sqlite3 **out, char *err, size_t errsz) {
    *out = NULL;
    sqlite3 *db = NULL;
    int flags = readonly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE;
    int rc = sqlite3_open_v2(db_path, &db, flags, NULL);
    if (rc != SQLITE_OK) {
        snprintf(err, errsz, "%s: cannot open: %s", db_path,
                 db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
        sqlite3_close(db);
        return FMX_EIO;
    }
    sqlite3_busy_timeout(db, 5000);
    *out = db;
    return FMX_OK;
}

/* The server's default --eval-timeout: what replay and regrade --rerun use
 * unless told the server's own. */
#define FMX_REPLAY_EVAL_TIMEOUT_S 30.0

/* Logged code runs as the server ran it: in sandboxed evaluation processes
 * (env/evaluator.c) with the server's limits, so a logged endless loop ends
 * at its deadline. */
static void fmx__sandboxed_evaluations(const char *device, double timeout_s) {
    fmx_evaluator_config ec = fmx_evaluator_config_default();
    ec.timeout_s = timeout_s > 0 ? timeout_s : FMX_REPLAY_EVAL_TIMEOUT_S;
    ec.device = device ? device : "cpu";
    fmx_evaluator_configure(&ec);
    /* started now, as a worker starts it before its first job: its start-up
     * is not the first step's evaluation time (a failure to start is
     * reported by that evaluation) */
    char err[512];
    fmx_evaluator_shared(err, sizeof err);
}

/* Executes a planned step as a server's worker does: its evaluations under
 * the worker's deadline; one stopped by a timeout, OOM or crash gives the
 * step the observation the server gave it (fmx_fate_outcome). */
static int fmx__execute_as_a_worker(fmx_step_plan *plan, double eval_timeout_s,
                                    fmx_step_outcome *out) {
    fmx_pool_config limits = fmx_pool_config_default();
    limits.eval_timeout_s = eval_timeout_s > 0 ? eval_timeout_s : FMX_REPLAY_EVAL_TIMEOUT_S;
    double budget = fmx_eval_budget_s(limits.eval_timeout_s);
    fmx_evaluator_set_deadline(fmx_evaluator_now() + budget);
    fmx_evaluator_take_fate(NULL, 0);
    int rc = fmx_episode_execute(plan, out);
    char why[256];
    fmx_eval_fate fate = fmx_evaluator_take_fate(why, sizeof why);
    fmx_evaluator_set_deadline(0);
    if (rc != FMX_OK || fate == FMX_EVAL_OK) return rc;
    fmx_step_outcome_clear(out);
    return fmx_fate_outcome(&limits, plan, fmx_fate_of_eval(fate), why, out);
}

/* S of --eval-timeout S: a positive number of seconds (at most a day). */
static int fmx__parse_timeout(const char *s, double *v) {
    char *end;
    errno = 0;
    double x = strtod(s, &end);
    if (errno || end == s || *end || !(x > 0 && x <= 86400)) return 0;
    *v = x;
    return 1;
}

/* A prepare failure: "no such table" means the file is not an fmx log. */
static int fmx__prepare(sqlite3 *db, const char *sql, sqlite3_stmt **st, char *err, size_t errsz) {
    int rc = sqlite3_prepare_v2(db, sql, -1, st, NULL);
    if (rc == SQLITE_OK) return FMX_OK;
    const char *why = sqlite3_errmsg(db);
    if (!why) why = sqlite3_errstr(rc);
    int format =
        strstr(why, "no such table") || strstr(why, "no such column") || rc == SQLITE_NOTADB;
    snprintf(err, errsz, "%s%s", why, format ? " (not an fmx episode log)" : "");
    return format ? FMX_EFORMAT : FMX_EIO;
}

static const char *fmx__keep(fmx_transcript *t, const unsigned char *s, int *oom) {
    if (!s) return NULL;
    char *d = strdup((const char *)s);
    char **g = d ? realloc(t->strings_, (size_t)(t->nstrings_ + 1) * sizeof *g) : NULL;
    if (!g) {
        free(d);
        *oom = 1;
        return NULL;
    }
    t->strings_ = g;
    t->strings_[t->nstrings_++] = d;
    return d;
}

static const char fmx__episode_sql[] =
    "SELECT e.task_id, t.kind, t.pack, t.module, t.class, t.target_loc, p.name, e.status, "
    "       e.seed, e.started_at, e.ended_at, e.reward "
    "FROM episodes e JOIN policies p ON p.id = e.policy_id LEFT JOIN tasks t ON t.id = e.task_id "
    "WHERE e.id = ?1";

/* The step columns in FMX_STEP_FIELDS order (the trailing 1 closes the list). */
#define FMX__STEP_COL(kind, name, sql, desc) #name ", "
static const char fmx__steps_sql[] =
    "SELECT " FMX_STEP_FIELDS(FMX__STEP_COL) "1 FROM steps WHERE episode = ?1 ORDER BY idx";
#undef FMX__STEP_COL

static const char fmx__submission_sql[] =
    "SELECT id, code, entry, correctness, loc, loc_score, compile_score, reward, reward_version, "
    "       breakdown, truncated "
    "FROM submissions WHERE episode = ?1 ORDER BY id DESC LIMIT 1";

static int fmx__read_steps(sqlite3 *db, fmx_transcript *t, int *oom, char *err, size_t errsz) {
    sqlite3_stmt *st = NULL;
    int status = fmx__prepare(db, fmx__steps_sql, &st, err, errsz);
    if (status) return status;
    sqlite3_bind_int64(st, 1, t->id);
    int rc, cap = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW && !*oom) {
        if (t->nsteps == cap) {
            cap = cap ? 2 * cap : 16;
            fmx_step_record *g = realloc(t->steps, (size_t)cap * sizeof *g);
            if (!g) {
                *oom = 1;
                break;
            }
            t->steps = g;
        }
        fmx_step_record *r = &t->steps[t->nsteps++];
        memset(r, 0, sizeof *r);
        int col = 0;
#define FMX__READ_I(name) r->name = sqlite3_column_int64(st, col++);
#define FMX__READ_F(name) r->name = sqlite3_column_double(st, col++);
#define FMX__READ_S(name) r->name = fmx__keep(t, sqlite3_column_text(st, col++), oom);
#define FMX__READ_J(name) FMX__READ_S(name)
#define FMX__READ(kind, name, sql, desc) FMX__READ_##kind(name)
        FMX_STEP_FIELDS(FMX__READ)
#undef FMX__READ
#undef FMX__READ_I
#undef FMX__READ_F
#undef FMX__READ_S
#undef FMX__READ_J
        (void)col;
    }
    if (!*oom && rc != SQLITE_DONE) {
        snprintf(err, errsz, "reading steps: %s", sqlite3_errmsg(db));
        status = FMX_EIO;
    }
    sqlite3_finalize(st);
    return status;
}

int fmx_transcript_load(sqlite3 *db, int64_t id, fmx_transcript **out, char *err, size_t errsz) {
    *out = NULL;
    fmx_transcript *t = calloc(1, sizeof *t);
    if (!t) {
        snprintf(err, errsz, "out of memory");
        return FMX_ENOMEM;
    }
    t->id = id;
    int oom = 0;
    sqlite3_stmt *st = NULL;
    int status = fmx__prepare(db, fmx__episode_sql, &st, err, errsz);
    if (status) goto fail;
    sqlite3_bind_int64(st, 1, id);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_DONE) {
        snprintf(err, errsz, "no episode %lld in the log", (long long)id);
        status = FMX_ENOTFOUND;
        goto fail;
    }
    if (rc != SQLITE_ROW) {
        snprintf(err, errsz, "reading episode %lld: %s", (long long)id, sqlite3_errmsg(db));
        status = FMX_EIO;
        goto fail;
    }
    t->task = fmx__keep(t, sqlite3_column_text(st, 0), &oom);
    t->kind = fmx__keep(t, sqlite3_column_text(st, 1), &oom);
    t->pack = fmx__keep(t, sqlite3_column_text(st, 2), &oom);
    t->module = fmx__keep(t, sqlite3_column_text(st, 3), &oom);
    t->cls = fmx__keep(t, sqlite3_column_text(st, 4), &oom);
    t->target_loc = sqlite3_column_int64(st, 5);
    t->policy = fmx__keep(t, sqlite3_column_text(st, 6), &oom);
    t->status = fmx__keep(t, sqlite3_column_text(st, 7), &oom);
    t->seed = sqlite3_column_int64(st, 8);
    t->started_at = sqlite3_column_double(st, 9);
    t->ended_at = sqlite3_column_double(st, 10);
    t->has_reward = sqlite3_column_type(st, 11) != SQLITE_NULL;
    t->reward = sqlite3_column_double(st, 11);
    sqlite3_finalize(st);
    st = NULL;
    if (oom) goto nomem;

    if ((status = fmx__read_steps(db, t, &oom, err, errsz))) goto fail;
    if (oom) goto nomem;

    if ((status = fmx__prepare(db, fmx__submission_sql, &st, err, errsz))) goto fail;
    sqlite3_bind_int64(st, 1, id);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        t->has_submission = 1;
        t->submission_id = sqlite3_column_int64(st, 0);
        t->code = fmx__keep(t, sqlite3_column_text(st, 1), &oom);
        t->entry = fmx__keep(t, sqlite3_column_text(st, 2), &oom);
        t->correctness = sqlite3_column_double(st, 3);
        t->loc = sqlite3_column_int64(st, 4);
        t->loc_score = sqlite3_column_double(st, 5);
        t->compile_score = sqlite3_column_double(st, 6);
        t->sub_reward = sqlite3_column_double(st, 7);
        t->reward_version = fmx__keep(t, sqlite3_column_text(st, 8), &oom);
        t->breakdown = fmx__keep(t, sqlite3_column_text(st, 9), &oom);
        t->sub_truncated = sqlite3_column_int(st, 10);
    } else if (rc != SQLITE_DONE) {
        snprintf(err, errsz, "reading submissions: %s", sqlite3_errmsg(db));
        status = FMX_EIO;
        goto fail;
    }
    sqlite3_finalize(st);
    if (oom) goto nomem;
    *out = t;
    return FMX_OK;
nomem:
    snprintf(err, errsz, "out of memory");
    status = FMX_ENOMEM;
fail:
    sqlite3_finalize(st);
    fmx_transcript_free(t);
    return status;
}

void fmx_transcript_free(fmx_transcript *t) {
    if (!t) return;
    for (int i = 0; i < t->nstrings_; i++)
        free(t->strings_[i]);
    free(t->strings_);
    free(t->steps);
    free(t);
}

int fmx_replay_reward_of(const char *breakdown_json, fmx_reward_config *cfg) {
    cJSON *b = breakdown_json ? cJSON_Parse(breakdown_json) : NULL;
    const char *version = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(b, "version"));
    const cJSON *w = cJSON_GetObjectItemCaseSensitive(b, "weights");
    if (!version || !cJSON_IsObject(w)) {
        cJSON_Delete(b);
        return FMX_EFORMAT;
    }
    fmx_reward_config c = fmx_reward_config_default();
    snprintf(c.version, sizeof c.version, "%s", version);
    struct {
        const char *key;
        double *v;
    } keys[] = {{"w_correct", &c.w_correct},
                {"w_loc", &c.w_loc},
                {"w_compile", &c.w_compile},
                {"loc_slack", &c.loc_slack}};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        const cJSON *n = cJSON_GetObjectItemCaseSensitive(w, keys[i].key);
        if (cJSON_IsNumber(n)) *keys[i].v = n->valuedouble;
    }
    cJSON_Delete(b);
    *cfg = c;
    return FMX_OK;
}

/* n, or less so that s[0..n) does not end inside a UTF-8 character (s has
 * at least n bytes). */
static int fmx__utf8_cut(const char *s, int n) {
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
        n--;
    return n;
}

/* ---- comparing observations ---- */

typedef struct {
    FILE *out;
    int max, n;
} fmx__diffs;

/* Timing fields differ on every run. */
static int fmx__ignored_key(const char *k) {
    size_t n = strlen(k);
    return strcmp(k, "ms") == 0 || (n > 3 && strcmp(k + n - 3, "_ms") == 0);
}

/* Equal within a few ulps: the log holds cJSON's shortest round-trip text,
 * which another printer may round at 15 significant digits. */
static int fmx__close(double a, double b) {
    if (a == b || (isnan(a) && isnan(b))) return 1;
    return fabs(a - b) <= 8 * DBL_EPSILON * fmax(fabs(a), fabs(b));
}

/* A short form of a JSON value for a diff line. */
static void fmx__short(const cJSON *v, char *buf, size_t n) {
    if (!v) {
        snprintf(buf, n, "(absent)");
        return;
    }
    char *s = cJSON_PrintUnformatted(v);
    if (!s) {
        snprintf(buf, n, "?");
        return;
    }
    if (strlen(s) > 80)
        snprintf(buf, n, "%.*s… (%zu bytes)", fmx__utf8_cut(s, 72), s, strlen(s));
    else
        snprintf(buf, n, "%s", s);
    free(s);
}

static void fmx__report(fmx__diffs *d, const char *path, const cJSON *a, const cJSON *b,
                        const char *note) {
    if (d->n++ >= d->max || !d->out) return;
    if (note) {
        fprintf(d->out, "      %s: %s\n", path, note);
        return;
    }
    char sa[128], sb[128];
    fmx__short(a, sa, sizeof sa);
    fmx__short(b, sb, sizeof sb);
    fprintf(d->out, "      %s: logged %s, replayed %s\n", path, sa, sb);
}

/* "12.5 ms" → "# ms": timings in observation texts. Caller frees. */
static char *fmx__mask_ms(const char *s) {
    size_t n = strlen(s), k = 0;
    char *o = malloc(n + 1);
    if (!o) return NULL;
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        unsigned char prev = i ? (unsigned char)s[i - 1] : ' ';
        if (isdigit(c) && !isalnum(prev) && prev != '.' && prev != '_') {
            size_t j = i;
            while (j < n &&
                   (isdigit((unsigned char)s[j]) || s[j] == '.' ||
                    ((s[j] == 'e' || s[j] == 'E') &&
                     (isdigit((unsigned char)s[j + 1]) || s[j + 1] == '-' || s[j + 1] == '+')) ||
                    ((s[j] == '-' || s[j] == '+') && (s[j - 1] == 'e' || s[j - 1] == 'E'))))
                j++;
            size_t m = j + (s[j] == ' ');
            if (s[m] == 'm' && s[m + 1] == 's' && !isalnum((unsigned char)s[m + 2])) {
                o[k++] = '#';
            } else {
                memcpy(o + k, s + i, j - i);
                k += j - i;
            }
            i = j;
            continue;
        }
        o[k++] = s[i++];
    }
    o[k] = '\0';
    return o;
}

/* Texts compared line by line; the first differing line is reported. */
static void fmx__diff_text(fmx__diffs *d, const char *path, const char *a, const char *b) {
    char *ma = fmx__mask_ms(a), *mb = fmx__mask_ms(b);
    if (!ma || !mb || strcmp(ma, mb) == 0) {
        free(ma);
        free(mb);
        return;
    }
    const char *pa = ma, *pb = mb;
    int line = 1;
    for (;;) {
        const char *ea = strchr(pa, '\n'), *eb = strchr(pb, '\n');
        size_t la = ea ? (size_t)(ea - pa) : strlen(pa), lb = eb ? (size_t)(eb - pb) : strlen(pb);
        if (la != lb || memcmp(pa, pb, la) != 0 || !ea || !eb) break;
        pa = ea + 1;
        pb = eb + 1;
        line++;
    }
    char note[400];
    const char *ea = strchr(pa, '\n'), *eb = strchr(pb, '\n');
    int la = (int)(ea ? ea - pa : (long)strlen(pa)), lb = (int)(eb ? eb - pb : (long)strlen(pb));
    snprintf(note, sizeof note, "line %d: logged \"%.*s\", replayed \"%.*s\"", line,
             la > 90 ? fmx__utf8_cut(pa, 90) : la, pa, lb > 90 ? fmx__utf8_cut(pb, 90) : lb, pb);
    fmx__report(d, path, NULL, NULL, note);
    free(ma);
    free(mb);
}

static void fmx__diff(fmx__diffs *d, char *path, size_t len, size_t cap, const cJSON *a,
                      const cJSON *b) {
    if (cJSON_IsNumber(a) && cJSON_IsNumber(b)) {
        if (!fmx__close(a->valuedouble, b->valuedouble)) fmx__report(d, path, a, b, NULL);
        return;
    }
    if (cJSON_IsString(a) && cJSON_IsString(b)) {
        if (strcmp(a->valuestring, b->valuestring) != 0) fmx__report(d, path, a, b, NULL);
        return;
    }
    if ((a->type & 0xff) != (b->type & 0xff)) {
        fmx__report(d, path, a, b, NULL);
        return;
    }
    if (cJSON_IsArray(a)) {
        int na = cJSON_GetArraySize(a), nb = cJSON_GetArraySize(b);
        if (na != nb) {
            char note[96];
            snprintf(note, sizeof note, "logged %d elements, replayed %d", na, nb);
            fmx__report(d, path, NULL, NULL, note);
        }
        const cJSON *x = a->child, *y = b->child;
        for (int i = 0; x && y; i++, x = x->next, y = y->next) {
            snprintf(path + len, cap - len, "[%d]", i);
            fmx__diff(d, path, strlen(path), cap, x, y);
        }
        path[len] = '\0';
        return;
    }
    if (cJSON_IsObject(a)) {
        for (const cJSON *x = a->child; x; x = x->next) {
            if (fmx__ignored_key(x->string)) continue;
            snprintf(path + len, cap - len, "%s%s", len ? "." : "", x->string);
            const cJSON *y = cJSON_GetObjectItemCaseSensitive(b, x->string);
            if (!y)
                fmx__report(d, path, x, NULL, NULL);
            else if (strcmp(x->string, "text") == 0 && cJSON_IsString(x) && cJSON_IsString(y))
                fmx__diff_text(d, path, x->valuestring, y->valuestring);
            else
                fmx__diff(d, path, strlen(path), cap, x, y);
        }
        for (const cJSON *y = b->child; y; y = y->next) {
            if (fmx__ignored_key(y->string) || cJSON_GetObjectItemCaseSensitive(a, y->string))
                continue;
            snprintf(path + len, cap - len, "%s%s", len ? "." : "", y->string);
            fmx__report(d, path, NULL, y, NULL);
        }
        path[len] = '\0';
        return;
    }
    /* true/false/null: the types matched */
}

int fmx_replay_compare(const char *logged_json, const cJSON *replayed, FILE *diffs, int max_diffs) {
    cJSON *a = logged_json ? cJSON_Parse(logged_json) : NULL;
    if (!a) return -1;
    fmx__diffs d = {diffs, max_diffs, 0};
    char path[512] = "";
    if (replayed)
        fmx__diff(&d, path, 0, sizeof path, a, replayed);
    else
        fmx__report(&d, "observation", a, NULL, NULL);
    cJSON_Delete(a);
    return d.n;
}

/* ---- the transcript ---- */

/* args with long or multi-line strings (code) abbreviated, as JSON. Caller frees. */
static char *fmx__args_short(const char *args_json) {
    cJSON *a = cJSON_Parse(args_json ? args_json : "{}");
    if (!a) return strdup(args_json ? args_json : "");
    for (cJSON *x = a->child; x; x = x->next) {
        if (!cJSON_IsString(x)) continue;
        const char *s = x->valuestring;
        size_t n = strlen(s);
        const char *nl = strchr(s, '\n');
        if (n <= 60 && !nl) continue;
        int lines = 1;
        for (const char *p = s; *p; p++)
            lines += *p == '\n' && p[1];
        size_t first = nl ? (size_t)(nl - s) : n;
        char buf[160];
        snprintf(buf, sizeof buf, "%.*s… (%d lines, %zu bytes)",
                 first > 40 ? fmx__utf8_cut(s, 40) : (int)first, s, lines, n);
        cJSON_SetValuestring(x, buf);
    }
    char *out = cJSON_PrintUnformatted(a);
    cJSON_Delete(a);
    return out;
}

/* Prints s with every line indented; at most max_lines lines (0: all). */
static void fmx__indent(FILE *f, const char *s, const char *pad, int max_lines) {
    int line = 0, total = 1;
    for (const char *p = s; *p; p++)
        total += *p == '\n' && p[1];
    while (*s && (max_lines == 0 || line < max_lines)) {
        const char *e = strchr(s, '\n');
        int len = (int)(e ? e - s : (long)strlen(s));
        int cut = max_lines && len > 160;
        fprintf(f, "%s%.*s%s\n", pad, cut ? fmx__utf8_cut(s, 160) : len, s, cut ? "…" : "");
        line++;
        if (!e) break;
        s = e + 1;
    }
    if (max_lines && total > line)
        fprintf(f, "%s… %d more lines (--full prints them)\n", pad, total - line);
}

static void fmx__time(double t, char *buf, size_t n) {
    time_t s = (time_t)t;
    struct tm tm;
    if (t <= 0 || !gmtime_r(&s, &tm)) {
        snprintf(buf, n, "-");
        return;
    }
    strftime(buf, n, "%Y-%m-%d %H:%M:%S UTC", &tm);
}

static void fmx__print_transcript(FILE *f, const fmx_transcript *t, int full) {
    char started[64];
    fmx__time(t->started_at, started, sizeof started);
    fprintf(f, "episode %lld · task %s · policy %s · seed %lld · %s", (long long)t->id, t->task,
            t->policy, (long long)t->seed, t->status);
    if (t->has_reward) fprintf(f, " · reward %.4f", t->reward);
    fprintf(f, " · %d steps · started %s\n", t->nsteps, started);
    if (t->kind)
        fprintf(f, "%s %s of pack %s (class %s, target %lld logical lines)\n", t->kind,
                t->module && t->module[0] ? t->module : "(whole model)", t->pack, t->cls,
                (long long)t->target_loc);
    for (int i = 0; i < t->nsteps; i++) {
        const fmx_step_record *s = &t->steps[i];
        char *args = fmx__args_short(s->args);
        fprintf(f, "\n[%lld] %s %s  (%.1f ms)\n", (long long)s->idx, s->tool, args ? args : "",
                s->ms);
        free(args);
        cJSON *a = full ? cJSON_Parse(s->args) : NULL;
        const char *code = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(a, "code"));
        if (code) {
            fprintf(f, "  code:\n");
            fmx__indent(f, code, "  | ", 0);
        }
        cJSON_Delete(a);
        cJSON *obs = cJSON_Parse(s->observation);
        const char *text = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(obs, "text"));
        size_t olen = text ? strlen(text) : 0;
        fprintf(f, "  observation (%zu chars%s%s):\n", olen, s->error ? ", refused: " : "",
                s->error ? s->error : "");
        fmx__indent(f, text ? text : (s->observation ? s->observation : ""), "  > ", full ? 0 : 8);
        cJSON_Delete(obs);
        fprintf(f, "  reward %g · terminated %s · truncated %s\n", s->reward,
                s->terminated ? "yes" : "no", s->truncated ? "yes" : "no");
    }
    if (t->has_submission)
        fprintf(f,
                "\nsubmission %lld%s: reward %.4f (%s) · correctness %.4f · loc %lld "
                "(score %.4f) · compile %.4f\n",
                (long long)t->submission_id, t->sub_truncated ? " (graded on truncation)" : "",
                t->sub_reward, t->reward_version ? t->reward_version : "?", t->correctness,
                (long long)t->loc, t->loc_score, t->compile_score);
}

/* ---- re-execution ---- */

typedef struct {
    const char *tasks_dir;
    const char *reward_path;
    const char *device;
    size_t max_code_bytes;
    int max_diffs;
    double eval_timeout_s; /* 0: the server's default */
} fmx__replay_opts;

/* Re-executes every step of t; *ndiff = steps that differ. FMX_OK, or an
 * error with err set (missing pack, bad reward file, out of memory). */
static int fmx__reexecute(FILE *f, const fmx_transcript *t, const fmx__replay_opts *o, int *ndiff,
                          char *err, size_t errsz) {
    *ndiff = 0;
    fmx_reward_config reward = fmx_reward_config_default();
    const char *reward_from = "the default reward config";
    if (o->reward_path) {
        int rc = fmx_reward_config_load(o->reward_path, &reward, err, errsz);
        if (rc) return rc;
        reward_from = o->reward_path;
    } else if (t->breakdown && fmx_replay_reward_of(t->breakdown, &reward) == FMX_OK) {
        reward_from = "the episode's stored breakdown";
    }
    fmx__sandboxed_evaluations(o->device, o->eval_timeout_s);
    int rc = fmx_engine_set_device(o->device, err, errsz);
    if (rc) return rc;
    fmx_tasks *tasks = NULL;
    rc = fmx_tasks_open(o->tasks_dir, &tasks, stderr, err, errsz);
    if (rc) return rc;
    const fmx_task *task = fmx_tasks_find(tasks, t->task);
    if (!task) {
        snprintf(err, errsz, "task '%s' is not among the packs in %s (is pack '%s' there?)",
                 t->task, o->tasks_dir, t->pack ? t->pack : "?");
        fmx_tasks_close(tasks);
        return FMX_ENOTFOUND;
    }
    /* The budget the server had: a truncated episode used all of it. */
    fmx_budget budget = fmx_budget_default();
    int truncated = t->nsteps > 0 && t->steps[t->nsteps - 1].truncated;
    if (truncated)
        budget.max_steps = t->nsteps;
    else if (budget.max_steps <= t->nsteps)
        budget.max_steps = t->nsteps + 1;
    if (o->max_code_bytes) budget.max_code_bytes = o->max_code_bytes;
    fmx_episode *ep = fmx_episode_create(t->id, task, t->policy, t->seed, "", 0, budget, &reward);
    if (!ep) {
        fmx_tasks_close(tasks);
        snprintf(err, errsz, "out of memory");
        return FMX_ENOMEM;
    }
    fprintf(f, "\nreplay of %d steps against pack %s (%s/%s), reward %s from %s, budget %d steps\n",
            t->nsteps, task->pack_name, o->tasks_dir, task->pack_name, reward.version, reward_from,
            budget.max_steps);
    rc = FMX_OK;
    for (int i = 0; i < t->nsteps && rc == FMX_OK; i++) {
        const fmx_step_record *s = &t->steps[i];
        cJSON *args = cJSON_Parse(s->args ? s->args : "{}");
        fmx_step_plan plan;
        fmx_step_outcome out;
        fmx_step_result res;
        memset(&out, 0, sizeof out);
        memset(&res, 0, sizeof res);
        rc = fmx_episode_plan(ep, s->tool, args, &plan);
        if (rc == FMX_OK) rc = fmx__execute_as_a_worker(&plan, o->eval_timeout_s, &out);
        if (rc == FMX_OK) rc = fmx_episode_apply(ep, &plan, &out, &res);
        if (rc == FMX_OK) {
            fprintf(f, "[%lld] %-22s", (long long)s->idx, s->tool);
            fflush(f);
            char *buf = NULL;
            size_t blen = 0;
            FILE *diffs = open_memstream(&buf, &blen);
            int n = fmx_replay_compare(s->observation, res.observation, diffs, o->max_diffs);
            if (n < 0) {
                n = 1;
                if (diffs) fprintf(diffs, "      the logged observation is not JSON\n");
            }
            fmx__diffs d = {diffs, o->max_diffs, n};
            if (res.idx != s->idx) {
                cJSON *x = cJSON_CreateNumber((double)s->idx), *y = cJSON_CreateNumber(res.idx);
                fmx__report(&d, "idx", x, y, NULL);
                cJSON_Delete(x);
                cJSON_Delete(y);
            }
            if (!fmx__close(res.reward, s->reward)) {
                cJSON *x = cJSON_CreateNumber(s->reward), *y = cJSON_CreateNumber(res.reward);
                fmx__report(&d, "reward", x, y, NULL);
                cJSON_Delete(x);
                cJSON_Delete(y);
            }
            if (!res.terminated != !s->terminated || !res.truncated != !s->truncated) {
                char note[96];
                snprintf(note, sizeof note, "logged terminated %d truncated %d, replayed %d %d",
                         (int)s->terminated, (int)s->truncated, res.terminated, res.truncated);
                fmx__report(&d, "end", NULL, NULL, note);
            }
            if (diffs) fclose(diffs);
            if (d.n) {
                (*ndiff)++;
                fprintf(f, " DIFFERS (%d difference%s)\n%s", d.n, d.n == 1 ? "" : "s",
                        buf ? buf : "");
                if (d.n > o->max_diffs) fprintf(f, "      … %d more\n", d.n - o->max_diffs);
            } else {
                fprintf(f, " same\n");
            }
            free(buf);
        } else {
            snprintf(err, errsz, "step %lld: out of memory", (long long)s->idx);
        }
        fmx_step_result_clear(&res);
        fmx_step_outcome_clear(&out);
        fmx_step_plan_clear(&plan);
        cJSON_Delete(args);
    }
    fmx_episode_destroy(ep);
    fmx_tasks_close(tasks);
    if (rc == FMX_OK) {
        if (*ndiff)
            fprintf(f, "replay: %d of %d steps DIFFER from the log\n", *ndiff, t->nsteps);
        else
            fprintf(f, "replay: all %d steps match the log\n", t->nsteps);
    }
    return rc;
}

static const char fmx__replay_usage[] =
    "usage: fmx replay --db FILE EPISODE [--tasks DIR] [options]\n"
    "  prints the episode's transcript, then re-executes every action against its pack\n"
    "  and names each step whose observation differs from the logged one\n"
    "  --db FILE             the episode log (SQLite)\n"
    "  EPISODE               episode id (episodes.id)\n"
    "  --tasks DIR           the packs the server served (its --tasks DIR); the log does\n"
    "                        not record it (default: the log's folder or packs/ in it,\n"
    "                        when the episode's pack is there)\n"
    "  --no-exec             only print the transcript\n"
    "  --full                print observations and code in full (default: abbreviated)\n"
    "  --reward FILE         reward config (default: the one the episode's grade names)\n"
    "  --max-code-bytes N    the server's --max-code-bytes (default 65536)\n"
    "  --device DEV          where candidate code runs (default cpu)\n"
    "  --eval-timeout S      the server's --eval-timeout: one evaluation's wall-clock\n"
    "                        limit, seconds (default 30)\n"
    "exit status: 0 every step replayed the same, 1 a step differs, 2 error\n";

static int fmx__parse_i64(const char *s, int64_t *v) {
    char *end;
    errno = 0;
    long long x = strtoll(s, &end, 10);
    if (errno || end == s || *end) return 0;
    *v = x;
    return 1;
}

int fmx_replay_main(int argc, char **argv) {
    const char *db_path = NULL, *episode = NULL;
    fmx__replay_opts o = {.device = "cpu", .max_diffs = 8};
    int full = 0, exec = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            fputs(fmx__replay_usage, stdout);
            return 0;
        } else if (strcmp(a, "--db") == 0 && has) {
            db_path = argv[++i];
        } else if (strcmp(a, "--tasks") == 0 && has) {
            o.tasks_dir = argv[++i];
        } else if (strcmp(a, "--reward") == 0 && has) {
            o.reward_path = argv[++i];
        } else if (strcmp(a, "--device") == 0 && has) {
            o.device = argv[++i];
        } else if (strcmp(a, "--eval-timeout") == 0 && has) {
            if (!fmx__parse_timeout(argv[++i], &o.eval_timeout_s)) {
                fprintf(stderr, "fmx replay: --eval-timeout takes seconds (a number > 0)\n");
                return 2;
            }
        } else if (strcmp(a, "--max-code-bytes") == 0 && has) {
            int64_t v;
            if (!fmx__parse_i64(argv[++i], &v) || v <= 0) {
                fprintf(stderr, "fmx replay: --max-code-bytes takes a positive integer\n");
                return 2;
            }
            o.max_code_bytes = (size_t)v;
        } else if (strcmp(a, "--full") == 0) {
            full = 1;
        } else if (strcmp(a, "--no-exec") == 0) {
            exec = 0;
        } else if (a[0] != '-' && !episode) {
            episode = a;
        } else {
            fprintf(stderr, "fmx replay: bad argument '%s'\n\n%s", a, fmx__replay_usage);
            return 2;
        }
    }
    int64_t id;
    if (!db_path || !episode) {
        fprintf(stderr, "fmx replay: --db FILE and EPISODE are required\n\n%s", fmx__replay_usage);
        return 2;
    }
    if (!fmx__parse_i64(episode, &id)) {
        fprintf(stderr, "fmx replay: EPISODE must be an episode id, not '%s'\n", episode);
        return 2;
    }
    char err[1024];
    sqlite3 *db = NULL;
    fmx_transcript *t = NULL;
    int rc = fmx_replay_open_db(db_path, 1, &db, err, sizeof err);
    if (rc) {
        fprintf(stderr, "fmx replay: %s\n", err);
        return 2;
    }
    rc = fmx_transcript_load(db, id, &t, err, sizeof err);
    sqlite3_close(db);
    if (rc) {
        fprintf(stderr, "fmx replay: %s: %s\n", db_path, err);
        return 2;
    }
    /* Without --tasks: the packs beside the log (demo.sh's packs/fmx.db) or in packs/
     * beside it (fmx run's defaults, fmx.db and packs/). */
    char beside[512];
    for (int k = 0; k < 2 && exec && !o.tasks_dir && t->pack; k++) {
        const char *slash = strrchr(db_path, '/');
        int dir_len = slash ? (int)(slash - db_path) : 1;
        const char *sub = k ? "/packs" : "";
        struct stat sb;
        snprintf(beside, sizeof beside, "%.*s%s/%s/task.json", dir_len, slash ? db_path : ".", sub,
                 t->pack);
        if (stat(beside, &sb) == 0) {
            snprintf(beside, sizeof beside, "%.*s%s", dir_len, slash ? db_path : ".", sub);
            o.tasks_dir = beside;
            fprintf(stderr,
                    "fmx replay: re-executing against the packs beside the log, %s (--tasks DIR "
                    "picks others)\n",
                    beside);
        }
    }
    if (exec && !o.tasks_dir)
        fprintf(stderr,
                "fmx replay: cannot re-execute episode %lld: its pack '%s' is not beside the log "
                "and the log does not record where the packs were. Give --tasks DIR (the "
                "server's --tasks) to re-execute it, or --no-exec for the transcript alone "
                "(exit 0). The transcript follows; exit status 2.\n",
                (long long)id, t->pack ? t->pack : "?");
    fmx__print_transcript(stdout, t, full);
    int status = 0;
    if (exec && !o.tasks_dir) {
        status = 2;
    } else if (exec) {
        int ndiff = 0;
        fflush(stdout);
        rc = fmx__reexecute(stdout, t, &o, &ndiff, err, sizeof err);
        if (rc) {
            fprintf(stderr, "fmx replay: %s\n", err);
            status = 2;
        } else {
            status = ndiff ? 1 : 0;
        }
    }
    fmx_transcript_free(t);
    return status;
}

/* ---- regrade ---- */

static const char fmx__grades_sql[] =
    "CREATE TABLE IF NOT EXISTS grades ("
    "  id INTEGER PRIMARY KEY,"
    "  submission INTEGER NOT NULL REFERENCES submissions(id),"
    "  episode INTEGER NOT NULL REFERENCES episodes(id),"
    "  reward_version TEXT NOT NULL,"
    "  rerun INTEGER NOT NULL," /* 1: the code was graded again; 0: stored facts rescored */
    "  correctness REAL NOT NULL,"
    "  loc INTEGER NOT NULL,"
    "  loc_score REAL NOT NULL,"
    "  compile_score REAL NOT NULL,"
    "  reward REAL NOT NULL,"
    "  breakdown TEXT NOT NULL,"
    "  created_at REAL NOT NULL,"
    "  UNIQUE (submission, reward_version, rerun));"
    "CREATE INDEX IF NOT EXISTS grades_episode ON grades(episode);";

static const char fmx__grade_ins_sql[] =
    "INSERT INTO grades (submission, episode, reward_version, rerun, correctness, loc, "
    "  loc_score, compile_score, reward, breakdown, created_at) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) "
    "ON CONFLICT (submission, reward_version, rerun) DO UPDATE SET correctness = ?5, loc = ?6, "
    "  loc_score = ?7, compile_score = ?8, reward = ?9, breakdown = ?10, created_at = ?11";

static const char fmx__subs_sql[] =
    "SELECT s.id, s.episode, s.code, s.entry, s.correctness, s.loc, s.breakdown, e.task_id, "
    "       t.target_loc, s.reward_version "
    "FROM submissions s JOIN episodes e ON e.id = s.episode "
    "LEFT JOIN tasks t ON t.id = e.task_id ORDER BY s.id";

static const char fmx__summary_sql[] =
    "SELECT p.name, count(*), avg(coalesce(s.reward, 0)), "
    "       avg(coalesce(g.reward, s.reward, 0)), "
    "       group_concat(DISTINCT s.reward_version), "
    "       sum(s.id IS NOT NULL AND g.id IS NULL) "
    "FROM episodes e JOIN policies p ON p.id = e.policy_id "
    "LEFT JOIN submissions s ON s.id = (SELECT max(id) FROM submissions WHERE episode = e.id) "
    "LEFT JOIN grades g ON g.submission = s.id AND g.reward_version = ?1 AND g.rerun = ?2 "
    "WHERE e.status IN ('submitted', 'truncated') "
    "GROUP BY p.name ORDER BY 4 DESC, p.name";

/* One new grade, held until the write. */
typedef struct {
    int64_t submission, episode;
    double correctness, loc_score, compile_score, reward;
    int64_t loc;
    char breakdown[FMX_REWARD_BREAKDOWN_MAX];
} fmx__regrade;

static int fmx__flag(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsTrue(v) || (cJSON_IsNumber(v) && v->valuedouble != 0);
}

/* The grade facts a stored breakdown holds; 0 if it has none. */
static int fmx__facts_of(const char *breakdown, fmx_grade_facts *g) {
    cJSON *b = breakdown ? cJSON_Parse(breakdown) : NULL;
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(b, "facts");
    if (!cJSON_IsObject(f)) {
        cJSON_Delete(b);
        return 0;
    }
    memset(g, 0, sizeof *g);
    g->correctness = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(f, "correctness"));
    g->loc = (long)cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(f, "loc"));
    g->target_loc = (long)cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(f, "target_loc"));
    g->compiled = fmx__flag(f, "compiled");
    g->host_syncs = fmx__flag(f, "host_syncs");
    g->data_dependent_flow = fmx__flag(f, "data_dependent_flow");
    g->survives_optimization = fmx__flag(f, "survives_optimization");
    g->runs_all_shapes = fmx__flag(f, "runs_all_shapes");
    int ok = !isnan(g->correctness);
    cJSON_Delete(b);
    return ok;
}

static const char fmx__regrade_usage[] =
    "usage: fmx regrade --db FILE [--reward FILE] [--rerun --tasks DIR]\n"
    "  rescores every stored submission under a reward config and stores the new grades\n"
    "  in the log's `grades` table (the server's grades in `submissions` are kept)\n"
    "  --db FILE       the episode log (SQLite); written\n"
    "  --reward FILE   the new reward config (default: the built-in one, v1-default)\n"
    "  --rerun         grade the code again (correctness, LOC, compile facts measured anew)\n"
    "                  instead of rescoring the stored facts; needs --tasks\n"
    "  --tasks DIR     the packs the server served (its --tasks DIR)\n"
    "  --device DEV    where --rerun runs candidate code (default cpu)\n"
    "  --eval-timeout S  with --rerun: the server's --eval-timeout, seconds (default 30)\n";

int fmx_regrade_main(int argc, char **argv) {
    const char *db_path = NULL, *reward_path = NULL, *tasks_dir = NULL, *device = "cpu";
    int rerun = 0;
    double eval_timeout_s = FMX_REPLAY_EVAL_TIMEOUT_S;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            fputs(fmx__regrade_usage, stdout);
            return 0;
        } else if (strcmp(a, "--db") == 0 && has) {
            db_path = argv[++i];
        } else if (strcmp(a, "--reward") == 0 && has) {
            reward_path = argv[++i];
        } else if (strcmp(a, "--tasks") == 0 && has) {
            tasks_dir = argv[++i];
        } else if (strcmp(a, "--device") == 0 && has) {
            device = argv[++i];
        } else if (strcmp(a, "--eval-timeout") == 0 && has) {
            if (!fmx__parse_timeout(argv[++i], &eval_timeout_s)) {
                fprintf(stderr, "fmx regrade: --eval-timeout takes seconds (a number > 0)\n");
                return 2;
            }
        } else if (strcmp(a, "--rerun") == 0) {
            rerun = 1;
        } else {
            fprintf(stderr, "fmx regrade: bad argument '%s'\n\n%s", a, fmx__regrade_usage);
            return 2;
        }
    }
    if (!db_path) {
        fprintf(stderr, "fmx regrade: --db FILE is required\n\n%s", fmx__regrade_usage);
        return 2;
    }
    if (rerun && !tasks_dir) {
        fprintf(stderr, "fmx regrade: --rerun grades the code again and needs the packs: give "
                        "--tasks DIR (the log does not record where they are)\n");
        return 2;
    }
    char err[1024];
    fmx_reward_config cfg = fmx_reward_config_default();
    if (reward_path && fmx_reward_config_load(reward_path, &cfg, err, sizeof err) != FMX_OK) {
        fprintf(stderr, "fmx regrade: %s\n", err);
        return 2;
    }
    /* R = w_correct·c + [c = 1]·(w_loc·loc + w_compile·compile) reaches 1 only when the
     * weights sum to 1: rewards under other sums do not compare with the server's */
    double wsum = cfg.w_correct + cfg.w_loc + cfg.w_compile;
    if (fabs(wsum - 1) > 1e-9) {
        fprintf(stderr,
                "fmx regrade: %s: the weights w_correct + w_loc + w_compile sum to %.10g, not 1 "
                "(%g + %g + %g); a reward must range over [0, 1]\n",
                reward_path ? reward_path : "the default reward", wsum, cfg.w_correct, cfg.w_loc,
                cfg.w_compile);
        return 2;
    }
    fmx_tasks *tasks = NULL;
    if (rerun) fmx__sandboxed_evaluations(device, eval_timeout_s);
    if (rerun && (fmx_engine_set_device(device, err, sizeof err) != FMX_OK ||
                  fmx_tasks_open(tasks_dir, &tasks, stderr, err, sizeof err) != FMX_OK)) {
        fprintf(stderr, "fmx regrade: %s\n", err);
        return 2;
    }
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    fmx__regrade *grades = NULL;
    fmx_progress *progress = NULL;
    int n = 0, cap = 0, skipped = 0, same_version = 0, status = 2, rc;
    if (fmx_replay_open_db(db_path, 0, &db, err, sizeof err) != FMX_OK) goto done;
    if (rerun) { /* grading again takes a while: submissions k/N on stderr */
        sqlite3_stmt *count = NULL;
        if (fmx__prepare(db, "SELECT count(*) FROM submissions", &count, err, sizeof err) != FMX_OK)
            goto done;
        if (sqlite3_step(count) == SQLITE_ROW)
            progress = fmx_progress_create("submissions", sqlite3_column_int(count, 0), 0);
        sqlite3_finalize(count);
    }
    if (fmx__prepare(db, fmx__subs_sql, &st, err, sizeof err) != FMX_OK) goto done;

    /* Grade first, write after: the write lock is held only for the inserts. */
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        fmx_progress_step(progress, NULL);
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            fmx__regrade *g = realloc(grades, (size_t)cap * sizeof *g);
            if (!g) {
                snprintf(err, sizeof err, "out of memory");
                goto done;
            }
            grades = g;
        }
        fmx__regrade *r = &grades[n];
        memset(r, 0, sizeof *r);
        r->submission = sqlite3_column_int64(st, 0);
        r->episode = sqlite3_column_int64(st, 1);
        const char *code = (const char *)sqlite3_column_text(st, 2);
        const char *entry = (const char *)sqlite3_column_text(st, 3);
        const char *breakdown = (const char *)sqlite3_column_text(st, 6);
        const char *task_id = (const char *)sqlite3_column_text(st, 7);
        const char *version = (const char *)sqlite3_column_text(st, 9);
        fmx_grade_facts facts;
        fmx_reward_breakdown score;
        fmx_reward_config stored;
        if (version && strcmp(version, cfg.version) == 0 &&
            fmx_replay_reward_of(breakdown, &stored) == FMX_OK &&
            (stored.w_correct != cfg.w_correct || stored.w_loc != cfg.w_loc ||
             stored.w_compile != cfg.w_compile || stored.loc_slack != cfg.loc_slack))
            same_version++;
        if (rerun) {
            const fmx_task *task = fmx_tasks_find(tasks, task_id ? task_id : "");
            if (!task || !code) {
                fprintf(stderr, "fmx regrade: submission %lld: task '%s' is not in %s; skipped\n",
                        (long long)r->submission, task_id ? task_id : "?", tasks_dir);
                skipped++;
                continue;
            }
            fmx_tool_ctx ctx = {.task = task, .reward = &cfg, .max_code_bytes = (size_t)-1};
            fmx_grade g;
            /* under a worker's deadline: a submission the server stopped
             * (timeout, OOM, crash) is stopped again and graded as it was,
             * failing every probe with no facts */
            fmx_evaluator_set_deadline(fmx_evaluator_now() + fmx_eval_budget_s(eval_timeout_s));
            fmx_evaluator_take_fate(NULL, 0);
            if (fmx_tools_grade(&ctx, code, strlen(code), entry ? entry : "forward", &g) !=
                FMX_OK) {
                snprintf(err, sizeof err, "out of memory");
                goto done;
            }
            facts = g.facts;
            score = g.score;
            fmx_grade_clear(&g);
            if (fmx_evaluator_take_fate(NULL, 0) != FMX_EVAL_OK) {
                memset(&facts, 0, sizeof facts);
                score = fmx_reward_score(&cfg, &facts);
            }
        } else {
            if (!fmx__facts_of(breakdown, &facts)) {
                fprintf(stderr,
                        "fmx regrade: submission %lld has no stored facts (breakdown); skipped "
                        "(--rerun grades its code again)\n",
                        (long long)r->submission);
                skipped++;
                continue;
            }
            /* The submission's own columns are the record of what was measured. */
            facts.correctness = sqlite3_column_double(st, 4);
            facts.loc = (long)sqlite3_column_int64(st, 5);
            if (facts.target_loc <= 0) facts.target_loc = (long)sqlite3_column_int64(st, 8);
            score = fmx_reward_score(&cfg, &facts);
        }
        r->correctness = score.correctness;
        r->loc = facts.loc;
        r->loc_score = score.loc_score;
        r->compile_score = score.compile_score;
        r->reward = score.reward;
        fmx_reward_breakdown_json(&cfg, &facts, &score, r->breakdown, sizeof r->breakdown);
        n++;
    }
    if (rc != SQLITE_DONE) {
        snprintf(err, sizeof err, "reading submissions: %s", sqlite3_errmsg(db));
        goto done;
    }
    sqlite3_finalize(st);
    st = NULL;
    fmx_progress_destroy(progress);
    progress = NULL;

    char *msg = NULL;
    if (sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, &msg) != SQLITE_OK ||
        sqlite3_exec(db, fmx__grades_sql, NULL, NULL, &msg) != SQLITE_OK) {
        snprintf(err, sizeof err, "writing grades: %s", msg ? msg : sqlite3_errmsg(db));
        sqlite3_free(msg);
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        goto done;
    }
    if (fmx__prepare(db, fmx__grade_ins_sql, &st, err, sizeof err) != FMX_OK) {
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        goto done;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double now = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
    for (int i = 0; i < n; i++) {
        const fmx__regrade *r = &grades[i];
        sqlite3_bind_int64(st, 1, r->submission);
        sqlite3_bind_int64(st, 2, r->episode);
        sqlite3_bind_text(st, 3, cfg.version, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 4, rerun);
        sqlite3_bind_double(st, 5, r->correctness);
        sqlite3_bind_int64(st, 6, r->loc);
        sqlite3_bind_double(st, 7, r->loc_score);
        sqlite3_bind_double(st, 8, r->compile_score);
        sqlite3_bind_double(st, 9, r->reward);
        sqlite3_bind_text(st, 10, r->breakdown, -1, SQLITE_STATIC);
        sqlite3_bind_double(st, 11, now);
        rc = sqlite3_step(st);
        sqlite3_reset(st);
        if (rc != SQLITE_DONE) {
            snprintf(err, sizeof err, "writing grades: %s", sqlite3_errmsg(db));
            sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
            goto done;
        }
    }
    sqlite3_finalize(st);
    st = NULL;
    if (sqlite3_exec(db, "COMMIT", NULL, NULL, &msg) != SQLITE_OK) {
        snprintf(err, sizeof err, "writing grades: %s", msg ? msg : sqlite3_errmsg(db));
        sqlite3_free(msg);
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        goto done;
    }

    /* The summary: per policy, the mean reward of finished episodes, old and new. */
    if (fmx__prepare(db, fmx__summary_sql, &st, err, sizeof err) != FMX_OK) goto done;
    sqlite3_bind_text(st, 1, cfg.version, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, rerun);
    printf("regraded %d submission%s under reward version %s (%s)%s\n", n, n == 1 ? "" : "s",
           cfg.version, reward_path ? reward_path : "built-in config",
           rerun ? ", code graded again" : ", from the stored facts");
    printf("%-24s %8s %10s %10s %8s  %s\n", "policy", "episodes", "old mean", "new mean", "change",
           "old versions");
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(st, 0);
        const char *versions = (const char *)sqlite3_column_text(st, 4);
        double old_mean = sqlite3_column_double(st, 2), new_mean = sqlite3_column_double(st, 3);
        printf("%-24s %8lld %10.4f %10.4f %+8.4f  %s\n", name ? name : "",
               (long long)sqlite3_column_int64(st, 1), old_mean, new_mean, new_mean - old_mean,
               versions ? versions : "-");
    }
    printf("episodes: submitted or truncated (a truncated one with no code counts 0); mean over "
           "each episode's last submission\n");
    printf("new grades: table `grades` (reward_version '%s', rerun %d) in %s; the original grades "
           "stay in `submissions`\n",
           cfg.version, rerun, db_path);
    if (skipped) printf("%d submission%s skipped (see above)\n", skipped, skipped == 1 ? "" : "s");
    if (same_version)
        fprintf(stderr,
                "fmx regrade: warning: %d submission%s were graded under version '%s' with other "
                "weights: a config that changes the formula should name a new version\n",
                same_version, same_version == 1 ? "" : "s", cfg.version);
    status = rc == SQLITE_DONE ? 0 : 2;
    if (status) snprintf(err, sizeof err, "summary: %s", sqlite3_errmsg(db));
done:
    fmx_progress_destroy(progress);
    if (status) fprintf(stderr, "fmx regrade: %s\n", err);
    sqlite3_finalize(st);
    sqlite3_close(db);
    free(grades);
    fmx_tasks_close(tasks);
    return status;
}
