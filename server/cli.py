"""`deltaserve`: the server's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
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
    _add_ray_serve(sub)
    return parser


def _add_ray_serve(sub: argparse._SubParsersAction) -> None:
    ray_serve = sub.add_parser("ray-serve", help="serve on Ray Serve: the replicas, adapter-affinity routing, gRPC "
                               "and HTTP proxies of a Serve config file (deploy/ray/serve.yaml)",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ray_serve.add_argument("config", help="a Ray Serve config file whose application is server.ray.app:build_app")
    ray_serve.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or None,
                           help="a running Ray cluster (env RAY_ADDRESS); none: start a local one")
    ray_serve.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local cluster (none: all)")
    ray_serve.add_argument("--object-store-mib", type=int, default=256, help="object store of a local cluster")
    ray_serve.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the replicas")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        from adapters_store.convert import main as convert

        return convert(args.src, args.dst)
    if args.command == "ray-serve":
        return _ray_serve(args)
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


def _ray_serve(args: argparse.Namespace) -> int:
    from server.ray.launch import run

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args.config, args.address, args.num_cpus, args.object_store_mib, args.timeout)
    except (ValueError, RuntimeError) as error:
        print(f"deltaserve ray-serve: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
