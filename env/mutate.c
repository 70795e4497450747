/*
 * mutate.c — `fmx mutate PACK SOLUTION`: checks the solution passes, asks the
 * Python generator for its mutants, verifies each one in this process on
 * every probe, and reports killed / survived / equivalent / invalid with what
 * decided each verdict, and the mutation score (see mutate.h).
 *
 * A mutant costs one compile (~15 ms) and one run per probe call; nothing is
 * re-read between mutants (one pack, one interpreter start for the
 * generator).
 *
 * Not here: making mutants (python/fmx/mutate.py), grading (env/verify.c).
 */
#define _GNU_SOURCE
#include "mutate.h"
#include "file.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "engine/engine.h"
#include "pack.h"
#include "progress.h"
#include "pyexec.h"
#include "evaluator.h"
#include "status.h"
#include "verify.h"

#define FMX__ERR 2048

static const char *usage_text =
    "usage: fmx mutate PACK SOLUTION [options]\n"
    "\n"
    "Makes mutants of SOLUTION (a correct functional file for PACK), verifies each on\n"
    "every probe, hidden ones too, and reports which the probes kill.\n"
    "\n"
    "  --component PATH     mutate and verify one module (default: the whole model)\n"
    "  --entry NAME         function to call (default: forward); only the functions it\n"
    "                       reaches are mutated\n"
    "  --decode             the decode task: SOLUTION is the model with its KV cache,\n"
    "                       graded per generation step (adds the decode mutants' sites)\n"
    "  --equivalent FILE    more equivalent mutants, a JSON list like task.json's\n"
    "                       \"equivalent_mutants\" (see docs/pack-format.md)\n"
    "  --device cpu|cuda[:N]  where to run (default: cpu)\n"
    "  --json               print the report as JSON\n"
    "\n"
    "exit status: 0 every counted mutant killed, 1 some survived, 2 error\n";

/* One equivalent-mutant rule (strings borrowed from the cJSON tree it came from). */
typedef struct {
    const char *op, *line, *after, *reason;
    const char *origin; /* "task.json" or the --equivalent file */
    int used;
} fmx__equiv;

typedef struct {
    fmx__equiv *items;
    int n, cap;
} fmx__equivs;

static double fmx__now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int fmx__fail(const char *fmt, const char *a) {
    fprintf(stderr, "fmx mutate: ");
    fprintf(stderr, fmt, a);
    fputc('\n', stderr);
    return 2;
}

