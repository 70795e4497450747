/*
 * tools.c — the six tools (tools.h): argument checking against one table
 * that also yields the OpenAI schemas, and one function per tool that turns
 * the pack's manifest, captures and fmx_verify reports into an observation
 * {tool, text, data, error?}. Texts are written for an LLM to read: compact,
 * one fact per line, numbers with units, and every refusal says what would
 * have been valid.
 *
 * Hidden probes: capture_intermediate refuses them, verify_component grades
 * visible probes only, submit reports hidden probes as pass/fail only.
 */
#define _GNU_SOURCE
#include "optrace.h"
#include "tools.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto.h"
#include "pysource.h"
#include "status.h"
#include "verify.h"

#define FMX__VALUES_CAP 4096 /* values per tensor in capture_intermediate */

/* ---- a growable string ---- */

typedef struct {
    char *s;
    size_t n, cap;
    int oom;
} fmx__sb;

static void fmx__sb_put(fmx__sb *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *g = realloc(b->s, cap);
        if (!g) {
            b->oom = 1;
            return;
        }
        b->s = g;
        b->cap = cap;
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = '\0';
}

static void fmx__sb_printf(fmx__sb *b, const char *fmt, ...) {
    char small[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof small) {
        fmx__sb_put(b, small, (size_t)n);
        return;
    }
    char *big = malloc((size_t)n + 1);
    if (!big) {
        b->oom = 1;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    fmx__sb_put(b, big, (size_t)n);
    free(big);
}

static const char *fmx__sb_str(fmx__sb *b) {
    return b->s && !b->oom ? b->s : "";
}

/* ---- the tool table ---- */

typedef enum { FMX__A_STR, FMX__A_INT, FMX__A_BOOL, FMX__A_PROBE } fmx__atype;

typedef struct {
    const char *name;
    fmx__atype type;
    int required;
    const char *choices; /* "full|live" or NULL */
    const char *desc;
} fmx__arg;

typedef struct {
    const char *path, *mode, *code, *entry;
    const cJSON *probe;
    int64_t call;
    int values;
} fmx__args;

static const char fmx__path_desc[] =
    "Module path in the model, dotted as in named_modules() (e.g. \"model.layers.0.self_attn\"; "
    "\"\" is the whole model). Default: the task's module.";
static const char fmx__code_desc[] =
    "A complete Python file in the fmx candidate language: imports only torch, "
    "torch.nn.functional as F, math and typing; typed top-level functions and constants; no "
    "classes, no in-place tensor ops. The entry function takes the module's inputs as keyword "
    "arguments named as in its forward (declare only those you use) plus one "
    "weights: Dict[str, Tensor] keyed relative to the module path, and returns the module's "
    "tensor outputs in order (a Tensor or a tuple).";
static const char fmx__entry_desc[] = "Name of the function to call. Default: \"forward\".";

static const fmx__arg fmx__args_source[] = {
    {"path", FMX__A_STR, 0, NULL, fmx__path_desc},
    {"mode", FMX__A_STR, 0, "full|live",
     "\"full\" (default): every line of the class; \"live\": only the lines that ran on the "
     "probes, with markers where lines were left out."},
};
static const fmx__arg fmx__args_weights[] = {{"path", FMX__A_STR, 0, NULL, fmx__path_desc}};
static const fmx__arg fmx__args_capture[] = {
    {"path", FMX__A_STR, 0, NULL, fmx__path_desc},
    {"probe", FMX__A_PROBE, 1, NULL,
     "A visible probe's name (\"p0\", \"p1\", ...; the index as an integer works too). Hidden "
     "probes are refused."},
    {"call", FMX__A_INT, 0, NULL,
     "Which call of the module on that probe, 0 = the first (a module used in a loop or shared "
     "is called several times). Default: 0."},
    {"values", FMX__A_BOOL, 0, NULL,
     "Also return the tensor values (at most 4096 per tensor: a leading slice of bigger ones). "
     "Default: false."},
};
static const fmx__arg fmx__args_trace[] = {{"path", FMX__A_STR, 0, NULL, fmx__path_desc}};
static const fmx__arg fmx__args_verify[] = {
    {"path", FMX__A_STR, 0, NULL, fmx__path_desc},
    {"code", FMX__A_STR, 1, NULL, fmx__code_desc},
    {"entry", FMX__A_STR, 0, NULL, fmx__entry_desc},
};
static const fmx__arg fmx__args_submit[] = {
    {"code", FMX__A_STR, 1, NULL, fmx__code_desc},
    {"entry", FMX__A_STR, 0, NULL, fmx__entry_desc},
};

typedef struct fmx__tool fmx__tool;
typedef void (*fmx__tool_fn)(const fmx_tool_ctx *ctx, const fmx__args *a, fmx_tool_result *out,
                             fmx__sb *text, cJSON *data);

struct fmx__tool {
    const char *name;
    const char *summary; /* one line for goal texts */
    const char *desc;    /* for the schema */
    const fmx__arg *args;
    int nargs;
    int heavy;
    fmx__tool_fn fn;
};

static void fmx__read_module_source(const fmx_tool_ctx *, const fmx__args *, fmx_tool_result *,
                                    fmx__sb *, cJSON *);
static void fmx__get_weight_info(const fmx_tool_ctx *, const fmx__args *, fmx_tool_result *,
                                 fmx__sb *, cJSON *);
static void fmx__capture_intermediate(const fmx_tool_ctx *, const fmx__args *, fmx_tool_result *,
                                      fmx__sb *, cJSON *);
static void fmx__trace_ops(const fmx_tool_ctx *, const fmx__args *, fmx_tool_result *, fmx__sb *,
                           cJSON *);
static void fmx__verify_component(const fmx_tool_ctx *, const fmx__args *, fmx_tool_result *,
                                  fmx__sb *, cJSON *);
static void fmx__submit(const fmx_tool_ctx *, const fmx__args *, fmx_tool_result *, fmx__sb *,
                        cJSON *);
static void fmx__finish(const fmx_tool_ctx *, const fmx__args *, fmx_tool_result *, fmx__sb *,
                        cJSON *);

#define FMX__N(a) ((int)(sizeof(a) / sizeof((a)[0])))

static const fmx__tool fmx__tools[] = {
    {"read_module_source",
     "read_module_source(path, mode=\"full\"|\"live\") — the module's class source, its base "
     "classes and the functions it calls, each line with how often it ran",
     "Read the Python source of the module class at `path`, of its base classes from the "
     "model's package, and of the module-level functions it calls (directly or through each "
     "other). Each line starts with how many times it ran on the probes (all instances of the "
     "class together), or \u00b7 if it never ran. mode=\"live\" keeps only the code path this "
     "model actually takes.",
     fmx__args_source, FMX__N(fmx__args_source), 0, fmx__read_module_source},
    {"get_weight_info",
     "get_weight_info(path) — parameter and buffer names (relative to path), shapes, dtypes, "
     "ties",
     "List the parameters and buffers the module at `path` sees, named relative to `path` "
     "exactly as the keys of the `weights` dict your function receives, with shapes, dtypes, "
     "which names are tied to the same tensor, and which are buffers.",
     fmx__args_weights, FMX__N(fmx__args_weights), 0, fmx__get_weight_info},
    {"capture_intermediate",
     "capture_intermediate(path, probe, call=0, values=false) — one call's inputs and outputs "
     "on a visible probe: names, shapes, dtypes, statistics, values on request",
     "Show the inputs and outputs of one call of the module at `path` on a visible probe: "
     "names (your entry function's keyword arguments, and its return order), kinds, shapes, "
     "dtypes and statistics (min, max, mean, std); values=true adds the values. Use it to learn "
     "the calling convention and to check intermediate results.",
     fmx__args_capture, FMX__N(fmx__args_capture), 0, fmx__capture_intermediate},
    {"trace_ops",
     "trace_ops(path) — the PyTorch ops that ran inside the module, in order, with shapes",
     "List the function-level PyTorch ops that ran inside the module at `path` during its first "
     "call on a padded visible probe, in order, with the values each op read and made, input "
     "and output shapes, and sizes and dtypes that change with the input written as "
     "expressions; calls of child modules appear where they happen.",
     fmx__args_trace, FMX__N(fmx__args_trace), 0, fmx__trace_ops},
    {"verify_component",
     "verify_component(path, code, entry=\"forward\") — compile your code and compare it with "
     "the module on the visible probes",
     "Compile your functional code and run its entry function on every captured call of the "
     "module at `path` on the visible probes. Reports each output's max abs/rel error and "
     "pass/fail per probe, the first divergence (mark intermediates with tap(\"child.path\", x) "
     "to locate it), or the compile/run error with its line. Does not end the episode; if the "
     "budget runs out, the last code that compiled here for the task's module is graded.",
     fmx__args_verify, FMX__N(fmx__args_verify), 1, fmx__verify_component},
    {"submit",
     "submit(code, entry=\"forward\") — final answer for the task's module; ends the episode",
     "Submit your final code for the task's module. It is graded on every probe, hidden ones "
     "included: correctness (fraction of probes where every output matches), logical lines of "
     "code against a target, and whether it compiles and runs on every shape. Ends the episode.",
     fmx__args_submit, FMX__N(fmx__args_submit), 1, fmx__submit},
    /* The grading itself is the episode's (env/episode.c): it holds the code. */
    {"finish",
     "finish() — end the episode now: the last code verify_component compiled for the task's "
     "module is graded as if submitted (reward 0 if none)",
     "End the episode without writing the code again: the last code that verify_component "
     "compiled for the task's module is graded as if it had been submitted (every probe, hidden "
     "ones included). With no such code the episode ends with reward 0.",
     NULL, 0, 0, fmx__finish},
};

/* What fmx wants, for a model: the README's candidate language in short (the
 * llm policy's system prompt, and spec's system_prompt). */
static const char fmx__system_prompt[] =
    "You rewrite a module of a PyTorch model as flat functional PyTorch for fmx: one Python "
    "file of plain typed functions that computes exactly what the module's forward computes, "
    "from the module's inputs and its weights. fmx compiles the file with TorchScript and "
    "compares it with the real module on probes; the same file must also run in plain Python.\n"
    "\n"
    "The candidate language:\n"
    "- Imports only: import torch; import torch.nn.functional as F; from torch import Tensor; "
    "import math; from typing import Dict, List, Optional, Tuple.\n"
    "- Top-level constants NAME = literal or simple expression; top-level functions with "
    "every parameter and the return type annotated. No classes, no decorators, no nn.Module.\n"
    "- Functional only: no in-place tensor ops (x += y on tensors, x[i] = y, add_, copy_); no "
    "print, no torch.ops, no files.\n"
    "- The entry function (named `forward` unless you pass another `entry`) takes the module's "
    "inputs as keyword arguments named as in the original forward (declare only those you "
    "use) plus one `weights: Dict[str, Tensor]` keyed relative to the module's path "
    "(get_weight_info lists the keys), and returns the module's tensor outputs in order: a "
    "Tensor or a tuple.\n"
    "- Optional: define `def tap(name: str, x: Tensor) -> Tensor: return x` and call "
    "tap(\"child.path\", h) to have verify_component compare h with that child module's "
    "output.\n"
    "\n"
    "Reward: correctness on every probe, hidden ones included, comes first; then few logical "
    "lines (at most the task's target) and code that compiles cleanly (no .item() or "
    ".tolist(), no control flow on tensor values).\n"
    "\n"
    "Use the tools: read_module_source, get_weight_info, capture_intermediate and trace_ops "
    "to learn the module; verify_component to check your code on the visible probes; submit "
    "with the final code when it matches. Every tool call is one step of a limited budget and "
    "submit ends the episode, so call submit before you stop (finish grades the last code "
    "verify_component compiled, without sending it again).";

const char *fmx_tools_system_prompt(void) {
    return fmx__system_prompt;
}

static const fmx__tool *fmx__find_tool(const char *name) {
    for (int i = 0; name && i < FMX__N(fmx__tools); i++)
        if (strcmp(fmx__tools[i].name, name) == 0) return &fmx__tools[i];
    return NULL;
}

int fmx_tools_is_heavy(const char *tool) {
    const fmx__tool *t = fmx__find_tool(tool);
    return t && t->heavy;
}

int fmx_tools_exists(const char *tool) {
    return fmx__find_tool(tool) != NULL;
}

static char fmx__summary[2048];
static pthread_once_t fmx__summary_once = PTHREAD_ONCE_INIT;

static void fmx__summary_init(void) {
    size_t used = 0;
    for (int i = 0; i < FMX__N(fmx__tools) && used < sizeof fmx__summary; i++)
        used += (size_t)snprintf(fmx__summary + used, sizeof fmx__summary - used, "  %s\n",
                                 fmx__tools[i].summary);
}

const char *fmx_tools_summary(void) {
    pthread_once(&fmx__summary_once, fmx__summary_init);
    return fmx__summary;
}

/* The schemas; strict: OpenAI's strict mode (every property required, the
 * optional ones nullable, "strict": true). */
static cJSON *fmx__tools_spec(int strict) {
    cJSON *list = cJSON_CreateArray();
    for (int i = 0; list && i < FMX__N(fmx__tools); i++) {
        const fmx__tool *t = &fmx__tools[i];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "type", "function");
        cJSON *f = cJSON_AddObjectToObject(o, "function");
        cJSON_AddStringToObject(f, "name", t->name);
        cJSON_AddStringToObject(f, "description", t->desc);
        if (strict) cJSON_AddBoolToObject(f, "strict", 1);
        cJSON *params = cJSON_AddObjectToObject(f, "parameters");
        cJSON_AddStringToObject(params, "type", "object");
        cJSON *props = cJSON_AddObjectToObject(params, "properties");
        cJSON *req = cJSON_AddArrayToObject(params, "required");
        for (int k = 0; k < t->nargs; k++) {
            const fmx__arg *a = &t->args[k];
            cJSON *p = cJSON_AddObjectToObject(props, a->name);
            /* a probe is named ("p0"); the server takes its index too */
            static const char *types[] = {"string", "integer", "boolean", "string"};
            int nullable = strict && !a->required; /* null = the default */
            if (nullable) {
                const char *both[] = {types[a->type], "null"};
                cJSON_AddItemToObject(p, "type", cJSON_CreateStringArray(both, 2));
            } else {
                cJSON_AddStringToObject(p, "type", types[a->type]);
            }
            cJSON_AddStringToObject(p, "description", a->desc);
            if (a->choices) {
                cJSON *e = cJSON_AddArrayToObject(p, "enum");
                char tmp[64];
                snprintf(tmp, sizeof tmp, "%s", a->choices);
                for (char *save, *c = strtok_r(tmp, "|", &save); c; c = strtok_r(NULL, "|", &save))
                    cJSON_AddItemToArray(e, cJSON_CreateString(c));
                if (nullable) cJSON_AddItemToArray(e, cJSON_CreateNull());
            }
            if (a->required || strict) cJSON_AddItemToArray(req, cJSON_CreateString(a->name));
        }
        cJSON_AddBoolToObject(params, "additionalProperties", 0);
        cJSON_AddItemToArray(list, o);
    }
    return list;
}

