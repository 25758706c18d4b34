"""``cheers train``: run a recipe. A thin shell over :mod:`cheers.training.loop` and :mod:`.vae_stage0`.

An app module: it composes the trainer with the recipe's ShapesWorld hooks from :mod:`cheers.eval.train_hooks`
(training itself does not import evaluation).

Examples::

    cheers train --recipe tiny-shapes --out runs/shapes
    cheers train --recipe stage2 --set train.lr=2e-5 --set data.sources.0.path=/data/und.jsonl --resume
    torchrun --nproc_per_node 8 -m cheers.training.cli --recipe stage3 --set engine.strategy=fsdp
"""

from __future__ import annotations

import argparse
import logging
import sys

from cheers.training.config import RecipeError, dump_recipe, load_recipe, packaged_recipes


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on an ``argparse`` subparsers object; the handler is stored as ``func``."""
    p = subparsers.add_parser(
        "train",
        help="train with a recipe (stages 0-IV, ShapesWorld)",
        description="Train Cheers with a recipe: a packaged name "
        f"({', '.join(packaged_recipes())}) or a YAML path.",
    )
    p.add_argument("--recipe", required=True, help="packaged recipe name or path to a YAML recipe")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set train.lr=2e-5 (repeatable)",
    )
    p.add_argument("--out", "-o", default=None, help="run directory (default: the recipe's 'out')")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/latest if present")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="leave after N steps of this invocation (with a checkpoint)",
    )
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``cheers train``: returns the process exit code."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("cheers.training", "cheers.data"):  # a run reports its sources, groups, steps, checkpoints
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        recipe.out = args.out
    if args.print_recipe:
        print(dump_recipe(recipe), end="")
        return 0
    if recipe.stage == "0":
        from cheers.training.vae_stage0 import train_vae

        path = train_vae(recipe, recipe.out, resume=args.resume, stop_after=args.stop_after)
        print(f"stage 0 finished: {path}")
        return 0
    from cheers.eval.train_hooks import recipe_hooks
    from cheers.training.loop import train

    result = train(
        recipe, recipe.out, resume=args.resume, stop_after=args.stop_after, hooks=recipe_hooks(recipe)
    )
    if result.export_dir is not None:
        what = "LoRA adapter (peft layout)" if recipe.lora is not None else "release-layout model"
        print(f"trained {result.step} steps; {what} in {result.export_dir}")
    else:
        print(f"trained to step {result.step}; checkpoints in {result.run_dir / 'checkpoints'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cheers.training.cli --recipe ...`` (the same options as ``cheers train``; for torchrun)."""
    parser = argparse.ArgumentParser(prog="cheers-train")
    sub = parser.add_subparsers(dest="command")
    add_train_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train":
        argv = ["train", *argv]
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
