"""A model's ShapesBench scorecard, compact enough to ship with the model, and the check that a rerun
reproduces it.

``cheers eval shapes`` writes a full report; :func:`make_scorecard` keeps what the README quotes (the
summaries, the exact settings) plus one verdict per judged item. Items are keyed by what defines them (prompt
index and sample, VQA seed and question, edit seed), and ShapesBench's item lists are prefix-stable in ``n``
(the first items of ``--n 50`` are the items of ``--n 3``), so a quick rerun at a small ``n`` is checked
item by item against the full card: :func:`agreement`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCORECARD_NAME = "scorecard.json"


def item_verdicts(report: dict[str, Any]) -> dict[str, bool]:
    """``{item key: correct}`` over every task in a ShapesBench report."""
    out: dict[str, bool] = {}
    for s in report.get("geneval", {}).get("samples", ()):
        out[f"geneval/{s['index']}/{s['sample']}"] = bool(s["correct"])
    for i, row in enumerate(report.get("vqa", {}).get("items", ())):
        out[f"vqa/{row['seed']}/{row['type']}/{row['question']}/{i}"] = bool(row["correct"])
    for row in report.get("edit", {}).get("items", ()):
        out[f"edit/{row['seed']}"] = bool(row["correct"])
    return out


def make_scorecard(report: dict[str, Any], command: str) -> dict[str, Any]:
    """The shippable card of a full ShapesBench report and the command that produced it."""
    card: dict[str, Any] = {
        "command": command,
        "model": report["model"],
        "config": report["config"],
        "resolution": report["resolution"],
        "seconds": report["seconds"],
    }
    if "geneval" in report:
        g = report["geneval"]
        card["geneval"] = {
            "summary": g["summary"],
            "hf_fidelity": g["hf_fidelity"],
            "n_images": g["n_images"],
            "vae_ceiling": g.get("vae_ceiling"),
            "other_prompt": g.get("other_prompt"),
            "overall_se": g.get("overall_se"),
            "dense_background": g.get("dense_background"),
            "prompt_gain": g.get("prompt_gain"),
        }
    if "vqa" in report:
        card["vqa"] = report["vqa"]["report"]
    if "edit" in report:
        card["edit"] = report["edit"]["summary"]
    card["items"] = item_verdicts(report)
    return card


def agreement(card: dict[str, Any], report: dict[str, Any]) -> tuple[float, int]:
    """(fraction of the rerun's items whose verdict equals the card's, number of items compared).

    VQA keys carry the question's position in the run, which is prefix-stable too."""
    verdicts = item_verdicts(report)
    shared = [k for k in verdicts if k in card["items"]]
    if not shared:
        raise ValueError("the rerun shares no item with the scorecard: different tasks, seeds or num_images?")
    return sum(verdicts[k] == card["items"][k] for k in shared) / len(shared), len(shared)


def load_scorecard(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / SCORECARD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: make it with `cheers eval shapes --scorecard`")
    return json.loads(path.read_text(encoding="utf-8"))
