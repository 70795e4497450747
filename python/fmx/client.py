"""fmx.client — the Python client of the fmx environment server.

Speaks docs/protocol.md (ZeroMQ DEALER socket, one msgpack map per request
and per reply) and gives a trainer gym-style calls:

    from fmx import Client
    with Client("ipc:///tmp/fmx.sock") as env:
        obs, info = env.reset(task="qwen2/Qwen2MLP", policy="my-llm")
        obs, reward, terminated, truncated, info = env.step(
            {"tool": "read_module_source", "args": {}})

and batched asynchronous stepping of many episodes over the same socket:

    ids = [ep for ep, _obs, _info in env.reset_many(64, policy="my-llm")]
    env.send([action] * len(ids), ids)
    for episode, result in env.recv():   # whichever finished; call again for the rest
        ...

Every reply is matched to its request by the protocol's `req` number, so
synchronous calls and asynchronous steps can be mixed freely. Error replies
raise (or, from `recv`, are returned as) `FmxError` subclasses named after
the protocol's error codes; a reply that does not come in time is `Timeout`.

Step records of the SQLite episode log are decoded with the field list the
server publishes in `spec` (`step_fields`), never a copy of it.

A Client may be shared by threads: its socket and bookkeeping are guarded by
a lock, and a thread waiting for its reply reads, in short turns, the replies
of every thread (each goes to the thread that asked). One client per thread
is still faster (no turns). For asyncio, `fmx.AsyncClient` (fmx.aio) has the
same calls as coroutines. Not here: the server (env/server.c), the C client
(policies/client.c).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import sqlite3
import threading
import time
import urllib.parse
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import msgpack
import zmq

DEFAULT_ADDR = "tcp://127.0.0.1:5555"

Observation = Dict[str, Any]
Info = Dict[str, Any]
StepResult = Tuple[Observation, float, bool, bool, Info]
Action = Mapping[str, Any]


class FmxError(Exception):
    """An error reply from the server (or a client-side failure such as a timeout).

    `code` is the protocol's error code ("bad_request", "unknown_episode", ...),
    `message` the server's explanation, `reply` the whole reply map if any.
    """

    code = "error"

    def __init__(self, message: str, code: Optional[str] = None,
                 reply: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(f"{code or self.code}: {message}")
        if code is not None:
            self.code = code
        self.message = message
        self.reply = dict(reply) if reply is not None else None


class BadMessage(FmxError):
    """The request could not be decoded: not msgpack, not a map, over a limit."""

    code = "bad_message"


class BadRequest(FmxError):
    """A field is missing or of the wrong type, or an episode has too many waiting requests."""

    code = "bad_request"


class UnknownOp(FmxError):
    """The op is not one of hello, spec, list_tasks, reset, step, close, health."""

    code = "unknown_op"


class UnknownTask(FmxError):
    """reset named a task the server does not have."""

    code = "unknown_task"


class UnknownEpisode(FmxError):
    """No such episode (never opened, closed, or forgotten long after it ended)."""

    code = "unknown_episode"


class NotYourEpisode(FmxError):
    """The episode was opened by another connection."""

    code = "not_your_episode"


class EpisodeOver(FmxError):
    """The episode has ended (submitted, truncated, closed or aborted); reset to start another."""

    code = "episode_over"


class ShuttingDown(FmxError):
    """The server is shutting down and takes no new work."""

    code = "shutting_down"


class Busy(FmxError):
    """A cap was reached (evaluations of this connection, memory of waiting requests, requests
    waiting on one episode); the message says which. Send again when replies come."""

    code = "busy"


class RoutingIdRefused(FmxError):
    """The connection set its own ZeroMQ routing id (ZMQ_ROUTING_ID), or presented one that
    another connection uses; the server assigns routing ids."""

    code = "routing_id_refused"


class InternalError(FmxError):
    """The server ran out of memory or could not write its log."""

    code = "internal"


class Timeout(FmxError):
    """No reply came within the client's timeout (client-side; the server may still answer)."""

    code = "timeout"


_ERRORS: Dict[str, type] = {cls.code: cls for cls in (
    BadMessage, BadRequest, UnknownOp, UnknownTask, UnknownEpisode, NotYourEpisode,
    EpisodeOver, Busy, RoutingIdRefused, ShuttingDown, InternalError, Timeout)}


