/*
 * llm.c — the `llm` policy of llm.h: an OpenAI-compatible chat endpoint
 * (libcurl, JSON with cJSON) plays an episode through the C client.
 *
 * One episode is one conversation: system prompt + goal, then turns of
 * "POST the conversation, run the reply's tool calls as steps, append the
 * results as tool messages". Not here: streaming, parallel requests, any
 * provider-specific API beyond /chat/completions.
 */
#define _GNU_SOURCE
#include "llm.h"

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "env/status.h"
#include "env/tools.h"

#define FMX__REPLY_CAP (32 << 20) /* bytes of one HTTP reply */
#define FMX__BACKOFF_CAP_MS 30000
#define FMX__RETRY_AFTER_CAP_S 60

static const char fmx__nudge[] =
    "You answered without a tool call. Call verify_component to check your code or submit to "
    "finish the task (or answer with the final file in one ```python block, which will be "
    "submitted).";

/* ---- configuration (one per process, set before episodes start) ---- */

static fmx_llm_config fmx__cfg;
static char *fmx__cfg_strings[4];
static int fmx__configured;

fmx_llm_config fmx_llm_config_default(void) {
    return (fmx_llm_config){.base_url = NULL,
                            .model = NULL,
                            .api_key_env = "OPENAI_API_KEY",
                            .max_tokens = 4096,
                            .token_budget = 200000,
                            .temperature = -1,
                            .timeout_s = 300,
                            .retries = 4,
                            .backoff_ms = 1000,
                            .transcripts_dir = NULL};
}

int fmx_llm_configure(const fmx_llm_config *cfg, char *err, size_t errsz) {
    if (!cfg || !cfg->base_url || !*cfg->base_url) {
        snprintf(err, errsz,
                 "the llm policy needs --base-url (an OpenAI-compatible endpoint, "
                 "e.g. http://127.0.0.1:8000/v1)");
        return FMX_EINVAL;
    }
    if (!cfg->model || !*cfg->model) {
        snprintf(err, errsz, "the llm policy needs --model NAME");
        return FMX_EINVAL;
    }
    if (strncmp(cfg->base_url, "http://", 7) != 0 && strncmp(cfg->base_url, "https://", 8) != 0) {
        snprintf(err, errsz, "--base-url %s: not an http:// or https:// URL", cfg->base_url);
        return FMX_EINVAL;
    }
    for (int i = 0; i < 4; i++) {
        free(fmx__cfg_strings[i]);
        fmx__cfg_strings[i] = NULL;
    }
    fmx__cfg = *cfg;
    const char *src[4] = {cfg->base_url, cfg->model,
                          cfg->api_key_env ? cfg->api_key_env : "OPENAI_API_KEY",
                          cfg->transcripts_dir};
    for (int i = 0; i < 4; i++)
        if (src[i] && !(fmx__cfg_strings[i] = strdup(src[i]))) {
            snprintf(err, errsz, "out of memory");
            return FMX_ENOMEM;
        }
    /* base_url without trailing slashes */
    for (size_t n = strlen(fmx__cfg_strings[0]); n > 8 && fmx__cfg_strings[0][n - 1] == '/';)
        fmx__cfg_strings[0][--n] = '\0';
    fmx__cfg.base_url = fmx__cfg_strings[0];
    fmx__cfg.model = fmx__cfg_strings[1];
    fmx__cfg.api_key_env = fmx__cfg_strings[2];
    fmx__cfg.transcripts_dir = fmx__cfg_strings[3];
    if (fmx__cfg.retries < 0) fmx__cfg.retries = 0;
    if (fmx__cfg.timeout_s < 1) fmx__cfg.timeout_s = 1;
    fmx__configured = 1;
    return FMX_OK;
}

static pthread_once_t fmx__curl_once = PTHREAD_ONCE_INIT;
static int fmx__curl_ok;

static void fmx__curl_init(void) {
    fmx__curl_ok = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
}

/* ---- small helpers ---- */

static double fmx__now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void fmx__sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static const char *fmx__str(const cJSON *obj, const char *key) {
    return cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(obj, key));
}

static double fmx__num(const cJSON *obj, const char *key, double dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsNumber(v) ? v->valuedouble : dflt;
}

/* mkdir -p; 0 on success. */
static int fmx__mkdirs(const char *dir) {
    char p[4096];
    snprintf(p, sizeof p, "%s", dir);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = '\0';
        if (mkdir(p, 0755) != 0 && errno != EEXIST) return -1;
        *s = '/';
    }
    return mkdir(p, 0755) != 0 && errno != EEXIST ? -1 : 0;
}

/* ---- one chat completion over HTTP ---- */

typedef struct {
    char *data;
    size_t len, cap;
    int overflow;
} fmx__buf;

