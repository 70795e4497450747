/*
 * test_reward.c — rewards (rewards/reward.c): the formula on hand-computed
 * cases, the LOC curve and compile score, the config loader and its errors,
 * the breakdown as valid JSON, and every rule of the logical-line counter,
 * one test each.
 */
#define _GNU_SOURCE
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "rewards/reward.h"
#include "status.h"

#define EPS 1e-12

static char dir[256];

static fmx_grade_facts perfect(long loc, long target) {
    fmx_grade_facts g = {.correctness = 1.0,
                         .loc = loc,
                         .target_loc = target,
                         .compiled = 1,
                         .host_syncs = 0,
                         .data_dependent_flow = 0,
                         .survives_optimization = 1,
                         .runs_all_shapes = 1};
    return g;
}

/* ---- the formula ---- */

static void test_default_config(void **state) {
    (void)state;
    fmx_reward_config c = fmx_reward_config_default();
    assert_string_equal(c.version, "v1-default");
    assert_float_equal(c.w_correct, 0.6, EPS);
    assert_float_equal(c.w_loc, 0.25, EPS);
    assert_float_equal(c.w_compile, 0.15, EPS);
    assert_float_equal(c.loc_slack, 1.0, EPS);
}

static void test_formula_partial_correctness_gives_only_0_6c(void **state) {
    (void)state;
    fmx_reward_config c = fmx_reward_config_default();
    double cs[] = {0.0, 0.25, 0.5, 0.999};
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) {
        fmx_grade_facts g = perfect(5, 10); /* perfect LOC and compile do not count */
        g.correctness = cs[i];
        fmx_reward_breakdown b = fmx_reward_score(&c, &g);
        assert_float_equal(b.reward, 0.6 * cs[i], EPS);
        assert_float_equal(b.correctness, cs[i], EPS);
        assert_float_equal(b.loc_score, 1.0, EPS); /* reported all the same */
        assert_float_equal(b.compile_score, 1.0, EPS);
    }
    /* out-of-range correctness is clamped */
    fmx_grade_facts g = perfect(5, 10);
    g.correctness = 1.5;
    assert_float_equal(fmx_reward_score(&c, &g).reward, 1.0, EPS);
    g.correctness = -1;
    assert_float_equal(fmx_reward_score(&c, &g).reward, 0.0, EPS);
    g.correctness = NAN;
    assert_float_equal(fmx_reward_score(&c, &g).reward, 0.0, EPS);
}

static void test_formula_full_correctness_adds_loc_and_compile(void **state) {
    (void)state;
    fmx_reward_config c = fmx_reward_config_default();
    fmx_grade_facts g = perfect(10, 10);
    assert_float_equal(fmx_reward_score(&c, &g).reward, 1.0, EPS);

    /* loc 15 of target 10: loc 0.5; one host sync: compile 0.75.
     * 0.6 + 0.25·0.5 + 0.15·0.75 = 0.8375 */
    g = perfect(15, 10);
    g.host_syncs = 1;
    fmx_reward_breakdown b = fmx_reward_score(&c, &g);
    assert_float_equal(b.loc_score, 0.5, EPS);
    assert_float_equal(b.compile_score, 0.75, EPS);
    assert_float_equal(b.reward, 0.8375, EPS);

    /* not compiled, loc far over: only the correctness term */
    g = perfect(100, 10);
    g.compiled = 0;
    assert_float_equal(fmx_reward_score(&c, &g).reward, 0.6, EPS);

    /* custom weights */
    c.w_correct = 0.5;
    c.w_loc = 0.3;
    c.w_compile = 0.2;
    g = perfect(12, 8); /* loc (12-8)/8 = 0.5 over: 0.5 */
    g.data_dependent_flow = 1;
    g.runs_all_shapes = 0; /* compile 0.5 */
    assert_float_equal(fmx_reward_score(&c, &g).reward, 0.5 + 0.3 * 0.5 + 0.2 * 0.5, EPS);
}

