"""Calibration data: read a task's file with ``datasets``, render each row as text, tokenize, sample.

Accepted row shapes: ``text``; ``prompt`` + ``response``; chat ``messages`` (a list of
``{"role", "content"}``). Prompt/response and messages go through the model's chat template when the
tokenizer has one, so the calibration tokens look like what the adapter sees when served.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from inlaid.errors import DataError

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_rows(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration data not found: {path}")
    builder = _FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported data format {path.suffix!r} "
                        f"(use {', '.join(sorted(_FORMATS))})")
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for malformed files
        raise DataError(f"cannot read calibration data {path}: {exc}".splitlines()[0]) from exc
    return list(ds)


def render(row: dict, tokenizer) -> str | None:
    """The text one row contributes, or None when the row has no usable field."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    messages = None
    if isinstance(row.get("messages"), list) and row["messages"]:
        messages = row["messages"]
    elif isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        messages = [{"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["response"]}]
    if messages is not None:
        if has_template:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(str(m.get("content", "")) for m in messages)
    text = row.get("text")
    return text if isinstance(text, str) and text.strip() else None


def load_calibration(path: Path, tokenizer, *, samples: int, seq_len: int, min_tokens: int,
                     seed: int, task: str) -> list[torch.Tensor]:
    """Up to ``samples`` token sequences (each [1, <= seq_len]), chosen by a seed per task so that a
    task's samples do not depend on which other tasks are quantized alongside it."""
    rows = read_rows(path)
    texts = [t for t in (render(r, tokenizer) for r in rows) if t]
    if not texts:
        raise DataError(f"{path}: no usable rows (need a 'text' field, 'prompt' + 'response', "
                        "or chat 'messages')")
    random.Random(f"{seed}:{task}").shuffle(texts)
    sequences: list[torch.Tensor] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len]
        if ids:
            sequences.append(torch.tensor([ids], dtype=torch.long))
        if len(sequences) == samples:
            break
    tokens = sum(s.shape[1] for s in sequences)
    if tokens < min_tokens:
        raise DataError(f"{path}: calibration data too short ({tokens} tokens; need >= {min_tokens})")
    return sequences


def random_calibration(vocab_size: int, *, samples: int, seq_len: int, seed: int,
                       task: str) -> list[torch.Tensor]:
    """Random token ids: for dummy-weight models (GPU timing) where no text exists."""
    gen = torch.Generator().manual_seed(random.Random(f"{seed}:{task}").getrandbits(63))
    return [torch.randint(0, vocab_size, (1, seq_len), generator=gen) for _ in range(samples)]
