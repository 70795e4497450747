/*
 * run.cpp — keyword calls of a compiled candidate: arguments bound by name
 * (defaults, a fresh weights dict per run, tensors moved to the device),
 * the run timed with tap() recording, outputs that own their memory; and
 * the check that the graph executor's optimised plan computes the same.
 *
 * Not here: argument handles (engine.cpp), the comparison rules
 * (compare.cpp), compiling (compile.cpp).
 */
#include "internal.hpp"

#include <torch/cuda.h>

#include <chrono>
#include <unordered_set>

namespace fmx_engine_impl {

/* ------------------------------------------------------------------------ */
/* runs                                                                     */
/* ------------------------------------------------------------------------ */

namespace {

void sync_device(const at::Device &d) {
    if (d.is_cuda()) torch::cuda::synchronize(d.index());
}

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

} // namespace

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

namespace {

// As RunGuards, but with the graph executor's optimisations on: the
// profiling executor, its specialisations and whatever fusers this build
// enables by default (none are switched on or off here).
struct OptimizedRunGuards {
    c10::InferenceMode inference;
    at::NoGradGuard no_grad;
    torch::jit::GraphOptimizerEnabledGuard opt{true};
    WarningGuard quiet{&g_quiet};
};

} // namespace

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

} // namespace fmx_engine_impl
