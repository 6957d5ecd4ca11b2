"""Decode attention with RoPE + KV write fused in (``inlaid.kernels.triton.rope_attention``) against
the two kernels it replaces (``rope_write_kv[_lora]_triton`` then the mma ``paged_decode_attention``)
and against the torch path (``apply_rope`` + ``write_kv`` + SDPA over gathered K/V). GPU only.

Fresh random inputs: MHA and GQA, 1-8 splits per context, sliding windows, context lengths from 1
to several blocks, zero-length padding rows, and LoRA updates on q/k/v with mixed ranks and tokens
without an adapter. Bounds:
- against the separate kernels: the cache rows written and the outputs are the same values
  (both round the same fp32 expressions to the cache dtype, and the walk and merge are the same
  code), up to the compiler's freedom to contract a multiply-add differently in the two kernels:
  1 ulp of the written rows' magnitude, and on the outputs 2 ulps at magnitude 1 (fp16 2e-3,
  bf16 1.6e-2; an H100 run saw 1 bf16 ulp, 0.0039) and 1e-5 for fp32;
- against torch: the attention bounds of test_paged_attention_gpu.py (fp16 2e-3, bf16 2e-2, fp32
  1e-4: the fp32 kernels' dots are IEEE).
The caches' other slots must be untouched and the output fully written (poisoned with NaN)."""

import importlib.util
import os

import pytest
import torch

from inlaid.engine.attention import build_batch, paged_attention, write_kv
from inlaid.engine.model import apply_rope

from .test_lora import poison_past_rank