cJSON *fmx_tools_spec(void) {
    return fmx__tools_spec(0);
}

cJSON *fmx_tools_spec_strict(void) {
    return fmx__tools_spec(1);
}

/* ---- results ---- */

void fmx_grade_clear(fmx_grade *g) {
    if (!g) return;
    cJSON_Delete(g->summary);
    free(g->text);
    memset(g, 0, sizeof *g);
}

void fmx_tool_result_clear(fmx_tool_result *r) {
    if (!r) return;
    cJSON_Delete(r->observation);
    fmx_grade_clear(&r->grade);
    memset(r, 0, sizeof *r);
}

/* Sets the refusal code; the text already says why. */
static void fmx__refuse(fmx_tool_result *out, cJSON *data, const char *code) {
    out->error = code;
    (void)data;
}

/* ---- argument checking ---- */

static void fmx__valid_args(const fmx__tool *t, fmx__sb *text) {
    fmx__sb_printf(text, "%s takes: ", t->name);
    for (int k = 0; k < t->nargs; k++)
        fmx__sb_printf(text, "%s%s%s", k ? ", " : "", t->args[k].name,
                       t->args[k].required ? " (required)" : "");
    fmx__sb_printf(text, ".");
}

static int fmx__is_int(const cJSON *v) {
    return cJSON_IsNumber(v) && v->valuedouble == floor(v->valuedouble) &&
           fabs(v->valuedouble) < 9e15;
}

/* Checks args against t's table and fills a. On a bad argument writes the
 * reason to text and returns 0. */
static int fmx__parse_args(const fmx_tool_ctx *ctx, const fmx__tool *t, const cJSON *args,
                           fmx__args *a, fmx__sb *text) {
    memset(a, 0, sizeof *a);
    a->path = ctx->task->path;
    a->mode = "full";
    a->entry = "forward";
    if (args && !cJSON_IsObject(args) && !cJSON_IsNull(args)) {
        fmx__sb_printf(text, "Bad arguments: args must be a map of argument names to values. ");
        fmx__valid_args(t, text);
        return 0;
    }
    const cJSON *v;
    cJSON_ArrayForEach(v, args) {
        const fmx__arg *spec = NULL;
        for (int k = 0; k < t->nargs; k++)
            if (strcmp(t->args[k].name, v->string) == 0) spec = &t->args[k];
        if (!spec) {
            fmx__sb_printf(text, "Bad arguments: %s has no argument '%s'. ", t->name, v->string);
            fmx__valid_args(t, text);
            return 0;
        }
        if (cJSON_IsNull(v) && !spec->required) continue; /* null: the default (strict mode) */
        const char *want = NULL;
        switch (spec->type) {
        case FMX__A_STR:
            if (!cJSON_IsString(v)) want = "a string";
            break;
        case FMX__A_INT:
            if (!fmx__is_int(v)) want = "an integer";
            break;
        case FMX__A_BOOL:
            if (!cJSON_IsBool(v)) want = "true or false";
            break;
        case FMX__A_PROBE:
            if (!fmx__is_int(v) && !cJSON_IsString(v)) want = "a probe index or name";
            break;
        }
        if (want) {
            fmx__sb_printf(text, "Bad arguments: '%s' of %s must be %s.", v->string, t->name, want);
            return 0;
        }
        if (spec->choices) {
            char tmp[64];
            snprintf(tmp, sizeof tmp, "|%s|", spec->choices);
            char needle[80];
            snprintf(needle, sizeof needle, "|%s|", v->valuestring);
            if (!strstr(tmp, needle)) {
                fmx__sb_printf(text, "Bad arguments: '%s' of %s must be one of: %s (got \"%s\").",
                               v->string, t->name, spec->choices, v->valuestring);
                return 0;
            }
        }
        if (strcmp(v->string, "path") == 0) a->path = v->valuestring;
        if (strcmp(v->string, "mode") == 0) a->mode = v->valuestring;
        if (strcmp(v->string, "code") == 0) a->code = v->valuestring;
        if (strcmp(v->string, "entry") == 0) a->entry = v->valuestring;
        if (strcmp(v->string, "probe") == 0) a->probe = v;
        if (strcmp(v->string, "call") == 0) a->call = (int64_t)v->valuedouble;
        if (strcmp(v->string, "values") == 0) a->values = cJSON_IsTrue(v);
    }
    for (int k = 0; k < t->nargs; k++) {
        if (!t->args[k].required || cJSON_GetObjectItemCaseSensitive(args, t->args[k].name))
            continue;
        fmx__sb_printf(text, "Bad arguments: %s needs '%s'. ", t->name, t->args[k].name);
        fmx__valid_args(t, text);
        return 0;
    }
    if (a->code && strlen(a->code) > ctx->max_code_bytes) {
        fmx__sb_printf(text, "Code too long: %zu bytes; the limit is %zu bytes.", strlen(a->code),
                       ctx->max_code_bytes);
        return -1;
    }
    return 1;
}

