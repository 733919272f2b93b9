"""A probe that pauses a worker at a chosen point of a chosen request, for the e2e tests.

The cluster hands ``HoldProbe`` to every worker (``launch(config, probe=...)``). It asks the
test's ``Gate`` actor whether to stop only for the request ids it was built with, so other
requests never leave the worker process. The test says ``holds.hold("leaver", 2)``: the
decode loop then stops once "leaver" has sent its chunk with 2 output tokens, until
``holds.release("leaver")``; ``holds.hold("leaver", 2, PREFILL)`` stops a prefill rank once
it posted layer 2 of "leaver". ``CorruptProbe`` flips a landed KV byte before decode checks
it.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import ray

from pdserve.probe import Probe

DECODE, PREFILL = "decode", "prefill"  # where a hold applies


@ray.remote(num_cpus=0, max_concurrency=32)
class Gate:
    """Where held workers wait and the test releases them (threaded: ``arrive`` blocks)."""

    def __init__(self) -> None:
        self._targets: dict[str, tuple[str, int]] = {}
        self._arrived: dict[str, threading.Event] = defaultdict(threading.Event)
        self._released: dict[str, threading.Event] = defaultdict(threading.Event)

    def hold(self, request_id: str, where: str, point: int) -> None:
        self._targets[request_id] = (where, point)
        self._arrived[request_id] = threading.Event()
        self._released[request_id] = threading.Event()

    def should_hold(self, request_id: str, where: str, point: int) -> bool:
        return self._targets.get(request_id) == (where, point)

    def arrive(self, request_id: str) -> None:
        released = self._released[request_id]
        self._arrived[request_id].set()
        released.wait()

    def wait_arrived(self, request_id: str, timeout_s: float) -> bool:
        return self._arrived[request_id].wait(timeout_s)

    def release(self, request_id: str) -> None:
        self._targets.pop(request_id, None)
        self._released[request_id].set()


class HoldProbe(Probe):
    """Stops at ``(request_id, point)`` when the gate says so, for the named requests only."""

    def __init__(self, gate, request_ids: frozenset[str]):
        self.gate = gate
        self.request_ids = request_ids

    def after_output(self, request_id: str, num_output_tokens: int) -> None:
        self._maybe_hold(request_id, DECODE, num_output_tokens)

    def after_layer(self, request_id: str, layer: int) -> None:
        self._maybe_hold(request_id, PREFILL, layer)

    def _maybe_hold(self, request_id: str, where: str, point: int) -> None:
        if request_id in self.request_ids and ray.get(
                self.gate.should_hold.remote(request_id, where, point)):
            ray.get(self.gate.arrive.remote(request_id))


class CorruptProbe(Probe):
    """Flips the last byte of what landed for the named requests on one decode rank, after
    the write and before the check (a NIXL write gone wrong): V of the last layer, in the
    request's last block, which ``kv_transfer_checksum`` checks in every mode."""

    def __init__(self, request_ids: frozenset[str], tp_rank: int):
        self.request_ids = request_ids
        self.tp_rank = tp_rank

    def before_kv_verify(self, request_id: str, tp_rank: int, wire_data,
                         landed_blocks: list[int]) -> None:
        import torch

        if request_id in self.request_ids and tp_rank == self.tp_rank:
            # [heads, block_size, head_dim] of V, last layer, last block
            landed = wire_data[wire_data.shape[0] - 1, 1, landed_blocks[-1]]
            landed.view(torch.uint8).view(-1)[-1] ^= 0x01


class DropNoticeProbe(Probe):
    """Loses the DONE notices of the named requests (every write landed; decode never hears)."""

    def __init__(self, request_ids: frozenset[str]):
        self.request_ids = request_ids

    def drop_notice(self, request_id: str) -> bool:
        return request_id in self.request_ids


class Holds:
    """The test's side: make the probe, hold, wait until held, release."""

    def __init__(self, *request_ids: str):
        self.gate = Gate.remote()
        self.request_ids = frozenset(request_ids)
        self.last = ""  # the latest held request: what wait_holding and release default to

    def probe(self) -> HoldProbe:
        return HoldProbe(self.gate, self.request_ids)

    def hold(self, request_id: str, point: int, where: str = DECODE) -> None:
        if request_id not in self.request_ids:
            raise ValueError(f"{request_id!r} is not one of the probe's {sorted(self.request_ids)}")
        ray.get(self.gate.hold.remote(request_id, where, point))
        self.last = request_id

    def wait_holding(self, request_id: str = "", timeout_s: float = 120.0) -> bool:
        """True once a worker stopped at the point (False: it never got there in time)."""
        return ray.get(self.gate.wait_arrived.remote(request_id or self.last, timeout_s))

    def release(self, request_id: str = "") -> None:
        ray.get(self.gate.release.remote(request_id or self.last))
