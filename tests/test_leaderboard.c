/*
 * test_leaderboard.c — the leaderboard (episodes/leaderboard.c) over a log
 * written with fmx_log: counts, pass rate, reward mean and spread, LOC,
 * steps and compile score per (policy, task) and per policy; unfinished
 * episodes counted apart; policies ranked by mean reward; the policy filter;
 * the printed table; and files that are missing or not logs refused.
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

#include <cmocka.h>
#include <sqlite3.h>

#include "episodes/leaderboard.h"
#include "episodes/log.h"
#include "status.h"

/* Doubles equal within tol (cmocka's assert_float_equal works in float). */
#define assert_near(a, b, tol) near_ok((a), (b), (tol), #a, __FILE__, __LINE__)

static void near_ok(double a, double b, double tol, const char *what, const char *file, int line) {
    if (!(fabs(a - b) <= tol)) fail_msg("%s:%d: %s = %.17g, want %.17g", file, line, what, a, b);
}

static char dir[256];
static char db_path[320];

/* One episode: status, reward, steps, and a submission unless correctness < 0. */
static void episode(fmx_log *log, int64_t policy, const char *task, const char *status,
                    double reward, int steps, double correctness, int64_t loc, double compile) {
    int64_t ep = 0;
    assert_int_equal(fmx_log_episode_begin(log, task, policy, 0, &ep), FMX_OK);
    for (int i = 0; i < steps; i++) {
        fmx_step_record s = {.episode = ep,
                             .idx = i,
                             .tool = "trace_ops",
                             .args = "{}",
                             .observation = "{}",
                             .started_at = 1,
                             .ms = 1};
        assert_int_equal(fmx_log_step(log, &s), FMX_OK);
    }
    if (correctness >= 0) {
        fmx_submission_record sub = {.episode = ep,
                                     .code = "def forward() -> int:\n    return 0\n",
                                     .entry = "forward",
                                     .correctness = correctness,
                                     .loc = loc,
                                     .compile_score = compile,
                                     .reward = reward,
                                     .reward_version = "v1-default",
                                     .truncated = strcmp(status, "truncated") == 0};
        assert_int_equal(fmx_log_submission(log, &sub, NULL), FMX_OK);
    }
    if (strcmp(status, "open") != 0)
        assert_int_equal(fmx_log_episode_end(log, ep, status, reward), FMX_OK);
}

/* good: 3 episodes on t1 (rewards 1.0, 0.8, truncated 0.6 with c = 1, 0.75, 1),
 *       1 on t2 (0.9), 1 aborted on t1.
 * bad:  2 on t1 (0 and 0.3, c = 0 and 0.5), 1 truncated on t2 with nothing graded. */
static int setup(void **state) {
    snprintf(dir, sizeof dir, "/tmp/fmx-test-leaderboard-XXXXXX");
    assert_non_null(mkdtemp(dir));
    snprintf(db_path, sizeof db_path, "%s/log.db", dir);
    fmx_log *log = NULL;
    char err[512];
    assert_int_equal(fmx_log_open(db_path, &log, err, sizeof err), FMX_OK);
    assert_int_equal(fmx_log_task(log, "t1", "component", "p", "a", "A", 10), FMX_OK);
    assert_int_equal(fmx_log_task(log, "t2", "model", "p", "", "M", 60), FMX_OK);
    int64_t good = 0, bad = 0;
    assert_int_equal(fmx_log_policy(log, "good", &good), FMX_OK);
    assert_int_equal(fmx_log_policy(log, "bad", &bad), FMX_OK);
    episode(log, good, "t1", "submitted", 1.0, 6, 1.0, 10, 1.0);
    episode(log, good, "t1", "submitted", 0.8, 4, 1.0, 30, 0.5);
    episode(log, good, "t1", "truncated", 0.6, 40, 1.0, 20, 0.0);
    episode(log, good, "t2", "submitted", 0.9, 2, 1.0, 70, 1.0);
    episode(log, good, "t1", "aborted", 0, 3, -1, 0, 0);
    episode(log, bad, "t1", "submitted", 0.0, 1, 0.0, 2, 0.75);
    episode(log, bad, "t1", "submitted", 0.3, 1, 0.5, 4, 0.25);
    episode(log, bad, "t2", "truncated", 0.0, 40, -1, 0, 0);
    episode(log, bad, "t2", "open", 0.0, 1, -1, 0, 0);
    fmx_log_close(log);
    (void)state;
    return 0;
}

