/*
 * outcome.h — grades and step outcomes as cJSON trees, the form they take on
 * the worker channel (env/channel.h), and back. Not here: the fates of
 * stopped evaluations (worker.h: fmx_fate_outcome and the fallback).
 */
#ifndef FMX_OUTCOME_H
#define FMX_OUTCOME_H

#include <cjson/cJSON.h>

#include "episode.h"
#include "tools.h"

/* The tree of a grade; NULL: out of memory. */
cJSON *fmx_grade_tree(const fmx_grade *g);
/* Fills g from a tree of fmx_grade_tree. FMX_OK, FMX_EFORMAT or FMX_ENOMEM. */
int fmx_grade_from_tree(const cJSON *o, fmx_grade *g);
/* The tree of a step outcome (its observation is moved into it). */
cJSON *fmx_outcome_tree(fmx_step_outcome *out);
/* Fills out from a tree of fmx_outcome_tree. FMX_OK, FMX_EFORMAT or FMX_ENOMEM. */
int fmx_outcome_from_tree(cJSON *o, fmx_step_outcome *out);
/* A number of o (0 if absent) and a flag of o (true only if true). */
double fmx_tree_num(const cJSON *o, const char *k);
int fmx_tree_flag(const cJSON *o, const char *k);

#endif
