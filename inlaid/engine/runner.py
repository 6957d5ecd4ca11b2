"""Model runner: turns a scheduler :class:`StepPlan` into one forward pass and sampled tokens.

It owns the device state — the KV cache tensors, the LoRA step metadata buffers, the per-request
generators — and follows the scheduler's contract: feed tokens [start, start + n) of each scheduled
sequence, write their K/V into its block table, sample where ``samples`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inlaid.engine.adapters import AdapterManager
from inlaid.engine.attention import build_batch
from inlaid.engine.model import CausalLM
from inlaid.engine.sampler import TokenLogprobs, make_generator, sample, token_logprobs
from inlaid.engine.scheduler import StepPlan
from inlaid.kernels.lora import LoraBatchMeta

NO_TOKEN = -1  # a prefill chunk that leaves tokens pending samples nothing


@dataclass
class StepOutput:
    token_ids: list[int]  # aligned with plan.scheduled; NO_TOKEN where nothing was sampled
    logprobs: list[TokenLogprobs | None]
    # request id -> {prompt position: logprobs of the prompt token at that position}
    prompt_logprobs: dict[str, dict[int, TokenLogprobs]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: CausalLM, adapters: AdapterManager | None, num_blocks: int,
                 block_size: int, max_num_batched_tokens: int):
        self.model, self.adapters = model, adapters
        self.block_size = block_size
        s = model.shape
        slots = num_blocks * block_size
        self.kv_caches = [
            tuple(torch.zeros(slots, s.num_kv_heads, s.head_dim, device=model.device, dtype=model.dtype)
                  for _ in range(2))
            for _ in range(s.num_layers)]
        self.lora_meta = None
        if adapters is not None and adapters.max_loras > 0:
            self.lora_meta = LoraBatchMeta(max_num_batched_tokens, adapters.max_loras, model.device)
        self._generators: dict[str, torch.Generator | None] = {}

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if request_id not in self._generators:
            self._generators[request_id] = make_generator(seed, self.model.device)
        return self._generators[request_id]

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        device = self.model.device
        slot_of = self.adapters.activate(plan.adapters) if plan.adapters else {}
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
        out = StepOutput([NO_TOKEN] * len(plan.scheduled), [None] * len(plan.scheduled))
        sampling = [(i, s.seq) for i, s in enumerate(plan.scheduled) if s.samples]
        if sampling:
            logits = self.model.logits(hidden[torch.tensor(sample_rows, device=device)])
            params = [seq.sampling for _, seq in sampling]
            gens = [self._generator(seq.request_id, seq.sampling.seed) for _, seq in sampling]
            tokens, logprobs = sample(logits, params, gens)
            for (i, _), token, lp in zip(sampling, tokens, logprobs):
                out.token_ids[i], out.logprobs[i] = token, lp
        for request_id, row, start, targets, n in prompt_rows:
            logprobs = torch.log_softmax(self.model.logits(hidden[row:row + len(targets)]), dim=-1)
            out.prompt_logprobs[request_id] = {
                start + 1 + j: token_logprobs(logprobs[j], t, n) for j, t in enumerate(targets)}
        return out
