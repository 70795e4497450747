/*
 * test_worker.c — the evaluation sandbox (env/worker.c): every denial of the
 * seccomp filter and every limit checked from INSIDE a started worker
 * (fmx_worker_selftest: socket, fork, exec, open, fds, limits), while the
 * worker still compiles and runs candidates and real verify/submit steps
 * give the same results as in-process; the channel's encoding keeps NaN, Inf
 * and float flags; a hang is killed at the deadline (timeout), a spin by the
 * CPU budget (timeout), a SIGSEGV is `crashed`, allocating past RLIMIT_AS is
 * `oom` (both the clean exit and the signal-handler probe); after each the
 * pool replaces the worker and serves again, jobs queue when every worker is
 * busy, nothing is left a zombie; exec mode (`fmx worker`, FMX_BIN); a
 * worker that cannot start fails pool creation with its reason; the bind
 * rule's loopback test. Packs: FMX_TEST_PACKS (the CTest fixture).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "episode.h"
#include "proto.h"
#include "server.h"
#include "status.h"
#include "tasks.h"
#include "evaluator.h"
#include "worker.h"

#ifndef FMX_SOURCE_DIR
#define FMX_SOURCE_DIR "."
#endif

static fmx_tasks *tasks;
static fmx_reward_config reward;
static char *solution;
static const char *packs_dir;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static char *read_all(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    if (s && fread(s, 1, (size_t)n, f) != (size_t)n) {
        free(s);
        s = NULL;
    }
    if (s) s[n] = '\0';
    fclose(f);
    return s;
}

static int setup(void **state) {
    (void)state;
    packs_dir = getenv("FMX_TEST_PACKS");
    if (!packs_dir) {
        fprintf(stderr, "FMX_TEST_PACKS is not set (run through ctest: a fixture exports it)\n");
        return -1;
    }
    char err[2048];
    if (fmx_tasks_open(packs_dir, &tasks, stderr, err, sizeof err) != FMX_OK) {
        fprintf(stderr, "fmx_tasks_open: %s\n", err);
        return -1;
    }
    reward = fmx_reward_config_default();
    solution = read_all(FMX_SOURCE_DIR "/examples/solutions/qwen2.py");
    return solution && fmx_tasks_find(tasks, "qwen2/Qwen2MLP") ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    fmx_tasks_close(tasks);
    free(solution);
    return 0;
}

/* ---- driving a pool ---- */

typedef struct {
    int done;
    fmx_pool_result res;
    cJSON *reply; /* taken from the result */
} waiter;

static void on_done(void *ctx, void *job, fmx_pool_result *res) {
    (void)ctx;
    waiter *w = job;
    w->done = 1;
    w->res = *res;
    w->reply = res->reply;
    res->reply = NULL;
    w->res.reply = NULL;
}

/* Services the pool until every waiter is done (or limit_s). */
static void drive(fmx_pool *p, waiter **ws, int n, double limit_s) {
    double end = now() + limit_s;
    for (;;) {
        int left = 0;
        for (int i = 0; i < n; i++)
            left += !ws[i]->done;
        if (!left || now() > end) break;
        int fds[64];
        struct pollfd pf[64];
        int k = fmx_pool_fds(p, fds, 64);
        for (int i = 0; i < k; i++)
            pf[i] = (struct pollfd){fds[i], POLLIN, 0};
        poll(pf, (nfds_t)k, fmx_pool_wait_ms(p, 100));
        fmx_pool_service(p, on_done, NULL);
    }
    for (int i = 0; i < n; i++)
        assert_true(ws[i]->done);
}

static void run(fmx_pool *p, cJSON *request, waiter *w, double limit_s) {
    memset(w, 0, sizeof *w);
    assert_int_equal(fmx_pool_submit(p, request, w), FMX_OK);
    drive(p, &w, 1, limit_s);
}

static void waiter_clear(waiter *w) {
    cJSON_Delete(w->reply);
    memset(w, 0, sizeof *w);
}

