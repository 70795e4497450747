/*
 * leaderboard.h — how policies score, read from the episode log: for every
 * (policy, task) pair and for every policy over all tasks, the number of
 * finished episodes, the pass rate (correctness = 1), the mean reward and
 * its spread, mean LOC, mean steps and mean compile score; the table
 * `fmx leaderboard` and `fmx run` print; and the same as an HTML page with
 * charts (`fmx leaderboard --html FILE`).
 *
 * Finished episodes are those that were graded or ran out of steps
 * (status "submitted" or "truncated"); a truncated episode with nothing to
 * grade counts with reward 0 and correctness 0. Aborted, closed and open
 * episodes are only counted (they have no reward). LOC and compile score are
 * averaged over the graded submissions.
 *
 * The log is opened with its own read-only connection, so the table can be
 * read while a server writes. Not here: the schema (episodes/log.c), the
 * reward formula (rewards/).
 */
#ifndef FMX_LEADERBOARD_H
#define FMX_LEADERBOARD_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fmx_leaderboard fmx_leaderboard;

/* One row: a policy on one task, or (task NULL) on all tasks together. */
typedef struct {
    const char *policy;
    const char *task;    /* NULL: every task of the policy */
    int64_t episodes;    /* finished: submitted or truncated */
    int64_t unfinished;  /* aborted, closed or still open */
    int64_t passed;      /* finished with correctness = 1 */
    int64_t graded;      /* finished with a graded submission */
    double pass_rate;    /* passed / episodes (0 when none) */
    double reward_mean;  /* over finished episodes */
    double reward_sd;    /* sample standard deviation (0 for one episode) */
    double loc_mean;     /* over graded submissions; NAN when none */
    double steps_mean;   /* over finished episodes */
    double compile_mean; /* compile score over graded submissions; NAN when none */
} fmx_leaderboard_row;

/* Reads the log at db_path (read-only). policy: only that policy's episodes,
 * or NULL for all. Rows come per policy (best mean reward over all tasks
 * first), the policy's total row first, then its tasks in id order.
 * Returns FMX_OK, FMX_EIO (cannot open or read; err says why), FMX_EFORMAT
 * (not an fmx log) or FMX_ENOMEM. Caller closes with fmx_leaderboard_close. */
int fmx_leaderboard_open(const char *db_path, const char *policy, fmx_leaderboard **out, char *err,
                         size_t errsz);
/* The same with every finished episode scored under reward version (NULL:
 * as the server scored it): its last submission's grade under version in
 * the log's grades table (fmx regrade; a rerun first, then the newest), or
 * the server's grade when it was made under version; episodes graded under
 * neither count as unfinished. */
int fmx_leaderboard_open_version(const char *db_path, const char *policy, const char *version,
                                 fmx_leaderboard **out, char *err, size_t errsz);
void fmx_leaderboard_close(fmx_leaderboard *lb); /* accepts NULL */

int fmx_leaderboard_count(const fmx_leaderboard *lb);
/* Row i, NULL when out of range. Borrowed, valid until fmx_leaderboard_close. */
const fmx_leaderboard_row *fmx_leaderboard_row_at(const fmx_leaderboard *lb, int i);

/* Prints the table: an overall ranking of the policies, then policy × task. */
void fmx_leaderboard_print(FILE *f, const fmx_leaderboard *lb);

/* The leaderboard as one static HTML page (UTF-8, no external assets):
 * inline CSS, the two tables of fmx_leaderboard_print and two inline SVG
 * charts — every finished episode's reward per policy (dots over a box of
 * the quartiles; svg#chart-rewards, one circle.pt per episode) and LOC
 * against correctness of each graded episode's last submission
 * (svg#chart-loc, one circle.pt each) — and a short inline script that
 * writes what rendered into p#render-check. db_path is shown in the header
 * (may be NULL). FMX_OK, FMX_EINVAL (f or lb NULL), FMX_ENOMEM, or FMX_EIO
 * when writing failed. */
int fmx_leaderboard_html(FILE *f, const fmx_leaderboard *lb, const char *db_path);

/* `fmx leaderboard --db DB [--policy NAME] [--html FILE]` (argv[0] is "leaderboard"). */
int fmx_leaderboard_main(int argc, char **argv);

#ifdef __cplusplus
}
#endif

#endif
