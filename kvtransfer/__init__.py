"""kvtransfer: the KV plane. A prefill rank streams each layer's KV, as soon as it is
computed, straight into a decode rank's paged blocks over NIXL.

- ``layout``: pure maps from (source TP rank/size, destination TP rank/size, blocks) to the
  byte ranges to move, for any TP pair and replicated KV heads.
- ``wire``: the ``kv_transfer_dtype`` rules (fp8 with per-token-per-head scales, or lossless).
- ``agent``: a thin, counted wrapper over one NIXL agent.
- ``endpoint``: what ranks exchange (agent metadata, region addresses) and the notices.
- ``producer`` (prefill side) and ``consumer`` (decode side): layer-wise streaming,
  completion notices, deadlines, dead peers.
"""
