/*
 * test_log.c — the episode log (episodes/log.c): a new file gets the schema,
 * every field of tasks, policies, episodes, steps and submissions written
 * through fmx_log reads back unchanged with plain sqlite3 queries, batches
 * commit or roll back as a whole, readers see committed data while a write is
 * open (WAL), what a process committed survives its _exit or SIGKILL, and
 * files that are not logs, or logs from a newer fmx, are refused clearly.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>
#include <sqlite3.h>

#include "episodes/log.h"
#include "status.h"

static char dir[256];
static int n_paths;

/* A fresh file name in the test directory. */
static const char *new_path(char *buf, size_t n) {
    snprintf(buf, n, "%s/log%d.db", dir, n_paths++);
    return buf;
}

static fmx_log *open_ok(const char *path) {
    fmx_log *log = NULL;
    char err[512] = "";
    int st = fmx_log_open(path, &log, err, sizeof err);
    if (st) fail_msg("open %s: %s (%s)", path, err, fmx_strerror(st));
    assert_non_null(log);
    return log;
}

/* A plain SQLite connection, as a reader tool would open one. */
static sqlite3 *reader(const char *path) {
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    return db;
}

static int64_t q_int(sqlite3 *db, const char *fmt, ...) {
    char sql[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
        fail_msg("%s: %s", sql, sqlite3_errmsg(db));
    int rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) fail_msg("%s: no row (%s)", sql, sqlite3_errmsg(db));
    int64_t v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

static void exec_sql(sqlite3 *db, const char *sql) {
    char *m = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &m) != SQLITE_OK) fail_msg("%s: %s", sql, m);
}

static fmx_step_record make_step(int64_t ep, int64_t idx, const char *tool) {
    fmx_step_record s;
    memset(&s, 0, sizeof s);
    s.episode = ep;
    s.idx = idx;
    s.tool = tool;
    s.args = "{\"path\":\"model.layers.0\"}";
    s.observation = "{\"tool\":\"x\",\"text\":\"ok\",\"data\":{}}";
    s.reward = 0;
    s.started_at = 1700000000.25;
    s.ms = 1.5;
    return s;
}

/* A log with one task, one policy and one open episode. */
static fmx_log *setup_episode(const char *path, int64_t *ep) {
    fmx_log *log = open_ok(path);
    int64_t pol = 0;
    assert_int_equal(fmx_log_task(log, "tiny", "model", "tiny", "", "Tiny", 40), 0);
    assert_int_equal(fmx_log_policy(log, "anonymous", &pol), 0);
    assert_int_equal(fmx_log_episode_begin(log, "tiny", pol, 7, ep), 0);
    return log;
}

static void log_steps(fmx_log *log, int64_t ep, int64_t from, int n) {
    for (int i = 0; i < n; i++) {
        fmx_step_record s = make_step(ep, from + i, "trace_ops");
        int st = fmx_log_step(log, &s);
        if (st) fail_msg("step %lld: %s", (long long)(from + i), fmx_log_errmsg(log));
    }
}

/* ---- schema ---- */

static void test_open_creates_schema(void **state) {
    (void)state;
    char path[300];
    fmx_log *log = open_ok(new_path(path, sizeof path));
    assert_string_equal(fmx_log_errmsg(log), "");
    sqlite3 *db = reader(path);
    assert_int_equal(q_int(db, "SELECT value FROM meta WHERE key = 'schema_version'"),
                     FMX_LOG_SCHEMA_VERSION);
    const char *tables[] = {"meta",      "tasks", "policies",    "episodes",
                            "step_rows", "blobs", "submissions", "grades"};
    for (size_t i = 0; i < sizeof tables / sizeof tables[0]; i++)
        assert_int_equal(
            q_int(db, "SELECT count(*) FROM sqlite_master WHERE type='table' AND name='%s'",
                  tables[i]),
            1);
    assert_int_equal(
        q_int(db, "SELECT count(*) FROM sqlite_master WHERE type='view' AND name='steps'"), 1);
    /* WAL is a property of the file, seen by every connection. */
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_string_equal((const char *)sqlite3_column_text(st, 0), "wal");
    sqlite3_finalize(st);

    /* The steps columns are the X-macro's, in order. */
    const char *names[] = {
#define NAME(kind, name, sql, desc) #name,
        FMX_STEP_FIELDS(NAME)
#undef NAME
    };
    assert_int_equal(
        sqlite3_prepare_v2(db, "SELECT name FROM pragma_table_info('steps')", -1, &st, NULL),
        SQLITE_OK);
    size_t i = 0;
    while (sqlite3_step(st) == SQLITE_ROW) {
        assert_true(i < sizeof names / sizeof names[0]);
        assert_string_equal((const char *)sqlite3_column_text(st, 0), names[i]);
        i++;
    }
    sqlite3_finalize(st);
    assert_int_equal(i, sizeof names / sizeof names[0]);

    /* Reading one episode's steps and a policy's episodes uses an index. */
    const char *plans[] = {
        "EXPLAIN QUERY PLAN SELECT * FROM steps WHERE episode = 1 ORDER BY idx",
        "EXPLAIN QUERY PLAN SELECT * FROM episodes WHERE policy_id = 1 AND task_id = 'a'",
        "EXPLAIN QUERY PLAN SELECT * FROM submissions WHERE episode = 1",
    };
    for (size_t k = 0; k < sizeof plans / sizeof plans[0]; k++) {
        assert_int_equal(sqlite3_prepare_v2(db, plans[k], -1, &st, NULL), SQLITE_OK);
        assert_int_equal(sqlite3_step(st), SQLITE_ROW);
        const char *detail = (const char *)sqlite3_column_text(st, 3);
        if (!strstr(detail, "INDEX")) fail_msg("%s: %s", plans[k], detail);
        assert_null(strstr(detail, "TEMP B-TREE"));
        sqlite3_finalize(st);
    }
    sqlite3_close(db);
    fmx_log_close(log);
    fmx_log_close(NULL);
    assert_non_null(fmx_log_errmsg(NULL));
}

