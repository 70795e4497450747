"""Several fmx servers behind one client (docs/scale-out.md).

A trainer that steps more episodes than one machine can grade runs one
`fmx serve` per machine and talks to all of them through `Servers` (threads)
or `AsyncServers` (asyncio), with the API of `fmx.Client`/`fmx.AsyncClient`
for episodes:

    with Servers(["tcp://10.0.0.1:5555", "tcp://10.0.0.2:5555"]) as s:
        obs, info = s.reset(task="qwen2/Qwen2MLP")   # placed on the least-loaded server
        s.step({"tool": "get_weight_info", "args": {}}, info["episode"])

Each episode stays on the server that opened it. A new one goes to the
server with the least load: open episodes plus evaluations running and
waiting, as its `health` reports them (asked at most every `refresh_s`
seconds; the episodes placed since count too). Episode ids are this
object's own (1, 2, ...), so ids from two servers never collide; `where(ep)`
says which server holds one and its id there. Each server logs to its own
SQLite file: `fmx episodes merge -o all.db A.db B.db` makes them one log.

Not here: the wire protocol (fmx.client), starting servers.
"""
import asyncio
import itertools
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .aio import AsyncClient
from .client import Action, BadRequest, Client, Info, Observation, StepResult, UnknownEpisode


def _load(health: Dict[str, Any]) -> float:
    return (float(health.get("episodes_open", 0)) + float(health.get("jobs_in_flight", 0))
            + float(health.get("jobs_waiting", 0)))


class _Placement:
    """Least-loaded choice over servers, from health replies at most refresh_s old
    plus the episodes placed on each since."""

    def __init__(self, n: int, refresh_s: float) -> None:
        self.refresh_s = refresh_s
        self.load = [0.0] * n
        self.asked = float("-inf")
        self.ids = itertools.count(1)
        self.episodes: Dict[int, Tuple[int, int]] = {}  # ours -> (server, its id)

    def stale(self) -> bool:
        return time.monotonic() - self.asked >= self.refresh_s

    def update(self, healths: Sequence[Optional[Dict[str, Any]]]) -> None:
        # a server that did not answer is not chosen while another did
        self.load = [_load(h) if h is not None else float("inf") for h in healths]
        self.asked = time.monotonic()

    def choose(self) -> int:
        best = min(range(len(self.load)), key=lambda i: (self.load[i], i))
        self.load[best] += 1
        return best

    def add(self, server: int, episode: int) -> int:
        ours = next(self.ids)
        self.episodes[ours] = (server, episode)
        return ours

    def where(self, ours: int) -> Tuple[int, int]:
        try:
            return self.episodes[int(ours)]
        except KeyError:
            raise UnknownEpisode(f"no episode {ours} was opened through these servers") from None


class _Routed:
    """What both kinds share: the current episode and where an episode lives."""
    addrs: List[str]
    episode: Optional[int]
    _place: _Placement

    def where(self, episode: int) -> Tuple[str, int]:
        """(the address of the server holding the episode, its id there)."""
        server, ep = self._place.where(episode)
        return self.addrs[server], ep

    def _episode(self, episode: Optional[int]) -> int:
        if episode is not None:
            return int(episode)
        if self.episode is None:
            raise BadRequest("no current episode: call reset() first or pass episode=")
        return self.episode


