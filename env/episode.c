/*
 * episode.c — episode state, the goal text and the plan/execute/apply step
 * rules of episode.h. Everything here but fmx_episode_execute runs on the
 * server's main thread; execute works from the plan's copies only.
 */
#define _GNU_SOURCE
#include "episode.h"

#include <cjson/cJSON.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "proto.h"
#include "status.h"

struct fmx_episode {
    int64_t id;
    const fmx_task *task;
    const fmx_reward_config *reward;
    char *policy;
    int64_t seed;
    unsigned char *client;
    size_t client_len;
    fmx_budget budget;
    int steps;
    fmx_episode_status status;
    char *last_code; /* last code verify_component compiled for the task's module */
    char *last_entry;
};

fmx_budget fmx_budget_default(void) {
    return (fmx_budget){
        .max_steps = 40, .max_code_bytes = 65536, .max_observation = FMX_OBS_DATA_MAX};
}

/* The budget's cap on an observation's data. */
static size_t fmx__obs_max(const fmx_episode *ep) {
    return ep->budget.max_observation ? ep->budget.max_observation : FMX_OBS_DATA_MAX;
}

const char *fmx_episode_status_name(fmx_episode_status s) {
    static const char *names[] = {"open", "submitted", "truncated", "aborted", "closed"};
    return (unsigned)s < 5 ? names[s] : "unknown";
}

fmx_episode *fmx_episode_create(int64_t id, const fmx_task *task, const char *policy, int64_t seed,
                                const void *client, size_t client_len, fmx_budget budget,
                                const fmx_reward_config *reward) {
    fmx_episode *ep = calloc(1, sizeof *ep);
    if (!ep) return NULL;
    ep->id = id;
    ep->task = task;
    ep->reward = reward;
    ep->policy = strdup(policy ? policy : "anonymous");
    ep->seed = seed;
    ep->client = malloc(client_len ? client_len : 1);
    ep->client_len = client_len;
    ep->budget = budget;
    if (!ep->policy || !ep->client) {
        fmx_episode_destroy(ep);
        return NULL;
    }
    if (client_len) memcpy(ep->client, client, client_len);
    return ep;
}

void fmx_episode_destroy(fmx_episode *ep) {
    if (!ep) return;
    free(ep->policy);
    free(ep->client);
    free(ep->last_code);
    free(ep->last_entry);
    free(ep);
}

int64_t fmx_episode_id(const fmx_episode *ep) {
    return ep->id;
}
const fmx_task *fmx_episode_task(const fmx_episode *ep) {
    return ep->task;
}
fmx_episode_status fmx_episode_status_of(const fmx_episode *ep) {
    return ep->status;
}
int fmx_episode_steps(const fmx_episode *ep) {
    return ep->steps;
}

int fmx_episode_owned_by(const fmx_episode *ep, const void *client, size_t client_len) {
    return client_len == ep->client_len && memcmp(client, ep->client, client_len) == 0;
}

void fmx_episode_abort(fmx_episode *ep) {
    if (ep->status == FMX_EP_OPEN) ep->status = FMX_EP_ABORTED;
}

/* ---- the goal ---- */