static void test_step_fields_json(void **state) {
    (void)state;
    const char *json = fmx_log_step_fields_json();
    assert_ptr_equal(json, fmx_log_step_fields_json());
    cJSON *a = cJSON_Parse(json);
    assert_non_null(a);
    assert_true(cJSON_IsArray(a));
    struct {
        const char *name, *type;
    } want[] = {
#define FIELD(kind, name, sql, desc) {#name, #kind},
        FMX_STEP_FIELDS(FIELD)
#undef FIELD
    };
    size_t n = sizeof want / sizeof want[0];
    assert_int_equal(cJSON_GetArraySize(a), (int)n);
    for (size_t i = 0; i < n; i++) {
        cJSON *f = cJSON_GetArrayItem(a, (int)i);
        assert_string_equal(cJSON_GetObjectItem(f, "name")->valuestring, want[i].name);
        const char *t = cJSON_GetObjectItem(f, "type")->valuestring;
        const char *expect = want[i].type[0] == 'I'   ? "int"
                             : want[i].type[0] == 'F' ? "float"
                             : want[i].type[0] == 'S' ? "str"
                                                      : "json";
        assert_string_equal(t, expect);
        assert_true(strlen(cJSON_GetObjectItem(f, "doc")->valuestring) > 0);
    }
    cJSON_Delete(a);
}

/* ---- round trips ---- */

static void test_roundtrip_every_field(void **state) {
    (void)state;
    char path[300];
    fmx_log *log = open_ok(new_path(path, sizeof path));
    int64_t pol = 0, pol2 = 0, other = 0, ep = 0, sub_id = 0;
    assert_int_equal(fmx_log_task(log, "qwen2/Qwen2MLP", "component", "qwen2", "model.layers.0.mlp",
                                  "Qwen2MLP", 12),
                     0);
    /* upsert: the same id again replaces the row */
    assert_int_equal(fmx_log_task(log, "qwen2/Qwen2MLP", "component", "qwen2", "model.layers.0.mlp",
                                  "Qwen2MLP", 9),
                     0);
    assert_int_equal(fmx_log_task(log, "qwen2", "model", "qwen2", NULL, NULL, 0), 0);
    assert_int_equal(fmx_log_policy(log, "gpt-x", &pol), 0);
    assert_int_equal(fmx_log_policy(log, "other", &other), 0);
    assert_int_equal(fmx_log_policy(log, "gpt-x", &pol2), 0);
    assert_int_equal(pol, pol2);
    assert_int_not_equal(pol, other);
    assert_int_equal(fmx_log_episode_begin(log, "qwen2/Qwen2MLP", pol, -42, &ep), 0);

    const char *obs = "{\"tool\":\"read_module_source\",\"text\":\"line1\\nline2 \\\"q\\\" "
                      "é ∑\",\"data\":{\"n\":[1,2.5,null]}}";
    fmx_step_record s0 = {.episode = ep,
                          .idx = 0,
                          .tool = "read_module_source",
                          .args = "{\"path\":\"model.layers.0.mlp\",\"mode\":\"live\"}",
                          .observation = obs,
                          .reward = 0.0,
                          .terminated = 0,
                          .truncated = 0,
                          .error = NULL,
                          .started_at = 1712345678.123456,
                          .ms = 0.0625};
    fmx_step_record s1 = {.episode = ep,
                          .idx = 1,
                          .tool = "bogus",
                          .args = "{}",
                          .observation = "{\"error\":\"unknown tool\"}",
                          .reward = -0.0,
                          .terminated = 0,
                          .truncated = 1,
                          .error = "unknown_tool",
                          .started_at = 1712345679.5,
                          .ms = 12.75};
    fmx_step_record s2 = {.episode = ep,
                          .idx = 2,
                          .tool = "submit",
                          .args = "{\"code\":\"def forward(x): return x\"}",
                          .observation = "{}",
                          .reward = 0.8375,
                          .terminated = 1,
                          .truncated = 0,
                          .error = NULL,
                          .started_at = 1712345680.0,
                          .ms = 250.5};
    fmx_submission_record sub = {.episode = ep,
                                 .code = "def forward(x):\n    return x\n",
                                 .entry = "forward",
                                 .correctness = 1.0,
                                 .loc = 2,
                                 .loc_score = 0.5,
                                 .compile_score = 0.75,
                                 .reward = 0.8375,
                                 .reward_version = "v1-default",
                                 .breakdown = "{\"reward\":0.8375}",
                                 .truncated = 0};
    assert_int_equal(fmx_log_begin(log), 0);
    assert_int_equal(fmx_log_step(log, &s0), 0);
    assert_int_equal(fmx_log_step(log, &s1), 0);
    assert_int_equal(fmx_log_step(log, &s2), 0);
    assert_int_equal(fmx_log_submission(log, &sub, &sub_id), 0);
    assert_true(sub_id > 0);
    assert_int_equal(fmx_log_episode_end(log, ep, "submitted", 0.8375), 0);
    assert_int_equal(fmx_log_commit(log), 0);

    sqlite3 *db = reader(path);
    assert_int_equal(q_int(db, "SELECT count(*) FROM tasks"), 2);
    assert_int_equal(q_int(db, "SELECT target_loc FROM tasks WHERE id = 'qwen2/Qwen2MLP'"), 9);
    assert_int_equal(q_int(db, "SELECT module IS NULL AND class IS NULL FROM tasks "
                               "WHERE id = 'qwen2'"),
                     1);
    assert_int_equal(q_int(db, "SELECT count(*) FROM policies"), 2);

    /* Every field of every step, compared against the record that wrote it. */
    const fmx_step_record *want[] = {&s0, &s1, &s2};
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT * FROM steps WHERE episode = ?1 ORDER BY idx",
                                        -1, &st, NULL),
                     SQLITE_OK);
    sqlite3_bind_int64(st, 1, ep);
    for (int r = 0; r < 3; r++) {
        assert_int_equal(sqlite3_step(st), SQLITE_ROW);
        const fmx_step_record *w = want[r];
        int col = 0;
#define CHECK_I(name) assert_int_equal(sqlite3_column_int64(st, col), w->name);
#define CHECK_F(name)                                                                              \
    assert_int_equal(sqlite3_column_type(st, col), SQLITE_FLOAT);                                  \
    assert_true(sqlite3_column_double(st, col) == w->name);
#define CHECK_S(name)                                                                              \
    if (w->name)                                                                                   \
        assert_string_equal((const char *)sqlite3_column_text(st, col), w->name);                  \
    else                                                                                           \
        assert_int_equal(sqlite3_column_type(st, col), SQLITE_NULL);
#define CHECK_J(name) CHECK_S(name)
#define CHECK(kind, name, sql, desc)                                                               \
    CHECK_##kind(name);                                                                            \
    col++;
        FMX_STEP_FIELDS(CHECK)
#undef CHECK
        (void)col;
    }
    assert_int_equal(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);

    assert_int_equal(q_int(db, "SELECT steps FROM episodes WHERE id = %lld", (long long)ep), 3);
    assert_int_equal(q_int(db,
                           "SELECT status = 'submitted' AND reward = 0.8375 AND seed = -42 "
                           "AND ended_at >= started_at AND policy_id = %lld "
                           "FROM episodes WHERE id = %lld",
                           (long long)pol, (long long)ep),
                     1);
    assert_int_equal(q_int(db,
                           "SELECT episode = %lld AND code = 'def forward(x):\n    return x\n' "
                           "AND entry = 'forward' AND correctness = 1.0 AND loc = 2 "
                           "AND loc_score = 0.5 AND compile_score = 0.75 AND reward = 0.8375 "
                           "AND reward_version = 'v1-default' "
                           "AND breakdown = '{\"reward\":0.8375}' AND truncated = 0 "
                           "AND created_at > 1.6e9 FROM submissions WHERE id = %lld",
                           (long long)ep, (long long)sub_id),
                     1);
    /* JSON text is stored as text readers can query. */
    assert_int_equal(q_int(db,
                           "SELECT json_extract(observation, '$.data.n[1]') = 2.5 FROM steps "
                           "WHERE episode = %lld AND idx = 0",
                           (long long)ep),
                     1);
    sqlite3_close(db);
    fmx_log_close(log);
}

