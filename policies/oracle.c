/*
 * oracle.c — the oracle policy (run.h): finds the example's reference
 * solution for a task, reads every tool once as a policy would, verifies the
 * solution with verify_component and submits it. Its reward is what the
 * hand-written reference earns (correct by construction; shorter code can
 * still beat it on LOC); a failing verify means the pack and the reference
 * disagree.
 *
 * The submitted file is the reference trimmed to what the task's entry
 * function reaches (fmx_oracle_trim): a component task is graded on its own
 * functions' lines, not the whole model's. The trimming reads the file
 * through fmx's one Python model (env/pysource.h), as the LOC counter does.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "env/file.h"
#include "env/pysource.h"
#include "env/status.h"
#include "run.h"

/* ---- files ---- */

static int fmx__is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* The stem (file name without .py) and folder of the model file a pack was
 * exported from, from tasks_dir/pack/task.json's source.spec "FILE.py:NAME".
 * 0 when there is no such spec. */
static int fmx__pack_source(const char *tasks_dir, const char *pack, char *stem, size_t stemsz,
                            char *dir, size_t dirsz) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s/task.json", tasks_dir, pack);
    char ferr[256];
    char *text = fmx_file_read(path, NULL, ferr, sizeof ferr);
    cJSON *man = text ? cJSON_Parse(text) : NULL;
    free(text);
    const cJSON *src = cJSON_GetObjectItemCaseSensitive(man, "source");
    const char *spec = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(src, "spec"));
    int ok = 0;
    if (spec) {
        char file[4096];
        snprintf(file, sizeof file, "%s", spec);
        char *colon = strrchr(file, ':');
        if (colon) *colon = '\0';
        size_t n = strlen(file);
        if (n > 3 && strcmp(file + n - 3, ".py") == 0) {
            file[n - 3] = '\0';
            char *slash = strrchr(file, '/');
            snprintf(stem, stemsz, "%s", slash ? slash + 1 : file);
            if (slash)
                snprintf(dir, dirsz, "%.*s", (int)(slash - file), file);
            else
                snprintf(dir, dirsz, ".");
            ok = stem[0] != '\0';
        }
    }
    cJSON_Delete(man);
    return ok;
}

int fmx_oracle_solution(const fmx_policy_ctx *ctx, const cJSON *task, char **code, char **entry,
                        char *err, size_t errsz) {
    *code = *entry = NULL;
    const char *pack = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(task, "pack"));
    const char *cls = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(task, "class"));
    if (!pack || !cls) {
        snprintf(err, errsz, "the task has no pack or class");
        return FMX_EINVAL;
    }
    char stem[256], model_dir[4096] = "";
    if (!ctx->tasks_dir ||
        !fmx__pack_source(ctx->tasks_dir, pack, stem, sizeof stem, model_dir, sizeof model_dir))
        snprintf(stem, sizeof stem, "%s", pack);

    /* Where solutions may be: --solutions, beside the model's folder, the source tree. */
    const char *dirs[3];
    char beside[4200];
    int nd = 0;
    if (ctx->solutions_dir) dirs[nd++] = ctx->solutions_dir;
    if (model_dir[0]) {
        snprintf(beside, sizeof beside, "%s/../solutions", model_dir);
        dirs[nd++] = beside;
    }
#ifdef FMX_SOURCE_DIR
    dirs[nd++] = FMX_SOURCE_DIR "/examples/solutions";
