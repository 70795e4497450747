/*
 * server.c — `fmx serve` (server.h): the poll loop, request dispatch, the
 * episode table with per-episode request queues, the client table with the
 * evaluation scheduler and the caps, idle episodes, group commit, the bind
 * rule and CURVE keys. The server is one thread that touches episodes, the
 * log and the ROUTER socket; evaluations go to worker processes
 * (env/worker.h), which see a job (plan in, outcome out) and nothing else.
 */
#define _GNU_SOURCE
#include "server.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "episodes/log.h"
#include "proto.h"
#include "status.h"
#include "tasks.h"
#include "tools.h"
#include "worker.h"

#ifndef FMX_VERSION
#error "FMX_VERSION is the project version, defined by CMakeLists.txt"
#endif

#define FMX__MAX_IDENTITY 256
#define FMX__ZMQ_MAXMSG (16 << 20) /* bigger messages: the peer is disconnected */
#define FMX__TURN_MAX 1024         /* requests read per loop turn */
#define FMX__QUEUE_MAX 256         /* requests waiting on one busy episode */
#define FMX__ENDED_MAX 4096        /* ended episodes kept for episode_over answers */
#define FMX__MAX_POLICY 256        /* bytes of a policy name */

static volatile sig_atomic_t fmx__signal;

static void fmx__on_signal(int sig) {
    fmx__signal = sig;
}

static double fmx__mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double fmx__unix(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- requests, replies, jobs ---- */

/* Where a reply goes: the ROUTER identity, and whether a REQ client's empty
 * delimiter frame must be echoed. */
typedef struct {
    unsigned char id[FMX__MAX_IDENTITY];
    size_t id_len;
    int delim;
} fmx__env;

struct fmx__client;

typedef struct fmx__request {
    struct fmx__request *next;
    fmx__env env;
    uint64_t req;
    int has_req;
    cJSON *body; /* owned */
    double t_unix, t_mono;
    struct fmx__client *client; /* a reference; NULL for a message that could not be read */
    size_t cost;                /* bytes held against the caps while it waits; 0: none */
    int eval;                   /* counted in its client's evaluations */
} fmx__request;

typedef struct fmx__job {
    struct fmx__job *next; /* its client's waiting jobs */
    fmx__request *rq;      /* owned */
    int64_t episode;
    fmx_step_plan plan;
    fmx_step_outcome outcome;
    int rc;
    int phase;     /* 0: the step; 1: grading the last verified code after a failed last step */
    double charge; /* worker seconds charged to its client when it was handed out */
    double used;   /* worker seconds it took */
    const char *cancel_code, *cancel_msg; /* answered without running (shutdown) */
} fmx__job;

/* One client: a ROUTER routing id, i.e. one connection (the server refuses
 * ids that clients set themselves, see fmx__recv). Kept while a request of
 * it is alive or it has an open episode. Its evaluations wait here, in
 * order, until the scheduler hands them to a free worker. */
typedef struct fmx__client {
    struct fmx__client *hnext; /* hash chain */
    struct fmx__client *bnext; /* backlog: clients with waiting jobs */
    unsigned char id[FMX__MAX_IDENTITY];
    size_t id_len;
    int fd;                  /* the connection's socket (ZMQ_SRCFD) when first seen; -1 unknown */
    int refs;                /* requests alive + open episodes */
    int evals;               /* verify_component/submit requests accepted and not answered */
    size_t bytes;            /* request bytes it holds against the caps */
    fmx__job *jhead, *jtail; /* jobs waiting for a worker */
    int waiting, running;    /* jobs waiting here / running on workers */
    double vtime;            /* worker seconds used (fair queueing's virtual time) */
    uint64_t since;          /* when it last started waiting (a sequence number) */
} fmx__client;

typedef struct {
    fmx__env env;
    uint64_t req;
    int has_req;
    int64_t episode; /* touched episode, 0 if none */
    char *data;      /* msgpack, owned */
    size_t len;
} fmx__reply;

/* One episode in the table. */
typedef struct fmx__slot {
    struct fmx__slot *hnext; /* hash chain */
    struct fmx__slot *enext; /* ended FIFO */
    fmx_episode *ep;
    int64_t id;
    int busy; /* a job is in flight */
    fmx__request *qhead, *qtail;
    int nqueued;
    int in_ended;
    fmx__client *client; /* the owner, referenced while the episode is open */
    double active;       /* fmx__mono() of its last request or reply */
    int idled;           /* aborted by the idle timeout */
} fmx__slot;

typedef struct {
    char *name;
    int64_t id;
} fmx__policy;

typedef struct {
    const fmx_serve_config *cfg;
    fmx_reward_config reward;
    fmx_tasks *tasks;
    fmx_log *log;
    void *zctx, *router;
    /* worker processes */
    fmx_pool *pool;
    zmq_pollitem_t *items; /* the ROUTER, then the workers' channels */
    int *fds;
    int inflight; /* jobs given to the pool and not yet done */
    /* clients and the evaluation scheduler */
    fmx__client **cbuckets;
    size_t ncbuckets, nclients;
    fmx__client *backlog; /* clients with jobs waiting for a worker */
    int waiting;          /* jobs waiting here for a worker */
    double vclock;        /* fair queueing: the virtual time of the last job handed out */
    double charge_s;      /* what a job charges when handed out: the evaluation timeout */
    uint64_t seq;
    size_t queued_bytes; /* request bytes held against the caps, all clients */
    size_t max_queued_bytes;
    int max_client_evals;
    double next_idle_scan;
    /* episodes */
    fmx__slot **buckets;
    size_t nbuckets, nslots;
    int open_episodes;
    fmx__slot *ended_head, *ended_tail;
    int nended;
    fmx__policy *policies;
    int npolicies;
    int next_task;
    /* replies of this turn */
    fmx__reply *replies;
    int nreplies, capreplies;
    int in_tx;
    /* cached bodies */
    cJSON *spec, *task_list, **goals;
    /* counters */
    double started;
    int64_t steps, requests, dropped, refused_busy, idle_aborted;
    int shutting_down;
} fmx__server;

/* ---- episode table ---- */

static size_t fmx__hash(int64_t id, size_t n) {
    uint64_t x = (uint64_t)id * 0x9E3779B97F4A7C15ull;
    return (size_t)(x >> 32) & (n - 1);
}

static fmx__slot *fmx__find(fmx__server *s, int64_t id) {
    for (fmx__slot *e = s->buckets[fmx__hash(id, s->nbuckets)]; e; e = e->hnext)
        if (e->id == id) return e;
    return NULL;
}

static int fmx__insert(fmx__server *s, fmx__slot *slot) {
    if (s->nslots + 1 > s->nbuckets) {
        size_t n = s->nbuckets * 2;
        fmx__slot **b = calloc(n, sizeof *b);
        if (!b) return FMX_ENOMEM;
        for (size_t i = 0; i < s->nbuckets; i++)
            for (fmx__slot *e = s->buckets[i], *next; e; e = next) {
                next = e->hnext;
                size_t h = fmx__hash(e->id, n);
                e->hnext = b[h];
                b[h] = e;
            }
        free(s->buckets);
        s->buckets = b;
        s->nbuckets = n;
    }
    size_t h = fmx__hash(slot->id, s->nbuckets);
    slot->hnext = s->buckets[h];
    s->buckets[h] = slot;
    s->nslots++;
    return FMX_OK;
}

/* ---- clients ---- */

static size_t fmx__id_hash(const unsigned char *id, size_t n, size_t nbuckets) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ id[i]) * 1099511628211ull;
    return (size_t)(h ^ (h >> 32)) & (nbuckets - 1);
}

/* The client of a routing id, made on first sight, with a new reference
 * (fmx__client_unref). fd: the connection's socket, -1 if unknown. NULL when
 * out of memory. */
static fmx__client *fmx__client_get(fmx__server *s, const fmx__env *env, int fd) {
    size_t h = fmx__id_hash(env->id, env->id_len, s->ncbuckets);
    fmx__client *c = s->cbuckets[h];
    while (c && (c->id_len != env->id_len || memcmp(c->id, env->id, env->id_len) != 0))
        c = c->hnext;
    if (!c) {
        if (s->nclients + 1 > s->ncbuckets) {
            size_t n = s->ncbuckets * 2;
            fmx__client **b = calloc(n, sizeof *b);
            if (!b) return NULL;
            for (size_t i = 0; i < s->ncbuckets; i++)
                for (fmx__client *e = s->cbuckets[i], *next; e; e = next) {
                    next = e->hnext;
                    size_t k = fmx__id_hash(e->id, e->id_len, n);
                    e->hnext = b[k];
                    b[k] = e;
                }
            free(s->cbuckets);
            s->cbuckets = b;
            s->ncbuckets = n;
            h = fmx__id_hash(env->id, env->id_len, n);
        }
        c = calloc(1, sizeof *c);
        if (!c) return NULL;
        memcpy(c->id, env->id, env->id_len);
        c->id_len = env->id_len;
        c->fd = fd;
        c->hnext = s->cbuckets[h];
        s->cbuckets[h] = c;
        s->nclients++;
    }
    c->refs++;
    return c;
}

/* Drops a reference; the last one frees the client (it then has no request
 * alive, so no job waiting, and no open episode). Accepts NULL. */
static void fmx__client_unref(fmx__server *s, fmx__client *c) {
    if (!c || --c->refs > 0) return;
    fmx__client **pp = &s->cbuckets[fmx__id_hash(c->id, c->id_len, s->ncbuckets)];
    while (*pp && *pp != c)
        pp = &(*pp)->hnext;
    if (*pp) *pp = c->hnext;
    s->nclients--;
    free(c);
}

/* Returns 0 so that handlers can `return fmx__request_free(s, rq);`. */
static int fmx__request_free(fmx__server *s, fmx__request *rq) {
    if (!rq) return 0;
    if (rq->client) {
        rq->client->evals -= rq->eval;
        rq->client->bytes -= rq->cost;
        fmx__client_unref(s, rq->client);
    }
    s->queued_bytes -= rq->cost;
    cJSON_Delete(rq->body);
    free(rq);
    return 0;
}