static size_t fmx__on_body(char *ptr, size_t size, size_t nmemb, void *ud) {
    fmx__buf *b = ud;
    size_t n = size * nmemb;
    if (b->len + n + 1 > FMX__REPLY_CAP) {
        b->overflow = 1;
        return 0; /* aborts the transfer */
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 16384;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *g = realloc(b->data, cap);
        if (!g) return 0;
        b->data = g;
        b->cap = cap;
    }
    memcpy(b->data + b->len, ptr, n);
    b->len += n;
    b->data[b->len] = '\0';
    return n;
}

/* The error text of an endpoint's reply body: error.message, error (a
 * string), message, or the first bytes of the body. */
static void fmx__body_error(const char *body, char *out, size_t outsz) {
    cJSON *j = body ? cJSON_Parse(body) : NULL;
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
    const char *m = fmx__str(e, "message");
    if (!m) m = cJSON_GetStringValue(e);
    if (!m) m = fmx__str(j, "message");
    if (!m) m = fmx__str(j, "detail");
    if (m)
        snprintf(out, outsz, "%s", m);
    else
        snprintf(out, outsz, "%.300s", body && *body ? body : "(empty body)");
    cJSON_Delete(j);
}

/* Per-request statistics for the transcript. */
typedef struct {
    int attempts;
    double ms;
} fmx__http_stats;

/* POSTs body to URL/chat/completions; on success *reply is the parsed
 * reply (caller's). Retries 429, 5xx and transport errors; other statuses
 * and unreadable replies fail at once. err says why, endpoint included. */
static int fmx__post(CURL *h, const char *body, cJSON **reply, fmx__http_stats *st, char *err,
                     size_t errsz) {
    *reply = NULL;
    char url[4096];
    snprintf(url, sizeof url, "%s/chat/completions", fmx__cfg.base_url);
    struct curl_slist *hdr = curl_slist_append(NULL, "Content-Type: application/json");
    const char *key = getenv(fmx__cfg.api_key_env);
    char auth[8192];
    if (key && *key) {
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", key);
        hdr = curl_slist_append(hdr, auth);
    }
    if (!hdr) {
        snprintf(err, errsz, "out of memory");
        return FMX_ENOMEM;
    }
    char curl_err[CURL_ERROR_SIZE];
    curl_easy_reset(h);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_POST, 1L);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(body));
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdr);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT, (long)fmx__cfg.timeout_s);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT,
                     (long)(fmx__cfg.timeout_s < 30 ? fmx__cfg.timeout_s : 30));
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, curl_err);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, fmx__on_body);
    curl_easy_setopt(h, CURLOPT_ACCEPT_ENCODING, ""); /* whatever libcurl decodes */
    curl_easy_setopt(h, CURLOPT_USERAGENT, "fmx-llm-policy/" FMX_VERSION);
#if LIBCURL_VERSION_NUM >= 0x075500
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
#else
    curl_easy_setopt(h, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif

    int rc = FMX_EIO;
    double t0 = fmx__now_s();
    long wait_ms = fmx__cfg.backoff_ms > 0 ? fmx__cfg.backoff_ms : 1;
    for (int attempt = 0;; attempt++) {
        fmx__buf b = {0};
        curl_err[0] = '\0';
        curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
        st->attempts = attempt + 1;
        CURLcode cc = curl_easy_perform(h);
        long code = 0;
        int retryable = 0;
        curl_off_t retry_after = 0;
        if (cc != CURLE_OK) {
            rc = FMX_EIO;
            retryable = !b.overflow;
            if (b.overflow)
                snprintf(err, errsz, "%s answered more than 32 MiB", url);
            else
                snprintf(err, errsz, "cannot reach %s: %s", url,
                         curl_err[0] ? curl_err : curl_easy_strerror(cc));
        } else {
            curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
            if (code >= 200 && code < 300) {
                cJSON *j = b.data ? cJSON_Parse(b.data) : NULL;
                cJSON *choices = cJSON_GetObjectItemCaseSensitive(j, "choices");
                if (cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(choices, 0),
                                                                    "message"))) {
                    *reply = j;
                    rc = FMX_OK;
                } else {
                    snprintf(err, errsz, "%s answered HTTP %ld without choices[0].message: %.300s",
                             url, code, b.data ? b.data : "(empty body)");
                    cJSON_Delete(j);
                    rc = FMX_EFORMAT;
                }
                free(b.data);
                break;
            }
            char why[512];
            fmx__body_error(b.data, why, sizeof why);
            retryable = code == 429 || code >= 500;
            snprintf(err, errsz, "%s answered HTTP %ld: %s%s%s%s", url, code, why,
                     code == 401 || code == 403 ? " (is $" : "",
                     code == 401 || code == 403 ? fmx__cfg.api_key_env : "",
                     code == 401 || code == 403 ? " the endpoint's key?)" : "");
            rc = code == 429 || code >= 500 ? FMX_EIO : FMX_EINVAL;
#if LIBCURL_VERSION_NUM >= 0x074200
            curl_easy_getinfo(h, CURLINFO_RETRY_AFTER, &retry_after);
#endif
        }
        free(b.data);
        if (!retryable || attempt >= fmx__cfg.retries) {
            if (retryable && attempt > 0) {
                size_t n = strlen(err);
                snprintf(err + n, errsz > n ? errsz - n : 0, " (after %d tries)", attempt + 1);
            }
            break;
        }
        long ms = wait_ms;
        if (retry_after > 0)
            ms = (long)(retry_after > FMX__RETRY_AFTER_CAP_S ? FMX__RETRY_AFTER_CAP_S
                                                             : retry_after) *
                 1000;
        fmx__sleep_ms(ms);
        wait_ms = wait_ms * 2 > FMX__BACKOFF_CAP_MS ? FMX__BACKOFF_CAP_MS : wait_ms * 2;
    }
    st->ms = (fmx__now_s() - t0) * 1e3;
    curl_slist_free_all(hdr);
    return rc;
}

