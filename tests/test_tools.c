/*
 * test_tools.c — the task list (env/tasks.c), the six tools (env/tools.c) and
 * the episode step rules (env/episode.c) against a real pack exported from
 * examples/models/qwen2.py (FMX_TEST_PACK, made by the CTest fixture): each
 * tool's happy path, each refusal (unknown path with the nearest paths,
 * hidden probe, bad mode, call out of range, unknown tool, bad arguments),
 * verify_component and submit on the reference solution and on wrong code,
 * and truncation when the budget runs out.
 */
#define _GNU_SOURCE
#include <libgen.h>
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "episode.h"
#include "status.h"
#include "tasks.h"
#include "tools.h"

#ifndef FMX_SOURCE_DIR
#define FMX_SOURCE_DIR "."
#endif

static fmx_tasks *tasks;
static const fmx_task *mlp_task, *model_task;
static fmx_reward_config reward;
static char *solution; /* examples/solutions/qwen2.py */

static const char WRONG_MLP[] = "import torch\n"
                                "import torch.nn.functional as F\n"
                                "from torch import Tensor\n"
                                "from typing import Dict\n"
                                "\n"
                                "def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n"
                                "    h = F.relu(F.linear(x, weights[\"gate_proj.weight\"]))\n"
                                "    h = h * F.linear(x, weights[\"up_proj.weight\"])\n"
                                "    return F.linear(h, weights[\"down_proj.weight\"])\n";

/* Right on batch 1 × seq 8 (probe p0) only: a fixed reshape fails at run
 * time on every other shape. */
static const char P0_ONLY_MLP[] = "import torch\n"
                                  "import torch.nn.functional as F\n"
                                  "from torch import Tensor\n"
                                  "from typing import Dict\n"
                                  "\n"
                                  "def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n"
                                  "    x = x.reshape(1, 8, 64)\n"
                                  "    h = F.silu(F.linear(x, weights[\"gate_proj.weight\"]))\n"
                                  "    h = h * F.linear(x, weights[\"up_proj.weight\"])\n"
                                  "    return F.linear(h, weights[\"down_proj.weight\"])\n";

static char *read_all(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    if (s && fread(s, 1, (size_t)n, f) != (size_t)n) n = 0;
    if (s) s[n] = '\0';
    fclose(f);
    return s;
}

static int setup(void **state) {
    (void)state;
    const char *pack = getenv("FMX_TEST_PACK");
    if (!pack) {
        fprintf(stderr, "FMX_TEST_PACK is not set (run through ctest: a fixture exports it)\n");
        return -1;
    }
    char *copy = strdup(pack);
    char err[2048];
    int rc = fmx_tasks_open(dirname(copy), &tasks, stderr, err, sizeof err);
    free(copy);
    if (rc != FMX_OK) {
        fprintf(stderr, "fmx_tasks_open: %s\n", err);
        return -1;
    }
    mlp_task = fmx_tasks_find(tasks, "qwen2/Qwen2MLP");
    model_task = fmx_tasks_find(tasks, "qwen2");
    reward = fmx_reward_config_default();
    solution = read_all(FMX_SOURCE_DIR "/examples/solutions/qwen2.py");
    return mlp_task && model_task && solution ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    fmx_tasks_close(tasks);
    free(solution);
    return 0;
}

static fmx_tool_ctx ctx_for(const fmx_task *task) {
    return (fmx_tool_ctx){.task = task, .reward = &reward, .max_code_bytes = 65536};
}

/* Runs tool with args given as JSON text; returns the observation (owned by r). */
static const cJSON *run(fmx_tool_result *r, const fmx_task *task, const char *tool,
                        const char *args_json) {
    fmx_tool_ctx ctx = ctx_for(task);
    cJSON *args = args_json ? cJSON_Parse(args_json) : NULL;
    if (args_json) assert_non_null(args);
    assert_int_equal(fmx_tools_run(&ctx, tool, args, r), FMX_OK);
    cJSON_Delete(args);
    assert_non_null(r->observation);
    assert_string_equal(cJSON_GetObjectItem(r->observation, "tool")->valuestring, tool);
    assert_true(cJSON_IsString(cJSON_GetObjectItem(r->observation, "text")));
    assert_true(cJSON_IsObject(cJSON_GetObjectItem(r->observation, "data")));
    return r->observation;
}

static const char *text_of(const cJSON *obs) {
    return cJSON_GetObjectItem(obs, "text")->valuestring;
}
static const cJSON *data_of(const cJSON *obs) {
    return cJSON_GetObjectItem(obs, "data");
}
static const char *error_of(const cJSON *obs) {
    const cJSON *e = cJSON_GetObjectItem(obs, "error");
    return e ? e->valuestring : NULL;
}

static void has(const char *text, const char *want) {
    if (!strstr(text, want)) fail_msg("'%s' not in:\n%s", want, text);
}
static void hasnt(const char *text, const char *unwanted) {
    if (strstr(text, unwanted)) fail_msg("'%s' unexpectedly in:\n%s", unwanted, text);
}

/* ---- tasks ---- */

