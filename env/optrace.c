/*
 * optrace.c — op traces as text (optrace.h): the numbered listing of a
 * module's ops that trace_ops and read_module_source show, with the trace's
 * dataflow written as Python-like text (docs/pack-format.md, "Op traces").
 */
#define _GNU_SOURCE
#include "optrace.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void fmx__flow_value(const cJSON *v, FILE *f, int depth);

static void fmx__shapes(const cJSON *list, FILE *f) {
    const cJSON *s;
    int i = 0;
    cJSON_ArrayForEach(s, list) {
        if (i++) fwrite(", ", 1, 2, f);
        if (!cJSON_IsArray(s)) {
            fwrite("?", 1, 1, f);
            continue;
        }
        fwrite("(", 1, 1, f);
        const cJSON *d;
        int k = 0;
        cJSON_ArrayForEach(d, s) {
            if (k++) fwrite(", ", 1, 2, f);
            fprintf(f, "%lld", (long long)d->valuedouble);
        }
        fputs(k == 1 ? ",)" : ")", f);
    }
}

/* A list of dataflow arguments between open and close, comma separated. */
static void fmx__flow_items(const cJSON *list, FILE *f, int depth, const char *open,
                            const char *close) {
    fputs(open, f);
    const cJSON *e;
    int i = 0;
    cJSON_ArrayForEach(e, list) {
        if (i++) fwrite(", ", 1, 2, f);
        fmx__flow_value(e, f, depth + 1);
    }
    fputs(close, f);
}

/* One dataflow argument of an op record (docs/pack-format.md, "Op traces") as
 * Python-like f: v3, hidden_states, weights["q_proj.weight"], x.size(1), ... */
