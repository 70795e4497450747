/*
 * engine.cpp — the libtorch bridge behind engine.h: the only C++ in fmx and
 * the only code that includes libtorch. This file is its extern "C" layer:
 * dtypes, the device, tensors over borrowed memory, programs, keyword
 * arguments, runs and fmx_compare, each entry point guarded.
 *
 * The pieces behind it (internal.hpp): source.cpp (messages and the
 * candidate's preprocessing), resolver.cpp (names, the F prelude, tap),
 * walk.cpp (the op allowlist), facts.cpp (compile facts), compile.cpp, run.cpp,
 * compare.cpp. It is not: a pack reader, a report printer, or a place for
 * grading policy (env/pack.c, env/verify.c).
 *
 * Every extern "C" entry catches every exception and turns it into a status
 * and a message; nothing throws across engine.h. libtorch version differences
 * (1.13 from Debian, 2.x from a torch wheel) stay behind TORCH_VERSION_*.
 */
#include "internal.hpp"

#include <ATen/Parallel.h>
#include <torch/cuda.h>

#include <mutex>

using namespace fmx_engine_impl;

/* ------------------------------------------------------------------------ */
/* dtypes and device                                                        */
/* ------------------------------------------------------------------------ */

namespace {

struct DtypeInfo {
    const char *st_name;    // safetensors
    const char *torch_name; // torch
    at::ScalarType st;
    size_t size;
};

const DtypeInfo k_dtypes[FMX_DT_COUNT] = {
    {"F64", "float64", at::kDouble, 8}, {"F32", "float32", at::kFloat, 4},
    {"F16", "float16", at::kHalf, 2},   {"BF16", "bfloat16", at::kBFloat16, 2},
    {"I64", "int64", at::kLong, 8},     {"I32", "int32", at::kInt, 4},
    {"I16", "int16", at::kShort, 2},    {"I8", "int8", at::kChar, 1},
    {"U8", "uint8", at::kByte, 1},      {"BOOL", "bool", at::kBool, 1},
};

int dtype_of(at::ScalarType st) {
    for (int i = 0; i < FMX_DT_COUNT; i++)
        if (k_dtypes[i].st == st) return i;
    return -1;
}

std::mutex g_device_mu;
at::Device g_device(at::kCPU);
std::string g_device_name = "cpu";

} // namespace

at::Device fmx_engine_impl::current_device() {
    std::lock_guard<std::mutex> lk(g_device_mu);
    return g_device;
}

/* ------------------------------------------------------------------------ */
/* extern "C": dtypes and device                                            */
/* ------------------------------------------------------------------------ */

extern "C" int fmx_dtype_parse(const char *name) {
    if (!name) return -1;
    for (int i = 0; i < FMX_DT_COUNT; i++)
        if (strcmp(name, k_dtypes[i].st_name) == 0) return i;
    return -1;
}

extern "C" const char *fmx_dtype_name(fmx_dtype dt) {
    if ((int)dt < 0 || dt >= FMX_DT_COUNT) return "unknown";
    return k_dtypes[dt].torch_name;
}

extern "C" size_t fmx_dtype_size(fmx_dtype dt) {
    if ((int)dt < 0 || dt >= FMX_DT_COUNT) return 0;
    return k_dtypes[dt].size;
}

extern "C" const char *fmx_engine_version(void) {
    static std::string v;
    static std::once_flag once;
    try {
        std::call_once(once, [] {
            v = std::string("libtorch ") + TORCH_VERSION + (at::hasCUDA() ? " cuda" : " cpu");
        });
    } catch (...) {
        return "libtorch " TORCH_VERSION;
    }
    return v.c_str();
}