static void fmx__shape(const fmx_tensor *t, char *buf, size_t n, const char **dtype) {
    int64_t shape[FMX_MAX_DIMS];
    fmx_dtype dt = FMX_DT_F32;
    int nd = t ? fmx_tensor_shape(t, shape, &dt) : -1;
    *dtype = fmx_dtype_name(dt);
    if (nd < 0) {
        snprintf(buf, n, "(?)");
        return;
    }
    size_t used = (size_t)snprintf(buf, n, "(");
    for (int i = 0; i < nd && used < n; i++)
        used +=
            (size_t)snprintf(buf + used, n - used, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (used < n) snprintf(buf + used, n - used, nd == 1 ? ",)" : ")");
}

/* A decode task's calling convention (docs/pack-format.md, "Generation"), shapes from the
 * first visible decode step's call: per-layer inputs NAME_0.. are one list NAME. */
static void fmx__decode_convention(FILE *f, fmx_pack *pack, const fmx_call *call, cJSON *data) {
    const fmx_probe *p = fmx_pack_probe(pack, call->probe);
    fprintf(f,
            "Calling convention (shapes from probe %s: generation %s, decode step %d, batch %d, "
            "%d new token%s):\n  def forward(input_ids: Tensor, positions: Tensor, "
            "attention_mask: Tensor, past_keys: List[Tensor], past_values: List[Tensor], "
            "weights: Dict[str, Tensor]) -> Tuple[Tensor, List[Tensor], List[Tensor]]\nInputs:\n",
            p->name, p->generation, p->step, p->batch, p->seq, p->seq == 1 ? "" : "s");
    static const char *const notes[][2] = {
        {"input_ids", "the new tokens (the prompt on the prefill, then one per step)"},
        {"positions", "their positions: real tokens counted from 0 (left padding skipped)"},
        {"attention_mask", "keep flags of every token so far, cached and new (0 = padding)"},
        {"past_keys", "one tensor per layer (batch, kv_heads, cached, head_dim), after the "
                      "rotary embedding where the model has one"},
        {"past_values", "one tensor per layer (batch, kv_heads, cached, head_dim)"},
        {"logits", "(batch, new tokens, vocab)"},
        {"keys", "past_keys with this step's keys appended (a sliding-window layer keeps its "
                 "last window positions)"},
        {"values", "past_values likewise"}};
    cJSON *ins = cJSON_AddArrayToObject(data, "inputs");
    cJSON *outs = cJSON_AddArrayToObject(data, "outputs");
    for (int side = 0; side < 2; side++) {
        const fmx_io *ios = side ? call->outputs : call->inputs;
        int n = side ? call->noutputs : call->ninputs;
        if (side) fprintf(f, "Return (logits, keys, values):\n");
        for (int k = 0; k < n; k++) {
            const fmx_io *io = &ios[k];
            if (io->kind != FMX_IO_TENSOR) continue;
            const char *under = strrchr(io->name, '_');
            int numbered =
                under && under[1] && strspn(under + 1, "0123456789") == strlen(under + 1);
            int listed = numbered && strcmp(under, "_0") == 0; /* past_keys_0 */
            if (numbered && !listed) continue;                 /* NAME_1, ...: with NAME_0 */
            char name[64], shape[160];
            const char *dtype;
            int len = listed ? (int)(under - io->name) : (int)strlen(io->name);
            snprintf(name, sizeof name, "%.*s", len, io->name);
            int count = 0;
            for (int j = 0; listed && j < n; j++)
                count += ios[j].kind == FMX_IO_TENSOR && strncmp(ios[j].name, name, len) == 0 &&
                         ios[j].name[len] == '_';
            fmx__shape(fmx_pack_capture(pack, io->key), shape, sizeof shape, &dtype);
            const char *note = "";
            for (size_t j = 0; j < sizeof notes / sizeof notes[0]; j++)
                if (strcmp(notes[j][0], name) == 0) note = notes[j][1];
            if (listed)
                fprintf(f, "  %-16s List[Tensor] of %d, each %s %s: %s\n", name, count, shape,
                        dtype, note);
            else
                fprintf(f, "  %-16s Tensor %s %s: %s\n", name, shape, dtype, note);
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "name", name);
            cJSON_AddStringToObject(o, "kind", listed ? "tensor_list" : "tensor");
            if (listed) cJSON_AddNumberToObject(o, "count", count);
            cJSON_AddStringToObject(o, "shape", shape);
            cJSON_AddStringToObject(o, "dtype", dtype);
            cJSON_AddItemToArray(side ? outs : ins, o);
        }
        if (!side)
            fprintf(f,
                    "  %-16s Dict[str, Tensor]: every parameter and buffer of the model by "
                    "its full name (get_weight_info lists them)\n",
                    "weights");
    }
    fprintf(f, "Graded on every step of every generation (a prefill, then decode steps fed "
               "their own cache): the logits and the cache at real tokens only. tap() works per "
               "step.\n");
}

/* The first call of the root on a visible decode step (step >= 1), else on any step. */
static const fmx_call *fmx__decode_call(fmx_pack *pack) {
    const fmx_call *any = NULL;
    for (int c = 0; c < fmx_pack_ncalls(pack); c++) {
        const fmx_call *call = fmx_pack_call(pack, c);
        const fmx_probe *p = fmx_pack_probe(pack, call->probe);
        if (call->module != 0 || p->step < 0) continue;
        if (p->visible && p->step >= 1) return call;
        if (!any) any = call;
    }
    return any;
}

