/*
 * verify.c — grades a candidate against a pack: binds each captured call's
 * inputs to the entry function's parameters by name, runs it, compares every
 * tensor output (masked to real tokens where token-aligned) and every tap()
 * against the module it names, and builds a report that says where the
 * candidate first diverges.
 *
 * The report is a cJSON tree (schema in README, "fmx verify --json"); the
 * text form is printed from the same tree, so the two cannot disagree.
 */
#include "verify.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "evaluator.h"
#include "proto.h"
#include "status.h"

#define FMX__ERR 2048

fmx_verify_config fmx_verify_config_default(void) {
    return (fmx_verify_config){.component = "", .entry = "forward", .all_probes = 0};
}

static cJSON *fmx__shape_json(const fmx_tensor *t, fmx_dtype *dt) {
    int64_t shape[FMX_MAX_DIMS];
    int nd = fmx_tensor_shape(t, shape, dt);
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < nd; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber((double)shape[i]));
    return a;
}

/* Marks the report as an error. Only the first error is kept: a run error on
 * one probe is recorded there and the remaining probes are still graded. */
static void fmx__error(cJSON *report, const char *stage, const char *msg) {
    cJSON_ReplaceItemInObjectCaseSensitive(report, "status", cJSON_CreateString("error"));
    if (cJSON_GetObjectItemCaseSensitive(report, "error")) return;
    cJSON *e = cJSON_AddObjectToObject(report, "error");
    cJSON_AddStringToObject(e, "stage", stage);
    cJSON_AddStringToObject(e, "message", msg);
}

static void fmx__errorf(cJSON *report, const char *stage, const char *fmt, ...) {
    char msg[FMX__ERR];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fmx__error(report, stage, msg);
}

/* Compares got against want (masked if token-aligned); adds a result object
 * to arr and returns whether it passed. */
static int fmx__grade(fmx_pack *pack, const fmx_verify_config *cfg, const fmx_probe *probe,
                      const fmx_io *want_io, const fmx_tensor *got, const char *name, cJSON *arr) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddItemToArray(arr, o);
    cJSON_AddStringToObject(o, "name", name);
    const fmx_tensor *want = fmx_pack_capture(pack, want_io->key);
    const fmx_tensor *mask = NULL;
    if (want_io->mask)
        mask = fmx_pack_capture(pack, want_io->mask);
    else if (want_io->token_aligned && probe->mask_key)
        mask = fmx_pack_capture(pack, probe->mask_key);
    fmx_dtype wdt = FMX_DT_F32, gdt = FMX_DT_F32;
    cJSON_AddItemToObject(o, "want_shape", fmx__shape_json(want, &wdt));
    cJSON_AddItemToObject(o, "got_shape", fmx__shape_json(got, &gdt));
    cJSON_AddStringToObject(o, "want_dtype", fmx_dtype_name(wdt));
    cJSON_AddStringToObject(o, "got_dtype", fmx_dtype_name(gdt));
    fmx_tolerance tol = fmx_pack_tolerance(pack, wdt);
    if (cfg->override_tol &&
        (wdt == FMX_DT_F32 || wdt == FMX_DT_BF16 || wdt == FMX_DT_F16 || wdt == FMX_DT_F64))
        tol = cfg->tol;
    fmx_compare_result r;
    char err[512];
    if (fmx_compare(got, want, mask, tol, &r, err, sizeof err) != 0) {
        cJSON_AddBoolToObject(o, "pass", 0);
        cJSON_AddStringToObject(o, "error", err);
        return 0;
    }
    cJSON_AddBoolToObject(o, "pass", r.pass);
    cJSON_AddBoolToObject(o, "shape_ok", r.shape_ok);
    cJSON_AddBoolToObject(o, "dtype_ok", r.dtype_ok);
    if (r.shape_ok && r.dtype_ok) {
        cJSON_AddNumberToObject(o, "max_abs", r.max_abs);
        cJSON_AddNumberToObject(o, "max_rel", r.max_rel);
        cJSON_AddNumberToObject(o, "scale", r.scale);
        cJSON_AddNumberToObject(o, "compared", (double)r.compared);
        cJSON_AddNumberToObject(o, "bad", (double)r.bad);
        cJSON_AddNumberToObject(o, "nonfinite", (double)r.nonfinite);
        cJSON_AddNumberToObject(o, "atol", tol.atol);
        cJSON_AddNumberToObject(o, "rtol", tol.rtol);
        cJSON_AddBoolToObject(o, "masked", mask != NULL);
        if (!r.pass) {
            cJSON *w = cJSON_AddArrayToObject(o, "worst_index");
            for (int i = 0; i < r.worst_ndim; i++)
                cJSON_AddItemToArray(w, cJSON_CreateNumber((double)r.worst[i]));
            cJSON_AddNumberToObject(o, "worst_got", isfinite(r.worst_got) ? r.worst_got : 0);
            cJSON_AddNumberToObject(o, "worst_want", r.worst_want);
            if (!isfinite(r.worst_got))
                cJSON_AddStringToObject(o, "worst_got_text", isnan(r.worst_got) ? "nan" : "inf");
        }
    }
    return r.pass;
}

/* Resolves a tap name to a module index: relative to the component first,
 * then as an absolute path. */
static int fmx__tap_module(const fmx_pack *pack, const char *component, const char *name) {
    if (component[0]) {
        char path[1024];
        snprintf(path, sizeof path, "%s.%s", component, name);
        int m = fmx_pack_find_module(pack, path);
        if (m >= 0) return m;
    }
    return fmx_pack_find_module(pack, name);
}

/* A tap whose name is no path (relative or absolute), as a helper shared by
 * several modules writes it (tap("mlp", h) inside a layer helper): its k-th
 * occurrence is the k-th call on the probe of a module whose path ends in
 * ".name", in the order calls started. The call's index, or -1. */