/* An open episode's owner: referenced until the episode ends. */
static void fmx__slot_release(fmx__server *s, fmx__slot *slot) {
    fmx__client_unref(s, slot->client);
    slot->client = NULL;
}

/* Unlinks and frees a slot (its queue must be empty or is freed). */
static void fmx__remove(fmx__server *s, fmx__slot *slot) {
    fmx__slot **pp = &s->buckets[fmx__hash(slot->id, s->nbuckets)];
    while (*pp && *pp != slot)
        pp = &(*pp)->hnext;
    if (*pp) *pp = slot->hnext;
    s->nslots--;
    if (slot->in_ended) {
        fmx__slot **ep = &s->ended_head;
        fmx__slot *prev = NULL;
        while (*ep && *ep != slot) {
            prev = *ep;
            ep = &(*ep)->enext;
        }
        if (*ep) *ep = slot->enext;
        if (s->ended_tail == slot) s->ended_tail = prev;
        s->nended--;
    }
    if (fmx_episode_status_of(slot->ep) == FMX_EP_OPEN) s->open_episodes--;
    for (fmx__request *rq = slot->qhead, *next; rq; rq = next) {
        next = rq->next;
        fmx__request_free(s, rq);
    }
    fmx__slot_release(s, slot);
    fmx_episode_destroy(slot->ep);
    free(slot);
}

/* ---- replies ---- */

static void fmx__push_reply(fmx__server *s, const fmx__env *env, uint64_t req, int has_req,
                            int64_t episode, cJSON *body) {
    char *data = NULL;
    size_t len = 0;
    if (!body || fmx_proto_encode(body, has_req ? &req : NULL, &data, &len) != FMX_OK) {
        /* Out of memory: a minimal hand-encoded error still goes out. */
        static const char oom[] = "\x82\xa2ok\xc2\xa5\x65rror\x82\xa4\x63ode\xa8internal"
                                  "\xa7message\xadout of memory";
        data = malloc(sizeof oom - 1);
        if (data) memcpy(data, oom, sizeof oom - 1);
        len = data ? sizeof oom - 1 : 0;
    }
    cJSON_Delete(body);
    if (!data) {
        s->dropped++;
        return;
    }
    if (s->nreplies == s->capreplies) {
        int cap = s->capreplies ? 2 * s->capreplies : 256;
        fmx__reply *g = realloc(s->replies, (size_t)cap * sizeof *g);
        if (!g) {
            free(data);
            s->dropped++;
            return;
        }
        s->replies = g;
        s->capreplies = cap;
    }
    s->replies[s->nreplies++] = (fmx__reply){*env, req, has_req, episode, data, len};
}

static cJSON *fmx__error_body(const char *code, const char *fmt, va_list ap) {
    char msg[2048];
    vsnprintf(msg, sizeof msg, fmt, ap);
    cJSON *b = cJSON_CreateObject();
    cJSON_AddBoolToObject(b, "ok", 0);
    cJSON *e = cJSON_AddObjectToObject(b, "error");
    cJSON_AddStringToObject(e, "code", code);
    cJSON_AddStringToObject(e, "message", msg);
    return b;
}

/* Queues an error reply to rq. Returns 0 (see fmx__request_free). */
static int fmx__reply_error(fmx__server *s, const fmx__request *rq, const char *code,
                            const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    cJSON *b = fmx__error_body(code, fmt, ap);
    va_end(ap);
    fmx__push_reply(s, &rq->env, rq->req, rq->has_req, 0, b);
    return 0;
}

static cJSON *fmx__ok(void) {
    cJSON *b = cJSON_CreateObject();
    cJSON_AddBoolToObject(b, "ok", 1);
    return b;
}

/* ---- the log ---- */

static void fmx__ended(fmx__server *s, fmx__slot *slot);

static int fmx__tx(fmx__server *s) {
    if (s->in_tx) return FMX_OK;
    int rc = fmx_log_begin(s->log);
    if (rc == FMX_OK) s->in_tx = 1;
    return rc;
}

/* Commits the turn, then sends its replies. A failed commit turns every
 * reply into an `internal` error and aborts the open episodes it touched. */
static void fmx__flush(fmx__server *s) {
    if (s->in_tx) {
        int rc = fmx_log_commit(s->log);
        s->in_tx = 0;
        if (rc != FMX_OK) {
            char why[512];
            snprintf(why, sizeof why, "the episode log could not be written: %s",
                     fmx_log_errmsg(s->log));
            fprintf(stderr, "fmx serve: %s\n", why);
            fmx_log_rollback(s->log);
            for (int i = 0; i < s->npolicies; i++)
                free(s->policies[i].name);
            s->npolicies = 0; /* their rows may be gone with the rollback */
            for (int i = 0; i < s->nreplies; i++) {
                fmx__reply *r = &s->replies[i];
                /* An episode whose step was not recorded cannot go on. */
                fmx__slot *slot = r->episode ? fmx__find(s, r->episode) : NULL;
                if (slot && fmx_episode_status_of(slot->ep) == FMX_EP_OPEN) {
                    fmx_episode_abort(slot->ep);
                    fmx__ended(s, slot);
                }
                char *data = NULL;
                size_t len = 0;
                cJSON *b = cJSON_CreateObject();
                cJSON_AddBoolToObject(b, "ok", 0);
                cJSON *e = cJSON_AddObjectToObject(b, "error");
                cJSON_AddStringToObject(e, "code", "internal");
                cJSON_AddStringToObject(e, "message", why);
                if (fmx_proto_encode(b, r->has_req ? &r->req : NULL, &data, &len) == FMX_OK) {
                    free(r->data);
                    r->data = data;
                    r->len = len;
                }
                cJSON_Delete(b);
            }
        }
    }
    for (int i = 0; i < s->nreplies; i++) {
        fmx__reply *r = &s->replies[i];
        int ok = zmq_send(s->router, r->env.id, r->env.id_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0;
        if (ok && r->env.delim) ok = zmq_send(s->router, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0;
        if (ok) ok = zmq_send(s->router, r->data, r->len, ZMQ_DONTWAIT) >= 0;
        if (!ok) s->dropped++; /* the client is gone (EHOSTUNREACH) or not reading */
        free(r->data);
    }
    s->nreplies = 0;
}

/* ---- the evaluation scheduler ----
 *
 * Evaluations (verify_component, submit) wait in their client's queue here,
 * not in the pool's: a job is handed to the pool only when a worker is free
 * for it, and then it is the job of the waiting client that has used the
 * least worker time (fair queueing on a virtual clock: a job charges its
 * client the evaluation timeout when it is handed out and the time it
 * really took when it ends; a client that starts waiting is put no further
 * than one evaluation timeout behind the clock, so idle time earns little
 * credit; ties go to the client waiting longest). Clients that use the same
 * time take turns, and a client with one evaluation waits for the next free
 * worker whatever others have queued. */

static void fmx__job_finish(fmx__server *s, fmx__job *job);

/* Queues a job behind its client's earlier ones. */
static void fmx__sched_add(fmx__server *s, fmx__job *job) {
    fmx__client *c = job->rq->client;
    job->next = NULL;
    if (c->jtail)
        c->jtail->next = job;
    else
        c->jhead = job;
    c->jtail = job;
    s->waiting++;
    if (c->waiting++ == 0) {
        /* Idle time earns at most one evaluation's credit. */
        if (c->vtime < s->vclock - s->charge_s) c->vtime = s->vclock - s->charge_s;
        c->since = ++s->seq;
        c->bnext = s->backlog;
        s->backlog = c;
    }
}

/* Takes the first waiting job of the client at *pp (in the backlog). */
static fmx__job *fmx__sched_pop(fmx__server *s, fmx__client **pp) {
    fmx__client *c = *pp;
    fmx__job *job = c->jhead;
    c->jhead = job->next;
    if (!c->jhead) c->jtail = NULL;
    job->next = NULL;
    s->waiting--;
    if (--c->waiting == 0) *pp = c->bnext;
    return job;
}

/* Hands waiting jobs to the pool while it has a free worker (or, when no
 * worker is up, one job, so that the pool can fail it if none can start). */
static void fmx__sched_dispatch(fmx__server *s) {
    while (s->backlog) {
        fmx_pool_stats ps = fmx_pool_stats_get(s->pool);
        if (ps.queued > 0 || (ps.ready > 0 && ps.busy >= ps.ready)) return;
        fmx__client **best = &s->backlog;
        for (fmx__client **pp = &(*best)->bnext; *pp; pp = &(*pp)->bnext)
            if ((*pp)->vtime < (*best)->vtime ||
                ((*pp)->vtime == (*best)->vtime && (*pp)->since < (*best)->since))
                best = pp;
        fmx__client *c = *best;
        fmx__job *job = fmx__sched_pop(s, best);
        if (c->vtime > s->vclock) s->vclock = c->vtime;
        if (fmx_pool_submit(s->pool, fmx_worker_step_request(&job->plan), job) != FMX_OK) {
            job->rc = FMX_ENOMEM;
            fmx__job_finish(s, job);
            continue;
        }
        job->charge = s->charge_s;
        c->vtime += job->charge;
        c->running++;
        s->inflight++;
    }
}

/* Answers every waiting job with an error (shutdown). */
static void fmx__sched_cancel(fmx__server *s, const char *code, const char *msg) {
    while (s->backlog) {
        fmx__job *job = fmx__sched_pop(s, &s->backlog);
        job->rc = FMX_EINVAL;
        job->cancel_code = code;
        job->cancel_msg = msg;
        fmx__job_finish(s, job);
    }
}

/* ---- ops ---- */

static int fmx__handle(fmx__server *s, fmx__request *rq);

static int fmx__get_int(const cJSON *body, const char *key, int64_t *out, int *present) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(body, key);
    *present = v != NULL;
    if (!v) return 1;
    if (!cJSON_IsNumber(v) || !(fabs(v->valuedouble) < 9e18) ||
        v->valuedouble != (double)(int64_t)v->valuedouble)
        return 0;
    *out = (int64_t)v->valuedouble;
    return 1;
}

static void fmx__op_hello(fmx__server *s, fmx__request *rq) {
    cJSON *b = fmx__ok();
    cJSON_AddNumberToObject(b, "protocol", FMX_PROTO_VERSION);
    cJSON_AddStringToObject(b, "server", "fmx " FMX_VERSION);
    cJSON_AddStringToObject(b, "engine", fmx_engine_version());
    cJSON_AddStringToObject(b, "device", fmx_engine_device());
    fmx__push_reply(s, &rq->env, rq->req, rq->has_req, 0, b);
}

static void fmx__op_spec(fmx__server *s, fmx__request *rq) {
    cJSON *b = fmx__ok();
    for (const cJSON *c = s->spec->child; c; c = c->next)
        cJSON_AddItemReferenceToObject(b, c->string, (cJSON *)c);
    fmx__push_reply(s, &rq->env, rq->req, rq->has_req, 0, b);
}

/* The goal text of task ti under the server's budget (the reset observation
 * of a new episode), made once. Borrowed; NULL when out of memory. */
static const cJSON *fmx__task_goal(fmx__server *s, int ti) {
    if (!s->goals[ti]) {
        fmx_episode *ep = fmx_episode_create(0, fmx_tasks_get(s->tasks, ti), "anonymous", 0, "", 0,
                                             s->cfg->budget, &s->reward);
        if (ep) s->goals[ti] = fmx_episode_goal(ep);
        fmx_episode_destroy(ep);
    }
    return s->goals[ti];
}

static void fmx__op_list_tasks(fmx__server *s, fmx__request *rq) {
    const cJSON *jg = cJSON_GetObjectItemCaseSensitive(rq->body, "goals");
    if (jg && !cJSON_IsBool(jg)) {
        fmx__reply_error(s, rq, "bad_request", "list_tasks: 'goals' must be true or false");
        return;
    }
    cJSON *b = fmx__ok();
    if (!cJSON_IsTrue(jg)) {
        cJSON_AddItemReferenceToObject(b, "tasks", s->task_list);
        fmx__push_reply(s, &rq->env, rq->req, rq->has_req, 0, b);
        return;
    }
    /* goals: each task with the text reset would send (a dataset of prompts) */
    cJSON *tasks = cJSON_AddArrayToObject(b, "tasks");
    int i = 0;
    for (const cJSON *t = s->task_list->child; t; t = t->next, i++) {
        cJSON *o = cJSON_Duplicate(t, 1);
        const cJSON *goal = fmx__task_goal(s, i);
        const char *text = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(goal, "text"));
        if (!o || !text || !cJSON_AddStringToObject(o, "goal", text)) {
            cJSON_Delete(o);
            cJSON_Delete(b);
            fmx__reply_error(s, rq, "internal", "out of memory");
            return;
        }
        cJSON_AddItemToArray(tasks, o);
    }
    fmx__push_reply(s, &rq->env, rq->req, rq->has_req, 0, b);
}

