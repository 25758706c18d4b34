"""cheers: a faithful, fast and hackable implementation of the Cheers unified multimodal model.

The public API (typed; the package ships ``py.typed``)::

    from cheers import CheersPipeline
    pipe = CheersPipeline.from_pretrained()            # the bundled tiny model; or a release dir / hub id
    image = pipe.generate("two red circles").images[0]

Names are imported on first use, so ``import cheers`` stays cheap (the CLI's start-up does not pay for torch
until a command needs it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "CheersPipeline": "cheers.pipeline",
    "SamplingDefaults": "cheers.pipeline",
    "ImagePipelineOutput": "cheers.pipeline",
    "ChatOutput": "cheers.pipeline",
    "CheersConfig": "cheers.config",
    "ConfigError": "cheers.config",
    "preset": "cheers.config",
    "Cheers": "cheers.models.cheers",
    "CheersProcessor": "cheers.processor",
    "TextSampling": "cheers.text_sampling",
    "ImageSampling": "cheers.sampling",
    "GenerationOutput": "cheers.generation",
    "generate": "cheers.generation",
    "default_model_dir": "cheers.assets",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # what type checkers and IDEs see
    from cheers.assets import default_model_dir  # noqa: F401
    from cheers.config import CheersConfig, ConfigError, preset  # noqa: F401
    from cheers.generation import GenerationOutput, generate  # noqa: F401
    from cheers.models.cheers import Cheers  # noqa: F401
    from cheers.pipeline import ChatOutput, CheersPipeline, ImagePipelineOutput, SamplingDefaults  # noqa: F401
    from cheers.processor import CheersProcessor  # noqa: F401
    from cheers.sampling import ImageSampling  # noqa: F401
    from cheers.text_sampling import TextSampling  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cheers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
