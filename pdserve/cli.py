"""The `pdserve` command: build the local test models and start the demo server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pdserve import modelgen


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

    serve = commands.add_parser("serve", help="start the demo cluster")
    serve.add_argument("--model", default=None, help="checkpoint directory (default: built-in)")
    serve.add_argument("--size", choices=sorted(modelgen.SIZES), default="tiny")
    serve.set_defaults(handler=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:
        parser.exit(2, f"pdserve: error: {error}\n")


def _create_model(args: argparse.Namespace) -> int:
    path = modelgen.create_model(args.dir, args.size, args.arch, num_shards=args.shards)
    print(path)
    print(f"parameters: {modelgen.parameter_count(args.size, args.arch)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    # Imported here: serving pulls in torch and ray, which `pdserve model` must not wait for.
    from pdserve.demo import run_demo

    return run_demo(args)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
