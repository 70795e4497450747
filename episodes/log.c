/*
 * log.c — the episode log on SQLite (see log.h for the contract).
 *
 * One connection per fmx_log, used by one thread at a time. The file runs in
 * WAL mode with synchronous=FULL, so a commit is on disk when fmx_log_commit
 * returns and readers on other connections never block the writer (or the
 * writer them). Every statement is prepared once in fmx_log_open and reused;
 * fmx_log_step binds the caller's pointers (no copy, no allocation) and runs
 * one INSERT, whose trigger bumps episodes.steps in the same statement.
 *
 * JSON fields (kind J: a step's args and observation) are stored once per
 * distinct text: the table `blobs` holds each text with its SHA-256, and the
 * step's row in `step_rows` refers to it by id; `steps` is a view that
 * joins them back, so readers (replay, export, regrade, leaderboards, any
 * SQL) see one row per step with every FMX_STEP_FIELDS column as before. A
 * cheap step whose observation repeats an earlier one costs its row only.
 *
 * Schema versions: meta.schema_version says which schema a file holds. A
 * file with no fmx tables (new, empty, or a meta row saying 0) gets the
 * current schema in one step; a file at an older version is upgraded one
 * version at a time by MIGRATIONS; a newer one is refused. The steps table is
 * generated from FMX_STEP_FIELDS, and open refuses a file whose steps columns
 * differ from it, so changing the field list without a migration is caught
 * at the first open. To change the schema: bump FMX_LOG_SCHEMA_VERSION and add
 * the migration from the previous version to MIGRATIONS. The log owns every
 * table, `grades` (written by fmx regrade) included.
 *
 * Not here: what a step means (env/), replay and leaderboards (readers).
 */
#define _POSIX_C_SOURCE 200809L
#include "episodes/log.h"

#include <openssl/evp.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "status.h"

#define FMX__LOG_BUSY_MS 5000

struct fmx_log {
    sqlite3 *db;
    sqlite3_stmt *begin, *commit, *rollback;
    sqlite3_stmt *task, *policy_ins, *policy_sel;
    sqlite3_stmt *ep_begin, *ep_end, *ep_status, *abort_open;
    sqlite3_stmt *step, *sub, *blob_ins, *blob_sel;
    char msg[512];
};

/* ---- the steps, from the X-macro ---- */

#define FMX__STEP_NAME(kind, name, sql, desc) #name,
static const char *const STEP_NAMES[] = {FMX_STEP_FIELDS(FMX__STEP_NAME)};
#undef FMX__STEP_NAME
#define FMX__STEP_SQL(kind, name, sql, desc) sql,
static const char *const STEP_SQL_TYPES[] = {FMX_STEP_FIELDS(FMX__STEP_SQL)};
#undef FMX__STEP_SQL
#define FMX__STEP_KIND(kind, name, sql, desc) #kind[0],
static const char STEP_KINDS[] = {FMX_STEP_FIELDS(FMX__STEP_KIND)};
#undef FMX__STEP_KIND
#define N_STEP_FIELDS ((int)(sizeof STEP_NAMES / sizeof STEP_NAMES[0]))

/* A growable SQL text for the statements built from the field list. */
typedef struct {
    char buf[4096];
    size_t n;
    int over;
} sqltext;

static void sqlf(sqltext *t, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(t->buf + t->n, sizeof t->buf - t->n, fmt, ap);
    va_end(ap);
    if (k < 0 || (size_t)k >= sizeof t->buf - t->n)
        t->over = 1;
    else
        t->n += (size_t)k;
}

/* blobs, step_rows (a J field as NAME_id), the steps view and its trigger. */
static void steps_ddl(sqltext *t) {
    sqlf(t, "CREATE TABLE blobs (id INTEGER PRIMARY KEY, hash BLOB NOT NULL UNIQUE, "
            "body TEXT NOT NULL);");
    sqlf(t, "CREATE TABLE step_rows (");
    for (int i = 0; i < N_STEP_FIELDS; i++)
        if (STEP_KINDS[i] == 'J')
            sqlf(t, "%s_id INTEGER NOT NULL REFERENCES blobs(id), ", STEP_NAMES[i]);
        else
            sqlf(t, "%s %s, ", STEP_NAMES[i], STEP_SQL_TYPES[i]);
    sqlf(t, "PRIMARY KEY (episode, idx), FOREIGN KEY (episode) REFERENCES episodes(id));");
    sqlf(t, "CREATE VIEW steps AS SELECT ");
    for (int i = 0; i < N_STEP_FIELDS; i++)
        if (STEP_KINDS[i] == 'J')
            sqlf(t, "%sb_%s.body AS %s", i ? ", " : "", STEP_NAMES[i], STEP_NAMES[i]);
        else
            sqlf(t, "%ss.%s AS %s", i ? ", " : "", STEP_NAMES[i], STEP_NAMES[i]);
    sqlf(t, " FROM step_rows s");
    for (int i = 0; i < N_STEP_FIELDS; i++)
        if (STEP_KINDS[i] == 'J')
            sqlf(t, " JOIN blobs b_%s ON b_%s.id = s.%s_id", STEP_NAMES[i], STEP_NAMES[i],
                 STEP_NAMES[i]);
    sqlf(t, ";CREATE TRIGGER steps_count AFTER INSERT ON step_rows BEGIN"
            "  UPDATE episodes SET steps = steps + 1 WHERE id = NEW.episode;"
            "END;");
}

/* The SHA-256 of a text, as blobs.hash holds it. */
static int sha256(const void *data, size_t n, unsigned char out[32]) {
    unsigned int len = 0;
    return EVP_Digest(data, n, out, &len, EVP_sha256(), NULL) == 1 && len == 32 ? 0 : -1;
}

