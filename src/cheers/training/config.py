"""Training recipes: typed, strict YAML with command-line overrides.

A recipe is one YAML file with the sections below (every key optional; unknown keys raise with their path)::

    stage: "II"              # the paper's stage this recipe implements: "0" (VAE), I, II, III, IV or custom
    out: runs/stage2         # run directory (checkpoints, metrics.jsonl, export/)
    model:   {preset, overrides, dtype}
    init:    {from_release, llm, vision, vae}
    data:    {processor, sources: [{name, kind, task, ratio, path, image_root, ...}], cfg_dropout, ...}
    train:   {trainable, lr, schedule, warmup_ratio, steps, micro_batch, global_batch, grad_clip, ...}
    engine:  {strategy, precision, gradient_checkpointing, device, channels_last}
    checkpoint: {every, keep, export, export_dtype}
    log:     {every, progress, tensorboard, sample_every, score_every}
    lora:    {r, alpha, dropout, targets, init}   # optional: train LoRA adapters only (train.trainable empty)
    vae:     {...}           # stage 0 only

Recipes are found by name in the package (``cheers/training/recipes/NAME.yaml``) or by path. Overrides use
dotted paths, list items by index: ``train.lr=2e-5``, ``data.sources.0.path=/data/und.jsonl``,
``train.trainable=[llm,flow_head]``; values are parsed as YAML and then coerced to the field's type (so
``2e-5``, which YAML 1.1 reads as a string, becomes a float).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cheers.dataclass_loader import StrictLoader
from cheers.lora import DEFAULT_TARGETS, LoraSpec


class RecipeError(ValueError):
    """A recipe is missing, malformed, or has an unknown or invalid value (the message names its path)."""


# Recipes are written by people and overridden on the command line: numbers may arrive as text.
_LOADER = StrictLoader(RecipeError, "recipe", parse_text=True)


@dataclass
class ModelSection:
    """Architecture, when not starting from a release directory (``init.from_release`` brings its own)."""

    preset: str | None = "official"
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted CheersConfig fields
    dtype: str = "float32"  # dtype of the trained (master) weights


@dataclass
class InitSection:
    """Starting points: a release-layout directory, or separate pretrained parts (local directories)."""

    from_release: str | None = None
    llm: str | None = None  # Qwen2 / Qwen2.5 (Qwen2Model or Qwen2ForCausalLM safetensors + config.json)
    vision: str | None = None  # SigLIP (SiglipVisionModel or SiglipModel), a release directory, or "default"
    vae: str | None = None  # our stage-0 output, a BFL-named VAE, a release directory, or "default"
    # multiply the und_projector's output layer by this at the start (1 = as loaded). Not the release's: a
    # smaller factor brings image tokens back towards the text scale, where the prompt can reach them (#18).
    und_projector_scale: float = 1.0
    # parts drawn afresh (the preset's initialisation, seed train.seed) after loading: parameter groups
    # (train.trainable's names) or "llm_layers" (the LLM's decoder layers and final norm; embeddings kept).
    # Not the release's: a restart for a part whose learned routing is the problem (#18).
    reinitialize: list[str] = field(default_factory=list)


@dataclass
class SourceSpec:
    """One data source of the mixture.

    kinds: ``jsonl`` (release records + ``image_root``), ``shards`` (a directory of tar shards written by
    :func:`cheers.training.shards.write_shards`), ``shapes`` (ShapesWorld, generated on the fly).
    ``task`` says what the source holds (``understanding``, ``generation``, ``editing``, ``text``, ``mixed``);
    for ``shapes`` it chooses what is generated.
    """

    name: str = ""
    kind: str = "jsonl"
    task: str = "mixed"
    ratio: float = 1.0
    path: str | None = None
    image_root: str | None = None
    size: int = 100_000  # shapes: number of distinct samples (seeds) per epoch
    seed: int = 0  # shapes: first seed of the split
    options: dict[str, Any] = field(default_factory=dict)  # shapes: split, mix, world (see ShapesSource)

    KINDS = ("jsonl", "shards", "shapes")
    TASKS = ("understanding", "generation", "editing", "text", "mixed")


@dataclass
class DataSection:
    processor: str | None = None  # tokenizer directory, "shapes", or None (= init.from_release / init.llm)
    sources: list[SourceSpec] = field(default_factory=list)
    cfg_dropout: float = 0.2  # probability that a generation sample's ids become the unconditional ones
    # flow times of generation images: {kind: uniform} (the release) or {kind: logit_normal, loc, scale}
    time_sampling: dict[str, Any] = field(default_factory=lambda: {"kind": "uniform"})
    num_workers: int = 2
    prefetch_factor: int = 2
    max_corrupt_fraction: float = 0.01  # stop when more than this fraction of read samples was corrupt
    corrupt_grace: int = 200  # ... but only once this many samples were read
    max_retries: int = 16  # replacement draws for one corrupt position before giving up
    seed: int = 0


SCHEDULES = ("constant", "cosine", "wsd")


@dataclass
class TrainSection:
    trainable: list[str] = field(default_factory=list)  # Cheers.PARAMETER_GROUPS names
    lr: float = 1e-4
    schedule: str = "constant"  # constant | cosine | wsd (all after a linear warm-up)
    warmup_ratio: float = 0.02
    min_lr_ratio: float = 0.0  # floor of cosine and wsd, as a fraction of lr
    decay_ratio: float = 0.2  # wsd: the last fraction of steps, over which the lr falls linearly to the floor
    steps: int = 1000  # optimizer steps (the upper bound when minutes is set)
    minutes: float = 0.0  # > 0: fit the run (schedule included) to this many minutes of training steps
    micro_batch: int = 1  # samples per forward, per process
    global_batch: int = 1  # samples per optimizer step over all processes (accumulation fills the gap)
    weight_decay: float = 0.0
    # per-group lr factors, e.g. {und_projector: 0.1}; not the release's (one lr for every group). A slower
    # und_projector keeps image tokens near the text scale so the prompt reaches the image states (issue #18).
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    flow_loss_weight: float = 1.0  # lambda in L_AR + lambda * L_FM
    # > 0: keep an exponential moving average of the trainable weights (e.g. 0.999), checkpoint it and export
    # it instead of the last step's weights; not the release's recipe (cheers.training.ema)
    ema_decay: float = 0.0
    seed: int = 0
    max_nonfinite_steps: int = (
        5  # consecutive NaN/inf steps (each skipped) before the run stops with an error
    )


@dataclass
class EngineSection:
    strategy: str = "auto"  # auto | single | ddp | fsdp  (auto: single for one process, fsdp under torchrun)
    precision: str = "auto"  # auto | fp32 | bf16  (auto: bf16 autocast on CUDA, fp32 on CPU)
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda
    find_unused_parameters: bool = False  # DDP only
    channels_last: bool = False  # VAE decoders' and ViT's convs in NHWC (single / DDP)


CHANNELS_LAST_FSDP = "engine.channels_last works with the single and ddp strategies, not fsdp"
"""Also raised by the trainer when ``strategy: auto`` resolves to FSDP under torchrun."""


@dataclass
class CheckpointSection:
    every: int = 1000  # steps; 0 = only at the end
    at_end: bool = True  # also when the run (or a --stop-after slice) ends
    keep: int = 2  # most recent checkpoints kept
    export: bool = True  # write the release layout to <out>/export at the end
    export_dtype: str | None = None  # e.g. bfloat16; None keeps the training dtype
    max_shard_size: str = "5GB"


@dataclass
class LogSection:
    every: int = 10  # steps between logged metrics
    progress: bool = True
    tensorboard: bool = True  # used when torch.utils.tensorboard imports; metrics.jsonl is always written
    sample_every: int = 0  # steps between sample images (0 = off)
    score_every: int = 0  # steps between score hooks (0 = off)
    sample_steps: int = 20  # Euler steps of sample images
    sample_count: int = 4


@dataclass
class VAESection:
    """Stage 0: the small VAE (reconstruction + a small KL), then the BatchNorm latent statistics."""

    kl_weight: float = 1e-6
    fit_samples: int = 256  # images used to fit the latent statistics
    loss: str = "l1+l2"  # l1 | l2 | l1+l2


@dataclass
class LoraSection:
    """LoRA fine-tuning (:mod:`cheers.lora`): only the adapters train, every weight of the model stays frozen.

    ``train.trainable`` must then be empty. Checkpoints hold the adapter tensors only (a resumed run rebuilds
    the frozen base from the recipe's ``init`` / ``model`` sections); the export is the adapter in peft's
    layout at ``<out>/adapter`` instead of a whole model at ``<out>/export``.
    """

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: DEFAULT_TARGETS)  # regex or module names
    init: str | None = None  # an adapter directory (peft layout, same targets and rank) to continue from

    def spec(self) -> LoraSpec:
        """The :class:`cheers.lora.LoraSpec` of this section (raises ValueError on a bad value)."""
        return LoraSpec(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets)


@dataclass
class Recipe:
    stage: str = "custom"
    out: str = "runs/cheers"
    model: ModelSection = field(default_factory=ModelSection)
    init: InitSection = field(default_factory=InitSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    engine: EngineSection = field(default_factory=EngineSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    vae: VAESection = field(default_factory=VAESection)
    lora: LoraSection | None = None  # set: train LoRA adapters only (see LoraSection)

    STAGES = ("0", "I", "II", "III", "IV", "custom")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """Value checks that need more than one field; raises RecipeError naming the path."""
        t, d, e = self.train, self.data, self.engine
        if self.stage not in self.STAGES:
            raise RecipeError(f"stage: {self.stage!r} is not one of {self.STAGES}")
        for name in ("steps", "micro_batch", "global_batch"):
            if getattr(t, name) <= 0:
                raise RecipeError(f"train.{name} must be positive, got {getattr(t, name)}")
        if t.global_batch % t.micro_batch:
            raise RecipeError(
                f"train.global_batch ({t.global_batch}) must be a multiple of train.micro_batch "
                f"({t.micro_batch})"
            )
        if t.lr <= 0 or not 0 <= t.warmup_ratio < 1 or not 0 <= t.min_lr_ratio <= 1:
            raise RecipeError(
                f"train: need lr > 0, 0 <= warmup_ratio < 1, 0 <= min_lr_ratio <= 1; got "
                f"{t.lr}, {t.warmup_ratio}, {t.min_lr_ratio}"
            )
        if t.schedule == "wsd" and not 0 < t.decay_ratio <= 1 - t.warmup_ratio:
            raise RecipeError(
                f"train.decay_ratio: the wsd schedule needs 0 < decay_ratio <= 1 - warmup_ratio "
                f"({1 - t.warmup_ratio:g}); got {t.decay_ratio}"
            )
        if not 0 <= t.ema_decay < 1:
            raise RecipeError(f"train.ema_decay must be in [0, 1) (0: no average), got {t.ema_decay}")
        if t.ema_decay > 0 and e.strategy == "fsdp":
            raise RecipeError(
                "train.ema_decay is not supported with engine.strategy fsdp yet (the average would have to "
                "be sharded like the weights); use ddp or single, or set train.ema_decay: 0"
            )
        from cheers.training.optim import check_lr_multipliers  # imports the model (circular at module level)

        try:
            check_lr_multipliers(t.lr_multipliers)
        except ValueError as err:
            raise RecipeError(f"train.lr_multipliers: {err}") from None
        if t.schedule not in SCHEDULES:
            raise RecipeError(f"train.schedule: {t.schedule!r} is not one of {SCHEDULES}")
        if len(t.betas) != 2:
            raise RecipeError(f"train.betas must have two entries, got {t.betas}")
        if not 0 <= d.cfg_dropout <= 1 or not 0 <= d.max_corrupt_fraction <= 1:
            raise RecipeError("data.cfg_dropout and data.max_corrupt_fraction must be in [0, 1]")
        ts = d.time_sampling
        if not isinstance(ts, dict) or set(ts) - {"kind", "loc", "scale"}:
            raise RecipeError(f"data.time_sampling: want {{kind, loc, scale}}, got {ts!r}")
        # imports torch, so not at module level: the CLI's parser reads the packaged recipes' names
        from cheers.flow import sample_t

        try:
            sample_t(1, **ts)
        except (TypeError, ValueError) as err:
            raise RecipeError(f"data.time_sampling: {err}") from None
        names = [s.name for s in d.sources]
        if len(set(names)) != len(names):
            raise RecipeError(f"data.sources: names must be unique, got {names}")
        for i, s in enumerate(d.sources):
            where = f"data.sources.{i}"
            if s.kind not in SourceSpec.KINDS:
                raise RecipeError(f"{where}.kind: {s.kind!r} is not one of {SourceSpec.KINDS}")
            if s.task not in SourceSpec.TASKS:
                raise RecipeError(f"{where}.task: {s.task!r} is not one of {SourceSpec.TASKS}")
            if s.ratio <= 0 or float(s.ratio) != int(s.ratio):
                raise RecipeError(f"{where}.ratio must be a positive whole number, got {s.ratio}")
            if s.kind in ("jsonl", "shards") and not s.path:
                raise RecipeError(f"{where}.path is required for kind {s.kind!r}")
        if e.strategy not in ("auto", "single", "ddp", "fsdp"):
            raise RecipeError(f"engine.strategy: {e.strategy!r} is not auto, single, ddp or fsdp")
        if e.precision not in ("auto", "fp32", "bf16"):
            raise RecipeError(f"engine.precision: {e.precision!r} is not auto, fp32 or bf16")
        if e.device not in ("auto", "cpu", "cuda"):
            raise RecipeError(f"engine.device: {e.device!r} is not auto, cpu or cuda")
        if e.channels_last and e.strategy == "fsdp":
            raise RecipeError(CHANNELS_LAST_FSDP)
        if self.vae.loss not in ("l1", "l2", "l1+l2"):
            raise RecipeError(f"vae.loss: {self.vae.loss!r} is not l1, l2 or l1+l2")
        if not self.init.und_projector_scale > 0:
            raise RecipeError(f"init.und_projector_scale must be > 0, got {self.init.und_projector_scale}")
        if self.lora is not None:
            self._validate_lora()
        if self.init.from_release and (self.init.llm or self.init.vision or self.init.vae):
            raise RecipeError(
                "init.from_release brings every part; do not combine it with init.llm/vision/vae"
            )

    def _validate_lora(self) -> None:
        if self.stage == "0":
            raise RecipeError("lora: stage 0 trains the VAE from scratch; LoRA needs a stage I-IV or custom")
        if self.train.trainable:
            raise RecipeError(
                "train.trainable must be empty with a lora section (LoRA trains only the adapters and "
                f"freezes the rest), got {self.train.trainable}"
            )
        try:
            self.lora.spec()
        except ValueError as err:
            raise RecipeError(f"lora: {err}") from None


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Build and validate a :class:`Recipe` from plain data (unknown keys raise with their path)."""
    recipe = _LOADER.build(Recipe, data)
    recipe.validate()
    return recipe


# ------------------------------------------------------------------------------------------------------------
# overrides and files


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=2e-5"`` -> ``("train.lr", "2e-5")`` with the value parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {text!r} is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise RecipeError(f"override {text!r}: the value is not valid YAML ({err})") from None
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with dotted overrides applied (list items by index); the result is validated
    later."""
    data = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        *parents, leaf = key.split(".")
        node: Any = data
        walked = []
        for part in parents:
            walked.append(part)
            if isinstance(node, list):
                node = _list_item(node, part, walked)
                continue
            if not isinstance(node, dict):
                raise RecipeError(f"override {key}: {'.'.join(walked[:-1])} is not a mapping")
            node = node.setdefault(part, {})
            if node is None:
                node = _set_path(data, walked, {})
        if isinstance(node, list):
            index = _index(node, leaf, [*parents, leaf])
            node[index] = value
        elif isinstance(node, dict):
            node[leaf] = value
        else:
            raise RecipeError(f"override {key}: {'.'.join(parents)} is not a mapping")
    return data


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> Any:
    node = data
    for part in path[:-1]:
        node = node[part] if isinstance(node, dict) else node[int(part)]
    node[path[-1]] = value
    return value


def _index(items: list, part: str, walked: list[str]) -> int:
    try:
        index = int(part)
    except ValueError:
        raise RecipeError(f"{'.'.join(walked)}: {part!r} is not a list index") from None
    if not -len(items) <= index < len(items):
        raise RecipeError(
            f"{'.'.join(walked)}: index {index} is out of range (the list has {len(items)} items)"
        )
    return index


def _list_item(items: list, part: str, walked: list[str]) -> Any:
    return items[_index(items, part, walked)]


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path, or the name of a packaged recipe (``stage1``, ``tiny-shapes``...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = resources.files("cheers.training") / "recipes" / f"{name_or_path}.yaml"
    if packaged.is_file():
        return Path(str(packaged))
    raise RecipeError(
        f"no recipe file {str(name_or_path)!r} and no packaged recipe of that name; packaged: "
        f"{packaged_recipes()}"
    )


def packaged_recipes() -> list[str]:
    folder = resources.files("cheers.training") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | Path, overrides: list[str] | dict[str, Any] = ()) -> Recipe:
    """Read a recipe by name or path, apply ``--set`` overrides, build it strictly and validate it."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    try:
        return recipe_from_dict(apply_overrides(data, overrides))
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