/* Runs a self-test; returns its fate, copies detail, and *ok from the reply. */
static fmx_fate selftest(fmx_pool *p, const char *what, int *ok, char *detail, size_t n,
                         double *secs) {
    waiter w;
    double t0 = now();
    run(p, fmx_worker_selftest_request(what), &w, 60);
    if (secs) *secs = now() - t0;
    fmx_fate fate = w.res.fate;
    *ok = fate == FMX_FATE_OK && cJSON_IsTrue(cJSON_GetObjectItem(w.reply, "ok"));
    const char *d = fate == FMX_FATE_OK
                        ? cJSON_GetStringValue(cJSON_GetObjectItem(w.reply, "detail"))
                        : w.res.why;
    snprintf(detail, n, "%s", d ? d : "");
    print_message("  %-10s %-8s %s\n", what, fmx_fate_name(fate), detail);
    waiter_clear(&w);
    return fate;
}

static void assert_selftest(fmx_pool *p, const char *what) {
    int ok;
    char detail[1024];
    assert_int_equal(selftest(p, what, &ok, detail, sizeof detail, NULL), FMX_FATE_OK);
    assert_true(ok);
}

static fmx_pool *make_pool(int workers, double timeout_s, double cpu_s, long mem_mb) {
    fmx_pool_config c = fmx_pool_config_default();
    c.workers = workers;
    c.eval_timeout_s = timeout_s;
    c.cpu_s = cpu_s;
    c.mem_mb = mem_mb;
    fmx_pool *p = NULL;
    char err[1024];
    int rc = fmx_pool_create(&c, tasks, &reward, &p, err, sizeof err);
    if (rc != FMX_OK) print_error("fmx_pool_create: %s\n", err);
    assert_int_equal(rc, FMX_OK);
    return p;
}

/* Children of this process that are zombies (reaped ones are gone). */
static int zombies(void) {
    int z = 0;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", (int)getpid());
    DIR *d = opendir(path);
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char cp[128];
        snprintf(cp, sizeof cp, "%s/%s/children", path, e->d_name);
        FILE *f = fopen(cp, "r");
        int pid;
        while (f && fscanf(f, "%d", &pid) == 1) {
            char sp[64], stat[512] = "";
            snprintf(sp, sizeof sp, "/proc/%d/stat", pid);
            FILE *s = fopen(sp, "r");
            if (s && fgets(stat, sizeof stat, s)) {
                const char *rp = strrchr(stat, ')');
                if (rp && rp[1] == ' ' && rp[2] == 'Z') z++;
            }
            if (s) fclose(s);
        }
        if (f) fclose(f);
    }
    if (d) closedir(d);
    return z;
}

/* ---- the sandbox, from inside ---- */

static void test_denials(void **state) {
    (void)state;
    fmx_pool *p = make_pool(2, 30, 0, 4096);
    fmx_pool_stats s = fmx_pool_stats_get(p);
    assert_int_equal(s.workers, 2);
    assert_int_equal(s.ready, 2);
    /* every denial, and what must still work */
    const char *checks[] = {"socket", "fork",    "exec",   "open",     "fds",
                            "thread", "compile", "limits", "torch_oom"};
    for (size_t i = 0; i < sizeof checks / sizeof *checks; i++)
        assert_selftest(p, checks[i]);
    /* the worker is still fine after all of them */
    assert_selftest(p, "compile");
    assert_int_equal(fmx_pool_stats_get(p).restarts, 0);
    fmx_pool_destroy(p);
}

/* Children of this process with the given comm. */
static int children_named(const char *comm) {
    int k = 0;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", (int)getpid(), (int)getpid());
    FILE *f = fopen(path, "r");
    int pid;
    while (f && fscanf(f, "%d", &pid) == 1) {
        char cp[64], name[64] = "";
        snprintf(cp, sizeof cp, "/proc/%d/comm", pid);
        FILE *c = fopen(cp, "r");
        if (c && fgets(name, sizeof name, c)) name[strcspn(name, "\n")] = 0;
        if (c) fclose(c);
        k += strcmp(name, comm) == 0;
    }
    if (f) fclose(f);
    return k;
}

