"""ShapesBench: generation, understanding and editing of one model judged on ShapesWorld, in one run.

Three tasks, all on one held-out split's seeds (``test`` by default; tune settings on ``val``, report on
``test``), all judged by the deterministic scene parser:

* ShapesGenEval: ``n`` prompt specs per GenEval tag (``+ dense`` optionally) -> the GenEval runner (same
  layout, seeds and resuming, in ``<out>/geneval``) -> :func:`judge_geneval_folder`; plus the
  high-frequency fidelity of the images against renders of the specs' reference scenes; the same images
  judged against other prompts (what a prompt-blind generator scores); with ``dense``, the share of dense
  prompts whose named background colour is drawn; and the relative prompt gain (flow loss with another
  prompt over the own one, :mod:`cheers.eval.conditioning`) on ``prompt_gain_n`` held-out samples.
* ShapesVQA: ``n`` scenes (text in half of them, for OCR) and every question type that applies - colour,
  background, count, where, relation and exists (POPE-style balanced yes/no), OCR, multiple choice; greedy
  answers scored by :func:`score_vqa`.
* ShapesEdit: ``n`` (scene, instruction, target) triples; the edited image is scored by :func:`score_edit`.

Outputs in ``<out>``: ``shapes_bench.json`` (summaries and every item), ``report.md``, and contact sheets
``geneval_sheet.png`` / ``edit_sheet.png`` (each generated image framed green = pass, red = fail).
Prompts use the training format (``"<Sentence>.\\nBased on the above description, generate an image."``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from cheers.data.shapes import (
    GENEVAL_TAGS,
    PROMPT_TAGS,
    WorldConfig,
    contact_sheet,
    hf_fidelity,
    parse_image,
    render_scene,
    sample_edit,
    sample_generation,
    sample_scene,
    scene_questions,
    score_edit,
    score_spec,
    score_vqa,
    split_seeds,
    summarize_geneval,
)
from cheers.data.shapes.geneval_folder import judge_geneval_folder
from cheers.data.shapes.prompts import GEN_SUFFIX
from cheers.data.shapes.render import check_resolution

from .geneval import run_geneval, sample_path
from .report import shapes_markdown
from .runner import SamplingSettings, Shard, write_text_atomic

logger = logging.getLogger(__name__)

TASKS = ("geneval", "vqa", "edit")
PROMPT_TEMPLATE = "{sentence}" + GEN_SUFFIX
VQA_WORLD = WorldConfig(text_prob=0.5)
"""Scenes for ShapesVQA: the default world with text in half of them, so OCR gets enough questions."""
# Streams of the test split's seeds per task, so the tasks' scenes are independent of each other.
_VQA_STREAM, _EDIT_STREAM = 1, 2
PASS, FAIL = (40, 170, 60), (215, 40, 40)
HELD_OUT = ("test", "val")


@dataclass(frozen=True)
class ShapesBenchConfig:
    """What ShapesBench runs.

    n: prompts per tag (ShapesGenEval), scenes (ShapesVQA) and edits (ShapesEdit).
    tasks: a subset of TASKS. dense: add dense (DPG-like) prompts to GenEval's six tags.
    num_images, steps, guidance, shift, solver: text-to-image (None: the model's defaults).
    edit_steps, edit_guidance: editing (None: the model's defaults). max_new_tokens: VQA answers.
    resolution: side of the rendered input scenes (default: the processor's image size).
    chat_batch: questions per chat call.
    prompt_gain_n: held-out generation samples for the relative prompt gain (0, the default here: not
        measured; ``cheers eval shapes`` measures 64).
    split: the held-out seeds to draw from: "test" (scorecards) or "val" (for choosing settings).
    """

    n: int = 10
    tasks: tuple[str, ...] = TASKS
    dense: bool = False
    num_images: int = 4
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    solver: str | None = None
    edit_steps: int | None = None
    edit_guidance: float | None = None
    max_new_tokens: int = 16
    seed: int = 0
    resolution: int | None = None
    chat_batch: int = 8
    split: str = "test"
    prompt_gain_n: int = 0

    def __post_init__(self) -> None:
        if self.split not in HELD_OUT:
            raise ValueError(
                f"split must be one of {HELD_OUT} (the training split is not held out), got {self.split!r}"
            )
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.prompt_gain_n != 0 and self.prompt_gain_n < 2:
            raise ValueError(
                f"prompt_gain_n must be 0 (off) or >= 2 (prompts are swapped), got {self.prompt_gain_n}"
            )
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")


def run_shapes_bench(
    pipe, out: str | Path, config: ShapesBenchConfig | None = None, *, model_name: str, progress: bool = True
) -> dict[str, Any]:
    """Run the configured tasks and write the JSON, the markdown report and the contact sheets.

    Returns:
        The report dict written to ``shapes_bench.json``.
    """
    cfg = config or ShapesBenchConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = check_resolution(cfg.resolution or pipe.processor.image_size)
    report: dict[str, Any] = {"model": model_name, "config": asdict(cfg), "resolution": res, "seconds": {}}
    for task in cfg.tasks:
        started = time.perf_counter()
        if task == "geneval":
            report["geneval"] = shapes_geneval(pipe, out, cfg, model_name, progress)
        elif task == "vqa":
            report["vqa"] = shapes_vqa(pipe, cfg, res)
        else:
            report["edit"] = shapes_edit(pipe, out, cfg, res)
        report["seconds"][task] = round(time.perf_counter() - started, 2)
        logger.info("ShapesBench %s done in %.1fs", task, report["seconds"][task])
    write_text_atomic(out / "shapes_bench.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(out / "report.md", shapes_markdown(report))
    return report


# -- ShapesGenEval -------------------------------------------------------------------------------------------
def geneval_items(n: int, dense: bool = False, split: str = "test") -> list[tuple[dict[str, Any], Any]]:
    """(spec, reference scene) pairs: n per tag, the same ones as ``cheers shapes prompts --n n`` (test)."""
    tags = PROMPT_TAGS if dense else GENEVAL_TAGS
    seeds = split_seeds(split, n * len(tags))
    return [
        sample_generation(np.random.default_rng(int(seeds[i])), tags[i % len(tags)])
        for i in range(len(seeds))
    ]


def shapes_geneval(
    pipe, out: Path, cfg: ShapesBenchConfig, model_name: str, progress: bool
) -> dict[str, Any]:
    items = geneval_items(cfg.n, cfg.dense, cfg.split)
    prompt_file = out / "geneval_prompts.jsonl"
    write_text_atomic(prompt_file, "".join(json.dumps(spec) + "\n" for spec, _ in items))
    settings = SamplingSettings(
        num_images=cfg.num_images,
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance,
        shift=cfg.shift,
        solver=cfg.solver,
        seed=cfg.seed,
        prompt_template=PROMPT_TEMPLATE,
        batch_size=cfg.num_images,
    )
    folder = out / "geneval"
    run_geneval(pipe, folder, prompt_file, settings, model_name=model_name, shard=Shard(), progress=progress)
    verdicts, summary = judge_geneval_folder(folder)
    generated, tiles = [], []
    for v in verdicts:
        with Image.open(folder / v.index / "samples" / v.sample) as im:
            generated.append(im.convert("RGB"))
        tiles.append(mark(generated[-1], v.correct, f"{v.index} {v.tag}"))
    size = generated[0].size[0]
    references = [render_scene(scene, check_resolution(size)) for _, scene in items]
    contact_sheet(tiles, cols=max(cfg.num_images, 4)).save(out / "geneval_sheet.png")
    tags = len(PROMPT_TAGS if cfg.dense else GENEVAL_TAGS)
    indices = [int(v.index) for v in verdicts]
    gain = None
    if cfg.prompt_gain_n:
        from .conditioning import prompt_gain, shapes_generation_records

        gain = prompt_gain(
            pipe.model, pipe.processor, shapes_generation_records(cfg.prompt_gain_n, cfg.split)
        )
    return {
        "summary": summary,
        "overall_se": binomial_se(summary["overall"], len(verdicts)),
        "other_prompt": other_prompt_control(items, indices, generated, tags),
        "dense_background": dense_background(items, indices, generated, tags) if cfg.dense else None,
        "prompt_gain": None if gain is None else gain.as_dict(),
        "vae_ceiling": vae_ceiling(pipe.model.model.vae_model, items, references),
        "hf_fidelity": hf_fidelity(generated, references),
        "n_prompts": len(items),
        "n_images": len(verdicts),
        "folder": str(folder.relative_to(out)),
        "samples": [
            {
                **asdict(v),
                "reasons": list(v.reasons),
                "path": str(sample_path(folder, int(v.index), int(Path(v.sample).stem)).relative_to(out)),
            }
            for v in verdicts
        ],
    }


def other_prompt_control(
    items: list[tuple[dict[str, Any], Any]], indices: list[int], images: list[Image.Image], stride: int
) -> dict[str, float] | None:
    """ShapesGenEval of each image judged against *another* prompt of its tag (item ``index + stride``;
    prompts cycle through the tags, so the stride is the number of tags).

    What a generator that ignored its prompt would score: compare it with the summary. None when there is
    only one prompt per tag.
    """
    if len(items) <= stride:
        return None
    results = []
    for index, image in zip(indices, images):
        spec = items[(index + stride) % len(items)][0]
        results.append((spec["tag"], score_spec(parse_image(np.asarray(image.convert("RGB"))), spec).correct))
    return summarize_geneval(results)


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` independent items."""
    return float(np.sqrt(max(p * (1 - p), 0.0) / max(n, 1)))


def dense_background(
    items: list[tuple[dict[str, Any], Any]], indices: list[int], images: list[Image.Image], stride: int
) -> dict[str, float] | None:
    """Over the dense prompts' images: the share whose background colour (as the parser reads it) is the one
    the prompt names, and the same against the next dense prompt's colour (a prompt-blind generator's score;
    backgrounds are one of three colours). None without dense items."""
    own, other = [], []
    for index, image in zip(indices, images):
        spec = items[index][0]
        if spec.get("tag") != "dense":
            continue
        got = parse_image(np.asarray(image.convert("RGB"))).background
        own.append(got == spec["background"]["color"])
        other.append(got == items[(index + stride) % len(items)][0]["background"]["color"])
    if not own:
        return None
    acc = float(np.mean(own))
    return {
        "accuracy": acc,
        "se": binomial_se(acc, len(own)),
        "other_prompt": float(np.mean(other)),
        "n": len(own),
    }


@torch.no_grad()
def vae_ceiling(
    vae, items: list[tuple[dict[str, Any], Any]], references: list[Image.Image]
) -> dict[str, float]:
    """ShapesGenEval of the reference renders passed through ``vae`` (a VAEModel: encode -> decode): the best
    score a generator whose latents were perfect could reach through this VAE."""
    param = next(vae.parameters())
    results = []
    for start in range(0, len(references), 32):
        chunk = references[start : start + 32]
        batch = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in chunk])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device=param.device, dtype=param.dtype)
        y = (
            vae.decode(vae.encode(x))
            .float()
            .clamp(0, 1)
            .mul(255)
            .round()
            .byte()
            .permute(0, 2, 3, 1)
            .cpu()
            .numpy()
        )
        for (spec, _), arr in zip(items[start : start + 32], y):
            results.append((spec["tag"], score_spec(parse_image(arr), spec).correct))
    return summarize_geneval(results)


