"""Evaluation speed: option log-likelihood scoring (eval.mode=loglik) of the mix's multiple-choice items,
the previous scorer against the current one, on the same items, in one run.

    python benchmarks/bench_eval.py                    # SmolLM2-135M, 140 test items of the default mix
    python benchmarks/bench_eval.py --items 700        # the whole test split

previous: every (context, option) pair encoded whole, rows padded to multiples of 32 tokens (one compile
per distinct length); current: items packed into rows of 256 tokens (comoe_jax/option_packing.py): the
prompt header every item shares once per row, each context once, each option after it (its last token
left out), the LM head at the scored slots only. Both are timed from a cold start
(compilation included, as a user meets it) and then warm; the predictions must be identical. Prints a
table and writes benchmarks/results/bench_eval.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from comoe_jax.config import Config  # noqa: E402
from comoe_jax.data import encode_pair, render_cloze  # noqa: E402
from comoe_jax.evaluate import Scorer, loglik_predictions  # noqa: E402
from comoe_jax.loading import build_model, load_tokenizer  # noqa: E402
from comoe_jax.report import evaluation_examples  # noqa: E402


def previous_predictions(scorer: Scorer, tokenizer, examples, template: str) -> list[str]:
    """The scorer before packing: each option appended to its context and encoded whole."""
    pairs, sizes = [], []
    for ex in examples:
        prompt, continuations = render_cloze(ex, template)
        context = tokenizer(prompt)["input_ids"]
        options = [encode_pair(tokenizer, prompt, c, prompt_ids=context)[1] for c in continuations]
        pairs.extend((context, o) for o in options)
        sizes.append(len(options))
    scores = iter(scorer.continuation_logprobs(pairs))
    preds = []
    for ex, n in zip(examples, sizes):
        per_option = [total / max(count, 1) for total, count in (next(scores) for _ in range(n))]
        preds.append(ex.labels[int(np.argmax(per_option))])
    return preds


def timed(fn) -> tuple[list[str], float]:
    start = time.perf_counter()
    preds = fn()
    return preds, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=140, help="test items (spread over the mix's tasks)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_eval.json"))
    args = parser.parse_args()

    cfg = Config()
    cfg.eval.mode = "loglik"
    cfg.eval.max_per_task = -(-args.items // 4)
    examples = evaluation_examples(cfg)[: args.items]
    tokenizer = load_tokenizer(cfg.model.path)
    model = build_model(cfg)
    template = cfg.data.template
    runs = {
        "previous (whole sequences, 32-token padding)":
            lambda: previous_predictions(Scorer(model, tokenizer.pad_token_id, args.batch_size, buckets=32),
                                         tokenizer, examples, template),
        "current (packed rows, shared prefix once)":
            lambda: loglik_predictions(Scorer(model, tokenizer.pad_token_id, args.batch_size), tokenizer, examples,
                                       template)[0],
    }
    rows, predictions = [], {}
    for name, fn in runs.items():
        predictions[name], cold = timed(fn)  # compilation included
        _, warm = timed(fn)
        rows.append({"scorer": name, "cold_s": cold, "warm_s": warm, "items_per_s_cold": len(examples) / cold,
                     "items_per_s_warm": len(examples) / warm})
        print(f"{name}: {cold:.1f}s cold, {warm:.1f}s warm", flush=True)
    first, second = predictions.values()
    same = first == second
    print(f"\nSmolLM2-135M, {len(examples)} test items of the mix (eval.mode=loglik), batch {args.batch_size}; "
          f"identical predictions: {same}")
    print(f"{'scorer':<46} {'items/s cold':>13} {'items/s warm':>13}")
    for r in rows:
        print(f"{r['scorer']:<46} {r['items_per_s_cold']:13.1f} {r['items_per_s_warm']:13.1f}")
    speedup = {k: rows[1][f"items_per_s_{k}"] / rows[0][f"items_per_s_{k}"] for k in ("cold", "warm")}
    print(f"speed-up: {speedup['cold']:.1f}x cold, {speedup['warm']:.1f}x warm")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"items": len(examples), "identical_predictions": same, "rows": rows,
                                          "speedup": speedup}, indent=2))
    print(f"wrote {args.out}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
