/*
 * worker.c — worker processes for the server's evaluations (worker.h): the
 * pool the server's main thread drives (spawn, dispatch, deadlines, reaping,
 * replacement), the sandbox a worker puts itself in and the worker's serve
 * loop. It is not: the server loop (env/server.c), what a job computes
 * (env/episode.c, env/tools.c), the channel's messages (channel.c), step
 * outcomes and fates (outcome.c) or the self-tests (selftest.c).
 */
#define _GNU_SOURCE
#include "worker.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "channel.h"
#include "outcome.h"
#include "engine/engine.h"
#include "evaluator.h"
#include "sandbox.h"
#include "proto.h"
#include "status.h"
#include "tools.h"
#include "verify.h"

#define FMX__EXIT_OOM 86             /* a worker's exit status: an allocation failed */
#define FMX__EXIT_SETUP 87           /* ... it could not sandbox itself */
#define FMX__SEND_WAIT_S 10.0        /* how long a request write may block */
#define FMX__RESTART_MAX_DELAY_S 5.0 /* back-off cap for workers that die starting */
#define FMX__START_FAILURES_MAX 5    /* then jobs fail instead of waiting for a worker */

static double fmx__mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- requests ---- */

static cJSON *fmx__request(const char *kind, const fmx_step_plan *plan) {
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "kind", kind);
    if (plan) {
        cJSON_AddStringToObject(r, "task", plan->ctx.task->id);
        cJSON_AddNumberToObject(r, "max_code_bytes", (double)plan->ctx.max_code_bytes);
    }
    return r;
}

cJSON *fmx_worker_step_request(const fmx_step_plan *plan) {
    cJSON *r = fmx__request("step", plan);
    cJSON_AddStringToObject(r, "tool", plan->tool ? plan->tool : "");
    cJSON_AddItemToObject(r, "args",
                          plan->args ? cJSON_Duplicate(plan->args, 1) : cJSON_CreateNull());
    cJSON_AddBoolToObject(r, "final", plan->final);
    cJSON_AddBoolToObject(r, "finish", plan->finish);
    if (plan->fallback_code) cJSON_AddStringToObject(r, "fallback_code", plan->fallback_code);
    if (plan->fallback_entry) cJSON_AddStringToObject(r, "fallback_entry", plan->fallback_entry);
    return r;
}

cJSON *fmx_worker_grade_request(const fmx_step_plan *plan, const char *code, const char *entry) {
    cJSON *r = fmx__request("grade", plan);
    cJSON_AddStringToObject(r, "code", code ? code : "");
    cJSON_AddStringToObject(r, "entry", entry ? entry : "forward");
    return r;
}

cJSON *fmx_worker_selftest_request(const char *what) {
    cJSON *r = fmx__request("selftest", NULL);
    cJSON_AddStringToObject(r, "what", what ? what : "");
    return r;
}

/* ---- warming libtorch up ---- */

/* Touches the kernels candidates use, in float32 and bfloat16, with the
 * graph executor's optimisations too, so that lazy initialisations (which
 * may open files) happen before the sandbox closes. */
static const char fmx__warm_src[] =
    "import torch\n"
    "import torch.nn.functional as F\n"
    "from torch import Tensor\n"
    "from typing import Dict, Tuple\n"
    "\n"
    "def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:\n"
    "    h = F.layer_norm(x, [x.shape[-1]])\n"
    "    q = F.linear(h, weights['w'], weights['b'])\n"
    "    a = torch.softmax(q @ q.transpose(-1, -2) / 8.0, dim=-1)\n"
    "    m = torch.triu(torch.ones(x.shape[1], x.shape[1]), 1).to(torch.bool)\n"
    "    y = a.masked_fill(m, 0.0) @ h\n"
    "    y = F.silu(y) + F.gelu(y) + F.gelu(y, approximate='tanh') + torch.tanh(y) + torch.erf(y)\n"
    "    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)\n"
    "    e = F.embedding(torch.arange(x.shape[1]).unsqueeze(0), weights['w'])\n"
    "    p = torch.cat((y.cos(), y.sin()), dim=-1).float()\n"
    "    s = F.scaled_dot_product_attention(h.unsqueeze(1), h.unsqueeze(1), h.unsqueeze(1), "
    "is_causal=True)\n"
    "    z = y.to(torch.bfloat16) @ weights['w'].to(torch.bfloat16).t()\n"
    "    c = F.conv1d(h.transpose(1, 2), weights['w'].unsqueeze(-1))\n"
    "    out = y + e + torch.where(y > 0, y, -y) + torch.clamp(y, -1.0, 1.0)\n"
    "    return out, p.sum() + s.sum() + z.float().sum() + c.sum() + torch.cumsum(y, 1).amax()\n";

/* Runs the warm-up program (and, with tasks, grades a trivial candidate on
 * every pack's first task). Returns FMX_OK or the first failure (err). */
