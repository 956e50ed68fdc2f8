"""deltactl: command-line client for a deltaserve server.

Each subcommand is one `add_*` function that registers its parser and sets `handler`; a new subcommand
is a new function appended to `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import grpc

from clients.adapters import add_adapters
from clients.channel import API_KEY_ENV, RAY_ENV, TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV, TlsOptions, ray_from_env
from clients.client import DEFAULT_TARGET, DeltaClient
from clients.messages import GenerationResult, TokenChunk

TARGET_ENV = "DELTASERVE_TARGET"

Subparsers = Any  # argparse's _SubParsersAction is private
Registrar = Callable[[Subparsers, argparse.ArgumentParser], None]


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
                        help=f"server host:port (default: ${TARGET_ENV}, else {DEFAULT_TARGET})")
    common.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="deadline of the call (default: none)")
    tls = TlsOptions.from_env()
    common.add_argument("--tls-ca", default=tls.ca, metavar="PEM",
                        help=f"connect over TLS, trusting this CA bundle (env {TLS_CA_ENV})")
    common.add_argument("--tls-cert", default=tls.cert, metavar="PEM",
                        help=f"client certificate for mutual TLS (env {TLS_CERT_ENV})")
    common.add_argument("--tls-key", default=tls.key, metavar="PEM", help=f"its private key (env {TLS_KEY_ENV})")
    common.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None, metavar="KEY",
                        help=f"API key for inference calls (env {API_KEY_ENV}; prefer the env var: flags show in ps)")
    common.add_argument("--ray", action="store_true", default=ray_from_env(),
                        help="the target is Ray Serve's gRPC proxy: send the adapter as the multiplexed_model_id "
                             f"metadata it routes on (env {RAY_ENV}=1)")
    return common


def connection(args: argparse.Namespace) -> dict[str, Any]:
    """The DeltaClient keywords the common options give: deadline, TLS files, API key, Ray routing."""
    return {"timeout": args.timeout, "tls": TlsOptions(args.tls_ca, args.tls_cert, args.tls_key),
            "api_key": args.api_key, "ray": args.ray}


def _client(args: argparse.Namespace) -> DeltaClient:
    return DeltaClient(args.target, **connection(args))


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False))


# --- generate ---------------------------------------------------------------------------------------

def add_generate(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("generate", parents=[common], help="generate a completion",
                                   description="Generate a completion; PROMPT is sent as a user chat "
                                               "message unless --raw is given.")
    parser.add_argument("prompt", metavar="PROMPT", help='the prompt; "-" reads it from stdin')
    parser.add_argument("--adapter", default="", help="adapter id (default: the base model)")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument("--json", action="store_true", help="print the whole response as one JSON object")
    parser.add_argument("--max-new-tokens", type=int, default=0, metavar="N", help="0: the server default")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0: greedy")
    parser.add_argument("--top-p", type=float, default=0.0, metavar="P")
    parser.add_argument("--top-k", type=int, default=0, metavar="K")
    parser.add_argument("--repetition-penalty", type=float, default=0.0, metavar="R")
    parser.add_argument("--seed", type=int, default=None, metavar="S")
    parser.add_argument("--stop", action="append", default=[], metavar="STR",
                        help="stop sequence (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    parser.add_argument("--logprobs", action="store_true", help="return per-token log-probabilities")
    parser.add_argument("--request-id", default="", help="echoed back; the server makes one when empty")
    prompt_kind = parser.add_mutually_exclusive_group()
    prompt_kind.add_argument("--system", default=None, metavar="TEXT", help="system message before PROMPT")
    prompt_kind.add_argument("--raw", action="store_true", help="send PROMPT as raw text, not chat")
    parser.set_defaults(handler=run_generate)


def _prompt_arguments(args: argparse.Namespace) -> dict[str, Any]:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.raw:
        return {"prompt": text}
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    messages.append({"role": "user", "content": text})
    return {"messages": messages}


def _generate_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **_prompt_arguments(args),
        "adapter": args.adapter,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos,
        "logprobs": args.logprobs,
        "request_id": args.request_id,
    }


def _stream(client: DeltaClient, options: dict[str, Any], echo: bool) -> GenerationResult | None:
    result = None
    with client.generate_stream(**options) as stream:
        for event in stream:
            if isinstance(event, TokenChunk):
                if echo and event.text:
                    print(event.text, end="", flush=True)
            else:
                result = event
    return result


def run_generate(args: argparse.Namespace) -> int:
    options = _generate_options(args)
    with _client(args) as client:
        if not args.stream:
            result: GenerationResult | None = client.generate(**options)
        else:
            result = _stream(client, options, echo=not args.json)
    if result is None:
        print("deltactl: the stream ended without a final result", file=sys.stderr)
        return 1
    if args.json:
        _print_json(result.to_dict())
    elif args.stream:
        print(flush=True)
    else:
        print(result.text)
    return 0


# --- health -----------------------------------------------------------------------------------------

def add_health(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("health", parents=[common], help="check the server's health",
                                   description="Print the gRPC health status; exit 0 only when SERVING.")
    parser.add_argument("--service", default="", help='service name (default: "", the whole server)')
    parser.set_defaults(handler=run_health)


def run_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


# --- info -------------------------------------------------------------------------------------------

def add_info(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("info", parents=[common], help="describe the served model",
                                   description="Print the served model, engine capacity and adapters.")
    parser.add_argument("--json", action="store_true", help="print the model info as JSON")
    parser.set_defaults(handler=run_info)


def format_model_info(info: dict[str, Any]) -> str:
    """A human-readable summary of a `model_info()` dict."""
    kv = info.get("kv_cache", {})
    adapters = info.get("adapters", [])
    lines = [
        f"model:     {info.get('model_id', '')} ({info.get('architecture', '')}, "
        f"{info.get('dtype', '')}, {info.get('device', '')})",
        f"context:   {info.get('max_context_length', 0)} tokens, vocabulary {info.get('vocab_size', 0)}",
        f"requests:  {info.get('running_requests', 0)} running (max {info.get('max_batch_size', 0)}), "
        f"{info.get('waiting_requests', 0)} waiting (max {info.get('max_waiting_requests', 0)})",
        f"kv cache:  {kv.get('free_blocks', 0)}/{kv.get('total_blocks', 0)} blocks free, "
        f"{kv.get('block_size', 0)} tokens per block, {100 * float(kv.get('usage', 0.0)):.1f}% used",
        f"adapters:  {len(adapters)}",
    ]
    for adapter in adapters:
        methods = ", ".join(adapter.get("methods", []))
        lines.append(f"  {adapter.get('id', '')}  [{adapter.get('format', '')}]  {methods}".rstrip())
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.model_info()
    if args.json:
        _print_json(info)
    else:
        print(format_model_info(info))
    return 0


# --- entry point ------------------------------------------------------------------------------------

SUBCOMMANDS: list[Registrar] = [add_generate, add_health, add_info, add_adapters]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltactl", description="Client for a deltaserve server.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Built per call so $DELTASERVE_TARGET is read when the command runs, not at import.
    common = _common_options()
    for register in SUBCOMMANDS:
        register(subparsers, common)
    return parser


def _rpc_error_message(error: grpc.RpcError, target: str) -> str:
    # Every RpcError gRPC raises also has code() and details(), but the base class promises neither.
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    name = code.name if code is not None else "UNKNOWN"
    return f"deltactl: {name}: {details} (target {target})"


def main(argv: list[str] | None = None) -> int:
    """Runs deltactl with `argv` (default: sys.argv[1:]) and returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except grpc.RpcError as error:
        print(_rpc_error_message(error, args.target), file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"deltactl: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