cJSON *fmx_episode_goal(const fmx_episode *ep) {
    const fmx_task *task = ep->task;
    fmx_pack *pack = task->pack;
    const fmx_module *mod = fmx_pack_module(pack, task->module);
    const fmx_call *call = fmx_pack_call(pack, mod->first_call);
    const fmx_probe *p0 = fmx_pack_probe(pack, 0);
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return NULL;
    cJSON *data = cJSON_CreateObject();
    cJSON_AddItemToObject(data, "task", fmx_task_json(task));

    const char *what = task->path[0] ? task->path : "the whole model";
    const fmx_call *step = task->decode ? fmx__decode_call(pack) : NULL;
    if (step) {
        fprintf(f,
                "Task %s: rewrite %s (class %s, pack %s) with a KV cache, as inference code "
                "needs it: one Python file of flat functional PyTorch whose function `forward` "
                "runs the model on new tokens given the cache of the tokens before them and "
                "returns the logits and the updated cache, using only torch ops and the model's "
                "weights, with no nn.Module classes.\n\n",
                task->id, what, task->cls, task->pack_name);
        fmx__decode_convention(f, pack, step, data);
        goto language;
    }
    fprintf(f,
            "Task %s: rewrite %s (class %s, pack %s) as flat functional PyTorch: one Python file "
            "whose function `forward` computes what the module's forward computes, using only "
            "torch ops and the module's weights, with no nn.Module classes.\n\n",
            task->id, what, task->cls, task->pack_name);

    /* The calling convention, from probe 0's first call. */
    int ntensor_out = 0;
    for (int k = 0; call && k < call->noutputs; k++)
        ntensor_out += call->outputs[k].kind == FMX_IO_TENSOR;
    fprintf(f, "Calling convention (shapes from probe %s, batch %d \u00d7 seq %d):\n  def forward(",
            p0->name, p0->batch, p0->seq);
    int first = 1;
    for (int k = 0; call && k < call->ninputs; k++)
        if (call->inputs[k].kind == FMX_IO_TENSOR) {
            fprintf(f, "%s%s: Tensor", first ? "" : ", ", call->inputs[k].name);
            first = 0;
        }
    fprintf(f, "%sweights: Dict[str, Tensor]) -> %s\n", first ? "" : ", ",
            ntensor_out == 1 ? "Tensor" : "Tuple[Tensor, ...]");
    fprintf(f, "Inputs (keyword arguments named as in the module's forward; declare only those "
               "you use):\n");
    cJSON *ins = cJSON_AddArrayToObject(data, "inputs");
    for (int k = 0; call && k < call->ninputs; k++) {
        const fmx_io *io = &call->inputs[k];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddItemToArray(ins, o);
        cJSON_AddStringToObject(o, "name", io->name);
        char shape[160];
        const char *dtype;
        switch (io->kind) {
        case FMX_IO_TENSOR:
            fmx__shape(fmx_pack_capture(pack, io->key), shape, sizeof shape, &dtype);
            fprintf(f, "  %-24s Tensor %s %s\n", io->name, shape, dtype);
            cJSON_AddStringToObject(o, "kind", "tensor");
            cJSON_AddStringToObject(o, "shape", shape);
            cJSON_AddStringToObject(o, "dtype", dtype);
            break;
        case FMX_IO_VALUE:
            cJSON_AddStringToObject(o, "kind", "value");
            if (io->vtype == FMX_VAL_INT)
                fprintf(f, "  %-24s int = %lld\n", io->name, (long long)io->i);
            else if (io->vtype == FMX_VAL_FLOAT)
                fprintf(f, "  %-24s float = %.9g\n", io->name, io->f);
            else if (io->vtype == FMX_VAL_BOOL)
                fprintf(f, "  %-24s bool = %s\n", io->name, io->i ? "True" : "False");
            else
                fprintf(f, "  %-24s str = \"%s\"\n", io->name, io->s ? io->s : "");
            break;
        case FMX_IO_NONE:
            cJSON_AddStringToObject(o, "kind", "none");
            break;
        default:
            cJSON_AddStringToObject(o, "kind", io->kind == FMX_IO_CACHE ? "cache" : "other");
            fprintf(f, "  %-24s %s (not passed)\n", io->name,
                    io->kind == FMX_IO_CACHE ? "a cache object" : "an object");
            break;
        }
    }
    fprintf(f,
            "  %-24s Dict[str, Tensor]: parameters and buffers keyed relative to \"%s\" "
            "(get_weight_info lists them)\n",
            "weights", task->path);
    int nnone = 0;
    for (int k = 0; call && k < call->ninputs; k++) {
        if (call->inputs[k].kind != FMX_IO_NONE) continue;
        fprintf(f, "%s%s",
                nnone++ ? ", "
                        : "  None on this call (omit them, or declare "
                          "Optional[Tensor] = None): ",
                call->inputs[k].name);
    }
    if (nnone) fprintf(f, "\n");
    fprintf(f, "Return the tensor outputs, in this order%s:\n",
            ntensor_out == 1 ? " (one Tensor)" : " (a tuple)");
    cJSON *outs = cJSON_AddArrayToObject(data, "outputs");
    for (int k = 0; call && k < call->noutputs; k++) {
        const fmx_io *io = &call->outputs[k];
        if (io->kind != FMX_IO_TENSOR) continue;
        char shape[160];
        const char *dtype;
        fmx__shape(fmx_pack_capture(pack, io->key), shape, sizeof shape, &dtype);
        fprintf(f, "  %-24s Tensor %s %s%s\n", io->name, shape, dtype,
                io->token_aligned ? "  (graded only at real tokens)" : "");
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", io->name);
        cJSON_AddStringToObject(o, "shape", shape);
        cJSON_AddStringToObject(o, "dtype", dtype);
        cJSON_AddItemToArray(outs, o);
    }
language:
    fprintf(f, "\nLanguage: imports only `import torch`, `import torch.nn.functional as F`, `from "
               "torch import Tensor`, `import math`, `from typing import ...`; typed top-level "
               "functions and constants; no classes, no in-place tensor ops (x += y, x[i] = y, "
               "add_). Mark intermediates with tap(\"child.path\", x) to have verify_component "
               "compare them with the child module's output.\n\n");
    fprintf(f, "Tools:\n%s\n", fmx_tools_summary());
    fprintf(f,
            "Budget: %d steps (every tool call is one), code at most %zu bytes. submit ends the "
            "episode; if the steps run out, the last code verify_component compiled for %s is "
            "graded instead (reward 0 if none).\n",
            ep->budget.max_steps, ep->budget.max_code_bytes, what);
    fprintf(f,
            "Reward: %.2f\u00b7correctness (fraction of probes, hidden included, where every "
            "output matches) + if all match: %.2f\u00b7LOC score (logical lines; full at or below "
            "%lld) + %.2f\u00b7compile score.\n",
            ep->reward->w_correct, ep->reward->w_loc, (long long)task->target_loc,
            ep->reward->w_compile);
    fclose(f);

    cJSON *budget = cJSON_AddObjectToObject(data, "budget");
    cJSON_AddNumberToObject(budget, "max_steps", ep->budget.max_steps);
    cJSON_AddNumberToObject(budget, "max_code_bytes", (double)ep->budget.max_code_bytes);
    cJSON_AddNumberToObject(budget, "max_observation_bytes", (double)fmx__obs_max(ep));
    cJSON_AddStringToObject(data, "entry", "forward");
    cJSON *obs = cJSON_CreateObject();
    cJSON_AddStringToObject(obs, "tool", "reset");
    cJSON_AddStringToObject(obs, "text", text ? text : "");
    cJSON_AddItemToObject(obs, "data", data);
    free(text);
    return obs;
}

