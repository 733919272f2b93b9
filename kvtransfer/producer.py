"""The prefill side of the KV plane: stream each layer's KV into decode ranks as it is computed.

The compute thread calls ``begin``, then ``send_layer`` after each layer (it quantizes into
the send buffer when the pool is not fp8, and returns at once), then ``finish``. A progress
thread posts the WRITEs, polls them, and notifies the destination's rank 0 only once every
write of the request has completed (a notice says nothing about other transfers); results
come back through ``poll``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from engine.kv_cache import KVCache, quantize_fp8
from kvtransfer.agent import Agent, TransferError
from kvtransfer.checksum import BlockDigest, RegionBytes, digest_route, selected
from kvtransfer.endpoint import Destination, Endpoint, Notice, NoticeKind, WireRegion
from kvtransfer.layout import HeadRoute, head_routes, layer_indices, routes_from
from pdserve.choices import KVChecksum
from pdserve.probe import Probe

logger = logging.getLogger(__name__)

# While writes are in flight the progress thread checks them this often; idle, it wakes this
# often only to enforce deadlines.
_BUSY_POLL_S = 0.0002
_IDLE_POLL_S = 0.05
_QUANTIZE_BLOCKS = 8


class SendResult(NamedTuple):
    """How one request's send ended; ``reason`` is empty when ``ok``."""

    request_id: str
    attempt: int
    ok: bool
    reason: str
    num_bytes: int


@dataclass(slots=True)
class _Peer:
    endpoint: Endpoint
    route: HeadRoute | None  # None: this rank writes nothing into that rank
    local_list: int = 0
    remote_list: int = 0


@dataclass(slots=True)
class _Session:
    request_id: str
    attempt: int
    destination: Destination
    wire_blocks: list[int]  # in this rank's wire region (pool blocks or send-buffer slots)
    deadline: float
    in_flight: list[int] = field(default_factory=list)
    num_bytes: int = 0
    digests: list[BlockDigest] = field(default_factory=list)  # of what was posted
    is_finishing: bool = False
    is_cancelled: bool = False
    failure: str = ""