static int fmx__warmup(const fmx_tasks *tasks, const fmx_reward_config *reward, char *err,
                       size_t errsz) {
    fmx_program *prog = NULL;
    fmx_args *a = fmx_args_create();
    fmx_run *run = NULL;
    fmx_tensor *x = NULL, *w = NULL, *b = NULL, *x16 = NULL, *w16 = NULL, *b16 = NULL;
    static float xs[2 * 8 * 16], ws[16 * 16], bs[16];
    for (int i = 0; i < 2 * 8 * 16; i++)
        xs[i] = (float)((i * 37) % 101) / 101.0f - 0.5f;
    for (int i = 0; i < 16 * 16; i++)
        ws[i] = (float)((i * 53) % 97) / 97.0f - 0.5f;
    for (int i = 0; i < 16; i++)
        bs[i] = 0.01f * (float)i;
    int64_t xshape[3] = {2, 8, 16}, wshape[2] = {16, 16}, bshape[1] = {16};
    int rc = a ? FMX_OK : FMX_ENOMEM;
    if (rc == FMX_OK) rc = fmx_tensor_wrap(xs, FMX_DT_F32, xshape, 3, &x, err, errsz);
    if (rc == FMX_OK) rc = fmx_tensor_wrap(ws, FMX_DT_F32, wshape, 2, &w, err, errsz);
    if (rc == FMX_OK) rc = fmx_tensor_wrap(bs, FMX_DT_F32, bshape, 1, &b, err, errsz);
    if (rc == FMX_OK)
        rc = fmx_program_compile(fmx__warm_src, sizeof fmx__warm_src - 1, "warmup.py", &prog, err,
                                 errsz);
    const char *keys[2] = {"w", "b"};
    const fmx_tensor *vals[2] = {w, b};
    if (rc == FMX_OK) rc = fmx_args_tensor(a, "x", x);
    if (rc == FMX_OK) rc = fmx_args_weights(a, "weights", keys, vals, 2);
    if (rc == FMX_OK) rc = fmx_program_run(prog, "forward", a, &run, err, errsz);
    if (rc == FMX_OK) {
        int same = 0;
        fmx_compare_result cr;
        fmx_tolerance tol = {1e-5, 1e-5};
        rc = fmx_program_check_optimized(prog, "forward", a, run, &same, err, errsz);
        if (rc == FMX_OK)
            rc = fmx_compare(fmx_run_output(run, 0), fmx_run_output(run, 0), NULL, tol, &cr, err,
                             errsz);
        if (rc == FMX_OK) rc = fmx_tensor_cast(x, FMX_DT_BF16, &x16, err, errsz);
        if (rc == FMX_OK) rc = fmx_tensor_cast(w, FMX_DT_BF16, &w16, err, errsz);
        if (rc == FMX_OK) rc = fmx_tensor_cast(b, FMX_DT_BF16, &b16, err, errsz);
    }
    /* bfloat16 inputs through the same program */
    fmx_run *run16 = NULL;
    if (rc == FMX_OK) {
        fmx_args_clear(a);
        const fmx_tensor *vals16[2] = {w16, b16};
        rc = fmx_args_tensor(a, "x", x16);
        if (rc == FMX_OK) rc = fmx_args_weights(a, "weights", keys, vals16, 2);
        if (rc == FMX_OK) rc = fmx_program_run(prog, "forward", a, &run16, err, errsz);
    }
    fmx_run_destroy(run16);
    fmx_run_destroy(run);
    fmx_program_destroy(prog);
    fmx_args_destroy(a);
    fmx_tensor_destroy(x);
    fmx_tensor_destroy(x16);
    fmx_tensor_destroy(w16);
    fmx_tensor_destroy(b16);
    fmx_tensor_destroy(w);
    fmx_tensor_destroy(b);
    /* The grading path (an evaluation process, its results, the comparison,
     * masks, tolerances, the compile check) once, on the first task, with a
     * candidate that runs and fails: one evaluation warms it for every pack. */
    static const char trivial[] = "import torch\n\n"
                                  "def forward():\n    return torch.zeros(1)\n";
    if (rc == FMX_OK && tasks && fmx_tasks_count(tasks) > 0) {
        const fmx_task *t = fmx_tasks_get(tasks, 0);
        fmx_verify_config cfg = fmx_verify_config_default();
        cfg.component = t->path;
        cfg.compile_check = 1;
        cJSON *report = NULL;
        int vrc =
            fmx_verify_source(t->pack, trivial, sizeof trivial - 1, "warmup.py", &cfg, &report);
        const cJSON *e = cJSON_GetObjectItemCaseSensitive(report, "error");
        const char *stage = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "stage"));
        if (!report || (vrc != FMX_OK && vrc != FMX_EMISMATCH && stage &&
                        strcmp(stage, "run") != 0 && strcmp(stage, "bind") != 0)) {
            rc = report ? vrc : FMX_ENOMEM;
            snprintf(err, errsz, "grading a trivial candidate: %s",
                     cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "message"))
                         ? cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "message"))
                         : fmx_strerror(rc));
        }
        cJSON_Delete(report);
    }
    return rc;
}

/* ---- inside a worker: the sandbox ---- */

typedef struct {
    const fmx_tasks *tasks;
    const fmx_reward_config *reward;
    int threads;
    long mem_mb;
    double cpu_s;
    int cpu_device;  /* 1 on cpu: RLIMIT_AS and the open() filter apply */
    int full_warmup; /* exec mode: nothing was warmed up before */
    double eval_timeout_s;
    const char *device;
} fmx__wctx;

static size_t fmx__oom_probe; /* bytes the fatal-signal handler tries to reserve */

/* On a fatal signal: if the address space is (nearly) used up, the worker
 * died of memory — exit with FMX__EXIT_OOM; else die of the signal. */
static void fmx__on_fatal(int sig) {
    if (fmx__oom_probe) {
        void *p = mmap(NULL, fmx__oom_probe, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (p == MAP_FAILED) _exit(FMX__EXIT_OOM);
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Sets libtorch's intra-op threads (env/engine: nothing else touches
 * libtorch). A forked worker so never uses the thread pools of the server. */
static void fmx__set_threads(int n) {
    fmx_engine_set_threads(n);
}

static void fmx__close_fds(int keep) {
    if (keep != FMX_CHANNEL_FD) {
        dup2(keep, FMX_CHANNEL_FD); /* clears close-on-exec on the copy */
        close(keep);
    } else {
        fcntl(keep, F_SETFD, 0);
    }
    if (close_range(FMX_CHANNEL_FD + 1, ~0U, 0) != 0) {
        long max = sysconf(_SC_OPEN_MAX);
        for (long fd = FMX_CHANNEL_FD + 1; fd < (max > 0 ? max : 65536); fd++)
            close((int)fd);
    }
    int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null >= 0 && null != 0) {
        dup2(null, 0);
        close(null);
    }
}

/* Process-level set-up right after fork: no signals inherited from the
 * server, a process group of its own, death with the parent (the server: a
 * worker made by the spawner waits until the server, a child subreaper,
 * has adopted it). */
static int fmx__child_basics(pid_t parent) {
    struct sigaction dfl = {0};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP) sigaction(sig, &dfl, NULL);
    signal(SIGPIPE, SIG_IGN);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    setpgid(0, 0);
    for (int i = 0; getppid() != parent && i < 20000; i++)
        usleep(100); /* the spawner's middle process is exiting */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) return -1;
    if (getppid() != parent) return -1; /* the server died before we could notice */
    return 0;
}

static int fmx__shared_left = -1; /* shared mappings after fmx__unmap_shared; -1: not run */
static int fmx__shared_unmapped;  /* ... and how many it unmapped */

/* Unmaps every MAP_SHARED mapping a forked worker inherited (SQLite's WAL
 * index of the server's log, above all: writable and shared with the
 * server); counts what is left. Not in exec mode: CUDA maps device memory
 * shared. */
static void fmx__unmap_shared(void) {
    for (int pass = 0; pass < 2; pass++) {
        FILE *f = fopen("/proc/self/maps", "r");
        if (!f) return;
        unsigned long lo[256], hi[256];
        int n = 0;
        char line[1024];
        while (fgets(line, sizeof line, f)) {
            unsigned long a, b;
            char perms[8];
            if (sscanf(line, "%lx-%lx %7s", &a, &b, perms) == 3 && perms[3] == 's' && n < 256) {
                lo[n] = a;
                hi[n++] = b;
            }
        }
        fclose(f);
        if (pass == 1) {
            fmx__shared_left = n;
            return;
        }
        for (int i = 0; i < n; i++)
            fmx__shared_unmapped += munmap((void *)lo[i], hi[i] - lo[i]) == 0;
    }
}

