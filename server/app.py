"""Assembles the serving stack from a config: model, KV cache, scheduler, engine."""

from __future__ import annotations

import logging
import os

import torch

from server.config import ServerConfig
from server.engine.block_manager import BlockManager
from server.engine.engine import AdapterResolver, Engine, EngineLimits
from server.engine.prompts import PromptEncoder
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler
from server.model.attention import PagedKVCache
from server.model.loader import LoadedModel, load_model

log = logging.getLogger("deltaserve")


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads or os.cpu_count() or 1)


def build_engine(loaded: LoadedModel, config: ServerConfig, adapters: AdapterResolver | None = None) -> Engine:
    shape = loaded.shape
    num_blocks = config.kv_cache_tokens // config.block_size
    max_model_len = min(config.max_model_len, shape.max_position_embeddings, num_blocks * config.block_size)
    kv_cache = PagedKVCache(shape.num_layers, num_blocks, config.block_size, shape.num_kv_heads,
                            shape.head_dim, loaded.dtype, loaded.device)
    log.info("KV cache: %d blocks of %d tokens (%.0f MiB), context %d tokens", num_blocks,
             config.block_size, kv_cache.nbytes / 2**20, max_model_len)
    blocks = BlockManager(num_blocks, config.block_size)
    scheduler = Scheduler(blocks, config.max_batch_size, config.max_batched_tokens, config.max_waiting)
    runner = ModelRunner(loaded.model, kv_cache, loaded.device)
    limits = EngineLimits(max_model_len=max_model_len, default_max_new_tokens=config.default_max_new_tokens)
    return Engine(runner, PromptEncoder(loaded.tokenizer), blocks, scheduler, limits, loaded.eos_token_ids,
                  adapters)


def load(config: ServerConfig) -> LoadedModel:
    set_threads(config.threads)
    return load_model(config.model, config.cache_dir, config.device, config.dtype)
