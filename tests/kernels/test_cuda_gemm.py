"""The CUDA small-M GEMM's load-time layout, checked on the CPU.

The kernel itself runs only on a GPU (tests/kernels/test_cuda_gemm_gpu.py). Here: ``shuffle`` and
``unshuffle`` invert each other; an emulation of the kernel's arithmetic (its index expressions and
PTX's m16n8k16 fragment layout, written out in torch) reproduces x @ W^T from the shuffled words;
layers the layout cannot take are refused; and the source compiles where nvcc exists."""

import shutil

import pytest
import torch

from inlaid.kernels import cuda_gemm
from inlaid.kernels.quant_matmul import prepare, quant_matmul_ref
from inlaid.quant.primitives import unpack_rows

from .test_quant_matmul import random_layer

LAYOUTS = [(128, False, True), (32, False, False), (-1, False, True), (64, True, False)]


@pytest.mark.parametrize("group_size,act_order,sym", LAYOUTS)
def test_shuffle_round_trips(group_size, act_order, sym):
    packed, _, _ = random_layer(256, 192, 4, group_size, sym, act_order, bias=False, seed=group_size)
    p = prepare(packed, "cpu")
    # a 2 KB chunk budget forces several column slices (16 columns each) through the chunked path
    cq = cuda_gemm.shuffle(p, chunk_bytes=2048)
    assert cq.qw.shape == (192 // 16, 256 // 64, 32, 4) and cq.qw.dtype == torch.int32
    assert (cq.perm is not None) == act_order
    # equal groups in order (also after sorting act-order): the kernel computes each chunk's group
    assert cq.group16 == (256 // 16 if group_size == -1 else group_size // 16)
    assert torch.equal(cuda_gemm.unshuffle(cq, 192), unpack_rows(packed.qweight, 4))
    assert torch.equal(cq.qw, cuda_gemm.shuffle(p).qw)  # chunking does not change the result


def _axes(*sizes: int) -> list[torch.Tensor]:
    """One arange per axis, each shaped to broadcast against the others."""
    return [torch.arange(n).view([n if d == axis else 1 for d in range(len(sizes))])
            for axis, n in enumerate(sizes)]


def emulate(x: torch.Tensor, cq: cuda_gemm.CudaQuant, n: int) -> torch.Tensor:
    """What the kernel computes, in float64, following its code: per super tile ks and lane (g, t),
    word j feeds MMA j; nibble pair q of a word is A register q; the A register q holds
    A[g + 8 (q & 1)][2t + h + 8 (q >> 1)] (h = half), the B registers r = 0, 1 hold
    B[2t + h + 8 r][g] = x[token][64 ks + 16 t + 4 j + 2 r + h]."""
    m, k = x.shape
    nt, ks = cq.qw.shape[:2]
    if cq.perm is not None:
        x = x[:, cq.perm]
    lane, j, q, h = _axes(32, 4, 4, 2)
    g, t = lane // 4, lane % 4
    full = (32, 4, 4, 2)
    # A: dequantize every code as the kernel does ((1024 + code) - (1024 + zero), times the scale, in fp16)
    words = cq.qw.to(torch.int64) & 0xFFFFFFFF  # [NT, KS, 32, 4]
    shifts = 4 * torch.arange(4).view(4, 1) + 16 * torch.arange(2).view(1, 2)  # [q, h]
    codes = (words[..., None, None] >> shifts) & 0xF  # [NT, KS, 32, 4 j, 4 q, 2 h]
    lanes = torch.arange(32)
    chunk = torch.arange(ks).view(ks, 1) * 4 + lanes % 4  # [KS, 32]: the lane's 16-k chunk
    grp = chunk // cq.group16 if cq.group16 > 0 else cq.gidx16.long()[chunk]
    sz = cq.sz.float()[grp][:, lanes, :, lanes // 4]  # [32, KS, NT, 4]: the lane's row g
    sz = sz.permute(2, 1, 0, 3)  # [NT, KS, 32, 4]
    odd = (q % 2).expand(full)
    scale = torch.where(odd == 1, sz[..., None, None, None, 1], sz[..., None, None, None, 0])
    zero = torch.where(odd == 1, sz[..., None, None, None, 3], sz[..., None, None, None, 2])
    vals = (((codes + 1024).float() - zero) * scale).half().double()  # [NT, KS, 32, 4 j, 4 q, 2 h]
    a = torch.zeros(nt, ks, 4, 16, 16, dtype=torch.float64)
    row = (g + 8 * (q % 2)).expand(full)
    col = (2 * t + h + 8 * (q // 2)).expand(full)
    jj = j.expand(full)
    a[:, :, jj, row, col] = vals
    b = mma_b_operand(_padded(x))
    yt = torch.einsum("nsjrl,sjlm->nrm", a, b)  # [NT, 16, Mpad]
    return yt.permute(2, 0, 1).reshape(mpad_of(m), n)[:m]


def mpad_of(m: int) -> int:
    return -(-m // 8) * 8


def _padded(x: torch.Tensor) -> torch.Tensor:
    """x in float64 with token tiles of 8: rows past M are zero."""
    xs = torch.zeros(mpad_of(x.shape[0]), x.shape[1], dtype=torch.float64)
    xs[: x.shape[0]] = x.double()
    return xs


def mma_b_operand(xs: torch.Tensor) -> torch.Tensor:
    """B of every super tile s and MMA j, [KS, 4, 16 logical k, Mpad], as the mma.sync kernels'
    lanes load it: lane (g, t)'s B registers r = 0, 1 hold B[2t + h + 8 r][g] = x[token][64 s + 16 t
    + 4 j + 2 r + h]."""
    mpad, k = xs.shape
    ks = k // 64
    lane_b, jb, r, hb = _axes(32, 4, 2, 2)
    gb, tb = lane_b // 4, lane_b % 4
    fb = (32, 4, 2, 2)
    kphys = (16 * tb + 4 * jb + 2 * r + hb).expand(fb)  # within the super tile
    lrow = (2 * tb + hb + 8 * r).expand(fb)
    b = torch.zeros(ks, 4, 16, mpad, dtype=torch.float64)
    for i in range(mpad // 8):
        tok = (8 * i + gb).expand(fb)
        for s in range(ks):
            b[s, jb.expand(fb), lrow, tok] = xs[tok, 64 * s + kphys]
    return b


def wgmma_b_operand(xs: torch.Tensor) -> torch.Tensor:
    """B as the wgmma kernel presents it, [KS, 4, 16, Mpad]: each token row's 4-byte word L copied
    to core matrix L % 8, slot L / 8, of its 8-token group (XCores in qgemm4.cu: core matrices 144
    bytes apart, groups 8 x 144), then read back the way PTX defines a K-major, unswizzled
    descriptor: logical (k, token n) of MMA j at start + (k / 8) LBO + (n / 8) SBO + 16 (n % 8) +
    2 (k % 8) bytes, with start 2 j x 144, LBO 144 and SBO 8 x 144."""
    mpad, k = xs.shape
    core, group = 144, 8 * 144
    b = torch.zeros(k // 64, 4, 16, mpad, dtype=torch.float64)
    for s in range(k // 64):
        smem = torch.full((mpad // 8 * group // 2,), float("nan"), dtype=torch.float64)  # in halves
        for tok in range(mpad):
            for lane in range(32):
                at = ((lane % 8) * core + (lane // 8) * 4 + (tok % 8) * 16 + (tok // 8) * group) // 2
                smem[at:at + 2] = xs[tok, 64 * s + 2 * lane: 64 * s + 2 * lane + 2]
        for j in range(4):
            for kk in range(16):
                for tok in range(mpad):
                    at = 2 * j * core + (kk // 8) * core + (tok // 8) * group + (tok % 8) * 16 + (kk % 8) * 2
                    b[s, j, kk, tok] = smem[at // 2]
    return b


@pytest.mark.parametrize("m", [1, 11, 32])
def test_wgmma_shared_memory_layout_gives_the_mma_b_operand(m):
    """The wgmma kernel takes A (the weights) in the same registers as the mma.sync kernels, so its
    B, read through its descriptors, must be exactly their B: x permuted as the layout's logical k."""
    xs = _padded(torch.randn(m, 256))
    assert torch.equal(wgmma_b_operand(xs), mma_b_operand(xs))


@pytest.mark.parametrize("group_size,act_order,sym", LAYOUTS)
@pytest.mark.parametrize("m", [1, 11])
def test_emulated_kernel_matches_reference(group_size, act_order, sym, m):
    packed, _, _ = random_layer(256, 64, 4, group_size, sym, act_order, bias=False, seed=m)
    p = prepare(packed, "cpu")
    x = torch.randn(m, 256).half()
    ref = quant_matmul_ref(x.double(), prepare(packed, "cpu", torch.float64))
    got = emulate(x, cuda_gemm.shuffle(p), 64)
    # the kernel's fp16 dequantization rounds each weight once (relative 2^-11): bound 2e-3
    assert ((got - ref).norm() / ref.norm()).item() < 2e-3


def test_layout_problems_are_named():
    assert "3-bit" in cuda_gemm.layout_problem(prepare(random_layer(256, 64, 3, 128, True, False, False, 0)[0],
                                                       "cpu"))
    assert "bfloat16" in cuda_gemm.layout_problem(
        prepare(random_layer(256, 64, 4, 128, True, False, False, 0)[0], "cpu", torch.bfloat16))
    assert "shape" in cuda_gemm.layout_problem(prepare(random_layer(256, 96, 4, 128, True, False, False, 0)[0],
                                                       "cpu"))
    # groups of 8 columns cannot share a 16-column chunk's one scale
    assert "16-column" in cuda_gemm.layout_problem(
        prepare(random_layer(256, 64, 4, 8, True, False, False, 0)[0], "cpu"))
    with pytest.raises(ValueError, match="cannot take"):
        cuda_gemm.shuffle(prepare(random_layer(256, 64, 3, 128, True, False, False, 0)[0], "cpu"))


# (M, N, K) of the Llama-2-7B decode GEMMs -> the config the rule gives on a 132-SM H100
# (docs/results/kernels.md derives it from two sweeps)
@pytest.mark.parametrize("m,n,k,config", [
    (1, 4096, 4096, (1, 2, 8, 0)), (4, 22016, 4096, (1, 4, 4, 0)), (1, 4096, 11008, (1, 2, 8, 0)),
    (1, 12288, 4096, (1, 4, 4, 0)),
    (8, 4096, 4096, (2, 2, 8, 4)), (8, 12288, 4096, (2, 2, 4, 4)), (16, 22016, 4096, (2, 2, 2, 4)),
    (16, 4096, 11008, (2, 2, 8, 4)), (32, 4096, 4096, (2, 2, 4, 4)), (32, 12288, 4096, (2, 2, 2, 4)),
    (32, 22016, 4096, (2, 2, 1, 4)), (32, 4096, 11008, (2, 2, 8, 4)), (24, 192, 4096, (1, 2, 4, 4))])
def test_default_config_rule(m, n, k, config):
    got = cuda_gemm.default_config(m, n, k, 132)
    assert got == config
    # with wgmma (sm_90) M 5-16 keep the configs on the WGMMA kernel; M > 16: test below
    wg = cuda_gemm.default_config(m, n, k, 132, wgmma=True)
    if m <= 4:
        assert wg == config
    elif m <= 16:
        assert wg == config[:3] + (cuda_gemm.WGMMA,)
    nw, _, split, _ = got
    min_tiles = 8 if m <= 16 else 16  # super tiles per block
    assert split == 1 or k // 64 // split >= min_tiles
    blocks = n // (64 * nw)
    target = (5.5 if m <= 4 and n >= 8192 else 3 if m <= 4 else 1.5 if m <= 16 else 1.0) * 132
    # the smallest power-of-two split that reaches the block target, unless the K limit stops it
    assert blocks * split >= target or k // (64 * split * 2) < min_tiles
    assert split == 1 or blocks * (split // 2) < target


# M 17-32 with wgmma: one tile per warp, ~2 blocks per SM, >= 16 super tiles a block: the best
# config of each Llama-2-7B shape in the M = 32 sweep (docs/results/kernels.md); outputs up to
# 4096 wide on the 8-warp kernel (128-column blocks), wider ones on the 4-warp one
@pytest.mark.parametrize("n,k,split,kernel", [(4096, 4096, 4, 91), (12288, 4096, 2, 90), (22016, 4096, 1, 90),
                                              (4096, 11008, 8, 91), (4160, 4096, 4, 90)])
def test_default_config_rule_with_wgmma_above_m16(n, k, split, kernel):
    assert cuda_gemm.default_config(32, n, k, 132, wgmma=True) == (1, 2, split, kernel)
    assert cuda_gemm.default_config(17, n, k, 132, wgmma=True) == (1, 2, split, kernel)
    assert cuda_gemm.default_config(16, n, k, 132, wgmma=True)[3] == cuda_gemm.WGMMA


def test_group_shift_only_for_equal_power_of_two_groups():
    def cq(group16):
        return cuda_gemm.CudaQuant(qw=None, sz=None, gidx16=None, perm=None, group16=group16)

    assert [cuda_gemm._group_shift(cq(g)) for g in (1, 2, 8, 256)] == [0, 1, 3, 8]
    assert [cuda_gemm._group_shift(cq(g)) for g in (0, 3, 688)] == [-1, -1, -1]  # table lookup


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])  # sm_90: sm_90a, with the wgmma kernel
def test_kernel_source_compiles(tmp_path, monkeypatch, arch):
    monkeypatch.setenv("INLAID_CACHE", str(tmp_path))
    lib = cuda_gemm.build(arch)
    assert lib.exists() and lib.parent == tmp_path / "kernels"
    assert cuda_gemm.build(arch) == lib  # cached by the source's hash