/* Locks the worker down (worker.h). Returns 0, or -1 with err set. */
static int fmx__sandbox(const fmx__wctx *w, char *err, size_t errsz, size_t *vm, size_t *limit) {
    /* (after exec too: execve makes a process dumpable again) */
    prctl(PR_SET_DUMPABLE, 0);
    prctl(PR_SET_NAME, "fmx-worker");
    struct rlimit core = {0, 0};
    setrlimit(RLIMIT_CORE, &core);
    fmx__set_threads(w->threads > 0 ? w->threads : 1);
    /* The evaluation process (candidate code runs there, never here) starts
     * now, while this worker may still fork and exec; warm-up grades a
     * trivial candidate on every pack through it. */
    fmx_evaluator_config ec = fmx_evaluator_config_default();
    ec.threads = w->threads > 0 ? w->threads : 1;
    ec.mem_mb = w->mem_mb;
    ec.cpu_s = w->cpu_s;
    ec.timeout_s = w->eval_timeout_s;
    ec.device = w->device ? w->device : "cpu";
    fmx_evaluator_configure(&ec);
    char werr[1024] = "";
    if (!fmx_evaluator_shared(werr, sizeof werr)) {
        snprintf(err, errsz, "%s", werr);
        return -1;
    }
    if (fmx__warmup(w->tasks, w->reward, werr, sizeof werr) != FMX_OK)
        fprintf(stderr, "fmx worker %d: warm-up: %s\n", (int)getpid(), werr);
    *vm = fmx_sandbox_vm_bytes();
    *limit = 0;
    if (w->cpu_device && w->mem_mb > 0) {
        struct rlimit as;
        as.rlim_cur = as.rlim_max = (rlim_t)(*vm + (size_t)w->mem_mb * (1u << 20));
        if (setrlimit(RLIMIT_AS, &as) != 0) {
            snprintf(err, errsz, "setrlimit(RLIMIT_AS): %s", strerror(errno));
            return -1;
        }
        *limit = (size_t)as.rlim_cur;
        size_t probe = (size_t)w->mem_mb * (1u << 20) / 4;
        fmx__oom_probe = probe < ((size_t)256 << 20) ? probe : ((size_t)256 << 20);
    }
    /* fatal signals: the out-of-memory probe, on a stack of their own */
    static char altstack[1 << 16];
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
    sigaltstack(&ss, NULL);
    struct sigaction sa = {0};
    sa.sa_handler = fmx__on_fatal;
    sa.sa_flags = SA_ONSTACK | SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    int fatal[] = {SIGSEGV, SIGBUS, SIGABRT, SIGILL, SIGFPE};
    for (size_t i = 0; i < sizeof fatal / sizeof *fatal; i++)
        sigaction(fatal[i], &sa, NULL);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        snprintf(err, errsz, "prctl(PR_SET_NO_NEW_PRIVS): %s", strerror(errno));
        return -1;
    }
    int rc = fmx_sandbox_seccomp(w->cpu_device);
    if (rc != 0) {
        snprintf(err, errsz, "seccomp: %s", strerror(-rc));
        return -1;
    }
    return 0;
}

/* Re-arms the CPU budget for the next job: soft RLIMIT_CPU = used + cpu_s. */
static void fmx__arm_cpu(double cpu_s) {
    struct rusage ru;
    if (cpu_s <= 0 || getrusage(RUSAGE_SELF, &ru) != 0) return;
    double used = (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
                  ((double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_usec) / 1e6;
    struct rlimit cpu;
    if (getrlimit(RLIMIT_CPU, &cpu) != 0) return;
    rlim_t want = (rlim_t)ceil(used + cpu_s);
    if (cpu.rlim_max != RLIM_INFINITY && want > cpu.rlim_max) want = cpu.rlim_max;
    cpu.rlim_cur = want;
    setrlimit(RLIMIT_CPU, &cpu);
}

/* ---- inside a worker: jobs ---- */

static cJSON *fmx__reply_error(const char *fmt, const char *a) {
    char msg[512];
    snprintf(msg, sizeof msg, fmt, a);
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "error", msg);
    return r;
}

static char *fmx__dup_arg(const cJSON *rq, const char *k) {
    const char *s = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(rq, k));
    return s ? strdup(s) : NULL;
}

/* Runs one request. NULL means out of memory (the worker exits: oom). */
static cJSON *fmx__job(const fmx__wctx *w, cJSON *rq) {
    const char *kind = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(rq, "kind"));
    if (!kind) return fmx__reply_error("a request without a kind%s", "");
    if (strcmp(kind, "echo") == 0) { /* the channel's encoding, both ways */
        cJSON *r = cJSON_CreateObject();
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(rq, "value");
        if (r) cJSON_AddItemToObject(r, "value", v ? cJSON_Duplicate(v, 1) : cJSON_CreateNull());
        return r;
    }
    if (strcmp(kind, "selftest") == 0) {
        char detail[1024] = "";
        const char *what = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(rq, "what"));
        int ok = fmx_worker_selftest(what ? what : "", detail, sizeof detail);
        if (ok == FMX_ENOMEM) return NULL;
        cJSON *r = cJSON_CreateObject();
        cJSON_AddBoolToObject(r, "ok", ok == 1);
        cJSON_AddStringToObject(r, "detail", detail);
        return r;
    }
    const char *tid = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(rq, "task"));
    const fmx_task *task = tid ? fmx_tasks_find(w->tasks, tid) : NULL;
    if (!task) return fmx__reply_error("no task '%s' in this worker", tid ? tid : "");
    fmx_step_plan plan = {0};
    plan.ctx = (fmx_tool_ctx){.task = task,
                              .reward = w->reward,
                              .max_code_bytes = (size_t)fmx_tree_num(rq, "max_code_bytes")};
    plan.heavy = 1;
    if (strcmp(kind, "grade") == 0) {
        const char *code = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(rq, "code"));
        const char *entry = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(rq, "entry"));
        if (!code || !entry) return fmx__reply_error("a grade request needs code and entry%s", "");
        fmx_grade g;
        if (fmx_tools_grade(&plan.ctx, code, strlen(code), entry, &g) != FMX_OK) return NULL;
        cJSON *r = cJSON_CreateObject();
        if (r) cJSON_AddItemToObject(r, "grade", fmx_grade_tree(&g));
        fmx_grade_clear(&g);
        return r;
    }
    if (strcmp(kind, "step") != 0) return fmx__reply_error("unknown request kind '%s'", kind);
    const cJSON *args = cJSON_GetObjectItemCaseSensitive(rq, "args");
    plan.tool = fmx__dup_arg(rq, "tool");
    plan.args = cJSON_IsObject(args) ? cJSON_Duplicate(args, 1) : NULL;
    plan.final = fmx_tree_flag(rq, "final");
    plan.finish = fmx_tree_flag(rq, "finish");
    plan.fallback_code = fmx__dup_arg(rq, "fallback_code");
    plan.fallback_entry = fmx__dup_arg(rq, "fallback_entry");
    cJSON *r = NULL;
    fmx_step_outcome out;
    if (plan.tool && (!cJSON_IsObject(args) || plan.args) &&
        fmx_episode_execute(&plan, &out) == FMX_OK) {
        r = fmx_outcome_tree(&out);
        fmx_step_outcome_clear(&out);
    }
    fmx_step_plan_clear(&plan);
    return r;
}

static void fmx__send_tree(int fd, const cJSON *j) {
    char *buf = NULL;
    size_t len = 0;
    if (fmx_channel_encode(j, &buf, &len) != FMX_OK) _exit(FMX__EXIT_OOM);
    if (fmx_channel_write_all(fd, buf, len) != 0) _exit(0); /* the server is gone */
    free(buf);
}

