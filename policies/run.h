/*
 * run.h — built-in policies and `fmx run`, which plays them against a
 * server and prints the leaderboard.
 *
 *   oracle  reads each tool once (read_module_source, get_weight_info,
 *           capture_intermediate on probe p0, trace_ops), verifies the
 *           example's reference solution with verify_component and submits
 *           it (policies/oracle.c): what the hand-written reference earns;
 *   null    submits a function that computes nothing (policies/null.c):
 *           reward 0, the floor;
 *   tracer  writes the code from the op traces alone, no LLM
 *           (python/fmx/tracer.py, run per episode by policies/tracer.c);
 *   llm     any OpenAI-compatible chat endpoint (policies/llm.c).
 *
 * A policy plays one episode of one task through a C client (client.h) and
 * says how it went. `fmx run` starts `fmx serve` itself (its own binary, on
 * an ipc:// socket in a temporary directory) unless given --connect, plays
 * N episodes of each policy on every task, and prints the leaderboard of
 * the log (episodes/leaderboard.h). Exit status 0 when every episode ended,
 * 1 when the oracle did not pass a task, 2 on errors.
 *
 * Not here: the server (env/), the table (episodes/leaderboard.c).
 */
#ifndef FMX_RUN_H
#define FMX_RUN_H

#include <stddef.h>
#include <stdint.h>

#include "client.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Where a policy finds what it needs. All borrowed; any may be NULL. */
typedef struct {
    const char *tasks_dir;     /* the server's --tasks DIR: packs' task.json (source spec) */
    const char *solutions_dir; /* reference solutions: NAME.py + NAME.entries.json */
    const char *addr;          /* the server's address (a policy that runs its own client) */
} fmx_policy_ctx;

/* How an episode went. */
typedef struct {
    int64_t episode;
    double reward;
    double correctness; /* of the graded code; -1 when nothing was graded */
    int steps;          /* steps taken */
    int terminated, truncated;
    int verified; /* oracle: verify_component matched on every visible probe */
} fmx_episode_result;

/* Plays one episode of task (a list_tasks entry) with seed, under the
 * policy name `name` (logged by the server). Returns FMX_OK when the episode
 * ended (submitted or truncated; a low reward is not an error), else a
 * negative code with the reason in err; an episode left open is closed. */
typedef int (*fmx_policy_fn)(fmx_client *c, const char *name, const cJSON *task, int64_t seed,
                             const fmx_policy_ctx *ctx, fmx_episode_result *res, char *err,
                             size_t errsz);

/* Starts a policy's episode: res zeroed with correctness -1 (nothing graded
 * yet). Returns the task's id (borrowed from task), or NULL with err set when
 * the list_tasks entry has none. */
const char *fmx_policy_begin(const cJSON *task, fmx_episode_result *res, char *err, size_t errsz);

int fmx_policy_oracle(fmx_client *c, const char *name, const cJSON *task, int64_t seed,
                      const fmx_policy_ctx *ctx, fmx_episode_result *res, char *err, size_t errsz);
/* policies/tracer.c: runs python/fmx/tracer.py for the episode (it connects to ctx->addr). */
int fmx_policy_tracer(fmx_client *c, const char *name, const cJSON *task, int64_t seed,
                      const fmx_policy_ctx *ctx, fmx_episode_result *res, char *err, size_t errsz);
int fmx_policy_null(fmx_client *c, const char *name, const cJSON *task, int64_t seed,
                    const fmx_policy_ctx *ctx, fmx_episode_result *res, char *err, size_t errsz);

/* The oracle's reference solution for a task: the source file trimmed to
 * what the entry function needs (other functions and constants dropped, so
 * its LOC is the task's own) and the entry's name. Found from the pack's
 * source spec (task.json "source.spec" FILE.py:NAME → the solutions folder
 * beside FILE's folder, FILE's stem) or, without the pack, from the pack
 * name; solutions_dir, when given, is searched first. *code and *entry are
 * the caller's (free()). FMX_ENOTFOUND with the reason in err when there is
 * no solution or no entry for the task's class. */
int fmx_oracle_solution(const fmx_policy_ctx *ctx, const cJSON *task, char **code, char **entry,
                        char *err, size_t errsz);

/* Trims Python source to the top-level functions and constants the entry
 * function reaches by name, plus imports; docstrings, other definitions and
 * an `if __name__ == "__main__":` block are dropped. Caller frees; NULL when
 * out of memory. */
char *fmx_oracle_trim(const char *src, const char *entry);

/* `fmx run ARGS` (argv[0] is "run"). */
int fmx_run_main(int argc, char **argv);

#ifdef __cplusplus
}
#endif

#endif