cJSON *fmx_episode_info(const fmx_episode *ep) {
    cJSON *info = cJSON_CreateObject();
    cJSON_AddItemToObject(info, "task", fmx_task_json(ep->task));
    cJSON *b = cJSON_AddObjectToObject(info, "budget");
    cJSON_AddNumberToObject(b, "max_steps", ep->budget.max_steps);
    cJSON_AddNumberToObject(b, "max_code_bytes", (double)ep->budget.max_code_bytes);
    cJSON_AddNumberToObject(b, "max_observation_bytes", (double)fmx__obs_max(ep));
    cJSON_AddStringToObject(info, "policy", ep->policy);
    cJSON_AddNumberToObject(info, "seed", (double)ep->seed);
    cJSON_AddStringToObject(info, "reward_version", ep->reward->version);
    return info;
}

/* ---- steps ---- */

int fmx_episode_plan(const fmx_episode *ep, const char *tool, const cJSON *args,
                     fmx_step_plan *plan) {
    memset(plan, 0, sizeof *plan);
    plan->ctx = (fmx_tool_ctx){
        .task = ep->task, .reward = ep->reward, .max_code_bytes = ep->budget.max_code_bytes};
    plan->tool = strdup(tool ? tool : "");
    plan->args = args ? cJSON_Duplicate(args, 1) : NULL;
    plan->finish = tool && strcmp(tool, "finish") == 0;
    plan->final = ep->steps + 1 >= ep->budget.max_steps;
    if ((plan->final || plan->finish) && ep->last_code) {
        plan->fallback_code = strdup(ep->last_code);
        plan->fallback_entry = strdup(ep->last_entry ? ep->last_entry : "forward");
    }
    plan->heavy = fmx_tools_is_heavy(plan->tool ? plan->tool : "") ||
                  ((plan->final || plan->finish) && plan->fallback_code != NULL);
    if (!plan->tool || (args && !plan->args) ||
        (ep->last_code && (plan->final || plan->finish) &&
         (!plan->fallback_code || !plan->fallback_entry))) {
        fmx_step_plan_clear(plan);
        return FMX_ENOMEM;
    }
    return FMX_OK;
}

