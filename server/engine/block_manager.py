"""KV cache blocks: reference-counted, found again by the hash of what they hold (prefix caching), or pinned.

A block holds `block_size` tokens' keys and values in every layer. A full block of a sequence's tokens is
registered under a chained hash of its tokens, of every token before it and of the adapter it was computed
with (an adapter that touches any layer changes the K/V of the layers above it; a reloaded adapter is another
load with another key). A later sequence with the same key and leading tokens references the block instead of
computing it. Blocks nobody references stay cached and are evicted least recently used first, only when no free
block is left. Pinned blocks (an adapter's shared prefix K/V) are held by their owner until it unpins them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from server.engine.binding import NO_ADAPTER
from server.engine.request import Sequence


def block_hash(parent: bytes, cache_key: bytes, tokens: list[int]) -> bytes:
    """The chained identity of one full block: its tokens, everything before it (`parent`) and the adapter."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(len(cache_key).to_bytes(2, "little") + cache_key)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class BlockManager:
    """Hands out fixed-size KV blocks; `can_x()` says whether `x()` would succeed."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._refs = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))       # unreferenced, holding nothing reusable
        self._cached: OrderedDict[int, None] = OrderedDict()     # unreferenced, registered; least recent first
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        # The last `_reusable` answer and what it depends on (sequence, length, cache key, the cache's generation):
        # admission asks can_allocate and then allocate for the same sequence in one step.
        self._generation = 0   # bumped whenever a hash is registered or evicted
        self._last: tuple[tuple[Sequence, int, bytes, int], list[tuple[int, bytes]]] | None = None
        self.queried_tokens = 0   # prompt tokens looked up in the cache at admission (counters, engine thread)
        self.hit_tokens = 0       # of those, found cached

    @property
    def num_free(self) -> int:
        """Blocks a sequence could get now: free ones and cached ones nobody references (evicted on demand)."""
        return len(self._free) + len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _missing(self, seq: Sequence) -> int:
        # Every step writes K/V for all of the sequence's tokens not yet cached.
        return max(0, self.blocks_for(len(seq)) - len(seq.block_table))

    def can_allocate(self, seq: Sequence) -> bool:
        # Admission asks before it binds the sequence's adapter: until then its cache key is unknown, and the blocks
        # it may share are not counted (allocate, after binding, then takes at most this many).
        bound = seq.binding is not NO_ADAPTER or not seq.adapter_id
        return self._needed(seq, self._reusable(seq) if bound else None) <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Gives `seq` blocks for all its tokens; a sequence with none yet first takes its cached leading blocks
        (num_cached moves past them), always leaving at least its last token to compute (its logits)."""
        reusable = self._reusable(seq)
        needed = self._needed(seq, reusable)
        if needed > self.num_free:
            raise RuntimeError(f"{seq.request_id}: {needed} KV blocks needed, {self.num_free} free")
        if reusable is not None:
            self._take_cached(seq, reusable)
        seq.block_table.extend(self._take() for _ in range(self._missing(seq)))

    # Decode needs at most one new block per step: the same check, named for the caller's intent.
    can_append = can_allocate
    append = allocate

    def _reusable(self, seq: Sequence) -> list[tuple[int, bytes]] | None:
        """The cached blocks (and their hashes) holding `seq`'s leading full blocks, never its last token; None
        when it takes none (caching off, or blocks already its own)."""
        if not self.caching or seq.block_table:
            return None
        tokens, bs, key = seq.all_ids, self.block_size, seq.binding.cache_key
        if self._last is not None:
            (last, length, last_key, generation), found = self._last
            if last is seq and (length, last_key, generation) == (len(seq), key, self._generation):
                return found
        found: list[tuple[int, bytes]] = []
        parent = b""
        for index in range((len(tokens) - 1) // bs):
            digest = block_hash(parent, key, tokens[index * bs:(index + 1) * bs])
            block = self._by_hash.get(digest)
            if block is None:
                break
            found.append((block, digest))
            parent = digest
        self._last = ((seq, len(seq), key, self._generation), found)
        return found

    def _needed(self, seq: Sequence, reusable: list[tuple[int, bytes]] | None) -> int:
        """Blocks of num_free that allocating `seq` uses up: a cached block nobody references leaves the pool it
        counts in, one in use by another sequence costs nothing."""
        shared = sum(1 for block, _ in reusable or () if self._refs[block])
        return self._missing(seq) - shared

    def _take_cached(self, seq: Sequence, reusable: list[tuple[int, bytes]]) -> None:
        self.queried_tokens += len(seq)
        for block, digest in reusable:
            self._ref(block)
            seq.block_table.append(block)
            seq.block_hashes.append(digest)
        seq.num_cached = len(seq.block_table) * self.block_size
        self.hit_tokens += seq.num_cached

    def register(self, seq: Sequence) -> None:
        """Registers `seq`'s blocks that its computed tokens now fill, for later sequences to reuse."""
        bs = self.block_size
        if not self.caching or len(seq.block_hashes) == seq.num_cached // bs:   # most steps: no block filled
            return
        tokens, key = seq.all_ids, seq.binding.cache_key
        for index in range(len(seq.block_hashes), seq.num_cached // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            digest = block_hash(parent, key, tokens[index * bs:(index + 1) * bs])
            seq.block_hashes.append(digest)
            block = seq.block_table[index]
            # Another sequence may have computed the same block in the same step: the first one stays.
            if digest not in self._by_hash and block not in self._hash_of:
                self._by_hash[digest], self._hash_of[block] = block, digest
                self._generation += 1

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self._unref(block)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_cached = 0

    def can_pin(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free

    def pin(self, num_tokens: int) -> list[int]:
        """Blocks for `num_tokens` tokens held by the caller (never cached, never evicted) until `unpin`."""
        needed = self.blocks_for(num_tokens)
        if needed > self.num_free:
            raise RuntimeError(f"{needed} KV blocks to pin, {self.num_free} free")
        return [self._take() for _ in range(needed)]

    def unpin(self, blocks: list[int] | tuple[int, ...]) -> None:
        for block in blocks:
            self._unref(block)

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:   # evict the least recently used cached block
            block, _ = self._cached.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
            self._generation += 1
        self._refs[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._cached[block]
        self._refs[block] += 1

    def _unref(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._hash_of:
                self._cached[block] = None
            else:
                self._free.append(block)
