/*
 * export.c — `fmx episodes export`: the log's episodes as JSONL chat
 * transcripts (export.h has the line's schema). Reads with its own
 * read-only connection; transcripts come from fmx_transcript_load
 * (episodes/replay.h), goals from fmx_episode_goal when packs are given.
 */
#define _GNU_SOURCE
#include "export.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "env/episode.h"
#include "env/status.h"
#include "env/tasks.h"
#include "env/tools.h"
#include "episodes/log.h"
#include "episodes/replay.h"

fmx_export_filter fmx_export_filter_default(void) {
    return (fmx_export_filter){.min_reward = NAN};
}

int fmx_export_filter_parse(char *spec, fmx_export_filter *f, char *err, size_t errsz) {
    char *save = NULL;
    for (char *kv = strtok_r(spec, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(kv, '=');
        if (!eq || eq == kv || !eq[1]) {
            snprintf(err, errsz, "filter '%s' is not KEY=VALUE", kv);
            return FMX_EINVAL;
        }
        *eq = '\0';
        const char *v = eq + 1;
        if (strcmp(kv, "policy") == 0) {
            f->policy = v;
        } else if (strcmp(kv, "task") == 0) {
            f->task = v;
        } else if (strcmp(kv, "status") == 0) {
            f->status = v;
        } else if (strcmp(kv, "min_reward") == 0) {
            char *end;
            errno = 0;
            double x = strtod(v, &end);
            if (errno || end == v || *end || !isfinite(x)) {
                snprintf(err, errsz, "min_reward must be a number, not '%s'", v);
                return FMX_EINVAL;
            }
            f->min_reward = x;
        } else {
            snprintf(err, errsz, "unknown filter key '%s' (policy, task, status, min_reward)", kv);
            return FMX_EINVAL;
        }
    }
    return FMX_OK;
}

static const char fmx__ids_sql[] =
    "SELECT e.id FROM episodes e JOIN policies p ON p.id = e.policy_id "
    "WHERE (?1 IS NULL OR p.name = ?1) AND (?2 IS NULL OR e.task_id = ?2) "
    "  AND (?3 IS NULL OR e.status = ?3) AND (?4 IS NULL OR e.reward >= ?4) "
    "ORDER BY e.id";

/* The goal without the pack: its first paragraph, from the task row. Caller frees. */
static char *fmx__goal_from_log(const fmx_transcript *t) {
    char *s = NULL;
    const char *what = t->module && t->module[0] ? t->module : "the whole model";
    if (asprintf(&s,
                 "Task %s: rewrite %s (class %s, pack %s) as flat functional PyTorch: one Python "
                 "file whose function `forward` computes what the module's forward computes, "
                 "using only torch ops and the module's weights, with no nn.Module classes.\n\n"
                 "Target: %lld logical lines.\n\nTools:\n%s\n",
                 t->task, what, t->cls ? t->cls : "?", t->pack ? t->pack : "?",
                 (long long)t->target_loc, fmx_tools_summary()) < 0)
        return NULL;
    return s;
}

/* The goal exactly as the server wrote it at reset. Caller frees; NULL if
 * the task is not among the packs. */
static char *fmx__goal_from_pack(const fmx_transcript *t, fmx_tasks *tasks, int max_steps) {
    const fmx_task *task = fmx_tasks_find(tasks, t->task);
    if (!task) return NULL;
    fmx_reward_config reward = fmx_reward_config_default();
    if (t->breakdown) fmx_replay_reward_of(t->breakdown, &reward);
    fmx_budget budget = fmx_budget_default();
    if (max_steps > 0) budget.max_steps = max_steps;
    if (t->nsteps > 0 && t->steps[t->nsteps - 1].truncated) budget.max_steps = t->nsteps;
    fmx_episode *ep = fmx_episode_create(t->id, task, t->policy, t->seed, "", 0, budget, &reward);
    cJSON *goal = ep ? fmx_episode_goal(ep) : NULL;
    const char *text = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(goal, "text"));
    char *s = text ? strdup(text) : NULL;
    cJSON_Delete(goal);
    fmx_episode_destroy(ep);
    return s;
}

