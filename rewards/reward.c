/*
 * reward.c — the reward of a graded submission (see reward.h): the default
 * config and its file loader, the formula, the breakdown as JSON, and the
 * logical-line counter behind the LOC score.
 *
 * The counter is a small Python tokenizer: it knows strings of every form
 * (prefixes, triple quotes, escapes, strings over several lines), comments,
 * bracket nesting, backslash continuations, and enough of the statement
 * grammar (`;`, compound headers ending in `:`, indentation) to count
 * statements. It never fails: source that is not valid Python is counted as
 * far as the same rules go.
 *
 * Not here: running the candidate or measuring its graph facts (env/).
 */
#define _POSIX_C_SOURCE 200809L
#include "rewards/reward.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* The counter streams: the lexer hands each token to the statement tracker,
 * which keeps only what it needs of the current statement (its first few
 * tokens, bracket depth, token count), so it allocates nothing and cannot
 * fail. */

enum { TOK_NAME, TOK_NUMBER, TOK_STRING, TOK_OP };

typedef struct {
    int kind;
    const char *p;
    size_t n;
} loc_tok;

enum {
    LOC_TOKENS_PER_STATEMENT = 48,
    LOC_FIRST = 6 /* tokens of a statement kept: enough for `if __name__ == "__main__":` */
};

typedef struct {
    long total;
    int expect_doc;   /* the next statement is the first of the module or of a def/class body */
    int skipping;     /* inside a `def tap` or `if __name__ == "__main__":` block */
    long skip_indent; /* ... whose header was at this indentation */
    long decor_cost;  /* cost of the decorators just above the next statement */

    /* the current logical line */
    int line_started; /* it has had a token */
    int line_skipped; /* it belongs to a zero block */
    long indent;

    /* the current statement */
    int in_stmt, compound, depth, lambdas, strings_only;
    size_t ntok, nfirst;
    loc_tok first[LOC_FIRST];
} loc_state;

static int is_name_start(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c >= 0x80;
}

static int is_name_char(unsigned char c) {
    return is_name_start(c) || (c >= '0' && c <= '9');
}

static int is_digit(unsigned char c) {
    return c >= '0' && c <= '9';
}

static int tok_is(const loc_tok *t, int kind, const char *text) {
    size_t n = strlen(text);
    return t->kind == kind && t->n == n && memcmp(t->p, text, n) == 0;
}

/* End of the string literal whose opening quote is at s[i]. Escapes skip the
 * next character in every kind of string (a raw string cannot end in an odd
 * backslash either). An unterminated single-quoted string ends at the end of
 * its line, a triple-quoted one at the end of the source. */
static size_t scan_string(const char *s, size_t len, size_t i) {
    char q = s[i];
    if (i + 2 < len && s[i + 1] == q && s[i + 2] == q) {
        size_t j = i + 3;
        while (j < len) {
            if (s[j] == '\\')
                j += 2;
            else if (s[j] == q && j + 2 < len && s[j + 1] == q && s[j + 2] == q)
                return j + 3;
            else
                j++;
        }
        return len;
    }
    size_t j = i + 1;
    while (j < len) {
        if (s[j] == '\\')
            j += 2;
        else if (s[j] == q)
            return j + 1;
        else if (s[j] == '\n')
            return j;
        else
            j++;
    }
    return len;
}

/* Column of s[pos] on its physical line (tabs to multiples of 8, as Python). */
static long column_of(const char *s, size_t pos) {
    size_t b = pos;
    while (b > 0 && s[b - 1] != '\n' && !(s[b - 1] == '\r' && s[b] != '\n'))
        b--;
    long col = 0;
    for (size_t i = b; i < pos; i++) {
        if (s[i] == '\t')
            col = (col / 8 + 1) * 8;
        else if (s[i] == '\f')
            col = 0;
        else
            col++;
    }
    return col;
}

static size_t op_len(const char *s, size_t len, size_t i);

/* Tokens of the code in s[a, b), counted as the statement counter counts
 * them (comments and line breaks are not tokens). */
static size_t code_tokens(const char *s, size_t a, size_t b, int depth);

/* The replacement fields of an f-string are code: the tokens of every
 * {...} in its body s[a, b) ({{ and }} are literal braces). depth bounds
 * nested f-strings. */