static const char *fmx__str(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static double fmx__num(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

/* ---- equivalent mutants ---- */

/* Appends the rules of a JSON list; the matching rule is in docs/pack-format.md. */
static int fmx__equivs_add(fmx__equivs *eq, const cJSON *list, const char *origin, char *err,
                           size_t errsz) {
    if (!cJSON_IsArray(list)) {
        snprintf(err, errsz, "%s: equivalent_mutants must be a JSON list of objects", origin);
        return FMX_EFORMAT;
    }
    int i = 0;
    const cJSON *o;
    cJSON_ArrayForEach(o, list) {
        const char *keys[] = {"operator", "line_contains", "after_contains", "reason"};
        const char *vals[4] = {0};
        if (!cJSON_IsObject(o)) {
            snprintf(err, errsz, "%s: equivalent_mutants[%d] is not an object", origin, i);
            return FMX_EFORMAT;
        }
        for (const cJSON *f = o->child; f; f = f->next) {
            int k = 0;
            while (k < 4 && strcmp(f->string, keys[k]) != 0)
                k++;
            if (k == 4 || !cJSON_IsString(f)) {
                snprintf(err, errsz,
                         "%s: equivalent_mutants[%d]: '%s' is not one of operator, "
                         "line_contains, after_contains, reason (strings)",
                         origin, i, f->string);
                return FMX_EFORMAT;
            }
            vals[k] = f->valuestring;
        }
        if (!vals[3] || !vals[3][0]) {
            snprintf(err, errsz, "%s: equivalent_mutants[%d] needs a reason", origin, i);
            return FMX_EFORMAT;
        }
        if (!(vals[1] && vals[1][0]) && !(vals[2] && vals[2][0])) {
            snprintf(err, errsz,
                     "%s: equivalent_mutants[%d] needs line_contains or after_contains "
                     "(an entry must name its mutant)",
                     origin, i);
            return FMX_EFORMAT;
        }
        if (eq->n == eq->cap) {
            int cap = eq->cap ? eq->cap * 2 : 8;
            fmx__equiv *items = realloc(eq->items, (size_t)cap * sizeof *items);
            if (!items) return FMX_ENOMEM;
            eq->items = items;
            eq->cap = cap;
        }
        eq->items[eq->n++] = (fmx__equiv){vals[0], vals[1], vals[2], vals[3], origin, 0};
        i++;
    }
    return FMX_OK;
}

/* The first rule that names this mutant, or NULL. */
static fmx__equiv *fmx__equivs_match(fmx__equivs *eq, const cJSON *mutant) {
    const char *op = fmx__str(mutant, "operator");
    const char *before = fmx__str(mutant, "before");
    const char *after = fmx__str(mutant, "after");
    for (int i = 0; i < eq->n; i++) {
        fmx__equiv *e = &eq->items[i];
        if (e->op && e->op[0] && (!op || strcmp(e->op, op) != 0)) continue;
        if (e->line && e->line[0] && (!before || !strstr(before, e->line))) continue;
        if (e->after && e->after[0] && (!after || !strstr(after, e->after))) continue;
        return e;
    }
    return NULL;
}

/* ---- what decided a verdict ---- */

/* Copies the grading numbers of one output or tap result into d. */
static void fmx__copy_grade(cJSON *d, const cJSON *res) {
    const char *keys[] = {"max_abs", "max_rel", "scale",    "atol",
                          "rtol",    "bad",     "compared", "nonfinite"};
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(res, keys[i]);
        if (cJSON_IsNumber(v)) cJSON_AddNumberToObject(d, keys[i], v->valuedouble);
    }
    const char *copy[] = {"shape_ok",   "dtype_ok",  "want_shape", "got_shape",
                          "want_dtype", "got_dtype", "error"};
    for (size_t i = 0; i < sizeof copy / sizeof *copy; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(res, copy[i]);
        if (v) cJSON_AddItemToObject(d, copy[i], cJSON_Duplicate(v, 1));
    }
}

static cJSON *fmx__probe_ref(const cJSON *probe, const char *kind) {
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "kind", kind);
    cJSON_AddStringToObject(d, "probe", fmx__str(probe, "probe") ? fmx__str(probe, "probe") : "");
    cJSON_AddBoolToObject(d, "visible",
                          cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(probe, "visible")));
    return d;
}

/* For a mismatch: the first failing probe call (in grading order), and in it
 * the first failing tap (execution order), else the first failing output. */
static cJSON *fmx__decided_mismatch(const cJSON *report) {
    const cJSON *p;
    cJSON_ArrayForEach(p, cJSON_GetObjectItemCaseSensitive(report, "probes")) {
        if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(p, "pass"))) continue;
        const char *perr = fmx__str(p, "error");
        if (perr) {
            cJSON *d = fmx__probe_ref(p, "outputs");
            cJSON_AddStringToObject(d, "message", perr);
            return d;
        }
        const char *lists[2][2] = {{"taps", "tap"}, {"outputs", "output"}};
        for (int l = 0; l < 2; l++) {
            const cJSON *r;
            cJSON_ArrayForEach(r, cJSON_GetObjectItemCaseSensitive(p, lists[l][0])) {
                const cJSON *pass = cJSON_GetObjectItemCaseSensitive(r, "pass");
                if (!pass || cJSON_IsTrue(pass)) continue; /* a tap with a note is not graded */
                cJSON *d = fmx__probe_ref(p, lists[l][1]);
                cJSON_AddStringToObject(d, "name", fmx__str(r, "name") ? fmx__str(r, "name") : "");
                fmx__copy_grade(d, r);
                return d;
            }
        }
        return fmx__probe_ref(p, "output");
    }
    return cJSON_CreateObject();
}