/* ---- the episode ---- */

/* Everything one episode holds. */
typedef struct {
    fmx_client *c;
    int64_t ep;
    const char *module; /* the task's module path */
    cJSON *tools;       /* the spec's tool schemas, sent as they are */
    cJSON *messages;    /* the conversation */
    cJSON *turns;       /* transcript: one record per model reply */
    fmx_episode_result *res;
    int ended;  /* the server ended the episode */
    int closed; /* we closed it (aborted) */
    /* tokens */
    int64_t used, prompt, completion, estimated;
    int requests, retries;
    /* the last verify_component code for the task's module: matched / compiled */
    char *match_code, *match_entry, *compiled_code, *compiled_entry;
    char *last_verify_entry;
} fmx__episode;

static int fmx__known_tool(const fmx__episode *e, const char *name) {
    for (const cJSON *t = e->tools ? e->tools->child : NULL; t; t = t->next) {
        const char *n = fmx__str(cJSON_GetObjectItemCaseSensitive(t, "function"), "name");
        if (n && strcmp(n, name) == 0) return 1;
    }
    return 0;
}

static void fmx__tool_names(const fmx__episode *e, char *out, size_t outsz) {
    size_t n = 0;
    out[0] = '\0';
    for (const cJSON *t = e->tools ? e->tools->child : NULL; t && n < outsz; t = t->next) {
        const char *name = fmx__str(cJSON_GetObjectItemCaseSensitive(t, "function"), "name");
        if (name) n += (size_t)snprintf(out + n, outsz - n, "%s%s", n ? ", " : "", name);
    }
}

static void fmx__set(char **dst, const char *src) {
    free(*dst);
    *dst = src ? strdup(src) : NULL;
}

/* Remembers verify_component code that compiled for the task's module. */
static void fmx__note_verify(fmx__episode *e, const cJSON *args, const cJSON *obs) {
    const char *path = fmx__str(args, "path");
    const char *code = fmx__str(args, "code");
    const char *entry = fmx__str(args, "entry");
    if (!entry) entry = "forward";
    fmx__set(&e->last_verify_entry, entry);
    if (!code || (path && strcmp(path, e->module) != 0) || fmx__str(obs, "error")) return;
    const cJSON *data = cJSON_GetObjectItemCaseSensitive(obs, "data");
    const char *status = fmx__str(data, "status");
    const char *stage = fmx__str(cJSON_GetObjectItemCaseSensitive(data, "error"), "stage");
    if (!status) return;
    if (strcmp(status, "match") == 0) {
        fmx__set(&e->match_code, code);
        fmx__set(&e->match_entry, entry);
    }
    if (strcmp(status, "error") != 0 || (stage && strcmp(stage, "compile") != 0)) {
        fmx__set(&e->compiled_code, code);
        fmx__set(&e->compiled_entry, entry);
    }
}

/* One step. *obs_text gets the observation text (caller frees) and *step
 * the log's step index. Returns 0 when the episode goes on, 1 when the
 * server ended it, or a negative code (err set). */