def load_vae_model(directory: str | Path):
    """The VAEModel of a stage-0 output or a release-layout model directory (its config.json's VAE sub-configs
    and its ``vae_model`` weights, loaded strictly)."""
    from cheers import checkpoint as ckpt
    from cheers.config import VAEDecoderConfig, VAEEncoderConfig
    from cheers.models.vae import VAEModel

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} is missing: give a stage-0 output (<run>/vae) or a model directory"
        )
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    try:
        enc, dec = (
            cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw[key].items()})
            for cls, key in (
                (VAEEncoderConfig, "vae_encoder_config"),
                (VAEDecoderConfig, "vae_decoder_config"),
            )
        )
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"{config_path} has no usable vae_encoder_config / vae_decoder_config ({err})"
        ) from None
    vae = VAEModel(enc, dec)
    state = {}
    for name, tensor in ckpt.load_state_dict(directory).items():
        name = name.removeprefix("model.").removeprefix("vae_model.")
        if name.startswith(("encoder.", "decoder.", "bn.")):
            state[name] = tensor
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{directory}: the VAE weights do not match its config (missing {missing[:4]}, "
            f"unexpected {unexpected[:4]})"
        )
    return vae.eval()


def vae_ceiling_of(directory: str | Path, n: int = 20) -> dict[str, float]:
    """:func:`vae_ceiling` of a VAE directory on the ShapesGenEval items of ``n`` prompts per tag."""
    vae = load_vae_model(directory)
    items = geneval_items(n)
    res = check_resolution(_vae_resolution(directory))
    return vae_ceiling(vae, items, [render_scene(scene, res) for _, scene in items])


