"""Mixed-precision ops: quantized GEMM over the GPTQ layout and multi-LoRA shrink/expand.

Every op has a torch reference (``*_ref``) that runs everywhere; Triton and exllamav2 backends register
under the same op and :mod:`inlaid.kernels.dispatch` picks one per call from a single table.
"""
