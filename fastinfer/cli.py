"""``fastinfer`` command line: it only fills in a Config and hands it over."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from fastinfer.config import Config
from fastinfer.errors import FastInferError


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float}.get(str(f.type), str)
        help_text = f.metadata.get("help", "")
        if str(f.type).startswith("tuple"):
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"{help_text} (env FASTINFER_{f.name.upper()})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastinfer", description="A high-throughput server for TVM-compiled models.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve models over HTTP")
    _add_config_flags(serve)
    args = parser.parse_args(argv)

    try:
        config = Config.from_sources({k: v for k, v in vars(args).items() if k != "command"})
    except FastInferError as error:
        parser.error(error.message)
    if args.command == "serve":
        from fastinfer.server.main import run

        run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
