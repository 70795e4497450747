/*
 * outcome.c — step outcomes and grades (outcome.h, worker.h): as trees on the
 * worker channel, and the outcome of a step whose evaluation was stopped
 * (timeout, out of memory, crash) or whose budget's last step fell back on
 * the last verified code. Not here: the pool that runs the jobs (worker.c).
 */
#define _GNU_SOURCE
#include "outcome.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto.h"
#include "status.h"
#include "worker.h"

cJSON *fmx_grade_tree(const fmx_grade *g) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "graded_probes", g->graded_probes);
    cJSON_AddNumberToObject(o, "passed_probes", g->passed_probes);
    cJSON *f = cJSON_AddObjectToObject(o, "facts");
    cJSON_AddNumberToObject(f, "correctness", g->facts.correctness);
    cJSON_AddNumberToObject(f, "loc", (double)g->facts.loc);
    cJSON_AddNumberToObject(f, "target_loc", (double)g->facts.target_loc);
    cJSON_AddNumberToObject(f, "compiled", g->facts.compiled);
    cJSON_AddNumberToObject(f, "host_syncs", g->facts.host_syncs);
    cJSON_AddNumberToObject(f, "data_dependent_flow", g->facts.data_dependent_flow);
    cJSON_AddNumberToObject(f, "survives_optimization", g->facts.survives_optimization);
    cJSON_AddNumberToObject(f, "runs_all_shapes", g->facts.runs_all_shapes);
    cJSON *s = cJSON_AddObjectToObject(o, "score");
    cJSON_AddNumberToObject(s, "correctness", g->score.correctness);
    cJSON_AddNumberToObject(s, "loc_score", g->score.loc_score);
    cJSON_AddNumberToObject(s, "compile_score", g->score.compile_score);
    cJSON_AddNumberToObject(s, "reward", g->score.reward);
    cJSON_AddStringToObject(o, "breakdown", g->breakdown);
    if (g->summary) cJSON_AddItemToObject(o, "summary", cJSON_Duplicate(g->summary, 1));
    if (g->text) cJSON_AddStringToObject(o, "text", g->text);
    return o;
}

double fmx_tree_num(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

int fmx_tree_flag(const cJSON *o, const char *k) {
    return cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, k));
}

/* Fills g from a tree of fmx_grade_tree. Returns FMX_OK, FMX_EFORMAT or FMX_ENOMEM. */
int fmx_grade_from_tree(const cJSON *o, fmx_grade *g) {
    memset(g, 0, sizeof *g);
    if (!cJSON_IsObject(o)) return FMX_EFORMAT;
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(o, "facts");
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(o, "score");
    const char *bd = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, "breakdown"));
    const char *text = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, "text"));
    const cJSON *sum = cJSON_GetObjectItemCaseSensitive(o, "summary");
    if (!cJSON_IsObject(f) || !cJSON_IsObject(s) || !bd || !text || !cJSON_IsObject(sum))
        return FMX_EFORMAT;
    g->graded_probes = (int)fmx_tree_num(o, "graded_probes");
    g->passed_probes = (int)fmx_tree_num(o, "passed_probes");
    g->facts.correctness = fmx_tree_num(f, "correctness");
    g->facts.loc = (long)fmx_tree_num(f, "loc");
    g->facts.target_loc = (long)fmx_tree_num(f, "target_loc");
    g->facts.compiled = (int)fmx_tree_num(f, "compiled");
    g->facts.host_syncs = (int)fmx_tree_num(f, "host_syncs");
    g->facts.data_dependent_flow = (int)fmx_tree_num(f, "data_dependent_flow");
    g->facts.survives_optimization = (int)fmx_tree_num(f, "survives_optimization");
    g->facts.runs_all_shapes = (int)fmx_tree_num(f, "runs_all_shapes");
    g->score.correctness = fmx_tree_num(s, "correctness");
    g->score.loc_score = fmx_tree_num(s, "loc_score");
    g->score.compile_score = fmx_tree_num(s, "compile_score");
    g->score.reward = fmx_tree_num(s, "reward");
    snprintf(g->breakdown, sizeof g->breakdown, "%s", bd);
    g->summary = cJSON_Duplicate(sum, 1);
    g->text = strdup(text);
    if (!g->summary || !g->text) {
        fmx_grade_clear(g);
        return FMX_ENOMEM;
    }
    return FMX_OK;
}

/* The outcome as a reply; takes the observation out of it. NULL when out of memory. */
cJSON *fmx_outcome_tree(fmx_step_outcome *out) {
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    cJSON *t = cJSON_AddObjectToObject(o, "tool");
    if (out->tool.observation) {
        cJSON_AddItemToObject(t, "observation", out->tool.observation);
        out->tool.observation = NULL;
        out->tool.error = NULL;
    }
    cJSON_AddBoolToObject(t, "verified_task_code", out->tool.verified_task_code);
    cJSON_AddBoolToObject(t, "submitted", out->tool.submitted);
    if (out->tool.submitted) cJSON_AddItemToObject(t, "grade", fmx_grade_tree(&out->tool.grade));
    cJSON_AddBoolToObject(o, "truncated", out->truncated);
    cJSON_AddBoolToObject(o, "trunc_graded", out->trunc_graded);
    if (out->trunc_graded)
        cJSON_AddItemToObject(o, "trunc_grade", fmx_grade_tree(&out->trunc_grade));
    if (out->graded_code) cJSON_AddStringToObject(o, "graded_code", out->graded_code);
    if (out->graded_entry) cJSON_AddStringToObject(o, "graded_entry", out->graded_entry);
    cJSON_AddNumberToObject(o, "ms", out->ms);
    return o;
}

