/*
 * fuzz_proto.c — libFuzzer harness for everything a client's bytes reach in
 * `fmx serve` before a worker runs candidate code, without sockets:
 *
 *   fmx_proto_validate → fmx_proto_decode → (every decoded map) encode it
 *   back with fmx_proto_encode, which must validate and decode again;
 *   then, built with -DFMX_FUZZ_EPISODE and FMX_FUZZ_TASKS=DIR (packs):
 *     op "reset": the server's field rules (task id string, integer seed,
 *       policy string <= 256 bytes), fmx_episode_create on that task (or
 *       round robin), the goal and info, encoded as the reply would be;
 *     op "step":  action {"tool": STR, "args": ANY}, fmx_episode_plan, and
 *       for the cheap tools fmx_episode_execute + fmx_episode_apply on the
 *       real pack (argument checking, paths, probes, calls, values);
 *       verify_component and submit are planned and their arguments checked
 *       with a code budget of 0 bytes (code_too_long), so no candidate code
 *       is compiled: that is the engine's job, and a worker's.
 * Invariants checked (abort → a crash libFuzzer reports): a validated
 * message decodes; a decoded map re-encodes into a message that validates
 * and decodes; every step yields an observation with a text.
 *
 * Not here: server.c's own request loop (static; the field rules above
 * mirror it), ZeroMQ, SQLite, workers. fuzz/run.sh builds and runs it.
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto.h"
#include "status.h"

#ifdef FMX_FUZZ_EPISODE
#include "episode.h"
#include "tasks.h"

static fmx_tasks *g_tasks;
static fmx_reward_config g_reward;
static int g_next_task;
#endif

#define FMX_FUZZ_CHECK(cond)                                                                       \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_proto: invariant failed: %s (%s:%d)\n", #cond, __FILE__,         \
                    __LINE__);                                                                     \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
#ifdef FMX_FUZZ_EPISODE
    const char *dir = getenv("FMX_FUZZ_TASKS");
    char err[1024];
    if (!dir || fmx_tasks_open(dir, &g_tasks, stderr, err, sizeof err) != FMX_OK) {
        fprintf(stderr, "fuzz_proto: FMX_FUZZ_TASKS must name a directory of packs (%s)\n",
                dir ? err : "unset");
        exit(2);
    }
    g_reward = fmx_reward_config_default();
#endif
    return 0;
}

/* The server's integer rule (fmx__get_int): absent is fine, else a whole
 * number within int64. */
static int get_int(const cJSON *obj, const char *name, int64_t *out, int *present) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);
    *present = v != NULL;
    if (!v) return 1;
    if (!cJSON_IsNumber(v) || !(fabs(v->valuedouble) < 9e18) ||
        v->valuedouble != (double)(int64_t)v->valuedouble)
        return 0;
    *out = (int64_t)v->valuedouble;
    return 1;
}

/* Encodes obj as a reply (with req when given) and checks the bytes decode. */
static void round_trip(const cJSON *obj, const uint64_t *req) {
    char *buf = NULL;
    size_t len = 0;
    if (fmx_proto_encode(obj, req, &buf, &len) != FMX_OK) return; /* out of memory */
    char err[256];
    cJSON *again = NULL;
    uint64_t req2 = 0;
    int has_req2 = 0;
    int rc = fmx_proto_decode(buf, len, &again, &req2, &has_req2, err, sizeof err);
    /* Replies are not held to the request caps (a goal text may be long), but
     * a re-encoded request is: it has the same strings, depth and counts. */
    if (rc == FMX_EFORMAT && len > FMX_PROTO_MAX_MESSAGE) rc = FMX_OK;
    if (rc != FMX_OK) fprintf(stderr, "fuzz_proto: re-encoded message refused: %s\n", err);
    FMX_FUZZ_CHECK(rc == FMX_OK || rc == FMX_ENOMEM);
    if (again && req) FMX_FUZZ_CHECK(has_req2 && req2 == *req);
    cJSON_Delete(again);
    free(buf);
}

