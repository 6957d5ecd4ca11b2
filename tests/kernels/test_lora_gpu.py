"""Triton multi-LoRA shrink/expand against float64 oracles on fresh random inputs (GPU only).

Bounds: shrink ||buf - ref|| / ||ref|| < 1e-3 (fp16/bf16 inputs are exact in the fp32-accumulating
dot); shrink + expand, on the added part, ||(y - y0) - delta_ref|| / ||delta_ref|| < 1e-2 (tf32 dot on
the fp32 buf, then one rounding to fp16/bf16). The oracle runs on the same rounded inputs upcast to
float64. Adapter entries past each slot's rank are poisoned (test_lora.poison_past_rank), so a kernel
that reads them, or adds them, fails; rows of tokens without an adapter (and y columns outside the
slices) must stay bit-identical."""

import importlib.util

import pytest
import torch

from inlaid.kernels.lora import LoraBatchMeta, lora_apply_ref, lora_expand, lora_shrink, lora_shrink_ref

from .test_lora import check_meta, make_adapters, make_slots

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")]
SHRINK_TOL, TOL = 1e-3, 1e-2
DTYPES = [torch.float16, torch.bfloat16]


def rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def problem(dtype, num_tokens, num_loras, in_features, widths, pattern, max_rank=64, seed=0):
    lora_a, lora_b, ranks, scalings = make_adapters(num_loras, in_features, widths, max_rank, dtype,
                                                    "cuda", seed)
    slots = make_slots(pattern, num_tokens, num_loras, seed, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_tokens, in_features, device="cuda", generator=gen).to(dtype)
    # y small next to the update, so y's own rounding does not mask errors in the update
    y = (0.25 * torch.randn(num_tokens, sum(widths), device="cuda", generator=gen)).to(dtype)
    return x, y, lora_a, lora_b, slots, ranks, scalings


def oracle(x, y, lora_a, lora_b, slots, ranks, scalings, offsets=None):
    up = [t.double() for t in lora_a], [t.double() for t in lora_b]
    return lora_apply_ref(x.double(), y.double(), *up, slots, ranks, scalings, offsets)


def check_y(y0, y, want, slots):
    absent = slots < 0
    assert torch.equal(y[absent], y0[absent]), "rows without an adapter changed"
    assert not y.isnan().any()
    if (~absent).any():
        delta_ref = want - y0.double()
        assert rel(y.double() - y0.double(), delta_ref) < TOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", ["distinct", "uniform", "identical", "mixed", "none"])
@pytest.mark.parametrize("num_tokens,num_loras,widths", [
    (1, 4, (512, 128, 128)),  # decode, fused q/k/v under GQA
    (7, 8, (1000,)),  # widths and K off every block multiple
    (32, 32, (384, 384)),
    (300, 6, (512, 128, 128)),  # prefill tiles
])
def test_triton_matches_oracle(dtype, pattern, num_tokens, num_loras, widths):
    in_features = 1000 if widths == (1000,) else 512
    x, y0, lora_a, lora_b, slots, ranks, scalings = problem(dtype, num_tokens, num_loras, in_features,
                                                            widths, pattern, seed=num_tokens)
    meta = LoraBatchMeta(num_tokens + 5, num_loras, "cuda").prepare(slots)
    buf = lora_shrink(x, lora_a, meta, ranks, scalings, backend="triton")
    ref_buf = lora_shrink_ref(x.double(), [a.double() for a in lora_a], meta, ranks, scalings)
    assert not buf[ref_buf == 0].any()  # zeros for absent tokens and past each rank
    if ref_buf.any():
        assert rel(buf, ref_buf) < SHRINK_TOL
    y = lora_expand(buf, lora_b, meta, ranks, y0.clone(), backend="triton")
    check_y(y0, y, oracle(x, y0, lora_a, lora_b, slots, ranks, scalings), slots)


@pytest.mark.parametrize("block_m", [32, 64])
def test_taller_token_tiles(block_m):
    x, y0, lora_a, lora_b, slots, ranks, scalings = problem(torch.bfloat16, 300, 5, 256, (192, 64),
                                                            "mixed", seed=block_m)
    meta = LoraBatchMeta(300, 5, "cuda", block_m=block_m).prepare(slots)
    buf = lora_shrink(x, lora_a, meta, ranks, scalings, backend="triton")
    y = lora_expand(buf, lora_b, meta, ranks, y0.clone(), backend="triton")
    check_y(y0, y, oracle(x, y0, lora_a, lora_b, slots, ranks, scalings), slots)