static int fmx__tap_by_suffix(const fmx_pack *pack, int probe_i, const char *name, int k) {
    size_t ln = strlen(name);
    for (int c = 0; c < fmx_pack_ncalls(pack); c++) {
        const fmx_call *call = fmx_pack_call(pack, c);
        if (call->probe != probe_i) continue;
        const char *path = fmx_pack_module(pack, call->module)->path;
        size_t lp = strlen(path);
        if (lp > ln && path[lp - ln - 1] == '.' && strcmp(path + lp - ln, name) == 0 && k-- == 0)
            return c;
    }
    return -1;
}

/* Grades the taps of one call (names[i], tensors[i], in call order);
 * returns the first failing tap's name or NULL. */
static const char *fmx__grade_taps(fmx_pack *pack, const fmx_verify_config *cfg, int probe_i,
                                   const char *const *names, fmx_tensor *const *vals, int n,
                                   cJSON *taps) {
    const fmx_probe *probe = fmx_pack_probe(pack, probe_i);
    int *seen_module = calloc((size_t)n + 1, sizeof(int));
    if (!seen_module) return NULL;
    const char *first_bad = NULL;
    for (int i = 0; i < n; i++) {
        const char *name = names[i];
        int m = fmx__tap_module(pack, cfg->component, name);
        seen_module[i] = m;
        int k = 0; /* occurrence of this module among earlier taps */
        for (int j = 0; j < i; j++)
            k += seen_module[j] == m;
        int c = m >= 0 ? fmx_pack_find_call(pack, probe_i, m, k) : -1;
        if (m < 0) { /* k: earlier taps of the same unresolved name */
            k = 0;
            for (int j = 0; j < i; j++)
                k += seen_module[j] < 0 && strcmp(names[j], name) == 0;
            c = fmx__tap_by_suffix(pack, probe_i, name, k);
            if (c >= 0) m = fmx_pack_call(pack, c)->module;
        }
        const fmx_call *call = fmx_pack_call(pack, c);
        const fmx_io *out0 = NULL;
        for (int j = 0; call && j < call->noutputs && !out0; j++)
            if (call->outputs[j].kind == FMX_IO_TENSOR) out0 = &call->outputs[j];
        if (!out0 || !vals[i]) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "name", name);
            cJSON_AddStringToObject(o, "note",
                                    !vals[i] ? "the tapped value could not be read; not graded"
                                    : m < 0  ? "no module has this path relative to the "
                                               "component or absolute, nor one ending in "
                                               "\".NAME\" for a helper's tap; not graded"
                                             : "module has no such call; not graded");
            cJSON_AddItemToArray(taps, o);
            continue;
        }
        int ok = fmx__grade(pack, cfg, probe, out0, vals[i], name, taps);
        cJSON *o = cJSON_GetArrayItem(taps, cJSON_GetArraySize(taps) - 1);
        cJSON_AddStringToObject(o, "module", fmx_pack_module(pack, m)->path);
        cJSON_AddStringToObject(o, "class", fmx_pack_module(pack, m)->cls);
        if (seen_module[i] < 0)
            cJSON_AddStringToObject(o, "resolved",
                                    "by suffix: the k-th tap of this name is the k-th call of a "
                                    "module whose path ends in it");
        if (!ok && !first_bad) first_bad = name;
    }
    free(seen_module);
    return first_bad;
}

/* ---- evaluation jobs ---- */

/* One input of a call in the job's form (python/fmx/evaluate.py). */
static int fmx__job_input(fmx_pack *pack, fmx_eval_job *job, const fmx_io *io, cJSON *arr) {
    static const char *kinds[] = {"tensor", "value", "none", "cache", "other"};
    cJSON *o = cJSON_CreateObject();
    if (!o) return FMX_ENOMEM;
    cJSON_AddItemToArray(arr, o);
    cJSON_AddStringToObject(o, "name", io->name);
    cJSON_AddStringToObject(o, "kind", kinds[io->kind]);
    if (io->kind == FMX_IO_TENSOR) {
        int t = fmx_eval_job_tensor(job, fmx_pack_capture(pack, io->key));
        if (t < 0) return t;
        cJSON_AddNumberToObject(o, "tensor", t);
    } else if (io->kind == FMX_IO_VALUE) {
        static const char *types[] = {"int", "float", "bool", "str"};
        cJSON_AddStringToObject(o, "type", types[io->vtype]);
        if (io->vtype == FMX_VAL_STR)
            cJSON_AddStringToObject(o, "value", io->s ? io->s : "");
        else if (io->vtype == FMX_VAL_BOOL)
            cJSON_AddBoolToObject(o, "value", io->i != 0);
        else if (io->vtype == FMX_VAL_INT)
            cJSON_AddNumberToObject(o, "value", (double)io->i);
        else
            fmx_proto_add_float(o, "value", io->f);
    }
    return FMX_OK;
}

/* Runs calls[0..n) of the component in one fresh evaluation process: under
 * the hidden weight set when hidden, with TorchScript's compile check on
 * calls[0] when check. FMX_OK with *out set, or a negative status (err). */
