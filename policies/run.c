/*
 * run.c — `fmx run` (run.h): start a server (or connect to one), play N
 * episodes of each chosen policy on every task with a few concurrent
 * clients, stop the server, print the leaderboard of the log.
 *
 * The server it starts is this very binary (`/proc/self/exe serve ...`) on
 * ipc://TMP/serve.sock, its output kept in TMP/serve.log and shown only if
 * it fails; it is stopped with SIGTERM, which logs any episode still open
 * as aborted.
 */
#define _GNU_SOURCE
#include "run.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "env/progress.h"
#include "env/status.h"
#include "episodes/leaderboard.h"
#include "llm.h"

#define FMX__MAX_POLICIES 8
#define FMX__START_WAIT_S 120 /* a server opening big packs takes a while */

static const struct {
    const char *name;
    fmx_policy_fn fn;
} fmx__policies[] = {{"oracle", fmx_policy_oracle},
                     {"null", fmx_policy_null},
                     {"tracer", fmx_policy_tracer},
                     {"llm", fmx_policy_llm}};
#define FMX__NPOLICIES ((int)(sizeof fmx__policies / sizeof fmx__policies[0]))

#define FMX__MAX_TASKS 256 /* --task options */

typedef struct {
    const char *policies[FMX__MAX_POLICIES];
    fmx_policy_fn fns[FMX__MAX_POLICIES];
    int npolicies;
    const char *tasks_dir, *db, *connect, *solutions;
    const char *only_tasks[FMX__MAX_TASKS]; /* --task, repeatable (also ID,ID,...) */
    int nonly;
    int episodes, jobs, verbose;
    fmx_llm_config llm; /* --policy llm */
    int uses_llm;
} fmx__run_opts;

static double fmx__now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- the server ---- */

typedef struct {
    pid_t pid;
    char dir[256], addr[320], sock[300], log[300];
} fmx__server;

/* Prints the server's log to stderr. */
static void fmx__show_log(const fmx__server *s) {
    FILE *f = fopen(s->log, "r");
    if (!f) return;
    char line[1024];
    while (fgets(line, sizeof line, f))
        fprintf(stderr, "  | %s", line);
    fclose(f);
}

/* Starts `fmx serve` from this binary and waits until it answers hello. */
static int fmx__start(fmx__server *s, const fmx__run_opts *o, char *err, size_t errsz) {
    memset(s, 0, sizeof *s);
    s->pid = -1;
    const char *tmp = getenv("TMPDIR");
    snprintf(s->dir, sizeof s->dir, "%s/fmx-run-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(s->dir)) {
        snprintf(err, errsz, "cannot make a temporary directory: %s", strerror(errno));
        return FMX_EIO;
    }
    snprintf(s->sock, sizeof s->sock, "%s/serve.sock", s->dir);
    snprintf(s->log, sizeof s->log, "%s/serve.log", s->dir);
    snprintf(s->addr, sizeof s->addr, "ipc://%s", s->sock);
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) {
        snprintf(err, errsz, "cannot find this program's binary: %s", strerror(errno));
        return FMX_EIO;
    }
    self[n] = '\0';
    fflush(stdout);
    fflush(stderr);
    s->pid = fork();
    if (s->pid < 0) {
        snprintf(err, errsz, "fork: %s", strerror(errno));
        return FMX_EIO;
    }
    if (s->pid == 0) {
        int fd = open(s->log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, STDOUT_FILENO);
            dup2(fd, STDERR_FILENO);
            close(fd);
        }
        execl(self, "fmx", "serve", "--tasks", o->tasks_dir, "--db", o->db, "--bind", s->addr,
              (char *)NULL);
        fprintf(stderr, "fmx run: cannot run %s: %s\n", self, strerror(errno));
        _exit(127);
    }
    return FMX_OK;
}