static void fmx__flow_value(const cJSON *v, FILE *f, int depth) {
    if (depth > 16) {
        fwrite("...", 1, 3, f);
        return;
    }
    if (!v || cJSON_IsNull(v)) {
        fwrite("None", 1, 4, f);
    } else if (cJSON_IsBool(v)) {
        fputs(cJSON_IsTrue(v) ? "True" : "False", f);
    } else if (cJSON_IsNumber(v)) {
        char buf[64];
        if (v->valuedouble == (double)(long long)v->valuedouble && fabs(v->valuedouble) < 1e15)
            snprintf(buf, sizeof buf, "%lld", (long long)v->valuedouble);
        else /* the shortest of 15 or 17 digits that reads back as the same double */
            for (int digits = 15; digits <= 17; digits += 2) {
                snprintf(buf, sizeof buf, "%.*g", digits, v->valuedouble);
                if (strtod(buf, NULL) == v->valuedouble) break;
            }
        fputs(buf, f);
    } else if (cJSON_IsString(v)) {
        fprintf(f, "\"%s\"", v->valuestring);
    } else if (cJSON_IsArray(v)) {
        fmx__flow_items(v, f, depth, "[", "]");
    } else if (cJSON_IsObject(v) && v->child) {
        const cJSON *a = v->child;
        const char *k = a->string;
        const cJSON *a0 = cJSON_GetArrayItem(a, 0), *a1 = cJSON_GetArrayItem(a, 1);
        if (strcmp(k, "v") == 0 && cJSON_IsNumber(a)) {
            fprintf(f, "v%d", a->valueint);
        } else if (strcmp(k, "in") == 0 && cJSON_IsString(a)) {
            fputs(a->valuestring, f);
        } else if (strcmp(k, "w") == 0 && cJSON_IsString(a)) {
            fprintf(f, "weights[\"%s\"]", a->valuestring);
        } else if (strcmp(k, "float") == 0 && cJSON_IsString(a)) {
            int numeric = strspn(a->valuestring, "-0123456789.e+") == strlen(a->valuestring);
            fprintf(f, numeric ? "%s" : "float(\"%s\")", a->valuestring);
        } else if (strcmp(k, "dtype") == 0 && cJSON_IsString(a)) {
            fprintf(f, "torch.%s", a->valuestring);
        } else if (strcmp(k, "device") == 0 && cJSON_IsString(a)) {
            fprintf(f, "\"%s\"", a->valuestring);
        } else if (strcmp(k, "dtype_of") == 0 || strcmp(k, "device_of") == 0) {
            fmx__flow_value(a, f, depth + 1);
            fputs(k[1] == 't' ? ".dtype" : ".device", f);
        } else if (strcmp(k, "finfo_min") == 0 || strcmp(k, "finfo_max") == 0) {
            fputs("torch.finfo(", f);
            fmx__flow_value(a, f, depth + 1);
            fputs(strcmp(k, "finfo_min") == 0 ? ".dtype).min" : ".dtype).max", f);
        } else if (strcmp(k, "dim") == 0 && a0 && cJSON_IsNumber(a1)) {
            fmx__flow_value(a0, f, depth + 1);
            fprintf(f, ".size(%d)", a1->valueint);
        } else if ((strcmp(k, "mul") == 0 || strcmp(k, "add") == 0) && a0 && a1) {
            fmx__flow_value(a0, f, depth + 1);
            fputs(k[0] == 'm' ? " * " : " + ", f);
            fmx__flow_value(a1, f, depth + 1);
        } else if ((strcmp(k, "rsub") == 0 || strcmp(k, "floordiv") == 0) && a0 && a1) {
            fmx__flow_value(a0, f, depth + 1);
            fputs(k[0] == 'r' ? " - " : " // ", f);
            fmx__flow_value(a1, f, depth + 1);
        } else if (strcmp(k, "loopvar") == 0 && cJSON_IsNumber(a)) {
            if (a->valueint)
                fprintf(f, "t + %d", a->valueint);
            else
                fputc('t', f);
        } else if (strcmp(k, "tuple") == 0 && cJSON_IsArray(a)) {
            fmx__flow_items(a, f, depth, "(", cJSON_GetArraySize(a) == 1 ? ",)" : ")");
        } else if (strcmp(k, "list") == 0) {
            fmx__flow_value(a, f, depth + 1);
        } else if (strcmp(k, "slice") == 0 && cJSON_GetArraySize(a) == 3) {
            for (int i = 0; i < 3; i++) {
                const cJSON *e = cJSON_GetArrayItem(a, i);
                if (i == 2 && cJSON_IsNull(e)) break;
                if (i) fwrite(":", 1, 1, f);
                if (!cJSON_IsNull(e)) fmx__flow_value(e, f, depth + 1);
            }
        } else if (strcmp(k, "ellipsis") == 0) {
            fwrite("...", 1, 3, f);
        } else if (strcmp(k, "const") == 0) {
            const char *dt = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(v, "dtype"));
            fprintf(f, "<constant %s tensor ", dt ? dt : "?");
            fmx__flow_value(cJSON_GetObjectItemCaseSensitive(v, "shape"), f, depth + 1);
            fwrite(">", 1, 1, f);
        } else if (strcmp(k, "unknown") == 0) {
            fputs("<tensor of unknown origin ", f);
            fmx__flow_value(a, f, depth + 1);
            fwrite(">", 1, 1, f);
        } else if (strcmp(k, "varies") == 0) {
            fputs("<varies by probe: ", f);
            fmx__flow_value(a, f, depth + 1);
            fwrite(">", 1, 1, f);
        } else if (strcmp(k, "repr") == 0 && cJSON_IsString(a)) {
            fputs(a->valuestring, f);
        } else {
            fwrite("?", 1, 1, f);
        }
    } else {
        fwrite("?", 1, 1, f);
    }
}

