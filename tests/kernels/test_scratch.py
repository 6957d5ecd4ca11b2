"""The persistent scratch buffers of the in-kernel merges (CPU: the buffer logic, no kernel)."""

import torch

from inlaid.kernels.triton.scratch import _RETIRED, persistent


def test_one_zeroed_buffer_per_name_until_outgrown():
    a = persistent("test-a", "cpu", 10, torch.int32)
    assert a.numel() >= 10 and not a.any()
    a[:3] = 7  # a launch that left its counts set would be seen by the next one
    assert persistent("test-a", torch.device("cpu"), 5, torch.int32) is a
    assert persistent("test-b", "cpu", 5, torch.int32) is not a
    assert persistent("test-a", "cpu", 5, torch.float32) is not a
    big = persistent("test-a", "cpu", a.numel() + 1, torch.int32)
    assert big is not a and not big.any() and big.numel() > a.numel()
    assert any(r is a for r in _RETIRED)  # graphs captured with the old one still use it
