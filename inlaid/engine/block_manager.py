"""Paged KV cache bookkeeping: which fixed-size blocks each sequence owns, shared prefixes, free list.

Torch-free: block ids index into the model runner's KV tensors, which this module never sees.

Prefix caching: every *full* block is named by a hash chain over (adapter, tokens of all blocks up
to and including it). The adapter is in the chain's root because the same tokens under different
LoRA adapters produce different K/V (adapters touch k_proj/v_proj and every earlier layer), so they
must never share blocks. A block is published in the cache only once its KV has been computed, so a
hit never reads KV that a chunked prefill has not written yet. Freed blocks stay in the free list
with their content: they are reused as hits until a fresh allocation evicts them, oldest first.

Memory budget: see `MemoryBudget` for how KV blocks and adapter slots share one byte budget.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from inlaid.engine.sequence import Sequence
from inlaid.errors import ConfigError


def block_hash(parent: bytes | None, adapter: str | None, token_ids: list[int]) -> bytes:
    """Hash of one full block chained to its parent. 128-bit blake2b: collisions would silently
    serve another request's KV, so a strong hash is cheaper than comparing tokens."""
    h = hashlib.blake2b(digest_size=16)
    if parent is None:
        # tag None (base model) apart from any adapter name
        h.update(b"\0" if adapter is None else b"\1" + adapter.encode())
    else:
        h.update(parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    """Ref-counted KV blocks with an LRU free list and an optional prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ConfigError(f"KV cache needs num_blocks >= 1 and block_size >= 1, "
                              f"got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hashes: list[bytes | None] = [None] * num_blocks  # set once a block is published
        self._cached: dict[bytes, int] = {}  # hash -> block id holding that content
        self._stale: set[int] = set()  # in use across an invalidation: never published
        # front = next to be reused; blocks without cached content go first so hits survive longer
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    # --- accounting -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (some still keep cached content for future hits)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix cache ---------------------------------------------------------------------------
    def _full_block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The sequence's hash chain extended to ``num_blocks`` full blocks. Memoised on the
        sequence: tokens only ever get appended, so a full block's hash never changes."""
        hashes, size = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(block_hash(parent, seq.adapter, seq.token_ids[i * size:(i + 1) * size]))
        return hashes[:num_blocks]

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks matching the sequence's leading full blocks. Only blocks inside the first
        ``num_tokens - 1`` tokens count: the last token must be fed to the model for logits."""
        if not self.enable_prefix_caching or seq.sampling.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt token computed
        hits = []
        for h in self._full_block_hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block_id = self._cached.get(h)
            if block_id is None:
                break  # the chain is broken: nothing later can match either
            hits.append(block_id)
        return hits

    def cached_prefix_len(self, seq: Sequence) -> int:
        """Tokens of ``seq`` an allocation now would take from the prefix cache."""
        return len(self._prefix_hits(seq)) * self.block_size

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish the sequence's full, computed blocks. Call after ``num_computed_tokens`` grows."""
        if not self.enable_prefix_caching or (seq.block_table and seq.block_table[0] in self._stale):
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full == 0 or self._hashes[seq.block_table[num_full - 1]] is not None:
            return  # published blocks form a prefix: the last full one is published, so all are
        hashes = self._full_block_hashes(seq, num_full)
        first_new = num_full
        while first_new > 0 and self._hashes[seq.block_table[first_new - 1]] is None:
            first_new -= 1  # published blocks form a prefix of the table, so scan back only
        for i in range(first_new, num_full):
            block_id = seq.block_table[i]
            self._hashes[block_id] = hashes[i]
            # a twin computed concurrently by another sequence keeps the entry; both are valid
            self._cached.setdefault(hashes[i], block_id)

    def invalidate_prefix_cache(self) -> None:
        """Forget all cached content: call when weights change (a layer swap of live task addition,
        an adapter re-registered under the same name). Sequences holding blocks now keep their KV
        but never publish it, since even their new blocks attend to KV from the old weights."""
        self._cached.clear()
        self._stale = {b for b in range(self.num_blocks) if self._ref_counts[b] > 0}
        for block_id in range(self.num_blocks):
            self._hashes[block_id] = None

    # --- allocation -----------------------------------------------------------------------------
    def _allocation_cost(self, seq: Sequence) -> tuple[list[int], int]:
        """(prefix hits, free-list entries an allocation would consume)."""
        hits = self._prefix_hits(seq)
        num_fresh = self.blocks_needed(seq.num_tokens) - len(hits)
        num_revived = sum(1 for b in hits if self._ref_counts[b] == 0)  # hits sitting in the free list
        return hits, num_fresh + num_revived

    def can_allocate(self, seq: Sequence) -> bool:
        return self._allocation_cost(seq)[1] <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` blocks for all its tokens, reusing cached prefix blocks; sets
        ``num_cached_tokens`` and ``num_computed_tokens`` to the hit length."""
        if seq.block_table:
            raise RuntimeError(f"{seq.request_id}: already holds KV blocks")
        hits, cost = self._allocation_cost(seq)
        if cost > len(self._free):
            raise RuntimeError(f"{seq.request_id}: needs {cost} free KV blocks, "
                               f"{len(self._free)} left; call can_allocate first")
        for block_id in hits:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1
        num_fresh = self.blocks_needed(seq.num_tokens) - len(hits)
        seq.block_table = hits + [self._take_fresh() for _ in range(num_fresh)]
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size

    def _take_fresh(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        old = self._hashes[block_id]
        if old is not None:  # evict: this content can no longer be hit
            if self._cached.get(old) == block_id:
                del self._cached[old]
            self._hashes[block_id] = None
        self._ref_counts[block_id] = 1
        return block_id

    def may_append(self, seq: Sequence) -> bool:
        """Whether the free list can cover KV slots for all of ``seq``'s current tokens."""
        return self.blocks_needed(seq.num_tokens) - len(seq.block_table) <= len(self._free)

    def append_slot(self, seq: Sequence) -> None:
        """Grow ``seq``'s table to hold all its tokens (one new block every ``block_size`` decodes)."""
        if not self.may_append(seq):
            raise RuntimeError(f"{seq.request_id}: no free KV block; call may_append first")
        while len(seq.block_table) < self.blocks_needed(seq.num_tokens):
            seq.block_table.append(self._take_fresh())

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; its KV is forgotten by the sequence (recompute on return)."""
        # tail first, so a sequence's later blocks (least likely shared) are evicted first
        for block_id in reversed(seq.block_table):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._stale.discard(block_id)
                self._free[block_id] = None
                if self._hashes[block_id] is None:
                    self._free.move_to_end(block_id, last=False)  # nothing worth keeping: reuse first
        seq.block_table = []
        seq.num_cached_tokens = seq.num_computed_tokens = 0


@dataclass(frozen=True)
class MemoryPlan:
    num_blocks: int
    num_adapter_slots: int
    unused_bytes: int


@dataclass(frozen=True)
class MemoryBudget:
    """One device byte budget split between KV blocks and GPU adapter slots (S-LoRA unified paging).

    Both live in one pool measured in bytes, so every adapter slot costs
    ``bytes_per_adapter_slot / bytes_per_block`` KV blocks. Example, Llama-2-7B fp16: a KV token is
    2·32·4096·2 B = 512 KiB; a rank-16 adapter on all 7 projections is 80 MB, i.e. one slot
    ≈ 152 tokens of context. More slots mean fewer adapter swaps and larger β groups per step; more
    blocks mean larger batches and fewer preemptions. The split is fixed at start-up (no tensor is
    reinterpreted at run time): pick ``max_loras`` ≈ the adapters a step really mixes (β), give the
    rest to KV.
    """

    total_bytes: int
    bytes_per_block: int
    bytes_per_adapter_slot: int

    def __post_init__(self) -> None:
        if min(self.total_bytes, self.bytes_per_block, self.bytes_per_adapter_slot) <= 0:
            raise ConfigError(f"memory budget sizes must be positive, got {self}")

    @property
    def blocks_per_adapter_slot(self) -> float:
        """The exchange rate: KV blocks given up for each adapter slot."""
        return self.bytes_per_adapter_slot / self.bytes_per_block

    def max_adapter_slots(self, min_blocks: int = 1) -> int:
        spare = self.total_bytes - min_blocks * self.bytes_per_block
        return max(spare // self.bytes_per_adapter_slot, 0)

    def split(self, num_adapter_slots: int, min_blocks: int = 1) -> MemoryPlan:
        """Reserve ``num_adapter_slots`` slots first, then fill the rest with KV blocks."""
        if num_adapter_slots < 0 or num_adapter_slots > self.max_adapter_slots(min_blocks):
            raise ConfigError(
                f"{num_adapter_slots} adapter slots of {self.bytes_per_adapter_slot} B leave fewer "
                f"than {min_blocks} KV blocks in {self.total_bytes} B; "
                f"at most {self.max_adapter_slots(min_blocks)} fit")
        rest = self.total_bytes - num_adapter_slots * self.bytes_per_adapter_slot
        num_blocks = rest // self.bytes_per_block
        return MemoryPlan(num_blocks, num_adapter_slots, rest - num_blocks * self.bytes_per_block)


def kv_block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                   dtype_bytes: int) -> int:
    """Bytes of one KV block over all layers (K and V)."""
    return 2 * num_layers * num_kv_heads * head_dim * block_size * dtype_bytes


def adapter_slot_bytes(num_layers: int, projection_shapes: Iterable[tuple[int, int]],
                       max_rank: int, dtype_bytes: int) -> int:
    """Bytes of one GPU slot able to hold any adapter up to ``max_rank``: A (r×in) and B (out×r)
    for each (in_features, out_features) projection of a layer, times the layers."""
    per_layer = sum(max_rank * (fan_in + fan_out) for fan_in, fan_out in projection_shapes)
    return num_layers * per_layer * dtype_bytes