/* Resolves a module path; on failure writes the nearest paths and returns -1. */
static int fmx__module(const fmx_tool_ctx *ctx, const char *path, fmx_tool_result *out,
                       fmx__sb *text, cJSON *data) {
    fmx_pack *pack = ctx->task->pack;
    int m = fmx_pack_find_module(pack, path);
    if (m >= 0) return m;
    int near[3];
    int n = fmx_pack_nearest_modules(pack, path, near, 3);
    fmx__sb_printf(text, "No module at path '%s' in %s. Nearest paths:", path,
                   ctx->task->pack_name);
    cJSON *arr = cJSON_AddArrayToObject(data, "nearest");
    for (int i = 0; i < n; i++) {
        const fmx_module *mod = fmx_pack_module(pack, near[i]);
        fmx__sb_printf(text, "%s \"%s\" (%s)", i ? "," : "", mod->path, mod->cls);
        cJSON_AddItemToArray(arr, cJSON_CreateString(mod->path));
    }
    fmx__sb_printf(text, ". Paths are dotted as in named_modules(); \"\" is the whole model.");
    cJSON_AddStringToObject(data, "path", path);
    fmx__refuse(out, data, "unknown_path");
    return -1;
}

static const char *fmx__disp(const char *path) {
    return path[0] ? path : "the whole model";
}

/* ---- read_module_source ---- */

/* A source file as fmx's one Python model (pysource.h) and what marking
 * needs of each physical line: its text, its logical line, whether it is
 * a comment-only line. */
typedef struct {
    fmx_pysource *ps;
    const fmx_py_physline *phys;
    long nphys;
    const fmx_py_line *lines;
    long nlines;
    const fmx_py_token *tok;
    long ntok;
    unsigned char *comment; /* per physical line: holds a comment */
} fmx__src;

static int fmx__src_open(const char *src, fmx__src *m) {
    memset(m, 0, sizeof *m);
    if (fmx_pysource_open(src, strlen(src), &m->ps) != FMX_OK) return -1;
    m->nphys = fmx_pysource_physlines(m->ps, &m->phys);
    m->nlines = fmx_pysource_lines(m->ps, &m->lines);
    m->ntok = fmx_pysource_tokens(m->ps, &m->tok);
    m->comment = calloc((size_t)m->nphys + 1, 1);
    if (!m->comment) {
        fmx_pysource_close(m->ps);
        return -1;
    }
    for (long k = 0; k < m->ntok; k++)
        if (m->tok[k].kind == FMX_PY_COMMENT && m->tok[k].line <= m->nphys)
            m->comment[m->tok[k].line - 1] = 1;
    return 0;
}

static void fmx__src_close(fmx__src *m) {
    fmx_pysource_close(m->ps);
    free(m->comment);
}

/* Physical line no (1-based): its text. */
static const char *fmx__text(const fmx__src *m, long no, int *len) {
    const fmx_py_physline *p = &m->phys[no - 1];
    *len = (int)(p->end - p->start);
    return fmx_pysource_text(m->ps) + p->start;
}

/* Leading spaces and tabs of a line's text (for display). */
static int fmx__indent(const fmx__src *m, long no) {
    int len;
    const char *s = fmx__text(m, no, &len);
    int i = 0;
    while (i < len && (s[i] == ' ' || s[i] == '\t'))
        i++;
    return i;
}

/* Not part of a statement and without a comment. */
static int fmx__blank(const fmx__src *m, long no) {
    return m->phys[no - 1].logical < 0 && !m->comment[no - 1];
}

/* A comment-only line between statements. */
static int fmx__comment(const fmx__src *m, long no) {
    return m->phys[no - 1].logical < 0 && m->comment[no - 1];
}

/* The logical line that physical line no starts, or -1 (a blank line, a
 * comment, or a continuation of the statement above). */
static long fmx__starts(const fmx__src *m, long no) {
    long l = m->phys[no - 1].logical;
    return l >= 0 && m->lines[l].first == no ? l : -1;
}

/* Does logical line l open a block (def, if, else, ...)? */
static int fmx__is_header(const fmx__src *m, long l) {
    static const char *kw[] = {"def", "async", "class", "if",  "elif",   "else",
                               "for", "while", "with",  "try", "except", "finally"};
    const fmx_py_token *t = fmx_pysource_first_code(m->ps, l);
    for (size_t k = 0; t && k < sizeof kw / sizeof kw[0]; k++)
        if (fmx_pysource_tok_is(m->ps, t, FMX_PY_NAME, kw[k])) return 1;
    return 0;
}

static int fmx__decorator(const fmx__src *m, long l) {
    const fmx_py_token *t = fmx_pysource_first_code(m->ps, l);
    return t && fmx_pysource_tok_is(m->ps, t, FMX_PY_OP, "@");
}

/* Which of physical lines start..start+n-1 "live" mode keeps: the lines of
 * statements that ran, block headers (def/if/else/..., with their
 * decorators) around code that ran, and comments just above kept code. The
 * first line (the class line) is always kept. */
static void fmx__live_lines(const fmx__src *m, int start, int n, const int64_t *count, int *keep) {
    int *ran = calloc((size_t)n + 1, sizeof *ran);
    if (!ran) {
        for (int i = 0; i < n; i++)
            keep[i] = 1;
        return;
    }
    /* A statement ran if any of its lines has a count. */
    for (int i = 0; i < n; i++)
        ran[i] = count[i] > 0;
    for (int i = 0; i < n;) {
        long l = m->phys[start + i - 1].logical;
        int j = i + 1;
        while (l >= 0 && j < n && m->phys[start + j - 1].logical == l)
            j++;
        int r = 0;
        for (int k = i; k < j; k++)
            r |= ran[k];
        for (int k = i; k < j; k++)
            ran[k] = r;
        i = j;
    }
    for (int i = 0; i < n; i++)
        keep[i] = ran[i];
    /* A header is kept when anything in its block ran: the lines after it
     * up to the next statement not indented deeper. */
    for (int i = 0; i < n; i++) {
        long l = fmx__starts(m, start + i);
        if (l < 0 || !fmx__is_header(m, l)) continue;
        long after = fmx_pysource_block_end(m->ps, l);
        long stop = after < m->nlines ? m->lines[after].first : m->nphys + 1;
        int hdr_end = (int)(m->lines[l].last - start + 1); /* lines of the header */
        int any = 0;
        for (int k = hdr_end; k < n && start + k < stop; k++)
            any |= ran[k];
        if (any)
            for (int k = i; k < hdr_end && k < n; k++)
                keep[k] = 1;
    }
    /* Decorators go with the def below them; comments with the code below. */
    for (int i = n - 1; i >= 0; i--) {
        long l = fmx__starts(m, start + i);
        if (l >= 0 && fmx__decorator(m, l)) {
            int next = (int)(m->lines[l].last - start + 1);
            if (next < n && keep[next]) keep[i] = 1;
        } else if (fmx__comment(m, start + i) && i + 1 < n && keep[i + 1]) {
            keep[i] = 1;
        }
    }
    if (n > 0) keep[0] = 1;
    free(ran);
}

/* Emits lines start..end (1-based) of a file with their counts under a
 * "# label" header; o gets file, start, end and lines [[no, count|null, text]]. */
static void fmx__emit_range(const char *file, const cJSON *f, const char *label, int start, int end,
                            int live, fmx__sb *text, cJSON *o) {
    const char *src = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(f, "source"));
    fmx__src m;
    if (!src || fmx__src_open(src, &m) != 0) {
        text->oom |= src != NULL;
        return;
    }
    if (start < 1) start = 1;
    if (end > m.nphys) end = (int)m.nphys;
    int n = end >= start ? end - start + 1 : 0;
    int64_t *count = calloc((size_t)n + 1, sizeof *count);
    int *keep = calloc((size_t)n + 1, sizeof *keep);
    if (!count || !keep) {
        free(count);
        free(keep);
        fmx__src_close(&m);
        text->oom = 1;
        return;
    }
    const cJSON *cov = cJSON_GetObjectItemCaseSensitive(f, "coverage");
    int ran = 0;
    for (int i = 0; i < n; i++) {
        char key[16];
        snprintf(key, sizeof key, "%d", start + i);
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(cov, key);
        count[i] = cJSON_IsNumber(c) ? (int64_t)c->valuedouble : 0;
        ran += count[i] > 0;
    }
    if (live)
        fmx__live_lines(&m, start, n, count, keep);
    else
        for (int i = 0; i < n; i++)
            keep[i] = 1;
    fmx__sb_printf(text, "# %s  (%s:%d-%d; %d line%s ran)\n", label, file, start, end, ran,
                   ran == 1 ? "" : "s");
    cJSON_AddStringToObject(o, "file", file);
    cJSON_AddNumberToObject(o, "start", start);
    cJSON_AddNumberToObject(o, "end", end);
    cJSON *jl = cJSON_AddArrayToObject(o, "lines");
    for (int i = 0; i < n;) {
        if (!keep[i]) {
            int j = i, nonblank = 0;
            while (j < n && !keep[j])
                nonblank += !fmx__blank(&m, start + j++);
            if (nonblank)
                fmx__sb_printf(text, "%6s | %*s... %d line%s not run\n", "",
                               fmx__indent(&m, start + i), "", nonblank, nonblank == 1 ? "" : "s");
            i = j;
            continue;
        }
        char c[24];
        if (count[i] > 0)
            snprintf(c, sizeof c, "%lld", (long long)count[i]);
        else
            snprintf(c, sizeof c, "\u00b7");
        int len;
        const char *s = fmx__text(&m, start + i, &len);
        fmx__sb_printf(text, "%*s | %.*s\n", count[i] > 0 ? 6 : 7, c, len, s);
        cJSON *row = cJSON_CreateArray();
        cJSON_AddItemToArray(row, cJSON_CreateNumber(start + i));
        cJSON_AddItemToArray(row, count[i] > 0 ? cJSON_CreateNumber((double)count[i])
                                               : cJSON_CreateNull());
        char *t = strndup(s, (size_t)len);
        cJSON_AddItemToArray(row, cJSON_CreateString(t ? t : ""));
        free(t);
        cJSON_AddItemToArray(jl, row);
        i++;
    }
    free(count);
    free(keep);
    fmx__src_close(&m);
}