/* A worker's life after fork (or exec): sandbox, say ready, serve. */
static void __attribute__((noreturn)) fmx__worker_run(int fd, const fmx__wctx *w) {
    char err[1024] = "";
    size_t vm = 0, limit = 0;
    cJSON *hello = cJSON_CreateObject();
    if (fmx__sandbox(w, err, sizeof err, &vm, &limit) != 0) {
        cJSON_AddFalseToObject(hello, "ready");
        cJSON_AddStringToObject(hello, "error", err);
        fmx__send_tree(fd, hello);
        _exit(FMX__EXIT_SETUP);
    }
    cJSON_AddTrueToObject(hello, "ready");
    cJSON_AddNumberToObject(hello, "pid", (double)getpid());
    cJSON_AddNumberToObject(hello, "vm_mb", (double)(vm >> 20));
    cJSON_AddNumberToObject(hello, "limit_mb", (double)(limit >> 20));
    fmx__send_tree(fd, hello);
    cJSON_Delete(hello);
    for (;;) {
        char *msg = NULL;
        size_t len = 0;
        int rc = fmx_channel_read_msg(fd, &msg, &len);
        if (rc <= 0) _exit(0); /* the server closed the channel */
        cJSON *rq = fmx_channel_decode(msg, len);
        free(msg);
        if (!rq) _exit(FMX__EXIT_OOM); /* the server's encoding is sound: out of memory */
        fmx__arm_cpu(w->cpu_s);
        /* the pool kills this worker at eval_timeout_s: evaluations end first */
        double budget = fmx_eval_budget_s(w->eval_timeout_s);
        fmx_evaluator_set_deadline(budget > 0 ? fmx_evaluator_now() + budget : 0);
        fmx_evaluator_take_fate(NULL, 0);
        cJSON *reply = fmx__job(w, rq);
        cJSON_Delete(rq);
        if (!reply) _exit(FMX__EXIT_OOM);
        char why[256];
        fmx_eval_fate fate = fmx_evaluator_take_fate(why, sizeof why);
        if (fate != FMX_EVAL_OK) { /* the step's fate, as if the worker had died of it */
            cJSON_Delete(reply);
            reply = cJSON_CreateObject();
            cJSON_AddStringToObject(reply, "fate", fmx_eval_fate_name(fate));
            cJSON_AddStringToObject(reply, "why", why);
        }
        fmx__send_tree(fd, reply);
        cJSON_Delete(reply);
        if (!fmx_evaluator_shared_ok()) _exit(0); /* no evaluation process: be replaced */
    }
}

/* ---- the pool (server side) ---- */

typedef enum { FMX__EMPTY, FMX__STARTING, FMX__IDLE, FMX__BUSY } fmx__state;

typedef struct fmx__pjob {
    struct fmx__pjob *next;
    cJSON *request; /* owned */
    void *user;
    int tries; /* dispatches that failed before the worker got the request */
} fmx__pjob;

typedef struct {
    fmx__state state;
    pid_t pid;
    int fd;
    fmx__pjob *job;
    double t0, deadline;
    unsigned char hdr[4];
    size_t hdr_got;
    char *msg;
    size_t msg_len, msg_got;
    char start_error[512]; /* what a worker that failed to start said */
} fmx__proc;

struct fmx_pool {
    fmx_pool_config cfg;
    const fmx_tasks *tasks;
    const fmx_reward_config *reward;
    fmx__wctx wctx;
    fmx__proc *procs;
    int n;
    fmx__pjob *qhead, *qtail;
    int queued;
    int start_failures; /* consecutive deaths while starting */
    double next_spawn;  /* earliest time for the next spawn after a failed start */
    char **argv;        /* exec mode */
    pid_t spawner;      /* fork mode: the clean process workers are forked from */
    int spawner_fd;     /* its control socket; -1: fork from this process */
    fmx_pool_stats stats;
    char last_start_error[512];
};

fmx_pool_config fmx_pool_config_default(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return (fmx_pool_config){.workers = n > 0 ? (int)n : 1,
                             .threads = 1,
                             .mem_mb = 4096,
                             .eval_timeout_s = 30,
                             .cpu_s = 0,
                             .exec = 0,
                             .exe = NULL,
                             .tasks_dir = NULL,
                             .device = "cpu",
                             .reward_path = NULL,
                             .start_timeout_s = 120};
}

const char *fmx_fate_name(fmx_fate f) {
    static const char *names[] = {"ok", "timeout", "oom", "crashed"};
    return (unsigned)f < 4 ? names[f] : "crashed";
}

static int fmx__is_cpu(const char *device) {
    return !device || strcmp(device, "cpu") == 0;
}

double fmx_pool_cpu_budget(const fmx_pool_config *c) {
    if (c->cpu_s > 0) return c->cpu_s;
    return c->eval_timeout_s * (c->threads > 0 ? c->threads : 1) + 1;
}

/* Builds `fmx worker ...` for exec mode. */
static int fmx__build_argv(fmx_pool *p) {
    const fmx_pool_config *c = &p->cfg;
    char num[5][32];
    snprintf(num[4], sizeof num[4], "%.17g", c->eval_timeout_s);
    snprintf(num[0], sizeof num[0], "%d", FMX_CHANNEL_FD);
    snprintf(num[1], sizeof num[1], "%ld", c->mem_mb);
    snprintf(num[2], sizeof num[2], "%d", c->threads > 0 ? c->threads : 1);
    snprintf(num[3], sizeof num[3], "%.17g", fmx_pool_cpu_budget(c));
    const char *v[20];
    int k = 0;
    v[k++] = c->exe ? c->exe : "/proc/self/exe";
    v[k++] = "worker";
    v[k++] = "--fd";
    v[k++] = num[0];
    v[k++] = "--tasks";
    v[k++] = c->tasks_dir;
    v[k++] = "--device";
    v[k++] = c->device ? c->device : "cpu";
    v[k++] = "--mem";
    v[k++] = num[1];
    v[k++] = "--threads";
    v[k++] = num[2];
    v[k++] = "--cpu";
    v[k++] = num[3];
    v[k++] = "--timeout";
    v[k++] = num[4];
    if (c->reward_path) {
        v[k++] = "--reward";
        v[k++] = c->reward_path;
    }
    p->argv = calloc((size_t)k + 1, sizeof *p->argv);
    if (!p->argv) return FMX_ENOMEM;
    for (int i = 0; i < k; i++)
        if (!(p->argv[i] = strdup(v[i]))) return FMX_ENOMEM;
    return FMX_OK;
}

/* The code of a new worker process (fork mode: never returns; exec mode:
 * only if exec fails). */
static void __attribute__((noreturn)) fmx__worker_child(fmx_pool *p, int chan, pid_t server) {
    if (fmx__child_basics(server) != 0) _exit(FMX__EXIT_SETUP);
    fmx__close_fds(chan);
    if (p->argv) {
        execv(p->argv[0], p->argv);
        char why[512];
        snprintf(why, sizeof why, "cannot run %s: %s", p->argv[0], strerror(errno));
        cJSON *hello = cJSON_CreateObject();
        cJSON_AddFalseToObject(hello, "ready");
        cJSON_AddStringToObject(hello, "error", why);
        fmx__send_tree(FMX_CHANNEL_FD, hello);
        _exit(FMX__EXIT_SETUP);
    }
    fmx__unmap_shared();
    fmx__worker_run(FMX_CHANNEL_FD, &p->wctx);
}

