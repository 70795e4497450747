/*
 * bench/verify.c — how fast `fmx verify` is and what it costs beyond running
 * the candidate. For each PACK SOLUTION pair it prints:
 *   verify ms/probe   wall time of fmx_verify_source over the visible probes,
 *                     per probe call: a fresh sandboxed Python process runs
 *                     the file, this one grades its outputs
 *   forward ms/probe  the same Python function's own run time (measured in
 *                     that process, device-synchronised)
 *   ratio             verify / forward (target ≤ 1.2)
 *   all ms/probe      every probe, hidden ones too (a process per hidden call)
 *   check ms          what TorchScript's compile check adds (compile, graph
 *                     facts, a run and the optimised re-run)
 *   compile ms        median of TorchScript compiles alone
 *   peak RSS          against the bytes of weights.safetensors (mmapped)
 * After --decode, pairs are decode tasks (a pack's generation steps and a
 * solution with a KV cache): the same numbers per decode step (prefill
 * included), against the bare decode step of the same file.
 * Usage: bench_verify [--repeat N] [--decode] PACK SOLUTION [[--decode] PACK SOLUTION ...]
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>

#include "file.h"
#include "pack.h"
#include "status.h"
#include "verify.h"

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static int bench_one(const char *pack_dir, const char *solution, int repeat, int decode) {
    char err[2048];
    fmx_pack *pack = NULL;
    if (fmx_pack_open(pack_dir, &pack, err, sizeof err)) {
        fprintf(stderr, "bench_verify: %s\n", err);
        return 2;
    }
    size_t len;
    char ferr[512];
    char *src = fmx_file_read(solution, &len, ferr, sizeof ferr);
    if (!src) {
        fprintf(stderr, "bench_verify: cannot read %s\n", solution);
        fmx_pack_close(pack);
        return 2;
    }
    double *compile = calloc((size_t)repeat, sizeof(double));
    fmx_program *prog = NULL;
    for (int i = 0; i < repeat; i++) {
        fmx_program_destroy(prog);
        prog = NULL;
        if (fmx_program_compile(src, len, solution, &prog, err, sizeof err)) {
            fprintf(stderr, "bench_verify: %s\n", err);
            return 2;
        }
        compile[i] = fmx_program_compile_ms(prog);
    }
    /* Verify `repeat` times; the first run warms caches (and starts the
     * evaluation process). */
    fmx_verify_config cfg = fmx_verify_config_default();
    cfg.decode = decode;
    double *verify = calloc((size_t)repeat, sizeof(double));
    double *forward = calloc((size_t)repeat, sizeof(double));
    double *all = calloc((size_t)repeat, sizeof(double));
    double *check = calloc((size_t)repeat, sizeof(double));
    int calls = 0, all_calls = 0;
    for (int i = 0; i <= repeat; i++) {
        for (int mode = 0; mode < 3; mode++) {
            cfg.all_probes = mode == 1;
            cfg.compile_check = mode == 2;
            cfg.check_again = 1; /* its cost, not a cached verdict */
            cJSON *report = NULL;
            double t0 = now_ms();
            int rc = fmx_verify_source(pack, src, len, solution, &cfg, &report);
            double t1 = now_ms();
            if (rc != FMX_OK) {
                char *text = cJSON_Print(report);
                fprintf(stderr, "bench_verify: %s does not verify:\n%s\n", solution, text);
                free(text);
                return 2;
            }
            double fwd = 0;
            int n = 0;
            const cJSON *r;
            cJSON_ArrayForEach(r, cJSON_GetObjectItem(report, "probes")) {
                const cJSON *ms = cJSON_GetObjectItem(r, "ms");
                fwd += ms ? ms->valuedouble : 0;
                n++;
            }
            cJSON_Delete(report);
            if (i == 0) continue;
            if (mode == 0) {
                calls = n;
                verify[i - 1] = (t1 - t0) / n;
                forward[i - 1] = fwd / n;
            } else if (mode == 1) {
                all_calls = n;
                all[i - 1] = (t1 - t0) / n;
            } else {
                check[i - 1] = (t1 - t0) - verify[i - 1] * calls;
            }
        }
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    char wpath[4096];
    snprintf(wpath, sizeof wpath, "%s/weights.safetensors", pack_dir);
    struct stat st;
    stat(wpath, &st);
    double c = median(compile, repeat), v = median(verify, repeat), f = median(forward, repeat);
    double a = median(all, repeat), k = median(check, repeat);
    const char *per = decode ? "step " : "probe";
    char label[256];
    snprintf(label, sizeof label, "%s%s", fmx_pack_name(pack), decode ? "/decode" : "");
    printf("%-24s %-10s verify %9.2f ms/%s  %s %9.2f ms/%s  ratio %.3f  "
           "all %9.2f ms/%s (%d)  check %7.2f ms  compile %6.2f ms  grader RSS %7.1f MiB  "
           "weights %7.1f MiB  (%d visible %s, %s)\n",
           label, fmx_pack_dtype(pack), v, per, decode ? "bare step" : "forward  ", f, per, v / f,
           a, per, all_calls, k, c, ru.ru_maxrss / 1024.0, st.st_size / 1048576.0, calls,
           decode ? "decode steps" : "probes", fmx_engine_version());
    fflush(stdout);
    free(compile);
    free(verify);
    free(forward);
    free(all);
    free(check);
    free(src);
    fmx_program_destroy(prog);
    fmx_pack_close(pack);
    return 0;
}

int main(int argc, char **argv) {
    int repeat = 5, i = 1;
    if (argc > 2 && strcmp(argv[1], "--repeat") == 0) {
        repeat = atoi(argv[2]);
        i = 3;
    }
    int pairs = 0;
    for (int j = i; j < argc; j++)
        pairs += strcmp(argv[j], "--decode") != 0;
    if (repeat < 1 || pairs < 2 || pairs % 2) {
        fprintf(stderr, "usage: bench_verify [--repeat N] [--decode] PACK SOLUTION "
                        "[[--decode] PACK SOLUTION ...]\n");
        return 2;
    }
    const char *dev = getenv("FMX_DEVICE");
    char err[512];
    if (dev && fmx_engine_set_device(dev, err, sizeof err)) {
        fprintf(stderr, "bench_verify: %s\n", err);
        return 2;
    }
    int rc = 0;
    for (; i + 1 < argc; i += 2) {
        int decode = strcmp(argv[i], "--decode") == 0;
        i += decode;
        if (i + 1 >= argc) break;
        rc |= bench_one(argv[i], argv[i + 1], repeat, decode);
    }
    return rc;
}
