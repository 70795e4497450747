/*
 * tasks.h — the task list of a server: every pack under a directory, opened
 * once, and the tasks each one offers.
 *
 * A pack is a subdirectory holding task.json. Its tasks:
 *   - the whole model: id = pack name (the directory name), kind "model",
 *     module path "" (the root);
 *   - one per distinct module class below the root, at the first instance (in
 *     the manifest's pre-order module list) that was called on probe 0:
 *     id = "pack/Class", kind "component";
 *   - a pack that captured generation (a causal LM with a cache): the decode
 *     task, id = "pack/decode", kind "decode", module path "" (the whole
 *     model with its KV cache, graded per generation step; target_loc the
 *     whole model's).
 * Per task: params = elements of the stored weights the module sees
 * (fmx_pack_weights under its path; buffers and duplicate tied tensors not
 * counted) and target_loc = the manifest's optional "target_loc" map
 * {class: n} when it names the class, else a heuristic:
 *     component: 12 + 3 · (distinct module classes strictly below the instance)
 *     whole model: max(60, the same formula)
 * (logical lines, fmx_reward_count_loc; a target is where the LOC score
 * starts to fall, so it errs on the generous side).
 *
 * Opening also builds each task module's weight views in every probe dtype,
 * so workers find them ready (a pack's lazy state is thread-safe: pack.h).
 *
 * Bad packs are skipped with a warning on stderr; a directory with no usable
 * pack is an error. Not here: what a task's episode does (env/episode.c).
 */
#ifndef FMX_TASKS_H
#define FMX_TASKS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "pack.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fmx_tasks fmx_tasks;

/* One task. Everything borrowed, valid until fmx_tasks_close. */
typedef struct {
    const char *id;   /* "qwen2" or "qwen2/Qwen2MLP" */
    const char *kind; /* "model", "component" or "decode" */
    int decode;       /* 1 for the decode task (fmx_verify_config.decode) */
    fmx_pack *pack;
    const char *pack_name; /* the directory name */
    int module;            /* index into the pack's modules */
    const char *path;      /* module path; "" for the whole model */
    const char *cls;
    int64_t params;
    int64_t target_loc;
} fmx_task;

/* Scans dir for packs and opens them. Warnings for skipped packs go to warn
 * (may be NULL) one line each. On failure err says why. Caller closes with
 * fmx_tasks_close. */
int fmx_tasks_open(const char *dir, fmx_tasks **out, FILE *warn, char *err, size_t errsz);
void fmx_tasks_close(fmx_tasks *t); /* accepts NULL */

int fmx_tasks_count(const fmx_tasks *t);
const fmx_task *fmx_tasks_get(const fmx_tasks *t, int i);           /* NULL if out of range */
const fmx_task *fmx_tasks_find(const fmx_tasks *t, const char *id); /* NULL if none */
int fmx_tasks_npacks(const fmx_tasks *t);

/* The task list as in the protocol's list_tasks: an array of {id, kind,
 * pack, module, class, params, target_loc}. Caller frees with cJSON_Delete. */
cJSON *fmx_tasks_json(const fmx_tasks *t);
/* One task as JSON (same fields). Caller frees with cJSON_Delete. */
cJSON *fmx_task_json(const fmx_task *task);

#ifdef __cplusplus
}
#endif

#endif
