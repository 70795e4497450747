/*
 * worker.h — the evaluation sandbox: a pool of worker PROCESSES that run
 * verify_component and submit (fmx_episode_execute, fmx_tools_grade) for the
 * server, so that untrusted candidate code never runs in the server process
 * (DESIGN.md, decision 8).
 *
 * Start-up. The server opens its packs, then creates the pool (before it
 * opens its log or ZeroMQ): the pool warms libtorch up in the server (one
 * compile, run and grade of a built-in program: the lazy initialisations
 * that open files happen now), then forks a SPAWNER, a process that does
 * nothing but fork workers (first ones and replacements alike) on request,
 * so that no worker ever inherits the memory of a running server (other
 * episodes' code and observations, the log's page cache and its shared WAL
 * index). The spawner double-forks; the worker is adopted by the server
 * (PR_SET_CHILD_SUBREAPER), which reaps and kills it as its own child, and
 * gets the worker's channel over SCM_RIGHTS. Workers share the packs' mmaps
 * and weight views copy-on-write. (Should the spawner die, workers are
 * forked from the server itself.) For a non-cpu device (CUDA does not
 * survive fork) or with `exec` set, a worker is fork+exec of `fmx worker`
 * (the hidden subcommand, fmx_worker_main), which opens the packs itself.
 * Each worker then, before its first job:
 *   - closes every file descriptor but its channel and stdio (no SQLite
 *     connection, no ZeroMQ context, no listening socket), stdin from
 *     /dev/null; unmaps every MAP_SHARED mapping it inherited (fork mode);
 *     its own process group; default signal handlers;
 *   - PR_SET_PDEATHSIG(SIGKILL) (it dies with the server), PR_SET_DUMPABLE 0,
 *     RLIMIT_CORE 0;
 *   - runs intra-op work on `threads` threads (at::set_num_threads), so no
 *     thread pool created before the fork is used;
 *   - warms up again (compile + run), then RLIMIT_AS = its address space
 *     now + mem_mb (cpu only: CUDA reserves terabytes of address space);
 *   - PR_SET_NO_NEW_PRIVS and a seccomp filter (libseccomp) under which
 *     socket/socketpair/bind/connect/listen/accept, fork, vfork, clone
 *     without CLONE_THREAD (clone3: ENOSYS, glibc falls back to clone),
 *     execve/execveat, open/openat/openat2/creat (any flags),
 *     open_by_handle_at, io_uring, ptrace, process_vm_*, bpf,
 *     perf_event_open, mount, chroot, path changes (unlink, rename, mkdir,
 *     link, symlink, chmod, chown, truncate, mknod) and kill/tgkill of another
 *     process fail with EPERM. On a non-cpu device opening files stays
 *     allowed (the CUDA driver opens device files lazily).
 * Before every job the worker re-arms RLIMIT_CPU's soft limit to its CPU time
 * so far + cpu_s (SIGXCPU ends a job that computes too long).
 *
 * Channel. One AF_UNIX stream socketpair per worker (opened before fork; the
 * worker creates no socket); a message is a 4-byte little-endian length and
 * that many bytes of one cJSON tree in a compact binary form that keeps what
 * JSON text loses (NaN, ±Inf, the float flag of fmx_proto_float), at most
 * 256 MiB, decoded with every length checked. Requests (as JSON):
 *   {"kind":"step", "task", "tool", "args", "final", "fallback_code",
 *    "fallback_entry", "max_code_bytes"}      fmx_episode_execute of a plan
 *   {"kind":"grade", "task", "code", "entry", "max_code_bytes"}
 *                                             fmx_tools_grade (a fallback)
 *   {"kind":"selftest", "what"}               fmx_worker_selftest
 *   {"kind":"echo", "value"}                  {"value"}: the encoding, both ways
 * Replies: the step outcome, {"grade": …} or {"ok", "detail"}; {"error": …}
 * for a request the worker cannot serve. The worker's first message is
 * {"ready": true, "pid", "vm_mb", "limit_mb"} (or {"ready": false, "error"}).
 *
 * Failures. The parent SIGKILLs a worker whose job runs past eval_timeout_s
 * (wall clock) and reaps it; every dead worker is reaped and replaced (a
 * worker that dies while starting is retried with a growing delay, up to
 * 5 s). The job's fate:
 *   timeout  — killed by the parent at the deadline, or SIGXCPU (CPU budget);
 *   oom      — out of memory: the worker exited because an allocation failed
 *              (FMX_ENOMEM from a job), died on a fatal signal with no
 *              address space left (probed in its signal handler), or was
 *              SIGKILLed by someone else (the kernel's OOM killer);
 *   crashed  — any other death (SIGSEGV, SIGABRT, an exit), or a reply that
 *              cannot be read.
 * Allocation failures libtorch catches itself (torch.empty(2**40) under
 * RLIMIT_AS) are ordinary run errors in the report; the worker lives on.
 *
 * Threads: the pool is used from one thread (the server's main thread: the
 * workers' PR_SET_PDEATHSIG follows the thread that adopted them). It never
 * blocks on a worker except for writing a request (bounded), asking the
 * spawner for a worker (bounded) and reaping a worker that closed its
 * channel. Creating a pool (fork mode) makes the calling process a child
 * subreaper, and fmx_pool_service reaps every child that is not the pool's:
 * not for a process that has children of its own to wait for.
 *
 * Not here: what a job does (env/episode.c, env/tools.c); the server loop
 * (env/server.c) which polls fmx_pool_fds and calls fmx_pool_service.
 */
