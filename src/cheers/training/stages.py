"""The paper's training stages as data (arXiv 2603.12793, Sec. "Training"), and the check that a recipe
follows one.

=====  ======================  ==================================  ====  ========  ========================
Stage  Name                    Trainable groups                    LR    Schedule  Mixture
=====  ======================  ==================================  ====  ========  ========================
0      VAE (ShapesWorld only)  vae encoder/decoder, then bn.fit    2e-4  constant  images
I      alignment               und_projector, flow_head, hfi_gate  1e-4  constant  und : gen = 1 : 1
II     general pre-training    all groups but ``vae``              1e-4  constant  und : gen : text = 3:6:1
III    refined pre-training    all groups but ``vae``              4e-5  constant  und : gen : text = 3:6:1
IV     SFT                     all groups but ``vae``              2e-5  cosine    und : gen = 1 : 1
=====  ======================  ==================================  ====  ========  ========================

Every stage: AdamW, linear warm-up over 2% of the steps, gradient clipping at 1.0, flow-loss weight 1.0,
the release's 0.2 CFG dropout of generation samples. Stage 0 is ours: no pretrained VAE exists for the
ShapesWorld model, so it trains one (see :mod:`cheers.training.vae_stage0`). Editing data counts as
generation in the mixture (it has a generation target).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from cheers.models.cheers import Cheers
from cheers.training.config import Recipe

logger = logging.getLogger(__name__)

ALL_BUT_VAE: tuple[str, ...] = tuple(g for g in Cheers.PARAMETER_GROUPS if g != "vae")
ALIGNMENT: tuple[str, ...] = ("und_projector", "flow_head", "hfi_gate")


@dataclass(frozen=True)
class StagePreset:
    """One row of the table above."""

    name: str
    title: str
    trainable: tuple[str, ...]
    lr: float
    schedule: str
    mixture: dict[str, int] = field(default_factory=dict)  # task -> ratio (editing counts as generation)
    warmup_ratio: float = 0.02
    grad_clip: float = 1.0
    flow_loss_weight: float = 1.0
    cfg_dropout: float = 0.2


PAPER_STAGES: dict[str, StagePreset] = {
    "I": StagePreset("I", "alignment", ALIGNMENT, 1e-4, "constant", {"understanding": 1, "generation": 1}),
    "II": StagePreset(
        "II",
        "general pre-training",
        ALL_BUT_VAE,
        1e-4,
        "constant",
        {"understanding": 3, "generation": 6, "text": 1},
    ),
    "III": StagePreset(
        "III",
        "refined pre-training",
        ALL_BUT_VAE,
        4e-5,
        "constant",
        {"understanding": 3, "generation": 6, "text": 1},
    ),
    "IV": StagePreset("IV", "SFT", ALL_BUT_VAE, 2e-5, "cosine", {"understanding": 1, "generation": 1}),
}


def stage_preset(name: str) -> StagePreset:
    try:
        return PAPER_STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; the paper's stages are {sorted(PAPER_STAGES)}") from None


def recipe_mixture(recipe: Recipe) -> dict[str, int]:
    """The recipe's ratio per task (editing folded into generation; ``mixed`` sources kept apart)."""
    out: dict[str, int] = {}
    for source in recipe.data.sources:
        task = "generation" if source.task == "editing" else source.task
        out[task] = out.get(task, 0) + int(source.ratio)
    return out


def _normalised(mix: dict[str, int]) -> dict[str, float]:
    total = sum(mix.values()) or 1
    return {k: v / total for k, v in sorted(mix.items())}


def deviations(recipe: Recipe) -> list[str]:
    """How ``recipe`` differs from the paper's preset for its ``stage`` (empty for a faithful recipe)."""
    if recipe.stage not in PAPER_STAGES:
        return []
    p, t = PAPER_STAGES[recipe.stage], recipe.train
    out = []
    if sorted(t.trainable) != sorted(p.trainable):
        out.append(f"train.trainable {sorted(t.trainable)} (paper: {sorted(p.trainable)})")
    for name in ("lr", "schedule", "warmup_ratio", "grad_clip", "flow_loss_weight"):
        if getattr(t, name) != getattr(p, name):
            out.append(f"train.{name} {getattr(t, name)} (paper: {getattr(p, name)})")
    if recipe.init.und_projector_scale != 1.0:
        out.append(f"init.und_projector_scale {recipe.init.und_projector_scale} (paper: 1)")
    if recipe.init.reinitialize:
        out.append(f"init.reinitialize {recipe.init.reinitialize} (paper: every part as loaded)")
    if t.lr_multipliers:
        out.append(
            f"train.lr_multipliers {dict(sorted(t.lr_multipliers.items()))} (paper: one lr for every group)"
        )
    if recipe.data.cfg_dropout != p.cfg_dropout:
        out.append(f"data.cfg_dropout {recipe.data.cfg_dropout} (paper: {p.cfg_dropout})")
    if recipe.data.time_sampling.get("kind", "uniform") != "uniform":
        out.append(f"data.time_sampling {recipe.data.time_sampling} (paper: uniform)")
    mix = recipe_mixture(recipe)
    if mix and "mixed" not in mix and _normalised(mix) != _normalised(p.mixture):
        out.append(f"data mixture {mix} (paper: {p.mixture})")
    return out


def log_deviations(recipe: Recipe) -> None:
    for line in deviations(recipe):
        logger.warning("stage %s recipe differs from the paper: %s", recipe.stage, line)
