"""What a LoRA taught the bundled model about a new word, judged by ShapesWorld before and after loading it.

``cheers eval lora-shapes ADAPTER`` (after ``cheers train --recipe lora-shapes``) measures, on held-out seeds,
with the model alone and then with the adapter loaded:

* **draws the concept**: images generated from "A wug." that the scene parser reads as the concept (exactly
  one object of its shape and colour, on its background);
* **other prompts draw it**: images from held-out L1 ladder prompts ("A plain gray background. A large red
  circle.") read as the concept: a LoRA that draws a wug whatever it is asked scores high here;
* **L1 prompts followed**: the same images judged against their own prompts (does the model still do what it
  did before?);
* **names the concept**: "What is this?" about renders of the concept answered with the word;
* **yes/no accuracy**: "Is this a wug?" about renders of the concept (yes) and of other scenes, half of them
  near misses (no): balanced, so 0.5 is chance.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cheers.data.shapes import parse_image, score_spec, split_seeds
from cheers.data.shapes.concept import WHAT_QUESTION, Concept, concept_images, other_images
from cheers.data.shapes.ladder import rung_sample
from cheers.data.shapes.vqa import normalize_answer

METRICS = {
    "draws_concept": "draws the concept from its word",
    "other_prompts_draw_concept": "draws it for other (L1) prompts",
    "l1_prompts_followed": "L1 prompts followed",
    "names_concept": "names it ('What is this?')",
    "yes_no_accuracy": "yes/no 'Is this a ...?' accuracy (0.5 = chance)",
}


@dataclass(frozen=True)
class ConceptEval:
    """Sizes and settings of one measurement.

    n: images per generation measure, and images per answer (the yes/no measure asks about 2n).
    steps, guidance: text-to-image settings (None: the model's defaults).
    batch: images or conversations per model call (speed only).
    """

    n: int = 16
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    batch: int = 8
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        if self.n < 1 or self.batch < 1:
            raise ValueError(f"n and batch must be >= 1, got {self.n}, {self.batch}")


def _generate(pipe, prompts: list[str], cfg: ConceptEval) -> list[Any]:
    images = []
    for start in range(0, len(prompts), cfg.batch):
        chunk = prompts[start : start + cfg.batch]
        gens = [torch.Generator().manual_seed(cfg.seed + start + i) for i in range(len(chunk))]
        out = pipe.generate(chunk, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, generator=gens)
        images += out.images
    return images


def _answers(pipe, images: list[Any], question: str, cfg: ConceptEval) -> list[str]:
    texts = []
    for start in range(0, len(images), cfg.batch):
        chunk = images[start : start + cfg.batch]
        turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        convs = [[turn] for _ in chunk]
        texts += pipe.chat(convs, images=chunk, max_new_tokens=cfg.max_new_tokens).texts
    return texts


def _shows(image, spec: dict[str, Any]) -> bool:
    return score_spec(parse_image(np.asarray(image.convert("RGB"))), spec).correct


def evaluate_concept(pipe, concept: Concept, cfg: ConceptEval | None = None) -> dict[str, Any]:
    """The five measures of the module docstring for ``pipe`` as it is (adapters included)."""
    cfg = cfg or ConceptEval()
    res = pipe.processor.image_size
    seeds = split_seeds("test", cfg.n)
    drawn = _generate(pipe, [concept.prompt()] * cfg.n, cfg)
    l1 = [rung_sample("L1", int(s), res) for s in seeds]
    l1_images = _generate(pipe, [s.prompt for s in l1], cfg)
    shown = concept_images(concept, seeds, res)
    others = other_images(concept, seeds, res)
    named = _answers(pipe, shown, WHAT_QUESTION, cfg)
    yes = _answers(pipe, shown, concept.question, cfg)
    no = _answers(pipe, others, concept.question, cfg)

    def first_word(text: str) -> str:
        words = normalize_answer(text).split()
        return words[0] if words else ""

    return {
        "draws_concept": float(np.mean([_shows(im, concept.spec()) for im in drawn])),
        "other_prompts_draw_concept": float(np.mean([_shows(im, concept.spec()) for im in l1_images])),
        "l1_prompts_followed": float(np.mean([_shows(im, s.spec) for im, s in zip(l1_images, l1)])),
        "names_concept": float(np.mean([concept.word in normalize_answer(t).split() for t in named])),
        "yes_no_accuracy": float(
            np.mean([first_word(t) == "yes" for t in yes] + [first_word(t) == "no" for t in no])
        ),
        "examples": {"what_is_this": named[:4], "is_this_yes": yes[:4], "is_this_no": no[:4]},
    }


def compare_adapter(
    pipe,
    adapter: str | Path,
    concept: Concept | None = None,
    cfg: ConceptEval | None = None,
    scale: float = 1.0,
) -> dict[str, Any]:
    """Measure ``pipe`` without, then with the adapter (left loaded at ``scale``)."""
    concept, cfg = concept or Concept(), cfg or ConceptEval()
    started = time.perf_counter()
    before = evaluate_concept(pipe, concept, cfg)
    pipe.load_lora_weights(adapter, scale=scale)
    after = evaluate_concept(pipe, concept, cfg)
    return {
        "adapter": str(adapter),
        "scale": scale,
        "concept": asdict(concept),
        "config": asdict(cfg),
        "before": before,
        "after": after,
        "seconds": round(time.perf_counter() - started, 1),
    }


def markdown_table(report: dict[str, Any]) -> str:
    """The before/after figures as a markdown table."""
    c, n = report["concept"], report["config"]["n"]
    lines = [
        f"concept: {c['word']!r} = a {c['size']} {c['color']} {c['shape']} on a {c['background']} "
        f"background; {n} held-out items per measure",
        "",
        "| measure | base model | with the adapter |",
        "|---|---:|---:|",
    ]
    for key, title in METRICS.items():
        lines.append(f"| {title} | {report['before'][key]:.2f} | {report['after'][key]:.2f} |")
    return "\n".join(lines) + "\n"