static void test_loc_curve(void **state) {
    (void)state;
    fmx_reward_config c = fmx_reward_config_default();
    struct {
        long loc, target;
        double slack, want;
    } cases[] = {
        {1, 10, 1.0, 1.0},                      /* under target */
        {10, 10, 1.0, 1.0},                     /* at target */
        {15, 10, 1.0, 0.5},                     /* midpoint */
        {11, 10, 1.0, 0.9}, {20, 10, 1.0, 0.0}, /* the end: target·(1 + slack) */
        {40, 10, 1.0, 0.0},                     /* past it */
        {25, 20, 0.5, 0.5},                     /* slack 0.5: zero at 30 */
        {30, 20, 0.5, 0.0}, {40, 20, 2.0, 0.5}, /* slack 2: zero at 60 */
        {60, 20, 2.0, 0.0}, {0, 0, 1.0, 1.0},   /* no target: only 0 lines score */
        {1, 0, 1.0, 0.0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        c.loc_slack = cases[i].slack;
        fmx_grade_facts g = perfect(cases[i].loc, cases[i].target);
        double got = fmx_reward_score(&c, &g).loc_score;
        if (fabs(got - cases[i].want) > EPS)
            fail_msg("loc %ld target %ld slack %g: %g, want %g", cases[i].loc, cases[i].target,
                     cases[i].slack, got, cases[i].want);
    }
}

static void test_compile_score(void **state) {
    (void)state;
    fmx_reward_config c = fmx_reward_config_default();
    fmx_grade_facts g = perfect(1, 1);
    assert_float_equal(fmx_reward_score(&c, &g).compile_score, 1.0, EPS);
    g.compiled = 0; /* every fact true, but it did not compile */
    assert_float_equal(fmx_reward_score(&c, &g).compile_score, 0.0, EPS);
    g = perfect(1, 1);
    g.host_syncs = 3; /* counts, not flags: any non-zero is a failed fact */
    g.data_dependent_flow = 1;
    assert_float_equal(fmx_reward_score(&c, &g).compile_score, 0.5, EPS);
    g.survives_optimization = 0;
    assert_float_equal(fmx_reward_score(&c, &g).compile_score, 0.25, EPS);
    g.runs_all_shapes = 0;
    assert_float_equal(fmx_reward_score(&c, &g).compile_score, 0.0, EPS);
    g = perfect(1, 1);
    g.runs_all_shapes = 0;
    assert_float_equal(fmx_reward_score(&c, &g).compile_score, 0.75, EPS);
    fmx_reward_breakdown z = fmx_reward_score(NULL, &g);
    assert_float_equal(z.reward, 0.0, EPS);
}

/* ---- config file ---- */

static const char *write_file(const char *name, const char *text) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    return path;
}

static void test_config_good_file(void **state) {
    (void)state;
    const char *path = write_file("good.cfg", "# trainer's reward\n"
                                              "\n"
                                              "version = \"v2-short\"   # quoted\n"
                                              "  w_correct=0.5\n"
                                              "w_loc = 0.35 # shorter is better\r\n"
                                              "w_compile = 1.5e-1\n"
                                              "\t# indented comment\n");
    fmx_reward_config c = fmx_reward_config_default();
    char err[256] = "x";
    assert_int_equal(fmx_reward_config_load(path, &c, err, sizeof err), 0);
    assert_string_equal(err, "");
    assert_string_equal(c.version, "v2-short");
    assert_float_equal(c.w_correct, 0.5, EPS);
    assert_float_equal(c.w_loc, 0.35, EPS);
    assert_float_equal(c.w_compile, 0.15, EPS);
    assert_float_equal(c.loc_slack, 1.0, EPS); /* not in the file: default */

    path = write_file("plain.cfg", "version = v3\nloc_slack = 0.5\n");
    assert_int_equal(fmx_reward_config_load(path, &c, err, sizeof err), 0);
    assert_string_equal(c.version, "v3");
    assert_float_equal(c.loc_slack, 0.5, EPS);
    assert_float_equal(c.w_correct, 0.6, EPS); /* loading starts from the defaults */
}

/* Loading text must fail with FMX_EFORMAT, err containing every `want`, and
 * leave the config untouched. */
static void expect_bad(const char *text, const char *want1, const char *want2) {
    const char *path = write_file("bad.cfg", text);
    fmx_reward_config c = fmx_reward_config_default();
    c.w_loc = 0.123;
    char err[256] = "";
    int st = fmx_reward_config_load(path, &c, err, sizeof err);
    if (st != FMX_EFORMAT) fail_msg("\"%s\": status %d, err %s", text, st, err);
    if (!strstr(err, want1) || (want2 && !strstr(err, want2)))
        fail_msg("\"%s\": message \"%s\" lacks \"%s\"/\"%s\"", text, err, want1,
                 want2 ? want2 : "");
    assert_non_null(strstr(err, "bad.cfg"));
    assert_float_equal(c.w_loc, 0.123, EPS);
}

