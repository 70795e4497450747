/*
 * echo.c — the transport floor for bench/server.py: a bare ZeroMQ ROUTER
 * that sends every message back to the connection it came from, unchanged.
 * Nothing is decoded, dispatched or logged, so the rate clients reach
 * against it is what ZeroMQ and the clients alone allow on this machine;
 * `fmx serve`'s rate for cheap steps is reported as a fraction of it.
 *
 *   build/bench/bench_echo ADDR      (e.g. ipc:///tmp/echo.sock)
 *
 * Runs until SIGTERM or SIGINT. Not here: any fmx code.
 */
#include <signal.h>
#include <stdio.h>
#include <zmq.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig) {
    (void)sig;
    stop = 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: bench_echo ADDR\n");
        return 2;
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    void *ctx = zmq_ctx_new();
    void *router = zmq_socket(ctx, ZMQ_ROUTER);
    int linger = 0;
    zmq_setsockopt(router, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_bind(router, argv[1]) != 0) {
        fprintf(stderr, "bench_echo: bind %s: %s\n", argv[1], zmq_strerror(zmq_errno()));
        return 1;
    }
    zmq_msg_t part;
    zmq_msg_init(&part);
    while (!stop) {
        /* every part of a message (routing id first) goes back as it came */
        if (zmq_msg_recv(&part, router, 0) < 0) continue; /* EINTR at a signal */
        int more = zmq_msg_more(&part);
        if (zmq_msg_send(&part, router, more ? ZMQ_SNDMORE : 0) < 0) break;
    }
    zmq_msg_close(&part);
    zmq_close(router);
    zmq_ctx_term(ctx);
    return 0;
}
