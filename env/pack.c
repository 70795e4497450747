/*
 * pack.c — task pack loader: task.json through cJSON, weights and captures
 * through mmap'd safetensors. Validation happens once, at open: a pack that
 * opens is one every later lookup can trust.
 *
 * The mappings are private and writable (copy-on-write), so nothing a
 * candidate does to a tensor can reach the files; the engine refuses
 * mutating ops anyway.
 */
#define _GNU_SOURCE
#include "pack.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "status.h"

/* Largest safetensors header we accept (the format's own reference limit). */
#define FMX__ST_MAX_HEADER (100u << 20)

typedef struct {
    const char *name; /* borrowed from the header JSON */
    fmx_dtype dt;
    int ndim;
    int64_t shape[FMX_MAX_DIMS];
    void *data;
    size_t nbytes;
    fmx_tensor *wrapped; /* lazily created, owned */
} fmx__st_entry;

typedef struct {
    void *map;
    size_t size;
    cJSON *header;
    fmx__st_entry *entries; /* sorted by name */
    int n;
} fmx__st_file;

typedef struct {
    char *path;
    int dt; /* -1: as stored */
    int n;
    const char **keys;
    const fmx_tensor **vals;
    fmx_tensor **owned; /* casts made for this view, destroyed with the pack */
} fmx__weight_view;