def error_from_reply(reply: Mapping[str, Any]) -> FmxError:
    """The typed exception for an error reply `{"ok": false, "error": {code, message}}`."""
    err = reply.get("error") or {}
    code = str(err.get("code", "error"))
    message = str(err.get("message", ""))
    return _ERRORS.get(code, FmxError)(message, code=code, reply=reply)


def decode_step(fields: Sequence[Mapping[str, str]],
                record: Union[Mapping[str, Any], Sequence[Any]]) -> Dict[str, Any]:
    """A step record as a dict of Python values, by the server's `step_fields`."""
    if not isinstance(record, Mapping):
        record = dict(zip((f["name"] for f in fields), record))
    out: Dict[str, Any] = {}
    for f in fields:
        v = record.get(f["name"])
        if v is not None:
            kind = f["type"]
            if kind == "json":
                v = json.loads(v) if isinstance(v, (str, bytes)) else v
            elif kind == "int":
                v = int(v)
            elif kind == "float":
                v = float(v)
            elif kind == "str":
                v = str(v)
        out[f["name"]] = v
    return out


def read_steps(path: str, episode: int, fields: Sequence[Mapping[str, str]]
               ) -> List[Dict[str, Any]]:
    """Every logged step of an episode in the SQLite log at path (opened read-only), decoded."""
    cols = ", ".join(f'"{f["name"]}"' for f in fields)
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        rows = conn.execute(f"SELECT {cols} FROM steps WHERE episode = ? ORDER BY idx",
                            (episode,)).fetchall()
    return [decode_step(fields, row) for row in rows]


def _step_result(reply: Mapping[str, Any]) -> StepResult:
    return (reply["observation"], float(reply["reward"]), bool(reply["terminated"]),
            bool(reply["truncated"]), reply["info"])


