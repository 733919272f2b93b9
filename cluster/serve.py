"""`pdserve serve`: launch the cluster, serve HTTP in front of it, shut down on the way out."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pdserve.config import ClusterConfig


def serve(config: ClusterConfig, api_key: str | None) -> int:
    from cluster.launcher import launch
    from router.server import serve_forever

    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"pdserve: model {config.model_dir}; starting {config.decode.num_workers} decode "
          f"and {config.prefill.num_workers} prefill workers on Ray ({config.address})",
          flush=True)
    started = time.perf_counter()
    cluster = launch(config)
    try:
        print(f"pdserve: cluster up in {time.perf_counter() - started:.1f} s", flush=True)
        serve_forever(cluster, config.router, api_key,
                      on_started=lambda server: print(banner(config, api_key), flush=True))
    finally:
        print("pdserve: shutting the cluster down", flush=True)
        cluster.shutdown()
    return 0


def banner(config: ClusterConfig, api_key: str | None) -> str:
    router = config.router
    host = "127.0.0.1" if router.host in ("0.0.0.0", "::") else router.host
    url = f"http://{host}:{router.port}"
    model = router.served_model_name or Path(config.model_dir).name  # as the router says
    auth = " -H 'Authorization: Bearer $PDSERVE_API_KEY'" if api_key else ""
    return (
        f"pdserve: serving '{model}' at {url} (OpenAI-compatible; Ctrl-C to stop)\n"
        f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} \\\n"
        f"    -d '{{\"model\": \"{model}\", \"prompt\": \"Once upon a time\", "
        f"\"max_tokens\": 16}}'\n"
        f"  python: from pdserve import Client; "
        f"print(Client('{url}').complete('Once upon a time').text)\n"
        f"  openai: OpenAI(base_url='{url}/v1', api_key='{api_key and '...' or 'none'}')\n"
        f"  metrics: {url}/metrics   health: {url}/health")