def _vae_resolution(directory: str | Path) -> int:
    raw = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    return int(raw["vae_encoder_config"]["resolution"])


# -- ShapesVQA -----------------------------------------------------------------------------------------------
def vqa_items(n: int, split: str = "test") -> list[tuple[int, Any, list[dict[str, Any]]]]:
    """(seed, scene, questions) for n scenes of a held-out split (VQA_WORLD)."""
    out = []
    for seed in split_seeds(split, n):
        scene = sample_scene(np.random.default_rng([int(seed), _VQA_STREAM]), VQA_WORLD)
        out.append((int(seed), scene, scene_questions(scene, np.random.default_rng([int(seed), 7]))))
    return out


def shapes_vqa(pipe, cfg: ShapesBenchConfig, res: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    convs, images = [], []
    for seed, scene, questions in vqa_items(cfg.n, cfg.split):
        image = render_scene(scene, res)
        for q in questions:
            rows.append({"seed": seed, **q})
            convs.append(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["question"]}]}]
            )
            images.append(image)
    for start in range(0, len(convs), cfg.chat_batch):
        stop = start + cfg.chat_batch
        answers = pipe.chat(
            convs[start:stop], images=images[start:stop], max_new_tokens=cfg.max_new_tokens
        ).texts
        for row, answer in zip(rows[start:stop], answers):
            row["prediction"] = answer
    for row in rows:
        row["correct"] = score_vqa([row]).overall == 1.0
    return {"report": asdict(score_vqa(rows)), "n_scenes": cfg.n, "items": rows}


