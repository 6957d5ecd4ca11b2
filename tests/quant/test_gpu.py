"""GPU checks (skipped without CUDA; run by scripts/gpu_check.sh on a GPU machine)."""

import pytest
import torch

from inlaid.config import QuantConfig, TaskSpec
from inlaid.quant import pipeline
from inlaid.quant.checkpoint import read_checkpoint
from inlaid.quant.gptq import gptq_quantize
from inlaid.quant.hessian import relative_error

from .test_gptq import correlated_inputs, hessian_of

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_solver_on_gpu_matches_cpu(bits):
    """Same algorithm, different BLAS: codes may flip only where a value sits on a rounding edge."""
    x = correlated_inputs(1024, 256, seed=bits)
    h = hessian_of(x)
    w = torch.randn(128, 256)
    cpu = gptq_quantize(w, h, bits=bits, group_size=64)
    gpu = gptq_quantize(w.cuda(), h.cuda(), bits=bits, group_size=64)
    flips = (gpu.codes.cpu() != cpu.codes).float().mean().item()
    assert flips < 0.01, flips
    err_cpu, err_gpu = relative_error(w, cpu.weight, h), relative_error(w, gpu.weight.cpu(), h)
    assert abs(err_gpu - err_cpu) <= 0.02 * err_cpu


def test_quantize_on_gpu_close_to_cpu(tmp_path, tiny_model, tiny_tasks):
    names = ["sql", "math"]
    specs = [TaskSpec(n, *tiny_tasks[n]) for n in names]
    cfg = QuantConfig(group_size=32, samples=6, seq_len=48)
    pipeline.quantize(str(tiny_model), tmp_path / "cpu", specs, cfg, device="cpu")
    pipeline.quantize(str(tiny_model), tmp_path / "gpu", specs, cfg, device="cuda")
    a = read_checkpoint(tmp_path / "cpu").dense_state_dict()
    b = read_checkpoint(tmp_path / "gpu").dense_state_dict()
    for key in a:
        if key.endswith("proj.weight"):
            rel = ((a[key] - b[key]).norm() / a[key].norm()).item()
            assert rel < 0.05, (key, rel)  # fp16 layer forwards on GPU vs fp32 on CPU
