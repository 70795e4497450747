/*
 * reward.c — the reward of a graded submission (see reward.h): the default
 * config and its file loader, the formula, the breakdown as JSON, and the
 * logical-line counter behind the LOC score.
 *
 * The counter reads the source through fmx's one Python model
 * (env/pysource.h: tokens, logical lines, top-level blocks), the one the
 * compiler's preprocessing reads too, and adds enough of the statement
 * grammar (`;`, compound headers ending in `:`) to count statements.
 * Source that is not valid Python is counted as far as the same rules go.
 *
 * Not here: running the candidate or measuring its graph facts (env/).
 */
#define _POSIX_C_SOURCE 200809L
#include "rewards/reward.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pysource.h"
#include "status.h"

/* ---- config ---- */

fmx_reward_config fmx_reward_config_default(void) {
    fmx_reward_config c;
    memset(&c, 0, sizeof c);
    snprintf(c.version, sizeof c.version, "%s", "v1-default");
    c.w_correct = 0.6;
    c.w_loc = 0.25;
    c.w_compile = 0.15;
    c.loc_slack = 1.0;
    return c;
}

static void copy_err(char *err, size_t errsz, const char *fmt, ...) {
    if (!err || !errsz) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errsz, fmt, ap);
    va_end(ap);
}

static char *trim(char *s) {
    while (*s == ' ' || *s == '\t')
        s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r' || s[n - 1] == '\n'))
        s[--n] = '\0';
    return s;
}

static int parse_number(const char *v, double *out) {
    if (!*v) return 0;
    char *end = NULL;
    errno = 0;
    double d = strtod(v, &end);
    if (errno || *end || !isfinite(d)) return 0;
    *out = d;
    return 1;
}

int fmx_reward_config_load(const char *path, fmx_reward_config *cfg, char *err, size_t errsz) {
    if (err && errsz) err[0] = '\0';
    if (!path || !cfg) {
        copy_err(err, errsz, "reward config: path and cfg required");
        return FMX_EINVAL;
    }
    FILE *f = fopen(path, "r");
    if (!f) {
        copy_err(err, errsz, "%s: cannot open: %s", path, strerror(errno));
        return FMX_EIO;
    }
    fmx_reward_config c = fmx_reward_config_default();
    const struct {
        const char *key;
        double *dst;
        double min; /* values must be >= min (> min when strict) */
        int strict;
    } nums[] = {
        {"w_correct", &c.w_correct, 0, 0},
        {"w_loc", &c.w_loc, 0, 0},
        {"w_compile", &c.w_compile, 0, 0},
        {"loc_slack", &c.loc_slack, 0, 1},
    };
    enum { N_NUMS = sizeof nums / sizeof nums[0] };
    int seen[N_NUMS + 1] = {0}; /* the last one is version */
    char line[1024];
    int lineno = 0, st = FMX_OK;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        size_t len = strlen(line);
        if (len == sizeof line - 1 && line[len - 1] != '\n' && !feof(f)) {
            copy_err(err, errsz, "%s:%d: line longer than %zu bytes", path, lineno,
                     sizeof line - 2);
            st = FMX_EFORMAT;
            break;
        }
        char *hash = strchr(line, '#');
        if (hash) *hash = '\0';
        char *s = trim(line);
        if (!*s) continue;
        char *eq = strchr(s, '=');
        if (!eq) {
            copy_err(err, errsz, "%s:%d: expected `key = value`, got \"%s\"", path, lineno, s);
            st = FMX_EFORMAT;
            break;
        }
        *eq = '\0';
        char *key = trim(s), *val = trim(eq + 1);
        int k = -1;
        for (int i = 0; i < N_NUMS; i++)
            if (strcmp(key, nums[i].key) == 0) k = i;
        if (strcmp(key, "version") == 0) k = N_NUMS;
        if (k < 0) {
            copy_err(err, errsz,
                     "%s:%d: unknown key \"%s\" (known: version, w_correct, w_loc, w_compile, "
                     "loc_slack)",
                     path, lineno, key);
            st = FMX_EFORMAT;
            break;
        }
        if (seen[k]) {
            copy_err(err, errsz, "%s:%d: \"%s\" set twice", path, lineno, key);
            st = FMX_EFORMAT;
            break;
        }
        seen[k] = 1;
        if (k == N_NUMS) {
            size_t n = strlen(val);
            if (n >= 2 && (val[0] == '"' || val[0] == '\'') && val[n - 1] == val[0]) {
                val[n - 1] = '\0';
                val++;
                n -= 2;
            }
            if (n == 0 || n >= sizeof c.version) {
                copy_err(err, errsz, "%s:%d: version must be 1 to %zu characters", path, lineno,
                         sizeof c.version - 1);
                st = FMX_EFORMAT;
                break;
            }
            memcpy(c.version, val, n + 1);
            continue;
        }
        double d;
        if (!parse_number(val, &d)) {
            copy_err(err, errsz, "%s:%d: %s: \"%s\" is not a number", path, lineno, key, val);
            st = FMX_EFORMAT;
            break;
        }
        if (d < nums[k].min || (nums[k].strict && d == nums[k].min)) {
            copy_err(err, errsz, "%s:%d: %s must be %s %g, got %g", path, lineno, key,
                     nums[k].strict ? ">" : ">=", nums[k].min, d);
            st = FMX_EFORMAT;
            break;
        }
        *nums[k].dst = d;
    }
    if (!st && ferror(f)) {
        copy_err(err, errsz, "%s: read error", path);
        st = FMX_EIO;
    }
    fclose(f);
    if (!st && !seen[N_NUMS]) {
        copy_err(err, errsz,
                 "%s: no `version = ...` line (a config names its version: it is stored with "
                 "every grade)",
                 path);
        st = FMX_EFORMAT;
    }
    if (!st) *cfg = c;
    return st;
}