void fmx_step_plan_clear(fmx_step_plan *plan) {
    if (!plan) return;
    free(plan->tool);
    cJSON_Delete(plan->args);
    free(plan->fallback_code);
    free(plan->fallback_entry);
    memset(plan, 0, sizeof *plan);
}

static double fmx__now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* The code and entry of a verify_component/submit action. */
static const char *fmx__arg_str(const cJSON *args, const char *name, const char *dflt) {
    const char *s = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(args, name));
    return s ? s : dflt;
}

int fmx_episode_execute(const fmx_step_plan *plan, fmx_step_outcome *out) {
    memset(out, 0, sizeof *out);
    double t0 = fmx__now_ms();
    int rc = fmx_tools_run(&plan->ctx, plan->tool, plan->args, &out->tool);
    if (rc) return rc;
    /* a finish ends the episode unless its arguments were refused */
    int finishing = plan->finish && !out->tool.error;
    if ((plan->final || finishing) && !out->tool.submitted) {
        out->truncated = 1;
        const char *code = plan->fallback_code, *entry = plan->fallback_entry;
        if (out->tool.verified_task_code) {
            code = fmx__arg_str(plan->args, "code", NULL);
            entry = fmx__arg_str(plan->args, "entry", "forward");
        }
        if (code) {
            out->graded_code = strdup(code);
            out->graded_entry = strdup(entry ? entry : "forward");
            if (!out->graded_code || !out->graded_entry) {
                fmx_step_outcome_clear(out);
                return FMX_ENOMEM;
            }
            rc = fmx_tools_grade(&plan->ctx, code, strlen(code), out->graded_entry,
                                 &out->trunc_grade);
            if (rc) {
                fmx_step_outcome_clear(out);
                return rc;
            }
            out->trunc_graded = 1;
        }
    }
    out->ms = fmx__now_ms() - t0;
    return FMX_OK;
}

void fmx_step_outcome_clear(fmx_step_outcome *out) {
    if (!out) return;
    fmx_tool_result_clear(&out->tool);
    fmx_grade_clear(&out->trunc_grade);
    free(out->graded_code);
    free(out->graded_entry);
    memset(out, 0, sizeof *out);
}

/* Appends s to the observation's text. */
static void fmx__append_text(cJSON *obs, const char *s) {
    const char *old = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(obs, "text"));
    char *joined = NULL;
    if (asprintf(&joined, "%s%s", old ? old : "", s) < 0) return;
    cJSON_ReplaceItemInObjectCaseSensitive(obs, "text", cJSON_CreateString(joined));
    free(joined);
}

/* ---- observation caps ---- */

/* Bytes of s as a JSON string, quotes and escapes included. */
static size_t fmx__json_str_size(const char *s, size_t n) {
    size_t size = 2;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        size +=
            c == '"' || c == '\\' || c == '\b' || c == '\f' || c == '\n' || c == '\r' || c == '\t'
                ? 2
            : c < 0x20 ? 6
                       : 1;
    }
    return size;
}

/* At least the length of node's compact JSON (its key not counted). */
static size_t fmx__json_size(const cJSON *node) {
    if (cJSON_IsString(node) && node->valuestring)
        return fmx__json_str_size(node->valuestring, strlen(node->valuestring));
    if (cJSON_IsNumber(node)) {
        double v = node->valuedouble;
        if (v > -1e15 && v < 1e15 && v == (double)(long long)v) { /* range first: no UB */
            char buf[32];
            return (size_t)snprintf(buf, sizeof buf, "%lld", (long long)v);
        }
        return 24; /* "%1.17g": sign, 17 digits, point, exponent */
    }
    if (cJSON_IsArray(node) || cJSON_IsObject(node)) {
        size_t size = 2;
        for (const cJSON *c = node->child; c; c = c->next) {
            size += fmx__json_size(c) + (c != node->child);
            if (cJSON_IsObject(node))
                size += fmx__json_str_size(c->string ? c->string : "",
                                           c->string ? strlen(c->string) : 0) +
                        1;
        }
        return size;
    }
    return 5; /* true, false, null */
}

typedef struct {
    cJSON *cuts; /* [{path, kept, of, unit}] */
    char path[512];
    int failed; /* out of memory */
} fmx__cutter;

static void fmx__cut_record(fmx__cutter *ct, const char *path, size_t kept, size_t of,
                            const char *unit) {
    cJSON *o = cJSON_CreateObject();
    if (!o || !cJSON_AddStringToObject(o, "path", path) ||
        !cJSON_AddNumberToObject(o, "kept", (double)kept) ||
        !cJSON_AddNumberToObject(o, "of", (double)of) ||
        !cJSON_AddStringToObject(o, "unit", unit) || !cJSON_AddItemToArray(ct->cuts, o)) {
        cJSON_Delete(o);
        ct->failed = 1;
    }
}

