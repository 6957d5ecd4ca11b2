"""Quantization: primitives (the reference), GPTQ solver, Hessians, calibration driver, checkpoint."""
