/*
 * evaluator.c — the grader's side of the evaluation process (evaluator.h):
 * starts the Python zygote, builds job memfds, sends them with an empty
 * results memfd over a SOCK_SEQPACKET socket (SCM_RIGHTS), classifies the
 * child's end and maps its results. Every length the child wrote is checked
 * against the results' size before a byte of it is used.
 *
 * Not here: the child (python/fmx/evaluate.py); grading (env/verify.c).
 */
#define _GNU_SOURCE
#include "evaluator.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "pyexec.h"
#include "status.h"

#ifndef FMX_EVAL_SO
#define FMX_EVAL_SO ""
#endif

#define FMX__ZYGOTE_FD 3
#define FMX__EXIT_OOM 3      /* evaluate.py's EXIT_OOM */
#define FMX__EXIT_INTERNAL 4 /* evaluate.py's EXIT_INTERNAL */
#define FMX__DATA_START 64   /* results: tensor bytes start here */
#define FMX__MAX_HEADER (64u << 20)
#define FMX__START_TIMEOUT_S 180.0
#define FMX__REPLY_GRACE_S 30.0 /* the zygote's answer after the child's deadline */

struct fmx_evaluator {
    fmx_evaluator_config cfg;
    char device[64];
    pid_t pid;
    int fd;
};

struct fmx_eval_job {
    cJSON *header;
    cJSON *tensors;
    unsigned char *data;
    size_t len, cap;
};

/* What one results memfd held once mapped: its JSON header and its bytes. */
typedef struct {
    cJSON *header;
    unsigned char *map;
    size_t map_len;
} fmx__area;

struct fmx_eval_result {
    fmx_eval_fate fate;
    char why[256];
    double ms;
    cJSON *header;
    unsigned char *map;
    size_t map_len;
    fmx__area check; /* the compile check's results: sealed before candidate code ran */
};

fmx_evaluator_config fmx_evaluator_config_default(void) {
    return (fmx_evaluator_config){
        .threads = 1, .mem_mb = 4096, .cpu_s = 0, .timeout_s = 0, .device = "cpu"};
}

double fmx_evaluator_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int fmx__fail(char *err, size_t errsz, int status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int fmx__fail(char *err, size_t errsz, int status, const char *fmt, ...) {
    if (err && errsz) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errsz, fmt, ap);
        va_end(ap);
    }
    return status;
}

/* ---- the zygote ---- */

static const char *fmx__engine_so(void) {
    const char *env = getenv("FMX_EVAL_LIBRARY");
    return env && *env ? env : FMX_EVAL_SO;
}

/* Waits up to timeout_s for one message; returns its length, 0 on EOF, -1 on
 * error or time-out (errno ETIMEDOUT). */
