/*
 * pack.h — task packs: task.json (cJSON) plus two safetensors files read by
 * mmap. The loader validates everything a verify or an episode will touch at
 * open time (header bounds, dtypes, shapes, every tensor key a call names), so
 * later lookups cannot fail on a malformed pack. docs/pack-format.md is the
 * format; this file is its only C reader.
 *
 * Threads: a pack may be shared by threads. Lookups are read-only except the
 * lazy state (tensor wrappers, weight views), which a mutex inside guards.
 *
 * Not here: comparing outputs (env/verify.c), compiling candidates
 * (env/engine).
 */
#ifndef FMX_PACK_H
#define FMX_PACK_H

#include <stddef.h>
#include <stdint.h>

#include "engine/engine.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fmx_pack fmx_pack;
typedef struct cJSON cJSON;

#define FMX_PACK_VERSION 1

typedef enum {
    FMX_IO_TENSOR, /* stored in probes.safetensors under key */
    FMX_IO_VALUE,  /* a Python scalar: int, float, bool or str */
    FMX_IO_NONE,
    FMX_IO_CACHE, /* a KV cache object; not stored, not graded */
    FMX_IO_OTHER  /* anything else; repr only */
} fmx_io_kind;

typedef enum { FMX_VAL_INT, FMX_VAL_FLOAT, FMX_VAL_BOOL, FMX_VAL_STR } fmx_value_type;

/* One input or output of a module call. All strings borrowed from the pack. */
typedef struct {
    const char *name;
    fmx_io_kind kind;
    const char *key;   /* FMX_IO_TENSOR: tensor key */
    int token_aligned; /* outputs: shape (B, T, …) graded under the probe mask */
    const char *mask;  /* outputs: keep flags over the leading dims (a cache's (B, heads, L)),
                          graded under them instead; NULL if none */
    fmx_value_type vtype;
    int64_t i;     /* FMX_VAL_INT, FMX_VAL_BOOL */
    double f;      /* FMX_VAL_FLOAT */
    const char *s; /* FMX_VAL_STR; FMX_IO_OTHER: repr */
} fmx_io;

typedef struct {
    int probe;  /* index into probes */
    int module; /* index into modules */
    int index;  /* k-th call of this module in this probe */
    int ninputs, noutputs;
    const fmx_io *inputs, *outputs;
    int raised; /* the call raised (the model caught it): not graded */
} fmx_call;

typedef struct {
    const char *name;
    int visible;
    int batch, seq;
    const char *padding;    /* "left", "right" or "none" */
    const char *mask_key;   /* (B, T) keep flags; NULL if none */
    fmx_dtype dtype;        /* the model's dtype on this probe (default: the pack's) */
    const char *generation; /* a generation's step (decode tasks): its name ("g0"); else NULL */
    int step;               /* 0 the prefill, k the k-th decode step; -1 not a generation */
} fmx_probe;

typedef struct {
    const char *path; /* "" for the root */
    const char *cls;
    int parent;     /* index, -1 for the root */
    int first_call; /* index of this module's first call on probe 0, -1 if never called */
} fmx_module;

/* Opens the pack in directory dir. On failure returns a negative status and
 * writes the reason to err. Caller closes with fmx_pack_close. */
int fmx_pack_open(const char *dir, fmx_pack **out, char *err, size_t errsz);
void fmx_pack_close(fmx_pack *p); /* accepts NULL */

/* Everything below is borrowed and valid until fmx_pack_close. */
const char *fmx_pack_dir(const fmx_pack *p);
const char *fmx_pack_name(const fmx_pack *p);
const char *fmx_pack_dtype(const fmx_pack *p); /* "float32", "bfloat16" */
const cJSON *fmx_pack_manifest(const fmx_pack *p);

int fmx_pack_nmodules(const fmx_pack *p);
const fmx_module *fmx_pack_module(const fmx_pack *p, int i);
/* Index of the module at path, or -1. */
int fmx_pack_find_module(const fmx_pack *p, const char *path);