/* fmx_sha256(text) in SQL, for the migration that fills blobs. */
static void sql_sha256(sqlite3_context *ctx, int argc, sqlite3_value **argv) {
    (void)argc;
    const unsigned char *text = sqlite3_value_text(argv[0]);
    unsigned char md[32];
    if (!text) {
        sqlite3_result_null(ctx);
    } else if (sha256(text, (size_t)sqlite3_value_bytes(argv[0]), md) != 0) {
        sqlite3_result_error(ctx, "sha256 failed", -1);
    } else {
        sqlite3_result_blob(ctx, md, 32, SQLITE_TRANSIENT);
    }
}

/* ---- schema: the current version, created in one step ---- */

/* fmx regrade's grades: one row per (submission, reward version, rerun). */
#define GRADES_SQL                                                                                 \
    "CREATE TABLE IF NOT EXISTS grades ("                                                          \
    "  id INTEGER PRIMARY KEY,"                                                                    \
    "  submission INTEGER NOT NULL REFERENCES submissions(id),"                                    \
    "  episode INTEGER NOT NULL REFERENCES episodes(id),"                                          \
    "  reward_version TEXT NOT NULL,"                                                              \
    "  rerun INTEGER NOT NULL," /* 1: the code graded again; 0: stored facts rescored */           \
    "  correctness REAL NOT NULL,"                                                                 \
    "  loc INTEGER NOT NULL,"                                                                      \
    "  loc_score REAL NOT NULL,"                                                                   \
    "  compile_score REAL NOT NULL,"                                                               \
    "  reward REAL NOT NULL,"                                                                      \
    "  breakdown TEXT NOT NULL,"                                                                   \
    "  created_at REAL NOT NULL,"                                                                  \
    "  UNIQUE (submission, reward_version, rerun));"                                               \
    "CREATE INDEX IF NOT EXISTS grades_episode ON grades(episode);"

static const char SCHEMA_SQL[] =
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value NOT NULL);"
    "CREATE TABLE tasks ("
    "  id TEXT PRIMARY KEY,"
    "  kind TEXT NOT NULL,"
    "  pack TEXT NOT NULL,"
    "  module TEXT,"
    "  class TEXT,"
    "  target_loc INTEGER);"
    "CREATE TABLE policies ("
    "  id INTEGER PRIMARY KEY,"
    "  name TEXT NOT NULL UNIQUE);"
    "CREATE TABLE episodes ("
    "  id INTEGER PRIMARY KEY,"
    "  task_id TEXT NOT NULL REFERENCES tasks(id),"
    "  policy_id INTEGER NOT NULL REFERENCES policies(id),"
    "  seed INTEGER,"
    "  status TEXT NOT NULL"
    "    CHECK (status IN ('open', 'submitted', 'truncated', 'aborted', 'closed')),"
    "  started_at REAL NOT NULL,"
    "  ended_at REAL,"
    "  reward REAL,"
    "  steps INTEGER NOT NULL DEFAULT 0);"
    "CREATE INDEX episodes_policy_task ON episodes(policy_id, task_id);"
    /* the steps (steps_ddl). PRIMARY KEY (episode, idx) is already an index
     * led by episode: it serves every per-episode read. */
    "%s"
    "CREATE TABLE submissions ("
    "  id INTEGER PRIMARY KEY,"
    "  episode INTEGER NOT NULL REFERENCES episodes(id),"
    "  code TEXT NOT NULL,"
    "  entry TEXT,"
    "  correctness REAL NOT NULL,"
    "  loc INTEGER NOT NULL,"
    "  loc_score REAL NOT NULL,"
    "  compile_score REAL NOT NULL,"
    "  reward REAL NOT NULL,"
    "  reward_version TEXT NOT NULL,"
    "  breakdown TEXT,"
    "  truncated INTEGER NOT NULL,"
    "  created_at REAL NOT NULL);"
    "CREATE INDEX submissions_episode ON submissions(episode);" GRADES_SQL;

/* ---- errors ---- */

static int status_of(int rc) {
    switch (rc & 0xff) {
    case SQLITE_OK:
    case SQLITE_DONE:
    case SQLITE_ROW:
        return FMX_OK;
    case SQLITE_NOMEM:
        return FMX_ENOMEM;
    case SQLITE_CONSTRAINT:
    case SQLITE_MISUSE:
    case SQLITE_RANGE:
        return FMX_EINVAL;
    case SQLITE_NOTADB:
    case SQLITE_CORRUPT:
        return FMX_EFORMAT;
    default:
        return FMX_EIO;
    }
}

static void copy_err(char *err, size_t errsz, const char *fmt, ...) {
    if (!err || !errsz) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errsz, fmt, ap);
    va_end(ap);
}

static int fail(fmx_log *log, int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(log->msg, sizeof log->msg, fmt, ap);
    va_end(ap);
    return status;
}

/* Error from the last SQLite call on log->db, prefixed with what we were doing. */
static int fail_sql(fmx_log *log, int rc, const char *what) {
    return fail(log, status_of(rc), "%s: %s", what, sqlite3_errmsg(log->db));
}

static void ok(fmx_log *log) {
    log->msg[0] = '\0';
}

