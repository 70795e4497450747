/*
 * engine.h — the libtorch bridge: the only interface between fmx's C core and
 * libtorch. It compiles candidate source (the fmx candidate language, a subset
 * of Python that TorchScript's C++ frontend compiles), runs a compiled function
 * with named arguments, records tap() outputs, and compares tensors.
 *
 * It is not: a pack reader (env/pack.c), a report printer (env/verify.c), or a
 * place for policy about which outputs to grade. Everything here is plain C;
 * the implementation (engine.cpp) catches every C++ exception and returns a
 * status with a message: nothing ever throws across this header.
 *
 * Errors: functions return 0 on success or a negative FMX_E… code
 * (env/status.h, FMX_OK = 0); the message goes to the caller's buffer (err, errsz).
 */
#ifndef FMX_ENGINE_H
#define FMX_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fmx_tensor fmx_tensor;   /* one tensor (owns a libtorch reference) */
typedef struct fmx_program fmx_program; /* one compiled candidate file */
typedef struct fmx_args fmx_args;       /* named arguments for one call */
typedef struct fmx_run fmx_run;         /* outputs and taps of one call */

/* Element types, as named in safetensors headers. */
typedef enum {
    FMX_DT_F64,
    FMX_DT_F32,
    FMX_DT_F16,
    FMX_DT_BF16,
    FMX_DT_I64,
    FMX_DT_I32,
    FMX_DT_I16,
    FMX_DT_I8,
    FMX_DT_U8,
    FMX_DT_BOOL,
    FMX_DT_COUNT
} fmx_dtype;

#define FMX_MAX_DIMS 8

/* "F32" → FMX_DT_F32 (safetensors names); -1 if unknown. */
int fmx_dtype_parse(const char *name);
/* FMX_DT_F32 → "float32" (torch names). Static string. */
const char *fmx_dtype_name(fmx_dtype dt);
size_t fmx_dtype_size(fmx_dtype dt);

/* Library build and device, e.g. "libtorch 1.13.0 cpu". Static string. */
const char *fmx_engine_version(void);
/* Selects the device runs use: "cpu", "cuda", "cuda:N". Default "cpu". */
int fmx_engine_set_device(const char *device, char *err, size_t errsz);
/* Current device name. Static string, valid until the next set_device. */
const char *fmx_engine_device(void);
/* libtorch's intra-op threads of this process (at::set_num_threads). */
void fmx_engine_set_threads(int n);

/* ---- tensors ---- */

/* Wraps caller memory without copying (on cpu). The memory is borrowed: it
 * must stay valid until fmx_tensor_destroy. On a cuda device the data is
 * copied to the device once, here. Caller frees with fmx_tensor_destroy. */
int fmx_tensor_wrap(void *data, fmx_dtype dt, const int64_t *shape, int ndim, fmx_tensor **out,
                    char *err, size_t errsz);
/* A new reference to the same tensor cast to dt (a copy when dt differs). */
int fmx_tensor_cast(const fmx_tensor *t, fmx_dtype dt, fmx_tensor **out, char *err, size_t errsz);
void fmx_tensor_destroy(fmx_tensor *t); /* accepts NULL */
/* Shape and type. shape must hold FMX_MAX_DIMS; returns ndim, or -1 for an
 * unsupported dtype or more than FMX_MAX_DIMS dimensions (shape and dt then
 * untouched). */
int fmx_tensor_shape(const fmx_tensor *t, int64_t *shape, fmx_dtype *dt);
/* Copies the tensor (any device) into a contiguous cpu buffer of the same
 * dtype; buf must hold numel·elemsize bytes. */
int fmx_tensor_read(const fmx_tensor *t, void *buf, size_t bufsz, char *err, size_t errsz);

/* ---- programs (the candidate language) ---- */

/* Compiles a candidate file: reads it through fmx's one model of Python
 * source (pysource.h: the LOC counter's), checks and strips imports,
 * resolves top-level constants, drops a top-level `def tap` (fmx supplies
 * tap) and `if __name__ == "__main__":` block, refuses a line holding only a
 * backslash continuation (CPython and TorchScript can indent what follows
 * differently), compiles with the F prelude, then walks every node of every
 * function against the op allowlist. On failure err holds "FILE:LINE:COL: message" naming the
 * candidate's own line, followed by the offending source line. filename is
 * used in messages only. Caller frees with fmx_program_destroy. */
int fmx_program_compile(const char *source, size_t len, const char *filename, fmx_program **out,
                        char *err, size_t errsz);
void fmx_program_destroy(fmx_program *p); /* accepts NULL */

/* Milliseconds the last compile took (parse + compile + op walk). */
double fmx_program_compile_ms(const fmx_program *p);

/* Number of top-level functions and their names (borrowed, valid until
 * fmx_program_destroy), in source order. */
int fmx_program_nfunctions(const fmx_program *p);
const char *fmx_program_function(const fmx_program *p, int i);

