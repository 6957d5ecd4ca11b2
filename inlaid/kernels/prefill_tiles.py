"""The query tiles of the varlen prefill attention kernel (``inlaid.kernels.triton.paged_prefill``),
built on the host: Triton-free, so the engine's graph code and the CPU tests can use it."""

from __future__ import annotations

import torch

from inlaid.kernels.transfer import to_device

BLOCK_M = 64  # query rows per program of the prefill kernel


def tile_lists(chunk_lens: list[int]) -> tuple[list[int], list[int]]:
    """(chunk, first row in that chunk) of each query tile, chunk after chunk."""
    chunks, firsts = [], []
    for i, n in enumerate(chunk_lens):
        for m0 in range(0, n, BLOCK_M):
            chunks.append(i)
            firsts.append(m0)
    return chunks, firsts


def tile_map(chunk_lens: list[int], device: torch.device | str) -> torch.Tensor:
    """int32 [2, num_tiles]: per query tile, its chunk and its first row in that chunk."""
    return to_device(list(tile_lists(chunk_lens)), torch.int32, device)


def tile_bound(tokens: int, max_chunks: int) -> int:
    """Most query tiles that any split of ``tokens`` into at most ``max_chunks`` chunks needs, so a
    grid of this many tiles serves every such step (CUDA graphs). With k chunks, each needs one
    tile, and another for each further ``BLOCK_M`` tokens it holds: at most k + (tokens - k) //
    BLOCK_M, reached by k - 1 chunks of one token and one of the rest."""
    k = min(max_chunks, tokens)
    return k + (tokens - k) // BLOCK_M