static void test_config_errors_name_the_line(void **state) {
    (void)state;
    expect_bad("version = a\n# ok\nw_lox = 0.3\n", "bad.cfg:3:", "unknown key \"w_lox\"");
    expect_bad("version = a\nw_loc = 0.3x\n", "bad.cfg:2:", "\"0.3x\" is not a number");
    expect_bad("version = a\nw_loc =\n", "bad.cfg:2:", "not a number");
    expect_bad("version = a\n\nw_loc = nan\n", "bad.cfg:3:", "not a number");
    expect_bad("version = a\nw_compile = -0.1\n", "bad.cfg:2:", "must be >= 0");
    expect_bad("version = a\nloc_slack = 0\n", "bad.cfg:2:", "must be > 0");
    expect_bad("version = a\nw_loc 0.3\n", "bad.cfg:2:", "expected `key = value`");
    expect_bad("version = a\nw_loc = 1\nw_loc = 2\n", "bad.cfg:3:", "set twice");
    expect_bad("version = \"\"\n", "bad.cfg:1:", "version must be");
    expect_bad("w_loc = 0.3\n", "no `version", NULL);

    fmx_reward_config c;
    char err[256];
    char path[512];
    snprintf(path, sizeof path, "%s/missing.cfg", dir);
    assert_int_equal(fmx_reward_config_load(path, &c, err, sizeof err), FMX_EIO);
    assert_non_null(strstr(err, "missing.cfg"));
    assert_int_equal(fmx_reward_config_load(NULL, &c, err, sizeof err), FMX_EINVAL);
}

/* ---- breakdown JSON ---- */

static void test_breakdown_is_valid_json(void **state) {
    (void)state;
    fmx_reward_config c = fmx_reward_config_default();
    snprintf(c.version, sizeof c.version, "v\"1\\x\n");
    fmx_grade_facts g = perfect(15, 10);
    g.host_syncs = 1;
    fmx_reward_breakdown b = fmx_reward_score(&c, &g);
    char buf[FMX_REWARD_BREAKDOWN_MAX];
    assert_int_equal(fmx_reward_breakdown_json(&c, &g, &b, buf, sizeof buf), 0);
    cJSON *j = cJSON_Parse(buf);
    if (!j) fail_msg("not JSON: %s", buf);
    assert_string_equal(cJSON_GetObjectItem(j, "version")->valuestring, "v\"1\\x\n");
    assert_float_equal(cJSON_GetObjectItem(j, "reward")->valuedouble, 0.8375, EPS);
    assert_float_equal(cJSON_GetObjectItem(j, "loc_score")->valuedouble, 0.5, EPS);
    assert_float_equal(cJSON_GetObjectItem(j, "compile_score")->valuedouble, 0.75, EPS);
    assert_float_equal(cJSON_GetObjectItem(j, "correctness")->valuedouble, 1.0, EPS);
    cJSON *w = cJSON_GetObjectItem(j, "weights");
    assert_float_equal(cJSON_GetObjectItem(w, "w_loc")->valuedouble, 0.25, EPS);
    assert_float_equal(cJSON_GetObjectItem(w, "loc_slack")->valuedouble, 1.0, EPS);
    cJSON *f = cJSON_GetObjectItem(j, "facts");
    assert_int_equal(cJSON_GetObjectItem(f, "loc")->valueint, 15);
    assert_int_equal(cJSON_GetObjectItem(f, "target_loc")->valueint, 10);
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(f, "host_syncs")));
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(f, "data_dependent_flow")));
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(f, "compiled")));
    cJSON_Delete(j);

    /* NaN cannot be JSON: it becomes null and the text still parses. */
    g.correctness = NAN;
    b = fmx_reward_score(&c, &g);
    b.reward = INFINITY;
    assert_int_equal(fmx_reward_breakdown_json(&c, &g, &b, buf, sizeof buf), 0);
    j = cJSON_Parse(buf);
    assert_non_null(j);
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, "reward")));
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "facts"), "correctness")));
    cJSON_Delete(j);

    /* The longest version, all escapes, fits FMX_REWARD_BREAKDOWN_MAX. */
    memset(c.version, '\x01', sizeof c.version - 1);
    c.version[sizeof c.version - 1] = '\0';
    g.loc = g.target_loc = -9223372036854775807L;
    b.correctness = b.loc_score = b.compile_score = b.reward = -1.2345678901234567e-300;
    assert_int_equal(fmx_reward_breakdown_json(&c, &g, &b, buf, sizeof buf), 0);
    j = cJSON_Parse(buf);
    assert_non_null(j);
    cJSON_Delete(j);

    char small[64];
    assert_int_equal(fmx_reward_breakdown_json(&c, &g, &b, small, sizeof small), FMX_EINVAL);
    assert_string_equal(small, "");
}

