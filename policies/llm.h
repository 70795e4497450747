/*
 * llm.h — the `llm` policy: an LLM behind any OpenAI-compatible chat
 * endpoint (POST {base_url}/chat/completions with tools) plays episodes.
 *
 * Per episode: the server's `spec` tools go to the model as they are; the
 * conversation starts with a system message (what fmx wants: a flat
 * functional file in the candidate language) and the reset observation (the
 * goal) as the user message. Each tool call of an assistant reply becomes a
 * `step` {tool, args}; its observation text goes back as a tool message with
 * the call's id. A call that cannot be an action (unknown tool, arguments
 * that are not a JSON object, no name) gets an error tool message instead and
 * costs no step. The episode ends when the server ends it (submit, step
 * budget), when the model answers without tool calls (a ```python block in
 * the answer is submitted; otherwise it is nudged once, then the policy
 * gives up), or when the token budget (sum of usage.total_tokens, estimated
 * as bytes / 4 when the endpoint reports none) is spent. Giving up submits
 * the last code verify_component matched (else the last it compiled) for the
 * task's module, or closes the episode (logged as aborted) when there is
 * none. An endpoint that cannot be reached or refuses the request (after
 * retries with backoff on 429, 5xx and transport errors; none on other 4xx)
 * ends the episode the same way, closed, and the policy returns an error.
 *
 * What the server's log lacks — the assistant's text, token usage per turn,
 * the messages as the model saw them — goes to a JSON transcript per episode
 * in transcripts_dir (episode-ID.json; protocol 1 has no field for it): each
 * turn lists its tool calls with the server's step index (the `steps.idx`
 * of the log) so that the two join.
 *
 * Not here: HTTP beyond one POST (libcurl), the server, `fmx run` (run.c).
 */
#ifndef FMX_LLM_H
#define FMX_LLM_H

#include <stddef.h>
#include <stdint.h>

#include "run.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The endpoint and the limits. Strings are borrowed by
 * fmx_llm_config_default's caller and copied by fmx_llm_configure. */
typedef struct {
    const char *base_url;        /* e.g. http://127.0.0.1:8000/v1 (required) */
    const char *model;           /* the request's "model" (required) */
    const char *api_key_env;     /* env var holding the key; unset/empty: no header */
    int max_tokens;              /* per reply ("max_tokens"); 0: not sent */
    int64_t token_budget;        /* per episode, total tokens; 0: unlimited */
    double temperature;          /* < 0: not sent */
    int timeout_s;               /* one HTTP request, connect included */
    int retries;                 /* after the first try, on 429/5xx/transport errors */
    int backoff_ms;              /* first wait; doubled each retry, at most 30 s */
    const char *transcripts_dir; /* NULL: no transcripts */
} fmx_llm_config;

/* OPENAI_API_KEY, 4096 tokens a reply, 200,000 an episode, temperature not
 * sent, 300 s, 4 retries from 1 s; no URL, model or transcripts. */
fmx_llm_config fmx_llm_config_default(void);

/* Sets the configuration every later fmx_policy_llm call uses (copied; the
 * process has one: call it before episodes start, not while they run).
 * FMX_EINVAL with the reason in err when the URL or model is missing. */
int fmx_llm_configure(const fmx_llm_config *cfg, char *err, size_t errsz);

/* The policy (run.h's fmx_policy_fn). The episode is logged under the
 * policy name "NAME:MODEL". */
int fmx_policy_llm(fmx_client *c, const char *name, const cJSON *task, int64_t seed,
                   const fmx_policy_ctx *ctx, fmx_episode_result *res, char *err, size_t errsz);

/* The code of the last ```python (or ```py) block of text, else of the last
 * bare ``` block that defines a function; NULL when none. Caller frees. */
char *fmx_llm_code_block(const char *text);

#ifdef __cplusplus
}
#endif

#endif
