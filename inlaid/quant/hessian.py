"""Per-task Hessians and their aggregation into the one Hessian GPTQ solves against.

A task's Hessian for a linear input X (tokens x features) is ``H_t = 2/n_t * sum x x^T`` (the GPTQ
reference normalisation). Aggregation rules over tasks:
- ``mix``:  pooled tokens, ``2/N * sum_t sum x x^T`` = plain GPTQ on the mixed data;
- ``mean``: task-balanced, ``1/T * sum_t H_t`` (every task weighs the same whatever its token count);
- ``max``:  element-wise ``max_t H_t`` (the LoRA-Inlaid rule).

The aggregation *state* is what incremental task addition keeps on disk: for ``mix`` the raw sum and
the token count, for ``mean`` the sum of H_t and the task count, for ``max`` the running maximum.
Folding a task into a state is the only way a state changes, and a full run folds tasks in order
too, so ``add-task`` performs exactly the same floating-point operations as a full run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class HessianAccumulator:
    """Running ``sum x x^T`` (fp32) and token count for one linear input of one task."""

    def __init__(self, features: int, device: torch.device | str):
        self.sum = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def symmetric_sum(self) -> torch.Tensor:
        """``sum x x^T`` made exactly symmetric (BLAS need not be), so that storing only the upper
        triangle of an aggregation state loses nothing and add-task stays bit-identical."""
        upper = torch.triu(self.sum)
        return upper + torch.triu(self.sum, diagonal=1).t()

    def hessian(self) -> torch.Tensor:
        """The task's own Hessian ``2/n sum x x^T``."""
        return self.symmetric_sum() * (2.0 / max(self.tokens, 1))


@dataclass
class AggregationState:
    """Aggregated statistics of the tasks folded so far, for one Hessian group of one layer."""

    rule: str
    matrix: torch.Tensor | None = None  # fp32 [f, f]
    count: int = 0  # tokens for "mix", tasks for "mean" and "max"

    def fold(self, acc: HessianAccumulator) -> None:
        if self.rule == "mix":
            s = acc.symmetric_sum()
            self.matrix = s if self.matrix is None else self.matrix + s
            self.count += acc.tokens
        elif self.rule == "mean":
            h = acc.hessian()
            self.matrix = h if self.matrix is None else self.matrix + h
            self.count += 1
        elif self.rule == "max":
            h = acc.hessian()
            self.matrix = h if self.matrix is None else torch.maximum(self.matrix, h)
            self.count += 1
        else:
            raise ValueError(f"unknown aggregation {self.rule!r}")

    def hessian(self) -> torch.Tensor:
        if self.matrix is None:
            raise ValueError("no task folded into this aggregation state")
        if self.rule == "mix":
            return self.matrix * (2.0 / max(self.count, 1))
        if self.rule == "mean":
            return self.matrix / self.count
        return nearest_psd(self.matrix) if self.count > 1 else self.matrix


    # Symmetric matrices are stored as their upper triangle: half the bytes on disk.
    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        f = self.matrix.shape[0]
        rows, cols = torch.triu_indices(f, f, device=self.matrix.device)
        return {f"{prefix}.triu": self.matrix[rows, cols].cpu().contiguous(),
                f"{prefix}.count": torch.tensor([self.count], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, rule: str, tensors: dict[str, torch.Tensor], prefix: str,
                     device: torch.device | str = "cpu") -> "AggregationState":
        triu = tensors[f"{prefix}.triu"].to(device)
        f = int(round(((8 * triu.numel() + 1) ** 0.5 - 1) / 2))
        rows, cols = torch.triu_indices(f, f, device=device)
        m = torch.zeros(f, f, dtype=torch.float32, device=device)
        m[rows, cols] = triu
        m[cols, rows] = triu
        return cls(rule=rule, matrix=m, count=int(tensors[f"{prefix}.count"].item()))


def relative_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||(W - Q) X||^2 / ||W X||^2`` computed through H (tokens cancel): the per-task damage."""
    w = weight.float()
    delta = w - quantized.float()
    num = torch.einsum("oi,ij,oj->", delta, hessian, delta)
    den = torch.einsum("oi,ij,oj->", w, hessian, w)
    return (num / den.clamp(min=1e-30)).item()


def nearest_psd(h: torch.Tensor) -> torch.Tensor:
    """The PSD matrix nearest to ``h`` (Frobenius): negative eigenvalues clipped to zero.

    The element-wise max of PSD matrices is in general indefinite. Shifting the whole spectrum by the
    most negative eigenvalue (damping) blurs every direction; clipping only the negative ones keeps
    the directions that the max was taken for. Measured on SmolLM2 (docs/results/quantize.md)."""
    live = torch.diag(h) != 0  # dead inputs stay exactly zero: the solver recognises them by that
    sub = h[live][:, live].double()
    values, vectors = torch.linalg.eigh((sub + sub.t()) / 2)
    out = torch.zeros_like(h)
    out[live.nonzero()[:, 0, None], live.nonzero()[:, 0]] = ((vectors * values.clamp(min=0)) @ vectors.t()).to(h.dtype)
    return out
