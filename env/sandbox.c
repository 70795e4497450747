/*
 * sandbox.c — the seccomp filter and the evaluation child's limits
 * (sandbox.h). Plain C and libseccomp: it is linked into fmx and into the
 * engine library the evaluation process loads.
 */
#define _GNU_SOURCE
#include "sandbox.h"

#include <errno.h>
#include <math.h>
#include <sched.h>
#include <seccomp.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

int fmx_sandbox_seccomp(int deny_open) {
    scmp_filter_ctx f = seccomp_init(SCMP_ACT_ALLOW);
    if (!f) return -ENOMEM;
    const uint32_t eperm = SCMP_ACT_ERRNO(EPERM);
    int rc = 0;
#define FMX__DENY(name)                                                                            \
    do {                                                                                           \
        int r_ = seccomp_rule_add(f, eperm, SCMP_SYS(name), 0);                                    \
        if (r_ != 0 && r_ != -EDOM && !rc) rc = r_; /* -EDOM: not on this arch */                  \
    } while (0)
    /* network (no socket of any family: the channel is pre-opened) */
    FMX__DENY(socket);
    FMX__DENY(socketpair);
    FMX__DENY(bind);
    FMX__DENY(connect);
    FMX__DENY(listen);
    FMX__DENY(accept);
    FMX__DENY(accept4);
    /* processes */
    FMX__DENY(fork);
    FMX__DENY(vfork);
    FMX__DENY(execve);
    FMX__DENY(execveat);
    FMX__DENY(ptrace);
    FMX__DENY(process_vm_readv);
    FMX__DENY(process_vm_writev);
    FMX__DENY(bpf);
    FMX__DENY(perf_event_open);
    FMX__DENY(userfaultfd);
    FMX__DENY(kexec_load);
    FMX__DENY(mount);
    FMX__DENY(umount2);
    FMX__DENY(pivot_root);
    FMX__DENY(chroot);
    FMX__DENY(setns);
    FMX__DENY(unshare);
    FMX__DENY(io_uring_setup);
    FMX__DENY(io_uring_enter);
    FMX__DENY(io_uring_register);
    /* files */
    if (deny_open) {
        FMX__DENY(open);
        FMX__DENY(openat);
        FMX__DENY(openat2);
        FMX__DENY(creat);
        FMX__DENY(open_by_handle_at);
        FMX__DENY(name_to_handle_at);
    }
    FMX__DENY(unlink);
    FMX__DENY(unlinkat);
    FMX__DENY(rename);
    FMX__DENY(renameat);
    FMX__DENY(renameat2);
    FMX__DENY(mkdir);
    FMX__DENY(mkdirat);
    FMX__DENY(rmdir);
    FMX__DENY(link);
    FMX__DENY(linkat);
    FMX__DENY(symlink);
    FMX__DENY(symlinkat);
    FMX__DENY(chmod);
    FMX__DENY(fchmodat);
    FMX__DENY(chown);
    FMX__DENY(lchown);
    FMX__DENY(fchownat);
    FMX__DENY(truncate);
    FMX__DENY(mknod);
    FMX__DENY(mknodat);
#undef FMX__DENY
    /* clone: threads only (CLONE_THREAD set); clone3's flags are out of
     * reach in memory, so it says ENOSYS and glibc falls back to clone */
    int r = seccomp_rule_add(f, eperm, SCMP_SYS(clone), 1,
                             SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_THREAD, 0));
    if (r && !rc) rc = r;
    r = seccomp_rule_add(f, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0);
    if (r && r != -EDOM && !rc) rc = r;
    /* signals to itself only (abort() and raise() use tgkill) */
    pid_t me = getpid();
    r = seccomp_rule_add(f, eperm, SCMP_SYS(kill), 1, SCMP_A0(SCMP_CMP_NE, (scmp_datum_t)me));
    if (r && !rc) rc = r;
    r = seccomp_rule_add(f, eperm, SCMP_SYS(tgkill), 1, SCMP_A0(SCMP_CMP_NE, (scmp_datum_t)me));
    if (r && !rc) rc = r;
    r = seccomp_rule_add(f, eperm, SCMP_SYS(tkill), 0);
    if (r && r != -EDOM && !rc) rc = r;
    if (!rc) rc = seccomp_load(f); /* sets no_new_privs itself (SCMP_FLTATR_CTL_NNP) */
    seccomp_release(f);
    return rc;
}

size_t fmx_sandbox_vm_bytes(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long pages = 0;
    if (f) {
        if (fscanf(f, "%lu", &pages) != 1) pages = 0;
        fclose(f);
    }
    return (size_t)pages * (size_t)sysconf(_SC_PAGESIZE);
}

int fmx_sandbox_enter(long mem_mb, double cpu_s, int deny_open, char *err, size_t errsz) {
    prctl(PR_SET_DUMPABLE, 0);
    struct rlimit core = {0, 0};
    setrlimit(RLIMIT_CORE, &core);
    if (mem_mb > 0) {
        struct rlimit as;
        as.rlim_cur = as.rlim_max = (rlim_t)(fmx_sandbox_vm_bytes() + (size_t)mem_mb * (1u << 20));
        if (setrlimit(RLIMIT_AS, &as) != 0) {
            snprintf(err, errsz, "setrlimit(RLIMIT_AS): %s", strerror(errno));
            return -1;
        }
    }
    if (cpu_s > 0) {
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        double used = (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
                      ((double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_usec) / 1e6;
        struct rlimit cpu;
        cpu.rlim_cur = (rlim_t)ceil(used + cpu_s);
        cpu.rlim_max = cpu.rlim_cur + 1;
        if (setrlimit(RLIMIT_CPU, &cpu) != 0) {
            snprintf(err, errsz, "setrlimit(RLIMIT_CPU): %s", strerror(errno));
            return -1;
        }
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        snprintf(err, errsz, "prctl(PR_SET_NO_NEW_PRIVS): %s", strerror(errno));
        return -1;
    }
    int rc = fmx_sandbox_seccomp(deny_open);
    if (rc != 0) {
        snprintf(err, errsz, "seccomp: %s", strerror(-rc));
        return -1;
    }
    return 0;
}
