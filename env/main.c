/*
 * main.c — the `fmx` command: one binary, one subcommand per job.
 *
 *   fmx export ...            make a task pack (hands over to the Python exporter)
 *   fmx verify PACK FILE ...  grade a candidate file against a pack
 *   fmx mutate PACK SOLUTION  how strong a pack's probes are: mutants of a solution
 *   fmx info PACK             what a pack holds: modules, probes, sizes
 *   fmx serve --tasks DIR     the RL environment server (env/server.c)
 *   fmx keygen [-o FILE]      a CURVE key pair for serve --curve-secret-key
 *   fmx run --policy NAME     play a built-in policy on every task (policies/run.c)
 *   fmx leaderboard --db DB   how policies scored, from the episode log (--html FILE: a page)
 *   fmx replay --db DB EP     one episode's transcript, re-executed against its pack
 *   fmx regrade --db DB       every stored submission rescored under another reward config
 *   fmx episodes export       the log's episodes as JSONL chat transcripts (training data)
 *   fmx version
 *
 * Exit codes: 0 ok/match, 1 mismatch, 2 error (bad input, compile or run
 * failure).
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "engine/engine.h"
#include "file.h"
#include "mutate.h"
#include "pack.h"
#include "pyexec.h"
#include "pysource.h"
#include "episodes/export.h"
#include "episodes/leaderboard.h"
#include "episodes/replay.h"
#include "policies/run.h"
#include "rewards/reward.h"
#include "server.h"
#include "status.h"
#include "verify.h"
#include "worker.h"

#ifndef FMX_VERSION
#error "FMX_VERSION is the project version, defined by CMakeLists.txt"
#endif

static const char *usage_text =
    "usage: fmx <command> [options]\n"
    "\n"
    "commands:\n"
    "  export SPEC -o DIR [options]   make a task pack from FILE.py:FACTORY (or --hf DIR,\n"
    "                                 --hf-config FILE --random-init); see fmx export --help\n"
    "  verify PACK FILE... [options]  grade candidate FILE (or several) against PACK\n"
    "      --component PATH           verify one module (default: the whole model)\n"
    "      --entry NAME               function to call (default: forward)\n"
    "      --decode                   the decode task: the model with its KV cache, per\n"
    "                                 generation step (docs/pack-format.md, Generation)\n"
    "      --probes visible|all       probes to grade (default: visible)\n"
    "      --atol X --rtol Y          override the pack's float tolerance\n"
    "      --device cpu|cuda[:N]      where to run (default: cpu)\n"
    "      --json                     print the report as JSON\n"
    "      --timeout S                give up after S seconds (exit 2, \"timed out\")\n"
    "  trace PACK [-o FILE] [options] write flat functional code for PACK from its op traces\n"
    "                                 alone (the tracer policy, no server, no LLM)\n"
    "      --component PATH           one module (default: the whole model)\n"
    "      --verify                   then verify it on every probe (needs -o)\n"
    "      --decode                   the decode task: refused, with the reason\n"
    "  suite -o DIR [--check]         export the real-architecture suite (examples/suite, needs\n"
    "                                 transformers) into packs; --check traces and verifies\n"
    "                                 each (see fmx suite --help)\n"
    "  mutate PACK SOLUTION [options] verify mutants of a correct SOLUTION on every probe and\n"
    "                                 report which survive (see fmx mutate --help)\n"
    "  info PACK [--json]             modules, classes, probes and sizes of a pack\n"
    "      --tensor KEY               one stored tensor (weight or capture) as JSON + hex\n"
    "  serve --tasks DIR [options]    run the RL environment server (see fmx serve --help)\n"
    "  keygen [-o FILE]               a CURVE key pair for fmx serve --curve-secret-key\n"
    "  run --policy oracle|null|tracer|llm [options]\n"
    "                                 play a built-in policy on every task (starting a server\n"
    "                                 unless --connect ADDR) and print the leaderboard (see\n"
    "                                 fmx run --help)\n"
    "  leaderboard --db FILE          policy x task: episodes, pass rate, reward, LOC, steps\n"
    "      --html FILE                also write a static HTML page with charts\n"
    "  replay --db FILE EPISODE --tasks DIR\n"
    "                                 print an episode and re-execute it against its pack;\n"
    "                                 exit 1 if an observation differs from the log\n"
    "  regrade --db FILE [--reward FILE] [--rerun --tasks DIR]\n"
    "                                 rescore every stored submission under a reward config\n"
    "                                 (new rows in the log's grades table)\n"
    "  episodes export --db FILE [--filter K=V,...] [-o FILE]\n"
    "                                 episodes as JSONL chat transcripts (OpenAI format)\n"
    "  episodes merge -o FILE LOG...  several servers' logs as one\n"
    "  version                        fmx and libtorch versions\n"
    "\n"
    "exit status: 0 match/ok, 1 mismatch, 2 error\n";

/* `fmx CMD --help` for the commands whose options are parsed elsewhere (the
 * Python exporter and tracer) or that have none of their own; the other
 * commands print their own usage. */
