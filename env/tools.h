/*
 * tools.h — the seven tools of an episode (the action space, DESIGN.md):
 *
 *   read_module_source(path, mode="full"|"live")   class source, bases, called functions
 *   get_weight_info(path)                          names, shapes, dtypes, ties, buffers
 *   capture_intermediate(path, probe, call=0, values=false)   visible probes only
 *   trace_ops(path)                                the module's op trace (probe 0)
 *   verify_component(path, code, entry="forward")  compile + grade on visible probes
 *   submit(code, entry="forward")                  grade on every probe, hidden too
 *   finish()                                       end: the episode grades its last verified
 *                                                  code (env/episode.c)
 *
 * `path` defaults to the task's module everywhere; any module path of the
 * pack is accepted. Each tool returns an observation, a cJSON object
 * {tool, text, data, error?}: text is what an LLM reads, data the same content
 * structured, error a short code when the action was refused:
 *   unknown_tool, bad_args, unknown_path, hidden_probe, out_of_range,
 *   code_too_long.
 * A refused action never ends an episode. Hidden probes never reach an
 * observation before submit, and submit reports them only as pass/fail.
 *
 * Tools are pure functions of (task, arguments): episode state (budget, last
 * verified code) lives in env/episode.c. verify_component and submit run the
 * candidate (fmx_verify) and are "heavy": the server runs them on worker
 * threads; the others are cheap and run inline. Tools only read the pack, so
 * any number may run at once on packs opened by fmx_tasks_open.
 *
 * Not here: the protocol (env/server.c), reward arithmetic (rewards/).
 */
#ifndef FMX_TOOLS_H
#define FMX_TOOLS_H

#include <stddef.h>

#include "rewards/reward.h"
#include "tasks.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What a tool runs against. All borrowed. */
typedef struct {
    const fmx_task *task;
    const fmx_reward_config *reward;
    size_t max_code_bytes; /* code longer than this is refused (code_too_long) */
} fmx_tool_ctx;

/* A graded submission (submit, or a truncated episode's last verified code). */
typedef struct {
    int graded_probes; /* probes on which the task's module was called */
    int passed_probes; /* … on which every call of it matched */
    fmx_grade_facts facts;
    fmx_reward_breakdown score;
    char breakdown[4096]; /* fmx_reward_breakdown_json */
    cJSON *summary;       /* owned: {correctness, probes:[{probe, visible, pass}], loc, …} */
    char *text;           /* owned: the summary for people/LLMs */
} fmx_grade;

void fmx_grade_clear(fmx_grade *g); /* frees summary and text; accepts NULL */

typedef struct {
    cJSON *observation;     /* owned until fmx_tool_result_clear (or taken: set NULL) */
    const char *error;      /* borrowed from observation: refusal code, or NULL */
    int verified_task_code; /* verify_component compiled code for the task's module */
    int submitted;          /* submit graded the code: grade is set, the episode ends */
    fmx_grade grade;
} fmx_tool_result;

void fmx_tool_result_clear(fmx_tool_result *r); /* accepts NULL */

/* 1 if tool runs candidate code (verify_component, submit). */
int fmx_tools_is_heavy(const char *tool);
/* 1 if tool is one of the seven. */
int fmx_tools_exists(const char *tool);

/* Runs tool with args (a cJSON object, or NULL for none). Always fills out
 * with an observation unless out of memory (FMX_ENOMEM); returns FMX_OK
 * also when the action was refused (out->error says so). */
int fmx_tools_run(const fmx_tool_ctx *ctx, const char *tool, const cJSON *args,
                  fmx_tool_result *out);

/* Grades code as submit does: every probe, hidden included, for the task's
 * module; correctness, LOC, compile facts, reward. Clear with
 * fmx_grade_clear. Returns FMX_OK (a failing candidate is a graded result,
 * not an error) or FMX_ENOMEM. */
int fmx_tools_grade(const fmx_tool_ctx *ctx, const char *code, size_t len, const char *entry,
                    fmx_grade *out);

/* The tools as OpenAI function-calling schemas: [{"type": "function",
 * "function": {name, description, parameters}}]. Caller frees. */
cJSON *fmx_tools_spec(void);
/* The same in OpenAI's strict mode: "strict": true, `required` lists every
 * property, the optional ones are nullable (null = the default) and enums
 * hold null too. Caller frees. */
cJSON *fmx_tools_spec_strict(void);

/* The system prompt an LLM policy is given (policies/llm.c sends it; spec
 * publishes it as system_prompt): the candidate language, the reward, the
 * tools. Static. */
const char *fmx_tools_system_prompt(void);

/* One line per tool ("name(args) — what it returns"), for goal texts. Static. */
const char *fmx_tools_summary(void);

#ifdef __cplusplus
}
#endif

#endif
