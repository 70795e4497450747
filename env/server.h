/*
 * server.h — `fmx serve`: the environment server. One ZeroMQ ROUTER socket
 * speaks the protocol of docs/protocol.md (msgpack maps, env/proto.h) to any
 * number of clients; episodes are bound to the client identity that opened
 * them.
 *
 * Processes: the main thread polls the socket, decodes requests, runs the
 * cheap operations and tools inline, writes the SQLite log and sends every
 * reply. verify_component and submit (and a truncating last step that must
 * grade code) run candidate code, which never runs in the server process:
 * they go to a pool of sandboxed worker processes (env/worker.h) over
 * socketpairs, so a slow verify never blocks other clients and a candidate
 * that hangs, exhausts memory or crashes costs one worker (killed, reaped,
 * replaced) and its episode an error observation (`timeout`, `oom`,
 * `crashed`). Steps of one episode are processed in arrival order: a request
 * for an episode with a job in flight waits in that episode's queue.
 *
 * Fair and bounded serving: a client is a connection (a ROUTER routing id;
 * ids set by clients are refused with `routing_id_refused`, and so is a
 * connection that presents an id another connection uses). Evaluations wait
 * in per-client queues in the server and go to the pool only when a worker
 * is free, to the waiting client that has used the least worker time (fair
 * queueing). What waits is capped: evaluations per client, bytes of waiting
 * requests in all and per client, requests per episode; over a cap the
 * request gets `busy`. Open episodes without a request for the idle timeout
 * are aborted.
 *
 * Bind rule: the server binds loopback addresses only (tcp://127.x.x.x,
 * tcp://[::1], tcp://localhost, tcp://lo, ipc://, inproc://) unless it has a
 * CURVE secret key (--curve-secret-key FILE: ZeroMQ CURVE encryption and
 * server authentication; `fmx keygen` makes a key pair) or --insecure.
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
    const char *tasks_dir;        /* --tasks DIR (required) */
    const char *db_path;          /* --db FILE, default "fmx.db" */
    const char *bind;             /* --bind ADDR, default "tcp://127.0.0.1:5555" */
    int workers;                  /* --workers N (alias --threads), default: online CPUs */
    int worker_threads;           /* --worker-threads N: intra-op threads per worker, 1 */
    long worker_mem_mb;           /* --worker-mem MB: what one evaluation may allocate, 4096 */
    double eval_timeout_s;        /* --eval-timeout S: wall clock per evaluation, 30 */
    int worker_exec;              /* --worker-exec: fork+exec `fmx worker` (implied by cuda) */
    const char *curve_secret_key; /* --curve-secret-key FILE, NULL = no CURVE */
    int insecure;                 /* --insecure: allow a non-loopback bind without CURVE */
    fmx_budget budget;            /* --max-steps N, --max-code-bytes N, --max-observation-kb KB */
    const char *reward_path;      /* --reward FILE, NULL = fmx_reward_config_default() */
    const char *device;           /* --device cpu|cuda[:N], default "cpu" */
    double shutdown_wait_s;       /* how long shutdown waits for in-flight jobs; 30 */
    double idle_timeout_s; /* --idle-timeout S: abort an episode idle this long; 600, 0 never */
    int max_client_evals;  /* --max-client-evals N: evaluations one client may have
                              waiting or running; 128 */
    long max_queued_mb;    /* --max-queued-mb MB: bytes of waiting requests, all clients
                              (one client: a quarter); 256 */
} fmx_serve_config;

fmx_serve_config fmx_serve_config_default(void);

/* Runs the server until SIGINT/SIGTERM. Returns 0 after a clean shutdown, 2
 * when it cannot start (message on stderr). */
int fmx_serve(const fmx_serve_config *cfg);

/* `fmx serve ARGS`: parses the command line (argv[0] is "serve") and runs. */
int fmx_serve_main(int argc, char **argv);

/* 1 if a ZeroMQ bind address only listens on this machine (the bind rule). */
int fmx_serve_is_loopback(const char *addr);

/* `fmx keygen [-o FILE]`: a CURVE key pair for --curve-secret-key (Z85
 * `public-key = …` / `secret-key = …` lines; with -o the file is created
 * mode 0600 and only the public key is printed). */
int fmx_serve_keygen_main(int argc, char **argv);

#ifdef __cplusplus
}
#endif

#endif