static int fmx__step(fmx__episode *e, const char *tool, const cJSON *args, char **obs_text,
                     int *step, char *err, size_t errsz) {
    *obs_text = NULL;
    *step = -1;
    cJSON *r = NULL;
    int rc = fmx_client_step(e->c, e->ep, tool, args, &r);
    if (rc != FMX_OK) {
        snprintf(err, errsz, "step %s: %s: %s", tool, fmx_client_errcode(e->c),
                 fmx_client_errmsg(e->c));
        return rc;
    }
    fmx_episode_result *res = e->res;
    const cJSON *obs = cJSON_GetObjectItemCaseSensitive(r, "observation");
    const cJSON *info = cJSON_GetObjectItemCaseSensitive(r, "info");
    res->terminated = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "terminated"));
    res->truncated = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "truncated"));
    res->reward = fmx__num(r, "reward", res->reward);
    res->steps = (int)fmx__num(info, "step", res->steps + 1);
    *step = res->steps - 1;
    const cJSON *grade = cJSON_GetObjectItemCaseSensitive(info, "grade");
    res->correctness = fmx__num(grade, "correctness", res->correctness);
    if (strcmp(tool, "verify_component") == 0) fmx__note_verify(e, args, obs);
    const char *text = fmx__str(obs, "text");
    *obs_text = strdup(text ? text : "(no observation text)");
    cJSON_Delete(r);
    if (!*obs_text) {
        snprintf(err, errsz, "out of memory");
        return FMX_ENOMEM;
    }
    e->ended = res->terminated || res->truncated;
    return e->ended;
}

static void fmx__add_message(fmx__episode *e, const char *role, const char *content) {
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "role", role);
    cJSON_AddStringToObject(m, "content", content);
    cJSON_AddItemToArray(e->messages, m);
}

static void fmx__add_tool_message(fmx__episode *e, const char *id, const char *content) {
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "role", "tool");
    cJSON_AddStringToObject(m, "tool_call_id", id);
    cJSON_AddStringToObject(m, "content", content);
    cJSON_AddItemToArray(e->messages, m);
}

/* The request body for the conversation so far. Caller frees. */
static char *fmx__request_body(fmx__episode *e) {
    cJSON *b = cJSON_CreateObject();
    if (!b) return NULL;
    cJSON_AddStringToObject(b, "model", fmx__cfg.model);
    cJSON_AddItemReferenceToObject(b, "messages", e->messages);
    cJSON_AddItemReferenceToObject(b, "tools", e->tools);
    cJSON_AddStringToObject(b, "tool_choice", "auto");
    if (fmx__cfg.max_tokens > 0) cJSON_AddNumberToObject(b, "max_tokens", fmx__cfg.max_tokens);
    if (fmx__cfg.temperature >= 0) cJSON_AddNumberToObject(b, "temperature", fmx__cfg.temperature);
    char *s = cJSON_PrintUnformatted(b);
    cJSON_Delete(b);
    return s;
}

/* One model turn: POSTs the conversation. On success *msg is the reply's
 * message (caller's) and the turn's usage is counted and recorded. */
static int fmx__ask(fmx__episode *e, CURL *h, cJSON **msg, cJSON *turn, char *err, size_t errsz) {
    *msg = NULL;
    char *body = fmx__request_body(e);
    if (!body) {
        snprintf(err, errsz, "out of memory");
        return FMX_ENOMEM;
    }
    cJSON *reply = NULL;
    fmx__http_stats st = {0};
    int rc = fmx__post(h, body, &reply, &st, err, errsz);
    e->requests++;
    e->retries += st.attempts > 0 ? st.attempts - 1 : 0;
    cJSON_AddNumberToObject(turn, "ms", st.ms);
    cJSON_AddNumberToObject(turn, "attempts", st.attempts);
    if (rc != FMX_OK) {
        free(body);
        return rc;
    }
    cJSON *choice = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(reply, "choices"), 0);
    *msg = cJSON_DetachItemFromObjectCaseSensitive(choice, "message");
    const char *finish = fmx__str(choice, "finish_reason");
    if (finish) cJSON_AddStringToObject(turn, "finish_reason", finish);
    /* usage, or an estimate: 4 bytes a token */
    const cJSON *usage = cJSON_GetObjectItemCaseSensitive(reply, "usage");
    double total = fmx__num(usage, "total_tokens", -1);
    cJSON *u = cJSON_AddObjectToObject(turn, "usage");
    if (total >= 0) {
        double p = fmx__num(usage, "prompt_tokens", 0), c = fmx__num(usage, "completion_tokens", 0);
        e->prompt += (int64_t)p;
        e->completion += (int64_t)c;
        cJSON_AddNumberToObject(u, "prompt_tokens", p);
        cJSON_AddNumberToObject(u, "completion_tokens", c);
        cJSON_AddNumberToObject(u, "total_tokens", total);
    } else {
        char *out = cJSON_PrintUnformatted(*msg);
        total = (double)((strlen(body) + (out ? strlen(out) : 0)) / 4 + 1);
        free(out);
        e->estimated += (int64_t)total;
        cJSON_AddNumberToObject(u, "total_tokens", total);
        cJSON_AddBoolToObject(u, "estimated", 1);
    }
    e->used += (int64_t)total;
    cJSON_Delete(reply);
    free(body);
    return FMX_OK;
}

