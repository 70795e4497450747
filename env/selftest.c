/*
 * selftest.c — fmx_worker_selftest (worker.h): checks a worker runs inside
 * its own process to prove its sandbox (the syscalls it must not make, its
 * limits, its descriptors) and its fates (a crash, a hang, a spin). Not here:
 * the sandbox itself (env/worker.c, env/sandbox.c).
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

static void *fmx__thread_fn(void *arg) {
    *(int *)arg = 42;
    return NULL;
}

static int fmx__check(char *detail, size_t n, size_t *used, int ok, const char *what, int err) {
    if (*used < n)
        *used += (size_t)snprintf(detail + *used, n - *used, "%s%s: %s", *used ? "; " : "", what,
                                  ok ? (err ? strerror(err) : "ok") : "ALLOWED");
    return ok;
}

int fmx_worker_selftest(const char *what, char *detail, size_t n) {
    size_t used = 0;
    detail[0] = 0;
    int ok = 1;
    if (strcmp(what, "socket") == 0) {
        int fams[] = {AF_INET, AF_INET6, AF_NETLINK, AF_PACKET, AF_UNIX};
        const char *names[] = {"AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET", "AF_UNIX"};
        for (int i = 0; i < 5; i++) {
            errno = 0;
            int fd = socket(fams[i], SOCK_STREAM, 0);
            if (fd < 0 && fams[i] == AF_PACKET) fd = socket(fams[i], SOCK_RAW, 0);
            ok &= fmx__check(detail, n, &used, fd < 0, names[i], errno);
            if (fd >= 0) close(fd);
        }
        int sv[2];
        errno = 0;
        int r = socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
        ok &= fmx__check(detail, n, &used, r < 0, "socketpair", errno);
        return ok;
    }
    if (strcmp(what, "fork") == 0) {
        errno = 0;
        pid_t pid = fork();
        if (pid == 0) _exit(0);
        if (pid > 0) waitpid(pid, NULL, 0);
        ok &= fmx__check(detail, n, &used, pid < 0, "fork", errno);
        errno = 0;
        long r = syscall(SYS_vfork);
        if (r == 0) _exit(0);
        ok &= fmx__check(detail, n, &used, r < 0, "vfork", errno);
        errno = 0;
        r = syscall(SYS_clone, (long)SIGCHLD, 0L, 0L, 0L, 0L);
        if (r == 0) _exit(0);
        if (r > 0) waitpid((pid_t)r, NULL, 0);
        ok &= fmx__check(detail, n, &used, r < 0, "clone(SIGCHLD)", errno);
        errno = 0;
        r = kill(getppid(), 0);
        ok &= fmx__check(detail, n, &used, r < 0, "kill(parent)", errno);
        return ok;
    }
    if (strcmp(what, "exec") == 0) {
        char *argv[] = {"/bin/true", NULL}, *envp[] = {NULL};
        errno = 0;
        int r = execve("/bin/true", argv, envp);
        ok &= fmx__check(detail, n, &used, r < 0, "execve", errno);
        errno = 0;
        r = (int)syscall(SYS_execveat, AT_FDCWD, "/bin/true", argv, envp, 0);
        ok &= fmx__check(detail, n, &used, r < 0, "execveat", errno);
        return ok;
    }
    if (strcmp(what, "open") == 0) {
        errno = 0;
        int fd = open("/etc/passwd", O_RDONLY);
        ok &= fmx__check(detail, n, &used, fd < 0, "open(/etc/passwd)", errno);
        if (fd >= 0) close(fd);
        errno = 0;
        fd = openat(AT_FDCWD, "/etc/passwd", O_RDONLY);
        ok &= fmx__check(detail, n, &used, fd < 0, "openat(/etc/passwd)", errno);
        if (fd >= 0) close(fd);
        errno = 0;
        fd = open("/tmp/fmx-worker-selftest", O_WRONLY | O_CREAT | O_TRUNC, 0600);
        ok &= fmx__check(detail, n, &used, fd < 0, "open(O_CREAT)", errno);
        if (fd >= 0) close(fd);
        errno = 0;
        fd = creat("/tmp/fmx-worker-selftest", 0600);
        ok &= fmx__check(detail, n, &used, fd < 0, "creat", errno);
        if (fd >= 0) close(fd);
        errno = 0;
        FILE *f = fopen("/proc/self/status", "r");
        ok &= fmx__check(detail, n, &used, f == NULL, "fopen(/proc/self/status)", errno);
        if (f) fclose(f);
        return ok;
    }
    if (strcmp(what, "fds") == 0) {
        /* only stdio, the channel and the evaluation process's socket are
         * open (probed: /proc cannot be opened) */
        for (int fd = 0; fd < 4096; fd++) {
            if (fcntl(fd, F_GETFD) < 0) continue;
            if (fd <= FMX_CHANNEL_FD || fd == fmx_evaluator_shared_fd()) {
                if (used < n)
                    used += (size_t)snprintf(detail + used, n - used, "%s%d",
                                             used ? " " : "open: ", fd);
                continue;
            }
            ok = 0;
            if (used < n) used += (size_t)snprintf(detail + used, n - used, " %d(UNEXPECTED)", fd);
        }
        return ok;
    }
    if (strcmp(what, "thread") == 0) {
        pthread_t t;
        int v = 0;
        int r = pthread_create(&t, NULL, fmx__thread_fn, &v);
        if (r == 0) pthread_join(t, NULL);
        snprintf(detail, n, "pthread_create: %s, value %d", r ? strerror(r) : "ok", v);
        return r == 0 && v == 42;
    }
    if (strcmp(what, "compile") == 0 || strcmp(what, "torch_oom") == 0) {
        int oom = strcmp(what, "torch_oom") == 0;
        const char *src = oom ? "import torch\nfrom torch import Tensor\n\n"
                                "def f(x: Tensor) -> Tensor:\n"
                                "    return torch.empty(1 << 40) + x.sum()\n"
                              : "import torch\nfrom torch import Tensor\n\n"
                                "def f(x: Tensor) -> Tensor:\n"
                                "    return torch.softmax(x @ x.t(), dim=-1).sum(0)\n";
        char err[1024] = "";
        fmx_program *prog = NULL;
        fmx_args *a = fmx_args_create();
        fmx_tensor *x = NULL;
        fmx_run *run = NULL;
        float xs[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
        int64_t shape[2] = {3, 4};
        int rc = fmx_program_compile(src, strlen(src), "selftest.py", &prog, err, sizeof err);
        if (rc == FMX_OK) rc = fmx_tensor_wrap(xs, FMX_DT_F32, shape, 2, &x, err, sizeof err);
        if (rc == FMX_OK) rc = fmx_args_tensor(a, "x", x);
        if (rc == FMX_OK) rc = fmx_program_run(prog, "f", a, &run, err, sizeof err);
        float out[3] = {0};
        if (rc == FMX_OK && !oom)
            rc = fmx_tensor_read(fmx_run_output(run, 0), out, sizeof out, err, sizeof err);
        if (oom)
            snprintf(detail, n, "%s", rc == FMX_OK ? "torch.empty(1 << 40) succeeded" : err);
        else
            snprintf(detail, n, "%s: sum %.4f", rc == FMX_OK ? "ran" : err,
                     (double)(out[0] + out[1] + out[2]));
        fmx_run_destroy(run);
        fmx_tensor_destroy(x);
        fmx_args_destroy(a);
        fmx_program_destroy(prog);
        return oom ? rc == FMX_ERUNTIME : rc == FMX_OK && fabs(out[0] + out[1] + out[2] - 3) < 1e-4;
    }
    if (strcmp(what, "limits") == 0) {
        struct rlimit as, cpu, core;
        getrlimit(RLIMIT_AS, &as);
        getrlimit(RLIMIT_CPU, &cpu);
        getrlimit(RLIMIT_CORE, &core);
        int nnp = prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0);
        int mode = prctl(PR_GET_SECCOMP, 0, 0, 0, 0);
        int dumpable = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
        int left, unmapped;
        fmx_worker_scrub_counts(&left, &unmapped);
        snprintf(detail, n,
                 "RLIMIT_AS %lld MiB, RLIMIT_CPU %lld s, RLIMIT_CORE %lld, no_new_privs %d, "
                 "seccomp mode %d, dumpable %d, pgid==pid %d, shared mappings %d (%d unmapped)",
                 as.rlim_cur == RLIM_INFINITY ? -1LL : (long long)(as.rlim_cur >> 20),
                 cpu.rlim_cur == RLIM_INFINITY ? -1LL : (long long)cpu.rlim_cur,
                 (long long)core.rlim_cur, nnp, mode, dumpable, getpgrp() == getpid(), left,
                 unmapped);
        return as.rlim_cur != RLIM_INFINITY && cpu.rlim_cur != RLIM_INFINITY &&
               core.rlim_cur == 0 && nnp == 1 && mode == 2 && dumpable == 0 &&
               left <= 0; /* 0 after the scrub; -1 in exec mode (none inherited) */
    }
    if (strcmp(what, "segv") == 0) {
        raise(SIGSEGV);
        _exit(1);
    }
    if (strcmp(what, "hang") == 0)
        for (;;)
            pause();
    if (strcmp(what, "spin") == 0) {
        volatile unsigned long k = 0;
        for (;;)
            k++;
    }
    if (strcmp(what, "oom") == 0 || strcmp(what, "abort_oom") == 0) {
        /* Allocate (and touch) until the address space runs out. */
        size_t chunk = (size_t)64 << 20, total = 0;
        for (;;) {
            char *p = malloc(chunk);
            if (!p) {
                if (chunk <= ((size_t)1 << 20)) break;
                chunk /= 2;
                continue;
            }
            memset(p, 1, 4096);
            total += chunk;
        }
        snprintf(detail, n, "allocated %zu MiB before malloc failed", total >> 20);
        if (strcmp(what, "abort_oom") == 0) abort();
        return FMX_ENOMEM;
    }
    snprintf(detail, n, "unknown self-test '%s'", what);
    return 0;
}
