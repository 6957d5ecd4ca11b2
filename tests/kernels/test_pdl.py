"""Whether our kernels are launched with programmatic dependent launch (the GPU side of it:
test_pdl_gpu.py)."""

import torch

from inlaid.kernels import pdl


def test_off_on_the_cpu():
    assert not pdl.enabled(torch.device("cpu"))
    # the Triton interpreter (CPU tensors) gets the constexpr off and no launch option
    assert pdl.triton_args(torch.device("cpu")) == {"PDL": False}


def test_follows_the_capability_and_the_environment(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(pdl, "_sm", lambda index: 90)
    assert pdl.enabled(cuda)
    assert pdl.triton_args(cuda) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setenv("INLAID_BACKEND_PDL", "off")
    assert not pdl.enabled(cuda)
    assert pdl.triton_args(cuda) == {"PDL": False}
    monkeypatch.delenv("INLAID_BACKEND_PDL")
    monkeypatch.setattr(pdl, "_sm", lambda index: 80)  # Ampere: no griddepcontrol
    assert not pdl.enabled(cuda)