/* The assistant message as it goes back into the conversation: role,
 * content and the tool calls normalised (every call has an id, a type and
 * string arguments); other fields of the reply are left out. */
static cJSON *fmx__assistant(const cJSON *msg, int turn) {
    cJSON *a = cJSON_CreateObject();
    cJSON_AddStringToObject(a, "role", "assistant");
    const char *content = fmx__str(msg, "content");
    if (content)
        cJSON_AddStringToObject(a, "content", content);
    else
        cJSON_AddNullToObject(a, "content");
    const cJSON *calls = cJSON_GetObjectItemCaseSensitive(msg, "tool_calls");
    if (!cJSON_IsArray(calls) || cJSON_GetArraySize(calls) == 0) return a;
    cJSON *out = cJSON_AddArrayToObject(a, "tool_calls");
    int i = 0;
    for (const cJSON *tc = calls->child; tc; tc = tc->next, i++) {
        cJSON *o = cJSON_CreateObject();
        const char *id = fmx__str(tc, "id");
        char gen[64];
        if (!id || !*id) {
            snprintf(gen, sizeof gen, "call_fmx_%d_%d", turn, i);
            id = gen;
        }
        cJSON_AddStringToObject(o, "id", id);
        cJSON_AddStringToObject(o, "type", "function");
        const cJSON *fn = cJSON_GetObjectItemCaseSensitive(tc, "function");
        cJSON *f = cJSON_AddObjectToObject(o, "function");
        const char *name = fmx__str(fn, "name");
        cJSON_AddStringToObject(f, "name", name ? name : "");
        const cJSON *args = cJSON_GetObjectItemCaseSensitive(fn, "arguments");
        if (cJSON_IsString(args)) {
            cJSON_AddStringToObject(f, "arguments", args->valuestring);
        } else if (args && !cJSON_IsNull(args)) {
            char *s = cJSON_PrintUnformatted(args);
            cJSON_AddStringToObject(f, "arguments", s ? s : "");
            free(s);
        } else {
            cJSON_AddStringToObject(f, "arguments", "");
        }
        cJSON_AddItemToArray(out, o);
    }
    return a;
}

/* The action of a normalised tool call, or NULL with why in `why`. */
static cJSON *fmx__action_args(const fmx__episode *e, const cJSON *call, char *why, size_t whysz) {
    const cJSON *fn = cJSON_GetObjectItemCaseSensitive(call, "function");
    const char *name = fmx__str(fn, "name");
    const char *text = fmx__str(fn, "arguments");
    char names[512];
    if (!name || !*name) {
        fmx__tool_names(e, names, sizeof names);
        snprintf(why, whysz,
                 "error (bad_tool_call): a tool call without a function name; tools: %s", names);
        return NULL;
    }
    if (!fmx__known_tool(e, name)) {
        fmx__tool_names(e, names, sizeof names);
        snprintf(why, whysz, "error (unknown_tool): there is no tool '%.100s'; tools: %s", name,
                 names);
        return NULL;
    }
    const char *p = text ? text : "";
    while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')
        p++;
    if (!*p) return cJSON_CreateObject(); /* no arguments */
    /* cJSON_GetErrorPtr is one global for every thread: take the end instead */
    const char *at = NULL;
    cJSON *args = cJSON_ParseWithOpts(p, &at, 0);
    if (!cJSON_IsObject(args)) {
        char where[96] = "";
        if (!args && at)
            snprintf(where, sizeof where, " (invalid JSON at character %ld: '%.24s')",
                     (long)(at - text), at);
        snprintf(why, whysz,
                 "error (bad_arguments): the arguments of %s are not a JSON object%s; call it "
                 "again with arguments as in its parameters schema",
                 name, where);
        cJSON_Delete(args);
        return NULL;
    }
    return args;
}

/* Name of the function to submit from code found in text: the entry last
 * verified when the code defines it, else forward when it does, else the
 * last top-level def. Borrowed / static; never NULL. */
static const char *fmx__guess_entry(const fmx__episode *e, const char *code, char *buf,
                                    size_t bufsz) {
    char pat[160];
    if (e->last_verify_entry) {
        snprintf(pat, sizeof pat, "def %s(", e->last_verify_entry);
        if (strstr(code, pat)) return e->last_verify_entry;
    }
    if (strstr(code, "def forward(")) return "forward";
    const char *last = NULL;
    for (const char *p = code; (p = strstr(p, "def ")); p += 4)
        if (p == code || p[-1] == '\n') last = p + 4;
    if (!last) return "forward";
    size_t n = 0;
    while (last[n] && last[n] != '(' && last[n] != ' ' && n + 1 < bufsz)
        n++;
    memcpy(buf, last, n);
    buf[n] = '\0';
    return n ? buf : "forward";
}