static size_t fstring_field_tokens(const char *s, size_t a, size_t b, int depth) {
    size_t n = 0, i = a;
    while (i < b) {
        if ((s[i] == '{' || s[i] == '}') && i + 1 < b && s[i + 1] == s[i]) {
            i += 2;
            continue;
        }
        if (s[i] != '{') {
            i++;
            continue;
        }
        /* The field ends at the } that closes it, outside nested brackets
         * and strings. */
        size_t j = i + 1;
        int nest = 0;
        while (j < b) {
            char c = s[j];
            if (c == '"' || c == '\'') {
                char q = c;
                for (j++; j < b && s[j] != q; j++)
                    if (s[j] == '\\') j++;
                j++;
                continue;
            }
            if (c == '(' || c == '[' || c == '{') nest++;
            if (c == ')' || c == ']') nest--;
            if (c == '}' && nest-- == 0) break;
            j++;
        }
        n += code_tokens(s, i + 1, j < b ? j : b, depth + 1);
        i = j + 1;
    }
    return n;
}

/* Where the body of the string token s[start, end) begins and ends; 1 if it
 * is an f-string. */
static int fstring_body(const char *s, size_t start, size_t end, size_t *a, size_t *b) {
    size_t q = start;
    int f = 0;
    for (; q < end && s[q] != '"' && s[q] != '\''; q++)
        f |= s[q] == 'f' || s[q] == 'F';
    if (!f || q >= end) return 0;
    size_t ql = q + 2 < end && s[q + 1] == s[q] && s[q + 2] == s[q] ? 3 : 1;
    *a = q + ql;
    *b = end;
    if (end >= *a + ql && s[end - 1] == s[q]) *b = end - ql; /* closed */
    if (*b < *a) *b = *a;
    return 1;
}

static size_t code_tokens(const char *s, size_t a, size_t b, int depth) {
    size_t n = 0, i = a;
    while (i < b) {
        unsigned char c = (unsigned char)s[i];
        size_t start = i;
        if (c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v' ||
            c == '\0' || c == '\\') {
            i++;
            continue;
        }
        if (c == '#') {
            while (i < b && s[i] != '\n')
                i++;
            continue;
        }
        n++;
        if (c == '"' || c == '\'' || is_name_start(c)) {
            while (i < b && s[i] && strchr("rRbBuUfF", s[i]) && i - start < 2)
                i++;
            if (i < b && (s[i] == '"' || s[i] == '\'')) {
                i = scan_string(s, b, i);
                size_t fa, fb;
                if (depth < 8 && fstring_body(s, start, i, &fa, &fb))
                    n += fstring_field_tokens(s, fa, fb, depth);
            } else {
                while (i < b && is_name_char((unsigned char)s[i]))
                    i++;
            }
        } else if (is_digit(c) || (c == '.' && i + 1 < b && is_digit((unsigned char)s[i + 1]))) {
            i++;
            while (i < b && (is_name_char((unsigned char)s[i]) || s[i] == '.'))
                i++;
        } else {
            i += op_len(s, b, i);
        }
    }
    return n;
}

static long cost_of(size_t ntok) {
    return (long)((ntok + LOC_TOKENS_PER_STATEMENT - 1) / LOC_TOKENS_PER_STATEMENT);
}

static int is_compound(const loc_tok *t) {
    static const char *const kw[] = {"if",  "elif",   "else",    "for", "while", "with",
                                     "try", "except", "finally", "def", "class", "async"};
    if (t->kind != TOK_NAME) return 0;
    for (size_t i = 0; i < sizeof kw / sizeof kw[0]; i++)
        if (tok_is(t, TOK_NAME, kw[i])) return 1;
    return 0;
}

/* The text of a string token without its prefix and quotes equals want. */
static int string_is(const loc_tok *t, const char *want) {
    if (t->kind != TOK_STRING) return 0;
    size_t i = 0;
    while (i < t->n && t->p[i] != '"' && t->p[i] != '\'')
        i++;
    size_t body = t->n - i, q = 1;
    if (body >= 6 && t->p[i + 1] == t->p[i] && t->p[i + 2] == t->p[i]) q = 3;
    if (body < 2 * q) return 0;
    size_t n = strlen(want);
    return body - 2 * q == n && memcmp(t->p + i + q, want, n) == 0;
}

/* Header whose first tokens are t (nfirst of them kept, ntok in all):
 * `[async] def tap(`. */
static int is_tap_def(const loc_tok *t, size_t nfirst) {
    size_t i = nfirst > 0 && tok_is(&t[0], TOK_NAME, "async") ? 1 : 0;
    return nfirst >= i + 3 && tok_is(&t[i], TOK_NAME, "def") &&
           tok_is(&t[i + 1], TOK_NAME, "tap") && tok_is(&t[i + 2], TOK_OP, "(");
}