/* Waits until the server answers hello (it may still be opening packs). */
static int fmx__await(fmx__server *s, fmx_client *c, char *err, size_t errsz) {
    double deadline = fmx__now() + FMX__START_WAIT_S;
    fmx_client_set_timeout(c, 200);
    for (;;) {
        cJSON *r = NULL;
        int rc = fmx_client_hello(c, &r);
        cJSON_Delete(r);
        if (rc == FMX_OK) break;
        int status;
        if (waitpid(s->pid, &status, WNOHANG) == s->pid) {
            s->pid = -1;
            snprintf(err, errsz, "fmx serve exited (status %d) before answering; its output:",
                     WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
            return FMX_EIO;
        }
        if (strcmp(fmx_client_errcode(c), "timeout") != 0 || fmx__now() > deadline) {
            snprintf(err, errsz, "fmx serve does not answer on %s: %s", s->addr,
                     fmx_client_errmsg(c));
            return FMX_EIO;
        }
    }
    fmx_client_set_timeout(c, 600 * 1000);
    return FMX_OK;
}

/* SIGTERM, then waits (SIGKILL after 60 s); removes the temporary files.
 * Returns the server's exit status (-1 when it had to be killed). */
static int fmx__stop(fmx__server *s) {
    int code = 0;
    if (s->pid > 0) {
        kill(s->pid, SIGTERM);
        double deadline = fmx__now() + 60;
        int status = 0;
        pid_t w;
        while ((w = waitpid(s->pid, &status, WNOHANG)) == 0 && fmx__now() < deadline)
            usleep(20 * 1000);
        if (w == 0) {
            kill(s->pid, SIGKILL);
            waitpid(s->pid, &status, 0);
            code = -1;
        } else {
            code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        }
        s->pid = -1;
    }
    if (code != 0) fmx__show_log(s);
    if (s->dir[0]) {
        unlink(s->sock);
        unlink(s->log);
        rmdir(s->dir);
    }
    return code;
}

/* ---- playing ---- */

const char *fmx_policy_begin(const cJSON *task, fmx_episode_result *res, char *err, size_t errsz) {
    memset(res, 0, sizeof *res);
    res->correctness = -1;
    const char *id = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(task, "id"));
    if (!id) snprintf(err, errsz, "a task without id");
    return id;
}

/* The work: every (policy, task, episode) triple, handed out in order. */
typedef struct {
    const fmx__run_opts *o;
    const char *addr;
    const cJSON *tasks;
    int ntasks, total;
    fmx_policy_ctx ctx;
    pthread_mutex_t mu;
    int next;
    /* results */
    int done, failed, oracle_misses;
    fmx_progress *progress; /* episodes k/N on stderr */
    double *reward_sum;     /* per policy */
    int *ended;             /* per policy */
} fmx__work;

static void *fmx__player(void *arg) {
    fmx__work *w = arg;
    char err[2048];
    fmx_client *c = NULL;
    if (fmx_client_open(w->addr, 600 * 1000, &c, err, sizeof err) != FMX_OK) {
        fprintf(stderr, "fmx run: %s\n", err);
        pthread_mutex_lock(&w->mu);
        w->failed++;
        pthread_mutex_unlock(&w->mu);
        return NULL;
    }
    for (;;) {
        pthread_mutex_lock(&w->mu);
        int k = w->next < w->total ? w->next++ : -1;
        pthread_mutex_unlock(&w->mu);
        if (k < 0) break;
        /* k = (policy · ntasks + task) · episodes + episode */
        int e = k % w->o->episodes;
        int t = (k / w->o->episodes) % w->ntasks;
        int p = k / w->o->episodes / w->ntasks;
        const cJSON *task = cJSON_GetArrayItem(w->tasks, t);
        const char *id = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(task, "id"));
        fmx_episode_result res;
        int rc = w->o->fns[p](c, w->o->policies[p], task, e, &w->ctx, &res, err, sizeof err);
        int is_oracle = w->o->fns[p] == fmx_policy_oracle;
        fmx_progress_step(w->progress, id);
        pthread_mutex_lock(&w->mu);
        w->done++;
        if (rc != FMX_OK) {
            w->failed++;
            fprintf(stderr, "fmx run: %s on %s: %s\n", w->o->policies[p], id, err);
        } else {
            w->reward_sum[p] += res.reward;
            w->ended[p]++;
            if (is_oracle && res.correctness < 1) {
                w->oracle_misses++;
                fprintf(stderr,
                        "fmx run: the oracle's reference solution does not match %s "
                        "(episode %lld: correctness %.3f, verify %s)\n",
                        id, (long long)res.episode, res.correctness,
                        res.verified ? "matched" : "did not match");
            }
            if (w->o->verbose)
                printf("  %-8s %-36s episode %-6lld reward %.4f  correctness %.3f  steps %d%s\n",
                       w->o->policies[p], id, (long long)res.episode, res.reward, res.correctness,
                       res.steps, res.truncated ? "  (truncated)" : "");
        }
        pthread_mutex_unlock(&w->mu);
    }
    fmx_client_close(c);
    return NULL;
}