static int fmx__run_job(fmx_pack *pack, const char *source, size_t len, const char *filename,
                        const fmx_verify_config *cfg, const fmx_module *mod, const int *calls,
                        int n, int hidden, int check, fmx_eval_result **out, char *err,
                        size_t errsz) {
    *out = NULL;
    fmx_evaluator *ev = fmx_evaluator_shared(err, errsz);
    if (!ev) return FMX_EIO;
    fmx_eval_job *job = fmx_eval_job_create();
    char *code = malloc(len + 1);
    if (!job || !code) {
        fmx_eval_job_destroy(job);
        free(code);
        snprintf(err, errsz, "out of memory");
        return FMX_ENOMEM;
    }
    memcpy(code, source, len);
    code[len] = '\0';
    cJSON *h = fmx_eval_job_header(job);
    cJSON_AddStringToObject(h, "code", code);
    free(code);
    cJSON_AddStringToObject(h, "filename", filename ? filename : "candidate.py");
    cJSON_AddStringToObject(h, "entry", cfg->entry);
    cJSON_AddStringToObject(h, "component", cfg->component);
    cJSON_AddStringToObject(h, "module_class", mod->cls);
    cJSON_AddStringToObject(h, "pack_dtype", fmx_pack_dtype(pack));
    cJSON_AddStringToObject(h, "weights_path", fmx_pack_weights_path(pack, hidden));
    cJSON_AddBoolToObject(h, "run", 1);
    cJSON_AddBoolToObject(h, "check", check);
    cJSON_AddNumberToObject(h, "max_taps", FMX_VERIFY_MAX_TAPS);
    const char *const *rel = NULL, *const *key = NULL;
    int nw = fmx_pack_weight_names(pack, cfg->component, &rel, &key, err, errsz);
    int rc = nw < 0 ? nw : FMX_OK;
    cJSON *w = cJSON_AddArrayToObject(h, "weights");
    for (int i = 0; rc == FMX_OK && i < nw; i++) {
        cJSON *pair = cJSON_CreateArray();
        cJSON_AddItemToArray(pair, cJSON_CreateString(rel[i]));
        cJSON_AddItemToArray(pair, cJSON_CreateString(key[i]));
        cJSON_AddItemToArray(w, pair);
    }
    cJSON *arr = cJSON_AddArrayToObject(h, "calls");
    for (int i = 0; rc == FMX_OK && i < n; i++) {
        const fmx_call *call = fmx_pack_call(pack, calls[i]);
        cJSON *c = cJSON_CreateObject();
        cJSON_AddItemToArray(arr, c);
        cJSON_AddStringToObject(c, "dtype",
                                fmx_dtype_name(fmx_pack_probe(pack, call->probe)->dtype));
        cJSON *ins = cJSON_AddArrayToObject(c, "inputs");
        for (int k = 0; rc == FMX_OK && k < call->ninputs; k++)
            rc = fmx__job_input(pack, job, &call->inputs[k], ins);
    }
    if (rc == FMX_OK)
        rc = fmx_evaluator_run(ev, job, out, err, errsz);
    else if (rc != FMX_EINVAL || !err[0])
        snprintf(err, errsz, "building the job: %s", fmx_strerror(rc));
    fmx_eval_job_destroy(job);
    return rc;
}

/* The result object of call i of a job, or NULL. */
static const cJSON *fmx__call_result(const fmx_eval_result *r, int i) {
    const cJSON *h = r ? fmx_eval_result_header(r) : NULL;
    return cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(h, "calls"), i);
}

/* Grades one call from its result in the job; adds the probe's report r.
 * Returns 1 passed, 0 failed; *stage_out is set on a bind/run/fate error. */
