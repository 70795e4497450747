/*
 * tasks.c — scans a directory of packs and lists their tasks (tasks.h has
 * the rules: ids, params, the target_loc heuristic). Packs stay open for the
 * life of the server; their lazy tensor wrappers are all created here, on one
 * thread, so that later use is read-only.
 */
#define _GNU_SOURCE
#include "tasks.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "status.h"

/* One per pack: see tasks.h, "Threads". */

struct fmx_tasks {
    fmx_pack **packs;
    char **pack_names;
    int npacks;
    fmx_task *tasks;
    int ntasks, cap;
};

static int fmx__fail(char *err, size_t errsz, int status, const char *fmt, ...) {
    if (err && errsz) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errsz, fmt, ap);
        va_end(ap);
    }
    return status;
}

/* Is module j strictly below the module at path? ("" = the root: all but it) */
static int fmx__below(const char *path, const char *other) {
    size_t n = strlen(path);
    if (n == 0) return other[0] != '\0';
    return strncmp(other, path, n) == 0 && other[n] == '.';
}

static int fmx__is_buffer(const cJSON *buffers, const char *path, const char *rel) {
    char full[1024];
    snprintf(full, sizeof full, "%s%s%s", path, path[0] ? "." : "", rel);
    const cJSON *b;
    cJSON_ArrayForEach(b, buffers) if (cJSON_IsString(b) &&
                                       strcmp(b->valuestring, full) == 0) return 1;
    return 0;
}

/* Weight elements the module at path sees: stored tensors once, no buffers. */
static int64_t fmx__params(fmx_pack *pack, const char *path) {
    const char *const *keys;
    const fmx_tensor *const *vals;
    char err[256];
    int n = fmx_pack_weights(pack, path, &keys, &vals, err, sizeof err);
    const cJSON *buffers = cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(fmx_pack_manifest(pack), "weights"), "buffers");
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
        int dup = 0;
        for (int k = 0; k < i && !dup; k++)
            dup = vals[k] == vals[i];
        if (dup || fmx__is_buffer(buffers, path, keys[i])) continue;
        int64_t shape[FMX_MAX_DIMS];
        fmx_dtype dt;
        int nd = fmx_tensor_shape(vals[i], shape, &dt);
        int64_t numel = nd >= 0 ? 1 : 0;
        for (int d = 0; d < nd; d++)
            numel *= shape[d];
        total += numel;
    }
    return total;
}

static int64_t fmx__target_loc(fmx_pack *pack, int m) {
    const fmx_module *mod = fmx_pack_module(pack, m);
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(fmx_pack_manifest(pack), "target_loc");
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(map, mod->cls);
    if (cJSON_IsNumber(v) && v->valuedouble >= 1) return (int64_t)v->valuedouble;
    int kinds = 0;
    for (int j = 0; j < fmx_pack_nmodules(pack); j++) {
        const fmx_module *o = fmx_pack_module(pack, j);
        if (!fmx__below(mod->path, o->path) || o->first_call < 0) continue;
        int seen = 0;
        for (int k = 0; k < j && !seen; k++) {
            const fmx_module *p = fmx_pack_module(pack, k);
            seen =
                fmx__below(mod->path, p->path) && p->first_call >= 0 && strcmp(p->cls, o->cls) == 0;
        }
        kinds += !seen;
    }
    int64_t t = 12 + 3 * (int64_t)kinds;
    if (mod->path[0] == '\0' && t < 60) t = 60;
    return t;
}

/* Creates lazy wrappers now (tasks.h, "Threads"): every capture, every
 * module's weights in the pack's dtype. */
static int fmx__warm(fmx_pack *pack, char *err, size_t errsz) {
    const char *const *keys;
    const fmx_tensor *const *vals;
    for (int i = 0; i < fmx_pack_nmodules(pack); i++) {
        int rc = fmx_pack_weights(pack, fmx_pack_module(pack, i)->path, &keys, &vals, err, errsz);
        if (rc < 0) return rc;
    }
    for (int i = 0; i < fmx_pack_nprobes(pack); i++) {
        const fmx_probe *p = fmx_pack_probe(pack, i);
        if (p->mask_key && !fmx_pack_capture(pack, p->mask_key))
            return fmx__fail(err, errsz, FMX_EDEVICE, "cannot load mask '%s'", p->mask_key);
    }
    for (int c = 0; c < fmx_pack_ncalls(pack); c++) {
        const fmx_call *call = fmx_pack_call(pack, c);
        for (int k = 0; k < call->ninputs + call->noutputs; k++) {
            const fmx_io *io =
                k < call->ninputs ? &call->inputs[k] : &call->outputs[k - call->ninputs];
            if (io->kind == FMX_IO_TENSOR && !fmx_pack_capture(pack, io->key))
                return fmx__fail(err, errsz, FMX_EDEVICE, "cannot load capture '%s'", io->key);
        }
    }
    return FMX_OK;
}