/* ---- the command ---- */

static const char fmx__usage[] =
    "usage: fmx run --policy NAME[,NAME...] [options]\n"
    "  --policy NAMES     oracle (the reference solution, verified then submitted) and/or\n"
    "                     null (submits nothing useful: reward 0) and/or tracer (writes the\n"
    "                     code from the op traces, no LLM: python3 -m fmx.tracer) and/or llm;\n"
    "                     repeat or separate by commas\n"
    "  --tasks DIR        packs to serve (default: packs); also where the oracle reads each\n"
    "                     pack's source to find its reference solution\n"
    "  --episodes N       episodes of each policy on each task (default 1)\n"
    "  --task ID          only this task; repeat it (or ID,ID,...) for several (default:\n"
    "                     every task list_tasks gives)\n"
    "  --connect ADDR     use a running server instead of starting one\n"
    "  --db FILE          episode log: the started server's (default fmx.db), or the one to\n"
    "                     read the leaderboard from with --connect (default: the server's)\n"
    "  --solutions DIR    where reference solutions NAME.py + NAME.entries.json are\n"
    "                     (default: examples/solutions beside the pack's model file)\n"
    "  --jobs N           concurrent clients (default: CPU cores)\n"
    "  --verbose          one line per episode\n"
    "the llm policy (an OpenAI-compatible chat endpoint; logged as llm:MODEL):\n"
    "  --base-url URL     e.g. http://127.0.0.1:8000/v1 (POST URL/chat/completions; required)\n"
    "  --model NAME       the request's model (required)\n"
    "  --api-key-env VAR  env var with the API key, sent as a Bearer token (default\n"
    "                     OPENAI_API_KEY; unset: no Authorization header)\n"
    "  --max-tokens N     per reply (default 4096; 0: not sent)\n"
    "  --token-budget N   per episode, sum of usage.total_tokens (default 200000; 0: none)\n"
    "  --temperature T    (default: the endpoint's)\n"
    "  --retries N        on 429, 5xx and transport errors, backoff from 1 s (default 4)\n"
    "  --request-timeout S  one request, seconds (default 300)\n"
    "  --transcripts DIR  per-episode JSON transcripts: messages, tool calls with their step\n"
    "                     index, assistant text, token usage (default: transcripts/ beside\n"
    "                     the --db)\n"
    "exit status: 0 every episode ended (and the oracle passed every task), 1 the oracle\n"
    "failed a task (its reference does not match the pack), 2 error\n";

static int fmx__pos(const char *s, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < 1 || v > 1000000) return 0;
    *out = (int)v;
    return 1;
}

static int fmx__add_policies(fmx__run_opts *o, char *list) {
    for (char *save = NULL, *name = strtok_r(list, ",", &save); name;
         name = strtok_r(NULL, ",", &save)) {
        int found = -1;
        for (int i = 0; i < FMX__NPOLICIES; i++)
            if (strcmp(fmx__policies[i].name, name) == 0) found = i;
        if (found < 0) {
            fprintf(stderr, "fmx run: unknown policy '%s' (oracle, null, tracer, llm)\n", name);
            return 0;
        }
        if (o->npolicies == FMX__MAX_POLICIES) {
            fprintf(stderr, "fmx run: at most %d policies\n", FMX__MAX_POLICIES);
            return 0;
        }
        if (fmx__policies[found].fn == fmx_policy_llm) o->uses_llm = 1;
        o->policies[o->npolicies] = fmx__policies[found].name;
        o->fns[o->npolicies++] = fmx__policies[found].fn;
    }
    return 1;
}