static void test_task_list(void **state) {
    (void)state;
    assert_string_equal(model_task->kind, "model");
    assert_string_equal(model_task->path, "");
    assert_string_equal(model_task->cls, "Qwen2ForCausalLM");
    assert_string_equal(mlp_task->kind, "component");
    assert_string_equal(mlp_task->path, "model.layers.0.mlp"); /* first instance */
    /* gate and up (160×64) and down (64×160) in the default tiny config */
    assert_int_equal(mlp_task->params, 3 * 64 * 160);
    assert_true(model_task->params > mlp_task->params);
    /* heuristic: 12 + 3 per distinct class below (Linear, SiLU) */
    assert_int_equal(mlp_task->target_loc, 18);
    assert_true(model_task->target_loc >= 60);
    /* one task per class; ModuleList is never called, so it is no task */
    assert_null(fmx_tasks_find(tasks, "qwen2/ModuleList"));
    assert_non_null(fmx_tasks_find(tasks, "qwen2/Qwen2Attention"));
    assert_non_null(fmx_tasks_find(tasks, "qwen2/Linear"));
    int linear = 0;
    for (int i = 0; i < fmx_tasks_count(tasks); i++)
        linear += strcmp(fmx_tasks_get(tasks, i)->id, "qwen2/Linear") == 0;
    assert_int_equal(linear, 1);
    cJSON *list = fmx_tasks_json(tasks);
    cJSON *first = cJSON_GetArrayItem(list, 0);
    for (const char *const *k = (const char *const[]){"id", "kind", "pack", "module", "class",
                                                      "params", "target_loc", NULL};
         *k; k++)
        assert_non_null(cJSON_GetObjectItem(first, *k));
    cJSON_Delete(list);
}

static void test_tasks_errors(void **state) {
    (void)state;
    char err[1024];
    fmx_tasks *t = NULL;
    assert_int_equal(fmx_tasks_open("/nonexistent-dir", &t, NULL, err, sizeof err), FMX_EIO);
    assert_null(t);
    assert_int_equal(fmx_tasks_open("/proc/self", &t, NULL, err, sizeof err), FMX_ENOTFOUND);
    has(err, "no packs");
}

/* ---- read_module_source ---- */

static void test_read_source(void **state) {
    (void)state;
    fmx_tool_result r;
    const cJSON *o = run(&r, mlp_task, "read_module_source", NULL);
    assert_null(error_of(o));
    const char *t = text_of(o);
    has(t, "class Qwen2MLP(nn.Module):");
    has(t, "self.gate_proj = nn.Linear"); /* full mode: __init__ too */
    has(t, "\u00b7 |         super().__init__()");
    has(t, "return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))");
    assert_string_equal(cJSON_GetObjectItem(data_of(o), "class")->valuestring, "Qwen2MLP");
    const cJSON *lines = cJSON_GetObjectItem(
        cJSON_GetArrayItem(cJSON_GetObjectItem(data_of(o), "classes"), 0), "lines");
    assert_true(cJSON_GetArraySize(lines) >= 9);
    fmx_tool_result_clear(&r);

    o = run(&r, mlp_task, "read_module_source", "{\"mode\": \"live\"}");
    t = text_of(o);
    hasnt(t, "self.gate_proj = nn.Linear");
    has(t, "lines not run");
    has(t, "def forward(self, x: torch.Tensor) -> torch.Tensor:");
    has(t, "return self.down_proj(");
    fmx_tool_result_clear(&r);

    /* bases from the package come along: Qwen2ForCausalLM(Qwen2PreTrainedModel) */
    o = run(&r, model_task, "read_module_source", "{\"path\": \"\"}");
    has(text_of(o), "class Qwen2ForCausalLM");
    has(text_of(o), "class Qwen2PreTrainedModel");
    fmx_tool_result_clear(&r);

    /* the file's functions the class calls come along, also indirectly
     * (apply_rotary_pos_emb calls rotate_half); one that never ran is named */
    const fmx_task *attn = fmx_tasks_find(tasks, "qwen2/Qwen2Attention");
    o = run(&r, attn, "read_module_source", "{\"mode\": \"live\"}");
    has(text_of(o), "# function apply_rotary_pos_emb");
    has(text_of(o), "# function rotate_half");
    has(text_of(o), "# function eager_attention_forward");
    has(text_of(o), "never ran: sdpa_attention_forward");
    assert_true(cJSON_GetArraySize(cJSON_GetObjectItem(data_of(o), "functions")) >= 3);
    fmx_tool_result_clear(&r);

    /* a torch class has no source in the pack: say so, show its ops */
    o = run(&r, model_task, "read_module_source", "{\"path\": \"model.layers.0.mlp.up_proj\"}");
    assert_null(error_of(o));
    has(text_of(o), "its source is not in the pack");
    has(text_of(o), "torch.nn.functional.linear");
    fmx_tool_result_clear(&r);

    o = run(&r, mlp_task, "read_module_source", "{\"mode\": \"short\"}");
    assert_string_equal(error_of(o), "bad_args");
    has(text_of(o), "full|live");
    fmx_tool_result_clear(&r);
}

static void test_unknown_path(void **state) {
    (void)state;
    fmx_tool_result r;
    const char *tools[] = {"read_module_source", "get_weight_info", "trace_ops"};
    for (int i = 0; i < 3; i++) {
        const cJSON *o = run(&r, model_task, tools[i], "{\"path\": \"model.layer.0.mlp\"}");
        assert_string_equal(error_of(o), "unknown_path");
        const cJSON *near = cJSON_GetObjectItem(data_of(o), "nearest");
        assert_int_equal(cJSON_GetArraySize(near), 3);
        assert_string_equal(cJSON_GetArrayItem(near, 0)->valuestring, "model.layers.0.mlp");
        has(text_of(o), "\"model.layers.0.mlp\" (Qwen2MLP)");
        fmx_tool_result_clear(&r);
    }
    const cJSON *o =
        run(&r, model_task, "capture_intermediate", "{\"path\": \"model.layers.9\", \"probe\": 0}");
    assert_string_equal(error_of(o), "unknown_path");
    fmx_tool_result_clear(&r);
}

/* ---- get_weight_info ---- */

