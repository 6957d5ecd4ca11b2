"""Captured forward passes (CUDA graphs) of the model runner's steps, by bucket size.

A step launches ~20 kernels per layer. Run op by op, each launch costs the host tens of µs of
Python (dispatch, argument checks, Triton's launcher): on an H100 host a 1 x 128-token prefill step
took ~95 ms of wall time for ~11 ms of kernels (``scripts/host_profile.py``,
docs/results/serving.md), so the host, not the GPU, set the pace of every step that prefills. A
graph replays all of a step's kernels for a few µs of host time. Two sets, one memory pool (replays
never overlap, so they can share it):

- :class:`DecodeGraphs`: all-decode steps, bucketed by sequences (1, 2, 4, 8, 16, 24, 32, ...,
  256). Attention runs the paged decode kernel.
- :class:`MixedGraphs`: every other step (prefill, chunked prefill, recompute, decodes mixed in),
  bucketed by tokens (16, 32, 64, 128, 256, 384, ... up to ``max_num_batched_tokens``). Every
  sequence is a chunk for the varlen prefill kernel (a decode is a chunk of one token); its tile
  map sits in a static buffer sized for the bucket's worst case, and tiles past the step's point at
  an empty chunk, so the grid is fixed.

Inputs are copied into static buffers before a replay, without waiting for the GPU
(``inlaid.kernels.transfer``); so is each bucket's grouping of tokens by adapter slot
(``LoraBatchMeta.prepare_host``, one per bucket: its views are what the captured LoRA kernels
read), computed on the host, where the slots are known, instead of by captured sorts and gathers.
Rows past a step's tokens are padding: token 0, position 0, adapter slot -1, K/V written to one
spare sink block past the real cache, in no attention chunk; their outputs are dropped.
Everything a kernel's launch depends on (grids, shapes, backend choices by M) is fixed by the
bucket, never by the step, so a captured launch is right for every step it serves. Steps that want
prompt logprobs (all rows' logits) and steps larger than the largest bucket run eagerly.
"""

from __future__ import annotations

import torch

from inlaid.engine.attention import AttentionBatch, kv_slots, pad_rows
from inlaid.engine.scheduler import StepPlan
from inlaid.kernels.lora import LoraBatchMeta
from inlaid.kernels.prefill_tiles import tile_bound, tile_lists
from inlaid.kernels.transfer import to_device

DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)  # sequences
MIXED_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)  # tokens


class _Graphs:
    """One graph per bucket, captured largest first into ``pool`` (or a new one)."""

    def __init__(self, runner, buckets: list[int]):
        self.runner, self.buckets = runner, buckets
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        meta = runner.lora_meta  # each bucket's token grouping, b tokens (a decode step's are sequences)
        self.metas = ({} if meta is None else
                      {b: LoraBatchMeta(b, meta.max_loras, meta.device, meta.block_m) for b in buckets})

    def _group(self, b: int, token_slot: list[int]) -> None:
        """Bucket b's LoRA grouping for a step's token slots (padding rows: none), before its replay."""
        if self.metas:
            self.metas[b].prepare_host(token_slot + [-1] * (b - len(token_slot)))

    def _forward(self, b: int) -> torch.Tensor:
        raise NotImplementedError

    def capture(self, pool=None):
        """Capture every bucket; returns the pool, for the next set to share."""
        for b in reversed(self.buckets):  # largest first: smaller graphs reuse its memory
            self._group(b, [])
            self._forward(b)  # warm-up: compiles kernels, builds backend state outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()
        return pool

    def bucket(self, n: int) -> int:
        return next(size for size in self.buckets if size >= n)

    def replay(self, b: int, rows: int) -> torch.Tensor:
        self.graphs[b].replay()
        return self.logits[b][:rows]


def _wants_prompt_logprobs(plan: StepPlan) -> bool:
    return any(s.seq.sampling.prompt_logprobs is not None for s in plan.scheduled)


def _adapter_slot(seq, slot_of: dict[str, int]) -> int:
    return slot_of[seq.adapter] if seq.adapter is not None else -1


class DecodeGraphs(_Graphs):
    """All-decode steps of up to 256 sequences, one graph per sequence bucket."""

    def __init__(self, runner, max_num_seqs: int, max_blocks_per_seq: int):
        super().__init__(runner, [b for b in DECODE_BUCKETS if b <= max_num_seqs] or [DECODE_BUCKETS[0]])
        n, dev = self.buckets[-1], runner.model.device
        # the per-row inputs live in two blocks, one copy each per step (rows past the batch padded)
        self.rows64 = torch.zeros(3, n, dtype=torch.int64, device=dev)
        self.input_ids, self.positions, self.slot_mapping = self.rows64
        self.slot_mapping.fill_(runner.sink_slot)
        self.lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(n, max(max_blocks_per_seq, 1), dtype=torch.int32, device=dev)

    def _forward(self, b: int) -> torch.Tensor:
        r = self.runner
        attn = AttentionBatch(self.slot_mapping[:b], decode_tables=self.tables[:b],
                              decode_lens32=self.lens[:b], block_size=r.block_size, all_decode=True)
        hidden = r.model(self.input_ids[:b], self.positions[:b], attn, r.kv_caches, self.metas.get(b))
        return r.model.logits(hidden)

    def accepts(self, plan: StepPlan) -> bool:
        return (len(plan.scheduled) <= self.buckets[-1] and all(s.is_decode for s in plan.scheduled)
                and not _wants_prompt_logprobs(plan))

    def run(self, plan: StepPlan, slot_of: dict[str, int], inputs) -> torch.Tensor:
        """Copy the plan's inputs into the static buffers (without waiting for the GPU) and replay."""
        n = len(plan.scheduled)
        bs, r = self.runner.block_size, self.runner
        pos, slots, lens, adapter_slots, tables = [], [], [], [], []
        for s in plan.scheduled:
            seq, p = s.seq, s.start
            pos.append(p)
            slots.extend(kv_slots(seq.block_table, p + 1, bs, p))
            lens.append(p + 1)
            adapter_slots.append(_adapter_slot(seq, slot_of))
            tables.append(seq.block_table)
        pad = self.rows64.shape[1] - n
        dev = self.input_ids.device
        to_device([inputs.ids + [0] * pad, pos + [0] * pad, slots + [r.sink_slot] * pad], torch.int64, dev,
                  out=self.rows64)
        inputs.patch(self.input_ids)
        to_device(lens + [0] * pad, torch.int32, dev, out=self.lens)
        padded = pad_rows(tables)
        to_device(padded, torch.int32, dev, out=self.tables[:n, :len(padded[0])])
        b = self.bucket(n)
        self._group(b, adapter_slots)
        return self.replay(b, n)


