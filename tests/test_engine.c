/*
 * test_engine.c — cmocka tests of the libtorch bridge through engine.h only:
 * tensors, the candidate language (imports, constants, tap, the F prelude,
 * every refusal with its line), keyword runs, runtime errors, fmx_compare,
 * and the compile facts (host syncs, data-dependent flow, surviving the
 * graph optimiser).
 * Expected values are computed here in C, independently of libtorch.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "status.h"

static char err[8192];

/* The device the tests run on: FMX_TEST_DEVICE (cpu, cuda, cuda:N), default cpu. */
static const char *test_device(void) {
    const char *d = getenv("FMX_TEST_DEVICE");
    return d && *d ? d : "cpu";
}

static int setup(void **state) {
    (void)state;
    if (fmx_engine_set_device(test_device(), err, sizeof err) != FMX_OK) {
        fprintf(stderr, "device %s: %s\n", test_device(), err);
        return -1;
    }
    return 0;
}

/* ---- helpers ---- */

static fmx_program *compile_ok(const char *src) {
    fmx_program *p = NULL;
    int rc = fmx_program_compile(src, strlen(src), "cand.py", &p, err, sizeof err);
    if (rc != FMX_OK) fail_msg("compile failed (%d): %s", rc, err);
    return p;
}

/* Compiles src expecting status; err must contain each of the needles. */
static void compile_fails(const char *src, int status, const char *needle1, const char *needle2) {
    fmx_program *p = NULL;
    int rc = fmx_program_compile(src, strlen(src), "cand.py", &p, err, sizeof err);
    if (rc != status) fail_msg("expected status %d, got %d: %s", status, rc, err);
    assert_null(p);
    if (needle1 && !strstr(err, needle1)) fail_msg("'%s' not in: %s", needle1, err);
    if (needle2 && !strstr(err, needle2)) fail_msg("'%s' not in: %s", needle2, err);
}

static fmx_tensor *wrap(void *data, fmx_dtype dt, int ndim, int64_t d0, int64_t d1, int64_t d2,
                        int64_t d3) {
    int64_t shape[4] = {d0, d1, d2, d3};
    fmx_tensor *t = NULL;
    int rc = fmx_tensor_wrap(data, dt, shape, ndim, &t, err, sizeof err);
    if (rc != FMX_OK) fail_msg("wrap: %s", err);
    return t;
}

static fmx_tensor *f32(float *data, int ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
    return wrap(data, FMX_DT_F32, ndim, d0, d1, d2, d3);
}

static fmx_run *run_ok(fmx_program *p, const char *fn, const fmx_args *a) {
    fmx_run *r = NULL;
    int rc = fmx_program_run(p, fn, a, &r, err, sizeof err);
    if (rc != FMX_OK) fail_msg("run %s failed (%d): %s", fn, rc, err);
    return r;
}

/* Reads a float32 tensor of n elements into out. */
static void read_f32(const fmx_tensor *t, float *out, int64_t n) {
    int64_t shape[FMX_MAX_DIMS];
    fmx_dtype dt;
    int nd = fmx_tensor_shape(t, shape, &dt);
    assert_true(nd >= 0);
    assert_int_equal(dt, FMX_DT_F32);
    int64_t numel = 1;
    for (int i = 0; i < nd; i++)
        numel *= shape[i];
    assert_int_equal(numel, n);
    assert_int_equal(fmx_tensor_read(t, out, (size_t)n * sizeof(float), err, sizeof err), FMX_OK);
}

static void assert_close(const float *got, const double *want, int64_t n, double tol) {
    for (int64_t i = 0; i < n; i++)
        if (!(fabs(got[i] - want[i]) <= tol * (1 + fabs(want[i]))))
            fail_msg("element %ld: got %.8g want %.8g", (long)i, got[i], want[i]);
}

/* Deterministic values in [-1, 1). */
static void fill(float *x, int n, unsigned seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = (float)((seed >> 8) / 16777216.0 * 2.0 - 1.0);
    }
}

static double gelu_ref(double x) {
    return 0.5 * x * (1 + erf(x / sqrt(2.0)));
}

/* ---- dtypes, device, tensors ---- */

static void test_dtypes_and_device(void **state) {
    (void)state;
    assert_int_equal(fmx_dtype_parse("F32"), FMX_DT_F32);
    assert_int_equal(fmx_dtype_parse("BF16"), FMX_DT_BF16);
    assert_int_equal(fmx_dtype_parse("BOOL"), FMX_DT_BOOL);
    assert_int_equal(fmx_dtype_parse("F8_E4M3"), -1);
    assert_string_equal(fmx_dtype_name(FMX_DT_BF16), "bfloat16");
    assert_string_equal(fmx_dtype_name(FMX_DT_I64), "int64");
    assert_int_equal(fmx_dtype_size(FMX_DT_F16), 2);
    assert_int_equal(fmx_dtype_size(FMX_DT_I64), 8);
    assert_non_null(strstr(fmx_engine_version(), "libtorch "));
    assert_int_equal(fmx_engine_set_device("cpu", err, sizeof err), FMX_OK);
    assert_string_equal(fmx_engine_device(), "cpu");
    assert_int_equal(fmx_engine_set_device("tpu", err, sizeof err), FMX_EINVAL);
    int rc = fmx_engine_set_device("cuda:0", err, sizeof err);
    if (strstr(fmx_engine_version(), " cpu")) {
        assert_int_equal(rc, FMX_EDEVICE);
        assert_non_null(strstr(err, "CUDA is not available"));
    }
    assert_int_equal(fmx_engine_set_device(test_device(), err, sizeof err), FMX_OK);
}

static void test_tensor_wrap_cast_read(void **state) {
    (void)state;
    float x[6] = {1, 2, 3, 4, 5, 6};
    fmx_tensor *t = f32(x, 2, 2, 3, 0, 0);
    int64_t shape[FMX_MAX_DIMS];
    fmx_dtype dt;
    assert_int_equal(fmx_tensor_shape(t, shape, &dt), 2);
    assert_int_equal(shape[0], 2);
    assert_int_equal(shape[1], 3);
    assert_int_equal(dt, FMX_DT_F32);
    fmx_tensor *h = NULL;
    assert_int_equal(fmx_tensor_cast(t, FMX_DT_BF16, &h, err, sizeof err), FMX_OK);
    assert_int_equal(fmx_tensor_shape(h, shape, &dt), 2);
    assert_int_equal(dt, FMX_DT_BF16);
    uint16_t b[6];
    assert_int_equal(fmx_tensor_read(h, b, sizeof b, err, sizeof err), FMX_OK);
    assert_int_equal(b[0], 0x3f80); /* 1.0 in bfloat16 */
    /* too small a buffer is an error, not an overflow */
    assert_int_equal(fmx_tensor_read(h, b, 4, err, sizeof err), FMX_EINVAL);
    fmx_tensor_destroy(h);
    fmx_tensor_destroy(t);
    fmx_tensor_destroy(NULL);
}

/* ---- compile and run ---- */

static const char *k_linear_gelu =
    "import torch\n"
    "import torch.nn.functional as F\n"
    "from torch import Tensor\n"
    "from typing import Dict, Optional\n"
    "\n"
    "def mlp(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n"
    "    h = F.linear(x, weights[\"fc.weight\"], weights[\"fc.bias\"])\n"
    "    return F.gelu(h)\n"
    "\n"
    "def forward(x: Tensor, weights: Dict[str, Tensor], approximate: str = \"none\") -> Tensor:\n"
    "    return mlp(x, weights)\n";

static void test_linear_gelu(void **state) {
    (void)state;
    fmx_program *p = compile_ok(k_linear_gelu);
    assert_int_equal(fmx_program_nfunctions(p), 2);
    assert_string_equal(fmx_program_function(p, 0), "mlp");
    assert_string_equal(fmx_program_function(p, 1), "forward");
    fmx_param ps[8];
    assert_int_equal(fmx_program_params(p, "forward", ps, 8), 3);
    assert_string_equal(ps[0].name, "x");
    assert_int_equal(ps[0].kind, FMX_PARAM_TENSOR);
    assert_int_equal(ps[1].kind, FMX_PARAM_WEIGHTS);
    assert_int_equal(ps[2].kind, FMX_PARAM_STR);
    assert_int_equal(ps[2].has_default, 1);
    assert_int_equal(fmx_program_params(p, "nope", ps, 8), FMX_ENOTFOUND);

    float x[2 * 3], w[4 * 3], b[4];
    fill(x, 6, 1);
    fill(w, 12, 2);
    fill(b, 4, 3);
    fmx_tensor *tx = f32(x, 2, 2, 3, 0, 0), *tw = f32(w, 2, 4, 3, 0, 0),
               *tb = f32(b, 1, 4, 0, 0, 0);
    const char *keys[2] = {"fc.weight", "fc.bias"};
    const fmx_tensor *vals[2] = {tw, tb};
    fmx_args *a = fmx_args_create();
    assert_int_equal(fmx_args_weights(a, "weights", keys, vals, 2), FMX_OK);
    assert_int_equal(fmx_args_tensor(a, "x", tx), FMX_OK);
    fmx_run *r = run_ok(p, "forward", a);
    assert_int_equal(fmx_run_noutputs(r), 1);
    assert_true(fmx_run_ms(r) >= 0);
    float got[8];
    double want[8];
    read_f32(fmx_run_output(r, 0), got, 8);
    for (int i = 0; i < 2; i++)
        for (int o = 0; o < 4; o++) {
            double h = b[o];
            for (int k = 0; k < 3; k++)
                h += (double)x[i * 3 + k] * w[o * 3 + k];
            want[i * 4 + o] = gelu_ref(h);
        }
    assert_close(got, want, 8, 1e-5);
    fmx_run_destroy(r);

    /* unknown function, unknown and missing arguments */
    fmx_run *r2 = NULL;
    assert_int_equal(fmx_program_run(p, "nope", a, &r2, err, sizeof err), FMX_ENOTFOUND);
    assert_int_equal(fmx_args_int(a, "extra", 1), FMX_OK);
    assert_int_equal(fmx_program_run(p, "forward", a, &r2, err, sizeof err), FMX_EINVAL);
    assert_non_null(strstr(err, "'extra'"));
    fmx_args_clear(a);
    assert_int_equal(fmx_args_tensor(a, "x", tx), FMX_OK);
    assert_int_equal(fmx_program_run(p, "forward", a, &r2, err, sizeof err), FMX_EINVAL);
    assert_non_null(strstr(err, "missing argument 'weights'"));
    assert_null(r2);

    fmx_args_destroy(a);
    fmx_tensor_destroy(tx);
    fmx_tensor_destroy(tw);
    fmx_tensor_destroy(tb);
    fmx_program_destroy(p);
}

