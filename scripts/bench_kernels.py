"""quant_matmul benchmark: our backends (Triton, the CUDA small-M GEMM, dequantize + cuBLAS) and
exllamav2 vs fp16 cuBLAS on Llama-2-7B shapes (GPU only).

    python scripts/bench_kernels.py [--quick]
    python scripts/bench_kernels.py --sweep 16 32        # Triton block shapes
    python scripts/bench_kernels.py --sweep-cuda 1 16 32  # CUDA GEMM launch configs
    python scripts/bench_kernels.py --rank A.json B.json  # rank config rules on sweep JSON (no GPU)

Weights are rotated among enough copies to exceed L2 (50 MB on an H100), so each call reads its
weight from HBM as in a real forward. Time = median over repetitions of (CUDA-event time of one
CUDA-graph replay that calls the op once on every copy) / copies: GPU time without Python launch
overhead, as a decode step under CUDA graphs sees it. Columns: µs per backend; "best" = our fastest
backend at that M (which one in brackets), its % of the 4-bit weight-read floor at the measured HBM
bandwidth and its speedups vs fp16 cuBLAS (`x @ W`) and vs exllamav2. Writes $OUT/kernels.md when OUT
is set.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from inlaid.bench.report import emit

from inlaid.kernels.quant_matmul import prepare
from inlaid.quant.primitives import group_index, pack_linear

SHAPES = [(4096, 4096, "attn o / q"), (4096, 12288, "fused qkv"), (4096, 22016, "fused gate/up"),
          (11008, 4096, "down")]
MS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256, 512, 2048]
L2_BYTES = 50 * 2**20


def hbm_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = timed(lambda i: dst.copy_(src), 1, reps=10)
    return 2 * src.numel() / (times * 1e-6)


def timed(fn, copies: int, reps: int = 20) -> float:
    """Median µs per call of fn(i) (i = weight copy), measured on CUDA-graph replays: a graph of one
    call per copy, so Python launch overhead (tens of µs for a Triton launch) stays out."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):  # warm-up: compile, autotune, allocate outside the capture
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / copies)
    return statistics.median(samples)


def random_packed(k: int, n: int, bits: int, gen):
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    groups = k // 128
    scales = (torch.rand(groups, n, generator=gen) * 0.01 + 1e-3)
    zeros = torch.full((groups, n), float(2 ** (bits - 1)))
    return pack_linear(codes, scales, zeros, group_index(k, 128), bits)


def cuda_gemm():
    """quant_matmul_cuda, or None where it cannot run (no nvcc / sm_80)."""
    from inlaid.kernels import cuda_gemm as cg

    return cg.quant_matmul_cuda if cg.available(0) else None