/* ---- the spawner ----
 *
 * Workers forked straight from a running server would inherit its memory
 * image (other episodes' code and observations, the log's page cache) and
 * its log's shared WAL index. So in fork mode one process is forked at pool
 * creation, before the server opens its log or ZeroMQ, and every worker is
 * forked from it: it double-forks, and the worker, orphaned, is adopted by
 * the server (PR_SET_CHILD_SUBREAPER), which reaps and kills it like any
 * child. Protocol on its socket: the server writes one byte; the spawner
 * answers the worker's pid (an int, -1 on failure) with the server's end of
 * the worker's channel attached (SCM_RIGHTS). */

static int fmx__send_fd(int sock, pid_t pid, int fd) {
    char cbuf[CMSG_SPACE(sizeof(int))];
    memset(cbuf, 0, sizeof cbuf);
    struct iovec iov = {&pid, sizeof pid};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        m.msg_control = cbuf;
        m.msg_controllen = sizeof cbuf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    ssize_t k;
    while ((k = sendmsg(sock, &m, MSG_NOSIGNAL)) < 0 && errno == EINTR) {
    }
    return k == (ssize_t)sizeof pid ? 0 : -1;
}

/* Receives a pid and a descriptor; waits at most 10 s. */
static int fmx__recv_fd(int sock, pid_t *pid, int *fd) {
    struct pollfd pf = {sock, POLLIN, 0};
    if (poll(&pf, 1, 10000) != 1) return -1;
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {pid, sizeof *pid};
    struct msghdr m = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    ssize_t k;
    while ((k = recvmsg(sock, &m, MSG_CMSG_CLOEXEC)) < 0 && errno == EINTR) {
    }
    *fd = -1;
    struct cmsghdr *c = k == (ssize_t)sizeof *pid ? CMSG_FIRSTHDR(&m) : NULL;
    if (c && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
        memcpy(fd, CMSG_DATA(c), sizeof(int));
    if (*pid <= 0 || *fd < 0) {
        if (*fd >= 0) close(*fd);
        return -1;
    }
    return 0;
}

static void __attribute__((noreturn)) fmx__spawner_run(fmx_pool *p, int ctl, pid_t server) {
    if (fmx__child_basics(server) != 0) _exit(FMX__EXIT_SETUP);
    fmx__close_fds(ctl);
    ctl = FMX_CHANNEL_FD;
    prctl(PR_SET_NAME, "fmx-spawner");
    for (;;) {
        char c;
        ssize_t k = read(ctl, &c, 1);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) _exit(0); /* the server is gone */
        int sv[2] = {-1, -1}, pp[2] = {-1, -1};
        pid_t worker = -1;
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0 &&
            pipe2(pp, O_CLOEXEC) == 0) {
            pid_t mid = fork();
            if (mid == 0) {
                pid_t wp = fork();
                if (wp == 0) {
                    close(ctl);
                    close(pp[0]);
                    close(pp[1]);
                    close(sv[0]);
                    fmx__worker_child(p, sv[1], server);
                }
                ssize_t wr = write(pp[1], &wp, sizeof wp);
                _exit(wr == (ssize_t)sizeof wp ? 0 : 1);
            }
            close(pp[1]);
            pp[1] = -1;
            if (mid > 0) {
                if (read(pp[0], &worker, sizeof worker) != (ssize_t)sizeof worker) worker = -1;
                waitpid(mid, NULL, 0);
            }
        }
        if (fmx__send_fd(ctl, worker, worker > 0 ? sv[0] : -1) != 0) _exit(0);
        for (int i = 0; i < 2; i++) {
            if (sv[i] >= 0) close(sv[i]);
            if (pp[i] >= 0) close(pp[i]);
        }
    }
}

/* Starts the spawner (fork mode). Without one, workers are forked from this
 * process (and unmap its shared mappings). */
static void fmx__spawner_start(fmx_pool *p) {
    p->spawner = -1;
    p->spawner_fd = -1;
    int sv[2];
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) return;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return;
    pid_t server = getpid();
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[0]);
        fmx__spawner_run(p, sv[1], server);
    }
    close(sv[1]);
    if (pid < 0) {
        close(sv[0]);
        return;
    }
    p->spawner = pid;
    p->spawner_fd = sv[0];
}

static void fmx__spawner_stop(fmx_pool *p) {
    if (p->spawner_fd >= 0) close(p->spawner_fd);
    if (p->spawner > 0) {
        kill(p->spawner, SIGKILL);
        while (waitpid(p->spawner, NULL, 0) < 0 && errno == EINTR) {
        }
    }
    p->spawner = -1;
    p->spawner_fd = -1;
}

/* Starts a worker in slot w. Returns 0 or -1 (fork failed; retried later). */
static int fmx__spawn(fmx_pool *p, fmx__proc *w) {
    pid_t pid = -1;
    int fd = -1;
    if (p->spawner_fd >= 0) {
        if (write(p->spawner_fd, "s", 1) == 1 && fmx__recv_fd(p->spawner_fd, &pid, &fd) == 0) {
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
            *w = (fmx__proc){.state = FMX__STARTING, .pid = pid, .fd = fd, .t0 = fmx__mono()};
            return 0;
        }
        fprintf(stderr, "fmx: the worker spawner failed; forking workers from this process "
                        "from now on\n");
        fmx__spawner_stop(p);
    }
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return -1;
    pid_t parent = getpid();
    fflush(stdout);
    fflush(stderr);
    pid = fork();
    if (pid < 0) {
        close(sv[0]);
        close(sv[1]);
        return -1;
    }
    if (pid == 0) fmx__worker_child(p, sv[1], parent);
    close(sv[1]);
    fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK);
    *w = (fmx__proc){.state = FMX__STARTING, .pid = pid, .fd = sv[0], .t0 = fmx__mono()};
    return 0;
}

/* Classifies a dead worker's wait status. */
static fmx_fate fmx__classify(int st, int killed, const fmx_pool *p, char *why, size_t n) {
    if (killed) {
        snprintf(why, n, "ran past the %g s wall-clock limit; the worker was killed",
                 p->cfg.eval_timeout_s);
        return FMX_FATE_TIMEOUT;
    }
    if (WIFSIGNALED(st)) {
        int sig = WTERMSIG(st);
        if (sig == SIGXCPU) {
            snprintf(why, n, "used up its CPU-time budget (%g s)", fmx_pool_cpu_budget(&p->cfg));
            return FMX_FATE_TIMEOUT;
        }
        if (sig == SIGKILL) {
            snprintf(why, n,
                     "the worker was killed (SIGKILL from outside fmx: the kernel's "
                     "out-of-memory killer, most likely)");
            return FMX_FATE_OOM;
        }
        snprintf(why, n, "the worker died of signal %d (%s)", sig, strsignal(sig));
        return FMX_FATE_CRASHED;
    }
    int code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    if (code == FMX__EXIT_OOM) {
        snprintf(why, n, "the worker ran out of memory (limit: %ld MiB past its start-up size)",
                 p->cfg.mem_mb);
        return FMX_FATE_OOM;
    }
    if (code == FMX__EXIT_SETUP)
        snprintf(why, n, "the worker could not set itself up (exit status %d)", code);
    else
        snprintf(why, n, "the worker exited with status %d", code);
    return FMX_FATE_CRASHED;
}

/* Reaps a worker whose channel closed (or that we killed) and empties its
 * slot; returns its wait status. */