/* `if __name__ == "__main__":` (either side of the ==). */
static int is_main_if(const loc_tok *t, size_t ntok) {
    if (ntok != 5 || !tok_is(&t[0], TOK_NAME, "if") || !tok_is(&t[2], TOK_OP, "==") ||
        !tok_is(&t[4], TOK_OP, ":"))
        return 0;
    return (tok_is(&t[1], TOK_NAME, "__name__") && string_is(&t[3], "__main__")) ||
           (string_is(&t[1], "__main__") && tok_is(&t[3], TOK_NAME, "__name__"));
}

static int opens(const loc_tok *t) {
    return t->kind == TOK_OP && t->n == 1 && (*t->p == '(' || *t->p == '[' || *t->p == '{');
}

static int closes(const loc_tok *t) {
    return t->kind == TOK_OP && t->n == 1 && (*t->p == ')' || *t->p == ']' || *t->p == '}');
}

/* A compound statement's header is complete (at its `:` or the line's end). */
static void end_header(loc_state *st) {
    const loc_tok *t = st->first;
    st->in_stmt = 0;
    /* Only at the top level, as the engine drops them: nested, such a block
     * runs (a function can define __name__ and test it). */
    if (st->indent == 0 && (is_tap_def(t, st->nfirst) || is_main_if(t, st->ntok))) {
        /* The whole block counts zero: its header, the rest of this line,
         * every more-indented line after it, and the decorators of a def tap. */
        if (!tok_is(&t[0], TOK_NAME, "if")) st->total -= st->decor_cost;
        st->decor_cost = 0;
        st->skipping = 1;
        st->skip_indent = st->indent;
        st->line_skipped = 1;
        st->expect_doc = 0;
        return;
    }
    st->total += cost_of(st->ntok);
    st->decor_cost = 0;
    st->expect_doc =
        tok_is(&t[0], TOK_NAME, "def") || tok_is(&t[0], TOK_NAME, "class") ||
        (tok_is(&t[0], TOK_NAME, "async") && st->nfirst > 1 && tok_is(&t[1], TOK_NAME, "def"));
}

/* A simple statement is complete (at a `;` outside brackets or the line's end). */
static void end_simple(loc_state *st) {
    const loc_tok *t = st->first;
    long c;
    st->in_stmt = 0;
    if (tok_is(&t[0], TOK_NAME, "import") || tok_is(&t[0], TOK_NAME, "from"))
        c = 0;
    else if (st->expect_doc && st->strings_only)
        c = 0; /* docstring */
    else
        c = cost_of(st->ntok);
    if (tok_is(&t[0], TOK_OP, "@"))
        st->decor_cost += c;
    else
        st->decor_cost = 0;
    st->total += c;
    st->expect_doc = 0;
}

static void on_token(loc_state *st, loc_tok t) {
    if (!st->line_started) {
        st->line_started = 1;
        if (st->skipping && st->indent > st->skip_indent)
            st->line_skipped = 1;
        else
            st->skipping = 0;
    }
    if (st->line_skipped) return;
    if (!st->in_stmt) {
        if (tok_is(&t, TOK_OP, ";")) return; /* empty statement */
        st->in_stmt = 1;
        st->compound = is_compound(&t);
        st->depth = st->lambdas = 0;
        st->strings_only = 1;
        st->ntok = st->nfirst = 0;
    }
    if (!st->compound && st->depth == 0 && tok_is(&t, TOK_OP, ";")) {
        end_simple(st); /* the `;` belongs to neither statement */
        return;
    }
    if (st->nfirst < LOC_FIRST) st->first[st->nfirst++] = t;
    st->ntok++;
    if (t.kind != TOK_STRING) st->strings_only = 0;
    if (opens(&t)) {
        st->depth++;
    } else if (closes(&t)) {
        if (st->depth > 0) st->depth--;
    } else if (st->compound && st->depth == 0) {
        /* The header ends at the first `:` outside brackets that is not a lambda's. */
        if (tok_is(&t, TOK_NAME, "lambda"))
            st->lambdas++;
        else if (tok_is(&t, TOK_OP, ":") && st->lambdas)
            st->lambdas--;
        else if (tok_is(&t, TOK_OP, ":"))
            end_header(st);
    }
}

