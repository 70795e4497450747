/*
 * proto.h — the wire format of the environment protocol (docs/protocol.md):
 * msgpack in, msgpack out, cJSON in between.
 *
 * Every incoming message is validated by walking its raw bytes BEFORE any
 * object is built: each declared str/bin/array/map/ext length is checked
 * against the bytes that remain and against the protocol's caps (message
 * size, nesting depth, string size, entries per container, values in all),
 * so a 5-byte array32 header claiming 4 billion entries is refused without
 * allocating. Only then is the message unpacked (msgpack-c) and converted to
 * cJSON. Map keys must be strings; bin and ext values are refused; strings
 * must be UTF-8 without NUL bytes (cJSON strings are C strings).
 *
 * Replies go the other way: cJSON → msgpack. Numbers that are whole and fit
 * an int64 are sent as integers, others as float64; a number made with
 * fmx_proto_float() is always sent as a float (a reward of 1.0 stays 1.0).
 *
 * Not here: what the messages mean (env/server.c), sockets.
 */
#ifndef FMX_PROTO_H
#define FMX_PROTO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cJSON cJSON;

#define FMX_PROTO_VERSION 1
#define FMX_PROTO_MAX_MESSAGE (8u << 20) /* bytes in one request */
#define FMX_PROTO_MAX_DEPTH 16           /* nesting of arrays and maps; the top map is 1 */
#define FMX_PROTO_MAX_STR (4u << 20)     /* bytes in one string */
#define FMX_PROTO_MAX_ENTRIES 65536      /* elements of one array or pairs of one map */
#define FMX_PROTO_MAX_VALUES 262144      /* values in one message, containers included */

/* Checks that buf[0..len) is exactly one msgpack value within the caps above
 * and of the types the protocol accepts (nil, bool, int, float, str, array,
 * map with string keys). The top level must be a map. Never allocates.
 * Returns FMX_OK, or FMX_EFORMAT with the reason in err. */
int fmx_proto_validate(const void *buf, size_t len, char *err, size_t errsz);

/* Validates, then decodes a request into a cJSON object (caller frees with
 * cJSON_Delete). When the map has an unsigned integer "req" it is also stored
 * exactly in *req (when req is not NULL) and *has_req is set to 1; "req" is
 * left out of *out. Returns FMX_OK, FMX_EFORMAT (err says why) or FMX_ENOMEM. */
int fmx_proto_decode(const void *buf, size_t len, cJSON **out, uint64_t *req, int *has_req,
                     char *err, size_t errsz);

/* Encodes obj (any cJSON value; the protocol uses maps) as msgpack into a
 * buffer the caller frees with free(). When req is not NULL and obj is an
 * object, "req": *req is written as the map's first entry. Returns FMX_OK or
 * FMX_ENOMEM. */
int fmx_proto_encode(const cJSON *obj, const uint64_t *req, char **out, size_t *len);

/* A cJSON number that encodes as a msgpack float even when it is whole.
 * Caller owns it like any cJSON item. */
cJSON *fmx_proto_float(double v);
/* cJSON_AddNumberToObject for floats; returns the item (owned by obj). */
cJSON *fmx_proto_add_float(cJSON *obj, const char *name, double v);

#ifdef __cplusplus
}
#endif

#endif
