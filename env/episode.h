/*
 * episode.h — one episode's state and its step rules: the goal given at
 * reset, the budget (steps, code size), which steps need a worker, what ends
 * an episode (submit, or the last step of the budget) and the reward.
 *
 * A step goes through three calls, so that the expensive middle one can run
 * on a worker thread while the episode itself is touched only by the
 * server's main thread:
 *   fmx_episode_plan     (main)   counts nothing yet; says whether the step is
 *                                 heavy and snapshots what a worker needs;
 *   fmx_episode_execute  (any)    runs the tool, and on the budget's last step
 *                                 grades the last verified code (truncation);
 *                                 reads only the plan, never the episode;
 *   fmx_episode_apply    (main)   counts the step, updates the state, and
 *                                 yields the step result and what to log.
 *
 * Truncation: when a step uses the last of max_steps without submitting, the
 * episode is truncated and graded as if the last code that verify_component
 * compiled FOR THE TASK'S MODULE had been submitted (this very step's code
 * included); with no such code the reward is 0. The observation says so.
 *
 * finish: the `finish` tool (or a close with grade) ends the episode the
 * same way at once: the last verified code is graded as if submitted
 * (status submitted, terminated), or, with none, it ends closed with reward 0.
 *
 * Observations are capped before they are logged or sent: a step's data at
 * the budget's max_observation bytes of compact JSON (FMX_OBS_DATA_MAX by
 * default) and its text at an eighth of that (fmx_observation_cap), with a
 * note saying what was cut.
 *
 * Not here: sockets, ordering of steps, logging, idle episodes
 * (env/server.c); the tools themselves (env/tools.c).
 */
#ifndef FMX_EPISODE_H
#define FMX_EPISODE_H

#include <stddef.h>
#include <stdint.h>

#include "tasks.h"
#include "tools.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int max_steps;          /* 40 */
    size_t max_code_bytes;  /* 65,536 */
    size_t max_observation; /* bytes of a step observation's data as JSON; its text gets an
                               eighth of it; 0 = FMX_OBS_DATA_MAX */
} fmx_budget;

fmx_budget fmx_budget_default(void);

typedef enum {
    FMX_EP_OPEN,
    FMX_EP_SUBMITTED,
    FMX_EP_TRUNCATED,
    FMX_EP_ABORTED,
    FMX_EP_CLOSED
} fmx_episode_status;

/* "open", "submitted", ... (the log's status names). Static. */
const char *fmx_episode_status_name(fmx_episode_status s);

typedef struct fmx_episode fmx_episode;

/* A new open episode of task, bound to the client identity (bytes copied).
 * task and reward are borrowed and must outlive it. NULL when out of
 * memory. Caller frees with fmx_episode_destroy. */
fmx_episode *fmx_episode_create(int64_t id, const fmx_task *task, const char *policy, int64_t seed,
                                const void *client, size_t client_len, fmx_budget budget,
                                const fmx_reward_config *reward);
void fmx_episode_destroy(fmx_episode *ep); /* accepts NULL */

int64_t fmx_episode_id(const fmx_episode *ep);
const fmx_task *fmx_episode_task(const fmx_episode *ep);
fmx_episode_status fmx_episode_status_of(const fmx_episode *ep);
int fmx_episode_steps(const fmx_episode *ep);
/* 1 if the identity is the one that opened the episode. */
int fmx_episode_owned_by(const fmx_episode *ep, const void *client, size_t client_len);
/* Marks an open episode aborted (client close, server shutdown). */
void fmx_episode_abort(fmx_episode *ep);

/* The reset observation {tool: "reset", text, data}: the goal, the calling
 * convention with the inputs and outputs of the module's first call on
 * probe 0, the language rules, the tools and the budget. Caller frees. */
cJSON *fmx_episode_goal(const fmx_episode *ep);
/* The reset info: {task: {...}, budget: {max_steps, max_code_bytes}}. Caller frees. */
cJSON *fmx_episode_info(const fmx_episode *ep);

