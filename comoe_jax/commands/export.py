"""Export a trained run's adapter for Hugging Face users.

    comoe-export --run runs/lora --format merged    # runs/lora/merged: AutoModelForCausalLM, no peft needed
    comoe-export --run runs/lora --format merged --dtype bfloat16 --out /models/merged   # half the size
    comoe-export --run runs/lora --format peft --out /models/lora   # PeftModel / AutoPeftModelForCausalLM
    comoe-export --run runs/x --format comoe --out /models/x   # any method, comoe-jax's own adapter layout

(``python export.py`` in a checkout.) ``peft`` and ``merged`` take ``lora`` / ``dora`` runs (one expert per
layer: a routed mixture has no peft equivalent; those runs also write ``<run>/peft`` when training ends);
merged weights are written in shards of at most 5 GiB with an index, as transformers writes them;
``comoe`` copies the run's adapter folder, which
``comoe_jax.interop.load_adapted`` reads. An existing output folder is refused unless ``--overwrite``
is given (it then replaces an earlier export folder, never a folder of other files).
"""

from __future__ import annotations

import argparse
import os
import sys

from etils import epath

from comoe_jax.cli import command
from comoe_jax.config import ConfigError, load_run_config
from comoe_jax.paths import absolute, as_path, copy_tree, is_local, remove_tree

FORMATS = ("peft", "merged", "comoe")
# an earlier export (of any format, or a peft / transformers folder) holds one of these: only such a folder,
# or an empty one, is replaced by --overwrite
EXPORT_MARKERS = ("adapter_config.json", "config.json")


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run folder (its config.json and adapter/)")
    parser.add_argument("--format", choices=FORMATS, default="peft")
    parser.add_argument("--out", help="output folder (default: <run>/<format>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="--format merged: the weights' dtype (merged in float32; bfloat16 halves the files)")
    args = parser.parse_args(argv)
    if args.dtype != "float32" and args.format != "merged":
        raise ConfigError(f"--dtype {args.dtype} applies to --format merged only; {args.format} exports keep the "
                          "adapter's float32 weights")
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out '': empty; give an output folder, or leave --out out for <run>/<format>")
    cfg = load_run_config(args.run)
    run = as_path(args.run)
    out = as_path(args.out or run / args.format)
    adapter_dir = run / "adapter"
    if args.format != "comoe" and cfg.adapter.method not in ("lora", "dora"):
        raise ConfigError(f"{args.run}: adapter.method={cfg.adapter.method} cannot export as {args.format}: only "
                          "lora / dora runs have one LoRA per layer; use --format comoe")
    if not (adapter_dir / "adapter_config.json").exists():
        raise ConfigError(f"{args.run}: no finished adapter ({adapter_dir}/adapter_config.json); a run writes it when "
                          "training ends (rerun its train command to resume and finish it)")
    from comoe_jax.checkpoint import check_adapter_settings

    check_adapter_settings(adapter_dir, cfg)
    _check_out(out, run, args.overwrite, cfg.model.path)
    if args.format == "comoe":
        remove_tree(out)
        copy_tree(adapter_dir, out)
        print(f"comoe-jax adapter copied to {out}")
        return 0
    from comoe_jax.interop import export_merged, export_peft, load_adapted

    # a damaged adapter fails here, before out is replaced
    model, _ = load_adapted(adapter_dir, cfg.model.path, random_arch=cfg.model.random_arch, seed=cfg.train.seed)
    remove_tree(out)
    if args.format == "peft":
        export_peft(model, cfg, out)
    else:
        export_merged(model, cfg, out, dtype=args.dtype)
    print(f"{args.format} export of {args.run} written to {out}")
    return 0


def _resolved(path):
    """Local paths with symlinks and '..' resolved, so a link cannot hide that --out holds the run."""
    return epath.Path(os.path.realpath(path)) if is_local(path) else absolute(path)


def _check_out(out, run, overwrite: bool, base: str) -> None:
    """Refuse an output folder that would replace the run, what the export reads (its adapter, the base model)
    or another run, or a folder of other files, before anything is removed."""
    def within(path, folder) -> bool:
        inner, outer = _resolved(path).parts, _resolved(folder).parts
        return inner[:len(outer)] == outer

    read = [run / "adapter", run / "checkpoints", run / "config.json"]
    if within(run, out) or any(within(out, r) for r in read):
        raise ConfigError(f"--out {out}: would replace the run {run} or what the export reads from it (its adapter/, "
                          "checkpoints/, config.json); choose a folder outside them")
    if is_local(base) and os.path.exists(os.path.expanduser(base)) and (
            within(os.path.expanduser(base), out) or within(out, os.path.expanduser(base))):
        raise ConfigError(f"--out {out}: would replace the base model {base} (model.path), which the export reads; "
                          "choose another folder")
    if not out.exists():
        return
    if not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it, or --out elsewhere")
    if out.is_file():
        raise ConfigError(f"--out {out} is a file; --overwrite replaces only an earlier export folder")
    if any((out / name).exists() for name in ("checkpoints", "metrics.jsonl")):
        raise ConfigError(f"--out {out} is a training run (it holds checkpoints/ or metrics.jsonl); --overwrite "
                          "replaces only an earlier export: choose another folder")
    names = sorted(p.name for p in out.iterdir())
    if names and not any(marker in names for marker in EXPORT_MARKERS):
        raise ConfigError(f"--out {out} holds files but no earlier export ({', '.join(names[:3])}"
                          f"{', ...' if len(names) > 3 else ''}; no {' or '.join(EXPORT_MARKERS)}); --overwrite "
                          "replaces only an earlier export: choose another folder or remove it yourself")


if __name__ == "__main__":
    sys.exit(main())
