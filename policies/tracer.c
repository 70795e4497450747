/*
 * tracer.c — the tracer policy (run.h): the automatic extractor of
 * python/fmx/tracer.py, played as one of `fmx run`'s policies. Each episode
 * runs `python3 -m fmx.tracer --connect ADDR --task ID --seed S --policy NAME`
 * (fmx_python_run), which opens the episode on the same server, reads the
 * op traces, writes, verifies and submits the code, and prints one JSON line
 * with the episode's result; this file turns that line into the episode's
 * fmx_episode_result. The tracer is a client of the server like any trainer's
 * policy, so everything it did is in the episode log.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "env/pyexec.h"
#include "env/status.h"
#include "run.h"

static double fmx__num(const cJSON *o, const char *key, double dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : dflt;
}

int fmx_policy_tracer(fmx_client *c, const char *name, const cJSON *task, int64_t seed,
                      const fmx_policy_ctx *ctx, fmx_episode_result *res, char *err, size_t errsz) {
    (void)c; /* the tracer opens its own connection */
    const char *id = fmx_policy_begin(task, res, err, errsz);
    if (!id) return FMX_EINVAL;
    if (!ctx->addr) {
        snprintf(err, errsz, "the tracer needs the server's address");
        return FMX_EINVAL;
    }
    char seedbuf[32];
    snprintf(seedbuf, sizeof seedbuf, "%" PRId64, seed);
    const char *args[] = {"--connect", ctx->addr,  "--task", id,  "--seed",
                          seedbuf,     "--policy", name,     NULL};
    char *out = NULL;
    size_t len = 0;
    int rc = fmx_python_run("fmx.tracer", args, &out, &len, err, errsz);
    if (rc != 0) {
        if (rc > 0)
            snprintf(err, errsz,
                     "the tracer (python3 -m fmx.tracer) failed with exit status %d; its "
                     "message is above",
                     rc);
        free(out);
        return rc > 0 ? FMX_EINTERNAL : rc;
    }
    /* The last non-empty line is the episode's result. */
    while (len > 0 && (out[len - 1] == '\n' || out[len - 1] == ' '))
        out[--len] = '\0';
    char *line = strrchr(out, '\n');
    cJSON *r = cJSON_Parse(line ? line + 1 : out);
    free(out);
    if (!cJSON_IsObject(r)) {
        snprintf(err, errsz, "the tracer printed no result line");
        cJSON_Delete(r);
        return FMX_EINTERNAL;
    }
    res->episode = (int64_t)fmx__num(r, "episode", -1);
    res->reward = fmx__num(r, "reward", 0);
    res->correctness = fmx__num(r, "correctness", -1);
    res->steps = (int)fmx__num(r, "steps", 0);
    res->terminated = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "terminated"));
    res->truncated = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "truncated"));
    const cJSON *verified = cJSON_GetObjectItemCaseSensitive(r, "verified");
    const cJSON *entry = cJSON_GetObjectItemCaseSensitive(verified, "forward");
    res->verified = cJSON_IsTrue(entry);
    cJSON_Delete(r);
    return FMX_OK;
}