class Client:
    """One connection to an fmx server.

    addr: a ZeroMQ address (`tcp://HOST:PORT`, `ipc://PATH`).
    timeout: seconds to wait for a reply (None waits forever); on expiry the
    call raises `Timeout`.
    context: a zmq.Context to share (default: the process's global one).

    `episode` is the episode the last reset() opened (the default of step and
    close); `pending` counts send()'s steps not yet returned by recv();
    `stray_replies` counts replies that answered no request this client sent
    (always 0 from a correct server).
    """

    def __init__(self, addr: str = DEFAULT_ADDR, timeout: Optional[float] = 60.0,
                 context: Optional[zmq.Context] = None) -> None:
        self.addr = addr
        self.timeout = timeout
        self.episode: Optional[int] = None  # the episode reset() opened last
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(addr)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._reqs = itertools.count(1)
        self._arrived: Dict[int, Dict[str, Any]] = {}  # replies read while waiting for another
        self._steps: Dict[int, int] = {}  # req -> episode of send()'s steps not yet returned
        self._outstanding: Set[int] = set()  # sent, reply not read yet
        self._abandoned: Set[int] = set()  # waits that timed out: their late replies are dropped
        self.stray_replies = 0  # replies that matched no request sent (never expected)
        self._spec: Optional[Dict[str, Any]] = None
        # guards the socket and the maps above: threads may share a client
        self._lock = threading.RLock()

    # ---- the socket ----

    def disconnect(self) -> None:
        """Closes the socket. Open episodes stay open on the server until closed or it stops."""
        with self._lock:
            if not self._sock.closed:
                self._sock.close(linger=0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disconnect()

    def _send(self, op: str, fields: Mapping[str, Any]) -> int:
        body = dict(fields)
        with self._lock:
            req = next(self._reqs)
            body.update(op=op, req=req)
            self._sock.send(msgpack.packb(body, use_bin_type=True))
            self._outstanding.add(req)
        return req

    # A thread holds the lock for one turn of reading at most this long, so
    # that other threads sharing the client can send and read in between.
    _TURN_S = 0.01

    def _read_turn(self, timeout: Optional[float]) -> None:
        """One thread-safe turn of _read, at most _TURN_S (or timeout) long."""
        turn = self._TURN_S if timeout is None else max(0.0, min(timeout, self._TURN_S))
        with self._lock:
            self._read(turn)

    def _read(self, timeout: Optional[float]) -> bool:
        """Reads every reply that is waiting, blocking up to timeout seconds for the first.

        Returns False when nothing arrived in time.
        """
        ms = None if timeout is None else max(0, int(timeout * 1000))
        if not self._poller.poll(ms):
            return False
        while True:
            try:
                frame = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return True
            reply = msgpack.unpackb(frame, raw=False)
            req = reply.get("req") if isinstance(reply, dict) else None
            if not isinstance(req, int):
                # Only a request that could not be decoded gets a reply without req.
                raise error_from_reply(reply) if isinstance(reply, dict) else BadMessage(
                    "the server sent something that is not a msgpack map")
            if req in self._abandoned:
                self._abandoned.discard(req)
                self._outstanding.discard(req)
            elif req in self._outstanding:
                self._outstanding.discard(req)
                self._arrived[req] = reply
            else:
                self.stray_replies += 1

    def _wait(self, req: int, timeout: Optional[float]) -> Dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if req in self._arrived:
                    return self._arrived.pop(req)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self._abandoned.add(req)
                    raise Timeout(f"no reply to request {req} from {self.addr} within {timeout} s")
            self._read_turn(left)

    def request(self, op: str, **fields: Any) -> Dict[str, Any]:
        """Sends one request and returns its reply map (ok replies only).

        Raises the FmxError subclass of an error reply, or Timeout.
        """
        reply = self._wait(self._send(op, fields), self.timeout)
        if not reply.get("ok"):
            raise error_from_reply(reply)
        del reply["req"]
        return reply

    # ---- the protocol's ops ----

    def hello(self) -> Dict[str, Any]:
        """protocol, server, engine, device."""
        return self.request("hello")

    def spec(self) -> Dict[str, Any]:
        """tools (OpenAI function-calling schemas), tools_strict (the same for OpenAI's strict
        mode), system_prompt (the llm policy's), observation and action docs, budget,
        step_fields. Fetched once and cached."""
        if self._spec is None:
            self._spec = self.request("spec")
        return self._spec

    def health(self) -> Dict[str, Any]:
        """Counters: uptime_s, episodes_open, steps, requests, jobs_in_flight, tasks, db."""
        return self.request("health")

    def list_tasks(self, goals: bool = False) -> List[Dict[str, Any]]:
        """Every task: {id, kind, pack, module, class, params, target_loc}; with goals, also
        `goal`: the text reset sends (under the server's budget), for a dataset of prompts."""
        return self.request("list_tasks", **({"goals": True} if goals else {}))["tasks"]

    @staticmethod
    def _reset_fields(task: Optional[str], seed: Optional[int], policy: Optional[str],
                      max_steps: Optional[int] = None) -> Dict[str, Any]:
        fields: Dict[str, Any] = {}
        if task is not None:
            fields["task"] = task
        if seed is not None:
            fields["seed"] = seed
        if policy is not None:
            fields["policy"] = policy
        if max_steps is not None:
            fields["max_steps"] = max_steps
        return fields

    def reset(self, task: Optional[str] = None, seed: Optional[int] = None,
              policy: Optional[str] = None, max_steps: Optional[int] = None
              ) -> Tuple[Observation, Info]:
        """Opens an episode (task None: the server's next task, round robin).

        max_steps lowers the episode's step budget below the server's.
        Returns (observation, info); info["episode"] is the new episode's id,
        which also becomes this client's current episode (`self.episode`).
        """
        reply = self.request("reset", **self._reset_fields(task, seed, policy, max_steps))
        with self._lock:
            self.episode = int(reply["episode"])
        info = dict(reply["info"])
        info["episode"] = int(reply["episode"])
        return reply["observation"], info

    def step(self, action: Action, episode: Optional[int] = None) -> StepResult:
        """One tool call {"tool": NAME, "args": {...}} in an episode (default: the current one).

        Returns (observation, reward, terminated, truncated, info).
        """
        ep = self._episode(episode)
        reply = self.request("step", episode=ep, action=dict(action))
        return _step_result(reply)

    def close(self, episode: Optional[int] = None, grade: bool = False) -> Dict[str, Any]:
        """Closes an episode (default: the current one); an open one is logged as aborted.

        grade: an open episode is ended by a `finish` step instead: the last code
        verify_component compiled for the task's module is graded as if submitted
        (reward 0 if none); the reply is that step's (observation, reward,
        terminated, info with grade) plus closed and episode.
        """
        ep = self._episode(episode)
        reply = self.request("close", episode=ep, **({"grade": True} if grade else {}))
        with self._lock:
            if ep == self.episode:
                self.episode = None
        return reply

    def _episode(self, episode: Optional[int]) -> int:
        if episode is not None:
            return int(episode)
        if self.episode is None:
            raise BadRequest("no current episode: call reset() first or pass episode=")
        return self.episode

    # ---- many episodes at once ----

    def reset_many(self, tasks: Union[int, Sequence[Optional[str]]], seed: Optional[int] = None,
                   policy: Optional[str] = None, max_steps: Optional[int] = None
                   ) -> List[Tuple[int, Observation, Info]]:
        """Opens several episodes with one round trip's latency.

        tasks: a list of task ids (None: round robin), or a count of round-robin
        episodes. Returns [(episode, observation, info)] in the order asked.
        Raises the first error reply (the episodes that did open stay open).
        """
        ids: Sequence[Optional[str]] = [None] * tasks if isinstance(tasks, int) else tasks
        reqs = [self._send("reset", self._reset_fields(t, seed, policy, max_steps)) for t in ids]
        out: List[Tuple[int, Observation, Info]] = []
        first_error: Optional[FmxError] = None
        for req in reqs:
            reply = self._wait(req, self.timeout)
            if not reply.get("ok"):
                first_error = first_error or error_from_reply(reply)
                continue
            info = dict(reply["info"])
            info["episode"] = int(reply["episode"])
            out.append((info["episode"], reply["observation"], info))
        if first_error is not None:
            raise first_error
        return out

    def send(self, actions: Sequence[Action], episode_ids: Sequence[int]) -> List[int]:
        """Sends one step per (action, episode) without waiting; returns their req ids.

        Steps of one episode run in the order sent. Collect the results with recv().
        """
        if len(actions) != len(episode_ids):
            raise ValueError(f"{len(actions)} actions for {len(episode_ids)} episodes")
        reqs = []
        with self._lock:
            for action, ep in zip(actions, episode_ids):
                req = self._send("step", {"episode": int(ep), "action": dict(action)})
                self._steps[req] = int(ep)
                reqs.append(req)
        return reqs

    @property
    def pending(self) -> int:
        """Steps sent with send() whose results recv() has not returned yet."""
        return len(self._steps)

    def recv(self, timeout: Optional[float] = None
             ) -> List[Tuple[int, Union[StepResult, FmxError]]]:
        """Results of steps sent with send(): every one that has arrived, waiting up to
        timeout seconds (default: the client's timeout) for at least one.

        Returns [(episode, (obs, reward, terminated, truncated, info))], an
        FmxError in place of the tuple when the server refused the step; []
        when nothing is pending. Raises Timeout when nothing arrived in time.
        """
        wait = self.timeout if timeout is None else timeout
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            with self._lock:
                if not self._steps:
                    return []
                done = [req for req in self._steps if req in self._arrived]
                if done:
                    out: List[Tuple[int, Union[StepResult, FmxError]]] = []
                    for req in done:
                        ep = self._steps.pop(req)
                        reply = self._arrived.pop(req)
                        out.append((ep, _step_result(reply) if reply.get("ok")
                                    else error_from_reply(reply)))
                    return out
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise Timeout(f"none of {len(self._steps)} pending steps answered "
                                  f"within {wait} s")
            self._read_turn(left)

    # ---- the episode log ----

    def step_fields(self) -> List[Dict[str, str]]:
        """The step record's fields in order, as the server defines them: {name, type, doc}."""
        return list(self.spec()["step_fields"])

    def decode_step(self, record: Union[Mapping[str, Any], Sequence[Any]]) -> Dict[str, Any]:
        """A step record (a mapping, or values in step_fields order) as a dict of Python values:
        json fields parsed, int/float/str fields converted, NULL kept as None."""
        return decode_step(self.step_fields(), record)

    def steps(self, episode: Optional[int] = None, db: Optional[str] = None
              ) -> List[Dict[str, Any]]:
        """Every logged step of an episode (default: the current one), in order, decoded.

        db: the SQLite log (default: the path the server reports in health(),
        which must be reachable from here). Opened read-only.
        """
        ep = self._episode(episode)
        return read_steps(db or self.health()["db"], ep, self.step_fields())
