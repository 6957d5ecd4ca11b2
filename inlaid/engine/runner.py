"""Model runner: turns a scheduler :class:`StepPlan` into one forward pass and sampled tokens.

It owns the device state — the KV cache tensors, the LoRA step metadata buffers, the per-request
generators, the decode CUDA graphs — and follows the scheduler's contract: feed tokens
[start, start + n) of each scheduled sequence, write their K/V into its block table, sample where
``samples`` is set. ``launch`` queues a step without waiting for the device and returns a
``PendingStep`` whose ``result()`` reads the tokens back; a fed token the host does not know yet
(a placeholder) is the previous launch's sample, taken from the device.

CUDA graphs (GPU): a step launches hundreds of small kernels; run op by op, their launch cost on
the host, not the GPU, sets the step time. Steps therefore replay graphs captured per bucket size
(``inlaid.engine.graphs``): all-decode steps by sequences, every other step by tokens. Only steps
that want prompt logprobs, or more tokens than the largest bucket, run op by op.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from inlaid.engine.adapters import AdapterManager
from inlaid.engine.attention import build_batch
from inlaid.engine.graphs import DecodeGraphs, MixedGraphs
from inlaid.engine.model import CausalLM
from inlaid.engine.sampler import (Sampled, TokenLogprobs, logprob_rows, make_generator, sample,
                                   token_logprobs)
from inlaid.engine.scheduler import StepPlan
from inlaid.kernels.lora import LoraBatchMeta, lora_backend
from inlaid.kernels.transfer import to_device

log = logging.getLogger(__name__)

NO_TOKEN = -1  # a prefill chunk that leaves tokens pending samples nothing


@dataclass
class StepOutput:
    token_ids: list[int]  # aligned with plan.scheduled; NO_TOKEN where nothing was sampled
    logprobs: list[TokenLogprobs | None]
    # request id -> {prompt position: logprobs of the prompt token at that position}
    prompt_logprobs: dict[str, dict[int, TokenLogprobs]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: CausalLM, adapters: AdapterManager | None, num_blocks: int,
                 block_size: int, max_num_batched_tokens: int, max_num_seqs: int = 0,
                 max_model_len: int = 0, cuda_graphs: bool = False, prefill_graphs: bool = True):
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
        self._last_sampled: torch.Tensor | None = None  # see launch()
        self._last_rows: dict[str, int] = {}
        self._max_tokens, self._max_seqs = max_num_batched_tokens, max_num_seqs
        self._max_blocks = -(-max_model_len // block_size)
        self._max_len = max_model_len
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self._prefill_graphs = prefill_graphs
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
                lora = self.lora_meta.prepare_host([0] * lens[0] + [-1] * (total - lens[0]))
            positions = torch.cat([torch.arange(n, device=device) for n in lens])
            hidden = self.model(torch.zeros(total, dtype=torch.int64, device=device), positions, attn,
                                self.kv_caches, lora)
            self.model.logits(hidden[-1:])
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @property
    def graph_mode(self) -> str:
        """Which steps replay CUDA graphs, in ``--cuda-graphs``' words ("prefill": only those, when
        the decode capture failed; "off" on the CPU)."""
        decode, prefill = self.graphs is not None, self.mixed_graphs is not None
        return {(True, True): "all", (True, False): "decode", (False, True): "prefill"}.get((decode, prefill), "off")

    @property
    def uses_graphs(self) -> bool:
        return self.graph_mode != "off"

    def capture_graphs(self) -> None:
        """(Re-)capture the step graphs: at start-up, and after weights change under them. The two
        sets share one memory pool."""
        self.graphs = self.mixed_graphs = None  # free the old graphs' pool first
        probe = torch.empty(0, dtype=self.model.dtype, device=self.model.device)
        if self.lora_meta is not None and lora_backend(probe) == "ref":
            # torch's LoRA reference reads group sizes back to the host: no graph can hold it
            log.info("no CUDA graphs: LoRA in %s runs the torch reference; every step runs op by op",
                     self.model.dtype)
            return
        pool = None
        try:
            graphs = DecodeGraphs(self, self._max_seqs, self._max_blocks)
            pool = graphs.capture()
            self.graphs = graphs
        except RuntimeError as exc:  # a backend that cannot be captured: serve eagerly
            log.warning("CUDA graph capture failed, decoding eagerly: %s", exc)
        if not self._prefill_graphs:
            return
        try:
            graphs = MixedGraphs(self, self._max_tokens, self._max_seqs, self._max_blocks)
            graphs.capture(pool)
            self.mixed_graphs = graphs
        except RuntimeError as exc:
            log.warning("CUDA graph capture of prefill steps failed, running them eagerly: %s", exc)

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if request_id not in self._generators:
            self._generators[request_id] = make_generator(seed, self.model.device)
        return self._generators[request_id]

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        """Run one step and wait for its tokens."""
        return self.launch(plan).result()

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> PendingStep:
        """Queue one step on the device and return without waiting for it. Inputs that are
        placeholders (tokens sampled by the previously launched step, not read back yet) are fed
        from that step's device tensor of sampled tokens."""
        slot_of = self.adapters.activate(plan.adapters) if plan.adapters else {}
        prompt_logprobs = {}
        graphs = self.graph_set(plan)
        if graphs is not None:
            logits = graphs.run(plan, slot_of, self._token_inputs(plan))
        else:
            logits, prompt_logprobs = self._forward_eager(plan, slot_of)
        sampling = [i for i, s in enumerate(plan.scheduled) if s.samples]
        sampled = self._sample(plan, sampling, logits) if sampling else None
        # where the next step finds this step's tokens while they are still placeholders
        self._last_sampled = sampled.tokens if sampled is not None else None
        self._last_rows = {plan.scheduled[i].seq.request_id: row for row, i in enumerate(sampling)}
        return PendingStep(len(plan.scheduled), sampling, sampled, prompt_logprobs)

    def graph_set(self, plan: StepPlan) -> DecodeGraphs | MixedGraphs | None:
        """The captured graphs that run ``plan``; None: it runs op by op."""
        for graphs in (self.graphs, self.mixed_graphs):
            if graphs is not None and graphs.accepts(plan):
                return graphs
        return None

    def _token_inputs(self, plan: StepPlan) -> TokenInputs:
        """The step's input token ids, flat in plan order: known ones from the host, placeholders
        as (row, row of the previous launch's sampled tokens)."""
        ids, dst, src = [], [], []
        for s in plan.scheduled:
            seq, end = s.seq, s.start + s.num_new_tokens
            known = seq.token_ids[s.start:end]
            ids.extend(known)
            if len(known) < s.num_new_tokens:  # the fed tail is the sample of the last launch
                if s.num_new_tokens - len(known) != 1 or seq.request_id not in self._last_rows:
                    raise RuntimeError(f"{seq.request_id}: a placeholder input that the previous "
                                       "step did not sample")
                dst.append(len(ids))
                src.append(self._last_rows[seq.request_id])
                ids.append(0)
        return TokenInputs(ids, dst, src, self._last_sampled if dst else None)

    def _forward_eager(self, plan: StepPlan, slot_of: dict[str, int]):
        """(logits of the sampling rows or None, prompt logprobs) of one step run op by op."""
        device = self.model.device
        positions, token_slot, pieces, sample_rows = [], [], [], []
        prompt_rows = []  # (request, row, start, next-token targets, top n)
        for s in plan.scheduled:
            seq, row = s.seq, len(positions)
            end = s.start + s.num_new_tokens
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
            lora = self.lora_meta.prepare_host(token_slot)
        ids = self._token_inputs(plan).to(device)
        hidden = self.model(ids, to_device(positions, torch.int64, device), attn, self.kv_caches, lora)
        logits = None
        if sample_rows:
            logits = self.model.logits(hidden[to_device(sample_rows, torch.int64, device)])
        prompt_logprobs = {}
        for request_id, row, start, targets, n in prompt_rows:  # reads values back: waits for the GPU
            logprobs = torch.log_softmax(self.model.logits(hidden[row:row + len(targets)]), dim=-1)
            parts = [p.cpu() for p in logprob_rows(logprobs, to_device(targets, torch.int64, device), n)]
            prompt_logprobs[request_id] = dict(enumerate(token_logprobs(targets, parts, [n] * len(targets)),
                                                         start=start + 1))
        return logits, prompt_logprobs

    def _sample(self, plan: StepPlan, sampling: list[int], logits: torch.Tensor) -> Sampled:
        """``logits`` has one row per sampling sequence of ``plan`` (``sampling``), in plan order."""
        seqs = [plan.scheduled[i].seq for i in sampling]
        gens = [self._generator(seq.request_id, seq.sampling.seed) for seq in seqs]
        return sample(logits, [seq.sampling for seq in seqs], gens)


