/*
 * test_proto.c — the wire format (env/proto.c): the validator refuses every
 * malformed or over-limit message before anything is built from it (length
 * headers that claim more than the message holds are refused without a big
 * allocation: the decoding tests run under an address-space limit), and valid
 * nested messages round-trip msgpack → cJSON → msgpack with ints, floats,
 * bools, nil and strings keeping their types, and "req" kept exact.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>
#include <msgpack.h>

#include "proto.h"
#include "status.h"

static char err[512];

/* Decodes buf; expects refusal with FMX_EFORMAT and a message containing want. */
static void refused(const void *buf, size_t len, const char *want) {
    cJSON *j = (cJSON *)0x1;
    err[0] = '\0';
    assert_int_equal(fmx_proto_validate(buf, len, err, sizeof err), FMX_EFORMAT);
    if (want && !strstr(err, want)) fail_msg("error '%s' does not mention '%s'", err, want);
    assert_int_equal(fmx_proto_decode(buf, len, &j, NULL, NULL, err, sizeof err), FMX_EFORMAT);
    assert_null(j);
}

/* Address space now in use, from /proc/self/statm (pages). */
static size_t vm_bytes(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long pages = 0;
    if (f) {
        if (fscanf(f, "%lu", &pages) != 1) pages = 0;
        fclose(f);
    }
    return (size_t)pages * (size_t)sysconf(_SC_PAGESIZE);
}

static struct rlimit saved_limit;

/* Allows at most 64 MiB more address space: an allocation sized by a lying
 * header (gigabytes) would fail, and the test would see ENOMEM, not EFORMAT. */
static int limit_memory(void **state) {
    (void)state;
    getrlimit(RLIMIT_AS, &saved_limit);
    struct rlimit r = saved_limit;
    r.rlim_cur = vm_bytes() + (64u << 20);
    if (saved_limit.rlim_cur != RLIM_INFINITY && r.rlim_cur > saved_limit.rlim_cur)
        r.rlim_cur = saved_limit.rlim_cur;
    return setrlimit(RLIMIT_AS, &r);
}

