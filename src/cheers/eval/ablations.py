"""The paper's ablations as matched training runs on ShapesWorld, scored with ShapesBench.

``cheers ablate`` trains, from one recipe (default ``tiny-shapes``), one seed and one budget:

* ``base``      the recipe as it is;
* ``no_hfi``    without high-frequency injection (``options.high_frequency_injection=false``, paper Table 5);
* ``no_pixrec`` without pixel reconstruction: the ViT reads a learned linear image of the latent instead of
  D(z_t) (``options.pixel_reconstruction=false``, paper Table 6);
* ``ft_und`` / ``ft_gen_und``: ``base`` fine-tuned for the same number of steps on understanding only, and
  on understanding + generation (the recipe's ratios) — the paper's joint-training comparison.

Each run is a normal trainer run in ``<out>/runs/<name>`` (resumable: a finished run is reused, a killed one
continues from its last checkpoint); each is then scored with ShapesBench on held-out seeds and the pairs
are written to ``<out>/ablations.json``, ``<out>/ablations.md`` and ``<out>/ablations.png``. Every
difference is reported with its binomial standard error, and a trend is called reproduced only when the
difference has the paper's sign and exceeds two standard errors (``within noise`` otherwise).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cheers.eval.runner import write_text_atomic
from cheers.eval.train_hooks import recipe_hooks
from cheers.training.config import apply_overrides, load_recipe, recipe_from_dict
from cheers.training.loop import train

logger = logging.getLogger(__name__)

PAIRS = ("hfi", "pixrec", "joint")
"""Which comparisons ``cheers ablate`` can run (``--pairs``)."""


def lookup(report: dict[str, Any], path: Sequence[str]) -> Any:
    node: Any = report
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _count(*path: str) -> Callable[[dict[str, Any]], int | None]:
    return lambda report: lookup(report, path)


def _vqa_type_count(kind: str) -> Callable[[dict[str, Any]], int | None]:
    return lambda report: sum(1 for it in lookup(report, ("vqa", "items")) or () if it.get("type") == kind)


@dataclass(frozen=True)
class Metric:
    """One score of a pair: where it is in a ShapesBench report, how many trials it averages (None: not a
    proportion), which way the paper says it moves from ``without`` to ``with`` (+1 up, 0 unchanged)."""

    name: str
    path: tuple[str, ...]
    count: Callable[[dict[str, Any]], int | None] | None
    paper: int


@dataclass(frozen=True)
class Pair:
    name: str
    title: str
    with_run: str
    without_run: str
    tasks: tuple[str, ...]
    metrics: tuple[Metric, ...]
    paper_claim: str


GENEVAL = Metric(
    "ShapesGenEval overall", ("geneval", "summary", "overall"), _count("geneval", "n_images"), +1
)
FIDELITY = Metric("high-frequency fidelity", ("geneval", "hf_fidelity"), None, +1)
VQA = Metric("ShapesVQA overall", ("vqa", "report", "overall"), _count("vqa", "report", "n"), 0)
OCR = Metric("OCR", ("vqa", "report", "ocr_accuracy"), _vqa_type_count("ocr"), +1)

PAIR_SPECS: dict[str, Pair] = {
    "hfi": Pair(
        "hfi",
        "(a) high-frequency injection (paper Table 5)",
        "base",
        "no_hfi",
        ("geneval", "vqa"),
        (GENEVAL, FIDELITY, VQA),
        "HFI improves generation (GenEval, detail) and leaves understanding unchanged",
    ),
    "pixrec": Pair(
        "pixrec",
        "(b) pixel reconstruction before the ViT (paper Table 6)",
        "base",
        "no_pixrec",
        ("vqa",),
        (OCR, Metric("ShapesVQA overall", VQA.path, VQA.count, +1)),
        "decoding z_t to pixels before the ViT improves OCR and VQA",
    ),
    "joint": Pair(
        "joint",
        "(c) generation + understanding vs understanding-only fine-tuning",
        "ft_gen_und",
        "ft_und",
        ("vqa",),
        (Metric("ShapesVQA overall", VQA.path, VQA.count, +1),),
        "joint generation + understanding training does not cost understanding (paper: it helps)",
    ),
}


@dataclass
class AblationConfig:
    """recipe: the base recipe (name or YAML). steps / micro_batch: the budget of every from-scratch run;
    finetune_steps: of each fine-tune; finetune_from: the release-layout model both fine-tunes start from
    (None: the ``base`` run). n / num_images: ShapesBench size. sample_steps: ODE steps of its drawing and
    editing (None: each model's defaults). overrides: ``--set`` for all runs."""

    recipe: str = "tiny-shapes"
    steps: int = 600
    finetune_steps: int = 200
    micro_batch: int | None = None
    finetune_from: str | None = None
    pairs: tuple[str, ...] = PAIRS
    n: int = 20
    num_images: int = 2
    sample_steps: int | None = None
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.finetune_steps < 1 or self.n < 1 or self.num_images < 1:
            raise ValueError("steps, finetune_steps, n and num_images must be >= 1")
        if self.sample_steps is not None and self.sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1 (or None: each model's), got {self.sample_steps}")
        unknown = [p for p in self.pairs if p not in PAIRS]
        if unknown or not self.pairs:
            raise ValueError(f"pairs must be a non-empty subset of {PAIRS}, got {list(self.pairs)}")


def run_specs(cfg: AblationConfig) -> dict[str, dict[str, Any]]:
    """Recipe overrides per run name (only the runs the chosen pairs need, base first)."""
    budget: dict[str, Any] = {"train.steps": cfg.steps}
    if cfg.micro_batch:
        budget.update({"train.micro_batch": cfg.micro_batch, "train.global_batch": cfg.micro_batch})
    specs: dict[str, dict[str, Any]] = {}
    if "hfi" in cfg.pairs or "pixrec" in cfg.pairs or not cfg.finetune_from:
        specs["base"] = dict(budget)
    if "hfi" in cfg.pairs:
        specs["no_hfi"] = {**budget, "model.overrides": {"options.high_frequency_injection": False}}
    if "pixrec" in cfg.pairs:
        specs["no_pixrec"] = {**budget, "model.overrides": {"options.pixel_reconstruction": False}}
    if "joint" in cfg.pairs:
        specs["ft_und"] = {**budget, "train.steps": cfg.finetune_steps, "_finetune": ("understanding",)}
        specs["ft_gen_und"] = {
            **budget,
            "train.steps": cfg.finetune_steps,
            "_finetune": ("understanding", "generation"),
        }
    return specs


def _finetune_overrides(raw: dict[str, Any], base_export: Path, tasks: Sequence[str]) -> dict[str, Any]:
    sources = [s for s in raw["data"]["sources"] if s.get("task") in tasks]
    if {s.get("task") for s in sources} != set(tasks):
        raise ValueError(f"the recipe has no data source for each of {list(tasks)}")
    return {
        "init.from_release": str(base_export),
        "init.vae": None,
        "init.llm": None,
        "init.vision": None,
        "data.sources": sources,
    }


def train_run(cfg: AblationConfig, name: str, spec: dict[str, Any], out: Path) -> Path:
    """Train (or reuse, or resume) run ``name``; returns its release-layout export directory."""
    run_dir = out / "runs" / name
    export = run_dir / "export"
    if (export / "config.json").is_file() and (run_dir / "DONE").is_file():
        logger.info("ablation run %s already trained: %s", name, export)
        return export
    recipe = load_recipe(cfg.recipe, cfg.overrides)
    raw = recipe.to_dict()
    spec = dict(spec)
    tasks = spec.pop("_finetune", None)
    if tasks is not None:
        start = Path(cfg.finetune_from) if cfg.finetune_from else out / "runs" / "base" / "export"
        spec.update(_finetune_overrides(raw, start, tasks))
        raw["model"]["overrides"] = {}  # the base export's config.json already carries them
    model_overrides = spec.pop("model.overrides", {})
    raw = apply_overrides(raw, spec)
    raw["model"]["overrides"] = {**(raw["model"].get("overrides") or {}), **model_overrides}
    raw["checkpoint"]["export"] = True
    raw["out"] = str(run_dir)
    recipe = recipe_from_dict(raw)
    result = train(recipe, run_dir, resume=True, hooks=recipe_hooks(recipe))
    if result.export_dir is None:
        raise RuntimeError(f"ablation run {name} finished without an export")
    write_text_atomic(run_dir / "DONE", json.dumps({"step": result.step}) + "\n")
    return Path(result.export_dir)


def score_run(
    cfg: AblationConfig, name: str, export: Path, tasks: Sequence[str], out: Path
) -> dict[str, Any]:
    """ShapesBench of one run (cached in ``<out>/bench/<name>/shapes_bench.json`` when it has the tasks)."""
    from cheers.eval.shapes_bench import ShapesBenchConfig, run_shapes_bench
    from cheers.pipeline import CheersPipeline

    bench_dir = out / "bench" / name
    cached = bench_dir / "shapes_bench.json"
    if cached.is_file():
        report = json.loads(cached.read_text(encoding="utf-8"))
        same = [report.get("config", {}).get(k) for k in ("n", "steps")] == [cfg.n, cfg.sample_steps]
        if same and all(t in report for t in tasks):
            return report
    pipe = CheersPipeline.from_pretrained(export)
    bench = ShapesBenchConfig(
        n=cfg.n,
        tasks=tuple(tasks),
        num_images=cfg.num_images,
        steps=cfg.sample_steps,
        edit_steps=cfg.sample_steps,
    )
    return run_shapes_bench(pipe, bench_dir, bench, model_name=f"ablation/{name}", progress=True)


def compare(pair: Pair, with_report: dict[str, Any], without_report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per metric: both values, the difference, its standard error and the verdict against the paper."""
    rows = []
    for m in pair.metrics:
        a, b = lookup(with_report, m.path), lookup(without_report, m.path)
        if a is None or b is None:
            continue
        diff = float(a) - float(b)
        se = None
        if m.count is not None:
            na, nb = m.count(with_report), m.count(without_report)
            if na and nb:
                se = math.sqrt(max(a * (1 - a), 0) / na + max(b * (1 - b), 0) / nb)
                se = max(se, 0.5 / max(na, nb))  # never claim more precision than one trial
        rows.append(
            {
                "metric": m.name,
                "with": float(a),
                "without": float(b),
                "diff": diff,
                "se": se,
                "paper": m.paper,
                "verdict": verdict(diff, se, m.paper),
            }
        )
    return rows


def verdict(diff: float, se: float | None, paper: int) -> str:
    """'reproduced', 'opposite', or 'within noise' (|diff| <= 2 SE); paper 0 means 'no change expected'."""
    if se is None:  # no error bar: report the sign only
        if paper == 0:
            return "n/a"
        return "same sign as paper (no error bar)" if diff * paper > 0 else "opposite sign (no error bar)"
    significant = abs(diff) > 2 * se
    if paper == 0:
        return "reproduced (no significant change)" if not significant else "changed (paper: unchanged)"
    if not significant:
        return "within noise"
    return "reproduced" if diff * paper > 0 else "opposite"


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        "# Ablations on ShapesWorld",
        "",
        f"Recipe `{cfg['recipe']}`, {cfg['steps']} steps per from-scratch run, {cfg['finetune_steps']} per "
        f"fine-tune, one seed; ShapesBench n={cfg['n']} (held-out seeds), {cfg['num_images']} images per "
        "prompt. SE: binomial standard error of the difference; a trend is *reproduced* when the "
        "difference has the paper's sign and exceeds 2 SE.",
        "",
    ]
    for name, pair in results["pairs"].items():
        spec = PAIR_SPECS[name]
        lines += [
            f"## {spec.title}",
            "",
            f"Paper: {spec.paper_claim}. Runs: `{spec.with_run}` (with) vs `{spec.without_run}` (without).",
            "",
            "| metric | with | without | diff | SE | verdict |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in pair["rows"]:
            se = "—" if r["se"] is None else f"{r['se']:.3f}"
            lines.append(
                f"| {r['metric']} | {r['with']:.3f} | {r['without']:.3f} | {r['diff']:+.3f} | {se} | "
                f"{r['verdict']} |"
            )
        lines.append("")
    lines += ["![ablations](ablations.png)", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure

    pairs = list(results["pairs"].items())
    fig = Figure(figsize=(4.2 * len(pairs), 3.4), layout="constrained")
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    for ax, (name, pair) in zip(axes, pairs):
        rows = pair["rows"]
        x = range(len(rows))
        ax.bar(
            [i - 0.2 for i in x],
            [r["with"] for r in rows],
            0.4,
            label="with",
            yerr=[r["se"] or 0 for r in rows],
            capsize=3,
        )
        ax.bar([i + 0.2 for i in x], [r["without"] for r in rows], 0.4, label="without")
        ax.set_xticks(
            list(x),
            [r["metric"].replace("ShapesGenEval", "GenEval").replace("ShapesVQA", "VQA") for r in rows],
            fontsize=7,
        )
        ax.set_ylim(0, 1)
        ax.set_title(PAIR_SPECS[name].title, fontsize=8)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return path


def run_ablations(cfg: AblationConfig, out: str | Path) -> dict[str, Any]:
    """Train every run the chosen pairs need, score them, write the report; returns the results dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = run_specs(cfg)
    exports = {name: train_run(cfg, name, spec, out) for name, spec in specs.items()}
    tasks: dict[str, set[str]] = {}
    for p in cfg.pairs:
        spec = PAIR_SPECS[p]
        for run in (spec.with_run, spec.without_run):
            tasks.setdefault(run, set()).update(spec.tasks)
    reports = {run: score_run(cfg, run, exports[run], sorted(t), out) for run, t in tasks.items()}
    results: dict[str, Any] = {"config": asdict(cfg), "pairs": {}}
    for p in cfg.pairs:
        spec = PAIR_SPECS[p]
        results["pairs"][p] = {
            "with": spec.with_run,
            "without": spec.without_run,
            "rows": compare(spec, reports[spec.with_run], reports[spec.without_run]),
        }
    write_text_atomic(out / "ablations.json", json.dumps(results, indent=1) + "\n")
    write_text_atomic(out / "ablations.md", markdown(results))
    plot(results, out / "ablations.png")
    return results