#endif
    char py[4400], entries[4400];
    int found = 0;
    /* A decode task's solution is STEM_decode.py, entry forward (the cache convention). */
    const char *kind = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(task, "kind"));
    int decode = kind && strcmp(kind, "decode") == 0;
    for (int i = 0; i < nd && !found; i++) {
        snprintf(py, sizeof py, "%s/%s%s.py", dirs[i], stem, decode ? "_decode" : "");
        snprintf(entries, sizeof entries, "%s/%s.entries.json", dirs[i], stem);
        found = fmx__is_file(py) && (decode || fmx__is_file(entries));
    }
    if (!found && decode) {
        snprintf(err, errsz,
                 "no reference solution %s_decode.py for the decode task of pack %s: looked in "
                 "%s%s%s (--solutions DIR adds a folder)",
                 stem, pack, nd ? dirs[0] : "(nowhere)", nd > 1 ? ", " : "",
                 nd > 1 ? dirs[nd - 1] : "");
        return FMX_ENOTFOUND;
    }
    if (decode) {
        char ferr[256];
        *code = fmx_file_read(py, NULL, ferr, sizeof ferr);
        *entry = strdup("forward");
        if (!*code || !*entry) {
            snprintf(err, errsz, "%s: %s", py, *code ? "out of memory" : ferr);
            free(*code);
            free(*entry);
            *code = *entry = NULL;
            return FMX_EIO;
        }
        return FMX_OK;
    }
    if (!found) {
        snprintf(err, errsz,
                 "no reference solution %s.py (with %s.entries.json) for pack %s: looked in %s%s%s "
                 "(--solutions DIR adds a folder)",
                 stem, stem, pack, nd ? dirs[0] : "(nowhere)", nd > 1 ? ", " : "",
                 nd > 1 ? dirs[nd - 1] : "");
        return FMX_ENOTFOUND;
    }
    char ferr[256];
    char *text = fmx_file_read(entries, NULL, ferr, sizeof ferr);
    cJSON *map = text ? cJSON_Parse(text) : NULL;
    free(text);
    const char *e = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(map, cls));
    if (!e) {
        snprintf(err, errsz, "%s names no entry function for class %s", entries, cls);
        cJSON_Delete(map);
        return FMX_ENOTFOUND;
    }
    char *src = fmx_file_read(py, NULL, ferr, sizeof ferr);
    *entry = strdup(e);
    cJSON_Delete(map);
    *code = src ? fmx_oracle_trim(src, *entry) : NULL;
    free(src);
    if (!*code || !*entry) {
        snprintf(err, errsz, "%s: %s", py, *entry ? strerror(errno) : "out of memory");
        free(*code);
        free(*entry);
        *code = *entry = NULL;
        return FMX_EIO;
    }
    return FMX_OK;
}

/* ---- trimming a solution to one entry ---- */

/* The top-level blocks of fmx's Python model (pysource.h), each kept whole:
 * with the blank and comment lines that follow it up to the next block. */
typedef struct {
    size_t start, end; /* bytes of the source */
    const fmx_py_block *b;
    int keep;
} fmx__block;

/* Marks block k and, recursively, the def and constant blocks whose names
 * occur in it. */
static void fmx__reach(const fmx_pysource *ps, fmx__block *b, long nb, long k) {
    if (b[k].keep) return;
    b[k].keep = 1;
    const fmx_py_token *tok;
    const fmx_py_line *lines;
    fmx_pysource_tokens(ps, &tok);
    fmx_pysource_lines(ps, &lines);
    const char *src = fmx_pysource_text(ps);
    long first = lines[b[k].b->line].tok;
    const fmx_py_line *last = &lines[b[k].b->line + b[k].b->nlines - 1];
    for (long i = first; i < last->tok + last->ntok; i++) {
        if (tok[i].kind != FMX_PY_NAME) continue;
        for (long t = 0; t < nb; t++) {
            const fmx_py_block *bt = b[t].b;
            if (b[t].keep || (bt->kind != FMX_PY_BLOCK_DEF && bt->kind != FMX_PY_BLOCK_ASSIGN))
                continue;
            const fmx_py_token *name = &tok[bt->name];
            if (name->end - name->start == tok[i].end - tok[i].start &&
                memcmp(src + name->start, src + tok[i].start, name->end - name->start) == 0)
                fmx__reach(ps, b, nb, t);
        }
    }
}

char *fmx_oracle_trim(const char *src, const char *entry) {
    size_t n = strlen(src);
    fmx_pysource *ps = NULL;
    if (fmx_pysource_open(src, n, &ps) != FMX_OK) return NULL;
    const fmx_py_block *blocks;
    const fmx_py_line *lines;
    const fmx_py_physline *phys;
    const fmx_py_token *tok;
    long nb = fmx_pysource_blocks(ps, &blocks);
    fmx_pysource_lines(ps, &lines);
    fmx_pysource_physlines(ps, &phys);
    fmx_pysource_tokens(ps, &tok);
    fmx__block *b = calloc((size_t)nb + 1, sizeof *b);
    if (!b) {
        fmx_pysource_close(ps);
        return NULL;
    }
    long root = -1;
    for (long k = 0; k < nb; k++) {
        b[k].b = &blocks[k];
        b[k].start = phys[lines[blocks[k].line].first - 1].start;
        if (k) b[k - 1].end = b[k].start;
        b[k].end = n;
        if (root < 0 && blocks[k].kind == FMX_PY_BLOCK_DEF &&
            fmx_pysource_tok_is(ps, &tok[blocks[k].name], FMX_PY_NAME, entry))
            root = k;
    }
    char *out = NULL;
    if (root < 0) { /* no such function: leave the file whole, verify will say why */
        out = strdup(src);
    } else {
        fmx__reach(ps, b, nb, root);
        out = malloc(n + 1);
        size_t len = 0;
        for (long k = 0; out && k < nb; k++) {
            /* imports and other statements stay; docstrings and the
             * __main__ block go; defs and constants stay if reached */
            int kind = blocks[k].kind;
            int keep = b[k].keep || kind == FMX_PY_BLOCK_IMPORT || kind == FMX_PY_BLOCK_OTHER ||
                       kind == FMX_PY_BLOCK_CLASS;
            if (!keep) continue;
            memcpy(out + len, src + b[k].start, b[k].end - b[k].start);
            len += b[k].end - b[k].start;
        }
        if (out) out[len] = '\0';
    }
    free(b);
    fmx_pysource_close(ps);
    return out;
}

