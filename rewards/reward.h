/*
 * reward.h — the reward of a graded submission, and the counting rules behind
 * it. Default formula (DESIGN.md):
 *     R = w_c·c + [c = 1]·(w_loc·loc + w_compile·compile)
 * with w = (0.6, 0.25, 0.15); weights, the LOC curve and the version string
 * come from a small config file so a trainer can change them, and every graded
 * submission stores the version and its breakdown.
 *
 * Not here: running the candidate (env/verify.c) or finding its graph facts
 * (env/engine): this module is pure arithmetic on what they measured.
 */
#ifndef FMX_REWARD_H
#define FMX_REWARD_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    char version[64]; /* e.g. "v1-default"; stored with every grade */
    double w_correct; /* 0.6 */
    double w_loc;     /* 0.25 */
    double w_compile; /* 0.15 */
    double loc_slack; /* loc score falls from 1 at target to 0 at target·(1 + slack); 1.0 */
} fmx_reward_config;

fmx_reward_config fmx_reward_config_default(void);

/* Reads a config file of `key = value` lines (keys as the struct fields;
 * '#' starts a comment, to the end of the line). Keys not in the file keep
 * their defaults, but `version` is required (a config that changes the
 * formula must name itself; it may be quoted, 1 to 63 characters). Numbers
 * are finite, weights >= 0, loc_slack > 0. An unknown key, a bad or
 * out-of-range value, a key set twice or a line without `=` is
 * FMX_EFORMAT with "PATH:LINE: ..." in err; FMX_EIO if the file cannot be
 * read. cfg is written only on success. */
int fmx_reward_config_load(const char *path, fmx_reward_config *cfg, char *err, size_t errsz);

/* Facts about a submission that the grader measured. */
typedef struct {
    double correctness;        /* fraction of all probes where every output matched */
    long loc;                  /* fmx_reward_count_loc of the code */
    long target_loc;           /* the task's target */
    int compiled;              /* compiled in the candidate language */
    int host_syncs;            /* .item(), .tolist(), tensor→scalar in the graph */
    int data_dependent_flow;   /* If/Loop conditions computed from tensor values */
    int survives_optimization; /* same outputs after graph optimisation */
    int runs_all_shapes;       /* ran on every probe shape */
} fmx_grade_facts;

typedef struct {
    double correctness, loc_score, compile_score, reward;
} fmx_reward_breakdown;

/* Computes the reward. Pure. correctness is clamped to [0, 1];
 *   loc_score     = 1 if loc <= target_loc, then falling linearly to 0 at
 *                   target_loc·(1 + loc_slack) (0 past it, and for
 *                   loc > target_loc when target_loc <= 0);
 *   compile_score = 0 if not compiled, else the fraction of the four facts
 *                   that hold: no host syncs, no data-dependent flow,
 *                   survives optimization, runs all shapes;
 *   reward        = w_correct·c + [c = 1]·(w_loc·loc_score + w_compile·compile_score).
 * loc_score and compile_score are reported even when c < 1 (they do not
 * count then). NULL cfg or g gives all zeros. */
fmx_reward_breakdown fmx_reward_score(const fmx_reward_config *cfg, const fmx_grade_facts *g);

/* Enough for any breakdown. */
#define FMX_REWARD_BREAKDOWN_MAX 1536

/* Breakdown as JSON text into buf (facts, scores, weights, version):
 * {"version":..,"reward":..,"correctness":..,"loc_score":..,"compile_score":..,
 *  "weights":{"w_correct","w_loc","w_compile","loc_slack"},
 *  "facts":{"correctness","loc","target_loc","compiled","host_syncs",
 *           "data_dependent_flow","survives_optimization","runs_all_shapes"}}
 * Non-finite numbers are written as null. FMX_EINVAL (buf set to "") if a
 * pointer is NULL or n is too small; FMX_REWARD_BREAKDOWN_MAX always fits. */
int fmx_reward_breakdown_json(const fmx_reward_config *cfg, const fmx_grade_facts *g,
                              const fmx_reward_breakdown *b, char *buf, size_t n);

/* Logical lines of Python source: statements, not physical lines. Rules
 * (README "Reward"): every simple statement counts one, `;`-separated ones
 * separately; compound statement headers (def, for, while, if, elif, else,
 * with, try, except, finally) count one; imports, blank lines, comments,
 * docstrings, `def tap` and `if __name__ == "__main__":` blocks count zero; a
 * statement longer than 48 tokens counts once per 48 tokens (started), so a
 * giant one-liner costs what its pieces would.
 * In detail: tokens, logical lines and top-level blocks are fmx's one model
 * of Python source (env/pysource.h, CPython's rules: strings of every form,
 * comments, brackets, backslash continuations, \n, \r\n and a lone \r as
 * line ends, CPython's indentation), the model the compiler's preprocessing
 * drops blocks by. `class` and `async` headers count like the others, and a
 * header's body on the same line after its `:` counts as statements
 * (`if x: return y` is 2). A decorator line counts one. A docstring is a
 * statement made only of string literals (no f-string) that is the first of
 * the module or of a def/class body. Imports are statements starting with
 * `import` or `from`. The zero blocks are top-level blocks (pysource.h):
 * a `def tap` with its decorators and body, an `if __name__ == "__main__":`
 * (either side of the ==) with its body, each at indentation 0. Tokens
 * (names, keywords, numbers, strings, operators, brackets, characters
 * Python has no token for: one each; `;` between statements not counted;
 * the tokens of an f-string's replacement fields added to the string's
 * one) are counted per simple statement and per header, colon included, so
 * the 48-token rule applies to headers too. Never fails on any bytes; NULL
 * → 0; LONG_MAX (never less than the count) if the model cannot be
 * allocated. */
long fmx_reward_count_loc(const char *source, size_t len);

#ifdef __cplusplus
}
#endif

#endif