/* Parameter kinds of a function's schema. */
typedef enum {
    FMX_PARAM_TENSOR,
    FMX_PARAM_OPT_TENSOR, /* Optional[Tensor] */
    FMX_PARAM_WEIGHTS,    /* Dict[str, Tensor] */
    FMX_PARAM_INT,
    FMX_PARAM_FLOAT,
    FMX_PARAM_BOOL,
    FMX_PARAM_STR,
    FMX_PARAM_OTHER,
    FMX_PARAM_TENSOR_LIST /* List[Tensor] (a decode step's per-layer cache) */
} fmx_param_kind;

typedef struct {
    const char *name; /* borrowed, valid until fmx_program_destroy */
    fmx_param_kind kind;
    int has_default;
} fmx_param;

/* Parameters of function fn: fills up to cap entries, returns the count, or
 * FMX_ENOTFOUND when fn does not exist. */
int fmx_program_params(const fmx_program *p, const char *fn, fmx_param *out, int cap);

/* ---- compile facts ---- */

/* What the graph of a function says about compiling it further (torch.compile,
 * CUDA graphs, export): code that never leaves the device and whose control
 * flow depends only on shapes, ints and constants. */
typedef struct {
    /* Ops that read tensor values on the host, counted once per place in
     * the candidate's code (one in a loop or a helper called twice counts
     * once; a while condition, emitted twice, once):
     *  - .item(), .tolist(), int/float/bool/complex(tensor), is_nonzero,
     *    torch.equal/allclose, formatting a tensor;
     *  - a tensor where an int or a number is expected (aten::Int,
     *    IntImplicit, ScalarImplicit, ImplicitTensorToNum...): slice and
     *    select bounds x[:t], sizes x.view(t, -1), torch.arange(t), and a
     *    tensor used as a condition; narrow/narrow_copy with a tensor start
     *    (their Tensor overload); tensor_split with tensor indices;
     *  - ops whose result shape depends on tensor values: nonzero,
     *    argwhere, masked_select, unique*, bincount, one-argument
     *    torch.where, repeat_interleave with tensor repeats, F.one_hot
     *    without num_classes or with one not certainly >= 0 (a constant, a
     *    size read from a shape, or +, *, // of those), and indexing (or
     *    index_put) with a boolean mask: a comparison, logical op, isnan...,
     *    a cast to or a tensor made with torch.bool, &, |, ^, ~ of masks,
     *    and views, copies, If outputs and torch.where of masks (a tensor
     *    argument's dtype is unknown: x[mask_arg] is not counted).
     * The outputs of all of these depend on tensor values (their shapes,
     * for tensors): control flow on them counts below. */
    int host_syncs;
    /* prim::If / prim::Loop nodes (once per place, as above) whose condition or trip count depends
     * on tensor values: traced back through the inlined graph (loop-carried values, If outputs,
     * lists changed in place, and the shape of a tensor a sync shaped) to a host sync. `for i in
     * range(N)`, `if x.shape[0] > 1` and conditions on dtype, device, ints and constants do not
     * count. */
    int data_dependent_flow;
    int first_line;          /* the candidate's line of first_problem; 0 if none or unknown */
    char first_problem[256]; /* "line 12: .item() moves a tensor value to the host"; "" if none */
} fmx_program_facts;

/* Host syncs and data-dependent control flow of function fn (its graph with
 * every call inlined, sub-blocks included). first_problem is the problem on
 * the earliest line (on one line, control flow before the sync it comes
 * from). Needs no arguments and runs nothing. FMX_ENOTFOUND when fn does not
 * exist. */
int fmx_program_facts_get(fmx_program *p, const char *fn, fmx_program_facts *out, char *err,
                          size_t errsz);

/* ---- calls ---- */

fmx_args *fmx_args_create(void);    /* caller frees with fmx_args_destroy */
void fmx_args_destroy(fmx_args *a); /* accepts NULL */
void fmx_args_clear(fmx_args *a);   /* empties it for reuse */
/* Each setter keeps its own reference/copy of the value. */
int fmx_args_tensor(fmx_args *a, const char *name, const fmx_tensor *t);
int fmx_args_int(fmx_args *a, const char *name, int64_t v);
int fmx_args_float(fmx_args *a, const char *name, double v);
int fmx_args_bool(fmx_args *a, const char *name, int v);
int fmx_args_str(fmx_args *a, const char *name, const char *v);
int fmx_args_none(fmx_args *a, const char *name);
/* A Dict[str, Tensor] argument; n entries. A fresh dict is built for every
 * run, so a candidate cannot change what the next run sees. */
int fmx_args_weights(fmx_args *a, const char *name, const char *const *keys,
                     const fmx_tensor *const *vals, int n);
/* A List[Tensor] argument of n tensors; a fresh list for every run, as for
 * weights (a candidate may append to it). */
int fmx_args_tensor_list(fmx_args *a, const char *name, const fmx_tensor *const *vals, int n);

/* Runs fn with the arguments (keyword by name). Outputs: a Tensor, or a tuple
 * of Tensors and lists of Tensors (flattened in order). Records every
 * tap(name, x) in call order. Caller frees *out with fmx_run_destroy. Runtime
 * errors name the candidate's line. */
