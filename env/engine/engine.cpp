/*
 * engine.cpp — the libtorch bridge behind engine.h: the only C++ in fmx and
 * the only code that includes libtorch.
 *
 * It is: tensors over borrowed memory; the candidate language (line-based
 * preprocessing of imports, top-level constants and `def tap`; TorchScript's
 * C++ frontend with our own Resolver and an F prelude; an op allowlist walked
 * over every inlined graph); keyword calls with tap() recording; and
 * fmx_compare. It is not: a pack reader, a report printer, or a place for
 * grading policy (env/pack.c, env/verify.c).
 *
 * Every extern "C" entry catches every exception and turns it into a status
 * and a message; nothing throws across engine.h. libtorch version differences
 * (1.13 from Debian, 2.x from a torch wheel) stay behind TORCH_VERSION_* here.
 */
#include "engine.h"
#include "pysource.h"
#include "status.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/cuda.h>
#include <torch/version.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/frontend/error_report.h>
#include <torch/csrc/jit/frontend/lexer.h>
#include <torch/csrc/jit/frontend/parser.h>
#include <torch/csrc/jit/frontend/resolver.h>
#include <torch/csrc/jit/frontend/source_range.h>
#include <torch/csrc/jit/frontend/sugared_value.h>
#include <torch/csrc/jit/frontend/tree_views.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/inliner.h>
#include <torch/csrc/jit/runtime/custom_operator.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <algorithm>
#include <climits>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <pthread.h>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

using torch::jit::BuiltinFunction;
using torch::jit::CompilationUnit;
using torch::jit::Def;
using torch::jit::ErrorReport;
using torch::jit::GraphFunction;
using torch::jit::Node;
using torch::jit::ResolverPtr;
using torch::jit::Source;
using torch::jit::SourceRange;
using torch::jit::SugaredValue;
using torch::jit::SugaredValuePtr;

#define FMX__VERSION_AT_LEAST(maj, min)                                                            \
    (TORCH_VERSION_MAJOR > (maj) || (TORCH_VERSION_MAJOR == (maj) && TORCH_VERSION_MINOR >= (min)))

/* ------------------------------------------------------------------------ */
/* errors                                                                   */
/* ------------------------------------------------------------------------ */

namespace {

// Thrown inside the bridge; the extern "C" wrappers turn it into status+text.
struct FmxError : std::exception {
    int status;
    std::string msg;
    FmxError(int s, std::string m) : status(s), msg(std::move(m)) {}
    const char *what() const noexcept override {
        return msg.c_str();
    }
};

[[noreturn]] void fail(int status, std::string msg) {
    throw FmxError(status, std::move(msg));
}

void set_err(char *err, size_t errsz, const std::string &msg) {
    if (!err || errsz == 0) return;
    size_t n = std::min(msg.size(), errsz - 1);
    memcpy(err, msg.data(), n);
    err[n] = '\0';
}

std::string c10_text(const c10::Error &e) {
    return e.what_without_backtrace();
}

// Runs f (returns int status), converting every exception to status + err.
template <typename Fn> int guarded(char *err, size_t errsz, int on_c10, Fn &&f) {
    try {
        return f();
    } catch (const FmxError &e) {
        set_err(err, errsz, e.msg);
        return e.status;
    } catch (const std::bad_alloc &) {
        set_err(err, errsz, "out of memory");
        return FMX_ENOMEM;
    } catch (const c10::Error &e) {
        set_err(err, errsz, c10_text(e));
        return on_c10;
    } catch (const std::exception &e) {
        set_err(err, errsz, e.what());
        return FMX_EINTERNAL;
    } catch (...) {
        set_err(err, errsz, "unknown C++ exception");
        return FMX_EINTERNAL;
    }
}

// ErrorReport keeps its message and source range private; the standard
// explicit-instantiation rule lets us name the members to read them.
template <typename Tag, typename Tag::type M> struct Rob {
    friend typename Tag::type get(Tag) {
        return M;
    }
};
struct ReportRange {
    using type = torch::jit::OwnedSourceRange ErrorReport::*;
    friend type get(ReportRange);
};
struct ReportText {
    using type = std::stringstream ErrorReport::*;
    friend type get(ReportText);
};
template struct Rob<ReportRange, &ErrorReport::context>;
template struct Rob<ReportText, &ErrorReport::ss>;

std::string trim(const std::string &s) {
    size_t a = s.find_first_not_of(" \t\r\n");
    if (a == std::string::npos) return "";
    size_t b = s.find_last_not_of(" \t\r\n");
    return s.substr(a, b - a + 1);
}

bool starts_with(const std::string &s, const char *p) {
    return s.rfind(p, 0) == 0;
}

/* ------------------------------------------------------------------------ */
/* dtypes and device                                                        */
/* ------------------------------------------------------------------------ */

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

at::Device current_device() {
    std::lock_guard<std::mutex> lk(g_device_mu);
    return g_device;
}

void sync_device(const at::Device &d) {
    if (d.is_cuda()) torch::cuda::synchronize(d.index());
}

} // namespace

/* ------------------------------------------------------------------------ */
/* handles                                                                  */
/* ------------------------------------------------------------------------ */

struct fmx_tensor {
    at::Tensor t;
    bool borrowed = false; // wraps caller memory (cpu, no copy)
};

struct fmx_param_info {
    std::string name;
    fmx_param_kind kind;
    int has_default;
};

namespace {
enum ArgKind { ARG_VALUE, ARG_WEIGHTS, ARG_TENSOR_LIST };
struct ArgVal {
    ArgKind kind = ARG_VALUE;
    c10::IValue value;
    bool borrowed = false;                                   // a borrowed tensor
    std::vector<std::pair<std::string, fmx_tensor>> weights; // ARG_WEIGHTS
    std::vector<fmx_tensor> list;                            // ARG_TENSOR_LIST
};
} // namespace

struct fmx_args {
    std::vector<std::pair<std::string, ArgVal>> items;
};

struct fmx_run {
    double ms = 0;
    std::vector<std::unique_ptr<fmx_tensor>> outputs;
    std::vector<std::string> tap_names;
    std::vector<std::unique_ptr<fmx_tensor>> taps;
};

/* ------------------------------------------------------------------------ */
/* tap: the one op fmx adds                                                 */
/* ------------------------------------------------------------------------ */

namespace {

// The taps of the run in progress on this thread (null when none).
thread_local std::vector<std::pair<std::string, at::Tensor>> *tl_taps = nullptr;

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

// Drops libtorch warnings (TORCH_WARN) instead of printing them to stderr.
struct QuietWarnings : c10::WarningHandler {
#if TORCH_VERSION_MAJOR >= 2
    void process(const c10::Warning &) override {}
#else
    void process(const c10::SourceLocation &, const std::string &, const bool) override {}
#endif
};
#if TORCH_VERSION_MAJOR >= 2
using WarningGuard = c10::WarningUtils::WarningHandlerGuard;
#else
using WarningGuard = c10::Warning::WarningHandlerGuard;
#endif
QuietWarnings g_quiet;

// The guards every TorchScript compile and run here is under: no autograd,
// no graph-executor optimisation (no fusion: kernels as in eager mode), and
// no warnings on stderr.
struct RunGuards {
    c10::InferenceMode inference;
    at::NoGradGuard no_grad;
    torch::jit::GraphOptimizerEnabledGuard no_opt{false};
    WarningGuard quiet{&g_quiet};
};

/* ------------------------------------------------------------------------ */
/* source locations and messages                                            */
/* ------------------------------------------------------------------------ */

struct Loc {
    long line = 0; // 1-based; 0 = unknown
    long col = 0;  // 1-based; 0 = unknown
};

// Where a stretch of a rewritten line came from (f-strings are rewritten).
struct ColAnchor {
    long to, from; // 0-based columns: rewritten, original
    bool linear;   // copied text (else synthesised: maps to `from` itself)
};

// What messages need about the candidate: its name, its own lines, and how
// columns of rewritten lines map back. Every Source compiled from the
// candidate carries its filename and a starting line chosen so that
// TorchScript's own line numbers are the candidate's.
struct SourceMap {
    std::string filename;
    std::vector<std::string> lines;                        // as written, for messages
    std::unordered_map<long, std::vector<ColAnchor>> cols; // by 1-based line

    Loc map(long line, long col0) const {
        Loc loc;
        loc.line = line;
        loc.col = col0 + 1;
        auto it = cols.find(line);
        if (it == cols.end()) return loc;
        const ColAnchor *a = nullptr;
        for (const ColAnchor &c : it->second)
            if (c.to <= col0) a = &c;
        if (a) loc.col = (a->linear ? a->from + (col0 - a->to) : a->from) + 1;
        return loc;
    }
    bool ours(const SourceRange &r) const {
        auto flc = r.file_line_col();
        return flc && std::get<0>(*flc) == filename;
    }
    Loc loc_of(const SourceRange &r) const {
        auto flc = r.file_line_col();
        if (!flc || std::get<0>(*flc) != filename) return Loc();
        return map((long)std::get<1>(*flc), (long)std::get<2>(*flc));
    }

    // "FILE:LINE:COL: msg", then the candidate's line and a caret under COL.
    std::string format(Loc loc, const std::string &msg) const {
        std::string out = filename;
        if (loc.line > 0) {
            out += ":" + std::to_string(loc.line);
            if (loc.col > 0) out += ":" + std::to_string(loc.col);
        }
        out += ": " + msg;
        if (loc.line > (long)lines.size()) loc.line = 0; // past the end (EOF)
        if (loc.line > 0) {
            out += "\n    " + lines[loc.line - 1];
            if (loc.col > 0) out += "\n    " + std::string(loc.col - 1, ' ') + "^";
        }
        return out;
    }
};

// Set by our resolver just before it throws a refusal (not a compile error).
thread_local bool tl_forbidden = false;

[[noreturn]] void refuse(const SourceRange &loc, const std::string &msg) {
    tl_forbidden = true;
    throw ErrorReport(loc) << msg;
}

// A compile-time ErrorReport → status + "FILE:LINE:COL: message".
FmxError from_report(const SourceMap &sm, const ErrorReport &e) {
    const SourceRange &r = e.*get(ReportRange());
    std::string msg = trim((e.*get(ReportText())).str());
    if (!msg.empty() && msg.back() == ':') msg.pop_back();
    int status = tl_forbidden ? FMX_EFORBIDDEN : FMX_ECOMPILE;
    tl_forbidden = false;
    return FmxError(status, sm.format(sm.loc_of(r), msg));
}

std::vector<std::string> split_lines(const std::string &s) {
    std::vector<std::string> ls;
    std::stringstream ss(s);
    std::string l;
    while (std::getline(ss, l))
        ls.push_back(l);
    return ls;
}

// Text that TorchScript formatted with SourceRange::highlight holds frames
// `File "NAME", line N` and a caret line `~~~~ <--- HERE`. Finds the last
// frame in the candidate's file; returns the index of the line after the
// last frame of any file (0 when there is none).
size_t find_frame(const SourceMap &sm, const std::vector<std::string> &ls, Loc *loc) {
    const std::string marker = "File \"" + sm.filename + "\", line ";
    long frame = -1;
    size_t after = 0;
    for (size_t i = 0; i < ls.size(); i++) {
        if (ls[i].find("File \"") == std::string::npos) continue;
        after = i + 1;
        size_t q = ls[i].find(marker);
        if (q == std::string::npos) continue;
        frame = (long)i;
        *loc = Loc();
        loc->line = atol(ls[i].c_str() + q + marker.size());
    }
    if (frame < 0) return after;
    // The frame prints its lines as in the (rewritten) source: same columns.
    for (size_t i = frame + 1; i < ls.size(); i++) {
        if (ls[i].find("File \"") != std::string::npos) break;
        if (ls[i].find("<--- HERE") != std::string::npos) {
            size_t t = ls[i].find('~');
            if (t != std::string::npos) *loc = sm.map(loc->line, (long)t);
            break;
        }
    }
    return after;
}

// A syntax error from the lexer: "message:\n" + highlight.
std::string syntax_message(const SourceMap &sm, const std::string &what) {
    std::vector<std::string> ls = split_lines(what);
    Loc loc;
    find_frame(sm, ls, &loc);
    // At the end of the file: point after the last line with text.
    long last = (long)sm.lines.size();
    while (last > 0 && trim(sm.lines[last - 1]).empty())
        last--;
    if (last > 0 && loc.line > last) {
        loc.line = last;
        loc.col = (long)sm.lines[last - 1].size() + 1;
    }
    std::string msg = ls.empty() ? "syntax error" : trim(ls[0]);
    if (!msg.empty() && msg.back() == ':') msg.pop_back();
    if (msg.size() > 5 && msg.compare(msg.size() - 5, 5, " here") == 0) msg.resize(msg.size() - 5);
    return sm.format(loc, msg);
}

// TorchScript runtime errors carry a traceback of TorchScript frames:
// keep the innermost frame in the candidate's file and the final message.
std::string runtime_message(const SourceMap &sm, const std::string &what, const char *prefix) {
    std::vector<std::string> ls = split_lines(what);
    Loc loc;
    size_t after = find_frame(sm, ls, &loc);
    // The message: what follows the traceback (from the last "XError: ..."
    // line), else every line that is not traceback boilerplate.
    std::string msg;
    if (after > 0) {
        static const std::regex k_err(R"(^[A-Za-z_][A-Za-z0-9_.]*(Error|Exception):.*$)");
        long start = -1;
        for (size_t i = after; i < ls.size(); i++)
            if (std::regex_match(ls[i], k_err)) start = (long)i;
        if (start >= 0) {
            for (size_t i = start; i < ls.size(); i++)
                msg += ls[i] + "\n";
            // "RuntimeError: ValueError: x" (a raise) → "ValueError: x"
            if (starts_with(msg, "RuntimeError: ") &&
                std::regex_match(split_lines(msg.substr(14))[0], k_err))
                msg = msg.substr(14);
            if (starts_with(msg, "builtins.")) msg = msg.substr(9);
        }
    }
    if (msg.empty()) {
        for (const std::string &l : ls) {
            if (l.find("The following operation failed in the TorchScript") != std::string::npos ||
                l.find("Traceback of TorchScript") != std::string::npos)
                continue;
            msg += l + "\n";
        }
    }
    msg = trim(msg);
    return sm.format(loc, std::string(prefix) + msg);
}

} // namespace