static ssize_t fmx__recv(int fd, char *buf, size_t cap, double timeout_s) {
    double end = timeout_s > 0 ? fmx_evaluator_now() + timeout_s : 0;
    for (;;) {
        int ms = -1;
        if (end > 0) {
            double left = end - fmx_evaluator_now();
            if (left <= 0) {
                errno = ETIMEDOUT;
                return -1;
            }
            ms = (int)(left * 1000) + 1;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int n = poll(&p, 1, ms);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        if (n == 0) continue;
        ssize_t got = recv(fd, buf, cap - 1, 0);
        if (got < 0 && errno == EINTR) continue;
        if (got >= 0) buf[got] = '\0';
        return got;
    }
}

int fmx_evaluator_open(const fmx_evaluator_config *cfg, fmx_evaluator **out, char *err,
                       size_t errsz) {
    *out = NULL;
    const char *so = fmx__engine_so();
    if (!so[0] || access(so, R_OK) != 0)
        return fmx__fail(err, errsz, FMX_EIO,
                         "the engine library for the evaluation process is missing (%s): build "
                         "fmx (cmake --build) or set FMX_EVAL_LIBRARY",
                         so[0] ? so : "not configured");
    fmx_evaluator *ev = calloc(1, sizeof *ev);
    if (!ev) return fmx__fail(err, errsz, FMX_ENOMEM, "out of memory");
    ev->cfg = cfg ? *cfg : fmx_evaluator_config_default();
    snprintf(ev->device, sizeof ev->device, "%s", ev->cfg.device ? ev->cfg.device : "cpu");
    ev->cfg.device = ev->device;
    ev->fd = -1;
    if (fmx_python_env() != FMX_OK) {
        free(ev);
        return fmx__fail(err, errsz, FMX_ENOMEM, "out of memory");
    }
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
        free(ev);
        return fmx__fail(err, errsz, FMX_EIO, "socketpair: %s", strerror(errno));
    }
    char threads[16];
    snprintf(threads, sizeof threads, "%d", ev->cfg.threads > 0 ? ev->cfg.threads : 1);
    const char *py = fmx_python_interpreter();
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        close(sv[0]);
        close(sv[1]);
        free(ev);
        return fmx__fail(err, errsz, FMX_EIO, "fork: %s", strerror(errno));
    }
    if (pid == 0) {
        /* No PR_SET_PDEATHSIG: it follows the forking thread, not the
         * process. The zygote ends when its socket closes (the grader gone),
         * killing a running child first (evaluate.py). */
        if (getppid() != parent) _exit(127);
        dup2(sv[1], FMX__ZYGOTE_FD); /* clears close-on-exec on the copy */
        close_range(FMX__ZYGOTE_FD + 1, ~0U, 0);
        int null = open("/dev/null", O_RDONLY);
        if (null >= 0) {
            dup2(null, 0);
            close(null);
        }
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        execlp(py, py, "-m", "fmx.evaluate", "--zygote", "3", "--engine", so, "--threads", threads,
               "--device", ev->device, (char *)NULL);
        fprintf(stderr, "fmx: cannot run %s: %s\n", py, strerror(errno));
        _exit(127);
    }
    close(sv[1]);
    ev->pid = pid;
    ev->fd = sv[0];
    char buf[4096];
    ssize_t n = fmx__recv(ev->fd, buf, sizeof buf, FMX__START_TIMEOUT_S);
    cJSON *hello = n > 0 ? cJSON_ParseWithLength(buf, (size_t)n) : NULL;
    int ready = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(hello, "ready"));
    cJSON_Delete(hello);
    if (!ready) {
        fmx_evaluator_close(ev);
        return fmx__fail(err, errsz, FMX_EIO,
                         "the evaluation process (%s -m fmx.evaluate) did not start%s (its own "
                         "error, if any, is above): it needs torch (FMX_PYTHON: an interpreter "
                         "with torch) and the engine library %s",
                         py, n < 0 && errno == ETIMEDOUT ? " in time" : "", so);
    }
    *out = ev;
    return FMX_OK;
}

void fmx_evaluator_close(fmx_evaluator *ev) {
    if (!ev) return;
    if (ev->fd >= 0) close(ev->fd);
    if (ev->pid > 0) {
        kill(ev->pid, SIGKILL);
        waitpid(ev->pid, NULL, 0);
    }
    free(ev);
}

/* ---- the shared evaluator ---- */

static fmx_evaluator_config fmx__shared_cfg;
static int fmx__shared_configured;
static char fmx__shared_device[64];
static fmx_evaluator *fmx__shared;
static pid_t fmx__shared_pid; /* the process that started it: a forked child starts its own */
/* Threads may verify at once (the tools are thread-safe): the shared
 * evaluator serves one evaluation at a time. */
static pthread_mutex_t fmx__shared_lock = PTHREAD_MUTEX_INITIALIZER;
static int fmx__shared_broken;
static double fmx__deadline;
static fmx_eval_fate fmx__fate;
static char fmx__fate_why[256];

void fmx_evaluator_configure(const fmx_evaluator_config *cfg) {
    fmx__shared_cfg = *cfg;
    snprintf(fmx__shared_device, sizeof fmx__shared_device, "%s",
             cfg->device ? cfg->device : "cpu");
    fmx__shared_cfg.device = fmx__shared_device;
    fmx__shared_configured = 1;
    if (fmx__shared) {
        fmx__shared->cfg = fmx__shared_cfg;
        fmx__shared->cfg.device = fmx__shared->device;
    }
}

static fmx_evaluator *fmx__shared_get(char *err, size_t errsz);

