/*
 * test_pack.c — the pack loader (env/pack.c): a pack written here byte by byte
 * opens, its tensors read back bit-exact, weights are keyed relative to a
 * module with aliases, and every kind of malformed pack is refused at open
 * with a message naming what is wrong, a hidden weight set included. Packs
 * written by the real exporter are covered by tests/python/test_verify.py and
 * tests/python/test_hidden_weights.py.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "pack.h"
#include "status.h"

static char dir[256];

static void write_text(const char *name, const char *text) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* Writes a safetensors file: header JSON as given, then data bytes. */
static void write_st(const char *name, const char *header, const void *data, size_t n,
                     uint64_t lie_len) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    uint64_t len = lie_len ? lie_len : strlen(header);
    unsigned char b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(len >> (8 * i));
    fwrite(b, 1, 8, f);
    fwrite(header, 1, strlen(header), f);
    if (n) fwrite(data, 1, n, f);
    fclose(f);
}

static const float W_EMBED[6] = {1.5f, -2.0f, 0.25f, 3.0f, -0.125f, 7.0f};
static const float W_NORM[3] = {0.5f, 1.0f, -1.0f};

static void write_weights(void) {
    unsigned char data[36];
    memcpy(data, W_EMBED, 24);
    memcpy(data + 24, W_NORM, 12);
    write_st("weights.safetensors",
             "{\"model.embed.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
             "\"model.norm.weight\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[24,36]}}",
             data, sizeof data, 0);
}

static const int64_t IDS[2] = {1, 0};
static const int64_t MASK[2] = {1, 1};
static const float OUT[6] = {3.0f, 7.0f, -0.125f, 1.5f, -2.0f, 0.25f};

static void write_probes(void) {
    unsigned char data[16 + 16 + 24];
    memcpy(data, IDS, 16);
    memcpy(data + 16, MASK, 16);
    memcpy(data + 32, OUT, 24);
    write_st("probes.safetensors",
             "{\"ids\":{\"dtype\":\"I64\",\"shape\":[1,2],\"data_offsets\":[0,16]},"
             "\"mask\":{\"dtype\":\"I64\",\"shape\":[1,2],\"data_offsets\":[16,32]},"
             "\"out\":{\"dtype\":\"F32\",\"shape\":[1,2,3],\"data_offsets\":[32,56]}}",
             data, sizeof data, 0);
}

static const char *MANIFEST =
    "{\"format\":\"fmx-pack\",\"version\":1,\"name\":\"toy\",\"dtype\":\"float32\","
    "\"tolerance\":{\"float32\":{\"atol\":2e-6,\"rtol\":3e-6}},"
    "\"weights\":{\"aliases\":{\"head.weight\":\"model.embed.weight\"},\"buffers\":[]},"
    "\"modules\":[{\"path\":\"\",\"class\":\"Toy\",\"parent\":null},"
    "{\"path\":\"model\",\"class\":\"ToyModel\",\"parent\":\"\"},"
    "{\"path\":\"model.embed\",\"class\":\"Embedding\",\"parent\":\"model\"},"
    "{\"path\":\"head\",\"class\":\"Linear\",\"parent\":\"\"}],"
    "\"probes\":[{\"name\":\"p0\",\"visible\":true,\"batch\":1,\"seq\":2,\"padding\":\"none\","
    "\"mask\":\"mask\"}],"
    "\"calls\":[{\"probe\":0,\"module\":\"\",\"index\":0,"
    "\"inputs\":[{\"name\":\"input_ids\",\"kind\":\"tensor\",\"key\":\"ids\"},"
    "{\"name\":\"use_cache\",\"kind\":\"value\",\"value\":false},"
    "{\"name\":\"scale\",\"kind\":\"value\",\"value\":0.5},"
    "{\"name\":\"past\",\"kind\":\"none\"}],"
    "\"outputs\":[{\"name\":\"logits\",\"kind\":\"tensor\",\"key\":\"out\",\"token_aligned\":true},"
    "{\"name\":\"past_key_values\",\"kind\":\"cache\"}]}]}";

