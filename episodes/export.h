/*
 * export.h — episodes as training data: `fmx episodes export` writes one
 * JSON line per episode of the log, in OpenAI chat format, so a trainer can
 * fine-tune on (or filter by reward) what policies did.
 *
 * One line, always the same keys (null where an episode has no value):
 *   {"messages": [
 *      {"role": "system", "content": GOAL},            the reset observation's text
 *      {"role": "user", "content": REQUEST},           "Task ID: write the flat …"
 *      {"role": "assistant", "content": null,
 *       "tool_calls": [{"id": "call_E_I", "type": "function",
 *                       "function": {"name": TOOL, "arguments": ARGS}}]},
 *      {"role": "tool", "tool_call_id": "call_E_I", "name": TOOL,
 *       "content": OBSERVATION_TEXT},
 *      … one assistant/tool pair per logged step, in order …],
 * ARGS is the arguments as a JSON string (OpenAI's format), or with
 * arguments_object as an object (what TRL's and transformers' chat templates
 * take). Calls to tools that do not exist are left out, and so are episodes
 * left with no step, unless keep_invalid.
 *    "tools": [...],          the tool schemas (the protocol's spec.tools)
 *    "episode": ID, "task": ID, "policy": NAME, "status": S, "steps": N,
 *    "reward": R|null,        episodes.reward
 *    "reward_version": V|null, "breakdown": {...}|null   the last graded submission
 *    "goal_source": "pack"|"log"}
 *
 * The reset observation is not in the log (it is the same for every episode
 * of a task, budget and reward config). With --tasks DIR the goal is rebuilt
 * exactly as the server wrote it (fmx_episode_goal: the pack, the reward
 * weights named by the episode's breakdown, the step budget: the episode's
 * step count if it was truncated, else --max-steps or the default);
 * goal_source is "pack". Without packs (goal_from_log) it is the goal's
 * first paragraph and the tool list, from the log's task row; goal_source
 * is "log". `fmx episodes export` refuses to write that weaker goal unless
 * asked (--goal-from-log).
 *
 * Not here: the schema (episodes/log.c), the goal text (env/episode.c).
 */
#ifndef FMX_EXPORT_H
#define FMX_EXPORT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Which episodes: NULL / NAN fields do not filter. */
typedef struct {
    const char *policy;
    const char *task;
    const char *status;
    double min_reward; /* NAN: any (an episode without reward passes only when NAN) */
} fmx_export_filter;

fmx_export_filter fmx_export_filter_default(void);

/* Parses "policy=NAME,task=ID,status=S,min_reward=X" into f (values point
 * into spec, which is modified). FMX_EINVAL with err for an unknown key or a
 * bad number. */
int fmx_export_filter_parse(char *spec, fmx_export_filter *f, char *err, size_t errsz);

/* How lines are written. */
typedef struct {
    const char *tasks_dir; /* the packs (goals as the server wrote them); NULL: from the log */
    int max_steps;         /* the server's budget (0: the default) */
    int arguments_object;  /* tool call arguments as an object, not a JSON string */
    int keep_invalid;      /* keep calls to unknown tools and episodes with no step */
} fmx_export_options;

/* What was left out (keep_invalid 0). */
typedef struct {
    int64_t lines, dropped_calls, dropped_episodes;
} fmx_export_counts;

/* Writes the JSONL of the episodes of db_path that pass f to out. FMX_OK or
 * an error with err set; counts says what was written and left out. */
int fmx_export_jsonl(const char *db_path, const fmx_export_filter *f, const fmx_export_options *opt,
                     FILE *out, fmx_export_counts *counts, char *err, size_t errsz);

/* `fmx episodes export ...` (argv[0] is "episodes"). */
int fmx_episodes_main(int argc, char **argv);

#ifdef __cplusplus
}
#endif

#endif