/* For a survivor: the graded result that came closest to failing (largest max_rel). */
static cJSON *fmx__closest(const cJSON *report) {
    const cJSON *best = NULL, *best_probe = NULL;
    const char *best_kind = "output";
    const cJSON *p;
    cJSON_ArrayForEach(p, cJSON_GetObjectItemCaseSensitive(report, "probes")) {
        const char *lists[2][2] = {{"taps", "tap"}, {"outputs", "output"}};
        for (int l = 0; l < 2; l++) {
            const cJSON *r;
            cJSON_ArrayForEach(r, cJSON_GetObjectItemCaseSensitive(p, lists[l][0])) {
                if (!cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(r, "max_rel"))) continue;
                if (!best || fmx__num(r, "max_rel") > fmx__num(best, "max_rel")) {
                    best = r;
                    best_probe = p;
                    best_kind = lists[l][1];
                }
            }
        }
    }
    if (!best) return cJSON_CreateObject();
    cJSON *d = fmx__probe_ref(best_probe, best_kind);
    cJSON_AddStringToObject(d, "name", fmx__str(best, "name") ? fmx__str(best, "name") : "");
    fmx__copy_grade(d, best);
    return d;
}

/* For a run (or bind) error: the message and the first probe call it hit. */
static cJSON *fmx__decided_error(const cJSON *report) {
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(report, "error");
    const cJSON *p, *hit = NULL;
    cJSON_ArrayForEach(p, cJSON_GetObjectItemCaseSensitive(report, "probes")) {
        if (fmx__str(p, "stage")) {
            hit = p;
            break;
        }
    }
    cJSON *d = hit ? fmx__probe_ref(hit, "error") : cJSON_CreateObject();
    if (!hit) cJSON_AddStringToObject(d, "kind", "error");
    cJSON_AddStringToObject(d, "stage", fmx__str(e, "stage") ? fmx__str(e, "stage") : "");
    cJSON_AddStringToObject(d, "message", fmx__str(e, "message") ? fmx__str(e, "message") : "");
    return d;
}

/* Classifies one verify result; returns the verdict and sets *decided. */
static const char *fmx__verdict(int rc, const cJSON *report, cJSON **decided) {
    const char *stage = fmx__str(cJSON_GetObjectItemCaseSensitive(report, "error"), "stage");
    if (rc == FMX_OK) {
        *decided = fmx__closest(report);
        return "survived";
    }
    if (rc == FMX_EMISMATCH) {
        *decided = fmx__decided_mismatch(report);
        return "killed";
    }
    if (stage && strcmp(stage, "compile") == 0) {
        *decided = cJSON_CreateObject();
        cJSON_AddStringToObject(*decided, "kind", "compile");
        cJSON_AddStringToObject(
            *decided, "message",
            fmx__str(cJSON_GetObjectItemCaseSensitive(report, "error"), "message"));
        return "invalid";
    }
    *decided = fmx__decided_error(report);
    return "killed";
}

/* ---- text ---- */

/* The first line of s, at most n bytes, into buf. */
static const char *fmx__first_line(const char *s, char *buf, size_t n) {
    size_t k = 0;
    while (s && s[k] && s[k] != '\n' && k + 1 < n) {
        buf[k] = s[k];
        k++;
    }
    buf[k] = '\0';
    return buf;
}

static void fmx__shape(const cJSON *arr, char *buf, size_t n) {
    size_t used = (size_t)snprintf(buf, n, "(");
    const cJSON *d;
    int i = 0;
    cJSON_ArrayForEach(d, arr) {
        if (used >= n) return;
        used += (size_t)snprintf(buf + used, n - used, "%s%lld", i++ ? ", " : "",
                                 (long long)d->valuedouble);
    }
    if (used < n) snprintf(buf + used, n - used, ")");
}