static const struct {
    const char *cmd, *usage;
} fmx__command_help[] = {
    {"export",
     "usage: fmx export SPEC -o DIR [options]\n"
     "       fmx export --hf DIR -o DIR [--random-init] [options]\n"
     "       fmx export --hf-config config.json --random-init -o DIR [options]\n"
     "  runs a PyTorch model on probe inputs and writes a task pack (task.json,\n"
     "  weights.safetensors, weights_hidden.safetensors, probes.safetensors)\n"
     "  SPEC                     FILE.py:NAME, a factory called as NAME(**overrides) or an\n"
     "                           nn.Module class with config_class\n"
     "  -o DIR                   the pack directory to create\n"
     "  --hf DIR                 a local transformers snapshot (config.json + safetensors)\n"
     "  --hf-config FILE         a transformers config; weights are random\n"
     "  --random-init            with --hf: random weights from the snapshot's config\n"
     "  --sensitive-init         redraw the weights so that every op moves the output\n"
     "  --set KEY=VALUE          config override (VALUE is JSON, else a string); repeatable\n"
     "  --seed N                 seed of the weights and probes (default 0)\n"
     "  --probes N --hidden M    visible and hidden probes (default 3 and 3)\n"
     "  --probe-shapes BxT:PAD,...  probe shapes, e.g. 1x8:none,2x13:left (visible first)\n"
     "  --dtype float32|bfloat16 the model's dtype (default float32)\n"
     "  --no-bf16-probe          no bfloat16 rerun of a visible and a hidden probe\n"
     "  --tolerance DTYPE=ATOL:RTOL,...  tolerances recorded in the pack\n"
     "  --device DEV             where the reference runs (default cpu)\n"
     "  --name NAME              pack name (default: DIR's folder name)\n"
     "  --force                  replace an existing pack\n"
     "  --quiet                  no progress lines\n"
     "  --equivalent FILE        equivalent mutants of the pack's solutions (JSON)\n"
     "  --solution FILE          then run fmx mutate DIR FILE and print the mutation score\n"
     "  (docs/pack-format.md says what a pack holds; FMX_PYTHON picks the interpreter)\n"},
    {"verify",
     "usage: fmx verify PACK FILE [FILE...] [options]\n"
     "  grades candidate FILE against PACK: every graded output of the component on every\n"
     "  probe, the first divergence, and the compile check; several files are graded in\n"
     "  turn by one fmx (one report each; with --json one JSON object per line)\n"
     "  --component PATH         verify one module (default: the whole model)\n"
     "  --entry NAME             function to call (default: forward)\n"
     "  --probes visible|all     probes to grade (default: visible)\n"
     "  --atol X --rtol Y        override the pack's tolerance\n"
     "  --device cpu|cuda[:N]    where to run (default: cpu)\n"
     "  --timeout S              give up after S seconds, all files together (exit 2)\n"
     "  --json                   print the report as JSON\n"
     "exit status: 0 every graded output matches, 1 mismatch, 2 error (several files:\n"
     "the worst of theirs)\n"},
    {"trace", "usage: fmx trace PACK [--component PATH] [-o FILE] [--verify]\n"
              "  writes flat functional code for PACK from its op traces alone (the tracer\n"
              "  policy: no server, no LLM), warning about any module whose trace is not general\n"
              "  --component PATH         one module (default: the whole model)\n"
              "  -o FILE                  write the code here (default: standard output)\n"
              "  --verify                 then fmx verify --probes all on it (needs -o)\n"},
    {"info", "usage: fmx info PACK [--json] [--tensor KEY]\n"
             "  what a pack holds: root class, dtype, where its reference ran, hidden weights,\n"
             "  constants no probe sees, probes (shapes, padding, dtype) and the module tree\n"
             "  --json                   the same as JSON, with the files and classes\n"
             "  --tensor KEY             one stored tensor (weight or capture) as JSON + hex\n"},
    {"keygen",
     "usage: fmx keygen [-o FILE]\n"
     "  makes a CURVE key pair for fmx serve --curve-secret-key FILE: prints the public key\n"
     "  (hand it to clients) and, with -o, writes both keys to FILE (mode 0600)\n"},
    {"version", "usage: fmx version\n  fmx's version and its libtorch's (version, device)\n"},
};

