"""The `pdserve` command: serve a model on a cluster, and build the local test models."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from enum import Enum
from typing import NamedTuple

from pdserve import modelgen
from pdserve.argtypes import checked, int_in
from pdserve.choices import FieldSpec, choice_values
from pdserve.config import ClusterConfig, cluster_fields


class ConfigFlag(NamedTuple):
    """A `pdserve serve` flag that config fields ask for (``flag=`` in their setting)."""

    paths: tuple[str, ...]  # the fields it sets: --kv-cache-dtype sets both roles' pools
    spec: FieldSpec  # the first field's: its type, bounds, choices, help and default


def config_flags() -> dict[str, ConfigFlag]:
    """Every flag the cluster config's fields ask for, in field order."""
    flags: dict[str, ConfigFlag] = {}
    for path, spec in cluster_fields():
        if spec.flag is None:
            continue
        paths, first = flags.get(spec.flag, ((), spec))
        if (spec.kind, spec.choices) != (first.kind, first.choices):
            raise RuntimeError(f"{spec.flag} is on fields that take different values: "
                               f"{paths[0]} and {path}")
        flags[spec.flag] = ConfigFlag((*paths, path), first)
    return flags


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
    train = model_commands.add_parser(
        "train", help="train a target/draft pair on Python's standard library (~10 min)",
        description="Train a small Llama target and a smaller draft with the same tokenizer on "
                    "the running interpreter's standard library, for quality and speculative-"
                    "decoding benchmarks (engine/train.py). Without DIR the pair is cached in "
                    "the pdserve home and trained only once.")
    train.add_argument("dir", nargs="?", default=None,
                       help="directory to write target/ and draft/ into (new or empty)")
    train.add_argument("--steps", type=_positive_int, default=None,
                       help="optimizer steps of each model (default: TrainSpec's)")
    train.add_argument("--seed", type=int_in(0), default=None,
                       help="seed of the weights and the batch order (default: TrainSpec's)")
    train.set_defaults(handler=_train_models)

    serve = commands.add_parser(
        "serve", help="start a cluster and its OpenAI-compatible HTTP server",
        description="With no arguments: the embedded tiny model on a local Ray cluster with one "
                    "prefill and one decode worker, at http://127.0.0.1:8000. Flags override "
                    "--config, which overrides the defaults.")
    serve.add_argument("--config", default=None, help="cluster YAML (see docs/cluster.md)")
    serve.add_argument("--size", choices=sorted(modelgen.SIZES), default="tiny",
                       help="which embedded model, when --model is not given")
    for flag, config_flag in config_flags().items():
        _add_config_flag(serve, flag, config_flag)
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


def _train_models(args: argparse.Namespace) -> int:
    # Imported here: training needs torch, which the light base must not load.
    import json
    import logging
    from pathlib import Path

    from engine.train import TrainSpec, ensure_trained_pair, train_pair

    given = {name: getattr(args, name) for name in ("steps", "seed")}
    spec = TrainSpec(**{name: value for name, value in given.items() if value is not None})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.dir is None:
        paths = ensure_trained_pair(spec)
    elif Path(args.dir).exists() and any(Path(args.dir).iterdir()):
        raise ValueError(f"{args.dir!r} is not empty: give a new or empty directory")
    else:
        paths = train_pair(args.dir, spec)
    for name, path in zip(("target", "draft"), paths, strict=True):
        record = json.loads((path / "training.json").read_text(encoding="utf-8"))
        print(f"{name}: {path}")
        print(f"  held-out loss {record['heldout_loss']:.4f} nats/token (perplexity "
              f"{record['heldout_perplexity']:.3f}), {record['num_parameters']:,} parameters, "
              f"trained in {record['wall_time_s']} s")
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
    else:
        model_dir = args.model or str(modelgen.ensure_default_model(args.size))
        config = ClusterConfig(model_dir=model_dir)
    data = config.to_dict()
    for flag, (paths, _) in config_flags().items():
        value = getattr(args, _dest(flag))
        if value is None:
            continue
        for path in paths:
            section, _, key = path.rpartition(".")
            (data[section] if section else data)[key] = value
    return ClusterConfig.from_dict(data)


def _add_config_flag(parser: argparse.ArgumentParser, flag: str, config_flag: ConfigFlag) -> None:
    """The flag as its fields' spec says: the same check, choices from the same table."""
    paths, spec = config_flag
    default = f"; default {_plain(spec.default)}" if spec.has_default else ""
    options = {"dest": _dest(flag), "default": None,
               "help": f"{spec.help} ({', '.join(paths)}{default})"}
    if spec.kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
    elif spec.kind in (int, float, str) or spec.choices is not None:
        metavar = ({int: "N", float: "X"}.get(spec.kind) if spec.choices is None
                   else f"{{{','.join(choice_values(spec.choices))}}}")
        parser.add_argument(flag, type=checked(spec.kind, spec.problem), metavar=metavar,
                            **options)
    else:
        raise RuntimeError(f"{flag}: {paths[0]} takes a {spec.kind.__name__}, which has no "
                           f"flag form")


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _plain(value: object) -> object:
    return value.value if isinstance(value, Enum) else value


_positive_int = int_in(1)


if __name__ == "__main__":
    sys.exit(main())