static void test_keyword_args(void **state) {
    (void)state;
    fmx_program *p = compile_ok("import torch\n"
                                "from torch import Tensor\n"
                                "from typing import Optional\n"
                                "\n"
                                "def f(x: Tensor, scale: float = 2.0, shift: int = 0,\n"
                                "      neg: bool = False, mode: str = \"add\",\n"
                                "      bias: Optional[Tensor] = None) -> Tensor:\n"
                                "    y = x * scale + shift\n"
                                "    if bias is not None:\n"
                                "        y = y + bias\n"
                                "    if mode == \"double\":\n"
                                "        y = y * 2\n"
                                "    if neg:\n"
                                "        y = -y\n"
                                "    return y\n");
    fmx_param ps[8];
    assert_int_equal(fmx_program_params(p, "f", ps, 8), 6);
    assert_int_equal(ps[1].kind, FMX_PARAM_FLOAT);
    assert_int_equal(ps[2].kind, FMX_PARAM_INT);
    assert_int_equal(ps[3].kind, FMX_PARAM_BOOL);
    assert_int_equal(ps[4].kind, FMX_PARAM_STR);
    assert_int_equal(ps[5].kind, FMX_PARAM_OPT_TENSOR);
    assert_int_equal(ps[0].has_default, 0);
    assert_int_equal(ps[5].has_default, 1);

    float x[3] = {1, 2, 3}, bias[3] = {10, 20, 30}, got[3];
    fmx_tensor *tx = f32(x, 1, 3, 0, 0, 0), *tb = f32(bias, 1, 3, 0, 0, 0);
    fmx_args *a = fmx_args_create();
    /* keyword order differs from the signature; an int where a float is declared */
    fmx_args_str(a, "mode", "double");
    fmx_args_bool(a, "neg", 1);
    fmx_args_int(a, "scale", 3);
    fmx_args_tensor(a, "bias", tb);
    fmx_args_int(a, "shift", 1);
    fmx_args_tensor(a, "x", tx);
    fmx_run *r = run_ok(p, "f", a);
    read_f32(fmx_run_output(r, 0), got, 3);
    double want[3];
    for (int i = 0; i < 3; i++)
        want[i] = -((x[i] * 3 + 1 + bias[i]) * 2);
    assert_close(got, want, 3, 1e-6);
    fmx_run_destroy(r);

    /* defaults, an explicit None, and a setter that replaces an earlier value */
    fmx_args_clear(a);
    fmx_args_tensor(a, "x", tb);
    fmx_args_tensor(a, "x", tx);
    fmx_args_none(a, "bias");
    r = run_ok(p, "f", a);
    read_f32(fmx_run_output(r, 0), got, 3);
    for (int i = 0; i < 3; i++)
        want[i] = x[i] * 2.0;
    assert_close(got, want, 3, 1e-6);
    fmx_run_destroy(r);

    /* a wrong type is the caller's error */
    fmx_args_str(a, "shift", "one");
    fmx_run *r2 = NULL;
    assert_int_equal(fmx_program_run(p, "f", a, &r2, err, sizeof err), FMX_EINVAL);
    assert_non_null(strstr(err, "shift"));

    fmx_args_destroy(a);
    fmx_tensor_destroy(tx);
    fmx_tensor_destroy(tb);
    fmx_program_destroy(p);
}

static void test_weights_dict_fresh_per_run(void **state) {
    (void)state;
    /* The candidate adds a key to its weights; the next run must not see it. */
    fmx_program *p = compile_ok("import torch\n"
                                "from torch import Tensor\n"
                                "from typing import Dict\n"
                                "\n"
                                "def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n"
                                "    if \"seen\" in weights:\n"
                                "        return x * 0\n"
                                "    weights[\"seen\"] = x\n"
                                "    return x + weights[\"w\"]\n");
    float x[2] = {1, 2}, w[2] = {10, 20}, got[2];
    double want[2] = {11, 22};
    fmx_tensor *tx = f32(x, 1, 2, 0, 0, 0), *tw = f32(w, 1, 2, 0, 0, 0);
    const char *keys[1] = {"w"};
    const fmx_tensor *vals[1] = {tw};
    fmx_args *a = fmx_args_create();
    fmx_args_tensor(a, "x", tx);
    fmx_args_weights(a, "weights", keys, vals, 1);
    for (int i = 0; i < 2; i++) {
        fmx_run *r = run_ok(p, "forward", a);
        read_f32(fmx_run_output(r, 0), got, 2);
        assert_close(got, want, 2, 0);
        fmx_run_destroy(r);
    }
    fmx_args_destroy(a);
    fmx_tensor_destroy(tx);
    fmx_tensor_destroy(tw);
    fmx_program_destroy(p);
}

static void test_constants(void **state) {
    (void)state;
    fmx_program *p = compile_ok("\"\"\"A candidate with top-level constants.\"\"\"\n"
                                "import math\n"
                                "import torch\n"
                                "from torch import Tensor\n"
                                "\n"
                                "EPS = 1e-6  # float\n"
                                "N = 3\n"
                                "SCALE: float = 1.0 / math.sqrt(16) + N  # uses math and N\n"
                                "SHAPE = (2,\n"
                                "         N)\n"
                                "NAMES = [\"a\", \"b\"]\n"
                                "USE_BIAS = True\n"
                                "NOTHING = None\n"
                                "TWO_PI = 2 * math.pi\n"
                                "DT = torch.float32\n"
                                "\n"
                                "def forward(x: Tensor) -> Tensor:\n"
                                "    names = NAMES\n"
                                "    names.append(\"c\")  # must not leak into the next run\n"
                                "    y = x.reshape(SHAPE).to(DT) * SCALE + EPS\n"
                                "    if USE_BIAS and NOTHING is None:\n"
                                "        y = y + float(len(names)) + TWO_PI\n"
                                "    return y\n");
    float x[6] = {0, 1, 2, 3, 4, 5}, got[6];
    double want[6];
    for (int i = 0; i < 6; i++)
        want[i] = x[i] * (0.25 + 3) + 1e-6 + 3 + 2 * M_PI;
    fmx_tensor *tx = f32(x, 1, 6, 0, 0, 0);
    fmx_args *a = fmx_args_create();
    fmx_args_tensor(a, "x", tx);
    for (int i = 0; i < 2; i++) {
        fmx_run *r = run_ok(p, "forward", a);
        int64_t shape[FMX_MAX_DIMS];
        assert_int_equal(fmx_tensor_shape(fmx_run_output(r, 0), shape, NULL), 2);
        assert_int_equal(shape[1], 3);
        read_f32(fmx_run_output(r, 0), got, 6);
        assert_close(got, want, 6, 1e-6);
        fmx_run_destroy(r);
    }
    fmx_args_destroy(a);
    fmx_tensor_destroy(tx);
    fmx_program_destroy(p);

    /* constants that are not plain values, or fail, name their line */
    compile_fails("import torch\n\nW = torch.ones(3)\n", FMX_ECOMPILE,
                  "cand.py:3:5:", "is a Tensor");
    compile_fails("A = 1\nB = 1 // 0\n", FMX_ECOMPILE, "cand.py:2:", "constant B");
    compile_fails("A = B + 1\nB = 2\n", FMX_ECOMPILE, "cand.py:1:5:", "undefined value B");
    compile_fails("A = 1\nA = 2\n", FMX_ECOMPILE, "cand.py:2:", "assigned twice");
}

static const char *k_tap_prog =
    "import math\n"
    "import torch\n"
    "import torch.nn.functional as F\n"
    "from torch import Tensor\n"
    "from typing import Dict\n"
    "\n"
    "EPS = 1e-6\n"
    "SCALE = 1.0 / math.sqrt(16)\n"
    "\n"
    "def tap(name: str, x: Tensor) -> Tensor:\n"
    "    return x\n"
    "\n"
    "def rms_norm(x: Tensor, w: Tensor) -> Tensor:\n"
    "    h = x.to(torch.float32)\n"
    "    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)\n"
    "    return w * h.to(x.dtype)\n"
    "\n"
    "def forward(hidden_states: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n"
    "    tap(\"input\", hidden_states)  # result unused: still recorded\n"
    "    for i in range(2):\n"
    "        hidden_states = tap(f\"layers.{i}\", rms_norm(hidden_states, "
    "weights[f\"layers.{i}.weight\"]))\n"
    "    return hidden_states * SCALE\n"
    "\n"
    "if __name__ == \"__main__\":\n"
    "    import sys\n"
    "    print(forward(torch.ones(2, 4), {}))\n";

static void rms_ref(const double *x, const float *w, double *y, int rows, int n) {
    for (int r = 0; r < rows; r++) {
        double ss = 0;
        for (int i = 0; i < n; i++)
            ss += x[r * n + i] * x[r * n + i];
        double inv = 1 / sqrt(ss / n + 1e-6);
        for (int i = 0; i < n; i++)
            y[r * n + i] = w[i] * x[r * n + i] * inv;
    }
}

static void test_tap_records_in_order(void **state) {
    (void)state;
    fmx_program *p = compile_ok(k_tap_prog);
    /* the candidate's own tap is dropped: fmx supplies it */
    assert_int_equal(fmx_program_nfunctions(p), 2);
    float x[8], w0[4], w1[4], got[8];
    fill(x, 8, 7);
    fill(w0, 4, 8);
    fill(w1, 4, 9);
    fmx_tensor *tx = f32(x, 2, 2, 4, 0, 0), *t0 = f32(w0, 1, 4, 0, 0, 0),
               *t1 = f32(w1, 1, 4, 0, 0, 0);
    const char *keys[2] = {"layers.0.weight", "layers.1.weight"};
    const fmx_tensor *vals[2] = {t0, t1};
    fmx_args *a = fmx_args_create();
    fmx_args_tensor(a, "hidden_states", tx);
    fmx_args_weights(a, "weights", keys, vals, 2);
    fmx_run *r = run_ok(p, "forward", a);
    assert_int_equal(fmx_run_ntaps(r), 3);
    assert_string_equal(fmx_run_tap_name(r, 0), "input");
    assert_string_equal(fmx_run_tap_name(r, 1), "layers.0");
    assert_string_equal(fmx_run_tap_name(r, 2), "layers.1");
    assert_null(fmx_run_tap_name(r, 3));
    double in[8], l0[8], l1[8], out[8];
    for (int i = 0; i < 8; i++)
        in[i] = x[i];
    rms_ref(in, w0, l0, 2, 4);
    rms_ref(l0, w1, l1, 2, 4);
    for (int i = 0; i < 8; i++)
        out[i] = l1[i] * 0.25;
    read_f32(fmx_run_tap(r, 0), got, 8);
    assert_close(got, in, 8, 0);
    read_f32(fmx_run_tap(r, 1), got, 8);
    assert_close(got, l0, 8, 1e-5);
    read_f32(fmx_run_tap(r, 2), got, 8);
    assert_close(got, l1, 8, 1e-5);
    read_f32(fmx_run_output(r, 0), got, 8);
    assert_close(got, out, 8, 1e-5);
    fmx_run_destroy(r);
    /* taps belong to one run */
    r = run_ok(p, "forward", a);
    assert_int_equal(fmx_run_ntaps(r), 3);
    fmx_run_destroy(r);
    fmx_args_destroy(a);
    fmx_tensor_destroy(tx);
    fmx_tensor_destroy(t0);
    fmx_tensor_destroy(t1);
    fmx_program_destroy(p);
}

