/*
 * check.c — the compile-compatibility check as one call, for the evaluation
 * process (python/fmx/evaluate.py loads the engine library and calls
 * fmx_check_candidate through ctypes). Correctness is graded on the file's
 * Python meaning; this says what TorchScript makes of the same file: whether
 * it compiles in fmx's candidate language, the graph's facts (host syncs,
 * data-dependent control flow), a run of the first call and whether an
 * optimised re-run computes the same. The run's outputs go back to the grader,
 * which compares them with the Python run's (a file that TorchScript compiles
 * with another meaning does not count as compiling).
 *
 * Not here: correctness (the Python run), tolerances for grading.
 */
#include "check.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "status.h"

#define FMX__CHECK_MAX_PARAMS 64

static const char *fmx__param_kind(fmx_param_kind k) {
    static const char *names[] = {
        "Tensor", "Optional[Tensor]", "Dict[str, Tensor]", "int", "float", "bool",
        "str",    "another type",     "List[Tensor]"};
    return names[k];
}

static const char *fmx__input_kind(int k) {
    static const char *names[] = {"a tensor", "None", "an int", "a float", "a bool", "a str"};
    return k >= 0 && k < 6 ? names[k] : "a value";
}

#define FMX__CHECK_MAX_LIST 1024

/* The tensor inputs NAME_0, NAME_1, ... in order (a flattened list); their count. */
static int fmx__listed(const char *name, const fmx_check_input *in, int nin, fmx_tensor **wrapped,
                       const fmx_tensor **out, int cap) {
    size_t len = strlen(name);
    int n = 0;
    for (int found = 1; found && n < cap;) {
        found = 0;
        for (int j = 0; j < nin && !found; j++) {
            char *end;
            if (in[j].kind != FMX_CHECK_TENSOR || strncmp(in[j].name, name, len) != 0 ||
                in[j].name[len] != '_' || in[j].name[len + 1] < '0' || in[j].name[len + 1] > '9' ||
                strtol(in[j].name + len + 1, &end, 10) != n || *end)
                continue;
            out[n++] = wrapped[j];
            found = 1;
        }
    }
    return n;
}

/* Binds the call's inputs to the entry's parameters as TorchScript typed them. */
static int fmx__check_bind(const fmx_param *params, int np, const fmx_check_input *in, int nin,
                           const char *const *wkeys, const fmx_tensor *const *wvals, int nw,
                           fmx_tensor **wrapped, fmx_args *args, char *err, size_t errsz) {
    for (int i = 0; i < np; i++) {
        const fmx_param *p = &params[i];
        if (p->kind == FMX_PARAM_WEIGHTS) {
            if (fmx_args_weights(args, p->name, wkeys, wvals, nw)) return FMX_ENOMEM;
            continue;
        }
        int k = -1;
        for (int j = 0; j < nin && k < 0; j++)
            if (strcmp(in[j].name, p->name) == 0) k = j;
        if (k < 0 && p->kind == FMX_PARAM_TENSOR_LIST) { /* inputs NAME_0, NAME_1, ... */
            const fmx_tensor *list[FMX__CHECK_MAX_LIST];
            int n = fmx__listed(p->name, in, nin, wrapped, list, FMX__CHECK_MAX_LIST);
            if (n > 0) {
                if (fmx_args_tensor_list(args, p->name, list, n)) return FMX_ENOMEM;
                continue;
            }
        }
        if (k < 0) {
            if (p->has_default) continue;
            snprintf(err, errsz, "TorchScript: parameter '%s' (%s) is no input of the module",
                     p->name, fmx__param_kind(p->kind));
            return FMX_EINVAL;
        }
        const fmx_check_input *x = &in[k];
        int ok = 1, rc = FMX_OK;
        switch (x->kind) {
        case FMX_CHECK_TENSOR:
            ok = p->kind == FMX_PARAM_TENSOR || p->kind == FMX_PARAM_OPT_TENSOR;
            if (ok) rc = fmx_args_tensor(args, p->name, wrapped[k]);
            break;
        case FMX_CHECK_NONE:
            ok = p->kind == FMX_PARAM_OPT_TENSOR || p->has_default;
            if (ok && p->kind == FMX_PARAM_OPT_TENSOR) rc = fmx_args_none(args, p->name);
            break;
        case FMX_CHECK_INT:
            if (p->kind == FMX_PARAM_INT)
                rc = fmx_args_int(args, p->name, x->i);
            else if (p->kind == FMX_PARAM_FLOAT)
                rc = fmx_args_float(args, p->name, (double)x->i);
            else
                ok = 0;
            break;
        case FMX_CHECK_FLOAT:
            ok = p->kind == FMX_PARAM_FLOAT;
            if (ok) rc = fmx_args_float(args, p->name, x->f);
            break;
        case FMX_CHECK_BOOL:
            ok = p->kind == FMX_PARAM_BOOL;
            if (ok) rc = fmx_args_bool(args, p->name, (int)x->i);
            break;
        case FMX_CHECK_STR:
            ok = p->kind == FMX_PARAM_STR;
            if (ok) rc = fmx_args_str(args, p->name, x->s ? x->s : "");
            break;
        default:
            ok = p->has_default;
        }
        if (rc) return rc;
        if (!ok) {
            snprintf(err, errsz,
                     "TorchScript types parameter '%s' as %s%s, but the module passes %s: "
                     "annotate it (e.g. '%s: %s')",
                     p->name, fmx__param_kind(p->kind),
                     p->kind == FMX_PARAM_TENSOR ? " (unannotated parameters are Tensors)" : "",
                     fmx__input_kind(x->kind), p->name,
                     x->kind == FMX_CHECK_FLOAT  ? "float"
                     : x->kind == FMX_CHECK_INT  ? "int"
                     : x->kind == FMX_CHECK_BOOL ? "bool"
                     : x->kind == FMX_CHECK_STR  ? "str"
                                                 : "Optional[Tensor]");
            return FMX_EINVAL;
        }
    }
    return FMX_OK;
}

