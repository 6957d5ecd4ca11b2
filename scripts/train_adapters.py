"""Train the demo LoRA adapters of the built-in task suite on the embedded default model, then score them.

    python scripts/train_adapters.py [--tasks a,b] [--out examples] [--steps 60] [--device cpu]

For every task: write ``OUT/tasks/<task>/{train,calib,test}.jsonl`` (``inlaid.eval.tasks``), train
one PEFT LoRA adapter on SmolLM2-135M-Instruct (``load_base("default")``) with the loss on the
response tokens only (prompt = one user turn through the chat template), and save it with fp16
weights to ``OUT/adapters/<task>/``. Then score the base model (no adapter) and each adapter on the
first ``--eval-rows`` rows of its task's test split with greedy decoding
(``inlaid.eval.hf_generate``), and write ``OUT/adapters/scores.json`` plus a markdown table on stdout.
Everything is seeded. ``--data-only`` only writes the task files; ``--reuse-data`` trains on the files
already there (for a machine without the data packages, e.g. a GPU box); ``--skip-train`` re-scores
the saved adapters. examples/adapters/README.md records how the committed set was made.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from inlaid.eval.hf_generate import generate
from inlaid.eval.tasks import TASKS, get_task, read_examples, write_task_data
from inlaid.model.loader import load_base

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The harder tasks get rank 8, the rest rank 4: the demo set then also exercises mixed ranks.
DEFAULT_RANKS = "arithmetic=8,python_expr=8,geography_qa=8"
TRAINING_FILE = "training.json"  # next to the adapter: how it was trained (PEFT ignores it)


def encode(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat and labels that are -100 everywhere but on the answer and its
    end-of-turn token."""
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):
        raise ValueError("the chat template does not extend the generation prompt")
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id in answer_ids:  # stop after the end-of-turn token
        answer_ids = answer_ids[:answer_ids.index(tokenizer.eos_token_id) + 1]
    return head_ids + answer_ids, [-100] * len(head_ids) + answer_ids