#ifdef FMX_FUZZ_EPISODE
static void do_reset(const cJSON *body) {
    const cJSON *jt = cJSON_GetObjectItemCaseSensitive(body, "task");
    const cJSON *jp = cJSON_GetObjectItemCaseSensitive(body, "policy");
    int64_t seed = 0;
    int has_seed;
    if (!get_int(body, "seed", &seed, &has_seed)) return;
    if (jt && !cJSON_IsString(jt) && !cJSON_IsNull(jt)) return;
    if (jp && !cJSON_IsString(jp) && !cJSON_IsNull(jp)) return;
    const char *policy = cJSON_IsString(jp) && jp->valuestring[0] ? jp->valuestring : "anonymous";
    if (strlen(policy) > 256) return;
    const fmx_task *task;
    if (cJSON_IsString(jt)) {
        task = fmx_tasks_find(g_tasks, jt->valuestring);
        if (!task) return;
    } else {
        task = fmx_tasks_get(g_tasks, g_next_task);
        g_next_task = (g_next_task + 1) % fmx_tasks_count(g_tasks);
    }
    fmx_episode *ep = fmx_episode_create(1, task, policy, seed, "client", 6, fmx_budget_default(),
                                         &g_reward);
    if (!ep) return;
    cJSON *reply = cJSON_CreateObject();
    cJSON_AddItemToObject(reply, "observation", fmx_episode_goal(ep));
    cJSON_AddItemToObject(reply, "info", fmx_episode_info(ep));
    uint64_t req = 7;
    round_trip(reply, &req);
    cJSON_Delete(reply);
    fmx_episode_destroy(ep);
}

static void do_step(const cJSON *body) {
    int64_t id = 0;
    int present;
    if (!get_int(body, "episode", &id, &present) || !present) return;
    const cJSON *action = cJSON_GetObjectItemCaseSensitive(body, "action");
    const cJSON *tool = cJSON_GetObjectItemCaseSensitive(action, "tool");
    const cJSON *args = cJSON_GetObjectItemCaseSensitive(action, "args");
    if (!cJSON_IsObject(action) || !cJSON_IsString(tool)) return;
    int n = fmx_tasks_count(g_tasks);
    const fmx_task *task = fmx_tasks_get(g_tasks, (int)((uint64_t)id % (uint64_t)n));
    fmx_budget budget = fmx_budget_default();
    fmx_episode *ep =
        fmx_episode_create(id, task, "fuzz", 0, "client", 6, budget, &g_reward);
    if (!ep) return;
    fmx_step_plan plan;
    if (fmx_episode_plan(ep, tool->valuestring, args, &plan) != FMX_OK) {
        fmx_episode_destroy(ep);
        return;
    }
    FMX_FUZZ_CHECK(!plan.final && !plan.fallback_code); /* a fresh episode */
    int run = 1;
    if (plan.heavy) {
        /* Argument checks only: code must be refused as too long before
         * anything compiles it, so it must be a non-empty string here. */
        const cJSON *code = cJSON_GetObjectItemCaseSensitive(plan.args, "code");
        plan.ctx.max_code_bytes = 0;
        run = !cJSON_IsString(code) || code->valuestring[0] != '\0';
    }
    if (run) {
        fmx_step_outcome out;
        if (fmx_episode_execute(&plan, &out) == FMX_OK) {
            FMX_FUZZ_CHECK(out.tool.observation != NULL);
            FMX_FUZZ_CHECK(!out.tool.submitted); /* nothing was graded */
            fmx_step_result res;
            if (fmx_episode_apply(ep, &plan, &out, &res) == FMX_OK) {
                const cJSON *text = cJSON_GetObjectItemCaseSensitive(res.observation, "text");
                FMX_FUZZ_CHECK(cJSON_IsString(text));
                cJSON *reply = cJSON_CreateObject();
                cJSON_AddItemToObject(reply, "observation", res.observation);
                cJSON_AddItemToObject(reply, "info", res.info);
                res.observation = res.info = NULL;
                round_trip(reply, NULL);
                cJSON_Delete(reply);
                fmx_step_result_clear(&res);
            }
            fmx_step_outcome_clear(&out);
        }
    }
    fmx_step_plan_clear(&plan);
    fmx_episode_destroy(ep);
}
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[256];
    int valid = fmx_proto_validate(data, size, err, sizeof err);
    cJSON *body = NULL;
    uint64_t req = 0;
    int has_req = 0;
    int rc = fmx_proto_decode(data, size, &body, &req, &has_req, err, sizeof err);
    /* decode validates first: the two agree, and a valid message decodes */
    FMX_FUZZ_CHECK((valid == FMX_OK) == (rc == FMX_OK || rc == FMX_ENOMEM));
    if (rc != FMX_OK) return 0;
    FMX_FUZZ_CHECK(cJSON_IsObject(body));
    round_trip(body, has_req ? &req : NULL);
#ifdef FMX_FUZZ_EPISODE
    const char *op = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(body, "op"));
    if (op && strcmp(op, "reset") == 0) do_reset(body);
    if (op && strcmp(op, "step") == 0) do_step(body);
#endif
    cJSON_Delete(body);
    return 0;
}
