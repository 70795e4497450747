/*
 * optrace.h — op traces as text: a module's `ops` from task.json
 * (docs/pack-format.md, "Op traces") as the numbered listing the trace_ops
 * and read_module_source tools show — `v3 = torch.Tensor.view(v2,
 * (hidden_states.size(0), 16))  in (2, 13, 64) -> (2, 13, 4, 16)`, child
 * calls with their inputs by name — and one dataflow argument as Python-like
 * text. Packs without dataflow get the older listing (T for a tensor).
 *
 * Not here: recording or generalizing traces (python/fmx/dataflow.py), the
 * tools (tools.c).
 */
#ifndef FMX_OPTRACE_H
#define FMX_OPTRACE_H

#include <cjson/cJSON.h>
#include <stdio.h>

#include "pack.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Prints `ops` (a module's op records), one numbered line each, to f, then
 * `returns [v44]` when returns (the module's returned values) is a list;
 * child calls are named with their class from pack (NULL: "?"). */
void fmx_optrace_print(FILE *f, const fmx_pack *pack, const cJSON *ops, const cJSON *returns);

/* Prints one dataflow value (a reference, an expression, a literal, a list). */
void fmx_optrace_print_value(FILE *f, const cJSON *value);

#ifdef __cplusplus
}
#endif

#endif