static cJSON *fmx__message(cJSON *messages, const char *role, const char *content) {
    cJSON *m = cJSON_CreateObject();
    cJSON_AddItemToArray(messages, m);
    cJSON_AddStringToObject(m, "role", role);
    if (content)
        cJSON_AddStringToObject(m, "content", content);
    else
        cJSON_AddNullToObject(m, "content");
    return m;
}

/* 1 if step s goes to the export: a call of a tool that exists, unless keep_invalid. */
static int fmx__exported(const fmx_step_record *s, const fmx_export_options *opt) {
    return opt->keep_invalid || (s->tool && fmx_tools_exists(s->tool));
}

/* One episode's line (without the newline). Caller frees; NULL when out of memory. */
static char *fmx__line(const fmx_transcript *t, const char *goal, const char *goal_source,
                       const cJSON *tools, const fmx_export_options *opt) {
    cJSON *o = cJSON_CreateObject();
    cJSON *messages = cJSON_AddArrayToObject(o, "messages");
    fmx__message(messages, "system", goal);
    char request[512];
    const char *what = t->module && t->module[0] ? t->module : "the whole model";
    snprintf(request, sizeof request,
             "Task %s: write the flat functional version of %s (%s). Read the module with the "
             "tools, check your code with verify_component, then submit it.",
             t->task, what, t->cls ? t->cls : "?");
    fmx__message(messages, "user", request);
    for (int i = 0; i < t->nsteps; i++) {
        const fmx_step_record *s = &t->steps[i];
        if (!fmx__exported(s, opt)) continue;
        char id[64];
        snprintf(id, sizeof id, "call_%lld_%lld", (long long)t->id, (long long)s->idx);
        cJSON *a = fmx__message(messages, "assistant", NULL);
        cJSON *calls = cJSON_AddArrayToObject(a, "tool_calls");
        cJSON *c = cJSON_CreateObject();
        cJSON_AddItemToArray(calls, c);
        cJSON_AddStringToObject(c, "id", id);
        cJSON_AddStringToObject(c, "type", "function");
        cJSON *fn = cJSON_AddObjectToObject(c, "function");
        cJSON_AddStringToObject(fn, "name", s->tool ? s->tool : "");
        cJSON *args = opt->arguments_object ? cJSON_Parse(s->args ? s->args : "{}") : NULL;
        if (args)
            cJSON_AddItemToObject(fn, "arguments", args);
        else
            cJSON_AddStringToObject(fn, "arguments", s->args ? s->args : "{}");
        cJSON *obs = cJSON_Parse(s->observation ? s->observation : "");
        const char *text = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(obs, "text"));
        cJSON *m = cJSON_CreateObject();
        cJSON_AddItemToArray(messages, m);
        cJSON_AddStringToObject(m, "role", "tool");
        cJSON_AddStringToObject(m, "tool_call_id", id);
        cJSON_AddStringToObject(m, "name", s->tool ? s->tool : "");
        cJSON_AddStringToObject(m, "content", text ? text : (s->observation ? s->observation : ""));
        cJSON_Delete(obs);
    }
    cJSON_AddItemToObject(o, "tools", cJSON_Duplicate(tools, 1));
    cJSON_AddNumberToObject(o, "episode", (double)t->id);
    cJSON_AddStringToObject(o, "task", t->task ? t->task : "");
    cJSON_AddStringToObject(o, "policy", t->policy ? t->policy : "");
    cJSON_AddStringToObject(o, "status", t->status ? t->status : "");
    cJSON_AddNumberToObject(o, "steps", t->nsteps);
    if (t->has_reward)
        cJSON_AddNumberToObject(o, "reward", t->reward);
    else
        cJSON_AddNullToObject(o, "reward");
    if (t->reward_version)
        cJSON_AddStringToObject(o, "reward_version", t->reward_version);
    else
        cJSON_AddNullToObject(o, "reward_version");
    cJSON *b = t->breakdown ? cJSON_Parse(t->breakdown) : NULL;
    cJSON_AddItemToObject(o, "breakdown", b ? b : cJSON_CreateNull());
    cJSON_AddStringToObject(o, "goal_source", goal_source);
    char *line = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return line;
}

