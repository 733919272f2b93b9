"""The `pdserve` command: serve a model on a cluster, and build the local test models."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

from pdserve import modelgen
from pdserve.argtypes import int_in
from pdserve.config import DISAGG_MODES, KV_CACHE_DTYPES, KV_TRANSFER_DTYPES, ClusterConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = commands.add_parser("model", help="manage local models")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    create = model_commands.add_parser("create", help="write a deterministic test checkpoint")
    create.add_argument("dir", help="directory to write (must be new or empty)")
    create.add_argument("--size", choices=sorted(modelgen.SIZES), default="tiny")
    create.add_argument("--arch", choices=sorted(modelgen.ARCHS), default="llama")
    create.add_argument("--shards", type=_positive_int, default=1, help="safetensors files")
    create.set_defaults(handler=_create_model)

    serve = commands.add_parser(
        "serve", help="start a cluster and its OpenAI-compatible HTTP server",
        description="With no arguments: the embedded tiny model on a local Ray cluster with one "
                    "prefill and one decode worker, at http://127.0.0.1:8000. Flags override "
                    "--config, which overrides the defaults.")
    serve.add_argument("--model", default=None, help="checkpoint directory (default: the "
                       "embedded model, built once and cached)")
    serve.add_argument("--size", choices=sorted(modelgen.SIZES), default="tiny",
                       help="which embedded model, when --model is not given")
    serve.add_argument("--config", default=None, help="cluster YAML (see docs/cluster.md)")
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=None, help="HTTP port (default 8000)")
    serve.add_argument("--prefill-workers", type=_non_negative_int, default=None)
    serve.add_argument("--decode-workers", type=_positive_int, default=None)
    serve.add_argument("--prefill-tp", type=_positive_int, default=None,
                       help="tensor-parallel ranks per prefill worker")
    serve.add_argument("--decode-tp", type=_positive_int, default=None,
                       help="tensor-parallel ranks per decode worker")
    serve.add_argument("--max-local-prefill-tokens", type=_non_negative_int, default=None,
                       help="a decode worker prefills prompts with up to this many uncached "
                            "tokens itself")
    serve.add_argument("--disagg-mode", choices=DISAGG_MODES, default=None)
    serve.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                       help="both roles' KV pools")
    serve.add_argument("--kv-transfer-dtype", choices=KV_TRANSFER_DTYPES, default=None)
    serve.add_argument("--address", default=None,
                       help="Ray: 'local' (start one here) or 'auto' (join `ray start`)")
    serve.add_argument("--kv-weight", type=float, default=None,
                       help="routing: weight of blocks to prefill against load (0: load only)")
    serve.add_argument("--max-queue", type=_non_negative_int, default=None,
                       help="requests that may wait before the server answers 429")
    serve.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY") or None,
                       help="require 'Authorization: Bearer KEY' (default: $PDSERVE_API_KEY)")
    serve.set_defaults(handler=_serve)

    from bench.main import __doc__ as bench_doc
    from bench.main import add_arguments

    bench = commands.add_parser(
        "bench", help="load an OpenAI-compatible server; latency, throughput, goodput",
        description=bench_doc.split("\n\n")[0])
    add_arguments(bench)
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:
        parser.exit(2, f"pdserve: error: {error}\n")
    except RuntimeError as error:  # e.g. a placement Ray cannot satisfy: said in full
        parser.exit(1, f"pdserve: error: {error}\n")


def _create_model(args: argparse.Namespace) -> int:
    path = modelgen.create_model(args.dir, args.size, args.arch, num_shards=args.shards)
    print(path)
    print(f"parameters: {modelgen.parameter_count(args.size, args.arch)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    # Imported here: serving pulls in ray, which `pdserve model` must not wait for.
    from cluster.serve import serve

    if args.api_key == "":
        raise ValueError("--api-key is empty: give a key, or leave it and PDSERVE_API_KEY unset")
    return serve(cluster_config(args), args.api_key)


def _bench(args: argparse.Namespace) -> int:
    from bench.main import main as bench_main

    return bench_main(args)


def cluster_config(args: argparse.Namespace) -> ClusterConfig:
    """--config (or the defaults), then each flag given on top; ValueError names the field."""
    if args.config:
        config = ClusterConfig.from_yaml(args.config)
        if args.model:
            config = dataclasses.replace(config, model_dir=args.model)
    else:
        model_dir = args.model or str(modelgen.ensure_default_model(args.size))
        config = ClusterConfig(model_dir=model_dir)
    data = config.to_dict()
    for flag, (section, key) in _FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            (data[section] if section else data)[key] = value
    if args.kv_cache_dtype is not None:
        data["decode"]["kv_cache_dtype"] = data["prefill"]["kv_cache_dtype"] = \
            args.kv_cache_dtype
    return ClusterConfig.from_dict(data)


# flag -> (config section, field)
_FLAGS = {
    "host": ("router", "host"), "port": ("router", "port"),
    "kv_weight": ("router", "kv_weight"), "max_queue": ("router", "max_queue"),
    "prefill_workers": ("prefill", "num_workers"), "decode_workers": ("decode", "num_workers"),
    "prefill_tp": ("prefill", "tensor_parallel_size"),
    "decode_tp": ("decode", "tensor_parallel_size"),
    "max_local_prefill_tokens": ("decode", "max_local_prefill_tokens"),
    "disagg_mode": ("decode", "disagg_mode"),
    "kv_transfer_dtype": ("", "kv_transfer_dtype"), "address": ("", "address"),
}


_positive_int, _non_negative_int, _port = int_in(1), int_in(0), int_in(0, 65535)


if __name__ == "__main__":
    sys.exit(main())