static int setup(void **state) {
    snprintf(dir, sizeof dir, "/tmp/fmx-test-pack-XXXXXX");
    assert_non_null(mkdtemp(dir));
    write_weights();
    write_probes();
    write_text("task.json", MANIFEST);
    return 0;
}

static int teardown(void **state) {
    const char *names[] = {"task.json", "weights.safetensors", "probes.safetensors",
                           "weights_hidden.safetensors"};
    char path[512];
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        unlink(path);
    }
    rmdir(dir);
    return 0;
}

static void test_open_reads_everything(void **state) {
    char err[512];
    fmx_pack *p = NULL;
    assert_int_equal(fmx_pack_open(dir, &p, err, sizeof err), FMX_OK);
    assert_string_equal(fmx_pack_name(p), "toy");
    assert_int_equal(fmx_pack_nmodules(p), 4);
    assert_int_equal(fmx_pack_find_module(p, "model.embed"), 2);
    assert_int_equal(fmx_pack_module(p, 2)->parent, 1);
    assert_int_equal(fmx_pack_find_module(p, "nope"), -1);
    assert_int_equal(fmx_pack_module(p, 0)->first_call, 0);
    assert_int_equal(fmx_pack_module(p, 1)->first_call, -1);

    const fmx_probe *pr = fmx_pack_probe(p, 0);
    assert_int_equal(pr->batch, 1);
    assert_int_equal(pr->seq, 2);
    assert_string_equal(pr->mask_key, "mask");

    const fmx_call *c = fmx_pack_call(p, 0);
    assert_int_equal(c->ninputs, 4);
    assert_int_equal(c->inputs[0].kind, FMX_IO_TENSOR);
    assert_int_equal(c->inputs[1].kind, FMX_IO_VALUE);
    assert_int_equal(c->inputs[1].vtype, FMX_VAL_BOOL);
    assert_int_equal(c->inputs[1].i, 0);
    assert_int_equal(c->inputs[2].vtype, FMX_VAL_FLOAT);
    assert_true(c->inputs[2].f == 0.5);
    assert_int_equal(c->inputs[3].kind, FMX_IO_NONE);
    assert_int_equal(c->noutputs, 2);
    assert_true(c->outputs[0].token_aligned);
    assert_int_equal(c->outputs[1].kind, FMX_IO_CACHE);
    assert_int_equal(fmx_pack_find_call(p, 0, 0, 0), 0);
    assert_int_equal(fmx_pack_find_call(p, 0, 0, 1), -1);

    /* Captures read back bit-exact. */
    const fmx_tensor *t = fmx_pack_capture(p, "out");
    assert_non_null(t);
    int64_t shape[FMX_MAX_DIMS];
    fmx_dtype dt;
    assert_int_equal(fmx_tensor_shape(t, shape, &dt), 3);
    assert_int_equal(dt, FMX_DT_F32);
    assert_int_equal(shape[2], 3);
    float buf[6];
    assert_int_equal(fmx_tensor_read(t, buf, sizeof buf, err, sizeof err), FMX_OK);
    assert_memory_equal(buf, OUT, sizeof OUT);
    assert_null(fmx_pack_capture(p, "missing"));

    /* The pack's tolerance table; integers are exact. */
    fmx_tolerance tol = fmx_pack_tolerance(p, FMX_DT_F32);
    assert_true(tol.atol == 2e-6 && tol.rtol == 3e-6);
    tol = fmx_pack_tolerance(p, FMX_DT_I64);
    assert_true(tol.atol == 0 && tol.rtol == 0);
    fmx_pack_close(p);
}

