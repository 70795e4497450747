/*
 * file.h — reading a whole file, the one helper every command that takes a
 * path (candidate files, solutions, JSON lists) needs. Not a pack reader
 * (env/pack.c mmaps safetensors).
 */
#ifndef FMX_FILE_H
#define FMX_FILE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The whole regular file at path, NUL-terminated; *len (if not NULL) gets its
 * size. NULL on failure, with the reason ("PATH: …") in err. Caller frees. */
char *fmx_file_read(const char *path, size_t *len, char *err, size_t errsz);

#ifdef __cplusplus
}
#endif

#endif
