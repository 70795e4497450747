/*
 * proto.c — msgpack ⇄ cJSON for the environment protocol. The validator is a
 * bounded walk over raw bytes (no allocation); decoding uses msgpack-c only
 * after the walk accepted the bytes, so the unpacker's zone is bounded by the
 * caps in proto.h. Encoding writes replies with msgpack-c's packer.
 */
#include "proto.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <msgpack.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "status.h"

/* A cJSON type bit of our own: "encode as float". cJSON only looks at the low
 * byte of type for the kind, keeps other bits on duplicate, and prints such a
 * number as usual. */
#define FMX__PROTO_FLOAT (1 << 12)

typedef struct {
    const unsigned char *p, *end;
    size_t values;
    char *err;
    size_t errsz;
} fmx__walk;

static int fmx__bad(fmx__walk *w, const char *fmt, ...) {
    if (w->err && w->errsz) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(w->err, w->errsz, fmt, ap);
        va_end(ap);
    }
    return FMX_EFORMAT;
}

static uint64_t fmx__be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

/* Reads an n-byte big-endian length after the type byte. */
static int fmx__len(fmx__walk *w, int n, uint64_t *out) {
    if ((size_t)(w->end - w->p) < (size_t)n)
        return fmx__bad(w, "truncated message: a length field runs past the end");
    *out = fmx__be(w->p, n);
    w->p += n;
    return FMX_OK;
}

/* Valid UTF-8 without NUL bytes (overlongs, surrogates and > U+10FFFF refused). */
static int fmx__utf8_ok(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c == 0) return 0;
        if (c < 0x80) {
            i++;
            continue;
        }
        int k;
        uint32_t cp;
        if (c >= 0xc2 && c <= 0xdf) {
            k = 1;
            cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            k = 2;
            cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            k = 3;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (n - i <= (size_t)k) return 0;
        for (int j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + j] & 0x3f);
        }
        if ((k == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
            (k == 3 && (cp < 0x10000 || cp > 0x10ffff)))
            return 0;
        i += (size_t)k + 1;
    }
    return 1;
}

static int fmx__str_body(fmx__walk *w, uint64_t n) {
    if (n > FMX_PROTO_MAX_STR)
        return fmx__bad(w, "a string of %llu bytes is over the limit of %u", (unsigned long long)n,
                        FMX_PROTO_MAX_STR);
    if (n > (uint64_t)(w->end - w->p))
        return fmx__bad(w, "truncated message: a string of %llu bytes, %zu bytes left",
                        (unsigned long long)n, (size_t)(w->end - w->p));
    if (!fmx__utf8_ok(w->p, (size_t)n))
        return fmx__bad(w, "a string is not valid UTF-8 or contains a NUL byte");
    w->p += n;
    return FMX_OK;
}

static int fmx__value(fmx__walk *w, int depth, int want_str);

/* n elements (or n pairs when map) of a container at depth. */
static int fmx__container(fmx__walk *w, uint64_t n, int map, int depth) {
    if (depth > FMX_PROTO_MAX_DEPTH)
        return fmx__bad(w, "nesting deeper than %d levels", FMX_PROTO_MAX_DEPTH);
    if (n > FMX_PROTO_MAX_ENTRIES)
        return fmx__bad(w, "a%s with %llu entries is over the limit of %d",
                        map ? " map" : "n array", (unsigned long long)n, FMX_PROTO_MAX_ENTRIES);
    uint64_t need = map ? 2 * n : n; /* every value takes at least one byte */
    if (need > (uint64_t)(w->end - w->p))
        return fmx__bad(w, "truncated message: a%s declares %llu entries, %zu bytes left",
                        map ? " map" : "n array", (unsigned long long)n, (size_t)(w->end - w->p));
    for (uint64_t i = 0; i < n; i++) {
        int rc;
        if (map && (rc = fmx__value(w, depth + 1, 1))) return rc;
        if ((rc = fmx__value(w, depth + 1, 0))) return rc;
    }
    return FMX_OK;
}