/* The usage of `fmx CMD --help` (or -h anywhere after CMD) when fmx__command_help has it. */
static const char *fmx__help_for(int argc, char **argv) {
    int asked = 0;
    for (int i = 2; i < argc; i++)
        asked |= strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0;
    for (size_t k = 0; asked && k < sizeof fmx__command_help / sizeof fmx__command_help[0]; k++)
        if (strcmp(argv[1], fmx__command_help[k].cmd) == 0) return fmx__command_help[k].usage;
    return NULL;
}

static int die(const char *fmt, const char *a) {
    fprintf(stderr, "fmx: ");
    fprintf(stderr, fmt, a);
    fputc('\n', stderr);
    return 2;
}

/* fmx export / fmx trace: run `python3 -m fmx.export` / `fmx.tracer --pack` with the
 * package on PYTHONPATH and FMX_BIN set to this binary (the exporter's --solution runs
 * `fmx mutate`, trace --verify runs `fmx verify`). */
/* `fmx export ARGS` and `fmx trace PACK ARGS` run fmx's Python package
 * (python -m MODULE [FLAG] ARGS) in this process's place. */
static int cmd_python(const char *cmd, const char *module, const char *flag, int argc,
                      char **argv) {
    if (fmx_python_env() != FMX_OK) return 2;
    const char *py = fmx_python_interpreter();
    char **args = calloc((size_t)argc + 5, sizeof *args);
    if (!args) return 2;
    int n = 0;
    args[n++] = (char *)py;
    args[n++] = "-m";
    args[n++] = (char *)module;
    if (flag && argc > 1 && argv[1][0] != '-') args[n++] = (char *)flag; /* PACK -> --pack PACK */
    for (int i = 1; i < argc; i++)
        args[n++] = argv[i];
    args[n] = NULL;
    execvp(py, args); /* FMX_PYTHON=python3 is looked up on PATH */
    fprintf(stderr, "fmx %s: cannot run %s: %s (set FMX_PYTHON to a python3 with torch)\n", cmd, py,
            strerror(errno));
    free(args);
    return 2;
}

static int need_value(int i, int argc, char **argv) {
    if (i + 1 >= argc) {
        fprintf(stderr, "fmx: %s needs a value\n", argv[i]);
        return 0;
    }
    return 1;
}

static int parse_double(const char *s, double *out) {
    char *end;
    errno = 0;
    *out = strtod(s, &end);
    return errno == 0 && end != s && *end == '\0' && *out >= 0;
}

/* fmx verify --timeout: what the SIGALRM handler writes before _exit(2),
 * formatted before the timer is armed (a handler may only write()). */
static char fmx__timeout_out[512], fmx__timeout_err[256];
static size_t fmx__timeout_out_len, fmx__timeout_err_len;