struct fmx_pack {
    pthread_mutex_t lock; /* guards the lazy state: tensor wrappers and weight views */
    char *dir;
    cJSON *manifest;
    const char *name, *dtype;
    fmx_dtype dtype_id;
    fmx__st_file weights, probes;
    fmx_module *modules;
    int nmodules;
    fmx_probe *probe_list;
    int nprobes;
    int has_generation; /* some probe is a generation step */
    fmx_call *calls;
    int ncalls;
    fmx_io *ios; /* all inputs and outputs of all calls */
    int nios;
    fmx_tolerance tol[FMX_DT_COUNT];       /* for the build and device that made the pack */
    fmx_tolerance tol_cross[FMX_DT_COUNT]; /* for any other build or device */
    const char *made_torch, *made_device;  /* created_by */
    const char **alias_names, **alias_targets;
    int naliases;
    fmx__weight_view *views;
    int nviews;
    char *weights_path, *hidden_weights_path;
    struct fmx__name_view {
        char *path;
        int n;
        const char **rel, **file_key;
    } *names;
    int nnames;
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

/* ---- safetensors ---- */

static int fmx__entry_cmp(const void *a, const void *b) {
    return strcmp(((const fmx__st_entry *)a)->name, ((const fmx__st_entry *)b)->name);
}

static void fmx__st_close(fmx__st_file *f) {
    for (int i = 0; i < f->n; i++)
        fmx_tensor_destroy(f->entries[i].wrapped);
    free(f->entries);
    cJSON_Delete(f->header);
    if (f->map && f->map != MAP_FAILED) munmap(f->map, f->size);
    memset(f, 0, sizeof *f);
}

static int fmx__st_open(const char *path, fmx__st_file *f, char *err, size_t errsz) {
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fmx__fail(err, errsz, FMX_EIO, "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        return fmx__fail(err, errsz, FMX_EIO, "%s: %s", path, strerror(errno));
    }
    if (st.st_size < 8) {
        close(fd);
        return fmx__fail(err, errsz, FMX_EFORMAT, "%s: too short for safetensors (%lld bytes)",
                         path, (long long)st.st_size);
    }
    f->size = (size_t)st.st_size;
    f->map = mmap(NULL, f->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    close(fd);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        return fmx__fail(err, errsz, FMX_EIO, "%s: mmap: %s", path, strerror(errno));
    }
    const unsigned char *b = f->map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | b[i];
    if (hlen > FMX__ST_MAX_HEADER || hlen > f->size - 8) {
        fmx__st_close(f);
        return fmx__fail(err, errsz, FMX_EFORMAT, "%s: header length %llu exceeds the file", path,
                         (unsigned long long)hlen);
    }
    f->header = cJSON_ParseWithLength((const char *)b + 8, (size_t)hlen);
    if (!cJSON_IsObject(f->header)) {
        fmx__st_close(f);
        return fmx__fail(err, errsz, FMX_EFORMAT, "%s: header is not a JSON object", path);
    }
    const unsigned char *data = b + 8 + hlen;
    size_t data_size = f->size - 8 - (size_t)hlen;
    int n = cJSON_GetArraySize(f->header);
    f->entries = calloc((size_t)(n ? n : 1), sizeof *f->entries);
    if (!f->entries) {
        fmx__st_close(f);
        return fmx__fail(err, errsz, FMX_ENOMEM, "%s: out of memory", path);
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, f->header) {
        if (strcmp(it->string, "__metadata__") == 0) continue;
        fmx__st_entry *e = &f->entries[f->n];
        e->name = it->string;
        const cJSON *dt = cJSON_GetObjectItemCaseSensitive(it, "dtype");
        const cJSON *shape = cJSON_GetObjectItemCaseSensitive(it, "shape");
        const cJSON *off = cJSON_GetObjectItemCaseSensitive(it, "data_offsets");
        int d = cJSON_IsString(dt) ? fmx_dtype_parse(dt->valuestring) : -1;
        if (d < 0 || !cJSON_IsArray(shape) || !cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 ||
            cJSON_GetArraySize(shape) > FMX_MAX_DIMS) {
            int rc = fmx__fail(err, errsz, FMX_EFORMAT,
                               "%s: tensor '%s': bad dtype, shape or data_offsets", path, e->name);
            fmx__st_close(f);
            return rc;
        }
        e->dt = (fmx_dtype)d;
        e->ndim = cJSON_GetArraySize(shape);
        double numel = 1;
        for (int k = 0; k < e->ndim; k++) {
            const cJSON *s = cJSON_GetArrayItem(shape, k);
            if (!cJSON_IsNumber(s) || s->valuedouble < 0 || s->valuedouble > 9.0e15) {
                int rc =
                    fmx__fail(err, errsz, FMX_EFORMAT, "%s: tensor '%s': bad shape", path, e->name);
                fmx__st_close(f);
                return rc;
            }
            e->shape[k] = (int64_t)s->valuedouble;
            numel *= s->valuedouble;
        }
        double lo = cJSON_GetArrayItem(off, 0)->valuedouble;
        double hi = cJSON_GetArrayItem(off, 1)->valuedouble;
        double want = numel * (double)fmx_dtype_size(e->dt);
        if (lo < 0 || hi < lo || hi > (double)data_size || hi - lo != want) {
            int rc = fmx__fail(err, errsz, FMX_EFORMAT,
                               "%s: tensor '%s': data_offsets [%.0f, %.0f] do not fit its shape "
                               "(%.0f bytes) inside the file (%zu data bytes)",
                               path, e->name, lo, hi, want, data_size);
            fmx__st_close(f);
            return rc;
        }
        e->data = (void *)(data + (size_t)lo);
        e->nbytes = (size_t)(hi - lo);
        f->n++;
    }
    qsort(f->entries, (size_t)f->n, sizeof *f->entries, fmx__entry_cmp);
    for (int i = 1; i < f->n; i++)
        if (strcmp(f->entries[i - 1].name, f->entries[i].name) == 0) {
            int rc = fmx__fail(err, errsz, FMX_EFORMAT, "%s: duplicate tensor '%s'", path,
                               f->entries[i].name);
            fmx__st_close(f);
            return rc;
        }
    return FMX_OK;
}

static fmx__st_entry *fmx__st_find(fmx__st_file *f, const char *name) {
    fmx__st_entry key = {.name = name};
    return bsearch(&key, f->entries, (size_t)f->n, sizeof *f->entries, fmx__entry_cmp);
}

static const fmx_tensor *fmx__st_tensor(fmx__st_entry *e) {
    if (!e) return NULL;
    if (!e->wrapped) {
        char err[256];
        if (fmx_tensor_wrap(e->data, e->dt, e->shape, e->ndim, &e->wrapped, err, sizeof err) != 0)
            return NULL;
    }
    return e->wrapped;
}

/* "float32 [2, 3]" */
static void fmx__shape_text(const fmx__st_entry *e, char *buf, size_t n) {
    size_t at = (size_t)snprintf(buf, n, "%s [", fmx_dtype_name(e->dt));
    for (int d = 0; d < e->ndim && at < n; d++)
        at += (size_t)snprintf(buf + at, n - at, "%s%lld", d ? ", " : "", (long long)e->shape[d]);
    if (at < n) snprintf(buf + at, n - at, "]");
}

/* ---- manifest ---- */

static const char *fmx__str(const cJSON *obj, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static int fmx__int(const cJSON *obj, const char *key, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsNumber(v)) return 0;
    *out = v->valueint;
    return 1;
}

static int fmx__parse_io(fmx_pack *p, const cJSON *j, fmx_io *io, int is_output, const char *where,
                         char *err, size_t errsz) {
    io->name = fmx__str(j, "name");
    const char *kind = fmx__str(j, "kind");
    if (!io->name || !kind)
        return fmx__fail(err, errsz, FMX_EFORMAT, "task.json: %s: needs 'name' and 'kind'", where);
    if (strcmp(kind, "tensor") == 0) {
        io->kind = FMX_IO_TENSOR;
        io->key = fmx__str(j, "key");
        if (!io->key || !fmx__st_find(&p->probes, io->key))
            return fmx__fail(err, errsz, FMX_EFORMAT,
                             "task.json: %s '%s': tensor key '%s' is not in probes.safetensors",
                             where, io->name, io->key ? io->key : "(missing)");
        io->token_aligned = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "token_aligned"));
        io->mask = is_output ? fmx__str(j, "mask") : NULL;
        if (io->mask) {
            const fmx__st_entry *t = fmx__st_find(&p->probes, io->key);
            const fmx__st_entry *mk = fmx__st_find(&p->probes, io->mask);
            int lead = mk && mk->ndim >= 2 && mk->ndim <= t->ndim;
            for (int d = 0; lead && d < mk->ndim; d++)
                lead = mk->shape[d] == t->shape[d];
            if (!lead)
                return fmx__fail(err, errsz, FMX_EFORMAT,
                                 "task.json: %s '%s': mask '%s' missing or not the output's "
                                 "leading dims",
                                 where, io->name, io->mask);
        }
    } else if (strcmp(kind, "value") == 0) {
        io->kind = FMX_IO_VALUE;
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, "value");
        if (cJSON_IsBool(v)) {
            io->vtype = FMX_VAL_BOOL;
            io->i = cJSON_IsTrue(v);
        } else if (cJSON_IsNumber(v)) {
            double d = v->valuedouble;
            const cJSON *isf = cJSON_GetObjectItemCaseSensitive(j, "float");
            if (cJSON_IsTrue(isf) || d != (double)(int64_t)d) {
                io->vtype = FMX_VAL_FLOAT;
                io->f = d;
            } else {
                io->vtype = FMX_VAL_INT;
                io->i = (int64_t)d;
                io->f = d;
            }
        } else if (cJSON_IsString(v)) {
            io->vtype = FMX_VAL_STR;
            io->s = v->valuestring;
        } else {
            return fmx__fail(err, errsz, FMX_EFORMAT,
                             "task.json: %s '%s': value must be a number, bool or string", where,
                             io->name);
        }
    } else if (strcmp(kind, "none") == 0) {
        io->kind = FMX_IO_NONE;
    } else if (strcmp(kind, "cache") == 0) {
        io->kind = FMX_IO_CACHE;
    } else if (strcmp(kind, "other") == 0) {
        io->kind = FMX_IO_OTHER;
        io->s = fmx__str(j, "repr");
    } else {
        return fmx__fail(err, errsz, FMX_EFORMAT, "task.json: %s '%s': unknown kind '%s'", where,
                         io->name, kind);
    }
    (void)is_output;
    return FMX_OK;
}

