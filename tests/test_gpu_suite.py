"""``bash bench/gpu_suite.sh --cpu`` runs end to end and prints every row of the GPU check's table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from gpu_suite import BUDGETS, expected_rows, group  # noqa: E402

# rows that --cpu cannot measure, and what they say instead
NOT_ON_CPU = {
    ("t2i", "compiled s/image"): "skipped",
    ("t2i", "compiled TFLOP/s"): "skipped",
    ("t2i", "CUDA graphs s/image"): "skipped",
    ("t2i", "CUDA graphs TFLOP/s"): "skipped",
    ("decode", "batch 1 static+graph tokens/s"): "skipped",
    ("decode", "batch 8 static+graph tokens/s"): "skipped",
    ("train", "full MFU %"): "n/a",  # no bf16 peak for a CPU
}


def as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


@pytest.mark.slow
def test_gpu_suite_cpu_mode_prints_every_row(tmp_path):
    rows_file = tmp_path / "rows.json"
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_suite.sh"), "--cpu", "--json", str(rows_file)],
        capture_output=True,
        text=True,
        timeout=1500,  # a minute idle; the sections' limits are generous for a shared CPU
        cwd=tmp_path,  # the script finds the checkout itself
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "| section | measurement | value | note |" in lines
    printed = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and line.startswith("| ") and cells[0] != "section":
            printed[(cells[0], cells[1])] = cells[2]
    rows = {(r[0], r[1]): r[2] for r in json.loads(rows_file.read_text())["rows"]}
    expected = [(group(s), m) for s in BUDGETS for m in expected_rows(s)]
    assert sorted(printed) == sorted(rows) == sorted(expected)
    for key in expected:
        value = printed[key]
        if key in NOT_ON_CPU:
            assert value.startswith(NOT_ON_CPU[key]), (key, value)
        else:
            number = as_number(value)
            assert number is not None and number >= 0, (key, value, proc.stderr[-2000:])
            assert isinstance(rows[key], (int, float)), (key, rows[key])
    for key in [k for k in expected if k[1].endswith(("s/image", "tokens/s", "samples/s", "GiB"))]:
        if key not in NOT_ON_CPU:
            assert as_number(printed[key]) > 0, key