static void fmx__op_health(fmx__server *s, fmx__request *rq) {
    cJSON *b = fmx__ok();
    fmx_proto_add_float(b, "uptime_s", fmx__mono() - s->started);
    cJSON_AddNumberToObject(b, "episodes_open", s->open_episodes);
    cJSON_AddNumberToObject(b, "steps", (double)s->steps);
    cJSON_AddNumberToObject(b, "requests", (double)s->requests);
    cJSON_AddNumberToObject(b, "jobs_in_flight", s->inflight);
    cJSON_AddNumberToObject(b, "jobs_waiting", s->waiting);
    cJSON_AddNumberToObject(b, "clients", (double)s->nclients);
    cJSON_AddNumberToObject(b, "queued_bytes", (double)s->queued_bytes);
    cJSON_AddNumberToObject(b, "refused_busy", (double)s->refused_busy);
    cJSON_AddNumberToObject(b, "idle_aborted", (double)s->idle_aborted);
    fmx_pool_stats ps = fmx_pool_stats_get(s->pool);
    cJSON *w = cJSON_AddObjectToObject(b, "workers");
    cJSON_AddNumberToObject(w, "configured", ps.workers);
    cJSON_AddNumberToObject(w, "ready", ps.ready);
    cJSON_AddNumberToObject(w, "busy", ps.busy);
    cJSON_AddNumberToObject(w, "queued", ps.queued);
    cJSON_AddNumberToObject(w, "jobs", (double)ps.jobs);
    cJSON_AddNumberToObject(w, "timeouts", (double)ps.timeouts);
    cJSON_AddNumberToObject(w, "ooms", (double)ps.ooms);
    cJSON_AddNumberToObject(w, "crashes", (double)ps.crashes);
    cJSON_AddNumberToObject(w, "restarts", (double)ps.restarts);
    cJSON_AddNumberToObject(b, "tasks", fmx_tasks_count(s->tasks));
    cJSON_AddStringToObject(b, "db", s->cfg->db_path);
    cJSON_AddBoolToObject(b, "shutting_down", s->shutting_down);
    fmx__push_reply(s, &rq->env, rq->req, rq->has_req, 0, b);
}

static int64_t fmx__policy_id(fmx__server *s, const char *name, int *rc) {
    for (int i = 0; i < s->npolicies; i++)
        if (strcmp(s->policies[i].name, name) == 0) return s->policies[i].id;
    int64_t id = 0;
    *rc = fmx__tx(s);
    if (*rc == FMX_OK) *rc = fmx_log_policy(s->log, name, &id);
    if (*rc != FMX_OK) return 0;
    fmx__policy *g = realloc(s->policies, (size_t)(s->npolicies + 1) * sizeof *g);
    char *dup = strdup(name);
    if (g) s->policies = g;
    if (g && dup)
        s->policies[s->npolicies++] = (fmx__policy){dup, id};
    else
        free(dup);
    return id;
}

static int fmx__op_reset(fmx__server *s, fmx__request *rq) {
    const cJSON *jt = cJSON_GetObjectItemCaseSensitive(rq->body, "task");
    const cJSON *jp = cJSON_GetObjectItemCaseSensitive(rq->body, "policy");
    int64_t seed = 0;
    int has_seed;
    if (!fmx__get_int(rq->body, "seed", &seed, &has_seed))
        return fmx__reply_error(s, rq, "bad_request", "reset: 'seed' must be an integer");
    if (jt && !cJSON_IsString(jt) && !cJSON_IsNull(jt))
        return fmx__reply_error(s, rq, "bad_request", "reset: 'task' must be a task id string");
    if (jp && !cJSON_IsString(jp) && !cJSON_IsNull(jp))
        return fmx__reply_error(s, rq, "bad_request", "reset: 'policy' must be a string");
    int64_t max_steps = 0;
    int has_max_steps;
    fmx_budget budget = s->cfg->budget;
    if (!fmx__get_int(rq->body, "max_steps", &max_steps, &has_max_steps) ||
        (has_max_steps && (max_steps < 1 || max_steps > budget.max_steps)))
        return fmx__reply_error(s, rq, "bad_request",
                                "reset: 'max_steps' must be an integer from 1 to the server's "
                                "budget, %d (a reset may lower the budget, not raise it)",
                                budget.max_steps);
    if (has_max_steps) budget.max_steps = (int)max_steps;
    const char *policy = cJSON_IsString(jp) && jp->valuestring[0] ? jp->valuestring : "anonymous";
    if (strlen(policy) > FMX__MAX_POLICY)
        return fmx__reply_error(s, rq, "bad_request", "reset: 'policy' is longer than %d bytes",
                                FMX__MAX_POLICY);
    const fmx_task *task;
    int ti;
    if (cJSON_IsString(jt)) {
        task = fmx_tasks_find(s->tasks, jt->valuestring);
        if (!task) {
            char ids[1024] = "";
            size_t used = 0;
            int n = fmx_tasks_count(s->tasks);
            for (int i = 0; i < n && i < 12 && used < sizeof ids; i++)
                used += (size_t)snprintf(ids + used, sizeof ids - used, "%s%s", i ? ", " : "",
                                         fmx_tasks_get(s->tasks, i)->id);
            return fmx__reply_error(s, rq, "unknown_task",
                                    "no task '%s'; %d tasks (list_tasks lists them all): %s%s",
                                    jt->valuestring, n, ids, n > 12 ? ", ..." : "");
        }
        ti = (int)(task - fmx_tasks_get(s->tasks, 0));
    } else {
        ti = s->next_task;
        s->next_task = (s->next_task + 1) % fmx_tasks_count(s->tasks);
        task = fmx_tasks_get(s->tasks, ti);
    }
    int rc = FMX_OK;
    int64_t pid = fmx__policy_id(s, policy, &rc);
    int64_t id = 0;
    if (rc == FMX_OK) rc = fmx__tx(s);
    if (rc == FMX_OK) rc = fmx_log_episode_begin(s->log, task->id, pid, seed, &id);
    if (rc != FMX_OK)
        return fmx__reply_error(s, rq, "internal", "the episode log refused a new episode: %s",
                                fmx_log_errmsg(s->log));
    fmx__slot *slot = calloc(1, sizeof *slot);
    if (slot)
        slot->ep = fmx_episode_create(id, task, policy, seed, rq->env.id, rq->env.id_len, budget,
                                      &s->reward);
    if (slot) slot->id = id;
    if (!slot || !slot->ep || fmx__insert(s, slot) != FMX_OK) {
        if (slot) fmx_episode_destroy(slot->ep);
        free(slot);
        fmx_log_episode_end(s->log, id, "aborted", 0);
        return fmx__reply_error(s, rq, "internal", "out of memory");
    }
    s->open_episodes++;
    slot->client = rq->client;
    slot->client->refs++;
    slot->active = fmx__mono();
    /* the goal names the budget: the server's is made once per task */
    const cJSON *goal = has_max_steps ? NULL : fmx__task_goal(s, ti);
    cJSON *b = fmx__ok();
    cJSON_AddNumberToObject(b, "episode", (double)id);
    if (goal)
        cJSON_AddItemReferenceToObject(b, "observation", (cJSON *)goal);
    else
        cJSON_AddItemToObject(b, "observation", fmx_episode_goal(slot->ep));
    cJSON_AddItemToObject(b, "info", fmx_episode_info(slot->ep));
    fmx__push_reply(s, &rq->env, rq->req, rq->has_req, id, b);
    return 0;
}