static int fmx__grade_call(fmx_pack *pack, const fmx_verify_config *cfg, const fmx_module *mod,
                           const fmx_call *call, fmx_eval_result *res, int i, cJSON *r,
                           cJSON *report, int *err_status, const char **first_div) {
    const fmx_probe *probe = fmx_pack_probe(pack, call->probe);
    char err[FMX__ERR];
    if (!res || fmx_eval_result_fate(res) != FMX_EVAL_OK) {
        const char *fate = res ? fmx_eval_fate_name(fmx_eval_result_fate(res)) : "crashed";
        snprintf(err, sizeof err, "%s: the candidate's evaluation %s", fate,
                 res ? fmx_eval_result_why(res) : "could not run");
        cJSON_AddBoolToObject(r, "pass", 0);
        cJSON_AddStringToObject(r, "error", err);
        cJSON_AddStringToObject(r, "stage", fate);
        fmx__error(report, fate, err);
        if (!*err_status) *err_status = FMX_ERUNTIME;
        return 0;
    }
    const cJSON *cr = fmx__call_result(res, i);
    if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(cr, "ok"))) {
        const char *stage = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(cr, "stage"));
        const char *msg = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(cr, "error"));
        if (!stage || strcmp(stage, "bind") != 0) stage = "run";
        if (!msg) msg = "the evaluation process gave no result for this call";
        cJSON_AddBoolToObject(r, "pass", 0);
        cJSON_AddStringToObject(r, "error", msg);
        cJSON_AddStringToObject(r, "stage", stage);
        fmx__error(report, stage, msg);
        if (!*err_status) *err_status = strcmp(stage, "bind") == 0 ? FMX_EINVAL : FMX_ERUNTIME;
        return 0;
    }
    if (probe->visible)
        cJSON_AddNumberToObject(r, "ms",
                                cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(cr, "ms")));

    /* Graded outputs: the call's tensor outputs, in order. */
    const cJSON *got = cJSON_GetObjectItemCaseSensitive(cr, "outputs");
    int nwant = 0;
    for (int j = 0; j < call->noutputs; j++)
        nwant += call->outputs[j].kind == FMX_IO_TENSOR;
    int ngot = cJSON_GetArraySize(got);
    int ok = 1;
    cJSON *outs = cJSON_AddArrayToObject(r, "outputs");
    if (ngot != nwant) {
        char names[512] = "";
        size_t used = 0;
        for (int j = 0; j < call->noutputs; j++)
            if (call->outputs[j].kind == FMX_IO_TENSOR && used < sizeof names)
                used += (size_t)snprintf(names + used, sizeof names - used, "%s%s",
                                         used ? ", " : "", call->outputs[j].name);
        snprintf(err, sizeof err, "%s() returned %d output%s; %s returns %d (%s)", cfg->entry, ngot,
                 ngot == 1 ? "" : "s", mod->cls, nwant, names);
        cJSON_AddStringToObject(r, "error", err);
        ok = 0;
    } else {
        for (int j = 0, k = 0; j < call->noutputs; j++) {
            if (call->outputs[j].kind != FMX_IO_TENSOR) continue;
            fmx_tensor *t = NULL;
            if (fmx_eval_result_tensor(res, cJSON_GetArrayItem(got, k++), &t, err, sizeof err)) {
                cJSON *o = cJSON_CreateObject();
                cJSON_AddStringToObject(o, "name", call->outputs[j].name);
                cJSON_AddBoolToObject(o, "pass", 0);
                cJSON_AddStringToObject(o, "error", err);
                cJSON_AddItemToArray(outs, o);
                ok = 0;
                continue;
            }
            ok &= fmx__grade(pack, cfg, probe, &call->outputs[j], t, call->outputs[j].name, outs);
            fmx_tensor_destroy(t);
        }
    }
    /* taps */
    const cJSON *tl = cJSON_GetObjectItemCaseSensitive(cr, "taps");
    int nt = cJSON_GetArraySize(tl);
    const char **tnames = calloc((size_t)nt + 1, sizeof *tnames);
    fmx_tensor **tvals = calloc((size_t)nt + 1, sizeof *tvals);
    cJSON *taps = cJSON_AddArrayToObject(r, "taps");
    const char *tap_bad = NULL;
    if (nt > 0 && (!tnames || !tvals))
        cJSON_AddStringToObject(r, "taps_note", "taps not graded: out of memory");
    if (tnames && tvals) {
        for (int j = 0; j < nt; j++) {
            const cJSON *b = cJSON_GetArrayItem(tl, j);
            const char *nm = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(b, "name"));
            tnames[j] = nm ? nm : "";
            if (fmx_eval_result_tensor(res, b, &tvals[j], err, sizeof err)) tvals[j] = NULL;
        }
        tap_bad = fmx__grade_taps(pack, cfg, call->probe, tnames, tvals, nt, taps);
    }
    double cut = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(cr, "taps_cut"));
    if (cut > 0) {
        char note[160];
        snprintf(note, sizeof note, "%.0f more tap() calls were not recorded (at most %d per call)",
                 cut, FMX_VERIFY_MAX_TAPS);
        cJSON_AddStringToObject(r, "taps_note", note);
    }
    cJSON_AddBoolToObject(r, "pass", ok);
    if (!ok) {
        /* The first divergence is the first failing tap, else the output. */
        const char *div = tap_bad ? tap_bad : (mod->path[0] ? mod->path : "output");
        cJSON_AddStringToObject(r, "first_divergence", div);
        if (!*first_div) *first_div = cJSON_GetObjectItem(r, "first_divergence")->valuestring;
    }
    for (int j = 0; tvals && j < nt; j++)
        fmx_tensor_destroy(tvals[j]);
    free(tnames);
    free(tvals);
    return ok;
}

/* The compile check's report: TorchScript's facts, and whether its run of
 * the job's first call computed what the Python run did. withhold: the check
 * ran on a hidden probe (say no more than yes or no). */
/* ---- the compile check's verdicts, by file ----
 * TorchScript's view of a file is a property of the file, its entry and the
 * call it ran on: a file graded again in this process (a policy verifies,
 * then submits the same code) reuses the verdict instead of compiling and
 * running it again. The last FMX__CHECKS verdicts, keyed by the SHA-256 of
 * the pack's folder, component, entry, call, withholding and the source. */
#define FMX__CHECKS 32
static struct {
    unsigned char key[32];
    cJSON *check; /* the report's compile_check object; NULL: empty slot */
} fmx__checks[FMX__CHECKS];
static int fmx__checks_next;
static pthread_mutex_t fmx__checks_lock = PTHREAD_MUTEX_INITIALIZER;

static int fmx__check_key(const fmx_pack *pack, const fmx_verify_config *cfg, int call,
                          int withhold, const char *source, size_t len, unsigned char key[32]) {
    char head[1200];
    int n = snprintf(head, sizeof head, "%s\n%s\n%s\n%s\n%d\n%d\n", fmx_pack_dir(pack),
                     fmx_pack_name(pack), cfg->component ? cfg->component : "",
                     cfg->entry ? cfg->entry : "forward", call, withhold);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    unsigned int out = 0;
    int ok = md && n > 0 && (size_t)n < sizeof head && EVP_DigestInit_ex(md, EVP_sha256(), NULL) &&
             EVP_DigestUpdate(md, head, (size_t)n) && EVP_DigestUpdate(md, source, len) &&
             EVP_DigestFinal_ex(md, key, &out) && out == 32;
    EVP_MD_CTX_free(md);
    return ok ? 0 : -1;
}

/* A copy of the verdict stored under key, or NULL. */
static cJSON *fmx__check_cached(const unsigned char key[32]) {
    cJSON *hit = NULL;
    pthread_mutex_lock(&fmx__checks_lock);
    for (int i = 0; i < FMX__CHECKS && !hit; i++)
        if (fmx__checks[i].check && memcmp(fmx__checks[i].key, key, 32) == 0)
            hit = cJSON_Duplicate(fmx__checks[i].check, 1);
    pthread_mutex_unlock(&fmx__checks_lock);
    return hit;
}

static void fmx__check_store(const unsigned char key[32], const cJSON *check) {
    cJSON *copy = check ? cJSON_Duplicate(check, 1) : NULL;
    if (!copy) return;
    pthread_mutex_lock(&fmx__checks_lock);
    int i = fmx__checks_next;
    fmx__checks_next = (i + 1) % FMX__CHECKS;
    cJSON_Delete(fmx__checks[i].check);
    memcpy(fmx__checks[i].key, key, 32);
    fmx__checks[i].check = copy;
    pthread_mutex_unlock(&fmx__checks_lock);
}

