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
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "status.h"

#define FMX__MAX_PARAMS 64
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

/* Comma-separated list of a call's input names, for error messages. */
static void fmx__input_names(const fmx_call *call, char *buf, size_t n) {
    buf[0] = '\0';
    size_t used = 0;
    for (int i = 0; i < call->ninputs && used < n; i++)
        used += (size_t)snprintf(buf + used, n - used, "%s%s", i ? ", " : "", call->inputs[i].name);
}

static const char *fmx__kind_name(fmx_param_kind k) {
    static const char *names[] = {
        "Tensor", "Optional[Tensor]", "Dict[str, Tensor]", "int", "float", "bool",
        "str",    "another type"};
    return names[k];
}

/* Binds the call's captured inputs to the entry's parameters. */
static int fmx__bind(fmx_pack *pack, const fmx_param *params, int np, const fmx_call *call,
                     const char *entry, const char *component, const char *const *wkeys,
                     const fmx_tensor *const *wvals, int nw, fmx_args *args, char *err,
                     size_t errsz) {
    const fmx_module *mod = fmx_pack_module(pack, call->module);
    fmx_args_clear(args);
    for (int i = 0; i < np; i++) {
        const fmx_param *pr = &params[i];
        if (pr->kind == FMX_PARAM_WEIGHTS) {
            fmx_args_weights(args, pr->name, wkeys, wvals, nw);
            continue;
        }
        const fmx_io *in = NULL;
        for (int k = 0; k < call->ninputs; k++)
            if (strcmp(call->inputs[k].name, pr->name) == 0) in = &call->inputs[k];
        if (!in) {
            if (pr->has_default) continue;
            char names[1024];
            fmx__input_names(call, names, sizeof names);
            snprintf(err, errsz,
                     "parameter '%s' of %s() is not an input of %s ('%s'); its inputs are: %s; "
                     "weights come in a Dict[str, Tensor] parameter",
                     pr->name, entry, mod->cls, component, names);
            return FMX_EINVAL;
        }
        int ok = 1;
        switch (in->kind) {
        case FMX_IO_TENSOR:
            ok = pr->kind == FMX_PARAM_TENSOR || pr->kind == FMX_PARAM_OPT_TENSOR;
            if (ok) fmx_args_tensor(args, pr->name, fmx_pack_capture(pack, in->key));
            break;
        case FMX_IO_NONE:
            ok = pr->kind == FMX_PARAM_OPT_TENSOR || pr->has_default;
            if (ok && pr->kind == FMX_PARAM_OPT_TENSOR) fmx_args_none(args, pr->name);
            break;
        case FMX_IO_VALUE:
            if (pr->kind == FMX_PARAM_INT && in->vtype == FMX_VAL_INT)
                fmx_args_int(args, pr->name, in->i);
            else if (pr->kind == FMX_PARAM_BOOL && in->vtype == FMX_VAL_BOOL)
                fmx_args_bool(args, pr->name, (int)in->i);
            else if (pr->kind == FMX_PARAM_FLOAT &&
                     (in->vtype == FMX_VAL_FLOAT || in->vtype == FMX_VAL_INT))
                fmx_args_float(args, pr->name, in->f);
            else if (pr->kind == FMX_PARAM_STR && in->vtype == FMX_VAL_STR)
                fmx_args_str(args, pr->name, in->s);
            else
                ok = 0;
            break;
        default:
            ok = pr->has_default;
            break;
        }
        if (!ok) {
            static const char *what[] = {"a tensor", "a value", "None", "a cache", "an object"};
            snprintf(err, errsz,
                     "parameter '%s' of %s() is declared %s, but input '%s' of %s is %s", pr->name,
                     entry, fmx__kind_name(pr->kind), in->name, mod->cls, what[in->kind]);
            return FMX_EINVAL;
        }
    }
    return FMX_OK;
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
    if (want_io->token_aligned && probe->mask_key) mask = fmx_pack_capture(pack, probe->mask_key);
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

/* Grades the taps of one run; returns the first failing tap's name or NULL. */
static const char *fmx__grade_taps(fmx_pack *pack, const fmx_verify_config *cfg, int probe_i,
                                   const fmx_run *run, cJSON *taps) {
    const fmx_probe *probe = fmx_pack_probe(pack, probe_i);
    int n = fmx_run_ntaps(run);
    int *seen_module = calloc((size_t)n + 1, sizeof(int));
    const char *first_bad = NULL;
    for (int i = 0; i < n; i++) {
        const char *name = fmx_run_tap_name(run, i);
        int m = fmx__tap_module(pack, cfg->component, name);
        seen_module[i] = m;
        int k = 0; /* occurrence of this module among earlier taps */
        for (int j = 0; j < i; j++)
            k += seen_module[j] == m;
        int c = m >= 0 ? fmx_pack_find_call(pack, probe_i, m, k) : -1;
        const fmx_call *call = fmx_pack_call(pack, c);
        const fmx_io *out0 = NULL;
        for (int j = 0; call && j < call->noutputs && !out0; j++)
            if (call->outputs[j].kind == FMX_IO_TENSOR) out0 = &call->outputs[j];
        if (!out0) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "name", name);
            cJSON_AddStringToObject(o, "note",
                                    m < 0 ? "no module has this path; not graded"
                                          : "module has no such call; not graded");
            cJSON_AddItemToArray(taps, o);
            continue;
        }
        int ok = fmx__grade(pack, cfg, probe, out0, fmx_run_tap(run, i), name, taps);
        cJSON *o = cJSON_GetArrayItem(taps, cJSON_GetArraySize(taps) - 1);
        cJSON_AddStringToObject(o, "module", fmx_pack_module(pack, m)->path);
        cJSON_AddStringToObject(o, "class", fmx_pack_module(pack, m)->cls);
        if (!ok && !first_bad) first_bad = name;
    }
    free(seen_module);
    return first_bad;
}