// One compiled candidate file.
struct fmx_program {
    std::shared_ptr<CompilationUnit> cu;
    SourceMap sm;                       // the candidate's name and lines, for messages
    std::vector<std::string> functions; // source order
    std::map<std::string, std::vector<fmx_param_info>> params;
    std::map<std::string, std::pair<long, long>> def_at; // name → (line, col) of the def
    double compile_ms = 0;
};

namespace {

/* ------------------------------------------------------------------------ */
/* the resolver: torch, F, nn, math, tap and the candidate's constants      */
/* ------------------------------------------------------------------------ */

enum ModuleKind { MOD_TORCH, MOD_F, MOD_NN, MOD_MATH };

torch::jit::CompilationUnit &prelude();

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

struct FmxResolver : torch::jit::Resolver {
    // name → value of each top-level constant resolved so far
    std::shared_ptr<const std::map<std::string, c10::IValue>> constants;
    // imported alias → module
    std::map<std::string, ModuleKind> modules;
    bool with_tap = true;

    SugaredValuePtr resolveValue(const std::string &name, GraphFunction &m,
                                 const SourceRange &loc) override {
        if (constants) {
            auto it = constants->find(name);
            if (it != constants->end()) return constant_value(m, loc, it->second);
        }
        auto mod = modules.find(name);
        if (mod != modules.end()) return std::make_shared<ModuleValue>(mod->second);
        if (with_tap && name == "tap")
            return std::make_shared<BuiltinFunction>(k_tap, c10::nullopt);
        static const std::set<std::string> k_exceptions = {
            "Exception",         "RuntimeError",   "ValueError",      "TypeError",
            "IndexError",        "KeyError",       "AssertionError",  "NotImplementedError",
            "ZeroDivisionError", "AttributeError", "ArithmeticError", "LookupError",
        };
        if (k_exceptions.count(name)) return std::make_shared<torch::jit::ExceptionValue>(name);
        return nullptr;
    }

    c10::TypePtr resolveType(const std::string &name, const SourceRange &loc) override {
        return nullptr;
    }
};

/* ------------------------------------------------------------------------ */
/* preprocessing: imports, constants, tap, __main__                         */
/* ------------------------------------------------------------------------ */

// The candidate as fmx's one model of Python source (pysource.h): tokens,
// logical lines and top-level blocks by CPython's rules. The LOC counter
// reads the same model, so the blocks dropped here are the blocks it counts
// zero, and what it counts is what compiles.
struct PyModel {
    fmx_pysource *ps = nullptr;
    const char *src = nullptr;
    const fmx_py_token *tok = nullptr;
    const fmx_py_line *lines = nullptr;
    const fmx_py_block *blocks = nullptr;
    long ntok = 0, nlines = 0, nblocks = 0;

    PyModel(const char *s, size_t n) {
        if (fmx_pysource_open(s, n, &ps) != FMX_OK) throw std::bad_alloc();
        src = fmx_pysource_text(ps);
        ntok = fmx_pysource_tokens(ps, &tok);
        nlines = fmx_pysource_lines(ps, &lines);
        nblocks = fmx_pysource_blocks(ps, &blocks);
    }
    ~PyModel() {
        fmx_pysource_close(ps);
    }
    PyModel(const PyModel &) = delete;
    PyModel &operator=(const PyModel &) = delete;