def bench_shape(k, n, bits, ms, bw, exllama, cuda):
    from inlaid.kernels.cuda_gemm import MAX_M
    from inlaid.kernels.triton.quant_matmul import quant_matmul_dequant, quant_matmul_triton

    gen = torch.Generator().manual_seed(k + n + bits)
    packed = random_packed(k, n, bits, gen)
    weight_bytes = packed.qweight.numel() * 4 + packed.scales.numel() * 4  # + fp16 zeros
    copies = max(2, -(-3 * L2_BYTES // weight_bytes))
    layers = [prepare(packed, "cuda") for _ in range(copies)]
    fp16_copies = max(2, -(-3 * L2_BYTES // (k * n * 2)))
    dense = [torch.randn(k, n, device="cuda", dtype=torch.float16) * 0.01 for _ in range(fp16_copies)]
    floor_us = k * n * bits / 8 / bw * 1e6
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        t_tri = timed(lambda i: quant_matmul_triton(x, layers[i]), copies)
        t_deq = timed(lambda i: quant_matmul_dequant(x, layers[i]), copies)
        t_cub = timed(lambda i: x @ dense[i], fp16_copies)
        t_exl = t_cuda = None
        if exllama is not None and bits == 4:
            t_exl = timed(lambda i: exllama(x, layers[i]), copies)
        if cuda is not None and bits == 4 and m <= MAX_M:
            t_cuda = timed(lambda i: cuda(x, layers[i]), copies)
        ours = {"triton": t_tri, "cuda": t_cuda, "dequant": t_deq}
        best = min((t, name) for name, t in ours.items() if t is not None)
        rows.append(dict(k=k, n=n, bits=bits, m=m, cublas=t_cub, exllama=t_exl, best=best,
                         roof=floor_us / best[0], **ours))
    del layers, dense
    torch.cuda.empty_cache()
    return rows


VARIANTS = [(swap, magic) for swap in (0, 1) for magic in (0, 1)]


def sweep_layers(k: int, n: int):
    """(copies, prepared 4-bit layers over more than L2, the weight-read floor at 3.0 TB/s in µs)."""
    packed = random_packed(k, n, 4, torch.Generator().manual_seed(0))
    copies = max(2, -(-3 * L2_BYTES // (packed.qweight.numel() * 4)))
    return copies, [prepare(packed, "cuda") for _ in range(copies)], k * n / 2 / 3.0e12 * 1e6


def sweep(ms) -> None:
    """Block-shape sweep of the Triton kernel over the decode shapes (how `_config` was tuned): per
    shape and M, the default config's time and the best few, printed as it goes."""
    import itertools

    import triton

    from inlaid.kernels.triton.quant_matmul import _config, quant_matmul_triton

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for k, n, name in SHAPES:
        copies, layers, floor_us = sweep_layers(k, n)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            default = _config(m, n, k, sms)
            t_default = timed(lambda i: quant_matmul_triton(x, layers[i]), copies, reps=10)
            bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
            found = []
            for variant, bn, bk, sk in itertools.product(VARIANTS, (64, 128), (64, 128), (4, 8)):
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, GROUP_M=8, num_warps=4,
                           num_stages=3, **dict(zip(("SWAP_AB", "MAGIC"), variant)))
                try:
                    found.append((timed(lambda i: quant_matmul_triton(x, layers[i], config=cfg), copies, reps=5),
                                  cfg))
                except triton.runtime.errors.OutOfResources:  # e.g. too many stages
                    continue
            found.sort(key=lambda tc: tc[0])
            print(f"sweep {k}x{n} ({name}) M={m}: default {t_default:.1f} µs ({floor_us / t_default:.0%} of the "
                  f"3.0 TB/s floor) {default}", flush=True)
            for t, cfg in found[:3]:
                print(f"    {t:.1f} µs ({floor_us / t:.0%}) {cfg}", flush=True)
            for variant in VARIANTS:  # what each kernel variant can do at its best tiling
                t, cfg = next(((t, c) for t, c in found
                               if (c["SWAP_AB"], c["MAGIC"]) == variant), (None, None))
                if cfg is None:
                    continue
                print(f"    variant swap/magic={variant}: best {t:.1f} µs ({floor_us / t:.0%}) "
                      f"BN {cfg['BLOCK_N']} BK {cfg['BLOCK_K']} split {cfg['SPLIT_K']}", flush=True)
        del layers
        torch.cuda.empty_cache()


def table(rows, bw) -> str:
    out = [f"HBM copy bandwidth measured in this run: {bw / 1e12:.2f} TB/s", "",
           "| K x N | bits | M | triton µs | cuda µs | dequant + cuBLAS µs | cuBLAS fp16 µs | exllamav2 µs "
           "| best (ours) | % 4-bit floor | vs cuBLAS | vs exllamav2 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def us(t):
        return "–" if t is None else f"{t:.1f}"

    for r in rows:
        best, name = r["best"]
        vs_exl = "–" if r["exllama"] is None else f"{r['exllama'] / best:.2f}x"
        out.append(f"| {r['k']}x{r['n']} | {r['bits']} | {r['m']} | {us(r['triton'])} | {us(r['cuda'])} "
                   f"| {us(r['dequant'])} | {us(r['cublas'])} | {us(r['exllama'])} | {best:.1f} ({name}) "
                   f"| {100 * r['roof']:.0f}% | {r['cublas'] / best:.2f}x | {vs_exl} |")
    return "\n".join(out)


# (nw, unroll, split, kernel) of every instantiated launch (cuda_gemm.Config); the wgmma kernel's
# only where it is built (sm_90)
CUDA_CONFIGS = ([(nw, u, split, 0) for nw in (1, 2) for u in (2, 4) for split in (1, 2, 4, 8, 16)]
                + [(nw, u, split, 4) for nw, u in ((1, 1), (1, 2), (2, 1), (2, 2), (4, 1))
                   for split in (1, 2, 4, 8, 16)])
WGMMA_CONFIGS = ([(nw, u, split, 90) for nw, u in ((1, 2), (2, 1), (2, 2), (4, 1))
                  for split in (1, 2, 4, 8, 16)]
                 + [(nw, u, split, 91) for nw, u in ((1, 1), (1, 2), (2, 1)) for split in (1, 2, 4, 8, 16)])


def sweep_cuda(ms, json_out=None, kernels=None) -> None:
    """Launch configs of the CUDA GEMM (``CUDA_CONFIGS``, and ``WGMMA_CONFIGS`` where built) of the
    given kernels (all by default) on the decode shapes: the default's time and the best few per
    shape and M (every config's time as JSON lines to ``json_out``)."""
    from inlaid.kernels.cuda_gemm import default_config, has_wgmma, quant_matmul_cuda, warps

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    configs = [c for c in CUDA_CONFIGS + (WGMMA_CONFIGS if has_wgmma(0) else [])
               if kernels is None or c[3] in kernels]
    for k, n, name in SHAPES:
        copies, layers, floor_us = sweep_layers(k, n)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            default = default_config(m, n, k, sms, has_wgmma(0))
            found = []
            for cfg in sorted(set(configs) | {default}):
                if k // 64 < cfg[2] or n % (16 * warps(cfg[3]) * cfg[0]) or (cfg[0] == 4 and m > 32):
                    continue
                found.append((timed(lambda i: quant_matmul_cuda(x, layers[i], config=cfg), copies, reps=10),
                              cfg))
            found.sort()
            if json_out is not None:
                json_out.write(json.dumps(dict(k=k, n=n, m=m, floor_us=floor_us, default=default,
                                               times={str(c): t for t, c in found})) + "\n")
                json_out.flush()
            t_default = next(t for t, c in found if c == default)
            print(f"sweep-cuda {k}x{n} ({name}) M={m}: default {default} {t_default:.1f} µs "
                  f"({floor_us / t_default:.0%} of the 3.0 TB/s floor); best: "
                  + ", ".join(f"{c} {t:.1f} µs ({floor_us / t:.0%})" for t, c in found[:4]), flush=True)
        del layers
        torch.cuda.empty_cache()


def _old_default(m: int, n: int, k: int, sms: int):
    """cuda_gemm.default_config before afb2443 (the register kernel everywhere), for --rank."""
    from inlaid.kernels.cuda_gemm import WARPS, _split

    return 1, 2, _split(n // (16 * WARPS), k, (3 if m <= 16 else 2) * sms), 0


def rank(paths, sms: int = 132) -> None:
    """From --sweep-cuda --json files (CPU only): per M, each rule's or family's time over the best
    time at that point, averaged over shapes and files. Within-file ratios only: two machines time
    the same config up to ~15% apart (docs/results/kernels.md)."""
    from inlaid.kernels.cuda_gemm import default_config

    rows = [json.loads(line) for path in paths for line in open(path)]

    # each column's time at a point, None where that sweep did not time it (e.g. --kernels 4,90)
    def family(r, nw, u, kernel):  # the family's best split at this point
        return min((t for c, t in r["times"].items()
                    if c.startswith(f"({nw}, {u},") and c.endswith(f", {kernel})")), default=None)

    def rule(r):  # today's rule on the swept machine: with the wgmma kernel where the sweep had it
        wgmma = any(c.endswith(", 90)") for c in r["times"])
        return r["times"].get(str(default_config(r["m"], r["n"], r["k"], sms, wgmma)))

    columns = {"new rule": rule,
               "old rule": lambda r: r["times"].get(str(_old_default(r["m"], r["n"], r["k"], sms))),
               "register (1, 2), best split": lambda r: family(r, 1, 2, 0),
               "pipelined (2, 2), best split": lambda r: family(r, 2, 2, 4)}
    print("| M | points | " + " | ".join(columns) + " |")
    print("|---:|---:|" + "---:|" * len(columns))
    for m in sorted({r["m"] for r in rows}):
        at = [r for r in rows if r["m"] == m]
        cells = []
        for f in columns.values():
            ratios = [t / min(r["times"].values()) for r in at if (t := f(r)) is not None]
            cells.append(f"{statistics.fmean(ratios):.2f}" if len(ratios) == len(at) else "–")
        print(f"| {m} | {len(at)} | " + " | ".join(cells) + " |")


def repeat(backend: str, m: str, k: str, n: str, config: str | None = None) -> None:
    from inlaid.kernels.quant_matmul import quant_matmul

    m, k, n = int(m), int(k), int(n)
    packed = random_packed(k, n, 4, torch.Generator().manual_seed(0))
    layers = [prepare(packed, "cuda") for _ in range(max(2, -(-3 * L2_BYTES // (k * n // 2))))]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    if backend == "cuda" and config:
        from inlaid.kernels.cuda_gemm import quant_matmul_cuda

        cfg = tuple(int(v) for v in config.split(","))
        call = lambda layer: quant_matmul_cuda(x, layer, config=cfg)  # noqa: E731
    else:
        call = lambda layer: quant_matmul(x, layer, backend=backend)  # noqa: E731
    for i in range(20):
        call(layers[i % len(layers)])
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer M values")
    parser.add_argument("--no-exllama", action="store_true")
    parser.add_argument("--sweep", type=int, nargs="*", metavar="M",
                        help="only sweep Triton block shapes on the decode shapes at these M")
    parser.add_argument("--json", metavar="PATH", help="--sweep-cuda: every config's time, JSON lines")
    parser.add_argument("--sweep-cuda", type=int, nargs="*", metavar="M",
                        help="only sweep the CUDA GEMM's launch configs at these M")
    parser.add_argument("--repeat", nargs=4, metavar=("BACKEND", "M", "K", "N"),
                        help="only call one backend (cuda, triton, exllama) on one shape 20 times, "
                             "for a profiler (ncu) to pick a call")
    parser.add_argument("--kernels", help="--sweep-cuda: only these kernels' configs, e.g. 4,90 "
                                          "(0 registers, 4 pipelined, 90 wgmma; the default config always)")
    parser.add_argument("--config", help="--repeat cuda: a launch config nw,unroll,split,kernel")
    parser.add_argument("--rank", nargs="+", metavar="JSON",
                        help="only rank launch-config rules on --sweep-cuda --json files (no GPU)")
    args = parser.parse_args()
    if args.rank:
        rank(args.rank)
        return
    if not torch.cuda.is_available():
        print("no CUDA device: skipping the kernel benchmark")
        return
    if args.repeat:
        repeat(*args.repeat, config=args.config)
        return
    if args.sweep:
        sweep(args.sweep)
        return
    if args.sweep_cuda:
        kernels = None if args.kernels is None else {int(k) for k in args.kernels.split(",")}
        if args.json:
            with open(args.json, "w") as f:
                sweep_cuda(args.sweep_cuda, f, kernels)
        else:
            sweep_cuda(args.sweep_cuda, kernels=kernels)
        return
    exllama = None
    if not args.no_exllama:
        try:
            from inlaid.kernels.exllama import exllama_matmul, load_extension

            load_extension()
            exllama = exllama_matmul
        except Exception as exc:  # noqa: BLE001 - the benchmark still runs without exllamav2
            print(f"exllamav2 unavailable ({exc}); its column stays empty")
    cuda = cuda_gemm()
    if cuda is None:
        print("the CUDA GEMM is unavailable here; its column stays empty")
    bw = hbm_bandwidth()
    ms = [1, 16, 64, 256] if args.quick else MS
    rows = []
    for k, n, name in SHAPES:
        print(f"{k}x{n} ({name}) ...", flush=True)
        rows += bench_shape(k, n, 4, ms, bw, exllama, cuda)
        print(table(rows[-len(ms):], bw).split("\n", 2)[2], flush=True)  # progress, in case of a time-out
    for bits in (2, 3, 8):
        rows += bench_shape(4096, 12288, bits, [1, 16, 64], bw, None, None)
    text = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n\n" + table(rows, bw))
    emit(text, "kernels.md")


if __name__ == "__main__":
    main()