/* One line saying what decided a verdict. */
static void fmx__decided_text(const cJSON *d, const char *verdict, char *buf, size_t n) {
    const char *kind = fmx__str(d, "kind") ? fmx__str(d, "kind") : "";
    const char *probe = fmx__str(d, "probe") ? fmx__str(d, "probe") : "";
    const char *hidden =
        cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(d, "visible")) ? " [hidden]" : "";
    char line[200];
    if (strcmp(kind, "compile") == 0) {
        snprintf(buf, n, "not in the candidate language: %s",
                 fmx__first_line(fmx__str(d, "message"), line, sizeof line));
    } else if (strcmp(kind, "error") == 0) {
        snprintf(buf, n, "%s error on %s%s: %s", fmx__str(d, "stage"), probe, hidden,
                 fmx__first_line(fmx__str(d, "message"), line, sizeof line));
    } else if (strcmp(kind, "outputs") == 0) {
        snprintf(buf, n, "%s%s: %s", probe, hidden,
                 fmx__first_line(fmx__str(d, "message"), line, sizeof line));
    } else if (!kind[0]) {
        snprintf(buf, n, "%s", strcmp(verdict, "survived") == 0 ? "nothing graded" : "");
    } else if (fmx__str(d, "error")) {
        snprintf(buf, n, "%s%s %s %s: %s", probe, hidden, kind, fmx__str(d, "name"),
                 fmx__first_line(fmx__str(d, "error"), line, sizeof line));
    } else if (cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(d, "shape_ok"))) {
        char ws[96], gs[96];
        fmx__shape(cJSON_GetObjectItemCaseSensitive(d, "want_shape"), ws, sizeof ws);
        fmx__shape(cJSON_GetObjectItemCaseSensitive(d, "got_shape"), gs, sizeof gs);
        snprintf(buf, n, "%s%s %s %s: shape %s, expected %s", probe, hidden, kind,
                 fmx__str(d, "name"), gs, ws);
    } else if (cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(d, "dtype_ok"))) {
        snprintf(buf, n, "%s%s %s %s: dtype %s, expected %s", probe, hidden, kind,
                 fmx__str(d, "name"), fmx__str(d, "got_dtype"), fmx__str(d, "want_dtype"));
    } else if (strcmp(verdict, "survived") == 0) {
        snprintf(buf, n, "closest: %s%s %s %s max rel %.1e (rtol %.0e)", probe, hidden, kind,
                 fmx__str(d, "name"), fmx__num(d, "max_rel"), fmx__num(d, "rtol"));
    } else {
        int nonfinite = fmx__num(d, "nonfinite") > 0;
        snprintf(buf, n, "%s%s %s %s: max rel %.1e > rtol %.0e, %.0f of %.0f elements%s", probe,
                 hidden, kind, fmx__str(d, "name"), fmx__num(d, "max_rel"), fmx__num(d, "rtol"),
                 fmx__num(d, "bad"), fmx__num(d, "compared"), nonfinite ? " (NaN/Inf)" : "");
    }
}

static void fmx__print_mutant(FILE *out, const cJSON *m, int color) {
    const char *verdict = fmx__str(m, "verdict");
    const char *col = "";
    if (color) {
        if (strcmp(verdict, "killed") == 0)
            col = "\033[32m";
        else if (strcmp(verdict, "survived") == 0)
            col = "\033[31m";
        else
            col = "\033[33m";
    }
    char why[512];
    fmx__decided_text(cJSON_GetObjectItemCaseSensitive(m, "decided_by"), verdict, why, sizeof why);
    fprintf(out, "  %-5s %s%-10s%s %-11s L%-4d %s  (%.0f ms)\n", fmx__str(m, "id"), col,
            strcmp(verdict, "survived") == 0 ? "SURVIVED" : verdict, color ? "\033[0m" : "",
            fmx__str(m, "operator"), (int)fmx__num(m, "line"), why, fmx__num(m, "ms"));
    fprintf(out, "        %s  ->  %s\n", fmx__str(m, "before"), fmx__str(m, "after"));
    const cJSON *eq = cJSON_GetObjectItemCaseSensitive(m, "equivalent");
    if (eq)
        fprintf(out, "        equivalent (%s): %s\n", fmx__str(eq, "from"), fmx__str(eq, "reason"));
}