fmx_evaluator *fmx_evaluator_shared(char *err, size_t errsz) {
    pthread_mutex_lock(&fmx__shared_lock);
    fmx_evaluator *ev = fmx__shared_get(err, errsz);
    pthread_mutex_unlock(&fmx__shared_lock);
    return ev;
}

static fmx_evaluator *fmx__shared_get(char *err, size_t errsz) {
    if (fmx__shared && fmx__shared_pid != getpid())
        fmx__shared = NULL; /* the parent's (its fd may even be another file here): forget it */
    if (fmx__shared && fmx__shared->fd >= 0) return fmx__shared;
    if (fmx__shared) { /* its zygote died: start another */
        fmx_evaluator_close(fmx__shared);
        fmx__shared = NULL;
    }
    fmx_evaluator_config cfg =
        fmx__shared_configured ? fmx__shared_cfg : fmx_evaluator_config_default();
    if (fmx_evaluator_open(&cfg, &fmx__shared, err, errsz) != FMX_OK) {
        fmx__shared_broken = 1;
        return NULL;
    }
    fmx__shared_broken = 0;
    fmx__shared_pid = getpid();
    return fmx__shared;
}

int fmx_evaluator_shared_fd(void) {
    return fmx__shared && fmx__shared_pid == getpid() ? fmx__shared->fd : -1;
}

void fmx_evaluator_shutdown(void) {
    if (fmx__shared_pid == getpid()) fmx_evaluator_close(fmx__shared);
    fmx__shared = NULL;
}

int fmx_evaluator_shared_ok(void) {
    if (fmx__shared && fmx__shared_pid != getpid()) return 1; /* none of its own yet */
    return !fmx__shared_broken && (!fmx__shared || fmx__shared->fd >= 0);
}

void fmx_evaluator_set_deadline(double mono_s) {
    fmx__deadline = mono_s;
}

/* ---- jobs ---- */

fmx_eval_job *fmx_eval_job_create(void) {
    fmx_eval_job *j = calloc(1, sizeof *j);
    if (!j) return NULL;
    j->header = cJSON_CreateObject();
    j->tensors = cJSON_AddArrayToObject(j->header, "tensors");
    if (!j->header || !j->tensors) {
        fmx_eval_job_destroy(j);
        return NULL;
    }
    return j;
}

void fmx_eval_job_destroy(fmx_eval_job *j) {
    if (!j) return;
    cJSON_Delete(j->header);
    free(j->data);
    free(j);
}

cJSON *fmx_eval_job_header(fmx_eval_job *j) {
    return j->header;
}

int fmx_eval_job_tensor(fmx_eval_job *j, const fmx_tensor *t) {
    int64_t shape[FMX_MAX_DIMS];
    fmx_dtype dt;
    int nd = fmx_tensor_shape(t, shape, &dt);
    if (nd < 0) return FMX_EINVAL;
    size_t n = fmx_dtype_size(dt);
    for (int d = 0; d < nd; d++)
        n *= (size_t)shape[d];
    size_t off = (j->len + 63) & ~(size_t)63;
    if (off + n > j->cap) {
        size_t cap = j->cap ? j->cap : 1 << 16;
        while (cap < off + n)
            cap *= 2;
        unsigned char *grown = realloc(j->data, cap);
        if (!grown) return FMX_ENOMEM;
        j->data = grown;
        j->cap = cap;
    }
    char err[256];
    if (n && fmx_tensor_read(t, j->data + off, n, err, sizeof err) != FMX_OK) return FMX_EINVAL;
    j->len = off + n;
    cJSON *o = cJSON_CreateObject();
    cJSON *s = cJSON_AddArrayToObject(o, "shape");
    for (int d = 0; d < nd; d++)
        cJSON_AddItemToArray(s, cJSON_CreateNumber((double)shape[d]));
    cJSON_AddStringToObject(o, "dtype", fmx_dtype_name(dt));
    cJSON_AddNumberToObject(o, "offset", (double)off);
    cJSON_AddNumberToObject(o, "nbytes", (double)n);
    cJSON_AddItemToArray(j->tensors, o);
    return cJSON_GetArraySize(j->tensors) - 1;
}

