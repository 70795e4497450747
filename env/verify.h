/*
 * verify.h — runs a compiled candidate against a pack's captured module calls
 * and grades every output on every probe (the engine of `fmx verify`, and of
 * the verify_component and submit tools). The result is a report: a cJSON
 * tree that prints as text for people and as JSON for machines.
 *
 * Not here: compiling (env/engine), reading packs (env/pack.c), rewards.
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
} fmx_verify_config;

fmx_verify_config fmx_verify_config_default(void);

/* Verifies program against pack. Always sets *report (caller frees with
 * cJSON_Delete) unless out of memory. Returns FMX_OK when every graded output
 * of every probe matches, FMX_EMISMATCH when some output differs, or a
 * negative error status (bad component or entry, arguments that cannot be
 * bound, a run-time error in the candidate); the report says which. */
int fmx_verify(fmx_pack *pack, fmx_program *program, const fmx_verify_config *cfg, cJSON **report);

/* Compiles candidate source. On success *program is set (caller frees with
 * fmx_program_destroy) and *report is NULL; on failure *program is NULL and
 * *report is the error report fmx_verify_source gives (stage "compile"). */
int fmx_verify_compile(fmx_pack *pack, const char *source, size_t len, const char *filename,
                       const fmx_verify_config *cfg, fmx_program **program, cJSON **report);

/* Compiles the candidate source and verifies it; a compile error is reported
 * like any other error (report "status": "error", stage "compile"). */
int fmx_verify_source(fmx_pack *pack, const char *source, size_t len, const char *filename,
                      const fmx_verify_config *cfg, cJSON **report);

/* Whether program's entry survives graph optimisation on this pack: binds the
 * component's first call on a visible probe (on any probe when none and
 * cfg->all_probes), runs it once unoptimised, then optimised
 * (fmx_program_check_optimized: same outputs within 1e-5·RMS). FMX_OK with
 * *same set (and the reason in err when 0); a negative status (and *same =
 * 0) when it cannot tell: no such component or entry, no call to run,
 * arguments that do not bind, or an error in the unoptimised run. */
int fmx_verify_optimized(fmx_pack *pack, fmx_program *program, const fmx_verify_config *cfg,
                         int *same, char *err, size_t errsz);

/* Prints a report for people. color: 1 to use ANSI colors. */
void fmx_verify_print(FILE *out, const cJSON *report, int color);

#ifdef __cplusplus
}
#endif

#endif
