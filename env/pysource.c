/*
 * pysource.c — fmx's one model of Python source (see pysource.h): one pass
 * that splits the source into physical lines, one that tokenizes it the way
 * CPython 3.11's tokenizer does (indentation at the start of each line,
 * then tokens, brackets and continuations) and records the logical lines,
 * and one that groups logical lines into top-level blocks.
 *
 * The token scanner (scan_token) is shared by the model and by the f-string
 * field counter, so a field's code is tokenized by the same rules as the
 * file around it.
 *
 * Not here: what the consumers do with the model (counting, compiling,
 * marking, trimming), and the `fmx pysource` command's file handling beyond
 * reading one file.
 */
#define _POSIX_C_SOURCE 200809L
#include "pysource.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "status.h"

struct fmx_pysource {
    const char *s;
    size_t n;
    fmx_py_token *tok;
    long ntok, ctok;
    fmx_py_physline *phys;
    long nphys, cphys;
    fmx_py_line *lines;
    long nlines, clines;
    fmx_py_block *blocks;
    long nblocks, cblocks;
    int oom;
};

/* Makes room for need elements of elem bytes in *p (capacity *cap). */
static int grow(void **p, long *cap, long need, size_t elem) {
    if (need <= *cap) return 1;
    long c = *cap ? *cap : 64;
    while (c < need)
        c *= 2;
    void *g = realloc(*p, (size_t)c * elem);
    if (!g) return 0;
    *p = g;
    *cap = c;
    return 1;
}

/* ---- characters ---- */

/* Length of the line end at s[i]: 1 for \n or a lone \r, 2 for \r\n, 0 if none. */
static size_t eol_len(const char *s, size_t n, size_t i) {
    if (i >= n) return 0;
    if (s[i] == '\n') return 1;
    if (s[i] == '\r') return i + 1 < n && s[i + 1] == '\n' ? 2 : 1;
    return 0;
}

static int is_name_start(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c >= 0x80;
}

static int is_name_char(unsigned char c) {
    return is_name_start(c) || (c >= '0' && c <= '9');
}

static int is_digit(unsigned char c) {
    return c >= '0' && c <= '9';
}

static int is_hex(unsigned char c) {
    return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* Whitespace between tokens: spaces, tabs, form feeds, and (not Python, but
 * never a token either) other control characters that are not line ends. */
static int is_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\f' || (c < 0x20 && c != '\n' && c != '\r') || c == 0x7f;
}

/* ---- tokens ---- */

/* String flags of the prefix s[0, len) (r, u, f, b and the pairs br, rb,
 * fr, rf, any case), with 0x100 set when it is a valid prefix. */
static unsigned prefix_flags(const char *s, size_t len) {
    if (len == 0 || len > 2) return 0;
    unsigned f = 0x100;
    int u = 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c == 'r' || c == 'R')
            f |= FMX_PY_RAW;
        else if (c == 'b' || c == 'B')
            f |= FMX_PY_BYTES;
        else if (c == 'f' || c == 'F')
            f |= FMX_PY_FSTRING;
        else if (c == 'u' || c == 'U')
            u = 1;
        else
            return 0;
    }
    if (len == 2) {
        /* the pairs are a raw flag with b or f, in either order */
        if (u || !(f & FMX_PY_RAW) || !(f & (FMX_PY_BYTES | FMX_PY_FSTRING))) return 0;
        if ((f & FMX_PY_BYTES) && (f & FMX_PY_FSTRING)) return 0;
    }
    return f;
}

/* End of the string literal whose opening quote is at s[q]; adds
 * FMX_PY_TRIPLE and FMX_PY_UNTERMINATED to *flags. A backslash escapes the
 * next character (a line end included). */
static size_t scan_string(const char *s, size_t n, size_t q, unsigned *flags) {
    char quote = s[q];
    int triple = q + 2 < n && s[q + 1] == quote && s[q + 2] == quote;
    size_t j = q + (triple ? 3 : 1);
    if (triple) *flags |= FMX_PY_TRIPLE;
    while (j < n) {
        char c = s[j];
        if (c == '\\') {
            size_t e = eol_len(s, n, j + 1);
            j += 1 + (e ? e : 1);
        } else if (c == quote &&
                   (!triple || (j + 2 < n && s[j + 1] == quote && s[j + 2] == quote))) {
            return j + (triple ? 3 : 1);
        } else if (!triple && eol_len(s, n, j)) {
            *flags |= FMX_PY_UNTERMINATED;
            return j; /* ends before its line end */
        } else {
            j++;
        }
    }
    *flags |= FMX_PY_UNTERMINATED;
    return n;
}

