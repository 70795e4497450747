/*
 * log.h — the episode log: one SQLite file (WAL) holding tasks, policies,
 * episodes, every step (action, observation, timing, error) and every graded
 * submission with its reward breakdown and reward version. A step is durable
 * once fmx_log_commit returns: the server commits before it replies, so
 * nothing acknowledged is ever lost. Readers (replay, leaderboard, exports)
 * open their own connections and read while the server writes.
 *
 * One field list, FMX_STEP_FIELDS, defines a step record: the SQLite
 * columns, the INSERT, the msgpack keys the server sends and the field list
 * the Python client decodes (sent in `spec`) all come from it.
 *
 * Not here: what a step means (env/), how rewards are computed (rewards/).
 */
#ifndef FMX_LOG_H
#define FMX_LOG_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fmx_log fmx_log;

#define FMX_LOG_SCHEMA_VERSION 2

/* X(ctype_kind, name, sql_type, description)
 * ctype_kind: I = int64_t, F = double, S = const char * (UTF-8, may be NULL),
 * J = const char * holding JSON text. */
#define FMX_STEP_FIELDS(X)                                                                         \
    X(I, episode, "INTEGER NOT NULL", "episode id")                                                \
    X(I, idx, "INTEGER NOT NULL", "step index in the episode, from 0")                             \
    X(S, tool, "TEXT NOT NULL", "tool called")                                                     \
    X(J, args, "TEXT NOT NULL", "tool arguments (JSON)")                                           \
    X(J, observation, "TEXT NOT NULL", "observation returned (JSON)")                              \
    X(F, reward, "REAL NOT NULL", "reward of this step")                                           \
    X(I, terminated, "INTEGER NOT NULL", "1 if the episode ended by submit")                       \
    X(I, truncated, "INTEGER NOT NULL", "1 if the budget ran out")                                 \
    X(S, error, "TEXT", "error code if the action was refused")                                    \
    X(F, started_at, "REAL NOT NULL", "unix time the request arrived")                             \
    X(F, ms, "REAL NOT NULL", "server time spent on the step, ms")

typedef struct {
#define FMX__STEP_MEMBER_I(name) int64_t name;
#define FMX__STEP_MEMBER_F(name) double name;
#define FMX__STEP_MEMBER_S(name) const char *name;
#define FMX__STEP_MEMBER_J(name) const char *name;
#define FMX__STEP_MEMBER(kind, name, sql, desc) FMX__STEP_MEMBER_##kind(name)
    FMX_STEP_FIELDS(FMX__STEP_MEMBER)
#undef FMX__STEP_MEMBER
} fmx_step_record;

/* A graded submission. code and reward_version are required; entry and
 * breakdown may be NULL. */
typedef struct {
    int64_t episode;
    const char *code;
    const char *entry;
    double correctness; /* fraction of probes (hidden included) fully matching */
    int64_t loc;        /* logical statements */
    double loc_score, compile_score, reward;
    const char *reward_version;
    const char *breakdown; /* JSON */
    int truncated;         /* graded because the budget ran out */
} fmx_submission_record;

/* Opens (creating or migrating) the log at path; *out is the caller's, closed
 * with fmx_log_close. On failure *out is NULL, err (may be NULL) holds the
 * reason and the status says which: FMX_EFORMAT not an SQLite file or not an
 * fmx log, FMX_EVERSION schema newer than FMX_LOG_SCHEMA_VERSION, FMX_EIO
 * cannot open or write. One handle is used by one thread at a time. */
int fmx_log_open(const char *path, fmx_log **out, char *err, size_t errsz);
/* Closes; an open transaction is rolled back. Accepts NULL. */
void fmx_log_close(fmx_log *log);
/* Text of the last failure on this handle ("" after a success). Borrowed,
 * valid until the next call on log; a static string for NULL. */
const char *fmx_log_errmsg(const fmx_log *log);

/* Every function below returns 0 or a negative FMX_E… code: FMX_EINVAL for
 * a NULL handle or argument, or a record the schema refuses (unknown
 * episode, duplicate step idx, …); FMX_EIO for an SQLite failure;
 * fmx_log_errmsg has the detail. Outside fmx_log_begin/commit each call is
 * its own transaction, durable when it returns. Strings are only read during
 * the call. */

/* Tasks and policies are upserted; ids are stable. target_loc, module and cls
 * may be 0/NULL (unknown). */
int fmx_log_task(fmx_log *log, const char *task_id, const char *kind, const char *pack,
                 const char *module, const char *cls, int64_t target_loc);
int fmx_log_policy(fmx_log *log, const char *name, int64_t *policy_id);

/* Episodes. Status: "open", "submitted", "truncated", "aborted", "closed".
 * begin: status "open", started_at now; the task and policy must exist.
 * end: only an open episode (FMX_ENOTFOUND if there is none with that id,
 * FMX_EINVAL if it already ended); sets status, ended_at (now), reward. */
int fmx_log_episode_begin(fmx_log *log, const char *task_id, int64_t policy_id, int64_t seed,
                          int64_t *episode_id);
int fmx_log_episode_end(fmx_log *log, int64_t episode_id, const char *status, double reward);
/* Marks every episode still "open" as "aborted", ended_at now, reward left
 * NULL (server start and shutdown). n_aborted may be NULL. */
int fmx_log_abort_open(fmx_log *log, int64_t *n_aborted);

/* Writes are grouped: begin, any number of steps/submissions/episode
 * changes, then commit. commit makes them durable (synchronous=FULL).
 * begin takes the write lock (waiting up to 5 s for another writer) and fails
 * with FMX_EINVAL if a transaction is already open. A failed step or
 * submission leaves the transaction open with the earlier writes in it. A
 * failed commit rolls the whole batch back: nothing of it is stored and no
 * transaction is open. rollback with no transaction open does nothing. */
int fmx_log_begin(fmx_log *log);
/* Inserts the step and adds one to its episode's `steps`. Its JSON fields
 * (args, observation) are stored once per distinct text (log.c). No
 * allocation: the record's strings are bound in place. NULL is allowed only
 * for fields whose sql_type allows it (error). */
int fmx_log_step(fmx_log *log, const fmx_step_record *step);
/* created_at is now. submission_id may be NULL. */
int fmx_log_submission(fmx_log *log, const fmx_submission_record *sub, int64_t *submission_id);
int fmx_log_commit(fmx_log *log);
int fmx_log_rollback(fmx_log *log);

/* Appends every episode of the log at src_path to log, in one transaction:
 * tasks and policies by name, episodes and submissions under new ids (in
 * their order), their steps and fmx regrade's grades. The source is opened
 * read-only and may be at any schema version this fmx reads. *episodes (may
 * be NULL) gets how many were added. Open episodes stay open (a server that
 * opens the merged log aborts them). FMX_EFORMAT for a source that is not an
 * fmx log. */
int fmx_log_merge(fmx_log *log, const char *src_path, int64_t *episodes);

/* The step field list as JSON: [{"name":..,"type":"int|float|str|json","doc":..}, ...]
 * in FMX_STEP_FIELDS order. Static string, never freed; thread-safe. */
const char *fmx_log_step_fields_json(void);

#ifdef __cplusplus
}
#endif

#endif