    std::string text(const fmx_py_token &t) const {
        return std::string(src + t.start, t.end - t.start);
    }
    bool is(const fmx_py_token &t, int kind, const char *s) const {
        return fmx_pysource_tok_is(ps, &t, kind, s);
    }
    // The code tokens of logical line i (comments left out).
    std::vector<const fmx_py_token *> code(long i) const {
        std::vector<const fmx_py_token *> out;
        for (long k = lines[i].tok; k < lines[i].tok + lines[i].ntok; k++)
            if (fmx_py_is_code(&tok[k])) out.push_back(&tok[k]);
        return out;
    }
};

struct Constant {
    std::string name;
    int first = 0, last = 0;       // 0-based physical lines of the statement
    int expr_line = 0;             // 0-based physical line where the expression starts
    size_t expr_col = 0;           // ... and its column there (in the rewritten line)
    std::vector<std::string> code; // lines expr_line..last, comments removed, columns kept
};

struct Prep {
    std::vector<std::string> rewritten;  // the source with f-strings rewritten
    std::vector<std::string> code_lines; // ... and top-level extras blanked
    std::vector<Constant> constants;
    std::map<std::string, ModuleKind> modules;
};

const char *k_allowed_imports =
    "import torch, import torch.nn.functional as F, from torch.nn import functional as F, "
    "from torch import Tensor, from torch import nn, import math, import typing, "
    "from typing import ...";

// Checks one import statement, given as its code tokens; records what it
// binds. False if refused.
bool check_import(const PyModel &m, const std::vector<const fmx_py_token *> &toks,
                  std::map<std::string, ModuleKind> &mods) {
    // words: dotted names joined, commas kept, parentheses dropped
    std::vector<std::string> w;
    bool glue = false; // the last word ends in a dot
    for (const fmx_py_token *t : toks) {
        std::string s = m.text(*t);
        if (s == "(" || s == ")") {
            glue = false;
            continue;
        }
        if (s == ".") {
            if (w.empty()) return false; // a relative import
            w.back() += ".";
            glue = true;
            continue;
        }
        if (glue && t->kind == FMX_PY_NAME)
            w.back() += s;
        else
            w.push_back(s);
        glue = false;
    }
    if (w.empty()) return false;
    // "name [as alias]" items separated by commas, from index i.
    auto items = [&](size_t i, std::vector<std::pair<std::string, std::string>> &out) {
        while (i < w.size()) {
            std::string name = w[i++], alias = name;
            if (name == ",") return false;
            if (i + 1 < w.size() && w[i] == "as") {
                alias = w[i + 1];
                i += 2;
            }
            out.emplace_back(name, alias);
            if (i < w.size()) {
                if (w[i] != ",") return false;
                i++;
            }
        }
        return !out.empty();
    };
    std::vector<std::pair<std::string, std::string>> it;
    if (w[0] == "import") {
        if (!items(1, it)) return false;
        for (auto &[name, alias] : it) {
            bool aliased = alias != name;
            if (name == "torch")
                mods[alias] = MOD_TORCH;
            else if (name == "math")
                mods[alias] = MOD_MATH;
            else if (name == "typing")
                continue;
            else if (name == "torch.nn.functional" || name == "torch.nn")
                // "import torch.nn.functional" alone binds torch
                mods[aliased ? alias : "torch"] =
                    aliased ? (name == "torch.nn" ? MOD_NN : MOD_F) : MOD_TORCH;
            else
                return false;
        }
        return true;
    }
    if (w[0] == "from" && w.size() >= 4 && w[2] == "import") {
        const std::string &mod = w[1];
        if (!items(3, it)) return false;
        for (auto &[name, alias] : it) {
            if (mod == "typing" || (mod == "__future__" && name == "annotations")) continue;
            if (mod == "torch" && name == "Tensor") continue;
            if (mod == "torch" && name == "nn")
                mods[alias] = MOD_NN;
            else if (mod == "torch.nn" && name == "functional")
                mods[alias] = MOD_F;
            else
                return false;
        }
        return true;
    }
    return false;
}

// TorchScript's C++ lexer has no f-strings; rewrite them as its Python
// frontend does: f"a{x}b{y}" → "a{}b{}".format(x, y). The f-strings and
// their fields are the model's (pysource.h), so a string is an f-string
// here exactly when Python and the LOC counter take it for one. Lines keep
// their numbers; sm.cols maps the new columns back to the written ones.
void rewrite_fstrings(const PyModel &m, std::vector<std::string> &lines, SourceMap &sm) {
    std::map<long, std::vector<const fmx_py_token *>> by_line; // 0-based line → its f-strings
    for (long k = 0; k < m.ntok; k++)
        if (m.tok[k].kind == FMX_PY_STRING && (m.tok[k].flags & FMX_PY_FSTRING))
            by_line[m.tok[k].line - 1].push_back(&m.tok[k]);
    for (auto &[li, fstrings] : by_line) {
        if (li < 0 || li >= (long)lines.size()) continue;
        const std::string s = lines[li];
        auto bad = [&](size_t col, const std::string &msg) {
            Loc loc;
            loc.line = li + 1;
            loc.col = (long)col + 1;
            fail(FMX_ECOMPILE, sm.format(loc, msg));
        };
        std::string out;
        std::vector<ColAnchor> anchors;
        size_t copied = 0; // s[0, copied) is in out already
        auto flush = [&](size_t upto) {
            if (upto <= copied) return;
            anchors.push_back({(long)out.size(), (long)copied, true});
            out += s.substr(copied, upto - copied);
            copied = upto;
        };
        for (const fmx_py_token *t : fstrings) {
            // Columns on this line: the token starts at t->col.
            const size_t line_start = t->start - (size_t)t->col;
            auto col = [&](size_t pos) { return pos - line_start; };
            size_t ps = (size_t)t->col;
            if (t->flags & FMX_PY_TRIPLE)
                bad(ps, "triple-quoted f-strings are not supported: use \"...\".format(...)");
            if (t->flags & FMX_PY_UNTERMINATED) bad(ps, "unterminated f-string");
            size_t q = t->start;
            while (m.src[q] != '"' && m.src[q] != '\'')
                q++;
            const char quote = m.src[q];
            const size_t body = q + 1, body_end = t->end - 1;
            for (size_t k = body; k < body_end; k++)
                if (m.src[k] == '\n' || m.src[k] == '\r')
                    bad(ps, "an f-string over several lines is not supported: write it on one "
                            "line");
            long nf = fmx_pysource_fields(m.src, t, nullptr, 0);
            std::vector<fmx_py_field> fields((size_t)nf);
            fmx_pysource_fields(m.src, t, fields.data(), nf);
            std::string lit;
            std::vector<std::pair<size_t, std::string>> exprs; // (column, text)
            size_t k = body;
            // The literal text between fields: {{ and }} are literal braces.
            auto literal = [&](size_t a, size_t b) {
                for (size_t j = a; j < b; j++) {
                    char d = m.src[j];
                    lit += d;
                    if ((d == '{' || d == '}') && j + 1 < b && m.src[j + 1] == d) j++;
                }
            };
            for (const fmx_py_field &f : fields) {
                if (!f.closed) bad(col(f.start - 1), "unterminated {...} in f-string");
                if (f.expr_end < f.end)
                    bad(col(f.expr_end), "f-string format specs, conversions and = ({x:.3f}, "
                                         "{x!r}, {x=}) are not supported: write {x}");
                literal(k, f.start - 1);
                exprs.emplace_back(col(f.start), std::string(m.src + f.start, f.end - f.start));
                lit += "{}";
                k = f.end + 1;
            }
            literal(k, body_end);
            flush(ps);
            std::string np;
            for (size_t j = t->start; j < q; j++)
                if (m.src[j] != 'f' && m.src[j] != 'F') np += m.src[j];
            anchors.push_back({(long)out.size(), (long)ps, false});
            out += np + quote + lit + quote;
            if (!exprs.empty()) {
                out += ".format(";
                for (size_t x = 0; x < exprs.size(); x++) {
                    if (x) {
                        anchors.push_back({(long)out.size(), (long)ps, false});
                        out += ", ";
                    }
                    anchors.push_back({(long)out.size(), (long)exprs[x].first, true});
                    out += exprs[x].second;
                }
                anchors.push_back({(long)out.size(), (long)col(body_end), false});
                out += ")";
            }
            copied = col(t->end);
        }
        flush(s.size());
        lines[li] = out;
        sm.cols[li + 1] = anchors;
    }
}

// The column of the rewritten line (1-based line) that holds the written
// column col0 (both 0-based), through sm.cols.
long rewritten_col(const SourceMap &sm, long line, long col0) {
    auto it = sm.cols.find(line);
    if (it == sm.cols.end()) return col0;
    const std::vector<ColAnchor> &a = it->second;
    long best = col0;
    for (size_t i = 0; i < a.size(); i++)
        if (a[i].linear && a[i].from <= col0) best = a[i].to + (col0 - a[i].from);
    return best;
}

Prep preprocess(SourceMap &sm, const PyModel &m) {
    Prep p;
    p.code_lines = sm.lines;
    auto blank = [&](long a, long b) {
        for (long i = a; i <= b && i < (long)p.code_lines.size(); i++)
            p.code_lines[i].clear();
    };
    auto at = [&](long line0, long col0, int status, const std::string &msg) {
        Loc loc;
        loc.line = line0 + 1;
        loc.col = col0 + 1;
        fail(status, sm.format(loc, msg));
    };
    // A statement whose first line holds only indentation and a backslash:
    // CPython indents the statement as it does (pysource.h), TorchScript's
    // lexer by what comes before the backslash; they disagree.
    for (long i = 0; i < m.nlines; i++)
        if (m.lines[i].flags & FMX_PY_LINE_BACKSLASH_INDENT)
            at(m.lines[i].first - 1, 0, FMX_ECOMPILE,
               "a line that starts with a backslash continuation is not allowed (Python and "
               "TorchScript can indent the statement after it differently): join the lines");
    rewrite_fstrings(m, p.code_lines, sm);
    p.rewritten = p.code_lines;
    std::set<std::string> seen_const;
    for (long bi = 0; bi < m.nblocks; bi++) {
        const fmx_py_block &b = m.blocks[bi];
        const fmx_py_line &first = m.lines[b.line];
        const long a0 = first.first - 1, a1 = m.lines[b.line + b.nlines - 1].last - 1;
        const fmx_py_token *t0 = fmx_pysource_first_code(m.ps, b.line);
        if (first.indent > 0) at(t0->line - 1, t0->col, FMX_ECOMPILE, "unexpected indent");
        if (m.is(*t0, FMX_PY_OP, "@"))
            at(t0->line - 1, t0->col, FMX_EFORBIDDEN,
               "decorators are not allowed in candidate code: write plain functions");
        auto not_allowed = [&]() {
            if (m.is(*t0, FMX_PY_NAME, "async"))
                at(t0->line - 1, t0->col, FMX_EFORBIDDEN,
                   "async functions are not allowed in candidate code");
            at(t0->line - 1, t0->col, FMX_EFORBIDDEN,
               "statement not allowed at top level: a candidate file holds imports, constants "
               "(NAME = value) and def functions");
        };
        bool simple = b.kind == FMX_PY_BLOCK_IMPORT || b.kind == FMX_PY_BLOCK_STRINGS ||
                      b.kind == FMX_PY_BLOCK_ASSIGN;
        if (simple && b.nlines > 1) { // lines indented under a simple statement
            const fmx_py_token *t1 = fmx_pysource_first_code(m.ps, b.line + 1);
            at(t1->line - 1, t1->col, FMX_ECOMPILE, "unexpected indent");
        }
        switch (b.kind) {
        case FMX_PY_BLOCK_IMPORT: {
            if (!check_import(m, m.code(b.line), p.modules)) {
                // the statement on one line, spaced as written
                std::string one;
                const fmx_py_token *prev = nullptr;
                for (const fmx_py_token *t : m.code(b.line)) {
                    if (prev && prev->end != t->start) one += ' ';
                    one += m.text(*t);
                    prev = t;
                }
                at(a0, 0, FMX_EFORBIDDEN,
                   "import not allowed: '" + one + "' (allowed: " + k_allowed_imports + ")");
            }
            blank(a0, a1);
            break;
        }
        case FMX_PY_BLOCK_STRINGS: // a docstring
            blank(a0, a1);
            break;
        case FMX_PY_BLOCK_MAIN:
            blank(a0, a1);
            break;
        case FMX_PY_BLOCK_DEF: {
            const fmx_py_token &name = m.tok[b.name];
            if (b.is_async)
                at(t0->line - 1, t0->col, FMX_EFORBIDDEN,
                   "async functions are not allowed in candidate code");
            if (m.is(name, FMX_PY_NAME, "tap"))
                blank(a0, a1); // fmx supplies tap
            else if (starts_with(m.text(name), "__fmx"))
                at(name.line - 1, name.col, FMX_ECOMPILE, "names starting with __fmx are reserved");
            break;
        }
        case FMX_PY_BLOCK_CLASS:
            at(t0->line - 1, t0->col, FMX_EFORBIDDEN,
               "classes are not allowed in candidate code: write plain functions and pass "
               "weights in a Dict[str, Tensor]");
            break;
        case FMX_PY_BLOCK_ASSIGN: {
            // NAME = expression, or NAME: annotation = expression
            std::vector<const fmx_py_token *> code = m.code(b.line);
            size_t eq = 1;
            if (m.is(*code[1], FMX_PY_OP, ":")) {
                int depth = 0;
                for (eq = 2; eq < code.size(); eq++) {
                    std::string s = m.text(*code[eq]);
                    if (s == "(" || s == "[" || s == "{") depth++;
                    if ((s == ")" || s == "]" || s == "}") && depth > 0) depth--;
                    if (depth == 0 && s == "=") break;
                }
            }
            if (eq >= code.size()) not_allowed(); // an annotation alone
            {
                Constant c;
                c.name = m.text(*code[0]);
                c.first = (int)a0;
                c.last = (int)a1;
                const fmx_py_token *e = eq + 1 < code.size() ? code[eq + 1] : nullptr;
                long eline = e ? e->line : code[eq]->line;
                long ecol = e ? e->col : code[eq]->col + 1;
                c.expr_line = (int)eline - 1;
                c.expr_col = (size_t)rewritten_col(sm, eline, ecol);
                // the comments of its lines (the model's), at their rewritten columns
                std::map<long, long> comment_at; // 0-based line → column
                const fmx_py_line &ll = m.lines[b.line];
                for (long k = ll.tok; k < ll.tok + ll.ntok; k++)
                    if (m.tok[k].kind == FMX_PY_COMMENT)
                        comment_at[m.tok[k].line - 1] =
                            rewritten_col(sm, m.tok[k].line, m.tok[k].col);
                for (long li = eline - 1; li <= a1; li++) {
                    std::string l = p.rewritten[li];
                    auto cm = comment_at.find(li);
                    if (cm != comment_at.end()) l.resize(std::min(l.size(), (size_t)cm->second));
                    c.code.push_back(l);
                }
                if (c.expr_col > c.code[0].size()) c.expr_col = c.code[0].size();
                if (seen_const.count(c.name))
                    at(a0, 0, FMX_ECOMPILE, "constant '" + c.name + "' is assigned twice");
                seen_const.insert(c.name);
                p.constants.push_back(c);
                blank(a0, a1);
            }
            break;
        }
        default:
            not_allowed();
        }
    }
    return p;
}

/* ------------------------------------------------------------------------ */
/* the F prelude                                                            */
/* ------------------------------------------------------------------------ */

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

// Parses source into Defs (throws ErrorReport on syntax errors).
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

/* ------------------------------------------------------------------------ */
/* the op allowlist                                                         */
/* ------------------------------------------------------------------------ */

const char *k_prim_ops = R"(
Constant ListConstruct ListUnpack TupleConstruct TupleUnpack TupleIndex TupleSlice
DictConstruct DictIndex If Loop unchecked_cast unchecked_unwrap_optional RaiseException
Uninitialized NumToTensor ImplicitTensorToNum dtype device layout min max abs isinstance
is_cuda is_cpu is_xpu is_meta is_mps is_sparse is_quantized is_mkldnn is_nested
requires_grad index tolist StringIndex rangelist
)";

const char *k_aten_ops = R"(
__getitem__ __contains__ __not__ __and__ __or__ __xor__ __is__ __isnot__ __range_length
__derive_index __round_to_zero_floordiv __lshift__ __rshift__ __interpolate __upsample
len list dict keys values items get setdefault pop popitem update clear copy append extend
insert remove index count reverse sort sorted _set_item Delete slice select format join
split strip lstrip rstrip lower upper startswith endswith replace find rfind isdigit isalpha
isspace isalnum islower isupper capitalize title splitlines
partition rpartition str Int Float Bool Complex ScalarImplicit IntImplicit FloatImplicit
ComplexImplicit percentFormat ord chr bin hash floordiv divmod mathremainder gcd factorial
copysign degrees radians modf frexp ldexp fabs
dim numel size stride is_floating_point is_complex is_contiguous element_size item
result_type can_cast promote_types
add sub subtract rsub mul multiply div divide true_divide floor_divide remainder fmod neg
negative pow float_power abs absolute reciprocal sign sgn signbit sqrt rsqrt square exp exp2
expm1 log log2 log10 log1p sin cos tan asin acos atan atan2 arctan2 sinh cosh tanh asinh
acosh atanh erf erfc erfinv lgamma digamma gamma floor ceil round trunc frac fix lerp addcmul
addcdiv hypot logaddexp logaddexp2 xlogy sinc nan_to_num deg2rad rad2deg heaviside clamp
clamp_min clamp_max clip maximum minimum fmax fmin
eq ne lt le gt ge greater greater_equal less less_equal not_equal equal isclose allclose
isnan isinf isfinite isposinf isneginf isreal logical_and logical_or logical_not logical_xor
bitwise_and bitwise_or bitwise_xor bitwise_not bitwise_left_shift bitwise_right_shift
sum mean prod amax amin aminmax max min argmax argmin std var std_mean var_mean logsumexp
logcumsumexp cumsum cumprod cummax cummin median nanmedian mode nansum nanmean all any
count_nonzero norm frobenius_norm renorm dist cdist cosine_similarity pairwise_distance
matmul mm bmm mv dot vdot inner outer ger addmm addmv addbmm baddbmm addr linear bilinear
einsum tensordot kron chain_matmul cross trace
view view_as reshape reshape_as flatten unflatten squeeze unsqueeze transpose t permute
movedim moveaxis swapaxes swapdims contiguous clone detach expand expand_as broadcast_to
broadcast_tensors repeat repeat_interleave tile cat concat concatenate stack hstack vstack
dstack chunk unsafe_chunk split_with_sizes unsafe_split tensor_split unbind narrow
index_select gather take take_along_dim masked_fill masked_select masked_scatter where triu
tril scatter scatter_add scatter_reduce index_put index_add index_copy index_fill
select_scatter slice_scatter diagonal_scatter diagonal diag diag_embed roll flip fliplr
flipud rot90 unfold nonzero argwhere topk argsort kthvalue searchsorted bucketize one_hot
embedding unique_consecutive diff histc bincount block_diag cartesian_prod meshgrid
softmax log_softmax relu relu6 gelu silu sigmoid hardtanh hardsigmoid hardswish mish elu
selu celu leaky_relu prelu rrelu softplus softshrink hardshrink threshold glu log_sigmoid
logit layer_norm group_norm batch_norm instance_norm dropout feature_dropout alpha_dropout
scaled_dot_product_attention
conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution
avg_pool1d avg_pool2d avg_pool3d max_pool1d max_pool2d max_pool3d adaptive_avg_pool1d
adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
pixel_shuffle pixel_unshuffle upsample_nearest1d upsample_nearest2d upsample_nearest3d
upsample_linear1d upsample_bilinear2d upsample_bicubic2d upsample_trilinear3d pad
constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d
replication_pad2d replication_pad3d
zeros ones full empty arange linspace logspace eye zeros_like ones_like full_like empty_like
rand randn randint rand_like randn_like randint_like randperm normal bernoulli multinomial
tensor as_tensor scalar_tensor new_zeros new_ones new_full new_empty tril_indices
triu_indices polar complex view_as_real view_as_complex real imag conj angle
to type_as cpu numpy_T rms_norm
)";

std::unordered_set<std::string> word_set(const char *words, const char *ns) {
    std::unordered_set<std::string> s;
    std::stringstream ss(words);
    std::string w;
    while (ss >> w)
        s.insert(std::string(ns) + "::" + w);
    return s;
}

const std::unordered_set<std::string> &allowed_ops() {
    static const std::unordered_set<std::string> s = [] {
        auto a = word_set(k_prim_ops, "prim");
        auto b = word_set(k_aten_ops, "aten");
        a.insert(b.begin(), b.end());
        a.insert("fmx::tap");
        return a;
    }();
    return s;
}