/* ---- the formula ---- */

static double clamp01(double x) {
    if (!(x > 0)) return 0; /* NaN too */
    return x < 1 ? x : 1;
}

static double loc_score(const fmx_reward_config *cfg, long loc, long target) {
    if (loc <= target) return 1;
    double span = (double)target * cfg->loc_slack;
    if (!(span > 0)) return 0;
    return clamp01(1.0 - (double)(loc - target) / span);
}

static double compile_score(const fmx_grade_facts *g) {
    if (!g->compiled) return 0;
    int facts = !g->host_syncs + !g->data_dependent_flow + !!g->survives_optimization +
                !!g->runs_all_shapes;
    return facts / 4.0;
}

fmx_reward_breakdown fmx_reward_score(const fmx_reward_config *cfg, const fmx_grade_facts *g) {
    fmx_reward_breakdown b = {0, 0, 0, 0};
    if (!cfg || !g) return b;
    b.correctness = clamp01(g->correctness);
    b.loc_score = loc_score(cfg, g->loc, g->target_loc);
    b.compile_score = compile_score(g);
    b.reward = cfg->w_correct * b.correctness;
    if (b.correctness == 1.0)
        b.reward += cfg->w_loc * b.loc_score + cfg->w_compile * b.compile_score;
    return b;
}

/* ---- breakdown JSON ---- */

typedef struct {
    char *p;
    size_t n, len;
    int overflow;
} jbuf;

static void jput(jbuf *j, const char *fmt, ...) {
    if (j->overflow) return;
    va_list ap;
    va_start(ap, fmt);
    int w = vsnprintf(j->p + j->len, j->n - j->len, fmt, ap);
    va_end(ap);
    if (w < 0 || (size_t)w >= j->n - j->len)
        j->overflow = 1;
    else
        j->len += (size_t)w;
}

/* A JSON number; null for NaN and infinities, which JSON cannot hold. */
static void jnum(jbuf *j, const char *key, double v) {
    if (isfinite(v))
        jput(j, "\"%s\":%.17g", key, v);
    else
        jput(j, "\"%s\":null", key);
}

static void jstr(jbuf *j, const char *s) {
    jput(j, "\"");
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (*c == '"' || *c == '\\')
            jput(j, "\\%c", *c);
        else if (*c < 0x20)
            jput(j, "\\u%04x", *c);
        else
            jput(j, "%c", *c);
    }
    jput(j, "\"");
}

