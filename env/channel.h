/*
 * channel.h — messages between the server and its workers: a u32 length,
 * then a cJSON tree in a lossless binary encoding (JSON text would lose
 * NaN/Inf and the float flag of whole numbers). Not here: what the messages
 * mean (env/worker.c).
 */
#ifndef FMX_CHANNEL_H
#define FMX_CHANNEL_H

#include <cjson/cJSON.h>
#include <stddef.h>

#define FMX_CHANNEL_MAX_MSG (256u << 20) /* largest message on a channel */
#define FMX_CHANNEL_FD 3                 /* a worker's end of its channel */

/* The framed message for j (*out: caller frees, *len bytes). FMX_OK or FMX_ENOMEM. */
int fmx_channel_encode(const cJSON *j, char **out, size_t *len);
/* The tree of one message body (without its length); NULL if malformed. */
cJSON *fmx_channel_decode(const char *s, size_t n);
/* Blocking write of a whole buffer. 0, or -1. */
int fmx_channel_write_all(int fd, const char *p, size_t n);
/* Blocking read of one message body. 1 with *out (caller frees), 0 at end of
 * stream, -1 on error or a message over FMX_CHANNEL_MAX_MSG. */
int fmx_channel_read_msg(int fd, char **out, size_t *len);

#endif