static double now_unix(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Runs a prepared statement that returns no rows, then resets it. */
static int run(fmx_log *log, sqlite3_stmt *st, const char *what) {
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (rc != SQLITE_DONE) return fail_sql(log, rc, what);
    return FMX_OK;
}

static void bind_text_or_null(sqlite3_stmt *st, int i, const char *s) {
    if (s)
        sqlite3_bind_text(st, i, s, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, i);
}

/* ---- open: schema version, creation, migration ---- */

static int exec(sqlite3 *db, const char *sql, char *err, size_t errsz, const char *what) {
    char *m = NULL;
    int rc = sqlite3_exec(db, sql, NULL, NULL, &m);
    if (rc != SQLITE_OK) {
        copy_err(err, errsz, "%s: %s", what, m ? m : sqlite3_errmsg(db));
        sqlite3_free(m);
        return status_of(rc);
    }
    return FMX_OK;
}

/* One-row integer query; *found = 0 when it returns no row. */
static int query_int(sqlite3 *db, const char *sql, int64_t *out, int *found, char *err,
                     size_t errsz) {
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
    if (rc != SQLITE_OK) {
        copy_err(err, errsz, "%s: %s", sql, sqlite3_errmsg(db));
        return status_of(rc);
    }
    rc = sqlite3_step(st);
    *found = 0;
    if (rc == SQLITE_ROW) {
        if (sqlite3_column_type(st, 0) != SQLITE_INTEGER) {
            copy_err(err, errsz, "%s: not an integer", sql);
            sqlite3_finalize(st);
            return FMX_EFORMAT;
        }
        *out = sqlite3_column_int64(st, 0);
        *found = 1;
        rc = SQLITE_DONE;
    }
    if (rc != SQLITE_DONE) {
        copy_err(err, errsz, "%s: %s", sql, sqlite3_errmsg(db));
        sqlite3_finalize(st);
        return status_of(rc);
    }
    sqlite3_finalize(st);
    return FMX_OK;
}

/* Version of the file: 0 for one without fmx tables. Refuses a database
 * that holds other tables but no fmx meta row (not an fmx log). */
static int schema_version(sqlite3 *db, int64_t *version, char *err, size_t errsz) {
    int64_t n_tables = 0, has_meta = 0;
    int found, st;
    if ((st = query_int(db, "SELECT count(*) FROM sqlite_master WHERE type = 'table'", &n_tables,
                        &found, err, errsz)))
        return st;
    if ((st = query_int(db,
                        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
                        &has_meta, &found, err, errsz)))
        return st;
    *version = 0;
    if (has_meta) {
        st = query_int(db, "SELECT value FROM meta WHERE key = 'schema_version'", version, &found,
                       err, errsz);
        if (st) return st;
        if (found) return FMX_OK;
    }
    if (n_tables > has_meta) {
        copy_err(err, errsz,
                 "not an fmx episode log: the database has tables but no "
                 "meta.schema_version");
        return FMX_EFORMAT;
    }
    return FMX_OK;
}

static int set_version(sqlite3 *db, int64_t version, char *err, size_t errsz) {
    char sql[160];
    snprintf(sql, sizeof sql,
             "INSERT INTO meta (key, value) VALUES ('schema_version', %lld) "
             "ON CONFLICT (key) DO UPDATE SET value = excluded.value;",
             (long long)version);
    return exec(db, sql, err, errsz, "set schema version");
}

static int create_schema(sqlite3 *db, char *err, size_t errsz) {
    sqltext steps = {.n = 0};
    steps_ddl(&steps);
    if (steps.over) {
        copy_err(err, errsz, "the steps schema is longer than %zu bytes", sizeof steps.buf);
        return FMX_EINTERNAL;
    }
    size_t n = sizeof SCHEMA_SQL + steps.n;
    char *sql = malloc(n);
    if (!sql) {
        copy_err(err, errsz, "out of memory");
        return FMX_ENOMEM;
    }
    snprintf(sql, n, SCHEMA_SQL, steps.buf);
    int st = exec(db, sql, err, errsz, "create schema");
    free(sql);
    if (st) return st;
    return set_version(db, FMX_LOG_SCHEMA_VERSION, err, errsz);
}

/* ---- migrations: MIGRATIONS[i] takes a file from version i + 1 to i + 2 ---- */

/* 1 -> 2: every JSON field stored once per distinct text (blobs), the steps
 * table becomes step_rows and the steps view; the grades table joins the
 * schema (fmx regrade created it before). */
static int migrate_1_to_2(sqlite3 *db, char *err, size_t errsz) {
    sqltext t = {.n = 0};
    sqlf(&t, "ALTER TABLE steps RENAME TO steps_v1; DROP TRIGGER steps_count;");
    steps_ddl(&t);
    sqlf(&t, "INSERT INTO blobs (hash, body) SELECT fmx_sha256(body), body FROM (");
    int first = 1;
    for (int i = 0; i < N_STEP_FIELDS; i++)
        if (STEP_KINDS[i] == 'J') {
            sqlf(&t, "%sSELECT %s AS body FROM steps_v1", first ? "" : " UNION ", STEP_NAMES[i]);
            first = 0;
        }
    sqlf(&t, ");INSERT INTO step_rows SELECT ");
    for (int i = 0; i < N_STEP_FIELDS; i++)
        if (STEP_KINDS[i] == 'J')
            sqlf(&t, "%s(SELECT id FROM blobs WHERE hash = fmx_sha256(v.%s))", i ? ", " : "",
                 STEP_NAMES[i]);
        else
            sqlf(&t, "%sv.%s", i ? ", " : "", STEP_NAMES[i]);
    sqlf(&t, " FROM steps_v1 v ORDER BY v.episode, v.idx;"
             /* the new trigger counted the copied steps again */
             "UPDATE episodes SET steps = (SELECT count(*) FROM step_rows WHERE episode = "
             "episodes.id);"
             "DROP TABLE steps_v1;" GRADES_SQL);
    if (t.over) {
        copy_err(err, errsz, "the 1 -> 2 migration is longer than %zu bytes", sizeof t.buf);
        return FMX_EINTERNAL;
    }
    return exec(db, t.buf, err, errsz, "migrate schema 1 -> 2");
}

static int (*const MIGRATIONS[])(sqlite3 *, char *, size_t) = {migrate_1_to_2};
#define N_MIGRATIONS ((int)(sizeof MIGRATIONS / sizeof MIGRATIONS[0]))

/* The steps columns must be FMX_STEP_FIELDS, in order. */
static int check_steps_columns(sqlite3 *db, char *err, size_t errsz) {
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db, "SELECT name FROM pragma_table_info('steps') ORDER BY cid", -1,
                                &st, NULL);
    if (rc != SQLITE_OK) {
        copy_err(err, errsz, "read steps columns: %s", sqlite3_errmsg(db));
        return status_of(rc);
    }
    int i = 0, bad = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(st, 0);
        if (i >= N_STEP_FIELDS || !name || strcmp(name, STEP_NAMES[i]) != 0) bad = 1;
        i++;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        copy_err(err, errsz, "read steps columns: %s", sqlite3_errmsg(db));
        return status_of(rc);
    }
    if (bad || i != N_STEP_FIELDS) {
        copy_err(err, errsz,
                 "the steps table's columns differ from FMX_STEP_FIELDS at schema version %d "
                 "(the field list changed without a schema version and migration)",
                 FMX_LOG_SCHEMA_VERSION);
        return FMX_EFORMAT;
    }
    return FMX_OK;
}