static void test_weight_info(void **state) {
    (void)state;
    fmx_tool_result r;
    const cJSON *o = run(&r, mlp_task, "get_weight_info", NULL);
    assert_null(error_of(o));
    const cJSON *w = cJSON_GetObjectItem(data_of(o), "weights");
    assert_int_equal(cJSON_GetArraySize(w), 3);
    int found = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, w) {
        if (strcmp(cJSON_GetObjectItem(it, "name")->valuestring, "gate_proj.weight") != 0) continue;
        found = 1;
        const cJSON *shape = cJSON_GetObjectItem(it, "shape");
        assert_int_equal(cJSON_GetArrayItem(shape, 0)->valueint, 160);
        assert_int_equal(cJSON_GetArrayItem(shape, 1)->valueint, 64);
        assert_string_equal(cJSON_GetObjectItem(it, "dtype")->valuestring, "float32");
        assert_true(cJSON_IsFalse(cJSON_GetObjectItem(it, "buffer")));
        assert_true(cJSON_IsNull(cJSON_GetObjectItem(it, "tied_to")));
    }
    assert_true(found);
    assert_int_equal(cJSON_GetObjectItem(data_of(o), "params")->valueint, 30720);
    has(text_of(o), "gate_proj.weight");
    has(text_of(o), "(160, 64)");
    fmx_tool_result_clear(&r);

    /* buffers are marked and not counted as parameters */
    o = run(&r, model_task, "get_weight_info", "{\"path\": \"model.rotary_emb\"}");
    w = cJSON_GetObjectItem(data_of(o), "weights");
    assert_int_equal(cJSON_GetArraySize(w), 1);
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(w, 0), "name")->valuestring,
                        "inv_freq");
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(cJSON_GetArrayItem(w, 0), "buffer")));
    assert_int_equal(cJSON_GetObjectItem(data_of(o), "params")->valueint, 0);
    has(text_of(o), "buffer");
    fmx_tool_result_clear(&r);

    o = run(&r, model_task, "get_weight_info", "{\"path\": \"model.layers.0.mlp.act_fn\"}");
    has(text_of(o), "no parameters");
    fmx_tool_result_clear(&r);
}

/* ---- capture_intermediate ---- */

static void test_capture(void **state) {
    (void)state;
    fmx_tool_result r;
    const cJSON *o = run(&r, mlp_task, "capture_intermediate", "{\"probe\": 0}");
    assert_null(error_of(o));
    const cJSON *d = data_of(o);
    const cJSON *in = cJSON_GetArrayItem(cJSON_GetObjectItem(d, "inputs"), 0);
    assert_string_equal(cJSON_GetObjectItem(in, "name")->valuestring, "x");
    assert_string_equal(cJSON_GetObjectItem(in, "kind")->valuestring, "tensor");
    assert_string_equal(cJSON_GetObjectItem(in, "dtype")->valuestring, "float32");
    const cJSON *shape = cJSON_GetObjectItem(in, "shape");
    assert_int_equal(cJSON_GetArraySize(shape), 3);
    assert_int_equal(cJSON_GetArrayItem(shape, 2)->valueint, 64);
    assert_null(cJSON_GetObjectItem(in, "values"));

    /* the statistics are those of the captured tensor */
    const fmx_call *call =
        fmx_pack_call(mlp_task->pack, fmx_pack_find_call(mlp_task->pack, 0, mlp_task->module, 0));
    const fmx_tensor *x = fmx_pack_capture(mlp_task->pack, call->inputs[0].key);
    int64_t sh[FMX_MAX_DIMS];
    fmx_dtype dt;
    int nd = fmx_tensor_shape(x, sh, &dt);
    size_t n = 1;
    for (int i = 0; i < nd; i++)
        n *= (size_t)sh[i];
    float *buf = malloc(n * sizeof *buf);
    char err[256];
    assert_int_equal(fmx_tensor_read(x, buf, n * sizeof *buf, err, sizeof err), FMX_OK);
    double sum = 0, mn = INFINITY, mx = -INFINITY;
    for (size_t i = 0; i < n; i++) {
        sum += buf[i];
        mn = fmin(mn, buf[i]);
        mx = fmax(mx, buf[i]);
    }
    const cJSON *stats = cJSON_GetObjectItem(in, "stats");
    assert_true(fabs(cJSON_GetObjectItem(stats, "mean")->valuedouble - sum / (double)n) < 1e-9);
    assert_true(cJSON_GetObjectItem(stats, "min")->valuedouble == mn);
    assert_true(cJSON_GetObjectItem(stats, "max")->valuedouble == mx);
    assert_true(cJSON_GetObjectItem(stats, "std")->valuedouble > 0);
    const cJSON *out = cJSON_GetArrayItem(cJSON_GetObjectItem(d, "outputs"), 0);
    assert_string_equal(cJSON_GetObjectItem(out, "name")->valuestring, "0");
    has(text_of(o), "x ");
    has(text_of(o), "min ");
    fmx_tool_result_clear(&r);

    /* values on request, as nested lists */
    o = run(&r, mlp_task, "capture_intermediate", "{\"probe\": \"p0\", \"values\": true}");
    in = cJSON_GetArrayItem(cJSON_GetObjectItem(data_of(o), "inputs"), 0);
    const cJSON *v = cJSON_GetObjectItem(in, "values");
    assert_int_equal(cJSON_GetArraySize(v), (int)sh[0]);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetArrayItem(v, 0)), (int)sh[1]);
    const cJSON *row = cJSON_GetArrayItem(cJSON_GetArrayItem(v, 0), 0);
    assert_int_equal(cJSON_GetArraySize(row), 64);
    assert_true(cJSON_GetArrayItem(row, 5)->valuedouble == buf[5]);
    has(text_of(o), "values:");
    fmx_tool_result_clear(&r);
    free(buf);

    /* a big tensor is cut to a leading slice of at most 4096 values */
    o = run(&r, model_task, "capture_intermediate",
            "{\"path\": \"model.embed_tokens\", \"probe\": 1, \"values\": true}");
    assert_null(error_of(o));
    out = cJSON_GetArrayItem(cJSON_GetObjectItem(data_of(o), "outputs"), 0);
    assert_non_null(cJSON_GetObjectItem(out, "values"));
    if (cJSON_GetObjectItem(out, "values_slice")) has(text_of(o), "elements):");
    fmx_tool_result_clear(&r);

    /* a module called several times: call index within range */
    o = run(&r, mlp_task, "capture_intermediate", "{\"probe\": 0, \"call\": 1}");
    assert_string_equal(error_of(o), "out_of_range");
    has(text_of(o), "call 0..0");
    fmx_tool_result_clear(&r);

    o = run(&r, mlp_task, "capture_intermediate", "{\"probe\": 99}");
    assert_string_equal(error_of(o), "out_of_range");
    has(text_of(o), "Visible probes: 0 (\"p0\"");
    fmx_tool_result_clear(&r);
}