class Servers(_Routed):
    """Several servers, one client each (fmx.Client), episodes placed by load.

    addrs: the servers' addresses; timeout, context: as fmx.Client;
    refresh_s: how old the load figures may get before a reset asks again.
    Thread-safe as fmx.Client is. `episode` is the episode reset() opened last.
    """

    def __init__(self, addrs: Sequence[str], timeout: Optional[float] = 60.0,
                 context: Any = None, refresh_s: float = 1.0) -> None:
        if not addrs:
            raise ValueError("Servers needs at least one address")
        self.addrs = list(addrs)
        self.clients = [Client(a, timeout=timeout, context=context) for a in self.addrs]
        self.episode: Optional[int] = None
        self._place = _Placement(len(self.clients), refresh_s)
        self._lock = threading.Lock()

    def __enter__(self) -> "Servers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disconnect()

    def disconnect(self) -> None:
        for c in self.clients:
            c.disconnect()

    def health(self) -> List[Optional[Dict[str, Any]]]:
        """Each server's health, None for one that did not answer."""
        out: List[Optional[Dict[str, Any]]] = []
        for c in self.clients:
            try:
                out.append(c.health())
            except Exception:  # noqa: BLE001 — a server down is a fact here, not an error
                out.append(None)
        return out

    def list_tasks(self, goals: bool = False) -> List[Dict[str, Any]]:
        """The first server's tasks (servers of one pool serve the same packs)."""
        return self.clients[0].list_tasks(goals=goals)

    def reset(self, task: Optional[str] = None, seed: Optional[int] = None,
              policy: Optional[str] = None, max_steps: Optional[int] = None
              ) -> Tuple[Observation, Info]:
        """Opens an episode on the least-loaded server; info["episode"] is our
        id for it, info["server"] the server's address."""
        with self._lock:
            if self._place.stale():
                self._place.update(self.health())
            server = self._place.choose()
        obs, info = self.clients[server].reset(task=task, seed=seed, policy=policy,
                                               max_steps=max_steps)
        with self._lock:
            ours = self._place.add(server, info["episode"])
            self.episode = ours
        return obs, dict(info, episode=ours, server=self.addrs[server])

    def step(self, action: Action, episode: Optional[int] = None) -> StepResult:
        server, ep = self._place.where(self._episode(episode))
        return self.clients[server].step(action, ep)

    def close(self, episode: Optional[int] = None, grade: bool = False) -> Dict[str, Any]:
        ours = self._episode(episode)
        server, ep = self._place.where(ours)
        reply = self.clients[server].close(ep, grade=grade)
        if ours == self.episode:
            self.episode = None
        return dict(reply, episode=ours) if isinstance(reply, dict) else reply


class AsyncServers(_Routed):
    """Servers for asyncio: one fmx.AsyncClient per server, the same placement."""

    def __init__(self, addrs: Sequence[str], timeout: Optional[float] = 60.0,
                 context: Any = None, refresh_s: float = 1.0) -> None:
        if not addrs:
            raise ValueError("AsyncServers needs at least one address")
        self.addrs = list(addrs)
        self.clients = [AsyncClient(a, timeout=timeout, context=context) for a in self.addrs]
        self.episode: Optional[int] = None
        self._place = _Placement(len(self.clients), refresh_s)
        self._asking: Optional[asyncio.Task] = None

    async def __aenter__(self) -> "AsyncServers":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.disconnect()

    async def disconnect(self) -> None:
        for c in self.clients:
            await c.disconnect()

    async def health(self) -> List[Optional[Dict[str, Any]]]:
        replies = await asyncio.gather(*(c.health() for c in self.clients),
                                       return_exceptions=True)
        return [None if isinstance(r, BaseException) else r for r in replies]

    async def list_tasks(self, goals: bool = False) -> List[Dict[str, Any]]:
        return await self.clients[0].list_tasks(goals=goals)

    async def reset(self, task: Optional[str] = None, seed: Optional[int] = None,
                    policy: Optional[str] = None, max_steps: Optional[int] = None
                    ) -> Tuple[Observation, Info]:
        if self._place.stale():
            # one health round at a time; resets that arrive meanwhile wait for it
            if self._asking is None or self._asking.done():
                self._asking = asyncio.ensure_future(self.health())
            healths = await self._asking
            if self._place.stale():
                self._place.update(healths)
        server = self._place.choose()
        obs, info = await self.clients[server].reset(task=task, seed=seed, policy=policy,
                                                     max_steps=max_steps)
        ours = self._place.add(server, info["episode"])
        self.episode = ours
        return obs, dict(info, episode=ours, server=self.addrs[server])

    async def step(self, action: Action, episode: Optional[int] = None) -> StepResult:
        server, ep = self._place.where(self._episode(episode))
        return await self.clients[server].step(action, ep)

    async def close(self, episode: Optional[int] = None, grade: bool = False) -> Dict[str, Any]:
        ours = self._episode(episode)
        server, ep = self._place.where(ours)
        reply = await self.clients[server].close(ep, grade=grade)
        if ours == self.episode:
            self.episode = None
        return dict(reply, episode=ours) if isinstance(reply, dict) else reply