static int fmx__load_modules(fmx_pack *p, char *err, size_t errsz) {
    const cJSON *mods = cJSON_GetObjectItemCaseSensitive(p->manifest, "modules");
    if (!cJSON_IsArray(mods) || cJSON_GetArraySize(mods) < 1)
        return fmx__fail(err, errsz, FMX_EFORMAT, "task.json: 'modules' must be a non-empty list");
    p->nmodules = cJSON_GetArraySize(mods);
    p->modules = calloc((size_t)p->nmodules, sizeof *p->modules);
    if (!p->modules) return fmx__fail(err, errsz, FMX_ENOMEM, "out of memory");
    int i = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, mods) {
        fmx_module *mod = &p->modules[i];
        mod->path = fmx__str(m, "path");
        mod->cls = fmx__str(m, "class");
        mod->first_call = -1;
        if (!mod->path || !mod->cls)
            return fmx__fail(err, errsz, FMX_EFORMAT,
                             "task.json: modules[%d] needs 'path' and 'class'", i);
        mod->parent = -1;
        const char *parent = fmx__str(m, "parent");
        if (parent) {
            for (int k = 0; k < i; k++)
                if (strcmp(p->modules[k].path, parent) == 0) mod->parent = k;
            if (mod->parent < 0)
                return fmx__fail(err, errsz, FMX_EFORMAT,
                                 "task.json: module '%s': parent '%s' is not listed before it",
                                 mod->path, parent);
        }
        i++;
    }
    if (p->modules[0].path[0] != '\0')
        return fmx__fail(err, errsz, FMX_EFORMAT,
                         "task.json: modules[0] must be the root (path \"\")");
    return FMX_OK;
}

static int fmx__load_probes(fmx_pack *p, char *err, size_t errsz) {
    const cJSON *probes = cJSON_GetObjectItemCaseSensitive(p->manifest, "probes");
    if (!cJSON_IsArray(probes) || cJSON_GetArraySize(probes) < 1)
        return fmx__fail(err, errsz, FMX_EFORMAT, "task.json: 'probes' must be a non-empty list");
    p->nprobes = cJSON_GetArraySize(probes);
    p->probe_list = calloc((size_t)p->nprobes, sizeof *p->probe_list);
    if (!p->probe_list) return fmx__fail(err, errsz, FMX_ENOMEM, "out of memory");
    int i = 0;
    const cJSON *j;
    cJSON_ArrayForEach(j, probes) {
        fmx_probe *pr = &p->probe_list[i];
        pr->name = fmx__str(j, "name");
        pr->visible = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "visible"));
        pr->padding = fmx__str(j, "padding");
        pr->mask_key = fmx__str(j, "mask");
        if (!pr->name || !fmx__int(j, "batch", &pr->batch) || !fmx__int(j, "seq", &pr->seq))
            return fmx__fail(err, errsz, FMX_EFORMAT,
                             "task.json: probes[%d] needs 'name', 'batch' and 'seq'", i);
        if (!pr->padding) pr->padding = "none";
        pr->generation = fmx__str(j, "generation");
        pr->step = -1;
        if (pr->generation && (!fmx__int(j, "step", &pr->step) || pr->step < 0))
            return fmx__fail(err, errsz, FMX_EFORMAT,
                             "task.json: probe %s of generation %s needs a 'step' >= 0", pr->name,
                             pr->generation);
        p->has_generation |= pr->generation != NULL;
        const char *dtype = fmx__str(j, "dtype");
        pr->dtype = p->dtype_id;
        if (dtype) {
            int d = -1;
            for (int k = 0; k < FMX_DT_COUNT; k++)
                if (strcmp(dtype, fmx_dtype_name((fmx_dtype)k)) == 0) d = k;
            if (d < 0)
                return fmx__fail(err, errsz, FMX_EFORMAT, "task.json: probe %s: unknown dtype '%s'",
                                 pr->name, dtype);
            pr->dtype = (fmx_dtype)d;
        }
        if (pr->mask_key) {
            fmx__st_entry *e = fmx__st_find(&p->probes, pr->mask_key);
            if (!e || e->ndim != 2 || e->shape[0] != pr->batch || e->shape[1] != pr->seq)
                return fmx__fail(err, errsz, FMX_EFORMAT,
                                 "task.json: probe %s: mask '%s' missing or not (%d, %d)", pr->name,
                                 pr->mask_key, pr->batch, pr->seq);
        }
        i++;
    }
    return FMX_OK;
}