/* Moves an ended episode to the ended FIFO, evicting the oldest. */
static void fmx__ended(fmx__server *s, fmx__slot *slot) {
    s->open_episodes--;
    fmx__slot_release(s, slot);
    slot->in_ended = 1;
    slot->enext = NULL;
    if (s->ended_tail)
        s->ended_tail->enext = slot;
    else
        s->ended_head = slot;
    s->ended_tail = slot;
    s->nended++;
    while (s->nended > FMX__ENDED_MAX && s->ended_head && !s->ended_head->busy &&
           !s->ended_head->qhead)
        fmx__remove(s, s->ended_head);
}

/* close with grade: true: 1 for such a request (an episode still open is
 * ended by a finish step, whose reply says closed). */
static int fmx__graded_close(const fmx__request *rq) {
    const char *op = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(rq->body, "op"));
    return op && strcmp(op, "close") == 0 &&
           cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(rq->body, "grade"));
}

/* 1 if rq, a close, runs as a finish step on slot's open episode. */
static int fmx__finishing_close(const fmx__slot *slot, const fmx__request *rq) {
    return fmx__graded_close(rq) && fmx_episode_status_of(slot->ep) == FMX_EP_OPEN;
}

/* Applies a finished step (inline or from a worker): state, log, reply. */
static int fmx__complete_step(fmx__server *s, fmx__slot *slot, fmx__request *rq,
                              fmx_step_plan *plan, fmx_step_outcome *outcome) {
    fmx_step_result res;
    slot->active = fmx__mono();
    if (fmx_episode_apply(slot->ep, plan, outcome, &res) != FMX_OK)
        return fmx__reply_error(s, rq, "internal", "out of memory");
    s->steps++;
    char *args = plan->args ? cJSON_PrintUnformatted(plan->args) : NULL;
    char *obs = cJSON_PrintUnformatted(res.observation);
    fmx_step_record rec = {.episode = slot->id,
                           .idx = res.idx,
                           .tool = plan->tool,
                           .args = args ? args : "{}",
                           .observation = obs ? obs : "{}",
                           .reward = res.reward,
                           .terminated = res.terminated,
                           .truncated = res.truncated,
                           .error = res.error,
                           .started_at = rq->t_unix,
                           .ms = (fmx__mono() - rq->t_mono) * 1e3};
    int rc = fmx__tx(s);
    if (rc == FMX_OK) rc = fmx_log_step(s->log, &rec);
    if (rc == FMX_OK && res.graded) {
        const fmx_grade *g = res.grade;
        fmx_submission_record sub = {.episode = slot->id,
                                     .code = res.graded_code,
                                     .entry = res.graded_entry,
                                     .correctness = g->facts.correctness,
                                     .loc = g->facts.loc,
                                     .loc_score = g->score.loc_score,
                                     .compile_score = g->score.compile_score,
                                     .reward = g->score.reward,
                                     .reward_version = s->reward.version,
                                     .breakdown = g->breakdown,
                                     .truncated = res.truncated};
        rc = fmx_log_submission(s->log, &sub, NULL);
    }
    int ended = res.terminated || res.truncated;
    if (rc == FMX_OK && ended)
        rc = fmx_log_episode_end(
            s->log, slot->id, fmx_episode_status_name(fmx_episode_status_of(slot->ep)), res.reward);
    free(args);
    free(obs);
    if (rc != FMX_OK) {
        fmx_step_result_clear(&res);
        /* The step happened but cannot be recorded: the episode cannot go on. */
        fmx__reply_error(s, rq, "internal", "the episode log refused the step: %s",
                         fmx_log_errmsg(s->log));
        fmx_episode_abort(slot->ep);
        fmx__ended(s, slot);
        return 0;
    }
    cJSON *b = fmx__ok();
    if (fmx__graded_close(rq)) {
        /* a close with grade: the finish step's reply, closed */
        cJSON_AddBoolToObject(b, "closed", 1);
        cJSON_AddNumberToObject(b, "episode", (double)slot->id);
    }
    cJSON_AddItemToObject(b, "observation", res.observation);
    fmx_proto_add_float(b, "reward", res.reward);
    cJSON_AddBoolToObject(b, "terminated", res.terminated);
    cJSON_AddBoolToObject(b, "truncated", res.truncated);
    cJSON_AddItemToObject(b, "info", res.info);
    res.observation = res.info = NULL;
    fmx__push_reply(s, &rq->env, rq->req, rq->has_req, slot->id, b);
    if (ended) fmx__ended(s, slot);
    return 0;
}

/* A step request for a slot that is free to run it (or a close that runs a
 * finish step, fmx__finishing_close). Takes rq. */
static int fmx__run_step(fmx__server *s, fmx__slot *slot, fmx__request *rq) {
    fmx_episode_status st = fmx_episode_status_of(slot->ep);
    if (st != FMX_EP_OPEN) {
        if (slot->idled)
            fmx__reply_error(s, rq, "episode_over",
                             "episode %lld is over (aborted: no request for %g s, the server's "
                             "--idle-timeout); reset to start another",
                             (long long)slot->id, s->cfg->idle_timeout_s);
        else
            fmx__reply_error(s, rq, "episode_over",
                             "episode %lld is over (%s); reset to start another",
                             (long long)slot->id, fmx_episode_status_name(st));
        return fmx__request_free(s, rq);
    }
    const cJSON *action = cJSON_GetObjectItemCaseSensitive(rq->body, "action");
    const cJSON *tool = cJSON_GetObjectItemCaseSensitive(action, "tool");
    const cJSON *args = cJSON_GetObjectItemCaseSensitive(action, "args");
    int graded_close = fmx__graded_close(rq);
    if (!graded_close && (!cJSON_IsObject(action) || !cJSON_IsString(tool))) {
        fmx__reply_error(s, rq, "bad_request",
                         "step needs 'action': {\"tool\": STR, \"args\": MAP}; tools: "
                         "read_module_source, get_weight_info, capture_intermediate, trace_ops, "
                         "verify_component, submit");
        return fmx__request_free(s, rq);
    }
    fmx__job *job = calloc(1, sizeof *job);
    if (!job || fmx_episode_plan(slot->ep, graded_close ? "finish" : tool->valuestring,
                                 graded_close ? NULL : args, &job->plan) != FMX_OK) {
        free(job);
        fmx__reply_error(s, rq, "internal", "out of memory");
        return fmx__request_free(s, rq);
    }
    job->rq = rq;
    job->episode = slot->id;
    if (job->plan.heavy && !s->shutting_down) {
        fmx__sched_add(s, job); /* the scheduler hands it to a worker */
        slot->busy = 1;
        return 0;
    } else if (job->plan.heavy) { /* no new heavy work once shutting down */
        fmx__reply_error(s, rq, "shutting_down", "the server is shutting down");
    } else if (fmx_episode_execute(&job->plan, &job->outcome) != FMX_OK) {
        fmx__reply_error(s, rq, "internal", "out of memory");
    } else {
        fmx__complete_step(s, slot, rq, &job->plan, &job->outcome);
    }
    fmx_step_outcome_clear(&job->outcome);
    fmx_step_plan_clear(&job->plan);
    fmx__request_free(s, rq);
    free(job);
    return 0;
}

/* close for a slot that is free. Takes rq. Returns 1 if the slot is gone. */
static int fmx__run_close(fmx__server *s, fmx__slot *slot, fmx__request *rq) {
    if (fmx_episode_status_of(slot->ep) == FMX_EP_OPEN) {
        int rc = fmx__tx(s);
        if (rc == FMX_OK) rc = fmx_log_episode_end(s->log, slot->id, "aborted", 0);
        if (rc != FMX_OK) {
            fmx__reply_error(s, rq, "internal", "the episode log refused the close: %s",
                             fmx_log_errmsg(s->log));
            fmx__request_free(s, rq);
            return 0;
        }
    }
    cJSON *b = fmx__ok();
    cJSON_AddBoolToObject(b, "closed", 1);
    cJSON_AddNumberToObject(b, "episode", (double)slot->id);
    fmx__push_reply(s, &rq->env, rq->req, rq->has_req, 0, b);
    fmx__request_free(s, rq);
    /* Requests queued behind the close find no episode. */
    for (fmx__request *q = slot->qhead, *next; q; q = next) {
        next = q->next;
        fmx__reply_error(s, q, "unknown_episode", "episode %lld was closed", (long long)slot->id);
        fmx__request_free(s, q);
    }
    slot->qhead = slot->qtail = NULL;
    fmx__remove(s, slot);
    return 1;
}

/* Runs queued requests of a slot until one becomes a job or none is left. */
static void fmx__drain_queue(fmx__server *s, fmx__slot *slot) {
    while (slot->qhead && !slot->busy) {
        fmx__request *rq = slot->qhead;
        slot->qhead = rq->next;
        if (!slot->qhead) slot->qtail = NULL;
        slot->nqueued--;
        rq->next = NULL;
        const char *op = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(rq->body, "op"));
        if (op && strcmp(op, "close") == 0 && !fmx__finishing_close(slot, rq)) {
            if (fmx__run_close(s, slot, rq)) return;
        } else {
            fmx__run_step(s, slot, rq);
        }
    }
}