static void fmx__on_timeout(int sig) {
    (void)sig;
    ssize_t w = 0;
    if (fmx__timeout_out_len) w = write(STDOUT_FILENO, fmx__timeout_out, fmx__timeout_out_len);
    w = write(STDERR_FILENO, fmx__timeout_err, fmx__timeout_err_len);
    (void)w;
    _exit(2);
}

/* Arms a wall-clock limit of secs seconds on the rest of the process. */
static void fmx__arm_timeout(double secs, const char *pack, const char *file, int json) {
    fmx__timeout_err_len = (size_t)snprintf(fmx__timeout_err, sizeof fmx__timeout_err,
                                            "fmx: verify timed out after %g s\n", secs);
    if (fmx__timeout_err_len >= sizeof fmx__timeout_err)
        fmx__timeout_err_len = sizeof fmx__timeout_err - 1;
    fmx__timeout_out_len = 0;
    if (json) {
        cJSON *r = cJSON_CreateObject();
        cJSON_AddStringToObject(r, "status", "error");
        cJSON_AddStringToObject(r, "pack", pack);
        cJSON_AddStringToObject(r, "file", file);
        cJSON *e = cJSON_AddObjectToObject(r, "error");
        cJSON_AddStringToObject(e, "stage", "timeout");
        char msg[64];
        snprintf(msg, sizeof msg, "timed out after %g s", secs);
        cJSON_AddStringToObject(e, "message", msg);
        char *text = cJSON_PrintUnformatted(r);
        if (text) {
            int n = snprintf(fmx__timeout_out, sizeof fmx__timeout_out, "%s\n", text);
            if (n > 0 && (size_t)n < sizeof fmx__timeout_out) fmx__timeout_out_len = (size_t)n;
        }
        free(text);
        cJSON_Delete(r);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fmx__on_timeout;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it;
    memset(&it, 0, sizeof it);
    it.it_value.tv_sec = (time_t)secs;
    it.it_value.tv_usec = (suseconds_t)((secs - (double)(time_t)secs) * 1e6);
    if (it.it_value.tv_sec == 0 && it.it_value.tv_usec == 0) it.it_value.tv_usec = 1;
    setitimer(ITIMER_REAL, &it, NULL);
}

static int cmd_verify(int argc, char **argv) {
    fmx_verify_config cfg = fmx_verify_config_default();
    cfg.compile_check = 1;
    const char *pos[256] = {0}; /* PACK FILE [FILE...] */
    int npos = 0, json = 0;
    const char *device = "cpu";
    int have_atol = 0, have_rtol = 0;
    double timeout = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--json") == 0) {
            json = 1;
        } else if (strcmp(a, "--timeout") == 0) {
            if (!need_value(i, argc, argv)) return 2;
            if (!parse_double(argv[i + 1], &timeout) || timeout <= 0 || timeout > 1e6)
                return die("--timeout takes a number of seconds > 0, not '%s'", argv[i + 1]);
            i++;
        } else if (strcmp(a, "--component") == 0) {
            if (!need_value(i, argc, argv)) return 2;
            cfg.component = argv[++i];
        } else if (strcmp(a, "--entry") == 0) {
            if (!need_value(i, argc, argv)) return 2;
            cfg.entry = argv[++i];
        } else if (strcmp(a, "--decode") == 0) {
            cfg.decode = 1;
        } else if (strcmp(a, "--probes") == 0) {
            if (!need_value(i, argc, argv)) return 2;
            const char *v = argv[++i];
            if (strcmp(v, "all") == 0)
                cfg.all_probes = 1;
            else if (strcmp(v, "visible") == 0)
                cfg.all_probes = 0;
            else
                return die("--probes takes 'visible' or 'all', not '%s'", v);
        } else if (strcmp(a, "--atol") == 0 || strcmp(a, "--rtol") == 0) {
            if (!need_value(i, argc, argv)) return 2;
            double v;
            if (!parse_double(argv[i + 1], &v))
                return die("tolerance must be a non-negative number, not '%s'", argv[i + 1]);
            if (a[2] == 'a') {
                cfg.tol.atol = v;
                have_atol = 1;
            } else {
                cfg.tol.rtol = v;
                have_rtol = 1;
            }
            i++;
        } else if (strcmp(a, "--device") == 0) {
            if (!need_value(i, argc, argv)) return 2;
            device = argv[++i];
        } else if (a[0] == '-' && a[1]) {
            return die("verify: unknown option '%s' (see fmx verify --help)", a);
        } else if (npos < (int)(sizeof pos / sizeof *pos)) {
            pos[npos++] = a;
        } else {
            return die("%s", "verify: at most 255 files at once");
        }
    }
    if (npos < 2) return die("%s", "verify needs PACK and FILE: fmx verify PACK FILE [options]");
    if (have_atol != have_rtol) return die("%s", "give --atol and --rtol together");
    cfg.override_tol = have_atol;

    char err[2048];
    if (timeout > 0) fmx__arm_timeout(timeout, pos[0], pos[1], json);
    if (fmx_engine_set_device(device, err, sizeof err) != 0) return die("%s", err);
    fmx_pack *pack = NULL;
    if (fmx_pack_open(pos[0], &pack, err, sizeof err) != 0) return die("%s", err);
    /* Several files: one report each, in order (with --json one object per
     * line); each is graded in evaluation processes of its own, as one file
     * is. The exit status is the worst of theirs. */
    int worst = 0;
    for (int f = 1; f < npos; f++) {
        size_t len = 0;
        char *src = fmx_file_read(pos[f], &len, err, sizeof err);
        if (!src) {
            fprintf(stderr, "fmx: %s\n", err);
            worst = 2;
            continue;
        }
        cJSON *report = NULL;
        int rc = fmx_verify_source(pack, src, len, pos[f], &cfg, &report);
        free(src);
        if (report) {
            cJSON_AddStringToObject(report, "file", pos[f]);
            if (json) {
                char *text = npos > 2 ? cJSON_PrintUnformatted(report) : cJSON_Print(report);
                if (text) puts(text);
                free(text);
            } else {
                if (npos > 2) printf("%s== %s\n", f > 1 ? "\n" : "", pos[f]);
                fmx_verify_print(stdout, report, isatty(STDOUT_FILENO));
            }
            cJSON_Delete(report);
        }
        fflush(stdout);
        int code = rc == FMX_OK ? 0 : rc == FMX_EMISMATCH ? 1 : 2;
        if (code > worst) worst = code;
    }
    fmx_pack_close(pack);
    return worst;
}

