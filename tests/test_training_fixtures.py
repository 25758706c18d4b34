"""Shared helpers of the training tests: a tiny recipe, tiny data on disk, a tiny processor.

The model is the ``tiny`` preset at 64 px (a 4x4 latent grid, 4 LLM tokens per image): a training step takes
about 0.1 s on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cheers.processor import CheersProcessor
from cheers.training.config import Recipe, apply_overrides, recipe_from_dict

from tiny_tokenizer import make_tiny_tokenizer

SIZE = 64
IMAGE = "<im_start><image><im_end>"
IMAGE_GEN = "<im_start><image_gen><im_end>"
GEN_SUFFIX = "\nBased on the above description, generate an image."


def tiny_processor() -> CheersProcessor:
    return CheersProcessor(make_tiny_tokenizer(), image_size=SIZE, patch_size=16)


def _image(path: Path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, size=3)
    array = np.tile(colour, (48, 40, 1)).astype(np.uint8)
    array[10:30, 8:24] = 255 - colour
    Image.fromarray(array).save(path)
    return path.name


def write_data(root: Path, n: int = 6) -> dict[str, Path]:
    """und / gen / text / edit jsonl files (n records each) and their images under ``root/images``."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    files = {}
    for task in ("und", "gen", "text", "edit"):
        lines = []
        for i in range(n):
            if task == "und":
                name = _image(images / f"und{i}.png", i)
                rec = {
                    "id": f"und{i}",
                    "image": name,
                    "conversations": [
                        {"from": "human", "value": f"{IMAGE}\nDescribe the image."},
                        {
                            "from": "gpt",
                            "value": "A red cube on a blue sphere." if i % 2 else "There are two cats.",
                        },
                    ],
                }
            elif task == "gen":
                name = _image(images / f"gen{i}.png", 100 + i)
                rec = {
                    "id": f"gen{i}",
                    "image": name,
                    "conversations": [
                        {"from": "human", "value": ("An apple." if i % 2 else "A red cube.") + GEN_SUFFIX},
                        {"from": "gpt", "value": IMAGE_GEN},
                    ],
                }
            elif task == "text":
                rec = {
                    "id": f"text{i}",
                    "conversations": [
                        {"from": "human", "value": "What color is the cube?"},
                        {"from": "gpt", "value": "The cube is red." if i % 2 else "Make the sky green."},
                    ],
                }
            else:
                src, tgt = _image(images / f"src{i}.png", 200 + i), _image(images / f"tgt{i}.png", 300 + i)
                rec = {
                    "id": f"edit{i}",
                    "image": f"{src}, {tgt}",
                    "conversations": [
                        {"from": "human", "value": f"{IMAGE}\nMake the sky green."},
                        {"from": "gpt", "value": IMAGE_GEN},
                    ],
                }
            lines.append(json.dumps(rec))
        path = root / f"{task}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        files[task] = path
    return files


def tiny_recipe(root: Path, files: dict[str, Path], stage: str = "custom", **sets) -> Recipe:
    """A recipe for the 64-px tiny model on ``files`` (und:gen:text = 1:1:1 unless ``sources`` is set)."""
    data = {
        "stage": stage,
        "out": str(root / "run"),
        "model": {"preset": "tiny", "overrides": {"vision.image_size": SIZE}},
        "data": {
            "sources": [
                {
                    "name": "und",
                    "kind": "jsonl",
                    "task": "understanding",
                    "ratio": 1,
                    "path": str(files["und"]),
                    "image_root": str(root / "images"),
                },
                {
                    "name": "gen",
                    "kind": "jsonl",
                    "task": "generation",
                    "ratio": 1,
                    "path": str(files["gen"]),
                    "image_root": str(root / "images"),
                },
                {
                    "name": "text",
                    "kind": "jsonl",
                    "task": "text",
                    "ratio": 1,
                    "path": str(files["text"]),
                    "image_root": str(root / "images"),
                },
            ],
            "num_workers": 0,
            "corrupt_grace": 0,
            "max_corrupt_fraction": 0.5,
        },
        "train": {
            "trainable": ["und_projector", "llm", "flow_head", "hfi_gate"],
            "lr": 1e-3,
            "steps": 3,
            "micro_batch": 2,
            "global_batch": 4,
            "warmup_ratio": 0.0,
        },
        "engine": {"device": "cpu"},
        "checkpoint": {"every": 0, "export": False},
        "log": {"every": 1, "progress": False, "tensorboard": False},
    }
    return recipe_from_dict(apply_overrides(data, sets))


@pytest.fixture
def one_thread():
    """One intra-op thread: the tiny model gains nothing from more, and on a busy machine threads fight."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