/* Bytes a cJSON tree holds, about: nodes, strings and keys. */
static size_t fmx__tree_bytes(const cJSON *j) {
    if (!j) return 0;
    size_t n = sizeof(cJSON) + 16;
    if (j->valuestring) n += strlen(j->valuestring) + 1;
    if (j->string) n += strlen(j->string) + 1;
    for (const cJSON *c = j->child; c; c = c->next)
        n += fmx__tree_bytes(c);
    return n;
}

/* Queues a `busy` reply (a cap was reached; the message says which). */
static void fmx__busy(fmx__server *s, const fmx__request *rq, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    cJSON *b = fmx__error_body("busy", fmt, ap);
    va_end(ap);
    fmx__push_reply(s, &rq->env, rq->req, rq->has_req, 0, b);
    s->refused_busy++;
}

/* Holds a request that will wait (an evaluation, or a request behind its
 * episode's running step) against the caps: its client's evaluations
 * (--max-client-evals) and the bytes of waiting requests, the server's
 * (--max-queued-mb) and a client's (a quarter of that). Returns 1, or
 * replies `busy` and returns 0. args: a step's args (a job copies them). */
static int fmx__admit(fmx__server *s, fmx__request *rq, int heavy, const cJSON *args) {
    fmx__client *c = rq->client;
    if (heavy && c->evals >= s->max_client_evals) {
        fmx__busy(s, rq,
                  "this connection already has %d evaluations (verify_component, submit) waiting "
                  "or running, the most one client may have (--max-client-evals %d); send more "
                  "when replies come",
                  c->evals, s->max_client_evals);
        return 0;
    }
    size_t cost = sizeof *rq + fmx__tree_bytes(rq->body);
    if (heavy) cost += sizeof(fmx__job) + fmx__tree_bytes(args);
    size_t mb = 1u << 20;
    if (s->queued_bytes + cost > s->max_queued_bytes) {
        fmx__busy(s, rq,
                  "the server already holds %.1f MiB of waiting requests and this one would pass "
                  "its limit (--max-queued-mb %zu); send it again when replies come",
                  (double)s->queued_bytes / mb, s->max_queued_bytes / mb);
        return 0;
    }
    if (c->bytes + cost > s->max_queued_bytes / 4) {
        fmx__busy(s, rq,
                  "this connection already holds %.1f MiB of waiting requests and this one would "
                  "pass its share, a quarter of --max-queued-mb (%.1f MiB); send it again when "
                  "replies come",
                  (double)c->bytes / mb, (double)s->max_queued_bytes / 4 / mb);
        return 0;
    }
    rq->cost = cost;
    c->bytes += cost;
    s->queued_bytes += cost;
    rq->eval = heavy;
    c->evals += heavy;
    return 1;
}

/* step and close: find the episode, check the owner, queue if busy. Takes rq. */
static int fmx__op_episode(fmx__server *s, fmx__request *rq, int is_close) {
    int64_t id = 0;
    int present;
    if (!fmx__get_int(rq->body, "episode", &id, &present) || !present) {
        fmx__reply_error(s, rq, "bad_request", "%s needs 'episode': the integer id reset returned",
                         is_close ? "close" : "step");
        return fmx__request_free(s, rq);
    }
    fmx__slot *slot = fmx__find(s, id);
    if (!slot) {
        fmx__reply_error(s, rq, "unknown_episode", "no episode %lld on this server", (long long)id);
        return fmx__request_free(s, rq);
    }
    if (!fmx_episode_owned_by(slot->ep, rq->env.id, rq->env.id_len)) {
        fmx__reply_error(s, rq, "not_your_episode",
                         "episode %lld belongs to another client connection", (long long)id);
        return fmx__request_free(s, rq);
    }
    slot->active = fmx__mono();
    /* What will wait (an evaluation, or any request behind a running step)
     * is held against the caps. */
    int waits = slot->busy || slot->qhead;
    const cJSON *action = cJSON_GetObjectItemCaseSensitive(rq->body, "action");
    const char *tool =
        is_close ? NULL : cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(action, "tool"));
    int heavy = tool && fmx_tools_is_heavy(tool);
    if (waits && slot->nqueued >= FMX__QUEUE_MAX) {
        fmx__busy(s, rq,
                  "episode %lld already has %d requests waiting, the most one episode may "
                  "have; send more when replies come",
                  (long long)id, FMX__QUEUE_MAX);
        return fmx__request_free(s, rq);
    }
    if ((waits || heavy) &&
        !fmx__admit(s, rq, heavy, cJSON_GetObjectItemCaseSensitive(action, "args")))
        return fmx__request_free(s, rq);
    if (waits) {
        rq->next = NULL;
        if (slot->qtail)
            slot->qtail->next = rq;
        else
            slot->qhead = rq;
        slot->qtail = rq;
        slot->nqueued++;
        return 0;
    }
    if (is_close && !fmx__finishing_close(slot, rq))
        fmx__run_close(s, slot, rq);
    else
        fmx__run_step(s, slot, rq);
    return 0;
}

/* Dispatches one decoded request. Takes rq. */
static int fmx__handle(fmx__server *s, fmx__request *rq) {
    s->requests++;
    const cJSON *jop = cJSON_GetObjectItemCaseSensitive(rq->body, "op");
    if (!cJSON_IsString(jop)) {
        fmx__reply_error(s, rq, "bad_request",
                         "a request needs 'op' (a string): hello, spec, list_tasks, reset, step, "
                         "close, health");
        return fmx__request_free(s, rq);
    }
    const char *op = jop->valuestring;
    if (strcmp(op, "health") == 0) { /* answered even while shutting down */
        fmx__op_health(s, rq);
        return fmx__request_free(s, rq);
    }
    if (s->shutting_down) {
        fmx__reply_error(s, rq, "shutting_down", "the server is shutting down");
        return fmx__request_free(s, rq);
    }
    if (strcmp(op, "step") == 0) return fmx__op_episode(s, rq, 0);
    if (strcmp(op, "close") == 0) return fmx__op_episode(s, rq, 1);
    if (strcmp(op, "hello") == 0)
        fmx__op_hello(s, rq);
    else if (strcmp(op, "spec") == 0)
        fmx__op_spec(s, rq);
    else if (strcmp(op, "list_tasks") == 0)
        fmx__op_list_tasks(s, rq);
    else if (strcmp(op, "reset") == 0)
        fmx__op_reset(s, rq);
    else
        fmx__reply_error(
            s, rq, "unknown_op",
            "unknown op '%s'; ops: hello, spec, list_tasks, reset, step, close, health", op);
    return fmx__request_free(s, rq);
}

/* A job is over: its outcome made from the worker's reply or failure, or
 * (rc set) it could not run. Frees it and runs what waited behind it. */
static void fmx__job_finish(fmx__server *s, fmx__job *job) {
    fmx__slot *slot = fmx__find(s, job->episode);
    if (slot) {
        slot->busy = 0;
        if (job->cancel_code)
            fmx__reply_error(s, job->rq, job->cancel_code, "%s", job->cancel_msg);
        else if (job->rc != FMX_OK)
            fmx__reply_error(s, job->rq, "internal", "out of memory running the step");
        else
            fmx__complete_step(s, slot, job->rq, &job->plan, &job->outcome);
    } else { /* dropped while in flight (a failed commit): nothing to apply */
        fmx__reply_error(s, job->rq, "internal", "the episode was dropped");
    }
    fmx_step_outcome_clear(&job->outcome);
    fmx_step_plan_clear(&job->plan);
    fmx__request_free(s, job->rq);
    free(job);
    if (slot) fmx__drain_queue(s, slot);
}

/* A job handed to the pool ended: its client is charged what it used. */
static void fmx__job_done(fmx__server *s, fmx__job *job) {
    s->inflight--;
    fmx__client *c = job->rq->client;
    c->running--;
    c->vtime += job->used - job->charge;
    fmx__job_finish(s, job);
    fmx__sched_dispatch(s);
}

/* The pool finished a job: a step (phase 0), or the grade of the last
 * verified code after the budget's last step failed (phase 1). */
static void fmx__on_pool_done(void *ctx, void *ptr, fmx_pool_result *res) {
    fmx__server *s = ctx;
    fmx__job *job = ptr;
    job->used += res->ms / 1e3;
    if (res->fate != FMX_FATE_OK)
        fprintf(stderr, "fmx serve: episode %lld, %s: %s (%s)\n", (long long)job->episode,
                job->phase ? "grading the last verified code" : job->plan.tool,
                fmx_fate_name(res->fate), res->why);
    if (job->phase == 0) {
        job->rc = fmx_pool_outcome(s->pool, &job->plan, res, &job->outcome);
        if (job->rc == FMX_OK && fmx_pool_needs_fallback(&job->plan, res)) {
            job->phase = 1;
            if (fmx_pool_submit(s->pool,
                                fmx_worker_grade_request(&job->plan, job->plan.fallback_code,
                                                         job->plan.fallback_entry),
                                job) == FMX_OK)
                return; /* still in flight */
        }
    } else if (fmx_pool_fallback(&job->plan, res, &job->outcome) != FMX_OK) {
        job->rc = FMX_ENOMEM;
    }
    fmx__job_done(s, job);
}

/* ---- receiving ---- */

/* Reads one multipart message from the ROUTER: [identity, (empty,) body].
 * Returns 0 when none is waiting. */