static void test_rollback_loses_only_the_batch(void **state) {
    (void)state;
    char path[300];
    int64_t ep = 0;
    fmx_log *log = setup_episode(new_path(path, sizeof path), &ep);
    assert_int_equal(fmx_log_begin(log), 0);
    log_steps(log, ep, 0, 5);
    assert_int_equal(fmx_log_commit(log), 0);

    assert_int_equal(fmx_log_begin(log), 0);
    log_steps(log, ep, 5, 4);
    assert_int_equal(fmx_log_episode_end(log, ep, "submitted", 1.0), 0);
    assert_int_equal(fmx_log_rollback(log), 0);
    assert_int_equal(fmx_log_rollback(log), 0); /* nothing open: no-op */

    sqlite3 *db = reader(path);
    assert_int_equal(q_int(db, "SELECT count(*) FROM steps"), 5);
    assert_int_equal(q_int(db, "SELECT max(idx) FROM steps"), 4);
    assert_int_equal(q_int(db, "SELECT steps FROM episodes"), 5);
    assert_int_equal(q_int(db, "SELECT status = 'open' FROM episodes"), 1);

    /* The episode goes on from where the committed steps left it. */
    assert_int_equal(fmx_log_begin(log), 0);
    log_steps(log, ep, 5, 2);
    assert_int_equal(fmx_log_commit(log), 0);
    assert_int_equal(q_int(db, "SELECT count(*) FROM steps"), 7);
    assert_int_equal(q_int(db, "SELECT steps FROM episodes"), 7);
    sqlite3_close(db);
    fmx_log_close(log);
}

static void test_interleaved_episodes_keep_order(void **state) {
    (void)state;
    char path[300];
    int64_t a = 0, b = 0, pol = 0;
    fmx_log *log = setup_episode(new_path(path, sizeof path), &a);
    assert_int_equal(fmx_log_policy(log, "anonymous", &pol), 0);
    assert_int_equal(fmx_log_episode_begin(log, "tiny", pol, 8, &b), 0);
    char tool[32];
    int ia = 0, ib = 0;
    for (int batch = 0; batch < 10; batch++) {
        assert_int_equal(fmx_log_begin(log), 0);
        for (int k = 0; k < 7; k++) {
            /* a irregular interleaving: b gets every third step */
            int to_b = (batch * 7 + k) % 3 == 0;
            int64_t ep = to_b ? b : a;
            int idx = to_b ? ib++ : ia++;
            snprintf(tool, sizeof tool, "%c%d", to_b ? 'b' : 'a', idx);
            fmx_step_record s = make_step(ep, idx, tool);
            assert_int_equal(fmx_log_step(log, &s), 0);
        }
        assert_int_equal(fmx_log_commit(log), 0);
    }
    sqlite3 *db = reader(path);
    int64_t eps[2] = {a, b};
    int counts[2] = {ia, ib};
    for (int e = 0; e < 2; e++) {
        sqlite3_stmt *st = NULL;
        assert_int_equal(sqlite3_prepare_v2(db,
                                            "SELECT idx, tool FROM steps WHERE episode = ?1 "
                                            "ORDER BY rowid",
                                            -1, &st, NULL),
                         SQLITE_OK);
        sqlite3_bind_int64(st, 1, eps[e]);
        int n = 0;
        while (sqlite3_step(st) == SQLITE_ROW) {
            assert_int_equal(sqlite3_column_int64(st, 0), n);
            snprintf(tool, sizeof tool, "%c%d", e ? 'b' : 'a', n);
            assert_string_equal((const char *)sqlite3_column_text(st, 1), tool);
            n++;
        }
        sqlite3_finalize(st);
        assert_int_equal(n, counts[e]);
        assert_int_equal(q_int(db, "SELECT steps FROM episodes WHERE id = %lld", (long long)eps[e]),
                         counts[e]);
    }
    sqlite3_close(db);
    fmx_log_close(log);
}