static void test_weights_are_relative_with_aliases(void **state) {
    char err[512];
    fmx_pack *p = NULL;
    assert_int_equal(fmx_pack_open(dir, &p, err, sizeof err), FMX_OK);
    const char *const *keys;
    const fmx_tensor *const *vals;
    int n = fmx_pack_weights(p, "", &keys, &vals, err, sizeof err);
    assert_int_equal(n, 3);
    int found_alias = 0;
    for (int i = 0; i < n; i++)
        if (strcmp(keys[i], "head.weight") == 0) {
            float buf[6];
            assert_int_equal(fmx_tensor_read(vals[i], buf, sizeof buf, err, sizeof err), 0);
            assert_memory_equal(buf, W_EMBED, sizeof W_EMBED);
            found_alias = 1;
        }
    assert_true(found_alias);

    n = fmx_pack_weights(p, "model", &keys, &vals, err, sizeof err);
    assert_int_equal(n, 2);
    assert_string_equal(keys[0], "embed.weight");
    assert_string_equal(keys[1], "norm.weight");
    n = fmx_pack_weights(p, "model.embed", &keys, &vals, err, sizeof err);
    assert_int_equal(n, 1);
    assert_string_equal(keys[0], "weight");
    n = fmx_pack_weights(p, "head", &keys, &vals, err, sizeof err);
    assert_int_equal(n, 1);
    assert_string_equal(keys[0], "weight");
    /* "mod" is a prefix of "model" but not a module path above it. */
    n = fmx_pack_weights(p, "mod", &keys, &vals, err, sizeof err);
    assert_int_equal(n, 0);
    fmx_pack_close(p);
}

/* Writes the manifest with a created_by and both tolerance tables. */
static void write_manifest_made_by(const char *torch, const char *device) {
    const char *old_tol = "\"tolerance\":{\"float32\":{\"atol\":2e-6,\"rtol\":3e-6}},";
    const char *at = strstr(MANIFEST, old_tol);
    assert_non_null(at);
    char *m = malloc(strlen(MANIFEST) + 512);
    sprintf(m,
            "{\"created_by\":{\"torch\":\"%s\",\"device\":\"%s\"},"
            "\"tolerance\":{\"bfloat16\":{\"atol\":0.0078125,\"rtol\":0.0078125}},"
            "\"tolerance_cross_build\":{\"bfloat16\":{\"atol\":0.125,\"rtol\":0.25}},"
            "%.*s%s",
            torch, device, (int)(at - MANIFEST - 1), MANIFEST + 1, at + strlen(old_tol));
    write_text("task.json", m);
    free(m);
}

static void test_tolerance_table_follows_the_build(void **state) {
    /* Same libtorch X.Y.Z and device type as this engine: the tight table. */
    char version[64];
    snprintf(version, sizeof version, "%s", fmx_engine_version() + strlen("libtorch "));
    version[strcspn(version, " ")] = '\0';
    strcat(version, "a0+local"); /* suffixes after X.Y.Z do not matter */
    write_manifest_made_by(version, fmx_engine_device());
    char err[512];
    fmx_pack *p = NULL;
    assert_int_equal(fmx_pack_open(dir, &p, err, sizeof err), FMX_OK);
    assert_true(fmx_pack_same_build(p));
    assert_true(fmx_pack_tolerance(p, FMX_DT_BF16).atol == 0.0078125);
    fmx_pack_close(p);

    /* Another build: the cross-build table. */
    write_manifest_made_by("0.0.1", fmx_engine_device());
    assert_int_equal(fmx_pack_open(dir, &p, err, sizeof err), FMX_OK);
    assert_false(fmx_pack_same_build(p));
    assert_true(fmx_pack_tolerance(p, FMX_DT_BF16).rtol == 0.25);
    fmx_pack_close(p);

    /* Same version on another device type: cross-build too. */
    write_manifest_made_by(version, "tpu");
    assert_int_equal(fmx_pack_open(dir, &p, err, sizeof err), FMX_OK);
    assert_false(fmx_pack_same_build(p));
    fmx_pack_close(p);
}