static int check_version(int64_t v, const char *path, char *err, size_t errsz) {
    if (v > FMX_LOG_SCHEMA_VERSION) {
        copy_err(err, errsz,
                 "%s: log schema version %lld is newer than this fmx supports (%d); "
                 "use a newer fmx to open it",
                 path, (long long)v, FMX_LOG_SCHEMA_VERSION);
        return FMX_EVERSION;
    }
    if (v < 0) {
        copy_err(err, errsz, "%s: bad log schema version %lld", path, (long long)v);
        return FMX_EFORMAT;
    }
    return FMX_OK;
}

/* Brings the file to FMX_LOG_SCHEMA_VERSION inside one write transaction,
 * so two processes opening a new file do not both create it. */
static int migrate(sqlite3 *db, const char *path, char *err, size_t errsz) {
    int st = exec(db, "BEGIN IMMEDIATE", err, errsz, "begin schema transaction");
    if (st) return st;
    int64_t v = 0;
    st = schema_version(db, &v, err, errsz);
    if (!st) st = check_version(v, path, err, errsz);
    if (!st && v == 0) st = create_schema(db, err, errsz);
    /* Older files: one version at a time, each step setting its version. */
    for (; !st && v > 0 && v < FMX_LOG_SCHEMA_VERSION; v++) {
        if (v - 1 >= N_MIGRATIONS) {
            copy_err(err, errsz, "%s: no migration from log schema version %lld", path,
                     (long long)v);
            st = FMX_EVERSION;
            break;
        }
        if (!(st = MIGRATIONS[v - 1](db, err, errsz))) st = set_version(db, v + 1, err, errsz);
    }
    if (!st) st = check_steps_columns(db, err, errsz);
    if (st) {
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        return st;
    }
    return exec(db, "COMMIT", err, errsz, "commit schema");
}

static int prepare(fmx_log *log, sqlite3_stmt **st, const char *sql, char *err, size_t errsz) {
    int rc = sqlite3_prepare_v3(log->db, sql, -1, SQLITE_PREPARE_PERSISTENT, st, NULL);
    if (rc != SQLITE_OK) {
        copy_err(err, errsz, "prepare \"%s\": %s", sql, sqlite3_errmsg(log->db));
        return status_of(rc);
    }
    return FMX_OK;
}

static int prepare_all(fmx_log *log, char *err, size_t errsz) {
    /* INSERT INTO step_rows (a, b_id, ...) VALUES (?, ?, ...) from the field list. */
    sqltext step = {.n = 0};
    sqlf(&step, "INSERT INTO step_rows (");
    for (int i = 0; i < N_STEP_FIELDS; i++)
        sqlf(&step, "%s%s%s", i ? ", " : "", STEP_NAMES[i], STEP_KINDS[i] == 'J' ? "_id" : "");
    for (int i = 0; i < N_STEP_FIELDS; i++)
        sqlf(&step, "%s", i ? ", ?" : ") VALUES (?");
    sqlf(&step, ")");
    if (step.over) {
        copy_err(err, errsz, "steps INSERT longer than %zu bytes", sizeof step.buf);
        return FMX_EINTERNAL;
    }
    const char *step_sql = step.buf;

    const struct {
        sqlite3_stmt **st;
        const char *sql;
    } list[] = {
        {&log->begin, "BEGIN IMMEDIATE"},
        {&log->commit, "COMMIT"},
        {&log->rollback, "ROLLBACK"},
        {&log->task, "INSERT INTO tasks (id, kind, pack, module, class, target_loc) "
                     "VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO UPDATE SET "
                     "kind = excluded.kind, pack = excluded.pack, module = excluded.module, "
                     "class = excluded.class, target_loc = excluded.target_loc"},
        {&log->policy_ins, "INSERT INTO policies (name) VALUES (?1) ON CONFLICT (name) DO NOTHING"},
        {&log->policy_sel, "SELECT id FROM policies WHERE name = ?1"},
        {&log->ep_begin, "INSERT INTO episodes (task_id, policy_id, seed, status, started_at) "
                         "VALUES (?1, ?2, ?3, 'open', ?4)"},
        {&log->ep_end, "UPDATE episodes SET status = ?2, ended_at = ?3, reward = ?4 "
                       "WHERE id = ?1 AND status = 'open'"},
        {&log->ep_status, "SELECT status FROM episodes WHERE id = ?1"},
        {&log->abort_open, "UPDATE episodes SET status = 'aborted', ended_at = ?1 "
                           "WHERE status = 'open'"},
        {&log->step, step_sql},
        {&log->blob_ins, "INSERT INTO blobs (hash, body) VALUES (?1, ?2) "
                         "ON CONFLICT (hash) DO NOTHING"},
        {&log->blob_sel, "SELECT id FROM blobs WHERE hash = ?1"},
        {&log->sub, "INSERT INTO submissions (episode, code, entry, correctness, loc, loc_score, "
                    "compile_score, reward, reward_version, breakdown, truncated, created_at) "
                    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"},
    };
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++) {
        int st = prepare(log, list[i].st, list[i].sql, err, errsz);
        if (st) return st;
    }
    return FMX_OK;
}

