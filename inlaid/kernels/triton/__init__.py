"""Triton kernels (GPU only; imported lazily by the dispatching front ends)."""
