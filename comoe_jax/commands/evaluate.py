"""Score the base model or a trained run on any loader's test set, per task; write JSON and markdown.

    python evaluate.py --run runs/default                         # the run's adapters, its own eval settings
    python evaluate.py --run runs/default eval.mode=loglik eval.max_per_task=0
    python evaluate.py --config configs/default.py                # the base model (adapters at initialisation)
    python evaluate.py --run runs/default eval.sources=llm_adapters:/data/ARC-Easy/test.json eval.mode=generate

Results go to ``<run>/eval_<split>_<mode>.{json,md}`` (or ``--out STEM``) and the table is printed.
"""

from __future__ import annotations

import argparse
import sys

from comoe_jax.cli import command
from comoe_jax.config import ConfigError, apply_overrides, load_config_file, load_run_config, validate
from comoe_jax.paths import as_path, output_folder


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", help="a run folder (its config.json and adapter/)")
    source.add_argument("--config", default="configs/default.py", help="a configs/*.py file (base model)")
    parser.add_argument("--adapter", help="with --run: this adapter folder instead of <run>/adapter, e.g. "
                        "<run>/best_adapter (eval.keep_best)")
    parser.add_argument("--out", help="output path stem (default: <run>/eval_<split>_<mode>; with --adapter: "
                        "<adapter>/eval_<split>_<mode>)")
    args, overrides = parser.parse_known_args(argv)
    if args.adapter is not None and args.run is None:
        raise ConfigError("--adapter needs --run (the run whose config the adapter was trained with)")
    cfg = load_run_config(args.run) if args.run is not None else load_config_file(args.config)
    validate(apply_overrides(cfg, overrides))
    if args.out is not None:
        _check_out_stem(args.out)
    if args.adapter is not None and not (as_path(args.adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {args.adapter}: no adapter_config.json there; give an adapter folder such as "
                          f"{as_path(args.run) / 'best_adapter'}")
    home = args.adapter or args.run  # where the results go by default
    results = "--out (its folder)" if args.out else "--run (the results go there)" if args.run else "--out (default)"
    output_folder(as_path(args.out).parent if args.out else as_path(home or "runs/base"), results)
    import jax

    from comoe_jax import sharding as shd
    from comoe_jax.checkpoint import load_run_model
    from comoe_jax.loading import load_tokenizer
    from comoe_jax.report import evaluate_and_save, evaluation_examples, unfinished_warning

    shd.init_distributed(cfg.mesh)  # a multi-host evaluation: every host runs this script with its process id
    if args.run and jax.process_index() == 0 and (warning := unfinished_warning(args.run, cfg.train.steps)):
        print(warning)
    tokenizer = load_tokenizer(cfg.model.path)
    model = load_run_model(cfg, args.run, adapter_dir=args.adapter)  # on the run's mesh; each device scores a share
    stem = f"eval_{cfg.eval.split}_{cfg.eval.mode}"
    out = as_path(args.out) if args.out else as_path(home or "runs/base") / stem
    say = print if jax.process_index() == 0 else (lambda text: None)
    result = evaluate_and_save(cfg, model, tokenizer, evaluation_examples(cfg), out, say)
    if jax.process_index() == 0:
        print(result.to_markdown(f"{args.run or 'base model'}: {cfg.eval.split} split"))
        print(f"written to {out}.json and {out}.md ({result.seconds:.0f}s)")
    return 0


def _check_out_stem(out: str) -> None:
    if not out.strip():
        raise ConfigError("--out '': empty; give an output path stem such as runs/x/eval_arc (writes .json and .md)")
    stem = as_path(out)
    if stem.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a path stem inside it such as {stem / 'eval'} "
                          "(writes eval.json and eval.md there)")
    if stem.name in RUN_RECORDS and (stem.parent / "config.json").is_file():
        raise ConfigError(f"--out {out}: would overwrite the run's own evaluation at the {RUN_RECORDS[stem.name]} of "
                          "training (report.md and compare.py read it); choose another --out")
    written = [stem.with_name(stem.name + suffix) for suffix in (".json", ".md")]
    if any(path.exists() for path in written) and not _an_earlier_evaluation(written[0]):
        taken = next(path for path in written if path.exists())
        raise ConfigError(f"--out {out}: would overwrite {taken}, which is not an evaluation result written by "
                          "evaluate.py (a run's config, report or adapter file?); choose another --out")


RUN_RECORDS = {"eval_before": "start", "eval_after": "end"}


def _an_earlier_evaluation(path) -> bool:
    from comoe_jax.errors import ComoeError
    from comoe_jax.evaluate import load_eval

    try:
        return load_eval(path) is not None
    except ComoeError:
        return False


if __name__ == "__main__":
    sys.exit(main())