/* A bfloat16 probe (the exporter adds one): stats from the bf16 values. */
static void test_capture_bf16(void **state) {
    (void)state;
    fmx_pack *pack = mlp_task->pack;
    int pi = -1;
    for (int i = 0; i < fmx_pack_nprobes(pack) && pi < 0; i++)
        if (fmx_pack_probe(pack, i)->visible && fmx_pack_probe(pack, i)->dtype == FMX_DT_BF16)
            pi = i;
    if (pi < 0) {
        fprintf(stderr, "note: the pack has no visible bfloat16 probe; bf16 stats not tested\n");
        return;
    }
    char args[64];
    snprintf(args, sizeof args, "{\"probe\": %d, \"values\": true}", pi);
    fmx_tool_result r;
    const cJSON *o = run(&r, mlp_task, "capture_intermediate", args);
    assert_null(error_of(o));
    const cJSON *in = cJSON_GetArrayItem(cJSON_GetObjectItem(data_of(o), "inputs"), 0);
    assert_string_equal(cJSON_GetObjectItem(in, "dtype")->valuestring, "bfloat16");
    const fmx_call *call = fmx_pack_call(pack, fmx_pack_find_call(pack, pi, mlp_task->module, 0));
    const fmx_tensor *x = fmx_pack_capture(pack, call->inputs[0].key);
    int64_t sh[FMX_MAX_DIMS];
    fmx_dtype dt;
    int nd = fmx_tensor_shape(x, sh, &dt);
    size_t n = 1;
    for (int i = 0; i < nd; i++)
        n *= (size_t)sh[i];
    uint16_t *raw = malloc(n * 2);
    char err[256];
    assert_int_equal(fmx_tensor_read(x, raw, n * 2, err, sizeof err), FMX_OK);
    double mx = -INFINITY;
    for (size_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)raw[i] << 16;
        float f;
        memcpy(&f, &bits, 4);
        mx = fmax(mx, f);
    }
    const cJSON *stats = cJSON_GetObjectItem(in, "stats");
    assert_true(cJSON_GetObjectItem(stats, "max")->valuedouble == mx);
    const cJSON *v = cJSON_GetObjectItem(in, "values");
    while (cJSON_IsArray(v))
        v = cJSON_GetArrayItem(v, 0);
    uint32_t bits = (uint32_t)raw[0] << 16;
    float first;
    memcpy(&first, &bits, 4);
    assert_true(v->valuedouble == first);
    free(raw);
    fmx_tool_result_clear(&r);
}

static void test_hidden_probe_refused(void **state) {
    (void)state;
    fmx_pack *pack = mlp_task->pack;
    int hidden = -1;
    for (int i = 0; i < fmx_pack_nprobes(pack) && hidden < 0; i++)
        if (!fmx_pack_probe(pack, i)->visible) hidden = i;
    assert_true(hidden >= 0);
    char args[128];
    fmx_tool_result r;
    for (int by_name = 0; by_name < 2; by_name++) {
        if (by_name)
            snprintf(args, sizeof args, "{\"probe\": \"%s\", \"values\": true}",
                     fmx_pack_probe(pack, hidden)->name);
        else
            snprintf(args, sizeof args, "{\"probe\": %d, \"values\": true}", hidden);
        const cJSON *o = run(&r, mlp_task, "capture_intermediate", args);
        assert_string_equal(error_of(o), "hidden_probe");
        has(text_of(o), "hidden");
        hasnt(text_of(o), "tensor");
        hasnt(text_of(o), "min ");
        assert_null(cJSON_GetObjectItem(data_of(o), "inputs"));
        assert_null(cJSON_GetObjectItem(data_of(o), "outputs"));
        fmx_tool_result_clear(&r);
    }
}

/* ---- trace_ops ---- */

static void test_trace_ops(void **state) {
    (void)state;
    fmx_tool_result r;
    const cJSON *o = run(&r, mlp_task, "trace_ops", NULL);
    assert_null(error_of(o));
    /* the dataflow: values by name, a child's inputs, what the module returns */
    has(text_of(o), "v0 = call model.layers.0.mlp.gate_proj (Linear)(input=x)");
    has(text_of(o), "= torch.Tensor.mul(v");
    has(text_of(o), "returns [v");
    assert_true(cJSON_GetArraySize(cJSON_GetObjectItem(data_of(o), "ops")) >= 4);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(data_of(o), "dataflow")),
                        "general");
    assert_string_equal(
        cJSON_GetStringValue(cJSON_GetArrayItem(cJSON_GetObjectItem(data_of(o), "inputs"), 0)),
        "x");
    fmx_tool_result_clear(&r);
    /* sizes that follow the input are written as expressions */
    o = run(&r, model_task, "trace_ops", "{\"path\": \"model.layers.0.self_attn\"}");
    has(text_of(o), "view(v0, (hidden_states.size(0), hidden_states.size(1), -1, 16))");
    fmx_tool_result_clear(&r);
    /* a container is never called itself: said so, not an error */
    o = run(&r, model_task, "trace_ops", "{\"path\": \"model.layers\"}");
    assert_null(error_of(o));
    has(text_of(o), "no op trace");
    fmx_tool_result_clear(&r);
}