static int unlimit_memory(void **state) {
    (void)state;
    return setrlimit(RLIMIT_AS, &saved_limit);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void test_truncated(void **state) {
    (void)state;
    refused("", 0, "empty");
    refused("\x81", 1, "truncated");                  /* map of 1, nothing after */
    refused("\x81\xa2op", 4, "truncated");            /* key without value */
    refused("\x81\xa2op\xa5hel", 7, "truncated");     /* fixstr claims 5, has 3 */
    refused("\x81\xa1x\xcb\x00\x00", 6, "truncated"); /* float64 cut short */
    refused("\x81\xa1x\xd9", 4, "truncated");         /* str8 without its length */
    refused("\x81\xa1x\xdd\x00\x00", 6, "truncated"); /* array32 length cut short */
}

/* Headers claiming far more than the message holds: refused at once. */
static void test_lying_headers(void **state) {
    (void)state;
    double t0 = now();
    /* {"a": array32 of 4294967295} — 8 bytes */
    refused("\x81\xa1\x61\xdd\xff\xff\xff\xff", 8, "entries");
    /* a top-level map32 of 4 billion pairs, 5 bytes */
    refused("\xdf\xff\xff\xff\xff", 5, "entries");
    /* {"a": array32 of 60000}: under the entry cap, more than remains */
    refused("\x81\xa1\x61\xdd\x00\x00\xea\x60\xc0", 9, "truncated");
    /* {"a": map32 of 1000 pairs} with 2 bytes left */
    refused("\x81\xa1\x61\xdf\x00\x00\x03\xe8\xc0\xc0", 10, "truncated");
    /* {"a": str32 of 4 billion bytes} */
    refused("\x81\xa1\x61\xdb\xff\xff\xff\xff\x41", 9, "limit");
    /* {"a": str32 of 1 MiB} with 3 bytes */
    refused("\x81\xa1\x61\xdb\x00\x10\x00\x00\x41\x42\x43", 11, "truncated");
    /* {"a": bin32 of 4 billion bytes} */
    refused("\x81\xa1\x61\xc6\xff\xff\xff\xff", 8, "binary");
    /* {"a": ext32} */
    refused("\x81\xa1\x61\xc9\xff\xff\xff\xff\x01", 9, "extension");
    assert_true(now() - t0 < 0.5);
}

/* A message nested `levels` deep: the top map, then arrays. */
static unsigned char *nested(int levels, size_t *len) {
    unsigned char *b = malloc((size_t)levels + 8);
    size_t n = 0;
    b[n++] = 0x81;
    b[n++] = 0xa1;
    b[n++] = 'a';
    for (int i = 1; i < levels; i++)
        b[n++] = 0x91; /* fixarray of 1 */
    b[n++] = 0xc0;
    *len = n;
    return b;
}

static void test_depth(void **state) {
    (void)state;
    size_t len;
    unsigned char *ok = nested(16, &len);
    assert_int_equal(fmx_proto_validate(ok, len, err, sizeof err), FMX_OK);
    cJSON *j = NULL;
    assert_int_equal(fmx_proto_decode(ok, len, &j, NULL, NULL, err, sizeof err), FMX_OK);
    cJSON_Delete(j);
    free(ok);
    unsigned char *deep = nested(17, &len);
    refused(deep, len, "nesting");
    free(deep);
    unsigned char *deeper = nested(100000, &len);
    refused(deeper, len, "nesting");
    free(deeper);
}

static void test_map_keys(void **state) {
    (void)state;
    refused("\x81\x01\x02", 3, "keys must be strings");             /* {1: 2} */
    refused("\x81\xa1\x61\x81\xc3\x01", 6, "keys must be strings"); /* {"a": {true: 1}} */
    refused("\x81\xa1\x61\x81\x90\x01", 6, "keys must be strings"); /* {"a": {[]: 1}} */
}

static void test_not_a_map(void **state) {
    (void)state;
    refused("\x92\x01\x02", 3, "map"); /* [1, 2] */
    refused("\x05", 1, "map");         /* 5 */
    refused("\xa2hi", 3, "map");       /* "hi" */
    refused("\xc0", 1, "map");         /* nil */
    refused("not msgpack", 11, "map");
    refused("\x80\x80", 2, "trailing"); /* two maps */
    refused("\x81\xa1\x61\xc1", 4, "never used");
}

static void test_strings(void **state) {
    (void)state;
    refused("\x81\xa1\x61\xa2\xc3\x28", 6, "UTF-8"); /* invalid continuation */
    refused("\x81\xa1\x61\xa2\x41\x00", 6, "UTF-8"); /* NUL byte */
    refused("\x81\xa2\xed\xa0\x01", 5, "UTF-8");     /* surrogate in a key */
    /* valid multi-byte text passes */
    const char good[] = "\x81\xa1\x61\xa5\xc2\xb7\xe2\x86\x92"; /* "·→" */
    cJSON *j = NULL;
    assert_int_equal(fmx_proto_decode(good, sizeof good - 1, &j, NULL, NULL, err, sizeof err),
                     FMX_OK);
    assert_string_equal(cJSON_GetObjectItem(j, "a")->valuestring, "\xc2\xb7\xe2\x86\x92");
    cJSON_Delete(j);
}

static void test_limits(void **state) {
    (void)state;
    /* message over 8 MiB */
    size_t big = FMX_PROTO_MAX_MESSAGE + 16;
    unsigned char *b = calloc(1, big);
    b[0] = 0x81;
    b[1] = 0xa1;
    b[2] = 'a';
    b[3] = 0xdb; /* str32 of big - 8 */
    uint32_t n = (uint32_t)(big - 8);
    b[4] = (unsigned char)(n >> 24);
    b[5] = (unsigned char)(n >> 16);
    b[6] = (unsigned char)(n >> 8);
    b[7] = (unsigned char)n;
    memset(b + 8, 'x', big - 8);
    refused(b, big, "over the limit");
    /* a 5 MiB string in a small enough message */
    size_t len = 8 + (5u << 20);
    n = 5u << 20;
    b[4] = (unsigned char)(n >> 24);
    b[5] = (unsigned char)(n >> 16);
    b[6] = (unsigned char)(n >> 8);
    b[7] = (unsigned char)n;
    refused(b, len, "over the limit");
    /* an array of 65,537 nils */
    b[3] = 0xdd;
    n = FMX_PROTO_MAX_ENTRIES + 1;
    b[4] = (unsigned char)(n >> 24);
    b[5] = (unsigned char)(n >> 16);
    b[6] = (unsigned char)(n >> 8);
    b[7] = (unsigned char)n;
    memset(b + 8, 0xc0, n);
    refused(b, 8 + n, "entries");
    /* 65,536 nils is fine */
    n = FMX_PROTO_MAX_ENTRIES;
    b[5] = (unsigned char)(n >> 16);
    b[6] = (unsigned char)(n >> 8);
    b[7] = (unsigned char)n;
    assert_int_equal(fmx_proto_validate(b, 8 + n, err, sizeof err), FMX_OK);
    /* five arrays of 65,536 nils: too many values in all */
    size_t off = 0;
    b[off++] = 0x85;
    for (int k = 0; k < 5; k++) {
        b[off++] = 0xa1;
        b[off++] = (unsigned char)('a' + k);
        b[off++] = 0xdd;
        b[off++] = 0;
        b[off++] = 1;
        b[off++] = 0;
        b[off++] = 0;
        memset(b + off, 0xc0, 65536);
        off += 65536;
    }
    refused(b, off, "values");
    free(b);
}

/* A nested message packed with msgpack-c. */
static msgpack_sbuffer packed_message(void) {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 5);
    msgpack_pack_str_with_body(&pk, "op", 2);
    msgpack_pack_str_with_body(&pk, "step", 4);
    msgpack_pack_str_with_body(&pk, "req", 3);
    msgpack_pack_uint64(&pk, 18446744073709551615ull);
    msgpack_pack_str_with_body(&pk, "episode", 7);
    msgpack_pack_int64(&pk, 42);
    msgpack_pack_str_with_body(&pk, "action", 6);
    msgpack_pack_map(&pk, 2);
    msgpack_pack_str_with_body(&pk, "tool", 4);
    msgpack_pack_str_with_body(&pk, "capture_intermediate", 20);
    msgpack_pack_str_with_body(&pk, "args", 4);
    msgpack_pack_map(&pk, 4);
    msgpack_pack_str_with_body(&pk, "probe", 5);
    msgpack_pack_int64(&pk, -3);
    msgpack_pack_str_with_body(&pk, "values", 6);
    msgpack_pack_true(&pk);
    msgpack_pack_str_with_body(&pk, "scale", 5);
    msgpack_pack_double(&pk, 2.0);
    msgpack_pack_str_with_body(&pk, "list", 4);
    msgpack_pack_array(&pk, 4);
    msgpack_pack_nil(&pk);
    msgpack_pack_false(&pk);
    msgpack_pack_float(&pk, 0.5f);
    msgpack_pack_array(&pk, 1);
    msgpack_pack_str_with_body(&pk, "deep", 4);
    msgpack_pack_str_with_body(&pk, "big", 3);
    msgpack_pack_int64(&pk, 4000000000000ll);
    return sb;
}

