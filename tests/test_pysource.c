/*
 * test_pysource.c — fmx's one model of Python source (env/pysource.c): the
 * tokens of every kind, logical lines and CPython's indentation (backslash
 * continuations at the start of a line, tabs, form feeds, \r, \r\n), the
 * top-level blocks and their names, f-string fields, and that any bytes
 * give a consistent model. tests/python/test_pysource.py checks random files
 * against Python's own tokenizer and parser.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "pysource.h"
#include "status.h"

static fmx_pysource *model(const char *src) {
    fmx_pysource *ps = NULL;
    assert_int_equal(fmx_pysource_open(src, strlen(src), &ps), FMX_OK);
    assert_non_null(ps);
    return ps;
}

/* The tokens as "KIND:text" joined by spaces (comments included). */
static void expect_tokens(const char *src, const char *want) {
    fmx_pysource *ps = model(src);
    const fmx_py_token *t;
    long n = fmx_pysource_tokens(ps, &t);
    static const char *const kinds[] = {"N", "D", "S", "O", "C", "E"};
    char got[4096] = "";
    size_t len = 0;
    for (long i = 0; i < n; i++)
        len += (size_t)snprintf(got + len, sizeof got - len, "%s%s:%.*s", i ? " " : "",
                                kinds[t[i].kind], (int)(t[i].end - t[i].start),
                                fmx_pysource_text(ps) + t[i].start);
    if (strcmp(got, want) != 0) fail_msg("tokens of\n%s\ngot  %s\nwant %s", src, got, want);
    fmx_pysource_close(ps);
}

/* The logical lines as "FIRST-LAST@INDENT" joined by spaces. */
static void expect_lines(const char *src, const char *want) {
    fmx_pysource *ps = model(src);
    const fmx_py_line *l;
    long n = fmx_pysource_lines(ps, &l);
    char got[4096] = "";
    size_t len = 0;
    for (long i = 0; i < n; i++)
        len += (size_t)snprintf(got + len, sizeof got - len, "%s%ld-%ld@%ld", i ? " " : "",
                                l[i].first, l[i].last, l[i].indent);
    if (strcmp(got, want) != 0) fail_msg("lines of\n%s\ngot  %s\nwant %s", src, got, want);
    fmx_pysource_close(ps);
}

/* The blocks as "kind[:name]@FIRSTLINE-LASTLINE" (physical) joined by spaces. */
static void expect_blocks(const char *src, const char *want) {
    fmx_pysource *ps = model(src);
    const fmx_py_block *b;
    const fmx_py_line *l;
    const fmx_py_token *t;
    long n = fmx_pysource_blocks(ps, &b);
    fmx_pysource_lines(ps, &l);
    fmx_pysource_tokens(ps, &t);
    static const char *const kinds[] = {"other", "import",  "def",   "class",
                                        "main",  "strings", "assign"};
    char got[4096] = "";
    size_t len = 0;
    for (long i = 0; i < n; i++) {
        len +=
            (size_t)snprintf(got + len, sizeof got - len, "%s%s", i ? " " : "", kinds[b[i].kind]);
        if (b[i].name >= 0)
            len += (size_t)snprintf(got + len, sizeof got - len, ":%.*s",
                                    (int)(t[b[i].name].end - t[b[i].name].start),
                                    fmx_pysource_text(ps) + t[b[i].name].start);
        len += (size_t)snprintf(got + len, sizeof got - len, "@%ld-%ld", l[b[i].line].first,
                                l[b[i].line + b[i].nlines - 1].last);
    }
    if (strcmp(got, want) != 0) fail_msg("blocks of\n%s\ngot  %s\nwant %s", src, got, want);
    fmx_pysource_close(ps);
}