static int fmx__write_all(int fd, const void *p, size_t n) {
    const unsigned char *b = p;
    while (n) {
        ssize_t w = write(fd, b, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        b += w;
        n -= (size_t)w;
    }
    return 0;
}

/* The job as a sealed memfd: u64 header length, header, tensor bytes from
 * the next multiple of 64. Returns the fd or -1. */
static int fmx__job_memfd(const fmx_eval_job *j, char *err, size_t errsz) {
    char *text = cJSON_PrintUnformatted(j->header);
    if (!text) return fmx__fail(err, errsz, -1, "out of memory");
    size_t hlen = strlen(text);
    int fd = memfd_create("fmx-job", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) {
        free(text);
        return fmx__fail(err, errsz, -1, "memfd_create: %s", strerror(errno));
    }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    size_t base = (8 + hlen + 63) & ~(size_t)63;
    static const unsigned char zeros[64];
    int rc = fmx__write_all(fd, len8, 8);
    if (!rc) rc = fmx__write_all(fd, text, hlen);
    if (!rc) rc = fmx__write_all(fd, zeros, base - 8 - hlen);
    if (!rc && j->len) rc = fmx__write_all(fd, j->data, j->len);
    free(text);
    if (rc || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL)) {
        close(fd);
        return fmx__fail(err, errsz, -1, "writing the job: %s", strerror(errno));
    }
    return fd;
}

/* ---- running ---- */

static void fmx__note_fate(const fmx_eval_result *r);

/* The job, its results and (check_fd >= 0) the compile check's results. */
static int fmx__send_run(int sock, double timeout_s, int job_fd, int res_fd, int check_fd) {
    char msg[128];
    int n = snprintf(msg, sizeof msg, "{\"op\":\"run\",\"timeout_s\":%.3f}", timeout_s);
    int fds[3] = {job_fd, res_fd, check_fd};
    size_t nfds = check_fd >= 0 ? 3 : 2;
    char ctl[CMSG_SPACE(sizeof fds)];
    memset(ctl, 0, sizeof ctl);
    struct iovec iov = {.iov_base = msg, .iov_len = (size_t)n};
    struct msghdr mh = {.msg_iov = &iov,
                        .msg_iovlen = 1,
                        .msg_control = ctl,
                        .msg_controllen = CMSG_SPACE(nfds * sizeof(int))};
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    for (;;) {
        ssize_t w = sendmsg(sock, &mh, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        return w == n ? 0 : -1;
    }
}

static void fmx__zygote_dead(fmx_evaluator *ev) {
    if (ev->fd >= 0) close(ev->fd);
    ev->fd = -1;
    if (ev->pid > 0) {
        kill(ev->pid, SIGKILL);
        waitpid(ev->pid, NULL, 0);
    }
    ev->pid = 0;
    if (ev == fmx__shared) fmx__shared_broken = 0; /* fmx_evaluator_shared restarts it */
}

/* The child's end, as the pool's fates (worker.h). */
static void fmx__classify(fmx_eval_result *r, const cJSON *reply, double timeout_s, long mem_mb) {
    const char *status = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(reply, "status"));
    double code = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(reply, "code"));
    double sig = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(reply, "signal"));
    r->ms = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(reply, "ms"));
    r->fate = FMX_EVAL_CRASHED;
    if (!status) {
        snprintf(r->why, sizeof r->why, "the evaluation process gave no status");
    } else if (strcmp(status, "timeout") == 0) {
        r->fate = FMX_EVAL_TIMEOUT;
        snprintf(r->why, sizeof r->why, "killed at its wall-clock deadline (%.3g s)", timeout_s);
    } else if (strcmp(status, "exit") == 0 && code == 0) {
        r->fate = FMX_EVAL_OK;
    } else if (strcmp(status, "exit") == 0 && code == FMX__EXIT_OOM) {
        r->fate = FMX_EVAL_OOM;
        snprintf(r->why, sizeof r->why, "ran out of memory (limit %ld MiB)", mem_mb);
    } else if (strcmp(status, "exit") == 0) {
        snprintf(r->why, sizeof r->why, "the evaluation process exited with status %d%s", (int)code,
                 code == FMX__EXIT_INTERNAL ? " (an error in fmx's evaluator)" : "");
    } else if (strcmp(status, "signal") == 0 && (int)sig == SIGXCPU) {
        r->fate = FMX_EVAL_TIMEOUT;
        snprintf(r->why, sizeof r->why, "used up its CPU time");
    } else if (strcmp(status, "signal") == 0 && (int)sig == SIGKILL) {
        r->fate = FMX_EVAL_OOM; /* nobody but the kernel's OOM killer sends it */
        snprintf(r->why, sizeof r->why, "killed (SIGKILL: out of memory)");
    } else if (strcmp(status, "signal") == 0) {
        snprintf(r->why, sizeof r->why, "killed by signal %d (%s)", (int)sig, strsignal((int)sig));
    } else {
        snprintf(r->why, sizeof r->why, "the evaluation process refused the job");
    }
}