/* Submits code (entry) as the last step. 0 / a negative code. */
static int fmx__submit(fmx__episode *e, const char *code, const char *entry, const char *id,
                       cJSON *turn_calls, char *err, size_t errsz) {
    cJSON *args = cJSON_CreateObject();
    cJSON_AddStringToObject(args, "code", code);
    cJSON_AddStringToObject(args, "entry", entry);
    char *text = NULL;
    int step = -1;
    int rc = fmx__step(e, "submit", args, &text, &step, err, errsz);
    cJSON_Delete(args);
    if (turn_calls) {
        cJSON *rec = cJSON_CreateObject();
        cJSON_AddStringToObject(rec, "id", id);
        cJSON_AddStringToObject(rec, "name", "submit");
        cJSON_AddNumberToObject(rec, "step", step);
        cJSON_AddStringToObject(rec, "by", "policy");
        cJSON_AddItemToArray(turn_calls, rec);
    }
    free(text);
    return rc < 0 ? rc : FMX_OK;
}

/* Giving up: submits the last matched (else compiled) verified code, or
 * closes the episode (aborted). Returns the stop reason's suffix. */
static const char *fmx__give_up(fmx__episode *e, cJSON *policy_calls, char *err, size_t errsz,
                                int *rc) {
    const char *code = e->match_code ? e->match_code : e->compiled_code;
    const char *entry = e->match_code ? e->match_entry : e->compiled_entry;
    if (code) {
        *rc = fmx__submit(e, code, entry, "", policy_calls, err, errsz);
        return e->match_code ? "submitted the last matching verified code"
                             : "submitted the last compiled verified code";
    }
    *rc = FMX_OK;
    fmx_client_close_episode(e->c, e->ep);
    e->closed = 1;
    return "no verified code: episode closed (aborted)";
}

/* Writes the episode's transcript to DIR/episode-ID.json (tmp + rename). */
static void fmx__write_transcript(const fmx__episode *e, const char *task_id, const char *policy,
                                  int64_t seed, double t0, const char *stop, const char *error) {
    if (!fmx__cfg.transcripts_dir || e->ep <= 0) return;
    if (fmx__mkdirs(fmx__cfg.transcripts_dir) != 0) {
        fprintf(stderr, "fmx run: llm: cannot make %s: %s\n", fmx__cfg.transcripts_dir,
                strerror(errno));
        return;
    }
    cJSON *t = cJSON_CreateObject();
    cJSON_AddNumberToObject(t, "episode", (double)e->ep);
    cJSON_AddStringToObject(t, "task", task_id);
    cJSON_AddStringToObject(t, "policy", policy);
    cJSON_AddStringToObject(t, "model", fmx__cfg.model);
    cJSON_AddStringToObject(t, "base_url", fmx__cfg.base_url);
    cJSON_AddNumberToObject(t, "seed", (double)seed);
    cJSON_AddNumberToObject(t, "started_at", t0);
    cJSON_AddNumberToObject(t, "ended_at", fmx__now_s());
    cJSON_AddStringToObject(t, "status",
                            e->res->terminated  ? "submitted"
                            : e->res->truncated ? "truncated"
                            : e->closed         ? "aborted"
                                                : "open");
    cJSON_AddStringToObject(t, "stop", stop ? stop : "");
    if (error)
        cJSON_AddStringToObject(t, "error", error);
    else
        cJSON_AddNullToObject(t, "error");
    cJSON_AddNumberToObject(t, "reward", e->res->reward);
    if (e->res->correctness >= 0)
        cJSON_AddNumberToObject(t, "correctness", e->res->correctness);
    else
        cJSON_AddNullToObject(t, "correctness");
    cJSON_AddNumberToObject(t, "steps", e->res->steps);
    cJSON *u = cJSON_AddObjectToObject(t, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", (double)e->prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", (double)e->completion);
    cJSON_AddNumberToObject(u, "total_tokens", (double)e->used);
    cJSON_AddNumberToObject(u, "estimated_tokens", (double)e->estimated);
    cJSON_AddNumberToObject(u, "token_budget", (double)fmx__cfg.token_budget);
    cJSON_AddNumberToObject(u, "requests", e->requests);
    cJSON_AddNumberToObject(u, "retries", e->retries);
    cJSON_AddItemReferenceToObject(t, "turns", e->turns);
    cJSON_AddItemReferenceToObject(t, "messages", e->messages);
    char *s = cJSON_Print(t);
    cJSON_Delete(t);
    char path[4200], tmp[4300];
    snprintf(path, sizeof path, "%s/episode-%lld.json", fmx__cfg.transcripts_dir, (long long)e->ep);
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = s ? fopen(tmp, "w") : NULL;
    int ok = f && fputs(s, f) >= 0 && fputc('\n', f) != EOF;
    if (f && fclose(f) != 0) ok = 0;
    if (!ok || rename(tmp, path) != 0) {
        fprintf(stderr, "fmx run: llm: cannot write %s: %s\n", path, strerror(errno));
        unlink(tmp);
    }
    free(s);
}

