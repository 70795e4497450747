/*
 * source.cpp — the candidate's source as fmx reads it before TorchScript
 * does: messages that point at the candidate's own line and column
 * (compile errors, syntax errors, runtime tracebacks), and the line-based
 * preprocessing of its top level (imports, constants, `def tap`, __main__,
 * f-strings rewritten with column maps).
 *
 * Not here: what names resolve to (resolver.cpp), which ops are allowed
 * (walk.cpp), compiling and the nesting limits (compile.cpp).
 */
#include "internal.hpp"

#include <regex>
#include <set>
#include <sstream>

namespace fmx_engine_impl {

/* ------------------------------------------------------------------------ */
/* source locations and messages                                            */
/* ------------------------------------------------------------------------ */

namespace {

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

} // namespace

// Set by our resolver just before it throws a refusal (not a compile error).
thread_local bool tl_forbidden = false;

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

namespace {

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

} // namespace

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

/* ------------------------------------------------------------------------ */
/* preprocessing: imports, constants, tap, __main__                         */
/* ------------------------------------------------------------------------ */

namespace {

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

} // namespace

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

} // namespace fmx_engine_impl
