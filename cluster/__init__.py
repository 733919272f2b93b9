"""The cluster on Ray: the launcher and supervisor, the worker actors and their loop, the
synchronous request-plane facade, and `pdserve serve`.

``from cluster import launch`` starts one; the returned ``Cluster`` generates, streams, reports
typed worker stats and shuts everything down.
"""

from cluster.launcher import Cluster, launch

__all__ = ["Cluster", "launch"]
