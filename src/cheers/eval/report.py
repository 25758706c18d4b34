"""Markdown for ShapesBench results (``report.md``): the summaries as tables, failures as examples."""

from __future__ import annotations

from typing import Any

MAX_FAILURES = 8


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def shapes_markdown(report: dict[str, Any]) -> str:
    """The report of :func:`cheers.eval.shapes_bench.run_shapes_bench` as markdown."""
    cfg = report["config"]
    lines = [
        f"# ShapesBench: {report['model']}",
        "",
        f"{cfg['n']} items per task, scenes rendered at {report['resolution']} px; "
        f"seconds per task: {', '.join(f'{k} {v}' for k, v in report['seconds'].items())}.",
        "",
    ]
    if "geneval" in report:
        g = report["geneval"]
        lines += [
            "## ShapesGenEval",
            "",
            f"{g['n_prompts']} prompts x {cfg['num_images']} images = {g['n_images']} images, judged by the "
            f"scene parser (GenEval's rules). High-frequency fidelity vs reference renders: "
            f"{g['hf_fidelity']:.3f} (1 = as much fine detail as the ground truth).",
            "",
        ]
        ceiling = g.get("vae_ceiling") or {}
        other = g.get("other_prompt") or {}
        lines += _table(
            ["tag", "accuracy %", "against another prompt %", "VAE ceiling %"],
            [
                [t, _pct(a), _pct(other[t]) if t in other else "—", _pct(ceiling[t]) if t in ceiling else "—"]
                for t, a in g["summary"].items()
            ],
        )
        lines += [
            "",
            "Against another prompt: each image judged against the next prompt of its tag — what a "
            "generator that ignored its prompt would score; the accuracy should be well above it.",
            "VAE ceiling: the same judge on the reference renders passed through the model's VAE — the "
            "best a generator could reach through it.",
        ]
        if g.get("overall_se") is not None:
            lines += [
                "",
                f"Overall {_pct(g['summary']['overall'])} ± {_pct(g['overall_se'])} (standard error).",
            ]
        dense = g.get("dense_background")
        if dense:
            lines += [
                "",
                f"Background colour on the {dense['n']} dense prompts' images: {_pct(dense['accuracy'])} "
                f"± {_pct(dense['se'])} "
                f"(against another dense prompt's colour: {_pct(dense['other_prompt'])}).",
            ]
        gain = g.get("prompt_gain")
        if gain:
            lines += [
                "",
                f"Relative prompt gain (flow loss with another prompt over the own prompt, "
                f"{gain['n']} held-out samples): {gain['relative_gain']:+.4f} (0 = the prompt is ignored).",
            ]
        fails = [s for s in g["samples"] if not s["correct"]][:MAX_FAILURES]
        if fails:
            lines += ["", "Failures (first few):", ""]
            lines += [
                f'- `{s["path"]}` ({s["tag"]}) "{s["prompt"]}": {"; ".join(s["reasons"])}' for s in fails
            ]
        lines += ["", "![ShapesGenEval contact sheet](geneval_sheet.png)", ""]
    if "vqa" in report:
        v = report["vqa"]
        r = v["report"]
        lines += [
            "## ShapesVQA",
            "",
            f"{r['n']} questions on {v['n_scenes']} scenes, exact match after normalisation.",
            "",
        ]
        rows = [[t, _pct(a)] for t, a in r["accuracy"].items()]
        rows += [["**overall**", _pct(r["overall"])]]
        lines += _table(["question type", "accuracy %"], rows)
        lines += [
            "",
            "POPE-style yes/no: "
            + ", ".join(f"{k} {_pct(r['yes_no_' + k])}" for k in ("accuracy", "precision", "recall", "f1"))
            + f", yes ratio {_pct(r['yes_ratio'])}. OCR accuracy {_pct(r['ocr_accuracy'])}.",
            "",
        ]
        fails = [it for it in v["items"] if not it["correct"]][:MAX_FAILURES]
        if fails:
            lines += ["Wrong answers (first few):", ""]
            lines += [
                f"- scene {it['seed']} ({it['type']}) {it['question'].splitlines()[0]!r}: answered "
                f"{it['prediction']!r}, expected {it['answer']!r}"
                for it in fails
            ]
            lines += [""]
    if "edit" in report:
        e = report["edit"]
        s = e["summary"]
        lines += [
            "## ShapesEdit",
            "",
            f"{e['n']} edits. Correct {_pct(s['correct'])}%, edit applied "
            f"{_pct(s['target_ok'])}%, untouched parts kept {_pct(s['preserved'])}%.",
            "",
        ]
        lines += _table(["edit kind", "correct %"], [[k, _pct(a)] for k, a in s["per_kind"].items()])
        lines += ["", "![ShapesEdit contact sheet: source, edited, target](edit_sheet.png)", ""]
    return "\n".join(lines)