static int teardown(void **state) {
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    (void)state;
    return system(cmd) == 0 ? 0 : -1;
}

static fmx_leaderboard *open_ok(const char *policy) {
    fmx_leaderboard *lb = NULL;
    char err[512] = "";
    int rc = fmx_leaderboard_open(db_path, policy, &lb, err, sizeof err);
    if (rc != FMX_OK) fail_msg("%s (%s)", err, fmx_strerror(rc));
    return lb;
}

static const fmx_leaderboard_row *find(const fmx_leaderboard *lb, const char *policy,
                                       const char *task) {
    for (int i = 0; i < fmx_leaderboard_count(lb); i++) {
        const fmx_leaderboard_row *r = fmx_leaderboard_row_at(lb, i);
        if (strcmp(r->policy, policy) == 0 &&
            (task ? r->task && strcmp(r->task, task) == 0 : r->task == NULL))
            return r;
    }
    fail_msg("no row %s/%s", policy, task ? task : "(all)");
    return NULL;
}

static void test_rows_per_policy_and_task(void **state) {
    fmx_leaderboard *lb = open_ok(NULL);
    assert_int_equal(fmx_leaderboard_count(lb), 6); /* 2 totals + 2 × 2 tasks */
    const fmx_leaderboard_row *r = find(lb, "good", "t1");
    assert_int_equal(r->episodes, 3);
    assert_int_equal(r->unfinished, 1);
    assert_int_equal(r->passed, 3);
    assert_int_equal(r->graded, 3);
    assert_near(r->pass_rate, 1.0, 1e-12);
    assert_near(r->reward_mean, 0.8, 1e-12);
    assert_near(r->reward_sd, 0.2, 1e-12); /* sample sd of 1.0, 0.8, 0.6 */
    assert_near(r->loc_mean, 20.0, 1e-12);
    assert_near(r->steps_mean, 50.0 / 3, 1e-12);
    assert_near(r->compile_mean, 0.5, 1e-12);

    r = find(lb, "good", NULL); /* all of good's finished episodes */
    assert_int_equal(r->episodes, 4);
    assert_int_equal(r->unfinished, 1);
    assert_near(r->reward_mean, 0.825, 1e-12);
    assert_near(r->loc_mean, 32.5, 1e-12);

    r = find(lb, "bad", "t2"); /* truncated with nothing graded: reward 0, no LOC */
    assert_int_equal(r->episodes, 1);
    assert_int_equal(r->unfinished, 1);
    assert_int_equal(r->graded, 0);
    assert_near(r->reward_mean, 0.0, 0);
    assert_near(r->reward_sd, 0.0, 0);
    assert_true(isnan(r->loc_mean) && isnan(r->compile_mean));
    assert_near(r->steps_mean, 40.0, 1e-12);

    r = find(lb, "bad", NULL);
    assert_int_equal(r->episodes, 3);
    assert_int_equal(r->passed, 0);
    assert_near(r->pass_rate, 0.0, 0);
    assert_near(r->reward_mean, 0.1, 1e-12);
    assert_near(r->loc_mean, 3.0, 1e-12);
    (void)state;
    fmx_leaderboard_close(lb);
}

static void test_policies_ranked_by_mean_reward(void **state) {
    fmx_leaderboard *lb = open_ok(NULL);
    /* good (0.825) before bad (0.1) although "bad" sorts first by name;
     * each policy's total, then its tasks in id order */
    const char *want[][2] = {{"good", NULL}, {"good", "t1"}, {"good", "t2"},
                             {"bad", NULL},  {"bad", "t1"},  {"bad", "t2"}};
    for (int i = 0; i < 6; i++) {
        const fmx_leaderboard_row *r = fmx_leaderboard_row_at(lb, i);
        assert_string_equal(r->policy, want[i][0]);
        if (want[i][1])
            assert_string_equal(r->task, want[i][1]);
        else
            assert_null(r->task);
    }
    assert_null(fmx_leaderboard_row_at(lb, 6));
    assert_null(fmx_leaderboard_row_at(lb, -1));
    (void)state;
    fmx_leaderboard_close(lb);
}

