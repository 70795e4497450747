/*
 * client.c — the C client of client.h: request/reply over a DEALER socket
 * with req matching and a per-request timeout.
 */
#define _GNU_SOURCE
#include "client.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "env/proto.h"
#include "env/status.h"

struct fmx_client {
    void *zctx, *sock;
    int timeout_ms;
    uint64_t next_req;
    char addr[512];
    char code[32];
    char msg[1024];
};

static int fmx__fail(fmx_client *c, int status, const char *code, const char *fmt, ...) {
    snprintf(c->code, sizeof c->code, "%s", code);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->msg, sizeof c->msg, fmt, ap);
    va_end(ap);
    return status;
}

static double fmx__now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

int fmx_client_open(const char *addr, int timeout_ms, fmx_client **out, char *err, size_t errsz) {
    *out = NULL;
    if (!addr) {
        snprintf(err, errsz, "no server address");
        return FMX_EINVAL;
    }
    fmx_client *c = calloc(1, sizeof *c);
    if (!c) {
        snprintf(err, errsz, "out of memory");
        return FMX_ENOMEM;
    }
    snprintf(c->addr, sizeof c->addr, "%s", addr);
    c->timeout_ms = timeout_ms;
    c->zctx = zmq_ctx_new();
    c->sock = c->zctx ? zmq_socket(c->zctx, ZMQ_DEALER) : NULL;
    if (!c->sock) {
        snprintf(err, errsz, "zeromq: %s", zmq_strerror(errno));
        fmx_client_close(c);
        return FMX_EIO;
    }
    int linger = 0;
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_connect(c->sock, addr) != 0) {
        snprintf(err, errsz, "cannot connect to %s: %s", addr, zmq_strerror(errno));
        fmx_client_close(c);
        return FMX_EIO;
    }
    *out = c;
    return FMX_OK;
}

void fmx_client_close(fmx_client *c) {
    if (!c) return;
    if (c->sock) zmq_close(c->sock);
    if (c->zctx) zmq_ctx_term(c->zctx);
    free(c);
}

void fmx_client_set_timeout(fmx_client *c, int timeout_ms) {
    c->timeout_ms = timeout_ms;
}

const char *fmx_client_errcode(const fmx_client *c) {
    return c ? c->code : "bad_argument";
}

const char *fmx_client_errmsg(const fmx_client *c) {
    return c ? c->msg : "no client";
}

/* Waits for the reply to req; replies to other (timed-out) requests are
 * dropped. On success *reply is the decoded map. */
static int fmx__wait(fmx_client *c, uint64_t req, cJSON **reply) {
    double deadline = c->timeout_ms < 0 ? 0 : fmx__now_ms() + c->timeout_ms;
    for (;;) {
        long left = -1;
        if (c->timeout_ms >= 0) {
            left = (long)(deadline - fmx__now_ms());
            if (left < 0) left = 0;
        }
        zmq_pollitem_t item = {c->sock, 0, ZMQ_POLLIN, 0};
        int n = zmq_poll(&item, 1, left);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0)
            return fmx__fail(c, FMX_EIO, "transport", "poll on %s: %s", c->addr,
                             zmq_strerror(errno));
        if (n == 0)
            return fmx__fail(c, FMX_EIO, "timeout", "no reply from %s within %d ms", c->addr,
                             c->timeout_ms);
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, c->sock, 0) < 0) {
            zmq_msg_close(&m);
            if (errno == EINTR) continue;
            return fmx__fail(c, FMX_EIO, "transport", "receive from %s: %s", c->addr,
                             zmq_strerror(errno));
        }
        cJSON *body = NULL;
        uint64_t got = 0;
        int has_req = 0;
        char why[256];
        int rc = fmx_proto_decode(zmq_msg_data(&m), zmq_msg_size(&m), &body, &got, &has_req, why,
                                  sizeof why);
        zmq_msg_close(&m);
        if (rc == FMX_ENOMEM) return fmx__fail(c, FMX_ENOMEM, "no_memory", "out of memory");
        if (rc != FMX_OK)
            return fmx__fail(c, FMX_EFORMAT, "bad_reply", "undecodable reply from %s: %s", c->addr,
                             why);
        /* A reply without req answers a request the server could not decode:
         * with one request in flight, it is ours. */
        if (!has_req || got == req) {
            *reply = body;
            return FMX_OK;
        }
        cJSON_Delete(body); /* a late reply to a request that timed out */
    }
}