#ifndef FMX_WORKER_H
#define FMX_WORKER_H

#include <stddef.h>

#include "episode.h"
#include "evaluator.h"
#include "rewards/reward.h"
#include "tasks.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int workers;             /* processes; default: online CPUs */
    int threads;             /* intra-op threads of each worker; 1 */
    long mem_mb;             /* MiB a worker may allocate past its start-up size (RLIMIT_AS);
                                4096; 0 = no limit */
    double eval_timeout_s;   /* wall clock per job; 30 */
    double cpu_s;            /* CPU seconds per job (RLIMIT_CPU); 0 = eval_timeout_s·threads + 1 */
    int exec;                /* start workers with fork+exec of `fmx worker`; implied by a
                                non-cpu device */
    const char *exe;         /* for exec: the fmx binary; NULL = /proc/self/exe */
    const char *tasks_dir;   /* for exec: --tasks DIR */
    const char *device;      /* "cpu" (default) or "cuda[:N]" */
    const char *reward_path; /* for exec: --reward FILE, NULL = default */
    double start_timeout_s;  /* how long fmx_pool_create waits for every worker; 120 */
} fmx_pool_config;

fmx_pool_config fmx_pool_config_default(void);

typedef enum { FMX_FATE_OK, FMX_FATE_TIMEOUT, FMX_FATE_OOM, FMX_FATE_CRASHED } fmx_fate;

/* "ok", "timeout", "oom", "crashed" (the observation's error codes). Static. */
const char *fmx_fate_name(fmx_fate f);

/* How a job ended. */
typedef struct {
    fmx_fate fate;
    char why[256]; /* on failure: what happened, e.g. "killed by signal 11 (Segmentation fault)" */
    double ms;     /* from dispatch to the reply or the worker's death */
    cJSON *reply;  /* FMX_FATE_OK: the worker's reply; owned by the pool until the callback
                      returns (take it by setting it to NULL) */
} fmx_pool_result;

/* Called by fmx_pool_service for each finished job, with the job pointer
 * given to fmx_pool_submit. It may submit new jobs. */
typedef void (*fmx_pool_done_fn)(void *ctx, void *job, fmx_pool_result *res);

typedef struct {
    int workers; /* configured */
    int ready;   /* alive and started */
    int busy;
    int queued;
    long long jobs, timeouts, ooms, crashes, restarts;
} fmx_pool_stats;

typedef struct fmx_pool fmx_pool;

/* Warms up, forks the workers and waits until every one is ready (or
 * start_timeout_s). tasks and reward are borrowed (the workers use their
 * copies). On failure err says why (a worker's own message when it could not
 * sandbox itself). Caller frees with fmx_pool_destroy. */
int fmx_pool_create(const fmx_pool_config *cfg, const fmx_tasks *tasks,
                    const fmx_reward_config *reward, fmx_pool **out, char *err, size_t errsz);
/* Kills (SIGKILL) and reaps every worker, frees queued requests. Jobs still
 * pending are not reported: take them first with fmx_pool_take. Accepts NULL. */
void fmx_pool_destroy(fmx_pool *p);

/* Queues a job (request is taken, job is the caller's handle). Returns
 * FMX_OK or FMX_ENOMEM (request freed). */
int fmx_pool_submit(fmx_pool *p, cJSON *request, void *job);
/* The file descriptors to poll for input (at most cap); returns how many. */
int fmx_pool_fds(const fmx_pool *p, int *fds, int cap);
/* Milliseconds until the pool needs fmx_pool_service again (a deadline, a
 * restart), at most cap_ms. */
int fmx_pool_wait_ms(const fmx_pool *p, int cap_ms);
/* Reads replies, kills workers past their deadline, reaps and replaces dead
 * ones, dispatches queued jobs; calls done for every finished job. Returns
 * how many finished. */
