/*
 * verify.h — grades a candidate file against a pack's captured module calls
 * (the engine of `fmx verify`, and of the verify_component and submit tools).
 * The candidate runs as real Python in fresh, sandboxed evaluation processes
 * (env/evaluator.c): the visible probes' calls together, each hidden probe's
 * call alone under the pack's hidden weight set; this process, which never
 * runs candidate code, compares every output and tap with the references.
 * The result is a report: a cJSON tree that prints as text for people and as
 * JSON for machines.
 *
 * Not here: running candidate code (python/fmx/evaluate.py), reading packs
 * (env/pack.c), rewards.
 */
#ifndef FMX_VERIFY_H
#define FMX_VERIFY_H

#include <stdio.h>

#include "pack.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char *component; /* module path; "" = the whole model */
    const char *entry;     /* function to call; NULL = "forward" */
    int all_probes;        /* 0: visible probes only; 1: hidden too */
    int override_tol;      /* 1: use tol below for every float output */
    fmx_tolerance tol;
    int compile_check; /* 1: also TorchScript's compile check (report "compile_check") */
    int check_again;   /* 1: run the check even if this process has the file's verdict
                          (benchmarks); 0 (default): reuse it */
    int decode;        /* 1: the decode task: the root's calls on the generation steps, in the cache
                          convention (docs/pack-format.md); 0: every other probe */
} fmx_verify_config;

/* tap() values recorded per call; later ones are counted, not graded. */
#define FMX_VERIFY_MAX_TAPS 1024

fmx_verify_config fmx_verify_config_default(void);

/* Runs the candidate source on the component's calls and grades every
 * output. Always sets *report (caller frees with cJSON_Delete) unless out of
 * memory. Returns FMX_OK when every graded output of every probe matches,
 * FMX_EMISMATCH when some output differs, or a negative error status: the
 * file does not load (FMX_ECOMPILE: a syntax error, an import outside the
 * allowlist, an error while loading), no such entry or component
 * (FMX_ENOTFOUND), arguments that cannot be bound (FMX_EINVAL), a run-time
 * error, time-out, out-of-memory or crash of the candidate (FMX_ERUNTIME),
 * no evaluation process (FMX_EIO); the report says which. With
 * cfg->compile_check the report also has "compile_check": what TorchScript
 * makes of the file on the first graded call (compiled, ran, same_meaning,
 * host_syncs, data_dependent_flow, survives_optimization, error). */
int fmx_verify_source(fmx_pack *pack, const char *source, size_t len, const char *filename,
                      const fmx_verify_config *cfg, cJSON **report);

/* Prints a report for people. color: 1 to use ANSI colors. */
void fmx_verify_print(FILE *out, const cJSON *report, int color);

#ifdef __cplusplus
}
#endif

#endif
