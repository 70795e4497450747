/*
 * compare.cpp — fmx_compare's rule, the one tolerance policy by which a
 * candidate's output is graded against the reference, with its two paths:
 * a loop over contiguous cpu memory (the common case: no kernels, no
 * temporaries) and tensor ops on the tensors' device (cuda, and dtypes the
 * loop cannot read). Also the looser "same computation" rule that
 * fmx_program_check_optimized applies between two runs of one program.
 *
 * Not here: tolerances themselves (the pack and env/verify.c choose them),
 * running (run.cpp).
 */
#include "internal.hpp"

#include <cfloat>
#include <cmath>
#include <sstream>

namespace fmx_engine_impl {

/* ------------------------------------------------------------------------ */
/* the tolerance policy                                                     */
/* ------------------------------------------------------------------------ */

/* Both paths below implement exactly this, and tests/test_engine.c checks
 * that they agree (fmx__compare_tensor_path):
 *
 *   graded    every element of want, or with a mask over want's leading
 *             k >= 2 dims (a (B, T) mask for want (B, T, …); a KV cache's
 *             (B, heads, L) for (B, heads, L, D)) those whose row is kept:
 *             mask != 0. compared = their count. Ungraded elements count
 *             nowhere below.
 *   scale     max(sqrt(mean of want² over the graded elements where want is
 *             finite), 1e-30); 1e-30 when there are none.
 *   allow     atol·scale + rtol·|want|, element-wise.
 *   diff      |got − want| when both are finite, else +inf.
 *   passes    got and want both finite and diff <= allow. NaN or ±inf on
 *             either side never passes, whatever the tolerance: inf does not
 *             match inf, NaN does not match NaN. A NaN allow (0·inf, from an
 *             infinite scale) passes nothing.
 *   bad       graded elements that do not pass; nonfinite: graded elements
 *             whose got is NaN or ±inf. pass = dtype_ok && bad == 0.
 *   max_abs   max diff over graded elements (0 when none is graded).
 *   max_rel   max of diff / max(|want|, scale) over graded elements, +inf
 *             where diff is +inf (want NaN or ±inf included); 0 when none.
 *   worst     the graded element with the largest excess = diff − allow,
 *             +inf where diff is +inf or excess is NaN, floored at the
 *             lowest finite double; the first in row-major order on ties.
 *             worst_got/worst_want are its values (as doubles), worst its
 *             index; all 0 when none is graded.
 *
 * Shapes must match exactly (else shape_ok = 0 and nothing is graded); a
 * dtype mismatch grades the values but never passes. */

namespace {

/* One element of a contiguous cpu tensor as a double. */
template <typename T> double elem(const void *base, int64_t i) {
    return static_cast<double>(static_cast<const T *>(base)[i]);
}

/* bool as its byte (fmx_tensor_wrap admits only 0 and 1; never read as bool) */
double elem_bool(const void *base, int64_t i) {
    return static_cast<const unsigned char *>(base)[i] != 0 ? 1.0 : 0.0;
}

using elem_fn = double (*)(const void *, int64_t);

elem_fn elem_reader(at::ScalarType t) {
    switch (t) {
    case at::kDouble:
        return elem<double>;
    case at::kFloat:
        return elem<float>;
    case at::kHalf:
        return elem<at::Half>;
    case at::kBFloat16:
        return elem<at::BFloat16>;
    case at::kLong:
        return elem<int64_t>;
    case at::kInt:
        return elem<int32_t>;
    case at::kShort:
        return elem<int16_t>;
    case at::kChar:
        return elem<int8_t>;
    case at::kByte:
        return elem<uint8_t>;
    case at::kBool:
        return elem_bool;
    default:
        return nullptr;
    }
}

/* The cpu path of compare: two passes over the data, no temporaries (the
 * tensor path below costs a dozen kernels and host syncs per output, which
 * dominates verify time for small models). keep_rows: the mask's flags in
 * row-major order (one per row of want's leading dims) or empty; inner =
 * elements per row. Returns false for dtypes it cannot read. */
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
        double rel = diff == INFINITY ? INFINITY : diff / std::max(std::fabs(b), r->scale);
        r->max_rel = std::max(r->max_rel, rel);
        double excess = diff - allow;
        if (diff == INFINITY || std::isnan(excess)) excess = INFINITY;
        excess = std::max(excess, -DBL_MAX);
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

} // namespace

void compare(const at::Tensor &got_in, const at::Tensor &want_in, const at::Tensor *mask_in,
             fmx_tolerance tol, fmx_compare_result *r, bool force_tensor_path) {
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
        // a mask over want's leading dims, (B, T) at least
        bool lead = mask.dim() >= 2 && mask.dim() <= want_in.dim();
        for (int64_t d = 0; lead && d < mask.dim(); d++)
            lead = mask.size(d) == want_in.size(d);
        if (!lead) {
            std::stringstream ss;
            ss << "mask has shape " << mask.sizes()
               << "; it must be (B, T) or the leading dims of outputs of shape " << want_in.sizes();
            fail(FMX_EINVAL, ss.str());
        }
        if (want_in.is_cpu() && got_in.is_cpu() && !force_tensor_path) {
            at::Tensor rows = mask.ne(0).reshape({-1}).contiguous();
            int64_t inner = rows.numel() ? want_in.numel() / rows.numel() : 1;
            if (compare_cpu(got_in, want_in, rows, inner ? inner : 1, tol, r)) return;
        }
        std::vector<int64_t> shape(mask.sizes().begin(), mask.sizes().end());
        shape.resize(want_in.dim(), 1);
        keep = mask.ne(0).reshape(shape).expand(want_in.sizes()).reshape({-1});
    } else {
        if (want_in.is_cpu() && got_in.is_cpu() && !force_tensor_path &&
            compare_cpu(got_in, want_in, at::Tensor(), 1, tol, r))
            return;
        keep = at::ones({want_in.numel()}, at::TensorOptions().dtype(at::kBool).device(dev));
    }
    // The tensor path: (N,) float64 on want's device.
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
    at::Tensor rel = at::where(diff.isinf(), inf, diff / denom); // diff is never -inf
    r->max_rel = at::where(keep, rel, neg).max().item<double>();
    // worst: the graded element furthest beyond its allowance; ungraded
    // ones (-inf) stay below every graded one (at least -DBL_MAX)
    at::Tensor excess = diff - allow;
    excess = at::where(diff.isinf().logical_or(excess.isnan()), inf, excess).clamp_min(-DBL_MAX);
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

/* The "same computation" rule of fmx_program_check_optimized, looser than
 * the policy above on purpose (two runs of one program, not a candidate
 * against a reference): floating point |got - ref| <= atol·rms(ref) +
 * rtol·|ref| element-wise with atol 1e-5 (16 ulp of half and bfloat16, with
 * rtol as much), NaN matching NaN and ±inf matching itself; other dtypes:
 * equal. */
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

} // namespace fmx_engine_impl
