"""The prefill worker: it queues prefill jobs from decode workers, batches and chunks their
prompts, and streams each layer's KV into the decode worker's blocks as it is computed.

- ``worker``: rank 0's job queue, admission, batching, and the end of each job's sends.
- ``rank``: one tensor-parallel rank's model runner and the sending side of the KV plane.
- ``commands``: the typed control commands the cluster sends it.
"""