static void test_nearest_modules(void **state) {
    char err[512];
    fmx_pack *p = NULL;
    assert_int_equal(fmx_pack_open(dir, &p, err, sizeof err), FMX_OK);
    int near[2];
    assert_int_equal(fmx_pack_nearest_modules(p, "model.embd", near, 2), 2);
    assert_string_equal(fmx_pack_module(p, near[0])->path, "model.embed");
    fmx_pack_close(p);
}

/* Opens the pack and expects failure with status and a message containing
 * what. */
static void expect_refused(int status, const char *what) {
    char err[1024] = "";
    fmx_pack *p = NULL;
    int rc = fmx_pack_open(dir, &p, err, sizeof err);
    if (rc != status || !strstr(err, what))
        fail_msg("expected status %d with '%s', got %d: %s", status, what, rc, err);
    assert_null(p);
}

static void test_missing_dir(void **state) {
    char err[512];
    fmx_pack *p = NULL;
    assert_int_equal(fmx_pack_open("/nonexistent/pack", &p, err, sizeof err), FMX_EIO);
    assert_non_null(strstr(err, "task.json"));
}

static void test_header_length_lies(void **state) {
    /* A header length far past the file must not be trusted. */
    write_st("weights.safetensors", "{}", NULL, 0, 1ull << 40);
    expect_refused(FMX_EFORMAT, "header length");
}

static void test_offsets_outside_file(void **state) {
    float data[3] = {1, 2, 3};
    write_st("weights.safetensors",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,4000]}}", data,
             sizeof data, 0);
    expect_refused(FMX_EFORMAT, "data_offsets");
}

static void test_offsets_disagree_with_shape(void **state) {
    float data[3] = {1, 2, 3};
    write_st("weights.safetensors",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,12]}}", data, sizeof data,
             0);
    expect_refused(FMX_EFORMAT, "data_offsets");
}

static void test_unknown_dtype(void **state) {
    float data[1] = {1};
    write_st("weights.safetensors",
             "{\"w\":{\"dtype\":\"Q4\",\"shape\":[1],\"data_offsets\":[0,4]}}", data, sizeof data,
             0);
    expect_refused(FMX_EFORMAT, "bad dtype");
}

static void test_version_mismatch(void **state) {
    write_text("task.json", "{\"format\":\"fmx-pack\",\"version\":99}");
    expect_refused(FMX_EVERSION, "version 99");
}

static void test_not_json(void **state) {
    write_text("task.json", "{\"format\": ");
    expect_refused(FMX_EFORMAT, "not valid JSON");
}

static void test_call_names_missing_tensor(void **state) {
    char *m = strdup(MANIFEST);
    char *k = strstr(m, "\"key\":\"out\"");
    memcpy(k, "\"key\":\"oux\"", 11);
    write_text("task.json", m);
    free(m);
    expect_refused(FMX_EFORMAT, "'oux' is not in probes.safetensors");
}

static void test_mask_shape_checked(void **state) {
    char *m = strdup(MANIFEST);
    char *k = strstr(m, "\"seq\":2");
    memcpy(k, "\"seq\":3", 7);
    write_text("task.json", m);
    free(m);
    expect_refused(FMX_EFORMAT, "mask");
}

/* MANIFEST with the first occurrence of from replaced by to. */
static char *edited(const char *from, const char *to) {
    const char *at = strstr(MANIFEST, from);
    assert_non_null(at);
    size_t head = (size_t)(at - MANIFEST);
    char *m = malloc(strlen(MANIFEST) + strlen(to) + 1);
    assert_non_null(m);
    memcpy(m, MANIFEST, head);
    strcpy(m + head, to);
    strcat(m, at + strlen(from));
    return m;
}