@dataclass
class TokenInputs:
    """A step's input ids: ``ids`` from the host, then ``ids[dst[k]] = previous[src[k]]`` on the
    device for the placeholders."""

    ids: list[int]
    dst: list[int]
    src: list[int]
    previous: torch.Tensor | None

    def to(self, device: torch.device) -> torch.Tensor:
        """The ids as a device tensor; never waits for the GPU."""
        return self.patch(to_device(self.ids, torch.int64, device))

    def patch(self, ids: torch.Tensor) -> torch.Tensor:
        """Fill the placeholder rows of ``ids`` (on the device, the host's values elsewhere)."""
        if self.dst:
            ids.index_copy_(0, to_device(self.dst, torch.int64, ids.device),
                            self.previous.index_select(0, to_device(self.src, torch.int64, ids.device)))
        return ids


class PendingStep:
    """A launched step; ``result()`` waits for its sampled tokens (and only for them)."""

    def __init__(self, num_scheduled: int, sampling: list[int], sampled: Sampled | None,
                 prompt_logprobs: dict[str, dict[int, TokenLogprobs]]):
        self._n, self._sampling, self._sampled = num_scheduled, sampling, sampled
        self._prompt_logprobs = prompt_logprobs

    def result(self) -> StepOutput:
        out = StepOutput([NO_TOKEN] * self._n, [None] * self._n, self._prompt_logprobs)
        if self._sampled is not None:
            tokens, logprobs = self._sampled.fetch()
            for i, token, lp in zip(self._sampling, tokens, logprobs):
                out.token_ids[i], out.logprobs[i] = token, lp
        return out
