/*
 * status.h — fmx status codes. Every fmx function that can fail returns 0 or
 * one of these negative codes; fmx_strerror names them. Detailed text lives on
 * the handle or in the caller's error buffer. This file is plain C and is
 * included by the C++ bridge too.
 */
#ifndef FMX_STATUS_H
#define FMX_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

/* X(name, value, description) */
#define FMX_STATUS_MAP(X)                                                                          \
    X(OK, 0, "ok")                                                                                 \
    X(EINVAL, -1, "invalid argument")                                                              \
    X(ENOMEM, -2, "out of memory")                                                                 \
    X(EIO, -3, "i/o error")                                                                        \
    X(EFORMAT, -4, "malformed file")                                                               \
    X(ENOTFOUND, -5, "not found")                                                                  \
    X(ECOMPILE, -6, "candidate does not compile")                                                  \
    X(EFORBIDDEN, -7, "not allowed in the candidate language")                                     \
    X(ERUNTIME, -8, "candidate failed at run time")                                                \
    X(EMISMATCH, -9, "outputs do not match")                                                       \
    X(EVERSION, -10, "unsupported version")                                                        \
    X(EDEVICE, -11, "device unavailable")                                                          \
    X(EINTERNAL, -12, "internal error")

enum {
#define FMX__STATUS_ENUM(name, value, desc) FMX_##name = value,
    FMX_STATUS_MAP(FMX__STATUS_ENUM)
#undef FMX__STATUS_ENUM
};

/* Static description of a status code ("unknown status" if not one). */
const char *fmx_strerror(int status);

#ifdef __cplusplus
}
#endif

#endif