/* Finds key in a msgpack map object. */
static const msgpack_object *mp_get(const msgpack_object *map, const char *key) {
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object *k = &map->via.map.ptr[i].key;
        if (k->via.str.size == strlen(key) && memcmp(k->via.str.ptr, key, k->via.str.size) == 0)
            return &map->via.map.ptr[i].val;
    }
    return NULL;
}

static void test_round_trip(void **state) {
    (void)state;
    msgpack_sbuffer sb = packed_message();
    cJSON *j = NULL;
    uint64_t req = 0;
    int has_req = 0;
    assert_int_equal(fmx_proto_decode(sb.data, sb.size, &j, &req, &has_req, err, sizeof err),
                     FMX_OK);
    msgpack_sbuffer_destroy(&sb);
    assert_true(has_req);
    assert_true(req == 18446744073709551615ull);
    assert_null(cJSON_GetObjectItem(j, "req")); /* travels beside the body */
    assert_string_equal(cJSON_GetObjectItem(j, "op")->valuestring, "step");
    assert_int_equal(cJSON_GetObjectItem(j, "episode")->valueint, 42);
    cJSON *args = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "action"), "args");
    assert_int_equal(cJSON_GetObjectItem(args, "probe")->valueint, -3);
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(args, "values")));
    cJSON *list = cJSON_GetObjectItem(args, "list");
    assert_int_equal(cJSON_GetArraySize(list), 4);
    assert_true(cJSON_IsNull(cJSON_GetArrayItem(list, 0)));
    assert_true(cJSON_IsFalse(cJSON_GetArrayItem(list, 1)));
    assert_true(cJSON_GetArrayItem(list, 2)->valuedouble == 0.5);
    assert_string_equal(cJSON_GetArrayItem(cJSON_GetArrayItem(list, 3), 0)->valuestring, "deep");

    /* Back to msgpack, with req first: types are kept. */
    char *out = NULL;
    size_t len = 0;
    assert_int_equal(fmx_proto_encode(j, &req, &out, &len), FMX_OK);
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    assert_int_equal(msgpack_unpack_next(&u, out, len, &off), MSGPACK_UNPACK_SUCCESS);
    assert_int_equal(off, len);
    const msgpack_object *top = &u.data;
    assert_int_equal(top->type, MSGPACK_OBJECT_MAP);
    assert_int_equal(top->via.map.ptr[0].key.via.str.size, 3); /* "req" first */
    assert_true(mp_get(top, "req")->via.u64 == 18446744073709551615ull);
    assert_int_equal(mp_get(top, "episode")->type, MSGPACK_OBJECT_POSITIVE_INTEGER);
    assert_int_equal(mp_get(top, "big")->via.i64, 4000000000000ll);
    const msgpack_object *a = mp_get(mp_get(top, "action"), "args");
    assert_int_equal(mp_get(a, "probe")->type, MSGPACK_OBJECT_NEGATIVE_INTEGER);
    assert_int_equal(mp_get(a, "values")->type, MSGPACK_OBJECT_BOOLEAN);
    /* a float that is whole stays a float */
    assert_int_equal(mp_get(a, "scale")->type, MSGPACK_OBJECT_FLOAT64);
    assert_true(mp_get(a, "scale")->via.f64 == 2.0);
    const msgpack_object *l = mp_get(a, "list");
    assert_int_equal(l->via.array.ptr[0].type, MSGPACK_OBJECT_NIL);
    assert_int_equal(l->via.array.ptr[2].type, MSGPACK_OBJECT_FLOAT64);
    msgpack_unpacked_destroy(&u);

    /* And the re-encoded bytes decode to the same tree. */
    cJSON *again = NULL;
    uint64_t req2 = 0;
    assert_int_equal(fmx_proto_decode(out, len, &again, &req2, NULL, err, sizeof err), FMX_OK);
    assert_true(req2 == req);
    assert_true(cJSON_Compare(j, again, 1));
    cJSON_Delete(again);
    free(out);
    cJSON_Delete(j);
}