static void on_line_end(loc_state *st) {
    if (st->in_stmt && !st->line_skipped) {
        if (st->compound)
            end_header(st); /* no `:`: the whole line is the header */
        else
            end_simple(st);
    }
    st->in_stmt = 0;
    st->line_started = 0;
    st->line_skipped = 0;
}

static const char *const OPS3[] = {"**=", "//=", ">>=", "<<=", "..."};
static const char *const OPS2[] = {"**", "//", "<<", ">>", "<=", ">=", "==", "!=", "->", "+=",
                                   "-=", "*=", "/=", "%=", "&=", "|=", "^=", "@=", ":="};

static size_t op_len(const char *s, size_t len, size_t i) {
    for (size_t k = 0; k < sizeof OPS3 / sizeof OPS3[0]; k++)
        if (i + 3 <= len && memcmp(s + i, OPS3[k], 3) == 0) return 3;
    for (size_t k = 0; k < sizeof OPS2 / sizeof OPS2[0]; k++)
        if (i + 2 <= len && memcmp(s + i, OPS2[k], 2) == 0) return 2;
    return 1;
}

long fmx_reward_count_loc(const char *source, size_t len) {
    if (!source) return 0;
    const char *s = source;
    loc_state st;
    memset(&st, 0, sizeof st);
    st.expect_doc = 1;
    int depth = 0; /* brackets open across the logical line */
    size_t i = 0;
    while (i < len) {
        unsigned char c = (unsigned char)s[i];
        size_t start = i;
        /* \n, \r\n and a lone \r end a physical line, as in Python (the
         * engine refuses a lone \r; counting it as a space would let a file
         * hide lines in a zero block). */
        if (c == '\n' || (c == '\r' && (i + 1 >= len || s[i + 1] != '\n'))) {
            i++;
            if (depth == 0 && st.line_started) on_line_end(&st);
            continue;
        }
        if (c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v' || c == '\0') {
            i++;
            continue;
        }
        if (c == '#') {
            while (i < len && s[i] != '\n' && s[i] != '\r')
                i++;
            continue;
        }
        if (c == '\\') {
            /* A continuation joins the next physical line; a stray backslash is skipped. */
            i++;
            if (i < len && s[i] == '\r') i++;
            if (i < len && s[i] == '\n') i++;
            continue;
        }
        if (!st.line_started) st.indent = column_of(s, start);
        int kind;
        if (c == '"' || c == '\'') {
            i = scan_string(s, len, i);
            kind = TOK_STRING;
        } else if (is_name_start(c)) {
            while (i < len && is_name_char((unsigned char)s[i]))
                i++;
            kind = TOK_NAME;
            /* A string prefix (r, b, u, f and their pairs) right before a quote. */
            int prefix = i - start <= 2 && i < len && (s[i] == '"' || s[i] == '\'');
            for (size_t k = start; prefix && k < i; k++)
                prefix = strchr("rRbBuUfF", s[k]) != NULL;
            if (prefix) {
                i = scan_string(s, len, i);
                kind = TOK_STRING;
                /* An f-string's fields are code: their tokens count, and it
                 * is never a docstring. */
                size_t fa, fb;
                if (fstring_body(s, start, i, &fa, &fb)) {
                    on_token(&st, (loc_tok){kind, s + start, i - start});
                    if (st.in_stmt && !st.line_skipped) {
                        st.ntok += fstring_field_tokens(s, fa, fb, 0);
                        st.strings_only = 0;
                    }
                    continue;
                }
            }
        } else if (is_digit(c) || (c == '.' && i + 1 < len && is_digit((unsigned char)s[i + 1]))) {
            if (c == '0' && i + 1 < len && s[i + 1] != '\0' && strchr("xXoObB", s[i + 1])) {
                i += 2;
                while (i < len && is_name_char((unsigned char)s[i]))
                    i++;
            } else {
                while (i < len && (is_name_char((unsigned char)s[i]) || s[i] == '.')) {
                    if ((s[i] == 'e' || s[i] == 'E') && i + 1 < len &&
                        (s[i + 1] == '+' || s[i + 1] == '-'))
                        i += 2;
                    else
                        i++;
                }
            }
            kind = TOK_NUMBER;
        } else {
            i += op_len(s, len, i);
            if (c == '(' || c == '[' || c == '{') depth++;
            if ((c == ')' || c == ']' || c == '}') && depth > 0) depth--;
            kind = TOK_OP;
        }
        on_token(&st, (loc_tok){kind, s + start, i - start});
    }
    if (st.line_started) on_line_end(&st);
    return st.total < 0 ? 0 : st.total;
}