/* ---- refusals ---- */

static void test_unknown_tool_and_bad_args(void **state) {
    (void)state;
    fmx_tool_result r;
    const cJSON *o = run(&r, mlp_task, "read_source", "{}");
    assert_string_equal(error_of(o), "unknown_tool");
    has(text_of(o), "read_module_source(path");
    has(text_of(o), "submit(code");
    fmx_tool_result_clear(&r);

    o = run(&r, mlp_task, "get_weight_info", "{\"module\": \"model\"}");
    assert_string_equal(error_of(o), "bad_args");
    has(text_of(o), "no argument 'module'");
    has(text_of(o), "get_weight_info takes: path");
    fmx_tool_result_clear(&r);

    o = run(&r, mlp_task, "capture_intermediate", "{}");
    assert_string_equal(error_of(o), "bad_args");
    has(text_of(o), "needs 'probe'");
    fmx_tool_result_clear(&r);

    o = run(&r, mlp_task, "capture_intermediate", "{\"probe\": 0, \"call\": \"first\"}");
    assert_string_equal(error_of(o), "bad_args");
    has(text_of(o), "must be an integer");
    fmx_tool_result_clear(&r);

    o = run(&r, mlp_task, "capture_intermediate", "{\"probe\": 0.5}");
    assert_string_equal(error_of(o), "bad_args");
    fmx_tool_result_clear(&r);

    o = run(&r, mlp_task, "verify_component", "{\"path\": 3, \"code\": \"\"}");
    assert_string_equal(error_of(o), "bad_args");
    fmx_tool_result_clear(&r);

    fmx_tool_ctx ctx = ctx_for(mlp_task);
    ctx.max_code_bytes = 100;
    cJSON *args = cJSON_CreateObject();
    cJSON_AddStringToObject(args, "code", WRONG_MLP);
    assert_int_equal(fmx_tools_run(&ctx, "submit", args, &r), FMX_OK);
    assert_string_equal(error_of(r.observation), "code_too_long");
    assert_false(r.submitted);
    fmx_tool_result_clear(&r);
    cJSON_Delete(args);
}

/* ---- verify_component and submit ---- */

static cJSON *code_args(const char *code, const char *entry, const char *path) {
    cJSON *a = cJSON_CreateObject();
    cJSON_AddStringToObject(a, "code", code);
    if (entry) cJSON_AddStringToObject(a, "entry", entry);
    if (path) cJSON_AddStringToObject(a, "path", path);
    return a;
}

static void test_verify_component(void **state) {
    (void)state;
    fmx_tool_ctx ctx = ctx_for(mlp_task);
    fmx_tool_result r;
    cJSON *a = code_args(solution, "mlp", NULL);
    assert_int_equal(fmx_tools_run(&ctx, "verify_component", a, &r), FMX_OK);
    cJSON_Delete(a);
    assert_null(r.error);
    const cJSON *d = data_of(r.observation);
    assert_string_equal(cJSON_GetObjectItem(d, "status")->valuestring, "match");
    assert_string_equal(cJSON_GetObjectItem(d, "probes_graded")->valuestring, "visible");
    const cJSON *p;
    cJSON_ArrayForEach(p, cJSON_GetObjectItem(d, "probes"))
        assert_true(cJSON_IsTrue(cJSON_GetObjectItem(p, "visible")));
    has(text_of(r.observation), "MATCH");
    assert_true(r.verified_task_code);
    assert_false(r.submitted);
    fmx_tool_result_clear(&r);

    a = code_args(WRONG_MLP, NULL, NULL);
    assert_int_equal(fmx_tools_run(&ctx, "verify_component", a, &r), FMX_OK);
    cJSON_Delete(a);
    assert_string_equal(cJSON_GetObjectItem(data_of(r.observation), "status")->valuestring,
                        "mismatch");
    has(text_of(r.observation), "MISMATCH");
    assert_true(r.verified_task_code); /* it compiled */
    fmx_tool_result_clear(&r);

    a = code_args("def forward(:\n", NULL, NULL);
    assert_int_equal(fmx_tools_run(&ctx, "verify_component", a, &r), FMX_OK);
    cJSON_Delete(a);
    const cJSON *e = cJSON_GetObjectItem(data_of(r.observation), "error");
    assert_string_equal(cJSON_GetObjectItem(e, "stage")->valuestring, "compile");
    has(text_of(r.observation), "candidate.py:1:");
    assert_false(r.verified_task_code);
    fmx_tool_result_clear(&r);

    /* another module than the task's: verified, but not remembered */
    a = code_args(solution, "rms_norm", "model.norm");
    assert_int_equal(fmx_tools_run(&ctx, "verify_component", a, &r), FMX_OK);
    cJSON_Delete(a);
    assert_string_equal(cJSON_GetObjectItem(data_of(r.observation), "status")->valuestring,
                        "match");
    assert_false(r.verified_task_code);
    fmx_tool_result_clear(&r);
}

/* Every probe but the generation steps (those are the decode task's). */
static int ordinary_probes(fmx_pack *pack) {
    int n = 0;
    for (int i = 0; i < fmx_pack_nprobes(pack); i++)
        n += fmx_pack_probe(pack, i)->step < 0;
    return n;
}