int fmx_verify(fmx_pack *pack, fmx_program *program, const fmx_verify_config *cfg_in,
               cJSON **report_out) {
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
    if (program) cJSON_AddNumberToObject(report, "compile_ms", fmx_program_compile_ms(program));

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

    fmx_param params[FMX__MAX_PARAMS];
    int np = fmx_program_params(program, cfg.entry, params, FMX__MAX_PARAMS);
    if (np < 0) {
        char names[1024] = "";
        size_t used = 0;
        for (int i = 0; i < fmx_program_nfunctions(program) && used < sizeof names; i++)
            used += (size_t)snprintf(names + used, sizeof names - used, "%s%s", i ? ", " : "",
                                     fmx_program_function(program, i));
        fmx__errorf(report, "entry", "the candidate has no function '%s'; it defines: %s",
                    cfg.entry, names[0] ? names : "(nothing)");
        return FMX_ENOTFOUND;
    }
    if (np > FMX__MAX_PARAMS) np = FMX__MAX_PARAMS;

    char err[FMX__ERR];

    fmx_args *args = fmx_args_create();
    cJSON *results = cJSON_AddArrayToObject(report, "probes");
    int status = FMX_OK, err_status = FMX_OK, graded = 0, passed = 0;
    const char *first_div = NULL;
    const char *first_div_probe = NULL;
    for (int c = 0; c < fmx_pack_ncalls(pack); c++) {
        const fmx_call *call = fmx_pack_call(pack, c);
        const fmx_probe *probe = fmx_pack_probe(pack, call->probe);
        if (call->module != m || call->raised || (!probe->visible && !cfg.all_probes)) continue;
        cJSON *r = cJSON_CreateObject();
        cJSON_AddItemToArray(results, r);
        cJSON_AddStringToObject(r, "probe", probe->name);
        cJSON_AddBoolToObject(r, "visible", probe->visible);
        cJSON_AddNumberToObject(r, "call", call->index);
        char shape[64];
        snprintf(shape, sizeof shape, "%dx%d %s", probe->batch, probe->seq, probe->padding);
        cJSON_AddStringToObject(r, "shape", shape);
        cJSON_AddStringToObject(r, "dtype", fmx_dtype_name(probe->dtype));
        graded++;

        /* A bind or run error fails this probe call; the others are still
         * graded (submit needs every probe's verdict), and the report's
         * status stays "error" with the first error in "error". */
        /* Weights in the probe's dtype (a bfloat16 probe of a float32 pack). */
        const char *const *wkeys = NULL;
        const fmx_tensor *const *wvals = NULL;
        int nw = fmx_pack_weights_as(pack, cfg.component, (int)probe->dtype, &wkeys, &wvals, err,
                                     sizeof err);
        if (nw < 0) {
            cJSON_AddBoolToObject(r, "pass", 0);
            fmx__error(report, "weights", err);
            err_status = nw;
            break;
        }
        int rc = fmx__bind(pack, params, np, call, cfg.entry, cfg.component, wkeys, wvals, nw, args,
                           err, sizeof err);
        if (rc) {
            cJSON_AddBoolToObject(r, "pass", 0);
            cJSON_AddStringToObject(r, "error", err);
            cJSON_AddStringToObject(r, "stage", "bind");
            fmx__error(report, "bind", err);
            if (!err_status) err_status = rc;
            continue;
        }
        fmx_run *run = NULL;
        rc = fmx_program_run(program, cfg.entry, args, &run, err, sizeof err);
        if (rc) {
            cJSON_AddBoolToObject(r, "pass", 0);
            cJSON_AddStringToObject(r, "error", err);
            cJSON_AddStringToObject(r, "stage", "run");
            fmx__error(report, "run", err);
            if (!err_status) err_status = rc;
            continue;
        }
        cJSON_AddNumberToObject(r, "ms", fmx_run_ms(run));

        /* Graded outputs: the call's tensor outputs, in order. */
        int nwant = 0;
        for (int j = 0; j < call->noutputs; j++)
            nwant += call->outputs[j].kind == FMX_IO_TENSOR;
        int ngot = fmx_run_noutputs(run);
        int ok = 1;
        cJSON *outs = cJSON_AddArrayToObject(r, "outputs");
        if (ngot != nwant) {
            char names[512] = "";
            size_t used = 0;
            for (int j = 0; j < call->noutputs; j++)
                if (call->outputs[j].kind == FMX_IO_TENSOR)
                    used += (size_t)snprintf(names + used, sizeof names - used, "%s%s",
                                             used ? ", " : "", call->outputs[j].name);
            char msg[1024];
            snprintf(msg, sizeof msg, "%s() returned %d output%s; %s returns %d (%s)", cfg.entry,
                     ngot, ngot == 1 ? "" : "s", mod->cls, nwant, names);
            cJSON_AddStringToObject(r, "error", msg);
            ok = 0;
        } else {
            for (int j = 0, k = 0; j < call->noutputs; j++) {
                if (call->outputs[j].kind != FMX_IO_TENSOR) continue;
                ok &= fmx__grade(pack, &cfg, probe, &call->outputs[j], fmx_run_output(run, k++),
                                 call->outputs[j].name, outs);
            }
        }
        cJSON *taps = cJSON_AddArrayToObject(r, "taps");
        const char *tap_bad = fmx__grade_taps(pack, &cfg, call->probe, run, taps);
        cJSON_AddBoolToObject(r, "pass", ok);
        if (!ok) {
            /* The first divergence is the first failing tap, else the output. */
            const char *div = tap_bad ? tap_bad : (mod->path[0] ? mod->path : "output");
            cJSON_AddStringToObject(r, "first_divergence", div);
            if (!first_div) {
                first_div = cJSON_GetObjectItem(r, "first_divergence")->valuestring;
                first_div_probe = probe->name;
            }
            status = FMX_EMISMATCH;
        } else {
            passed++;
        }
        fmx_run_destroy(run); /* tap names are borrowed from the run until here */
    }
    fmx_args_destroy(args);
    if (err_status) {
        cJSON_AddNumberToObject(report, "graded", graded);
        cJSON_AddNumberToObject(report, "passed", passed);
        return err_status;
    }
    if (graded == 0 && status == FMX_OK) {
        fmx__errorf(report, "probes",
                    "module '%s' was never called on the %s probes; nothing to grade",
                    cfg.component, cfg.all_probes ? "" : "visible");
        return FMX_ENOTFOUND;
    }
    cJSON_AddNumberToObject(report, "graded", graded);
    cJSON_AddNumberToObject(report, "passed", passed);
    if (status == FMX_EMISMATCH) {
        cJSON_ReplaceItemInObjectCaseSensitive(report, "status", cJSON_CreateString("mismatch"));
        cJSON *d = cJSON_AddObjectToObject(report, "first_divergence");
        cJSON_AddStringToObject(d, "name", first_div);
        cJSON_AddStringToObject(d, "probe", first_div_probe);
        int dm = fmx__tap_module(pack, cfg.component, first_div);
        if (dm >= 0) cJSON_AddStringToObject(d, "class", fmx_pack_module(pack, dm)->cls);
    }
    return status;
}

