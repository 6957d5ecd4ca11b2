"""Attention over the paged KV cache: write each step's K/V into its slots, then attend.

Cache layout, one pair per layer: ``k_cache``/``v_cache`` [num_blocks * block_size, kv_heads, head_dim]
— flat slots, slot = block_id * block_size + offset (a view as [num_blocks, block_size, ...] is the
same memory). A sequence's token at position p lives in slot
``block_table[p // block_size] * block_size + p % block_size``.

A step's tokens are split into two kinds of work (built once per step by :func:`build_batch`,
shared by every layer):

- *chunks*: multi-token pieces (prefill, chunked prefill, recompute after preemption), each attended
  alone with a causal mask offset by its start position — padding them together would waste up to
  (longest chunk × sequences) query rows;
- *decodes*: one query token each, batched into one padded call over gathered context slots.

On CUDA both run Triton kernels that read K/V in place through the block tables: decodes
``inlaid.kernels.triton.paged_attention`` (graph-safe shapes), chunks
``inlaid.kernels.triton.paged_prefill`` (all chunks of a step in one launch). Elsewhere both use
torch SDPA over gathered K/V: the simple, correct path the kernels are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from inlaid.kernels import dispatch
from inlaid.kernels.prefill_tiles import tile_map
from inlaid.kernels.transfer import to_device


@dataclass
class Chunk:
    row_start: int  # first row in the step's flat token batch
    num_tokens: int
    context_slots: torch.Tensor  # int64 [start + num_tokens]: cache slots of positions 0..end-1
    start: int  # absolute position of the first query token


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # int64 [T]: cache slot each new token's K/V is written to
    chunks: list[Chunk] = field(default_factory=list)
    decode_rows: torch.Tensor | None = None  # int64 [D]: rows of decode tokens in the flat batch
    decode_slots: torch.Tensor | None = None  # int64 [D, L]: context slots, padded with slot 0
    decode_lens: torch.Tensor | None = None  # int64 [D]: context length incl. the new token
    decode_tables: torch.Tensor | None = None  # int32 [D, max blocks]: block tables, 0-padded
    decode_lens32: torch.Tensor | None = None  # int32 [D]: decode_lens for the kernel
    # the prefill kernel's view of the chunks (then ``chunks`` stays empty): block tables int32
    # [C, max blocks] 0-padded, int32 [3, C] (first row, tokens, start position), its tile map
    prefill_tables: torch.Tensor | None = None
    prefill_meta: torch.Tensor | None = None
    prefill_tiles: torch.Tensor | None = None
    block_size: int = 16
    all_decode: bool = False  # every row is a decode (CUDA-graph batches): no row gather/scatter


def kv_slots(block_table: list[int], end: int, block_size: int, start: int = 0) -> list[int]:
    """Cache slots of positions start..end-1."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def build_batch(pieces: list[tuple[list[int], int, int]], block_size: int,
                device: torch.device | str) -> AttentionBatch:
    """``pieces``: per scheduled sequence, in batch order, (block table, start, num_new_tokens)."""
    slot_mapping: list[int] = []
    chunks: list[Chunk] = []
    decode_rows, decode_tables, decode_lens = [], [], []
    prefill: list[tuple[list[int], int, int, int]] = []  # kernel path: (table, row, tokens, start)
    use_kernel = _use_kernel(torch.device(device))
    row = 0
    for table, start, num in pieces:
        end = start + num
        if num == 1:
            slot_mapping.extend(kv_slots(table, end, block_size, end - 1))
            decode_rows.append(row)
            decode_tables.append(table)
            decode_lens.append(end)
        elif use_kernel:  # the kernel reads the context through the table: only new slots are listed
            slot_mapping.extend(kv_slots(table, end, block_size, start))
            prefill.append((table, row, num, start))
        else:
            context = kv_slots(table, end, block_size)
            slot_mapping.extend(context[start:])
            chunks.append(Chunk(row, num, to_device(context, torch.int64, device), start))
        row += num
    batch = AttentionBatch(to_device(slot_mapping, torch.int64, device), chunks,
                           block_size=block_size, all_decode=len(decode_rows) == len(pieces))
    if prefill:
        tables, rows, lens, starts = zip(*prefill)
        batch.prefill_tables = to_device(pad_rows(tables), torch.int32, device)
        batch.prefill_meta = to_device([rows, lens, starts], torch.int32, device)
        batch.prefill_tiles = tile_map(list(lens), device)
    if decode_rows:
        batch.decode_rows = to_device(decode_rows, torch.int64, device)
        batch.decode_lens = to_device(decode_lens, torch.int64, device)
        if use_kernel:
            batch.decode_tables = to_device(pad_rows(decode_tables), torch.int32, device)
            batch.decode_lens32 = batch.decode_lens.to(torch.int32)
        else:
            contexts = [kv_slots(t, n, block_size) for t, n in zip(decode_tables, decode_lens)]
            batch.decode_slots = to_device(pad_rows(contexts), torch.int64, device)
    return batch