/* The score line: `fmx export --solution` prints it too. */
static void fmx__print_score(FILE *out, const cJSON *summary, double seconds) {
    int killed = (int)fmx__num(summary, "killed"), survived = (int)fmx__num(summary, "survived");
    int equivalent = (int)fmx__num(summary, "equivalent"),
        invalid = (int)fmx__num(summary, "invalid");
    if (killed + survived > 0)
        fprintf(out, "mutation score %.1f%%: %d of %d killed, %d survived",
                100.0 * killed / (killed + survived), killed, killed + survived, survived);
    else
        fprintf(out, "mutation score n/a: no countable mutant");
    fprintf(out, " (%d equivalent, %d invalid not counted; %d mutants in %.1f s)\n", equivalent,
            invalid, (int)fmx__num(summary, "mutants"), seconds);
}

/* ---- the command ---- */

typedef struct {
    const char *pack, *solution, *equivalent, *device;
    int json;
    fmx_verify_config cfg;
} fmx__opts;

static int fmx__parse(int argc, char **argv, fmx__opts *o) {
    const char *pos[2] = {0};
    int npos = 0;
    o->cfg = fmx_verify_config_default();
    o->cfg.all_probes = 1;
    o->device = "cpu";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has_value = i + 1 < argc;
        if (strcmp(a, "--json") == 0) {
            o->json = 1;
        } else if (strcmp(a, "--decode") == 0) {
            o->cfg.decode = 1;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            fputs(usage_text, stdout);
            return 0;
        } else if (strcmp(a, "--component") == 0 || strcmp(a, "--entry") == 0 ||
                   strcmp(a, "--equivalent") == 0 || strcmp(a, "--device") == 0) {
            if (!has_value) return fmx__fail("%s needs a value", a);
            const char *v = argv[++i];
            if (a[2] == 'c')
                o->cfg.component = v;
            else if (a[2] == 'd')
                o->device = v;
            else if (a[3] == 'n')
                o->cfg.entry = v;
            else
                o->equivalent = v;
        } else if (a[0] == '-' && a[1]) {
            return fmx__fail("unknown option '%s' (see fmx mutate --help)", a);
        } else if (npos < 2) {
            pos[npos++] = a;
        } else {
            return fmx__fail("unexpected argument '%s'", a);
        }
    }
    if (npos != 2) return fmx__fail("%s", "needs PACK and SOLUTION: fmx mutate PACK SOLUTION");
    o->pack = pos[0];
    o->solution = pos[1];
    return -1;
}

/* Prints an error as the command's answer (JSON too when asked); returns 2. */
static int fmx__error_out(const fmx__opts *o, const char *stage, const char *msg) {
    fprintf(stderr, "fmx mutate: %s\n", msg);
    if (o->json) {
        cJSON *r = cJSON_CreateObject();
        cJSON_AddStringToObject(r, "status", "error");
        cJSON *e = cJSON_AddObjectToObject(r, "error");
        cJSON_AddStringToObject(e, "stage", stage);
        cJSON_AddStringToObject(e, "message", msg);
        char *text = cJSON_Print(r);
        if (text) puts(text);
        free(text);
        cJSON_Delete(r);
    }
    return 2;
}

/* The solution must pass every probe: mutants of a wrong program say nothing. */
static int fmx__check_solution(fmx_pack *pack, const fmx__opts *o, const char *src, size_t len,
                               cJSON **summary) {
    cJSON *report = NULL;
    int rc = fmx_verify_source(pack, src, len, o->solution, &o->cfg, &report);
    char msg[FMX__ERR + 256], line[400];
    if (rc == FMX_OK) {
        *summary = cJSON_CreateObject();
        cJSON_AddNumberToObject(*summary, "graded", fmx__num(report, "graded"));
        cJSON_AddNumberToObject(*summary, "compile_ms", fmx__num(report, "compile_ms"));
        const char *cls = fmx__str(report, "class");
        cJSON_AddStringToObject(*summary, "class", cls ? cls : "");
        cJSON_Delete(report);
        return 0;
    }
    if (rc == FMX_EMISMATCH) {
        const cJSON *d = cJSON_GetObjectItemCaseSensitive(report, "first_divergence");
        snprintf(msg, sizeof msg,
                 "the solution %s does not pass pack %s: it first diverges at %s on probe %s "
                 "(fmx verify %s %s --probes all says more); mutants of a wrong solution "
                 "measure nothing",
                 o->solution, o->pack, fmx__str(d, "name"), fmx__str(d, "probe"), o->pack,
                 o->solution);
    } else {
        const cJSON *e = cJSON_GetObjectItemCaseSensitive(report, "error");
        snprintf(msg, sizeof msg, "the solution %s does not pass pack %s (%s error: %s)",
                 o->solution, o->pack, fmx__str(e, "stage") ? fmx__str(e, "stage") : "?",
                 fmx__first_line(fmx__str(e, "message"), line, sizeof line));
    }
    cJSON_Delete(report);
    return fmx__error_out(o, "solution", msg);
}

