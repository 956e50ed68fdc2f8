"""Assembles the serving stack from a config: model, KV cache, deltas, adapter store, engine."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from adapters_store.events import DELTA_REJECTED, StoreListener
from adapters_store.spec import ModelSpec
from adapters_store.store import AdapterStore
from server.config import ServerConfig
from server.deltas.base import DeltaLimits, DeltaRejected
from server.deltas.deltaset import DeltaSet
from server.deltas.slots import AdapterSlots
from server.engine.block_manager import BlockManager
from server.engine.engine import Engine, EngineLimits
from server.engine.prompts import PromptEncoder
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler
from server.model.attention import PagedKVCache
from server.model.loader import LoadedModel, load_model

log = logging.getLogger("deltaserve")


@dataclass
class ServingStack:
    """Everything below the gRPC layer, built once."""

    loaded: LoadedModel
    engine: Engine
    store: AdapterStore
    deltas: DeltaSet
    slots: AdapterSlots


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads or os.cpu_count() or 1)


def load(config: ServerConfig) -> LoadedModel:
    set_threads(config.threads)
    return load_model(config.model, config.cache_dir, config.device, config.dtype)


def build_stack(loaded: LoadedModel, config: ServerConfig, store_listener: StoreListener | None = None) -> ServingStack:
    shape = loaded.shape
    num_blocks = config.kv_cache_tokens // config.block_size
    max_model_len = min(config.max_model_len, shape.max_position_embeddings, num_blocks * config.block_size)
    kv_cache = PagedKVCache(shape.num_layers, num_blocks, config.block_size, shape.num_kv_heads,
                            shape.head_dim, loaded.dtype, loaded.device, config.max_batch_size, max_model_len,
                            prefix_slots=config.max_adapter_slots, prefix_tokens=config.max_prefix_tokens)
    log.info("KV cache: %d blocks of %d tokens (%.0f MiB), context %d tokens", num_blocks,
             config.block_size, kv_cache.nbytes / 2**20, max_model_len)
    deltas = DeltaSet(loaded.model, DeltaLimits(config.max_adapter_slots, config.max_lora_rank,
                                                     config.max_prefix_tokens))
    deltas.bind_kv_cache(kv_cache)
    store = AdapterStore(ModelSpec.from_hf_model(loaded.model), config.adapters_dir or None, store_listener)
    scan_adapters(store, deltas)
    slots = AdapterSlots(store, deltas)
    blocks = BlockManager(num_blocks, config.block_size)
    scheduler = Scheduler(blocks, config.max_batch_size, config.max_batched_tokens, config.max_waiting)
    runner = ModelRunner(loaded.model, kv_cache, loaded.device, deltas)
    limits = EngineLimits(max_model_len=max_model_len, default_max_new_tokens=config.default_max_new_tokens)
    engine = Engine(runner, PromptEncoder(loaded.tokenizer), blocks, scheduler, limits, loaded.eos_token_ids,
                    slots)
    return ServingStack(loaded, engine, store, deltas, slots)


def scan_adapters(store: AdapterStore, deltas: DeltaSet) -> None:
    """Registers the adapters directory; refuses adapters the slots cannot hold (e.g. rank too large)."""
    if store.adapters_dir is None:
        return
    for name in store.scan():
        try:
            deltas.check(store.get(name).parts)
        except DeltaRejected as error:
            store.remove(name)
            store.listener.on_load_failed(name, DELTA_REJECTED)
            log.warning("rejected adapter %r: %s", name, error)
    log.info("serving %d adapters from %s (%d rejected)", len(store), store.adapters_dir, len(store.rejected))


def build_engine(loaded: LoadedModel, config: ServerConfig) -> Engine:
    return build_stack(loaded, config).engine