int fmx_reward_breakdown_json(const fmx_reward_config *cfg, const fmx_grade_facts *g,
                              const fmx_reward_breakdown *b, char *buf, size_t n) {
    if (!cfg || !g || !b || !buf || !n) return FMX_EINVAL;
    jbuf j = {buf, n, 0, 0};
    char version[sizeof cfg->version];
    memcpy(version, cfg->version, sizeof version);
    version[sizeof version - 1] = '\0';
    jput(&j, "{\"version\":");
    jstr(&j, version);
    jput(&j, ",");
    jnum(&j, "reward", b->reward);
    jput(&j, ",");
    jnum(&j, "correctness", b->correctness);
    jput(&j, ",");
    jnum(&j, "loc_score", b->loc_score);
    jput(&j, ",");
    jnum(&j, "compile_score", b->compile_score);
    jput(&j, ",\"weights\":{");
    jnum(&j, "w_correct", cfg->w_correct);
    jput(&j, ",");
    jnum(&j, "w_loc", cfg->w_loc);
    jput(&j, ",");
    jnum(&j, "w_compile", cfg->w_compile);
    jput(&j, ",");
    jnum(&j, "loc_slack", cfg->loc_slack);
    jput(&j, "},\"facts\":{");
    jnum(&j, "correctness", g->correctness);
    jput(&j, ",\"loc\":%ld,\"target_loc\":%ld", g->loc, g->target_loc);
    jput(&j, ",\"compiled\":%s,\"host_syncs\":%s,\"data_dependent_flow\":%s",
         g->compiled ? "true" : "false", g->host_syncs ? "true" : "false",
         g->data_dependent_flow ? "true" : "false");
    jput(&j, ",\"survives_optimization\":%s,\"runs_all_shapes\":%s}}",
         g->survives_optimization ? "true" : "false", g->runs_all_shapes ? "true" : "false");
    if (j.overflow) {
        buf[0] = '\0';
        return FMX_EINVAL;
    }
    return FMX_OK;
}

/* ---- logical lines of Python ---- */

/* The counter reads fmx's one model of Python source (env/pysource.h):
 * top-level blocks, their logical lines, and tokens. Within a logical line a
 * small statement tracker splits statements at `;` and compound headers at
 * their `:`, and counts each one's tokens. */

enum {
    LOC_TOKENS_PER_STATEMENT = 48,
    LOC_FIRST = 2 /* tokens of a statement kept: enough to tell imports and headers */
};

typedef struct {
    const fmx_pysource *ps;
    long total;
    int expect_doc; /* the next statement is the first of the module or of a def/class body */

    /* the current statement */
    int in_stmt, compound, depth, lambdas, strings_only;
    long ntok;
    size_t nfirst;
    const fmx_py_token *first[LOC_FIRST];
} loc_state;

static int tok_is(const loc_state *st, const fmx_py_token *t, fmx_py_kind kind, const char *text) {
    return fmx_pysource_tok_is(st->ps, t, (int)kind, text);
}

static long cost_of(long ntok) {
    return (ntok + LOC_TOKENS_PER_STATEMENT - 1) / LOC_TOKENS_PER_STATEMENT;
}

static int is_compound(const loc_state *st, const fmx_py_token *t) {
    static const char *const kw[] = {"if",  "elif",   "else",    "for", "while", "with",
                                     "try", "except", "finally", "def", "class", "async"};
    for (size_t i = 0; i < sizeof kw / sizeof kw[0]; i++)
        if (tok_is(st, t, FMX_PY_NAME, kw[i])) return 1;
    return 0;
}

/* A compound statement's header is complete (at its `:` or the line's end). */
static void end_header(loc_state *st) {
    const fmx_py_token *const *t = st->first;
    st->in_stmt = 0;
    st->total += cost_of(st->ntok);
    st->expect_doc = tok_is(st, t[0], FMX_PY_NAME, "def") ||
                     tok_is(st, t[0], FMX_PY_NAME, "class") ||
                     (tok_is(st, t[0], FMX_PY_NAME, "async") && st->nfirst > 1 &&
                      tok_is(st, t[1], FMX_PY_NAME, "def"));
}

