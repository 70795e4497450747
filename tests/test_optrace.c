/*
 * test_optrace.c — op traces as text (env/optrace.c): each kind of dataflow
 * value (references, sizes, products and offsets, dtypes, devices, finfo
 * limits, slices, constants, what varies, a constant minus a size, a floor
 * division, the step of a loop over time steps), a loop record's line, an op line with its values,
 * arguments and shapes, a child call with its inputs, the older listing of a
 * pack without dataflow, and the returns line.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "optrace.h"

/* What fmx_optrace_print (ops = 1) or fmx_optrace_print_value prints for
 * JSON. Caller frees. */
static char *printed(const char *json, int ops) {
    cJSON *v = cJSON_Parse(json);
    assert_non_null(v);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (ops)
        fmx_optrace_print(f, NULL, v, NULL);
    else
        fmx_optrace_print_value(f, v);
    fclose(f);
    cJSON_Delete(v);
    return buf;
}

static void same(const char *json, const char *want) {
    char *got = printed(json, 0);
    if (strcmp(got, want) != 0) fail_msg("%s printed as \"%s\", want \"%s\"", json, got, want);
    free(got);
}

static void test_values(void **state) {
    (void)state;
    same("{\"v\": 3}", "v3");
    same("{\"in\": \"hidden_states\"}", "hidden_states");
    same("{\"w\": \"q_proj.weight\"}", "weights[\"q_proj.weight\"]");
    same("{\"dim\": [{\"in\": \"x\"}, 1]}", "x.size(1)");
    same("{\"mul\": [{\"dim\": [{\"in\": \"x\"}, 0]}, 2]}", "x.size(0) * 2");
    same("{\"add\": [{\"dim\": [{\"v\": 1}, 1]}, -1]}", "v1.size(1) + -1");
    same("{\"dtype_of\": {\"v\": 0}}", "v0.dtype");
    same("{\"device_of\": {\"in\": \"x\"}}", "x.device");
    same("{\"finfo_min\": {\"v\": 0}}", "torch.finfo(v0.dtype).min");
    same("{\"dtype\": \"float32\"}", "torch.float32");
    same("{\"float\": \"2.0\"}", "2.0");
    same("{\"float\": \"-inf\"}", "float(\"-inf\")");
    same("{\"tuple\": [1]}", "(1,)");
    same("{\"tuple\": [{\"slice\": [null, null, null]}, null, {\"slice\": [1, {\"dim\": [{\"in\": "
         "\"x\"}, 1]}, null]}, {\"ellipsis\": true}]}",
         "(:, None, 1:x.size(1), ...)");
    same("{\"list\": [1, -1]}", "[1, -1]");
    same("0.044715", "0.044715");
    same("true", "True");
    same("{\"const\": [1.5], \"shape\": [1], \"dtype\": \"float32\"}",
         "<constant float32 tensor [1]>");
    same("{\"varies\": [63, 168]}", "<varies by probe: [63, 168]>");
    same("{\"rsub\": [128, {\"dim\": [{\"in\": \"x\"}, 1]}]}", "128 - x.size(1)");
    same("{\"floordiv\": [{\"dim\": [{\"in\": \"x\"}, 1]}, 2]}", "x.size(1) // 2");
    same("{\"tuple\": [{\"slice\": [null, null, null]}, {\"loopvar\": 0}, {\"loopvar\": 1}]}",
         "(:, t, t + 1)");
}

static void test_time_loop_line(void **state) {
    (void)state;
    char *t =
        printed("[{\"loop\": 2, \"x\": [{\"dim\": [{\"in\": \"x\"}, 1]}], \"carried\": "
                "[[{\"v\": 2}, {\"v\": 0}]]},"
                " {\"op\": \"torch.cat\", \"x\": [{\"list\": [{\"in\": \"x\"}, {\"v\": 2}]}, -1], "
                "\"kw\": {}, \"y\": [1]},"
                " {\"op\": \"torch.tanh\", \"x\": [{\"v\": 1}], \"kw\": {}, \"y\": [2]}]",
                1);
    assert_string_equal(t,
                        "   1  for t in range(x.size(1)): the next 2 ops are one step; carried: v2 "
                        "starts as v0\n"
                        "   2  v1 = torch.cat([x, v2], -1)\n"
                        "   3  v2 = torch.tanh(v1)\n");
    free(t);
}

static void test_op_and_call_lines(void **state) {
    (void)state;
    char *t = printed(
        "[{\"call\": \"model.embed\", \"x\": {\"input\": {\"in\": \"ids\"}, \"cache\": null, "
        "\"use_cache\": false}, \"y\": [0], \"yn\": [\"0\"]},"
        " {\"op\": \"torch.Tensor.view\", \"in\": [[2, 13, 64]], \"out\": [[2, 13, 4, 16]],"
        "  \"x\": [{\"v\": 0}, {\"dim\": [{\"in\": \"ids\"}, 0]}, -1, 16], \"kw\": {}, \"y\": [1]},"
        " {\"op\": \"torch.Tensor.split\", \"in\": [[2, 13, 64]], \"out\": [[2, 13, 32], [2, 13, "
        "32]],"
        "  \"x\": [{\"v\": 0}, 32], \"kw\": {\"dim\": 2}, \"y\": [2, 3]}]",
        1);
    assert_string_equal(t, "   1  v0 = call model.embed (?)(input=ids, use_cache=False)\n"
                           "   2  v1 = torch.Tensor.view(v0, ids.size(0), -1, 16)  in (2, 13, 64) "
                           "-> (2, 13, 4, 16)\n"
                           "   3  v2, v3 = torch.Tensor.split(v0, 32, dim=2)  in (2, 13, 64) -> "
                           "(2, 13, 32), (2, 13, 32)\n");
    free(t);
}

static void test_older_listing_without_dataflow(void **state) {
    (void)state;
    char *t = printed("[{\"call\": \"lm_head\"}, {\"op\": \"torch.Tensor.view\", \"in\": [[8]], "
                      "\"out\": [[2, 4]], \"args\": \"T, 2, 4\"}]",
                      1);
    assert_string_equal(t, "   1  call lm_head (?)\n"
                           "   2  torch.Tensor.view(T, 2, 4)  in (8,) -> (2, 4)\n");
    free(t);
}

static void test_returns_and_no_ops(void **state) {
    (void)state;
    cJSON *ops = cJSON_Parse("[]"), *returns = cJSON_Parse("[{\"in\": \"x\"}, {\"v\": 2}]");
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    fmx_optrace_print(f, NULL, ops, returns);
    fclose(f);
    assert_string_equal(buf, "  (no ops recorded)\nreturns [x, v2]\n");
    free(buf);
    cJSON_Delete(ops);
    cJSON_Delete(returns);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_values),
        cmocka_unit_test(test_op_and_call_lines),
        cmocka_unit_test(test_time_loop_line),
        cmocka_unit_test(test_older_listing_without_dataflow),
        cmocka_unit_test(test_returns_and_no_ops),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
