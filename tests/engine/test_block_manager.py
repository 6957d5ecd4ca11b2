"""Block manager: accounting invariants under random workloads, prefix-cache hit rules, memory budget."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from inlaid.engine.block_manager import (BlockManager, MemoryBudget, adapter_slot_bytes,
                                         kv_block_bytes)
from inlaid.engine.sequence import Sequence
from inlaid.errors import ConfigError

BLOCK = 4


def make_seq(tokens: list[int], adapter: str | None = None, rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, adapter=adapter)


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What the model runner + scheduler do after a prefill: all tokens' KV is written."""
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    refs = Counter(b for seq in live for b in seq.block_table)
    for block_id in range(bm.num_blocks):
        assert bm.ref_count(block_id) == refs[block_id], block_id
    assert bm.num_free_blocks == bm.num_blocks - len(refs)
    assert bm.num_used_blocks == len(refs)
    for seq in live:
        assert len(seq.block_table) == bm.blocks_needed(seq.num_tokens)
        assert len(set(seq.block_table)) == len(seq.block_table)
    # a block shared between two sequences holds the same full block of the same chain in both
    owners: dict[int, tuple[bytes, int]] = {}
    for seq in live:
        for i, b in enumerate(seq.block_table):
            if refs[b] > 1:
                key = (seq.block_hashes[i], i)
                assert owners.setdefault(b, key) == key


def test_random_allocate_append_free_keeps_accounting() -> None:
    rng = random.Random(0)
    bm = BlockManager(num_blocks=40, block_size=BLOCK)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    live: list[Sequence] = []
    for step in range(3000):
        op = rng.random()
        if op < 0.35:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 6))]
            seq = make_seq(tokens, rng.choice([None, "a", "b"]), f"s{step}")
            if bm.can_allocate(seq):
                free_before, reused = bm.num_free_blocks, bm.cached_prefix_len(seq) // BLOCK
                bm.allocate(seq)
                taken = free_before - bm.num_free_blocks
                assert bm.blocks_needed(seq.num_tokens) - reused <= taken <= len(seq.block_table)
                compute_all(bm, seq)
                live.append(seq)
            else:
                with pytest.raises(RuntimeError):
                    bm.allocate(seq)
        elif op < 0.8 and live:
            seq = rng.choice(live)
            seq.append_token(rng.randrange(50))
            if bm.may_append(seq):
                bm.append_slot(seq)
                compute_all(bm, seq)
            else:
                seq.token_ids.pop()  # the scheduler would preempt someone; here just undo
        elif live:
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        check_invariants(bm, live)
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_hits_need_same_tokens_and_same_adapter() -> None:
    bm = BlockManager(num_blocks=32, block_size=BLOCK)
    tokens = list(range(10))  # two full blocks and a partial one
    first = make_seq(tokens, "a", "first")
    bm.allocate(first)
    assert first.num_cached_tokens == 0
    compute_all(bm, first)

    same = make_seq(tokens, "a", "same")
    assert bm.cached_prefix_len(same) == 8
    bm.allocate(same)
    assert same.num_cached_tokens == same.num_computed_tokens == 8
    assert same.block_table[:2] == first.block_table[:2]
    assert same.block_table[2] != first.block_table[2]  # partial blocks are never shared

    assert bm.cached_prefix_len(make_seq(tokens, "b")) == 0  # other adapter: other KV
    assert bm.cached_prefix_len(make_seq(tokens, None)) == 0  # base model too
    assert bm.cached_prefix_len(make_seq([0, 1, 2, 3, 9, 9, 9, 9, 8, 9], "a")) == 4
    # a changed first block breaks the chain even though the second block's tokens match
    assert bm.cached_prefix_len(make_seq([7, 1, 2, 3, 4, 5, 6, 7, 8, 9], "a")) == 0


def test_last_token_is_never_a_hit_and_uncomputed_blocks_are_not_published() -> None:
    bm = BlockManager(num_blocks=32, block_size=BLOCK)
    tokens = list(range(8))  # exactly two full blocks
    a = make_seq(tokens, rid="a")
    bm.allocate(a)
    assert bm.cached_prefix_len(make_seq(tokens)) == 0  # allocated but KV not computed yet
    a.num_computed_tokens = 4  # a first prefill chunk
    bm.cache_full_blocks(a)
    assert bm.cached_prefix_len(make_seq(tokens)) == 4
    assert bm.cached_prefix_len(make_seq(tokens + [99])) == 4  # block 2 is not computed yet
    compute_all(bm, a)
    # the whole prompt is cached, but its last token must still run to produce logits
    assert bm.cached_prefix_len(make_seq(tokens)) == 4
    assert bm.cached_prefix_len(make_seq(tokens + [99])) == 8