int fmx_export_jsonl(const char *db_path, const fmx_export_filter *f, const fmx_export_options *opt,
                     FILE *out, fmx_export_counts *counts, char *err, size_t errsz) {
    const char *tasks_dir = opt->tasks_dir;
    memset(counts, 0, sizeof *counts);
    fmx_tasks *tasks = NULL;
    if (tasks_dir && fmx_tasks_open(tasks_dir, &tasks, stderr, err, errsz) != FMX_OK)
        return FMX_EIO;
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    cJSON *tools = fmx_tools_spec();
    int status = fmx_replay_open_db(db_path, 1, &db, err, errsz);
    if (status == FMX_OK && sqlite3_prepare_v2(db, fmx__ids_sql, -1, &st, NULL) != SQLITE_OK) {
        const char *why = sqlite3_errmsg(db);
        snprintf(err, errsz, "%s: %s%s", db_path, why,
                 strstr(why, "no such") ? " (not an fmx episode log)" : "");
        status = FMX_EFORMAT;
    }
    if (status == FMX_OK) {
        if (f->policy) sqlite3_bind_text(st, 1, f->policy, -1, SQLITE_STATIC);
        if (f->task) sqlite3_bind_text(st, 2, f->task, -1, SQLITE_STATIC);
        if (f->status) sqlite3_bind_text(st, 3, f->status, -1, SQLITE_STATIC);
        if (!isnan(f->min_reward)) sqlite3_bind_double(st, 4, f->min_reward);
    }
    /* Episode ids first, then each transcript (on the same connection, one
     * read transaction each: a server may be writing). */
    int64_t *ids = NULL;
    size_t nids = 0, cap = 0;
    int rc = SQLITE_DONE;
    while (status == FMX_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (nids == cap) {
            cap = cap ? 2 * cap : 256;
            int64_t *g = realloc(ids, cap * sizeof *g);
            if (!g) {
                snprintf(err, errsz, "out of memory");
                status = FMX_ENOMEM;
                break;
            }
            ids = g;
        }
        ids[nids++] = sqlite3_column_int64(st, 0);
    }
    if (status == FMX_OK && rc != SQLITE_DONE) {
        snprintf(err, errsz, "%s: %s", db_path, sqlite3_errmsg(db));
        status = FMX_EIO;
    }
    sqlite3_finalize(st);
    int warned = 0;
    for (size_t i = 0; status == FMX_OK && i < nids; i++) {
        fmx_transcript *t = NULL;
        status = fmx_transcript_load(db, ids[i], &t, err, errsz);
        if (status) break;
        int kept = 0;
        for (int k = 0; k < t->nsteps; k++)
            kept += fmx__exported(&t->steps[k], opt);
        counts->dropped_calls += t->nsteps - kept;
        if (kept == 0 && !opt->keep_invalid) { /* nothing to learn from */
            counts->dropped_episodes++;
            fmx_transcript_free(t);
            continue;
        }
        char *goal = tasks ? fmx__goal_from_pack(t, tasks, opt->max_steps) : NULL;
        const char *source = "pack";
        if (!goal) {
            if (tasks && !warned++)
                fprintf(stderr,
                        "fmx episodes export: task '%s' is not among the packs in %s: its goal "
                        "comes from the log (goal_source \"log\")\n",
                        t->task, tasks_dir);
            goal = fmx__goal_from_log(t);
            source = "log";
        }
        char *line = goal ? fmx__line(t, goal, source, tools, opt) : NULL;
        if (!line) {
            snprintf(err, errsz, "out of memory");
            status = FMX_ENOMEM;
        } else if (fputs(line, out) < 0 || fputc('\n', out) < 0) {
            snprintf(err, errsz, "write failed: %s", strerror(errno));
            status = FMX_EIO;
        } else {
            counts->lines++;
        }
        free(line);
        free(goal);
        fmx_transcript_free(t);
    }
    free(ids);
    cJSON_Delete(tools);
    sqlite3_close(db);
    fmx_tasks_close(tasks);
    return status;
}