static int fmx__recv(fmx__server *s) {
    zmq_msg_t frames[3];
    int n = 0, more = 1, extra = 0;
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, s->router, n == 0 && !extra ? ZMQ_DONTWAIT : 0) < 0) {
            zmq_msg_close(&m);
            if (n == 0) return 0;
            break;
        }
        more = zmq_msg_more(&m);
        if (n < 3)
            frames[n++] = m;
        else {
            extra++;
            zmq_msg_close(&m);
        }
    }
    fmx__request *rq = calloc(1, sizeof *rq);
    if (!rq) {
        for (int i = 0; i < n; i++)
            zmq_msg_close(&frames[i]);
        s->dropped++;
        return 1;
    }
    rq->t_unix = fmx__unix();
    rq->t_mono = fmx__mono();
    size_t idlen = zmq_msg_size(&frames[0]);
    if (idlen > FMX__MAX_IDENTITY) idlen = FMX__MAX_IDENTITY;
    memcpy(rq->env.id, zmq_msg_data(&frames[0]), idlen);
    rq->env.id_len = idlen;
    rq->env.delim = n >= 3 && zmq_msg_size(&frames[1]) == 0;
    const zmq_msg_t *body = n >= 2 ? &frames[n - 1] : NULL;
    char err[512];
    if (n < 2 || extra || (n == 3 && !rq->env.delim)) {
        fmx__reply_error(s, rq, "bad_message",
                         "a request is one frame holding one msgpack map (after a REQ socket's "
                         "empty delimiter)");
        s->requests++;
        fmx__request_free(s, rq);
    } else if (fmx_proto_decode(zmq_msg_data((zmq_msg_t *)body), zmq_msg_size((zmq_msg_t *)body),
                                &rq->body, &rq->req, &rq->has_req, err, sizeof err) != FMX_OK) {
        fmx__reply_error(s, rq, "bad_message", "%s", err);
        s->requests++;
        fmx__request_free(s, rq);
    } else if (rq->env.id_len != 5 || rq->env.id[0] != 0) {
        /* ZeroMQ's own ids are a zero byte and 4 bytes; anything else was
         * set by the client (ZMQ_ROUTING_ID). */
        fmx__reply_error(s, rq, "routing_id_refused",
                         "this connection set its own routing id (ZMQ_ROUTING_ID, %zu bytes); the "
                         "server assigns routing ids, so that no client can take another's: "
                         "connect without setting one",
                         rq->env.id_len);
        s->requests++;
        fmx__request_free(s, rq);
    } else {
        /* The connection a message came over (its socket; -1 for inproc). */
        int fd = zmq_msg_get((zmq_msg_t *)body, ZMQ_SRCFD);
        rq->client = fmx__client_get(s, &rq->env, fd);
        if (!rq->client) {
            fmx__reply_error(s, rq, "internal", "out of memory");
            s->requests++;
            fmx__request_free(s, rq);
        } else if (rq->client->fd >= 0 && fd >= 0 && rq->client->fd != fd) {
            /* Another connection presented an id in use (ZeroMQ hands an id
             * over to the newest connection that claims it): it gets neither
             * the id's episodes nor silence. */
            fmx__reply_error(s, rq, "routing_id_refused",
                             "another connection is using this routing id; the server assigns "
                             "routing ids: connect without setting ZMQ_ROUTING_ID");
            s->requests++;
            fmx__request_free(s, rq);
        } else {
            fmx__handle(s, rq);
        }
    }
    for (int i = 0; i < n; i++)
        zmq_msg_close(&frames[i]);
    return 1;
}

/* ---- set-up and the loop ---- */

static cJSON *fmx__build_spec(const fmx_serve_config *cfg) {
    cJSON *spec = cJSON_CreateObject();
    cJSON_AddNumberToObject(spec, "protocol", FMX_PROTO_VERSION);
    cJSON_AddItemToObject(spec, "tools", fmx_tools_spec());
    cJSON_AddItemToObject(spec, "tools_strict", fmx_tools_spec_strict());
    cJSON_AddStringToObject(spec, "system_prompt", fmx_tools_system_prompt());
    cJSON_AddStringToObject(
        spec, "observation",
        "A map {tool, text, data, error?}: text is what the policy reads, data the same content "
        "structured, error a short code when the action was refused (unknown_tool, bad_args, "
        "unknown_path, hidden_probe, out_of_range, code_too_long) or an evaluation did not "
        "finish (timeout, oom, crashed); such a step still counts but does not end the episode, "
        "except a submit whose evaluation did not finish: it scores 0 and ends it.");
    cJSON_AddStringToObject(
        spec, "action",
        "A map {tool: STR, args: MAP}: one call of one of the tools, with arguments as in the "
        "tool's parameters schema.");
    cJSON *b = cJSON_AddObjectToObject(spec, "budget");
    cJSON_AddNumberToObject(b, "max_steps", cfg->budget.max_steps);
    cJSON_AddNumberToObject(b, "max_code_bytes", (double)cfg->budget.max_code_bytes);
    cJSON_AddNumberToObject(b, "max_observation_bytes", (double)cfg->budget.max_observation);
    cJSON *fields = cJSON_Parse(fmx_log_step_fields_json());
    cJSON_AddItemToObject(spec, "step_fields", fields ? fields : cJSON_CreateArray());
    return spec;
}

fmx_serve_config fmx_serve_config_default(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return (fmx_serve_config){.tasks_dir = NULL,
                              .db_path = "fmx.db",
                              .bind = "tcp://127.0.0.1:5555",
                              .workers = n > 0 ? (int)n : 1,
                              .worker_threads = 1,
                              .worker_mem_mb = 4096,
                              .eval_timeout_s = 30,
                              .worker_exec = 0,
                              .curve_secret_key = NULL,
                              .insecure = 0,
                              .budget = fmx_budget_default(),
                              .reward_path = NULL,
                              .device = "cpu",
                              .shutdown_wait_s = 30,
                              .idle_timeout_s = 600,
                              .max_client_evals = 128,
                              .max_queued_mb = 256};
}

static void fmx__teardown(fmx__server *s) {
    /* Jobs still queued or running past the shutdown wait: their workers
     * are killed with the rest. */
    for (fmx__job *j; s->pool && (j = fmx_pool_take(s->pool));) {
        fmx_step_outcome_clear(&j->outcome);
        fmx_step_plan_clear(&j->plan);
        fmx__request_free(s, j->rq);
        free(j);
    }
    while (s->backlog) { /* jobs that never got a worker */
        fmx__job *j = fmx__sched_pop(s, &s->backlog);
        fmx_step_plan_clear(&j->plan);
        fmx__request_free(s, j->rq);
        free(j);
    }
    fmx_pool_destroy(s->pool);
    free(s->items);
    free(s->fds);
    for (size_t i = 0; s->buckets && i < s->nbuckets; i++)
        for (fmx__slot *e = s->buckets[i], *next; e; e = next) {
            next = e->hnext;
            for (fmx__request *rq = e->qhead, *q; rq; rq = q) {
                q = rq->next;
                fmx__request_free(s, rq);
            }
            fmx__slot_release(s, e);
            fmx_episode_destroy(e->ep);
            free(e);
        }
    free(s->buckets);
    for (size_t i = 0; s->cbuckets && i < s->ncbuckets; i++)
        for (fmx__client *c = s->cbuckets[i], *next; c; c = next) {
            next = c->hnext;
            free(c);
        }
    free(s->cbuckets);
    for (int i = 0; i < s->npolicies; i++)
        free(s->policies[i].name);
    free(s->policies);
    for (int i = 0; s->goals && i < fmx_tasks_count(s->tasks); i++)
        cJSON_Delete(s->goals[i]);
    free(s->goals);
    cJSON_Delete(s->spec);
    cJSON_Delete(s->task_list);
    free(s->replies);
    if (s->router) zmq_close(s->router);
    if (s->zctx) zmq_ctx_term(s->zctx);
    fmx_log_close(s->log);
    fmx_tasks_close(s->tasks);
}

/* Aborts open episodes that have had no request for --idle-timeout seconds
 * (none running or waiting): logged `aborted`, like a close; their steps
 * stay logged, and later requests get episode_over. Runs at most every
 * quarter of the timeout (and every second). */
static void fmx__idle_scan(fmx__server *s) {
    double idle = s->cfg->idle_timeout_s, now = fmx__mono();
    if (idle <= 0 || now < s->next_idle_scan) return;
    s->next_idle_scan = now + (idle / 4 < 1 ? idle / 4 : 1);
    fmx__slot **idlers = NULL;
    size_t n = 0, cap = 0;
    for (size_t i = 0; i < s->nbuckets; i++)
        for (fmx__slot *e = s->buckets[i]; e; e = e->hnext) {
            if (fmx_episode_status_of(e->ep) != FMX_EP_OPEN || e->busy || e->qhead ||
                now - e->active < idle)
                continue;
            if (n == cap) {
                size_t c2 = cap ? 2 * cap : 16;
                fmx__slot **g = realloc(idlers, c2 * sizeof *g);
                if (!g) break;
                idlers = g;
                cap = c2;
            }
            idlers[n++] = e;
        }
    /* Ending them may drop old ended episodes from the table: not during the walk. */
    for (size_t k = 0; k < n; k++) {
        fmx__slot *e = idlers[k];
        int rc = fmx__tx(s);
        if (rc == FMX_OK) rc = fmx_log_episode_end(s->log, e->id, "aborted", 0);
        if (rc != FMX_OK) break; /* the log refuses: try again at the next scan */
        fmx_episode_abort(e->ep);
        e->idled = 1;
        s->idle_aborted++;
        fmx__ended(s, e);
        if (k + 1 == n)
            fprintf(stderr, "fmx serve: %zu episodes aborted after %g s without a request\n", n,
                    idle);
    }
    free(idlers);
}

/* Marks every open episode aborted in the log and answers queued requests. */
static void fmx__abort_all(fmx__server *s) {
    fmx__tx(s);
    for (size_t i = 0; i < s->nbuckets; i++)
        for (fmx__slot *e = s->buckets[i]; e; e = e->hnext) {
            for (fmx__request *rq = e->qhead, *next; rq; rq = next) {
                next = rq->next;
                fmx__reply_error(s, rq, "shutting_down", "the server is shutting down");
                fmx__request_free(s, rq);
            }
            e->qhead = e->qtail = NULL;
            e->nqueued = 0;
            if (fmx_episode_status_of(e->ep) == FMX_EP_OPEN) {
                fmx_log_episode_end(s->log, e->id, "aborted", 0);
                fmx_episode_abort(e->ep);
                s->open_episodes--;
                fmx__slot_release(s, e);
            }
        }
}