static void test_tokens(void **state) {
    (void)state;
    expect_tokens("x = y.z(1, 'a') # c\n", "N:x O:= N:y O:. N:z O:( D:1 O:, S:'a' O:) C:# c");
    /* operators: the longest first */
    expect_tokens("a **= b // c -> d ... e != f := g @= h", "N:a O:**= N:b O:// N:c O:-> N:d "
                                                            "O:... N:e O:!= N:f O::= N:g O:@= N:h");
    /* numbers as the tokenize module spells them; 1if is a number and a name */
    expect_tokens("0x1f 1_000 1.5e-3 .5 2j 10. 1if 1e", "D:0x1f D:1_000 D:1.5e-3 D:.5 D:2j D:10. "
                                                        "D:1 N:if D:1 N:e");
    /* string prefixes (any case, pairs), and names that only look like them */
    expect_tokens("rb'x' Rb\"y\" f'{a}' Fr'z' u'w' br'' ur'v' bf'q' rb = fr",
                  "S:rb'x' S:Rb\"y\" S:f'{a}' S:Fr'z' S:u'w' S:br'' N:ur S:'v' N:bf S:'q' N:rb O:= "
                  "N:fr");
    /* escapes: an escaped quote, an escaped backslash ending the string, raw too */
    expect_tokens("'it\\'s' 'a\\\\' r'\\'' x", "S:'it\\'s' S:'a\\\\' S:r'\\'' N:x");
    /* a backslash-newline inside a single-quoted string continues it */
    expect_tokens("s = 'ab\\\ncd'\n", "N:s O:= S:'ab\\\ncd'");
    /* triple quotes over lines; # and quotes inside */
    expect_tokens("'''a\n# no\n\"'''", "S:'''a\n# no\n\"'''");
    /* unterminated: a single-quoted string ends at its line end */
    expect_tokens("x = 'abc\ny = 2", "N:x O:= S:'abc N:y O:= D:2");
    expect_tokens("x = '''abc\ny = 2", "N:x O:= S:'''abc\ny = 2");
    /* characters Python has no token for; a stray backslash is skipped */
    expect_tokens("a $ b ? c ! \\ d", "N:a E:$ N:b E:? N:c E:! N:d");
    expect_tokens("caf\xc3\xa9 = 1", "N:caf\xc3\xa9 O:= D:1");
}

static void test_string_flags(void **state) {
    (void)state;
    fmx_pysource *ps = model("f'''a{b}''' rb'x' 'y");
    const fmx_py_token *t;
    assert_int_equal(fmx_pysource_tokens(ps, &t), 3);
    assert_int_equal(t[0].flags, FMX_PY_FSTRING | FMX_PY_TRIPLE);
    assert_int_equal(t[1].flags, FMX_PY_BYTES | FMX_PY_RAW);
    assert_int_equal(t[2].flags, FMX_PY_UNTERMINATED);
    assert_false(fmx_pysource_string_is(ps, &t[2], "y"));
    fmx_pysource_close(ps);
    ps = model("'__main__' \"\"\"__main__\"\"\" '__main__\\x'");
    fmx_pysource_tokens(ps, &t);
    assert_true(fmx_pysource_string_is(ps, &t[0], "__main__"));
    assert_true(fmx_pysource_string_is(ps, &t[1], "__main__"));
    assert_false(fmx_pysource_string_is(ps, &t[2], "__main__"));
    fmx_pysource_close(ps);
}

static void test_logical_lines(void **state) {
    (void)state;
    /* brackets, backslashes and strings join lines; blank and comment lines are none */
    expect_lines("a = (1,\n  2)\n\n# c\nb = 1 + \\\n  2\nc = '''x\ny'''\n", "1-2@0 5-6@0 7-8@0");
    /* a comment line inside brackets belongs to the statement */
    expect_lines("f(\n# inside\n)\n", "1-3@0");
    /* \r, \r\n and \n end lines; a backslash before \r\n or \r continues */
    expect_lines("a = 1\rb = 2\r\nc = 3 + \\\r\n 4\rd = \\\r5", "1-1@0 2-2@0 3-4@0 5-6@0");
    /* indentation: tabs to multiples of 8, a form feed resets */
    expect_lines("if x:\n\ty\n  \tz\n\f w\n", "1-1@0 2-2@8 3-3@8 4-4@1");
    /* a line that starts with a backslash: the first backslash's column if
     * not 0, else the column reached on the next line (CPython) */
    expect_lines("def f():\n    a\n\\\n    b\n", "1-1@0 2-2@4 3-4@4");
    expect_lines("def f():\n    a\n  \\\nb\n", "1-1@0 2-2@4 3-4@2");
    expect_lines("\\\n\\\n  a\n", "1-3@2");
    /* a backslash before a blank line: no statement there */
    expect_lines("\\\n\nx\n", "3-3@0");
    /* an unclosed bracket runs to the end */
    expect_lines("x = (1,\ny = 2\n", "1-2@0");
    expect_lines("", "");
    expect_lines("\n\n   \n# only a comment", "");

    fmx_pysource *ps = model("def f():\n    a\n\\\n    b\n");
    const fmx_py_line *l;
    assert_int_equal(fmx_pysource_lines(ps, &l), 3);
    assert_int_equal(l[2].flags, FMX_PY_LINE_BACKSLASH_INDENT);
    assert_int_equal(l[0].flags, 0);
    const fmx_py_physline *p;
    assert_int_equal(fmx_pysource_physlines(ps, &p), 4);
    assert_int_equal(p[2].logical, 2);
    assert_int_equal(p[3].logical, 2);
    assert_int_equal(fmx_pysource_block_end(ps, 0), 3);
    assert_int_equal(fmx_pysource_block_end(ps, 1), 2);
    fmx_pysource_close(ps);
}