static const char fmx__usage[] =
    "usage: fmx episodes export --db FILE [--format jsonl] [--filter KEY=VALUE,...] [-o FILE]\n"
    "                           [--tasks DIR] [--max-steps N]\n"
    "  one JSON line per episode in OpenAI chat format: system (the goal), user, then per\n"
    "  step an assistant message with one tool call and the tool's observation text;\n"
    "  reward, breakdown, task, policy, reward_version, episode, status (README: Research tools)\n"
    "  --db FILE          the episode log (SQLite)\n"
    "  --format jsonl     the only format\n"
    "  --filter K=V,...   policy=NAME, task=ID, status=S (submitted, truncated, aborted, ...),\n"
    "                     min_reward=X; repeatable, all must hold\n"
    "  -o FILE            write there (default: stdout)\n"
    "  --tasks DIR        the packs the server served: the system message is the exact\n"
    "                     reset goal (one of --tasks and --goal-from-log is required)\n"
    "  --goal-from-log    no packs: the system message is the goal's first paragraph, its\n"
    "                     LOC target and the tool list, from the log (goal_source \"log\")\n"
    "  --max-steps N      the server's --max-steps, for the goal's budget line (default 40)\n"
    "  --arguments string|object  tool call arguments as a JSON string (OpenAI, the\n"
    "                     default) or as an object (TRL / transformers chat templates)\n"
    "  --keep-invalid     keep calls to tools that do not exist and episodes with no step\n"
    "                     (left out by default)\n"
    "\n"
    "usage: fmx episodes merge -o FILE LOG...\n"
    "  appends every episode of each LOG (several servers' --db files; each is only read)\n"
    "  to FILE, created if new: episodes and submissions get new ids, tasks and policies\n"
    "  are matched by name, steps, submissions and regrades come along; then leaderboard,\n"
    "  replay, regrade and export read FILE as one log\n";

/* fmx episodes merge -o OUT LOG... */
static int fmx__merge_main(int argc, char **argv) {
    const char *out = NULL;
    int nin = 0;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            fputs(fmx__usage, stdout);
            return 0;
        }
        if ((strcmp(argv[i], "-o") == 0 || strcmp(argv[i], "--output") == 0) && i + 1 < argc)
            out = argv[++i];
        else if (argv[i][0] == '-') {
            fprintf(stderr, "fmx episodes merge: bad argument '%s'\n\n%s", argv[i], fmx__usage);
            return 2;
        } else
            nin++;
    }
    if (!out || !nin) {
        fprintf(stderr, "fmx episodes merge: -o FILE and at least one LOG are required\n");
        return 2;
    }
    char err[1024];
    fmx_log *log = NULL;
    if (fmx_log_open(out, &log, err, sizeof err) != FMX_OK) {
        fprintf(stderr, "fmx episodes merge: %s\n", err);
        return 2;
    }
    int status = 0;
    for (int i = 2; i < argc && !status; i++) {
        if (strcmp(argv[i], "-o") == 0 || strcmp(argv[i], "--output") == 0) {
            i++;
            continue;
        }
        int64_t n = 0;
        if (fmx_log_merge(log, argv[i], &n) != FMX_OK) {
            fprintf(stderr, "fmx episodes merge: %s\n", fmx_log_errmsg(log));
            status = 2;
        } else {
            printf("%s: %lld episodes\n", argv[i], (long long)n);
        }
    }
    fmx_log_close(log);
    if (!status) printf("merged into %s\n", out);
    return status;
}