/* ---- the bind rule and CURVE keys ---- */

int fmx_serve_is_loopback(const char *addr) {
    if (strncmp(addr, "ipc://", 6) == 0 || strncmp(addr, "inproc://", 9) == 0) return 1;
    if (strncmp(addr, "tcp://", 6) != 0 || strchr(addr, ';')) return 0;
    const char *h = addr + 6, *colon = strrchr(h, ':');
    if (!colon) return 0;
    size_t n = (size_t)(colon - h);
    if ((n == 5 && strncmp(h, "[::1]", 5) == 0) || (n == 9 && strncmp(h, "localhost", 9) == 0) ||
        (n == 2 && strncmp(h, "lo", 2) == 0))
        return 1;
    /* 127.a.b.c: the whole 127/8 block is loopback */
    if (n < 7 || strncmp(h, "127.", 4) != 0) return 0;
    int dots = 0;
    for (const char *c = h + 3; c < colon; c++) {
        if (*c == '.') {
            if (c + 1 == colon || c[1] == '.') return 0;
            dots++;
        } else if (*c < '0' || *c > '9') {
            return 0;
        }
    }
    return dots == 3;
}

/* Reads a CURVE secret key (Z85, 40 characters): a `secret-key = KEY`
 * line of `fmx keygen`'s file, or the bare key. */
static int fmx__read_secret_key(const char *path, unsigned char key[32], char *err, size_t errsz) {
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errsz, "%s: %s", path, strerror(errno));
        return FMX_EIO;
    }
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && (st.st_mode & 077))
        fprintf(stderr, "fmx serve: warning: %s is readable by other users (chmod 600 it)\n", path);
    char line[512], z85[41] = "";
    while (fgets(line, sizeof line, f)) {
        char *v = line;
        if (strncmp(v, "secret-key", 10) == 0) {
            v += 10;
            while (*v == ' ' || *v == '\t' || *v == '=')
                v++;
        } else if (line[0] == '#' || strncmp(line, "public-key", 10) == 0) {
            continue;
        }
        size_t k = strcspn(v, " \t\r\n");
        if (k == 40) {
            memcpy(z85, v, 40);
            z85[40] = 0;
            break;
        }
    }
    fclose(f);
    if (!z85[0] || !zmq_z85_decode(key, z85)) {
        snprintf(err, errsz,
                 "%s: no CURVE secret key (a `secret-key = KEY` line with a 40-character Z85 "
                 "key, as `fmx keygen` writes)",
                 path);
        return FMX_EFORMAT;
    }
    return FMX_OK;
}

int fmx_serve_keygen_main(int argc, char **argv) {
    const char *out = NULL;
    for (int i = 1; i < argc; i++) {
        if ((strcmp(argv[i], "-o") == 0 || strcmp(argv[i], "--output") == 0) && i + 1 < argc) {
            out = argv[++i];
        } else {
            fprintf(stderr, "usage: fmx keygen [-o FILE]   a CURVE key pair for fmx serve "
                            "--curve-secret-key FILE\n");
            return strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0 ? 0 : 2;
        }
    }
    char pub[41], sec[41];
    if (!zmq_has("curve") || zmq_curve_keypair(pub, sec) != 0) {
        fprintf(stderr, "fmx keygen: this libzmq has no CURVE support\n");
        return 2;
    }
    char text[256];
    snprintf(text, sizeof text,
             "# fmx CURVE key pair (ZeroMQ, Z85). The secret key is for fmx serve "
             "--curve-secret-key; clients need only the public key.\n"
             "public-key = %s\nsecret-key = %s\n",
             pub, sec);
    if (!out) {
        fputs(text, stdout);
        return 0;
    }
    int fd = open(out, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
        fprintf(stderr, "fmx keygen: %s: %s\n", out, strerror(errno));
        if (fd >= 0 && !f) close(fd);
        return 2;
    }
    printf("public-key = %s\n", pub);
    return 0;
}