/* The llm policy's options: 1 when a is one (*ok: its value parsed). */
static int fmx__llm_option(fmx__run_opts *o, const char *a, const char *v, int *ok) {
    fmx_llm_config *l = &o->llm;
    char *end;
    errno = 0;
    if (strcmp(a, "--base-url") == 0)
        l->base_url = v;
    else if (strcmp(a, "--model") == 0)
        l->model = v;
    else if (strcmp(a, "--api-key-env") == 0)
        l->api_key_env = v;
    else if (strcmp(a, "--transcripts") == 0)
        l->transcripts_dir = v;
    else if (strcmp(a, "--temperature") == 0) {
        l->temperature = strtod(v, &end);
        *ok = !errno && end != v && !*end && l->temperature >= 0 && l->temperature <= 10;
    } else if (strcmp(a, "--token-budget") == 0) {
        long long n = strtoll(v, &end, 10);
        *ok = !errno && end != v && !*end && n >= 0;
        l->token_budget = n;
    } else if (strcmp(a, "--max-tokens") == 0) {
        long n = strtol(v, &end, 10);
        *ok = !errno && end != v && !*end && n >= 0 && n <= 10000000;
        l->max_tokens = (int)n;
    } else if (strcmp(a, "--retries") == 0) {
        long n = strtol(v, &end, 10);
        *ok = !errno && end != v && !*end && n >= 0 && n <= 100;
        l->retries = (int)n;
    } else if (strcmp(a, "--request-timeout") == 0)
        *ok = fmx__pos(v, &l->timeout_s);
    else
        return 0;
    return 1;
}

static int fmx__parse(int argc, char **argv, fmx__run_opts *o) {
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    *o = (fmx__run_opts){.tasks_dir = NULL,
                         .episodes = 1,
                         .jobs = ncpu > 0 ? (int)ncpu : 1,
                         .llm = fmx_llm_config_default()};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            fputs(fmx__usage, stdout);
            return 0;
        }
        if (strcmp(a, "--verbose") == 0) {
            o->verbose = 1;
            continue;
        }
        if (a[0] != '-' || i + 1 >= argc) {
            fprintf(stderr, "fmx run: %s '%s'\n\n%s",
                    a[0] == '-' ? "missing value for" : "unexpected argument", a, fmx__usage);
            return 2;
        }
        char *v = argv[++i];
        int ok = 1;
        if (strcmp(a, "--policy") == 0) {
            if (!fmx__add_policies(o, v)) return 2; /* it said why */
        } else if (strcmp(a, "--tasks") == 0)
            o->tasks_dir = v;
        else if (strcmp(a, "--db") == 0)
            o->db = v;
        else if (strcmp(a, "--connect") == 0)
            o->connect = v;
        else if (strcmp(a, "--solutions") == 0)
            o->solutions = v;
        else if (strcmp(a, "--task") == 0) {
            /* repeatable, and each may list several: --task A --task B,C */
            for (char *save, *id = strtok_r((char *)v, ",", &save); id && ok;
                 id = strtok_r(NULL, ",", &save)) {
                ok = o->nonly < FMX__MAX_TASKS;
                if (ok) o->only_tasks[o->nonly++] = id;
            }
        } else if (strcmp(a, "--episodes") == 0)
            ok = fmx__pos(v, &o->episodes);
        else if (strcmp(a, "--jobs") == 0)
            ok = fmx__pos(v, &o->jobs);
        else if (fmx__llm_option(o, a, v, &ok))
            ;
        else {
            fprintf(stderr, "fmx run: unknown option '%s'\n\n%s", a, fmx__usage);
            return 2;
        }
        if (!ok) {
            fprintf(stderr, "fmx run: bad value for %s: '%s'\n", a, v);
            return 2;
        }
    }
    if (o->npolicies == 0) {
        fprintf(stderr, "fmx run: --policy is required (oracle, null, tracer, llm)\n\n%s",
                fmx__usage);
        return 2;
    }
    if (o->uses_llm) {
        char err[512];
        if (fmx_llm_configure(&o->llm, err, sizeof err) != FMX_OK) {
            fprintf(stderr, "fmx run: %s\n", err);
            return 2;
        }
    }
    if (!o->connect && !o->tasks_dir) o->tasks_dir = "packs";
    if (!o->connect && !o->db) o->db = "fmx.db";
    return -1; /* go on */
}