/* "v3, v4 = " for an op record's values (nothing when it made none). */
static void fmx__flow_targets(const cJSON *op, FILE *f) {
    const cJSON *y;
    int i = 0;
    cJSON_ArrayForEach(y, cJSON_GetObjectItemCaseSensitive(op, "y")) {
        if (cJSON_IsNumber(y)) fprintf(f, "%sv%d", i++ ? ", " : "", y->valueint);
    }
    if (i) fwrite(" = ", 1, 3, f);
}

void fmx_optrace_print(FILE *f, const fmx_pack *pack, const cJSON *ops, const cJSON *returns) {
    const cJSON *op;
    int i = 0;
    cJSON_ArrayForEach(op, ops) {
        i++;
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(op, "x");
        const char *call = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(op, "call"));
        fprintf(f, "%4d  ", i);
        const cJSON *loop = cJSON_GetObjectItemCaseSensitive(op, "loop");
        if (cJSON_IsNumber(loop)) { /* a loop over time steps: the next ops are one step */
            fputs("for t in range(", f);
            fmx__flow_value(cJSON_GetArrayItem(x, 0), f, 0);
            fprintf(f, "): the next %d ops are one step", loop->valueint);
            const cJSON *c;
            int k = 0;
            cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(op, "carried")) {
                fputs(k++ ? ", " : "; carried: ", f);
                fmx__flow_value(cJSON_GetArrayItem(c, 0), f, 0);
                fputs(" starts as ", f);
                fmx__flow_value(cJSON_GetArrayItem(c, 1), f, 0);
            }
            fwrite("\n", 1, 1, f);
            continue;
        }
        if (x) fmx__flow_targets(op, f);
        if (call) {
            int cm = pack ? fmx_pack_find_module(pack, call) : -1;
            fprintf(f, "call %s (%s)", call, cm >= 0 ? fmx_pack_module(pack, cm)->cls : "?");
            if (cJSON_IsObject(x)) {
                fwrite("(", 1, 1, f);
                const cJSON *e;
                int k = 0;
                cJSON_ArrayForEach(e, x) {
                    if (cJSON_IsNull(e)) continue; /* an input left at None */
                    fprintf(f, "%s%s=", k++ ? ", " : "", e->string);
                    fmx__flow_value(e, f, 0);
                }
                fwrite(")", 1, 1, f);
            }
            fwrite("\n", 1, 1, f);
            continue;
        }
        const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(op, "op"));
        const char *args = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(op, "args"));
        fputs(name ? name : "?", f);
        if (cJSON_IsArray(x)) { /* the dataflow: values, and sizes as expressions */
            fwrite("(", 1, 1, f);
            const cJSON *e;
            int k = 0;
            cJSON_ArrayForEach(e, x) {
                if (k++) fwrite(", ", 1, 2, f);
                fmx__flow_value(e, f, 0);
            }
            cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(op, "kw")) {
                fprintf(f, "%s%s=", k++ ? ", " : "", e->string);
                fmx__flow_value(e, f, 0);
            }
            fwrite(")", 1, 1, f);
        } else if (args) {
            fwrite("(", 1, 1, f);
            fputs(args, f);
            fwrite(")", 1, 1, f);
        }
        const cJSON *in = cJSON_GetObjectItemCaseSensitive(op, "in");
        if (in && in->child) {
            fwrite("  in ", 1, 5, f);
            fmx__shapes(in, f);
        }
        const cJSON *o = cJSON_GetObjectItemCaseSensitive(op, "out");
        if (o && o->child) {
            fwrite(" -> ", 1, 4, f);
            fmx__shapes(o, f);
        }
        fwrite("\n", 1, 1, f);
    }
    if (cJSON_GetArraySize(ops) == 0) fputs("  (no ops recorded)\n", f);
    if (cJSON_IsArray(returns)) {
        fputs("returns ", f);
        fmx__flow_value(returns, f, 0);
        fputc('\n', f);
    }
}

void fmx_optrace_print_value(FILE *f, const cJSON *value) {
    fmx__flow_value(value, f, 0);
}