static int fmx__add(fmx_tasks *t, fmx_pack *pack, const char *pack_name, int m, int decode) {
    if (t->ntasks == t->cap) {
        int cap = t->cap ? 2 * t->cap : 16;
        fmx_task *grown = realloc(t->tasks, (size_t)cap * sizeof *grown);
        if (!grown) return FMX_ENOMEM;
        t->tasks = grown;
        t->cap = cap;
    }
    const fmx_module *mod = fmx_pack_module(pack, m);
    char *id = NULL;
    if (decode   ? asprintf(&id, "%s/decode", pack_name) < 0
        : m == 0 ? asprintf(&id, "%s", pack_name) < 0
                 : asprintf(&id, "%s/%s", pack_name, mod->cls) < 0)
        return FMX_ENOMEM;
    t->tasks[t->ntasks++] = (fmx_task){.id = id,
                                       .kind = decode   ? "decode"
                                               : m == 0 ? "model"
                                                        : "component",
                                       .decode = decode,
                                       .pack = pack,
                                       .pack_name = pack_name,
                                       .module = m,
                                       .path = mod->path,
                                       .cls = mod->cls,
                                       .params = fmx__params(pack, mod->path),
                                       .target_loc = fmx__target_loc(pack, m)};
    return FMX_OK;
}

/* The pack's tasks; then their weight views in every probe dtype, built now
 * so that workers find them ready (the pack builds any other on first use). */
static int fmx__add_pack(fmx_tasks *t, fmx_pack *pack, const char *name, char *err, size_t errsz) {
    fmx_pack **gp = realloc(t->packs, (size_t)(t->npacks + 1) * sizeof *gp);
    if (gp) t->packs = gp;
    char **gn = realloc(t->pack_names, (size_t)(t->npacks + 1) * sizeof *gn);
    if (gn) t->pack_names = gn;
    char *dup = strdup(name);
    if (!gp || !gn || !dup) {
        free(dup);
        snprintf(err, errsz, "out of memory");
        return FMX_ENOMEM;
    }
    int first_task = t->ntasks;
    int rc = fmx__add(t, pack, dup, 0, 0);
    if (!rc && fmx_pack_has_generation(pack)) rc = fmx__add(t, pack, dup, 0, 1);
    for (int i = 1; !rc && i < fmx_pack_nmodules(pack); i++) {
        const fmx_module *mod = fmx_pack_module(pack, i);
        if (mod->first_call < 0 || strcmp(mod->cls, fmx_pack_module(pack, 0)->cls) == 0) continue;
        int seen = 0;
        for (int k = 1; k < i && !seen; k++)
            seen = fmx_pack_module(pack, k)->first_call >= 0 &&
                   strcmp(fmx_pack_module(pack, k)->cls, mod->cls) == 0;
        if (!seen) rc = fmx__add(t, pack, dup, i, 0);
    }
    for (int i = first_task; !rc && i < t->ntasks; i++) {
        for (int p = 0; p < fmx_pack_nprobes(pack); p++) {
            const char *const *keys;
            const fmx_tensor *const *vals;
            int dt = (int)fmx_pack_probe(pack, p)->dtype;
            int n = fmx_pack_weights_as(pack, t->tasks[i].path, dt, &keys, &vals, err, errsz);
            if (n < 0) rc = n;
        }
    }
    if (rc) { /* undo: the caller closes the pack */
        for (int i = first_task; i < t->ntasks; i++)
            free((char *)t->tasks[i].id);
        t->ntasks = first_task;
        free(dup);
        return rc;
    }
    t->packs[t->npacks] = pack;
    t->pack_names[t->npacks] = dup;
    t->npacks++;
    return FMX_OK;
}

