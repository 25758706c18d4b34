"""What every image benchmark runner shares: sharding, seeds, atomic writes and the run manifest.

* Sharding. ``torchrun --nproc_per_node K`` (or any launcher) sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``;
  rank r takes the prompts i with ``i % WORLD_SIZE == r``. No process group is started: the ranks never
  talk, so a run may also be split by hand (``RANK=0 WORLD_SIZE=2 ... &  RANK=1 WORLD_SIZE=2 ...``).
* Seeds. Image k of prompt i is drawn from a CPU ``torch.Generator`` seeded ``seed + 1000 * i + k``
  (:data:`SEED_RULE`), exactly as ``pipe.generate(prompt, generator=torch.Generator().manual_seed(s))``
  draws it: the release's dummy prefix image(s) first, then the start noise. The noise is drawn on the CPU
  and handed to the pipeline, so an image does not depend on the device, the rank or the batch it was in
  (up to float rounding).
* Resuming. Every file is written atomically (:mod:`cheers.atomic`: a temporary name, fsync, ``os.replace``),
  so an image that exists is complete; a restarted run skips it and clears the temporary files a killed one
  left (:func:`remove_stale_temps`). ``manifest.json`` (written by the first process to start) records
  the model and every setting that changes the images; every process checks it, so a restart with other
  settings raises instead of mixing two runs in one folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from cheers import atomic
from cheers.pipeline import format_prompt  # one templating rule for every caller

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SEED_STRIDE = 1000
SEED_RULE = "image k of prompt i: torch.Generator().manual_seed(seed + 1000 * i + k)"


# -- sharding --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """This process's share of a run: prompts i with ``i % world_size == rank``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(
                f"need 0 <= rank < world_size and local_rank >= 0, got rank={self.rank}, "
                f"world_size={self.world_size}, local_rank={self.local_rank}"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Shard:
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (as torchrun sets them; all default to one
        process)."""
        env = os.environ if env is None else env
        values = {}
        for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", None)):
            text = env.get(key, default)
            if text is None:
                continue
            try:
                values[key] = int(text)
            except ValueError:
                raise ValueError(f"environment variable {key} must be an integer, got {text!r}") from None
        rank, world = values["RANK"], values["WORLD_SIZE"]
        return cls(rank, world, values.get("LOCAL_RANK", rank))

    def owns(self, index: int) -> bool:
        return index % self.world_size == self.rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_device(device: str, env: Mapping[str, str] | None = None) -> str:
    """The device of this process: under a launcher (``LOCAL_RANK`` set), ``auto``/``cuda`` become
    ``cuda:LOCAL_RANK``. Reads only ``LOCAL_RANK``: VLMEvalKit hides ``WORLD_SIZE`` while it builds models."""
    env = os.environ if env is None else env
    local = env.get("LOCAL_RANK")
    if local is not None and device in ("auto", "cuda") and torch.cuda.is_available():
        try:
            index = int(local)
        except ValueError:
            raise ValueError(f"environment variable LOCAL_RANK must be an integer, got {local!r}") from None
        return f"cuda:{index % torch.cuda.device_count()}"
    return device


# -- settings and seeds ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingSettings:
    """Text-to-image settings of a benchmark run (``None``: the model's default, resolved before the run).

    ``prompt_template`` is a ``str.format`` pattern applied to each benchmark prompt: ``{prompt}`` is the
    prompt as written, ``{sentence}`` the prompt with a capital first letter and a final full stop.
    ``batch_size`` (images per pipeline call) does not change the images, only the speed.
    """

    num_images: int = 4
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    shift: float | None = None
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    seed: int = 0
    prompt_template: str = "{prompt}"
    batch_size: int = 4
    solver: str | None = None
    guidance_interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        from cheers.sampling import check_guidance_interval, check_solver

        if self.solver is not None:
            check_solver(self.solver)
        object.__setattr__(
            self, "guidance_interval", check_guidance_interval(self.guidance_interval)
        )  # frozen
        if not 1 <= self.num_images <= SEED_STRIDE:
            raise ValueError(
                f"num_images must be in [1, {SEED_STRIDE}] (seeds are seed + 1000 * i + k), "
                f"got {self.num_images}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        try:
            format_prompt(self.prompt_template, "a test prompt")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"prompt_template must be a str.format pattern using only {{prompt}} / {{sentence}}, "
                f"got {self.prompt_template!r} ({err})"
            ) from None

    def resolved(self, pipe) -> SamplingSettings:
        """The settings with the pipeline's defaults filled in (what the manifest records)."""
        d, size = pipe.defaults, pipe.processor.image_size
        return replace(
            self,
            num_inference_steps=d.num_inference_steps
            if self.num_inference_steps is None
            else self.num_inference_steps,
            guidance_scale=d.guidance_scale if self.guidance_scale is None else self.guidance_scale,
            shift=d.shift if self.shift is None else self.shift,
            solver=d.solver if self.solver is None else self.solver,
            guidance_interval=d.guidance_interval
            if self.guidance_interval is None
            else self.guidance_interval,
            height=self.height or size,
            width=self.width or size,
        )

    def identity(self) -> dict[str, Any]:
        """The fields that change the images (batch_size does not)."""
        out = asdict(self)
        out.pop("batch_size")
        if out["guidance_interval"] is not None:
            out["guidance_interval"] = list(out["guidance_interval"])  # as JSON reads it back
        return out


def image_seed(base: int, index: int, k: int) -> int:
    """The seed of image ``k`` of prompt ``index`` (see :data:`SEED_RULE`)."""
    return base + SEED_STRIDE * index + k


def seeded_noise(
    pipe,
    seeds: Sequence[int],
    height: int | None = None,
    width: int | None = None,
    negative_prompt: bool = False,
) -> tuple[list[torch.Generator], torch.Tensor]:
    """What a single seeded run draws, made on the CPU for any device: per seed a fresh CPU generator (for
    the pipeline's dummy prefix image) and the start noise that follows the dummy image(s) in its stream.

    Pass both to ``pipe.generate(generator=..., latents=...)``: image b then equals
    ``pipe.generate(prompt, generator=torch.Generator().manual_seed(seeds[b]))`` on the CPU, and the noise
    is the same on a GPU (where the pipeline could not use a CPU generator itself).

    Returns:
        (generators, latents (n, C, h, w)).
    """
    size = pipe.processor.image_size
    patch = pipe.model.config.patch_size
    shape = (
        pipe.model.config.latent_channels,
        (height or size) // patch,
        (width or size) // patch,
    )  # (C, h, w)
    noise = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        for _ in range(2 if negative_prompt else 1):  # the pipeline draws a dummy image per prompt branch
            pipe.processor.dummy_image(g)
        noise.append(torch.randn(shape, generator=g))
    return [torch.Generator().manual_seed(seed) for seed in seeds], torch.stack(noise)  # (n, C, h, w)


def seeded_images(pipe, prompt: str, seeds: Sequence[int], settings: SamplingSettings) -> list[Image.Image]:
    """Generate one image per seed for ``prompt``, each equal to its own seeded single run
    (:func:`seeded_noise`).

    Args:
        pipe: a CheersPipeline.
        prompt: the text given to the model (already templated).
        seeds: one seed per image (see :func:`image_seed`).
        settings: resolved settings (:meth:`SamplingSettings.resolved`).
    """
    s = settings
    images: list[Image.Image] = []
    for start in range(0, len(seeds), s.batch_size):
        chunk = seeds[start : start + s.batch_size]
        generators, latents = seeded_noise(pipe, chunk, s.height, s.width, s.negative_prompt is not None)
        out = pipe.generate(
            prompt,
            negative_prompt=s.negative_prompt,
            num_images_per_prompt=len(chunk),
            height=s.height,
            width=s.width,
            num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale,
            shift=s.shift,
            solver=s.solver,
            guidance_interval=s.guidance_interval,
            generator=generators,
            latents=latents,
            output_type="pil",
        )
        images.extend(out.images)
    return images


# -- files ---------------------------------------------------------------------------------------------------
write_text_atomic = atomic.write_text  # (path, text): whole or absent
remove_stale_temps = atomic.remove_temps  # (directory, name=None): what killed writers left


def save_png_atomic(image: Image.Image, path: Path, metadata: dict[str, Any] | None = None) -> None:
    """Write ``image`` as PNG atomically (``metadata`` as JSON in its ``cheers`` text chunk): ``path`` is
    whole or absent."""
    info = None
    if metadata is not None:
        info = PngInfo()
        info.add_text("cheers", json.dumps(metadata, default=str))
    atomic.write_with(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def text_sha256(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()


# -- manifest ------------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    import cheers

    out = {"cheers": cheers.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # transformers is a dependency; this only guards odd environments
        pass
    return out


def model_identity(name: str) -> str:
    """A stable name for a model: an existing local directory as its absolute path, anything else as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else str(name)


def build_manifest(
    benchmark: str, model: str, pipe, settings: SamplingSettings, prompts: dict[str, Any], shard: Shard
) -> dict[str, Any]:
    """The run record. ``benchmark``, ``model``, ``dtype``, ``prompts``, ``settings`` and ``seed_rule`` must
    match on resume; ``versions``, ``created`` and ``world_size`` are information."""
    return {
        "benchmark": benchmark,
        "model": model,
        "dtype": str(next(pipe.model.parameters()).dtype).removeprefix("torch."),
        "prompts": prompts,
        "settings": settings.identity(),
        "seed_rule": SEED_RULE,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "world_size": shard.world_size,
    }


CHECKED_KEYS = ("benchmark", "model", "dtype", "prompts", "settings", "seed_rule")


def manifest_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two manifests in the keys that must match."""
    out = []
    for key in CHECKED_KEYS:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    out.append(f"{key}.{sub}: {a.get(sub)!r} in the run, {b.get(sub)!r} now")
        elif a != b:
            out.append(f"{key}: {a!r} in the run, {b!r} now")
    return out


def prepare_run(outdir: Path, manifest: dict[str, Any], shard: Shard) -> None:
    """Write ``outdir/manifest.json`` if it is absent, then check it against ``manifest``.

    The first process to get there writes it (usually rank 0; ranks may also be started one by one), with an
    atomic create-if-absent, so concurrent ranks never overwrite each other; every process then checks it.

    Raises:
        ValueError: the folder holds a run with other settings.
    """
    path = outdir / MANIFEST
    if not path.is_file():
        # does nothing if another rank created it meanwhile; on a filesystem without hard links rank 0 writes
        atomic.create_json(path, manifest, replace_without_links=shard.is_main)
        if not path.is_file():
            return
    old = json.loads(path.read_text(encoding="utf-8"))
    diffs = manifest_differences(old, manifest)
    if diffs:
        raise ValueError(
            f"{outdir} holds a {old.get('benchmark')} run with other settings; use another "
            "output folder or the run's settings:\n  " + "\n  ".join(diffs)
        )
    if old.get("versions") != manifest["versions"]:
        logger.warning("resuming a run made with %s using %s", old.get("versions"), manifest["versions"])


@dataclass
class RunSummary:
    """What one process did: items (prompts or grids) generated now, found done, and owned in all."""

    outdir: Path
    generated: int = 0
    skipped: int = 0
    owned: int = 0
    images: int = 0
    seconds: float = 0.0

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.images if self.images else math.nan


def progress_bar(total: int, desc: str, shard: Shard, enabled: bool):
    """A tqdm bar on rank 0 only (the ranks' bars would overwrite each other in one terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not (enabled and shard.is_main), dynamic_ncols=True)
