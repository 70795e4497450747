/*
 * client.h — a small C client of the environment server (docs/protocol.md):
 * one ZeroMQ DEALER socket, one request at a time, msgpack on the wire and
 * cJSON in the caller's hands (env/proto.h converts both ways).
 *
 * Every request carries a `req` number and a reply is matched to it, so a
 * late reply to a request that timed out is recognised and dropped, never
 * taken for the answer to the next one.
 *
 * Errors: functions return 0 or a negative FMX_E… code, and the handle keeps
 * a short code and a message for the last failure:
 *   FMX_EINVAL  the server answered with an error: fmx_client_errcode is the
 *               protocol's code ("unknown_task", "episode_over", …) and
 *               fmx_client_errmsg the server's message (also for NULL args:
 *               code "bad_argument");
 *   FMX_EIO     no reply within the timeout (code "timeout") or the socket
 *               failed (code "transport");
 *   FMX_EFORMAT the reply could not be decoded (code "bad_reply");
 *   FMX_ENOMEM  out of memory (code "no_memory").
 *
 * A handle is used by one thread at a time. Not here: what a policy does
 * with the replies (policies/oracle.c, null.c, run.c).
 */
#ifndef FMX_CLIENT_H
#define FMX_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cJSON cJSON;
typedef struct fmx_client fmx_client;

/* Connects to addr (tcp://HOST:PORT, ipc://PATH). ZeroMQ connects in the
 * background: a server that is not up yet is waited for by the first
 * request. timeout_ms bounds each request's wait for its reply (< 0: wait
 * forever). On failure *out is NULL and err says why. Caller closes with
 * fmx_client_close. */
int fmx_client_open(const char *addr, int timeout_ms, fmx_client **out, char *err, size_t errsz);
/* Closes the socket (pending requests are dropped). Accepts NULL. */
void fmx_client_close(fmx_client *c);
void fmx_client_set_timeout(fmx_client *c, int timeout_ms);

/* The last failure: a short code ("" after a success) and a message.
 * Borrowed, valid until the next call on c. */
const char *fmx_client_errcode(const fmx_client *c);
const char *fmx_client_errmsg(const fmx_client *c);

/* Sends {"op": op, ...fields} (fields: an object or NULL, only read) and
 * waits for the reply. On success *reply is the whole reply map ("ok": true
 * included, "req" left out); caller frees it with cJSON_Delete. On failure
 * *reply is NULL. */
int fmx_client_call(fmx_client *c, const char *op, const cJSON *fields, cJSON **reply);

/* The ops. Each *out is the caller's, freed with cJSON_Delete. */
int fmx_client_hello(fmx_client *c, cJSON **reply);
int fmx_client_health(fmx_client *c, cJSON **reply);
/* *tasks: the array of {id, kind, pack, module, class, params, target_loc}. */
int fmx_client_list_tasks(fmx_client *c, cJSON **tasks);
/* task NULL: the server's next task; policy NULL: "anonymous". *episode gets
 * the new episode's id; *reply (may be NULL) the whole reply (observation,
 * info). */
int fmx_client_reset(fmx_client *c, const char *task, const char *policy, int64_t seed,
                     int64_t *episode, cJSON **reply);
/* One step: {"tool": tool, "args": args} (args an object or NULL, only
 * read). *reply holds observation, reward, terminated, truncated, info. */
int fmx_client_step(fmx_client *c, int64_t episode, const char *tool, const cJSON *args,
                    cJSON **reply);
/* Closes an episode (an open one is logged as aborted). */
int fmx_client_close_episode(fmx_client *c, int64_t episode);

#ifdef __cplusplus
}
#endif

#endif
