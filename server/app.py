"""Assembles the serving stack from a config: model, KV cache, deltas, adapter store, engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from adapters_store.events import StoreListener
from adapters_store.registry import AdapterRegistry
from server.adapters.stack import Adapters, build_adapters
from server.config import ServerConfig
from server.deltas.base import DeltaLimits
from server.deltas.deltaset import DeltaSet
from server.engine.block_manager import BlockManager
from server.engine.engine import Engine, EngineLimits
from server.engine.graphs import CudaGraphCapture, DecodeGraphs
from server.engine.prompts import PromptEncoder
from server.engine.residency import AdapterSlots, SharedKV
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler
from server.engine.threads import single_threaded
from server.kernels.registry import configure as configure_kernels
from server.kernels.registry import select_backend
from server.model.attention import PagedKVCache
from server.model.loader import LoadedModel, load_model

log = logging.getLogger("deltaserve")


@dataclass
class ServingStack:
    """Everything below the gRPC layer, built once."""

    loaded: LoadedModel
    engine: Engine
    store: AdapterRegistry
    deltas: DeltaSet
    slots: AdapterSlots
    adapters: Adapters


def load(config: ServerConfig) -> LoadedModel:
    """Loads the model on the calling thread, which stays single-threaded (the engine thread claims
    `config.threads` when it starts: see server/engine/threads.py)."""
    single_threaded()
    return load_model(config.model, config.cache_dir, config.device, config.dtype)


def build_stack(loaded: LoadedModel, config: ServerConfig, store_listener: StoreListener | None = None) -> ServingStack:
    configure_kernels(None if config.kernels == "auto" else config.kernels)   # before the cache and the deltas
    shape = loaded.shape
    num_blocks = config.kv_cache_tokens // config.block_size
    max_model_len = min(config.max_model_len, shape.max_position_embeddings, num_blocks * config.block_size)
    # A decode row's block table reaches its adapter's shared blocks (a prefix) in front of its own tokens.
    shared = -(-config.max_prefix_tokens // config.block_size) * config.block_size
    kv_cache = PagedKVCache(shape.num_layers, num_blocks, config.block_size, shape.num_kv_heads,
                            shape.head_dim, loaded.dtype, loaded.device, config.max_batch_size, max_model_len + shared)
    log.info("KV cache: %d blocks of %d tokens (%.0f MiB), context %d tokens, prefix caching %s", num_blocks,
             config.block_size, kv_cache.nbytes / 2**20, max_model_len, "on" if config.prefix_caching else "off")
    blocks = BlockManager(num_blocks, config.block_size, caching=config.prefix_caching)
    deltas = DeltaSet(loaded.model, DeltaLimits(config.device_adapters, config.max_lora_rank,
                                                     config.max_prefix_tokens, config.max_bottleneck_rank))
    adapters = build_adapters(loaded, config, deltas, SharedKV(blocks, kv_cache), store_listener)
    slots = adapters.slots
    scheduler = Scheduler(blocks, config.max_batch_size, config.max_batched_tokens, adapters=slots,
                          max_prefill_chunk=config.prefill_chunk(loaded.device.type))
    runner = ModelRunner(loaded.model, kv_cache, loaded.device, deltas, decode_graphs(loaded, config, kv_cache, deltas))
    limits = EngineLimits(max_model_len=max_model_len, default_max_new_tokens=config.default_max_new_tokens,
                          max_waiting=config.max_waiting)
    engine = Engine(runner, PromptEncoder(loaded.tokenizer), blocks, scheduler, limits, loaded.eos_token_ids,
                    slots, threads=config.threads)
    return ServingStack(loaded, engine, adapters.registry, deltas, slots, adapters)


def decode_graphs(loaded: LoadedModel, config: ServerConfig, kv_cache: PagedKVCache,
                  deltas: DeltaSet) -> DecodeGraphs | None:
    """Captured decode steps where the device has CUDA graphs and the kernels can be captured; else None."""
    if not config.cuda_graphs or loaded.device.type != "cuda" or not select_backend(loaded.device).captures:
        return None
    log.info("decode steps of up to %d rows run as CUDA graphs", config.max_batch_size)
    return DecodeGraphs(loaded.model, kv_cache, deltas, config.max_batch_size, CudaGraphCapture(loaded.device))


def build_engine(loaded: LoadedModel, config: ServerConfig) -> Engine:
    return build_stack(loaded, config).engine