/* The turns: returns FMX_OK when the episode ended (by the server or by
 * giving up), else a negative code with err set (the episode still open). */
static int fmx__converse(fmx__episode *e, CURL *h, int max_turns, const char **stop, char *err,
                         size_t errsz) {
    int nudged = 0;
    for (int turn = 0;; turn++) {
        if (fmx__cfg.token_budget > 0 && e->used >= fmx__cfg.token_budget) {
            *stop = "token budget spent";
            break;
        }
        if (turn >= max_turns) {
            *stop = "turn limit";
            break;
        }
        cJSON *rec = cJSON_CreateObject();
        cJSON_AddItemToArray(e->turns, rec);
        cJSON_AddNumberToObject(rec, "turn", turn);
        cJSON *msg = NULL;
        int rc = fmx__ask(e, h, &msg, rec, err, errsz);
        if (rc != FMX_OK) {
            cJSON_AddStringToObject(rec, "error", err);
            *stop = "endpoint error";
            return rc;
        }
        cJSON *a = fmx__assistant(msg, turn);
        cJSON_Delete(msg);
        cJSON_AddItemToArray(e->messages, a);
        const char *text = fmx__str(a, "content");
        if (text)
            cJSON_AddStringToObject(rec, "text", text);
        else
            cJSON_AddNullToObject(rec, "text");
        cJSON *calls_rec = cJSON_AddArrayToObject(rec, "tool_calls");
        const cJSON *calls = cJSON_GetObjectItemCaseSensitive(a, "tool_calls");

        if (!calls) { /* no tool call: code in the text, a nudge, or the end */
            char *code = text ? fmx_llm_code_block(text) : NULL;
            if (code) {
                char buf[128];
                const char *entry = fmx__guess_entry(e, code, buf, sizeof buf);
                rc = fmx__submit(e, code, entry, "", calls_rec, err, errsz);
                free(code);
                *stop = "answer without tool calls: submitted its ```python block";
                return rc;
            }
            if (!nudged) {
                nudged = 1;
                fmx__add_message(e, "user", fmx__nudge);
                cJSON_AddStringToObject(rec, "policy", "nudged");
                continue;
            }
            *stop = "answer without tool calls after a nudge";
            break;
        }
        nudged = 0;
        for (const cJSON *tc = calls->child; tc; tc = tc->next) {
            const char *id = fmx__str(tc, "id");
            const char *name = fmx__str(cJSON_GetObjectItemCaseSensitive(tc, "function"), "name");
            cJSON *crec = cJSON_CreateObject();
            cJSON_AddItemToArray(calls_rec, crec);
            cJSON_AddStringToObject(crec, "id", id);
            cJSON_AddStringToObject(crec, "name", name ? name : "");
            if (e->ended) { /* an earlier call of this reply ended the episode */
                fmx__add_tool_message(e, id, "not run: the episode is over");
                cJSON_AddNullToObject(crec, "step");
                continue;
            }
            char why[1024];
            cJSON *args = fmx__action_args(e, tc, why, sizeof why);
            if (!args) {
                fmx__add_tool_message(e, id, why);
                cJSON_AddNullToObject(crec, "step");
                cJSON_AddStringToObject(crec, "error", why);
                continue;
            }
            char *obs = NULL;
            int step = -1;
            rc = fmx__step(e, name, args, &obs, &step, err, errsz);
            cJSON_Delete(args);
            if (rc < 0) {
                *stop = "server error";
                return rc;
            }
            cJSON_AddNumberToObject(crec, "step", step);
            fmx__add_tool_message(e, id, obs);
            free(obs);
        }
        if (e->ended) {
            *stop = e->res->terminated ? "submitted" : "step budget spent (truncated)";
            return FMX_OK;
        }
    }
    /* the policy gives up */
    cJSON *rec = cJSON_CreateObject();
    cJSON_AddItemToArray(e->turns, rec);
    cJSON *calls_rec = cJSON_AddArrayToObject(rec, "tool_calls");
    int rc;
    const char *how = fmx__give_up(e, calls_rec, err, errsz, &rc);
    cJSON_AddStringToObject(rec, "policy", how);
    return rc;
}