static void test_refused_writes(void **state) {
    (void)state;
    char path[300];
    int64_t ep = 0, id = 0;
    fmx_log *log = setup_episode(new_path(path, sizeof path), &ep);

    assert_int_equal(fmx_log_commit(log), FMX_EINVAL);
    assert_non_null(strstr(fmx_log_errmsg(log), "no transaction"));
    assert_int_equal(fmx_log_begin(log), 0);
    assert_int_equal(fmx_log_begin(log), FMX_EINVAL);
    assert_non_null(strstr(fmx_log_errmsg(log), "already open"));

    log_steps(log, ep, 0, 1);
    fmx_step_record s = make_step(ep, 0, "again");
    assert_int_equal(fmx_log_step(log, &s), FMX_EINVAL); /* duplicate idx */
    assert_non_null(strstr(fmx_log_errmsg(log), "UNIQUE"));
    assert_non_null(strstr(fmx_log_errmsg(log), "idx 0"));
    s = make_step(ep + 100, 0, "nowhere");
    assert_int_equal(fmx_log_step(log, &s), FMX_EINVAL); /* unknown episode */
    assert_non_null(strstr(fmx_log_errmsg(log), "FOREIGN KEY"));
    s = make_step(ep, 1, NULL);
    assert_int_equal(fmx_log_step(log, &s), FMX_EINVAL); /* tool is NOT NULL */
    assert_non_null(strstr(fmx_log_errmsg(log), "NOT NULL"));
    assert_int_equal(fmx_log_step(log, NULL), FMX_EINVAL);
    assert_int_equal(fmx_log_step(NULL, &s), FMX_EINVAL);
    /* The failed steps left the batch open with the good step in it. */
    log_steps(log, ep, 1, 1);
    assert_int_equal(fmx_log_commit(log), 0);

    assert_int_equal(fmx_log_episode_begin(log, "no-such-task", 1, 0, &id), FMX_EINVAL);
    assert_int_equal(fmx_log_episode_end(log, ep, "open", 0), FMX_EINVAL);
    assert_int_equal(fmx_log_episode_end(log, ep, "finished", 0), FMX_EINVAL);
    assert_int_equal(fmx_log_episode_end(log, ep + 100, "closed", 0), FMX_ENOTFOUND);
    assert_int_equal(fmx_log_episode_end(log, ep, "truncated", 0.25), 0);
    assert_int_equal(fmx_log_episode_end(log, ep, "submitted", 1), FMX_EINVAL);
    assert_non_null(strstr(fmx_log_errmsg(log), "already ended (truncated)"));
    fmx_submission_record sub = {.episode = ep + 100, .code = "x = 1", .reward_version = "v"};
    assert_int_equal(fmx_log_submission(log, &sub, NULL), FMX_EINVAL);
    sub.code = NULL;
    assert_int_equal(fmx_log_submission(log, &sub, NULL), FMX_EINVAL);
    assert_int_equal(fmx_log_task(log, NULL, "model", "p", NULL, NULL, 0), FMX_EINVAL);
    assert_int_equal(fmx_log_policy(log, NULL, &id), FMX_EINVAL);

    sqlite3 *db = reader(path);
    assert_int_equal(q_int(db, "SELECT count(*) FROM steps"), 2);
    assert_int_equal(q_int(db, "SELECT steps FROM episodes"), 2);
    assert_int_equal(q_int(db, "SELECT reward = 0.25 AND status = 'truncated' FROM episodes"), 1);
    assert_int_equal(q_int(db, "SELECT count(*) FROM submissions"), 0);
    sqlite3_close(db);
    fmx_log_close(log);
}