int fmx_program_run(fmx_program *p, const char *fn, const fmx_args *a, fmx_run **out, char *err,
                    size_t errsz);
void fmx_run_destroy(fmx_run *r);    /* accepts NULL */
double fmx_run_ms(const fmx_run *r); /* wall time of the call, device-synchronised */
int fmx_run_noutputs(const fmx_run *r);
/* Borrowed, valid until fmx_run_destroy. */
const fmx_tensor *fmx_run_output(const fmx_run *r, int i);
int fmx_run_ntaps(const fmx_run *r);
const char *fmx_run_tap_name(const fmx_run *r, int i);  /* borrowed */
const fmx_tensor *fmx_run_tap(const fmx_run *r, int i); /* borrowed */

/* Whether fn computes the same outputs with the graph executor's
 * optimisations on (the profiling executor, its specialisations and the
 * fusers this libtorch enables by default) as in reference, a run of
 * fmx_program_run (optimisations off) with the same arguments a. fn's graph,
 * every call inlined, gets a graph executor of its own (the candidate's
 * functions never see an optimised plan), and runs until it uses its
 * optimised plan (profiled runs + 1: 2 runs by default); every run's outputs
 * are compared with reference's. Same when, for every output, shapes and
 * dtypes match and
 *   floating point: |opt - ref| <= atol·rms(ref) + rtol·|ref| element-wise,
 *     NaN matching NaN and ±inf itself; (atol, rtol) = (1e-5, 0) for float32
 *     and float64, (16·eps, 16·eps) for float16 and bfloat16 (eps 2^-10,
 *     2^-7: 2^-6 and 2^-3);
 *   other dtypes: equal.
 * Fusion and reassociation legitimately move float32 results by a few ulps
 * per op; 1e-5·rms (about 80 float32 ulps at the output's typical magnitude)
 * is far below any grading tolerance, while a change of meaning (a
 * different branch, a wrong specialisation) moves outputs by O(rms). The
 * scale is the output's RMS, not each element, so elements that cancel to
 * near zero do not fail on rounding. Fused half-precision kernels keep
 * float32 intermediates and round once instead of after every op: on an H200
 * (libtorch 2.11, CUDA) a 3-layer bfloat16 chain moved by 0.08·RMS, so
 * bfloat16 gets 2^-3, the allowance packs give a bfloat16 output on another
 * build (docs/pack-format.md, Tolerances).
 * Returns FMX_OK with *same = 1, or *same = 0 and the reason in err (the
 * first differing output, or the optimised run's error: a graph whose
 * optimised run throws does not survive). A negative status (and *same = 0)
 * for misuse: NULL pointers, unknown fn, arguments that do not bind. */
int fmx_program_check_optimized(fmx_program *p, const char *fn, const fmx_args *a,
                                const fmx_run *reference, int *same, char *err, size_t errsz);

/* ---- comparison ---- */

typedef struct {
    double atol; /* absolute, in units of the reference's scale (RMS) */
    double rtol; /* relative to |reference| element-wise */
} fmx_tolerance;

typedef struct {
    int shape_ok, dtype_ok, pass;
    int64_t compared;            /* elements graded (mask applied) */
    int64_t bad;                 /* elements outside tolerance (non-finite included) */
    int64_t nonfinite;           /* graded elements of got that are NaN/Inf */
    double max_abs;              /* max |got - want| over graded elements */
    double max_rel;              /* max |got - want| / max(|want|, scale) */
    double scale;                /* RMS of want over graded elements */
    int64_t worst[FMX_MAX_DIMS]; /* index of the worst element */
    int worst_ndim;
    double worst_got, worst_want;
} fmx_compare_result;

/* Compares got against want. An element passes when both are finite and
 * |got - want| <= atol·scale + rtol·|want|, scale = max(RMS(want), 1e-30).
 * mask, when given, is a (B, T) tensor of keep flags (nonzero = graded) and
 * want has shape (B, T, …): only kept (b, t) rows are graded; more generally
 * a mask of k >= 2 dims keeps rows of want's leading k dims (a KV cache's
 * (B, heads, L) flags for (B, heads, L, D)). Shape and dtype mismatches set
 * shape_ok/dtype_ok = 0 and pass = 0 and return 0. NaN and ±inf never pass
 * (inf does not match inf). The whole policy, NaN, inf and the worst element
 * included: env/engine/compare.cpp. */
int fmx_compare(const fmx_tensor *got, const fmx_tensor *want, const fmx_tensor *mask,
                fmx_tolerance tol, fmx_compare_result *out, char *err, size_t errsz);

/* For tests only: fmx_compare through its tensor path (the one cuda tensors
 * take) even where its cpu loop applies, to check that both follow one
 * policy. */
int fmx__compare_tensor_path(const fmx_tensor *got, const fmx_tensor *want, const fmx_tensor *mask,
                             fmx_tolerance tol, fmx_compare_result *out, char *err, size_t errsz);

#ifdef __cplusplus
}
#endif

#endif