class KVProducer:
    """One prefill rank's sender: an agent over its pool (and send buffer), its peers (decode
    ranks), and a progress thread; with ``kv_transfer_checksum`` on, the DONE notice carries
    digests of the wire bytes it posted (``kvtransfer/checksum.py``)."""

    def __init__(self, kv_cache: KVCache, *, agent_name: str, tp_rank: int, tp_size: int,
                 num_kv_heads: int, kv_transfer_dtype: str = "fp8", send_buffer_blocks: int = 256,
                 kv_transfer_checksum: KVChecksum = KVChecksum.OFF, probe: Probe | None = None):
        self.kv_cache = kv_cache
        self.probe = probe or Probe()
        self.tp_rank, self.tp_size, self.num_kv_heads = tp_rank, tp_size, num_kv_heads
        self.region = WireRegion(kv_cache, kv_transfer_dtype, send_buffer_blocks)
        self.checksum = kv_transfer_checksum
        self._wire_bytes = RegionBytes(self.region.data, self.region.scales,
                                       self.region.geometry)
        self.agent = Agent(agent_name, self.region.registered_tensors(kv_cache))
        self._peers: dict[str, _Peer] = {}
        # compute thread: request -> (pool blocks, wire blocks: the same or send-buffer slots)
        self._open: dict[str, tuple[list[int], list[int]]] = {}
        self._slots_lock = threading.Lock()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._sessions: dict[str, _Session] = {}  # progress thread only
        # Ended sessions whose caller has not called finish/cancel yet: the compute thread
        # may still quantize into their send-buffer slots, so those stay allocated.
        self._unclosed: dict[str, list[int]] = {}  # progress thread only
        self._thread = threading.Thread(target=self._run, name=f"kv-send-{agent_name}",
                                        daemon=True)
        self._thread.start()

    def endpoint(self) -> Endpoint:
        return self.region.endpoint(self.agent.name, self.agent.metadata, self.tp_rank,
                                    self.tp_size, self.num_kv_heads)

    # -- peers ------------------------------------------------------------------------------

    def add_peer(self, peer: Endpoint) -> None:
        """Meet a decode rank: load its agent, prepare both descriptor lists once."""
        mine = self.region.geometry
        theirs = peer.geometry
        if peer.num_kv_heads != self.num_kv_heads:
            raise ValueError(f"peer {peer.agent_name} has num_kv_heads={peer.num_kv_heads}, "
                             f"this rank {self.num_kv_heads}")
        for name in ("num_layers", "block_size", "head_dim", "element_size", "has_scales"):
            if getattr(mine, name) != getattr(theirs, name):
                raise ValueError(f"peer {peer.agent_name} has {name}={getattr(theirs, name)}, "
                                 f"this rank's wire has {getattr(mine, name)}")
        if peer.agent_name in self._peers:
            raise ValueError(f"peer {peer.agent_name} already added: a restarted worker "
                             "needs a new agent name")
        routes = head_routes(self.num_kv_heads, self.tp_size, peer.tp_size)
        entry = _Peer(peer, routes_from(routes, self.tp_rank).get(peer.tp_rank))
        self.agent.add_peer(peer.metadata)
        if entry.route is not None:
            local = self.endpoint()
            entry.local_list, entry.remote_list = self.agent.prepare(
                peer.agent_name, local.descriptors(entry.route.src_local, entry.route.num_heads),
                local.device_id,
                peer.descriptors(entry.route.dst_local, entry.route.num_heads), peer.device_id)
        self._peers[peer.agent_name] = entry

    def remove_peer(self, agent_name: str, timeout_s: float = 60.0) -> None:
        """Forget a dead or restarted decode rank: its requests fail, its handles go."""
        done = threading.Event()
        self._commands.put(("remove", agent_name, done))
        if not done.wait(timeout_s):
            raise RuntimeError(f"the progress thread did not remove {agent_name} in "
                               f"{timeout_s} s")

    # -- the compute thread's calls ---------------------------------------------------------

    def begin(self, request_id: str, attempt: int, destination: Destination,
              src_blocks: list[int], timeout_s: float) -> bool:
        """Open a request's send; False when the send buffer is short (try later)."""
        unknown = [a for a in destination.agents if a not in self._peers]
        if unknown:
            raise ValueError(f"destination agents {unknown} were never added as peers")
        if len(src_blocks) != len(destination.block_ids):
            raise ValueError(f"{len(src_blocks)} source blocks for "
                             f"{len(destination.block_ids)} destination blocks")
        if request_id in self._open:
            raise ValueError(f"request {request_id!r} is already being sent")
        wire_blocks = list(src_blocks)
        if self.region.slots is not None:
            with self._slots_lock:
                slots = self.region.slots.allocate(len(src_blocks))
            if slots is None:
                return False
            wire_blocks = slots
        self._open[request_id] = (list(src_blocks), wire_blocks)
        session = _Session(request_id, attempt, destination, wire_blocks,
                           time.monotonic() + timeout_s)
        self._commands.put(("begin", session))
        return True

    def send_layer(self, request_id: str, layer: int, first_block: int = 0,
                   num_blocks: int | None = None) -> None:
        """Post ``layer``'s KV of blocks ``[first_block, first_block + num_blocks)`` of the
        request (all by default). Call once the layer's KV is in the pool; returns at once."""
        pool_blocks, wire_blocks = self._open[request_id]
        count = len(wire_blocks) - first_block if num_blocks is None else num_blocks
        if not self.region.is_pool:
            self._quantize(layer, pool_blocks[first_block:first_block + count],
                           wire_blocks[first_block:first_block + count])
        ready = None
        if self.kv_cache.data.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        self._commands.put(("post", request_id, layer, first_block, count, ready))

    def finish(self, request_id: str) -> None:
        """Every layer is posted: the notice follows once every write has completed.

        Every ``begin`` ends with ``finish`` or ``cancel``, even after a failed result."""
        self._close(request_id)
        self._commands.put(("finish", request_id))

    def cancel(self, request_id: str) -> None:
        """Stop sending; a CANCELLED notice follows once nothing is in flight."""
        self._close(request_id)
        self._commands.put(("cancel", request_id))

    def withdraw(self, request_id: str) -> None:
        """Undo a ``begin`` before any ``send_layer``: no write, no notice, no result (a
        tensor-parallel group withdraws when another rank's send buffer was short)."""
        self._close(request_id)
        self._commands.put(("withdraw", request_id))

    def poll(self, timeout_s: float = 0.0) -> list[SendResult]:
        """Sends that ended since the last call; waits up to ``timeout_s`` for the first."""
        results = []
        if timeout_s > 0:
            try:
                results.append(self._results.get(timeout=timeout_s))
            except queue.Empty:
                return results
        while True:
            try:
                results.append(self._results.get_nowait())
            except queue.Empty:
                return results

    def close(self) -> None:
        self._commands.put(("stop",))
        self._thread.join()
        self.agent.close()

    @property
    def num_free_send_blocks(self) -> int | None:
        return None if self.region.slots is None else self.region.slots.num_free

    def _close(self, request_id: str) -> None:
        self._open.pop(request_id, None)

    def _quantize(self, layer: int, pool_blocks: list[int], slots: list[int]) -> None:
        device = self.kv_cache.data.device
        # A few blocks at a time: the temporaries stay small and cache-resident (whole-layer
        # temporaries of megabytes cost more in page faults than in arithmetic on CPU).
        for start in range(0, len(pool_blocks), _QUANTIZE_BLOCKS):
            index = torch.tensor(pool_blocks[start:start + _QUANTIZE_BLOCKS], device=device)
            target = torch.tensor(slots[start:start + _QUANTIZE_BLOCKS], device=device)
            # [2, n, heads, block_size, head_dim] -> fp8 and [2, n, heads, block_size] scales
            q, scale = quantize_fp8(self.kv_cache.data[layer].index_select(1, index))
            # (index_copy_ has no fp8 kernel on CPU; the bytes are what matter)
            self.region.data[layer].view(torch.uint8).index_copy_(1, target,
                                                                  q.view(torch.uint8))
            self.region.scales[layer].index_copy_(1, target, scale)

    # -- the progress thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            busy = any(s.in_flight for s in self._sessions.values())
            try:
                command = self._commands.get(timeout=_BUSY_POLL_S if busy else _IDLE_POLL_S)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    self._stop()
                    return
                self._guarded(self._handle, command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            self._guarded(self._progress)

    def _guarded(self, step, *args) -> None:
        """A bug in one step must not kill the thread every transfer depends on: fail the
        open sessions (their callers hear of it) and carry on."""
        try:
            step(*args)
        except Exception:
            logger.exception("KV send progress failed")
            for session in self._sessions.values():
                session.failure = session.failure or "internal error in the progress thread"

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "begin":
            session = command[1]
            self._sessions[session.request_id] = session
        elif kind == "post":
            self._post(*command[1:])
        elif kind in ("finish", "cancel"):
            session = self._sessions.get(command[1])
            if session is not None:
                session.is_finishing = True
                session.is_cancelled = kind == "cancel"
            elif command[1] in self._unclosed:
                self._free_slots(self._unclosed.pop(command[1]))
        elif kind == "withdraw":
            session = self._sessions.pop(command[1], None)
            if session is not None:
                if session.in_flight:
                    raise RuntimeError(f"request {command[1]!r} withdrawn after a send_layer")
                self._free_slots(session.wire_blocks)
        elif kind == "remove":
            self._remove_peer(command[1])
            command[2].set()

    def _post(self, request_id: str, layer: int, first_block: int, count: int,
              ready: torch.cuda.Event | None) -> None:
        session = self._sessions.get(request_id)
        if session is None or session.failure or session.is_cancelled:
            return
        if ready is not None:
            ready.synchronize()
        src = session.wire_blocks[first_block:first_block + count]
        dst = list(session.destination.block_ids[first_block:first_block + count])
        geometry = self.region.geometry
        checked = selected(self.checksum, request_id, layer,
                           range(first_block, first_block + count), geometry.num_layers,
                           len(session.wire_blocks))
        for agent_name in session.destination.agents:
            peer = self._peers.get(agent_name)
            if peer is None:
                session.failure = f"peer {agent_name} removed"
                return
            if peer.route is None:
                continue
            try:
                transfer = self.agent.write(
                    peer.local_list, layer_indices(geometry, layer, src),
                    peer.remote_list, layer_indices(peer.endpoint.geometry, layer, dst))
            except TransferError as error:
                session.failure = str(error)
                return
            session.in_flight.append(transfer)
            data_bytes, scale_bytes = geometry.head_bytes
            session.num_bytes += 2 * len(src) * peer.route.num_heads * (data_bytes + scale_bytes)
            # while the write is in flight; the source bytes no longer change
            session.digests += digest_route(self._wire_bytes, peer.route, layer, checked,
                                            session.wire_blocks)

    def _progress(self) -> None:
        now = time.monotonic()
        for session in list(self._sessions.values()):
            still = []
            for transfer in session.in_flight:
                try:
                    if not self.agent.is_done(transfer):
                        still.append(transfer)
                        continue
                except TransferError as error:
                    session.failure = session.failure or str(error)
                if not self.agent.release(transfer):
                    still.append(transfer)
            session.in_flight = still
            if now > session.deadline and not session.failure:
                session.failure = "deadline passed"
                session.in_flight = [t for t in still if not self.agent.release(t)]
            if session.in_flight or not (session.is_finishing or session.failure):
                continue
            self._complete(session)

    def _complete(self, session: _Session) -> None:
        """Nothing of the request is in flight any more: notify, free, report."""
        del self._sessions[session.request_id]
        if session.is_cancelled:
            kind, reason = NoticeKind.CANCELLED, "cancelled"
        elif session.failure:
            kind, reason = NoticeKind.FAILED, session.failure
        else:
            kind, reason = NoticeKind.DONE, ""
        notice = Notice(kind, session.request_id, session.attempt, self.tp_rank,
                        session.num_bytes,
                        tuple(session.digests) if kind is NoticeKind.DONE else ())
        receiver = session.destination.agents[0]
        if kind is NoticeKind.DONE and self.probe.drop_notice(session.request_id):
            logger.warning("request %s: DONE notice dropped (test probe)", session.request_id)
        elif receiver in self._peers:
            try:
                self.agent.notify(receiver, notice.encode())
            except TransferError as error:
                kind, reason = NoticeKind.FAILED, reason or str(error)
        elif kind is NoticeKind.DONE:
            kind, reason = NoticeKind.FAILED, f"peer {receiver} removed"
        if session.is_finishing:
            self._free_slots(session.wire_blocks)
        else:
            self._unclosed[session.request_id] = session.wire_blocks
        if kind is not NoticeKind.DONE:
            logger.debug("request %s attempt %d: send ended: %s", session.request_id,
                         session.attempt, reason)
        self._results.put(SendResult(session.request_id, session.attempt,
                                     kind is NoticeKind.DONE, reason, session.num_bytes))

    def _free_slots(self, wire_blocks: list[int]) -> None:
        if self.region.slots is not None:
            with self._slots_lock:
                self.region.slots.free(wire_blocks)

    def _remove_peer(self, agent_name: str) -> None:
        for session in self._sessions.values():
            if agent_name in session.destination.agents:
                session.failure = session.failure or f"peer {agent_name} removed"
                session.in_flight = [t for t in session.in_flight if not self.agent.release(t)]
        self._peers.pop(agent_name, None)
        self.agent.remove_peer(agent_name)
        self._progress()

    def _stop(self) -> None:
        for session in list(self._sessions.values()):
            session.failure = session.failure or "producer closed"
            session.in_flight = [t for t in session.in_flight if not self.agent.release(t)]
            session.is_finishing = True
            self._complete(session)