static void test_submit(void **state) {
    (void)state;
    fmx_tool_ctx ctx = ctx_for(mlp_task);
    fmx_tool_result r;
    cJSON *a = code_args(solution, "mlp", NULL);
    assert_int_equal(fmx_tools_run(&ctx, "submit", a, &r), FMX_OK);
    cJSON_Delete(a);
    assert_true(r.submitted);
    assert_true(r.grade.facts.correctness == 1.0);
    assert_int_equal(r.grade.graded_probes, ordinary_probes(mlp_task->pack));
    assert_true(r.grade.facts.compiled);
    assert_true(r.grade.facts.runs_all_shapes);
    assert_true(r.grade.score.reward >= reward.w_correct + reward.w_compile - 1e-9);
    has(text_of(r.observation), "(hidden) ok");
    has(text_of(r.observation), "episode is over");
    fmx_tool_result_clear(&r);

    a = code_args(WRONG_MLP, NULL, NULL);
    assert_int_equal(fmx_tools_run(&ctx, "submit", a, &r), FMX_OK);
    cJSON_Delete(a);
    assert_true(r.submitted);
    assert_true(r.grade.facts.correctness == 0.0);
    assert_true(r.grade.score.reward == 0.0);
    fmx_tool_result_clear(&r);

    a = code_args("def forward(:\n", NULL, NULL);
    assert_int_equal(fmx_tools_run(&ctx, "submit", a, &r), FMX_OK);
    cJSON_Delete(a);
    assert_true(r.submitted);
    assert_false(r.grade.facts.compiled);
    assert_true(r.grade.score.reward == 0.0);
    fmx_tool_result_clear(&r);

    /* Right on one shape, a run error on the others: every probe still gets
     * a verdict (verify goes on after a run error). */
    a = code_args(P0_ONLY_MLP, NULL, NULL);
    assert_int_equal(fmx_tools_run(&ctx, "submit", a, &r), FMX_OK);
    cJSON_Delete(a);
    assert_int_equal(r.grade.graded_probes, ordinary_probes(mlp_task->pack));
    assert_int_equal(r.grade.passed_probes, 1);
    assert_true(r.grade.facts.compiled);
    assert_false(r.grade.facts.runs_all_shapes);
    assert_true(fabs(r.grade.score.reward - reward.w_correct / ordinary_probes(mlp_task->pack)) <
                1e-9);
    fmx_tool_result_clear(&r);
}

/* Verifies run on worker threads while the main thread reads the pack:
 * worker threads verify every module of the pack (a module that is no task's
 * builds cast views on first use when the pack has a bfloat16 probe) while
 * this thread lists weights. Every verify must complete with a report. */
static const char TRIVIAL[] = "import torch\n"
                              "from torch import Tensor\n"
                              "from typing import Dict\n"
                              "def forward(weights: Dict[str, Tensor]) -> Tensor:\n"
                              "    return torch.zeros(1)\n";

typedef struct {
    int first, step;
    int reports, matches;
} verify_job;

static void *verify_thread(void *arg) {
    verify_job *j = arg;
    fmx_tool_ctx ctx = ctx_for(mlp_task);
    fmx_pack *pack = mlp_task->pack;
    for (int m = j->first; m < fmx_pack_nmodules(pack); m += j->step) {
        const char *path = fmx_pack_module(pack, m)->path;
        int is_mlp = strcmp(fmx_pack_module(pack, m)->cls, "Qwen2MLP") == 0;
        cJSON *a = code_args(is_mlp ? solution : TRIVIAL, is_mlp ? "mlp" : NULL, path);
        fmx_tool_result r;
        if (fmx_tools_run(&ctx, "verify_component", a, &r) == FMX_OK) {
            const cJSON *st = cJSON_GetObjectItem(data_of(r.observation), "status");
            j->reports += cJSON_IsString(st);
            j->matches += is_mlp && cJSON_IsString(st) && strcmp(st->valuestring, "match") == 0;
        }
        fmx_tool_result_clear(&r);
        cJSON_Delete(a);
    }
    return NULL;
}