static void test_limits_detail(void **state) {
    (void)state;
    /* a shared, writable mapping here (as the server has its log's WAL
     * index): no worker may keep it */
    char tmp[] = "/tmp/fmx-test-shm-XXXXXX";
    int fd = mkstemp(tmp);
    assert_true(fd >= 0 && ftruncate(fd, 1 << 16) == 0);
    void *shm = mmap(NULL, 1 << 16, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    assert_true(shm != MAP_FAILED);
    close(fd);
    unlink(tmp);
    fmx_pool *p = make_pool(1, 30, 7, 512);
    int ok;
    char detail[1024];
    assert_int_equal(selftest(p, "limits", &ok, detail, sizeof detail, NULL), FMX_FATE_OK);
    assert_true(ok);
    /* RLIMIT_AS is the start-up size + 512 MiB; RLIMIT_CPU re-armed to used + 7 s */
    long long as_mb = -1, cpu = -1;
    assert_int_equal(sscanf(detail, "RLIMIT_AS %lld MiB, RLIMIT_CPU %lld s", &as_mb, &cpu), 2);
    assert_true(as_mb > 512);
    assert_true(cpu >= 7 && cpu <= 20);
    assert_non_null(strstr(detail, "no_new_privs 1, seccomp mode 2, dumpable 0"));
    assert_non_null(strstr(detail, "shared mappings 0 (1 unmapped)"));
    /* the workers are this process's children (adopted from the spawner) */
    assert_true(children_named("fmx-worker") >= 1);
    assert_int_equal(children_named("fmx-spawner"), 1);
    /* and so is a replacement, made after the mapping too */
    assert_int_equal(selftest(p, "segv", &ok, detail, sizeof detail, NULL), FMX_FATE_CRASHED);
    assert_int_equal(selftest(p, "limits", &ok, detail, sizeof detail, NULL), FMX_FATE_OK);
    assert_true(ok);
    assert_non_null(strstr(detail, "shared mappings 0 (1 unmapped)"));
    assert_true(children_named("fmx-worker") >= 1);
    assert_int_equal(zombies(), 0);
    fmx_pool_destroy(p);
    assert_int_equal(children_named("fmx-spawner"), 0);
    munmap(shm, 1 << 16);
}

/* The encoding keeps what JSON text would lose. */
static void test_echo_roundtrip(void **state) {
    (void)state;
    fmx_pool *p = make_pool(1, 30, 0, 4096);
    cJSON *v = cJSON_CreateObject();
    cJSON_AddNumberToObject(v, "nan", NAN);
    cJSON_AddNumberToObject(v, "inf", INFINITY);
    cJSON_AddNumberToObject(v, "ninf", -INFINITY);
    fmx_proto_add_float(v, "float_one", 1.0); /* must stay a msgpack float */
    cJSON_AddNumberToObject(v, "int", 3);
    cJSON_AddNumberToObject(v, "big", 9007199254740993.0);
    cJSON_AddNumberToObject(v, "tiny", 4.9e-324);
    cJSON_AddStringToObject(v, "utf8", "\xc2\xb7 caf\xc3\xa9 \xe2\x9c\x93");
    cJSON_AddStringToObject(v, "empty", "");
    cJSON_AddNullToObject(v, "null");
    cJSON_AddTrueToObject(v, "t");
    cJSON *arr = cJSON_AddArrayToObject(v, "nested");
    cJSON *inner = cJSON_CreateObject();
    cJSON_AddItemToObject(inner, "deep", cJSON_CreateArray());
    cJSON_AddItemToArray(arr, inner);
    char *big = malloc(3 << 20);
    memset(big, 'x', (3 << 20) - 1);
    big[(3 << 20) - 1] = 0;
    cJSON_AddStringToObject(v, "big_string", big);
    free(big);
    char *want = NULL, *got = NULL;
    size_t wn = 0, gn = 0;
    assert_int_equal(fmx_proto_encode(v, NULL, &want, &wn), FMX_OK);
    cJSON *rq = cJSON_CreateObject();
    cJSON_AddStringToObject(rq, "kind", "echo");
    cJSON_AddItemToObject(rq, "value", v);
    waiter w;
    run(p, rq, &w, 30);
    assert_int_equal(w.res.fate, FMX_FATE_OK);
    const cJSON *back = cJSON_GetObjectItem(w.reply, "value");
    assert_non_null(back);
    assert_true(isnan(cJSON_GetObjectItem(back, "nan")->valuedouble));
    assert_int_equal(fmx_proto_encode(back, NULL, &got, &gn), FMX_OK);
    assert_int_equal(gn, wn);
    assert_memory_equal(got, want, wn); /* msgpack bytes: types, flags, NaN bits */
    free(want);
    free(got);
    waiter_clear(&w);
    fmx_pool_destroy(p);
}

/* Real steps: verify_component and submit give in a worker what they give
 * in-process. */
static void test_steps_match_in_process(void **state) {
    (void)state;
    fmx_pool *p = make_pool(2, 30, 0, 4096);
    const fmx_task *task = fmx_tasks_find(tasks, "qwen2/Qwen2MLP");
    fmx_episode *ep = fmx_episode_create(1, task, "t", 0, "c", 1, fmx_budget_default(), &reward);
    const char *tools[] = {"verify_component", "submit"};
    for (int k = 0; k < 2; k++) {
        cJSON *args = cJSON_CreateObject();
        cJSON_AddStringToObject(args, "code", solution);
        cJSON_AddStringToObject(args, "entry", "mlp");
        fmx_step_plan plan;
        assert_int_equal(fmx_episode_plan(ep, tools[k], args, &plan), FMX_OK);
        assert_true(plan.heavy);
        waiter w;
        run(p, fmx_worker_step_request(&plan), &w, 60);
        assert_int_equal(w.res.fate, FMX_FATE_OK);
        fmx_pool_result res = w.res;
        res.reply = w.reply;
        fmx_step_outcome remote, local;
        assert_int_equal(fmx_pool_outcome(p, &plan, &res, &remote), FMX_OK);
        assert_int_equal(fmx_episode_execute(&plan, &local), FMX_OK);
        const cJSON *rd = cJSON_GetObjectItem(remote.tool.observation, "data");
        const cJSON *ld = cJSON_GetObjectItem(local.tool.observation, "data");
        assert_null(remote.tool.error);
        if (k == 0) {
            assert_string_equal(cJSON_GetObjectItem(rd, "status")->valuestring, "match");
            assert_int_equal(cJSON_GetObjectItem(rd, "passed")->valueint,
                             cJSON_GetObjectItem(ld, "passed")->valueint);
            assert_true(remote.tool.verified_task_code);
        } else {
            assert_true(remote.tool.submitted);
            assert_true(remote.tool.grade.score.reward == local.tool.grade.score.reward);
            assert_true(remote.tool.grade.facts.correctness == 1.0);
            assert_string_equal(remote.tool.grade.breakdown, local.tool.grade.breakdown);
            assert_string_equal(remote.tool.grade.text, local.tool.grade.text);
            char *a = cJSON_PrintUnformatted(remote.tool.grade.summary);
            char *b = cJSON_PrintUnformatted(local.tool.grade.summary);
            assert_string_equal(a, b);
            free(a);
            free(b);
        }
        fmx_step_outcome_clear(&remote);
        fmx_step_outcome_clear(&local);
        fmx_step_plan_clear(&plan);
        waiter_clear(&w);
        cJSON_Delete(args);
    }
    fmx_episode_destroy(ep);
    fmx_pool_destroy(p);
}

/* ---- failures: the fate, the replacement ---- */

static void test_timeout_kill_and_replacement(void **state) {
    (void)state;
    fmx_pool *p = make_pool(1, 1.0, 0, 4096);
    int ok;
    char detail[1024];
    double secs;
    assert_int_equal(selftest(p, "hang", &ok, detail, sizeof detail, &secs), FMX_FATE_TIMEOUT);
    assert_true(secs >= 0.9 && secs < 5);
    assert_non_null(strstr(detail, "wall-clock"));
    assert_int_equal(fmx_pool_stats_get(p).timeouts, 1);
    /* the replacement serves */
    assert_selftest(p, "compile");
    assert_selftest(p, "open");
    assert_int_equal(zombies(), 0);
    /* the episode's view: an error observation; the budget's last step truncates */
    const fmx_task *task = fmx_tasks_find(tasks, "qwen2/Qwen2MLP");
    fmx_budget b = fmx_budget_default();
    b.max_steps = 1;
    fmx_episode *ep = fmx_episode_create(2, task, "t", 0, "c", 1, b, &reward);
    cJSON *args = cJSON_CreateObject();
    cJSON_AddStringToObject(args, "code", "x");
    fmx_step_plan plan;
    assert_int_equal(fmx_episode_plan(ep, "verify_component", args, &plan), FMX_OK);
    fmx_pool_result res = {.fate = FMX_FATE_TIMEOUT, .why = "ran past", .ms = 1000};
    fmx_step_outcome out;
    assert_int_equal(fmx_pool_outcome(p, &plan, &res, &out), FMX_OK);
    assert_string_equal(out.tool.error, "timeout");
    assert_string_equal(
        cJSON_GetObjectItem(cJSON_GetObjectItem(out.tool.observation, "data"), "fate")->valuestring,
        "timeout");
    assert_true(out.truncated);
    assert_false(fmx_pool_needs_fallback(&plan, &res)); /* no verified code to fall back on */
    fmx_step_result r;
    assert_int_equal(fmx_episode_apply(ep, &plan, &out, &r), FMX_OK);
    assert_true(r.truncated);
    assert_string_equal(r.error, "timeout");
    fmx_step_result_clear(&r);
    fmx_step_outcome_clear(&out);
    fmx_step_plan_clear(&plan);
    fmx_episode_destroy(ep);
    /* a submit that fails is graded as failing (reward 0) and ends the episode */
    ep = fmx_episode_create(3, task, "t", 0, "c", 1, fmx_budget_default(), &reward);
    assert_int_equal(fmx_episode_plan(ep, "submit", args, &plan), FMX_OK);
    res.fate = FMX_FATE_CRASHED;
    assert_int_equal(fmx_pool_outcome(p, &plan, &res, &out), FMX_OK);
    assert_string_equal(out.tool.error, "crashed");
    assert_true(out.tool.submitted && !out.truncated);
    assert_true(out.tool.grade.score.reward == 0.0);
    assert_int_equal(fmx_episode_apply(ep, &plan, &out, &r), FMX_OK);
    assert_true(r.terminated && r.graded && r.reward == 0.0);
    assert_string_equal(
        cJSON_GetObjectItem(cJSON_GetObjectItem(r.grade->summary, "error"), "stage")->valuestring,
        "crashed");
    fmx_step_result_clear(&r);
    fmx_step_outcome_clear(&out);
    fmx_step_plan_clear(&plan);
    cJSON_Delete(args);
    fmx_episode_destroy(ep);
    fmx_pool_destroy(p);
}

static void test_cpu_budget(void **state) {
    (void)state;
    fmx_pool *p = make_pool(1, 30, 1, 4096); /* 30 s wall, 1 s CPU */
    int ok;
    char detail[1024];
    double secs;
    assert_int_equal(selftest(p, "spin", &ok, detail, sizeof detail, &secs), FMX_FATE_TIMEOUT);
    assert_non_null(strstr(detail, "CPU"));
    assert_true(secs < 10);
    assert_selftest(p, "compile");
    fmx_pool_destroy(p);
}

static void test_crash(void **state) {
    (void)state;
    fmx_pool *p = make_pool(1, 30, 0, 4096);
    int ok;
    char detail[1024];
    assert_int_equal(selftest(p, "segv", &ok, detail, sizeof detail, NULL), FMX_FATE_CRASHED);
    assert_non_null(strstr(detail, "signal 11"));
    assert_int_equal(fmx_pool_stats_get(p).crashes, 1);
    assert_selftest(p, "compile");
    assert_int_equal(zombies(), 0);
    fmx_pool_destroy(p);
}

static void test_oom(void **state) {
    (void)state;
#if defined(__SANITIZE_ADDRESS__)
    /* ASan's own allocator needs address space past RLIMIT_AS and aborts
     * instead of failing the allocation: the fates differ by design. */
    skip();
#endif
    fmx_pool *p = make_pool(1, 60, 0, 256);
    int ok;
    char detail[1024];
    /* malloc fails past RLIMIT_AS: the job's FMX_ENOMEM ends the worker */
    assert_int_equal(selftest(p, "oom", &ok, detail, sizeof detail, NULL), FMX_FATE_OOM);
    assert_non_null(strstr(detail, "256 MiB"));
    /* an abort() with the address space used up: the signal handler's probe */
    assert_int_equal(selftest(p, "abort_oom", &ok, detail, sizeof detail, NULL), FMX_FATE_OOM);
    /* a libtorch allocation over the limit is a run error, the worker lives */
    assert_selftest(p, "torch_oom");
    assert_selftest(p, "compile");
    fmx_pool_stats s = fmx_pool_stats_get(p);
    assert_int_equal(s.ooms, 2);
    assert_int_equal(s.restarts, 2);
    fmx_pool_destroy(p);
}

static void test_queue_when_busy(void **state) {
    (void)state;
    fmx_pool *p = make_pool(2, 30, 0, 4096);
    waiter w[8], *ws[8];
    for (int i = 0; i < 8; i++) {
        memset(&w[i], 0, sizeof w[i]);
        ws[i] = &w[i];
        assert_int_equal(fmx_pool_submit(p, fmx_worker_selftest_request("compile"), &w[i]), FMX_OK);
    }
    assert_int_equal(fmx_pool_stats_get(p).queued, 8);
    fmx_pool_service(p, on_done, NULL);
    fmx_pool_stats s = fmx_pool_stats_get(p);
    assert_int_equal(s.busy, 2);
    assert_int_equal(s.queued, 6);
    drive(p, ws, 8, 60);
    for (int i = 0; i < 8; i++) {
        assert_int_equal(w[i].res.fate, FMX_FATE_OK);
        assert_true(cJSON_IsTrue(cJSON_GetObjectItem(w[i].reply, "ok")));
        waiter_clear(&w[i]);
    }
    assert_int_equal(fmx_pool_stats_get(p).jobs, 8);
    fmx_pool_destroy(p);
}

/* A hung job and a queued one come back from fmx_pool_take; destroy reaps. */
/* A dead worker's evaluation process ends when its socket closes and,
 * orphaned, comes to this process (a child subreaper, as a server is, whose
 * pool reaps such strays while it serves); so does a worker the spawner had
 * forked but not yet announced when a failed start tore the pool down (it
 * still has to exec and load its libraries before it notices: seconds on a
 * loaded machine). Reap until none is left (waitpid fails with ECHILD), up
 * to 120 s: the callers then assert that none is left. */
static void reap_orphans(void) {
    for (int i = 0; i < 12000 && waitpid(-1, NULL, WNOHANG) >= 0; i++)
        usleep(10000);
}

static void test_take_and_destroy(void **state) {
    (void)state;
    fmx_pool *p = make_pool(1, 30, 0, 4096);
    waiter a = {0}, b = {0};
    assert_int_equal(fmx_pool_submit(p, fmx_worker_selftest_request("hang"), &a), FMX_OK);
    assert_int_equal(fmx_pool_submit(p, fmx_worker_selftest_request("compile"), &b), FMX_OK);
    fmx_pool_service(p, on_done, NULL);
    assert_int_equal(fmx_pool_stats_get(p).busy, 1);
    void *j1 = fmx_pool_take(p), *j2 = fmx_pool_take(p);
    assert_true((j1 == &a && j2 == &b) || (j1 == &b && j2 == &a));
    assert_null(fmx_pool_take(p));
    assert_false(a.done || b.done);
    fmx_pool_destroy(p);
    fmx_evaluator_shutdown(); /* this process's own (test_steps_match_in_process) */
    reap_orphans();
    assert_int_equal(waitpid(-1, NULL, WNOHANG), -1); /* no child left at all */
    assert_int_equal(errno, ECHILD);
}

/* ---- exec mode and start-up failures ---- */

static void test_exec_mode(void **state) {
    (void)state;
    const char *bin = getenv("FMX_BIN");
    if (!bin) {
        print_message("FMX_BIN not set: skipped\n");
        skip();
    }
    fmx_pool_config c = fmx_pool_config_default();
    c.workers = 1;
    c.exec = 1;
    c.exe = bin;
    c.tasks_dir = packs_dir;
    fmx_pool *p = NULL;
    char err[1024];
    int rc = fmx_pool_create(&c, tasks, &reward, &p, err, sizeof err);
    if (rc != FMX_OK) print_error("%s\n", err);
    assert_int_equal(rc, FMX_OK);
    const char *checks[] = {"socket", "fork", "exec", "open", "fds", "limits", "compile"};
    for (size_t i = 0; i < sizeof checks / sizeof *checks; i++)
        assert_selftest(p, checks[i]);
    int ok;
    char detail[256];
    assert_int_equal(selftest(p, "segv", &ok, detail, sizeof detail, NULL), FMX_FATE_CRASHED);
    assert_selftest(p, "compile"); /* a fresh `fmx worker` */
    fmx_pool_destroy(p);
}

static void test_start_failure(void **state) {
    (void)state;
    fmx_pool_config c = fmx_pool_config_default();
    c.workers = 2;
    c.exec = 1;
    c.exe = "/nonexistent/fmx";
    c.tasks_dir = packs_dir;
    fmx_pool *p = NULL;
    char err[1024] = "";
    double t0 = now();
    assert_int_not_equal(fmx_pool_create(&c, tasks, &reward, &p, err, sizeof err), FMX_OK);
    assert_null(p);
    assert_true(now() - t0 < 10);
    assert_non_null(strstr(err, "cannot run /nonexistent/fmx"));
    /* a worker that runs but cannot serve says why */
    c.exe = getenv("FMX_BIN");
    c.tasks_dir = "/nonexistent-packs";
    if (c.exe) {
        assert_int_not_equal(fmx_pool_create(&c, tasks, &reward, &p, err, sizeof err), FMX_OK);
        print_message("  %s\n", err);
        assert_non_null(strstr(err, "nonexistent-packs"));
    }
    reap_orphans();
    assert_int_equal(waitpid(-1, NULL, WNOHANG), -1);
}

/* Workers that cannot be replaced: a waiting job fails (crashed) instead of
 * hanging. */
static void test_no_worker_can_start(void **state) {
    (void)state;
    const char *bin = getenv("FMX_BIN");
    if (!bin) skip();
    char exe[] = "/tmp/fmx-test-worker-XXXXXX";
    int fd = mkstemp(exe);
    assert_true(fd >= 0);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "cp '%s' '%s' && chmod 700 '%s'", bin, exe, exe);
    close(fd);
    assert_int_equal(system(cmd), 0);
    fmx_pool_config c = fmx_pool_config_default();
    c.workers = 1;
    c.exec = 1;
    c.exe = exe;
    c.tasks_dir = packs_dir;
    fmx_pool *p = NULL;
    char err[1024];
    assert_int_equal(fmx_pool_create(&c, tasks, &reward, &p, err, sizeof err), FMX_OK);
    unlink(exe); /* replacements cannot start from now on */
    int ok;
    char detail[512];
    assert_int_equal(selftest(p, "segv", &ok, detail, sizeof detail, NULL), FMX_FATE_CRASHED);
    double secs;
    assert_int_equal(selftest(p, "compile", &ok, detail, sizeof detail, &secs), FMX_FATE_CRASHED);
    assert_non_null(strstr(detail, "no worker process could start"));
    assert_true(secs < 15);
    fmx_pool_destroy(p);
}