/* The tasks to play: every task, or those --task names (in the order named). */
static cJSON *fmx__tasks(fmx_client *c, const fmx__run_opts *o, char *err, size_t errsz) {
    cJSON *tasks = NULL;
    if (fmx_client_list_tasks(c, &tasks) != FMX_OK) {
        snprintf(err, errsz, "list_tasks: %s", fmx_client_errmsg(c));
        return NULL;
    }
    if (o->nonly == 0) return tasks;
    cJSON *chosen = cJSON_CreateArray();
    for (int k = 0; chosen && k < o->nonly; k++) {
        const cJSON *found = NULL;
        for (const cJSON *t = tasks->child; t && !found; t = t->next) {
            const char *id = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(t, "id"));
            if (id && strcmp(id, o->only_tasks[k]) == 0) found = t;
        }
        int dup = 0;
        for (int j = 0; j < k; j++)
            dup |= strcmp(o->only_tasks[j], o->only_tasks[k]) == 0;
        if (!found) {
            snprintf(err, errsz, "the server has no task '%s' (list_tasks has %d tasks)",
                     o->only_tasks[k], cJSON_GetArraySize(tasks));
            cJSON_Delete(chosen);
            chosen = NULL;
        } else if (!dup) {
            cJSON_AddItemToArray(chosen, cJSON_Duplicate(found, 1));
        }
    }
    cJSON_Delete(tasks);
    return chosen;
}

/* Plays everything; returns the exit status part of the run (0, 1, 2). */
static int fmx__play(const fmx__run_opts *o, const char *addr, const cJSON *tasks) {
    fmx__work w = {.o = o, .addr = addr, .tasks = tasks};
    w.ntasks = cJSON_GetArraySize(tasks);
    w.total = o->npolicies * w.ntasks * o->episodes;
    w.ctx =
        (fmx_policy_ctx){.tasks_dir = o->tasks_dir, .solutions_dir = o->solutions, .addr = addr};
    double sums[FMX__MAX_POLICIES] = {0};
    int ended[FMX__MAX_POLICIES] = {0};
    w.reward_sum = sums;
    w.ended = ended;
    pthread_mutex_init(&w.mu, NULL);
    int nthreads = o->jobs < w.total ? o->jobs : w.total;
    pthread_t th[64];
    if (nthreads > 64) nthreads = 64;
    double t0 = fmx__now();
    w.progress = fmx_progress_create("episodes", w.total, 0);
    int started = 0;
    for (int i = 0; i < nthreads; i++)
        if (pthread_create(&th[started], NULL, fmx__player, &w) == 0) started++;
    if (started == 0 && w.total > 0) {
        fmx_progress_destroy(w.progress);
        fprintf(stderr, "fmx run: cannot start client threads\n");
        pthread_mutex_destroy(&w.mu);
        return 2;
    }
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    fmx_progress_destroy(w.progress);
    double dt = fmx__now() - t0;
    pthread_mutex_destroy(&w.mu);
    for (int p = 0; p < o->npolicies; p++)
        printf("%-8s %d episodes on %d tasks: mean reward %.4f\n", o->policies[p], ended[p],
               w.ntasks, ended[p] ? sums[p] / ended[p] : 0.0);
    printf("%d episodes in %.1f s with %d clients (%.1f episodes/s)\n\n", w.done, dt, started,
           dt > 0 ? w.done / dt : 0.0);
    fflush(stdout);
    return w.failed ? 2 : w.oracle_misses ? 1 : 0;
}

