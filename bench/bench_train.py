"""Training throughput: samples/s of the real training loop (data pipeline included) on ShapesWorld data.

CPU: the ``tiny`` preset (128 px; ``--preset``), one process, with the VAE decoders' and ViT's convolutions in
the default memory format and then channels-last (``engine.channels_last``), the ratio printed. CUDA (when
present): the ``official`` preset (2.57 B parameters, 512 px, random weights), bf16 autocast, FSDP2 on one
GPU, all groups but the VAE trained; also the peak GPU memory. Each configuration runs ``--warmup`` steps,
then ``--steps`` measured steps; the reported number is the median of the measured steps' samples/s. The
FLOPs of one optimizer step (forward and backward, counted on the last warm-up step) give the achieved
TFLOP/s and the model-FLOPs utilisation against a large matmul measured in the same run on the same device
and dtype (``--no-flops`` skips the count).

    python bench/bench_train.py                          # CPU tiny (and official on CUDA when available)
    python bench/bench_train.py --cpu-only --micro-batch 8
    python bench/bench_train.py --cpu-only --preset tiny-shapes --precision bf16 --micro-batch 32 --steps 4
    python bench/bench_train.py --official-micro-batch 4 --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch

from cheers.flops import counting_flops
from cheers.training.config import recipe_from_dict
from cheers.training.loop import Trainer

ALL_BUT_VAE = ["pixel_decoder", "vision_encoder", "und_projector", "llm", "flow_head", "hfi_gate"]


def recipe(
    preset: str,
    micro: int,
    steps: int,
    workers: int,
    device: str,
    strategy: str,
    checkpointing: bool,
    precision: str = "auto",
    channels_last: bool = False,
):
    return recipe_from_dict(
        {
            "stage": "custom",
            "model": {"preset": preset},
            "data": {
                "processor": "shapes",
                "num_workers": workers,
                "sources": [
                    {"name": "und", "kind": "shapes", "task": "understanding", "ratio": 3, "size": 10_000},
                    {"name": "gen", "kind": "shapes", "task": "generation", "ratio": 6, "size": 10_000},
                    {"name": "text", "kind": "shapes", "task": "text", "ratio": 1, "size": 10_000},
                ],
            },
            "train": {
                "trainable": ALL_BUT_VAE,
                "lr": 1e-4,
                "steps": steps,
                "micro_batch": micro,
                "global_batch": micro,
                "warmup_ratio": 0.0,
            },
            "engine": {
                "device": device,
                "strategy": strategy,
                "gradient_checkpointing": checkpointing,
                "precision": precision,
                "channels_last": channels_last,
            },
            "checkpoint": {"every": 0, "at_end": False, "export": False},
            "log": {"every": 1, "progress": False, "tensorboard": False},
        }
    )


class CountingTrainer(Trainer):
    """The real trainer; counts the FLOPs of its ``count_at``-th optimizer step (0-based; None: none)."""

    def __init__(self, *args, count_at: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.count_at, self.calls, self.step_flops = count_at, 0, None

    def _step(self, *args, **kwargs):
        index, self.calls = self.calls, self.calls + 1
        if index != self.count_at:
            return super()._step(*args, **kwargs)
        with counting_flops() as counter:
            metrics = super()._step(*args, **kwargs)
        self.step_flops = counter.get_total_flops()
        return metrics


def matmul_peak(device: str, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n x n matmul on ``device`` in ``dtype``, best of 5 (the MFU denominator)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    best = float("inf")
    for _ in range(5):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def measure(label: str, r, warmup: int, count: bool) -> float:
    count_at = warmup - 1 if count and warmup > 0 else None  # a warm-up step: the counting slows it down
    with tempfile.TemporaryDirectory() as out:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer = CountingTrainer(r, out, count_at=count_at)
        history = trainer.run().history
        total = time.perf_counter() - start
    rates = [h["samples_per_s"] for h in history[warmup:]]
    rate = statistics.median(rates)
    line = (
        f"{label:<44} micro-batch {r.train.micro_batch:>2}: {rate:8.2f} samples/s "
        f"({1 / rate * r.train.global_batch:6.3f} s/step; run incl. setup {total:5.1f} s)"
    )
    if torch.cuda.is_available() and r.engine.device != "cpu":
        line += f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    print(line, flush=True)
    if trainer.step_flops:
        device = "cpu" if r.engine.device == "cpu" else "cuda"
        dtype, n = (torch.float32, 2048) if device == "cpu" else (torch.bfloat16, 8192)
        peak = matmul_peak(device, dtype, n)
        achieved = trainer.step_flops * rate / r.train.global_batch
        print(
            f"{'':<44} {trainer.step_flops / 1e9:.2f} GFLOP per optimizer step (forward + backward), "
            f"{achieved / 1e12:.3f} TFLOP/s achieved; MFU {100 * achieved / peak:.1f} % of a {n}x{n} "
            f"{str(dtype).removeprefix('torch.')} matmul measured now ({peak / 1e12:.3f} TFLOP/s)",
            flush=True,
        )
    elif count:
        print(f"{'':<44} FLOPs not counted: pass --warmup 1 or more (the counted step is a warm-up step)")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="measured steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=4, help="CPU micro batch")
    ap.add_argument("--preset", default="tiny", help="CPU preset (tiny-shapes: the bundled model's)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="CPU precision")
    ap.add_argument("--workers", type=int, default=1, help="data-loader workers")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads on the CPU")
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--official-micro-batch", type=int, default=4)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on the official run")
    ap.add_argument("--no-flops", action="store_true", help="do not count FLOPs (no MFU line)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    total = args.warmup + args.steps
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'}"
    )
    cpu = {"fp32": "fp32", "bf16": "bf16 autocast"}[args.precision]
    rates = [
        measure(
            f"{args.preset} preset, CPU, {cpu}, one process{', channels-last' if last else ''}",
            recipe(
                args.preset,
                args.micro_batch,
                total,
                args.workers,
                "cpu",
                "single",
                False,
                args.precision,
                last,
            ),
            args.warmup,
            not args.no_flops and not last,
        )
        for last in (False, True)
    ]
    print(f"{'':<44} channels-last decoder and ViT convolutions: {rates[1] / rates[0]:.2f}x the samples/s")
    if torch.cuda.is_available() and not args.cpu_only:
        measure(
            "official preset, CUDA, bf16 autocast, FSDP2 x1",
            recipe(
                "official",
                args.official_micro_batch,
                total,
                max(args.workers, 8),
                "cuda",
                "fsdp",
                args.gradient_checkpointing,
            ),
            args.warmup,
            not args.no_flops,
        )


if __name__ == "__main__":
    main()