static int fmx__reap(fmx_pool *p, fmx__proc *w, int kill_it) {
    int st = 0;
    if (kill_it) kill(w->pid, SIGKILL);
    /* A worker closes its channel as it dies: waiting is short. A worker
     * that closed it but lives on is killed after 2 s; one the spawner made
     * may not be adopted yet for a moment (ECHILD). */
    for (int i = 0; i < 4000; i++) {
        pid_t r = waitpid(w->pid, &st, WNOHANG);
        if (r == w->pid) break;
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno != ECHILD) break;
        if (i == 2000) kill(w->pid, SIGKILL);
        usleep(500);
    }
    if (w->fd >= 0) close(w->fd);
    free(w->msg);
    if (w->state == FMX__STARTING) {
        p->start_failures++;
        double delay = 0.05 * (double)(1 << (p->start_failures < 7 ? p->start_failures : 7));
        p->next_spawn =
            fmx__mono() + (delay < FMX__RESTART_MAX_DELAY_S ? delay : FMX__RESTART_MAX_DELAY_S);
    }
    *w = (fmx__proc){.state = FMX__EMPTY, .fd = -1};
    p->stats.restarts++;
    return st;
}

/* A busy worker's job failed: report it. */
static void fmx__fail_job(fmx_pool *p, fmx__pjob *job, fmx_fate fate, const char *why, double ms,
                          fmx_pool_done_fn done, void *ctx) {
    fmx_pool_result res = {.fate = fate, .ms = ms};
    snprintf(res.why, sizeof res.why, "%s", why);
    if (fate == FMX_FATE_TIMEOUT) p->stats.timeouts++;
    if (fate == FMX_FATE_OOM) p->stats.ooms++;
    if (fate == FMX_FATE_CRASHED) p->stats.crashes++;
    cJSON_Delete(job->request);
    void *user = job->user;
    free(job);
    if (done) done(ctx, user, &res);
}

/* Kills/reaps w (a death or a deadline) and reports its job if it had one. */
static void fmx__worker_gone(fmx_pool *p, fmx__proc *w, int timed_out, const char *protocol_why,
                             fmx_pool_done_fn done, void *ctx, int *finished) {
    fmx__pjob *job = w->job;
    double ms = (fmx__mono() - w->t0) * 1e3;
    int starting = w->state == FMX__STARTING;
    int st = fmx__reap(p, w, timed_out || protocol_why != NULL);
    char why[256];
    fmx_fate fate =
        protocol_why ? FMX_FATE_CRASHED : fmx__classify(st, timed_out, p, why, sizeof why);
    if (protocol_why) snprintf(why, sizeof why, "%s", protocol_why);
    if (starting) {
        if (!p->last_start_error[0])
            snprintf(p->last_start_error, sizeof p->last_start_error,
                     "a worker could not start: %s", why);
        fprintf(stderr, "fmx: %s\n", p->last_start_error);
    }
    if (job) {
        fmx__fail_job(p, job, fate, why, ms, done, ctx);
        (*finished)++;
    }
}

/* One whole message from w, if any: 1 with w->msg complete, 0 not yet, -1 EOF/error. */
static int fmx__proc_read(fmx__proc *w) {
    for (;;) {
        if (w->hdr_got < 4) {
            ssize_t k = recv(w->fd, w->hdr + w->hdr_got, 4 - w->hdr_got, MSG_DONTWAIT);
            if (k < 0 && errno == EINTR) continue;
            if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
            if (k <= 0) return -1;
            w->hdr_got += (size_t)k;
            if (w->hdr_got < 4) continue;
            w->msg_len = (size_t)w->hdr[0] | (size_t)w->hdr[1] << 8 | (size_t)w->hdr[2] << 16 |
                         (size_t)w->hdr[3] << 24;
            if (w->msg_len > FMX_CHANNEL_MAX_MSG) return -1;
            w->msg = malloc(w->msg_len + 1);
            w->msg_got = 0;
            if (!w->msg) return -1;
        }
        if (w->msg_got == w->msg_len) return 1;
        ssize_t k = recv(w->fd, w->msg + w->msg_got, w->msg_len - w->msg_got, MSG_DONTWAIT);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
        if (k <= 0) return -1;
        w->msg_got += (size_t)k;
    }
}

/* Writes a whole request to a worker that waits for one; bounded. */
static int fmx__proc_send(fmx__proc *w, const char *buf, size_t len) {
    double end = fmx__mono() + FMX__SEND_WAIT_S;
    while (len) {
        ssize_t k = send(w->fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k > 0) {
            buf += k;
            len -= (size_t)k;
            continue;
        }
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && fmx__mono() < end) {
            struct pollfd pf = {w->fd, POLLOUT, 0};
            poll(&pf, 1, 100);
            continue;
        }
        return -1;
    }
    return 0;
}

int fmx_pool_submit(fmx_pool *p, cJSON *request, void *job) {
    fmx__pjob *j = calloc(1, sizeof *j);
    if (!j || !request) {
        free(j);
        cJSON_Delete(request);
        return FMX_ENOMEM;
    }
    j->request = request;
    j->user = job;
    if (p->qtail)
        p->qtail->next = j;
    else
        p->qhead = j;
    p->qtail = j;
    p->queued++;
    return FMX_OK;
}

static void fmx__requeue_front(fmx_pool *p, fmx__pjob *j) {
    j->next = p->qhead;
    p->qhead = j;
    if (!p->qtail) p->qtail = j;
    p->queued++;
}

/* Reaps children that are not the pool's (the pool's process is a child
 * subreaper: anything orphaned below it ends up here). */
static void fmx__reap_strays(const fmx_pool *p) {
    for (;;) {
        siginfo_t si;
        memset(&si, 0, sizeof si);
        if (waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) != 0 || si.si_pid == 0) return;
        int ours = si.si_pid == p->spawner;
        for (int i = 0; i < p->n && !ours; i++)
            ours = p->procs[i].state != FMX__EMPTY && p->procs[i].pid == si.si_pid;
        if (ours) return; /* reaped when its channel closes */
        waitpid(si.si_pid, NULL, WNOHANG);
    }
}