int fmx_run_main(int argc, char **argv) {
    fmx__run_opts o;
    int rc = fmx__parse(argc, argv, &o);
    if (rc >= 0) return rc;
    char err[2048];
    fmx__server srv = {.pid = -1};
    const char *addr = o.connect;
    char db_abs[PATH_MAX] = "";
    signal(SIGPIPE, SIG_IGN);
    if (!o.connect) {
        struct stat st;
        if (stat(o.tasks_dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
            fprintf(stderr, "fmx run: --tasks %s: not a directory (export packs with fmx export)\n",
                    o.tasks_dir);
            return 2;
        }
        if (fmx__start(&srv, &o, err, sizeof err) != FMX_OK) {
            fprintf(stderr, "fmx run: %s\n", err);
            fmx__stop(&srv);
            return 2;
        }
        addr = srv.addr;
    }
    fmx_client *c = NULL;
    int status = 2;
    cJSON *tasks = NULL;
    if (fmx_client_open(addr, 10 * 1000, &c, err, sizeof err) != FMX_OK) {
        fprintf(stderr, "fmx run: %s\n", err);
        goto out;
    }
    if (!o.connect) {
        if (fmx__await(&srv, c, err, sizeof err) != FMX_OK) {
            fprintf(stderr, "fmx run: %s\n", err);
            fmx__show_log(&srv);
            goto out;
        }
    } else {
        cJSON *h = NULL;
        if (fmx_client_health(c, &h) != FMX_OK) {
            fprintf(stderr, "fmx run: %s: %s\n", addr, fmx_client_errmsg(c));
            goto out;
        }
        /* The leaderboard reads the server's log unless --db says otherwise. */
        const char *db = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(h, "db"));
        if (!o.db && db) snprintf(db_abs, sizeof db_abs, "%s", db);
        cJSON_Delete(h);
    }
    if (o.db && !realpath(o.db, db_abs)) snprintf(db_abs, sizeof db_abs, "%s", o.db);
    tasks = fmx__tasks(c, &o, err, sizeof err);
    if (!tasks) {
        fprintf(stderr, "fmx run: %s\n", err);
        goto out;
    }
    fmx_client_close(c);
    c = NULL;
    /* The llm policy's transcripts: beside the episode log unless --transcripts. */
    char transcripts[PATH_MAX + 16] = "";
    if (o.uses_llm && !o.llm.transcripts_dir) {
        const char *slash = strrchr(db_abs, '/');
        if (slash)
            snprintf(transcripts, sizeof transcripts, "%.*s/transcripts", (int)(slash - db_abs),
                     db_abs);
        else
            snprintf(transcripts, sizeof transcripts, "transcripts");
        o.llm.transcripts_dir = transcripts;
        if (fmx_llm_configure(&o.llm, err, sizeof err) != FMX_OK) {
            fprintf(stderr, "fmx run: %s\n", err);
            goto out;
        }
    }
    status = fmx__play(&o, addr, tasks);
    if (o.uses_llm) printf("llm transcripts (JSON): %s\n\n", o.llm.transcripts_dir);
out:
    cJSON_Delete(tasks);
    fmx_client_close(c);
    if (!o.connect && fmx__stop(&srv) != 0) {
        fprintf(stderr, "fmx run: fmx serve did not stop cleanly\n");
        if (status == 0) status = 2;
    }
    if (status != 2 || db_abs[0]) {
        fmx_leaderboard *lb = NULL;
        if (db_abs[0] && fmx_leaderboard_open(db_abs, NULL, &lb, err, sizeof err) == FMX_OK) {
            fmx_leaderboard_print(stdout, lb);
            fmx_leaderboard_close(lb);
            printf("\nepisode log (SQLite): %s\n", db_abs);
        } else if (db_abs[0]) {
            fprintf(stderr, "fmx run: leaderboard: %s\n", err);
        }
    }
    return status;
}