static void digits(const char *s, size_t n, size_t *i) {
    while (*i < n && (is_digit((unsigned char)s[*i]) || s[*i] == '_'))
        (*i)++;
}

/* End of the number starting at s[i] (a digit, or '.' before a digit). */
static size_t scan_number(const char *s, size_t n, size_t i) {
    if (s[i] == '0' && i + 1 < n && s[i + 1] && strchr("xXoObB", s[i + 1])) {
        i += 2;
        while (i < n && (is_hex((unsigned char)s[i]) || s[i] == '_'))
            i++;
        return i;
    }
    digits(s, n, &i);
    if (i < n && s[i] == '.') {
        i++;
        digits(s, n, &i);
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        size_t j = i + 1;
        if (j < n && (s[j] == '+' || s[j] == '-')) j++;
        if (j < n && is_digit((unsigned char)s[j])) {
            i = j;
            digits(s, n, &i);
        }
    }
    if (i < n && (s[i] == 'j' || s[i] == 'J')) i++;
    return i;
}

static const char *const OPS3[] = {"**=", "//=", ">>=", "<<=", "..."};
static const char *const OPS2[] = {"**", "//", "<<", ">>", "<=", ">=", "==", "!=", "->", "+=",
                                   "-=", "*=", "/=", "%=", "&=", "|=", "^=", "@=", ":="};

/* Length of the operator at s[i], 0 if there is none. */
static size_t op_len(const char *s, size_t n, size_t i) {
    for (size_t k = 0; k < sizeof OPS3 / sizeof OPS3[0]; k++)
        if (i + 3 <= n && memcmp(s + i, OPS3[k], 3) == 0) return 3;
    for (size_t k = 0; k < sizeof OPS2 / sizeof OPS2[0]; k++)
        if (i + 2 <= n && memcmp(s + i, OPS2[k], 2) == 0) return 2;
    return s[i] && strchr("()[]{},:;.+-*/%@&|^~<>=", s[i]) ? 1 : 0;
}

/* Scans the token that starts at s[i] (not whitespace, a comment, a line
 * end or a backslash); returns its end and sets its kind and flags. */
static size_t scan_token(const char *s, size_t n, size_t i, fmx_py_kind *kind, unsigned *flags) {
    unsigned char c = (unsigned char)s[i];
    *flags = 0;
    if (c == '"' || c == '\'') {
        *kind = FMX_PY_STRING;
        return scan_string(s, n, i, flags);
    }
    if (is_name_start(c)) {
        size_t j = i;
        while (j < n && is_name_char((unsigned char)s[j]))
            j++;
        unsigned pf = j < n && (s[j] == '"' || s[j] == '\'') ? prefix_flags(s + i, j - i) : 0;
        if (pf) {
            *kind = FMX_PY_STRING;
            *flags = pf & ~0x100u;
            return scan_string(s, n, j, flags);
        }
        *kind = FMX_PY_NAME;
        return j;
    }
    if (is_digit(c) || (c == '.' && i + 1 < n && is_digit((unsigned char)s[i + 1]))) {
        *kind = FMX_PY_NUMBER;
        return scan_number(s, n, i);
    }
    size_t k = op_len(s, n, i);
    *kind = k ? FMX_PY_OP : FMX_PY_ERROR;
    return i + (k ? k : 1);
}

/* ---- f-string fields ---- */

/* Where the body of string token t begins and ends (quotes excluded). */
static void string_body(const char *s, const fmx_py_token *t, size_t *a, size_t *b) {
    size_t q = t->start;
    while (q < t->end && s[q] != '"' && s[q] != '\'')
        q++;
    size_t ql = (t->flags & FMX_PY_TRIPLE) ? 3 : 1;
    *a = q + ql < t->end ? q + ql : t->end;
    *b = t->end;
    if (!(t->flags & FMX_PY_UNTERMINATED) && t->end >= *a + ql) *b = t->end - ql;
}

