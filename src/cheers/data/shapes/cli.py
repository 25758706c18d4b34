"""`cheers shapes ...`: look at the world, export it, judge generated folders, validate the judge.

The lead's `cheers` CLI calls ``add_shapes_parser(subparsers)``; every command is a function of the
parsed namespace returning an exit code. Output goes to stdout (this is the CLI layer).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .export import export_shapes
from .geneval_folder import judge_geneval_folder, write_geneval_folder
from .perturb import PERTURBATIONS
from .prompts import GENEVAL_TAGS, PROMPT_TAGS, dense_spec, detailed_caption, sample_generation, short_caption
from .questions import scene_questions
from .render import RESOLUTIONS, contact_sheet, render_scene
from .samples import split_seeds
from .tokenizer import DEFAULT_VOCAB_SIZE, build_shapes_tokenizer
from .validate import format_accuracy_table, judge_accuracy
from .world import sample_scene


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def cmd_render(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, lines = [], []
    for i in range(args.n):
        seed = args.seed + i
        scene = sample_scene(seed)
        im = render_scene(scene, args.res)
        name = f"scene_{i:04d}.png"
        im.save(out / name)
        images.append(im)
        lines.append(
            {
                "file": name,
                "seed": seed,
                "scene": scene.to_dict(),
                "caption": short_caption(scene),
                "detailed_caption": detailed_caption(scene),
                "prompt_spec": dense_spec(scene),
                "questions": scene_questions(scene, np.random.default_rng([seed, 7])),
            }
        )
    contact_sheet(images, cols=args.cols).save(out / "contact_sheet.png")
    with (out / "scenes.jsonl").open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    print(f"wrote {args.n} scenes at {args.res}px, contact_sheet.png and scenes.jsonl to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    counts = {
        "understanding": args.understanding,
        "generation": args.generation,
        "editing": args.editing,
        "text": args.text,
    }
    summary = export_shapes(args.out, counts, resolution=args.res, split=args.split, start=args.start)
    for kind, path in summary.files.items():
        print(f"{kind}: {summary.counts.get(kind, '')} -> {path}")
    print(f"image root: {summary.image_root}")
    return 0


def cmd_prompts(args: argparse.Namespace) -> int:
    tags = PROMPT_TAGS if args.dense else GENEVAL_TAGS
    seeds = split_seeds("test", args.n * len(tags))
    items = [
        sample_generation(np.random.default_rng(int(seeds[i])), tags[i % len(tags)])
        for i in range(args.n * len(tags))
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for spec, _ in items:
            f.write(json.dumps(spec) + "\n")
    print(f"wrote {len(items)} prompt specs ({args.n} per tag) to {out}")
    if args.truth_dir:
        write_geneval_folder(args.truth_dir, items, args.res)
        print(f"wrote ground-truth renders in the GenEval layout to {args.truth_dir}")
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    verdicts, summary = judge_geneval_folder(args.dir)
    print(f"ShapesGenEval over {len(verdicts)} images in {args.dir}")
    for tag, acc in summary.items():
        print(f"  {tag:>14}: {acc:.4f}")
    if args.json:
        payload = {
            "summary": summary,
            "samples": [v.__dict__ | {"reasons": list(v.reasons)} for v in verdicts],
        }
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        print(f"wrote per-sample verdicts to {args.json}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    rows = judge_accuracy(range(args.seed, args.seed + args.n), _ints(args.res), args.perturb.split(","))
    print(format_accuracy_table(rows))
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    out = build_shapes_tokenizer(args.out, vocab_size=args.vocab_size)
    print(f"wrote tokenizer.json and tokenizer_config.json to {out}")
    return 0


def add_shapes_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `shapes` and its subcommands on an argparse subparsers object; returns the parser."""
    p = subparsers.add_parser("shapes", help="ShapesWorld: render, export, judge, validate, tokenizer")
    sub = p.add_subparsers(dest="shapes_command", required=True)

    r = sub.add_parser("render", help="render scenes, a contact sheet and their prompts/questions")
    r.add_argument("--n", type=int, default=32)
    r.add_argument("--res", type=int, default=128, choices=RESOLUTIONS)
    r.add_argument("--out", "-o", required=True)
    r.add_argument("--seed", type=int, default=0, help="first scene seed")
    r.add_argument("--cols", type=int, default=8, help="contact sheet columns")
    r.set_defaults(func=cmd_render)

    e = sub.add_parser("export", help="write release-format jsonl files and an image folder")
    e.add_argument("--out", "-o", required=True)
    for kind, n in (("understanding", 300), ("generation", 600), ("editing", 0), ("text", 100)):
        e.add_argument(f"--{kind}", type=int, default=n, help=f"number of {kind} records (default {n})")
    e.add_argument("--res", type=int, default=128, choices=RESOLUTIONS)
    e.add_argument("--split", default="train", choices=("train", "val", "test"))
    e.add_argument("--start", type=int, default=0, help="offset into the split's seeds")
    e.set_defaults(func=cmd_export)

    q = sub.add_parser("prompts", help="write a ShapesGenEval prompt file (GenEval metadata lines)")
    q.add_argument("--n", type=int, default=50, help="prompts per tag")
    q.add_argument("--out", "-o", required=True, help="jsonl file")
    q.add_argument("--dense", action="store_true", help="add dense prompts to GenEval's six tags")
    q.add_argument("--truth-dir", help="also write ground-truth renders in the GenEval folder layout")
    q.add_argument("--res", type=int, default=128, choices=RESOLUTIONS)
    q.set_defaults(func=cmd_prompts)

    j = sub.add_parser("judge", help="ShapesGenEval over <dir>/<index>/{metadata.jsonl,samples/*.png}")
    j.add_argument("dir")
    j.add_argument("--json", help="write per-sample verdicts and the summary here")
    j.set_defaults(func=cmd_judge)

    v = sub.add_parser("validate", help="judge accuracy on rendered ground truth")
    v.add_argument("--n", type=int, default=200)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--res", default="64,128,256,512", help="comma-separated resolutions")
    v.add_argument("--perturb", default=",".join(PERTURBATIONS), help="comma-separated perturbations")
    v.set_defaults(func=cmd_validate)

    t = sub.add_parser("tokenizer", help="build the ShapesWorld tokenizer (tokenizer.json + config)")
    t.add_argument("--out", "-o", required=True)
    t.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    t.set_defaults(func=cmd_tokenizer)
    return p


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m cheers.data.shapes.cli shapes render ...`), mirroring `cheers`."""
    parser = argparse.ArgumentParser(prog="cheers")
    add_shapes_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