int fmx_tasks_open(const char *dir, fmx_tasks **out, FILE *warn, char *err, size_t errsz) {
    *out = NULL;
    struct dirent **names = NULL;
    int n = scandir(dir, &names, NULL, alphasort);
    if (n < 0) return fmx__fail(err, errsz, FMX_EIO, "--tasks %s: %s", dir, strerror(errno));
    fmx_tasks *t = calloc(1, sizeof *t);
    int rc = t ? FMX_OK : FMX_ENOMEM;
    int candidates = 0;
    for (int i = 0; i < n; i++) {
        const char *name = names[i]->d_name;
        char path[4096], manifest[4200];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, name);
        snprintf(manifest, sizeof manifest, "%s/task.json", path);
        if (rc || name[0] == '.' || stat(manifest, &st) != 0) continue;
        candidates++;
        char perr[2048];
        fmx_pack *pack = NULL;
        int prc = fmx_pack_open(path, &pack, perr, sizeof perr);
        if (prc == FMX_OK) prc = fmx__warm(pack, perr, sizeof perr);
        if (prc != FMX_OK) {
            if (warn) fprintf(warn, "fmx serve: skipping pack %s: %s\n", path, perr);
            fmx_pack_close(pack);
            continue;
        }
        prc = fmx__add_pack(t, pack, name, perr, sizeof perr);
        if (prc == FMX_ENOMEM) rc = prc;
        if (prc != FMX_OK) {
            if (warn && prc != FMX_ENOMEM)
                fprintf(warn, "fmx serve: skipping pack %s: %s\n", path, perr);
            fmx_pack_close(pack);
        }
    }
    for (int i = 0; i < n; i++)
        free(names[i]);
    free(names);
    if (rc) {
        fmx_tasks_close(t);
        return fmx__fail(err, errsz, rc, "out of memory loading tasks");
    }
    if (t->npacks == 0) {
        fmx_tasks_close(t);
        if (candidates == 0)
            return fmx__fail(
                err, errsz, FMX_ENOTFOUND,
                "--tasks %s: no packs found (a pack is a subdirectory with task.json; "
                "make one with: fmx export examples/models/qwen2.py:build -o %s/qwen2)",
                dir, dir);
        return fmx__fail(
            err, errsz, FMX_EFORMAT,
            "--tasks %s: none of the %d packs could be opened (see the warnings above)", dir,
            candidates);
    }
    *out = t;
    return FMX_OK;
}

void fmx_tasks_close(fmx_tasks *t) {
    if (!t) return;
    for (int i = 0; i < t->ntasks; i++)
        free((char *)t->tasks[i].id);
    for (int i = 0; i < t->npacks; i++) {
        fmx_pack_close(t->packs[i]);
        free(t->pack_names[i]);
    }
    free(t->tasks);
    free(t->packs);
    free(t->pack_names);
    free(t);
}

int fmx_tasks_count(const fmx_tasks *t) {
    return t ? t->ntasks : 0;
}

const fmx_task *fmx_tasks_get(const fmx_tasks *t, int i) {
    return t && i >= 0 && i < t->ntasks ? &t->tasks[i] : NULL;
}

const fmx_task *fmx_tasks_find(const fmx_tasks *t, const char *id) {
    for (int i = 0; t && id && i < t->ntasks; i++)
        if (strcmp(t->tasks[i].id, id) == 0) return &t->tasks[i];
    return NULL;
}

int fmx_tasks_npacks(const fmx_tasks *t) {
    return t ? t->npacks : 0;
}

cJSON *fmx_task_json(const fmx_task *task) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", task->id);
    cJSON_AddStringToObject(o, "kind", task->kind);
    cJSON_AddStringToObject(o, "pack", task->pack_name);
    cJSON_AddStringToObject(o, "module", task->path);
    cJSON_AddStringToObject(o, "class", task->cls);
    cJSON_AddNumberToObject(o, "params", (double)task->params);
    cJSON_AddNumberToObject(o, "target_loc", (double)task->target_loc);
    return o;
}

cJSON *fmx_tasks_json(const fmx_tasks *t) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i < fmx_tasks_count(t); i++)
        cJSON_AddItemToArray(a, fmx_task_json(&t->tasks[i]));
    return a;
}
