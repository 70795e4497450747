/*
 * channel.c — the worker channel's messages (channel.h): framing and a
 * lossless encoding of cJSON trees. Not here: who sends what (env/worker.c).
 */
#define _GNU_SOURCE
#include "channel.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "proto.h"
#include "status.h"

#define FMX__TREE_MAX_DEPTH 64

/* The encoding.
 *
 * JSON text would lose NaN/Inf (cJSON prints null) and the float flag of
 * whole numbers (fmx_proto_float: a reward of 1.0 goes out as a float), so
 * a tree travels as: 'n' null, 'f' false, 't' true, 'd' flags:u32 value:f64,
 * 's' len:u32 bytes, 'a' n:u32 items, 'o' n:u32 (len:u32 key item)*. */

typedef struct {
    char *s;
    size_t len, cap;
    int oom;
} fmx__buf;

static void fmx__put(fmx__buf *b, const void *p, size_t n) {
    if (b->oom) return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        char *s = realloc(b->s, cap);
        if (!s) {
            b->oom = 1;
            return;
        }
        b->s = s;
        b->cap = cap;
    }
    memcpy(b->s + b->len, p, n);
    b->len += n;
}

static void fmx__put_u32(fmx__buf *b, uint32_t v) {
    unsigned char x[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 24)};
    fmx__put(b, x, 4);
}

static void fmx__put_str(fmx__buf *b, const char *s) {
    size_t n = s ? strlen(s) : 0;
    fmx__put_u32(b, (uint32_t)n);
    fmx__put(b, s ? s : "", n);
}

static void fmx__tree_put(fmx__buf *b, const cJSON *j) {
    switch (j->type & 0xff) {
    case cJSON_False:
        fmx__put(b, "f", 1);
        break;
    case cJSON_True:
        fmx__put(b, "t", 1);
        break;
    case cJSON_Number: {
        fmx__put(b, "d", 1);
        fmx__put_u32(b, (uint32_t)(j->type & ~(0xff | cJSON_IsReference | cJSON_StringIsConst)));
        fmx__put(b, &j->valuedouble, 8);
        break;
    }
    case cJSON_String:
    case cJSON_Raw:
        fmx__put(b, "s", 1);
        fmx__put_str(b, j->valuestring);
        break;
    case cJSON_Array:
    case cJSON_Object: {
        int obj = (j->type & 0xff) == cJSON_Object;
        fmx__put(b, obj ? "o" : "a", 1);
        fmx__put_u32(b, (uint32_t)cJSON_GetArraySize(j));
        for (const cJSON *c = j->child; c; c = c->next) {
            if (obj) fmx__put_str(b, c->string);
            fmx__tree_put(b, c);
        }
        break;
    }
    default:
        fmx__put(b, "n", 1);
    }
}

typedef struct {
    const unsigned char *p;
    size_t n, at;
} fmx__rd;

static int fmx__get_u32(fmx__rd *r, uint32_t *v) {
    if (r->n - r->at < 4) return 0;
    const unsigned char *x = r->p + r->at;
    *v = (uint32_t)x[0] | (uint32_t)x[1] << 8 | (uint32_t)x[2] << 16 | (uint32_t)x[3] << 24;
    r->at += 4;
    return 1;
}

/* A string of the stream as a NUL-terminated copy; NULL when malformed (or
 * holding a NUL byte) or out of memory. */
static char *fmx__get_str(fmx__rd *r) {
    uint32_t n;
    if (!fmx__get_u32(r, &n) || r->n - r->at < n || memchr(r->p + r->at, 0, n)) return NULL;
    char *s = malloc((size_t)n + 1);
    if (!s) return NULL;
    memcpy(s, r->p + r->at, n);
    s[n] = 0;
    r->at += n;
    return s;
}

static cJSON *fmx__tree_get(fmx__rd *r, int depth) {
    if (depth > FMX__TREE_MAX_DEPTH || r->at >= r->n) return NULL;
    char t = (char)r->p[r->at++];
    switch (t) {
    case 'n':
        return cJSON_CreateNull();
    case 'f':
        return cJSON_CreateFalse();
    case 't':
        return cJSON_CreateTrue();
    case 'd': {
        uint32_t flags;
        double v;
        if (!fmx__get_u32(r, &flags) || r->n - r->at < 8) return NULL;
        memcpy(&v, r->p + r->at, 8);
        r->at += 8;
        cJSON *j = cJSON_CreateNumber(v);
        if (j) j->type |= (int)(flags & ~(0xffu | cJSON_IsReference | cJSON_StringIsConst));
        return j;
    }
    case 's': {
        char *s = fmx__get_str(r);
        cJSON *j = s ? cJSON_CreateString(s) : NULL;
        free(s);
        return j;
    }
    case 'a':
    case 'o': {
        uint32_t n;
        /* every entry takes at least one byte: a count can never outrun the data */
        if (!fmx__get_u32(r, &n) || n > r->n - r->at) return NULL;
        cJSON *j = t == 'o' ? cJSON_CreateObject() : cJSON_CreateArray();
        for (uint32_t i = 0; j && i < n; i++) {
            char *key = t == 'o' ? fmx__get_str(r) : NULL;
            cJSON *c = (t == 'a' || key) ? fmx__tree_get(r, depth + 1) : NULL;
            if (!c) {
                free(key);
                cJSON_Delete(j);
                return NULL;
            }
            if (key)
                cJSON_AddItemToObject(j, key, c);
            else
                cJSON_AddItemToArray(j, c);
            free(key);
        }
        return j;
    }
    default:
        return NULL;
    }
}

/* Encodes a message: length prefix, then the tree. Caller frees *out. */
int fmx_channel_encode(const cJSON *j, char **out, size_t *len) {
    fmx__buf b = {0};
    fmx__put_u32(&b, 0);
    fmx__tree_put(&b, j);
    if (b.oom || b.len - 4 > FMX_CHANNEL_MAX_MSG) {
        free(b.s);
        return FMX_ENOMEM;
    }
    uint32_t n = (uint32_t)(b.len - 4);
    unsigned char x[4] = {(unsigned char)n, (unsigned char)(n >> 8), (unsigned char)(n >> 16),
                          (unsigned char)(n >> 24)};
    memcpy(b.s, x, 4);
    *out = b.s;
    *len = b.len;
    return FMX_OK;
}

cJSON *fmx_channel_decode(const char *s, size_t n) {
    fmx__rd r = {(const unsigned char *)s, n, 0};
    cJSON *j = fmx__tree_get(&r, 0);
    if (j && r.at != n) {
        cJSON_Delete(j);
        return NULL;
    }
    return j;
}

/* Blocking write of a whole buffer (the worker's side). */
int fmx_channel_write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Blocking read of one message (the worker's side). Returns 1 with *out
 * (caller frees), 0 at end of stream, -1 on error. */
int fmx_channel_read_msg(int fd, char **out, size_t *len) {
    unsigned char h[4];
    size_t got = 0;
    while (got < 4) {
        ssize_t k = recv(fd, h + got, 4 - got, 0);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return got == 0 && k == 0 ? 0 : -1;
        got += (size_t)k;
    }
    uint32_t n = (uint32_t)h[0] | (uint32_t)h[1] << 8 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 24;
    if (n > FMX_CHANNEL_MAX_MSG) return -1;
    char *b = malloc((size_t)n + 1);
    if (!b) return -1;
    for (got = 0; got < n;) {
        ssize_t k = recv(fd, b + got, n - got, 0);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) {
            free(b);
            return -1;
        }
        got += (size_t)k;
    }
    *out = b;
    *len = n;
    return 1;
}