/* A simple statement is complete (at a `;` outside brackets or the line's end). */
static void end_simple(loc_state *st) {
    const fmx_py_token *t0 = st->first[0];
    st->in_stmt = 0;
    if (tok_is(st, t0, FMX_PY_NAME, "import") || tok_is(st, t0, FMX_PY_NAME, "from"))
        ;                                           /* free */
    else if (!(st->expect_doc && st->strings_only)) /* a docstring is free */
        st->total += cost_of(st->ntok);
    st->expect_doc = 0;
}

static void on_token(loc_state *st, const fmx_py_token *t) {
    int semicolon = tok_is(st, t, FMX_PY_OP, ";");
    if (!st->in_stmt) {
        if (semicolon) return; /* empty statement */
        st->in_stmt = 1;
        st->compound = is_compound(st, t);
        st->depth = st->lambdas = 0;
        st->strings_only = 1;
        st->ntok = 0;
        st->nfirst = 0;
    }
    if (!st->compound && st->depth == 0 && semicolon) {
        end_simple(st); /* the `;` belongs to neither statement */
        return;
    }
    if (st->nfirst < LOC_FIRST) st->first[st->nfirst++] = t;
    /* An f-string's fields are code: their tokens count, and it is never a
     * docstring. */
    st->ntok += 1 + fmx_pysource_field_tokens(fmx_pysource_text(st->ps), t);
    if (t->kind != FMX_PY_STRING || (t->flags & FMX_PY_FSTRING)) st->strings_only = 0;
    int one = t->kind == FMX_PY_OP && t->end - t->start == 1;
    char c = one ? fmx_pysource_text(st->ps)[t->start] : 0;
    if (c == '(' || c == '[' || c == '{') {
        st->depth++;
    } else if (c == ')' || c == ']' || c == '}') {
        if (st->depth > 0) st->depth--;
    } else if (st->compound && st->depth == 0) {
        /* The header ends at the first `:` outside brackets that is not a lambda's. */
        if (tok_is(st, t, FMX_PY_NAME, "lambda"))
            st->lambdas++;
        else if (c == ':' && st->lambdas)
            st->lambdas--;
        else if (c == ':')
            end_header(st);
    }
}

static void on_line_end(loc_state *st) {
    if (st->in_stmt) {
        if (st->compound)
            end_header(st); /* no `:`: the whole line is the header */
        else
            end_simple(st);
    }
    st->in_stmt = 0;
}

/* A top-level `def tap` (decorators included) or `if __name__ == "__main__":`
 * block: the engine drops it, so it counts zero. */
static int zero_block(const fmx_pysource *ps, const fmx_py_block *b) {
    const fmx_py_line *lines;
    fmx_pysource_lines(ps, &lines);
    if (lines[b->header].indent != 0) return 0;
    if (b->kind == FMX_PY_BLOCK_MAIN) return 1;
    const fmx_py_token *toks;
    fmx_pysource_tokens(ps, &toks);
    return b->kind == FMX_PY_BLOCK_DEF &&
           fmx_pysource_tok_is(ps, &toks[b->name], FMX_PY_NAME, "tap");
}

long fmx_reward_count_loc(const char *source, size_t len) {
    if (!source) return 0;
    fmx_pysource *ps = NULL;
    if (fmx_pysource_open(source, len, &ps) != FMX_OK) return LONG_MAX;
    const fmx_py_block *blocks;
    const fmx_py_line *lines;
    const fmx_py_token *toks;
    long nb = fmx_pysource_blocks(ps, &blocks);
    fmx_pysource_lines(ps, &lines);
    fmx_pysource_tokens(ps, &toks);
    loc_state st;
    memset(&st, 0, sizeof st);
    st.ps = ps;
    st.expect_doc = 1;
    for (long b = 0; b < nb; b++) {
        if (zero_block(ps, &blocks[b])) {
            st.expect_doc = 0;
            continue;
        }
        for (long li = blocks[b].line; li < blocks[b].line + blocks[b].nlines; li++) {
            for (long k = lines[li].tok; k < lines[li].tok + lines[li].ntok; k++)
                if (fmx_py_is_code(&toks[k])) on_token(&st, &toks[k]);
            on_line_end(&st);
        }
    }
    fmx_pysource_close(ps);
    return st.total;
}
