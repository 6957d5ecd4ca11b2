"""Registers, stack, shared memory and programs per SM of our decode Triton kernels, compiled for an
H100 (sm_90) on any machine: Triton ships its own ptxas and cuobjdump, so no GPU is needed.

    python scripts/triton_resources.py [--tiles 64,32] [--stages 3,2] [--warps 4] [--maxnreg 0,96]

Integer arguments get the divisibility by 16 that the JIT specialises on for the engine's strides;
without it the attention kernel compiles to 255 registers, stack spills and no cp.async, which is
not what runs (docs/results/serving.md, section at 52c2cc8). Programs per SM: the least of what
registers (64K a SM), shared memory (227 KB, plus 1 KB reserved a block) and warps (64) allow.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import re
import subprocess
import tempfile

POINTER_TYPES = {"scale": "fp32", "part_ptr": "*fp32", "count_ptr": "*i32", "tables_ptr": "*i32",
                 "lens_ptr": "*i32", "slot_ptr": "*i64", "buf_ptr": "*fp32", "lora_slot_ptr": "*i32",
                 "ranks_ptr": "*i32"}
DIVISIBLE = {"stride_kslot", "stride_kh", "stride_qb", "stride_qh", "stride_ob", "stride_oh", "stride_t",
             "stride_c", "stride_bs", "stride_bt", "stride_bql", "stride_bkl", "stride_bn"}


def _usage(cubin: bytes, cuobjdump: pathlib.Path) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(found.group(1)), int(found.group(2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", default="64,32")
    parser.add_argument("--stages", default="3,2")
    parser.add_argument("--warps", default="4")
    parser.add_argument("--maxnreg", default="0", help="register caps to try (0: none)")
    args = parser.parse_args()
    import triton
    from triton.backends.compiler import GPUTarget

    from inlaid.kernels.triton import paged_attention, rope_attention

    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    print("| kernel | tile | stages | warps | maxnreg | registers | stack bytes | shared bytes | programs/SM |")
    print("|---|---|---|---|---|---|---|---|---|")
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    for tile, stages, warps, maxnreg in itertools.product(ints(args.tiles), ints(args.stages), ints(args.warps),
                                                          ints(args.maxnreg)):
        consts = dict(GROUPS=1, BLOCK_SIZE=16, TILE=tile, HEAD_DIM=128, HAS_WINDOW=False, BLOCK_H=16, IEEE=False,
                      SPLITS=1, PDL=True)
        kernels = [("paged mma", paged_attention._paged_decode_mma_kernel, consts),
                   ("rope mma", rope_attention._rope_decode_mma_kernel, dict(consts, LORA=False, BLOCK_R=16, MAX_R=16)),
                   ("rope mma + LoRA", rope_attention._rope_decode_mma_kernel, dict(consts, LORA=True, BLOCK_R=16, MAX_R=16))]
        for label, fn, constexprs in kernels:
            signature = {n: "constexpr" if n in constexprs else
                         POINTER_TYPES.get(n, "*fp16" if n.endswith("_ptr") else "i32") for n in fn.arg_names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                     if n not in constexprs and (n.endswith("_ptr") or n in DIVISIBLE)}
            options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
            compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                                                attrs=attrs),
                                      target=GPUTarget("cuda", 90, 32), options=options)
            regs, stack = _usage(compiled.asm["cubin"], cuobjdump)
            shared = compiled.metadata.shared
            per_sm = min(65536 // (max(regs, 1) * 32 * warps), 232448 // (shared + 1024), 64 // warps)
            print(f"| {label} | {tile} | {stages} | {warps} | {maxnreg or '-'} | {regs} | {stack} | {shared} | "
                  f"{per_sm} |")


if __name__ == "__main__":
    main()