@pytest.mark.parametrize("dtype", DTYPES)
def test_expand_alone_with_offsets_and_rank_128(dtype):
    """Expand from an exact buf, into a wider y with slices out of order; max_rank 128."""
    widths, offsets = (256, 96), [130, 8]
    lora_a, lora_b, ranks, scalings = make_adapters(5, 64, widths, 128, dtype, "cuda", seed=11)
    ranks[0] = 128  # slot 0 uses every column: give it finite weights throughout
    for t in lora_a + lora_b:
        t[0] = torch.randn_like(t[0]) / 8
    slots = make_slots("mixed", 20, 5, 11, "cuda")
    x = torch.randn(20, 64, device="cuda").to(dtype)
    y0 = (0.25 * torch.randn(20, 400, device="cuda")).to(dtype)
    meta = LoraBatchMeta(20, 5, "cuda").prepare(slots)
    buf = lora_shrink_ref(x, lora_a, meta, ranks, scalings)
    y = lora_expand(buf, lora_b, meta, ranks, y0.clone(), offsets, backend="triton")
    want = oracle(x, y0, lora_a, lora_b, slots, ranks, scalings, offsets)
    check_y(y0, y, want, slots)
    for cols in (slice(0, 8), slice(104, 130), slice(386, 400)):
        assert torch.equal(y[:, cols], y0[:, cols])


def test_shrink_zeroes_a_poisoned_out_buffer():
    x, _, lora_a, _, slots, ranks, scalings = problem(torch.float16, 40, 6, 256, (64, 64), "mixed", seed=2)
    meta = LoraBatchMeta(40, 6, "cuda").prepare(slots)
    out = torch.full((2, 40, 64), float("nan"), device="cuda")
    got = lora_shrink(x, lora_a, meta, ranks, scalings, out=out, backend="triton")
    assert got is out and not out.isnan().any()
    assert not out[:, slots < 0].any()