static void fmx__compile_check(fmx_pack *pack, fmx_eval_result *res, int withhold, cJSON *report) {
    const cJSON *h = res ? fmx_eval_result_header(res) : NULL;
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(h, "check");
    if (!cJSON_IsObject(c)) return;
    cJSON *o = cJSON_AddObjectToObject(report, "compile_check");
    int compiled = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "compiled")) &&
                   cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "entry"));
    int ran = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "ran"));
    const char *error = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "error"));
    const char *why = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "why"));
    const char *problem =
        cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "first_problem"));
    /* same meaning: TorchScript's outputs against Python's on that call */
    char meaning[FMX__ERR] = "";
    int same = 0;
    const cJSON *py = fmx__call_result(res, 0);
    const cJSON *pyo = cJSON_GetObjectItemCaseSensitive(py, "outputs");
    const cJSON *tso = cJSON_GetObjectItemCaseSensitive(c, "outputs");
    if (!ran) {
        snprintf(meaning, sizeof meaning, "TorchScript could not run it");
    } else if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(py, "ok"))) {
        snprintf(meaning, sizeof meaning, "the Python run failed, so there is nothing to match");
    } else if (cJSON_GetArraySize(pyo) != cJSON_GetArraySize(tso)) {
        snprintf(meaning, sizeof meaning,
                 "TorchScript's version returns %d outputs where Python's returns %d",
                 cJSON_GetArraySize(tso), cJSON_GetArraySize(pyo));
    } else {
        same = 1;
        for (int i = 0; same && i < cJSON_GetArraySize(pyo); i++) {
            fmx_tensor *a = NULL, *b = NULL;
            char err[256];
            fmx_compare_result cr;
            int64_t shape[FMX_MAX_DIMS];
            fmx_dtype dt = FMX_DT_F32;
            int rc = fmx_eval_result_tensor(res, cJSON_GetArrayItem(pyo, i), &a, err, sizeof err);
            if (!rc)
                rc = fmx_eval_result_tensor(res, cJSON_GetArrayItem(tso, i), &b, err, sizeof err);
            if (!rc) fmx_tensor_shape(a, shape, &dt);
            if (!rc)
                rc = fmx_compare(b, a, NULL, fmx_pack_tolerance(pack, dt), &cr, err, sizeof err);
            if (rc || !cr.pass) {
                same = 0;
                if (rc)
                    snprintf(meaning, sizeof meaning, "output %d: %s", i, err);
                else if (!cr.shape_ok || !cr.dtype_ok)
                    snprintf(meaning, sizeof meaning,
                             "TorchScript gives output %d another %s than Python (it compiles "
                             "some construct with another meaning)",
                             i, cr.shape_ok ? "dtype" : "shape");
                else
                    snprintf(meaning, sizeof meaning,
                             "TorchScript computes other numbers than Python for output %d "
                             "(max_rel %.3g): it compiles some construct with another meaning",
                             i, cr.max_rel);
            }
            fmx_tensor_destroy(a);
            fmx_tensor_destroy(b);
        }
    }
    cJSON_AddBoolToObject(o, "compiled", compiled);
    cJSON_AddBoolToObject(o, "ran", ran);
    cJSON_AddBoolToObject(o, "same_meaning", same);
    cJSON_AddNumberToObject(
        o, "host_syncs", cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(c, "host_syncs")));
    cJSON_AddNumberToObject(
        o, "data_dependent_flow",
        cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(c, "data_dependent_flow")));
    cJSON_AddBoolToObject(
        o, "survives_optimization",
        cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "survives_optimization")));
    if (problem && problem[0]) cJSON_AddStringToObject(o, "first_problem", problem);
    const char *msg = !compiled || !ran ? error : !same ? meaning : NULL;
    if (msg && msg[0])
        cJSON_AddStringToObject(o, "error", withhold ? "details withheld (a hidden probe)" : msg);
    if (ran && why && why[0])
        cJSON_AddStringToObject(o, "optimized_why",
                                withhold ? "the optimized re-run (on a hidden probe) differs or "
                                           "fails; details withheld"
                                         : why);
}

/* The report's compile_check: the cached verdict (taken), else the one this
 * evaluation's check gave (then stored under key, when there is one). */
static void fmx__verdict(fmx_pack *pack, fmx_eval_result *first, int withhold, cJSON *report,
                         cJSON **cached, const unsigned char *key) {
    if (*cached) {
        cJSON_DeleteItemFromObjectCaseSensitive(*cached, "reused");
        cJSON_AddTrueToObject(*cached, "reused"); /* not run again: this file's verdict */
        cJSON_AddItemToObject(report, "compile_check", *cached);
        *cached = NULL;
        return;
    }
    fmx__compile_check(pack, first, withhold, report);
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(report, "compile_check");
    if (key && c && fmx_eval_result_fate(first) == FMX_EVAL_OK) fmx__check_store(key, c);
}

