"""``fastinfer`` command line: it only fills in a Config and hands it over."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from fastinfer.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, Config, config_toml
from fastinfer.errors import FastInferError


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help=f"TOML config file (env {CONFIG_ENV}; default {DEFAULT_CONFIG_PATH} when it exists; '': none)",
    )
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float}.get(str(f.type), str)
        help_text = f.metadata.get("help", "")
        if str(f.type).startswith("tuple"):
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        elif str(f.type) == "bool":  # --x-y / --no-x-y
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_text} (env FASTINFER_{f.name.upper()})",
            )
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"{help_text} (env FASTINFER_{f.name.upper()})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastinfer", description="A high-throughput server for TVM-compiled models.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve models over HTTP and the binary protocol")
    _add_config_flags(serve)
    bench = commands.add_parser("bench", help="measure a running server: throughput and latency")
    _add_bench_flags(bench)
    from fastinfer.archive.commands import add_archive_flags, add_inspect_flags, add_records_flags, add_tune_flags

    add_archive_flags(commands.add_parser("archive", help="compile an ONNX model into a model archive (.fia)"))
    add_inspect_flags(commands.add_parser("inspect", help="show what a model archive holds and how it was built"))
    add_tune_flags(commands.add_parser("tune", help="tune an ONNX model's CPU code with MetaSchedule, resumably"))
    add_records_flags(commands.add_parser("records", help="export or import tuning records (tune once, reuse on many)"))
    config_command = commands.add_parser("config", help="show the effective configuration")
    config_command.add_argument(
        "--print", action="store_true", required=True, help="print it as TOML, every option with its help and default"
    )
    config_command.add_argument(
        "--template", action="store_true", help="every option commented out, with its default (scripts/config.toml)"
    )
    _add_config_flags(config_command)
    args = parser.parse_args(argv)

    if args.command == "bench":
        from fastinfer.bench import run as run_bench

        return run_bench(args)
    if args.command in ("archive", "inspect", "tune", "records"):
        from fastinfer.archive import commands as archive_commands

        run_command = {
            "archive": archive_commands.run_archive,
            "inspect": archive_commands.run_inspect,
            "tune": archive_commands.run_tune,
            "records": archive_commands.run_records,
        }[args.command]
        return run_command(args)
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "print", "template")}

    def load() -> Config:
        """The config as at start: file and environment read again, the same flags on top."""
        return Config.load(flags, args.config)

    try:
        config = load()
    except FastInferError as error:
        parser.error(error.message)
    if args.command == "config":
        sys.stdout.write(config_toml(config, template=args.template))
        return 0
    from fastinfer.server.main import run

    try:
        run(config, load)
    except FastInferError as error:  # a start that cannot succeed: one line, and a status that says so
        print(f"fastinfer: {error.message}", file=sys.stderr)
        return 1
    return 0


def _add_bench_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default="tcp://127.0.0.1:8090", help="http://HOST:PORT, tcp://HOST:PORT or unix:///PATH"
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    parser.add_argument("--duration-s", type=float, default=5.0, help="measured time, after 1 s of warm-up")
    parser.add_argument("--shape", default="1,16", help="input shape, batch axis first")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--input-name", default="input")
    parser.add_argument(
        "--pipeline", type=int, default=1, help="binary protocol: requests in flight per connection (as AsyncClient)"
    )
    parser.add_argument("--image", help="send this encoded image instead of a random tensor")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


if __name__ == "__main__":
    sys.exit(main())
