"""Training throughput: samples/s of the real training loop (data pipeline included) on ShapesWorld data.

CPU: the ``tiny`` preset (128 px), one process. CUDA (when present): the ``official`` preset (2.57 B parameters,
512 px, random weights), bf16 autocast, FSDP2 on one GPU, all groups but the VAE trained; also the peak GPU
memory. Each configuration runs ``--warmup`` steps, then ``--steps`` measured steps; the reported number is the
median of the measured steps' samples/s.

    python bench/bench_train.py                          # CPU tiny (and official on CUDA when available)
    python bench/bench_train.py --cpu-only --micro-batch 8
    python bench/bench_train.py --official-micro-batch 4 --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch

from cheers.training.config import recipe_from_dict
from cheers.training.loop import Trainer

ALL_BUT_VAE = ["pixel_decoder", "vision_encoder", "und_projector", "llm", "flow_head", "hfi_gate"]


def recipe(preset: str, micro: int, steps: int, workers: int, device: str, strategy: str, checkpointing: bool):
    return recipe_from_dict({
        "stage": "custom",
        "model": {"preset": preset},
        "data": {"processor": "shapes", "num_workers": workers, "sources": [
            {"name": "und", "kind": "shapes", "task": "understanding", "ratio": 3, "size": 10_000},
            {"name": "gen", "kind": "shapes", "task": "generation", "ratio": 6, "size": 10_000},
            {"name": "text", "kind": "shapes", "task": "text", "ratio": 1, "size": 10_000}]},
        "train": {"trainable": ALL_BUT_VAE, "lr": 1e-4, "steps": steps, "micro_batch": micro,
                  "global_batch": micro, "warmup_ratio": 0.0},
        "engine": {"device": device, "strategy": strategy, "gradient_checkpointing": checkpointing},
        "checkpoint": {"every": 0, "at_end": False, "export": False},
        "log": {"every": 1, "progress": False, "tensorboard": False},
    })


def measure(label: str, r, warmup: int) -> None:
    with tempfile.TemporaryDirectory() as out:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        history = Trainer(r, out).run().history
        total = time.perf_counter() - start
    rates = [h["samples_per_s"] for h in history[warmup:]]
    line = (f"{label:<44} micro-batch {r.train.micro_batch:>2}: {statistics.median(rates):8.2f} samples/s "
            f"({1 / statistics.median(rates) * r.train.micro_batch:6.3f} s/step; run incl. setup {total:5.1f} s)")
    if torch.cuda.is_available() and r.engine.device != "cpu":
        line += f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="measured steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=4, help="CPU tiny micro batch")
    ap.add_argument("--workers", type=int, default=1, help="data-loader workers")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads on the CPU")
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--official-micro-batch", type=int, default=4)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on the official run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    total = args.warmup + args.steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'}")
    measure("tiny preset, CPU, fp32, one process", recipe("tiny", args.micro_batch, total, args.workers, "cpu",
                                                          "single", False), args.warmup)
    if torch.cuda.is_available() and not args.cpu_only:
        measure("official preset, CUDA, bf16 autocast, FSDP2 x1",
                recipe("official", args.official_micro_batch, total, max(args.workers, 8), "cuda", "fsdp",
                       args.gradient_checkpointing), args.warmup)


if __name__ == "__main__":
    main()
