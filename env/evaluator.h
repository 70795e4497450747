/*
 * evaluator.h — where candidate code runs: a warm Python process (the
 * zygote, python/fmx/evaluate.py) that forks a fresh, sandboxed child for
 * every evaluation. This side never runs candidate code: it writes the job
 * (the code, the inputs of the calls to run, which weights file to map) into
 * a sealed memfd, hands it and an empty sealed memfd for the results to the
 * zygote, waits for the child's fate and reads its outputs back. The child
 * holds the weights and the inputs of its calls — never a reference output
 * or another probe's data — and starts from fresh memory (DESIGN.md,
 * decision 8; docs/security.md).
 *
 * Threads: an evaluator is used from one thread at a time; the shared one
 * (fmx_evaluator_shared) serialises its evaluations itself.
 *
 * Not here: which calls go in which job and how outputs are graded
 * (env/verify.c); the child's side (evaluate.py).
 */
#ifndef FMX_EVALUATOR_H
#define FMX_EVALUATOR_H

#include <stddef.h>

#include "engine/engine.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cJSON cJSON;

typedef struct {
    int threads;        /* intra-op threads of a child; 1 */
    long mem_mb;        /* MiB a child may allocate past its start (RLIMIT_AS); 4096; 0 none */
    double cpu_s;       /* CPU seconds of a child (RLIMIT_CPU); 0 = timeout_s·threads + 1 */
    double timeout_s;   /* wall clock of a child; 0 = none */
    const char *device; /* "cpu" or "cuda[:N]" */
} fmx_evaluator_config;

fmx_evaluator_config fmx_evaluator_config_default(void);

typedef struct fmx_evaluator fmx_evaluator;

/* Starts the zygote (PYTHON -m fmx.evaluate, fmx_python_interpreter) and
 * waits until it is warm. Caller closes with fmx_evaluator_close. */
int fmx_evaluator_open(const fmx_evaluator_config *cfg, fmx_evaluator **out, char *err,
                       size_t errsz);
void fmx_evaluator_close(fmx_evaluator *ev); /* kills the zygote; accepts NULL */

/* The process's evaluator, which fmx_verify uses: opened on first use with
 * the configuration last given to fmx_evaluator_configure (defaults
 * otherwise). Borrowed; NULL with err set when it cannot start. */
void fmx_evaluator_configure(const fmx_evaluator_config *cfg);
fmx_evaluator *fmx_evaluator_shared(char *err, size_t errsz);
/* Whether the shared evaluator can still serve (its zygote lives, or none
 * was started yet). A sandboxed worker whose zygote died cannot start one. */
int fmx_evaluator_shared_ok(void);
/* The shared evaluator's socket to its zygote (-1: none); closes it and
 * kills the zygote. */
int fmx_evaluator_shared_fd(void);
void fmx_evaluator_shutdown(void);
/* Evaluations of the shared evaluator that start from now on end by this
 * CLOCK_MONOTONIC time (seconds; 0: no deadline but timeout_s). */
void fmx_evaluator_set_deadline(double mono_s);
double fmx_evaluator_now(void); /* CLOCK_MONOTONIC seconds */

/* ---- jobs ---- */

typedef struct fmx_eval_job fmx_eval_job;

fmx_eval_job *fmx_eval_job_create(void);      /* NULL: out of memory */
void fmx_eval_job_destroy(fmx_eval_job *job); /* accepts NULL */
/* The job's JSON header (python/fmx/evaluate.py lists its fields); borrowed:
 * the caller adds fields. "tensors" is managed by fmx_eval_job_tensor. */
cJSON *fmx_eval_job_header(fmx_eval_job *job);
/* Copies t's bytes into the job; returns its index in "tensors" or a
 * negative status. */
int fmx_eval_job_tensor(fmx_eval_job *job, const fmx_tensor *t);

/* ---- results ---- */

typedef enum { FMX_EVAL_OK, FMX_EVAL_TIMEOUT, FMX_EVAL_OOM, FMX_EVAL_CRASHED } fmx_eval_fate;

typedef struct fmx_eval_result fmx_eval_result;

/* Runs the job in a fresh child. FMX_OK with *out set whenever the zygote
 * answered (the child's fate is in the result); a negative status when no
 * child could be run (err says why). Caller frees with
 * fmx_eval_result_destroy. */
int fmx_evaluator_run(fmx_evaluator *ev, fmx_eval_job *job, fmx_eval_result **out, char *err,
                      size_t errsz);

fmx_eval_fate fmx_eval_result_fate(const fmx_eval_result *r);
const char *fmx_eval_fate_name(fmx_eval_fate f); /* "ok", "timeout", "oom", "crashed" */
/* On a failed fate: what happened ("killed at the 5 s deadline"). Borrowed. */
const char *fmx_eval_result_why(const fmx_eval_result *r);
double fmx_eval_result_ms(const fmx_eval_result *r); /* fork to exit, wall clock */
/* The child's results header (FMX_EVAL_OK only; else NULL). Borrowed. */
const cJSON *fmx_eval_result_header(const fmx_eval_result *r);
/* A tensor of the results ({"dtype", "shape", "offset", "nbytes"}, checked
 * against the results' bounds), wrapping the mapped bytes without a copy.
 * Caller destroys it (fmx_tensor_destroy) before the result. */
int fmx_eval_result_tensor(fmx_eval_result *r, const cJSON *blob, fmx_tensor **out, char *err,
                           size_t errsz);
void fmx_eval_result_destroy(fmx_eval_result *r); /* accepts NULL */

/* The first failed fate (timeout, oom, crashed) of the shared evaluator's
 * evaluations since the last call, with its reason; FMX_EVAL_OK if none.
 * The worker turns it into the step's fate. why may be NULL. */
fmx_eval_fate fmx_evaluator_take_fate(char *why, size_t n);

/* torch dtype name ("float32") -> fmx_dtype; -1 if unknown. */
int fmx_eval_dtype_parse(const char *name);

#ifdef __cplusplus
}
#endif

#endif
