"""The HTTP front door, OpenAI-compatible: request validation, tokenizing, admission, the
KV-aware choice of decode worker, the request plane's links to decode workers, incremental
detokenizing and Prometheus metrics. It depends on the light base only (no torch here).

- ``app`` and ``server``: FastAPI routes on uvicorn, draining.
- ``openai_api``: request bodies checked, responses built.
- ``service``: the router's core below HTTP.
- ``workers``: the request-plane client (links to decode workers, failover).
- ``kv_index``, ``admission``, ``detokenizer``, ``router_metrics``.
"""