/* Emits one class: header, then its lines with counts. */
static void fmx__emit_class(const cJSON *man, const char *name, const cJSON *cls, int live,
                            fmx__sb *text, cJSON *arr) {
    const char *file = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(cls, "file"));
    const cJSON *js = cJSON_GetObjectItemCaseSensitive(cls, "start");
    const cJSON *je = cJSON_GetObjectItemCaseSensitive(cls, "end");
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(man, "files"), file ? file : "");
    const char *src = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(f, "source"));
    cJSON *o = cJSON_CreateObject();
    cJSON_AddItemToArray(arr, o);
    cJSON_AddStringToObject(o, "class", name);
    if (!file || !src || !cJSON_IsNumber(js) || !cJSON_IsNumber(je) ||
        je->valueint < js->valueint) {
        const char *mod = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(cls, "module"));
        fmx__sb_printf(text, "# class %s comes from %s; its source is not in the pack.\n", name,
                       mod ? mod : "outside the model's package");
        cJSON_AddStringToObject(o, "module", mod ? mod : "");
        cJSON_AddNullToObject(o, "file");
        return;
    }
    fmx__emit_range(file, f, name, js->valueint, je->valueint, live, text, o);
}

/* ---- helper functions the classes call ---- */

#define FMX__MAX_HELPERS 16

typedef struct {
    const char *name; /* points into the source */
    int name_len;
    int start, def, end; /* 1-based: decorators, the def line, last line */
    int ran, shown;
} fmx__fn;

/* Does the name occur in physical lines a..b (1-based) as a name that is
 * not an attribute (no '.' before it)? */
static int fmx__mentions(const fmx__src *m, int a, int b, const char *name, int len) {
    const char *src = fmx_pysource_text(m->ps);
    /* the first token on line a or after (tokens are in line order), and
     * the code token before it */
    long lo = 0, hi = m->ntok;
    while (lo < hi) {
        long mid = lo + (hi - lo) / 2;
        if (m->tok[mid].line < a)
            lo = mid + 1;
        else
            hi = mid;
    }
    const fmx_py_token *prev = NULL;
    for (long k = lo - 1; k >= 0 && !prev; k--)
        if (fmx_py_is_code(&m->tok[k])) prev = &m->tok[k];
    for (long k = lo; k < m->ntok; k++) {
        const fmx_py_token *t = &m->tok[k];
        if (t->line > b) break;
        if (!fmx_py_is_code(t)) continue;
        if (t->kind == FMX_PY_NAME && t->end - t->start == (size_t)len &&
            memcmp(src + t->start, name, (size_t)len) == 0 &&
            !(prev && fmx_pysource_tok_is(m->ps, prev, FMX_PY_OP, ".")))
            return 1;
        prev = t;
    }
    return 0;
}

/* Top-level functions of a file (the model's def blocks): name, extent,
 * whether any line ran. */
static int fmx__top_functions(const fmx__src *m, const cJSON *cov, fmx__fn *out, int cap) {
    const fmx_py_block *blocks;
    long nb = fmx_pysource_blocks(m->ps, &blocks);
    int found = 0;
    for (long i = 0; i < nb && found < cap; i++) {
        const fmx_py_block *b = &blocks[i];
        if (b->kind != FMX_PY_BLOCK_DEF || m->lines[b->header].indent != 0) continue;
        const fmx_py_token *name = &m->tok[b->name];
        fmx__fn *fn = &out[found++];
        fn->name = fmx_pysource_text(m->ps) + name->start;
        fn->name_len = (int)(name->end - name->start);
        fn->start = (int)m->lines[b->line].first;
        fn->def = (int)m->lines[b->header].first;
        fn->end = (int)m->lines[b->line + b->nlines - 1].last;
        fn->ran = 0;
        fn->shown = 0;
        for (int ln = fn->def; ln <= fn->end && !fn->ran; ln++) {
            char key[16];
            snprintf(key, sizeof key, "%d", ln);
            const cJSON *c = cJSON_GetObjectItemCaseSensitive(cov, key);
            fn->ran = cJSON_IsNumber(c) && c->valuedouble > 0;
        }
    }
    return found;
}

/* The file's top-level functions that the shown class ranges call, directly
 * or through each other, and that ran: emitted after the classes. */
static void fmx__emit_helpers(const cJSON *man, const cJSON *shown_classes, int live, fmx__sb *text,
                              cJSON *data) {
    const cJSON *first = cJSON_GetArrayItem(shown_classes, 0);
    const char *file = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(first, "file"));
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(man, "files"), file ? file : "");
    const char *src = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(f, "source"));
    if (!src) return;
    fmx__src m;
    if (fmx__src_open(src, &m) != 0) {
        text->oom = 1;
        return;
    }
    fmx__fn fns[256];
    int nf = fmx__top_functions(&m, cJSON_GetObjectItemCaseSensitive(f, "coverage"), fns, 256);
    if (nf <= 0) {
        fmx__src_close(&m);
        return;
    }
    /* Seeds: the shown classes of this file; then functions, to a fixed point. */
    int referenced[256] = {0};
    const cJSON *c;
    cJSON_ArrayForEach(c, shown_classes) {
        const char *cf = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "file"));
        if (!cf || strcmp(cf, file) != 0) continue;
        int a = cJSON_GetObjectItemCaseSensitive(c, "start")->valueint;
        int b = cJSON_GetObjectItemCaseSensitive(c, "end")->valueint;
        for (int i = 0; i < nf; i++)
            referenced[i] |= fmx__mentions(&m, a, b, fns[i].name, fns[i].name_len);
    }
    for (int changed = 1, rounds = 0; changed && rounds < 8; rounds++) {
        changed = 0;
        for (int i = 0; i < nf; i++) {
            if (!referenced[i] || !fns[i].ran || fns[i].shown) continue;
            fns[i].shown = 1;
            for (int k = 0; k < nf; k++)
                if (!referenced[k] &&
                    fmx__mentions(&m, fns[i].def, fns[i].end, fns[k].name, fns[k].name_len)) {
                    referenced[k] = 1;
                    changed = 1;
                }
        }
    }
    cJSON *arr = cJSON_AddArrayToObject(data, "functions");
    int emitted = 0;
    for (int i = 0; i < nf && emitted < FMX__MAX_HELPERS; i++) {
        if (!fns[i].shown) continue;
        char label[160];
        snprintf(label, sizeof label, "function %.*s, called by the code above", fns[i].name_len,
                 fns[i].name);
        fmx__sb_printf(text, "\n");
        cJSON *o = cJSON_CreateObject();
        cJSON_AddItemToArray(arr, o);
        char name[128];
        snprintf(name, sizeof name, "%.*s", fns[i].name_len, fns[i].name);
        cJSON_AddStringToObject(o, "function", name);
        fmx__emit_range(file, f, label, fns[i].start, fns[i].end, live, text, o);
        emitted++;
    }
    int unrun = 0;
    for (int i = 0; i < nf; i++) {
        if (!referenced[i] || fns[i].ran) continue;
        fmx__sb_printf(text, "%s%.*s",
                       unrun++ ? ", " : "\n# also referenced, never ran: ", fns[i].name_len,
                       fns[i].name);
    }
    if (unrun) fmx__sb_printf(text, "\n");
    fmx__src_close(&m);
}

static void fmx__format_ops(const fmx_pack *pack, const cJSON *ops, const cJSON *returns,
                            fmx__sb *text);

/* The probe whose op traces the pack shows (task.json traced_probes[0]; p0 in older packs). */
static const char *fmx__traced_probe(const fmx_pack *pack) {
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(fmx_pack_manifest(pack), "traced_probes");
    const char *name = cJSON_GetStringValue(cJSON_GetArrayItem(t, 0));
    return name ? name : "p0";
}

static void fmx__read_module_source(const fmx_tool_ctx *ctx, const fmx__args *a,
                                    fmx_tool_result *out, fmx__sb *text, cJSON *data) {
    int m = fmx__module(ctx, a->path, out, text, data);
    if (m < 0) return;
    fmx_pack *pack = ctx->task->pack;
    const fmx_module *mod = fmx_pack_module(pack, m);
    const cJSON *man = fmx_pack_manifest(pack);
    const cJSON *classes = cJSON_GetObjectItemCaseSensitive(man, "classes");
    int live = strcmp(a->mode, "live") == 0;
    cJSON_AddStringToObject(data, "path", mod->path);
    cJSON_AddStringToObject(data, "class", mod->cls);
    cJSON_AddStringToObject(data, "mode", a->mode);
    fmx__sb_printf(text,
                   "%s is a %s. Left: times each line ran on the probes (all instances of "
                   "the class together); \u00b7 = never ran.%s\n\n",
                   fmx__disp(mod->path), mod->cls,
                   live ? " Live view: lines that never ran are left out." : "");
    /* The class, then its bases in the package, breadth first, each once. */
    const char *queue[64];
    int nq = 0;
    queue[nq++] = mod->cls;
    cJSON *arr = cJSON_AddArrayToObject(data, "classes");
    for (int q = 0; q < nq; q++) {
        const cJSON *cls = cJSON_GetObjectItemCaseSensitive(classes, queue[q]);
        if (!cls) {
            fmx__sb_printf(text, "# class %s: not described in the pack.\n", queue[q]);
            continue;
        }
        if (q > 0) fmx__sb_printf(text, "\n");
        fmx__emit_class(man, queue[q], cls, live, text, arr);
        const cJSON *b;
        cJSON_ArrayForEach(b, cJSON_GetObjectItemCaseSensitive(cls, "bases")) {
            if (!cJSON_IsString(b) || nq == 64) continue;
            int seen = 0;
            for (int k = 0; k < nq && !seen; k++)
                seen = strcmp(queue[k], b->valuestring) == 0;
            const cJSON *bc = cJSON_GetObjectItemCaseSensitive(classes, b->valuestring);
            if (!seen && cJSON_IsString(cJSON_GetObjectItemCaseSensitive(bc, "file")))
                queue[nq++] = b->valuestring;
        }
    }
    /* A class from outside the package (nn.Linear...) has no source here:
     * its op trace says what it does. */
    const cJSON *first = cJSON_GetArrayItem(arr, 0);
    if (!cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(first, "file")))
        fmx__emit_helpers(man, arr, live, text, data);
    if (cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(first, "file"))) {
        const cJSON *ops = cJSON_GetObjectItemCaseSensitive(
            cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(man, "modules"), m), "ops");
        if (cJSON_IsArray(ops)) {
            fmx__sb_printf(text, "\nWhat it ran on probe %s (trace_ops):\n",
                           fmx__traced_probe(pack));
            fmx__format_ops(pack, ops, NULL, text);
        }
    }
}

/* ---- get_weight_info ---- */