/* One value. want_str: it is a map key and must be a string. */
static int fmx__value(fmx__walk *w, int depth, int want_str) {
    if (w->p >= w->end) return fmx__bad(w, "truncated message: a value is missing");
    if (++w->values > FMX_PROTO_MAX_VALUES)
        return fmx__bad(w, "more than %d values in one message", FMX_PROTO_MAX_VALUES);
    unsigned char b = *w->p++;
    int is_str = (b >= 0xa0 && b <= 0xbf) || (b >= 0xd9 && b <= 0xdb);
    if (want_str && !is_str) return fmx__bad(w, "map keys must be strings (found type 0x%02x)", b);
    uint64_t n = 0;
    int rc;
    if (b <= 0x7f || b >= 0xe0) return FMX_OK; /* fixints */
    if (b <= 0x8f) return fmx__container(w, b & 0x0f, 1, depth);
    if (b <= 0x9f) return fmx__container(w, b & 0x0f, 0, depth);
    if (b <= 0xbf) return fmx__str_body(w, b & 0x1f);
    switch (b) {
    case 0xc0: /* nil */
    case 0xc2: /* false */
    case 0xc3: /* true */
        return FMX_OK;
    case 0xca: /* float32 */
    case 0xcb: /* float64 */
    case 0xcc: /* uint8..64, int8..64 */
    case 0xcd:
    case 0xce:
    case 0xcf:
    case 0xd0:
    case 0xd1:
    case 0xd2:
    case 0xd3: {
        static const int size[] = {4, 8, 1, 2, 4, 8, 1, 2, 4, 8};
        int k = size[b - 0xca];
        if ((size_t)(w->end - w->p) < (size_t)k)
            return fmx__bad(w, "truncated message: a number runs past the end");
        w->p += k;
        return FMX_OK;
    }
    case 0xd9:
    case 0xda:
    case 0xdb:
        if ((rc = fmx__len(w, 1 << (b - 0xd9), &n))) return rc;
        return fmx__str_body(w, n);
    case 0xdc:
    case 0xdd:
        if ((rc = fmx__len(w, b == 0xdc ? 2 : 4, &n))) return rc;
        return fmx__container(w, n, 0, depth);
    case 0xde:
    case 0xdf:
        if ((rc = fmx__len(w, b == 0xde ? 2 : 4, &n))) return rc;
        return fmx__container(w, n, 1, depth);
    case 0xc4:
    case 0xc5:
    case 0xc6:
        return fmx__bad(w, "binary values are not accepted; send strings");
    case 0xc7:
    case 0xc8:
    case 0xc9:
    case 0xd4:
    case 0xd5:
    case 0xd6:
    case 0xd7:
    case 0xd8:
        return fmx__bad(w, "extension types are not accepted");
    default: /* 0xc1 */
        return fmx__bad(w, "not msgpack: byte 0x%02x is never used", b);
    }
}

int fmx_proto_validate(const void *buf, size_t len, char *err, size_t errsz) {
    fmx__walk w = {buf, (const unsigned char *)buf + len, 0, err, errsz};
    if (!buf || len == 0) return fmx__bad(&w, "empty message");
    if (len > FMX_PROTO_MAX_MESSAGE)
        return fmx__bad(&w, "message of %zu bytes is over the limit of %u", len,
                        FMX_PROTO_MAX_MESSAGE);
    unsigned char b = w.p[0];
    if (!((b >= 0x80 && b <= 0x8f) || b == 0xde || b == 0xdf))
        return fmx__bad(&w, "a request must be a msgpack map");
    int rc = fmx__value(&w, 1, 0);
    if (rc) return rc;
    if (w.p != w.end)
        return fmx__bad(&w, "%zu trailing bytes after the message", (size_t)(w.end - w.p));
    return FMX_OK;
}

/* ---- decode ---- */

static cJSON *fmx__to_json(const msgpack_object *o, int64_t skip);

/* A map; pair number skip (or -1) is left out. */
static cJSON *fmx__map_to_json(const msgpack_object *o, int64_t skip) {
    cJSON *m = cJSON_CreateObject();
    for (uint32_t i = 0; m && i < o->via.map.size; i++) {
        if ((int64_t)i == skip) continue;
        const msgpack_object_kv *kv = &o->via.map.ptr[i];
        char *key = malloc(kv->key.via.str.size + 1);
        cJSON *v = key ? fmx__to_json(&kv->val, -1) : NULL;
        if (!v) {
            free(key);
            cJSON_Delete(m);
            return NULL;
        }
        /* an empty string's ptr may be NULL: memcpy must not see it */
        if (kv->key.via.str.size) memcpy(key, kv->key.via.str.ptr, kv->key.via.str.size);
        key[kv->key.via.str.size] = '\0';
        if (!cJSON_AddItemToObject(m, key, v)) {
            cJSON_Delete(v);
            free(key);
            cJSON_Delete(m);
            return NULL;
        }
        free(key);
    }
    return m;
}

static cJSON *fmx__to_json(const msgpack_object *o, int64_t skip) {
    switch (o->type) {
    case MSGPACK_OBJECT_NIL:
        return cJSON_CreateNull();
    case MSGPACK_OBJECT_BOOLEAN:
        return cJSON_CreateBool(o->via.boolean);
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        return cJSON_CreateNumber((double)o->via.u64);
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        return cJSON_CreateNumber((double)o->via.i64);
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
        return fmx_proto_float(o->via.f64);
    case MSGPACK_OBJECT_STR: {
        char *s = malloc(o->via.str.size + 1);
        if (!s) return NULL;
        if (o->via.str.size) memcpy(s, o->via.str.ptr, o->via.str.size);
        s[o->via.str.size] = '\0';
        cJSON *j = cJSON_CreateString(s);
        free(s);
        return j;
    }
    case MSGPACK_OBJECT_ARRAY: {
        cJSON *a = cJSON_CreateArray();
        for (uint32_t i = 0; a && i < o->via.array.size; i++) {
            cJSON *v = fmx__to_json(&o->via.array.ptr[i], -1);
            if (!v) {
                cJSON_Delete(a);
                return NULL;
            }
            cJSON_AddItemToArray(a, v);
        }
        return a;
    }
    case MSGPACK_OBJECT_MAP:
        return fmx__map_to_json(o, skip);
    default: /* the validator let no other type through */
        return NULL;
    }
}

