/*
 * resolver.cpp — what names in candidate code mean: the TorchScript Resolver
 * for torch, F, nn, math, tap, the candidate's top-level constants and the
 * exceptions it may raise; torch.finfo; the F prelude (prelude.py plus the
 * F functions that depend on the libtorch version); and tap, the one op fmx
 * adds.
 *
 * Not here: the preprocessing that finds imports and constants
 * (source.cpp), evaluating the constants (compile.cpp), the op allowlist
 * (walk.cpp).
 */
#include "internal.hpp"

#include <torch/csrc/jit/frontend/lexer.h>
#include <torch/csrc/jit/frontend/parser.h>
#include <torch/csrc/jit/runtime/custom_operator.h>

#include <cmath>
#include <set>

namespace fmx_engine_impl {

/* ------------------------------------------------------------------------ */
/* tap: the one op fmx adds                                                 */
/* ------------------------------------------------------------------------ */

// The taps of the run in progress on this thread (null when none).
thread_local std::vector<std::pair<std::string, at::Tensor>> *tl_taps = nullptr;

QuietWarnings g_quiet;

namespace {

void tap_op(torch::jit::Stack &stack) {
    at::Tensor x = stack.back().toTensor();
    stack.pop_back();
    std::string name = stack.back().toStringRef();
    stack.pop_back();
    if (tl_taps) tl_taps->emplace_back(std::move(name), x);
    stack.emplace_back(std::move(x));
}

// CONSERVATIVE alias analysis marks it as having side effects, so dead-code
// elimination keeps a tap whose result is unused.
torch::jit::RegisterOperators
    g_tap_registration({torch::jit::Operator("fmx::tap(str name, Tensor x) -> Tensor", tap_op,
                                             c10::AliasAnalysisKind::CONSERVATIVE)});

const c10::Symbol k_tap = c10::Symbol::fromQualString("fmx::tap");

/* ------------------------------------------------------------------------ */
/* the resolver: torch, F, nn, math, tap and the candidate's constants      */
/* ------------------------------------------------------------------------ */

[[noreturn]] void refuse(const SourceRange &loc, const std::string &msg) {
    tl_forbidden = true;
    throw ErrorReport(loc) << msg;
}

SugaredValuePtr constant_value(GraphFunction &m, const SourceRange &loc, const c10::IValue &v) {
    torch::jit::Value *val = m.graph()->insertConstant(v, loc);
    // A list constant is copied on use so that a run cannot change it.
    if (v.isList()) val = m.graph()->insert(c10::Symbol::aten("list"), {val}, {}, loc);
    return std::make_shared<torch::jit::SimpleValue>(val);
}

const std::map<std::string, at::ScalarType> &dtype_names() {
    // clang-format off
    static const std::map<std::string, at::ScalarType> m = {
        {"float32", at::kFloat}, {"float", at::kFloat}, {"float16", at::kHalf},
        {"half", at::kHalf}, {"bfloat16", at::kBFloat16}, {"float64", at::kDouble},
        {"double", at::kDouble}, {"int64", at::kLong}, {"long", at::kLong},
        {"int32", at::kInt}, {"int", at::kInt}, {"int16", at::kShort}, {"short", at::kShort},
        {"int8", at::kChar}, {"uint8", at::kByte}, {"bool", at::kBool},
        {"complex64", at::kComplexFloat}, {"cfloat", at::kComplexFloat},
        {"complex128", at::kComplexDouble},
    };
    // clang-format on
    return m;
}

bool float_constant(const std::string &field, double *out) {
    if (field == "pi")
        *out = M_PI;
    else if (field == "e")
        *out = M_E;
    else if (field == "tau")
        *out = 2 * M_PI;
    else if (field == "inf")
        *out = INFINITY;
    else if (field == "nan")
        *out = NAN;
    else
        return false;
    return true;
}

// Calls prelude function `name` with args; the result as a SugaredValue.
SugaredValuePtr call_prelude(const std::string &name, const SourceRange &loc, GraphFunction &m,
                             std::vector<torch::jit::NamedValue> args) {
    torch::jit::Function *fn = prelude().find_function(c10::QualifiedName("F", name));
    TORCH_INTERNAL_ASSERT(fn, "fmx prelude lacks ", name);
    return torch::jit::FunctionValue(fn).call(loc, m, args, {}, 1);
}

// torch.finfo(dtype): .min .max .eps .tiny of a floating dtype, also when
// the dtype is only known at run time (x.dtype).
struct FinfoValue : SugaredValue {
    torch::jit::Value *dtype;
    explicit FinfoValue(torch::jit::Value *d) : dtype(d) {}
    std::string kind() const override {
        return "torch.finfo";
    }
    SugaredValuePtr attr(const SourceRange &loc, GraphFunction &m,
                         const std::string &field) override {
        if (field != "min" && field != "max" && field != "eps" && field != "tiny" &&
            field != "smallest_normal")
            throw ErrorReport(loc)
                << "torch.finfo(...)." << field << " is not supported (min, max, eps, tiny)";
        return call_prelude("_fmx_finfo_" + (field == "smallest_normal" ? "tiny" : field), loc, m,
                            {torch::jit::NamedValue(loc, dtype)});
    }
};

struct FinfoCtor : SugaredValue {
    std::string kind() const override {
        return "torch.finfo";
    }
    SugaredValuePtr call(const SourceRange &loc, GraphFunction &m,
                         at::ArrayRef<torch::jit::NamedValue> args,
                         at::ArrayRef<torch::jit::NamedValue> kwargs, size_t) override {
        if (args.size() + kwargs.size() > 1)
            throw ErrorReport(loc) << "torch.finfo takes one dtype";
        torch::jit::Value *d = !args.empty() ? args[0].value(*m.graph())
                               : !kwargs.empty()
                                   ? kwargs[0].value(*m.graph())
                                   : m.graph()->insertConstant(c10::IValue(at::kFloat), loc);
        return std::make_shared<FinfoValue>(d);
    }
};

struct ModuleValue : SugaredValue {
    ModuleKind mod;
    explicit ModuleValue(ModuleKind m) : mod(m) {}
    std::string kind() const override {
        switch (mod) {
        case MOD_TORCH:
            return "module 'torch'";
        case MOD_F:
            return "module 'torch.nn.functional'";
        case MOD_NN:
            return "module 'torch.nn'";
        default:
            return "module 'math'";
        }
    }
    SugaredValuePtr attr(const SourceRange &loc, GraphFunction &m,
                         const std::string &field) override {
        switch (mod) {
        case MOD_TORCH:
            return torch_attr(loc, m, field);
        case MOD_NN:
            if (field == "functional") return std::make_shared<ModuleValue>(MOD_F);
            refuse(loc, "torch.nn." + field +
                            " is not available: candidate code is functional (use F.* "
                            "functions and a weights dict, not nn modules)");
        case MOD_F:
            return f_attr(field);
        default: {
            double v;
            if (float_constant(field, &v)) return constant_value(m, loc, v);
            return builtin(field);
        }
        }
    }