/* Skips the string literal (any quotes) at s[j] inside a field, to b. */
static size_t skip_field_string(const char *s, size_t b, size_t j) {
    unsigned flags = 0;
    size_t e = scan_string(s, b, j, &flags);
    return e > j ? e : j + 1;
}

/* Scans one replacement field whose content starts at s[f0] (after its {),
 * within the body's end b: *expr_end gets the end of its expression (a `=`,
 * `!` or `:` outside brackets, as CPython 3.11 finds it); returns the
 * position of the } that closes the field, or b if there is none. */
static size_t scan_field(const char *s, size_t b, size_t f0, size_t *expr_end) {
    size_t j = f0;
    int nest = 0;
    while (j < b) {
        char d = s[j];
        if (d == '"' || d == '\'') {
            j = skip_field_string(s, b, j);
            continue;
        }
        if (d == '(' || d == '[' || d == '{') {
            nest++;
        } else if (d == ')' || d == ']') {
            if (nest) nest--;
        } else if (d == '}') {
            if (nest == 0) break;
            nest--;
        } else if (nest == 0 && d && strchr("!=<>:", d)) {
            /* !=, ==, <= and >= do not end the expression, nor do < and > */
            if (d != ':' && j + 1 < b && s[j + 1] == '=') {
                j += 2;
                continue;
            }
            if (d != '<' && d != '>') break;
        }
        j++;
    }
    *expr_end = j;
    /* a conversion and a format spec, whose nested fields nest in braces */
    int braces = 0;
    while (j < b) {
        if (s[j] == '{')
            braces++;
        else if (s[j] == '}' && braces-- == 0)
            break;
        j++;
    }
    return j;
}

long fmx_pysource_fields(const char *src, const fmx_py_token *t, fmx_py_field *out, long cap) {
    if (!src || !t || t->kind != FMX_PY_STRING || !(t->flags & FMX_PY_FSTRING)) return 0;
    size_t a, b;
    string_body(src, t, &a, &b);
    long nf = 0;
    size_t i = a;
    while (i < b) {
        char c = src[i];
        if ((c == '{' || c == '}') && i + 1 < b && src[i + 1] == c) {
            i += 2; /* a literal brace */
            continue;
        }
        if (c != '{') {
            i++;
            continue;
        }
        size_t expr_end, close = scan_field(src, b, i + 1, &expr_end);
        if (out && nf < cap) out[nf] = (fmx_py_field){i + 1, close, expr_end, close < b};
        nf++;
        i = close + 1;
    }
    return nf;
}

static long code_tokens(const char *s, size_t a, size_t b, int depth);

/* Code tokens of the field whose content is s[f0, f1): its expression, and
 * the fields nested in its format spec. */
static long field_tokens(const char *s, size_t f0, size_t f1, int depth) {
    size_t expr_end;
    scan_field(s, f1, f0, &expr_end);
    long k = code_tokens(s, f0, expr_end, depth);
    for (size_t j = expr_end; j < f1; j++) {
        if (s[j] != '{') continue;
        size_t inner_end, close = scan_field(s, f1, j + 1, &inner_end);
        (void)inner_end;
        if (depth < 8) k += field_tokens(s, j + 1, close, depth + 1);
        j = close;
    }
    return k;
}

/* Code tokens in s[a, b), f-string fields included (depth bounds nesting). */
static long code_tokens(const char *s, size_t a, size_t b, int depth) {
    long k = 0;
    size_t i = a;
    while (i < b) {
        unsigned char c = (unsigned char)s[i];
        if (is_space(c) || c == '\\' || eol_len(s, b, i)) {
            i++;
            continue;
        }
        if (c == '#') {
            while (i < b && !eol_len(s, b, i))
                i++;
            continue;
        }
        fmx_py_token t;
        t.start = i;
        t.end = scan_token(s, b, i, &t.kind, &t.flags);
        k++;
        if (t.kind == FMX_PY_STRING && (t.flags & FMX_PY_FSTRING) && depth < 8) {
            size_t fa, fb;
            string_body(s, &t, &fa, &fb);
            size_t j = fa;
            while (j < fb) {
                if ((s[j] == '{' || s[j] == '}') && j + 1 < fb && s[j + 1] == s[j]) {
                    j += 2;
                    continue;
                }
                if (s[j] != '{') {
                    j++;
                    continue;
                }
                size_t expr_end, close = scan_field(s, fb, j + 1, &expr_end);
                k += field_tokens(s, j + 1, close, depth + 1);
                j = close + 1;
            }
        }
        i = t.end;
    }
    return k;
}