def test_dispatch_picks_triton_on_cuda(monkeypatch):
    import inlaid.kernels.triton.lora_shrink as mod

    calls = []
    real = mod.lora_shrink_triton
    monkeypatch.setattr(mod, "lora_shrink_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, _, lora_a, _, slots, ranks, scalings = problem(torch.float16, 4, 2, 64, (32,), "uniform")
    lora_shrink(x, lora_a, LoraBatchMeta(4, 2, "cuda").prepare(slots), ranks, scalings)
    assert calls == [1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepare_and_kernels_replay_in_a_cuda_graph(dtype):
    """Capture prepare + shrink + expand once; replay with new slot contents in the static input."""
    num_tokens, num_loras, widths = 24, 8, (256, 64, 64)
    x, y0, lora_a, lora_b, slots, ranks, scalings = problem(dtype, num_tokens, num_loras, 128, widths,
                                                            "uniform", seed=5)
    meta = LoraBatchMeta(32, num_loras, "cuda")
    static_slots, y = slots.clone(), y0.clone()
    buf = torch.empty(len(widths), num_tokens, 64, device="cuda")

    def step():
        meta.prepare(static_slots)
        lora_shrink(x, lora_a, meta, ranks, scalings, out=buf, backend="triton")
        lora_expand(buf, lora_b, meta, ranks, y, backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm the allocator outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed, pattern in enumerate(["distinct", "identical", "mixed", "none", "uniform"]):
        new = make_slots(pattern, num_tokens, num_loras, seed=100 + seed, device="cuda")
        static_slots.copy_(new)
        y.copy_(y0)
        graph.replay()
        torch.cuda.synchronize()
        check_y(y0, y, oracle(x, y0, lora_a, lora_b, new, ranks, scalings), new)
        check_meta(meta, new)



@pytest.mark.parametrize("overlap", ["stream", "serial"])
@pytest.mark.parametrize("graph", [False, True])
def test_quant_linear_with_the_shrink_on_a_side_stream(monkeypatch, overlap, graph):
    """QuantLinear runs the shrink on a side stream next to the base GEMM (``stream``) or after it
    (``serial``): both give base + the oracle's LoRA update, eagerly and replayed from a CUDA graph
    with new inputs (where the fork and join are captured as graph branches)."""
    from inlaid.kernels.qlinear import DenseLinear, LoraSlots, QuantLinear

    monkeypatch.setenv("INLAID_BACKEND_LORA_OVERLAP", overlap)
    num_tokens, num_loras, widths = 32, 8, (1024, 256, 256)
    x, _, lora_a, lora_b, slots, ranks, scalings = problem(torch.float16, num_tokens, num_loras, 2048,
                                                           widths, "distinct", seed=7)
    weight = (torch.randn(sum(widths), 2048, device="cuda") / 45).half()
    layer = QuantLinear(DenseLinear(weight), LoraSlots(widths, lora_a, lora_b, ranks, scalings))
    meta = LoraBatchMeta(num_tokens, num_loras, "cuda")
    static_x, static_slots = x.clone(), slots.clone()

    def step():
        return layer(static_x, meta.prepare(static_slots))

    out = step()
    if graph:
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = step()
    for seed in range(3):
        new_x = torch.randn(num_tokens, 2048, device="cuda", generator=torch.Generator(
            device="cuda").manual_seed(seed)).half()
        new_slots = make_slots("mixed", num_tokens, num_loras, seed=50 + seed, device="cuda")
        static_x.copy_(new_x)
        static_slots.copy_(new_slots)
        y = (g.replay() or out) if graph else step()
        torch.cuda.synchronize()
        base = torch.nn.functional.linear(new_x, weight).double()
        want = oracle(new_x, base, lora_a, lora_b, new_slots, ranks, scalings)
        # rows without an adapter count too (their update is 0): a graph's cuBLAS call may round
        # differently from the eager one, so the check is the update's relative error, not equality
        assert rel(y.double() - base, want - base) < TOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", ["distinct", "identical", "mixed", "none"])
@pytest.mark.parametrize("num_tokens", [1, 32, 64])
def test_silu_mul_with_the_expand_fused_matches_the_oracle(dtype, pattern, num_tokens):
    """The decode path of gate/up: silu(gate) * up with the LoRA update expanded inside the kernel,
    against the float64 oracle's gate/up (base + update) through silu-and-mul in float64; bound
    rel < 1e-2 on the adapter rows (the update dominates them: y is small). Rows without an adapter
    are bit-identical to the plain kernel's, and the poison past the ranks adds nothing."""
    from inlaid.kernels.triton.norm_rope import silu_mul_lora_triton, silu_mul_triton

    inter, num_loras = 1000, 8  # not a multiple of the 128-column block
    x, y, lora_a, lora_b, slots, ranks, scalings = problem(dtype, num_tokens, num_loras, 256,
                                                           (inter, inter), pattern, seed=num_tokens)
    meta = LoraBatchMeta(num_tokens, num_loras, "cuda").prepare(slots)
    buf = lora_shrink(x, lora_a, meta, ranks, scalings, backend="triton")
    got = silu_mul_lora_triton(y, buf, lora_b, meta.slot_of_token, ranks)
    gate, up = oracle(x, y, lora_a, lora_b, slots, ranks, scalings).chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    absent = slots < 0
    assert not got.isnan().any()
    assert torch.equal(got[absent], silu_mul_triton(y)[absent])
    if (~absent).any():
        assert rel(got[~absent], want[~absent]) < TOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", ["distinct", "identical", "mixed", "none"])
@pytest.mark.parametrize("num_tokens", [1, 32, 64])
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (4, 4, 128)])
def test_rope_with_the_expand_fused_matches_the_oracle(dtype, pattern, num_tokens, heads, kv_heads, dim):
    """The decode path of q/k/v: RoPE and the KV-cache write with the LoRA update expanded inside
    the kernel, against the float64 oracle's q/k/v (base + update) rotated in float64; bound rel <
    1e-2 on the adapter rows. Rows without an adapter are bit-identical to the plain kernel's, NaN
    past the ranks adds nothing, and cache slots outside the step stay untouched (NaN)."""
    from inlaid.engine.model import apply_rope
    from inlaid.kernels.triton.norm_rope import rope_write_kv_lora_triton, rope_write_kv_triton

    widths = (heads * dim, kv_heads * dim, kv_heads * dim)
    x, y, lora_a, lora_b, slots, ranks, scalings = problem(dtype, num_tokens, 8, 256, widths, pattern,
                                                           seed=num_tokens + dim)
    meta = LoraBatchMeta(num_tokens, 8, "cuda").prepare(slots)
    buf = lora_shrink(x, lora_a, meta, ranks, scalings, backend="triton")
    gen = torch.Generator(device="cuda").manual_seed(dim)
    angles = 6.3 * torch.rand(num_tokens, dim // 2, device="cuda", generator=gen)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    num_slots = num_tokens + 5
    slot_mapping = torch.randperm(num_slots, device="cuda", generator=gen)[:num_tokens]

    def split(qkv):
        q, k, v = qkv.split(widths, dim=-1)
        return q.reshape(-1, heads, dim), k.reshape(-1, kv_heads, dim), v.reshape(-1, kv_heads, dim)

    def run(kernel, *lora):
        caches = [torch.full((num_slots, kv_heads, dim), float("nan"), device="cuda", dtype=dtype)
                  for _ in range(2)]
        q = kernel(*split(y.clone()), cos, sin, *caches, slot_mapping, *lora)
        untouched = torch.ones(num_slots, dtype=torch.bool, device="cuda")
        untouched[slot_mapping] = False
        assert all(c[untouched].isnan().all() for c in caches)
        return q, caches[0][slot_mapping], caches[1][slot_mapping]

    got = run(rope_write_kv_lora_triton, buf, lora_b, meta.slot_of_token, ranks)
    plain = run(rope_write_kv_triton)
    wq, wk, wv = split(oracle(x, y, lora_a, lora_b, slots, ranks, scalings))
    want = (apply_rope(wq, cos.double(), sin.double()), apply_rope(wk, cos.double(), sin.double()), wv)
    absent = slots < 0
    for g, p, w in zip(got, plain, want):
        assert not g.isnan().any()
        assert torch.equal(g[absent], p[absent])
        if (~absent).any():
            assert rel(g[~absent], w[~absent]) < TOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", ["distinct", "identical", "mixed", "none"])
@pytest.mark.parametrize("num_tokens", [1, 32, 64])
@pytest.mark.parametrize("hidden", [1000, 4096])
def test_add_norm_with_the_expand_fused_matches_the_oracle(dtype, pattern, num_tokens, hidden):
    """The decode path of o and down: the residual add + RMSNorm with the projection's LoRA update
    expanded inside the kernel, against the float64 oracle (h + base + update, and that normalised,
    in float64); bound rel < 1e-2 on the adapter rows (h and y are small next to the update). Rows
    without an adapter: the new residual stream is bit-identical to the plain kernel's and the
    normalised row agrees with it to 2 ulps. The poison past the ranks adds nothing, ``delta`` is left as
    it was, and a second launch (the arrival counters reset themselves) gives the same result."""
    from inlaid.kernels.triton.norm_rope import add_rms_norm_lora_triton, add_rms_norm_triton

    from .test_norm_rope_gpu import _ulp_close

    x, y, lora_a, lora_b, slots, ranks, scalings = problem(dtype, num_tokens, 8, 256, (hidden,), pattern,
                                                           seed=num_tokens + hidden)
    meta = LoraBatchMeta(num_tokens, 8, "cuda").prepare(slots)
    buf = lora_shrink(x, lora_a, meta, ranks, scalings, backend="triton")
    gen = torch.Generator(device="cuda").manual_seed(hidden)
    h = (0.05 * torch.randn(num_tokens, hidden, device="cuda", generator=gen)).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=gen)).to(dtype)
    y0 = y.clone()
    got, got_h = add_rms_norm_lora_triton(h, y, weight, 1e-5, buf, lora_b[0], meta.slot_of_token, ranks)
    assert torch.equal(y, y0)
    again = add_rms_norm_lora_triton(h, y, weight, 1e-5, buf, lora_b[0], meta.slot_of_token, ranks)
    assert torch.equal(again[0], got) and torch.equal(again[1], got_h)
    assert not got.isnan().any() and not got_h.isnan().any()
    plain, plain_h = add_rms_norm_triton(h, y0, weight, 1e-5)
    absent = slots < 0
    assert torch.equal(got_h[absent], plain_h[absent])
    assert _ulp_close(got[absent], plain[absent], 2)
    if (~absent).any():
        exact_h = h.double() + oracle(x, y0, lora_a, lora_b, slots, ranks, scalings)
        normed = exact_h * torch.rsqrt(exact_h.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
        assert rel(got_h[~absent], exact_h[~absent]) < TOL
        assert rel(got[~absent], normed[~absent]) < TOL