def pad_rows(rows) -> list[list[int]]:
    """Lists of unequal length (block tables, slot lists) padded with 0 to the longest: a tensor's rows."""
    width = max(len(r) for r in rows)
    return [list(r) + [0] * (width - len(r)) for r in rows]


def _use_kernel(device: torch.device) -> bool:
    return dispatch.choose("paged_attention", device) == "triton"


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[..., kv_heads, L, d] -> [..., heads, L, d] for grouped-query attention."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=-3)


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, valid: torch.Tensor,
                 sliding_window: int | None) -> torch.Tensor:
    mask = valid & (k_pos <= q_pos)
    if sliding_window is not None:
        mask &= (q_pos - k_pos) < sliding_window
    return mask


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: AttentionBatch, scale: float, sliding_window: int | None = None
                    ) -> torch.Tensor:
    """q [T, heads, d] for the step's tokens (their K/V already written) -> out [T, heads, d]."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k_cache.shape[1]
    if batch.prefill_tables is not None:
        from inlaid.kernels.triton.paged_prefill import paged_prefill_attention

        paged_prefill_attention(q, k_cache, v_cache, batch.prefill_tables, batch.prefill_meta,
                                batch.prefill_tiles, batch.block_size, scale, sliding_window, out=out)
    for c in batch.chunks:
        qc = q[c.row_start:c.row_start + c.num_tokens].transpose(0, 1)  # [heads, n, d]
        k = _expand_kv(k_cache[c.context_slots].transpose(0, 1), groups)  # [heads, ctx, d]
        v = _expand_kv(v_cache[c.context_slots].transpose(0, 1), groups)
        q_pos = torch.arange(c.start, c.start + c.num_tokens, device=q.device)[:, None]
        k_pos = torch.arange(c.context_slots.numel(), device=q.device)[None, :]
        mask = _window_mask(q_pos, k_pos, torch.ones_like(k_pos, dtype=torch.bool), sliding_window)
        o = F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, scale=scale)
        out[c.row_start:c.row_start + c.num_tokens] = o.transpose(0, 1)
    if batch.decode_tables is not None:
        from inlaid.kernels.triton.paged_attention import paged_decode_attention

        variant = dispatch.choose("decode_attention", q.device)
        if batch.all_decode:
            return paged_decode_attention(q, k_cache, v_cache, batch.decode_tables, batch.decode_lens32,
                                          batch.block_size, scale, sliding_window, out=out,
                                          variant=variant)
        out[batch.decode_rows] = paged_decode_attention(
            q[batch.decode_rows], k_cache, v_cache, batch.decode_tables, batch.decode_lens32,
            batch.block_size, scale, sliding_window, variant=variant)
    elif batch.decode_rows is not None:
        qd = q[batch.decode_rows].unsqueeze(2)  # [D, heads, 1, d]
        k = _expand_kv(k_cache[batch.decode_slots].transpose(1, 2), groups)  # [D, heads, L, d]
        v = _expand_kv(v_cache[batch.decode_slots].transpose(1, 2), groups)
        k_pos = torch.arange(batch.decode_slots.shape[1], device=q.device)[None, :]
        q_pos = (batch.decode_lens - 1)[:, None]
        mask = _window_mask(q_pos, k_pos, k_pos < batch.decode_lens[:, None], sliding_window)
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=mask[:, None, None, :], scale=scale)
        out[batch.decode_rows] = o.squeeze(2)
    return out
