/*
 * pyexec.h — how the fmx binary hands work to its Python package (the
 * exporter, the mutant generator): which interpreter, with what environment,
 * and running a module with its stdout captured.
 *
 * The environment it prepares: fmx's package folder ($FMX_PYTHONPATH, else
 * the source tree's python/) first on PYTHONPATH, and FMX_BIN set to this
 * executable (/proc/self/exe; unless already set) so Python can call back into `fmx`.
 *
 * Not here: anything about what the Python side does.
 */
#ifndef FMX_PYEXEC_H
#define FMX_PYEXEC_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The interpreter: $FMX_PYTHON, else /usr/bin/python3. Borrowed (the
 * environment's string or a literal). */
const char *fmx_python_interpreter(void);

/* Prepares this process's environment (PYTHONPATH, FMX_BIN) for running fmx's
 * Python package; idempotent. Returns FMX_OK or FMX_ENOMEM. */
int fmx_python_env(void);

/* Runs `PYTHON -m module args...` (args NULL-terminated) after
 * fmx_python_env(), with stdin from /dev/null, stderr passed through and
 * stdout captured into *out (NUL-terminated, caller frees with free()).
 * Returns the exit status (0..255), or a negative FMX_E… status when it could
 * not be run (err says why; *out is then NULL). */
int fmx_python_run(const char *module, const char *const *args, char **out, size_t *outlen,
                   char *err, size_t errsz);

#ifdef __cplusplus
}
#endif

#endif