/* Appends ".key" or "[i]" to the cutter's path; returns the old length. */
static size_t fmx__cut_path_push(fmx__cutter *ct, const cJSON *parent, const cJSON *child,
                                 int index) {
    size_t len = strlen(ct->path);
    if (cJSON_IsObject(parent))
        snprintf(ct->path + len, sizeof ct->path - len, "%s%s", len ? "." : "",
                 child->string ? child->string : "");
    else
        snprintf(ct->path + len, sizeof ct->path - len, "[%d]", index);
    return len;
}

/* Makes node smaller by at least excess bytes of JSON where it is biggest:
 * inside its biggest child when that child alone can give the bytes, else
 * here (a string's tail, an array's trailing items, an object's biggest
 * members). */
static void fmx__shrink(fmx__cutter *ct, cJSON *node, size_t excess) {
    if (cJSON_IsString(node) && node->valuestring) {
        char *v = node->valuestring;
        size_t n = strlen(v), size = fmx__json_size(node);
        size_t budget = size > excess + 2 ? size - excess - 2 : 0, used = 0, k = 0;
        while (k < n) {
            size_t one = fmx__json_str_size(v + k, 1) - 2;
            if (used + one > budget) break;
            used += one;
            k++;
        }
        while (k > 0 && k < n && ((unsigned char)v[k] & 0xC0) == 0x80) /* whole characters */
            k--;
        v[k] = 0;
        fmx__cut_record(ct, ct->path, k, n, "bytes");
        return;
    }
    if (!cJSON_IsArray(node) && !cJSON_IsObject(node)) return;
    size_t size = fmx__json_size(node), best_size = 0;
    cJSON *best = NULL;
    int best_i = 0, i = 0;
    for (cJSON *c = node->child; c; c = c->next, i++) {
        size_t cs = fmx__json_size(c);
        if (cs > best_size) {
            best_size = cs;
            best = c;
            best_i = i;
        }
    }
    if (!best) return;
    if (best_size >= excess + 64 && (cJSON_IsString(best) || best->child)) {
        size_t len = fmx__cut_path_push(ct, node, best, best_i);
        fmx__shrink(ct, best, excess);
        ct->path[len] = 0;
        return;
    }
    if (cJSON_IsArray(node)) {
        /* Keep the leading items that fit, and of the first that does not
         * as much as fits (when that is worth it); free the rest. */
        size_t budget = size > excess ? size - excess : 0, used = 2, kept = 0, total = 0;
        cJSON *last = NULL, *c = node->child;
        for (; c; c = c->next) {
            if (used + (kept > 0) > budget) break;
            size_t cs = fmx__json_size(c), room = budget - used - (kept > 0);
            if (cs > room) {
                if (room < 256 || !(cJSON_IsString(c) || c->child)) break;
                size_t len = fmx__cut_path_push(ct, node, c, (int)kept);
                fmx__shrink(ct, c, cs - room);
                ct->path[len] = 0;
                cs = fmx__json_size(c);
                if (cs > room) break;
            }
            used += cs + (kept > 0);
            last = c;
            kept++;
        }
        for (const cJSON *t = node->child; t; t = t->next)
            total++;
        if (!c) return; /* everything fits */
        if (last) {
            last->next = NULL;
            node->child->prev = last; /* cJSON keeps the tail in the head's prev */
        } else {
            node->child = NULL;
        }
        c->prev = NULL;
        cJSON_Delete(c); /* c and every item after it */
        fmx__cut_record(ct, ct->path, kept, total, "items");
        return;
    }
    /* An object none of whose members can give the bytes alone: cut into
     * the biggest members in turn (a member that cannot be cut is dropped)
     * until they have. */
    size_t freed = 0;
    for (int rounds = 0; freed < excess && node->child && rounds < 64; rounds++) {
        cJSON *big = NULL;
        size_t big_size = 0;
        for (cJSON *c = node->child; c; c = c->next) {
            size_t cs = fmx__json_size(c);
            if (cs > big_size) {
                big_size = cs;
                big = c;
            }
        }
        size_t len = fmx__cut_path_push(ct, node, big, 0);
        size_t after = big_size;
        if (big_size > 128 && (cJSON_IsString(big) || big->child)) {
            size_t want = excess - freed < big_size - 64 ? excess - freed : big_size - 64;
            fmx__shrink(ct, big, want);
            after = fmx__json_size(big);
        }
        if (after >= big_size) { /* nothing to cut inside: drop it */
            fmx__cut_record(ct, ct->path, 0, big_size, "member");
            freed += big_size + 1 +
                     fmx__json_str_size(big->string ? big->string : "",
                                        big->string ? strlen(big->string) : 0);
            cJSON_Delete(cJSON_DetachItemViaPointer(node, big));
        } else {
            freed += big_size - after;
        }
        ct->path[len] = 0;
    }
}