static void test_policy_filter(void **state) {
    fmx_leaderboard *lb = open_ok("bad");
    assert_int_equal(fmx_leaderboard_count(lb), 3);
    for (int i = 0; i < 3; i++)
        assert_string_equal(fmx_leaderboard_row_at(lb, i)->policy, "bad");
    fmx_leaderboard_close(lb);
    lb = open_ok("nobody");
    assert_int_equal(fmx_leaderboard_count(lb), 0);
    fmx_leaderboard_close(lb);
    (void)state;
}

static void test_printed_table(void **state) {
    fmx_leaderboard *lb = open_ok(NULL);
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    fmx_leaderboard_print(f, lb);
    fclose(f);
    fmx_leaderboard_close(lb);
    /* the ranking, then policy × task grouped by task */
    const char *rank1 = strstr(text, "\n1     good");
    const char *rank2 = strstr(text, "\n2     bad");
    assert_non_null(rank1);
    assert_non_null(rank2);
    assert_true(rank1 < rank2);
    assert_non_null(strstr(text, "0.825 \u00b1 "));
    const char *t1_good = strstr(text, "\nt1    good");
    const char *t1_bad = strstr(text, "\nt1    bad");
    const char *t2_good = strstr(text, "\nt2    good");
    assert_true(t1_good && t1_bad && t2_good && t1_good < t1_bad && t1_bad < t2_good);
    assert_non_null(strstr(text, "2 aborted, closed or open episodes not counted"));
    free(text);

    /* an empty log says so */
    char empty[400];
    snprintf(empty, sizeof empty, "%s/empty.db", dir);
    fmx_log *log = NULL;
    char err[256];
    assert_int_equal(fmx_log_open(empty, &log, err, sizeof err), FMX_OK);
    fmx_log_close(log);
    lb = NULL;
    assert_int_equal(fmx_leaderboard_open(empty, NULL, &lb, err, sizeof err), FMX_OK);
    f = open_memstream(&text, &len);
    fmx_leaderboard_print(f, lb);
    fclose(f);
    assert_string_equal(text, "no episodes in the log yet\n");
    free(text);
    fmx_leaderboard_close(lb);
    (void)state;
}

static void test_refuses_missing_and_foreign_files(void **state) {
    char path[400], err[512];
    fmx_leaderboard *lb = (fmx_leaderboard *)1;
    snprintf(path, sizeof path, "%s/missing.db", dir);
    assert_int_equal(fmx_leaderboard_open(path, NULL, &lb, err, sizeof err), FMX_EIO);
    assert_null(lb);
    assert_non_null(strstr(err, "missing.db"));
    assert_int_equal(access(path, F_OK), -1); /* read-only: nothing created */

    /* an SQLite file that is not an fmx log */
    snprintf(path, sizeof path, "%s/other.db", dir);
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, "CREATE TABLE x (y)", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
    assert_int_equal(fmx_leaderboard_open(path, NULL, &lb, err, sizeof err), FMX_EFORMAT);
    assert_non_null(strstr(err, "not an fmx episode log"));

    /* not SQLite at all */
    snprintf(path, sizeof path, "%s/text.db", dir);
    FILE *f = fopen(path, "w");
    fputs("this is not a database, just some text that is long enough to have a header\n", f);
    fclose(f);
    assert_int_equal(fmx_leaderboard_open(path, NULL, &lb, err, sizeof err), FMX_EFORMAT);
    assert_null(lb);
    (void)state;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rows_per_policy_and_task),
        cmocka_unit_test(test_policies_ranked_by_mean_reward),
        cmocka_unit_test(test_policy_filter),
        cmocka_unit_test(test_printed_table),
        cmocka_unit_test(test_refuses_missing_and_foreign_files),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