// Ops refused with their own explanation (not just "not in the allowlist").
const std::map<std::string, std::string> &refused_ops() {
    static const std::map<std::string, std::string> m = {
        {"aten::from_file", "torch.from_file reads files: not allowed in candidate code"},
        {"aten::save", "torch.save writes files: not allowed in candidate code"},
        {"aten::load", "torch.load reads files: not allowed in candidate code"},
        {"prim::Print",
         "print() is not allowed in candidate code (use tap(name, x) to record a value)"},
        {"prim::fork", "fork() (asynchronous execution) is not allowed in candidate code"},
        {"aten::wait", "wait() (asynchronous execution) is not allowed in candidate code"},
        {"prim::CallMethod", "method calls on objects are not allowed in candidate code"},
        {"prim::PythonOp", "calls into Python are not allowed in candidate code"},
        {"prim::CallFunction", "indirect function calls are not allowed in candidate code"},
        {"aten::manual_seed", "torch.manual_seed changes global state: not allowed"},
        {"aten::warn", "warnings are not allowed in candidate code"},
        {"prim::SetAttr", "attribute assignment is not allowed in candidate code"},
        {"prim::GetAttr", "objects with attributes are not allowed in candidate code"},
    };
    return m;
}

bool type_has_tensor(const c10::TypePtr &t) {
    if (t->kind() == c10::TypeKind::TensorType) return true;
    for (const c10::TypePtr &c : t->containedTypes())
        if (type_has_tensor(c)) return true;
    return false;
}

bool is_constant_bool(torch::jit::Value *v, bool want) {
    c10::optional<c10::IValue> iv = torch::jit::toIValue(v);
    return iv && iv->isBool() && iv->toBool() == want;
}

bool is_none(torch::jit::Value *v) {
    return v->type()->kind() == c10::TypeKind::NoneType;
}

bool has_calls(torch::jit::Block *b) {
    for (Node *n : b->nodes()) {
        if (n->kind() == c10::prim::CallFunction) return true;
        for (torch::jit::Block *sub : n->blocks())
            if (has_calls(sub)) return true;
    }
    return false;
}

// A copy of fn's graph with every call inlined. Inline() inlines one level of
// the unoptimised graphs we keep, so repeat it (TorchScript refuses
// recursion: the depth is bounded by the number of functions). Call it with
// the optimiser off (RunGuards), as every graph here was compiled.
// At most this many nodes in a function's graph with every call inlined: a
// few helpers that each call the next twice inline to 2^depth copies (25
// levels, a 30-line file: 33 million nodes, minutes and gigabytes). A real
// model, loops kept as loops, inlines to a few thousand.
constexpr size_t k_max_inlined_nodes = 200000;

size_t inlined_size(torch::jit::Function *fn,
                    std::unordered_map<torch::jit::Function *, size_t> &memo);

// Nodes of b and its sub-blocks, every call counted as its callee's inlined
// size; saturates just above the limit.
size_t block_size(torch::jit::Block *b, std::unordered_map<torch::jit::Function *, size_t> &memo) {
    size_t n = 0;
    for (Node *node : b->nodes()) {
        n++;
        if (node->kind() == c10::prim::CallFunction)
            if (auto ft = node->input(0)->type()->cast<c10::FunctionType>())
                n += inlined_size(ft->function(), memo);
        for (torch::jit::Block *sub : node->blocks())
            n += block_size(sub, memo);
        if (n > k_max_inlined_nodes) return k_max_inlined_nodes + 1;
    }
    return n;
}

// Calls form a DAG (TorchScript refuses recursion), so the memo ends it.
size_t inlined_size(torch::jit::Function *fn,
                    std::unordered_map<torch::jit::Function *, size_t> &memo) {
    auto it = memo.find(fn);
    if (it != memo.end()) return it->second;
    size_t n = block_size(torch::jit::toGraphFunction(*fn).graph()->block(), memo);
    memo[fn] = n;
    return n;
}

std::shared_ptr<torch::jit::Graph> inlined_graph(torch::jit::Function *fn) {
    std::unordered_map<torch::jit::Function *, size_t> memo;
    if (inlined_size(fn, memo) > k_max_inlined_nodes)
        fail(FMX_ECOMPILE, "function '" + fn->name() + "' inlines to more than " +
                               std::to_string(k_max_inlined_nodes) +
                               " operations (helpers that call helpers several times each "
                               "multiply): use loops instead of repeated calls");
    std::shared_ptr<torch::jit::Graph> g = torch::jit::toGraphFunction(*fn).graph()->copy();
    for (int depth = 0; depth < 1000 && has_calls(g->block()); depth++)
        torch::jit::Inline(*g);
    return g;
}

// The input of n bound to the schema argument called name, or null.
torch::jit::Value *input_named(Node *n, const char *name) {
    const c10::FunctionSchema *s = n->maybeSchema();
    if (!s) return nullptr;
    const auto &args = s->arguments();
    for (size_t i = 0; i < args.size() && i < n->inputs().size(); i++)
        if (args[i].name() == name) return n->input(i);
    return nullptr;
}

struct OpWalker {
    const SourceMap &sm;

    // The innermost source range in the candidate's own file: inlined nodes
    // carry the call sites that led to them.
    Loc node_loc(Node *n) const {
        std::vector<SourceRange> ranges;
        if (auto cs = n->callstack()) {
            torch::jit::InlinedCallStackPtr c = *cs;
            while (true) {
                ranges.push_back(c->source_range());
                auto next = c->callee();
                if (!next) break;
                c = *next;
            }
        }
        ranges.push_back(n->sourceRange());
        for (auto it = ranges.rbegin(); it != ranges.rend(); ++it)
            if (sm.ours(*it)) return sm.loc_of(*it);
        return Loc();
    }

    [[noreturn]] void deny(Node *n, const std::string &msg) const {
        fail(FMX_EFORBIDDEN, sm.format(node_loc(n), msg));
    }

    void check(Node *n) const {
        const std::string name = n->kind().toQualString();
        auto ref = refused_ops().find(name);
        if (ref != refused_ops().end()) deny(n, ref->second);
        const std::string ns = name.substr(0, name.find("::"));
        if (ns != "aten" && ns != "prim" && ns != "fmx")
            deny(n, "operator " + name +
                        " is not allowed: candidate code may call torch.*, F.*, Tensor methods "
                        "and tap(), not torch.ops");
        if (const c10::FunctionSchema *s = n->maybeSchema()) {
            for (const c10::Argument &a : s->arguments()) {
                const c10::AliasInfo *ai = a.alias_info();
                if (ai && ai->isWrite() && type_has_tensor(a.type()))
                    deny(n, "in-place operation " + name +
                                " modifies a tensor: candidate code must be functional (write "
                                "`x = x + y`, not `x += y`; use torch.where / masked_fill / "
                                "index_put, not `x[i] = v`)");
            }
        }
        if (!allowed_ops().count(name))
            deny(n, "operator " + name + " is not in the candidate language's allowlist");
        // Ops that crash or never return on some arguments in libtorch 1.13:
        // refused where those arguments are possible.
        if (n->kind() == c10::Symbol::aten("searchsorted")) {
            // sorter's indices are not bounds-checked: an out-of-range one
            // reads outside the tensor and crashes the process.
            torch::jit::Value *sorter = input_named(n, "sorter");
            if (sorter && !is_none(sorter))
                deny(n, "torch.searchsorted with sorter= is not allowed (its indices are not "
                        "checked in this libtorch and can crash the process): sort the sequence "
                        "first, e.g. torch.sort(seq).values");
        }
        if ((n->kind() == c10::Symbol::aten("replace") ||
             n->kind() == c10::Symbol::aten("count")) &&
            n->inputs().size() >= 2 && n->input(0)->type()->kind() == c10::TypeKind::StringType) {
            // str.replace("", ...) and str.count("") loop forever.
            c10::optional<c10::IValue> sub = torch::jit::toIValue(n->input(1));
            if (!sub || !sub->isString() || sub->toStringRef().empty())
                deny(n, std::string("str.") + n->kind().toUnqualString() +
                            " needs a constant, non-empty substring in candidate code (an empty "
                            "one never returns)");
        }
        // Norms that update running statistics in place when training.
        if (n->kind() == c10::Symbol::aten("batch_norm") && n->inputs().size() >= 6) {
            if (!is_constant_bool(n->input(5), false) &&
                !(is_none(n->input(3)) && is_none(n->input(4))))
                deny(n, "batch_norm with training=True and running statistics updates them in "
                        "place: pass training=False (or no running statistics)");
        }
        if (n->kind() == c10::Symbol::aten("instance_norm") && n->inputs().size() >= 6) {
            if (!is_constant_bool(n->input(5), false) &&
                !(is_none(n->input(3)) && is_none(n->input(4))))
                deny(n, "instance_norm with use_input_stats=True and running statistics "
                        "updates them in place: not allowed");
        }
    }

    void walk(torch::jit::Block *b) const {
        for (Node *n : b->nodes()) {
            check(n);
            for (torch::jit::Block *sub : n->blocks())
                walk(sub);
        }
    }

    // Walks a copy of fn's graph with every call inlined.
    void walk_function(torch::jit::Function *fn) const {
        std::shared_ptr<torch::jit::Graph> g;
        try {
            g = inlined_graph(fn);
        } catch (const FmxError &e) {
            fail(e.status, sm.filename + ": " + e.msg);
        }
        walk(g->block());
    }
};

/* ------------------------------------------------------------------------ */
/* compile facts: host syncs and data-dependent control flow                */
/* ------------------------------------------------------------------------ */

// An op that reads tensor values on the host: into a Python number, list,
// bool or string, or into the shape of its result.
struct SyncOp {
    const char *kind;
    const char *name; // as the candidate wrote it
    const char *what;
};

// clang-format off
const SyncOp k_sync_ops[] = {
    {"aten::item", ".item()", "moves a tensor value to the host"},
    {"aten::tolist", ".tolist()", "moves tensor values to the host"},
    {"prim::tolist", ".tolist()", "moves tensor values to the host"},
    {"aten::Int", "int(tensor)", "moves a tensor value to the host"},
    {"aten::IntImplicit", "a tensor used as an int", "moves its value to the host"},
    {"aten::Float", "float(tensor)", "moves a tensor value to the host"},
    {"aten::FloatImplicit", "a tensor used as a float", "moves its value to the host"},
    {"aten::Complex", "complex(tensor)", "moves a tensor value to the host"},
    {"aten::ComplexImplicit", "a tensor used as a complex", "moves its value to the host"},
    {"aten::Bool", "a tensor used as a bool", "moves its value to the host"},
    {"aten::ScalarImplicit", "a tensor used as a number", "moves its value to the host"},
    {"prim::ImplicitTensorToNum", "a tensor used as a number", "moves its value to the host"},
    {"aten::is_nonzero", "is_nonzero()", "moves a tensor value to the host"},
    {"aten::equal", "torch.equal", "computes a Python bool from tensor values on the host"},
    {"aten::allclose", "torch.allclose", "computes a Python bool from tensor values on the host"},
    {"aten::format", "formatting a tensor", "reads its values on the host"},
    {"aten::str", "str(tensor)", "reads its values on the host"},
    {"aten::percentFormat", "formatting a tensor", "reads its values on the host"},
    {"aten::nonzero", "nonzero", "has a shape that depends on tensor values (a host sync)"},
    {"aten::nonzero_numpy", "nonzero", "has a shape that depends on tensor values (a host sync)"},
    {"aten::argwhere", "argwhere", "has a shape that depends on tensor values (a host sync)"},
    {"aten::masked_select", "masked_select", "has a shape that depends on tensor values (a host sync)"},
    {"aten::unique_consecutive", "unique_consecutive", "has a shape that depends on tensor values (a host sync)"},
    {"aten::unique_dim_consecutive", "unique_consecutive", "has a shape that depends on tensor values (a host sync)"},
    {"aten::_unique", "unique", "has a shape that depends on tensor values (a host sync)"},
    {"aten::_unique2", "unique", "has a shape that depends on tensor values (a host sync)"},
    {"aten::unique_dim", "unique", "has a shape that depends on tensor values (a host sync)"},
    {"aten::bincount", "bincount", "has a length that depends on tensor values (a host sync)"},
};
// clang-format on

bool is_tensorish(torch::jit::Value *v) {
    return type_has_tensor(v->type());
}

// Whether the constant v is the dtype torch.bool.
bool is_bool_dtype(torch::jit::Value *v) {
    c10::optional<c10::IValue> iv = torch::jit::toIValue(v);
    return iv && iv->isInt() && iv->toInt() == (int64_t)at::kBool;
}

