#!/usr/bin/env python3
"""Check our GPTQ v1 checkpoint layout against exllamav2 0.3.2's 4-bit GPTQ kernel (GPU only).

Run on a CUDA machine with exllamav2 importable (its extension JIT-builds on first import, ~2-3 min):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 scripts/exllama_check.py
Writes $OUT/exllama_check.md when OUT is set; exits 1 if any case misses the error bound.

Facts of exllamav2 0.3.2 this relies on (read from exllamav2/ext.py, exllamav2_ext/ext_qmatrix.cpp,
cuda/q_matrix.cu, cuda/q_gemm.cu of the 0.3.2 wheel):
- the GPTQ path is 4-bit only (height = qweight.size(0) * 8) and derives the group size as the smallest
  power of two with groupsize * groups >= in_features, so only power-of-two group sizes work;
- qzeros are read as v1 (stored zero - 1; the kernel adds the 1 back);
- make_q_matrix rewrites qweight in place (act-order row sort, then a nibble shuffle) and keeps raw
  pointers to qweight/qzeros/scales/q_perm/q_invperm/temp_dq, so we pass clones and keep them alive;
- g_idx is read on the host (must be a CPU int32 tensor); q_perm/q_invperm are int16 CUDA buffers that
  make_q_matrix fills itself with the stable sort of g_idx;
- absent tensors are passed as a (1, 1) tensor on the "meta" device ("none_tensor");
- for M > 32 gemm_half_q_half dequantizes into temp_dq and calls cuBLAS, unless force_cuda is set.
"""
from __future__ import annotations

import importlib
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout, no install
from inlaid.kernels.exllama import ExllamaMatrix, load_extension  # noqa: E402
from inlaid.kernels.quant_matmul import prepare  # noqa: E402
from inlaid.quant.primitives import PackedLinear, dequantize_linear, pack_linear, rtn_quantize  # noqa: E402

DEV = "cuda"
BITS, GROUP = 4, 128
TOL = 1e-2
MS = (1, 16, 64)
# (label, in_features, out_features, sym, act_order). g_idx is always passed, as our backend does:
# exllamav2 then takes its act-order path (an identity permutation for natural order).
CASES = [
    ("sym", 4096, 4096, True, False),
    ("sym", 4096, 11008, True, False),
    ("sym", 11008, 4096, True, False),
    ("asym", 4096, 11008, False, False),
    ("sym, act-order", 11008, 4096, True, True),
]


def bench(fn, iters: int = 100, warmup: int = 10) -> float:
    """Median microseconds per call, one CUDA event pair per call (medians ignore launch hiccups)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def build_case(in_f: int, out_f: int, sym: bool, act_order: bool, gen: torch.Generator):
    """Random fp16 weight -> packed layer, plus our own dequantization for the layout self-check."""
    weight = (torch.randn(out_f, in_f, generator=gen) * 0.02).half()
    if not act_order:
        deq, codes, scales, zeros, g_idx = rtn_quantize(weight, BITS, GROUP, sym)
    else:
        # GPTQ act-order quantizes columns in a permuted order, so column perm[j] lands in group j // 128:
        # quantize the permuted matrix, then scatter codes and groups back to the original columns.
        perm = torch.randperm(in_f, generator=gen)
        deq_p, codes_p, scales, zeros, g_p = rtn_quantize(weight[:, perm], BITS, GROUP, sym)
        codes, g_idx, deq = torch.empty_like(codes_p), torch.empty_like(g_p), torch.empty_like(deq_p)
        codes[:, perm], g_idx[perm], deq[:, perm] = codes_p, g_p, deq_p
    packed = pack_linear(codes, scales, zeros, g_idx, BITS)
    layout_ok = torch.equal(dequantize_linear(packed), deq)
    return packed, layout_ok


def exported_cases() -> list[tuple[str, PackedLinear]]:
    """GPTQ-solved layers that gpu_quant_timing.py exported from a real calibration run."""
    path = os.environ.get("INLAID_EXPORTED_LAYER")
    if not path or not Path(path).is_file():
        return []
    from safetensors.torch import load_file

    t = load_file(path)
    names = sorted(k[: -len(".qweight")] for k in t if k.endswith(".qweight"))
    return [(n, PackedLinear(t[f"{n}.qweight"], t[f"{n}.qzeros"], t[f"{n}.scales"], t[f"{n}.g_idx"], BITS))
            for n in names]


def to_dev(p: PackedLinear) -> PackedLinear:
    return PackedLinear(p.qweight.to(DEV), p.qzeros.to(DEV), p.scales.to(DEV), p.g_idx.to(DEV), p.bits)


def make_qmatrix(p: PackedLinear):
    """exllamav2's q-matrix through our backend; checks the row permutation it derived from g_idx."""
    matrix = ExllamaMatrix(prepare(p, DEV))
    torch.cuda.synchronize()
    # exllamav2 sorts rows by group itself; it must be the stable sort we would build ourselves.
    ours = torch.sort(p.g_idx.cpu().long(), stable=True).indices
    got_perm = matrix.buffers["q_perm"].cpu().long() & 0xFFFF
    got_inv = matrix.buffers["q_invperm"].cpu().long() & 0xFFFF
    perm_ok = torch.equal(got_perm, ours) and torch.equal(got_inv, torch.argsort(ours))
    return matrix, perm_ok


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def run_case(ext, case, gen, rows, notes) -> None:
    label, in_f, out_f, sym, act_order = case[:5]
    print(f"case {label} {in_f}->{out_f} ...", flush=True)
    if len(case) > 5:  # an exported checkpoint layer
        packed, layout_ok = case[5], True
    else:
        packed, layout_ok = build_case(in_f, out_f, sym, act_order, gen)
    p = to_dev(packed)
    matrix, perm_ok = make_qmatrix(p)
    w_ref = dequantize_linear(p)  # fp32 [out, in]
    w16 = w_ref.half()
    notes.append(f"- {label} {in_f}->{out_f}: groups={p.scales.shape[0]}, our pack->dequant round trip "
                 f"{'exact' if layout_ok else 'MISMATCH'}"
                 + ("" if perm_ok is None else f", exllamav2 q_perm/q_invperm == stable sort of g_idx: {perm_ok}"))
    for m in MS:
        x = torch.randn(m, in_f, generator=gen).half().to(DEV)
        ref = x.float() @ w_ref.t()
        cublas_err = rel_err(x @ w16.t(), ref)
        t_cublas = bench(lambda: x @ w16.t())
        t_ref = bench(lambda: x.float() @ dequantize_linear(p).t())
        # Above 32 rows exllamav2 switches to dequantize+cuBLAS; also time its kernel there (force_cuda).
        for force in ((False, True) if m > 32 else (False,)):
            out = torch.full((m, out_f), float("nan"), dtype=torch.half, device=DEV)  # catch unwritten cells
            ext.gemm_half_q_half(x, matrix.handle, out, force)
            torch.cuda.synchronize()
            err = rel_err(out, ref)
            path = "kernel" if (m <= 32 or force) else "dq+cuBLAS"
            t_exl = bench(lambda: ext.gemm_half_q_half(x, matrix.handle, out, force))
            ok = err < TOL and layout_ok and perm_ok is not False
            rows.append((f"{label}", f"{in_f}->{out_f}", m, path + (" (forced)" if force else ""),
                         err, cublas_err, t_exl, t_cublas, t_ref, ok))
    del matrix