/* Sets a pragma and checks the value it reports back (NULL: no check). */
static int pragma(sqlite3 *db, const char *sql, const char *want, char *err, size_t errsz) {
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
    if (rc == SQLITE_OK) {
        rc = sqlite3_step(st);
        if (rc == SQLITE_ROW && want) {
            const char *got = (const char *)sqlite3_column_text(st, 0);
            if (!got || strcmp(got, want) != 0) {
                copy_err(err, errsz, "%s: got \"%s\", need \"%s\"", sql, got ? got : "", want);
                sqlite3_finalize(st);
                return FMX_EIO;
            }
        }
        if (rc == SQLITE_ROW || rc == SQLITE_DONE) rc = SQLITE_OK;
    }
    if (rc != SQLITE_OK) {
        copy_err(err, errsz, "%s: %s", sql, sqlite3_errmsg(db));
        sqlite3_finalize(st);
        return status_of(rc);
    }
    sqlite3_finalize(st);
    return FMX_OK;
}

int fmx_log_open(const char *path, fmx_log **out, char *err, size_t errsz) {
    if (err && errsz) err[0] = '\0';
    if (!out) {
        copy_err(err, errsz, "fmx_log_open: out is NULL");
        return FMX_EINVAL;
    }
    *out = NULL;
    if (!path || !*path) {
        copy_err(err, errsz, "fmx_log_open: no path");
        return FMX_EINVAL;
    }
    fmx_log *log = calloc(1, sizeof *log);
    if (!log) {
        copy_err(err, errsz, "out of memory");
        return FMX_ENOMEM;
    }
    /* URI: fmx_log_merge attaches its source read-only (file:PATH?mode=ro) */
    int rc = sqlite3_open_v2(path, &log->db,
                             SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_URI, NULL);
    if (rc != SQLITE_OK) {
        copy_err(err, errsz, "%s: cannot open: %s", path,
                 log->db ? sqlite3_errmsg(log->db) : sqlite3_errstr(rc));
        fmx_log_close(log);
        return status_of(rc) == FMX_ENOMEM ? FMX_ENOMEM : FMX_EIO;
    }
    sqlite3_extended_result_codes(log->db, 1);
    sqlite3_busy_timeout(log->db, FMX__LOG_BUSY_MS);
    sqlite3_create_function_v2(log->db, "fmx_sha256", 1, SQLITE_UTF8 | SQLITE_DETERMINISTIC, NULL,
                               sql_sha256, NULL, NULL, NULL);

    char why[384] = "";
    /* Read before writing anything: a file that is not SQLite fails the first
     * read, and one that is not ours or is too new is left untouched. */
    int64_t v = 0;
    int st = schema_version(log->db, &v, why, sizeof why);
    if (st == FMX_EFORMAT && sqlite3_errcode(log->db) == SQLITE_NOTADB) {
        copy_err(err, errsz, "%s: not an SQLite database (%s)", path, sqlite3_errmsg(log->db));
        fmx_log_close(log);
        return FMX_EFORMAT;
    }
    if (!st) st = check_version(v, path, why, sizeof why);
    if (!st) st = pragma(log->db, "PRAGMA journal_mode = WAL", "wal", why, sizeof why);
    if (!st) st = pragma(log->db, "PRAGMA synchronous = FULL", NULL, why, sizeof why);
    if (!st) st = pragma(log->db, "PRAGMA foreign_keys = ON", NULL, why, sizeof why);
    if (!st) st = migrate(log->db, path, why, sizeof why);
    if (!st) st = prepare_all(log, why, sizeof why);
    if (st) {
        /* migrate already names the file in its messages */
        if (strncmp(why, path, strlen(path)) == 0)
            copy_err(err, errsz, "%s", why);
        else
            copy_err(err, errsz, "%s: %s", path, why);
        fmx_log_close(log);
        return st;
    }
    *out = log;
    return FMX_OK;
}

void fmx_log_close(fmx_log *log) {
    if (!log) return;
    sqlite3_stmt **all[] = {&log->begin,      &log->commit,     &log->rollback, &log->task,
                            &log->policy_ins, &log->policy_sel, &log->ep_begin, &log->ep_end,
                            &log->ep_status,  &log->abort_open, &log->step,     &log->sub,
                            &log->blob_ins,   &log->blob_sel};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        sqlite3_finalize(*all[i]);
    /* An open transaction is rolled back by sqlite3_close. */
    sqlite3_close(log->db);
    free(log);
}

const char *fmx_log_errmsg(const fmx_log *log) {
    if (!log) return "no log (fmx_log_open failed or was not called)";
    return log->msg;
}

/* ---- tasks, policies ---- */

int fmx_log_task(fmx_log *log, const char *task_id, const char *kind, const char *pack,
                 const char *module, const char *cls, int64_t target_loc) {
    if (!log) return FMX_EINVAL;
    if (!task_id || !kind || !pack) return fail(log, FMX_EINVAL, "task: id, kind, pack required");
    sqlite3_stmt *s = log->task;
    sqlite3_bind_text(s, 1, task_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, kind, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 3, pack, -1, SQLITE_STATIC);
    bind_text_or_null(s, 4, module);
    bind_text_or_null(s, 5, cls);
    sqlite3_bind_int64(s, 6, target_loc);
    int st = run(log, s, "upsert task");
    if (!st) ok(log);
    return st;
}

int fmx_log_policy(fmx_log *log, const char *name, int64_t *policy_id) {
    if (!log) return FMX_EINVAL;
    if (!name || !policy_id) return fail(log, FMX_EINVAL, "policy: name and policy_id required");
    sqlite3_bind_text(log->policy_ins, 1, name, -1, SQLITE_STATIC);
    int st = run(log, log->policy_ins, "insert policy");
    if (st) return st;
    sqlite3_stmt *s = log->policy_sel;
    sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) *policy_id = sqlite3_column_int64(s, 0);
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    if (rc != SQLITE_ROW) return fail_sql(log, rc, "select policy");
    ok(log);
    return FMX_OK;
}

