"""The decode worker: it owns every request it is given, decides per request whether to
prefill locally or on a prefill worker, receives remote KV, and decodes all its requests in
one continuous batch.

- ``worker``: rank 0's request handling, the local-vs-remote path, fallbacks and stale blocks.
- ``decision``: the local-vs-remote policy (DESIGN.md, request path step 3).
- ``rank``: one tensor-parallel rank's model runner and the receiving side of the KV plane.
- ``events``: KV events and load published to the router.
- ``commands``: the typed control commands the cluster sends it.
"""