/* ---- the bind rule ---- */

static void test_loopback(void **state) {
    (void)state;
    const char *yes[] = {"tcp://127.0.0.1:5555", "tcp://127.1.2.3:1", "tcp://[::1]:5555",
                         "tcp://localhost:5555", "tcp://lo:5555",     "ipc:///tmp/x.sock",
                         "inproc://x",           "tcp://127.0.0.1:*"};
    const char *no[] = {
        "tcp://0.0.0.0:5555",        "tcp://*:5555",        "tcp://192.168.1.2:5555",
        "tcp://eth0:5555",           "tcp://[::]:5555",     "tcp://127.0.0.1.evil:1",
        "tcp://127.0.0.1;1.2.3.4:5", "ws://127.0.0.1:5555", "tcp://localhost.x:1",
        "tcp://128.0.0.1:5555",      "tcp://127..0.1:5",    "pgm://eth0;239.1.1.1:5"};
    for (size_t i = 0; i < sizeof yes / sizeof *yes; i++)
        assert_true(fmx_serve_is_loopback(yes[i]));
    for (size_t i = 0; i < sizeof no / sizeof *no; i++) {
        if (fmx_serve_is_loopback(no[i])) print_error("%s counted as loopback\n", no[i]);
        assert_false(fmx_serve_is_loopback(no[i]));
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_loopback),
        cmocka_unit_test(test_denials),
        cmocka_unit_test(test_limits_detail),
        cmocka_unit_test(test_echo_roundtrip),
        cmocka_unit_test(test_steps_match_in_process),
        cmocka_unit_test(test_timeout_kill_and_replacement),
        cmocka_unit_test(test_cpu_budget),
        cmocka_unit_test(test_crash),
        cmocka_unit_test(test_oom),
        cmocka_unit_test(test_queue_when_busy),
        cmocka_unit_test(test_take_and_destroy),
        cmocka_unit_test(test_exec_mode),
        cmocka_unit_test(test_start_failure),
        cmocka_unit_test(test_no_worker_can_start),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