/* Maps and checks what the child wrote into a results memfd. 0, or -1
 * (why says why). */
static int fmx__read_area(fmx__area *a, int fd, size_t cap, char *why, size_t whysz) {
    /* The zygote answers when the child says it is done, before the child is
     * gone: its results are read only once sealed against writes, so no
     * thread still running there can change a byte after it was checked. */
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_WRITE)) {
        snprintf(why, whysz, "the evaluation process did not seal its results");
        return -1;
    }
    unsigned char trailer[24];
    if (pread(fd, trailer, sizeof trailer, 0) != (ssize_t)sizeof trailer ||
        memcmp(trailer, "FMXRES01", 8) != 0) {
        snprintf(why, whysz, "the evaluation process wrote no results");
        return -1;
    }
    uint64_t hoff = 0, hlen = 0;
    for (int i = 7; i >= 0; i--) {
        hoff = (hoff << 8) | trailer[8 + i];
        hlen = (hlen << 8) | trailer[16 + i];
    }
    if (hoff < FMX__DATA_START || hlen > FMX__MAX_HEADER || hoff > cap || hlen > cap - hoff) {
        snprintf(why, whysz, "the evaluation process wrote unreadable results");
        return -1;
    }
    a->map_len = (size_t)(hoff + hlen);
    /* private: nothing shared stays mapped in the grader */
    void *m = mmap(NULL, a->map_len, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
        a->map_len = 0;
        snprintf(why, whysz, "mapping the results: %s", strerror(errno));
        return -1;
    }
    a->map = m;
    a->header = cJSON_ParseWithLength((const char *)a->map + hoff, (size_t)hlen);
    if (!cJSON_IsObject(a->header)) {
        snprintf(why, whysz, "the evaluation process wrote an unreadable header");
        return -1;
    }
    return 0;
}

/* The child's results, and the compile check's from their own memfd (check_fd
 * >= 0): the check's "check" replaces any the results header holds. */
static int fmx__read_results(fmx_eval_result *r, int fd, int check_fd, size_t cap) {
    fmx__area main = {0};
    int rc = fmx__read_area(&main, fd, cap, r->why, sizeof r->why);
    r->header = main.header;
    r->map = main.map;
    r->map_len = main.map_len;
    if (rc != 0) return -1;
    cJSON_DeleteItemFromObjectCaseSensitive(r->header, "check");
    if (check_fd < 0) return 0;
    char why[200];
    if (fmx__read_area(&r->check, check_fd, cap, why, sizeof why) == 0) {
        cJSON *c = cJSON_DetachItemFromObjectCaseSensitive(r->check.header, "check");
        if (c) cJSON_AddItemToObject(r->header, "check", c);
    }
    /* no readable check: the report says the check did not run */
    return 0;
}

static int fmx__run(fmx_evaluator *ev, fmx_eval_job *job, fmx_eval_result **out, char *err,
                    size_t errsz);

/* A results memfd: sparse, cap bytes, sealed against growing and shrinking
 * (the child seals it against writes when it is done). -1 on failure. */
static int fmx__results_memfd(size_t cap) {
    int fd = memfd_create("fmx-results", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd >= 0 && (ftruncate(fd, (off_t)cap) != 0 ||
                    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0)) {
        int e = errno;
        close(fd);
        errno = e;
        fd = -1;
    }
    return fd;
}