int fmx_observation_cap(cJSON *obs, size_t text_max, size_t data_max) {
    cJSON *text = cJSON_GetObjectItemCaseSensitive(obs, "text");
    cJSON *data = cJSON_GetObjectItemCaseSensitive(obs, "data");
    const char *t = cJSON_GetStringValue(text);
    /* The text keeps its head [0, head) and its tail [tail, tlen): a report
     * ends with its summary. Cuts fall between lines when one is near and
     * never inside a UTF-8 character. */
    size_t tlen = t ? strlen(t) : 0, head = tlen, tail = tlen;
    if (t && tlen > text_max) {
        head = text_max / 4 * 3;
        while (head > 0 && ((unsigned char)t[head] & 0xC0) == 0x80)
            head--;
        for (size_t k = head; k > 0 && head - k < 4096; k--)
            if (t[k - 1] == '\n') {
                head = k;
                break;
            }
        tail = tlen - (text_max - head);
        while (tail < tlen && ((unsigned char)t[tail] & 0xC0) == 0x80)
            tail++;
        for (size_t k = tail; k < tlen && k - tail < 4096; k++)
            if (t[k] == '\n') {
                tail = k + 1;
                break;
            }
    }
    fmx__cutter ct = {.cuts = NULL};
    size_t dsize = data ? fmx__json_size(data) : 0;
    if (dsize > data_max) {
        ct.cuts = cJSON_CreateArray();
        if (!ct.cuts) return FMX_ENOMEM;
        for (int round = 0; round < 64 && dsize > data_max; round++) {
            size_t before = dsize;
            fmx__shrink(&ct, data, dsize - data_max);
            dsize = fmx__json_size(data);
            if (dsize >= before) break; /* nothing left to cut */
        }
    }
    if (head == tlen && !ct.cuts) return 0;
    /* The note, where the text was cut (else at its end): what was cut. */
    char *note = NULL;
    size_t nlen = 0;
    FILE *f = open_memstream(&note, &nlen);
    if (!f) {
        cJSON_Delete(ct.cuts);
        return FMX_ENOMEM;
    }
    fprintf(f, "%s[fmx: ", head && t[head - 1] != '\n' ? "\n" : "");
    if (head < tlen)
        fprintf(f, "%zu of this text's %zu bytes cut here (an observation's text is capped at %zu)",
                tail - head, tlen, text_max);
    else
        fprintf(f, "this observation's data was cut (capped at %zu bytes of JSON)", data_max);
    int shown = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, ct.cuts) {
        if (shown++ == 4) {
            fprintf(f, "; %d more cuts", cJSON_GetArraySize(ct.cuts) - 4);
            break;
        }
        fprintf(f, "; data.%s: kept %.0f of %.0f %s",
                cJSON_GetStringValue(cJSON_GetObjectItem(c, "path")),
                cJSON_GetNumberValue(cJSON_GetObjectItem(c, "kept")),
                cJSON_GetNumberValue(cJSON_GetObjectItem(c, "of")),
                cJSON_GetStringValue(cJSON_GetObjectItem(c, "unit")));
    }
    if (ct.cuts) fprintf(f, " (data.cut lists every cut)");
    fprintf(f, "]%s", head < tlen ? "\n" : "");
    fclose(f);
    char *joined = note ? malloc(head + nlen + (tlen - tail) + 1) : NULL;
    if (joined) {
        if (head) memcpy(joined, t, head);
        memcpy(joined + head, note, nlen);
        memcpy(joined + head + nlen, t ? t + tail : "", tlen - tail);
        joined[head + nlen + tlen - tail] = 0;
    }
    free(note);
    cJSON *nt = joined ? cJSON_CreateString(joined) : NULL;
    free(joined);
    int ok = nt && !ct.failed;
    if (ct.cuts && ok && cJSON_IsObject(data)) {
        if (!cJSON_AddItemToObject(data, "cut", ct.cuts)) {
            cJSON_Delete(ct.cuts);
            ok = 0;
        }
    } else {
        cJSON_Delete(ct.cuts);
    }
    if (!ok) {
        cJSON_Delete(nt);
        return FMX_ENOMEM;
    }
    if (text)
        cJSON_ReplaceItemInObjectCaseSensitive(obs, "text", nt);
    else
        cJSON_AddItemToObject(obs, "text", nt);
    return 1;
}

