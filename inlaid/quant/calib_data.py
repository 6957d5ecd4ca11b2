"""Calibration data: read a task's file (JSON here, CSV and Parquet with ``datasets``), render each
row as text, tokenize, sample.

Accepted row shapes: ``text``; ``prompt`` + ``response``; chat ``messages`` (a list of
``{"role", "content"}``). Prompt/response and messages go through the model's chat template when the
tokenizer has one, so the calibration tokens look like what the adapter sees when served.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import torch

from inlaid.errors import DataError

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
               list: "array", dict: "object"}
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # what JSON counts as whitespace


def read_rows(path: Path) -> list[dict]:
    """The rows of a calibration file, each a dict; raises DataError for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration data not found: {path}")
    builder = _FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported data format {path.suffix!r} "
                        f"(use {', '.join(sorted(_FORMATS))})")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: no rows")
    # JSON is parsed here rather than by ``datasets``: its JSON builder segfaults on a bare
    # ``null`` row and hides the parse error's line behind a generic message.
    rows = _read_json(path) if builder == "json" else _read_with_datasets(path, builder)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _read_json(path: Path) -> list[dict]:
    """JSON Lines, a JSON array (of objects, or of strings taken as ``text``), or objects separated
    by whitespace (pretty-printed ones included), whatever the suffix: every shape ``datasets``
    accepted, so files that worked before still do."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read calibration data {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"cannot read calibration data {path}: line {line}: not UTF-8 text "
                        f"(byte 0x{raw[exc.start]:02x})") from None
    try:
        if text.lstrip().startswith("["):
            return _array_rows(path, json.loads(text))
        try:
            values = _json_lines(text)
        except json.JSONDecodeError as line_error:
            # Not one value per line; a file of multi-line objects is still valid input.
            try:
                values = _json_stream(text)
            except json.JSONDecodeError:
                raise line_error from None
    except json.JSONDecodeError as exc:
        raise DataError(f"cannot read calibration data {path}: line {exc.lineno}: {exc.msg} "
                        f"(column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"cannot read calibration data {path}: JSON nested too deeply") from None
    rows = []
    for line, value in values:
        if not isinstance(value, dict):
            raise DataError(f"cannot read calibration data {path}: line {line}: expected a JSON "
                            f"object, got {_json_type(value)}")
        rows.append(value)
    return rows


def _array_rows(path: Path, items: list) -> list[dict]:
    rows = []
    for i, item in enumerate(items, 1):
        if isinstance(item, str):
            rows.append({"text": item})
        elif isinstance(item, dict):
            rows.append(item)
        else:
            raise DataError(f"cannot read calibration data {path}: array item {i}: expected a JSON "
                            f"object or string, got {_json_type(item)}")
    return rows


def _json_lines(text: str) -> list[tuple[int, object]]:
    values = []
    start = 0
    # Split on \n only: str.splitlines() also breaks at U+2028 and friends, which may sit unescaped
    # inside a JSON string.
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                values.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                # Re-anchored on the whole text, so that lineno is the file's line, not 1.
                raise json.JSONDecodeError(exc.msg, text, start + exc.pos) from None
        start += len(line) + 1
    return values


def _json_stream(text: str) -> list[tuple[int, object]]:
    decoder = json.JSONDecoder()
    values = []
    line, counted = 1, 0
    pos = _WHITESPACE.match(text, 0).end()
    while pos < len(text):
        value, end = decoder.raw_decode(text, pos)
        line += text.count("\n", counted, pos)  # counted as we go: once per value would be quadratic
        counted = pos
        values.append((line, value))
        pos = _WHITESPACE.match(text, end).end()
    return values


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _read_with_datasets(path: Path, builder: str) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    # datasets logs each failure before raising it; the CLI's one-line error says it all already.
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        return list(ds)
    except Exception as exc:  # datasets raises many types for malformed files
        cause = _root_cause(exc)
        if "corresponds to no data" in str(cause):  # a CSV with a header and nothing else
            raise DataError(f"{path}: no rows") from exc
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise DataError(f"cannot read calibration data {path}: {reason}") from exc
    finally:
        logger.setLevel(level)


def _root_cause(exc: BaseException) -> BaseException:
    # datasets wraps the parser's error (explicitly chained) in a generic DatasetGenerationError.
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


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