static void test_encode_numbers(void **state) {
    (void)state;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "i", 7);
    cJSON_AddNumberToObject(o, "f", 0.25);
    cJSON_AddNumberToObject(o, "neg", -9);
    fmx_proto_add_float(o, "reward", 1.0);
    cJSON_AddStringToObject(o, "s", "text");
    char *out;
    size_t len;
    assert_int_equal(fmx_proto_encode(o, NULL, &out, &len), FMX_OK);
    /* {"i": 7, "f": 0.25, "neg": -9, "reward": 1.0, "s": "text"} byte for byte */
    const unsigned char want[] = {0x85, 0xa1, 'i', 0x07, 0xa1, 'f',  0xcb, 0x3f, 0xd0, 0,    0,
                                  0,    0,    0,   0,    0xa3, 'n',  'e',  'g',  0xf7, 0xa6, 'r',
                                  'e',  'w',  'a', 'r',  'd',  0xcb, 0x3f, 0xf0, 0,    0,    0,
                                  0,    0,    0,   0xa1, 's',  0xa4, 't',  'e',  'x',  't'};
    assert_int_equal(len, sizeof want);
    assert_memory_equal(out, want, sizeof want);
    free(out);
    cJSON_Delete(o);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_truncated, limit_memory, unlimit_memory),
        cmocka_unit_test_setup_teardown(test_lying_headers, limit_memory, unlimit_memory),
        cmocka_unit_test_setup_teardown(test_depth, limit_memory, unlimit_memory),
        cmocka_unit_test(test_map_keys),
        cmocka_unit_test(test_not_a_map),
        cmocka_unit_test(test_strings),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_encode_numbers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