int fmx_pool_service(fmx_pool *p, fmx_pool_done_fn done, void *ctx) {
    int finished = 0;
    double now = fmx__mono();
    if (p->spawner > 0) fmx__reap_strays(p);
    /* replies, ready messages and deaths */
    for (int i = 0; i < p->n; i++) {
        fmx__proc *w = &p->procs[i];
        while (w->state != FMX__EMPTY) {
            int r = fmx__proc_read(w);
            if (r == 0) break;
            if (r < 0) {
                fmx__worker_gone(p, w, 0, NULL, done, ctx, &finished);
                break;
            }
            cJSON *m = fmx_channel_decode(w->msg, w->msg_len);
            free(w->msg);
            w->msg = NULL;
            w->hdr_got = 0;
            if (!m) {
                fmx__worker_gone(p, w, 0, "the worker's reply could not be read", done, ctx,
                                 &finished);
                break;
            }
            if (w->state == FMX__STARTING) {
                if (fmx_tree_flag(m, "ready")) {
                    w->state = FMX__IDLE;
                    p->start_failures = 0;
                    p->last_start_error[0] = 0;
                } else {
                    const char *e =
                        cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "error"));
                    snprintf(p->last_start_error, sizeof p->last_start_error,
                             "a worker could not start: %s", e ? e : "?");
                }
                cJSON_Delete(m);
                continue;
            }
            if (w->state != FMX__BUSY) {
                cJSON_Delete(m);
                fmx__worker_gone(p, w, 0, "the worker sent a message nobody asked for", done, ctx,
                                 &finished);
                break;
            }
            fmx__pjob *job = w->job;
            fmx_pool_result res = {.fate = FMX_FATE_OK, .ms = (now - w->t0) * 1e3, .reply = m};
            /* {"fate", "why"}: the job's candidate timed out, ran out of
             * memory or crashed in its evaluation process (the worker lives) */
            const char *fate = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "fate"));
            if (fate) {
                res.fate = strcmp(fate, "timeout") == 0 ? FMX_FATE_TIMEOUT
                           : strcmp(fate, "oom") == 0   ? FMX_FATE_OOM
                                                        : FMX_FATE_CRASHED;
                const char *why = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "why"));
                snprintf(res.why, sizeof res.why, "%s", why ? why : fate);
                if (res.fate == FMX_FATE_TIMEOUT) p->stats.timeouts++;
                if (res.fate == FMX_FATE_OOM) p->stats.ooms++;
                if (res.fate == FMX_FATE_CRASHED) p->stats.crashes++;
                cJSON_Delete(m);
                res.reply = NULL;
            }
            w->job = NULL;
            w->state = FMX__IDLE;
            cJSON_Delete(job->request);
            void *user = job->user;
            free(job);
            finished++;
            if (done) done(ctx, user, &res);
            cJSON_Delete(res.reply);
        }
    }
    /* deadlines */
    now = fmx__mono();
    for (int i = 0; i < p->n; i++) {
        fmx__proc *w = &p->procs[i];
        if (w->state == FMX__BUSY && now >= w->deadline)
            fmx__worker_gone(p, w, 1, NULL, done, ctx, &finished);
    }
    /* replacements */
    for (int i = 0; i < p->n; i++) {
        fmx__proc *w = &p->procs[i];
        if (w->state == FMX__EMPTY && now >= p->next_spawn && fmx__spawn(p, w) != 0) {
            p->next_spawn = now + 1.0; /* fork failed: try again in a second */
            break;
        }
    }
    /* No worker could start for a while and none is up: fail what waits
     * rather than hang it. */
    int up = 0;
    for (int i = 0; i < p->n; i++)
        up += p->procs[i].state == FMX__IDLE || p->procs[i].state == FMX__BUSY;
    while (!up && p->start_failures >= FMX__START_FAILURES_MAX && p->qhead) {
        fmx__pjob *j = p->qhead;
        p->qhead = j->next;
        if (!p->qhead) p->qtail = NULL;
        p->queued--;
        char why[600];
        snprintf(why, sizeof why, "no worker process could start (%s)",
                 p->last_start_error[0] ? p->last_start_error : "?");
        fmx__fail_job(p, j, FMX_FATE_CRASHED, why, 0, done, ctx);
        finished++;
    }
    /* dispatch */
    for (int i = 0; i < p->n && p->qhead; i++) {
        fmx__proc *w = &p->procs[i];
        if (w->state != FMX__IDLE) continue;
        fmx__pjob *j = p->qhead;
        p->qhead = j->next;
        if (!p->qhead) p->qtail = NULL;
        p->queued--;
        j->next = NULL;
        char *buf = NULL;
        size_t len = 0;
        if (fmx_channel_encode(j->request, &buf, &len) != FMX_OK) {
            fmx__fail_job(p, j, FMX_FATE_OOM, "out of memory encoding the request", 0, done, ctx);
            finished++;
            i--;
            continue;
        }
        w->t0 = fmx__mono();
        w->deadline = w->t0 + p->cfg.eval_timeout_s;
        int sent = fmx__proc_send(w, buf, len) == 0;
        free(buf);
        if (sent) {
            w->state = FMX__BUSY;
            w->job = j;
            p->stats.jobs++;
            continue;
        }
        /* the worker died before it got the request: another one runs it */
        fmx__worker_gone(p, w, 0, NULL, done, ctx, &finished);
        if (++j->tries < 3) {
            fmx__requeue_front(p, j);
        } else {
            fmx__fail_job(p, j, FMX_FATE_CRASHED, "no worker could take the job", 0, done, ctx);
            finished++;
        }
    }
    return finished;
}

int fmx_pool_fds(const fmx_pool *p, int *fds, int cap) {
    int k = 0;
    for (int i = 0; i < p->n && k < cap; i++)
        if (p->procs[i].state != FMX__EMPTY) fds[k++] = p->procs[i].fd;
    return k;
}

int fmx_pool_wait_ms(const fmx_pool *p, int cap_ms) {
    double now = fmx__mono(), next = now + cap_ms / 1e3;
    for (int i = 0; i < p->n; i++) {
        const fmx__proc *w = &p->procs[i];
        if (w->state == FMX__BUSY && w->deadline < next) next = w->deadline;
        if (w->state == FMX__EMPTY && p->next_spawn < next) next = p->next_spawn;
        if (w->state == FMX__IDLE && p->qhead) next = now;
    }
    double ms = (next - now) * 1e3;
    return ms <= 0 ? 0 : (int)ceil(ms);
}

void *fmx_pool_take(fmx_pool *p) {
    if (p->qhead) {
        fmx__pjob *j = p->qhead;
        p->qhead = j->next;
        if (!p->qhead) p->qtail = NULL;
        p->queued--;
        void *user = j->user;
        cJSON_Delete(j->request);
        free(j);
        return user;
    }
    for (int i = 0; i < p->n; i++) {
        fmx__proc *w = &p->procs[i];
        if (w->state != FMX__BUSY) continue;
        fmx__pjob *j = w->job;
        w->job = NULL;
        fmx__reap(p, w, 1);
        void *user = j->user;
        cJSON_Delete(j->request);
        free(j);
        return user;
    }
    return NULL;
}

fmx_pool_stats fmx_pool_stats_get(const fmx_pool *p) {
    fmx_pool_stats s = p->stats;
    s.workers = p->n;
    s.ready = s.busy = 0;
    for (int i = 0; i < p->n; i++) {
        s.ready += p->procs[i].state == FMX__IDLE || p->procs[i].state == FMX__BUSY;
        s.busy += p->procs[i].state == FMX__BUSY;
    }
    s.queued = p->queued;
    return s;
}