int fmx_pack_nprobes(const fmx_pack *p);
const fmx_probe *fmx_pack_probe(const fmx_pack *p, int i);
/* Probe i in words, into buf: token inputs as "batch 2 × seq 7, padding left";
 * other inputs (images, audio: the model file's fmx_inputs) by their tensors,
 * "pixel_values (2, 3, 32, 32) float32", from the manifest's probe `inputs`
 * (packs without it: the token form); a probe in another dtype than the
 * pack's says so: ", bfloat16 (copy of p1)"; a generation's step too:
 * ", generation g0: decode step 1". Returns buf. */
const char *fmx_pack_probe_describe(const fmx_pack *p, int i, char *buf, size_t n);

int fmx_pack_ncalls(const fmx_pack *p);
const fmx_call *fmx_pack_call(const fmx_pack *p, int i);
/* 1 when the pack captured generation steps (a causal LM: it has a decode task). */
int fmx_pack_has_generation(const fmx_pack *p);

/* Index of the k-th call of module m on probe, or -1. */
int fmx_pack_find_call(const fmx_pack *p, int probe, int module, int k);

/* 1 when this engine's libtorch version (X.Y.Z) and device type are those
 * the pack's reference came from (created_by): kernels then round alike and a
 * faithful rewrite matches to the bit. */
int fmx_pack_same_build(const fmx_pack *p);

/* Tolerance for outputs of dtype dt: the pack's "tolerance" table on the same
 * build, its "tolerance_cross_build" table otherwise; exact for integers. */
fmx_tolerance fmx_pack_tolerance(const fmx_pack *p, fmx_dtype dt);

/* A captured tensor (probes file) by key; NULL if absent. Wrapped lazily
 * without copying on the cpu. */
const fmx_tensor *fmx_pack_capture(fmx_pack *p, const char *key);

/* The weights a component at path sees: every stored tensor under "path."
 * and every alias under it, keyed relative to path. keys[i]/vals[i] are
 * borrowed until fmx_pack_close; returns the count or a negative status.
 * The arrays are cached per path: later calls for the same path are free. */
int fmx_pack_weights(fmx_pack *p, const char *path, const char *const **keys,
                     const fmx_tensor *const **vals, char *err, size_t errsz);

/* The same weights with every floating tensor cast to dt (as the exporter's
 * model.to(dtype) did for a probe of that dtype); integer and bool tensors
 * unchanged. dt < 0 or the stored dtype: no cast. Cached per (path, dt). */
int fmx_pack_weights_as(fmx_pack *p, const char *path, int dt, const char *const **keys,
                        const fmx_tensor *const **vals, char *err, size_t errsz);

/* The weights a component at path sees, by name: rel[i] (relative to path)
 * is the tensor stored as file_key[i] in the weights file (aliases of tied
 * weights included). Borrowed until fmx_pack_close; returns the count or a
 * negative status. The evaluation process builds its weights dict from these
 * names over its own mapping of the file (env/evaluator.c). */
int fmx_pack_weight_names(fmx_pack *p, const char *path, const char *const **rel,
                          const char *const **file_key, char *err, size_t errsz);
/* Path of the weights file: hidden = 0 the public set (weights.safetensors),
 * 1 the set hidden probes run under (task.json's "hidden_weights", checked at
 * open to hold the public set's names, dtypes and shapes; the public one for a
 * pack without a hidden set, so the two pointers are equal then). Borrowed
 * until fmx_pack_close. */
const char *fmx_pack_weights_path(const fmx_pack *p, int hidden);
/* Nearest module paths to path (by edit distance), for "did you mean". Writes
 * up to n indices; returns how many. */
int fmx_pack_nearest_modules(const fmx_pack *p, const char *path, int *out, int n);

#ifdef __cplusplus
}
#endif

#endif