/* ---- logical lines ---- */

static long loc(const char *src) {
    return fmx_reward_count_loc(src, strlen(src));
}

#define ASSERT_LOC(src, want)                                                                      \
    do {                                                                                           \
        long got_ = loc(src);                                                                      \
        if (got_ != (want))                                                                        \
            fail_msg("count_loc = %ld, want %ld for:\n%s", got_, (long)(want), src);               \
    } while (0)

static void test_loc_semicolons(void **state) {
    (void)state;
    ASSERT_LOC("a = 1; b = 2; c = 3\n", 3);
    ASSERT_LOC("a = 1;\n", 1);
    ASSERT_LOC("x = f(a, b); y = g[1:2]; return x\n", 3);
}

/* "z = a, a, ..., a," with m names: 2 + 2m tokens. */
static char *one_liner(int m) {
    size_t n = 8 + 3 * (size_t)m;
    char *s = malloc(n);
    assert_non_null(s);
    strcpy(s, "z = ");
    for (int i = 0; i < m; i++)
        strcat(s, "a,");
    strcat(s, "\n");
    return s;
}

static void test_loc_giant_one_liner(void **state) {
    (void)state;
    struct {
        int m;
        long want;
    } cases[] = {{23, 1},
                 {24, 2}, /* 48 tokens, 50 tokens */
                 {47, 2},
                 {48, 3},  /* 96, 98 */
                 {99, 5}}; /* 200 tokens */
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *s = one_liner(cases[i].m);
        ASSERT_LOC(s, cases[i].want);
        free(s);
    }
    /* 24 names, no trailing comma: 2 + 24 + 23 = 49 tokens */
    ASSERT_LOC("z = a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a\n", 2);
}

static void test_loc_multiline_call_counts_once(void **state) {
    (void)state;
    ASSERT_LOC("y = f(\n"
               "    a,\n"
               "\n"
               "    b,  # a comment inside\n"
               "    [c,\n"
               "     d],\n"
               "    {1: 2,\n"
               "     3: 4},\n"
               ")\n"
               "z = 1\n",
               2);
}

static void test_loc_strings_hide_hash_semicolon_newline(void **state) {
    (void)state;
    ASSERT_LOC("s = 'a # b; c'\n"
               "t = \"x;y#z\"\n"
               "u = '''line1\n"
               "line2; x = 1\n"
               "# not a comment'''\n"
               "v = \"\"\"a\n"
               "\"\" still in; \"\n"
               "\"\"\"\n",
               4);
    ASSERT_LOC("a = 'it\\'s; b = 2'\n" /* escaped quote */
               "c = r\"\\\"#;\"\n"     /* raw string with an escaped quote */
               "d = f\"{x};#{y!r}\"\n" /* f-string */
               "e = b'\\\\'; g = 1\n"  /* string ending in an escaped backslash */
               "h = Rb'x;#'; i = rf'''\n;'''\n"
               "j = 'cont\\\n" /* backslash-newline inside a string */
               "inues; here'\n",
               8);
    /* prefix-like names that are not prefixes */
    ASSERT_LOC("rb = 1; fr = 2; u = rb + fr\n", 3);
}

static void test_loc_docstrings_ignored(void **state) {
    (void)state;
    ASSERT_LOC("\"\"\"Module doc.\n"
               "\n"
               "def not_code(): pass\n"
               "\"\"\"\n"
               "\n"
               "def f(x):\n"
               "    '''Doc; with ; and # inside.'''\n"
               "    return x\n"
               "\n"
               "def g(x):\n"
               "    \"\"\"Doc\"\"\" \"continued\"\n"
               "    y = x\n"
               "    \"not a docstring: not first\"\n"
               "    return y\n",
               6);
    ASSERT_LOC("def h(): \"doc\"; return 1\n", 2);
    ASSERT_LOC("x = 1\n\"not first in the module\"\n", 2);
}

static void test_loc_imports_ignored(void **state) {
    (void)state;
    ASSERT_LOC("import torch\n"
               "import torch.nn.functional as F\n"
               "from typing import Dict, \\\n"
               "    Tuple\n"
               "from torch import (\n"
               "    Tensor,\n"
               ")\n"
               "import math; x = 1\n",
               1);
}

