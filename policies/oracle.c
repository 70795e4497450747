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
 * functions' lines, not the whole model's.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "env/file.h"
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
    for (int i = 0; i < nd && !found; i++) {
        snprintf(py, sizeof py, "%s/%s.py", dirs[i], stem);
        snprintf(entries, sizeof entries, "%s/%s.entries.json", dirs[i], stem);
        found = fmx__is_file(py) && fmx__is_file(entries);
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

/* src with string contents and comments blanked (newlines kept), so that
 * brackets, quotes and names can be found by looking at characters. */
static char *fmx__mask(const char *src, size_t n) {
    char *m = malloc(n + 1);
    if (!m) return NULL;
    memcpy(m, src, n + 1);
    size_t i = 0;
    while (i < n) {
        char c = src[i];
        if (c == '#') {
            while (i < n && src[i] != '\n')
                m[i++] = ' ';
        } else if (c == '"' || c == '\'') {
            int triple = i + 2 < n && src[i + 1] == c && src[i + 2] == c;
            size_t q = triple ? 3 : 1;
            i += q;
            while (i < n) {
                if (src[i] == '\\' && i + 1 < n) {
                    m[i] = ' ';
                    if (src[i + 1] != '\n') m[i + 1] = ' ';
                    i += 2;
                } else if (src[i] == c &&
                           (!triple || (i + 2 < n && src[i + 1] == c && src[i + 2] == c))) {
                    i += q;
                    break;
                } else if (src[i] == '\n' && !triple) {
                    break; /* unterminated: stop at the line's end */
                } else {
                    if (src[i] != '\n') m[i] = ' ';
                    i++;
                }
            }
        } else {
            i++;
        }
    }
    return m;
}

enum { FMX__B_OTHER, FMX__B_IMPORT, FMX__B_DEF, FMX__B_CONST, FMX__B_DROP };

typedef struct {
    size_t start, end;
    int kind;
    char name[128];
    int keep;
} fmx__block;

static int fmx__ident_start(int c) {
    return isalpha(c) || c == '_';
}

static int fmx__ident_char(int c) {
    return isalnum(c) || c == '_';
}

/* Kind and name of a top-level statement starting at m (masked). */
static void fmx__classify(const char *m, fmx__block *b) {
    b->kind = FMX__B_OTHER;
    b->name[0] = '\0';
    size_t k = 0;
    while (fmx__ident_char((unsigned char)m[k]))
        k++;
    if ((k == 6 && strncmp(m, "import", 6) == 0) || (k == 4 && strncmp(m, "from", 4) == 0)) {
        b->kind = FMX__B_IMPORT;
        return;
    }
    /* A string statement (module docstring) or the __main__ block. */
    if (k <= 2 && (m[k] == '"' || m[k] == '\'')) {
        b->kind = FMX__B_DROP;
        return;
    }
    if (k == 2 && strncmp(m, "if", 2) == 0) {
        const char *p = m + 2;
        while (*p == ' ' || *p == '(')
            p++;
        if (strncmp(p, "__name__", 8) == 0) b->kind = FMX__B_DROP;
        return;
    }
    const char *p = m;
    if (k == 3 && strncmp(m, "def", 3) == 0) {
        p = m + 3;
        while (*p == ' ' || *p == '\t')
            p++;
        b->kind = FMX__B_DEF;
    } else if (k > 0 && fmx__ident_start((unsigned char)m[0])) {
        const char *q = m + k;
        while (*q == ' ' || *q == '\t')
            q++;
        if ((*q == '=' && q[1] != '=') || *q == ':') b->kind = FMX__B_CONST;
    }
    if (b->kind == FMX__B_OTHER) return;
    size_t len = 0;
    while (fmx__ident_char((unsigned char)p[len]) && len + 1 < sizeof b->name) {
        b->name[len] = p[len];
        len++;
    }
    b->name[len] = '\0';
    if (!len) b->kind = FMX__B_OTHER;
}

/* Splits masked source into top-level statements: a block starts at a line
 * that begins with a non-blank, non-comment character outside any bracket
 * or continued line, and runs to the next one. Returns the count, or -1 when
 * out of memory (*out is the caller's). */
static int fmx__blocks(const char *m, size_t n, fmx__block **out) {
    int cap = 32, nb = 0;
    fmx__block *b = malloc((size_t)cap * sizeof *b);
    if (!b) return -1;
    int depth = 0, cont = 0;
    for (size_t i = 0; i < n;) {
        /* i is at the start of a physical line */
        char c = m[i];
        if (depth == 0 && !cont && c != ' ' && c != '\t' && c != '\n' && c != '\r') {
            if (nb == cap) {
                cap *= 2;
                fmx__block *g = realloc(b, (size_t)cap * sizeof *g);
                if (!g) {
                    free(b);
                    return -1;
                }
                b = g;
            }
            if (nb) b[nb - 1].end = i;
            b[nb] = (fmx__block){.start = i, .end = n};
            fmx__classify(m + i, &b[nb]);
            nb++;
        }
        cont = 0;
        for (; i < n && m[i] != '\n'; i++) {
            if (m[i] == '(' || m[i] == '[' || m[i] == '{') depth++;
            if ((m[i] == ')' || m[i] == ']' || m[i] == '}') && depth > 0) depth--;
            if (m[i] == '\\' && i + 1 < n && m[i + 1] == '\n') cont = 1;
        }
        i++; /* the newline */
    }
    *out = b;
    return nb;
}

/* Marks the blocks named by identifiers inside block k, recursively. */
static void fmx__reach(const char *m, fmx__block *b, int nb, int k) {
    if (b[k].keep) return;
    b[k].keep = 1;
    for (size_t i = b[k].start; i < b[k].end;) {
        if (!fmx__ident_start((unsigned char)m[i]) ||
            (i > b[k].start && fmx__ident_char((unsigned char)m[i - 1]))) {
            i++;
            continue;
        }
        size_t j = i;
        while (j < b[k].end && fmx__ident_char((unsigned char)m[j]))
            j++;
        for (int t = 0; t < nb; t++)
            if (!b[t].keep && (b[t].kind == FMX__B_DEF || b[t].kind == FMX__B_CONST) &&
                strlen(b[t].name) == j - i && strncmp(b[t].name, m + i, j - i) == 0)
                fmx__reach(m, b, nb, t);
        i = j;
    }
}

char *fmx_oracle_trim(const char *src, const char *entry) {
    size_t n = strlen(src);
    char *m = fmx__mask(src, n);
    fmx__block *b = NULL;
    int nb = m ? fmx__blocks(m, n, &b) : -1;
    if (nb < 0) {
        free(m);
        return NULL;
    }
    int root = -1;
    for (int k = 0; k < nb && root < 0; k++)
        if (b[k].kind == FMX__B_DEF && strcmp(b[k].name, entry) == 0) root = k;
    if (root < 0) { /* no such function: leave the file whole, verify will say why */
        free(m);
        free(b);
        return strdup(src);
    }
    fmx__reach(m, b, nb, root);
    char *out = malloc(n + 1);
    size_t len = 0;
    for (int k = 0; out && k < nb; k++) {
        int keep = b[k].keep || b[k].kind == FMX__B_IMPORT || b[k].kind == FMX__B_OTHER;
        if (!keep) continue;
        memcpy(out + len, src + b[k].start, b[k].end - b[k].start);
        len += b[k].end - b[k].start;
    }
    if (out) out[len] = '\0';
    free(m);
    free(b);
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