static void test_generation_steps(void **state) {
    (void)state;
    char *m = edited("\"mask\":\"mask\"}]", "\"mask\":\"mask\",\"generation\":\"g0\",\"step\":2}]");
    write_text("task.json", m);
    free(m);
    char err[512];
    fmx_pack *p = NULL;
    assert_int_equal(fmx_pack_open(dir, &p, err, sizeof err), FMX_OK);
    assert_true(fmx_pack_has_generation(p));
    assert_string_equal(fmx_pack_probe(p, 0)->generation, "g0");
    assert_int_equal(fmx_pack_probe(p, 0)->step, 2);
    fmx_pack_close(p);
    /* an ordinary pack has none */
    write_text("task.json", MANIFEST);
    assert_int_equal(fmx_pack_open(dir, &p, err, sizeof err), FMX_OK);
    assert_false(fmx_pack_has_generation(p));
    assert_int_equal(fmx_pack_probe(p, 0)->step, -1);
    fmx_pack_close(p);
    /* a step without its number */
    m = edited("\"mask\":\"mask\"}]", "\"mask\":\"mask\",\"generation\":\"g0\"}]");
    write_text("task.json", m);
    free(m);
    expect_refused(FMX_EFORMAT, "needs a 'step' >= 0");
}

static void test_output_mask_checked(void **state) {
    (void)state;
    /* keep flags over the output's leading dims: (1, 2) for (1, 2, 3) */
    char *m = edited("\"token_aligned\":true}", "\"token_aligned\":false,\"mask\":\"ids\"}");
    write_text("task.json", m);
    free(m);
    char err[512];
    fmx_pack *p = NULL;
    assert_int_equal(fmx_pack_open(dir, &p, err, sizeof err), FMX_OK);
    assert_string_equal(fmx_pack_call(p, 0)->outputs[0].mask, "ids");
    fmx_pack_close(p);
    m = edited("\"token_aligned\":true}", "\"mask\":\"nope\"}");
    write_text("task.json", m);
    free(m);
    expect_refused(FMX_EFORMAT, "mask 'nope' missing or not the output's leading dims");
}

static void test_alias_to_nothing(void **state) {
    char *m = strdup(MANIFEST);
    char *k = strstr(m, "\"model.embed.weight\"}");
    memcpy(k, "\"model.embex.weight\"}", 21);
    write_text("task.json", m);
    free(m);
    expect_refused(FMX_EFORMAT, "alias 'head.weight'");
}

/* The manifest with "hidden_weights": name, and a hidden set whose norm
 * weight has the given header entry. */
static void write_hidden(const char *name, const char *norm_entry) {
    char *m = malloc(strlen(MANIFEST) + 256);
    sprintf(m, "{\"hidden_weights\":\"%s\",%s", name, MANIFEST + 1);
    write_text("task.json", m);
    free(m);
    char header[512];
    snprintf(header, sizeof header,
             "{\"model.embed.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
             "\"model.norm.weight\":%s}",
             norm_entry);
    float data[9] = {-1.5f, 2.0f, -0.25f, -3.0f, 0.125f, -7.0f, -0.5f, -1.0f, 1.0f};
    write_st("weights_hidden.safetensors", header, data, sizeof data, 0);
}

static const char *NORM_OK = "{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[24,36]}";