int fmx_verify_compile(fmx_pack *pack, const char *source, size_t len, const char *filename,
                       const fmx_verify_config *cfg, fmx_program **program, cJSON **report) {
    char err[FMX__ERR];
    *program = NULL;
    *report = NULL;
    int rc = fmx_program_compile(source, len, filename, program, err, sizeof err);
    if (rc == FMX_OK) return FMX_OK;
    cJSON *r = cJSON_CreateObject();
    *report = r;
    if (!r) return FMX_ENOMEM;
    cJSON_AddStringToObject(r, "status", "error");
    cJSON_AddStringToObject(r, "pack", fmx_pack_name(pack));
    cJSON_AddStringToObject(r, "component", cfg && cfg->component ? cfg->component : "");
    cJSON_AddStringToObject(r, "entry", cfg && cfg->entry ? cfg->entry : "forward");
    cJSON_AddStringToObject(r, "engine", fmx_engine_version());
    cJSON_AddStringToObject(r, "device", fmx_engine_device());
    fmx__error(r, "compile", err);
    return rc;
}

int fmx_verify_source(fmx_pack *pack, const char *source, size_t len, const char *filename,
                      const fmx_verify_config *cfg, cJSON **report) {
    fmx_program *prog = NULL;
    int rc = fmx_verify_compile(pack, source, len, filename, cfg, &prog, report);
    if (rc) return rc;
    rc = fmx_verify(pack, prog, cfg, report);
    fmx_program_destroy(prog);
    return rc;
}