# TRITON_INTERPRET=1 runs the kernels in Triton's CPU interpreter instead (slow; for development)
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")]
BOUND = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}
SEPARATE_BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def _case(heads, kv_heads, dim, block, dtype, lens, seed, rank=None, num_loras=3):
    gen = torch.Generator().manual_seed(seed)
    batch = len(lens)
    num_blocks = sum(-(-max(n, 1) // block) for n in lens) + 3
    caches = [torch.randn(num_blocks * block, kv_heads, dim, generator=gen).to(dtype) for _ in range(2)]
    perm = torch.randperm(num_blocks - 1, generator=gen).add(1).tolist()  # block 0: the padding rows' sink
    tables, used, slots = [], 0, []
    for n in lens:
        count = -(-max(n, 1) // block)
        table = perm[used:used + count]
        used += count
        tables.append(table)
        slots.append(table[(n - 1) // block] * block + (n - 1) % block if n else 0)
    width = max(len(t) for t in tables)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    angles = torch.rand(batch, dim // 2, generator=gen) * 50
    c = dict(
        qkv=qkv, cos=torch.cat([angles.cos()] * 2, 1).to(dtype), sin=torch.cat([angles.sin()] * 2, 1).to(dtype),
        caches=caches, slots=torch.tensor(slots, dtype=torch.int64),
        tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        lens=torch.tensor(lens, dtype=torch.int32), raw_tables=tables)
    if rank is not None:
        ranks = torch.tensor([rank, max(1, rank // 2), rank][:num_loras], dtype=torch.int32)
        lora_b = [torch.randn(num_loras, n * dim, rank, generator=gen).mul(0.1).to(dtype)
                  for n in (heads, kv_heads, kv_heads)]
        for i, r in enumerate(ranks.tolist()):  # columns past a slot's rank add nothing: poison them
            for b in lora_b:
                poison_past_rank(b[i], r, 1)
        buf = torch.randn(3, batch, rank, generator=gen)
        slot_of_token = torch.randint(0, num_loras + 1, (batch,), generator=gen).to(torch.int32)  # L: none
        slot_of_token[0] = num_loras - 1  # the last slot, whose last B row ends each tensor
        c["lora"] = (buf, lora_b, slot_of_token, ranks)
    c = {k: _to(v) for k, v in c.items()}
    if rank is not None:  # NaN right after each B: a read past a row of B's own width fails
        buf, lora_b, slot_of_token, ranks = c["lora"]
        c["lora"] = (buf, [_nan_tail(b) for b in lora_b], slot_of_token, ranks)
    return c


def _nan_tail(t):
    """``t`` copied into the front of a buffer whose 16 elements after it are NaN."""
    flat = torch.full((t.numel() + 16,), float("nan"), dtype=t.dtype, device=t.device)
    out = flat[:t.numel()].view(t.shape)
    out.copy_(t)
    return out


def _to(v):
    if isinstance(v, torch.Tensor):
        return v.to(DEVICE)
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], (torch.Tensor, list)):
        return type(v)(_to(x) for x in v)
    return v


def _separate(c, heads, kv_heads, dim, block, scale, window, splits):
    """The two kernels the fused one replaces, on copies of the inputs."""
    from inlaid.kernels.triton.norm_rope import rope_write_kv_lora_triton, rope_write_kv_triton
    from inlaid.kernels.triton.paged_attention import paged_decode_attention

    qkv, (kc, vc) = c["qkv"].clone(), [t.clone() for t in c["caches"]]
    q, k, v = (t.reshape(qkv.shape[0], -1, dim)
               for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], 1))
    if "lora" in c:
        buf, lora_b, slot_of_token, ranks = c["lora"]
        rope_write_kv_lora_triton(q, k, v, c["cos"], c["sin"], kc, vc, c["slots"], buf, lora_b, slot_of_token,
                                  ranks)
    else:
        rope_write_kv_triton(q, k, v, c["cos"], c["sin"], kc, vc, c["slots"])
    out = paged_decode_attention(q, kc, vc, c["tables"], c["lens"], block, scale, window, splits=splits)
    return out, kc, vc


def _torch(c, heads, kv_heads, dim, block, scale, window):
    """apply_rope + write_kv + SDPA over gathered K/V, the LoRA update added in fp32 as lora_expand
    adds it (rounded once to the activation dtype)."""
    qkv, (kc, vc) = c["qkv"].clone(), [t.clone() for t in c["caches"]]
    if "lora" in c:
        buf, lora_b, slot_of_token, ranks = c["lora"]
        cols, delta = 0, torch.zeros(qkv.shape, dtype=torch.float32, device=qkv.device)
        for i, b in enumerate(lora_b):
            for t in range(qkv.shape[0]):
                s = int(slot_of_token[t])
                if s < b.shape[0]:
                    r = int(ranks[s])
                    delta[t, cols:cols + b.shape[1]] = b[s, :, :r].float() @ buf[i, t, :r]
            cols += b.shape[1]
        qkv = (qkv.float() + delta).to(qkv.dtype)
    q, k, v = (t.reshape(qkv.shape[0], -1, dim)
               for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], 1))
    q, k = apply_rope(q, c["cos"], c["sin"]), apply_rope(k, c["cos"], c["sin"])
    live = c["lens"] > 0
    write_kv(kc, vc, k[live], v[live], c["slots"][live])
    out = torch.zeros_like(q)
    rows = live.nonzero().flatten().tolist()
    if rows:
        pieces = [(c["raw_tables"][r], int(c["lens"][r]) - 1, 1) for r in rows]
        batch = build_batch(pieces, block, "cpu")
        for name in ("decode_rows", "decode_slots", "decode_lens", "slot_mapping"):
            setattr(batch, name, getattr(batch, name).to(q.device))
        out[rows] = paged_attention(q[rows].contiguous(), kc, vc, batch, scale, window)
    return out, kc, vc


@pytest.mark.parametrize("heads,kv_heads,dim,block", [(32, 32, 128, 16), (8, 2, 64, 16), (4, 1, 64, 8)])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("splits", [1, 2, 8])
@pytest.mark.parametrize("dtype,rank", [(torch.float16, None), (torch.float16, 16), (torch.bfloat16, 8),
                                        (torch.float32, 16), (torch.float16, 12)])
def test_fused_matches_separate_and_torch(heads, kv_heads, dim, block, window, splits, dtype, rank):
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton 3.6's interpreter gets bf16 dots wrong (the unfused mma kernel too)")
    _check_fused(heads, kv_heads, dim, block, window, splits, dtype, rank)


@pytest.mark.parametrize("heads,kv_heads,dim,block", [(32, 32, 128, 16), (8, 2, 64, 16)])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("dtype,rank", [(torch.float16, 16), (torch.float16, None), (torch.float32, 12)])
def test_compact_launch_matches_separate_and_torch(monkeypatch, heads, kv_heads, dim, block, window, splits,
                                                   dtype, rank):
    """The launch that wide grids get (decode_launch: 32-token tiles, 2 stages, registers capped at
    64), forced for these small grids: the same bounds."""
    from inlaid.kernels import decode_splits
    from inlaid.kernels.triton import paged_attention

    monkeypatch.setattr(decode_splits, "DEFAULT_RESIDENT", -1)  # every grid "past one wave"
    monkeypatch.setattr(paged_attention, "_sms", lambda device: 132)  # the interpreter too
    assert decode_splits.decode_launch(1, 132) == decode_splits.COMPACT_LAUNCH
    _check_fused(heads, kv_heads, dim, block, window, splits, dtype, rank)


def _check_fused(heads, kv_heads, dim, block, window, splits, dtype, rank):
    from inlaid.kernels.triton.rope_attention import rope_decode_attention

    lens = [1, 7, block, block + 1, 200, 63, 0]  # the last row is graph padding: context 0
    c = _case(heads, kv_heads, dim, block, dtype, lens, seed=heads + dim + splits + (rank or 0), rank=rank)
    scale = dim ** -0.5
    want_out, want_k, want_v = _separate(c, heads, kv_heads, dim, block, scale, window, splits)
    ref_out, ref_k, ref_v = _torch(c, heads, kv_heads, dim, block, scale, window)
    qkv_before = c["qkv"].clone()
    kc, vc = c["caches"]
    out = torch.full((len(lens), heads, dim), float("nan"), dtype=dtype, device=DEVICE)
    for _ in range(2):  # a second launch: the split merge's counters are back at zero
        got = rope_decode_attention(c["qkv"], heads, kv_heads, c["cos"], c["sin"], kc, vc, c["slots"], c["tables"],
                                    c["lens"], block, scale, window, lora=c.get("lora"), out=out, splits=splits)
    assert got.data_ptr() == out.data_ptr() and not got.isnan().any()
    assert torch.equal(c["qkv"], qkv_before)
    live = (c["lens"] > 0).nonzero().flatten()
    written = c["slots"][live]
    for cache, want in ((kc, want_k), (vc, want_v)):
        ulp = torch.finfo(dtype).eps * want[written].float().abs().amax().item()
        assert (cache[written].float() - want[written].float()).abs().max().item() <= ulp
        untouched = torch.ones(cache.shape[0], dtype=torch.bool, device=DEVICE)
        untouched[written] = False
        untouched[0] = False  # the padding row's sink slot: the separate kernel writes it, we need not
        assert torch.equal(cache[untouched], want[untouched])
    off_separate = (got.float() - want_out.float()).abs().max().item()
    off_torch = (got.float() - ref_out.float()).abs().max().item()
    print(f"max |fused - separate| {off_separate:.3g}, max |fused - torch| {off_torch:.3g}")
    assert off_separate <= SEPARATE_BOUND[dtype]
    assert off_torch < BOUND[dtype]
    assert torch.equal(got[-1], torch.zeros_like(got[-1]))  # padding row: zeros