def collate(pairs, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (x, y) in enumerate(pairs):  # right padding for training
        ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids.to(device), labels.to(device), mask.to(device)


def response_loss(peft_model, ids, labels, mask) -> torch.Tensor:
    """Cross-entropy on the response tokens; the vocabulary projection runs on those positions only."""
    causal_lm = peft_model.base_model.model
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def rank_of(task_name: str, args) -> int:
    overrides = dict(item.split("=") for item in args.ranks.split(",") if item.strip())
    return int(overrides.get(task_name, args.rank))


def train_adapter(task_name: str, train_file: Path, out_dir: Path, args) -> dict:
    from peft import LoraConfig, get_peft_model

    base = load_base("default")
    tokenizer, device = base.tokenizer, torch.device(args.device)
    rows = read_examples(train_file)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = [encode(tokenizer, ex.prompt, ex.reference) for ex in rows]
    torch.manual_seed(args.seed)
    rank = rank_of(task_name, args)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS,
                        task_type="CAUSAL_LM")
    model = get_peft_model(base.model.to(device), config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    order_rng = random.Random(f"{args.seed}:{task_name}")
    order: list[int] = []
    start, losses = time.time(), []
    for step in range(args.steps):
        if len(order) < args.batch_size:  # reshuffle once the rows are used up
            order += order_rng.sample(range(len(pairs)), len(pairs))
        batch, order = order[:args.batch_size], order[args.batch_size:]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        loss = response_loss(model, *collate([pairs[i] for i in batch], pad_id, device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  [{task_name}] step {step + 1}/{args.steps} loss {loss.item():.3f} "
                  f"({time.time() - start:.0f}s)", flush=True)
    save_fp16(model, out_dir)
    stats = {"rank": rank, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
             "seed": args.seed, "device": args.device, "train_seconds": round(time.time() - start, 1),
             "first_loss": round(losses[0], 4), "last5_loss": round(sum(losses[-5:]) / len(losses[-5:]), 4)}
    (out_dir / TRAINING_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def save_fp16(model, out_dir: Path) -> None:
    """PEFT's files with fp16 LoRA weights, no model card, and the hub id as the base name."""
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    weights = out_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config_file = out_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = HUB_ID
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "README.md").unlink(missing_ok=True)


def score_all(names: list[str], out: Path, args) -> dict:
    """Base (adapters disabled) and adapter scores on each task's test split."""
    from peft import PeftModel

    base = load_base("default")
    tokenizer, device = base.tokenizer, torch.device(args.device)
    model = None
    results = {}
    for name in names:
        task = get_task(name)
        rows = read_examples(out / "tasks" / name / "test.jsonl")[:args.eval_rows]
        prompts = [ex.prompt for ex in rows]
        adapter_dir = out / "adapters" / name
        if model is None:
            model = PeftModel.from_pretrained(base.model.to(device), adapter_dir, adapter_name=name)
        else:
            model.load_adapter(adapter_dir, adapter_name=name)
        model.set_adapter(name)
        model.eval()
        start = time.time()
        with model.disable_adapter():
            base_scores = task.score(generate(model, tokenizer, prompts, task.max_new_tokens,
                                              args.eval_batch_size), rows)
        tuned = task.score(generate(model, tokenizer, prompts, task.max_new_tokens, args.eval_batch_size),
                           rows)
        results[name] = {"metric": task.metrics[0], "rows": len(rows),
                         "base": {k: round(v, 1) for k, v in base_scores.items()},
                         "adapter": {k: round(v, 1) for k, v in tuned.items()}}
        print(f"  [{name}] {task.metrics[0]}: base {base_scores[task.metrics[0]]:.1f} -> adapter "
              f"{tuned[task.metrics[0]]:.1f} ({time.time() - start:.0f}s)", flush=True)
    return results


def markdown(results: dict) -> str:
    lines = ["| task | metric | base | adapter | other metrics (base -> adapter) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        m = r["metric"]
        others = ", ".join(f"{k} {r['base'][k]:.1f} -> {r['adapter'][k]:.1f}" for k in r["base"] if k != m)
        lines.append(f"| {name} | {m} | {r['base'][m]:.1f} | {r['adapter'][m]:.1f} | {others} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names (default: all)")
    parser.add_argument("--out", type=Path, default=Path("examples"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = 2 * rank)")
    parser.add_argument("--ranks", default=DEFAULT_RANKS, help="per-task ranks, task=r,... ('' for none)")
    parser.add_argument("--n-train", type=int, default=1024)
    parser.add_argument("--n-calib", type=int, default=128)
    parser.add_argument("--n-test", type=int, default=128)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-only", action="store_true", help="write the task files and stop")
    parser.add_argument("--reuse-data", action="store_true",
                        help="train on the task files already in OUT/tasks (no data packages needed)")
    parser.add_argument("--skip-train", action="store_true", help="score the adapters already saved")
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args()
    names = [get_task(n.strip()).name for n in args.tasks.split(",") if n.strip()]
    if not args.reuse_data:
        for name in names:
            write_task_data(get_task(name), args.out / "tasks" / name, args.seed, args.n_train,
                            args.n_calib, args.n_test)
    if args.data_only:
        return
    if not args.skip_train:
        for name in names:
            print(f"task {name}: {args.steps} steps (batch {args.batch_size}, rank {rank_of(name, args)}, "
                  f"{args.device})", flush=True)
            train_adapter(name, args.out / "tasks" / name / "train.jsonl", args.out / "adapters" / name, args)
    if args.skip_eval:
        return
    print("scoring base vs adapter (greedy)", flush=True)
    results = score_all(names, args.out, args)
    scores_file = args.out / "adapters" / "scores.json"
    merged = json.loads(scores_file.read_text()) if scores_file.is_file() else {}
    for name, result in results.items():
        stats_file = args.out / "adapters" / name / TRAINING_FILE
        result["training"] = json.loads(stats_file.read_text()) if stats_file.is_file() else None
    merged.update(results)
    scores_file.write_text(json.dumps(merged, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
