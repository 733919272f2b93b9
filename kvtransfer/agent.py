"""A thin wrapper over one NIXL agent: registration, peers, prepared lists, WRITEs, notices.

Every NIXL call goes through one lock, so the compute thread (posting) and the progress
thread (polling) can share an agent. Every handle it hands out is counted until released,
so a test can assert nothing leaked.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class TransferError(RuntimeError):
    """A WRITE or notice failed: the peer is gone or the transport reported an error."""


def _import_nixl() -> Any:
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as error:
        raise ImportError(
            "kvtransfer needs NIXL: `pip install nixl` (its UCX backend moves DRAM between "
            "processes on CPU and VRAM on CUDA)") from error
    return nixl_agent, nixl_agent_config


# NIXL's UCX progress thread sleeps this long between polls. nixl_agent hard-codes 0, which
# busy-polls a whole core per agent even when idle (an idle 1+1 cluster kept 1.97 of 2 cores
# busy); 100 us costs at most that much per completion and ~3% of a core.
PROGRESS_THREAD_DELAY_US = 100
_create_lock = threading.Lock()


def _create_agent(name: str) -> Any:
    """A NIXL agent over UCX whose progress thread polls every PROGRESS_THREAD_DELAY_US.

    nixl_agent builds its binding config itself and sets ``pthrDelay = 0`` on it; for the
    duration of the constructor its module sees a config class whose ``pthrDelay`` setter
    keeps our delay instead (the only way in without reimplementing nixl_agent)."""
    nixl_agent, nixl_agent_config = _import_nixl()
    api = sys.modules[nixl_agent.__module__]
    base = api.nixlBind.nixlAgentConfig

    class DelayedConfig(base):
        """NIXL's agent config whose ``pthrDelay`` setter stores PROGRESS_THREAD_DELAY_US,
        whatever it is given."""

        pthrDelay = property(base.pthrDelay.__get__,
                             lambda self, _: base.pthrDelay.__set__(self,
                                                                   PROGRESS_THREAD_DELAY_US))

    with _create_lock:
        api.nixlBind.nixlAgentConfig = DelayedConfig
        try:
            return nixl_agent(name, nixl_agent_config(backends=["UCX"]))
        finally:
            api.nixlBind.nixlAgentConfig = base


def _is_nixl_error(error: Exception) -> bool:
    # NIXL's binding errors (nixlRemoteDisconnectError, nixlBackendError, ...) share no
    # public base class across its CUDA flavours; they all come from its _bindings module.
    return type(error).__module__.endswith("_bindings")


class Agent:
    """One NIXL agent: one worker rank's registered KV memory and its peers."""

    def __init__(self, name: str, tensors: Sequence[torch.Tensor]):
        self.name = name
        self._lock = threading.Lock()
        self._nixl = _create_agent(name)
        self._tensors = [t for t in tensors if t.numel() > 0]
        self._registered = self._nixl.register_memory(self._tensors) if self._tensors else None
        self.mem_type = "VRAM" if any(t.is_cuda for t in self._tensors) else "DRAM"
        self.peers: set[str] = set()
        self._dlists: dict[int, tuple[str, Any]] = {}  # id -> (peer or "", handle)
        self._transfers: dict[int, Any] = {}

    @property
    def metadata(self) -> bytes:
        with self._lock:
            return self._nixl.get_agent_metadata()

    @property
    def nixl(self) -> Any:
        """The underlying ``nixl_agent``: for benchmarks that compare against raw NIXL."""
        return self._nixl

    def dlist(self, key: int) -> Any:
        """A prepared list's NIXL handle, by the key ``prepare`` returned."""
        return self._dlists[key][1]

    @property
    def num_live_handles(self) -> int:
        """Prepared lists plus transfers not yet released: zero after a clean shutdown."""
        return len(self._dlists) + len(self._transfers)

    def add_peer(self, metadata: bytes) -> str:
        with self._lock:
            name = self._nixl.add_remote_agent(metadata)
        name = name.decode() if isinstance(name, bytes) else name
        self.peers.add(name)
        return name

    def remove_peer(self, peer: str) -> None:
        """Release the peer's prepared lists and forget it; its transfers must be released
        by the caller first (they fail once the peer is gone)."""
        for key, (owner, _) in list(self._dlists.items()):
            if owner == peer:
                self.release_dlist(key)
        with self._lock:
            if peer in self.peers:
                self._nixl.remove_remote_agent(peer)
                self.peers.discard(peer)

    def prepare(self, peer: str, local: np.ndarray, local_device: int, remote: np.ndarray,
                remote_device: int) -> tuple[int, int]:
        """Prepare the descriptor lists for one peer once: ours and theirs, ``[N, 2]``
        (address, length) each, indexed alike. Returns their keys; both go with the peer."""
        keys = []
        for target, descriptors, device in (("NIXL_INIT_AGENT", local, local_device),
                                            (peer, remote, remote_device)):
            rows = np.empty((len(descriptors), 3), dtype=np.uint64)
            rows[:, :2] = descriptors
            rows[:, 2] = device
            with self._lock:
                handle = self._nixl.prep_xfer_dlist(target, rows, self.mem_type)
            self._dlists[id(handle)] = (peer, handle)
            keys.append(id(handle))
        return keys[0], keys[1]

    def release_dlist(self, key: int) -> None:
        _, handle = self._dlists.pop(key)
        with self._lock:
            self._nixl.release_dlist_handle(handle)

    def write(self, local: int, local_indices: list[int], remote: int,
              remote_indices: list[int]) -> int:
        """Post one WRITE of prepared descriptors; returns the transfer's key at once."""
        try:
            with self._lock:
                handle = self._nixl.make_prepped_xfer(
                    "WRITE", self._dlists[local][1], local_indices, self._dlists[remote][1],
                    remote_indices)
        except Exception as error:
            if _is_nixl_error(error):
                raise TransferError(f"cannot create a WRITE: {error}") from error
            raise
        self._transfers[id(handle)] = handle
        try:
            with self._lock:
                state = self._nixl.transfer(handle)
        except Exception as error:
            if not _is_nixl_error(error):
                raise
            state = "ERR"
        if state == "ERR":
            self.release(id(handle))
            raise TransferError(f"WRITE to {self._dlists[remote][0]} failed to post")
        return id(handle)

    def is_done(self, transfer: int) -> bool:
        """True once the WRITE has completed at the peer; TransferError if it failed."""
        try:
            with self._lock:
                state = self._nixl.check_xfer_state(self._transfers[transfer])
        except Exception as error:
            if not _is_nixl_error(error):
                raise
            state = "ERR"
        if state == "ERR":
            raise TransferError("WRITE failed")
        return state == "DONE"

    def release(self, transfer: int) -> bool:
        """Release a transfer handle; False when NIXL cannot cancel it yet (try again)."""
        handle = self._transfers[transfer]
        try:
            with self._lock:
                self._nixl.release_xfer_handle(handle)
        except Exception as error:
            if not _is_nixl_error(error):
                raise
            return False
        del self._transfers[transfer]
        return True

    def notify(self, peer: str, message: bytes) -> None:
        try:
            with self._lock:
                self._nixl.send_notif(peer, message)
        except Exception as error:
            if _is_nixl_error(error):
                raise TransferError(f"notice to {peer} failed: {error}") from error
            raise

    def notices(self) -> list[tuple[str, bytes]]:
        """New notices as (sender agent name, message), in arrival order per sender."""
        with self._lock:
            new = self._nixl.get_new_notifs()
        return [(name.decode() if isinstance(name, bytes) else name, message)
                for name, messages in new.items() for message in messages]

    def close(self) -> None:
        """Release every transfer and list, drop every peer, deregister memory."""
        for transfer in list(self._transfers):
            self.release(transfer)
        for peer in list(self.peers):
            self.remove_peer(peer)
        for key in list(self._dlists):
            self.release_dlist(key)
        if self._registered is not None:
            with self._lock:
                self._nixl.deregister_memory(self._registered)
            self._registered = None
