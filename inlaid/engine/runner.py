"""Model runner: turns a scheduler :class:`StepPlan` into one forward pass and sampled tokens.

It owns the device state — the KV cache tensors, the LoRA step metadata buffers, the per-request
generators, the decode CUDA graphs — and follows the scheduler's contract: feed tokens
[start, start + n) of each scheduled sequence, write their K/V into its block table, sample where
``samples`` is set.

CUDA graphs (GPU): a decode step launches a few thousand small kernels; on a busy host their launch
cost, not the GPU, sets the step time. All-decode steps of up to the largest bucket size therefore
replay a graph captured per bucket (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, ...): inputs are copied
into static buffers, rows past the batch are padding (token 0, context length 0, adapter slot -1,
K/V written to one spare sink block past the real cache) and their logits are dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from inlaid.engine.adapters import AdapterManager
from inlaid.engine.attention import AttentionBatch, build_batch, pad_rows
from inlaid.engine.model import CausalLM
from inlaid.engine.sampler import TokenLogprobs, make_generator, sample, token_logprobs
from inlaid.engine.scheduler import StepPlan
from inlaid.kernels.lora import LoraBatchMeta

log = logging.getLogger(__name__)

NO_TOKEN = -1  # a prefill chunk that leaves tokens pending samples nothing
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


@dataclass
class StepOutput:
    token_ids: list[int]  # aligned with plan.scheduled; NO_TOKEN where nothing was sampled
    logprobs: list[TokenLogprobs | None]
    # request id -> {prompt position: logprobs of the prompt token at that position}
    prompt_logprobs: dict[str, dict[int, TokenLogprobs]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: CausalLM, adapters: AdapterManager | None, num_blocks: int,
                 block_size: int, max_num_batched_tokens: int, max_num_seqs: int = 0,
                 max_model_len: int = 0, cuda_graphs: bool = False):
        self.model, self.adapters = model, adapters
        self.block_size = block_size
        s = model.shape
        slots = (num_blocks + 1) * block_size  # + one sink block for graph padding rows
        self.sink_slot = num_blocks * block_size
        self.kv_caches = [
            tuple(torch.zeros(slots, s.num_kv_heads, s.head_dim, device=model.device, dtype=model.dtype)
                  for _ in range(2))
            for _ in range(s.num_layers)]
        self.lora_meta = None
        if adapters is not None and adapters.max_loras > 0:
            self.lora_meta = LoraBatchMeta(max_num_batched_tokens, adapters.max_loras, model.device)
        self._generators: dict[str, torch.Generator | None] = {}
        self._graph_shape = (max_num_seqs, -(-max_model_len // block_size))
        self._max_len = max_model_len
        self.graphs = None
        if model.device.type == "cuda":
            self.warm_prefill(max_num_batched_tokens)
        if cuda_graphs and model.device.type == "cuda":
            self.capture_graphs()

    @torch.inference_mode()
    def warm_prefill(self, max_tokens: int) -> None:
        """Run a few prefill-shaped steps whose K/V all go to the sink block, so that the kernels
        of prefill steps (attention, LoRA and GEMM variants by M, norm/RoPE) compile at start-up
        and not inside the first requests' steps: on an H100 the first 1 x 128-token prefill step of
        `scripts/gpu_engine.py --profile 32` took 1,210 ms of wall time without it and 508 ms with it
        (docs/results/bench.md, gpu_profile_5bc1886.log / gpu_profile_e9943e2.log). Token counts: one
        below 64, one within 65-255 and one from 256 (the GEMM dispatch's regimes), the step cap;
        two or more sequences each (none longer than the model's context), the first on an
        adapter slot when there are slots."""
        device = self.model.device
        sink = self.sink_slot // self.block_size
        for total in sorted({n for n in (37, 128, 300, max_tokens) if 2 <= n <= max_tokens}):
            parts = max(2, -(-total // self._max_len)) if self._max_len else 2
            lens = [total // parts + (i < total % parts) for i in range(parts)]
            pieces = [([sink] * -(-n // self.block_size), 0, n) for n in lens]
            attn = build_batch(pieces, self.block_size, device)
            lora = None
            if self.lora_meta is not None:
                lora = self.lora_meta.prepare(torch.tensor([0] * lens[0] + [-1] * (total - lens[0]),
                                                           dtype=torch.int32, device=device))
            positions = torch.cat([torch.arange(n, device=device) for n in lens])
            hidden = self.model(torch.zeros(total, dtype=torch.int64, device=device), positions, attn,
                                self.kv_caches, lora)
            self.model.logits(hidden[-1:])
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def capture_graphs(self) -> None:
        """(Re-)capture the decode graphs: at start-up, and after weights change under them."""
        self.graphs = None  # free the old graphs' pool first
        try:
            self.graphs = DecodeGraphs(self, *self._graph_shape)
        except RuntimeError as exc:  # a backend that cannot be captured: serve eagerly
            log.warning("CUDA graph capture failed, decoding eagerly: %s", exc)

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if request_id not in self._generators:
            self._generators[request_id] = make_generator(seed, self.model.device)
        return self._generators[request_id]

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        slot_of = self.adapters.activate(plan.adapters) if plan.adapters else {}
        if self.graphs is not None and self.graphs.accepts(plan):
            return self._sample(plan, self.graphs.run(plan, slot_of))
        return self._execute_eager(plan, slot_of)

    def _execute_eager(self, plan: StepPlan, slot_of: dict[str, int]) -> StepOutput:
        device = self.model.device
        ids, positions, token_slot, pieces, sample_rows = [], [], [], [], []
        prompt_rows = []  # (request, row, start, next-token targets, top n)
        for s in plan.scheduled:
            seq, row = s.seq, len(ids)
            end = s.start + s.num_new_tokens
            ids.extend(seq.token_ids[s.start:end])
            positions.extend(range(s.start, end))
            token_slot.extend([slot_of[seq.adapter] if seq.adapter is not None else -1] * s.num_new_tokens)
            pieces.append((seq.block_table, s.start, s.num_new_tokens))
            if s.samples:
                sample_rows.append(row + s.num_new_tokens - 1)
            if seq.sampling.prompt_logprobs is not None and s.start < seq.num_prompt_tokens - 1:
                # rows whose next token is still a prompt token
                last = min(end, seq.num_prompt_tokens - 1)
                prompt_rows.append((seq.request_id, row, s.start, seq.token_ids[s.start + 1:last + 1],
                                    seq.sampling.prompt_logprobs))
        attn = build_batch(pieces, self.block_size, device)
        lora = None
        if self.lora_meta is not None and slot_of:
            lora = self.lora_meta.prepare(torch.tensor(token_slot, dtype=torch.int32, device=device))
        hidden = self.model(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                            attn, self.kv_caches, lora)
        logits = None
        if sample_rows:
            logits = self.model.logits(hidden[torch.tensor(sample_rows, device=device)])
        out = self._sample(plan, logits)
        for request_id, row, start, targets, n in prompt_rows:
            logprobs = torch.log_softmax(self.model.logits(hidden[row:row + len(targets)]), dim=-1)
            out.prompt_logprobs[request_id] = {
                start + 1 + j: token_logprobs(logprobs[j], t, n) for j, t in enumerate(targets)}
        return out


    def _sample(self, plan: StepPlan, logits: torch.Tensor | None) -> StepOutput:
        """``logits`` has one row per sampling sequence of ``plan``, in plan order."""
        out = StepOutput([NO_TOKEN] * len(plan.scheduled), [None] * len(plan.scheduled))
        sampling = [(i, s.seq) for i, s in enumerate(plan.scheduled) if s.samples]
        if sampling:
            params = [seq.sampling for _, seq in sampling]
            gens = [self._generator(seq.request_id, seq.sampling.seed) for _, seq in sampling]
            tokens, logprobs = sample(logits, params, gens)
            for (i, _), token, lp in zip(sampling, tokens, logprobs):
                out.token_ids[i], out.logprobs[i] = token, lp
        return out


class DecodeGraphs:
    """Captured decode steps, one CUDA graph per bucket size, sharing one memory pool."""

    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_blocks_per_seq: int):
        self.runner = runner
        model = runner.model
        self.buckets = [b for b in GRAPH_BUCKETS if b <= max_num_seqs] or [GRAPH_BUCKETS[0]]
        n, dev = self.buckets[-1], model.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), runner.sink_slot, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(n, max(max_blocks_per_seq, 1), dtype=torch.int32, device=dev)
        self.lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.token_slot = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture()

    def _forward(self, b: int) -> torch.Tensor:
        r = self.runner
        attn = AttentionBatch(self.slot_mapping[:b], decode_tables=self.tables[:b],
                              decode_lens32=self.lens[:b], block_size=r.block_size, all_decode=True)
        lora = r.lora_meta.prepare(self.token_slot[:b]) if r.lora_meta is not None else None
        hidden = r.model(self.input_ids[:b], self.positions[:b], attn, r.kv_caches, lora)
        return r.model.logits(hidden)

    def _capture(self) -> None:
        pool = None
        for b in reversed(self.buckets):  # largest first: smaller graphs reuse its pool memory
            self._forward(b)  # warm-up: compiles kernels, builds backend state outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def accepts(self, plan: StepPlan) -> bool:
        return (len(plan.scheduled) <= self.buckets[-1]
                and all(s.is_decode and s.seq.sampling.prompt_logprobs is None for s in plan.scheduled))

    def run(self, plan: StepPlan, slot_of: dict[str, int]) -> torch.Tensor:
        n = len(plan.scheduled)
        b = next(size for size in self.buckets if size >= n)
        bs, r = self.runner.block_size, self.runner
        ids, pos, slots, lens, adapter_slots, tables = [], [], [], [], [], []
        for s in plan.scheduled:
            seq, p = s.seq, s.start
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            adapter_slots.append(slot_of[seq.adapter] if seq.adapter is not None else -1)
            tables.append(seq.block_table)
        pad = b - n
        dev = self.input_ids.device
        self.input_ids[:b].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self.positions[:b].copy_(torch.tensor(pos + [0] * pad), non_blocking=True)
        self.slot_mapping[:b].copy_(torch.tensor(slots + [r.sink_slot] * pad), non_blocking=True)
        self.lens[:b].copy_(torch.tensor(lens + [0] * pad, dtype=torch.int32), non_blocking=True)
        self.token_slot[:b].copy_(torch.tensor(adapter_slots + [-1] * pad, dtype=torch.int32),
                                  non_blocking=True)
        padded = torch.tensor(pad_rows(tables), dtype=torch.int32)
        self.tables[:n, :padded.shape[1]].copy_(padded, non_blocking=True)
        self.graphs[b].replay()  # the captured step re-groups token_slot for LoRA itself
        return self.logits[b][:n]