int fmx_evaluator_run(fmx_evaluator *ev, fmx_eval_job *job, fmx_eval_result **out, char *err,
                      size_t errsz) {
    int shared = ev == fmx__shared;
    if (shared) pthread_mutex_lock(&fmx__shared_lock);
    int rc = fmx__run(ev, job, out, err, errsz);
    if (shared) pthread_mutex_unlock(&fmx__shared_lock);
    return rc;
}

static int fmx__run(fmx_evaluator *ev, fmx_eval_job *job, fmx_eval_result **out, char *err,
                    size_t errsz) {
    *out = NULL;
    if (ev->fd < 0) return fmx__fail(err, errsz, FMX_EIO, "the evaluation process is gone");
    fmx_eval_result *r = calloc(1, sizeof *r);
    if (!r) return fmx__fail(err, errsz, FMX_ENOMEM, "out of memory");
    /* the child's limits, in the job (it applies them to itself) */
    double timeout = ev->cfg.timeout_s;
    if (ev == fmx__shared && fmx__deadline > 0) {
        double left = fmx__deadline - fmx_evaluator_now();
        if (left <= 0.05) {
            r->fate = FMX_EVAL_TIMEOUT;
            snprintf(r->why, sizeof r->why, "no time was left for this evaluation");
            fmx__note_fate(r);
            *out = r;
            return FMX_OK;
        }
        if (timeout <= 0 || left < timeout) timeout = left;
    }
    int threads = ev->cfg.threads > 0 ? ev->cfg.threads : 1;
    double cpu = ev->cfg.cpu_s > 0 ? ev->cfg.cpu_s : timeout > 0 ? timeout * threads + 1 : 0;
    cJSON *h = job->header;
    cJSON_DeleteItemFromObjectCaseSensitive(h, "mem_mb");
    cJSON_DeleteItemFromObjectCaseSensitive(h, "cpu_s");
    cJSON_DeleteItemFromObjectCaseSensitive(h, "threads");
    cJSON_DeleteItemFromObjectCaseSensitive(h, "device");
    cJSON_AddNumberToObject(h, "mem_mb", (double)ev->cfg.mem_mb);
    cJSON_AddNumberToObject(h, "cpu_s", cpu);
    cJSON_AddNumberToObject(h, "threads", threads);
    cJSON_AddStringToObject(h, "device", ev->device);

    int job_fd = fmx__job_memfd(job, err, errsz);
    if (job_fd < 0) {
        free(r);
        return FMX_EIO;
    }
    /* results: a sealed, sparse memfd the child cannot grow; the child adds
     * F_SEAL_WRITE when it is done (fmx__read_results) */
    size_t cap = (size_t)(ev->cfg.mem_mb > 0 ? ev->cfg.mem_mb : 4096) << 20;
    int res_fd = fmx__results_memfd(cap);
    /* the compile check's results go to a memfd of their own that the child
     * seals before any candidate code runs: the candidate cannot touch them */
    int check_fd =
        cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(h, "check")) ? fmx__results_memfd(cap) : -2;
    if (res_fd < 0 || check_fd == -1) {
        int e = errno;
        if (res_fd >= 0) close(res_fd);
        if (check_fd >= 0) close(check_fd);
        close(job_fd);
        free(r);
        return fmx__fail(err, errsz, FMX_EIO, "the results memfd: %s", strerror(e));
    }
    int sent = fmx__send_run(ev->fd, timeout, job_fd, res_fd, check_fd);
    close(job_fd);
    char buf[4096];
    ssize_t n = sent == 0 ? fmx__recv(ev->fd, buf, sizeof buf,
                                      timeout > 0 ? timeout + FMX__REPLY_GRACE_S : 0)
                          : -1;
    cJSON *reply = n > 0 ? cJSON_ParseWithLength(buf, (size_t)n) : NULL;
    if (!reply) {
        close(res_fd);
        if (check_fd >= 0) close(check_fd);
        fmx__zygote_dead(ev);
        r->fate = FMX_EVAL_CRASHED;
        snprintf(r->why, sizeof r->why, "the evaluation process died");
        fmx__note_fate(r);
        *out = r;
        return FMX_OK;
    }
    fmx__classify(r, reply, timeout, ev->cfg.mem_mb);
    cJSON_Delete(reply);
    if (r->fate == FMX_EVAL_OK && fmx__read_results(r, res_fd, check_fd, cap) != 0)
        r->fate = FMX_EVAL_CRASHED;
    close(res_fd);
    if (check_fd >= 0) close(check_fd);
    fmx__note_fate(r);
    *out = r;
    return FMX_OK;
}

