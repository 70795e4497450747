/*
 * status.c — fmx_strerror, derived from the one status list in status.h.
 */
#include "status.h"

const char *fmx_strerror(int status) {
    switch (status) {
#define FMX__STATUS_CASE(name, value, desc)                                                        \
    case value:                                                                                    \
        return desc;
        FMX_STATUS_MAP(FMX__STATUS_CASE)
#undef FMX__STATUS_CASE
    }
    return "unknown status";
}
