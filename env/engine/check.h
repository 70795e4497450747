/*
 * check.h — the compile-compatibility check in one call (check.c), for the
 * evaluation process, which calls it through ctypes: the structs below are
 * mirrored in python/fmx/evaluate.py (CheckInput, CheckReport) and must
 * change together.
 */
#ifndef FMX_CHECK_H
#define FMX_CHECK_H

#include <stddef.h>
#include <stdint.h>

#include "engine.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
    FMX_CHECK_TENSOR,
    FMX_CHECK_NONE,
    FMX_CHECK_INT,
    FMX_CHECK_FLOAT,
    FMX_CHECK_BOOL,
    FMX_CHECK_STR
};

/* One input of the call (or one weight): borrowed pointers. */
typedef struct {
    const char *name;
    int kind;   /* FMX_CHECK_* */
    void *data; /* tensor: contiguous cpu memory */
    int dtype;  /* tensor: fmx_dtype */
    int ndim;
    int64_t shape[8];
    int64_t i;     /* int, bool */
    double f;      /* float */
    const char *s; /* str */
} fmx_check_input;

typedef struct {
    int compiled;    /* the candidate language (TorchScript) compiles the file */
    int entry_found; /* ... and it has the entry */
    int ran;         /* the call bound and ran (unoptimised) */
    int host_syncs;  /* fmx_program_facts */
    int data_dependent_flow;
    int first_line;
    int survives_optimization; /* fmx_program_check_optimized */
    int noutputs;
    char error[4096]; /* why it did not compile, bind or run */
    char first_problem[256];
    char why[512]; /* why the optimised re-run differs */
} fmx_check_report;

/* Compiles source, reads the entry's facts, runs it on the inputs and weights
 * (bound by parameter name as TorchScript typed them) and checks the
 * optimised re-run. Always fills rep; *run_out is the unoptimised run's
 * outputs when rep->ran (caller frees with fmx_run_destroy). Returns FMX_OK
 * (what went wrong is in rep). */
int fmx_check_candidate(const char *source, size_t len, const char *entry,
                        const fmx_check_input *in, int nin, const fmx_check_input *weights, int nw,
                        fmx_check_report *rep, fmx_run **run_out);

#ifdef __cplusplus
}
#endif

#endif
