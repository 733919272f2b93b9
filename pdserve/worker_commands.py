"""The typed control commands the cluster sends a worker's rank 0 (over Ray), one class each.

A worker's loop thread runs them between steps (``cluster.worker_loop``); the role answers
by the command's type, never by a method name in a string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A rank's KV-plane endpoint as ``kvtransfer.endpoint.Endpoint.to_wire`` writes it: the
# cluster process passes it between workers without importing torch to read it.
EndpointWire = dict[str, Any]


def agent_names(endpoints: list[EndpointWire]) -> list[str]:
    """The NIXL agent names of a group's endpoints, by rank."""
    return [endpoint["agent_name"] for endpoint in endpoints]


@dataclass(frozen=True, slots=True)
class GetStats:
    """Answer with the worker's ``DecodeStats`` or ``PrefillStats``."""


@dataclass(frozen=True, slots=True)
class AddPrefill:
    """Decode: connect to a prefill worker (request plane) and add its ranks' agents."""

    prefill_id: str
    host: str
    port: int
    endpoints: list[EndpointWire]


@dataclass(frozen=True, slots=True)
class LosePrefill:
    """Decode: a prefill worker is dead; fall back its jobs, remove its agents."""

    prefill_id: str


@dataclass(frozen=True, slots=True)
class AddDecode:
    """Prefill: add a decode group's ranks' agents, so jobs may write into them."""

    endpoints: list[EndpointWire]


@dataclass(frozen=True, slots=True)
class LoseDecode:
    """Prefill: a decode worker is dead; drop its queued jobs, remove its agents."""

    agent_names: list[str]