/* What a worker needs for one step; owned copies. Clear with
 * fmx_step_plan_clear. */
typedef struct {
    fmx_tool_ctx ctx;
    char *tool;
    cJSON *args;         /* the action's args (a copy), or NULL */
    int heavy;           /* run on a worker thread */
    int final;           /* this step is the last of the budget */
    int finish;          /* the finish tool: end now, grading the last verified code */
    char *fallback_code; /* the last verified code, for truncation and finish; may be NULL */
    char *fallback_entry;
} fmx_step_plan;

/* Plans a step of an open episode. tool and args are copied. Returns FMX_OK
 * or FMX_ENOMEM. */
int fmx_episode_plan(const fmx_episode *ep, const char *tool, const cJSON *args,
                     fmx_step_plan *plan);
void fmx_step_plan_clear(fmx_step_plan *plan); /* accepts NULL */

typedef struct {
    fmx_tool_result tool;
    int truncated;    /* the budget ran out on this step, or it finished */
    int trunc_graded; /* ... and there was code to grade */
    fmx_grade trunc_grade;
    char *graded_code;  /* the code graded on truncation (owned) */
    char *graded_entry; /* owned */
    double ms;          /* time spent in execute */
} fmx_step_outcome;

/* Runs the planned step. Touches no episode: safe on any thread. Returns
 * FMX_OK or FMX_ENOMEM. */
int fmx_episode_execute(const fmx_step_plan *plan, fmx_step_outcome *out);
void fmx_step_outcome_clear(fmx_step_outcome *out); /* accepts NULL */

/* The default caps on a step's observation (docs/protocol.md, "Observations"). */
#define FMX_OBS_DATA_MAX (1u << 20)             /* bytes of `data` as compact JSON */
#define FMX_OBS_TEXT_MAX (FMX_OBS_DATA_MAX / 8) /* bytes of `text` */

/* Cuts an observation {tool, text, data, ...} to at most text_max bytes of
 * text, keeping its first three quarters and its end (cut at line breaks
 * when one is near, never inside a UTF-8 character), and data_max bytes of
 * data as compact JSON (estimated from above), cut where it is biggest and
 * from the end: a list keeps its leading items (and part of the first that
 * does not fit), a string its head, an object loses from its biggest
 * members; each cut is recorded in data.cut as {path, kept, of, unit
 * ("items"/"bytes"/"member")}. A note in the text, where it was cut (else
 * at its end), says what was cut: the text may pass text_max by the note,
 * a few hundred bytes, and data by data.cut. Returns 1 when something was
 * cut, 0 when the observation fits, FMX_ENOMEM. */
int fmx_observation_cap(cJSON *obs, size_t text_max, size_t data_max);

/* The step as the protocol returns and the log records it. */
typedef struct {
    int64_t idx;        /* step index, from 0 */
    cJSON *observation; /* owned */
    cJSON *info;        /* owned */
    double reward;      /* 0 unless the episode ended on this step */
    int terminated, truncated;
    const char *error; /* refusal code, or NULL (borrowed from observation) */
    /* Set when the step graded code (submit or truncation): */
    int graded;
    const fmx_grade *grade;   /* borrowed from the outcome */
    const char *graded_code;  /* borrowed from the plan or outcome */
    const char *graded_entry; /* borrowed */
} fmx_step_result;

/* Counts the step and applies the outcome to the episode (main thread).
 * Takes the observation out of the outcome; the result borrows the rest of
 * plan and outcome, so clear them after logging. Returns FMX_OK or
 * FMX_ENOMEM. */
int fmx_episode_apply(fmx_episode *ep, const fmx_step_plan *plan, fmx_step_outcome *outcome,
                      fmx_step_result *res);
void fmx_step_result_clear(fmx_step_result *res); /* accepts NULL */

#ifdef __cplusplus
}
#endif

#endif
