"""The model every command uses by default.

``cheers-tiny-shapes`` (a small Cheers trained on ShapesWorld) ships inside the package once it exists. Until
then — or when the package was installed without it — the default is a tiny model with RANDOM weights and the
ShapesWorld tokenizer, built once into the cache directory and clearly reported as untrained.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).parent / "cheers-tiny-shapes"
SHAPES_TOKENIZER_DIR = Path(__file__).parent / "shapes-tokenizer"  # the ShapesWorld tokenizer's shipped build
RANDOM_TINY_NAME = "random-tiny-v1"


def cache_dir() -> Path:
    root = os.environ.get("CHEERS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "cheers"
    )
    return Path(root).expanduser()


def has_bundled_model() -> bool:
    return (BUNDLED_DIR / "config.json").exists() and any(BUNDLED_DIR.glob("*.safetensors"))


def default_model_dir() -> Path:
    """The bundled trained model, or (with a warning) a random-weight tiny model."""
    if has_bundled_model():
        return BUNDLED_DIR
    logger.warning(
        "the bundled trained model cheers-tiny-shapes is not installed: using a tiny model with "
        "RANDOM weights (its outputs are noise; it exercises the whole pipeline)"
    )
    return random_tiny_model_dir()


def random_tiny_model_dir(directory: Path | None = None, seed: int = 0) -> Path:
    """Build (once) a random-weight ``tiny`` Cheers with the ShapesWorld tokenizer, in the release layout."""
    import shutil

    import torch

    from cheers.config import preset
    from cheers.models.cheers import Cheers
    from cheers.models.pretrained import save_pretrained
    from cheers.processor import CheersProcessor

    directory = directory or cache_dir() / RANDOM_TINY_NAME
    if (directory / "config.json").exists():
        return directory
    staging = directory.with_name(directory.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    for f in SHAPES_TOKENIZER_DIR.iterdir():
        shutil.copy(f, staging / f.name)
    processor = CheersProcessor.from_pretrained(staging, image_size=128, patch_size=16)
    vocab = len(processor.tokenizer)
    config = preset("tiny").replace(**{"text.vocab_size": vocab})
    torch.manual_seed(seed)
    model = Cheers(config, special=processor.special)
    processor.save_pretrained(staging)
    save_pretrained(model, staging)
    # an untrained model gains nothing from many steps: keep the demo quick
    (staging / "sampling_defaults.json").write_text(
        json.dumps(
            {
                "num_inference_steps": 8,
                "guidance_scale": 3.0,
                "shift": 0.5,
                "edit_num_inference_steps": 8,
                "edit_guidance_scale": 3.0,
            },
            indent=2,
        )
        + "\n"
    )
    staging.rename(directory)
    return directory