static void test_blocks(void **state) {
    (void)state;
    expect_blocks("\"\"\"doc\"\"\"\n"
                  "import torch\n"
                  "from typing import (Dict,\n"
                  "    List)\n"
                  "N = 3\n"
                  "M: int = 4\n"
                  "@dec\n"
                  "# between\n"
                  "@dec2(1)\n"
                  "def f(x):\n"
                  "    return x\n"
                  "\n"
                  "async def g(): pass\n"
                  "class C:\n"
                  "    y = 1\n"
                  "if __name__ == \"__main__\":\n"
                  "    f(1)\n"
                  "if '__main__' == __name__: pass\n"
                  "if __name__ == b'__main__': pass\n"
                  "x.y = 1\n"
                  "f'{x}'\n",
                  "strings@1-1 import@2-2 import@3-4 assign:N@5-5 assign:M@6-6 def:f@7-11 "
                  "def:g@13-13 class:C@14-15 main@16-17 main@18-18 other@19-19 other@20-20 "
                  "other@21-21");
    /* CPython's indentation decides what a block holds */
    expect_blocks("def tap(n, x):\n    return x\n\\\n    def forward(x):\n        return x\n",
                  "def:tap@1-5");
    expect_blocks("def tap(n, x):\n    return x\n\\\ndef forward(x):\n    return x\n",
                  "def:tap@1-2 def:forward@3-5");
    expect_blocks("def tap(n, x):\n    s = 'a\\\ndef forward(x): return x'\n    return x\n",
                  "def:tap@1-4");
    expect_blocks("def tap(n, x):\r    return x\rdef forward(x):\r    return x\r",
                  "def:tap@1-2 def:forward@3-4");
    /* decorators above no def: blocks of their own; a first line indented */
    expect_blocks("@dec\nx = 1\n", "other@1-1 assign:x@2-2");
    expect_blocks("  x = 1\n  y = 2\nz = 3\n", "assign:x@1-2 assign:z@3-3");

    fmx_pysource *ps = model("@d\nasync def h(): pass\n");
    const fmx_py_block *b;
    assert_int_equal(fmx_pysource_blocks(ps, &b), 1);
    assert_true(b[0].decorated);
    assert_true(b[0].is_async);
    assert_int_equal(b[0].header, 1);
    fmx_pysource_close(ps);
}

static void test_fstring_fields(void **state) {
    (void)state;
    const char *src = "f'a{x}b{{c}}{y + 1:>{w}}{z!r}{q=}{d[\"k\"]}{e'";
    fmx_pysource *ps = model(src);
    const fmx_py_token *t;
    assert_int_equal(fmx_pysource_tokens(ps, &t), 1);
    fmx_py_field f[8];
    long n = fmx_pysource_fields(src, &t[0], f, 8);
    assert_int_equal(n, 6);
    const char *want[] = {"x", "y + 1:>{w}", "z!r", "q=", "d[\"k\"]", "e"};
    const char *expr[] = {"x", "y + 1", "z", "q", "d[\"k\"]", "e"};
    for (int i = 0; i < 6; i++) {
        assert_int_equal(f[i].end - f[i].start, strlen(want[i]));
        assert_memory_equal(src + f[i].start, want[i], strlen(want[i]));
        assert_int_equal(f[i].expr_end - f[i].start, strlen(expr[i]));
        assert_int_equal(f[i].closed, i < 5);
    }
    /* x; y + 1 and w; z; q; d [ "k" ]; e: 1 + 4 + 1 + 1 + 4 + 1 */
    assert_int_equal(fmx_pysource_field_tokens(src, &t[0]), 12);
    fmx_pysource_close(ps);
    /* comparisons do not end an expression; nested f-strings count */
    src = "f'{a == b}{c != d}{e < f}{f\"{g}\"}' 'plain{x}'";
    ps = model(src);
    fmx_pysource_tokens(ps, &t);
    assert_int_equal(fmx_pysource_fields(src, &t[0], NULL, 0), 4);
    assert_int_equal(fmx_pysource_field_tokens(src, &t[0]), 3 + 3 + 3 + 2);
    assert_int_equal(fmx_pysource_fields(src, &t[1], f, 8), 0);
    assert_int_equal(fmx_pysource_field_tokens(src, &t[1]), 0);
    fmx_pysource_close(ps);
}

