/*
 * replay.h — reading one episode back from the log, and the two commands
 * that re-run what the log recorded:
 *
 *   fmx replay --db DB EPISODE [--tasks DIR]   prints the transcript, then
 *       re-executes every action against the pack with the server's own
 *       step functions (fmx_episode_plan/execute/apply, env/episode.h) and
 *       names every step whose observation differs from the logged one;
 *   fmx regrade --db DB [--reward FILE]        rescores every stored
 *       submission under another reward config (from the stored facts, or
 *       with --rerun by grading the code again) into the `grades` table.
 *
 * The log does not record where the packs were (the server's --tasks DIR),
 * nor the budget or the reward config; replay takes the packs from --tasks,
 * the reward weights and version from the episode's stored breakdown (or
 * --reward), and the step budget from the episode (its step count when it
 * was truncated, else the default). Candidate code runs in this process
 * (TorchScript, as in `fmx verify`), not in a sandboxed worker.
 *
 * The `grades` table belongs to regrade (created here with CREATE TABLE IF
 * NOT EXISTS; the server never reads it): one row per (submission, reward
 * version, rerun); the submissions table keeps the grades the server gave.
 *
 * Not here: the schema of the server's tables (episodes/log.c), what a step
 * does (env/episode.c, env/tools.c), the reward formula (rewards/).
 */
#ifndef FMX_REPLAY_H
#define FMX_REPLAY_H

#include <cjson/cJSON.h>
#include <sqlite3.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "episodes/log.h"
#include "rewards/reward.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One episode as the log holds it. Plain data: every string is owned by the
 * transcript (NULL where the log has NULL) and freed by
 * fmx_transcript_free. */
typedef struct {
    int64_t id;
    const char *task, *kind, *pack, *module, *cls; /* task row; NULLs if missing */
    int64_t target_loc;                            /* 0 when unknown */
    const char *policy, *status;
    int64_t seed;
    double started_at, ended_at; /* unix time; ended_at 0 while open */
    int has_reward;              /* episodes.reward is not NULL */
    double reward;
    int nsteps;
    fmx_step_record *steps; /* in idx order, read through FMX_STEP_FIELDS */
    /* The episode's last graded submission (has_submission 0: none). */
    int has_submission;
    int64_t submission_id;
    const char *code, *entry, *reward_version, *breakdown;
    double correctness, loc_score, compile_score, sub_reward;
    int64_t loc;
    int sub_truncated;
    /* private */
    char **strings_;
    int nstrings_;
} fmx_transcript;

/* Reads episode id from db (any connection; read-only use). FMX_ENOTFOUND
 * when there is no such episode, FMX_EFORMAT when db is not an fmx log,
 * FMX_EIO/FMX_ENOMEM otherwise; err says why. *out is the caller's, freed
 * with fmx_transcript_free. */
int fmx_transcript_load(sqlite3 *db, int64_t id, fmx_transcript **out, char *err, size_t errsz);
void fmx_transcript_free(fmx_transcript *t); /* accepts NULL */

/* Opens db_path read-only with a busy timeout (a server may be writing).
 * FMX_EIO with err on failure; *out is closed with sqlite3_close. */
int fmx_replay_open_db(const char *db_path, int readonly, sqlite3 **out, char *err, size_t errsz);

/* The reward config a stored breakdown JSON names (version and weights);
 * FMX_EFORMAT when it has neither. */
int fmx_replay_reward_of(const char *breakdown_json, fmx_reward_config *cfg);

/* Compares a logged observation (JSON text) with a replayed one: tool and
 * error exactly; data recursively, numbers equal within a few ulps, the
 * timing keys "ms" and "*_ms" ignored; text with every "<number> ms"
 * treated as equal. Writes up to max_diffs lines "PATH: logged A, replayed
 * B" to diffs (may be NULL) and returns how many differences there were
 * (0: the same; -1: the logged text is not JSON). */
int fmx_replay_compare(const char *logged_json, const cJSON *replayed, FILE *diffs, int max_diffs);

/* `fmx replay ...` and `fmx regrade ...` (argv[0] is the command name).
 * replay exits 0 when every step replayed the same, 1 on a divergence, 2 on
 * errors; regrade 0 or 2. */
int fmx_replay_main(int argc, char **argv);
int fmx_regrade_main(int argc, char **argv);

#ifdef __cplusplus
}
#endif

#endif
