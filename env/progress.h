/*
 * progress.h — progress of a long command on stderr: `fmx run`, `fmx mutate`,
 * `fmx regrade --rerun` (the Python exporter and tracer print their own).
 *
 * On a terminal one line is redrawn in place: "what k/N  elapsed 12.3 s
 * [item]"; otherwise a line is printed at every ~10% (and at the end), so
 * logs stay short. Thread-safe: several players may count into one.
 *
 * Not here: what is being done; results go to stdout as before.
 */
#ifndef FMX_PROGRESS_H
#define FMX_PROGRESS_H

typedef struct fmx_progress fmx_progress;

/* Starts counting total items of what ("episodes", "mutants"). Prints
 * nothing when quiet or total <= 0. NULL when out of memory (the calls below
 * accept NULL). Caller frees with fmx_progress_destroy. */
fmx_progress *fmx_progress_create(const char *what, int total, int quiet);
/* One more item done; item (may be NULL) names it on a terminal. */
void fmx_progress_step(fmx_progress *p, const char *item);
/* Ends the line on a terminal and frees. Accepts NULL. */
void fmx_progress_destroy(fmx_progress *p);

#endif