int fmx_policy_llm(fmx_client *c, const char *name, const cJSON *task, int64_t seed,
                   const fmx_policy_ctx *ctx, fmx_episode_result *res, char *err, size_t errsz) {
    (void)ctx;
    const char *id = fmx_policy_begin(task, res, err, errsz);
    const char *module = fmx__str(task, "module");
    if (!id || !module) {
        snprintf(err, errsz, "a task without id or module");
        return FMX_EINVAL;
    }
    if (!fmx__configured) {
        snprintf(err, errsz, "the llm policy is not configured (--base-url, --model)");
        return FMX_EINVAL;
    }
    pthread_once(&fmx__curl_once, fmx__curl_init);
    CURL *h = fmx__curl_ok ? curl_easy_init() : NULL;
    if (!h) {
        snprintf(err, errsz, "libcurl cannot start");
        return FMX_EINTERNAL;
    }
    fmx__episode e = {.c = c, .module = module, .res = res};
    cJSON *spec = NULL, *reset = NULL;
    int rc = fmx_client_call(c, "spec", NULL, &spec);
    if (rc != FMX_OK) {
        snprintf(err, errsz, "spec: %s: %s", fmx_client_errcode(c), fmx_client_errmsg(c));
        curl_easy_cleanup(h);
        return rc;
    }
    e.tools = cJSON_DetachItemFromObjectCaseSensitive(spec, "tools");
    int max_steps =
        (int)fmx__num(cJSON_GetObjectItemCaseSensitive(spec, "budget"), "max_steps", 40);
    cJSON_Delete(spec);
    if (!cJSON_IsArray(e.tools)) {
        snprintf(err, errsz, "spec without a 'tools' list");
        cJSON_Delete(e.tools);
        curl_easy_cleanup(h);
        return FMX_EFORMAT;
    }
    char policy[256];
    snprintf(policy, sizeof policy, "%s:%s", name, fmx__cfg.model);
    double t0 = fmx__now_s();
    rc = fmx_client_reset(c, id, policy, seed, &res->episode, &reset);
    if (rc != FMX_OK) {
        snprintf(err, errsz, "reset %s: %s: %s", id, fmx_client_errcode(c), fmx_client_errmsg(c));
        cJSON_Delete(e.tools);
        curl_easy_cleanup(h);
        return rc;
    }
    e.ep = res->episode;
    const char *goal = fmx__str(cJSON_GetObjectItemCaseSensitive(reset, "observation"), "text");
    e.messages = cJSON_CreateArray();
    e.turns = cJSON_CreateArray();
    fmx__add_message(&e, "system", fmx_tools_system_prompt());
    fmx__add_message(&e, "user", goal ? goal : "");
    cJSON_Delete(reset);

    /* Malformed calls cost no step: bound the turns as well. */
    const char *stop = NULL;
    rc = fmx__converse(&e, h, 2 * max_steps + 8, &stop, err, errsz);
    if (rc != FMX_OK && !e.ended && !e.closed) {
        fmx_client_close_episode(c, e.ep); /* logged as aborted */
        e.closed = 1;
    }
    fmx__write_transcript(&e, id, policy, seed, t0, stop, rc != FMX_OK ? err : NULL);
    if (rc != FMX_OK) {
        size_t n = strlen(err);
        snprintf(err + n, errsz > n ? errsz - n : 0, " (episode %lld closed: aborted)",
                 (long long)e.ep);
    }
    cJSON_Delete(e.tools);
    cJSON_Delete(e.messages);
    cJSON_Delete(e.turns);
    free(e.match_code);
    free(e.match_entry);
    free(e.compiled_code);
    free(e.compiled_entry);
    free(e.last_verify_entry);
    curl_easy_cleanup(h);
    return rc;
}

/* ---- code in a reply's text ---- */

char *fmx_llm_code_block(const char *text) {
    const char *best = NULL, *best_end = NULL;
    int best_tagged = 0;
    for (const char *p = text; (p = strstr(p, "```"));) {
        const char *tag = p + 3, *nl = strchr(tag, '\n');
        if (!nl) break;
        const char *end = strstr(nl + 1, "```");
        if (!end) break;
        size_t taglen = (size_t)(nl - tag);
        while (taglen && (tag[taglen - 1] == ' ' || tag[taglen - 1] == '\r'))
            taglen--;
        int tagged = (taglen == 6 && strncmp(tag, "python", 6) == 0) ||
                     (taglen == 7 && strncmp(tag, "python3", 7) == 0) ||
                     (taglen == 2 && strncmp(tag, "py", 2) == 0);
        int bare = taglen == 0;
        if (tagged || (bare && !best_tagged)) {
            /* a bare block counts only when it defines a function */
            int defines = 0;
            for (const char *q = nl + 1; q < end && !defines; q++)
                defines = (q == nl + 1 || q[-1] == '\n') && strncmp(q, "def ", 4) == 0;
            if (tagged || defines) {
                best = nl + 1;
                best_end = end;
                best_tagged = best_tagged || tagged;
            }
        }
        p = end + 3;
    }
    if (!best) return NULL;
    return strndup(best, (size_t)(best_end - best));
}
