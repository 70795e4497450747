/*
 * facts.cpp — the compile facts of a candidate's entry, read from its graph
 * with every call inlined: host syncs (ops that read tensor values on the
 * host, or whose shape depends on them) and control flow whose condition or
 * trip count depends on tensor values, each with the candidate's line.
 *
 * Not here: refusing ops (walk.cpp); these are facts for the reward and the
 * report, never refusals.
 */
#include "internal.hpp"

#include <climits>
#include <sstream>
#include <unordered_set>

namespace fmx_engine_impl {

/* ------------------------------------------------------------------------ */
/* compile facts: host syncs and data-dependent control flow                */
/* ------------------------------------------------------------------------ */

namespace {

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

} // namespace

void program_facts(const SourceMap &sm, torch::jit::Function *fn, fmx_program_facts *out) {
    std::shared_ptr<torch::jit::Graph> g;
    {
        RunGuards guards;
        g = inlined_graph(fn);
    }
    FactsWalker w(sm);
    w.run(*g);
    out->host_syncs = (int)w.syncs.size();
    out->data_dependent_flow = (int)w.flows.size();
    w.first_problem(out);
}

} // namespace fmx_engine_impl