static int fmx__load_calls(fmx_pack *p, char *err, size_t errsz) {
    const cJSON *calls = cJSON_GetObjectItemCaseSensitive(p->manifest, "calls");
    if (!cJSON_IsArray(calls))
        return fmx__fail(err, errsz, FMX_EFORMAT, "task.json: 'calls' must be a list");
    p->ncalls = cJSON_GetArraySize(calls);
    int nios = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, calls) {
        nios += cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(c, "inputs"));
        nios += cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(c, "outputs"));
    }
    p->calls = calloc((size_t)(p->ncalls ? p->ncalls : 1), sizeof *p->calls);
    p->ios = calloc((size_t)(nios ? nios : 1), sizeof *p->ios);
    if (!p->calls || !p->ios) return fmx__fail(err, errsz, FMX_ENOMEM, "out of memory");
    int i = 0;
    cJSON_ArrayForEach(c, calls) {
        fmx_call *call = &p->calls[i];
        const char *module = fmx__str(c, "module");
        if (!fmx__int(c, "probe", &call->probe) || !module || !fmx__int(c, "index", &call->index) ||
            call->probe < 0 || call->probe >= p->nprobes)
            return fmx__fail(err, errsz, FMX_EFORMAT,
                             "task.json: calls[%d] needs 'probe' (< %d), 'module' and 'index'", i,
                             p->nprobes);
        call->module = fmx_pack_find_module(p, module);
        if (call->module < 0)
            return fmx__fail(err, errsz, FMX_EFORMAT,
                             "task.json: calls[%d]: module '%s' is not in 'modules'", i, module);
        call->raised = cJSON_GetObjectItemCaseSensitive(c, "raised") != NULL;
        if (call->probe == 0 && p->modules[call->module].first_call < 0 && !call->raised)
            p->modules[call->module].first_call = i;
        const char *lists[2] = {"inputs", "outputs"};
        for (int w = 0; w < 2; w++) {
            const cJSON *arr = cJSON_GetObjectItemCaseSensitive(c, lists[w]);
            if (!cJSON_IsArray(arr))
                return fmx__fail(err, errsz, FMX_EFORMAT, "task.json: calls[%d] needs '%s'", i,
                                 lists[w]);
            fmx_io *base = &p->ios[p->nios];
            int k = 0;
            const cJSON *io;
            cJSON_ArrayForEach(io, arr) {
                char where[64];
                snprintf(where, sizeof where, "calls[%d].%s[%d]", i, lists[w], k);
                int rc = fmx__parse_io(p, io, &p->ios[p->nios], w, where, err, errsz);
                if (rc) return rc;
                p->nios++;
                k++;
            }
            if (w == 0) {
                call->inputs = base;
                call->ninputs = k;
            } else {
                call->outputs = base;
                call->noutputs = k;
            }
        }
        i++;
    }
    return FMX_OK;
}

/* Overrides entries of tol from a manifest table {"float32": {atol, rtol}}. */
static void fmx__read_tolerance(const cJSON *table, fmx_tolerance *tol) {
    const cJSON *it;
    cJSON_ArrayForEach(it, table) {
        int d = -1;
        for (int k = 0; k < FMX_DT_COUNT; k++)
            if (strcmp(it->string, fmx_dtype_name((fmx_dtype)k)) == 0) d = k;
        const cJSON *a = cJSON_GetObjectItemCaseSensitive(it, "atol");
        const cJSON *r = cJSON_GetObjectItemCaseSensitive(it, "rtol");
        if (d >= 0 && cJSON_IsNumber(a) && cJSON_IsNumber(r) && a->valuedouble >= 0 &&
            r->valuedouble >= 0)
            tol[d] = (fmx_tolerance){a->valuedouble, r->valuedouble};
    }
}

static void fmx__load_tolerance(fmx_pack *p) {
    /* Defaults (README, "What fmx verify checks"); the pack's own tables
     * override them. Integers are exact. */
    for (int d = 0; d < FMX_DT_COUNT; d++)
        p->tol[d] = (fmx_tolerance){0, 0};
    p->tol[FMX_DT_F64] = (fmx_tolerance){1e-9, 1e-9};
    p->tol[FMX_DT_F32] = (fmx_tolerance){1e-5, 1e-5};
    p->tol[FMX_DT_F16] = (fmx_tolerance){1e-3, 1e-3};
    p->tol[FMX_DT_BF16] = (fmx_tolerance){0.0078125, 0.0078125};
    fmx__read_tolerance(cJSON_GetObjectItemCaseSensitive(p->manifest, "tolerance"), p->tol);
    memcpy(p->tol_cross, p->tol, sizeof p->tol);
    p->tol_cross[FMX_DT_F16] = (fmx_tolerance){1e-2, 1e-2};
    p->tol_cross[FMX_DT_BF16] = (fmx_tolerance){0.125, 0.125};
    fmx__read_tolerance(cJSON_GetObjectItemCaseSensitive(p->manifest, "tolerance_cross_build"),
                        p->tol_cross);
    const cJSON *by = cJSON_GetObjectItemCaseSensitive(p->manifest, "created_by");
    p->made_torch = fmx__str(by, "torch");
    p->made_device = fmx__str(by, "device");
}

/* Length of the leading "X.Y.Z" of a version string. */
static size_t fmx__version_len(const char *v) {
    size_t n = 0;
    int dots = 0;
    while (v[n] && ((v[n] >= '0' && v[n] <= '9') || (v[n] == '.' && dots++ < 2)))
        n++;
    return n;
}