long fmx_pysource_field_tokens(const char *src, const fmx_py_token *t) {
    if (!src || !t || t->kind != FMX_PY_STRING || !(t->flags & FMX_PY_FSTRING)) return 0;
    /* the token itself is one; the rest are its fields' */
    return code_tokens(src, t->start, t->end, 0) - 1;
}

/* ---- the model ---- */

typedef struct {
    fmx_pysource *ps;
    const char *s;
    size_t n, i;
    long line;  /* 1-based physical line of s[i] */
    size_t bol; /* where that line starts */
    int depth;  /* open brackets */
    long cur;   /* the open logical line, -1 if none */
} lexer;

static void newline(lexer *L) {
    L->line++;
    L->bol = L->i;
}

static void push_token(lexer *L, fmx_py_kind kind, unsigned flags, size_t start, size_t end) {
    fmx_pysource *ps = L->ps;
    if (!grow((void **)&ps->tok, &ps->ctok, ps->ntok + 1, sizeof *ps->tok)) {
        ps->oom = 1;
        return;
    }
    ps->tok[ps->ntok++] = (fmx_py_token){kind, flags, start, end, L->line, (long)(start - L->bol)};
}

static void open_line(lexer *L, long first, long indent, unsigned flags) {
    fmx_pysource *ps = L->ps;
    if (!grow((void **)&ps->lines, &ps->clines, ps->nlines + 1, sizeof *ps->lines)) {
        ps->oom = 1;
        return;
    }
    ps->lines[ps->nlines] = (fmx_py_line){ps->ntok, 0, first, first, indent, flags};
    L->cur = ps->nlines++;
}

/* Ends the open logical line at physical line last; one without code
 * tokens (only skipped characters and comments) is no logical line. */
static void close_line(lexer *L, long last) {
    fmx_pysource *ps = L->ps;
    fmx_py_line *l = &ps->lines[L->cur];
    l->ntok = ps->ntok - l->tok;
    l->last = last;
    int code = 0;
    for (long k = l->tok; k < ps->ntok && !code; k++)
        code = fmx_py_is_code(&ps->tok[k]);
    if (!code) ps->nlines--;
    L->cur = -1;
}

/* At the start of a physical line outside a string or continuation:
 * CPython's indentation loop, then a new logical line unless the line is
 * blank or comment-only or inside brackets. */
static void line_start(lexer *L) {
    const char *s = L->s;
    size_t n = L->n;
    long first = L->line, col = 0, cont_col = 0;
    int backslash = 0;
    for (;;) {
        char c = L->i < n ? s[L->i] : 0;
        if (L->i >= n) break;
        if (c == ' ') {
            col++;
            L->i++;
        } else if (c == '\t') {
            col = (col / 8 + 1) * 8;
            L->i++;
        } else if (c == '\f') {
            col = 0;
            L->i++;
        } else if (c == '\\' && eol_len(s, n, L->i + 1)) {
            if (!cont_col) cont_col = col;
            backslash = 1;
            L->i += 1 + eol_len(s, n, L->i + 1);
            newline(L);
        } else {
            break;
        }
    }
    int blank = L->i >= n || s[L->i] == '#' || eol_len(s, n, L->i);
    if (!blank && L->depth == 0 && L->cur < 0)
        open_line(L, first, cont_col ? cont_col : col,
                  backslash ? FMX_PY_LINE_BACKSLASH_INDENT : 0);
}

