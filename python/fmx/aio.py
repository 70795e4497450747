"""fmx.aio — the asyncio client of the fmx environment server.

`AsyncClient` has the sync client's calls (fmx.client.Client) as coroutines,
over one ZeroMQ DEALER socket (pyzmq's zmq.asyncio). One reader task matches
every reply to its request by the protocol's `req` number, so any number of
episodes can be in flight from one event loop:

    from fmx import AsyncClient
    async with AsyncClient("ipc:///tmp/fmx.sock") as env:
        opened = await asyncio.gather(*(env.reset(task=t) for t in tasks))
        results = await asyncio.gather(
            *(env.step(action, info["episode"]) for (_obs, info), action in zip(opened, actions)),
            return_exceptions=True)   # an FmxError in place of a refused step

A client belongs to the event loop that first used it. Not here: the
protocol's error types and the step-record decoder (fmx.client), the server.
"""
from __future__ import annotations

import asyncio
import itertools
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import msgpack
import zmq
import zmq.asyncio

from .client import (DEFAULT_ADDR, Action, BadMessage, BadRequest, Client, FmxError, Info,
                     Observation, StepResult, Timeout, _step_result, decode_step,
                     error_from_reply, read_steps)


class AsyncClient:
    """One connection to an fmx server, for asyncio.

    addr, timeout: as fmx.Client (timeout: seconds per reply, None waits
    forever; on expiry a call raises Timeout). `episode` is the episode the
    last reset() opened (the default of step and close).
    """

    def __init__(self, addr: str = DEFAULT_ADDR, timeout: Optional[float] = 60.0,
                 context: Optional[zmq.asyncio.Context] = None) -> None:
        self.addr = addr
        self.timeout = timeout
        self.episode: Optional[int] = None
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(addr)
        self._reqs = itertools.count(1)
        self._waiting: Dict[int, asyncio.Future] = {}
        self._reader: Optional[asyncio.Task] = None
        self._spec: Optional[Dict[str, Any]] = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.disconnect()

    async def disconnect(self) -> None:
        """Stops the reader and closes the socket; waiting calls get Timeout."""
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
            self._reader = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(Timeout(f"the client of {self.addr} was disconnected"))
        self._waiting.clear()
        if not self._sock.closed:
            self._sock.close(linger=0)

    async def _read_loop(self) -> None:
        while True:
            frame = await self._sock.recv()
            reply = msgpack.unpackb(frame, raw=False)
            req = reply.get("req") if isinstance(reply, dict) else None
            if not isinstance(req, int):
                err = error_from_reply(reply) if isinstance(reply, dict) else BadMessage(
                    "the server sent something that is not a msgpack map")
                for fut in self._waiting.values():
                    if not fut.done():
                        fut.set_exception(err)
                continue
            fut = self._waiting.pop(req, None)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def request(self, op: str, **fields: Any) -> Dict[str, Any]:
        """Sends one request and returns its reply map (ok replies only).

        Raises the FmxError subclass of an error reply, or Timeout.
        """
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        req = next(self._reqs)
        body = dict(fields)
        body.update(op=op, req=req)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[req] = fut
        await self._sock.send(msgpack.packb(body, use_bin_type=True))
        try:
            reply = await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            self._waiting.pop(req, None)
            raise Timeout(f"no reply to request {req} from {self.addr} within {self.timeout} s")
        if not reply.get("ok"):
            raise error_from_reply(reply)
        del reply["req"]
        return reply

    # ---- the protocol's ops (as fmx.Client) ----

    async def hello(self) -> Dict[str, Any]:
        return await self.request("hello")

    async def spec(self) -> Dict[str, Any]:
        if self._spec is None:
            self._spec = await self.request("spec")
        return self._spec

    async def health(self) -> Dict[str, Any]:
        return await self.request("health")

    async def list_tasks(self, goals: bool = False) -> List[Dict[str, Any]]:
        return (await self.request("list_tasks", **({"goals": True} if goals else {})))["tasks"]

    async def reset(self, task: Optional[str] = None, seed: Optional[int] = None,
                    policy: Optional[str] = None, max_steps: Optional[int] = None
                    ) -> Tuple[Observation, Info]:
        reply = await self.request("reset", **Client._reset_fields(task, seed, policy, max_steps))
        self.episode = int(reply["episode"])
        info = dict(reply["info"])
        info["episode"] = int(reply["episode"])
        return reply["observation"], info

    async def step(self, action: Action, episode: Optional[int] = None) -> StepResult:
        reply = await self.request("step", episode=self._episode(episode), action=dict(action))
        return _step_result(reply)

    async def close(self, episode: Optional[int] = None, grade: bool = False) -> Dict[str, Any]:
        ep = self._episode(episode)
        reply = await self.request("close", episode=ep, **({"grade": True} if grade else {}))
        if ep == self.episode:
            self.episode = None
        return reply

    def _episode(self, episode: Optional[int]) -> int:
        if episode is not None:
            return int(episode)
        if self.episode is None:
            raise BadRequest("no current episode: call reset() first or pass episode=")
        return self.episode

    async def reset_many(self, tasks: Union[int, Sequence[Optional[str]]],
                         seed: Optional[int] = None, policy: Optional[str] = None,
                         max_steps: Optional[int] = None) -> List[Tuple[int, Observation, Info]]:
        """Opens several episodes at once; [(episode, observation, info)] in the order asked.
        Raises the first error (the episodes that did open stay open)."""
        ids: Sequence[Optional[str]] = [None] * tasks if isinstance(tasks, int) else tasks
        fields = [Client._reset_fields(t, seed, policy, max_steps) for t in ids]
        replies = await asyncio.gather(*(self.request("reset", **f) for f in fields),
                                       return_exceptions=True)
        for r in replies:
            if isinstance(r, BaseException):
                raise r
        return [(int(r["episode"]), r["observation"], dict(r["info"], episode=int(r["episode"])))
                for r in replies]

    async def step_many(self, actions: Sequence[Action], episode_ids: Sequence[int]
                        ) -> List[Tuple[int, Union[StepResult, FmxError]]]:
        """One step per (action, episode), all in flight at once; [(episode, result or
        FmxError)] in the order given."""
        if len(actions) != len(episode_ids):
            raise ValueError(f"{len(actions)} actions for {len(episode_ids)} episodes")
        results = await asyncio.gather(*(self.step(a, ep) for a, ep in zip(actions, episode_ids)),
                                       return_exceptions=True)
        out: List[Tuple[int, Union[StepResult, FmxError]]] = []
        for ep, r in zip(episode_ids, results):
            if isinstance(r, BaseException) and not isinstance(r, FmxError):
                raise r
            out.append((int(ep), r))
        return out

    # ---- the episode log ----

    async def step_fields(self) -> List[Dict[str, str]]:
        return list((await self.spec())["step_fields"])

    async def decode_step(self, record: Union[Mapping[str, Any], Sequence[Any]]
                          ) -> Dict[str, Any]:
        return decode_step(await self.step_fields(), record)

    async def steps(self, episode: Optional[int] = None, db: Optional[str] = None
                    ) -> List[Dict[str, Any]]:
        """Every logged step of an episode (default: the current one), decoded; db: the log
        (default: the path health() reports). Read in a thread: the loop is not blocked."""
        ep = self._episode(episode)
        path = db or (await self.health())["db"]
        fields = await self.step_fields()
        return await asyncio.get_running_loop().run_in_executor(None, read_steps, path, ep, fields)
