"""`cheers eval {geneval,dpg,shapes}` and `cheers plot {curves,hfi}`: thin shells over the eval package.

The main CLI calls ``add_eval_parser(subparsers)`` and ``add_plot_parser(subparsers)``; every command is a
function of the parsed namespace returning an exit code, and only these functions print. Multi-GPU:
``torchrun --nproc_per_node 8 -m cheers.cli eval geneval --model M --out DIR`` (each process takes its
share of the prompts and the GPU ``LOCAL_RANK``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _model_args(p: argparse.ArgumentParser) -> None:
    from cheers.choices import QUANTIZATIONS

    p.add_argument(
        "--model", default="default", help="checkpoint directory or hub id (default: the bundled model)"
    )
    p.add_argument(
        "--device", default="auto", help="cpu | cuda | mps | auto (under torchrun: cuda:LOCAL_RANK)"
    )
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="evaluate with the LLM's and flow heads' weights in fewer bits (torchao; default: float)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _sampling_args(p: argparse.ArgumentParser, num_images: int = 4) -> None:
    p.add_argument(
        "--num-images", type=int, default=num_images, help=f"images per prompt (default {num_images})"
    )
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)"
    )
    p.add_argument(
        "--shift", type=float, default=None, help="the release's time-shift alpha (default: the model's)"
    )
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument(
        "--seed", type=int, default=0, help="base seed: image k of prompt i uses seed + 1000 i + k"
    )
    p.add_argument("--batch-size", type=int, default=4, help="images per model call (speed only)")
    p.add_argument(
        "--solver", default=None, help="euler | multistep | heun | midpoint (default: the model's)"
    )
    p.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("T_LO", "T_HI"),
        help="guide only for t in [T_LO, T_HI] (default: the model's, normally everywhere)",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument(
        "--template",
        default="{prompt}",
        help="str.format pattern around each prompt: {prompt} as written, {sentence} capitalised with "
        "a full stop (default: the prompt alone)",
    )


def _settings(args: argparse.Namespace):
    from .runner import SamplingSettings

    return SamplingSettings(
        num_images=args.num_images,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        shift=args.shift,
        height=args.height,
        width=args.width,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        prompt_template=args.template,
        batch_size=args.batch_size,
        solver=args.solver,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
    )


def _pipeline(args: argparse.Namespace):
    from cheers.pipeline import CheersPipeline

    from .runner import rank_device

    device = rank_device(args.device)
    return CheersPipeline.from_pretrained(
        args.model,
        device=device,
        dtype=args.dtype,
        progress=False,
        quantization=getattr(args, "quantization", None),
    )


def _print_summary(name: str, summary, unit: str) -> None:
    print(
        f"{name}: {summary.generated} {unit} generated, {summary.skipped} already done "
        f"({summary.owned} for this process) in {summary.seconds:.1f}s -> {summary.outdir}"
    )


def cmd_geneval(args: argparse.Namespace) -> int:
    from .geneval import run_geneval
    from .runner import Shard, model_identity

    settings = _settings(args)  # bad settings fail before the model loads
    shard = Shard.from_env()
    summary = run_geneval(
        _pipeline(args),
        args.out,
        args.prompts,
        settings,
        model_name=model_identity(args.model),
        shard=shard,
        limit=args.limit,
        progress=not args.quiet,
    )
    _print_summary("geneval", summary, "prompts")
    if shard.is_main:
        print(
            "score with GenEval: python evaluation/evaluate_images.py "
            f"{args.out} --outfile results.jsonl --model-path <detector dir>; "
            "then python evaluation/summary_scores.py results.jsonl "
            "(ShapesWorld prompt files: cheers shapes judge DIR)"
        )
    return 0


def cmd_dpg(args: argparse.Namespace) -> int:
    from .dpg import run_dpg
    from .runner import Shard, model_identity

    settings = _settings(args)
    summary = run_dpg(
        _pipeline(args),
        args.out,
        args.prompts,
        settings,
        model_name=model_identity(args.model),
        shard=Shard.from_env(),
        limit=args.limit,
        progress=not args.quiet,
    )
    _print_summary("dpg", summary, "grids")
    return 0


def cmd_shapes(args: argparse.Namespace) -> int:
    from .runner import model_identity
    from .shapes_bench import ShapesBenchConfig, run_shapes_bench

    cfg = ShapesBenchConfig(
        n=args.n,
        tasks=tuple(t for t in args.tasks.split(",") if t),
        dense=args.dense,
        num_images=args.num_images,
        steps=args.steps,
        guidance=args.guidance,
        shift=args.shift,
        solver=args.solver,
        edit_steps=args.edit_steps,
        edit_guidance=args.edit_guidance,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        split=args.split,
        prompt_gain_n=args.prompt_gain_n,
    )
    report = run_shapes_bench(
        _pipeline(args), args.out, cfg, model_name=model_identity(args.model), progress=not args.quiet
    )
    out = Path(args.out)
    if "geneval" in report:
        print(
            f"ShapesGenEval overall {report['geneval']['summary']['overall']:.4f}, "
            f"hf fidelity {report['geneval']['hf_fidelity']:.3f}"
        )
        gain, dense = report["geneval"].get("prompt_gain"), report["geneval"].get("dense_background")
        if gain:
            print(f"relative prompt gain {gain['relative_gain']:+.4f} ({gain['n']} samples)")
        if dense:
            print(
                f"dense prompts: background colour {dense['accuracy']:.4f} (vs another prompt's "
                f"{dense['other_prompt']:.4f})"
            )
    if "vqa" in report:
        r = report["vqa"]["report"]
        print(
            f"ShapesVQA overall {r['overall']:.4f} "
            f"(yes/no F1 {r['yes_no_f1']:.4f}, OCR {r['ocr_accuracy']:.4f})"
        )
    if "edit" in report:
        print(f"ShapesEdit correct {report['edit']['summary']['correct']:.4f}")
    print(f"wrote {out / 'shapes_bench.json'}, {out / 'report.md'} and the contact sheets")
    if args.scorecard:
        from .runner import write_text_atomic
        from .scorecard import make_scorecard

        options = (
            ("n", args.n),
            ("num-images", args.num_images),
            ("tasks", args.tasks),
            ("steps", args.steps),
            ("guidance", args.guidance),
            ("shift", args.shift),
            ("seed", args.seed or None),
            ("split", None if args.split == "test" else args.split),
        )
        command = "cheers eval shapes " + " ".join(f"--{k} {v}" for k, v in options if v is not None)
        card = make_scorecard(report, command)
        write_text_atomic(Path(args.scorecard), json.dumps(card, indent=1, sort_keys=True) + "\n")
        print(f"wrote the scorecard {args.scorecard}")
    return 0


def cmd_prompt_gain(args: argparse.Namespace) -> int:
    from .conditioning import (
        noise_readout,
        object_prompt_gain,
        prompt_gain,
        routing_probe,
        rung_records_by_background,
        shapes_generation_records,
    )
    from .runner import write_text_atomic

    try:
        times = tuple(float(t) for t in args.times.split(",") if t)
    except ValueError:
        raise SystemExit(f"--times wants comma-separated numbers in [0, 1), got {args.times!r}") from None
    if args.n < 2:
        raise SystemExit(f"--n must be at least 2 (prompts are swapped between samples), got {args.n}")
    if args.short and not args.objects:
        raise SystemExit("--short is a form of the objects-only gain: give --objects L1 or L2 too")
    pipe = _pipeline(args)
    if args.objects:
        result = object_prompt_gain(
            pipe.model,
            pipe.processor,
            args.objects,
            args.n,
            args.split,
            times,
            batch_size=args.batch_size,
            short=args.short,
        )
    else:
        result = prompt_gain(
            pipe.model,
            pipe.processor,
            shapes_generation_records(args.n, args.split),
            times,
            batch_size=args.batch_size,
        )
    print(result.table())
    numbers = result.as_dict()
    if args.noise:
        noise = noise_readout(
            pipe.model,
            pipe.processor,
            shapes_generation_records(args.n, args.split),
            (0.0, *times) if 0.0 not in times else times,
            batch_size=args.batch_size,
        )
        print(noise.table())
        numbers["noise_readout"] = noise.as_dict()
    if args.routing:
        if args.objects:
            groups = rung_records_by_background(args.objects, args.n, args.split, short=args.short)
            records = [r for group in groups.values() for r in group]
        else:
            records = shapes_generation_records(args.n, args.split)
        routing = routing_probe(pipe.model, pipe.processor, records, times[0], batch_size=args.batch_size)
        print(routing.table())
        numbers["routing"] = routing.as_dict()
    if args.out:
        write_text_atomic(Path(args.out), json.dumps(numbers, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_ladder(args: argparse.Namespace) -> int:
    from .ladder import LadderConfig, run_ladder

    try:
        cfg = LadderConfig(
            rung=args.rung,
            scale=args.scale,
            steps=args.steps,
            seed=args.seed,
            resolution=args.resolution or (64 if args.rung in ("L0", "L1") else 128),
            control=not args.no_control,
        ).with_overrides(args.set)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"cheers eval ladder: {err}") from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    summary = run_ladder(cfg, args.out)
    for name in ("cheers", "control"):
        if name in summary:
            r = summary[name]
            print(
                f"{name:8s} prompt gain {r['prompt_gain']['relative_gain']:+.4f}  judge {r['score']:.2f} "
                f"(other prompt {r['other_prompt_score']:.2f})  {r['train_minutes']:.1f} min"
            )
    print(f"wrote {Path(args.out) / 'report.md'}")
    return 0


def cmd_lora_shapes(args: argparse.Namespace) -> int:
    from cheers.data.shapes.concept import Concept

    from .lora_shapes import ConceptEval, compare_adapter, markdown_table
    from .runner import write_text_atomic

    parts = args.concept.split(",")
    if len(parts) != 4:
        raise ValueError(f"--concept wants WORD,SHAPE,COLOR,BACKGROUND, got {args.concept!r}")
    concept = Concept(*parts)
    cfg = ConceptEval(n=args.n, seed=args.seed, steps=args.steps)
    try:
        report = compare_adapter(_pipeline(args), args.adapter, concept, cfg, scale=args.scale)
    except ImportError as err:
        raise ValueError(str(err)) from None
    print(markdown_table(report), end="")
    print(f"({report['seconds']:.0f} s)")
    if args.out:
        write_text_atomic(Path(args.out), json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_vae_ceiling(args: argparse.Namespace) -> int:
    from .shapes_bench import vae_ceiling_of

    summary = vae_ceiling_of(args.vae, args.n)
    print(" ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    return 0


def cmd_plot_curves(args: argparse.Namespace) -> int:
    from .plots import plot_curves

    keys = [k for k in (args.keys or "").split(",") if k]
    labels = args.labels.split(",") if args.labels else None
    print(plot_curves(args.runs, args.out, keys or None, labels, smooth=args.smooth, title=args.title))
    return 0


def cmd_plot_scorecards(args: argparse.Namespace) -> int:
    from .plots import plot_scorecards

    points = []
    for spec in args.point:
        samples, sep, path = spec.partition("=")
        try:
            seen = float(samples.replace("_", ""))
        except ValueError:
            seen = -1.0
        if not sep or seen < 0:
            raise SystemExit(
                f"--point wants SAMPLES=SCORECARD (e.g. 381280=runs/b/scorecard.json), got {spec!r}"
            )
        file = Path(path)
        if not file.is_file():
            raise SystemExit(f"--point {spec!r}: no scorecard at {file}")
        points.append((seen, json.loads(file.read_text(encoding="utf-8"))))
    print(plot_scorecards(points, args.out, title=args.title))
    return 0


def cmd_plot_hfi(args: argparse.Namespace) -> int:
    import torch

    from .plots import plot_hfi

    if args.maps:
        loaded = torch.load(args.maps, map_location="cpu", weights_only=True)
        maps = list(loaded) if isinstance(loaded, (list, tuple)) or loaded.ndim == 4 else [loaded]
    else:
        if not args.prompt:
            raise ValueError("give --prompt (one or more) to generate, or --maps FILE to plot saved maps")
        from .runner import seeded_noise

        pipe = _pipeline(args)
        generators, latents = seeded_noise(pipe, [args.seed + i for i in range(len(args.prompt))])
        out = pipe.generate(
            args.prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=generators,
            latents=latents,
            return_hfi_maps=True,
            output_type="latent",
        )
        maps = out.hfi_maps
        if args.save_maps:
            torch.save([m.cpu() for m in maps], args.save_maps)
            print(f"saved the gate maps to {args.save_maps}")
    print(plot_hfi(maps, args.out, title=args.title))
    return 0


def cmd_plot_settings(args: argparse.Namespace) -> int:
    from .settings_grid import settings_grid

    print(settings_grid(_pipeline(args), args.prompt, args.out, seed=args.seed))
    return 0


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``eval {geneval,dpg,shapes,prompt-gain,vae-ceiling}`` on an argparse subparsers object;
    returns the parser."""
    p = subparsers.add_parser(
        "eval", help="benchmarks: GenEval, DPG-Bench (images for their scorers), ShapesBench"
    )
    sub = p.add_subparsers(dest="eval_command", required=True)

    g = sub.add_parser(
        "geneval", help="GenEval images (<out>/<i>/samples/<k>.png), sharded over RANK/WORLD_SIZE"
    )
    g.add_argument("--out", "-o", required=True, help="run folder (a rerun resumes it)")
    g.add_argument(
        "--prompts", default="short", help="short | long (rewritten prompts) | a metadata jsonl path"
    )
    _sampling_args(g)
    _model_args(g)
    g.set_defaults(func=cmd_geneval)

    d = sub.add_parser("dpg", help="DPG-Bench grids (<out>/<name>.png, 2x2), sharded over RANK/WORLD_SIZE")
    d.add_argument("--out", "-o", required=True, help="run folder (a rerun resumes it)")
    d.add_argument(
        "--prompts", default=None, help="folder of DPG *.txt prompt files (default: the bundled 1065)"
    )
    _sampling_args(d)
    _model_args(d)
    d.set_defaults(func=cmd_dpg)

    s = sub.add_parser("shapes", help="ShapesBench: ShapesGenEval, ShapesVQA (incl. OCR, POPE), ShapesEdit")
    s.add_argument("--out", "-o", required=True)
    s.add_argument("--n", type=int, default=10, help="prompts per tag / VQA scenes / edits (default 10)")
    s.add_argument("--tasks", default="geneval,vqa,edit", help="comma-separated subset of geneval,vqa,edit")
    s.add_argument("--dense", action="store_true", help="add dense (DPG-like) prompts to ShapesGenEval")
    s.add_argument("--num-images", type=int, default=4, help="images per prompt (default 4)")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--guidance", type=float, default=None)
    s.add_argument(
        "--shift", type=float, default=None, help="the release's time-shift alpha (default: the model's)"
    )
    s.add_argument(
        "--solver", default=None, help="euler | multistep | heun | midpoint (default: the model's)"
    )
    s.add_argument("--edit-steps", type=int, default=None)
    s.add_argument("--edit-guidance", type=float, default=None)
    s.add_argument("--max-new-tokens", type=int, default=16, help="VQA answer length (default 16)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="held-out seeds: test (scorecards, default) or val (to choose settings without touching test)",
    )
    s.add_argument(
        "--prompt-gain-n",
        type=int,
        default=64,
        help="held-out samples for the relative prompt gain (default 64; 0 skips it)",
    )
    s.add_argument(
        "--scorecard",
        default=None,
        metavar="FILE",
        help="also write the compact scorecard (summaries + per-item verdicts) that ships with a model",
    )
    _model_args(s)
    s.set_defaults(func=cmd_shapes)

    c = sub.add_parser(
        "prompt-gain",
        help="does generation use the prompt? flow loss with each sample's own "
        "prompt vs another's, per flow time (ShapesWorld prompts)",
    )
    c.add_argument(
        "--n", type=int, default=64, help="generation samples (default 64; with --objects: per background)"
    )
    c.add_argument(
        "--objects",
        choices=("L1", "L2"),
        default=None,
        help="objects only: swap prompts between samples of this ladder rung that share a background colour",
    )
    c.add_argument(
        "--short",
        action="store_true",
        help="with --objects: the prompts in ShapesGenEval's short form, without the background sentence",
    )
    c.add_argument("--split", choices=("val", "test"), default="val")
    c.add_argument("--times", default="0.1,0.3,0.5,0.7,0.9", help="flow times (0 = noise), comma-separated")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument(
        "--noise",
        action="store_true",
        help="also the noise readout: how much of the -x0 part of the velocity the model predicts (1 ideal; "
        "near 0, sampling leaves the starting noise in the image)",
    )
    c.add_argument(
        "--routing",
        action="store_true",
        help="also where a swapped prompt still shows (at the first of --times): relative change of the "
        "LLM's image states, the flow head's stage-1 output and the velocity, and the image tokens' norm "
        "against the text embeddings'",
    )
    c.add_argument("--out", "-o", default=None, help="also write the numbers as JSON here")
    _model_args(c)
    c.set_defaults(func=cmd_prompt_gain)

    lad = sub.add_parser(
        "ladder",
        help="learnability ladder: train a micro Cheers and a pooled-prompt DiT control "
        "on one ShapesWorld rung (L0 colour ... L3 full world); report prompt "
        "gain and judge score (report.md/.json/.png)",
    )
    lad.add_argument("--rung", choices=("L0", "L1", "L2", "L3"), default="L0")
    lad.add_argument("--scale", choices=("micro", "tiny"), default="micro")
    lad.add_argument("--steps", type=int, default=1000, help="training steps of 32 samples (default 1000)")
    lad.add_argument("--seed", type=int, default=0)
    lad.add_argument("--resolution", type=int, default=None, help="pixels (default 64 for L0/L1, 128 above)")
    lad.add_argument("--no-control", action="store_true", help="skip the control model")
    lad.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any LadderConfig field, e.g. lr=3e-4, time_kind=logit_normal, llm_init_std=0.09",
    )
    lad.add_argument("--threads", type=int, default=None)
    lad.add_argument("--out", "-o", required=True, help="report folder")
    lad.set_defaults(func=cmd_ladder)

    v = sub.add_parser(
        "vae-ceiling",
        help="ShapesGenEval of reference renders through a VAE: the best a "
        "generator could score through it (check a stage-0 VAE with it)",
    )
    v.add_argument("vae", help="a stage-0 output (<run>/vae) or a release-layout model directory")
    v.add_argument("--n", type=int, default=20, help="prompts per GenEval tag (default 20)")
    v.set_defaults(func=cmd_vae_ceiling)

    lo = sub.add_parser(
        "lora-shapes",
        help="a new-word LoRA (recipe lora-shapes): ShapesWorld-judged drawing and answering about the "
        "word, without and with the adapter",
    )
    lo.add_argument("adapter", help="the adapter directory (peft layout, e.g. runs/lora-shapes/adapter)")
    lo.add_argument("--scale", type=float, default=1.0, help="the adapter's weight (default 1)")
    lo.add_argument("--n", type=int, default=16, help="held-out items per measure (default 16)")
    lo.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    lo.add_argument("--seed", type=int, default=0)
    lo.add_argument(
        "--concept",
        default="wug,star,purple,black",
        help="WORD,SHAPE,COLOR,BACKGROUND the adapter was trained on (default: the recipe's wug)",
    )
    lo.add_argument("--out", "-o", default=None, help="also write the report as JSON here")
    _model_args(lo)
    lo.set_defaults(func=cmd_lora_shapes)
    return p