// Whether v is certainly a bool tensor: a comparison, a logical op, a cast
// to torch.bool or a tensor made with dtype=torch.bool, and what keeps a
// mask a mask (&, |, ^, ~ of masks; views, copies and shape changes of one;
// an If or torch.where choosing between masks). depth bounds the walk.
bool is_bool_mask(torch::jit::Value *v, int depth = 0) {
    static const std::unordered_set<std::string> k_bool = {
        "aten::eq",          "aten::ne",         "aten::lt",
        "aten::le",          "aten::gt",         "aten::ge",
        "aten::logical_and", "aten::logical_or", "aten::logical_not",
        "aten::logical_xor", "aten::isnan",      "aten::isinf",
        "aten::isfinite",    "aten::isposinf",   "aten::isneginf",
        "aten::greater",     "aten::less",       "aten::greater_equal",
        "aten::less_equal",  "aten::not_equal",
    };
    // bool when every tensor operand is
    static const std::unordered_set<std::string> k_keeps = {
        "aten::__and__",        "aten::__or__",     "aten::__xor__",     "aten::__invert__",
        "aten::bitwise_and",    "aten::bitwise_or", "aten::bitwise_xor", "aten::bitwise_not",
        "aten::contiguous",     "aten::clone",      "aten::detach",      "aten::view",
        "aten::reshape",        "aten::expand",     "aten::expand_as",   "aten::transpose",
        "aten::permute",        "aten::squeeze",    "aten::unsqueeze",   "aten::flatten",
        "aten::select",         "aten::slice",      "aten::narrow",      "aten::t",
        "aten::repeat",         "aten::flip",       "aten::roll",        "aten::movedim",
        "prim::unchecked_cast",
    };
    if (depth > 64 || v->type()->kind() != c10::TypeKind::TensorType) return false;
    Node *n = v->node();
    const std::string k = n->kind().toQualString();
    if (k_bool.count(k)) return n->outputs().size() == 1;
    if (k == "aten::to" || k == "aten::type") {
        for (size_t i = 1; i < n->inputs().size(); i++)
            if (is_bool_dtype(n->input(i))) return true;
        return false;
    }
    if (torch::jit::Value *dt = input_named(n, "dtype"))
        if (is_bool_dtype(dt)) return true; // torch.zeros(..., dtype=torch.bool)
    if (k == "prim::If") {
        size_t i = v->offset();
        for (torch::jit::Block *b : n->blocks())
            if (!is_bool_mask(b->outputs()[i], depth + 1)) return false;
        return true;
    }
    if (k == "aten::where" && n->inputs().size() == 3)
        return is_bool_mask(n->input(1), depth + 1) && is_bool_mask(n->input(2), depth + 1);
    if (!k_keeps.count(k) || n->inputs().empty()) return false;
    bool binary = k == "aten::__and__" || k == "aten::__or__" || k == "aten::__xor__" ||
                  k == "aten::bitwise_and" || k == "aten::bitwise_or" || k == "aten::bitwise_xor";
    if (!binary) return is_bool_mask(n->input(0), depth + 1); // a view or copy of its first operand
    for (torch::jit::Value *in : n->inputs())
        if (in->type()->kind() == c10::TypeKind::TensorType && !is_bool_mask(in, depth + 1))
            return false;
    return true;
}

// The value of the int v when it is known without running: a constant, or
// +, -, *, // and unary - of known ints. depth bounds the walk.
c10::optional<int64_t> known_int(torch::jit::Value *v, int depth = 0) {
    if (depth > 32) return c10::nullopt;
    c10::optional<c10::IValue> iv = torch::jit::toIValue(v);
    if (iv) return iv->isInt() ? c10::optional<int64_t>(iv->toInt()) : c10::nullopt;
    Node *n = v->node();
    const std::string k = n->kind().toQualString();
    if (k == "aten::neg" && n->inputs().size() == 1) {
        auto a = known_int(n->input(0), depth + 1);
        return a ? c10::optional<int64_t>(-*a) : c10::nullopt;
    }
    if (n->inputs().size() != 2) return c10::nullopt;
    auto a = known_int(n->input(0), depth + 1), b = known_int(n->input(1), depth + 1);
    if (!a || !b) return c10::nullopt;
    if (k == "aten::add") return *a + *b;
    if (k == "aten::sub") return *a - *b;
    if (k == "aten::mul") return *a * *b;
    if (k == "aten::floordiv" && *b != 0)
        return *a / *b - ((*a % *b != 0) && ((*a < 0) != (*b < 0)));
    return c10::nullopt;
}

// Whether the int v is certainly >= 0 without running: a known one, a size
// read from a shape (x.shape[i], x.size(i), len, dim, numel), or +, * and //
// of such ints.
bool nonneg_int(torch::jit::Value *v, int depth = 0) {
    if (depth > 32) return false;
    if (c10::optional<int64_t> c = known_int(v)) return *c >= 0;
    Node *n = v->node();
    const std::string k = n->kind().toQualString();
    if (k == "aten::size" || k == "aten::len" || k == "aten::dim" || k == "aten::numel")
        return true;
    if (k == "aten::__getitem__" && n->inputs().size() == 2) {
        const std::string l = n->input(0)->node()->kind().toQualString();
        return l == "aten::size" || l == "prim::shape";
    }
    if ((k == "aten::add" || k == "aten::mul" || k == "aten::floordiv") && n->inputs().size() == 2)
        return nonneg_int(n->input(0), depth + 1) && nonneg_int(n->input(1), depth + 1);
    return false;
}

// Whether n is a host sync; *name and *what then describe it.
bool sync_op(Node *n, std::string *name, std::string *what) {
    const std::string k = n->kind().toQualString();
    bool tensor_in = false;
    for (torch::jit::Value *v : n->inputs())
        tensor_in |= is_tensorish(v);
    if (!tensor_in) return false; // int(3.5), bool(n > 1): plain numbers
    for (const SyncOp &s : k_sync_ops)
        if (k == s.kind) {
            *name = s.name;
            *what = s.what;
            return true;
        }
    const c10::FunctionSchema *schema = n->maybeSchema();
    const std::string overload = schema ? schema->overload_name() : "";
    const char *shape = "has a shape that depends on tensor values (a host sync)";
    if (k == "aten::repeat_interleave" && (overload == "Tensor" || overload == "self_Tensor")) {
        *name = "repeat_interleave with tensor repeats";
        *what = shape;
        return true;
    }
    if (k == "aten::where" && n->inputs().size() == 1) {
        *name = "torch.where(condition)";
        *what = shape;
        return true;
    }
    if (k == "aten::one_hot") {
        // num_classes=-1 (the default) is the largest value plus one
        torch::jit::Value *nc = input_named(n, "num_classes");
        if (!nc || !nonneg_int(nc)) {
            *name = "F.one_hot without num_classes (or with one that may be -1)";
            *what = "has a shape that depends on tensor values (a host sync)";
            return true;
        }
    }
    if ((k == "aten::narrow" || k == "aten::narrow_copy") && overload == "Tensor") {
        *name = "narrow with a tensor start";
        *what = "reads it on the host";
        return true;
    }
    if (k == "aten::tensor_split" && overload == "tensor_indices_or_sections") {
        *name = "tensor_split with tensor indices";
        *what = "reads them on the host";
        return true;
    }
    if ((k == "aten::index" || k == "aten::index_put") && n->inputs().size() >= 2) {
        Node *list = n->input(1)->node();
        if (list->kind() == c10::prim::ListConstruct)
            for (torch::jit::Value *ix : list->inputs())
                if (is_bool_mask(ix)) {
                    *name = "indexing with a boolean mask";
                    *what = k == "aten::index" ? shape : "finds the mask's positions on the host";
                    return true;
                }
    }
    return false;
}

// Ops whose result is a tensor's metadata: its shape, dims, element count.
bool shape_metadata(Node *n) {
    static const std::unordered_set<std::string> k = {
        "aten::size",          "aten::sym_size", "aten::dim",    "aten::numel",
        "aten::sym_numel",     "aten::len",      "aten::stride", "aten::sym_stride",
        "aten::is_contiguous", "prim::shape",
    };
    return k.count(n->kind().toQualString()) > 0;
}

// Finds the host syncs of an inlined graph, and the If/Loop nodes whose
// condition or trip count depends on tensor values. A value depends on
// tensor values when it reaches one through a sync: data dependence is
// propagated forward to a fixpoint (loops carry values around), through
// non-tensor values (ints, bools, lists), If/Loop outputs, containers
// mutated in place, and the shapes of tensors that a sync shaped (nonzero,
// masked_select): x.shape[0] is fine, x.nonzero().shape[0] is not.
// Metadata (size, dim, dtype, device) of an ordinary tensor never depends
// on its values.
struct FactsWalker {
    const SourceMap &sm;
    explicit FactsWalker(const SourceMap &s) : sm(s) {}
    // value → the sync it comes from. A non-tensor value: computed from tensor
    // values; a tensor: its shape depends on tensor values.
    std::unordered_map<torch::jit::Value *, Node *> dep;
    std::vector<Node *> syncs; // in graph order
    struct Flow {
        Node *n;
        const char *what; // "if condition", "loop condition", "loop trip count"
        Node *src;
    };
    std::vector<Flow> flows;
    std::unordered_set<Node *> flagged;
    // One per place in the candidate's code: a while condition is emitted
    // twice, a helper is inlined at every call.
    std::unordered_set<std::string> places;
    bool changed = false;
    bool first_pass = true;

    Node *src(torch::jit::Value *v) const {
        auto it = dep.find(v);
        return it == dep.end() ? nullptr : it->second;
    }
    void mark(torch::jit::Value *v, Node *s) {
        if (s && !dep.count(v)) {
            dep[v] = s;
            changed = true;
        }
    }
    void flag(Node *n, const char *what, Node *s) {
        if (flagged.insert(n).second && new_place(n)) flows.push_back({n, what, s});
    }
    bool new_place(Node *n) {
        std::stringstream key;
        key << n->kind().toQualString() << "@" << line_of(n);
        if (sm.ours(n->sourceRange()))
            key << ":" << sm.loc_of(n->sourceRange()).col;
        else
            key << "#" << (const void *)n; // no column to tell two apart
        return places.insert(key.str()).second;
    }

    void node(Node *n, Node *ctrl) {
        using torch::jit::Value;
        if (n->kind() == c10::prim::If) {
            Node *c = src(n->input(0));
            if (c) flag(n, "if condition", c);
            torch::jit::Block *b0 = n->blocks().at(0), *b1 = n->blocks().at(1);
            for (size_t i = 0; i < n->outputs().size(); i++) {
                Node *s = c ? c : src(b0->outputs()[i]);
                mark(n->output(i), s ? s : src(b1->outputs()[i]));
            }
            block(b0, c ? c : ctrl);
            block(b1, c ? c : ctrl);
            return;
        }
        if (n->kind() == c10::prim::Loop) {
            torch::jit::Block *body = n->blocks().at(0);
            Node *ct = src(n->input(0));
            Node *cc = src(n->input(1));
            if (!cc) cc = src(body->outputs()[0]);
            if (ct)
                flag(n, "loop trip count", ct);
            else if (cc)
                flag(n, "loop condition", cc);
            mark(body->inputs()[0], ct);
            for (size_t j = 0; j < n->outputs().size(); j++) {
                Node *s = src(n->input(j + 2));
                if (!s) s = src(body->outputs()[j + 1]);
                mark(body->inputs()[j + 1], s);
                if (!s) s = ct ? ct : cc;
                mark(n->output(j), s);
            }
            Node *c = ct ? ct : cc;
            block(body, c ? c : ctrl);
            return;
        }
        std::string name, what;
        if (sync_op(n, &name, &what)) {
            if (first_pass && new_place(n)) syncs.push_back(n);
            for (Value *o : n->outputs())
                mark(o, n);
            return;
        }
        for (torch::jit::Block *b : n->blocks())
            block(b, ctrl);
        Node *s_val = nullptr, *s_shape = nullptr;
        for (Value *v : n->inputs()) {
            Node *s = src(v);
            if (!s) continue;
            if (is_tensorish(v)) {
                if (!s_shape) s_shape = s;
            } else if (!s_val) {
                s_val = s;
            }
        }
        bool meta = shape_metadata(n);
        for (Value *o : n->outputs()) {
            if (is_tensorish(o))
                mark(o, s_shape ? s_shape : s_val);
            else
                mark(o, s_val ? s_val : (meta ? s_shape : nullptr));
        }
        // A list or dict changed in place takes on what is written into it,
        // and the condition it is written under.
        if (const c10::FunctionSchema *schema = n->maybeSchema()) {
            const auto &args = schema->arguments();
            for (size_t i = 0; i < args.size() && i < n->inputs().size(); i++) {
                const c10::AliasInfo *ai = args[i].alias_info();
                if (!ai || !ai->isWrite() || is_tensorish(n->input(i))) continue;
                Node *s = s_val ? s_val : (s_shape ? s_shape : ctrl);
                mark(n->input(i), s);
            }
        }
    }