static void lex(lexer *L) {
    const char *s = L->s;
    size_t n = L->n;
    int atbol = 1;
    while (!L->ps->oom) {
        if (atbol) {
            atbol = 0;
            line_start(L);
        }
        while (L->i < n && is_space((unsigned char)s[L->i]))
            L->i++;
        if (L->i >= n) break;
        size_t start = L->i;
        char c = s[start];
        size_t e = eol_len(s, n, start);
        if (e) {
            L->i += e;
            if (L->depth == 0 && L->cur >= 0) close_line(L, L->line);
            newline(L);
            atbol = 1;
            continue;
        }
        if (c == '#') {
            while (L->i < n && !eol_len(s, n, L->i))
                L->i++;
            push_token(L, FMX_PY_COMMENT, 0, start, L->i);
            continue;
        }
        if (c == '\\') {
            /* a continuation joins the next line (no indentation there); a
             * stray backslash is skipped */
            size_t e2 = eol_len(s, n, start + 1);
            L->i += 1 + e2;
            if (e2) newline(L);
            continue;
        }
        fmx_py_kind kind;
        unsigned flags;
        L->i = scan_token(s, n, start, &kind, &flags);
        push_token(L, kind, flags, start, L->i);
        if (kind == FMX_PY_OP && L->i - start == 1) {
            if (c == '(' || c == '[' || c == '{') L->depth++;
            if ((c == ')' || c == ']' || c == '}') && L->depth > 0) L->depth--;
        }
        if (kind == FMX_PY_STRING) /* line ends inside a string */
            for (size_t k = start; k < L->i; k++) {
                size_t le = eol_len(s, L->i, k);
                if (!le) continue;
                k += le - 1;
                L->line++;
                L->bol = k + 1;
            }
    }
    if (L->cur >= 0) close_line(L, L->line > L->ps->nphys ? L->ps->nphys : L->line);
}

static void split_physical(fmx_pysource *ps) {
    size_t start = 0, i = 0;
    while (i < ps->n) {
        size_t e = eol_len(ps->s, ps->n, i);
        if (!e) {
            i++;
            continue;
        }
        if (!grow((void **)&ps->phys, &ps->cphys, ps->nphys + 1, sizeof *ps->phys)) {
            ps->oom = 1;
            return;
        }
        ps->phys[ps->nphys++] = (fmx_py_physline){start, i, -1};
        i += e;
        start = i;
    }
    if (start < ps->n) {
        if (!grow((void **)&ps->phys, &ps->cphys, ps->nphys + 1, sizeof *ps->phys)) {
            ps->oom = 1;
            return;
        }
        ps->phys[ps->nphys++] = (fmx_py_physline){start, ps->n, -1};
    }
}

/* ---- blocks ---- */

static int is_keyword(const fmx_pysource *ps, const fmx_py_token *t) {
    static const char *const kw[] = {
        "False", "None",     "True",  "and",    "as",   "assert", "async",  "await",    "break",
        "class", "continue", "def",   "del",    "elif", "else",   "except", "finally",  "for",
        "from",  "global",   "if",    "import", "in",   "is",     "lambda", "nonlocal", "not",
        "or",    "pass",     "raise", "return", "try",  "while",  "with",   "yield"};
    for (size_t i = 0; i < sizeof kw / sizeof kw[0]; i++)
        if (fmx_pysource_tok_is(ps, t, FMX_PY_NAME, kw[i])) return 1;
    return 0;
}

/* `__name__` or a str literal "__main__". */
static int main_side(const fmx_pysource *ps, const fmx_py_token *name, const fmx_py_token *str) {
    return fmx_pysource_tok_is(ps, name, FMX_PY_NAME, "__name__") && str->kind == FMX_PY_STRING &&
           !(str->flags & FMX_PY_BYTES) && fmx_pysource_string_is(ps, str, "__main__");
}