int fmx_client_call(fmx_client *c, const char *op, const cJSON *fields, cJSON **reply) {
    if (reply) *reply = NULL;
    if (!c) return FMX_EINVAL;
    c->code[0] = c->msg[0] = '\0';
    if (!op || !reply) return fmx__fail(c, FMX_EINVAL, "bad_argument", "no op or reply pointer");
    cJSON *body = cJSON_CreateObject();
    if (!body || !cJSON_AddStringToObject(body, "op", op)) {
        cJSON_Delete(body);
        return fmx__fail(c, FMX_ENOMEM, "no_memory", "out of memory");
    }
    /* The fields go in by reference: a request is only read while encoding. */
    for (const cJSON *f = fields ? fields->child : NULL; f; f = f->next)
        cJSON_AddItemReferenceToObject(body, f->string, (cJSON *)f);
    uint64_t req = ++c->next_req;
    char *data = NULL;
    size_t len = 0;
    int rc = fmx_proto_encode(body, &req, &data, &len);
    cJSON_Delete(body);
    if (rc != FMX_OK) return fmx__fail(c, FMX_ENOMEM, "no_memory", "out of memory");
    int sent;
    while ((sent = zmq_send(c->sock, data, len, 0)) < 0 && errno == EINTR) {
    }
    free(data);
    if (sent < 0)
        return fmx__fail(c, FMX_EIO, "transport", "send to %s: %s", c->addr, zmq_strerror(errno));
    cJSON *r = NULL;
    rc = fmx__wait(c, req, &r);
    if (rc != FMX_OK) return rc;
    if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "ok"))) {
        const cJSON *e = cJSON_GetObjectItemCaseSensitive(r, "error");
        const char *code = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "code"));
        const char *msg = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "message"));
        rc = fmx__fail(c, FMX_EINVAL, code ? code : "error", "%s", msg ? msg : "(no message)");
        cJSON_Delete(r);
        return rc;
    }
    *reply = r;
    return FMX_OK;
}

int fmx_client_hello(fmx_client *c, cJSON **reply) {
    return fmx_client_call(c, "hello", NULL, reply);
}

int fmx_client_health(fmx_client *c, cJSON **reply) {
    return fmx_client_call(c, "health", NULL, reply);
}

int fmx_client_list_tasks(fmx_client *c, cJSON **tasks) {
    if (tasks) *tasks = NULL;
    cJSON *r = NULL;
    int rc = fmx_client_call(c, "list_tasks", NULL, &r);
    if (rc != FMX_OK) return rc;
    cJSON *t = cJSON_DetachItemFromObjectCaseSensitive(r, "tasks");
    cJSON_Delete(r);
    if (!cJSON_IsArray(t)) {
        cJSON_Delete(t);
        return fmx__fail(c, FMX_EFORMAT, "bad_reply", "list_tasks reply without a 'tasks' list");
    }
    *tasks = t;
    return FMX_OK;
}

int fmx_client_reset(fmx_client *c, const char *task, const char *policy, int64_t seed,
                     int64_t *episode, cJSON **reply) {
    if (reply) *reply = NULL;
    if (!c) return FMX_EINVAL;
    cJSON *f = cJSON_CreateObject();
    if (f && task) cJSON_AddStringToObject(f, "task", task);
    if (f && policy) cJSON_AddStringToObject(f, "policy", policy);
    if (f) cJSON_AddNumberToObject(f, "seed", (double)seed);
    if (!f) return fmx__fail(c, FMX_ENOMEM, "no_memory", "out of memory");
    cJSON *r = NULL;
    int rc = fmx_client_call(c, "reset", f, &r);
    cJSON_Delete(f);
    if (rc != FMX_OK) return rc;
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(r, "episode");
    if (!cJSON_IsNumber(id)) {
        cJSON_Delete(r);
        return fmx__fail(c, FMX_EFORMAT, "bad_reply", "reset reply without an 'episode' id");
    }
    if (episode) *episode = (int64_t)id->valuedouble;
    if (reply)
        *reply = r;
    else
        cJSON_Delete(r);
    return FMX_OK;
}

int fmx_client_step(fmx_client *c, int64_t episode, const char *tool, const cJSON *args,
                    cJSON **reply) {
    if (reply) *reply = NULL;
    if (!c) return FMX_EINVAL;
    if (!tool) return fmx__fail(c, FMX_EINVAL, "bad_argument", "step without a tool");
    cJSON *f = cJSON_CreateObject();
    cJSON *action = f ? cJSON_AddObjectToObject(f, "action") : NULL;
    if (action) {
        cJSON_AddNumberToObject(f, "episode", (double)episode);
        cJSON_AddStringToObject(action, "tool", tool);
        if (args)
            cJSON_AddItemReferenceToObject(action, "args", (cJSON *)args);
        else
            cJSON_AddObjectToObject(action, "args");
    }
    if (!action) {
        cJSON_Delete(f);
        return fmx__fail(c, FMX_ENOMEM, "no_memory", "out of memory");
    }
    int rc = fmx_client_call(c, "step", f, reply);
    cJSON_Delete(f);
    return rc;
}

int fmx_client_close_episode(fmx_client *c, int64_t episode) {
    if (!c) return FMX_EINVAL;
    cJSON *f = cJSON_CreateObject();
    if (!f || !cJSON_AddNumberToObject(f, "episode", (double)episode)) {
        cJSON_Delete(f);
        return fmx__fail(c, FMX_ENOMEM, "no_memory", "out of memory");
    }
    cJSON *r = NULL;
    int rc = fmx_client_call(c, "close", f, &r);
    cJSON_Delete(f);
    cJSON_Delete(r);
    return rc;
}