    void block(torch::jit::Block *b, Node *ctrl) {
        for (Node *n : b->nodes())
            node(n, ctrl);
    }

    void run(torch::jit::Graph &g) {
        do {
            changed = false;
            block(g.block(), nullptr);
            first_pass = false;
        } while (changed);
    }

    long own_line(Node *n) const {
        return sm.ours(n->sourceRange()) ? sm.loc_of(n->sourceRange()).line : 0;
    }

    // The candidate's line of n. TorchScript emits a few nodes without a
    // source range (prim::tolist): those take the line between their located
    // neighbours that spells the op, else the line of the node before.
    long line_of(Node *n) const {
        long l = own_line(n);
        if (l > 0) return l;
        long lo = 0, hi = 0;
        Node *end = n->owningBlock()->return_node(); // the block's nodes are a ring through it
        for (Node *m = n->prev(); m != end && !lo; m = m->prev())
            lo = own_line(m);
        for (Node *m = n->next(); m != end && !hi; m = m->next())
            hi = own_line(m);
        if (!lo && n->owningBlock()->owningNode()) lo = own_line(n->owningBlock()->owningNode());
        static const c10::Symbol k_tolist = c10::Symbol::fromQualString("prim::tolist");
        const char *spelled = n->kind() == k_tolist ? ".tolist(" : nullptr;
        if (spelled && lo > 0 && hi >= lo)
            for (long k = lo; k <= hi && k <= (long)sm.lines.size(); k++)
                if (sm.lines[k - 1].find(spelled) != std::string::npos) return k;
        return lo > 0 ? lo : OpWalker{sm}.node_loc(n).line;
    }

    std::string at(long line) const {
        return line > 0 ? "line " + std::to_string(line) : "(line unknown)";
    }

    std::string describe(Node *sync) const {
        std::string name, what;
        sync_op(sync, &name, &what);
        return name + " " + what;
    }

    // The problem on the earliest line; on one line, control flow first.
    void first_problem(fmx_program_facts *out) const {
        auto rank = [](long l) { return l > 0 ? l : LONG_MAX; };
        long best = 0;
        bool any = false;
        std::string msg;
        for (const Flow &f : flows) {
            long l = line_of(f.n);
            if (any && rank(l) >= rank(best)) continue;
            any = true;
            best = l;
            std::string name, what;
            sync_op(f.src, &name, &what);
            msg = at(l) + ": " + f.what + " depends on tensor values (" + name + " at " +
                  at(line_of(f.src)) + ")";
        }
        for (Node *n : syncs) {
            long l = line_of(n);
            if (any && rank(l) >= rank(best)) continue;
            any = true;
            best = l;
            msg = at(l) + ": " + describe(n);
        }
        out->first_line = best > 0 ? (int)best : 0;
        set_err(out->first_problem, sizeof out->first_problem, msg);
    }
};

/* ------------------------------------------------------------------------ */
/* compiling                                                                */
/* ------------------------------------------------------------------------ */

std::string describe_type(const c10::IValue &v) {
    if (v.isInt()) return "an int";
    if (v.isDouble()) return "a float";
    if (v.isBool()) return "a bool";
    if (v.isString()) return "a str";
    if (v.isNone()) return "None";
    if (v.isTensor()) return "a Tensor";
    if (v.isTuple()) return "a tuple";
    if (v.isList()) return "a list";
    if (v.isGenericDict()) return "a dict";
    return "a " + v.type()->annotation_str();
}

bool constant_ok(const c10::IValue &v) {
    if (v.isInt() || v.isDouble() || v.isBool() || v.isString() || v.isNone()) return true;
    if (v.isTuple()) {
        for (const c10::IValue &e : v.toTupleRef().elements())
            if (!constant_ok(e)) return false;
        return true;
    }
    if (v.isList()) {
        for (const c10::IValue &e : v.toListRef())
            if (!constant_ok(e)) return false;
        return true;
    }
    return false;
}

// Evaluates each top-level constant in order as a one-line function that
// sees the constants before it.
std::shared_ptr<std::map<std::string, c10::IValue>>
eval_constants(SourceMap &sm, const Prep &p, const std::shared_ptr<FmxResolver> &base) {
    auto values = std::make_shared<std::map<std::string, c10::IValue>>();
    for (const Constant &c : p.constants) {
        // def __fmx_const():
        //     return (
        // <the expression, at its own lines and columns>)
        std::string text = "def __fmx_const():\n    return (\n";
        for (size_t i = 0; i < c.code.size(); i++) {
            std::string l = c.code[i];
            if (i == 0) l = std::string(c.expr_col, ' ') + l.substr(c.expr_col);
            text += l + (i + 1 == c.code.size() ? ")\n" : "\n");
        }
        Loc at;
        at.line = c.expr_line + 1;
        at.col = (long)c.expr_col + 1;
        // Line 2 of this text is the expression's first line (c.expr_line + 1).
        auto src = std::make_shared<Source>(text, sm.filename, (size_t)(c.expr_line + 1 - 2));
        auto r = std::make_shared<FmxResolver>(*base);
        r->constants = values;
        CompilationUnit cu;
        torch::jit::Function *fn = nullptr;
        try {
            std::vector<Def> defs = parse_defs(src);
            fn = cu.define(c10::nullopt, {}, {}, defs, {r}, nullptr).at(0);
        } catch (const ErrorReport &e) {
            throw from_report(sm, e);
        } catch (const std::runtime_error &e) { // the lexer's syntax errors
            fail(FMX_ECOMPILE, syntax_message(sm, e.what()));
        }
        OpWalker{sm}.walk_function(fn);
        c10::IValue v;
        try {
            torch::jit::Stack stack;
            fn->run(stack);
            v = stack.at(0);
        } catch (const c10::Error &e) {
            fail(FMX_ECOMPILE,
                 runtime_message(sm, c10_text(e), ("constant " + c.name + ": ").c_str()));
        } catch (const std::exception &e) {
            fail(FMX_ECOMPILE,
                 runtime_message(sm, e.what(), ("constant " + c.name + ": ").c_str()));
        }
        if (!constant_ok(v))
            fail(FMX_ECOMPILE, sm.format(at, "constant '" + c.name + "' is " + describe_type(v) +
                                                 ": top-level constants must be int, float, bool, "
                                                 "str, None, or tuples/lists of these"));
        (*values)[c.name] = v;
    }
    return values;
}

fmx_param_kind param_kind(const c10::TypePtr &t) {
    using c10::TypeKind;
    switch (t->kind()) {
    case TypeKind::TensorType:
        return FMX_PARAM_TENSOR;
    case TypeKind::IntType:
        return FMX_PARAM_INT;
    case TypeKind::FloatType:
        return FMX_PARAM_FLOAT;
    case TypeKind::BoolType:
        return FMX_PARAM_BOOL;
    case TypeKind::StringType:
        return FMX_PARAM_STR;
    case TypeKind::OptionalType:
        if (t->castRaw<c10::OptionalType>()->getElementType()->kind() == TypeKind::TensorType)
            return FMX_PARAM_OPT_TENSOR;
        return FMX_PARAM_OTHER;
    case TypeKind::ListType:
        if (t->castRaw<c10::ListType>()->getElementType()->kind() == TypeKind::TensorType)
            return FMX_PARAM_TENSOR_LIST;
        return FMX_PARAM_OTHER;
    case TypeKind::DictType: {
        auto *d = t->castRaw<c10::DictType>();
        if (d->getKeyType()->kind() == TypeKind::StringType &&
            d->getValueType()->kind() == TypeKind::TensorType)
            return FMX_PARAM_WEIGHTS;
        return FMX_PARAM_OTHER;
    }
    default:
        return FMX_PARAM_OTHER;
    }
}

// TorchScript's parser and emitter recurse once per nesting level of an
// expression or block: 10,000 nested brackets, 7,000 unary minuses or a
// chain of 10,000 `+ x` overflow an 8 MiB stack and kill the process. So,
// before it parses anything, on the text it will parse (f-string fields
// rewritten into code) read through the model (pysource.h): brackets at
// most 256 deep, at most 4,096 operator tokens (word operators, attribute
// dots and opening brackets included) in one statement (a flat list of
// numbers costs one, plus one per minus sign), blocks at most 100 deep.
// compile() also runs on a thread with a 64 MiB stack
// (compile_on_big_stack): an 8x margin.
constexpr int k_max_brackets = 256;
constexpr long k_max_statement_ops = 4096;
constexpr size_t k_max_blocks = 100;

void check_nesting(const std::string &filename, const std::string &src) {
    auto too_deep = [&](long line, const std::string &what) {
        fail(FMX_ECOMPILE, filename + ":" + std::to_string(line) + ": " + what +
                               ": TorchScript's parser could overflow its stack; split it "
                               "into statements and helper functions");
    };
    static const std::set<std::string> k_word_ops = {"and",  "or", "not", "if",
                                                     "else", "in", "is",  "lambda"};
    // The model (pysource.h) is built without recursion, whatever the depth.
    PyModel m(src.data(), src.size());
    std::vector<long> indents{0};
    for (long i = 0; i < m.nlines; i++) {
        const fmx_py_line &l = m.lines[i];
        const fmx_py_token *t0 = fmx_pysource_first_code(m.ps, i);
        while (indents.back() > l.indent)
            indents.pop_back();
        if (l.indent > indents.back()) indents.push_back(l.indent);
        if (indents.size() - 1 > k_max_blocks)
            too_deep(t0->line, "blocks nested more than " + std::to_string(k_max_blocks) + " deep");
        int depth = 0;
        long ops = 0;
        for (long k = l.tok; k < l.tok + l.ntok; k++) {
            const fmx_py_token &t = m.tok[k];
            if (t.kind == FMX_PY_NAME) {
                if (t.end - t.start <= 6 && k_word_ops.count(m.text(t))) ops++;
            } else if (t.kind == FMX_PY_OP || t.kind == FMX_PY_ERROR) {
                char c = t.end - t.start == 1 ? m.src[t.start] : 0;
                if (c == '(' || c == '[' || c == '{') {
                    ops++;
                    if (++depth > k_max_brackets)
                        too_deep(t.line, "brackets nested more than " +
                                             std::to_string(k_max_brackets) + " deep");
                } else if (c == ')' || c == ']' || c == '}') {
                    if (depth > 0) depth--;
                } else if (c == ';') {
                    if (depth == 0) ops = 0;
                } else if (c != ',') {
                    ops++;
                }
            }
            if (ops > k_max_statement_ops)
                too_deep(t.line, "more than " + std::to_string(k_max_statement_ops) +
                                     " operators in one statement");
        }
    }
}

std::unique_ptr<fmx_program> compile(const char *source, size_t len, const char *filename) {
    auto t0 = std::chrono::steady_clock::now();
    RunGuards guards;
    auto prog = std::make_unique<fmx_program>();
    SourceMap sm;
    sm.filename = filename && *filename ? filename : "<candidate>";
    {
        std::string text(source, len);
        size_t a = 0;
        while (true) {
            size_t b = text.find('\n', a);
            sm.lines.push_back(text.substr(a, b == std::string::npos ? std::string::npos : b - a));
            if (b == std::string::npos) break;
            a = b + 1;
        }
        for (std::string &l : sm.lines)
            if (!l.empty() && l.back() == '\r') l.pop_back();
    }
    // Text only: a control character other than tab and the line ending
    // (\n or \r\n) is refused. The lexer takes a lone \r, \v or \f for a
    // space where Python and the LOC counter see a line break or an indent,
    // so a file could compile as one thing and be counted as another.
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)source[i];
        if (c >= 0x20 || c == '\t' || c == '\n' ||
            (c == '\r' && i + 1 < len && source[i + 1] == '\n'))
            continue;
        long line = 1;
        size_t bol = 0;
        for (size_t k = 0; k < i; k++)
            if (source[k] == '\n') {
                line++;
                bol = k + 1;
            }
        // Not sm.format: it would echo the line, control character included.
        char where[64];
        snprintf(where, sizeof where, ":%ld:%zu: control character U+%04X", line, i - bol + 1, c);
        fail(FMX_ECOMPILE, sm.filename + where +
                               " is not allowed: a candidate file is text (tabs, printable "
                               "characters and \\n or \\r\\n line endings)");
    }
    prelude(); // compiled once, before any candidate needs it
    tl_forbidden = false;

    Prep p;
    {
        PyModel model(source, len);
        p = preprocess(sm, model);
    }
    {
        // the limits, on the text TorchScript will parse (f-string fields included)
        std::string all;
        for (const std::string &l : p.rewritten)
            all += l + "\n";
        check_nesting(sm.filename, all);
    }
    auto base = std::make_shared<FmxResolver>();
    base->modules = p.modules;
    auto consts = eval_constants(sm, p, base);
    auto r = std::make_shared<FmxResolver>(*base);
    r->constants = consts;

    std::string code;
    for (size_t i = 0; i < p.code_lines.size(); i++) {
        if (i) code += '\n';
        code += p.code_lines[i];
    }
    code += '\n';
    auto src = std::make_shared<Source>(code, sm.filename, 1);

    prog->cu = std::make_shared<CompilationUnit>();
    std::vector<torch::jit::Function *> fns;
    try {
        std::vector<Def> defs = parse_defs(src);
        std::set<std::string> names;
        for (const Def &d : defs) {
            std::string n = d.name().name();
            if (!names.insert(n).second)
                throw ErrorReport(d.name().range()) << "function '" << n << "' is defined twice";
            Loc at = sm.loc_of(d.name().range());
            prog->def_at[n] = {at.line, at.col};
        }
        std::vector<ResolverPtr> rs(defs.size(), r);
        fns = prog->cu->define(c10::nullopt, {}, {}, defs, rs, nullptr);
    } catch (const ErrorReport &e) {
        throw from_report(sm, e);
    } catch (const std::runtime_error &e) { // the lexer's syntax errors
        fail(FMX_ECOMPILE, syntax_message(sm, e.what()));
    }
    OpWalker walker{sm};
    for (torch::jit::Function *fn : fns) {
        walker.walk_function(fn);
        const std::string name = fn->name();
        prog->functions.push_back(name);
        std::vector<fmx_param_info> ps;
        for (const c10::Argument &a : fn->getSchema().arguments())
            ps.push_back({a.name(), param_kind(a.type()), a.default_value().has_value() ? 1 : 0});
        prog->params[name] = std::move(ps);
    }
    prog->sm = std::move(sm);
    prog->compile_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return prog;
}