def add_plot_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``plot {curves,scorecards,hfi,settings}`` on an argparse subparsers object; returns the
    parser."""
    p = subparsers.add_parser(
        "plot", help="figures: scores over training steps, HFI gate over denoising steps"
    )
    sub = p.add_subparsers(dest="plot_command", required=True)

    c = sub.add_parser("curves", help="score-vs-step curves from runs' metrics.jsonl (paper Fig. 4)")
    c.add_argument("runs", nargs="+", help="run directories or metrics.jsonl files")
    c.add_argument("--keys", default=None, help="comma-separated metric names (default: the score-like ones)")
    c.add_argument("--labels", default=None, help="comma-separated legend names, one per run")
    c.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) for noisy curves")
    c.add_argument("--title", default=None)
    c.add_argument("--out", "-o", default="curves.png")
    c.set_defaults(func=cmd_plot_curves)

    k = sub.add_parser(
        "scorecards", help="ShapesBench figures of several scorecards against training samples seen"
    )
    k.add_argument(
        "--point",
        action="append",
        required=True,
        metavar="SAMPLES=SCORECARD",
        help="a scorecard JSON and the samples its model had seen (repeat)",
    )
    k.add_argument("--title", default=None)
    k.add_argument("--out", "-o", default="scorecards.png")
    k.set_defaults(func=cmd_plot_scorecards)

    h = sub.add_parser(
        "hfi", help="HFI gate intensity per denoising step plus a heatmap strip (paper Fig. 5)"
    )
    h.add_argument("--prompt", action="append", help="a prompt to generate (repeat for several)")
    h.add_argument("--maps", default=None, help="plot saved maps (torch.save of a list of (S, h, w) tensors)")
    h.add_argument("--save-maps", default=None, help="also save the generated maps here")
    h.add_argument("--steps", type=int, default=None)
    h.add_argument("--guidance", type=float, default=None)
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--title", default=None)
    h.add_argument("--out", "-o", default="hfi.png")
    _model_args(h)
    h.set_defaults(func=cmd_plot_hfi)

    g = sub.add_parser("settings", help="one prompt and seed over a grid of steps, guidance and shift")
    g.add_argument("--prompt", required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", "-o", default="settings.png")
    _model_args(g)
    g.set_defaults(func=cmd_plot_settings)
    return p


def cmd_ablate(args: argparse.Namespace) -> int:
    from .ablations import AblationConfig, run_ablations

    if args.finetune_from == "default":
        from cheers.assets import default_model_dir

        args.finetune_from = str(default_model_dir())

    cfg = AblationConfig(
        recipe=args.recipe,
        steps=args.steps,
        finetune_steps=args.finetune_steps,
        micro_batch=args.micro_batch,
        finetune_from=args.finetune_from,
        pairs=tuple(p for p in args.pairs.split(",") if p),
        n=args.n,
        num_images=args.num_images,
        sample_steps=args.sample_steps,
        overrides=list(args.overrides),
    )
    results = run_ablations(cfg, args.out)
    for name, pair in results["pairs"].items():
        for r in pair["rows"]:
            print(f"{name}: {r['metric']}: with {r['with']:.3f} without {r['without']:.3f} -> {r['verdict']}")
    print(f"wrote {Path(args.out) / 'ablations.md'}, ablations.json and ablations.png")
    return 0


ABLATION_PAIRS = ("hfi", "pixrec", "joint")
"""``cheers.eval.ablations.PAIRS``, repeated so that building the parser does not import the trainer (and
transformers and, where installed, torchao with it); a test keeps the two equal."""


def add_ablate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``ablate``: the paper's ablations as matched ShapesWorld runs (see cheers.eval.ablations)."""
    a = subparsers.add_parser(
        "ablate",
        help="train matched pairs (HFI, pixel reconstruction, joint training) "
        "from one seed and budget and report ShapesBench differences",
    )
    a.add_argument(
        "--out", "-o", required=True, help="ablation folder (a rerun reuses finished runs, resumes others)"
    )
    a.add_argument("--recipe", default="tiny-shapes", help="base recipe (default tiny-shapes)")
    a.add_argument("--steps", type=int, default=600, help="optimizer steps of each from-scratch run")
    a.add_argument("--finetune-steps", type=int, default=200, help="steps of each fine-tune (joint pair)")
    a.add_argument("--micro-batch", type=int, default=None, help="batch of every run (default: the recipe's)")
    a.add_argument(
        "--finetune-from",
        default=None,
        metavar="DIR",
        help="model the joint-training fine-tunes start from (default: the base run; 'default': the "
        "bundled model)",
    )
    a.add_argument(
        "--pairs",
        default=",".join(ABLATION_PAIRS),
        help=f"comma-separated subset of {','.join(ABLATION_PAIRS)}",
    )
    a.add_argument("--n", type=int, default=20, help="ShapesBench size per task (default 20)")
    a.add_argument("--num-images", type=int, default=2, help="images per ShapesGenEval prompt (default 2)")
    a.add_argument(
        "--sample-steps",
        type=int,
        default=None,
        help="ODE steps of ShapesBench's drawing and editing (default: each model's own)",
    )
    a.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for every run, e.g. --set init.vae=runs/shapes-vae/vae",
    )
    a.set_defaults(func=cmd_ablate)
    return a


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m cheers.eval.cli eval geneval ...``), mirroring ``cheers``."""
    import logging

    parser = argparse.ArgumentParser(prog="cheers")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    add_plot_parser(sub)
    add_ablate_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"cheers: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
