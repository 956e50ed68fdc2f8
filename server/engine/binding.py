"""What a request runs with once its adapter is bound: a plain record the scheduler, KV blocks and runner read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterBinding:
    """One request's bound adapter (or the base model), fixed from admission to its last token.

    `shared_blocks` are KV blocks held once for the adapter (pinned while it is resident) that every one of its
    requests attends to in front of its own tokens, always visible and never rotated: prefix tuning's keys and
    values, in the same blocks and through the same block tables as the request's own tokens.
    """

    slot: int = -1                        # device slot of the adapter's weights (-1: the base model)
    version: int = 0                      # the adapter version it runs on (0: none)
    cache_key: bytes = b""                # identity of the exact weights, for prefix-cache hashes (b"": base)
    position_offset: int = 0              # how far the adapter shifts the request's token positions
    shared_blocks: tuple[int, ...] = ()   # [ceil(shared_tokens / block_size)] pinned KV block ids
    shared_tokens: int = 0                # tokens the shared blocks hold


NO_ADAPTER = AdapterBinding()