/* ------------------------------------------------------------------------ */
/* comparing                                                                */
/* ------------------------------------------------------------------------ */

/* One element of a contiguous cpu tensor as a double. */
template <typename T> double elem(const void *base, int64_t i) {
    return static_cast<double>(static_cast<const T *>(base)[i]);
}

using elem_fn = double (*)(const void *, int64_t);

elem_fn elem_reader(at::ScalarType t) {
    switch (t) {
    case at::kDouble: return elem<double>;
    case at::kFloat: return elem<float>;
    case at::kHalf: return elem<at::Half>;
    case at::kBFloat16: return elem<at::BFloat16>;
    case at::kLong: return elem<int64_t>;
    case at::kInt: return elem<int32_t>;
    case at::kShort: return elem<int16_t>;
    case at::kChar: return elem<int8_t>;
    case at::kByte: return elem<uint8_t>;
    case at::kBool: return elem<bool>;
    default: return nullptr;
    }
}

/* The cpu path of compare: two passes over the data, no temporaries (the
 * tensor path below costs a dozen kernels and host syncs per output, which
 * dominates verify time for small models). keep_rows: (B*T) flags or empty;
 * inner = elements per (b, t) row. Returns false for dtypes it cannot read. */
bool compare_cpu(const at::Tensor &got_in, const at::Tensor &want_in, const at::Tensor &keep_rows,
                 int64_t inner, fmx_tolerance tol, fmx_compare_result *r) {
    at::Tensor got = got_in.contiguous(), want = want_in.contiguous();
    elem_fn rg = elem_reader(got.scalar_type()), rw = elem_reader(want.scalar_type());
    if (!rg || !rw) return false;
    const void *g = got.data_ptr(), *w = want.data_ptr();
    const bool *keep = keep_rows.defined() ? keep_rows.data_ptr<bool>() : nullptr;
    const int64_t n = want.numel();
    double ss = 0;
    int64_t n_sq = 0;
    for (int64_t i = 0; i < n; i++) {
        if (keep && !keep[i / inner]) continue;
        r->compared++;
        double v = rw(w, i);
        if (std::isfinite(v)) {
            ss += v * v;
            n_sq++;
        }
    }
    r->scale = std::max(n_sq > 0 ? std::sqrt(ss / (double)n_sq) : 0.0, 1e-30);
    double worst_excess = -INFINITY;
    int64_t worst = -1;
    r->max_abs = r->max_rel = r->compared ? -INFINITY : 0;
    for (int64_t i = 0; i < n; i++) {
        if (keep && !keep[i / inner]) continue;
        double a = rg(g, i), b = rw(w, i);
        bool fa = std::isfinite(a), fb = std::isfinite(b);
        double diff = fa && fb ? std::fabs(a - b) : INFINITY;
        double allow = tol.atol * r->scale + tol.rtol * std::fabs(b);
        if (!fa) r->nonfinite++;
        if (!(fa && fb && diff <= allow)) r->bad++;
        r->max_abs = std::max(r->max_abs, diff);
        r->max_rel = std::max(r->max_rel, diff / std::max(std::fabs(b), r->scale));
        double excess = fa && fb ? diff - allow : INFINITY;
        if (worst < 0 || excess > worst_excess) {
            worst_excess = excess;
            worst = i;
        }
    }
    r->pass = r->dtype_ok && r->bad == 0;
    r->worst_ndim = (int)want_in.dim();
    if (worst < 0) return true;
    r->worst_got = rg(g, worst);
    r->worst_want = rw(w, worst);
    int64_t flat = worst;
    for (int d = (int)want_in.dim() - 1; d >= 0; d--) {
        int64_t sz = want_in.size(d);
        r->worst[d] = sz ? flat % sz : 0;
        flat = sz ? flat / sz : 0;
    }
    return true;
}

void compare(const at::Tensor &got_in, const at::Tensor &want_in, const at::Tensor *mask_in,
             fmx_tolerance tol, fmx_compare_result *r) {
    memset(r, 0, sizeof *r);
    if (want_in.dim() > FMX_MAX_DIMS)
        fail(FMX_EINVAL,
             "cannot compare tensors of more than " + std::to_string(FMX_MAX_DIMS) + " dimensions");
    r->shape_ok = got_in.sizes().equals(want_in.sizes());
    r->dtype_ok = got_in.scalar_type() == want_in.scalar_type();
    if (!r->shape_ok) return;
    const at::Device dev = want_in.device();
    at::Tensor keep;
    if (mask_in) {
        at::Tensor mask = mask_in->to(dev);
        bool lead = mask.dim() >= 2 && mask.dim() <= want_in.dim();
        for (int64_t d = 0; lead && d < mask.dim(); d++)
            lead = mask.size(d) == want_in.size(d);
        if (!lead) {
            std::stringstream ss;
            ss << "mask has shape " << mask.sizes()
               << "; it must be (B, T) or the leading dims of outputs of shape " << want_in.sizes();
            fail(FMX_EINVAL, ss.str());
        }
        if (want_in.is_cpu() && got_in.is_cpu()) {
            at::Tensor rows = mask.ne(0).reshape({-1}).contiguous();
            int64_t inner = rows.numel() ? want_in.numel() / rows.numel() : 1;
            if (compare_cpu(got_in, want_in, rows, inner ? inner : 1, tol, r)) return;
        }
        std::vector<int64_t> shape(mask.sizes().begin(), mask.sizes().end());
        shape.resize(want_in.dim(), 1);
        keep = mask.ne(0).reshape(shape).expand(want_in.sizes()).reshape({-1});
    } else {
        if (want_in.is_cpu() && got_in.is_cpu() &&
            compare_cpu(got_in, want_in, at::Tensor(), 1, tol, r))
            return;
        keep = at::ones({want_in.numel()}, at::TensorOptions().dtype(at::kBool).device(dev));
    }
    // (N,) float64 on want's device
    at::Tensor got = got_in.to(dev, at::kDouble).reshape({-1});
    at::Tensor want = want_in.to(at::kDouble).reshape({-1});
    at::Tensor fin_g = got.isfinite(), fin_w = want.isfinite();
    r->compared = keep.sum().item<int64_t>();
    // scale: RMS of the finite graded reference values
    at::Tensor sq_mask = keep.logical_and(fin_w);
    int64_t n_sq = sq_mask.sum().item<int64_t>();
    double ss = at::where(sq_mask, want * want, at::zeros_like(want)).sum().item<double>();
    r->scale = std::max(n_sq > 0 ? std::sqrt(ss / (double)n_sq) : 0.0, 1e-30);
    at::Tensor both = fin_g.logical_and(fin_w);
    at::Tensor inf = at::full_like(want, INFINITY);
    at::Tensor diff = at::where(both, (got - want).abs(), inf);
    at::Tensor allow = tol.atol * r->scale + tol.rtol * want.abs();
    at::Tensor ok = both.logical_and(diff.le(allow));
    r->bad = keep.logical_and(ok.logical_not()).sum().item<int64_t>();
    r->nonfinite = keep.logical_and(fin_g.logical_not()).sum().item<int64_t>();
    r->pass = r->dtype_ok && r->bad == 0;
    r->worst_ndim = (int)want_in.dim();
    if (r->compared == 0) return;
    at::Tensor neg = at::full_like(want, -INFINITY);
    r->max_abs = at::where(keep, diff, neg).max().item<double>();
    at::Tensor denom = at::clamp_min(want.abs(), r->scale);
    r->max_rel = at::where(keep, diff / denom, neg).max().item<double>();
    // worst: the graded element furthest beyond its allowance
    at::Tensor excess = at::where(both, diff - allow, inf);
    excess = at::where(keep, excess, neg);
    int64_t flat = excess.argmax().item<int64_t>();
    r->worst_got = got[flat].item<double>();
    r->worst_want = want[flat].item<double>();
    for (int d = (int)want_in.dim() - 1; d >= 0; d--) {
        int64_t n = want_in.size(d);
        r->worst[d] = n ? flat % n : 0;
        flat = n ? flat / n : 0;
    }
}

} // namespace

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

namespace {

// compile() on a thread of its own with a 64 MiB stack (check_nesting keeps
// the recursion it needs within an eighth of that), whatever stack the
// caller's thread has; its exception, if any, is rethrown here. Runs inline
// when no thread can be made.
std::unique_ptr<fmx_program> compile_on_big_stack(const char *source, size_t len,
                                                  const char *filename) {
    struct Job {
        const char *source;
        size_t len;
        const char *filename;
        std::unique_ptr<fmx_program> out;
        std::exception_ptr error;
        static void *run(void *p) {
            Job *j = static_cast<Job *>(p);
            try {
                j->out = compile(j->source, j->len, j->filename);
            } catch (...) {
                j->error = std::current_exception();
            }
            return nullptr;
        }
    } job{source, len, filename, nullptr, nullptr};
    pthread_attr_t attr;
    pthread_t thread;
    bool threaded = pthread_attr_init(&attr) == 0;
    if (threaded) {
        threaded = pthread_attr_setstacksize(&attr, (size_t)64 << 20) == 0 &&
                   pthread_create(&thread, &attr, Job::run, &job) == 0;
        pthread_attr_destroy(&attr);
    }
    if (threaded)
        pthread_join(thread, nullptr);
    else
        Job::run(&job);
    if (job.error) std::rethrow_exception(job.error);
    return std::move(job.out);
}

} // namespace