int fmx_pool_service(fmx_pool *p, fmx_pool_done_fn done, void *ctx);
/* Removes one pending job (queued or running; a running one's worker is
 * killed and replaced) and returns its handle; NULL when none. */
void *fmx_pool_take(fmx_pool *p);
fmx_pool_stats fmx_pool_stats_get(const fmx_pool *p);

/* ---- requests and replies ---- */

/* The request for a planned step. Caller frees (or hands it to submit). */
cJSON *fmx_worker_step_request(const fmx_step_plan *plan);
/* The request to grade code as submit does for the plan's task. */
cJSON *fmx_worker_grade_request(const fmx_step_plan *plan, const char *code, const char *entry);
cJSON *fmx_worker_selftest_request(const char *what);
/* Inside a worker: the shared mappings left after the scrub of inherited
 * ones (-1: not run, exec mode) and how many it unmapped (self-tests). */
void fmx_worker_scrub_counts(int *left, int *unmapped);

/* The outcome of a step job: the worker's outcome, or (any failure) an
 * error observation {tool, text, data: {fate, detail, limit_s|limit_mb},
 * error: "timeout"|"oom"|"crashed"}. The episode goes on, except that a
 * failed submit is graded as failing every probe (reward 0, data.grade) and
 * ends it (so code that hangs or crashes depending on hidden inputs cannot
 * probe them step after step), and the budget's last step truncates it.
 * Clear with fmx_step_outcome_clear. FMX_OK or FMX_ENOMEM. */
/* CPU seconds a job may use under cfg (RLIMIT_CPU): cpu_s, else
 * eval_timeout_s per thread and one more. */
double fmx_pool_cpu_budget(const fmx_pool_config *cfg);
int fmx_pool_outcome(const fmx_pool *p, const fmx_step_plan *plan, fmx_pool_result *res,
                     fmx_step_outcome *out);
/* The outcome of a step whose evaluation was stopped (fate not FMX_FATE_OK,
 * why: what stopped it), worded with the limits of cfg: what
 * fmx_pool_outcome gives for a failed job, for those that run steps
 * in-process (replay). FMX_OK or FMX_ENOMEM. */
int fmx_fate_outcome(const fmx_pool_config *cfg, const fmx_step_plan *plan, fmx_fate fate,
                     const char *why, fmx_step_outcome *out);
/* The wall-clock budget a worker gives the evaluations of one job under
 * eval_timeout_s: they end before the pool kills the worker. */
double fmx_eval_budget_s(double eval_timeout_s);
/* The step fate of an evaluation fate. */
fmx_fate fmx_fate_of_eval(fmx_eval_fate f);
/* 1 when a failed step was the budget's last verify_component (its own code
 * may be what failed): the last verified code should be graded by a grade
 * job, then fmx_pool_fallback. */
int fmx_pool_needs_fallback(const fmx_step_plan *plan, const fmx_pool_result *res);
/* Adds the fallback grade job's result to a failed final step's outcome. */
int fmx_pool_fallback(const fmx_step_plan *plan, fmx_pool_result *res, fmx_step_outcome *out);

/* ---- inside a worker ---- */

/* A check run inside a sandboxed worker (kind "selftest"). Fills detail and
 * returns 1 when the check holds:
 *   "socket"   socket() of AF_INET, AF_INET6, AF_NETLINK, AF_PACKET, AF_UNIX fails
 *   "fork"     fork() and vfork-style clone fail
 *   "exec"     execve and execveat fail
 *   "open"     open/openat/creat of /etc/passwd, /tmp files fail (reading too)
 *   "fds"      only fds 0-3 (stdio, the channel) are open
 *   "thread"   a thread can still be created and joined
 *   "compile"  the engine still compiles and runs a candidate
 *   "limits"   RLIMIT_AS, RLIMIT_CPU, RLIMIT_CORE, no_new_privs, seccomp mode
 * and, to test the pool's failure handling, never returns normally:
 *   "segv"     raises SIGSEGV                          -> crashed
 *   "hang"     sleeps forever                           -> timeout
 *   "spin"     computes forever                         -> timeout (wall or CPU)
 *   "oom"      allocates past RLIMIT_AS; returns FMX_ENOMEM (the worker exits) -> oom
 *   "abort_oom" fills the address space, then abort()s -> oom (signal-handler probe)
 *   "torch_oom" runs torch.empty(2**40) in a candidate: a clean run error, returns 1 */
int fmx_worker_selftest(const char *what, char *detail, size_t n);

/* `fmx worker --fd N --tasks DIR [--device D] [--reward FILE] [--mem MB]
 * [--threads N] [--cpu S]`: the hidden subcommand of exec mode. Serves the
 * channel on fd N until it closes. */
int fmx_worker_main(int argc, char **argv);

#ifdef __cplusplus
}
#endif

#endif
