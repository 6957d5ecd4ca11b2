"""Multi-LoRA shrink/expand references and the per-step metadata (CPU, float64).

Oracle: ``lora_apply_ref``, a per-token loop that never looks at the grouping metadata. Adapter rows
and columns past each slot's real rank are poisoned (``poison_past_rank``): an op that reads them
fails."""

import pytest
import torch

from inlaid.kernels.lora import (LoraBatchMeta, lora_apply_ref, lora_backend, lora_expand,
                                 lora_expand_ref, lora_shrink, lora_shrink_ref)

RANKS = (1, 8, 16, 64)


def poison_past_rank(a_or_b: torch.Tensor, rank: int, dim: int) -> None:
    """Poison one slot's A rows (dim 0 of [R, in]) or B columns (dim 1 of [out, R]) past ``rank``.
    B's columns up to the rank's multiple of 8 get a large finite value: the Triton epilogues may
    read them (16-byte loads, ``inlaid.kernels.triton.rank_mask``) as long as they add nothing,
    times the shrink's zeros; NaN past that, and past the rank in A, which nothing may read."""
    past = a_or_b.narrow(dim, rank, a_or_b.shape[dim] - rank)
    past.fill_(float("nan"))
    if dim == 1:
        r8 = min(-(-rank // 8) * 8, a_or_b.shape[1])
        a_or_b[:, rank:r8] = 1e3


def make_adapters(num_loras, in_features, widths, max_rank=64, dtype=torch.float64, device="cpu",
                  seed=0):
    """Per-slice A [L, R, in] and B [L, out_s, R], ranks drawn from RANKS, poisoned past each rank."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.tensor([RANKS[i % len(RANKS)] for i in torch.randperm(num_loras, generator=gen)],
                         dtype=torch.int32)
    ranks.clamp_(max=max_rank)
    scalings = (torch.rand(num_loras, generator=gen) + 0.5).float()
    lora_a, lora_b = [], []
    for width in widths:
        a = torch.randn(num_loras, max_rank, in_features, generator=gen) / in_features ** 0.5
        b = torch.randn(num_loras, width, max_rank, generator=gen) / 4
        for slot, r in enumerate(ranks.tolist()):
            poison_past_rank(a[slot], r, 0)
            poison_past_rank(b[slot], r, 1)
        lora_a.append(a.to(device, dtype))
        lora_b.append(b.to(device, dtype))
    return lora_a, lora_b, ranks.to(device), scalings.to(device)


def make_slots(pattern, num_tokens, num_loras, seed=0, device="cpu"):
    """int32 [T] slot per token; patterns from the serving workloads, plus −1 mixed in."""
    gen = torch.Generator().manual_seed(seed)
    if pattern == "distinct":  # each token its own adapter, as far as slots go
        slots = torch.randperm(max(num_tokens, num_loras), generator=gen)[:num_tokens] % num_loras
    elif pattern == "uniform":
        slots = torch.randint(0, num_loras, (num_tokens,), generator=gen)
    elif pattern == "identical":
        slots = torch.full((num_tokens,), int(torch.randint(0, num_loras, (1,), generator=gen)))
    elif pattern == "mixed":  # uniform with about a third of the tokens carrying no adapter
        slots = torch.randint(-1, num_loras, (num_tokens,), generator=gen)
        slots[torch.rand(num_tokens, generator=gen) < 0.3] = -1
    elif pattern == "none":
        slots = torch.full((num_tokens,), -1)
    else:
        raise ValueError(pattern)
    return slots.to(device, torch.int32)


def expected_groups(slots, num_loras):
    """{slot: ascending token ids} for in-range slots."""
    groups = {}
    for t, s in enumerate(slots.tolist()):
        if 0 <= s < num_loras:
            groups.setdefault(s, []).append(t)
    return dict(sorted(groups.items()))


def check_meta(meta, slots):
    num_loras, num = meta.max_loras, slots.shape[0]
    groups = expected_groups(slots, num_loras)
    active, counts = list(groups), [len(v) for v in groups.values()]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    pad = num_loras - len(active)
    assert meta.active_slots.tolist() == active + [-1] * pad
    assert meta.num_tokens.tolist() == counts + [0] * pad
    assert meta.token_start.tolist() == starts + [0] * pad
    ids = meta.sorted_token_ids.tolist()
    assert ids[:sum(counts)] == [t for v in groups.values() for t in v]  # grouped, stable
    grouped = {t for v in groups.values() for t in v}
    assert ids[sum(counts):] == [t for t in range(meta.max_tokens) if t not in grouped]
    assert meta.num_tokens_total == num
    tiles = [(slot, start + m, min(meta.block_m, count - m))
             for slot, start, count in zip(active, starts, counts) for m in range(0, count, meta.block_m)]
    assert len(tiles) <= meta.tile_bound(num)
    pad = meta.tile_slot.shape[0] - len(tiles)
    assert list(zip(meta.tile_slot.tolist(), meta.tile_start.tolist(), meta.tile_rows.tolist())) == \
        tiles + [(-1, 0, 0)] * pad


@pytest.mark.parametrize("pattern", ["distinct", "uniform", "identical", "mixed", "none"])
@pytest.mark.parametrize("num_tokens,max_tokens,num_loras,block_m", [
    (1, 1, 1, 16), (13, 16, 4, 4), (37, 64, 7, 2), (50, 50, 50, 16), (40, 40, 3, 1)])
def test_meta_invariants(pattern, num_tokens, max_tokens, num_loras, block_m):
    slots = make_slots(pattern, num_tokens, num_loras, seed=num_tokens)
    check_meta(LoraBatchMeta(max_tokens, num_loras, block_m=block_m).prepare(slots), slots)


@pytest.mark.parametrize("pattern", ["distinct", "uniform", "identical", "mixed", "none"])
@pytest.mark.parametrize("num_tokens,max_tokens,num_loras,block_m", [
    (1, 1, 1, 16), (13, 16, 4, 4), (37, 64, 7, 2), (50, 50, 50, 16), (40, 40, 3, 1), (0, 8, 3, 16)])
def test_host_grouping_equals_the_device_ops(pattern, num_tokens, max_tokens, num_loras, block_m):
    """prepare_host (numpy, the engine's path) leaves every buffer as prepare (torch ops) does,
    out-of-range slots included, after a different step has filled them."""
    slots = make_slots(pattern, num_tokens, num_loras, seed=num_tokens + block_m)
    if num_tokens > 2:
        slots[0], slots[2] = num_loras + 3, -7  # out of range: no adapter
    stale = make_slots("distinct", max_tokens, num_loras, seed=99)
    on_device = LoraBatchMeta(max_tokens, num_loras, block_m=block_m).prepare(stale).prepare(slots)
    on_host = LoraBatchMeta(max_tokens, num_loras, block_m=block_m).prepare_host(stale.tolist())
    on_host.prepare_host(slots.tolist())
    assert torch.equal(on_host._packed, on_device._packed)
    assert on_host.num_tokens_total == on_device.num_tokens_total == num_tokens
    check_meta(on_host, slots)
    with pytest.raises(ValueError):
        on_host.prepare_host([0] * (max_tokens + 1))


@pytest.mark.parametrize("block_m", [1, 2, 4, 16])
def test_tile_bound_is_tight_for_its_worst_case(block_m):
    """Groups of block_m + 1 tokens waste the most tiles; the bound must still hold."""
    num_loras = 12
    slots = torch.arange(num_loras).repeat_interleave(block_m + 1).to(torch.int32)
    meta = LoraBatchMeta(slots.shape[0], num_loras, block_m=block_m).prepare(slots)
    check_meta(meta, slots)
    assert (meta.tile_slot >= 0).sum().item() == 2 * num_loras <= meta.tile_bound(slots.shape[0])


def test_meta_reuses_buffers_and_forgets_the_last_step():
    meta = LoraBatchMeta(32, 8)
    buffers = (meta.sorted_token_ids, meta.active_slots, meta.num_tokens, meta.token_start,
               meta.tile_slot, meta.tile_start, meta.tile_rows)
    ptrs = [b.data_ptr() for b in buffers]
    meta.prepare(make_slots("distinct", 32, 8, seed=1))
    fewer = make_slots("identical", 5, 8, seed=2)
    meta.prepare(fewer)
    check_meta(meta, fewer)
    assert [b.data_ptr() for b in buffers] == ptrs


def test_meta_out_of_range_slots_count_as_absent_and_bad_input_is_refused():
    slots = torch.tensor([3, -1, 9, 0, -5, 3], dtype=torch.int32)
    meta = LoraBatchMeta(8, 4).prepare(slots)
    assert meta.active_slots.tolist() == [0, 3, -1, -1]
    assert meta.sorted_token_ids.tolist()[:3] == [3, 0, 5]
    with pytest.raises(ValueError):
        meta.prepare(torch.zeros(9, dtype=torch.int32))  # more than max_tokens
    with pytest.raises(ValueError):
        meta.prepare(torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError):
        LoraBatchMeta(0, 4)
    with pytest.raises(ValueError):
        LoraBatchMeta(4, 4, block_m=12)


def run_ref_ops(x, y, lora_a, lora_b, slots, ranks, scalings, offsets=None, max_tokens=None):
    meta = LoraBatchMeta(max_tokens or x.shape[0], ranks.shape[0]).prepare(slots)
    buf = lora_shrink(x, lora_a, meta, ranks, scalings, backend="ref")
    out = lora_expand(buf, lora_b, meta, ranks, y.clone(), offsets, backend="ref")
    return buf, out


@pytest.mark.parametrize("widths", [(40,), (40, 24, 16)])
@pytest.mark.parametrize("pattern", ["distinct", "uniform", "identical", "mixed", "none"])
@pytest.mark.parametrize("num_tokens,num_loras", [(1, 1), (19, 4), (53, 9)])
def test_reference_ops_match_oracle(widths, pattern, num_tokens, num_loras):
    seed = num_tokens * 7 + len(widths)
    lora_a, lora_b, ranks, scalings = make_adapters(num_loras, 48, widths, seed=seed)
    slots = make_slots(pattern, num_tokens, num_loras, seed=seed)
    x = torch.randn(num_tokens, 48, dtype=torch.float64)
    y = torch.randn(num_tokens, sum(widths), dtype=torch.float64)
    want = lora_apply_ref(x, y, lora_a, lora_b, slots, ranks, scalings)
    buf, got = run_ref_ops(x, y, lora_a, lora_b, slots, ranks, scalings, max_tokens=num_tokens + 3)
    assert buf.dtype == torch.float64 and buf.shape == (len(widths), num_tokens, 64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    absent = slots < 0
    assert torch.equal(got[absent], y[absent])  # rows without an adapter untouched
    assert not buf[:, absent].any()  # buf is zero for them...
    for t, s in enumerate(slots.tolist()):  # ...and past each token's rank
        if s >= 0:
            assert not buf[:, t, ranks[s]:].any()


def test_mixed_ranks_in_one_batch_use_only_real_rank():
    """Every rank of RANKS in one batch; the NaN past each rank would surface if read."""
    lora_a, lora_b, ranks, scalings = make_adapters(8, 32, (24, 8, 8), seed=3)
    assert set(ranks.tolist()) == set(RANKS)
    slots = make_slots("uniform", 40, 8, seed=3)
    x, y = torch.randn(40, 32, dtype=torch.float64), torch.randn(40, 40, dtype=torch.float64)
    _, got = run_ref_ops(x, y, lora_a, lora_b, slots, ranks, scalings)
    assert not got.isnan().any()
    torch.testing.assert_close(got, lora_apply_ref(x, y, lora_a, lora_b, slots, ranks, scalings))


def test_custom_slice_offsets_leave_other_columns_alone():
    lora_a, lora_b, ranks, scalings = make_adapters(3, 16, (8, 12), seed=4)
    slots = make_slots("mixed", 11, 3, seed=4)
    x, y = torch.randn(11, 16, dtype=torch.float64), torch.randn(11, 30, dtype=torch.float64)
    offsets = [20, 3]  # slice 0 after slice 1, gaps at 0..2, 15..19 and 28..29
    _, got = run_ref_ops(x, y, lora_a, lora_b, slots, ranks, scalings, offsets)
    torch.testing.assert_close(got, lora_apply_ref(x, y, lora_a, lora_b, slots, ranks, scalings, offsets))
    for cols in (slice(0, 3), slice(15, 20), slice(28, 30)):
        assert torch.equal(got[:, cols], y[:, cols])


def test_shrink_out_buffer_is_fully_defined():
    lora_a, _, ranks, scalings = make_adapters(4, 16, (8, 8), seed=5)
    slots = make_slots("mixed", 9, 4, seed=5)
    x = torch.randn(9, 16, dtype=torch.float64)
    meta = LoraBatchMeta(9, 4).prepare(slots)
    out = torch.full((2, 9, 64), float("nan"), dtype=torch.float64)
    got = lora_shrink_ref(x, lora_a, meta, ranks, scalings, out=out)
    assert got is out and not out.isnan().any()
    torch.testing.assert_close(out, lora_shrink_ref(x, lora_a, meta, ranks, scalings))


def test_low_precision_reference_accumulates_in_fp32():
    lora_a, lora_b, ranks, scalings = make_adapters(4, 64, (32,), dtype=torch.bfloat16, seed=6)
    slots = make_slots("uniform", 10, 4, seed=6)
    x, y = torch.randn(10, 64, dtype=torch.bfloat16), torch.randn(10, 32, dtype=torch.bfloat16)
    buf, got = run_ref_ops(x, y, lora_a, lora_b, slots, ranks, scalings)
    assert buf.dtype == torch.float32 and got.dtype == torch.bfloat16
    want = lora_apply_ref(x.double(), y.double(), [a.double() for a in lora_a],
                          [b.double() for b in lora_b], slots, ranks, scalings)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-2


def test_dispatch_picks_reference_on_cpu_and_refuses_unknown_backends():
    lora_a, lora_b, ranks, scalings = make_adapters(2, 16, (8,), seed=7)
    x = torch.randn(3, 16, dtype=torch.float64)
    meta = LoraBatchMeta(3, 2).prepare(torch.tensor([0, -1, 1], dtype=torch.int32))
    assert lora_backend(x, None) == "ref" and lora_backend(x.half(), None) == "ref"
    torch.testing.assert_close(lora_shrink(x, lora_a, meta, ranks, scalings),
                               lora_shrink_ref(x, lora_a, meta, ranks, scalings))
    with pytest.raises(ValueError):
        lora_shrink(x, lora_a, meta, ranks, scalings, backend="cuda-magic")
    buf = lora_shrink_ref(x, lora_a, meta, ranks, scalings)
    y = torch.zeros(3, 8, dtype=torch.float64)
    assert lora_expand(buf, lora_b, meta, ranks, y) is y


def test_empty_step():
    lora_a, lora_b, ranks, scalings = make_adapters(2, 16, (8,), seed=8)
    x, y = torch.randn(0, 16, dtype=torch.float64), torch.randn(0, 8, dtype=torch.float64)
    buf, got = run_ref_ops(x, y, lora_a, lora_b, torch.zeros(0, dtype=torch.int32), ranks, scalings,
                           max_tokens=4)
    assert buf.shape == (1, 0, 64) and got.shape == (0, 8)
