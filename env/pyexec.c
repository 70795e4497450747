/*
 * pyexec.c — runs fmx's Python package from the C binary (see pyexec.h).
 */
#define _GNU_SOURCE
#include "pyexec.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "status.h"

#ifndef FMX_SOURCE_DIR
#error "FMX_SOURCE_DIR must name the source tree (set by CMakeLists.txt)"
#endif

extern char **environ;

const char *fmx_python_interpreter(void) {
    const char *py = getenv("FMX_PYTHON");
    return py && py[0] ? py : "/usr/bin/python3";
}

int fmx_python_env(void) {
    static int done;
    if (done) return FMX_OK;
    const char *pkg = getenv("FMX_PYTHONPATH");
    if (!pkg || !pkg[0]) pkg = FMX_SOURCE_DIR "/python";
    const char *old = getenv("PYTHONPATH");
    char *path = NULL;
    if (asprintf(&path, "%s%s%s", pkg, old && old[0] ? ":" : "", old ? old : "") < 0)
        return FMX_ENOMEM;
    setenv("PYTHONPATH", path, 1);
    free(path);
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = '\0';
        setenv("FMX_BIN", self, 0); /* one given (a test's fmx) is kept */
    }
    done = 1;
    return FMX_OK;
}

int fmx_python_run(const char *module, const char *const *args, char **out, size_t *outlen,
                   char *err, size_t errsz) {
    *out = NULL;
    if (outlen) *outlen = 0;
    if (fmx_python_env() != FMX_OK) return FMX_ENOMEM;
    const char *py = fmx_python_interpreter();
    size_t nargs = 0;
    while (args && args[nargs])
        nargs++;
    char **argv = calloc(nargs + 4, sizeof *argv);
    if (!argv) return FMX_ENOMEM;
    argv[0] = (char *)py;
    argv[1] = "-m";
    argv[2] = (char *)module;
    for (size_t i = 0; i < nargs; i++)
        argv[3 + i] = (char *)args[i];

    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) {
        snprintf(err, errsz, "pipe: %s", strerror(errno));
        free(argv);
        return FMX_EIO;
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fds[1], STDOUT_FILENO);
    posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    pid_t pid;
    int rc = posix_spawnp(&pid, py, &fa, NULL, argv, environ); /* a bare name: on PATH */
    posix_spawn_file_actions_destroy(&fa);
    free(argv);
    close(fds[1]);
    if (rc != 0) {
        close(fds[0]);
        snprintf(err, errsz, "cannot run %s: %s (set FMX_PYTHON to a python3 with torch)", py,
                 strerror(rc));
        return FMX_EIO;
    }
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    int status = buf ? FMX_OK : FMX_ENOMEM;
    for (;;) {
        if (buf && len + 4096 > cap) {
            char *bigger = realloc(buf, cap *= 2);
            if (!bigger) {
                free(buf);
                buf = NULL;
                status = FMX_ENOMEM;
            } else {
                buf = bigger;
            }
        }
        char sink[4096];
        ssize_t n = buf ? read(fds[0], buf + len, cap - len - 1) : read(fds[0], sink, sizeof sink);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        if (buf) len += (size_t)n;
    }
    close(fds[0]);
    int ws = 0;
    while (waitpid(pid, &ws, 0) < 0 && errno == EINTR) {
    }
    if (status != FMX_OK) {
        snprintf(err, errsz, "out of memory reading the output of %s -m %s", py, module);
        return status;
    }
    buf[len] = '\0';
    *out = buf;
    if (outlen) *outlen = len;
    if (WIFEXITED(ws)) return WEXITSTATUS(ws);
    snprintf(err, errsz, "%s -m %s was killed by signal %d", py, module,
             WIFSIGNALED(ws) ? WTERMSIG(ws) : 0);
    free(buf);
    *out = NULL;
    return FMX_EINTERNAL;
}
