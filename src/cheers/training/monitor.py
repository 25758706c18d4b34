"""Watching a run: ``metrics.jsonl`` (always), TensorBoard (when it imports), a progress bar (rank 0)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
_BAR_KEYS = {
    "loss": "loss",
    "text_loss": "text",
    "image_loss": "flow",
    "lr": "lr",
    "grad_norm": "gnorm",
    "samples_per_s": "smp/s",
}


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the optional dependency (pip install "cheers[train]") is absent
        logger.info("TensorBoard is not installed: logging to %s only", METRICS)
        return None
    return SummaryWriter(log_dir=str(directory))


class Monitor:
    """Logs metrics of rank 0 (other ranks get a silent monitor).

    Args:
        run_dir: the run directory (``metrics.jsonl`` and ``tensorboard/`` go there).
        total_steps: for the progress bar.
        start_step: steps already done (resume); ``metrics.jsonl`` lines past it are dropped, because the
            resumed run writes them again.
        enabled: False on ranks other than 0.
        tensorboard, progress: the recipe's ``log`` switches.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS
        self.writer = None
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            self.writer = _tensorboard_writer(Path(run_dir) / "tensorboard")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                dynamic_ncols=True,
                disable=not sys.stderr.isatty() and os.environ.get("CHEERS_PROGRESS") != "1",
            )

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        """One line of ``metrics.jsonl`` and TensorBoard scalars (non-numbers go to the jsonl only)."""
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        self._file.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)
        if self.bar is not None and prefix == "train":
            self.bar.set_postfix(
                {short: _fmt(metrics[key]) for key, short in _BAR_KEYS.items() if key in metrics},
                refresh=False,
            )

    def set_total(self, total_steps: int) -> None:
        """The run's length changed (a time budget re-fitted it)."""
        if self.bar is not None and self.bar.total != total_steps:
            self.bar.total = total_steps
            self.bar.refresh()

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def add_image(self, tag: str, image, step: int) -> None:
        """An image (PIL) to TensorBoard, when it is on."""
        if self.writer is None:
            return
        import numpy as np

        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _jsonable(value: Any) -> Any:
    return str(value)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
