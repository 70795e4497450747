/*
 * test_progress.c — env/progress.c: what a long command prints on stderr
 * when it is not a terminal (a line per ~10%, the last one N/N), and
 * nothing when quiet.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "env/progress.h"

/* Runs steps of a progress of total items with stderr going to a file;
 * returns what it printed (caller frees). */
static char *printed(int total, int steps, int quiet) {
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    FILE *tmp = tmpfile();
    assert_non_null(tmp);
    dup2(fileno(tmp), STDERR_FILENO);
    fmx_progress *p = fmx_progress_create("items", total, quiet);
    for (int i = 0; i < steps; i++)
        fmx_progress_step(p, "x");
    fmx_progress_destroy(p);
    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    long n = ftell(tmp);
    char *text = calloc(1, (size_t)n + 1);
    rewind(tmp);
    assert_int_equal(fread(text, 1, (size_t)n, tmp), (size_t)n);
    fclose(tmp);
    return text;
}

static int lines(const char *s) {
    int n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

static void test_a_line_per_tenth(void **state) {
    (void)state;
    char *t = printed(200, 200, 0);
    assert_int_equal(lines(t), 10);
    assert_non_null(strstr(t, "items 20/200 (10%), "));
    assert_non_null(strstr(t, "items 200/200 (100%), "));
    assert_null(strstr(t, "\r")); /* no redrawing in a log */
    free(t);
    t = printed(3, 3, 0); /* fewer items than tenths: a line each */
    assert_int_equal(lines(t), 3);
    assert_non_null(strstr(t, "items 3/3 (100%)"));
    free(t);
}

static void test_quiet_prints_nothing(void **state) {
    (void)state;
    char *t = printed(50, 50, 1);
    assert_string_equal(t, "");
    free(t);
    t = printed(0, 0, 0);
    assert_string_equal(t, "");
    free(t);
    fmx_progress_step(NULL, NULL); /* NULL is accepted */
    fmx_progress_destroy(NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_a_line_per_tenth),
        cmocka_unit_test(test_quiet_prints_nothing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
