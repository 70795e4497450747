/*
 * internal.hpp — what the pieces of the libtorch bridge share, and nothing
 * else: errors (FmxError, fail, guarded), the handles behind engine.h
 * (fmx_tensor, fmx_args, fmx_run, fmx_program), source locations
 * (SourceMap, Loc), the candidate as the Python source model (PyModel,
 * Prep), the resolver, the op walker, the run guards, and one function per
 * piece that the extern "C" layer (engine.cpp) calls.
 *
 * Private to env/engine/: C++ only, never included by C code. What one
 * piece alone uses stays in that piece's anonymous namespace.
 *
 * Not here: the extern "C" entry points (engine.cpp), the version-dependent
 * F functions (resolver.cpp), the tolerance policy (compare.cpp).
 */
#ifndef FMX_ENGINE_INTERNAL_HPP
#define FMX_ENGINE_INTERNAL_HPP

#include "engine.h"
#include "pysource.h"
#include "status.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/version.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/frontend/error_report.h>
#include <torch/csrc/jit/frontend/resolver.h>
#include <torch/csrc/jit/frontend/source_range.h>
#include <torch/csrc/jit/frontend/sugared_value.h>
#include <torch/csrc/jit/frontend/tree_views.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

// libtorch version differences (1.13 from Debian, 2.x from a torch wheel)
// stay behind this and TORCH_VERSION_*.
#define FMX__VERSION_AT_LEAST(maj, min)                                                            \
    (TORCH_VERSION_MAJOR > (maj) || (TORCH_VERSION_MAJOR == (maj) && TORCH_VERSION_MINOR >= (min)))

/* ------------------------------------------------------------------------ */
/* handles (the opaque types of engine.h)                                   */
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

namespace fmx_engine_impl {

enum ArgKind { ARG_VALUE, ARG_WEIGHTS, ARG_TENSOR_LIST };
struct ArgVal {
    ArgKind kind = ARG_VALUE;
    c10::IValue value;
    bool borrowed = false;                                   // a borrowed tensor
    std::vector<std::pair<std::string, fmx_tensor>> weights; // ARG_WEIGHTS
    std::vector<fmx_tensor> list;                            // ARG_TENSOR_LIST
};

} // namespace fmx_engine_impl

struct fmx_args {
    std::vector<std::pair<std::string, fmx_engine_impl::ArgVal>> items;
};

struct fmx_run {
    double ms = 0;
    std::vector<std::unique_ptr<fmx_tensor>> outputs;
    std::vector<std::string> tap_names;
    std::vector<std::unique_ptr<fmx_tensor>> taps;
};