int fmx_episode_apply(fmx_episode *ep, const fmx_step_plan *plan, fmx_step_outcome *outcome,
                      fmx_step_result *res) {
    memset(res, 0, sizeof *res);
    res->idx = ep->steps++;
    res->observation = outcome->tool.observation;
    outcome->tool.observation = NULL;
    res->error = outcome->tool.error;
    res->info = cJSON_CreateObject();
    if (!res->observation || !res->info ||
        fmx_observation_cap(res->observation, fmx__obs_max(ep) / 8, fmx__obs_max(ep)) < 0) {
        fmx_step_result_clear(res);
        return FMX_ENOMEM;
    }
    /* Remember code that compiled for the task's module (truncation grades it). */
    if (outcome->tool.verified_task_code) {
        char *code = strdup(fmx__arg_str(plan->args, "code", ""));
        char *entry = strdup(fmx__arg_str(plan->args, "entry", "forward"));
        if (code && entry) {
            free(ep->last_code);
            free(ep->last_entry);
            ep->last_code = code;
            ep->last_entry = entry;
        } else {
            free(code);
            free(entry);
        }
    }
    if (outcome->tool.submitted) {
        ep->status = FMX_EP_SUBMITTED;
        res->terminated = 1;
        res->graded = 1;
        res->grade = &outcome->tool.grade;
        res->graded_code = fmx__arg_str(plan->args, "code", "");
        res->graded_entry = fmx__arg_str(plan->args, "entry", "forward");
        res->reward = outcome->tool.grade.score.reward;
    } else if (outcome->truncated && plan->finish &&
               !(outcome->tool.error && strcmp(outcome->tool.error, "bad_args") == 0)) {
        /* finish: the policy ended it; graded like a submit of the last verified code */
        ep->status = outcome->trunc_graded ? FMX_EP_SUBMITTED : FMX_EP_CLOSED;
        res->terminated = 1;
        if (outcome->trunc_graded) {
            res->graded = 1;
            res->grade = &outcome->trunc_grade;
            res->graded_code = outcome->graded_code;
            res->graded_entry = outcome->graded_entry;
            res->reward = outcome->trunc_grade.score.reward;
            fmx__append_text(res->observation, " The last code verify_component compiled for the "
                                               "task's module was graded as if submitted:\n");
            fmx__append_text(res->observation,
                             outcome->trunc_grade.text ? outcome->trunc_grade.text : "");
        } else {
            fmx__append_text(res->observation, " No code was verified for the task's module, so "
                                               "the reward is 0.");
        }
    } else if (outcome->truncated) {
        ep->status = FMX_EP_TRUNCATED;
        res->truncated = 1;
        char note[512];
        if (outcome->trunc_graded) {
            res->graded = 1;
            res->grade = &outcome->trunc_grade;
            res->graded_code = outcome->graded_code;
            res->graded_entry = outcome->graded_entry;
            res->reward = outcome->trunc_grade.score.reward;
            snprintf(note, sizeof note,
                     "\n\nBudget exhausted (%d/%d steps): the episode is truncated. The last code "
                     "verify_component compiled for the task's module was graded as if "
                     "submitted:\n",
                     ep->steps, ep->budget.max_steps);
            fmx__append_text(res->observation, note);
            fmx__append_text(res->observation,
                             outcome->trunc_grade.text ? outcome->trunc_grade.text : "");
        } else {
            snprintf(note, sizeof note,
                     "\n\nBudget exhausted (%d/%d steps): the episode is truncated. No code was "
                     "verified for the task's module, so the reward is 0.",
                     ep->steps, ep->budget.max_steps);
            fmx__append_text(res->observation, note);
        }
    }
    cJSON_AddNumberToObject(res->info, "step", (double)ep->steps);
    cJSON_AddNumberToObject(res->info, "steps_left", ep->budget.max_steps - ep->steps);
    cJSON_AddStringToObject(res->info, "status", fmx_episode_status_name(ep->status));
    /* A graded step's time includes the hidden probes' runs: hidden probes say
     * pass or fail, nothing else, so no time is reported for it. */
    if (!res->graded) fmx_proto_add_float(res->info, "ms", outcome->ms);
    if (res->error) cJSON_AddStringToObject(res->info, "error", res->error);
    if (res->graded && res->grade->summary)
        cJSON_AddItemToObject(res->info, "grade", cJSON_Duplicate(res->grade->summary, 1));
    return FMX_OK;
}

void fmx_step_result_clear(fmx_step_result *res) {
    if (!res) return;
    cJSON_Delete(res->observation);
    cJSON_Delete(res->info);
    memset(res, 0, sizeof *res);
}
