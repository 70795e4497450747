/*
 * compile.cpp — a candidate file to an fmx_program: the text checks (control
 * characters, nesting limits that keep TorchScript's recursive parser on its
 * stack), the top-level constants evaluated in order, the functions defined
 * with fmx's resolver and walked by the op allowlist, their parameters; all
 * on a thread with a 64 MiB stack.
 *
 * Not here: the preprocessing (source.cpp), the resolver and prelude
 * (resolver.cpp), the allowlist itself (walk.cpp).
 */
#include "internal.hpp"

#include <chrono>
#include <cstdio>
#include <pthread.h>
#include <set>

namespace fmx_engine_impl {

/* ------------------------------------------------------------------------ */
/* compiling                                                                */
/* ------------------------------------------------------------------------ */

namespace {

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

} // namespace

// compile() on a thread of its own with a 64 MiB stack (check_nesting keeps
// the recursion it needs within an eighth of that), whatever stack the
// caller's thread has; its exception, if any, is rethrown here. Runs inline
// when no thread can be made.
std::unique_ptr<fmx_program> compile_program(const char *source, size_t len, const char *filename) {
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

} // namespace fmx_engine_impl