/* The kind, name and async flag of the block whose header is logical line li. */
static void classify(const fmx_pysource *ps, long li, fmx_py_block *b) {
    const fmx_py_line *l = &ps->lines[li];
    const fmx_py_token *t[6];
    long idx[6], k = 0;
    int strings = 1;
    for (long j = l->tok; j < l->tok + l->ntok; j++) {
        const fmx_py_token *x = &ps->tok[j];
        if (!fmx_py_is_code(x)) continue;
        strings &= x->kind == FMX_PY_STRING && !(x->flags & FMX_PY_FSTRING);
        if (k < 6) {
            t[k] = x;
            idx[k++] = j;
        }
    }
    b->kind = FMX_PY_BLOCK_OTHER;
    b->name = -1;
    b->is_async = 0;
    if (k == 0) return;
    if (fmx_pysource_tok_is(ps, t[0], FMX_PY_NAME, "import") ||
        fmx_pysource_tok_is(ps, t[0], FMX_PY_NAME, "from")) {
        b->kind = FMX_PY_BLOCK_IMPORT;
        return;
    }
    long d = k > 1 && fmx_pysource_tok_is(ps, t[0], FMX_PY_NAME, "async") ? 1 : 0;
    if (k > d + 1 && fmx_pysource_tok_is(ps, t[d], FMX_PY_NAME, "def") &&
        t[d + 1]->kind == FMX_PY_NAME) {
        b->kind = FMX_PY_BLOCK_DEF;
        b->name = idx[d + 1];
        b->is_async = (int)d;
        return;
    }
    if (k > 1 && fmx_pysource_tok_is(ps, t[0], FMX_PY_NAME, "class") && t[1]->kind == FMX_PY_NAME) {
        b->kind = FMX_PY_BLOCK_CLASS;
        b->name = idx[1];
        return;
    }
    if (k >= 5 && fmx_pysource_tok_is(ps, t[0], FMX_PY_NAME, "if") &&
        fmx_pysource_tok_is(ps, t[2], FMX_PY_OP, "==") &&
        fmx_pysource_tok_is(ps, t[4], FMX_PY_OP, ":") &&
        (main_side(ps, t[1], t[3]) || main_side(ps, t[3], t[1]))) {
        b->kind = FMX_PY_BLOCK_MAIN;
        return;
    }
    if (strings) {
        b->kind = FMX_PY_BLOCK_STRINGS;
        return;
    }
    if (k > 1 && t[0]->kind == FMX_PY_NAME && !is_keyword(ps, t[0]) &&
        (fmx_pysource_tok_is(ps, t[1], FMX_PY_OP, "=") ||
         fmx_pysource_tok_is(ps, t[1], FMX_PY_OP, ":"))) {
        b->kind = FMX_PY_BLOCK_ASSIGN;
        b->name = idx[0];
    }
}

static int push_block(fmx_pysource *ps, fmx_py_block b) {
    if (!grow((void **)&ps->blocks, &ps->cblocks, ps->nblocks + 1, sizeof *ps->blocks)) {
        ps->oom = 1;
        return 0;
    }
    ps->blocks[ps->nblocks++] = b;
    return 1;
}

static int is_decorator(const fmx_pysource *ps, long li) {
    const fmx_py_token *t = fmx_pysource_first_code(ps, li);
    return t && fmx_pysource_tok_is(ps, t, FMX_PY_OP, "@");
}

static void group_blocks(fmx_pysource *ps) {
    long i = 0;
    while (i < ps->nlines && !ps->oom) {
        /* a run of decorator statements, each with any lines indented under it */
        long j = i;
        while (j < ps->nlines && is_decorator(ps, j) && (j == i || ps->lines[j].indent == 0)) {
            j++;
            while (j < ps->nlines && ps->lines[j].indent > 0)
                j++;
        }
        long h = j < ps->nlines && (j == i || ps->lines[j].indent == 0) ? j : i;
        fmx_py_block b = {FMX_PY_BLOCK_OTHER, i, 0, h, -1, 0, 0};
        if (h < ps->nlines) classify(ps, h, &b);
        int decorated = h > i;
        if (decorated && b.kind != FMX_PY_BLOCK_DEF && b.kind != FMX_PY_BLOCK_CLASS) {
            /* decorators above no def or class: a block of their own each */
            h = i;
            decorated = 0;
            b = (fmx_py_block){FMX_PY_BLOCK_OTHER, i, 0, i, -1, 0, 0};
        }
        long end = h + 1;
        while (end < ps->nlines && ps->lines[end].indent > 0)
            end++;
        b.line = i;
        b.header = h;
        b.nlines = end - i;
        b.decorated = decorated;
        if (!push_block(ps, b)) return;
        i = end;
    }
}

/* ---- the API ---- */

