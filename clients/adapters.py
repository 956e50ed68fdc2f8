"""The Adapters admin API on the client side: JSON-ready dicts, and `deltactl adapters list|get|load|unload`."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from deltaserve.v1 import adapters_pb2 as apb

ADMIN_TOKEN_ENV = "DELTASERVE_ADMIN_TOKEN"
_PREFIXES = {apb.AdapterState: "ADAPTER_STATE_", apb.ResidencyTier: "RESIDENCY_TIER_"}


def _enum(kind: Any, value: int) -> str:
    """ADAPTER_STATE_READY -> "ready"; the UNSPECIFIED value -> ""."""
    try:
        name = kind.Name(value).removeprefix(_PREFIXES[kind]).lower()
    except ValueError:  # a newer server may send a value this client's stubs don't know yet
        return f"unknown_{value}"
    return "" if name == "unspecified" else name


def adapter_info_to_dict(info: apb.AdapterInfo) -> dict[str, Any]:
    """One AdapterInfo as plain JSON-ready values (enums as lower-case names, unix times as floats)."""
    return {
        "name": info.name, "state": _enum(apb.AdapterState, info.state), "version": info.version,
        "path": info.path, "source": info.source, "pinned": info.pinned, "format": info.format,
        "methods": list(info.methods), "ranks": list(info.ranks), "targets": list(info.targets),
        "parameter_count": info.parameter_count, "bytes": info.bytes, "tier": _enum(apb.ResidencyTier, info.tier),
        "loaded_at": info.loaded_at, "load_seconds": info.load_seconds, "last_used": info.last_used,
        "in_flight": info.in_flight, "draining_versions": info.draining_versions,
        "error": {"reason": info.error.reason, "message": info.error.message} if info.HasField("error") else None,
    }


# --- deltactl adapters ------------------------------------------------------------------------------

def add_adapters(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """`deltactl adapters list|get|load|unload` (a SUBCOMMANDS registrar)."""
    admin = argparse.ArgumentParser(add_help=False, parents=[common])
    admin.add_argument("--admin-token", default=os.environ.get(ADMIN_TOKEN_ENV) or None, metavar="TOKEN",
                       help=f"the server's --admin-token (default: ${ADMIN_TOKEN_ENV})")
    admin.add_argument("--json", action="store_true", help="print JSON")
    parser = subparsers.add_parser("adapters", help="list, inspect, load and unload adapters",
                                   description="Administer the server's adapters (the Adapters service).")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[admin], help="every adapter the server knows").set_defaults(
        handler=run_adapters)
    get = actions.add_parser("get", parents=[admin], help="one adapter in detail")
    get.add_argument("name")
    get.set_defaults(handler=run_adapters)
    load = actions.add_parser("load", parents=[admin], help="load (or reload) an adapter directory",
                              description="Load PATH (a directory under the server's --adapters-load-root or "
                                          "--adapters-dir) as NAME; loading a served NAME makes a new version.")
    load.add_argument("name")
    load.add_argument("path")
    load.add_argument("--pinned", action="store_true", help="never evict it from the device or host memory")
    load.set_defaults(handler=run_adapters)
    unload = actions.add_parser("unload", parents=[admin], help="stop serving an adapter",
                                description="New requests for NAME fail at once; it is gone once its "
                                            "in-flight requests end.")
    unload.add_argument("name")
    unload.set_defaults(handler=run_adapters)


def run_adapters(args: argparse.Namespace) -> int:
    from clients.cli import connection
    from clients.client import DeltaClient

    with DeltaClient(args.target, admin_token=args.admin_token, **connection(args)) as client:
        if args.action == "list":
            adapters = client.list_adapters()
            print(json.dumps(adapters, ensure_ascii=False) if args.json else format_adapter_table(adapters))
            return 0
        if args.action == "get":
            adapter = client.get_adapter(args.name)
        elif args.action == "load":
            adapter = client.load_adapter(args.name, args.path, pinned=args.pinned)
        else:
            adapter = client.unload_adapter(args.name)
    print(json.dumps(adapter, ensure_ascii=False) if args.json else format_adapter(adapter))
    return 0


def _ago(unix: float) -> str:
    if not unix:
        return "never"
    seconds = max(0.0, time.time() - unix)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def format_adapter_table(adapters: list[dict[str, Any]]) -> str:
    """One line per adapter: name, state, version, tier, format, methods, ranks, size, in-flight, last use."""
    header = ("NAME", "STATE", "VER", "TIER", "FORMAT", "METHODS", "RANKS", "MIB", "IN-FLIGHT", "LAST USED")
    rows = [header] + [(
        a["name"], a["state"], str(a["version"]), a["tier"] or "-", a["format"] or "-",
        "+".join(a["methods"]) or "-", ",".join(map(str, a["ranks"])) or "-", f"{a['bytes'] / 2**20:.2f}",
        str(a["in_flight"]), _ago(a["last_used"])) for a in adapters]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines += [f"{a['name']}: {a['error']['reason']}: {a['error']['message']}" for a in adapters if a["error"]]
    return "\n".join(lines)


def format_adapter(a: dict[str, Any]) -> str:
    """One adapter, a field per line."""
    lines = [
        f"name:       {a['name']} ({a['state']}, version {a['version']}, from {a['source'] or '-'})",
        f"path:       {a['path']}",
        f"format:     {a['format'] or '-'}: {'+'.join(a['methods']) or '-'}, ranks {a['ranks']}, "
        f"targets {', '.join(a['targets']) or '-'}",
        f"size:       {a['parameter_count']} parameters, {a['bytes'] / 2**20:.2f} MiB",
        f"residency:  {a['tier'] or '-'}{' (pinned)' if a['pinned'] else ''}",
        f"requests:   {a['in_flight']} in flight, {a['draining_versions']} older version(s) draining, "
        f"last used {_ago(a['last_used'])}",
        f"loaded:     {_ago(a['loaded_at'])} in {a['load_seconds'] * 1000:.0f} ms",
    ]
    if a["error"]:
        lines.append(f"error:      {a['error']['reason']}: {a['error']['message']}")
    return "\n".join(lines)