int fmx_verify_source(fmx_pack *pack, const char *source, size_t len, const char *filename,
                      const fmx_verify_config *cfg_in, cJSON **report_out) {
    fmx_verify_config cfg = cfg_in ? *cfg_in : fmx_verify_config_default();
    if (!cfg.component) cfg.component = "";
    if (!cfg.entry) cfg.entry = "forward";
    cJSON *report = cJSON_CreateObject();
    *report_out = report;
    if (!report) return FMX_ENOMEM;
    cJSON_AddStringToObject(report, "status", "match");
    cJSON_AddStringToObject(report, "pack", fmx_pack_name(pack));
    cJSON_AddStringToObject(report, "component", cfg.component);
    cJSON_AddStringToObject(report, "entry", cfg.entry);
    cJSON_AddStringToObject(report, "engine", fmx_engine_version());
    cJSON_AddStringToObject(report, "device", fmx_engine_device());
    cJSON_AddStringToObject(report, "probes_graded", cfg.all_probes ? "all" : "visible");
    /* Which tolerance table applies: kernels of another build round differently. */
    cJSON_AddStringToObject(report, "tolerance_table",
                            cfg.override_tol            ? "command line"
                            : fmx_pack_same_build(pack) ? "same build"
                                                        : "cross build");

    int m = fmx_pack_find_module(pack, cfg.component);
    if (m < 0) {
        int near[3];
        int nn = fmx_pack_nearest_modules(pack, cfg.component, near, 3);
        char hint[512] = "";
        size_t used = 0;
        for (int i = 0; i < nn; i++)
            used += (size_t)snprintf(hint + used, sizeof hint - used, "%s'%s'", i ? ", " : "",
                                     fmx_pack_module(pack, near[i])->path);
        fmx__errorf(report, "component", "no module at path '%s' in pack %s; nearest: %s",
                    cfg.component, fmx_pack_name(pack), hint);
        return FMX_ENOTFOUND;
    }
    const fmx_module *mod = fmx_pack_module(pack, m);
    cJSON_AddStringToObject(report, "class", mod->cls);
    if (cfg.decode && (m != 0 || !fmx_pack_has_generation(pack))) {
        fmx__errorf(report, "component",
                    m != 0 ? "a decode task grades the whole model with its cache; "
                             "'%s' is a component (verify it without --decode)"
                           : "pack %s captured no generation (not a causal LM with a cache, or "
                             "exported before decode tasks): it has no decode task",
                    m != 0 ? cfg.component : fmx_pack_name(pack));
        return FMX_ENOTFOUND;
    }
    if (cfg.decode) cJSON_AddStringToObject(report, "task", "decode");

    /* The calls to grade: visible ones run together in one process; each
     * hidden one alone, under the hidden weight set. */
    int ncalls = fmx_pack_ncalls(pack), nvis = 0, nhid = 0;
    int *vis = calloc((size_t)ncalls + 1, sizeof *vis);
    int *hid = calloc((size_t)ncalls + 1, sizeof *hid);
    fmx_eval_result **hres = calloc((size_t)ncalls + 1, sizeof *hres);
    if (!vis || !hid || !hres) {
        free(vis);
        free(hid);
        free(hres);
        return FMX_ENOMEM;
    }
    for (int c = 0; c < ncalls; c++) {
        const fmx_call *call = fmx_pack_call(pack, c);
        const fmx_probe *probe = fmx_pack_probe(pack, call->probe);
        if (call->module != m || call->raised || (probe->step >= 0) != (cfg.decode != 0)) continue;
        if (probe->visible)
            vis[nvis++] = c;
        else if (cfg.all_probes)
            hid[nhid++] = c;
    }
    int status = FMX_OK, err_status = FMX_OK, graded = 0, passed = 0;
    char err[FMX__ERR] = "";
    fmx_eval_result *vres = NULL;
    cJSON *cached = NULL; /* the compile check's verdict from an earlier evaluation */
    if (nvis == 0 && nhid == 0) {
        fmx__errorf(report, "probes",
                    "module '%s' was never called on the %s probes; nothing to grade",
                    cfg.component, cfg.all_probes ? "" : "visible");
        err_status = FMX_ENOTFOUND;
        goto done;
    }
    int rc = FMX_OK;
    /* a verdict this process has for the file already: no check this time */
    unsigned char check_key[32];
    int keyed =
        cfg.compile_check && !cfg.check_again &&
        fmx__check_key(pack, &cfg, nvis ? vis[0] : hid[0], nvis == 0, source, len, check_key) == 0;
    cached = keyed ? fmx__check_cached(check_key) : NULL;
    int check = cfg.compile_check && !cached;
    if (nvis)
        rc = fmx__run_job(pack, source, len, filename, &cfg, mod, vis, nvis, 0, check, &vres, err,
                          sizeof err);
    for (int i = 0; rc == FMX_OK && i < nhid; i++)
        rc = fmx__run_job(pack, source, len, filename, &cfg, mod, &hid[i], 1, 1,
                          check && nvis == 0 && i == 0, &hres[i], err, sizeof err);
    if (rc != FMX_OK) {
        fmx__error(report, "evaluator", err);
        err_status = rc;
        goto done;
    }
    /* Errors of the whole file (it does not load, no entry) come from the
     * first process that ran. */
    fmx_eval_result *first = nvis ? vres : hres[0];
    const cJSON *fh = fmx_eval_result_header(first);
    if (fh) {
        double load_ms = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(fh, "load_ms"));
        if (load_ms == load_ms) cJSON_AddNumberToObject(report, "load_ms", load_ms);
        const cJSON *e = cJSON_GetObjectItemCaseSensitive(fh, "error");
        if (e) {
            const char *stage = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "stage"));
            const char *msg = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "message"));
            int entry = stage && strcmp(stage, "entry") == 0;
            fmx__error(report, entry ? "entry" : "compile", msg ? msg : "the file does not load");
            fmx__verdict(pack, first, nvis == 0, report, &cached, keyed ? check_key : NULL);
            err_status = entry ? FMX_ENOTFOUND : FMX_ECOMPILE;
            goto done;
        }
    }
    fmx__verdict(pack, first, nvis == 0, report, &cached, keyed ? check_key : NULL);

    cJSON *results = cJSON_AddArrayToObject(report, "probes");
    const char *first_div = NULL;
    const fmx_probe *first_div_probe = NULL;
    for (int c = 0, iv = 0, ih = 0; c < ncalls; c++) {
        int in_vis = iv < nvis && vis[iv] == c, in_hid = ih < nhid && hid[ih] == c;
        if (!in_vis && !in_hid) continue;
        const fmx_call *call = fmx_pack_call(pack, c);
        const fmx_probe *probe = fmx_pack_probe(pack, call->probe);
        cJSON *r = cJSON_CreateObject();
        cJSON_AddItemToArray(results, r);
        cJSON_AddStringToObject(r, "probe", probe->name);
        cJSON_AddBoolToObject(r, "visible", probe->visible);
        cJSON_AddNumberToObject(r, "call", call->index);
        char shape[64];
        snprintf(shape, sizeof shape, "%dx%d %s", probe->batch, probe->seq, probe->padding);
        cJSON_AddStringToObject(r, "shape", shape);
        cJSON_AddStringToObject(r, "dtype", fmx_dtype_name(probe->dtype));
        char words[256]; /* what the probe is, for people: image inputs, a bf16 copy */
        cJSON_AddStringToObject(r, "describe",
                                fmx_pack_probe_describe(pack, call->probe, words, sizeof words));
        if (probe->generation) {
            cJSON_AddStringToObject(r, "generation", probe->generation);
            cJSON_AddNumberToObject(r, "step", probe->step);
        }
        graded++;
        const char *div = NULL;
        int ok = in_vis ? fmx__grade_call(pack, &cfg, mod, call, vres, iv++, r, report, &err_status,
                                          &div)
                        : fmx__grade_call(pack, &cfg, mod, call, hres[ih++], 0, r, report,
                                          &err_status, &div);
        if (ok) {
            passed++;
        } else if (cJSON_GetObjectItemCaseSensitive(r, "first_divergence")) {
            status = FMX_EMISMATCH;
            if (!first_div) {
                first_div = div;
                first_div_probe = probe;
            }
        }
    }
    cJSON_AddNumberToObject(report, "graded", graded);
    cJSON_AddNumberToObject(report, "passed", passed);
    if (!err_status && status == FMX_EMISMATCH) {
        cJSON_ReplaceItemInObjectCaseSensitive(report, "status", cJSON_CreateString("mismatch"));
        cJSON *d = cJSON_AddObjectToObject(report, "first_divergence");
        cJSON_AddStringToObject(d, "name", first_div);
        cJSON_AddStringToObject(d, "probe", first_div_probe->name);
        if (first_div_probe->generation) { /* a decode task: which step of which generation */
            cJSON_AddStringToObject(d, "generation", first_div_probe->generation);
            cJSON_AddNumberToObject(d, "step", first_div_probe->step);
        }
        int dm = fmx__tap_module(pack, cfg.component, first_div);
        if (dm >= 0) cJSON_AddStringToObject(d, "class", fmx_pack_module(pack, dm)->cls);
    }
