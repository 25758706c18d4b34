"""``cheers ablate``: matched ShapesWorld runs, their ShapesBench comparison and the report."""

from __future__ import annotations

import json

import pytest

from cheers.eval.ablations import PAIR_SPECS, AblationConfig, compare, run_ablations, run_specs, verdict
from cheers.models.pretrained import from_pretrained
from test_training_cli import cheers
from test_training_fixtures import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "data.num_workers=0",
    "log.progress=false",
    "log.tensorboard=false",
    "engine.device=cpu",
    "log.every=1",
    "log.sample_every=0",
    "log.score_every=0",
    "checkpoint.every=0",
]


def test_verdicts_need_the_papers_sign_and_two_standard_errors():
    assert verdict(0.30, 0.05, +1) == "reproduced"
    assert verdict(0.05, 0.05, +1) == "within noise"
    assert verdict(-0.30, 0.05, +1) == "opposite"
    assert verdict(0.01, 0.05, 0) == "reproduced (no significant change)"
    assert verdict(0.30, 0.05, 0) == "changed (paper: unchanged)"


def test_compare_reads_scores_and_counts_from_shapesbench_reports():
    def report(geneval, vqa, ocr_right):
        items = [{"type": "ocr", "correct": i < ocr_right} for i in range(10)] + [{"type": "color"}] * 30
        return {
            "geneval": {"summary": {"overall": geneval}, "n_images": 100, "hf_fidelity": 0.5},
            "vqa": {"report": {"overall": vqa, "n": 40, "ocr_accuracy": ocr_right / 10}, "items": items},
        }

    rows = {r["metric"]: r for r in compare(PAIR_SPECS["hfi"], report(0.8, 0.5, 5), report(0.4, 0.5, 5))}
    assert rows["ShapesGenEval overall"]["verdict"] == "reproduced"
    assert rows["ShapesGenEval overall"]["se"] == pytest.approx((0.8 * 0.2 / 100 + 0.4 * 0.6 / 100) ** 0.5)
    assert rows["ShapesVQA overall"]["verdict"] == "reproduced (no significant change)"
    ocr = {r["metric"]: r for r in compare(PAIR_SPECS["pixrec"], report(0, 0.5, 9), report(0, 0.5, 2))}["OCR"]
    assert ocr["with"] == 0.9 and ocr["without"] == 0.2 and ocr["se"] > 0.15  # 10 OCR questions each


def test_run_specs_match_every_run_but_the_ablated_switch():
    specs = run_specs(AblationConfig(steps=7, finetune_steps=3, micro_batch=2))
    assert list(specs) == ["base", "no_hfi", "no_pixrec", "ft_und", "ft_gen_und"]
    assert specs["no_hfi"]["model.overrides"] == {"options.high_frequency_injection": False}
    assert specs["no_pixrec"]["model.overrides"] == {"options.pixel_reconstruction": False}
    assert all(s["train.micro_batch"] == 2 for s in specs.values())
    assert specs["ft_und"]["train.steps"] == specs["ft_gen_und"]["train.steps"] == 3
    with pytest.raises(ValueError, match="pairs"):
        AblationConfig(pairs=("nope",))
    with pytest.raises(ValueError, match="sample_steps"):
        AblationConfig(sample_steps=0)


@pytest.mark.slow
def test_ablate_trains_matched_runs_and_writes_the_report(tmp_path):
    vae_run = tmp_path / "vae-run"
    assert (
        cheers(
            "train",
            "--recipe",
            "stage0_vae",
            "--out",
            str(vae_run),
            *sum((["--set", o] for o in TINY), []),
            "--set",
            "train.steps=1",
            "--set",
            "train.micro_batch=2",
            "--set",
            "train.global_batch=2",
            "--set",
            "vae.fit_samples=4",
        )
        == 0
    )
    cfg = AblationConfig(
        steps=1,
        finetune_steps=1,
        micro_batch=2,
        n=1,
        num_images=1,
        sample_steps=2,
        overrides=[*TINY, f"init.vae={vae_run / 'vae'}"],
    )
    out = tmp_path / "ablate"
    results = run_ablations(cfg, out)
    assert set(results["pairs"]) == {"hfi", "pixrec", "joint"}
    assert not from_pretrained(out / "runs" / "no_hfi" / "export").config.options.high_frequency_injection
    assert not from_pretrained(out / "runs" / "no_pixrec" / "export").config.options.pixel_reconstruction
    assert json.loads((out / "runs" / "ft_und" / "DONE").read_text())["step"] == 1
    assert json.loads((out / "bench" / "base" / "shapes_bench.json").read_text())["config"]["steps"] == 2
    assert (out / "ablations.png").stat().st_size > 0 and "## (a) high-frequency" in (
        out / "ablations.md"
    ).read_text()
    # A rerun reuses every finished run and every cached score.
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/export/model.safetensors")}
    run_ablations(cfg, out)
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/export/model.safetensors")} == before


def test_the_cli_lists_the_same_pairs_without_importing_the_trainer():
    import subprocess
    import sys

    from cheers.eval.ablations import PAIRS
    from cheers.eval.cli import ABLATION_PAIRS

    assert ABLATION_PAIRS == PAIRS
    code = "import sys, cheers.cli; cheers.cli.build_parser(); print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