    static SugaredValuePtr builtin(const std::string &name) {
        return std::make_shared<BuiltinFunction>(c10::Symbol::aten(name), c10::nullopt);
    }

    SugaredValuePtr torch_attr(const SourceRange &loc, GraphFunction &m, const std::string &field) {
        auto dt = dtype_names().find(field);
        if (dt != dtype_names().end()) return constant_value(m, loc, c10::IValue(dt->second));
        double v;
        if (float_constant(field, &v)) return constant_value(m, loc, v);
        if (field == "nn") return std::make_shared<ModuleValue>(MOD_NN);
        if (field == "finfo") return std::make_shared<FinfoCtor>();
        if (field == "ops")
            refuse(loc, "torch.ops is not allowed in candidate code: call torch.*, F.* and "
                        "Tensor methods");
        if (field == "save" || field == "load" || field == "from_file")
            refuse(loc, "torch." + field + " touches files: not allowed in candidate code");
        // clang-format off
        static const std::set<std::string> k_no = {
            "jit", "cuda", "distributed", "autograd", "backends", "hub", "utils", "library",
            "classes", "_C", "onnx", "fx", "compiler", "_dynamo", "testing", "package",
            "profiler", "multiprocessing", "manual_seed", "seed", "set_default_dtype",
            "set_num_threads", "set_grad_enabled", "random", "mps", "xpu", "export",
        };
        // clang-format on
        if (k_no.count(field))
            refuse(loc, "torch." + field + " is not available in candidate code");
        return builtin(field);
    }

