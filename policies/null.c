/*
 * null.c — the null policy (run.h): submits at once a function that
 * computes nothing. It compiles in the candidate language but returns no
 * tensor of the module, so every probe fails and the reward is 0: the floor
 * of a leaderboard, and a check that the grader gives nothing for nothing.
 */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>

#include "env/status.h"
#include "run.h"

static const char fmx__null_code[] = "def forward() -> int:\n    return 0\n";

int fmx_policy_null(fmx_client *c, const char *name, const cJSON *task, int64_t seed,
                    const fmx_policy_ctx *ctx, fmx_episode_result *res, char *err, size_t errsz) {
    (void)ctx;
    const char *id = fmx_policy_begin(task, res, err, errsz);
    if (!id) return FMX_EINVAL;
    int rc = fmx_client_reset(c, id, name, seed, &res->episode, NULL);
    if (rc != FMX_OK) {
        snprintf(err, errsz, "reset %s: %s: %s", id, fmx_client_errcode(c), fmx_client_errmsg(c));
        return rc;
    }
    cJSON *args = cJSON_CreateObject();
    cJSON_AddStringToObject(args, "code", fmx__null_code);
    cJSON *r = NULL;
    rc = fmx_client_step(c, res->episode, "submit", args, &r);
    cJSON_Delete(args);
    if (rc != FMX_OK) {
        snprintf(err, errsz, "submit: %s: %s", fmx_client_errcode(c), fmx_client_errmsg(c));
        fmx_client_close_episode(c, res->episode);
        return rc;
    }
    res->steps = 1;
    res->terminated = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "terminated"));
    res->truncated = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "truncated"));
    const cJSON *reward = cJSON_GetObjectItemCaseSensitive(r, "reward");
    res->reward = cJSON_IsNumber(reward) ? reward->valuedouble : 0;
    const cJSON *grade =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(r, "info"), "grade");
    const cJSON *corr = cJSON_GetObjectItemCaseSensitive(grade, "correctness");
    if (cJSON_IsNumber(corr)) res->correctness = corr->valuedouble;
    cJSON_Delete(r);
    return FMX_OK;
}
