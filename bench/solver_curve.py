"""Quality against steps for each ODE solver and guidance interval: ShapesGenEval on the bundled model.

For every (solver, guidance interval, steps) it runs ShapesGenEval (``n`` prompts per GenEval tag, judged by
the ShapesWorld scene parser) and records the overall score, the high-frequency fidelity against the reference
renders, the seconds per image spent in ``pipe.generate`` (judging excluded) and the velocity evaluations per
image. Writes ``<out>/solver_curve.json`` (updated after each run; finished runs are reused unless
``--force``) and ``<out>/solver_curve.png``: score, fidelity and seconds per image against steps, one line
per solver and interval.

    python bench/solver_curve.py --n 2 --steps 4,8 --solvers euler,multistep     # a quick smoke run
    python bench/solver_curve.py --n 10 --steps 4,6,8,12,20 --intervals none,0.3:1,0:0.7
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from cheers.eval.shapes_bench import ShapesBenchConfig, run_shapes_bench
from cheers.pipeline import CheersPipeline
from cheers.sampling import SOLVERS, check_guidance_interval, check_solver, num_evaluations


def parse_interval(text: str) -> tuple[float, float] | None:
    """``none`` (guide at every step) or ``LO:HI``."""
    if text == "none":
        return None
    lo, _, hi = text.partition(":")
    return check_guidance_interval((float(lo), float(hi)))


def label(solver: str, interval: tuple[float, float] | None) -> str:
    return solver if interval is None else f"{solver} cfg@[{interval[0]:g},{interval[1]:g}]"


def key(solver: str, interval: tuple[float, float] | None, steps: int) -> str:
    where = "all" if interval is None else f"{interval[0]:g}-{interval[1]:g}"
    return f"{solver}_cfg{where}_s{steps}"


def run_one(pipe: CheersPipeline, out: Path, solver: str, interval, steps: int, args) -> dict:
    folder = out / "runs" / key(solver, interval, steps)
    shutil.rmtree(folder, ignore_errors=True)  # fresh: resumed images would spoil the timing
    pipe.defaults = dataclasses.replace(pipe.defaults, solver=solver, guidance_interval=interval)
    config = ShapesBenchConfig(
        tasks=("geneval",),
        steps=steps,
        n=args.n,
        num_images=args.num_images,
        guidance=args.guidance,
        seed=args.seed,
        prompt_gain_n=0,
    )
    generate, spent = pipe.generate, [0.0]

    def timed_generate(*a, **kw):  # time the sampling only, not the judge or the contact sheets
        started = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - started

    pipe.generate = timed_generate
    try:
        report = run_shapes_bench(pipe, folder, config, model_name=args.model, progress=False)
    finally:
        del pipe.generate  # back to the class's method
    seconds = spent[0]
    geneval = report["geneval"]
    return {
        "solver": solver,
        "guidance_interval": interval,
        "steps": steps,
        "evaluations": num_evaluations(solver, steps),
        "score": geneval["summary"]["overall"],
        "per_tag": geneval["summary"],
        "hf_fidelity": geneval["hf_fidelity"],
        "images": geneval["n_images"],
        "seconds": round(seconds, 2),
        "seconds_per_image": round(seconds / geneval["n_images"], 4),
        "folder": str(folder.relative_to(out)),
    }


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        ("score", "ShapesGenEval overall"),
        ("hf_fidelity", "high-frequency fidelity"),
        ("seconds_per_image", "seconds per image (sampling)"),
    ]
    lines = sorted({(r["solver"], tuple(r["guidance_interval"] or ())) for r in results})
    for solver, interval in lines:
        rows = sorted(
            (r for r in results if r["solver"] == solver and tuple(r["guidance_interval"] or ()) == interval),
            key=lambda r: r["steps"],
        )
        name = label(solver, interval or None)
        steps = [r["steps"] for r in rows]
        for ax, (field, _) in zip(axes, panels):
            ax.plot(steps, [r[field] for r in rows], "o-", label=name)
    ticks = sorted({r["steps"] for r in results})
    for ax, (_, name) in zip(axes, panels):
        ax.set_xlabel("steps (grid points)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="checkpoint (default: the bundled model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n", type=int, default=2, help="prompts per GenEval tag")
    ap.add_argument("--num-images", type=int, default=1, help="images per prompt")
    ap.add_argument("--steps", default="4,8,16")
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument(
        "--intervals", default="none,0.2:1", help="guidance intervals: none or LO:HI, comma-separated"
    )
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", "-o", default="solver-curve")
    ap.add_argument("--force", action="store_true", help="rerun configurations already in the JSON")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    solvers = [check_solver(s) for s in args.solvers.split(",")]
    intervals = [parse_interval(i) for i in args.intervals.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "solver_curve.json"
    pipe = CheersPipeline.from_pretrained(args.model, device=args.device, progress=False)
    setup = {
        "model": args.model,
        "n": args.n,
        "num_images": args.num_images,
        "seed": args.seed,
        "guidance": args.guidance if args.guidance is not None else pipe.defaults.guidance_scale,
        "shift": pipe.defaults.shift,
        "device": str(pipe.device),
    }
    old = json.loads(record.read_text()) if record.exists() and not args.force else {}
    results = {r["key"]: r for r in old.get("results", [])} if old.get("setup") == setup else {}
    for solver in solvers:
        for interval in intervals:
            for s in steps:
                k = key(solver, interval, s)
                if k not in results:
                    results[k] = {"key": k, **run_one(pipe, out, solver, interval, s, args)}
                    record.write_text(
                        json.dumps({"setup": setup, "results": list(results.values())}, indent=1) + "\n"
                    )
                r = results[k]
                print(
                    f"{label(solver, interval):28s} steps={s:3d} evals={r['evaluations']:3d} "
                    f"score={r['score']:.3f} hf={r['hf_fidelity']:.3f} {r['seconds_per_image']:.3f} s/image"
                )
    plot(
        list(results.values()),
        out / "solver_curve.png",
        f"ShapesGenEval vs steps ({args.model}, n={args.n} x {args.num_images} images per tag, "
        f"guidance {setup['guidance']:g})",
    )
    print(f"wrote {record} and {out / 'solver_curve.png'}")


if __name__ == "__main__":
    main()