static void test_concurrent_verify(void **state) {
    (void)state;
    fmx_pack *pack = mlp_task->pack;
    verify_job jobs[3] = {{0, 3, 0, 0}, {1, 3, 0, 0}, {2, 3, 0, 0}};
    pthread_t th[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(pthread_create(&th[i], NULL, verify_thread, &jobs[i]), 0);
    for (int i = 0; i < 400; i++) {
        char args[256];
        snprintf(args, sizeof args, "{\"path\": \"%s\"}",
                 fmx_pack_module(pack, i % fmx_pack_nmodules(pack))->path);
        fmx_tool_result r;
        const cJSON *o = run(&r, model_task, "get_weight_info", args);
        assert_null(error_of(o));
        fmx_tool_result_clear(&r);
    }
    for (int i = 0; i < 3; i++)
        pthread_join(th[i], NULL);
    int reports = 0, matches = 0, mlps = 0;
    for (int i = 0; i < 3; i++) {
        reports += jobs[i].reports;
        matches += jobs[i].matches;
    }
    for (int m = 0; m < fmx_pack_nmodules(pack); m++)
        mlps += strcmp(fmx_pack_module(pack, m)->cls, "Qwen2MLP") == 0;
    assert_int_equal(reports, fmx_pack_nmodules(pack));
    assert_int_equal(matches, mlps);
}

/* ---- episodes ---- */

/* One whole step: plan, execute, apply. */
static void step(fmx_episode *ep, const char *tool, cJSON *args, fmx_step_result *res) {
    fmx_step_plan plan;
    fmx_step_outcome out;
    assert_int_equal(fmx_episode_plan(ep, tool, args, &plan), FMX_OK);
    assert_int_equal(fmx_episode_execute(&plan, &out), FMX_OK);
    assert_int_equal(fmx_episode_apply(ep, &plan, &out, res), FMX_OK);
    /* the result borrows graded code: copy what the tests look at */
    if (res->graded) res->graded_code = res->graded_code ? "set" : NULL;
    res->grade = NULL;
    fmx_step_outcome_clear(&out);
    fmx_step_plan_clear(&plan);
    cJSON_Delete(args);
}

static void test_goal(void **state) {
    (void)state;
    fmx_budget b = fmx_budget_default();
    fmx_episode *ep = fmx_episode_create(1, mlp_task, "t", 0, "id", 2, b, &reward);
    cJSON *goal = fmx_episode_goal(ep);
    const char *t = text_of(goal);
    has(t, "model.layers.0.mlp");
    has(t, "def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor");
    has(t, "(1, 8, 64) float32");
    has(t, "40 steps");
    has(t, "65536 bytes");
    has(t, "verify_component(path, code");
    cJSON_Delete(goal);
    assert_true(fmx_episode_owned_by(ep, "id", 2));
    assert_false(fmx_episode_owned_by(ep, "ie", 2));
    assert_false(fmx_episode_owned_by(ep, "id1", 3));
    fmx_episode_destroy(ep);

    ep = fmx_episode_create(2, model_task, "t", 0, "id", 2, b, &reward);
    goal = fmx_episode_goal(ep);
    has(text_of(goal), "def forward(input_ids: Tensor, attention_mask: Tensor, weights");
    has(text_of(goal), "None on this call");
    cJSON_Delete(goal);
    fmx_episode_destroy(ep);
}

static void test_episode_submit(void **state) {
    (void)state;
    fmx_episode *ep =
        fmx_episode_create(3, mlp_task, "t", 0, "id", 2, fmx_budget_default(), &reward);
    fmx_step_result res;
    step(ep, "trace_ops", NULL, &res);
    assert_int_equal(res.idx, 0);
    assert_false(res.terminated || res.truncated);
    assert_true(res.reward == 0);
    fmx_step_result_clear(&res);
    step(ep, "nope", NULL, &res);
    assert_string_equal(res.error, "unknown_tool");
    assert_int_equal(fmx_episode_status_of(ep), FMX_EP_OPEN);
    fmx_step_result_clear(&res);
    step(ep, "submit", code_args(solution, "mlp", NULL), &res);
    assert_int_equal(res.idx, 2);
    assert_true(res.terminated);
    assert_false(res.truncated);
    assert_true(res.graded);
    assert_true(res.reward > 0.7);
    assert_int_equal(fmx_episode_status_of(ep), FMX_EP_SUBMITTED);
    assert_non_null(cJSON_GetObjectItem(res.info, "grade"));
    fmx_step_result_clear(&res);
    fmx_episode_destroy(ep);
}

static void test_episode_truncated(void **state) {
    (void)state;
    fmx_budget b = {.max_steps = 3, .max_code_bytes = 65536};
    /* last verified code is graded when the steps run out */
    fmx_episode *ep = fmx_episode_create(4, mlp_task, "t", 0, "id", 2, b, &reward);
    fmx_step_result res;
    step(ep, "verify_component", code_args(solution, "mlp", NULL), &res);
    fmx_step_result_clear(&res);
    step(ep, "verify_component", code_args("def forward(:\n", NULL, NULL), &res);
    fmx_step_result_clear(&res); /* did not compile: not remembered */
    fmx_step_plan plan;
    assert_int_equal(fmx_episode_plan(ep, "trace_ops", NULL, &plan), FMX_OK);
    assert_true(plan.final);
    assert_true(plan.heavy); /* it has code to grade */
    fmx_step_plan_clear(&plan);
    step(ep, "trace_ops", NULL, &res);
    assert_true(res.truncated);
    assert_false(res.terminated);
    assert_true(res.graded);
    assert_true(res.reward > 0.7);
    has(text_of(res.observation), "Budget exhausted (3/3 steps)");
    has(text_of(res.observation), "graded as if submitted");
    assert_int_equal(fmx_episode_status_of(ep), FMX_EP_TRUNCATED);
    fmx_step_result_clear(&res);
    fmx_episode_destroy(ep);

    /* nothing verified: reward 0 */
    b.max_steps = 1;
    ep = fmx_episode_create(5, mlp_task, "t", 0, "id", 2, b, &reward);
    step(ep, "get_weight_info", NULL, &res);
    assert_true(res.truncated);
    assert_false(res.graded);
    assert_true(res.reward == 0);
    has(text_of(res.observation), "No code was verified");
    fmx_step_result_clear(&res);
    fmx_episode_destroy(ep);

    /* the final step's own verified code counts */
    ep = fmx_episode_create(6, mlp_task, "t", 0, "id", 2, b, &reward);
    step(ep, "verify_component", code_args(solution, "mlp", NULL), &res);
    assert_true(res.truncated);
    assert_true(res.graded);
    assert_true(res.reward > 0.7);
    fmx_step_result_clear(&res);
    fmx_episode_destroy(ep);
}

static void test_episode_finish(void **state) {
    (void)state;
    fmx_budget b = {.max_steps = 10, .max_code_bytes = 65536};
    /* finish grades the last verified code at once, as a submit would */
    fmx_episode *ep = fmx_episode_create(7, mlp_task, "t", 0, "id", 2, b, &reward);
    fmx_step_result res;
    step(ep, "verify_component", code_args(solution, "mlp", NULL), &res);
    fmx_step_result_clear(&res);
    step(ep, "finish", NULL, &res);
    assert_true(res.terminated);
    assert_false(res.truncated);
    assert_true(res.graded);
    assert_true(res.reward > 0.7);
    has(text_of(res.observation), "graded as if submitted");
    assert_int_equal(fmx_episode_status_of(ep), FMX_EP_SUBMITTED);
    fmx_step_result_clear(&res);
    fmx_episode_destroy(ep);

    /* nothing verified: it ends closed, reward 0 */
    ep = fmx_episode_create(8, mlp_task, "t", 0, "id", 2, b, &reward);
    step(ep, "finish", NULL, &res);
    assert_true(res.terminated);
    assert_false(res.graded);
    assert_true(res.reward == 0);
    has(text_of(res.observation), "No code was verified");
    assert_int_equal(fmx_episode_status_of(ep), FMX_EP_CLOSED);
    fmx_step_result_clear(&res);
    fmx_episode_destroy(ep);

    /* a finish with arguments it does not take is refused and the episode goes on */
    ep = fmx_episode_create(9, mlp_task, "t", 0, "id", 2, b, &reward);
    cJSON *bad = cJSON_CreateObject();
    cJSON_AddNumberToObject(bad, "code", 1);
    step(ep, "finish", bad, &res); /* takes bad */
    assert_false(res.terminated);
    assert_string_equal(res.error, "bad_args");
    assert_int_equal(fmx_episode_status_of(ep), FMX_EP_OPEN);
    fmx_step_result_clear(&res);
    fmx_episode_destroy(ep);
}

/* OpenAI strict mode: every property required, none extra, optional ones
 * nullable; and the server takes null as the default. */
static void test_spec_strict(void **state) {
    (void)state;
    cJSON *spec = fmx_tools_spec_strict();
    const cJSON *t;
    cJSON_ArrayForEach(t, spec) {
        const cJSON *f = cJSON_GetObjectItem(t, "function");
        assert_true(cJSON_IsTrue(cJSON_GetObjectItem(f, "strict")));
        const cJSON *p = cJSON_GetObjectItem(f, "parameters");
        assert_true(cJSON_IsFalse(cJSON_GetObjectItem(p, "additionalProperties")));
        const cJSON *req = cJSON_GetObjectItem(p, "required"), *prop;
        assert_int_equal(cJSON_GetArraySize(req),
                         cJSON_GetArraySize(cJSON_GetObjectItem(p, "properties")));
        cJSON_ArrayForEach(prop, cJSON_GetObjectItem(p, "properties")) {
            int listed = 0;
            const cJSON *r;
            cJSON_ArrayForEach(r, req) listed |= strcmp(r->valuestring, prop->string) == 0;
            assert_true(listed);
        }
    }
    cJSON_Delete(spec);
    /* capture_intermediate's probe is declared a string, as the server names probes */
    spec = fmx_tools_spec();
    cJSON_ArrayForEach(t, spec) {
        const cJSON *f = cJSON_GetObjectItem(t, "function");
        if (strcmp(cJSON_GetObjectItem(f, "name")->valuestring, "capture_intermediate")) continue;
        const cJSON *probe = cJSON_GetObjectItem(
            cJSON_GetObjectItem(cJSON_GetObjectItem(f, "parameters"), "properties"), "probe");
        assert_string_equal(cJSON_GetObjectItem(probe, "type")->valuestring, "string");
    }
    cJSON_Delete(spec);
    fmx_tool_ctx ctx = {.task = mlp_task, .reward = &reward, .max_code_bytes = 65536};
    cJSON *args = cJSON_Parse("{\"path\": null, \"probe\": \"p0\", \"call\": null, "
                              "\"values\": null}");
    fmx_tool_result r;
    assert_int_equal(fmx_tools_run(&ctx, "capture_intermediate", args, &r), FMX_OK);
    assert_null(r.error);
    fmx_tool_result_clear(&r);
    cJSON_Delete(args);
}

static void test_spec(void **state) {
    (void)state;
    cJSON *spec = fmx_tools_spec();
    assert_int_equal(cJSON_GetArraySize(spec), 7);
    const cJSON *t;
    int saw_submit = 0;
    cJSON_ArrayForEach(t, spec) {
        assert_string_equal(cJSON_GetObjectItem(t, "type")->valuestring, "function");
        const cJSON *f = cJSON_GetObjectItem(t, "function");
        const char *name = cJSON_GetObjectItem(f, "name")->valuestring;
        assert_true(fmx_tools_exists(name));
        assert_true(strlen(cJSON_GetObjectItem(f, "description")->valuestring) > 40);
        const cJSON *p = cJSON_GetObjectItem(f, "parameters");
        assert_string_equal(cJSON_GetObjectItem(p, "type")->valuestring, "object");
        const cJSON *props = cJSON_GetObjectItem(p, "properties");
        const cJSON *prop;
        cJSON_ArrayForEach(prop, props) {
            assert_non_null(cJSON_GetObjectItem(prop, "type"));
            assert_non_null(cJSON_GetObjectItem(prop, "description"));
        }
        if (strcmp(name, "submit") == 0) {
            saw_submit = 1;
            assert_string_equal(
                cJSON_GetArrayItem(cJSON_GetObjectItem(p, "required"), 0)->valuestring, "code");
        }
        if (strcmp(name, "read_module_source") == 0)
            assert_int_equal(
                cJSON_GetArraySize(cJSON_GetObjectItem(cJSON_GetObjectItem(props, "mode"), "enum")),
                2);
    }
    assert_true(saw_submit);
    assert_true(fmx_tools_is_heavy("submit") && fmx_tools_is_heavy("verify_component"));
    assert_false(fmx_tools_is_heavy("trace_ops"));
    cJSON_Delete(spec);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_task_list),
        cmocka_unit_test(test_tasks_errors),
        cmocka_unit_test(test_read_source),
        cmocka_unit_test(test_unknown_path),
        cmocka_unit_test(test_weight_info),
        cmocka_unit_test(test_capture),
        cmocka_unit_test(test_capture_bf16),
        cmocka_unit_test(test_hidden_probe_refused),
        cmocka_unit_test(test_trace_ops),
        cmocka_unit_test(test_unknown_tool_and_bad_args),
        cmocka_unit_test(test_verify_component),
        cmocka_unit_test(test_submit),
        cmocka_unit_test(test_concurrent_verify),
        cmocka_unit_test(test_goal),
        cmocka_unit_test(test_episode_submit),
        cmocka_unit_test(test_episode_truncated),
        cmocka_unit_test(test_episode_finish),
        cmocka_unit_test(test_spec_strict),
        cmocka_unit_test(test_spec),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