done:
    cJSON_Delete(cached);
    fmx_eval_result_destroy(vres);
    for (int i = 0; i < nhid; i++)
        fmx_eval_result_destroy(hres[i]);
    free(vis);
    free(hid);
    free(hres);
    return err_status ? err_status : status;
}

/* ---- text report ---- */

static const char *fmx__s(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) ? v->valuestring : "";
}

static double fmx__n(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

static int fmx__b(const cJSON *o, const char *k) {
    return cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, k));
}

static void fmx__shape_text(const cJSON *arr, char *buf, size_t n) {
    size_t used = (size_t)snprintf(buf, n, "(");
    const cJSON *d;
    int i = 0;
    cJSON_ArrayForEach(d, arr) {
        used += (size_t)snprintf(buf + used, n - used, "%s%lld", i++ ? ", " : "",
                                 (long long)d->valuedouble);
        if (used >= n) return;
    }
    snprintf(buf + used, n - used, ")");
}

/* One line per graded tensor: name, max abs, max rel, verdict. */
static void fmx__print_result(FILE *out, const cJSON *o, const char *indent, int color) {
    const char *ok = color ? "\033[32mok\033[0m" : "ok";
    const char *bad = color ? "\033[31mFAIL\033[0m" : "FAIL";
    const char *name = fmx__s(o, "name");
    if (cJSON_GetObjectItem(o, "note")) {
        fprintf(out, "%s%-28s %s\n", indent, name, fmx__s(o, "note"));
        return;
    }
    if (cJSON_GetObjectItem(o, "error")) {
        fprintf(out, "%s%-28s %s: %s\n", indent, name, bad, fmx__s(o, "error"));
        return;
    }
    char ws[128], gs[128];
    fmx__shape_text(cJSON_GetObjectItem(o, "want_shape"), ws, sizeof ws);
    fmx__shape_text(cJSON_GetObjectItem(o, "got_shape"), gs, sizeof gs);
    if (!fmx__b(o, "shape_ok")) {
        fprintf(out, "%s%-28s %s: shape %s, expected %s\n", indent, name, bad, gs, ws);
        return;
    }
    if (!fmx__b(o, "dtype_ok")) {
        fprintf(out, "%s%-28s %s: dtype %s, expected %s\n", indent, name, bad,
                fmx__s(o, "got_dtype"), fmx__s(o, "want_dtype"));
        return;
    }
    fprintf(out, "%s%-28s max abs %.2e  max rel %.2e  (rms %.2e)  %s", indent, name,
            fmx__n(o, "max_abs"), fmx__n(o, "max_rel"), fmx__n(o, "scale"),
            fmx__b(o, "pass") ? ok : bad);
    if (!fmx__b(o, "pass")) {
        fprintf(out, ": %.0f of %.0f elements outside tolerance", fmx__n(o, "bad"),
                fmx__n(o, "compared"));
        if (fmx__n(o, "nonfinite") > 0) fprintf(out, ", %.0f NaN/Inf", fmx__n(o, "nonfinite"));
        char wi[128];
        fmx__shape_text(cJSON_GetObjectItem(o, "worst_index"), wi, sizeof wi);
        const char *gt = fmx__s(o, "worst_got_text");
        if (gt[0])
            fprintf(out, "; worst at %s: got %s, want %.6g", wi, gt, fmx__n(o, "worst_want"));
        else
            fprintf(out, "; worst at %s: got %.6g, want %.6g", wi, fmx__n(o, "worst_got"),
                    fmx__n(o, "worst_want"));
    }
    fputc('\n', out);
}

