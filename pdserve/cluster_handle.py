"""What the router may know of and call on the cluster it fronts: a typed handle.

The router depends on the light base only, so it cannot import the Ray cluster. The cluster
(``cluster.launcher.Cluster``) satisfies ``ClusterHandle``; so can anything else that starts
decode workers (a test, another launcher). The handle carries what the cluster already read
from the checkpoint, so the router does not read it again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec

from pdserve.protocol import Fingerprint
from pdserve.worker_stats import WorkerStats


class ModelInfo(msgspec.Struct, frozen=True):
    """The served model as the router needs it: where its tokenizer is, its vocabulary,
    the longest request every decode worker takes, and the cluster's block size."""

    model_dir: str
    vocab_size: int
    max_model_len: int
    block_size: int


class WorkerAddress(msgspec.Struct, frozen=True):
    """A decode worker's request-plane address under its current worker id."""

    worker_id: str
    host: str
    port: int


OnAdded = Callable[[WorkerAddress], None]
OnRemoved = Callable[[str], None]


class ClusterHandle(Protocol):
    """The router's view of a running cluster."""

    @property
    def model(self) -> ModelInfo: ...

    @property
    def fingerprint(self) -> Fingerprint: ...

    @property
    def secret(self) -> str: ...

    @property
    def max_running(self) -> int:
        """Requests the decode workers take at once (every worker's ``max_num_seqs``)."""
        ...

    def decode_addresses(self) -> list[WorkerAddress]: ...

    def watch_decodes(self, added: OnAdded, removed: OnRemoved) -> None:
        """Be told (on a thread the callbacks must not block) when a decode worker is
        replaced: ``removed`` with the dead worker's id, then ``added`` with its successor."""
        ...

    def unwatch_decodes(self, added: OnAdded, removed: OnRemoved) -> None: ...

    def worker_stats(self) -> list[WorkerStats]:
        """Every worker's latest stats (blocking: call it off the event loop)."""
        ...