static void fmx__shape_text(const int64_t *shape, int nd, char *buf, size_t n) {
    size_t used = (size_t)snprintf(buf, n, "(");
    for (int i = 0; i < nd && used < n; i++)
        used +=
            (size_t)snprintf(buf + used, n - used, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (used < n) snprintf(buf + used, n - used, nd == 1 ? ",)" : ")");
}

static cJSON *fmx__shape_json(const int64_t *shape, int nd) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < nd; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber((double)shape[i]));
    return a;
}

static void fmx__get_weight_info(const fmx_tool_ctx *ctx, const fmx__args *a, fmx_tool_result *out,
                                 fmx__sb *text, cJSON *data) {
    int m = fmx__module(ctx, a->path, out, text, data);
    if (m < 0) return;
    fmx_pack *pack = ctx->task->pack;
    const fmx_module *mod = fmx_pack_module(pack, m);
    const char *const *keys;
    const fmx_tensor *const *vals;
    char err[512];
    int n = fmx_pack_weights(pack, mod->path, &keys, &vals, err, sizeof err);
    if (n < 0) {
        fmx__sb_printf(text, "Cannot list the weights of %s: %s", fmx__disp(mod->path), err);
        fmx__refuse(out, data, "internal");
        return;
    }
    const cJSON *buffers = cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(fmx_pack_manifest(pack), "weights"), "buffers");
    cJSON_AddStringToObject(data, "path", mod->path);
    cJSON_AddStringToObject(data, "class", mod->cls);
    cJSON *arr = cJSON_AddArrayToObject(data, "weights");
    int width = 8;
    for (int i = 0; i < n; i++)
        if ((int)strlen(keys[i]) > width) width = (int)strlen(keys[i]);
    if (width > 60) width = 60;
    int64_t total = 0;
    int nbuf = 0;
    fmx__sb body = {0};
    for (int i = 0; i < n; i++) {
        int64_t shape[FMX_MAX_DIMS];
        fmx_dtype dt = FMX_DT_F32;
        int nd = fmx_tensor_shape(vals[i], shape, &dt);
        if (nd < 0) nd = 0;
        int64_t numel = 1;
        for (int d = 0; d < nd; d++)
            numel *= shape[d];
        char full[1024];
        snprintf(full, sizeof full, "%s%s%s", mod->path, mod->path[0] ? "." : "", keys[i]);
        int is_buf = 0;
        const cJSON *b;
        cJSON_ArrayForEach(b, buffers) is_buf |=
            cJSON_IsString(b) && strcmp(b->valuestring, full) == 0;
        int tied = -1;
        for (int k = 0; k < i && tied < 0; k++)
            if (vals[k] == vals[i]) tied = k;
        if (tied < 0 && !is_buf) total += numel;
        nbuf += is_buf;
        char st[160];
        fmx__shape_text(shape, nd, st, sizeof st);
        fmx__sb_printf(&body, "  %-*s %-16s %s%s%s%s\n", width, keys[i], st, fmx_dtype_name(dt),
                       is_buf ? "  buffer" : "", tied >= 0 ? "  tied to " : "",
                       tied >= 0 ? keys[tied] : "");
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", keys[i]);
        cJSON_AddItemToObject(o, "shape", fmx__shape_json(shape, nd));
        cJSON_AddStringToObject(o, "dtype", fmx_dtype_name(dt));
        cJSON_AddBoolToObject(o, "buffer", is_buf);
        if (tied >= 0)
            cJSON_AddStringToObject(o, "tied_to", keys[tied]);
        else
            cJSON_AddNullToObject(o, "tied_to");
        cJSON_AddItemToArray(arr, o);
    }
    cJSON_AddNumberToObject(data, "params", (double)total);
    if (n == 0) {
        fmx__sb_printf(text,
                       "%s (%s) has no parameters or buffers; weights will be an empty dict.\n",
                       fmx__disp(mod->path), mod->cls);
    } else {
        fmx__sb_printf(text,
                       "%s (%s): %d tensor%s, %lld parameters%s. Names are the keys of your "
                       "weights dict (relative to \"%s\"):\n",
                       fmx__disp(mod->path), mod->cls, n, n == 1 ? "" : "s", (long long)total,
                       nbuf ? " (buffers not counted)" : "", mod->path);
        fmx__sb_put(text, fmx__sb_str(&body), body.n);
    }
    free(body.s);
}

/* ---- capture_intermediate ---- */

static float fmx__half(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal */
            float f = (float)man / 1024.0f / 16384.0f;
            return sign ? -f : f;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Element i of a contiguous buffer of dtype dt, as a double. */
static double fmx__elem(const unsigned char *buf, fmx_dtype dt, int64_t i) {
    switch (dt) {
    case FMX_DT_F64: {
        double v;
        memcpy(&v, buf + 8 * i, 8);
        return v;
    }
    case FMX_DT_F32: {
        float v;
        memcpy(&v, buf + 4 * i, 4);
        return v;
    }
    case FMX_DT_BF16: {
        uint16_t h;
        memcpy(&h, buf + 2 * i, 2);
        uint32_t bits = (uint32_t)h << 16;
        float v;
        memcpy(&v, &bits, 4);
        return v;
    }
    case FMX_DT_F16: {
        uint16_t h;
        memcpy(&h, buf + 2 * i, 2);
        return fmx__half(h);
    }
    case FMX_DT_I64: {
        int64_t v;
        memcpy(&v, buf + 8 * i, 8);
        return (double)v;
    }
    case FMX_DT_I32: {
        int32_t v;
        memcpy(&v, buf + 4 * i, 4);
        return v;
    }
    case FMX_DT_I16: {
        int16_t v;
        memcpy(&v, buf + 2 * i, 2);
        return v;
    }
    case FMX_DT_I8:
        return (double)(int8_t)buf[i];
    case FMX_DT_U8:
    case FMX_DT_BOOL:
        return buf[i];
    default:
        return 0;
    }
}

static int fmx__is_float(fmx_dtype dt) {
    return dt == FMX_DT_F64 || dt == FMX_DT_F32 || dt == FMX_DT_BF16 || dt == FMX_DT_F16;
}

/* Thread-local scratch for tensor reads: grows, never shrinks. */
static _Thread_local unsigned char *fmx__scratch;
static _Thread_local size_t fmx__scratch_cap;

static unsigned char *fmx__scratch_get(size_t n) {
    if (n > fmx__scratch_cap) {
        unsigned char *g = realloc(fmx__scratch, n);
        if (!g) return NULL;
        fmx__scratch = g;
        fmx__scratch_cap = n;
    }
    return fmx__scratch;
}

static void fmx__num_text(fmx__sb *b, double v, int is_float) {
    if (!is_float)
        fmx__sb_printf(b, "%lld", (long long)v);
    else if (isnan(v))
        fmx__sb_printf(b, "nan");
    else if (isinf(v))
        fmx__sb_printf(b, v > 0 ? "inf" : "-inf");
    else
        fmx__sb_printf(b, "%.6g", v);
}

static cJSON *fmx__num_json(double v, int is_float) {
    return is_float ? fmx_proto_float(v) : cJSON_CreateNumber(v);
}

/* Nested values of dims [d, nd) starting at element off; dim d limited to k
 * rows (k < 0: all). Text: innermost rows one per line. */
static cJSON *fmx__values(const unsigned char *buf, fmx_dtype dt, const int64_t *shape, int nd,
                          int d, int64_t off, int64_t k, fmx__sb *text, int indent) {
    int isf = fmx__is_float(dt);
    if (d == nd) {
        fmx__num_text(text, fmx__elem(buf, dt, off), isf);
        return fmx__num_json(fmx__elem(buf, dt, off), isf);
    }
    int64_t inner = 1;
    for (int i = d + 1; i < nd; i++)
        inner *= shape[i];
    int64_t rows = k >= 0 && k < shape[d] ? k : shape[d];
    cJSON *a = cJSON_CreateArray();
    fmx__sb_printf(text, "[");
    for (int64_t r = 0; r < rows; r++) {
        if (r) {
            if (d == nd - 1)
                fmx__sb_printf(text, ", ");
            else
                fmx__sb_printf(text, ",\n%*s", indent + d + 1, "");
        }
        cJSON_AddItemToArray(
            a, fmx__values(buf, dt, shape, nd, d + 1, off + r * inner, -1, text, indent));
    }
    if (rows < shape[d]) fmx__sb_printf(text, ", ...");
    fmx__sb_printf(text, "]");
    return a;
}

/* One captured tensor: shape, dtype, stats, and values on request. */
static void fmx__tensor_info(fmx_pack *pack, const fmx_io *io, int values, fmx__sb *text,
                             cJSON *o) {
    const fmx_tensor *t = fmx_pack_capture(pack, io->key);
    int64_t shape[FMX_MAX_DIMS];
    fmx_dtype dt = FMX_DT_F32;
    int nd = t ? fmx_tensor_shape(t, shape, &dt) : -1;
    if (nd < 0) {
        fmx__sb_printf(text, "tensor (unreadable)\n");
        return;
    }
    int64_t numel = 1;
    for (int d = 0; d < nd; d++)
        numel *= shape[d];
    char st[160];
    fmx__shape_text(shape, nd, st, sizeof st);
    fmx__sb_printf(text, "tensor %s %s", st, fmx_dtype_name(dt));
    cJSON_AddItemToObject(o, "shape", fmx__shape_json(shape, nd));
    cJSON_AddStringToObject(o, "dtype", fmx_dtype_name(dt));
    if (io->token_aligned) {
        cJSON_AddBoolToObject(o, "token_aligned", 1);
    }
    size_t bytes = (size_t)numel * fmx_dtype_size(dt);
    unsigned char *buf = fmx__scratch_get(bytes ? bytes : 1);
    char err[256];
    if (!buf || fmx_tensor_read(t, buf, bytes, err, sizeof err) != 0) {
        fmx__sb_printf(text, " (values unreadable)\n");
        return;
    }
    int isf = fmx__is_float(dt);
    double mn = INFINITY, mx = -INFINITY, sum = 0;
    int64_t finite = 0;
    for (int64_t i = 0; i < numel; i++) {
        double v = fmx__elem(buf, dt, i);
        if (!isfinite(v)) continue;
        finite++;
        sum += v;
        if (v < mn) mn = v;
        if (v > mx) mx = v;
    }
    double mean = finite ? sum / (double)finite : 0, ss = 0;
    for (int64_t i = 0; i < numel; i++) {
        double v = fmx__elem(buf, dt, i);
        if (isfinite(v)) ss += (v - mean) * (v - mean);
    }
    double sd = finite ? sqrt(ss / (double)finite) : 0;
    cJSON *stats = cJSON_AddObjectToObject(o, "stats");
    if (finite) {
        fmx__sb_printf(text, "  min ");
        fmx__num_text(text, mn, isf);
        fmx__sb_printf(text, " max ");
        fmx__num_text(text, mx, isf);
        fmx__sb_printf(text, " mean %.6g std %.6g", mean, sd);
        cJSON_AddItemToObject(stats, "min", fmx__num_json(mn, isf));
        cJSON_AddItemToObject(stats, "max", fmx__num_json(mx, isf));
        fmx_proto_add_float(stats, "mean", mean);
        fmx_proto_add_float(stats, "std", sd);
    }
    if (finite < numel) {
        fmx__sb_printf(text, "  %lld NaN/Inf", (long long)(numel - finite));
        cJSON_AddNumberToObject(stats, "nonfinite", (double)(numel - finite));
    }
    if (io->token_aligned) fmx__sb_printf(text, "  (token-aligned)");
    fmx__sb_printf(text, "\n");
    if (!values) return;
    /* Whole tensor if it fits, else a leading slice t[0, ..., 0, :k, ...]. */
    int d = 0;
    int64_t inner = numel, k = -1;
    if (numel > FMX__VALUES_CAP) {
        for (d = 0; d < nd; d++) {
            inner = 1;
            for (int i = d + 1; i < nd; i++)
                inner *= shape[i];
            if (inner <= FMX__VALUES_CAP) break;
        }
        k = FMX__VALUES_CAP / (inner ? inner : 1);
        if (k < 1) k = 1;
        char slice[300];
        size_t su = (size_t)snprintf(slice, sizeof slice, "[");
        for (int i = 0; i < nd && su < sizeof slice; i++) {
            if (i < d)
                su += (size_t)snprintf(slice + su, sizeof slice - su, "%s0", i ? ", " : "");
            else if (i == d)
                su += (size_t)snprintf(slice + su, sizeof slice - su, "%s:%lld", i ? ", " : "",
                                       (long long)k);
            else
                su += (size_t)snprintf(slice + su, sizeof slice - su, ", :");
        }
        if (su < sizeof slice) snprintf(slice + su, sizeof slice - su, "]");
        int64_t shown = k * inner;
        fmx__sb_printf(text, "      values of %s%s (%lld of %lld elements):\n      ", io->name,
                       slice, (long long)shown, (long long)numel);
        cJSON_AddStringToObject(o, "values_slice", slice);
    } else {
        fmx__sb_printf(text, "      values:\n      ");
    }
    /* Leading indices are all 0, so the slice starts at element 0. */
    cJSON_AddItemToObject(o, "values", fmx__values(buf, dt, shape, nd, d, 0, k, text, 6));
    fmx__sb_printf(text, "\n");
}

static void fmx__io_text(fmx_pack *pack, const fmx_io *io, int values, int width, fmx__sb *text,
                         cJSON *arr) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddItemToArray(arr, o);
    cJSON_AddStringToObject(o, "name", io->name);
    static const char *kinds[] = {"tensor", "value", "none", "cache", "other"};
    cJSON_AddStringToObject(o, "kind", kinds[io->kind]);
    fmx__sb_printf(text, "  %-*s ", width, io->name);
    switch (io->kind) {
    case FMX_IO_TENSOR:
        fmx__tensor_info(pack, io, values, text, o);
        break;
    case FMX_IO_VALUE:
        switch (io->vtype) {
        case FMX_VAL_INT:
            fmx__sb_printf(text, "int %lld\n", (long long)io->i);
            cJSON_AddNumberToObject(o, "value", (double)io->i);
            break;
        case FMX_VAL_FLOAT:
            fmx__sb_printf(text, "float %.9g\n", io->f);
            fmx_proto_add_float(o, "value", io->f);
            break;
        case FMX_VAL_BOOL:
            fmx__sb_printf(text, "bool %s\n", io->i ? "True" : "False");
            cJSON_AddBoolToObject(o, "value", (int)io->i);
            break;
        case FMX_VAL_STR:
            fmx__sb_printf(text, "str \"%s\"\n", io->s ? io->s : "");
            cJSON_AddStringToObject(o, "value", io->s ? io->s : "");
            break;
        }
        break;
    case FMX_IO_NONE:
        fmx__sb_printf(text, "None\n");
        break;
    case FMX_IO_CACHE:
        fmx__sb_printf(text, "cache object (not passed, not returned)\n");
        break;
    case FMX_IO_OTHER:
        fmx__sb_printf(text, "object %s (not passed)\n", io->s ? io->s : "");
        if (io->s) cJSON_AddStringToObject(o, "repr", io->s);
        break;
    }
}