/* " (generation g0, decode step 2)" or " (generation g0, prefill)" */
static void fmx__print_step(FILE *out, const char *generation, double step) {
    if (step > 0)
        fprintf(out, " (generation %s, decode step %.0f)", generation, step);
    else
        fprintf(out, " (generation %s, prefill)", generation);
}

void fmx_verify_print(FILE *out, const cJSON *report, int color) {
    const char *status = fmx__s(report, "status");
    const char *component = fmx__s(report, "component");
    const char *cls = fmx__s(report, "class");
    fprintf(out, "pack %s · %s%s%s%s · entry %s() · %s\n", fmx__s(report, "pack"),
            cJSON_GetObjectItem(report, "task") ? "decode task: whole model with its cache"
            : component[0]                      ? component
                                                : "whole model",
            cls[0] ? " (" : "", cls, cls[0] ? ")" : "", fmx__s(report, "entry"),
            fmx__s(report, "engine"));
    if (cJSON_GetObjectItem(report, "load_ms"))
        fprintf(out, "loaded in %.1f ms · %s tolerances\n", fmx__n(report, "load_ms"),
                fmx__s(report, "tolerance_table"));
    const cJSON *probes = cJSON_GetObjectItem(report, "probes");
    const cJSON *r;
    cJSON_ArrayForEach(r, probes) {
        const char *words = fmx__s(r, "describe");
        fprintf(out, "\nprobe %s%s (%s)", fmx__s(r, "probe"),
                fmx__b(r, "visible") ? "" : " [hidden]", words[0] ? words : fmx__s(r, "shape"));
        if (fmx__n(r, "call") > 0) fprintf(out, " call %.0f", fmx__n(r, "call"));
        if (cJSON_GetObjectItem(r, "step"))
            fmx__print_step(out, fmx__s(r, "generation"), fmx__n(r, "step"));
        if (cJSON_GetObjectItem(r, "ms")) fprintf(out, " · %.2f ms", fmx__n(r, "ms"));
        fputc('\n', out);
        const cJSON *o;
        cJSON_ArrayForEach(o, cJSON_GetObjectItem(r, "taps"))
            fmx__print_result(out, o, "  tap ", color);
        if (cJSON_GetObjectItem(r, "error") && !cJSON_GetObjectItem(report, "error"))
            fprintf(out, "  %s\n", fmx__s(r, "error"));
        cJSON_ArrayForEach(o, cJSON_GetObjectItem(r, "outputs"))
            fmx__print_result(out, o, "  out ", color);
        if (cJSON_GetObjectItem(r, "taps_note")) fprintf(out, "  %s\n", fmx__s(r, "taps_note"));
    }
    fputc('\n', out);
    /* TorchScript's view (the compile score), after the grade it does not change */
    const cJSON *cc = cJSON_GetObjectItem(report, "compile_check");
    if (cc) {
        if (!fmx__b(cc, "compiled") || !fmx__b(cc, "ran") || !fmx__b(cc, "same_meaning"))
            fprintf(out, "compile check: TorchScript %s: %s\n",
                    !fmx__b(cc, "compiled") ? "does not compile it"
                    : !fmx__b(cc, "ran")    ? "compiles it but cannot run it"
                                            : "compiles it with another meaning",
                    fmx__s(cc, "error"));
        else
            fprintf(out,
                    "compile check: TorchScript compiles it · host syncs %.0f · data-dependent "
                    "flow %.0f · %s\n",
                    fmx__n(cc, "host_syncs"), fmx__n(cc, "data_dependent_flow"),
                    fmx__b(cc, "survives_optimization") ? "survives optimization"
                                                        : "differs when optimized");
        if (fmx__s(cc, "first_problem")[0]) fprintf(out, "  %s\n", fmx__s(cc, "first_problem"));
    }
    if (strcmp(status, "match") == 0) {
        fprintf(out, "%sMATCH%s: %.0f/%.0f %s probe calls, every output within tolerance\n",
                color ? "\033[1;32m" : "", color ? "\033[0m" : "", fmx__n(report, "passed"),
                fmx__n(report, "graded"), fmx__s(report, "probes_graded"));
    } else if (strcmp(status, "mismatch") == 0) {
        const cJSON *d = cJSON_GetObjectItem(report, "first_divergence");
        fprintf(out, "%sMISMATCH%s: %.0f/%.0f probe calls pass; first divergence at %s",
                color ? "\033[1;31m" : "", color ? "\033[0m" : "", fmx__n(report, "passed"),
                fmx__n(report, "graded"), fmx__s(d, "name"));
        if (cJSON_GetObjectItem(d, "class")) fprintf(out, " (%s)", fmx__s(d, "class"));
        fprintf(out, " on probe %s", fmx__s(d, "probe"));
        if (cJSON_GetObjectItem(d, "step"))
            fmx__print_step(out, fmx__s(d, "generation"), fmx__n(d, "step"));
        fputc('\n', out);
    } else {
        const cJSON *e = cJSON_GetObjectItem(report, "error");
        fprintf(out, "%sERROR%s (%s): %s\n", color ? "\033[1;31m" : "", color ? "\033[0m" : "",
                fmx__s(e, "stage"), fmx__s(e, "message"));
    }
}
