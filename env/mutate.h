/*
 * mutate.h — `fmx mutate PACK SOLUTION`: how strong a pack's probes are.
 *
 * The Python generator (python/fmx/mutate.py) makes mutants of a correct
 * solution at the source level (a constant perturbed, an activation swapped,
 * a residual, bias, norm, scale, rotary or transpose dropped, ...). Each is
 * compiled and verified here, in this process, on every probe (hidden ones
 * too): a mutant is killed when some graded output or tap differs or it fails
 * at run time, survives when it matches everywhere, is invalid when it is not
 * in the candidate language (not counted), and is equivalent when the pack's
 * task.json "equivalent_mutants" or --equivalent FILE lists it (not counted).
 * Mutation score = killed / (killed + survived).
 *
 * Not here: making mutants (the generator), grading one candidate
 * (env/verify.c).
 */
#ifndef FMX_MUTATE_H
#define FMX_MUTATE_H

#ifdef __cplusplus
extern "C" {
#endif

/* The `fmx mutate` command; argv[0] is "mutate". Returns the exit status:
 * 0 no mutant survived, 1 some survived, 2 error (bad arguments, pack,
 * solution or equivalents list; the solution itself does not pass). */
int fmx_mutate_main(int argc, char **argv);

#ifdef __cplusplus
}
#endif

#endif