/* Any bytes give a model whose parts agree with each other. */
static void check_consistent(const char *src, size_t len) {
    fmx_pysource *ps = NULL;
    assert_int_equal(fmx_pysource_open(src, len, &ps), FMX_OK);
    const fmx_py_token *t;
    const fmx_py_line *l;
    const fmx_py_block *b;
    const fmx_py_physline *p;
    long nt = fmx_pysource_tokens(ps, &t), nl = fmx_pysource_lines(ps, &l);
    long nb = fmx_pysource_blocks(ps, &b), np = fmx_pysource_physlines(ps, &p);
    for (long i = 0; i < nt; i++) {
        assert_true(t[i].start < t[i].end && t[i].end <= len);
        assert_true(i == 0 || t[i].start >= t[i - 1].end);
        assert_true(t[i].line >= 1 && t[i].line <= np);
    }
    long next = 0;
    for (long i = 0; i < nl; i++) {
        assert_true(l[i].tok >= next && l[i].ntok > 0 && l[i].tok + l[i].ntok <= nt);
        assert_true(l[i].first >= 1 && l[i].first <= l[i].last && l[i].last <= np);
        assert_true(i == 0 || l[i].first > l[i - 1].last);
        assert_non_null(fmx_pysource_first_code(ps, i));
        next = l[i].tok + l[i].ntok;
    }
    long covered = 0;
    for (long i = 0; i < nb; i++) {
        assert_int_equal(b[i].line, covered);
        assert_true(b[i].nlines > 0 && b[i].header >= b[i].line &&
                    b[i].header < b[i].line + b[i].nlines);
        covered += b[i].nlines;
    }
    assert_int_equal(covered, nl);
    for (long i = 0; i < nt; i++)
        if (t[i].kind == FMX_PY_STRING) fmx_pysource_field_tokens(src, &t[i]);
    fmx_pysource_close(ps);
}

static void test_any_bytes(void **state) {
    (void)state;
    fmx_pysource *ps = NULL;
    assert_int_equal(fmx_pysource_open(NULL, 0, &ps), FMX_OK);
    fmx_pysource_close(ps);
    assert_int_equal(fmx_pysource_open(NULL, 3, &ps), FMX_EINVAL);
    assert_int_equal(fmx_pysource_open("x", 1, NULL), FMX_EINVAL);
    fmx_pysource_close(NULL);
    /* random bytes from a Python-ish alphabet, and every byte value */
    static const char alphabet[] = "ab_1.(){}[]'\"\\#:;=@ \t\f\r\n\n\n\x00\x80{}f";
    char buf[512];
    unsigned seed = 12345;
    for (int round = 0; round < 2000; round++) {
        size_t n = (size_t)(round % 500) + 1;
        for (size_t i = 0; i < n; i++) {
            seed = seed * 1103515245u + 12345u;
            unsigned r = seed >> 16;
            buf[i] = round % 4 == 0 ? (char)(r & 0xff) : alphabet[r % (sizeof alphabet - 1)];
        }
        check_consistent(buf, n);
    }
    /* deep nesting is no problem for the model */
    size_t n = 200000;
    char *deep = malloc(n);
    assert_non_null(deep);
    for (size_t i = 0; i < n; i++)
        deep[i] = i < n / 2 ? '(' : ')';
    check_consistent(deep, n);
    for (size_t i = 0; i < n; i++)
        deep[i] = i % 2 ? '{' : (i % 4 == 0 ? 'f' : '\'');
    check_consistent(deep, n);
    free(deep);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tokens),         cmocka_unit_test(test_string_flags),
        cmocka_unit_test(test_logical_lines),  cmocka_unit_test(test_blocks),
        cmocka_unit_test(test_fstring_fields), cmocka_unit_test(test_any_bytes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