/* ---- episodes ---- */

int fmx_log_episode_begin(fmx_log *log, const char *task_id, int64_t policy_id, int64_t seed,
                          int64_t *episode_id) {
    if (!log) return FMX_EINVAL;
    if (!task_id || !episode_id)
        return fail(log, FMX_EINVAL, "episode_begin: task_id and episode_id required");
    sqlite3_stmt *s = log->ep_begin;
    sqlite3_bind_text(s, 1, task_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 2, policy_id);
    sqlite3_bind_int64(s, 3, seed);
    sqlite3_bind_double(s, 4, now_unix());
    int st = run(log, s, "begin episode (unknown task or policy?)");
    if (st) return st;
    *episode_id = sqlite3_last_insert_rowid(log->db);
    ok(log);
    return FMX_OK;
}

static int is_end_status(const char *s) {
    static const char *const ok_status[] = {"submitted", "truncated", "aborted", "closed"};
    for (size_t i = 0; i < sizeof ok_status / sizeof ok_status[0]; i++)
        if (strcmp(s, ok_status[i]) == 0) return 1;
    return 0;
}

int fmx_log_episode_end(fmx_log *log, int64_t episode_id, const char *status, double reward) {
    if (!log) return FMX_EINVAL;
    if (!status || !is_end_status(status))
        return fail(log, FMX_EINVAL,
                    "episode_end: status must be submitted, truncated, aborted or closed, "
                    "not \"%s\"",
                    status ? status : "(null)");
    sqlite3_stmt *s = log->ep_end;
    sqlite3_bind_int64(s, 1, episode_id);
    sqlite3_bind_text(s, 2, status, -1, SQLITE_STATIC);
    sqlite3_bind_double(s, 3, now_unix());
    sqlite3_bind_double(s, 4, reward);
    int st = run(log, s, "end episode");
    if (st) return st;
    if (sqlite3_changes(log->db) == 1) {
        ok(log);
        return FMX_OK;
    }
    /* Nothing changed: unknown episode, or already ended. */
    s = log->ep_status;
    sqlite3_bind_int64(s, 1, episode_id);
    int rc = sqlite3_step(s);
    char was[32] = "";
    if (rc == SQLITE_ROW) snprintf(was, sizeof was, "%s", (const char *)sqlite3_column_text(s, 0));
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    if (rc == SQLITE_DONE)
        return fail(log, FMX_ENOTFOUND, "end episode: no episode %lld", (long long)episode_id);
    if (rc != SQLITE_ROW) return fail_sql(log, rc, "end episode");
    return fail(log, FMX_EINVAL, "end episode: episode %lld already ended (%s)",
                (long long)episode_id, was);
}

int fmx_log_abort_open(fmx_log *log, int64_t *n_aborted) {
    if (!log) return FMX_EINVAL;
    sqlite3_bind_double(log->abort_open, 1, now_unix());
    int st = run(log, log->abort_open, "abort open episodes");
    if (st) return st;
    if (n_aborted) *n_aborted = sqlite3_changes(log->db);
    ok(log);
    return FMX_OK;
}

/* ---- batches ---- */

int fmx_log_begin(fmx_log *log) {
    if (!log) return FMX_EINVAL;
    if (!sqlite3_get_autocommit(log->db))
        return fail(log, FMX_EINVAL, "begin: a transaction is already open");
    int st = run(log, log->begin, "begin");
    if (!st) ok(log);
    return st;
}

int fmx_log_commit(fmx_log *log) {
    if (!log) return FMX_EINVAL;
    if (sqlite3_get_autocommit(log->db))
        return fail(log, FMX_EINVAL, "commit: no transaction open");
    int rc = sqlite3_step(log->commit);
    sqlite3_reset(log->commit);
    if (rc == SQLITE_DONE) {
        ok(log);
        return FMX_OK;
    }
    /* Keep one rule for the caller: a failed commit leaves nothing of the
     * batch and no transaction open. */
    int st = fail_sql(log, rc, "commit (the batch was rolled back)");
    if (!sqlite3_get_autocommit(log->db)) {
        sqlite3_step(log->rollback);
        sqlite3_reset(log->rollback);
    }
    return st;
}

int fmx_log_rollback(fmx_log *log) {
    if (!log) return FMX_EINVAL;
    if (sqlite3_get_autocommit(log->db)) {
        ok(log);
        return FMX_OK;
    }
    int st = run(log, log->rollback, "rollback");
    if (!st) ok(log);
    return st;
}

/* ---- the hot path ---- */

/* The id in blobs of a text, inserted if new. FMX_OK or an error status. */
static int blob_id(fmx_log *log, const char *field, const char *text, int64_t *id) {
    if (!text) return fail(log, FMX_EINVAL, "step: %s is NULL", field);
    size_t n = strlen(text);
    unsigned char md[32];
    if (sha256(text, n, md) != 0) return fail(log, FMX_EINTERNAL, "step: %s: sha256 failed", field);
    sqlite3_bind_blob(log->blob_ins, 1, md, 32, SQLITE_STATIC);
    sqlite3_bind_text(log->blob_ins, 2, text, (int)n, SQLITE_STATIC);
    int st = run(log, log->blob_ins, "insert blob");
    if (st) return st;
    if (sqlite3_changes(log->db) == 1) {
        *id = sqlite3_last_insert_rowid(log->db);
        return FMX_OK;
    }
    sqlite3_stmt *s = log->blob_sel;
    sqlite3_bind_blob(s, 1, md, 32, SQLITE_STATIC);
    int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) *id = sqlite3_column_int64(s, 0);
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    return rc == SQLITE_ROW ? FMX_OK : fail_sql(log, rc, "select blob");
}

