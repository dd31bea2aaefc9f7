"""Build the committed multi-task mix (comoe_jax/data/comoe_mix) from BIG-bench task files.

    python scripts/build_mix.py                        # fetches bigbench==1.0.0 from PyPI (pip download)
    python scripts/build_mix.py --tarball bigbench-1.0.0.tar.gz

Four tasks (social_iqa, strategyqa, elementary_math_qa/question_only, winowhy), each
shuffled with a fixed seed and split into test / validation / train; records are
multiple-choice JSON lines {"task", "question", "options", "answer", "source"}.
The output is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {  # mix task name -> BIG-bench task folder
    "social_iqa": "social_iqa",
    "strategyqa": "strategyqa",
    "math_qa": "elementary_math_qa/question_only",
    "winowhy": "winowhy",
}
SPLITS = {"test": 200, "validation": 100, "train": 1000}
SEED = 20250523  # the paper's arXiv month


def fetch_tarball(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "bigbench==1.0.0", "-d", str(folder)],
                   check=True)
    return next(folder.glob("bigbench-1.0.0.tar.gz"))


def read_task(tar: tarfile.TarFile, folder: str) -> dict:
    member = f"bigbench-1.0.0/bigbench/benchmark_tasks/{folder}/task.json"
    return json.load(tar.extractfile(member))


def to_record(task: str, folder: str, index: int, example: dict) -> dict | None:
    """One multiple-choice record, or None when the example has not exactly one correct option."""
    scores = example.get("target_scores") or {}
    options = [o.strip() for o in scores]
    correct = [o.strip() for o, s in scores.items() if s == 1]
    if len(options) < 2 or len(correct) != 1 or len(set(options)) != len(options):
        return None
    question = " ".join(example["input"].split())
    if task == "winowhy":
        question += " Is this reasoning correct or incorrect?"
    return {"task": task, "question": question, "options": options, "answer": correct[0],
            "source": f"bigbench/{folder}#{index}"}


def build(tarball: Path, out: Path) -> dict:
    counts = {}
    splits = {name: [] for name in SPLITS}
    with tarfile.open(tarball) as tar:
        for task, folder in TASKS.items():
            data = read_task(tar, folder)
            records, seen = [], set()
            for i, example in enumerate(data["examples"]):
                record = to_record(task, folder, i, example)
                if record is None or record["question"] in seen:
                    continue
                seen.add(record["question"])
                records.append(record)
            random.Random(f"{SEED}-{task}").shuffle(records)
            counts[task], start = {"usable": len(records)}, 0
            for name, size in SPLITS.items():
                part = records[start:start + size]
                splits[name].extend(part)
                counts[task][name], start = len(part), start + size
    out.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        random.Random(f"{SEED}-{name}").shuffle(records)
        with (out / f"{name}.jsonl").open("w") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    (out / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tarball", type=Path, help="bigbench-1.0.0.tar.gz (default: pip download it)")
    parser.add_argument("--out", type=Path, default=ROOT / "comoe_jax" / "data" / "comoe_mix")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tarball = args.tarball or fetch_tarball(Path(tmp))
        counts = build(tarball, args.out)
    print(json.dumps(counts, indent=2))


if __name__ == "__main__":
    main()