static void test_loc_def_tap_ignored(void **state) {
    (void)state;
    ASSERT_LOC("def tap(name: str, x: Tensor) -> Tensor:\n"
               "    \"\"\"Identity; fmx reads the name.\"\"\"\n"
               "    # nothing else\n"
               "    if name:\n"
               "        pass\n"
               "    return x\n"
               "\n"
               "def f(x):\n"
               "    return tap(\"a\", x)\n",
               2);
    ASSERT_LOC("@torch.jit.ignore\n"
               "def tap(n, x):\n"
               "    return x\n"
               "y = 1\n",
               1);
    ASSERT_LOC("def tap(n, x): return x\n", 0);
    ASSERT_LOC("def tapper(n, x): return x\n", 2);
}

static void test_loc_main_block_ignored(void **state) {
    (void)state;
    ASSERT_LOC("def f():\n"
               "    return 1\n"
               "\n"
               "if __name__ == \"__main__\":\n"
               "    import sys\n"
               "\n"
               "    print(f())\n"
               "    for i in range(3):\n"
               "        print(i)\n"
               "x = 2\n",
               3);
    ASSERT_LOC("if __name__ == '__main__': main()\nx = 1\n", 1);
    ASSERT_LOC("if '__main__' == __name__:\n\tmain()\n", 0);
    ASSERT_LOC("if __name__ == 'other':\n    main()\n", 2);
}

static void test_loc_compound_header_with_body(void **state) {
    (void)state;
    ASSERT_LOC("if x: return y\n", 2);
    ASSERT_LOC("def f(x): return x\n", 2);
    ASSERT_LOC("if x: a = 1; b = 2\nelse: c = 3\n", 5);
    ASSERT_LOC("for k, v in {1: 2}.items(): print(k[1:2])\n", 2);
    ASSERT_LOC("if (lambda: 1)(): pass\n", 2);
    /* A lambda's colon does not end a header: here the body is 47 tokens (1);
     * split at the lambda's colon it would be 49 (2). */
    ASSERT_LOC("if lambda: 0: z = a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a\n", 2);
    ASSERT_LOC("while x := f(): g(lambda a: a)\n", 2);
    ASSERT_LOC("try:\n    a()\nexcept ValueError as e:\n    raise\nfinally:\n    b()\n", 6);
    ASSERT_LOC("def f(x: int,\n      y: int) -> int:\n    return x\n", 2);
    ASSERT_LOC("x: int = 5\n", 1); /* an annotation, not a header */
    ASSERT_LOC("@dec\n@dec2(a=1)\ndef f(): pass\n", 4);
    ASSERT_LOC("class A:\n    \"\"\"doc\"\"\"\n    x = 1\n", 2);
}

static void test_loc_comments_and_blank_lines_ignored(void **state) {
    (void)state;
    ASSERT_LOC("\n\n# comment\n   # indented comment\nx = 1  # trailing\n\n   \n", 1);
    ASSERT_LOC("", 0);
    ASSERT_LOC("# only a comment", 0);
    ASSERT_LOC("x = 1\r\ny = 2\r\n", 2);
    assert_int_equal(fmx_reward_count_loc(NULL, 10), 0);
    assert_int_equal(fmx_reward_count_loc("x = 1\ny = 2\n", 5), 1); /* len is honoured */
}

static void test_loc_backslash_continuation(void **state) {
    (void)state;
    ASSERT_LOC("x = 1 + \\\n    2 + \\\n    3\n", 1);
    ASSERT_LOC("if a and \\\n   b:\n    pass\n", 2);
    ASSERT_LOC("x = 1 + \\\r\n    2\n", 1);
}

static void test_loc_bad_python_does_not_crash(void **state) {
    (void)state;
    /* unterminated strings and brackets, stray closers: counted, never fail */
    ASSERT_LOC("x = 'abc\ny = 2\n", 2);
    ASSERT_LOC("x = '''abc\ny = 2\n", 1);
    ASSERT_LOC("x = (1,\ny = 2\n", 1);
    ASSERT_LOC(")) x = 1\ny = 2\n", 2);
    ASSERT_LOC("if x\n    y\n", 2);
    ASSERT_LOC("\\", 0);
    ASSERT_LOC("x = '", 1);
    ASSERT_LOC("'", 0); /* a lone string first in the module is its docstring */
}

/* The zero blocks are CPython's: the counter reads fmx's one source model
 * (env/pysource.h), the one the compiler drops blocks by. */
