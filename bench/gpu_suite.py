"""The GPU check of issue #21: one run, one table, inside 8 minutes on one H100 / H200.

Rows (random weights at the ``official`` preset's sizes, bf16; timing does not depend on the values):

* text-to-image at 512 px, 80 steps, guidance 3: s/image and achieved TFLOP/s against the FLOPs counted
  with FlopCounterMode (at 2 and 4 steps, linear in the steps) — eager; with the step's fixed-shape parts
  (tokenizer-side VAE decoder, both flow heads) compiled by torch.compile; with those parts replayed from
  CUDA graphs (the LLM's step, on a growing KV cache, stays eager in both);
* understanding decode tokens/s at batch 1 and 8: dynamic cache, static cache, static cache + CUDA graph;
* a training step (all groups but the VAE; float32 weights, bf16 autocast, AdamW): samples/s, TFLOP/s, MFU
  against the GPU's dense bf16 peak (by device name; n/a when unknown) and peak memory; a LoRA step's
  samples/s and peak memory;
* peak memory (CUDA allocator, absolute) of a pipeline text-to-image call and a short chat: bf16, int8
  weights, model CPU offload;
* tests/test_cuda.py (bf16 against float32, int8 and offload on CUDA).

Each section runs in its own process under a hard time limit: a section that fails or runs out of time
gives error rows and the others still run. ``--cpu``: the reduced run (``tiny`` preset, 4 steps, 128 px, on
the CPU; the compiled and CUDA-graph rows skipped), about a minute, so the script is known to work before a
GPU sees it.

    bash bench/gpu_suite.sh            # on a GPU machine
    bash bench/gpu_suite.sh --cpu      # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROW = "GPU_SUITE_ROW\t"
TOTAL_S = 465  # the whole run's limit, from the driver's start (8 minutes, less the table)
# (section, hard limit in seconds on a GPU, on the CPU: generous, a shared CPU can be slow); t2i-compile runs
# last and gets what is left
BUDGETS = {
    "t2i": (60, 240),
    "decode": (40, 240),
    "train": (75, 240),
    "memory-plain": (30, 180),
    "memory-int8": (30, 180),
    "memory-offload": (45, 180),
    "cuda-tests": (45, 180),
    "t2i-compile": (150, 0),
}
GROUPS = {"t2i-compile": "t2i", "cuda-tests": "tests"}  # the table's section column; memory-* -> memory


def expected_rows(section: str, batches: tuple[int, ...] = (1, 8)) -> list[str]:
    """The measurements a section reports (an error or a time-out fills the missing ones)."""
    if section == "t2i":
        return ["eager s/image", "eager TFLOP/s", "CUDA graphs s/image", "CUDA graphs TFLOP/s"]
    if section == "t2i-compile":
        return ["compiled s/image", "compiled TFLOP/s"]
    if section == "decode":
        return [f"batch {b} {c} tokens/s" for b in batches for c in ("dynamic", "static", "static+graph")]
    if section == "train":
        return [
            "full samples/s",
            "full TFLOP/s",
            "full MFU %",
            "full peak GiB",
            "LoRA samples/s",
            "LoRA peak GiB",
        ]
    if section.startswith("memory-"):
        mode = section.removeprefix("memory-")
        return [f"{mode} t2i peak GiB", f"{mode} chat peak GiB"]
    if section == "cuda-tests":
        return ["tests/test_cuda.py passed"]
    raise ValueError(f"unknown section {section!r}")


# the table's order: text-to-image eager, compiled, CUDA graphs; then the rest in BUDGETS' order
ORDER = [
    ("t2i", "eager s/image"),
    ("t2i", "eager TFLOP/s"),
    ("t2i", "compiled s/image"),
    ("t2i", "compiled TFLOP/s"),
    ("t2i", "CUDA graphs s/image"),
    ("t2i", "CUDA graphs TFLOP/s"),
]


def group(section: str) -> str:
    return GROUPS.get(section, "memory" if section.startswith("memory-") else section)


# -- one section (the worker process) ------------------------------------------------------------------------


def run_section(name: str, cpu: bool) -> None:
    from _gpu_sections import SECTIONS, Settings

    def emit(measurement: str, value, note: str = "") -> None:
        if isinstance(value, float):
            value = round(value, 4)
        print(ROW + json.dumps({"measurement": measurement, "value": value, "note": note}), flush=True)

    SECTIONS[name](Settings.for_mode(cpu), emit)


# -- the driver ----------------------------------------------------------------------------------------------


def spawn(section: str, cpu: bool, limit: float) -> tuple[list[dict], str | None, float]:
    """Run one section in its own process group, killed at ``limit`` seconds: (rows, error or None, s)."""
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--section", section] + (
        ["--cpu"] if cpu else []
    )
    tic = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    rows: list[dict] = []
    tail: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            if line.startswith(ROW):
                rows.append(json.loads(line[len(ROW) :]))
            else:
                print(f"[{section}] {line}", end="", file=sys.stderr, flush=True)
                if line.strip():
                    tail[:] = (tail + [line.strip()])[-5:]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    error = None
    try:
        proc.wait(timeout=max(limit, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the section and whatever it started (compile workers, pytest)
        proc.wait()
        error = f"timed out after {limit:.0f} s"
    reader.join(10)
    if error is None and proc.returncode != 0:
        error = tail[-1] if tail else f"exit status {proc.returncode}"
    return rows, error, time.perf_counter() - tic


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def print_table(table: list[tuple[str, str, object, str]], header: str) -> None:
    print(header)
    print("| section | measurement | value | note |")
    print("|---|---|---:|---|")
    for section, measurement, value, note in table:
        text = f"{value:.4g}" if is_number(value) and not isinstance(value, int) else str(value)
        if is_number(value) and value >= 1000:
            text = f"{value:,.0f}"
        note = " ".join(str(note).replace("|", "/").split())  # one table cell
        print(f"| {section} | {measurement} | {text} | {note} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the reduced run on the CPU (tiny preset, ~1 minute)")
    ap.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    ap.add_argument(
        "--total",
        type=float,
        default=None,
        help=f"seconds for the whole run (default {TOTAL_S}; --cpu: 1500)",
    )
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.section:
        run_section(args.section, args.cpu)
        return
    start = time.perf_counter()
    import torch

    sections = [s for s in (args.only.split(",") if args.only else BUDGETS) if s]
    unknown = sorted(set(sections) - set(BUDGETS))
    if unknown:
        ap.error(f"unknown sections {unknown}; known: {list(BUDGETS)}")
    if not args.cpu and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU machine, or pass --cpu for the reduced run")
    device = "CPU (--cpu: tiny preset, reduced)" if args.cpu else torch.cuda.get_device_name()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = f"gpu_suite: {device}; torch {torch.__version__}; {when}"
    print(header, file=sys.stderr, flush=True)
    results: dict[tuple[str, str], tuple[object, str]] = {}
    spent = []
    for section in sections:
        gpu_limit, cpu_limit = BUDGETS[section]
        expected = expected_rows(section)
        if args.cpu and section == "t2i-compile":
            for m in expected:
                results[(group(section), m)] = ("skipped", "--cpu: torch.compile is measured on the GPU run")
            continue
        left = (args.total or (1500 if args.cpu else TOTAL_S)) - (time.perf_counter() - start)
        limit = min(cpu_limit if args.cpu else gpu_limit, left)
        if limit < 5:
            rows, error, seconds = [], "not run: the suite's time was spent", 0.0
        else:
            rows, error, seconds = spawn(section, args.cpu, limit)
        spent.append(f"{section} {seconds:.0f} s")
        for row in rows:
            results[(group(section), row["measurement"])] = (row["value"], row["note"])
        for m in expected:
            if (group(section), m) not in results:
                results[(group(section), m)] = ("error", error or "the section did not report it")
        print(f"[{section}] {seconds:.1f} s{f': {error}' if error else ''}", file=sys.stderr, flush=True)
    order = ORDER + [(group(s), m) for s in BUDGETS for m in expected_rows(s) if (group(s), m) not in ORDER]
    keys = [k for k in order if k in results] + [k for k in results if k not in order]
    table = [(k[0], k[1], *results[k]) for k in keys]
    total = time.perf_counter() - start
    print_table(table, f"{header}; total {total:.0f} s ({', '.join(spent)})")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"header": header, "total_s": total, "rows": [list(r) for r in table]}, indent=1)
        )


if __name__ == "__main__":
    main()