namespace fmx_engine_impl {

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

/* ------------------------------------------------------------------------ */
/* errors                                                                   */
/* ------------------------------------------------------------------------ */

// Thrown inside the bridge; the extern "C" wrappers turn it into status+text.
struct FmxError : std::exception {
    int status;
    std::string msg;
    FmxError(int s, std::string m) : status(s), msg(std::move(m)) {}
    const char *what() const noexcept override {
        return msg.c_str();
    }
};

[[noreturn]] inline void fail(int status, std::string msg) {
    throw FmxError(status, std::move(msg));
}

inline void set_err(char *err, size_t errsz, const std::string &msg) {
    if (!err || errsz == 0) return;
    size_t n = std::min(msg.size(), errsz - 1);
    memcpy(err, msg.data(), n);
    err[n] = '\0';
}

inline std::string c10_text(const c10::Error &e) {
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

inline std::string trim(const std::string &s) {
    size_t a = s.find_first_not_of(" \t\r\n");
    if (a == std::string::npos) return "";
    size_t b = s.find_last_not_of(" \t\r\n");
    return s.substr(a, b - a + 1);
}

inline bool starts_with(const std::string &s, const char *p) {
    return s.rfind(p, 0) == 0;
}

/* ------------------------------------------------------------------------ */
/* device and run guards                                                    */
/* ------------------------------------------------------------------------ */

// The device fmx_engine_set_device chose (engine.cpp).
at::Device current_device();

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
extern QuietWarnings g_quiet; // resolver.cpp

// The guards every TorchScript compile and run here is under: no autograd,
// no graph-executor optimisation (no fusion: kernels as in eager mode), and
// no warnings on stderr.
struct RunGuards {
    c10::InferenceMode inference;
    at::NoGradGuard no_grad;
    torch::jit::GraphOptimizerEnabledGuard no_opt{false};
    WarningGuard quiet{&g_quiet};
};

// The taps of the run in progress on this thread (null when none);
// resolver.cpp's tap op appends to it.
extern thread_local std::vector<std::pair<std::string, at::Tensor>> *tl_taps;

/* ------------------------------------------------------------------------ */
/* source locations and messages (source.cpp)                               */
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
extern thread_local bool tl_forbidden;

// A compile-time ErrorReport → status + "FILE:LINE:COL: message".
FmxError from_report(const SourceMap &sm, const ErrorReport &e);
std::vector<std::string> split_lines(const std::string &s);
// A syntax error from the lexer: "message:\n" + highlight.
std::string syntax_message(const SourceMap &sm, const std::string &what);
// TorchScript runtime errors carry a traceback of TorchScript frames:
// keep the innermost frame in the candidate's file and the final message.
std::string runtime_message(const SourceMap &sm, const std::string &what, const char *prefix);
// "an int", "a Tensor", ...: what a value is, for messages.
std::string describe_type(const c10::IValue &v);

/* ------------------------------------------------------------------------ */
/* the candidate as Python source; preprocessing (source.cpp)               */
/* ------------------------------------------------------------------------ */

enum ModuleKind { MOD_TORCH, MOD_F, MOD_NN, MOD_MATH };

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

// Checks the top-level blocks (imports, constants, defs, __main__), rewrites
// f-strings (recording column maps in sm.cols) and blanks what TorchScript
// must not see. Fails with FMX_ECOMPILE / FMX_EFORBIDDEN.
Prep preprocess(SourceMap &sm, const PyModel &m);

/* ------------------------------------------------------------------------ */
/* the resolver and the F prelude (resolver.cpp)                            */
/* ------------------------------------------------------------------------ */

struct FmxResolver : torch::jit::Resolver {
    // name → value of each top-level constant resolved so far
    std::shared_ptr<const std::map<std::string, c10::IValue>> constants;
    // imported alias → module
    std::map<std::string, ModuleKind> modules;
    bool with_tap = true;

    SugaredValuePtr resolveValue(const std::string &name, GraphFunction &m,
                                 const SourceRange &loc) override;

    c10::TypePtr resolveType(const std::string &name, const SourceRange &loc) override {
        return nullptr;
    }
};

// Parses source into Defs (throws ErrorReport on syntax errors).
std::vector<Def> parse_defs(const std::shared_ptr<Source> &src);

// The F prelude, compiled on first use; never destroyed.
CompilationUnit &prelude();

/* ------------------------------------------------------------------------ */
/* the op allowlist (walk.cpp) and compile facts (facts.cpp)                */
/* ------------------------------------------------------------------------ */

// Whether t is or holds a Tensor type.
bool type_has_tensor(const c10::TypePtr &t);

// The input of n bound to the schema argument called name, or null.
torch::jit::Value *input_named(Node *n, const char *name);

// A copy of fn's graph with every call inlined; fails (FMX_ECOMPILE) when
// that would be too large. Call it with the optimiser off (RunGuards).
std::shared_ptr<torch::jit::Graph> inlined_graph(torch::jit::Function *fn);

// Refuses (FMX_EFORBIDDEN, with the candidate's line) every op outside the
// candidate language.
struct OpWalker {
    const SourceMap &sm;

    // The innermost source range in the candidate's own file: inlined nodes
    // carry the call sites that led to them.
    Loc node_loc(Node *n) const;
    [[noreturn]] void deny(Node *n, const std::string &msg) const;
    void check(Node *n) const;
    void walk(torch::jit::Block *b) const;
    // Walks a copy of fn's graph with every call inlined.
    void walk_function(torch::jit::Function *fn) const;
};

// The host syncs and data-dependent control flow of fn inlined, into *out
// (facts.cpp).
void program_facts(const SourceMap &sm, torch::jit::Function *fn, fmx_program_facts *out);

/* ------------------------------------------------------------------------ */
/* compiling, runs, comparing (compile.cpp, run.cpp, compare.cpp)           */
/* ------------------------------------------------------------------------ */

} // namespace fmx_engine_impl

// One compiled candidate file.
struct fmx_program {
    std::shared_ptr<torch::jit::CompilationUnit> cu;
    fmx_engine_impl::SourceMap sm;      // the candidate's name and lines, for messages
    std::vector<std::string> functions; // source order
    std::map<std::string, std::vector<fmx_param_info>> params;
    std::map<std::string, std::pair<long, long>> def_at; // name → (line, col) of the def
    double compile_ms = 0;
};

namespace fmx_engine_impl {

// Compiles a candidate file on a thread with a 64 MiB stack.
std::unique_ptr<fmx_program> compile_program(const char *source, size_t len, const char *filename);

// A keyword call of fn_name, unoptimised, with its taps.
std::unique_ptr<fmx_run> run(fmx_program *p, const char *fn_name, const fmx_args *a);

// Runs fn optimised until its optimised plan is used, comparing each run with
// ref; *why: "" when every run matched, else the first difference.
void check_optimized(fmx_program *p, const char *fn_name, const fmx_args *a, const fmx_run &ref,
                     std::string *why);

// fmx_compare on at::Tensors; force_tensor_path skips the cpu loop (tests).
void compare(const at::Tensor &got, const at::Tensor &want, const at::Tensor *mask,
             fmx_tolerance tol, fmx_compare_result *r, bool force_tensor_path = false);

// Why two outputs of the same call are not the same, or "" when they are.
std::string differs(const at::Tensor &got, const at::Tensor &ref);

} // namespace fmx_engine_impl

#endif