int fmx_episodes_main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        fputs(fmx__usage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "merge") == 0) return fmx__merge_main(argc, argv);
    if (strcmp(argv[1], "export") != 0) {
        fprintf(stderr, "fmx episodes: unknown subcommand '%s'\n\n%s", argv[1], fmx__usage);
        return 2;
    }
    const char *db = NULL, *out_path = NULL;
    fmx_export_options opt = {0};
    int goal_from_log = 0;
    fmx_export_filter f = fmx_export_filter_default();
    char err[1024];
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            fputs(fmx__usage, stdout);
            return 0;
        } else if (strcmp(a, "--db") == 0 && has) {
            db = argv[++i];
        } else if ((strcmp(a, "-o") == 0 || strcmp(a, "--output") == 0) && has) {
            out_path = argv[++i];
        } else if (strcmp(a, "--tasks") == 0 && has) {
            opt.tasks_dir = argv[++i];
        } else if (strcmp(a, "--goal-from-log") == 0) {
            goal_from_log = 1;
        } else if (strcmp(a, "--keep-invalid") == 0) {
            opt.keep_invalid = 1;
        } else if (strcmp(a, "--arguments") == 0 && has) {
            const char *v = argv[++i];
            if (strcmp(v, "object") != 0 && strcmp(v, "string") != 0) {
                fprintf(stderr,
                        "fmx episodes export: --arguments takes string or object, not "
                        "'%s'\n",
                        v);
                return 2;
            }
            opt.arguments_object = strcmp(v, "object") == 0;
        } else if (strcmp(a, "--format") == 0 && has) {
            if (strcmp(argv[++i], "jsonl") != 0) {
                fprintf(stderr, "fmx episodes export: --format takes jsonl, not '%s'\n", argv[i]);
                return 2;
            }
        } else if (strcmp(a, "--max-steps") == 0 && has) {
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end || v <= 0 || v > 1000000) {
                fprintf(stderr, "fmx episodes export: --max-steps takes a positive integer\n");
                return 2;
            }
            opt.max_steps = (int)v;
        } else if (strcmp(a, "--filter") == 0 && has) {
            if (fmx_export_filter_parse(argv[++i], &f, err, sizeof err) != FMX_OK) {
                fprintf(stderr, "fmx episodes export: --filter: %s\n", err);
                return 2;
            }
        } else {
            fprintf(stderr, "fmx episodes export: bad argument '%s'\n\n%s", a, fmx__usage);
            return 2;
        }
    }
    if (!db) {
        fprintf(stderr, "fmx episodes export: --db FILE is required\n\n%s", fmx__usage);
        return 2;
    }
    if (!opt.tasks_dir && !goal_from_log) {
        fprintf(stderr,
                "fmx episodes export: the goal (each line's system message) is not in the log; "
                "give --tasks DIR (the server's --tasks) to rebuild it as the server sent it, or "
                "--goal-from-log to write a shorter one from the log (its first paragraph, LOC "
                "target and tool list; goal_source \"log\")\n");
        return 2;
    }
    if (opt.tasks_dir && goal_from_log) {
        fprintf(stderr, "fmx episodes export: give --tasks DIR or --goal-from-log, not both\n");
        return 2;
    }
    FILE *out = stdout;
    if (out_path && !(out = fopen(out_path, "w"))) {
        fprintf(stderr, "fmx episodes export: %s: %s\n", out_path, strerror(errno));
        return 2;
    }
    fmx_export_counts n;
    int rc = fmx_export_jsonl(db, &f, &opt, out, &n, err, sizeof err);
    if (out != stdout && fclose(out) != 0 && rc == FMX_OK) {
        snprintf(err, sizeof err, "%s: %s", out_path, strerror(errno));
        rc = FMX_EIO;
    }
    if (rc != FMX_OK) {
        fprintf(stderr, "fmx episodes export: %s\n", err);
        return 2;
    }
    if (out_path)
        fprintf(stderr, "fmx episodes export: %lld episodes to %s\n", (long long)n.lines, out_path);
    if (n.dropped_calls || n.dropped_episodes)
        fprintf(stderr,
                "fmx episodes export: left out %lld calls to tools that do not exist and %lld "
                "episodes with no step left (--keep-invalid keeps them)\n",
                (long long)n.dropped_calls, (long long)n.dropped_episodes);
    return 0;
}