extern "C" int fmx_program_compile(const char *source, size_t len, const char *filename,
                                   fmx_program **out, char *err, size_t errsz) {
    if (out) *out = nullptr;
    return guarded(err, errsz, FMX_ECOMPILE, [&] {
        if (!source || !out) fail(FMX_EINVAL, "NULL source or out");
        *out = compile_on_big_stack(source, len, filename).release();
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
        std::shared_ptr<torch::jit::Graph> g;
        {
            RunGuards guards;
            g = inlined_graph(f);
        }
        FactsWalker w(p->sm);
        w.run(*g);
        out->host_syncs = (int)w.syncs.size();
        out->data_dependent_flow = (int)w.flows.size();
        w.first_problem(out);
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

namespace {

// Moves a tensor to the run's device (a no-op when it is there already).
at::Tensor on_device(const at::Tensor &t, const at::Device &dev) {
    return t.device() == dev ? t : t.to(dev);
}

bool returns_tensors(const c10::TypePtr &t) {
    using c10::TypeKind;
    if (t->kind() == TypeKind::TensorType) return true;
    if (t->kind() == TypeKind::TupleType) { // Tensors, and lists of them (a decode step's cache)
        for (const c10::TypePtr &e : t->containedTypes())
            if (e->kind() != TypeKind::TensorType &&
                !(e->kind() == TypeKind::ListType &&
                  e->containedTypes().at(0)->kind() == TypeKind::TensorType))
                return false;
        return true;
    }
    if (t->kind() == TypeKind::ListType)
        return t->containedTypes().at(0)->kind() == TypeKind::TensorType;
    return false;
}

// The entry fn_name of p, with its def line for errors about the function as
// a whole; fails when it does not exist or does not return Tensors.
torch::jit::Function *entry(fmx_program *p, const char *fn_name, Loc *def_loc) {
    torch::jit::Function *fn = nullptr;
    for (const std::string &n : p->functions)
        if (n == fn_name) fn = p->cu->find_function(c10::QualifiedName(n));
    const SourceMap &sm = p->sm;
    if (!fn) fail(FMX_ENOTFOUND, std::string("no function '") + fn_name + "' in " + sm.filename);
    def_loc->line = p->def_at.at(fn_name).first;
    def_loc->col = p->def_at.at(fn_name).second;
    const c10::TypePtr &ret = fn->getSchema().returns().at(0).type();
    if (!returns_tensors(ret))
        fail(FMX_ERUNTIME,
             sm.format(*def_loc, std::string(fn_name) + "() returns " + ret->annotation_str() +
                                     "; the entry must return a Tensor or a tuple "
                                     "of Tensors (and lists of Tensors)"));
    return fn;
}

// The positional stack of a keyword call: arguments by name, defaults for
// the rest, a fresh weights dict every time. Records the storages of
// borrowed (caller-owned) cpu tensors in *borrowed.
torch::jit::Stack bind_stack(const c10::FunctionSchema &schema, const char *fn_name,
                             const fmx_args *a, const at::Device &dev,
                             std::unordered_set<const c10::StorageImpl *> *borrowed) {
    auto note = [&](const at::Tensor &t, bool b) {
        if (b && t.defined() && t.is_cpu()) borrowed->insert(t.storage().unsafeGetStorageImpl());
    };
    torch::jit::Stack stack;
    std::vector<bool> used(a ? a->items.size() : 0, false);
    for (const c10::Argument &arg : schema.arguments()) {
        const ArgVal *v = nullptr;
        for (size_t i = 0; a && i < a->items.size(); i++)
            if (a->items[i].first == arg.name()) {
                v = &a->items[i].second;
                used[i] = true;
            }
        if (!v) {
            if (!arg.default_value())
                fail(FMX_EINVAL, std::string(fn_name) + "() missing argument '" + arg.name() + "'");
            stack.push_back(*arg.default_value());
            continue;
        }
        if (v->kind == ARG_WEIGHTS) {
            // A fresh dict on every run: a candidate cannot change the next run's.
            c10::Dict<std::string, at::Tensor> d;
            for (const auto &kv : v->weights) {
                at::Tensor t = on_device(kv.second.t, dev);
                note(t, kv.second.borrowed);
                d.insert(kv.first, t);
            }
            stack.emplace_back(d);
            continue;
        }
        if (v->kind == ARG_TENSOR_LIST) { // fresh too: a candidate may append to it
            c10::List<at::Tensor> l;
            for (const auto &e : v->list) {
                at::Tensor t = on_device(e.t, dev);
                note(t, e.borrowed);
                l.push_back(t);
            }
            stack.emplace_back(l);
            continue;
        }
        c10::IValue iv = v->value;
        if (iv.isTensor()) {
            iv = on_device(iv.toTensor(), dev);
            note(iv.toTensor(), v->borrowed);
        }
        // Python passes an int where a float is declared.
        c10::TypePtr t = arg.type();
        if (auto o = t->cast<c10::OptionalType>()) t = o->getElementType();
        if (iv.isInt() && t->kind() == c10::TypeKind::FloatType) iv = (double)iv.toInt();
        stack.push_back(std::move(iv));
    }
    for (size_t i = 0; i < used.size(); i++)
        if (!used[i])
            fail(FMX_EINVAL, std::string(fn_name) + "() got an unexpected keyword argument '" +
                                 a->items[i].first + "'");
    try {
        schema.checkAndNormalizeInputs(stack);
    } catch (const c10::Error &e) {
        fail(FMX_EINVAL, c10_text(e));
    }
    return stack;
}

// Runs f on stack with taps recorded into *taps; returns the wall time in
// ms. Guards (optimisation off or on) are the caller's.
double exec(torch::jit::Function &f, torch::jit::Stack &stack, const SourceMap &sm,
            const at::Device &dev, std::vector<std::pair<std::string, at::Tensor>> *taps) {
    try {
        struct TapScope {
            explicit TapScope(std::vector<std::pair<std::string, at::Tensor>> *t) {
                tl_taps = t;
            }
            ~TapScope() {
                tl_taps = nullptr;
            }
        } scope(taps);
        sync_device(dev);
        auto t0 = std::chrono::steady_clock::now();
        f.run(stack);
        sync_device(dev);
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
            .count();
    } catch (const c10::Error &e) {
        fail(FMX_ERUNTIME, runtime_message(sm, c10_text(e), ""));
    } catch (const std::exception &e) {
        fail(FMX_ERUNTIME, runtime_message(sm, e.what(), ""));
    }
}

// The run's outputs and taps; they own their memory (a copy where they alias
// caller memory).
std::unique_ptr<fmx_run> collect(const SourceMap &sm, const Loc &def_loc,
                                 const torch::jit::Stack &stack,
                                 std::vector<std::pair<std::string, at::Tensor>> &taps,
                                 const std::unordered_set<const c10::StorageImpl *> &borrowed,
                                 double ms) {
    auto out = std::make_unique<fmx_run>();
    out->ms = ms;
    auto keep = [&](const at::Tensor &t) {
        auto r = std::make_unique<fmx_tensor>();
        bool alias =
            t.defined() && t.has_storage() && borrowed.count(t.storage().unsafeGetStorageImpl());
        r->t = alias ? t.clone() : t;
        return r;
    };
    c10::IValue result = stack.at(0);
    std::vector<c10::IValue> items;
    if (result.isTuple()) {
        for (const c10::IValue &e : result.toTupleRef().elements())
            if (e.isList()) // a list of Tensors in the tuple: flattened (a decode step's cache)
                for (const c10::IValue &x : e.toListRef())
                    items.push_back(x);
            else
                items.push_back(e);
    } else if (result.isList()) {
        for (const c10::IValue &e : result.toListRef())
            items.push_back(e);
    } else {
        items.push_back(result);
    }
    for (size_t i = 0; i < items.size(); i++) {
        if (!items[i].isTensor())
            fail(FMX_ERUNTIME, sm.format(def_loc, "output " + std::to_string(i) + " is " +
                                                      describe_type(items[i]) +
                                                      "; the entry must return Tensors"));
        out->outputs.push_back(keep(items[i].toTensor()));
    }
    for (auto &tp : taps) {
        out->tap_names.push_back(tp.first);
        out->taps.push_back(keep(tp.second));
    }
    return out;
}

std::unique_ptr<fmx_run> run(fmx_program *p, const char *fn_name, const fmx_args *a) {
    Loc def_loc;
    torch::jit::Function *fn = entry(p, fn_name, &def_loc);
    const at::Device dev = current_device();
    std::unordered_set<const c10::StorageImpl *> borrowed;
    torch::jit::Stack stack = bind_stack(fn->getSchema(), fn_name, a, dev, &borrowed);
    std::vector<std::pair<std::string, at::Tensor>> taps;
    double ms;
    {
        RunGuards g;
        ms = exec(*fn, stack, p->sm, dev, &taps);
    }
    return collect(p->sm, def_loc, stack, taps, borrowed, ms);
}

/* ------------------------------------------------------------------------ */
/* surviving optimisation                                                   */
/* ------------------------------------------------------------------------ */

// As RunGuards, but with the graph executor's optimisations on: the
// profiling executor, its specialisations and whatever fusers this build
// enables by default (none are switched on or off here).
struct OptimizedRunGuards {
    c10::InferenceMode inference;
    at::NoGradGuard no_grad;
    torch::jit::GraphOptimizerEnabledGuard opt{true};
    WarningGuard quiet{&g_quiet};
};

// Why two outputs of the same call are not the same, or "" when they are.
// Floating point: |got - ref| <= atol·rms(ref) + rtol·|ref| element-wise,
// NaN matching NaN and ±inf matching itself; other dtypes: equal.
std::string differs(const at::Tensor &got_in, const at::Tensor &ref_in) {
    std::stringstream ss;
    if (!got_in.sizes().equals(ref_in.sizes())) {
        ss << "shape " << got_in.sizes() << ", unoptimized " << ref_in.sizes();
        return ss.str();
    }
    if (got_in.scalar_type() != ref_in.scalar_type()) {
        ss << "dtype " << c10::toString(got_in.scalar_type()) << ", unoptimized "
           << c10::toString(ref_in.scalar_type());
        return ss.str();
    }
    if (ref_in.numel() == 0) return "";
    at::Tensor got = got_in.to(ref_in.device());
    if (!at::isFloatingType(ref_in.scalar_type())) {
        if (got.equal(ref_in)) return "";
        int64_t n = got.ne(ref_in).sum().item<int64_t>();
        ss << n << " of " << ref_in.numel() << " elements differ";
        return ss.str();
    }
    double atol = 1e-5, rtol = 0;
    if (ref_in.scalar_type() == at::kHalf) atol = rtol = 16 * std::ldexp(1.0, -10);
    if (ref_in.scalar_type() == at::kBFloat16) atol = rtol = 16 * std::ldexp(1.0, -7);
    at::Tensor g = got.to(at::kDouble).reshape({-1});
    at::Tensor r = ref_in.to(at::kDouble).reshape({-1});
    at::Tensor fin = r.isfinite();
    int64_t nfin = fin.sum().item<int64_t>();
    double ss2 = at::where(fin, r * r, at::zeros_like(r)).sum().item<double>();
    double rms = nfin ? std::sqrt(ss2 / (double)nfin) : 0.0;
    at::Tensor diff = (g - r).abs();
    at::Tensor ok = fin.logical_and(g.isfinite()).logical_and(diff.le(atol * rms + rtol * r.abs()));
    ok = ok.logical_or(r.isnan().logical_and(g.isnan()));
    ok = ok.logical_or(fin.logical_not().logical_and(r.isnan().logical_not()).logical_and(g.eq(r)));
    int64_t bad = ok.logical_not().sum().item<int64_t>();
    if (bad == 0) return "";
    at::Tensor d = at::where(ok, at::zeros_like(diff),
                             at::where(diff.isnan(), at::full_like(diff, INFINITY), diff));
    int64_t at_i = d.argmax().item<int64_t>();
    ss << bad << " of " << r.numel() << " elements differ beyond " << atol << "·rms";
    if (rtol > 0) ss << " + " << rtol << "·|x|";
    ss << " (rms " << rms << "); worst: flat index " << at_i << ", optimized "
       << g[at_i].item<double>() << ", unoptimized " << r[at_i].item<double>();
    return ss.str();
}

// Runs fn optimised, as many times as the profiling executor needs to use
// its optimised plan (profiled runs + 1), comparing each run's outputs with
// ref. *why: "" when every run matched, else the first difference or the
// error of the optimised run.
void check_optimized(fmx_program *p, const char *fn_name, const fmx_args *a, const fmx_run &ref,
                     std::string *why) {
    Loc def_loc;
    torch::jit::Function *fn = entry(p, fn_name, &def_loc);
    const at::Device dev = current_device();
    std::shared_ptr<torch::jit::Graph> g;
    {
        RunGuards guards; // inline the unoptimised graphs, as compiled
        g = inlined_graph(fn);
    }
    // A function of its own: a fresh graph executor, so the candidate's own
    // functions never see an optimised plan (a GraphFunction keeps its plan).
    GraphFunction opt(c10::QualifiedName("__fmx_optimized", fn_name), g, nullptr);
    opt.setSchema(fn->getSchema());
    size_t runs = std::max<size_t>(torch::jit::getNumProfiledRuns().load(), 1) + 1;
    for (size_t k = 0; k < runs; k++) {
        std::unordered_set<const c10::StorageImpl *> borrowed;
        torch::jit::Stack stack = bind_stack(fn->getSchema(), fn_name, a, dev, &borrowed);
        std::vector<std::pair<std::string, at::Tensor>> taps;
        double ms;
        try {
            OptimizedRunGuards og;
            ms = exec(opt, stack, p->sm, dev, &taps);
        } catch (const FmxError &e) {
            if (e.status != FMX_ERUNTIME) throw;
            *why = "the optimized graph fails (run " + std::to_string(k + 1) + "): " + e.msg;
            return;
        }
        std::unique_ptr<fmx_run> got = collect(p->sm, def_loc, stack, taps, borrowed, ms);
        if (got->outputs.size() != ref.outputs.size()) {
            *why = "the optimized graph returns " + std::to_string(got->outputs.size()) +
                   " outputs, unoptimized " + std::to_string(ref.outputs.size());
            return;
        }
        for (size_t i = 0; i < got->outputs.size(); i++) {
            std::string d = differs(got->outputs[i]->t, ref.outputs[i]->t);
            if (!d.empty()) {
                *why = "output " + std::to_string(i) + " (optimized run " + std::to_string(k + 1) +
                       "): " + d;
                return;
            }
        }
    }
    why->clear();
}

} // namespace

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