static void fmx__visible_list(fmx_pack *pack, fmx__sb *text, cJSON *data) {
    cJSON *arr = cJSON_AddArrayToObject(data, "visible_probes");
    int k = 0;
    for (int i = 0; i < fmx_pack_nprobes(pack); i++) {
        const fmx_probe *p = fmx_pack_probe(pack, i);
        if (!p->visible) continue;
        fmx__sb_printf(text, "%s%d (\"%s\", %d\u00d7%d, padding %s)", k++ ? ", " : "", i, p->name,
                       p->batch, p->seq, p->padding);
        cJSON_AddItemToArray(arr, cJSON_CreateString(p->name));
    }
}

static void fmx__capture_intermediate(const fmx_tool_ctx *ctx, const fmx__args *a,
                                      fmx_tool_result *out, fmx__sb *text, cJSON *data) {
    int m = fmx__module(ctx, a->path, out, text, data);
    if (m < 0) return;
    fmx_pack *pack = ctx->task->pack;
    const fmx_module *mod = fmx_pack_module(pack, m);
    int pi = -1;
    if (cJSON_IsString(a->probe)) {
        for (int i = 0; i < fmx_pack_nprobes(pack); i++)
            if (strcmp(fmx_pack_probe(pack, i)->name, a->probe->valuestring) == 0) pi = i;
    } else if (a->probe->valuedouble >= 0 && a->probe->valuedouble < fmx_pack_nprobes(pack)) {
        pi = (int)a->probe->valuedouble;
    }
    const fmx_probe *probe = fmx_pack_probe(pack, pi);
    if (!probe || !probe->visible) {
        /* Say nothing about a hidden probe beyond that it is not visible. */
        if (probe)
            fmx__sb_printf(text,
                           "Probe %s is hidden: it is used only to grade submit. Visible "
                           "probes: ",
                           cJSON_IsString(a->probe) ? a->probe->valuestring : probe->name);
        else if (cJSON_IsString(a->probe))
            fmx__sb_printf(text, "No probe named \"%s\". Visible probes: ", a->probe->valuestring);
        else
            fmx__sb_printf(text,
                           "No probe %lld. Visible probes: ", (long long)a->probe->valuedouble);
        fmx__visible_list(pack, text, data);
        fmx__sb_printf(text, ".");
        fmx__refuse(out, data, probe ? "hidden_probe" : "out_of_range");
        return;
    }
    int ncalls = 0;
    while (fmx_pack_find_call(pack, pi, m, ncalls) >= 0)
        ncalls++;
    int c = a->call >= 0 && a->call < ncalls ? fmx_pack_find_call(pack, pi, m, (int)a->call) : -1;
    cJSON_AddStringToObject(data, "path", mod->path);
    cJSON_AddStringToObject(data, "class", mod->cls);
    cJSON_AddStringToObject(data, "probe", probe->name);
    cJSON_AddNumberToObject(data, "calls", ncalls);
    if (c < 0) {
        if (ncalls == 0)
            fmx__sb_printf(text, "%s (%s) was never called on probe %s, so nothing was captured.",
                           fmx__disp(mod->path), mod->cls, probe->name);
        else
            fmx__sb_printf(text,
                           "call %lld is out of range: %s (%s) was called %d time%s on probe "
                           "%s (call 0..%d).",
                           (long long)a->call, fmx__disp(mod->path), mod->cls, ncalls,
                           ncalls == 1 ? "" : "s", probe->name, ncalls - 1);
        fmx__refuse(out, data, "out_of_range");
        return;
    }
    const fmx_call *call = fmx_pack_call(pack, c);
    cJSON_AddNumberToObject(data, "call", (double)a->call);
    cJSON_AddNumberToObject(data, "batch", probe->batch);
    cJSON_AddNumberToObject(data, "seq", probe->seq);
    cJSON_AddStringToObject(data, "padding", probe->padding);
    fmx__sb_printf(text,
                   "%s (%s), probe %s (batch %d \u00d7 seq %d, padding %s), call %lld of %d.\n",
                   fmx__disp(mod->path), mod->cls, probe->name, probe->batch, probe->seq,
                   probe->padding, (long long)a->call, ncalls);
    int width = 4;
    for (int k = 0; k < call->ninputs + call->noutputs; k++) {
        const fmx_io *io = k < call->ninputs ? &call->inputs[k] : &call->outputs[k - call->ninputs];
        if ((int)strlen(io->name) > width) width = (int)strlen(io->name);
    }
    fmx__sb_printf(text, "inputs (keyword arguments of your entry function):\n");
    cJSON *ins = cJSON_AddArrayToObject(data, "inputs");
    for (int k = 0; k < call->ninputs; k++)
        fmx__io_text(pack, &call->inputs[k], a->values, width, text, ins);
    fmx__sb_printf(text, "outputs (return the tensor ones, in this order):\n");
    cJSON *outs = cJSON_AddArrayToObject(data, "outputs");
    for (int k = 0; k < call->noutputs; k++)
        fmx__io_text(pack, &call->outputs[k], a->values, width, text, outs);
}

/* ---- trace_ops ---- */

/* The op listing (env/optrace.h) into the observation's text. */
static void fmx__format_ops(const fmx_pack *pack, const cJSON *ops, const cJSON *returns,
                            fmx__sb *text) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) {
        text->oom = 1;
        return;
    }
    fmx_optrace_print(f, pack, ops, returns);
    fclose(f);
    fmx__sb_put(text, buf, len);
    free(buf);
}