extern "C" int fmx_engine_set_device(const char *device, char *err, size_t errsz) {
    return guarded(err, errsz, FMX_EDEVICE, [&] {
        if (!device) fail(FMX_EINVAL, "device is NULL");
        std::string d = device;
        at::Device dev(at::kCPU);
        if (d == "cpu") {
            dev = at::Device(at::kCPU);
        } else if (d == "cuda" || starts_with(d, "cuda:")) {
            int idx = 0;
            if (d.size() > 5) {
                char *end = nullptr;
                long v = strtol(d.c_str() + 5, &end, 10);
                if (!end || *end || v < 0)
                    fail(FMX_EINVAL, "bad device '" + d + "' (cpu, cuda, cuda:N)");
                idx = (int)v;
            }
            if (!torch::cuda::is_available())
                fail(FMX_EDEVICE,
                     "device '" + d + "': CUDA is not available (" + fmx_engine_version() + ")");
            if (idx >= (int)torch::cuda::device_count())
                fail(FMX_EDEVICE, "device '" + d + "': only " +
                                      std::to_string(torch::cuda::device_count()) +
                                      " CUDA device(s)");
            dev = at::Device(at::kCUDA, (c10::DeviceIndex)idx);
        } else {
            fail(FMX_EINVAL, "unknown device '" + d + "' (cpu, cuda, cuda:N)");
        }
        std::lock_guard<std::mutex> lk(g_device_mu);
        g_device = dev;
        g_device_name = d;
        return FMX_OK;
    });
}

extern "C" void fmx_engine_set_threads(int n) {
    at::set_num_threads(n > 0 ? n : 1);
}

extern "C" const char *fmx_engine_device(void) {
    try {
        std::lock_guard<std::mutex> lk(g_device_mu);
        return g_device_name.c_str();
    } catch (...) {
        return "unknown";
    }
}

/* ------------------------------------------------------------------------ */
/* extern "C": tensors                                                      */
/* ------------------------------------------------------------------------ */

extern "C" int fmx_tensor_wrap(void *data, fmx_dtype dt, const int64_t *shape, int ndim,
                               fmx_tensor **out, char *err, size_t errsz) {
    if (out) *out = nullptr;
    return guarded(err, errsz, FMX_EINVAL, [&] {
        if (!out) fail(FMX_EINVAL, "out is NULL");
        if ((int)dt < 0 || dt >= FMX_DT_COUNT) fail(FMX_EINVAL, "unknown dtype");
        if (ndim < 0 || ndim > FMX_MAX_DIMS || (ndim > 0 && !shape))
            fail(FMX_EINVAL, "bad shape (ndim " + std::to_string(ndim) + ")");
        std::vector<int64_t> sizes(shape, shape + ndim);
        int64_t numel = 1;
        for (int64_t s : sizes) {
            if (s < 0) fail(FMX_EINVAL, "negative dimension");
            numel *= s;
        }
        auto opts = at::TensorOptions().dtype(k_dtypes[dt].st);
        auto t = std::make_unique<fmx_tensor>();
        if (numel == 0) {
            t->t = at::empty(sizes, opts);
        } else {
            if (!data) fail(FMX_EINVAL, "data is NULL");
            // a bool byte other than 0 or 1 is undefined behaviour in every
            // kernel that reads it: such bytes (a damaged pack, a candidate's
            // results) are refused here, where they enter
            if (dt == FMX_DT_BOOL) {
                const unsigned char *b = static_cast<const unsigned char *>(data);
                for (int64_t i = 0; i < numel; i++)
                    if (b[i] > 1)
                        fail(FMX_EFORMAT, "a bool tensor holds the byte " + std::to_string(b[i]) +
                                              " at element " + std::to_string(i) +
                                              " (bool bytes are 0 or 1)");
            }
            t->t = at::from_blob(data, sizes, opts);
            t->borrowed = true;
        }
        at::Device dev = current_device();
        if (!dev.is_cpu()) {
            t->t = t->t.to(dev, /*non_blocking=*/false, /*copy=*/true);
            t->borrowed = false;
        }
        *out = t.release();
        return FMX_OK;
    });
}