/* Fills out from a reply of fmx_outcome_tree (taking its observation). */
int fmx_outcome_from_tree(cJSON *o, fmx_step_outcome *out) {
    memset(out, 0, sizeof *out);
    cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "tool");
    cJSON *obs = cJSON_GetObjectItemCaseSensitive(t, "observation");
    if (!cJSON_IsObject(t) || !cJSON_IsObject(obs)) return FMX_EFORMAT;
    int rc = FMX_OK;
    out->tool.verified_task_code = fmx_tree_flag(t, "verified_task_code");
    out->tool.submitted = fmx_tree_flag(t, "submitted");
    if (out->tool.submitted)
        rc = fmx_grade_from_tree(cJSON_GetObjectItemCaseSensitive(t, "grade"), &out->tool.grade);
    out->truncated = fmx_tree_flag(o, "truncated");
    out->trunc_graded = fmx_tree_flag(o, "trunc_graded");
    if (rc == FMX_OK && out->trunc_graded)
        rc = fmx_grade_from_tree(cJSON_GetObjectItemCaseSensitive(o, "trunc_grade"),
                                 &out->trunc_grade);
    const char *code = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, "graded_code"));
    const char *entry = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, "graded_entry"));
    if (rc == FMX_OK && out->trunc_graded && (!code || !entry)) rc = FMX_EFORMAT;
    if (rc == FMX_OK && code && !(out->graded_code = strdup(code))) rc = FMX_ENOMEM;
    if (rc == FMX_OK && entry && !(out->graded_entry = strdup(entry))) rc = FMX_ENOMEM;
    out->ms = fmx_tree_num(o, "ms");
    if (rc != FMX_OK) {
        fmx_step_outcome_clear(out);
        return rc;
    }
    out->tool.observation = cJSON_DetachItemViaPointer(t, obs);
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(out->tool.observation, "error");
    out->tool.error = cJSON_IsString(err) ? err->valuestring : NULL;
    return FMX_OK;
}

/* ---- outcomes of step jobs ---- */

/* A submit whose evaluation failed: graded as failing every probe (reward 0),
 * so that the episode ends. (Were it to go on, code that hangs or crashes
 * depending on a hidden probe's inputs would reveal them a bit per step.) */
static int fmx__failed_grade(const fmx_step_plan *plan, fmx_fate fate, const char *why,
                             const char *text, fmx_grade *g) {
    memset(g, 0, sizeof *g);
    g->score = fmx_reward_score(plan->ctx.reward, &g->facts);
    fmx_reward_breakdown_json(plan->ctx.reward, &g->facts, &g->score, g->breakdown,
                              sizeof g->breakdown);
    cJSON *sum = cJSON_CreateObject();
    fmx_proto_add_float(sum, "reward", g->score.reward);
    fmx_proto_add_float(sum, "correctness", 0.0);
    cJSON_AddNumberToObject(sum, "probes_passed", 0);
    cJSON_AddNumberToObject(sum, "probes_graded", 0);
    cJSON_AddItemToObject(sum, "probes", cJSON_CreateArray());
    cJSON_AddBoolToObject(sum, "compiled", 0);
    cJSON_AddBoolToObject(sum, "runs_all_shapes", 0);
    fmx_proto_add_float(sum, "loc_score", g->score.loc_score);
    fmx_proto_add_float(sum, "compile_score", g->score.compile_score);
    cJSON *bd = cJSON_Parse(g->breakdown);
    if (bd) cJSON_AddItemToObject(sum, "breakdown", bd);
    cJSON *e = cJSON_AddObjectToObject(sum, "error");
    cJSON_AddStringToObject(e, "stage", fmx_fate_name(fate));
    cJSON_AddStringToObject(e, "message", why);
    g->summary = sum;
    g->text = strdup(text);
    if (!g->text || !cJSON_GetObjectItemCaseSensitive(sum, "error")) {
        fmx_grade_clear(g);
        return FMX_ENOMEM;
    }
    return FMX_OK;
}

double fmx_eval_budget_s(double eval_timeout_s) {
    if (eval_timeout_s <= 0) return 0;
    return eval_timeout_s > 1 ? eval_timeout_s - 0.25 : eval_timeout_s * 0.75;
}