int fmx_pool_create(const fmx_pool_config *cfg, const fmx_tasks *tasks,
                    const fmx_reward_config *reward, fmx_pool **out, char *err, size_t errsz) {
    *out = NULL;
    fmx_pool *p = calloc(1, sizeof *p);
    if (!p) {
        snprintf(err, errsz, "out of memory");
        return FMX_ENOMEM;
    }
    p->cfg = *cfg;
    p->spawner = -1;
    p->spawner_fd = -1;
    if (p->cfg.workers < 1) p->cfg.workers = 1;
    if (p->cfg.threads < 1) p->cfg.threads = 1;
    if (!(p->cfg.eval_timeout_s > 0)) p->cfg.eval_timeout_s = 30;
    if (!fmx__is_cpu(p->cfg.device)) p->cfg.exec = 1; /* CUDA does not survive fork */
    p->tasks = tasks;
    p->reward = reward;
    p->wctx = (fmx__wctx){.tasks = tasks,
                          .reward = reward,
                          .threads = p->cfg.threads,
                          .mem_mb = p->cfg.mem_mb,
                          .cpu_s = fmx_pool_cpu_budget(&p->cfg),
                          .cpu_device = fmx__is_cpu(p->cfg.device),
                          .full_warmup = 0,
                          .eval_timeout_s = p->cfg.eval_timeout_s,
                          .device = p->cfg.device};
    p->n = p->cfg.workers;
    p->procs = calloc((size_t)p->n, sizeof *p->procs);
    if (!p->procs || (p->cfg.exec && (!p->cfg.tasks_dir || fmx__build_argv(p) != FMX_OK))) {
        snprintf(err, errsz, p->procs ? "exec mode needs the tasks directory" : "out of memory");
        fmx_pool_destroy(p);
        return FMX_EINVAL;
    }
    for (int i = 0; i < p->n; i++)
        p->procs[i] = (fmx__proc){.state = FMX__EMPTY, .fd = -1};
    if (!p->cfg.exec) {
        /* Warm up here: the workers inherit it (and the packs' state). */
        char werr[1024] = "";
        if (fmx__warmup(NULL, reward, werr, sizeof werr) != FMX_OK)
            fprintf(stderr, "fmx serve: warm-up: %s (continuing)\n", werr);
        fmx__spawner_start(p);
    }
    for (int i = 0; i < p->n; i++)
        if (fmx__spawn(p, &p->procs[i]) != 0) {
            snprintf(err, errsz, "cannot start worker processes: %s", strerror(errno));
            fmx_pool_destroy(p);
            return FMX_EINTERNAL;
        }
    double end = fmx__mono() + (cfg->start_timeout_s > 0 ? cfg->start_timeout_s : 120);
    for (;;) {
        fmx_pool_stats s = fmx_pool_stats_get(p);
        if (s.ready == p->n) break;
        int starting = 0;
        for (int i = 0; i < p->n; i++)
            starting += p->procs[i].state == FMX__STARTING;
        if (p->start_failures > 0 || (starting == 0 && s.ready < p->n) || fmx__mono() > end) {
            snprintf(err, errsz, "%s",
                     p->last_start_error[0] ? p->last_start_error
                                            : "the worker processes did not start in time");
            fmx_pool_destroy(p);
            return FMX_EINTERNAL;
        }
        struct pollfd pf[1024];
        int k = 0;
        for (int i = 0; i < p->n && k < 1024; i++)
            if (p->procs[i].state == FMX__STARTING)
                pf[k++] = (struct pollfd){p->procs[i].fd, POLLIN, 0};
        poll(pf, (nfds_t)k, 100);
        fmx_pool_service(p, NULL, NULL);
    }
    *out = p;
    return FMX_OK;
}

void fmx_pool_destroy(fmx_pool *p) {
    if (!p) return;
    for (int i = 0; p->procs && i < p->n; i++) {
        fmx__proc *w = &p->procs[i];
        if (w->state == FMX__EMPTY) continue;
        if (w->job) {
            cJSON_Delete(w->job->request);
            free(w->job);
            w->job = NULL;
        }
        kill(w->pid, SIGKILL);
    }
    for (int i = 0; p->procs && i < p->n; i++)
        if (p->procs[i].state != FMX__EMPTY) fmx__reap(p, &p->procs[i], 0);
    fmx__spawner_stop(p);
    for (fmx__pjob *j = p->qhead, *next; j; j = next) {
        next = j->next;
        cJSON_Delete(j->request);
        free(j);
    }
    for (int i = 0; p->argv && p->argv[i]; i++)
        free(p->argv[i]);
    free(p->argv);
    free(p->procs);
    free(p);
}

/* ---- outcomes of step jobs (the rest: env/outcome.c) ---- */

int fmx_pool_outcome(const fmx_pool *p, const fmx_step_plan *plan, fmx_pool_result *res,
                     fmx_step_outcome *out) {
    memset(out, 0, sizeof *out);
    fmx_fate fate = res->fate;
    char why[512];
    snprintf(why, sizeof why, "%s", res->why);
    if (fate == FMX_FATE_OK) {
        const char *e = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(res->reply, "error"));
        int rc = e ? FMX_EFORMAT : fmx_outcome_from_tree(res->reply, out);
        if (rc == FMX_OK || rc == FMX_ENOMEM) return rc;
        fate = FMX_FATE_CRASHED;
        snprintf(why, sizeof why, "%s", e ? e : "the worker's reply is malformed");
    }
    int rc = fmx_fate_outcome(&p->cfg, plan, fate, why, out);
    if (rc == FMX_OK) out->ms = res->ms;
    return rc;
}

void fmx_worker_scrub_counts(int *left, int *unmapped) {
    *left = fmx__shared_left;
    *unmapped = fmx__shared_unmapped;
}

/* ---- `fmx worker` (exec mode) ---- */

int fmx_worker_main(int argc, char **argv) {
    const char *tasks_dir = NULL, *device = "cpu", *reward_path = NULL;
    int fd = -1, threads = 1;
    long mem_mb = 4096;
    double cpu_s = 31, timeout_s = 30;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *a = argv[i], *v = argv[i + 1];
        if (strcmp(a, "--fd") == 0)
            fd = atoi(v);
        else if (strcmp(a, "--tasks") == 0)
            tasks_dir = v;
        else if (strcmp(a, "--device") == 0)
            device = v;
        else if (strcmp(a, "--reward") == 0)
            reward_path = v;
        else if (strcmp(a, "--mem") == 0)
            mem_mb = atol(v);
        else if (strcmp(a, "--threads") == 0)
            threads = atoi(v);
        else if (strcmp(a, "--cpu") == 0)
            cpu_s = atof(v);
        else if (strcmp(a, "--timeout") == 0)
            timeout_s = atof(v);
    }
    if (fd < 0 || fcntl(fd, F_GETFD) < 0 || !tasks_dir) {
        fprintf(stderr,
                "fmx worker: internal subcommand of fmx serve (needs --fd N --tasks DIR)\n");
        return 2;
    }
    char err[2048] = "";
    static fmx_reward_config reward;
    reward = fmx_reward_config_default();
    fmx_tasks *tasks = NULL;
    int rc = reward_path ? fmx_reward_config_load(reward_path, &reward, err, sizeof err) : FMX_OK;
    if (rc == FMX_OK) rc = fmx_engine_set_device(device, err, sizeof err);
    if (rc == FMX_OK) rc = fmx_tasks_open(tasks_dir, &tasks, NULL, err, sizeof err);
    if (rc != FMX_OK) {
        cJSON *hello = cJSON_CreateObject();
        cJSON_AddFalseToObject(hello, "ready");
        cJSON_AddStringToObject(hello, "error", err);
        fmx__send_tree(fd, hello);
        return FMX__EXIT_SETUP;
    }
    fmx__wctx w = {.tasks = tasks,
                   .reward = &reward,
                   .threads = threads,
                   .mem_mb = mem_mb,
                   .cpu_s = cpu_s,
                   .cpu_device = fmx__is_cpu(device),
                   .full_warmup = 1,
                   .eval_timeout_s = timeout_s,
                   .device = device};
    fmx__worker_run(fd, &w);
}