extern "C" int fmx_tensor_cast(const fmx_tensor *t, fmx_dtype dt, fmx_tensor **out, char *err,
                               size_t errsz) {
    if (out) *out = nullptr;
    return guarded(err, errsz, FMX_EINVAL, [&] {
        if (!t || !out) fail(FMX_EINVAL, "NULL tensor");
        if ((int)dt < 0 || dt >= FMX_DT_COUNT) fail(FMX_EINVAL, "unknown dtype");
        auto r = std::make_unique<fmx_tensor>();
        r->t = t->t.to(k_dtypes[dt].st);
        r->borrowed = t->borrowed && r->t.is_alias_of(t->t);
        *out = r.release();
        return FMX_OK;
    });
}

extern "C" void fmx_tensor_destroy(fmx_tensor *t) {
    delete t;
}

extern "C" int fmx_tensor_shape(const fmx_tensor *t, int64_t *shape, fmx_dtype *dt) {
    try {
        if (!t) return -1;
        int ndim = (int)t->t.dim();
        int d = dtype_of(t->t.scalar_type());
        if (d < 0 || ndim > FMX_MAX_DIMS) return -1;
        if (shape)
            for (int i = 0; i < ndim; i++)
                shape[i] = t->t.size(i);
        if (dt) *dt = (fmx_dtype)d;
        return ndim;
    } catch (...) {
        return -1;
    }
}

extern "C" int fmx_tensor_read(const fmx_tensor *t, void *buf, size_t bufsz, char *err,
                               size_t errsz) {
    return guarded(err, errsz, FMX_EINTERNAL, [&] {
        if (!t || !buf) fail(FMX_EINVAL, "NULL tensor or buffer");
        int d = dtype_of(t->t.scalar_type());
        if (d < 0)
            fail(FMX_EINVAL, std::string("unsupported dtype ") + c10::toString(t->t.scalar_type()));
        size_t need = (size_t)t->t.numel() * k_dtypes[d].size;
        if (bufsz < need)
            fail(FMX_EINVAL, "buffer holds " + std::to_string(bufsz) + " bytes; the tensor needs " +
                                 std::to_string(need));
        if (need == 0) return FMX_OK;
        at::Tensor c = t->t.to(at::kCPU).contiguous();
        memcpy(buf, c.data_ptr(), need);
        return FMX_OK;
    });
}

/* ------------------------------------------------------------------------ */
/* extern "C": programs                                                     */
/* ------------------------------------------------------------------------ */

extern "C" int fmx_program_compile(const char *source, size_t len, const char *filename,
                                   fmx_program **out, char *err, size_t errsz) {
    if (out) *out = nullptr;
    return guarded(err, errsz, FMX_ECOMPILE, [&] {
        if (!source || !out) fail(FMX_EINVAL, "NULL source or out");
        *out = compile_program(source, len, filename).release();
        return FMX_OK;
    });
}

extern "C" void fmx_program_destroy(fmx_program *p) {
    try {
        delete p;
    } catch (...) {
    }
}

extern "C" double fmx_program_compile_ms(const fmx_program *p) {
    return p ? p->compile_ms : 0;
}

extern "C" int fmx_program_nfunctions(const fmx_program *p) {
    return p ? (int)p->functions.size() : 0;
}

extern "C" const char *fmx_program_function(const fmx_program *p, int i) {
    if (!p || i < 0 || i >= (int)p->functions.size()) return nullptr;
    return p->functions[i].c_str();
}

extern "C" int fmx_program_params(const fmx_program *p, const char *fn, fmx_param *out, int cap) {
    try {
        if (!p || !fn) return FMX_EINVAL;
        auto it = p->params.find(fn);
        if (it == p->params.end()) return FMX_ENOTFOUND;
        const auto &ps = it->second;
        for (int i = 0; i < (int)ps.size() && i < cap && out; i++) {
            out[i].name = ps[i].name.c_str();
            out[i].kind = ps[i].kind;
            out[i].has_default = ps[i].has_default;
        }
        return (int)ps.size();
    } catch (...) {
        return FMX_EINTERNAL;
    }
}