int fmx_pack_same_build(const fmx_pack *p) {
    if (!p->made_torch || !p->made_device) return 0;
    /* "libtorch 1.13.0 cpu" against created_by {"torch": "1.13.0a0", "device": "cpu"} */
    const char *ev = fmx_engine_version();
    if (strncmp(ev, "libtorch ", 9) == 0) ev += 9;
    size_t n = fmx__version_len(ev);
    if (n == 0 || n != fmx__version_len(p->made_torch) || strncmp(ev, p->made_torch, n) != 0)
        return 0;
    /* device types: "cuda:0" and "cuda" are the same kind of device */
    const char *dev = fmx_engine_device();
    size_t a = strcspn(dev, ":"), b = strcspn(p->made_device, ":");
    return a == b && strncmp(dev, p->made_device, a) == 0;
}

static int fmx__load_aliases(fmx_pack *p, char *err, size_t errsz) {
    const cJSON *w = cJSON_GetObjectItemCaseSensitive(p->manifest, "weights");
    const cJSON *al = cJSON_GetObjectItemCaseSensitive(w, "aliases");
    int n = cJSON_GetArraySize(al);
    p->alias_names = calloc((size_t)(n ? n : 1), sizeof *p->alias_names);
    p->alias_targets = calloc((size_t)(n ? n : 1), sizeof *p->alias_targets);
    if (!p->alias_names || !p->alias_targets)
        return fmx__fail(err, errsz, FMX_ENOMEM, "out of memory");
    const cJSON *it;
    cJSON_ArrayForEach(it, al) {
        if (!cJSON_IsString(it) || !fmx__st_find(&p->weights, it->valuestring))
            return fmx__fail(err, errsz, FMX_EFORMAT,
                             "task.json: alias '%s' points at a tensor not in weights.safetensors",
                             it->string);
        p->alias_names[p->naliases] = it->string;
        p->alias_targets[p->naliases] = it->valuestring;
        p->naliases++;
    }
    return FMX_OK;
}

/* The hidden weight set task.json names ("hidden_weights": a file in the pack
 * directory): a valid safetensors file with exactly the public set's tensor
 * names, dtypes and shapes. Only its path is kept; whoever runs the hidden
 * probes maps it. No field: the public set stands in (fmx_pack_weights_path). */