/* Prints one tensor as JSON: dtype, shape and its raw bytes in hex. */
static int print_tensor(fmx_pack *pack, const char *key) {
    const fmx_tensor *t = fmx_pack_capture(pack, key);
    const char *const *keys;
    const fmx_tensor *const *vals;
    char err[512];
    int n = fmx_pack_weights(pack, "", &keys, &vals, err, sizeof err);
    for (int i = 0; !t && i < n; i++)
        if (strcmp(keys[i], key) == 0) t = vals[i];
    if (!t) return die("no tensor '%s' in the pack's weights or captures", key);
    int64_t shape[FMX_MAX_DIMS];
    fmx_dtype dt;
    int nd = fmx_tensor_shape(t, shape, &dt);
    size_t bytes = fmx_dtype_size(dt);
    printf("{\"key\": \"%s\", \"dtype\": \"%s\", \"shape\": [", key, fmx_dtype_name(dt));
    for (int i = 0; i < nd; i++) {
        printf("%s%lld", i ? ", " : "", (long long)shape[i]);
        bytes *= (size_t)shape[i];
    }
    unsigned char *buf = malloc(bytes ? bytes : 1);
    if (!buf || fmx_tensor_read(t, buf, bytes, err, sizeof err) != 0) {
        free(buf);
        return die("%s", err);
    }
    printf("], \"hex\": \"");
    for (size_t i = 0; i < bytes; i++)
        printf("%02x", buf[i]);
    printf("\"}\n");
    free(buf);
    return 0;
}