def test_freed_blocks_stay_hits_until_evicted() -> None:
    bm = BlockManager(num_blocks=6, block_size=BLOCK)
    tokens = list(range(9))  # 3 blocks, 2 of them full
    a = make_seq(tokens, rid="a")
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 2
    b = make_seq(tokens, rid="b")
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and bm.num_free_blocks == 3
    bm.free(b)
    # a fresh allocation of all 6 blocks evicts the cached content
    filler = make_seq([100 + i for i in range(24)], rid="filler")
    bm.allocate(filler)
    assert bm.num_free_blocks == 0 and bm.num_cached_blocks == 0
    bm.free(filler)
    assert bm.cached_prefix_len(make_seq(tokens)) == 0


def test_uncached_free_blocks_are_reused_before_cached_ones() -> None:
    bm = BlockManager(num_blocks=2, block_size=BLOCK)
    cached = make_seq([1, 2, 3, 4, 5][:4], rid="cached")  # one full block, published
    scratch = make_seq([7, 8], rid="scratch")  # one partial block, nothing to keep
    bm.allocate(cached)
    bm.allocate(scratch)
    compute_all(bm, cached)
    compute_all(bm, scratch)
    bm.free(cached)
    bm.free(scratch)  # freed last, yet reused first
    bm.allocate(make_seq([9], rid="new"))
    assert bm.cached_prefix_len(make_seq([1, 2, 3, 4, 5])) == 4


def test_can_allocate_counts_hits_in_use_as_free() -> None:
    bm = BlockManager(num_blocks=3, block_size=BLOCK)
    a = make_seq(list(range(9)), rid="a")  # 3 blocks, all of the cache
    bm.allocate(a)
    compute_all(bm, a)
    assert bm.num_free_blocks == 0
    b = make_seq(list(range(9)), rid="b")  # shares two blocks but still needs one fresh block
    assert not bm.can_allocate(b)
    with pytest.raises(RuntimeError):
        bm.allocate(b)


def test_append_slot_grows_one_block_per_block_size_tokens() -> None:
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    seq = make_seq([1, 2, 3], rid="s")
    bm.allocate(seq)
    sizes = []
    for t in range(10):
        seq.append_token(t)
        bm.append_slot(seq)
        sizes.append(len(seq.block_table))
    assert sizes == [1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    for t in range(3):  # fills the 4th block: 16 tokens
        seq.append_token(t)
        bm.append_slot(seq)
    seq.append_token(0)
    assert not bm.may_append(seq)
    with pytest.raises(RuntimeError):
        bm.append_slot(seq)


def test_disabled_prefix_caching_never_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    a = make_seq(list(range(9)), rid="a")
    bm.allocate(a)
    compute_all(bm, a)
    assert bm.cached_prefix_len(make_seq(list(range(9)))) == 0


def test_invalidation_forgets_content_and_blocks_in_use_never_publish() -> None:
    bm = BlockManager(num_blocks=16, block_size=BLOCK)
    old = make_seq(list(range(9)), rid="old")
    bm.allocate(old)
    compute_all(bm, old)
    bm.invalidate_prefix_cache()  # e.g. a layer of the base was re-quantized
    assert bm.cached_prefix_len(make_seq(list(range(9)))) == 0
    for t in range(8):  # the old sequence keeps decoding on its stale prefix
        old.append_token(t)
        bm.append_slot(old)
        compute_all(bm, old)
    assert bm.num_cached_blocks == 0
    bm.free(old)
    new = make_seq(list(range(9)), rid="new")
    bm.allocate(new)
    compute_all(bm, new)
    assert bm.cached_prefix_len(make_seq(list(range(9)))) == 8


def test_bad_sizes_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        BlockManager(0, 16)
    with pytest.raises(ConfigError):
        BlockManager(8, 0)


def test_memory_budget_trades_blocks_for_adapter_slots() -> None:
    budget = MemoryBudget(total_bytes=1000, bytes_per_block=30, bytes_per_adapter_slot=100)
    assert budget.blocks_per_adapter_slot == pytest.approx(100 / 30)
    plan = budget.split(num_adapter_slots=4)
    assert (plan.num_blocks, plan.num_adapter_slots, plan.unused_bytes) == (20, 4, 0)
    assert budget.split(0).num_blocks == 33
    assert budget.max_adapter_slots(min_blocks=1) == 9
    with pytest.raises(ConfigError):
        budget.split(10)
    with pytest.raises(ConfigError):
        MemoryBudget(0, 1, 1)


def test_llama7b_sizes_match_the_documented_exchange_rate() -> None:
    block = kv_block_bytes(num_layers=32, num_kv_heads=32, head_dim=128, block_size=16, dtype_bytes=2)
    assert block == 16 * 512 * 1024
    shapes = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
    slot = adapter_slot_bytes(num_layers=32, projection_shapes=shapes, max_rank=16, dtype_bytes=2)
    assert slot == 79_953_920
    tokens_per_slot = slot / (block / 16)
    assert 152 < tokens_per_slot < 153
