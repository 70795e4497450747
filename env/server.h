/*
 * server.h — `fmx serve`: the environment server. One ZeroMQ ROUTER socket
 * speaks the protocol of docs/protocol.md (msgpack maps, env/proto.h) to any
 * number of clients; episodes are bound to the client identity that opened
 * them.
 *
 * Threads: the main thread polls the socket, decodes requests, runs the
 * cheap operations and tools inline, writes the SQLite log and sends every
 * reply. verify_component and submit (and a truncating last step that must
 * grade code) go to a pool of worker threads through a job queue and come
 * back through an inproc socket, so a slow verify never blocks other
 * clients. Steps of one episode are processed in arrival order: a request
 * for an episode with a job in flight waits in that episode's queue.
 *
 * Durability: every step, submission and episode change is committed to the
 * log BEFORE its reply is sent; replies produced in one loop turn share one
 * commit (group commit). If a commit fails, the turn's replies become
 * `internal` errors and the open episodes they touched are aborted.
 *
 * Shutdown (SIGINT/SIGTERM): new requests get `shutting_down`, in-flight jobs
 * finish (bounded wait), open episodes are marked aborted, the log is
 * committed and closed; exit status 0.
 *
 * Not here: the wire format (env/proto.c), step rules (env/episode.c), the
 * tools (env/tools.c), the log schema (episodes/log.c).
 */
#ifndef FMX_SERVER_H
#define FMX_SERVER_H

#include <stddef.h>

#include "episode.h"
#include "rewards/reward.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char *tasks_dir;   /* --tasks DIR (required) */
    const char *db_path;     /* --db FILE, default "fmx.db" */
    const char *bind;        /* --bind ADDR, default "tcp://127.0.0.1:5555" */
    int threads;             /* --threads N, default: online CPUs */
    fmx_budget budget;       /* --max-steps N, --max-code-bytes N */
    const char *reward_path; /* --reward FILE, NULL = fmx_reward_config_default() */
    const char *device;      /* --device cpu|cuda[:N], default "cpu" */
    double shutdown_wait_s;  /* how long shutdown waits for in-flight jobs; 30 */
} fmx_serve_config;

fmx_serve_config fmx_serve_config_default(void);

/* Runs the server until SIGINT/SIGTERM. Returns 0 after a clean shutdown, 2
 * when it cannot start (message on stderr). */
int fmx_serve(const fmx_serve_config *cfg);

/* `fmx serve ARGS`: parses the command line (argv[0] is "serve") and runs. */
int fmx_serve_main(int argc, char **argv);

#ifdef __cplusplus
}
#endif

#endif