static void test_abort_open(void **state) {
    (void)state;
    char path[300];
    int64_t e1 = 0, e2 = 0, e3 = 0, n = -1;
    fmx_log *log = setup_episode(new_path(path, sizeof path), &e1);
    assert_int_equal(fmx_log_episode_begin(log, "tiny", 1, 0, &e2), 0);
    assert_int_equal(fmx_log_episode_begin(log, "tiny", 1, 0, &e3), 0);
    assert_int_equal(fmx_log_episode_end(log, e2, "submitted", 0.5), 0);
    assert_int_equal(fmx_log_abort_open(log, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(fmx_log_abort_open(log, &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(fmx_log_abort_open(log, NULL), 0);
    sqlite3 *db = reader(path);
    assert_int_equal(q_int(db,
                           "SELECT count(*) FROM episodes WHERE status = 'aborted' AND "
                           "ended_at IS NOT NULL AND reward IS NULL AND id IN (%lld, %lld)",
                           (long long)e1, (long long)e3),
                     2);
    assert_int_equal(
        q_int(db, "SELECT status = 'submitted' FROM episodes WHERE id = %lld", (long long)e2), 1);
    sqlite3_close(db);
    fmx_log_close(log);
}

static void test_reopen_keeps_everything(void **state) {
    (void)state;
    char path[300];
    int64_t ep = 0, pol = 0, ep2 = 0;
    fmx_log *log = setup_episode(new_path(path, sizeof path), &ep);
    assert_int_equal(fmx_log_begin(log), 0);
    log_steps(log, ep, 0, 10);
    assert_int_equal(fmx_log_commit(log), 0);
    fmx_log_close(log);

    log = open_ok(path);
    assert_int_equal(fmx_log_policy(log, "anonymous", &pol), 0);
    assert_int_equal(pol, 1);
    assert_int_equal(fmx_log_episode_begin(log, "tiny", pol, 0, &ep2), 0);
    assert_true(ep2 > ep);
    /* the first episode is still open and takes more steps */
    assert_int_equal(fmx_log_begin(log), 0);
    log_steps(log, ep, 10, 3);
    assert_int_equal(fmx_log_commit(log), 0);
    fmx_log_close(log);

    sqlite3 *db = reader(path);
    assert_int_equal(q_int(db, "SELECT count(*) FROM steps WHERE episode = %lld", (long long)ep),
                     13);
    assert_int_equal(q_int(db, "SELECT steps FROM episodes WHERE id = %lld", (long long)ep), 13);
    assert_int_equal(q_int(db, "SELECT count(*) FROM episodes"), 2);
    assert_int_equal(q_int(db, "SELECT count(*) FROM tasks"), 1);
    assert_int_equal(q_int(db, "SELECT count(*) FROM meta"), 1);
    sqlite3_close(db);
}

/* WAL: a reader sees the committed state while a write batch is open, and an
 * open read transaction does not stop the writer from committing. */
static void test_reader_during_write(void **state) {
    (void)state;
    char path[300];
    int64_t ep = 0;
    fmx_log *log = setup_episode(new_path(path, sizeof path), &ep);
    assert_int_equal(fmx_log_begin(log), 0);
    log_steps(log, ep, 0, 3);
    assert_int_equal(fmx_log_commit(log), 0);

    assert_int_equal(fmx_log_begin(log), 0);
    log_steps(log, ep, 3, 2);
    sqlite3 *db = reader(path);
    sqlite3_busy_timeout(db, 0); /* must not need to wait */
    assert_int_equal(q_int(db, "SELECT count(*) FROM steps"), 3);
    assert_int_equal(q_int(db, "SELECT steps FROM episodes"), 3);

    /* A read transaction held open across the writer's commit. */
    exec_sql(db, "BEGIN");
    assert_int_equal(q_int(db, "SELECT count(*) FROM steps"), 3);
    assert_int_equal(fmx_log_commit(log), 0);
    assert_int_equal(q_int(db, "SELECT count(*) FROM steps"), 3); /* its snapshot */
    assert_int_equal(fmx_log_begin(log), 0);
    log_steps(log, ep, 5, 1);
    assert_int_equal(fmx_log_commit(log), 0);
    exec_sql(db, "COMMIT");
    assert_int_equal(q_int(db, "SELECT count(*) FROM steps"), 6);
    sqlite3_close(db);
    fmx_log_close(log);
}

/* ---- refusing files ---- */

static void make_db(const char *path, const char *sql) {
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    exec_sql(db, sql);
    sqlite3_close(db);
}

static void test_newer_version_refused(void **state) {
    (void)state;
    char path[300], err[512] = "";
    new_path(path, sizeof path);
    char sql[200], want[64];
    snprintf(sql, sizeof sql,
             "CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL);"
             "INSERT INTO meta VALUES ('schema_version', %d);",
             FMX_LOG_SCHEMA_VERSION + 1);
    make_db(path, sql);
    fmx_log *log = (fmx_log *)&err; /* must be reset to NULL */
    assert_int_equal(fmx_log_open(path, &log, err, sizeof err), FMX_EVERSION);
    assert_null(log);
    assert_non_null(strstr(err, path));
    snprintf(want, sizeof want, "version %d is newer", FMX_LOG_SCHEMA_VERSION + 1);
    assert_non_null(strstr(err, want));
    snprintf(want, sizeof want, "supports (%d)", FMX_LOG_SCHEMA_VERSION);
    assert_non_null(strstr(err, want));
    /* and the file was not touched */
    sqlite3 *db = reader(path);
    assert_int_equal(q_int(db, "SELECT value FROM meta WHERE key = 'schema_version'"),
                     FMX_LOG_SCHEMA_VERSION + 1);
    assert_int_equal(q_int(db, "SELECT count(*) FROM sqlite_master"), 2); /* meta + its index */
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_string_equal((const char *)sqlite3_column_text(st, 0), "delete"); /* not made WAL */
    sqlite3_finalize(st);
    sqlite3_close(db);
}

static void test_not_sqlite_refused(void **state) {
    (void)state;
    char path[300], err[512] = "";
    const char *texts[] = {
        "hello\n",
        "This is a plain text file that is certainly longer than one hundred bytes, so "
        "SQLite reads a full header from it and finds no magic string at the start.\n",
    };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        new_path(path, sizeof path);
        FILE *f = fopen(path, "wb");
        assert_non_null(f);
        fputs(texts[i], f);
        fclose(f);
        fmx_log *log = NULL;
        assert_int_equal(fmx_log_open(path, &log, err, sizeof err), FMX_EFORMAT);
        assert_null(log);
        if (!strstr(err, "not an SQLite database")) fail_msg("message: %s", err);
        assert_non_null(strstr(err, path));
        /* the file is left as it was */
        f = fopen(path, "rb");
        char back[512] = "";
        size_t n = fread(back, 1, sizeof back - 1, f);
        fclose(f);
        assert_int_equal(n, strlen(texts[i]));
    }

    /* An SQLite database of something else is not taken over. */
    new_path(path, sizeof path);
    make_db(path, "CREATE TABLE notes (t TEXT); INSERT INTO notes VALUES ('mine');");
    fmx_log *log = NULL;
    assert_int_equal(fmx_log_open(path, &log, err, sizeof err), FMX_EFORMAT);
    assert_non_null(strstr(err, "not an fmx episode log"));
    sqlite3 *db = reader(path);
    assert_int_equal(q_int(db, "SELECT count(*) FROM sqlite_master"), 1);
    sqlite3_close(db);

    /* A path that cannot be opened, and no err buffer at all. */
    snprintf(path, sizeof path, "%s/no/such/dir/log.db", dir);
    assert_int_equal(fmx_log_open(path, &log, err, sizeof err), FMX_EIO);
    assert_non_null(strstr(err, "cannot open"));
    assert_int_equal(fmx_log_open(path, &log, NULL, 0), FMX_EIO);
    assert_int_equal(fmx_log_open(NULL, &log, err, sizeof err), FMX_EINVAL);
    assert_int_equal(fmx_log_open(path, NULL, err, sizeof err), FMX_EINVAL);
}

static void test_empty_and_version0_files_get_schema(void **state) {
    (void)state;
    char path[300];
    /* An existing empty file. */
    new_path(path, sizeof path);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fclose(f);
    fmx_log *log = open_ok(path);
    int64_t ep = 0;
    fmx_log_close(log);
    log = setup_episode(path, &ep);
    fmx_log_close(log);
    sqlite3 *db = reader(path);
    assert_int_equal(q_int(db, "SELECT value FROM meta WHERE key = 'schema_version'"),
                     FMX_LOG_SCHEMA_VERSION);
    sqlite3_close(db);

    /* A file at version 0 (meta only) is brought up to the current version. */
    new_path(path, sizeof path);
    make_db(path, "CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL);"
                  "INSERT INTO meta VALUES ('schema_version', 0);"
                  "INSERT INTO meta VALUES ('note', 'kept');");
    log = setup_episode(path, &ep);
    fmx_log_close(log);
    db = reader(path);
    assert_int_equal(q_int(db, "SELECT value FROM meta WHERE key = 'schema_version'"),
                     FMX_LOG_SCHEMA_VERSION);
    assert_int_equal(q_int(db, "SELECT count(*) FROM meta"), 2);
    assert_int_equal(q_int(db, "SELECT count(*) FROM episodes"), 1);
    sqlite3_close(db);

    /* A current file whose steps are not the X-macro's is refused. */
    new_path(path, sizeof path);
    log = open_ok(path);
    fmx_log_close(log);
    sqlite3 *w = NULL;
    assert_int_equal(sqlite3_open(path, &w), SQLITE_OK);
    exec_sql(w, "DROP VIEW steps; CREATE VIEW steps AS SELECT episode, idx FROM step_rows");
    sqlite3_close(w);
    char err[512];
    assert_int_equal(fmx_log_open(path, &log, err, sizeof err), FMX_EFORMAT);
    assert_non_null(strstr(err, "differ from FMX_STEP_FIELDS"));
}

/* ---- observations stored once ---- */

/* A repeated observation (and args) is stored once; the steps view reads
 * every step back whole, and a repeated step costs its row only. */
static void test_repeated_observations_are_stored_once(void **state) {
    (void)state;
    char path[300];
    int64_t ep = 0;
    fmx_log *log = setup_episode(new_path(path, sizeof path), &ep);
    char big[6000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    char obs[6100];
    snprintf(obs, sizeof obs, "{\"tool\":\"read_module_source\",\"text\":\"%s\"}", big);
    assert_int_equal(fmx_log_begin(log), FMX_OK);
    for (int i = 0; i < 200; i++) {
        fmx_step_record s = make_step(ep, i, "read_module_source");
        s.args = "{}";
        s.observation = i == 100 ? "{\"other\":1}" : obs;
        assert_int_equal(fmx_log_step(log, &s), FMX_OK);
    }
    assert_int_equal(fmx_log_commit(log), FMX_OK);
    fmx_log_close(log);
    sqlite3 *db = reader(path);
    assert_int_equal(q_int(db, "SELECT count(*) FROM blobs"), 3); /* {}, obs, other */
    assert_int_equal(q_int(db, "SELECT count(*) FROM steps WHERE episode = %lld", (long long)ep),
                     200);
    assert_int_equal(
        q_int(db, "SELECT count(*) FROM steps WHERE length(observation) = %zu", strlen(obs)), 199);
    assert_int_equal(q_int(db, "SELECT idx FROM steps WHERE observation = '{\"other\":1}'"), 100);
    assert_int_equal(q_int(db, "SELECT steps FROM episodes WHERE id = %lld", (long long)ep), 200);
    /* the pages the 199 copies would have needed are not there */
    assert_true(q_int(db, "PRAGMA page_count") * q_int(db, "PRAGMA page_size") < 200 * 1024);
    sqlite3_close(db);
}

/* A version-1 file (every field a column of the steps table) is migrated:
 * its steps read back the same through the view, repeated texts once. */
static void test_version1_file_is_migrated(void **state) {
    (void)state;
    char path[300];
    new_path(path, sizeof path);
    make_db(path,
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL);"
            "INSERT INTO meta VALUES ('schema_version', 1);"
            "CREATE TABLE tasks (id TEXT PRIMARY KEY, kind TEXT NOT NULL, pack TEXT NOT NULL,"
            "  module TEXT, class TEXT, target_loc INTEGER);"
            "CREATE TABLE policies (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);"
            "CREATE TABLE episodes (id INTEGER PRIMARY KEY, task_id TEXT NOT NULL REFERENCES "
            "  tasks(id), policy_id INTEGER NOT NULL REFERENCES policies(id), seed INTEGER,"
            "  status TEXT NOT NULL CHECK (status IN ('open', 'submitted', 'truncated', "
            "  'aborted', 'closed')), started_at REAL NOT NULL, ended_at REAL, reward REAL,"
            "  steps INTEGER NOT NULL DEFAULT 0);"
            "CREATE INDEX episodes_policy_task ON episodes(policy_id, task_id);"
            "CREATE TABLE steps (episode INTEGER NOT NULL, idx INTEGER NOT NULL, tool TEXT NOT "
            "  NULL, args TEXT NOT NULL, observation TEXT NOT NULL, reward REAL NOT NULL,"
            "  terminated INTEGER NOT NULL, truncated INTEGER NOT NULL, error TEXT,"
            "  started_at REAL NOT NULL, ms REAL NOT NULL, PRIMARY KEY (episode, idx),"
            "  FOREIGN KEY (episode) REFERENCES episodes(id));"
            "CREATE TRIGGER steps_count AFTER INSERT ON steps BEGIN"
            "  UPDATE episodes SET steps = steps + 1 WHERE id = NEW.episode; END;"
            "CREATE TABLE submissions (id INTEGER PRIMARY KEY, episode INTEGER NOT NULL "
            "  REFERENCES episodes(id), code TEXT NOT NULL, entry TEXT, correctness REAL NOT "
            "  NULL, loc INTEGER NOT NULL, loc_score REAL NOT NULL, compile_score REAL NOT NULL,"
            "  reward REAL NOT NULL, reward_version TEXT NOT NULL, breakdown TEXT,"
            "  truncated INTEGER NOT NULL, created_at REAL NOT NULL);"
            "CREATE INDEX submissions_episode ON submissions(episode);"
            "INSERT INTO tasks VALUES ('t', 'model', 't', NULL, NULL, 10);"
            "INSERT INTO policies VALUES (1, 'p');"
            "INSERT INTO episodes (id, task_id, policy_id, status, started_at) VALUES "
            "  (1, 't', 1, 'open', 1.0), (2, 't', 1, 'submitted', 2.0);"
            "INSERT INTO steps VALUES (1, 0, 'read', '{}', '{\"a\":1}', 0, 0, 0, NULL, 1.5, 0.1),"
            "  (1, 1, 'read', '{}', '{\"a\":1}', 0, 0, 0, NULL, 1.6, 0.2),"
            "  (2, 0, 'submit', '{\"code\":\"x\"}', '{\"b\":2}', 1, 1, 0, 'e', 2.5, 3.0);");
    fmx_log *log = open_ok(path);
    fmx_log_close(log);
    sqlite3 *db = reader(path);
    assert_int_equal(q_int(db, "SELECT value FROM meta WHERE key = 'schema_version'"),
                     FMX_LOG_SCHEMA_VERSION);
    assert_int_equal(q_int(db, "SELECT count(*) FROM blobs"), 4); /* {}, a, code x, b */
    assert_int_equal(q_int(db, "SELECT count(*) FROM steps"), 3);
    assert_int_equal(q_int(db, "SELECT count(*) FROM steps WHERE episode = 1 AND "
                               "observation = '{\"a\":1}' AND args = '{}'"),
                     2);
    assert_int_equal(q_int(db, "SELECT count(*) FROM steps WHERE episode = 2 AND idx = 0 AND "
                               "tool = 'submit' AND args = '{\"code\":\"x\"}' AND "
                               "observation = '{\"b\":2}' AND reward = 1 AND terminated = 1 "
                               "AND error = 'e' AND started_at = 2.5 AND ms = 3.0"),
                     1);
    assert_int_equal(q_int(db, "SELECT steps FROM episodes WHERE id = 1"), 2);
    assert_int_equal(q_int(db, "SELECT steps FROM episodes WHERE id = 2"), 1);
    assert_int_equal(q_int(db, "SELECT count(*) FROM sqlite_master WHERE name = 'grades'"), 1);
    sqlite3_close(db);
    /* and the migrated log takes new steps */
    log = open_ok(path);
    fmx_step_record s = make_step(1, 2, "read");
    s.observation = "{\"a\":1}";
    assert_int_equal(fmx_log_step(log, &s), FMX_OK);
    fmx_log_close(log);
    db = reader(path);
    assert_int_equal(q_int(db, "SELECT steps FROM episodes WHERE id = 1"), 3);
    assert_int_equal(q_int(db, "SELECT count(*) FROM blobs WHERE body = '{\"a\":1}'"), 1);
    sqlite3_close(db);
}

/* ---- merging logs ---- */

/* Two servers' logs merge into a third: every episode, step, submission and
 * grade under new ids, tasks and policies by name; the sources unchanged. */
static void test_merge_two_logs(void **state) {
    (void)state;
    char a[300], b[300], out[300], err[512];
    int64_t ep_a = 0, ep_b = 0;
    fmx_log *la = setup_episode(new_path(a, sizeof a), &ep_a);
    log_steps(la, ep_a, 0, 3);
    fmx_submission_record sub = {.episode = ep_a,
                                 .code = "def forward(x): return x",
                                 .correctness = 1,
                                 .loc = 1,
                                 .loc_score = 1,
                                 .reward = 1,
                                 .reward_version = "v1"};
    int64_t sid = 0;
    assert_int_equal(fmx_log_submission(la, &sub, &sid), FMX_OK);
    assert_int_equal(fmx_log_episode_end(la, ep_a, "submitted", 1.0), FMX_OK);
    fmx_log_close(la);
    sqlite3 *w = NULL;
    assert_int_equal(sqlite3_open(a, &w), SQLITE_OK);
    exec_sql(w, "INSERT INTO grades (submission, episode, reward_version, rerun, correctness, "
                "loc, loc_score, compile_score, reward, breakdown, created_at) "
                "SELECT id, episode, 'v2', 0, 1, 1, 1, 0, 0.9, '{}', 1 FROM submissions");
    sqlite3_close(w);
    fmx_log *lb = setup_episode(new_path(b, sizeof b), &ep_b);
    log_steps(lb, ep_b, 0, 5);
    fmx_log_close(lb);

    fmx_log *lo = open_ok(new_path(out, sizeof out));
    int64_t n = 0;
    assert_int_equal(fmx_log_merge(lo, a, &n), FMX_OK);
    assert_int_equal(n, 1);
    assert_int_equal(fmx_log_merge(lo, b, &n), FMX_OK);
    assert_int_equal(n, 1);
    /* the merged log itself is a log too: its 2 episodes once more */
    assert_int_equal(fmx_log_merge(lo, out, &n), FMX_OK);
    assert_int_equal(n, 2);
    /* not a log: refused, nothing added */
    char junk[300];
    new_path(junk, sizeof junk);
    make_db(junk, "CREATE TABLE notes (t TEXT);");
    assert_int_not_equal(fmx_log_merge(lo, junk, &n), FMX_OK);
    snprintf(err, sizeof err, "%s", fmx_log_errmsg(lo));
    assert_non_null(strstr(err, "not an fmx episode log"));
    fmx_log_close(lo);

    sqlite3 *db = reader(out);
    assert_int_equal(q_int(db, "SELECT count(*) FROM episodes"), 4);
    assert_int_equal(q_int(db, "SELECT count(*) FROM policies"), 1); /* same name */
    assert_int_equal(q_int(db, "SELECT count(*) FROM steps"), 16);   /* (3 + 5) x 2 */
    assert_int_equal(q_int(db, "SELECT sum(steps) FROM episodes"), 16);
    assert_int_equal(q_int(db, "SELECT count(*) FROM submissions"), 2);
    assert_int_equal(q_int(db, "SELECT count(*) FROM grades g JOIN submissions s ON s.id = "
                               "g.submission AND s.episode = g.episode"),
                     2);
    /* each episode kept its own steps, in order */
    assert_int_equal(q_int(db, "SELECT count(*) FROM episodes e WHERE e.steps = (SELECT "
                               "max(idx) + 1 FROM steps WHERE episode = e.id)"),
                     4);
    assert_int_equal(q_int(db, "SELECT count(*) FROM episodes WHERE status = 'submitted' AND "
                               "reward = 1.0"),
                     2);
    sqlite3_close(db);
    db = reader(a);
    assert_int_equal(q_int(db, "SELECT count(*) FROM episodes"), 1);
    sqlite3_close(db);
}

/* ---- durability across a process that dies ---- */

enum { BATCHES = 20, BATCH = 64 };

/* Child: commits BATCHES batches, opens one more it never commits, then dies
 * as told: 0 = _exit(0) without closing, 1 = SIGKILL. Exit 3 = a failure. */
static void child(const char *path, int how) {
    fmx_log *log = NULL;
    char err[256];
    int64_t pol = 0, ep = 0;
    if (fmx_log_open(path, &log, err, sizeof err) ||
        fmx_log_task(log, "t", "model", "t", 0, 0, 1) || fmx_log_policy(log, "p", &pol) ||
        fmx_log_episode_begin(log, "t", pol, 0, &ep))
        _exit(3);
    int64_t idx = 0;
    for (int b = 0; b < BATCHES; b++) {
        if (fmx_log_begin(log)) _exit(3);
        for (int k = 0; k < BATCH; k++) {
            fmx_step_record s = make_step(ep, idx++, "trace_ops");
            if (fmx_log_step(log, &s)) _exit(3);
        }
        if (fmx_log_commit(log)) _exit(3);
    }
    if (fmx_log_begin(log)) _exit(3);
    for (int k = 0; k < 10; k++) {
        fmx_step_record s = make_step(ep, idx++, "lost");
        if (fmx_log_step(log, &s)) _exit(3);
    }
    if (how == 1) raise(SIGKILL);
    _exit(0);
}

static void durability(int how) {
    char path[300];
    new_path(path, sizeof path);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) child(path, how);
    int ws = 0;
    assert_int_equal(waitpid(pid, &ws, 0), pid);
    if (how == 1) {
        assert_true(WIFSIGNALED(ws));
        assert_int_equal(WTERMSIG(ws), SIGKILL);
    } else {
        assert_true(WIFEXITED(ws));
        assert_int_equal(WEXITSTATUS(ws), 0);
    }
    fmx_log *log = open_ok(path);
    sqlite3 *db = reader(path);
    assert_int_equal(q_int(db, "SELECT count(*) FROM steps"), BATCHES * BATCH);
    assert_int_equal(q_int(db, "SELECT max(idx) FROM steps"), BATCHES * BATCH - 1);
    assert_int_equal(q_int(db, "SELECT count(*) FROM steps WHERE tool = 'lost'"), 0);
    assert_int_equal(q_int(db, "SELECT steps FROM episodes"), BATCHES * BATCH);
    int64_t n = 0;
    assert_int_equal(fmx_log_abort_open(log, &n), 0);
    assert_int_equal(n, 1);
    sqlite3_close(db);
    fmx_log_close(log);
}

static void test_durable_after_exit(void **state) {
    (void)state;
    durability(0);
}

static void test_durable_after_sigkill(void **state) {
    (void)state;
    durability(1);
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/fmx_test_log_XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_open_creates_schema),
        cmocka_unit_test(test_step_fields_json),
        cmocka_unit_test(test_roundtrip_every_field),
        cmocka_unit_test(test_rollback_loses_only_the_batch),
        cmocka_unit_test(test_interleaved_episodes_keep_order),
        cmocka_unit_test(test_refused_writes),
        cmocka_unit_test(test_abort_open),
        cmocka_unit_test(test_reopen_keeps_everything),
        cmocka_unit_test(test_reader_during_write),
        cmocka_unit_test(test_newer_version_refused),
        cmocka_unit_test(test_not_sqlite_refused),
        cmocka_unit_test(test_empty_and_version0_files_get_schema),
        cmocka_unit_test(test_repeated_observations_are_stored_once),
        cmocka_unit_test(test_version1_file_is_migrated),
        cmocka_unit_test(test_merge_two_logs),
        cmocka_unit_test(test_durable_after_exit),
        cmocka_unit_test(test_durable_after_sigkill),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    return failed ? 1 : 0;
}
