"""CUDA backend of ``quant_matmul`` for small M: a 4-bit tensor-core GEMM over a load-time re-layout.

The kernel (``cuda/qgemm4.cu``, whose header explains the layout) is compiled with ``nvcc`` on first
use for the GPU at hand and called through ``ctypes``: no torch headers, so the build takes seconds,
and the launch goes on torch's current stream (CUDA graphs capture it like any other kernel). No
``nvcc``, a GPU older than sm_80, or a layer the layout cannot express: the backend reports itself
unavailable and dispatch uses the Triton kernel.

``shuffle`` and ``unshuffle`` are pure torch (the CPU tests check that one inverts the other with the
kernel's index map, and emulate the kernel's arithmetic); only ``quant_matmul_cuda`` needs the GPU.

On by default where it runs (``INLAID_CUDA_GEMM=0`` turns it off): ``prepare`` then builds the
layout, and the dispatch table picks the kernel for M 1-32, where it beat the Triton kernel and
exllamav2 on an H100 (docs/results/kernels.md). ``backend="cuda"`` forces it for one call either way.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from inlaid.kernels import dispatch, pdl
from inlaid.kernels.quant_matmul import PreparedQuant, SplitKState
from inlaid.quant.primitives import unpack_rows

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "cuda" / "qgemm4.cu"
MAX_M = 64
WARPS = 4  # warps per block of every kernel but WGMMA8 (warps()); a block covers 16 * warps * nw columns
# Split-K partial sums and arrival counters. Not the Triton kernel's: every block overwrites its
# whole workspace slice, so the workspace holds garbage between calls, which the Triton kernel's
# (zero between calls) must not.
_SPLIT_K = SplitKState()


def _lane_map() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every (lane, word j, nibble pair q, half h) of a 16-column x 64-k super tile: the column
    offset, the k offset and the bit position of its code (the kernel header's table)."""
    lane = torch.arange(32).view(32, 1, 1, 1)
    j = torch.arange(4).view(1, 4, 1, 1)
    q = torch.arange(4).view(1, 1, 4, 1)
    h = torch.arange(2).view(1, 1, 1, 2)
    g, t = lane // 4, lane % 4
    col = g + 8 * (q % 2)
    k = 16 * t + 4 * j + 2 * (q // 2) + h
    bit = 4 * q + 16 * h
    shape = (32, 4, 4, 2)
    return col.expand(shape), k.expand(shape), bit.expand(shape)


@dataclass
class CudaQuant:
    """One layer in the kernel's layout."""

    qw: torch.Tensor  # int32 [N/16, K/64, 32, 4]: one uint4 per lane per super tile
    sz: torch.Tensor  # fp16 [G, N/16, 8, 4]: (scale g, scale g+8, 1024+zero g, 1024+zero g+8)
    gidx16: torch.Tensor  # int32 [K/16]: group of each 16-k chunk (in permuted order)
    perm: torch.Tensor | None  # int64 [K]: x's column order (act-order), None for natural order
    group16: int = 0  # > 0: every group is this many 16-k chunks in order (a power of two: computed)


def layout_problem(p: PreparedQuant) -> str | None:
    """Why this layer cannot use the kernel (None: it can)."""
    k, n = p.in_features, p.out_features
    if p.bits != 4:
        return f"{p.bits}-bit (the kernel is 4-bit)"
    if p.scales.dtype != torch.float16:
        return f"{p.scales.dtype} (the kernel is fp16)"
    if k % 64 or n % (16 * WARPS):
        return f"shape {k}x{n} (needs K % 64 == 0 and N % 64 == 0)"
    g_sorted = torch.sort(p.g_idx.long(), stable=True).values.view(-1, 16)
    if not bool((g_sorted == g_sorted[:, :1]).all()):
        return "groups that do not come in whole 16-column chunks once sorted"
    return None


def _shuffle_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes [K, n] (n a multiple of 16) -> int32 words [n/16, K/64, 32, 4] of the kernel."""
    k, n = codes.shape
    col, kk, bit = (t.to(codes.device) for t in _lane_map())
    tiles = codes.reshape(k // 64, 64, n // 16, 16).permute(2, 0, 1, 3)  # [NT, KS, 64 k, 16 cols]
    words = (tiles[:, :, kk, col] << bit).sum(dim=(-1, -2))  # [NT, KS, 32, 4]; the bits are disjoint
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def shuffle(p: PreparedQuant, chunk_bytes: int = 64 << 20) -> CudaQuant:
    """The kernel's layout of a prepared layer (raises ValueError where ``layout_problem`` says).
    Built a slice of columns at a time: the int64 intermediates of a whole 4096 x 22016 layer would
    take 1.4 GB."""
    problem = layout_problem(p)
    if problem:
        raise ValueError(f"the CUDA GEMM cannot take this layer: {problem}")
    k, n = p.in_features, p.out_features
    g_idx = p.g_idx.long()
    natural = bool((g_idx[1:] >= g_idx[:-1]).all())
    perm = None if natural else torch.sort(g_idx, stable=True).indices
    step = max(16, chunk_bytes // (16 * k) // 16 * 16)
    words = []
    for c0 in range(0, n, step):
        codes = unpack_rows(p.qweight[:, c0:c0 + step], 4)  # [K, step] int64
        words.append(_shuffle_codes(codes if perm is None else codes[perm]))
    if perm is not None:
        g_idx = g_idx[perm]
    rows = torch.arange(8, device=p.scales.device)
    s = p.scales.view(-1, n // 16, 16)
    z = (p.zeros.view(-1, n // 16, 16).float() + 1024).to(torch.float16)  # exact: small integers
    sz = torch.stack([s[..., rows], s[..., rows + 8], z[..., rows], z[..., rows + 8]], dim=-1)
    gidx16 = g_idx[::16].to(torch.int32).contiguous()
    groups = int(gidx16[-1]) + 1
    chunks = gidx16.numel() // groups
    equal = gidx16.numel() % groups == 0 and torch.equal(
        gidx16, torch.arange(gidx16.numel(), device=gidx16.device, dtype=torch.int32) // chunks)
    return CudaQuant(qw=torch.cat(words).contiguous(), sz=sz.contiguous(), gidx16=gidx16, perm=perm,
                     group16=chunks if equal else 0)


def unshuffle(cq: CudaQuant, n: int) -> torch.Tensor:
    """Codes [K, N] (original k order) back from the kernel's words: the inverse of ``shuffle``."""
    nt, ks = cq.qw.shape[:2]
    col, kk, bit = (t.to(cq.qw.device) for t in _lane_map())
    words = cq.qw.to(torch.int64) & 0xFFFFFFFF
    vals = (words[..., None, None] >> bit) & 0xF  # [NT, KS, 32, 4, 4, 2]
    tiles = torch.empty(nt, ks, 64, 16, dtype=torch.int64, device=cq.qw.device)
    tiles[:, :, kk, col] = vals
    codes = tiles.permute(1, 2, 0, 3).reshape(ks * 64, n)
    if cq.perm is not None:
        out = torch.empty_like(codes)
        out[cq.perm] = codes
        codes = out
    return codes


# --- build and launch -------------------------------------------------------------------------------

def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or shutil.which("/usr/local/cuda/bin/nvcc")


def _arch_flags(arch: str) -> list[str]:
    """nvcc's target flags. Hopper builds for sm_90a, whose arch-specific wgmma the WGMMA kernel
    needs (the library then runs on sm_90 only, and it is built per GPU anyway)."""
    if arch == "sm_90":
        return ["-gencode", "arch=compute_90a,code=sm_90a", "-DINLAID_WGMMA"]
    return [f"-arch={arch}"]


def build(arch: str, nvcc: str | None = None) -> Path:
    """Compile the kernel for ``arch`` (e.g. "sm_90") into a cached shared library; returns its path.
    The cache key hashes the source and the target flags, so an edited kernel is rebuilt."""
    nvcc = nvcc or _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    src = SOURCE.read_bytes()
    digest = hashlib.sha256(src + " ".join(_arch_flags(arch)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("INLAID_CACHE", Path.home() / ".cache" / "inlaid")) / "kernels"
    lib = cache / f"qgemm4-{arch}-{digest}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build aside, then rename: no half files
        out = Path(tmp) / lib.name
        cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", *_arch_flags(arch),
               "-o", str(out), str(SOURCE)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{run.stderr[-2000:]}")
        os.replace(out, lib)
    return lib


@functools.lru_cache(maxsize=None)
def _library(device_index: int):
    major, minor = torch.cuda.get_device_capability(device_index)
    lib = ctypes.CDLL(str(build(f"sm_{major}{minor}")))
    fn = lib.inlaid_qgemm4
    fn.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int] * 9 + [ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


@functools.lru_cache(maxsize=None)
def available(device_index: int = 0) -> bool:
    """Whether the kernel can run on this GPU (sm_80+ and a working nvcc); logs why not, once."""
    if not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device_index) < (8, 0):
        log.info("quant_matmul: the CUDA GEMM needs sm_80+; using Triton")
        return False
    try:
        _library(device_index)
    except (RuntimeError, OSError) as err:
        log.warning("quant_matmul: the CUDA GEMM is unavailable (%s); using Triton", err)
        return False
    return True


def enabled() -> bool:
    """Whether ``prepare`` builds the layout, so that dispatch may pick the kernel (unless
    ``INLAID_CUDA_GEMM=0``)."""
    return os.environ.get("INLAID_CUDA_GEMM", "1") != "0"


# A launch config: (nw 16-column tiles per warp, unroll super tiles per step, split K ways, kernel).
# Kernels: REGISTERS (nw 1 or 2, unroll 2 or 4); PIPELINED, a 4-deep cp.async ring in shared memory
# feeding mma.sync (nw 1, 2 or 4 (not above M = 32), unroll 1 or 2); WGMMA, the same ring feeding
# Hopper's warpgroup MMA, sm_90 only (nw 1 with unroll 2, nw 2 with unroll 1 or 2, nw 4 with unroll
# 1 up to M = 32); WGMMA8, the wgmma kernel with two warpgroups (8 warps) a block sharing one x
# stage across 128 nw columns (nw 1 with unroll 1 or 2, nw 2 with unroll 1). The kernel's
# launch_config lists them.
Config = tuple[int, int, int, int]
REGISTERS, PIPELINED, WGMMA, WGMMA8 = 0, 4, 90, 91


NARROW_N = 4096  # widest output that takes WGMMA8 at M 17-32 (default_config)


def warps(kernel: int) -> int:
    """Warps a block of ``kernel`` runs."""
    return 8 if kernel == WGMMA8 else WARPS


@functools.lru_cache(maxsize=None)
def has_wgmma(device_index: int = 0) -> bool:
    """Whether the library built for this GPU holds the WGMMA kernels (its build flags say so: sm_90)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return "-DINLAID_WGMMA" in _arch_flags(f"sm_{major}{minor}")


def _split(blocks: int, k: int, target: float, min_tiles: int = 8) -> int:
    """The smallest power-of-two K split that gives ``target`` blocks, keeping >= ``min_tiles``
    super tiles per block."""
    max_split = 1
    while k // (64 * max_split * 2) >= min_tiles:
        max_split *= 2
    split = 1
    while blocks * split < target and split < max_split:
        split *= 2
    return split


def default_config(m: int, n: int, k: int, sms: int, wgmma: bool = False) -> Config:
    """(nw, unroll, split, kernel); ``wgmma``: the GPU has the WGMMA kernel (sm_90).

    - M <= 4: the register kernel, one 16-column tile per warp, two super tiles per step, K split
      until there are ~3 blocks per SM; where N >= 8192 (q/k/v, gate/up: many column tiles) four
      super tiles per step and ~5.5 blocks per SM.
    - M 5-32: the pipelined kernel, two tiles per warp, two super tiles per stage, K split until
      there are ~1.5 blocks per SM up to M = 16 and ~1 above; above M = 16 a block keeps >= 16
      super tiles (it then holds 4x the MMAs and partial sums, so its share of K must pay for a
      larger split-K merge); one tile per warp where N is not a multiple of 128.
    - With wgmma, M 5-32 take the WGMMA kernel instead: the same configs up to M = 16; above, one
      tile per warp and ~2 blocks per SM (still >= 16 super tiles a block). On an H100, side by
      side in the engine's decode step (docs/results/gpu_ab_wgmma_*.log), that took 3.4% off at
      batch 32 and 1.4% at batch 8; the M > 16 configs are the GEMM sweep's best per shape
      (docs/results/bench_kernels_cuda_sweep_wgmma_*.log), and with the pipelined kernel's
      configs the batch-32 step was 0.8% slower than before. Outputs up to NARROW_N wide (o and
      down of Llama-2-7B) take WGMMA8 at M 17-32 instead (two warpgroups a block sharing one x
      stage; the same split rule over its 128-column blocks): on an H100 the M = 32 sweep put o
      at 10.2 instead of 11.7 µs and down at 20.0 instead of 25.6 (both the sweep's best), and
      side by side in the engine the batch-32 step over 8 adapters took 5.22-5.24 ms instead of
      5.29-5.31 (over 32 distinct adapters: a tie, 5.59-5.62 vs 5.61-5.62;
      docs/results/gpu_ab_w8_a4042af.log). The wide shapes (q/k/v, gate/up) were slower with
      it in the sweep, and so was the whole step at M 9-16 (batch 16 +7%): those keep WGMMA.

    From two launch-config sweeps on two H100s (`bench_kernels.py --sweep-cuda 1 8 16 32`, 45
    configs; `bench_kernels.py --rank` on their JSON ranks the rules; docs/results/kernels.md): at
    M = 8, 16 and 32 this rule averages 1.04-1.09x each point's best over the four Llama-2-7B
    shapes, the register kernel's (1, 2) configs 1.10-1.14x even at their best split; at M = 1 the
    latter are 1.02x and the pipelined (2, 2) ones 1.28x. Between M = 1 and 8 (the same 8-token
    tile) nothing was measured: the line at 4 is a guess. At M = 1 the wide shapes' four super
    tiles per step come from the same sweeps: (1, 4, 4, 0) scores 1.04 and 1.00 on q/k/v and
    gate/up where (1, 2, 4, 0) and (1, 2, 2, 0) scored 1.20 and 1.23 (both machines agree); the
    5.5 blocks per SM is the target that gives both shapes their best split of 4.

    Above M = 16 those sweeps (the GEMM alone) put the best target at ~0.75 blocks per SM. The
    engine's batch-32 decode step, where the LoRA shrink runs beside each GEMM on a side stream,
    was measured side by side per shape (docs/results/gpu_ab_knobs1_00e4223.log,
    gpu_ab_knobs2_00e4223.log, gpu_ab_splits32_f0fc243.log): down (4096 x 11008) and o (4096 x
    4096) at split 8 instead of 4 took 0.03-0.11 ms off the step, then o back at 4 another 0.03;
    q/k/v at 4 with gate/up at 2 (+0.30 ms), gate/up at 2 alone (+0.19), down at 16 (+0.32) and
    q/k/v at 1 (+0.04) were all slower. The target of ~1 with >= 16 super tiles per block gives exactly the best of
    these."""
    if m <= 4:
        if n >= 8192:
            return 1, 4, _split(n // (16 * WARPS), k, 5.5 * sms), REGISTERS
        return 1, 2, _split(n // (16 * WARPS), k, 3 * sms), REGISTERS
    kernel = WGMMA if wgmma else PIPELINED
    nw = 2 if n % (16 * WARPS * 2) == 0 else 1
    if m <= 16:
        return nw, 2, _split(n // (16 * WARPS * nw), k, 1.5 * sms), kernel
    if wgmma:
        if n <= NARROW_N and n % (16 * warps(WGMMA8)) == 0:
            return 1, 2, _split(n // (16 * warps(WGMMA8)), k, 2.0 * sms, min_tiles=16), WGMMA8
        return 1, 2, _split(n // (16 * WARPS), k, 2.0 * sms, min_tiles=16), kernel
    return nw, 2, _split(n // (16 * WARPS * nw), k, 1.0 * sms, min_tiles=16), kernel


def _group_shift(cq: CudaQuant) -> int:
    """log2 of the 16-k chunks per group where that is how the kernel can compute a chunk's group
    (equal power-of-two groups in order); -1 makes it read ``gidx16``."""
    g = cq.group16
    return g.bit_length() - 1 if g > 0 and g & (g - 1) == 0 else -1


def quant_matmul_cuda(x: torch.Tensor, p: PreparedQuant, config: Config | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M <= 64, K] fp16 (CUDA) -> y [M, N] fp16. ``config`` (see ``Config``) forces the
    launch (benchmarks). The layer's kernel layout is normally built by ``prepare``."""
    m, k = x.shape
    n = p.out_features
    if x.dtype != torch.float16 or k != p.in_features or not 1 <= m <= MAX_M:
        raise ValueError(f"the CUDA GEMM takes fp16 x [1..{MAX_M}, {p.in_features}], got "
                         f"{x.dtype} {tuple(x.shape)}")
    cq = p.backend_state.get("cuda")
    if cq is None:  # prepared where the kernel was unavailable, or forced
        cq = p.backend_state["cuda"] = shuffle(p)
    if x.device != cq.qw.device:
        raise ValueError(f"x is on {x.device}, the layer on {cq.qw.device}")
    if cq.perm is not None:
        x = x.index_select(1, cq.perm)
    x = x.contiguous()
    if x.data_ptr() % 16:  # the kernel reads x in 16-byte vectors (an offset view can be misaligned)
        x = x.clone()
    dev = x.device.index or 0
    nw, unroll, split, kernel = config or default_config(m, n, k, dispatch.sm_count(dev), has_wgmma(dev))
    y = out if out is not None else torch.empty((m, n), device=x.device, dtype=torch.float16)
    if not y.is_contiguous() or y.shape != (m, n) or y.dtype != torch.float16 or y.device != x.device:
        raise ValueError(f"out must be a contiguous fp16 [{m}, {n}] tensor on {x.device}")
    tm = -(-m // 8) if m <= 32 else 8  # 8-token MMA tiles the kernel computes (its TM)
    ws, counts = (_SPLIT_K.get(x.device, split * n * 8 * tm, n // (16 * warps(kernel) * nw)) if split > 1
                  else (y, cq.gidx16))
    with torch.cuda.device(x.device):  # the launch goes to the current device's context
        err = _library(dev)(x.data_ptr(), cq.qw.data_ptr(), cq.sz.data_ptr(), cq.gidx16.data_ptr(),
                            None if p.bias is None else p.bias.data_ptr(), y.data_ptr(), ws.data_ptr(),
                            counts.data_ptr(), m, n, k, nw, unroll, split, kernel, _group_shift(cq),
                            int(pdl.enabled(x.device)),
                            torch.cuda.current_stream(x.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"qgemm4 launch failed (code {err}) for M={m} N={n} K={k} "
                           f"config={(nw, unroll, split, kernel)}")
    return y