static void test_output_owns_memory(void **state) {
    (void)state;
    /* An output that is the input itself must survive the caller's buffer. */
    fmx_program *p = compile_ok("from torch import Tensor\n"
                                "from typing import Tuple\n"
                                "def f(x: Tensor) -> Tuple[Tensor, Tensor]:\n"
                                "    return x, x.view(-1)[1:]\n");
    float *x = malloc(4 * sizeof *x);
    for (int i = 0; i < 4; i++)
        x[i] = (float)i + 1;
    fmx_tensor *tx = f32(x, 2, 2, 2, 0, 0);
    fmx_args *a = fmx_args_create();
    fmx_args_tensor(a, "x", tx);
    fmx_run *r = run_ok(p, "f", a);
    fmx_args_destroy(a);
    fmx_tensor_destroy(tx);
    memset(x, 0, 4 * sizeof *x);
    free(x);
    assert_int_equal(fmx_run_noutputs(r), 2);
    float got[4];
    double want[4] = {1, 2, 3, 4};
    read_f32(fmx_run_output(r, 0), got, 4);
    assert_close(got, want, 4, 0);
    read_f32(fmx_run_output(r, 1), got, 3);
    assert_close(got, want + 1, 3, 0);
    fmx_run_destroy(r);
    fmx_program_destroy(p);
}

/* ---- the F prelude ---- */

static void test_embedding_argument_order(void **state) {
    (void)state;
    fmx_program *p = compile_ok("import torch\n"
                                "from torch import nn\n"
                                "import torch.nn.functional as F\n"
                                "from torch import Tensor\n"
                                "def f(ids: Tensor, table: Tensor) -> Tensor:\n"
                                "    a = F.embedding(ids, table)\n"
                                "    b = nn.functional.embedding(ids, table, padding_idx=0)\n"
                                "    return a + b\n");
    float table[4 * 2] = {0, 1, 10, 11, 20, 21, 30, 31}, got[6];
    int64_t ids[3] = {3, 0, 2};
    fmx_tensor *tt = f32(table, 2, 4, 2, 0, 0), *ti = wrap(ids, FMX_DT_I64, 1, 3, 0, 0, 0);
    fmx_args *a = fmx_args_create();
    fmx_args_tensor(a, "ids", ti);
    fmx_args_tensor(a, "table", tt);
    fmx_run *r = run_ok(p, "f", a);
    double want[6] = {60, 62, 0, 2, 40, 42};
    read_f32(fmx_run_output(r, 0), got, 6);
    assert_close(got, want, 6, 0);
    fmx_run_destroy(r);
    fmx_args_destroy(a);
    fmx_tensor_destroy(tt);
    fmx_tensor_destroy(ti);
    fmx_program_destroy(p);
}

/* Runs f(x) of a one-input program on x (2, 4) and checks against want. */
static void check_unary(const char *body, const float *x, const double *want, double tol) {
    char src[2048];
    snprintf(
        src, sizeof src,
        "import math\nimport torch\nimport torch.nn.functional as F\nfrom torch import Tensor\n"
        "\ndef f(x: Tensor) -> Tensor:\n    return %s\n",
        body);
    fmx_program *p = compile_ok(src);
    float buf[8], got[8];
    memcpy(buf, x, sizeof buf);
    fmx_tensor *tx = f32(buf, 2, 2, 4, 0, 0);
    fmx_args *a = fmx_args_create();
    fmx_args_tensor(a, "x", tx);
    fmx_run *r = run_ok(p, "f", a);
    read_f32(fmx_run_output(r, 0), got, 8);
    assert_close(got, want, 8, tol);
    fmx_run_destroy(r);
    fmx_args_destroy(a);
    fmx_tensor_destroy(tx);
    fmx_program_destroy(p);
}