/* ---- the episode ---- */

/* One step; updates res. Returns 1 when the episode ended, 0 when it goes
 * on, or a negative code (err set). *reply (may be NULL) gets the reply. */
static int fmx__act(fmx_client *c, int64_t ep, const char *tool, const cJSON *args,
                    fmx_episode_result *res, cJSON **reply, char *err, size_t errsz) {
    cJSON *r = NULL;
    int rc = fmx_client_step(c, ep, tool, args, &r);
    if (rc != FMX_OK) {
        snprintf(err, errsz, "%s: %s: %s", tool, fmx_client_errcode(c), fmx_client_errmsg(c));
        return rc;
    }
    res->steps++;
    res->terminated = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "terminated"));
    res->truncated = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "truncated"));
    const cJSON *reward = cJSON_GetObjectItemCaseSensitive(r, "reward");
    if (cJSON_IsNumber(reward)) res->reward = reward->valuedouble;
    const cJSON *grade =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(r, "info"), "grade");
    const cJSON *corr = cJSON_GetObjectItemCaseSensitive(grade, "correctness");
    if (cJSON_IsNumber(corr)) res->correctness = corr->valuedouble;
    if (reply)
        *reply = r;
    else
        cJSON_Delete(r);
    return res->terminated || res->truncated;
}

/* 1 when a verify_component reply says every visible probe matched. */
static int fmx__matched(const cJSON *reply) {
    const cJSON *obs = cJSON_GetObjectItemCaseSensitive(reply, "observation");
    const cJSON *data = cJSON_GetObjectItemCaseSensitive(obs, "data");
    const char *st = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(data, "status"));
    return st && strcmp(st, "match") == 0;
}

int fmx_policy_oracle(fmx_client *c, const char *name, const cJSON *task, int64_t seed,
                      const fmx_policy_ctx *ctx, fmx_episode_result *res, char *err, size_t errsz) {
    const char *id = fmx_policy_begin(task, res, err, errsz);
    const char *path = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(task, "module"));
    if (!id || !path) {
        snprintf(err, errsz, "a task without id or module");
        return FMX_EINVAL;
    }
    char *code = NULL, *entry = NULL;
    int rc = fmx_oracle_solution(ctx, task, &code, &entry, err, errsz);
    if (rc != FMX_OK) return rc;

    rc = fmx_client_reset(c, id, name, seed, &res->episode, NULL);
    if (rc != FMX_OK) {
        snprintf(err, errsz, "reset %s: %s: %s", id, fmx_client_errcode(c), fmx_client_errmsg(c));
        free(code);
        free(entry);
        return rc;
    }
    int64_t ep = res->episode;
    cJSON *args = cJSON_CreateObject();
    cJSON_AddStringToObject(args, "path", path);
    /* Read everything once, as a policy would. */
    static const char *const reads[] = {"read_module_source", "get_weight_info", "trace_ops"};
    int ended = 0;
    for (int i = 0; i < 3 && ended == 0; i++)
        ended = fmx__act(c, ep, reads[i], args, res, NULL, err, errsz);
    if (ended == 0) {
        cJSON *cap = cJSON_Duplicate(args, 1);
        cJSON_AddNumberToObject(cap, "probe", 0);
        ended = fmx__act(c, ep, "capture_intermediate", cap, res, NULL, err, errsz);
        cJSON_Delete(cap);
    }
    /* Verify, then submit what matched. */
    cJSON_AddStringToObject(args, "code", code);
    cJSON_AddStringToObject(args, "entry", entry);
    cJSON *reply = NULL;
    if (ended == 0) ended = fmx__act(c, ep, "verify_component", args, res, &reply, err, errsz);
    res->verified = ended == 0 && fmx__matched(reply);
    cJSON_Delete(reply);
    if (ended == 0) {
        cJSON_DeleteItemFromObjectCaseSensitive(args, "path");
        ended = fmx__act(c, ep, "submit", args, res, NULL, err, errsz);
    }
    cJSON_Delete(args);
    free(code);
    free(entry);
    if (ended < 0) {
        fmx_client_close_episode(c, ep);
        return ended;
    }
    return FMX_OK;
}