/* ---- results ---- */

fmx_eval_fate fmx_evaluator_take_fate(char *why, size_t n) {
    fmx_eval_fate f = fmx__fate;
    if (why && n) snprintf(why, n, "%s", fmx__fate_why);
    fmx__fate = FMX_EVAL_OK;
    fmx__fate_why[0] = '\0';
    return f;
}

static void fmx__note_fate(const fmx_eval_result *r) {
    if (r->fate == FMX_EVAL_OK || fmx__fate != FMX_EVAL_OK) return;
    fmx__fate = r->fate;
    snprintf(fmx__fate_why, sizeof fmx__fate_why, "%s", r->why);
}

fmx_eval_fate fmx_eval_result_fate(const fmx_eval_result *r) {
    return r->fate;
}

const char *fmx_eval_fate_name(fmx_eval_fate f) {
    static const char *names[] = {"ok", "timeout", "oom", "crashed"};
    return (unsigned)f < 4 ? names[f] : "crashed";
}

const char *fmx_eval_result_why(const fmx_eval_result *r) {
    return r->why;
}

double fmx_eval_result_ms(const fmx_eval_result *r) {
    return r->ms;
}

const cJSON *fmx_eval_result_header(const fmx_eval_result *r) {
    return r->fate == FMX_EVAL_OK ? r->header : NULL;
}

int fmx_eval_dtype_parse(const char *name) {
    for (int d = 0; name && d < FMX_DT_COUNT; d++)
        if (strcmp(fmx_dtype_name((fmx_dtype)d), name) == 0) return d;
    return -1;
}

int fmx_eval_result_tensor(fmx_eval_result *r, const cJSON *blob, fmx_tensor **out, char *err,
                           size_t errsz) {
    *out = NULL;
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(blob, "shape");
    const char *dts = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(blob, "dtype"));
    double off = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(blob, "offset"));
    double nb = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(blob, "nbytes"));
    int dt = fmx_eval_dtype_parse(dts);
    int nd = cJSON_GetArraySize(shape);
    /* the compile check's outputs lie in its own memfd */
    const char *area = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(blob, "area"));
    int in_check = area && strcmp(area, "check") == 0;
    unsigned char *map = in_check ? r->check.map : r->map;
    size_t map_len = in_check ? r->check.map_len : r->map_len;
    if (dt < 0 || !cJSON_IsArray(shape) || nd > FMX_MAX_DIMS || !(off >= FMX__DATA_START) ||
        !(nb >= 0) || off + nb > (double)map_len || !map)
        return fmx__fail(err, errsz, FMX_EFORMAT,
                         "an output the evaluation process described "
                         "badly");
    int64_t dims[FMX_MAX_DIMS];
    double n = (double)fmx_dtype_size((fmx_dtype)dt);
    for (int d = 0; d < nd; d++) {
        double v = cJSON_GetNumberValue(cJSON_GetArrayItem(shape, d));
        if (!(v >= 0) || v > 1e15) return fmx__fail(err, errsz, FMX_EFORMAT, "a bad output shape");
        dims[d] = (int64_t)v;
        n *= v;
    }
    if (n != nb) return fmx__fail(err, errsz, FMX_EFORMAT, "an output whose size and shape differ");
    return fmx_tensor_wrap(map + (size_t)off, (fmx_dtype)dt, dims, nd, out, err, errsz);
}

void fmx_eval_result_destroy(fmx_eval_result *r) {
    if (!r) return;
    cJSON_Delete(r->header);
    if (r->map) munmap(r->map, r->map_len);
    cJSON_Delete(r->check.header);
    if (r->check.map) munmap(r->check.map, r->check.map_len);
    free(r);
}