int fmx_proto_decode(const void *buf, size_t len, cJSON **out, uint64_t *req, int *has_req,
                     char *err, size_t errsz) {
    *out = NULL;
    if (has_req) *has_req = 0;
    int rc = fmx_proto_validate(buf, len, err, errsz);
    if (rc) return rc;
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    if (msgpack_unpack_next(&u, buf, len, &off) != MSGPACK_UNPACK_SUCCESS ||
        u.data.type != MSGPACK_OBJECT_MAP) {
        msgpack_unpacked_destroy(&u);
        if (err && errsz) snprintf(err, errsz, "not a msgpack map");
        return FMX_EFORMAT;
    }
    /* "req" travels beside the body, exactly (uint64 does not fit a double). */
    const msgpack_object_map *m = &u.data.via.map;
    int64_t skip = -1;
    for (uint32_t i = 0; i < m->size && skip < 0; i++) {
        const msgpack_object *k = &m->ptr[i].key;
        if (k->via.str.size == 3 && memcmp(k->via.str.ptr, "req", 3) == 0 &&
            m->ptr[i].val.type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
            if (req) *req = m->ptr[i].val.via.u64;
            if (has_req) *has_req = 1;
            skip = i;
        }
    }
    cJSON *j = fmx__to_json(&u.data, skip);
    msgpack_unpacked_destroy(&u);
    if (!j) {
        if (err && errsz) snprintf(err, errsz, "out of memory");
        return FMX_ENOMEM;
    }
    *out = j;
    return FMX_OK;
}

/* ---- encode ---- */

cJSON *fmx_proto_float(double v) {
    cJSON *n = cJSON_CreateNumber(v);
    if (n) n->type |= FMX__PROTO_FLOAT;
    return n;
}

cJSON *fmx_proto_add_float(cJSON *obj, const char *name, double v) {
    cJSON *n = fmx_proto_float(v);
    if (n && !cJSON_AddItemToObject(obj, name, n)) {
        cJSON_Delete(n);
        return NULL;
    }
    return n;
}

static int fmx__pack_str(msgpack_packer *pk, const char *s) {
    size_t n = s ? strlen(s) : 0;
    return msgpack_pack_str_with_body(pk, s ? s : "", n);
}

static int fmx__pack(msgpack_packer *pk, const cJSON *j) {
    int rc = 0;
    switch (j->type & 0xff) {
    case cJSON_False:
        return msgpack_pack_false(pk);
    case cJSON_True:
        return msgpack_pack_true(pk);
    case cJSON_Number: {
        double v = j->valuedouble;
        if (!(j->type & FMX__PROTO_FLOAT) && isfinite(v) && v == floor(v) &&
            fabs(v) < 9223372036854775808.0)
            return msgpack_pack_int64(pk, (int64_t)v);
        return msgpack_pack_double(pk, v);
    }
    case cJSON_String:
    case cJSON_Raw:
        return fmx__pack_str(pk, j->valuestring);
    case cJSON_Array: {
        int n = cJSON_GetArraySize(j);
        rc = msgpack_pack_array(pk, (size_t)n);
        for (const cJSON *c = j->child; !rc && c; c = c->next)
            rc = fmx__pack(pk, c);
        return rc;
    }
    case cJSON_Object: {
        int n = cJSON_GetArraySize(j);
        rc = msgpack_pack_map(pk, (size_t)n);
        for (const cJSON *c = j->child; !rc && c; c = c->next) {
            rc = fmx__pack_str(pk, c->string);
            if (!rc) rc = fmx__pack(pk, c);
        }
        return rc;
    }
    default: /* cJSON_NULL, cJSON_Invalid */
        return msgpack_pack_nil(pk);
    }
}

int fmx_proto_encode(const cJSON *obj, const uint64_t *req, char **out, size_t *len) {
    *out = NULL;
    *len = 0;
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    int rc;
    if (req && cJSON_IsObject(obj)) {
        rc = msgpack_pack_map(&pk, (size_t)cJSON_GetArraySize(obj) + 1);
        if (!rc) rc = msgpack_pack_str_with_body(&pk, "req", 3);
        if (!rc) rc = msgpack_pack_uint64(&pk, *req);
        for (const cJSON *c = obj->child; !rc && c; c = c->next) {
            rc = fmx__pack_str(&pk, c->string);
            if (!rc) rc = fmx__pack(&pk, c);
        }
    } else {
        rc = fmx__pack(&pk, obj);
    }
    if (rc) {
        msgpack_sbuffer_destroy(&sb);
        return FMX_ENOMEM;
    }
    *len = sb.size;
    *out = msgpack_sbuffer_release(&sb);
    if (!*out) { /* an empty buffer is never released as NULL for a real value */
        return FMX_ENOMEM;
    }
    return FMX_OK;
}
