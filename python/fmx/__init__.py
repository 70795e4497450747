"""fmx: turn class-based PyTorch models into flat functional programs.

This package holds the Python side of fmx: the exporter that writes task packs
(`python3 -m fmx.export`), a safetensors reader/writer, the clients of the
environment server (`from fmx import Client, AsyncClient`; `Servers`,
`AsyncServers` for several servers) and adapters for
RL trainers (`fmx.adapters`: TRL, verifiers, Gymnasium). It is not the server
(C, under env/) and does not verify candidates.
"""

from typing import Any

__version__ = "0.1.0"

# The client (fmx.client) needs pyzmq and msgpack, which the exporter does not:
# it is imported on first use, so `python3 -m fmx.export` runs without them.
_CLIENT_NAMES = ("Client", "FmxError", "BadMessage", "BadRequest", "UnknownOp", "UnknownTask",
                 "UnknownEpisode", "NotYourEpisode", "EpisodeOver", "ShuttingDown",
                 "InternalError", "Timeout")


def __getattr__(name: str) -> Any:
    if name == "AsyncClient":
        from . import aio
        return aio.AsyncClient
    if name in ("Servers", "AsyncServers"):
        from . import servers
        return getattr(servers, name)
    if name in _CLIENT_NAMES:
        from . import client
        return getattr(client, name)
    raise AttributeError(f"module 'fmx' has no attribute {name!r}")