def table(rows) -> str:
    head = ("| case | in->out | M | exllamav2 path | rel err | cuBLAS fp16 rel err | exllamav2 us "
            "| cuBLAS fp16 us | deq+matmul ref us | ok |\n|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {c} | {s} | {m} | {pth} | {e:.2e} | {ce:.2e} | {te:.1f} | {tc:.1f} | {tr:.1f} | "
                   f"{'PASS' if ok else 'FAIL'} |\n" for c, s, m, pth, e, ce, te, tc, tr, ok in rows)
    return head + body


def main() -> int:
    if not torch.cuda.is_available():
        print("exllama_check: no CUDA, skipping (this check needs a GPU and exllamav2 0.3.2)")
        return 0
    print("loading exllamav2 extension (the first import JIT-builds it, a few minutes)...", flush=True)
    ext = load_extension()
    try:
        exl_version = importlib.import_module("exllamav2.version").__version__
    except Exception:  # noqa: BLE001 - version is informational only
        exl_version = "unknown"
    gen = torch.Generator().manual_seed(0)
    rows, notes = [], []
    errors = []
    cases = CASES + [(f"exported GPTQ {name.split('.')[-1]}", p.in_features, p.out_features, True, False, p)
                      for name, p in exported_cases()]
    for case in cases:
        try:
            run_case(ext, case, gen, rows, notes)
        except Exception as exc:  # noqa: BLE001 - one case the kernel rejects must not hide the others
            errors.append(f"- {case[0]} {case[1]}->{case[2]}: {type(exc).__name__}: {exc}")
            print(errors[-1], file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    md = table(rows)
    failed = [r for r in rows if not r[-1]]
    print(md)
    print(f"{len(rows) - len(failed)} passed, {len(failed) + len(errors)} failed")
    out_dir = os.environ.get("OUT")
    if out_dir:
        env = (f"- GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
               f"exllamav2 {exl_version}\n- {BITS}-bit, group {GROUP}, random N(0, 0.02) fp16 weights quantized "
               f"with rtn_quantize, x ~ N(0, 1) fp16; reference = x.float() @ dequantize_linear(p).t() in fp32; "
               f"pass = rel err < {TOL}; times are the median of 100 CUDA-event-timed calls after 10 warm-ups\n")
        text = (f"# exllamav2 GPTQ v1 layout check\n\n{env}\n## Results\n\n{md}\n"
                f"{len(rows) - len(failed)} passed, {len(failed) + len(errors)} failed\n\n## Per-case checks\n\n"
                + "\n".join(notes + errors) + "\n")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "exllama_check.md").write_text(text)
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