static void test_hidden_weights_path(void **state) {
    /* No hidden set: hidden probes run under the public weights. */
    char err[512];
    fmx_pack *p = NULL;
    assert_int_equal(fmx_pack_open(dir, &p, err, sizeof err), FMX_OK);
    assert_ptr_equal(fmx_pack_weights_path(p, 1), fmx_pack_weights_path(p, 0));
    const char *pub = strrchr(fmx_pack_weights_path(p, 0), '/');
    assert_string_equal(pub, "/weights.safetensors");
    fmx_pack_close(p);

    /* A hidden set with the public names, dtypes and shapes: its own path. */
    write_hidden("weights_hidden.safetensors", NORM_OK);
    assert_int_equal(fmx_pack_open(dir, &p, err, sizeof err), FMX_OK);
    const char *hidden = fmx_pack_weights_path(p, 1);
    assert_ptr_not_equal(hidden, fmx_pack_weights_path(p, 0));
    assert_string_equal(strrchr(hidden, '/'), "/weights_hidden.safetensors");
    assert_true(hidden[0] == '/'); /* a real path: the evaluation process maps it by name */
    /* The public tensors are still the public values. */
    const char *const *keys;
    const fmx_tensor *const *vals;
    assert_int_equal(fmx_pack_weights(p, "model.embed", &keys, &vals, err, sizeof err), 1);
    float buf[6];
    assert_int_equal(fmx_tensor_read(vals[0], buf, sizeof buf, err, sizeof err), FMX_OK);
    assert_memory_equal(buf, W_EMBED, sizeof W_EMBED);
    fmx_pack_close(p);
}

static void test_hidden_weights_wrong_shape(void **state) {
    write_hidden("weights_hidden.safetensors",
                 "{\"dtype\":\"F32\",\"shape\":[1,3],\"data_offsets\":[24,36]}");
    expect_refused(FMX_EFORMAT, "tensor 'model.norm.weight' is float32 [1, 3] here but float32 [3] "
                                "in weights.safetensors");
}

static void test_hidden_weights_wrong_dtype(void **state) {
    write_hidden("weights_hidden.safetensors",
                 "{\"dtype\":\"I32\",\"shape\":[3],\"data_offsets\":[24,36]}");
    expect_refused(FMX_EFORMAT, "the public one's dtypes and shapes");
}

static void test_hidden_weights_other_names(void **state) {
    char *m = malloc(strlen(MANIFEST) + 64);
    sprintf(m, "{\"hidden_weights\":\"weights_hidden.safetensors\",%s", MANIFEST + 1);
    write_text("task.json", m);
    free(m);
    float data[6] = {0};
    write_st("weights_hidden.safetensors",
             "{\"model.embed.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}}",
             data, sizeof data, 0);
    expect_refused(FMX_EFORMAT,
                   "tensor 'model.norm.weight' is missing here but in weights.safetensors");
}

static void test_hidden_weights_bounds_and_name(void **state) {
    /* The hidden file gets the same safetensors checks as the public one. */
    write_hidden("weights_hidden.safetensors",
                 "{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[24,4000]}");
    expect_refused(FMX_EFORMAT, "data_offsets");
    write_hidden("../weights_hidden.safetensors", NORM_OK);
    expect_refused(FMX_EFORMAT, "hidden_weights must name a file in the pack directory");
    write_hidden("absent.safetensors", NORM_OK);
    expect_refused(FMX_EIO, "absent.safetensors");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_open_reads_everything, setup, teardown),
        cmocka_unit_test_setup_teardown(test_weights_are_relative_with_aliases, setup, teardown),
        cmocka_unit_test_setup_teardown(test_nearest_modules, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tolerance_table_follows_the_build, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_dir, setup, teardown),
        cmocka_unit_test_setup_teardown(test_header_length_lies, setup, teardown),
        cmocka_unit_test_setup_teardown(test_offsets_outside_file, setup, teardown),
        cmocka_unit_test_setup_teardown(test_offsets_disagree_with_shape, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unknown_dtype, setup, teardown),
        cmocka_unit_test_setup_teardown(test_version_mismatch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_not_json, setup, teardown),
        cmocka_unit_test_setup_teardown(test_call_names_missing_tensor, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mask_shape_checked, setup, teardown),
        cmocka_unit_test_setup_teardown(test_alias_to_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_generation_steps, setup, teardown),
        cmocka_unit_test_setup_teardown(test_output_mask_checked, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hidden_weights_path, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hidden_weights_wrong_shape, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hidden_weights_wrong_dtype, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hidden_weights_other_names, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hidden_weights_bounds_and_name, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