int fmx_log_step(fmx_log *log, const fmx_step_record *step) {
    if (!log) return FMX_EINVAL;
    if (!step) return fail(log, FMX_EINVAL, "step: record is NULL");
    sqlite3_stmt *s = log->step;
    int i = 0;
    int64_t id = 0;
#define FMX__BIND_I(name) sqlite3_bind_int64(s, ++i, step->name);
#define FMX__BIND_F(name) sqlite3_bind_double(s, ++i, step->name);
#define FMX__BIND_S(name) bind_text_or_null(s, ++i, step->name);
#define FMX__BIND_J(name)                                                                          \
    {                                                                                              \
        int st_ = blob_id(log, #name, step->name, &id);                                            \
        if (st_) {                                                                                 \
            sqlite3_clear_bindings(s);                                                             \
            return st_;                                                                            \
        }                                                                                          \
        sqlite3_bind_int64(s, ++i, id);                                                            \
    }
#define FMX__BIND(kind, name, sql, desc) FMX__BIND_##kind(name)
    FMX_STEP_FIELDS(FMX__BIND)
#undef FMX__BIND
#undef FMX__BIND_I
#undef FMX__BIND_F
#undef FMX__BIND_S
#undef FMX__BIND_J
    int rc = sqlite3_step(s);
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    if (rc != SQLITE_DONE) {
        char what[96];
        snprintf(what, sizeof what, "insert step (episode %lld, idx %lld)",
                 (long long)step->episode, (long long)step->idx);
        return fail_sql(log, rc, what);
    }
    ok(log);
    return FMX_OK;
}

int fmx_log_submission(fmx_log *log, const fmx_submission_record *sub, int64_t *submission_id) {
    if (!log) return FMX_EINVAL;
    if (!sub || !sub->code || !sub->reward_version)
        return fail(log, FMX_EINVAL, "submission: record, code and reward_version required");
    sqlite3_stmt *s = log->sub;
    sqlite3_bind_int64(s, 1, sub->episode);
    sqlite3_bind_text(s, 2, sub->code, -1, SQLITE_STATIC);
    bind_text_or_null(s, 3, sub->entry);
    sqlite3_bind_double(s, 4, sub->correctness);
    sqlite3_bind_int64(s, 5, sub->loc);
    sqlite3_bind_double(s, 6, sub->loc_score);
    sqlite3_bind_double(s, 7, sub->compile_score);
    sqlite3_bind_double(s, 8, sub->reward);
    sqlite3_bind_text(s, 9, sub->reward_version, -1, SQLITE_STATIC);
    bind_text_or_null(s, 10, sub->breakdown);
    sqlite3_bind_int(s, 11, sub->truncated ? 1 : 0);
    sqlite3_bind_double(s, 12, now_unix());
    char what[64];
    snprintf(what, sizeof what, "insert submission (episode %lld)", (long long)sub->episode);
    int st = run(log, s, what);
    if (st) return st;
    if (submission_id) *submission_id = sqlite3_last_insert_rowid(log->db);
    ok(log);
    return FMX_OK;
}

/* ---- the field list as JSON ---- */

#define FMX__TYPE_I "int"
#define FMX__TYPE_F "float"
#define FMX__TYPE_S "str"
#define FMX__TYPE_J "json"
#define FMX__FIELD_JSON(kind, name, sql, desc)                                                     \
    ",{\"name\":\"" #name "\",\"type\":\"" FMX__TYPE_##kind "\",\"doc\":\"" desc "\"}"
/* Every entry starts with a comma; the one before the first is replaced by
 * the opening bracket when the string is built, once. */
static char step_fields_json[] = FMX_STEP_FIELDS(FMX__FIELD_JSON) "]";
#undef FMX__FIELD_JSON
static pthread_once_t step_fields_once = PTHREAD_ONCE_INIT;

static void step_fields_init(void) {
    step_fields_json[0] = '[';
}

const char *fmx_log_step_fields_json(void) {
    pthread_once(&step_fields_once, step_fields_init);
    return step_fields_json;
}

/* ---- merging logs ---- */

/* Runs sql on log's connection; on failure log's message says what. */
static int merge_exec(fmx_log *log, const char *sql, const char *what) {
    char *m = NULL;
    int rc = sqlite3_exec(log->db, sql, NULL, NULL, &m);
    if (rc == SQLITE_OK) return FMX_OK;
    int st = fail(log, status_of(rc), "%s: %s", what, m ? m : sqlite3_errmsg(log->db));
    sqlite3_free(m);
    return st;
}

/* The copy, once src is attached: tasks and policies by name, episodes and
 * submissions under new ids (in their order), steps through blobs, grades. */
static int merge_attached(fmx_log *log, int has_grades) {
    static const char *const head[] = {
        "INSERT INTO tasks SELECT * FROM src.tasks WHERE true ON CONFLICT (id) DO NOTHING;"
        "INSERT INTO policies (name) SELECT name FROM src.policies WHERE true "
        "  ON CONFLICT (name) DO NOTHING;"
        "CREATE TEMP TABLE fmx_epmap (old INTEGER PRIMARY KEY, new INTEGER NOT NULL);"
        "INSERT INTO temp.fmx_epmap SELECT id, (SELECT coalesce(max(id), 0) FROM main.episodes)"
        "  + row_number() OVER (ORDER BY id) FROM src.episodes;"
        "INSERT INTO main.episodes (id, task_id, policy_id, seed, status, started_at, ended_at,"
        "  reward, steps) SELECT m.new, e.task_id, (SELECT id FROM main.policies WHERE name ="
        "  p.name), e.seed, e.status, e.started_at, e.ended_at, e.reward, 0 FROM src.episodes e"
        "  JOIN src.policies p ON p.id = e.policy_id JOIN temp.fmx_epmap m ON m.old = e.id"
        "  ORDER BY m.new;"
        "CREATE TEMP TABLE fmx_submap (old INTEGER PRIMARY KEY, new INTEGER NOT NULL);"
        "INSERT INTO temp.fmx_submap SELECT id, (SELECT coalesce(max(id), 0) FROM "
        "  main.submissions) + row_number() OVER (ORDER BY id) FROM src.submissions;"
        "INSERT INTO main.submissions (id, episode, code, entry, correctness, loc, loc_score,"
        "  compile_score, reward, reward_version, breakdown, truncated, created_at)"
        "  SELECT sm.new, m.new, s.code, s.entry, s.correctness, s.loc, s.loc_score,"
        "  s.compile_score, s.reward, s.reward_version, s.breakdown, s.truncated, s.created_at"
        "  FROM src.submissions s JOIN temp.fmx_submap sm ON sm.old = s.id"
        "  JOIN temp.fmx_epmap m ON m.old = s.episode ORDER BY sm.new;"};
    int st = merge_exec(log, head[0], "copy episodes and submissions");
    if (st) return st;
    /* the steps: every JSON text into blobs, then the rows */
    sqltext t = {.n = 0};
    sqlf(&t, "INSERT INTO main.blobs (hash, body) SELECT fmx_sha256(body), body FROM (");
    int first = 1;
    for (int i = 0; i < N_STEP_FIELDS; i++)
        if (STEP_KINDS[i] == 'J') {
            sqlf(&t, "%sSELECT %s AS body FROM src.steps", first ? "" : " UNION ", STEP_NAMES[i]);
            first = 0;
        }
    sqlf(&t, ") WHERE true ON CONFLICT (hash) DO NOTHING;INSERT INTO main.step_rows SELECT ");
    for (int i = 0; i < N_STEP_FIELDS; i++)
        if (strcmp(STEP_NAMES[i], "episode") == 0)
            sqlf(&t, "%sm.new", i ? ", " : "");
        else if (STEP_KINDS[i] == 'J')
            sqlf(&t, "%s(SELECT id FROM main.blobs WHERE hash = fmx_sha256(s.%s))", i ? ", " : "",
                 STEP_NAMES[i]);
        else
            sqlf(&t, "%ss.%s", i ? ", " : "", STEP_NAMES[i]);
    sqlf(&t, " FROM src.steps s JOIN temp.fmx_epmap m ON m.old = s.episode ORDER BY m.new, s.idx;");
    if (has_grades)
        sqlf(&t, "INSERT INTO main.grades (submission, episode, reward_version, rerun,"
                 " correctness, loc, loc_score, compile_score, reward, breakdown, created_at)"
                 " SELECT sm.new, m.new, g.reward_version, g.rerun, g.correctness, g.loc,"
                 " g.loc_score, g.compile_score, g.reward, g.breakdown, g.created_at"
                 " FROM src.grades g JOIN temp.fmx_submap sm ON sm.old = g.submission"
                 " JOIN temp.fmx_epmap m ON m.old = g.episode WHERE true ON CONFLICT DO NOTHING;");
    if (t.over) return fail(log, FMX_EINTERNAL, "merge: SQL longer than %zu bytes", sizeof t.buf);
    return merge_exec(log, t.buf, "copy steps and grades");
}

int fmx_log_merge(fmx_log *log, const char *src_path, int64_t *episodes) {
    if (!log) return FMX_EINVAL;
    if (!src_path) return fail(log, FMX_EINVAL, "merge: no source log");
    if (episodes) *episodes = 0;
    /* read-only: the source is never changed (an older one is not migrated) */
    char *uri = sqlite3_malloc64(3 * strlen(src_path) + 16);
    if (!uri) return fail(log, FMX_ENOMEM, "out of memory");
    char *u = uri + sprintf(uri, "file:");
    for (const char *c = src_path; *c; c++) /* a URI's own characters, escaped */
        u += *c == '%' || *c == '?' || *c == '#' ? sprintf(u, "%%%02X", (unsigned char)*c)
                                                 : sprintf(u, "%c", *c);
    strcpy(u, "?mode=ro");
    sqlite3_stmt *at = NULL;
    int rc = sqlite3_prepare_v2(log->db, "ATTACH ?1 AS src", -1, &at, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_text(at, 1, uri, -1, SQLITE_STATIC);
        rc = sqlite3_step(at);
        if (rc == SQLITE_DONE) rc = SQLITE_OK;
    }
    sqlite3_finalize(at);
    sqlite3_free(uri);
    if (rc != SQLITE_OK) return fail_sql(log, rc, src_path);
    int64_t v = 0, n = 0, grades = 0;
    int found = 0;
    char why[256] = "";
    int st = query_int(log->db, "SELECT value FROM src.meta WHERE key = 'schema_version'", &v,
                       &found, why, sizeof why);
    if (st || !found || v < 1 || v > FMX_LOG_SCHEMA_VERSION) {
        if (!st && !found) snprintf(why, sizeof why, "no schema version");
        if (!st && found) snprintf(why, sizeof why, "log schema version %lld", (long long)v);
        st = fail(log, st ? st : FMX_EFORMAT, "%s: not an fmx episode log this fmx reads (%s)",
                  src_path, why);
    }
    if (!st)
        st = query_int(log->db,
                       "SELECT count(*) FROM src.sqlite_master WHERE name = 'grades' AND "
                       "type = 'table'",
                       &grades, &found, why, sizeof why);
    if (!st)
        st = query_int(log->db, "SELECT count(*) FROM src.episodes", &n, &found, why, sizeof why);
    if (!st) st = merge_exec(log, "BEGIN IMMEDIATE", "begin merge");
    if (!st) {
        st = merge_attached(log, grades > 0);
        if (!st) st = merge_exec(log, "COMMIT", "commit merge");
        if (st) sqlite3_exec(log->db, "ROLLBACK", NULL, NULL, NULL);
    }
    sqlite3_exec(log->db,
                 "DROP TABLE IF EXISTS temp.fmx_epmap; DROP TABLE IF EXISTS "
                 "temp.fmx_submap; DETACH src",
                 NULL, NULL, NULL);
    if (st) return st;
    if (episodes) *episodes = n;
    ok(log);
    return FMX_OK;
}