/* Runs the generator; returns its JSON list (caller frees) or NULL with err set. */
static cJSON *fmx__generate(const fmx__opts *o, char *err, size_t errsz) {
    const char *args[] = {o->solution, "--json", "--entry", o->cfg.entry, NULL};
    char *out = NULL;
    size_t len = 0;
    int rc = fmx_python_run("fmx.mutate", args, &out, &len, err, errsz);
    if (rc != 0) {
        if (rc > 0)
            snprintf(err, errsz,
                     "the mutant generator (python3 -m fmx.mutate) failed with exit "
                     "status %d; its message is above",
                     rc);
        free(out);
        return NULL;
    }
    cJSON *list = cJSON_ParseWithLength(out, len);
    free(out);
    if (!cJSON_IsArray(list)) {
        snprintf(err, errsz, "the mutant generator printed something that is not a JSON list");
        cJSON_Delete(list);
        return NULL;
    }
    return list;
}

static void fmx__count(cJSON *ops, const char *op, const char *verdict) {
    cJSON *o = cJSON_GetObjectItemCaseSensitive(ops, op);
    if (!o) {
        o = cJSON_AddObjectToObject(ops, op);
        const char *keys[] = {"mutants", "killed", "survived", "equivalent", "invalid"};
        for (int i = 0; i < 5; i++)
            cJSON_AddNumberToObject(o, keys[i], 0);
    }
    cJSON *n = cJSON_GetObjectItemCaseSensitive(o, "mutants");
    cJSON_SetNumberValue(n, n->valuedouble + 1);
    n = cJSON_GetObjectItemCaseSensitive(o, verdict);
    if (n) cJSON_SetNumberValue(n, n->valuedouble + 1);
}