static int fmx__load_hidden_weights(fmx_pack *p, char *err, size_t errsz) {
    const cJSON *field = cJSON_GetObjectItemCaseSensitive(p->manifest, "hidden_weights");
    if (!field || cJSON_IsNull(field)) return FMX_OK;
    const char *name = cJSON_GetStringValue(field);
    if (!name || !name[0] || strchr(name, '/') || strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
        return fmx__fail(err, errsz, FMX_EFORMAT,
                         "task.json: hidden_weights must name a file in the pack directory, "
                         "e.g. \"weights_hidden.safetensors\"");
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", p->dir, name);
    fmx__st_file h;
    int rc = fmx__st_open(path, &h, err, errsz);
    if (rc) return rc;
    const fmx__st_file *w = &p->weights;
    for (int i = 0, k = 0; i < w->n || k < h.n;) {
        /* Both lists are sorted by name: walk them together. */
        int c = i == w->n ? 1 : k == h.n ? -1 : strcmp(w->entries[i].name, h.entries[k].name);
        if (c != 0) {
            rc = fmx__fail(err, errsz, FMX_EFORMAT,
                           "%s: tensor '%s' is %s weights.safetensors: the hidden set must have "
                           "the same names as the public one",
                           path, c < 0 ? w->entries[i].name : h.entries[k].name,
                           c < 0 ? "missing here but in" : "here but not in");
            break;
        }
        const fmx__st_entry *a = &w->entries[i++], *b = &h.entries[k++];
        int same = a->dt == b->dt && a->ndim == b->ndim;
        for (int d = 0; same && d < a->ndim; d++)
            same = a->shape[d] == b->shape[d];
        if (!same) {
            char want[128], got[128];
            fmx__shape_text(a, want, sizeof want);
            fmx__shape_text(b, got, sizeof got);
            rc = fmx__fail(
                err, errsz, FMX_EFORMAT,
                "%s: tensor '%s' is %s here but %s in weights.safetensors: the hidden set "
                "must have the public one's dtypes and shapes",
                path, a->name, got, want);
            break;
        }
    }
    fmx__st_close(&h);
    if (rc) return rc;
    p->hidden_weights_path = realpath(path, NULL);
    if (!p->hidden_weights_path)
        return fmx__fail(err, errsz, FMX_ENOMEM, "%s: %s", path, strerror(errno));
    return FMX_OK;
}

int fmx_pack_open(const char *dir, fmx_pack **out, char *err, size_t errsz) {
    *out = NULL;
    fmx_pack *p = calloc(1, sizeof *p);
    if (!p) return fmx__fail(err, errsz, FMX_ENOMEM, "out of memory");
    pthread_mutex_init(&p->lock, NULL);
    p->dir = strdup(dir);
    char path[4096];
    int rc;

    snprintf(path, sizeof path, "%s/task.json", dir);
    FILE *f = fopen(path, "rb");
    if (!f) {
        rc = fmx__fail(err, errsz, FMX_EIO, "%s: %s (is '%s' a pack made by fmx export?)", path,
                       strerror(errno), dir);
        goto fail;
    }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc((size_t)len + 1);
    size_t got = text ? fread(text, 1, (size_t)len, f) : 0;
    fclose(f);
    if (!text || got != (size_t)len) {
        free(text);
        rc = fmx__fail(err, errsz, FMX_EIO, "%s: read failed", path);
        goto fail;
    }
    text[len] = '\0';
    p->manifest = cJSON_ParseWithLength(text, (size_t)len);
    free(text);
    if (!cJSON_IsObject(p->manifest)) {
        rc = fmx__fail(err, errsz, FMX_EFORMAT, "%s: not valid JSON", path);
        goto fail;
    }
    const char *format = fmx__str(p->manifest, "format");
    int version = 0;
    if (!format || strcmp(format, "fmx-pack") != 0 || !fmx__int(p->manifest, "version", &version)) {
        rc = fmx__fail(err, errsz, FMX_EFORMAT, "%s: not an fmx pack (format/version missing)",
                       path);
        goto fail;
    }
    if (version != FMX_PACK_VERSION) {
        rc = fmx__fail(err, errsz, FMX_EVERSION,
                       "%s: pack format version %d; this fmx reads version %d (re-export it)", path,
                       version, FMX_PACK_VERSION);
        goto fail;
    }
    p->name = fmx__str(p->manifest, "name");
    if (!p->name) p->name = dir;
    p->dtype = fmx__str(p->manifest, "dtype");
    if (!p->dtype) p->dtype = "float32";
    p->dtype_id = FMX_DT_COUNT;
    for (int k = 0; k < FMX_DT_COUNT; k++)
        if (strcmp(p->dtype, fmx_dtype_name((fmx_dtype)k)) == 0) p->dtype_id = (fmx_dtype)k;
    if (p->dtype_id == FMX_DT_COUNT) {
        rc = fmx__fail(err, errsz, FMX_EFORMAT, "%s: unknown dtype '%s'", path, p->dtype);
        goto fail;
    }

    snprintf(path, sizeof path, "%s/weights.safetensors", dir);
    if ((rc = fmx__st_open(path, &p->weights, err, errsz))) goto fail;
    p->weights_path = realpath(path, NULL);
    if (!p->weights_path) {
        rc = fmx__fail(err, errsz, FMX_ENOMEM, "%s: %s", path, strerror(errno));
        goto fail;
    }
    snprintf(path, sizeof path, "%s/probes.safetensors", dir);
    if ((rc = fmx__st_open(path, &p->probes, err, errsz))) goto fail;
    if ((rc = fmx__load_modules(p, err, errsz))) goto fail;
    if ((rc = fmx__load_probes(p, err, errsz))) goto fail;
    if ((rc = fmx__load_calls(p, err, errsz))) goto fail;
    if ((rc = fmx__load_aliases(p, err, errsz))) goto fail;
    if ((rc = fmx__load_hidden_weights(p, err, errsz))) goto fail;
    fmx__load_tolerance(p);
    *out = p;
    return FMX_OK;
fail:
    fmx_pack_close(p);
    return rc;
}

static void fmx__view_free(fmx__weight_view *v) {
    for (int i = 0; v->owned && i < v->n; i++)
        fmx_tensor_destroy(v->owned[i]);
    free(v->owned);
    free(v->path);
    free(v->keys);
    free(v->vals);
}

void fmx_pack_close(fmx_pack *p) {
    if (!p) return;
    for (int i = 0; i < p->nviews; i++)
        fmx__view_free(&p->views[i]);
    free(p->views);
    for (int i = 0; i < p->nnames; i++) {
        free(p->names[i].path);
        free(p->names[i].rel);
        free(p->names[i].file_key);
    }
    free(p->names);
    free(p->weights_path);
    free(p->hidden_weights_path);
    fmx__st_close(&p->weights);
    fmx__st_close(&p->probes);
    free(p->modules);
    free(p->probe_list);
    free(p->calls);
    free(p->ios);
    free(p->alias_names);
    free(p->alias_targets);
    cJSON_Delete(p->manifest);
    free(p->dir);
    pthread_mutex_destroy(&p->lock);
    free(p);
}

const char *fmx_pack_dir(const fmx_pack *p) {
    return p->dir;
}
const char *fmx_pack_name(const fmx_pack *p) {
    return p->name;
}
const char *fmx_pack_dtype(const fmx_pack *p) {
    return p->dtype;
}
const cJSON *fmx_pack_manifest(const fmx_pack *p) {
    return p->manifest;
}
int fmx_pack_nmodules(const fmx_pack *p) {
    return p->nmodules;
}
const fmx_module *fmx_pack_module(const fmx_pack *p, int i) {
    return (i >= 0 && i < p->nmodules) ? &p->modules[i] : NULL;
}
int fmx_pack_nprobes(const fmx_pack *p) {
    return p->nprobes;
}
const fmx_probe *fmx_pack_probe(const fmx_pack *p, int i) {
    return (i >= 0 && i < p->nprobes) ? &p->probe_list[i] : NULL;
}
const char *fmx_pack_probe_describe(const fmx_pack *p, int i, char *buf, size_t n) {
    const fmx_probe *pr = fmx_pack_probe(p, i);
    if (!buf || n == 0) return buf;
    buf[0] = '\0';
    if (!pr) return buf;
    const cJSON *entry = cJSON_GetArrayItem(cJSON_GetObjectItem(p->manifest, "probes"), i);
    const cJSON *inputs = cJSON_GetObjectItem(entry, "inputs"), *in;
    /* token inputs: some tensor is (batch, seq) */
    int tokens = !cJSON_IsArray(inputs) || cJSON_GetArraySize(inputs) == 0;
    cJSON_ArrayForEach(in, inputs) {
        const cJSON *shape = cJSON_GetObjectItem(in, "shape");
        tokens |= cJSON_GetArraySize(shape) == 2 &&
                  cJSON_GetArrayItem(shape, 0)->valueint == pr->batch &&
                  cJSON_GetArrayItem(shape, 1)->valueint == pr->seq;
    }
    size_t used = 0;
#define FMX__PUT(...)                                                                              \
    do {                                                                                           \
        if (used < n) used += (size_t)snprintf(buf + used, n - used, __VA_ARGS__);                 \
    } while (0)
    if (tokens) {
        FMX__PUT("batch %d \u00d7 seq %d, padding %s", pr->batch, pr->seq, pr->padding);
    } else {
        int k = 0;
        cJSON_ArrayForEach(in, inputs) {
            FMX__PUT("%s%s (", k++ ? ", " : "",
                     cJSON_GetStringValue(cJSON_GetObjectItem(in, "name")));
            const cJSON *d;
            int j = 0;
            cJSON_ArrayForEach(d, cJSON_GetObjectItem(in, "shape"))
                FMX__PUT("%s%d", j++ ? ", " : "", d->valueint);
            FMX__PUT("%s) %s", j == 1 ? "," : "",
                     cJSON_GetStringValue(cJSON_GetObjectItem(in, "dtype")));
        }
    }
    const char *of = cJSON_GetStringValue(cJSON_GetObjectItem(entry, "inputs_of"));
    if (strcmp(fmx_dtype_name(pr->dtype), fmx_pack_dtype(p)) != 0)
        FMX__PUT(", %s%s%s%s", fmx_dtype_name(pr->dtype), of ? " (copy of " : "", of ? of : "",
                 of ? ")" : "");
    if (pr->step == 0) FMX__PUT(", generation %s: prefill", pr->generation);
    if (pr->step > 0) FMX__PUT(", generation %s: decode step %d", pr->generation, pr->step);
#undef FMX__PUT
    if (used >= n && n > 4) memcpy(buf + n - 4, "...", 4);
    return buf;
}

int fmx_pack_ncalls(const fmx_pack *p) {
    return p->ncalls;
}
const fmx_call *fmx_pack_call(const fmx_pack *p, int i) {
    return (i >= 0 && i < p->ncalls) ? &p->calls[i] : NULL;
}

int fmx_pack_find_module(const fmx_pack *p, const char *path) {
    for (int i = 0; i < p->nmodules; i++)
        if (strcmp(p->modules[i].path, path) == 0) return i;
    return -1;
}

int fmx_pack_has_generation(const fmx_pack *p) {
    return p->has_generation;
}

int fmx_pack_find_call(const fmx_pack *p, int probe, int module, int k) {
    for (int i = 0; i < p->ncalls; i++)
        if (p->calls[i].probe == probe && p->calls[i].module == module && p->calls[i].index == k)
            return i;
    return -1;
}

fmx_tolerance fmx_pack_tolerance(const fmx_pack *p, fmx_dtype dt) {
    return fmx_pack_same_build(p) ? p->tol[dt] : p->tol_cross[dt];
}

const fmx_tensor *fmx_pack_capture(fmx_pack *p, const char *key) {
    fmx__st_entry *e = fmx__st_find(&p->probes, key);
    if (!e) return NULL;
    pthread_mutex_lock(&p->lock);
    const fmx_tensor *t = fmx__st_tensor(e);
    pthread_mutex_unlock(&p->lock);
    return t;
}

/* Name relative to prefix ("" = root: every name), or NULL if not under it. */
static const char *fmx__under(const char *name, const char *prefix) {
    size_t n = strlen(prefix);
    if (n == 0) return name;
    if (strncmp(name, prefix, n) == 0 && name[n] == '.') return name + n + 1;
    return NULL;
}

static int fmx__is_float(fmx_dtype dt) {
    return dt == FMX_DT_F64 || dt == FMX_DT_F32 || dt == FMX_DT_F16 || dt == FMX_DT_BF16;
}

/* Adds the stored tensor e to view v under rel, cast to v->dt if floating. */
static int fmx__view_add(fmx__weight_view *v, const char *rel, fmx__st_entry *e) {
    const fmx_tensor *t = fmx__st_tensor(e);
    if (!t) return FMX_EDEVICE;
    if (v->dt >= 0 && (fmx_dtype)v->dt != e->dt && fmx__is_float(e->dt)) {
        char err[256];
        fmx_tensor *cast = NULL;
        if (fmx_tensor_cast(t, (fmx_dtype)v->dt, &cast, err, sizeof err) != 0) return FMX_EDEVICE;
        v->owned[v->n] = cast;
        t = cast;
    }
    v->keys[v->n] = rel;
    v->vals[v->n++] = t;
    return FMX_OK;
}

static int fmx__weights_as(fmx_pack *p, const char *path, int dt, const char *const **keys,
                           const fmx_tensor *const **vals, char *err, size_t errsz) {
    if (dt == (int)p->dtype_id || dt >= FMX_DT_COUNT) dt = -1;
    for (int i = 0; i < p->nviews; i++)
        if (p->views[i].dt == dt && strcmp(p->views[i].path, path) == 0) {
            *keys = p->views[i].keys;
            *vals = p->views[i].vals;
            return p->views[i].n;
        }
    size_t cap = (size_t)(p->weights.n + p->naliases) + 1;
    fmx__weight_view v = {strdup(path),
                          dt,
                          0,
                          calloc(cap, sizeof(char *)),
                          calloc(cap, sizeof(fmx_tensor *)),
                          calloc(cap, sizeof(fmx_tensor *))};
    fmx__weight_view *grown = realloc(p->views, (size_t)(p->nviews + 1) * sizeof *p->views);
    if (grown) p->views = grown;
    if (!v.path || !v.keys || !v.vals || !v.owned || !grown) {
        fmx__view_free(&v);
        return fmx__fail(err, errsz, FMX_ENOMEM, "out of memory");
    }
    for (int i = 0; i < p->weights.n; i++) {
        const char *rel = fmx__under(p->weights.entries[i].name, path);
        if (rel && fmx__view_add(&v, rel, &p->weights.entries[i]) != 0) goto wrap_failed;
    }
    for (int i = 0; i < p->naliases; i++) {
        const char *rel = fmx__under(p->alias_names[i], path);
        if (rel && fmx__view_add(&v, rel, fmx__st_find(&p->weights, p->alias_targets[i])) != 0)
            goto wrap_failed;
    }
    p->views[p->nviews++] = v;
    *keys = v.keys;
    *vals = v.vals;
    return v.n;
wrap_failed:
    fmx__view_free(&v);
    return fmx__fail(err, errsz, FMX_EDEVICE, "could not place the weights of '%s' on %s", path,
                     fmx_engine_device());
}

int fmx_pack_weights_as(fmx_pack *p, const char *path, int dt, const char *const **keys,
                        const fmx_tensor *const **vals, char *err, size_t errsz) {
    /* Views are built once and never freed before the pack: the arrays
     * returned stay valid after the lock is released. */
    pthread_mutex_lock(&p->lock);
    int n = fmx__weights_as(p, path, dt, keys, vals, err, errsz);
    pthread_mutex_unlock(&p->lock);
    return n;
}

int fmx_pack_weights(fmx_pack *p, const char *path, const char *const **keys,
                     const fmx_tensor *const **vals, char *err, size_t errsz) {
    return fmx_pack_weights_as(p, path, -1, keys, vals, err, errsz);
}

int fmx_pack_weight_names(fmx_pack *p, const char *path, const char *const **rel,
                          const char *const **file_key, char *err, size_t errsz) {
    pthread_mutex_lock(&p->lock);
    int rc = FMX_OK;
    for (int i = 0; i < p->nnames; i++)
        if (strcmp(p->names[i].path, path) == 0) {
            *rel = p->names[i].rel;
            *file_key = p->names[i].file_key;
            rc = p->names[i].n;
            goto done;
        }
    size_t cap = (size_t)(p->weights.n + p->naliases) + 1;
    struct fmx__name_view v = {strdup(path), 0, calloc(cap, sizeof(char *)),
                               calloc(cap, sizeof(char *))};
    struct fmx__name_view *grown = realloc(p->names, (size_t)(p->nnames + 1) * sizeof *p->names);
    if (grown) p->names = grown;
    if (!v.path || !v.rel || !v.file_key || !grown) {
        free(v.path);
        free(v.rel);
        free(v.file_key);
        rc = fmx__fail(err, errsz, FMX_ENOMEM, "out of memory");
        goto done;
    }
    for (int i = 0; i < p->weights.n; i++) {
        const char *r = fmx__under(p->weights.entries[i].name, path);
        if (!r) continue;
        v.rel[v.n] = r;
        v.file_key[v.n++] = p->weights.entries[i].name;
    }
    for (int i = 0; i < p->naliases; i++) {
        const char *r = fmx__under(p->alias_names[i], path);
        if (!r) continue;
        v.rel[v.n] = r;
        v.file_key[v.n++] = p->alias_targets[i];
    }
    p->names[p->nnames++] = v;
    *rel = v.rel;
    *file_key = v.file_key;
    rc = v.n;
done:
    pthread_mutex_unlock(&p->lock);
    return rc;
}

const char *fmx_pack_weights_path(const fmx_pack *p, int hidden) {
    return hidden && p->hidden_weights_path ? p->hidden_weights_path : p->weights_path;
}

static int fmx__edit_distance(const char *a, const char *b) {
    size_t n = strlen(a), m = strlen(b);
    if (n > 255 || m > 255) return 1 << 20;
    int row[256];
    for (size_t j = 0; j <= m; j++)
        row[j] = (int)j;
    for (size_t i = 1; i <= n; i++) {
        int prev = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= m; j++) {
            int cur = row[j];
            int sub = prev + (a[i - 1] != b[j - 1]);
            int del = row[j] + 1, ins = row[j - 1] + 1;
            row[j] = sub < del ? (sub < ins ? sub : ins) : (del < ins ? del : ins);
            prev = cur;
        }
    }
    return row[m];
}

int fmx_pack_nearest_modules(const fmx_pack *p, const char *path, int *out, int n) {
    int found = 0;
    int dist[16];
    if (n > 16) n = 16;
    for (int i = 0; i < p->nmodules; i++) {
        int d = fmx__edit_distance(path, p->modules[i].path);
        int k = found < n ? found++ : n;
        if (k == n && d >= dist[n - 1]) continue;
        if (k == n) k = n - 1;
        while (k > 0 && dist[k - 1] > d) {
            dist[k] = dist[k - 1];
            out[k] = out[k - 1];
            k--;
        }
        dist[k] = d;
        out[k] = i;
    }
    return found;
}