int fmx_verify_optimized(fmx_pack *pack, fmx_program *program, const fmx_verify_config *cfg_in,
                         int *same, char *err, size_t errsz) {
    fmx_verify_config cfg = cfg_in ? *cfg_in : fmx_verify_config_default();
    if (!cfg.component) cfg.component = "";
    if (!cfg.entry) cfg.entry = "forward";
    *same = 0;
    if (errsz) err[0] = '\0';
    int m = fmx_pack_find_module(pack, cfg.component);
    if (m < 0) {
        snprintf(err, errsz, "no module at path '%s' in pack %s", cfg.component,
                 fmx_pack_name(pack));
        return FMX_ENOTFOUND;
    }
    fmx_param params[FMX__MAX_PARAMS];
    int np = fmx_program_params(program, cfg.entry, params, FMX__MAX_PARAMS);
    if (np < 0) {
        snprintf(err, errsz, "the candidate has no function '%s'", cfg.entry);
        return FMX_ENOTFOUND;
    }
    if (np > FMX__MAX_PARAMS) np = FMX__MAX_PARAMS;
    /* The first graded call: on a visible probe, else (all probes) any. */
    const fmx_call *call = NULL;
    for (int pass = 0; pass < (cfg.all_probes ? 2 : 1) && !call; pass++)
        for (int c = 0; c < fmx_pack_ncalls(pack) && !call; c++) {
            const fmx_call *k = fmx_pack_call(pack, c);
            if (k->module != m || k->raised) continue;
            if (pass == 0 && !fmx_pack_probe(pack, k->probe)->visible) continue;
            call = k;
        }
    if (!call) {
        snprintf(err, errsz, "module '%s' was never called on the %s probes", cfg.component,
                 cfg.all_probes ? "" : "visible");
        return FMX_ENOTFOUND;
    }
    const fmx_probe *probe = fmx_pack_probe(pack, call->probe);
    const char *const *wkeys = NULL;
    const fmx_tensor *const *wvals = NULL;
    int nw =
        fmx_pack_weights_as(pack, cfg.component, (int)probe->dtype, &wkeys, &wvals, err, errsz);
    if (nw < 0) return nw;
    fmx_args *args = fmx_args_create();
    if (!args) return FMX_ENOMEM;
    fmx_run *ref = NULL;
    int rc = fmx__bind(pack, params, np, call, cfg.entry, cfg.component, wkeys, wvals, nw, args,
                       err, errsz);
    if (!rc) rc = fmx_program_run(program, cfg.entry, args, &ref, err, errsz);
    if (!rc) rc = fmx_program_check_optimized(program, cfg.entry, args, ref, same, err, errsz);
    fmx_run_destroy(ref);
    fmx_args_destroy(args);
    return rc;
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

void fmx_verify_print(FILE *out, const cJSON *report, int color) {
    const char *status = fmx__s(report, "status");
    const char *component = fmx__s(report, "component");
    const char *cls = fmx__s(report, "class");
    fprintf(out, "pack %s · %s%s%s%s · entry %s() · %s\n", fmx__s(report, "pack"),
            component[0] ? component : "whole model", cls[0] ? " (" : "", cls, cls[0] ? ")" : "",
            fmx__s(report, "entry"), fmx__s(report, "engine"));
    if (cJSON_GetObjectItem(report, "compile_ms"))
        fprintf(out, "compiled in %.1f ms · %s tolerances\n", fmx__n(report, "compile_ms"),
                fmx__s(report, "tolerance_table"));
    const cJSON *probes = cJSON_GetObjectItem(report, "probes");
    const cJSON *r;
    cJSON_ArrayForEach(r, probes) {
        fprintf(out, "\nprobe %s%s (%s)%s", fmx__s(r, "probe"),
                fmx__b(r, "visible") ? "" : " [hidden]", fmx__s(r, "shape"),
                fmx__n(r, "call") > 0 ? "" : "");
        if (fmx__n(r, "call") > 0) fprintf(out, " call %.0f", fmx__n(r, "call"));
        if (cJSON_GetObjectItem(r, "ms")) fprintf(out, " · %.2f ms", fmx__n(r, "ms"));
        fputc('\n', out);
        const cJSON *o;
        cJSON_ArrayForEach(o, cJSON_GetObjectItem(r, "taps"))
            fmx__print_result(out, o, "  tap ", color);
        if (cJSON_GetObjectItem(r, "error") && !cJSON_GetObjectItem(report, "error"))
            fprintf(out, "  %s\n", fmx__s(r, "error"));
        cJSON_ArrayForEach(o, cJSON_GetObjectItem(r, "outputs"))
            fmx__print_result(out, o, "  out ", color);
    }
    fputc('\n', out);
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
        fprintf(out, " on probe %s\n", fmx__s(d, "probe"));
    } else {
        const cJSON *e = cJSON_GetObjectItem(report, "error");
        fprintf(out, "%sERROR%s (%s): %s\n", color ? "\033[1;31m" : "", color ? "\033[0m" : "",
                fmx__s(e, "stage"), fmx__s(e, "message"));
    }
}