int fmx_mutate_main(int argc, char **argv) {
    fmx__opts o = {0};
    int rc = fmx__parse(argc, argv, &o);
    if (rc >= 0) return rc;
    if (!o.cfg.entry) o.cfg.entry = "forward";
    if (!o.cfg.component) o.cfg.component = "";
    double t0 = fmx__now_ms();

    char err[FMX__ERR];
    /* each mutant runs in a sandboxed evaluation process with a time limit
     * (a mutated loop bound can make it endless) */
    fmx_evaluator_config ec = fmx_evaluator_config_default();
    ec.timeout_s = 60;
    ec.device = o.device ? o.device : "cpu";
    fmx_evaluator_configure(&ec);
    if (fmx_engine_set_device(o.device, err, sizeof err) != 0)
        return fmx__error_out(&o, "device", err);
    fmx_pack *pack = NULL;
    if (fmx_pack_open(o.pack, &pack, err, sizeof err) != 0) return fmx__error_out(&o, "pack", err);
    size_t len = 0;
    char *src = fmx_file_read(o.solution, &len, err, sizeof err);
    cJSON *equiv_file = NULL, *mutants = NULL, *solution = NULL, *report = NULL;
    fmx__equivs eq = {0};
    int status = 2;
    if (!src) {
        status = fmx__error_out(&o, "solution", err);
        goto done;
    }

    /* Equivalent mutants: the pack's, then the user's. */
    const cJSON *pack_eq =
        cJSON_GetObjectItemCaseSensitive(fmx_pack_manifest(pack), "equivalent_mutants");
    if (pack_eq && fmx__equivs_add(&eq, pack_eq, "task.json", err, sizeof err) != FMX_OK) {
        status = fmx__error_out(&o, "equivalent", err);
        goto done;
    }
    if (o.equivalent) {
        size_t elen = 0;
        char *text = fmx_file_read(o.equivalent, &elen, err, sizeof err);
        if (text) {
            equiv_file = cJSON_ParseWithLength(text, elen);
            free(text);
            if (!equiv_file) snprintf(err, sizeof err, "%s: not valid JSON", o.equivalent);
        }
        if (!equiv_file || fmx__equivs_add(&eq, equiv_file, o.equivalent, err, sizeof err)) {
            status = fmx__error_out(&o, "equivalent", err);
            goto done;
        }
    }

    if (fmx__check_solution(pack, &o, src, len, &solution) != 0) goto done;

    double tg = fmx__now_ms();
    mutants = fmx__generate(&o, err, sizeof err);
    if (!mutants) {
        status = fmx__error_out(&o, "generate", err);
        goto done;
    }
    double gen_ms = fmx__now_ms() - tg;

    report = cJSON_CreateObject();
    cJSON_AddStringToObject(report, "status", "ok");
    cJSON_AddStringToObject(report, "pack", fmx_pack_name(pack));
    cJSON_AddStringToObject(report, "solution", o.solution);
    cJSON_AddStringToObject(report, "component", o.cfg.component);
    cJSON_AddStringToObject(report, "class", fmx__str(solution, "class"));
    cJSON_AddStringToObject(report, "entry", o.cfg.entry);
    cJSON_AddStringToObject(report, "engine", fmx_engine_version());
    cJSON_AddStringToObject(report, "device", fmx_engine_device());
    cJSON_AddNumberToObject(report, "graded", fmx__num(solution, "graded"));
    cJSON_AddNumberToObject(report, "generator_ms", gen_ms);
    cJSON *results = cJSON_AddArrayToObject(report, "mutants");
    cJSON *summary = cJSON_CreateObject();
    cJSON *ops = cJSON_CreateObject();
    int counts[4] = {0}; /* killed, survived, equivalent, invalid */

    if (!o.json) {
        printf("fmx mutate: %s against pack %s (%s%s%s, entry %s(), %d probe calls, all probes, "
               "%s)\n",
               o.solution, fmx_pack_name(pack),
               o.cfg.component[0] ? o.cfg.component : "whole model", o.cfg.component[0] ? " " : "",
               o.cfg.component[0] ? fmx__str(solution, "class") : "", o.cfg.entry,
               (int)fmx__num(solution, "graded"), fmx_engine_device());
        printf("the solution matches on every probe; %d mutants\n\n", cJSON_GetArraySize(mutants));
    }
    int color = !o.json && isatty(STDOUT_FILENO);
    /* mutants k/N on stderr, unless each one's line goes to a terminal already */
    fmx_progress *progress = fmx_progress_create("mutants", cJSON_GetArraySize(mutants), color);
    const cJSON *m;
    cJSON_ArrayForEach(m, mutants) {
        fmx_progress_step(progress, fmx__str(m, "id"));
        const char *msrc = fmx__str(m, "source");
        if (!msrc || !fmx__str(m, "id") || !fmx__str(m, "operator")) {
            status = fmx__error_out(&o, "generate",
                                    "the generator's mutant lacks id, operator or source");
            cJSON_Delete(summary);
            cJSON_Delete(ops);
            fmx_progress_destroy(progress);
            goto done;
        }
        double tm = fmx__now_ms();
        cJSON *vr = NULL;
        int vrc = fmx_verify_source(pack, msrc, strlen(msrc), o.solution, &o.cfg, &vr);
        cJSON *decided = NULL;
        const char *verdict = vr ? fmx__verdict(vrc, vr, &decided) : "killed";
        if (!vr) {
            decided = cJSON_CreateObject();
            cJSON_AddStringToObject(decided, "kind", "error");
            cJSON_AddStringToObject(decided, "message", fmx_strerror(vrc));
        }
        cJSON_Delete(vr);
        double ms = fmx__now_ms() - tm;

        cJSON *r = cJSON_CreateObject();
        const char *fields[] = {"id",          "operator", "line", "function",
                                "description", "before",   "after"};
        for (size_t i = 0; i < sizeof fields / sizeof *fields; i++) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(m, fields[i]);
            if (v) cJSON_AddItemToObject(r, fields[i], cJSON_Duplicate(v, 1));
        }
        fmx__equiv *e = fmx__equivs_match(&eq, m);
        if (e && strcmp(verdict, "invalid") != 0) {
            e->used++;
            cJSON *eo = cJSON_CreateObject();
            cJSON_AddStringToObject(eo, "reason", e->reason);
            cJSON_AddStringToObject(eo, "from", e->origin);
            /* Whether the probes kill it anyway: then the entry is not needed. */
            cJSON_AddBoolToObject(eo, "killed", strcmp(verdict, "killed") == 0);
            cJSON_AddItemToObject(r, "equivalent", eo);
            verdict = "equivalent";
        }
        cJSON_AddStringToObject(r, "verdict", verdict);
        cJSON_AddItemToObject(r, "decided_by", decided);
        cJSON_AddNumberToObject(r, "ms", ms);
        cJSON_AddItemToArray(results, r);
        counts[strcmp(verdict, "killed") == 0       ? 0
               : strcmp(verdict, "survived") == 0   ? 1
               : strcmp(verdict, "equivalent") == 0 ? 2
                                                    : 3]++;
        fmx__count(ops, fmx__str(m, "operator"), verdict);
        if (!o.json) fmx__print_mutant(stdout, r, color);
    }
    fmx_progress_destroy(progress);

    cJSON *unused = cJSON_AddArrayToObject(report, "unused_equivalents");
    for (int i = 0; i < eq.n; i++) {
        if (eq.items[i].used) continue;
        cJSON *u = cJSON_CreateObject();
        if (eq.items[i].op) cJSON_AddStringToObject(u, "operator", eq.items[i].op);
        if (eq.items[i].line) cJSON_AddStringToObject(u, "line_contains", eq.items[i].line);
        if (eq.items[i].after) cJSON_AddStringToObject(u, "after_contains", eq.items[i].after);
        cJSON_AddStringToObject(u, "reason", eq.items[i].reason);
        cJSON_AddStringToObject(u, "from", eq.items[i].origin);
        cJSON_AddItemToArray(unused, u);
    }
    double total_ms = fmx__now_ms() - t0;
    cJSON_AddNumberToObject(summary, "mutants", cJSON_GetArraySize(mutants));
    cJSON_AddNumberToObject(summary, "killed", counts[0]);
    cJSON_AddNumberToObject(summary, "survived", counts[1]);
    cJSON_AddNumberToObject(summary, "equivalent", counts[2]);
    cJSON_AddNumberToObject(summary, "invalid", counts[3]);
    if (counts[0] + counts[1] > 0)
        cJSON_AddNumberToObject(summary, "score", (double)counts[0] / (counts[0] + counts[1]));
    else
        cJSON_AddNullToObject(summary, "score");
    cJSON_AddItemToObject(summary, "operators", ops);
    cJSON_AddItemToObject(report, "summary", summary);
    cJSON_AddNumberToObject(report, "total_ms", total_ms);
    status = counts[1] ? 1 : 0;
    cJSON_ReplaceItemInObjectCaseSensitive(report, "status",
                                           cJSON_CreateString(status ? "survivors" : "ok"));

    if (o.json) {
        char *text = cJSON_Print(report);
        if (text) puts(text);
        free(text);
    } else {
        const cJSON *r;
        if (counts[1]) {
            printf("\nsurvivors (the probes cannot tell these from the solution):\n");
            cJSON_ArrayForEach(r, results) {
                if (strcmp(fmx__str(r, "verdict"), "survived") == 0)
                    fmx__print_mutant(stdout, r, color);
            }
        }
        for (int i = 0; i < cJSON_GetArraySize(unused); i++) {
            const cJSON *u = cJSON_GetArrayItem(unused, i);
            printf("\nnote: equivalent entry from %s matched no mutant: %s\n", fmx__str(u, "from"),
                   fmx__str(u, "reason"));
        }
        printf("\n");
        fmx__print_score(stdout, summary, total_ms / 1e3);
    }

done:
    cJSON_Delete(report);
    cJSON_Delete(solution);
    cJSON_Delete(mutants);
    cJSON_Delete(equiv_file);
    free(eq.items);
    free(src);
    fmx_pack_close(pack);
    return status;
}