int fmx_pysource_open(const char *src, size_t len, fmx_pysource **out) {
    if (!out) return FMX_EINVAL;
    *out = NULL;
    if (!src && len) return FMX_EINVAL;
    fmx_pysource *ps = calloc(1, sizeof *ps);
    if (!ps) return FMX_ENOMEM;
    ps->s = src ? src : "";
    ps->n = len;
    split_physical(ps);
    if (!ps->oom) {
        lexer L = {ps, ps->s, ps->n, 0, 1, 0, 0, -1};
        lex(&L);
    }
    for (long k = 0; k < ps->nlines && !ps->oom; k++)
        for (long p = ps->lines[k].first; p <= ps->lines[k].last && p <= ps->nphys; p++)
            ps->phys[p - 1].logical = k;
    if (!ps->oom) group_blocks(ps);
    if (ps->oom) {
        fmx_pysource_close(ps);
        return FMX_ENOMEM;
    }
    *out = ps;
    return FMX_OK;
}

void fmx_pysource_close(fmx_pysource *ps) {
    if (!ps) return;
    free(ps->tok);
    free(ps->phys);
    free(ps->lines);
    free(ps->blocks);
    free(ps);
}

const char *fmx_pysource_text(const fmx_pysource *ps) {
    return ps->s;
}

size_t fmx_pysource_len(const fmx_pysource *ps) {
    return ps->n;
}

long fmx_pysource_tokens(const fmx_pysource *ps, const fmx_py_token **out) {
    *out = ps->tok;
    return ps->ntok;
}

long fmx_pysource_physlines(const fmx_pysource *ps, const fmx_py_physline **out) {
    *out = ps->phys;
    return ps->nphys;
}

long fmx_pysource_lines(const fmx_pysource *ps, const fmx_py_line **out) {
    *out = ps->lines;
    return ps->nlines;
}

long fmx_pysource_blocks(const fmx_pysource *ps, const fmx_py_block **out) {
    *out = ps->blocks;
    return ps->nblocks;
}

int fmx_py_is_code(const fmx_py_token *t) {
    return t->kind != FMX_PY_COMMENT;
}

int fmx_pysource_tok_is(const fmx_pysource *ps, const fmx_py_token *t, int kind, const char *text) {
    size_t n = strlen(text);
    return (kind < 0 || (int)t->kind == kind) && t->end - t->start == n &&
           memcmp(ps->s + t->start, text, n) == 0;
}

const fmx_py_token *fmx_pysource_first_code(const fmx_pysource *ps, long i) {
    if (i < 0 || i >= ps->nlines) return NULL;
    const fmx_py_line *l = &ps->lines[i];
    for (long k = l->tok; k < l->tok + l->ntok; k++)
        if (fmx_py_is_code(&ps->tok[k])) return &ps->tok[k];
    return NULL;
}

long fmx_pysource_block_end(const fmx_pysource *ps, long i) {
    if (i < 0 || i >= ps->nlines) return ps->nlines;
    long j = i + 1;
    while (j < ps->nlines && ps->lines[j].indent > ps->lines[i].indent)
        j++;
    return j;
}

int fmx_pysource_string_is(const fmx_pysource *ps, const fmx_py_token *t, const char *text) {
    if (t->kind != FMX_PY_STRING || (t->flags & FMX_PY_UNTERMINATED)) return 0;
    size_t a, b;
    string_body(ps->s, t, &a, &b);
    size_t n = strlen(text);
    return b >= a && b - a == n && memcmp(ps->s + a, text, n) == 0;
}

/* ---- `fmx pysource FILE` ---- */

static void json_str(FILE *f, const char *s, size_t n) {
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c == '\n')
            fputs("\\n", f);
        else if (c == '\r')
            fputs("\\r", f);
        else if (c == '\t')
            fputs("\\t", f);
        else if (c < 0x20 || c == 0x7f)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

static const char *kind_name(fmx_py_kind k) {
    static const char *const names[] = {"NAME", "NUMBER", "STRING", "OP", "COMMENT", "ERROR"};
    return (unsigned)k < sizeof names / sizeof names[0] ? names[k] : "?";
}