    static SugaredValuePtr f_attr(const std::string &field) {
        torch::jit::Function *fn = starts_with(field, "_fmx")
                                       ? nullptr
                                       : prelude().find_function(c10::QualifiedName("F", field));
        if (fn) return std::make_shared<torch::jit::FunctionValue>(fn);
        // F names whose aten op is spelled differently.
        static const std::map<std::string, std::string> k_alias = {
            {"interpolate", "__interpolate"},
            {"upsample", "__upsample"},
        };
        auto it = k_alias.find(field);
        return builtin(it == k_alias.end() ? field : it->second);
    }
};
} // namespace

SugaredValuePtr FmxResolver::resolveValue(const std::string &name, GraphFunction &m,
                                          const SourceRange &loc) {
    if (constants) {
        auto it = constants->find(name);
        if (it != constants->end()) return constant_value(m, loc, it->second);
    }
    auto mod = modules.find(name);
    if (mod != modules.end()) return std::make_shared<ModuleValue>(mod->second);
    if (with_tap && name == "tap") return std::make_shared<BuiltinFunction>(k_tap, c10::nullopt);
    static const std::set<std::string> k_exceptions = {
        "Exception",         "RuntimeError",   "ValueError",      "TypeError",
        "IndexError",        "KeyError",       "AssertionError",  "NotImplementedError",
        "ZeroDivisionError", "AttributeError", "ArithmeticError", "LookupError",
    };
    if (k_exceptions.count(name)) return std::make_shared<torch::jit::ExceptionValue>(name);
    return nullptr;
}

/* ------------------------------------------------------------------------ */
/* the F prelude                                                            */
/* ------------------------------------------------------------------------ */

namespace {

// prelude.py, embedded at build time: F functions whose Python signature
// differs from aten's, and implementations of ops a libtorch lacks.
const char *k_prelude =
#include "fmx_prelude.inc"
    ;

// The F functions that depend on the libtorch version.
#if FMX__VERSION_AT_LEAST(2, 4)
const char *k_prelude_rms_norm = R"PY(
def rms_norm(input: Tensor, normalized_shape: List[int], weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    return torch.rms_norm(input, normalized_shape, weight, eps)
)PY";
#else
const char *k_prelude_rms_norm = R"PY(
def rms_norm(input: Tensor, normalized_shape: List[int], weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    return _fmx_rms_norm_math(input, normalized_shape, weight, eps)
)PY";
#endif

#if FMX__VERSION_AT_LEAST(2, 5)
const char *k_prelude_sdpa = R"PY(
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    return torch.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
)PY";
#elif FMX__VERSION_AT_LEAST(2, 1)
// aten's op has no enable_gqa yet: repeat the key/value heads.
const char *k_prelude_sdpa = R"PY(
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    if enable_gqa:
        rep = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(rep, -3)
        value = value.repeat_interleave(rep, -3)
    return torch.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                              scale=scale)
)PY";
#else
const char *k_prelude_sdpa = R"PY(
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    return _fmx_sdpa_math(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
)PY";
#endif

} // namespace

std::vector<Def> parse_defs(const std::shared_ptr<Source> &src) {
    torch::jit::Parser p(src);
    std::vector<Def> defs;
    while (p.lexer().cur().kind != torch::jit::TK_EOF)
        defs.emplace_back(p.parseFunction(false));
    return defs;
}

CompilationUnit &prelude() {
    // Never destroyed: candidate graphs point at its functions.
    static CompilationUnit *cu = [] {
        // prelude.py goes through the candidate preprocessor (its imports),
        // then the version-dependent functions follow it.
        SourceMap sm;
        sm.filename = "<fmx prelude.py>";
        sm.lines = split_lines(k_prelude);
        auto c = std::make_unique<CompilationUnit>();
        try {
            PyModel model(k_prelude, strlen(k_prelude));
            Prep p = preprocess(sm, model);
            std::string text;
            for (const std::string &l : p.code_lines)
                text += l + "\n";
            text += std::string(k_prelude_rms_norm) + k_prelude_sdpa;
            auto r = std::make_shared<FmxResolver>();
            r->modules = p.modules;
            r->with_tap = false;
            auto src = std::make_shared<Source>(text, sm.filename, 1);
            std::vector<Def> defs = parse_defs(src);
            std::vector<ResolverPtr> rs(defs.size(), r);
            RunGuards g;
            c->define(c10::QualifiedName("F"), {}, {}, defs, rs, nullptr);
        } catch (const ErrorReport &e) {
            fail(FMX_EINTERNAL, "the F prelude does not compile: " + from_report(sm, e).msg);
        } catch (const FmxError &e) {
            fail(FMX_EINTERNAL, "the F prelude does not compile: " + e.msg);
        } catch (const std::runtime_error &e) {
            fail(FMX_EINTERNAL, "the F prelude does not compile: " + syntax_message(sm, e.what()));
        }
        return c.release();
    }();
    return *cu;
}

} // namespace fmx_engine_impl
