/*
 * walk.cpp — the op allowlist: every op of a compiled candidate's graphs,
 * every call inlined (within a size limit), checked against the candidate
 * language: the allowed aten/prim ops and tap, the ops refused with their
 * own reason, in-place writes to tensors, and the arguments that crash or
 * hang this libtorch.
 *
 * Not here: the compile facts read from the same graphs (facts.cpp),
 * compiling (compile.cpp), what names resolve to (resolver.cpp).
 */
#include "internal.hpp"

#include <torch/csrc/jit/passes/inliner.h>

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

// Whether t is or holds a Tensor type.
bool type_has_tensor(const c10::TypePtr &t) {
    if (t->kind() == c10::TypeKind::TensorType) return true;
    for (const c10::TypePtr &c : t->containedTypes())
        if (type_has_tensor(c)) return true;
    return false;
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

// A copy of fn's graph with every call inlined. Inline() inlines one level of
// the unoptimised graphs we keep, so repeat it (TorchScript refuses
// recursion: the depth is bounded by the number of functions). Call it with
// the optimiser off (RunGuards), as every graph here was compiled.
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

} // namespace fmx_engine_impl