static void fmx__trace_ops(const fmx_tool_ctx *ctx, const fmx__args *a, fmx_tool_result *out,
                           fmx__sb *text, cJSON *data) {
    int m = fmx__module(ctx, a->path, out, text, data);
    if (m < 0) return;
    fmx_pack *pack = ctx->task->pack;
    const fmx_module *mod = fmx_pack_module(pack, m);
    const cJSON *entry =
        cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(fmx_pack_manifest(pack), "modules"), m);
    const cJSON *ops = cJSON_GetObjectItemCaseSensitive(entry, "ops");
    cJSON_AddStringToObject(data, "path", mod->path);
    cJSON_AddStringToObject(data, "class", mod->cls);
    const char *probe = fmx__traced_probe(pack);
    cJSON_AddStringToObject(data, "probe", probe);
    if (!cJSON_IsArray(ops)) {
        fmx__sb_printf(text,
                       "%s (%s) has no op trace: it was not called on probe %s (containers such "
                       "as ModuleList are never called themselves; trace their children).",
                       fmx__disp(mod->path), mod->cls, probe);
        cJSON_AddNullToObject(data, "ops");
        return;
    }
    const cJSON *flow = cJSON_GetObjectItemCaseSensitive(entry, "dataflow");
    if (cJSON_IsString(flow))
        fmx__sb_printf(text,
                       "Ops inside %s (%s) during its first call on probe %s, in order: vN are the "
                       "values ops made, inputs by name, weights by name relative to the module; "
                       "sizes, dtypes and devices that changed between probes are written as "
                       "expressions of the tensors (numbers that stayed the same are as "
                       "traced); then the %s shapes of the tensor arguments -> results.\n",
                       fmx__disp(mod->path), mod->cls, probe, probe);
    else
        fmx__sb_printf(text,
                       "Ops inside %s (%s) during its first call on probe %s, in order (shapes "
                       "of tensor arguments -> results; T = a tensor argument):\n",
                       fmx__disp(mod->path), mod->cls, probe);
    fmx__format_ops(pack, ops, cJSON_GetObjectItemCaseSensitive(entry, "returns"), text);
    if (cJSON_IsString(flow) && strcmp(flow->valuestring, "general") != 0)
        fmx__sb_printf(text, "Not every number could be generalized over the probes: %s\n",
                       flow->valuestring);
    cJSON_AddItemToObject(data, "ops", cJSON_Duplicate(ops, 1));
    /* The dataflow of the trace (docs/pack-format.md, "Op traces"): input names, returned values,
     * and whether every probe-dependent size and dtype was written as an expression. */
    static const char *const fields[] = {"inputs", "returns", "return_names", "dataflow"};
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        const cJSON *item = cJSON_GetObjectItemCaseSensitive(entry, fields[i]);
        if (item) cJSON_AddItemToObject(data, fields[i], cJSON_Duplicate(item, 1));
    }
}

/* ---- verify_component ---- */

static void fmx__verify_component(const fmx_tool_ctx *ctx, const fmx__args *a, fmx_tool_result *out,
                                  fmx__sb *text, cJSON *data) {
    int m = fmx__module(ctx, a->path, out, text, data);
    if (m < 0) return;
    fmx_pack *pack = ctx->task->pack;
    fmx_verify_config cfg = fmx_verify_config_default();
    cfg.component = fmx_pack_module(pack, m)->path;
    cfg.decode = ctx->task->decode && m == 0; /* the task's own code: graded with its cache */
    cfg.entry = a->entry;
    cfg.all_probes = 0;
    cfg.compile_check = 1;
    cJSON *report = NULL;
    fmx_verify_source(pack, a->code, strlen(a->code), "candidate.py", &cfg, &report);
    if (!report) {
        text->oom = 1;
        return;
    }
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (f) {
        fmx_verify_print(f, report, 0);
        fclose(f);
        fmx__sb_put(text, buf, len);
        free(buf);
    }
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(report, "error");
    const char *stage = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(err, "stage"));
    int compiled = !stage || (strcmp(stage, "compile") != 0 && strcmp(stage, "entry") != 0);
    out->verified_task_code = compiled && strcmp(cfg.component, ctx->task->path) == 0;
    /* The report is the data (fields as in `fmx verify --json`, README). */
    while (report->child) {
        cJSON *c = cJSON_DetachItemViaPointer(report, report->child);
        cJSON_AddItemToObject(data, c->string, c); /* copies the key, then frees the old one */
    }
    cJSON_Delete(report);
}

/* ---- submit / grading ---- */

int fmx_tools_grade(const fmx_tool_ctx *ctx, const char *code, size_t len, const char *entry,
                    fmx_grade *g) {
    memset(g, 0, sizeof *g);
    fmx_pack *pack = ctx->task->pack;
    fmx_verify_config cfg = fmx_verify_config_default();
    cfg.component = ctx->task->path;
    cfg.decode = ctx->task->decode;
    cfg.entry = entry ? entry : "forward";
    cfg.all_probes = 1;
    cfg.compile_check = 1;
    cJSON *report = NULL;
    fmx_verify_source(pack, code, len, "candidate.py", &cfg, &report);
    if (!report) return FMX_ENOMEM;
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(report, "error");
    const char *stage = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(err, "stage"));
    const char *msg = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(err, "message"));
    /* Hidden probes are reported as pass/fail only: a bind or run error's
     * message can carry a hidden input's values or shapes (a candidate can
     * raise one with any text), so the grade quotes the first error on a
     * visible probe, and withholds the message when only hidden probes had
     * one. */
    char withheld[256];
    {
        const cJSON *r, *first_hidden = NULL, *first_visible = NULL;
        cJSON_ArrayForEach(r, cJSON_GetObjectItemCaseSensitive(report, "probes")) {
            int vis = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "visible"));
            if (!cJSON_IsString(cJSON_GetObjectItemCaseSensitive(r, "stage"))) continue;
            if (vis && !first_visible) first_visible = r;
            if (!vis && !first_hidden) first_hidden = r;
        }
        if (first_visible) {
            stage = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(first_visible, "stage"));
            msg = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(first_visible, "error"));
        } else if (first_hidden) {
            stage = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(first_hidden, "stage"));
            snprintf(withheld, sizeof withheld,
                     "the candidate failed (%s) on hidden probe %s; the message is withheld: "
                     "hidden probes are reported as pass/fail only",
                     stage,
                     cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(first_hidden, "probe")));
            msg = withheld;
        }
    }

    /* Per probe: graded if the module was called on it; passed if every
     * call passed. */
    int np = fmx_pack_nprobes(pack);
    int *called = calloc((size_t)np + 1, sizeof *called);
    int *failed = calloc((size_t)np + 1, sizeof *failed);
    if (!called || !failed) {
        free(called);
        free(failed);
        cJSON_Delete(report);
        return FMX_ENOMEM;
    }
    const cJSON *r;
    cJSON_ArrayForEach(r, cJSON_GetObjectItemCaseSensitive(report, "probes")) {
        const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(r, "probe"));
        for (int i = 0; name && i < np; i++)
            if (strcmp(fmx_pack_probe(pack, i)->name, name) == 0) {
                called[i] = 1;
                failed[i] |= !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "pass"));
            }
    }
    cJSON *sum = cJSON_CreateObject();
    cJSON *probes = cJSON_CreateArray();
    for (int i = 0; i < np; i++) {
        if (!called[i]) continue;
        g->graded_probes++;
        g->passed_probes += !failed[i];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "probe", fmx_pack_probe(pack, i)->name);
        cJSON_AddBoolToObject(o, "visible", fmx_pack_probe(pack, i)->visible);
        cJSON_AddBoolToObject(o, "pass", !failed[i]);
        cJSON_AddItemToArray(probes, o);
    }

    fmx_grade_facts *f = &g->facts;
    /* Correctness is the Python run's; the compile facts are TorchScript's
     * (the report's compile_check, verify.h): "compiled" means it compiles
     * the file with the same meaning and runs it. */
    const cJSON *cc = cJSON_GetObjectItemCaseSensitive(report, "compile_check");
    int loads = !stage || (strcmp(stage, "compile") != 0 && strcmp(stage, "entry") != 0);
    f->compiled = loads && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(cc, "compiled")) &&
                  cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(cc, "ran")) &&
                  cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(cc, "same_meaning"));
    f->correctness = g->graded_probes ? (double)g->passed_probes / (double)g->graded_probes : 0.0;
    f->loc = fmx_reward_count_loc(code, len);
    f->target_loc = (long)ctx->task->target_loc;
    /* Run errors (bind, run), a missing entry or nothing to run: not every
     * shape ran. */
    f->runs_all_shapes = loads && g->graded_probes > 0 && !stage;
    char first_problem[256] = "", opt_why[512] = "", compile_error[1024] = "";
    if (cc) {
        f->host_syncs =
            (int)cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(cc, "host_syncs"));
        f->data_dependent_flow =
            (int)cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(cc, "data_dependent_flow"));
        f->survives_optimization =
            cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(cc, "survives_optimization"));
        const char *s1 =
            cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(cc, "first_problem"));
        const char *s2 =
            cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(cc, "optimized_why"));
        const char *s3 = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(cc, "error"));
        snprintf(first_problem, sizeof first_problem, "%s", s1 ? s1 : "");
        snprintf(opt_why, sizeof opt_why, "%s", s2 ? s2 : "");
        snprintf(compile_error, sizeof compile_error, "%s", s3 ? s3 : "");
    }
    g->score = fmx_reward_score(ctx->reward, f);
    fmx_reward_breakdown_json(ctx->reward, f, &g->score, g->breakdown, sizeof g->breakdown);

    fmx_proto_add_float(sum, "reward", g->score.reward);
    fmx_proto_add_float(sum, "correctness", f->correctness);
    cJSON_AddNumberToObject(sum, "probes_passed", g->passed_probes);
    cJSON_AddNumberToObject(sum, "probes_graded", g->graded_probes);
    cJSON_AddItemToObject(sum, "probes", probes);
    cJSON_AddNumberToObject(sum, "loc", (double)f->loc);
    cJSON_AddNumberToObject(sum, "target_loc", (double)f->target_loc);
    cJSON_AddBoolToObject(sum, "compiled", f->compiled);
    cJSON_AddBoolToObject(sum, "runs_all_shapes", f->runs_all_shapes);
    cJSON_AddNumberToObject(sum, "host_syncs", f->host_syncs);
    cJSON_AddNumberToObject(sum, "data_dependent_flow", f->data_dependent_flow);
    cJSON_AddBoolToObject(sum, "survives_optimization", f->survives_optimization);
    if (first_problem[0]) cJSON_AddStringToObject(sum, "first_problem", first_problem);
    if (compile_error[0]) cJSON_AddStringToObject(sum, "compile_error", compile_error);
    fmx_proto_add_float(sum, "loc_score", g->score.loc_score);
    fmx_proto_add_float(sum, "compile_score", g->score.compile_score);
    cJSON *bd = cJSON_Parse(g->breakdown);
    if (bd) cJSON_AddItemToObject(sum, "breakdown", bd);
    if (stage) {
        cJSON *e = cJSON_AddObjectToObject(sum, "error");
        cJSON_AddStringToObject(e, "stage", stage);
        cJSON_AddStringToObject(e, "message", msg ? msg : "");
    }
    g->summary = sum;

    fmx__sb t = {0};
    fmx__sb_printf(&t, "Graded %s() for %s (%s) on every probe, hidden included.\n", cfg.entry,
                   fmx__disp(cfg.component), ctx->task->cls);
    if (stage) fmx__sb_printf(&t, "error (%s): %s\n", stage, msg ? msg : "");
    fmx__sb_printf(&t, "correctness: %d/%d probes pass:", g->passed_probes, g->graded_probes);
    cJSON_ArrayForEach(r, probes)
        fmx__sb_printf(&t, " %s%s %s", cJSON_GetStringValue(cJSON_GetObjectItem(r, "probe")),
                       cJSON_IsTrue(cJSON_GetObjectItem(r, "visible")) ? "" : " (hidden)",
                       cJSON_IsTrue(cJSON_GetObjectItem(r, "pass")) ? "ok" : "FAIL");
    fmx__sb_printf(&t, "\nlines of code: %ld logical (target %ld)\n", f->loc, f->target_loc);
    fmx__sb_printf(&t, "compile (TorchScript): %s%s%s, runs on every probe shape: %s\n",
                   f->compiled ? "compiles" : "does not compile",
                   !f->compiled && compile_error[0] ? ": " : "", f->compiled ? "" : compile_error,
                   f->runs_all_shapes ? "yes" : "no");
    if (f->compiled) {
        fmx__sb_printf(&t, "host syncs: %d, data-dependent branches/loops: %d%s%s\n", f->host_syncs,
                       f->data_dependent_flow, first_problem[0] ? "; first: " : "", first_problem);
        fmx__sb_printf(&t, "survives graph optimization: %s%s%s\n",
                       f->survives_optimization ? "yes" : "no",
                       !f->survives_optimization && opt_why[0] ? ": " : "",
                       f->survives_optimization ? "" : opt_why);
    }
    fmx__sb_printf(
        &t,
        "reward %.4f = %.2f\u00b7correctness %.4f + [all probes pass]\u00b7(%.2f\u00b7loc "
        "%.4f + %.2f\u00b7compile %.4f)  (%s)\n",
        g->score.reward, ctx->reward->w_correct, g->score.correctness, ctx->reward->w_loc,
        g->score.loc_score, ctx->reward->w_compile, g->score.compile_score, ctx->reward->version);
    g->text = t.oom ? NULL : t.s;
    if (t.oom) free(t.s);
    free(called);
    free(failed);
    cJSON_Delete(report);
    return g->text ? FMX_OK : FMX_ENOMEM;
}

