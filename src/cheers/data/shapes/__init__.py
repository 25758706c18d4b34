"""ShapesWorld: a synthetic multimodal world the whole Cheers pipeline can learn and be judged on.

Scenes (world.py) render deterministically (render.py); text, questions and edits come with structured
specs (prompts.py, questions.py, edits.py); a deterministic parser (judge.py) reads images back and the
scorers (scoring.py, vqa.py, fidelity.py) grade them. samples.py / dataset.py / export.py feed the
trainer in the release's conversation format; tokenizer.py builds the tiny world's tokenizer;
cli.py is `cheers shapes ...`. See docs/shapes.md.

The torch datasets are imported lazily (``from cheers.data.shapes import ShapesDataset`` works, but
importing this package does not import torch).
"""

from __future__ import annotations

from typing import Any

from .edits import EDIT_KINDS, EditSample, apply_edit, sample_edit
from .export import ExportSummary, export_shapes
from .fidelity import hf_fidelity, high_frequency_fraction
from .judge import ParsedObject, ParsedScene, parse_image
from .prompts import GENEVAL_TAGS, PROMPT_TAGS, dense_spec, detailed_caption, sample_generation, short_caption
from .questions import QUESTION_TYPES, scene_questions, text_only_sample
from .render import RESOLUTIONS, contact_sheet, render_array, render_scene
from .samples import KINDS, SPLITS, Mix, make_sample, split_seeds
from .scoring import EditResult, SpecResult, relative_position, score_edit, score_spec, summarize_geneval
from .tokenizer import SPECIAL_TOKENS, build_shapes_tokenizer, load_shapes_tokenizer
from .validate import JudgeAccuracy, format_accuracy_table, judge_accuracy
from .vqa import VQAReport, normalize_answer, score_vqa
from .world import Background, Scene, ShapeObject, TextItem, WorldConfig, sample_scene

_LAZY = {"ShapesDataset", "ShapesStream"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EDIT_KINDS",
    "GENEVAL_TAGS",
    "KINDS",
    "PROMPT_TAGS",
    "QUESTION_TYPES",
    "RESOLUTIONS",
    "SPECIAL_TOKENS",
    "SPLITS",
    "Background",
    "EditResult",
    "EditSample",
    "ExportSummary",
    "JudgeAccuracy",
    "Mix",
    "ParsedObject",
    "ParsedScene",
    "Scene",
    "ShapeObject",
    "ShapesDataset",
    "ShapesStream",
    "SpecResult",
    "TextItem",
    "VQAReport",
    "WorldConfig",
    "apply_edit",
    "build_shapes_tokenizer",
    "contact_sheet",
    "dense_spec",
    "detailed_caption",
    "export_shapes",
    "format_accuracy_table",
    "hf_fidelity",
    "high_frequency_fraction",
    "judge_accuracy",
    "load_shapes_tokenizer",
    "make_sample",
    "normalize_answer",
    "parse_image",
    "relative_position",
    "render_array",
    "render_scene",
    "sample_edit",
    "sample_generation",
    "sample_scene",
    "scene_questions",
    "score_edit",
    "score_spec",
    "score_vqa",
    "short_caption",
    "split_seeds",
    "summarize_geneval",
    "text_only_sample",
]