static void test_loc_zero_blocks_are_pythons(void **state) {
    (void)state;
    /* a line holding only a backslash, then an indented def: CPython
     * indents it as the next line is, inside tap (Python never defines it) */
    ASSERT_LOC("def tap(n, x):\n    return x\n\\\n    def forward(x):\n        return x\n", 0);
    /* an indented backslash: its column counts, inside tap again */
    ASSERT_LOC("def tap(n, x):\n    return x\n    \\\ndef forward(x):\n        return x\n", 0);
    /* at column 0 before a def at column 0: top level, counted */
    ASSERT_LOC("def tap(n, x):\n    return x\n\\\ndef forward(x):\n    return x\n", 2);
    /* a string continued over a line end holds the def: it is text */
    ASSERT_LOC("def tap(n, x):\n    s = 'a\\\ndef forward(x): return x'\n    return x\n", 0);
    /* a string ending in an escaped backslash ends there: the def is code */
    ASSERT_LOC("def tap(n, x):\n    s = 'a\\\\'\ndef forward(x): return x\n", 2);
    /* lone CRs end lines; a form feed resets the indentation column */
    ASSERT_LOC("def tap(n, x):\r    return x\rdef forward(x):\r    return x\r", 2);
    ASSERT_LOC("def tap(n, x):\n    return x\n    \fdef forward(x):\n        return x\n", 2);
    ASSERT_LOC("def tap(n, x):\n\treturn x\n\tdef g(): pass\nx = 1\n", 1);
}

/* A real solution file: what a policy would submit. */
static void test_loc_realistic_solution(void **state) {
    (void)state;
    ASSERT_LOC("\"\"\"Functional Qwen2 MLP.\"\"\"\n"
               "from typing import Dict\n"
               "import torch\n"
               "import torch.nn.functional as F\n"
               "from torch import Tensor\n"
               "\n"
               "EPS = 1e-6\n"
               "\n"
               "\n"
               "def tap(name: str, x: Tensor) -> Tensor:\n"
               "    return x\n"
               "\n"
               "\n"
               "def rms_norm(x: Tensor, w: Tensor) -> Tensor:\n"
               "    \"\"\"RMSNorm in float32.\"\"\"\n"
               "    v = x.float().pow(2).mean(-1, keepdim=True)\n"
               "    return w * (x.float() * torch.rsqrt(v + EPS)).to(x.dtype)\n"
               "\n"
               "\n"
               "def forward(hidden_states: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n"
               "    h = rms_norm(hidden_states, weights[\"norm.weight\"])\n"
               "    g = F.silu(F.linear(h, weights[\"gate_proj.weight\"]))\n"
               "    u = F.linear(h, weights[\"up_proj.weight\"])\n"
               "    return tap(\"mlp\", F.linear(g * u, weights[\"down_proj.weight\"]))\n"
               "\n"
               "\n"
               "if __name__ == \"__main__\":\n"
               "    x = torch.randn(2, 3, 8)\n"
               "    print(forward(x, {}))\n",
               9);
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/fmx_test_reward_XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_default_config),
        cmocka_unit_test(test_formula_partial_correctness_gives_only_0_6c),
        cmocka_unit_test(test_formula_full_correctness_adds_loc_and_compile),
        cmocka_unit_test(test_loc_curve),
        cmocka_unit_test(test_compile_score),
        cmocka_unit_test(test_config_good_file),
        cmocka_unit_test(test_config_errors_name_the_line),
        cmocka_unit_test(test_breakdown_is_valid_json),
        cmocka_unit_test(test_loc_semicolons),
        cmocka_unit_test(test_loc_giant_one_liner),
        cmocka_unit_test(test_loc_multiline_call_counts_once),
        cmocka_unit_test(test_loc_strings_hide_hash_semicolon_newline),
        cmocka_unit_test(test_loc_docstrings_ignored),
        cmocka_unit_test(test_loc_imports_ignored),
        cmocka_unit_test(test_loc_def_tap_ignored),
        cmocka_unit_test(test_loc_main_block_ignored),
        cmocka_unit_test(test_loc_compound_header_with_body),
        cmocka_unit_test(test_loc_comments_and_blank_lines_ignored),
        cmocka_unit_test(test_loc_backslash_continuation),
        cmocka_unit_test(test_loc_bad_python_does_not_crash),
        cmocka_unit_test(test_loc_zero_blocks_are_pythons),
        cmocka_unit_test(test_loc_realistic_solution),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    return failed ? 1 : 0;
}
