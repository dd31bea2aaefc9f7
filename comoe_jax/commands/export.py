"""Export a trained run's adapter for Hugging Face users.

    comoe-export --run runs/lora --format merged    # runs/lora/merged: AutoModelForCausalLM, no peft needed
    comoe-export --run runs/lora --format peft --out /models/lora   # PeftModel / AutoPeftModelForCausalLM
    comoe-export --run runs/x --format comoe --out /models/x   # any method, comoe-jax's own adapter layout

(``python -m comoe_jax.commands.export`` from a checkout.) ``peft`` and ``merged`` take ``lora`` / ``dora``
runs (one expert per layer: a routed mixture has no peft equivalent; such runs already hold
``<run>/peft`` from training); ``comoe`` copies the run's adapter folder, which
``comoe_jax.interop.load_adapted`` reads. An existing output folder is refused unless ``--overwrite``
is given (it is then replaced).
"""

from __future__ import annotations

import argparse
import shutil
import sys

from comoe_jax.cli import command
from comoe_jax.config import ConfigError, load_run_config
from comoe_jax.paths import as_path, remove_tree

FORMATS = ("peft", "merged", "comoe")


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run folder (its config.json and adapter/)")
    parser.add_argument("--format", choices=FORMATS, default="peft")
    parser.add_argument("--out", help="output folder (default: <run>/<format>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    cfg = load_run_config(args.run)
    out = as_path(args.out or as_path(args.run) / args.format)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it, or --out elsewhere")
    adapter_dir = as_path(args.run) / "adapter"
    remove_tree(out)
    if args.format == "comoe":
        shutil.copytree(adapter_dir, out)
        print(f"comoe-jax adapter copied to {out}")
        return 0
    if cfg.adapter.method not in ("lora", "dora"):
        raise ConfigError(f"{args.run}: adapter.method={cfg.adapter.method} cannot export as {args.format}: only "
                          "lora / dora runs have one LoRA per layer; use --format comoe")
    from comoe_jax.interop import export_merged, export_peft, load_adapted

    model, _ = load_adapted(adapter_dir, cfg.model.path)
    (export_peft if args.format == "peft" else export_merged)(model, cfg, out)
    print(f"{args.format} export of {args.run} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