# -- ShapesEdit ----------------------------------------------------------------------------------------------
def edit_items(n: int, split: str = "test") -> list[tuple[int, Any]]:
    """(seed, EditSample) for n scenes of a held-out split."""
    return [
        (int(s), sample_edit(np.random.default_rng([int(s), _EDIT_STREAM]))) for s in split_seeds(split, n)
    ]


def shapes_edit(pipe, out: Path, cfg: ShapesBenchConfig, res: int) -> dict[str, Any]:
    folder = out / "edit"
    folder.mkdir(exist_ok=True)
    rows, tiles = [], []
    for i, (seed, sample) in enumerate(edit_items(cfg.n, cfg.split)):
        source, target = render_scene(sample.source, res), render_scene(sample.target, res)
        generator = torch.Generator(device=pipe.device).manual_seed(cfg.seed + seed)
        edited = pipe.edit(
            source,
            sample.instruction,
            num_inference_steps=cfg.edit_steps,
            guidance_scale=cfg.edit_guidance,
            generator=generator,
        ).images[0]
        result = score_edit(parse_image(edited), sample.spec())
        for name, im in (("source", source), ("edited", edited), ("target", target)):
            im.save(folder / f"{i:04d}_{name}.png")
        rows.append(
            {
                "seed": seed,
                "kind": sample.kind,
                "instruction": sample.instruction,
                **asdict(result),
                "reasons": list(result.reasons),
                "path": f"edit/{i:04d}_edited.png",
            }
        )
        size = edited.size
        tiles += [source.resize(size), mark(edited, result.correct, sample.kind), target.resize(size)]
    contact_sheet(tiles, cols=3).save(out / "edit_sheet.png")
    kinds = sorted({r["kind"] for r in rows})
    per_kind = {k: float(np.mean([r["correct"] for r in rows if r["kind"] == k])) for k in kinds}
    return {
        "summary": {
            "correct": float(np.mean([r["correct"] for r in rows])),
            "target_ok": float(np.mean([r["target_ok"] for r in rows])),
            "preserved": float(np.mean([r["preserved"] for r in rows])),
            "per_kind": per_kind,
        },
        "n": len(rows),
        "items": rows,
    }


# -- contact sheets ------------------------------------------------------------------------------------------
def mark(image: Image.Image, ok: bool, label: str = "") -> Image.Image:
    """A copy of ``image`` framed green (pass) or red (fail), with PASS/FAIL and ``label`` written on it."""
    im = image.convert("RGB").copy()
    draw = ImageDraw.Draw(im)
    color = PASS if ok else FAIL
    w, h = im.size
    border = max(2, w // 48)
    draw.rectangle((0, 0, w - 1, h - 1), outline=color, width=border)
    tag = "PASS" if ok else "FAIL"
    draw.rectangle((border, border, border + 6 * len(tag) + 4, border + 12), fill=color)
    draw.text((border + 2, border), tag, fill=(255, 255, 255))
    if label:
        draw.rectangle(
            (border, h - border - 12, min(w - border, border + 6 * len(label) + 4), h - border),
            fill=(255, 255, 255),
        )
        draw.text((border + 2, h - border - 12), label, fill=(0, 0, 0))
    return im
