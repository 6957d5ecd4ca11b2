"""Write demo tasks for the embedded default model: random PEFT LoRA adapters + synthetic data.

    python scripts/make_demo_tasks.py OUT_DIR [--base default] [--rank 8] [--rows 200]

Creates OUT_DIR/<task>/adapter (adapter_config.json + adapter_model.safetensors) and
OUT_DIR/<task>.jsonl for four tasks (arithmetic, dates, sorting, capitals). The adapters are random,
seeded, and *untrained*: they make each task's activations differ the way real adapters do, which is
what multi-task calibration needs, but they teach the model nothing. Trained demo adapters come with
the task suite (inlaid eval).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
from pathlib import Path

from inlaid.model.dummy import save_random_adapter
from inlaid.model.loader import resolve_source

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Italy": "Rome", "Japan": "Tokyo",
            "Canada": "Ottawa", "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
            "Chile": "Santiago", "India": "New Delhi", "Poland": "Warsaw", "Greece": "Athens"}
WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano", "lemon", "zebra",
         "candle", "forest", "garden", "harbor", "island", "jungle", "kettle", "ladder", "meadow"]


def arithmetic(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return f"Anna has {a} apples and buys {b} more. How many apples does she have?", f"{a + b}"


def dates(rng):
    day = datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randint(0, 9000))
    return f"Write the date {day.isoformat()} in words.", day.strftime("%A, %B %d, %Y")


def sorting(rng):
    words = rng.sample(WORDS, rng.randint(3, 6))
    return f"Sort alphabetically: {', '.join(words)}", ", ".join(sorted(words))


def capitals(rng):
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


TASKS = {"arithmetic": arithmetic, "dates": dates, "sorting": sorting, "capitals": capitals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--base", default="default")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_source(args.base))
    for seed, (name, make) in enumerate(TASKS.items()):
        rng = random.Random(seed)
        save_random_adapter(args.out_dir / name / "adapter", config, args.rank, seed)
        with open(args.out_dir / f"{name}.jsonl", "w") as fh:
            for _ in range(args.rows):
                prompt, response = make(rng)
                fh.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
        print(f"--task {name}={args.out_dir / name / 'adapter'}:{args.out_dir / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