static int cmd_info(int argc, char **argv) {
    const char *dir = NULL, *tensor = NULL;
    int json = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0)
            json = 1;
        else if (strcmp(argv[i], "--tensor") == 0) {
            if (!need_value(i, argc, argv)) return 2;
            tensor = argv[++i];
        } else if (argv[i][0] == '-' && argv[i][1])
            return die("info: unknown option '%s' (see fmx info --help)", argv[i]);
        else if (!dir)
            dir = argv[i];
        else
            return die("info: unexpected argument '%s'", argv[i]);
    }
    if (!dir) return die("%s", "info needs PACK: fmx info PACK");
    char err[2048];
    fmx_pack *pack = NULL;
    if (fmx_pack_open(dir, &pack, err, sizeof err) != 0) return die("%s", err);
    const cJSON *man = fmx_pack_manifest(pack);
    if (tensor) {
        int rc = print_tensor(pack, tensor);
        fmx_pack_close(pack);
        return rc;
    }
    /* The pack opened, so a hidden set it names is there and matches the public one. */
    const char *hidden = fmx_pack_weights_path(pack, 1) != fmx_pack_weights_path(pack, 0)
                             ? cJSON_GetStringValue(cJSON_GetObjectItem(man, "hidden_weights"))
                             : NULL;
    const cJSON *constants = cJSON_GetObjectItem(man, "constants");
    const cJSON *unseen = cJSON_GetObjectItem(man, "unseen_constants");
    if (json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", fmx_pack_name(pack));
        cJSON_AddStringToObject(o, "dtype", fmx_pack_dtype(pack));
        if (hidden)
            cJSON_AddStringToObject(o, "hidden_weights", hidden);
        else
            cJSON_AddNullToObject(o, "hidden_weights");
        /* null when the pack was exported without measuring them */
        cJSON_AddItemToObject(o, "constants",
                              cJSON_IsArray(constants) ? cJSON_Duplicate(constants, 1)
                                                       : cJSON_CreateNull());
        cJSON_AddItemToObject(o, "unseen_constants",
                              cJSON_IsArray(unseen) ? cJSON_Duplicate(unseen, 1)
                                                    : cJSON_CreateNull());
        cJSON *mods = cJSON_AddArrayToObject(o, "modules");
        for (int i = 0; i < fmx_pack_nmodules(pack); i++) {
            cJSON *m = cJSON_CreateObject();
            cJSON_AddStringToObject(m, "path", fmx_pack_module(pack, i)->path);
            cJSON_AddStringToObject(m, "class", fmx_pack_module(pack, i)->cls);
            cJSON_AddItemToArray(mods, m);
        }
        cJSON_AddNumberToObject(o, "probes", fmx_pack_nprobes(pack));
        cJSON_AddNumberToObject(o, "calls", fmx_pack_ncalls(pack));
        /* Sources and coverage as the loader holds them. */
        cJSON_AddItemToObject(o, "files", cJSON_Duplicate(cJSON_GetObjectItem(man, "files"), 1));
        cJSON_AddItemToObject(o, "classes",
                              cJSON_Duplicate(cJSON_GetObjectItem(man, "classes"), 1));
        char *text = cJSON_Print(o);
        puts(text);
        free(text);
        cJSON_Delete(o);
        fmx_pack_close(pack);
        return 0;
    }
    const cJSON *by = cJSON_GetObjectItem(man, "created_by");
    printf("pack %s: %s, %s, made with torch %s on %s\n", fmx_pack_name(pack),
           cJSON_GetStringValue(cJSON_GetObjectItem(man, "root_class")), fmx_pack_dtype(pack),
           cJSON_GetStringValue(cJSON_GetObjectItem(by, "torch")),
           cJSON_GetStringValue(cJSON_GetObjectItem(by, "device")));
    if (hidden)
        printf("hidden weights: %s (hidden probes run under it)\n", hidden);
    else
        printf("hidden weights: none (hidden probes run under the public weights)\n");
    if (!cJSON_IsArray(constants) || !cJSON_IsArray(unseen))
        printf("constants: not measured\n");
    else if (cJSON_GetArraySize(unseen) == 0)
        printf("constants: each of %d eps-like constants, x1.5 and /1.5, moves some probe past the "
               "tolerance\n",
               cJSON_GetArraySize(constants));
    else {
        printf("unseen constants (%d of %d): no probe moves past the tolerance when they change\n",
               cJSON_GetArraySize(unseen), cJSON_GetArraySize(constants));
        const cJSON *u;
        cJSON_ArrayForEach(u, unseen) {
            printf("  %s %s: %s\n", cJSON_GetStringValue(cJSON_GetObjectItem(u, "module")),
                   cJSON_GetStringValue(cJSON_GetObjectItem(u, "constant")),
                   cJSON_GetStringValue(cJSON_GetObjectItem(u, "why")));
        }
    }
    printf("\nprobes:\n");
    for (int i = 0; i < fmx_pack_nprobes(pack); i++) {
        const fmx_probe *p = fmx_pack_probe(pack, i);
        char words[256];
        printf("  %-4s %-7s %s\n", p->name, p->visible ? "visible" : "hidden",
               fmx_pack_probe_describe(pack, i, words, sizeof words));
    }
    printf("\nmodules (%d):\n", fmx_pack_nmodules(pack));
    for (int i = 0; i < fmx_pack_nmodules(pack); i++) {
        const fmx_module *m = fmx_pack_module(pack, i);
        int depth = 0;
        for (int k = m->parent; k >= 0; k = fmx_pack_module(pack, k)->parent)
            depth++;
        printf("  %*s%-*s %s%s\n", depth * 2, "", 40 - depth * 2, m->path[0] ? m->path : "(root)",
               m->cls, m->first_call < 0 ? "  (never called)" : "");
    }
    fmx_pack_close(pack);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0 ||
        strcmp(argv[1], "help") == 0) {
        fputs(usage_text, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    const char *help = fmx__help_for(argc, argv);
    if (help) {
        fputs(help, stdout);
        return 0;
    }
    if (strcmp(cmd, "export") == 0) return cmd_python(cmd, "fmx.export", NULL, argc - 1, argv + 1);
    if (strcmp(cmd, "trace") == 0)
        return cmd_python(cmd, "fmx.tracer", "--pack", argc - 1, argv + 1);
    if (strcmp(cmd, "suite") == 0) return cmd_python(cmd, "fmx.suite", NULL, argc - 1, argv + 1);
    if (strcmp(cmd, "verify") == 0) return cmd_verify(argc - 1, argv + 1);
    if (strcmp(cmd, "mutate") == 0) return fmx_mutate_main(argc - 1, argv + 1);
    if (strcmp(cmd, "info") == 0) return cmd_info(argc - 1, argv + 1);
    if (strcmp(cmd, "serve") == 0) return fmx_serve_main(argc - 1, argv + 1);
    if (strcmp(cmd, "keygen") == 0) return fmx_serve_keygen_main(argc - 1, argv + 1);
    /* hidden: fmx's model of a Python file as JSON, for tests (env/pysource.h) */
    if (strcmp(cmd, "pysource") == 0)
        return fmx_pysource_main(argc - 1, argv + 1, fmx_reward_count_loc);
    /* hidden: a worker process of `fmx serve --worker-exec` (env/worker.h) */
    if (strcmp(cmd, "worker") == 0) return fmx_worker_main(argc - 1, argv + 1);
    if (strcmp(cmd, "run") == 0) return fmx_run_main(argc - 1, argv + 1);
    if (strcmp(cmd, "leaderboard") == 0) return fmx_leaderboard_main(argc - 1, argv + 1);
    if (strcmp(cmd, "replay") == 0) return fmx_replay_main(argc - 1, argv + 1);
    if (strcmp(cmd, "regrade") == 0) return fmx_regrade_main(argc - 1, argv + 1);
    if (strcmp(cmd, "episodes") == 0) return fmx_episodes_main(argc - 1, argv + 1);
    if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) {
        printf("fmx %s (%s)\n", FMX_VERSION, fmx_engine_version());
        return 0;
    }
    fprintf(stderr, "fmx: unknown command '%s'\n\n%s", cmd, usage_text);
    return 2;
}