class MixedGraphs(_Graphs):
    """Steps with multi-token chunks, one graph per token bucket up to ``max_tokens``."""

    def __init__(self, runner, max_tokens: int, max_num_seqs: int, max_blocks_per_seq: int):
        super().__init__(runner, sorted({b for b in MIXED_BUCKETS if b < max_tokens} | {max_tokens}))
        t, s, dev = self.buckets[-1], max_num_seqs, runner.model.device
        self.max_seqs = s
        self.rows64 = torch.zeros(3, t, dtype=torch.int64, device=dev)  # ids, positions, KV slots
        self.input_ids, self.positions, self.slot_mapping = self.rows64
        self.slot_mapping.fill_(runner.sink_slot)
        # chunk c's first row, tokens, start position; chunk s is empty: padding tiles point at it
        self.chunks = torch.zeros(3, s + 1, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(s + 1, max(max_blocks_per_seq, 1), dtype=torch.int32, device=dev)
        self.tiles = torch.zeros(2, self.tile_bound(t), dtype=torch.int32, device=dev)
        self.tiles[0].fill_(s)
        self.sample_rows = torch.zeros(min(s, t), dtype=torch.int64, device=dev)

    def tile_bound(self, tokens: int) -> int:
        return tile_bound(tokens, self.max_seqs)

    def _forward(self, b: int) -> torch.Tensor:
        r = self.runner
        attn = AttentionBatch(self.slot_mapping[:b], prefill_tables=self.tables, prefill_meta=self.chunks,
                              prefill_tiles=self.tiles[:, :self.tile_bound(b)], block_size=r.block_size)
        hidden = r.model(self.input_ids[:b], self.positions[:b], attn, r.kv_caches, self.metas.get(b))
        return r.model.logits(hidden[self.sample_rows[:min(self.max_seqs, b)]])

    def accepts(self, plan: StepPlan) -> bool:
        return (plan.num_batched_tokens <= self.buckets[-1] and len(plan.scheduled) <= self.max_seqs
                and not _wants_prompt_logprobs(plan))

    def run(self, plan: StepPlan, slot_of: dict[str, int], inputs) -> torch.Tensor:
        """Copy the plan's inputs into the static buffers (without waiting for the GPU) and replay.
        Returns the logits of the sampling rows, in plan order."""
        r, bs = self.runner, self.runner.block_size
        b = self.bucket(plan.num_batched_tokens)
        pos, slots, token_slot, sample_rows, tables = [], [], [], [], []
        chunks = [[], [], []]
        row = 0
        for s in plan.scheduled:
            seq, n, table = s.seq, s.num_new_tokens, s.seq.block_table
            pos.extend(range(s.start, s.start + n))
            slots.extend(kv_slots(table, s.start + n, bs, s.start))
            token_slot.extend([_adapter_slot(seq, slot_of)] * n)
            for part, value in zip(chunks, (row, n, s.start)):
                part.append(value)
            tables.append(table)
            if s.samples:
                sample_rows.append(row + n - 1)
            row += n
        pad, dev = b - row, self.input_ids.device
        to_device([inputs.ids + [0] * pad, pos + [0] * pad, slots + [r.sink_slot] * pad], torch.int64, dev,
                  out=self.rows64[:, :b])
        inputs.patch(self.input_ids)
        self._group(b, token_slot)
        empty = self.max_seqs - len(tables) + 1
        to_device([part + [0] * empty for part in chunks], torch.int32, dev, out=self.chunks)
        padded = pad_rows(tables)
        to_device(padded, torch.int32, dev, out=self.tables[:len(tables), :len(padded[0])])
        tile_chunk, tile_m0 = tile_lists(chunks[1])
        grid = self.tile_bound(b)
        spare = grid - len(tile_chunk)
        to_device([tile_chunk + [self.max_seqs] * spare, tile_m0 + [0] * spare], torch.int32, dev,
                  out=self.tiles[:, :grid])
        # every row the graph gathers must lie inside this bucket, stale ones from a larger step too
        width = min(self.max_seqs, b)
        to_device(sample_rows + [0] * (width - len(sample_rows)), torch.int64, dev,
                  out=self.sample_rows[:width])
        return self.replay(b, len(sample_rows))
