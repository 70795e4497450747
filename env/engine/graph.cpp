/*
 * graph.cpp — what fmx reads from a compiled candidate's graphs, every call
 * inlined: the op allowlist (each op of the candidate language, the ops
 * refused with their own reason, in-place writes, the arguments that crash
 * this libtorch) and the compile facts (host syncs and control flow that
 * depends on tensor values).
 *
 * Not here: compiling (compile.cpp), running (run.cpp), what names resolve
 * to (resolver.cpp).
 */
#include "internal.hpp"

#include <torch/csrc/jit/passes/inliner.h>

#include <climits>
#include <sstream>
#include <unordered_set>

namespace fmx_engine_impl {

/* ------------------------------------------------------------------------ */
/* the op allowlist                                                         */
/* ------------------------------------------------------------------------ */

namespace {

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

} // namespace

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

namespace {

// The input of n bound to the schema argument called name, or null.
torch::jit::Value *input_named(Node *n, const char *name) {
    const c10::FunctionSchema *s = n->maybeSchema();
    if (!s) return nullptr;
    const auto &args = s->arguments();
    for (size_t i = 0; i < args.size() && i < n->inputs().size(); i++)
        if (args[i].name() == name) return n->input(i);
    return nullptr;
}

} // namespace

// The innermost source range in the candidate's own file: inlined nodes
// carry the call sites that led to them.
Loc OpWalker::node_loc(Node *n) const {
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

void OpWalker::deny(Node *n, const std::string &msg) const {
    fail(FMX_EFORBIDDEN, sm.format(node_loc(n), msg));
}

void OpWalker::check(Node *n) const {
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
    if ((n->kind() == c10::Symbol::aten("replace") || n->kind() == c10::Symbol::aten("count")) &&
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

void OpWalker::walk(torch::jit::Block *b) const {
    for (Node *n : b->nodes()) {
        check(n);
        for (torch::jit::Block *sub : n->blocks())
            walk(sub);
    }
}

void OpWalker::walk_function(torch::jit::Function *fn) const {
    std::shared_ptr<torch::jit::Graph> g;
    try {
        g = inlined_graph(fn);
    } catch (const FmxError &e) {
        fail(e.status, sm.filename + ": " + e.msg);
    }
    walk(g->block());
}

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