static const char *block_kind_name(fmx_py_block_kind k) {
    static const char *const names[] = {"other", "import",  "def",   "class",
                                        "main",  "strings", "assign"};
    return (unsigned)k < sizeof names / sizeof names[0] ? names[k] : "?";
}

static void print_json(const fmx_pysource *ps, FILE *f, long loc) {
    fputs("{\"tokens\":[", f);
    for (long k = 0; k < ps->ntok; k++) {
        const fmx_py_token *t = &ps->tok[k];
        fprintf(f, "%s[\"%s\",%ld,%ld,", k ? "," : "", kind_name(t->kind), t->line, t->col);
        json_str(f, ps->s + t->start, t->end - t->start);
        fputc(']', f);
    }
    fputs("],\"lines\":[", f);
    for (long k = 0; k < ps->nlines; k++) {
        const fmx_py_line *l = &ps->lines[k];
        const fmx_py_token *t = fmx_pysource_first_code(ps, k);
        fprintf(f, "%s[%ld,%ld,%ld,%ld,%u]", k ? "," : "", l->first, l->last, l->indent,
                t ? t->line : 0, l->flags);
    }
    fputs("],\"blocks\":[", f);
    for (long k = 0; k < ps->nblocks; k++) {
        const fmx_py_block *b = &ps->blocks[k];
        const fmx_py_line *last = &ps->lines[b->line + b->nlines - 1];
        const fmx_py_token *first = fmx_pysource_first_code(ps, b->line);
        const fmx_py_token *hdr = fmx_pysource_first_code(ps, b->header);
        fprintf(f, "%s{\"kind\":\"%s\",\"name\":", k ? "," : "", block_kind_name(b->kind));
        if (b->name >= 0)
            json_str(f, ps->s + ps->tok[b->name].start,
                     ps->tok[b->name].end - ps->tok[b->name].start);
        else
            fputs("null", f);
        fprintf(f,
                ",\"first\":%ld,\"first_token_line\":%ld,\"header_token_line\":%ld,\"last\":%ld,"
                "\"decorated\":%s,\"async\":%s}",
                ps->lines[b->line].first, first ? first->line : 0, hdr ? hdr->line : 0, last->last,
                b->decorated ? "true" : "false", b->is_async ? "true" : "false");
    }
    fputs("],\"physlines\":[", f);
    for (long k = 0; k < ps->nphys; k++)
        fprintf(f, "%s%ld", k ? "," : "", ps->phys[k].logical);
    fputs("]", f);
    if (loc >= 0) fprintf(f, ",\"loc\":%ld", loc);
    fputs("}\n", f);
}

/* The contents of path (caller frees), *len its length; NULL with errno set. */
static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = NULL;
    size_t cap = 0;
    *len = 0;
    for (;;) {
        if (*len + 65536 > cap) {
            cap = cap ? cap * 2 : 131072;
            char *g = realloc(buf, cap);
            if (!g) break;
            buf = g;
        }
        size_t got = fread(buf + *len, 1, cap - *len, f);
        *len += got;
        if (got == 0) break;
    }
    int bad = ferror(f) || *len + 65536 > cap;
    fclose(f);
    if (bad) {
        free(buf);
        return NULL;
    }
    return buf;
}

int fmx_pysource_main(int argc, char **argv, long (*count_loc)(const char *src, size_t len)) {
    int nfiles = 0;
    for (int i = 1; i < argc; i++) { /* argv[0] is "pysource" */
        if (strcmp(argv[i], "--json") == 0) continue;
        if (argv[i][0] == '-') {
            nfiles = 0;
            break;
        }
        nfiles++;
    }
    if (!nfiles) {
        fprintf(stderr, "usage: fmx pysource FILE... [--json]  (one JSON object per line)\n");
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) continue;
        size_t len = 0;
        char *buf = read_file(argv[i], &len);
        fmx_pysource *ps = NULL;
        if (!buf || fmx_pysource_open(buf, len, &ps) != FMX_OK) {
            fprintf(stderr, "fmx pysource: %s: cannot read or model it\n", argv[i]);
            free(buf);
            return 2;
        }
        print_json(ps, stdout, count_loc ? count_loc(buf, len) : -1);
        fmx_pysource_close(ps);
        free(buf);
    }
    return 0;
}
