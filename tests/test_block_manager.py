"""Reference-counted KV blocks with prefix caching: what is shared, what is never shared, what is evicted."""

from __future__ import annotations

from server.engine.binding import NO_ADAPTER, AdapterBinding
from server.engine.block_manager import BlockManager
from server.engine.request import SamplingParams, Sequence, StoppingParams

BS = 4


def _seq(ids: list[int], binding: AdapterBinding = NO_ADAPTER) -> Sequence:
    return Sequence(request_id="r", prompt_ids=list(ids), sampling=SamplingParams(), stopping=StoppingParams(4),
                    seed=0, adapter_id="", return_logprobs=False, sink=lambda o: None, arrival=0.0, binding=binding)


def _computed(blocks: BlockManager, seq: Sequence) -> None:
    """As the engine does after a step that computed all of `seq`'s tokens."""
    seq.num_cached = len(seq)
    blocks.register(seq)


def test_full_leading_blocks_are_shared_and_the_last_token_is_always_computed():
    blocks = BlockManager(num_blocks=16, block_size=BS)
    first = _seq(list(range(10)))          # blocks: [0..3] [4..7] [8, 9]
    blocks.allocate(first)
    _computed(blocks, first)
    second = _seq(list(range(10)) + [99])
    blocks.allocate(second)
    assert second.num_cached == 8 and second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]   # the partial block is never shared
    same = _seq(list(range(8)))            # two full blocks: the second is computed again (its last token's logits)
    blocks.allocate(same)
    assert same.num_cached == 4 and same.block_table[0] == first.block_table[0]
    assert (blocks.queried_tokens, blocks.hit_tokens) == (10 + 11 + 8, 0 + 8 + 4)


def test_another_adapter_or_version_never_shares_blocks():
    blocks = BlockManager(num_blocks=32, block_size=BS)
    ids = list(range(12))
    keys = [NO_ADAPTER, AdapterBinding(0, 1, b"7"), AdapterBinding(0, 2, b"8"), AdapterBinding(1, 1, b"9")]
    seqs = []
    for binding in keys:
        seq = _seq(ids, binding)
        blocks.allocate(seq)
        assert seq.num_cached == 0, binding
        _computed(blocks, seq)
        seqs.append(seq)
    tables = [tuple(seq.block_table) for seq in seqs]
    assert len(set(tables)) == len(tables)
    again = _seq(ids + [1], AdapterBinding(0, 2, b"8"))
    blocks.allocate(again)
    assert again.block_table[:3] == seqs[2].block_table


def test_unreferenced_cached_blocks_are_evicted_least_recently_used_and_only_when_needed():
    blocks = BlockManager(num_blocks=6, block_size=BS)
    old, new = _seq([1] * 8 + [0]), _seq([2] * 8 + [0])
    for seq in (old, new):
        blocks.allocate(seq)
        _computed(blocks, seq)
        blocks.free(seq)
    assert blocks.num_free == 6            # cached blocks count as free: they are given up on demand
    hog = _seq([3] * 5)                    # two blocks: the two free ones, nothing evicted yet
    blocks.allocate(hog)
    probe = _seq([2] * 8 + [5])
    blocks.allocate(probe)
    assert probe.num_cached == 8           # still cached
    blocks.free(probe)
    big = _seq([4] * 5)                    # two blocks: one free, one evicted (the least recently used)
    blocks.allocate(big)
    assert blocks.num_free == 2
    blocks.free(hog)
    blocks.free(big)
    for prompt, cached in (([1] * 8 + [6], 0), ([2] * 8 + [6], 8)):   # the older chain went, the recent one stays
        seq = _seq(prompt)
        blocks.allocate(seq)
        assert seq.num_cached == cached, prompt
        blocks.free(seq)


def test_a_block_in_use_is_never_handed_out_again():
    blocks = BlockManager(num_blocks=6, block_size=BS)
    first = _seq(list(range(8)) + [0])
    blocks.allocate(first)
    _computed(blocks, first)
    shared = _seq(list(range(8)) + [1])
    blocks.allocate(shared)
    blocks.free(first)                     # the shared blocks stay referenced by `shared`
    assert blocks.num_free == 6 - 3
    other = _seq([9])
    blocks.allocate(other)
    assert not set(other.block_table) & set(shared.block_table)


def test_pinned_blocks_are_held_until_unpinned_and_never_cached():
    blocks = BlockManager(num_blocks=4, block_size=BS)
    assert blocks.can_pin(17) is False and blocks.can_pin(9)
    pinned = blocks.pin(9)
    assert len(pinned) == 3 and blocks.num_free == 1
    blocks.unpin(pinned)
    assert blocks.num_free == 4


def test_caching_off_shares_nothing():
    blocks = BlockManager(num_blocks=8, block_size=BS, caching=False)
    first = _seq(list(range(9)))
    blocks.allocate(first)
    _computed(blocks, first)
    second = _seq(list(range(9)))
    blocks.allocate(second)
    assert second.num_cached == 0 and not set(first.block_table) & set(second.block_table)
    assert blocks.queried_tokens == 0


def test_admission_counts_the_blocks_a_prompt_shares_with_running_sequences():
    """A prompt whose leading blocks another sequence holds needs only the rest: admitted when only those fit.
    Cached blocks nobody holds count in num_free already, so taking them costs as much as fresh ones."""
    blocks = BlockManager(num_blocks=6, block_size=BS)
    running = _seq(list(range(17)))        # 5 blocks: 4 full and shared, 1 partial
    blocks.allocate(running)
    _computed(blocks, running)
    assert blocks.num_free == 1
    follower = _seq(list(range(16)) + [50])   # the same 4 full blocks, then its own
    alone = _seq(list(range(100, 117)))        # nothing cached: 5 blocks, 1 free
    assert blocks.can_allocate(follower) and not blocks.can_allocate(alone)
    blocks.allocate(follower)
    assert follower.block_table[:4] == running.block_table[:4] and blocks.num_free == 0
    blocks.free(running)
    blocks.free(follower)
    assert blocks.num_free == 6   # 4 shared blocks (cached), 2 partial ones (free)
    again = _seq(list(range(16)) + [7])
    assert blocks.can_allocate(again)
    blocks.allocate(again)
    assert again.num_cached == 16 and blocks.num_free == 1


def test_admission_credits_no_shared_block_before_the_adapter_is_bound():
    """Admission checks blocks before it binds an adapter: an adapter request whose tokens match blocks a base-model
    request holds is not counted as sharing them (after binding it shares none)."""
    blocks = BlockManager(num_blocks=6, block_size=BS)
    running = _seq(list(range(17)))
    blocks.allocate(running)
    _computed(blocks, running)
    unbound = _seq(list(range(16)) + [50])
    unbound.adapter_id = "lora"
    assert not blocks.can_allocate(unbound)        # 5 blocks needed, 1 free
    unbound.adapter_id = ""
    assert blocks.can_allocate(unbound)            # as a base request it shares 4