extern "C" int fmx_program_facts_get(fmx_program *p, const char *fn, fmx_program_facts *out,
                                     char *err, size_t errsz) {
    if (out) memset(out, 0, sizeof *out);
    return guarded(err, errsz, FMX_EINTERNAL, [&] {
        if (!p || !fn || !out) fail(FMX_EINVAL, "NULL program, function or out");
        torch::jit::Function *f = nullptr;
        for (const std::string &n : p->functions)
            if (n == fn) f = p->cu->find_function(c10::QualifiedName(n));
        if (!f) fail(FMX_ENOTFOUND, std::string("no function '") + fn + "' in " + p->sm.filename);
        program_facts(p->sm, f, out);
        return FMX_OK;
    });
}

/* ------------------------------------------------------------------------ */
/* extern "C": arguments                                                    */
/* ------------------------------------------------------------------------ */

namespace {
int set_arg(fmx_args *a, const char *name, ArgVal v) {
    try {
        if (!a || !name) return FMX_EINVAL;
        for (auto &kv : a->items)
            if (kv.first == name) {
                kv.second = std::move(v);
                return FMX_OK;
            }
        a->items.emplace_back(name, std::move(v));
        return FMX_OK;
    } catch (const std::bad_alloc &) {
        return FMX_ENOMEM;
    } catch (...) {
        return FMX_EINTERNAL;
    }
}
ArgVal value_arg(c10::IValue v) {
    ArgVal a;
    a.value = std::move(v);
    return a;
}
} // namespace

extern "C" fmx_args *fmx_args_create(void) {
    try {
        return new fmx_args();
    } catch (...) {
        return nullptr;
    }
}

extern "C" void fmx_args_destroy(fmx_args *a) {
    delete a;
}

extern "C" void fmx_args_clear(fmx_args *a) {
    if (a) a->items.clear();
}

extern "C" int fmx_args_tensor(fmx_args *a, const char *name, const fmx_tensor *t) {
    if (!t) return FMX_EINVAL;
    ArgVal v = value_arg(t->t);
    v.borrowed = t->borrowed;
    return set_arg(a, name, std::move(v));
}

extern "C" int fmx_args_int(fmx_args *a, const char *name, int64_t v) {
    return set_arg(a, name, value_arg(v));
}

extern "C" int fmx_args_float(fmx_args *a, const char *name, double v) {
    return set_arg(a, name, value_arg(v));
}

extern "C" int fmx_args_bool(fmx_args *a, const char *name, int v) {
    return set_arg(a, name, value_arg(v != 0));
}

extern "C" int fmx_args_str(fmx_args *a, const char *name, const char *v) {
    if (!v) return FMX_EINVAL;
    try {
        return set_arg(a, name, value_arg(std::string(v)));
    } catch (...) {
        return FMX_ENOMEM;
    }
}

extern "C" int fmx_args_none(fmx_args *a, const char *name) {
    return set_arg(a, name, value_arg(c10::IValue()));
}

extern "C" int fmx_args_weights(fmx_args *a, const char *name, const char *const *keys,
                                const fmx_tensor *const *vals, int n) {
    if (n < 0 || (n > 0 && (!keys || !vals))) return FMX_EINVAL;
    try {
        ArgVal v;
        v.kind = ARG_WEIGHTS;
        v.weights.reserve(n);
        for (int i = 0; i < n; i++) {
            if (!keys[i] || !vals[i]) return FMX_EINVAL;
            v.weights.emplace_back(keys[i], *vals[i]);
        }
        return set_arg(a, name, std::move(v));
    } catch (const std::bad_alloc &) {
        return FMX_ENOMEM;
    } catch (...) {
        return FMX_EINTERNAL;
    }
}