static void test_prelude_functions(void **state) {
    (void)state;
    const float x[8] = {0.5f, -1.0f, 2.0f, -0.25f, 1.5f, 0.25f, -0.75f, 3.0f};
    double want[8];
    /* softmax / log_softmax over the last dim, dim as keyword, dtype given */
    for (int r = 0; r < 2; r++) {
        double s = 0;
        for (int i = 0; i < 4; i++)
            s += exp(x[r * 4 + i]);
        for (int i = 0; i < 4; i++)
            want[r * 4 + i] = exp(x[r * 4 + i]) / s;
    }
    check_unary("F.softmax(x, dim=-1, dtype=torch.float32)", x, want, 1e-6);
    check_unary("F.softmin(-x, -1)", x, want, 1e-6);
    for (int i = 0; i < 8; i++)
        want[i] = log(want[i]);
    check_unary("F.log_softmax(x, -1)", x, want, 1e-6);
    /* activations, with Python-only arguments such as inplace */
    for (int i = 0; i < 8; i++)
        want[i] = gelu_ref(x[i]);
    check_unary("F.gelu(x)", x, want, 1e-6);
    for (int i = 0; i < 8; i++) {
        double v = x[i];
        want[i] = 0.5 * v * (1 + tanh(sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
    }
    check_unary("F.gelu(x, approximate='tanh')", x, want, 1e-6);
    for (int i = 0; i < 8; i++)
        want[i] = x[i] / (1 + exp(-x[i]));
    check_unary("F.silu(x, inplace=True)", x, want, 1e-6);
    for (int i = 0; i < 8; i++)
        want[i] = x[i] > 0 ? x[i] : 0;
    check_unary("F.relu(x, inplace=False)", x, want, 0);
    for (int i = 0; i < 8; i++)
        want[i] = x[i] > 0 ? x[i] : 0.1 * x[i];
    check_unary("F.leaky_relu(x, 0.1, True)", x, want, 1e-6);
    /* dropout: identity unless training */
    for (int i = 0; i < 8; i++)
        want[i] = x[i];
    check_unary("F.dropout(x, p=0.5, training=False)", x, want, 0);
    check_unary("F.dropout(x, 0.0)", x, want, 0);
    /* layer_norm with a tuple shape, weight and bias */
    for (int r = 0; r < 2; r++) {
        double m = 0, v = 0;
        for (int i = 0; i < 4; i++)
            m += x[r * 4 + i] / 4.0;
        for (int i = 0; i < 4; i++)
            v += (x[r * 4 + i] - m) * (x[r * 4 + i] - m) / 4.0;
        for (int i = 0; i < 4; i++)
            want[r * 4 + i] = (x[r * 4 + i] - m) / sqrt(v + 1e-5) * 2.0 + 1.0;
    }
    check_unary("F.layer_norm(x, (4,), torch.full([4], 2.0, device=x.device), "
                "torch.ones(4, device=x.device), eps=1e-5)",
                x, want, 1e-5);
    /* rms_norm (aten from torch 2.4 on, the prelude's before) */
    for (int r = 0; r < 2; r++) {
        double ms = 0;
        for (int i = 0; i < 4; i++)
            ms += x[r * 4 + i] * x[r * 4 + i] / 4.0;
        for (int i = 0; i < 4; i++)
            want[r * 4 + i] = x[r * 4 + i] / sqrt(ms + 1e-6) * 2.0;
    }
    check_unary("F.rms_norm(x, [4], torch.full([4], 2.0, device=x.device), eps=1e-6)", x, want,
                1e-5);
    /* torch.finfo of a dtype known at compile time or only at run time */
    for (int i = 0; i < 8; i++)
        want[i] = x[i] > 0 ? -3.4028234663852886 : x[i];
    check_unary("x.masked_fill(x > 0, torch.finfo(x.dtype).min / 1e38)", x, want, 1e-6);
    for (int i = 0; i < 8; i++)
        want[i] = x[i] + 0.0078125 + 65504;
    check_unary("x + torch.finfo(torch.bfloat16).eps + torch.finfo(torch.half).max", x, want, 1e-6);
    /* normalize: L2 over dim 1 */
    for (int r = 0; r < 2; r++) {
        double n = 0;
        for (int i = 0; i < 4; i++)
            n += x[r * 4 + i] * x[r * 4 + i];
        for (int i = 0; i < 4; i++)
            want[r * 4 + i] = x[r * 4 + i] / sqrt(n);
    }
    check_unary("F.normalize(x, dim=1)", x, want, 1e-6);
    /* pad: constant mode, one column each side, then cut back to (2, 4) */
    for (int r = 0; r < 2; r++) {
        want[r * 4 + 0] = 7;
        for (int i = 1; i < 4; i++)
            want[r * 4 + i] = x[r * 4 + i - 1];
    }
    check_unary("F.pad(x, [1, 1], value=7.0)[:, :4]", x, want, 0);
    for (int r = 0; r < 2; r++) {
        want[r * 4 + 0] = 0;
        for (int i = 1; i < 4; i++)
            want[r * 4 + i] = x[r * 4 + i - 1];
    }
    check_unary("F.pad(x, (1, 0))[:, :4]", x, want, 0);
    /* linear without bias: x @ I * 3 */
    for (int i = 0; i < 8; i++)
        want[i] = 3.0 * x[i];
    check_unary("F.linear(x, torch.eye(4, device=x.device) * 3)", x, want, 1e-6);
    /* math and torch constants, dtype names */
    for (int i = 0; i < 8; i++)
        want[i] = x[i] * M_PI + M_E;
    check_unary("(x.to(torch.float64) * math.pi + math.e).to(torch.float)", x, want, 1e-6);
    for (int i = 0; i < 8; i++)
        want[i] = sqrt(2.0) * x[i];
    check_unary("x * math.sqrt(2)", x, want, 1e-6);
}

/* Reference attention for (B, H, L, E) inputs; mask (L, S) of keep flags or NULL. */
static void sdpa_ref(const float *q, const float *k, const float *v, int B, int H, int L, int S,
                     int E, const int *keep, const float *add, double scale, double *out) {
    for (int bh = 0; bh < B * H; bh++)
        for (int i = 0; i < L; i++) {
            double s[16], m = -INFINITY, z = 0;
            for (int j = 0; j < S; j++) {
                double d = 0;
                for (int e = 0; e < E; e++)
                    d += (double)q[(bh * L + i) * E + e] * k[(bh * S + j) * E + e];
                s[j] = d * scale + (add ? add[i * S + j] : 0);
                if (keep && !keep[i * S + j]) s[j] = -INFINITY;
                if (s[j] > m) m = s[j];
            }
            for (int j = 0; j < S; j++)
                z += s[j] == -INFINITY ? 0 : exp(s[j] - m);
            for (int e = 0; e < E; e++) {
                double o = 0;
                for (int j = 0; j < S; j++)
                    if (s[j] != -INFINITY) o += exp(s[j] - m) / z * v[(bh * S + j) * E + e];
                out[(bh * L + i) * E + e] = o;
            }
        }
}

static void test_scaled_dot_product_attention(void **state) {
    (void)state;
    enum { B = 2, H = 2, L = 3, S = 3, E = 4, N = B * H * L * E };
    fmx_program *p = compile_ok(
        "import torch\n"
        "import torch.nn.functional as F\n"
        "from torch import Tensor\n"
        "from typing import Tuple\n"
        "\n"
        "def f(q: Tensor, k: Tensor, v: Tensor, m: Tensor, bias: Tensor)"
        " -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:\n"
        "    plain = F.scaled_dot_product_attention(q, k, v)\n"
        "    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)\n"
        "    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=m)\n"
        "    added = F.scaled_dot_product_attention(q, k, v, bias, scale=0.5)\n"
        "    gqa = F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True)\n"
        "    return plain, causal, masked, added, gqa\n");
    float q[N], k[N], v[N], bias[L * S], got[N];
    fill(q, N, 11);
    fill(k, N, 12);
    fill(v, N, 13);
    fill(bias, L * S, 14);
    uint8_t m[L * S] = {1, 0, 1, 1, 1, 0, 0, 0, 1};
    int keep[L * S], causal[L * S];
    for (int i = 0; i < L * S; i++)
        keep[i] = m[i];
    for (int i = 0; i < L; i++)
        for (int j = 0; j < S; j++)
            causal[i * S + j] = j <= i;
    fmx_tensor *tq = f32(q, 4, B, H, L, E), *tk = f32(k, 4, B, H, S, E),
               *tv = f32(v, 4, B, H, S, E), *tm = wrap(m, FMX_DT_BOOL, 2, L, S, 0, 0),
               *tb = f32(bias, 2, L, S, 0, 0);
    fmx_args *a = fmx_args_create();
    fmx_args_tensor(a, "q", tq);
    fmx_args_tensor(a, "k", tk);
    fmx_args_tensor(a, "v", tv);
    fmx_args_tensor(a, "m", tm);
    fmx_args_tensor(a, "bias", tb);
    fmx_run *r = run_ok(p, "f", a);
    assert_int_equal(fmx_run_noutputs(r), 5);
    double want[N], scale = 1 / sqrt((double)E);
    sdpa_ref(q, k, v, B, H, L, S, E, NULL, NULL, scale, want);
    read_f32(fmx_run_output(r, 0), got, N);
    assert_close(got, want, N, 1e-5);
    sdpa_ref(q, k, v, B, H, L, S, E, causal, NULL, scale, want);
    read_f32(fmx_run_output(r, 1), got, N);
    assert_close(got, want, N, 1e-5);
    sdpa_ref(q, k, v, B, H, L, S, E, keep, NULL, scale, want);
    read_f32(fmx_run_output(r, 2), got, N);
    assert_close(got, want, N, 1e-5);
    sdpa_ref(q, k, v, B, H, L, S, E, NULL, bias, 0.5, want);
    read_f32(fmx_run_output(r, 3), got, N);
    assert_close(got, want, N, 1e-5);
    /* grouped-query: every query head reads kv head 0 */
    float k1[N], v1[N];
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < S * E; i++) {
                k1[((b * H + h) * S * E) + i] = k[(b * H * S * E) + i];
                v1[((b * H + h) * S * E) + i] = v[(b * H * S * E) + i];
            }
    sdpa_ref(q, k1, v1, B, H, L, S, E, NULL, NULL, scale, want);
    read_f32(fmx_run_output(r, 4), got, N);
    assert_close(got, want, N, 1e-5);
    fmx_run_destroy(r);
    fmx_args_destroy(a);
    fmx_tensor_destroy(tq);
    fmx_tensor_destroy(tk);
    fmx_tensor_destroy(tv);
    fmx_tensor_destroy(tm);
    fmx_tensor_destroy(tb);
    fmx_program_destroy(p);
}

/* ---- refusals: status and the candidate's line ---- */

/* A function whose line 6 is `stmt`. */
static void refused(const char *stmt, int status, const char *needle) {
    char src[1024];
    snprintf(src, sizeof src,
             "import torch\n"
             "from torch import Tensor\n"
             "\n"
             "def forward(x: Tensor) -> Tensor:\n"
             "    y = x * 2\n"
             "%s\n"
             "    return y\n",
             stmt);
    compile_fails(src, status, "cand.py:6:", needle);
}

static void test_refusals(void **state) {
    (void)state;
    refused("    z = torch.from_file(\"/etc/passwd\", False, 10)", FMX_EFORBIDDEN, "from_file");
    refused("    torch.save(y, \"/tmp/y.pt\")", FMX_EFORBIDDEN, "torch.save");
    refused("    y = torch.ops.aten.add(y, y)", FMX_EFORBIDDEN, "torch.ops");
    refused("    print(y)", FMX_EFORBIDDEN, "print");
    refused("    y.add_(1)", FMX_EFORBIDDEN, "must be functional");
    refused("    y += 1", FMX_EFORBIDDEN, "x = x + y");
    refused("    y[0] = 1", FMX_EFORBIDDEN, "must be functional");
    refused("    y = torch.add(x, x, out=y)", FMX_EFORBIDDEN, "must be functional");
    refused("    y = torch.as_strided(y, [1], [1])", FMX_EFORBIDDEN, "allowlist");
    refused("    y = torch.nn.Linear(3, 3)", FMX_EFORBIDDEN, "nn modules");
    refused("    torch.manual_seed(0)", FMX_EFORBIDDEN, "manual_seed");
    refused("    y = torch.batch_norm(y, None, None, y, y, True, 0.1, 1e-5, False)", FMX_EFORBIDDEN,
            "running statistics");
    refused("    y = y +* 2", FMX_ECOMPILE, NULL);
    refused("    y = undefined_name(y)", FMX_ECOMPILE, "undefined value undefined_name");
    /* list and dict mutation is fine */
    fmx_program_destroy(compile_ok("from torch import Tensor\n"
                                   "from typing import Dict, List\n"
                                   "def f(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n"
                                   "    xs: List[Tensor] = []\n"
                                   "    xs.append(x)\n"
                                   "    xs[0] = x * 2\n"
                                   "    weights[\"y\"] = x\n"
                                   "    return xs[0]\n"));

    /* top level */
    compile_fails("import torch\nimport os\n", FMX_EFORBIDDEN, "cand.py:2:1: import not allowed",
                  "'import os'");
    compile_fails("from os import path\n", FMX_EFORBIDDEN, "cand.py:1:1:", "from os import path");
    compile_fails("import numpy as np\n", FMX_EFORBIDDEN, "cand.py:1:1:", NULL);
    compile_fails("import torch\n\n@torch.jit.script\ndef f(x: int) -> int:\n    return x\n",
                  FMX_EFORBIDDEN, "cand.py:3:1:", "decorators");
    compile_fails("import torch\n\nclass M:\n    pass\n", FMX_EFORBIDDEN,
                  "cand.py:3:1:", "classes");
    compile_fails("import torch\ntorch.manual_seed(0)\n", FMX_EFORBIDDEN,
                  "cand.py:2:1:", "top level");
    compile_fails("def f(x: int) -> int:\n    return x +\n", FMX_ECOMPILE, "cand.py:2:", NULL);
    /* names are bound by imports, as in Python */
    compile_fails("import torch\ndef f(x: float) -> float:\n    return math.sqrt(x)\n",
                  FMX_ECOMPILE, "cand.py:3:12:", "math");
    /* a runtime-only op reached through another candidate function names its line */
    compile_fails("import torch\nfrom torch import Tensor\n\ndef g(x: Tensor) -> Tensor:\n"
                  "    return x.mul_(2)\n\ndef f(x: Tensor) -> Tensor:\n    return g(x)\n",
                  FMX_EFORBIDDEN, "cand.py:5:", "aten::mul_");
    /* the allowed import forms */
    fmx_program_destroy(compile_ok("from __future__ import annotations\n"
                                   "import math\n"
                                   "import typing\n"
                                   "import torch\n"
                                   "import torch.nn.functional as F\n"
                                   "from torch.nn import functional as G\n"
                                   "from torch import Tensor, nn\n"
                                   "from typing import (Dict,\n"
                                   "                    List, Optional, Tuple)\n"
                                   "def f(x: Tensor) -> Tensor:\n"
                                   "    return F.relu(G.relu(nn.functional.relu(x)))\n"));
}

/* ---- the source model: what is dropped is what the LOC counter counts zero ---- */

/* The names of p's functions, space-separated. */
static const char *functions_of(const fmx_program *p) {
    static char buf[256];
    buf[0] = '\0';
    for (int i = 0; i < fmx_program_nfunctions(p); i++)
        snprintf(buf + strlen(buf), sizeof buf - strlen(buf), "%s%s", i ? " " : "",
                 fmx_program_function(p, i));
    return buf;
}

static void test_source_model(void **state) {
    (void)state;
    /* A line holding only a backslash: CPython indents the def after it as
     * the next line is (inside tap here), TorchScript as the backslash is
     * (top level). The preprocessing reads CPython's model and refuses the
     * line rather than compile one meaning while Python runs another. */
    compile_fails("from torch import Tensor\n"
                  "def tap(name: str, x: Tensor) -> Tensor:\n"
                  "    return x\n"
                  "\\\n"
                  "    def forward(x: Tensor) -> Tensor:\n"
                  "        return x * 2\n",
                  FMX_ECOMPILE, "cand.py:4:1:", "starts with a backslash continuation");
    compile_fails("from torch import Tensor\n"
                  "def forward(x: Tensor) -> Tensor:\n"
                  "    y = x\n"
                  "  \\\n"
                  "    return y\n",
                  FMX_ECOMPILE, "cand.py:4:1:", "starts with a backslash continuation");
    /* A string continued by a backslash over a line end: the def in it is
     * text, as in Python; a backslash in the middle of a line still joins. */
    fmx_program *p = compile_ok("from torch import Tensor\n"
                                "def tap(name: str, x: Tensor) -> Tensor:\n"
                                "    s = 'abc\\\n"
                                "def forward(x: Tensor) -> Tensor: return x'\n"
                                "    return x\n"
                                "def g(x: Tensor) -> Tensor:\n"
                                "    return x + \\\n"
                                "        1\n");
    assert_string_equal(functions_of(p), "g");
    fmx_program_destroy(p);
    /* \r\n line ends; `"__main__" == __name__` and a tap block with a
     * comment at column 0 and blank lines inside are dropped whole; a
     * decorated-looking line inside tap goes with it */
    p = compile_ok("import torch\r\n"
                   "from torch import Tensor\r\n"
                   "def tap(name: str, x: Tensor) -> Tensor:\r\n"
                   "    y = x\r\n"
                   "# a comment at column 0\r\n"
                   "\r\n"
                   "    return y\r\n"
                   "def forward(x: Tensor) -> Tensor:\r\n"
                   "    return tap('out', x * 2)\r\n"
                   "if '__main__' == __name__:\r\n"
                   "    print(forward(torch.ones(2)))\r\n");
    assert_string_equal(functions_of(p), "forward");
    fmx_program_destroy(p);
    /* constants: an annotation, a backslash before the `=`, comments and an
     * f-string after it */
    p = compile_ok("from torch import Tensor\n"
                   "N: int = 1 + \\\n"
                   "    2  # three\n"
                   "M \\\n"
                   "  = N * 2  # six\n"
                   "S = f\"{N}-{M}\"  # '3-6'\n"
                   "def forward(x: Tensor) -> Tensor:\n"
                   "    return x * M + len(S)\n");
    float x[2] = {1, 2}, got[2];
    fmx_tensor *tx = f32(x, 1, 2, 0, 0, 0);
    fmx_args *a = fmx_args_create();
    fmx_args_tensor(a, "x", tx);
    fmx_run *r = run_ok(p, "forward", a);
    read_f32(fmx_run_output(r, 0), got, 2);
    assert_true(got[0] == 9 && got[1] == 15);
    fmx_run_destroy(r);
    fmx_args_destroy(a);
    fmx_tensor_destroy(tx);
    fmx_program_destroy(p);
    /* what the model tells apart at the top level */
    compile_fails("N: int\n", FMX_EFORBIDDEN, "cand.py:1:1:", "not allowed at top level");
    compile_fails("import math\n    import torch\n", FMX_ECOMPILE,
                  "cand.py:2:5:", "unexpected indent");
    compile_fails("from . import x\n", FMX_EFORBIDDEN, "cand.py:1:1:", "'from . import x'");
    compile_fails("async def f():\n    pass\n", FMX_EFORBIDDEN, "cand.py:1:1:", "async");
    compile_fails("@dec\nclass C:\n    pass\n", FMX_EFORBIDDEN, "cand.py:1:1:", "decorators");
    /* f-strings are the model's: fields with comparisons rewrite; specs,
     * conversions, `=` and f-strings over lines are refused */
    p = compile_ok("from torch import Tensor\n"
                   "def forward(x: Tensor) -> Tensor:\n"
                   "    s = f'{{a}}{x.dim() == 1}{x.dim() + 1}'\n"
                   "    assert s == '{a}True2', s\n"
                   "    return x\n");
    a = fmx_args_create();
    tx = f32(x, 1, 2, 0, 0, 0);
    fmx_args_tensor(a, "x", tx);
    fmx_run_destroy(run_ok(p, "forward", a));
    fmx_args_destroy(a);
    fmx_tensor_destroy(tx);
    fmx_program_destroy(p);
    refused("    s = f'{y.dim()=}'", FMX_ECOMPILE, "format specs, conversions and =");
    refused("    s = f'a\\\nb'", FMX_ECOMPILE, "over several lines");
    /* the limits see f-string fields as the code they become */
    char deep[2048];
    snprintf(deep, sizeof deep, "    s = f'{%s1%s}'",
             "((((((((((((((((((((((((((((((((((((((("
             "(((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((("
             "(((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((("
             "((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((",
             "))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))"
             "))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))"
             "))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))"
             ")))))))))))))))))))))))))))))))))))))))");
    refused(deep, FMX_ECOMPILE, "brackets nested more than 256 deep");
}

/* ---- runtime errors ---- */

static void test_runtime_errors(void **state) {
    (void)state;
    fmx_program *p = compile_ok("import torch\n"
                                "from torch import Tensor\n"
                                "from typing import Dict, Tuple\n"
                                "\n"
                                "def project(x: Tensor, w: Tensor) -> Tensor:\n"
                                "    return torch.matmul(x, w)\n"
                                "\n"
                                "def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n"
                                "    h = project(x, weights[\"proj\"])\n"
                                "    return h + weights[\"layers.0.missing\"]\n"
                                "\n"
                                "def count(x: Tensor) -> int:\n"
                                "    return x.size(0)\n"
                                "\n"
                                "def pair(x: Tensor) -> Tuple[Tensor, int]:\n"
                                "    return x, 1\n"
                                "\n"
                                "def raises(x: Tensor) -> Tensor:\n"
                                "    if x.size(0) == 2:\n"
                                "        raise ValueError(\"two rows\")\n"
                                "    return x\n");
    float x[6] = {1, 2, 3, 4, 5, 6};
    fmx_tensor *tx = f32(x, 2, 2, 3, 0, 0), *tw = f32(x, 2, 2, 3, 0, 0),
               *tw2 = f32(x, 2, 3, 2, 0, 0);
    const char *keys[1] = {"proj"};
    const fmx_tensor *vals[1] = {tw};
    fmx_args *a = fmx_args_create();
    fmx_args_tensor(a, "x", tx);
    fmx_args_weights(a, "weights", keys, vals, 1);
    fmx_run *r = NULL;
    /* shape error inside a helper: the helper's line */
    assert_int_equal(fmx_program_run(p, "forward", a, &r, err, sizeof err), FMX_ERUNTIME);
    assert_null(r);
    if (!strstr(err, "cand.py:6:") || !strstr(err, "torch.matmul(x, w)"))
        fail_msg("shape error: %s", err);
    /* a missing weight key names the key and its line */
    vals[0] = tw2;
    fmx_args_weights(a, "weights", keys, vals, 1);
    assert_int_equal(fmx_program_run(p, "forward", a, &r, err, sizeof err), FMX_ERUNTIME);
    if (!strstr(err, "cand.py:10:") || !strstr(err, "layers.0.missing"))
        fail_msg("missing key: %s", err);
    /* outputs must be tensors */
    fmx_args_clear(a);
    fmx_args_tensor(a, "x", tx);
    assert_int_equal(fmx_program_run(p, "count", a, &r, err, sizeof err), FMX_ERUNTIME);
    if (!strstr(err, "cand.py:12:") || !strstr(err, "int")) fail_msg("int output: %s", err);
    assert_int_equal(fmx_program_run(p, "pair", a, &r, err, sizeof err), FMX_ERUNTIME);
    if (!strstr(err, "Tensors")) fail_msg("tuple output: %s", err);
    /* a raise in the candidate */
    assert_int_equal(fmx_program_run(p, "raises", a, &r, err, sizeof err), FMX_ERUNTIME);
    if (!strstr(err, "cand.py:20:") || !strstr(err, "ValueError: two rows"))
        fail_msg("raise: %s", err);
    fmx_args_destroy(a);
    fmx_tensor_destroy(tx);
    fmx_tensor_destroy(tw);
    fmx_tensor_destroy(tw2);
    fmx_program_destroy(p);
}

/* ---- compare ---- */

static fmx_compare_result compare(const fmx_tensor *got, const fmx_tensor *want,
                                  const fmx_tensor *mask, double atol, double rtol) {
    fmx_compare_result res;
    fmx_tolerance tol = {atol, rtol};
    assert_int_equal(fmx_compare(got, want, mask, tol, &res, err, sizeof err), FMX_OK);
    return res;
}

/* got as a (2, 3, 2) tensor, wrapped anew: on cuda a wrap is a copy. */
static fmx_tensor *rewrap(fmx_tensor *old, float *got) {
    fmx_tensor_destroy(old);
    return f32(got, 3, 2, 3, 2, 0);
}

static void test_compare(void **state) {
    (void)state;
    float want[2 * 3 * 2] = {1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6};
    float got[12];
    memcpy(got, want, sizeof got);
    fmx_tensor *tw = f32(want, 3, 2, 3, 2, 0), *tg = rewrap(NULL, got);
    double rms = sqrt((1 + 4 + 9 + 16 + 25 + 36) / 6.0);

    fmx_compare_result r = compare(tg, tw, NULL, 1e-6, 0);
    assert_true(r.pass && r.shape_ok && r.dtype_ok);
    assert_int_equal(r.compared, 12);
    assert_int_equal(r.bad, 0);
    assert_true(fabs(r.scale - rms) < 1e-9);
    assert_true(r.max_abs == 0);

    /* one element off by 0.5 at [1, 2, 1] */
    got[11] = -5.5f;
    tg = rewrap(tg, got);
    r = compare(tg, tw, NULL, 1e-3, 0);
    assert_false(r.pass);
    assert_int_equal(r.bad, 1);
    assert_true(fabs(r.max_abs - 0.5) < 1e-9);
    assert_true(fabs(r.max_rel - 0.5 / 6) < 1e-9);
    assert_int_equal(r.worst_ndim, 3);
    assert_int_equal(r.worst[0], 1);
    assert_int_equal(r.worst[1], 2);
    assert_int_equal(r.worst[2], 1);
    assert_true(r.worst_got == -5.5 && r.worst_want == -6);
    /* within a looser tolerance: atol in units of the RMS, rtol of |want| */
    assert_true(compare(tg, tw, NULL, 0.5 / rms + 1e-9, 0).pass);
    assert_true(compare(tg, tw, NULL, 0, 0.5 / 6 + 1e-9).pass);

    /* NaN never passes, whatever the tolerance */
    got[11] = -6;
    got[0] = NAN;
    tg = rewrap(tg, got);
    r = compare(tg, tw, NULL, 1e30, 1e30);
    assert_false(r.pass);
    assert_int_equal(r.nonfinite, 1);
    assert_int_equal(r.bad, 1);
    assert_int_equal(r.worst[0], 0);
    assert_int_equal(r.worst[1], 0);
    assert_int_equal(r.worst[2], 0);

    /* a (B, T) mask excludes the row holding the NaN */
    uint8_t keep[2 * 3] = {0, 1, 1, 1, 1, 1};
    fmx_tensor *tm = wrap(keep, FMX_DT_U8, 2, 2, 3, 0, 0);
    r = compare(tg, tw, tm, 1e-6, 0);
    assert_true(r.pass);
    assert_int_equal(r.compared, 10);
    assert_true(fabs(r.scale - sqrt((4 + 9 + 16 + 25 + 36) * 2 / 10.0)) < 1e-9);
    /* a mask of the wrong shape is the caller's error */
    fmx_tensor *tm_bad = wrap(keep, FMX_DT_U8, 2, 3, 2, 0, 0);
    fmx_compare_result res;
    fmx_tolerance tol = {1e-6, 0};
    assert_int_equal(fmx_compare(tg, tw, tm_bad, tol, &res, err, sizeof err), FMX_EINVAL);

    /* shape and dtype mismatches are results, not errors */
    fmx_tensor *flat = f32(got, 1, 12, 0, 0, 0);
    r = compare(flat, tw, NULL, 1, 1);
    assert_false(r.shape_ok);
    assert_false(r.pass);
    got[0] = 1;
    tg = rewrap(tg, got);
    fmx_tensor *g64 = NULL;
    assert_int_equal(fmx_tensor_cast(tg, FMX_DT_F64, &g64, err, sizeof err), FMX_OK);
    r = compare(g64, tw, NULL, 1e-6, 0);
    assert_true(r.shape_ok);
    assert_false(r.dtype_ok);
    assert_false(r.pass);
    assert_int_equal(r.bad, 0);

    fmx_tensor_destroy(g64);
    fmx_tensor_destroy(flat);
    fmx_tensor_destroy(tm_bad);
    fmx_tensor_destroy(tm);
    fmx_tensor_destroy(tg);
    fmx_tensor_destroy(tw);
}

/* Both paths of fmx_compare (the cpu loop, the tensor ops cuda takes) give
 * the same result field by field, NaN and inf included. */
static int same_double(double a, double b) {
    return (isnan(a) && isnan(b)) || a == b;
}

static void assert_same_result(const fmx_compare_result *a, const fmx_compare_result *b) {
    assert_int_equal(a->shape_ok, b->shape_ok);
    assert_int_equal(a->dtype_ok, b->dtype_ok);
    assert_int_equal(a->pass, b->pass);
    assert_int_equal(a->compared, b->compared);
    assert_int_equal(a->bad, b->bad);
    assert_int_equal(a->nonfinite, b->nonfinite);
    assert_true(same_double(a->max_abs, b->max_abs));
    assert_true(same_double(a->max_rel, b->max_rel));
    assert_true(same_double(a->scale, b->scale));
    assert_int_equal(a->worst_ndim, b->worst_ndim);
    for (int d = 0; d < a->worst_ndim; d++)
        assert_int_equal(a->worst[d], b->worst[d]);
    assert_true(same_double(a->worst_got, b->worst_got));
    assert_true(same_double(a->worst_want, b->worst_want));
}

static fmx_compare_result compare_both(const fmx_tensor *got, const fmx_tensor *want,
                                       const fmx_tensor *mask, double atol, double rtol) {
    fmx_compare_result a, b;
    fmx_tolerance tol = {atol, rtol};
    assert_int_equal(fmx_compare(got, want, mask, tol, &a, err, sizeof err), FMX_OK);
    assert_int_equal(fmx__compare_tensor_path(got, want, mask, tol, &b, err, sizeof err), FMX_OK);
    assert_same_result(&a, &b);
    return a;
}

static void test_compare_paths_agree(void **state) {
    (void)state;
    /* finite, NaN against finite, NaN against NaN, inf against inf, -inf
     * against inf, finite against inf, and exact zeros (0·inf allowances) */
    float want[2 * 3 * 2] = {1, -2, 3, NAN, INFINITY, -INFINITY, 0.5f, 4, -1, 2, INFINITY, 0};
    float got[2 * 3 * 2] = {1, -2.5f, NAN, NAN, INFINITY, INFINITY, 0.5f, 4.25f, -1, 2, 7, 0};
    fmx_tensor *tw = f32(want, 3, 2, 3, 2, 0), *tg = f32(got, 3, 2, 3, 2, 0);
    uint8_t keep[2 * 3] = {0, 1, 1, 1, 1, 1}, none[2 * 3] = {0};
    fmx_tensor *tm = wrap(keep, FMX_DT_U8, 2, 2, 3, 0, 0);
    fmx_tensor *tm0 = wrap(none, FMX_DT_U8, 2, 2, 3, 0, 0);
    /* a mask over more leading dims (a KV cache's (B, heads, L) for (B, heads, L, D)) */
    uint8_t keep3[2 * 3 * 2] = {1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 1};
    fmx_tensor *tm3 = wrap(keep3, FMX_DT_U8, 3, 2, 3, 2, 0);
    fmx_tensor *g64 = NULL;
    assert_int_equal(fmx_tensor_cast(tg, FMX_DT_F64, &g64, err, sizeof err), FMX_OK);
    const double tols[][2] = {{1e-6, 0}, {0.1, 0.1},    {1e30, 1e30},
                              {0, 0},    {INFINITY, 0}, {0, INFINITY}};
    for (size_t i = 0; i < sizeof tols / sizeof tols[0]; i++) {
        compare_both(tg, tw, NULL, tols[i][0], tols[i][1]);
        compare_both(tg, tw, tm, tols[i][0], tols[i][1]);
        compare_both(tg, tw, tm0, tols[i][0], tols[i][1]);
        compare_both(tg, tw, tm3, tols[i][0], tols[i][1]);
        compare_both(g64, tw, NULL, tols[i][0], tols[i][1]);
        compare_both(tw, tw, NULL, tols[i][0], tols[i][1]);
    }

    /* what the policy says, on either path: non-finite never passes (inf
     * does not match inf), max_rel is +inf where diff is, and the worst is
     * the first element beyond any allowance (got NaN at [0, 1, 0]) */
    fmx_compare_result r = compare_both(tg, tw, NULL, 1e30, 1e30);
    assert_int_equal(r.compared, 12);
    assert_int_equal(r.bad, 5);
    assert_int_equal(r.nonfinite, 4);
    assert_true(isinf(r.max_abs) && isinf(r.max_rel));
    assert_true(fabs(r.scale - sqrt(35.25 / 8)) < 1e-12);
    assert_int_equal(r.worst[0], 0);
    assert_int_equal(r.worst[1], 1);
    assert_int_equal(r.worst[2], 0);
    /* nothing graded: nothing fails, nothing is worst */
    r = compare_both(tg, tw, tm0, 1e-6, 0);
    assert_true(r.pass);
    assert_int_equal(r.compared, 0);
    assert_true(r.max_abs == 0 && r.max_rel == 0 && r.worst_got == 0 && r.worst_want == 0);
    /* the 3-dim mask grades its 8 kept elements, of the 5 bad ones those at
     * [0, 1, 0], [0, 1, 1] (NaN) and [0, 2, 1] (inf against -inf); the first
     * of them is worst */
    r = compare_both(tg, tw, tm3, 1e30, 1e30);
    assert_int_equal(r.compared, 8);
    assert_int_equal(r.bad, 3);
    assert_int_equal(r.worst[0], 0);
    assert_int_equal(r.worst[1], 1);
    assert_int_equal(r.worst[2], 0);
    /* a mask that is not want's leading dims is refused, on either path */
    fmx_tensor *bad = wrap(keep3, FMX_DT_U8, 2, 3, 2, 0, 0);
    fmx_compare_result rb;
    fmx_tolerance tol = {1e-6, 0};
    assert_int_equal(fmx_compare(tg, tw, bad, tol, &rb, err, sizeof err), FMX_EINVAL);
    assert_non_null(strstr(err, "leading dims"));
    assert_int_equal(fmx__compare_tensor_path(tg, tw, bad, tol, &rb, err, sizeof err), FMX_EINVAL);
    fmx_tensor_destroy(bad);

    fmx_tensor_destroy(g64);
    fmx_tensor_destroy(tm3);
    fmx_tensor_destroy(tm0);
    fmx_tensor_destroy(tm);
    fmx_tensor_destroy(tg);
    fmx_tensor_destroy(tw);
}

/* ---- compile time of a realistic candidate (printed, not asserted) ---- */

static const char *k_decoder =
    "\"\"\"A small Llama-style decoder, flat and functional.\"\"\"\n"
    "import math\n"
    "import torch\n"
    "import torch.nn.functional as F\n"
    "from torch import Tensor\n"
    "from typing import Dict, List, Optional, Tuple\n"
    "\n"
    "EPS = 1e-6\n"
    "N_HEADS = 4\n"
    "N_KV_HEADS = 2\n"
    "ROPE_THETA = 10000.0\n"
    "\n"
    "def tap(name: str, x: Tensor) -> Tensor:\n"
    "    return x\n"
    "\n"
    "def rms_norm(x: Tensor, w: Tensor) -> Tensor:\n"
    "    h = x.to(torch.float32)\n"
    "    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)\n"
    "    return w * h.to(x.dtype)\n"
    "\n"
    "def rope(pos: Tensor, dim: int) -> Tuple[Tensor, Tensor]:\n"
    "    inv = torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim\n"
    "    inv = 1.0 / (ROPE_THETA ** inv)\n"
    "    freqs = pos.to(torch.float32)[:, None] * inv[None, :]\n"
    "    emb = torch.cat([freqs, freqs], dim=-1)\n"
    "    return emb.cos(), emb.sin()\n"
    "\n"
    "def rotate_half(x: Tensor) -> Tensor:\n"
    "    half = x.shape[-1] // 2\n"
    "    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)\n"
    "\n"
    "def attention(x: Tensor, w: Dict[str, Tensor], p: str, cos: Tensor, sin: Tensor,\n"
    "              mask: Optional[Tensor]) -> Tensor:\n"
    "    b, t, c = x.shape\n"
    "    hd = c // N_HEADS\n"
    "    q = F.linear(x, w[p + \"q_proj.weight\"]).view(b, t, N_HEADS, hd).transpose(1, 2)\n"
    "    k = F.linear(x, w[p + \"k_proj.weight\"]).view(b, t, N_KV_HEADS, hd).transpose(1, 2)\n"
    "    v = F.linear(x, w[p + \"v_proj.weight\"]).view(b, t, N_KV_HEADS, hd).transpose(1, 2)\n"
    "    q = q * cos + rotate_half(q) * sin\n"
    "    k = k * cos + rotate_half(k) * sin\n"
    "    rep = N_HEADS // N_KV_HEADS\n"
    "    k = k.repeat_interleave(rep, dim=1)\n"
    "    v = v.repeat_interleave(rep, dim=1)\n"
    "    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(hd)\n"
    "    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()\n"
    "    scores = scores.masked_fill(~causal, float(\"-inf\"))\n"
    "    if mask is not None:\n"
    "        scores = scores + mask\n"
    "    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)\n"
    "    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, c)\n"
    "    return F.linear(out, w[p + \"o_proj.weight\"])\n"
    "\n"
    "def mlp(x: Tensor, w: Dict[str, Tensor], p: str) -> Tensor:\n"
    "    g = F.silu(F.linear(x, w[p + \"gate_proj.weight\"]))\n"
    "    return F.linear(g * F.linear(x, w[p + \"up_proj.weight\"]), w[p + \"down_proj.weight\"])\n"
    "\n"
    "def forward(input_ids: Tensor, weights: Dict[str, Tensor], n_layers: int = 2) -> Tensor:\n"
    "    h = F.embedding(input_ids, weights[\"embed_tokens.weight\"])\n"
    "    pos = torch.arange(input_ids.shape[1], device=input_ids.device)\n"
    "    cos, sin = rope(pos, h.shape[-1] // N_HEADS)\n"
    "    cos, sin = cos.to(h.dtype), sin.to(h.dtype)\n"
    "    for i in range(n_layers):\n"
    "        p = f\"layers.{i}.\"\n"
    "        h = h + attention(rms_norm(h, weights[p + \"input_layernorm.weight\"]), weights,\n"
    "                          p + \"self_attn.\", cos, sin, None)\n"
    "        h = h + mlp(rms_norm(h, weights[p + \"post_attention_layernorm.weight\"]), weights,\n"
    "                    p + \"mlp.\")\n"
    "        h = tap(f\"layers.{i}\", h)\n"
    "    return rms_norm(h, weights[\"norm.weight\"])\n";

static void test_compile_time(void **state) {
    (void)state;
    fmx_program *p = compile_ok(k_decoder); /* warm: the F prelude is compiled once */
    fmx_program_destroy(p);
    double best = 1e30;
    for (int i = 0; i < 5; i++) {
        p = compile_ok(k_decoder);
        if (fmx_program_compile_ms(p) < best) best = fmx_program_compile_ms(p);
        assert_int_equal(fmx_program_nfunctions(p), 6);
        fmx_program_destroy(p);
    }
    int lines = 0;
    for (const char *c = k_decoder; *c; c++)
        lines += *c == '\n';
    printf("[ INFO     ] compile of a %d-line candidate: %.2f ms (best of 5; %s)\n", lines, best,
           fmx_engine_version());
}

/* ---- compile facts: host syncs, data-dependent flow, surviving optimisation ---- */

static fmx_program_facts facts_of(const char *src, const char *fn) {
    fmx_program *p = compile_ok(src);
    fmx_program_facts f;
    memset(&f, 0x55, sizeof f);
    int rc = fmx_program_facts_get(p, fn, &f, err, sizeof err);
    if (rc != FMX_OK) fail_msg("facts of %s failed (%d): %s", fn, rc, err);
    fmx_program_destroy(p);
    return f;
}

/* The facts of src's forward: syncs and flows as counted, first_problem on
 * line (0: none) and containing needle. */
static void expect_facts(const char *src, int syncs, int flows, int line, const char *needle) {
    fmx_program_facts f = facts_of(src, "forward");
    if (f.host_syncs != syncs || f.data_dependent_flow != flows || f.first_line != line)
        fail_msg("got %d syncs, %d flows, line %d (want %d, %d, %d): '%s' in\n%s", f.host_syncs,
                 f.data_dependent_flow, f.first_line, syncs, flows, line, f.first_problem, src);
    if (line == 0) {
        assert_string_equal(f.first_problem, "");
        return;
    }
    char prefix[32];
    snprintf(prefix, sizeof prefix, "line %d: ", line);
    if (strncmp(f.first_problem, prefix, strlen(prefix)) != 0 || !strstr(f.first_problem, needle))
        fail_msg("first_problem '%s' does not start with '%s' or lacks '%s'", f.first_problem,
                 prefix, needle);
}

/* A functional program: a loop over a constant, branches on shapes, dtypes
 * and None-ness, helpers; nothing leaves the device. */
static const char *k_clean =
    "import torch\n"
    "import torch.nn.functional as F\n"
    "from torch import Tensor\n"
    "from typing import Optional\n"
    "\n"
    "N_LAYERS = 3\n"
    "\n"
    "def block(x: Tensor, w: Tensor) -> Tensor:\n"
    "    return F.gelu(x @ w) + x\n"
    "\n"
    "def forward(x: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:\n"
    "    for i in range(N_LAYERS):\n"
    "        x = block(x, w) * (1.0 / (i + 1))\n"
    "    for j in range(x.size(0)):\n"
    "        x = x + j\n"
    "    if x.shape[0] > 1:\n"
    "        x = x * 0.5\n"
    "    if x.dtype == torch.float32 and x.dim() == 2:\n"
    "        x = torch.softmax(x, dim=-1)\n"
    "    if bias is not None:\n"
    "        x = x + bias\n"
    "    n = 0\n"
    "    while n < x.shape[-1]:\n"
    "        n += 2\n"
    "    x = torch.where(x > 0.1, x, torch.zeros_like(x))\n"
    "    return F.layer_norm(x, [x.shape[-1]]) * n\n";

static void test_facts_clean(void **state) {
    (void)state;
    expect_facts(k_clean, 0, 0, 0, NULL);
    /* A whole decoder: embeddings, rope, attention, masks, float("-inf"). */
    fmx_program_facts f = facts_of(k_decoder, "forward");
    assert_int_equal(f.host_syncs, 0);
    assert_int_equal(f.data_dependent_flow, 0);
    assert_string_equal(f.first_problem, "");

    fmx_program *p = compile_ok(k_clean);
    assert_int_equal(fmx_program_facts_get(p, "nope", &f, err, sizeof err), FMX_ENOTFOUND);
    assert_int_equal(fmx_program_facts_get(p, NULL, &f, err, sizeof err), FMX_EINVAL);
    fmx_program_destroy(p);
}

static void test_facts_host_syncs(void **state) {
    (void)state;
    expect_facts("import torch\n"
                 "\n"
                 "def forward(x: torch.Tensor) -> torch.Tensor:\n"
                 "    s = x.sum().item()\n"
                 "    return x * s\n",
                 1, 0, 4, ".item() moves a tensor value to the host");
    expect_facts("import torch\n"
                 "from typing import List\n"
                 "\n"
                 "def forward(x: torch.Tensor) -> torch.Tensor:\n"
                 "    y = x * 2\n"
                 "    v: List[float] = y.tolist()\n"
                 "    return x * len(v)\n",
                 1, 0, 6, ".tolist()");
    expect_facts("import torch\n"
                 "\n"
                 "def forward(x: torch.Tensor) -> torch.Tensor:\n"
                 "    n = int(x.sum())\n"
                 "    return x * n\n",
                 1, 0, 4, "int(tensor)");
    /* In a helper: the helper's line. Two syncs, the earlier line first. */
    expect_facts("import torch\n"
                 "\n"
                 "def scale(x: torch.Tensor) -> float:\n"
                 "    return float(x.abs().max())\n"
                 "\n"
                 "def forward(x: torch.Tensor) -> torch.Tensor:\n"
                 "    k = x.nonzero()\n"
                 "    return x * scale(x) + k.shape[0]\n",
                 2, 0, 4, "float(tensor)");
    expect_facts("import torch\n"
                 "\n"
                 "def forward(x: torch.Tensor) -> torch.Tensor:\n"
                 "    return x[x > 0]\n",
                 1, 0, 4, "boolean mask");
    expect_facts("import torch\n"
                 "\n"
                 "def forward(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:\n"
                 "    return torch.masked_select(x, m)\n",
                 1, 0, 4, "masked_select");
}

static void test_facts_data_dependent_flow(void **state) {
    (void)state;
    /* The If is flagged, and bool(tensor) it needs is a host sync. */
    expect_facts("import torch\n"
                 "\n"
                 "def forward(x: torch.Tensor) -> torch.Tensor:\n"
                 "    y = x * 2\n"
                 "    if x.sum() > 0:\n"
                 "        y = y + 1\n"
                 "    return y\n",
                 1, 1, 5, "if condition depends on tensor values (a tensor used as a bool");
    expect_facts("import torch\n"
                 "\n"
                 "def forward(x: torch.Tensor) -> torch.Tensor:\n"
                 "    x = x + 1\n"
                 "    while bool(x.max() > 1):\n"
                 "        x = x * 0.5\n"
                 "    return x\n",
                 1, 1, 5, "loop condition depends on tensor values");
    expect_facts("import torch\n"
                 "\n"
                 "def forward(x: torch.Tensor) -> torch.Tensor:\n"
                 "    n = int(x.sum())\n"
                 "    for i in range(n):\n"
                 "        x = x + i\n"
                 "    return x\n",
                 1, 1, 4, "int(tensor)");
    /* A flag set under a data-dependent If makes the next If data-dependent. */
    expect_facts("import torch\n"
                 "\n"
                 "def forward(x: torch.Tensor) -> torch.Tensor:\n"
                 "    big = False\n"
                 "    if x.mean() > 0.5:\n"
                 "        big = True\n"
                 "    if big:\n"
                 "        x = x * 2\n"
                 "    return x\n",
                 1, 2, 5, "if condition");
    /* A loop-carried count that a tensor value changes. */
    expect_facts("import torch\n"
                 "\n"
                 "def forward(x: torch.Tensor) -> torch.Tensor:\n"
                 "    n = 0\n"
                 "    for i in range(4):\n"
                 "        n = n + int(x[i].argmax())\n"
                 "    if n > 3:\n"
                 "        x = x + 1\n"
                 "    return x\n",
                 1, 1, 6, "int(tensor)");
    /* The shape of a nonzero() is data-dependent; the shape of x is not. */
    expect_facts("import torch\n"
                 "\n"
                 "def forward(x: torch.Tensor) -> torch.Tensor:\n"
                 "    if x.shape[0] > 1:\n"
                 "        x = x * 2\n"
                 "    idx = torch.nonzero(x)\n"
                 "    if idx.shape[0] > 3:\n"
                 "        x = x + 1\n"
                 "    return x\n",
                 1, 1, 6, "nonzero");
}

/* forward(x, t) with body, for the facts of one construct. */
static void expect_body_facts(const char *body, int syncs, int flows, int line,
                              const char *needle) {
    char src[2048];
    snprintf(src, sizeof src,
             "import torch\n"
             "import torch.nn.functional as F\n"
             "from torch import Tensor\n"
             "N = 4\n"
             "\n"
             "def forward(x: Tensor, t: Tensor) -> Tensor:\n"
             "%s",
             body);
    expect_facts(src, syncs, flows, line, needle);
}

/* Host reads through data-dependent shapes and tensor-valued sizes, one
 * construct each (engine.h: host_syncs). Line 7 is the body's first. */
static void test_facts_data_dependent_shapes(void **state) {
    (void)state;
    /* F.one_hot: the class count is read from the data unless given */
    expect_body_facts("    return F.one_hot(t).float()\n", 1, 0, 7,
                      "F.one_hot without num_classes");
    expect_body_facts("    return F.one_hot(t, -1).float()\n", 1, 0, 7, "F.one_hot");
    expect_body_facts("    return F.one_hot(t, num_classes=N - 5).float()\n", 1, 0, 7, "one_hot");
    expect_body_facts("    return F.one_hot(t, x.size(1) - x.size(1) - 1).float()\n", 1, 0, 7,
                      "one_hot");
    expect_body_facts("    return F.one_hot(t, num_classes=2 * N).float()\n", 0, 0, 0, NULL);
    expect_body_facts("    return F.one_hot(t, x.shape[-1] + 1).float()\n", 0, 0, 0, NULL);
    /* ... and a shape read from it feeding control flow */
    expect_body_facts("    if F.one_hot(t).shape[-1] > 3:\n"
                      "        x = x + 1\n"
                      "    return x\n",
                      1, 1, 7, "if condition depends on tensor values (F.one_hot");
    /* ops whose result shape depends on values */
    expect_body_facts("    return torch.nonzero(x)\n", 1, 0, 7, "nonzero");
    expect_body_facts("    return torch.unique_consecutive(x)[0]\n", 1, 0, 7, "unique_consecutive");
    expect_body_facts("    return torch.masked_select(x, x > 0)\n", 1, 0, 7, "masked_select");
    expect_body_facts("    return torch.bincount(t)\n", 1, 0, 7, "bincount");
    expect_body_facts("    return torch.argwhere(x)\n", 1, 0, 7, "argwhere");
    expect_body_facts("    return torch.where(x > 0)[0]\n", 1, 0, 7, "torch.where(condition)");
    expect_body_facts("    return x.repeat_interleave(t)\n", 1, 0, 7, "tensor repeats");
    expect_body_facts("    return x.repeat_interleave(2)\n", 0, 0, 0, NULL);
    /* boolean masks, through &, ~, an If and torch.where; an int index is a gather */
    expect_body_facts("    return x[(x > 0) & (x < 1)]\n", 1, 0, 7, "boolean mask");
    expect_body_facts("    return x[~(x > 0)]\n", 1, 0, 7, "boolean mask");
    expect_body_facts("    m = x > 0\n"
                      "    if x.shape[0] > 2:\n"
                      "        m = x < 1\n"
                      "    return x[m]\n",
                      1, 0, 10, "boolean mask");
    expect_body_facts("    return x[torch.where(t > 0, x > 0, x < 0)]\n", 1, 0, 7, "boolean mask");
    expect_body_facts("    return x[torch.zeros(x.shape, dtype=torch.bool)]\n", 1, 0, 7,
                      "boolean mask");
    expect_body_facts("    return x[t & 3]\n", 0, 0, 0, NULL);
    /* a tensor where an int is expected: narrow, slice bounds, sizes, numbers */
    expect_body_facts("    return x.narrow(0, torch.tensor(0), 1)\n", 1, 0, 7,
                      "narrow with a tensor start");
    expect_body_facts("    return torch.narrow(x, 0, t, 1)\n", 1, 0, 7, "narrow with a tensor");
    expect_body_facts("    return x.narrow(0, 0, 1)\n", 0, 0, 0, NULL);
    expect_body_facts("    return x[:t]\n", 1, 0, 7, "a tensor used as an int");
    expect_body_facts("    return x.select(0, t)\n", 1, 0, 7, "a tensor used as an int");
    expect_body_facts("    return x.view(t, -1)\n", 1, 0, 7, "a tensor used as an int");
    expect_body_facts("    return torch.arange(t)\n", 1, 0, 7, "a tensor used as a number");
    expect_body_facts("    return torch.zeros(int(t))\n", 1, 0, 7, "int(tensor)");
}

static void test_survives_optimization(void **state) {
    (void)state;
    float x[12], w[16];
    fill(x, 12, 7);
    fill(w, 16, 8);
    fmx_tensor *tx = f32(x, 2, 3, 4, 0, 0);
    fmx_tensor *tw = f32(w, 2, 4, 4, 0, 0);
    fmx_args *a = fmx_args_create();
    fmx_args_tensor(a, "x", tx);
    fmx_args_tensor(a, "w", tw);

    fmx_program *p = compile_ok(k_clean);
    fmx_run *ref = run_ok(p, "forward", a);
    int same = -1;
    assert_int_equal(fmx_program_check_optimized(p, "forward", a, ref, &same, err, sizeof err),
                     FMX_OK);
    if (same != 1) fail_msg("clean program does not survive optimization: %s", err);
    assert_string_equal(err, "");
    /* The program's own runs stay as they were. */
    fmx_run *again = run_ok(p, "forward", a);
    float o1[12], o2[12];
    read_f32(fmx_run_output(ref, 0), o1, 12);
    read_f32(fmx_run_output(again, 0), o2, 12);
    assert_memory_equal(o1, o2, sizeof o1);
    fmx_run_destroy(again);

    /* Misuse is an error, not a verdict. */
    assert_int_equal(fmx_program_check_optimized(p, "nope", a, ref, &same, err, sizeof err),
                     FMX_ENOTFOUND);
    assert_int_equal(same, 0);
    assert_int_equal(fmx_program_check_optimized(p, "forward", a, NULL, &same, err, sizeof err),
                     FMX_EINVAL);
    fmx_run_destroy(ref);
    fmx_program_destroy(p);

    /* Integer and several outputs, a data-dependent branch: same results. */
    p = compile_ok("import torch\n"
                   "from typing import Tuple\n"
                   "\n"
                   "def forward(x: torch.Tensor, w: torch.Tensor) -> Tuple[torch.Tensor, "
                   "torch.Tensor]:\n"
                   "    h = torch.tanh(x @ w) * 3 + 1\n"
                   "    if h.sum() > 0:\n"
                   "        h = h - 1\n"
                   "    return h, h.argmax(-1)\n");
    ref = run_ok(p, "forward", a);
    assert_int_equal(fmx_program_check_optimized(p, "forward", a, ref, &same, err, sizeof err),
                     FMX_OK);
    if (same != 1) fail_msg("does not survive optimization: %s", err);
    fmx_run_destroy(ref);
    fmx_program_destroy(p);

    /* Random outputs differ from run to run: not the same. */
    p = compile_ok("import torch\n"
                   "\n"
                   "def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:\n"
                   "    return x @ w + torch.rand_like(x)\n");
    ref = run_ok(p, "forward", a);
    assert_int_equal(fmx_program_check_optimized(p, "forward", a, ref, &same, err, sizeof err),
                     FMX_OK);
    assert_int_equal(same, 0);
    if (!strstr(err, "output 0") || !strstr(err, "differ")) fail_msg("reason: %s", err);
    fmx_run_destroy(ref);

    /* A reference with another number of outputs. */
    fmx_program *p2 = compile_ok("import torch\n"
                                 "from typing import Tuple\n"
                                 "\n"
                                 "def forward(x: torch.Tensor, w: torch.Tensor) -> "
                                 "Tuple[torch.Tensor, torch.Tensor]:\n"
                                 "    return x, w\n");
    ref = run_ok(p2, "forward", a);
    assert_int_equal(fmx_program_check_optimized(p, "forward", a, ref, &same, err, sizeof err),
                     FMX_OK);
    assert_int_equal(same, 0);
    if (!strstr(err, "outputs")) fail_msg("reason: %s", err);
    fmx_run_destroy(ref);
    fmx_program_destroy(p2);
    fmx_program_destroy(p);

    fmx_args_destroy(a);
    fmx_tensor_destroy(tx);
    fmx_tensor_destroy(tw);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dtypes_and_device),
        cmocka_unit_test(test_tensor_wrap_cast_read),
        cmocka_unit_test(test_linear_gelu),
        cmocka_unit_test(test_keyword_args),
        cmocka_unit_test(test_weights_dict_fresh_per_run),
        cmocka_unit_test(test_constants),
        cmocka_unit_test(test_tap_records_in_order),
        cmocka_unit_test(test_output_owns_memory),
        cmocka_unit_test(test_embedding_argument_order),
        cmocka_unit_test(test_prelude_functions),
        cmocka_unit_test(test_scaled_dot_product_attention),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_source_model),
        cmocka_unit_test(test_runtime_errors),
        cmocka_unit_test(test_compare),
        cmocka_unit_test(test_compare_paths_agree),
        cmocka_unit_test(test_compile_time),
        cmocka_unit_test(test_facts_clean),
        cmocka_unit_test(test_facts_host_syncs),
        cmocka_unit_test(test_facts_data_dependent_flow),
        cmocka_unit_test(test_facts_data_dependent_shapes),
        cmocka_unit_test(test_survives_optimization),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