int fmx_serve(const fmx_serve_config *cfg) {
    fmx__server srv = {0}, *s = &srv;
    s->cfg = cfg;
    s->started = fmx__mono();
    char err[2048];
    int status = 2;

    /* The bind rule: anything but loopback needs CURVE or --insecure. */
    unsigned char curve_key[32];
    if (cfg->curve_secret_key &&
        fmx__read_secret_key(cfg->curve_secret_key, curve_key, err, sizeof err) != FMX_OK) {
        fprintf(stderr, "fmx serve: --curve-secret-key %s\n", err);
        return 2;
    }
    if (cfg->curve_secret_key && !zmq_has("curve")) {
        fprintf(stderr, "fmx serve: --curve-secret-key: this libzmq has no CURVE support\n");
        return 2;
    }
    if (!fmx_serve_is_loopback(cfg->bind) && !cfg->curve_secret_key && !cfg->insecure) {
        fprintf(stderr,
                "fmx serve: refusing to bind %s: it is not a loopback address, and anyone who "
                "can reach it could run episodes (and candidate code) on this machine. Use "
                "--curve-secret-key FILE (encryption and server authentication; `fmx keygen -o "
                "FILE` makes a key pair, clients set the public key as their CURVE server key) "
                "or, on a network you trust, --insecure.\n",
                cfg->bind);
        return 2;
    }

    s->reward = fmx_reward_config_default();
    if (cfg->reward_path &&
        fmx_reward_config_load(cfg->reward_path, &s->reward, err, sizeof err) != FMX_OK) {
        fprintf(stderr, "fmx serve: --reward %s: %s\n", cfg->reward_path, err);
        return 2;
    }
    if (fmx_engine_set_device(cfg->device, err, sizeof err) != FMX_OK) {
        fprintf(stderr, "fmx serve: %s\n", err);
        return 2;
    }
    if (fmx_tasks_open(cfg->tasks_dir, &s->tasks, stderr, err, sizeof err) != FMX_OK) {
        fprintf(stderr, "fmx serve: %s\n", err);
        return 2;
    }
    /* The workers fork now: after the packs (shared copy-on-write), before
     * the log and ZeroMQ exist (they are closed in replacements too). */
    fmx_pool_config pc = fmx_pool_config_default();
    pc.workers = cfg->workers > 0 ? cfg->workers : 1;
    pc.threads = cfg->worker_threads > 0 ? cfg->worker_threads : 1;
    pc.mem_mb = cfg->worker_mem_mb;
    pc.eval_timeout_s = cfg->eval_timeout_s > 0 ? cfg->eval_timeout_s : 30;
    pc.exec = cfg->worker_exec;
    pc.tasks_dir = cfg->tasks_dir;
    pc.device = cfg->device;
    pc.reward_path = cfg->reward_path;
    if (fmx_pool_create(&pc, s->tasks, &s->reward, &s->pool, err, sizeof err) != FMX_OK) {
        fprintf(stderr, "fmx serve: %s\n", err);
        goto out;
    }
    s->items = calloc((size_t)pc.workers + 1, sizeof *s->items);
    s->fds = calloc((size_t)pc.workers, sizeof *s->fds);
    if (!s->items || !s->fds) {
        fprintf(stderr, "fmx serve: out of memory\n");
        goto out;
    }
    if (fmx_log_open(cfg->db_path, &s->log, err, sizeof err) != FMX_OK) {
        fprintf(stderr, "fmx serve: --db %s: %s\n", cfg->db_path, err);
        goto out;
    }
    int64_t aborted = 0;
    int rc = fmx_log_begin(s->log);
    if (rc == FMX_OK) rc = fmx_log_abort_open(s->log, &aborted);
    for (int i = 0; rc == FMX_OK && i < fmx_tasks_count(s->tasks); i++) {
        const fmx_task *t = fmx_tasks_get(s->tasks, i);
        rc = fmx_log_task(s->log, t->id, t->kind, t->pack_name, t->path, t->cls, t->target_loc);
    }
    if (rc == FMX_OK) rc = fmx_log_commit(s->log);
    if (rc != FMX_OK) {
        fprintf(stderr, "fmx serve: --db %s: %s\n", cfg->db_path, fmx_log_errmsg(s->log));
        goto out;
    }
    if (aborted)
        fprintf(stderr, "fmx serve: %lld episodes left open by an earlier run marked aborted\n",
                (long long)aborted);
    s->spec = fmx__build_spec(cfg);
    s->task_list = fmx_tasks_json(s->tasks);
    s->goals = calloc((size_t)fmx_tasks_count(s->tasks), sizeof *s->goals);
    s->nbuckets = 1024;
    s->buckets = calloc(s->nbuckets, sizeof *s->buckets);
    s->ncbuckets = 256;
    s->cbuckets = calloc(s->ncbuckets, sizeof *s->cbuckets);
    s->charge_s = pc.eval_timeout_s;
    s->max_queued_bytes = (size_t)(cfg->max_queued_mb > 0 ? cfg->max_queued_mb : 256) << 20;
    s->max_client_evals = cfg->max_client_evals > 0 ? cfg->max_client_evals : 128;
    if (!s->spec || !s->task_list || !s->goals || !s->buckets || !s->cbuckets) {
        fprintf(stderr, "fmx serve: out of memory\n");
        goto out;
    }

    /* Signals go to this thread only: block them before ZeroMQ's threads
     * start (they inherit the mask), then unblock here. */
    sigset_t sigs, old;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, &old);
    struct sigaction sa = {0};
    sa.sa_handler = fmx__on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    /* ZeroMQ numbers connections that set no routing id from a value it
     * draws with rand() when the socket is made: seeded from the kernel,
     * or every server counts from the same value, and a client that set
     * the id the next connection will get makes libzmq abort the server. */
    unsigned seed;
    if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed)
        seed = (unsigned)getpid() ^ (unsigned)(fmx__unix() * 1e6);
    srand(seed);
    s->zctx = zmq_ctx_new();
    s->router = s->zctx ? zmq_socket(s->zctx, ZMQ_ROUTER) : NULL;
    if (!s->router) {
        fprintf(stderr, "fmx serve: zeromq: %s\n", zmq_strerror(errno));
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        goto out;
    }
    int one = 1, linger = 1000, hwm = 100000;
    int64_t maxmsg = FMX__ZMQ_MAXMSG;
    zmq_setsockopt(s->router, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    /* A connection that presents an id in use takes it over (instead of
     * being ignored in silence), so the server sees it and refuses it
     * (fmx__recv: the id's connection changed). */
    zmq_setsockopt(s->router, ZMQ_ROUTER_HANDOVER, &one, sizeof one);
    zmq_setsockopt(s->router, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    zmq_setsockopt(s->router, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s->router, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(s->router, ZMQ_RCVHWM, &hwm, sizeof hwm);
    if (cfg->curve_secret_key &&
        (zmq_setsockopt(s->router, ZMQ_CURVE_SERVER, &one, sizeof one) != 0 ||
         zmq_setsockopt(s->router, ZMQ_CURVE_SECRETKEY, curve_key, sizeof curve_key) != 0)) {
        fprintf(stderr, "fmx serve: CURVE: %s\n", zmq_strerror(errno));
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        goto out;
    }
    memset(curve_key, 0, sizeof curve_key);
    if (zmq_bind(s->router, cfg->bind) != 0) {
        fprintf(stderr, "fmx serve: cannot bind %s: %s\n", cfg->bind, zmq_strerror(errno));
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        goto out;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    fprintf(stderr,
            "fmx serve: %d tasks from %d packs; listening on %s%s (%d worker processes, "
            "%g s/%ld MiB per evaluation, log %s, %s)\n",
            fmx_tasks_count(s->tasks), fmx_tasks_npacks(s->tasks), cfg->bind,
            cfg->curve_secret_key ? " with CURVE" : "", pc.workers, pc.eval_timeout_s, pc.mem_mb,
            cfg->db_path, fmx_engine_version());
    fflush(stderr);

    double deadline = 0;
    for (;;) {
        if (fmx__signal && !s->shutting_down) {
            s->shutting_down = 1;
            deadline = fmx__mono() + cfg->shutdown_wait_s;
            fprintf(stderr, "fmx serve: signal %d: finishing %d jobs in flight, then stopping\n",
                    (int)fmx__signal, s->inflight);
            /* Jobs that have no worker yet are not started. */
            fmx__sched_cancel(s, "shutting_down", "the server is shutting down");
        }
        if (s->shutting_down && (s->inflight == 0 || fmx__mono() > deadline)) break;
        s->items[0] = (zmq_pollitem_t){s->router, 0, ZMQ_POLLIN, 0};
        int nfd = fmx_pool_fds(s->pool, s->fds, pc.workers);
        for (int i = 0; i < nfd; i++)
            s->items[1 + i] = (zmq_pollitem_t){NULL, s->fds[i], ZMQ_POLLIN, 0};
        int n =
            zmq_poll(s->items, 1 + nfd, fmx_pool_wait_ms(s->pool, s->shutting_down ? 100 : 1000));
        if (n < 0 && errno != EINTR) {
            fprintf(stderr, "fmx serve: poll: %s\n", zmq_strerror(errno));
            break;
        }
        /* Finished jobs first: they free episodes whose requests wait. */
        fmx_pool_service(s->pool, fmx__on_pool_done, s);
        for (int i = 0; i < FMX__TURN_MAX && fmx__recv(s); i++) {
        }
        /* Jobs the requests just queued go out now, not after the next poll. */
        fmx__sched_dispatch(s);
        fmx_pool_service(s->pool, fmx__on_pool_done, s);
        if (!s->shutting_down) fmx__idle_scan(s);
        fmx__flush(s);
    }
    if (s->inflight)
        fprintf(stderr, "fmx serve: %d jobs still running after %.0f s; not waiting\n", s->inflight,
                cfg->shutdown_wait_s);
    fmx__abort_all(s);
    fmx__flush(s);
    fprintf(stderr, "fmx serve: stopped after %lld steps\n", (long long)s->steps);
    status = 0;
out:
    fmx__teardown(s);
    return status;
}

/* ---- command line ---- */

static const char fmx__usage[] =
    "usage: fmx serve --tasks DIR [options]\n"
    "  --tasks DIR           directory of packs (subdirectories with task.json)\n"
    "  --db FILE             episode log, SQLite (default fmx.db)\n"
    "  --bind ADDR           ZeroMQ address (default tcp://127.0.0.1:5555; ipc://PATH works);\n"
    "                        anything but loopback needs --curve-secret-key or --insecure\n"
    "  --curve-secret-key FILE  CURVE encryption + server authentication (fmx keygen -o FILE)\n"
    "  --insecure            allow a non-loopback --bind without CURVE\n"
    "  --workers N           worker processes for verify_component/submit (default: CPU cores;\n"
    "                        --threads N is the old name)\n"
    "  --worker-threads N    intra-op threads of each worker (default 1)\n"
    "  --worker-mem MB       memory one evaluation may allocate (RLIMIT_AS; default 4096, 0: "
    "none)\n"
    "  --eval-timeout S      wall-clock limit of one evaluation, seconds (default 30)\n"
    "  --max-client-evals N  verify_component/submit steps one client (connection) may have\n"
    "                        waiting or running; more get `busy` (default 128)\n"
    "  --max-queued-mb MB    memory of requests waiting (behind a running step, or for a\n"
    "                        worker), all clients; one client may hold a quarter; more get\n"
    "                        `busy` (default 256)\n"
    "  --idle-timeout S      abort an open episode after S seconds without a request\n"
    "                        (default 600; 0: never)\n"
    "  --worker-exec         start workers with fork+exec (the default on cuda)\n"
    "  --max-steps N         steps per episode (default 40)\n"
    "  --max-code-bytes N    largest candidate file (default 65536)\n"
    "  --max-observation-kb KB  a step observation's data as JSON is cut to KB KiB and its\n"
    "                        text to an eighth of that, with a note (default 1024)\n"
    "  --reward FILE         reward config (key = value lines; default: built in)\n"
    "  --device DEV          cpu or cuda[:N] (default cpu)\n";

static int fmx__posint(const char *s, long max, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < 1 || v > max) return 0;
    *out = v;
    return 1;
}

static int fmx__seconds(const char *s, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v > 0) || v > 86400) return 0;
    *out = v;
    return 1;
}

int fmx_serve_main(int argc, char **argv) {
    fmx_serve_config cfg = fmx_serve_config_default();
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            fputs(fmx__usage, stdout);
            return 0;
        }
        if (strcmp(a, "--insecure") == 0) {
            cfg.insecure = 1;
            continue;
        }
        if (strcmp(a, "--worker-exec") == 0) {
            cfg.worker_exec = 1;
            continue;
        }
        if (i + 1 >= argc || a[0] != '-') {
            fprintf(stderr, "fmx serve: %s '%s'\n\n%s",
                    a[0] == '-' ? "missing value for" : "unexpected argument", a, fmx__usage);
            return 2;
        }
        const char *v = argv[++i];
        long n = 0;
        if (strcmp(a, "--tasks") == 0)
            cfg.tasks_dir = v;
        else if (strcmp(a, "--db") == 0)
            cfg.db_path = v;
        else if (strcmp(a, "--bind") == 0)
            cfg.bind = v;
        else if (strcmp(a, "--reward") == 0)
            cfg.reward_path = v;
        else if (strcmp(a, "--device") == 0)
            cfg.device = v;
        else if ((strcmp(a, "--workers") == 0 || strcmp(a, "--threads") == 0) &&
                 fmx__posint(v, 1024, &n))
            cfg.workers = (int)n;
        else if (strcmp(a, "--worker-threads") == 0 && fmx__posint(v, 1024, &n))
            cfg.worker_threads = (int)n;
        else if (strcmp(a, "--worker-mem") == 0 &&
                 (strcmp(v, "0") == 0 || fmx__posint(v, 1L << 30, &n)))
            cfg.worker_mem_mb = strcmp(v, "0") == 0 ? 0 : n;
        else if (strcmp(a, "--eval-timeout") == 0 && fmx__seconds(v, &cfg.eval_timeout_s))
            ;
        else if (strcmp(a, "--idle-timeout") == 0 &&
                 (strcmp(v, "0") == 0 || fmx__seconds(v, &cfg.idle_timeout_s)))
            cfg.idle_timeout_s = strcmp(v, "0") == 0 ? 0 : cfg.idle_timeout_s;
        else if (strcmp(a, "--max-client-evals") == 0 && fmx__posint(v, 1 << 20, &n))
            cfg.max_client_evals = (int)n;
        else if (strcmp(a, "--max-queued-mb") == 0 && fmx__posint(v, 1L << 20, &n))
            cfg.max_queued_mb = n;
        else if (strcmp(a, "--curve-secret-key") == 0)
            cfg.curve_secret_key = v;
        else if (strcmp(a, "--max-steps") == 0 && fmx__posint(v, 1000000, &n))
            cfg.budget.max_steps = (int)n;
        else if (strcmp(a, "--max-code-bytes") == 0 && fmx__posint(v, 4 << 20, &n))
            cfg.budget.max_code_bytes = (size_t)n;
        else if (strcmp(a, "--max-observation-kb") == 0 && fmx__posint(v, 1 << 20, &n))
            cfg.budget.max_observation = (size_t)n << 10;
        else {
            fprintf(stderr, "fmx serve: bad option %s %s\n\n%s", a, v, fmx__usage);
            return 2;
        }
    }
    if (!cfg.tasks_dir) {
        fprintf(stderr, "fmx serve: --tasks DIR is required\n\n%s", fmx__usage);
        return 2;
    }
    return fmx_serve(&cfg);
}
