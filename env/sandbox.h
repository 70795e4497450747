/*
 * sandbox.h — the one seccomp filter and resource limits that every process
 * running or serving evaluations puts itself under: the server's worker
 * processes (env/worker.c) and the evaluation child that runs candidate code
 * (python/fmx/evaluate.py, through the engine library).
 *
 * The filter (fmx_sandbox_seccomp) makes these fail with EPERM:
 * socket/socketpair/bind/connect/listen/accept, fork, vfork, clone without
 * CLONE_THREAD (clone3: ENOSYS, glibc falls back to clone), execve/execveat,
 * open/openat/openat2/creat (any flags; unless deny_open is 0),
 * open_by_handle_at, io_uring, ptrace, process_vm_*, bpf, perf_event_open,
 * userfaultfd, mount, chroot, namespaces, path changes (unlink, rename,
 * mkdir, link, symlink, chmod, chown, truncate, mknod) and kill/tgkill of
 * another process.
 *
 * Not here: which process applies it when (worker.c, evaluate.py).
 */
#ifndef FMX_SANDBOX_H
#define FMX_SANDBOX_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Loads the filter (sets no_new_privs). Returns 0 or a negative errno. */
int fmx_sandbox_seccomp(int deny_open);

/* VmSize of this process in bytes (/proc/self/statm); 0 if unknown. */
size_t fmx_sandbox_vm_bytes(void);

/* The evaluation child's lock-down, in order: not dumpable, no core files,
 * RLIMIT_AS = its address space now + mem_mb MiB (0: none), RLIMIT_CPU = CPU
 * time used so far + cpu_s (0: none; SIGXCPU ends it), no_new_privs, the
 * filter above. Returns 0, or -1 with err set. */
int fmx_sandbox_enter(long mem_mb, double cpu_s, int deny_open, char *err, size_t errsz);

#ifdef __cplusplus
}
#endif

#endif