static void fmx__submit(const fmx_tool_ctx *ctx, const fmx__args *a, fmx_tool_result *out,
                        fmx__sb *text, cJSON *data) {
    if (fmx_tools_grade(ctx, a->code, strlen(a->code), a->entry, &out->grade) != FMX_OK) {
        text->oom = 1;
        return;
    }
    out->submitted = 1;
    fmx__sb_printf(text, "Submitted; the episode is over.\n%s", out->grade.text);
    cJSON_AddItemToObject(data, "grade", cJSON_Duplicate(out->grade.summary, 1));
}

/* finish: says what happens; the episode grades its last verified code. */
static void fmx__finish(const fmx_tool_ctx *ctx, const fmx__args *a, fmx_tool_result *out,
                        fmx__sb *text, cJSON *data) {
    fmx__sb_printf(text, "Finished; the episode is over.");
}

/* ---- cache of cheap observations ----
 * Cheap tools are pure functions of (task, tool, arguments), and policies ask
 * the same questions over and over (every episode of a task starts by reading
 * the same sources): their observations are kept, keyed by task id, tool and
 * the arguments' JSON text, and handed out as copies. Bounded: when full it
 * starts over. */

#define FMX__CACHE_SLOTS 4096 /* power of two */
#define FMX__CACHE_MAX 2048   /* entries before it starts over */

typedef struct {
    char *key;
    uint64_t hash;
    cJSON *observation;
} fmx__cache_entry;

static fmx__cache_entry fmx__cache[FMX__CACHE_SLOTS];
static int fmx__cache_n;
static pthread_mutex_t fmx__cache_lock = PTHREAD_MUTEX_INITIALIZER;

static uint64_t fmx__fnv1a(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

/* "task\ntool\nargs-json"; caller frees. */
static char *fmx__cache_key(const fmx_tool_ctx *ctx, const char *tool, const cJSON *args) {
    char *a = args ? cJSON_PrintUnformatted(args) : NULL;
    char *key = NULL;
    if (asprintf(&key, "%s\n%s\n%s", ctx->task->id, tool, a ? a : "{}") < 0) key = NULL;
    free(a);
    return key;
}

/* Index of key's slot (found or empty), under the lock. */
static size_t fmx__cache_slot(const char *key, uint64_t h) {
    size_t i = (size_t)h & (FMX__CACHE_SLOTS - 1);
    while (fmx__cache[i].key && (fmx__cache[i].hash != h || strcmp(fmx__cache[i].key, key) != 0))
        i = (i + 1) & (FMX__CACHE_SLOTS - 1);
    return i;
}

/* A copy of the cached observation for key, or NULL. */
static cJSON *fmx__cache_get(const char *key) {
    uint64_t h = fmx__fnv1a(key, strlen(key));
    pthread_mutex_lock(&fmx__cache_lock);
    size_t i = fmx__cache_slot(key, h);
    cJSON *copy = fmx__cache[i].key ? cJSON_Duplicate(fmx__cache[i].observation, 1) : NULL;
    pthread_mutex_unlock(&fmx__cache_lock);
    return copy;
}

/* Keeps a copy of obs under key (takes key). */
static void fmx__cache_put(char *key, const cJSON *obs) {
    cJSON *copy = cJSON_Duplicate(obs, 1);
    if (!copy) {
        free(key);
        return;
    }
    uint64_t h = fmx__fnv1a(key, strlen(key));
    pthread_mutex_lock(&fmx__cache_lock);
    if (fmx__cache_n >= FMX__CACHE_MAX) {
        for (size_t i = 0; i < FMX__CACHE_SLOTS; i++) {
            free(fmx__cache[i].key);
            cJSON_Delete(fmx__cache[i].observation);
        }
        memset(fmx__cache, 0, sizeof fmx__cache);
        fmx__cache_n = 0;
    }
    size_t i = fmx__cache_slot(key, h);
    if (fmx__cache[i].key) { /* another thread got here first */
        free(key);
        cJSON_Delete(copy);
    } else {
        fmx__cache[i] = (fmx__cache_entry){key, h, copy};
        fmx__cache_n++;
    }
    pthread_mutex_unlock(&fmx__cache_lock);
}

/* ---- dispatch ---- */

static int fmx__tools_run(const fmx_tool_ctx *ctx, const char *tool, const cJSON *args,
                          fmx_tool_result *out);

int fmx_tools_run(const fmx_tool_ctx *ctx, const char *tool, const cJSON *args,
                  fmx_tool_result *out) {
    if (!tool || !fmx_tools_exists(tool) || fmx_tools_is_heavy(tool) || !ctx->task->id)
        return fmx__tools_run(ctx, tool, args, out);
    char *key = fmx__cache_key(ctx, tool, args);
    cJSON *hit = key ? fmx__cache_get(key) : NULL;
    if (hit) {
        free(key);
        memset(out, 0, sizeof *out);
        out->observation = hit;
        out->error = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(hit, "error"));
        return FMX_OK;
    }
    int rc = fmx__tools_run(ctx, tool, args, out);
    if (rc == FMX_OK && key)
        fmx__cache_put(key, out->observation);
    else
        free(key);
    return rc;
}

static int fmx__tools_run(const fmx_tool_ctx *ctx, const char *tool, const cJSON *args,
                          fmx_tool_result *out) {
    memset(out, 0, sizeof *out);
    cJSON *obs = cJSON_CreateObject();
    if (!obs) return FMX_ENOMEM;
    cJSON_AddStringToObject(obs, "tool", tool ? tool : "");
    cJSON *data = cJSON_CreateObject();
    fmx__sb text = {0};
    const fmx__tool *t = fmx__find_tool(tool);
    if (!t) {
        fmx__sb_printf(&text, "Unknown tool \"%s\". Tools:\n%s", tool ? tool : "",
                       fmx_tools_summary());
        out->error = "unknown_tool";
    } else {
        fmx__args a;
        int ok = fmx__parse_args(ctx, t, args, &a, &text);
        if (ok > 0)
            t->fn(ctx, &a, out, &text, data);
        else
            out->error = ok < 0 ? "code_too_long" : "bad_args";
    }
    if (text.oom || !data) {
        free(text.s);
        cJSON_Delete(data);
        cJSON_Delete(obs);
        fmx_grade_clear(&out->grade);
        memset(out, 0, sizeof *out);
        return FMX_ENOMEM;
    }
    cJSON_AddStringToObject(obs, "text", fmx__sb_str(&text));
    free(text.s);
    cJSON_AddItemToObject(obs, "data", data);
    if (out->error) {
        cJSON *e = cJSON_AddStringToObject(obs, "error", out->error);
        out->error = e ? e->valuestring : NULL;
    }
    out->observation = obs;
    return FMX_OK;
}
