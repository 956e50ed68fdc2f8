"""`deltaserve`: the server's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from server.config import add_config_arguments, config_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaserve", description="Multi-adapter inference server.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over gRPC",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(serve)
    convert = sub.add_parser("convert", help="convert a pickled adapter (AdapterHub pytorch_adapter.bin, PEFT "
                             "adapter_model.bin) into a safetensors adapter directory, offline")
    convert.add_argument("src", help="the adapter directory holding the pickle and adapter_config.json")
    convert.add_argument("dst", help="a new directory to write the safetensors adapter into")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        from adapters_store.convert import main as convert

        return convert(args.src, args.dst)
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"deltaserve: bad configuration: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        from server.serve import serve

        return asyncio.run(serve(config))
    return 2


if __name__ == "__main__":
    sys.exit(main())
