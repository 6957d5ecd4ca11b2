"""Instruction counts of the CUDA GEMM's main loops, from its SASS, on a machine without a GPU.

    python scripts/sass_loop.py [--arch sm_90] [--kernel SUBSTRING ...] [--sass FILE]

Builds ``inlaid/kernels/cuda/qgemm4.cu`` to a cubin with nvcc and the target flags the library is
built with (``cuda_gemm._arch_flags``), disassembles it with ``cuobjdump -sass`` (from PATH, or from
the ``nvidia-cuda-cuobjdump`` wheel: ``pip install nvidia-cuda-cuobjdump``), and prints, per kernel,
its main loop: the backward branch that encloses the most MMA instructions (HMMA or HGMMA), with
its length and opcode counts. A loop that holds both a full-step and a partial-step branch counts
both; docs/results/kernels.md quotes the full path's length, read off ``--list`` (the loop's
instructions). ``--sass`` reads a saved dump instead of building.

Kernel names match as substrings of the mangled name, e.g. ``qgemm4_async_kernelILi4ELi1ELi2ELi4ELb1E``
(TM = 4, one tile per warp, two super tiles a step, 4 stages, wgmma) or ``qgemm4_kernelILi1ELi1ELi2E``.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,6})\*/\s+([^;]*);")
BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?BRA\s+(?:`\(\S+\)\s*)?(0x[0-9a-f]+)")
PREDICATE = re.compile(r"^@!?U?P\w+\s+")


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Each function of a ``cuobjdump -sass`` dump: its (address, instruction) list."""
    out = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        out[name] = [(int(a, 16), text.strip()) for a, text in INSTRUCTION.findall(chunk)]
    return out


def opcode(text: str) -> str:
    """The opcode of one instruction, without its predicate and modifiers: ``@!P0 LDGSTS.E.128`` ->
    ``LDGSTS``."""
    return PREDICATE.sub("", text).split()[0].split(".")[0]


def main_loop(instrs: list[tuple[int, str]]) -> tuple[int, int, int] | None:
    """(first index, last index, MMAs) of the backward branch's range with the most MMAs."""
    index = {addr: i for i, (addr, _) in enumerate(instrs)}
    best = None
    for i, (addr, text) in enumerate(instrs):
        m = BRANCH.match(text)
        if not m or int(m.group(1), 16) >= addr or int(m.group(1), 16) not in index:
            continue
        lo = index[int(m.group(1), 16)]
        mmas = sum(opcode(t) in ("HMMA", "HGMMA") for _, t in instrs[lo:i + 1])
        if best is None or mmas > best[2]:
            best = (lo, i, mmas)
    return best


def report(name: str, instrs: list[tuple[int, str]], listing: bool = False) -> str:
    loop = main_loop(instrs)
    if loop is None:
        return f"{name}: no loop"
    lo, hi, mmas = loop
    counts = collections.Counter(opcode(t) for _, t in instrs[lo:hi + 1])
    lines = [name, f"  loop {instrs[lo][0]:#x}-{instrs[hi][0]:#x}: {hi - lo + 1} instructions, {mmas} MMAs",
             "  " + " ".join(f"{op}:{n}" for op, n in counts.most_common())]
    if listing:
        lines += [f"    {addr:#06x}  {text}" for addr, text in instrs[lo:hi + 1]]
    return "\n".join(lines)


def _cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for candidate in sorted(Path(base).glob("nvidia/*/bin/cuobjdump")):
            return str(candidate)
    sys.exit("cuobjdump not found: put it on PATH or `pip install nvidia-cuda-cuobjdump`")


def disassemble(arch: str) -> str:
    from inlaid.kernels.cuda_gemm import _arch_flags, _nvcc

    nvcc = _nvcc()
    if nvcc is None:
        sys.exit("nvcc not found (set CUDA_HOME)")
    src = Path(__file__).resolve().parents[1] / "inlaid" / "kernels" / "cuda" / "qgemm4.cu"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "qgemm4.cubin"
        subprocess.run([nvcc, "-O3", "-std=c++17", "-cubin", *_arch_flags(arch), "-o", str(cubin), str(src)],
                       check=True)
        return subprocess.run([_cuobjdump(), "-sass", str(cubin)], check=True, capture_output=True,
                              text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90", help="the GPU to build for (default sm_90: the wgmma build)")
    parser.add_argument("--kernel", nargs="*", default=[], help="substrings of mangled names (default: all)")
    parser.add_argument("--sass", help="read this cuobjdump -sass dump instead of building")
    parser.add_argument("--list", action="store_true", help="print each loop's instructions too")
    args = parser.parse_args()
    sass = Path(args.sass).read_text() if args.sass else disassemble(args.arch)
    for name, instrs in functions(sass).items():
        if not args.kernel or any(k in name for k in args.kernel):
            print(report(name, instrs, args.list))


if __name__ == "__main__":
    main()