extern "C" int fmx_args_tensor_list(fmx_args *a, const char *name, const fmx_tensor *const *vals,
                                    int n) {
    if (n < 0 || (n > 0 && !vals)) return FMX_EINVAL;
    try {
        ArgVal v;
        v.kind = ARG_TENSOR_LIST;
        v.list.reserve(n);
        for (int i = 0; i < n; i++) {
            if (!vals[i]) return FMX_EINVAL;
            v.list.push_back(*vals[i]);
        }
        return set_arg(a, name, std::move(v));
    } catch (const std::bad_alloc &) {
        return FMX_ENOMEM;
    } catch (...) {
        return FMX_EINTERNAL;
    }
}

/* ------------------------------------------------------------------------ */
/* extern "C": runs                                                         */
/* ------------------------------------------------------------------------ */

extern "C" int fmx_program_run(fmx_program *p, const char *fn, const fmx_args *a, fmx_run **out,
                               char *err, size_t errsz) {
    if (out) *out = nullptr;
    return guarded(err, errsz, FMX_ERUNTIME, [&] {
        if (!p || !fn || !out) fail(FMX_EINVAL, "NULL program, function or out");
        *out = run(p, fn, a).release();
        return FMX_OK;
    });
}

extern "C" int fmx_program_check_optimized(fmx_program *p, const char *fn, const fmx_args *a,
                                           const fmx_run *reference, int *same, char *err,
                                           size_t errsz) {
    if (same) *same = 0;
    set_err(err, errsz, "");
    return guarded(err, errsz, FMX_ERUNTIME, [&] {
        if (!p || !fn || !reference || !same)
            fail(FMX_EINVAL, "NULL program, function, reference or same");
        std::string why;
        check_optimized(p, fn, a, *reference, &why);
        *same = why.empty();
        set_err(err, errsz, why);
        return FMX_OK;
    });
}

// The accessors below only read plain fields: nothing in them can throw.

extern "C" void fmx_run_destroy(fmx_run *r) {
    delete r;
}

extern "C" double fmx_run_ms(const fmx_run *r) {
    return r ? r->ms : 0;
}

extern "C" int fmx_run_noutputs(const fmx_run *r) {
    return r ? (int)r->outputs.size() : 0;
}

extern "C" const fmx_tensor *fmx_run_output(const fmx_run *r, int i) {
    if (!r || i < 0 || i >= (int)r->outputs.size()) return nullptr;
    return r->outputs[i].get();
}

extern "C" int fmx_run_ntaps(const fmx_run *r) {
    return r ? (int)r->taps.size() : 0;
}

extern "C" const char *fmx_run_tap_name(const fmx_run *r, int i) {
    if (!r || i < 0 || i >= (int)r->taps.size()) return nullptr;
    return r->tap_names[i].c_str();
}

extern "C" const fmx_tensor *fmx_run_tap(const fmx_run *r, int i) {
    if (!r || i < 0 || i >= (int)r->taps.size()) return nullptr;
    return r->taps[i].get();
}

/* ------------------------------------------------------------------------ */
/* extern "C": comparison                                                   */
/* ------------------------------------------------------------------------ */

extern "C" int fmx_compare(const fmx_tensor *got, const fmx_tensor *want, const fmx_tensor *mask,
                           fmx_tolerance tol, fmx_compare_result *out, char *err, size_t errsz) {
    return guarded(err, errsz, FMX_EINTERNAL, [&] {
        if (!got || !want || !out) fail(FMX_EINVAL, "NULL tensor or result");
        at::NoGradGuard no_grad;
        compare(got->t, want->t, mask ? &mask->t : nullptr, tol, out);
        return FMX_OK;
    });
}

extern "C" int fmx__compare_tensor_path(const fmx_tensor *got, const fmx_tensor *want,
                                        const fmx_tensor *mask, fmx_tolerance tol,
                                        fmx_compare_result *out, char *err, size_t errsz) {
    return guarded(err, errsz, FMX_EINTERNAL, [&] {
        if (!got || !want || !out) fail(FMX_EINVAL, "NULL tensor or result");
        at::NoGradGuard no_grad;
        compare(got->t, want->t, mask ? &mask->t : nullptr, tol, out, /*force_tensor_path=*/true);
        return FMX_OK;
    });
}