fmx_fate fmx_fate_of_eval(fmx_eval_fate f) {
    switch (f) {
    case FMX_EVAL_OK:
        return FMX_FATE_OK;
    case FMX_EVAL_TIMEOUT:
        return FMX_FATE_TIMEOUT;
    case FMX_EVAL_OOM:
        return FMX_FATE_OOM;
    default:
        return FMX_FATE_CRASHED;
    }
}

int fmx_fate_outcome(const fmx_pool_config *cfg, const fmx_step_plan *plan, fmx_fate fate,
                     const char *why, fmx_step_outcome *out) {
    memset(out, 0, sizeof *out);
    const char *tool = plan->tool ? plan->tool : "";
    int is_submit = strcmp(tool, "submit") == 0;
    const char *after = is_submit
                            ? "The submission fails every probe (reward 0); the episode is over."
                            : "Nothing was graded; the episode goes on and this step counts.";
    char text[1536];
    if (fate == FMX_FATE_TIMEOUT)
        snprintf(text, sizeof text,
                 "Evaluation stopped: %s (limits: %g s wall clock, %g s CPU). The code did not "
                 "finish: a loop that never ends, or far too much work? %s",
                 why, cfg->eval_timeout_s, fmx_pool_cpu_budget(cfg), after);
    else if (fate == FMX_FATE_OOM)
        snprintf(text, sizeof text,
                 "Evaluation stopped: out of memory: %s. An evaluation may allocate at most %ld "
                 "MiB. %s",
                 why, cfg->mem_mb, after);
    else
        snprintf(text, sizeof text, "Evaluation failed: %s. %s", why, after);
    cJSON *obs = cJSON_CreateObject();
    cJSON *data = cJSON_CreateObject();
    if (!obs || !data) {
        cJSON_Delete(obs);
        cJSON_Delete(data);
        return FMX_ENOMEM;
    }
    cJSON_AddStringToObject(obs, "tool", tool);
    cJSON_AddStringToObject(obs, "text", text);
    cJSON_AddItemToObject(obs, "data", data);
    cJSON_AddStringToObject(data, "fate", fmx_fate_name(fate));
    cJSON_AddStringToObject(data, "detail", why);
    if (fate == FMX_FATE_TIMEOUT) {
        fmx_proto_add_float(data, "limit_s", cfg->eval_timeout_s);
        fmx_proto_add_float(data, "cpu_limit_s", fmx_pool_cpu_budget(cfg));
    }
    if (fate == FMX_FATE_OOM) cJSON_AddNumberToObject(data, "limit_mb", (double)cfg->mem_mb);
    cJSON *e = cJSON_AddStringToObject(obs, "error", fmx_fate_name(fate));
    if (!e) {
        cJSON_Delete(obs);
        return FMX_ENOMEM;
    }
    out->tool.observation = obs;
    out->tool.error = e->valuestring;
    if (is_submit) {
        if (fmx__failed_grade(plan, fate, why, text, &out->tool.grade) != FMX_OK) {
            fmx_step_outcome_clear(out);
            return FMX_ENOMEM;
        }
        out->tool.submitted = 1;
        cJSON_AddItemToObject(data, "grade", cJSON_Duplicate(out->tool.grade.summary, 1));
        return FMX_OK;
    }
    /* the budget's last step, or a finish, ends the episode all the same */
    out->truncated = plan->final || plan->finish;
    return FMX_OK;
}

int fmx_pool_needs_fallback(const fmx_step_plan *plan, const fmx_pool_result *res) {
    /* verify_component (the tool ran, so its death may be the tool's); a
     * cheap tool's job died grading the fallback itself; submit ends the
     * episode */
    return res->fate != FMX_FATE_OK && plan->final && plan->fallback_code && plan->tool &&
           strcmp(plan->tool, "verify_component") == 0;
}

int fmx_pool_fallback(const fmx_step_plan *plan, fmx_pool_result *res, fmx_step_outcome *out) {
    cJSON *obs = out->tool.observation;
    const char *old = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(obs, "text"));
    if (res->fate == FMX_FATE_OK &&
        fmx_grade_from_tree(cJSON_GetObjectItemCaseSensitive(res->reply, "grade"),
                            &out->trunc_grade) == FMX_OK) {
        out->graded_code = strdup(plan->fallback_code);
        out->graded_entry = strdup(plan->fallback_entry ? plan->fallback_entry : "forward");
        if (!out->graded_code || !out->graded_entry) {
            fmx_grade_clear(&out->trunc_grade);
            free(out->graded_code);
            free(out->graded_entry);
            out->graded_code = out->graded_entry = NULL;
            return FMX_ENOMEM;
        }
        out->trunc_graded = 1;
        return FMX_OK;
    }
    /* The last verified code could not be graded either: say so. */
    char *joined = NULL;
    if (asprintf(&joined, "%s The last verified code could not be graded either (%s: %s).",
                 old ? old : "", fmx_fate_name(res->fate),
                 res->fate == FMX_FATE_OK ? "a malformed grade" : res->why) < 0)
        return FMX_ENOMEM;
    cJSON_ReplaceItemInObjectCaseSensitive(obs, "text", cJSON_CreateString(joined));
    free(joined);
    return FMX_OK;
}