int fmx_check_candidate(const char *source, size_t len, const char *entry,
                        const fmx_check_input *in, int nin, const fmx_check_input *weights, int nw,
                        fmx_check_report *rep, fmx_run **run_out) {
    memset(rep, 0, sizeof *rep);
    *run_out = NULL;
    fmx_program *prog = NULL;
    if (fmx_program_compile(source, len, "candidate.py", &prog, rep->error, sizeof rep->error))
        return FMX_OK;
    rep->compiled = 1;
    fmx_param params[FMX__CHECK_MAX_PARAMS];
    int np = fmx_program_params(prog, entry, params, FMX__CHECK_MAX_PARAMS);
    if (np < 0) {
        snprintf(rep->error, sizeof rep->error, "TorchScript: no function '%s'", entry);
        fmx_program_destroy(prog);
        return FMX_OK;
    }
    if (np > FMX__CHECK_MAX_PARAMS) np = FMX__CHECK_MAX_PARAMS;
    rep->entry_found = 1;
    fmx_program_facts pf = {0};
    char ferr[256] = "";
    if (fmx_program_facts_get(prog, entry, &pf, ferr, sizeof ferr) == FMX_OK) {
        rep->host_syncs = pf.host_syncs;
        rep->data_dependent_flow = pf.data_dependent_flow;
        rep->first_line = pf.first_line;
        snprintf(rep->first_problem, sizeof rep->first_problem, "%s", pf.first_problem);
    }
    /* wrap the inputs and weights (borrowed memory: the caller's tensors) */
    int nt = nin + nw;
    fmx_tensor *wrapped[nt > 0 ? nt : 1];
    memset(wrapped, 0, sizeof wrapped);
    const char *wkeys[nw > 0 ? nw : 1];
    const fmx_tensor *wvals[nw > 0 ? nw : 1];
    int rc = FMX_OK;
    for (int i = 0; i < nt && rc == FMX_OK; i++) {
        const fmx_check_input *x = i < nin ? &in[i] : &weights[i - nin];
        if (x->kind != FMX_CHECK_TENSOR) continue;
        rc = fmx_tensor_wrap(x->data, (fmx_dtype)x->dtype, x->shape, x->ndim, &wrapped[i],
                             rep->error, sizeof rep->error);
    }
    for (int i = 0; i < nw; i++) {
        wkeys[i] = weights[i].name;
        wvals[i] = wrapped[nin + i];
    }
    fmx_args *args = fmx_args_create();
    fmx_run *run = NULL;
    if (rc == FMX_OK && !args) rc = FMX_ENOMEM;
    if (rc == FMX_OK)
        rc = fmx__check_bind(params, np, in, nin, wkeys, wvals, nw, wrapped, args, rep->error,
                             sizeof rep->error);
    if (rc == FMX_OK) rc = fmx_program_run(prog, entry, args, &run, rep->error, sizeof rep->error);
    if (rc == FMX_OK) {
        rep->ran = 1;
        rep->noutputs = fmx_run_noutputs(run);
        int same = 0;
        fmx_program_check_optimized(prog, entry, args, run, &same, rep->why, sizeof rep->why);
        rep->survives_optimization = same;
        *run_out = run;
    }
    fmx_args_destroy(args);
    for (int i = 0; i < nt; i++)
        fmx_tensor_destroy(wrapped[i]);
    fmx_program_destroy(prog);
    return FMX_OK;
}
